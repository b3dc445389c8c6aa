//! The data path outlives the agent: killed (-9) or stopped (SIGTERM) agents leave programs
//! attached and maps pinned, a new agent adopts them and writes only the difference, an agent
//! binary replacing the programs updates the pinned links in place, and `mesh cleanup` removes
//! it all. Clients connect through the VIP all along; a decoy listens on the VIP itself, so a
//! connect that is not translated is seen, not just failed.
//!
//! Privileged: run as root through `cargo xtask test` (single-threaded; the harness serializes
//! the tests anyway). Each test uses its own VIPs (127.100.47-49.* and 127.100.40.*), cgroup and
//! bpffs directory.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Display;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use integration_tests::clients::http_args;
use integration_tests::observe::{
    LinkInfo, Sample, ServicesWatcher, applied_writes, bpftool_json, health_transitions,
    listed_ids, max_gap, metric_value, pinned_links, poll_service, read_services, slot_map,
    slots_of,
};
use integration_tests::services::ServiceStatus;
use integration_tests::{
    ClientLoop, HealthReply, HttpBackend, ProbeSummary, ServiceSpec, TestEnv, probe_summary_in,
    render_config, wait_until,
};

/// Time bound of an ordinary probe run.
const PROBE_LIMIT: Duration = Duration::from_secs(60);
/// Time bound of a background client loop (they are stopped long before).
const LOOP_LIMIT: Duration = Duration::from_secs(60);
/// Per-connect timeout of the client loops: a lost connect shows as an error, not a hang.
const CLIENT_TIMEOUT: [&str; 2] = ["--timeout-ms", "1000"];
/// The programs the agent attaches (one pinned link each).
const PROGRAMS: usize = 10;
/// How often the services watcher runs `mesh services`.
const SAMPLE_EVERY: Duration = Duration::from_millis(10);

fn sock(addr: &str) -> SocketAddr {
    addr.parse()
        .unwrap_or_else(|e| panic!("{addr:?} is not IP:PORT: {e}"))
}

/// HTTP health checks every 100 ms (timeout 100 ms, rise 2, fall 3), as an inline table.
const CHECK: &str = "{ type = \"http\", path = \"/healthz\", interval = \"100ms\", \
                     timeout = \"100ms\", rise = 2, fall = 3 }";

fn checked_service(name: &str, vip: impl Display, backends: &[&HttpBackend]) -> ServiceSpec {
    ServiceSpec::tcp(name, vip)
        .set("health", CHECK)
        .backends(backends.iter().map(|b| b.addr()))
}

fn plain_service(name: &str, vip: impl Display, backends: &[&HttpBackend]) -> ServiceSpec {
    ServiceSpec::tcp(name, vip).backends(backends.iter().map(|b| b.addr()))
}

fn decoy_on(name: &str, vip: &str) -> HttpBackend {
    HttpBackend::start_on(name, sock(vip), "/healthz", HealthReply::Status(200))
}

/// Waits (5 s) until the agent reports every backend healthy and each holds slots of `name`.
#[track_caller]
fn wait_healthy(env: &TestEnv, name: &str, backends: &[&HttpBackend]) {
    let result = poll_service(&env.bpffs, name, Duration::from_secs(5), |s| {
        let text = env.agent.metrics_text();
        backends.iter().all(|b| {
            let addr = b.addr().to_string();
            slots_of(s, b.addr()) > 0
                && metric_value(
                    &text,
                    "mesh_backend_health",
                    &[("vip", &s.vip), ("backend", &addr)],
                ) == Some(1.0)
        })
    });
    if let Err(e) = result {
        panic!("{e}\nbackends: {backends:#?}");
    }
}

fn status_of(env: &TestEnv, name: &str) -> ServiceStatus {
    read_services(env.bpffs.path())
        .unwrap_or_else(|e| panic!("{e}"))
        .service(name)
        .cloned()
        .unwrap_or_else(|| panic!("`mesh services` has no service {name:?}"))
}

