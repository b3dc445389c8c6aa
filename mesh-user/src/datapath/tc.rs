//! The TC programs on the node's external devices (traffic from other hosts to external
//! services): finding the devices, attaching the programs through pinned TCX links, telling
//! the programs each device's address, and expiring idle flows from `nat_flows`.
//!
//! Links are pinned as `links/tc-<program>@<device>` and, like the cgroup links, outlive the
//! agent; a restarted agent swaps the program inside them, and removes the links of devices
//! no longer in its set. `mesh cleanup` removes them all (detaching the programs).

use std::{
    collections::BTreeSet,
    fs,
    net::Ipv4Addr,
    os::fd::AsFd as _,
    path::Path,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    maps::{HashMap, Map, MapData, PerCpuArray},
    programs::Program,
};
use mesh_common::{
    map_names,
    nodeport::{
        FlowKey, FlowTimeouts, NAT_F_REPLY, NatEntry, NodeportDevice, NodeportEvents,
        NodeportStats, pair_expired, reply_key,
    },
};
use tracing::{info, warn};

use super::{PinLayout, bpf};

/// The TC programs and their TCX attach types (`enum bpf_attach_type`).
pub const TC_PROGRAMS: &[(&str, u32)] = &[
    ("nodeport_ingress", 46), // BPF_TCX_INGRESS
    ("nodeport_egress", 47),  // BPF_TCX_EGRESS
];

/// Pinned TC links are named `tc-<program>@<device>`.
const LINK_PREFIX: &str = "tc-";

/// An external device: where traffic from other hosts arrives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    pub name: String,
    pub ifindex: u32,
    /// The source of SNATed flows leaving through it (its first IPv4 address).
    pub ipv4: Option<Ipv4Addr>,
}

/// The devices to attach to: `names` if given (each must exist), else every device that holds
/// one of the node's IPv4 addresses (not loopback, not link-local), as kube-proxy and Cilium
/// find the node's devices.
pub fn devices(names: &[String]) -> anyhow::Result<Vec<Device>> {
    let mut found: Vec<Device> = Vec::new();
    let addrs = nix::ifaddrs::getifaddrs().context("listing the node's addresses")?;
    let mut v4: Vec<(String, Ipv4Addr, bool)> = Vec::new();
    for ifa in addrs {
        let loopback = ifa
            .flags
            .contains(nix::net::if_::InterfaceFlags::IFF_LOOPBACK);
        if let Some(ip) = ifa
            .address
            .as_ref()
            .and_then(|a| a.as_sockaddr_in())
            .map(|a| a.ip())
        {
            v4.push((ifa.interface_name.clone(), ip, loopback));
        }
    }
    let node_address = |ip: &Ipv4Addr, loopback: bool| {
        !loopback && !ip.is_loopback() && !ip.is_link_local() && !ip.is_unspecified()
    };
    let wanted: Vec<String> = if names.is_empty() {
        let mut auto = Vec::new();
        for (name, ip, loopback) in &v4 {
            if node_address(ip, *loopback) && !auto.contains(name) {
                auto.push(name.clone());
            }
        }
        auto
    } else {
        names.to_vec()
    };
    for name in wanted {
        let ifindex = nix::net::if_::if_nametoindex(name.as_str())
            .with_context(|| format!("[agent.nodeport] device {name:?} does not exist"))?;
        let ipv4 = v4
            .iter()
            .find(|(n, ip, lo)| *n == name && node_address(ip, *lo))
            .map(|(_, ip, _)| *ip);
        found.push(Device {
            name,
            ifindex,
            ipv4,
        });
    }
    Ok(found)
}

fn link_name(program: &str, device: &str) -> String {
    format!("{LINK_PREFIX}{program}@{device}")
}

