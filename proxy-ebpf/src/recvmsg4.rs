//! `recvmsg()` on UDP sockets: a reply from a backend appears to come from
//! the Service the datagram was sent to.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

#[cgroup_sock_addr(recvmsg4)]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the program macro hands the context over by value"
)]
pub fn recvmsg4(ctx: SockAddrContext) -> i32 {
    crate::lb::reverse::<proxy_common::Ip4>(&ctx)
}
