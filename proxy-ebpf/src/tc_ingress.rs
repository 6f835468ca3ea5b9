//! Packets arriving on the node's devices: a NodePort, externalIP or
//! load-balancer IP is translated to a backend, as kube-proxy's
//! KUBE-NODEPORTS and KUBE-EXT-* DNAT rules do, before netfilter sees the
//! packet; so is a ClusterIP, for routers that send the Service CIDR to
//! nodes (kube-proxy's KUBE-SERVICES in PREROUTING). The flow table keeps
//! every later packet of the flow on the backend its first packet chose,
//! whatever happens to the Service, and an ICMP error about a reply (a
//! router's "fragmentation needed") goes on to the backend that sent it.
//!
//! Flows of externalTrafficPolicy Cluster (and hairpin flows, a pod
//! reaching itself; and ClusterIP flows from outside `--cluster-cidr`, or
//! all of them with `--masquerade-all`) are marked for the masquerade
//! fallback, so the backend answers through this node. Anything that is
//! not a frontend passes untouched.
//!
//! IPv4 and IPv6 alike, each on its own maps, through one generic
//! implementation (see `packet` for what differs). `tc_pod_ingress` runs
//! the same code on pods' interfaces, over the frontends pods reach.

use aya_ebpf::{macros::classifier, programs::TcContext};
use aya_log_ebpf::info;
use proxy_common::{
    AFFINITY_CLIENT_IP, COUNTED_BY_TC, Event, FLOW_CLUSTER_IP, FLOW_FORWARD, FLOW_FROM_POD,
    FLOW_REPLY, FRONTEND_KIND, FRONTEND_MASQUERADE, FRONTEND_SOURCE_RANGES, FlowKey, FlowNat, Ip4,
    Ip6, PROTO_UDP, ServiceKey, ServiceValue,
};

use crate::{
    lb::{Pick, frontend_of, pick, pick_in},
    maps::{BACKEND_FILTER, FRONTEND_FILTER, eq, may_hold, record},
    packet::{self, DROP, ETH_P_IP_BE, ETH_P_IPV6_BE, Family, PASS, Packet, Parsed, Side, parse},
};

// `no_mangle` takes the static's own name; these keep the names equal to
// the shared ones the agent sets them by.
const _: () = {
    assert!(eq(proxy_common::MASQUERADE_MARK_GLOBAL, "MASQUERADE_MARK"));
    assert!(eq(
        proxy_common::CLUSTER_CIDR_ADDR_GLOBAL,
        "CLUSTER_CIDR_ADDR"
    ));
    assert!(eq(
        proxy_common::CLUSTER_CIDR_MASK_GLOBAL,
        "CLUSTER_CIDR_MASK"
    ));
    assert!(eq(
        proxy_common::CLUSTER_CIDR6_ADDR_GLOBAL,
        "CLUSTER_CIDR6_ADDR"
    ));
    assert!(eq(
        proxy_common::CLUSTER_CIDR6_MASK_GLOBAL,
        "CLUSTER_CIDR6_MASK"
    ));
    assert!(eq(proxy_common::MASQUERADE_ALL_GLOBAL, "MASQUERADE_ALL"));
};

/// The masquerade mark (kube-proxy's `--iptables-masquerade-bit`), set by
/// the agent when it loads the programs.
#[unsafe(no_mangle)]
static MASQUERADE_MARK: u32 = 0x4000;
/// `--cluster-cidr` (address and netmask, network byte order): ClusterIP
/// traffic from outside it is masqueraded. A zero mask: no cluster CIDR,
/// and no such masquerade (as kube-proxy, which cannot tell without one).
#[unsafe(no_mangle)]
static CLUSTER_CIDR_ADDR: u32 = 0;
/// See [`CLUSTER_CIDR_ADDR`].
#[unsafe(no_mangle)]
static CLUSTER_CIDR_MASK: u32 = 0;
/// The IPv6 `--cluster-cidr`, as [`CLUSTER_CIDR_ADDR`]: network and
/// netmask as four words each, network byte order; an all-zero mask for
/// none.
#[unsafe(no_mangle)]
static CLUSTER_CIDR6_ADDR: Ip6 = [0; 4];
/// See [`CLUSTER_CIDR6_ADDR`].
#[unsafe(no_mangle)]
static CLUSTER_CIDR6_MASK: Ip6 = [0; 4];
/// `--masquerade-all`: every ClusterIP flow from outside is masqueraded.
#[unsafe(no_mangle)]
static MASQUERADE_ALL: u32 = 0;

