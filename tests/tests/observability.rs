//! Observability, end to end, as an operator sees it: the agent's `/metrics` scraped over HTTP
//! (compared with what the backends really accepted), `promtool` linting a real scrape, a real
//! Prometheus server scraping the agent, `bpftool` dumps of the pinned maps and programs, the
//! `mesh` CLI views, and the Grafana dashboard's metric names checked against a real scrape.
//!
//! Privileged: run as root through `cargo xtask test` (single-threaded; the harness serializes
//! the tests anyway). Each test uses its own VIPs (127.100.5x.*), cgroup and bpffs directory.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Display;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use integration_tests::agent::strip_ansi;
use integration_tests::exchange::{ExchangeBackend, exchange_in};
use integration_tests::maps::{map_dump, map_max_entries};
use integration_tests::probe::{probe_udp_in, spawn_probe_in};
use integration_tests::prom::{PrometheusServer, Scrape, promtool, promtool_check_metrics};
use integration_tests::tools::{
    bpftool_json, formatted_entries, mesh_cli, mesh_cli_json, run_in_pty,
};
use integration_tests::{
    ProbeResult, ServiceSpec, TcpBackend, TestEnv, UdpBackend, render_config, wait_for_backends,
    wait_until, workspace_root,
};

/// How long we poll for an applied config (or a counter to settle) before giving up.
const POLL_LIMIT: Duration = Duration::from_secs(10);
/// Time bound of one data-exchange client run.
const CLIENT_LIMIT: Duration = Duration::from_secs(60);

const CONNECTIONS: &str = "mesh_backend_connections_total";

fn scrape(env: &TestEnv) -> Scrape {
    Scrape::parse(&env.agent.metrics_text()).unwrap_or_else(|e| panic!("/metrics: {e}"))
}

/// Scrapes until `done` holds for a scrape (bounded by [`POLL_LIMIT`]); returns the last scrape.
#[track_caller]
fn scrape_until(env: &TestEnv, what: &str, mut done: impl FnMut(&Scrape) -> bool) -> Scrape {
    let mut last = Scrape::default();
    let ok = wait_until(POLL_LIMIT, || {
        last = scrape(env);
        done(&last)
    });
    assert!(
        ok,
        "/metrics never showed {what} within {POLL_LIMIT:?}; last scrape:\n{}",
        last.text
    );
    last
}

/// The maps whose entry counts the agent takes from its model of the maps instead of reading
/// them (`Applied::counter_labels`); `backend_stats` is read.
const COUNTED_MAPS: [&str; 6] = [
    "services",
    "slots",
    "backends",
    "active",
    "service_names",
    "backend_stats",
];

/// `mesh_map_entries` of [`COUNTED_MAPS`] equal the entries bpftool finds in each map. A scrape
/// between two equal bpftool reads is compared, so a resync retiring slots meanwhile cannot
/// make it flaky (at most 5 tries).
#[track_caller]
fn assert_entry_counts_match_the_maps(env: &TestEnv) {
    let counts = || -> BTreeMap<&str, f64> {
        COUNTED_MAPS
            .iter()
            .map(|&map| {
                (
                    map,
                    formatted_entries(&map_dump(&env.bpffs, map)).len() as f64,
                )
            })
            .collect()
    };
    let mut last = None;
    for _ in 0..5 {
        let before = counts();
        let metrics = scrape(env);
        if counts() != before {
            continue;
        }
        let exported: BTreeMap<&str, f64> = COUNTED_MAPS
            .iter()
            .filter_map(|&map| Some((map, metrics.value("mesh_map_entries", &[("map", map)])?)))
            .collect();
        assert_eq!(
            exported, before,
            "mesh_map_entries against bpftool; scrape:\n{}",
            metrics.text
        );
        last = Some(before);
        break;
    }
    assert!(
        last.is_some(),
        "the maps changed between every two bpftool reads"
    );
}

fn tcp_service<'a>(
    name: &str,
    vip: impl Display,
    addrs: impl IntoIterator<Item = &'a SocketAddr>,
) -> ServiceSpec {
    ServiceSpec::tcp(name, vip).backends(addrs)
}

fn addr_labels(addrs: &[SocketAddr], value: f64) -> BTreeMap<String, f64> {
    addrs.iter().map(|a| (a.to_string(), value)).collect()
}

#[track_caller]
fn assert_no_errors(what: &str, result: &ProbeResult) {
    assert!(
        result.errors().is_empty(),
        "{what}: errors {:?}; replies {:?}",
        result.error_counts(),
        result.counts()
    );
}

// ---------------------------------------------------------------------------------------------
// 1. Connection counters
// ---------------------------------------------------------------------------------------------

