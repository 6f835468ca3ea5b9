//! A socket's release (its last close): a connected UDP socket's entry in
//! the connected-UDP map goes with it.

use core::ptr;

use aya_ebpf::{
    helpers::{bpf_get_socket_cookie, generated::bpf_sk_storage_get},
    macros::cgroup_sock,
    programs::SockContext,
};
use proxy_common::PROTO_UDP;

use crate::{
    lb::ALLOW,
    maps::{SOCK_REV_NAT, UDP_CONNECTED},
};

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
    // the context spare the others everything else.
    if sock.protocol != u32::from(PROTO_UDP) || sock.family != AF_INET {
        return ALLOW;
    }
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
            ptr::from_ref(&SOCK_REV_NAT).cast_mut().cast(),
            ctx.sock.cast(),
            ptr::null_mut(),
            0,
        )
    };
    if storage.is_null() {
        return ALLOW;
    }
    // SAFETY: a plain helper call on this program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock.cast()) };
    // An unconnected socket that sent through sendmsg4 has storage too; a
    // lookup takes no lock, where a delete locks the key's bucket even
    // when the key is not there.
    if UDP_CONNECTED.get_ptr(cookie).is_some() {
        let _ = UDP_CONNECTED.remove(cookie);
    }
    // A release cannot be refused; the hook wants 1.
    ALLOW
}
