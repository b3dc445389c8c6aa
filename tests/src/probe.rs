//! Running `mesh-probe` inside or outside a test cgroup, and reading what it printed.
//!
//! `mesh-probe connect --addr IP:PORT --count N [--timeout-ms T]` prints one line per connect:
//! the backend's reply (its name) or `ERR <errno name or message>`.
//! `mesh-probe udp --addr IP:PORT --count N [--timeout-ms T]` prints `<reply> from <ip:port>`
//! or `ERR ...` per datagram. On stderr it first prints `mesh-probe: cgroup <line>` with its
//! cgroup v2 membership (the `0::` line of /proc/self/cgroup), so the harness can check that it
//! really ran in the test cgroup.

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr};
use std::fmt::Display;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use crate::{CgroupGuard, TcpBackend};

/// A probe run is killed after this long.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(60);

/// Prefix of the stderr line on which the probe reports its cgroup.
pub const CGROUP_LINE_PREFIX: &str = "mesh-probe: cgroup ";

/// One line of probe output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeLine {
    /// A reply (a backend's name) and, for UDP, the address the reply came from.
    Reply { name: String, from: Option<String> },
    /// `ERR <what>`.
    Error(String),
}

/// What one probe run printed.
#[derive(Debug, Clone)]
pub struct ProbeResult {
    pub lines: Vec<ProbeLine>,
    pub stdout: String,
    pub stderr: String,
}

impl ProbeResult {
    pub fn from_output(stdout: String, stderr: String) -> ProbeResult {
        ProbeResult {
            lines: parse_probe_output(&stdout),
            stdout,
            stderr,
        }
    }

    /// Reply -> how many times it was received.
    pub fn counts(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for line in &self.lines {
            if let ProbeLine::Reply { name, .. } = line {
                *counts.entry(name.clone()).or_insert(0) += 1;
            }
        }
        counts
    }

    /// How many replies said `name`.
    pub fn count(&self, name: &str) -> usize {
        self.counts().get(name).copied().unwrap_or(0)
    }

    /// The `ERR` lines, without the prefix, in order.
    pub fn errors(&self) -> Vec<String> {
        self.lines
            .iter()
            .filter_map(|line| match line {
                ProbeLine::Error(e) => Some(e.clone()),
                ProbeLine::Reply { .. } => None,
            })
            .collect()
    }

    /// Error -> how many times it happened.
    pub fn error_counts(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for e in self.errors() {
            *counts.entry(e).or_insert(0) += 1;
        }
        counts
    }

    /// Reply source address (UDP) -> count.
    pub fn sources(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for line in &self.lines {
            if let ProbeLine::Reply {
                from: Some(from), ..
            } = line
            {
                *counts.entry(from.clone()).or_insert(0) += 1;
            }
        }
        counts
    }

    /// Number of attempts reported (replies + errors).
    pub fn total(&self) -> usize {
        self.lines.len()
    }

    /// The cgroup v2 path the probe reported (`/mesh-test-...`), if it did.
    pub fn cgroup(&self) -> Option<&str> {
        reported_cgroup(&self.stderr)
    }
}

/// Parses probe stdout into lines.
pub fn parse_probe_output(stdout: &str) -> Vec<ProbeLine> {
    stdout
        .lines()
        .map(|line| {
            if let Some(error) = line.strip_prefix("ERR ") {
                ProbeLine::Error(error.to_owned())
            } else if line == "ERR" {
                ProbeLine::Error(String::new())
            } else if let Some((name, from)) = line.rsplit_once(" from ") {
                ProbeLine::Reply {
                    name: name.to_owned(),
                    from: Some(from.to_owned()),
                }
            } else {
                ProbeLine::Reply {
                    name: line.to_owned(),
                    from: None,
                }
            }
        })
        .collect()
}

/// The cgroup path from the probe's `mesh-probe: cgroup 0::<path>` stderr line.
pub fn reported_cgroup(stderr: &str) -> Option<&str> {
    stderr
        .lines()
        .find_map(|line| line.strip_prefix(CGROUP_LINE_PREFIX))
        .map(|line| line.strip_prefix("0::").unwrap_or(line))
}