/// What the ingress program does differently per family.
trait Ingress: Family {
    /// Whether `addr` is outside the family's cluster CIDR; false without
    /// one.
    fn outside_cluster_cidr(addr: Self) -> bool;
    /// The session-affinity client for a packet from `addr`.
    fn affinity_client(addr: Self) -> u64;
    /// `run --trace`: a new flow.
    fn trace_flow(ctx: &TcContext, packet: &Packet<Self>, backend: &ServiceValue<Self>);
}

impl Ingress for Ip4 {
    #[expect(
        clippy::inline_always,
        reason = "on the hot path of every new ClusterIP flow"
    )]
    #[inline(always)]
    fn outside_cluster_cidr(addr: Self) -> bool {
        // SAFETY: globals the loader fills in; read as they are in the object.
        let (net, mask) = unsafe {
            (
                core::ptr::read_volatile(&raw const CLUSTER_CIDR_ADDR),
                core::ptr::read_volatile(&raw const CLUSTER_CIDR_MASK),
            )
        };
        mask != 0 && addr & mask != net
    }

    fn affinity_client(addr: Self) -> u64 {
        u64::from(addr) | AFFINITY_CLIENT_IP
    }

    // Inlined, as before there were two programs of this code: a call
    // would stack its frame on the family's, past the verifier's 512 bytes.
    #[expect(clippy::inline_always, reason = "see above")]
    #[inline(always)]
    fn trace_flow(ctx: &TcContext, packet: &Packet<Self>, backend: &ServiceValue<Self>) {
        info!(
            ctx,
            "flow {:i}:{} -> {:i}:{} -> {:i}:{}",
            u32::from_be(packet.saddr_be),
            u16::from_be(packet.sport_be),
            u32::from_be(packet.daddr_be),
            u16::from_be(packet.dport_be),
            u32::from_be(backend.addr_be),
            u16::from_be(backend.port_be)
        );
    }
}

/// The octets of an IPv6 address, as aya-log prints them.
const fn octets(addr: Ip6) -> [u8; 16] {
    // SAFETY: sixteen bytes either way, every bit pattern valid; the words
    // hold the octets in network order in memory.
    unsafe { core::mem::transmute::<Ip6, [u8; 16]>(addr) }
}

impl Ingress for Ip6 {
    #[expect(
        clippy::inline_always,
        reason = "on the hot path of every new ClusterIP flow"
    )]
    #[inline(always)]
    fn outside_cluster_cidr(addr: Self) -> bool {
        // Word by word: a whole-array read of a global becomes a memcpy.
        let mut outside = 0;
        let mut any_mask = 0;
        let mut i = 0;
        while i < 4 {
            // SAFETY: globals the loader fills in; read as they are in the
            // object.
            let (net, mask) = unsafe {
                (
                    core::ptr::read_volatile(&raw const CLUSTER_CIDR6_ADDR[i]),
                    core::ptr::read_volatile(&raw const CLUSTER_CIDR6_MASK[i]),
                )
            };
            outside |= (addr[i] & mask) ^ net;
            any_mask |= mask;
            i += 1;
        }
        any_mask != 0 && outside != 0
    }

    /// The key's client is a `u64`, so the address is folded into it: its
    /// two halves XORed, which keeps every bit of an interface identifier
    /// within one /64 (clients of one network never share a key) and of
    /// the network prefix. Two clients that still fold alike only share a
    /// backend, which affinity allows; and the top bit marks it a client
    /// address, apart from the socket programs' namespace cookies.
    fn affinity_client(addr: Self) -> u64 {
        let high = (u64::from(addr[0]) << 32) | u64::from(addr[1]);
        let low = (u64::from(addr[2]) << 32) | u64::from(addr[3]);
        (high ^ low) | AFFINITY_CLIENT_IP
    }

    // Inlined, as before there were two programs of this code: a call
    // would stack its frame on the family's, past the verifier's 512 bytes.
    #[expect(clippy::inline_always, reason = "see above")]
    #[inline(always)]
    fn trace_flow(ctx: &TcContext, packet: &Packet<Self>, backend: &ServiceValue<Self>) {
        info!(
            ctx,
            "flow [{:i}]:{} -> [{:i}]:{} -> [{:i}]:{}",
            octets(packet.saddr_be),
            u16::from_be(packet.sport_be),
            octets(packet.daddr_be),
            u16::from_be(packet.dport_be),
            octets(backend.addr_be),
            u16::from_be(backend.port_be)
        );
    }
}

