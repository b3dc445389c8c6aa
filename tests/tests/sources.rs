//! Registry sources besides the config file, end to end: the local admin API (add, replace,
//! remove, reject, survive a restart) and a Redis hash (changes announced on pub/sub reach the
//! data path; an outage keeps the last services).
//!
//! Privileged: run as root through `cargo xtask test`, which starts redis-server on
//! 127.0.0.1:6390 and sets MESH_TEST_REDIS. Each test uses its own VIPs (127.100.3x.*),
//! cgroup, bpffs directory, state directory and Redis key (deleted afterwards); the outage test
//! runs its own redis-server on a free 127.0.0.1 port.

use std::fmt::Display;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use integration_tests::admin::free_loopback_addr;
use integration_tests::agent::is_warn_or_error;
use integration_tests::observe::metric_value;
use integration_tests::redis::{KeyGuard, RedisClient, RedisServer, test_redis_addr};
use integration_tests::{
    ProbeSummary, ServiceSpec, TcpBackend, TestEnv, assert_split, render_config, services,
    spawn_probe_in, wait_for_backends, wait_until,
};

/// An admin API change is answered, applied, within this long (README; measured 2-11 ms).
const ADMIN_BUDGET: Duration = Duration::from_millis(250);
/// HSET + PUBLISH reaches the maps within this long (README; measured 4-10 ms). Measured by
/// polling `mesh services`, which spawns the CLI each time.
const PUBLISH_BUDGET: Duration = Duration::from_millis(500);
/// A killed Redis shows as `mesh_registry_source_up 0` within this long (README; measured
/// 2-6 ms). Measured by polling /metrics.
const DOWN_BUDGET: Duration = Duration::from_millis(250);
/// Connects the clients must make across the agent restart for it to mean something (README;
/// measured 13,000-18,000).
const MIN_RESTART_CONNECTS: u64 = 1_000;
/// How long we poll before giving up (longer than the budget, so a slow apply is reported
/// with its real duration instead of as a timeout).
const POLL_LIMIT: Duration = Duration::from_secs(5);
/// The Redis source's longest retry interval (`redis_source::MAX_BACKOFF`).
const MAX_BACKOFF: Duration = Duration::from_secs(5);

fn sock(addr: &str) -> SocketAddr {
    addr.parse()
        .unwrap_or_else(|e| panic!("{addr:?} is not IP:PORT: {e}"))
}

/// A private state directory, removed on drop.
struct StateDir(integration_tests::TempDir);

impl StateDir {
    fn new(tag: &str) -> StateDir {
        StateDir(integration_tests::TempDir::new(&format!("state-{tag}")))
    }

    fn path(&self) -> &Path {
        self.0.path()
    }

    /// The services saved in `<state_dir>/<file>`, by name.
    fn saved_names(&self, file: &str) -> Vec<String> {
        let path = self.0.path().join(file);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let json: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not JSON ({e}): {text}", path.display()));
        json["services"]
            .as_array()
            .unwrap_or_else(|| panic!("{} has no services array: {text}", path.display()))
            .iter()
            .map(|s| s["name"].as_str().unwrap_or_default().to_owned())
            .collect()
    }
}

/// The config file: `services` from the file, then `[agent]` with the sources.
fn config(
    services: &[ServiceSpec],
    state_dir: &Path,
    admin: Option<SocketAddr>,
    redis: Option<(&str, &str, &str)>,
) -> String {
    let mut text = render_config(services);
    text.push_str(&format!(
        "\n[agent]\nstate_dir = {:?}\n",
        state_dir.display().to_string()
    ));
    if let Some(admin) = admin {
        text.push_str(&format!("admin = \"{admin}\"\n"));
    }
    if let Some((url, key, resync)) = redis {
        text.push_str(&format!(
            "\n[agent.redis]\nurl = \"{url}\"\nkey = \"{key}\"\nresync = \"{resync}\"\n"
        ));
    }
    text
}

