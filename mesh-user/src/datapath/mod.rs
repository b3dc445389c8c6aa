//! The data path: the one owner of the eBPF object, its pinned maps and links. All raw map
//! layout, byte-order conversion, bpf(2)/netlink syscalls and `unsafe` of the agent live here,
//! and this module imports nothing of the agent but `model`.
//!
//! Pins live under `<bpffs>/v<LAYOUT_VERSION>/`: `maps/<map>` and `links/<program>`. Programs
//! stay attached and maps keep their content when the agent exits; a starting agent adopts
//! them, and `cleanup` removes them. A new layout version attaches its programs, and the old
//! version's links are removed only once the new maps hold the first state
//! (`remove_other_versions`), so a VIP is never without a program that translates it.

mod bpf;
mod kernel_btf;
pub mod layout;
mod lock;
mod log;
mod maps;
mod netns;
mod object;
mod ops;
mod reader;
pub mod sockdiag;
pub mod system;
pub mod tc;

use std::{
    fs,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use aya::{Ebpf, EbpfLoader, programs::Program};
use mesh_common::{LAYOUT_VERSION, capacity, map_names};
use tracing::info;

use self::object::EbpfObject;

pub use self::{
    lock::PinsLock,
    log::{KernelLogger, forward_kernel_log},
    maps::{Counters, Maps, Snapshot, service_range},
    ops::{MapOp, SlotBackend},
    reader::{MapReader, Pending, Poll},
};

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
];

/// Programs earlier agents of this layout version may have attached and this one does not:
/// their links are removed at load. (`tcp_outcome`, sock_ops: connection outcomes are now read
/// at release.)
const RETIRED_PROGRAMS: &[&str] = &["tcp_outcome"];

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
    map_names::TCP_PEERS,
    map_names::DATAPATH_STATS,
    map_names::PASSIVE,
    map_names::SETTINGS,
    map_names::EXT_SERVICES,
    map_names::NAT_FLOWS,
    map_names::NP_DEVICES,
    map_names::NP_STATS,
    map_names::NP_BACKEND_STATS,
    map_names::NP_EVENTS,
    SOCK_REV,
];

/// Where the pins of one layout version live.
#[derive(Clone, Debug)]
pub struct PinLayout {
    root: PathBuf,
}

impl PinLayout {
    pub fn new(bpffs: &Path) -> Self {
        Self::version(bpffs, layout_version())
    }

    fn version(bpffs: &Path, version: u32) -> Self {
        Self {
            root: bpffs.join(format!("v{version}")),
        }
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.root.join("maps").join(name.to_ascii_lowercase())
    }

    pub fn link(&self, program: &str) -> PathBuf {
        self.root.join("links").join(program)
    }
}

/// The layout version of the pins this binary writes. `MESH_TEST_LAYOUT_VERSION` overrides it,
/// only so the end-to-end tests can stage an agent of another layout version with one binary.
fn layout_version() -> u32 {
    std::env::var("MESH_TEST_LAYOUT_VERSION")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(LAYOUT_VERSION)
}

/// The loaded programs (attached through pinned links) and the maps.
pub struct Datapath {
    // Keeps the program fds open while the agent runs; the pinned links keep them attached.
    _ebpf: Ebpf,
    /// Taken by the agent's executor, their one writer.
    maps: Option<Maps>,
    /// Taken by the agent, which polls it.
    pub logger: Option<KernelLogger>,
}

/// Verbosity of the kernel programs' log records (the `aya_log` level number; 0 is off).
pub type KernelLogLevel = u8;

pub struct LoadOptions<'a> {
    pub bpffs: &'a Path,
    pub cgroup: &'a Path,
    pub capacities: capacity::Limits,
    pub kernel_log: KernelLogLevel,
    /// The external devices to attach the TC programs to; None: nodeport is off (any TC
    /// links pinned earlier are removed).
    pub nodeport_devices: Option<&'a [tc::Device]>,
    /// `SETTINGS_F_*` bits, fixed in the programs at load (the kernel reads no map for them).
    pub settings_flags: u32,
}

