//! Map keys and values shared by the eBPF programs and the agent, and the
//! names both sides use for maps, programs and events.
//!
//! Every type is `#[repr(C)]` with explicit padding and derives bytemuck's
//! `Pod`: the derive refuses to compile a type with implicit padding, so the
//! kernel and user side agree on every byte and BTF shows every field.
//! Addresses and ports stay in network byte order (the `_be` fields): the
//! programs compare them with socket addresses as they are, and the agent
//! converts at its edge.
//!
//! The layout follows Cilium's `lb4_*` maps: a Service frontend owns slots
//! `0..=count` in [`SERVICES_MAP`]; slot 0 holds the count, slots `1..=count`
//! a backend. Unlike Cilium, a slot carries the backend's address and port
//! as well as its id, so `connect()` picks a backend with one random number
//! and two lookups, not three; [`BACKENDS_MAP`] stays for the agent (ids are
//! shared by every slot naming the same endpoint) and for readers.
//!
//! Every type that holds an address is generic over it ([`Address`]): the
//! IPv4 maps (`lb4_*`) hold [`Ip4`], the IPv6 maps (`lb6_*`) [`Ip6`], in
//! the same layout, so one program and one writer serve both families.
//! The parameter defaults to IPv4.
#![no_std]
#![deny(unsafe_code)]

use core::{fmt::Debug, hash::Hash};

use bytemuck::{Pod, Zeroable};

/// An IPv4 address as the kernel hands it to the programs: the four octets
/// in network order, read as one `u32`.
pub type Ip4 = u32;
/// An IPv6 address as the kernel hands it to the programs (`user_ip6`, the
/// IPv6 header): the sixteen octets in network order, read as four `u32`s.
pub type Ip6 = [u32; 4];

/// The address of one family, as the maps hold it. Sealed: the layouts
/// below are `Pod` for any address because they are checked for these two,
/// and there can be no other.
pub trait Address: sealed::Sealed + Pod + Default + Eq + Ord + Hash + Debug {
    /// Padding that makes `u64 + address + 4 bytes` a multiple of 8 bytes
    /// (the affinity maps' entries) without implicit padding, which a hash
    /// key must not have: none for IPv4, four bytes for IPv6.
    type TailPad: Pod + Default + Eq + Ord + Hash + Debug;
    /// The names of this family's maps.
    const MAPS: FamilyMaps;
    /// The address in 32 bits, for [`filter_bit`]: IPv4's as it is, IPv6's
    /// four words XORed.
    fn fold(&self) -> u32;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::Ip4 {}
    impl Sealed for super::Ip6 {}
}

impl Address for Ip4 {
    type TailPad = [u8; 0];
    const MAPS: FamilyMaps = IPV4_MAPS;

    fn fold(&self) -> u32 {
        *self
    }
}

impl Address for Ip6 {
    type TailPad = [u8; 4];
    const MAPS: FamilyMaps = IPV6_MAPS;

    fn fold(&self) -> u32 {
        self[0] ^ self[1] ^ self[2] ^ self[3]
    }
}

/// `::ffff:a.b.c.d`: how an IPv6 socket names an IPv4 address.
#[must_use]
pub const fn ipv4_mapped(addr_be: Ip4) -> Ip6 {
    [0, 0, 0xffff_u32.to_be(), addr_be]
}

/// The IPv4 address an IPv4-mapped IPv6 address stands for.
#[must_use]
pub const fn mapped_ipv4(addr: Ip6) -> Option<Ip4> {
    if addr[0] == 0 && addr[1] == 0 && addr[2] == 0xffff_u32.to_be() {
        Some(addr[3])
    } else {
        None
    }
}

/// Map names carry a version. Bump it whenever a key or value layout changes,
/// so that a new agent never reads an old pinned map with the wrong layout.
pub const SERVICES_MAP: &str = "lb4_svc_v2";
/// See [`SERVICES_MAP`].
pub const BACKENDS_MAP: &str = "lb4_be_v2";
/// Socket-local storage: the reverse translations of one socket live and die
/// with it. See [`SERVICES_MAP`].
pub const SOCK_REV_NAT_MAP: &str = "lb4_sk_rnat_v2";
/// See [`SERVICES_MAP`]. v3: the tc programs' events joined the list; v4:
/// `icmp_translated`; v5: `udp_connected_full`; v6:
/// `ipv6_ext_header_passed`; v7: `ext_source_range_dropped`; v8:
/// `pod_forwarded`.
pub const EVENTS_MAP: &str = "lb4_events_v8";
/// The frontends the tc programs serve (NodePort, externalIP and
/// load-balancer IP), laid out as [`SERVICES_MAP`]: kept apart because
/// their backends follow externalTrafficPolicy, and slot 0 carries
/// [`FRONTEND_MASQUERADE`].
pub const EXT_SERVICES_MAP: &str = "lb4_ext_svc_v1";
/// The backends of [`EXT_SERVICES_MAP`], as [`BACKENDS_MAP`] is to
/// [`SERVICES_MAP`]; the ingress program checks that a UDP flow's backend
/// is still here.
pub const EXT_BACKENDS_MAP: &str = "lb4_ext_be_v1";
/// The tc programs' connection table (an LRU hash): each translated flow's
/// backend, and each reply direction's frontend.
pub const FLOWS_MAP: &str = "lb4_flows_v1";

