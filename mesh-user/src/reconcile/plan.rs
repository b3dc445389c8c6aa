//! The diff from desired state to map writes. Pure: (desired, applied) -> ordered writes plus
//! the state the maps hold once the writes are done.
//!
//! Ordering is what keeps concurrent connects safe: backends, counters and the new slot set are
//! written first, then the service entry is switched to the new slot set in one update. The
//! slot set it switched away from stays until the service's next switch (when it is deleted
//! before the new set is written) or until the resync retires it (`retire_previous`, at least
//! a second after the switch), so a connect that read the entry just before a switch still
//! finds its slot; the kernel also re-reads the entry once when a slot is missing. Nothing here
//! waits for time to pass.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
};

use mesh_common::capacity::Limits;

use super::applied::{Applied, AppliedService, Patch, SlotSet, named_backends, pair};
use crate::{
    datapath::{MapOp, SlotBackend},
    desired::{DesiredService, DesiredState},
    model::Vip,
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("no free service id: the services map holds at most {max} services")]
    ServicesFull { max: u32 },
    #[error("no free backend id: the backends map holds at most {max} backends")]
    BackendsFull { max: u32 },
}

/// When a write must happen relative to the others (sorted stably).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    /// Previous slot sets of services about to switch again: nothing points at them.
    Retire,
    /// Backends nothing can read any more (no live or kept slot set, no member): gone before
    /// new ones are written, so the backends map holds at most the old live and the new ones.
    RetireBackends,
    Backends,
    /// Counters, per-service state reset and active marks, before any slot names a backend.
    Members,
    Slots,
    /// Service entries switch (or go): what concurrent connects read first.
    Switch,
    /// What a switched-away or removed entry pointed at.
    Cleanup,
    /// Backends last: no slot names them any more.
    BackendsGone,
}

struct Ops(Vec<(Phase, MapOp)>);

impl Ops {
    fn push(&mut self, phase: Phase, op: MapOp) {
        self.0.push((phase, op));
    }

    fn delete_set(&mut self, phase: Phase, service_id: u32, set: &SlotSet) {
        if !set.backends.is_empty() {
            self.push(
                phase,
                MapOp::DeleteSlots {
                    service_id,
                    generation: set.generation,
                    count: set.backends.len() as u32,
                },
            );
        }
    }

    /// By phase, and within a phase by kind (nothing in one phase depends on another write of
    /// it), so writes of one kind can go to the kernel as one batch.
    fn into_sorted(mut self) -> Vec<MapOp> {
        self.0.sort_by_key(|(phase, op)| (*phase, op.kind()));
        self.0.into_iter().map(|(_, op)| op).collect()
    }
}

/// Which services a plan looks at.
#[derive(Clone, Copy, Debug)]
pub enum Scope<'a> {
    /// Every service desired or applied; backend entries nothing names are deleted too.
    All,
    /// Only these VIPs. The caller vouches that every other service is desired exactly as
    /// `applied` holds it, so the plan costs what the change costs, not what the registry holds.
    Only(&'a BTreeSet<Vip>),
}

#[cfg(test)]
/// Plans the writes that turn `applied` into `desired`. Nothing that is already right is
/// rewritten. On error nothing has been written (planning touches no map). When keeping every
/// previous slot set would not fit the maps, previous sets are dropped first (connects then
/// rely on the kernel's re-read of the service entry alone).
pub fn plan(
    desired: &DesiredState,
    applied: &Applied,
    limits: &Limits,
) -> Result<(Vec<MapOp>, Applied), PlanError> {
    let (ops, patch) = plan_scoped(desired, applied, limits, Scope::All)?;
    let mut next = applied.clone();
    next.patch(patch);
    Ok((ops, next))
}

/// `plan` restricted to `scope`; returns the writes and what they change in the model.
pub fn plan_scoped(
    desired: &DesiredState,
    applied: &Applied,
    limits: &Limits,
    scope: Scope<'_>,
) -> Result<(Vec<MapOp>, Patch), PlanError> {
    let keeping = plan_with(desired, applied, limits, scope, true)?;
    if fits(&keeping.0, applied, limits) {
        return Ok(keeping);
    }
    // Dropping previous sets frees room only when every service drops its own.
    plan_with(desired, applied, limits, Scope::All, false)
}

/// Whether the maps can hold the old and the new state at the busiest moment of the plan: slot
/// sets and backend entries are written before the ones they replace are deleted.
fn fits(ops: &[MapOp], applied: &Applied, limits: &Limits) -> bool {
    let slots_of =
        |svc: &AppliedService| -> u64 { svc.slot_sets().map(|s| s.backends.len() as u64).sum() };
    let before: u64 = applied.services.values().map(slots_of).sum();
    let (mut retired, mut written, mut early_backends, mut new_backends) = (0u64, 0u64, 0u64, 0u64);
    for op in ops {
        match op {
            MapOp::PutSlots { backends, .. } => written += backends.len() as u64,
            // Deletes before the first put are the retired previous sets.
            MapOp::DeleteSlots { count, .. } if written == 0 => retired += u64::from(*count),
            MapOp::DeleteBackend { .. } if new_backends == 0 && written == 0 => early_backends += 1,
            MapOp::PutBackend { .. } => new_backends += 1,
            _ => {}
        }
    }
    let peak_slots = before - retired.min(before) + written;
    let peak_backends = applied.backends.len() as u64 - early_backends + new_backends;
    peak_slots <= u64::from(limits.max_slots) && peak_backends < u64::from(limits.max_backends)
}

