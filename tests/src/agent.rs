//! Running `mesh agent` for one test.

use std::ffi::OsString;
use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::process::{send_signal, wait_bounded};
use crate::{BpffsDir, CgroupGuard};

/// How long the agent gets to answer `/readyz` with 200.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the agent gets to exit after SIGTERM before it is SIGKILLed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// The agent's log filter.
pub const RUST_LOG: &str = "info,mesh=debug";

/// A running `mesh agent --config <file> --cgroup <cgroup> --bpffs <dir> --metrics <addr>`.
///
/// The config lives in a private temp directory (edit it with [`Agent::write_config`]); stdout
/// and stderr go to a log file there ([`Agent::log_text`]). Drop sends SIGTERM, waits (bounded)
/// and SIGKILLs if needed. When the test is panicking, Drop prints the agent's log and keeps the
/// directory for inspection.
pub struct Agent {
    child: Child,
    /// The `mesh` binary [`Agent::restart`] runs (see [`Agent::set_binary`]).
    bin: PathBuf,
    exit_status: Option<ExitStatus>,
    args: Vec<OsString>,
    env: Vec<EnvChange>,
    dir: PathBuf,
    config_path: PathBuf,
    log_path: PathBuf,
    metrics_addr: SocketAddr,
    admin_socket: PathBuf,
    /// The network namespace the agent runs in (`/run/netns/<name>`), if not the test's.
    netns: Option<PathBuf>,
}

impl Agent {
    /// Writes `config_toml`, starts the agent and waits until `/readyz` answers 200.
    /// Panics (with the agent's log) if it exits first or is not ready within 20 s.
    pub fn start(config_toml: &str, cgroup: &CgroupGuard, bpffs: &BpffsDir) -> Agent {
        Agent::start_with_args(config_toml, cgroup, bpffs, &[])
    }

    /// [`Agent::start`] with extra `mesh agent` arguments appended.
    pub fn start_with_args(
        config_toml: &str,
        cgroup: &CgroupGuard,
        bpffs: &BpffsDir,
        extra_args: &[&str],
    ) -> Agent {
        Agent::start_with_env(config_toml, cgroup, bpffs, extra_args, &[])
    }

    /// [`Agent::start_with_args`] with changes to the agent's environment, applied after the
    /// harness defaults (`RUST_LOG`, `NO_COLOR=1`, `RUST_BACKTRACE`): `(name, Some(value))` sets
    /// a variable, `(name, None)` removes it. Kept for [`Agent::restart`].
    pub fn start_with_env(
        config_toml: &str,
        cgroup: &CgroupGuard,
        bpffs: &BpffsDir,
        extra_args: &[&str],
        env: &[(&str, Option<&str>)],
    ) -> Agent {
        let mut agent = Agent::spawn(config_toml, cgroup, bpffs, extra_args, env);
        // On panic, `agent` drops: the process is stopped and its log printed.
        agent.wait_ready(READY_TIMEOUT);
        agent
    }

    /// [`Agent::start_with_env`] without waiting for `/readyz`.
    pub fn spawn(
        config_toml: &str,
        cgroup: &CgroupGuard,
        bpffs: &BpffsDir,
        extra_args: &[&str],
        env: &[(&str, Option<&str>)],
    ) -> Agent {
        Agent::spawn_with(config_toml, cgroup, bpffs, extra_args, env, None)
    }