#[classifier]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the program macro hands the context over by value"
)]
pub fn tc_ingress(ctx: TcContext) -> i32 {
    by_family::<FROM_OUTSIDE>(&ctx)
}

/// Packets from outside the node's pods, on the node's devices: the
/// outside frontends first, then ClusterIPs.
pub const FROM_OUTSIDE: bool = false;
/// Packets from a pod, on its interface: the frontends as pods reach them,
/// which are the node's own sockets' (see `tc_pod_ingress`).
pub const FROM_POD: bool = true;

/// The program, for packets from outside or (`POD`) from a pod.
#[expect(
    clippy::inline_always,
    reason = "each program's body; its families are the calls"
)]
#[inline(always)]
pub fn by_family<const POD: bool>(ctx: &TcContext) -> i32 {
    match ctx.skb.protocol() {
        ETH_P_IP_BE => then::<Ip4>(ctx, ingress4::<POD>(ctx)),
        ETH_P_IPV6_BE => then::<Ip6>(ctx, ingress6::<POD>(ctx)),
        _ => PASS,
    }
}

/// What a family's flow path leaves to the program beside its verdict:
/// the rare work kept out of that path's frame, done from the program's
/// own after it returns, in a frame of its own that parses the packet
/// again. Each frame stacked on the IPv6 flow path's would take the
/// program past the verifier's 512 bytes.
const THEN_ICMP_ERROR: i32 = 0x100;
/// See [`THEN_ICMP_ERROR`]: with the verdict in its low bits.
const THEN_FORGET_REPLY: i32 = 0x200;

#[expect(
    clippy::inline_always,
    reason = "the program's own frame: that is the point"
)]
#[inline(always)]
fn then<A: Family>(ctx: &TcContext, code: i32) -> i32 {
    match code {
        THEN_ICMP_ERROR => icmp_error::<A>(ctx),
        code if code & THEN_FORGET_REPLY != 0 => {
            forget_reply::<A>(ctx);
            code & !THEN_FORGET_REPLY
        }
        verdict => verdict,
    }
}

// Each family's path is a function of its own: the program's stack is the
// deepest chain of frames, and the IPv6 path (five 16-byte addresses in
// its keys) inlined beside the IPv4 one, or called from its frame, would
// pass the verifier's 512 bytes. One call per packet is what it costs.
#[inline(never)]
fn ingress4<const POD: bool>(ctx: &TcContext) -> i32 {
    ingress::<Ip4, POD>(ctx)
}

#[inline(never)]
fn ingress6<const POD: bool>(ctx: &TcContext) -> i32 {
    ingress::<Ip6, POD>(ctx)
}

#[expect(clippy::inline_always, reason = "one frame per family (see ingress4)")]
#[inline(always)]
fn ingress<A: Ingress, const POD: bool>(ctx: &TcContext) -> i32 {
    match parse::<A>(ctx) {
        Some(Parsed::Flow(packet)) => flow::<A, POD>(ctx, &packet),
        Some(Parsed::IcmpError(_)) => THEN_ICMP_ERROR,
        None => PASS,
    }
}

