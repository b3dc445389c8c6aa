//! Traffic from other hosts: the types of the TC programs on the node's external devices
//! (NodePort on a node address, ExternalIPs, LoadBalancer IPs) and their pure helpers.
//!
//! An external service is an entry of the `external_services` map, keyed like `services` and
//! pointing into the same `slots`/`backends`/`rr_state` maps under its own service id, so its
//! backend set can differ from the socket-level one of the same address (with
//! `externalTrafficPolicy: Local` it holds only this node's endpoints).
//!
//! Every translated flow has two entries in the LRU `nat_flows` map, both keyed by a packet's
//! 5-tuple as it arrives: the client's packets (client -> service) and the backend's replies
//! (backend -> client, or backend -> node address when the flow was SNATed). Each entry says
//! what the packet is rewritten to.

use crate::PROTO_TCP;

/// `Service::flags` of an external service: keep the client's source address (never SNAT), as
/// `externalTrafficPolicy: Local` does. Without it (`Cluster`) a backend reached through an
/// external device gets the node's address as source, so its reply comes back through here.
pub const SVC_F_EXT_LOCAL: u32 = 1 << 3;

/// `NatEntry::flags`: the entry translates replies (backend -> client); the egress program
/// applies only these.
pub const NAT_F_REPLY: u32 = 1 << 0;
/// `NatEntry::flags`: the flow's source was rewritten to a node address (SNAT).
pub const NAT_F_SNAT: u32 = 1 << 1;
/// `NatEntry::flags`: a TCP FIN or RST was seen in this direction; the entry expires after the
/// short closing timeout.
pub const NAT_F_CLOSING: u32 = 1 << 2;

/// SNAT source ports are taken from this range, above Linux's default ephemeral range
/// (32768-60999), so they do not collide with the node's own connections.
pub const SNAT_PORT_MIN: u16 = 61_000;
pub const SNAT_PORT_MAX: u16 = 65_535;
/// How many random SNAT ports a new flow tries before it is dropped (a bounded loop).
pub const SNAT_TRIES: u32 = 16;

/// Default `[agent.limits] max_external_flows`: translated connections at once (each takes
/// two `nat_flows` entries).
pub const DEFAULT_MAX_EXTERNAL_FLOWS: u32 = 65_536;
/// External devices the programs know at once (`nodeport_devices`).
pub const MAX_NODEPORT_DEVICES: u32 = 64;

/// Key of `nat_flows`: an IPv4 packet's 5-tuple as it arrives. Addresses are network order
/// (as in the header); ports are host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct FlowKey {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Value of `nat_flows`: what a matching packet is rewritten to, and the flow's bookkeeping.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NatEntry {
    pub to_saddr: [u8; 4],
    pub to_daddr: [u8; 4],
    pub to_sport: u16,
    pub to_dport: u16,
    /// The external service's id and the backend's id (for counters).
    pub service_id: u32,
    pub backend_id: u32,
    /// `NAT_F_*` bits.
    pub flags: u32,
    /// bpf_ktime_get_ns() of the last packet in this direction (the agent expires idle flows).
    pub last_seen_ns: u64,
}

/// Value of `nodeport_devices` (key: ifindex, u32): an external device the programs are
/// attached to, and the IPv4 address SNATed flows leaving through it get as source.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NodeportDevice {
    /// Network order; all zero: the device has no IPv4 address (flows through it are not
    /// SNATed).
    pub ipv4: [u8; 4],
}

/// Value of the per-CPU `nodeport_stats` array (index 0): node-wide counters of the TC
/// programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NodeportStats {
    /// New flows translated to a backend (two `nat_flows` entries each).
    pub flows_created: u64,
    /// Packets to an external service that had no usable backend (dropped, or answered with a
    /// TCP reset).
    pub no_backend: u64,
    /// New flows dropped because no free SNAT port was found in `SNAT_TRIES` tries, or an
    /// entry could not be inserted.
    pub flow_failures: u64,
    /// Packets and bytes translated towards a backend, and back towards a client.
    pub packets_in: u64,
    pub bytes_in: u64,
    pub packets_out: u64,
    pub bytes_out: u64,
    /// Translated packets whose route lookup failed, handed to the stack unrouted.
    pub fib_misses: u64,
}

