//! Network namespaces owned by one test, and `mesh-probe` backends running as processes (inside
//! such a namespace, or in the host's).
//!
//! A test that needs addresses other than 127.0.0.0/8 (IPv6 VIPs and backends, say) creates a
//! [`NetNs`], gives its `lo` the addresses it needs, and runs both the backends
//! ([`ProbeServer`]) and the clients ([`NetNs::run_probe_in`]) inside it. Traffic to those
//! addresses never leaves the namespace.

use std::ffi::OsStr;
use std::io::BufRead;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::CgroupGuard;
use crate::probe::{ProbeResult, ProbeSummary, run_probe_command};
use crate::process::{run_bounded, send_signal, wait_bounded};

/// How long an `ip` command may take.
const IP_TIMEOUT: Duration = Duration::from_secs(10);

/// A network namespace `mesh-test-<tag>-<pid>-<n>` (`ip netns add`), with `lo` up.
///
/// Drop SIGKILLs whatever still runs in it (only the test's own children can) and deletes it.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates the namespace and brings its loopback up. Panics with the reason on failure.
    pub fn new(tag: &str) -> NetNs {
        crate::require_root();
        let name = crate::unique_name(tag);
        ip(&["netns", "add", &name]);
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n <ns> <args>`; panics with its output if it fails.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// A veth pair: `local` in this namespace, `remote` in `other`. Deleting either namespace
    /// deletes both ends.
    pub fn add_veth(&self, local: &str, other: &NetNs, remote: &str) {
        assert!(local.len() <= 15, "interface name {local} too long");
        self.ip(&[
            "link",
            "add",
            local,
            "type",
            "veth",
            "peer",
            "name",
            remote,
            "netns",
            other.name(),
        ]);
    }

    /// Adds `addr` (e.g. `fd00:100::1/128`) to the namespace's `lo`. IPv6 addresses skip
    /// duplicate address detection, so they are usable at once.
    pub fn add_lo_addr(&self, addr: &str) {
        if addr.contains(':') {
            self.ip(&["-6", "addr", "add", addr, "dev", "lo", "nodad"]);
        } else {
            self.ip(&["addr", "add", addr, "dev", "lo"]);
        }
    }

    /// `ip netns exec <ns> <program>`: a command that runs `program` inside the namespace.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `mesh-probe <args>` inside this namespace and inside `cgroup` (so mesh's programs
    /// see its sockets), bounded by `timeout`. Panics if it fails or ran in another cgroup.
    pub fn run_probe_in<I, S>(
        &self,
        cgroup: &CgroupGuard,
        args: I,
        timeout: Duration,
    ) -> ProbeResult
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command(crate::probe_bin());
        cmd.args(args);
        run_probe_command(&mut cmd, Some(cgroup), timeout)
    }

    /// [`NetNs::run_probe_in`] for a probe that prints a summary; parses it.
    pub fn probe_summary_in<I, S>(
        &self,
        cgroup: &CgroupGuard,
        args: I,
        timeout: Duration,
    ) -> ProbeSummary
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let result = self.run_probe_in(cgroup, args, timeout);
        ProbeSummary::parse(&result.stdout)
            .unwrap_or_else(|e| panic!("{e}; stderr:\n{}", result.stderr))
    }

    /// Pids of the processes in the namespace (`ip netns pids`).
    pub fn pids(&self) -> Vec<u32> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "pids", &self.name]);
        match run_bounded(&mut cmd, IP_TIMEOUT) {
            Ok(out) if out.status.success() => crate::cgroup::parse_pids(&out.stdout),
            _ => Vec::new(),
        }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Only the test's own children can be in a namespace it created.
        let emptied = crate::wait_until(Duration::from_secs(5), || {
            let pids = self.pids();
            for pid in &pids {
                if *pid != std::process::id() {
                    send_signal(*pid, libc::SIGKILL);
                }
            }
            pids.is_empty()
        });
        if !emptied {
            eprintln!(
                "harness: netns {} still has processes {:?}",
                self.name,
                self.pids()
            );
        }
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "del", &self.name]);
        match run_bounded(&mut cmd, IP_TIMEOUT) {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "harness: `ip netns del {}` failed: {}",
                self.name,
                out.describe()
            ),
            Err(e) => eprintln!("harness: `ip netns del {}`: {e}", self.name),
        }
    }
}

impl NetNs {
    /// Where `ip netns` keeps the namespace (open it and `setns` to enter it).
    pub fn path(&self) -> std::path::PathBuf {
        std::path::PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs `f` on a thread of its own that has entered this namespace (a network namespace
    /// is per thread), and returns its result: sockets `f` creates live in the namespace.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = self.path();
        std::thread::scope(|s| {
            s.spawn(move || {
                enter_netns(&path);
                f()
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }

    /// Runs `sysctl -w <setting>` inside the namespace.
    pub fn sysctl(&self, setting: &str) {
        let mut cmd = self.command("sysctl");
        cmd.args(["-q", "-w", setting]);
        let out = run_bounded(&mut cmd, IP_TIMEOUT).unwrap_or_else(|e| panic!("sysctl: {e}"));
        assert!(
            out.status.success(),
            "sysctl -w {setting}: {}",
            out.describe()
        );
    }
}

/// Moves the calling thread into the network namespace pinned at `path`; panics on failure.
pub fn enter_netns(path: &std::path::Path) {
    use std::os::fd::AsRawFd as _;
    let file =
        std::fs::File::open(path).unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    // SAFETY: a valid namespace fd; only the calling thread changes namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "setns {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// Runs `ip <args>`; panics with its output if it fails.
fn ip(args: &[&str]) -> String {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    let out = run_bounded(&mut cmd, IP_TIMEOUT).unwrap_or_else(|e| panic!("`ip {args:?}`: {e}"));
    assert!(
        out.status.success(),
        "`ip {}` failed: {}",
        args.join(" "),
        out.describe()
    );
    out.stdout
}

/// Which kind of backend a [`ProbeServer`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerKind {
    Tcp,
    Udp,
}

/// A `mesh-probe serve-tcp|serve-udp` backend process, in a [`NetNs`] or in the host's
/// namespace. It answers with its name (as [`crate::TcpBackend`] / [`crate::UdpBackend`] do),
/// runs outside any test cgroup, exits by itself after its time bound, and is killed on Drop.
pub struct ProbeServer {
    child: Child,
    name: String,
    addr: SocketAddr,
    kind: ServerKind,
}

/// How long a [`ProbeServer`] runs at most (it is normally killed well before).
pub const SERVER_MAX: Duration = Duration::from_secs(300);

impl ProbeServer {
    /// Starts a backend on `addr` named `name` inside `netns` (or in the host namespace), and
    /// waits (10 s) until it listens. Host-namespace backends must use 127.0.0.0/8.
    pub fn start(netns: Option<&NetNs>, kind: ServerKind, name: &str, addr: SocketAddr) -> Self {
        ProbeServer::start_for(netns, kind, name, addr, SERVER_MAX)
    }

    /// [`ProbeServer::start`] with a time bound other than [`SERVER_MAX`] (for runs longer
    /// than it).
    pub fn start_for(
        netns: Option<&NetNs>,
        kind: ServerKind,
        name: &str,
        addr: SocketAddr,
        max: Duration,
    ) -> Self {
        assert!(
            netns.is_some() || addr.ip().is_loopback(),
            "backends in the host namespace listen only on loopback, not {addr}"
        );
        assert!(
            !name.contains('\n') && !name.starts_with("ERR") && !name.contains(" from "),
            "backend name {name:?} would be ambiguous in mesh-probe output"
        );
        let mode = match kind {
            ServerKind::Tcp => "serve-tcp",
            ServerKind::Udp => "serve-udp",
        };
        let mut cmd = match netns {
            Some(ns) => ns.command(crate::probe_bin()),
            None => Command::new(crate::probe_bin()),
        };
        cmd.args([mode, "--addr", &addr.to_string(), "--name", name])
            .args(["--max-ms", &max.as_millis().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: prctl is async-signal-safe and the closure allocates nothing. If the test
        // process dies without running Drop, the backend dies with it.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let mut stderr_pipe = child.stderr.take().expect("piped stderr");
        // Drained so the server never blocks on it; shown if it does not get ready.
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut stderr_pipe, &mut text);
            text
        });
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = std::io::BufReader::new(stdout).lines();
            if let Some(Ok(first)) = lines.next() {
                let _ = tx.send(first);
            }
            // Keep draining so the server never blocks on a full pipe.
            for _ in lines {}
        });
        let mut server = ProbeServer {
            child,
            name: name.to_owned(),
            addr,
            kind,
        };
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(line) => {
                let bound = line
                    .strip_prefix("ready ")
                    .and_then(|a| a.parse::<SocketAddr>().ok())
                    .unwrap_or_else(|| panic!("{mode} {name} on {addr} said {line:?}"));
                server.addr = bound;
            }
            Err(_) => {
                // Kill it so its stderr ends, then show what it said.
                send_signal(server.child.id(), libc::SIGKILL);
                let _ = wait_bounded(&mut server.child, Duration::from_secs(5));
                let said = stderr.join().unwrap_or_default();
                panic!("{mode} {name} on {addr} did not get ready within 10 s; stderr:\n{said}")
            }
        }
        server
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn kind(&self) -> ServerKind {
        self.kind
    }
}

impl Drop for ProbeServer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            send_signal(self.child.id(), libc::SIGKILL);
        }
        if wait_bounded(&mut self.child, Duration::from_secs(5)).is_none() {
            eprintln!(
                "harness: backend {} (pid {}) did not exit after SIGKILL",
                self.name,
                self.child.id()
            );
        }
    }
}

impl std::fmt::Debug for ProbeServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProbeServer")
            .field("name", &self.name)
            .field("addr", &self.addr)
            .field("kind", &self.kind)
            .field("pid", &self.child.id())
            .finish()
    }
}
