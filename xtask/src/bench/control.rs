//! Control-plane measurements: time to program services cold and as a diff, config edit to
//! data path, agent RSS and CPU, and (if the agent has them) health checks.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

use super::mesh::{
    Agent, ServiceConf, catalog_services, config_text, limits_for, shared_backend_services,
};
use super::procs::{Proc, line_reader};
use super::system::{Cgroup, monotonic_ns, scratch_name};
use super::{CONTROL_METRICS_PORT, Settings, VICTIM_PORT, local};
use crate::signal;
use crate::util::cmd;

const PROBE_VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(127, 101, 9, 1), 80);
const EJECT_VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(127, 101, 9, 3), 80);

#[derive(Debug, Clone, Serialize)]
pub struct ColdRun {
    pub services: usize,
    pub repeat: usize,
    /// Agent process start to /readyz answering 200 (the agent turns ready only after the
    /// first reconcile has written every service).
    pub ready_secs: f64,
    /// The agent's own reconcile time (mesh_reconcile_duration_seconds_sum), if exposed.
    pub reconcile_secs: Option<f64>,
    /// The first GET /metrics after ready: duration and body size.
    pub scrape_secs: Option<f64>,
    pub scrape_bytes: Option<usize>,
    /// VmRSS after that scrape.
    pub rss_after_scrape_kib: Option<u64>,
    /// `mesh services` listed exactly `services` right after ready.
    pub listed_all: bool,
    /// How long that `mesh services -o json` call took.
    pub list_secs: f64,
    pub rss_kib: Option<u64>,
    /// CPU the agent used from start to ready, seconds.
    pub startup_cpu_secs: Option<f64>,
}