/// Connected UDP sockets that `connect4` translated, by socket cookie
/// (a plain hash): the agent asks it which sockets to end when their
/// backend leaves the Service, since sock_diag reports socket-local
/// storage for TCP sockets only. An entry leaves with its socket
/// (`sock_release`), or when the socket connects to an address that is no
/// Service. v1 was an LRU hash, which kept the entries of closed sockets
/// until newer ones pushed them out, live sockets' among them.
pub const UDP_CONNECTED_MAP: &str = "lb4_udp_conn_v2";
/// sessionAffinity ClientIP (an LRU hash): each client's last backend per
/// frontend, and when it last chose it.
pub const AFFINITY_MAP: &str = "lb4_affinity_v1";
/// Counts of translations (new connections, UDP datagrams) per backend
/// slot, like `iptables -L -v`'s per rule: keyed by the slot's
/// [`ServiceKey`] with `scope` saying which programs counted
/// ([`COUNTED_BY_SOCKETS`], [`COUNTED_BY_TC`]).
pub const COUNTS_MAP: &str = "lb4_counts_v1";
/// loadBalancerSourceRanges (an LPM trie): the sources each load-balancer
/// frontend with [`FRONTEND_SOURCE_RANGES`] admits, one entry per range,
/// keyed by the frontend and the range's network ([`SourceRange`]). One
/// longest-prefix lookup of (frontend, client address) answers whether
/// the client is inside any of the frontend's ranges, however many
/// Services have ranges; Cilium keeps `lb4_source_range` alike.
pub const SOURCE_RANGES_MAP: &str = "lb4_src_range_v1";
/// See [`COUNTS_MAP`].
pub const COUNTED_BY_SOCKETS: u8 = 0;
/// See [`COUNTS_MAP`].
pub const COUNTED_BY_TC: u8 = 1;

/// The IPv6 twins of the maps above, in the same layouts over [`Ip6`].
/// Apart, as Cilium keeps `lb6_*`: an IPv4 lookup never hashes the wider
/// key, so the IPv4 path costs what it did.
pub const SERVICES6_MAP: &str = "lb6_svc_v1";
/// See [`SERVICES6_MAP`].
pub const BACKENDS6_MAP: &str = "lb6_be_v1";
/// See [`SERVICES6_MAP`]. IPv6 sockets' reverse translations, IPv4-mapped
/// addresses among them.
pub const SOCK_REV_NAT6_MAP: &str = "lb6_sk_rnat_v1";
/// See [`SERVICES6_MAP`].
pub const EXT_SERVICES6_MAP: &str = "lb6_ext_svc_v1";
/// See [`SERVICES6_MAP`].
pub const EXT_BACKENDS6_MAP: &str = "lb6_ext_be_v1";
/// See [`SERVICES6_MAP`].
pub const FLOWS6_MAP: &str = "lb6_flows_v1";
/// See [`SERVICES6_MAP`]. IPv6 sockets connected to IPv6 Services.
pub const UDP_CONNECTED6_MAP: &str = "lb6_udp_conn_v1";
/// See [`SERVICES6_MAP`].
pub const AFFINITY6_MAP: &str = "lb6_affinity_v1";
/// See [`SERVICES6_MAP`].
pub const COUNTS6_MAP: &str = "lb6_counts_v1";
/// See [`SERVICES6_MAP`].
pub const SOURCE_RANGES6_MAP: &str = "lb6_src_range_v1";

/// The names of one family's maps, for code generic over [`Address`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FamilyMaps {
    /// `"IPv4"` or `"IPv6"`, as Kubernetes spells the families.
    pub family: &'static str,
    pub services: &'static str,
    pub backends: &'static str,
    pub sock_rev_nat: &'static str,
    pub ext_services: &'static str,
    pub ext_backends: &'static str,
    pub flows: &'static str,
    pub udp_connected: &'static str,
    pub affinity: &'static str,
    pub counts: &'static str,
    pub source_ranges: &'static str,
}

