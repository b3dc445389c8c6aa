//! Health checking end to end: real HTTP backends whose health endpoint the test switches, an
//! agent checking them, and clients connecting through the VIP from inside the test cgroup.
//! Ejection and rejoin are timed and the failed client connects counted; the numbers are
//! printed (`cargo test -- --nocapture` shows them).
//!
//! Privileged: run as root through `cargo xtask test` (single-threaded; the harness serializes
//! the tests anyway). Each test uses its own VIPs (127.100.41-46.*), cgroup and bpffs directory.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use integration_tests::clients::{LoopResult, http_args};
use integration_tests::observe::{
    HealthTransition, find_backend, health_transitions, log_line_time, metric_value,
    now_epoch_secs, poll_service, read_services, slot_map, slots_of,
};
use integration_tests::services::ServiceStatus;
use integration_tests::{
    ClientLoop, HealthReply, HttpBackend, ProbeSummary, ServiceSpec, TestEnv, probe_summary_in,
    render_config, spawn_probe_in, wait_until,
};

/// Time bound of an ordinary probe run.
const PROBE_LIMIT: Duration = Duration::from_secs(60);
/// Time bound of a background client loop (they are stopped long before).
const LOOP_LIMIT: Duration = Duration::from_secs(40);
/// Per-connect timeout of the client loops: a lost connect shows as an error, not a hang.
const CLIENT_TIMEOUT: [&str; 2] = ["--timeout-ms", "1000"];
/// The first checks of backends added together all start within 100 ms (README), not spread
/// over their interval; 100 ms of slack for a busy machine (measured: 77 ms).
const FIRST_CHECK_SPREAD: Duration = Duration::from_millis(200);
/// Kill to the agent's passive-ejection log line (measured: 2-20 ms, 78 ms while another test
/// suite ran on the machine).
const PASSIVE_LOGGED: Duration = Duration::from_millis(250);
/// Kill to `mesh services` showing the passive ejection (measured: 9-26 ms, 354 ms while
/// another test suite ran on the machine).
const PASSIVE_EJECTED: Duration = Duration::from_secs(1);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn sock(addr: &str) -> SocketAddr {
    addr.parse()
        .unwrap_or_else(|e| panic!("{addr:?} is not IP:PORT: {e}"))
}

/// A `[services.health]` table, written as an inline table.
#[derive(Debug, Clone)]
struct Check {
    fields: Vec<(String, String)>,
}

impl Check {
    /// `type = "http"`, `path = "/healthz"` and the given timings.
    fn http(interval_ms: u64, timeout_ms: u64, rise: u32, fall: u32, passive: u32) -> Check {
        Check {
            fields: vec![
                ("type".into(), "\"http\"".into()),
                ("path".into(), "\"/healthz\"".into()),
                ("interval".into(), format!("\"{interval_ms}ms\"")),
                ("timeout".into(), format!("\"{timeout_ms}ms\"")),
                ("rise".into(), rise.to_string()),
                ("fall".into(), fall.to_string()),
                ("passive_failures".into(), passive.to_string()),
            ],
        }
    }

    /// Adds a field; `raw` is written as TOML as it is.
    fn with(mut self, key: &str, raw: &str) -> Check {
        self.fields.push((key.to_owned(), raw.to_owned()));
        self
    }

    fn toml(&self) -> String {
        let fields: Vec<String> = self
            .fields
            .iter()
            .map(|(k, v)| format!("{k} = {v}"))
            .collect();
        format!("{{ {} }}", fields.join(", "))
    }
}

/// A TCP service with health checks over `backends` (weight 1; `drained` ones get `drain = true`).
fn service(
    name: &str,
    vip: impl Display,
    backends: &[&HttpBackend],
    drained: &[&HttpBackend],
    check: &Check,
) -> ServiceSpec {
    let mut spec = ServiceSpec::tcp(name, vip).set("health", &check.toml());
    for b in backends {
        spec = spec.backend(b.addr(), 1);
        if drained.iter().any(|d| d.addr() == b.addr()) {
            spec = spec.set_on_last_backend("drain", "true");
        }
    }
    spec
}

/// Waits until the agent reports every backend in `active` healthy (`mesh_backend_health` 1)
/// and each holds slots of service `name`; returns how long it took.
///
/// Slots alone are not enough: before any check has passed, every backend of a service is
/// "unknown", and fail-open puts them all in rotation.
#[track_caller]
fn wait_active(env: &TestEnv, name: &str, active: &[&HttpBackend], limit: Duration) -> Duration {
    match poll_service(&env.bpffs, name, limit, |s| {
        active
            .iter()
            .all(|b| slots_of(s, b.addr()) > 0 && health_metric(env, &s.vip, b) == Some(1.0))
    }) {
        Ok((took, _)) => took,
        Err(e) => panic!(
            "{e}\nbackends: {active:#?}\nhealth metrics:\n{}",
            health_lines(env)
        ),
    }
}

