//! Every map of the programs. The agent pins them (lower-case names) and owns their content,
//! except where a comment says the kernel writes.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, SkStorage},
    macros::btf_map,
};
use mesh_common::{
    AffinityKey, AffinityValue, Backend, BackendStats, BackendStatsKey, DEFAULT_MAX_AFFINITY,
    DEFAULT_MAX_BACKENDS, DEFAULT_MAX_SERVICES, DEFAULT_MAX_SLOTS, DEFAULT_MAX_TCP_PEERS,
    DEFAULT_MAX_UDP_FLOWS, DatapathStats, PassiveState, Service, ServiceKey, ServiceName,
    ServiceStats, Settings, SlotKey, SlotValue, UdpFlow,
    nodeport::{
        DEFAULT_MAX_EXTERNAL_FLOWS, FlowKey, MAX_NODEPORT_DEVICES, NatEntry, NodeportBackendStats,
        NodeportDevice, NodeportEvents, NodeportStats,
    },
};

const NO_PREALLOC: usize = BPF_F_NO_PREALLOC as usize;
const MAX_SERVICES: usize = DEFAULT_MAX_SERVICES as usize;
const MAX_BACKENDS: usize = DEFAULT_MAX_BACKENDS as usize;
const MAX_SLOTS: usize = DEFAULT_MAX_SLOTS as usize;

/// A map from VIPs to services: `SERVICES` (connects on this node) and `EXT_SERVICES`
/// (traffic from other hosts) have this one type, so the same round-robin serves both.
pub type ServiceMap = HashMap<ServiceKey, Service, MAX_SERVICES, NO_PREALLOC>;

/// VIP (ip, port, protocol, family) -> service (id, live slot set, flags).
#[btf_map]
pub static SERVICES: ServiceMap = HashMap::new();

/// (service id, generation, slot) -> backend id and address. A slot set is written in full
/// before the service entry points at it; the old set may be deleted right after the switch.
#[btf_map]
pub static SLOTS: HashMap<SlotKey, SlotValue, MAX_SLOTS, NO_PREALLOC> = HashMap::new();

/// Backend id -> address (session affinity's remembered backends; the slots carry their own
/// copy).
#[btf_map]
pub static BACKENDS: HashMap<u32, Backend, MAX_BACKENDS, NO_PREALLOC> = HashMap::new();

/// Service id -> round-robin position, advanced by the kernel with an atomic fetch-add (shared
/// by all CPUs so sequential connects walk the slots exactly in order).
#[btf_map]
pub static RR_STATE: Array<u64, MAX_SERVICES> = Array::new();

/// (service id, backend id) -> counters, which the kernel adds to atomically (`stats::add`).
/// An entry exists exactly while the backend is a member of the service. Not per-CPU: the
/// kernel allocates a per-CPU value for each entry the agent creates, about 17 us each here,
/// which was two thirds of a cold start at 10k services (BENCHMARKS.md); a counter is touched
/// once or twice per connection, where the round-robin position's shared atomic already is.
#[btf_map]
pub static BACKEND_STATS: HashMap<BackendStatsKey, BackendStats, MAX_BACKENDS, NO_PREALLOC> =
    HashMap::new();

/// Service id -> counters, which the kernel adds to atomically. A plain array: a per-CPU one
/// allocates a per-CPU value for every id when the map is created.
#[btf_map]
pub static SERVICE_STATS: Array<ServiceStats, MAX_SERVICES> = Array::new();

/// Service id -> name. Written by the agent for the CLI; never read here.
#[btf_map]
pub static SERVICE_NAMES: HashMap<u32, ServiceName, MAX_SERVICES, NO_PREALLOC> = HashMap::new();

/// (service id, backend id) -> weight, for backends that take new connections. Session
/// affinity only keeps a client on a backend that is still in here.
#[btf_map]
pub static ACTIVE: HashMap<BackendStatsKey, u32, MAX_BACKENDS, NO_PREALLOC> = HashMap::new();

/// (service, client) -> backend, for services with session affinity. Written by the kernel.
#[btf_map]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue, { DEFAULT_MAX_AFFINITY as usize }> =
    LruHashMap::new();

/// Socket cookie -> (service, backend) of connected UDP sockets the load balancer translated.
/// Written by the kernel at connect(), deleted at the socket's release.
#[btf_map]
pub static UDP_FLOWS: HashMap<u64, UdpFlow, { DEFAULT_MAX_UDP_FLOWS as usize }> = HashMap::new();

/// Node-wide per-CPU counters (index 0), which the kernel adds to.
#[btf_map]
pub static DATAPATH_STATS: PerCpuArray<DatapathStats, 1> = PerCpuArray::new();

/// (service, backend) -> consecutive failed connects, for passive health detection. The kernel
/// creates an entry only for a pair that has a `BACKEND_STATS` entry.
#[btf_map]
pub static PASSIVE: HashMap<BackendStatsKey, PassiveState, MAX_BACKENDS, NO_PREALLOC> =
    HashMap::new();

