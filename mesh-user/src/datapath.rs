//! The data path: the one owner of the eBPF object, its pinned maps and links. All raw map
//! layout, byte-order conversion and `unsafe` of the agent live here.
//!
//! Pins live under `<bpffs>/v<LAYOUT_VERSION>/`: `maps/<map>` and `links/<program>`. Programs
//! stay attached and maps keep their content when the agent exits; a starting agent adopts
//! them, and `cleanup` removes them.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::CString,
    fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues},
    programs::Program,
};
use mesh_common::{
    AffinityKey, AffinityValue, Backend, BackendStats, BackendStatsKey, DatapathStats, FAMILY_V4,
    FAMILY_V6, LAYOUT_VERSION, PassiveState, SERVICE_NAME_LEN, Service, ServiceKey, ServiceName,
    ServiceStats, Settings, SlotKey, UdpFlow, map_names,
};

use crate::{
    config::{KernelLog, Limits},
    reconcile::{Applied, AppliedService, MapOp},
    state::Vip,
};

/// How long old slot sets and backends outlive the switch away from them.
const SWITCH_GRACE: std::time::Duration = std::time::Duration::from_millis(5);

/// `flags` of a map update: fail if the key exists.
const BPF_NOEXIST: u64 = 1;

static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh"));

/// The programs, by their function names in `mesh-ebpf`, with the kernel's attach type
/// (`enum bpf_attach_type`); all attach to the cgroup.
pub const PROGRAMS: &[(&str, u32)] = &[
    ("connect4", 10),     // BPF_CGROUP_INET4_CONNECT
    ("connect6", 11),     // BPF_CGROUP_INET6_CONNECT
    ("sendmsg4", 14),     // BPF_CGROUP_UDP4_SENDMSG
    ("sendmsg6", 15),     // BPF_CGROUP_UDP6_SENDMSG
    ("recvmsg4", 19),     // BPF_CGROUP_UDP4_RECVMSG
    ("recvmsg6", 20),     // BPF_CGROUP_UDP6_RECVMSG
    ("getsockopt", 21),   // BPF_CGROUP_GETSOCKOPT
    ("getpeername4", 29), // BPF_CGROUP_INET4_GETPEERNAME
    ("getpeername6", 30), // BPF_CGROUP_INET6_GETPEERNAME
    ("sock_release", 34), // BPF_CGROUP_INET_SOCK_RELEASE
    ("tcp_outcome", 3),   // BPF_CGROUP_SOCK_OPS
];

/// Socket-local storage for reverse translation. Only the kernel uses it; it is pinned so an
/// upgraded program keeps seeing the state of sockets made before the upgrade.
const SOCK_REV: &str = "SOCK_REV";

/// Every pinned map.
const MAPS: &[&str] = &[
    map_names::SERVICES,
    map_names::SLOTS,
    map_names::BACKENDS,
    map_names::RR_STATE,
    map_names::BACKEND_STATS,
    map_names::SERVICE_STATS,
    map_names::SERVICE_NAMES,
    map_names::ACTIVE,
    map_names::AFFINITY,
    map_names::UDP_FLOWS,
    map_names::DATAPATH_STATS,
    map_names::PASSIVE,
    map_names::SETTINGS,
    SOCK_REV,
];

/// Where the pins of one layout version live.
#[derive(Clone, Debug)]
pub struct PinLayout {
    root: PathBuf,
}

impl PinLayout {
    pub fn new(bpffs: &Path) -> Self {
        Self {
            root: bpffs.join(format!("v{LAYOUT_VERSION}")),
        }
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.root.join("maps").join(name.to_ascii_lowercase())
    }

    pub fn link(&self, program: &str) -> PathBuf {
        self.root.join("links").join(program)
    }
}

