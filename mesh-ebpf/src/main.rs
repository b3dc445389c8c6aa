//! mesh kernel programs: socket-level load balancing.
//!
//! - `connect4/6` rewrite a connect() to a service VIP into a backend chosen by weighted
//!   round-robin (or session affinity) over the service's live slot set. After connect() the
//!   socket talks to the backend directly: no per-packet work at all.
//! - `sendmsg4/6` do the same per datagram for unconnected UDP; `recvmsg4/6` make replies
//!   appear to come from the VIP; `getpeername4/6` and getsockopt(SO_ORIGINAL_DST) report the
//!   VIP. The reverse translation lives in socket-local storage, freed with the socket.
//! - `sock_release` forgets connected UDP flows and counts released reverse state.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![expect(
    internal_features,
    reason = "atomic_xadd is the only fetching atomic add on bpf"
)]

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, bpf_sock_addr},
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, bpf_sock,
    },
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, SkStorage},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns,
        bpf_set_retval, bpf_sk_storage_get,
    },
    macros::{btf_map, cgroup_sock, cgroup_sock_addr, cgroup_sockopt, sock_ops},
    programs::{SockAddrContext, SockContext, SockOpsContext, SockoptContext},
};
use aya_log_ebpf::{debug, warn};
use mesh_common::{
    AffinityKey, AffinityValue, Backend, BackendStats, BackendStatsKey, DEFAULT_MAX_AFFINITY,
    DEFAULT_MAX_BACKENDS, DEFAULT_MAX_SERVICES, DEFAULT_MAX_SLOTS, DEFAULT_MAX_UDP_FLOWS,
    DatapathStats, FAMILY_V4, FAMILY_V6, PROTO_UDP, PassiveState, RTT_BUCKET_BASE_US, RTT_BUCKETS,
    SETTINGS_F_TELEMETRY, SVC_F_AFFINITY, SVC_F_PASSIVE, SVC_F_REJECT_EMPTY, Service, ServiceKey,
    ServiceName, ServiceStats, Settings, SlotKey, UdpFlow,
};

const NO_PREALLOC: usize = BPF_F_NO_PREALLOC as usize;
const MAX_SERVICES: usize = DEFAULT_MAX_SERVICES as usize;
const MAX_BACKENDS: usize = DEFAULT_MAX_BACKENDS as usize;
const MAX_SLOTS: usize = DEFAULT_MAX_SLOTS as usize;
const ECONNREFUSED: i32 = 111;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;
/// SO_ORIGINAL_DST (SOL_IP) and IP6T_SO_ORIGINAL_DST (SOL_IPV6) share the number.
const SO_ORIGINAL_DST: i32 = 80;

/// Program verdicts of cgroup sock_addr programs.
const ALLOW: i32 = 1;
const DENY: i32 = 0;

/// VIP (ip, port, protocol, family) -> service (id, live slot set, flags).
#[btf_map]
static SERVICES: HashMap<ServiceKey, Service, MAX_SERVICES, NO_PREALLOC> = HashMap::new();

/// (service id, generation, slot) -> backend id. A slot set is written in full before the
/// service entry points at it.
#[btf_map]
static SLOTS: HashMap<SlotKey, u32, MAX_SLOTS, NO_PREALLOC> = HashMap::new();

/// Backend id -> address.
#[btf_map]
static BACKENDS: HashMap<u32, Backend, MAX_BACKENDS, NO_PREALLOC> = HashMap::new();

/// Service id -> round-robin position, advanced with an atomic fetch-add (shared by all CPUs so
/// sequential connects walk the slots exactly in order).
#[btf_map]
static RR_STATE: Array<u64, MAX_SERVICES> = Array::new();

/// (service id, backend id) -> per-CPU counters.
#[btf_map]
static BACKEND_STATS: PerCpuHashMap<BackendStatsKey, BackendStats, MAX_BACKENDS, NO_PREALLOC> =
    PerCpuHashMap::new();