fn flow<A: Ingress, const POD: bool>(ctx: &TcContext, packet: &Packet<A>) -> i32 {
    // Most packets on a node's devices are for no frontend: out before
    // any hash lookup. A flow that starts here untranslated may still have
    // to take a reply direction back (see `forget_reply`), which only a
    // backend's address can have.
    if !may_hold(
        &FRONTEND_FILTER,
        packet.daddr_be,
        packet.dport_be,
        packet.proto,
    ) {
        let starts = packet.starts_tcp || packet.proto == PROTO_UDP;
        return if starts
            && may_hold(
                &BACKEND_FILTER,
                packet.daddr_be,
                packet.dport_be,
                packet.proto,
            ) {
            PASS | THEN_FORGET_REPLY
        } else {
            PASS
        };
    }
    let flows = A::flows();
    let forward = packet.flow_key(FLOW_FORWARD);
    // A TCP SYN always chooses afresh (a reused client port must not stick
    // to a backend that has gone); every other packet follows its flow.
    if !packet.starts_tcp {
        // SAFETY: the value is copied out at once.
        if let Some(flow) = unsafe { flows.get(forward) }.copied()
            && still_serving(packet, &flow)
        {
            return translate::<A, POD>(ctx, packet, &flow);
        }
        // A TCP packet of no known flow is not ours to start one: it may
        // be the reply of a flow masqueraded to a node address.
        if packet.proto != PROTO_UDP {
            return PASS;
        }
    }
    let (backend, flags) = match choose::<A, POD>(packet) {
        Ok(chosen) => chosen,
        Err(verdict) => return verdict | THEN_FORGET_REPLY,
    };
    // A pod reaching itself through its Service must not see its own
    // address as the source: masquerade it, as kube-proxy's KUBE-SEP rule
    // for the endpoint's own address does.
    let hairpin = backend.addr_be.same(packet.saddr_be);
    let flow = FlowNat {
        addr_be: backend.addr_be,
        port_be: backend.port_be,
        flags: flags
            | if hairpin { FRONTEND_MASQUERADE } else { 0 }
            | if POD { FLOW_FROM_POD } else { 0 },
        backend_id: backend.backend_id,
    };
    let reply = FlowKey {
        saddr_be: backend.addr_be,
        daddr_be: packet.saddr_be,
        sport_be: backend.port_be,
        dport_be: packet.sport_be,
        proto: packet.proto,
        direction: FLOW_REPLY,
        pad: [0; 2],
    };
    let frontend_nat = FlowNat {
        addr_be: packet.daddr_be,
        port_be: packet.dport_be,
        flags: 0,
        backend_id: 0,
    };
    // The reply direction first: a reply must never beat its translation.
    if flows.insert(reply, frontend_nat, 0).is_err() || flows.insert(forward, flow, 0).is_err() {
        record(Event::RevNatNotStored);
        return PASS;
    }
    // `run --trace` only (see lb::forward).
    A::trace_flow(ctx, packet, &backend);
    translate::<A, POD>(ctx, packet, &flow)
}

/// A flow that starts here untranslated (a client reaching a pod straight
/// from a port it once used for a Service) owns its reply direction from
/// now on: a reply entry left by the old flow would give its replies the
/// frontend's address. Conntrack keeps the two apart the same way, by
/// refusing a second flow with the same reply tuple.
///
/// Unless the packet is that flow's own, past its translation: a pod's
/// packet translated on its interface comes into the node again through
/// the pods' bridge on its way to the backend, and where that bridge is
/// one of the node's devices too, its reply entry must stay. Only a pod's
/// flow ([`FLOW_FROM_POD`]) is kept so: an outside client that reaches a
/// pod straight from a port it used for a NodePort looks the same in the
/// table, and its new flow takes the reply direction. See
/// [`THEN_FORGET_REPLY`].
#[inline(never)]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "the one key is lent to every lookup, not copied for each"
)]
fn forget_reply<A: Family>(ctx: &TcContext) {
    let Some(Parsed::Flow(packet)) = parse::<A>(ctx) else {
        return;
    };
    let flows = A::flows();
    let mut key = packet.answered_flow_key(FLOW_REPLY);
    let Some(frontend) = flows.get_ptr(&key) else {
        return;
    };
    // SAFETY: a map value, read at once.
    (key.daddr_be, key.dport_be) = unsafe { ((*frontend).addr_be, (*frontend).port_be) };
    (key.saddr_be, key.sport_be, key.direction) = (packet.saddr_be, packet.sport_be, FLOW_FORWARD);
    if let Some(flow) = flows.get_ptr(&key)
        // SAFETY: as above.
        && unsafe {
            (*flow).flags & FLOW_FROM_POD != 0
                && (*flow).addr_be.same(packet.daddr_be)
                && (*flow).port_be == packet.dport_be
        }
    {
        return;
    }
    key = packet.answered_flow_key(FLOW_REPLY);
    let _ = flows.remove(&key);
}

