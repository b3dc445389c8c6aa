//! The one writer of the maps. Runs on the control loop's thread (map syscalls, retry sleeps
//! and netlink never block the async runtime); the resync's long reads run on a reader thread
//! of its own (see `resync`).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::{Arc, Weak},
    time::{Duration, Instant},
};

use mesh_common::{PROTO_UDP, Settings, capacity::Limits};
use tracing::{debug, error, info, warn};

use super::{
    applied::{Applied, pair},
    plan::{Scope, plan_scoped, retire_previous},
    repair::{count_by_map, repair},
    resync::{Diffed, Gate, InFlight, Repairs, Verdict},
};
use crate::{
    datapath::{MapOp, MapReader, Maps, Poll, Snapshot, sockdiag},
    desired::DesiredState,
    model::Vip,
};

/// How long a previous slot set is kept at least after its service's switch before the resync
/// retires it: far longer than a connect takes from reading the service entry to its slot (and
/// the kernel reads the entry again once should a slot or backend be gone anyway).
const PREVIOUS_SET_GRACE: Duration = Duration::from_secs(1);

/// What one apply did.
#[derive(Clone, Debug, Default)]
pub struct ApplyReport {
    pub writes: usize,
    pub took: Duration,
    /// Of `took`: planning the writes, and the map writes themselves.
    pub planned: Duration,
    pub written: Duration,
    /// Connected UDP sockets terminated because their backend left.
    pub udp_terminated: u64,
}

pub struct Executor {
    maps: Maps,
    /// Shared with the metrics renderer (`view`) without copying: changed in place
    /// (`Arc::make_mut`) unless a scrape holds it at that moment.
    applied: Arc<Applied>,
    limits: Limits,
    settings_flags: u32,
    /// The model was read back from the maps (adopted, or after a failed write): the next plan
    /// looks at every service, whatever the caller says changed.
    plan_all: bool,
    /// When services last switched to a new slot set (their previous set was made then), so
    /// the resync retires previous sets once they are old: without it a set, and the backend
    /// entries only it names, would stay until the service's next switch, which may never come.
    /// A service missing here (adopted, or its model re-read) counts as switched long ago.
    switched: BTreeMap<Vip, Instant>,
    /// Where the resync reads the maps (None: the thread could not start; the resync then
    /// reads on the loop's thread).
    reader: Option<MapReader>,
    /// The resync's diff the reader works on.
    in_flight: Option<InFlight>,
    gate: Gate,
    /// A diff was discarded: start again at the next turn.
    resync_again: bool,
}

impl Executor {
    /// Adopts whatever an earlier agent left in the pinned maps, so the first apply rewrites
    /// only what differs (no window in which a service is empty). Entries no live service owns
    /// (an agent died between writes) are deleted.
    pub fn adopt(maps: Maps, limits: Limits, settings_flags: u32) -> anyhow::Result<Self> {
        let snap = maps.snapshot()?;
        let applied = Arc::new(Applied::from_snapshot(&snap));
        if !applied.services.is_empty() {
            info!(
                services = applied.services.len(),
                backends = applied.backends.len(),
                "adopted the existing data path"
            );
        }
        let reader = MapReader::start(&maps, "mesh-resync")
            .inspect_err(|err| {
                warn!("the resync reads the maps on the control loop's thread: {err:#}");
            })
            .ok();
        let mut executor = Self {
            maps,
            applied,
            limits,
            settings_flags,
            plan_all: true,
            switched: BTreeMap::new(),
            reader,
            in_flight: None,
            gate: Gate::default(),
            resync_again: false,
        };
        let orphans = repair(&executor.applied.entries(), &snap);
        if !orphans.is_empty() {
            info!(writes = orphans.len(), by_map = ?count_by_map(&orphans), "deleting entries no service owns");
            executor.write(&orphans)?;
        }
        executor.save_settings()?;
        Ok(executor)
    }

    /// What the maps hold, as last written, for readers on other threads (the metrics): the
    /// view stops upgrading as soon as the model changes, so a reader never sees a model
    /// older than the maps without knowing. Costs nothing while nobody holds it.
    pub fn view(&self) -> Weak<Applied> {
        Arc::downgrade(&self.applied)
    }