/// Typed handles on every map.
pub struct Maps {
    services: HashMap<MapData, ServiceKey, Service>,
    slots: HashMap<MapData, SlotKey, u32>,
    backends: HashMap<MapData, u32, Backend>,
    rr_state: Array<MapData, u64>,
    backend_stats: PerCpuHashMap<MapData, BackendStatsKey, BackendStats>,
    service_stats: PerCpuArray<MapData, ServiceStats>,
    service_names: HashMap<MapData, u32, ServiceName>,
    active: HashMap<MapData, BackendStatsKey, u32>,
    udp_flows: HashMap<MapData, u64, UdpFlow>,
    datapath_stats: PerCpuArray<MapData, DatapathStats>,
    passive: HashMap<MapData, BackendStatsKey, PassiveState>,
    settings: Array<MapData, Settings>,
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    nr_cpus: usize,
}

/// Everything the maps hold, with per-CPU counters summed.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub services: BTreeMap<Vip, Service>,
    pub slots: BTreeMap<SlotKey, u32>,
    pub backends: BTreeMap<u32, SocketAddr>,
    pub names: BTreeMap<u32, String>,
    pub backend_stats: BTreeMap<BackendStatsKey, BackendStats>,
    /// Only for the ids of live services.
    pub service_stats: BTreeMap<u32, ServiceStats>,
    /// (service, backend) -> slots held, for backends taking new connections.
    pub active: BTreeMap<BackendStatsKey, u32>,
}

/// Every (service, backend) key of one service, for range lookups in ordered maps.
fn service_range(service_id: u32) -> std::ops::RangeInclusive<BackendStatsKey> {
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
            && self.slots.values().all(|id| self.backends.contains_key(id))
    }

    /// Counters of every backend of a service (configured ones, active or not), by backend id.
    pub fn members_of(
        &self,
        service_id: u32,
    ) -> impl Iterator<Item = (&BackendStatsKey, &BackendStats)> {
        self.backend_stats.range(service_range(service_id))
    }

    /// The applied state the maps describe, and the slots no live service points at (left by
    /// an agent that died between writing a slot set and switching to it).
    pub fn applied(&self) -> (Applied, Vec<SlotKey>) {
        let mut applied = Applied {
            backends: self
                .backends
                .iter()
                .map(|(&id, &addr)| (addr, id))
                .collect(),
            ..Default::default()
        };
        let live: BTreeMap<(u32, u32), u32> = self
            .services
            .values()
            .map(|s| ((s.id, s.generation), s.slot_count))
            .collect();
        let orphans = self
            .slots
            .keys()
            .filter(|k| {
                live.get(&(k.service_id, k.generation))
                    .is_none_or(|&count| k.slot >= count)
            })
            .copied()
            .collect();
        for (vip, svc) in &self.services {
            let slots = (0..svc.slot_count)
                .map(|slot| {
                    let key = SlotKey {
                        service_id: svc.id,
                        generation: svc.generation,
                        slot,
                    };
                    self.slots.get(&key).copied().unwrap_or(0)
                })
                .collect();
            let members = self
                .members_of(svc.id)
                .map(|(k, _)| k.backend_id)
                .collect::<BTreeSet<u32>>();
            let active = self
                .active
                .range(service_range(svc.id))
                .map(|(k, &slots)| (k.backend_id, slots))
                .collect();
            applied.services.insert(
                *vip,
                AppliedService {
                    id: svc.id,
                    name: self.names.get(&svc.id).cloned().unwrap_or_default(),
                    generation: svc.generation,
                    flags: svc.flags,
                    affinity_timeout_secs: svc.affinity_timeout_secs,
                    slots,
                    members,
                    active,
                },
            );
        }
        (applied, orphans)
    }
}

