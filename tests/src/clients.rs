//! Client loops: several `mesh-probe connect-until` / `http-until` processes inside a test
//! cgroup that connect through a VIP until the test stops them (a stop file) or their time bound
//! passes, and the sum of what they saw.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::probe::{ProbeSummary, RunningProbe, spawn_probe_command, spawn_probe_in};
use crate::{CgroupGuard, NetNs};

/// How long a stopped client gets to finish its attempt in flight and print its summary.
const STOP_GRACE: Duration = Duration::from_secs(30);

/// Background clients; see [`ClientLoop::start`]. Drop kills them if they still run.
pub struct ClientLoop {
    probes: Vec<RunningProbe>,
    stop_dir: PathBuf,
    stop_file: PathBuf,
    started: Instant,
}

/// What a stopped [`ClientLoop`] saw: per client and summed.
#[derive(Debug, Clone)]
pub struct LoopResult {
    pub per_client: Vec<ProbeSummary>,
    pub total: ProbeSummary,
    /// From start to stop, as the test saw it.
    pub ran_for: Duration,
}

impl ClientLoop {
    /// Starts `clients` processes of `mesh-probe <mode> --addr <addr> --stop-file <f>
    /// --max-ms <max> <extra...>` inside `cgroup` (`mode` is `connect-until` or `http-until`).
    pub fn start(
        cgroup: &CgroupGuard,
        mode: &str,
        addr: impl Display,
        clients: usize,
        max: Duration,
        extra: &[&str],
    ) -> ClientLoop {
        ClientLoop::start_with(None, cgroup, mode, addr, clients, max, extra)
    }

    /// [`ClientLoop::start`] with the clients inside the network namespace `netns` (and inside
    /// `cgroup`, which the agent's programs must cover).
    pub fn start_in_netns(
        netns: &NetNs,
        cgroup: &CgroupGuard,
        mode: &str,
        addr: impl Display,
        clients: usize,
        max: Duration,
        extra: &[&str],
    ) -> ClientLoop {
        ClientLoop::start_with(Some(netns), cgroup, mode, addr, clients, max, extra)
    }

    fn start_with(
        netns: Option<&NetNs>,
        cgroup: &CgroupGuard,
        mode: &str,
        addr: impl Display,
        clients: usize,
        max: Duration,
        extra: &[&str],
    ) -> ClientLoop {
        assert!(
            matches!(mode, "connect-until" | "http-until"),
            "not a looping probe mode: {mode}"
        );
        let stop_dir = std::env::temp_dir().join(format!(
            "{}-clients-{}",
            cgroup.name(),
            crate::next_unique()
        ));
        std::fs::create_dir_all(&stop_dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", stop_dir.display()));
        let stop_file = stop_dir.join("stop");
        let addr = addr.to_string();
        let max_ms = max.as_millis().to_string();
        let probes = (0..clients)
            .map(|_| {
                let mut args: Vec<String> = vec![
                    mode.to_owned(),
                    "--addr".into(),
                    addr.clone(),
                    "--stop-file".into(),
                    stop_file.to_string_lossy().into_owned(),
                    "--max-ms".into(),
                    max_ms.clone(),
                ];
                args.extend(extra.iter().map(|s| (*s).to_owned()));
                match netns {
                    None => spawn_probe_in(cgroup, args),
                    Some(ns) => {
                        let mut cmd = ns.command(crate::probe_bin());
                        cmd.args(args);
                        spawn_probe_command(cmd, cgroup)
                    }
                }
            })
            .collect();
        ClientLoop {
            probes,
            stop_dir,
            stop_file,
            started: Instant::now(),
        }
    }

    /// Since the clients were started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Tells the clients to stop, waits for them (bounded) and sums their summaries. Panics if a
    /// client fails, overruns, or prints no summary.
    pub fn stop(mut self) -> LoopResult {
        std::fs::write(&self.stop_file, b"stop")
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", self.stop_file.display()));
        let ran_for = self.started.elapsed();
        let per_client: Vec<ProbeSummary> = std::mem::take(&mut self.probes)
            .into_iter()
            .map(|probe| {
                let out = probe.wait(STOP_GRACE);
                ProbeSummary::parse(&out.stdout)
                    .unwrap_or_else(|e| panic!("{e}; stderr:\n{}", out.stderr))
            })
            .collect();
        let total = sum(&per_client);
        LoopResult {
            per_client,
            total,
            ran_for,
        }
    }
}

impl Drop for ClientLoop {
    fn drop(&mut self) {
        // Probes still here are killed by their own Drop.
        let _ = std::fs::write(&self.stop_file, b"stop");
        let _ = std::fs::remove_dir_all(&self.stop_dir);
    }
}

/// The sum of several summaries (the slowest connect and the longest run are maxima).
pub fn sum(summaries: &[ProbeSummary]) -> ProbeSummary {
    let mut total = ProbeSummary::default();
    for s in summaries {
        total.attempts += s.attempts;
        add_counts(&mut total.replies, &s.replies);
        add_counts(&mut total.sources, &s.sources);
        add_counts(&mut total.errors, &s.errors);
        total.max_connect_us = total.max_connect_us.max(s.max_connect_us);
        total.elapsed_ms = total.elapsed_ms.max(s.elapsed_ms);
    }
    total
}

fn add_counts(into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>) {
    for (k, v) in from {
        *into.entry(k.clone()).or_default() += v;
    }
}

/// Arguments of `mesh-probe http --count N --summary` for `addr`.
pub fn http_args(addr: impl Display, count: usize) -> Vec<String> {
    vec![
        "http".into(),
        "--addr".into(),
        addr.to_string(),
        "--count".into(),
        count.to_string(),
        "--summary".into(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_summaries() {
        let a = ProbeSummary {
            attempts: 3,
            replies: BTreeMap::from([("x".into(), 2)]),
            errors: BTreeMap::from([("ECONNREFUSED".into(), 1)]),
            max_connect_us: 5,
            elapsed_ms: 10,
            ..ProbeSummary::default()
        };
        let b = ProbeSummary {
            attempts: 2,
            replies: BTreeMap::from([("x".into(), 1), ("y".into(), 1)]),
            max_connect_us: 9,
            elapsed_ms: 4,
            ..ProbeSummary::default()
        };
        let total = sum(&[a, b]);
        assert_eq!(total.attempts, 5);
        assert_eq!(
            total.replies,
            BTreeMap::from([("x".into(), 3), ("y".into(), 1)])
        );
        assert_eq!(total.errors, BTreeMap::from([("ECONNREFUSED".into(), 1)]));
        assert_eq!((total.max_connect_us, total.elapsed_ms), (9, 10));
    }
}
