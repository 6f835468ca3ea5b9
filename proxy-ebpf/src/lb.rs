//! The translation shared by the hooks: frontend to a random backend on the
//! way out, backend back to the frontend on the way in.
//!
//! One implementation for both families: the maps are reached through the
//! address type ([`FamilyMaps`]), and what differs at the socket hooks
//! (where the address sits in the context, IPv4-mapped addresses) is in
//! `sock_addr`.
//!
//! Costs, since every socket on the node pays them: a non-Service address
//! costs one hash lookup on the way out (and a UDP connect to it one failed
//! socket-storage lookup, a pointer test in the kernel, on a socket never
//! translated); a socket never translated costs one failed socket-storage
//! lookup on the way in.

use aya_ebpf::{
    bindings::bpf_sock_addr,
    btf_maps::HashMap,
    helpers::{
        bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_ns,
        bpf_set_retval,
    },
    programs::SockAddrContext,
};
use proxy_common::{
    AffinityKey, AffinityValue, ECONNREFUSED, Event, PROTO_UDP, RevNatPair, SOCK_REV_NAT_SLOTS,
    ServiceKey, ServiceValue, SockRevNat,
};

use crate::{
    maps::{FamilyMaps, count, record},
    sock_addr::SocketAddress,
};

// `no_mangle` takes the static's own name; this keeps it equal to the
// shared one the agent sets it by.
const _: () = assert!(crate::maps::eq(
    proxy_common::HOST_NETNS_COOKIE_GLOBAL,
    "HOST_NETNS_COOKIE"
));

/// `--socket-lb-scope=host`: the cookie of the host's network namespace,
/// whose sockets alone are balanced here; the others (pods') reach the
/// Service address itself, so that a mesh's iptables in the pod see it, and
/// are translated per packet on the pod's interface (`tc_pod_ingress`).
/// 0, the default, balances every socket: the verifier, which sees the
/// constant, drops the check.
#[unsafe(no_mangle)]
static HOST_NETNS_COOKIE: u64 = 0;

/// Let the system call go on.
pub const ALLOW: i32 = 1;
/// Fail the system call with the errno set by `bpf_set_retval`.
pub const REJECT: i32 = 0;

/// What a frontend lookup found.
pub enum Pick<A: FamilyMaps> {
    /// The address is not a frontend: leave it alone.
    NotService,
    /// A frontend without backends.
    NoBackends,
    /// A slot went missing while the agent shrank the frontend; the event
    /// says which lookup lost.
    Lost(Event),
    /// The chosen backend slot, and the frontend's slot-0 flags.
    Backend {
        backend: ServiceValue<A>,
        flags: u16,
    },
}

/// Looks a frontend up and picks one of its backends uniformly at random:
/// one random number and two lookups, whatever the hook. The socket and tc
/// programs all call this, on their own maps of one layout, and the choice
/// is counted for the slot, under `counted_by`. A frontend with session
/// affinity gives `client` (asked only then) the backend it had, while
/// that is recent and still in its slot.
#[expect(
    clippy::inline_always,
    reason = "every hook calls it on its hot path, where a BPF-to-BPF call costs"
)]
#[inline(always)]
pub fn pick<A: FamilyMaps, const N: usize>(
    services: &HashMap<ServiceKey<A>, ServiceValue<A>, N>,
    frontend: ServiceKey<A>,
    counted_by: u8,
    client: impl FnOnce() -> u64,
) -> Pick<A> {
    let Some(slot0) = frontend_of(services, frontend) else {
        return Pick::NotService;
    };
    pick_in(services, frontend, slot0, counted_by, client)
}

/// A frontend's slot 0, if `frontend` is one.
#[expect(
    clippy::inline_always,
    reason = "every hook calls it on its hot path, where a BPF-to-BPF call costs"
)]
#[inline(always)]
pub fn frontend_of<A: FamilyMaps, const N: usize>(
    services: &HashMap<ServiceKey<A>, ServiceValue<A>, N>,
    frontend: ServiceKey<A>,
) -> Option<ServiceValue<A>> {
    // SAFETY: map values are read once and copied; nothing keeps a reference.
    (unsafe { services.get(frontend) }).copied()
}

