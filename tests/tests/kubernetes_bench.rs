//! Benchmark of the Kubernetes source at 10,000 Services x 5 endpoints (BENCHMARKS.md): initial
//! sync to the maps, watch event to the maps (p50/p99), agent RSS. Ignored by `cargo xtask
//! test` (it measures, it asserts nothing timed); run it with
//! `cargo test --release -p integration-tests --test kubernetes_bench -- --ignored --nocapture`
//! (root, with MESH_BIN / MESH_PROBE_BIN as `cargo xtask test` sets them).
//!
//! "In the maps" is when the agent's control loop answered the source's update as applied: the
//! reply is sent after the map writes, and the source logs it (`kubernetes: services applied`).
//! The log's timestamps and the test's clock are the same wall clock of this machine.

use std::time::{Duration, Instant, SystemTime};

use integration_tests::agent::Agent;
use integration_tests::kube_api::KubeApi;
use integration_tests::probe::probe_connect_in;
use integration_tests::{BpffsDir, CgroupGuard, TcpBackend, TempDir, assert_split};
use serde_json::{Value, json};

const SERVICES: usize = 10_000;
const ENDPOINTS: usize = 5;
const CHANGES: usize = 40;

fn cluster_ip(i: usize) -> String {
    format!("127.96.{}.{}", i / 250, i % 250 + 1)
}

fn service(name: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": "default"},
           "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80}]}})
}

fn slice(service: &str, ips: &[String]) -> Value {
    let endpoints: Vec<Value> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "nodeName": "node-a", "conditions": {"ready": true}}))
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": service, "namespace": "default",
                        "labels": {"kubernetes.io/service-name": service}},
           "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
           "endpoints": endpoints})
}

/// Timestamps of `kubernetes: services applied` lines after byte `mark` of the log.
fn applied_at(agent: &Agent, mark: usize) -> Vec<SystemTime> {
    agent
        .log_since(mark)
        .lines()
        .filter(|l| l.contains("kubernetes: services applied"))
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|ts| humantime::parse_rfc3339(ts).ok())
        .collect()
}

fn wait_applied(agent: &Agent, mark: usize, limit: Duration) -> Option<SystemTime> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(at) = applied_at(agent, mark).first() {
            return Some(*at);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

fn rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[test]
#[ignore = "a benchmark: run it by name with --ignored (see the module comment)"]
fn kubernetes_source_at_ten_thousand_services() {
    let api = KubeApi::start();
    api.apply(
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"},
                     "status": {"addresses": [{"type": "InternalIP", "address": "127.10.0.1"}]}}),
    );
    for i in 0..SERVICES {
        let name = format!("svc-{i}");
        api.apply(service(&name, &cluster_ip(i)));
        let ips: Vec<String> = (0..ENDPOINTS)
            .map(|e| format!("127.1.{}.{}", (i * ENDPOINTS + e) / 250 % 250, e + 1))
            .collect();
        api.apply(slice(&name, &ips));
    }
    // The service whose endpoint the changes flip between two real backends.
    let a = TcpBackend::start_on("kb-a", "127.0.19.1:8080".parse().unwrap());
    let b = TcpBackend::start_on("kb-b", "127.0.19.2:8080".parse().unwrap());
    api.apply(service("probe", "127.95.0.1"));
    api.apply(slice("probe", &["127.0.19.1".to_owned()]));

    let cgroup = CgroupGuard::new("k8s-bench");
    let bpffs = BpffsDir::new("k8s-bench");
    let state = TempDir::new("k8s-bench-state");
    let kubeconfig = state.path().join("kubeconfig");
    api.kubeconfig(&kubeconfig).unwrap();
    let config = format!(
        "[agent]\nstate_dir = \"{}\"\n\n[agent.limits]\nmax_services = 32768\nmax_backends = 131072\n\
         max_service_backends = 131072\nmax_slots = 262144\n\n[agent.kubernetes]\n\
         kubeconfig = \"{}\"\nnode_name = \"node-a\"\n",
        state.path().display(),
        kubeconfig.display()
    );
    let started = SystemTime::now();
    // Info level: a debug line per map write would itself cost seconds at this size.
    let agent = Agent::start_with_env(&config, &cgroup, &bpffs, &[], &[("RUST_LOG", Some("info"))]);
    let synced = wait_applied(&agent, 0, Duration::from_secs(120)).expect("initial sync");
    let sync = synced.duration_since(started).unwrap_or_default();
    let rss_synced = rss_mb(agent.pid());
    // Where the start-up went, as the agent logs it (lists, translation, map writes).
    let log = agent.log_text();
    for line in log.lines().filter(|l| {
        l.contains("kubernetes: start-up") || (l.contains(" applied ") && l.contains("plan_ms"))
    }) {
        eprintln!(
            "agent: {}",
            line.split_once("Z ").map_or(line, |(_, rest)| rest)
        );
    }
    assert_split(&probe_connect_in(&cgroup, "127.95.0.1:80", 4), &[(&a, 4)]);

    let mut latencies = Vec::new();
    for k in 0..CHANGES {
        std::thread::sleep(Duration::from_millis(50 + (k as u64 * 7) % 23));
        let mark = agent.log_mark();
        let target = if k % 2 == 0 {
            "127.0.19.2"
        } else {
            "127.0.19.1"
        };
        let sent = SystemTime::now();
        api.apply(slice("probe", &[target.to_owned()]));
        let at = wait_applied(&agent, mark, Duration::from_secs(30)).expect("change applied");
        latencies.push(at.duration_since(sent).unwrap_or_default().as_secs_f64() * 1e3);
    }
    // The last change (CHANGES is even: back to a) is what connects reach.
    assert_split(&probe_connect_in(&cgroup, "127.95.0.1:80", 4), &[(&a, 4)]);
    let _ = &b;
    let rss_after = rss_mb(agent.pid());
    latencies.sort_by(f64::total_cmp);
    println!(
        "kubernetes bench: {SERVICES} Services x {ENDPOINTS} endpoints (+1 probe Service): \
         agent start to every Service in the maps {:.2} s; watch event to maps over {CHANGES} \
         changes: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; agent RSS {rss_synced:.1} MB after \
         the sync, {rss_after:.1} MB after the changes",
        sync.as_secs_f64(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or_default()
    );
}
