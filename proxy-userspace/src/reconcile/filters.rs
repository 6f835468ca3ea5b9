//! The tc programs' address filters ([`proxy_common::FRONTEND_FILTER_MAP`]):
//! a bit for each frontend a packet may be addressed to and each backend a
//! reply may come from, so that the programs let every other packet go
//! before any hash lookup.
//!
//! A filter must never lack a bit that a packet to serve needs. Bits are
//! set before the tables hold their frontend (those of the frontends each
//! sync changes, before the tables' pass), and only a rebuild clears any:
//! it keeps the desired state's bits and those of every flow in the flow
//! tables, since a flow keeps its backend after its frontend or backend
//! went, as conntrack keeps it under kube-proxy. The agent rebuilds at its
//! first sync and every [`SWEEP_PERIOD`] after; between rebuilds the
//! filters only gain bits, which costs the programs only lookups.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use aya::maps::MapError;
use proxy_common::{
    Address, FILTER_WORDS, FLOW_FORWARD, FLOW_REPLY, FlowKey, Ip4, Ip6, filter_bit,
};
use tracing::{info, warn};

use crate::{
    maps::{
        encoding::MapAddress,
        table::{Filter, Flows},
    },
    model::{Changes, DesiredFrontend, L4Addr, Model},
};

/// How often bits nothing needs any more are cleared.
pub const SWEEP_PERIOD: Duration = Duration::from_mins(10);

/// Both filters as the programs see them, and the flow tables a rebuild
/// keeps the bits of.
pub struct Filters {
    frontends: Written,
    backends: Written,
    flows4: Flows<Ip4>,
    flows6: Flows<Ip6>,
    /// When the next rebuild is due; `None` before the first.
    next_rebuild: Option<Instant>,
}

/// One filter map and the words last written to it.
struct Written {
    map: Filter,
    words: Vec<u64>,
}

/// Filter words being built.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bits {
    pub frontends: Vec<u64>,
    pub backends: Vec<u64>,
}

impl Default for Bits {
    fn default() -> Self {
        let words = vec![0; FILTER_WORDS as usize];
        Self {
            frontends: words.clone(),
            backends: words,
        }
    }
}

impl Bits {
    /// A frontend of a frontend table, and its backends.
    pub fn frontend(&mut self, address: &L4Addr, frontend: &DesiredFrontend) {
        set(
            &mut self.frontends,
            fold(address.ip),
            address.port,
            address.protocol.number(),
        );
        for backend in frontend.backends.iter() {
            set(
                &mut self.backends,
                fold(backend.ip),
                backend.port,
                backend.protocol.number(),
            );
        }
    }

    /// What a flow-table entry needs: its frontend for the way in, its
    /// backend for the way back.
    pub fn flow<A: Address>(&mut self, key: &FlowKey<A>) {
        let (words, address, port_be) = match key.direction {
            FLOW_FORWARD => (&mut self.frontends, key.daddr_be, key.dport_be),
            FLOW_REPLY => (&mut self.backends, key.saddr_be, key.sport_be),
            _ => return,
        };
        set_be(words, address.fold(), port_be, key.proto);
    }

    /// Every bit of `other` too.
    fn union(&mut self, other: &Self) {
        for (mine, theirs) in [
            (&mut self.frontends, &other.frontends),
            (&mut self.backends, &other.backends),
        ] {
            for (word, other) in mine.iter_mut().zip(theirs) {
                *word |= other;
            }
        }
    }
}

/// The folded address as the programs fold it (from the address in map
/// order).
fn fold(ip: IpAddr) -> u32 {
    match ip {
        IpAddr::V4(_) => Ip4::from_ip(ip).map_or(0, |a| a.fold()),
        IpAddr::V6(_) => Ip6::from_ip(ip).map_or(0, |a| a.fold()),
    }
}

fn set(words: &mut [u64], folded: u32, port: u16, proto: u8) {
    set_be(words, folded, port.to_be(), proto);
}

