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
    /// TCP, the client's direction: the sequence number of the SYN that opened the flow (host
    /// order), which tells a retransmitted SYN from a new connection on the same port
    /// (`reopens`). 0 otherwise.
    pub syn_seq: u32,
    pub _pad: u32,
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

/// Value of the per-CPU `np_backend_stats` hash (key: `BackendStatsKey`, an external service
/// and one of its backends): what the TC programs translated for the pair. Bytes are whole
/// frames (`skb->len`, the Ethernet header included), as in `NodeportStats`. The agent creates
/// the entry with the pair's `backend_stats` entry and deletes it with it; the kernel only adds.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NodeportBackendStats {
    /// Towards the backend (the client's direction).
    pub packets_in: u64,
    pub bytes_in: u64,
    /// Back towards the client (the backend's replies).
    pub packets_out: u64,
    pub bytes_out: u64,
}

/// Value of the per-CPU `np_events` array (index 0): events of the TC programs beyond
/// `NodeportStats`. The first two fields are the rate limiter of the port unreachables the
/// programs send (one window per CPU); the rest are counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NodeportEvents {
    /// bpf_ktime_get_ns() at the start of this CPU's current one-second window.
    pub window_start_ns: u64,
    /// Port unreachables sent by this CPU in that window.
    pub window_sent: u64,
    /// ICMP port unreachables sent for UDP datagrams to a service without backend.
    pub unreachable_sent: u64,
    /// Port unreachables not sent because the window's budget was spent (the datagram is
    /// dropped silently).
    pub rate_limited: u64,
    /// ICMP errors about a translated flow, translated back (or forth) like the flow.
    pub errors_translated: u64,
    /// TCP flows replaced by a new one: the client reused the port of a connection it had
    /// closed while the old flow's entries were still there (see `reopens`). The old flow is
    /// deleted by the kernel, so it is never counted as expired.
    pub flows_reopened: u64,
    /// New flows that keep the client's address but not its port: the port was taken by
    /// another flow's replies to the same backend (see `new_flow` in the kernel).
    pub ports_remapped: u64,
}

