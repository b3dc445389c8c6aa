//! Traffic from other hosts: NodePort, ExternalIPs and externalTrafficPolicy at the node's
//! external devices (the TC programs), end to end in network namespaces the test creates: the
//! client host, two nodes and three pods of `integration_tests::two_nodes`, services from the
//! config file. One mesh agent per node runs inside the node's namespace: socket level on a
//! cgroup of its own, TC on the node's device (node A's found automatically, node B's named in
//! its config).

use std::io::Write as _;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use integration_tests::two_nodes::{
    CLIENT, ECHO_PORT, EXTERNAL_IP, NODE_A, NODE_B, POD_A1, POD_A2, POD_B1, PodBackend, TCP_PORT,
    Topology, UDP_PORT, build_topology, counts, metric, tcp, udp, udp_connected,
};
use integration_tests::{Agent, BpffsDir, CgroupGuard, wait_until};

/// A UDP port nothing listens on in the pods: their kernels answer port unreachable.
const CLOSED_UDP_PORT: u16 = 5354;
/// Bytes each long transfer sends (and gets echoed back).
const BULK_BYTES: usize = 8 << 20;
/// The Local service's healthCheckNodePort.
const HC_PORT: u16 = 32100;

/// A deterministic byte stream (xorshift), so a transfer is checked byte for byte without
/// keeping a copy.
struct Stream(u64);

impl Stream {
    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            *b = self.0 as u8;
        }
    }
}

/// Sends `BULK_BYTES` through `addr` from the client host to an echo backend while reading
/// the echo; returns the bytes that came back equal to what was sent, in order, and the
/// first offset where they differ, if any.
fn bulk_transfer(topo: &Topology, addr: &str, seed: u64) -> (usize, Option<usize>) {
    use std::io::Read as _;
    let addr: SocketAddr = addr.parse().unwrap();
    let stream = topo.client.run_in(|| {
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"))
    });
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let mut bytes = Stream(seed);
        let mut chunk = vec![0u8; 64 << 10];
        let mut sent = 0;
        while sent < BULK_BYTES {
            let n = chunk.len().min(BULK_BYTES - sent);
            bytes.fill(&mut chunk[..n]);
            writer.write_all(&chunk[..n]).expect("sending the transfer");
            sent += n;
        }
        writer.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut reader = stream;
    let mut expect = Stream(seed);
    let (mut buf, mut want) = (vec![0u8; 64 << 10], vec![0u8; 64 << 10]);
    let (mut received, mut first_diff) = (0, None);
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        expect.fill(&mut want[..n]);
        if first_diff.is_none()
            && let Some(i) = (0..n).find(|&i| buf[i] != want[i])
        {
            first_diff = Some(received + i);
        }
        received += n;
    }
    sender.join().expect("the sender");
    (received, first_diff)
}