fn set_be(words: &mut [u64], folded: u32, port_be: u16, proto: u8) {
    let bit = filter_bit(folded, port_be, proto);
    if let Some(word) = words.get_mut(bit as usize >> 6) {
        *word |= 1 << (bit & 63);
    }
}

impl Filters {
    /// Takes over the pinned filters, with the words they hold.
    pub fn adopt(
        frontends: Filter,
        backends: Filter,
        flows4: Flows<Ip4>,
        flows6: Flows<Ip6>,
    ) -> Self {
        Self {
            frontends: Written::read(frontends),
            backends: Written::read(backends),
            flows4,
            flows6,
            next_rebuild: None,
        }
    }

    /// Before the tables' pass: the bits of the frontends `changes` names
    /// (and of their backends) are added. The first sync rebuilds instead.
    /// `complete`: whether the source's view is; a rebuild without it
    /// keeps every bit, since the tables keep what no object claims.
    pub fn before_pass(&mut self, model: &Model, changes: &Changes, complete: bool) {
        if self.next_rebuild.is_none() {
            self.rebuild(model, complete);
            return;
        }
        let mut bits = self.written();
        for (desired, changed) in [
            (model.desired(), &changes.sockets),
            (model.tc_desired(), &changes.tc),
        ] {
            for address in changed {
                if let Some(frontend) = desired.frontends.get(address) {
                    bits.frontend(address, frontend);
                }
            }
        }
        self.write(&bits);
    }

    /// Whether a rebuild is due.
    #[must_use]
    pub fn rebuild_due(&self, now: Instant) -> bool {
        self.next_rebuild.is_some_and(|due| now >= due)
    }

    /// Both filters anew: the desired state's bits, the flow tables', and
    /// (`complete` false) everything written so far.
    pub fn rebuild(&mut self, model: &Model, complete: bool) {
        let mut bits = Bits::default();
        for desired in [model.desired(), model.tc_desired()] {
            for (address, frontend) in &desired.frontends {
                bits.frontend(address, frontend);
            }
        }
        let flows = self.flow_bits(&mut bits);
        if !complete {
            bits.union(&self.written());
        }
        let cleared = self.write(&bits);
        self.next_rebuild = Some(Instant::now() + SWEEP_PERIOD);
        info!(flows, cleared, "rebuilt the tc programs' address filters");
    }

    /// Adds every flow's bits; how many flows there were.
    fn flow_bits(&self, bits: &mut Bits) -> usize {
        let mut flows = 0;
        for key in self.flows4.keys() {
            match key {
                Ok(key) => bits.flow(&key),
                Err(error) => warn!(%error, "cannot read the IPv4 flow table"),
            }
            flows += 1;
        }
        for key in self.flows6.keys() {
            match key {
                Ok(key) => bits.flow(&key),
                Err(error) => warn!(%error, "cannot read the IPv6 flow table"),
            }
            flows += 1;
        }
        flows
    }

    fn written(&self) -> Bits {
        Bits {
            frontends: self.frontends.words.clone(),
            backends: self.backends.words.clone(),
        }
    }

    /// Writes the words that changed; how many bits went. A failed write
    /// has the next sync rebuild, so a missing bit is not left for long.
    fn write(&mut self, bits: &Bits) -> u32 {
        let mut cleared = 0;
        for (written, words) in [
            (&mut self.frontends, &bits.frontends),
            (&mut self.backends, &bits.backends),
        ] {
            match written.write(words) {
                Ok(bits) => cleared += bits,
                Err(error) => {
                    warn!(%error, "cannot write the tc programs' address filter; rebuilding at the next sync");
                    self.next_rebuild = None;
                }
            }
        }
        cleared
    }
}

impl Written {
    /// The map and what it holds (zeroes where it cannot be read, which
    /// the first rebuild writes over).
    fn read(map: Filter) -> Self {
        let words = (0..FILTER_WORDS)
            .map(|index| map.get(&index, 0).unwrap_or(0))
            .collect();
        Self { map, words }
    }