/// Runs `mesh-probe <args>` as a child that moves itself into `cgroup` before exec (it writes
/// "0" to `<cgroup>/cgroup.procs`: only this child moves). Killed after 60 s. Panics if it
/// fails, or if it reports a cgroup other than `cgroup`.
pub fn run_probe_in<I, S>(cgroup: &CgroupGuard, args: I) -> ProbeResult
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(crate::probe_bin());
    cmd.args(args);
    move_into_cgroup_at_spawn(&mut cmd, cgroup);
    let result = run(&mut cmd);
    let expected = format!("/{}", cgroup.name());
    match result.cgroup() {
        Some(path) if path.ends_with(&expected) => {}
        other => panic!(
            "mesh-probe should run in cgroup {} but reported {other:?}; stderr:\n{}",
            cgroup.path().display(),
            result.stderr
        ),
    }
    result
}

/// Makes the child that `cmd` spawns move itself into `cgroup` before exec: it writes "0" to
/// `<cgroup>/cgroup.procs`, which moves only the writing process. Spawning fails if it cannot.
pub fn move_into_cgroup_at_spawn<'c>(
    cmd: &'c mut Command,
    cgroup: &CgroupGuard,
) -> &'c mut Command {
    let procs = CString::new(cgroup.path().join("cgroup.procs").as_os_str().as_bytes())
        .expect("cgroup path has no NUL byte");
    // SAFETY: the closure runs between fork and exec; it only calls the async-signal-safe
    // open/write/close on a path allocated before the fork, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            let result = if written == 1 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            };
            libc::close(fd);
            result
        })
    }
}

/// Runs `mesh-probe <args>` in the test process's own cgroup (its connects are not rewritten by
/// programs attached to test cgroups). Killed after 60 s; panics if it fails.
pub fn run_probe_outside<I, S>(args: I) -> ProbeResult
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(crate::probe_bin());
    cmd.args(args);
    run(&mut cmd)
}

