//! IPv4 TCP and UDP headers, and ICMP errors quoting them, as the tc
//! programs read and rewrite them: offsets, the four-tuple, and address and
//! port rewrites that keep the IP, L4 and ICMP checksums right (UDP's "no
//! checksum" zero included).
//!
//! Reads go through `bpf_skb_load_bytes` and writes through
//! `bpf_skb_store_bytes`, so no direct packet pointer has to be proven in
//! bounds, and a header the skb does not hold is just a failed load.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use proxy_common::{FlowKey, PROTO_ICMP, PROTO_TCP, PROTO_UDP};

/// `TC_ACT_OK`: let the packet go on. Spelt out here because the bindings
/// give it another integer type on each target.
pub const PASS: i32 = 0;
/// `TC_ACT_SHOT`: drop the packet.
pub const DROP: i32 = 2;

const ETH_HLEN: usize = 14;
/// `ETH_P_IP` as `skb->protocol` holds it (network byte order).
const ETH_P_IP_BE: u32 = 0x0008;
/// Offsets in an IPv4 header.
const IP_CSUM: usize = 10;
const IP_SADDR: usize = 12;
const IP_DADDR: usize = 16;
/// The fragment offset and the more-fragments bit.
const IP_FRAGMENTED: u16 = 0x3fff;
const TCP_CSUM: usize = 16;
const UDP_CSUM: usize = 6;
const TCP_FLAGS: usize = 13;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
/// The ICMP header before the quoted packet: type, code, checksum, and
/// four bytes that depend on the type (the next hop's MTU, for one).
const ICMP_HLEN: usize = 8;
const ICMP_CSUM: usize = 2;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;

/// What the tc programs look at.
pub enum Parsed {
    /// A TCP or UDP packet.
    Flow(Packet),
    /// An ICMP error about a TCP or UDP packet.
    IcmpError(IcmpError),
}

/// The parts of a packet the translation reads. Addresses and ports in
/// network byte order, as the maps hold them.
pub struct Packet {
    pub proto: u8,
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    /// A TCP SYN without ACK: the only packet that may start a TCP flow.
    pub starts_tcp: bool,
    l3: usize,
    l4: usize,
}

/// An ICMP error (destination unreachable, time exceeded) and the packet it
/// quotes: the packet's IP header and at least the first eight bytes of
/// its TCP or UDP header (RFC 792), ports included.
pub struct IcmpError {
    /// The quoted packet, as it was sent: it went the other way.
    pub quoted: Packet,
    saddr_be: u32,
    daddr_be: u32,
    icmp: usize,
}

/// The side of the four-tuple a rewrite changes.
#[derive(Clone, Copy)]
pub enum Side {
    Source,
    Destination,
}

/// Parses an unfragmented IPv4 TCP or UDP packet, or an ICMP error about
/// one; `None` for anything else, which the programs pass untouched.
#[expect(
    clippy::inline_always,
    reason = "each tc program calls it once per packet"
)]
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Option<Parsed> {
    if ctx.skb.protocol() != ETH_P_IP_BE {
        return None;
    }
    let (proto, l4) = ipv4_header(ctx, ETH_HLEN)?;
    match proto {
        PROTO_TCP | PROTO_UDP => Packet::read(ctx, proto, ETH_HLEN, l4, true).map(Parsed::Flow),
        PROTO_ICMP => {
            let kind: u8 = ctx.load(l4).ok()?;
            if kind != ICMP_DEST_UNREACH && kind != ICMP_TIME_EXCEEDED {
                return None;
            }
            let quoted_l3 = l4 + ICMP_HLEN;
            let (quoted_proto, quoted_l4) = ipv4_header(ctx, quoted_l3)?;
            if quoted_proto != PROTO_TCP && quoted_proto != PROTO_UDP {
                return None;
            }
            Some(Parsed::IcmpError(IcmpError {
                // The quote may end after the ports: no TCP flags.
                quoted: Packet::read(ctx, quoted_proto, quoted_l3, quoted_l4, false)?,
                saddr_be: ctx.load(ETH_HLEN + IP_SADDR).ok()?,
                daddr_be: ctx.load(ETH_HLEN + IP_DADDR).ok()?,
                icmp: l4,
            }))
        }
        _ => None,
    }
}

/// The protocol and L4 offset of the IPv4 header at `l3`, unless it is a
/// fragment: fragments after the first carry no ports, and the first alone
/// cannot be translated without the rest. Both pass as they are.
#[expect(
    clippy::inline_always,
    reason = "each tc program calls it once or twice per packet"
)]
#[inline(always)]
fn ipv4_header(ctx: &TcContext, l3: usize) -> Option<(u8, usize)> {
    let version_ihl: u8 = ctx.load(l3).ok()?;
    if version_ihl >> 4 != 4 {
        return None;
    }
    let fragment: u16 = ctx.load(l3 + 6).ok()?;
    if u16::from_be(fragment) & IP_FRAGMENTED != 0 {
        return None;
    }
    let proto: u8 = ctx.load(l3 + 9).ok()?;
    Some((proto, l3 + usize::from(version_ihl & 0x0f) * 4))
}