    /// Writes the words of `words` that differ from what was written; how
    /// many bits were cleared.
    fn write(&mut self, words: &[u64]) -> Result<u32, MapError> {
        let mut cleared = 0;
        for (index, (old, new)) in self.words.iter_mut().zip(words).enumerate() {
            if old != new {
                let index = u32::try_from(index).unwrap_or(u32::MAX);
                self.map.set(index, *new, 0)?;
                cleared += (*old & !*new).count_ones();
                *old = *new;
            }
        }
        Ok(cleared)
    }
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, sync::Arc};

    use proxy_common::PROTO_TCP;

    use super::*;
    use crate::model::Protocol;

    fn l4(ip: &str, port: u16) -> L4Addr {
        L4Addr {
            ip: ip.parse().unwrap(),
            port,
            protocol: Protocol::Tcp,
        }
    }

    fn has(words: &[u64], folded: u32, port_be: u16, proto: u8) -> bool {
        let bit = filter_bit(folded, port_be, proto);
        words[bit as usize >> 6] & (1 << (bit & 63)) != 0
    }

    /// The bits the agent sets are those the programs look up: the same
    /// fold of the address as the maps hold it, the port in network order.
    #[test]
    fn a_frontend_and_its_backends_set_the_bits_the_programs_read() {
        let mut bits = Bits::default();
        let frontend = DesiredFrontend {
            service: "default/web".to_owned(),
            backends: Arc::from([l4("10.244.1.10", 8080), l4("fd00::10", 8080)]),
            flags: 0,
            affinity: 0,
        };
        bits.frontend(&l4("10.96.0.10", 80), &frontend);
        let ip4 = |ip: &str| u32::from_ne_bytes(ip.parse::<Ipv4Addr>().unwrap().octets());
        assert!(has(
            &bits.frontends,
            ip4("10.96.0.10"),
            80_u16.to_be(),
            PROTO_TCP
        ));
        assert!(!has(
            &bits.frontends,
            ip4("10.96.0.11"),
            80_u16.to_be(),
            PROTO_TCP
        ));
        assert!(has(
            &bits.backends,
            ip4("10.244.1.10"),
            8080_u16.to_be(),
            PROTO_TCP
        ));
        let six: Ip6 = Ip6::from_ip("fd00::10".parse().unwrap()).unwrap();
        assert!(has(&bits.backends, six.fold(), 8080_u16.to_be(), PROTO_TCP));
        assert_eq!(
            bits.frontends.iter().map(|w| w.count_ones()).sum::<u32>(),
            1
        );
    }

    #[test]
    fn a_flows_forward_entry_keeps_its_frontend_and_its_reply_entry_its_backend() {
        let mut bits = Bits::default();
        let key = |direction, saddr: u32, daddr: u32| FlowKey {
            saddr_be: saddr,
            daddr_be: daddr,
            sport_be: 1000_u16.to_be(),
            dport_be: 2000_u16.to_be(),
            proto: PROTO_TCP,
            direction,
            pad: [0; 2],
        };
        bits.flow(&key(FLOW_FORWARD, 1, 2));
        bits.flow(&key(FLOW_REPLY, 3, 4));
        assert!(has(&bits.frontends, 2, 2000_u16.to_be(), PROTO_TCP));
        assert!(has(&bits.backends, 3, 1000_u16.to_be(), PROTO_TCP));
        assert!(!has(&bits.frontends, 1, 1000_u16.to_be(), PROTO_TCP));
    }

    /// 100,000 addresses set fewer than one bit in ten, as the map's size
    /// promises: most packets for no frontend leave at the filter.
    #[test]
    fn a_hundred_thousand_addresses_leave_nine_bits_in_ten_clear() {
        let mut bits = Bits::default();
        for i in 0..100_000_u32 {
            set(&mut bits.frontends, i.to_be() ^ 0x0a60_0000, 80, PROTO_TCP);
        }
        let set_bits: u32 = bits.frontends.iter().map(|w| w.count_ones()).sum();
        assert!(set_bits < FILTER_WORDS * 64 / 10, "{set_bits}");
    }
}
