//! Self-checks of the harness that need root and cgroup v2 but no agent: when these fail, the
//! end-to-end failures elsewhere are the harness's, not mesh's.

use std::process::Command;
use std::time::Duration;

use integration_tests::probe::{move_into_cgroup_at_spawn, probe_connect_outside};
use integration_tests::{CgroupGuard, TcpBackend, probe_connect_in, serial, wait_until};

#[test]
fn probe_runs_inside_its_cgroup_and_the_cgroup_is_removed() {
    let _serial = serial();
    let backend = TcpBackend::start("plain");
    let cgroup = CgroupGuard::new("harness");
    let path = cgroup.path().to_path_buf();
    assert!(path.is_dir());

    // No programs are attached to this cgroup: connects go where they are addressed.
    let result = probe_connect_in(&cgroup, backend.addr(), 5);
    assert_eq!(result.count("plain"), 5, "{result:?}");
    assert_eq!(backend.accepted(), 5);
    assert!(
        result
            .cgroup()
            .is_some_and(|c| c.ends_with(&format!("/{}", cgroup.name())))
    );
    assert!(cgroup.pids().is_empty(), "the probe has exited");

    drop(cgroup);
    assert!(!path.exists(), "{} should be removed", path.display());
}

#[test]
fn cgroup_guard_kills_what_is_left_in_it() {
    let _serial = serial();
    let cgroup = CgroupGuard::new("harness-kill");
    let path = cgroup.path().to_path_buf();
    let mut cmd = Command::new("sleep");
    cmd.arg("30");
    let mut child = move_into_cgroup_at_spawn(&mut cmd, &cgroup)
        .spawn()
        .expect("spawn sleep");
    assert!(wait_until(Duration::from_secs(2), || cgroup
        .pids()
        .contains(&child.id())));

    drop(cgroup);
    let mut exited = None;
    assert!(wait_until(Duration::from_secs(5), || {
        exited = child.try_wait().expect("try_wait");
        exited.is_some()
    }));
    assert!(!exited.expect("exited").success(), "killed by SIGKILL");
    assert!(!path.exists(), "{} should be removed", path.display());
}

#[test]
fn probe_reports_refused_connects_by_errno() {
    let _serial = serial();
    let mut backend = TcpBackend::start("gone");
    backend.stop();
    let result = probe_connect_outside(backend.addr(), 3);
    assert_eq!(result.errors(), vec!["ECONNREFUSED"; 3]);
    backend.restart();
    assert_eq!(probe_connect_outside(backend.addr(), 2).count("gone"), 2);
}
