//! Model types to map keys and values and back. Network byte order starts
//! and ends here.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::maps::lpm_trie::Key;
use proxy_common::{
    Address, Backend, Ip4, Ip6, PROTO_TCP, PROTO_UDP, RevNatPair, ServiceKey, SourceRange,
};

use crate::model::{Cidr, L4Addr, Protocol};

impl Protocol {
    #[must_use]
    pub const fn number(self) -> u8 {
        match self {
            Self::Tcp => PROTO_TCP,
            Self::Udp => PROTO_UDP,
        }
    }

    #[must_use]
    pub const fn from_number(number: u8) -> Option<Self> {
        match number {
            PROTO_TCP => Some(Self::Tcp),
            PROTO_UDP => Some(Self::Udp),
            _ => None,
        }
    }
}

/// An address of one family as the maps hold it: its octets as they go
/// on the wire.
pub trait MapAddress: Address {
    /// `None` for an address of the other family.
    fn from_ip(ip: IpAddr) -> Option<Self>;
    fn to_ip(self) -> IpAddr;
}

impl MapAddress for Ip4 {
    fn from_ip(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V4(ip) => Some(Self::from_ne_bytes(ip.octets())),
            IpAddr::V6(_) => None,
        }
    }

    fn to_ip(self) -> IpAddr {
        Ipv4Addr::from(self.to_ne_bytes()).into()
    }
}

impl MapAddress for Ip6 {
    fn from_ip(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V6(ip) => Some(bytemuck::cast(ip.octets())),
            IpAddr::V4(_) => None,
        }
    }

    fn to_ip(self) -> IpAddr {
        Ipv6Addr::from(bytemuck::cast::<Self, [u8; 16]>(self)).into()
    }
}

impl L4Addr {
    /// The slot-0 key of this frontend, in its family's map; `None` in the
    /// other family's.
    #[must_use]
    pub fn service_key<A: MapAddress>(self) -> Option<ServiceKey<A>> {
        Some(ServiceKey::frontend(
            A::from_ip(self.ip)?,
            self.port.to_be(),
            self.protocol.number(),
        ))
    }

    /// The map value of this backend, in its family's map.
    #[must_use]
    pub fn backend<A: MapAddress>(self) -> Option<Backend<A>> {
        Some(Backend {
            addr_be: A::from_ip(self.ip)?,
            port_be: self.port.to_be(),
            proto: self.protocol.number(),
            flags: 0,
        })
    }

    /// The frontend a service key belongs to; `None` for a protocol this
    /// agent does not write.
    #[must_use]
    pub fn from_service_key<A: MapAddress>(key: &ServiceKey<A>) -> Option<Self> {
        Some(Self {
            ip: key.addr_be.to_ip(),
            port: u16::from_be(key.port_be),
            protocol: Protocol::from_number(key.proto)?,
        })
    }

    /// The source-range trie's entry for `range` of this frontend (its
    /// network, host bits cleared); `None` when either is of the other
    /// family.
    #[must_use]
    pub fn source_range_key<A: MapAddress>(self, range: Cidr) -> Option<Key<SourceRange<A>>> {
        let frontend = self.service_key::<A>()?;
        let range = range.network();
        Some(Key::new(
            SourceRange::<A>::prefix_len(range.prefix_len),
            SourceRange {
                frontend_addr_be: frontend.addr_be,
                frontend_port_be: frontend.port_be,
                proto: frontend.proto,
                pad: 0,
                source_be: A::from_ip(range.address)?,
            },
        ))
    }

    /// The frontend and range of a source-range trie entry; `None` for an
    /// entry this agent does not write.
    #[must_use]
    pub fn from_source_range_key<A: MapAddress>(key: &Key<SourceRange<A>>) -> Option<(Self, Cidr)> {
        let entry = key.data();
        let prefix_len = key
            .prefix_len()
            .checked_sub(SourceRange::<A>::prefix_len(0))?;
        let frontend = Self {
            ip: entry.frontend_addr_be.to_ip(),
            port: u16::from_be(entry.frontend_port_be),
            protocol: Protocol::from_number(entry.proto)?,
        };
        let range = Cidr {
            address: entry.source_be.to_ip(),
            prefix_len: u8::try_from(prefix_len).ok()?,
        };
        Some((frontend, range))
    }

