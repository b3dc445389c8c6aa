//! The diff from desired state to map writes. Pure: (desired, applied) -> ordered writes plus
//! the state the maps hold once the writes are done.
//!
//! Ordering is what keeps concurrent connects safe: backends, counters and the new slot set are
//! written first, then the service entry is switched to the new slot set in one update, and only
//! then are the old slot set and unused backends deleted.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
};

use mesh_common::Service;

use crate::state::{DesiredState, Vip};

/// A service as the maps hold it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppliedService {
    pub id: u32,
    pub name: String,
    pub generation: u32,
    pub flags: u32,
    pub affinity_timeout_secs: u32,
    /// Backend id per slot of the live slot set.
    pub slots: Vec<u32>,
    /// Backends with a counter entry for this service.
    pub members: BTreeSet<u32>,
    /// Backends taking new connections -> the slots each holds (the `active` map).
    pub active: BTreeMap<u32, u32>,
}

impl AppliedService {
    pub fn entry(&self) -> Service {
        Service {
            id: self.id,
            generation: self.generation,
            slot_count: self.slots.len() as u32,
            flags: self.flags,
            affinity_timeout_secs: self.affinity_timeout_secs,
            _pad: 0,
        }
    }
}

/// What the maps hold (read back from them when the agent adopts existing pins).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub services: BTreeMap<Vip, AppliedService>,
    /// Backend address -> backend id.
    pub backends: BTreeMap<SocketAddr, u32>,
}

impl Applied {
    /// Backend id -> address.
    pub fn backend_addrs(&self) -> BTreeMap<u32, SocketAddr> {
        self.backends
            .iter()
            .map(|(&addr, &id)| (id, addr))
            .collect()
    }
}

/// One write to the maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapOp {
    PutBackend {
        id: u32,
        addr: SocketAddr,
    },
    /// Creates the (service, backend) counter if it is missing; never resets one.
    CreateCounter {
        service_id: u32,
        backend_id: u32,
    },
    /// Zeroes a service id's per-service counters and round-robin position before the id is
    /// given to a new service.
    ResetService {
        service_id: u32,
    },
    PutSlots {
        service_id: u32,
        generation: u32,
        backends: Vec<u32>,
    },
    PutName {
        service_id: u32,
        name: String,
    },
    PutService {
        vip: Vip,
        service: Service,
    },
    DeleteService {
        vip: Vip,
    },
    DeleteSlots {
        service_id: u32,
        generation: u32,
        count: u32,
    },
    DeleteName {
        service_id: u32,
    },
    DeleteCounter {
        service_id: u32,
        backend_id: u32,
    },
    DeleteBackend {
        id: u32,
    },
    /// Marks a backend as taking new connections for a service (read by session affinity).
    PutActive {
        service_id: u32,
        backend_id: u32,
        slots: u32,
    },
    DeleteActive {
        service_id: u32,
        backend_id: u32,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("no free service id: the services map holds at most {max} services")]
    ServicesFull { max: u32 },
    #[error("no free backend id: the backends map holds at most {max} backends")]
    BackendsFull { max: u32 },
}

/// Id capacities (ids run from 1 to max - 1; 0 means none).
#[derive(Clone, Copy, Debug)]
pub struct IdLimits {
    pub max_services: u32,
    pub max_backends: u32,
}

