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
    maps::{BACKEND_FILTER, may_hold, record},
    packet::{self, DROP, ETH_P_IP_BE, ETH_P_IPV6_BE, Family, PASS, Parsed, Side, parse},
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
    match parse::<A>(ctx) {
        Some(Parsed::Flow(packet)) => {
            // A reply comes from a backend; most packets leaving a node's
            // devices do not, and go before any hash lookup.
            if !may_hold(
                &BACKEND_FILTER,
                packet.saddr_be,
                packet.sport_be,
                packet.proto,
            ) {
                return PASS;
            }
            // SAFETY: the value is copied out at once.
            let Some(frontend) = (unsafe { A::flows().get(packet.flow_key(FLOW_REPLY)) }).copied()
            else {
                return PASS;
            };
            if !packet.rewrite(ctx, Side::Source, frontend.addr_be, frontend.port_be) {
                return DROP;
            }
            record(Event::ExtReversed);
            PASS
        }
        Some(Parsed::IcmpError(at)) => icmp_error::<A>(ctx, at),
        None => PASS,
    }
}

/// An ICMP error about a packet a backend got: that flow's reply entry
/// holds the frontend, which the error must name instead.
#[expect(
    clippy::inline_always,
    reason = "the IPv4 path stays one function, as it was before IPv6"
)]
#[inline(always)]
fn icmp_error<A: Family>(ctx: &TcContext, at: usize) -> i32 {
    let Some(error) = packet::icmp_error::<A>(ctx, at) else {
        return PASS;
    };
    // SAFETY: the value is copied out at once.
    let Some(frontend) =
        (unsafe { A::flows().get(error.quoted.answered_flow_key(FLOW_REPLY)) }).copied()
    else {
        return PASS;
    };
    if !error.rewrite(ctx, Side::Destination, frontend.addr_be, frontend.port_be) {
        return DROP;
    }
    record(Event::IcmpTranslated);
    PASS
}
