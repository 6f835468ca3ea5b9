//! The pinned maps. Names come from `proxy_common`, which the agent uses to
//! pin and open them; they carry a layout version.

use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, SkStorage, lpm_trie::Key},
    macros::btf_map,
};
use proxy_common::{
    AFFINITY_MAX_ENTRIES, Address, AffinityKey, AffinityValue, BACKENDS_MAX_ENTRIES, Backend,
    COUNTS_MAX_ENTRIES, EXT_BACKENDS_MAX_ENTRIES, EXT_SERVICES_MAX_ENTRIES, Event, FILTER_WORDS,
    FLOWS_MAX_ENTRIES, FlowKey, FlowNat, Ip4, Ip6, RevNatPair, SERVICES_MAX_ENTRIES,
    SOURCE_RANGES_MAX_ENTRIES, ServiceKey, ServiceValue, SockRevNat, SourceRange,
    UDP_CONNECTED_MAX_ENTRIES,
};

// The macro takes a literal; these keep it equal to the shared names.
const _: () = {
    assert!(eq(proxy_common::SERVICES_MAP, "lb4_svc_v2"));
    assert!(eq(proxy_common::BACKENDS_MAP, "lb4_be_v2"));
    assert!(eq(proxy_common::SOCK_REV_NAT_MAP, "lb4_sk_rnat_v2"));
    assert!(eq(proxy_common::EVENTS_MAP, "lb4_events_v8"));
    assert!(eq(proxy_common::EXT_SERVICES_MAP, "lb4_ext_svc_v1"));
    assert!(eq(proxy_common::EXT_BACKENDS_MAP, "lb4_ext_be_v1"));
    assert!(eq(proxy_common::FLOWS_MAP, "lb4_flows_v1"));
    assert!(eq(proxy_common::UDP_CONNECTED_MAP, "lb4_udp_conn_v2"));
    assert!(eq(proxy_common::AFFINITY_MAP, "lb4_affinity_v1"));
    assert!(eq(proxy_common::COUNTS_MAP, "lb4_counts_v1"));
    assert!(eq(proxy_common::SOURCE_RANGES_MAP, "lb4_src_range_v1"));
    assert!(eq(proxy_common::SERVICES6_MAP, "lb6_svc_v1"));
    assert!(eq(proxy_common::BACKENDS6_MAP, "lb6_be_v1"));
    assert!(eq(proxy_common::SOCK_REV_NAT6_MAP, "lb6_sk_rnat_v1"));
    assert!(eq(proxy_common::EXT_SERVICES6_MAP, "lb6_ext_svc_v1"));
    assert!(eq(proxy_common::EXT_BACKENDS6_MAP, "lb6_ext_be_v1"));
    assert!(eq(proxy_common::FLOWS6_MAP, "lb6_flows_v1"));
    assert!(eq(proxy_common::UDP_CONNECTED6_MAP, "lb6_udp_conn_v1"));
    assert!(eq(proxy_common::AFFINITY6_MAP, "lb6_affinity_v1"));
    assert!(eq(proxy_common::COUNTS6_MAP, "lb6_counts_v1"));
    assert!(eq(proxy_common::SOURCE_RANGES6_MAP, "lb6_src_range_v1"));
    assert!(eq(proxy_common::FRONTEND_FILTER_MAP, "lb_fe_filter_v1"));
    assert!(eq(proxy_common::BACKEND_FILTER_MAP, "lb_be_filter_v1"));
};

/// An address filter (see [`proxy_common::FRONTEND_FILTER_MAP`]).
pub type Filter = Array<u64, { FILTER_WORDS as usize }>;

/// The frontends a packet may be addressed to; the agent keeps it.
#[btf_map(name = "lb_fe_filter_v1")]
pub static FRONTEND_FILTER: Filter = Array::new();

/// The backends a reply may come from; the agent keeps it.
#[btf_map(name = "lb_be_filter_v1")]
pub static BACKEND_FILTER: Filter = Array::new();

