//! Packets leaving the node's devices: a reply of a flow that
//! `tc_ingress` translated gets its frontend's address back, so the client
//! sees the address it asked for (after netfilter has undone any
//! masquerade, since tc egress runs after POSTROUTING). One flow-table
//! lookup for every other packet.

use aya_ebpf::{macros::classifier, programs::TcContext};
use proxy_common::{Event, FLOW_REPLY};

use crate::{
    maps::{FLOWS, record},
    packet::{DROP, PASS, Packet, Side},
};

#[classifier]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the program macro hands the context over by value"
)]
pub fn tc_egress(ctx: TcContext) -> i32 {
    let Some(packet) = Packet::parse(&ctx) else {
        return PASS;
    };
    let reply = packet.flow_key(FLOW_REPLY);
    // SAFETY: the value is copied out at once.
    let Some(frontend) = (unsafe { FLOWS.get(reply) }).copied() else {
        return PASS;
    };
    if !packet.rewrite(&ctx, Side::Source, frontend.addr_be, frontend.port_be) {
        return DROP;
    }
    record(Event::ExtReversed);
    PASS
}
