//! Running `mesh agent` from the container image the way the DaemonSet runs it
//! (deploy/kubernetes/daemonset.yaml), with podman, for the tests in `tests/tests/deploy.rs`.
//!
//! The container gets what the DaemonSet's pod gets: the host's network (`--network host`),
//! all capabilities dropped and only the listed ones added, podman's default seccomp profile
//! (what Kubernetes' `RuntimeDefault` is), a read-only root filesystem, the host's bpffs at
//! /sys/fs/bpf and the host's cgroup v2 mount at /run/mesh/cgroupv2 (read-only). Unlike the
//! DaemonSet it attaches to a cgroup the test created (`--cgroup
//! /run/mesh/cgroupv2/<test cgroup>`), pins into the test's bpffs directory and serves metrics
//! on a free loopback port: the rules for privileged tests.

use std::ffi::OsString;
use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::agent::strip_ansi;
use crate::cgroup::cgroup2_mount;
use crate::process::{run_bounded, send_signal, wait_bounded};
use crate::{BpffsDir, CgroupGuard};

/// Where the DaemonSet mounts the host's cgroup v2 root (the ConfigMap's `[agent] cgroup`).
pub const CGROUP2_IN_POD: &str = "/run/mesh/cgroupv2";
/// How long `podman rm -f` of a left-over container may take.
const RM_TIMEOUT: Duration = Duration::from_secs(30);

/// The image to test: `$MESH_TEST_IMAGE` (set by `cargo xtask test` when podman is installed
/// and the image was built). `None` with the reason printed when it is not set.
pub fn test_image() -> Option<String> {
    match std::env::var("MESH_TEST_IMAGE") {
        Ok(image) if !image.is_empty() => Some(image),
        _ => {
            // Written to the stderr handle, not with `eprintln!`: libtest captures the macros'
            // output of passing tests, and a skip must always say why.
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: MESH_TEST_IMAGE is not set, so there is no container image to test \
                 (`cargo xtask test` sets it after building the image when podman is installed; \
                 `cargo xtask image` installs podman and builds localhost/mesh:dev)"
            );
            None
        }
    }
}

/// One `podman run` of the image's `mesh agent`.
pub struct ContainerAgent {
    child: Child,
    exit_status: Option<ExitStatus>,
    name: String,
    dir: PathBuf,
    log_path: PathBuf,
    metrics_addr: SocketAddr,
    started: Instant,
}

/// What a container run gets.
pub struct ContainerSpec<'a> {
    pub image: &'a str,
    /// Capability names without `CAP_` (as in the DaemonSet), e.g. `["BPF", "NET_ADMIN"]`.
    pub caps: &'a [String],
    /// The agent's config file (mounted read-only at /etc/mesh/mesh.toml).
    pub config_toml: &'a str,
    /// A kubeconfig for `$KUBECONFIG` (mounted at /etc/mesh/kubeconfig), if any.
    pub kubeconfig: Option<&'a str>,
    pub cgroup: &'a CgroupGuard,
    pub bpffs: &'a BpffsDir,
    /// Run without podman's default seccomp profile (to see what the kernel alone asks for).
    pub seccomp_unconfined: bool,
}