fn run(cmd: &mut Command) -> ProbeResult {
    let out = crate::process::run_bounded(cmd, PROBE_TIMEOUT)
        .unwrap_or_else(|e| panic!("mesh-probe {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "mesh-probe {cmd:?} failed: {}",
        out.describe()
    );
    ProbeResult::from_output(out.stdout, out.stderr)
}

fn connect_args(addr: impl Display, count: usize) -> Vec<String> {
    vec![
        "connect".into(),
        "--addr".into(),
        addr.to_string(),
        "--count".into(),
        count.to_string(),
    ]
}

fn check_total(result: ProbeResult, count: usize) -> ProbeResult {
    assert_eq!(
        result.total(),
        count,
        "mesh-probe printed {} lines for {count} attempts:\n{}",
        result.total(),
        result.stdout
    );
    result
}

/// `count` sequential TCP connects to `addr` from inside `cgroup`.
pub fn probe_connect_in(cgroup: &CgroupGuard, addr: impl Display, count: usize) -> ProbeResult {
    check_total(run_probe_in(cgroup, connect_args(addr, count)), count)
}

/// `count` sequential TCP connects to `addr` from outside any test cgroup.
pub fn probe_connect_outside(addr: impl Display, count: usize) -> ProbeResult {
    check_total(run_probe_outside(connect_args(addr, count)), count)
}

/// `count` UDP request/replies to `addr` from inside `cgroup`.
pub fn probe_udp_in(cgroup: &CgroupGuard, addr: impl Display, count: usize) -> ProbeResult {
    let args = [
        "udp".to_owned(),
        "--addr".into(),
        addr.to_string(),
        "--count".into(),
        count.to_string(),
    ];
    check_total(run_probe_in(cgroup, args), count)
}

/// What `mesh-probe ... --summary` (and `connect-until`) printed: one JSON object.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
pub struct ProbeSummary {
    /// Attempts made (replies + errors).
    pub attempts: u64,
    /// Reply (a backend's name) -> count.
    pub replies: BTreeMap<String, u64>,
    /// Reply source address (UDP) -> count.
    pub sources: BTreeMap<String, u64>,
    /// Error (errno name or message) -> count.
    pub errors: BTreeMap<String, u64>,
    /// The slowest connect() (TCP and connected UDP), in microseconds.
    pub max_connect_us: u64,
    /// How long the whole run took.
    pub elapsed_ms: u64,
}

impl ProbeSummary {
    /// The summaries of several probe runs added up (slowest connect and longest run kept).
    pub fn total(runs: &[ProbeSummary]) -> ProbeSummary {
        let mut total = ProbeSummary::default();
        for run in runs {
            total.attempts += run.attempts;
            for (into, from) in [
                (&mut total.replies, &run.replies),
                (&mut total.sources, &run.sources),
                (&mut total.errors, &run.errors),
            ] {
                for (k, v) in from {
                    *into.entry(k.clone()).or_default() += v;
                }
            }
            total.max_connect_us = total.max_connect_us.max(run.max_connect_us);
            total.elapsed_ms = total.elapsed_ms.max(run.elapsed_ms);
        }
        total
    }

    /// Parses the last non-empty line of the probe's stdout.
    pub fn parse(stdout: &str) -> Result<ProbeSummary, String> {
        let line = stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .ok_or("mesh-probe printed no summary")?;
        serde_json::from_str(line).map_err(|e| format!("mesh-probe summary {line:?}: {e}"))
    }

    /// Number of replies of any name.
    pub fn reply_total(&self) -> u64 {
        self.replies.values().sum()
    }

    /// Number of errors of any kind.
    pub fn error_total(&self) -> u64 {
        self.errors.values().sum()
    }

    /// How many replies said `name`.
    pub fn count(&self, name: &str) -> u64 {
        self.replies.get(name).copied().unwrap_or(0)
    }
}

/// Runs a prepared probe command (`cmd` may wrap the probe, e.g. `ip netns exec NS mesh-probe`)
/// bounded by `timeout`. If `cgroup` is given, the child moves into it before exec and the probe
/// must report it. Panics if it fails, overruns or ran elsewhere.
pub fn run_probe_command(
    cmd: &mut Command,
    cgroup: Option<&CgroupGuard>,
    timeout: Duration,
) -> ProbeResult {
    if let Some(cgroup) = cgroup {
        move_into_cgroup_at_spawn(cmd, cgroup);
    }
    let out = crate::process::run_bounded(cmd, timeout)
        .unwrap_or_else(|e| panic!("mesh-probe {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "mesh-probe {cmd:?} failed: {}",
        out.describe()
    );
    let result = ProbeResult::from_output(out.stdout, out.stderr);
    if let Some(cgroup) = cgroup {
        check_cgroup(&result, cgroup);
    }
    result
}

#[track_caller]
fn check_cgroup(result: &ProbeResult, cgroup: &CgroupGuard) {
    let expected = format!("/{}", cgroup.name());
    match result.cgroup() {
        Some(path) if path.ends_with(&expected) => {}
        other => panic!(
            "mesh-probe should run in cgroup {} but reported {other:?}; stderr:\n{}",
            cgroup.path().display(),
            result.stderr
        ),
    }
}

/// [`run_probe_in`] with a time bound other than [`PROBE_TIMEOUT`].
pub fn run_probe_in_for<I, S>(cgroup: &CgroupGuard, args: I, timeout: Duration) -> ProbeResult
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(crate::probe_bin());
    cmd.args(args);
    run_probe_command(&mut cmd, Some(cgroup), timeout)
}

/// Runs `mesh-probe <args>` (which must print a summary: `--summary` or `connect-until`) inside
/// `cgroup`, bounded by `timeout`, and parses the summary.
pub fn probe_summary_in<I, S>(cgroup: &CgroupGuard, args: I, timeout: Duration) -> ProbeSummary
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let result = run_probe_in_for(cgroup, args, timeout);
    ProbeSummary::parse(&result.stdout)
        .unwrap_or_else(|e| panic!("{e}; stderr:\n{}", result.stderr))
}

/// A probe running in the background (see [`spawn_probe_in`]). Drop kills it if it still runs.
pub struct RunningProbe {
    child: std::process::Child,
    stdout: Option<std::thread::JoinHandle<String>>,
    stderr: Option<std::thread::JoinHandle<String>>,
    cgroup_name: String,
}

