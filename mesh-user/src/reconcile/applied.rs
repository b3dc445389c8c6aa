//! What the maps hold, as the reconciler models it: built by `plan`, or read back from the maps
//! (`from_snapshot`) when the agent adopts existing pins or after a failed write. `entries`
//! renders the model as the exact map entries it implies, which the resync compares with what
//! the maps really hold.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
};

use mesh_common::{BackendStatsKey, Service, SlotKey};

use crate::{
    datapath::{Counters, Snapshot, service_range},
    model::Vip,
};

/// One generation of a service's round-robin slots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotSet {
    pub generation: u32,
    /// Backend id per slot; 0 marks a slot missing from the maps (never written).
    pub backends: Vec<u32>,
}

/// A service as the maps hold it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppliedService {
    pub id: u32,
    pub name: String,
    pub flags: u32,
    pub affinity_timeout_secs: u32,
    /// The live slot set (the service entry points at it).
    pub live: SlotSet,
    /// The slot set before it, kept until the next switch, or until the resync retires it (at
    /// least a second after the switch), so a connect that read the service entry just before
    /// the switch still finds its slot.
    pub previous: Option<SlotSet>,
    /// Backends with a counter entry for this service.
    pub members: BTreeSet<u32>,
    /// Backends taking new connections -> the slots each holds (the `active` map).
    pub active: BTreeMap<u32, u32>,
}

impl AppliedService {
    pub fn entry(&self) -> Service {
        Service {
            id: self.id,
            generation: self.live.generation,
            slot_count: self.live.backends.len() as u32,
            flags: self.flags,
            affinity_timeout_secs: self.affinity_timeout_secs,
            _pad: 0,
        }
    }

    /// Slot sets in the maps: the live one and the previous one.
    pub fn slot_sets(&self) -> impl Iterator<Item = &SlotSet> {
        std::iter::once(&self.live).chain(self.previous.as_ref())
    }
}

/// What the maps hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub services: BTreeMap<Vip, AppliedService>,
    /// Backend address -> backend id, for every backend entry (members, and backends only a
    /// previous slot set still points at).
    pub backends: BTreeMap<SocketAddr, u32>,
    /// Where the next id search starts: ids are handed out in increasing order and wrap, so an
    /// id is not reused while sockets made with it may still be open.
    pub next_service_id: u32,
    pub next_backend_id: u32,
    /// Backend id -> (address, how many services name it as a member or in a slot set): a
    /// plan that looks at a few services can tell whether a backend is still needed.
    by_id: BTreeMap<u32, (SocketAddr, u32)>,
}

/// What a plan changes in the model once its writes are done (see `Applied::patch`).
#[derive(Clone, Debug, Default)]
pub struct Patch {
    /// Services replaced (`Some`) or removed (`None`).
    pub services: Vec<(Vip, Option<AppliedService>)>,
    pub backends_added: Vec<(SocketAddr, u32)>,
    pub backends_removed: Vec<u32>,
    pub next_service_id: u32,
    pub next_backend_id: u32,
}

/// The backend ids a service names: its members and every slot of its slot sets.
pub fn named_backends(svc: &AppliedService) -> BTreeSet<u32> {
    let slots = svc.slot_sets().flat_map(|set| set.backends.iter().copied());
    svc.members
        .iter()
        .copied()
        .chain(slots)
        .filter(|&id| id != 0)
        .collect()
}

/// The exact entries of the maps the agent owns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Entries {
    pub services: BTreeMap<Vip, Service>,
    pub slots: BTreeMap<SlotKey, u32>,
    pub backends: BTreeMap<u32, SocketAddr>,
    pub names: BTreeMap<u32, String>,
    pub counters: BTreeSet<BackendStatsKey>,
    pub active: BTreeMap<BackendStatsKey, u32>,
}

