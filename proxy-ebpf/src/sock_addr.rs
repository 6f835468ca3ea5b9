//! What differs between the families at the socket hooks: where the
//! address sits in the context, which frontends an address can name, and
//! how `run --trace` prints it. Everything else is `lb`'s, once.

use core::ptr;

use aya_ebpf::{bindings::bpf_sock_addr, programs::SockAddrContext};
use aya_log_ebpf::info;
use proxy_common::{
    COUNTED_BY_SOCKETS, Ip4, Ip6, RevNatPair, ServiceKey, ServiceValue, ipv4_mapped, mapped_ipv4,
};

use crate::{
    lb::{Call, Pick, pick},
    maps::FamilyMaps,
};

/// The address of a socket of one family, as its sock_addr programs see it.
pub trait SocketAddress: FamilyMaps {
    /// The address the system call names.
    fn of(addr: &bpf_sock_addr) -> Self;
    /// Makes the system call name this address instead.
    fn write_to(self, addr: &mut bpf_sock_addr);
    /// The backend for `frontend`, from the socket programs' table.
    fn choose(frontend: ServiceKey<Self>, client: impl FnOnce() -> u64) -> Pick<Self>;
    /// `run --trace`: a Service without endpoints refused the call. Without
    /// it the log level is 0, a constant the verifier prunes this with.
    fn trace_refused(ctx: &SockAddrContext, frontend: Self, port_be: u16);
    /// `run --trace`: the call was sent to a backend.
    fn trace_forwarded(ctx: &SockAddrContext, call: Call, pair: &RevNatPair<Self>);
}

const fn call_name(call: Call) -> &'static str {
    match call {
        Call::Connect => "connect",
        Call::Sendmsg => "sendmsg",
    }
}

impl SocketAddress for Ip4 {
    fn of(addr: &bpf_sock_addr) -> Self {
        addr.user_ip4
    }

    fn write_to(self, addr: &mut bpf_sock_addr) {
        addr.user_ip4 = self;
    }

    #[expect(
        clippy::inline_always,
        reason = "every hook calls it on its hot path, where a BPF-to-BPF call costs"
    )]
    #[inline(always)]
    fn choose(frontend: ServiceKey<Self>, client: impl FnOnce() -> u64) -> Pick<Self> {
        pick(Self::services(), frontend, COUNTED_BY_SOCKETS, client)
    }

    fn trace_refused(ctx: &SockAddrContext, frontend: Self, port_be: u16) {
        info!(
            ctx,
            "refused {:i}:{}: no endpoints",
            u32::from_be(frontend),
            u16::from_be(port_be)
        );
    }

    fn trace_forwarded(ctx: &SockAddrContext, call: Call, pair: &RevNatPair<Self>) {
        info!(
            ctx,
            "{} {:i}:{} -> {:i}:{}",
            call_name(call),
            u32::from_be(pair.frontend_addr_be),
            u16::from_be(pair.frontend_port_be),
            u32::from_be(pair.backend_addr_be),
            u16::from_be(pair.backend_port_be)
        );
    }
}

/// The octets of an IPv6 address, as aya-log prints them.
const fn octets(addr: Ip6) -> [u8; 16] {
    let [a, b, c, d] = [
        addr[0].to_ne_bytes(),
        addr[1].to_ne_bytes(),
        addr[2].to_ne_bytes(),
        addr[3].to_ne_bytes(),
    ];
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

impl SocketAddress for Ip6 {
    // Word by word: copied whole, the array becomes a `memcpy` that takes
    // the context's address, and the verifier allows only loads and
    // stores at the context's fields.
    fn of(addr: &bpf_sock_addr) -> Self {
        let ip = &addr.user_ip6;
        // SAFETY: reads of the context's own fields.
        unsafe {
            [
                ptr::read_volatile(&raw const ip[0]),
                ptr::read_volatile(&raw const ip[1]),
                ptr::read_volatile(&raw const ip[2]),
                ptr::read_volatile(&raw const ip[3]),
            ]
        }
    }

    fn write_to(self, addr: &mut bpf_sock_addr) {
        let ip = &mut addr.user_ip6;
        // SAFETY: writes to the context's own fields.
        unsafe {
            ptr::write_volatile(&raw mut ip[0], self[0]);
            ptr::write_volatile(&raw mut ip[1], self[1]);
            ptr::write_volatile(&raw mut ip[2], self[2]);
            ptr::write_volatile(&raw mut ip[3], self[3]);
        }
    }

    /// An IPv4-mapped address (`::ffff:10.96.0.10`, which dual-stack
    /// sockets of Java and Go use for IPv4 peers) names an IPv4 frontend:
    /// it is balanced over that frontend's backends, mapped again, as
    /// Cilium's sock6 hooks do.
    #[expect(
        clippy::inline_always,
        reason = "every hook calls it on its hot path, where a BPF-to-BPF call costs"
    )]
    #[inline(always)]
    fn choose(frontend: ServiceKey<Self>, client: impl FnOnce() -> u64) -> Pick<Self> {
        let Some(ip4) = mapped_ipv4(frontend.addr_be) else {
            return pick(Self::services(), frontend, COUNTED_BY_SOCKETS, client);
        };
        let frontend4 = ServiceKey::frontend(ip4, frontend.port_be, frontend.proto);
        match pick(Ip4::services(), frontend4, COUNTED_BY_SOCKETS, client) {
            Pick::NotService => Pick::NotService,
            Pick::NoBackends => Pick::NoBackends,
            Pick::Lost(event) => Pick::Lost(event),
            Pick::Backend { backend, flags } => Pick::Backend {
                backend: ServiceValue {
                    backend_id: backend.backend_id,
                    addr_be: ipv4_mapped(backend.addr_be),
                    port_be: backend.port_be,
                    count: backend.count,
                    flags: backend.flags,
                    pad: backend.pad,
                },
                flags,
            },
        }
    }

    fn trace_refused(ctx: &SockAddrContext, frontend: Self, port_be: u16) {
        info!(
            ctx,
            "refused [{:i}]:{}: no endpoints",
            octets(frontend),
            u16::from_be(port_be)
        );
    }

    fn trace_forwarded(ctx: &SockAddrContext, call: Call, pair: &RevNatPair<Self>) {
        info!(
            ctx,
            "{} [{:i}]:{} -> [{:i}]:{}",
            call_name(call),
            octets(pair.frontend_addr_be),
            u16::from_be(pair.frontend_port_be),
            octets(pair.backend_addr_be),
            u16::from_be(pair.backend_port_be)
        );
    }
}
