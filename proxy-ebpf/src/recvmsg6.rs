//! `recvmsg()` on IPv6 UDP sockets: as `recvmsg4`, on the IPv6 maps.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

#[cgroup_sock_addr(recvmsg6)]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the program macro hands the context over by value"
)]
pub fn recvmsg6(ctx: SockAddrContext) -> i32 {
    crate::lb::reverse::<proxy_common::Ip6>(&ctx)
}
