//! The Kubernetes source end to end: real kube-rs watchers in the agent against the test API
//! server (`integration_tests::kube_api`, proven with kubectl, the Python client and kube-rs in
//! `kube_api.rs`), real programs, real backends on 127.0.0.0/8 and real clients in the test's
//! cgroup. Tests are named after the Kubernetes e2e Service tests they mirror where there is one.
//!
//! Addresses: cluster IPs in 127.96.0.0/16, node addresses 127.10.0.x, external and load
//! balancer IPs 127.20/127.30.0.x, endpoints ("pods") 127.0.<n>.<m>:8080 — all loopback, so
//! every connection stays on this machine.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use integration_tests::agent::Agent;
use integration_tests::kube_api::KubeApi;
use integration_tests::probe::{probe_connect_in, probe_udp_in};
use integration_tests::{
    BpffsDir, CgroupGuard, TcpBackend, TempDir, UdpBackend, assert_split, services,
};
use serde_json::{Value, json};

/// A watch event must be in the data path within this long (the issue's bound), measured from
/// the write to the test API server until `mesh services` shows it.
const EVENT_TO_DATAPATH: Duration = Duration::from_millis(100);
/// Polling limit, longer than the bound so a slow apply reports its real duration.
const POLL: Duration = Duration::from_secs(5);

fn node(name: &str, ip: &str, zone: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node",
           "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}},
           "status": {"addresses": [{"type": "InternalIP", "address": ip},
                                    {"type": "Hostname", "address": name}]}})
}

fn service(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": "default"}, "spec": spec})
}

/// One endpoint: (address, ready, serving, terminating, node).
type Ep<'a> = (&'a str, bool, bool, bool, &'a str);

fn slice(service: &str, name: &str, ports: Value, endpoints: &[Ep<'_>]) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(ip, ready, serving, terminating, node)| {
            json!({"addresses": [ip], "nodeName": node,
                   "conditions": {"ready": ready, "serving": serving, "terminating": terminating}})
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": name, "namespace": "default",
                        "labels": {"kubernetes.io/service-name": service}},
           "addressType": "IPv4", "ports": ports, "endpoints": endpoints})
}

fn http_ports() -> Value {
    json!([{"name": "http", "port": 8080, "protocol": "TCP"}])
}

fn ready<'a>(ip: &'a str, node: &'a str) -> Ep<'a> {
    (ip, true, true, false, node)
}

/// Service `name` on `cluster_ip`:80 with one slice "s" of one ready endpoint on node-a.
fn one_endpoint_service(api: &KubeApi, name: &str, cluster_ip: &str, endpoint: &str) {
    api.apply(service(
        name,
        json!({"clusterIP": cluster_ip, "ports": [{"name": "http", "port": 80}]}),
    ));
    api.apply(slice(name, "s", http_ports(), &[ready(endpoint, "node-a")]));
}

fn backend(name: &str, ip: &str) -> TcpBackend {
    TcpBackend::start_on(name, format!("{ip}:8080").parse().unwrap())
}

/// An agent of one simulated node: its own cgroup, pins and node name.
struct Node {
    agent: Agent,
    bpffs: BpffsDir,
    cgroup: CgroupGuard,
    _state: TempDir,
    _kube: TempDir,
}

impl Node {
    fn start(tag: &str, api: &KubeApi, node_name: &str) -> Node {
        let mut node = Node::spawn(tag, api, node_name);
        node.agent.wait_ready(POLL * 4);
        node
    }

    /// The agent started, not waited for.
    fn spawn(tag: &str, api: &KubeApi, node_name: &str) -> Node {
        let cgroup = CgroupGuard::new(tag);
        let bpffs = BpffsDir::new(tag);
        // In a directory of its own, removed with the node.
        let kube = TempDir::new(&format!("{tag}-kube"));
        let kubeconfig = kube.path().join("kubeconfig");
        api.kubeconfig(&kubeconfig).expect("write the kubeconfig");
        // Each agent keeps its own last Kubernetes set (never another test's).
        let state = TempDir::new(&format!("{tag}-state"));
        let config = format!(
            "[agent]\nresync = \"1s\"\nstate_dir = \"{}\"\n\n[agent.kubernetes]\nkubeconfig = \"{}\"\nnode_name = \"{node_name}\"\n",
            state.path().display(),
            kubeconfig.display()
        );
        let agent = Agent::spawn(&config, &cgroup, &bpffs, &[], &[]);
        Node {
            agent,
            bpffs,
            cgroup,
            _state: state,
            _kube: kube,
        }
    }

