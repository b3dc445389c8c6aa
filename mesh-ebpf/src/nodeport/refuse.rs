//! Refusing a new flow to a service without a usable backend, as a host without a listener
//! does: a TCP reset, or an ICMP port unreachable for UDP. The answer is built in place of the
//! packet and sent back out of the device it came in on.

use aya_ebpf::{
    bindings::TC_ACT_SHOT,
    helpers::{bpf_ktime_get_ns, bpf_redirect},
    programs::TcContext,
};
use mesh_common::{
    PROTO_TCP,
    nodeport::{
        ICMP_UNREACHABLE_LEN, ICMP_UNREACHABLE_PER_SEC, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, fold16,
        icmp_port_unreachable, icmp_rate_allow, sum16,
    },
};

use super::{
    count::events,
    packet::{ETH_LEN, IP_OFF, L4_OFF, Packet, swap_macs},
};

/// Answers a TCP segment with a reset: the client's connect is refused at once.
#[inline(always)]
pub fn reset(ctx: &TcContext, pkt: &Packet, ifindex: u32) -> i32 {
    match build_reset(ctx, pkt) {
        // SAFETY: no memory arguments.
        Ok(()) => unsafe { bpf_redirect(ifindex, 0) as i32 },
        Err(_) => TC_ACT_SHOT,
    }
}

/// Answers a UDP datagram with an ICMP port unreachable (a connected socket's next call fails
/// with ECONNREFUSED), at most `ICMP_UNREACHABLE_PER_SEC` per CPU; beyond that it is dropped.
#[inline(always)]
pub fn port_unreachable(ctx: &TcContext, ifindex: u32) -> i32 {
    // SAFETY: no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let allowed = events(|s| {
        let allowed = icmp_rate_allow(s, now, ICMP_UNREACHABLE_PER_SEC);
        if allowed {
            s.unreachable_sent += 1;
        } else {
            s.rate_limited += 1;
        }
        allowed
    });
    if allowed != Some(true) {
        return TC_ACT_SHOT;
    }
    match build_unreachable(ctx) {
        // SAFETY: no memory arguments.
        Ok(()) => unsafe { bpf_redirect(ifindex, 0) as i32 },
        Err(_) => TC_ACT_SHOT,
    }
}

#[inline(always)]
fn build_unreachable(ctx: &TcContext) -> Result<(), i64> {
    let ip: [u8; 20] = ctx.load(IP_OFF)?;
    let udp: [u8; 8] = ctx.load(L4_OFF)?;
    let packet = icmp_port_unreachable(&ip, &udp);
    change_tail(ctx, (ETH_LEN + ICMP_UNREACHABLE_LEN) as u32)?;
    swap_macs(ctx)?;
    ctx.store(IP_OFF, &packet, 0)
}

/// Makes the packet `len` bytes long (growing it with zeros or cutting its tail).
#[inline(always)]
fn change_tail(ctx: &TcContext, len: u32) -> Result<(), i64> {
    // SAFETY: the context is valid; the helper checks the length.
    let rc = unsafe { aya_ebpf::helpers::generated::bpf_skb_change_tail(ctx.skb.skb, len, 0) };
    if rc != 0 { Err(rc) } else { Ok(()) }
}

#[inline(always)]
fn build_reset(ctx: &TcContext, pkt: &Packet) -> Result<(), i64> {
    let tot_len: u16 = u16::from_be(ctx.load(IP_OFF + 2)?);
    let seq: u32 = u32::from_be(ctx.load(L4_OFF + 4)?);
    let ack: u32 = u32::from_be(ctx.load(L4_OFF + 8)?);
    let doff: u8 = ctx.load(L4_OFF + 12)?;
    let tcp_len = u32::from(doff >> 4) * 4;
    let payload = u32::from(tot_len).saturating_sub(20 + tcp_len);
    // RFC 9293 3.10.7.1: to a segment with ACK, RST with seq = its ack; otherwise RST|ACK
    // acknowledging everything it carried (a SYN counts one).
    let (new_seq, new_ack, flags) = if pkt.tcp_flags & TCP_ACK != 0 {
        (ack, 0u32, TCP_RST)
    } else {
        let syn_fin =
            u32::from(pkt.tcp_flags & TCP_SYN != 0) + u32::from(pkt.tcp_flags & TCP_FIN != 0);
        (
            0u32,
            seq.wrapping_add(payload).wrapping_add(syn_fin),
            TCP_RST | TCP_ACK,
        )
    };
    // Drop the payload and TCP options: a 20-byte IP and a 20-byte TCP header remain.
    change_tail(ctx, (ETH_LEN + 40) as u32)?;
    swap_macs(ctx)?;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64;
    ip[9] = PROTO_TCP;
    ip[12..16].copy_from_slice(&pkt.key.daddr);
    ip[16..20].copy_from_slice(&pkt.key.saddr);
    let ip_sum = fold16(sum16(&ip, 0));
    ip[10..12].copy_from_slice(&(!ip_sum).to_be_bytes());
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&pkt.key.dport.to_be_bytes());
    tcp[2..4].copy_from_slice(&pkt.key.sport.to_be_bytes());
    tcp[4..8].copy_from_slice(&new_seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&new_ack.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    // Pseudo header: addresses, protocol, TCP length.
    let mut sum = sum16(&ip[12..20], 0) + u32::from(PROTO_TCP) + 20;
    sum = sum16(&tcp, sum);
    let tcp_sum = fold16(sum);
    tcp[16..18].copy_from_slice(&(!tcp_sum).to_be_bytes());
    ctx.store(IP_OFF, &ip, 0)?;
    ctx.store(L4_OFF, &tcp, 0)?;
    Ok(())
}