    /// Whether `backend` takes connections of `vip` now: at start, what an earlier agent left
    /// active keeps its traffic until a health check says otherwise.
    pub fn is_active(&self, vip: &Vip, backend: &SocketAddr) -> bool {
        let (Some(svc), Some(id)) = (
            self.applied.services.get(vip),
            self.applied.backends.get(backend),
        ) else {
            return false;
        };
        svc.active.contains_key(id)
    }

    /// Makes the maps hold `desired`, looking at the services in `scope` (those whose desired
    /// state changed since the last successful apply). On a planning error nothing is written;
    /// on a write error the applied state is re-read from the maps, so the next apply repairs
    /// what is missing.
    pub fn apply(
        &mut self,
        desired: &DesiredState,
        scope: Scope<'_>,
    ) -> anyhow::Result<ApplyReport> {
        let started = Instant::now();
        let scope = if self.plan_all { Scope::All } else { scope };
        let (ops, patch) = plan_scoped(desired, &self.applied, &self.limits, scope)?;
        let planned = started.elapsed();
        self.plan_all = false;
        if ops.is_empty() {
            return Ok(ApplyReport {
                took: started.elapsed(),
                ..Default::default()
            });
        }
        for op in &ops {
            debug!(?op, "map write");
        }
        let writing = Instant::now();
        if let Err(err) = self.write(&ops) {
            match self.maps.snapshot() {
                Ok(snap) => self.applied = Arc::new(Applied::from_snapshot(&snap)),
                Err(read) => warn!("re-reading the maps after a failed write: {read:#}"),
            }
            self.plan_all = true;
            return Err(err);
        }
        let written = writing.elapsed();
        let left = self.udp_backends_left(&ops, desired);
        let previous_ids = self.backend_ids_of(&left);
        let now = Instant::now();
        for (vip, service) in &patch.services {
            match service {
                Some(new)
                    if self
                        .applied
                        .services
                        .get(vip)
                        .is_none_or(|old| old.live.generation != new.live.generation) =>
                {
                    self.switched.insert(*vip, now);
                }
                Some(_) => {}
                None => {
                    self.switched.remove(vip);
                }
            }
        }
        if self.applied.is_changed_by(&patch) {
            Arc::make_mut(&mut self.applied).patch(patch);
        }
        let udp_terminated = self.terminate_udp_flows(&left, &previous_ids);
        self.save_settings()?;
        Ok(ApplyReport {
            writes: ops.len(),
            took: started.elapsed(),
            planned,
            written,
            udp_terminated,
        })
    }

    /// One turn of the periodic resync, which reads every map back and repairs what differs
    /// from what the agent wrote (an entry deleted or changed behind its back), and deletes
    /// leaked kernel-created state. `due`: a resync should start (unless one runs). The read
    /// and the diff run on the reader's thread (see `resync`); returns the repairs by map once
    /// a resync completed.
    pub fn resync_turn(&mut self, due: bool) -> Option<anyhow::Result<Repairs>> {
        if let Some(flight) = &self.in_flight {
            let result = match flight.pending.poll() {
                Poll::NotYet => return None,
                Poll::Ready(result) => result,
                Poll::Lost => {
                    warn!("the resync's reader thread is gone: reading on the loop's thread");
                    self.reader = None;
                    Err(anyhow::anyhow!("the resync's read did not finish"))
                }
            };
            let flight = self.in_flight.take().expect("polled above");
            return match result {
                Ok(diffed) => self.diffed(flight, diffed),
                Err(err) => {
                    self.gate.reset();
                    Some(Err(err))
                }
            };
        }
        if !due && !std::mem::take(&mut self.resync_again) {
            return None;
        }
        if self.reader.is_none() {
            return Some(self.resync_blocking());
        }
        if let Err(err) = self.before_resync() {
            return Some(Err(err));
        }
        let started = Instant::now();
        let expected = self.applied.entries();
        debug!(
            entries_ms = started.elapsed().as_secs_f64() * 1e3,
            "resync: expected entries taken, the reader reads"
        );
        let reader = self.reader.as_ref().expect("checked above");
        let pending = reader.submit(move |maps| {
            let started = Instant::now();
            let snap = maps.snapshot()?;
            let read = started.elapsed();
            let ops = repair(&expected, &snap);
            debug!(
                read_ms = read.as_secs_f64() * 1e3,
                diff_ms = (started.elapsed() - read).as_secs_f64() * 1e3,
                "resync: maps read and diffed"
            );
            Ok(Diffed { ops, snap })
        });
        self.in_flight = Some(InFlight::new(pending));
        None
    }