/// Plans the writes that turn `applied` into `desired`. Nothing that is already right is
/// rewritten. On error nothing has been written (planning touches no map).
pub fn plan(
    desired: &DesiredState,
    applied: &Applied,
    limits: IdLimits,
) -> Result<(Vec<MapOp>, Applied), PlanError> {
    // Collected in any order, then sorted by `phase`.
    let mut ops = Vec::new();
    let mut next = Applied::default();

    // Backends: keep ids of addresses still in use, allocate the lowest free id for new ones.
    let wanted: BTreeSet<SocketAddr> = desired
        .services
        .values()
        .flat_map(|s| s.members.iter().map(|m| m.addr))
        .collect();
    let mut backend_ids = IdPool::new(applied.backends.values().copied(), limits.max_backends);
    for addr in &wanted {
        let id = match applied.backends.get(addr) {
            Some(&id) => id,
            None => {
                let id = backend_ids.take().ok_or(PlanError::BackendsFull {
                    max: limits.max_backends,
                })?;
                ops.push(MapOp::PutBackend { id, addr: *addr });
                id
            }
        };
        next.backends.insert(*addr, id);
    }
    for (addr, &id) in &applied.backends {
        if !wanted.contains(addr) {
            ops.push(MapOp::DeleteBackend { id });
        }
    }

    let mut service_ids = IdPool::new(applied.services.values().map(|s| s.id), limits.max_services);
    for (vip, want) in &desired.services {
        let old = applied.services.get(vip);
        let id = match old {
            Some(old) => old.id,
            None => {
                let id = service_ids.take().ok_or(PlanError::ServicesFull {
                    max: limits.max_services,
                })?;
                ops.push(MapOp::ResetService { service_id: id });
                id
            }
        };
        let members: BTreeSet<u32> = want
            .members
            .iter()
            .map(|m| next.backends[&m.addr])
            .collect();
        let slots: Vec<u32> = want
            .slot_layout()
            .iter()
            .map(|addr| next.backends[addr])
            .collect();

        let mut active = BTreeMap::new();
        for &backend_id in &slots {
            *active.entry(backend_id).or_insert(0u32) += 1;
        }
        let old_active = old.map(|o| o.active.clone()).unwrap_or_default();
        for (&backend_id, &count) in &active {
            if old_active.get(&backend_id) != Some(&count) {
                ops.push(MapOp::PutActive {
                    service_id: id,
                    backend_id,
                    slots: count,
                });
            }
        }
        for &backend_id in old_active.keys() {
            if !active.contains_key(&backend_id) {
                ops.push(MapOp::DeleteActive {
                    service_id: id,
                    backend_id,
                });
            }
        }
        let old_members = old.map(|o| o.members.clone()).unwrap_or_default();
        for &backend_id in members.difference(&old_members) {
            ops.push(MapOp::CreateCounter {
                service_id: id,
                backend_id,
            });
        }
        for &backend_id in old_members.difference(&members) {
            ops.push(MapOp::DeleteCounter {
                service_id: id,
                backend_id,
            });
        }
        if old.is_none_or(|o| o.name != want.name) {
            ops.push(MapOp::PutName {
                service_id: id,
                name: want.name.clone(),
            });
        }

        let generation = match old {
            Some(o) if o.slots == slots => o.generation,
            Some(o) => {
                ops.push(MapOp::DeleteSlots {
                    service_id: id,
                    generation: o.generation,
                    count: o.slots.len() as u32,
                });
                o.generation.wrapping_add(1)
            }
            None => 1,
        };
        if old.is_none_or(|o| o.generation != generation) && !slots.is_empty() {
            ops.push(MapOp::PutSlots {
                service_id: id,
                generation,
                backends: slots.clone(),
            });
        }
        let service = AppliedService {
            id,
            name: want.name.clone(),
            generation,
            flags: want.flags,
            affinity_timeout_secs: want.affinity_timeout_secs,
            slots,
            members,
            active,
        };
        if old.is_none_or(|o| o.entry() != service.entry()) {
            ops.push(MapOp::PutService {
                vip: *vip,
                service: service.entry(),
            });
        }
        next.services.insert(*vip, service);
    }

    // Services no longer wanted: the entry goes first so no connect can reach their slots.
    for (vip, old) in &applied.services {
        if desired.services.contains_key(vip) {
            continue;
        }
        ops.push(MapOp::DeleteService { vip: *vip });
        if !old.slots.is_empty() {
            ops.push(MapOp::DeleteSlots {
                service_id: old.id,
                generation: old.generation,
                count: old.slots.len() as u32,
            });
        }
        ops.push(MapOp::DeleteName { service_id: old.id });
        for &backend_id in old.active.keys() {
            ops.push(MapOp::DeleteActive {
                service_id: old.id,
                backend_id,
            });
        }
        for &backend_id in &old.members {
            ops.push(MapOp::DeleteCounter {
                service_id: old.id,
                backend_id,
            });
        }
    }

    ops.sort_by_key(phase);
    Ok((ops, next))
}

