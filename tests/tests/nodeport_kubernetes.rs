//! Traffic from other hosts driven by the Kubernetes source, end to end: the client host, two
//! nodes and three pods of `integration_tests::two_nodes`, the test Kubernetes API server, and
//! one agent on node A that learns a `type: LoadBalancer` Service from it (NodePort on node A's
//! InternalIP, an ExternalIP, LoadBalancer ingress IPs) and balances the client's connections
//! with its TC programs. The watch delivers every later change: `externalTrafficPolicy`
//! Cluster -> Local, a new LoadBalancer IP, the Service's deletion.
//!
//! The API server runs inside node A's network namespace (its thread, and the runtime threads
//! it starts, are created there), on node A's loopback where the agent's kubeconfig points.
//! Node B runs no agent: it only hosts b1, which Cluster traffic reaches through node A (SNAT).

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use integration_tests::kube_api::KubeApi;
use integration_tests::probe::ProbeResult;
use integration_tests::two_nodes::{
    CLIENT, NODE_A, NODE_B, POD_A1, POD_A2, POD_B1, PodBackend, TCP_PORT, Topology, UDP_PORT,
    build_topology, counts, metric, tcp, udp,
};
use integration_tests::{Agent, BpffsDir, CgroupGuard, TempDir, wait_until};
use serde_json::{Value, json};

/// The ExternalIP, and the LoadBalancer ingress IPs: outside the client's subnet, so node A
/// holds no route to them and its own stack answers "network unreachable" for any it does not
/// balance (an on-link address would make node A send the client an ICMP redirect instead).
/// The client routes all of 10.78.0.0/24 to node A, as a router in front of the nodes would.
const EXTERNAL_IP: &str = "10.78.0.100";
const LB_IP: &str = "10.78.0.10";
/// The LoadBalancer IP the status changes to.
const LB_IP_NEW: &str = "10.78.0.11";
/// An ingress IP with `ipMode: Proxy`: the load balancer proxies, nodes must not capture it.
const LB_IP_PROXY: &str = "10.78.0.20";
const NODE_PORT_TCP: u16 = 30080;
const NODE_PORT_UDP: u16 = 30053;
const HC_PORT: u16 = 32100;
/// How long a change may take from the API server to the maps before the test gives up.
const APPLY: Duration = Duration::from_secs(10);

fn node(name: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
           "status": {"addresses": [{"type": "InternalIP", "address": ip},
                                    {"type": "Hostname", "address": name}]}})
}

/// Service `web`: TCP 80 -> 8080 and UDP 53 -> 5353, with NodePorts, the ExternalIP and the
/// given LoadBalancer IP (plus the Proxy one) in its status.
fn web(policy: &str, lb_ip: &str) -> Value {
    let mut spec = json!({
        "type": "LoadBalancer", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
        "externalIPs": [EXTERNAL_IP], "externalTrafficPolicy": policy,
        "ports": [
            {"name": "http", "port": 80, "protocol": "TCP", "targetPort": TCP_PORT,
             "nodePort": NODE_PORT_TCP},
            {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": UDP_PORT,
             "nodePort": NODE_PORT_UDP}]});
    if policy == "Local" {
        // The API server allocates it only for Local.
        spec["healthCheckNodePort"] = json!(HC_PORT);
    }
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": "web", "namespace": "default"}, "spec": spec,
           "status": {"loadBalancer": {"ingress": [
               {"ip": lb_ip, "ipMode": "VIP"},
               {"ip": LB_IP_PROXY, "ipMode": "Proxy"}]}}})
}

fn endpoints() -> Value {
    let endpoint = |ip: &str, node: &str| {
        json!({"addresses": [ip], "nodeName": node,
               "conditions": {"ready": true, "serving": true, "terminating": false}})
    };
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": "web-1", "namespace": "default",
                        "labels": {"kubernetes.io/service-name": "web"}},
           "addressType": "IPv4",
           "ports": [{"name": "http", "port": TCP_PORT, "protocol": "TCP"},
                     {"name": "dns", "port": UDP_PORT, "protocol": "UDP"}],
           "endpoints": [endpoint(POD_A1, "node-a"), endpoint(POD_A2, "node-a"),
                         endpoint(POD_B1, "node-b")]})
}

/// Node A's agent: the Kubernetes source and the TC programs on the device that holds node
/// A's address (found on its own), with short flow timeouts so the flows drain in the test.
fn agent_config(kubeconfig: &std::path::Path, state: &std::path::Path) -> String {
    format!(
        r#"
[agent]
resync = "1s"
state_dir = "{}"
[agent.limits]
max_external_flows = 4096
[agent.nodeport]
enabled = true
udp_timeout = "2s"
tcp_closing_timeout = "2s"
tcp_timeout = "60s"
[agent.kubernetes]
kubeconfig = "{}"
node_name = "node-a"
"#,
        state.display(),
        kubeconfig.display()
    )
}

