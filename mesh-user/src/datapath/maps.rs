//! Typed handles on every pinned map: reading them all (`snapshot`) and writing `MapOp`s.

use std::{collections::BTreeMap, net::SocketAddr, os::fd::AsFd as _, path::Path, time::Duration};

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{
        Array, HashMap, IterableMap as _, Map, MapData, MapError, PerCpuArray, PerCpuHashMap,
        PerCpuValues,
    },
};
use mesh_common::{
    AffinityKey, AffinityValue, Backend, BackendStats, BackendStatsKey, DEFAULT_MAX_TCP_PEERS,
    DatapathStats, PassiveState, Service, ServiceKey, ServiceName, ServiceStats, Settings, SlotKey,
    SlotValue, TCP_PEER_ENTRY_SIZE, UdpFlow, map_names, nodeport::NodeportBackendStats,
};

use super::{
    PinLayout,
    layout::{
        addr_of_backend, backend_of_addr, key_of_vip, name_of, service_name, slot_value, vip_of_key,
    },
    ops::{MapOp, SlotBackend},
};
use crate::model::Vip;

/// `flags` of a map update: fail if the key exists.
const BPF_NOEXIST: u64 = 1;

/// How long a map write that fails with ENOMEM is retried before the error stands.
const ENOMEM_RETRY_FOR: Duration = Duration::from_secs(2);

/// Typed handles on every map.
pub struct Maps {
    services: HashMap<MapData, ServiceKey, Service>,
    /// External services (traffic from other hosts, matched at TC): `Vip::external`.
    ext_services: HashMap<MapData, ServiceKey, Service>,
    slots: HashMap<MapData, SlotKey, SlotValue>,
    backends: HashMap<MapData, u32, Backend>,
    rr_state: Array<MapData, u64>,
    backend_stats: HashMap<MapData, BackendStatsKey, BackendStats>,
    service_stats: Array<MapData, ServiceStats>,
    service_names: HashMap<MapData, u32, ServiceName>,
    active: HashMap<MapData, BackendStatsKey, u32>,
    udp_flows: HashMap<MapData, u64, UdpFlow>,
    /// Only counted here (the kernel writes and deletes it): the value's layout is the kernel's.
    tcp_peers: Array<MapData, [u8; TCP_PEER_ENTRY_SIZE]>,
    datapath_stats: PerCpuArray<MapData, DatapathStats>,
    passive: HashMap<MapData, BackendStatsKey, PassiveState>,
    settings: Array<MapData, Settings>,
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    /// Packets and bytes of each (service, backend) pair at the TC programs; an entry lives
    /// exactly as long as the pair's `backend_stats` entry.
    np_backend_stats: PerCpuHashMap<MapData, BackendStatsKey, NodeportBackendStats>,
    nr_cpus: usize,
    /// Whether pairs get an `np_backend_stats` counter: only while the TC programs run
    /// (`[agent.nodeport]`). Each is a per-CPU allocation in the kernel, half of a cold
    /// start's map writes when every pair had one.
    nodeport_counters: bool,
}

/// Everything the maps hold.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub services: BTreeMap<Vip, Service>,
    /// Slot -> backend id; 0 for a slot whose address is not its backend's (only a write from
    /// outside the agent makes one), which the resync then writes again or deletes.
    pub slots: BTreeMap<SlotKey, u32>,
    pub backends: BTreeMap<u32, SocketAddr>,
    pub names: BTreeMap<u32, String>,
    pub backend_stats: BTreeMap<BackendStatsKey, BackendStats>,
    /// Only for the ids of live services.
    pub service_stats: BTreeMap<u32, ServiceStats>,
    /// (service, backend) -> slots held, for backends taking new connections.
    pub active: BTreeMap<BackendStatsKey, u32>,
    /// (service, backend) -> consecutive failed connects.
    pub passive: BTreeMap<BackendStatsKey, u32>,
    /// Affinity entries: (service, client) -> backend id.
    pub affinity: Vec<(AffinityKey, u32)>,
    pub settings: Settings,
}

/// What `/metrics` reads of the maps (`Maps::counters`). The maps hash with foldhash: a scrape
/// at 10k services makes about 200k lookups.
#[derive(Debug, Default)]
pub struct Counters {
    /// Sorted by VIP.
    pub services: Vec<(Vip, Service)>,
    pub backends: foldhash::HashMap<u32, SocketAddr>,
    pub names: foldhash::HashMap<u32, String>,
    /// Sorted by key: a service's pairs are one run, by backend id.
    pub backend_stats: Vec<(BackendStatsKey, BackendStats)>,
    /// Pairs whose backend takes new connections.
    pub active: foldhash::HashSet<BackendStatsKey>,
    /// Connects that found no backend, by service id.
    pub no_backend: foldhash::HashMap<u32, u64>,
    /// Entries in `slots`.
    pub slots: usize,
}

impl Counters {
    /// Every backend id a counter names is known.
    fn is_consistent(&self) -> bool {
        self.backend_stats
            .iter()
            .all(|(k, _)| self.backends.contains_key(&k.backend_id))
    }

    /// Where each service's counters are in `backend_stats`: one pass, then each service is
    /// found in a small index. Searching the 40k counters themselves, 184 bytes apart, missed
    /// the cache at every step and was most of a scrape's rendering at 10k services.
    pub fn members(&self) -> Members<'_> {
        let mut runs: Vec<(u32, std::ops::Range<usize>)> = Vec::new();
        for (at, (key, _)) in self.backend_stats.iter().enumerate() {
            match runs.last_mut() {
                Some((id, run)) if *id == key.service_id => run.end = at + 1,
                _ => runs.push((key.service_id, at..at + 1)),
            }
        }
        Members {
            stats: &self.backend_stats,
            runs,
        }
    }
}

