//! Map keys and values shared by the kernel programs (`mesh-ebpf`) and the agent (`mesh-user`).
//!
//! Every type is `#[repr(C)]` with explicit padding so its layout is the same on both sides and
//! `bpftool map dump` prints every byte as a named field. Conventions:
//! - IP addresses are 16 bytes in network order (what `ip.octets()` gives); an IPv4 address uses
//!   the first 4 bytes and leaves the rest zero. `bpftool` prints them as byte arrays.
//! - Ports are in host order, so `bpftool` prints `80` for port 80.
//! - Ids are allocated by the agent; id 0 is reserved to mean "none".
//!
//! It also holds the pure helpers of the kernel programs (address conversion, slot choice,
//! TCP close accounting), so they are unit-tested on the host (`cargo test -p mesh-common`).
//! They are `#[inline(always)]`: the BPF verifier sees them inlined into each program.
#![no_std]

pub mod capacity;
pub mod kfunc;
pub mod nodeport;

/// Bump when any map key or value below changes layout. It is part of every pin path, so a new
/// agent never reuses a pinned map with an old layout.
pub const LAYOUT_VERSION: u32 = 6;

/// Address family tags stored in keys (not the kernel's AF_* values, which differ by OS).
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// IP protocol numbers, as in the IP header.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Compile-time capacities of the maps. The agent overrides `max_entries` at load time from its
/// config (`[agent.limits]`); these are the defaults for a big node.
pub const DEFAULT_MAX_SERVICES: u32 = 131_072;
pub const DEFAULT_MAX_BACKENDS: u32 = 262_144;
/// Total backend slots across all services and both generations in flight.
pub const DEFAULT_MAX_SLOTS: u32 = 1_048_576;
/// A service's slot set is at most this long (weights are reduced by their gcd first).
pub const MAX_SLOTS_PER_SERVICE: u32 = 16_384;
/// A service has at most this many backends.
pub const MAX_BACKENDS_PER_SERVICE: u32 = 1_024;
/// The largest weight a backend may have.
pub const MAX_WEIGHT: u32 = 1_000;
/// Bytes kept of a service's name for the CLI (longer names are rejected by validation).
pub const SERVICE_NAME_LEN: usize = 64;

/// `Service::flags`: with no backend, fail the connect with ECONNREFUSED (default); without
/// this flag the connect passes through to the VIP untouched.
pub const SVC_F_REJECT_EMPTY: u32 = 1 << 0;
/// `Service::flags`: pin each client to the backend it got first (session affinity).
pub const SVC_F_AFFINITY: u32 = 1 << 1;
/// `Service::flags`: watch how TCP connects to its backends turn out (passive detection).
pub const SVC_F_PASSIVE: u32 = 1 << 2;

/// Key of the `services` map: what a client connects to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ServiceKey {
    /// Virtual IP, network order; IPv4 in the first 4 bytes.
    pub ip: [u8; 16],
    /// Virtual port, host order.
    pub port: u16,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
}

/// Value of the `services` map. Written in one map update, so the kernel sees either the old or
/// the new slot set, never a mix.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Service {
    /// Stable id: indexes `rr_state`, `service_stats` and `service_names`.
    pub id: u32,
    /// Which slot set (`SlotKey::generation`) is live.
    pub generation: u32,
    /// Number of slots in the live set; 0 means no backend is available.
    pub slot_count: u32,
    /// `SVC_F_*` bits.
    pub flags: u32,
    /// Session affinity timeout in seconds (used with `SVC_F_AFFINITY`).
    pub affinity_timeout_secs: u32,
    pub _pad: u32,
}

/// Key of the `slots` map: one position of a service's weighted round-robin sequence.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct SlotKey {
    pub service_id: u32,
    pub generation: u32,
    /// 0 ..< `Service::slot_count`.
    pub slot: u32,
}

/// Value of the `slots` map: the backend at that position, with its address, so that a connect
/// reads one map for it, not two (the address is the `backends` entry of `backend_id`, which
/// never changes while the id is in use).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SlotValue {
    pub backend_id: u32,
    pub backend: Backend,
}