/// The `mesh_backend_health` lines of /metrics.
fn health_lines(env: &TestEnv) -> String {
    env.agent
        .metrics_text()
        .lines()
        .filter(|l| l.starts_with("mesh_backend_health"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits (5 s) until every backend has served at least one more data request than `before`.
#[track_caller]
fn wait_traffic(backends: &[&HttpBackend]) {
    let before: Vec<usize> = backends.iter().map(|b| b.data_requests()).collect();
    let ok = wait_until(Duration::from_secs(5), || {
        backends
            .iter()
            .zip(&before)
            .all(|(b, n)| b.data_requests() > *n)
    });
    assert!(
        ok,
        "the client loop does not reach every backend: {backends:#?}"
    );
}

/// `name -> n` for the given backends, as a summary's `replies`.
fn split(pairs: &[(&HttpBackend, u64)]) -> BTreeMap<String, u64> {
    pairs
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(b, n)| (b.name().to_owned(), *n))
        .collect()
}

/// `mesh-probe http --count N` from inside the test cgroup.
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
    assert_eq!(summary.replies, split(want), "{what}: replies per backend");
}

/// Errors other than ECONNREFUSED (a stopped backend) in a client loop's result.
fn unexpected_errors(result: &LoopResult) -> BTreeMap<String, u64> {
    result
        .total
        .errors
        .iter()
        .filter(|(e, _)| e.as_str() != "ECONNREFUSED")
        .map(|(e, n)| (e.clone(), *n))
        .collect()
}

fn refused(result: &LoopResult) -> u64 {
    result
        .total
        .errors
        .get("ECONNREFUSED")
        .copied()
        .unwrap_or(0)
}

/// The first logged transition of `backend` (behind `vip`) to `to`.
fn transition(
    env: &TestEnv,
    mark: usize,
    vip: &str,
    backend: &HttpBackend,
    to: &str,
) -> Option<HealthTransition> {
    health_transitions(&env.agent.log_since(mark))
        .into_iter()
        .find(|t| t.vip.starts_with(vip) && t.backend == backend.addr().to_string() && t.to == to)
}

/// Waits (3 s) for the transition and returns it; panics with the log since `mark`.
#[track_caller]
fn wait_transition(
    env: &TestEnv,
    mark: usize,
    vip: &str,
    backend: &HttpBackend,
    to: &str,
) -> HealthTransition {
    let mut found = None;
    wait_until(Duration::from_secs(3), || {
        found = transition(env, mark, vip, backend, to);
        found.is_some()
    });
    found.unwrap_or_else(|| {
        panic!(
            "no `backend health changed` line for {} behind {vip} to {to}; log since then:\n{}",
            backend.addr(),
            env.agent.log_since(mark)
        )
    })
}

/// `mesh_backend_health` of `backend` behind `vip` (`127.100.0.1:80`), from /metrics.
fn health_metric(env: &TestEnv, vip: &str, backend: &HttpBackend) -> Option<f64> {
    let text = env.agent.metrics_text();
    let addr = backend.addr().to_string();
    metric_value(
        &text,
        "mesh_backend_health",
        &[("vip", vip), ("protocol", "tcp"), ("backend", &addr)],
    )
}

/// Milliseconds from `wall` (seconds since the epoch) to the time of a log line.
fn logged_after_ms(t: &HealthTransition, wall: f64) -> String {
    logged_after(t, wall).map_or_else(|| "?".into(), |d| format!("{:.0}", d.as_secs_f64() * 1e3))
}

/// From `wall` (seconds since the epoch) to the time of a log line (None without a time, or
/// if the line is older).
fn logged_after(t: &HealthTransition, wall: f64) -> Option<Duration> {
    log_line_time(&t.line).and_then(|at| Duration::try_from_secs_f64(at - wall).ok())
}

fn status_of(env: &TestEnv, name: &str) -> ServiceStatus {
    read_services(env.bpffs.path())
        .unwrap_or_else(|e| panic!("{e}"))
        .service(name)
        .cloned()
        .unwrap_or_else(|| panic!("`mesh services` has no service {name:?}"))
}

// ---------------------------------------------------------------------------------------------
// 1. A killed backend leaves within fall * interval + timeout, and rejoins after rise successes
// ---------------------------------------------------------------------------------------------

#[test]
fn killed_backend_is_ejected_within_bound_and_rejoins() {
    let (interval, timeout, rise, fall) = (ms(100), ms(50), 2u32, 3u32);
    let a = HttpBackend::start("kill-a");
    let b = HttpBackend::start("kill-b");
    let mut victim = HttpBackend::start("kill-c");
    let vip = "127.100.41.1:80";
    let decoy = HttpBackend::start_on(
        "kill-decoy",
        sock(vip),
        "/healthz",
        HealthReply::Status(200),
    );
    let check = Check::http(100, 50, rise, fall, 0);
    let env = TestEnv::start(
        "hkill",
        &render_config(&[service("kill", vip, &[&a, &b, &victim], &[], &check)]),
    );
    let took = wait_active(&env, "kill", &[&a, &b, &victim], Duration::from_secs(5));
    println!("kill: all three backends active {took:?} after /readyz");

    // Kill one while a client connects in a loop.
    let clients = ClientLoop::start(
        &env.cgroup,
        "http-until",
        vip,
        1,
        LOOP_LIMIT,
        &CLIENT_TIMEOUT,
    );
    wait_traffic(&[&a, &b, &victim]);
    let mark = env.agent.log_mark();
    victim.stop();
    let killed = Instant::now();
    let killed_wall = now_epoch_secs();
    let ejected = poll_service(&env.bpffs, "kill", Duration::from_secs(5), |s| {
        slots_of(s, victim.addr()) == 0
    });
    let ejected_after = killed.elapsed();
    let window = clients.stop();
    let bound = interval * fall + timeout + ms(200);
    let down = wait_transition(&env, mark, vip, &victim, "unhealthy");
    println!(
        "kill: ejected {ejected_after:?} after the listener closed (bound {bound:?}; the agent \
         logged it at +{} ms, reason {:?}); the client made {} connects in {:?}, {} failed: {:?}",
        logged_after_ms(&down, killed_wall),
        down.reason,
        window.total.attempts,
        window.ran_for,
        window.total.error_total(),
        window.total.errors
    );
    if let Err(e) = ejected {
        panic!("the killed backend was not ejected: {e}");
    }
    assert!(
        ejected_after <= bound,
        "the killed backend left the slots after {ejected_after:?}, more than fall * interval + \
         timeout + 200 ms = {bound:?}"
    );
    assert!(
        down.reason.contains("refused"),
        "ejection reason should say the connect was refused: {}",
        down.line
    );
    assert!(
        unexpected_errors(&window).is_empty(),
        "client errors other than ECONNREFUSED: {:?}",
        window.total.errors
    );
    assert_eq!(
        window.total.count("kill-decoy"),
        0,
        "connects reached the VIP itself"
    );
    assert_eq!(health_metric(&env, "127.100.41.1:80", &victim), Some(0.0));
    assert_eq!(health_metric(&env, "127.100.41.1:80", &a), Some(1.0));

    // Ejected: nothing fails any more, the other two split the traffic exactly.
    let after = http_probe(&env, vip, 200);
    assert_exact_split("after the ejection", &after, &[(&a, 100), (&b, 100)]);

    // Restart it: it rejoins after `rise` successful checks.
    let checks_before = victim.health_checks();
    let mark = env.agent.log_mark();
    victim.restart();
    let restarted = Instant::now();
    let restarted_wall = now_epoch_secs();
    let rejoined = poll_service(&env.bpffs, "kill", Duration::from_secs(5), |s| {
        slots_of(s, victim.addr()) > 0
    });
    let rejoin_after = restarted.elapsed();
    let checks = victim.health_checks() - checks_before;
    let up = wait_transition(&env, mark, vip, &victim, "healthy");
    // `rise` checks 10% jittered intervals apart, plus up to two checks lost to a busy machine
    // (a check timing out at 50 ms restarts the count), plus 200 ms slack.
    let rejoin_bound = interval * (rise + 2) * 11 / 10 + timeout + ms(200);
    println!(
        "kill: rejoined {rejoin_after:?} after the restart (bound {rejoin_bound:?}; logged at +{} \
         ms), after {checks} successful checks (rise {rise})",
        logged_after_ms(&up, restarted_wall)
    );
    // The agent's view of the checks since the restart, for the failure messages.
    let addr = victim.addr().to_string();
    let checks_log: Vec<String> = env
        .agent
        .log_since(mark)
        .lines()
        .filter(|l| l.contains(&addr) || l.contains("applied"))
        .map(str::to_owned)
        .collect();
    let checks_log = checks_log.join("\n");
    if checks > rise as usize {
        // Not a failure by itself (a check may end between the transition and the poll), but
        // worth seeing: a check that reached the backend may have failed on the agent's side.
        println!("kill: the agent's checks of {addr} since the restart:\n{checks_log}");
    }
    if let Err(e) = rejoined {
        panic!("the restarted backend did not rejoin: {e}\nagent log:\n{checks_log}");
    }
    assert!(
        checks >= rise as usize,
        "it rejoined after {checks} successful checks; rise is {rise}\nagent log:\n{checks_log}"
    );
    assert!(
        rejoin_after <= rejoin_bound,
        "rejoining took {rejoin_after:?}, more than {rejoin_bound:?} (restarted at {restarted_wall:.3} \
         s since the epoch)\nagent log:\n{checks_log}"
    );
    let back = http_probe(&env, vip, 300);
    assert_exact_split(
        "after the rejoin",
        &back,
        &[(&a, 100), (&b, 100), (&victim, 100)],
    );
    assert_eq!(decoy.accepted(), 0, "connects reached the VIP itself");
}

// ---------------------------------------------------------------------------------------------
// 2. HTTP status and timeouts eject; `expect` decides which statuses pass
// ---------------------------------------------------------------------------------------------

#[test]
fn http_check_503_ejects_and_expect_is_honored() {
    let good = HttpBackend::start("st-good");
    let b503 = HttpBackend::start("st-503");
    let b302 = HttpBackend::start("st-302");
    let slow = HttpBackend::start("st-slow");
    let good2 = HttpBackend::start("st-good2");
    let lenient_vip = "127.100.42.1:80";
    let strict_vip = "127.100.42.2:80";
    // A timeout as long as the interval: on a busy machine a 302 answered a little late must
    // still count as a 302, not as a timeout.
    let check = Check::http(100, 100, 2, 2, 0);
    // The same backend (b302) is behind both: the default 200-399 accepts a redirect, 200-299
    // does not.
    let strict = check.clone().with("expect", "\"200-299\"");
    let env = TestEnv::start(
        "hstatus",
        &render_config(&[
            service(
                "lenient",
                lenient_vip,
                &[&good, &b503, &b302, &slow],
                &[],
                &check,
            ),
            service("strict", strict_vip, &[&good2, &b302], &[], &strict),
        ]),
    );
    wait_active(
        &env,
        "lenient",
        &[&good, &b503, &b302, &slow],
        Duration::from_secs(5),
    );
    wait_active(&env, "strict", &[&good2, &b302], Duration::from_secs(5));

    let mark = env.agent.log_mark();
    b503.set_health(HealthReply::Status(503));
    b302.set_health(HealthReply::Status(302));
    slow.set_health(HealthReply::Hang);
    let switched = Instant::now();
    let lenient = poll_service(&env.bpffs, "lenient", Duration::from_secs(3), |s| {
        slots_of(s, b503.addr()) == 0 && slots_of(s, slow.addr()) == 0
    });
    let strict_done = poll_service(&env.bpffs, "strict", Duration::from_secs(3), |s| {
        slots_of(s, b302.addr()) == 0
    });
    let took = switched.elapsed();
    if let Err(e) = lenient.and(strict_done) {
        panic!("{e}\nlog since the switch:\n{}", env.agent.log_since(mark));
    }
    // Some more check rounds: the redirect must stay accepted behind the lenient VIP.
    std::thread::sleep(ms(500));

    let t503 = wait_transition(&env, mark, lenient_vip, &b503, "unhealthy");
    let t302 = wait_transition(&env, mark, strict_vip, &b302, "unhealthy");
    let tslow = wait_transition(&env, mark, lenient_vip, &slow, "unhealthy");
    println!(
        "status: all three ejected within {took:?}; reasons: 503 -> {:?}, 302 with expect \
         200-299 -> {:?}, no answer -> {:?}",
        t503.reason, t302.reason, tslow.reason
    );
    assert!(t503.reason.contains("503"), "{}", t503.line);
    assert!(t302.reason.contains("302"), "{}", t302.line);
    assert!(
        tslow.reason.to_lowercase().contains("timeout"),
        "a backend that never answers should be ejected for a timeout: {}",
        tslow.line
    );
    assert!(slow.health_checks() > 0, "{slow:?}");
    let lenient_302 = transition(&env, mark, lenient_vip, &b302, "unhealthy");
    assert!(
        lenient_302.is_none(),
        "302 is inside the default expect 200-399, yet: {lenient_302:?}"
    );

    let lenient = status_of(&env, "lenient");
    assert_eq!(
        slot_map(&lenient),
        BTreeMap::from([
            (good.addr().to_string(), 1),
            (b503.addr().to_string(), 0),
            (b302.addr().to_string(), 1),
            (slow.addr().to_string(), 0)
        ]),
        "{lenient:#?}"
    );
    let strict = status_of(&env, "strict");
    assert_eq!(
        slot_map(&strict),
        BTreeMap::from([(good2.addr().to_string(), 1), (b302.addr().to_string(), 0)]),
        "{strict:#?}"
    );
    assert_eq!(health_metric(&env, "127.100.42.1:80", &b302), Some(1.0));
    assert_eq!(health_metric(&env, "127.100.42.2:80", &b302), Some(0.0));
    assert_eq!(health_metric(&env, "127.100.42.1:80", &slow), Some(0.0));

    // The data path follows: only the healthy backends get connections.
    assert_exact_split(
        "lenient",
        &http_probe(&env, lenient_vip, 100),
        &[(&good, 50), (&b302, 50)],
    );
    assert_exact_split("strict", &http_probe(&env, strict_vip, 50), &[(&good2, 50)]);
}

// ---------------------------------------------------------------------------------------------
// 3. A new backend gets no traffic before its first successful check
// ---------------------------------------------------------------------------------------------

#[test]
fn new_backend_gets_traffic_only_after_first_success() {
    let (rise, fall) = (2u32, 2u32);
    let a = HttpBackend::start("new-a");
    let b = HttpBackend::start("new-b");
    let fresh = HttpBackend::start_with("new-c", "/healthz", HealthReply::Status(503));
    let vip = "127.100.43.1:80";
    let check = Check::http(100, 50, rise, fall, 0);
    let env = TestEnv::start(
        "hnew",
        &render_config(&[service("new", vip, &[&a, &b], &[], &check)]),
    );
    wait_active(&env, "new", &[&a, &b], Duration::from_secs(5));

    let clients = ClientLoop::start(
        &env.cgroup,
        "http-until",
        vip,
        1,
        LOOP_LIMIT,
        &CLIENT_TIMEOUT,
    );
    wait_traffic(&[&a, &b]);
    let mark = env.agent.log_mark();
    env.write_services(&[service("new", vip, &[&a, &b, &fresh], &[], &check)]);
    // The edit is applied once the new backend is listed (configured, no slots).
    let listed = poll_service(&env.bpffs, "new", Duration::from_secs(3), |s| {
        find_backend(s, fresh.addr()).is_some()
    });
    let (applied_after, status) = listed.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        slots_of(&status, fresh.addr()),
        0,
        "the new backend got slots before any successful check: {status:#?}"
    );
    // Ten check intervals with the client running: it never gets a slot or a connection.
    let watch_from = Instant::now();
    let served_before = a.data_requests() + b.data_requests();
    let mut samples = 0;
    while watch_from.elapsed() < Duration::from_secs(1) {
        let status = status_of(&env, "new");
        samples += 1;
        assert_eq!(
            slots_of(&status, fresh.addr()),
            0,
            "a backend failing its checks got slots: {status:#?}"
        );
    }
    let failing_checks = fresh.health_checks();
    let leaked = fresh.data_requests();
    let served_meanwhile = a.data_requests() + b.data_requests() - served_before;
    println!(
        "new: edit applied in {applied_after:?}; for 1 s ({samples} samples, {failing_checks} \
         failing checks, {served_meanwhile} requests served by the others) it got {leaked} \
         requests"
    );
    assert!(served_meanwhile > 0, "the client loop stalled");
    assert!(
        failing_checks >= 3,
        "the new backend is not being checked: {fresh:?}"
    );
    assert_eq!(
        leaked, 0,
        "connections reached a backend that never passed a check"
    );
    let first = wait_transition(&env, mark, vip, &fresh, "unhealthy");
    assert!(first.reason.contains("503"), "{}", first.line);
    assert_eq!(first.from, "unknown", "{}", first.line);

    // It turns healthy: it gets slots, then traffic.
    let checks_at_switch = fresh.health_checks();
    fresh.set_health(HealthReply::Status(200));
    let switched = Instant::now();
    let active = poll_service(&env.bpffs, "new", Duration::from_secs(3), |s| {
        slots_of(s, fresh.addr()) > 0
    });
    let active_after = switched.elapsed();
    let successes = fresh.health_checks() - checks_at_switch;
    let got_traffic = wait_until(Duration::from_secs(3), || fresh.data_requests() > 0);
    let window = clients.stop();
    println!(
        "new: active {active_after:?} after its endpoint turned healthy ({successes} successful \
         checks by then; rise {rise}); client loop: {} connects, errors {:?}, replies {:?}",
        window.total.attempts, window.total.errors, window.total.replies
    );
    if let Err(e) = active {
        panic!("the new backend never became active: {e}");
    }
    // It had failed `fall` checks, so it is unhealthy and needs `rise` successes.
    assert!(successes >= rise as usize, "{successes} successful checks");
    assert!(
        got_traffic,
        "the healthy new backend got no traffic: {fresh:?}"
    );
    assert!(
        window.total.errors.is_empty(),
        "client errors: {:?}",
        window.total.errors
    );
    assert!(
        window.total.count("new-c") > 0,
        "{:?}",
        window.total.replies
    );
    wait_transition(&env, mark, vip, &fresh, "healthy");
    assert_exact_split(
        "with the new backend",
        &http_probe(&env, vip, 300),
        &[(&a, 100), (&b, 100), (&fresh, 100)],
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Every backend failing its checks: fail-open serves, fail-closed refuses
// ---------------------------------------------------------------------------------------------

#[test]
fn all_unhealthy_fail_open_and_fail_closed() {
    let open = [HttpBackend::start("open-1"), HttpBackend::start("open-2")];
    let closed = [
        HttpBackend::start("closed-1"),
        HttpBackend::start("closed-2"),
    ];
    let open_vip = "127.100.44.1:80";
    let closed_vip = "127.100.44.2:80";
    let open_decoy = HttpBackend::start_on(
        "open-decoy",
        sock(open_vip),
        "/healthz",
        HealthReply::Status(200),
    );
    let closed_decoy = HttpBackend::start_on(
        "closed-decoy",
        sock(closed_vip),
        "/healthz",
        HealthReply::Status(200),
    );
    let check = Check::http(100, 50, 2, 2, 0);
    let env = TestEnv::start(
        "hall",
        &render_config(&[
            service(
                "open",
                open_vip,
                &[&open[0], &open[1]],
                &[],
                &check.clone().with("all_unhealthy", "\"fail-open\""),
            ),
            service(
                "closed",
                closed_vip,
                &[&closed[0], &closed[1]],
                &[],
                &check.clone().with("all_unhealthy", "\"fail-closed\""),
            ),
        ]),
    );
    wait_active(&env, "open", &[&open[0], &open[1]], Duration::from_secs(5));
    wait_active(
        &env,
        "closed",
        &[&closed[0], &closed[1]],
        Duration::from_secs(5),
    );

    // A client on the fail-open VIP throughout: its backends serve even while their checks
    // fail, so it must never see an error.
    let clients = ClientLoop::start(
        &env.cgroup,
        "http-until",
        open_vip,
        1,
        LOOP_LIMIT,
        &CLIENT_TIMEOUT,
    );
    wait_traffic(&[&open[0], &open[1]]);
    for backend in open.iter().chain(&closed) {
        backend.set_health(HealthReply::Status(503));
    }
    let switched = Instant::now();
    let all_down = wait_until(Duration::from_secs(3), || {
        open.iter()
            .map(|b| (open_vip, b))
            .chain(closed.iter().map(|b| (closed_vip, b)))
            .all(|(vip, b)| health_metric(&env, vip, b) == Some(0.0))
    });
    let down_after = switched.elapsed();
    let closed_empty = poll_service(&env.bpffs, "closed", Duration::from_secs(3), |s| {
        s.slot_count == 0
    });
    let open_state = poll_service(&env.bpffs, "open", Duration::from_secs(3), |s| {
        s.slot_count == 2
    });
    assert!(
        all_down,
        "not every backend was reported unhealthy within 3 s:\n{}",
        health_lines(&env)
    );
    if let Err(e) = closed_empty.and(open_state) {
        panic!("{e}");
    }
    println!("all-unhealthy: every check failing {down_after:?} after the switch");

    // Stop the client first: the exact split below needs the round-robin to itself.
    let window = clients.stop();
    let refused = probe_summary_in(&env.cgroup, http_args(closed_vip, 50), PROBE_LIMIT);
    let served = http_probe(&env, open_vip, 100);
    println!(
        "all-unhealthy: fail-closed {:?} (slowest connect {} µs); fail-open {:?}; the fail-open \
         client loop through the transition: {} connects, errors {:?}",
        refused.errors,
        refused.max_connect_us,
        served.replies,
        window.total.attempts,
        window.total.errors
    );
    assert_eq!(
        refused.errors,
        BTreeMap::from([("ECONNREFUSED".to_owned(), 50)]),
        "fail-closed: {refused:?}"
    );
    assert_eq!(
        closed_decoy.accepted(),
        0,
        "fail-closed passed connects to the VIP itself"
    );
    assert_exact_split("fail-open", &served, &[(&open[0], 50), (&open[1], 50)]);
    assert!(
        window.total.errors.is_empty() && window.total.attempts > 0,
        "the fail-open service failed connects while its checks went down: {:?}",
        window.total
    );
    assert_eq!(open_decoy.accepted(), 0, "connects reached the VIP itself");

    // Checks pass again: the fail-closed service serves again.
    for backend in open.iter().chain(&closed) {
        backend.set_health(HealthReply::Status(200));
    }
    wait_active(
        &env,
        "closed",
        &[&closed[0], &closed[1]],
        Duration::from_secs(3),
    );
    assert_exact_split(
        "fail-closed, recovered",
        &http_probe(&env, closed_vip, 100),
        &[(&closed[0], 50), (&closed[1], 50)],
    );
}

// ---------------------------------------------------------------------------------------------
// 5. Draining keeps established connections and avoids new ones
// ---------------------------------------------------------------------------------------------

#[test]
fn drain_keeps_established_connections_and_avoids_new_ones() {
    const EXCHANGES: usize = 40;
    let backends = [
        HttpBackend::start("drain-a"),
        HttpBackend::start("drain-b"),
        HttpBackend::start("drain-c"),
    ];
    let all: Vec<&HttpBackend> = backends.iter().collect();
    let vip = "127.100.45.1:80";
    let decoy = HttpBackend::start_on(
        "drain-decoy",
        sock(vip),
        "/healthz",
        HealthReply::Status(200),
    );
    let check = Check::http(100, 50, 2, 3, 0);
    let env = TestEnv::start(
        "hdrain",
        &render_config(&[service("drain", vip, &all, &[], &check)]),
    );
    wait_active(&env, "drain", &all, Duration::from_secs(5));

    // One connection, held for EXCHANGES * 100 ms, one ping/echo every 100 ms.
    let holder = spawn_probe_in(
        &env.cgroup,
        [
            "hold",
            "--addr",
            vip,
            "--count",
            &EXCHANGES.to_string(),
            "--every-ms",
            "100",
            "--timeout-ms",
            "2000",
        ],
    );
    let mut held = None;
    wait_until(Duration::from_secs(3), || {
        held = backends.iter().position(|b| b.echo_open() == 1);
        held.is_some()
    });
    let x = &backends[held.expect("the held connection reached no backend")];
    let others: Vec<&HttpBackend> = backends.iter().filter(|b| b.addr() != x.addr()).collect();
    let lines_before = x.echo_lines();

    let drained_at = Instant::now();
    env.write_services(&[service("drain", vip, &all, &[x], &check)]);
    let drained = poll_service(&env.bpffs, "drain", Duration::from_secs(3), |s| {
        slots_of(s, x.addr()) == 0 && s.slot_count == 2
    });
    let drain_took = drained_at.elapsed();
    let (_, status) = drained.unwrap_or_else(|e| panic!("drain was not applied: {e}"));
    assert!(
        find_backend(&status, x.addr()).is_some(),
        "a draining backend stays configured: {status:#?}"
    );
    assert_eq!(
        x.echo_open(),
        1,
        "the held connection was closed by the drain"
    );

    // New connections avoid X.
    let requests_before = x.data_requests();
    let fresh = http_probe(&env, vip, 100);
    assert_exact_split(
        "while draining",
        &fresh,
        &[(others[0], 50), (others[1], 50)],
    );
    assert_eq!(
        x.data_requests(),
        requests_before,
        "a new connection reached the draining backend"
    );

    // The established connection keeps working to the end.
    let held_result = holder.wait(Duration::from_secs(20));
    let after_drain = x.echo_lines() - lines_before;
    println!(
        "drain: {} drained in {drain_took:?}; the held connection made {} exchanges ({} after \
         the drain), errors {:?}",
        x.name(),
        held_result.total(),
        after_drain,
        held_result.errors()
    );
    assert!(
        held_result.errors().is_empty(),
        "the established connection broke: {:?}\n{}",
        held_result.errors(),
        held_result.stdout
    );
    assert_eq!(held_result.total(), EXCHANGES, "{}", held_result.stdout);
    assert_eq!(
        held_result.count(x.name()),
        EXCHANGES,
        "{}",
        held_result.stdout
    );
    assert!(
        after_drain >= 10,
        "only {after_drain} exchanges after the drain: the test did not cover it"
    );
    assert_eq!(decoy.accepted(), 0, "connects reached the VIP itself");
}

// ---------------------------------------------------------------------------------------------
// 6. Passive detection ejects faster, and after fewer failed connects, than active checks
// ---------------------------------------------------------------------------------------------

/// What happened between killing a backend and its ejection.
#[derive(Debug)]
struct Ejection {
    took: Duration,
    /// The agent's transition log line, relative to the kill.
    logged_ms: String,
    logged_after: Option<Duration>,
    reason: String,
    failed: u64,
    attempts: u64,
    ran_for: Duration,
}

fn kill_and_time_ejection(
    env: &TestEnv,
    name: &str,
    vip: &str,
    victim: &mut HttpBackend,
    others: &[&HttpBackend],
    limit: Duration,
) -> Ejection {
    let clients = ClientLoop::start(
        &env.cgroup,
        "http-until",
        vip,
        1,
        LOOP_LIMIT,
        &CLIENT_TIMEOUT,
    );
    let mut all: Vec<&HttpBackend> = others.to_vec();
    all.push(victim);
    wait_traffic(&all);
    let mark = env.agent.log_mark();
    victim.stop();
    let killed = Instant::now();
    let killed_wall = now_epoch_secs();
    let ejected = poll_service(&env.bpffs, name, limit, |s| slots_of(s, victim.addr()) == 0);
    let took = killed.elapsed();
    let result = clients.stop();
    if let Err(e) = ejected {
        panic!(
            "{name}: the killed backend was not ejected: {e}\nclients: {:?}",
            result.total
        );
    }
    // The one client may have had a request in flight on the victim when it was killed: that
    // connection is reset, once at most. Anything else is a connect the data path got wrong.
    let mut unexpected = unexpected_errors(&result);
    if unexpected.get("ECONNRESET") == Some(&1) {
        unexpected.remove("ECONNRESET");
    }
    assert!(
        unexpected.is_empty(),
        "{name}: client errors other than ECONNREFUSED (and one reset in flight): {:?}",
        result.total.errors
    );
    let t = wait_transition(env, mark, vip, victim, "unhealthy");
    Ejection {
        took,
        logged_ms: logged_after_ms(&t, killed_wall),
        logged_after: logged_after(&t, killed_wall),
        reason: t.reason,
        failed: refused(&result),
        attempts: result.total.attempts,
        ran_for: result.ran_for,
    }
}

#[test]
fn passive_detection_ejects_faster_than_active_checks() {
    let (interval_ms, fall, threshold) = (2000, 3u32, 3u32);
    let p = [HttpBackend::start("pas-a"), HttpBackend::start("pas-b")];
    let mut p_victim = HttpBackend::start("pas-c");
    let q = [HttpBackend::start("act-a"), HttpBackend::start("act-b")];
    let mut q_victim = HttpBackend::start("act-c");
    let passive_vip = "127.100.46.1:80";
    let active_vip = "127.100.46.2:80";
    let env = TestEnv::start(
        "hpassive",
        &render_config(&[
            service(
                "passive",
                passive_vip,
                &[&p[0], &p[1], &p_victim],
                &[],
                &Check::http(interval_ms, 500, 2, fall, threshold),
            ),
            service(
                "active-only",
                active_vip,
                &[&q[0], &q[1], &q_victim],
                &[],
                &Check::http(interval_ms, 500, 2, fall, 0),
            ),
        ]),
    );
    // README: "the first check of a new backend runs within 100 ms" (not within the 2 s
    // interval), and at a fresh start the agent waits for those first results before it writes
    // the maps, so by /readyz every backend has been checked once, all within about 100 ms.
    let all = [&p[0], &p[1], &p_victim, &q[0], &q[1], &q_victim];
    let first: Vec<Instant> = all
        .iter()
        .map(|b| {
            b.first_health_check_at()
                .unwrap_or_else(|| panic!("not checked before /readyz: {b:?}"))
        })
        .collect();
    let spread = first.iter().max().copied().expect("six backends")
        - first.iter().min().copied().expect("six backends");
    println!("first checks of six new backends (interval {interval_ms} ms) within {spread:?}");
    assert!(
        spread <= FIRST_CHECK_SPREAD,
        "the first checks of backends added together spread over {spread:?}, more than \
         {FIRST_CHECK_SPREAD:?}"
    );
    // New backends need one successful check.
    wait_active(
        &env,
        "passive",
        &[&p[0], &p[1], &p_victim],
        Duration::from_secs(5),
    );
    wait_active(
        &env,
        "active-only",
        &[&q[0], &q[1], &q_victim],
        Duration::from_secs(5),
    );

    let passive = kill_and_time_ejection(
        &env,
        "passive",
        passive_vip,
        &mut p_victim,
        &[&p[0], &p[1]],
        Duration::from_secs(5),
    );
    println!(
        "passive_failures = {threshold}: ejected after {:?} (logged at +{} ms, {:?}); {} failed \
         connects of {} in {:?}",
        passive.took,
        passive.logged_ms,
        passive.reason,
        passive.failed,
        passive.attempts,
        passive.ran_for
    );
    let active = kill_and_time_ejection(
        &env,
        "active-only",
        active_vip,
        &mut q_victim,
        &[&q[0], &q[1]],
        Duration::from_secs(12),
    );
    println!(
        "passive_failures = 0 (interval {interval_ms} ms, fall {fall}): ejected after {:?} \
         (logged at +{} ms, {:?}); {} failed connects of {} in {:?}",
        active.took,
        active.logged_ms,
        active.reason,
        active.failed,
        active.attempts,
        active.ran_for
    );
    assert!(
        passive.reason.contains("passive"),
        "the passive ejection should say so: {passive:?}"
    );
    assert!(
        !active.reason.contains("passive"),
        "passive detection is off for this service: {active:?}"
    );
    // README: the kernel's failed-connect counts are read every 10 ms. The agent logs the
    // ejection (its own clock) within PASSIVE_LOGGED of the kill (3 failures, at most one
    // 10 ms tick, the transition); `mesh services`, polled by spawning the CLI, shows it within
    // PASSIVE_EJECTED.
    assert!(
        passive
            .logged_after
            .is_some_and(|logged| logged <= PASSIVE_LOGGED),
        "the agent logged the passive ejection {} ms after the kill (bound {PASSIVE_LOGGED:?})",
        passive.logged_ms
    );
    assert!(
        passive.took <= PASSIVE_EJECTED,
        "passive detection took {:?} (bound {PASSIVE_EJECTED:?})",
        passive.took
    );
    assert!(
        passive.failed >= u64::from(threshold),
        "ejected after {} failed connects, fewer than the threshold {threshold}",
        passive.failed
    );
    assert!(
        passive.failed < active.failed,
        "passive detection should cost fewer failed connects: {} vs {} with active checks only",
        passive.failed,
        active.failed
    );
    // The data path agrees: failed connects were counted per backend.
    let text = env.agent.metrics_text();
    let failures = metric_value(
        &text,
        "mesh_backend_connect_failures_total",
        &[("backend", &p_victim.addr().to_string())],
    );
    println!("passive: mesh_backend_connect_failures_total of the killed backend: {failures:?}");
    assert!(
        failures.is_some_and(|f| f >= f64::from(threshold)),
        "mesh_backend_connect_failures_total of {}: {failures:?}",
        p_victim.addr()
    );
}