/// [`pick`] once the frontend's slot 0 is known: for a caller that looks
/// at the frontend before choosing (tc ingress, for source ranges).
#[expect(
    clippy::inline_always,
    reason = "every hook calls it on its hot path, where a BPF-to-BPF call costs"
)]
#[inline(always)]
pub fn pick_in<A: FamilyMaps, const N: usize>(
    services: &HashMap<ServiceKey<A>, ServiceValue<A>, N>,
    frontend: ServiceKey<A>,
    slot0: ServiceValue<A>,
    counted_by: u8,
    client: impl FnOnce() -> u64,
) -> Pick<A> {
    if slot0.count == 0 {
        return Pick::NoBackends;
    }
    // Slot 0's backend_id is the affinity timeout, in seconds.
    let (slot, picked) = if slot0.backend_id == 0 {
        let slot = random_slot(slot0.count);
        (slot, backend_in(services, frontend, slot, slot0.flags))
    } else {
        pick_with_affinity(services, frontend, slot0, client())
    };
    if let Pick::Backend { .. } = picked {
        count(ServiceKey {
            scope: counted_by,
            ..frontend.slot(slot)
        });
    }
    picked
}

/// One of `1..=count`, uniformly. `count` is not 0.
#[expect(
    clippy::inline_always,
    reason = "every hook calls it on its hot path, where a BPF-to-BPF call costs"
)]
#[inline(always)]
fn random_slot(count: u16) -> u16 {
    #[expect(
        clippy::cast_possible_truncation,
        reason = "the remainder is below count, a u16"
    )]
    // SAFETY: a plain helper call.
    let slot = (unsafe { bpf_get_prandom_u32() } % u32::from(count)) as u16;
    slot + 1
}

#[expect(
    clippy::inline_always,
    reason = "every hook calls it on its hot path, where a BPF-to-BPF call costs"
)]
#[inline(always)]
fn backend_in<A: FamilyMaps, const N: usize>(
    services: &HashMap<ServiceKey<A>, ServiceValue<A>, N>,
    frontend: ServiceKey<A>,
    slot: u16,
    flags: u16,
) -> Pick<A> {
    // SAFETY: as in `pick`.
    let Some(backend) = (unsafe { services.get(frontend.slot(slot)) }).copied() else {
        return Pick::Lost(Event::NoBackendSlot);
    };
    if backend.addr_be.same(A::default()) {
        return Pick::Lost(Event::NoBackend);
    }
    Pick::Backend { backend, flags }
}

/// sessionAffinity ClientIP: the client's backend while it chose within
/// the timeout (each choice renews it, as kube-proxy's `recent` match
/// does) and the backend is still in its slot; else a random one, noted.
/// Returns the slot with the choice.
#[expect(
    clippy::inline_always,
    reason = "inlined into each hook, whose verifier sees one program"
)]
#[inline(always)]
fn pick_with_affinity<A: FamilyMaps, const N: usize>(
    services: &HashMap<ServiceKey<A>, ServiceValue<A>, N>,
    frontend: ServiceKey<A>,
    slot0: ServiceValue<A>,
    client: u64,
) -> (u16, Pick<A>) {
    let affinity = A::affinity();
    let key = AffinityKey {
        client,
        frontend_addr_be: frontend.addr_be,
        frontend_port_be: frontend.port_be,
        proto: frontend.proto,
        pad: 0,
        pad_tail: A::TailPad::default(),
    };
    // SAFETY: a plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let timeout_ns = u64::from(slot0.backend_id).wrapping_mul(1_000_000_000);
    if let Some(entry) = affinity.get_ptr_mut(key)
        // SAFETY: a map value, copied out at once.
        && let held = unsafe { *entry }
        && now.wrapping_sub(held.chosen_ns) < timeout_ns
        && held.slot >= 1
        && held.slot <= slot0.count
        && let Pick::Backend { backend, flags } =
            backend_in(services, frontend, held.slot, slot0.flags)
        && backend.addr_be.same(held.addr_be)
        && backend.port_be == held.port_be
    {
        // Renewed in place: no second lookup. A racing writer on another
        // CPU stores a time as recent.
        // SAFETY: the value the lookup gave, valid while the program runs.
        unsafe { (*entry).chosen_ns = now };
        return (held.slot, Pick::Backend { backend, flags });
    }
    let slot = random_slot(slot0.count);
    let picked = backend_in(services, frontend, slot, slot0.flags);
    if let Pick::Backend { backend, .. } = &picked {
        let held = AffinityValue {
            chosen_ns: now,
            addr_be: backend.addr_be,
            port_be: backend.port_be,
            slot,
            pad_tail: A::TailPad::default(),
        };
        let _ = affinity.insert(key, held, 0);
    }
    (slot, picked)
}