/// Whether `filter` may hold (`addr`, `port_be`, `proto`): false only when
/// it certainly does not. An array lookup, which the verifier turns into a
/// bounds check and a load, and two multiplies.
#[expect(
    clippy::inline_always,
    reason = "every tc packet asks it first; a call would cost as much as the answer"
)]
#[inline(always)]
pub fn may_hold<A: Address>(filter: &Filter, addr: A, port_be: u16, proto: u8) -> bool {
    let bit = proxy_common::filter_bit(addr.fold(), port_be, proto);
    // A word the filter lacks (an agent that never wrote it) says "maybe".
    filter
        .get(bit >> 6)
        .is_none_or(|word| word & (1 << (bit & 63)) != 0)
}

/// A frontend map of either family: the socket programs' or the tc
/// programs'.
pub type ServicesMap<A> =
    HashMap<ServiceKey<A>, ServiceValue<A>, { SERVICES_MAX_ENTRIES as usize }>;
/// The tc programs' frontends of either family.
pub type ExtServicesMap<A> =
    HashMap<ServiceKey<A>, ServiceValue<A>, { EXT_SERVICES_MAX_ENTRIES as usize }>;

/// loadBalancerSourceRanges of either family.
pub type SourceRangesMap<A> = LpmTrie<SourceRange<A>, u8, { SOURCE_RANGES_MAX_ENTRIES as usize }>;

/// The maps one family's code reaches by type, so that one generic
/// implementation serves IPv4 and IPv6, each on its own maps.
pub trait FamilyMaps: Address {
    /// `==`, spelled out: on an IPv6 address `==` becomes a call to
    /// `bcmp`, a loop the verifier walks byte by byte.
    fn same(self, other: Self) -> bool;
    fn services() -> &'static ServicesMap<Self>;
    fn sock_rev_nat() -> &'static SkStorage<SockRevNat<Self>>;
    fn udp_connected()
    -> &'static HashMap<u64, RevNatPair<Self>, { UDP_CONNECTED_MAX_ENTRIES as usize }>;
    fn affinity() -> &'static LruHashMap<
        AffinityKey<Self>,
        AffinityValue<Self>,
        { AFFINITY_MAX_ENTRIES as usize },
    >;
    fn counts() -> &'static HashMap<ServiceKey<Self>, u64, { COUNTS_MAX_ENTRIES as usize }>;
    /// The socket programs' backends, which the tc programs ask whether a
    /// UDP flow to a ClusterIP from outside is still served.
    fn backends() -> &'static BackendsMap<Self, { BACKENDS_MAX_ENTRIES as usize }>;
    /// The tc programs' frontends.
    fn ext_services() -> &'static ExtServicesMap<Self>;
    /// The tc programs' backends.
    fn ext_backends() -> &'static BackendsMap<Self, { EXT_BACKENDS_MAX_ENTRIES as usize }>;
    /// The tc programs' flow table.
    fn flows() -> &'static FlowsMap<Self>;
    /// The load-balancer frontends' source ranges.
    fn source_ranges() -> &'static SourceRangesMap<Self>;

    /// Whether `source` is inside one of `frontend`'s loadBalancerSourceRanges.
    #[expect(
        clippy::inline_always,
        reason = "inlined into the ingress program's one frame per family"
    )]
    #[inline(always)]
    fn admitted_by_source_ranges(frontend: &ServiceKey<Self>, source: Self) -> bool {
        let key = Key::new(
            SourceRange::<Self>::full_prefix_len(),
            SourceRange {
                frontend_addr_be: frontend.addr_be,
                frontend_port_be: frontend.port_be,
                proto: frontend.proto,
                pad: 0,
                source_be: source,
            },
        );
        Self::source_ranges().get(&key).is_some()
    }
}