fn plan_with(
    desired: &DesiredState,
    applied: &Applied,
    limits: &Limits,
    scope: Scope<'_>,
    keep_previous: bool,
) -> Result<(Vec<MapOp>, Patch), PlanError> {
    let mut ops = Ops(Vec::new());
    let vips: BTreeSet<Vip> = match scope {
        Scope::All => desired
            .services
            .keys()
            .chain(applied.services.keys())
            .copied()
            .collect(),
        Scope::Only(vips) => vips.clone(),
    };

    // Backends: keep ids of addresses still in use, hand out fresh ids for new ones.
    let new_addrs: BTreeSet<SocketAddr> = vips
        .iter()
        .filter_map(|vip| desired.services.get(vip))
        .flat_map(|s| s.members.iter().map(|m| m.addr))
        .filter(|addr| !applied.backends.contains_key(addr))
        .collect();
    let mut backend_ids = IdCursor::new(applied.next_backend_id, limits.max_backends);
    let mut added: BTreeMap<SocketAddr, u32> = BTreeMap::new();
    for addr in new_addrs {
        let id = backend_ids
            .take(|| applied.backend_ids())
            .ok_or(PlanError::BackendsFull {
                max: limits.max_backends,
            })?;
        ops.push(Phase::Backends, MapOp::PutBackend { id, addr });
        added.insert(addr, id);
    }
    let id_of = |addr: &SocketAddr| applied.backends.get(addr).or(added.get(addr)).copied();

    let mut service_ids = IdCursor::new(applied.next_service_id, limits.max_services);
    let mut patch = Patch::default();
    // Per backend id: services naming it after the plan minus before, for those in scope.
    let mut users_delta: BTreeMap<u32, i64> = BTreeMap::new();
    // Backends the live slot sets of the services in scope name now.
    let mut readable_now: BTreeSet<u32> = BTreeSet::new();
    for vip in &vips {
        let old = applied.services.get(vip);
        if let Some(old) = old {
            for id in named_backends(old) {
                *users_delta.entry(id).or_default() -= 1;
            }
            readable_now.extend(old.live.backends.iter().copied());
        }
        let service = match desired.services.get(vip) {
            Some(want) => {
                let service = plan_service(
                    &mut ops,
                    vip,
                    want,
                    old,
                    &id_of,
                    &mut service_ids,
                    || applied.service_ids(),
                    limits,
                    keep_previous,
                )?;
                for id in named_backends(&service) {
                    *users_delta.entry(id).or_default() += 1;
                }
                Some(service)
            }
            None => {
                if let Some(old) = old {
                    plan_removal(&mut ops, vip, old, keep_previous);
                }
                None
            }
        };
        patch.services.push((*vip, service));
    }

    // A backend entry stays while a member or a slot set names it. One that no live set names
    // now can go before the new backends are written.
    let mut unnamed: BTreeSet<u32> = users_delta
        .iter()
        .filter(|&(&id, &delta)| i64::from(applied.users_of(id)) + delta <= 0)
        .map(|(&id, _)| id)
        .collect();
    if matches!(scope, Scope::All) {
        // Entries nothing named before the plan (read back from the maps after a write that
        // failed half-way), unless the plan names them now: those are kept and reused.
        unnamed.extend(
            applied
                .unnamed_backends()
                .filter(|id| users_delta.get(id).is_none_or(|&delta| delta <= 0)),
        );
    }
    for id in unnamed {
        if added.values().any(|&new| new == id) {
            continue;
        }
        let phase = if readable_now.contains(&id) {
            Phase::BackendsGone
        } else {
            Phase::RetireBackends
        };
        ops.push(phase, MapOp::DeleteBackend { id });
        patch.backends_removed.push(id);
    }
    patch.backends_added = added.into_iter().collect();
    patch.next_service_id = service_ids.cursor;
    patch.next_backend_id = backend_ids.cursor;
    Ok((ops.into_sorted(), patch))
}

/// Drops the previous slot sets of the services at `vips`, and the backend entries only those
/// sets still named (backends that left every service): a previous set is kept at a switch for
/// connects that read the entry just before it, and must not outlive them until the service's
/// next switch, which may never come. The caller decides when a set is old enough.
pub fn retire_previous(applied: &Applied, vips: &BTreeSet<Vip>) -> (Vec<MapOp>, Patch) {
    let mut ops = Ops(Vec::new());
    let mut patch = Patch {
        next_service_id: applied.next_service_id,
        next_backend_id: applied.next_backend_id,
        ..Default::default()
    };
    let mut users_delta: BTreeMap<u32, i64> = BTreeMap::new();
    for vip in vips {
        let Some(old) = applied.services.get(vip) else {
            continue;
        };
        let Some(previous) = &old.previous else {
            continue;
        };
        ops.delete_set(Phase::Retire, old.id, previous);
        let service = AppliedService {
            previous: None,
            ..old.clone()
        };
        for &id in named_backends(old).difference(&named_backends(&service)) {
            *users_delta.entry(id).or_default() -= 1;
        }
        patch.services.push((*vip, Some(service)));
    }
    for (id, delta) in users_delta {
        if i64::from(applied.users_of(id)) + delta <= 0 {
            // After the slots: nothing names it any more.
            ops.push(Phase::BackendsGone, MapOp::DeleteBackend { id });
            patch.backends_removed.push(id);
        }
    }
    (ops.into_sorted(), patch)
}