impl ContainerAgent {
    /// Starts `podman run` in the background; its output (the agent's) goes to a log file.
    pub fn spawn(spec: &ContainerSpec<'_>) -> ContainerAgent {
        crate::require_root();
        let name = crate::unique_name("deploy-ctr");
        let dir = std::env::temp_dir().join(&name);
        let etc = dir.join("etc");
        let state = dir.join("state");
        let admin = dir.join("admin");
        for d in [&etc, &state, &admin] {
            std::fs::create_dir_all(d)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", d.display()));
        }
        std::fs::write(etc.join("mesh.toml"), spec.config_toml).expect("write mesh.toml");
        if let Some(kubeconfig) = spec.kubeconfig {
            std::fs::write(etc.join("kubeconfig"), kubeconfig).expect("write kubeconfig");
        }
        let log_path = dir.join("agent.log");
        let metrics_addr = free_loopback_port();
        let cgroup_in_pod = Path::new(CGROUP2_IN_POD).join(spec.cgroup.name());

        let mut args: Vec<OsString> = vec![
            "--runtime".into(),
            "runc".into(),
            "run".into(),
            "--rm".into(),
            "--name".into(),
            name.clone().into(),
            "--cgroup-manager=cgroupfs".into(),
            "--network".into(),
            "host".into(),
            "--read-only".into(),
            "--cap-drop=all".into(),
        ];
        args.extend(ulimit_args().into_iter().map(OsString::from));
        if spec.seccomp_unconfined {
            args.extend(["--security-opt", "seccomp=unconfined"].map(OsString::from));
        }
        if !spec.caps.is_empty() {
            let caps: Vec<String> = spec.caps.iter().map(|c| format!("CAP_{c}")).collect();
            args.push(format!("--cap-add={}", caps.join(",")).into());
        }
        let volumes = [
            ("/sys/fs/bpf".into(), "/sys/fs/bpf".into(), ""),
            (cgroup2_mount(), PathBuf::from(CGROUP2_IN_POD), ":ro"),
            (etc, PathBuf::from("/etc/mesh"), ":ro"),
            (state, PathBuf::from("/var/lib/mesh"), ""),
            (admin, PathBuf::from("/run/mesh/admin"), ""),
        ];
        for (host, inside, mode) in volumes {
            args.push("-v".into());
            args.push(format!("{}:{}{mode}", host.display(), inside.display()).into());
        }
        args.extend(
            [
                "-e",
                "NODE_NAME=mesh-test-node",
                "-e",
                "RUST_LOG=info",
                "-e",
                "NO_COLOR=1",
            ]
            .map(OsString::from),
        );
        if spec.kubeconfig.is_some() {
            args.extend(["-e", "KUBECONFIG=/etc/mesh/kubeconfig"].map(OsString::from));
        }
        args.push(spec.image.into());
        args.extend(["agent", "--config", "/etc/mesh/mesh.toml", "--bpffs"].map(OsString::from));
        args.push(spec.bpffs.path().into());
        args.push("--cgroup".into());
        args.push(cgroup_in_pod.into());
        args.push("--metrics".into());
        args.push(metrics_addr.to_string().into());

        let log = File::create(&log_path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", log_path.display()));
        let log_err = log.try_clone().expect("clone the log file handle");
        std::fs::write(
            dir.join("podman-args"),
            args.iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" "),
        )
        .expect("write podman-args");
        let mut cmd = Command::new("podman");
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        // SAFETY: prctl is async-signal-safe; the closure allocates nothing. If the test dies
        // without running Drop, podman gets SIGTERM and passes it to the agent (sig-proxy).
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start podman: {e}"));
        ContainerAgent {
            child,
            exit_status: None,
            name,
            dir,
            log_path,
            metrics_addr,
            started: Instant::now(),
        }
    }