impl MapOp {
    /// Switches a service entry: what concurrent connects read first.
    pub fn is_switch(&self) -> bool {
        phase(self) == 3
    }

    /// Deletes what a switched-away entry may still point at.
    pub fn is_cleanup(&self) -> bool {
        phase(self) > 3
    }
}

/// Stable sort key giving the order in which writes must reach the maps. Backend deletions come
/// last: the slots that referenced them are gone by then.
fn phase(op: &MapOp) -> u8 {
    match op {
        MapOp::PutBackend { .. } => 0,
        MapOp::CreateCounter { .. } | MapOp::ResetService { .. } | MapOp::PutActive { .. } => 1,
        MapOp::PutSlots { .. } | MapOp::PutName { .. } => 2,
        MapOp::PutService { .. } | MapOp::DeleteService { .. } => 3,
        MapOp::DeleteSlots { .. }
        | MapOp::DeleteName { .. }
        | MapOp::DeleteCounter { .. }
        | MapOp::DeleteActive { .. } => 4,
        MapOp::DeleteBackend { .. } => 5,
    }
}

/// Lowest-free id allocation in 1..max.
struct IdPool {
    used: BTreeSet<u32>,
    max: u32,
    cursor: u32,
}

impl IdPool {
    fn new(used: impl IntoIterator<Item = u32>, max: u32) -> Self {
        Self {
            used: used.into_iter().collect(),
            max,
            cursor: 1,
        }
    }