/// The counters of each service (`Counters::members`).
pub struct Members<'a> {
    stats: &'a [(BackendStatsKey, BackendStats)],
    runs: Vec<(u32, std::ops::Range<usize>)>,
}

impl<'a> Members<'a> {
    /// Counters of every backend of a service (configured ones, active or not), by backend id.
    pub fn of(&self, service_id: u32) -> &'a [(BackendStatsKey, BackendStats)] {
        match self.runs.binary_search_by_key(&service_id, |(id, _)| *id) {
            Ok(at) => &self.stats[self.runs[at].1.clone()],
            Err(_) => &[],
        }
    }
}

/// Every (service, backend) key of one service, for range lookups in ordered maps.
pub fn service_range(service_id: u32) -> std::ops::RangeInclusive<BackendStatsKey> {
    BackendStatsKey {
        service_id,
        backend_id: 0,
    }..=BackendStatsKey {
        service_id,
        backend_id: u32::MAX,
    }
}

impl Snapshot {
    /// Every backend id a counter or a slot names is known.
    fn is_consistent(&self) -> bool {
        self.backend_stats
            .keys()
            .all(|k| self.backends.contains_key(&k.backend_id))
            && self
                .slots
                .values()
                .all(|id| *id == 0 || self.backends.contains_key(id))
    }

    /// Counters of every backend of a service (configured ones, active or not), by backend id.
    pub fn members_of(
        &self,
        service_id: u32,
    ) -> impl Iterator<Item = (&BackendStatsKey, &BackendStats)> {
        self.backend_stats.range(service_range(service_id))
    }
}

impl Maps {
    /// The loaded object's maps. `nodeport`: the TC programs are attached, so every pair
    /// needs its `np_backend_stats` counter.
    pub(super) fn take(ebpf: &mut Ebpf, nodeport: bool) -> anyhow::Result<Self> {
        let mut maps = Self::build(|name| {
            ebpf.take_map(name)
                .with_context(|| format!("map {name} missing from the eBPF object"))
        })?;
        maps.nodeport_counters = nodeport;
        maps.match_nodeport_counters()?;
        Ok(maps)
    }

    /// With the TC programs on, every pair of `backend_stats` gets an `np_backend_stats`
    /// counter it lacks (pins of an agent that ran without them, or predates the map), so from
    /// here on both maps hold the same pairs (`CreateCounter` and `DeleteCounter` write both).
    /// With them off, the counters an earlier agent left are deleted: nothing counts there.
    fn match_nodeport_counters(&mut self) -> anyhow::Result<()> {
        if self.nodeport_counters {
            let keys: Vec<BackendStatsKey> =
                self.backend_stats.keys().filter_map(Result::ok).collect();
            for key in keys {
                self.create_nodeport_counter(&key)?;
            }
        } else {
            let keys: Vec<BackendStatsKey> = self
                .np_backend_stats
                .keys()
                .filter_map(Result::ok)
                .collect();
            for key in keys {
                ignore_missing(self.np_backend_stats.remove(&key))?;
            }
        }
        Ok(())
    }

    fn create_nodeport_counter(&mut self, key: &BackendStatsKey) -> anyhow::Result<()> {
        let zero = PerCpuValues::try_from(vec![NodeportBackendStats::default(); self.nr_cpus])?;
        match self.np_backend_stats.insert(key, zero, BPF_NOEXIST) {
            Err(err) if is_errno(&err, libc::EEXIST) => Ok(()),
            other => Ok(other?),
        }
    }

    /// Packets and bytes per (service, backend) pair at the TC programs, summed over CPUs.
    pub fn nodeport_backend_stats(
        &self,
    ) -> anyhow::Result<BTreeMap<BackendStatsKey, NodeportBackendStats>> {
        let mut out = BTreeMap::new();
        for (key, per_cpu) in per_cpu_entries(&self.np_backend_stats, self.nr_cpus)? {
            let sum = per_cpu
                .iter()
                .fold(NodeportBackendStats::default(), |a, s| {
                    NodeportBackendStats {
                        packets_in: a.packets_in + s.packets_in,
                        bytes_in: a.bytes_in + s.bytes_in,
                        packets_out: a.packets_out + s.packets_out,
                        bytes_out: a.bytes_out + s.bytes_out,
                    }
                });
            out.insert(key, sum);
        }
        Ok(out)
    }

    /// Opens the pinned maps without loading anything (CLI, metrics).
    pub fn open_pinned(bpffs: &Path) -> anyhow::Result<Self> {
        let layout = PinLayout::new(bpffs);
        Self::build(|name| {
            let path = layout.map(name);
            let data = MapData::from_pin(&path).with_context(|| {
                format!(
                    "cannot open pinned map {} (is the mesh agent set up with --bpffs {}?)",
                    path.display(),
                    bpffs.display()
                )
            })?;
            Ok(Map::from_map_data(data)?)
        })
    }

