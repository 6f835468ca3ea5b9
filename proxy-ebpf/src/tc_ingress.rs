//! Packets arriving on the node's devices: a NodePort, externalIP or
//! load-balancer IP is translated to a backend, as kube-proxy's
//! KUBE-NODEPORTS and KUBE-EXT-* DNAT rules do, before netfilter sees the
//! packet. The flow table keeps every later packet of the flow on the
//! backend its first packet chose, whatever happens to the Service.
//!
//! Flows of externalTrafficPolicy Cluster (and hairpin flows, a pod
//! reaching itself) are marked for the masquerade fallback, so the
//! backend answers through this node. Anything that is not an outside
//! frontend passes untouched.

use aya_ebpf::{macros::classifier, programs::TcContext};
use proxy_common::{
    Event, FLOW_FORWARD, FLOW_REPLY, FRONTEND_MASQUERADE, FlowKey, FlowNat, PROTO_UDP, ServiceKey,
};

use crate::{
    lb::{Pick, pick},
    maps::{EXT_BACKENDS, EXT_SERVICES, FLOWS, record},
    packet::{DROP, PASS, Packet, Side},
};

/// The masquerade mark (kube-proxy's `--iptables-masquerade-bit`), set by
/// the agent when it loads the programs.
#[unsafe(no_mangle)]
static MASQUERADE_MARK: u32 = 0x4000;

#[classifier]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the program macro hands the context over by value"
)]
pub fn tc_ingress(ctx: TcContext) -> i32 {
    let Some(packet) = Packet::parse(&ctx) else {
        return PASS;
    };
    let forward = packet.flow_key(FLOW_FORWARD);
    // A TCP SYN always chooses afresh (a reused client port must not stick
    // to a backend that has gone); every other packet follows its flow.
    if !packet.starts_tcp {
        // SAFETY: the value is copied out at once.
        if let Some(flow) = unsafe { FLOWS.get(forward) }.copied()
            && still_serving(&packet, &flow)
        {
            return translate(&ctx, &packet, &flow);
        }
        // A TCP packet of no known flow is not ours to start one: it may
        // be the reply of a flow masqueraded to a node address.
        if packet.proto != PROTO_UDP {
            return PASS;
        }
    }
    let frontend = ServiceKey::frontend(packet.daddr_be, packet.dport_be, packet.proto);
    let (backend, flags) = match pick(&EXT_SERVICES, frontend) {
        Pick::NotService => return PASS,
        Pick::NoBackends => {
            // kube-proxy drops these too (policy Local without a local
            // endpoint), and a load balancer's health check moves on.
            record(Event::ExtDropped);
            return DROP;
        }
        Pick::Lost(event) => {
            record(event);
            return PASS;
        }
        Pick::Backend { backend, flags } => (backend, flags),
    };
    // A pod reaching itself through its Service must not see its own
    // address as the source: masquerade it, as kube-proxy's KUBE-SEP rule
    // for the endpoint's own address does.
    let hairpin = backend.addr_be == packet.saddr_be;
    let flow = FlowNat {
        addr_be: backend.addr_be,
        port_be: backend.port_be,
        flags: if hairpin {
            flags | FRONTEND_MASQUERADE
        } else {
            flags
        },
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
    if FLOWS.insert(reply, frontend_nat, 0).is_err() || FLOWS.insert(forward, flow, 0).is_err() {
        record(Event::RevNatNotStored);
        return PASS;
    }
    translate(&ctx, &packet, &flow)
}

/// A UDP flow whose backend left its Service is chosen afresh, as
/// kube-proxy flushes conntrack for UDP endpoints that go; TCP flows keep
/// their backend, as conntrack keeps established connections.
fn still_serving(packet: &Packet, flow: &FlowNat) -> bool {
    packet.proto != PROTO_UDP || EXT_BACKENDS.get_ptr(flow.backend_id).is_some()
}

fn translate(ctx: &TcContext, packet: &Packet, flow: &FlowNat) -> i32 {
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
    record(Event::ExtForwarded);
    PASS
}