/// Which system call a translation is for.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// `connect()`: the socket has this one peer from now on.
    Connect,
    /// `sendmsg()` with an address: one datagram; the socket may talk to
    /// other peers too.
    Sendmsg,
}

#[expect(
    clippy::cast_possible_truncation,
    reason = "user_port holds a 16-bit port in a 32-bit field"
)]
pub const fn user_port(addr: &bpf_sock_addr) -> u16 {
    addr.user_port as u16
}

/// Rewrites a socket address that names a Service frontend to one of its
/// backends, chosen uniformly at random, and remembers the frontend in the
/// socket's storage for the reverse direction. A Service without ready
/// endpoints refuses the connection at once, as kube-proxy's REJECT rule
/// does.
pub fn forward<A: SocketAddress>(ctx: &SockAddrContext, call: Call) -> i32 {
    if !in_scope(ctx) {
        return ALLOW;
    }
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let addr = unsafe { &mut *ctx.sock_addr };
    // The protocol is a u32 in the context; anything but TCP or UDP (SCTP,
    // raw) has no frontend and so falls through untouched.
    let Ok(proto) = u8::try_from(addr.protocol) else {
        return ALLOW;
    };
    let frontend_ip = A::of(addr);
    let frontend_port = user_port(addr);
    let frontend = ServiceKey::frontend(frontend_ip, frontend_port, proto);
    // The client, for session affinity: the socket's network namespace
    // (a pod's own), since the source address is not chosen yet.
    // SAFETY: a plain helper call on this program's context.
    let client = || unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    let backend = match A::choose(frontend, client) {
        Pick::NotService => {
            if call == Call::Connect && proto == PROTO_UDP {
                forget::<A>(ctx);
            }
            return ALLOW;
        }
        Pick::NoBackends => {
            // SAFETY: a plain helper call; connect and sendmsg hooks may set it.
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            record(Event::Refused);
            A::trace_refused(ctx, frontend_ip, frontend_port);
            return REJECT;
        }
        // The Service shrank under us: the socket is left alone, as after
        // a lost race.
        Pick::Lost(event) => {
            record(event);
            return ALLOW;
        }
        Pick::Backend { backend, .. } => backend,
    };
    let pair = RevNatPair {
        backend_addr_be: backend.addr_be,
        frontend_addr_be: frontend_ip,
        backend_port_be: backend.port_be,
        frontend_port_be: frontend_port,
    };
    if !remember(ctx, call, pair) {
        record(Event::RevNatNotStored);
        // A datagram whose reply would show the backend's address is
        // dropped by any careful client (dig, glibc's resolver), so it goes
        // to the Service address untouched and fails as visibly.
        if proto == PROTO_UDP {
            return ALLOW;
        }
    }
    if call == Call::Connect && proto == PROTO_UDP {
        // SAFETY: a plain helper call on this program's context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
        // Replaces the entry of an earlier connect of the same socket.
        // Only the ending of stale sockets depends on it: a full map (that
        // many connected sockets open at once) leaves this one out.
        if A::udp_connected().insert(cookie, pair, 0).is_err() {
            record(Event::UdpConnectedFull);
        }
    }
    A::trace_forwarded(ctx, call, &pair);
    backend.addr_be.write_to(addr);
    addr.user_port = u32::from(backend.port_be);
    record(Event::Forwarded);
    ALLOW
}