/// See [`FamilyMaps`].
pub const IPV4_MAPS: FamilyMaps = FamilyMaps {
    family: "IPv4",
    services: SERVICES_MAP,
    backends: BACKENDS_MAP,
    sock_rev_nat: SOCK_REV_NAT_MAP,
    ext_services: EXT_SERVICES_MAP,
    ext_backends: EXT_BACKENDS_MAP,
    flows: FLOWS_MAP,
    udp_connected: UDP_CONNECTED_MAP,
    affinity: AFFINITY_MAP,
    counts: COUNTS_MAP,
    source_ranges: SOURCE_RANGES_MAP,
};

/// See [`FamilyMaps`].
pub const IPV6_MAPS: FamilyMaps = FamilyMaps {
    family: "IPv6",
    services: SERVICES6_MAP,
    backends: BACKENDS6_MAP,
    sock_rev_nat: SOCK_REV_NAT6_MAP,
    ext_services: EXT_SERVICES6_MAP,
    ext_backends: EXT_BACKENDS6_MAP,
    flows: FLOWS6_MAP,
    udp_connected: UDP_CONNECTED6_MAP,
    affinity: AFFINITY6_MAP,
    counts: COUNTS6_MAP,
    source_ranges: SOURCE_RANGES6_MAP,
};

/// The tc programs' address filters, one for both families: arrays of
/// [`FILTER_WORDS`] words, a bit per [`filter_bit`] of an (address, port,
/// protocol). [`FRONTEND_FILTER_MAP`] has the bit of every frontend a
/// packet may be addressed to (both frontend tables', and those of flows
/// still running), [`BACKEND_FILTER_MAP`] that of every backend a reply may
/// come from. A packet whose bit is clear leaves the programs before any
/// hash lookup, which is most of what such a packet cost; a set bit may be
/// another address's, and costs only the lookups it would have saved.
pub const FRONTEND_FILTER_MAP: &str = "lb_fe_filter_v1";
/// See [`FRONTEND_FILTER_MAP`].
pub const BACKEND_FILTER_MAP: &str = "lb_be_filter_v1";
/// Words of each filter: 2^20 bits, 128 KiB, so that 100,000 addresses
/// set fewer than one bit in ten.
pub const FILTER_WORDS: u32 = 1 << 14;

/// The filter bit of an address (see [`Address::fold`]), a port (network
/// byte order) and a protocol, below `64 * FILTER_WORDS`: two multiplies,
/// the same in the programs and the agent.
#[must_use]
pub const fn filter_bit(folded: u32, port_be: u16, proto: u8) -> u32 {
    let address = folded.wrapping_mul(0x9e37_79b1);
    let mixed = (address ^ ((port_be as u32) << 8 | proto as u32)).wrapping_mul(0x85eb_ca6b);
    mixed >> 12
}

/// Every map of the object; all are pinned.
pub const MAPS: [&str; 23] = [
    SERVICES_MAP,
    BACKENDS_MAP,
    SOCK_REV_NAT_MAP,
    EVENTS_MAP,
    EXT_SERVICES_MAP,
    EXT_BACKENDS_MAP,
    FLOWS_MAP,
    UDP_CONNECTED_MAP,
    AFFINITY_MAP,
    COUNTS_MAP,
    SOURCE_RANGES_MAP,
    SERVICES6_MAP,
    BACKENDS6_MAP,
    SOCK_REV_NAT6_MAP,
    EXT_SERVICES6_MAP,
    EXT_BACKENDS6_MAP,
    FLOWS6_MAP,
    UDP_CONNECTED6_MAP,
    AFFINITY6_MAP,
    COUNTS6_MAP,
    SOURCE_RANGES6_MAP,
    FRONTEND_FILTER_MAP,
    BACKEND_FILTER_MAP,
];

/// The cgroup programs, by the names of their functions: the
/// socket-address hooks, and `sock_release`, which takes a closing
/// socket's entry out of [`UDP_CONNECTED_MAP`]. `sock_release` comes first
/// so that it is attached before a new `connect4` writes any entry.
pub const PROGRAMS: [&str; 9] = [
    "sock_release",
    "connect4",
    "sendmsg4",
    "recvmsg4",
    "getpeername4",
    "connect6",
    "sendmsg6",
    "recvmsg6",
    "getpeername6",
];

/// Which of a device's tc hooks a program goes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcHook {
    Ingress,
    Egress,
}

