//! Harness for mesh's privileged end-to-end tests.
//!
//! The tests run as root (through `cargo xtask test`) and touch only what they create:
//! - a cgroup v2 directory per test ([`CgroupGuard`]); only the test's own probe processes are
//!   moved into it, and the agent attaches its programs only there;
//! - a bpffs directory per test ([`BpffsDir`]) that the agent pins into and that is cleaned up
//!   with `mesh cleanup` afterwards;
//! - backends listening on 127.0.0.0/8 ([`TcpBackend`], [`UdpBackend`]) inside the test process;
//! - network namespaces ([`NetNs`]) with backends running inside them ([`ProbeServer`]), for
//!   addresses outside 127.0.0.0/8 (IPv6 VIPs and backends).
//!
//! Traffic goes only to 127.0.0.0/8 or to addresses inside a test's own network namespace.
//! Every wait and every load loop is bounded.
//!
//! Binaries: `$MESH_BIN` (the `mesh` CLI/agent) and `$MESH_PROBE_BIN` (this crate's
//! `mesh-probe`), set by `cargo xtask test`; see [`mesh_bin`] and [`probe_bin`] for fallbacks.

pub mod admin;
pub mod agent;
pub mod backend;
pub mod bpffs;
pub mod cgroup;
pub mod clients;
pub mod config;
pub mod container;
pub mod exchange;
pub mod http;
pub mod http_backend;
pub mod kube_api;
pub mod maps;
pub mod netns;
pub mod observe;
pub mod probe;
pub mod process;
pub mod prom;
pub mod redis;
pub mod services;
pub mod sockets;
pub mod tools;
pub mod two_nodes;
pub mod users;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

pub use agent::Agent;
pub use backend::{TcpBackend, UdpBackend};
pub use bpffs::BpffsDir;
pub use cgroup::CgroupGuard;
pub use clients::ClientLoop;
pub use config::{ORIGINAL_DST_ON, ServiceSpec, render_config};
pub use http_backend::{HealthReply, HttpBackend};
pub use netns::{NetNs, ProbeServer, ServerKind};
pub use probe::{
    ProbeLine, ProbeResult, ProbeSummary, assert_split, probe_connect_in, probe_summary_in,
    run_probe_in, run_probe_outside, spawn_probe_in,
};
pub use services::{
    BackendStatus, ServiceStatus, service_status, services, services_json, wait_for_backends,
};

/// The workspace root (this crate lives in `<workspace>/tests`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate has a parent directory")
        .to_path_buf()
}

/// Path of the `mesh` binary: `$MESH_BIN`, else `<workspace>/target/release/mesh`.
/// Panics with a clear message when it does not exist.
pub fn mesh_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let candidates = binary_candidates("MESH_BIN", "mesh", false);
        pick_binary("MESH_BIN", "mesh", &candidates)
    })
    .clone()
}

/// Path of the `mesh-probe` binary: `$MESH_PROBE_BIN`, else the `mesh-probe` cargo built next
/// to the running test executable (same profile), else `<workspace>/target/release/mesh-probe`.
/// Panics with a clear message when none exists.
pub fn probe_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let candidates = binary_candidates("MESH_PROBE_BIN", "mesh-probe", true);
        pick_binary("MESH_PROBE_BIN", "mesh-probe", &candidates)
    })
    .clone()
}

fn binary_candidates(var: &str, name: &str, next_to_test_exe: bool) -> Vec<PathBuf> {
    if let Some(path) = std::env::var_os(var).filter(|v| !v.is_empty()) {
        // An explicit setting is the only candidate: never silently run something else.
        return vec![PathBuf::from(path)];
    }
    let mut candidates = Vec::new();
    if next_to_test_exe {
        // Integration tests run from target/<profile>/deps/; cargo builds this package's
        // binaries into target/<profile>/ before running them.
        if let Some(profile_dir) = std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().and_then(Path::parent).map(Path::to_path_buf))
        {
            candidates.push(profile_dir.join(name));
        }
    }
    candidates.push(workspace_root().join("target/release").join(name));
    candidates
}