    fn connect(
        &self,
        addr: impl std::fmt::Display,
        count: usize,
    ) -> integration_tests::ProbeResult {
        probe_connect_in(&self.cgroup, addr, count)
    }

    /// Waits until service `name` has exactly `addrs` as backends; how long that took.
    fn wait_for(&self, name: &str, addrs: &[SocketAddr]) -> Duration {
        integration_tests::wait_for_backends(&self.bpffs, name, addrs, POLL)
    }

    fn has_service(&self, name: &str) -> bool {
        services(&self.bpffs).service(name).is_some()
    }
}

fn addrs(backends: &[&TcpBackend]) -> Vec<SocketAddr> {
    backends.iter().map(|b| b.addr()).collect()
}

#[track_caller]
fn assert_fast(what: &str, took: Duration) {
    println!("{what}: in the data path {took:?} after the event");
    assert!(
        took <= EVENT_TO_DATAPATH,
        "{what}: took {took:?}, more than {EVENT_TO_DATAPATH:?}"
    );
}

fn web_service(extra: Value) -> Value {
    let mut spec = json!({"type": "NodePort", "clusterIP": "127.96.0.10", "clusterIPs": ["127.96.0.10"],
                          "ports": [{"name": "http", "port": 80, "protocol": "TCP",
                                     "targetPort": "http", "nodePort": 30080}]});
    spec.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    service("web", spec)
}

#[test]
fn cluster_ip_and_node_ports_reach_ready_endpoints_and_follow_changes() {
    let api = KubeApi::start();
    api.apply(node("node-a", "127.10.0.1", "zone-1"));
    let a = backend("k8s-a", "127.0.11.1");
    let b = backend("k8s-b", "127.0.11.2");
    let c = backend("k8s-c", "127.0.11.3");
    api.apply(web_service(json!({})));
    api.apply(slice(
        "web",
        "web-1",
        http_ports(),
        &[ready("127.0.11.1", "node-a"), ready("127.0.11.2", "node-b")],
    ));
    let node = Node::start("k8s-basic", &api, "node-a");
    node.wait_for("default/web:http", &addrs(&[&a, &b]));

    // The cluster IP, the NodePort on the node's address and on 127.0.0.1: exact round-robin.
    for vip in ["127.96.0.10:80", "127.10.0.1:30080", "127.0.0.1:30080"] {
        assert_split(&node.connect(vip, 60), &[(&a, 30), (&b, 30)]);
    }

    // A new ready endpoint in a second slice (a named port that maps to the same number).
    let started = Instant::now();
    api.apply(slice(
        "web",
        "web-2",
        http_ports(),
        &[ready("127.0.11.3", "node-c")],
    ));
    let took = started.elapsed() + node.wait_for("default/web:http", &addrs(&[&a, &b, &c]));
    assert_fast("endpoint added", took);
    assert_split(
        &node.connect("127.96.0.10:80", 90),
        &[(&a, 30), (&b, 30), (&c, 30)],
    );

    // It turns unready: it leaves at once and gets no new connection.
    let started = Instant::now();
    api.apply(slice(
        "web",
        "web-2",
        http_ports(),
        &[("127.0.11.3", false, false, false, "node-c")],
    ));
    let took = started.elapsed() + node.wait_for("default/web:http", &addrs(&[&a, &b]));
    assert_fast("endpoint unready", took);
    let before = c.accepted();
    assert_split(&node.connect("127.96.0.10:80", 40), &[(&a, 20), (&b, 20)]);
    assert_eq!(c.accepted(), before);

    // The Service goes: the VIP is an ordinary address again (nothing listens there).
    let started = Instant::now();
    api.delete("Service", "default", "web");
    assert!(integration_tests::wait_until(POLL, || !node.has_service("default/web:http")));
    assert_fast("service deleted", started.elapsed());
}

