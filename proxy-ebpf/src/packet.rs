//! TCP and UDP headers over IPv4 or IPv6, and ICMP or ICMPv6 errors
//! quoting them, as the tc programs read and rewrite them: offsets, the
//! four-tuple, and address and port rewrites that keep the IP, L4 and ICMP
//! checksums right (UDP's "no checksum" zero included).
//!
//! One implementation for both families; what differs (the IP header, which
//! checksums cover an address, which ICMP types are errors) is the
//! [`Family`] trait's, with an impl for each.
//!
//! Reads are direct, from windows of the packet checked against its end
//! (see [`window`]); writes go through `bpf_skb_store_bytes` and the
//! checksum helpers, which keep the skb's checksum state right.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::bpf_csum_diff,
    programs::TcContext,
};
use proxy_common::{Event, FlowKey, Ip4, Ip6, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};

use crate::maps::{FamilyMaps, record};

/// `TC_ACT_OK`: let the packet go on. Spelt out here because the bindings
/// give it another integer type on each target.
pub const PASS: i32 = 0;
/// `TC_ACT_SHOT`: drop the packet.
pub const DROP: i32 = 2;

const ETH_HLEN: usize = 14;
/// `ETH_P_IP` as `skb->protocol` holds it (network byte order).
pub const ETH_P_IP_BE: u32 = 0x0008;
/// `ETH_P_IPV6` as `skb->protocol` holds it.
pub const ETH_P_IPV6_BE: u32 = 0xdd86;
/// Offsets in an IPv4 header.
const IP_CSUM: usize = 10;
/// The fragment offset and the more-fragments bit.
const IP_FRAGMENTED: u16 = 0x3fff;
/// The IPv6 header: fixed size, the next header at 6.
const IPV6_HLEN: usize = 40;
/// The IPv4 header without options: what the programs read of it.
const IPV4_HLEN: usize = 20;
/// Source and destination port, the first four bytes of TCP and UDP.
const PORTS_LEN: usize = 4;
const IPV6_NEXT_HEADER: usize = 6;
const TCP_CSUM: usize = 16;
const UDP_CSUM: usize = 6;
const TCP_FLAGS: usize = 13;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
/// The ICMP (and ICMPv6) header before the quoted packet: type, code,
/// checksum, and four bytes that depend on the type (the next hop's MTU,
/// for one).
const ICMP_HLEN: usize = 8;
const ICMP_CSUM: usize = 2;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
const ICMPV6_TIME_EXCEEDED: u8 = 3;
/// `BPF_F_IPV6` (Linux 6.16), not in the bindings yet: a pseudo-header
/// change of an IPv6 packet leaves a `CHECKSUM_COMPLETE` skb's sum alone,
/// since no header checksum absorbs the address change the way IPv4's
/// does. Older kernels refuse the flag (EINVAL) and are asked again
/// without it.
const BPF_F_IPV6: u64 = 1 << 7;

/// The start of `len` bytes at `offset` of the packet, straight in its
/// linear data: the skb's headers are pulled in first when they are not
/// (rarely: the stack keeps headers linear). Reading fields from there
/// costs a load each, where `bpf_skb_load_bytes` cost a helper call each,
/// which was most of what a packet cost the programs. `len` is a constant
/// at every call, so the verifier sees the bound.
#[expect(
    clippy::inline_always,
    reason = "a few windows per packet; a call each would cost more than the reads"
)]
#[inline(always)]
fn window(ctx: &TcContext, offset: usize, len: usize) -> Option<usize> {
    let start = ctx.data() + offset;
    if start + len <= ctx.data_end() {
        return Some(start);
    }
    #[expect(
        clippy::cast_possible_truncation,
        reason = "headers end far below 4 GiB"
    )]
    ctx.pull_data((offset + len) as u32).ok()?;
    let start = ctx.data() + offset;
    (start + len <= ctx.data_end()).then_some(start)
}

/// A `T` at `at`, an address within a [`window`].
#[expect(clippy::inline_always, reason = "one load; a call would cost more")]
#[inline(always)]
fn read<T: Copy>(at: usize) -> T {
    // SAFETY: the callers read within a window checked against the
    // packet's end; packet data may be read unaligned.
    unsafe { core::ptr::read_unaligned(at as *const T) }
}