/// Idle timeouts of translated flows, as the agent expires them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowTimeouts {
    pub udp_ns: u64,
    pub tcp_ns: u64,
    pub tcp_closing_ns: u64,
}

/// Whether a `nat_flows` entry has been idle too long at `now_ns` (both clocks
/// CLOCK_MONOTONIC, as bpf_ktime_get_ns()).
pub fn flow_expired(key: &FlowKey, entry: &NatEntry, now_ns: u64, t: &FlowTimeouts) -> bool {
    let idle = now_ns.saturating_sub(entry.last_seen_ns);
    let limit = if key.proto != PROTO_TCP {
        t.udp_ns
    } else if entry.flags & NAT_F_CLOSING != 0 {
        t.tcp_closing_ns
    } else {
        t.tcp_ns
    };
    idle >= limit
}

/// Whether a flow is idle: judged on both directions together (`fwd` is the client's
/// direction, `rev` the replies', if still there), so a one-way stream keeps its reply entry.
/// A FIN or RST seen in either direction makes a TCP flow use the closing timeout.
pub fn pair_expired(
    key: &FlowKey,
    fwd: &NatEntry,
    rev: Option<&NatEntry>,
    now_ns: u64,
    t: &FlowTimeouts,
) -> bool {
    let mut merged = *fwd;
    if let Some(rev) = rev {
        merged.last_seen_ns = merged.last_seen_ns.max(rev.last_seen_ns);
        merged.flags |= rev.flags & NAT_F_CLOSING;
    }
    flow_expired(key, &merged, now_ns, t)
}

/// The key the other direction of a flow arrives with: the reply to a packet rewritten by
/// `entry` swaps its rewritten source and destination.
#[inline(always)]
pub fn reply_key(entry: &NatEntry, proto: u8) -> FlowKey {
    FlowKey {
        saddr: entry.to_daddr,
        daddr: entry.to_saddr,
        sport: entry.to_dport,
        dport: entry.to_sport,
        proto,
        _pad: [0; 3],
    }
}

/// The SNAT port of try `n` from a random word: spread over the SNAT range.
#[inline(always)]
pub fn snat_port(random: u32) -> u16 {
    let span = u32::from(SNAT_PORT_MAX - SNAT_PORT_MIN) + 1;
    SNAT_PORT_MIN + (random % span) as u16
}

/// RFC 1624 incremental update of a 16-bit one's complement checksum when a 32-bit word
/// changes from `from` to `to` (used by the host-side tests to check the kernel's result).
pub fn csum_replace4(check: u16, from: u32, to: u32) -> u16 {
    let mut sum = u32::from(!check);
    sum += (!from >> 16) + (!from & 0xffff);
    sum += (to >> 16) + (to & 0xffff);
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: repr(C), Copy, no implicit padding (checked below).
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for NatEntry {}
    unsafe impl aya::Pod for NodeportDevice {}
    unsafe impl aya::Pod for NodeportStats {}
}