/// What a device carries, which decides the tc programs it gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum DeviceRole {
    /// NodePort and external traffic arrives on it (`--devices`).
    Node,
    /// A pod's interface, on the host's side: its packets to Services are
    /// translated there when pods' sockets are not balanced at `connect()`
    /// (`--socket-lb-scope=host`).
    Pod,
}

/// A tc program, by the name of its function, its hook, and the devices it
/// goes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcProgram {
    pub name: &'static str,
    pub hook: TcHook,
    pub on_node_devices: bool,
    pub on_pod_devices: bool,
}

impl TcProgram {
    /// Whether the program goes on a device of `role`.
    #[must_use]
    pub const fn goes_on(self, role: DeviceRole) -> bool {
        match role {
            DeviceRole::Node => self.on_node_devices,
            DeviceRole::Pod => self.on_pod_devices,
        }
    }
}

/// The tc programs; their links are pinned as `<program>@<device>`. The
/// reverse translation is one program for both kinds of device: a reply
/// leaves through the client's device, whichever it is.
pub const TC_PROGRAMS: [TcProgram; 3] = [
    TcProgram {
        name: "tc_ingress",
        hook: TcHook::Ingress,
        on_node_devices: true,
        on_pod_devices: false,
    },
    TcProgram {
        name: "tc_pod_ingress",
        hook: TcHook::Ingress,
        on_node_devices: false,
        on_pod_devices: true,
    },
    TcProgram {
        name: "tc_egress",
        hook: TcHook::Egress,
        on_node_devices: true,
        on_pod_devices: true,
    },
];

/// The tc ingress program's globals, by the names of its statics: the agent
/// sets them when it loads the programs, from its flags. See
/// `MASQUERADE_MARK` and the others in proxy-ebpf's `tc_ingress.rs`.
pub const MASQUERADE_MARK_GLOBAL: &str = "MASQUERADE_MARK";
/// See [`MASQUERADE_MARK_GLOBAL`].
pub const CLUSTER_CIDR_ADDR_GLOBAL: &str = "CLUSTER_CIDR_ADDR";
/// See [`MASQUERADE_MARK_GLOBAL`].
pub const CLUSTER_CIDR_MASK_GLOBAL: &str = "CLUSTER_CIDR_MASK";
/// See [`MASQUERADE_MARK_GLOBAL`].
pub const MASQUERADE_ALL_GLOBAL: &str = "MASQUERADE_ALL";
/// The socket programs' one global: the network namespace cookie of the
/// host, whose sockets alone are balanced at `connect()` with
/// `--socket-lb-scope=host` (a `u64`; 0 balances every socket). See
/// `HOST_NETNS_COOKIE` in proxy-ebpf's `lb.rs`.
pub const HOST_NETNS_COOKIE_GLOBAL: &str = "HOST_NETNS_COOKIE";
/// The IPv6 cluster CIDR's network, an [`Ip6`] (network byte order); see
/// [`MASQUERADE_MARK_GLOBAL`].
pub const CLUSTER_CIDR6_ADDR_GLOBAL: &str = "CLUSTER_CIDR6_ADDR";
/// The IPv6 cluster CIDR's netmask, an [`Ip6`]; all zero for none. See
/// [`MASQUERADE_MARK_GLOBAL`].
pub const CLUSTER_CIDR6_MASK_GLOBAL: &str = "CLUSTER_CIDR6_MASK";

/// Default sizes of the tc programs' maps: room for 16k outside frontends
/// of 4 endpoints, and 256k flows in both directions.
pub const EXT_SERVICES_MAX_ENTRIES: u32 = 65_536;
/// See [`EXT_SERVICES_MAX_ENTRIES`].
pub const EXT_BACKENDS_MAX_ENTRIES: u32 = 65_536;
/// See [`EXT_SERVICES_MAX_ENTRIES`].
pub const FLOWS_MAX_ENTRIES: u32 = 262_144;
/// Size of [`UDP_CONNECTED_MAP`]: connected UDP sockets that talk to a
/// Service and are open at once. Past it, a new socket is counted as
/// [`Event::UdpConnectedFull`] and left out of the ending of stale sockets;
/// no entry is ever pushed out.
pub const UDP_CONNECTED_MAX_ENTRIES: u32 = 65_536;
/// Size of [`AFFINITY_MAP`]: (client, frontend) pairs of Services with
/// session affinity; the least recently used is forgotten first.
pub const AFFINITY_MAX_ENTRIES: u32 = 65_536;
/// Size of [`SOURCE_RANGES_MAP`]: (load-balancer frontend, range) pairs.
pub const SOURCE_RANGES_MAX_ENTRIES: u32 = 65_536;
/// Size of [`COUNTS_MAP`]: a slot of either frontend map (allocated as
/// slots are used).
pub const COUNTS_MAX_ENTRIES: u32 = SERVICES_MAX_ENTRIES + EXT_SERVICES_MAX_ENTRIES;

