//! Map keys and values shared by the kernel programs (`mesh-ebpf`) and the agent (`mesh-user`).
//!
//! Every type is `#[repr(C)]` with explicit padding so its layout is the same on both sides and
//! `bpftool map dump` prints every byte as a named field. Conventions:
//! - IP addresses are 16 bytes in network order (what `ip.octets()` gives); an IPv4 address uses
//!   the first 4 bytes and leaves the rest zero. `bpftool` prints them as byte arrays.
//! - Ports are in host order, so `bpftool` prints `80` for port 80.
//! - Ids are allocated by the agent; id 0 is reserved to mean "none".
#![no_std]

pub mod capacity;

/// Bump when any map key or value below changes layout. It is part of every pin path, so a new
/// agent never reuses a pinned map with an old layout.
pub const LAYOUT_VERSION: u32 = 2;

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

/// Key of the per-CPU `backend_stats` map: counters per (service, backend).
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

/// Value of the per-CPU `backend_stats` map. User space sums the CPUs.
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

/// Value of the per-CPU `service_stats` array (index: service id).
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
    pub const DATAPATH_STATS: &str = "DATAPATH_STATS";
    pub const PASSIVE: &str = "PASSIVE";
    pub const SETTINGS: &str = "SETTINGS";
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all types are repr(C), Copy, and have no implicit padding (checked below).
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for Service {}
    unsafe impl aya::Pod for SlotKey {}
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
}

// No implicit padding: the size is the sum of the fields.
const _: () = {
    assert!(core::mem::size_of::<ServiceKey>() == 20);
    assert!(core::mem::size_of::<Service>() == 24);
    assert!(core::mem::size_of::<SlotKey>() == 12);
    assert!(core::mem::size_of::<Backend>() == 20);
    assert!(core::mem::size_of::<BackendStatsKey>() == 8);
    assert!(core::mem::size_of::<BackendStats>() == 8 * (6 + RTT_BUCKETS));
    assert!(core::mem::size_of::<PassiveState>() == 8);
    assert!(core::mem::size_of::<Settings>() == 16);
    assert!(core::mem::size_of::<ServiceStats>() == 8);
    assert!(core::mem::size_of::<ServiceName>() == SERVICE_NAME_LEN);
    assert!(core::mem::size_of::<DatapathStats>() == 32);
    assert!(core::mem::size_of::<UdpFlow>() == 8);
    assert!(core::mem::size_of::<AffinityKey>() == 24);
    assert!(core::mem::size_of::<AffinityValue>() == 16);
};