/// Service id -> per-CPU counters.
#[btf_map]
static SERVICE_STATS: PerCpuArray<ServiceStats, MAX_SERVICES> = PerCpuArray::new();

/// Service id -> name. Written by the agent for the CLI; never read here.
#[btf_map]
static SERVICE_NAMES: HashMap<u32, ServiceName, MAX_SERVICES, NO_PREALLOC> = HashMap::new();

/// (service id, backend id) -> weight, for backends that take new connections. Session
/// affinity only keeps a client on a backend that is still in here.
#[btf_map]
static ACTIVE: HashMap<BackendStatsKey, u32, MAX_BACKENDS, NO_PREALLOC> = HashMap::new();

/// (service, client) -> backend, for services with session affinity.
#[btf_map]
static AFFINITY: LruHashMap<AffinityKey, AffinityValue, { DEFAULT_MAX_AFFINITY as usize }> =
    LruHashMap::new();

/// Socket cookie -> (service, backend) of connected UDP sockets the load balancer translated.
#[btf_map]
static UDP_FLOWS: HashMap<u64, UdpFlow, { DEFAULT_MAX_UDP_FLOWS as usize }> = HashMap::new();

/// Node-wide per-CPU counters (index 0).
#[btf_map]
static DATAPATH_STATS: PerCpuArray<DatapathStats, 1> = PerCpuArray::new();

/// (service, backend) -> consecutive failed connects, for passive health detection.
#[btf_map]
static PASSIVE: HashMap<BackendStatsKey, PassiveState, MAX_BACKENDS, NO_PREALLOC> = HashMap::new();

/// Switches set by the agent (index 0).
#[btf_map]
static SETTINGS: Array<Settings, 1> = Array::new();

/// Reverse translation of one socket, in socket-local storage: the kernel frees it with the
/// socket, so it can neither fill up nor leak nor evict live entries.
#[btf_map]
static SOCK_REV: SkStorage<SockRev> = SkStorage::new();

/// A backend address and the VIP it stands for. IPs are raw network-order words as the
/// context holds them; ports are network order too.
#[repr(C)]
#[derive(Clone, Copy)]
struct RevEntry {
    backend_ip: [u32; 4],
    vip_ip: [u32; 4],
    backend_port: u32,
    vip_port: u32,
}

/// Unconnected UDP sockets remember this many (backend -> VIP) pairs; a socket that talks to
/// more backends at once through VIPs sees the oldest pairs' replies untranslated.
const REV_SENT: usize = 8;

#[repr(C)]
struct SockRev {
    /// The connect() translation (valid when `has_peer` is 1).
    peer: RevEntry,
    /// sendmsg() translations of unconnected UDP, overwritten round-robin.
    sent: [RevEntry; REV_SENT],
    next_sent: u32,
    has_peer: u32,
    /// Who the connect went to (with `has_peer`), for the counters of `sock_ops`.
    service_id: u32,
    backend_id: u32,
    /// 1 when `sock_ops` should follow this connection's states (passive detection of its
    /// service, or telemetry); otherwise the connection costs no state callbacks.
    observe: u32,
}

/// A parsed destination address in the context's raw form.
#[derive(Clone, Copy)]
struct Dest {
    ip: [u32; 4],
    port: u32,
}

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    connect(&ctx, FAMILY_V4)
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    connect(&ctx, FAMILY_V6)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    sendmsg(&ctx, FAMILY_V4)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    sendmsg(&ctx, FAMILY_V6)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, FAMILY_V4, true);
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn recvmsg6(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, FAMILY_V6, true);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, FAMILY_V4, false);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, FAMILY_V6, false);
    ALLOW
}

#[cgroup_sock(sock_release)]
pub fn sock_release(ctx: SockContext) -> i32 {
    // The kernel hands a valid socket to sock_release programs.
    let sk = ctx.sock;
    let storage = existing_sock_rev(sk);
    if !storage.is_null() {
        count(|s| s.rev_released += 1);
        if unsafe { (*sk).protocol } == u32::from(PROTO_UDP) {
            let cookie = unsafe { bpf_get_socket_cookie(ctx.sock.cast()) };
            let _ = UDP_FLOWS.remove(&cookie);
        }
    }
    1
}

