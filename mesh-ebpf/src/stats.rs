//! Counters. All of them are per-CPU: no other CPU writes the value, so plain adds are enough.

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
        // SAFETY: a valid per-CPU value of this CPU.
        unsafe { (*stats).connections += 1 };
    }
}

/// A connect to the VIP that found no backend.
#[inline(always)]
pub fn count_no_backend(service_id: u32) {
    if let Some(stats) = SERVICE_STATS.get_ptr_mut(service_id) {
        // SAFETY: a valid per-CPU value of this CPU.
        unsafe { (*stats).no_backend += 1 };
    }
}