/// Loads the TC programs and attaches them to `devices` through pinned TCX links (updating
/// the program inside links an earlier agent pinned), removes the links of other devices, and
/// writes the devices' addresses for the programs.
pub(super) fn attach(
    ebpf: &mut Ebpf,
    layout: &PinLayout,
    devices: &[Device],
) -> anyhow::Result<()> {
    let mut keep = BTreeSet::new();
    for &(name, attach_type) in TC_PROGRAMS {
        let program = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from the eBPF object"))?;
        let Program::SchedClassifier(p) = program else {
            bail!("program {name} is not a TC classifier");
        };
        p.load().with_context(|| format!("loading {name}"))?;
        let program_fd = p.fd()?.as_fd();
        for dev in devices {
            let pin = layout.link(&link_name(name, &dev.name));
            keep.insert(pin.clone());
            if pin.exists() {
                let replaced = bpf::obj_get(&pin)
                    .and_then(|link| Ok(bpf::link_replace(link.as_fd(), program_fd)?));
                match replaced {
                    Ok(()) => continue,
                    // The device was recreated (the old link is defunct): attach anew.
                    Err(err) => {
                        warn!(pin = %pin.display(), "replacing the TC link failed ({err:#}); attaching anew");
                        fs::remove_file(&pin)
                            .with_context(|| format!("removing {}", pin.display()))?;
                    }
                }
            }
            let link = bpf::link_create_ifindex(program_fd, dev.ifindex, attach_type)
                .with_context(|| format!("attaching {name} to device {}", dev.name))?;
            bpf::obj_pin(link.as_fd(), &pin)
                .with_context(|| format!("pinning link {}", pin.display()))?;
        }
    }
    for stale in tc_link_pins(layout)? {
        if !keep.contains(&stale) {
            fs::remove_file(&stale).with_context(|| format!("removing {}", stale.display()))?;
            info!(pin = %stale.display(), "detached the TC program of a device no longer in the set");
        }
    }
    let map = ebpf
        .map_mut(map_names::NP_DEVICES)
        .context("map NP_DEVICES missing from the eBPF object")?;
    let mut map: HashMap<&mut MapData, u32, NodeportDevice> = HashMap::try_from(map)?;
    let old: Vec<u32> = map.keys().filter_map(Result::ok).collect();
    for ifindex in old {
        if !devices.iter().any(|d| d.ifindex == ifindex) {
            map.remove(&ifindex)?;
        }
    }
    for dev in devices {
        let ipv4 = dev.ipv4.map_or([0; 4], |ip| ip.octets());
        map.insert(dev.ifindex, NodeportDevice { ipv4 }, 0)?;
    }
    Ok(())
}

/// The pinned TC links of this layout version.
pub(super) fn tc_link_pins(layout: &PinLayout) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let dir = layout.link("x");
    let dir = dir.parent().expect("pin paths have a parent");
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(Vec::new());
    };
    Ok(entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(LINK_PREFIX))
        .map(|e| e.path())
        .collect())
}

/// Detaches every TC program of this layout version (nodeport turned off).
pub(super) fn detach_all(layout: &PinLayout) -> anyhow::Result<()> {
    for pin in tc_link_pins(layout)? {
        fs::remove_file(&pin).with_context(|| format!("removing {}", pin.display()))?;
        info!(pin = %pin.display(), "detached a TC program ([agent.nodeport] enabled = false)");
    }
    Ok(())
}

/// Flows expired by the agent since it started.
static FLOWS_EXPIRED: AtomicU64 = AtomicU64::new(0);
/// Flows (client-direction entries) in `nat_flows` at the last expiry pass.
static FLOWS_LIVE: AtomicU64 = AtomicU64::new(0);

/// What the TC layer counted, for /metrics.
pub struct NodeportCounters {
    pub stats: NodeportStats,
    /// ICMP counters (the rate limiter's window fields are meaningless summed).
    pub icmp: NodeportEvents,
    pub flows_live: u64,
    pub flows_expired: u64,
}