/// TCP flags (the 14th byte of the TCP header).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Whether a TCP segment needs its sequence number for `reopens`: a SYN without ACK.
#[inline(always)]
pub fn is_client_syn(tcp_flags: u8) -> bool {
    tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// Whether a packet matching the client-direction entry `entry` opens a new connection rather
/// than belonging to the old one: a SYN without ACK whose sequence number is not the one that
/// opened the flow. The client may reuse a port while the old flow's entries are still there:
/// its side of a closed connection holds no TIME_WAIT when the backend closed first, and the
/// old flow may never have shown a FIN or RST here (an aborted connect, a lost segment). The
/// old flow must not catch the new connection, as conntrack starts a new one. A retransmitted
/// SYN carries the same sequence number, so it keeps its flow (and backend).
#[inline(always)]
pub fn reopens(entry: &NatEntry, proto: u8, tcp_flags: u8, seq: u32) -> bool {
    proto == PROTO_TCP
        && entry.flags & NAT_F_REPLY == 0
        && is_client_syn(tcp_flags)
        && seq != entry.syn_seq
}

/// Port unreachables each CPU sends per second at most, as Linux's `icmp_msgs_per_sec`
/// default (1000) bounds the stack's own: a flood of datagrams to an empty service is not
/// reflected in full.
pub const ICMP_UNREACHABLE_PER_SEC: u64 = 1000;

/// Whether one more port unreachable may be sent at `now_ns`; counts it if so.
#[inline(always)]
pub fn icmp_rate_allow(state: &mut NodeportEvents, now_ns: u64, per_sec: u64) -> bool {
    if now_ns.saturating_sub(state.window_start_ns) >= 1_000_000_000 {
        state.window_start_ns = now_ns;
        state.window_sent = 0;
    }
    if state.window_sent >= per_sec {
        return false;
    }
    state.window_sent += 1;
    true
}

/// ICMP types that are errors about a packet (they quote its IP header and 8 bytes after it):
/// destination unreachable (also "fragmentation needed"), time exceeded, parameter problem.
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_PARAMETERPROB: u8 = 12;
/// Code of `ICMP_DEST_UNREACH`: port unreachable.
pub const ICMP_PORT_UNREACH: u8 = 3;
pub const PROTO_ICMP: u8 = 1;

#[inline(always)]
pub fn is_icmp_error(icmp_type: u8) -> bool {
    icmp_type == ICMP_DEST_UNREACH
        || icmp_type == ICMP_TIME_EXCEEDED
        || icmp_type == ICMP_PARAMETERPROB
}

/// An ICMP error's header and the start of what it quotes: 8 bytes of ICMP header, the quoted
/// packet's 20-byte IPv4 header and its first 8 L4 bytes (both ports, and a UDP checksum).
pub const ICMP_QUOTE_LEN: usize = 36;

/// One's complement sum of big-endian 16-bit words (an odd last byte is padded with zero).
#[inline(always)]
pub fn sum16(bytes: &[u8], mut sum: u32) -> u32 {
    let mut i = 0;
    while i + 1 < bytes.len() {
        sum += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    if i < bytes.len() {
        sum += u32::from(bytes[i]) << 8;
    }
    sum
}

/// Folds a 32-bit sum of words into 16 bits.
#[inline(always)]
pub fn fold16(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// RFC 1624 eqn. 3 over a whole region: the checksum `check` of data in which `old` was
/// replaced by `new` (same length, even offset within the checksummed data).
#[inline(always)]
pub fn csum_update(check: u16, old: &[u8], new: &[u8]) -> u16 {
    // ~C' = ~C + ~m + m': adding the complement of each old word subtracts it.
    let mut sum = u32::from(!check);
    let mut i = 0;
    while i + 1 < old.len() && i + 1 < new.len() {
        sum += u32::from(!u16::from_be_bytes([old[i], old[i + 1]]));
        sum += u32::from(u16::from_be_bytes([new[i], new[i + 1]]));
        // Fold as we go so 14 words never overflow.
        sum = (sum & 0xffff) + (sum >> 16);
        i += 2;
    }
    !fold16(sum)
}

/// Rewrites the packet an ICMP error quotes to `src`/`dst` (address, port; addresses network
/// order, ports host order), as the translated flow's other direction sees it. `quote` is
/// `ICMP_QUOTE_LEN` bytes from the ICMP header on. Fixes the quoted IP header's checksum, the
/// quoted UDP checksum (when not 0), and the ICMP checksum (incrementally: the rest of the
/// quote is unchanged). The quoted TCP checksum lies beyond the 8 bytes and stays as it is,
/// as the receiver never checks it. Returns false when the quote is not one this translates
/// (IP options, not TCP/UDP).
#[inline(always)]
pub fn translate_icmp_quote(
    quote: &mut [u8; ICMP_QUOTE_LEN],
    src: ([u8; 4], u16),
    dst: ([u8; 4], u16),
) -> bool {
    if quote[8] != 0x45 {
        return false;
    }
    let proto = quote[8 + 9];
    if proto != PROTO_TCP && proto != crate::PROTO_UDP {
        return false;
    }
    let old = *quote;
    quote[8 + 12..8 + 16].copy_from_slice(&src.0);
    quote[8 + 16..8 + 20].copy_from_slice(&dst.0);
    quote[28..30].copy_from_slice(&src.1.to_be_bytes());
    quote[30..32].copy_from_slice(&dst.1.to_be_bytes());
    let ip_check = u16::from_be_bytes([quote[18], quote[19]]);
    let ip_check = csum_update(ip_check, &old[20..28], &quote[20..28]);
    quote[18..20].copy_from_slice(&ip_check.to_be_bytes());
    if proto == crate::PROTO_UDP {
        let udp_check = u16::from_be_bytes([quote[34], quote[35]]);
        if udp_check != 0 {
            // The pseudo header's addresses and the ports changed.
            let c = csum_update(udp_check, &old[20..28], &quote[20..28]);
            let mut c = csum_update(c, &old[28..32], &quote[28..32]);
            if c == 0 {
                c = 0xffff;
            }
            quote[34..36].copy_from_slice(&c.to_be_bytes());
        }
    }
    let icmp_check = u16::from_be_bytes([quote[2], quote[3]]);
    let icmp_check = csum_update(icmp_check, &old[8..36], &quote[8..36]);
    quote[2..4].copy_from_slice(&icmp_check.to_be_bytes());
    true
}

/// Length of a port unreachable the programs build: IPv4 header, ICMP header, and the quoted
/// datagram's IPv4 header and UDP header.
pub const ICMP_UNREACHABLE_LEN: usize = 20 + 8 + 20 + 8;

/// The IPv4 packet answering a datagram (its 20-byte IPv4 header `ip` and UDP header `udp`)
/// with an ICMP port unreachable from the address it was sent to, as a host without a socket
/// on that port answers (RFC 1122 3.2.2.1).
#[inline(always)]
pub fn icmp_port_unreachable(ip: &[u8; 20], udp: &[u8; 8]) -> [u8; ICMP_UNREACHABLE_LEN] {
    let mut out = [0u8; ICMP_UNREACHABLE_LEN];
    out[0] = 0x45;
    out[2..4].copy_from_slice(&(ICMP_UNREACHABLE_LEN as u16).to_be_bytes());
    out[8] = 64;
    out[9] = PROTO_ICMP;
    // From the address the datagram was sent to, back to its source.
    out[12..16].copy_from_slice(&ip[16..20]);
    out[16..20].copy_from_slice(&ip[12..16]);
    let ip_check = !fold16(sum16(&out[..20], 0));
    out[10..12].copy_from_slice(&ip_check.to_be_bytes());
    out[20] = ICMP_DEST_UNREACH;
    out[21] = ICMP_PORT_UNREACH;
    out[28..48].copy_from_slice(ip);
    out[48..56].copy_from_slice(udp);
    let icmp_check = !fold16(sum16(&out[20..], 0));
    out[22..24].copy_from_slice(&icmp_check.to_be_bytes());
    out
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
    unsafe impl aya::Pod for NodeportBackendStats {}
    unsafe impl aya::Pod for NodeportEvents {}
}

const _: () = {
    assert!(core::mem::size_of::<FlowKey>() == 16);
    assert!(core::mem::size_of::<NatEntry>() == 40);
    assert!(core::mem::size_of::<NodeportDevice>() == 4);
    assert!(core::mem::size_of::<NodeportStats>() == 8 * 8);
    assert!(core::mem::size_of::<NodeportBackendStats>() == 8 * 4);
    assert!(core::mem::size_of::<NodeportEvents>() == 8 * 7);
};

#[cfg(test)]
mod tests {
    extern crate std;

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

    /// A checksummed region verifies when its words (checksum included) sum to 0xffff.
    fn verifies(bytes: &[u8], initial: u32) -> bool {
        fold16(sum16(bytes, initial)) == 0xffff
    }

    /// The UDP pseudo header's sum: addresses, protocol, UDP length.
    fn pseudo(saddr: &[u8], daddr: &[u8], udp_len: usize) -> u32 {
        sum16(saddr, 0) + sum16(daddr, 0) + u32::from(PROTO_UDP) + udp_len as u32
    }

    /// A UDP datagram `src -> dst` with a payload, IPv4 and UDP checksums set.
    fn datagram(src: ([u8; 4], u16), dst: ([u8; 4], u16), payload: &[u8]) -> std::vec::Vec<u8> {
        let udp_len = 8 + payload.len();
        let mut p = std::vec![0u8; 20 + udp_len];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&((20 + udp_len) as u16).to_be_bytes());
        p[8] = 64;
        p[9] = PROTO_UDP;
        p[12..16].copy_from_slice(&src.0);
        p[16..20].copy_from_slice(&dst.0);
        let c = !fold16(sum16(&p[..20], 0));
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p[20..22].copy_from_slice(&src.1.to_be_bytes());
        p[22..24].copy_from_slice(&dst.1.to_be_bytes());
        p[24..26].copy_from_slice(&(udp_len as u16).to_be_bytes());
        p[28..].copy_from_slice(payload);
        let c = !fold16(sum16(&p[20..], pseudo(&src.0, &dst.0, udp_len)));
        p[26..28].copy_from_slice(&c.to_be_bytes());
        p
    }

    #[test]
    fn a_port_unreachable_quotes_the_datagram_with_valid_checksums() {
        let d = datagram(([10, 77, 0, 1], 40_000), ([10, 77, 0, 3], 30_082), b"hello");
        let ip: [u8; 20] = d[..20].try_into().unwrap();
        let udp: [u8; 8] = d[20..28].try_into().unwrap();
        let icmp = icmp_port_unreachable(&ip, &udp);
        assert!(verifies(&icmp[..20], 0), "IPv4 header checksum");
        assert!(verifies(&icmp[20..], 0), "ICMP checksum");
        assert_eq!(&icmp[12..16], &[10, 77, 0, 3], "from the address dialled");
        assert_eq!(&icmp[16..20], &[10, 77, 0, 1], "to the client");
        assert_eq!((icmp[9], icmp[20], icmp[21]), (PROTO_ICMP, 3, 3));
        assert_eq!(&icmp[28..56], &d[..28], "quotes the header and 8 bytes");
        assert_eq!(
            usize::from(u16::from_be_bytes([icmp[2], icmp[3]])),
            icmp.len()
        );
    }

    #[test]
    fn translating_an_icmp_error_keeps_every_checksum_valid() {
        // A backend's port unreachable about a SNATed datagram (node:61234 -> pod:5354),
        // quoting the whole datagram, translated to (client:40000 -> nodeport) as the client
        // sent it.
        let payload = b"mesh-probe 7\n";
        let inner = datagram(([10, 77, 0, 2], 61_234), ([10, 244, 2, 2], 5354), payload);
        let mut icmp = std::vec![ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(&inner);
        let c = !fold16(sum16(&icmp, 0));
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        assert!(verifies(&icmp, 0));

        let client = ([10, 77, 0, 1], 40_000);
        let service = ([10, 77, 0, 2], 30_054);
        let mut quote: [u8; ICMP_QUOTE_LEN] = icmp[..ICMP_QUOTE_LEN].try_into().unwrap();
        assert!(translate_icmp_quote(&mut quote, client, service));
        icmp[..ICMP_QUOTE_LEN].copy_from_slice(&quote);

        assert!(verifies(&icmp, 0), "ICMP checksum over the whole message");
        let q = &icmp[8..];
        assert!(verifies(&q[..20], 0), "quoted IPv4 header checksum");
        assert_eq!(&q[12..16], &client.0);
        assert_eq!(&q[16..20], &service.0);
        assert_eq!(u16::from_be_bytes([q[20], q[21]]), client.1);
        assert_eq!(u16::from_be_bytes([q[22], q[23]]), service.1);
        let udp_len = 8 + payload.len();
        assert!(
            verifies(&q[20..], pseudo(&client.0, &service.0, udp_len)),
            "quoted UDP checksum with the new addresses and ports"
        );
        assert_eq!(&q[28..], payload);
    }

    #[test]
    fn a_quote_with_ip_options_or_another_protocol_is_left_alone() {
        let d = datagram(([1, 1, 1, 1], 1), ([2, 2, 2, 2], 2), b"x");
        let mut quote = [0u8; ICMP_QUOTE_LEN];
        quote[8..].copy_from_slice(&d[..28]);
        let mut options = quote;
        options[8] = 0x46;
        assert!(!translate_icmp_quote(
            &mut options,
            ([0; 4], 0),
            ([0; 4], 0)
        ));
        let mut icmp_inner = quote;
        icmp_inner[8 + 9] = PROTO_ICMP;
        let before = icmp_inner;
        assert!(!translate_icmp_quote(
            &mut icmp_inner,
            ([0; 4], 0),
            ([0; 4], 0)
        ));
        assert_eq!(icmp_inner, before);
    }

    #[test]
    fn an_incremental_update_of_a_region_matches_a_full_sum() {
        let mut data = [0x12u8, 0x34, 0xff, 0xff, 0x00, 0x01, 0xab, 0xcd];
        let check = !fold16(sum16(&data, 0));
        let old = data;
        data[2..6].copy_from_slice(&[0x00, 0x00, 0xfe, 0xdc]);
        let updated = csum_update(check, &old[2..6], &data[2..6]);
        assert_eq!(updated, !fold16(sum16(&data, 0)));
    }

    #[test]
    fn a_syn_with_another_sequence_number_opens_a_new_flow() {
        let open = NatEntry {
            syn_seq: 1000,
            ..NatEntry::default()
        };
        // A new connection on the port, whether or not the old one was seen closing.
        assert!(reopens(&open, PROTO_TCP, TCP_SYN, 2000));
        let closed = NatEntry {
            flags: NAT_F_CLOSING,
            ..open
        };
        assert!(reopens(&closed, PROTO_TCP, TCP_SYN, 2000));
        // The SYN that opened the flow, retransmitted, keeps it.
        assert!(!reopens(&open, PROTO_TCP, TCP_SYN, 1000));
        // The old connection's segments, a SYN-ACK, the reply direction, UDP: not new.
        assert!(!reopens(&open, PROTO_TCP, TCP_ACK, 2000));
        assert!(!reopens(&open, PROTO_TCP, TCP_ACK | TCP_FIN, 2000));
        assert!(!reopens(&open, PROTO_TCP, TCP_SYN | TCP_ACK, 2000));
        let reply = NatEntry {
            flags: NAT_F_REPLY,
            ..open
        };
        assert!(!reopens(&reply, PROTO_TCP, TCP_SYN, 2000));
        assert!(!reopens(&open, PROTO_UDP, TCP_SYN, 2000));
        assert!(is_client_syn(TCP_SYN) && !is_client_syn(TCP_SYN | TCP_ACK));
    }

    #[test]
    fn port_unreachables_are_limited_per_second_window() {
        let mut s = NodeportEvents::default();
        let t0 = 5_000_000_000;
        for _ in 0..3 {
            assert!(icmp_rate_allow(&mut s, t0, 3));
        }
        assert!(!icmp_rate_allow(&mut s, t0 + 999_999_999, 3));
        // A new window starts one second after the last one did.
        assert!(icmp_rate_allow(&mut s, t0 + 1_000_000_000, 3));
        assert_eq!(s.window_sent, 1);
    }
}