/// A service as the admin API and Redis take it: `name` left out, backends with weight 1.
fn service_json(vip: impl Display, backends: &[&TcpBackend]) -> String {
    let backends: Vec<serde_json::Value> = backends
        .iter()
        .map(|b| serde_json::json!({ "addr": b.addr().to_string() }))
        .collect();
    serde_json::json!({ "vip": vip.to_string(), "backends": backends }).to_string()
}

fn addrs(backends: &[&TcpBackend]) -> Vec<SocketAddr> {
    backends.iter().map(|b| b.addr()).collect()
}

/// Polls `mesh services` until it has no service `name`; returns how long that took.
#[track_caller]
fn wait_for_removal(env: &TestEnv, name: &str) -> Duration {
    let start = Instant::now();
    let gone = wait_until(POLL_LIMIT, || services(&env.bpffs).service(name).is_none());
    let took = start.elapsed();
    assert!(
        gone,
        "service {name:?} was still in the maps after {took:?}"
    );
    took
}

/// A sample of the agent's /metrics: name and labels.
type Sample = (&'static str, &'static [(&'static str, &'static str)]);

/// The value of `sample` in the agent's /metrics, if present.
fn metric(env: &TestEnv, (name, labels): Sample) -> Option<f64> {
    metric_value(&env.agent.metrics_text(), name, labels)
}

const REDIS_UP: Sample = ("mesh_registry_source_up", &[("source", "redis")]);
const REDIS_SERVICES: Sample = ("mesh_registry_source_services", &[("source", "redis")]);
const API_UP: Sample = ("mesh_registry_source_up", &[("source", "api")]);
const API_SERVICES: Sample = ("mesh_registry_source_services", &[("source", "api")]);

/// Waits until the metric sample has `value`; returns how long that took.
#[track_caller]
fn wait_for_metric(env: &TestEnv, sample: Sample, value: f64, timeout: Duration) -> Duration {
    let start = Instant::now();
    let mut last = None;
    let reached = wait_until(timeout, || {
        last = metric(env, sample);
        last == Some(value)
    });
    let took = start.elapsed();
    assert!(
        reached,
        "{sample:?} was {last:?}, not {value}, after {took:?}; agent log:\n{}",
        env.agent.log_text()
    );
    took
}

/// Waits (3 s) for a WARN/ERROR line after `mark` that contains every one of `words`.
#[track_caller]
fn wait_for_error_line(env: &TestEnv, mark: usize, words: &[&str]) -> String {
    env.agent
        .wait_for_log_line(mark, Duration::from_secs(3), |line| {
            is_warn_or_error(line) && words.iter().all(|w| line.contains(w))
        })
        .unwrap_or_else(|| {
            panic!(
                "no WARN/ERROR log line with {words:?} within 3 s; log since then:\n{}",
                env.agent.log_since(mark)
            )
        })
}

// ---------------------------------------------------------------------------------------------
// Admin API
// ---------------------------------------------------------------------------------------------