    /// Waits until `/readyz` answers 200. `Err` (with the reason and log) if the container
    /// exits first or is not ready within `timeout`.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<Duration, String> {
        loop {
            if let Some(status) = self.try_exit_status() {
                return Err(format!(
                    "the container exited with {status} before it was ready; log:\n{}",
                    self.log_text()
                ));
            }
            let last = match crate::http::get(self.metrics_addr, "/readyz", Duration::from_secs(1))
            {
                Ok(response) if response.status == 200 => return Ok(self.started.elapsed()),
                Ok(response) => format!("HTTP {}: {}", response.status, response.body),
                Err(e) => e.to_string(),
            };
            if self.started.elapsed() >= timeout {
                return Err(format!(
                    "not ready within {timeout:?} (last /readyz: {last}); log:\n{}",
                    self.log_text()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits up to `timeout` for the container to exit by itself; its status, or `None` if it
    /// still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.exit_status.is_none() {
            self.exit_status = wait_bounded(&mut self.child, timeout);
        }
        self.exit_status
    }

    /// The exit status if the container has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.try_exit_status()
    }

    /// Replaces the config file atomically (as kubelet swaps a ConfigMap volume's files); the
    /// container sees the directory, so the agent's file watcher notices.
    pub fn write_config(&self, config_toml: &str) {
        let etc = self.dir.join("etc");
        let tmp = etc.join(format!(".mesh.toml.tmp-{}", crate::next_unique()));
        std::fs::write(&tmp, config_toml)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", tmp.display()));
        std::fs::rename(&tmp, etc.join("mesh.toml")).expect("rename over mesh.toml");
    }

    /// Since `podman run` started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// SIGTERM to `podman run`, which passes it to the agent (as kubelet stops a pod); waits
    /// up to `timeout`. The exit status, or `None` if it still runs.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.try_exit_status() {
            return Some(status);
        }
        send_signal(self.child.id(), libc::SIGTERM);
        self.wait_exit(timeout)
    }

    fn try_exit_status(&mut self) -> Option<ExitStatus> {
        if self.exit_status.is_none() {
            self.exit_status = self.child.try_wait().expect("try_wait on podman");
        }
        self.exit_status
    }

    /// Everything the container (and podman) printed so far.
    pub fn log_text(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.log_path).unwrap_or_default())
    }
}

impl Drop for ContainerAgent {
    fn drop(&mut self) {
        if self.terminate(Duration::from_secs(10)).is_none() {
            eprintln!(
                "harness: container {} ignored SIGTERM; podman rm -f",
                self.name
            );
            let mut rm = Command::new("podman");
            rm.args(["rm", "-f", "-t", "0", &self.name]);
            if let Err(e) = run_bounded(&mut rm, RM_TIMEOUT) {
                eprintln!("harness: podman rm -f {}: {e}", self.name);
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "===== container {} log (kept in {}) =====\n{}\n===== end of container log =====",
                self.name,
                self.dir.display(),
                self.log_text()
            );
        } else if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("harness: could not remove {}: {e}", self.dir.display());
        }
    }
}

/// `--ulimit` arguments that need no CAP_SYS_RESOURCE (this sandbox has none): podman's
/// default nofile (1048576) is above the hard limit and runc cannot raise it. nofile: this
/// process's limits; nproc: podman's default 32768 or lower.
fn ulimit_args() -> Vec<String> {
    let limit = |resource| {
        let mut rlim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct we pass; no other memory is touched.
        let ok = unsafe { libc::getrlimit(resource, &mut rlim) } == 0;
        ok.then_some((rlim.rlim_cur, rlim.rlim_max))
    };
    let mut args = Vec::new();
    if let Some((soft, hard)) = limit(libc::RLIMIT_NOFILE) {
        args.extend(["--ulimit".to_owned(), format!("nofile={soft}:{hard}")]);
    }
    if let Some((soft, hard)) = limit(libc::RLIMIT_NPROC) {
        let (soft, hard) = (soft.min(32_768), hard.min(32_768));
        args.extend(["--ulimit".to_owned(), format!("nproc={soft}:{hard}")]);
    }
    args
}

/// A loopback address with a port that was free a moment ago.
fn free_loopback_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral loopback port");
    listener.local_addr().expect("local address")
}

