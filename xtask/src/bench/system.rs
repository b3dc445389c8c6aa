//! Machine-level helpers of the bench: the cgroup guard, leftovers of interrupted runs, clocks,
//! /proc readers, a tiny HTTP GET and the machine description.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

use crate::util::{Run as _, cgroup2_mount, cmd};

/// Every cgroup and bpffs directory of the bench is named `mesh-bench-<xtask pid>[-suffix]`.
pub const PREFIX: &str = "mesh-bench-";
pub const BPFFS: &str = "/sys/fs/bpf";

pub fn scratch_name(suffix: &str) -> String {
    if suffix.is_empty() {
        format!("{PREFIX}{}", std::process::id())
    } else {
        format!("{PREFIX}{}-{suffix}", std::process::id())
    }
}

/// CLOCK_MONOTONIC in nanoseconds, the clock `loadgen probe` stamps its lines with.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// A cgroup v2 directory made by the bench. Only the bench's own children are ever moved into
/// it; drop SIGKILLs whatever is still listed there and removes the directory.
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    pub fn create(name: &str) -> Result<Cgroup> {
        let path = cgroup2_mount()?.join(name);
        std::fs::create_dir(&path)
            .with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(Cgroup { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Err(e) = remove_cgroup(&self.path) {
            eprintln!("bench: warning: {e:#}");
        } else {
            eprintln!("bench: removed cgroup {}", self.path.display());
        }
    }
}

fn cgroup_pids(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .filter(|&pid| pid > 1 && u32::try_from(pid) != Ok(std::process::id()))
        .collect()
}

/// Kills what is in a bench cgroup (only bench children can be) and removes it, bounded.
fn remove_cgroup(dir: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pids = cgroup_pids(dir);
        for &pid in &pids {
            // SAFETY: kill(2) on a pid listed in our own cgroup.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(e).with_context(|| format!("removing cgroup {}", dir.display()));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// The xtask pid in a `mesh-bench-<pid>...` name.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    rest.split('-').next()?.parse().ok()
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn bench_dirs(parent: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Vec::new();
    };
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(PREFIX))
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    dirs.sort();
    dirs
}

/// Removes cgroups and bpffs pins left by an interrupted bench whose xtask is gone; refuses to
/// run next to a live one (two benches on 2 cores measure nothing).
pub fn clean_leftovers(mesh: &Path) -> Result<()> {
    let cgroups = bench_dirs(&cgroup2_mount()?);
    let pins = bench_dirs(Path::new(BPFFS));
    for dir in cgroups.iter().chain(&pins) {
        let name = dir.file_name().unwrap_or_default().to_string_lossy();
        if let Some(pid) = owner_pid(&name)
            && pid != std::process::id()
            && pid_alive(pid)
        {
            bail!(
                "{} belongs to a bench that is still running (pid {pid}); stop it first",
                dir.display()
            );
        }
    }
    for dir in &pins {
        if mesh.is_file() {
            let _ = cmd(mesh, ["cleanup", "--bpffs"]).arg(dir).stdout_if_ok();
        }
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
        println!("bench: removed leftover pins {}", dir.display());
    }
    for dir in &cgroups {
        remove_cgroup(dir)?;
        println!("bench: removed leftover cgroup {}", dir.display());
    }
    Ok(())
}

/// Fails if something already listens on `addr` (a leftover of an interrupted run?).
pub fn require_free(addr: SocketAddr) -> Result<()> {
    if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
        bail!("{addr} is already in use (a leftover of an interrupted bench?): stop it first");
    }
    Ok(())
}

/// Waits (bounded) until something accepts connections on `addr`.
pub fn wait_listening(addr: SocketAddr, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        crate::signal::check()?;
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("nothing listens on {addr} after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `GET path` over HTTP/1.0: (status, body). Errors if nothing answers.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text
        .split_ascii_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no HTTP status line")?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// VmRSS of `pid`, KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_ascii_whitespace().next()?.parse().ok())
}

/// utime + stime of `pid` (all its threads), seconds.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_ascii_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no memory preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(ticks as f64 / hz)
}

/// Entries in the connection tracking table (None when conntrack is not loaded).
pub fn conntrack_count() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_count")
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub date_utc: String,
    pub hostname: String,
    pub kernel: String,
    pub cpu_model: String,
    pub cores: usize,
    pub mem_total_kib: u64,
    pub rustc: String,
    pub iptables: String,
    pub nft: String,
    pub haproxy: String,
    pub mesh_binary: String,
    pub mesh_version: String,
    pub mesh_commit: String,
    /// The work tree had uncommitted changes when the bench ran.
    pub mesh_tree_dirty: bool,
    pub conntrack_max: Option<u64>,
    pub tcp_tw_reuse: String,
}

fn first_line(text: Option<String>) -> String {
    text.unwrap_or_default()
        .lines()
        .next()
        .unwrap_or("?")
        .trim()
        .to_owned()
}

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".to_owned())
}

pub fn machine(mesh: &Path) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or_else(|| "?".to_owned(), |(_, m)| m.trim().to_owned());
    let cores = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_total_kib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_ascii_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let root = crate::util::workspace_root();
    let git = |args: &[&str]| {
        let mut c = cmd("git", args);
        c.current_dir(root);
        c.stdout_if_ok()
    };
    let dirty = git(&["status", "--porcelain"]).is_some_and(|s| !s.trim().is_empty());
    Machine {
        date_utc: first_line(cmd("date", ["-u", "+%Y-%m-%dT%H:%M:%SZ"]).stdout_if_ok()),
        hostname: read_trim("/proc/sys/kernel/hostname"),
        kernel: read_trim("/proc/sys/kernel/osrelease"),
        cpu_model,
        cores,
        mem_total_kib,
        rustc: first_line(cmd("rustc", ["-V"]).stdout_if_ok()),
        iptables: first_line(cmd("iptables", ["-V"]).stdout_if_ok()),
        nft: first_line(cmd("nft", ["--version"]).stdout_if_ok()),
        haproxy: first_line(cmd("haproxy", ["-v"]).stdout_if_ok()),
        mesh_binary: mesh.display().to_string(),
        mesh_version: first_line(cmd(mesh, ["--version"]).stdout_if_ok()),
        mesh_commit: first_line(git(&["rev-parse", "--short=12", "HEAD"])),
        mesh_tree_dirty: dirty,
        conntrack_max: std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_max")
            .ok()
            .and_then(|s| s.trim().parse().ok()),
        tcp_tw_reuse: read_trim("/proc/sys/net/ipv4/tcp_tw_reuse"),
    }
}

/// Runs a command quietly; errors with its stderr.
pub fn run_quiet(command: &mut std::process::Command) -> Result<String> {
    let shown = crate::util::display(command);
    let output = command
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("cannot start `{shown}`"))?;
    if !output.status.success() {
        bail!(
            "`{shown}` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs `command` with `input` on its stdin; errors with its stderr.
pub fn run_with_input(command: &mut std::process::Command, input: &str) -> Result<()> {
    use std::process::Stdio;
    let shown = crate::util::display(command);
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{shown}`"))?;
    let mut stdin = child.stdin.take().context("no stdin pipe")?;
    let input = input.to_owned();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let output = child.wait_with_output()?;
    let _ = writer.join();
    if !output.status.success() {
        bail!(
            "`{shown}` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}