fn http_probe(env: &TestEnv, vip: impl Display, count: usize) -> ProbeSummary {
    probe_summary_in(&env.cgroup, http_args(vip, count), PROBE_LIMIT)
}

#[track_caller]
fn assert_exact_split(what: &str, summary: &ProbeSummary, want: &[(&HttpBackend, u64)]) {
    assert!(
        summary.errors.is_empty(),
        "{what}: errors {:?}; replies {:?}",
        summary.errors,
        summary.replies
    );
    let want: BTreeMap<String, u64> = want
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(b, n)| (b.name().to_owned(), *n))
        .collect();
    assert_eq!(summary.replies, want, "{what}: replies per backend");
}

/// What a services watcher saw, summarised for the report and the assertions.
struct Watched {
    samples: usize,
    failed: Vec<String>,
    missing: usize,
    /// Samples with fewer than `want` slots, as (time, slot count).
    short: Vec<(Duration, u64)>,
    min_slots: u64,
    max_gap: Duration,
}

fn summarize(samples: &[Sample], want: u64) -> Watched {
    let mut watched = Watched {
        samples: samples.len(),
        failed: Vec::new(),
        missing: 0,
        short: Vec::new(),
        min_slots: u64::MAX,
        max_gap: max_gap(samples),
    };
    for s in samples {
        match &s.service {
            Err(e) => watched.failed.push(format!("at {:?}: {e}", s.at)),
            Ok(None) => watched.missing += 1,
            Ok(Some(status)) => {
                watched.min_slots = watched.min_slots.min(status.slot_count);
                if status.slot_count < want {
                    watched.short.push((s.at, status.slot_count));
                }
            }
        }
    }
    watched
}

#[track_caller]
fn assert_never_empty(what: &str, watched: &Watched, want: u64) {
    assert!(
        watched.samples >= 20,
        "{what}: only {} samples of `mesh services`",
        watched.samples
    );
    assert!(
        watched.failed.is_empty(),
        "{what}: `mesh services` failed: {:?}",
        watched.failed
    );
    assert_eq!(watched.missing, 0, "{what}: the service was missing");
    let empty: Vec<&(Duration, u64)> = watched.short.iter().filter(|(_, n)| *n == 0).collect();
    assert!(
        empty.is_empty(),
        "{what}: the service was empty (slot_count 0) at {} of {} samples: {empty:?}",
        empty.len(),
        watched.samples
    );
    assert!(
        watched.short.is_empty(),
        "{what}: a restart ejects nobody, yet fewer than {want} slots at {:?}",
        watched.short
    );
}

// ---------------------------------------------------------------------------------------------
// 7. kill -9 and restart: nothing dropped, the service never empty
// ---------------------------------------------------------------------------------------------

