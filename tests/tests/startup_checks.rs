//! The agent checks what it needs from the host before it touches anything, and exits with one
//! message naming exactly what is missing: run as an unprivileged user the test creates, with
//! single capabilities taken away, and with a cgroup or pins path that is not what it must be.

use std::os::unix::fs::PermissionsExt as _;
use std::process::Command;
use std::time::Duration;

use integration_tests::admin::free_loopback_addr;
use integration_tests::process::{Captured, run_bounded};
use integration_tests::users::TestUser;
use integration_tests::{BpffsDir, CgroupGuard, TempDir, mesh_bin, serial};

/// Everything a `mesh agent` run needs, owned by the test.
struct Setup {
    cgroup: CgroupGuard,
    bpffs: BpffsDir,
    dir: TempDir,
}

impl Setup {
    fn new(tag: &str) -> Setup {
        let dir = TempDir::new(tag);
        // Readable for the unprivileged user too: the checks come after the config is read.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let config = dir.path().join("mesh.toml");
        std::fs::write(&config, "services = []\n").unwrap();
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
        Setup {
            cgroup: CgroupGuard::new(tag),
            bpffs: BpffsDir::new(tag),
            dir,
        }
    }

    /// `mesh agent` arguments; `cgroup`/`bpffs` override the test's own.
    fn args(&self, cgroup: Option<&str>, bpffs: Option<&str>) -> Vec<String> {
        let path = |p: &std::path::Path| p.display().to_string();
        vec![
            "agent".into(),
            "--config".into(),
            path(&self.dir.path().join("mesh.toml")),
            "--cgroup".into(),
            cgroup.map_or_else(|| path(self.cgroup.path()), str::to_owned),
            "--bpffs".into(),
            bpffs.map_or_else(|| path(self.bpffs.path()), str::to_owned),
            "--metrics".into(),
            free_loopback_addr().to_string(),
            "--admin-socket".into(),
            path(&self.dir.path().join("admin.sock")),
            "--state-dir".into(),
            path(&self.dir.path().join("state")),
        ]
    }
}

/// Runs `cmd` (bounded) and checks that the agent refused to start, with nothing attached.
#[track_caller]
fn refused(setup: &Setup, cmd: &mut Command) -> String {
    cmd.env("RUST_LOG", "info").env("NO_COLOR", "1");
    let out: Captured = run_bounded(cmd, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("the agent did not exit within 20 s: {e}"));
    assert!(
        !out.status.success(),
        "the agent started: {}",
        out.describe()
    );
    assert!(
        out.stderr
            .contains("mesh agent cannot run on this host; missing:"),
        "not the startup check's message: {}",
        out.describe()
    );
    assert!(
        !out.stderr.contains("programs attached"),
        "it attached before checking: {}",
        out.describe()
    );
    let progs = std::fs::read_dir(setup.bpffs.path())
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(
        progs,
        0,
        "pins were made under {}",
        setup.bpffs.path().display()
    );
    out.stderr
}

/// Root with `caps` (setpriv names, e.g. `net_admin`) removed from the bounding and inheritable
/// sets, so the exec'd agent does not get them.
fn without_caps(caps: &[&str]) -> Command {
    let drop: Vec<String> = caps.iter().map(|c| format!("-{c}")).collect();
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--bounding-set={}", drop.join(",")))
        .arg(format!("--inh-caps={}", drop.join(",")))
        .arg("--")
        .arg(mesh_bin());
    cmd
}

#[test]
fn an_unprivileged_user_is_told_which_capabilities_are_missing() {
    let _serial = serial();
    let setup = Setup::new("start-user");
    let user = TestUser::create();
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={}", user.uid))
        .arg(format!("--regid={}", user.gid))
        .arg("--clear-groups")
        .arg("--")
        .arg(mesh_bin())
        .args(setup.args(None, None));
    let message = refused(&setup, &mut cmd);
    assert!(message.contains("capability CAP_NET_ADMIN"), "{message}");
    assert!(
        message.contains("capability CAP_SYS_ADMIN, or else CAP_BPF and CAP_PERFMON"),
        "{message}"
    );
}

#[test]
fn a_single_dropped_capability_is_named() {
    let _serial = serial();
    let setup = Setup::new("start-caps");
    let message = refused(
        &setup,
        without_caps(&["net_admin"]).args(setup.args(None, None)),
    );
    assert!(message.contains("capability CAP_NET_ADMIN"), "{message}");
    assert!(
        !message.contains("CAP_BPF"),
        "only NET_ADMIN is missing: {message}"
    );

    let message = refused(
        &setup,
        without_caps(&["sys_admin", "perfmon"]).args(setup.args(None, None)),
    );
    assert!(
        message.contains("capability CAP_SYS_ADMIN, or else CAP_PERFMON:"),
        "{message}"
    );
    assert!(!message.contains("CAP_NET_ADMIN"), "{message}");

    // The control: without CAP_SYS_ADMIN alone, CAP_BPF + CAP_PERFMON pass the check.
    let mut cmd = without_caps(&["sys_admin"]);
    cmd.args(setup.args(None, None))
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1");
    let out = run_bounded(&mut cmd, Duration::from_secs(5));
    let text = match &out {
        Ok(out) => out.stderr.clone(),
        Err(e) => e.to_string(),
    };
    assert!(!text.contains("cannot run on this host"), "{text}");
}

#[test]
fn a_cgroup_or_pins_path_in_the_wrong_place_is_named() {
    let _serial = serial();
    let setup = Setup::new("start-paths");
    let not_cgroup = setup.dir.path().join("not-a-cgroup");
    std::fs::create_dir_all(&not_cgroup).unwrap();
    let not_cgroup = not_cgroup.display().to_string();
    let mut cmd = Command::new(mesh_bin());
    cmd.args(setup.args(Some(&not_cgroup), None));
    let message = refused(&setup, &mut cmd);
    assert!(
        message.contains(&format!(
            "cgroup v2 at [agent] cgroup {not_cgroup}: it is not below a cgroup2 mount"
        )),
        "{message}"
    );

    let missing = format!("{}/absent", setup.cgroup.path().display());
    let mut cmd = Command::new(mesh_bin());
    cmd.args(setup.args(Some(&missing), None));
    let message = refused(&setup, &mut cmd);
    assert!(
        message.contains(&format!(
            "the cgroup [agent] cgroup {missing}: it does not exist"
        )),
        "{message}"
    );

    let pins = setup.dir.path().join("pins").display().to_string();
    let mut cmd = Command::new(mesh_bin());
    cmd.args(setup.args(None, Some(&pins)));
    let message = refused(&setup, &mut cmd);
    assert!(
        message.contains(&format!("a bpf filesystem at [agent] bpffs {pins}")),
        "{message}"
    );
}
