//! VIP lookup and backend choice: weighted round-robin over the live slot set, or session
//! affinity.

use aya_ebpf::{
    helpers::{bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_ktime_get_ns, bpf_set_retval},
    programs::SockAddrContext,
};
use aya_log_ebpf::debug;
use mesh_common::{
    AffinityKey, AffinityValue, Backend, BackendStatsKey, SVC_F_AFFINITY, SVC_F_PASSIVE,
    SVC_F_REJECT_EMPTY, Service, ServiceKey, SlotKey, slot_index,
};

use crate::addr::Dest;
use crate::maps::{ACTIVE, AFFINITY, BACKENDS, RR_STATE, SERVICES, SLOTS, ServiceMap};
use crate::stats::{count, count_backend, count_no_backend};

const ECONNREFUSED: i32 = 111;
/// Verdict of cgroup sock_addr programs that fails the syscall (with the retval set).
const DENY: i32 = 0;

pub enum Verdict {
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

/// Looks the destination up as a VIP (a v4-mapped address as the IPv4 service) and picks a
/// backend of the service's family.
#[inline(always)]
pub fn translate(ctx: &SockAddrContext, dest: &Dest, family: u8) -> Verdict {
    // SAFETY: the kernel hands a valid context.
    let protocol = unsafe { (*ctx.sock_addr).protocol };
    let key = ServiceKey::from_raw(family, &dest.ip, dest.port, protocol);
    // SAFETY: a shared reference into the map value, copied at once.
    let Some(service) = (unsafe { SERVICES.get(key) }) else {
        return Verdict::Pass;
    };
    let service = *service;
    // Backend ids are never 0, so 0 means "none" (a plain u32 and a fully initialised
    // out-parameter keep LLVM from spilling half-initialized Options, which the verifier
    // rejects).
    let mut backend = Backend::default();
    let backend_id = if service.flags & SVC_F_AFFINITY != 0 {
        pick_with_affinity(
            &SERVICES,
            &key,
            &service,
            socket_client(ctx, &service),
            &mut backend,
        )
    } else {
        pick_round_robin(&SERVICES, &key, &service, &mut backend)
    };
    if backend_id != 0 && backend.family == key.family {
        count_backend(service.id, backend_id);
        return Verdict::Rewrite {
            service_id: service.id,
            backend_id,
            backend,
            passive: service.flags & SVC_F_PASSIVE != 0,
        };
    }
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

/// Fails the syscall with ECONNREFUSED, as kube-proxy does for a service without endpoints.
#[inline(always)]
pub fn refuse() -> i32 {
    // SAFETY: sets this program run's return value of the syscall; no memory involved.
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    DENY
}

/// Next backend of the live slot set of `services`' entry for `key`, round-robin: its id (0 if
/// there is none) and, through `backend`, its address.
///
/// The agent writes a new slot set under the next generation, switches the service entry, and
/// may delete the old set right away, while a connect that read the old entry is still
/// running. So a slot that is gone means "switched":
/// the entry is read again once and the same turn is used in its live set. The round-robin
/// position advances once per connect, retry or not, so sequential connects still walk each
/// set exactly in order; the connect that raced the switch lands on the new set's slot for its
/// turn.
#[inline(always)]
pub fn pick_round_robin(
    services: &ServiceMap,
    key: &ServiceKey,
    service: &Service,
    backend: &mut Backend,
) -> u32 {
    if service.slot_count == 0 {
        return 0;
    }
    let Some(position) = RR_STATE.get_ptr_mut(service.id) else {
        return 0;
    };
    // SeqCst: a relaxed add was seen compiled to a non-fetching add, which silently sends
    // every connection to the same slot.
    // SAFETY: `position` points at this service's array value; the add is atomic.
    let turn = unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::SeqCst }>(
            position, 1,
        )
    };
    let backend_id = slot_backend(service, turn, backend);
    if backend_id != 0 {
        return backend_id;
    }
    count(|s| s.slot_retries += 1);
    // SAFETY: a shared reference into the map value, copied at once.
    let backend_id = match unsafe { services.get(key) } {
        // Ids are stable while a VIP's service exists; another id is another service, whose
        // counters this connect must not touch.
        Some(fresh) if fresh.id == service.id => {
            let fresh = *fresh;
            slot_backend(&fresh, turn, backend)
        }
        _ => 0,
    };
    if backend_id == 0 {
        count(|s| s.slot_misses += 1);
    }
    backend_id
}

/// The backend of `turn`'s slot in the service entry's slot set, with its address (the slot
/// carries it: one map read per connect, not two); 0 if the slot does not exist (any more).
#[inline(always)]
fn slot_backend(service: &Service, turn: u64, backend: &mut Backend) -> u32 {
    if service.slot_count == 0 {
        return 0;
    }
    let slot = SlotKey {
        service_id: service.id,
        generation: service.generation,
        slot: slot_index(turn, service.slot_count),
    };
    // SAFETY: a shared reference into the map value, copied at once.
    let Some(value) = (unsafe { SLOTS.get(slot) }) else {
        return 0;
    };
    *backend = value.backend;
    value.backend_id
}

/// The backend `client` used last in `services`' service, while it is still active and the
/// entry has not timed out; otherwise a round-robin pick, remembered for next time. Sockets
/// are clients by (network namespace, cgroup); traffic from other hosts by address
/// (`nodeport::affinity`).
#[inline(always)]
pub fn pick_with_affinity(
    services: &ServiceMap,
    key: &ServiceKey,
    service: &Service,
    client: AffinityKey,
    backend: &mut Backend,
) -> u32 {
    // SAFETY: no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let timeout_ns = u64::from(service.affinity_timeout_secs) * 1_000_000_000;
    if let Some(entry) = AFFINITY.get_ptr_mut(client) {
        // SAFETY: a valid value of the LRU map; concurrent updates of the timestamp race
        // harmlessly (both write "now").
        let entry = unsafe { &mut *entry };
        let member = BackendStatsKey {
            service_id: service.id,
            backend_id: entry.backend_id,
        };
        if now.wrapping_sub(entry.last_used_ns) < timeout_ns
            && ACTIVE.get_ptr(member).is_some()
            && let Some(found) = unsafe { BACKENDS.get(entry.backend_id) }
        {
            entry.last_used_ns = now;
            *backend = *found;
            return entry.backend_id;
        }
    }
    let backend_id = pick_round_robin(services, key, service, backend);
    if backend_id == 0 {
        return 0;
    }
    let value = AffinityValue {
        backend_id,
        _pad: 0,
        last_used_ns: now,
    };
    if AFFINITY.insert(client, value, 0).is_err() {
        count(|s| s.affinity_full += 1);
    }
    backend_id
}

/// A socket's client identity for affinity: its network namespace and cgroup (a pod).
#[inline(always)]
fn socket_client(ctx: &SockAddrContext, service: &Service) -> AffinityKey {
    AffinityKey {
        service_id: service.id,
        _pad: 0,
        // SAFETY: helpers without memory arguments other than the valid context.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) },
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
    }
}