    fn take(&mut self) -> Option<u32> {
        while self.cursor < self.max {
            let id = self.cursor;
            self.cursor += 1;
            if self.used.insert(id) {
                return Some(id);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use mesh_common::{PROTO_TCP, SVC_F_REJECT_EMPTY};

    use super::*;
    use crate::state::{DesiredService, Member};

    const LIMITS: IdLimits = IdLimits {
        max_services: 16,
        max_backends: 16,
    };

    fn vip(s: &str) -> Vip {
        Vip {
            addr: s.parse().unwrap(),
            proto: PROTO_TCP,
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

    #[test]
    fn new_service_writes_backends_and_slots_before_the_entry() {
        let want = desired(vec![(
            "127.100.0.1:80",
            service("web", &[("127.0.0.1:1", 1, true), ("127.0.0.1:2", 2, true)]),
        )]);
        let (ops, applied) = plan(&want, &Applied::default(), LIMITS).unwrap();
        let entry = position(&ops, |op| matches!(op, MapOp::PutService { .. }));
        let slots = position(&ops, |op| matches!(op, MapOp::PutSlots { .. }));
        let backend = position(&ops, |op| matches!(op, MapOp::PutBackend { .. }));
        let counter = position(&ops, |op| matches!(op, MapOp::CreateCounter { .. }));
        assert!(backend < slots && counter < slots && slots < entry);
        let svc = &applied.services[&vip("127.100.0.1:80")];
        assert_eq!(svc.id, 1);
        assert_eq!(svc.slots.len(), 3);
        assert_eq!(applied.backends.len(), 2);
    }

    #[test]
    fn unchanged_state_plans_no_writes() {
        let want = desired(vec![(
            "127.100.0.1:80",
            service("web", &[("127.0.0.1:1", 1, true)]),
        )]);
        let (_, applied) = plan(&want, &Applied::default(), LIMITS).unwrap();
        let (ops, again) = plan(&want, &applied, LIMITS).unwrap();
        assert_eq!(ops, vec![]);
        assert_eq!(again, applied);
    }

    #[test]
    fn changed_backends_switch_generation_then_delete_old_slots() {
        let v1 = desired(vec![(
            "127.100.0.1:80",
            service("web", &[("127.0.0.1:1", 1, true), ("127.0.0.1:2", 1, true)]),
        )]);
        let (_, applied) = plan(&v1, &Applied::default(), LIMITS).unwrap();
        let v2 = desired(vec![(
            "127.100.0.1:80",
            service("web", &[("127.0.0.1:1", 1, true), ("127.0.0.1:3", 1, true)]),
        )]);
        let (ops, next) = plan(&v2, &applied, LIMITS).unwrap();
        let new_slots = position(&ops, |op| {
            matches!(op, MapOp::PutSlots { generation: 2, .. })
        });
        let entry = position(&ops, |op| matches!(op, MapOp::PutService { .. }));
        let old_slots = position(&ops, |op| {
            matches!(op, MapOp::DeleteSlots { generation: 1, .. })
        });
        let old_backend = position(&ops, |op| matches!(op, MapOp::DeleteBackend { id: 2 }));
        assert!(new_slots < entry && entry < old_slots && old_slots < old_backend);
        assert!(ops.contains(&MapOp::DeleteCounter {
            service_id: 1,
            backend_id: 2
        }));
        assert_eq!(next.services[&vip("127.100.0.1:80")].generation, 2);
        // The new backend got the lowest free id; the kept one kept its id.
        assert_eq!(next.backends[&"127.0.0.1:1".parse().unwrap()], 1);
        assert_eq!(next.backends[&"127.0.0.1:3".parse().unwrap()], 3);
    }

    #[test]
    fn inactive_member_keeps_its_counter_but_leaves_the_slots() {
        let v1 = desired(vec![(
            "127.100.0.1:80",
            service("web", &[("127.0.0.1:1", 1, true), ("127.0.0.1:2", 1, true)]),
        )]);
        let (_, applied) = plan(&v1, &Applied::default(), LIMITS).unwrap();
        let v2 = desired(vec![(
            "127.100.0.1:80",
            service(
                "web",
                &[("127.0.0.1:1", 1, true), ("127.0.0.1:2", 1, false)],
            ),
        )]);
        let (ops, next) = plan(&v2, &applied, LIMITS).unwrap();
        assert!(!ops.iter().any(|op| matches!(
            op,
            MapOp::DeleteCounter { .. } | MapOp::DeleteBackend { .. }
        )));
        assert_eq!(next.services[&vip("127.100.0.1:80")].slots, vec![1]);
    }

    #[test]
    fn removed_service_entry_goes_before_its_slots_and_counters() {
        let v1 = desired(vec![(
            "127.100.0.1:80",
            service("web", &[("127.0.0.1:1", 1, true)]),
        )]);
        let (_, applied) = plan(&v1, &Applied::default(), LIMITS).unwrap();
        let (ops, next) = plan(&DesiredState::default(), &applied, LIMITS).unwrap();
        let entry = position(&ops, |op| matches!(op, MapOp::DeleteService { .. }));
        let slots = position(&ops, |op| matches!(op, MapOp::DeleteSlots { .. }));
        let counter = position(&ops, |op| matches!(op, MapOp::DeleteCounter { .. }));
        let backend = position(&ops, |op| matches!(op, MapOp::DeleteBackend { .. }));
        assert!(entry < slots && entry < counter && slots < backend && counter < backend);
        assert_eq!(next, Applied::default());
    }

    #[test]
    fn backends_are_shared_between_services() {
        let want = desired(vec![
            ("127.100.0.1:80", service("a", &[("127.0.0.1:1", 1, true)])),
            ("127.100.0.2:80", service("b", &[("127.0.0.1:1", 1, true)])),
        ]);
        let (ops, applied) = plan(&want, &Applied::default(), LIMITS).unwrap();
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
            plan(&want, &Applied::default(), LIMITS),
            Err(PlanError::ServicesFull { max: 16 })
        );
    }

    #[test]
    fn empty_service_has_no_slots_but_an_entry() {
        let want = desired(vec![("127.100.0.1:80", service("web", &[]))]);
        let (ops, applied) = plan(&want, &Applied::default(), LIMITS).unwrap();
        assert!(!ops.iter().any(|op| matches!(op, MapOp::PutSlots { .. })));
        assert_eq!(
            applied.services[&vip("127.100.0.1:80")].entry().slot_count,
            0
        );
    }
}