/// The TC programs' node-wide counters, summed over CPUs; None when the maps are not pinned.
pub fn counters(bpffs: &Path) -> anyhow::Result<Option<NodeportCounters>> {
    let path = PinLayout::new(bpffs).map(map_names::NP_STATS);
    if !path.exists() {
        return Ok(None);
    }
    let data = MapData::from_pin(&path)?;
    let map: PerCpuArray<MapData, NodeportStats> =
        PerCpuArray::try_from(Map::from_map_data(data)?)?;
    let per_cpu = map.get(&0, 0)?;
    let mut s = NodeportStats::default();
    for c in per_cpu.iter() {
        s.flows_created += c.flows_created;
        s.no_backend += c.no_backend;
        s.flow_failures += c.flow_failures;
        s.packets_in += c.packets_in;
        s.bytes_in += c.bytes_in;
        s.packets_out += c.packets_out;
        s.bytes_out += c.bytes_out;
        s.fib_misses += c.fib_misses;
    }
    let path = PinLayout::new(bpffs).map(map_names::NP_EVENTS);
    let map: PerCpuArray<MapData, NodeportEvents> =
        PerCpuArray::try_from(Map::from_map_data(MapData::from_pin(&path)?)?)?;
    let mut icmp = NodeportEvents::default();
    for c in map.get(&0, 0)?.iter() {
        icmp.unreachable_sent += c.unreachable_sent;
        icmp.rate_limited += c.rate_limited;
        icmp.errors_translated += c.errors_translated;
        icmp.flows_reopened += c.flows_reopened;
        icmp.ports_remapped += c.ports_remapped;
    }
    Ok(Some(NodeportCounters {
        stats: s,
        icmp,
        flows_live: FLOWS_LIVE.load(Ordering::Relaxed),
        flows_expired: FLOWS_EXPIRED.load(Ordering::Relaxed),
    }))
}

/// Entries (both directions of every flow) in the pinned `nat_flows`; None when not pinned.
pub fn nat_flow_entries(bpffs: &Path) -> anyhow::Result<Option<usize>> {
    let path = PinLayout::new(bpffs).map(map_names::NAT_FLOWS);
    if !path.exists() {
        return Ok(None);
    }
    let map: HashMap<MapData, FlowKey, NatEntry> =
        HashMap::try_from(Map::from_map_data(MapData::from_pin(&path)?)?)?;
    Ok(Some(map.keys().filter(Result::is_ok).count()))
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write; CLOCK_MONOTONIC is bpf_ktime_get_ns()'s clock.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// One expiry pass over `nat_flows`: deletes both entries of every idle flow (and reply
/// entries whose client direction is gone and that are idle themselves). Returns (live flows,
/// expired flows).
fn expire_pass(map: &mut HashMap<MapData, FlowKey, NatEntry>, t: &FlowTimeouts) -> (u64, u64) {
    let now = monotonic_ns();
    let entries: Vec<(FlowKey, NatEntry)> = map.iter().filter_map(Result::ok).collect();
    let (mut live, mut expired) = (0, 0);
    for (key, entry) in &entries {
        if entry.flags & NAT_F_REPLY != 0 {
            continue;
        }
        let rkey = reply_key(entry, key.proto);
        let rev = map.get(&rkey, 0).ok();
        if pair_expired(key, entry, rev.as_ref(), now, t) {
            let _ = map.remove(key);
            let _ = map.remove(&rkey);
            expired += 1;
        } else {
            live += 1;
        }
    }
    for (key, entry) in &entries {
        if entry.flags & NAT_F_REPLY != 0
            && mesh_common::nodeport::flow_expired(key, entry, now, t)
            && map.get(key, 0).is_ok()
        {
            // Its client direction was evicted or expired: nothing will delete it otherwise.
            let _ = map.remove(key);
        }
    }
    (live, expired)
}

/// Expires idle flows every `every` on a thread of its own (map syscalls never run on the
/// async runtime). Runs for the agent's lifetime.
pub fn spawn_expiry(bpffs: &Path, t: FlowTimeouts, every: Duration) -> anyhow::Result<()> {
    let path = PinLayout::new(bpffs).map(map_names::NAT_FLOWS);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening pinned map {}", path.display()))?;
    let mut map: HashMap<MapData, FlowKey, NatEntry> =
        HashMap::try_from(Map::from_map_data(data)?)?;
    std::thread::Builder::new()
        .name("mesh-flow-expiry".into())
        .spawn(move || {
            loop {
                std::thread::sleep(every);
                let (live, expired) = expire_pass(&mut map, &t);
                FLOWS_LIVE.store(live, Ordering::Relaxed);
                FLOWS_EXPIRED.fetch_add(expired, Ordering::Relaxed);
            }
        })
        .context("starting the flow expiry thread")?;
    Ok(())
}
