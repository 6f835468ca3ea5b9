//! Packets leaving the node's devices: a reply of a flow that
//! `tc_ingress` translated gets its frontend's address back, so the client
//! sees the address it asked for (after netfilter has undone any
//! masquerade, since tc egress runs after POSTROUTING); and an ICMP error
//! about one of its packets (a backend's port unreachable) names the
//! frontend the client sent it to. One flow-table lookup for every other
//! packet. IPv4 and IPv6 alike, each on its own flow table.

use aya_ebpf::{macros::classifier, programs::TcContext};
use proxy_common::{Event, FLOW_REPLY, Ip4, Ip6};

use crate::{
    maps::record,
    packet::{DROP, ETH_P_IP_BE, ETH_P_IPV6_BE, Family, PASS, Parsed, Side, parse},
};

#[classifier]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the program macro hands the context over by value"
)]
pub fn tc_egress(ctx: TcContext) -> i32 {
    match ctx.skb.protocol() {
        ETH_P_IP_BE => egress::<Ip4>(&ctx),
        ETH_P_IPV6_BE => egress6(&ctx),
        _ => PASS,
    }
}

/// The IPv6 path, a function of its own: inlined beside the IPv4 path,
/// its stack would add to that one's, past the verifier's 512 bytes.
#[inline(never)]
fn egress6(ctx: &TcContext) -> i32 {
    egress::<Ip6>(ctx)
}

#[expect(
    clippy::inline_always,
    reason = "the IPv4 path stays one function, as it was before IPv6"
)]
#[inline(always)]
fn egress<A: Family>(ctx: &TcContext) -> i32 {
    let Some(parsed) = parse::<A>(ctx) else {
        return PASS;
    };
    let (reply, translated) = match &parsed {
        Parsed::Flow(packet) => (packet.flow_key(FLOW_REPLY), Event::ExtReversed),
        // The error quotes a packet the backend got: its flow's reply
        // entry holds the frontend.
        Parsed::IcmpError(error) => (
            error.quoted.answered_flow_key(FLOW_REPLY),
            Event::IcmpTranslated,
        ),
    };
    // SAFETY: the value is copied out at once.
    let Some(frontend) = (unsafe { A::flows().get(reply) }).copied() else {
        return PASS;
    };
    let rewritten = match &parsed {
        Parsed::Flow(packet) => {
            packet.rewrite(ctx, Side::Source, frontend.addr_be, frontend.port_be)
        }
        Parsed::IcmpError(error) => {
            error.rewrite(ctx, Side::Destination, frontend.addr_be, frontend.port_be)
        }
    };
    if !rewritten {
        return DROP;
    }
    record(translated);
    PASS
}
