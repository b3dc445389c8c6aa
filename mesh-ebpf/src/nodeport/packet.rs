//! Parsing, rewriting and routing the packets of translated flows.

use aya_ebpf::{
    bindings::{
        BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, bpf_fib_lookup,
    },
    helpers::bpf_redirect_neigh,
    programs::TcContext,
};
use mesh_common::{
    PROTO_TCP, PROTO_UDP,
    nodeport::{FlowKey, NatEntry, is_client_syn},
};

use super::count::count;

pub const ETH_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
pub const IP_OFF: usize = ETH_LEN;
pub const IP_CHECK: usize = IP_OFF + 10;
pub const IP_SADDR: usize = IP_OFF + 12;
pub const IP_DADDR: usize = IP_OFF + 16;
/// Only 20-byte IPv4 headers are translated, so the L4 header is at a fixed offset.
pub const L4_OFF: usize = IP_OFF + 20;
const TCP_CHECK: usize = L4_OFF + 16;
const TCP_SEQ: usize = L4_OFF + 4;
const TCP_FLAGS: usize = L4_OFF + 13;
const UDP_CHECK: usize = L4_OFF + 6;
const AF_INET: u8 = 2;

/// An IPv4 TCP/UDP packet's 5-tuple, its TCP flags (0 for UDP) and its length.
pub struct Packet {
    pub key: FlowKey,
    pub tcp_flags: u8,
    /// The sequence number (host order) of a client's SYN; 0 for any other packet.
    pub syn_seq: u32,
    pub len: u32,
}

/// The IP protocol of an unfragmented IPv4 packet with a 20-byte header; None for anything
/// else (which passes untouched).
#[inline(always)]
pub fn ipv4_proto(ctx: &TcContext) -> Option<u8> {
    let ethertype: u16 = ctx.load(12).ok()?;
    if ethertype != ETH_P_IP.to_be() {
        return None;
    }
    let ver_ihl: u8 = ctx.load(IP_OFF).ok()?;
    if ver_ihl != 0x45 {
        return None;
    }
    // More-fragments flag or a fragment offset: only unfragmented packets carry both ports.
    let frag: u16 = ctx.load(IP_OFF + 6).ok()?;
    if u16::from_be(frag) & 0x3fff != 0 {
        return None;
    }
    ctx.load(IP_OFF + 9).ok()
}

/// A TCP or UDP packet of `proto` (from `ipv4_proto`).
#[inline(always)]
pub fn parse(ctx: &TcContext, proto: u8) -> Option<Packet> {
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    let saddr: [u8; 4] = ctx.load(IP_SADDR).ok()?;
    let daddr: [u8; 4] = ctx.load(IP_DADDR).ok()?;
    let sport: u16 = ctx.load(L4_OFF).ok()?;
    let dport: u16 = ctx.load(L4_OFF + 2).ok()?;
    let tcp_flags = if proto == PROTO_TCP {
        ctx.load(TCP_FLAGS).ok()?
    } else {
        0
    };
    let syn_seq = if proto == PROTO_TCP && is_client_syn(tcp_flags) {
        u32::from_be(ctx.load(TCP_SEQ).ok()?)
    } else {
        0
    };
    Some(Packet {
        key: FlowKey {
            saddr,
            daddr,
            sport: u16::from_be(sport),
            dport: u16::from_be(dport),
            proto,
            _pad: [0; 3],
        },
        tcp_flags,
        syn_seq,
        len: ctx.len(),
    })
}

