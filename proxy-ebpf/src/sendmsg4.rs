//! `sendmsg()` with an address on unconnected UDP sockets (DNS clients):
//! pick a backend for every datagram.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

#[cgroup_sock_addr(sendmsg4)]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the program macro hands the context over by value"
)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    crate::lb::forward::<proxy_common::Ip4>(&ctx, crate::lb::Call::Sendmsg)
}
