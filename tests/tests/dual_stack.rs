//! Dual-stack clients: an AF_INET6 socket with IPV6_V6ONLY=0 that talks to `::ffff:<IPv4 VIP>`
//! reaches the IPv4 service, round-robin, and sees the VIP (v4-mapped) as its peer, as the
//! source of UDP replies and as SO_ORIGINAL_DST (SOL_IPV6).
//!
//! The clients are real dual-stack programs run inside the test's cgroup: a Java program
//! (`tests/java/DualStackClient.java`, run with the JDK's source launcher; `java.net.Socket`
//! uses AF_INET6 sockets for IPv4 destinations on Linux), `curl` with a `[::ffff:a.b.c.d]` URL,
//! and `mesh-probe --dual-stack` for UDP and for getpeername/SO_ORIGINAL_DST.
//!
//! Privileged: run as root through `cargo xtask test` (single-threaded; the harness serializes
//! the tests anyway). VIPs are 127.100.70.x; backends listen on 127.0.0.1.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use integration_tests::probe::{assert_no_errors, expect_counts};
use integration_tests::probe::{move_into_cgroup_at_spawn, run_probe_in_for};
use integration_tests::process::{Captured, run_bounded};
use integration_tests::{
    HttpBackend, ORIGINAL_DST_ON, ProbeResult, ServiceSpec, TcpBackend, TestEnv, UdpBackend,
    assert_split, probe_summary_in, render_config, service_status, workspace_root,
};

/// Time bound of one client run (a JVM start included).
const CLIENT_LIMIT: Duration = Duration::from_secs(60);

/// `[::ffff:<ip>]:<port>` for an IPv4 `ip:port`.
fn mapped(vip: &str) -> String {
    match vip.parse::<SocketAddr>() {
        Ok(SocketAddr::V4(v4)) => format!("[::ffff:{}]:{}", v4.ip(), v4.port()),
        other => panic!("{vip:?} is not an IPv4 ip:port ({other:?})"),
    }
}

/// Runs `cmd` inside the test's cgroup (the child moves itself there before exec, as probes
/// do), bounded by [`CLIENT_LIMIT`].
fn run_in_cgroup(env: &TestEnv, cmd: &mut Command) -> Captured {
    move_into_cgroup_at_spawn(cmd, &env.cgroup);
    run_bounded(cmd, CLIENT_LIMIT).unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

/// `java DualStackClient.java <args>` inside the test's cgroup. Panics unless it exits 0.
fn java_client<S: AsRef<str>>(env: &TestEnv, args: &[S]) -> Captured {
    let source = workspace_root().join("tests/java/DualStackClient.java");
    let mut cmd = Command::new("java");
    // getpeername() through the JDK's own sun.nio.ch.Net (see the program's comment).
    cmd.args(["--add-opens", "java.base/sun.nio.ch=ALL-UNNAMED"])
        .arg(&source)
        .args(args.iter().map(AsRef::as_ref));
    let out = run_in_cgroup(env, &mut cmd);
    assert!(
        out.status.success(),
        "java {} failed (is a JDK 17 installed? `cargo xtask setup` installs one): {}",
        source.display(),
        out.describe()
    );
    out
}

/// The `key value` lines of a client's output.
fn fields(stdout: &str) -> BTreeMap<String, String> {
    stdout
        .lines()
        .filter_map(|line| line.split_once(' '))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[track_caller]
fn field<'a>(fields: &'a BTreeMap<String, String>, key: &str, stdout: &str) -> &'a str {
    fields
        .get(key)
        .unwrap_or_else(|| panic!("no `{key}` line in:\n{stdout}"))
}

fn dual_stack_args(mode: &str, addr: &str, count: usize) -> Vec<String> {
    [
        mode,
        "--dual-stack",
        "--addr",
        addr,
        "--count",
        &count.to_string(),
        "--summary",
    ]
    .map(str::to_owned)
    .to_vec()
}