/// Backend id to address, for either backends map of either family.
pub type BackendsMap<A, const N: usize> = HashMap<u32, Backend<A>, N>;
/// The tc programs' flow table of either family.
pub type FlowsMap<A> = LruHashMap<FlowKey<A>, FlowNat<A>, { FLOWS_MAX_ENTRIES as usize }>;

impl FamilyMaps for Ip4 {
    #[expect(
        clippy::inline_always,
        reason = "every hook calls it on its hot path, where a BPF-to-BPF call costs"
    )]
    #[inline(always)]
    fn same(self, other: Self) -> bool {
        self == other
    }
    fn services() -> &'static ServicesMap<Self> {
        &SERVICES
    }
    fn sock_rev_nat() -> &'static SkStorage<SockRevNat<Self>> {
        &SOCK_REV_NAT
    }
    fn udp_connected()
    -> &'static HashMap<u64, RevNatPair<Self>, { UDP_CONNECTED_MAX_ENTRIES as usize }> {
        &UDP_CONNECTED
    }
    fn affinity() -> &'static LruHashMap<
        AffinityKey<Self>,
        AffinityValue<Self>,
        { AFFINITY_MAX_ENTRIES as usize },
    > {
        &AFFINITY
    }
    fn counts() -> &'static HashMap<ServiceKey<Self>, u64, { COUNTS_MAX_ENTRIES as usize }> {
        &COUNTS
    }
    fn backends() -> &'static BackendsMap<Self, { BACKENDS_MAX_ENTRIES as usize }> {
        &BACKENDS
    }
    fn ext_services() -> &'static ExtServicesMap<Self> {
        &EXT_SERVICES
    }
    fn ext_backends() -> &'static BackendsMap<Self, { EXT_BACKENDS_MAX_ENTRIES as usize }> {
        &EXT_BACKENDS
    }
    fn flows() -> &'static FlowsMap<Self> {
        &FLOWS
    }
    fn source_ranges() -> &'static SourceRangesMap<Self> {
        &SOURCE_RANGES
    }
}

impl FamilyMaps for Ip6 {
    #[expect(
        clippy::inline_always,
        reason = "every hook calls it on its hot path, where a BPF-to-BPF call costs"
    )]
    #[inline(always)]
    fn same(self, other: Self) -> bool {
        (self[0] ^ other[0]) | (self[1] ^ other[1]) | (self[2] ^ other[2]) | (self[3] ^ other[3])
            == 0
    }
    fn services() -> &'static ServicesMap<Self> {
        &SERVICES6
    }
    fn sock_rev_nat() -> &'static SkStorage<SockRevNat<Self>> {
        &SOCK_REV_NAT6
    }
    fn udp_connected()
    -> &'static HashMap<u64, RevNatPair<Self>, { UDP_CONNECTED_MAX_ENTRIES as usize }> {
        &UDP_CONNECTED6
    }
    fn affinity() -> &'static LruHashMap<
        AffinityKey<Self>,
        AffinityValue<Self>,
        { AFFINITY_MAX_ENTRIES as usize },
    > {
        &AFFINITY6
    }
    fn counts() -> &'static HashMap<ServiceKey<Self>, u64, { COUNTS_MAX_ENTRIES as usize }> {
        &COUNTS6
    }
    fn backends() -> &'static BackendsMap<Self, { BACKENDS_MAX_ENTRIES as usize }> {
        &BACKENDS6
    }
    fn ext_services() -> &'static ExtServicesMap<Self> {
        &EXT_SERVICES6
    }
    fn ext_backends() -> &'static BackendsMap<Self, { EXT_BACKENDS_MAX_ENTRIES as usize }> {
        &EXT_BACKENDS6
    }
    fn flows() -> &'static FlowsMap<Self> {
        &FLOWS6
    }
    fn source_ranges() -> &'static SourceRangesMap<Self> {
        &SOURCE_RANGES6
    }
}