/// Slot 0 flag of an outside frontend: packets it translates are marked for
/// the masquerade fallback (externalTrafficPolicy Cluster), so replies come
/// back through this node.
pub const FRONTEND_MASQUERADE: u16 = 1;
/// Slot 0 flag of a load-balancer frontend with loadBalancerSourceRanges:
/// a new flow from a client outside them is dropped (tc ingress, before a
/// backend is chosen), as kube-proxy's KUBE-FW chain and
/// KUBE-PROXY-FIREWALL do. The ranges are in [`SOURCE_RANGES_MAP`]; a
/// frontend with the flag and no ranges there admits no one.
pub const FRONTEND_SOURCE_RANGES: u16 = 0x0400;
/// Slot 0 bits of an outside frontend that say how it is reached, for
/// readers (the programs do not look): one of [`FRONTEND_NODE_PORT`],
/// [`FRONTEND_EXTERNAL_IP`], [`FRONTEND_LOAD_BALANCER`].
pub const FRONTEND_KIND: u16 = 0x0300;
/// See [`FRONTEND_KIND`].
pub const FRONTEND_NODE_PORT: u16 = 0x0100;
/// See [`FRONTEND_KIND`].
pub const FRONTEND_EXTERNAL_IP: u16 = 0x0200;
/// See [`FRONTEND_KIND`].
pub const FRONTEND_LOAD_BALANCER: u16 = 0x0300;

/// Default capacities: room for 30k Services with 4 endpoints each, and
/// headroom for churn.
pub const SERVICES_MAX_ENTRIES: u32 = 262_144;
/// See [`SERVICES_MAX_ENTRIES`].
pub const BACKENDS_MAX_ENTRIES: u32 = 131_072;

/// `ECONNREFUSED`, which the programs cannot take from libc (no_std, no OS):
/// the agent's tests check it against `libc::ECONNREFUSED`.
pub const ECONNREFUSED: i32 = 111;

