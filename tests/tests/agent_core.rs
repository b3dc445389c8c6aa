//! The agent core end to end: the periodic resync repairs the maps, a thousand random edits
//! leave exactly the desired entries in every map, a pair that leaves takes its kernel state
//! with it, one agent per pins directory, SIGHUP, logs without colour codes, a pin layout
//! upgrade without a gap, a failed map write answered as such and retried, coalesced admin API
//! changes, and `/metrics` answering quickly while 10,000 services are applied.
//!
//! Every assertion reads what really happened: the pinned maps through `bpftool`, connects of
//! real clients in the test cgroup to real backends, the agent's own `/metrics` and log.
//!
//! Privileged: run as root through `cargo xtask test` (single-threaded; the harness serializes
//! the tests anyway). Each test uses its own VIPs (127.100.70-79.*; the 10,000-service test
//! 127.100.0.0/16 and 127.101.0.0/16), cgroup and bpffs directory.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Display;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use std::process::Command;
use std::time::{Duration, Instant};

use integration_tests::admin::{AdminApi, free_loopback_addr};
use integration_tests::agent::strip_ansi;
use integration_tests::maps::{LAYOUT_DIR, map_delete, map_dump, map_len, map_update, raw_keys};
use integration_tests::observe::{log_line_time, metric_value, now_epoch_secs};
use integration_tests::process::{run_bounded, send_signal};
use integration_tests::tools::{formatted_entries, run_in_pty, shell_quote};
use integration_tests::{
    Agent, BpffsDir, CgroupGuard, ClientLoop, ServiceSpec, TcpBackend, TempDir, TestEnv,
    UdpBackend, assert_split, mesh_bin, render_config, run_probe_in, serial, services,
    wait_for_backends, wait_until,
};

/// How long a client loop may run at most (they are stopped long before).
const LOOP_LIMIT: Duration = Duration::from_secs(60);

fn sock(addr: &str) -> SocketAddr {
    addr.parse()
        .unwrap_or_else(|e| panic!("{addr:?} is not IP:PORT: {e}"))
}

/// The config file: `services`, then `[agent]` with `agent_toml` (and whatever tables follow).
fn with_agent(services: &[ServiceSpec], agent_toml: &str) -> String {
    format!("{}\n[agent]\n{agent_toml}", render_config(services))
}

fn tcp_service(name: &str, vip: impl Display, backends: &[&TcpBackend]) -> ServiceSpec {
    ServiceSpec::tcp(name, vip).backends(backends.iter().map(|b| b.addr()))
}

fn addrs(backends: &[&TcpBackend]) -> Vec<SocketAddr> {
    backends.iter().map(|b| b.addr()).collect()
}

/// The value of `name{labels}` in the agent's `/metrics` (0 when the series is not there yet:
/// labelled counters appear with their first increment).
fn metric(agent: &Agent, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_value(&agent.metrics_text(), name, labels).unwrap_or(0.0)
}

/// Returns once the agent has finished one more resync run; panics after `within`.
fn wait_for_a_resync(agent: &Agent, within: Duration) {
    let runs = |agent: &Agent| metric(agent, "mesh_resync_runs_total", &[("result", "ok")]);
    let before = runs(agent);
    assert!(
        wait_until(within, || runs(agent) > before),
        "no resync within {within:?}"
    );
}

fn reconcile_runs(agent: &Agent) -> f64 {
    let text = agent.metrics_text();
    ["ok", "error"]
        .iter()
        .map(|r| metric_value(&text, "mesh_reconcile_runs_total", &[("result", r)]).unwrap_or(0.0))
        .sum()
}

/// (desired, applied) generation from `/metrics`.
fn generations(agent: &Agent) -> (f64, f64) {
    let text = agent.metrics_text();
    (
        metric_value(&text, "mesh_desired_generation", &[]).unwrap_or(-1.0),
        metric_value(&text, "mesh_applied_generation", &[]).unwrap_or(-1.0),
    )
}

// ---------------------------------------------------------------------------------------------
// The maps, as `bpftool map dump -j` prints them (BTF-formatted), typed
// ---------------------------------------------------------------------------------------------

/// (service id, backend id): the key of `backend_stats`, `active` and `passive`.
type Pair = (u32, u32);
/// (VIP, IP protocol number): the key of `services`.
type VipKey = (SocketAddr, u8);
/// (service id, generation, slot): the key of `slots`.
type SlotKey = (u32, u32, u32);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ServiceEntry {
    id: u32,
    generation: u32,
    slot_count: u32,
}

fn num(value: &serde_json::Value, what: &str) -> u32 {
    value
        .as_u64()
        .and_then(|v| u32::try_from(v).ok())
        .unwrap_or_else(|| panic!("{what} is not a u32: {value}"))
}

/// `{"ip": [16 bytes], "port": P, "family": 4|6}` as a socket address.
fn addr_of(value: &serde_json::Value) -> SocketAddr {
    let bytes: Vec<u8> = value["ip"]
        .as_array()
        .unwrap_or_else(|| panic!("no ip bytes in {value}"))
        .iter()
        .map(|b| u8::try_from(num(b, "an ip byte")).expect("a byte"))
        .collect();
    let port = u16::try_from(num(&value["port"], "port")).expect("a port");
    let ip = match num(&value["family"], "family") {
        4 => IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])),
        6 => {
            let octets: [u8; 16] = bytes.try_into().expect("16 bytes");
            IpAddr::from(octets)
        }
        other => panic!("unknown family {other} in {value}"),
    };
    SocketAddr::new(ip, port)
}

fn services_map(bpffs: &BpffsDir) -> BTreeMap<VipKey, ServiceEntry> {
    formatted_entries(&map_dump(bpffs, "services"))
        .iter()
        .map(|e| {
            let key = (
                addr_of(&e["key"]),
                u8::try_from(num(&e["key"]["proto"], "proto")).expect("a byte"),
            );
            let v = &e["value"];
            let entry = ServiceEntry {
                id: num(&v["id"], "id"),
                generation: num(&v["generation"], "generation"),
                slot_count: num(&v["slot_count"], "slot_count"),
            };
            (key, entry)
        })
        .collect()
}

/// Slot -> (backend id, the backend address the slot carries).
fn slots_map(bpffs: &BpffsDir) -> BTreeMap<SlotKey, (u32, SocketAddr)> {
    formatted_entries(&map_dump(bpffs, "slots"))
        .iter()
        .map(|e| {
            let k = &e["key"];
            (
                (
                    num(&k["service_id"], "service_id"),
                    num(&k["generation"], "generation"),
                    num(&k["slot"], "slot"),
                ),
                (
                    num(&e["value"]["backend_id"], "backend id"),
                    addr_of(&e["value"]["backend"]),
                ),
            )
        })
        .collect()
}

fn backends_map(bpffs: &BpffsDir) -> BTreeMap<u32, SocketAddr> {
    formatted_entries(&map_dump(bpffs, "backends"))
        .iter()
        .map(|e| (num(&e["key"], "backend id"), addr_of(&e["value"])))
        .collect()
}

fn pair_of(key: &serde_json::Value) -> Pair {
    (
        num(&key["service_id"], "service_id"),
        num(&key["backend_id"], "backend_id"),
    )
}

/// Keys of a map keyed by (service, backend), with each entry's formatted value (`values` per
/// CPU for per-CPU maps).
fn pair_map(bpffs: &BpffsDir, name: &str) -> BTreeMap<Pair, serde_json::Value> {
    formatted_entries(&map_dump(bpffs, name))
        .into_iter()
        .map(|e| {
            let value = e.get("value").or_else(|| e.get("values")).cloned();
            (pair_of(&e["key"]), value.unwrap_or_default())
        })
        .collect()
}

fn active_map(bpffs: &BpffsDir) -> BTreeMap<Pair, u32> {
    pair_map(bpffs, "active")
        .into_iter()
        .map(|(k, v)| (k, num(&v, "active slots")))
        .collect()
}

/// (service, backend) -> consecutive failed connects the kernel counted.
fn passive_map(bpffs: &BpffsDir) -> BTreeMap<Pair, u32> {
    pair_map(bpffs, "passive")
        .into_iter()
        .map(|(k, v)| (k, num(&v["consecutive_failures"], "consecutive_failures")))
        .collect()
}

/// The id of the one service in the maps.
fn only_service_id(bpffs: &BpffsDir) -> u32 {
    services_map(bpffs)
        .values()
        .next()
        .expect("the service entry")
        .id
}