#[test]
fn scraped_connection_counters_match_what_backends_accepted() {
    const NAME: &str = "obs-count";
    let backends: Vec<TcpBackend> = (1..=3)
        .map(|i| TcpBackend::start(&format!("count-{i}")))
        .collect();
    let addrs: Vec<SocketAddr> = backends.iter().map(TcpBackend::addr).collect();
    let vip = "127.100.50.1:80";
    let mut env = TestEnv::start(
        "obs-count",
        &render_config(&[tcp_service(NAME, vip, &addrs)]),
    );

    let result = env.connect(vip, 300);
    assert_no_errors("300 connects", &result);
    let accepted: BTreeMap<String, f64> = backends
        .iter()
        .map(|b| (b.addr().to_string(), b.accepted() as f64))
        .collect();
    assert_eq!(accepted, addr_labels(&addrs, 100.0), "round-robin split");

    let metrics = scrape(&env);
    let exported = metrics.by_label(
        CONNECTIONS,
        "backend",
        &[("service", NAME), ("protocol", "tcp")],
    );
    assert_eq!(
        exported, accepted,
        "{CONNECTIONS} per backend must equal what each backend accepted; scrape:\n{}",
        metrics.text
    );

    // A backend that leaves the config stops being exported.
    let removed = addrs[2].to_string();
    env.write_services(&[tcp_service(NAME, vip, &addrs[..2])]);
    wait_for_backends(&env.bpffs, NAME, &addrs[..2], POLL_LIMIT);
    let metrics = scrape_until(&env, &format!("no series of {removed}"), |s| {
        !s.samples
            .iter()
            .any(|x| x.labels.get("backend") == Some(&removed))
    });
    let kept = addr_labels(&addrs[..2], 100.0);
    assert_eq!(
        metrics.by_label(CONNECTIONS, "backend", &[("service", NAME)]),
        kept
    );
    // The slot set before the removal is still in the maps (retired by a later resync).
    assert_entry_counts_match_the_maps(&env);
    assert_eq!(
        metrics.value(
            "mesh_service_backends",
            &[("service", NAME), ("state", "configured")]
        ),
        Some(2.0),
        "{}",
        metrics.text
    );

    // The counters live in the pinned maps: a restarted agent exports the same values.
    env.agent.restart();
    let metrics = scrape(&env);
    assert_entry_counts_match_the_maps(&env);
    assert_eq!(
        metrics.by_label(CONNECTIONS, "backend", &[("service", NAME)]),
        kept,
        "after an agent restart (SIGTERM + start) the counters must be unchanged; scrape:\n{}",
        metrics.text
    );

    // ...and keep counting from there.
    let result = env.connect(vip, 20);
    assert_no_errors("20 connects after the restart", &result);
    assert_eq!(
        scrape(&env).by_label(CONNECTIONS, "backend", &[("service", NAME)]),
        addr_labels(&addrs[..2], 110.0)
    );
    assert_eq!(
        backends
            .iter()
            .map(TcpBackend::accepted)
            .collect::<Vec<_>>(),
        [110, 110, 100]
    );
}

// ---------------------------------------------------------------------------------------------
// 2. A scrape with every kind of series, linted by promtool
// ---------------------------------------------------------------------------------------------

/// Payload bytes each data exchange sends (plus a newline) and reply body bytes it receives.
const PAYLOAD: usize = 1000;
const BODY: usize = 3000;
const EXCHANGES: usize = 40;

/// An agent with every kind of series populated: a health-checked TCP service that carried data
/// both ways (bytes and RTT telemetry), a UDP service, a service without backends that refused
/// connects, a service with a dead backend (connect failures), and one rejected config edit.
struct Busy {
    env: TestEnv,
    web: Vec<ExchangeBackend>,
    dns: UdpBackend,
    flaky: TcpBackend,
    dead: TcpBackend,
    names: BusyNames,
    /// Connects to the dead backend that the client saw refused.
    refused_by_dead: usize,
}

struct BusyNames {
    web: String,
    dns: String,
    empty: String,
    flaky: String,
}

fn busy_config(
    names: &BusyNames,
    net: u8,
    web: &[&ExchangeBackend],
    dns: &UdpBackend,
    flaky: &[SocketAddr],
) -> Vec<ServiceSpec> {
    vec![
        ServiceSpec::tcp(&names.web, format!("127.100.{net}.1:80"))
            .backends(web.iter().map(|b| b.addr()))
            .set(
                "health",
                r#"{ type = "tcp", interval = "200ms", timeout = "150ms", rise = 1, fall = 3 }"#,
            ),
        ServiceSpec::udp(&names.dns, format!("127.100.{net}.2:53")).backend(dns.addr(), 1),
        ServiceSpec::tcp(&names.empty, format!("127.100.{net}.3:80")),
        ServiceSpec::tcp(&names.flaky, format!("127.100.{net}.4:80")).backends(flaky),
    ]
}