/// What the tc programs look at.
pub enum Parsed<A: Family> {
    /// A TCP or UDP packet.
    Flow(Packet<A>),
    /// An ICMP error about a TCP or UDP packet.
    /// An ICMP error, at this offset: [`icmp_error`] reads what it quotes,
    /// apart, so that the flows' path does not carry the quote's stack.
    IcmpError(usize),
}

/// The parts of a packet the translation reads. Addresses and ports in
/// network byte order, as the maps hold them.
pub struct Packet<A: Family> {
    pub proto: u8,
    pub saddr_be: A,
    pub daddr_be: A,
    pub sport_be: u16,
    pub dport_be: u16,
    /// A TCP SYN without ACK: the only packet that may start a TCP flow.
    pub starts_tcp: bool,
    l3: usize,
    l4: usize,
}

/// An ICMP error (destination unreachable, time exceeded, packet too big)
/// and the packet it quotes: the packet's IP header and at least the first
/// eight bytes of its TCP or UDP header (RFC 792, RFC 4443), ports
/// included.
pub struct IcmpError<A: Family> {
    /// The quoted packet, as it was sent: it went the other way.
    pub quoted: Packet<A>,
    saddr_be: A,
    daddr_be: A,
    icmp: usize,
}

/// The side of the four-tuple a rewrite changes.
#[derive(Clone, Copy)]
pub enum Side {
    Source,
    Destination,
}

/// What differs between IPv4 and IPv6 packets.
pub trait Family: FamilyMaps {
    /// Offsets of the addresses in the IP header.
    const SADDR: usize;
    const DADDR: usize;
    /// The fixed header's length, which holds both addresses.
    const HLEN: usize;
    /// The address at `at`, within a [`window`].
    fn read_addr(at: usize) -> Self;
    /// ICMP or ICMPv6.
    const PROTO_ICMP: u8;
    /// The protocol and L4 offset of the IP header at `l3`, for a packet
    /// the programs can translate.
    fn header(ctx: &TcContext, l3: usize) -> Option<(u8, usize)>;
    /// An ICMP type that quotes the packet it is about.
    fn is_icmp_error(kind: u8) -> bool;
    /// Moves the IP header's checksum at `l3` with an address change.
    fn header_csum(ctx: &TcContext, l3: usize, old: Self, new: Self) -> bool;
    /// Moves the L4 checksum at `csum_at` with an address change in the
    /// pseudo header; `flags` adds to the helper's.
    fn pseudo_csum(ctx: &TcContext, csum_at: usize, old: Self, new: Self, flags: u64) -> bool;
    /// Keeps an ICMP error's sums right when an address of its quote
    /// changes.
    fn quoted_csum(
        ctx: &TcContext,
        quoted_l3: usize,
        icmp_csum: usize,
        old: Self,
        new: Self,
    ) -> bool;
    /// Keeps an ICMP error's sums right when its own outer address
    /// changes.
    fn outer_csum(ctx: &TcContext, icmp_csum: usize, old: Self, new: Self) -> bool;
}

impl Family for Ip4 {
    const SADDR: usize = 12;
    const DADDR: usize = 16;
    const HLEN: usize = IPV4_HLEN;

    fn read_addr(at: usize) -> Self {
        read(at)
    }
    const PROTO_ICMP: u8 = PROTO_ICMP;