/// Slots of the external service (the TC programs' one) of port `port_name` at `vip`; `None`
/// when there is no such service.
fn ext_slots(agent: &Agent, port_name: &str, vip: &str, protocol: &str) -> Option<u64> {
    metric(
        agent,
        &format!(
            "mesh_service_slots{{service=\"default/web:{port_name}@ext/{vip}\",vip=\"{vip}\",protocol=\"{protocol}\"}}"
        ),
    )
}

/// Entries of the flow table (two per flow).
fn nat_flows(agent: &Agent) -> Option<u64> {
    metric(agent, "mesh_map_entries{map=\"nat_flows\"}")
}

/// External services of `web` in the agent's metrics.
fn ext_services(agent: &Agent) -> Vec<String> {
    agent
        .metrics_text()
        .lines()
        .filter(|l| {
            l.starts_with("mesh_service_slots{service=\"default/web:") && l.contains("@ext/")
        })
        .map(str::to_owned)
        .collect()
}

/// The addresses the client dials for TCP (port 80 or the NodePort) and for UDP.
fn tcp_addrs(lb_ip: &str) -> [String; 3] {
    [
        format!("{NODE_A}:{NODE_PORT_TCP}"),
        format!("{EXTERNAL_IP}:80"),
        format!("{lb_ip}:80"),
    ]
}

fn udp_addrs(lb_ip: &str) -> [String; 3] {
    [
        format!("{NODE_A}:{NODE_PORT_UDP}"),
        format!("{EXTERNAL_IP}:53"),
        format!("{lb_ip}:53"),
    ]
}

/// GET /healthz on node A's healthCheckNodePort from the client host.
fn health(topo: &Topology) -> std::io::Result<integration_tests::http::Response> {
    let addr: SocketAddr = format!("{NODE_A}:{HC_PORT}").parse().unwrap();
    topo.client
        .run_in(|| integration_tests::http::get_here(addr, "/healthz", Duration::from_secs(5)))
}

#[track_caller]
fn assert_errors(r: &ProbeResult, want: &[(&str, usize)]) {
    assert_eq!(r.error_counts(), counts(want), "{}", r.stdout);
    assert!(r.counts().is_empty(), "{}", r.stdout);
}

/// Packets node A's own stack found no route for (`IpExt InNoRoutes`, counted before ICMP
/// rate limits apply).
fn node_a_no_routes(topo: &Topology) -> u64 {
    // /proc/thread-self: /proc/self/net is the namespace of the process's main thread.
    let text = topo
        .node_a
        .run_in(|| std::fs::read_to_string("/proc/thread-self/net/netstat").expect("read netstat"));
    let mut lines = text.lines().filter(|l| l.starts_with("IpExt:"));
    let (names, values) = (lines.next().unwrap(), lines.next().unwrap());
    let at = names
        .split_whitespace()
        .position(|n| n == "InNoRoutes")
        .expect("InNoRoutes in IpExt");
    values.split_whitespace().nth(at).unwrap().parse().unwrap()
}

/// `count` connects to `addr` that mesh does not balance: the TC programs pass the SYNs on
/// untouched, and node A's stack, with no route to the address, drops them and answers
/// "network unreachable". Its ICMP answers are rate limited per client (here a burst of two
/// or three, then about one per second), so a connect may time out instead.
#[track_caller]
fn assert_left_to_node_a(topo: &Topology, addr: &str, count: usize) {
    let before = node_a_no_routes(topo);
    let r = tcp(topo, addr, count);
    assert!(r.counts().is_empty(), "{addr}: {}", r.stdout);
    let errors = r.errors();
    assert_eq!(errors.len(), count, "{addr}: {}", r.stdout);
    assert!(
        errors
            .iter()
            .all(|e| e == "ENETUNREACH" || e == "ETIMEDOUT"),
        "{addr}: {}",
        r.stdout
    );
    let dropped = node_a_no_routes(topo) - before;
    assert!(
        dropped >= count as u64,
        "{addr}: node A's stack saw {dropped} packets without route for {count} connects"
    );
}

#[track_caller]
fn assert_nobody_saw_anything(backends: &[PodBackend]) {
    for b in backends {
        assert!(b.take_peers().is_empty());
    }
}