/// The agent's record of its settings and id cursors (index 0), for the next agent and for
/// operators; the programs get the settings as a read-only global instead (`settings`).
#[btf_map]
pub static SETTINGS: Array<Settings, 1> = Array::new();

/// Reverse translation of one socket, in socket-local storage: the kernel frees it with the
/// socket, so it can neither fill up nor leak nor evict live entries. Used for UDP, and for TCP
/// when the socket's `tcp_peers` entry is taken or SO_ORIGINAL_DST is on: creating it costs an
/// allocation per socket (about 750 ns of BPF time here, BENCHMARKS.md).
#[btf_map]
pub static SOCK_REV: SkStorage<SockRev> = SkStorage::new();

/// Translations of TCP sockets connected through a VIP, direct-mapped by socket cookie
/// (`tcp_peer_index`): an entry belongs to the socket whose cookie it holds, claimed with a
/// compare-and-swap at connect() and freed at the socket's release. An array, not a hash
/// keyed by cookie: a hash insert and delete (bucket lock, free list, cold bucket lines) cost
/// about 600 ns per connection here, the array's compare-and-swap one cache line
/// (BENCHMARKS.md). Written by the kernel only.
#[btf_map]
pub static TCP_PEERS: Array<TcpPeerEntry, { DEFAULT_MAX_TCP_PEERS as usize }> = Array::new();

/// A `TCP_PEERS` entry: the translation of the socket with `cookie`, or free (`cookie` 0; no
/// socket has cookie 0).
#[repr(C)]
pub struct TcpPeerEntry {
    pub cookie: u64,
    pub peer: TcpPeer,
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<TcpPeerEntry>() == mesh_common::TCP_PEER_ENTRY_SIZE);

/// A TCP socket's translation: what getpeername() shows and whose counters its outcome feeds.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TcpPeer {
    pub peer: RevEntry,
    pub service_id: u32,
    pub backend_id: u32,
    /// As `SockRev::observe`.
    pub observe: u32,
}

/// A backend address and the VIP it stands for, both as the socket sees them.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RevEntry {
    pub backend_ip: [u32; 4],
    pub vip_ip: [u32; 4],
    pub backend_port: u32,
    pub vip_port: u32,
}

/// Unconnected UDP sockets remember this many (backend -> VIP) pairs; a socket that talks to
/// more backends at once through VIPs sees the oldest pairs' replies untranslated.
pub const REV_SENT: usize = 8;

/// The reverse-translation state of one socket (zeroed when created).
#[repr(C)]
pub struct SockRev {
    /// The connect() translation (valid when `has_peer` is 1).
    pub peer: RevEntry,
    /// sendmsg() translations of unconnected UDP, overwritten round-robin.
    pub sent: [RevEntry; REV_SENT],
    pub next_sent: u32,
    pub has_peer: u32,
    /// Who the connect went to (with `has_peer`), for the counters its outcome feeds.
    pub service_id: u32,
    pub backend_id: u32,
    /// 1 when the connection's outcome is read at release (passive detection of its service,
    /// or telemetry); otherwise nothing of the socket is read.
    pub observe: u32,
    /// 1 once the socket's cookie is in `UDP_FLOWS`: release deletes it then, and only then.
    pub has_flow: u32,
}

// ---- Traffic from other hosts (TC programs on the external devices, `nodeport`) ----

/// External address (node address + NodePort, ExternalIP, LoadBalancer IP) -> service. Keyed
/// and valued like `SERVICES`, with its own ids, pointing into the same slots and backends.
#[btf_map]
pub static EXT_SERVICES: ServiceMap = HashMap::new();

/// A packet's 5-tuple -> its translation; two entries per flow (see `mesh_common::nodeport`).
/// Written by the kernel; idle entries are deleted by the agent.
#[btf_map]
pub static NAT_FLOWS: LruHashMap<FlowKey, NatEntry, { 2 * DEFAULT_MAX_EXTERNAL_FLOWS as usize }> =
    LruHashMap::new();

/// Ifindex -> external device (its IPv4 address, the source of SNATed flows).
#[btf_map]
pub static NP_DEVICES: HashMap<u32, NodeportDevice, { MAX_NODEPORT_DEVICES as usize }> =
    HashMap::new();

/// Node-wide per-CPU counters of the TC programs (index 0).
#[btf_map]
pub static NP_STATS: PerCpuArray<NodeportStats, 1> = PerCpuArray::new();

/// (external service id, backend id) -> per-CPU packets and bytes the TC programs translated
/// for the pair. Created and deleted by the agent with the pair's `BACKEND_STATS` entry (so it
/// exists exactly while the backend is a member); the kernel only adds to it.
#[btf_map]
pub static NP_BACKEND_STATS: PerCpuHashMap<
    BackendStatsKey,
    NodeportBackendStats,
    MAX_BACKENDS,
    NO_PREALLOC,
> = PerCpuHashMap::new();

/// ICMP at the TC programs (index 0, per CPU): the rate limit of the port unreachables they
/// send, and ICMP counters.
#[btf_map]
pub static NP_EVENTS: PerCpuArray<NodeportEvents, 1> = PerCpuArray::new();
