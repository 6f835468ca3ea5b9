//! `connect()` on TCP and UDP sockets: pick the backend once per socket.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

#[cgroup_sock_addr(connect4)]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the program macro hands the context over by value"
)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    crate::lb::forward::<proxy_common::Ip4>(&ctx, crate::lb::Call::Connect)
}