#[test]
fn admin_api_adds_replaces_and_removes_a_service() {
    let a = TcpBackend::start("api-a");
    let b = TcpBackend::start("api-b");
    let c = TcpBackend::start("api-c");
    let vip = "127.100.30.1:80";
    // Whoever reaches the decoy was not translated.
    let decoy = TcpBackend::start_on("api-decoy", sock(vip));
    let file_vip = "127.100.30.2:80";
    let state = StateDir::new("api-crud");
    let file_service = ServiceSpec::tcp("file-web", file_vip).backends([a.addr()]);
    let env = TestEnv::start(
        "api-crud",
        &config(&[file_service], state.path(), None, None),
    );
    let api = env.agent.admin();
    assert_eq!(api.names(), [("file".to_owned(), "file-web".to_owned())]);
    assert_split(&env.connect(vip, 5), &[(&decoy, 5)]);

    // Add. The answer comes once the maps hold it: connect at once, no polling.
    let started = Instant::now();
    let put = api.put("api-web", &service_json(vip, &[&a, &b]));
    let add_took = started.elapsed();
    assert_eq!(
        (put.status, &put.body["applied"]),
        (200, &serde_json::json!(true))
    );
    // The generation the maps hold now: a number that later changes exceed.
    let added_generation = put.body["generation"]
        .as_u64()
        .unwrap_or_else(|| panic!("no generation in {}", put.body));
    assert_split(&env.connect(vip, 100), &[(&a, 50), (&b, 50)]);
    assert_eq!(
        api.names(),
        [
            ("file".to_owned(), "file-web".to_owned()),
            ("api".to_owned(), "api-web".to_owned())
        ]
    );
    let listed = api.list();
    assert_eq!(
        listed.body["services"][1]["service"]["vip"], vip,
        "{}",
        listed.raw
    );
    assert_eq!(state.saved_names("api-services.json"), ["api-web"]);
    assert_eq!(metric(&env, API_SERVICES), Some(1.0));
    assert_eq!(metric(&env, API_UP), Some(1.0));

    // Replace: other backends (the body may repeat the name).
    let body = service_json(vip, &[&c]).replacen('{', "{\"name\":\"api-web\",", 1);
    let started = Instant::now();
    let put = api.put("api-web", &body);
    let replace_took = started.elapsed();
    assert_eq!(put.status, 200, "{}", put.raw);
    assert!(
        put.body["generation"].as_u64() > Some(added_generation),
        "the replace is a later generation than the add: {}",
        put.raw
    );
    assert_split(&env.connect(vip, 30), &[(&c, 30)]);
    assert_eq!(
        services(&env.bpffs)
            .service("api-web")
            .expect("api-web in the maps")
            .backend_addrs(),
        addrs(&[&c]).into_iter().collect()
    );

    // Remove: the VIP is an ordinary address again.
    let started = Instant::now();
    let delete = api.delete("api-web");
    let delete_took = started.elapsed();
    assert_eq!(delete.status, 200, "{}", delete.raw);
    assert!(services(&env.bpffs).service("api-web").is_none());
    assert_split(&env.connect(vip, 10), &[(&decoy, 10)]);
    assert_eq!(decoy.accepted(), 15);
    let again = api.delete("api-web");
    assert_eq!(again.status, 404, "{}", again.raw);
    assert!(again.error().contains("api-web"), "{}", again.raw);
    assert_eq!(state.saved_names("api-services.json"), Vec::<String>::new());
    assert_eq!(metric(&env, API_SERVICES), Some(0.0));
    // The file's service was never touched.
    assert_split(&env.connect(file_vip, 10), &[(&a, 10)]);
    eprintln!(
        "admin API round trips (request to applied answer): add {add_took:?}, replace \
         {replace_took:?}, delete {delete_took:?}"
    );
    for took in [add_took, replace_took, delete_took] {
        assert!(
            took < ADMIN_BUDGET,
            "an admin API change took {took:?} (budget {ADMIN_BUDGET:?})"
        );
    }
}

