//! `cargo xtask bench [--quick]`: mesh side by side with its alternatives, in one run, with the
//! same backends and the same client for every path.
//!
//! Paths: `direct-rr` (the client rotates over the backends itself: the fair ceiling),
//! `direct-1` (one backend), `mesh` (VIP rewritten at connect() by the agent's programs; only
//! this client runs inside the agent's cgroup), `iptables` (nat OUTPUT DNAT with statistic nth,
//! like kube-proxy's iptables mode), `nftables` (verdict map + numgen, like kube-proxy's
//! nftables mode) and `haproxy` (mode tcp, roundrobin). Backends and client are `loadgen`
//! (xtask/src/bin/loadgen.rs).
//!
//! Measured: connection rate (TCP_CRR-like) with per-connection latency and whole-machine CPU
//! per connection, 1-byte request latency on an established connection (TCP_RR-like), bulk
//! upload throughput over 1 and 4 connections, the connection rate with 1..10k other services
//! configured (mesh, iptables, nftables), and the control plane (programming time, config edit
//! to data path, agent RSS/CPU, health checks if the agent has them).
//!
//! Rounds interleave every case and rotate the order; a warm-up pass is not counted. Reports
//! medians and min-max spreads. Nothing here asserts a timing: a run that completes exits 0.
//! Output: a printed report, `target/bench/results.json` (every raw number),
//! `target/bench/results.md` and `target/bench/ratios.svg`.

mod baselines;
mod chart;
mod control;
mod dataplane;
mod kernel_cost;
mod mesh;
mod nodeport;
mod procs;
mod proto;
mod report;
mod system;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use serde::Serialize;

use crate::build::{self, Profile};
use crate::util::{Run as _, cargo, cmd, target_dir};
use crate::{setup, signal};

use control::{ControlPlane, ControlResults};
use dataplane::{Case, DataPlane, MAIN_PATHS, Run, SCALED_PATHS};
use procs::Proc;
use system::{Cgroup, scratch_name};

/// How much to measure.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub quick: bool,
    /// Measured rounds (each runs every case once).
    pub rounds: usize,
    /// Concurrent client threads of the connection-rate test.
    pub threads: usize,
    /// Measured window of each connection-rate run, seconds.
    pub crr_secs: f64,
    /// Unmeasured warm-up at the start of each connection-rate run, seconds.
    pub crr_warmup: f64,
    /// Length of each run of the warm-up pass (not counted), seconds.
    pub warmup_pass_secs: f64,
    /// Round trips of the request-latency test.
    pub rr_count: u64,
    /// Bytes per bulk run (split over the connections).
    pub bulk_bytes: u64,
    /// Numbers of other services for the scaling row.
    pub scale_levels: Vec<usize>,
    /// Service counts of the cold-start measurements.
    pub cp_sizes: Vec<usize>,
    pub cp_repeats: usize,
    /// Repeats of the +1k diff.
    pub diff_repeats: usize,
    /// Config edits for edit-to-data-path latency (1 service / 10k other services).
    pub changes: usize,
    pub changes_10k: usize,
    /// Pause before each edit at 10k, at least (a few ms more, varying, are added so the edits
    /// do not beat in step with the agent's timers).
    pub edit_gap_10k_ms: u64,
    /// `--control` only: the 10k edits again with the agent's `[agent] resync` at this period
    /// (ms), so many edits meet a resync (a stress variant, not the default settings).
    pub stress_resync_ms: Option<u64>,
    /// Window for agent CPU measurements, seconds.
    pub idle_secs: f64,
    /// Rounds and sequential connects per case of the BPF-time-per-connection measurement.
    pub kernel_rounds: usize,
    pub kernel_connects: u64,
}

impl Settings {
    /// `--quick` or the full run.
    fn of_run(quick: bool) -> Self {
        if quick { Self::quick() } else { Self::full() }
    }

