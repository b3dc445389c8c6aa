//! Traffic from other hosts (NodePort on a node address, ExternalIPs, LoadBalancer IPs): TC
//! programs on the node's external devices. IPv4, TCP and UDP.
//!
//! - `nodeport_ingress` sees every packet arriving on an external device. A packet of a known
//!   flow (`NAT_FLOWS`, keyed by its 5-tuple) is rewritten as the entry says; the first packet
//!   to an external service (`EXT_SERVICES`) picks a backend round-robin from the shared
//!   slot/backend maps, records both directions of the flow, and is rewritten. The rewritten
//!   packet is routed here (`bpf_fib_lookup`) and sent with `bpf_redirect_neigh`, so a SNATed
//!   packet (whose source is now a local address) never meets the stack's martian checks.
//! - `nodeport_egress` translates replies of backends on this node (routed by the stack from a
//!   pod's device to the client through an external device) back to the service's address.
//!
//! Packets that are not IPv4 TCP/UDP, IP fragments and IPv4 headers with options pass
//! untouched.

use aya_ebpf::{
    bindings::{
        BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT, bpf_fib_lookup,
    },
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use mesh_common::{
    Backend, FAMILY_V4, PROTO_TCP, PROTO_UDP, SVC_F_REJECT_EMPTY, Service, ServiceKey,
    nodeport::{
        FlowKey, NAT_F_CLOSING, NAT_F_REPLY, NAT_F_SNAT, NatEntry, NodeportStats, SNAT_TRIES,
        SVC_F_EXT_LOCAL, reply_key, snat_port,
    },
};

use crate::maps::{EXT_SERVICES, NAT_FLOWS, NP_DEVICES, NP_STATS};
use crate::service::pick_round_robin;
use crate::stats::count_backend;

const ETH_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IP_OFF: usize = ETH_LEN;
const IP_CHECK: usize = IP_OFF + 10;
const IP_SADDR: usize = IP_OFF + 12;
const IP_DADDR: usize = IP_OFF + 16;
/// Only 20-byte IPv4 headers are translated, so the L4 header is at a fixed offset.
const L4_OFF: usize = IP_OFF + 20;
const TCP_CHECK: usize = L4_OFF + 16;
const TCP_FLAGS: usize = L4_OFF + 13;
const UDP_CHECK: usize = L4_OFF + 6;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const AF_INET: u8 = 2;

/// An IPv4 TCP/UDP packet's 5-tuple, its TCP flags (0 for UDP) and its length.
struct Packet {
    key: FlowKey,
    tcp_flags: u8,
    len: u32,
}

#[inline(always)]
fn parse(ctx: &TcContext) -> Option<Packet> {
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
    let proto: u8 = ctx.load(IP_OFF + 9).ok()?;
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
        len: ctx.len(),
    })
}

#[inline(always)]
fn count(update: impl FnOnce(&mut NodeportStats)) {
    if let Some(stats) = NP_STATS.get_ptr_mut(0) {
        // SAFETY: this CPU's value of a per-CPU array; nothing else holds a reference to it.
        update(unsafe { &mut *stats });
    }
}

/// Marks a flow entry used now (and closing after a FIN or RST); returns a copy.
#[inline(always)]
fn touch(entry: *mut NatEntry, pkt: &Packet) -> NatEntry {
    // SAFETY: a value of the LRU map; concurrent writers race harmlessly (both write "now").
    let entry = unsafe { &mut *entry };
    entry.last_seen_ns = unsafe { bpf_ktime_get_ns() };
    if pkt.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        entry.flags |= NAT_F_CLOSING;
    }
    *entry
}