fn pick_binary(var: &str, name: &str, candidates: &[PathBuf]) -> PathBuf {
    match candidates.iter().find(|p| p.is_file()) {
        Some(path) => {
            eprintln!("harness: using {name} at {}", path.display());
            path.clone()
        }
        None => panic!(
            "the `{name}` binary was not found (looked at: {}); run the tests with \
             `cargo xtask test`, or build it (`cargo build --release`) or set ${var}",
            candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Panics unless the tests run as root: they load eBPF programs and create cgroups. They never
/// pass silently without privileges.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "mesh end-to-end tests need root (euid is {euid}): they load eBPF programs and create \
         cgroups; run them with `sudo -E cargo xtask test`"
    );
}

/// Polls `condition` every 20 ms until it returns true or `timeout` passes. Returns whether it
/// became true. The condition is always evaluated at least once, and once more at the deadline.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20).min(deadline - now));
    }
}

/// Serializes the tests of one test binary: they share timing-sensitive kernel state (and
/// loopback ports), so even without `--test-threads=1` they run one at a time.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    // A previous test panicking while holding the lock must not fail every later test.
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A test's whole world: its cgroup, its bpffs directory and an agent serving both.
///
/// Fields drop in declaration order: the agent stops first, then `mesh cleanup` removes links
/// and pins, then the cgroup is removed, and only then is the next test allowed to start.
pub struct TestEnv {
    pub agent: Agent,
    pub bpffs: BpffsDir,
    pub cgroup: CgroupGuard,
    _serial: MutexGuard<'static, ()>,
}

impl TestEnv {
    /// Creates a cgroup and a bpffs directory named after `tag` and starts an agent with
    /// `config_toml` (waits for `/readyz`).
    pub fn start(tag: &str, config_toml: &str) -> TestEnv {
        let serial = serial();
        require_root();
        let cgroup = CgroupGuard::new(tag);
        let bpffs = BpffsDir::new(tag);
        let agent = Agent::start(config_toml, &cgroup, &bpffs);
        TestEnv {
            agent,
            bpffs,
            cgroup,
            _serial: serial,
        }
    }

    /// Runs `mesh-probe connect --addr <addr> --count <count>` inside this test's cgroup.
    pub fn connect(&self, addr: impl std::fmt::Display, count: usize) -> ProbeResult {
        probe_connect_in(&self.cgroup, addr, count)
    }

    /// Rewrites the agent's config file with `services`.
    pub fn write_services(&self, services: &[ServiceSpec]) {
        self.agent.write_config(&render_config(services));
    }
}

/// A private temporary directory (state dirs, config targets), removed on drop unless the test
/// is failing, so its content can be looked at.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "mesh-test-{tag}-{}-{}",
            std::process::id(),
            next_unique()
        ));
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A process-wide counter for unique names (cgroups, bpffs directories, temp directories).
pub(crate) fn next_unique() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// `mesh-test-<tag>-<pid>-<counter>`: unique per process and call, recognisable as ours.
pub(crate) fn unique_name(tag: &str) -> String {
    assert!(
        !tag.is_empty()
            && tag
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
        "test tag {tag:?} must be non-empty ASCII letters, digits, '-' or '_'"
    );
    format!("mesh-test-{tag}-{}-{}", std::process::id(), next_unique())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_until_returns_true_as_soon_as_condition_holds() {
        let mut calls = 0;
        assert!(wait_until(Duration::from_secs(5), || {
            calls += 1;
            calls == 3
        }));
        assert_eq!(calls, 3);
    }

    #[test]
    fn wait_until_gives_up_at_the_deadline() {
        let start = Instant::now();
        assert!(!wait_until(Duration::from_millis(100), || false));
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(100), "{took:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
    }

    #[test]
    fn unique_names_differ_and_carry_tag_and_pid() {
        let a = unique_name("rr");
        let b = unique_name("rr");
        assert_ne!(a, b);
        assert!(a.starts_with(&format!("mesh-test-rr-{}-", std::process::id())));
    }

    #[test]
    #[should_panic(expected = "must be non-empty")]
    fn unique_name_rejects_path_separators() {
        unique_name("../x");
    }
}