    fn spawn_with(
        config_toml: &str,
        cgroup: &CgroupGuard,
        bpffs: &BpffsDir,
        extra_args: &[&str],
        env: &[(&str, Option<&str>)],
        netns: Option<PathBuf>,
    ) -> Agent {
        crate::require_root();
        let dir =
            std::env::temp_dir().join(format!("{}-agent-{}", cgroup.name(), crate::next_unique()));
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let config_path = dir.join("mesh.toml");
        let log_path = dir.join("agent.log");
        std::fs::write(&config_path, config_toml)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", config_path.display()));
        let metrics_addr = free_loopback_port();

        let mut args: Vec<OsString> = vec![
            "agent".into(),
            "--config".into(),
            config_path.clone().into(),
            "--cgroup".into(),
            cgroup.path().into(),
            "--bpffs".into(),
            bpffs.path().into(),
            "--metrics".into(),
            metrics_addr.to_string().into(),
        ];
        // Every agent gets its own admin socket and (unless the test names one) state
        // directory, never the machine's /run/mesh and /var/lib/mesh.
        let admin_socket = dir.join("admin.sock");
        if !extra_args.contains(&"--admin-socket") {
            args.extend(["--admin-socket".into(), admin_socket.clone().into()]);
        }
        if !config_toml.contains("state_dir") && !extra_args.contains(&"--state-dir") {
            args.extend(["--state-dir".into(), dir.join("state").into()]);
        }
        args.extend(extra_args.iter().map(OsString::from));
        let env: Vec<EnvChange> = env
            .iter()
            .map(|(name, value)| ((*name).to_owned(), value.map(str::to_owned)))
            .collect();

        let bin = crate::mesh_bin();
        let child = spawn(&bin, &args, &env, &log_path, netns.as_deref());
        Agent {
            child,
            bin,
            exit_status: None,
            args,
            env,
            dir,
            config_path,
            log_path,
            metrics_addr,
            admin_socket,
            netns,
        }
    }

    /// [`Agent::start`] inside the network namespace `netns` (only the network namespace is
    /// entered, so the agent still sees the host's bpffs and cgroup mounts); its metrics
    /// address is that namespace's loopback, reached by the harness from inside it.
    pub fn start_in_netns(
        config_toml: &str,
        cgroup: &CgroupGuard,
        bpffs: &BpffsDir,
        netns: &crate::NetNs,
    ) -> Agent {
        let mut agent = Agent::spawn_with(config_toml, cgroup, bpffs, &[], &[], Some(netns.path()));
        agent.wait_ready(READY_TIMEOUT);
        agent
    }

    /// GET `path` on the metrics address, from the agent's network namespace.
    fn get(&self, path: &str, timeout: Duration) -> std::io::Result<crate::http::Response> {
        let addr = self.metrics_addr;
        match &self.netns {
            None => crate::http::get(addr, path, timeout),
            Some(ns) => std::thread::scope(|s| {
                s.spawn(|| {
                    crate::netns::enter_netns(ns);
                    crate::http::get_here(addr, path, timeout)
                })
                .join()
                .expect("metrics request thread")
            }),
        }
    }

