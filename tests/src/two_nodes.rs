//! A client host, two nodes and their pods in network namespaces the test creates, for traffic
//! from other hosts (NodePorts, ExternalIPs, LoadBalancer IPs) balanced by the TC programs.
//!
//! ```text
//!   client 10.77.0.1 ----+
//!   nodeA  10.77.0.2 ----+---- bridge in the "switch" namespace
//!   nodeB  10.77.0.3 ----+
//!   nodeA: pods a1 10.244.1.2, a2 10.244.1.3    nodeB: pod b1 10.244.2.2
//! ```
//!
//! Pods sit behind their node on a veth (routed, proxy ARP on the node side, as Calico does);
//! each node routes the other node's pod range through it; the client has no route to any pod,
//! so a reply that is not translated back never reaches it as the address it dialled.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::probe::{ProbeResult, run_probe_command};
use crate::{Agent, NetNs};

pub const CLIENT: &str = "10.77.0.1";
pub const NODE_A: &str = "10.77.0.2";
pub const NODE_B: &str = "10.77.0.3";
/// An ExternalIP routed by the client to node A.
pub const EXTERNAL_IP: &str = "10.77.0.100";
pub const POD_A1: &str = "10.244.1.2";
pub const POD_A2: &str = "10.244.1.3";
pub const POD_B1: &str = "10.244.2.2";
pub const TCP_PORT: u16 = 8080;
pub const UDP_PORT: u16 = 5353;
/// The pods' TCP echo servers (the long transfers).
pub const ECHO_PORT: u16 = 9000;
const PROBE_TIMEOUT: Duration = Duration::from_secs(60);