    /// Handles of their own on the same maps (each fd duplicated), for a reader on another
    /// thread (`MapReader`).
    pub fn duplicate(&self) -> anyhow::Result<Self> {
        let fds: [(&str, &MapData); 16] = [
            (map_names::SERVICES, self.services.map()),
            (map_names::EXT_SERVICES, self.ext_services.map()),
            (map_names::SLOTS, self.slots.map()),
            (map_names::BACKENDS, self.backends.map()),
            (map_names::RR_STATE, self.rr_state.map()),
            (map_names::BACKEND_STATS, self.backend_stats.map()),
            (map_names::SERVICE_STATS, self.service_stats.map()),
            (map_names::SERVICE_NAMES, self.service_names.map()),
            (map_names::ACTIVE, self.active.map()),
            (map_names::UDP_FLOWS, self.udp_flows.map()),
            (map_names::TCP_PEERS, self.tcp_peers.map()),
            (map_names::DATAPATH_STATS, self.datapath_stats.map()),
            (map_names::PASSIVE, self.passive.map()),
            (map_names::SETTINGS, self.settings.map()),
            (map_names::AFFINITY, self.affinity.map()),
            (map_names::NP_BACKEND_STATS, self.np_backend_stats.map()),
        ];
        let mut maps = Self::build(|name| {
            let (_, data) = fds
                .iter()
                .find(|(n, _)| *n == name)
                .with_context(|| format!("map {name} has no handle to duplicate"))?;
            let fd = data.fd().as_fd().try_clone_to_owned()?;
            Ok(Map::from_map_data(MapData::from_fd(fd)?)?)
        })?;
        maps.nodeport_counters = self.nodeport_counters;
        Ok(maps)
    }

    fn build(mut map: impl FnMut(&str) -> anyhow::Result<Map>) -> anyhow::Result<Self> {
        Ok(Self {
            services: HashMap::try_from(map(map_names::SERVICES)?)?,
            ext_services: HashMap::try_from(map(map_names::EXT_SERVICES)?)?,
            slots: HashMap::try_from(map(map_names::SLOTS)?)?,
            backends: HashMap::try_from(map(map_names::BACKENDS)?)?,
            rr_state: Array::try_from(map(map_names::RR_STATE)?)?,
            backend_stats: HashMap::try_from(map(map_names::BACKEND_STATS)?)?,
            service_stats: Array::try_from(map(map_names::SERVICE_STATS)?)?,
            service_names: HashMap::try_from(map(map_names::SERVICE_NAMES)?)?,
            active: HashMap::try_from(map(map_names::ACTIVE)?)?,
            udp_flows: HashMap::try_from(map(map_names::UDP_FLOWS)?)?,
            tcp_peers: Array::try_from(map(map_names::TCP_PEERS)?)?,
            datapath_stats: PerCpuArray::try_from(map(map_names::DATAPATH_STATS)?)?,
            passive: HashMap::try_from(map(map_names::PASSIVE)?)?,
            settings: Array::try_from(map(map_names::SETTINGS)?)?,
            affinity: HashMap::try_from(map(map_names::AFFINITY)?)?,
            np_backend_stats: PerCpuHashMap::try_from(map(map_names::NP_BACKEND_STATS)?)?,
            nr_cpus: aya::util::nr_cpus()
                .map_err(|(what, err)| anyhow::anyhow!("{what}: {err}"))?,
            nodeport_counters: false,
        })
    }

    /// Node-wide data path counters, summed over CPUs.
    pub fn datapath_stats(&self) -> anyhow::Result<DatapathStats> {
        let per_cpu = self.datapath_stats.get(&0, 0)?;
        Ok(per_cpu
            .iter()
            .fold(DatapathStats::default(), |a, s| DatapathStats {
                rev_created: a.rev_created + s.rev_created,
                rev_released: a.rev_released + s.rev_released,
                udp_flows_added: a.udp_flows_added + s.udp_flows_added,
                udp_flows_full: a.udp_flows_full + s.udp_flows_full,
                passive_full: a.passive_full + s.passive_full,
                affinity_full: a.affinity_full + s.affinity_full,
                rev_failed: a.rev_failed + s.rev_failed,
                slot_retries: a.slot_retries + s.slot_retries,
                slot_misses: a.slot_misses + s.slot_misses,
            }))
    }