impl Packet {
    #[expect(
        clippy::inline_always,
        reason = "each tc program calls it once or twice per packet"
    )]
    #[inline(always)]
    fn read(ctx: &TcContext, proto: u8, l3: usize, l4: usize, tcp_flags: bool) -> Option<Self> {
        let starts_tcp = tcp_flags && proto == PROTO_TCP && {
            let flags: u8 = ctx.load(l4 + TCP_FLAGS).ok()?;
            flags & (TCP_SYN | TCP_ACK) == TCP_SYN
        };
        Some(Self {
            proto,
            saddr_be: ctx.load(l3 + IP_SADDR).ok()?,
            daddr_be: ctx.load(l3 + IP_DADDR).ok()?,
            sport_be: ctx.load(l4).ok()?,
            dport_be: ctx.load(l4 + 2).ok()?,
            starts_tcp,
            l3,
            l4,
        })
    }

    /// The flow table's key for this packet as it is on the wire, looked
    /// at in `direction` (`FLOW_FORWARD` on the way in, `FLOW_REPLY` on the
    /// way out).
    pub const fn flow_key(&self, direction: u8) -> FlowKey {
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
    pub const fn answered_flow_key(&self, direction: u8) -> FlowKey {
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

    const fn side(&self, side: Side) -> (usize, usize, u32, u16) {
        match side {
            Side::Source => (self.l3 + IP_SADDR, self.l4, self.saddr_be, self.sport_be),
            Side::Destination => (
                self.l3 + IP_DADDR,
                self.l4 + 2,
                self.daddr_be,
                self.dport_be,
            ),
        }
    }

    /// Rewrites one side's address and port, updating the IP checksum and
    /// the L4 checksum (which covers the addresses through the pseudo
    /// header). A UDP checksum of zero means "none" and stays zero.
    pub fn rewrite(&self, ctx: &TcContext, side: Side, addr_be: u32, port_be: u16) -> bool {
        let (addr_at, port_at, old_addr, old_port) = self.side(side);
        let (csum_at, mangled) = if self.proto == PROTO_TCP {
            (self.l4 + TCP_CSUM, 0)
        } else {
            (self.l4 + UDP_CSUM, u64::from(BPF_F_MARK_MANGLED_0))
        };
        let pseudo = u64::from(BPF_F_PSEUDO_HDR);
        ctx.l4_csum_replace(
            csum_at,
            u64::from(old_addr),
            u64::from(addr_be),
            pseudo | mangled | 4,
        )
        .is_ok()
            && ctx
                .l4_csum_replace(
                    csum_at,
                    u64::from(old_port),
                    u64::from(port_be),
                    mangled | 2,
                )
                .is_ok()
            && ctx
                .l3_csum_replace(
                    self.l3 + IP_CSUM,
                    u64::from(old_addr),
                    u64::from(addr_be),
                    4,
                )
                .is_ok()
            && ctx.store(addr_at, &addr_be, 0).is_ok()
            && ctx.store(port_at, &port_be, 0).is_ok()
    }
}

impl IcmpError {
    /// Rewrites one side of the quoted packet, and the outer header's
    /// other side where it named the same address: an error about a packet
    /// goes back to that packet's source. The quoted packet's own L4
    /// checksum is left alone, as receivers do not check it and the quote
    /// may not even hold it.
    pub fn rewrite(&self, ctx: &TcContext, side: Side, addr_be: u32, port_be: u16) -> bool {
        let (addr_at, port_at, old_addr, old_port) = self.quoted.side(side);
        let (outer_at, outer_old) = match side {
            Side::Source => (ETH_HLEN + IP_DADDR, self.daddr_be),
            Side::Destination => (ETH_HLEN + IP_SADDR, self.saddr_be),
        };
        // The ICMP checksum covers the quote. The quoted IP header's
        // checksum moves by exactly what its address does, so of the two
        // only the port changes that sum.
        ctx.l4_csum_replace(
            self.icmp + ICMP_CSUM,
            u64::from(old_port),
            u64::from(port_be),
            2,
        )
        .is_ok()
            && ctx
                .l3_csum_replace(
                    self.quoted.l3 + IP_CSUM,
                    u64::from(old_addr),
                    u64::from(addr_be),
                    4,
                )
                .is_ok()
            && ctx.store(addr_at, &addr_be, 0).is_ok()
            && ctx.store(port_at, &port_be, 0).is_ok()
            && (outer_old != old_addr
                || ctx
                    .l3_csum_replace(
                        ETH_HLEN + IP_CSUM,
                        u64::from(outer_old),
                        u64::from(addr_be),
                        4,
                    )
                    .is_ok()
                    && ctx.store(outer_at, &addr_be, 0).is_ok())
    }
}