/// (service, backend) -> failed connects (`backend_stats.connect_failures`).
fn connect_failures(bpffs: &BpffsDir) -> BTreeMap<Pair, u64> {
    pair_map(bpffs, "backend_stats")
        .into_iter()
        .map(|(k, stats)| {
            let failures = stats["connect_failures"]
                .as_u64()
                .unwrap_or_else(|| panic!("backend_stats has no connect_failures: {stats}"));
            (k, failures)
        })
        .collect()
}

/// (service id, backend id) of every `affinity` entry.
fn affinity_entries(bpffs: &BpffsDir) -> Vec<Pair> {
    formatted_entries(&map_dump(bpffs, "affinity"))
        .iter()
        .map(|e| {
            (
                num(&e["key"]["service_id"], "service_id"),
                num(&e["value"]["backend_id"], "backend_id"),
            )
        })
        .collect()
}

fn id_of(backends: &BTreeMap<u32, SocketAddr>, addr: SocketAddr) -> Option<u32> {
    backends
        .iter()
        .find_map(|(&id, &a)| (a == addr).then_some(id))
}

/// The dumps of `services`, `slots` and `backends`, formatted, for before/after comparisons.
fn core_maps(bpffs: &BpffsDir) -> [BTreeSet<String>; 3] {
    ["services", "slots", "backends"].map(|name| {
        formatted_entries(&map_dump(bpffs, name))
            .iter()
            .map(serde_json::Value::to_string)
            .collect()
    })
}

fn greatest_common_divisor(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        greatest_common_divisor(b, a % b)
    }
}

/// Slots per backend of a slot set with these weights: each weight divided by their gcd.
fn reduced(weights: &BTreeMap<SocketAddr, u32>) -> BTreeMap<SocketAddr, u32> {
    let g = weights
        .values()
        .fold(0, |g, &w| greatest_common_divisor(g, w));
    weights.iter().map(|(&a, &w)| (a, w / g.max(1))).collect()
}

// ---------------------------------------------------------------------------------------------
// 1. The periodic resync repairs entries deleted behind the agent's back
// ---------------------------------------------------------------------------------------------

/// Deletes, with bpftool, the first `services` entry, the slot at `slot` of the live set and
/// the `backends` entry of `backend`. Returns what was deleted, for messages.
fn delete_behind_the_agents_back(
    env: &TestEnv,
    slot: u32,
    backend: SocketAddr,
) -> Vec<serde_json::Value> {
    let mut deleted = Vec::new();
    let services = raw_keys(&map_dump(&env.bpffs, "services"));
    let (key, formatted) = services.first().expect("a services entry").clone();
    map_delete(&env.bpffs, "services", &key);
    deleted.push(formatted);
    let slots = raw_keys(&map_dump(&env.bpffs, "slots"));
    let (key, formatted) = slots
        .iter()
        .find(|(_, f)| f["key"]["slot"] == slot)
        .unwrap_or_else(|| panic!("no slot {slot} in {slots:?}"))
        .clone();
    map_delete(&env.bpffs, "slots", &key);
    deleted.push(formatted);
    let backends = raw_keys(&map_dump(&env.bpffs, "backends"));
    let (key, formatted) = backends
        .iter()
        .find(|(_, f)| addr_of(&f["value"]) == backend)
        .unwrap_or_else(|| panic!("no backend {backend} in {backends:?}"))
        .clone();
    map_delete(&env.bpffs, "backends", &key);
    deleted.push(formatted);
    deleted
}

#[test]
fn resync_repairs_entries_deleted_behind_the_agents_back() {
    let a = TcpBackend::start("rs-a");
    let b = TcpBackend::start("rs-b");
    let c = TcpBackend::start("rs-c");
    let vip = "127.100.70.1:80";
    let env = TestEnv::start(
        "resync",
        &with_agent(
            &[tcp_service("repaired", vip, &[&a, &b, &c])],
            "resync = \"200ms\"\n",
        ),
    );
    assert_split(&env.connect(vip, 30), &[(&a, 10), (&b, 10), (&c, 10)]);
    let before = core_maps(&env.bpffs);
    assert_eq!(
        before.each_ref().map(BTreeSet::len),
        [1, 3, 3],
        "one service, three slots, three backends: {before:#?}"
    );

    let deleted = delete_behind_the_agents_back(&env, 1, b.addr());
    let deleted_at = Instant::now();
    let mut last = None;
    let repaired = wait_until(Duration::from_secs(5), || {
        let now = core_maps(&env.bpffs);
        let same = now == before;
        last = Some(now);
        same
    });
    let took = deleted_at.elapsed();
    assert!(
        repaired,
        "the maps were not repaired within 5 s of deleting {deleted:#?}; now {last:#?}, before \
         {before:#?}"
    );
    let mut repairs = BTreeMap::new();
    let counted = wait_until(Duration::from_secs(2), || {
        let text = env.agent.metrics_text();
        repairs = ["services", "slots", "backends", "backend_stats", "active"]
            .iter()
            .map(|m| {
                let n =
                    metric_value(&text, "mesh_resync_repairs_total", &[("map", m)]).unwrap_or(0.0);
                (*m, n)
            })
            .collect();
        ["services", "slots", "backends"]
            .iter()
            .all(|m| repairs[m] >= 1.0)
    });
    let runs = metric(&env.agent, "mesh_resync_runs_total", &[("result", "ok")]);
    println!(
        "resync (period 200 ms): 3 entries deleted with bpftool, all back after {took:?}; \
         repairs by map {repairs:?}; {runs} resync runs so far"
    );
    assert!(counted, "mesh_resync_repairs_total by map: {repairs:?}");
    assert_eq!(
        (repairs["services"], repairs["slots"], repairs["backends"]),
        (1.0, 1.0, 1.0),
        "each deleted entry is repaired once: {repairs:?}"
    );
    assert_eq!(
        (repairs["backend_stats"], repairs["active"]),
        (0.0, 0.0),
        "nothing else differed: {repairs:?}"
    );
    assert!(
        took < Duration::from_secs(1),
        "the repair took {took:?}, the resync period is 200 ms"
    );
    let warned = env
        .agent
        .log_text()
        .lines()
        .any(|l| l.contains("WARN") && l.contains("resync") && l.contains("repaired"));
    assert!(warned, "no WARN line about the repair in the log");
    // The exact round-robin split again (the rewritten entry points at the same slots).
    assert_split(&env.connect(vip, 300), &[(&a, 100), (&b, 100), (&c, 100)]);
}

/// The kernel takes a connect's backend address from the slot itself (one map read per
/// connect), so a slot whose address was overwritten from outside the agent sends traffic
/// there, and the resync writes it again from the backend's entry.
#[test]
fn resync_rewrites_a_slot_whose_address_was_overwritten() {
    let a = TcpBackend::start("sv-a");
    let b = TcpBackend::start("sv-b");
    let vip = "127.100.70.9:80";
    let env = TestEnv::start(
        "slotvalue",
        &with_agent(
            &[tcp_service("rewritten", vip, &[&a, &b])],
            "resync = \"2s\"\n",
        ),
    );
    assert_split(&env.connect(vip, 10), &[(&a, 5), (&b, 5)]);
    let before = slots_map(&env.bpffs);
    let b_id = id_of(&backends_map(&env.bpffs), b.addr()).expect("b's backend id");

    // Right after a resync: the next one is 2 s away.
    wait_for_a_resync(&env.agent, Duration::from_secs(5));
    let window = Instant::now();
    let dump = map_dump(&env.bpffs, "slots");
    let (key, mut value) = dump
        .as_array()
        .expect("a list")
        .iter()
        .zip(raw_keys(&dump))
        .find(|(_, (_, f))| f["value"]["backend_id"] == b_id)
        .map(|(entry, (key, _))| {
            (
                key,
                integration_tests::maps::parse_bytes(&entry["value"]).expect("value bytes"),
            )
        })
        .unwrap_or_else(|| panic!("no slot of backend {b_id} in {dump}"));
    // The value: backend id (4 bytes), ip (16), port (2, host order), family, pad.
    assert_eq!(value.len(), 24, "slot value {value:?}");
    value[20..22].copy_from_slice(&a.addr().port().to_ne_bytes());
    map_update(&env.bpffs, "slots", &key, &value);
    let overwritten = env.connect(vip, 10);
    let took = window.elapsed();
    assert!(
        took < Duration::from_millis(1500),
        "the overwrite and the connects took {took:?}: a resync may have come in between"
    );
    assert_split(&overwritten, &[(&a, 10)]);

    let repaired = wait_until(Duration::from_secs(5), || slots_map(&env.bpffs) == before);
    assert!(
        repaired,
        "the slot was not written again: {:?}, before {before:?}",
        slots_map(&env.bpffs)
    );
    assert!(metric(&env.agent, "mesh_resync_repairs_total", &[("map", "slots")]) >= 1.0);
    assert_split(&env.connect(vip, 10), &[(&a, 5), (&b, 5)]);
}