    /// Waits until `/readyz` answers 200; panics (with the log) if the agent exits first or
    /// is not ready within `timeout`.
    pub fn wait_ready(&mut self, timeout: Duration) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.try_exit_status() {
                panic!(
                    "mesh agent exited with {status} before it was ready (after {:?}); log:\n{}",
                    start.elapsed(),
                    self.log_text()
                );
            }
            let last = match self.get("/readyz", Duration::from_secs(1)) {
                Ok(response) if response.status == 200 => return,
                Ok(response) => format!("HTTP {}: {}", response.status, response.body),
                Err(e) => e.to_string(),
            };
            if start.elapsed() >= timeout {
                panic!(
                    "mesh agent was not ready within {timeout:?} (last /readyz: {last}); log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Where `/metrics`, `/readyz` and `/healthz` are served.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// The admin API's Unix socket the harness gave this agent (`--admin-socket`).
    pub fn admin_socket(&self) -> &Path {
        &self.admin_socket
    }

    /// The admin API on [`Agent::admin_socket`].
    pub fn admin(&self) -> crate::admin::AdminApi {
        crate::admin::AdminApi::socket(&self.admin_socket)
    }

    /// The agent's private directory (config, log, admin socket).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Replaces the config file atomically (write a temp file in the same directory, rename it
    /// over the config), as editors and config management tools do. The agent must notice a
    /// file replaced by rename, not only writes to the same inode.
    pub fn write_config(&self, config_toml: &str) {
        let tmp = self
            .dir
            .join(format!(".mesh.toml.tmp-{}", crate::next_unique()));
        std::fs::write(&tmp, config_toml)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", tmp.display()));
        std::fs::rename(&tmp, &self.config_path)
            .unwrap_or_else(|e| panic!("cannot rename over {}: {e}", self.config_path.display()));
    }

    /// Rewrites the config file in place (truncate + write on the same inode).
    pub fn write_config_in_place(&self, config_toml: &str) {
        std::fs::write(&self.config_path, config_toml)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", self.config_path.display()));
    }

    /// Everything the agent printed so far (stdout and stderr), ANSI colours stripped.
    pub fn log_text(&self) -> String {
        self.log_since(0)
    }

    /// Current length of the log, to pass to [`Agent::log_since`] later.
    pub fn log_mark(&self) -> usize {
        std::fs::metadata(&self.log_path)
            .map(|m| usize::try_from(m.len()).unwrap_or(usize::MAX))
            .unwrap_or(0)
    }

    /// What the agent printed after `mark` (from [`Agent::log_mark`]), ANSI colours stripped.
    pub fn log_since(&self, mark: usize) -> String {
        let raw = std::fs::read(&self.log_path).unwrap_or_default();
        let tail = raw.get(mark..).unwrap_or_default();
        strip_ansi(&String::from_utf8_lossy(tail))
    }

    /// Waits (bounded) for a log line after `mark` that satisfies `matches`; returns the first.
    pub fn wait_for_log_line(
        &self,
        mark: usize,
        timeout: Duration,
        mut matches: impl FnMut(&str) -> bool,
    ) -> Option<String> {
        let mut found = None;
        crate::wait_until(timeout, || {
            found = self
                .log_since(mark)
                .lines()
                .find(|line| matches(line))
                .map(str::to_owned);
            found.is_some()
        });
        found
    }

    /// GET `path` on the metrics address.
    pub fn http_get(&self, path: &str) -> std::io::Result<crate::http::Response> {
        self.get(path, Duration::from_secs(5))
    }

    /// The `/metrics` text; panics unless it answers 200.
    pub fn metrics_text(&self) -> String {
        let response = self
            .http_get("/metrics")
            .unwrap_or_else(|e| panic!("GET /metrics: {e}"));
        assert_eq!(response.status, 200, "GET /metrics: {}", response.body);
        response.body
    }

    /// The exit status if the agent has exited (reaps it).
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        if self.exit_status.is_none() {
            self.exit_status = self.child.try_wait().expect("try_wait on the agent");
        }
        self.exit_status
    }

    pub fn is_running(&mut self) -> bool {
        self.try_exit_status().is_none()
    }

    /// Sends SIGTERM and waits up to `timeout` for the agent to exit. Returns its exit status,
    /// or None if it is still running.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.try_exit_status() {
            return Some(status);
        }
        send_signal(self.pid(), libc::SIGTERM);
        self.exit_status = wait_bounded(&mut self.child, timeout);
        self.exit_status
    }

    /// SIGKILLs the agent (it gets no chance to clean up) and reaps it.
    pub fn kill9(&mut self) {
        if self.try_exit_status().is_none() {
            send_signal(self.pid(), libc::SIGKILL);
            self.exit_status = Some(self.child.wait().expect("wait for the killed agent"));
        }
    }

    /// Stops the agent (SIGTERM, SIGKILL after 10 s) if it runs, then starts it again with the
    /// same arguments, config file, metrics address and log file, and waits for `/readyz`.
    pub fn restart(&mut self) {
        self.stop_or_kill();
        self.child = spawn(
            &self.bin,
            &self.args,
            &self.env,
            &self.log_path,
            self.netns.as_deref(),
        );
        self.exit_status = None;
        self.wait_ready(READY_TIMEOUT);
    }

    /// The `mesh` binary the next [`Agent::restart`] runs, as an in-place upgrade installs a new
    /// file and starts it on the same pins.
    pub fn set_binary(&mut self, bin: impl Into<PathBuf>) {
        self.bin = bin.into();
    }

    /// The `mesh` binary the agent runs (or, after [`Agent::set_binary`], the next restart).
    pub fn binary(&self) -> &Path {
        &self.bin
    }

    fn stop_or_kill(&mut self) {
        if self.terminate(STOP_TIMEOUT).is_none() {
            eprintln!(
                "harness: mesh agent (pid {}) ignored SIGTERM for {STOP_TIMEOUT:?}; SIGKILL",
                self.pid()
            );
            self.kill9();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop_or_kill();
        if std::thread::panicking() {
            let log = self.log_text();
            let lines: Vec<&str> = log.lines().collect();
            let shown = &lines[lines.len().saturating_sub(400)..];
            eprintln!(
                "===== mesh agent log ({} lines, last {} shown; kept in {}) =====\n{}\n===== end of agent log =====",
                lines.len(),
                shown.len(),
                self.dir.display(),
                shown.join("\n")
            );
        } else if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("harness: could not remove {}: {e}", self.dir.display());
        }
    }
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("pid", &self.child.id())
            .field("metrics_addr", &self.metrics_addr)
            .field("config_path", &self.config_path)
            .finish_non_exhaustive()
    }
}