    /// Unless it is a fragment: fragments after the first carry no ports,
    /// and the first alone cannot be translated without the rest. Both
    /// pass as they are.
    #[expect(
        clippy::inline_always,
        reason = "each tc program calls it once or twice per packet"
    )]
    #[inline(always)]
    fn header(ctx: &TcContext, l3: usize) -> Option<(u8, usize)> {
        let ip = window(ctx, l3, IPV4_HLEN)?;
        let version_ihl: u8 = read(ip);
        if version_ihl >> 4 != 4 {
            return None;
        }
        let fragment: u16 = read(ip + 6);
        if u16::from_be(fragment) & IP_FRAGMENTED != 0 {
            return None;
        }
        let proto: u8 = read(ip + 9);
        Some((proto, l3 + usize::from(version_ihl & 0x0f) * 4))
    }

    fn is_icmp_error(kind: u8) -> bool {
        kind == ICMP_DEST_UNREACH || kind == ICMP_TIME_EXCEEDED
    }

    fn header_csum(ctx: &TcContext, l3: usize, old: Self, new: Self) -> bool {
        ctx.l3_csum_replace(l3 + IP_CSUM, u64::from(old), u64::from(new), 4)
            .is_ok()
    }

    fn pseudo_csum(ctx: &TcContext, csum_at: usize, old: Self, new: Self, flags: u64) -> bool {
        let flags = flags | u64::from(BPF_F_PSEUDO_HDR) | 4;
        ctx.l4_csum_replace(csum_at, u64::from(old), u64::from(new), flags)
            .is_ok()
    }

    /// The ICMP checksum covers the quote, but the quoted IP header's
    /// checksum moves by exactly what its address does: of the two only
    /// that checksum changes.
    fn quoted_csum(
        ctx: &TcContext,
        quoted_l3: usize,
        _icmp_csum: usize,
        old: Self,
        new: Self,
    ) -> bool {
        Self::header_csum(ctx, quoted_l3, old, new)
    }

    /// The ICMP checksum does not cover the IP header.
    fn outer_csum(ctx: &TcContext, _icmp_csum: usize, old: Self, new: Self) -> bool {
        Self::header_csum(ctx, ETH_HLEN, old, new)
    }
}

/// The checksum difference of an IPv6 address change, for one
/// `bpf_l4_csum_replace` (Cilium's `csum_diff` of two `in6_addr`s).
#[expect(
    clippy::inline_always,
    reason = "a call keeps its stack apart from the caller's, past the verifier's 512 bytes"
)]
#[inline(always)]
fn ipv6_diff(old: Ip6, new: Ip6) -> Option<u64> {
    let (mut old, mut new) = (old, new);
    // SAFETY: two 16-byte buffers on this program's stack.
    let diff = unsafe { bpf_csum_diff(old.as_mut_ptr(), 16, new.as_mut_ptr(), 16, 0) };
    // A negative value is an error; the sum is the low 32 bits.
    u32::try_from(diff & 0xffff_ffff)
        .ok()
        .filter(|_| diff >= 0)
        .map(u64::from)
}

/// Adds `diff` to the checksum at `at`: with `BPF_F_IPV6` where the kernel
/// knows it.
#[expect(
    clippy::inline_always,
    reason = "a call keeps its stack apart from the caller's, past the verifier's 512 bytes"
)]
#[inline(always)]
fn replace_by_diff(ctx: &TcContext, at: usize, diff: u64, flags: u64) -> bool {
    ctx.l4_csum_replace(at, 0, diff, flags | BPF_F_IPV6).is_ok()
        || ctx.l4_csum_replace(at, 0, diff, flags).is_ok()
}

impl Family for Ip6 {
    const SADDR: usize = 8;
    const DADDR: usize = 24;
    const HLEN: usize = IPV6_HLEN;

    /// Word by word, into registers: read whole, the address goes
    /// through a stack copy, on the IPv6 path's full stack.
    fn read_addr(at: usize) -> Self {
        [read(at), read(at + 4), read(at + 8), read(at + 12)]
    }
    const PROTO_ICMP: u8 = PROTO_ICMPV6;

    /// Only when TCP, UDP or ICMPv6 follows the fixed header at once: a
    /// packet with extension headers (a fragment among them) passes as it
    /// is, counted, since walking the chain costs every packet.
    #[expect(
        clippy::inline_always,
        reason = "each tc program calls it once or twice per packet"
    )]
    #[inline(always)]
    fn header(ctx: &TcContext, l3: usize) -> Option<(u8, usize)> {
        let ip = window(ctx, l3, IPV6_HLEN)?;
        let version: u8 = read(ip);
        if version >> 4 != 6 {
            return None;
        }
        let next: u8 = read(ip + IPV6_NEXT_HEADER);
        match next {
            PROTO_TCP | PROTO_UDP | PROTO_ICMPV6 => Some((next, l3 + IPV6_HLEN)),
            // Hop-by-hop, routing, fragment, ESP, AH, destination options,
            // mobility, HIP, shim6, and the two for experiments.
            0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140 | 253 | 254 => {
                record(Event::Ipv6ExtHeaderPassed);
                None
            }
            _ => None,
        }
    }

    fn is_icmp_error(kind: u8) -> bool {
        kind == ICMPV6_DEST_UNREACH || kind == ICMPV6_PACKET_TOO_BIG || kind == ICMPV6_TIME_EXCEEDED
    }

    /// IPv6 has no header checksum.
    fn header_csum(_ctx: &TcContext, _l3: usize, _old: Self, _new: Self) -> bool {
        true
    }

    fn pseudo_csum(ctx: &TcContext, csum_at: usize, old: Self, new: Self, flags: u64) -> bool {
        ipv6_diff(old, new).is_some_and(|diff| {
            replace_by_diff(ctx, csum_at, diff, flags | u64::from(BPF_F_PSEUDO_HDR))
        })
    }

    /// No header checksum absorbs the change: the ICMPv6 checksum, which
    /// covers the quote, moves with it.
    fn quoted_csum(
        ctx: &TcContext,
        _quoted_l3: usize,
        icmp_csum: usize,
        old: Self,
        new: Self,
    ) -> bool {
        ipv6_diff(old, new).is_some_and(|diff| ctx.l4_csum_replace(icmp_csum, 0, diff, 0).is_ok())
    }

    /// Unlike ICMP's, the ICMPv6 checksum covers a pseudo header with
    /// both addresses.
    fn outer_csum(ctx: &TcContext, icmp_csum: usize, old: Self, new: Self) -> bool {
        Self::pseudo_csum(ctx, icmp_csum, old, new, 0)
    }
}