impl Maps {
    fn take(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        Self::build(|name| {
            ebpf.take_map(name)
                .with_context(|| format!("map {name} missing from the eBPF object"))
        })
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

    fn build(mut map: impl FnMut(&str) -> anyhow::Result<Map>) -> anyhow::Result<Self> {
        Ok(Self {
            services: HashMap::try_from(map(map_names::SERVICES)?)?,
            slots: HashMap::try_from(map(map_names::SLOTS)?)?,
            backends: HashMap::try_from(map(map_names::BACKENDS)?)?,
            rr_state: Array::try_from(map(map_names::RR_STATE)?)?,
            backend_stats: PerCpuHashMap::try_from(map(map_names::BACKEND_STATS)?)?,
            service_stats: PerCpuArray::try_from(map(map_names::SERVICE_STATS)?)?,
            service_names: HashMap::try_from(map(map_names::SERVICE_NAMES)?)?,
            active: HashMap::try_from(map(map_names::ACTIVE)?)?,
            udp_flows: HashMap::try_from(map(map_names::UDP_FLOWS)?)?,
            datapath_stats: PerCpuArray::try_from(map(map_names::DATAPATH_STATS)?)?,
            passive: HashMap::try_from(map(map_names::PASSIVE)?)?,
            settings: Array::try_from(map(map_names::SETTINGS)?)?,
            affinity: HashMap::try_from(map(map_names::AFFINITY)?)?,
            nr_cpus: aya::util::nr_cpus()
                .map_err(|(what, err)| anyhow::anyhow!("{what}: {err}"))?,
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

    /// Entries of the maps the snapshot does not hold.
    pub fn extra_entry_counts(&self) -> [(&'static str, usize); 3] {
        [
            ("affinity", self.affinity.keys().count()),
            ("udp_flows", self.udp_flows.keys().count()),
            ("passive", self.passive.keys().count()),
        ]
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
        let mut snap = self.read_all()?;
        for _ in 0..3 {
            if snap.is_consistent() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
            snap = self.read_all()?;
        }
        Ok(snap)
    }

    fn read_all(&self) -> anyhow::Result<Snapshot> {
        let mut snap = Snapshot::default();
        for entry in self.services.iter() {
            let (key, svc) = entry?;
            snap.services.insert(vip_of_key(&key)?, svc);
        }
        for entry in self.slots.iter() {
            let (key, backend) = entry?;
            snap.slots.insert(key, backend);
        }
        for entry in self.backends.iter() {
            let (id, backend) = entry?;
            snap.backends.insert(id, addr_of_backend(&backend)?);
        }
        for entry in self.service_names.iter() {
            let (id, name) = entry?;
            snap.names.insert(id, name_of(&name));
        }
        for entry in self.backend_stats.iter() {
            let (key, per_cpu) = entry?;
            snap.backend_stats
                .insert(key, sum_backend_stats(per_cpu.iter()));
        }
        for entry in self.active.iter() {
            let (key, slots) = entry?;
            snap.active.insert(key, slots);
        }
        for svc in snap.services.values() {
            let per_cpu = self.service_stats.get(&svc.id, 0)?;
            let no_backend = per_cpu.iter().map(|s| s.no_backend).sum();
            snap.service_stats
                .insert(svc.id, ServiceStats { no_backend });
        }
        Ok(snap)
    }

    /// Writes `ops` in order. On error the maps may hold part of the ops; the caller re-reads
    /// the applied state (the order of ops keeps the data path consistent at every step).
    pub fn apply(&mut self, ops: &[MapOp]) -> anyhow::Result<()> {
        let mut switched = false;
        for op in ops {
            if switched && op.is_cleanup() {
                // A connect that read a service entry just before the switch still looks up
                // its old slots within the same program run (under RCU). Let such runs finish
                // before deleting what they may read; they last microseconds.
                std::thread::sleep(SWITCH_GRACE);
                switched = false;
            }
            switched |= op.is_switch();
            self.apply_with_retry(op)
                .with_context(|| format!("map write failed: {op:?}"))?;
        }
        Ok(())
    }

    /// Non-preallocated maps take their elements from per-CPU caches that the kernel refills
    /// in the background (bpf_mem_alloc); a burst of inserts from user space can drain them and
    /// get ENOMEM although memory is plentiful. Such a write is retried after a short pause
    /// (every op is idempotent), for a bounded time.
    fn apply_with_retry(&mut self, op: &MapOp) -> anyhow::Result<()> {
        let mut pause = std::time::Duration::from_micros(200);
        let deadline = std::time::Instant::now() + ENOMEM_RETRY_FOR;
        loop {
            match self.apply_one(op) {
                Err(err) if is_enomem(&err) && std::time::Instant::now() < deadline => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(std::time::Duration::from_millis(20));
                }
                other => return other,
            }
        }
    }

    fn apply_one(&mut self, op: &MapOp) -> anyhow::Result<()> {
        match op {
            MapOp::PutBackend { id, addr } => self.backends.insert(id, backend_of_addr(addr), 0)?,
            MapOp::CreateCounter {
                service_id,
                backend_id,
            } => {
                let key = BackendStatsKey {
                    service_id: *service_id,
                    backend_id: *backend_id,
                };
                let zero = PerCpuValues::try_from(vec![BackendStats::default(); self.nr_cpus])?;
                match self.backend_stats.insert(key, zero, BPF_NOEXIST) {
                    Err(err) if is_errno(&err, libc::EEXIST) => {}
                    other => other?,
                }
            }
            MapOp::ResetService { service_id } => {
                self.rr_state.set(*service_id, 0, 0)?;
                let zero = PerCpuValues::try_from(vec![ServiceStats::default(); self.nr_cpus])?;
                self.service_stats.set(*service_id, zero, 0)?;
            }
            MapOp::PutSlots {
                service_id,
                generation,
                backends,
            } => {
                for (slot, backend) in backends.iter().enumerate() {
                    let key = SlotKey {
                        service_id: *service_id,
                        generation: *generation,
                        slot: slot as u32,
                    };
                    self.slots.insert(key, backend, 0)?;
                }
            }
            MapOp::PutName { service_id, name } => {
                self.service_names
                    .insert(service_id, service_name(name), 0)?
            }
            MapOp::PutService { vip, service } => {
                self.services.insert(key_of_vip(vip), service, 0)?
            }
            MapOp::DeleteService { vip } => ignore_missing(self.services.remove(&key_of_vip(vip)))?,
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
            MapOp::DeleteName { service_id } => {
                ignore_missing(self.service_names.remove(service_id))?
            }
            MapOp::DeleteCounter {
                service_id,
                backend_id,
            } => ignore_missing(self.backend_stats.remove(&BackendStatsKey {
                service_id: *service_id,
                backend_id: *backend_id,
            }))?,
            MapOp::DeleteBackend { id } => ignore_missing(self.backends.remove(id))?,
            MapOp::PutActive {
                service_id,
                backend_id,
                slots,
            } => {
                let key = BackendStatsKey {
                    service_id: *service_id,
                    backend_id: *backend_id,
                };
                self.active.insert(key, slots, 0)?
            }
            MapOp::DeleteActive {
                service_id,
                backend_id,
            } => ignore_missing(self.active.remove(&BackendStatsKey {
                service_id: *service_id,
                backend_id: *backend_id,
            }))?,
        }
        Ok(())
    }

    /// Deletes slot entries no service points at.
    pub fn delete_slots(&mut self, keys: &[SlotKey]) -> anyhow::Result<()> {
        for key in keys {
            ignore_missing(self.slots.remove(key))?;
        }
        Ok(())
    }
}

/// The loaded programs (attached through pinned links) and the maps.
pub struct Datapath {
    // Keeps the program fds open while the agent runs; the pinned links keep them attached.
    _ebpf: Ebpf,
    pub maps: Maps,
    /// Taken by the agent, which polls it.
    pub logger: Option<KernelLogger>,
}

pub struct LoadOptions<'a> {
    pub bpffs: &'a Path,
    pub cgroup: &'a Path,
    pub limits: &'a Limits,
    pub kernel_log: KernelLog,
}

/// Reads the kernel programs' log records (aya-log) into the agent's log.
pub type KernelLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

/// Polls the kernel programs' log ring buffer and writes its records to the agent's log.
pub fn forward_kernel_log(logger: KernelLogger) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use tokio::io::{Interest, unix::AsyncFd};
    // SAFETY: the logger owns the ring buffer's fd, which stays open and the same for as long
    // as the AsyncFd (which owns the logger) lives.
    let mut fd = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
        .map_err(|err| anyhow::anyhow!("polling the kernel log: {err}"))?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok(mut ready) = fd.readable_mut().await else {
                return;
            };
            ready.get_inner_mut().flush();
            ready.clear_ready();
        }
    }))
}