/// Rewrites the packet's addresses and ports to the entry's, with the checksums fixed
/// incrementally (the L4 checksum covers the addresses through the pseudo header).
#[inline(always)]
pub fn rewrite(ctx: &TcContext, pkt: &Packet, to: &NatEntry) -> Result<(), i64> {
    let (check, mangled) = if pkt.key.proto == PROTO_TCP {
        (TCP_CHECK, 0)
    } else {
        // A UDP checksum of 0 means "none" and stays 0.
        (UDP_CHECK, u64::from(BPF_F_MARK_MANGLED_0))
    };
    let pseudo = u64::from(BPF_F_PSEUDO_HDR) | mangled;
    if to.to_saddr != pkt.key.saddr {
        rewrite_addr(ctx, IP_SADDR, pkt.key.saddr, to.to_saddr)?;
        l4_addr(ctx, check, pseudo, pkt.key.saddr, to.to_saddr)?;
    }
    if to.to_daddr != pkt.key.daddr {
        rewrite_addr(ctx, IP_DADDR, pkt.key.daddr, to.to_daddr)?;
        l4_addr(ctx, check, pseudo, pkt.key.daddr, to.to_daddr)?;
    }
    if to.to_sport != pkt.key.sport {
        let new = to.to_sport.to_be();
        ctx.store(L4_OFF, &new, 0)?;
        ctx.l4_csum_replace(
            check,
            u64::from(pkt.key.sport.to_be()),
            u64::from(new),
            mangled | 2,
        )?;
    }
    if to.to_dport != pkt.key.dport {
        let new = to.to_dport.to_be();
        ctx.store(L4_OFF + 2, &new, 0)?;
        ctx.l4_csum_replace(
            check,
            u64::from(pkt.key.dport.to_be()),
            u64::from(new),
            mangled | 2,
        )?;
    }
    Ok(())
}

/// Writes an IPv4 address of the header at `off` and fixes the header checksum.
#[inline(always)]
pub fn rewrite_addr(ctx: &TcContext, off: usize, from: [u8; 4], to: [u8; 4]) -> Result<(), i64> {
    ctx.store(off, &to, 0)?;
    ctx.l3_csum_replace(
        IP_CHECK,
        u64::from(u32::from_ne_bytes(from)),
        u64::from(u32::from_ne_bytes(to)),
        4,
    )
}

#[inline(always)]
fn l4_addr(
    ctx: &TcContext,
    check: usize,
    flags: u64,
    from: [u8; 4],
    to: [u8; 4],
) -> Result<(), i64> {
    ctx.l4_csum_replace(
        check,
        u64::from(u32::from_ne_bytes(from)),
        u64::from(u32::from_ne_bytes(to)),
        flags | 4,
    )
}

/// Where the kernel would route a packet from `saddr` to `daddr` that arrived on `ifindex`:
/// the egress ifindex, or 0 when it is not forwarded (local, unreachable, forwarding off).
#[inline(always)]
pub fn route(ctx: &TcContext, ifindex: u32, proto: u8, saddr: [u8; 4], daddr: [u8; 4]) -> u32 {
    // SAFETY: an all-zero bpf_fib_lookup is a valid input.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = proto;
    params.ifindex = ifindex;
    params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(saddr);
    params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(daddr);
    // SAFETY: `params` is a valid, initialised struct of the size passed.
    let rc = unsafe {
        aya_ebpf::helpers::generated::bpf_fib_lookup(
            ctx.skb.skb.cast(),
            &mut params,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if rc == i64::from(BPF_FIB_LKUP_RET_SUCCESS) || rc == i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) {
        params.ifindex
    } else {
        0
    }
}

/// Sends the rewritten packet out of `out_ifindex` (resolving the next hop's MAC), or hands it
/// to the stack when there is no route to forward it on.
#[inline(always)]
pub fn forward(out_ifindex: u32) -> i32 {
    if out_ifindex == 0 {
        count(|s| s.fib_misses += 1);
        return TC_ACT_OK;
    }
    // SAFETY: no memory arguments (the neighbour is resolved by the kernel).
    unsafe { bpf_redirect_neigh(out_ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}

#[inline(always)]
pub fn ingress_ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: the kernel hands a valid context.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// Swaps the Ethernet addresses: a packet built from a received one goes back to its sender.
#[inline(always)]
pub fn swap_macs(ctx: &TcContext) -> Result<(), i64> {
    let src_mac: [u8; 6] = ctx.load(6)?;
    let dst_mac: [u8; 6] = ctx.load(0)?;
    ctx.store(0, &src_mac, 0)?;
    ctx.store(6, &dst_mac, 0)
}
