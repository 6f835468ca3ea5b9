//! Map keys and values shared by the eBPF programs and the agent.
//!
//! Every type is `#[repr(C)]` with explicit padding, so the kernel and user
//! side agree on the bytes and BTF shows every field. Addresses and ports stay
//! in network byte order (the `_be` fields): the programs compare them with
//! socket addresses as they are, and the agent converts at its edge.
//!
//! The layout follows Cilium's `lb4_*` maps: a Service frontend owns slots
//! `0..=count` in [`SERVICES_MAP`]; slot 0 holds the count, slots `1..=count`
//! hold backend ids, and backends live once in [`BACKENDS_MAP`], shared by id.
//! A backend is then picked with one random number and two lookups.
#![no_std]

/// Map names carry a version. Bump it whenever a key or value layout changes,
/// so that a new agent never reads an old pinned map with the wrong layout.
pub const SERVICES_MAP: &str = "lb4_svc_v1";
/// See [`SERVICES_MAP`].
pub const BACKENDS_MAP: &str = "lb4_be_v1";
/// See [`SERVICES_MAP`].
pub const SOCK_REV_NAT_MAP: &str = "lb4_sk_rnat_v1";

/// See [`SERVICES_MAP`].
pub const EVENTS_MAP: &str = "lb4_events_v1";

/// Default capacities: room for 30k Services with 4 endpoints each, and
/// headroom for churn.
pub const SERVICES_MAX_ENTRIES: u32 = 262_144;
/// See [`SERVICES_MAX_ENTRIES`].
pub const BACKENDS_MAX_ENTRIES: u32 = 131_072;
/// Reverse translations live as long as their socket; the LRU map forgets
/// the sockets that are long gone.
pub const SOCK_REV_NAT_MAX_ENTRIES: u32 = 262_144;

/// What the socket hooks count, per CPU, in [`EVENTS_MAP`]: the variant is
/// the array index. One list for every hook, as Cilium keeps its drop
/// reasons, so a new outcome is counted everywhere or nowhere.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A Service address was rewritten to a backend (connect, sendmsg).
    Forwarded = 0,
    /// A Service without endpoints refused a connect or sendmsg.
    Refused = 1,
    /// A slot or backend vanished between two lookups while the agent shrank
    /// a Service; the socket was left alone.
    LostRace = 2,
    /// A backend address was shown as its Service (recvmsg, getpeername).
    Reversed = 3,
}

impl Event {
    /// Every event, in index order.
    pub const ALL: [Self; 4] = [
        Self::Forwarded,
        Self::Refused,
        Self::LostRace,
        Self::Reversed,
    ];

    /// The name the agent prints.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Forwarded => "forwarded",
            Self::Refused => "refused",
            Self::LostRace => "lost_race",
            Self::Reversed => "reversed",
        }
    }
}

/// IANA protocol numbers, as the socket hooks see them in `protocol`.
pub const PROTO_TCP: u8 = 6;
/// See [`PROTO_TCP`].
pub const PROTO_UDP: u8 = 17;

/// One slot of a Service frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// The frontend address (ClusterIP), network byte order.
    pub addr_be: u32,
    /// The frontend port, network byte order.
    pub port_be: u16,
    /// 0 for the frontend entry, `1..=count` for the backend slots.
    pub backend_slot: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// Reserved for traffic-policy scopes; always 0 for now.
    pub scope: u8,
    /// Explicit padding, always zero: hash keys compare every byte.
    pub pad: [u8; 2],
}

impl ServiceKey {
    /// The slot-0 key of a frontend.
    #[must_use]
    pub const fn frontend(addr_be: u32, port_be: u16, proto: u8) -> Self {
        Self {
            addr_be,
            port_be,
            backend_slot: 0,
            proto,
            scope: 0,
            pad: [0; 2],
        }
    }

    /// The key of one backend slot of the same frontend.
    #[must_use]
    pub const fn slot(self, backend_slot: u16) -> Self {
        Self {
            backend_slot,
            ..self
        }
    }
}

/// The value of a [`ServiceKey`]. Which fields mean something depends on the
/// slot, as in Cilium's `lb4_service`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceValue {
    /// Slots `1..=count`: the backend id in [`BACKENDS_MAP`]. Slot 0: 0.
    pub backend_id: u32,
    /// Slot 0: how many backend slots follow. 0 means the Service has no
    /// ready endpoints, and connections are refused.
    pub count: u16,
    /// Reserved for per-Service flags (session affinity, ...); 0 for now.
    pub flags: u16,
}

impl ServiceValue {
    /// The slot-0 value.
    #[must_use]
    pub const fn frontend(count: u16) -> Self {
        Self {
            backend_id: 0,
            count,
            flags: 0,
        }
    }

    /// A backend slot's value.
    #[must_use]
    pub const fn backend(backend_id: u32) -> Self {
        Self {
            backend_id,
            count: 0,
            flags: 0,
        }
    }
}

/// Where a backend listens. Keyed by a `u32` backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    /// The endpoint address, network byte order.
    pub addr_be: u32,
    /// The endpoint port, network byte order.
    pub port_be: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// Reserved for endpoint flags (terminating, node-local); 0 for now.
    pub flags: u8,
}

/// A socket that was sent to a backend, keyed by the socket cookie and that
/// backend. The backend is part of the key because an unconnected UDP socket
/// can talk to several Services (or several backends) at once.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevNatKey {
    /// `bpf_get_socket_cookie()`: unique for the life of the host.
    pub cookie: u64,
    /// The backend address, network byte order.
    pub addr_be: u32,
    /// The backend port, network byte order.
    pub port_be: u16,
    /// Explicit padding, always zero.
    pub pad: u16,
}

/// The frontend a socket asked for, restored on `recvmsg` and `getpeername`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevNatValue {
    /// The frontend address, network byte order.
    pub addr_be: u32,
    /// The frontend port, network byte order.
    pub port_be: u16,
    /// Explicit padding, always zero.
    pub pad: u16,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all of these are `#[repr(C)]`, `Copy`, made only of integers,
    // and have no implicit padding (checked by the size assertions below).
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceValue {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::SockRevNatKey {}
    unsafe impl aya::Pod for super::SockRevNatValue {}
}

// The kernel sees these sizes; a change here is a layout change (see
// SERVICES_MAP) and must fail the build until the map names are bumped.
const _: () = {
    assert!(size_of::<ServiceKey>() == 12);
    assert!(size_of::<ServiceValue>() == 8);
    assert!(size_of::<Backend>() == 8);
    assert!(size_of::<SockRevNatKey>() == 16);
    assert!(size_of::<SockRevNatValue>() == 8);
};