/// The backend for a new flow and the flow's flags, or the verdict for a
/// packet that starts none. From outside, the outside frontends first (a
/// load-balancer IP with source ranges drops a client outside them); then
/// the ClusterIPs, from the socket programs' own map. From a pod, only
/// that map: it holds every frontend as the node's own sockets reach it,
/// over the Service's backends whatever its externalTrafficPolicy, which
/// is how pods reach them too.
fn choose<A: Ingress, const POD: bool>(packet: &Packet<A>) -> Result<(ServiceValue<A>, u16), i32> {
    let frontend = ServiceKey::frontend(packet.daddr_be, packet.dport_be, packet.proto);
    // Session affinity follows the client's address here.
    let client = || A::affinity_client(packet.saddr_be);
    let outside = if POD {
        None
    } else {
        frontend_of(A::ext_services(), frontend)
    };
    let (picked, cluster_ip) = match outside {
        // loadBalancerSourceRanges, before any backend is chosen or counted.
        Some(slot0)
            if slot0.flags & FRONTEND_SOURCE_RANGES != 0
                && !A::admitted_by_source_ranges(&frontend, packet.saddr_be) =>
        {
            record(Event::ExtSourceRangeDropped);
            return Err(DROP);
        }
        Some(slot0) => (
            pick_in(A::ext_services(), frontend, slot0, COUNTED_BY_TC, client),
            false,
        ),
        // A ClusterIP from outside: counted as the tc programs'.
        None => (pick(A::services(), frontend, COUNTED_BY_TC, client), true),
    };
    match picked {
        Pick::NotService => Err(PASS),
        Pick::NoBackends => {
            // kube-proxy drops these too (policy Local without a local
            // endpoint), and a load balancer's health check moves on. A
            // pod's connection times out here where its `connect()` would
            // be refused: nothing answers for the Service in tc.
            record(Event::ExtDropped);
            Err(DROP)
        }
        Pick::Lost(event) => {
            record(event);
            Err(PASS)
        }
        Pick::Backend { backend, flags } if !cluster_ip => Ok((backend, flags)),
        // That map also holds the outside frontends as the node's own
        // sockets reach them, over other backends: not for packets.
        Pick::Backend { flags, .. } if flags & FRONTEND_KIND != 0 && !POD => Err(PASS),
        Pick::Backend { backend, .. } => {
            let masquerade = if masquerades_cluster_ip(packet.saddr_be) {
                FRONTEND_MASQUERADE
            } else {
                0
            };
            Ok((backend, FLOW_CLUSTER_IP | masquerade))
        }
    }
}

/// kube-proxy's masquerade rules for ClusterIPs: everything with
/// `--masquerade-all`, else what comes from outside `--cluster-cidr`.
fn masquerades_cluster_ip<A: Ingress>(saddr_be: A) -> bool {
    // SAFETY: a global the loader fills in; read as it is in the object.
    let all = unsafe { core::ptr::read_volatile(&raw const MASQUERADE_ALL) };
    all != 0 || A::outside_cluster_cidr(saddr_be)
}

/// A UDP flow whose backend left its Service is chosen afresh, as
/// kube-proxy flushes conntrack for UDP endpoints that go; TCP flows keep
/// their backend, as conntrack keeps established connections.
fn still_serving<A: Family>(packet: &Packet<A>, flow: &FlowNat<A>) -> bool {
    packet.proto != PROTO_UDP
        || if flow.flags & FLOW_CLUSTER_IP != 0 {
            A::backends().get_ptr(flow.backend_id).is_some()
        } else {
            A::ext_backends().get_ptr(flow.backend_id).is_some()
        }
}

#[expect(clippy::inline_always, reason = "one frame per family (see ingress4)")]
#[inline(always)]
fn translate<A: Family, const POD: bool>(
    ctx: &TcContext,
    packet: &Packet<A>,
    flow: &FlowNat<A>,
) -> i32 {
    if !packet.rewrite(ctx, Side::Destination, flow.addr_be, flow.port_be) {
        return DROP;
    }
    if flow.flags & FRONTEND_MASQUERADE != 0 {
        // SAFETY: a global the loader fills in; read as it is in the object.
        let mark = unsafe { core::ptr::read_volatile(&raw const MASQUERADE_MARK) };
        // SAFETY: the kernel hands every tc program a valid skb.
        let current = unsafe { (*ctx.skb.skb).mark };
        ctx.set_mark(current | mark);
    }
    record(if POD {
        Event::PodForwarded
    } else {
        Event::ExtForwarded
    });
    PASS
}

/// An ICMP error about a reply of a translated flow, sent back to the
/// frontend the reply came from: it goes on to the backend, quoting the
/// reply as the backend sent it, and conntrack relates it to the flow
/// (undoing the masquerade, for policy Cluster).
///
/// See [`THEN_ICMP_ERROR`].
#[inline(never)]
fn icmp_error<A: Family>(ctx: &TcContext) -> i32 {
    let Some(Parsed::IcmpError(at)) = parse::<A>(ctx) else {
        return PASS;
    };
    let Some(error) = packet::icmp_error::<A>(ctx, at) else {
        return PASS;
    };
    // SAFETY: the value is copied out at once.
    let Some(flow) =
        (unsafe { A::flows().get(error.quoted.answered_flow_key(FLOW_FORWARD)) }).copied()
    else {
        return PASS;
    };
    if !error.rewrite(ctx, Side::Source, flow.addr_be, flow.port_be) {
        return DROP;
    }
    record(Event::IcmpTranslated);
    PASS
}