#[test]
fn agent_kill9_and_restart_drop_nothing() {
    let backends = [
        HttpBackend::start("k9-a"),
        HttpBackend::start("k9-b"),
        HttpBackend::start("k9-c"),
    ];
    let all: Vec<&HttpBackend> = backends.iter().collect();
    let vip = "127.100.47.1:80";
    let decoy = decoy_on("k9-decoy", vip);
    let mut env = TestEnv::start(
        "rkill9",
        &render_config(&[checked_service("k9", vip, &all)]),
    );
    wait_healthy(&env, "k9", &all);

    let watcher = ServicesWatcher::start(&env.bpffs, "k9", SAMPLE_EVERY, LOOP_LIMIT);
    let clients = ClientLoop::start(
        &env.cgroup,
        "http-until",
        vip,
        2,
        LOOP_LIMIT,
        &CLIENT_TIMEOUT,
    );
    let served = |bs: &[&HttpBackend]| bs.iter().map(|b| b.data_requests()).sum::<usize>();
    assert!(
        wait_until(Duration::from_secs(5), || served(&all) > 100),
        "the clients do not get through: {all:#?}"
    );
    std::thread::sleep(Duration::from_millis(300));

    let killed_pid = env.agent.pid();
    env.agent.kill9();
    let killed = Instant::now();
    let before_dead = served(&all);
    std::thread::sleep(Duration::from_secs(1));
    let while_dead = served(&all) - before_dead;
    let mark = env.agent.log_mark();
    env.agent.restart();
    let restart_took = killed.elapsed();
    // Some check rounds of the new agent, still under load.
    std::thread::sleep(Duration::from_millis(700));
    let result = clients.stop();
    let samples = watcher.stop();
    let watched = summarize(&samples, 3);
    let log = env.agent.log_since(mark);
    let ejected: Vec<String> = health_transitions(&log)
        .into_iter()
        .filter(|t| t.to != "healthy")
        .map(|t| t.line)
        .collect();
    println!(
        "kill -9 (pid {killed_pid}): ready again {restart_took:?} after the kill; {while_dead} \
         requests served while no agent ran; clients: {} connects in {:?}, replies {:?}, errors \
         {:?}; `mesh services`: {} samples (largest gap {:?}), slot_count min {}, {} failed",
        result.total.attempts,
        result.ran_for,
        result.total.replies,
        result.total.errors,
        watched.samples,
        watched.max_gap,
        watched.min_slots,
        watched.failed.len()
    );
    assert!(
        while_dead > 0,
        "no requests were served while the agent was dead"
    );
    assert!(
        result.total.errors.is_empty(),
        "failed connects across kill -9 and restart: {:?}",
        result.total.errors
    );
    assert_eq!(result.total.count("k9-decoy"), 0, "replies from the decoy");
    assert_eq!(decoy.accepted(), 0, "connects reached the VIP itself");
    for b in &all {
        assert!(
            result.total.count(b.name()) > 0,
            "{} got nothing: {:?}",
            b.name(),
            result.total.replies
        );
    }
    assert_never_empty("kill -9 and restart", &watched, 3);
    assert!(
        log.contains("adopted the existing data path"),
        "the new agent should adopt the pins; log:\n{log}"
    );
    assert!(
        ejected.is_empty(),
        "the restart ejected backends: {ejected:#?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 8. SIGTERM leaves the data path; `mesh cleanup` removes it
// ---------------------------------------------------------------------------------------------

#[test]
fn sigterm_leaves_the_data_path_and_cleanup_removes_it() {
    let backends = [
        HttpBackend::start("term-a"),
        HttpBackend::start("term-b"),
        HttpBackend::start("term-c"),
    ];
    let all: Vec<&HttpBackend> = backends.iter().collect();
    let vip = "127.100.48.1:80";
    let decoy = decoy_on("term-decoy", vip);
    let mut env = TestEnv::start(
        "rterm",
        &render_config(&[checked_service("term", vip, &all)]),
    );
    wait_healthy(&env, "term", &all);
    let links = pinned_links(&env.bpffs);
    assert_eq!(links.len(), PROGRAMS, "pinned links: {links:?}");

    let status = env
        .agent
        .terminate(Duration::from_secs(10))
        .expect("the agent exits within 10 s of SIGTERM");
    assert!(
        status.success(),
        "the agent exited with {status} on SIGTERM"
    );

    // No agent: connects are still balanced, exactly.
    let balanced = http_probe(&env, vip, 300);
    assert_exact_split(
        "with no agent running",
        &balanced,
        &[(all[0], 100), (all[1], 100), (all[2], 100)],
    );
    assert_eq!(decoy.accepted(), 0, "connects reached the VIP itself");

    // bpftool still lists our links and their programs, attached to our cgroup.
    let listed_links = listed_ids(&bpftool_json(&["link", "show"]));
    let listed_progs = listed_ids(&bpftool_json(&["prog", "show"]));
    for (name, link) in &links {
        let listed = listed_links
            .get(&link.id)
            .unwrap_or_else(|| panic!("`bpftool link show` lacks link {} ({name})", link.id));
        assert_eq!(
            listed.get("prog_id").and_then(serde_json::Value::as_u64),
            Some(link.prog_id),
            "link {} ({name}): {listed}",
            link.id
        );
        let prog = listed_progs.get(&link.prog_id).unwrap_or_else(|| {
            panic!(
                "`bpftool prog show` lacks program {} ({name})",
                link.prog_id
            )
        });
        let prog_name = prog.get("name").and_then(serde_json::Value::as_str);
        assert!(
            prog_name.is_some_and(|n| name.starts_with(n) && !n.is_empty()),
            "program {} behind link {name} is named {prog_name:?}",
            link.prog_id
        );
    }
    let attached = cgroup_prog_ids(&env);
    let linked: BTreeSet<u64> = links.values().map(|l| l.prog_id).collect();
    assert_eq!(attached, linked, "programs attached to the test cgroup");
    println!(
        "sigterm: the agent ended with {status}; 300 connects balanced 100/100/100 with no agent; {} links and \
         programs still listed: {:?}",
        links.len(),
        links
    );

    // Cleanup detaches: the VIP is just an address again, and the pins are gone.
    let cleanup = env.bpffs.run_cleanup();
    assert!(
        cleanup.status.success(),
        "`mesh cleanup` failed: {}",
        cleanup.describe()
    );
    let untranslated = http_probe(&env, vip, 30);
    assert!(
        untranslated.errors.is_empty(),
        "after cleanup: {untranslated:?}"
    );
    assert_eq!(
        untranslated.replies,
        BTreeMap::from([("term-decoy".to_owned(), 30)]),
        "after cleanup connects to the VIP must reach the decoy"
    );
    assert!(
        !env.bpffs.path().exists(),
        "{} still exists after `mesh cleanup`",
        env.bpffs.path().display()
    );
    let mut left = Vec::new();
    let detached = wait_until(Duration::from_secs(5), || {
        let listed = listed_ids(&bpftool_json(&["link", "show"]));
        left = links
            .values()
            .filter(|l| listed.contains_key(&l.id))
            .map(|l| l.id)
            .collect();
        left.is_empty()
    });
    assert!(detached, "links still listed after cleanup: {left:?}");
    assert!(
        cgroup_prog_ids(&env).is_empty(),
        "programs still attached to the test cgroup after cleanup"
    );
}

/// Ids of the programs `bpftool cgroup show <test cgroup>` lists (it prints nothing at all,
/// not `[]`, for a cgroup without programs).
fn cgroup_prog_ids(env: &TestEnv) -> BTreeSet<u64> {
    let mut cmd = std::process::Command::new("bpftool");
    cmd.args(["cgroup", "show"])
        .arg(env.cgroup.path())
        .arg("-j");
    let out = integration_tests::process::run_bounded(&mut cmd, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("`bpftool cgroup show`: {e}"));
    assert!(
        out.status.success(),
        "`bpftool cgroup show` failed: {}",
        out.describe()
    );
    if out.stdout.trim().is_empty() {
        return BTreeSet::new();
    }
    let json: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "`bpftool cgroup show` printed invalid JSON ({e}): {}",
            out.stdout
        )
    });
    listed_ids(&json).into_keys().collect()
}

