//! The socket-level data path, end to end: IPv6 in a network namespace, unconnected UDP with
//! replies from the VIP, getpeername/SO_ORIGINAL_DST, reverse state that is freed with its
//! socket, session affinity, services without backends, backend swaps under load, map capacity
//! limits, and TCP and UDP services sharing one VIP.
//!
//! Privileged: run as root through `cargo xtask test` (single-threaded; the harness serializes
//! the tests anyway). Each test uses its own VIPs (127.100.1x.*, or addresses inside its own
//! network namespace), cgroup and bpffs directory.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Display;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use integration_tests::agent::is_warn_or_error;
use integration_tests::maps::{
    TCP_PEERS_ENTRIES, datapath_counters, hold_every_tcp_peer, map_len, tcp_peers_in_use,
};
use integration_tests::observe::metric_value;
use integration_tests::probe::{ProbeLine, probe_connect_in, probe_udp_in, run_probe_in_for};
use integration_tests::probe::{assert_no_errors, expect_counts};
use integration_tests::{
    NetNs, ORIGINAL_DST_ON, ProbeServer, ProbeSummary, ServerKind, ServiceSpec, TcpBackend,
    TestEnv, UdpBackend, probe_summary_in, render_config, service_status, services, spawn_probe_in,
    wait_for_backends, wait_until,
};

/// How long we poll for an applied config before giving up.
const POLL_LIMIT: Duration = Duration::from_secs(5);
/// Time bound of an ordinary probe run.
const PROBE_LIMIT: Duration = Duration::from_secs(60);

fn sock(addr: &str) -> SocketAddr {
    addr.parse()
        .unwrap_or_else(|e| panic!("{addr:?} is not IP:PORT: {e}"))
}

fn tcp_service(name: &str, vip: impl Display, backends: &[&TcpBackend]) -> ServiceSpec {
    ServiceSpec::tcp(name, vip).backends(backends.iter().map(|b| b.addr()))
}

fn udp_service(name: &str, vip: impl Display, backends: &[&UdpBackend]) -> ServiceSpec {
    ServiceSpec::udp(name, vip).backends(backends.iter().map(|b| b.addr()))
}

/// Arguments of a probe client run that prints a summary.
fn summary_args(mode: &str, addr: impl Display, count: usize) -> Vec<String> {
    vec![
        mode.to_owned(),
        "--addr".into(),
        addr.to_string(),
        "--count".into(),
        count.to_string(),
        "--summary".into(),
    ]
}

/// Waits (3 s) for a WARN/ERROR line logged after `mark` that mentions `keyword`
/// (case-insensitive); returns it, or panics with the log since `mark`.
#[track_caller]
fn wait_for_rejection(env: &TestEnv, mark: usize, keyword: &str) -> String {
    let keyword = keyword.to_lowercase();
    env.agent
        .wait_for_log_line(mark, Duration::from_secs(3), |line| {
            is_warn_or_error(line) && line.to_lowercase().contains(&keyword)
        })
        .unwrap_or_else(|| {
            panic!(
                "no WARN/ERROR log line mentioning `{keyword}` within 3 s of the edit; log since \
                 the edit:\n{}",
                env.agent.log_since(mark)
            )
        })
}

// ---------------------------------------------------------------------------------------------
// 1. IPv6
// ---------------------------------------------------------------------------------------------