impl Datapath {
    /// Loads the programs, creates or reuses the pinned maps, and attaches the programs to the
    /// cgroup through pinned links. A link pinned by an earlier agent is updated in place to the
    /// new program (atomic: the cgroup is never without a program).
    pub fn load(opts: &LoadOptions<'_>) -> anyhow::Result<Self> {
        if EBPF_OBJECT.is_empty() {
            bail!("this mesh binary was built with AYA_BUILD_SKIP=1 and has no eBPF programs");
        }
        let layout = PinLayout::new(opts.bpffs);
        for dir in [layout.map("x"), layout.link("x")] {
            let dir = dir.parent().expect("pin paths have a parent");
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let limits = opts.limits;
        // Maps sized by the registry; the others keep their compiled-in capacity.
        let capacities = [
            (map_names::SERVICES, limits.max_services),
            (map_names::SLOTS, limits.max_slots),
            (map_names::BACKENDS, limits.max_backends),
            (map_names::RR_STATE, limits.max_services),
            (map_names::BACKEND_STATS, limits.max_backends),
            (map_names::SERVICE_STATS, limits.max_services),
            (map_names::SERVICE_NAMES, limits.max_services),
            (map_names::ACTIVE, limits.max_backends),
        ];
        let mut loader = EbpfLoader::new();
        // Records above this level are skipped in the kernel before any work is done.
        let log_level: u8 = match opts.kernel_log {
            KernelLog::Off => 0,
            KernelLog::Error => aya_log::Level::Error as u8,
            KernelLog::Warn => aya_log::Level::Warn as u8,
            KernelLog::Info => aya_log::Level::Info as u8,
            KernelLog::Debug => aya_log::Level::Debug as u8,
        };
        loader.override_global(aya_log::LEVEL, &log_level, true);
        for (name, capacity) in capacities {
            loader.map_max_entries(name, capacity);
        }
        for &name in MAPS {
            loader.map_pin_path(name, layout.map(name));
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .context("loading the eBPF object")?;
        check_capacities(&layout, &capacities)?;

        let cgroup = fs::File::open(opts.cgroup)
            .with_context(|| format!("opening cgroup {}", opts.cgroup.display()))?;
        for &(name, attach_type) in PROGRAMS {
            let program = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the eBPF object"))?;
            attach(program, attach_type, &cgroup, &layout.link(name))
                .with_context(|| format!("attaching {name} to {}", opts.cgroup.display()))?;
        }
        let maps = Maps::take(&mut ebpf)?;
        let logger = aya_log::EbpfLogger::init(&mut ebpf).context("kernel log ring buffer")?;
        Ok(Self {
            _ebpf: ebpf,
            maps,
            logger: Some(logger),
        })
    }
}

/// Loads `program` and attaches it to `cgroup` through the link pinned at `pin`. A link pinned
/// by an earlier agent is updated in place to the new program: atomic, the cgroup is never
/// without a program. (Links are made with raw bpf(2) calls: aya 0.14 cannot turn a sockopt
/// link into a pinnable one.)
fn attach(
    program: &mut Program,
    attach_type: u32,
    cgroup: &fs::File,
    pin: &Path,
) -> anyhow::Result<()> {
    match program {
        Program::CgroupSockAddr(p) => p.load()?,
        Program::CgroupSock(p) => p.load()?,
        Program::CgroupSockopt(p) => p.load()?,
        Program::SockOps(p) => p.load()?,
        other => bail!("unexpected program type {:?}", other.prog_type()),
    }
    let program_fd = program.fd()?.as_fd();
    if pin.exists() {
        let link = obj_get(pin)?;
        link_update(link.as_fd(), program_fd)
            .with_context(|| format!("updating pinned link {}", pin.display()))?;
    } else {
        let link = link_create(program_fd, cgroup.as_fd(), attach_type)?;
        obj_pin(link.as_fd(), pin).with_context(|| format!("pinning link {}", pin.display()))?;
    }
    Ok(())
}

/// A reused pin keeps the capacity it was created with; say so instead of failing later.
fn check_capacities(layout: &PinLayout, capacities: &[(&str, u32)]) -> anyhow::Result<()> {
    for &(name, wanted) in capacities {
        let info = aya::maps::MapInfo::from_pin(layout.map(name))?;
        if info.max_entries() != wanted {
            bail!(
                "pinned map {} holds {} entries but the config asks for {wanted}; \
                 run `mesh cleanup` to recreate the maps with the new limits",
                layout.map(name).display(),
                info.max_entries()
            );
        }
    }
    Ok(())
}

/// `max_entries` of each pinned map with a capacity (socket storage has none).
pub fn map_capacities(bpffs: &Path) -> anyhow::Result<Vec<(String, u32)>> {
    let layout = PinLayout::new(bpffs);
    MAPS.iter()
        .filter(|&&name| name != SOCK_REV)
        .map(|&name| {
            let info = aya::maps::MapInfo::from_pin(layout.map(name))?;
            Ok((name.to_ascii_lowercase(), info.max_entries()))
        })
        .collect()
}

/// Removes the pinned links (which detaches the programs) and maps.
pub fn cleanup(bpffs: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let layout = PinLayout::new(bpffs);
    let mut removed = Vec::new();
    for &(program, _) in PROGRAMS {
        let pin = layout.link(program);
        if pin.exists() {
            fs::remove_file(&pin).with_context(|| format!("removing {}", pin.display()))?;
            removed.push(pin);
        }
    }
    for &name in MAPS {
        let pin = layout.map(name);
        if pin.exists() {
            fs::remove_file(&pin).with_context(|| format!("removing {}", pin.display()))?;
            removed.push(pin);
        }
    }
    for dir in [
        layout.link("x").parent().map(Path::to_path_buf),
        layout.map("x").parent().map(Path::to_path_buf),
        Some(layout.root.clone()),
        Some(bpffs.to_path_buf()),
    ]
    .into_iter()
    .flatten()
    {
        // Only empty directories go: anything else there is not ours.
        let _ = fs::remove_dir(&dir);
    }
    Ok(removed)
}

fn sum_backend_stats<'a>(per_cpu: impl Iterator<Item = &'a BackendStats>) -> BackendStats {
    per_cpu.fold(BackendStats::default(), |mut sum, s| {
        sum.connections += s.connections;
        sum.connect_failures += s.connect_failures;
        sum.bytes_sent += s.bytes_sent;
        sum.bytes_received += s.bytes_received;
        sum.rtt_samples += s.rtt_samples;
        sum.rtt_sum_us += s.rtt_sum_us;
        for (total, count) in sum.rtt_buckets.iter_mut().zip(s.rtt_buckets) {
            *total += count;
        }
        sum
    })
}

/// How long a map write that fails with ENOMEM is retried before the error stands.
const ENOMEM_RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(2);

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

pub fn key_of_vip(vip: &Vip) -> ServiceKey {
    let (ip, family) = ip_bytes(vip.addr.ip());
    ServiceKey {
        ip,
        port: vip.addr.port(),
        proto: vip.proto,
        family,
    }
}

fn vip_of_key(key: &ServiceKey) -> anyhow::Result<Vip> {
    Ok(Vip {
        addr: SocketAddr::new(ip_of_bytes(&key.ip, key.family)?, key.port),
        proto: key.proto,
    })
}

fn backend_of_addr(addr: &SocketAddr) -> Backend {
    let (ip, family) = ip_bytes(addr.ip());
    Backend {
        ip,
        port: addr.port(),
        family,
        _pad: 0,
    }
}

fn addr_of_backend(backend: &Backend) -> anyhow::Result<SocketAddr> {
    Ok(SocketAddr::new(
        ip_of_bytes(&backend.ip, backend.family)?,
        backend.port,
    ))
}

fn ip_bytes(ip: IpAddr) -> ([u8; 16], u8) {
    let mut bytes = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => {
            bytes[..4].copy_from_slice(&v4.octets());
            (bytes, FAMILY_V4)
        }
        IpAddr::V6(v6) => (v6.octets(), FAMILY_V6),
    }
}