    /// What becomes of a diff the reader finished (see `resync::Gate`).
    fn diffed(&mut self, flight: InFlight, diffed: Diffed) -> Option<anyhow::Result<Repairs>> {
        let verdict = self.gate.arrived(!flight.written.is_empty(), flight.failed);
        if verdict != Verdict::Apply {
            debug!(
                ?verdict,
                writes_meanwhile = flight.written.len(),
                "resync: the maps were written while the reader diffed"
            );
        }
        let Diffed { ops, mut snap } = diffed;
        match verdict {
            Verdict::Apply => {
                self.free_on_reader(snap);
                Some(self.write_repairs(ops))
            }
            Verdict::Rediff => {
                let expected = self.applied.entries();
                let written = flight.written;
                let reader = self.reader.as_ref()?;
                let pending = reader.submit(move |_| {
                    snap.replay(&written);
                    Ok(Diffed {
                        ops: repair(&expected, &snap),
                        snap,
                    })
                });
                self.in_flight = Some(InFlight::new(pending));
                None
            }
            Verdict::RediffHere => {
                snap.replay(&flight.written);
                let ops = repair(&self.applied.entries(), &snap);
                self.free_on_reader(snap);
                Some(self.write_repairs(ops))
            }
            Verdict::Discard => {
                self.free_on_reader(snap);
                self.resync_again = true;
                None
            }
            Verdict::Blocking => {
                drop(snap);
                Some(self.resync_blocking())
            }
        }
    }

    /// A whole resync on the loop's thread: what every resync was before the reader.
    fn resync_blocking(&mut self) -> anyhow::Result<Repairs> {
        let started = Instant::now();
        self.before_resync()?;
        let snap = self.maps.snapshot()?;
        let ops = repair(&self.applied.entries(), &snap);
        drop(snap);
        let result = self.write_repairs(ops);
        crate::datapath::system::return_free_memory();
        info!(
            took_ms = started.elapsed().as_secs_f64() * 1e3,
            "resync read the maps on the control loop's thread"
        );
        result
    }

    /// The resync's own writes first: old previous slot sets retired, backend entries no
    /// service names forgotten (so the diff deletes them).
    fn before_resync(&mut self) -> anyhow::Result<()> {
        self.retire_old_previous_sets()?;
        let forgotten = if self.applied.unnamed_backends().next().is_some() {
            Arc::make_mut(&mut self.applied).forget_unnamed_backends()
        } else {
            Vec::new()
        };
        if !forgotten.is_empty() {
            warn!(ids = ?forgotten, "backend entries no service names: deleting them");
        }
        Ok(())
    }

    fn write_repairs(&mut self, ops: Vec<MapOp>) -> anyhow::Result<Repairs> {
        if ops.is_empty() {
            return Ok(Repairs::new());
        }
        let counts = count_by_map(&ops);
        self.write(&ops)?;
        Ok(counts)
    }

    /// A snapshot is megabytes at 10k services: freed, and the allocator's free memory given
    /// back (else glibc keeps it as RSS), on the reader's thread.
    fn free_on_reader(&self, snap: Snapshot) {
        match &self.reader {
            Some(reader) => {
                // Nothing to wait for.
                let _ = reader.submit(move |_| {
                    drop(snap);
                    crate::datapath::system::return_free_memory();
                });
            }
            None => {
                drop(snap);
                crate::datapath::system::return_free_memory();
            }
        }
    }