fn busy_agent(tag: &str, net: u8) -> Busy {
    let names = BusyNames {
        web: format!("{tag}-web"),
        dns: format!("{tag}-dns"),
        empty: format!("{tag}-empty"),
        flaky: format!("{tag}-flaky"),
    };
    let web: Vec<ExchangeBackend> = (1..=2)
        .map(|i| ExchangeBackend::start(&format!("{tag}-web-{i}"), BODY))
        .collect();
    let dns = UdpBackend::start(&format!("{tag}-dns-1"));
    let flaky = TcpBackend::start(&format!("{tag}-flaky-ok"));
    let mut dead = TcpBackend::start(&format!("{tag}-flaky-dead"));
    dead.stop();
    let flaky_addrs = [flaky.addr(), dead.addr()];
    let web_refs: Vec<&ExchangeBackend> = web.iter().collect();
    let services = busy_config(&names, net, &web_refs, &dns, &flaky_addrs);
    let env = TestEnv::start(tag, &render_config(&services));

    // Until a check has passed, the all-unhealthy policy (fail-open) sends to every backend;
    // after the first one passes, only to the healthy ones. Wait until both are healthy and
    // active, so the split below is exact.
    let web_addrs: Vec<String> = web.iter().map(|b| b.addr().to_string()).collect();
    scrape_until(&env, "both web backends healthy and active", |s| {
        web_addrs.iter().all(|addr| {
            s.value("mesh_backend_health", &[("backend", addr)]) == Some(1.0)
                && s.value(
                    "mesh_backend_active",
                    &[("service", &names.web), ("backend", addr)],
                ) == Some(1.0)
        })
    });
    let web_vip: SocketAddr = format!("127.100.{net}.1:80").parse().expect("vip");
    let result = exchange_in(&env.cgroup, web_vip, EXCHANGES, PAYLOAD, CLIENT_LIMIT);
    assert_no_errors("data exchanges", &result);

    let udp = probe_udp_in(&env.cgroup, format!("127.100.{net}.2:53"), 10);
    assert!(udp.errors().is_empty(), "udp: {:?}", udp.error_counts());

    let empty = env.connect(format!("127.100.{net}.3:80"), 5);
    assert_eq!(
        empty.error_counts(),
        BTreeMap::from([("ECONNREFUSED".to_owned(), 5)]),
        "a service without backends refuses"
    );

    let flaky_result = env.connect(format!("127.100.{net}.4:80"), 10);
    let refused_by_dead = flaky_result.error_counts().values().sum::<usize>();
    assert!(
        refused_by_dead > 0,
        "some connects must reach the dead backend: {:?}",
        flaky_result.counts()
    );

    // One invalid edit (weight 0) is rejected; the valid config is written back.
    let mut invalid = services.clone();
    invalid[1].backends[0].weight = 0;
    env.agent.write_config(&render_config(&invalid));
    scrape_until(&env, "one rejected config", |s| {
        s.value("mesh_config_rejected_total", &[]) == Some(1.0)
    });
    env.agent.write_config(&render_config(&services));

    // Telemetry is counted when a connection closes: wait until every exchange is in.
    scrape_until(&env, "RTT samples of every exchange", |s| {
        s.matching("mesh_backend_rtt_seconds_count", &[("service", &names.web)])
            .iter()
            .map(|x| x.value)
            .sum::<f64>()
            == EXCHANGES as f64
    });
    Busy {
        env,
        web,
        dns,
        flaky,
        dead,
        names,
        refused_by_dead,
    }
}

#[test]
fn promtool_accepts_a_real_scrape() {
    let busy = busy_agent("obs-lint", 51);
    let env = &busy.env;
    let metrics = scrape(env);
    let text = &metrics.text;

    let lint = promtool_check_metrics(text);
    assert!(
        lint.status.success() && lint.stdout.trim().is_empty() && lint.stderr.trim().is_empty(),
        "promtool check metrics must accept the scrape without a word: {}\n--- scrape ---\n{text}",
        lint.describe()
    );

    // Every family has HELP and TYPE, and the histograms are there.
    for family in [
        "mesh_backend_rtt_seconds",
        "mesh_reconcile_duration_seconds",
        "mesh_health_check_duration_seconds",
    ] {
        assert_eq!(
            metrics.types.get(family).map(String::as_str),
            Some("histogram"),
            "{family}"
        );
    }

    // Bytes and RTT telemetry of the data exchanges, per web backend.
    let web = &busy.names.web;
    for backend in &busy.web {
        let addr = backend.addr().to_string();
        let labels = [("service", web.as_str()), ("backend", addr.as_str())];
        // Health checks connect directly (not through the VIP): only exchanges count here.
        let conns = backend.answered() as f64;
        assert_eq!(conns, (EXCHANGES / 2) as f64, "{backend:?}");
        assert_eq!(metrics.value(CONNECTIONS, &labels), Some(conns));
        let sent = metrics
            .value("mesh_backend_sent_bytes_total", &labels)
            .expect("sent bytes exported");
        let received = metrics
            .value("mesh_backend_received_bytes_total", &labels)
            .expect("received bytes exported");
        let requests = backend.request_bytes() as f64;
        let replies = backend.reply_bytes() as f64;
        eprintln!(
            "{addr}: {conns} connections; sent_bytes {sent} for {requests} payload bytes \
             (+{} per connection); received_bytes {received} for {replies} reply bytes \
             (+{} per connection)",
            (sent - requests) / conns,
            (received - replies) / conns
        );
        assert!(sent > 0.0 && received > 0.0, "{labels:?}: {text}");
        // Payload only: the kernel program takes SYN and FIN out of the sequence-space counts.
        assert_eq!(
            sent, requests,
            "{labels:?}: sent bytes over {conns} connections"
        );
        assert_eq!(
            received, replies,
            "{labels:?}: received bytes over {conns} connections"
        );

        let count = metrics
            .value("mesh_backend_rtt_seconds_count", &labels)
            .expect("rtt count");
        let sum = metrics
            .value("mesh_backend_rtt_seconds_sum", &labels)
            .expect("rtt sum");
        assert_eq!(count, conns, "one RTT sample per closed connection");
        assert!(sum > 0.0, "{labels:?}: RTT sum {sum}");
        let buckets = metrics.matching("mesh_backend_rtt_seconds_bucket", &labels);
        let mut bounds: Vec<(f64, f64)> = buckets
            .iter()
            .map(|b| {
                let le = &b.labels["le"];
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().expect("numeric le")
                };
                (le, b.value)
            })
            .collect();
        bounds.sort_by(|a, b| a.0.total_cmp(&b.0));
        // README: bucket i holds RTTs up to 16 µs * 2^i; the last one everything above.
        let finite: Vec<f64> = bounds
            .iter()
            .map(|(le, _)| *le)
            .filter(|le| le.is_finite())
            .collect();
        let documented: Vec<f64> = (0..15).map(|i| 16e-6 * f64::from(1u32 << i)).collect();
        assert_eq!(
            finite.len(),
            documented.len(),
            "{labels:?}: buckets {bounds:?}"
        );
        for (le, want) in finite.iter().zip(&documented) {
            assert!((le - want).abs() < 1e-12, "{labels:?}: buckets {bounds:?}");
        }
        assert!(
            bounds.windows(2).all(|w| w[0].1 <= w[1].1),
            "cumulative buckets: {bounds:?}"
        );
        assert_eq!(bounds.last(), Some(&(f64::INFINITY, count)), "{bounds:?}");
    }

    // UDP datagrams, refused connects, connect failures, health, reconcile, rejections.
    let dns = &busy.names.dns;
    assert_eq!(
        metrics.value(CONNECTIONS, &[("service", dns), ("protocol", "udp")]),
        Some(busy.dns.received() as f64)
    );
    assert_eq!(
        metrics.value(
            "mesh_service_no_backend_total",
            &[("service", busy.names.empty.as_str())]
        ),
        Some(5.0)
    );
    let flaky = busy.names.flaky.as_str();
    let dead = busy.dead.addr().to_string();
    assert_eq!(
        metrics.value(
            "mesh_backend_connect_failures_total",
            &[("service", flaky), ("backend", &dead)]
        ),
        Some(busy.refused_by_dead as f64),
        "every refused connect to the dead backend is a connect failure"
    );
    assert_eq!(
        metrics.value(
            CONNECTIONS,
            &[
                ("service", flaky),
                ("backend", &busy.flaky.addr().to_string())
            ]
        ),
        Some(busy.flaky.accepted() as f64)
    );
    for backend in &busy.web {
        assert_eq!(
            metrics.value(
                "mesh_backend_health",
                &[("backend", &backend.addr().to_string())]
            ),
            Some(1.0)
        );
    }
    assert_eq!(metrics.value("mesh_config_rejected_total", &[]), Some(1.0));
    assert!(metrics.value("mesh_reconcile_duration_seconds_count", &[]) >= Some(1.0));
    assert_eq!(metrics.value("mesh_agent_ready", &[]), Some(1.0));

    // The very first scrape of a fresh agent (no traffic, no checks yet) lints clean too.
    let fresh_vip = "127.100.51.9:80";
    let backend = TcpBackend::start("lint-fresh");
    let addr = [backend.addr()];
    drop(busy);
    let env = TestEnv::start(
        "obs-lint-fresh",
        &render_config(&[tcp_service("lint-fresh", fresh_vip, &addr)]),
    );
    let text = env.agent.metrics_text();
    let lint = promtool_check_metrics(&text);
    assert!(
        lint.status.success() && lint.stdout.trim().is_empty() && lint.stderr.trim().is_empty(),
        "promtool on a fresh agent's scrape: {}\n--- scrape ---\n{text}",
        lint.describe()
    );
}