fn ip_of_bytes(bytes: &[u8; 16], family: u8) -> anyhow::Result<IpAddr> {
    match family {
        FAMILY_V4 => Ok(IpAddr::V4(Ipv4Addr::new(
            bytes[0], bytes[1], bytes[2], bytes[3],
        ))),
        FAMILY_V6 => Ok(IpAddr::V6(Ipv6Addr::from(*bytes))),
        other => bail!("unknown address family tag {other} in a map entry"),
    }
}

fn service_name(name: &str) -> ServiceName {
    let mut out = ServiceName::default();
    // Validation keeps names shorter than the field, so a terminating zero always remains.
    let len = name.len().min(SERVICE_NAME_LEN - 1);
    out.name[..len].copy_from_slice(&name.as_bytes()[..len]);
    out
}

fn name_of(name: &ServiceName) -> String {
    let end = name
        .name
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(name.name.len());
    String::from_utf8_lossy(&name.name[..end]).into_owned()
}

// Raw bpf(2) calls aya 0.14 does not expose: opening a pinned link as a plain fd, and
// BPF_LINK_UPDATE to swap the program behind an attached link.
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;

#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

/// The BPF_OBJ_PIN / BPF_OBJ_GET part of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
}

#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

fn bpf_syscall<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a repr(C) prefix of `union bpf_attr` for `cmd`, and its size is passed.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn link_create(
    program: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    attach_type: u32,
) -> anyhow::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: program.as_raw_fd() as u32,
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type,
        flags: 0,
    };
    let fd = bpf_syscall(BPF_LINK_CREATE, &mut attr).context("BPF_LINK_CREATE")?;
    // SAFETY: BPF_LINK_CREATE returned a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> anyhow::Result<()> {
    let cpath = CString::new(path.as_os_str().as_bytes())?;
    let mut attr = ObjGetAttr {
        pathname: cpath.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        ..Default::default()
    };
    bpf_syscall(BPF_OBJ_PIN, &mut attr).context("BPF_OBJ_PIN")?;
    Ok(())
}