impl Applied {
    /// What `/metrics` labels its counters with, as the maps hold it: services by VIP with
    /// their names, backend addresses, the active pairs and the number of slot entries. Taken
    /// from the model instead of read: the maps are sized for a big node, and walking their
    /// buckets was most of a scrape at 10k services.
    pub fn counter_labels(&self) -> Counters {
        let mut labels = Counters {
            services: Vec::with_capacity(self.services.len()),
            ..Counters::default()
        };
        labels.names.reserve(self.services.len());
        for (vip, svc) in &self.services {
            labels.services.push((*vip, svc.entry()));
            labels.names.insert(svc.id, svc.name.clone());
            labels
                .active
                .extend(svc.active.keys().map(|&backend| pair(svc.id, backend)));
            labels.slots += svc
                .slot_sets()
                .map(|set| set.backends.iter().filter(|&&id| id != 0).count())
                .sum::<usize>();
        }
        labels.backends.reserve(self.by_id.len());
        labels
            .backends
            .extend(self.by_id.iter().map(|(&id, &(addr, _))| (id, addr)));
        labels
    }

    /// Backend id -> address.
    pub fn backend_addrs(&self) -> BTreeMap<u32, SocketAddr> {
        self.by_id
            .iter()
            .map(|(&id, &(addr, _))| (id, addr))
            .collect()
    }

    /// The address of backend `id`.
    pub fn backend_addr(&self, id: u32) -> Option<SocketAddr> {
        self.by_id.get(&id).map(|&(addr, _)| addr)
    }

    /// How many services name backend `id` (0 for an entry nothing names any more).
    pub fn users_of(&self, id: u32) -> u32 {
        self.by_id.get(&id).map_or(0, |&(_, users)| users)
    }