/// A pod's TCP and UDP backend, serving from the test process on sockets made inside the pod's
/// namespace. Answers with its name and remembers who it saw as the peer.
pub struct PodBackend {
    peers: Arc<Mutex<Vec<IpAddr>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl PodBackend {
    pub fn start(pod: &NetNs, name: &str, ip: &str) -> PodBackend {
        let tcp_addr: SocketAddr = format!("{ip}:{TCP_PORT}").parse().unwrap();
        let udp_addr: SocketAddr = format!("{ip}:{UDP_PORT}").parse().unwrap();
        let echo_addr: SocketAddr = format!("{ip}:{ECHO_PORT}").parse().unwrap();
        let (listener, socket, echo) = pod.run_in(|| {
            (
                TcpListener::bind(tcp_addr).expect("bind the pod's TCP backend"),
                UdpSocket::bind(udp_addr).expect("bind the pod's UDP backend"),
                TcpListener::bind(echo_addr).expect("bind the pod's echo backend"),
            )
        });
        let peers = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        listener.set_nonblocking(true).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let (tcp_peers, tcp_stop, reply) = (peers.clone(), stop.clone(), format!("{name}\n"));
        let tcp = std::thread::spawn(move || {
            while !tcp_stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((mut stream, peer)) => {
                        tcp_peers.lock().unwrap().push(peer.ip());
                        let _ = stream.set_nonblocking(false);
                        let _ = stream.write_all(reply.as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        let (udp_peers, udp_stop, reply) = (peers.clone(), stop.clone(), name.to_owned());
        let udp = std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !udp_stop.load(Ordering::SeqCst) {
                if let Ok((_, peer)) = socket.recv_from(&mut buf) {
                    udp_peers.lock().unwrap().push(peer.ip());
                    let _ = socket.send_to(reply.as_bytes(), peer);
                }
            }
        });
        echo.set_nonblocking(true).unwrap();
        let (echo_peers, echo_stop) = (peers.clone(), stop.clone());
        let echo = std::thread::spawn(move || {
            while !echo_stop.load(Ordering::SeqCst) {
                match echo.accept() {
                    Ok((stream, peer)) => {
                        echo_peers.lock().unwrap().push(peer.ip());
                        // One transfer at a time: the test runs them one after the other.
                        echo_until_eof(stream);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        PodBackend {
            peers,
            stop,
            threads: vec![tcp, udp, echo],
        }
    }

    /// Peer address -> how many connections/datagrams came from it; forgets them.
    pub fn take_peers(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for ip in self.peers.lock().unwrap().drain(..) {
            *out.entry(ip.to_string()).or_default() += 1;
        }
        out
    }
}

/// Writes back everything read until the peer shuts its side, then closes.
fn echo_until_eof(mut stream: std::net::TcpStream) {
    use std::io::Read as _;
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(20)));
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
}

impl Drop for PodBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The whole topology; dropping it deletes every namespace (and so every veth).
pub struct Topology {
    pub client: NetNs,
    pub node_a: NetNs,
    pub node_b: NetNs,
    /// a1 and a2 (behind node A), b1 (behind node B).
    pub pods: Vec<NetNs>,
    _switch: NetNs,
}

pub fn build_topology() -> Topology {
    let switch = NetNs::new("np-sw");
    let client = NetNs::new("np-cl");
    let node_a = NetNs::new("np-na");
    let node_b = NetNs::new("np-nb");
    switch.ip(&["link", "add", "br0", "type", "bridge"]);
    switch.ip(&["link", "set", "br0", "up"]);
    for (port, ns, addr) in [
        ("pc", &client, CLIENT),
        ("pa", &node_a, NODE_A),
        ("pb", &node_b, NODE_B),
    ] {
        switch.ip(&[
            "link",
            "add",
            port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ]);
        switch.ip(&["link", "set", port, "master", "br0", "up"]);
        ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
        ns.ip(&["link", "set", "eth0", "up"]);
    }
    // The client reaches the ExternalIP through node A (as a router or an LB would send it).
    client.ip(&["route", "add", &format!("{EXTERNAL_IP}/32"), "via", NODE_A]);
    let mut pods = Vec::new();
    for (node, tag, dev, ip) in [
        (&node_a, "np-a1", "va1", POD_A1),
        (&node_a, "np-a2", "va2", POD_A2),
        (&node_b, "np-b1", "vb1", POD_B1),
    ] {
        let pod = NetNs::new(tag);
        node.ip(&[
            "link",
            "add",
            dev,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            pod.name(),
        ]);
        node.ip(&["link", "set", dev, "up"]);
        node.sysctl(&format!("net.ipv4.conf.{dev}.proxy_arp=1"));
        node.ip(&["route", "add", &format!("{ip}/32"), "dev", dev]);
        pod.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"]);
        pod.ip(&["link", "set", "eth0", "up"]);
        pod.ip(&["route", "add", "default", "dev", "eth0"]);
        pods.push(pod);
    }
    for node in [&node_a, &node_b] {
        node.sysctl("net.ipv4.ip_forward=1");
        node.sysctl("net.ipv4.conf.all.rp_filter=0");
        node.sysctl("net.ipv4.conf.default.rp_filter=0");
    }
    node_a.ip(&["route", "add", "10.244.2.0/24", "via", NODE_B]);
    node_b.ip(&["route", "add", "10.244.1.0/24", "via", NODE_A]);
    Topology {
        client,
        node_a,
        node_b,
        pods,
        _switch: switch,
    }
}

pub fn client_probe(topo: &Topology, args: &[&str]) -> ProbeResult {
    let mut cmd = topo.client.command(crate::probe_bin());
    cmd.args(args);
    run_probe_command(&mut cmd, None, PROBE_TIMEOUT)
}

pub fn tcp(topo: &Topology, addr: &str, count: usize) -> ProbeResult {
    client_probe(
        topo,
        &[
            "connect",
            "--addr",
            addr,
            "--count",
            &count.to_string(),
            "--timeout-ms",
            "2000",
        ],
    )
}

/// `count` request/replies, each from a new socket (a new source port: a new flow; datagrams
/// of one socket are one flow and stay on one backend). The sockets stay open until the last
/// reply, so no two share a port (and a flow).
pub fn udp(topo: &Topology, addr: &str, count: usize) -> ProbeResult {
    client_probe(
        topo,
        &[
            "udp-fresh",
            "--keep-open",
            "--addr",
            addr,
            "--count",
            &count.to_string(),
            "--timeout-ms",
            "2000",
        ],
    )
}

/// `count` new connected UDP sockets: connect, send, recv (where an ICMP error surfaces as
/// ECONNREFUSED), all closed at the end (each has a port of its own, as in `udp`).
pub fn udp_connected(topo: &Topology, addr: &str, count: usize) -> ProbeResult {
    client_probe(
        topo,
        &[
            "udp-connected",
            "--keep-open",
            "--addr",
            addr,
            "--count",
            &count.to_string(),
            "--timeout-ms",
            "2000",
        ],
    )
}

pub fn counts(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
}

/// `name{labels} value` of one series of the agent's /metrics.
pub fn metric(agent: &Agent, series: &str) -> Option<u64> {
    agent.metrics_text().lines().find_map(|line| {
        let rest = line.strip_prefix(series)?.trim();
        rest.parse().ok()
    })
}