fn obj_get(path: &Path) -> anyhow::Result<OwnedFd> {
    let cpath = CString::new(path.as_os_str().as_bytes())?;
    let mut attr = ObjGetAttr {
        pathname: cpath.as_ptr() as u64,
        ..Default::default()
    };
    let fd = bpf_syscall(BPF_OBJ_GET, &mut attr)
        .with_context(|| format!("opening pin {}", path.display()))?;
    // SAFETY: BPF_OBJ_GET returned a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn link_update(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: program.as_raw_fd() as u32,
        ..Default::default()
    };
    bpf_syscall(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_through_map_layout() {
        for addr in ["127.0.0.1:8081", "[fd00::1]:443"] {
            let addr: SocketAddr = addr.parse().unwrap();
            assert_eq!(addr_of_backend(&backend_of_addr(&addr)).unwrap(), addr);
            let vip = Vip { addr, proto: 6 };
            assert_eq!(vip_of_key(&key_of_vip(&vip)).unwrap(), vip);
        }
    }

    #[test]
    fn ipv4_keys_use_network_order_in_the_first_four_bytes() {
        let vip = Vip {
            addr: "127.100.0.1:80".parse().unwrap(),
            proto: 6,
        };
        let key = key_of_vip(&vip);
        assert_eq!(&key.ip[..4], &[127, 100, 0, 1]);
        assert!(key.ip[4..].iter().all(|&b| b == 0));
        assert_eq!(key.port, 80);
        assert_eq!(key.family, FAMILY_V4);
    }

    #[test]
    fn service_names_round_trip() {
        assert_eq!(name_of(&service_name("web-frontend")), "web-frontend");
    }

    #[test]
    fn orphan_slots_are_found() {
        let mut snap = Snapshot::default();
        let vip = Vip {
            addr: "127.100.0.1:80".parse().unwrap(),
            proto: 6,
        };
        snap.services.insert(
            vip,
            Service {
                id: 1,
                generation: 2,
                slot_count: 1,
                ..Default::default()
            },
        );
        let live = SlotKey {
            service_id: 1,
            generation: 2,
            slot: 0,
        };
        let stale = SlotKey {
            generation: 3,
            ..live
        };
        snap.slots.insert(live, 7);
        snap.slots.insert(stale, 7);
        snap.backends.insert(7, "127.0.0.1:1".parse().unwrap());
        let (applied, orphans) = snap.applied();
        assert_eq!(orphans, vec![stale]);
        assert_eq!(applied.services[&vip].slots, vec![7]);
    }
}