// ---------------------------------------------------------------------------------------------
// 3. A real Prometheus server
// ---------------------------------------------------------------------------------------------

#[test]
fn prometheus_server_scrapes_the_agent() {
    const NAME: &str = "obs-prom";
    let backends: Vec<TcpBackend> = (1..=3)
        .map(|i| TcpBackend::start(&format!("prom-{i}")))
        .collect();
    let addrs: Vec<SocketAddr> = backends.iter().map(TcpBackend::addr).collect();
    let vip = "127.100.52.1:80";
    let env = TestEnv::start(
        "obs-prom",
        &render_config(&[tcp_service(NAME, vip, &addrs)]),
    );
    assert_no_errors("300 connects", &env.connect(vip, 300));
    let expected: BTreeMap<String, String> = backends
        .iter()
        .map(|b| (b.addr().to_string(), b.accepted().to_string()))
        .collect();
    assert!(expected.values().all(|v| v == "100"), "{expected:?}");

    let server = PrometheusServer::start(
        "obs-prom",
        &[env.agent.metrics_addr()],
        Duration::from_secs(1),
    );
    let pid = server.pid();
    let dir = server.dir().to_path_buf();
    let query = format!("mesh_backend_connections_total{{service=\"{NAME}\"}}");
    let mut seen = BTreeMap::new();
    let mut last = String::new();
    let ok = wait_until(Duration::from_secs(60), || {
        match server.query(&query) {
            Ok(result) => {
                seen = result
                    .iter()
                    .map(|series| {
                        (
                            series["metric"]["backend"]
                                .as_str()
                                .unwrap_or("?")
                                .to_owned(),
                            series["value"][1].as_str().unwrap_or("?").to_owned(),
                        )
                    })
                    .collect();
                last = serde_json::Value::Array(result).to_string();
            }
            Err(e) => last = e,
        }
        seen == expected
    });
    assert!(
        ok,
        "Prometheus never returned the per-backend counts {expected:?} within 60 s; last \
         answer: {last}\n--- prometheus log ---\n{}",
        server.log_text()
    );
    let series = server.query(&query).expect("query");
    for s in &series {
        assert_eq!(s["metric"]["job"], "mesh", "{s}");
        assert_eq!(s["metric"]["protocol"], "tcp", "{s}");
        assert_eq!(
            s["metric"]["instance"],
            env.agent.metrics_addr().to_string(),
            "{s}"
        );
    }
    let up = server.query("up{job=\"mesh\"}").expect("query up");
    assert_eq!(up.len(), 1, "{up:?}");
    assert_eq!(up[0]["value"][1], "1", "the scrape target is up: {up:?}");
    // A PromQL rate over the counters works too (the dashboard's kind of query).
    // A rate needs two scrapes of the series; the counters no longer move, so it is 0.
    let rate_query = format!("sum(rate(mesh_backend_connections_total{{service=\"{NAME}\"}}[1m]))");
    let mut rate = Vec::new();
    let ok = wait_until(Duration::from_secs(20), || {
        rate = server.query(&rate_query).expect("rate query");
        !rate.is_empty()
    });
    assert!(ok, "{rate_query} returned nothing within 20 s");
    assert_eq!(rate[0]["value"][1], "0", "{rate:?}");

    drop(server);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "prometheus (pid {pid}) must be gone"
    );
    assert!(!dir.exists(), "{} must be removed", dir.display());
}