    /// Entries of the maps the snapshot does not hold (for `tcp_peers`, the entries in use).
    pub fn extra_entry_counts(&self) -> anyhow::Result<[(&'static str, usize); 3]> {
        Ok([
            ("udp_flows", self.udp_flows.keys().count()),
            ("tcp_peers", self.tcp_peers_in_use()?),
            ("np_backend_stats", self.np_backend_stats.keys().count()),
        ])
    }

    /// `tcp_peers` entries an open socket holds: those with a cookie (the first 8 bytes).
    fn tcp_peers_in_use(&self) -> anyhow::Result<usize> {
        let held = |entry: &[u8]| entry[..8] != [0; 8];
        let mut in_use = 0;
        let fd = self.tcp_peers.map().fd().as_fd();
        let read = super::bpf::array_lookup_batch_each(
            fd,
            TCP_PEER_ENTRY_SIZE,
            DEFAULT_MAX_TCP_PEERS,
            |_, values| {
                in_use += values
                    .chunks_exact(TCP_PEER_ENTRY_SIZE)
                    .filter(|e| held(e))
                    .count()
            },
        );
        match read {
            Ok(()) => Ok(in_use),
            Err(err) if batch_unsupported(&err) => {
                let mut in_use = 0;
                for entry in self.tcp_peers.iter() {
                    in_use += usize::from(held(&entry?));
                }
                Ok(in_use)
            }
            Err(err) => Err(err).context("reading tcp_peers"),
        }
    }

    pub fn settings(&self) -> anyhow::Result<Settings> {
        Ok(self.settings.get(&0, 0)?)
    }

    pub fn set_settings(&mut self, settings: Settings) -> anyhow::Result<()> {
        Ok(self.settings.set(0, settings, 0)?)
    }

    /// (service, backend) pairs with at least `threshold` consecutive failed connects.
    pub fn passive_failures(&self, threshold: u32) -> anyhow::Result<Vec<(BackendStatsKey, u32)>> {
        let mut failing = Vec::new();
        for entry in self.passive.iter() {
            let (key, state) = entry?;
            if state.consecutive_failures >= threshold.max(1) {
                failing.push((key, state.consecutive_failures));
            }
        }
        Ok(failing)
    }

    /// Starts counting consecutive failures of `key` from zero (after acting on a run).
    pub fn reset_passive(&mut self, key: &BackendStatsKey) -> anyhow::Result<()> {
        Ok(self.passive.insert(key, PassiveState::default(), 0)?)
    }

    /// Cookies of the connected UDP sockets the kernel pointed at `backend_id` of `service_id`.
    pub fn udp_flows_to(&self, service_id: u32, backend_id: u32) -> anyhow::Result<Vec<u64>> {
        let mut cookies = Vec::new();
        for entry in self.udp_flows.iter() {
            let (cookie, flow) = entry?;
            if flow.service_id == service_id && flow.backend_id == backend_id {
                cookies.push(cookie);
            }
        }
        Ok(cookies)
    }

    /// Everything the maps hold. The maps are read one after the other while the agent may be
    /// writing them; a read that catches a half-done update (a counter or slot naming a backend
    /// it did not see) is retried, a few times at most.
    pub fn snapshot(&self) -> anyhow::Result<Snapshot> {
        read_consistent(|| self.read_all(), Snapshot::is_consistent)
    }

    /// What `/metrics` exports, read for one scrape: only the maps it needs, on two threads.
    /// A batch read walks every bucket of a hash map, used or not (about 20 ns each): the maps
    /// are sized for a big node (half a million buckets for the pairs), so the walk, more than
    /// the entries, is what a scrape's read costs. Retried like `snapshot` when a
    /// counter names a backend the read did not see.
    pub fn counters(&self) -> anyhow::Result<Counters> {
        read_consistent(|| self.read_counters(), Counters::is_consistent)
    }

    /// `counters` for a caller that already knows what the agent wrote (`labels`: services,
    /// names, backends, active pairs and the slot count, from the agent's model of the maps):
    /// only what the kernel changes is read, the counters. A counter of a backend `labels`
    /// does not know (added after the model was taken) is left for the next read.
    /// `labels` runs while the counters are read on another thread.
    pub fn counters_labelled(&self, labels: impl FnOnce() -> Counters) -> anyhow::Result<Counters> {
        std::thread::scope(|scope| {
            let stats = scope.spawn(|| self.read_stats());
            let mut read = labels();
            let no_backend = self.no_backend_counts(read.services.iter().map(|(_, s)| s.id))?;
            read.no_backend = no_backend.into_iter().collect();
            read.backend_stats = stats
                .join()
                .map_err(|_| anyhow::anyhow!("reading backend_stats panicked"))??;
            Ok(read)
        })
    }

    fn read_counters(&self) -> anyhow::Result<Counters> {
        std::thread::scope(|scope| {
            // The two halves take about as long as each other.
            let started = std::time::Instant::now();
            let other = scope.spawn(move || {
                let read = (self.read_stats()?, count_entries(&self.slots)?);
                tracing::debug!("backend_stats and slots read in {:?}", started.elapsed());
                Ok::<_, anyhow::Error>(read)
            });
            let mut read = Counters::default();
            for (key, svc) in entries(&self.services)? {
                read.services.push((vip_of_key(&key, false)?, svc));
            }
            for (key, svc) in entries(&self.ext_services)? {
                read.services.push((vip_of_key(&key, true)?, svc));
            }
            read.services.sort_unstable_by_key(|(vip, _)| *vip);
            read.names = entries(&self.service_names)?
                .iter()
                .map(|(id, name)| (*id, name_of(name)))
                .collect();
            let backends = entries(&self.backends)?;
            read.backends.reserve(backends.len());
            for (id, backend) in backends {
                read.backends.insert(id, addr_of_backend(&backend)?);
            }
            read.active = entries(&self.active)?.into_iter().map(|(k, _)| k).collect();
            let no_backend = self.no_backend_counts(read.services.iter().map(|(_, s)| s.id))?;
            read.no_backend = no_backend.into_iter().collect();
            tracing::debug!("the other maps read in {:?}", started.elapsed());
            (read.backend_stats, read.slots) = other
                .join()
                .map_err(|_| anyhow::anyhow!("reading backend_stats panicked"))??;
            Ok(read)
        })
    }

    /// `service_stats.no_backend` for each of `ids`: the array read in batches up to the
    /// highest id (one lookup syscall per service was most of a scrape's map reads at 10k
    /// services).
    fn no_backend_counts(
        &self,
        ids: impl Iterator<Item = u32> + Clone,
    ) -> anyhow::Result<Vec<(u32, u64)>> {
        let Some(end) = ids.clone().max().map(|id| id + 1) else {
            return Ok(Vec::new());
        };
        let v = size_of::<ServiceStats>();
        let mut counts = Vec::with_capacity(end as usize);
        let fd = self.service_stats.map().fd().as_fd();
        let read = super::bpf::array_lookup_batch_each(fd, v, end, |_, values| {
            counts.extend(
                values
                    .chunks_exact(v)
                    .map(|s| read_pod::<ServiceStats>(s).no_backend),
            );
        });
        match read {
            Ok(()) => Ok(ids
                .map(|id| (id, counts.get(id as usize).copied().unwrap_or(0)))
                .collect()),
            Err(err) if batch_unsupported(&err) => ids
                .map(|id| Ok((id, self.service_stats.get(&id, 0)?.no_backend)))
                .collect(),
            Err(err) => Err(err.into()),
        }
    }

    /// `backend_stats`, sorted by key.
    fn read_stats(&self) -> anyhow::Result<Vec<(BackendStatsKey, BackendStats)>> {
        let mut stats = entries(&self.backend_stats)?;
        stats.sort_unstable_by_key(|(key, _)| *key);
        Ok(stats)
    }

    fn read_all(&self) -> anyhow::Result<Snapshot> {
        let mut snap = Snapshot::default();
        for (key, svc) in entries(&self.services)? {
            snap.services.insert(vip_of_key(&key, false)?, svc);
        }
        for (key, svc) in entries(&self.ext_services)? {
            snap.services.insert(vip_of_key(&key, true)?, svc);
        }
        let slots = entries(&self.slots)?;
        let backends = entries(&self.backends)?;
        for (id, backend) in &backends {
            snap.backends.insert(*id, addr_of_backend(backend)?);
        }
        let backends: std::collections::HashMap<u32, Backend> = backends.into_iter().collect();
        snap.slots.extend(slots.into_iter().map(|(key, value)| {
            // A backend that is gone keeps its id, so `is_consistent` sees a torn read.
            let differs = backends
                .get(&value.backend_id)
                .is_some_and(|backend| *backend != value.backend);
            (key, if differs { 0 } else { value.backend_id })
        }));
        for (id, name) in entries(&self.service_names)? {
            snap.names.insert(id, name_of(&name));
        }
        snap.backend_stats.extend(entries(&self.backend_stats)?);
        snap.active.extend(entries(&self.active)?);
        for (key, state) in entries(&self.passive)? {
            snap.passive.insert(key, state.consecutive_failures);
        }
        for (key, value) in entries(&self.affinity)? {
            snap.affinity.push((key, value.backend_id));
        }
        let no_backend = self.no_backend_counts(snap.services.values().map(|s| s.id))?;
        snap.service_stats.extend(
            no_backend
                .into_iter()
                .map(|(id, no_backend)| (id, ServiceStats { no_backend })),
        );
        snap.settings = self.settings()?;
        Ok(snap)
    }

    /// Writes `ops` in order. On error the maps may hold part of the ops; the caller re-reads
    /// the applied state (the order of ops keeps the data path consistent at every step).
    ///
    /// Consecutive runs of new entries that the kernel reaches only through entries written
    /// after them (`MapOp::is_reached_through_later_writes`) go to the kernel at the same
    /// time, one thread per map written: their order among themselves is invisible to the
    /// data path.
    pub fn apply(&mut self, ops: &[MapOp]) -> anyhow::Result<()> {
        let runs: Vec<&[MapOp]> = ops.chunk_by(|a, b| a.kind() == b.kind()).collect();
        let mut at = 0;
        while at < runs.len() {
            let together = runs[at..]
                .iter()
                .take_while(|run| {
                    run.len() >= BATCH_MIN && run[0].is_reached_through_later_writes()
                })
                .count();
            if together > 1 {
                let mut writes = Vec::new();
                for run in &runs[at..at + together] {
                    writes.extend(self.batch_writes(run).into_iter().flatten());
                }
                write_concurrently(&writes)?;
                at += together;
                continue;
            }
            let run = runs[at];
            at += 1;
            if run.len() >= BATCH_MIN
                && let Some(writes) = self.batch_writes(run)
            {
                writes.iter().try_for_each(BatchWrite::write)?;
                continue;
            }
            for op in run {
                self.apply_with_retry(op)
                    .with_context(|| format!("map write failed: {op:?}"))?;
            }
        }
        Ok(())
    }

    /// The slots map entries of one generation's slot set.
    fn slot_entries(
        service_id: u32,
        generation: u32,
        backends: &[SlotBackend],
    ) -> impl Iterator<Item = (SlotKey, SlotValue)> {
        backends.iter().enumerate().map(move |(slot, backend)| {
            let key = SlotKey {
                service_id,
                generation,
                slot: slot as u32,
            };
            (key, slot_value(backend))
        })
    }

    /// `ResetService` for a run of ids: round-robin positions and per-service counters zeroed.
    fn reset_batch(&self, run: &[MapOp]) -> Vec<BatchWrite<'_>> {
        let (mut rr, mut stats) = (Batch::default(), Batch::default());
        for op in run {
            if let MapOp::ResetService { service_id } = op {
                rr.push(service_id, &0u64);
                stats.push(service_id, &ServiceStats::default());
            }
        }
        vec![
            BatchWrite::new("rr_state", self.rr_state.map(), rr),
            BatchWrite::new("service_stats", self.service_stats.map(), stats),
        ]
    }