/// The writes that make one service what `want` says; returns it as the maps will hold it.
#[allow(clippy::too_many_arguments)]
fn plan_service(
    ops: &mut Ops,
    vip: &Vip,
    want: &DesiredService,
    old: Option<&AppliedService>,
    id_of: &impl Fn(&SocketAddr) -> Option<u32>,
    service_ids: &mut IdCursor,
    ids_in_use: impl Fn() -> BTreeSet<u32>,
    limits: &Limits,
    keep_previous: bool,
) -> Result<AppliedService, PlanError> {
    let id = match old {
        Some(old) => old.id,
        None => {
            let id = service_ids
                .take(ids_in_use)
                .ok_or(PlanError::ServicesFull {
                    max: limits.max_services,
                })?;
            ops.push(Phase::Members, MapOp::ResetService { service_id: id });
            id
        }
    };
    // Every member has an id: known backends keep theirs, new ones were just handed out.
    let backend = |addr: &SocketAddr| id_of(addr).unwrap_or_default();
    let members: BTreeSet<u32> = want.members.iter().map(|m| backend(&m.addr)).collect();
    let slot_backends: Vec<SlotBackend> = want
        .slot_layout()
        .iter()
        .map(|addr| SlotBackend {
            id: backend(addr),
            addr: *addr,
        })
        .collect();
    let slots: Vec<u32> = slot_backends.iter().map(|b| b.id).collect();

    let mut active = BTreeMap::new();
    for &backend_id in &slots {
        *active.entry(backend_id).or_insert(0u32) += 1;
    }
    let no_active = BTreeMap::new();
    let old_active = old.map_or(&no_active, |o| &o.active);
    for (&backend_id, &count) in &active {
        if old_active.get(&backend_id) != Some(&count) {
            let key = pair(id, backend_id);
            ops.push(Phase::Members, MapOp::PutActive { key, slots: count });
        }
    }
    for &backend_id in old_active.keys() {
        if !active.contains_key(&backend_id) {
            ops.push(Phase::Cleanup, MapOp::DeleteActive(pair(id, backend_id)));
        }
    }
    let no_members = BTreeSet::new();
    let old_members = old.map_or(&no_members, |o| &o.members);
    for &backend_id in members.difference(old_members) {
        ops.push(Phase::Members, MapOp::CreateCounter(pair(id, backend_id)));
    }
    for &backend_id in old_members.difference(&members) {
        ops.push(Phase::Cleanup, MapOp::DeleteCounter(pair(id, backend_id)));
    }
    if old.is_none_or(|o| o.name != want.name) {
        let name = want.name.clone();
        ops.push(
            Phase::Slots,
            MapOp::PutName {
                service_id: id,
                name,
            },
        );
    }

    let (live, previous) = match old {
        None => (
            SlotSet {
                generation: 1,
                backends: slots,
            },
            None,
        ),
        Some(o) if o.live.backends == slots => {
            let previous = match &o.previous {
                Some(p) if !keep_previous => {
                    ops.delete_set(Phase::Retire, id, p);
                    None
                }
                other => other.clone(),
            };
            (o.live.clone(), previous)
        }
        Some(o) => {
            if let Some(p) = &o.previous {
                ops.delete_set(Phase::Retire, id, p);
            }
            let live = SlotSet {
                generation: o.live.generation.wrapping_add(1),
                backends: slots,
            };
            let previous = if o.live.backends.is_empty() {
                None
            } else if keep_previous {
                Some(o.live.clone())
            } else {
                ops.delete_set(Phase::Cleanup, id, &o.live);
                None
            };
            (live, previous)
        }
    };
    if old.is_none_or(|o| o.live != live) && !live.backends.is_empty() {
        // A new live set is always this layout.
        ops.push(
            Phase::Slots,
            MapOp::PutSlots {
                service_id: id,
                generation: live.generation,
                backends: slot_backends,
            },
        );
    }
    let service = AppliedService {
        id,
        name: want.name.clone(),
        flags: want.flags,
        affinity_timeout_secs: want.affinity_timeout_secs,
        live,
        previous,
        members,
        active,
    };
    if old.is_none_or(|o| o.entry() != service.entry()) {
        ops.push(
            Phase::Switch,
            MapOp::PutService {
                vip: *vip,
                service: service.entry(),
            },
        );
    }
    Ok(service)
}

/// A service no longer wanted: the entry goes first so no connect can reach its slots. When
/// previous sets are not kept, its previous set goes before anything is written, like every
/// other service's: otherwise the maps would hold three registries' slots at once.
fn plan_removal(ops: &mut Ops, vip: &Vip, old: &AppliedService, keep_previous: bool) {
    ops.push(Phase::Switch, MapOp::DeleteService { vip: *vip });
    ops.delete_set(Phase::Cleanup, old.id, &old.live);
    if let Some(previous) = &old.previous {
        let phase = if keep_previous {
            Phase::Cleanup
        } else {
            Phase::Retire
        };
        ops.delete_set(phase, old.id, previous);
    }
    ops.push(Phase::Cleanup, MapOp::DeleteName { service_id: old.id });
    for &backend_id in old.active.keys() {
        ops.push(
            Phase::Cleanup,
            MapOp::DeleteActive(pair(old.id, backend_id)),
        );
    }
    for &backend_id in &old.members {
        ops.push(
            Phase::Cleanup,
            MapOp::DeleteCounter(pair(old.id, backend_id)),
        );
    }
}

/// Hands out ids in increasing order from a cursor, wrapping within 1..max and skipping ids in
/// use, so an id freed now is the last to be handed out again. The ids in use are read only
/// when the first id is needed (most plans need none).
struct IdCursor {
    used: Option<BTreeSet<u32>>,
    max: u32,
    cursor: u32,
}

impl IdCursor {
    fn new(cursor: u32, max: u32) -> Self {
        Self {
            used: None,
            max,
            cursor: if (1..max).contains(&cursor) {
                cursor
            } else {
                1
            },
        }
    }

