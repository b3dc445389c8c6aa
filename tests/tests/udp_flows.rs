//! Connected UDP sockets pointed at a backend that leaves are terminated, and only those.

use std::{
    collections::BTreeMap,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use integration_tests::{
    ServiceSpec, TestEnv, UdpBackend, probe::move_into_cgroup_at_spawn, probe_bin, render_config,
    wait_for_backends, wait_until,
};

/// Sockets per run through the VIP: 3 per backend with three backends.
const THROUGH_VIP: usize = 9;

fn hold_bin() -> std::path::PathBuf {
    probe_bin().with_file_name("mesh-udp-hold")
}

/// (kind, first backend, outcome) per socket after `change` ran between the two exchanges.
fn hold_across(
    env: &TestEnv,
    vip: &str,
    direct: &UdpBackend,
    change: impl FnOnce(),
) -> Vec<(String, String, String)> {
    let dir = std::env::temp_dir().join(format!(
        "mesh-udp-hold-{}-{}",
        std::process::id(),
        vip.replace([':', '.'], "-")
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let ready = dir.join("ready");
    let stop = dir.join("stop");
    let mut cmd = Command::new(hold_bin());
    cmd.args(["--vip", vip, "--direct", &direct.addr().to_string()])
        .args(["--count", &THROUGH_VIP.to_string(), "--max-ms", "30000"])
        .arg("--ready-file")
        .arg(&ready)
        .arg("--stop-file")
        .arg(&stop)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    move_into_cgroup_at_spawn(&mut cmd, &env.cgroup);
    let child = cmd.spawn().expect("spawn mesh-udp-hold");
    assert!(
        wait_until(Duration::from_secs(10), || ready.exists()),
        "mesh-udp-hold never got ready"
    );
    change();
    std::fs::write(&stop, "").unwrap();
    let out = child.wait_with_output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "mesh-udp-hold failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            (f[0].to_owned(), f[2].to_owned(), f[3..].join(" "))
        })
        .collect()
}

fn outcomes(rows: &[(String, String, String)], kind: &str) -> BTreeMap<String, Vec<String>> {
    let mut by_backend: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, first, outcome) in rows {
        if k == kind {
            by_backend
                .entry(first.clone())
                .or_default()
                .push(outcome.split_whitespace().next().unwrap().to_owned());
        }
    }
    by_backend
}

#[test]
fn removed_backend_terminates_exactly_its_connected_udp_sockets() {
    let a = UdpBackend::start("flow-a");
    let b = UdpBackend::start("flow-b");
    let c = UdpBackend::start("flow-c");
    let vip = "127.100.60.1:53";
    let all = |b_in: bool| {
        let mut spec = ServiceSpec::udp("flows", vip).backend(a.addr(), 1);
        if b_in {
            spec = spec.backend(b.addr(), 1);
        }
        render_config(&[spec.backend(c.addr(), 1)])
    };
    let env = TestEnv::start("udpflows", &all(true));

    let started = Instant::now();
    let rows = hold_across(&env, vip, &b, || {
        env.agent.write_config(&all(false));
        wait_for_backends(
            &env.bpffs,
            "flows",
            &[a.addr(), c.addr()],
            Duration::from_secs(5),
        );
        // The termination follows the map writes in the same reconcile step.
        std::thread::sleep(Duration::from_millis(100));
    });
    eprintln!("after removing flow-b ({:?}): {rows:?}", started.elapsed());

    let vip_sockets = outcomes(&rows, "vip");
    assert_eq!(
        vip_sockets.get("flow-b"),
        Some(&vec!["err".to_owned(); 3]),
        "sockets on the removed backend are terminated: {vip_sockets:?}"
    );
    for kept in ["flow-a", "flow-c"] {
        assert_eq!(
            vip_sockets.get(kept),
            Some(&vec!["ok".to_owned(); 3]),
            "sockets on {kept} keep working: {vip_sockets:?}"
        );
    }
    let errors: Vec<&String> = rows
        .iter()
        .filter(|(_, first, o)| first == "flow-b" && o.starts_with("err"))
        .map(|(_, _, o)| o)
        .collect();
    assert!(
        errors.iter().all(|o| o.as_str() == "err ECONNABORTED"),
        "terminated sockets see ECONNABORTED: {errors:?}"
    );
    // A socket connected straight to the backend, and an unconnected one, are never touched.
    for kind in ["direct", "unconnected"] {
        let row = rows.iter().find(|(k, _, _)| k == kind).unwrap();
        assert!(row.2.starts_with("ok"), "{kind} socket untouched: {row:?}");
    }
    let metrics = env.agent.metrics_text();
    assert!(
        metrics
            .lines()
            .any(|l| l == "mesh_udp_flows_terminated_total 3"),
        "metric counts the three terminations:\n{}",
        metrics
            .lines()
            .filter(|l| l.contains("terminated"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn services_may_opt_out_of_terminating_udp_flows() {
    let a = UdpBackend::start("keep-a");
    let b = UdpBackend::start("keep-b");
    let vip = "127.100.61.1:53";
    let config = |b_in: bool| {
        let mut spec = ServiceSpec::udp("keep", vip)
            .set("terminate_udp_flows", "false")
            .backend(a.addr(), 1);
        if b_in {
            spec = spec.backend(b.addr(), 1);
        }
        render_config(&[spec])
    };
    let env = TestEnv::start("udpkeep", &config(true));
    let rows = hold_across(&env, vip, &b, || {
        env.agent.write_config(&config(false));
        wait_for_backends(&env.bpffs, "keep", &[a.addr()], Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(100));
    });
    let vip_sockets = outcomes(&rows, "vip");
    assert!(
        vip_sockets.values().flatten().all(|o| o == "ok"),
        "no socket terminated with the opt-out: {vip_sockets:?}"
    );
    // The opted-out sockets keep talking to the removed (still running) backend.
    assert!(vip_sockets.contains_key("keep-b"));
}
