//! The translation shared by the hooks: frontend to a random backend on the
//! way out, backend back to the frontend on the way in.

use aya_ebpf::{
    EbpfContext as _,
    bindings::bpf_sock_addr,
    helpers::{bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use proxy_common::{Event, ServiceKey, SockRevNatKey, SockRevNatValue};

use crate::maps::{BACKENDS, SERVICES, SOCK_REV_NAT, record};

/// Let the system call go on.
pub const ALLOW: i32 = 1;
/// Fail the system call with the errno set by `bpf_set_retval`.
pub const REJECT: i32 = 0;

const ECONNREFUSED: i32 = 111;

/// Rewrites a socket address that names a Service frontend to one of its
/// backends, chosen uniformly at random, and remembers the frontend for the
/// reverse direction. A Service without ready endpoints refuses the
/// connection at once, as kube-proxy's REJECT rule does.
pub fn forward(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let addr = unsafe { &mut *ctx.sock_addr };
    // The protocol is a u32 in the context; anything but TCP or UDP (SCTP,
    // raw) has no frontend and so falls through untouched.
    let Ok(proto) = u8::try_from(addr.protocol) else {
        return ALLOW;
    };
    #[expect(
        clippy::cast_possible_truncation,
        reason = "user_port holds a 16-bit port in a 32-bit field"
    )]
    let frontend = ServiceKey::frontend(addr.user_ip4, addr.user_port as u16, proto);
    // SAFETY: map values are read once and copied; nothing keeps a reference.
    let Some(count) = (unsafe { SERVICES.get(frontend) }).map(|v| v.count) else {
        return ALLOW;
    };
    if count == 0 {
        // SAFETY: a plain helper call; connect and sendmsg hooks may set it.
        unsafe { bpf_set_retval(-ECONNREFUSED) };
        record(Event::Refused);
        return REJECT;
    }
    #[expect(
        clippy::cast_possible_truncation,
        reason = "the remainder is below count, a u16"
    )]
    // SAFETY: a plain helper call.
    let slot = (unsafe { bpf_get_prandom_u32() } % u32::from(count)) as u16 + 1;
    // A slot can vanish between the two lookups while the agent shrinks the
    // Service; leaving the socket alone then is the same as a lost race.
    let Some(backend_id) = (unsafe { SERVICES.get(frontend.slot(slot)) }).map(|v| v.backend_id)
    else {
        record(Event::LostRace);
        return ALLOW;
    };
    let Some(backend) = (unsafe { BACKENDS.get(backend_id) }).copied() else {
        record(Event::LostRace);
        return ALLOW;
    };
    remember_frontend(ctx, addr, backend.addr_be, backend.port_be);
    addr.user_ip4 = backend.addr_be;
    addr.user_port = u32::from(backend.port_be);
    record(Event::Forwarded);
    ALLOW
}

fn remember_frontend(ctx: &SockAddrContext, addr: &bpf_sock_addr, addr_be: u32, port_be: u16) {
    // SAFETY: sock_addr programs may ask for the socket cookie.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRevNatKey {
        cookie,
        addr_be,
        port_be,
        pad: 0,
    };
    #[expect(
        clippy::cast_possible_truncation,
        reason = "user_port holds a 16-bit port in a 32-bit field"
    )]
    let value = SockRevNatValue {
        addr_be: addr.user_ip4,
        port_be: addr.user_port as u16,
        pad: 0,
    };
    // If the LRU map is full it evicts; an insert error can only mean the
    // reply shows the backend address, which is no reason to fail the call.
    let _ = SOCK_REV_NAT.insert(key, value, 0);
}

/// Rewrites a backend address seen by a socket back to the frontend that
/// socket asked for, so replies and `getpeername` show the Service.
pub fn reverse(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let addr = unsafe { &mut *ctx.sock_addr };
    #[expect(
        clippy::cast_possible_truncation,
        reason = "user_port holds a 16-bit port in a 32-bit field"
    )]
    let key = SockRevNatKey {
        // SAFETY: sock_addr programs may ask for the socket cookie.
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        addr_be: addr.user_ip4,
        port_be: addr.user_port as u16,
        pad: 0,
    };
    // SAFETY: the value is copied out at once.
    if let Some(frontend) = unsafe { SOCK_REV_NAT.get(key) }.copied() {
        addr.user_ip4 = frontend.addr_be;
        addr.user_port = u32::from(frontend.port_be);
        record(Event::Reversed);
    }
    // recvmsg and getpeername hooks must always return 1.
    ALLOW
}