#[test]
fn admin_api_rejects_bad_input_and_keeps_state() {
    let a = TcpBackend::start("rej-a");
    let b = TcpBackend::start("rej-b");
    let c = TcpBackend::start("rej-c");
    let vip = "127.100.31.1:80";
    let file_vip = "127.100.31.2:80";
    let state = StateDir::new("api-reject");
    let env = TestEnv::start(
        "api-reject",
        &config(
            &[ServiceSpec::tcp("file-svc", file_vip).backends([c.addr()])],
            state.path(),
            None,
            None,
        ),
    );
    let api = env.agent.admin();
    let put = api.put("api-svc", &service_json(vip, &[&a, &b]));
    assert_eq!(put.status, 200, "{}", put.raw);
    let before = api.list().body;

    // (what, name in the path, body, words the error must contain)
    let cases: Vec<(&str, &str, String, Vec<&str>)> = vec![
        (
            "weight 0",
            "api-svc",
            format!(
                r#"{{"vip":"{vip}","backends":[{{"addr":"{}","weight":0}}]}}"#,
                c.addr()
            ),
            vec!["backends[0].weight", "must be between 1 and"],
        ),
        (
            "malformed JSON",
            "api-svc",
            format!(r#"{{"vip":"{vip}","backends":["#),
            vec!["invalid JSON"],
        ),
        (
            "wrong type",
            "api-svc",
            format!(
                r#"{{"vip":"{vip}","backends":[{{"addr":"{}","weight":"heavy"}}]}}"#,
                c.addr()
            ),
            vec!["backends[0].weight", "invalid type"],
        ),
        (
            "unknown field",
            "api-svc",
            format!(r#"{{"vip":"{vip}","backend":[]}}"#),
            vec!["unknown field `backend`"],
        ),
        (
            "name differs from the path",
            "api-svc",
            format!(r#"{{"name":"other","vip":"{vip}"}}"#),
            vec!["name:", "\"other\""],
        ),
        (
            "name of a file service",
            "file-svc",
            service_json("127.100.31.3:80", &[&c]),
            vec!["\"file-svc\"", "name", "duplicate name"],
        ),
        (
            "VIP of a file service",
            "api-two",
            service_json(file_vip, &[&c]),
            vec!["vip", "already the vip"],
        ),
    ];
    for (what, name, body, words) in &cases {
        let response = api.put(name, body);
        assert_eq!(response.status, 400, "{what}: {}", response.raw);
        for word in words {
            assert!(
                response.error().contains(word),
                "{what}: the error should mention {word:?}: {}",
                response.raw
            );
        }
        eprintln!("{what}: 400 {}", response.error());
    }
    let delete = api.delete("file-svc");
    assert_eq!(delete.status, 404, "{}", delete.raw);
    assert!(delete.error().contains("file"), "{}", delete.raw);

    // Nothing changed: the listing, the saved set and the data path.
    assert_eq!(api.list().body, before);
    assert_eq!(state.saved_names("api-services.json"), ["api-svc"]);
    assert_eq!(
        services(&env.bpffs)
            .service("api-svc")
            .map(|s| s.backend_addrs()),
        Some(addrs(&[&a, &b]).into_iter().collect())
    );
    assert_split(&env.connect(vip, 100), &[(&a, 50), (&b, 50)]);
    assert_split(&env.connect(file_vip, 10), &[(&c, 10)]);
    assert!(services(&env.bpffs).service("api-two").is_none());
    assert!(
        env.agent
            .log_text()
            .lines()
            .any(|l| is_warn_or_error(l) && l.contains("api rejected") && l.contains("weight"))
    );
}

#[test]
fn admin_api_services_survive_an_agent_restart() {
    let a = TcpBackend::start("keep-a");
    let b = TcpBackend::start("keep-b");
    let vip = "127.100.32.1:80";
    let decoy = TcpBackend::start_on("keep-decoy", sock(vip));
    let state = StateDir::new("api-restart");
    let mut env = TestEnv::start("api-restart", &config(&[], state.path(), None, None));
    let api = env.agent.admin();
    let put = api.put("kept", &service_json(vip, &[&a, &b]));
    assert_eq!(put.status, 200, "{}", put.raw);
    assert_split(&env.connect(vip, 10), &[(&a, 5), (&b, 5)]);

    // Clients connect in a loop across the restart.
    let stop_dir = std::env::temp_dir().join(format!("{}-stop", env.cgroup.name()));
    std::fs::create_dir_all(&stop_dir).expect("create the stop-file directory");
    let stop_file = stop_dir.join("stop");
    let clients: Vec<_> = (0..2)
        .map(|_| {
            spawn_probe_in(
                &env.cgroup,
                [
                    "connect-until",
                    "--addr",
                    vip,
                    "--stop-file",
                    stop_file.to_str().expect("utf-8 path"),
                    "--max-ms",
                    "60000",
                ],
            )
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mark = env.agent.log_mark();
    let started = Instant::now();
    env.agent.restart();
    let restart_took = started.elapsed();
    // The new agent has applied everything once /readyz answers; keep the clients going a bit.
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(&stop_file, b"stop").expect("write the stop file");
    let results: Vec<ProbeSummary> = clients
        .into_iter()
        .map(|client| {
            let out = client.wait(Duration::from_secs(30));
            ProbeSummary::parse(&out.stdout).unwrap_or_else(|e| panic!("{e}"))
        })
        .collect();
    let _ = std::fs::remove_dir_all(&stop_dir);

    let ProbeSummary {
        attempts: connects,
        replies,
        errors,
        ..
    } = ProbeSummary::total(&results);
    eprintln!(
        "restart took {restart_took:?}; {connects} connects across it: replies {replies:?}, \
         errors {errors:?}"
    );
    assert!(
        connects >= MIN_RESTART_CONNECTS,
        "the clients made only {connects} connects across the restart"
    );
    assert!(
        errors.is_empty(),
        "connect errors across the restart: {errors:?}"
    );
    assert_eq!(
        replies.keys().map(String::as_str).collect::<Vec<_>>(),
        ["keep-a", "keep-b"],
        "only the backends may answer: {replies:?}"
    );
    assert_eq!(decoy.accepted(), 0, "connects reached the VIP untranslated");

    // The new agent has the service from the API's saved state, and serves it.
    assert_eq!(api.names(), [("api".to_owned(), "kept".to_owned())]);
    wait_for_metric(&env, API_SERVICES, 1.0, POLL_LIMIT);
    let log = env.agent.log_since(mark);
    assert!(
        log.contains("admin API: saved services applied"),
        "the restarted agent should apply the saved services; log:\n{log}"
    );
    let before = (a.accepted(), b.accepted());
    assert_split(&env.connect(vip, 100), &[(&a, 50), (&b, 50)]);
    assert_eq!((a.accepted() - before.0, b.accepted() - before.1), (50, 50));

    // And it can still be changed.
    let delete = api.delete("kept");
    assert_eq!(delete.status, 200, "{}", delete.raw);
    assert_split(&env.connect(vip, 5), &[(&decoy, 5)]);
}

// ---------------------------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------------------------

#[test]
fn redis_hash_changes_reach_the_data_path() {
    let a = TcpBackend::start("redis-a");
    let b = TcpBackend::start("redis-b");
    let c = TcpBackend::start("redis-c");
    let vip = "127.100.33.1:80";
    let db_vip = "127.100.33.2:80";
    let decoy = TcpBackend::start_on("redis-decoy", sock(vip));
    let redis_addr = test_redis_addr();
    let key = KeyGuard::new(redis_addr, "changes");
    let mut redis = RedisClient::connect(redis_addr).expect("connect to the test Redis");
    let state = StateDir::new("redis-changes");
    // A resync long enough that the pub/sub path alone has to meet the budget.
    let resync = Duration::from_secs(3);
    let env = TestEnv::start(
        "redis-changes",
        &config(
            &[],
            state.path(),
            None,
            Some((&format!("redis://{redis_addr}/"), &key.key, "3s")),
        ),
    );
    wait_for_metric(&env, REDIS_UP, 1.0, POLL_LIMIT);
    assert_eq!(metric(&env, REDIS_SERVICES), Some(0.0));

    // HSET + PUBLISH: a new service.
    let started = Instant::now();
    redis.hset_and_publish(&key.key, "web", &service_json(vip, &[&a]));
    wait_for_backends(&env.bpffs, "web", &addrs(&[&a]), POLL_LIMIT);
    let add_took = started.elapsed();
    assert_split(&env.connect(vip, 10), &[(&a, 10)]);

    // A changed entry.
    let started = Instant::now();
    redis.hset_and_publish(&key.key, "web", &service_json(vip, &[&a, &b]));
    wait_for_backends(&env.bpffs, "web", &addrs(&[&a, &b]), POLL_LIMIT);
    let change_took = started.elapsed();
    assert_split(&env.connect(vip, 100), &[(&a, 50), (&b, 50)]);

    // A second entry.
    let started = Instant::now();
    redis.hset_and_publish(&key.key, "db", &service_json(db_vip, &[&c]));
    wait_for_backends(&env.bpffs, "db", &addrs(&[&c]), POLL_LIMIT);
    let second_took = started.elapsed();
    wait_for_metric(&env, REDIS_SERVICES, 2.0, POLL_LIMIT);
    assert!(
        wait_until(POLL_LIMIT, || state.saved_names("redis-services.json")
            == ["db", "web"]),
        "the applied Redis services are saved: {:?}",
        state.saved_names("redis-services.json")
    );

    // An entry with invalid JSON: reported by field, the whole update rejected.
    let mark = env.agent.log_mark();
    redis.hset_and_publish(
        &key.key,
        "bad",
        &format!(
            r#"{{"vip":"127.100.33.9:80","backends":[{{"addr":"{}","weight":"x"}}]}}"#,
            a.addr()
        ),
    );
    let line = wait_for_error_line(&env, mark, &["redis", "\"bad\"", "backends[0].weight"]);
    eprintln!("invalid entry: {line}");
    wait_for_metric(&env, REDIS_UP, 0.0, POLL_LIMIT);
    assert_eq!(metric(&env, REDIS_SERVICES), Some(2.0));
    assert!(services(&env.bpffs).service("bad").is_none());
    assert_split(&env.connect(vip, 10), &[(&a, 5), (&b, 5)]);
    assert_split(&env.connect(db_vip, 10), &[(&c, 10)]);
    // An entry the agent's validation rejects (weight 0): same, the agent names the field.
    let mark = env.agent.log_mark();
    redis.hset_and_publish(
        &key.key,
        "bad",
        &format!(
            r#"{{"vip":"127.100.33.9:80","backends":[{{"addr":"{}","weight":0}}]}}"#,
            a.addr()
        ),
    );
    wait_for_error_line(&env, mark, &["redis rejected", "\"bad\"", "weight"]);
    assert!(services(&env.bpffs).service("bad").is_none());
    redis.hdel_and_publish(&key.key, "bad");
    wait_for_metric(&env, REDIS_UP, 1.0, POLL_LIMIT);

    // HDEL + PUBLISH: removed, the VIP is an ordinary address again.
    let started = Instant::now();
    redis.hdel_and_publish(&key.key, "web");
    wait_for_removal(&env, "web");
    let remove_took = started.elapsed();
    assert_split(&env.connect(vip, 5), &[(&decoy, 5)]);
    assert_split(&env.connect(db_vip, 5), &[(&c, 5)]);
    wait_for_metric(&env, REDIS_SERVICES, 1.0, POLL_LIMIT);

    // Without a PUBLISH, the periodic resync picks a change up.
    let started = Instant::now();
    redis.cmd(&["HSET", &key.key, "web", &service_json(vip, &[&b])]);
    wait_for_backends(&env.bpffs, "web", &addrs(&[&b]), resync + POLL_LIMIT);
    let resync_took = started.elapsed();
    assert_split(&env.connect(vip, 5), &[(&b, 5)]);

    eprintln!(
        "redis change to data path: add {add_took:?}, change {change_took:?}, second service \
         {second_took:?}, remove {remove_took:?}; without PUBLISH (resync {resync:?}): \
         {resync_took:?}"
    );
    for took in [add_took, change_took, second_took, remove_took] {
        assert!(
            took < PUBLISH_BUDGET,
            "a published change took {took:?} (budget {PUBLISH_BUDGET:?})"
        );
    }
    assert!(
        resync_took < resync + PUBLISH_BUDGET,
        "the resync took {resync_took:?}"
    );
}

#[test]
fn redis_outage_keeps_the_last_services() {
    let a = TcpBackend::start("outage-a");
    let b = TcpBackend::start("outage-b");
    let c = TcpBackend::start("outage-c");
    let vip = "127.100.34.1:80";
    let decoy = TcpBackend::start_on("outage-decoy", sock(vip));
    let state = StateDir::new("redis-outage");
    // A port that was free a moment ago: another run on this machine may hold a fixed one.
    let port = free_loopback_addr().port();
    let mut server = RedisServer::start(port, &state.path().join("redis"));
    let key = format!("mesh-test:outage:{}", std::process::id());
    let mut env = TestEnv::start(
        "redis-outage",
        // Reads only on connect and on messages: the resync would not fire during the test.
        &config(&[], state.path(), None, Some((&server.url(), &key, "1h"))),
    );
    server
        .client()
        .hset_and_publish(&key, "web", &service_json(vip, &[&a, &b]));
    wait_for_backends(&env.bpffs, "web", &addrs(&[&a, &b]), POLL_LIMIT);
    wait_for_metric(&env, REDIS_UP, 1.0, POLL_LIMIT);
    wait_for_metric(&env, REDIS_SERVICES, 1.0, POLL_LIMIT);

    // Redis comes back with other data: written without a message (the agent does not see it)
    // and saved, so the restarted server loads it.
    let mut client = server.client();
    client.cmd(&["HSET", &key, "web", &service_json(vip, &[&c])]);
    client.cmd(&["SAVE"]);
    drop(client);

    let mark = env.agent.log_mark();
    let killed = Instant::now();
    server.kill();
    let down_took = wait_for_metric(&env, REDIS_UP, 0.0, POLL_LIMIT);
    let line = wait_for_error_line(&env, mark, &["redis", "stay in force"]);
    eprintln!("redis killed: up = 0 after {down_took:?}: {line}");
    assert!(
        down_took < DOWN_BUDGET,
        "the killed Redis showed as down after {down_took:?} (budget {DOWN_BUDGET:?})"
    );

    // The services keep routing while Redis is down, also after the retries back off...
    assert_split(&env.connect(vip, 100), &[(&a, 50), (&b, 50)]);
    // ...to their cap (README: "a backoff from 100 ms doubling up to 5 s"): the first retry
    // comes 100 ms after the outage, and each later failure logs the next wait.
    let capped = env
        .agent
        .wait_for_log_line(mark, Duration::from_secs(10), |line| {
            line.contains(&format!("retrying in {MAX_BACKOFF:?}"))
        });
    let waits: Vec<String> = env
        .agent
        .log_since(mark)
        .lines()
        .filter_map(|line| line.split_once("retrying in ")?.1.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    eprintln!("redis retries after the outage: {waits:?}");
    assert!(
        capped.is_some(),
        "no retry waited {MAX_BACKOFF:?} within 10 s of the outage: {waits:?}"
    );
    assert_eq!(
        waits,
        ["200ms", "400ms", "800ms", "1.6s", "3.2s", "5s"],
        "the retry waits after the first (100 ms) until the cap"
    );
    assert_split(&env.connect(vip, 100), &[(&a, 50), (&b, 50)]);
    assert_eq!(metric(&env, REDIS_SERVICES), Some(1.0));
    assert_eq!(metric(&env, REDIS_UP), Some(0.0));
    // ...and across an agent restart (the last services read are saved under state_dir).
    env.agent.restart();
    assert_eq!(
        services(&env.bpffs)
            .service("web")
            .map(|s| s.backend_addrs()),
        Some(addrs(&[&a, &b]).into_iter().collect())
    );
    assert_split(&env.connect(vip, 100), &[(&a, 50), (&b, 50)]);
    wait_for_metric(&env, REDIS_SERVICES, 1.0, POLL_LIMIT);
    assert_eq!(metric(&env, REDIS_UP), Some(0.0));
    let outage = killed.elapsed();

    // Redis is back with the changed data: applied at the source's next retry, up again. Where
    // the retries are in their backoff (100 ms doubling up to 5 s) decides how long that takes,
    // so only the cap is a bound.
    server.restart();
    let back = Instant::now();
    wait_for_backends(&env.bpffs, "web", &addrs(&[&c]), MAX_BACKOFF + POLL_LIMIT);
    let reapply_took = back.elapsed();
    wait_for_metric(&env, REDIS_UP, 1.0, POLL_LIMIT);
    wait_for_metric(&env, REDIS_SERVICES, 1.0, POLL_LIMIT);
    assert_split(&env.connect(vip, 30), &[(&c, 30)]);
    assert_eq!(decoy.accepted(), 0, "connects reached the VIP untranslated");
    eprintln!(
        "redis outage of {outage:?}: detected in {down_took:?}; back: changed data applied \
         {reapply_took:?} after the server answered"
    );
    assert!(
        reapply_took < MAX_BACKOFF + PUBLISH_BUDGET,
        "reapplying after the outage took {reapply_took:?}"
    );
}
