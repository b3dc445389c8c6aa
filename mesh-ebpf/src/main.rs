//! mesh kernel programs: socket-level load balancing.
//!
//! `connect4`/`connect6` rewrite the destination of a connect() to a service VIP into a backend
//! chosen by weighted round-robin over the service's live slot set. After connect() the socket
//! talks to the backend directly: no per-packet work at all.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![expect(internal_features, reason = "atomic_xadd is the only fetching atomic add on bpf")]

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, bpf_sock_addr},
    btf_maps::{Array, HashMap, PerCpuArray, PerCpuHashMap},
    helpers::bpf_set_retval,
    macros::{btf_map, cgroup_sock_addr},
    programs::SockAddrContext,
};
use mesh_common::{
    Backend, BackendStats, BackendStatsKey, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_SERVICES,
    DEFAULT_MAX_SLOTS, FAMILY_V4, FAMILY_V6, SVC_F_REJECT_EMPTY, Service, ServiceKey, ServiceName,
    ServiceStats, SlotKey,
};

const NO_PREALLOC: usize = BPF_F_NO_PREALLOC as usize;
const MAX_SERVICES: usize = DEFAULT_MAX_SERVICES as usize;
const MAX_BACKENDS: usize = DEFAULT_MAX_BACKENDS as usize;
const MAX_SLOTS: usize = DEFAULT_MAX_SLOTS as usize;
const ECONNREFUSED: i32 = 111;

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

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    let mut key = ServiceKey {
        family: FAMILY_V4,
        ..Default::default()
    };
    let ip = sa.user_ip4.to_ne_bytes();
    key.ip[0] = ip[0];
    key.ip[1] = ip[1];
    key.ip[2] = ip[2];
    key.ip[3] = ip[3];
    match translate(sa, key) {
        Verdict::Rewrite(backend) => {
            // Only user_ip4 may be written from connect4 (the verifier enforces it).
            let ip = &backend.ip;
            sa.user_ip4 = u32::from_ne_bytes([ip[0], ip[1], ip[2], ip[3]]);
            sa.user_port = u32::from(backend.port.to_be());
            ALLOW
        }
        Verdict::Pass => ALLOW,
        Verdict::Refuse => refuse(),
    }
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    let mut key = ServiceKey {
        family: FAMILY_V6,
        ..Default::default()
    };
    // The verifier only allows 4-byte accesses to user_ip6.
    let mut i = 0;
    while i < 4 {
        let word = sa.user_ip6[i].to_ne_bytes();
        key.ip[i * 4] = word[0];
        key.ip[i * 4 + 1] = word[1];
        key.ip[i * 4 + 2] = word[2];
        key.ip[i * 4 + 3] = word[3];
        i += 1;
    }
    match translate(sa, key) {
        Verdict::Rewrite(backend) => {
            let ip = &backend.ip;
            let mut i = 0;
            while i < 4 {
                sa.user_ip6[i] =
                    u32::from_ne_bytes([ip[i * 4], ip[i * 4 + 1], ip[i * 4 + 2], ip[i * 4 + 3]]);
                i += 1;
            }
            sa.user_port = u32::from(backend.port.to_be());
            ALLOW
        }
        Verdict::Pass => ALLOW,
        Verdict::Refuse => refuse(),
    }
}

enum Verdict {
    /// Not a VIP, or a VIP whose policy lets the connect through untouched.
    Pass,
    /// A VIP with no backend and the reject policy.
    Refuse,
    /// Send the connection to this backend.
    Rewrite(Backend),
}

/// Looks the destination up as a VIP and picks a backend of the same family.
#[inline(always)]
fn translate(sa: &bpf_sock_addr, mut key: ServiceKey) -> Verdict {
    key.port = u16::from_be(sa.user_port as u16);
    key.proto = sa.protocol as u8;
    let Some(service) = (unsafe { SERVICES.get(&key) }) else {
        return Verdict::Pass;
    };
    let service = *service;
    match pick_backend(&service) {
        Some((backend_id, backend)) if backend.family == key.family => {
            count_backend(service.id, backend_id);
            Verdict::Rewrite(backend)
        }
        _ => {
            count_no_backend(service.id);
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

/// Next backend of the service's live slot set, round-robin.
#[inline(always)]
fn pick_backend(service: &Service) -> Option<(u32, Backend)> {
    if service.slot_count == 0 {
        return None;
    }
    let position = RR_STATE.get_ptr_mut(service.id)?;
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
    let backend_id = *unsafe { SLOTS.get(&slot) }?;
    let backend = *unsafe { BACKENDS.get(&backend_id) }?;
    Some((backend_id, backend))
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