/// An environment change for the agent: set (`Some`) or remove (`None`) a variable.
type EnvChange = (String, Option<String>);

fn spawn(
    bin: &Path,
    args: &[OsString],
    env: &[EnvChange],
    log_path: &Path,
    netns: Option<&Path>,
) -> Child {
    let log = File::options()
        .create(true)
        .append(true)
        .open(log_path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", log_path.display()));
    let log_err = log.try_clone().expect("clone log file handle");
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .env("RUST_LOG", RUST_LOG)
        .env("NO_COLOR", "1")
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    for (name, value) in env {
        match value {
            Some(value) => cmd.env(name, value),
            None => cmd.env_remove(name),
        };
    }
    // Opened before the fork: the child only calls setns on it.
    let netns_fd = netns.map(|path| {
        File::open(path).unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()))
    });
    let netns_raw = netns_fd.as_ref().map(std::os::fd::AsRawFd::as_raw_fd);
    // SAFETY: prctl and setns are async-signal-safe; the closure allocates nothing. If the test
    // process dies without running Drop, the agent gets SIGTERM instead of running on.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(fd) = netns_raw
                && libc::setns(fd, libc::CLONE_NEWNET) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
        .unwrap_or_else(|e| panic!("cannot start {} {:?}: {e}", bin.display(), args))
}

/// A loopback address with a port that was free a moment ago.
fn free_loopback_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral loopback port");
    listener.local_addr().expect("local address")
}

/// Removes ANSI escape sequences (CSI `ESC [ ... final` and two-byte `ESC x`) from log text.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        // A CSI sequence runs to a final byte in 0x40..=0x7e; other escapes are two chars.
        if chars.next() == Some('[') {
            for c in chars.by_ref() {
                if ('\u{40}'..='\u{7e}').contains(&c) {
                    break;
                }
            }
        }
    }
    out
}

/// Whether a tracing-subscriber `fmt` line is at WARN or ERROR level.
pub fn is_warn_or_error(line: &str) -> bool {
    line.split_ascii_whitespace()
        .take(3)
        .any(|word| word == "WARN" || word == "ERROR")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_colour_codes() {
        let line = "\u{1b}[2m2026-11-24T12:00:00Z\u{1b}[0m \u{1b}[31mERROR\u{1b}[0m \
                    \u{1b}[2mmesh_user::config\u{1b}[0m\u{1b}[2m:\u{1b}[0m rejected \
                    \u{1b}[3mservice\u{1b}[0m\u{1b}[2m=\u{1b}[0mweb";
        assert_eq!(
            strip_ansi(line),
            "2026-11-24T12:00:00Z ERROR mesh_user::config: rejected service=web"
        );
        assert_eq!(strip_ansi("plain"), "plain");
    }

    #[test]
    fn recognises_warn_and_error_lines() {
        assert!(is_warn_or_error(
            "2026-11-24T12:00:00.1Z  WARN mesh_user::config: weight must be > 0"
        ));
        assert!(is_warn_or_error("2026-11-24T12:00:00.1Z ERROR mesh: x"));
        assert!(!is_warn_or_error(
            "2026-11-24T12:00:00.1Z DEBUG mesh: backend weight=1 ERROR"
        ));
        assert!(!is_warn_or_error(
            "2026-11-24T12:00:00.1Z  INFO mesh: applied"
        ));
    }
}
