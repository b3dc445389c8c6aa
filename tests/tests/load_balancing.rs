//! Foundation: connects to a VIP from processes in the agent's cgroup are spread round-robin
//! (weighted) over the service's backends, config edits apply live, and nothing else is touched.
//!
//! Privileged: run as root through `cargo xtask test` (single-threaded; the harness serializes
//! the tests anyway). Each test uses its own VIPs (127.100.<test>.x), cgroup and bpffs dir.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use integration_tests::agent::is_warn_or_error;
use integration_tests::probe::probe_connect_outside;
use integration_tests::{
    ServiceSpec, TcpBackend, TestEnv, assert_split, render_config, service_status,
    wait_for_backends,
};

/// A config edit must be in the datapath within this long (README; BENCHMARKS.md: p99 31 ms
/// from the rename to the first connection, up to 350 ms under load). Measured here by polling
/// `mesh services`, which spawns the CLI each time.
const APPLY_BUDGET: Duration = Duration::from_millis(500);
/// How long we keep polling before giving up (longer than the budget, so a slow apply is
/// reported with its real duration instead of as a timeout).
const POLL_LIMIT: Duration = Duration::from_secs(5);

fn addrs(backends: &[&TcpBackend]) -> Vec<SocketAddr> {
    backends.iter().map(|b| b.addr()).collect()
}

fn service(name: &str, vip: &str, backends: &[(&TcpBackend, i64)]) -> ServiceSpec {
    backends
        .iter()
        .fold(ServiceSpec::tcp(name, vip), |spec, (b, weight)| {
            spec.backend(b.addr(), *weight)
        })
}

/// Accepted-connection counts of `backends`, to compare before/after a probe run.
fn accepted(backends: &[&TcpBackend]) -> Vec<usize> {
    backends.iter().map(|b| b.accepted()).collect()
}

fn deltas(before: &[usize], backends: &[&TcpBackend]) -> Vec<usize> {
    before
        .iter()
        .zip(backends)
        .map(|(before, b)| b.accepted() - before)
        .collect()
}

/// Waits (3 s) for a WARN/ERROR line logged after `mark` that mentions `keyword`
/// (case-insensitive) and not `unless`; returns it. A rejection is one self-contained line:
/// level, reason and service together, as line-based log shippers and `grep` see it.
#[track_caller]
fn wait_for_rejection(env: &TestEnv, mark: usize, keyword: &str, unless: Option<&str>) -> String {
    let mentions = |line: &str, word: &str| line.to_lowercase().contains(word);
    let found = env
        .agent
        .wait_for_log_line(mark, Duration::from_secs(3), |line| {
            is_warn_or_error(line)
                && mentions(line, keyword)
                && !unless.is_some_and(|u| mentions(line, u))
        });
    if let Some(line) = found {
        return line;
    }
    let log = env.agent.log_since(mark);
    let hint = if log.lines().any(|line| mentions(line, keyword)) {
        " (a line does mention it, but not a WARN/ERROR line: is one log record split over \
         several lines?)"
    } else {
        ""
    };
    panic!(
        "no WARN/ERROR log line mentioning `{keyword}` within 3 s of the edit{hint}; log since \
         the edit:\n{log}"
    )
}

#[test]
fn round_robin_splits_connections_evenly() {
    let a = TcpBackend::start("rr-a");
    let b = TcpBackend::start("rr-b");
    let c = TcpBackend::start("rr-c");
    let vip = "127.100.1.1:80";
    let config = render_config(&[service("web", vip, &[(&a, 1), (&b, 1), (&c, 1)])]);
    let env = TestEnv::start("rr", &config);

    // /readyz answering 200 means the initial config is in the maps: no waiting here.
    let status = service_status(&env.bpffs, "web");
    assert_eq!(
        status.backend_addrs(),
        addrs(&[&a, &b, &c]).into_iter().collect(),
        "right after /readyz: {status:#?}"
    );
    assert_eq!(status.vip, vip);
    assert_eq!(status.protocol, "tcp");

    let result = env.connect(vip, 300);
    assert_split(&result, &[(&a, 100), (&b, 100), (&c, 100)]);
    assert_eq!(accepted(&[&a, &b, &c]), vec![100, 100, 100]);

    let status = service_status(&env.bpffs, "web");
    let want: BTreeMap<SocketAddr, u64> =
        addrs(&[&a, &b, &c]).into_iter().map(|x| (x, 100)).collect();
    assert_eq!(
        status.connections(),
        want,
        "`mesh services` connections: {status:#?}"
    );
    assert_eq!(status.no_backend, 0, "{status:#?}");
}