// ---------------------------------------------------------------------------------------------
// 4. bpftool
// ---------------------------------------------------------------------------------------------

/// The programs and the cgroup attach type each is attached with.
const PROGRAMS: [(&str, &str); 10] = [
    ("connect4", "cgroup_inet4_connect"),
    ("connect6", "cgroup_inet6_connect"),
    ("sendmsg4", "cgroup_udp4_sendmsg"),
    ("sendmsg6", "cgroup_udp6_sendmsg"),
    ("recvmsg4", "cgroup_udp4_recvmsg"),
    ("recvmsg6", "cgroup_udp6_recvmsg"),
    ("getpeername4", "cgroup_inet4_getpeername"),
    ("getpeername6", "cgroup_inet6_getpeername"),
    ("getsockopt", "cgroup_getsockopt"),
    ("sock_release", "cgroup_inet_sock_release"),
];

fn u64_list(value: &serde_json::Value) -> Vec<u64> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("expected a list of numbers, got {value}"))
        .iter()
        .map(|v| v.as_u64().unwrap_or_else(|| panic!("not a number: {v}")))
        .collect()
}

/// `ip` (16 bytes, network order), `port` and `family` fields as a socket address.
fn sockaddr_of(value: &serde_json::Value) -> SocketAddr {
    let ip = u64_list(&value["ip"]);
    let bytes: Vec<u8> = ip
        .iter()
        .map(|b| u8::try_from(*b).expect("a byte"))
        .collect();
    let port = u16::try_from(value["port"].as_u64().expect("port")).expect("u16 port");
    match value["family"].as_u64() {
        Some(4) => SocketAddr::from(([bytes[0], bytes[1], bytes[2], bytes[3]], port)),
        Some(6) => SocketAddr::from((<[u8; 16]>::try_from(bytes).expect("16 bytes"), port)),
        other => panic!("family {other:?} in {value}"),
    }
}