    /// `PutService` for a run of VIPs: socket-level and external ones go to their own maps.
    fn service_batch(&self, run: &[MapOp]) -> Vec<BatchWrite<'_>> {
        let (mut socket, mut external) = (Batch::default(), Batch::default());
        for op in run {
            if let MapOp::PutService { vip, service } = op {
                let batch = if vip.external {
                    &mut external
                } else {
                    &mut socket
                };
                batch.push(&key_of_vip(vip), service);
            }
        }
        vec![
            BatchWrite::new("services", self.services.map(), socket),
            BatchWrite::new("ext_services", self.ext_services.map(), external),
        ]
    }

    /// `CreateCounter` for a run of pairs: zeroed `backend_stats` (and, with the TC programs,
    /// `np_backend_stats`) entries, most of a cold start's writes.
    ///
    /// A batch takes no `BPF_NOEXIST`, and a counter must never be reset. Writing them anyway
    /// is safe because the pairs are absent: the plan and the repair create only pairs the
    /// agent's model of the maps lacks, that model is read back from the maps at start and
    /// after any failed write, and nothing but the agent ever creates a counter (the kernel
    /// only adds to existing ones, and the kernel programs count nothing for a pair until its
    /// slots, written after its counter, name it).
    fn counter_batch(&self, run: &[MapOp]) -> Vec<BatchWrite<'_>> {
        let (mut stats, mut nodeport) = (Batch::default(), Batch::default());
        let zero_nodeport = per_cpu_zeros::<NodeportBackendStats>(self.nr_cpus);
        for op in run {
            if let MapOp::CreateCounter(key) = op {
                stats.push(key, &BackendStats::default());
                if self.nodeport_counters {
                    nodeport.push_raw(key, &zero_nodeport);
                }
            }
        }
        let mut nodeport =
            BatchWrite::new("np_backend_stats", self.np_backend_stats.map(), nodeport);
        // Each entry is a per-CPU allocation in the kernel: spread over the CPUs.
        nodeport.threads = self.nr_cpus.min(4);
        vec![
            BatchWrite::new("backend_stats", self.backend_stats.map(), stats),
            nodeport,
        ]
    }

    /// A run of puts of one kind as `BPF_MAP_UPDATE_BATCH` writes (one syscall instead of one
    /// per element: most of a cold start's time). None for kinds written one by one.
    fn batch_writes(&self, run: &[MapOp]) -> Option<Vec<BatchWrite<'_>>> {
        match run[0] {
            MapOp::ResetService { .. } => return Some(self.reset_batch(run)),
            MapOp::PutService { .. } => return Some(self.service_batch(run)),
            MapOp::CreateCounter(_) => return Some(self.counter_batch(run)),
            _ => {}
        }
        let mut batch = Batch::default();
        let (name, map) = match &run[0] {
            MapOp::PutBackend { .. } => ("backends", self.backends.map()),
            MapOp::PutSlots { .. } => ("slots", self.slots.map()),
            MapOp::PutName { .. } => ("service_names", self.service_names.map()),
            MapOp::PutActive { .. } => ("active", self.active.map()),
            _ => return None,
        };
        for op in run {
            match op {
                MapOp::PutBackend { id, addr } => batch.push(id, &backend_of_addr(addr)),
                MapOp::PutSlots {
                    service_id,
                    generation,
                    backends,
                } => {
                    for (key, value) in Self::slot_entries(*service_id, *generation, backends) {
                        batch.push(&key, &value);
                    }
                }
                MapOp::PutName { service_id, name } => batch.push(service_id, &service_name(name)),
                MapOp::PutActive { key, slots } => batch.push(key, slots),
                _ => unreachable!("a run holds one kind"),
            }
        }
        Some(vec![BatchWrite::new(name, map, batch)])
    }

    /// Non-preallocated maps take their elements from per-CPU caches that the kernel refills
    /// in the background (bpf_mem_alloc); a burst of inserts from user space can drain them and
    /// get ENOMEM although memory is plentiful. Such a write is retried after a short pause
    /// (every op is idempotent), for a bounded time. This runs on the control loop's own
    /// thread, never on the async runtime.
    fn apply_with_retry(&mut self, op: &MapOp) -> anyhow::Result<()> {
        let mut pause = Duration::from_micros(200);
        let deadline = std::time::Instant::now() + ENOMEM_RETRY_FOR;
        loop {
            match self.apply_one(op) {
                Err(err) if is_enomem(&err) && std::time::Instant::now() < deadline => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(20));
                }
                other => return other,
            }
        }
    }

    fn apply_one(&mut self, op: &MapOp) -> anyhow::Result<()> {
        match op {
            MapOp::PutBackend { id, addr } => self.backends.insert(id, backend_of_addr(addr), 0)?,
            MapOp::DeleteBackend { id } => ignore_missing(self.backends.remove(id))?,
            MapOp::CreateCounter(key) => {
                match self
                    .backend_stats
                    .insert(key, BackendStats::default(), BPF_NOEXIST)
                {
                    Err(err) if is_errno(&err, libc::EEXIST) => {}
                    other => other?,
                }
                if self.nodeport_counters {
                    self.create_nodeport_counter(key)?;
                }
            }
            MapOp::DeleteCounter(key) => {
                // The TC counter first: a crash in between leaves the `backend_stats` entry,
                // which the resync sees and deletes again, both.
                ignore_missing(self.np_backend_stats.remove(key))?;
                ignore_missing(self.backend_stats.remove(key))?;
                ignore_missing(self.passive.remove(key))?;
            }
            MapOp::ResetService { service_id } => {
                self.rr_state.set(*service_id, 0, 0)?;
                self.service_stats
                    .set(*service_id, ServiceStats::default(), 0)?;
            }
            MapOp::PutSlots {
                service_id,
                generation,
                backends,
            } => {
                for (key, value) in Self::slot_entries(*service_id, *generation, backends) {
                    self.slots.insert(key, value, 0)?;
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
                    ignore_missing(self.slots.remove(&key))?;
                }
            }
            MapOp::PutSlot { key, backend } => self.slots.insert(key, slot_value(backend), 0)?,
            MapOp::DeleteSlot(key) => ignore_missing(self.slots.remove(key))?,
            MapOp::PutName { service_id, name } => {
                self.service_names
                    .insert(service_id, service_name(name), 0)?
            }
            MapOp::DeleteName { service_id } => {
                ignore_missing(self.service_names.remove(service_id))?
            }
            MapOp::PutService { vip, service } if vip.external => {
                self.ext_services.insert(key_of_vip(vip), service, 0)?
            }
            MapOp::PutService { vip, service } => {
                self.services.insert(key_of_vip(vip), service, 0)?
            }
            MapOp::DeleteService { vip } if vip.external => {
                ignore_missing(self.ext_services.remove(&key_of_vip(vip)))?
            }
            MapOp::DeleteService { vip } => ignore_missing(self.services.remove(&key_of_vip(vip)))?,
            MapOp::PutActive { key, slots } => self.active.insert(key, slots, 0)?,
            MapOp::DeleteActive(key) => ignore_missing(self.active.remove(key))?,
            MapOp::DeletePassive(key) => ignore_missing(self.passive.remove(key))?,
            MapOp::DeleteAffinity(key) => ignore_missing(self.affinity.remove(key))?,
        }
        Ok(())
    }
}