    fn take(&mut self, in_use: impl FnOnce() -> BTreeSet<u32>) -> Option<u32> {
        let used = self.used.get_or_insert_with(in_use);
        for _ in 1..self.max {
            let id = self.cursor;
            self.cursor = if id + 1 >= self.max { 1 } else { id + 1 };
            if used.insert(id) {
                return Some(id);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use mesh_common::{PROTO_TCP, SVC_F_REJECT_EMPTY, SlotKey};
    use proptest::prelude::*;

    use super::*;
    use crate::{
        desired::{DesiredService, Member},
        model::Vip,
        reconcile::applied::Entries,
    };

    const LIMITS: Limits = Limits {
        max_services: 16,
        max_backends: 16,
        max_service_backends: 64,
        max_slots: 256,
        max_external_flows: 16,
    };

    fn vip(s: &str) -> Vip {
        Vip {
            addr: s.parse().unwrap(),
            proto: PROTO_TCP,
            external: false,
        }
    }

    fn service(name: &str, backends: &[(&str, u32, bool)]) -> DesiredService {
        DesiredService {
            name: name.into(),
            flags: SVC_F_REJECT_EMPTY,
            affinity_timeout_secs: 0,
            terminate_udp_flows: true,
            members: backends
                .iter()
                .map(|&(addr, weight, active)| Member {
                    addr: addr.parse().unwrap(),
                    weight,
                    active,
                })
                .collect(),
        }
    }

    fn desired(services: Vec<(&str, DesiredService)>) -> DesiredState {
        DesiredState {
            services: services.into_iter().map(|(v, s)| (vip(v), s)).collect(),
        }
    }

    fn position(ops: &[MapOp], pred: impl Fn(&MapOp) -> bool) -> usize {
        ops.iter().position(pred).expect("op present")
    }

    /// The maps as plain sets of entries, with the ops applied the way the kernel sees them,
    /// and the backend address each slot carries.
    #[derive(Default, Debug, Clone, PartialEq)]
    struct Model(Entries, BTreeMap<SlotKey, SocketAddr>);

    impl Model {
        /// Maps that hold `entries`, every slot with its backend's address.
        fn of(entries: Entries) -> Model {
            let addrs = entries
                .slots
                .iter()
                .filter_map(|(key, id)| Some((*key, *entries.backends.get(id)?)))
                .collect();
            Model(entries, addrs)
        }

        fn apply(&mut self, op: &MapOp) {
            let (e, slot_addrs) = (&mut self.0, &mut self.1);
            match op {
                MapOp::PutBackend { id, addr } => {
                    e.backends.insert(*id, *addr);
                }
                MapOp::DeleteBackend { id } => {
                    e.backends.remove(id);
                }
                MapOp::CreateCounter(key) => {
                    e.counters.insert(*key);
                }
                MapOp::DeleteCounter(key) => {
                    e.counters.remove(key);
                }
                MapOp::ResetService { .. } | MapOp::DeletePassive(_) | MapOp::DeleteAffinity(_) => {
                }
                MapOp::PutSlots {
                    service_id,
                    generation,
                    backends,
                } => {
                    for (slot, b) in backends.iter().enumerate() {
                        let key = SlotKey {
                            service_id: *service_id,
                            generation: *generation,
                            slot: slot as u32,
                        };
                        e.slots.insert(key, b.id);
                        slot_addrs.insert(key, b.addr);
                    }
                }
                MapOp::DeleteSlots {
                    service_id,
                    generation,
                    count,
                } => {
                    for slot in 0..*count {
                        let key = SlotKey {
                            service_id: *service_id,
                            generation: *generation,
                            slot,
                        };
                        e.slots.remove(&key);
                        slot_addrs.remove(&key);
                    }
                }
                MapOp::PutSlot { key, backend } => {
                    e.slots.insert(*key, backend.id);
                    slot_addrs.insert(*key, backend.addr);
                }
                MapOp::DeleteSlot(key) => {
                    e.slots.remove(key);
                    slot_addrs.remove(key);
                }
                MapOp::PutName { service_id, name } => {
                    e.names.insert(*service_id, name.clone());
                }
                MapOp::DeleteName { service_id } => {
                    e.names.remove(service_id);
                }
                MapOp::PutService { vip, service } => {
                    e.services.insert(*vip, *service);
                }
                MapOp::DeleteService { vip } => {
                    e.services.remove(vip);
                }
                MapOp::PutActive { key, slots } => {
                    e.active.insert(*key, *slots);
                }
                MapOp::DeleteActive(key) => {
                    e.active.remove(key);
                }
            }
        }

        /// A slot that names a backend the maps hold, and carries that backend's address.
        fn slot_reaches_its_backend(&self, key: &SlotKey) -> Result<(), String> {
            let Some(backend) = self.0.slots.get(key) else {
                return Err("missing".into());
            };
            let Some(addr) = self.0.backends.get(backend) else {
                return Err(format!("names unknown backend {backend}"));
            };
            match self.1.get(key) {
                Some(carried) if carried == addr => Ok(()),
                carried => Err(format!(
                    "carries {carried:?}, but backend {backend} is {addr}"
                )),
            }
        }

        /// What a connect could see: every slot of every live entry names a known backend and
        /// carries its address.
        fn check_connectable(&self) -> Result<(), String> {
            for (vip, svc) in &self.0.services {
                for slot in 0..svc.slot_count {
                    let key = SlotKey {
                        service_id: svc.id,
                        generation: svc.generation,
                        slot,
                    };
                    self.slot_reaches_its_backend(&key).map_err(|e| {
                        format!("{vip}: slot {slot} of generation {}: {e}", svc.generation)
                    })?;
                }
            }
            Ok(())
        }

        /// A connect that read the entry before the latest switch of its service (the previous
        /// generation) still finds a slot and a backend.
        fn check_previous(
            &self,
            before: &BTreeMap<Vip, mesh_common::Service>,
        ) -> Result<(), String> {
            let e = &self.0;
            for (vip, old) in before {
                let Some(now) = e.services.get(vip) else {
                    continue;
                };
                if now.generation == old.generation || old.slot_count == 0 {
                    continue;
                }
                for slot in 0..old.slot_count {
                    let key = SlotKey {
                        service_id: old.id,
                        generation: old.generation,
                        slot,
                    };
                    self.slot_reaches_its_backend(&key).map_err(|e| {
                        format!(
                            "{vip}: previous generation slot {slot} right after the switch: {e}"
                        )
                    })?;
                }
            }
            Ok(())
        }
    }

    /// Applies a plan op by op to the model, checking the invariants after every op.
    fn apply_checked(model: &mut Model, ops: &[MapOp]) -> Result<(), String> {
        let before = model.0.services.clone();
        for (i, op) in ops.iter().enumerate() {
            model.apply(op);
            model
                .check_connectable()
                .map_err(|e| format!("after op {i} {op:?}: {e}"))?;
        }
        model.check_previous(&before)
    }

    /// The maps the model holds, as the resync reads them back.
    fn snapshot(model: &Model) -> crate::datapath::Snapshot {
        let e = &model.0;
        crate::datapath::Snapshot {
            services: e.services.clone(),
            slots: e.slots.clone(),
            backends: e.backends.clone(),
            names: e.names.clone(),
            backend_stats: e
                .counters
                .iter()
                .map(|k| (*k, Default::default()))
                .collect(),
            active: e.active.clone(),
            ..Default::default()
        }
    }

    /// What `Executor::resync` does once every previous slot set is older than its grace:
    /// retire them, forget backend entries nothing names, then repair the maps against the
    /// model. The maps must end holding exactly what the model implies.
    fn resync(applied: &mut Applied, model: &mut Model) -> Result<(), String> {
        let old: BTreeSet<Vip> = applied
            .services
            .iter()
            .filter(|(_, svc)| svc.previous.is_some())
            .map(|(vip, _)| *vip)
            .collect();
        let (ops, patch) = retire_previous(applied, &old);
        apply_checked(model, &ops)?;
        applied.patch(patch);
        applied.forget_unnamed_backends();
        for op in &super::super::repair::repair(&applied.entries(), &snapshot(model)) {
            model.apply(op);
        }
        if model.0 != applied.entries() {
            return Err(format!(
                "after the resync the maps hold {:?}, the model implies {:?}",
                model.0,
                applied.entries()
            ));
        }
        Ok(())
    }

    /// The backend addresses a desired state uses (members, in rotation or not).
    fn used_addrs(desired: &DesiredState) -> BTreeSet<SocketAddr> {
        desired
            .services
            .values()
            .flat_map(|s| s.members.iter().map(|m| m.addr))
            .collect()
    }

    fn held_addrs(model: &Model) -> BTreeSet<SocketAddr> {
        model.0.backends.values().copied().collect()
    }

    /// The soak's finding: `api` is PUT with backends 1 and 2, then with 1 only and another
    /// weight, and never switches again. Backend 2 stays readable right after the switch (the
    /// previous slot set names it), and the resync removes it.
    #[test]
    fn a_backend_that_left_every_service_is_gone_after_the_resync() {
        let stable = (
            "127.100.0.1:80",
            service("stable", &[("127.0.0.1:9", 1, true)]),
        );
        let api = vip("127.100.0.4:80");
        let v1 = desired(vec![
            stable.clone(),
            (
                "127.100.0.4:80",
                service("api", &[("127.0.0.1:1", 1, true), ("127.0.0.1:2", 3, true)]),
            ),
        ]);
        let (ops, mut applied) = plan(&v1, &Applied::default(), &LIMITS).unwrap();
        let mut model = Model::default();
        apply_checked(&mut model, &ops).unwrap();
        let v2 = desired(vec![
            stable,
            (
                "127.100.0.4:80",
                service("api", &[("127.0.0.1:1", 2, true)]),
            ),
        ]);
        let (ops, patch) =
            plan_scoped(&v2, &applied, &LIMITS, Scope::Only(&BTreeSet::from([api]))).unwrap();
        apply_checked(&mut model, &ops).unwrap();
        applied.patch(patch);
        assert_eq!(model.0, applied.entries());
        let two: SocketAddr = "127.0.0.1:2".parse().unwrap();
        assert!(
            held_addrs(&model).contains(&two),
            "kept for connects racing the switch"
        );
        resync(&mut applied, &mut model).unwrap();
        assert_eq!(held_addrs(&model), used_addrs(&v2));
        assert_eq!(model.0.backends.len(), 2);
        assert!(applied.services[&api].previous.is_none());
        // Nothing left to do: the next resync and an unchanged plan write nothing.
        let (ops, again) = plan(&v2, &applied, &LIMITS).unwrap();
        assert_eq!(ops, vec![]);
        assert_eq!(again, applied);
        let (ops, _) = retire_previous(&applied, &BTreeSet::from([api]));
        assert_eq!(ops, vec![]);
    }

    /// A first apply that fails after its backend entries are written (a full map, ENOMEM):
    /// the agent reads the maps back, where nothing names those backends yet, and plans
    /// everything again. The new plan names them: it must keep them, not delete them (the maps
    /// and the model would then agree on backends that connects need, and no resync would
    /// bring them back).
    #[test]
    fn a_retry_after_a_failed_write_keeps_the_backends_it_names() {
        let want = desired(vec![
            (
                "127.100.0.1:80",
                service("web", &[("127.0.0.1:1", 1, true), ("127.0.0.1:2", 1, true)]),
            ),
            (
                "127.100.0.2:80",
                service("api", &[("127.0.0.1:2", 1, true)]),
            ),
        ]);
        let (ops, _) = plan(&want, &Applied::default(), &LIMITS).unwrap();
        let mut model = Model::default();
        // The write stops after the backend entries (ops are sorted by phase).
        let written = ops
            .iter()
            .take_while(|op| matches!(op, MapOp::PutBackend { .. }))
            .count();
        assert!(written > 0, "{ops:?}");
        apply_checked(&mut model, &ops[..written]).unwrap();

        let read = Applied::from_snapshot(&snapshot(&model));
        let (retry, after) = plan(&want, &read, &LIMITS).unwrap();
        assert!(
            !retry
                .iter()
                .any(|op| matches!(op, MapOp::DeleteBackend { .. })),
            "{retry:?}"
        );
        apply_checked(&mut model, &retry).unwrap();
        assert_eq!(held_addrs(&model), used_addrs(&want));
        assert_eq!(after.entries(), model.0, "the model is what the maps hold");
    }

    /// Defence in depth: a backend entry no service names (read back from the maps, or one the
    /// model does not know at all) is deleted by the resync.
    #[test]
    fn the_resync_deletes_backend_entries_no_service_names() {
        let v1 = desired(vec![(
            "127.100.0.1:80",
            service("web", &[("127.0.0.1:1", 1, true)]),
        )]);
        let (ops, mut applied) = plan(&v1, &Applied::default(), &LIMITS).unwrap();
        let mut model = Model::default();
        apply_checked(&mut model, &ops).unwrap();

        // An entry the model does not know.
        model.0.backends.insert(7, "127.0.0.1:7".parse().unwrap());
        resync(&mut applied, &mut model).unwrap();
        assert_eq!(held_addrs(&model), used_addrs(&v1));

        // An entry the model knows but nothing names (as an agent reads the maps back).
        model.0.backends.insert(8, "127.0.0.1:8".parse().unwrap());
        let mut read = Applied::from_snapshot(&snapshot(&model));
        assert_eq!(read.users_of(8), 0);
        assert_eq!(model.0, read.entries(), "the model keeps the leak");
        resync(&mut read, &mut model).unwrap();
        assert_eq!(held_addrs(&model), used_addrs(&v1));
        assert!(!read.backend_ids().contains(&8));
    }

    #[test]
    fn new_service_writes_backends_and_slots_before_the_entry() {
        let want = desired(vec![(
            "127.100.0.1:80",
            service("web", &[("127.0.0.1:1", 1, true), ("127.0.0.1:2", 2, true)]),
        )]);
        let (ops, applied) = plan(&want, &Applied::default(), &LIMITS).unwrap();
        let entry = position(&ops, |op| matches!(op, MapOp::PutService { .. }));
        let slots = position(&ops, |op| matches!(op, MapOp::PutSlots { .. }));
        let backend = position(&ops, |op| matches!(op, MapOp::PutBackend { .. }));
        let counter = position(&ops, |op| matches!(op, MapOp::CreateCounter(_)));
        assert!(backend < slots && counter < slots && slots < entry);
        let svc = &applied.services[&vip("127.100.0.1:80")];
        assert_eq!(svc.id, 1);
        assert_eq!(svc.live.backends.len(), 3);
        assert_eq!(applied.backends.len(), 2);
    }

    #[test]
    fn unchanged_state_plans_no_writes() {
        let want = desired(vec![(
            "127.100.0.1:80",
            service("web", &[("127.0.0.1:1", 1, true)]),
        )]);
        let (_, applied) = plan(&want, &Applied::default(), &LIMITS).unwrap();
        let (ops, again) = plan(&want, &applied, &LIMITS).unwrap();
        assert_eq!(ops, vec![]);
        assert_eq!(again, applied);
    }

    #[test]
    fn the_previous_slot_set_stays_until_the_next_switch() {
        let v1 = desired(vec![(
            "127.100.0.1:80",
            service("web", &[("127.0.0.1:1", 1, true), ("127.0.0.1:2", 1, true)]),
        )]);
        let (_, applied) = plan(&v1, &Applied::default(), &LIMITS).unwrap();
        let v2 = desired(vec![(
            "127.100.0.1:80",
            service("web", &[("127.0.0.1:1", 1, true), ("127.0.0.1:3", 1, true)]),
        )]);
        let (ops, next) = plan(&v2, &applied, &LIMITS).unwrap();
        // Generation 1 is kept (no delete of it), and so is backend 2 its slots name.
        assert!(!ops.iter().any(|op| matches!(op, MapOp::DeleteSlots { .. })));
        assert!(
            !ops.iter()
                .any(|op| matches!(op, MapOp::DeleteBackend { .. }))
        );
        let new_slots = position(&ops, |op| {
            matches!(op, MapOp::PutSlots { generation: 2, .. })
        });
        let entry = position(&ops, |op| matches!(op, MapOp::PutService { .. }));
        assert!(new_slots < entry);
        assert!(ops.contains(&MapOp::DeleteCounter(pair(1, 2))));
        let svc = &next.services[&vip("127.100.0.1:80")];
        assert_eq!(svc.live.generation, 2);
        assert_eq!(svc.previous.as_ref().map(|p| p.generation), Some(1));

        // The next switch deletes generation 1 and backend 2 that only it named, before it
        // writes generation 3.
        let v3 = desired(vec![(
            "127.100.0.1:80",
            service("web", &[("127.0.0.1:3", 1, true)]),
        )]);
        let (ops, last) = plan(&v3, &next, &LIMITS).unwrap();
        let retire = position(&ops, |op| {
            matches!(op, MapOp::DeleteSlots { generation: 1, .. })
        });
        let write = position(&ops, |op| {
            matches!(op, MapOp::PutSlots { generation: 3, .. })
        });
        let gone = position(&ops, |op| matches!(op, MapOp::DeleteBackend { id: 2 }));
        assert!(retire < gone && gone < write);
        assert_eq!(
            last.services[&vip("127.100.0.1:80")]
                .previous
                .as_ref()
                .map(|p| p.generation),
            Some(2)
        );
    }

    #[test]
    fn ids_of_removed_backends_and_services_are_not_handed_out_again_soon() {
        let v1 = desired(vec![
            ("127.100.0.1:80", service("a", &[("127.0.0.1:1", 1, true)])),
            ("127.100.0.2:80", service("b", &[("127.0.0.1:2", 1, true)])),
        ]);
        let (_, applied) = plan(&v1, &Applied::default(), &LIMITS).unwrap();
        // Remove b and its backend, switch twice so nothing references them any more.
        let v2 = desired(vec![(
            "127.100.0.1:80",
            service("a", &[("127.0.0.1:1", 1, true)]),
        )]);
        let (_, applied) = plan(&v2, &applied, &LIMITS).unwrap();
        let v3 = desired(vec![
            ("127.100.0.1:80", service("a", &[("127.0.0.1:1", 1, true)])),
            ("127.100.0.3:80", service("c", &[("127.0.0.1:9", 1, true)])),
        ]);
        let (_, next) = plan(&v3, &applied, &LIMITS).unwrap();
        assert_eq!(
            next.services[&vip("127.100.0.3:80")].id,
            3,
            "service id 2 not reused"
        );
        assert_eq!(
            next.backends[&"127.0.0.1:9".parse().unwrap()],
            3,
            "backend id 2 not reused"
        );
    }

    #[test]
    fn ids_wrap_around_skipping_those_in_use() {
        let used = |ids: &[u32]| ids.iter().copied().collect::<BTreeSet<u32>>();
        let mut cursor = IdCursor::new(15, 16);
        assert_eq!(cursor.take(|| used(&[1, 2, 15])), Some(3));
        let mut cursor = IdCursor::new(14, 16);
        assert_eq!(cursor.take(|| used(&[1, 15])), Some(14));
        assert_eq!(cursor.take(|| unreachable!("read once")), Some(2));
        let mut full = IdCursor::new(1, 4);
        assert_eq!(full.take(|| used(&[1, 2, 3])), None);
    }

    #[test]
    fn inactive_member_keeps_its_counter_but_leaves_the_slots() {
        let v1 = desired(vec![(
            "127.100.0.1:80",
            service("web", &[("127.0.0.1:1", 1, true), ("127.0.0.1:2", 1, true)]),
        )]);
        let (_, applied) = plan(&v1, &Applied::default(), &LIMITS).unwrap();
        let v2 = desired(vec![(
            "127.100.0.1:80",
            service(
                "web",
                &[("127.0.0.1:1", 1, true), ("127.0.0.1:2", 1, false)],
            ),
        )]);
        let (ops, next) = plan(&v2, &applied, &LIMITS).unwrap();
        assert!(
            !ops.iter()
                .any(|op| matches!(op, MapOp::DeleteCounter(_) | MapOp::DeleteBackend { .. }))
        );
        assert_eq!(next.services[&vip("127.100.0.1:80")].live.backends, vec![1]);
    }

    #[test]
    fn removed_service_entry_goes_before_its_slots_and_counters() {
        let v1 = desired(vec![(
            "127.100.0.1:80",
            service("web", &[("127.0.0.1:1", 1, true)]),
        )]);
        let (_, applied) = plan(&v1, &Applied::default(), &LIMITS).unwrap();
        let (ops, next) = plan(&DesiredState::default(), &applied, &LIMITS).unwrap();
        let entry = position(&ops, |op| matches!(op, MapOp::DeleteService { .. }));
        let slots = position(&ops, |op| matches!(op, MapOp::DeleteSlots { .. }));
        let counter = position(&ops, |op| matches!(op, MapOp::DeleteCounter(_)));
        let backend = position(&ops, |op| matches!(op, MapOp::DeleteBackend { .. }));
        assert!(entry < slots && entry < counter && slots < backend && counter < backend);
        assert!(next.services.is_empty() && next.backends.is_empty());
        assert_eq!(next.entries(), Entries::default());
    }

    #[test]
    fn backends_are_shared_between_services() {
        let want = desired(vec![
            ("127.100.0.1:80", service("a", &[("127.0.0.1:1", 1, true)])),
            ("127.100.0.2:80", service("b", &[("127.0.0.1:1", 1, true)])),
        ]);
        let (ops, applied) = plan(&want, &Applied::default(), &LIMITS).unwrap();
        let backend_puts = ops
            .iter()
            .filter(|op| matches!(op, MapOp::PutBackend { .. }))
            .count();
        assert_eq!(backend_puts, 1);
        assert_eq!(applied.services.len(), 2);
    }

    #[test]
    fn running_out_of_ids_is_an_error_not_a_partial_plan() {
        let services = (1..=16)
            .map(|i| (format!("127.100.0.{i}:80"), service(&format!("s{i}"), &[])))
            .collect::<Vec<_>>();
        let want = DesiredState {
            services: services.iter().map(|(v, s)| (vip(v), s.clone())).collect(),
        };
        assert_eq!(
            plan(&want, &Applied::default(), &LIMITS),
            Err(PlanError::ServicesFull { max: 16 })
        );
    }

    #[test]
    fn empty_service_has_no_slots_but_an_entry() {
        let want = desired(vec![("127.100.0.1:80", service("web", &[]))]);
        let (ops, applied) = plan(&want, &Applied::default(), &LIMITS).unwrap();
        assert!(!ops.iter().any(|op| matches!(op, MapOp::PutSlots { .. })));
        assert_eq!(
            applied.services[&vip("127.100.0.1:80")].entry().slot_count,
            0
        );
    }

    #[test]
    fn previous_sets_are_dropped_when_keeping_them_would_not_fit() {
        let tight = Limits {
            max_slots: 4,
            ..LIMITS
        };
        let v1 = desired(vec![(
            "127.100.0.1:80",
            service("web", &[("127.0.0.1:1", 1, true), ("127.0.0.1:2", 1, true)]),
        )]);
        let (_, applied) = plan(&v1, &Applied::default(), &tight).unwrap();
        let v2 = desired(vec![(
            "127.100.0.1:80",
            service("web", &[("127.0.0.1:3", 1, true), ("127.0.0.1:4", 1, true)]),
        )]);
        let (_, applied) = plan(&v2, &applied, &tight).unwrap();
        let v3 = desired(vec![(
            "127.100.0.1:80",
            service("web", &[("127.0.0.1:5", 1, true), ("127.0.0.1:6", 1, true)]),
        )]);
        let (ops, next) = plan(&v3, &applied, &tight).unwrap();
        let mut model = Model::of(applied.entries());
        apply_checked(&mut model, &ops).unwrap();
        assert!(model.0.slots.len() <= 4);
        assert_eq!(model.0, next.entries());
    }

    /// A registry of up to 6 services over 8 backend addresses, with weights and activity.
    fn arb_desired() -> impl Strategy<Value = DesiredState> {
        let member = (0u8..8, 1u32..4, any::<bool>());
        let svc = (0u8..6, proptest::collection::vec(member, 0..5));
        proptest::collection::vec(svc, 0..6).prop_map(|services| {
            let mut state = DesiredState::default();
            for (v, members) in services {
                let mut seen = std::collections::BTreeSet::new();
                let members = members
                    .into_iter()
                    .filter(|(b, _, _)| seen.insert(*b))
                    .map(|(b, w, a)| Member {
                        addr: format!("127.0.0.1:{}", 1000 + u16::from(b))
                            .parse()
                            .unwrap(),
                        weight: w,
                        active: a,
                    })
                    .collect();
                state.services.insert(
                    vip(&format!("127.100.0.{}:80", v + 1)),
                    DesiredService {
                        name: format!("s{v}"),
                        flags: SVC_F_REJECT_EMPTY,
                        affinity_timeout_secs: 0,
                        terminate_udp_flows: true,
                        members,
                    },
                );
            }
            state
        })
    }

    proptest! {
        /// Applying plans step by step never exposes a service whose slots or backends are
        /// missing, keeps the previous generation readable right after each switch, and ends
        /// with the maps holding exactly what the planned state implies.
        #[test]
        fn plans_never_expose_a_half_written_service(steps in proptest::collection::vec(arb_desired(), 1..12)) {
            let mut applied = Applied::default();
            let mut model = Model::default();
            for desired in &steps {
                let (ops, next) = plan(desired, &applied, &LIMITS).unwrap();
                apply_checked(&mut model, &ops).map_err(TestCaseError::fail)?;
                prop_assert_eq!(&model.0, &next.entries());
                // What the maps hold is what a restarted agent reads back.
                applied = next;
            }
            let (ops, _) = plan(&DesiredState::default(), &applied, &LIMITS).unwrap();
            apply_checked(&mut model, &ops).map_err(TestCaseError::fail)?;
            prop_assert_eq!(model.0, Entries::default());
        }
    }

    proptest! {
        /// A plan scoped to the services whose desired state changed writes exactly what the
        /// full plan writes and ends in the same model.
        #[test]
        fn a_plan_scoped_to_the_change_equals_the_full_plan(steps in proptest::collection::vec(arb_desired(), 1..12)) {
            let mut applied = Applied::default();
            let mut before = DesiredState::default();
            for desired in &steps {
                let changed: BTreeSet<Vip> = desired
                    .services
                    .keys()
                    .chain(before.services.keys())
                    .filter(|vip| desired.services.get(vip) != before.services.get(vip))
                    .copied()
                    .collect();
                let (full_ops, full_next) = plan(desired, &applied, &LIMITS).unwrap();
                let (ops, patch) =
                    plan_scoped(desired, &applied, &LIMITS, Scope::Only(&changed)).unwrap();
                let mut next = applied.clone();
                next.patch(patch);
                prop_assert_eq!(&ops, &full_ops);
                prop_assert_eq!(&next, &full_next);
                applied = next;
                before = desired.clone();
            }
        }
    }

    proptest! {
        /// Scoped plans as the agent runs them, with resyncs in between (each retiring every
        /// previous slot set, as the agent's does once they are older than the grace): every
        /// backend entry is always named by some service (a member, a live slot or a kept
        /// previous slot), and right after a resync the backends map holds exactly the
        /// addresses the desired state uses, one entry each.
        #[test]
        fn the_backends_map_holds_only_backends_services_use(
            steps in proptest::collection::vec((arb_desired(), any::<bool>()), 1..12)
        ) {
            let mut applied = Applied::default();
            let mut model = Model::default();
            let mut before = DesiredState::default();
            for (desired, resync_after) in &steps {
                let changed: BTreeSet<Vip> = desired
                    .services
                    .keys()
                    .chain(before.services.keys())
                    .filter(|vip| desired.services.get(vip) != before.services.get(vip))
                    .copied()
                    .collect();
                let (ops, patch) =
                    plan_scoped(desired, &applied, &LIMITS, Scope::Only(&changed)).unwrap();
                apply_checked(&mut model, &ops).map_err(TestCaseError::fail)?;
                applied.patch(patch);
                prop_assert_eq!(&model.0, &applied.entries());
                let named: BTreeSet<u32> =
                    applied.services.values().flat_map(named_backends).collect();
                for id in model.0.backends.keys() {
                    prop_assert!(named.contains(id), "backend {} named by no service", id);
                }
                if *resync_after {
                    resync(&mut applied, &mut model).map_err(TestCaseError::fail)?;
                    prop_assert_eq!(held_addrs(&model), used_addrs(desired));
                    prop_assert_eq!(model.0.backends.len(), used_addrs(desired).len());
                }
                before = desired.clone();
            }
            resync(&mut applied, &mut model).map_err(TestCaseError::fail)?;
            prop_assert_eq!(held_addrs(&model), used_addrs(&before));
        }
    }

    /// The capacities of the maps at `limits`, checked after every single write.
    fn check_capacity(model: &Model, limits: &Limits) -> Result<(), String> {
        let e = &model.0;
        for (map, len, max) in [
            ("services", e.services.len(), limits.max_services),
            ("slots", e.slots.len(), limits.max_slots),
            ("backends", e.backends.len(), limits.max_backends),
            (
                "backend_stats",
                e.counters.len(),
                limits.max_service_backends,
            ),
            ("active", e.active.len(), limits.max_service_backends),
        ] {
            if len > max as usize {
                return Err(format!("{map} holds {len} entries, its capacity is {max}"));
            }
        }
        Ok(())
    }

    /// A config over a pool of 10 addresses, rendered as TOML so the real parser and validator
    /// decide whether it is accepted.
    fn arb_config_text() -> impl Strategy<Value = String> {
        let backend = (0u16..10, 1u32..6);
        let svc = (0u8..8, proptest::collection::vec(backend, 0..5));
        proptest::collection::vec(svc, 0..7).prop_map(|services| {
            let mut text = String::from(
                "[agent.limits]\nmax_services = 9\nmax_backends = 13\n\
                 max_service_backends = 16\nmax_slots = 40\n",
            );
            let mut vips = std::collections::BTreeSet::new();
            for (v, backends) in services {
                if !vips.insert(v) {
                    continue;
                }
                text += &format!(
                    "[[services]]\nname = \"s{v}\"\nvip = \"127.100.0.{}:80\"\n",
                    v + 1
                );
                let mut seen = std::collections::BTreeSet::new();
                for (b, w) in backends {
                    if seen.insert(b) {
                        text += &format!(
                            "[[services.backends]]\naddr = \"127.0.0.1:{}\"\nweight = {w}\n",
                            1000 + b
                        );
                    }
                }
            }
            text
        })
    }

    proptest! {
        /// Any sequence of registries the validator accepts, with any backends out of rotation,
        /// is written without a map ever holding more than its capacity, and without running
        /// out of ids. Rejected registries leave the previous state, as in the agent.
        #[test]
        fn accepted_registries_always_fit_the_maps(
            steps in proptest::collection::vec((arb_config_text(), any::<u64>()), 1..16)
        ) {
            let limits = Limits {
                max_services: 9,
                max_backends: 13,
                max_service_backends: 16,
                max_slots: 40,
                max_external_flows: 16,
            };
            let mut applied = Applied::default();
            let mut model = Model::default();
            let mut accepted = 0;
            for (text, health) in &steps {
                let Ok(config) = crate::config::parse(text, "prop") else { continue };
                accepted += 1;
                let mut desired = DesiredState::from_config(&config);
                let mut bit = 0;
                for svc in desired.services.values_mut() {
                    for member in &mut svc.members {
                        member.active = health >> (bit % 64) & 1 == 1;
                        bit += 1;
                    }
                }
                let (ops, next) = plan(&desired, &applied, &limits)
                    .map_err(|e| TestCaseError::fail(format!("{e} for\n{text}")))?;
                for (i, op) in ops.iter().enumerate() {
                    model.apply(op);
                    check_capacity(&model, &limits)
                        .map_err(|e| TestCaseError::fail(format!("after op {i} {op:?}: {e}\n{text}")))?;
                }
                model.check_connectable().map_err(TestCaseError::fail)?;
                prop_assert_eq!(&model.0, &next.entries());
                applied = next;
            }
            let _ = accepted;
        }
    }
}
