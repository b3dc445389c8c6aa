//! Data-path measurements: every path, the same backends, the same client (`loadgen`), in
//! interleaved rounds whose order rotates.

use std::net::{SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use serde::Serialize;

use super::Settings;
use super::baselines::{self, IptablesDnat, NatBefore, NftDnat};
use super::mesh::{Agent, ServiceConf, config_text, other_services};
use super::procs::run_captured;
use super::proto::{BulkResult, CrrResult, RrResult};
use super::system::conntrack_count;
use crate::signal;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PathKind {
    DirectRr,
    #[serde(rename = "direct-1")]
    Direct1,
    Mesh,
    Iptables,
    Nftables,
    Haproxy,
}

impl PathKind {
    pub fn name(self) -> &'static str {
        match self {
            PathKind::DirectRr => "direct-rr",
            PathKind::Direct1 => "direct-1",
            PathKind::Mesh => "mesh",
            PathKind::Iptables => "iptables",
            PathKind::Nftables => "nftables",
            PathKind::Haproxy => "haproxy",
        }
    }
}

pub const MAIN_PATHS: [PathKind; 6] = [
    PathKind::DirectRr,
    PathKind::Direct1,
    PathKind::Mesh,
    PathKind::Iptables,
    PathKind::Nftables,
    PathKind::Haproxy,
];

/// Paths measured with other services configured next to the bench's.
pub const SCALED_PATHS: [PathKind; 3] = [PathKind::Mesh, PathKind::Iptables, PathKind::Nftables];

/// One thing to measure: a path with `others` other services configured (0: the main rows).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Case {
    pub path: PathKind,
    pub others: usize,
}

impl Case {
    pub fn label(&self) -> String {
        if self.others == 0 {
            self.path.name().to_owned()
        } else {
            format!("{} +{}", self.path.name(), self.others)
        }
    }
}

/// The measurements of one case in one round.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    /// Measured round (0-based); warm-up runs are kept apart.
    pub round: usize,
    /// Position in the round's order.
    pub position: usize,
    pub path: PathKind,
    pub others: usize,
    /// Time to install the path's rules or config for this case.
    pub setup_secs: f64,
    /// 1-minute load average when the run started (other load on the machine shows here).
    pub loadavg_1m: f64,
    /// nf_conntrack_count before and after the connection-rate run: growth means connection
    /// tracking was on for this path.
    pub conntrack_before: Option<u64>,
    pub conntrack_after: Option<u64>,
    /// CPU the mesh agent used during the connection-rate run (any path), % of one core.
    pub agent_cpu_percent: Option<f64>,
    pub crr: CrrResult,
    pub rr: Option<RrResult>,
    pub bulk_1conn: Option<BulkResult>,
    pub bulk_4conn: Option<BulkResult>,
}

pub const MESH_VIP: SocketAddrV4 = SocketAddrV4::new(std::net::Ipv4Addr::new(127, 101, 1, 1), 80);

/// Everything the data-path rounds use; built by `bench::run`.
pub struct DataPlane<'a> {
    pub settings: &'a Settings,
    pub loadgen: PathBuf,
    pub backends: Vec<SocketAddr>,
    pub cgroup: PathBuf,
    pub agent: Agent,
    pub agent_others: usize,
    pub haproxy: SocketAddr,
    pub nat: NatBefore,
    pub warnings: Vec<String>,
}

/// What a case installs for its duration.
enum Installed {
    Nothing,
    Iptables(#[expect(dead_code, reason = "a guard: dropping it removes the rules")] IptablesDnat),
    Nftables(NftDnat),
}

pub fn loadavg_1m() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_ascii_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

impl DataPlane<'_> {
    /// The data path agent's config: the bench service plus `others` other services.
    fn mesh_config(&self, others: usize) -> String {
        let bench = ServiceConf::new("bench", MESH_VIP, self.backends.clone());
        let others = other_services(others, &self.backends);
        let all: Vec<&ServiceConf> = std::iter::once(&bench).chain(&others).collect();
        config_text(&all)
    }