    /// `--control [--quick]`: the control plane's measurements with more edits at 10k, spread
    /// over more than the agent's default resync period (30 s) so that at least one resync falls
    /// among them, then the stress variant (resync every second).
    fn control(quick: bool) -> Self {
        let mut s = Self::of_run(quick);
        s.changes_10k = if quick { 20 } else { 60 };
        // 60 edits 550-572 ms apart (plus their latency) span about 34 s.
        s.edit_gap_10k_ms = if quick { 40 } else { 550 };
        s.stress_resync_ms = Some(1_000);
        s
    }

    fn full() -> Self {
        Settings {
            quick: false,
            rounds: 5,
            threads: 8,
            crr_secs: 4.0,
            crr_warmup: 1.0,
            warmup_pass_secs: 1.5,
            rr_count: 20_000,
            bulk_bytes: 1 << 30,
            scale_levels: vec![1, 100, 1_000, 10_000],
            cp_sizes: vec![1_000, 10_000, 50_000],
            cp_repeats: 3,
            diff_repeats: 5,
            changes: 50,
            changes_10k: 20,
            edit_gap_10k_ms: 40,
            stress_resync_ms: None,
            idle_secs: 5.0,
            kernel_rounds: 5,
            kernel_connects: 20_000,
        }
    }

    fn quick() -> Self {
        Settings {
            quick: true,
            rounds: 1,
            threads: 8,
            crr_secs: 1.0,
            crr_warmup: 0.3,
            warmup_pass_secs: 0.5,
            rr_count: 3_000,
            bulk_bytes: 256 << 20,
            scale_levels: vec![1, 100, 1_000, 10_000],
            cp_sizes: vec![1_000, 10_000],
            cp_repeats: 1,
            diff_repeats: 1,
            changes: 10,
            changes_10k: 5,
            edit_gap_10k_ms: 40,
            stress_resync_ms: None,
            idle_secs: 2.0,
            kernel_rounds: 3,
            kernel_connects: 5_000,
        }
    }
}

const BACKEND_PORTS: [u16; 3] = [21901, 21902, 21903];
const VICTIM_PORT: u16 = 21904;
const HAPROXY_PORT: u16 = 21900;
const DATAPLANE_METRICS_PORT: u16 = 21910;
const CONTROL_METRICS_PORT: u16 = 21911;
const ORIGINAL_DST_METRICS_PORT: u16 = 21912;

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A scratch directory for configs and logs, removed on drop.
struct ScratchDir(PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Builds `mesh` (release) and `loadgen`. `MESH_BIN=/path/to/mesh` benchmarks that binary
/// instead of building one (e.g. an older build to compare with).
fn build_binaries() -> Result<(PathBuf, PathBuf)> {
    let mesh = match std::env::var_os("MESH_BIN").filter(|v| !v.is_empty()) {
        Some(bin) => {
            let bin = std::path::absolute(PathBuf::from(bin))?;
            println!("bench: MESH_BIN is set: benchmarking {}", bin.display());
            if !bin.is_file() {
                anyhow::bail!("MESH_BIN={} is not a file", bin.display());
            }
            bin
        }
        None => {
            cargo(["build", "--release", "-p", "mesh-user"]).run()?;
            build::bin(Profile::Release, "mesh")
        }
    };
    cargo(["build", "--release", "-p", "xtask", "--bin", "loadgen"]).run()?;
    Ok((mesh, build::bin(Profile::Release, "loadgen")))
}

/// Which data-path agent: the bench's default one, or one with `[agent] original_dst = true`
/// (TCP translations in socket storage), for the kernel-cost case that measures that.
#[derive(Clone, Copy, PartialEq, Eq)]
enum AgentKind {
    Default,
    OriginalDst,
}

/// A data-path agent: the bench service only, attached to `cgroup`, ready.
fn dataplane_agent(
    mesh: &Path,
    dir: &Path,
    backends: &[SocketAddr],
    cgroup: &Cgroup,
    kind: AgentKind,
) -> Result<mesh::Agent> {
    let (name, agent_table, port) = match kind {
        AgentKind::Default => ("dataplane", "", DATAPLANE_METRICS_PORT),
        AgentKind::OriginalDst => (
            "dataplane-odst",
            "[agent]\noriginal_dst = true\n\n",
            ORIGINAL_DST_METRICS_PORT,
        ),
    };
    let bpffs = Path::new(system::BPFFS).join(scratch_name(name));
    let config = format!("{agent_table}{}", DataPlane::initial_mesh_config(backends));
    let mut agent =
        mesh::Agent::start(mesh, dir, name, &config, cgroup.path(), &bpffs, local(port))?;
    agent.wait_ready(Duration::from_secs(60))?;
    Ok(agent)
}

/// The second agent of the kernel-cost cases (`original_dst = true`) in a cgroup of its own.
fn original_dst_agent(
    mesh: &Path,
    dir: &Path,
    backends: &[SocketAddr],
) -> Result<(Cgroup, mesh::Agent)> {
    let cgroup = Cgroup::create(&scratch_name("odst"))?;
    let agent = dataplane_agent(mesh, dir, backends, &cgroup, AgentKind::OriginalDst)?;
    Ok((cgroup, agent))
}

fn start_backend(loadgen: &Path, dir: &Path, id: usize, addr: SocketAddr) -> Result<Proc> {
    let mut command = cmd(loadgen, ["serve", "--id"]);
    command
        .arg(id.to_string())
        .arg("--addr")
        .arg(addr.to_string());
    let proc = Proc::spawn(
        &format!("backend {id} ({addr})"),
        command,
        &dir.join(format!("backend-{id}.log")),
    )?;
    system::wait_listening(addr, Duration::from_secs(10))?;
    Ok(proc)
}

#[derive(Serialize)]
struct Results<'a> {
    schema: u32,
    command: String,
    settings: &'a Settings,
    machine: &'a system::Machine,
    backends: Vec<String>,
    paths: BTreeMap<&'static str, &'static str>,
    loadavg_1m_start: f64,
    loadavg_1m_end: f64,
    elapsed_secs: f64,
    summaries: &'a [report::CaseSummary],
    targets: &'a [report::Target],
    control: &'a ControlResults,
    kernel_cost: &'a kernel_cost::KernelCostResults,
    warnings: &'a [String],
    errors: &'a [String],
    runs: &'a [Run],
    warmup_runs: &'a [Run],
}