#[test]
fn bpftool_dumps_are_structured_json() {
    let web: Vec<TcpBackend> = (1..=2)
        .map(|i| TcpBackend::start(&format!("bpf-web-{i}")))
        .collect();
    let dns = UdpBackend::start("bpf-dns-1");
    let web_addrs: Vec<SocketAddr> = web.iter().map(TcpBackend::addr).collect();
    let web_vip: SocketAddr = "127.100.53.1:8080".parse().expect("vip");
    let dns_vip: SocketAddr = "127.100.53.2:53".parse().expect("vip");
    let env = TestEnv::start(
        "obs-bpftool",
        &render_config(&[
            tcp_service("bpf-web", web_vip, &web_addrs),
            ServiceSpec::udp("bpf-dns", dns_vip).backend(dns.addr(), 1),
        ]),
    );
    // `bpftool map dump pinned <bpffs>/v3/maps/<name> -j`
    // service_names: id -> name (UTF-8, zero padded).
    let names: BTreeMap<u64, String> = formatted_entries(&map_dump(&env.bpffs, "service_names"))
        .iter()
        .map(|e| {
            let id = e["key"].as_u64().unwrap_or_else(|| panic!("id key in {e}"));
            let name = match &e["value"]["name"] {
                serde_json::Value::String(s) => s.trim_end_matches('\0').to_owned(),
                bytes => {
                    let bytes: Vec<u8> = u64_list(bytes)
                        .into_iter()
                        .take_while(|b| *b != 0)
                        .map(|b| u8::try_from(b).expect("a byte"))
                        .collect();
                    String::from_utf8(bytes).expect("UTF-8 name")
                }
            };
            (id, name)
        })
        .collect();
    assert_eq!(
        names.values().cloned().collect::<BTreeSet<_>>(),
        BTreeSet::from(["bpf-web".to_owned(), "bpf-dns".to_owned()]),
        "{names:?}"
    );

    // services: the VIPs, by named key fields, pointing at the named services.
    let services = formatted_entries(&map_dump(&env.bpffs, "services"));
    let mut vips = BTreeMap::new();
    for entry in &services {
        let key = &entry["key"];
        for field in ["ip", "port", "proto", "family"] {
            assert!(
                key.get(field).is_some(),
                "services key has no `{field}`: {entry}"
            );
        }
        let vip = sockaddr_of(key);
        let id = entry["value"]["id"].as_u64().expect("value.id");
        assert!(entry["value"]["slot_count"].as_u64().is_some(), "{entry}");
        vips.insert(
            (vip, key["proto"].as_u64().expect("proto")),
            names.get(&id).cloned().unwrap_or_default(),
        );
    }
    assert_eq!(
        vips,
        BTreeMap::from([
            ((web_vip, 6), "bpf-web".to_owned()),
            ((dns_vip, 17), "bpf-dns".to_owned()),
        ]),
        "services map: {services:#?}"
    );
    let web_key = services
        .iter()
        .map(|e| &e["key"])
        .find(|k| sockaddr_of(k) == web_vip)
        .expect("web VIP");
    assert_eq!(
        u64_list(&web_key["ip"]),
        [127, 100, 53, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        "ip: 16 bytes, network order"
    );
    assert_eq!(web_key["port"], 8080, "port in host order");
    assert_eq!(web_key["family"], 4);

    // The map capacities of a config without `[agent.limits]`: the README's defaults, as the
    // kernel reports them.
    for (map, capacity) in [
        ("services", 131_072),
        ("backends", 262_144),
        ("backend_stats", 524_288),
        ("active", 524_288),
        ("passive", 524_288),
        ("slots", 1_048_576),
        ("affinity", 65_536),
        ("udp_flows", 65_536),
        ("tcp_peers", 65_536),
    ] {
        assert_eq!(
            map_max_entries(&env.bpffs, map),
            capacity,
            "max_entries of {map}"
        );
    }

    // backends: the configured addresses.
    let backends: BTreeSet<SocketAddr> = formatted_entries(&map_dump(&env.bpffs, "backends"))
        .iter()
        .map(|e| sockaddr_of(&e["value"]))
        .collect();
    let mut configured: BTreeSet<SocketAddr> = web_addrs.iter().copied().collect();
    configured.insert(dns.addr());
    assert_eq!(backends, configured);

    // The programs attached to the test cgroup, by name and attach type...
    let attached = bpftool_json([
        std::ffi::OsStr::new("cgroup"),
        "show".as_ref(),
        env.cgroup.path().as_os_str(),
    ]);
    let attached: BTreeMap<String, (String, u64)> = attached
        .as_array()
        .unwrap_or_else(|| panic!("cgroup show: {attached}"))
        .iter()
        .map(|p| {
            (
                p["name"].as_str().expect("name").to_owned(),
                (
                    p["attach_type"].as_str().expect("attach_type").to_owned(),
                    p["id"].as_u64().expect("id"),
                ),
            )
        })
        .collect();
    let want: BTreeMap<String, String> = PROGRAMS
        .iter()
        .map(|(n, t)| ((*n).to_owned(), (*t).to_owned()))
        .collect();
    let have: BTreeMap<String, String> = attached
        .iter()
        .map(|(n, (t, _))| (n.clone(), t.clone()))
        .collect();
    assert_eq!(
        have,
        want,
        "bpftool cgroup show {}",
        env.cgroup.path().display()
    );

    // ...are listed by `bpftool prog show` under the same ids and names.
    let progs = bpftool_json(["prog", "show"]);
    let by_id: BTreeMap<u64, &serde_json::Value> = progs
        .as_array()
        .expect("prog show is a list")
        .iter()
        .map(|p| (p["id"].as_u64().expect("id"), p))
        .collect();
    for (name, (_, id)) in &attached {
        let prog = by_id
            .get(id)
            .unwrap_or_else(|| panic!("prog {id} ({name}) not in `bpftool prog show`"));
        assert_eq!(prog["name"], name.as_str(), "{prog}");
    }
}

// ---------------------------------------------------------------------------------------------
// 5. The CLI views
// ---------------------------------------------------------------------------------------------

#[test]
fn cli_views_match_the_config() {
    let web: Vec<TcpBackend> = (1..=3)
        .map(|i| TcpBackend::start(&format!("cli-web-{i}")))
        .collect();
    let dns: Vec<UdpBackend> = (1..=2)
        .map(|i| UdpBackend::start(&format!("cli-dns-{i}")))
        .collect();
    let web_vip = "127.100.54.1:80";
    let dns_vip = "127.100.54.2:53";
    // Weights 1,2,3 give slots 1,2,3; weights 2,4 are reduced by their gcd to 1,2.
    let web_weights = [1, 2, 3];
    let dns_weights = [2, 4];
    let config = [
        web.iter()
            .zip(web_weights)
            .fold(ServiceSpec::tcp("cli-web", web_vip), |s, (b, w)| {
                s.backend(b.addr(), w)
            }),
        dns.iter()
            .zip(dns_weights)
            .fold(ServiceSpec::udp("cli-dns", dns_vip), |s, (b, w)| {
                s.backend(b.addr(), w)
            }),
    ];
    let env = TestEnv::start("obs-cli", &render_config(&config));
    let bpffs = env.bpffs.path().to_str().expect("utf-8 path").to_owned();
    assert_no_errors("web", &env.connect(web_vip, 60));
    let udp = probe_udp_in(&env.cgroup, dns_vip, 30);
    assert!(udp.errors().is_empty(), "{:?}", udp.error_counts());

    // `mesh services -o json`: names, VIPs, protocols, backends and slots as configured.
    let doc = mesh_cli_json(["services", "--bpffs", &bpffs, "-o", "json"]);
    let mut seen = BTreeMap::new();
    for svc in doc["services"].as_array().expect("services list") {
        let backends: BTreeMap<String, (u64, u64)> = svc["backends"]
            .as_array()
            .expect("backends list")
            .iter()
            .map(|b| {
                (
                    b["addr"].as_str().expect("addr").to_owned(),
                    (
                        b["slots"].as_u64().expect("slots"),
                        b["connections"].as_u64().expect("connections"),
                    ),
                )
            })
            .collect();
        seen.insert(
            (
                svc["name"].as_str().expect("name").to_owned(),
                svc["vip"].as_str().expect("vip").to_owned(),
                svc["protocol"].as_str().expect("protocol").to_owned(),
            ),
            (svc["slot_count"].as_u64().expect("slot_count"), backends),
        );
    }
    let expect_web: BTreeMap<String, (u64, u64)> = web
        .iter()
        .zip([1, 2, 3])
        .map(|(b, slots)| (b.addr().to_string(), (slots, b.accepted() as u64)))
        .collect();
    let expect_dns: BTreeMap<String, (u64, u64)> = dns
        .iter()
        .zip([1, 2])
        .map(|(b, slots)| (b.addr().to_string(), (slots, b.received() as u64)))
        .collect();
    assert_eq!(
        seen,
        BTreeMap::from([
            (
                ("cli-web".into(), web_vip.into(), "tcp".into()),
                (6, expect_web.clone())
            ),
            (
                ("cli-dns".into(), dns_vip.into(), "udp".into()),
                (3, expect_dns.clone())
            ),
        ]),
        "mesh services -o json: {doc:#}"
    );
    assert_eq!(
        web.iter().map(TcpBackend::accepted).collect::<Vec<_>>(),
        [10, 20, 30]
    );

    // `mesh backends -o json` (all, and one service).
    let doc = mesh_cli_json(["backends", "--bpffs", &bpffs, "-o", "json"]);
    let rows = doc["backends"].as_array().expect("backends list");
    assert_eq!(rows.len(), 5, "{doc:#}");
    for row in rows {
        let addr = row["addr"].as_str().expect("addr");
        let (service, want) = if row["service"] == "cli-web" {
            ("cli-web", expect_web.get(addr))
        } else {
            ("cli-dns", expect_dns.get(addr))
        };
        let (slots, connections) = want.unwrap_or_else(|| panic!("unexpected row {row}"));
        assert_eq!(row["slots"], *slots, "{service}: {row}");
        assert_eq!(row["connections"], *connections, "{service}: {row}");
        assert_eq!(row["state"], "active", "{row}");
        assert_eq!(row["connect_failures"], 0, "{row}");
    }
    let doc = mesh_cli_json(["backends", "cli-web", "--bpffs", &bpffs, "-o", "json"]);
    let rows = doc["backends"].as_array().expect("backends list");
    assert_eq!(rows.len(), 3, "{doc:#}");
    assert!(rows.iter().all(|r| r["service"] == "cli-web"), "{doc:#}");
    let unknown = mesh_cli(["backends", "no-such-service", "--bpffs", &bpffs]);
    assert!(!unknown.status.success(), "{}", unknown.describe());

    // `mesh stats -o json --interval 200ms` while a client connects in the background.
    let stop_dir = std::env::temp_dir().join(format!("{}-stop", env.cgroup.name()));
    std::fs::create_dir_all(&stop_dir).expect("create the stop-file directory");
    let stop_file = stop_dir.join("stop");
    let client = spawn_probe_in(
        &env.cgroup,
        [
            "connect-until",
            "--addr",
            web_vip,
            "--stop-file",
            stop_file.to_str().expect("utf-8 path"),
            "--max-ms",
            "20000",
        ],
    );
    // The client is running once the counters move.
    assert!(
        wait_until(POLL_LIMIT, || {
            web.iter().map(TcpBackend::accepted).sum::<usize>() > 100
        }),
        "the background client made no connections"
    );
    let stats = mesh_cli_json([
        "stats",
        "--bpffs",
        &bpffs,
        "-o",
        "json",
        "--interval",
        "200ms",
    ]);
    let top = run_in_pty(
        &[
            integration_tests::mesh_bin().to_str().expect("utf-8 path"),
            "top",
            "--bpffs",
            &bpffs,
            "--iterations",
            "2",
            "--interval",
            "200ms",
        ],
        Duration::from_secs(20),
    );
    std::fs::write(&stop_file, b"").expect("write the stop file");
    let summary = client.wait(Duration::from_secs(30));
    let _ = std::fs::remove_dir_all(&stop_dir);
    eprintln!("background client: {}", summary.stdout.trim());

    let interval = stats["interval_secs"].as_f64().expect("interval_secs");
    assert!((0.15..2.0).contains(&interval), "interval_secs {interval}");
    let svc = stats["services"]
        .as_array()
        .expect("services list")
        .iter()
        .find(|s| s["name"] == "cli-web")
        .unwrap_or_else(|| panic!("no cli-web in mesh stats: {stats:#}"));
    let rows = svc["backends"].as_array().expect("backends list");
    assert_eq!(rows.len(), 3, "{svc:#}");
    for row in rows {
        assert!(
            row["connections"].as_u64().expect("connections") >= 10,
            "{row}"
        );
        assert!(
            row["connections_per_sec"]
                .as_f64()
                .expect("connections_per_sec")
                > 0.0,
            "a backend under load has a rate: {row}"
        );
    }
    let dns_stats = stats["services"]
        .as_array()
        .expect("services list")
        .iter()
        .find(|s| s["name"] == "cli-dns")
        .unwrap_or_else(|| panic!("no cli-dns in mesh stats: {stats:#}"));
    let dns_total: u64 = dns_stats["backends"]
        .as_array()
        .expect("backends list")
        .iter()
        .map(|b| b["connections"].as_u64().expect("connections"))
        .sum();
    assert_eq!(dns_total, 30, "{dns_stats:#}");

    // Once the client stopped, the counters equal what the backends accepted.
    let doc = mesh_cli_json(["services", "--bpffs", &bpffs, "-o", "json"]);
    let web_doc = doc["services"]
        .as_array()
        .expect("services")
        .iter()
        .find(|s| s["name"] == "cli-web")
        .expect("cli-web");
    for b in &web {
        let row = web_doc["backends"]
            .as_array()
            .expect("backends")
            .iter()
            .find(|r| r["addr"] == b.addr().to_string().as_str())
            .expect("backend row");
        assert_eq!(row["connections"], b.accepted() as u64, "{row}");
    }

    // `mesh top` on a terminal: the service, its backends and a conn/s header.
    assert!(top.status.success(), "mesh top: {}", top.describe());
    let screen = strip_ansi(&top.stdout);
    let last_frame = screen.rsplit("mesh top - ").next().unwrap_or_default();
    assert!(screen.contains("mesh top - "), "no frame header:\n{screen}");
    assert!(
        last_frame.contains("conn/s"),
        "no conn/s in the header:\n{screen}"
    );
    assert!(last_frame.contains("CONN/S"), "no CONN/S column:\n{screen}");
    for name in ["cli-web", "cli-dns"] {
        assert!(last_frame.contains(name), "{name} missing from:\n{screen}");
    }
    for addr in web
        .iter()
        .map(TcpBackend::addr)
        .chain(dns.iter().map(UdpBackend::addr))
    {
        assert!(
            last_frame.contains(&addr.to_string()),
            "{addr} missing from:\n{screen}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 6. The Grafana dashboard
// ---------------------------------------------------------------------------------------------

fn dashboard() -> (String, serde_json::Value) {
    let path = workspace_root().join("deploy/grafana-dashboard.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let json = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    (text, json)
}

/// Every `mesh_[a-z_]+` word of `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("mesh_") {
        let start = i + at;
        let boundary = start == 0 || {
            let c = bytes[start - 1];
            !(c.is_ascii_alphanumeric() || c == b'_')
        };
        let mut end = start + "mesh_".len();
        while end < bytes.len() && (bytes[end].is_ascii_lowercase() || bytes[end] == b'_') {
            end += 1;
        }
        if boundary && end > start + "mesh_".len() {
            names.insert(text[start..end].to_owned());
        }
        i = end;
    }
    names
}

/// Every `expr` of every panel target (rows' nested panels included).
fn panel_exprs(dashboard: &serde_json::Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack: Vec<&serde_json::Value> = dashboard["panels"]
        .as_array()
        .expect("panels list")
        .iter()
        .collect();
    while let Some(panel) = stack.pop() {
        if let Some(nested) = panel["panels"].as_array() {
            stack.extend(nested);
        }
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                out.push((
                    panel["title"].as_str().unwrap_or("?").to_owned(),
                    expr.to_owned(),
                ));
            }
        }
    }
    out
}

#[test]
fn dashboard_uses_only_exported_metric_names() {
    let (text, json) = dashboard();
    let names = metric_names(&text);
    assert!(names.len() >= 10, "the dashboard uses {names:?}");
    // README: "a Grafana dashboard (schema 39)".
    assert_eq!(json["schemaVersion"], 39, "schemaVersion");
    let variables = json["templating"]["list"]
        .as_array()
        .expect("templating.list");
    assert!(
        variables
            .iter()
            .any(|v| v["type"] == "datasource" && v["query"] == "prometheus"),
        "a Prometheus datasource variable: {variables:#?}"
    );

    // Every expression is valid PromQL (Grafana's variables replaced by plain values).
    let exprs = panel_exprs(&json);
    assert!(exprs.len() >= 10, "{exprs:#?}");
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (_, expr)) in exprs.iter().enumerate() {
        let expr = expr
            .replace("$__rate_interval", "1m")
            .replace("$__interval", "1m")
            .replace("$__range", "1h")
            .replace("$service", ".*")
            .replace("$instance", ".*");
        rules.push_str(&format!(
            "      - record: dashboard:expr_{i}\n        expr: {}\n",
            serde_json::to_string(&expr).expect("a JSON string is a YAML string")
        ));
    }
    let dir = std::env::temp_dir().join(format!("mesh-test-dashboard-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let rules_path = dir.join("rules.yml");
    std::fs::write(&rules_path, &rules).expect("write rules");
    let check = promtool(&["check", "rules", rules_path.to_str().expect("utf-8 path")]);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        check.status.success(),
        "the dashboard's expressions must be valid PromQL: {}\n{rules}",
        check.describe()
    );

    // Every metric name is one a real agent exports.
    let busy = busy_agent("obs-dash", 55);
    let metrics = scrape(&busy.env);
    let missing: Vec<&String> = names
        .iter()
        .filter(|name| {
            !metrics.exports(name)
                && !["_bucket", "_sum", "_count"].iter().any(|suffix| {
                    name.strip_suffix(suffix)
                        .is_some_and(|base| metrics.exports(base))
                })
        })
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard uses metrics the agent does not export: {missing:?}\n--- scrape ---\n{}",
        metrics.text
    );
}

#[test]
fn metric_names_are_extracted_as_words() {
    assert_eq!(
        metric_names(r#"rate(mesh_backend_connections_total{x="mesh_"}[1m]) xmesh_no mesh_a_b"#),
        BTreeSet::from([
            "mesh_backend_connections_total".to_owned(),
            "mesh_a_b".to_owned()
        ])
    );
}