/// Value of the `backends` map (key: backend id, u32). Backends are shared by services.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Backend {
    /// Backend IP, network order; IPv4 in the first 4 bytes.
    pub ip: [u8; 16],
    /// Backend port, host order.
    pub port: u16,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    pub _pad: u8,
}

/// Key of the `backend_stats` map: counters per (service, backend).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct BackendStatsKey {
    pub service_id: u32,
    pub backend_id: u32,
}

/// Buckets of the per-backend TCP round-trip-time histogram: bucket `i` counts connections
/// whose smoothed RTT at close was above the previous bound and at most
/// `RTT_BUCKET_BASE_US << i` microseconds (Prometheus `le` semantics); the last bucket counts
/// the rest.
pub const RTT_BUCKETS: usize = 16;
pub const RTT_BUCKET_BASE_US: u64 = 16;

/// Value of the `backend_stats` map (the kernel adds to it atomically).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BackendStats {
    /// Connects (and unconnected UDP sends) translated to this backend.
    pub connections: u64,
    /// TCP connects to this backend that failed (refused, timed out) before establishing.
    pub connect_failures: u64,
    /// Telemetry (when on): payload bytes of closed TCP connections, as the client's socket
    /// counted them (acknowledged bytes sent, bytes received; SYN and FIN not counted).
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Telemetry: closed TCP connections measured, and the sum of their smoothed RTTs (us).
    pub rtt_samples: u64,
    pub rtt_sum_us: u64,
    pub rtt_buckets: [u64; RTT_BUCKETS],
}

/// Value of the `passive` map (key: `BackendStatsKey`): connect outcomes seen by the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PassiveState {
    /// Failed connects since the last successful one; the agent resets it after acting on it.
    pub consecutive_failures: u32,
    pub _pad: u32,
}

/// Index 0 of the `settings` array: switches the agent sets for the programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Settings {
    /// `SETTINGS_F_*` bits.
    pub flags: u32,
    /// The next service and backend ids the agent hands out. Kept here so ids are not reused
    /// across agent restarts while sockets may still carry them (only the agent reads these).
    pub next_service_id: u32,
    pub next_backend_id: u32,
    pub _pad: u32,
}

/// `Settings::flags`: record per-backend bytes and RTT of TCP connections at close.
pub const SETTINGS_F_TELEMETRY: u32 = 1 << 0;
/// `Settings::flags`: answer getsockopt(SO_ORIGINAL_DST) on TCP sockets connected through a
/// VIP. Their translation then lives in socket-local storage (allocated per connect) instead
/// of the `tcp_peers` array, which the getsockopt hook cannot read (it has no socket
/// cookie helper).
pub const SETTINGS_F_ORIGINAL_DST: u32 = 1 << 1;

/// Value of the `service_stats` array (index: service id; the kernel adds atomically).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceStats {
    /// Connects to the VIP that found no backend.
    pub no_backend: u64,
}

/// Value of the `service_names` map (key: service id). Only user space reads it; it lets the CLI
/// name services from the pinned maps alone, without a running agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceName {
    /// UTF-8, zero padded.
    pub name: [u8; SERVICE_NAME_LEN],
}

impl Default for ServiceName {
    fn default() -> Self {
        Self {
            name: [0; SERVICE_NAME_LEN],
        }
    }
}

/// Index 0 of the per-CPU `datapath_stats` array: node-wide counters of the data path.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DatapathStats {
    /// Sockets given reverse-translation state (socket-local storage, freed with the socket).
    pub rev_created: u64,
    /// Sockets with reverse-translation state that were released. Equal to `rev_created` once
    /// every such socket is closed: the state cannot leak.
    pub rev_released: u64,
    /// Connected UDP sockets recorded in `udp_flows` (so they can be terminated when their
    /// backend leaves).
    pub udp_flows_added: u64,
    /// Connected UDP sockets that could not be recorded because `udp_flows` was full.
    pub udp_flows_full: u64,
    /// Failed connects whose first failure could not be recorded because `passive` was full.
    pub passive_full: u64,
    /// Session-affinity picks that could not be remembered because inserting into `affinity`
    /// failed.
    pub affinity_full: u64,
    /// Translated sockets that got no reverse-translation state (socket-local storage could not
    /// be created): their getpeername/recvmsg show the backend, and a connected UDP socket is
    /// not recorded in `udp_flows`.
    pub rev_failed: u64,
    /// Round-robin picks whose slot (or the backend it names) was gone, so the service entry
    /// was read again and the pick retried in its live slot set (a generation switch raced the
    /// connect).
    pub slot_retries: u64,
    /// Retried picks that found no slot either; the connect was treated as "no backend".
    pub slot_misses: u64,
}

