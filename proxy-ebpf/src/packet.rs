//! IPv4 TCP and UDP headers as the tc programs read and rewrite them:
//! offsets, the four-tuple, and address and port rewrites that keep the
//! IP and L4 checksums right (UDP's "no checksum" zero included).
//!
//! Reads go through `bpf_skb_load_bytes` and writes through
//! `bpf_skb_store_bytes`, so no direct packet pointer has to be proven in
//! bounds, and a header the skb does not hold is just a failed load.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use proxy_common::{FlowKey, PROTO_TCP, PROTO_UDP};

/// `TC_ACT_OK`: let the packet go on. Spelt out here because the bindings
/// give it another integer type on each target.
pub const PASS: i32 = 0;
/// `TC_ACT_SHOT`: drop the packet.
pub const DROP: i32 = 2;

const ETH_HLEN: usize = 14;
/// `ETH_P_IP` as `skb->protocol` holds it (network byte order).
const ETH_P_IP_BE: u32 = 0x0008;
const IP_CSUM: usize = ETH_HLEN + 10;
const IP_SADDR: usize = ETH_HLEN + 12;
const IP_DADDR: usize = ETH_HLEN + 16;
/// The fragment offset and the more-fragments bit.
const IP_FRAGMENTED: u16 = 0x3fff;
const TCP_CSUM: usize = 16;
const UDP_CSUM: usize = 6;
const TCP_FLAGS: usize = 13;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

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
    l4: usize,
}

/// The side of the four-tuple a rewrite changes.
#[derive(Clone, Copy)]
pub enum Side {
    Source,
    Destination,
}

impl Packet {
    /// An unfragmented IPv4 TCP or UDP packet; `None` for anything else,
    /// which the programs pass untouched.
    #[expect(
        clippy::inline_always,
        reason = "each tc program calls it once per packet"
    )]
    #[inline(always)]
    pub fn parse(ctx: &TcContext) -> Option<Self> {
        if ctx.skb.protocol() != ETH_P_IP_BE {
            return None;
        }
        let version_ihl: u8 = ctx.load(ETH_HLEN).ok()?;
        if version_ihl >> 4 != 4 {
            return None;
        }
        // Fragments after the first carry no ports; the first alone cannot
        // be translated without the rest. Both pass as they are.
        let fragment: u16 = ctx.load(ETH_HLEN + 6).ok()?;
        if u16::from_be(fragment) & IP_FRAGMENTED != 0 {
            return None;
        }
        let proto: u8 = ctx.load(ETH_HLEN + 9).ok()?;
        if proto != PROTO_TCP && proto != PROTO_UDP {
            return None;
        }
        let l4 = ETH_HLEN + usize::from(version_ihl & 0x0f) * 4;
        let starts_tcp = proto == PROTO_TCP && {
            let flags: u8 = ctx.load(l4 + TCP_FLAGS).ok()?;
            flags & (TCP_SYN | TCP_ACK) == TCP_SYN
        };
        Some(Self {
            proto,
            saddr_be: ctx.load(IP_SADDR).ok()?,
            daddr_be: ctx.load(IP_DADDR).ok()?,
            sport_be: ctx.load(l4).ok()?,
            dport_be: ctx.load(l4 + 2).ok()?,
            starts_tcp,
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

    /// Rewrites one side's address and port, updating the IP checksum and
    /// the L4 checksum (which covers the addresses through the pseudo
    /// header). A UDP checksum of zero means "none" and stays zero.
    pub fn rewrite(&self, ctx: &TcContext, side: Side, addr_be: u32, port_be: u16) -> bool {
        let (addr_at, port_at, old_addr, old_port) = match side {
            Side::Source => (IP_SADDR, self.l4, self.saddr_be, self.sport_be),
            Side::Destination => (IP_DADDR, self.l4 + 2, self.daddr_be, self.dport_be),
        };
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
                .l3_csum_replace(IP_CSUM, u64::from(old_addr), u64::from(addr_be), 4)
                .is_ok()
            && ctx.store(addr_at, &addr_be, 0).is_ok()
            && ctx.store(port_at, &port_be, 0).is_ok()
    }
}