#[test]
fn ipv6_tcp_and_udp_vips_reach_ipv6_backends_round_robin() {
    // IPv6 test addresses exist only inside this test's own network namespace.
    let ns = NetNs::new("v6");
    ns.add_lo_addr("fd00:100::1/128");
    // The VIP is a real address too, with decoys on it: a connect that is not translated lands
    // on a decoy instead of failing obscurely.
    ns.add_lo_addr("fd00:200::1/128");
    let tcp_vip = "[fd00:200::1]:80";
    let udp_vip = "[fd00:200::1]:53";
    let _tcp_decoy = ProbeServer::start(Some(&ns), ServerKind::Tcp, "v6-decoy", sock(tcp_vip));
    let _udp_decoy = ProbeServer::start(Some(&ns), ServerKind::Udp, "v6-udp-decoy", sock(udp_vip));
    let tcp: Vec<ProbeServer> = (1..=3)
        .map(|i| {
            let addr = sock(&format!("[fd00:100::1]:{}", 8000 + i));
            ProbeServer::start(Some(&ns), ServerKind::Tcp, &format!("v6-tcp-{i}"), addr)
        })
        .collect();
    let udp: Vec<ProbeServer> = (1..=3)
        .map(|i| {
            let addr = sock(&format!("[fd00:100::1]:{}", 5300 + i));
            ProbeServer::start(Some(&ns), ServerKind::Udp, &format!("v6-udp-{i}"), addr)
        })
        .collect();
    let config = render_config(&[
        ServiceSpec::tcp("v6-web", tcp_vip).backends(tcp.iter().map(ProbeServer::addr)),
        ServiceSpec::udp("v6-dns", udp_vip).backends(udp.iter().map(ProbeServer::addr)),
    ]);
    let env = TestEnv::start("v6", &config);
    let web = service_status(&env.bpffs, "v6-web");
    assert_eq!(sock(&web.vip), sock(tcp_vip), "{web:#?}");
    assert_eq!(web.backends.len(), 3, "{web:#?}");

    let summary = ns.probe_summary_in(
        &env.cgroup,
        summary_args("connect", tcp_vip, 60),
        PROBE_LIMIT,
    );
    eprintln!("ipv6 tcp: {summary:?}");
    assert_no_errors("ipv6 tcp", &summary);
    assert_eq!(
        summary.replies,
        expect_counts(&[("v6-tcp-1", 20), ("v6-tcp-2", 20), ("v6-tcp-3", 20)])
    );

    let summary = ns.probe_summary_in(&env.cgroup, summary_args("udp", udp_vip, 60), PROBE_LIMIT);
    eprintln!("ipv6 udp: {summary:?}");
    assert_no_errors("ipv6 udp", &summary);
    assert_eq!(
        summary.replies,
        expect_counts(&[("v6-udp-1", 20), ("v6-udp-2", 20), ("v6-udp-3", 20)])
    );
    assert_eq!(
        summary.sources,
        expect_counts(&[(sock(udp_vip), 60)]),
        "every reply must appear to come from the VIP"
    );

    let web = service_status(&env.bpffs, "v6-web");
    let dns = service_status(&env.bpffs, "v6-dns");
    for status in [&web, &dns] {
        assert!(
            status.backends.iter().all(|b| b.connections == 20),
            "`mesh services` connections: {status:#?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Unconnected UDP
// ---------------------------------------------------------------------------------------------

#[test]
fn unconnected_udp_replies_come_from_the_vip() {
    let a = UdpBackend::start("udp-a");
    let b = UdpBackend::start("udp-b");
    let c = UdpBackend::start("udp-c");
    let vip = "127.100.12.1:53";
    let env = TestEnv::start(
        "udpvip",
        &render_config(&[udp_service("dns", vip, &[&a, &b, &c])]),
    );

    // Every datagram from a new socket.
    let fresh = probe_summary_in(&env.cgroup, summary_args("udp-fresh", vip, 90), PROBE_LIMIT);
    eprintln!("udp, a new socket per datagram: {fresh:?}");
    assert_no_errors("udp-fresh", &fresh);
    assert_eq!(
        fresh.replies,
        expect_counts(&[("udp-a", 30), ("udp-b", 30), ("udp-c", 30)])
    );
    assert_eq!(fresh.sources, expect_counts(&[(vip, 90)]));

    // All datagrams from one socket: it talks to three backends at once, and still sees every
    // reply from the VIP.
    let one = probe_udp_in(&env.cgroup, vip, 90);
    assert!(one.errors().is_empty(), "udp: {:?}", one.error_counts());
    assert_eq!(
        one.counts(),
        BTreeMap::from([
            ("udp-a".to_owned(), 30),
            ("udp-b".to_owned(), 30),
            ("udp-c".to_owned(), 30)
        ])
    );
    assert_eq!(one.sources(), BTreeMap::from([(vip.to_owned(), 90)]));
    assert_eq!(
        [a.received(), b.received(), c.received()],
        [60, 60, 60],
        "datagrams each backend received"
    );
}

/// README, "Current limits": an unconnected UDP socket remembers the last 8 backends it reached
/// through VIPs; replies from older ones arrive untranslated.
#[test]
fn unconnected_udp_socket_translates_replies_of_its_last_8_backends() {
    const REMEMBERED: usize = 8;
    let backends: Vec<UdpBackend> = (0..REMEMBERED + 2)
        .map(|i| UdpBackend::start(&format!("ring-{i}")))
        .collect();
    let refs: Vec<&UdpBackend> = backends.iter().collect();
    let addr_of: BTreeMap<String, String> = backends
        .iter()
        .map(|b| (b.name().to_owned(), b.addr().to_string()))
        .collect();
    let vip = "127.100.20.1:53";
    let env = TestEnv::start(
        "udpring",
        &render_config(&[udp_service("ring", vip, &refs)]),
    );
    // One socket sends to `n` distinct backends (round-robin over all ten) before it reads a
    // reply: (replies shown from the VIP, replies shown from their backend's own address).
    let burst = |n: usize| {
        let args = ["udp-burst", "--addr", vip, "--count", &n.to_string()];
        let result = run_probe_in_for(&env.cgroup, args, PROBE_LIMIT);
        assert!(
            result.errors().is_empty(),
            "udp-burst of {n}: {:?}\n{}",
            result.error_counts(),
            result.stdout
        );
        let mut translated = 0;
        let mut untranslated = BTreeSet::new();
        for line in &result.lines {
            let ProbeLine::Reply {
                name,
                from: Some(from),
            } = line
            else {
                panic!("udp-burst of {n}: {line:?}\n{}", result.stdout);
            };
            if from == vip {
                translated += 1;
            } else {
                assert_eq!(
                    addr_of.get(name),
                    Some(from),
                    "an untranslated reply shows its backend's own address: {line:?}"
                );
                untranslated.insert(name.clone());
            }
        }
        assert_eq!(
            result.counts().len(),
            n,
            "{n} datagrams reach {n} distinct backends: {}",
            result.stdout
        );
        (translated, untranslated)
    };
    // Ten backends: the first two the socket reached were forgotten by the time it read.
    let (translated, untranslated) = burst(REMEMBERED + 2);
    eprintln!("10 backends: {translated} replies from the VIP, untranslated: {untranslated:?}");
    assert_eq!(translated, REMEMBERED, "untranslated: {untranslated:?}");
    assert_eq!(untranslated.len(), 2, "{untranslated:?}");
    // Eight (the round-robin goes on over the others): all remembered.
    let (translated, untranslated) = burst(REMEMBERED);
    assert_eq!(
        (translated, untranslated.len()),
        (REMEMBERED, 0),
        "{untranslated:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. getpeername and SO_ORIGINAL_DST
// ---------------------------------------------------------------------------------------------

/// The `peer`, `original_dst` and `reply` lines of `mesh-probe peer`.
#[derive(Debug)]
struct PeerReport {
    peer: String,
    original_dst: String,
    reply: String,
}

fn parse_peer(stdout: &str) -> PeerReport {
    let field = |key: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key} ")))
            .unwrap_or_else(|| panic!("mesh-probe peer printed no `{key}` line:\n{stdout}"))
            .to_owned()
    };
    PeerReport {
        peer: field("peer"),
        original_dst: field("original_dst"),
        reply: field("reply"),
    }
}

fn peer_args(vip: &str, proto: &str) -> Vec<String> {
    ["peer", "--addr", vip, "--proto", proto]
        .map(str::to_owned)
        .to_vec()
}

#[test]
fn connected_udp_and_tcp_getpeername_and_original_dst_report_the_vip() {
    let a = TcpBackend::start("peer-a");
    let b = TcpBackend::start("peer-b");
    let u = UdpBackend::start("peer-u");
    let tcp_vip = "127.100.13.1:80";
    let udp_vip = "127.100.13.1:53";
    // IPv6 in a namespace of its own.
    let ns = NetNs::new("peer6");
    ns.add_lo_addr("fd00:100::1/128");
    ns.add_lo_addr("fd00:200::1/128");
    let tcp6_vip = "[fd00:200::1]:80";
    let udp6_vip = "[fd00:200::1]:53";
    let t6 = ProbeServer::start(
        Some(&ns),
        ServerKind::Tcp,
        "peer-t6",
        sock("[fd00:100::1]:8080"),
    );
    let u6 = ProbeServer::start(
        Some(&ns),
        ServerKind::Udp,
        "peer-u6",
        sock("[fd00:100::1]:5353"),
    );
    let env = TestEnv::start(
        "peer",
        &format!(
            "{ORIGINAL_DST_ON}{}",
            render_config(&[
                tcp_service("peer-tcp", tcp_vip, &[&a, &b]),
                udp_service("peer-udp", udp_vip, &[&u]),
                ServiceSpec::tcp("peer-tcp6", tcp6_vip).backend(t6.addr(), 1),
                ServiceSpec::udp("peer-udp6", udp6_vip).backend(u6.addr(), 1),
            ])
        ),
    );

    // TCP over IPv4, four times so both backends are behind it at least once.
    let mut replies = BTreeSet::new();
    for _ in 0..4 {
        let out = run_probe_in_for(&env.cgroup, peer_args(tcp_vip, "tcp"), PROBE_LIMIT);
        let report = parse_peer(&out.stdout);
        eprintln!("tcp4: {report:?}");
        assert_eq!(report.peer, tcp_vip, "getpeername() of a TCP socket");
        assert_eq!(
            report.original_dst, tcp_vip,
            "SO_ORIGINAL_DST of a TCP socket"
        );
        replies.insert(report.reply);
    }
    assert_eq!(
        replies,
        BTreeSet::from(["peer-a".to_owned(), "peer-b".to_owned()]),
        "the connection really goes to the backends"
    );

    // Connected UDP over IPv4.
    let out = run_probe_in_for(&env.cgroup, peer_args(udp_vip, "udp"), PROBE_LIMIT);
    let report = parse_peer(&out.stdout);
    eprintln!("udp4: {report:?}");
    assert_eq!(
        report.peer, udp_vip,
        "getpeername() of a connected UDP socket"
    );
    assert_eq!(
        report.reply,
        format!("peer-u from {udp_vip}"),
        "the reply comes from the backend, shown as the VIP"
    );
    assert_eq!(u.received(), 1);

    // TCP and connected UDP over IPv6.
    let out = ns.run_probe_in(&env.cgroup, peer_args(tcp6_vip, "tcp"), PROBE_LIMIT);
    let report = parse_peer(&out.stdout);
    eprintln!("tcp6: {report:?}");
    assert_eq!(
        sock(&report.peer),
        sock(tcp6_vip),
        "getpeername() of a TCP6 socket"
    );
    assert_eq!(
        report.original_dst.parse::<SocketAddr>().ok(),
        Some(sock(tcp6_vip)),
        "IP6T_SO_ORIGINAL_DST of a TCP6 socket"
    );
    assert_eq!(report.reply, "peer-t6");

    let out = ns.run_probe_in(&env.cgroup, peer_args(udp6_vip, "udp"), PROBE_LIMIT);
    let report = parse_peer(&out.stdout);
    eprintln!("udp6: {report:?}");
    assert_eq!(
        sock(&report.peer),
        sock(udp6_vip),
        "getpeername() of a UDP6 socket"
    );
    assert_eq!(report.reply, format!("peer-u6 from {}", sock(udp6_vip)));
}

/// By default a TCP socket's translation lives in its `tcp_peers` entry, not in
/// socket storage: getpeername() shows the VIP, SO_ORIGINAL_DST is left to the kernel (which
/// has no DNAT record of the VIP), and the entry exists exactly while the socket is open.
#[test]
fn tcp_translations_live_in_tcp_peers_while_their_socket_is_open() {
    tcp_peers_follow_their_sockets("tcppeers", "127.100.13.2", "", true);
}

/// With telemetry off the release reads a connection's outcome only for passive detection:
/// the entry goes at release either way, nothing may stay behind, and no connection is
/// measured (the switch is fixed in the programs at load).
#[test]
fn tcp_translations_are_released_with_telemetry_off() {
    tcp_peers_follow_their_sockets(
        "tcppeers-nt",
        "127.100.13.3",
        "[agent]\ntelemetry = false\n\n",
        false,
    );
}

/// A TCP socket whose `tcp_peers` entry another socket holds (its cookie and an open socket's
/// are equal modulo the array's size) keeps its translation in socket storage: getpeername()
/// still shows the VIP, the held entries stay as they are, and the state goes at release.
/// Every entry is made to look held, so each connect here finds its entry taken; answering
/// SO_ORIGINAL_DST shows that the translation is in socket storage.
#[test]
fn a_socket_whose_tcp_peers_entry_is_taken_uses_socket_storage() {
    let a = TcpBackend::start("taken-a");
    let vip = "127.100.13.4:80";
    let env = TestEnv::start("taken", &render_config(&[tcp_service("taken", vip, &[&a])]));
    hold_every_tcp_peer(&env.bpffs);
    assert_eq!(tcp_peers_in_use(&env.bpffs), TCP_PEERS_ENTRIES);
    let before = datapath_counters(&env.bpffs);

    for _ in 0..2 {
        let out = run_probe_in_for(&env.cgroup, peer_args(vip, "tcp"), PROBE_LIMIT);
        let report = parse_peer(&out.stdout);
        assert_eq!(
            report.peer, vip,
            "getpeername() of a TCP socket in socket storage"
        );
        assert_eq!(
            report.reply, "taken-a",
            "the connection really goes to the backend"
        );
        assert_eq!(
            report.original_dst, vip,
            "a translation in socket storage answers SO_ORIGINAL_DST"
        );
    }
    let mut after = datapath_counters(&env.bpffs);
    assert!(
        wait_until(Duration::from_secs(5), || {
            after = datapath_counters(&env.bpffs);
            after.rev_released - before.rev_released == 2
        }),
        "both sockets' states are released: {before:?} -> {after:?}"
    );
    assert_eq!(
        (
            after.rev_created - before.rev_created,
            after.rev_failed - before.rev_failed,
        ),
        (2, 0),
        "two translations created in socket storage, none failed"
    );
    assert_eq!(
        tcp_peers_in_use(&env.bpffs),
        TCP_PEERS_ENTRIES,
        "a socket never takes or frees another socket's entry"
    );
    assert_eq!(tcp_peers_metric(&env), Some(TCP_PEERS_ENTRIES as f64));
}

/// `mesh_map_entries{map="tcp_peers"}` from the agent's /metrics.
fn tcp_peers_metric(env: &TestEnv) -> Option<f64> {
    metric_value(
        &env.agent.metrics_text(),
        "mesh_map_entries",
        &[("map", "tcp_peers")],
    )
}

fn tcp_peers_follow_their_sockets(tag: &str, vip_ip: &str, agent_table: &str, telemetry: bool) {
    let a = TcpBackend::start(&format!("{tag}-a"));
    let vip = format!("{vip_ip}:80");
    let vip = vip.as_str();
    // A backend nobody listens on, no active checks, passive detection on (so the connect is
    // followed) but far from ejecting: every connect to it fails in SYN_SENT.
    let dead = TcpBackend::start(&format!("{tag}-dead"));
    let dead_addr = dead.addr();
    drop(dead);
    let refused_vip = format!("{vip_ip}:81");
    let env = TestEnv::start(
        tag,
        &format!(
            "{agent_table}{}",
            render_config(&[
                tcp_service("tp", vip, &[&a]),
                ServiceSpec::tcp("tp-refused", &refused_vip)
                    .set("health", "{ type = \"none\", passive_failures = 1000 }")
                    .backend(dead_addr, 1),
            ])
        ),
    );
    let before = datapath_counters(&env.bpffs);

    let out = run_probe_in_for(&env.cgroup, peer_args(vip, "tcp"), PROBE_LIMIT);
    let report = parse_peer(&out.stdout);
    eprintln!("tcp4: {report:?}");
    assert_eq!(report.peer, vip, "getpeername() of a TCP socket");
    assert_eq!(
        report.reply,
        format!("{tag}-a"),
        "the connection really goes to the backend"
    );
    assert_ne!(
        report.original_dst, vip,
        "SO_ORIGINAL_DST is answered only with `original_dst = true`"
    );

    let holder = spawn_probe_in(
        &env.cgroup,
        ["peer", "--addr", vip, "--proto", "tcp", "--hold-ms", "3000"],
    );
    let mut open = 0;
    let recorded = wait_until(Duration::from_secs(2), || {
        open = tcp_peers_in_use(&env.bpffs);
        open == 1
    });
    // Read while the holder still holds its entry (3 s); the agent counts held entries too.
    let exported = tcp_peers_metric(&env);
    let out = holder.wait(Duration::from_secs(10));
    assert!(
        recorded,
        "an open TCP socket connected through the VIP must be in tcp_peers ({open} entries); \
         probe said:\n{}",
        out.stdout
    );
    assert_eq!(parse_peer(&out.stdout).peer, vip);
    assert_eq!(
        exported,
        Some(1.0),
        "mesh_map_entries{{map=\"tcp_peers\"}} counts the held entry"
    );

    let refused = probe_connect_in(&env.cgroup, &refused_vip, 3);
    assert_eq!(
        refused.error_counts(),
        BTreeMap::from([("ECONNREFUSED".to_owned(), 3)]),
        "connects to the dead backend are refused by it"
    );
    assert!(
        wait_until(Duration::from_secs(5), || tcp_peers_in_use(&env.bpffs) == 0),
        "tcp_peers must forget every socket once it is closed"
    );
    assert_eq!(tcp_peers_metric(&env), Some(0.0));
    let after = datapath_counters(&env.bpffs);
    assert_eq!(
        (
            after.rev_created - before.rev_created,
            after.rev_released - before.rev_released,
            after.rev_failed - before.rev_failed,
        ),
        (5, 5, 0),
        "five TCP sockets: translations created and released, none failed"
    );
    // Two connections to `a` completed and closed (the probe's and the holder's): measured
    // only with telemetry on.
    let rtt_samples = metric_value(
        &env.agent.metrics_text(),
        "mesh_backend_rtt_seconds_count",
        &[("service", "tp")],
    )
    .unwrap_or(0.0);
    assert_eq!(
        rtt_samples,
        if telemetry { 2.0 } else { 0.0 },
        "RTT samples of the service's closed connections with telemetry {}",
        if telemetry { "on" } else { "off" }
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Reverse state lifetime
// ---------------------------------------------------------------------------------------------

#[test]
fn reverse_state_is_released_with_the_sockets() {
    const SOCKETS: usize = 100_000;
    const CONNECTED: usize = 1_000;
    let a = UdpBackend::start("rev-a");
    let b = UdpBackend::start("rev-b");
    let vip = "127.100.14.1:53";
    let env = TestEnv::start(
        "revstate",
        &render_config(&[udp_service("rev", vip, &[&a, &b])]),
    );
    let before = datapath_counters(&env.bpffs);
    eprintln!("before: {before:?}");

    // 100 000 short-lived unconnected sockets, one request/reply each; the whole run is killed
    // (and the test fails) after 120 s.
    let started = Instant::now();
    let fresh = probe_summary_in(
        &env.cgroup,
        summary_args("udp-fresh", vip, SOCKETS),
        Duration::from_secs(120),
    );
    eprintln!(
        "{SOCKETS} unconnected sockets in {:?}: {fresh:?}",
        started.elapsed()
    );
    assert_no_errors("udp-fresh", &fresh);
    let half = (SOCKETS / 2) as u64;
    assert_eq!(
        fresh.replies,
        expect_counts(&[("rev-a", half), ("rev-b", half)])
    );
    assert_eq!(fresh.sources, expect_counts(&[(vip, SOCKETS as u64)]));

    // The probe has exited: every socket it made is released.
    let mut after = datapath_counters(&env.bpffs);
    let balanced = wait_until(Duration::from_secs(5), || {
        after = datapath_counters(&env.bpffs);
        after.rev_created == after.rev_released
    });
    eprintln!("after the unconnected sockets: {after:?}");
    assert!(
        after.rev_created - before.rev_created >= SOCKETS as u64,
        "every socket that sent to the VIP gets reverse state: {before:?} -> {after:?}"
    );
    assert!(
        balanced,
        "reverse state of closed sockets must be released: {after:?}"
    );

    // 1 000 connected UDP sockets: each is recorded in udp_flows while open, and forgotten when
    // it closes.
    let before = after;
    let connected = probe_summary_in(
        &env.cgroup,
        summary_args("udp-connected", vip, CONNECTED),
        PROBE_LIMIT,
    );
    eprintln!("{CONNECTED} connected sockets: {connected:?}");
    assert_no_errors("udp-connected", &connected);
    assert_eq!(connected.reply_total(), CONNECTED as u64);
    let mut after = datapath_counters(&env.bpffs);
    let mut flows = usize::MAX;
    let settled = wait_until(Duration::from_secs(5), || {
        after = datapath_counters(&env.bpffs);
        flows = map_len(&env.bpffs, "udp_flows");
        flows == 0 && after.rev_created == after.rev_released
    });
    eprintln!("after the connected sockets: {after:?}, udp_flows entries: {flows}");
    assert_eq!(
        after.udp_flows_added - before.udp_flows_added,
        CONNECTED as u64,
        "each connected socket is recorded once: {before:?} -> {after:?}"
    );
    assert_eq!(after.udp_flows_full, before.udp_flows_full, "{after:?}");
    assert!(
        after.rev_created - before.rev_created >= CONNECTED as u64,
        "{before:?} -> {after:?}"
    );
    assert!(
        settled,
        "udp_flows must be empty ({flows} entries) and reverse state balanced once the sockets \
         are closed: {after:?}"
    );

    // While a connected socket is open, udp_flows holds it (so the empty map above means
    // "released", not "never recorded").
    let holder = spawn_probe_in(
        &env.cgroup,
        ["peer", "--addr", vip, "--proto", "udp", "--hold-ms", "3000"],
    );
    let mut open_flows = 0;
    let recorded = wait_until(Duration::from_secs(2), || {
        open_flows = map_len(&env.bpffs, "udp_flows");
        open_flows == 1
    });
    let out = holder.wait(Duration::from_secs(10));
    assert!(
        recorded,
        "an open connected UDP socket must be in udp_flows ({open_flows} entries); probe said:\n{}",
        out.stdout
    );
    assert!(
        wait_until(Duration::from_secs(5), || map_len(&env.bpffs, "udp_flows")
            == 0),
        "udp_flows must forget the socket once it is closed"
    );
}

// ---------------------------------------------------------------------------------------------
// 5. Session affinity
// ---------------------------------------------------------------------------------------------

#[test]
fn affinity_pins_a_client_and_plain_round_robin_spreads() {
    let backends: Vec<TcpBackend> = ["aff-a", "aff-b", "aff-c"]
        .into_iter()
        .map(TcpBackend::start)
        .collect();
    let all: Vec<&TcpBackend> = backends.iter().collect();
    let sticky_vip = "127.100.15.1:80";
    let plain_vip = "127.100.15.2:80";
    let sticky = |members: &[&TcpBackend]| {
        tcp_service("sticky", sticky_vip, members).set("affinity", "{ timeout = \"30s\" }")
    };
    let plain = tcp_service("plain", plain_vip, &all);
    let env = TestEnv::start("affinity", &render_config(&[sticky(&all), plain.clone()]));

    // Two probe processes, one after the other: the client identity is (netns, cgroup), so
    // both land on the same backend.
    let first = probe_summary_in(
        &env.cgroup,
        summary_args("connect", sticky_vip, 100),
        PROBE_LIMIT,
    );
    let second = probe_summary_in(
        &env.cgroup,
        summary_args("connect", sticky_vip, 50),
        PROBE_LIMIT,
    );
    eprintln!("affinity: {first:?} then {second:?}");
    assert_no_errors("affinity", &first);
    assert_no_errors("affinity", &second);
    assert_eq!(first.replies.len(), 1, "one client, one backend: {first:?}");
    let pinned = first.replies.keys().next().expect("a reply").clone();
    assert_eq!(second.replies, expect_counts(&[(pinned.as_str(), 50)]));

    // Without affinity the same client is spread evenly.
    let spread = probe_summary_in(
        &env.cgroup,
        summary_args("connect", plain_vip, 99),
        PROBE_LIMIT,
    );
    eprintln!("no affinity: {spread:?}");
    assert_no_errors("no affinity", &spread);
    assert_eq!(
        spread.replies,
        expect_counts(&[("aff-a", 33), ("aff-b", 33), ("aff-c", 33)])
    );

    // The pinned backend leaves the service (it keeps running, so a stale pin would show).
    let remaining: Vec<&TcpBackend> = all.iter().copied().filter(|b| b.name() != pinned).collect();
    env.write_services(&[sticky(&remaining), plain]);
    let addrs: Vec<SocketAddr> = remaining.iter().map(|b| b.addr()).collect();
    wait_for_backends(&env.bpffs, "sticky", &addrs, POLL_LIMIT);
    let moved = probe_summary_in(
        &env.cgroup,
        summary_args("connect", sticky_vip, 100),
        PROBE_LIMIT,
    );
    eprintln!("after removing {pinned}: {moved:?}");
    assert_no_errors("after the removal", &moved);
    assert_eq!(moved.count(&pinned), 0, "{moved:?}");
    assert_eq!(
        moved.replies.len(),
        1,
        "the client is pinned again, to one other backend: {moved:?}"
    );
    assert_eq!(moved.reply_total(), 100);
}

// ---------------------------------------------------------------------------------------------
// 6. No backends
// ---------------------------------------------------------------------------------------------

#[test]
fn no_backends_refuses_at_once_and_counts() {
    let reject_vip = "127.100.16.1:80";
    let pass_vip = "127.100.16.2:80";
    // Decoys on both VIPs: only a connect that passes through untranslated reaches one.
    let reject_decoy = TcpBackend::start_on("decoy-reject", sock(reject_vip));
    let pass_decoy = TcpBackend::start_on("decoy-pass", sock(pass_vip));
    let env = TestEnv::start(
        "empty",
        &render_config(&[
            ServiceSpec::tcp("empty-reject", reject_vip),
            ServiceSpec::tcp("empty-pass", pass_vip).set("on_empty", "\"passthrough\""),
        ]),
    );
    let before = service_status(&env.bpffs, "empty-reject").no_backend;

    let refused = probe_summary_in(
        &env.cgroup,
        summary_args("connect", reject_vip, 100),
        PROBE_LIMIT,
    );
    eprintln!("reject: {refused:?}");
    assert_eq!(
        refused.errors,
        expect_counts(&[("ECONNREFUSED", 100)]),
        "{refused:?}"
    );
    assert!(
        refused.max_connect_us < 10_000,
        "a refused connect must fail at once, the slowest took {} µs",
        refused.max_connect_us
    );
    assert_eq!(reject_decoy.accepted(), 0, "nothing passes through");
    let after = service_status(&env.bpffs, "empty-reject").no_backend;
    assert_eq!(after - before, 100, "no_backend {before} -> {after}");

    let passed = probe_summary_in(
        &env.cgroup,
        summary_args("connect", pass_vip, 20),
        PROBE_LIMIT,
    );
    eprintln!(
        "passthrough: {passed:?}; its no_backend: {}",
        service_status(&env.bpffs, "empty-pass").no_backend
    );
    assert_no_errors("passthrough", &passed);
    assert_eq!(passed.replies, expect_counts(&[("decoy-pass", 20)]));
    assert_eq!(pass_decoy.accepted(), 20);
}

// ---------------------------------------------------------------------------------------------
// 7. Backend swaps under load
// ---------------------------------------------------------------------------------------------

#[test]
fn backend_swaps_under_load_never_misroute() {
    const GENERATIONS: u64 = 1_000;
    const CLIENTS: usize = 2;
    const MIN_CONNECTS_PER_GENERATION: u64 = 20;
    let writer_limit = Duration::from_secs(100);
    let a = TcpBackend::start("swap-a");
    let b = TcpBackend::start("swap-b");
    let c = TcpBackend::start("swap-c");
    let vip = "127.100.17.1:80";
    let decoy = TcpBackend::start_on("swap-decoy", sock(vip));
    let ab = [tcp_service("swap", vip, &[&a, &b])];
    let bc = [tcp_service("swap", vip, &[&b, &c])];
    let env = TestEnv::start("swap", &render_config(&ab));

    let stop_dir = std::env::temp_dir().join(format!("{}-stop", env.cgroup.name()));
    std::fs::create_dir_all(&stop_dir).expect("create the stop-file directory");
    let stop_file = stop_dir.join("stop");
    let clients: Vec<_> = (0..CLIENTS)
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
                    "120000",
                ],
            )
        })
        .collect();

    // Alternate {A,B} and {B,C}; write the next set as soon as the previous one is live.
    let start_generation = service_status(&env.bpffs, "swap").generation;
    let mut generation = start_generation;
    let mut writes = 0u64;
    let mut slowest = Duration::ZERO;
    let started = Instant::now();
    let mut stalled = None;
    while generation < start_generation + GENERATIONS && started.elapsed() < writer_limit {
        writes += 1;
        let next = if writes % 2 == 1 { &bc } else { &ab };
        let written = Instant::now();
        env.write_services(next);
        let mut applied = false;
        while written.elapsed() < Duration::from_secs(2) {
            let now = service_status(&env.bpffs, "swap").generation;
            if now != generation {
                generation = now;
                applied = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        slowest = slowest.max(written.elapsed());
        if !applied {
            stalled = Some(writes);
            break;
        }
    }
    let writing = started.elapsed();
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
    let applied = generation - start_generation;
    eprintln!(
        "swaps: {writes} writes, {applied} generations applied in {writing:?} (slowest apply \
         {slowest:?}); {connects} connects from {CLIENTS} clients: replies {replies:?}, errors \
         {errors:?}"
    );
    assert!(
        stalled.is_none(),
        "config write #{} was not applied within 2 s (generation stayed {generation})",
        stalled.unwrap_or_default()
    );
    assert!(
        applied >= GENERATIONS,
        "only {applied} generations applied within {writer_limit:?}"
    );
    // Enough connects that the swaps happened under load, not between connects (measured:
    // hundreds per generation).
    assert!(
        connects >= MIN_CONNECTS_PER_GENERATION * applied,
        "only {connects} connects during {applied} generations"
    );
    assert!(errors.is_empty(), "connect errors during swaps: {errors:?}");
    let allowed: BTreeSet<&str> = ["swap-a", "swap-b", "swap-c"].into();
    let misrouted: BTreeMap<&String, &u64> = replies
        .iter()
        .filter(|(k, _)| !allowed.contains(k.as_str()))
        .collect();
    assert!(misrouted.is_empty(), "misrouted connects: {misrouted:?}");
    assert_eq!(decoy.accepted(), 0, "connects reached the VIP untranslated");
    // A connect that read the old slot set after it was deleted would find no backend.
    let status = service_status(&env.bpffs, "swap");
    assert_eq!(
        status.no_backend, 0,
        "connects that found no backend: {status:#?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 8. Capacity limits
// ---------------------------------------------------------------------------------------------

#[test]
fn config_over_capacity_is_rejected_whole() {
    // Three services need 2 x 3 + 1 = 7 ids (old and new coexist during an update); four need 9.
    let limits = "[agent.limits]\nmax_services = 7\n\n";
    let backends: Vec<TcpBackend> = ["cap-a", "cap-b", "cap-c", "cap-d"]
        .into_iter()
        .map(TcpBackend::start)
        .collect();
    let vips: Vec<String> = (1..=4).map(|i| format!("127.100.18.{i}:80")).collect();
    // Whoever reaches this was not translated.
    let decoy = TcpBackend::start_on("cap-decoy", sock(&vips[3]));
    let three: Vec<ServiceSpec> = (0..3)
        .map(|i| tcp_service(&format!("cap-{i}"), &vips[i], &[&backends[i]]))
        .collect();
    let mut env = TestEnv::start("capacity", &format!("{limits}{}", render_config(&three)));
    for (i, vip) in vips.iter().take(3).enumerate() {
        let got = probe_summary_in(&env.cgroup, summary_args("connect", vip, 10), PROBE_LIMIT);
        assert_eq!(
            got.replies,
            expect_counts(&[(backends[i].name(), 10)]),
            "{vip}"
        );
    }

    // Four services (and a changed backend of the first one): over the limit, so nothing of it
    // may apply.
    let mut four = vec![tcp_service("cap-0", &vips[0], &[&backends[3]])];
    four.extend(three[1..].iter().cloned());
    four.push(tcp_service("cap-3", &vips[3], &[&backends[3]]));
    let mark = env.agent.log_mark();
    env.agent
        .write_config(&format!("{limits}{}", render_config(&four)));
    let line = wait_for_rejection(&env, mark, "max_services");
    eprintln!("rejection: {line}");
    assert!(
        env.agent.is_running(),
        "a rejected edit must not stop the agent"
    );

    let doc = services(&env.bpffs);
    assert_eq!(doc.services.len(), 3, "{doc:#?}");
    assert_eq!(
        service_status(&env.bpffs, "cap-0").backend_addrs(),
        BTreeSet::from([backends[0].addr()])
    );
    for (i, vip) in vips.iter().take(3).enumerate() {
        let got = probe_summary_in(&env.cgroup, summary_args("connect", vip, 10), PROBE_LIMIT);
        assert_eq!(
            got.replies,
            expect_counts(&[(backends[i].name(), 10)]),
            "{vip} after the rejected edit"
        );
    }
    let fourth = probe_summary_in(
        &env.cgroup,
        summary_args("connect", &vips[3], 10),
        PROBE_LIMIT,
    );
    assert_eq!(
        fourth.replies,
        expect_counts(&[("cap-decoy", 10)]),
        "the 4th VIP must not be translated"
    );
    assert_eq!(decoy.accepted(), 10);
    assert_eq!(backends[3].accepted(), 0);
}

// ---------------------------------------------------------------------------------------------
// 9. TCP and UDP on one VIP
// ---------------------------------------------------------------------------------------------

#[test]
fn tcp_and_udp_services_on_one_vip_are_separate() {
    let t1 = TcpBackend::start("both-t1");
    let t2 = TcpBackend::start("both-t2");
    let u1 = UdpBackend::start("both-u1");
    let u2 = UdpBackend::start("both-u2");
    let vip = "127.100.19.1:5000";
    let env = TestEnv::start(
        "bothproto",
        &render_config(&[
            tcp_service("both-tcp", vip, &[&t1, &t2]),
            udp_service("both-udp", vip, &[&u1, &u2]),
        ]),
    );
    let doc = services(&env.bpffs);
    let protocols: BTreeSet<(&str, &str)> = doc
        .services
        .iter()
        .map(|s| (s.vip.as_str(), s.protocol.as_str()))
        .collect();
    assert_eq!(protocols, BTreeSet::from([(vip, "tcp"), (vip, "udp")]));

    let tcp = probe_summary_in(&env.cgroup, summary_args("connect", vip, 20), PROBE_LIMIT);
    assert_no_errors("tcp", &tcp);
    assert_eq!(
        tcp.replies,
        expect_counts(&[("both-t1", 10), ("both-t2", 10)])
    );

    let udp = probe_summary_in(&env.cgroup, summary_args("udp", vip, 20), PROBE_LIMIT);
    assert_no_errors("udp", &udp);
    assert_eq!(
        udp.replies,
        expect_counts(&[("both-u1", 10), ("both-u2", 10)])
    );
    assert_eq!(udp.sources, expect_counts(&[(vip, 20)]));

    let connected = probe_summary_in(
        &env.cgroup,
        summary_args("udp-connected", vip, 20),
        PROBE_LIMIT,
    );
    assert_no_errors("connected udp", &connected);
    assert_eq!(
        connected.replies,
        expect_counts(&[("both-u1", 10), ("both-u2", 10)])
    );
    assert_eq!(
        [t1.accepted(), t2.accepted(), u1.received(), u2.received()],
        [10, 10, 20, 20]
    );
}
