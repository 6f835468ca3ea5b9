//! `connect()` on IPv6 TCP and UDP sockets, IPv4-mapped peers among them:
//! as `connect4`, on the IPv6 maps.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

#[cgroup_sock_addr(connect6)]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the program macro hands the context over by value"
)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    crate::lb::forward::<proxy_common::Ip6>(&ctx, crate::lb::Call::Connect)
}