#[test]
fn weights_one_two_three_split_exactly() {
    let a = TcpBackend::start("w1");
    let b = TcpBackend::start("w2");
    let c = TcpBackend::start("w3");
    let vip = "127.100.2.1:80";
    let config = render_config(&[service("weighted", vip, &[(&a, 1), (&b, 2), (&c, 3)])]);
    let env = TestEnv::start("weights", &config);
    wait_for_backends(&env.bpffs, "weighted", &addrs(&[&a, &b, &c]), POLL_LIMIT);

    let status = service_status(&env.bpffs, "weighted");
    assert_eq!(
        status.slots(),
        BTreeMap::from([(a.addr(), 1), (b.addr(), 2), (c.addr(), 3)]),
        "{status:#?}"
    );
    assert_eq!(status.slot_count, 6, "{status:#?}");

    let result = env.connect(vip, 600);
    assert_split(&result, &[(&a, 100), (&b, 200), (&c, 300)]);
    assert_eq!(accepted(&[&a, &b, &c]), vec![100, 200, 300]);
}

#[test]
fn config_edit_adds_and_removes_backends_live() {
    let a = TcpBackend::start("edit-a");
    let b = TcpBackend::start("edit-b");
    let c = TcpBackend::start("edit-c");
    let vip = "127.100.3.1:80";
    let env = TestEnv::start(
        "edit",
        &render_config(&[service("live", vip, &[(&a, 1), (&b, 1)])]),
    );
    wait_for_backends(&env.bpffs, "live", &addrs(&[&a, &b]), POLL_LIMIT);

    // Add a third backend.
    env.write_services(&[service("live", vip, &[(&a, 1), (&b, 1), (&c, 1)])]);
    let took = wait_for_backends(&env.bpffs, "live", &addrs(&[&a, &b, &c]), POLL_LIMIT);
    eprintln!("adding a backend was applied in {took:?}");
    assert!(took < APPLY_BUDGET, "adding a backend took {took:?}");
    let status = service_status(&env.bpffs, "live");
    assert_eq!(status.slot_count, 3, "{status:#?}");

    let before = accepted(&[&a, &b, &c]);
    let result = env.connect(vip, 300);
    assert_split(&result, &[(&a, 100), (&b, 100), (&c, 100)]);
    assert_eq!(deltas(&before, &[&a, &b, &c]), vec![100, 100, 100]);

    // Remove one.
    env.write_services(&[service("live", vip, &[(&a, 1), (&c, 1)])]);
    let took = wait_for_backends(&env.bpffs, "live", &addrs(&[&a, &c]), POLL_LIMIT);
    eprintln!("removing a backend was applied in {took:?}");
    assert!(took < APPLY_BUDGET, "removing a backend took {took:?}");

    let before = accepted(&[&a, &b, &c]);
    let result = env.connect(vip, 200);
    assert_split(&result, &[(&a, 100), (&b, 0), (&c, 100)]);
    assert_eq!(deltas(&before, &[&a, &b, &c]), vec![100, 0, 100]);
}

