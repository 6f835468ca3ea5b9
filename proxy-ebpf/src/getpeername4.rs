//! `getpeername()`: an application sees the Service as its peer, not the
//! backend it was sent to.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

#[cgroup_sock_addr(getpeername4)]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the program macro hands the context over by value"
)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    crate::lb::reverse::<proxy_common::Ip4>(&ctx)
}
