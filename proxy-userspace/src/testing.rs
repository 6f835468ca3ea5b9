//! Helpers shared by the unit tests.

/// A tiny deterministic generator, so property-test failures replay.
pub struct XorShift(pub u64);

impl XorShift {
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }

    pub fn pick(&mut self, n: u64) -> u8 {
        u8::try_from(self.below(n)).unwrap()
    }
}
