//! `mesh-soak --seconds N [--seed S]`: a chaos run under load (`cargo xtask soak`).
//!
//! One agent in a test cgroup serves five services: `stable` (TCP, two backends that are never
//! touched), `chaos` (TCP, three backends that are killed and restarted), `udp` (UDP, two
//! backends), `api` (TCP, re-registered, re-weighted and removed through the admin API) and
//! `file` (TCP, added, changed and removed by rewriting the config file). The run is cut into
//! rounds of 3 s. Each round first may change the registry (admin API or config file, waited
//! for until every backend of the changed service has slots: a new backend gets them after its
//! first passed check), then starts `mesh-probe connect-until` clients through every TCP VIP,
//! and 1 s in may kill or restart a `chaos` backend, or SIGKILL or SIGTERM the agent and start
//! it again; at its end a burst of UDP requests goes through the UDP VIP.
//!
//! Checked every round (a violation is printed at once and fails the run):
//! - no failed connect through `stable`, `api`, `file` and `udp` (their backends stay up, also
//!   while the agent is killed and restarted);
//! - no failed connect through `chaos` unless one of its backends was killed in this round or
//!   the one before (the detection window: passive detection after 1 failure, checks every
//!   200 ms);
//! - no reply from a backend that was not in the registry when the round's clients started
//!   (registry changes happen before the clients start, so "after it left" is the whole round);
//! - the per-backend connection counters of `stable` never go down.
//!
//! At the end: every chaos backend is restarted and the maps must hold exactly the desired
//! state (the services and backends of `mesh services`, and the number of entries of the
//! `services`, `service_names` and `backends` maps); the agent log must have no ERROR line;
//! the agent's resident memory per round is reported.
//!
//! Not done (yet): clients in other network namespaces, Redis and Kubernetes churn, in-place
//! upgrades, draining, and a leak check of the per-backend and slot maps.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use integration_tests::maps::map_len;
use integration_tests::probe::probe_udp_in;
use integration_tests::{ClientLoop, TcpBackend, TestEnv, UdpBackend, services, wait_until};

const ROUND: Duration = Duration::from_secs(3);
const MID_ROUND: Duration = Duration::from_secs(1);
const STABLE_VIP: &str = "127.100.70.1:80";
const CHAOS_VIP: &str = "127.100.70.2:80";
const UDP_VIP: &str = "127.100.70.3:53";
const API_VIP: &str = "127.100.70.4:80";
const FILE_VIP: &str = "127.100.70.5:80";
/// How long a registry change may take to reach the maps.
const APPLY_LIMIT: Duration = Duration::from_secs(5);
/// How long the end check waits for the maps to hold exactly the registry: one full reconcile
/// (`[agent] resync`, 30 s by default) and some.
const END_SETTLE: Duration = Duration::from_secs(40);