/// The control for the test above: without a resync (1 h), nothing else puts a deleted entry
/// back, so a repair seen there is the resync's.
#[test]
fn without_a_resync_an_entry_deleted_behind_the_agents_back_stays_gone() {
    let a = TcpBackend::start("nors-a");
    let b = TcpBackend::start("nors-b");
    let vip = "127.100.70.2:80";
    let env = TestEnv::start(
        "no-resync",
        &with_agent(
            &[tcp_service("unrepaired", vip, &[&a, &b])],
            "resync = \"1h\"\n",
        ),
    );
    assert_split(&env.connect(vip, 10), &[(&a, 5), (&b, 5)]);
    let services = raw_keys(&map_dump(&env.bpffs, "services"));
    map_delete(&env.bpffs, "services", &services[0].0);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        services_map(&env.bpffs).is_empty(),
        "the deleted entry came back without a resync"
    );
    // The VIP is no longer translated: nobody listens on it.
    let result = env.connect(vip, 4);
    assert_eq!(
        result.errors(),
        vec!["ECONNREFUSED"; 4],
        "{:?}",
        result.lines
    );
    assert_eq!((a.accepted(), b.accepted()), (5, 5));
    assert_eq!(
        metric(&env.agent, "mesh_resync_runs_total", &[("result", "ok")]),
        0.0
    );
}

// ---------------------------------------------------------------------------------------------
// 2. A thousand random edits leave exactly the desired state in every map
// ---------------------------------------------------------------------------------------------

/// SplitMix64: a small seeded generator, so a failing sequence of edits can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).expect("fits")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// TCP with session affinity.
    Affinity,
    Udp,
    /// TCP with active tcp checks and passive detection.
    Checked,
    Plain,
}

#[derive(Debug, Clone)]
struct PoolService {
    name: String,
    vip: SocketAddr,
    kind: Kind,
}

impl PoolService {
    fn proto(&self) -> u8 {
        if self.kind == Kind::Udp { 17 } else { 6 }
    }

    fn body(&self, backends: &BTreeMap<SocketAddr, u32>) -> String {
        let backends: Vec<serde_json::Value> = backends
            .iter()
            .map(|(addr, weight)| serde_json::json!({ "addr": addr.to_string(), "weight": weight }))
            .collect();
        let mut body = serde_json::json!({
            "vip": self.vip.to_string(),
            "protocol": if self.kind == Kind::Udp { "udp" } else { "tcp" },
            "backends": backends,
        });
        match self.kind {
            Kind::Affinity => body["affinity"] = serde_json::json!({ "timeout": "30s" }),
            Kind::Checked => {
                body["health"] = serde_json::json!({ "type": "tcp", "interval": "100ms",
                    "timeout": "50ms", "rise": 1, "fall": 1, "passive_failures": 2 });
            }
            Kind::Udp | Kind::Plain => {}
        }
        body.to_string()
    }
}

/// What the maps must hold for `model` (pool index -> backends with weights), compared with
/// what they do hold. Ok(summary) or Err(every difference found).
fn check_exact_state(
    bpffs: &BpffsDir,
    pool: &[PoolService],
    model: &BTreeMap<usize, BTreeMap<SocketAddr, u32>>,
    refusing: SocketAddr,
) -> Result<String, String> {
    let services = services_map(bpffs);
    let slots = slots_map(bpffs);
    let backends = backends_map(bpffs);
    let stats = pair_map(bpffs, "backend_stats");
    let active = active_map(bpffs);
    let passive = passive_map(bpffs);
    let affinity = affinity_entries(bpffs);
    let udp_flows = map_len(bpffs, "udp_flows");
    let mut problems = Vec::new();

    let want_vips: BTreeSet<VipKey> = model
        .keys()
        .map(|&i| (pool[i].vip, pool[i].proto()))
        .collect();
    let have_vips: BTreeSet<VipKey> = services.keys().copied().collect();
    if want_vips != have_vips {
        problems.push(format!(
            "services: {} missing {:?}, {} extra {:?}",
            want_vips.difference(&have_vips).count(),
            want_vips.difference(&have_vips).collect::<Vec<_>>(),
            have_vips.difference(&want_vips).count(),
            have_vips.difference(&want_vips).collect::<Vec<_>>()
        ));
    }
    let distinct: BTreeSet<SocketAddr> = backends.values().copied().collect();
    if distinct.len() != backends.len() {
        problems.push(format!("backends: an address has two ids: {backends:?}"));
    }

    let mut want_members: BTreeSet<Pair> = BTreeSet::new();
    let mut want_active: BTreeMap<Pair, u32> = BTreeMap::new();
    let mut live: BTreeMap<u32, ServiceEntry> = BTreeMap::new();
    for (&i, members) in model {
        let svc = &pool[i];
        let Some(&entry) = services.get(&(svc.vip, svc.proto())) else {
            continue;
        };
        live.insert(entry.id, entry);
        for &addr in members.keys() {
            match id_of(&backends, addr) {
                Some(b) => {
                    want_members.insert((entry.id, b));
                }
                None => problems.push(format!("{}: member {addr} has no backends entry", svc.name)),
            }
        }
        // Checked services: the refusing backend fails its checks, unless it is the only one
        // (all unhealthy: fail open).
        let mut taking: BTreeMap<SocketAddr, u32> = members.clone();
        if svc.kind == Kind::Checked && members.keys().any(|&a| a != refusing) {
            taking.remove(&refusing);
        }
        let want_slots = reduced(&taking);
        let mut have_slots: BTreeMap<SocketAddr, u32> = BTreeMap::new();
        for slot in 0..entry.slot_count {
            match slots.get(&(entry.id, entry.generation, slot)) {
                Some((b, _)) => match backends.get(b) {
                    Some(&addr) => *have_slots.entry(addr).or_default() += 1,
                    None => problems.push(format!(
                        "{}: live slot {slot} names unknown backend {b}",
                        svc.name
                    )),
                },
                None => problems.push(format!("{}: live slot {slot} missing", svc.name)),
            }
        }
        if have_slots != want_slots {
            problems.push(format!(
                "{} ({:?}): live slots per backend {have_slots:?}, want {want_slots:?}",
                svc.name, svc.kind
            ));
        }
        for (&addr, &n) in &want_slots {
            if let Some(b) = id_of(&backends, addr) {
                want_active.insert((entry.id, b), n);
            }
        }
    }

    let have_members: BTreeSet<Pair> = stats.keys().copied().collect();
    if have_members != want_members {
        problems.push(format!(
            "backend_stats: missing {:?}, extra {:?}",
            want_members.difference(&have_members).collect::<Vec<_>>(),
            have_members.difference(&want_members).collect::<Vec<_>>()
        ));
    }
    if active != want_active {
        problems.push(format!("active: {active:?}, want {want_active:?}"));
    }
    for (&(service_id, generation, slot), (backend, addr)) in &slots {
        let Some(entry) = live.get(&service_id) else {
            problems.push(format!(
                "slots: ({service_id}, {generation}, {slot}) of a service id not in services"
            ));
            continue;
        };
        let previous = generation == entry.generation.wrapping_sub(1);
        if generation != entry.generation && !previous {
            problems.push(format!(
                "slots: ({service_id}, {generation}, {slot}) is neither the live generation {} \
                 nor the previous one",
                entry.generation
            ));
        }
        if generation == entry.generation && slot >= entry.slot_count {
            problems.push(format!(
                "slots: ({service_id}, {generation}, {slot}) beyond the live slot count {}",
                entry.slot_count
            ));
        }
        match backends.get(backend) {
            None => problems.push(format!(
                "slots: ({service_id}, {generation}, {slot}) names unknown backend {backend}"
            )),
            Some(known) if known != addr => problems.push(format!(
                "slots: ({service_id}, {generation}, {slot}) carries {addr} for backend \
                 {backend}, which is {known}"
            )),
            Some(_) => {}
        }
    }
    let leaked_passive: Vec<&Pair> = passive
        .keys()
        .filter(|k| !want_members.contains(k))
        .collect();
    if !leaked_passive.is_empty() {
        problems.push(format!(
            "passive: entries of non-member pairs {leaked_passive:?}"
        ));
    }
    let leaked_affinity: Vec<&Pair> = affinity
        .iter()
        .filter(|k| !want_members.contains(k))
        .collect();
    if !leaked_affinity.is_empty() {
        problems.push(format!(
            "affinity: entries of non-member pairs {leaked_affinity:?}"
        ));
    }
    if udp_flows != 0 {
        problems.push(format!("udp_flows: {udp_flows} entries, no client is open"));
    }
    let referenced: BTreeSet<u32> = want_members
        .iter()
        .map(|&(_, b)| b)
        .chain(slots.values().map(|&(id, _)| id))
        .collect();
    let have_ids: BTreeSet<u32> = backends.keys().copied().collect();
    if have_ids != referenced {
        problems.push(format!(
            "backends: ids {have_ids:?}, but members and slots reference {referenced:?}"
        ));
    }
    if problems.is_empty() {
        Ok(format!(
            "{} services, {} slots, {} backends, {} member pairs, {} active, {} passive, {} \
             affinity, {udp_flows} udp flows",
            services.len(),
            slots.len(),
            backends.len(),
            stats.len(),
            active.len(),
            passive.len(),
            affinity.len()
        ))
    } else {
        Err(problems.join("\n"))
    }
}

