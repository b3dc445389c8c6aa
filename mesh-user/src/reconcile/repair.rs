//! The resync: compare what the maps really hold with what the agent wrote, and plan the
//! writes that put every entry back. Pure. Also finds what the kernel created and nobody owns
//! any more (passive state and affinity of pairs that left).

use std::collections::{BTreeMap, BTreeSet};

use super::applied::Entries;
use crate::datapath::{MapOp, SlotBackend, Snapshot};

/// Writes that make `actual` hold exactly `expected`, ordered as a plan is (puts of what an
/// entry points at before the entry, deletes after).
pub fn repair(expected: &Entries, actual: &Snapshot) -> Vec<MapOp> {
    let mut early = Vec::new();
    let mut switch = Vec::new();
    let mut late = Vec::new();
    let mut last = Vec::new();

    for (&id, &addr) in &expected.backends {
        if actual.backends.get(&id) != Some(&addr) {
            early.push(MapOp::PutBackend { id, addr });
        }
    }
    for key in &expected.counters {
        if !actual.backend_stats.contains_key(key) {
            early.push(MapOp::CreateCounter(*key));
        }
    }
    for (key, &slots) in &expected.active {
        if actual.active.get(key) != Some(&slots) {
            early.push(MapOp::PutActive { key: *key, slots });
        }
    }
    for (key, &backend_id) in &expected.slots {
        // Every backend a slot of the model names has an address (`Applied` keeps ids only
        // while their entries exist); a slot without one could not be written whole.
        if actual.slots.get(key) != Some(&backend_id)
            && let Some(&addr) = expected.backends.get(&backend_id)
        {
            early.push(MapOp::PutSlot {
                key: *key,
                backend: SlotBackend {
                    id: backend_id,
                    addr,
                },
            });
        }
    }
    for (&service_id, name) in &expected.names {
        if actual.names.get(&service_id) != Some(name) {
            early.push(MapOp::PutName {
                service_id,
                name: name.clone(),
            });
        }
    }
    for (vip, service) in &expected.services {
        if actual.services.get(vip) != Some(service) {
            switch.push(MapOp::PutService {
                vip: *vip,
                service: *service,
            });
        }
    }
    for vip in actual.services.keys() {
        if !expected.services.contains_key(vip) {
            switch.push(MapOp::DeleteService { vip: *vip });
        }
    }
    for key in actual.slots.keys() {
        if !expected.slots.contains_key(key) {
            late.push(MapOp::DeleteSlot(*key));
        }
    }
    for &service_id in actual.names.keys() {
        if !expected.names.contains_key(&service_id) {
            late.push(MapOp::DeleteName { service_id });
        }
    }
    for key in actual.backend_stats.keys() {
        if !expected.counters.contains(key) {
            late.push(MapOp::DeleteCounter(*key));
        }
    }
    for key in actual.active.keys() {
        if !expected.active.contains_key(key) {
            late.push(MapOp::DeleteActive(*key));
        }
    }
    // The kernel creates passive state only for members; what remains of a pair that left is a
    // leak (DeleteCounter above removes the passive entry of a counter it deletes).
    for key in actual.passive.keys() {
        if !expected.counters.contains(key) && !actual.backend_stats.contains_key(key) {
            late.push(MapOp::DeletePassive(*key));
        }
    }
    let live_ids: BTreeSet<u32> = expected.services.values().map(|s| s.id).collect();
    for (key, backend_id) in &actual.affinity {
        let member = expected
            .counters
            .contains(&super::applied::pair(key.service_id, *backend_id));
        if !live_ids.contains(&key.service_id) || !member {
            late.push(MapOp::DeleteAffinity(*key));
        }
    }
    for &id in actual.backends.keys() {
        if !expected.backends.contains_key(&id) {
            last.push(MapOp::DeleteBackend { id });
        }
    }
    early.sort_by_key(put_order);
    early
        .into_iter()
        .chain(switch)
        .chain(late)
        .chain(last)
        .collect()
}

/// Puts in dependency order: backends, then what names them.
fn put_order(op: &MapOp) -> u8 {
    match op {
        MapOp::PutBackend { .. } => 0,
        MapOp::CreateCounter(_) | MapOp::PutActive { .. } => 1,
        _ => 2,
    }
}

/// Repairs by map, for the log and the metric.
pub fn count_by_map(ops: &[MapOp]) -> BTreeMap<&'static str, u64> {
    let mut counts = BTreeMap::new();
    for op in ops {
        *counts.entry(op.map()).or_insert(0) += 1;
    }
    counts
}
