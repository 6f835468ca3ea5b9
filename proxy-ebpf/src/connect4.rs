//! `connect()` on TCP and UDP sockets: pick the backend once per socket.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    crate::lb::forward(&ctx, crate::lb::Call::Connect)
}
