//! An address range of either family, as `--service-cidr`,
//! `--cluster-cidr` and kube-proxy's configuration write them
//! (`10.96.0.0/12`, `fd10:96::/112`).

use std::{fmt, net::IpAddr, str::FromStr};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub address: IpAddr,
    pub prefix_len: u8,
}

impl Cidr {
    /// Whether `ip` is in the range; never for an address of the other
    /// family.
    #[must_use]
    pub fn contains(self, ip: IpAddr) -> bool {
        match (self.address, ip) {
            (IpAddr::V4(base), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix_len))
                    .unwrap_or(0);
                u32::from(ip) & mask == u32::from(base) & mask
            }
            (IpAddr::V6(base), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix_len))
                    .unwrap_or(0);
                u128::from(ip) & mask == u128::from(base) & mask
            }
            _ => false,
        }
    }

    /// The range with its host bits cleared (`10.0.0.5/24` is
    /// `10.0.0.0/24`): one spelling per range.
    #[must_use]
    pub fn network(self) -> Self {
        let address = match self.address {
            IpAddr::V4(base) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix_len))
                    .unwrap_or(0);
                IpAddr::V4((u32::from(base) & mask).into())
            }
            IpAddr::V6(base) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix_len))
                    .unwrap_or(0);
                IpAddr::V6((u128::from(base) & mask).into())
            }
        };
        Self { address, ..self }
    }

    /// `"IPv4"` or `"IPv6"`, as Kubernetes spells the families.
    #[must_use]
    pub const fn family(self) -> &'static str {
        if self.address.is_ipv4() {
            "IPv4"
        } else {
            "IPv6"
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    /// A range with its prefix length, as kube-proxy requires.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{text:?} is not an address range like 10.244.0.0/16 or fd00::/48");
        let (address, prefix_len) = text.split_once('/').ok_or_else(bad)?;
        let address: IpAddr = address.parse().map_err(|_| bad())?;
        let max = if address.is_ipv4() { 32 } else { 128 };
        let prefix_len: u8 = prefix_len.parse().map_err(|_| bad())?;
        if prefix_len > max {
            return Err(bad());
        }
        Ok(Self {
            address,
            prefix_len,
        })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_of_both_families_hold_their_own_addresses_only() {
        let v4: Cidr = "10.96.0.0/12".parse().unwrap();
        let v6: Cidr = "fd10:96::/112".parse().unwrap();
        assert!(v4.contains("10.111.255.1".parse().unwrap()));
        assert!(!v4.contains("10.112.0.1".parse().unwrap()));
        assert!(v6.contains("fd10:96::ffff".parse().unwrap()));
        assert!(!v6.contains("fd10:96::1:0".parse().unwrap()));
        assert!(!v4.contains("fd10:96::1".parse().unwrap()));
        assert!(!v6.contains("10.96.0.1".parse().unwrap()));
        let host_bits: Cidr = "10.244.1.7/16".parse().unwrap();
        assert_eq!(host_bits.network().to_string(), "10.244.0.0/16");
        let host_bits6: Cidr = "fd00::1:2/112".parse().unwrap();
        assert_eq!(host_bits6.network().to_string(), "fd00::1:0/112");
        let everything: Cidr = "::/0".parse().unwrap();
        assert_eq!(everything.network(), everything);
        assert!(everything.contains("2001:db8::1".parse().unwrap()));
        assert!("10.0.0.1".parse::<Cidr>().is_err());
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("fd00::/129".parse::<Cidr>().is_err());
        assert!("nonsense/8".parse::<Cidr>().is_err());
    }
}