#[test]
fn a_thousand_random_edits_leave_exactly_the_desired_state_in_every_map() {
    const EDITS: usize = 1000;
    const SEED: u64 = 0x6d65_7368_636f_7265;
    let tcp: Vec<TcpBackend> = (0..6)
        .map(|i| TcpBackend::start(&format!("ed-t{i}")))
        .collect();
    let udp: Vec<UdpBackend> = (0..3)
        .map(|i| UdpBackend::start(&format!("ed-u{i}")))
        .collect();
    // A port nobody listens on: its connects are refused, so the kernel records passive state.
    let refusing = {
        let mut gone = TcpBackend::start("ed-refusing");
        gone.stop();
        gone.addr()
    };
    let mut tcp_pool: Vec<SocketAddr> = tcp.iter().map(TcpBackend::addr).collect();
    tcp_pool.push(refusing);
    let udp_pool: Vec<SocketAddr> = udp.iter().map(UdpBackend::addr).collect();
    let kinds = [Kind::Affinity, Kind::Udp, Kind::Checked, Kind::Plain];
    let pool: Vec<PoolService> = (0..12)
        .map(|i| {
            let kind = kinds[i % kinds.len()];
            let port = if kind == Kind::Udp { 53 } else { 80 };
            PoolService {
                name: format!("ed-{i}"),
                vip: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 100, 71, i as u8 + 1)), port),
                kind,
            }
        })
        .collect();

    let state = TempDir::new("edits");
    let env = TestEnv::start(
        "edits",
        &with_agent(
            &[],
            &format!(
                "resync = \"300ms\"\nstate_dir = {:?}\n",
                state.path().display().to_string()
            ),
        ),
    );
    let api = env.agent.admin();

    let mut rng = Rng(SEED);
    let mut model: BTreeMap<usize, BTreeMap<SocketAddr, u32>> = BTreeMap::new();
    let (mut puts, mut deletes) = (0, 0);
    let mut last_generation = 0;
    let (mut max_passive, mut max_affinity, mut replies, mut refused) = (0, 0, 0, 0);
    let started = Instant::now();
    for edit in 0..EDITS {
        let i = rng.below(pool.len());
        let svc = &pool[i];
        let response = if model.contains_key(&i) && rng.below(5) == 0 {
            model.remove(&i);
            deletes += 1;
            api.delete(&svc.name)
        } else {
            let from = if svc.kind == Kind::Udp {
                &udp_pool
            } else {
                &tcp_pool
            };
            let mut backends = BTreeMap::new();
            let count = 1 + rng.below(from.len().min(4));
            while backends.len() < count {
                let addr = from[rng.below(from.len())];
                backends.insert(addr, 1 + rng.below(3) as u32);
            }
            let body = svc.body(&backends);
            model.insert(i, backends);
            puts += 1;
            api.put(&svc.name, &body)
        };
        assert_eq!(
            response.status, 200,
            "edit {edit} ({}): {}",
            svc.name, response.raw
        );
        assert_eq!(
            response.body["applied"], true,
            "edit {edit}: {}",
            response.raw
        );
        let generation = response.body["generation"]
            .as_u64()
            .unwrap_or_else(|| panic!("edit {edit}: no generation in {}", response.raw));
        assert!(
            generation > last_generation,
            "edit {edit}: generation {generation} after {last_generation}"
        );
        last_generation = generation;

        // Some traffic through what is there now, every 100 edits (bounded: a few connects per
        // service, short timeouts).
        if edit % 100 == 99 {
            for &j in model.keys() {
                let svc = &pool[j];
                let mode = if svc.kind == Kind::Udp {
                    "udp-connected"
                } else {
                    "connect"
                };
                let result = run_probe_in(
                    &env.cgroup,
                    [
                        mode,
                        "--addr",
                        &svc.vip.to_string(),
                        "--count",
                        "4",
                        "--timeout-ms",
                        "300",
                    ],
                );
                replies += result.counts().values().sum::<usize>();
                refused += result
                    .error_counts()
                    .get("ECONNREFUSED")
                    .copied()
                    .unwrap_or(0);
            }
            max_passive = max_passive.max(map_len(&env.bpffs, "passive"));
            max_affinity = max_affinity.max(map_len(&env.bpffs, "affinity"));
        }
    }
    let edits_took = started.elapsed();

    // Settled: the maps hold the last generation, and a few resyncs have run since.
    assert!(
        wait_until(Duration::from_secs(5), || {
            let (desired, applied) = generations(&env.agent);
            desired == applied
        }),
        "applied generation never caught up: {:?}",
        generations(&env.agent)
    );
    let settled_at = Instant::now();
    let mut last = Err("not checked yet".to_owned());
    let exact = wait_until(Duration::from_secs(10), || {
        last = check_exact_state(&env.bpffs, &pool, &model, refusing);
        last.is_ok() && settled_at.elapsed() > Duration::from_secs(1)
    });
    let runs = reconcile_runs(&env.agent);
    let repairs_text = env.agent.metrics_text();
    let repairs: BTreeMap<&str, f64> = ["services", "slots", "backends", "passive", "affinity"]
        .iter()
        .map(|m| {
            (
                *m,
                metric_value(&repairs_text, "mesh_resync_repairs_total", &[("map", m)])
                    .unwrap_or(0.0),
            )
        })
        .collect();
    println!(
        "{EDITS} edits (seed {SEED:#x}: {puts} PUT, {deletes} DELETE) in {edits_took:?} ({:.2} ms \
         each), {runs} reconciles; traffic: {replies} replies, {refused} refused; at most \
         {max_passive} passive and {max_affinity} affinity entries seen; resync repairs \
         {repairs:?}; final state: {last:?}",
        edits_took.as_secs_f64() * 1e3 / EDITS as f64
    );
    assert!(
        exact,
        "the maps do not hold exactly the desired state:\n{}",
        last.unwrap_err()
    );
    assert!(
        max_passive > 0,
        "the refusing backend never produced passive state"
    );
    assert!(max_affinity > 0, "no affinity entry was ever created");
    assert!(replies > 0, "no client got through");

    // Everything deleted: every map empty once a resync has removed the kernel's entries.
    for &i in model.keys() {
        let response = api.delete(&pool[i].name);
        assert_eq!(response.status, 200, "{}", response.raw);
    }
    let maps = [
        "services",
        "slots",
        "backends",
        "backend_stats",
        "active",
        "passive",
        "affinity",
        "udp_flows",
        "service_names",
    ];
    let deleted_at = Instant::now();
    let mut left = BTreeMap::new();
    let empty = wait_until(Duration::from_secs(5), || {
        left = maps
            .iter()
            .map(|m| (*m, map_len(&env.bpffs, m)))
            .filter(|(_, n)| *n > 0)
            .collect();
        left.is_empty()
    });
    println!(
        "after deleting every service: all maps empty after {:?}",
        deleted_at.elapsed()
    );
    assert!(empty, "entries left after deleting every service: {left:?}");
}

// ---------------------------------------------------------------------------------------------
// 3. A removed backend takes its passive state along; a new backend starts clean
// ---------------------------------------------------------------------------------------------

