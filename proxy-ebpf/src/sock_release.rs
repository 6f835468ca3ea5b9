//! A socket's release (its last close): a connected UDP socket's entry in
//! the connected-UDP map goes with it.

use aya_ebpf::{helpers::bpf_get_socket_cookie, macros::cgroup_sock, programs::SockContext};
use proxy_common::PROTO_UDP;

use crate::{lb::ALLOW, maps::UDP_CONNECTED};

/// `AF_INET`, which the programs cannot take from libc (no_std).
const AF_INET: u32 = 2;

#[cgroup_sock(sock_release)]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the program macro hands the context over by value"
)]
pub fn sock_release(ctx: SockContext) -> i32 {
    // SAFETY: the kernel hands every sock program a valid context.
    let sock = unsafe { &*ctx.sock };
    // Every socket of the cgroup ends here; only IPv4 UDP sockets can have
    // an entry (connect4 runs for IPv4 sockets only), and two loads from
    // the context spare the others the lookup.
    if sock.protocol != u32::from(PROTO_UDP) || sock.family != AF_INET {
        return ALLOW;
    }
    // SAFETY: a plain helper call on this program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock.cast()) };
    // Most UDP sockets were never connected to a Service: nothing to delete.
    let _ = UDP_CONNECTED.remove(cookie);
    // A release cannot be refused; the hook wants 1.
    ALLOW
}
