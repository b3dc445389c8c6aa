//! ICMP errors about translated flows (port unreachable, fragmentation needed, time exceeded,
//! parameter problem), translated like the flow they are about: the client sees an error
//! about the packet it sent (to the address it dialled), coming from that address; a backend
//! sees one about the packet it received.

use aya_ebpf::{
    bindings::{BPF_F_RECOMPUTE_CSUM, TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use mesh_common::nodeport::{
    FlowKey, ICMP_QUOTE_LEN, NAT_F_REPLY, PROTO_ICMP, is_icmp_error, translate_icmp_quote,
};

use super::{
    count::events,
    packet::{IP_DADDR, IP_SADDR, L4_OFF, forward, rewrite_addr, route},
};
use crate::maps::NAT_FLOWS;

/// Translates an ICMP error about a translated flow; None when the packet is not one (it
/// passes untouched). `ingress` says which program runs: ingress routes the translated error
/// itself, egress (replies of this node's backends) lets it go on; egress translates only
/// errors travelling towards the client.
#[inline(always)]
pub fn translate(ctx: &TcContext, ifindex: u32, ingress: bool) -> Option<i32> {
    let mut quote: [u8; ICMP_QUOTE_LEN] = ctx.load(L4_OFF).ok()?;
    if !is_icmp_error(quote[0]) || quote[8] != 0x45 {
        return None;
    }
    let inner_saddr = [quote[20], quote[21], quote[22], quote[23]];
    let inner_daddr = [quote[24], quote[25], quote[26], quote[27]];
    let inner_sport = u16::from_be_bytes([quote[28], quote[29]]);
    let inner_dport = u16::from_be_bytes([quote[30], quote[31]]);
    // The quoted packet went out translated; the flow's other direction arrives with its ends
    // swapped, and that entry says what the quoted packet's ends stood for.
    let key = FlowKey {
        saddr: inner_daddr,
        daddr: inner_saddr,
        sport: inner_dport,
        dport: inner_sport,
        proto: quote[8 + 9],
        _pad: [0; 3],
    };
    // SAFETY: a shared reference into the map value, copied at once.
    let entry = *unsafe { NAT_FLOWS.get(key) }?;
    if !ingress && entry.flags & NAT_F_REPLY == 0 {
        return None;
    }
    if !translate_icmp_quote(
        &mut quote,
        (entry.to_daddr, entry.to_dport),
        (entry.to_saddr, entry.to_sport),
    ) {
        return None;
    }
    let saddr: [u8; 4] = ctx.load(IP_SADDR).ok()?;
    let daddr: [u8; 4] = ctx.load(IP_DADDR).ok()?;
    // The error's own ends: the peer the quoted packet was sent to becomes what that peer
    // stands for; a router on the way keeps its address (as Linux's NAT does).
    let new_saddr = if saddr == inner_daddr {
        entry.to_saddr
    } else {
        saddr
    };
    let new_daddr = if daddr == inner_saddr {
        entry.to_daddr
    } else {
        daddr
    };
    let written = ctx
        .store(L4_OFF, &quote, u64::from(BPF_F_RECOMPUTE_CSUM))
        .and_then(|()| {
            if new_saddr != saddr {
                rewrite_addr(ctx, IP_SADDR, saddr, new_saddr)?;
            }
            if new_daddr != daddr {
                rewrite_addr(ctx, IP_DADDR, daddr, new_daddr)?;
            }
            Ok(())
        });
    if written.is_err() {
        return Some(TC_ACT_SHOT);
    }
    events(|s| s.errors_translated += 1);
    if !ingress {
        return Some(TC_ACT_OK);
    }
    Some(forward(route(
        ctx, ifindex, PROTO_ICMP, new_saddr, new_daddr,
    )))
}