/// A completed connect ends its backend's run of failed ones (the passive count goes back to
/// 0, the failure counter stays), and a backend that never failed gets no passive entry.
#[test]
fn a_completed_connect_ends_the_run_of_failures() {
    let good = TcpBackend::start("run-good");
    let mut flaky = TcpBackend::start("run-flaky");
    flaky.stop();
    let vip = "127.100.72.2:80";
    // Passive detection on, far from ejecting; no active checks, no resync.
    let spec = ServiceSpec::tcp("run", vip)
        .set("health", "{ type = \"none\", passive_failures = 1000 }")
        .backend(good.addr(), 1)
        .backend(flaky.addr(), 1);
    let env = TestEnv::start("run", &with_agent(&[spec], "resync = \"1h\"\n"));
    let result = env.connect(vip, 6);
    assert_eq!(result.count("run-good"), 3, "{:?}", result.lines);
    assert_eq!(result.errors(), vec!["ECONNREFUSED"; 3]);

    let service_id = only_service_id(&env.bpffs);
    let ids = backends_map(&env.bpffs);
    let flaky_pair = (service_id, id_of(&ids, flaky.addr()).expect("flaky's id"));
    let good_pair = (service_id, id_of(&ids, good.addr()).expect("good's id"));
    let mut passive = BTreeMap::new();
    assert!(
        wait_until(Duration::from_secs(2), || {
            passive = passive_map(&env.bpffs);
            passive.get(&flaky_pair) == Some(&3)
        }),
        "three failed connects of {flaky_pair:?} in a row: {passive:?}"
    );

    flaky.restart();
    let result = env.connect(vip, 2);
    assert_eq!(result.count("run-flaky"), 1, "{:?}", result.lines);
    assert_eq!(result.count("run-good"), 1, "{:?}", result.lines);
    assert!(
        wait_until(Duration::from_secs(2), || {
            passive = passive_map(&env.bpffs);
            passive.get(&flaky_pair) == Some(&0)
        }),
        "a completed connect ends the run of {flaky_pair:?}: {passive:?}"
    );
    assert_eq!(connect_failures(&env.bpffs).get(&flaky_pair), Some(&3));
    assert!(
        !passive.contains_key(&good_pair),
        "a backend that never failed has no passive entry: {passive:?}"
    );
}

#[test]
fn removed_backend_takes_its_passive_state_and_a_new_backend_starts_clean() {
    let good1 = TcpBackend::start("pas-g1");
    let good2 = TcpBackend::start("pas-g2");
    let refusing = {
        let mut gone = TcpBackend::start("pas-refusing");
        gone.stop();
        gone
    };
    let vip = "127.100.72.1:80";
    let name = "passive";
    let service = |backends: &[(SocketAddr, i64)]| {
        let spec = backends
            .iter()
            .fold(ServiceSpec::tcp(name, vip), |s, (a, w)| s.backend(a, *w));
        // No resync during the test: whatever is deleted, the reconcile deleted.
        with_agent(&[spec], "resync = \"1h\"\n")
    };
    let env = TestEnv::start(
        "passive",
        &service(&[(good1.addr(), 1), (good2.addr(), 1), (refusing.addr(), 1)]),
    );
    let result = env.connect(vip, 30);
    assert_eq!(result.count("pas-g1"), 10, "{:?}", result.lines);
    assert_eq!(result.count("pas-g2"), 10, "{:?}", result.lines);
    assert_eq!(result.errors(), vec!["ECONNREFUSED"; 10]);

    let service_id = only_service_id(&env.bpffs);
    let ids = backends_map(&env.bpffs);
    let refusing_id = id_of(&ids, refusing.addr()).expect("the refusing backend's id");
    let pair = (service_id, refusing_id);
    let mut passive = BTreeMap::new();
    let counted = wait_until(Duration::from_secs(2), || {
        passive = passive_map(&env.bpffs);
        passive.get(&pair) == Some(&10)
    });
    assert!(
        counted,
        "the kernel should count 10 consecutive failed connects of {pair:?}: {passive:?}"
    );
    assert_eq!(connect_failures(&env.bpffs).get(&pair), Some(&10));

    // Removed: its counter and its passive entry go with the reconcile, not a resync.
    env.agent
        .write_config(&service(&[(good1.addr(), 1), (good2.addr(), 1)]));
    let edited = Instant::now();
    let gone = wait_until(Duration::from_secs(2), || {
        passive = passive_map(&env.bpffs);
        !passive.contains_key(&pair)
    });
    let took = edited.elapsed();
    assert!(
        gone,
        "passive entry of the removed backend still there: {passive:?}"
    );
    assert!(
        !pair_map(&env.bpffs, "backend_stats").contains_key(&pair),
        "its counter is gone too"
    );
    assert_eq!(
        metric(&env.agent, "mesh_resync_runs_total", &[("result", "ok")]),
        0.0,
        "no resync ran"
    );

    // Another switch retires the slot set that still named it: its backend entry goes.
    env.agent
        .write_config(&service(&[(good1.addr(), 2), (good2.addr(), 1)]));
    assert!(
        wait_until(Duration::from_secs(2), || id_of(
            &backends_map(&env.bpffs),
            refusing.addr()
        )
        .is_none()),
        "the refusing backend's entry stays: {:?}",
        backends_map(&env.bpffs)
    );

    let fresh = TcpBackend::start("pas-fresh");
    env.agent.write_config(&service(&[
        (good1.addr(), 2),
        (good2.addr(), 1),
        (fresh.addr(), 1),
    ]));
    wait_for_backends(
        &env.bpffs,
        name,
        &[good1.addr(), good2.addr(), fresh.addr()],
        Duration::from_secs(2),
    );
    let now = backends_map(&env.bpffs);
    let fresh_id = id_of(&now, fresh.addr()).expect("the new backend's id");
    let highest_before = ids.keys().max().copied().unwrap_or(0);
    println!(
        "passive entry of the removed backend gone {took:?} after the edit; backend ids before \
         {ids:?}, the refusing one was {refusing_id}, the new backend got {fresh_id}"
    );
    assert_ne!(fresh_id, refusing_id, "the freed id was handed out again");
    assert!(
        fresh_id > highest_before,
        "ids are handed out increasing: {fresh_id} after {ids:?}"
    );
    let result = env.connect(vip, 40);
    assert_split(&result, &[(&good1, 20), (&good2, 10), (&fresh, 10)]);
    let fresh_pair = (service_id, fresh_id);
    assert_eq!(
        passive_map(&env.bpffs)
            .get(&fresh_pair)
            .copied()
            .unwrap_or(0),
        0,
        "the new backend starts with no failed connects"
    );
    assert_eq!(connect_failures(&env.bpffs).get(&fresh_pair), Some(&0));
}

// ---------------------------------------------------------------------------------------------
// 4. One agent per pins directory
// ---------------------------------------------------------------------------------------------

#[test]
fn a_second_agent_on_the_same_pins_exits_naming_the_first() {
    let a = TcpBackend::start("lock-a");
    let b = TcpBackend::start("lock-b");
    let vip = "127.100.73.1:80";
    let env = TestEnv::start(
        "lock",
        &with_agent(&[tcp_service("locked", vip, &[&a, &b])], ""),
    );
    let mut cmd = Command::new(mesh_bin());
    cmd.arg("agent")
        .arg("--config")
        .arg(env.agent.config_path())
        .arg("--cgroup")
        .arg(env.cgroup.path())
        .arg("--bpffs")
        .arg(env.bpffs.path())
        .arg("--metrics")
        .arg(free_loopback_addr().to_string())
        .env("RUST_LOG", "info")
        .env("RUST_BACKTRACE", "0")
        .env("NO_COLOR", "1");
    let started = Instant::now();
    let out = run_bounded(&mut cmd, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("the second agent did not exit within 10 s: {e}"));
    let took = started.elapsed();
    let said = strip_ansi(&format!("{}{}", out.stdout, out.stderr));
    println!(
        "second agent: exited with {} after {took:?}: {}",
        out.status,
        said.trim()
    );
    assert!(
        !out.status.success(),
        "the second agent succeeded: {}",
        out.describe()
    );
    assert!(took < Duration::from_secs(2), "it took {took:?} to give up");
    let expected = format!(
        "another mesh agent already owns {} (pid {}",
        env.bpffs.path().display(),
        env.agent.pid()
    );
    assert!(
        said.contains(&expected),
        "expected {expected:?} in:\n{said}"
    );
    assert!(
        said.contains(&mesh_bin().display().to_string()),
        "the first agent's command line is named: {said}"
    );

    // The first one keeps serving.
    let mut env = env;
    assert!(env.agent.is_running(), "the first agent stopped");
    let healthz = env.agent.http_get("/healthz").expect("GET /healthz");
    assert_eq!(healthz.status, 200, "{}", healthz.body);
    assert_split(&env.connect(vip, 20), &[(&a, 10), (&b, 10)]);
}

// ---------------------------------------------------------------------------------------------
// 5. SIGHUP re-reads the config file
// ---------------------------------------------------------------------------------------------