impl RunningProbe {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (at most `timeout`) for the probe to exit; panics if it overruns (it is killed)
    /// or fails. Checks it ran in its cgroup.
    pub fn wait(mut self, timeout: Duration) -> ProbeResult {
        let status = crate::process::wait_bounded(&mut self.child, timeout);
        if status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let stdout = join_output(self.stdout.take());
        let stderr = join_output(self.stderr.take());
        let Some(status) = status else {
            panic!(
                "mesh-probe (pid {}) still ran after {timeout:?}; killed\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
                self.child.id()
            );
        };
        assert!(
            status.success(),
            "mesh-probe (pid {}) failed: {status}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
            self.child.id()
        );
        let result = ProbeResult::from_output(stdout, stderr);
        let expected = format!("/{}", self.cgroup_name);
        assert!(
            result.cgroup().is_some_and(|c| c.ends_with(&expected)),
            "mesh-probe should run in cgroup {expected} but reported {:?}",
            result.cgroup()
        );
        result
    }
}

impl Drop for RunningProbe {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn join_output(handle: Option<std::thread::JoinHandle<String>>) -> String {
    handle
        .map(|h| h.join().unwrap_or_else(|_| "<reader panicked>".into()))
        .unwrap_or_default()
}

fn drain_pipe(
    pipe: Option<impl std::io::Read + Send + 'static>,
) -> Option<std::thread::JoinHandle<String>> {
    pipe.map(|mut pipe| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            String::from_utf8_lossy(&bytes).into_owned()
        })
    })
}

/// Starts `mesh-probe <args>` inside `cgroup` without waiting for it (for concurrent clients,
/// e.g. `connect-until`). Its output is collected by [`RunningProbe::wait`].
pub fn spawn_probe_in<I, S>(cgroup: &CgroupGuard, args: I) -> RunningProbe
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(crate::probe_bin());
    cmd.args(args);
    spawn_probe_command(cmd, cgroup)
}

/// [`spawn_probe_in`] for a prepared probe command (`cmd` may wrap the probe, e.g.
/// `ip netns exec NS mesh-probe ...`): the child moves into `cgroup` before exec.
pub fn spawn_probe_command(mut cmd: Command, cgroup: &CgroupGuard) -> RunningProbe {
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    move_into_cgroup_at_spawn(&mut cmd, cgroup);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start mesh-probe {cmd:?}: {e}"));
    let stdout = drain_pipe(child.stdout.take());
    let stderr = drain_pipe(child.stderr.take());
    RunningProbe {
        child,
        stdout,
        stderr,
        cgroup_name: cgroup.name().to_owned(),
    }
}

/// The errno name of an I/O error (`ECONNREFUSED`), or its message when it has no errno.
pub fn errno_name(error: &std::io::Error) -> String {
    if let Some(code) = error.raw_os_error() {
        let name = match code {
            libc::ECONNREFUSED => "ECONNREFUSED",
            libc::ECONNRESET => "ECONNRESET",
            libc::ECONNABORTED => "ECONNABORTED",
            libc::ETIMEDOUT => "ETIMEDOUT",
            libc::EPERM => "EPERM",
            libc::EACCES => "EACCES",
            libc::ENETUNREACH => "ENETUNREACH",
            libc::EHOSTUNREACH => "EHOSTUNREACH",
            libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
            libc::EADDRINUSE => "EADDRINUSE",
            libc::EAGAIN => "EAGAIN",
            libc::EINPROGRESS => "EINPROGRESS",
            libc::EINVAL => "EINVAL",
            libc::EPIPE => "EPIPE",
            libc::ENOENT => "ENOENT",
            libc::ENOBUFS => "ENOBUFS",
            libc::EMSGSIZE => "EMSGSIZE",
            libc::EINTR => "EINTR",
            _ => return format!("errno {code}: {error}"),
        };
        return name.to_owned();
    }
    match error.kind() {
        std::io::ErrorKind::TimedOut => "ETIMEDOUT".to_owned(),
        _ => error.to_string(),
    }
}

/// Asserts the probe saw no error and each backend answered exactly its count (0: never).
#[track_caller]
/// `name -> n` for the given names, as a summary's `replies` or `sources` map.
pub fn expect_counts<S: std::fmt::Display>(pairs: &[(S, u64)]) -> BTreeMap<String, u64> {
    pairs
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(k, n)| (k.to_string(), *n))
        .collect()
}