#[test]
fn should_be_rejected_when_no_endpoints_exist() {
    let api = KubeApi::start();
    api.apply(node("node-a", "127.10.0.1", "zone-1"));
    api.apply(service(
        "empty",
        json!({"clusterIP": "127.96.0.20", "ports": [{"name": "http", "port": 80}]}),
    ));
    let node = Node::start("k8s-empty", &api, "node-a");
    node.wait_for("default/empty:http", &[]);
    let started = Instant::now();
    let result = node.connect("127.96.0.20:80", 20);
    let took = started.elapsed();
    assert_eq!(
        result.error_counts().get("ECONNREFUSED"),
        Some(&20),
        "{result:?}"
    );
    // Refused at once, never a timeout (20 connects, one process).
    assert!(
        took < Duration::from_secs(2),
        "20 refused connects took {took:?}"
    );
}

#[test]
fn session_affinity_works_times_out_and_can_be_switched() {
    let api = KubeApi::start();
    api.apply(node("node-a", "127.10.0.1", "zone-1"));
    let a = backend("aff-a", "127.0.12.1");
    let b = backend("aff-b", "127.0.12.2");
    let affinity = |secs: i64| {
        service(
            "sticky",
            json!({"clusterIP": "127.96.0.30", "sessionAffinity": "ClientIP",
                   "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": secs}},
                   "ports": [{"name": "http", "port": 80}]}),
        )
    };
    api.apply(affinity(2));
    api.apply(slice(
        "sticky",
        "s",
        http_ports(),
        &[ready("127.0.12.1", "node-a"), ready("127.0.12.2", "node-a")],
    ));
    let node = Node::start("k8s-aff", &api, "node-a");
    node.wait_for("default/sticky:http", &addrs(&[&a, &b]));

    // Works: one client (this cgroup, this netns) sticks to one backend.
    let first = node.connect("127.96.0.30:80", 50);
    assert!(first.errors().is_empty(), "{first:?}");
    assert_eq!(
        first.counts().len(),
        1,
        "one backend for one client: {:?}",
        first.counts()
    );
    let stuck = first.counts().into_keys().next().unwrap();

    // Times out: after 2 s without a connect the next one is a fresh round-robin pick, so two
    // spaced-out rounds land on both backends within a few tries.
    let mut seen = std::collections::BTreeSet::from([stuck.clone()]);
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(2_200));
        let again = node.connect("127.96.0.30:80", 1);
        seen.extend(again.counts().into_keys());
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(seen.len(), 2, "the affinity never timed out: {seen:?}");

    // Can be switched off: plain round-robin again.
    api.apply(service(
        "sticky",
        json!({"clusterIP": "127.96.0.30", "sessionAffinity": "None",
               "ports": [{"name": "http", "port": 80}]}),
    ));
    assert!(integration_tests::wait_until(POLL, || {
        let r = node.connect("127.96.0.30:80", 10);
        r.counts().len() == 2
    }));
    assert_split(&node.connect("127.96.0.30:80", 40), &[(&a, 20), (&b, 20)]);
}