#[test]
fn load_balancer_service_from_kubernetes_serves_other_hosts() {
    let topo = build_topology();
    topo.client
        .ip(&["route", "add", "10.78.0.0/24", "via", NODE_A]);
    let backends = [
        PodBackend::start(&topo.pods[0], "a1", POD_A1),
        PodBackend::start(&topo.pods[1], "a2", POD_A2),
        PodBackend::start(&topo.pods[2], "b1", POD_B1),
    ];
    // Reachable by the agent in node A's namespace, at 127.0.0.1 there.
    let api = topo.node_a.run_in(KubeApi::start);
    api.apply(node("node-a", NODE_A));
    api.apply(node("node-b", NODE_B));
    api.apply(web("Cluster", LB_IP));
    api.apply(endpoints());

    // Without the agent nothing answers: node A refuses the NodePort (nothing listens there)
    // and has no route to the ExternalIP and LoadBalancer IPs. Every success below is mesh's.
    let [nodeport, external, lb] = tcp_addrs(LB_IP);
    assert_errors(&tcp(&topo, &nodeport, 1), &[("ECONNREFUSED", 1)]);
    for addr in [&external, &lb] {
        assert_left_to_node_a(&topo, addr, 1);
    }
    assert_nobody_saw_anything(&backends);

    let cgroup = CgroupGuard::new("npk8s");
    let bpffs = BpffsDir::new("npk8s");
    let state = TempDir::new("npk8s-state");
    // The agent keeps its last Kubernetes set there and asks for a private directory.
    std::fs::set_permissions(state.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let kubeconfig = state.path().join("kubeconfig");
    api.kubeconfig(&kubeconfig).expect("write the kubeconfig");
    // Ready only once the cluster's first set is in the maps.
    let agent = Agent::start_in_netns(
        &agent_config(&kubeconfig, state.path()),
        &cgroup,
        &bpffs,
        &topo.node_a,
    );
    let mut flows = 0;

    // Cluster: each address reaches every endpoint in exact round-robin. Node A's pods see the
    // client, node B's pod sees node A (SNAT), and its replies come back through node A.
    for addr in tcp_addrs(LB_IP) {
        let r = tcp(&topo, &addr, 30);
        assert_eq!(
            r.counts(),
            counts(&[("a1", 10), ("a2", 10), ("b1", 10)]),
            "{addr}: {}",
            r.stdout
        );
        assert_eq!(backends[0].take_peers(), counts(&[(CLIENT, 10)]), "{addr}");
        assert_eq!(backends[1].take_peers(), counts(&[(CLIENT, 10)]), "{addr}");
        assert_eq!(backends[2].take_peers(), counts(&[(NODE_A, 10)]), "{addr}");
        flows += 30;
    }
    // UDP: every reply comes from the address dialled (a TCP connect answered from another
    // address would not have been established at all).
    for addr in udp_addrs(LB_IP) {
        let r = udp(&topo, &addr, 30);
        assert_eq!(
            r.counts(),
            counts(&[("a1", 10), ("a2", 10), ("b1", 10)]),
            "{addr}: {}",
            r.stdout
        );
        assert_eq!(r.sources(), counts(&[(addr.as_str(), 30)]));
        assert_eq!(backends[2].take_peers(), counts(&[(NODE_A, 10)]), "{addr}");
        for b in &backends[..2] {
            b.take_peers();
        }
        flows += 30;
    }
    // The ingress IP with ipMode Proxy is not captured: node A's stack answers as before.
    let proxy = format!("{LB_IP_PROXY}:80");
    assert_left_to_node_a(&topo, &proxy, 1);
    // No healthCheckNodePort with Cluster.
    let refused = health(&topo).expect_err("a health check server with Cluster");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    assert_nobody_saw_anything(&backends);

    // Local, through the API: only node A's endpoints, which see the client's own address.
    api.apply(web("Local", LB_IP));
    let applied = wait_until(APPLY, || {
        [NODE_A, EXTERNAL_IP, LB_IP].iter().all(|ip| {
            let np = *ip == NODE_A;
            let (tcp_port, udp_port) = if np {
                (NODE_PORT_TCP, NODE_PORT_UDP)
            } else {
                (80, 53)
            };
            ext_slots(&agent, "http", &format!("{ip}:{tcp_port}"), "tcp") == Some(2)
                && ext_slots(&agent, "dns", &format!("{ip}:{udp_port}"), "udp") == Some(2)
        })
    });
    assert!(
        applied,
        "Local never reached the maps: {:#?}",
        ext_services(&agent)
    );
    // Flows of the Cluster rounds keep their backend until they expire (as documented): a new
    // UDP socket of the client given the port of one of them would continue it, to b1.
    assert!(
        wait_until(APPLY, || nat_flows(&agent) == Some(0)),
        "the Cluster flows never expired:\n{}",
        agent.metrics_text()
    );
    for addr in tcp_addrs(LB_IP) {
        let r = tcp(&topo, &addr, 20);
        assert_eq!(
            r.counts(),
            counts(&[("a1", 10), ("a2", 10)]),
            "{addr}: {}",
            r.stdout
        );
        assert_eq!(backends[0].take_peers(), counts(&[(CLIENT, 10)]), "{addr}");
        assert_eq!(backends[1].take_peers(), counts(&[(CLIENT, 10)]), "{addr}");
        assert!(backends[2].take_peers().is_empty(), "{addr}");
        flows += 20;
    }
    for addr in udp_addrs(LB_IP) {
        let r = udp(&topo, &addr, 20);
        assert_eq!(
            r.counts(),
            counts(&[("a1", 10), ("a2", 10)]),
            "{addr}: {}",
            r.stdout
        );
        assert_eq!(r.sources(), counts(&[(addr.as_str(), 20)]));
        assert_eq!(backends[0].take_peers(), counts(&[(CLIENT, 10)]), "{addr}");
        assert_eq!(backends[1].take_peers(), counts(&[(CLIENT, 10)]), "{addr}");
        assert!(backends[2].take_peers().is_empty(), "{addr}");
        flows += 20;
    }
    // The healthCheckNodePort answers as kube-proxy's does: two ready endpoints on node A.
    let a = health(&topo).expect("GET the healthCheckNodePort");
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(
        a.body,
        r#"{"service":{"namespace":"default","name":"web"},"localEndpoints":2,"serviceProxyHealthy":true}"#
    );

    // A new LoadBalancer IP in the status: the old one is left to node A's stack again (the
    // programs pass packets for addresses that are no external service), the new one works.
    api.apply(web("Local", LB_IP_NEW));
    let applied = wait_until(APPLY, || {
        ext_slots(&agent, "http", &format!("{LB_IP_NEW}:80"), "tcp") == Some(2)
            && ext_slots(&agent, "http", &format!("{LB_IP}:80"), "tcp").is_none()
    });
    assert!(
        applied,
        "the new LoadBalancer IP: {:#?}",
        ext_services(&agent)
    );
    assert_left_to_node_a(&topo, &lb, 2);
    assert_nobody_saw_anything(&backends);
    let r = tcp(&topo, &format!("{LB_IP_NEW}:80"), 20);
    assert_eq!(
        r.counts(),
        counts(&[("a1", 10), ("a2", 10)]),
        "{}",
        r.stdout
    );
    assert_eq!(backends[0].take_peers(), counts(&[(CLIENT, 10)]));
    assert_eq!(backends[1].take_peers(), counts(&[(CLIENT, 10)]));
    flows += 20;

    // The Service goes: nothing answers on its addresses any more (node A refuses the
    // NodePort itself: the programs' own refusal would count as no_backend), its health check
    // server closes, and every flow it had expires.
    let no_backend = || metric(&agent, "mesh_nodeport_events_total{event=\"no_backend\"}");
    let no_backend_before = no_backend();
    api.delete("Service", "default", "web");
    assert!(
        wait_until(APPLY, || ext_services(&agent).is_empty()),
        "external services left: {:#?}",
        ext_services(&agent)
    );
    assert_errors(&tcp(&topo, &nodeport, 3), &[("ECONNREFUSED", 3)]);
    assert_eq!(no_backend(), no_backend_before);
    for addr in [&external, &format!("{LB_IP_NEW}:80")] {
        assert_left_to_node_a(&topo, addr, 1);
    }
    assert_nobody_saw_anything(&backends);
    assert!(
        wait_until(APPLY, || health(&topo)
            .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)),
        "the health check server outlived its Service"
    );
    assert!(
        wait_until(APPLY, || { nat_flows(&agent) == Some(0) }),
        "nat_flows still holds entries:\n{}",
        agent.metrics_text()
    );
    let event = |name: &str| {
        metric(
            &agent,
            &format!("mesh_nodeport_events_total{{event=\"{name}\"}}"),
        )
        .unwrap()
    };
    let (created, expired, reopened) = (
        event("flow_created"),
        event("flow_expired"),
        event("flow_reopened"),
    );
    eprintln!("flows created {created}, expired {expired}, replaced {reopened}");
    assert_eq!(created, flows, "flows created");
    assert_eq!(
        expired + reopened,
        created,
        "every flow expired or was replaced"
    );
    assert_eq!(metric(&agent, "mesh_nodeport_flows"), Some(0));
}
