//! Counters of the TC programs, all per CPU (plain adds are enough).

use mesh_common::{
    BackendStatsKey,
    nodeport::{NodeportEvents, NodeportStats},
};

use crate::maps::{NP_BACKEND_STATS, NP_EVENTS, NP_STATS};

/// Adds to the node-wide counters.
#[inline(always)]
pub fn count(update: impl FnOnce(&mut NodeportStats)) {
    if let Some(stats) = NP_STATS.get_ptr_mut(0) {
        // SAFETY: this CPU's value of a per-CPU array; nothing else holds a reference to it.
        update(unsafe { &mut *stats });
    }
}

/// Adds to the events (ICMP rate limit state and counters; this CPU's).
#[inline(always)]
pub fn events<R>(update: impl FnOnce(&mut NodeportEvents) -> R) -> Option<R> {
    let state = NP_EVENTS.get_ptr_mut(0)?;
    // SAFETY: this CPU's value of a per-CPU array; nothing else holds a reference to it.
    Some(update(unsafe { &mut *state }))
}

/// A translated packet of `len` bytes of the pair's flow: node-wide and for the pair, towards
/// the backend (`reply` false) or back towards the client.
#[inline(always)]
pub fn translated(service_id: u32, backend_id: u32, reply: bool, len: u32) {
    let len = u64::from(len);
    if reply {
        count(|s| {
            s.packets_out += 1;
            s.bytes_out += len;
        });
    } else {
        count(|s| {
            s.packets_in += 1;
            s.bytes_in += len;
        });
    }
    let key = BackendStatsKey {
        service_id,
        backend_id,
    };
    // Never inserted here: the agent deletes a pair that left, and in-flight flows of a removed
    // backend must not bring its entry back.
    if let Some(stats) = NP_BACKEND_STATS.get_ptr_mut(key) {
        // SAFETY: this CPU's value of a per-CPU map.
        let stats = unsafe { &mut *stats };
        if reply {
            stats.packets_out += 1;
            stats.bytes_out += len;
        } else {
            stats.packets_in += 1;
            stats.bytes_in += len;
        }
    }
}
