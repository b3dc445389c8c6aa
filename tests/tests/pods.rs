//! Pods: clients in network namespaces and cgroups of their own, as on a Kubernetes node. mesh
//! must do for them everything it does for processes in the host's namespace: balance their
//! connects, show them the VIP, keep session affinity per pod, and terminate a pod's connected
//! UDP sockets when their backend leaves.
//!
//! # The topology each test builds (all of it made by the test and removed afterwards)
//!
//! ```text
//!   pod-a netns: eth0 198.18.1.2/24 ---veth--- veth-pod-a 198.18.1.1/24 \
//!                                                                        node netns, lo:
//!   pod-b netns: eth0 198.18.2.2/24 ---veth--- veth-pod-b 198.18.2.1/24 /  198.18.0.11-13/32
//!                                                                          (the backends)
//! ```
//!
//! - A pod's loopback is its own: 127.0.0.1 inside pod-a is neither the host's nor pod-b's, so a
//!   backend on the host's 127.0.0.1 is unreachable from a pod, and a backend on the pod's own
//!   127.0.0.1 would be a different server in every pod (not a shared service). On a node a pod
//!   reaches its backends (other pods) by their addresses, through its veth. Here a "node"
//!   namespace stands in for the rest of the cluster: the backends listen on addresses it owns
//!   (198.18.0.0/15 is the benchmarking range of RFC 2544, used on no real network), and each
//!   pod routes 198.18.0.0/24 through its veth. The node namespace has no default route and
//!   forwards nothing (the backends are local to it), so every packet stays inside namespaces
//!   the test made.
//! - The VIPs are 127.100.7x.y. A pod's connect()/sendmsg() to one is rewritten by mesh's
//!   programs before any routing: they are attached to the test cgroup, and each pod runs in a
//!   child cgroup of it (cgroup programs apply to descendants). The socket ends up talking to a
//!   backend address reachable from the pod, from the pod's own address. A datagram or connect
//!   that is not rewritten stays on the pod's loopback and reaches the decoy that listens on the
//!   VIP inside the pod: a missing translation shows as a `decoy-*` reply, not as a timeout.
//! - The agent runs in the host namespace, attached to the test cgroup. It never sends anything
//!   to the backends (no health checks are configured), so no traffic to 198.18.0.0/15 ever
//!   starts in the host namespace.
//!
//! Privileged: run as root through `cargo xtask test`. Each test has its own VIPs, cgroups,
//! namespaces and bpffs directory; guards remove them (and kill what runs in them) also on panic.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::thread::JoinHandle;
use std::time::Duration;

use integration_tests::maps::map_len;
use integration_tests::probe::move_into_cgroup_at_spawn;
use integration_tests::probe::{assert_no_errors, expect_counts};
use integration_tests::process::{Captured, RunError, run_bounded};
use integration_tests::{
    CgroupGuard, NetNs, ORIGINAL_DST_ON, ProbeResult, ProbeServer, ProbeSummary, ServerKind,
    ServiceSpec, TestEnv, probe_bin, render_config, service_status, wait_for_backends, wait_until,
};

/// Time bound of one probe run.
const PROBE_LIMIT: Duration = Duration::from_secs(60);
/// How long we poll for an applied config.
const POLL_LIMIT: Duration = Duration::from_secs(5);
/// Backends per service.
const BACKENDS: u8 = 3;

fn sock(addr: &str) -> SocketAddr {
    addr.parse()
        .unwrap_or_else(|e| panic!("{addr:?} is not IP:PORT: {e}"))
}

/// The address of backend `i` (1-based) in the node namespace.
fn backend_addr(i: u8, port: u16) -> SocketAddr {
    SocketAddr::from(([198, 18, 0, 10 + i], port))
}

/// The node namespace: what pods reach through their veth. Its loopback owns the backend
/// addresses 198.18.0.11..=13.
struct Node {
    ns: NetNs,
}

impl Node {
    fn new(tag: &str) -> Node {
        let ns = NetNs::new(tag);
        for i in 1..=BACKENDS {
            ns.add_lo_addr(&format!("{}/32", backend_addr(i, 0).ip()));
        }
        Node { ns }
    }

