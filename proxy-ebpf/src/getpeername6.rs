//! `getpeername()` on IPv6 sockets: as `getpeername4`, on the IPv6 maps.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

#[cgroup_sock_addr(getpeername6)]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the program macro hands the context over by value"
)]
pub fn getpeername6(ctx: SockAddrContext) -> i32 {
    crate::lb::reverse::<proxy_common::Ip6>(&ctx)
}