    /// Every write to the maps goes here, so a resync diffing meanwhile knows of it.
    fn write(&mut self, ops: &[MapOp]) -> anyhow::Result<()> {
        let result = self.maps.apply(ops);
        if let Some(flight) = &mut self.in_flight {
            flight.record(ops, result.is_ok());
        }
        result
    }

    /// Deletes the previous slot sets older than `PREVIOUS_SET_GRACE`, with the backend entries
    /// only they named. Routine, so not counted as a repair. On a write error the model is
    /// re-read from the maps, as after a failed apply.
    fn retire_old_previous_sets(&mut self) -> anyhow::Result<()> {
        let now = Instant::now();
        let old: BTreeSet<Vip> = self
            .applied
            .services
            .iter()
            .filter(|(vip, svc)| {
                svc.previous.is_some()
                    && self
                        .switched
                        .get(vip)
                        .is_none_or(|&at| now.duration_since(at) >= PREVIOUS_SET_GRACE)
            })
            .map(|(vip, _)| *vip)
            .collect();
        let applied = &self.applied;
        self.switched.retain(|vip, _| {
            applied
                .services
                .get(vip)
                .is_some_and(|s| s.previous.is_some())
        });
        if old.is_empty() {
            return Ok(());
        }
        let (ops, patch) = retire_previous(&self.applied, &old);
        debug!(
            services = old.len(),
            writes = ops.len(),
            "retiring previous slot sets"
        );
        if let Err(err) = self.write(&ops) {
            match self.maps.snapshot() {
                Ok(snap) => self.applied = Arc::new(Applied::from_snapshot(&snap)),
                Err(read) => warn!("re-reading the maps after a failed write: {read:#}"),
            }
            self.plan_all = true;
            return Err(err);
        }
        if self.applied.is_changed_by(&patch) {
            Arc::make_mut(&mut self.applied).patch(patch);
        }
        for vip in &old {
            self.switched.remove(vip);
        }
        Ok(())
    }

    /// Keeps the id cursors in the pinned settings map, so a restarted agent does not hand out
    /// ids that sockets may still carry.
    fn save_settings(&mut self) -> anyhow::Result<()> {
        let settings = Settings {
            flags: self.settings_flags,
            next_service_id: self.applied.next_service_id,
            next_backend_id: self.applied.next_backend_id,
            _pad: 0,
        };
        if self.maps.settings()? != settings {
            self.maps.set_settings(settings)?;
        }
        Ok(())
    }

    /// (service id, backend address) of UDP services whose backend left the rotation in `ops`,
    /// unless the service opted out of terminating its flows.
    fn udp_backends_left(&self, ops: &[MapOp], desired: &DesiredState) -> Vec<(u32, SocketAddr)> {
        if !ops.iter().any(|op| matches!(op, MapOp::DeleteActive(_))) {
            return Vec::new();
        }
        let udp: BTreeMap<u32, &Vip> = self
            .applied
            .services
            .iter()
            .filter(|(vip, _)| vip.proto == PROTO_UDP)
            .map(|(vip, svc)| (svc.id, vip))
            .collect();
        ops.iter()
            .filter_map(|op| match op {
                MapOp::DeleteActive(key) => Some((key.service_id, key.backend_id)),
                _ => None,
            })
            .filter(|(service_id, _)| {
                udp.get(service_id).is_some_and(|vip| {
                    desired
                        .services
                        .get(vip)
                        .is_none_or(|s| s.terminate_udp_flows)
                })
            })
            // Only these few addresses: the whole id -> address map is 40k entries at 10k
            // services, milliseconds of every edit that takes a backend out.
            .filter_map(|(service_id, backend_id)| {
                Some((service_id, self.applied.backend_addr(backend_id)?))
            })
            .collect()
    }