/// Parses a TCP or UDP packet of family `A` that the programs can
/// translate, or an ICMP error about one; `None` for anything else, which
/// the programs pass untouched. The caller has checked `skb->protocol`.
#[expect(
    clippy::inline_always,
    reason = "each tc program calls it once per packet"
)]
#[inline(always)]
pub fn parse<A: Family>(ctx: &TcContext) -> Option<Parsed<A>> {
    let (proto, l4) = A::header(ctx, ETH_HLEN)?;
    match proto {
        PROTO_TCP | PROTO_UDP => Packet::read(ctx, proto, ETH_HLEN, l4, true).map(Parsed::Flow),
        _ if proto == A::PROTO_ICMP => {
            let kind: u8 = read(window(ctx, l4, ICMP_HLEN)?);
            A::is_icmp_error(kind).then_some(Parsed::IcmpError(l4))
        }
        _ => None,
    }
}

/// The ICMP error at `l4` (see [`Parsed::IcmpError`]), if it quotes a TCP
/// or UDP packet the programs can translate.
#[expect(
    clippy::inline_always,
    reason = "each tc program's ICMP path calls it once"
)]
#[inline(always)]
pub fn icmp_error<A: Family>(ctx: &TcContext, l4: usize) -> Option<IcmpError<A>> {
    let quoted_l3 = l4 + ICMP_HLEN;
    let (quoted_proto, quoted_l4) = A::header(ctx, quoted_l3)?;
    if quoted_proto != PROTO_TCP && quoted_proto != PROTO_UDP {
        return None;
    }
    // The quote may end after the ports: no TCP flags.
    let quoted = Packet::read(ctx, quoted_proto, quoted_l3, quoted_l4, false)?;
    let ip = window(ctx, ETH_HLEN, A::HLEN)?;
    Some(IcmpError {
        quoted,
        saddr_be: A::read_addr(ip + A::SADDR),
        daddr_be: A::read_addr(ip + A::DADDR),
        icmp: l4,
    })
}