#[test]
fn only_the_cgroup_and_only_vips_are_rewritten() {
    let vip = "127.100.4.1:80";
    // Listeners on the VIP itself and next to it: whoever reaches them was not rewritten.
    let decoy = TcpBackend::start_on("decoy", vip.parse().expect("addr"));
    let other = TcpBackend::start_on("other", "127.100.4.2:80".parse().expect("addr"));
    let other_port = TcpBackend::start_on("decoy-81", "127.100.4.1:81".parse().expect("addr"));
    let udp_decoy =
        integration_tests::UdpBackend::start_on("udp-decoy", vip.parse().expect("addr"));
    let a = TcpBackend::start("scope-a");
    let b = TcpBackend::start("scope-b");
    let env = TestEnv::start(
        "scope",
        &render_config(&[service("scoped", vip, &[(&a, 1), (&b, 1)])]),
    );
    wait_for_backends(&env.bpffs, "scoped", &addrs(&[&a, &b]), POLL_LIMIT);

    // Outside the cgroup: the VIP is just an address.
    let outside = probe_connect_outside(vip, 20);
    assert_split(&outside, &[(&decoy, 20)]);

    // Inside: the VIP goes to the backends...
    let inside = env.connect(vip, 100);
    assert_split(&inside, &[(&a, 50), (&b, 50)]);
    assert_eq!(
        decoy.accepted(),
        20,
        "only the outside connects reach the decoy"
    );

    // ...but another IP on the same port, and the VIP's IP on another port, are untouched.
    assert_split(&env.connect("127.100.4.2:80", 20), &[(&other, 20)]);
    assert_split(&env.connect("127.100.4.1:81", 20), &[(&other_port, 20)]);
    assert_eq!(accepted(&[&a, &b]), vec![50, 50]);

    // And so is UDP to the VIP's IP and port: the service is TCP.
    let udp = integration_tests::probe::probe_udp_in(&env.cgroup, vip, 10);
    assert!(
        udp.errors().is_empty(),
        "udp probe errors {:?}",
        udp.error_counts()
    );
    assert_eq!(udp.counts(), BTreeMap::from([("udp-decoy".to_owned(), 10)]));
    assert_eq!(udp.sources(), BTreeMap::from([(vip.to_owned(), 10)]));
    assert_eq!(udp_decoy.received(), 10);
}

#[test]
fn invalid_config_edit_keeps_previous_services() {
    let a = TcpBackend::start("inval-a");
    let b = TcpBackend::start("inval-b");
    let c = TcpBackend::start("inval-c");
    let name = "inval-web";
    let vip = "127.100.5.1:80";
    let mut env = TestEnv::start(
        "invalid",
        &render_config(&[service(name, vip, &[(&a, 1), (&b, 1)])]),
    );
    wait_for_backends(&env.bpffs, name, &addrs(&[&a, &b]), POLL_LIMIT);

    // 1. A backend with weight 0 (and b dropped: a partial apply would show in the split).
    let mark = env.agent.log_mark();
    env.write_services(&[service(name, vip, &[(&a, 1), (&c, 0)])]);
    let line = wait_for_rejection(&env, mark, "weight", None);
    assert!(
        line.contains(name),
        "the rejection should name the service: {line}"
    );
    assert!(
        env.agent.is_running(),
        "an invalid edit must not stop the agent"
    );
    assert_eq!(
        service_status(&env.bpffs, name).backend_addrs(),
        addrs(&[&a, &b]).into_iter().collect()
    );
    assert_split(&env.connect(vip, 100), &[(&a, 50), (&b, 50)]);

    // 2. Two services with the same name (again with a different backend set).
    let mark = env.agent.log_mark();
    env.write_services(&[
        service(name, vip, &[(&a, 1)]),
        service(name, "127.100.5.2:80", &[(&c, 1)]),
    ]);
    // A late repeat of the first rejection is about `weight`: skip it.
    let line = wait_for_rejection(&env, mark, "name", Some("weight"));
    assert!(
        line.contains(name),
        "the rejection should name the service: {line}"
    );
    assert!(
        env.agent.is_running(),
        "an invalid edit must not stop the agent"
    );
    let doc = integration_tests::services(&env.bpffs);
    assert_eq!(doc.services.len(), 1, "{doc:#?}");
    assert_split(&env.connect(vip, 100), &[(&a, 50), (&b, 50)]);
    assert_eq!(c.accepted(), 0);

    // 3. A valid edit applies again.
    env.write_services(&[service(name, vip, &[(&a, 1), (&b, 1), (&c, 1)])]);
    let took = wait_for_backends(&env.bpffs, name, &addrs(&[&a, &b, &c]), POLL_LIMIT);
    assert!(took < APPLY_BUDGET, "the valid edit took {took:?}");
    let before = accepted(&[&a, &b, &c]);
    assert_split(&env.connect(vip, 300), &[(&a, 100), (&b, 100), (&c, 100)]);
    assert_eq!(deltas(&before, &[&a, &b, &c]), vec![100, 100, 100]);
}