/// Every element of a hash map: in batches, or (a kernel without batch lookups) one by one.
fn entries<K: aya::Pod, V: aya::Pod>(map: &HashMap<MapData, K, V>) -> anyhow::Result<Vec<(K, V)>> {
    let fd = map.map().fd().as_fd();
    let (k, v) = (size_of::<K>(), size_of::<V>());
    let mut out = Vec::new();
    match super::bpf::map_lookup_batch_each(fd, k, v, |keys, values| {
        let pairs = keys.chunks_exact(k).zip(values.chunks_exact(v));
        out.extend(pairs.map(|(k, v)| (read_pod(k), read_pod(v))));
    }) {
        Ok(()) => Ok(out),
        Err(err) if batch_unsupported(&err) => map.iter().map(|e| e.map_err(Into::into)).collect(),
        Err(err) => Err(err.into()),
    }
}

/// The number of elements of a hash map (read in batches: the kernel keeps no count).
fn count_entries<K: aya::Pod, V: aya::Pod>(map: &HashMap<MapData, K, V>) -> anyhow::Result<usize> {
    let fd = map.map().fd().as_fd();
    let mut count = 0;
    match super::bpf::map_lookup_batch_each(fd, size_of::<K>(), size_of::<V>(), |keys, _| {
        count += keys.len() / size_of::<K>();
    }) {
        Ok(()) => Ok(count),
        Err(err) if batch_unsupported(&err) => Ok(map.keys().count()),
        Err(err) => Err(err.into()),
    }
}