/// `==` on strings, which is not yet `const`.
pub(crate) const fn eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// Frontend slots: slot 0 is the frontend, slots `1..=count` its backends.
/// Preallocated (the default for hash maps): an update at connect rate
/// never waits on the allocator, and the agent's writes cannot fail for
/// memory once the map exists.
#[btf_map(name = "lb4_svc_v2")]
pub static SERVICES: ServicesMap<Ip4> = HashMap::new();

/// Backend id to address. The programs do not read it (slots carry the
/// address); the agent shares ids through it and readers list it.
#[btf_map(name = "lb4_be_v2")]
pub static BACKENDS: HashMap<u32, Backend, { BACKENDS_MAX_ENTRIES as usize }> = HashMap::new();

/// Each translated socket's (backend, frontend) pairs, in the socket's own
/// storage: no size to outgrow, nothing evicted while the socket lives.
#[btf_map(name = "lb4_sk_rnat_v2")]
pub static SOCK_REV_NAT: SkStorage<SockRevNat> = SkStorage::new();

/// The tc programs' frontends: NodePorts on the node's addresses,
/// externalIPs and load-balancer IPs, with the backends their
/// externalTrafficPolicy allows.
#[btf_map(name = "lb4_ext_svc_v1")]
pub static EXT_SERVICES: ExtServicesMap<Ip4> = HashMap::new();

/// Backend id to address for [`EXT_SERVICES`]. The ingress program asks it
/// whether a UDP flow's backend is still serving.
#[btf_map(name = "lb4_ext_be_v1")]
pub static EXT_BACKENDS: HashMap<u32, Backend, { EXT_BACKENDS_MAX_ENTRIES as usize }> =
    HashMap::new();

/// Translated flows, both directions. An LRU, as conntrack is: a flow that
/// goes quiet for long enough under pressure is forgotten, never a map
/// that stops taking new ones.
#[btf_map(name = "lb4_flows_v1")]
pub static FLOWS: LruHashMap<FlowKey, FlowNat, { FLOWS_MAX_ENTRIES as usize }> = LruHashMap::new();

/// Connected UDP sockets `connect4` translated, by socket cookie, for the
/// agent to end those whose backend left (sock_diag shows socket storage
/// for TCP only). A plain hash, not an LRU: `sock_release` deletes each
/// entry with its socket, so the map holds the open sockets only, and a
/// burst of short-lived ones cannot push a long-lived one out. Full, it
/// refuses the newest, which is counted. Preallocated: the insert at
/// connect never waits on the allocator.
#[btf_map(name = "lb4_udp_conn_v2")]
pub static UDP_CONNECTED: HashMap<u64, RevNatPair, { UDP_CONNECTED_MAX_ENTRIES as usize }> =
    HashMap::new();

/// sessionAffinity ClientIP: each client's backend per frontend. An LRU,
/// so the map never refuses a new client; one pushed out chooses afresh.
#[btf_map(name = "lb4_affinity_v1")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue, { AFFINITY_MAX_ENTRIES as usize }> =
    LruHashMap::new();

/// Translations per backend slot, deleted by the agent with the slot.
/// Preallocated, so the first count of a slot costs no allocation (a
/// per-CPU map would, and a per-CPU allocation takes microseconds);
/// shared, counted with one atomic add, so its size does not grow with the
/// node's CPUs.
#[btf_map(name = "lb4_counts_v1")]
pub static COUNTS: HashMap<ServiceKey, u64, { COUNTS_MAX_ENTRIES as usize }> = HashMap::new();

/// loadBalancerSourceRanges: written by the agent, read by tc ingress for
/// the new flows of frontends with [`proxy_common::FRONTEND_SOURCE_RANGES`].
#[btf_map(name = "lb4_src_range_v1")]
pub static SOURCE_RANGES: SourceRangesMap<Ip4> = LpmTrie::new();

// The IPv6 twins of the maps above, documented there.