#[cgroup_sockopt(getsockopt)]
pub fn getsockopt(ctx: SockoptContext) -> i32 {
    // SAFETY: the kernel hands a valid sockopt context; optval..optval_end is checked below.
    let opt = unsafe { &mut *ctx.sockopt };
    if opt.optname != SO_ORIGINAL_DST || (opt.level != SOL_IP && opt.level != SOL_IPV6) {
        return 1;
    }
    let sk = unsafe { opt.__bindgen_anon_1.sk };
    let rev = existing_sock_rev(sk);
    if rev.is_null() || unsafe { (*rev).has_peer } == 0 {
        return 1;
    }
    let peer = unsafe { (*rev).peer };
    let start = unsafe { opt.__bindgen_anon_2.optval } as *mut u8;
    let end = unsafe { opt.__bindgen_anon_3.optval_end } as *mut u8;
    if opt.level == SOL_IP {
        // struct sockaddr_in
        if unsafe { start.add(16) } > end {
            return 1;
        }
        unsafe {
            (start as *mut u16).write_unaligned(AF_INET);
            (start.add(2) as *mut u16).write_unaligned(peer.vip_port as u16);
            (start.add(4) as *mut u32).write_unaligned(peer.vip_ip[0]);
            (start.add(8) as *mut u64).write_unaligned(0);
        }
        opt.optlen = 16;
    } else {
        // struct sockaddr_in6
        if unsafe { start.add(28) } > end {
            return 1;
        }
        unsafe {
            (start as *mut u16).write_unaligned(AF_INET6);
            (start.add(2) as *mut u16).write_unaligned(peer.vip_port as u16);
            (start.add(4) as *mut u32).write_unaligned(0);
            (start.add(8) as *mut u32).write_unaligned(peer.vip_ip[0]);
            (start.add(12) as *mut u32).write_unaligned(peer.vip_ip[1]);
            (start.add(16) as *mut u32).write_unaligned(peer.vip_ip[2]);
            (start.add(20) as *mut u32).write_unaligned(peer.vip_ip[3]);
            (start.add(24) as *mut u32).write_unaligned(0);
        }
        opt.optlen = 28;
    }
    opt.retval = 0;
    1
}

const TCP_SYN_SENT: u32 = 2;
const TCP_FIN_WAIT2: u32 = 5;
const TCP_CLOSE: u32 = 7;
const TCP_CLOSE_WAIT: u32 = 8;
const TCP_LAST_ACK: u32 = 9;
const TCP_CLOSING: u32 = 11;

/// Sees how connections the load balancer made turn out: failed connects feed passive health
/// detection; closed connections feed the bytes and RTT telemetry.
#[sock_ops]
pub fn tcp_outcome(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB
        && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
        && op != BPF_SOCK_OPS_STATE_CB
    {
        return 1;
    }
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    let Some(key) = translated_peer(sk) else {
        return 1;
    };
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        // Ask for state changes of this connection only, and only when someone reads them.
        if observed(sk) {
            let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
        }
    } else if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        if let Some(state) = PASSIVE.get_ptr_mut(&key) {
            unsafe { (*state).consecutive_failures = 0 };
        }
    } else if ctx.arg(1) == TCP_CLOSE {
        if ctx.arg(0) == TCP_SYN_SENT {
            connect_failed(&key);
            debug!(
                &ctx,
                "connect to backend {} of service {} failed", key.backend_id, key.service_id
            );
        } else if telemetry_on() {
            let ops = unsafe { &*ctx.ops };
            // bytes_acked and bytes_received count SYN and FIN as one byte each (they follow
            // snd_una and rcv_nxt). The state left tells which of them were exchanged.
            let (flags_acked, fin_received) = closed_flags(ctx.arg(0));
            // srtt_us holds 8 times the smoothed RTT, as in tcp_sock.
            record_close(
                &key,
                ops.bytes_acked.saturating_sub(flags_acked),
                ops.bytes_received.saturating_sub(fin_received),
                u64::from(ops.srtt_us >> 3),
            );
        }
    }
    1
}