impl Datapath {
    /// Loads the programs, creates or reuses the pinned maps, and attaches the programs to the
    /// cgroup through pinned links. A link pinned by an earlier agent is updated in place to the
    /// new program (atomic: the cgroup is never without a program). Pins of other layout
    /// versions stay: the caller removes them (`remove_other_versions`) once it has written
    /// its first state into this version's maps.
    pub fn load(opts: &LoadOptions<'_>) -> anyhow::Result<Self> {
        let access = kernel_btf::socket_access()?;
        let object = EbpfObject::for_kernel(access.kfuncs)?;
        let layout = PinLayout::new(opts.bpffs);
        for dir in [layout.map("x"), layout.link("x")] {
            let dir = dir.parent().expect("pin paths have a parent");
            system::create_private_dir(dir, true)?;
        }
        let table = opts.capacities.table();
        let mut loader = EbpfLoader::new();
        // Records above this level are skipped in the kernel before any work is done.
        loader.override_global(aya_log::LEVEL, &opts.kernel_log, true);
        loader.override_global("TCP_SOCK_FIELDS", &access.fields, true);
        loader.override_global("SETTINGS_FLAGS", &opts.settings_flags, true);
        for entry in table.iter().filter(|c| c.from_limits) {
            loader.map_max_entries(entry.map, entry.max_entries);
        }
        for &name in MAPS {
            loader.map_pin_path(name, layout.map(name));
        }
        let mut ebpf = loader
            .load(object.bytes())
            .context("loading the eBPF object")?;
        check_capacities(&layout, &table)?;

        let cgroup = fs::File::open(opts.cgroup)
            .with_context(|| format!("opening cgroup {}", opts.cgroup.display()))?;
        for &(name, attach_type) in PROGRAMS {
            let program = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the eBPF object"))?;
            attach(program, attach_type, &cgroup, &layout.link(name))
                .with_context(|| format!("attaching {name} to {}", opts.cgroup.display()))?;
        }
        for name in RETIRED_PROGRAMS {
            let pin = layout.link(name);
            if pin.exists() {
                fs::remove_file(&pin).with_context(|| format!("removing {}", pin.display()))?;
                info!(pin = %pin.display(), "detached a program this version no longer has");
            }
        }
        match opts.nodeport_devices {
            Some(devices) => tc::attach(&mut ebpf, &layout, devices)?,
            None => tc::detach_all(&layout)?,
        }
        let maps = Maps::take(&mut ebpf, opts.nodeport_devices.is_some())?;
        let logger = aya_log::EbpfLogger::init(&mut ebpf).context("kernel log ring buffer")?;
        Ok(Self {
            _ebpf: ebpf,
            maps: Some(maps),
            logger: Some(logger),
        })
    }

    /// The typed map handles, once.
    pub fn take_maps(&mut self) -> Option<Maps> {
        self.maps.take()
    }
}

/// Loads `program` and attaches it to `cgroup` through the link pinned at `pin`. A link pinned
/// by an earlier agent is updated in place to the new program with `BPF_F_REPLACE`.
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
        let link = bpf::obj_get(pin)?;
        bpf::link_replace(link.as_fd(), program_fd)
            .with_context(|| format!("replacing the program of pinned link {}", pin.display()))?;
    } else {
        let link = bpf::link_create(program_fd, cgroup.as_fd(), attach_type)?;
        bpf::obj_pin(link.as_fd(), pin)
            .with_context(|| format!("pinning link {}", pin.display()))?;
    }
    Ok(())
}

/// Removes the links (detaching their programs) and maps of every other layout version under
/// `bpffs`. Call it once this version's programs are attached *and* its maps hold the first
/// state: until then the new programs find no VIP and pass connects through untranslated, so
/// the old ones must keep translating. Meanwhile a connect meets both (the old ones first; a
/// rewritten address is no VIP for the new ones).
pub fn remove_other_versions(bpffs: &Path) -> anyhow::Result<()> {
    let current = PinLayout::new(bpffs);
    let Ok(entries) = fs::read_dir(bpffs) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(version) = name
            .to_str()
            .and_then(|n| n.strip_prefix('v'))
            .and_then(|v| v.parse::<u32>().ok())
        else {
            continue;
        };
        let old = PinLayout::version(bpffs, version);
        if old.root == current.root {
            continue;
        }
        let removed = remove_pins(&old)?;
        info!(
            version,
            pins = removed.len(),
            "removed the pins of an older layout version (its programs are detached)"
        );
    }
    Ok(())
}

/// A reused pin keeps the capacity it was created with; say so instead of failing later.
fn check_capacities(layout: &PinLayout, table: &[capacity::MapCapacity]) -> anyhow::Result<()> {
    for entry in table.iter().filter(|c| c.from_limits) {
        let info = aya::maps::MapInfo::from_pin(layout.map(entry.map))?;
        if info.max_entries() != entry.max_entries {
            bail!(
                "pinned map {} holds {} entries but the config asks for {}; \
                 run `mesh cleanup` to recreate the maps with the new limits",
                layout.map(entry.map).display(),
                info.max_entries(),
                entry.max_entries
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

/// Removes the pinned links (which detaches the programs) and maps of this layout version.
pub fn cleanup(bpffs: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let removed = remove_pins(&PinLayout::new(bpffs))?;
    // Only an empty directory goes: anything else there is not ours.
    let _ = fs::remove_dir(bpffs);
    Ok(removed)
}

fn remove_pins(layout: &PinLayout) -> anyhow::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let pins = PROGRAMS
        .iter()
        .map(|&(program, _)| program)
        .chain(RETIRED_PROGRAMS.iter().copied())
        .map(|program| layout.link(program))
        .chain(tc::tc_link_pins(layout)?)
        .chain(MAPS.iter().map(|&name| layout.map(name)));
    for pin in pins {
        if pin.exists() {
            fs::remove_file(&pin).with_context(|| format!("removing {}", pin.display()))?;
            removed.push(pin);
        }
    }
    for dir in [
        layout.link("x").parent().map(Path::to_path_buf),
        layout.map("x").parent().map(Path::to_path_buf),
        Some(layout.root.clone()),
    ]
    .into_iter()
    .flatten()
    {
        let _ = fs::remove_dir(&dir);
    }
    Ok(removed)
}