    /// Reconfigures the agent to `others` other services and waits until `mesh services`
    /// lists them all.
    pub fn set_mesh_others(&mut self, others: usize) -> Result<()> {
        if others == self.agent_others {
            return Ok(());
        }
        // Unknown until the agent has applied it.
        self.agent_others = usize::MAX;
        let text = self.mesh_config(others);
        let limit = Duration::from_secs(300);
        let mut applied = false;
        for attempt in 1..=2 {
            let offset = self.agent.log_len();
            self.agent.write_config(&text)?;
            match self.agent.wait_services(others + 1, limit, offset) {
                Ok(_) => {
                    applied = true;
                    break;
                }
                Err(e) if e.downcast_ref::<signal::Interrupted>().is_some() => return Err(e),
                Err(e) => self.warn(format!(
                    "mesh agent, config edit to {others} other services, attempt {attempt}: {e:#}"
                )),
            }
        }
        if !applied {
            // The edit failed twice: measure the data path with these services anyway, loaded
            // by a cold start (the failure stays in the warnings).
            self.warn(format!(
                "mesh agent restarted cold with {others} other services after the config edit failed"
            ));
            self.agent.restart(&text)?;
            self.agent.wait_ready(limit)?;
            self.agent
                .wait_services(others + 1, limit, 0)
                .with_context(|| format!("mesh agent with {others} other services"))?;
        }
        self.agent_others = others;
        self.settle_agent()
    }