/// Whether the socket is one this hook balances (see [`HOST_NETNS_COOKIE`]).
#[expect(
    clippy::inline_always,
    reason = "every hook calls it on its hot path, where a BPF-to-BPF call costs"
)]
#[inline(always)]
fn in_scope(ctx: &SockAddrContext) -> bool {
    // SAFETY: a global the loader fills in; read as it is in the object.
    let host = unsafe { core::ptr::read_volatile(&raw const HOST_NETNS_COOKIE) };
    // SAFETY: a plain helper call on this program's context.
    host == 0 || unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) } == host
}

/// Stores `pair` in the socket's storage, making it on first use; false
/// when the kernel could not make it.
fn remember<A: SocketAddress>(ctx: &SockAddrContext, call: Call, pair: RevNatPair<A>) -> bool {
    // SAFETY: the helper reads the context's socket, which the kernel keeps
    // alive for the program's run.
    let storage = unsafe { A::sock_rev_nat().get_or_insert_ptr_mut(ctx, None) };
    // SAFETY: the kernel returns null or this socket's zero-initialised
    // value, which only this socket's programs touch.
    let Some(storage) = (unsafe { storage.as_mut() }) else {
        return false;
    };
    if call == Call::Connect {
        // A connected socket has one peer; whatever it sent before is over.
        *storage = SockRevNat {
            pairs: [
                pair,
                RevNatPair::default(),
                RevNatPair::default(),
                RevNatPair::default(),
            ],
            next: 0,
        };
        return true;
    }
    let mut free = None;
    for (i, held) in storage.pairs.iter_mut().enumerate() {
        if held.backend_addr_be.same(pair.backend_addr_be)
            && held.backend_port_be == pair.backend_port_be
        {
            *held = pair;
            return true;
        }
        if free.is_none() && held.backend_addr_be.same(A::default()) {
            free = Some(i);
        }
    }
    let i = free.unwrap_or_else(|| {
        record(Event::RevNatEvicted);
        let i = storage.next as usize % SOCK_REV_NAT_SLOTS;
        storage.next = storage.next.wrapping_add(1);
        i
    });
    if let Some(held) = storage.pairs.get_mut(i) {
        *held = pair;
    }
    true
}

/// A UDP socket translated before connects to an address that is no
/// Service: its peer is the one it named from now on, so what it was
/// translated from is over. Its replies and `getpeername` show their own
/// address, and it leaves the map of sockets to end (it talks to that
/// address on its own, even when that is a pod of the Service). Costs a
/// socket never translated one failed socket-storage lookup. Not for TCP,
/// whose connect on a connected socket fails (EISCONN) after this hook.
fn forget<A: SocketAddress>(ctx: &SockAddrContext) {
    // SAFETY: as in `reverse`: no storage is made.
    let storage = unsafe { A::sock_rev_nat().get_ptr_mut(ctx) };
    // SAFETY: null or this socket's value.
    let Some(storage) = (unsafe { storage.as_mut() }) else {
        return;
    };
    *storage = SockRevNat::default();
    // SAFETY: a plain helper call on this program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let _ = A::udp_connected().remove(cookie);
}

/// Rewrites a backend address seen by a socket back to the frontend that
/// socket asked for, so replies and `getpeername` show the Service.
pub fn reverse<A: SocketAddress>(ctx: &SockAddrContext) -> i32 {
    // SAFETY: as in `remember`, without making storage: a socket that was
    // never translated has none, and that is the common case.
    let storage = unsafe { A::sock_rev_nat().get_ptr_mut(ctx) };
    // SAFETY: null or this socket's value.
    let Some(storage) = (unsafe { storage.as_ref() }) else {
        return ALLOW;
    };
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let addr = unsafe { &mut *ctx.sock_addr };
    let port = user_port(addr);
    let ip = A::of(addr);
    for held in &storage.pairs {
        if held.backend_addr_be.same(ip) && held.backend_port_be == port {
            held.frontend_addr_be.write_to(addr);
            addr.user_port = u32::from(held.frontend_port_be);
            record(Event::Reversed);
            break;
        }
    }
    // recvmsg and getpeername hooks must always return 1.
    ALLOW
}