    /// Terminates the connected UDP sockets the kernel pointed at backends that left, so their
    /// clients notice (ECONNABORTED) and reconnect to a live backend. Only sockets still
    /// connected to that backend are touched: one that disconnected since is left alone. The
    /// sockets may live in any network namespace of the node (pods); nothing is searched
    /// unless the kernel recorded some.
    /// The backend ids the flows to `left` were recorded with, read before the apply's patch
    /// (the backend may be gone from the maps after it).
    fn backend_ids_of(&self, left: &[(u32, SocketAddr)]) -> BTreeMap<SocketAddr, u32> {
        left.iter()
            .filter_map(|(_, addr)| Some((*addr, *self.applied.backends.get(addr)?)))
            .collect()
    }

    fn terminate_udp_flows(
        &self,
        left: &[(u32, SocketAddr)],
        backend_ids: &BTreeMap<SocketAddr, u32>,
    ) -> u64 {
        let mut targets = sockdiag::UdpTargets::new();
        for &(service_id, backend) in left {
            let Some(&backend_id) = backend_ids.get(&backend) else {
                continue;
            };
            match self.maps.udp_flows_to(service_id, backend_id) {
                Ok(found) if found.is_empty() => {}
                Ok(found) => targets.entry(backend).or_default().extend(found),
                Err(err) => warn!("reading udp_flows: {err:#}"),
            }
        }
        if targets.is_empty() {
            return 0;
        }
        let report = sockdiag::destroy_udp_sockets_everywhere(&targets);
        for (backend, destroyed) in &report.destroyed {
            info!(
                destroyed,
                %backend,
                namespaces = report.namespaces,
                "terminated connected UDP sockets of a removed backend"
            );
        }
        if report.undestroyed > 0 {
            // Sockets were found but could not be destroyed (e.g. no CAP_NET_ADMIN): their
            // clients keep talking to a backend that left. An error the operator must see.
            error!(
                undestroyed = report.undestroyed,
                namespaces = report.namespaces,
                first_failure = report.first_failure.as_deref().unwrap_or_default(),
                "terminating connected UDP sockets: {} stay connected to a removed backend",
                report.undestroyed
            );
        } else if report.incomplete() {
            warn!(
                not_found = report.not_found,
                skipped_namespaces = report.skipped,
                truncated = report.truncated,
                namespaces = report.namespaces,
                first_failure = report.first_failure.as_deref().unwrap_or_default(),
                "terminating connected UDP sockets: some may be left connected to a removed backend"
            );
        } else if report.not_found > 0 {
            debug!(
                not_found = report.not_found,
                skipped_namespaces = report.skipped,
                namespaces = report.namespaces,
                first_failure = report.first_failure.as_deref().unwrap_or_default(),
                "connected UDP sockets of a removed backend not found (closed meanwhile, or in \
                 a network namespace no process or /run/netns names)"
            );
        }
        report.total() as u64
    }

    /// (VIP, backend) pairs with at least their service's `passive_failures` consecutive
    /// failed connects; their counts are reset.
    pub fn passive_failures(
        &mut self,
        thresholds: &BTreeMap<Vip, u32>,
    ) -> Vec<(Vip, SocketAddr, u32)> {
        let Some(&lowest) = thresholds.values().min() else {
            return Vec::new();
        };
        // Runs every few ms: look at the kernel's (usually empty) map before anything else.
        let candidates = match self.maps.passive_failures(lowest) {
            Ok(found) if found.is_empty() => return Vec::new(),
            Ok(found) => found,
            Err(err) => {
                warn!("reading passive failure counts: {err:#}");
                return Vec::new();
            }
        };
        let by_id: BTreeMap<u32, (&Vip, u32)> = self
            .applied
            .services
            .iter()
            .filter_map(|(vip, svc)| thresholds.get(vip).map(|&t| (svc.id, (vip, t))))
            .collect();
        let addr_of = self.applied.backend_addrs();
        let mut failing = Vec::new();
        for (key, count) in candidates {
            let (Some(&(vip, threshold)), Some(&addr)) =
                (by_id.get(&key.service_id), addr_of.get(&key.backend_id))
            else {
                continue;
            };
            if count >= threshold {
                if let Err(err) = self
                    .maps
                    .reset_passive(&pair(key.service_id, key.backend_id))
                {
                    warn!("resetting passive failure count: {err:#}");
                }
                failing.push((*vip, addr, count));
            }
        }
        failing
    }
}