    /// Waits (at most 10 s) until the agent's CPU use drops under 15% of a core, so work left
    /// over from a reconfiguration does not land in the next measurement.
    fn settle_agent(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            signal::check()?;
            let (Some(a), t) = (self.agent.cpu_secs(), Instant::now()) else {
                break;
            };
            std::thread::sleep(Duration::from_millis(250));
            let Some(b) = self.agent.cpu_secs() else {
                break;
            };
            if (b - a) / t.elapsed().as_secs_f64() < 0.15 {
                break;
            }
        }
        Ok(())
    }

    pub fn initial_mesh_config(backends: &[SocketAddr]) -> String {
        let bench = ServiceConf::new("bench", MESH_VIP, backends.to_vec());
        config_text(&[&bench])
    }

    fn install(&mut self, case: Case) -> Result<Installed> {
        if case.path != PathKind::Mesh {
            // An agent holding thousands of services uses CPU of its own (2 cores here): the
            // other paths run next to an agent with just the bench service, which idles.
            self.set_mesh_others(0)?;
        }
        Ok(match case.path {
            PathKind::Mesh => {
                self.set_mesh_others(case.others)?;
                Installed::Nothing
            }
            PathKind::Iptables => Installed::Iptables(IptablesDnat::install(
                self.nat,
                case.others,
                &self.backends,
            )?),
            PathKind::Nftables => {
                Installed::Nftables(NftDnat::install(case.others, &self.backends)?)
            }
            PathKind::DirectRr | PathKind::Direct1 | PathKind::Haproxy => Installed::Nothing,
        })
    }

    fn targets(&self, path: PathKind) -> Vec<SocketAddr> {
        match path {
            PathKind::DirectRr => self.backends.clone(),
            PathKind::Direct1 => vec![self.backends[0]],
            PathKind::Mesh => vec![SocketAddr::V4(MESH_VIP)],
            PathKind::Iptables => vec![baselines::vip(baselines::IPTABLES_VIP)],
            PathKind::Nftables => vec![baselines::vip(baselines::NFT_VIP)],
            PathKind::Haproxy => vec![self.haproxy],
        }
    }

    /// Only the mesh path's client runs in the agent's cgroup; the others run where xtask does.
    fn cgroup_for(&self, path: PathKind) -> Option<&Path> {
        (path == PathKind::Mesh).then_some(self.cgroup.as_path())
    }

    fn loadgen<T: serde::de::DeserializeOwned>(
        &self,
        args: &[String],
        path: PathKind,
        limit: Duration,
    ) -> Result<T> {
        let mut command = crate::util::cmd(&self.loadgen, args);
        command.env("RUST_BACKTRACE", "0");
        if let Some(cgroup) = self.cgroup_for(path) {
            command.arg("--cgroup").arg(cgroup);
        }
        let out = run_captured(command, limit)?;
        serde_json::from_str(out.trim()).with_context(|| format!("parsing loadgen output {out:?}"))
    }

    fn crr(&self, path: PathKind, secs: f64, warmup: f64) -> Result<CrrResult> {
        let mut args = vec!["crr".to_owned()];
        for t in self.targets(path) {
            args.extend(["--target".to_owned(), t.to_string()]);
        }
        args.extend([
            "--threads".to_owned(),
            self.settings.threads.to_string(),
            "--duration".to_owned(),
            secs.to_string(),
            "--warmup".to_owned(),
            warmup.to_string(),
        ]);
        let limit = Duration::from_secs_f64(secs + warmup + 30.0);
        self.loadgen(&args, path, limit)
    }

    fn rr(&self, path: PathKind) -> Result<RrResult> {
        let args = vec![
            "rr".to_owned(),
            "--target".to_owned(),
            self.targets(path)[0].to_string(),
            "--count".to_owned(),
            self.settings.rr_count.to_string(),
            "--warmup".to_owned(),
            (self.settings.rr_count / 10).to_string(),
        ];
        self.loadgen(&args, path, Duration::from_secs(120))
    }

    fn bulk(&self, path: PathKind, conns: usize) -> Result<BulkResult> {
        let mut args = vec!["bulk".to_owned()];
        for t in self.targets(path) {
            args.extend(["--target".to_owned(), t.to_string()]);
        }
        args.extend([
            "--conns".to_owned(),
            conns.to_string(),
            "--bytes".to_owned(),
            self.settings.bulk_bytes.to_string(),
        ]);
        self.loadgen(&args, path, Duration::from_secs(180))
    }

    /// Installs the case, measures, removes what it installed.
    fn run_case(
        &mut self,
        case: Case,
        round: usize,
        position: usize,
        full: bool,
        secs: f64,
        warmup: f64,
    ) -> Result<Run> {
        signal::check()?;
        let started = Instant::now();
        let installed = self.install(case)?;
        let setup_secs = started.elapsed().as_secs_f64();
        let loadavg = loadavg_1m();
        let conntrack_before = conntrack_count();
        let agent_cpu = self.agent.cpu_secs();
        let t = Instant::now();
        let crr = self.crr(case.path, secs, warmup)?;
        let agent_cpu_percent = self
            .agent
            .cpu_secs()
            .zip(agent_cpu)
            .map(|(b, a)| (b - a) / t.elapsed().as_secs_f64() * 100.0);
        let conntrack_after = conntrack_count();
        let (rr, bulk_1conn, bulk_4conn) = if full {
            (
                Some(self.rr(case.path)?),
                Some(self.bulk(case.path, 1)?),
                Some(self.bulk(case.path, 4)?),
            )
        } else {
            (None, None, None)
        };
        drop(installed);
        self.check_run(case, &crr);
        Ok(Run {
            round,
            position,
            path: case.path,
            others: case.others,
            setup_secs,
            loadavg_1m: loadavg,
            conntrack_before,
            conntrack_after,
            agent_cpu_percent,
            crr,
            rr,
            bulk_1conn,
            bulk_4conn,
        })
    }

    /// Sanity: no errors, and paths that balance spread connections over all backends.
    fn check_run(&mut self, case: Case, crr: &CrrResult) {
        if crr.errors > 0 {
            self.warn(format!(
                "{}: {} failed connections in the window",
                case.label(),
                crr.errors
            ));
        }
        let balanced = case.path != PathKind::Direct1;
        if balanced && crr.conns > 0 {
            let n = self.backends.len();
            let counts: Vec<u64> = (0..n)
                .map(|i| crr.per_backend.get(i).copied().unwrap_or(0))
                .collect();
            let min = counts.iter().copied().min().unwrap_or(0) as f64;
            let max = counts.iter().copied().max().unwrap_or(0) as f64;
            if min < max * 0.8 {
                self.warn(format!(
                    "{}: uneven split over the backends: {counts:?}",
                    case.label()
                ));
            }
        }
    }

    pub fn warn(&mut self, message: String) {
        println!("bench: WARNING: {message}");
        self.warnings.push(message);
    }

    /// The warm-up pass (results kept apart) and the measured rounds.
    pub fn rounds(&mut self) -> Result<(Vec<Run>, Vec<Run>)> {
        let s = self.settings;
        let main: Vec<Case> = MAIN_PATHS
            .iter()
            .map(|&path| Case { path, others: 0 })
            .collect();
        let scaled: Vec<Case> = SCALED_PATHS
            .iter()
            .flat_map(|&path| {
                s.scale_levels
                    .iter()
                    .map(move |&others| Case { path, others })
            })
            .collect();
        let cases: Vec<Case> = main.iter().chain(&scaled).copied().collect();

        println!(
            "\n==> bench: warm-up pass ({} paths, {:.1} s each, not counted)",
            main.len(),
            s.warmup_pass_secs
        );
        let mut warmups = Vec::new();
        for (i, &case) in main.iter().enumerate() {
            match self.run_case(case, 0, i, false, s.warmup_pass_secs, 0.2) {
                Ok(run) => {
                    println!(
                        "  warm-up {:<16} {:>9.0} conn/s",
                        case.label(),
                        run.crr.conns_per_sec
                    );
                    warmups.push(run);
                }
                Err(e) if e.downcast_ref::<signal::Interrupted>().is_some() => return Err(e),
                Err(e) => self.warn(format!("warm-up: {} failed: {e:#}", case.label())),
            }
        }

        let mut runs = Vec::new();
        for round in 0..s.rounds {
            let order = round_order(&cases, round, s.rounds);
            println!(
                "\n==> bench: round {}/{} (order: {})",
                round + 1,
                s.rounds,
                order.iter().map(Case::label).collect::<Vec<_>>().join(", ")
            );
            for (position, &case) in order.iter().enumerate() {
                let full = case.others == 0;
                match self.run_case(case, round, position, full, s.crr_secs, s.crr_warmup) {
                    Ok(run) => {
                        print_run(&run);
                        runs.push(run);
                    }
                    Err(e) if e.downcast_ref::<signal::Interrupted>().is_some() => return Err(e),
                    // One failed case must not lose the whole run: it is reported and skipped.
                    Err(e) => self.warn(format!(
                        "round {}: {} skipped: {e:#}",
                        round + 1,
                        case.label()
                    )),
                }
            }
        }
        self.set_mesh_others(0)?;
        Ok((warmups, runs))
    }
}