/// Node A's registry: the NodePort on node A's address (TCP and UDP, Cluster), a Local one,
/// and an ExternalIP (Cluster).
fn node_a_config(with_a2: bool) -> String {
    let a2 = |port: u16| {
        if with_a2 {
            format!("\n[[services.backends]]\naddr = \"{POD_A2}:{port}\"\n")
        } else {
            String::new()
        }
    };
    format!(
        r#"
[agent]
resync = "1s"
[agent.limits]
max_external_flows = 4096
[agent.nodeport]
enabled = true
udp_timeout = "2s"
tcp_closing_timeout = "2s"
tcp_timeout = "60s"

[[services]]
name = "np-tcp"
vip = "{NODE_A}:30080"
external = "cluster"
[[services.backends]]
addr = "{POD_A1}:{TCP_PORT}"
{a2_tcp}
[[services.backends]]
addr = "{POD_B1}:{TCP_PORT}"

[[services]]
name = "np-udp"
vip = "{NODE_A}:30053"
protocol = "udp"
external = "cluster"
[[services.backends]]
addr = "{POD_A1}:{UDP_PORT}"
{a2_udp}
[[services.backends]]
addr = "{POD_B1}:{UDP_PORT}"

[[services]]
name = "default/np-local:http@ext/{NODE_A}:30081"
vip = "{NODE_A}:30081"
external = "local"
health_check_node_port = {{ port = {HC_PORT} }}
[[services.backends]]
addr = "{POD_A1}:{TCP_PORT}"
{a2_tcp}

[[services]]
name = "ext-ip"
vip = "{EXTERNAL_IP}:80"
external = "cluster"
[[services.backends]]
addr = "{POD_A1}:{TCP_PORT}"
[[services.backends]]
addr = "{POD_B1}:{TCP_PORT}"

[[services]]
name = "np-udp-closed"
vip = "{NODE_A}:30054"
protocol = "udp"
external = "cluster"
[[services.backends]]
addr = "{POD_A1}:{CLOSED_UDP_PORT}"
[[services.backends]]
addr = "{POD_B1}:{CLOSED_UDP_PORT}"

[[services]]
name = "np-sticky"
vip = "{NODE_A}:30085"
external = "cluster"
affinity = {{ timeout = "10m" }}
[[services.backends]]
addr = "{POD_A1}:{TCP_PORT}"
[[services.backends]]
addr = "{POD_A2}:{TCP_PORT}"
[[services.backends]]
addr = "{POD_B1}:{TCP_PORT}"

[[services]]
name = "np-bulk"
vip = "{NODE_A}:30090"
external = "cluster"
[[services.backends]]
addr = "{POD_A1}:{ECHO_PORT}"
[[services.backends]]
addr = "{POD_B1}:{ECHO_PORT}"
"#,
        a2_tcp = a2(TCP_PORT),
        a2_udp = a2(UDP_PORT),
    )
}

/// Node B: the Local NodePort of the same Service; node B has no endpoint of it.
fn node_b_config() -> String {
    format!(
        r#"
[agent]
[agent.limits]
max_external_flows = 4096
[agent.nodeport]
enabled = true
devices = ["eth0"]

[[services]]
name = "default/np-local:http@ext/{NODE_B}:30081"
vip = "{NODE_B}:30081"
external = "local"
health_check_node_port = {{ port = {HC_PORT} }}

[[services]]
name = "np-local-udp"
vip = "{NODE_B}:30082"
protocol = "udp"
external = "local"
"#
    )
}

/// Packets (`what` = "packets") or bytes of one backend of an external service at the TC
/// programs, in one direction ("in": towards the backend, "out": its replies).
fn np_backend(
    agent: &Agent,
    what: &str,
    service: &str,
    backend: &str,
    protocol: &str,
    direction: &str,
) -> Option<u64> {
    metric(
        agent,
        &format!(
            "mesh_nodeport_backend_{what}_total{{service=\"{service}\",backend=\"{backend}\",protocol=\"{protocol}\",direction=\"{direction}\"}}"
        ),
    )
}

/// One request/reply on a connected UDP socket: the reply, or `ERR <error>`.
fn udp_exchange(socket: &UdpSocket) -> String {
    let mut buf = [0u8; 64];
    match socket.send(b"held\n").and_then(|_| socket.recv(&mut buf)) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Err(e) => format!("ERR {e}"),
    }
}

/// One TCP connection of the client from local port `port` (0: any), read to its end.
struct Connection {
    port: u16,
    reply: String,
    took: Duration,
}