    #[must_use]
    pub fn from_backend<A: MapAddress>(backend: Backend<A>) -> Option<Self> {
        Some(Self {
            ip: backend.addr_be.to_ip(),
            port: u16::from_be(backend.port_be),
            protocol: Protocol::from_number(backend.proto)?,
        })
    }
}

fn addr_be(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// An address and port, as a socket's reverse translations name them:
/// IPv4-mapped IPv6 addresses (an IPv6 socket's name for an IPv4 Service)
/// as the IPv4 addresses they stand for, so one comparison covers both.
pub type HostPort = (IpAddr, u16);

/// A socket's reverse translation as its storage holds it: the frontend
/// it asked for, and the backend it was sent to. Only the programs write
/// these; tests make them as the programs would.
#[cfg(test)]
#[must_use]
pub fn rev_nat_pair<A: MapAddress>(frontend: HostPort, backend: HostPort) -> RevNatPair<A> {
    RevNatPair {
        backend_addr_be: A::from_ip(backend.0).expect("an address of the family"),
        frontend_addr_be: A::from_ip(frontend.0).expect("an address of the family"),
        backend_port_be: backend.1.to_be(),
        frontend_port_be: frontend.1.to_be(),
    }
}

/// The frontend and backend of a reverse translation; `None` for a free
/// pair.
#[must_use]
pub fn rev_nat_addresses<A: MapAddress>(pair: &RevNatPair<A>) -> Option<(HostPort, HostPort)> {
    (pair.backend_addr_be != A::default()).then(|| {
        (
            (
                pair.frontend_addr_be.to_ip().to_canonical(),
                u16::from_be(pair.frontend_port_be),
            ),
            (
                pair.backend_addr_be.to_ip().to_canonical(),
                u16::from_be(pair.backend_port_be),
            ),
        )
    })
}

impl Cidr {
    /// The network address and netmask as the tc programs compare them;
    /// `(0, 0)` (no range) for an IPv6 range.
    #[must_use]
    pub fn ipv4_network_and_mask_be(self) -> (u32, u32) {
        let IpAddr::V4(address) = self.address else {
            return (0, 0);
        };
        let mask = u32::MAX
            .checked_shl(32 - u32::from(self.prefix_len))
            .unwrap_or(0);
        (
            addr_be(Ipv4Addr::from(u32::from(address) & mask)),
            addr_be(Ipv4Addr::from(mask)),
        )
    }
}

#[cfg(test)]
mod tests {
    use bytemuck::bytes_of;
    use proxy_common::{ServiceValue, SockRevNat};

    use super::*;

    #[test]
    fn service_key_is_in_network_byte_order_as_the_kernel_sees_it() {
        let frontend = L4Addr {
            ip: Ipv4Addr::new(10, 96, 0, 10).into(),
            port: 53,
            protocol: Protocol::Udp,
        };
        assert_eq!(
            bytes_of(&frontend.service_key::<Ip4>().unwrap()),
            [10, 96, 0, 10, 0, 53, 0, 0, 17, 0, 0, 0]
        );
        assert_eq!(
            bytes_of(&frontend.service_key::<Ip4>().unwrap().slot(2))[6..8],
            [2, 0]
        );
    }

    #[test]
    fn backend_bytes_and_round_trip() {
        let backend = L4Addr {
            ip: Ipv4Addr::new(10, 244, 1, 7).into(),
            port: 8080,
            protocol: Protocol::Tcp,
        };
        assert_eq!(
            bytes_of(&backend.backend::<Ip4>().unwrap()),
            [10, 244, 1, 7, 0x1f, 0x90, 6, 0]
        );
        assert_eq!(
            L4Addr::from_backend(backend.backend::<Ip4>().unwrap()),
            Some(backend)
        );
        assert_eq!(
            L4Addr::from_service_key(&backend.service_key::<Ip4>().unwrap()),
            Some(backend)
        );
        assert_eq!(backend.service_key::<Ip6>(), None);
        let backend6 = L4Addr {
            ip: "fd00:10:244::7".parse().unwrap(),
            ..backend
        };
        let value = backend6.backend::<Ip6>().unwrap();
        assert_eq!(
            bytes_of(&value)[..16],
            [0xfd, 0, 0, 0x10, 0x2, 0x44, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7]
        );
        assert_eq!(L4Addr::from_backend(value), Some(backend6));
        assert_eq!(backend6.backend::<Ip4>(), None);
    }

    #[test]
    fn a_slot_carries_its_backend_as_the_programs_read_it() {
        let backend = L4Addr {
            ip: Ipv4Addr::new(10, 244, 1, 7).into(),
            port: 8080,
            protocol: Protocol::Tcp,
        }
        .backend::<Ip4>()
        .unwrap();
        assert_eq!(
            bytes_of(&ServiceValue::backend(0x0102_0304, &backend)),
            [4, 3, 2, 1, 10, 244, 1, 7, 0x1f, 0x90, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(
            bytes_of(&ServiceValue::<proxy_common::Ip4>::frontend(3, 0, 0)),
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0]
        );
        // A socket's storage starts zeroed, which must read as "no pairs".
        let fresh: SockRevNat = bytemuck::pod_read_unaligned(&[0; size_of::<SockRevNat>()]);
        assert!(fresh.pairs.iter().all(|p| p.backend_addr_be == 0));
    }

    #[test]
    fn reverse_translations_and_the_cluster_cidr_are_in_network_byte_order() {
        let frontend = (Ipv4Addr::new(10, 96, 0, 10).into(), 53);
        let backend = (Ipv4Addr::new(10, 244, 1, 7).into(), 8080);
        let pair = rev_nat_pair::<Ip4>(frontend, backend);
        assert_eq!(
            bytes_of(&pair),
            [10, 244, 1, 7, 10, 96, 0, 10, 0x1f, 0x90, 0, 53]
        );
        assert_eq!(rev_nat_addresses(&pair), Some((frontend, backend)));
        assert_eq!(rev_nat_addresses(&RevNatPair::<Ip4>::default()), None);
        // An IPv6 socket's translation of an IPv4 Service holds mapped
        // addresses, and reads as the IPv4 ones.
        let mapped = |(ip, port): HostPort| match ip {
            IpAddr::V4(v4) => (IpAddr::V6(v4.to_ipv6_mapped()), port),
            IpAddr::V6(_) => (ip, port),
        };
        let pair6 = rev_nat_pair::<Ip6>(mapped(frontend), mapped(backend));
        assert_eq!(rev_nat_addresses(&pair6), Some((frontend, backend)));

        let cidr: Cidr = "10.244.1.7/16".parse().unwrap();
        let (network, mask) = cidr.ipv4_network_and_mask_be();
        assert_eq!(network.to_ne_bytes(), [10, 244, 0, 0]);
        assert_eq!(mask.to_ne_bytes(), [255, 255, 0, 0]);
        let everything = Cidr {
            prefix_len: 0,
            ..cidr
        };
        assert_eq!(everything.ipv4_network_and_mask_be(), (0, 0));
    }

    #[test]
    fn the_programs_errno_is_the_kernels() {
        assert_eq!(proxy_common::ECONNREFUSED, libc::ECONNREFUSED);
    }

    #[test]
    fn unknown_protocols_do_not_decode() {
        let mut key = ServiceKey::frontend(0, 0, 132);
        assert_eq!(L4Addr::from_service_key(&key), None);
        key.proto = PROTO_TCP;
        assert!(L4Addr::from_service_key(&key).is_some());
    }
}