impl<A: Family> Packet<A> {
    #[expect(
        clippy::inline_always,
        reason = "each tc program calls it once or twice per packet"
    )]
    #[inline(always)]
    fn read(ctx: &TcContext, proto: u8, l3: usize, l4: usize, tcp_flags: bool) -> Option<Self> {
        // The ports first: the flags' window may pull the skb, which moves
        // its data.
        let ports = window(ctx, l4, PORTS_LEN)?;
        let (sport_be, dport_be) = (read(ports), read(ports + 2));
        let starts_tcp = tcp_flags && proto == PROTO_TCP && {
            let flags: u8 = read(window(ctx, l4, TCP_FLAGS + 1)? + TCP_FLAGS);
            flags & (TCP_SYN | TCP_ACK) == TCP_SYN
        };
        let ip = window(ctx, l3, A::HLEN)?;
        Some(Self {
            proto,
            saddr_be: A::read_addr(ip + A::SADDR),
            daddr_be: A::read_addr(ip + A::DADDR),
            sport_be,
            dport_be,
            starts_tcp,
            l3,
            l4,
        })
    }

    /// The flow table's key for this packet as it is on the wire, looked
    /// at in `direction` (`FLOW_FORWARD` on the way in, `FLOW_REPLY` on the
    /// way out).
    pub const fn flow_key(&self, direction: u8) -> FlowKey<A> {
        FlowKey {
            saddr_be: self.saddr_be,
            daddr_be: self.daddr_be,
            sport_be: self.sport_be,
            dport_be: self.dport_be,
            proto: self.proto,
            direction,
            pad: [0; 2],
        }
    }

    /// The key of the flow this packet answers, in `direction`: a quoted
    /// reply names its flow's forward entry, a quoted forward packet its
    /// flow's reply entry.
    pub const fn answered_flow_key(&self, direction: u8) -> FlowKey<A> {
        FlowKey {
            saddr_be: self.daddr_be,
            daddr_be: self.saddr_be,
            sport_be: self.dport_be,
            dport_be: self.sport_be,
            proto: self.proto,
            direction,
            pad: [0; 2],
        }
    }

    const fn side(&self, side: Side) -> (usize, usize, A, u16) {
        match side {
            Side::Source => (self.l3 + A::SADDR, self.l4, self.saddr_be, self.sport_be),
            Side::Destination => (
                self.l3 + A::DADDR,
                self.l4 + 2,
                self.daddr_be,
                self.dport_be,
            ),
        }
    }

    /// Rewrites one side's address and port, updating the IP checksum and
    /// the L4 checksum (which covers the addresses through the pseudo
    /// header). A UDP checksum of zero means "none" over IPv4 and stays
    /// zero; one that comes out zero is sent as 0xffff, as over IPv6 zero
    /// is not allowed.
    #[expect(
        clippy::inline_always,
        reason = "a call keeps its stack apart from the caller's, past the verifier's 512 bytes"
    )]
    #[inline(always)]
    pub fn rewrite(&self, ctx: &TcContext, side: Side, addr_be: A, port_be: u16) -> bool {
        let (addr_at, port_at, old_addr, old_port) = self.side(side);
        let (csum_at, mangled) = if self.proto == PROTO_TCP {
            (self.l4 + TCP_CSUM, 0)
        } else {
            (self.l4 + UDP_CSUM, u64::from(BPF_F_MARK_MANGLED_0))
        };
        A::pseudo_csum(ctx, csum_at, old_addr, addr_be, mangled)
            && ctx
                .l4_csum_replace(
                    csum_at,
                    u64::from(old_port),
                    u64::from(port_be),
                    mangled | 2,
                )
                .is_ok()
            && A::header_csum(ctx, self.l3, old_addr, addr_be)
            && ctx.store(addr_at, &addr_be, 0).is_ok()
            && ctx.store(port_at, &port_be, 0).is_ok()
    }
}

impl<A: Family> IcmpError<A> {
    /// Rewrites one side of the quoted packet, and the outer header's
    /// other side where it named the same address: an error about a packet
    /// goes back to that packet's source. The quoted packet's own L4
    /// checksum is left alone, as receivers do not check it and the quote
    /// may not even hold it.
    #[expect(
        clippy::inline_always,
        reason = "a call keeps its stack apart from the caller's, past the verifier's 512 bytes"
    )]
    #[inline(always)]
    pub fn rewrite(&self, ctx: &TcContext, side: Side, addr_be: A, port_be: u16) -> bool {
        let (addr_at, port_at, old_addr, old_port) = self.quoted.side(side);
        let (outer_at, outer_old) = match side {
            Side::Source => (ETH_HLEN + A::DADDR, self.daddr_be),
            Side::Destination => (ETH_HLEN + A::SADDR, self.saddr_be),
        };
        let icmp_csum = self.icmp + ICMP_CSUM;
        ctx.l4_csum_replace(icmp_csum, u64::from(old_port), u64::from(port_be), 2)
            .is_ok()
            && A::quoted_csum(ctx, self.quoted.l3, icmp_csum, old_addr, addr_be)
            && ctx.store(addr_at, &addr_be, 0).is_ok()
            && ctx.store(port_at, &port_be, 0).is_ok()
            && (!outer_old.same(old_addr)
                || A::outer_csum(ctx, icmp_csum, outer_old, addr_be)
                    && ctx.store(outer_at, &addr_be, 0).is_ok())
    }
}