    /// Backend ids with an entry that no service names.
    pub fn unnamed_backends(&self) -> impl Iterator<Item = u32> + '_ {
        self.by_id
            .iter()
            .filter(|(_, (_, users))| *users == 0)
            .map(|(&id, _)| id)
    }

    /// Drops from the model the backend entries no service names, and returns their ids: the
    /// resync then sees them as entries nobody owns and deletes them from the map. Plans never
    /// leave such an entry; this is the safety net should one ever remain.
    pub fn forget_unnamed_backends(&mut self) -> Vec<u32> {
        let unnamed: Vec<u32> = self.unnamed_backends().collect();
        for id in &unnamed {
            if let Some((addr, _)) = self.by_id.remove(id)
                && self.backends.get(&addr) == Some(id)
            {
                self.backends.remove(&addr);
            }
        }
        unnamed
    }

    pub fn service_ids(&self) -> BTreeSet<u32> {
        self.services.values().map(|s| s.id).collect()
    }

    pub fn backend_ids(&self) -> BTreeSet<u32> {
        self.by_id.keys().copied().collect()
    }

    /// The model once a plan's writes are done: only the services and backends it changed are
    /// touched.
    /// Whether `patch` changes anything in the model.
    pub fn is_changed_by(&self, patch: &Patch) -> bool {
        !patch.services.is_empty()
            || !patch.backends_added.is_empty()
            || !patch.backends_removed.is_empty()
            || (patch.next_service_id, patch.next_backend_id)
                != (self.next_service_id, self.next_backend_id)
    }

    pub fn patch(&mut self, patch: Patch) {
        for (addr, id) in patch.backends_added {
            self.backends.insert(addr, id);
            self.by_id.insert(id, (addr, 0));
        }
        for (vip, service) in patch.services {
            if let Some(old) = self.services.remove(&vip) {
                self.count_users(&old, false);
            }
            if let Some(service) = service {
                self.count_users(&service, true);
                self.services.insert(vip, service);
            }
        }
        for id in patch.backends_removed {
            if let Some((addr, _)) = self.by_id.remove(&id)
                && self.backends.get(&addr) == Some(&id)
            {
                self.backends.remove(&addr);
            }
        }
        self.next_service_id = patch.next_service_id;
        self.next_backend_id = patch.next_backend_id;
    }

    fn count_users(&mut self, svc: &AppliedService, add: bool) {
        self.count_ids(named_backends(svc), add);
    }

    fn count_ids(&mut self, ids: BTreeSet<u32>, add: bool) {
        for id in ids {
            if let Some((_, users)) = self.by_id.get_mut(&id) {
                *users = if add {
                    *users + 1
                } else {
                    users.saturating_sub(1)
                };
            }
        }
    }

    /// The map entries this state implies. Built from sorted runs in bulk rather than entry by
    /// entry: the resync takes them on the control loop's thread, 180k entries at 10k services.
    pub fn entries(&self) -> Entries {
        let slot_count = self
            .services
            .values()
            .flat_map(AppliedService::slot_sets)
            .map(|set| set.backends.len())
            .sum();
        let mut slots = Vec::with_capacity(slot_count);
        let mut counters = Vec::with_capacity(self.by_id.len());
        let mut active = Vec::with_capacity(self.by_id.len());
        let mut names = Vec::with_capacity(self.services.len());
        for svc in self.services.values() {
            names.push((svc.id, svc.name.clone()));
            for set in svc.slot_sets() {
                for (slot, &backend_id) in set.backends.iter().enumerate() {
                    if backend_id != 0 {
                        slots.push((slot_key(svc.id, set.generation, slot as u32), backend_id));
                    }
                }
            }
            counters.extend(svc.members.iter().map(|&b| pair(svc.id, b)));
            active.extend(svc.active.iter().map(|(&b, &n)| (pair(svc.id, b), n)));
        }
        // `collect` sorts (services come by VIP, not by id) and builds each tree in one pass.
        Entries {
            services: self
                .services
                .iter()
                .map(|(vip, svc)| (*vip, svc.entry()))
                .collect(),
            slots: slots.into_iter().collect(),
            backends: self.backend_addrs(),
            names: names.into_iter().collect(),
            counters: counters.into_iter().collect(),
            active: active.into_iter().collect(),
        }
    }

    /// The state the maps describe. Slots of a service's generation before the live one are
    /// its previous set; any other slot, counter, name or active entry no live service owns is
    /// left out, so repairing against this state deletes it.
    pub fn from_snapshot(snap: &Snapshot) -> Self {
        let mut applied = Applied {
            backends: snap
                .backends
                .iter()
                .map(|(&id, &addr)| (addr, id))
                .collect(),
            by_id: snap
                .backends
                .iter()
                .map(|(&id, &addr)| (id, (addr, 0)))
                .collect(),
            next_service_id: snap.settings.next_service_id,
            next_backend_id: snap.settings.next_backend_id,
            ..Default::default()
        };
        for (vip, svc) in &snap.services {
            let read_set = |generation: u32, count: u32| SlotSet {
                generation,
                backends: (0..count)
                    .map(|slot| {
                        let key = slot_key(svc.id, generation, slot);
                        snap.slots.get(&key).copied().unwrap_or(0)
                    })
                    .collect(),
            };
            let live = read_set(svc.generation, svc.slot_count);
            let before = svc.generation.wrapping_sub(1);
            let previous_count = (0..)
                .take_while(|&slot| snap.slots.contains_key(&slot_key(svc.id, before, slot)))
                .count() as u32;
            let previous = (previous_count > 0).then(|| read_set(before, previous_count));
            let members = snap.members_of(svc.id).map(|(k, _)| k.backend_id).collect();
            let active = snap
                .active
                .range(service_range(svc.id))
                .map(|(k, &slots)| (k.backend_id, slots))
                .collect();
            applied.services.insert(
                *vip,
                AppliedService {
                    id: svc.id,
                    name: snap.names.get(&svc.id).cloned().unwrap_or_default(),
                    flags: svc.flags,
                    affinity_timeout_secs: svc.affinity_timeout_secs,
                    live,
                    previous,
                    members,
                    active,
                },
            );
        }
        let named: Vec<BTreeSet<u32>> = applied.services.values().map(named_backends).collect();
        for ids in named {
            applied.count_ids(ids, true);
        }
        // Ids must move past everything in use even if the saved cursors are older.
        let max_service = applied.services.values().map(|s| s.id).max().unwrap_or(0);
        let max_backend = applied.backends.values().copied().max().unwrap_or(0);
        applied.next_service_id = applied.next_service_id.max(max_service.saturating_add(1));
        applied.next_backend_id = applied.next_backend_id.max(max_backend.saturating_add(1));
        applied
    }
}

pub fn slot_key(service_id: u32, generation: u32, slot: u32) -> SlotKey {
    SlotKey {
        service_id,
        generation,
        slot,
    }
}

pub fn pair(service_id: u32, backend_id: u32) -> BackendStatsKey {
    BackendStatsKey {
        service_id,
        backend_id,
    }
}

#[cfg(test)]
mod tests {
    use mesh_common::BackendStats;

    use super::*;

