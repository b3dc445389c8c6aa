//! What the kernel programs record about sockets, when recording fails: a connected UDP socket
//! whose reverse state (socket-local storage) cannot be created is still balanced, is counted
//! in `rev_failed`, and leaves nothing in `udp_flows` (its release could never remove it).
//!
//! Storage creation is made to fail by lowering `net.core.optmem_max` (per network namespace
//! since Linux 6.9: socket-local storage is charged to the socket's option memory) inside a
//! network namespace the test creates; VIP, backends and client all live in that namespace.
//!
//! Privileged: run as root through `cargo xtask test`.

use std::collections::BTreeMap;
use std::time::Duration;

use integration_tests::maps::{datapath_counters, map_len};
use integration_tests::{NetNs, ProbeServer, ServerKind, ServiceSpec, TestEnv, render_config};

const PROBE_LIMIT: Duration = Duration::from_secs(60);

#[test]
fn connected_udp_without_reverse_state_is_balanced_and_leaves_no_flow_behind() {
    let ns = NetNs::new("norev");
    let vip = "127.100.71.1:53";
    let backends: Vec<ProbeServer> = (1..=2)
        .map(|i| {
            let addr = format!("127.0.0.1:{}", 5400 + i).parse().expect("address");
            ProbeServer::start(Some(&ns), ServerKind::Udp, &format!("norev-{i}"), addr)
        })
        .collect();
    let env = TestEnv::start(
        "norev",
        &render_config(&[
            ServiceSpec::udp("norev", vip).backends(backends.iter().map(ProbeServer::addr))
        ]),
    );
    // Too little option memory for any socket-local storage, in this namespace only.
    let mut sysctl = ns.command("sysctl");
    sysctl.args(["-w", "net.core.optmem_max=64"]);
    let out = integration_tests::process::run_bounded(&mut sysctl, Duration::from_secs(10))
        .expect("sysctl runs");
    assert!(out.status.success(), "sysctl: {}", out.describe());

    let before = datapath_counters(&env.bpffs);
    let args = ["udp-connected", "--addr", vip, "--count", "20", "--summary"];
    let summary = ns.probe_summary_in(&env.cgroup, args, PROBE_LIMIT);
    let after = datapath_counters(&env.bpffs);
    eprintln!("without reverse state: {summary:?}\ncounters {before:?} -> {after:?}");
    assert!(summary.errors.is_empty(), "{summary:?}");
    let replies: BTreeMap<String, u64> =
        BTreeMap::from([("norev-1".to_owned(), 10), ("norev-2".to_owned(), 10)]);
    assert_eq!(
        summary.replies, replies,
        "the connects are still balanced, round-robin"
    );
    assert_eq!(
        after.rev_failed - before.rev_failed,
        20,
        "every translated socket failed to get reverse state, and was counted"
    );
    assert_eq!(
        after.rev_created, before.rev_created,
        "no state was created"
    );
    assert_eq!(
        after.udp_flows_added, before.udp_flows_added,
        "a socket without reverse state is not recorded in udp_flows"
    );
    assert_eq!(
        map_len(&env.bpffs, "udp_flows"),
        0,
        "udp_flows must hold nothing once the sockets are closed"
    );
}