#[test]
fn service_proxy_name_and_headless_labels_are_honoured() {
    let api = KubeApi::start();
    api.apply(node("node-a", "127.10.0.1", "zone-1"));
    let a = backend("lbl-a", "127.0.13.1");
    let labelled = |name: &str, ip: &str, labels: Value| {
        let mut svc = service(
            name,
            json!({"clusterIP": ip, "ports": [{"name": "http", "port": 80}]}),
        );
        svc["metadata"]["labels"] = labels;
        svc
    };
    api.apply(labelled("plain", "127.96.0.40", json!({})));
    api.apply(labelled(
        "other-proxy",
        "127.96.0.41",
        json!({"service.kubernetes.io/service-proxy-name": "someone-else"}),
    ));
    api.apply(labelled(
        "headless-label",
        "127.96.0.42",
        json!({"service.kubernetes.io/headless": ""}),
    ));
    api.apply(service(
        "headless",
        json!({"clusterIP": "None", "ports": [{"name": "http", "port": 80}]}),
    ));
    for svc in ["plain", "other-proxy", "headless-label", "headless"] {
        api.apply(slice(
            svc,
            svc,
            http_ports(),
            &[ready("127.0.13.1", "node-a")],
        ));
    }
    let node = Node::start("k8s-labels", &api, "node-a");
    node.wait_for("default/plain:http", &addrs(&[&a]));
    assert_split(&node.connect("127.96.0.40:80", 10), &[(&a, 10)]);
    let names: Vec<String> = services(&node.bpffs)
        .services
        .iter()
        .map(|s| s.name.clone())
        .collect();
    assert_eq!(names, ["default/plain:http"], "only the unlabelled Service");
    // The others' VIPs are not rewritten: nothing listens there.
    let other = node.connect("127.96.0.41:80", 3);
    assert_eq!(
        other.error_counts().get("ECONNREFUSED"),
        Some(&3),
        "{other:?}"
    );
    // What the translation leaves out is counted (the labelled ones never reach the agent:
    // the watch's label selector filters them at the API server, as kube-proxy's does).
    let metrics = node.agent.metrics_text();
    let skipped = "mesh_registry_source_skipped{reason=\"headless (clusterIP None)\",source=\"kubernetes\"} 1";
    assert!(
        metrics.lines().any(|l| l == skipped),
        "{skipped} missing:\n{}",
        metrics
            .lines()
            .filter(|l| l.contains("skipped"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn a_fresh_node_turns_ready_only_once_the_cluster_services_are_in_the_maps() {
    let mut api = KubeApi::start();
    api.apply(node("node-a", "127.10.0.1", "zone-1"));
    let a = backend("fresh-a", "127.0.18.1");
    one_endpoint_service(&api, "fresh", "127.96.0.90", "127.0.18.1");
    // A new node whose API server does not answer yet: it has no saved set to serve.
    api.stop();
    let mut node = Node::spawn("k8s-fresh", &api, "node-a");
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut answered = 0;
    while Instant::now() < deadline {
        if let Ok(response) = node.agent.http_get("/readyz") {
            answered += 1;
            assert_ne!(response.status, 200, "ready without the cluster's Services");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(answered > 0, "/readyz never answered");
    api.restart().expect("restart the API server");
    node.agent.wait_ready(POLL * 4);
    // Ready means the Services are in the maps: no connect in between is refused.
    assert_split(&node.connect("127.96.0.90:80", 10), &[(&a, 10)]);
}

#[test]
fn same_port_different_protocols_and_multiple_ports_in_multiple_slices() {
    let api = KubeApi::start();
    api.apply(node("node-a", "127.10.0.1", "zone-1"));
    let tcp_a = TcpBackend::start_on("proto-tcp-a", "127.0.14.1:5353".parse().unwrap());
    let tcp_b = TcpBackend::start_on("proto-tcp-b", "127.0.14.2:6363".parse().unwrap());
    let udp_a = UdpBackend::start_on("proto-udp-a", "127.0.14.1:5353".parse().unwrap());
    let udp_b = UdpBackend::start_on("proto-udp-b", "127.0.14.2:6363".parse().unwrap());
    api.apply(service(
        "dns",
        json!({"clusterIP": "127.96.0.53", "ports": [
            {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": "dns"},
            {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": "dns-tcp"}]}),
    ));
    // Two slices whose named ports map to different numbers (pods of two versions).
    let ports = |n: u16| {
        json!([{"name": "dns", "port": n, "protocol": "UDP"},
               {"name": "dns-tcp", "port": n, "protocol": "TCP"}])
    };
    api.apply(slice(
        "dns",
        "dns-1",
        ports(5353),
        &[ready("127.0.14.1", "node-a")],
    ));
    api.apply(slice(
        "dns",
        "dns-2",
        ports(6363),
        &[ready("127.0.14.2", "node-a")],
    ));
    let node = Node::start("k8s-proto", &api, "node-a");
    node.wait_for("default/dns:dns-tcp", &[tcp_a.addr(), tcp_b.addr()]);
    node.wait_for("default/dns:dns", &[udp_a.addr(), udp_b.addr()]);
    assert_split(
        &node.connect("127.96.0.53:53", 40),
        &[(&tcp_a, 20), (&tcp_b, 20)],
    );
    let udp = probe_udp_in(&node.cgroup, "127.96.0.53:53", 40);
    assert!(udp.errors().is_empty(), "{udp:?}");
    assert_eq!(
        udp.counts(),
        [
            ("proto-udp-a".to_owned(), 20),
            ("proto-udp-b".to_owned(), 20)
        ]
        .into(),
        "UDP split"
    );
}

#[test]
fn terminating_endpoints_serve_only_when_no_ready_endpoint_exists() {
    let api = KubeApi::start();
    api.apply(node("node-a", "127.10.0.1", "zone-1"));
    let a = backend("term-a", "127.0.15.1");
    let t = backend("term-t", "127.0.15.2");
    api.apply(service(
        "rolling",
        json!({"clusterIP": "127.96.0.60", "ports": [{"name": "http", "port": 80}]}),
    ));
    let terminating = ("127.0.15.2", false, true, true, "node-a");
    api.apply(slice(
        "rolling",
        "r",
        http_ports(),
        &[ready("127.0.15.1", "node-a"), terminating],
    ));
    let node = Node::start("k8s-term", &api, "node-a");
    node.wait_for("default/rolling:http", &addrs(&[&a, &t]));
    // Ready wins: the terminating endpoint gets nothing new (it is a draining member).
    assert_split(&node.connect("127.96.0.60:80", 20), &[(&a, 20)]);
    // The last ready endpoint goes: the serving-terminating one takes over (KEP-1669).
    let started = Instant::now();
    api.apply(slice("rolling", "r", http_ports(), &[terminating]));
    assert!(integration_tests::wait_until(POLL, || {
        node.connect("127.96.0.60:80", 1)
            .counts()
            .contains_key("term-t")
    }));
    println!(
        "fallback to the terminating endpoint after {:?}",
        started.elapsed()
    );
    assert_split(&node.connect("127.96.0.60:80", 20), &[(&t, 20)]);
    // Not serving any more either: refused.
    api.apply(slice(
        "rolling",
        "r",
        http_ports(),
        &[("127.0.15.2", false, false, true, "node-a")],
    ));
    // Still terminating, so still a (draining) member: its established connections go on, it
    // takes no new ones.
    assert!(integration_tests::wait_until(POLL, || {
        services(&node.bpffs)
            .service("default/rolling:http")
            .is_some_and(|s| s.slot_count == 0)
    }));
    let refused = node.connect("127.96.0.60:80", 5);
    assert_eq!(
        refused.error_counts().get("ECONNREFUSED"),
        Some(&5),
        "{refused:?}"
    );
}

#[test]
fn two_nodes_get_their_own_endpoints_with_local_policy_and_zone_hints() {
    let api = KubeApi::start();
    api.apply(node("node-a", "127.10.0.1", "zone-1"));
    api.apply(node("node-b", "127.10.0.2", "zone-2"));
    let on_a = backend("two-a", "127.0.16.1");
    let on_b = backend("two-b", "127.0.16.2");
    api.apply(service(
        "local",
        json!({"clusterIP": "127.96.0.70", "internalTrafficPolicy": "Local",
               "ports": [{"name": "http", "port": 80}]}),
    ));
    api.apply(slice(
        "local",
        "l",
        http_ports(),
        &[ready("127.0.16.1", "node-a"), ready("127.0.16.2", "node-b")],
    ));
    api.apply(service(
        "zoned",
        json!({"clusterIP": "127.96.0.71", "trafficDistribution": "PreferSameZone",
               "ports": [{"name": "http", "port": 80}]}),
    ));
    let mut zoned = slice(
        "zoned",
        "z",
        http_ports(),
        &[ready("127.0.16.1", "node-a"), ready("127.0.16.2", "node-b")],
    );
    zoned["endpoints"][0]["hints"] = json!({"forZones": [{"name": "zone-1"}]});
    zoned["endpoints"][1]["hints"] = json!({"forZones": [{"name": "zone-2"}]});
    api.apply(zoned);
    let a = Node::start("k8s-node-a", &api, "node-a");
    let b = Node::start("k8s-node-b", &api, "node-b");
    for (node, own) in [(&a, &on_a), (&b, &on_b)] {
        node.wait_for("default/local:http", &[own.addr()]);
        node.wait_for("default/zoned:http", &[own.addr()]);
        assert_split(&node.connect("127.96.0.70:80", 10), &[(own, 10)]);
        assert_split(&node.connect("127.96.0.71:80", 10), &[(own, 10)]);
    }
    // node-b's endpoint goes: Local refuses on node-b, zone hints no longer match node-b's
    // zone so it falls back to every endpoint there; node-a keeps its own.
    api.apply(slice(
        "local",
        "l",
        http_ports(),
        &[ready("127.0.16.1", "node-a")],
    ));
    let mut zoned = slice("zoned", "z", http_ports(), &[ready("127.0.16.1", "node-a")]);
    zoned["endpoints"][0]["hints"] = json!({"forZones": [{"name": "zone-1"}]});
    api.apply(zoned);
    b.wait_for("default/local:http", &[]);
    b.wait_for("default/zoned:http", &[on_a.addr()]);
    let refused = b.connect("127.96.0.70:80", 3);
    assert_eq!(
        refused.error_counts().get("ECONNREFUSED"),
        Some(&3),
        "{refused:?}"
    );
    assert_split(&b.connect("127.96.0.71:80", 5), &[(&on_a, 5)]);
    assert_split(&a.connect("127.96.0.70:80", 5), &[(&on_a, 5)]);
}

#[test]
fn works_after_restarting_the_agent_and_keeps_serving_through_an_api_server_outage() {
    let mut api = KubeApi::start();
    api.apply(node("node-a", "127.10.0.1", "zone-1"));
    let a = backend("out-a", "127.0.17.1");
    let b = backend("out-b", "127.0.17.2");
    one_endpoint_service(&api, "steady", "127.96.0.80", "127.0.17.1");
    let mut node = Node::start("k8s-outage", &api, "node-a");
    node.wait_for("default/steady:http", &addrs(&[&a]));

    // The agent dies (kill -9): the data path keeps serving.
    node.agent.kill9();
    assert_split(&node.connect("127.96.0.80:80", 10), &[(&a, 10)]);

    // The API server goes away too, and the agent starts again: its first apply carries the
    // last Kubernetes set it saved, so the VIP never leaves the maps (no gap at /readyz).
    api.stop();
    let mark = node.agent.log_mark();
    node.agent.restart();
    assert_split(&node.connect("127.96.0.80:80", 10), &[(&a, 10)]);
    assert!(
        node.agent
            .log_since(mark)
            .contains("the last known services stay in force"),
        "{}",
        node.agent.log_since(mark)
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_split(&node.connect("127.96.0.80:80", 10), &[(&a, 10)]);
    let up = node
        .agent
        .metrics_text()
        .lines()
        .any(|l| l == "mesh_registry_source_up{source=\"kubernetes\"} 0");
    assert!(up, "the kubernetes source should show as down");

    // Changes made meanwhile, with the watch history compacted away (410 on resume): the
    // watcher relists and applies them once the server is back.
    api.apply(slice(
        "steady",
        "s",
        http_ports(),
        &[ready("127.0.17.1", "node-a"), ready("127.0.17.2", "node-a")],
    ));
    api.compact();
    api.restart().expect("restart the API server");
    let took = node.wait_for("default/steady:http", &addrs(&[&a, &b]));
    println!("relisted and applied {took:?} after the API server came back");
    assert_split(&node.connect("127.96.0.80:80", 20), &[(&a, 10), (&b, 10)]);

    // An outage during which nothing changes: the source shows down, and up again once the
    // server answers, though the relist brings no change.
    let source_up = |node: &Node, value: u8| {
        let line = format!("mesh_registry_source_up{{source=\"kubernetes\"}} {value}");
        integration_tests::wait_until(Duration::from_secs(10), || {
            node.agent.metrics_text().lines().any(|l| l == line)
        })
    };
    api.stop();
    assert!(
        source_up(&node, 0),
        "the kubernetes source should show as down"
    );
    api.restart().expect("restart the API server");
    assert!(
        source_up(&node, 1),
        "the kubernetes source should show as up again after an unchanged relist"
    );
    assert_split(&node.connect("127.96.0.80:80", 20), &[(&a, 10), (&b, 10)]);
}