/// Round `r` starts at a different case each time, and odd rounds go backwards, so no path
/// always follows the same neighbour or always runs first.
pub fn round_order(cases: &[Case], round: usize, rounds: usize) -> Vec<Case> {
    let n = cases.len();
    let offset = (round * n) / rounds.max(1);
    let mut order: Vec<Case> = (0..n).map(|i| cases[(i + offset) % n]).collect();
    if round % 2 == 1 {
        order.reverse();
    }
    order
}

fn print_run(run: &Run) {
    let case = Case {
        path: run.path,
        others: run.others,
    };
    let mut line = format!(
        "  {:<16} {:>9.0} conn/s  p50 {:>6.0} us  p99 {:>6.0} us  ({} conns, setup {:.2} s)",
        case.label(),
        run.crr.conns_per_sec,
        run.crr.latency_us.p50,
        run.crr.latency_us.p99,
        run.crr.conns,
        run.setup_secs
    );
    if let Some(rr) = &run.rr {
        line.push_str(&format!("  rr p50 {:.1} us", rr.latency_us.p50));
    }
    if let (Some(b1), Some(b4)) = (&run.bulk_1conn, &run.bulk_4conn) {
        line.push_str(&format!(
            "  bulk {:.2}/{:.2} GB/s",
            b1.gbytes_per_sec, b4.gbytes_per_sec
        ));
    }
    println!("{line}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cases(n: usize) -> Vec<Case> {
        (0..n)
            .map(|others| Case {
                path: PathKind::Mesh,
                others,
            })
            .collect()
    }

    #[test]
    fn every_round_runs_every_case_once_and_starts_elsewhere() {
        let all = cases(18);
        let firsts: Vec<usize> = (0..5)
            .map(|round| {
                let order = round_order(&all, round, 5);
                let mut seen: Vec<usize> = order.iter().map(|c| c.others).collect();
                seen.sort_unstable();
                assert_eq!(seen, (0..18).collect::<Vec<_>>());
                order[0].others
            })
            .collect();
        let mut distinct = firsts.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), firsts.len(), "first cases: {firsts:?}");
    }
}