/// Value of the `udp_flows` map (key: socket cookie, u64): a connected UDP socket the load
/// balancer pointed at a backend. Deleted when the socket is released.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct UdpFlow {
    pub service_id: u32,
    pub backend_id: u32,
}

/// Key of the LRU `affinity` map: one client of one service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AffinityKey {
    pub service_id: u32,
    pub _pad: u32,
    /// Network namespace of the client (a pod, on Kubernetes).
    pub netns_cookie: u64,
    /// cgroup v2 id of the connecting process (a container, or a systemd service).
    pub cgroup_id: u64,
}

/// Value of the `affinity` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AffinityValue {
    pub backend_id: u32,
    pub _pad: u32,
    /// bpf_ktime_get_ns() of the last connect that used this entry.
    pub last_used_ns: u64,
}

/// Default capacities of the maps whose size does not follow from the registry.
pub const DEFAULT_MAX_UDP_FLOWS: u32 = 65_536;
pub const DEFAULT_MAX_AFFINITY: u32 = 65_536;
/// Entries of the `tcp_peers` array, which holds the translation of a TCP socket connected
/// through a VIP at index `cookie % DEFAULT_MAX_TCP_PEERS` (`tcp_peer_index`). A socket whose
/// entry another open socket holds keeps its translation in socket-local storage instead
/// (slower to create, same behaviour). A power of two, so the index is a mask.
pub const DEFAULT_MAX_TCP_PEERS: u32 = 65_536;
/// Size of a `tcp_peers` value. Its layout is the kernel's; the agent only reads the first
/// field, the socket cookie that holds the entry (0: free).
pub const TCP_PEER_ENTRY_SIZE: usize = 64;

const _: () = assert!(DEFAULT_MAX_TCP_PEERS.is_power_of_two());

/// The `tcp_peers` index of the socket with `cookie`.
#[inline(always)]
pub fn tcp_peer_index(cookie: u64) -> u32 {
    (cookie & u64::from(DEFAULT_MAX_TCP_PEERS - 1)) as u32
}