/// Connects from `port` (SO_REUSEADDR, so a port whose last connection is still closing can
/// be bound again) and reads the backend's name. The previous connection's 4-tuple may be in
/// LAST_ACK for a moment: that is retried, a bounded number of times.
fn connect_from(port: u16, addr: &str) -> Connection {
    use socket2::{Domain, Socket, Type};
    use std::io::Read as _;
    let addr: SocketAddr = addr.parse().unwrap();
    for _ in 0..50 {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        socket.set_reuse_address(true).unwrap();
        let local: SocketAddr = format!("0.0.0.0:{port}").parse().unwrap();
        socket.bind(&local.into()).unwrap();
        let started = Instant::now();
        match socket.connect_timeout(&addr.into(), Duration::from_secs(3)) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => panic!("connect from port {port} to {addr}: {e}"),
        }
        let took = started.elapsed();
        let port = socket.local_addr().unwrap().as_socket().unwrap().port();
        let mut stream: std::net::TcpStream = socket.into();
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).unwrap();
        return Connection {
            port,
            reply: reply.trim().to_owned(),
            took,
        };
    }
    panic!("port {port} stayed busy towards {addr}");
}

#[test]
fn nodeport_from_other_hosts() {
    let topo = build_topology();
    let backends = [
        PodBackend::start(&topo.pods[0], "a1", POD_A1),
        PodBackend::start(&topo.pods[1], "a2", POD_A2),
        PodBackend::start(&topo.pods[2], "b1", POD_B1),
    ];
    let nodeport_tcp = format!("{NODE_A}:30080");
    let nodeport_udp = format!("{NODE_A}:30053");
    let local_a = format!("{NODE_A}:30081");
    let local_b = format!("{NODE_B}:30081");
    let external_ip = format!("{EXTERNAL_IP}:80");

    // Without the agents nothing answers on the NodePorts: every success below is mesh's.
    let before = tcp(&topo, &nodeport_tcp, 1);
    assert_eq!(before.counts().len(), 0, "{}", before.stdout);

    let (cg_a, cg_b) = (CgroupGuard::new("np-a"), CgroupGuard::new("np-b"));
    let (bpf_a, bpf_b) = (BpffsDir::new("np-a"), BpffsDir::new("np-b"));
    let agent_a = Agent::start_in_netns(&node_a_config(true), &cg_a, &bpf_a, &topo.node_a);
    let agent_b = Agent::start_in_netns(&node_b_config(), &cg_b, &bpf_b, &topo.node_b);
    // Node A's device was found on its own (the pods' devices hold no node address).
    let log_a = agent_a.log_text();
    assert!(
        log_a.contains(&format!("\"eth0 ({NODE_A})\"")) && !log_a.contains("va1"),
        "node A should attach to eth0 only:\n{log_a}"
    );
    for b in &backends {
        b.take_peers();
    }

    // Cluster, TCP: exact round-robin over both nodes' endpoints from the client host.
    let r = tcp(&topo, &nodeport_tcp, 30);
    assert_eq!(
        r.counts(),
        counts(&[("a1", 10), ("a2", 10), ("b1", 10)]),
        "{}",
        r.stdout
    );
    // Local pods saw the client; node B's pod saw node A (SNAT), so its replies came back
    // through node A, which translated them to the NodePort the client dialled.
    assert_eq!(backends[0].take_peers(), counts(&[(CLIENT, 10)]));
    assert_eq!(backends[1].take_peers(), counts(&[(CLIENT, 10)]));
    assert_eq!(backends[2].take_peers(), counts(&[(NODE_A, 10)]));

    // Cluster, UDP: request/reply, every reply from the address dialled.
    let r = udp(&topo, &nodeport_udp, 30);
    assert_eq!(
        r.counts(),
        counts(&[("a1", 10), ("a2", 10), ("b1", 10)]),
        "{}",
        r.stdout
    );
    assert_eq!(r.sources(), counts(&[(nodeport_udp.as_str(), 30)]));
    assert_eq!(backends[2].take_peers(), counts(&[(NODE_A, 10)]));
    for b in &backends[..2] {
        b.take_peers();
    }

    // Per-backend counters at this layer. UDP is exact: one datagram each way per flow, every
    // frame 42 bytes of headers (Ethernet, IPv4, UDP) plus the payload: the probe's request
    // "mesh-probe <i>\n" (13 bytes for i < 10, 14 after) and the backend's name (2 bytes).
    // The local pods' replies are counted by the egress program, b1's (SNAT) by ingress.
    let mut udp_bytes_in = 0;
    for pod in [POD_A1, POD_A2, POD_B1] {
        let backend = format!("{pod}:{UDP_PORT}");
        let get = |what, dir| np_backend(&agent_a, what, "np-udp", &backend, "udp", dir);
        assert_eq!(get("packets", "in"), Some(10), "{backend}");
        assert_eq!(get("packets", "out"), Some(10), "{backend}");
        assert_eq!(get("bytes", "out"), Some(10 * (42 + 2)), "{backend}");
        let bytes_in = get("bytes", "in").unwrap();
        assert!(
            (10 * (42 + 13)..=10 * (42 + 14)).contains(&bytes_in),
            "{backend}: {bytes_in}"
        );
        udp_bytes_in += bytes_in;
    }
    assert_eq!(udp_bytes_in, 30 * 42 + 10 * 13 + 20 * 14);
    // TCP: 10 connections each; a connection is at least SYN, ACK and FIN towards the backend
    // and SYN-ACK, the reply and FIN back, and about 4 each way in all (never twice that).
    for pod in [POD_A1, POD_A2, POD_B1] {
        let backend = format!("{pod}:{TCP_PORT}");
        for dir in ["in", "out"] {
            let packets = np_backend(&agent_a, "packets", "np-tcp", &backend, "tcp", dir).unwrap();
            assert!(
                (30..=60).contains(&packets),
                "{backend} {dir}: {packets} packets"
            );
            let bytes = np_backend(&agent_a, "bytes", "np-tcp", &backend, "tcp", dir).unwrap();
            assert!(
                (54 * packets..=100 * packets).contains(&bytes),
                "{backend} {dir}: {bytes} bytes in {packets} packets"
            );
        }
    }

    // Local: only node A's endpoints, and they see the client's own address.
    let r = tcp(&topo, &local_a, 20);
    assert_eq!(
        r.counts(),
        counts(&[("a1", 10), ("a2", 10)]),
        "{}",
        r.stdout
    );
    assert_eq!(backends[0].take_peers(), counts(&[(CLIENT, 10)]));
    assert_eq!(backends[1].take_peers(), counts(&[(CLIENT, 10)]));
    assert!(backends[2].take_peers().is_empty());

    // Node B has no local endpoint of the Local service: refused at once (a TCP reset).
    let started = Instant::now();
    let r = tcp(&topo, &local_b, 3);
    assert_eq!(
        r.error_counts(),
        counts(&[("ECONNREFUSED", 3)]),
        "{}",
        r.stdout
    );
    assert!(started.elapsed() < Duration::from_secs(5));

    // healthCheckNodePort, asked from the client host as a cloud load balancer would: node A
    // has two local endpoints, node B none.
    let health = |node: &str| {
        let addr: SocketAddr = format!("{node}:{HC_PORT}").parse().unwrap();
        topo.client.run_in(|| {
            integration_tests::http::get_here(addr, "/healthz", Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("GET {addr}: {e}"))
        })
    };
    let a = health(NODE_A);
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(
        a.body,
        r#"{"service":{"namespace":"default","name":"np-local"},"localEndpoints":2,"serviceProxyHealthy":true}"#
    );
    let b = health(NODE_B);
    assert_eq!(b.status, 503, "{b:?}");
    assert_eq!(
        b.body,
        r#"{"service":{"namespace":"default","name":"np-local"},"localEndpoints":0,"serviceProxyHealthy":true}"#
    );

    // An ExternalIP routed to node A.
    let r = tcp(&topo, &external_ip, 10);
    assert_eq!(r.counts(), counts(&[("a1", 5), ("b1", 5)]), "{}", r.stdout);
    for b in &backends {
        b.take_peers();
    }

    // Counted at this layer (every flow above was created by node A's programs).
    let created = metric(
        &agent_a,
        "mesh_nodeport_events_total{event=\"flow_created\"}",
    )
    .unwrap();
    assert_eq!(created, 30 + 30 + 20 + 10, "flows created by node A");
    let mut flows = created;
    let no_backend_b =
        metric(&agent_b, "mesh_nodeport_events_total{event=\"no_backend\"}").unwrap();
    assert!(
        no_backend_b >= 3,
        "node B counted {no_backend_b} packets without backend"
    );

    // A client port reused towards the same backend through another service. The first
    // connection's replies hold the key (a1 or a2:8080 -> client:P) while its flow closes;
    // the connection from P through the Cluster NodePort that picks that same backend keeps
    // the client's address with another source port (as netfilter's NAT does on a clash)
    // instead of being dropped, which cost a SYN retransmission (1 s) and skipped a backend.
    let remapped = || {
        metric(
            &agent_a,
            "mesh_nodeport_events_total{event=\"source_port_remapped\"}",
        )
        .unwrap()
    };
    let remapped_before = remapped();
    let (first, reused) = topo.client.run_in(|| {
        let first = connect_from(0, &local_a);
        let reused: Vec<_> = (0..3)
            .map(|_| connect_from(first.port, &nodeport_tcp))
            .collect();
        (first, reused)
    });
    let names: Vec<&str> = reused.iter().map(|c| c.reply.as_str()).collect();
    assert!(
        names.contains(&first.reply.as_str()),
        "from port {} to {} and then three times to {nodeport_tcp}: {names:?}",
        first.port,
        first.reply
    );
    for c in &reused {
        assert_eq!(c.port, first.port);
        assert!(
            c.took < Duration::from_millis(900),
            "a connect from the reused port took {:?} (its SYN was dropped)",
            c.took
        );
    }
    assert_eq!(remapped() - remapped_before, 1, "source ports remapped");
    flows += 4;
    for b in &backends {
        b.take_peers();
    }

    // A client port reused straight to the backend (no service) after a connection through
    // the Local service: the pod's SYN-ACK has the 5-tuple of the old flow's replies, whose
    // entry (still closing) would give it the NodePort as source and the connect would hang
    // until the old flow expired. The new SYN retires the closed flow instead. The client
    // routes node A's pods through node A only for this.
    let reopened = || {
        metric(
            &agent_a,
            "mesh_nodeport_events_total{event=\"flow_reopened\"}",
        )
        .unwrap()
    };
    let reopened_before = reopened();
    topo.client
        .ip(&["route", "add", "10.244.1.0/24", "via", NODE_A]);
    let (first, direct) = topo.client.run_in(|| {
        let first = connect_from(0, &local_a);
        let pod = match first.reply.as_str() {
            "a1" => POD_A1,
            "a2" => POD_A2,
            other => panic!("the Local service answered {other:?}"),
        };
        let direct = connect_from(first.port, &format!("{pod}:{TCP_PORT}"));
        (first, direct)
    });
    topo.client
        .ip(&["route", "del", "10.244.1.0/24", "via", NODE_A]);
    assert_eq!(
        direct.reply, first.reply,
        "straight to the pod from port {}",
        first.port
    );
    assert!(
        direct.took < Duration::from_millis(900),
        "the connect straight to the pod took {:?} (its SYN-ACK went to the old flow)",
        direct.took
    );
    assert_eq!(reopened() - reopened_before, 1, "the closed flow retired");
    flows += 1;
    for b in &backends {
        b.take_peers();
    }

    // Session affinity: every connection of the client goes to the backend it got first.
    let r = tcp(&topo, &format!("{NODE_A}:30085"), 9);
    let got = r.counts();
    assert!(
        got.len() == 1 && got.values().sum::<usize>() == 9,
        "{}",
        r.stdout
    );
    flows += 9;

    // Many short connections: still the exact round-robin.
    let r = tcp(&topo, &nodeport_tcp, 300);
    assert_eq!(
        r.counts(),
        counts(&[("a1", 100), ("a2", 100), ("b1", 100)]),
        "{}",
        r.stdout
    );
    flows += 300;
    for b in &backends {
        b.take_peers();
    }

    // Long transfers, echoed back and checked byte for byte: one to a pod on node A, one to
    // node B's pod (SNAT, replies back through node A).
    let bulk = format!("{NODE_A}:30090");
    for seed in [0x9e37_79b9_7f4a_7c15, 0x2545_f491_4f6c_dd1d] {
        let started = Instant::now();
        let (received, first_diff) = bulk_transfer(&topo, &bulk, seed);
        assert_eq!(first_diff, None, "the echo differs from what was sent");
        assert_eq!(received, BULK_BYTES, "bytes echoed back");
        eprintln!(
            "{BULK_BYTES} bytes each way through the NodePort in {:?}",
            started.elapsed()
        );
    }
    flows += 2;
    assert_eq!(backends[0].take_peers(), counts(&[(CLIENT, 1)]));
    assert_eq!(backends[2].take_peers(), counts(&[(NODE_A, 1)]));
    for pod in [POD_A1, POD_B1] {
        let backend = format!("{pod}:{ECHO_PORT}");
        for dir in ["in", "out"] {
            let bytes = np_backend(&agent_a, "bytes", "np-bulk", &backend, "tcp", dir).unwrap();
            // The payload and every packet's headers; the acknowledgements add a few percent.
            assert!(
                (BULK_BYTES as u64..=BULK_BYTES as u64 * 5 / 4).contains(&bytes),
                "{backend} {dir}: {bytes} bytes"
            );
        }
    }

    // ICMP errors about translated flows are translated back: the pods' kernels answer the
    // closed port with port unreachable, about a datagram to the pod (from the client, or from
    // node A for b1). Untranslated, the client would find no socket it belongs to and its
    // recv would time out; translated, its connected sockets see ECONNREFUSED. a1's errors
    // leave through node A's egress program, b1's come in through its ingress program.
    let translated_before = metric(
        &agent_a,
        "mesh_nodeport_events_total{event=\"icmp_error_translated\"}",
    )
    .unwrap();
    let r = udp_connected(&topo, &format!("{NODE_A}:30054"), 4);
    assert_eq!(
        r.error_counts(),
        counts(&[("ECONNREFUSED", 4)]),
        "{}",
        r.stdout
    );
    flows += 4;
    let translated = metric(
        &agent_a,
        "mesh_nodeport_events_total{event=\"icmp_error_translated\"}",
    )
    .unwrap();
    assert_eq!(translated - translated_before, 4);

    // UDP to a service without a usable backend (node B's Local one): refused with an ICMP
    // port unreachable from the programs (node B's own stack never sees the datagram).
    let r = udp_connected(&topo, &format!("{NODE_B}:30082"), 3);
    assert_eq!(
        r.error_counts(),
        counts(&[("ECONNREFUSED", 3)]),
        "{}",
        r.stdout
    );
    assert_eq!(
        metric(
            &agent_b,
            "mesh_nodeport_events_total{event=\"icmp_unreachable_sent\"}"
        ),
        Some(3)
    );

    // Removing a backend. A flow to it that exists already keeps going to it until it expires
    // (as documented); new connections never reach it. The held flow is a connected UDP
    // socket whose datagrams landed on a2, kept busy (udp_timeout is 2 s) across the edit.
    // The other sockets stay open until the end too: a new socket given one of their ports
    // would continue their flow.
    let (held, others) = topo.client.run_in(|| {
        // One round of the round-robin (a1, a2, b1) reaches a2 once.
        let mut others = Vec::new();
        for _ in 1..=3 {
            let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
            socket.connect(nodeport_udp.as_str()).unwrap();
            socket
                .set_read_timeout(Some(Duration::from_secs(2)))
                .unwrap();
            if udp_exchange(&socket) == "a2" {
                return (socket, others);
            }
            others.push(socket);
        }
        panic!("no flow reached a2 in one round of the round-robin");
    });
    flows += others.len() as u64 + 1;
    let slots_of = |service: &str, vip: &str, proto: &str| {
        metric(
            &agent_a,
            &format!(
                "mesh_service_slots{{service=\"{service}\",vip=\"{vip}\",protocol=\"{proto}\"}}"
            ),
        )
    };
    agent_a.write_config(&node_a_config(false));
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut applied = false;
    while !applied && Instant::now() < deadline {
        assert_eq!(udp_exchange(&held), "a2", "the held flow, during the edit");
        applied = slots_of("np-tcp", &nodeport_tcp, "tcp") == Some(2)
            && slots_of("np-udp", &nodeport_udp, "udp") == Some(2);
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(applied, "the edit did not reach the maps");
    for _ in 0..3 {
        assert_eq!(udp_exchange(&held), "a2", "the held flow, after the edit");
    }
    assert!(backends[1].take_peers()[CLIENT] >= 4);
    let r = tcp(&topo, &nodeport_tcp, 20);
    assert_eq!(
        r.counts(),
        counts(&[("a1", 10), ("b1", 10)]),
        "{}",
        r.stdout
    );
    let r = udp(&topo, &nodeport_udp, 20);
    assert_eq!(
        r.counts(),
        counts(&[("a1", 10), ("b1", 10)]),
        "{}",
        r.stdout
    );
    assert_eq!(backends[1].take_peers().len(), 0, "a2 was removed");
    flows += 40;
    drop((held, others));
    // The removed pair's TC counters are gone with it; every remaining pair has one.
    let a2 = format!("{POD_A2}:{TCP_PORT}");
    assert_eq!(
        np_backend(&agent_a, "packets", "np-tcp", &a2, "tcp", "in"),
        None
    );
    assert_eq!(
        metric(&agent_a, "mesh_map_entries{map=\"np_backend_stats\"}"),
        metric(&agent_a, "mesh_map_entries{map=\"backend_stats\"}"),
    );

    // Nothing leaks: the closed TCP flows (closing timeout 2 s) and the UDP flows (2 s idle)
    // are expired, both entries of each.
    assert!(
        wait_until(Duration::from_secs(10), || {
            metric(&agent_a, "mesh_map_entries{map=\"nat_flows\"}") == Some(0)
        }),
        "nat_flows still holds entries:\n{}",
        agent_a.metrics_text()
    );
    let created = metric(
        &agent_a,
        "mesh_nodeport_events_total{event=\"flow_created\"}",
    )
    .unwrap();
    let expired = metric(
        &agent_a,
        "mesh_nodeport_events_total{event=\"flow_expired\"}",
    )
    .unwrap();
    // A client may reuse the port of a connection it closed (it holds no TIME_WAIT: the
    // backend closed first) while the old flow is still there: the kernel then replaces the
    // old flow, which is not expired by the agent.
    let reopened = metric(
        &agent_a,
        "mesh_nodeport_events_total{event=\"flow_reopened\"}",
    )
    .unwrap();
    let events: Vec<String> = agent_a
        .metrics_text()
        .lines()
        .filter(|l| {
            l.starts_with("mesh_nodeport_events_total")
                || l.starts_with("mesh_backend_connections_total")
        })
        .map(str::to_owned)
        .collect();
    // Exact: no UDP socket above shares a port with another one's live flow (they are kept
    // open), and a TCP connection on a reused port replaces the old flow.
    assert_eq!(created, flows, "flows created: {events:#?}");
    assert_eq!(
        expired + reopened,
        created,
        "every flow expired or was replaced, once"
    );
    eprintln!("flows created {created}, expired {expired}, replaced {reopened}");
    assert_eq!(metric(&agent_a, "mesh_nodeport_flows"), Some(0));
    drop(backends);
}
