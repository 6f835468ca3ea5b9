//! A socket's release (its last close): a connected UDP socket's entry in
//! the connected-UDP map goes with it.

use core::ptr;

use aya_ebpf::{
    helpers::{bpf_get_socket_cookie, generated::bpf_sk_storage_get},
    macros::cgroup_sock,
    programs::SockContext,
};
use proxy_common::{Ip4, Ip6, PROTO_UDP};

use crate::{lb::ALLOW, maps::FamilyMaps};

/// `AF_INET` and `AF_INET6`, which the programs cannot take from libc
/// (no_std).
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

#[cgroup_sock(sock_release)]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the program macro hands the context over by value"
)]
pub fn sock_release(ctx: SockContext) -> i32 {
    // SAFETY: the kernel hands every sock program a valid context.
    let sock = unsafe { &*ctx.sock };
    // Every socket of the cgroup ends here; only UDP sockets can have an
    // entry, and two loads from the context spare the others everything
    // else.
    if sock.protocol != u32::from(PROTO_UDP) {
        return ALLOW;
    }
    match sock.family {
        AF_INET => forget_connected::<Ip4>(&ctx),
        AF_INET6 => forget_connected::<Ip6>(&ctx),
        _ => {}
    }
    // A release cannot be refused; the hook wants 1.
    ALLOW
}

/// Deletes the socket's entry in its family's connected-UDP map, if it
/// has one.
fn forget_connected<A: FamilyMaps>(ctx: &SockContext) {
    // connect4 notes a socket only once it has made the socket's storage,
    // so a socket without storage (never translated: most of them) has no
    // entry. Finding that out is a pointer test, where making its cookie
    // and looking it up cost several times more. aya's SkStorage looks up
    // for sock_addr contexts only, hence the helper; a map's address is
    // what the helper takes for the map.
    // SAFETY: the helper reads the context's socket, which the kernel
    // keeps alive for the program's run; no storage is made.
    let storage = unsafe {
        bpf_sk_storage_get(
            ptr::from_ref(A::sock_rev_nat()).cast_mut().cast(),
            ctx.sock.cast(),
            ptr::null_mut(),
            0,
        )
    };
    if storage.is_null() {
        return;
    }
    // SAFETY: a plain helper call on this program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock.cast()) };
    // An unconnected socket that sent through sendmsg4 has storage too; a
    // lookup takes no lock, where a delete locks the key's bucket even
    // when the key is not there.
    let connected = A::udp_connected();
    if connected.get_ptr(cookie).is_some() {
        let _ = connected.remove(cookie);
    }
}