/// (our SYN and FIN acknowledged by the peer, peer FIN received) for a connection that
/// reaches CLOSE from `old_state`.
#[inline(always)]
fn closed_flags(old_state: u32) -> (u64, u64) {
    match old_state {
        // Orderly close: our FIN was acknowledged and the peer's FIN received.
        TCP_FIN_WAIT2 | TCP_CLOSING | TCP_LAST_ACK => (2, 1),
        // Reset after the peer's FIN.
        TCP_CLOSE_WAIT => (1, 1),
        // Reset from ESTABLISHED or FIN_WAIT1: only the SYN was acknowledged.
        _ => (1, 0),
    }
}

/// The reverse-translation state of `sk`, if the load balancer gave it one (never creates).
#[inline(always)]
fn existing_sock_rev(sk: *mut bpf_sock) -> *const SockRev {
    // SAFETY: callers pass a socket the kernel handed to the program, checked non-null.
    unsafe {
        bpf_sk_storage_get(
            core::ptr::addr_of!(SOCK_REV) as *mut c_void,
            sk.cast(),
            core::ptr::null_mut(),
            0,
        )
    }
    .cast()
}

/// Whether the connection's states feed passive detection or telemetry.
#[inline(always)]
fn observed(sk: *mut bpf_sock) -> bool {
    let rev = existing_sock_rev(sk);
    !rev.is_null() && unsafe { (*rev).observe } != 0
}

/// (service, backend) of a socket whose connect the load balancer translated.
#[inline(always)]
fn translated_peer(sk: *mut bpf_sock) -> Option<BackendStatsKey> {
    if sk.is_null() {
        return None;
    }
    let rev = existing_sock_rev(sk);
    if rev.is_null() || unsafe { (*rev).has_peer } == 0 {
        return None;
    }
    Some(BackendStatsKey {
        service_id: unsafe { (*rev).service_id },
        backend_id: unsafe { (*rev).backend_id },
    })
}

#[inline(always)]
fn connect_failed(key: &BackendStatsKey) {
    if let Some(stats) = BACKEND_STATS.get_ptr_mut(key) {
        unsafe { (*stats).connect_failures += 1 };
    }
    match PASSIVE.get_ptr_mut(key) {
        Some(state) => unsafe {
            core::intrinsics::atomic_xadd::<u32, u32, { core::intrinsics::AtomicOrdering::SeqCst }>(
                &raw mut (*state).consecutive_failures,
                1,
            );
        },
        None => {
            let first = PassiveState {
                consecutive_failures: 1,
                _pad: 0,
            };
            let _ = PASSIVE.insert(key, &first, 0);
        }
    }
}

#[inline(always)]
fn telemetry_on() -> bool {
    SETTINGS
        .get(0)
        .is_some_and(|s| s.flags & SETTINGS_F_TELEMETRY != 0)
}

#[inline(always)]
fn record_close(key: &BackendStatsKey, sent: u64, received: u64, rtt_us: u64) {
    let Some(stats) = BACKEND_STATS.get_ptr_mut(key) else {
        return;
    };
    let stats = unsafe { &mut *stats };
    stats.bytes_sent += sent;
    stats.bytes_received += received;
    stats.rtt_samples += 1;
    stats.rtt_sum_us += rtt_us;
    let mut bucket = 0;
    while bucket < RTT_BUCKETS - 1 && rtt_us > RTT_BUCKET_BASE_US << bucket {
        bucket += 1;
    }
    if let Some(count) = stats.rtt_buckets.get_mut(bucket) {
        *count += 1;
    }
}

