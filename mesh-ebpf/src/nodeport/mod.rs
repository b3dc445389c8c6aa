//! Traffic from other hosts (NodePort on a node address, ExternalIPs, LoadBalancer IPs): TC
//! programs on the node's external devices. IPv4, TCP and UDP, and ICMP errors about them.
//!
//! - `nodeport_ingress` sees every packet arriving on an external device. A packet of a known
//!   flow (`NAT_FLOWS`, keyed by its 5-tuple) is rewritten as the entry says; the first packet
//!   to an external service (`EXT_SERVICES`) picks a backend round-robin from the shared
//!   slot/backend maps, records both directions of the flow, and is rewritten. The rewritten
//!   packet is routed here (`bpf_fib_lookup`) and sent with `bpf_redirect_neigh`, so a SNATed
//!   packet (whose source is now a local address) never meets the stack's martian checks.
//! - `nodeport_egress` translates replies of backends on this node (routed by the stack from a
//!   pod's device to the client through an external device) back to the service's address.
//! - A service with session affinity keeps a client (its address) on its backend (`affinity`).
//! - Both translate ICMP errors about a translated flow (`icmp`), and a new flow to a service
//!   without a usable backend is refused (`refuse`).
//!
//! Packets that are not IPv4, IP fragments and IPv4 headers with options pass untouched.

mod affinity;
mod count;
mod icmp;
mod packet;
mod refuse;

use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    programs::TcContext,
};
use mesh_common::{
    Backend, FAMILY_V4, PROTO_TCP, PROTO_UDP, SVC_F_AFFINITY, SVC_F_REJECT_EMPTY, Service,
    ServiceKey,
    nodeport::{
        FlowKey, NAT_F_CLOSING, NAT_F_REPLY, NAT_F_SNAT, NatEntry, PROTO_ICMP, SNAT_TRIES,
        SVC_F_EXT_LOCAL, TCP_FIN, TCP_RST, is_client_syn, reopens, reply_key, snat_port,
    },
};

use self::{
    count::{count, events, translated},
    packet::{Packet, forward, ingress_ifindex, parse, rewrite, route},
};
use crate::maps::{EXT_SERVICES, NAT_FLOWS, NP_DEVICES};
use crate::service::pick_round_robin;
use crate::stats::{count_backend, count_no_backend};

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

/// TC ingress of an external device.
#[inline(always)]
pub fn ingress(ctx: &TcContext) -> i32 {
    let Some(proto) = packet::ipv4_proto(ctx) else {
        return TC_ACT_OK;
    };
    let ifindex = ingress_ifindex(ctx);
    if proto == PROTO_ICMP {
        return icmp::translate(ctx, ifindex, true).unwrap_or(TC_ACT_OK);
    }
    let Some(pkt) = parse(ctx, proto) else {
        return TC_ACT_OK;
    };
    if let Some(entry) = NAT_FLOWS.get_ptr_mut(pkt.key) {
        // SAFETY: a valid value of the map, copied.
        let old = unsafe { *entry };
        if !reopens(&old, pkt.key.proto, pkt.tcp_flags, pkt.syn_seq) {
            return known_flow(ctx, &pkt, ifindex, entry);
        }
        // A new connection on the port of an old flow: the old flow goes, this packet starts a
        // new one below.
        let _ = NAT_FLOWS.remove(reply_key(&old, pkt.key.proto));
        let _ = NAT_FLOWS.remove(pkt.key);
        events(|s| s.flows_reopened += 1);
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
        if pkt.key.proto == PROTO_TCP && is_client_syn(pkt.tcp_flags) {
            retire_closed_flow_replying_to(&pkt);
        }
        return TC_ACT_OK;
    };
    let service = *service;
    new_flow(ctx, &pkt, ifindex, &skey, &service)
}

/// A connection straight to an address that is no service (a pod, say), from a client port an
/// old translated flow to that address used: the backend's SYN-ACK has the 5-tuple of the old
/// flow's replies, whose entry would give it the service's address as source, and the connect
/// would hang until the old flow expired. A closing old flow gives way, as a reopened one does;
/// a live one keeps its entries (the backend could not tell the two connections apart anyway).
#[inline(always)]
fn retire_closed_flow_replying_to(pkt: &Packet) {
    let replies = FlowKey {
        saddr: pkt.key.daddr,
        daddr: pkt.key.saddr,
        sport: pkt.key.dport,
        dport: pkt.key.sport,
        proto: pkt.key.proto,
        _pad: [0; 3],
    };
    // SAFETY: a shared reference into the map value, copied at once.
    let Some(rev) = (unsafe { NAT_FLOWS.get(replies) }).copied() else {
        return;
    };
    if rev.flags & NAT_F_REPLY == 0 {
        return;
    }
    let client = reply_key(&rev, pkt.key.proto);
    // SAFETY: as above.
    let fwd_closing =
        unsafe { NAT_FLOWS.get(client) }.is_some_and(|f| f.flags & NAT_F_CLOSING != 0);
    if rev.flags & NAT_F_CLOSING == 0 && !fwd_closing {
        return;
    }
    let _ = NAT_FLOWS.remove(replies);
    let _ = NAT_FLOWS.remove(client);
    events(|s| s.flows_reopened += 1);
}