/// Names of the maps as declared in the eBPF object (the kernel truncates names to 15 bytes).
pub mod map_names {
    pub const SERVICES: &str = "SERVICES";
    pub const SLOTS: &str = "SLOTS";
    pub const BACKENDS: &str = "BACKENDS";
    pub const RR_STATE: &str = "RR_STATE";
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    pub const SERVICE_STATS: &str = "SERVICE_STATS";
    pub const SERVICE_NAMES: &str = "SERVICE_NAMES";
    pub const ACTIVE: &str = "ACTIVE";
    pub const AFFINITY: &str = "AFFINITY";
    pub const UDP_FLOWS: &str = "UDP_FLOWS";
    pub const TCP_PEERS: &str = "TCP_PEERS";
    pub const DATAPATH_STATS: &str = "DATAPATH_STATS";
    pub const PASSIVE: &str = "PASSIVE";
    pub const SETTINGS: &str = "SETTINGS";
    pub const EXT_SERVICES: &str = "EXT_SERVICES";
    pub const NAT_FLOWS: &str = "NAT_FLOWS";
    pub const NP_DEVICES: &str = "NP_DEVICES";
    pub const NP_STATS: &str = "NP_STATS";
    pub const NP_BACKEND_STATS: &str = "NP_BACKEND_STATS";
    pub const NP_EVENTS: &str = "NP_EVENTS";
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all types are repr(C), Copy, and have no implicit padding (checked below).
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for Service {}
    unsafe impl aya::Pod for SlotKey {}
    unsafe impl aya::Pod for SlotValue {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for BackendStatsKey {}
    unsafe impl aya::Pod for BackendStats {}
    unsafe impl aya::Pod for ServiceStats {}
    unsafe impl aya::Pod for ServiceName {}
    unsafe impl aya::Pod for DatapathStats {}
    unsafe impl aya::Pod for UdpFlow {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for PassiveState {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for TcpSockFields {}
}

// No implicit padding: the size is the sum of the fields.
const _: () = {
    assert!(core::mem::size_of::<ServiceKey>() == 20);
    assert!(core::mem::size_of::<Service>() == 24);
    assert!(core::mem::size_of::<SlotKey>() == 12);
    assert!(core::mem::size_of::<Backend>() == 20);
    assert!(core::mem::size_of::<SlotValue>() == 24);
    assert!(core::mem::size_of::<BackendStatsKey>() == 8);
    assert!(core::mem::size_of::<BackendStats>() == 8 * (6 + RTT_BUCKETS));
    assert!(core::mem::size_of::<PassiveState>() == 8);
    assert!(core::mem::size_of::<Settings>() == 16);
    assert!(core::mem::size_of::<ServiceStats>() == 8);
    assert!(core::mem::size_of::<ServiceName>() == SERVICE_NAME_LEN);
    assert!(core::mem::size_of::<DatapathStats>() == 8 * 9);
    assert!(core::mem::size_of::<UdpFlow>() == 8);
    assert!(core::mem::size_of::<AffinityKey>() == 24);
    assert!(core::mem::size_of::<AffinityValue>() == 16);
};

// ---------------------------------------------------------------------------------------------
// Helpers of the kernel programs
// ---------------------------------------------------------------------------------------------
//
// The sock_addr context holds an address as four u32 words (`user_ip4`, `user_ip6[0..4]`), each
// the next 4 bytes of the address in network order loaded as a native-endian integer; a port is
// the low 16 bits of `user_port`, network order. The helpers below take and give words in that
// raw form ([`RawIp`]).

/// An address as the sock_addr context holds it: IPv4 is `[ip, 0, 0, 0]`.
pub type RawIp = [u32; 4];

/// Third word of a v4-mapped address (`::ffff:a.b.c.d` is `[0, 0, V4_MAPPED_PREFIX, ip]`).
pub const V4_MAPPED_PREFIX: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// Whether an IPv6 address is v4-mapped (`::ffff:a.b.c.d`): an AF_INET6 socket with
/// IPV6_V6ONLY=0 reaches IPv4 addresses that way.
#[inline(always)]
pub fn is_v4_mapped(ip: &RawIp) -> bool {
    // Words 1 and 2 compared as one u64: LLVM 22 compiled `ip[2] == V4_MAPPED_PREFIX` for bpf
    // (`--cpu generic` with ALU32, no JMP32) into a 64-bit compare of the zero-extended word
    // with the sign-extended immediate 0xffff0000, which never matched.
    let middle = u64::from(ip[1]) | (u64::from(ip[2]) << 32);
    ip[0] == 0 && middle == u64::from(V4_MAPPED_PREFIX) << 32
}

/// The v4-mapped IPv6 form of an IPv4 address word.
#[inline(always)]
pub fn v4_mapped(ip4: u32) -> RawIp {
    [0, 0, V4_MAPPED_PREFIX, ip4]
}

/// Host-order port of a raw `user_port`.
#[inline(always)]
pub fn port_from_raw(raw: u32) -> u16 {
    let b = raw.to_ne_bytes();
    u16::from_be_bytes([b[0], b[1]])
}

/// Raw `user_port` of a host-order port.
#[inline(always)]
pub fn port_to_raw(port: u16) -> u32 {
    let b = port.to_be_bytes();
    u32::from_ne_bytes([b[0], b[1], 0, 0])
}

impl ServiceKey {
    /// The key a connect (or sendmsg) to `ip`:`raw_port` looks up. `family` is the hook's
    /// (`FAMILY_V4` for connect4/sendmsg4, `FAMILY_V6` for the 6 hooks); a v4-mapped address
    /// seen by a 6 hook is the IPv4 service.
    #[inline(always)]
    pub fn from_raw(family: u8, ip: &RawIp, raw_port: u32, proto: u32) -> ServiceKey {
        let mut key = ServiceKey {
            port: port_from_raw(raw_port),
            proto: proto as u8,
            ..ServiceKey::default()
        };
        if family == FAMILY_V4 || is_v4_mapped(ip) {
            let v4 = if family == FAMILY_V4 { ip[0] } else { ip[3] };
            key.family = FAMILY_V4;
            let word = v4.to_ne_bytes();
            key.ip[0] = word[0];
            key.ip[1] = word[1];
            key.ip[2] = word[2];
            key.ip[3] = word[3];
        } else {
            key.family = FAMILY_V6;
            let mut i = 0;
            while i < 4 {
                let word = ip[i].to_ne_bytes();
                key.ip[i * 4] = word[0];
                key.ip[i * 4 + 1] = word[1];
                key.ip[i * 4 + 2] = word[2];
                key.ip[i * 4 + 3] = word[3];
                i += 1;
            }
        }
        key
    }
}

impl Backend {
    /// The backend's address as a hook of `family` writes it: raw words, and an IPv4 backend
    /// v4-mapped for a 6 hook (the form an AF_INET6 socket uses for IPv4 peers).
    #[inline(always)]
    pub fn raw_ip(&self, family: u8) -> RawIp {
        let b = &self.ip;
        let word =
            |i: usize| u32::from_ne_bytes([b[i * 4], b[i * 4 + 1], b[i * 4 + 2], b[i * 4 + 3]]);
        if self.family == FAMILY_V4 {
            if family == FAMILY_V4 {
                [word(0), 0, 0, 0]
            } else {
                v4_mapped(word(0))
            }
        } else {
            [word(0), word(1), word(2), word(3)]
        }
    }