/// connect(): translate, remember the translation for getpeername/SO_ORIGINAL_DST, and record
/// connected UDP flows so the agent can terminate them when their backend leaves.
#[inline(always)]
fn connect(ctx: &SockAddrContext, family: u8) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    let vip = read_dest(sa, family);
    match translate(ctx, sa, &vip, family) {
        Verdict::Pass => ALLOW,
        Verdict::Refuse => refuse(),
        Verdict::Rewrite {
            service_id,
            backend_id,
            backend,
            passive,
        } => {
            let dest = write_dest(sa, &backend, family);
            if let Some(rev) = sock_rev(ctx) {
                unsafe {
                    (*rev).peer = RevEntry {
                        backend_ip: dest.ip,
                        vip_ip: vip.ip,
                        backend_port: dest.port,
                        vip_port: vip.port,
                    };
                    (*rev).has_peer = 1;
                    (*rev).service_id = service_id;
                    (*rev).backend_id = backend_id;
                    (*rev).observe = u32::from(passive || telemetry_on());
                }
            }
            if sa.protocol == u32::from(PROTO_UDP) {
                let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
                let flow = UdpFlow {
                    service_id,
                    backend_id,
                };
                match UDP_FLOWS.insert(&cookie, &flow, 0) {
                    Ok(()) => count(|s| s.udp_flows_added += 1),
                    Err(_) => {
                        count(|s| s.udp_flows_full += 1);
                        warn!(
                            ctx,
                            "udp_flows is full: a connected UDP socket is not tracked"
                        );
                    }
                }
            }
            ALLOW
        }
    }
}

/// sendmsg() of unconnected UDP: translate this datagram and remember the pair for recvmsg.
#[inline(always)]
fn sendmsg(ctx: &SockAddrContext, family: u8) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    let vip = read_dest(sa, family);
    match translate(ctx, sa, &vip, family) {
        Verdict::Pass => ALLOW,
        Verdict::Refuse => refuse(),
        Verdict::Rewrite { backend, .. } => {
            let dest = write_dest(sa, &backend, family);
            if let Some(rev) = sock_rev(ctx) {
                let entry = RevEntry {
                    backend_ip: dest.ip,
                    vip_ip: vip.ip,
                    backend_port: dest.port,
                    vip_port: vip.port,
                };
                let rev = unsafe { &mut *rev };
                // Keep one entry per backend: overwrite a match, else the oldest.
                let mut slot = rev.next_sent as usize % REV_SENT;
                let mut i = 0;
                while i < REV_SENT {
                    if same_addr(&rev.sent[i], &dest) {
                        slot = i;
                        break;
                    }
                    i += 1;
                }
                if i == REV_SENT {
                    rev.next_sent = rev.next_sent.wrapping_add(1);
                }
                if let Some(e) = rev.sent.get_mut(slot) {
                    *e = entry;
                }
            }
            ALLOW
        }
    }
}

/// recvmsg()/getpeername(): a reply source (or peer) that is a backend this socket reached
/// through a VIP is shown as that VIP.
#[inline(always)]
fn reverse(ctx: &SockAddrContext, family: u8, datagram: bool) {
    let sa = unsafe { &mut *ctx.sock_addr };
    let rev = unsafe { SOCK_REV.get_ptr_mut(ctx) };
    if rev.is_null() {
        return;
    }
    let rev = unsafe { &*rev };
    let seen = read_dest(sa, family);
    let mut found = None;
    if rev.has_peer != 0 && same_addr(&rev.peer, &seen) {
        found = Some(rev.peer);
    } else if datagram {
        let mut i = 0;
        while i < REV_SENT {
            if same_addr(&rev.sent[i], &seen) {
                found = Some(rev.sent[i]);
                break;
            }
            i += 1;
        }
    }
    if let Some(entry) = found {
        if family == FAMILY_V4 {
            sa.user_ip4 = entry.vip_ip[0];
        } else {
            sa.user_ip6[0] = entry.vip_ip[0];
            sa.user_ip6[1] = entry.vip_ip[1];
            sa.user_ip6[2] = entry.vip_ip[2];
            sa.user_ip6[3] = entry.vip_ip[3];
        }
        sa.user_port = entry.vip_port;
    }
}