#[btf_map(name = "lb6_svc_v1")]
pub static SERVICES6: ServicesMap<Ip6> = HashMap::new();

#[btf_map(name = "lb6_be_v1")]
pub static BACKENDS6: HashMap<u32, Backend<Ip6>, { BACKENDS_MAX_ENTRIES as usize }> =
    HashMap::new();

#[btf_map(name = "lb6_sk_rnat_v1")]
pub static SOCK_REV_NAT6: SkStorage<SockRevNat<Ip6>> = SkStorage::new();

#[btf_map(name = "lb6_ext_svc_v1")]
pub static EXT_SERVICES6: ExtServicesMap<Ip6> = HashMap::new();

#[btf_map(name = "lb6_ext_be_v1")]
pub static EXT_BACKENDS6: HashMap<u32, Backend<Ip6>, { EXT_BACKENDS_MAX_ENTRIES as usize }> =
    HashMap::new();

#[btf_map(name = "lb6_flows_v1")]
pub static FLOWS6: LruHashMap<FlowKey<Ip6>, FlowNat<Ip6>, { FLOWS_MAX_ENTRIES as usize }> =
    LruHashMap::new();

#[btf_map(name = "lb6_udp_conn_v1")]
pub static UDP_CONNECTED6: HashMap<u64, RevNatPair<Ip6>, { UDP_CONNECTED_MAX_ENTRIES as usize }> =
    HashMap::new();

#[btf_map(name = "lb6_affinity_v1")]
pub static AFFINITY6: LruHashMap<
    AffinityKey<Ip6>,
    AffinityValue<Ip6>,
    { AFFINITY_MAX_ENTRIES as usize },
> = LruHashMap::new();

#[btf_map(name = "lb6_counts_v1")]
pub static COUNTS6: HashMap<ServiceKey<Ip6>, u64, { COUNTS_MAX_ENTRIES as usize }> = HashMap::new();

#[btf_map(name = "lb6_src_range_v1")]
pub static SOURCE_RANGES6: SourceRangesMap<Ip6> = LpmTrie::new();

/// Counts one translation to `slot`.
#[expect(
    clippy::inline_always,
    reason = "every hook calls it on its hot path, where a BPF-to-BPF call costs"
)]
#[inline(always)]
pub fn count<A: FamilyMaps>(slot: ServiceKey<A>) {
    let counts = A::counts();
    if let Some(counter) = counts.get_ptr_mut(slot) {
        // SAFETY: a map value, valid while the program runs; other CPUs
        // add to it too, atomically (BPF_ATOMIC | BPF_ADD: the bpf target
        // has no compare-and-swap, so core offers no `fetch_add`).
        #[cfg(target_arch = "bpf")]
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
                counter, 1,
            )
        };
        // The host check of the workspace (never run).
        #[cfg(not(target_arch = "bpf"))]
        // SAFETY: as above.
        unsafe { core::sync::atomic::AtomicU64::from_ptr(counter) }
            .fetch_add(1, core::sync::atomic::Ordering::Relaxed);
    } else {
        // The slot's first: a racing first on another CPU may win, and
        // this one is lost.
        let _ = counts.insert(slot, 1_u64, 0);
    }
}

/// Per-CPU counters, one per [`Event`]: no atomics, no contention.
#[btf_map(name = "lb4_events_v8")]
pub static EVENTS: PerCpuArray<u64, { Event::ALL.len() }> = PerCpuArray::new();

/// Counts one event on this CPU.
#[expect(
    clippy::inline_always,
    reason = "every hook calls it on its hot path, where a BPF-to-BPF call costs"
)]
#[inline(always)]
pub fn record(event: Event) {
    if let Some(counter) = EVENTS.get_ptr_mut(event as u32) {
        // SAFETY: a per-CPU slot, and programs do not migrate CPUs mid-run.
        unsafe { *counter += 1 };
    }
}