#[test]
fn java_clients_on_dual_stack_sockets_reach_an_ipv4_service_round_robin() {
    let a = TcpBackend::start("ds-java-a");
    let b = TcpBackend::start("ds-java-b");
    let c = TcpBackend::start("ds-java-c");
    let vip = "127.100.70.1:80";
    let env = TestEnv::start(
        "dsjava",
        &render_config(&[ServiceSpec::tcp("ds-java", vip).backends([
            a.addr(),
            b.addr(),
            c.addr(),
        ])]),
    );

    // `new Socket()` + connect("127.100.70.1", 80), 90 times.
    let out = java_client(&env, &["connect", "127.100.70.1", "80", "90"]);
    eprintln!("java connect: {}", out.stderr.trim_end());
    let result = ProbeResult::from_output(out.stdout.clone(), out.stderr.clone());
    assert_eq!(result.total(), 90, "one line per connect:\n{}", out.stdout);
    assert_split(&result, &[(&a, 30), (&b, 30), (&c, 30)]);
    assert!(
        out.stderr
            .contains("dual-stack-client: families AF_INET6=90 AF_INET=0 unknown=0"),
        "every Java socket must be AF_INET6 (a dual-stack socket) for this test to mean \
         anything:\n{}",
        out.stderr
    );

    // One more connect: what getpeername() says, and where the connection really goes.
    let out = java_client(&env, &["peer", "127.100.70.1", "80"]);
    eprintln!("java peer: {}", out.stdout.trim_end());
    let report = fields(&out.stdout);
    assert_eq!(field(&report, "family", &out.stdout), "AF_INET6");
    // The JDK shows a v4-mapped peer as the plain IPv4 address.
    assert_eq!(
        field(&report, "peer", &out.stdout),
        vip,
        "getpeername() must report the VIP"
    );
    let kernel_peer = field(&report, "kernel_peer", &out.stdout);
    let reply = field(&report, "reply", &out.stdout);
    let backend = [&a, &b, &c]
        .into_iter()
        .find(|x| x.name() == reply)
        .unwrap_or_else(|| panic!("reply {reply:?} is no backend's name"));
    assert_eq!(
        kernel_peer,
        mapped(&backend.addr().to_string()),
        "the socket is connected to the backend as a v4-mapped address"
    );
    assert_eq!(
        a.accepted() + b.accepted() + c.accepted(),
        91,
        "every connect reached a backend"
    );
    let status = service_status(&env.bpffs, "ds-java");
    assert_eq!(status.no_backend, 0, "{status:#?}");
}

#[test]
fn curl_on_a_dual_stack_socket_reaches_an_ipv4_service_and_sees_the_mapped_vip() {
    let backends: Vec<HttpBackend> = ["ds-curl-a", "ds-curl-b", "ds-curl-c"]
        .into_iter()
        .map(HttpBackend::start)
        .collect();
    let vip = "127.100.70.2:8080";
    let env = TestEnv::start(
        "dscurl",
        &render_config(&[
            ServiceSpec::tcp("ds-curl", vip).backends(backends.iter().map(HttpBackend::addr))
        ]),
    );
    let url = format!("http://{}/", mapped(vip));

    // One curl process per request: each is a new connection from a new socket.
    let mut replies: BTreeMap<String, u64> = BTreeMap::new();
    let mut peers: BTreeMap<String, u64> = BTreeMap::new();
    for _ in 0..30 {
        let mut cmd = Command::new("curl");
        cmd.args(["--silent", "--show-error", "--globoff", "--max-time", "5"])
            .args(["--header", "Connection: close"])
            // getpeername() of curl's socket, after the body.
            .args(["--write-out", "\npeer %{remote_ip} %{remote_port}\n"])
            .arg(&url);
        let out = run_in_cgroup(&env, &mut cmd);
        let key = if out.status.success() {
            out.stdout.lines().next().unwrap_or_default().to_owned()
        } else {
            format!("ERR curl {}: {}", out.status, out.stderr.trim())
        };
        *replies.entry(key).or_default() += 1;
        if let Some(peer) = out.stdout.lines().find_map(|l| l.strip_prefix("peer ")) {
            *peers.entry(peer.to_owned()).or_default() += 1;
        }
    }
    eprintln!("curl: replies {replies:?}, peers {peers:?}");
    assert_eq!(
        replies,
        expect_counts(&[("ds-curl-a", 10), ("ds-curl-b", 10), ("ds-curl-c", 10)])
    );
    assert_eq!(
        peers,
        expect_counts(&[("::ffff:127.100.70.2 8080", 30)]),
        "curl's getpeername() must report the v4-mapped VIP"
    );
    let served: Vec<usize> = backends.iter().map(HttpBackend::data_requests).collect();
    assert_eq!(served, [10, 10, 10], "requests each backend served");
}