    /// The backend's port in `user_port` form.
    #[inline(always)]
    pub fn raw_port(&self) -> u32 {
        port_to_raw(self.port)
    }
}

/// The slot of a service's live set that round-robin turn `turn` uses (0 when the set is
/// empty; callers check `slot_count` first).
#[inline(always)]
pub fn slot_index(turn: u64, slot_count: u32) -> u32 {
    if slot_count == 0 {
        return 0;
    }
    (turn % u64::from(slot_count)) as u32
}

/// The `BackendStats::rtt_buckets` index of a smoothed RTT: the first bucket whose bound
/// (`RTT_BUCKET_BASE_US << i`) is at least `rtt_us`, or the last one.
#[inline(always)]
pub fn rtt_bucket(rtt_us: u64) -> usize {
    let mut bucket = 0;
    // Bounded by RTT_BUCKETS, as the verifier needs.
    while bucket < RTT_BUCKETS - 1 && rtt_us > RTT_BUCKET_BASE_US << bucket {
        bucket += 1;
    }
    bucket
}

/// TCP states (`include/net/tcp_states.h`), as `bpf_sock.state` shows them.
pub mod tcp_state {
    pub const ESTABLISHED: u32 = 1;
    pub const SYN_SENT: u32 = 2;
    pub const SYN_RECV: u32 = 3;
    pub const FIN_WAIT1: u32 = 4;
    pub const FIN_WAIT2: u32 = 5;
    pub const TIME_WAIT: u32 = 6;
    pub const CLOSE: u32 = 7;
    pub const CLOSE_WAIT: u32 = 8;
    pub const LAST_ACK: u32 = 9;
    pub const LISTEN: u32 = 10;
    pub const CLOSING: u32 = 11;
}

/// Where the fields the kernel programs read at a TCP socket's release lie in the running
/// kernel's `struct tcp_sock` (which begins with `struct sock`): byte offsets the agent takes
/// from the kernel's BTF and sets as a read-only global before loading the programs. All 0:
/// not set, nothing is read.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TcpSockFields {
    /// `sk_flags` (unsigned long) and the bit of `SOCK_DONE` in it (the peer's FIN arrived).
    pub sk_flags: u32,
    pub sock_done_bit: u32,
    /// u32 sequence numbers: next byte the application writes, oldest unacknowledged byte.
    pub write_seq: u32,
    pub snd_una: u32,
    /// u32, 8 times the smoothed RTT in µs.
    pub srtt_us: u32,
    /// u64 counts of the sequence space acknowledged by the peer and received from it.
    pub bytes_received: u32,
    pub bytes_acked: u32,
    /// `sk_cookie` (u64): 0 until someone asks for the socket's cookie. Translating a TCP
    /// connect always does, so a TCP socket released with 0 was never translated.
    pub sk_cookie: u32,
}

/// What the kernel programs read of a TCP socket when it is released (before close() does
/// anything to the connection).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TcpCounters {
    /// `bpf_sock.state`.
    pub state: u32,
    /// `SOCK_DONE`: the peer's FIN arrived (a reset does not set it).
    pub fin_received: bool,
    pub write_seq: u32,
    pub snd_una: u32,
    pub bytes_acked: u64,
    pub bytes_received: u64,
}

/// Whether the peer's FIN may have arrived on a socket in `state`: not in ESTABLISHED,
/// FIN_WAIT1 or FIN_WAIT2 (its FIN moves those on), nor before the connection exists. The
/// release reads `SOCK_DONE` only when it may be set.
pub fn peer_fin_possible(state: u32) -> bool {
    matches!(
        state,
        tcp_state::CLOSE_WAIT
            | tcp_state::LAST_ACK
            | tcp_state::CLOSING
            | tcp_state::TIME_WAIT
            | tcp_state::CLOSE
    )
}

/// The payload a released TCP connection carried: (bytes the application wrote, bytes it
/// received), or None if its connect never completed.
///
/// `bytes_acked` and `bytes_received` follow snd_una and rcv_nxt, so they count SYN and FIN as
/// one byte each: a SYN acknowledged is the sign of a completed connect (1 right after it), and
/// those flags are taken out. Written bytes still unacknowledged at release (`write_seq -
/// snd_una`, which then includes a FIN queued by shutdown()) are counted as sent: the kernel
/// goes on sending them after close(). One ambiguity is left: a socket released in CLOSE after
/// both FINs (an orderly close through TIME_WAIT) and one reset after the peer's FIN look alike;
/// both are counted as the orderly close (one byte less sent for such a reset).
pub fn released_payload(c: &TcpCounters) -> Option<(u64, u64)> {
    if c.bytes_acked == 0 {
        return None;
    }
    let fin_written = match c.state {
        tcp_state::FIN_WAIT1 | tcp_state::FIN_WAIT2 | tcp_state::CLOSING | tcp_state::LAST_ACK => 1,
        tcp_state::CLOSE => u64::from(c.fin_received),
        _ => 0,
    };
    let written = c.bytes_acked + u64::from(c.write_seq.wrapping_sub(c.snd_una));
    Some((
        written.saturating_sub(1 + fin_written),
        c.bytes_received.saturating_sub(u64::from(c.fin_received)),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Raw words of an address, as the kernel lays them out in the context.
    fn raw(octets: [u8; 16]) -> RawIp {
        let w = |i: usize| {
            u32::from_ne_bytes([
                octets[i * 4],
                octets[i * 4 + 1],
                octets[i * 4 + 2],
                octets[i * 4 + 3],
            ])
        };
        [w(0), w(1), w(2), w(3)]
    }

    fn raw4(octets: [u8; 4]) -> u32 {
        u32::from_ne_bytes(octets)
    }

    fn mapped_octets(v4: [u8; 4]) -> [u8; 16] {
        let mut o = [0u8; 16];
        o[10] = 0xff;
        o[11] = 0xff;
        o[12..].copy_from_slice(&v4);
        o
    }

    /// Sequential cookies (one CPU's batch) take distinct entries until the index wraps; every
    /// index is inside the array.
    #[test]
    fn tcp_peer_index_spreads_sequential_cookies_over_the_array() {
        let n = u64::from(DEFAULT_MAX_TCP_PEERS);
        let first = 4096 * 7 + 3;
        extern crate std;
        let indexes: std::collections::BTreeSet<u32> =
            (first..first + n).map(tcp_peer_index).collect();
        assert_eq!(indexes.len() as u64, n);
        assert_eq!(tcp_peer_index(first), tcp_peer_index(first + n));
        assert!(indexes.iter().all(|&i| i < DEFAULT_MAX_TCP_PEERS));
    }

    #[test]
    fn detects_and_builds_v4_mapped_addresses() {
        let mapped = raw(mapped_octets([127, 100, 70, 1]));
        assert!(is_v4_mapped(&mapped));
        assert_eq!(v4_mapped(raw4([127, 100, 70, 1])), mapped);
        // ::1, fd00::ffff:7f64:4601 (prefix in the wrong word) and ::7f64:4601 (v4-compatible,
        // not mapped) are not v4-mapped.
        let mut loopback = [0u8; 16];
        loopback[15] = 1;
        assert!(!is_v4_mapped(&raw(loopback)));
        let mut other = mapped_octets([127, 100, 70, 1]);
        other[0] = 0xfd;
        assert!(!is_v4_mapped(&raw(other)));
        let mut compat = mapped_octets([127, 100, 70, 1]);
        compat[10] = 0;
        compat[11] = 0;
        assert!(!is_v4_mapped(&raw(compat)));
    }

    #[test]
    fn ports_convert_between_raw_and_host_order() {
        // user_port holds the port's two network-order bytes first.
        let raw_80 = u32::from_ne_bytes([0, 80, 0, 0]);
        assert_eq!(port_from_raw(raw_80), 80);
        assert_eq!(port_to_raw(80), raw_80);
        assert_eq!(port_from_raw(port_to_raw(8443)), 8443);
        assert_eq!(port_to_raw(0x1234).to_ne_bytes(), [0x12, 0x34, 0, 0]);
    }

    #[test]
    fn service_key_of_an_ipv4_destination() {
        let key = ServiceKey::from_raw(
            FAMILY_V4,
            &[raw4([127, 100, 70, 1]), 0, 0, 0],
            port_to_raw(80),
            u32::from(PROTO_TCP),
        );
        let mut ip = [0u8; 16];
        ip[..4].copy_from_slice(&[127, 100, 70, 1]);
        assert_eq!(
            key,
            ServiceKey {
                ip,
                port: 80,
                proto: PROTO_TCP,
                family: FAMILY_V4
            }
        );
    }

    #[test]
    fn service_key_of_a_v4_mapped_destination_is_the_ipv4_service() {
        let v4 = ServiceKey::from_raw(
            FAMILY_V4,
            &[raw4([127, 100, 70, 3]), 0, 0, 0],
            port_to_raw(53),
            u32::from(PROTO_UDP),
        );
        let mapped = ServiceKey::from_raw(
            FAMILY_V6,
            &raw(mapped_octets([127, 100, 70, 3])),
            port_to_raw(53),
            u32::from(PROTO_UDP),
        );
        assert_eq!(mapped, v4);
        assert_eq!(mapped.family, FAMILY_V4);
    }

    #[test]
    fn service_key_of_an_ipv6_destination() {
        let octets = [0xfd, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let key = ServiceKey::from_raw(FAMILY_V6, &raw(octets), port_to_raw(443), 6);
        assert_eq!(
            key,
            ServiceKey {
                ip: octets,
                port: 443,
                proto: 6,
                family: FAMILY_V6
            }
        );
    }

    #[test]
    fn backend_addresses_in_the_form_each_hook_writes() {
        let mut ip = [0u8; 16];
        ip[..4].copy_from_slice(&[127, 0, 0, 1]);
        let v4 = Backend {
            ip,
            port: 9001,
            family: FAMILY_V4,
            _pad: 0,
        };
        assert_eq!(v4.raw_ip(FAMILY_V4), [raw4([127, 0, 0, 1]), 0, 0, 0]);
        assert_eq!(v4.raw_ip(FAMILY_V6), raw(mapped_octets([127, 0, 0, 1])));
        assert_eq!(v4.raw_port(), port_to_raw(9001));
        let octets = [0xfd, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let v6 = Backend {
            ip: octets,
            port: 8080,
            family: FAMILY_V6,
            _pad: 0,
        };
        assert_eq!(v6.raw_ip(FAMILY_V6), raw(octets));
    }

    #[test]
    fn slot_index_walks_the_set_in_order() {
        let slots: [u32; 7] = core::array::from_fn(|turn| slot_index(turn as u64, 3));
        assert_eq!(slots, [0, 1, 2, 0, 1, 2, 0]);
        assert_eq!(slot_index(u64::MAX, 16_384), (u64::MAX % 16_384) as u32);
        assert_eq!(slot_index(5, 1), 0);
        assert_eq!(slot_index(5, 0), 0);
    }

    #[test]
    fn rtt_buckets_use_le_bounds() {
        assert_eq!(rtt_bucket(0), 0);
        assert_eq!(rtt_bucket(RTT_BUCKET_BASE_US), 0);
        assert_eq!(rtt_bucket(RTT_BUCKET_BASE_US + 1), 1);
        assert_eq!(rtt_bucket(RTT_BUCKET_BASE_US << 3), 3);
        assert_eq!(rtt_bucket((RTT_BUCKET_BASE_US << 3) + 1), 4);
        assert_eq!(
            rtt_bucket(RTT_BUCKET_BASE_US << (RTT_BUCKETS - 2)),
            RTT_BUCKETS - 2
        );
        assert_eq!(rtt_bucket(u64::MAX), RTT_BUCKETS - 1);
    }

    #[test]
    fn the_peer_fin_is_possible_only_after_the_states_it_leads_to() {
        for state in [
            tcp_state::CLOSE_WAIT,
            tcp_state::LAST_ACK,
            tcp_state::CLOSING,
            tcp_state::TIME_WAIT,
            tcp_state::CLOSE,
        ] {
            assert!(peer_fin_possible(state), "{state}");
        }
        for state in [
            tcp_state::ESTABLISHED,
            tcp_state::SYN_SENT,
            tcp_state::FIN_WAIT1,
            tcp_state::FIN_WAIT2,
            tcp_state::LISTEN,
        ] {
            assert!(!peer_fin_possible(state), "{state}");
        }
    }

    #[test]
    fn released_payload_takes_syn_and_fins_out() {
        let open = |state, bytes_acked, bytes_received| TcpCounters {
            state,
            bytes_acked,
            bytes_received,
            write_seq: 5_000,
            snd_una: 5_000,
            fin_received: false,
        };
        // Never acknowledged: the connect failed (or was abandoned in SYN_SENT).
        assert_eq!(released_payload(&open(tcp_state::SYN_SENT, 0, 0)), None);
        assert_eq!(released_payload(&open(tcp_state::CLOSE, 0, 0)), None);
        // Connected, nothing exchanged: what `ss -ti` shows as bytes_acked:1.
        assert_eq!(
            released_payload(&open(tcp_state::ESTABLISHED, 1, 0)),
            Some((0, 0))
        );
        // 100 bytes sent and acknowledged, 50 received.
        assert_eq!(
            released_payload(&open(tcp_state::ESTABLISHED, 101, 50)),
            Some((100, 50))
        );
        // The peer closed first: its FIN is one byte of bytes_received.
        let peer_closed = TcpCounters {
            fin_received: true,
            ..open(tcp_state::CLOSE_WAIT, 101, 51)
        };
        assert_eq!(released_payload(&peer_closed), Some((100, 50)));
        // 30 bytes written and not yet acknowledged still count as sent; across a wrap too.
        let in_flight = TcpCounters {
            write_seq: 10,
            snd_una: u32::MAX - 19,
            ..open(tcp_state::ESTABLISHED, 101, 50)
        };
        assert_eq!(released_payload(&in_flight), Some((130, 50)));
        // shutdown(SHUT_WR) queued our FIN: acknowledged (FIN_WAIT2) or not (FIN_WAIT1).
        assert_eq!(
            released_payload(&open(tcp_state::FIN_WAIT2, 102, 50)),
            Some((100, 50))
        );
        let fin_in_flight = TcpCounters {
            write_seq: 5_001,
            ..open(tcp_state::FIN_WAIT1, 101, 50)
        };
        assert_eq!(released_payload(&fin_in_flight), Some((100, 50)));
        // Both FINs, through TIME_WAIT: the socket is released in CLOSE.
        let orderly = TcpCounters {
            fin_received: true,
            ..open(tcp_state::CLOSE, 102, 51)
        };
        assert_eq!(released_payload(&orderly), Some((100, 50)));
        // Reset before any FIN.
        assert_eq!(
            released_payload(&open(tcp_state::CLOSE, 101, 50)),
            Some((100, 50))
        );
    }
}