    /// `BACKENDS` backends `<prefix>-1..` on 198.18.0.11.. port `port`, inside the node.
    fn backends(&self, kind: ServerKind, prefix: &str, port: u16) -> Vec<ProbeServer> {
        (1..=BACKENDS)
            .map(|i| {
                let name = format!("{prefix}-{i}");
                ProbeServer::start(Some(&self.ns), kind, &name, backend_addr(i, port))
            })
            .collect()
    }
}

/// A pod: a network namespace wired to the node by a veth pair, and a cgroup of its own, a
/// child of the test cgroup the agent attaches to. Decoys listen on the VIPs inside it.
struct Pod {
    decoys: Vec<ProbeServer>,
    cgroup: CgroupGuard,
    ns: NetNs,
}

impl Pod {
    /// Pod number `index` (1, 2, ...) with address 198.18.<index>.2.
    fn new(node: &Node, env: &TestEnv, tag: &str, index: u8) -> Pod {
        let ns = NetNs::new(tag);
        let node_side = format!("veth-{tag}");
        node.ns.add_veth(&node_side, &ns, "eth0");
        let gateway = format!("198.18.{index}.1");
        node.ns
            .ip(&["addr", "add", &format!("{gateway}/24"), "dev", &node_side]);
        node.ns.ip(&["link", "set", &node_side, "up"]);
        ns.ip(&[
            "addr",
            "add",
            &format!("198.18.{index}.2/24"),
            "dev",
            "eth0",
        ]);
        ns.ip(&["link", "set", "eth0", "up"]);
        ns.ip(&["route", "add", "198.18.0.0/24", "via", &gateway]);
        let cgroup = env.cgroup.child(tag);
        Pod {
            decoys: Vec::new(),
            cgroup,
            ns,
        }
    }

    fn name(&self) -> &str {
        self.ns.name()
    }

    /// A decoy of `kind` on `vip` inside the pod: it answers only what is not translated.
    fn with_decoy(mut self, kind: ServerKind, vip: &str) -> Pod {
        let name = format!("decoy-{}", self.decoys.len() + 1);
        let decoy = ProbeServer::start(Some(&self.ns), kind, &name, sock(vip));
        self.decoys.push(decoy);
        self
    }

    /// `mesh-probe <args>` inside the pod (its namespace and its cgroup).
    fn probe(&self, args: &[String]) -> ProbeResult {
        self.ns.run_probe_in(&self.cgroup, args, PROBE_LIMIT)
    }

    /// `mesh-probe <mode> --addr <addr> --count <count> --summary` inside the pod.
    fn summary(&self, mode: &str, addr: impl Display, count: usize) -> ProbeSummary {
        let args = [
            mode.to_owned(),
            "--addr".into(),
            addr.to_string(),
            "--count".into(),
            count.to_string(),
            "--summary".into(),
        ];
        self.ns.probe_summary_in(&self.cgroup, &args, PROBE_LIMIT)
    }
}

/// Each of `backends` answered exactly `each` times.
fn even_split(backends: &[ProbeServer], each: u64) -> BTreeMap<String, u64> {
    let pairs: Vec<(&str, u64)> = backends.iter().map(|b| (b.name(), each)).collect();
    expect_counts(&pairs)
}

/// The `peer`, `original_dst` and `reply` lines of `mesh-probe peer`.
#[derive(Debug)]
struct PeerReport {
    peer: String,
    original_dst: String,
    reply: String,
}

fn peer(pod: &Pod, vip: &str, proto: &str) -> PeerReport {
    let args = ["peer", "--addr", vip, "--proto", proto].map(str::to_owned);
    let out = pod.probe(&args);
    let field = |key: &str| {
        out.stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key} ")))
            .unwrap_or_else(|| panic!("mesh-probe peer printed no `{key}` line:\n{}", out.stdout))
            .to_owned()
    };
    PeerReport {
        peer: field("peer"),
        original_dst: field("original_dst"),
        reply: field("reply"),
    }
}

// ---------------------------------------------------------------------------------------------
// Round-robin
// ---------------------------------------------------------------------------------------------