/// Declares [`Event`] together with [`Event::ALL`] and [`Event::name`], so a
/// new event cannot be left out of the list the agent reads and prints.
macro_rules! events {
    ($($(#[$doc:meta])* $variant:ident = $index:literal => $name:literal,)*) => {
        /// What the socket hooks count, per CPU, in [`EVENTS_MAP`]: the
        /// variant is the array index. One list for every hook, as Cilium
        /// keeps its drop reasons, so a new outcome is counted everywhere or
        /// nowhere.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Event {
            $($(#[$doc])* $variant = $index,)*
        }

        impl Event {
            /// Every event, in index order.
            pub const ALL: [Self; [$($index),*].len()] = [$(Self::$variant),*];

            /// The name the agent prints.
            #[must_use]
            pub const fn name(self) -> &'static str {
                match self {
                    $(Self::$variant => $name,)*
                }
            }
        }
    };
}

events! {
    /// A Service address was rewritten to a backend (connect, sendmsg).
    Forwarded = 0 => "forwarded",
    /// A Service without endpoints refused a connect or sendmsg.
    Refused = 1 => "refused",
    /// The chosen slot was missing: the agent shrank the Service between
    /// the two lookups. The socket was left alone.
    NoBackendSlot = 2 => "no_backend_slot",
    /// The chosen slot named no backend address. The socket was left alone.
    NoBackend = 3 => "no_backend",
    /// A backend address was shown as its Service (recvmsg, getpeername).
    Reversed = 4 => "reversed",
    /// The socket's storage for reverse translations could not be made (no
    /// memory); or, in tc ingress, a flow could not be stored in the flow
    /// table, and the packet passed untranslated. A UDP datagram is then sent to the Service address untouched,
    /// since its reply could not be shown as the Service's; a TCP connection
    /// goes on, showing the backend as its peer.
    RevNatNotStored = 5 => "rev_nat_not_stored",
    /// An unconnected UDP socket talked to more backends than its storage
    /// holds ([`SOCK_REV_NAT_SLOTS`]); the oldest translation was replaced,
    /// and a late reply from that backend shows the backend's address.
    RevNatEvicted = 6 => "rev_nat_evicted",
    /// A packet to a NodePort, externalIP or load-balancer IP was sent to a
    /// backend (tc ingress).
    ExtForwarded = 7 => "ext_forwarded",
    /// A packet to an outside frontend without backends was dropped
    /// (externalTrafficPolicy Local on a node without local endpoints, or
    /// no ready endpoint at all); with `--socket-lb-scope=host`, a pod's
    /// packet to a Service without endpoints too.
    ExtDropped = 8 => "ext_dropped",
    /// A reply of a translated flow was given its frontend's address back
    /// (tc egress).
    ExtReversed = 9 => "ext_reversed",
    /// An ICMP error about a translated flow (fragmentation needed, port
    /// unreachable, time exceeded) was translated as the flow's packets
    /// are, so that path MTU discovery and refusals reach the socket that
    /// sent the packet (tc ingress and egress).
    IcmpTranslated = 10 => "icmp_translated",
    /// A connected UDP socket was translated, but [`UDP_CONNECTED_MAP`]
    /// was full ([`UDP_CONNECTED_MAX_ENTRIES`] sockets open at once): it
    /// works, but is not ended when its backend leaves the Service.
    UdpConnectedFull = 11 => "udp_connected_full",
    /// An IPv6 packet whose TCP, UDP or ICMPv6 header does not follow the
    /// fixed header (hop-by-hop options, routing, fragment, destination
    /// options, AH, ESP) passed the tc programs untouched: a NodePort flow
    /// carried that way is not translated. MLD reports, which carry a
    /// hop-by-hop router alert, count here too, on every node.
    Ipv6ExtHeaderPassed = 12 => "ipv6_ext_header_passed",
    /// A new flow to a load-balancer IP from a client outside the
    /// Service's loadBalancerSourceRanges was dropped (tc ingress).
    ExtSourceRangeDropped = 13 => "ext_source_range_dropped",
    /// A pod's packet to a Service address was sent to a backend by tc on
    /// the pod's interface (`--socket-lb-scope=host`, where pods' sockets
    /// are not balanced at `connect()`).
    PodForwarded = 14 => "pod_forwarded",
}

// The events map is indexed by the variant: the list must be dense and in
// order, or a counter would land in another event's slot.
const _: () = {
    let mut i = 0;
    while i < Event::ALL.len() {
        assert!(Event::ALL[i] as usize == i);
        i += 1;
    }
};

/// IANA protocol numbers, as the socket hooks see them in `protocol`.
pub const PROTO_TCP: u8 = 6;
/// See [`PROTO_TCP`].
pub const PROTO_UDP: u8 = 17;
/// See [`PROTO_TCP`]. The tc programs translate ICMP errors about the
/// flows they translated.
pub const PROTO_ICMP: u8 = 1;
/// See [`PROTO_ICMP`]: ICMPv6, for the IPv6 flows.
pub const PROTO_ICMPV6: u8 = 58;

/// One slot of a Service frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Zeroable)]
pub struct ServiceKey<A = Ip4>
where
    A: Address,
{
    /// The frontend address (ClusterIP), network byte order.
    pub addr_be: A,
    /// The frontend port, network byte order.
    pub port_be: u16,
    /// 0 for the frontend entry, `1..=count` for the backend slots.
    pub backend_slot: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// 0 in the frontend maps; in [`COUNTS_MAP`], which programs counted.
    pub scope: u8,
    /// Explicit padding, always zero: hash keys compare every byte.
    pub pad: [u8; 2],
}

impl<A: Address> ServiceKey<A> {
    /// The slot-0 key of a frontend.
    #[must_use]
    pub const fn frontend(addr_be: A, port_be: u16, proto: u8) -> Self {
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
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Zeroable)]
pub struct ServiceValue<A = Ip4>
where
    A: Address,
{
    /// Slots `1..=count`: the backend id in [`BACKENDS_MAP`]. Slot 0: the
    /// sessionAffinity ClientIP timeout in seconds; 0 for none.
    pub backend_id: u32,
    /// Slots `1..=count`: the backend's address, network byte order, copied
    /// from [`BACKENDS_MAP`] so the programs need not look it up. Slot 0: 0.
    pub addr_be: A,
    /// Slots `1..=count`: the backend's port, network byte order. Slot 0: 0.
    pub port_be: u16,
    /// Slot 0: how many backend slots follow. 0 means the Service has no
    /// ready endpoints, and connections are refused.
    pub count: u16,
    /// Slot 0: per-frontend flags ([`FRONTEND_MASQUERADE`]). Slots: 0.
    pub flags: u16,
    /// Explicit padding, always zero.
    pub pad: u16,
}

impl<A: Address> ServiceValue<A> {
    /// The slot-0 value; `affinity` is the sessionAffinity timeout in
    /// seconds (0: none).
    #[must_use]
    pub fn frontend(count: u16, flags: u16, affinity: u32) -> Self {
        Self {
            backend_id: affinity,
            addr_be: A::default(),
            port_be: 0,
            count,
            flags,
            pad: 0,
        }
    }

    /// A backend slot's value.
    #[must_use]
    pub const fn backend(backend_id: u32, backend: &Backend<A>) -> Self {
        Self {
            backend_id,
            addr_be: backend.addr_be,
            port_be: backend.port_be,
            count: 0,
            flags: 0,
            pad: 0,
        }
    }
}

/// Where a backend listens. Keyed by a `u32` backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Zeroable)]
pub struct Backend<A = Ip4>
where
    A: Address,
{
    /// The endpoint address, network byte order.
    pub addr_be: A,
    /// The endpoint port, network byte order.
    pub port_be: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// Reserved for endpoint flags (terminating, node-local); 0 for now.
    pub flags: u8,
}

/// How many (backend, frontend) pairs one socket remembers. A connected
/// socket needs one; an unconnected UDP socket needs one per backend it is
/// talking to at once (a resolver asking a few nameservers).
pub const SOCK_REV_NAT_SLOTS: usize = 4;

/// One reverse translation: replies from `backend` show as `frontend`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Zeroable)]
pub struct RevNatPair<A = Ip4>
where
    A: Address,
{
    /// The backend address, network byte order; 0 marks a free pair.
    pub backend_addr_be: A,
    /// The frontend address, network byte order.
    pub frontend_addr_be: A,
    /// The backend port, network byte order.
    pub backend_port_be: u16,
    /// The frontend port, network byte order.
    pub frontend_port_be: u16,
}

/// A socket's reverse translations, in its socket-local storage
/// ([`SOCK_REV_NAT_MAP`]): made on the first translated `connect` or
/// `sendmsg`, freed by the kernel with the socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Zeroable)]
pub struct SockRevNat<A = Ip4>
where
    A: Address,
{
    /// Pairs in no particular order; free ones have a zero backend address.
    pub pairs: [RevNatPair<A>; SOCK_REV_NAT_SLOTS],
    /// The pair to replace when all are taken (round robin).
    pub next: u32,
}

/// Which way a [`FlowKey`] looks at a flow.
pub const FLOW_FORWARD: u8 = 0;
/// See [`FLOW_FORWARD`].
pub const FLOW_REPLY: u8 = 1;

/// One direction of a flow the tc programs translated, as its packets carry
/// it: forward (client to frontend, as it arrives) or reply (backend to
/// client, as it leaves).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Zeroable)]
pub struct FlowKey<A = Ip4>
where
    A: Address,
{
    pub saddr_be: A,
    pub daddr_be: A,
    pub sport_be: u16,
    pub dport_be: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// [`FLOW_FORWARD`] or [`FLOW_REPLY`].
    pub direction: u8,
    /// Explicit padding, always zero.
    pub pad: [u8; 2],
}

/// What a [`FlowKey`] is translated to: the backend (forward) or the
/// frontend (reply).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Zeroable)]
pub struct FlowNat<A = Ip4>
where
    A: Address,
{
    pub addr_be: A,
    pub port_be: u16,
    /// Forward: the frontend's flags when the flow began
    /// ([`FRONTEND_MASQUERADE`], [`FLOW_CLUSTER_IP`]). Reply: 0.
    pub flags: u16,
    /// Forward: the backend's id in [`EXT_BACKENDS_MAP`], or in
    /// [`BACKENDS_MAP`] for a [`FLOW_CLUSTER_IP`] flow. Reply: 0.
    pub backend_id: u32,
}

/// A client of a frontend with session affinity: a socket's network
/// namespace (by cookie) for the socket programs, which choose before the
/// source address is known (every pod has its own, as it has its own IP),
/// or the source address with [`AFFINITY_CLIENT_IP`] set for tc.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Zeroable)]
pub struct AffinityKey<A = Ip4>
where
    A: Address,
{
    pub client: u64,
    pub frontend_addr_be: A,
    pub frontend_port_be: u16,
    pub proto: u8,
    /// Explicit padding, always zero.
    pub pad: u8,
    /// See [`Address::TailPad`]; always zero.
    pub pad_tail: A::TailPad,
}

/// See [`AffinityKey::client`].
pub const AFFINITY_CLIENT_IP: u64 = 1 << 63;

/// A client's backend: the slot it was in and its address, so that a
/// backend gone from the slot (the Service changed) is not followed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Zeroable)]
pub struct AffinityValue<A = Ip4>
where
    A: Address,
{
    /// `bpf_ktime_get_ns` of the client's last choice.
    pub chosen_ns: u64,
    pub addr_be: A,
    pub port_be: u16,
    pub slot: u16,
    /// See [`Address::TailPad`]; always zero.
    pub pad_tail: A::TailPad,
}

/// [`FlowNat`] flag of a flow to a ClusterIP that arrived from outside the
/// node (a router sending the Service CIDR to nodes): its frontend came
/// from [`SERVICES_MAP`], so its backend id is one of [`BACKENDS_MAP`]'s.
pub const FLOW_CLUSTER_IP: u16 = 0x8000;
/// [`FlowNat`] flag of a flow that `tc_pod_ingress` translated, from a
/// pod: when its translated packets come into the node again (through a
/// bridge that is a NodePort device), `tc_ingress` keeps its reply entry.
pub const FLOW_FROM_POD: u16 = 0x4000;

/// The data of a [`SOURCE_RANGES_MAP`] key, after the LPM trie's prefix
/// length: the frontend, matched whole, then the client's address, matched
/// to the range's prefix. Addresses and port in network byte order, so
/// that the trie's bitwise prefix is the range's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Zeroable)]
pub struct SourceRange<A = Ip4>
where
    A: Address,
{
    pub frontend_addr_be: A,
    pub frontend_port_be: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// Explicit padding, always zero: the trie compares every bit.
    pub pad: u8,
    /// The range's network (an entry) or the client's address (a lookup).
    pub source_be: A,
}

impl<A: Address> SourceRange<A> {
    /// The LPM prefix length of an entry whose range has `source_prefix`
    /// bits: the frontend's bits, every one, then the range's.
    #[must_use]
    #[expect(
        clippy::cast_possible_truncation,
        reason = "at most 8 * (16 + 4) = 160 bits"
    )]
    pub const fn prefix_len(source_prefix: u8) -> u32 {
        (8 * (size_of::<A>() + 4)) as u32 + source_prefix as u32
    }

    /// The prefix length of a lookup: every bit of the frontend and the
    /// client's address.
    #[must_use]
    #[expect(
        clippy::cast_possible_truncation,
        reason = "an address is at most 16 bytes"
    )]
    pub const fn full_prefix_len() -> u32 {
        Self::prefix_len((8 * size_of::<A>()) as u8)
    }
}