/// Rewrites the packet's addresses and ports to the entry's, with the checksums fixed
/// incrementally (the L4 checksum covers the addresses through the pseudo header).
#[inline(always)]
fn rewrite(ctx: &TcContext, pkt: &Packet, to: &NatEntry) -> Result<(), i64> {
    let (check, mangled) = if pkt.key.proto == PROTO_TCP {
        (TCP_CHECK, 0)
    } else {
        // A UDP checksum of 0 means "none" and stays 0.
        (UDP_CHECK, u64::from(BPF_F_MARK_MANGLED_0))
    };
    let pseudo = u64::from(BPF_F_PSEUDO_HDR) | mangled;
    if to.to_saddr != pkt.key.saddr {
        let from = u64::from(u32::from_ne_bytes(pkt.key.saddr));
        let new = u64::from(u32::from_ne_bytes(to.to_saddr));
        ctx.store(IP_SADDR, &to.to_saddr, 0)?;
        ctx.l3_csum_replace(IP_CHECK, from, new, 4)?;
        ctx.l4_csum_replace(check, from, new, pseudo | 4)?;
    }
    if to.to_daddr != pkt.key.daddr {
        let from = u64::from(u32::from_ne_bytes(pkt.key.daddr));
        let new = u64::from(u32::from_ne_bytes(to.to_daddr));
        ctx.store(IP_DADDR, &to.to_daddr, 0)?;
        ctx.l3_csum_replace(IP_CHECK, from, new, 4)?;
        ctx.l4_csum_replace(check, from, new, pseudo | 4)?;
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

/// Where the kernel would route a packet from `saddr` to `daddr` that arrived on `ifindex`:
/// the egress ifindex, or 0 when it is not forwarded (local, unreachable, forwarding off).
#[inline(always)]
fn route(ctx: &TcContext, ifindex: u32, proto: u8, saddr: [u8; 4], daddr: [u8; 4]) -> u32 {
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
fn forward(out_ifindex: u32) -> i32 {
    if out_ifindex == 0 {
        count(|s| s.fib_misses += 1);
        return TC_ACT_OK;
    }
    // SAFETY: no memory arguments (the neighbour is resolved by the kernel).
    unsafe { bpf_redirect_neigh(out_ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}

#[inline(always)]
fn ingress_ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: the kernel hands a valid context.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// TC ingress of an external device.
#[inline(always)]
pub fn ingress(ctx: &TcContext) -> i32 {
    let Some(pkt) = parse(ctx) else {
        return TC_ACT_OK;
    };
    let ifindex = ingress_ifindex(ctx);
    if let Some(entry) = NAT_FLOWS.get_ptr_mut(pkt.key) {
        let entry = touch(entry, &pkt);
        if rewrite(ctx, &pkt, &entry).is_err() {
            return TC_ACT_SHOT;
        }
        if entry.flags & NAT_F_REPLY != 0 {
            count(|s| {
                s.packets_out += 1;
                s.bytes_out += u64::from(pkt.len);
            });
        } else {
            count(|s| {
                s.packets_in += 1;
                s.bytes_in += u64::from(pkt.len);
            });
        }
        let out = route(ctx, ifindex, pkt.key.proto, entry.to_saddr, entry.to_daddr);
        return forward(out);
    }
    let mut skey = ServiceKey {
        port: pkt.key.dport,
        proto: pkt.key.proto,
        family: FAMILY_V4,
        ..ServiceKey::default()
    };
    skey.ip[0] = pkt.key.daddr[0];
    skey.ip[1] = pkt.key.daddr[1];
    skey.ip[2] = pkt.key.daddr[2];
    skey.ip[3] = pkt.key.daddr[3];
    // SAFETY: a shared reference into the map value, copied at once.
    let Some(service) = (unsafe { EXT_SERVICES.get(skey) }) else {
        return TC_ACT_OK;
    };
    let service = *service;
    new_flow(ctx, &pkt, ifindex, &skey, &service)
}

/// The first packet of a flow to an external service.
#[inline(always)]
fn new_flow(
    ctx: &TcContext,
    pkt: &Packet,
    ifindex: u32,
    skey: &ServiceKey,
    service: &Service,
) -> i32 {
    let mut backend = Backend::default();
    // External services have ids of their own: their round-robin position is theirs alone.
    let backend_id = pick_round_robin(&EXT_SERVICES, skey, service, &mut backend);
    if backend_id == 0 || backend.family != FAMILY_V4 {
        count(|s| s.no_backend += 1);
        if service.flags & SVC_F_REJECT_EMPTY == 0 {
            return TC_ACT_OK;
        }
        if pkt.key.proto == PROTO_TCP && pkt.tcp_flags & TCP_RST == 0 {
            return reset(ctx, pkt, ifindex);
        }
        return TC_ACT_SHOT;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let bip = [backend.ip[0], backend.ip[1], backend.ip[2], backend.ip[3]];
    let out = route(ctx, ifindex, pkt.key.proto, pkt.key.saddr, bip);
    let mut fwd = NatEntry {
        to_saddr: pkt.key.saddr,
        to_daddr: bip,
        to_sport: pkt.key.sport,
        to_dport: backend.port,
        service_id: service.id,
        backend_id,
        flags: 0,
        last_seen_ns: now,
    };
    let rev = NatEntry {
        to_saddr: pkt.key.daddr,
        to_daddr: pkt.key.saddr,
        to_sport: pkt.key.dport,
        to_dport: pkt.key.sport,
        service_id: service.id,
        backend_id,
        flags: NAT_F_REPLY,
        last_seen_ns: now,
    };
    // SNAT when the backend is reached through an external device (another node) and the
    // service does not keep the client's address.
    let snat_ip = if service.flags & SVC_F_EXT_LOCAL == 0 && out != 0 {
        // SAFETY: a shared reference into the map value, copied at once.
        match unsafe { NP_DEVICES.get(out) } {
            Some(dev) if dev.ipv4 != [0; 4] => Some(dev.ipv4),
            _ => None,
        }
    } else {
        None
    };
    let mut inserted = false;
    if let Some(ip) = snat_ip {
        fwd.to_saddr = ip;
        fwd.flags |= NAT_F_SNAT;
        let mut rev = rev;
        rev.flags |= NAT_F_SNAT;
        let mut i = 0;
        while i < SNAT_TRIES {
            // SAFETY: no arguments.
            fwd.to_sport = snat_port(unsafe { bpf_get_prandom_u32() });
            if NAT_FLOWS
                .insert(reply_key(&fwd, pkt.key.proto), rev, u64::from(BPF_NOEXIST))
                .is_ok()
            {
                inserted = true;
                break;
            }
            i += 1;
        }
    } else {
        inserted = NAT_FLOWS
            .insert(reply_key(&fwd, pkt.key.proto), rev, u64::from(BPF_NOEXIST))
            .is_ok();
    }
    if !inserted || NAT_FLOWS.insert(pkt.key, fwd, 0).is_err() {
        count(|s| s.flow_failures += 1);
        return TC_ACT_SHOT;
    }
    count_backend(service.id, backend_id);
    count(|s| {
        s.flows_created += 1;
        s.packets_in += 1;
        s.bytes_in += u64::from(pkt.len);
    });
    if rewrite(ctx, pkt, &fwd).is_err() {
        return TC_ACT_SHOT;
    }
    forward(out)
}

/// Answers a TCP segment to a service without backends with a reset, sent back out of the
/// device it came in on: the client's connect is refused at once, as at the socket level.
#[inline(always)]
fn reset(ctx: &TcContext, pkt: &Packet, ifindex: u32) -> i32 {
    match build_reset(ctx, pkt) {
        // SAFETY: no memory arguments.
        Ok(()) => unsafe { bpf_redirect(ifindex, 0) as i32 },
        Err(_) => TC_ACT_SHOT,
    }
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
    // SAFETY: the context is valid; the helper checks the length.
    let rc = unsafe {
        aya_ebpf::helpers::generated::bpf_skb_change_tail(ctx.skb.skb, (ETH_LEN + 40) as u32, 0)
    };
    if rc != 0 {
        return Err(rc);
    }
    let src_mac: [u8; 6] = ctx.load(6)?;
    let dst_mac: [u8; 6] = ctx.load(0)?;
    ctx.store(0, &src_mac, 0)?;
    ctx.store(6, &dst_mac, 0)?;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64;
    ip[9] = PROTO_TCP;
    ip[12..16].copy_from_slice(&pkt.key.daddr);
    ip[16..20].copy_from_slice(&pkt.key.saddr);
    let ip_sum = fold(sum_words(&ip, 0));
    ip[10..12].copy_from_slice(&(!ip_sum).to_be_bytes());
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&pkt.key.dport.to_be_bytes());
    tcp[2..4].copy_from_slice(&pkt.key.sport.to_be_bytes());
    tcp[4..8].copy_from_slice(&new_seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&new_ack.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    // Pseudo header: addresses, protocol, TCP length.
    let mut sum = sum_words(&ip[12..20], 0) + u32::from(PROTO_TCP) + 20;
    sum = sum_words(&tcp, sum);
    let tcp_sum = fold(sum);
    tcp[16..18].copy_from_slice(&(!tcp_sum).to_be_bytes());
    ctx.store(IP_OFF, &ip, 0)?;
    ctx.store(L4_OFF, &tcp, 0)?;
    Ok(())
}

#[inline(always)]
fn sum_words(bytes: &[u8], mut sum: u32) -> u32 {
    let mut i = 0;
    while i + 1 < bytes.len() {
        sum += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    sum
}

#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// TC egress of an external device: replies of backends on this node, back to the client
/// with the service's address as source.
#[inline(always)]
pub fn egress(ctx: &TcContext) -> i32 {
    let Some(pkt) = parse(ctx) else {
        return TC_ACT_OK;
    };
    let Some(entry) = NAT_FLOWS.get_ptr_mut(pkt.key) else {
        return TC_ACT_OK;
    };
    // SAFETY: a valid value of the map (flags only read).
    if unsafe { (*entry).flags } & NAT_F_REPLY == 0 {
        return TC_ACT_OK;
    }
    let entry = touch(entry, &pkt);
    if rewrite(ctx, &pkt, &entry).is_err() {
        return TC_ACT_SHOT;
    }
    count(|s| {
        s.packets_out += 1;
        s.bytes_out += u64::from(pkt.len);
    });
    TC_ACT_OK
}