#[test]
fn dual_stack_udp_to_a_v4_mapped_vip_gets_replies_from_the_mapped_vip() {
    let a = UdpBackend::start("ds-udp-a");
    let b = UdpBackend::start("ds-udp-b");
    let c = UdpBackend::start("ds-udp-c");
    let vip = "127.100.70.3:53";
    let env = TestEnv::start(
        "dsudp",
        &render_config(&[ServiceSpec::udp("ds-udp", vip).backends([a.addr(), b.addr(), c.addr()])]),
    );
    let vip6 = mapped(vip);
    let split = |n| expect_counts(&[("ds-udp-a", n), ("ds-udp-b", n), ("ds-udp-c", n)]);

    // Unconnected: all datagrams from one socket (sendto, recvfrom).
    let one = probe_summary_in(&env.cgroup, dual_stack_args("udp", &vip6, 60), CLIENT_LIMIT);
    eprintln!("unconnected, one socket: {one:?}");
    assert_no_errors("udp", &one);
    assert_eq!(one.replies, split(20));
    assert_eq!(
        one.sources,
        expect_counts(&[(&vip6, 60)]),
        "every reply must come from the v4-mapped VIP"
    );

    // Unconnected: a new socket per datagram.
    let fresh = probe_summary_in(
        &env.cgroup,
        dual_stack_args("udp-fresh", &vip6, 30),
        CLIENT_LIMIT,
    );
    eprintln!("unconnected, a socket per datagram: {fresh:?}");
    assert_no_errors("udp-fresh", &fresh);
    assert_eq!(fresh.replies, split(10));
    assert_eq!(fresh.sources, expect_counts(&[(&vip6, 30)]));

    // Connected: connect, send, recvfrom, close; a new socket each time.
    let connected = probe_summary_in(
        &env.cgroup,
        dual_stack_args("udp-connected", &vip6, 30),
        CLIENT_LIMIT,
    );
    eprintln!("connected: {connected:?}");
    assert_no_errors("udp-connected", &connected);
    assert_eq!(connected.replies, split(10));
    assert_eq!(connected.sources, expect_counts(&[(&vip6, 30)]));

    // getpeername() of a connected dual-stack UDP socket.
    let out = run_probe_in_for(
        &env.cgroup,
        ["peer", "--dual-stack", "--addr", &vip6, "--proto", "udp"],
        CLIENT_LIMIT,
    );
    eprintln!("udp peer: {}", out.stdout.trim_end());
    let report = fields(&out.stdout);
    assert_eq!(field(&report, "peer", &out.stdout), vip6, "getpeername()");
    let reply = field(&report, "reply", &out.stdout);
    assert!(
        reply.ends_with(&format!(" from {vip6}")),
        "the reply must come from the v4-mapped VIP: {reply:?}"
    );
    assert_eq!(
        [a.received(), b.received(), c.received()]
            .iter()
            .sum::<usize>(),
        121,
        "every datagram reached a backend"
    );
}

#[test]
fn dual_stack_tcp_getpeername_and_original_dst_report_the_mapped_vip() {
    let a = TcpBackend::start("ds-peer-a");
    let b = TcpBackend::start("ds-peer-b");
    let vip = "127.100.70.4:80";
    let env = TestEnv::start(
        "dspeer",
        &format!(
            "{ORIGINAL_DST_ON}{}",
            render_config(&[ServiceSpec::tcp("ds-peer", vip).backends([a.addr(), b.addr()])])
        ),
    );
    let vip6 = mapped(vip);
    let mut replies = BTreeMap::new();
    for _ in 0..4 {
        let out = run_probe_in_for(
            &env.cgroup,
            ["peer", "--dual-stack", "--addr", &vip6, "--proto", "tcp"],
            CLIENT_LIMIT,
        );
        eprintln!("tcp peer: {}", out.stdout.trim_end());
        let report = fields(&out.stdout);
        assert_eq!(
            field(&report, "peer", &out.stdout),
            vip6,
            "getpeername() of a dual-stack TCP socket"
        );
        assert_eq!(
            field(&report, "original_dst", &out.stdout),
            vip6,
            "getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST) of a dual-stack TCP socket"
        );
        *replies
            .entry(field(&report, "reply", &out.stdout).to_owned())
            .or_insert(0u64) += 1;
    }
    assert_eq!(
        replies,
        expect_counts(&[("ds-peer-a", 2), ("ds-peer-b", 2)]),
        "the connections really go to the backends, round-robin"
    );
}