#[test]
fn sighup_rereads_the_config_file() {
    let a = TcpBackend::start("hup-a");
    let b = TcpBackend::start("hup-b");
    let vip = "127.100.74.1:80";
    let name = "hup";
    let one = with_agent(&[tcp_service(name, vip, &[&a])], "");
    let two = with_agent(&[tcp_service(name, vip, &[&a, &b])], "");
    let env = TestEnv::start("sighup", &one);

    // The config path becomes a symlink into another directory: the agent watches the
    // config's own directory, so edits of the target are invisible to the watcher.
    let elsewhere = TempDir::new("hup-target");
    let target = elsewhere.path().join("mesh.toml");
    std::fs::write(&target, &one).expect("write the target");
    let config = env.agent.config_path().to_path_buf();
    let link = config.with_file_name(".mesh.toml.link");
    std::os::unix::fs::symlink(&target, &link).expect("symlink");
    std::fs::rename(&link, &config).expect("rename the symlink over the config");
    // That rename is seen and re-read (same services: nothing to write); let it pass.
    std::thread::sleep(Duration::from_millis(300));

    let mark = env.agent.log_mark();
    std::fs::write(&target, &two).expect("edit the target");
    std::thread::sleep(Duration::from_millis(1500));
    let status = services(&env.bpffs);
    let backends = status.service(name).map(|s| s.backend_addrs());
    assert_eq!(
        backends,
        Some(BTreeSet::from([a.addr()])),
        "the edit applied without SIGHUP (the watcher saw the target?): {status:#?}"
    );

    assert!(send_signal(env.agent.pid(), libc::SIGHUP), "kill -HUP");
    let took = wait_for_backends(
        &env.bpffs,
        name,
        &[a.addr(), b.addr()],
        Duration::from_secs(5),
    );
    println!("SIGHUP: the edited target applied {took:?} after the signal");
    assert!(took < Duration::from_secs(1), "SIGHUP reload took {took:?}");
    let log = env.agent.log_since(mark);
    assert!(log.contains("SIGHUP"), "the reload is logged:\n{log}");
    assert_split(&env.connect(vip, 20), &[(&a, 10), (&b, 10)]);
}

// ---------------------------------------------------------------------------------------------
// 6. Logs written to a file carry no colour codes
// ---------------------------------------------------------------------------------------------

#[test]
fn logs_written_to_a_file_have_no_colour_codes() {
    let a = TcpBackend::start("colour-a");
    let vip = "127.100.75.1:80";
    let config = with_agent(&[tcp_service("colour", vip, &[&a])], "");
    // Without the harness's NO_COLOR=1: the agent must decide by itself that a file is no
    // terminal.
    let _serial = serial();
    let cgroup = CgroupGuard::new("colour");
    let bpffs = BpffsDir::new("colour");
    let agent = Agent::start_with_env(&config, &cgroup, &bpffs, &[], &[("NO_COLOR", None)]);
    // A rejected edit adds a WARN/ERROR line with fields.
    agent.write_config("[[services]]\nname = \"broken\"\n");
    let logged = agent
        .wait_for_log_line(0, Duration::from_secs(3), |l| l.contains("rejected"))
        .is_some();
    let raw = std::fs::read(agent.log_path()).expect("read the agent's log");
    let text = String::from_utf8_lossy(&raw);
    let lines = text.lines().count();
    println!("agent log file: {lines} lines, {} bytes", raw.len());
    assert!(logged, "no rejection logged:\n{text}");
    let plain = strip_ansi(&text);
    assert!(
        plain.contains(" INFO ") && plain.contains("ERROR"),
        "{plain}"
    );
    let escapes = raw.windows(2).filter(|w| w == b"\x1b[").count();
    assert_eq!(escapes, 0, "colour codes in the log file:\n{text:?}");
    drop(agent);

    // The control: the same binary on a terminal does colour its log, so the check above can
    // see codes when they are there.
    let pty_cgroup = CgroupGuard::new("colour-pty");
    let pty_bpffs = BpffsDir::new("colour-pty");
    let dir = TempDir::new("colour-pty");
    let pty_config = dir.path().join("mesh.toml");
    std::fs::write(&pty_config, &config).expect("write config");
    let mesh = mesh_bin().display().to_string();
    let pty_config = pty_config.display().to_string();
    let metrics = free_loopback_addr().to_string();
    let command = format!(
        "env -u NO_COLOR RUST_LOG=info timeout -s INT 2 {} agent --config {} --cgroup {} \
         --bpffs {} --metrics {} --admin-socket ''",
        shell_quote(&mesh),
        shell_quote(&pty_config),
        shell_quote(&pty_cgroup.path().display().to_string()),
        shell_quote(&pty_bpffs.path().display().to_string()),
        metrics
    );
    let out = run_in_pty(&["sh", "-c", &command], Duration::from_secs(20));
    assert!(
        out.stdout.contains("programs attached"),
        "the agent on a terminal did not start: {}",
        out.describe()
    );
    assert!(
        out.stdout.contains("\u{1b}["),
        "on a terminal the log is coloured: {:?}",
        out.stdout
    );
}

// ---------------------------------------------------------------------------------------------
// 7. A new pin layout version replaces the old one without a gap
// ---------------------------------------------------------------------------------------------