/// `entries` of a per-CPU hash map: each value per possible CPU.
fn per_cpu_entries<K: aya::Pod, V: aya::Pod>(
    map: &PerCpuHashMap<MapData, K, V>,
    nr_cpus: usize,
) -> anyhow::Result<Vec<(K, Vec<V>)>> {
    let fd = map.map().fd().as_fd();
    let (k, v) = (size_of::<K>(), size_of::<V>());
    let slot = v.next_multiple_of(8);
    let mut out = Vec::new();
    match super::bpf::map_lookup_batch_each(fd, k, slot * nr_cpus, |keys, values| {
        let pairs = keys
            .chunks_exact(k)
            .zip(values.chunks_exact(slot * nr_cpus));
        out.extend(pairs.map(|(key, per_cpu)| {
            let per_cpu = per_cpu.chunks_exact(slot).map(|s| read_pod(&s[..v]));
            (read_pod(key), per_cpu.collect())
        }));
    }) {
        Ok(()) => Ok(out),
        Err(err) if batch_unsupported(&err) => map
            .iter()
            .map(|e| {
                let (k, v) = e?;
                Ok((k, v.iter().copied().collect()))
            })
            .collect(),
        Err(err) => Err(err.into()),
    }
}

/// A kernel or map without batch lookups: EINVAL, EOPNOTSUPP, or the kernel-internal
/// ENOTSUPP (524) some versions return.
fn batch_unsupported(err: &std::io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | 524)
    )
}

/// A value from the bytes the kernel wrote for it.
fn read_pod<T: aya::Pod>(bytes: &[u8]) -> T {
    assert_eq!(bytes.len(), size_of::<T>());
    // SAFETY: `Pod` types are valid for any bit pattern, and the slice has exactly the size.
    unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) }
}

/// One batch for one map.
struct BatchWrite<'a> {
    map: &'static str,
    fd: std::os::fd::BorrowedFd<'a>,
    batch: Batch,
    /// Threads that share the batch (`Batch::write_parallel`).
    threads: usize,
}

impl<'a> BatchWrite<'a> {
    fn new(map: &'static str, data: &'a MapData, batch: Batch) -> Self {
        Self {
            map,
            fd: data.fd().as_fd(),
            batch,
            threads: 1,
        }
    }

    fn write(&self) -> anyhow::Result<()> {
        if self.batch.count == 0 {
            return Ok(());
        }
        let started = std::time::Instant::now();
        self.batch
            .write_parallel(self.fd, self.threads)
            .with_context(|| {
                format!(
                    "batch write of {} entries to {} failed",
                    self.batch.count, self.map
                )
            })?;
        tracing::debug!(
            map = self.map,
            entries = self.batch.count,
            took_ms = started.elapsed().as_secs_f64() * 1e3,
            "batch written"
        );
        Ok(())
    }
}