// ---------------------------------------------------------------------------------------------
// 9. A restart with a changed config writes only the difference
// ---------------------------------------------------------------------------------------------

#[test]
fn restart_with_changed_config_rewrites_only_the_difference() {
    let a = [
        HttpBackend::start("diff-a1"),
        HttpBackend::start("diff-a2"),
        HttpBackend::start("diff-a3"),
    ];
    let b = [
        HttpBackend::start("diff-b1"),
        HttpBackend::start("diff-b2"),
        HttpBackend::start("diff-b3"),
    ];
    let replacement = HttpBackend::start("diff-b4");
    let (vip_a, vip_b) = ("127.100.49.1:80", "127.100.49.2:80");
    let a_refs: Vec<&HttpBackend> = a.iter().collect();
    let before_config = render_config(&[
        plain_service("same", vip_a, &a_refs),
        plain_service("changed", vip_b, &[&b[0], &b[1], &b[2]]),
    ]);
    let mut env = TestEnv::start("rdiff", &before_config);
    let initial_writes = env
        .agent
        .log_text()
        .lines()
        .find_map(applied_writes)
        .expect("the first apply logs `applied writes=N`");
    let same_before = status_of(&env, "same");
    let changed_before = status_of(&env, "changed");

    let status = env
        .agent
        .terminate(Duration::from_secs(10))
        .expect("the agent exits within 10 s of SIGTERM");
    assert!(
        status.success(),
        "the agent exited with {status} on SIGTERM"
    );
    env.agent.write_config(&render_config(&[
        plain_service("same", vip_a, &a_refs),
        plain_service("changed", vip_b, &[&b[0], &b[1], &replacement]),
    ]));
    let mark = env.agent.log_mark();
    env.agent.restart();
    let log = env.agent.log_since(mark);
    let applied: Vec<&str> = log
        .lines()
        .filter(|l| applied_writes(l).is_some())
        .collect();
    let writes = applied
        .first()
        .and_then(|l| applied_writes(l))
        .unwrap_or_else(|| panic!("no `applied writes=N` line after the restart; log:\n{log}"));
    let map_writes: Vec<&str> = log.lines().filter(|l| l.contains("map write")).collect();
    let same_after = status_of(&env, "same");
    let changed_after = status_of(&env, "changed");
    println!(
        "diff: the first start wrote {initial_writes}; the restart with one backend replaced \
         wrote {writes} ({}); generations: same {} -> {}, changed {} -> {}\n{}",
        applied.first().copied().unwrap_or_default(),
        same_before.generation,
        same_after.generation,
        changed_before.generation,
        changed_after.generation,
        map_writes.join("\n")
    );
    // Replacing one of three backends: put the new backend, its counter and active entry, the
    // new slot set, the service entry; delete the old slot set, active entry, counter and
    // backend. Nine writes; nothing of the unchanged service.
    assert!(
        writes <= 10 && writes < initial_writes / 2,
        "the restart rewrote {writes} entries (the first start wrote {initial_writes}); log:\n{log}"
    );
    assert!(
        map_writes
            .iter()
            .all(|l| !l.contains(&format!("service_id: {}", same_after.id))
                && !l.contains(&vip_a.to_string())),
        "the restart wrote entries of the unchanged service:\n{}",
        map_writes.join("\n")
    );
    assert_eq!(
        same_after.generation, same_before.generation,
        "the unchanged service got a new slot set"
    );
    assert_eq!(slot_map(&same_after), slot_map(&same_before));
    assert_ne!(
        changed_after.generation, changed_before.generation,
        "the changed service kept its slot set"
    );
    assert_eq!(
        slot_map(&changed_after),
        [b[0].addr(), b[1].addr(), replacement.addr()]
            .into_iter()
            .map(|a| (a.to_string(), 1))
            .collect::<BTreeMap<String, u64>>(),
        "{changed_after:#?}"
    );
    assert_exact_split(
        "changed",
        &http_probe(&env, vip_b, 300),
        &[(&b[0], 100), (&b[1], 100), (&replacement, 100)],
    );
    assert_exact_split(
        "same",
        &http_probe(&env, vip_a, 300),
        &[(&a[0], 100), (&a[1], 100), (&a[2], 100)],
    );
    assert_eq!(b[2].data_requests(), 0, "the removed backend got traffic");
}