/// Panics with the errors and replies when a probe summary has any error.
#[track_caller]
pub fn assert_no_errors(what: &str, summary: &ProbeSummary) {
    assert!(
        summary.errors.is_empty(),
        "{what}: errors {:?}; replies {:?}",
        summary.errors,
        summary.replies
    );
}

pub fn assert_split(result: &ProbeResult, expected: &[(&TcpBackend, usize)]) {
    assert!(
        result.errors().is_empty(),
        "probe errors {:?}; replies {:?}",
        result.error_counts(),
        result.counts()
    );
    let want: BTreeMap<String, usize> = expected
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(b, n)| (b.name().to_owned(), *n))
        .collect();
    assert_eq!(result.counts(), want, "replies per backend");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tcp_probe_output() {
        let result = ProbeResult::from_output(
            "a\nb\na\nERR ECONNREFUSED\nc\nERR ECONNREFUSED\nERR ETIMEDOUT\n".into(),
            String::new(),
        );
        assert_eq!(result.total(), 7);
        assert_eq!(
            result.counts(),
            BTreeMap::from([("a".into(), 2), ("b".into(), 1), ("c".into(), 1)])
        );
        assert_eq!(result.count("a"), 2);
        assert_eq!(result.count("zzz"), 0);
        assert_eq!(
            result.errors(),
            vec!["ECONNREFUSED", "ECONNREFUSED", "ETIMEDOUT"]
        );
        assert_eq!(
            result.error_counts(),
            BTreeMap::from([("ECONNREFUSED".into(), 2), ("ETIMEDOUT".into(), 1)])
        );
        assert!(result.sources().is_empty());
    }

    #[test]
    fn parses_udp_probe_output() {
        let lines =
            parse_probe_output("dns-1 from 127.100.3.1:53\nERR EAGAIN\ndns-2 from [::1]:53\n");
        assert_eq!(
            lines,
            vec![
                ProbeLine::Reply {
                    name: "dns-1".into(),
                    from: Some("127.100.3.1:53".into())
                },
                ProbeLine::Error("EAGAIN".into()),
                ProbeLine::Reply {
                    name: "dns-2".into(),
                    from: Some("[::1]:53".into())
                },
            ]
        );
        let result = ProbeResult::from_output(
            "x from 127.100.3.1:53\ny from 127.100.3.1:53\n".into(),
            String::new(),
        );
        assert_eq!(
            result.sources(),
            BTreeMap::from([("127.100.3.1:53".into(), 2)])
        );
        assert_eq!(result.count("x"), 1);
    }

    #[test]
    fn parses_a_summary() {
        let stdout = "{\"attempts\":5,\"replies\":{\"a\":2,\"b\":1},\"sources\":{\"127.100.3.1:53\":3},\
                      \"errors\":{\"ECONNREFUSED\":2},\"max_connect_us\":40,\"elapsed_ms\":3}\n";
        let summary = ProbeSummary::parse(stdout).expect("parses");
        assert_eq!(summary.attempts, 5);
        assert_eq!(summary.reply_total(), 3);
        assert_eq!(summary.error_total(), 2);
        assert_eq!(summary.count("a"), 2);
        assert_eq!(summary.count("zzz"), 0);
        assert_eq!(summary.max_connect_us, 40);
        assert!(ProbeSummary::parse("").is_err());
        assert!(ProbeSummary::parse("a\nb\n").is_err());
    }

    #[test]
    fn empty_output_has_no_lines() {
        assert_eq!(parse_probe_output(""), vec![]);
    }

    #[test]
    fn finds_the_reported_cgroup() {
        let stderr = "noise\nmesh-probe: cgroup 0::/mesh-test-rr-1-2\n";
        assert_eq!(reported_cgroup(stderr), Some("/mesh-test-rr-1-2"));
        assert_eq!(reported_cgroup("nothing"), None);
    }

    #[test]
    fn names_errnos() {
        let refused = std::io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert_eq!(errno_name(&refused), "ECONNREFUSED");
        let timed_out = std::io::Error::new(std::io::ErrorKind::TimedOut, "connection timed out");
        assert_eq!(errno_name(&timed_out), "ETIMEDOUT");
        let other = std::io::Error::from_raw_os_error(libc::ENOTSOCK);
        assert!(errno_name(&other).starts_with("errno "));
    }
}