/// `deploy/kubernetes/<file>` as text.
pub fn manifest(file: &str) -> String {
    let path = crate::workspace_root().join("deploy/kubernetes").join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The text of the block scalar `key: |` in a YAML document (dedented), e.g. the ConfigMap's
/// `mesh.toml`. Enough YAML for our own manifests: a literal block under a plain key.
pub fn yaml_block(yaml: &str, key: &str) -> Option<String> {
    let mut lines = yaml.lines();
    let header = format!("{key}: |");
    let indent = lines.by_ref().find_map(|line| {
        (line.trim_start() == header).then(|| line.len() - line.trim_start().len())
    })?;
    let mut block = Vec::new();
    let mut body_indent = None;
    for line in lines {
        if line.trim().is_empty() {
            block.push("");
            continue;
        }
        let this = line.len() - line.trim_start().len();
        if this <= indent {
            break;
        }
        let body = *body_indent.get_or_insert(this);
        block.push(line.get(body..).unwrap_or(line.trim_start()));
    }
    while block.last() == Some(&"") {
        block.pop();
    }
    Some(block.join("\n") + "\n")
}

/// The `capabilities: add:` list of the DaemonSet's `mesh` container (the init container is
/// privileged and lists none), in order.
pub fn yaml_capabilities_add(yaml: &str) -> Vec<String> {
    let mut lines = yaml
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .skip_while(|l| *l != "capabilities:");
    lines.next();
    let mut lines = lines.skip_while(|l| *l != "add:");
    lines.next();
    lines
        .take_while(|l| l.starts_with("- "))
        .map(|l| l.trim_start_matches("- ").trim().to_owned())
        .collect()
}

/// The script of the first `command: [/bin/sh, -c, SCRIPT]` in a manifest (the DaemonSet's
/// init container), with YAML's single quotes undone.
pub fn yaml_shell_script(yaml: &str) -> Option<String> {
    let mut lines = yaml
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .skip_while(|l| *l != "- -c");
    lines.next();
    let script = lines.next()?.strip_prefix("- ")?;
    Some(
        match script.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')) {
            Some(quoted) => quoted.replace("''", "'"),
            None => script.to_owned(),
        },
    )
}

/// `podman run --privileged` of `script` with `host_dir` as the container's /sys/fs/bpf
/// (`rshared`, as the DaemonSet's `Bidirectional`), as the init container runs.
pub fn run_init_script(image: &str, script: &str, host_dir: &Path) -> crate::process::Captured {
    let mut cmd = Command::new("podman");
    cmd.args([
        "--runtime",
        "runc",
        "run",
        "--rm",
        "--cgroup-manager=cgroupfs",
    ])
    .args(ulimit_args())
    .args(["--network", "none", "--privileged", "-v"])
    .arg(format!("{}:/sys/fs/bpf:rshared", host_dir.display()))
    .args(["--entrypoint", "/bin/sh", image, "-c", script]);
    run_bounded(&mut cmd, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("podman run of the init container script: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = "\
data:
  # KEY: x
  mesh.toml: |
    [agent]
    bpffs = \"/sys/fs/bpf/mesh\"

    [agent.kubernetes]
      nested = 1
other: 2
spec:
  securityContext:
    capabilities:
      drop: [\"ALL\"]
      add:
        - BPF   # comment
        - NET_ADMIN
    seccompProfile:
      type: RuntimeDefault
";

    #[test]
    fn reads_a_block_scalar() {
        assert_eq!(
            yaml_block(YAML, "mesh.toml").as_deref(),
            Some("[agent]\nbpffs = \"/sys/fs/bpf/mesh\"\n\n[agent.kubernetes]\n  nested = 1\n")
        );
        assert_eq!(yaml_block(YAML, "missing"), None);
    }

    #[test]
    fn reads_the_init_script() {
        let yaml = r#"command:
  - /bin/sh
  - -c
  # why
  - '[ "$(x)" = y ] || echo ''z'''
"#;
        assert_eq!(
            yaml_shell_script(yaml).as_deref(),
            Some(r#"[ "$(x)" = y ] || echo 'z'"#)
        );
        assert_eq!(yaml_shell_script("a: 1\n"), None);
    }

    #[test]
    fn reads_added_capabilities() {
        assert_eq!(yaml_capabilities_add(YAML), vec!["BPF", "NET_ADMIN"]);
        assert!(yaml_capabilities_add("a: 1\n").is_empty());
    }
}