/// xorshift64*: reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// A non-empty random subset of `0..n`.
    fn subset(&mut self, n: usize) -> Vec<usize> {
        loop {
            let picked: Vec<usize> = (0..n).filter(|_| self.next().is_multiple_of(2)).collect();
            if !picked.is_empty() {
                return picked;
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Action {
    Quiet,
    ApiChurn,
    FileChurn,
    KillChaosBackend,
    RestartChaosBackends,
    AgentSigkill,
    AgentSigterm,
}

const ACTIONS: [Action; 7] = [
    Action::Quiet,
    Action::ApiChurn,
    Action::FileChurn,
    Action::KillChaosBackend,
    Action::RestartChaosBackends,
    Action::AgentSigkill,
    Action::AgentSigterm,
];

struct Args {
    seconds: u64,
    seed: u64,
}

fn args() -> Args {
    let mut seconds = 60;
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        | 1;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--seconds" => seconds = value.parse().expect("--seconds N"),
            "--seed" => seed = value.parse::<u64>().expect("--seed S") | 1,
            other => panic!("unknown argument {other}; usage: mesh-soak --seconds N [--seed S]"),
        }
    }
    Args { seconds, seed }
}

/// A TCP service in the config file, with fast health checks.
fn service_toml(name: &str, vip: &str, backends: &[(SocketAddr, u32)]) -> String {
    let backends: Vec<String> = backends
        .iter()
        .map(|(addr, weight)| format!("{{ addr = \"{addr}\", weight = {weight} }}"))
        .collect();
    format!(
        "[[services]]\nname = \"{name}\"\nvip = \"{vip}\"\nbackends = [{}]\n\
         [services.health]\ntype = \"tcp\"\ninterval = \"200ms\"\ntimeout = \"100ms\"\nrise = 1\n\
         fall = 2\npassive_failures = 1\n\n",
        backends.join(", ")
    )
}

struct World {
    stable: Vec<TcpBackend>,
    chaos: Vec<TcpBackend>,
    udp: Vec<UdpBackend>,
    api_pool: Vec<TcpBackend>,
    file_pool: Vec<TcpBackend>,
    /// The registry's `api` and `file` services: backend index and weight, `None` if absent.
    api: Option<Vec<(usize, u32)>>,
    file: Option<Vec<(usize, u32)>>,
}

impl World {
    fn config(&self) -> String {
        let addrs = |pool: &[TcpBackend], picked: &[(usize, u32)]| -> Vec<(SocketAddr, u32)> {
            picked.iter().map(|&(i, w)| (pool[i].addr(), w)).collect()
        };
        let mut text = service_toml(
            "stable",
            STABLE_VIP,
            &self
                .stable
                .iter()
                .map(|b| (b.addr(), 1))
                .collect::<Vec<_>>(),
        );
        text.push_str(&service_toml(
            "chaos",
            CHAOS_VIP,
            &self.chaos.iter().map(|b| (b.addr(), 1)).collect::<Vec<_>>(),
        ));
        let udp: Vec<String> = self
            .udp
            .iter()
            .map(|b| format!("{{ addr = \"{}\" }}", b.addr()))
            .collect();
        text.push_str(&format!(
            "[[services]]\nname = \"udp\"\nvip = \"{UDP_VIP}\"\nprotocol = \"udp\"\n\
             backends = [{}]\n\n",
            udp.join(", ")
        ));
        if let Some(file) = &self.file {
            text.push_str(&service_toml(
                "file",
                FILE_VIP,
                &addrs(&self.file_pool, file),
            ));
        }
        text
    }

    /// The backend names each service may answer with now.
    fn expected(&self) -> BTreeMap<&'static str, BTreeSet<String>> {
        let names = |pool: &[TcpBackend], picked: &[(usize, u32)]| -> BTreeSet<String> {
            picked
                .iter()
                .map(|&(i, _)| pool[i].name().to_owned())
                .collect()
        };
        let mut out = BTreeMap::new();
        out.insert(
            "stable",
            self.stable.iter().map(|b| b.name().to_owned()).collect(),
        );
        out.insert(
            "chaos",
            self.chaos.iter().map(|b| b.name().to_owned()).collect(),
        );
        if let Some(api) = &self.api {
            out.insert("api", names(&self.api_pool, api));
        }
        if let Some(file) = &self.file {
            out.insert("file", names(&self.file_pool, file));
        }
        out
    }

    /// Backend addresses per service, as the maps must hold them once every backend is up.
    fn desired(&self) -> BTreeMap<String, BTreeSet<SocketAddr>> {
        let mut out = BTreeMap::new();
        out.insert(
            "stable".to_owned(),
            self.stable.iter().map(TcpBackend::addr).collect(),
        );
        out.insert(
            "chaos".to_owned(),
            self.chaos.iter().map(TcpBackend::addr).collect(),
        );
        out.insert(
            "udp".to_owned(),
            self.udp.iter().map(UdpBackend::addr).collect(),
        );
        if let Some(api) = &self.api {
            out.insert(
                "api".to_owned(),
                api.iter().map(|&(i, _)| self.api_pool[i].addr()).collect(),
            );
        }
        if let Some(file) = &self.file {
            out.insert(
                "file".to_owned(),
                file.iter()
                    .map(|&(i, _)| self.file_pool[i].addr())
                    .collect(),
            );
        }
        out
    }
}

fn api_json(pool: &[TcpBackend], picked: &[(usize, u32)]) -> String {
    let backends: Vec<serde_json::Value> = picked
        .iter()
        .map(|&(i, w)| serde_json::json!({ "addr": pool[i].addr().to_string(), "weight": w }))
        .collect();
    serde_json::json!({ "vip": API_VIP, "backends": backends }).to_string()
}