#[test]
fn pod_clients_are_balanced_round_robin_over_tcp_and_udp() {
    let tcp_vip = "127.100.70.1:80";
    let udp_vip = "127.100.70.1:53";
    let node = Node::new("rr-node");
    let web = node.backends(ServerKind::Tcp, "web", 8080);
    let dns = node.backends(ServerKind::Udp, "dns", 5353);
    let env = TestEnv::start(
        "pods-rr",
        &format!(
            "{ORIGINAL_DST_ON}{}",
            render_config(&[
                ServiceSpec::tcp("pod-web", tcp_vip).backends(web.iter().map(ProbeServer::addr)),
                ServiceSpec::udp("pod-dns", udp_vip).backends(dns.iter().map(ProbeServer::addr)),
            ])
        ),
    );
    let pods = [
        Pod::new(&node, &env, "pod-a", 1),
        Pod::new(&node, &env, "pod-b", 2),
    ]
    .map(|pod| {
        pod.with_decoy(ServerKind::Tcp, tcp_vip)
            .with_decoy(ServerKind::Udp, udp_vip)
    });

    // One pod after the other: each run of 30 consecutive picks walks the three slots ten
    // times, wherever the service's round-robin position stood.
    for pod in &pods {
        let tcp = pod.summary("connect", tcp_vip, 30);
        eprintln!("{} tcp: {tcp:?}", pod.name());
        assert_no_errors("tcp", &tcp);
        assert_eq!(tcp.replies, even_split(&web, 10), "{} tcp", pod.name());

        // One unconnected socket for all datagrams, then a new connected socket per datagram.
        for mode in ["udp", "udp-connected"] {
            let udp = pod.summary(mode, udp_vip, 30);
            eprintln!("{} {mode}: {udp:?}", pod.name());
            assert_no_errors(mode, &udp);
            assert_eq!(udp.replies, even_split(&dns, 10), "{} {mode}", pod.name());
            assert_eq!(
                udp.sources,
                expect_counts(&[(udp_vip, 30)]),
                "{} {mode}: every reply appears to come from the VIP",
                pod.name()
            );
        }
    }
    // The kernel counted the pods' connects per backend like anyone else's.
    let web_status = service_status(&env.bpffs, "pod-web");
    assert!(
        web_status.backends.iter().all(|b| b.connections == 20),
        "`mesh services` connections per backend: {web_status:#?}"
    );

    for pod in &pods {
        let tcp = peer(pod, tcp_vip, "tcp");
        eprintln!("{} tcp peer: {tcp:?}", pod.name());
        assert_eq!(tcp.peer, tcp_vip, "getpeername() of a pod's TCP socket");
        assert_eq!(
            tcp.original_dst, tcp_vip,
            "SO_ORIGINAL_DST of a pod's TCP socket"
        );
        assert!(
            web.iter().any(|b| b.name() == tcp.reply),
            "a backend answered: {tcp:?}"
        );

        let udp = peer(pod, udp_vip, "udp");
        eprintln!("{} udp peer: {udp:?}", pod.name());
        assert_eq!(
            udp.peer, udp_vip,
            "getpeername() of a pod's connected UDP socket"
        );
        assert!(
            dns.iter()
                .any(|b| udp.reply == format!("{} from {udp_vip}", b.name())),
            "a backend answered, shown as the VIP: {udp:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Session affinity
// ---------------------------------------------------------------------------------------------

#[test]
fn session_affinity_is_per_pod() {
    let sticky_vip = "127.100.71.1:80";
    let plain_vip = "127.100.71.2:80";
    let node = Node::new("aff-node");
    let web = node.backends(ServerKind::Tcp, "web", 8080);
    let addrs = || web.iter().map(ProbeServer::addr);
    let env = TestEnv::start(
        "pods-aff",
        &render_config(&[
            ServiceSpec::tcp("sticky", sticky_vip)
                .set("affinity", "{ timeout = \"30s\" }")
                .backends(addrs()),
            ServiceSpec::tcp("plain", plain_vip).backends(addrs()),
        ]),
    );
    let pods = [
        Pod::new(&node, &env, "pod-a", 1),
        Pod::new(&node, &env, "pod-b", 2),
    ]
    .map(|pod| {
        pod.with_decoy(ServerKind::Tcp, sticky_vip)
            .with_decoy(ServerKind::Tcp, plain_vip)
    });

    // Each pod's first connect takes the next round-robin pick, so the two pods start on
    // different backends; every later connect of the pod, from any of its processes, stays
    // there. The pods take turns, so a shared pin would show.
    let mut pinned: Vec<String> = Vec::new();
    for round in 0..3 {
        for (i, pod) in pods.iter().enumerate() {
            let run = pod.summary("connect", sticky_vip, 20);
            eprintln!("round {round}, {} sticky: {run:?}", pod.name());
            assert_no_errors("sticky", &run);
            assert_eq!(
                run.replies.len(),
                1,
                "{} sticks to one backend: {run:?}",
                pod.name()
            );
            let backend = run.replies.keys().next().expect("a reply").clone();
            assert!(
                web.iter().any(|b| b.name() == backend),
                "{} reached a backend: {run:?}",
                pod.name()
            );
            if round == 0 {
                pinned.push(backend);
            } else {
                assert_eq!(
                    run.replies,
                    expect_counts(&[(pinned[i].as_str(), 20)]),
                    "{} stays on its backend",
                    pod.name()
                );
            }
        }
    }
    assert_ne!(
        pinned[0], pinned[1],
        "the pods are different clients, each with its own backend"
    );

    // Without affinity the same pods are spread evenly.
    for pod in &pods {
        let spread = pod.summary("connect", plain_vip, 30);
        eprintln!("{} plain: {spread:?}", pod.name());
        assert_no_errors("plain", &spread);
        assert_eq!(spread.replies, even_split(&web, 10), "{} plain", pod.name());
    }
}

// ---------------------------------------------------------------------------------------------
// Connected UDP termination
// ---------------------------------------------------------------------------------------------

/// Sockets through the VIP per pod: two per backend.
const HELD: usize = 2 * BACKENDS as usize;

/// `mesh-udp-hold` running in a pod: `HELD` connected UDP sockets through the VIP, one
/// connected straight to a backend and one unconnected, each after one exchange.
struct UdpHold {
    pod: String,
    dir: PathBuf,
    stop: PathBuf,
    run: Option<JoinHandle<Result<Captured, RunError>>>,
}

/// One socket of a [`UdpHold`]: how it fared after the change.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Held {
    /// `vip`, `direct` or `unconnected`.
    kind: String,
    /// The backend that answered its first exchange.
    first: String,
    /// `ok <reply>` or `err <ERRNO>` for the second exchange.
    outcome: String,
}

impl UdpHold {
    fn start(pod: &Pod, vip: &str, direct: SocketAddr) -> UdpHold {
        let dir = std::env::temp_dir().join(format!("{}-hold", pod.name()));
        std::fs::create_dir_all(&dir).unwrap();
        let ready = dir.join("ready");
        let stop = dir.join("stop");
        let mut cmd: Command = pod.ns.command(probe_bin().with_file_name("mesh-udp-hold"));
        cmd.args(["--vip", vip, "--direct", &direct.to_string()])
            // Unbound (the pod's own address), not 127.0.0.1: the backends are off-loopback.
            .args(["--bind", "0.0.0.0", "--count", &HELD.to_string()])
            .args(["--max-ms", "30000"])
            .arg("--ready-file")
            .arg(&ready)
            .arg("--stop-file")
            .arg(&stop);
        move_into_cgroup_at_spawn(&mut cmd, &pod.cgroup);
        let run = std::thread::spawn(move || run_bounded(&mut cmd, Duration::from_secs(40)));
        let mut hold = UdpHold {
            pod: pod.name().to_owned(),
            dir,
            stop,
            run: Some(run),
        };
        let got_ready = wait_until(Duration::from_secs(10), || ready.exists());
        if !got_ready {
            let out = hold.finish_raw();
            panic!("mesh-udp-hold in {} never got ready: {out}", hold.pod);
        }
        hold
    }

    /// Tells it to exchange again; returns (bounded) what it printed.
    fn finish_raw(&mut self) -> String {
        std::fs::write(&self.stop, "").unwrap();
        match self.run.take().map(|h| h.join()) {
            Some(Ok(Ok(out))) if out.status.success() => out.stdout,
            Some(Ok(Ok(out))) => panic!("mesh-udp-hold in {} failed: {}", self.pod, out.describe()),
            Some(Ok(Err(e))) => panic!("mesh-udp-hold in {}: {e}", self.pod),
            Some(Err(_)) => panic!("mesh-udp-hold runner thread panicked"),
            None => String::new(),
        }
    }

    fn finish(mut self) -> Vec<Held> {
        let stdout = self.finish_raw();
        stdout
            .lines()
            .map(|line| {
                // `<kind> <index> <first reply> <ok <reply> | err <ERRNO>>`
                let f: Vec<&str> = line.split_whitespace().collect();
                assert!(f.len() >= 5, "mesh-udp-hold line {line:?}");
                Held {
                    kind: f[0].to_owned(),
                    first: f[2].to_owned(),
                    outcome: f[3..].join(" "),
                }
            })
            .collect()
    }
}

impl Drop for UdpHold {
    fn drop(&mut self) {
        // Lets a still running hold exit at once (it is also killed with its pod).
        let _ = std::fs::write(&self.stop, "");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// first backend -> outcomes of the sockets connected through the VIP.
fn vip_outcomes(rows: &[Held]) -> BTreeMap<String, Vec<String>> {
    let mut by_backend: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for row in rows.iter().filter(|r| r.kind == "vip") {
        by_backend
            .entry(row.first.clone())
            .or_default()
            .push(row.outcome.clone());
    }
    by_backend
}

#[test]
fn a_pods_connected_udp_socket_is_terminated_when_its_backend_leaves() {
    let vip = "127.100.72.1:53";
    let node = Node::new("term-node");
    let dns = node.backends(ServerKind::Udp, "dns", 5353);
    let (leaving, staying) = (&dns[0], &dns[1..]);
    let config = |members: &[ProbeServer]| {
        render_config(&[
            ServiceSpec::udp("pod-dns", vip).backends(members.iter().map(ProbeServer::addr))
        ])
    };
    let env = TestEnv::start("pods-term", &config(&dns));
    let pods = [
        Pod::new(&node, &env, "pod-a", 1),
        Pod::new(&node, &env, "pod-b", 2),
    ]
    .map(|pod| pod.with_decoy(ServerKind::Udp, vip));

    // One pod after the other, so each holds two sockets on every backend.
    let holds: Vec<UdpHold> = pods
        .iter()
        .map(|pod| UdpHold::start(pod, vip, staying[0].addr()))
        .collect();
    let flows = map_len(&env.bpffs, "udp_flows");
    assert_eq!(
        flows,
        2 * HELD,
        "the kernel tracks every connected socket of both pods"
    );

    // `leaving` leaves the service; it keeps running, so a socket that is not terminated
    // goes on talking to it.
    env.agent.write_config(&config(staying));
    let addrs: Vec<SocketAddr> = staying.iter().map(ProbeServer::addr).collect();
    wait_for_backends(&env.bpffs, "pod-dns", &addrs, POLL_LIMIT);
    let terminated = "mesh_udp_flows_terminated_total 4";
    // The termination follows the map writes in the same reconcile step; no assertion here,
    // the sockets below say what happened.
    wait_until(POLL_LIMIT, || {
        env.agent.metrics_text().lines().any(|l| l == terminated)
    });

    for (pod, hold) in pods.iter().zip(holds) {
        let rows = hold.finish();
        eprintln!("{} after {} left: {rows:?}", pod.name(), leaving.name());
        let vip_sockets = vip_outcomes(&rows);
        assert_eq!(
            vip_sockets.get(leaving.name()),
            Some(&vec!["err ECONNABORTED".to_owned(); 2]),
            "{}: the sockets on the backend that left are terminated: {vip_sockets:?}",
            pod.name()
        );
        for kept in staying {
            assert_eq!(
                vip_sockets.get(kept.name()),
                Some(&vec![format!("ok {}", kept.name()); 2]),
                "{}: the sockets on {} keep working: {vip_sockets:?}",
                pod.name(),
                kept.name()
            );
        }
        // A socket connected straight to a backend, and an unconnected one, are never touched.
        for kind in ["direct", "unconnected"] {
            let row = rows.iter().find(|r| r.kind == kind).expect("row");
            assert!(
                row.outcome.starts_with("ok"),
                "{}: {kind} socket untouched: {row:?}",
                pod.name()
            );
        }
    }
    let said: Vec<String> = env
        .agent
        .log_text()
        .lines()
        .filter(|l| l.contains("connected UDP"))
        .map(str::to_owned)
        .collect();
    eprintln!("agent: {said:#?}");
    let metrics = env.agent.metrics_text();
    assert!(
        metrics.lines().any(|l| l == terminated),
        "the metric counts the four terminations:\n{}",
        metrics
            .lines()
            .filter(|l| l.contains("terminated"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