const _: () = {
    assert!(core::mem::size_of::<FlowKey>() == 16);
    assert!(core::mem::size_of::<NatEntry>() == 32);
    assert!(core::mem::size_of::<NodeportDevice>() == 4);
    assert!(core::mem::size_of::<NodeportStats>() == 8 * 8);
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PROTO_UDP;

    const T: FlowTimeouts = FlowTimeouts {
        udp_ns: 30,
        tcp_ns: 1000,
        tcp_closing_ns: 10,
    };

    fn key(proto: u8) -> FlowKey {
        FlowKey {
            proto,
            ..FlowKey::default()
        }
    }

    #[test]
    fn udp_flows_expire_after_the_udp_timeout() {
        let e = NatEntry {
            last_seen_ns: 100,
            ..NatEntry::default()
        };
        assert!(!flow_expired(&key(PROTO_UDP), &e, 129, &T));
        assert!(flow_expired(&key(PROTO_UDP), &e, 130, &T));
        // A clock read before the entry's last packet is not "expired".
        assert!(!flow_expired(&key(PROTO_UDP), &e, 50, &T));
    }

    #[test]
    fn tcp_flows_expire_by_state() {
        let mut e = NatEntry {
            last_seen_ns: 100,
            ..NatEntry::default()
        };
        assert!(!flow_expired(&key(PROTO_TCP), &e, 200, &T));
        e.flags |= NAT_F_CLOSING;
        assert!(flow_expired(&key(PROTO_TCP), &e, 200, &T));
    }

    #[test]
    fn a_pair_is_idle_only_when_both_directions_are() {
        let fwd = NatEntry {
            last_seen_ns: 100,
            ..NatEntry::default()
        };
        let rev = NatEntry {
            last_seen_ns: 125,
            flags: NAT_F_REPLY,
            ..NatEntry::default()
        };
        assert!(!pair_expired(&key(PROTO_UDP), &fwd, Some(&rev), 140, &T));
        assert!(pair_expired(&key(PROTO_UDP), &fwd, None, 140, &T));
        assert!(pair_expired(&key(PROTO_UDP), &fwd, Some(&rev), 155, &T));
        // A FIN seen by the replies' direction closes the pair.
        let closing = NatEntry {
            flags: NAT_F_REPLY | NAT_F_CLOSING,
            ..rev
        };
        assert!(!pair_expired(&key(PROTO_TCP), &fwd, Some(&rev), 140, &T));
        assert!(pair_expired(&key(PROTO_TCP), &fwd, Some(&closing), 140, &T));
    }

    #[test]
    fn the_reply_key_swaps_the_rewritten_ends() {
        let e = NatEntry {
            to_saddr: [10, 0, 0, 2],
            to_daddr: [10, 244, 2, 2],
            to_sport: 61_234,
            to_dport: 8080,
            ..NatEntry::default()
        };
        let k = reply_key(&e, PROTO_TCP);
        assert_eq!(k.saddr, [10, 244, 2, 2]);
        assert_eq!(k.daddr, [10, 0, 0, 2]);
        assert_eq!((k.sport, k.dport, k.proto), (8080, 61_234, PROTO_TCP));
    }

    #[test]
    fn snat_ports_stay_in_their_range() {
        for r in [0, 1, 4535, 4536, u32::MAX, 123_456_789] {
            let p = snat_port(r);
            assert!((SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&p), "{r} -> {p}");
        }
        assert_eq!(snat_port(0), SNAT_PORT_MIN);
        assert_eq!(snat_port(4535), SNAT_PORT_MAX);
    }

    #[test]
    fn incremental_checksum_matches_a_full_one() {
        // An IPv4 header's checksum, recomputed after the destination changes.
        fn full(h: &[u16]) -> u16 {
            let mut s: u32 = h.iter().map(|&w| u32::from(w)).sum();
            while s >> 16 != 0 {
                s = (s & 0xffff) + (s >> 16);
            }
            !(s as u16)
        }
        let mut h = [
            0x4500u16, 0x0054, 0x1c46, 0x4000, 0x4006, 0, 0x0a00, 0x0001, 0x0a00, 0x0002,
        ];
        h[5] = full(&h);
        let from = 0x0a00_0002;
        let to = 0x0af4_0102;
        let updated = csum_replace4(h[5], from, to);
        h[8] = 0x0af4;
        h[9] = 0x0102;
        h[5] = 0;
        assert_eq!(updated, full(&h));
    }
}