/// Writes every batch on a thread of its own; the first error stands (the others are still
/// waited for, so nothing writes once this returns).
fn write_concurrently(writes: &[BatchWrite<'_>]) -> anyhow::Result<()> {
    std::thread::scope(|scope| {
        let threads: Vec<_> = writes
            .iter()
            .map(|write| scope.spawn(move || write.write()))
            .collect();
        let results: Vec<anyhow::Result<()>> = threads
            .into_iter()
            .map(|t| {
                t.join()
                    .map_err(|_| anyhow::anyhow!("a batch writer panicked"))?
            })
            .collect();
        results.into_iter().collect()
    })
}

/// Runs shorter than this are written one by one.
const BATCH_MIN: usize = 8;

/// Keys and values of one batch update, back to back as the kernel reads them.
#[derive(Default)]
struct Batch {
    keys: Vec<u8>,
    values: Vec<u8>,
    count: usize,
}

impl Batch {
    fn push<K: aya::Pod, V: aya::Pod>(&mut self, key: &K, value: &V) {
        self.push_raw(key, pod_bytes(value));
    }

    fn push_raw<K: aya::Pod>(&mut self, key: &K, value: &[u8]) {
        self.keys.extend_from_slice(pod_bytes(key));
        self.values.extend_from_slice(value);
        self.count += 1;
    }

    /// Writes every element (an existing one is overwritten: batches take no `BPF_NOEXIST`);
    /// ENOMEM (drained per-CPU element caches) is retried after a pause, for a bounded time.
    fn write(&self, fd: std::os::fd::BorrowedFd<'_>) -> anyhow::Result<()> {
        self.write_range(fd, 0..self.count)
    }

    /// `write` on `threads` threads, each a contiguous part of the elements: for per-CPU
    /// hash maps, whose inserts are mostly the kernel allocating each entry's per-CPU value.
    fn write_parallel(
        &self,
        fd: std::os::fd::BorrowedFd<'_>,
        threads: usize,
    ) -> anyhow::Result<()> {
        if threads <= 1 {
            return self.write(fd);
        }
        let part = self.count.div_ceil(threads.max(1)).max(1);
        std::thread::scope(|scope| {
            let parts: Vec<_> = (0..self.count)
                .step_by(part)
                .map(|start| {
                    let range = start..(start + part).min(self.count);
                    scope.spawn(move || self.write_range(fd, range))
                })
                .collect();
            parts.into_iter().try_for_each(|part| {
                part.join()
                    .map_err(|_| anyhow::anyhow!("a batch writer panicked"))?
            })
        })
    }

    fn write_range(
        &self,
        fd: std::os::fd::BorrowedFd<'_>,
        range: std::ops::Range<usize>,
    ) -> anyhow::Result<()> {
        if self.count == 0 || range.is_empty() {
            return Ok(());
        }
        let key_size = self.keys.len() / self.count;
        let value_size = self.values.len() / self.count;
        let deadline = std::time::Instant::now() + ENOMEM_RETRY_FOR;
        let mut pause = Duration::from_micros(200);
        let mut done = range.start;
        // Every turn writes at least one element or sleeps until the deadline.
        while done < range.end {
            let rest = range.end - done;
            let result = super::bpf::map_update_batch(
                fd,
                &self.keys[done * key_size..],
                &self.values[done * value_size..],
                rest,
                0,
            );
            let Err(err) = result else { return Ok(()) };
            done += err.written.min(rest);
            match err.error.raw_os_error() {
                Some(libc::ENOMEM) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(20));
                }
                _ => return Err(err.error.into()),
            }
        }
        Ok(())
    }
}

/// The bytes of a map key or value.
fn pod_bytes<T: aya::Pod>(value: &T) -> &[u8] {
    // SAFETY: `Pod` types are plain old data without padding the kernel would misread; the
    // slice covers exactly the value and lives as long as the borrow.
    unsafe {
        std::slice::from_raw_parts((value as *const T).cast::<u8>(), std::mem::size_of::<T>())
    }
}

/// A zero per-CPU value as the kernel lays it out: one 8-byte-aligned slot per possible CPU.
fn per_cpu_zeros<T>(nr_cpus: usize) -> Vec<u8> {
    vec![0; std::mem::size_of::<T>().next_multiple_of(8) * nr_cpus]
}

fn is_enomem(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<MapError>()
            .is_some_and(|e| is_errno(e, libc::ENOMEM))
    })
}

fn is_errno(err: &MapError, errno: i32) -> bool {
    matches!(err, MapError::SyscallError(e) if e.io_error.raw_os_error() == Some(errno))
        || (errno == libc::ENOENT && matches!(err, MapError::KeyNotFound))
}

fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(err) if is_errno(&err, libc::ENOENT) => Ok(()),
        other => other,
    }
}

/// Reads with `read` until `consistent` holds, three retries at most (2 ms apart): the maps are
/// read one after the other while the agent may be writing them, and a read that catches a
/// half-done update is simply taken again.
fn read_consistent<T>(
    read: impl Fn() -> anyhow::Result<T>,
    consistent: impl Fn(&T) -> bool,
) -> anyhow::Result<T> {
    let mut value = read()?;
    for _ in 0..3 {
        if consistent(&value) {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
        value = read()?;
    }
    Ok(value)
}