    /// `n` services (ids from 1, VIPs in 10.96/16) of 4 backends each, every one with a live
    /// set of 4 slots, every third with a previous set too.
    fn snapshot(n: u32) -> Snapshot {
        let mut snap = Snapshot::default();
        for i in 0..n {
            let id = i + 1;
            let vip = Vip {
                addr: SocketAddr::from(([10, 96, (id >> 8) as u8, id as u8], 80)),
                proto: mesh_common::PROTO_TCP,
                external: false,
            };
            snap.services.insert(
                vip,
                Service {
                    id,
                    generation: 2,
                    slot_count: 4,
                    ..Default::default()
                },
            );
            snap.names.insert(id, format!("svc-{i}"));
            for b in 0..4 {
                let backend = 4 * i + b + 1;
                snap.backends
                    .insert(backend, SocketAddr::from(([10, 1, 0, 1], backend as u16)));
                snap.slots.insert(slot_key(id, 2, b), backend);
                if i % 3 == 0 {
                    snap.slots.insert(slot_key(id, 1, b), backend);
                }
                snap.backend_stats
                    .insert(pair(id, backend), BackendStats::default());
                snap.active.insert(pair(id, backend), 1);
            }
        }
        snap
    }

    /// The entries built entry by entry, as they were before the bulk build.
    fn entries_one_by_one(applied: &Applied) -> Entries {
        let mut entries = Entries {
            backends: applied.backend_addrs(),
            ..Default::default()
        };
        for (vip, svc) in &applied.services {
            entries.services.insert(*vip, svc.entry());
            entries.names.insert(svc.id, svc.name.clone());
            for set in svc.slot_sets() {
                for (slot, &backend_id) in set.backends.iter().enumerate() {
                    if backend_id != 0 {
                        let key = slot_key(svc.id, set.generation, slot as u32);
                        entries.slots.insert(key, backend_id);
                    }
                }
            }
            for &backend_id in &svc.members {
                entries.counters.insert(pair(svc.id, backend_id));
            }
            for (&backend_id, &slots) in &svc.active {
                entries.active.insert(pair(svc.id, backend_id), slots);
            }
        }
        entries
    }

    #[test]
    fn entries_are_the_models_map_entries() {
        let snap = snapshot(300);
        let applied = Applied::from_snapshot(&snap);
        let entries = applied.entries();
        assert_eq!(entries, entries_one_by_one(&applied));
        // Read back from the maps, the model implies exactly what they hold.
        assert_eq!(entries.services, snap.services);
        assert_eq!(entries.slots, snap.slots);
        assert_eq!(entries.backends, snap.backends);
        assert_eq!(entries.names, snap.names);
        assert_eq!(entries.active, snap.active);
        assert!(entries.counters.iter().eq(snap.backend_stats.keys()));
    }

    /// The metrics label counters from the model instead of reading the maps: what they get
    /// is what a read of the same maps gives.
    #[test]
    fn counter_labels_are_what_the_maps_hold() {
        let mut snap = snapshot(300);
        // Some backends out of rotation: counters, no active entry.
        snap.active.retain(|key, _| key.backend_id % 5 != 0);
        let labels = Applied::from_snapshot(&snap).counter_labels();
        let services: Vec<_> = snap.services.iter().map(|(v, s)| (*v, *s)).collect();
        assert_eq!(labels.services, services);
        assert_eq!(labels.names, snap.names.clone().into_iter().collect());
        assert_eq!(labels.backends, snap.backends.clone().into_iter().collect());
        assert_eq!(labels.active, snap.active.keys().copied().collect());
        assert_eq!(labels.slots, snap.slots.len());
        assert!(labels.backend_stats.is_empty() && labels.no_backend.is_empty());
    }

    /// How long the resync holds the control loop to take the entries at 10k services
    /// (`cargo test --release -p mesh-user entries_at_10k -- --ignored --nocapture`).
    #[test]
    #[ignore = "a timing, not a test"]
    fn entries_at_10k() {
        let applied = Applied::from_snapshot(&snapshot(10_000));
        for _ in 0..5 {
            let t = std::time::Instant::now();
            let bulk = applied.entries();
            let bulk_took = t.elapsed();
            let t = std::time::Instant::now();
            let one_by_one = entries_one_by_one(&applied);
            println!(
                "entries: bulk {bulk_took:?}, one by one {:?} ({} slots)",
                t.elapsed(),
                bulk.slots.len()
            );
            assert_eq!(bulk, one_by_one);
        }
    }
}