/// The socket's reverse-translation storage, created on first use.
#[inline(always)]
fn sock_rev(ctx: &SockAddrContext) -> Option<*mut SockRev> {
    let existing = unsafe { SOCK_REV.get_ptr_mut(ctx) };
    if !existing.is_null() {
        return Some(existing);
    }
    let created = unsafe { SOCK_REV.get_or_insert_ptr_mut(ctx, None) };
    if created.is_null() {
        return None;
    }
    count(|s| s.rev_created += 1);
    Some(created)
}

#[inline(always)]
fn same_addr(entry: &RevEntry, dest: &Dest) -> bool {
    entry.backend_port == dest.port
        && entry.backend_ip[0] == dest.ip[0]
        && entry.backend_ip[1] == dest.ip[1]
        && entry.backend_ip[2] == dest.ip[2]
        && entry.backend_ip[3] == dest.ip[3]
}

/// The context's address. The verifier only allows 4-byte accesses to user_ip6, and only the
/// field of the hook's own family.
#[inline(always)]
fn read_dest(sa: &bpf_sock_addr, family: u8) -> Dest {
    let ip = if family == FAMILY_V4 {
        [sa.user_ip4, 0, 0, 0]
    } else {
        [
            sa.user_ip6[0],
            sa.user_ip6[1],
            sa.user_ip6[2],
            sa.user_ip6[3],
        ]
    };
    Dest {
        ip,
        port: sa.user_port,
    }
}

#[inline(always)]
fn write_dest(sa: &mut bpf_sock_addr, backend: &Backend, family: u8) -> Dest {
    let b = &backend.ip;
    let word = |i: usize| u32::from_ne_bytes([b[i * 4], b[i * 4 + 1], b[i * 4 + 2], b[i * 4 + 3]]);
    let dest = Dest {
        ip: if family == FAMILY_V4 {
            [word(0), 0, 0, 0]
        } else {
            [word(0), word(1), word(2), word(3)]
        },
        port: u32::from(backend.port.to_be()),
    };
    if family == FAMILY_V4 {
        sa.user_ip4 = dest.ip[0];
    } else {
        sa.user_ip6[0] = dest.ip[0];
        sa.user_ip6[1] = dest.ip[1];
        sa.user_ip6[2] = dest.ip[2];
        sa.user_ip6[3] = dest.ip[3];
    }
    sa.user_port = dest.port;
    dest
}

enum Verdict {
    /// Not a VIP, or a VIP whose policy lets the connect through untouched.
    Pass,
    /// A VIP with no backend and the reject policy.
    Refuse,
    /// Send the connection to this backend.
    Rewrite {
        service_id: u32,
        backend_id: u32,
        backend: Backend,
        passive: bool,
    },
}

/// Looks the destination up as a VIP and picks a backend of the same family.
#[inline(always)]
fn translate(ctx: &SockAddrContext, sa: &bpf_sock_addr, dest: &Dest, family: u8) -> Verdict {
    let mut key = ServiceKey {
        family,
        port: u16::from_be(dest.port as u16),
        proto: sa.protocol as u8,
        ..Default::default()
    };
    let mut i = 0;
    while i < 4 {
        let word = dest.ip[i].to_ne_bytes();
        key.ip[i * 4] = word[0];
        key.ip[i * 4 + 1] = word[1];
        key.ip[i * 4 + 2] = word[2];
        key.ip[i * 4 + 3] = word[3];
        i += 1;
    }
    let Some(service) = (unsafe { SERVICES.get(&key) }) else {
        return Verdict::Pass;
    };
    let service = *service;
    // Backend ids are never 0, so 0 means "none" (a plain u32 keeps LLVM from spilling
    // half-initialized Options, which the verifier rejects).
    let backend_id = if service.flags & SVC_F_AFFINITY != 0 {
        pick_with_affinity(ctx, &service)
    } else {
        pick_round_robin(&service)
    };
    let backend = if backend_id == 0 {
        None
    } else {
        unsafe { BACKENDS.get(&backend_id) }.copied()
    };
    match backend {
        Some(backend) if backend.family == family => {
            count_backend(service.id, backend_id);
            Verdict::Rewrite {
                service_id: service.id,
                backend_id,
                backend,
                passive: service.flags & SVC_F_PASSIVE != 0,
            }
        }
        _ => {
            count_no_backend(service.id);
            debug!(
                ctx,
                "service {} has no backend for this connect", service.id
            );
            if service.flags & SVC_F_REJECT_EMPTY != 0 {
                Verdict::Refuse
            } else {
                Verdict::Pass
            }
        }
    }
}