fn path_descriptions() -> BTreeMap<&'static str, &'static str> {
    BTreeMap::from([
        (
            "direct-rr",
            "client rotates over the 3 backend ports itself (the fair ceiling)",
        ),
        ("direct-1", "client connects to backend 0 only"),
        (
            "mesh",
            "client in the agent's cgroup connects to VIP 127.101.1.1:80; connect4 rewrites it",
        ),
        (
            "iptables",
            "nat OUTPUT jump (127.101.0.0/16) -> MESH-BENCH (others first) -> statistic nth DNAT",
        ),
        (
            "nftables",
            "table ip mesh_bench: daddr . l4proto . dport verdict map -> numgen inc mod 3 -> dnat",
        ),
        (
            "haproxy",
            "HAProxy 127.0.0.1:21900, mode tcp, balance roundrobin, nbthread 2",
        ),
    ])
}

pub fn run(quick: bool) -> Result<()> {
    let started = Instant::now();
    let settings = Settings::of_run(quick);
    setup::run()?;
    let (mesh, loadgen) = build_binaries()?;
    signal::check()?;

    println!("\n==> bench: preparing");
    system::clean_leftovers(&mesh)?;
    let nat = baselines::prepare_netfilter()?;
    let machine = system::machine(&mesh);
    let loadavg_start = dataplane::loadavg_1m();
    if loadavg_start > 1.0 {
        println!(
            "bench: note: 1-minute load average is {loadavg_start:.2} before the bench: other work on \
             this 2-core machine will show up as noise"
        );
    }
    let out_dir = target_dir().join("bench");
    std::fs::create_dir_all(&out_dir)?;
    let scratch = ScratchDir(std::env::temp_dir().join(scratch_name("")));
    std::fs::create_dir_all(&scratch.0)?;
    let backends: Vec<SocketAddr> = BACKEND_PORTS.iter().map(|&p| local(p)).collect();
    for port in BACKEND_PORTS.iter().chain(&[
        VICTIM_PORT,
        HAPROXY_PORT,
        DATAPLANE_METRICS_PORT,
        CONTROL_METRICS_PORT,
        ORIGINAL_DST_METRICS_PORT,
    ]) {
        system::require_free(local(*port))?;
    }

    let _servers = backends
        .iter()
        .enumerate()
        .map(|(i, &addr)| start_backend(&loadgen, &scratch.0, i, addr))
        .collect::<Result<Vec<_>>>()?;

    let mut warnings = Vec::new();
    let mut errors = Vec::new();
    let ((warmups, runs), kernel) = {
        let haproxy = baselines::Haproxy::start(&scratch.0, local(HAPROXY_PORT), &backends)?;
        let cgroup = Cgroup::create(&scratch_name(""))?;
        let agent = dataplane_agent(&mesh, &scratch.0, &backends, &cgroup, AgentKind::Default)?;
        let mut dp = DataPlane {
            settings: &settings,
            loadgen: loadgen.clone(),
            backends: backends.clone(),
            cgroup: cgroup.path().to_path_buf(),
            agent,
            agent_others: 0,
            haproxy: local(HAPROXY_PORT),
            nat,
            warnings: Vec::new(),
        };
        let result = dp.rounds();
        warnings.append(&mut dp.warnings);
        let kernel = result.is_ok().then(|| {
            println!("\n==> bench: BPF time per connection (kernel accounting)");
            let (odst_cgroup, odst_agent) = original_dst_agent(&mesh, &scratch.0, &backends)?;
            let kernel = kernel_cost::measure(&kernel_cost::Inputs {
                loadgen: &loadgen,
                mesh_cgroup: cgroup.path(),
                original_dst_cgroup: odst_cgroup.path(),
                mesh_vip: SocketAddr::V4(dataplane::MESH_VIP),
                backends: &backends,
                rounds: settings.kernel_rounds,
                connects: settings.kernel_connects,
            });
            drop(odst_agent);
            drop(odst_cgroup);
            kernel
        });
        drop(dp);
        drop(cgroup);
        drop(haproxy);
        let kernel = match kernel {
            Some(Ok(kernel)) => kernel,
            Some(Err(e)) if e.downcast_ref::<signal::Interrupted>().is_some() => return Err(e),
            Some(Err(e)) => {
                errors.push(format!("BPF time per connection: {e:#}"));
                kernel_cost::KernelCostResults::default()
            }
            None => kernel_cost::KernelCostResults::default(),
        };
        (result?, kernel)
    };

    let mut cp = ControlPlane::new(
        &settings,
        (mesh.clone(), loadgen.clone()),
        scratch.0.clone(),
        backends.clone(),
        None,
    );
    let cp_result = cp.run();
    let control = cp.results;
    if let Err(e) = &cp_result {
        if e.downcast_ref::<signal::Interrupted>().is_some() {
            return cp_result;
        }
        errors.push(format!("control plane: {e:#}"));
    }

    println!("\n==> bench: report");
    let main_cases: Vec<Case> = MAIN_PATHS
        .iter()
        .map(|&path| Case { path, others: 0 })
        .chain(SCALED_PATHS.iter().flat_map(|&path| {
            settings
                .scale_levels
                .iter()
                .map(move |&others| Case { path, others })
        }))
        .collect();
    let summaries = report::summarize(&runs, &main_cases);
    let targets = report::targets(&runs, &control, &settings.scale_levels);
    let mut markdown = report::markdown(
        &summaries,
        &runs,
        &control,
        &targets,
        &settings.scale_levels,
    );
    markdown.push('\n');
    markdown.push_str(&kernel_cost::markdown(&kernel));
    println!("\n{markdown}");
    for w in &warnings {
        println!("warning: {w}");
    }
    for e in control.errors.iter().chain(&errors) {
        println!("error: {e}");
    }

    let results = Results {
        schema: 1,
        command: if quick {
            "cargo xtask bench --quick".into()
        } else {
            "cargo xtask bench".into()
        },
        settings: &settings,
        machine: &machine,
        backends: backends.iter().map(ToString::to_string).collect(),
        paths: path_descriptions(),
        loadavg_1m_start: loadavg_start,
        loadavg_1m_end: dataplane::loadavg_1m(),
        elapsed_secs: started.elapsed().as_secs_f64(),
        summaries: &summaries,
        targets: &targets,
        control: &control,
        kernel_cost: &kernel,
        warnings: &warnings,
        errors: &errors,
        runs: &runs,
        warmup_runs: &warmups,
    };
    let json_path = out_dir.join("results.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&results)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    let md_path = out_dir.join("results.md");
    std::fs::write(&md_path, &markdown)?;
    let svg_path = out_dir.join("ratios.svg");
    let title = format!(
        "mesh bench {} ({}; {} x {}; kernel {})",
        machine.date_utc, results.command, machine.cores, machine.cpu_model, machine.kernel
    );
    if let Err(e) = chart::draw(&svg_path, &summaries, &settings.scale_levels, &title) {
        errors.push(format!("{e:#}"));
        println!("error: {e:#}");
    }
    println!(
        "bench: wrote {}, {} and {} in {:.0} s",
        json_path.display(),
        md_path.display(),
        svg_path.display(),
        started.elapsed().as_secs_f64()
    );
    cp_result
}

/// What a bench of one part (`--kernel-cost`, `--health`) starts from: setup done, binaries
/// built, leftovers cleaned, the bench's backends running.
struct Partial {
    settings: Settings,
    mesh: PathBuf,
    loadgen: PathBuf,
    scratch: ScratchDir,
    backends: Vec<SocketAddr>,
    _servers: Vec<Proc>,
}

impl Partial {
    /// `ports`: the other ports on 127.0.0.1 this part listens on, which must be free.
    fn prepare(settings: Settings, ports: &[u16]) -> Result<Partial> {
        setup::run()?;
        let (mesh, loadgen) = build_binaries()?;
        system::clean_leftovers(&mesh)?;
        let scratch = ScratchDir(std::env::temp_dir().join(scratch_name("")));
        std::fs::create_dir_all(&scratch.0)?;
        let backends: Vec<SocketAddr> = BACKEND_PORTS.iter().map(|&p| local(p)).collect();
        for &port in BACKEND_PORTS.iter().chain(ports) {
            system::require_free(local(port))?;
        }
        let servers = backends
            .iter()
            .enumerate()
            .map(|(i, &addr)| start_backend(&loadgen, &scratch.0, i, addr))
            .collect::<Result<Vec<_>>>()?;
        Ok(Partial {
            settings,
            mesh,
            loadgen,
            scratch,
            backends,
            _servers: servers,
        })
    }
}

/// `cargo xtask bench --kernel-cost`: only the BPF time per connection, with an agent on the
/// bench's single service (see `kernel_cost`).
pub fn run_kernel_cost(quick: bool) -> Result<()> {
    let Partial {
        settings,
        mesh,
        loadgen,
        scratch,
        backends,
        _servers,
    } = Partial::prepare(
        Settings::of_run(quick),
        &[DATAPLANE_METRICS_PORT, ORIGINAL_DST_METRICS_PORT],
    )?;
    let cgroup = Cgroup::create(&scratch_name(""))?;
    let agent = dataplane_agent(&mesh, &scratch.0, &backends, &cgroup, AgentKind::Default)?;
    let (odst_cgroup, odst_agent) = original_dst_agent(&mesh, &scratch.0, &backends)?;
    println!("\n==> bench: BPF time per connection (kernel accounting)");
    let results = kernel_cost::measure(&kernel_cost::Inputs {
        loadgen: &loadgen,
        mesh_cgroup: cgroup.path(),
        original_dst_cgroup: odst_cgroup.path(),
        mesh_vip: SocketAddr::V4(dataplane::MESH_VIP),
        backends: &backends,
        rounds: settings.kernel_rounds,
        connects: settings.kernel_connects,
    })?;
    drop(odst_agent);
    drop(odst_cgroup);
    drop(agent);
    drop(cgroup);
    let markdown = kernel_cost::markdown(&results);
    println!("\n{markdown}");
    let out_dir = target_dir().join("bench");
    std::fs::create_dir_all(&out_dir)?;
    std::fs::write(
        out_dir.join("kernel-cost.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    std::fs::write(out_dir.join("kernel-cost.md"), &markdown)?;
    println!("bench: wrote {}", out_dir.join("kernel-cost.md").display());
    Ok(())
}

/// `cargo xtask bench --nodeport`: only the NodePort comparison (see `nodeport`).
pub fn run_nodeport(quick: bool) -> Result<()> {
    nodeport::run(quick)
}

/// `cargo xtask bench --health`: only the control plane's health-check measurements.
pub fn run_health(quick: bool) -> Result<()> {
    let Partial {
        settings,
        mesh,
        loadgen,
        scratch,
        backends,
        _servers,
    } = Partial::prepare(
        Settings::of_run(quick),
        &[VICTIM_PORT, CONTROL_METRICS_PORT],
    )?;
    let mut cp = ControlPlane::new(
        &settings,
        (mesh, loadgen),
        scratch.0.clone(),
        backends,
        None,
    );
    let result = cp.run_health();
    let out_dir = target_dir().join("bench");
    std::fs::create_dir_all(&out_dir)?;
    std::fs::write(
        out_dir.join("health.json"),
        serde_json::to_string_pretty(&cp.results.health)?,
    )?;
    println!("bench: wrote {}", out_dir.join("health.json").display());
    result
}

#[derive(Serialize)]
struct ControlOnly<'a> {
    command: String,
    settings: &'a Settings,
    machine: &'a system::Machine,
    loadavg_1m_start: f64,
    loadavg_1m_end: f64,
    elapsed_secs: f64,
    control: &'a ControlResults,
}

/// `cargo xtask bench --control`: only the control plane's programming, edit and RSS
/// measurements (the full bench's, with more edits at 10k and a short-resync variant), and
/// that section of the report.
pub fn run_control(quick: bool) -> Result<()> {
    let started = Instant::now();
    let Partial {
        settings,
        mesh,
        loadgen,
        scratch,
        backends,
        _servers,
    } = Partial::prepare(Settings::control(quick), &[CONTROL_METRICS_PORT])?;
    let machine = system::machine(&mesh);
    let loadavg_start = dataplane::loadavg_1m();
    println!("bench: 1-minute load average at the start: {loadavg_start:.2}");
    let out_dir = target_dir().join("bench");
    std::fs::create_dir_all(&out_dir)?;
    let mut cp = ControlPlane::new(
        &settings,
        (mesh, loadgen),
        scratch.0.clone(),
        backends,
        Some(out_dir.join("control-logs")),
    );
    let result = cp.run_control();
    let control = cp.results;
    let loadavg_end = dataplane::loadavg_1m();
    let mut markdown = report::control_markdown(&control);
    markdown.push_str(&report::targets_markdown(&report::control_targets(
        &control,
    )));
    let _ = writeln!(
        markdown,
        "\n1-minute load average: {loadavg_start:.2} at the start, {loadavg_end:.2} at the end."
    );
    println!("\n{markdown}");
    for e in &control.errors {
        println!("error: {e}");
    }
    let results = ControlOnly {
        command: format!(
            "cargo xtask bench --control{}",
            if quick { " --quick" } else { "" }
        ),
        settings: &settings,
        machine: &machine,
        loadavg_1m_start: loadavg_start,
        loadavg_1m_end: loadavg_end,
        elapsed_secs: started.elapsed().as_secs_f64(),
        control: &control,
    };
    std::fs::write(
        out_dir.join("control.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    std::fs::write(out_dir.join("control.md"), &markdown)?;
    println!(
        "bench: wrote {} and {} in {:.0} s",
        out_dir.join("control.json").display(),
        out_dir.join("control.md").display(),
        started.elapsed().as_secs_f64()
    );
    result
}