/// An agent start that did not reach ready.
#[derive(Debug, Clone, Serialize)]
pub struct ColdFailure {
    pub services: usize,
    pub attempt: usize,
    pub error: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct AgentUsage {
    pub services: usize,
    pub rss_kib: Option<u64>,
    /// CPU over the window, percent of one core.
    pub cpu_percent: Option<f64>,
    pub window_secs: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ChangeResults {
    /// Services configured besides the probed one.
    pub others: usize,
    /// The agent's `[agent] resync` period, ms (None: its default, 30 s).
    pub resync_ms: Option<u64>,
    /// Config file rename to the first connection that reached the new backend set, ms.
    pub latency_ms: Vec<f64>,
    /// When each of those edits was written (Unix time, ms), to match slow ones with the
    /// agent's log.
    pub written_unix_ms: Vec<u64>,
    /// Changes the client did not see within the limit.
    pub missed: usize,
    /// Changes during which the client saw a refused or failed connection.
    pub with_failed_connects: usize,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct DiffResults {
    pub base_services: usize,
    pub added: usize,
    /// Rename of the config (+1k services) to the first connection through a new service.
    pub add_to_data_path_secs: Vec<f64>,
    /// Rename to `mesh services` listing all of them (includes the CLI's own run time).
    pub add_to_listed_secs: Vec<f64>,
    /// Rename of the config (-1k services) until the removed VIP is no longer translated.
    pub remove_to_data_path_secs: Vec<f64>,
    /// Repeats whose edit the agent did not apply.
    pub failures: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct HealthResults {
    /// Whether an agent accepted `[services.health] type = "tcp"`; None if not tried.
    pub config_accepted: Option<bool>,
    /// Kill of a backend to `mesh services` showing it with 0 slots, seconds.
    pub ejection_secs: Option<f64>,
    pub ejection_settings: String,
    /// RSS and CPU at 10k services with tcp checks (default settings) on every service.
    pub usage_with_checks: Option<AgentUsage>,
    /// RSS and CPU at 10k services over 1k distinct backends with 1 s tcp checks (checks are
    /// shared per backend and settings: 1k probes, not 40k).
    pub usage_shared_1k: Option<AgentUsage>,
    pub note: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ControlResults {
    pub cold: Vec<ColdRun>,
    pub cold_failures: Vec<ColdFailure>,
    pub idle_10k: Option<AgentUsage>,
    pub diff: Option<DiffResults>,
    pub change_small: Option<ChangeResults>,
    pub change_10k: Option<ChangeResults>,
    /// `--control`: the edits at 10k again with a short resync period.
    pub change_10k_stress: Option<ChangeResults>,
    pub health: HealthResults,
    pub errors: Vec<String>,
}

/// `loadgen probe` in the control-plane cgroup: prints `<backend id> <monotonic ns>` when the
/// answer to its connects changes (255: refused or failed).
struct Probe {
    _proc: Proc,
    lines: Receiver<String>,
}

impl Probe {
    fn start(loadgen: &Path, cgroup: &Path, target: SocketAddrV4, dir: &Path) -> Result<Probe> {
        let mut command = cmd(loadgen, ["probe", "--target"]);
        command
            .arg(target.to_string())
            .arg("--cgroup")
            .arg(cgroup)
            .args(["--max-seconds", "900"]);
        let (proc, stdout) = Proc::spawn_piped("loadgen probe", command, &dir.join("probe.log"))?;
        Ok(Probe {
            _proc: proc,
            lines: line_reader(stdout),
        })
    }

    /// [`Probe::wait_for`], failing early if `agent` logs (after byte `offset`) that it could
    /// not apply the config.
    fn wait_applied(
        &self,
        agent: &Agent,
        offset: u64,
        want: impl Fn(u8) -> bool + Copy,
        limit: Duration,
    ) -> Result<Option<(u64, bool)>> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(found) = self.wait_for(want, Duration::from_millis(200))? {
                return Ok(Some(found));
            }
            if let Some(line) = agent.failure_since(offset) {
                bail!("the agent did not apply the config: {line}");
            }
        }
        Ok(None)
    }

    fn drain(&self) {
        while self.lines.try_recv().is_ok() {}
    }

    /// Waits for a line whose id satisfies `want`: its timestamp and whether a 255 came first.
    fn wait_for(&self, want: impl Fn(u8) -> bool, limit: Duration) -> Result<Option<(u64, bool)>> {
        let deadline = Instant::now() + limit;
        let mut failed_first = false;
        loop {
            signal::check()?;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(100)))
            {
                Ok(line) => {
                    let mut parts = line.split_ascii_whitespace();
                    let id: u8 = parts.next().and_then(|v| v.parse().ok()).unwrap_or(255);
                    let at: u64 = parts.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                    if want(id) {
                        return Ok(Some((at, failed_first)));
                    }
                    if id == 255 {
                        failed_first = true;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => bail!("loadgen probe exited"),
            }
        }
    }
}

pub struct ControlPlane<'a> {
    pub settings: &'a Settings,
    pub mesh: PathBuf,
    pub loadgen: PathBuf,
    pub dir: PathBuf,
    pub backends: Vec<SocketAddr>,
    /// Address of the extra backend the ejection test kills.
    pub victim: SocketAddr,
    pub metrics: SocketAddr,
    pub agents_started: usize,
    pub results: ControlResults,
    /// Where to keep the logs of the agents the 10k edits ran against (`--control`).
    pub keep_logs: Option<PathBuf>,
}

impl<'a> ControlPlane<'a> {
    /// A control plane run against `backends` (the bench's servers), with agents' files in
    /// `dir`; `keep_logs`: where to keep the logs of the 10k-edit agents.
    pub fn new(
        settings: &'a Settings,
        binaries: (PathBuf, PathBuf),
        dir: PathBuf,
        backends: Vec<SocketAddr>,
        keep_logs: Option<PathBuf>,
    ) -> Self {
        let (mesh, loadgen) = binaries;
        ControlPlane {
            settings,
            mesh,
            loadgen,
            dir,
            backends,
            victim: local(VICTIM_PORT),
            metrics: local(CONTROL_METRICS_PORT),
            agents_started: 0,
            results: ControlResults::default(),
            keep_logs,
        }
    }

    fn start_agent(&mut self, cgroup: &Cgroup, config: &str) -> Result<Agent> {
        self.agents_started += 1;
        let name = format!("cp-{}", self.agents_started);
        let bpffs = Path::new(super::system::BPFFS).join(scratch_name(&name));
        Agent::start(
            &self.mesh,
            &self.dir,
            &name,
            config,
            cgroup.path(),
            &bpffs,
            self.metrics,
        )
    }

    /// Runs every measurement; one that fails is recorded in `results.errors` and the next
    /// one still runs (a signal stops everything).
    pub fn run(&mut self) -> Result<()> {
        let cgroup = Cgroup::create(&scratch_name("cp"))?;
        let sizes = self.settings.cp_sizes.clone();
        for &size in &sizes {
            let result = self.cold_size(&cgroup, size);
            self.keep_going(result, &format!("cold start with {size} services"))?;
        }
        let result = self.change_small(&cgroup);
        self.keep_going(result, "config edit to data path (1 service)")?;
        let result = self.health(&cgroup);
        self.keep_going(result, "health checks")?;
        Ok(())
    }

    /// Only the programming, edit and RSS measurements, no health checks (`cargo xtask bench
    /// --control`); with `stress_resync_ms` set, the 10k edits once more with that resync.
    pub fn run_control(&mut self) -> Result<()> {
        let cgroup = Cgroup::create(&scratch_name("cp"))?;
        let sizes = self.settings.cp_sizes.clone();
        for &size in &sizes {
            let result = self.cold_size(&cgroup, size);
            self.keep_going(result, &format!("cold start with {size} services"))?;
        }
        let result = self.change_small(&cgroup);
        self.keep_going(result, "config edit to data path (1 service)")?;
        if let Some(resync) = self.settings.stress_resync_ms {
            let base = catalog_services(10_000, None);
            let result = self
                .change_10k(&cgroup, &base, Some(resync))
                .map(|change| self.results.change_10k_stress = Some(change));
            self.keep_going(result, "config edits at 10k services, short resync")?;
        }
        Ok(())
    }

    /// Only the health-check part (`cargo xtask bench --health`).
    pub fn run_health(&mut self) -> Result<()> {
        let cgroup = Cgroup::create(&scratch_name("cp"))?;
        self.health(&cgroup)
    }

    fn keep_going(&mut self, result: Result<()>, what: &str) -> Result<()> {
        match result {
            Err(e) if e.downcast_ref::<signal::Interrupted>().is_some() => Err(e),
            Err(e) => {
                self.error(format!("{what}: {e:#}"));
                Ok(())
            }
            Ok(()) => Ok(()),
        }
    }

    fn cold_size(&mut self, cgroup: &Cgroup, size: usize) -> Result<()> {
        println!("\n==> bench: control plane: {size} services, cold start");
        let services = catalog_services(size, None);
        let refs: Vec<&ServiceConf> = services.iter().collect();
        let text = format!("{}{}", limits_for(size), config_text(&refs));
        // A start that fails is recorded and retried, up to two extra attempts in all.
        let wanted = self.settings.cp_repeats;
        let mut repeat = 0;
        let mut attempts = 0;
        let mut measured_10k = false;
        while repeat < wanted && attempts < wanted + 2 {
            attempts += 1;
            let mut agent = self.start_agent(cgroup, &text)?;
            let mut cold = match cold_run(&mut agent, size, repeat) {
                Ok(cold) => cold,
                Err(e) if e.downcast_ref::<signal::Interrupted>().is_some() => return Err(e),
                Err(e) => {
                    let tail = agent.log_tail();
                    let lines: Vec<&str> = tail
                        .lines()
                        .filter(|l| l.starts_with("Error:") || l.contains("os error"))
                        .map(str::trim)
                        .collect();
                    let why = if lines.is_empty() {
                        format!("{e:#}")
                    } else {
                        lines.join(" / ")
                    };
                    self.error(format!("cold start with {size} services failed: {why}"));
                    self.results.cold_failures.push(ColdFailure {
                        services: size,
                        attempt: attempts,
                        error: why,
                    });
                    continue;
                }
            };
            let at_10k = size == 10_000 && !measured_10k;
            if at_10k {
                // Before anything scrapes /metrics.
                self.idle_10k(&agent, size)?;
            }
            scrape(&agent, &mut cold);
            println!(
                "  {size} services: ready in {:.3} s (reconcile {}), listed: {}, RSS {:.1} MB, \
                 after one /metrics scrape ({:.1} MB in {:.2} s) {:.1} MB",
                cold.ready_secs,
                cold.reconcile_secs
                    .map_or_else(|| "n/a".to_owned(), |s| format!("{s:.3} s")),
                cold.listed_all,
                mb(cold.rss_kib),
                cold.scrape_bytes.unwrap_or(0) as f64 / 1e6,
                cold.scrape_secs.unwrap_or(f64::NAN),
                mb(cold.rss_after_scrape_kib),
            );
            self.results.cold.push(cold);
            repeat += 1;
            if at_10k {
                measured_10k = true;
                let result = self.at_10k(cgroup, &mut agent, &services);
                self.keep_going(result, "diff +1k services at 10k")?;
                drop(agent);
                let result = self
                    .change_10k(cgroup, &services, None)
                    .map(|change| self.results.change_10k = Some(change));
                self.keep_going(result, "config edits at 10k services")?;
            }
        }
        Ok(())
    }

    fn change_small(&mut self, cgroup: &Cgroup) -> Result<()> {
        println!("\n==> bench: control plane: config edit to data path (1 service)");
        let mut agent = self.start_agent(cgroup, &config_text(&[]))?;
        agent.wait_ready(Duration::from_secs(60))?;
        let probe = Probe::start(&self.loadgen, cgroup.path(), PROBE_VIP, &self.dir)?;
        let small = self.change_latency(&agent, &probe, &[], "", self.settings.changes, 40)?;
        print_change(&small);
        self.results.change_small = Some(small);
        Ok(())
    }

    fn idle_10k(&mut self, agent: &Agent, services: usize) -> Result<()> {
        let usage = measure_usage(agent, services, self.settings.idle_secs)?;
        println!(
            "  idle at 10k: RSS {:.1} MB, CPU {:.2}% of a core",
            mb(usage.rss_kib),
            usage.cpu_percent.unwrap_or(0.0)
        );
        self.results.idle_10k = Some(usage);
        Ok(())
    }

    /// With the 10k-service agent: the diff (+1k services, then -1k).
    fn at_10k(&mut self, cgroup: &Cgroup, agent: &mut Agent, base: &[ServiceConf]) -> Result<()> {
        println!("\n==> bench: control plane: diff, 10k -> 11k services");
        let probe = Probe::start(&self.loadgen, cgroup.path(), PROBE_VIP, &self.dir)?;
        let all = catalog_services(base.len() + 999, None);
        let probe_svc = ServiceConf::new("probe", PROBE_VIP, self.backends.clone());
        let grown: Vec<&ServiceConf> = all.iter().chain([&probe_svc]).collect();
        let grown_text = config_text(&grown);
        let base_refs: Vec<&ServiceConf> = base.iter().collect();
        let base_text = config_text(&base_refs);
        let mut diff = DiffResults {
            base_services: base.len(),
            added: grown.len() - base.len(),
            ..DiffResults::default()
        };
        // The probe sees "refused" while its VIP is not configured.
        probe.wait_for(|id| id == 255, Duration::from_secs(10))?;
        for repeat in 0..self.settings.diff_repeats {
            match self.diff_once(
                agent,
                &probe,
                &grown_text,
                grown.len(),
                &base_text,
                base.len(),
            ) {
                Ok((add, listed, remove)) => {
                    diff.add_to_data_path_secs.push(add);
                    diff.add_to_listed_secs.push(listed);
                    diff.remove_to_data_path_secs.push(remove);
                }
                Err(e) if e.downcast_ref::<signal::Interrupted>().is_some() => return Err(e),
                Err(e) => {
                    let why = format!("repeat {}: {e:#}", repeat + 1);
                    self.error(format!("diff +{} services: {why}", diff.added));
                    diff.failures.push(why);
                    // Back to the base config, cold, so the next repeat starts clean.
                    let restarted = agent
                        .restart(&base_text)
                        .and_then(|()| agent.wait_ready(Duration::from_secs(300)));
                    if let Err(e) = restarted {
                        let why = format!("restart after repeat {}: {e:#}", repeat + 1);
                        self.error(format!("diff +{} services: {why}", diff.added));
                        diff.failures.push(why);
                        break;
                    }
                    probe.drain();
                }
            }
        }
        println!(
            "  +{} services: data path {:?} s, listed {:?} s; -{}: data path {:?} s",
            diff.added,
            rounded(&diff.add_to_data_path_secs),
            rounded(&diff.add_to_listed_secs),
            diff.added,
            rounded(&diff.remove_to_data_path_secs)
        );
        self.results.diff = Some(diff);

        Ok(())
    }

    /// Config edits with 10k other services, on a fresh agent (whatever the diff left behind
    /// does not carry over); `resync_ms`: the agent's `[agent] resync` (None: its default).
    fn change_10k(
        &mut self,
        cgroup: &Cgroup,
        base: &[ServiceConf],
        resync_ms: Option<u64>,
    ) -> Result<ChangeResults> {
        let agent_table = resync_ms.map_or_else(String::new, |ms| {
            format!("[agent]\nresync = \"{ms}ms\"\n\n")
        });
        println!(
            "\n==> bench: control plane: config edit to data path (10k other services, resync {})",
            resync_ms.map_or_else(|| "default".to_owned(), |ms| format!("{ms} ms"))
        );
        let probe_svc = ServiceConf::new("probe", PROBE_VIP, vec![self.backends[0]]);
        let all: Vec<&ServiceConf> = base.iter().chain([&probe_svc]).collect();
        let mut agent = self.start_agent(cgroup, &format!("{agent_table}{}", config_text(&all)))?;
        agent.wait_ready(Duration::from_secs(300))?;
        let probe = Probe::start(&self.loadgen, cgroup.path(), PROBE_VIP, &self.dir)?;
        let mut change = self.change_latency(
            &agent,
            &probe,
            base,
            &agent_table,
            self.settings.changes_10k,
            self.settings.edit_gap_10k_ms,
        )?;
        change.resync_ms = resync_ms;
        print_change(&change);
        if let Some(dir) = &self.keep_logs {
            let kept = dir.join(format!("{}.log", agent.name()));
            match std::fs::create_dir_all(dir).and_then(|()| std::fs::copy(agent.log_path(), &kept))
            {
                Ok(_) => println!("  agent log kept: {}", kept.display()),
                Err(e) => eprintln!("bench: warning: keeping {}: {e}", kept.display()),
            }
        }
        Ok(change)
    }

    /// One +1k / -1k edit pair: (add to data path, add to listed, remove to data path), s.
    fn diff_once(
        &mut self,
        agent: &mut Agent,
        probe: &Probe,
        grown_text: &str,
        grown: usize,
        base_text: &str,
        base: usize,
    ) -> Result<(f64, f64, f64)> {
        let limit = Duration::from_secs(60);
        probe.drain();
        let offset = agent.log_len();
        let written = agent.write_config(grown_text)?;
        let (at, _) = probe
            .wait_applied(agent, offset, |id| id != 255, limit)?
            .context("the added probe service never took traffic")?;
        let add = at.saturating_sub(written) as f64 / 1e9;
        agent.wait_services(grown, Duration::from_secs(120), offset)?;
        let listed = monotonic_ns().saturating_sub(written) as f64 / 1e9;

        probe.drain();
        let offset = agent.log_len();
        let written = agent.write_config(base_text)?;
        let (at, _) = probe
            .wait_applied(agent, offset, |id| id == 255, limit)?
            .context("the removed probe service kept taking traffic")?;
        let remove = at.saturating_sub(written) as f64 / 1e9;
        agent.wait_services(base, Duration::from_secs(120), offset)?;
        Ok((add, listed, remove))
    }

    /// Switches the probe service between backend 0 and backend 1 by config edits (each file
    /// starts with `agent_table`); the time from each rename to the first connection the new
    /// backend answered. Edits are `gap_ms` and a few ms apart, plus the previous one's latency.
    fn change_latency(
        &mut self,
        agent: &Agent,
        probe: &Probe,
        others: &[ServiceConf],
        agent_table: &str,
        changes: usize,
        gap_ms: u64,
    ) -> Result<ChangeResults> {
        let texts: Vec<String> = (0..2)
            .map(|i| {
                let svc = ServiceConf::new("probe", PROBE_VIP, vec![self.backends[i]]);
                let all: Vec<&ServiceConf> = others.iter().chain([&svc]).collect();
                format!("{agent_table}{}", config_text(&all))
            })
            .collect();
        let mut result = ChangeResults {
            others: others.len(),
            ..ChangeResults::default()
        };
        agent.write_config(&texts[0])?;
        if probe
            .wait_for(|id| id == 0, Duration::from_secs(60))?
            .is_none()
        {
            bail!(
                "the probe service never reached backend 0:\n{}",
                agent.log_tail()
            );
        }
        for k in 0..changes {
            let want = ((k + 1) % 2) as u8;
            // Spread the edits over the agent's timers instead of a fixed beat.
            std::thread::sleep(Duration::from_millis(gap_ms + (k as u64 * 7) % 23));
            probe.drain();
            let written = agent.write_config(&texts[usize::from(want)])?;
            let written_unix_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            match probe.wait_for(|id| id == want, Duration::from_secs(10))? {
                Some((at, failed)) => {
                    result
                        .latency_ms
                        .push(at.saturating_sub(written) as f64 / 1e6);
                    result.written_unix_ms.push(written_unix_ms);
                    if failed {
                        result.with_failed_connects += 1;
                    }
                }
                None => {
                    result.missed += 1;
                    // Back to a known state before the next edit.
                    let want = usize::from(want);
                    agent.write_config(&texts[want])?;
                    probe.wait_for(|id| usize::from(id) == want, Duration::from_secs(30))?;
                }
            }
        }
        Ok(result)
    }

    fn error(&mut self, message: String) {
        println!("bench: WARNING: {message}");
        self.results.errors.push(message);
    }

    /// Time to ejection of a killed backend with tcp checks, and usage at 10k with checks.
    fn health(&mut self, cgroup: &Cgroup) -> Result<()> {
        println!("\n==> bench: control plane: health checks (tcp)");
        let settings =
            "type = \"tcp\"\ninterval = \"100ms\"\ntimeout = \"50ms\"\nfall = 2\nrise = 1";
        self.results.health.ejection_settings = settings.replace('\n', ", ");
        let mut svc = ServiceConf::new("eject", EJECT_VIP, vec![self.backends[0], self.victim]);
        svc.health = Some(settings.to_owned());
        let mut victim = {
            let mut command = cmd(&self.loadgen, ["serve", "--id", "3", "--addr"]);
            command.arg(self.victim.to_string());
            Proc::spawn("victim backend", command, &self.dir.join("victim.log"))?
        };
        super::system::wait_listening(self.victim, Duration::from_secs(10))?;
        let mut agent = self.start_agent(cgroup, &config_text(&[&svc]))?;
        if let Err(e) = agent.wait_ready(Duration::from_secs(30)) {
            self.results.health.config_accepted = Some(false);
            self.results.health.note = format!(
                "the agent did not start with [services.health] type = \"tcp\": {}",
                first_line(&format!("{e:#}"))
            );
            println!("  {}", self.results.health.note);
            return Ok(());
        }
        self.results.health.config_accepted = Some(true);
        // Let the checks settle with both backends up.
        std::thread::sleep(Duration::from_millis(800));
        let before = agent.backend_slots("eject", self.victim)?;
        if before.unwrap_or(0) == 0 {
            self.results.health.note = format!(
                "the live backend had no slots before the kill ({before:?}); ejection not measured"
            );
            println!("  {}", self.results.health.note);
        } else {
            victim.kill_now();
            let killed = Instant::now();
            let limit = Duration::from_secs(10);
            loop {
                signal::check()?;
                let slots = agent.backend_slots("eject", self.victim)?;
                if slots.unwrap_or(0) == 0 {
                    let secs = killed.elapsed().as_secs_f64();
                    self.results.health.ejection_secs = Some(secs);
                    println!(
                        "  killed backend ejected after {:.3} s ({settings:?})",
                        secs
                    );
                    break;
                }
                if killed.elapsed() >= limit {
                    self.results.health.note = format!(
                        "health config accepted, but the killed backend still had {slots:?} slots \
                         {} s later: checks do not eject in this build; ejection not measured",
                        limit.as_secs()
                    );
                    println!("  {}", self.results.health.note);
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        drop(agent);
        drop(victim);

        let size = 10_000;
        let services = catalog_services(size, Some("type = \"tcp\""));
        self.results.health.usage_with_checks = self.usage_with_checks(
            cgroup,
            &services,
            "10k services with tcp checks (default interval, 40k backends that refuse)",
        )?;
        let services = shared_backend_services(size, 1_000, "type = \"tcp\"\ninterval = \"1s\"");
        self.results.health.usage_shared_1k = self.usage_with_checks(
            cgroup,
            &services,
            "10k services over 1k distinct backends (refusing), tcp checks every 1 s",
        )?;
        Ok(())
    }

    /// The agent's RSS and CPU with `services`, once their checks settled; None (an error
    /// recorded) if the agent did not get ready.
    fn usage_with_checks(
        &mut self,
        cgroup: &Cgroup,
        services: &[ServiceConf],
        what: &str,
    ) -> Result<Option<AgentUsage>> {
        let refs: Vec<&ServiceConf> = services.iter().collect();
        let mut agent = self.start_agent(cgroup, &config_text(&refs))?;
        match agent.wait_ready(Duration::from_secs(300)) {
            Ok(_) => {
                settle_checks(&agent)?;
                let usage = measure_usage(&agent, services.len(), self.settings.idle_secs)?;
                println!(
                    "  {what}: RSS {:.1} MB, CPU {:.1}% of a core",
                    mb(usage.rss_kib),
                    usage.cpu_percent.unwrap_or(0.0)
                );
                Ok(Some(usage))
            }
            Err(e) => {
                self.error(format!("{what}: {}", first_line(&format!("{e:#}"))));
                Ok(None)
            }
        }
    }
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or("")
}

fn rounded(values: &[f64]) -> Vec<f64> {
    values
        .iter()
        .map(|v| (v * 1000.0).round() / 1000.0)
        .collect()
}

fn print_change(c: &ChangeResults) {
    let mut sorted = c.latency_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let at = |q: f64| {
        if sorted.is_empty() {
            f64::NAN
        } else {
            sorted[((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1]
        }
    };
    println!(
        "  {} changes (+{} other services{}): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms, missed {}, with failed connects {}",
        c.latency_ms.len(),
        c.others,
        c.resync_ms
            .map_or_else(String::new, |ms| format!(", resync every {ms} ms")),
        at(0.5),
        at(0.99),
        sorted.last().copied().unwrap_or(f64::NAN),
        c.missed,
        c.with_failed_connects
    );
}

/// RSS in MB (10^6 bytes).
pub fn mb(kib: Option<u64>) -> f64 {
    kib.map_or(f64::NAN, |k| k as f64 * 1024.0 / 1e6)
}

/// One GET /metrics: its time and size, the reconcile time it reports, and RSS after it.
fn scrape(agent: &Agent, cold: &mut ColdRun) {
    let t = Instant::now();
    if let Ok((200, body)) = super::system::http_get(agent.metrics, "/metrics") {
        cold.scrape_secs = Some(t.elapsed().as_secs_f64());
        cold.scrape_bytes = Some(body.len());
        cold.reconcile_secs = body
            .lines()
            .find(|l| l.starts_with("mesh_reconcile_duration_seconds_sum"))
            .and_then(|l| l.split_ascii_whitespace().last()?.parse().ok());
    }
    cold.rss_after_scrape_kib = agent.rss_kib();
}

fn cold_run(agent: &mut Agent, size: usize, repeat: usize) -> Result<ColdRun> {
    let ready = agent
        .wait_ready(Duration::from_secs(300))
        .with_context(|| format!("cold start with {size} services"))?;
    let startup_cpu_secs = agent.cpu_secs();
    let rss_kib = agent.rss_kib();
    let t = Instant::now();
    let listed = agent.service_count()?;
    Ok(ColdRun {
        services: size,
        repeat,
        ready_secs: ready.as_secs_f64(),
        reconcile_secs: None,
        scrape_secs: None,
        scrape_bytes: None,
        rss_after_scrape_kib: None,
        listed_all: listed == size,
        list_secs: t.elapsed().as_secs_f64(),
        rss_kib,
        startup_cpu_secs,
    })
}

/// Waits until every check has reached its first verdict (the backends refuse: `fall` = 3
/// failures 1 s apart) and the agent has logged and applied the resulting transitions (one per
/// target: its log stops growing for 2 s), at most 120 s, so the window measures checking, not
/// that burst.
fn settle_checks(agent: &Agent) -> Result<()> {
    let start = Instant::now();
    let mut last = (agent.log_len(), Instant::now());
    while start.elapsed() < Duration::from_secs(120) {
        signal::check()?;
        std::thread::sleep(Duration::from_millis(100));
        let len = agent.log_len();
        if len != last.0 {
            last = (len, Instant::now());
        } else if start.elapsed() >= Duration::from_secs(5)
            && last.1.elapsed() >= Duration::from_secs(2)
        {
            println!(
                "  checks settled after {:.1} s (log quiet for 2 s)",
                start.elapsed().as_secs_f64()
            );
            return Ok(());
        }
    }
    println!("  checks did not settle within 120 s: measuring anyway");
    Ok(())
}

fn measure_usage(agent: &Agent, services: usize, secs: f64) -> Result<AgentUsage> {
    let cpu0 = agent.cpu_secs();
    let t = Instant::now();
    let deadline = t + Duration::from_secs_f64(secs);
    while Instant::now() < deadline {
        signal::check()?;
        std::thread::sleep(Duration::from_millis(50));
    }
    let window = t.elapsed().as_secs_f64();
    let cpu1 = agent.cpu_secs();
    Ok(AgentUsage {
        services,
        rss_kib: agent.rss_kib(),
        cpu_percent: cpu0.zip(cpu1).map(|(a, b)| (b - a) / window * 100.0),
        window_secs: window,
    })
}