/// Fails the syscall with ECONNREFUSED, as kube-proxy does for a service without endpoints.
#[inline(always)]
fn refuse() -> i32 {
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    DENY
}

/// Next backend id of the service's live slot set, round-robin; 0 if there is none.
#[inline(always)]
fn pick_round_robin(service: &Service) -> u32 {
    if service.slot_count == 0 {
        return 0;
    }
    let Some(position) = RR_STATE.get_ptr_mut(service.id) else {
        return 0;
    };
    // SeqCst: a relaxed add was seen compiled to a non-fetching add, which silently sends
    // every connection to the same slot.
    let turn = unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::SeqCst }>(
            position, 1,
        )
    };
    let slot = SlotKey {
        service_id: service.id,
        generation: service.generation,
        slot: (turn % service.slot_count as u64) as u32,
    };
    unsafe { SLOTS.get(&slot) }.copied().unwrap_or(0)
}

/// The backend this client used last, while it is still active and the entry has not timed
/// out; otherwise a round-robin pick, remembered for next time.
#[inline(always)]
fn pick_with_affinity(ctx: &SockAddrContext, service: &Service) -> u32 {
    let key = AffinityKey {
        service_id: service.id,
        _pad: 0,
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) },
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
    };
    let now = unsafe { bpf_ktime_get_ns() };
    let timeout_ns = u64::from(service.affinity_timeout_secs) * 1_000_000_000;
    if let Some(entry) = AFFINITY.get_ptr_mut(&key) {
        let entry = unsafe { &mut *entry };
        let member = BackendStatsKey {
            service_id: service.id,
            backend_id: entry.backend_id,
        };
        if now.wrapping_sub(entry.last_used_ns) < timeout_ns
            && unsafe { ACTIVE.get(&member) }.is_some()
        {
            entry.last_used_ns = now;
            return entry.backend_id;
        }
    }
    let backend_id = pick_round_robin(service);
    if backend_id == 0 {
        return 0;
    }
    let value = AffinityValue {
        backend_id,
        _pad: 0,
        last_used_ns: now,
    };
    let _ = AFFINITY.insert(&key, &value, 0);
    backend_id
}

#[inline(always)]
fn count_backend(service_id: u32, backend_id: u32) {
    let key = BackendStatsKey {
        service_id,
        backend_id,
    };
    // The agent creates the entry before the backend enters any slot, and deletes it only
    // after; not inserting here means a removed backend's counter cannot come back.
    if let Some(stats) = BACKEND_STATS.get_ptr_mut(&key) {
        // Per-CPU value: no other CPU writes it, a plain add is enough.
        unsafe { (*stats).connections += 1 };
    }
}

#[inline(always)]
fn count_no_backend(service_id: u32) {
    if let Some(stats) = SERVICE_STATS.get_ptr_mut(service_id) {
        unsafe { (*stats).no_backend += 1 };
    }
}

#[inline(always)]
fn count(update: impl FnOnce(&mut DatapathStats)) {
    if let Some(stats) = DATAPATH_STATS.get_ptr_mut(0) {
        update(unsafe { &mut *stats });
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
