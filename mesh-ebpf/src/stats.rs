//! Counters. The node-wide ones are per-CPU (no other CPU writes the value, so plain adds are
//! enough); per-service and per-backend ones are shared, and added to atomically.

use mesh_common::{BackendStatsKey, DatapathStats};

use crate::maps::{BACKEND_STATS, DATAPATH_STATS, SERVICE_STATS};

/// Adds to the node-wide counters.
#[inline(always)]
pub fn count(update: impl FnOnce(&mut DatapathStats)) {
    if let Some(stats) = DATAPATH_STATS.get_ptr_mut(0) {
        // SAFETY: a valid per-CPU value of this CPU; nothing else holds a reference to it.
        update(unsafe { &mut *stats });
    }
}

/// Adds `n` to a counter of a shared map value. Relaxed, with the result unused: one
/// non-fetching atomic add instruction, no ordering needed (only user space reads it).
///
/// # Safety
/// `counter` points at a u64 inside a value of a map the program holds.
#[inline(always)]
pub unsafe fn add(counter: *mut u64, n: u64) {
    // The BPF target offers no `AtomicU64` methods; the intrinsic is what they would call.
    // SAFETY: the caller's pointer is valid and 8-byte aligned (map values are).
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            counter, n,
        )
    };
}

/// A connection (or datagram) translated to `backend_id`.
#[inline(always)]
pub fn count_backend(service_id: u32, backend_id: u32) {
    let key = BackendStatsKey {
        service_id,
        backend_id,
    };
    // The agent creates the entry before the backend enters any slot, and deletes it only
    // after; not inserting here means a removed backend's counter cannot come back.
    if let Some(stats) = BACKEND_STATS.get_ptr_mut(key) {
        // SAFETY: a field of a valid value of the map.
        unsafe { add(&raw mut (*stats).connections, 1) };
    }
}

/// A connect to the VIP that found no backend.
#[inline(always)]
pub fn count_no_backend(service_id: u32) {
    if let Some(stats) = SERVICE_STATS.get_ptr_mut(service_id) {
        // SAFETY: a field of a valid value of the array.
        unsafe { add(&raw mut (*stats).no_backend, 1) };
    }
}