/// Declares each layout `Pod` for every address, checking that its size
/// is the sum of its fields' sizes for both (the only two, [`Address`] is
/// sealed): no padding, so every byte is a field. The kernel sees these
/// sizes; a change is a layout change (see [`SERVICES_MAP`]) and must fail
/// the build until the map names are bumped. bytemuck's derive refuses
/// generic types; this is its check, spelled out per family.
macro_rules! layouts {
    ($($ty:ident { $ip4:expr, $ip6:expr })*) => {$(
        const _: () = assert!(size_of::<$ty<Ip4>>() == $ip4);
        const _: () = assert!(size_of::<$ty<Ip6>>() == $ip6);
        // SAFETY: `#[repr(C)]`, every field `Pod`, and (checked above, for
        // each of the two addresses there are) no padding: any bit pattern
        // is a valid value.
        #[expect(unsafe_code, reason = "bytemuck cannot derive Pod for generic types")]
        unsafe impl<A: Address> Pod for $ty<A> {}
        #[cfg(feature = "user")]
        // SAFETY: aya::Pod asks what bytemuck::Pod guarantees.
        #[expect(unsafe_code, reason = "aya::Pod is an unsafe marker trait")]
        unsafe impl<A: Address> aya::Pod for $ty<A> {}
    )*};
}

// Sizes as sums of the fields, IPv4 then IPv6.
layouts! {
    ServiceKey { 4 + 2 + 2 + 1 + 1 + 2, 16 + 2 + 2 + 1 + 1 + 2 }
    ServiceValue { 4 + 4 + 2 + 2 + 2 + 2, 4 + 16 + 2 + 2 + 2 + 2 }
    Backend { 4 + 2 + 1 + 1, 16 + 2 + 1 + 1 }
    RevNatPair { 4 + 4 + 2 + 2, 16 + 16 + 2 + 2 }
    SockRevNat { 4 * 12 + 4, 4 * 36 + 4 }
    FlowKey { 4 + 4 + 2 + 2 + 1 + 1 + 2, 16 + 16 + 2 + 2 + 1 + 1 + 2 }
    FlowNat { 4 + 2 + 2 + 4, 16 + 2 + 2 + 4 }
    AffinityKey { 8 + 4 + 2 + 1 + 1, 8 + 16 + 2 + 1 + 1 + 4 }
    AffinityValue { 8 + 4 + 2 + 2, 8 + 16 + 2 + 2 + 4 }
    SourceRange { 4 + 2 + 1 + 1 + 4, 16 + 2 + 1 + 1 + 16 }
}