/// The backends per service that the maps route to (they have slots), from `mesh services`. A
/// new backend gets slots once its first health check passed.
fn applied(env: &TestEnv) -> BTreeMap<String, BTreeSet<SocketAddr>> {
    services(&env.bpffs)
        .services
        .iter()
        .map(|s| {
            let routed = s
                .backends
                .iter()
                .filter(|b| b.slots > 0)
                .map(|b| b.socket_addr())
                .collect();
            (s.name.clone(), routed)
        })
        .collect()
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[derive(Default)]
struct Tally {
    attempts: u64,
    errors: u64,
}

fn main() {
    let Args { seconds, seed } = args();
    println!("mesh-soak: {seconds} s, seed {seed} (rerun with --seed {seed})");
    let mut rng = Rng(seed);
    let mut world = World {
        stable: (0..2)
            .map(|i| TcpBackend::start(&format!("stable-{i}")))
            .collect(),
        chaos: (0..3)
            .map(|i| TcpBackend::start(&format!("chaos-{i}")))
            .collect(),
        udp: (0..2)
            .map(|i| UdpBackend::start(&format!("udp-{i}")))
            .collect(),
        api_pool: (0..4)
            .map(|i| TcpBackend::start(&format!("api-{i}")))
            .collect(),
        file_pool: (0..3)
            .map(|i| TcpBackend::start(&format!("file-{i}")))
            .collect(),
        api: None,
        file: None,
    };
    let mut env = TestEnv::start("soak", &world.config());
    let admin = env.agent.admin();

    let mut violations: Vec<String> = Vec::new();
    let mut actions: BTreeMap<Action, u32> = BTreeMap::new();
    let mut tallies: BTreeMap<&'static str, Tally> = BTreeMap::new();
    let mut rss: Vec<(u32, u64)> = Vec::new();
    let mut stable_counters: BTreeMap<SocketAddr, u64> = BTreeMap::new();
    let mut killed_last_round = false;
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut round = 0u32;
    while Instant::now() < deadline {
        round += 1;
        let action = ACTIONS[rng.below(ACTIONS.len())];
        if std::env::var_os("MESH_SOAK_VERBOSE").is_some() {
            println!("round {round}: {action:?}");
        }
        *actions.entry(action).or_default() += 1;
        let mut violation = |v: String| {
            println!("VIOLATION round {round} ({action:?}): {v}");
            violations.push(format!("round {round} ({action:?}): {v}"));
        };

        // Registry changes come before the clients start.
        match action {
            Action::ApiChurn => {
                if world.api.is_some() && rng.below(3) == 0 {
                    let answer = admin.delete("api");
                    if answer.status != 200 {
                        violation(format!("DELETE api: {} {}", answer.status, answer.body));
                    }
                    world.api = None;
                } else {
                    let picked: Vec<(usize, u32)> = rng
                        .subset(world.api_pool.len())
                        .into_iter()
                        .map(|i| (i, 1 + rng.below(4) as u32))
                        .collect();
                    let answer = admin.put("api", &api_json(&world.api_pool, &picked));
                    if answer.status != 200 {
                        violation(format!("PUT api: {} {}", answer.status, answer.body));
                    }
                    world.api = Some(picked);
                }
            }
            Action::FileChurn => {
                world.file = if world.file.is_some() && rng.below(3) == 0 {
                    None
                } else {
                    Some(
                        rng.subset(world.file_pool.len())
                            .into_iter()
                            .map(|i| (i, 1 + rng.below(4) as u32))
                            .collect(),
                    )
                };
                env.agent.write_config(&world.config());
            }
            _ => {}
        }
        if matches!(action, Action::ApiChurn | Action::FileChurn) {
            let want = world.desired();
            let mut last = BTreeMap::new();
            // The chaos service may lack a killed backend: compare the churned ones.
            let churned = |m: &BTreeMap<String, BTreeSet<SocketAddr>>| {
                m.iter()
                    .filter(|(k, _)| *k == "api" || *k == "file")
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect::<BTreeMap<_, _>>()
            };
            if !wait_until(APPLY_LIMIT, || {
                last = applied(&env);
                churned(&last) == churned(&want)
            }) {
                violation(format!(
                    "the maps did not reach the registry within {APPLY_LIMIT:?}: want {:?}, have {:?}",
                    churned(&want),
                    churned(&last)
                ));
            }
        }

        let expected = world.expected();
        let mut loops: Vec<(&'static str, ClientLoop)> = Vec::new();
        for (name, vip) in [
            ("stable", STABLE_VIP),
            ("chaos", CHAOS_VIP),
            ("api", API_VIP),
            ("file", FILE_VIP),
        ] {
            if expected.contains_key(name) {
                loops.push((
                    name,
                    ClientLoop::start(&env.cgroup, "connect-until", vip, 2, ROUND * 4, &[]),
                ));
            }
        }
        std::thread::sleep(MID_ROUND);
        let mut killed_now = false;
        match action {
            Action::KillChaosBackend => {
                let running: Vec<usize> = (0..world.chaos.len())
                    .filter(|&i| world.chaos[i].is_running())
                    .collect();
                if running.len() >= 2 {
                    world.chaos[running[rng.below(running.len())]].stop();
                    killed_now = true;
                }
            }
            Action::RestartChaosBackends => {
                for b in &mut world.chaos {
                    if !b.is_running() {
                        b.restart();
                    }
                }
            }
            Action::AgentSigkill => {
                env.agent.kill9();
                env.agent.restart();
            }
            Action::AgentSigterm => env.agent.restart(),
            _ => {}
        }
        std::thread::sleep(ROUND.saturating_sub(MID_ROUND));
        for (name, client) in loops {
            let result = client.stop();
            let tally = tallies.entry(name).or_default();
            tally.attempts += result.total.attempts;
            tally.errors += result.total.error_total();
            let allowed_errors = name == "chaos" && (killed_now || killed_last_round);
            if result.total.error_total() > 0 && !allowed_errors {
                violation(format!(
                    "{name}: {} failed connects of {} ({:?}) while it had a healthy backend",
                    result.total.error_total(),
                    result.total.attempts,
                    result.total.errors
                ));
            }
            for replier in result.total.replies.keys() {
                if !expected[name].contains(replier) {
                    violation(format!(
                        "{name}: a reply from {replier}, which was not in the registry ({:?})",
                        expected[name]
                    ));
                }
            }
        }
        let udp = probe_udp_in(&env.cgroup, UDP_VIP, 20);
        let tally = tallies.entry("udp").or_default();
        tally.attempts += 20;
        tally.errors += udp.errors().len() as u64;
        if !udp.errors().is_empty() {
            violation(format!("udp: errors {:?}", udp.error_counts()));
        }
        let now = services(&env.bpffs);
        if let Some(stable) = now.service("stable") {
            for (addr, count) in stable.connections() {
                let before = stable_counters.insert(addr, count).unwrap_or(0);
                if count < before {
                    violation(format!(
                        "stable: the connection counter of {addr} went down from {before} to {count}"
                    ));
                }
            }
        } else {
            violation("stable: not in the maps".to_owned());
        }
        if let Some(kib) = rss_kib(env.agent.pid()) {
            rss.push((env.agent.pid(), kib));
        }
        if std::env::var_os("MESH_SOAK_VERBOSE").is_some() {
            let registry: BTreeSet<SocketAddr> =
                world.desired().values().flatten().copied().collect();
            println!(
                "round {round}: backends map {} entries, registry {} backends",
                map_len(&env.bpffs, "backends"),
                registry.len()
            );
        }
        killed_last_round = killed_now;
    }

    // The end: every backend up, the maps exactly the registry.
    for b in &mut world.chaos {
        if !b.is_running() {
            b.restart();
        }
    }
    let want = world.desired();
    let mut last = BTreeMap::new();
    if !wait_until(Duration::from_secs(10), || {
        last = applied(&env);
        last == want
    }) {
        violations.push(format!(
            "end: the maps do not hold the registry: want {want:?}, have {last:?}"
        ));
    }
    let distinct_backends: BTreeSet<SocketAddr> = want.values().flatten().copied().collect();
    let expected_lens = [
        ("services", want.len()),
        ("service_names", want.len()),
        ("backends", distinct_backends.len()),
    ];
    let lens_match = || {
        expected_lens
            .iter()
            .all(|&(map, count)| map_len(&env.bpffs, map) == count)
    };
    // Entries a killed agent left behind are removed by the full reconcile of `[agent] resync`
    // (default 30 s): wait for one, and report how long the maps held more than the registry.
    let settle = Instant::now();
    let first_lens: Vec<(&str, usize)> = expected_lens
        .iter()
        .map(|&(map, _)| (map, map_len(&env.bpffs, map)))
        .collect();
    let settled = wait_until(END_SETTLE, lens_match);
    if settle.elapsed() > Duration::from_millis(100) {
        println!(
            "end: the maps held entries the registry does not ({first_lens:?}, want \
             {expected_lens:?}); {} after {:?}",
            if settled { "gone" } else { "still there" },
            settle.elapsed()
        );
    }
    for (map, count) in expected_lens {
        let len = map_len(&env.bpffs, map);
        if len != count {
            let mut detail = String::new();
            if map == "backends" {
                // Which addresses are there that the registry does not have, and whose.
                let dump = integration_tests::maps::map_dump(&env.bpffs, map);
                let ports: BTreeSet<u64> = dump
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|e| e["formatted"]["value"]["port"].as_u64())
                    .collect();
                let wanted: BTreeSet<u64> = distinct_backends
                    .iter()
                    .map(|a| u64::from(a.port()))
                    .collect();
                let owner = |port: u64| -> String {
                    let pools = [
                        world
                            .stable
                            .iter()
                            .map(|b| (b.addr(), b.name()))
                            .collect::<Vec<_>>(),
                        world.chaos.iter().map(|b| (b.addr(), b.name())).collect(),
                        world
                            .api_pool
                            .iter()
                            .map(|b| (b.addr(), b.name()))
                            .collect(),
                        world
                            .file_pool
                            .iter()
                            .map(|b| (b.addr(), b.name()))
                            .collect(),
                        world.udp.iter().map(|b| (b.addr(), b.name())).collect(),
                    ];
                    pools
                        .iter()
                        .flatten()
                        .find(|(a, _)| u64::from(a.port()) == port)
                        .map_or_else(|| format!("port {port}"), |(_, n)| (*n).to_owned())
                };
                let extra: Vec<String> = ports.difference(&wanted).map(|&p| owner(p)).collect();
                let missing: Vec<String> = wanted.difference(&ports).map(|&p| owner(p)).collect();
                detail =
                    format!(" (in the map, not in the registry: {extra:?}; missing: {missing:?})");
            }
            violations.push(format!(
                "end: map {map} has {len} entries, want {count}{detail}"
            ));
        }
    }
    let log = env.agent.log_text();
    let errors: Vec<&str> = log.lines().filter(|l| l.contains(" ERROR ")).collect();
    for line in &errors {
        violations.push(format!("end: ERROR in the agent log: {line}"));
    }

    println!("\nmesh-soak report: {round} rounds of {ROUND:?}, seed {seed}");
    println!("actions: {actions:?}");
    for (name, t) in &tallies {
        println!("  {name}: {} attempts, {} failed", t.attempts, t.errors);
    }
    if let (Some(first), Some(last)) = (rss.first(), rss.last()) {
        let same: Vec<u64> = rss
            .iter()
            .filter(|(pid, _)| *pid == last.0)
            .map(|(_, k)| *k)
            .collect();
        println!(
            "agent RSS: first round {} KiB, last round {} KiB; the last agent process (pid {}) \
             over its {} rounds: min {} KiB, max {} KiB",
            first.1,
            last.1,
            last.0,
            same.len(),
            same.iter().min().unwrap_or(&0),
            same.iter().max().unwrap_or(&0)
        );
    }
    println!("agent log: {} ERROR lines", errors.len());
    if violations.is_empty() {
        println!("mesh-soak: PASS (no violation)");
    } else {
        println!("mesh-soak: FAIL, {} violations:", violations.len());
        for v in &violations {
            println!("  {v}");
        }
        drop(env);
        std::process::exit(1);
    }
}