/// A packet of a flow in `NAT_FLOWS` (either direction), at ingress.
#[inline(always)]
fn known_flow(ctx: &TcContext, pkt: &Packet, ifindex: u32, entry: *mut NatEntry) -> i32 {
    let entry = touch(entry, pkt);
    if rewrite(ctx, pkt, &entry).is_err() {
        return TC_ACT_SHOT;
    }
    translated(
        entry.service_id,
        entry.backend_id,
        entry.flags & NAT_F_REPLY != 0,
        pkt.len,
    );
    let out = route(ctx, ifindex, pkt.key.proto, entry.to_saddr, entry.to_daddr);
    forward(out)
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
    let backend_id = if service.flags & SVC_F_AFFINITY != 0 {
        affinity::pick(skey, service, pkt.key.saddr, &mut backend)
    } else {
        pick_round_robin(&EXT_SERVICES, skey, service, &mut backend)
    };
    if backend_id == 0 || backend.family != FAMILY_V4 {
        count(|s| s.no_backend += 1);
        count_no_backend(service.id);
        if service.flags & SVC_F_REJECT_EMPTY == 0 {
            return TC_ACT_OK;
        }
        if pkt.key.proto == PROTO_TCP {
            if pkt.tcp_flags & TCP_RST == 0 {
                return refuse::reset(ctx, pkt, ifindex);
            }
            return TC_ACT_SHOT;
        }
        if pkt.key.proto == PROTO_UDP {
            return refuse::port_unreachable(ctx, ifindex);
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
        syn_seq: pkt.syn_seq,
        _pad: 0,
        last_seen_ns: now,
    };
    let mut rev = NatEntry {
        to_saddr: pkt.key.daddr,
        to_daddr: pkt.key.saddr,
        to_sport: pkt.key.dport,
        to_dport: pkt.key.sport,
        service_id: service.id,
        backend_id,
        flags: NAT_F_REPLY,
        syn_seq: 0,
        _pad: 0,
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
    if let Some(ip) = snat_ip {
        fwd.to_saddr = ip;
        fwd.flags |= NAT_F_SNAT;
        rev.flags |= NAT_F_SNAT;
    }
    // The replies' key must be free. A SNATed flow takes a random free node port. A flow that
    // keeps the client's address keeps its port too, unless another flow's replies hold that
    // key already (the client's port to the same backend through another service, or an old
    // flow still closing): it then takes a random port, as netfilter's NAT does on a clash,
    // instead of being dropped.
    let mut inserted = false;
    let mut i = 0;
    while i < SNAT_TRIES {
        if snat_ip.is_some() || i > 0 {
            // SAFETY: no arguments.
            fwd.to_sport = snat_port(unsafe { bpf_get_prandom_u32() });
        }
        if NAT_FLOWS
            .insert(reply_key(&fwd, pkt.key.proto), rev, u64::from(BPF_NOEXIST))
            .is_ok()
        {
            inserted = true;
            if snat_ip.is_none() && i > 0 {
                events(|s| s.ports_remapped += 1);
            }
            break;
        }
        i += 1;
    }
    if !inserted || NAT_FLOWS.insert(pkt.key, fwd, 0).is_err() {
        count(|s| s.flow_failures += 1);
        return TC_ACT_SHOT;
    }
    count_backend(service.id, backend_id);
    count(|s| s.flows_created += 1);
    translated(service.id, backend_id, false, pkt.len);
    if rewrite(ctx, pkt, &fwd).is_err() {
        return TC_ACT_SHOT;
    }
    forward(out)
}

/// TC egress of an external device: replies of backends on this node, back to the client
/// with the service's address as source.
#[inline(always)]
pub fn egress(ctx: &TcContext) -> i32 {
    let Some(proto) = packet::ipv4_proto(ctx) else {
        return TC_ACT_OK;
    };
    if proto == PROTO_ICMP {
        return icmp::translate(ctx, 0, false).unwrap_or(TC_ACT_OK);
    }
    let Some(pkt) = parse(ctx, proto) else {
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
    translated(entry.service_id, entry.backend_id, true, pkt.len);
    TC_ACT_OK
}