/// Programs `bpftool cgroup show <cgroup>` lists: (name, attach type).
fn cgroup_programs(cgroup: &CgroupGuard) -> Vec<(String, String)> {
    let mut cmd = Command::new("bpftool");
    cmd.args(["cgroup", "show"]).arg(cgroup.path()).arg("-j");
    let out = run_bounded(&mut cmd, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("`bpftool cgroup show`: {e}"));
    assert!(out.status.success(), "{}", out.describe());
    if out.stdout.trim().is_empty() {
        return Vec::new();
    }
    let json: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "`bpftool cgroup show` printed invalid JSON ({e}): {}",
            out.stdout
        )
    });
    json.as_array()
        .unwrap_or_else(|| panic!("cgroup show: {json}"))
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or_default().to_owned(),
                p["attach_type"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

#[test]
fn a_new_layout_version_replaces_the_old_without_a_gap() {
    let a = TcpBackend::start("lay-a");
    let b = TcpBackend::start("lay-b");
    let c = TcpBackend::start("lay-c");
    let vip = "127.100.76.1:80";
    // Whoever reaches the decoy was not translated.
    let decoy = TcpBackend::start_on("lay-decoy", sock(vip));
    let config = with_agent(&[tcp_service("layout", vip, &[&a, &b, &c])], "");
    let _serial = serial();
    let cgroup = CgroupGuard::new("layout");
    let bpffs = BpffsDir::new("layout");
    let mut old = Agent::start_with_env(
        &config,
        &cgroup,
        &bpffs,
        &[],
        &[("MESH_TEST_LAYOUT_VERSION", Some("1"))],
    );
    let v1 = bpffs.path().join("v1");
    let current = bpffs.path().join(LAYOUT_DIR);
    assert!(
        v1.join("links/connect4").exists(),
        "the old agent pins under v1"
    );
    assert!(!current.exists(), "nothing under {LAYOUT_DIR} yet");
    let before = cgroup_programs(&cgroup);
    assert_eq!(before.len(), 10, "{before:?}");

    let clients = ClientLoop::start(
        &cgroup,
        "connect-until",
        vip,
        2,
        LOOP_LIMIT,
        &["--timeout-ms", "1000"],
    );
    let served = || a.accepted() + b.accepted() + c.accepted();
    assert!(
        wait_until(Duration::from_secs(5), || served() > 100),
        "clients do not get through"
    );
    let status = old
        .terminate(Duration::from_secs(10))
        .expect("the old agent exits");
    assert!(status.success(), "old agent exited with {status}");
    let at_stop = served();
    std::thread::sleep(Duration::from_millis(300));
    let while_none = served() - at_stop;

    let started = Instant::now();
    let new = Agent::start(&config, &cgroup, &bpffs);
    let ready_after = started.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let result = clients.stop();
    let after = cgroup_programs(&cgroup);
    println!(
        "layout v1 -> {LAYOUT_DIR}: {while_none} connects served with no agent, new agent ready after \
         {ready_after:?}; clients: {} connects in {:?}, replies {:?}, errors {:?}; programs \
         attached after: {}",
        result.total.attempts,
        result.ran_for,
        result.total.replies,
        result.total.errors,
        after.len()
    );
    assert!(while_none > 0, "the data path stopped with the old agent");
    assert!(
        result.total.errors.is_empty(),
        "failed connects across the layout change: {:?}",
        result.total.errors
    );
    assert_eq!(
        result.total.count("lay-decoy"),
        0,
        "connects reached the VIP itself"
    );
    assert_eq!(decoy.accepted(), 0, "connects reached the VIP itself");
    assert!(
        !v1.exists(),
        "the old layout's pins are still there: {}",
        v1.display()
    );
    assert!(current.join("links/connect4").exists());
    let connect4: Vec<&(String, String)> = after.iter().filter(|(n, _)| n == "connect4").collect();
    assert_eq!(
        connect4.len(),
        1,
        "exactly one connect4 attached: {after:?}"
    );
    assert_eq!(after.len(), 10, "one of each program: {after:?}");
    let before = (a.accepted(), b.accepted(), c.accepted());
    let result = integration_tests::probe_connect_in(&cgroup, vip, 300);
    assert_split(&result, &[(&a, 100), (&b, 100), (&c, 100)]);
    assert_eq!(
        (
            a.accepted() - before.0,
            b.accepted() - before.1,
            c.accepted() - before.2
        ),
        (100, 100, 100)
    );
    drop(new);
}

// ---------------------------------------------------------------------------------------------
// 8. A change that cannot be written answers failed and is retried
// ---------------------------------------------------------------------------------------------

#[test]
fn an_api_change_that_cannot_be_written_answers_failed_and_is_retried() {
    // max_slots = 8: the file's service (1 slot) and the new one (3 slots) need 4, twice that
    // with the previous generations: valid. Junk slots fill the map from outside, so the new
    // service's slots cannot be inserted (E2BIG) until the resync deletes the junk.
    const RESYNC: Duration = Duration::from_secs(1);
    let first = TcpBackend::start("full-first");
    let news = [
        TcpBackend::start("full-n1"),
        TcpBackend::start("full-n2"),
        TcpBackend::start("full-n3"),
    ];
    let first_vip = "127.100.77.1:80";
    let new_vip = "127.100.77.2:80";
    let state = TempDir::new("full");
    let env = TestEnv::start(
        "full",
        &with_agent(
            &[tcp_service("full-first", first_vip, &[&first])],
            &format!(
                "resync = \"1s\"\nstate_dir = {:?}\n\n\
                 [agent.limits]\nmax_slots = 8\n",
                state.path().display().to_string()
            ),
        ),
    );
    let api = env.agent.admin();
    assert_eq!(map_len(&env.bpffs, "slots"), 1);
    let first_id = id_of(&backends_map(&env.bpffs), first.addr()).expect("backend id");

    // Right after a resync: the next one is a whole period away.
    wait_for_a_resync(&env.agent, Duration::from_secs(3));
    let window = Instant::now();
    const JUNK_SERVICE: u32 = 999;
    for slot in 0..7u32 {
        let key: Vec<u8> = [JUNK_SERVICE, 1, slot]
            .iter()
            .flat_map(|v| v.to_ne_bytes())
            .collect();
        // A slot value: the backend id, then its address (20 bytes; zero will do here).
        let mut value = first_id.to_ne_bytes().to_vec();
        value.resize(24, 0);
        map_update(&env.bpffs, "slots", &key, &value);
    }
    assert_eq!(map_len(&env.bpffs, "slots"), 8, "the slots map is full");
    let body = serde_json::json!({
        "vip": new_vip,
        "backends": news.iter().map(|b| serde_json::json!({"addr": b.addr().to_string()}))
            .collect::<Vec<_>>(),
    })
    .to_string();
    let response = api.put("full-new", &body);
    let answered = window.elapsed();
    let (desired, applied) = generations(&env.agent);
    let errors = metric(
        &env.agent,
        "mesh_reconcile_runs_total",
        &[("result", "error")],
    );
    println!(
        "PUT into a full slots map: HTTP {} after {answered:?} (since the last resync): {}; \
         generations desired {desired} applied {applied}; {errors} failed reconciles",
        response.status, response.raw
    );
    assert!(
        answered < RESYNC,
        "the PUT took {answered:?}, a resync may have deleted the junk first"
    );
    assert_eq!(response.status, 500, "{}", response.raw);
    assert_eq!(response.body["applied"], false, "{}", response.raw);
    assert!(
        response.error().contains("map write failed"),
        "the reason is the map write: {}",
        response.raw
    );
    assert!(
        applied < desired,
        "generations: desired {desired}, applied {applied}"
    );
    assert!(errors >= 1.0);
    assert!(
        api.names()
            .contains(&("api".to_owned(), "full-new".to_owned())),
        "accepted into the registry: {:?}",
        api.names()
    );

    // The resync deletes the junk; a retry then writes the service.
    let took = wait_for_backends(
        &env.bpffs,
        "full-new",
        &addrs(&news.iter().collect::<Vec<_>>()),
        Duration::from_secs(10),
    );
    let caught_up = wait_until(Duration::from_secs(2), || {
        let (desired, applied) = generations(&env.agent);
        desired == applied
    });
    let slots = slots_map(&env.bpffs);
    let repaired = metric(&env.agent, "mesh_resync_repairs_total", &[("map", "slots")]);
    let failed = metric(
        &env.agent,
        "mesh_reconcile_runs_total",
        &[("result", "error")],
    );
    println!(
        "applied {:?} after the failed answer; {failed} failed reconciles in all; {repaired} slot \
         repairs; generations {:?}",
        took,
        generations(&env.agent)
    );
    assert!(caught_up, "generations: {:?}", generations(&env.agent));
    assert!(
        slots.keys().all(|(s, _, _)| *s != JUNK_SERVICE),
        "junk left: {slots:?}"
    );
    assert!(repaired >= 7.0, "the resync deleted the junk: {repaired}");
    let result = env.connect(new_vip, 30);
    assert_split(&result, &[(&news[0], 10), (&news[1], 10), (&news[2], 10)]);
    assert_split(&env.connect(first_vip, 5), &[(&first, 5)]);
}

// ---------------------------------------------------------------------------------------------
// 9. A burst of API changes is coalesced
// ---------------------------------------------------------------------------------------------

#[test]
fn a_burst_of_api_changes_costs_fewer_reconciles_than_changes() {
    const CHANGES: usize = 40;
    let backends: Vec<TcpBackend> = (0..4)
        .map(|i| TcpBackend::start(&format!("burst-{i}")))
        .collect();
    let state = TempDir::new("burst");
    let env = TestEnv::start(
        "burst",
        &with_agent(
            &[],
            &format!("state_dir = {:?}\n", state.path().display().to_string()),
        ),
    );
    let api = env.agent.admin();
    let vip = |i: usize| format!("127.100.78.{}:80", i + 1);
    let backend_of = |i: usize| &backends[i % backends.len()];
    let body = |vip: &str, backend: &TcpBackend| {
        serde_json::json!({ "vip": vip, "backends": [{ "addr": backend.addr().to_string() }] })
            .to_string()
    };
    let runs_before = reconcile_runs(&env.agent);
    let started = Instant::now();
    let puts: Vec<(String, String)> = (0..CHANGES)
        .map(|i| (format!("burst-{i}"), body(&vip(i), backend_of(i))))
        .collect();
    let answers = concurrent_puts(&api, &puts);
    let burst_took = started.elapsed();
    let runs = wait_until(Duration::from_secs(2), || {
        let (desired, applied) = generations(&env.agent);
        desired == applied
    });
    let reconciles = reconcile_runs(&env.agent) - runs_before;
    let generations_seen: BTreeSet<u64> = answers
        .iter()
        .filter_map(|(_, body, _)| body["generation"].as_u64())
        .collect();
    let slowest = answers.iter().map(|(_, _, t)| *t).max().unwrap_or_default();
    println!(
        "{CHANGES} concurrent PUTs in {burst_took:?} (slowest answer {slowest:?}): {reconciles} \
         reconciles, {} distinct generations in the answers",
        generations_seen.len()
    );
    assert!(runs, "generations never caught up");
    for (i, (status, body, _)) in answers.iter().enumerate() {
        assert_eq!(*status, 200, "PUT burst-{i}: {body}");
        assert_eq!(body["applied"], true, "PUT burst-{i}: {body}");
        assert!(
            body["generation"].as_u64().is_some(),
            "PUT burst-{i}: {body}"
        );
    }
    assert!(
        reconciles < CHANGES as f64,
        "{reconciles} reconciles for {CHANGES} changes: nothing was coalesced"
    );
    for i in 0..CHANGES {
        let result = env.connect(vip(i), 2);
        assert_eq!(
            result.count(backend_of(i).name()),
            2,
            "burst-{i}: {:?}",
            result.lines
        );
    }

    // Coalescing must not let one invalid change fail the others sent with it: a second burst
    // in which one PUT takes a VIP that burst-0 already has.
    let mut puts: Vec<(String, String)> = (0..9)
        .map(|i| {
            let vip = format!("127.100.78.{}:80", 101 + i);
            (format!("mixed-{i}"), body(&vip, &backends[0]))
        })
        .collect();
    puts.push(("mixed-clash".to_owned(), body(&vip(0), &backends[1])));
    let runs_before = reconcile_runs(&env.agent);
    let answers = concurrent_puts(&api, &puts);
    println!(
        "a burst of 10 PUTs with one VIP clash: {} reconciles",
        reconcile_runs(&env.agent) - runs_before
    );
    for ((name, _), (status, body, _)) in puts.iter().zip(&answers) {
        let want = if name == "mixed-clash" { 400 } else { 200 };
        assert_eq!(*status, want, "PUT {name}: {body}");
    }
    let names = api.names();
    assert!(
        !names.iter().any(|(_, n)| n == "mixed-clash"),
        "the rejected service is listed: {names:?}"
    );
    for i in 0..9 {
        let result = env.connect(format!("127.100.78.{}:80", 101 + i), 2);
        assert_eq!(
            result.count(backends[0].name()),
            2,
            "mixed-{i}: {:?}",
            result.lines
        );
    }
    assert_eq!(env.connect(vip(0), 2).count(backend_of(0).name()), 2);
}

/// PUTs `(name, body)` all at once (one thread each, released together); returns the status,
/// body and round trip of each, in order.
fn concurrent_puts(
    api: &AdminApi,
    puts: &[(String, String)],
) -> Vec<(u16, serde_json::Value, Duration)> {
    let barrier = std::sync::Barrier::new(puts.len());
    std::thread::scope(|scope| {
        let handles: Vec<_> = puts
            .iter()
            .map(|(name, body)| {
                let barrier = &barrier;
                scope.spawn(move || {
                    barrier.wait();
                    let sent = Instant::now();
                    let response = api.put(name, body);
                    (response.status, response.body, sent.elapsed())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a PUT thread panicked"))
            .collect()
    })
}

// ---------------------------------------------------------------------------------------------
// 10. /metrics answers quickly while 10,000 services are applied
// ---------------------------------------------------------------------------------------------

/// One timed `GET /metrics`.
#[derive(Debug, Clone, Copy)]
struct Scrape {
    /// When it was sent (seconds since the Unix epoch, as the agent's log lines).
    at: f64,
    /// Until the status line arrived: how long the agent took to answer.
    answered: Duration,
    /// Until the whole body was read.
    complete: Duration,
    bytes: usize,
}

/// `GET /metrics` on a fresh connection, timed; returns the timings and the body. Panics unless
/// it answers 200 within 5 s.
fn timed_scrape(addr: SocketAddr) -> (Scrape, String) {
    use std::io::{Read as _, Write as _};
    let limit = Duration::from_secs(5);
    let at = now_epoch_secs();
    let sent = Instant::now();
    let mut stream = std::net::TcpStream::connect_timeout(&addr, limit).expect("connect");
    stream.set_read_timeout(Some(limit)).expect("timeout");
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send the request");
    let mut raw = vec![0u8; 64 << 10];
    let first = stream.read(&mut raw).expect("read the answer");
    let answered = sent.elapsed();
    raw.truncate(first);
    stream
        .take(32 << 20)
        .read_to_end(&mut raw)
        .expect("read the body");
    let complete = sent.elapsed();
    let response = integration_tests::http::parse_response(&raw).expect("an HTTP response");
    assert_eq!(response.status, 200, "{}", response.body);
    let scrape = Scrape {
        at,
        answered,
        complete,
        bytes: response.body.len(),
    };
    (scrape, response.body)
}

#[test]
fn metrics_answer_quickly_while_ten_thousand_services_are_applied() {
    const SERVICES: usize = 10_000;
    const BUDGET: Duration = Duration::from_millis(100);
    let a = TcpBackend::start("many-a");
    let agent_toml = "resync = \"30s\"\n\n[agent.limits]\nmax_services = 32768\n\
                      max_backends = 8192\nmax_service_backends = 65536\nmax_slots = 65536\n";
    let env = TestEnv::start(
        "many",
        &with_agent(
            &[tcp_service("many-0", "127.100.0.1:80", &[&a])],
            agent_toml,
        ),
    );
    let many: Vec<ServiceSpec> = (0..SERVICES)
        .map(|i| {
            let second = u8::try_from(100 + i / 5000).expect("127.100 or 127.101");
            let third = u8::try_from((i % 5000) / 250).expect("a byte");
            let fourth = u8::try_from(i % 250 + 1).expect("a byte");
            let vip = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, second, third, fourth)), 80);
            // Backends on 127.0.0.1 ports nobody listens on: nothing connects to them.
            let port = |n: usize| 20_000 + u16::try_from(n % 1000).expect("a port");
            let spec = ServiceSpec::tcp(&format!("many-{i}"), vip);
            if i == 0 {
                spec.backend(a.addr(), 1)
            } else {
                spec.backend(SocketAddr::from(([127, 0, 0, 1], port(i))), 1)
                    .backend(SocketAddr::from(([127, 0, 0, 1], port(i + 500))), 2)
            }
        })
        .collect();
    let text = with_agent(&many, agent_toml);
    let addr = env.agent.metrics_addr();
    let edited = Instant::now();
    env.agent.write_config(&text);
    let mut scrapes: Vec<Scrape> = Vec::new();
    let mut during = 0;
    let mut applied_after = None;
    // Scrapes while it applies, then 20 more of the whole node (13 MB of text each), 10 ms
    // apart (back to back, the test's own copying of 13 MB bodies would starve the agent of
    // this machine's two cores).
    let mut after = 0;
    while edited.elapsed() < Duration::from_secs(60) && after < 20 {
        let (scrape, body) = timed_scrape(addr);
        let services = metric_value(&body, "mesh_map_entries", &[("map", "services")]);
        let desired = metric_value(&body, "mesh_desired_generation", &[]);
        let applied = metric_value(&body, "mesh_applied_generation", &[]);
        if applied_after.is_some() {
            after += 1;
        } else if services == Some(SERVICES as f64) && desired == applied {
            applied_after = Some(edited.elapsed());
        } else {
            during += 1;
        }
        scrapes.push(scrape);
        std::thread::sleep(Duration::from_millis(10));
    }
    let stats = |of: &dyn Fn(&Scrape) -> Duration| {
        let mut sorted: Vec<Duration> = scrapes.iter().map(of).collect();
        sorted.sort();
        (
            sorted.get(sorted.len() / 2).copied().unwrap_or_default(),
            sorted.last().copied().unwrap_or_default(),
        )
    };
    let (answer_median, answer_max) = stats(&|s| s.answered);
    let (complete_median, complete_max) = stats(&|s| s.complete);
    let biggest = scrapes.iter().map(|s| s.bytes).max().unwrap_or(0);
    // The apply's time window from its log line (`applied ... services=10000 ... took_ms=T`,
    // logged at its end): the scrapes sent within it raced the map writes.
    let log = env.agent.log_text();
    let window = log
        .lines()
        .filter(|l| l.contains(" applied ") && l.contains(&format!("services={SERVICES} ")))
        .find_map(|l| {
            let end = log_line_time(l)?;
            let took: f64 = l
                .split("took_ms=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            Some((end - took / 1e3, end))
        });
    let racing: Vec<&Scrape> = scrapes
        .iter()
        .filter(|s| window.is_some_and(|(from, to)| s.at >= from && s.at <= to))
        .collect();
    let racing_max = racing.iter().map(|s| s.answered).max().unwrap_or_default();
    println!(
        "{SERVICES} services: applied (as /metrics reports it) {applied_after:?} after the edit; \
         {} scrapes ({during} before it was applied, {} of them while the maps were written, \
         answered within {racing_max:?} at most; {after} after): answered (status line) \
         median {answer_median:?}, max {answer_max:?}; complete response median \
         {complete_median:?}, max {complete_max:?} (largest {biggest} bytes)",
        scrapes.len(),
        racing.len()
    );
    assert!(
        applied_after.is_some(),
        "the 10,000 services were not applied within 60 s; log:\n{}",
        env.agent.log_text()
    );
    assert!(
        !racing.is_empty(),
        "no scrape was sent while the maps were written (apply window {window:?})"
    );
    // The bound holds while the maps are written (the claim). Before and after, on
    // this shared 2-core machine, a scrape of the 13 MB text has been seen at 155 ms once; those
    // only have to answer within a second.
    let slow: Vec<&&Scrape> = racing.iter().filter(|s| s.answered >= BUDGET).collect();
    assert!(
        slow.is_empty(),
        "{} of {} scrapes during the apply took {BUDGET:?} or more to answer: {slow:?}",
        slow.len(),
        racing.len()
    );
    let very_slow: Vec<&Scrape> = scrapes
        .iter()
        .filter(|s| s.answered >= Duration::from_secs(1))
        .collect();
    assert!(
        very_slow.is_empty(),
        "scrapes took a second or more: {very_slow:?}"
    );
    assert_eq!(services(&env.bpffs).services.len(), SERVICES);
    assert_split(&env.connect("127.100.0.1:80", 3), &[(&a, 3)]);
}