// ---------------------------------------------------------------------------------------------
// 10. A new agent replaces the programs behind the pinned links (BPF_LINK_UPDATE)
// ---------------------------------------------------------------------------------------------

#[test]
fn program_upgrade_replaces_programs_in_place() {
    let backends = [
        HttpBackend::start("up-a"),
        HttpBackend::start("up-b"),
        HttpBackend::start("up-c"),
    ];
    let all: Vec<&HttpBackend> = backends.iter().collect();
    let vip = "127.100.40.1:80";
    let decoy = decoy_on("up-decoy", vip);
    let mut env = TestEnv::start(
        "rupgrade",
        &render_config(&[checked_service("up", vip, &all)]),
    );
    wait_healthy(&env, "up", &all);
    let before = pinned_links(&env.bpffs);
    assert_eq!(before.len(), PROGRAMS, "pinned links: {before:?}");
    let attached_before = cgroup_prog_ids(&env);

    let watcher = ServicesWatcher::start(&env.bpffs, "up", SAMPLE_EVERY, LOOP_LIMIT);
    let clients = ClientLoop::start(
        &env.cgroup,
        "http-until",
        vip,
        2,
        LOOP_LIMIT,
        &CLIENT_TIMEOUT,
    );
    let served = |bs: &[&HttpBackend]| bs.iter().map(|b| b.data_requests()).sum::<usize>();
    assert!(
        wait_until(Duration::from_secs(5), || served(&all) > 100),
        "the clients do not get through: {all:#?}"
    );
    std::thread::sleep(Duration::from_millis(300));
    let old_pid = env.agent.pid();
    let started = Instant::now();
    // SIGTERM the running agent and start a new instance of the binary on the same pins.
    env.agent.restart();
    let took = started.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let result = clients.stop();
    let watched = summarize(&watcher.stop(), 3);
    let after = pinned_links(&env.bpffs);
    let attached_after = cgroup_prog_ids(&env);

    let changed: BTreeMap<&String, (LinkInfo, Option<LinkInfo>)> = before
        .iter()
        .map(|(name, link)| (name, (*link, after.get(name).copied())))
        .collect();
    println!(
        "upgrade: agent {old_pid} -> {} in {took:?}; links (before -> after): {changed:?}; \
         clients: {} connects, errors {:?}, replies {:?}; `mesh services`: {} samples, slot_count \
         min {}",
        env.agent.pid(),
        result.total.attempts,
        result.total.errors,
        result.total.replies,
        watched.samples,
        watched.min_slots
    );
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>(),
        "pinned links"
    );
    for (name, (old, new)) in &changed {
        let new = new.unwrap_or_else(|| panic!("link {name} is gone"));
        assert_eq!(
            new.id, old.id,
            "link {name} was replaced instead of updated in place"
        );
        assert_ne!(
            new.prog_id, old.prog_id,
            "link {name} still runs the old program"
        );
    }
    // `bpftool link show` (all links of the machine) agrees with the pins.
    let listed_links = listed_ids(&bpftool_json(&["link", "show"]));
    for (name, link) in &after {
        let listed = listed_links
            .get(&link.id)
            .and_then(|l| l.get("prog_id"))
            .and_then(serde_json::Value::as_u64);
        assert_eq!(
            listed,
            Some(link.prog_id),
            "`bpftool link show` for link {} ({name})",
            link.id
        );
    }
    let new_progs: BTreeSet<u64> = after.values().map(|l| l.prog_id).collect();
    assert_eq!(
        attached_after, new_progs,
        "programs attached to the cgroup after the upgrade (before: {attached_before:?})"
    );
    // The old programs are gone once nothing holds them.
    let old_progs: BTreeSet<u64> = before.values().map(|l| l.prog_id).collect();
    let mut lingering = BTreeSet::new();
    let freed = wait_until(Duration::from_secs(5), || {
        let listed = listed_ids(&bpftool_json(&["prog", "show"]));
        lingering = old_progs
            .iter()
            .copied()
            .filter(|id| listed.contains_key(id))
            .collect();
        lingering.is_empty()
    });
    assert!(freed, "old programs still loaded: {lingering:?}");

    assert!(
        result.total.errors.is_empty(),
        "failed connects across the upgrade: {:?}",
        result.total.errors
    );
    assert_eq!(result.total.count("up-decoy"), 0, "replies from the decoy");
    assert_eq!(decoy.accepted(), 0, "connects reached the VIP itself");
    assert_never_empty("upgrade", &watched, 3);
}
