//! `mesh agent`: builds the components from the config and runs them until a signal.
//!
//! State flows one way: sources (config file, admin API, Redis) -> `Registry` -> desired state
//! (with health) -> `Reconciler` (diff + map writes). This task is the only writer of the maps.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use mesh_common::{PROTO_UDP, SETTINGS_F_TELEMETRY, Settings};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{debug, error, info, warn};

use crate::{
    config::{self, Config, HealthKind},
    datapath::{Datapath, LoadOptions},
    health::{HealthMonitor, Target, Transition},
    http,
    metrics::AgentMetrics,
    reconcile::{Applied, IdLimits, MapOp, plan},
    registry::{Registry, SourceUpdate},
    sockdiag,
    state::{DesiredState, Vip, apply_health, vip_of},
    system,
};

/// How often the kernel's connect-failure counters are read for passive detection.
const PASSIVE_POLL: Duration = Duration::from_millis(10);
/// How often the per-backend health gauges are refreshed.
const HEALTH_GAUGES: Duration = Duration::from_secs(1);
/// At most this many health checks run at once, whatever the number of backends.
const MAX_CONCURRENT_CHECKS: usize = 256;

#[derive(clap::Args, Debug, Clone)]
pub struct AgentArgs {
    /// The config file: `[agent]` settings and the embedded service registry. Watched for edits.
    #[arg(long, short, default_value = "/etc/mesh/mesh.toml")]
    pub config: PathBuf,
    /// Overrides `[agent] bpffs`: directory under bpffs for the pinned maps and links.
    #[arg(long)]
    pub bpffs: Option<PathBuf>,
    /// Overrides `[agent] cgroup`: cgroup v2 directory to attach to (default: cgroup v2 root).
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// Overrides `[agent] metrics`: address of /metrics, /readyz and /healthz.
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
}

impl AgentArgs {
    fn load_config(&self) -> Result<Config, config::ConfigError> {
        let mut config = config::load(&self.config)?;
        if let Some(bpffs) = &self.bpffs {
            config.agent.bpffs = bpffs.clone();
        }
        if let Some(cgroup) = &self.cgroup {
            config.agent.cgroup = Some(cgroup.clone());
        }
        if let Some(metrics) = self.metrics {
            config.agent.metrics = metrics;
        }
        Ok(config)
    }
}

/// Owns the data path and what it holds; turns desired states into map writes.
pub struct Reconciler {
    datapath: Datapath,
    applied: Applied,
    limits: IdLimits,
    metrics: Arc<AgentMetrics>,
}

impl Reconciler {
    /// Adopts whatever an earlier agent left in the pinned maps, so the first reconcile rewrites
    /// only what differs (no window in which a service is empty).
    pub fn adopt(
        mut datapath: Datapath,
        limits: IdLimits,
        metrics: Arc<AgentMetrics>,
    ) -> anyhow::Result<Self> {
        let (applied, orphans) = datapath.maps.snapshot()?.applied();
        if !applied.services.is_empty() {
            info!(
                services = applied.services.len(),
                backends = applied.backends.len(),
                "adopted the existing data path"
            );
        }
        if !orphans.is_empty() {
            info!(count = orphans.len(), "deleting slots no service points at");
            datapath.maps.delete_slots(&orphans)?;
        }
        Ok(Self {
            datapath,
            applied,
            limits,
            metrics,
        })
    }

    /// (VIP, backend) pairs that take connections now: at start, what an earlier agent left
    /// active keeps its traffic until a health check says otherwise.
    pub fn active_backends(&self) -> BTreeSet<(Vip, SocketAddr)> {
        let addr_of = self.applied.backend_addrs();
        self.applied
            .services
            .iter()
            .flat_map(|(vip, svc)| {
                svc.active
                    .keys()
                    .filter_map(|id| addr_of.get(id))
                    .map(|&addr| (*vip, addr))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Makes the maps hold `desired`. On a planning error nothing is written; on a write error
    /// the applied state is re-read from the maps so the next run repairs what is missing.
    pub fn reconcile(&mut self, desired: &DesiredState) -> anyhow::Result<usize> {
        let started = Instant::now();
        let result = self.try_reconcile(desired);
        self.metrics
            .observe_reconcile(started.elapsed(), result.is_ok());
        result
    }

    fn try_reconcile(&mut self, desired: &DesiredState) -> anyhow::Result<usize> {
        let (ops, next) = plan(desired, &self.applied, self.limits)?;
        if ops.is_empty() {
            return Ok(0);
        }
        for op in &ops {
            debug!(?op, "map write");
        }
        if let Err(err) = self.datapath.maps.apply(&ops) {
            self.applied = self.datapath.maps.snapshot()?.applied().0;
            return Err(err);
        }
        let left = self.udp_backends_left(&ops, desired);
        let previous = std::mem::replace(&mut self.applied, next);
        self.terminate_udp_flows(&left, &previous);
        Ok(ops.len())
    }

    /// (service id, backend address) of UDP services whose backend left the rotation in `ops`,
    /// unless the service opted out of terminating its flows.
    fn udp_backends_left(&self, ops: &[MapOp], desired: &DesiredState) -> Vec<(u32, SocketAddr)> {
        let addr_of = self.applied.backend_addrs();
        let udp: BTreeMap<u32, &Vip> = self
            .applied
            .services
            .iter()
            .filter(|(vip, _)| vip.proto == PROTO_UDP)
            .map(|(vip, svc)| (svc.id, vip))
            .collect();
        ops.iter()
            .filter_map(|op| match op {
                MapOp::DeleteActive {
                    service_id,
                    backend_id,
                } => Some((*service_id, *backend_id)),
                _ => None,
            })
            .filter(|(service_id, _)| {
                udp.get(service_id).is_some_and(|vip| {
                    desired
                        .services
                        .get(vip)
                        .is_none_or(|s| s.terminate_udp_flows)
                })
            })
            .filter_map(|(service_id, backend_id)| Some((service_id, *addr_of.get(&backend_id)?)))
            .collect()
    }

    /// Terminates the connected UDP sockets the kernel pointed at backends that left, so their
    /// clients notice (ECONNABORTED) and reconnect to a live backend. Only sockets still
    /// connected to that backend are touched: one that disconnected since is left alone.
    fn terminate_udp_flows(&self, left: &[(u32, SocketAddr)], previous: &Applied) {
        let mut by_backend: BTreeMap<SocketAddr, HashSet<u64>> = BTreeMap::new();
        for &(service_id, backend) in left {
            // The id the flows were recorded with (the backend may be gone from the maps now).
            let Some(&backend_id) = previous.backends.get(&backend) else {
                continue;
            };
            match self.datapath.maps.udp_flows_to(service_id, backend_id) {
                Ok(found) => by_backend.entry(backend).or_default().extend(found),
                Err(err) => warn!("reading udp_flows: {err:#}"),
            }
        }
        for (backend, cookies) in by_backend {
            match sockdiag::destroy_udp_sockets_to(&cookies, backend) {
                Ok(0) => {}
                Ok(destroyed) => {
                    info!(destroyed, %backend, "terminated connected UDP sockets of a removed backend");
                    self.metrics.udp_flows_terminated(destroyed as u64);
                }
                Err(err) => error!(%backend, "terminating connected UDP sockets: {err}"),
            }
        }
    }

    /// (VIP, backend) pairs with at least their service's `passive_failures` consecutive
    /// failed connects; their counts are reset.
    fn passive_failures(&mut self, thresholds: &BTreeMap<Vip, u32>) -> Vec<(Vip, SocketAddr, u32)> {
        let Some(&lowest) = thresholds.values().min() else {
            return Vec::new();
        };
        // Runs every few ms: look at the kernel's (usually empty) map before anything else.
        let candidates = match self.datapath.maps.passive_failures(lowest) {
            Ok(found) if found.is_empty() => return Vec::new(),
            Ok(found) => found,
            Err(err) => {
                warn!("reading passive failure counts: {err:#}");
                return Vec::new();
            }
        };
        let by_id: BTreeMap<u32, (&Vip, u32)> = self
            .applied
            .services
            .iter()
            .filter_map(|(vip, svc)| thresholds.get(vip).map(|&t| (svc.id, (vip, t))))
            .collect();
        let addr_of = self.applied.backend_addrs();
        let mut failing = Vec::new();
        for (key, count) in candidates {
            let (Some(&(vip, threshold)), Some(&addr)) =
                (by_id.get(&key.service_id), addr_of.get(&key.backend_id))
            else {
                continue;
            };
            if count >= threshold {
                if let Err(err) = self.datapath.maps.reset_passive(&key) {
                    warn!("resetting passive failure count: {err:#}");
                }
                failing.push((*vip, addr, count));
            }
        }
        failing
    }
}

/// Everything the running agent holds.
struct Agent {
    args: AgentArgs,
    registry: Registry,
    /// Views of the merged registry, recomputed when it changes (not on every tick).
    merged: Config,
    names: BTreeMap<Vip, String>,
    passive_thresholds: BTreeMap<Vip, u32>,
    reconciler: Reconciler,
    health: HealthMonitor,
    metrics: Arc<AgentMetrics>,
    /// [sources] The merged registry by source, for the admin API: published after each change.
    published: tokio::sync::watch::Sender<crate::sources::Listing>,
}

impl Agent {
    fn desired(&self) -> DesiredState {
        let mut desired = DesiredState::from_config(&self.merged);
        apply_health(&mut desired, &self.merged, |vip, addr| {
            self.health.health(vip, addr)
        });
        desired
    }

    /// Recomputes the views of the merged registry after it changed.
    fn registry_changed(&mut self) {
        self.merged = self.registry.merged();
        self.names = self
            .merged
            .services
            .iter()
            .map(|svc| (vip_of(svc), svc.name.clone()))
            .collect();
        self.passive_thresholds = self
            .merged
            .services
            .iter()
            .filter_map(|svc| {
                let check = svc.health.as_ref()?;
                (check.kind != HealthKind::None && check.passive_failures > 0)
                    .then(|| (vip_of(svc), check.passive_failures))
            })
            .collect();
    }

    fn reconcile(&mut self, why: &str) -> anyhow::Result<()> {
        let desired = self.desired();
        let writes = self.reconciler.reconcile(&desired)?;
        if writes > 0 {
            info!(writes, services = desired.services.len(), "{why}: applied");
        }
        Ok(())
    }

    /// Points the health checks at the backends of the merged registry.
    fn update_health_targets(&mut self) {
        let targets = health_targets(&self.merged);
        let active = self.reconciler.active_backends();
        self.health.set_targets(targets, &active);
    }

    /// At a fresh start nothing is known about checked backends, and unknown backends get no
    /// traffic. Give their first checks (spread over 100 ms) time to answer before the first
    /// write, so a new service does not start out refusing connects. Bounded by the slowest
    /// check's timeout.
    async fn await_first_checks(&self) {
        let longest = self
            .merged
            .services
            .iter()
            .filter_map(|svc| svc.health.as_ref())
            .filter(|check| check.kind != HealthKind::None)
            .map(|check| check.timeout)
            .max();
        let Some(longest) = longest else { return };
        let deadline = Instant::now() + Duration::from_millis(150) + longest;
        while Instant::now() < deadline
            && self
                .health
                .snapshot()
                .iter()
                .any(|(_, _, health, _)| *health == crate::health::Health::Unknown)
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn reload_file(&mut self) {
        let config = match self.args.load_config() {
            Ok(config) => config,
            Err(err) => return self.rejected("config edit", &err.to_string()),
        };
        if config.agent != self.registry.file_config().agent {
            warn!("changes to [agent] take effect when the agent restarts");
        }
        let mut config = config;
        config.agent = self.registry.file_config().agent.clone();
        let origin = self.args.config.display().to_string();
        if let Err(err) = self.registry.replace_file(config, &origin) {
            return self.rejected("config edit", &err.to_string());
        }
        self.apply_registry("config edit");
    }

    fn source_update(&mut self, update: SourceUpdate) {
        let source = update.source;
        let result = match self.registry.replace(source, update.services) {
            Ok(()) => {
                self.apply_registry(source.name());
                Ok(())
            }
            Err(err) => {
                self.rejected(source.name(), &err.to_string());
                Err(err.to_string())
            }
        };
        if let Some(reply) = update.reply {
            let _ = reply.send(result);
        }
    }

    fn apply_registry(&mut self, why: &str) {
        self.registry_changed();
        // [sources] The admin API lists what is now in force.
        self.published
            .send_replace(crate::sources::listing(&self.registry));
        self.update_health_targets();
        if let Err(err) = self.reconcile(why) {
            self.metrics.config_rejected();
            error!("{why} could not be applied, the running services stay in force: {err:#}");
        }
    }

    fn rejected(&self, what: &str, reasons: &str) {
        self.metrics.config_rejected();
        // One line, so line-based log readers keep the reason with the level.
        let reasons = reasons.replace('\n', "; ");
        error!("{what} rejected, the running services stay in force: {reasons}");
    }

    fn passive_tick(&mut self) {
        let failing = self.reconciler.passive_failures(&self.passive_thresholds);
        for (vip, addr, count) in &failing {
            self.health.force_unhealthy(
                vip,
                addr,
                &format!("{count} consecutive failed connects seen by the kernel"),
            );
        }
        if !failing.is_empty()
            && let Err(err) = self.reconcile("passive detection")
        {
            error!("passive detection could not be applied: {err:#}");
        }
    }
}

fn health_targets(config: &Config) -> Vec<Target> {
    config
        .services
        .iter()
        .filter_map(|svc| {
            let check = svc.health.as_ref()?;
            Some(
                svc.backends
                    .iter()
                    .filter(|b| !b.drain)
                    .map(|b| Target {
                        vip: vip_of(svc),
                        backend: b.addr,
                        check: check.clone(),
                    })
                    .collect::<Vec<_>>(),
            )
        })
        .flatten()
        .collect()
}

pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let config = args
        .load_config()
        .map_err(|err| anyhow::anyhow!("invalid config:\n{err}"))?;
    let agent_config = config.agent.clone();
    system::ensure_bpffs(&agent_config.bpffs)?;
    let cgroup = match &agent_config.cgroup {
        Some(cgroup) => cgroup.clone(),
        None => system::cgroup2_root()?,
    };
    let mut datapath = Datapath::load(&LoadOptions {
        bpffs: &agent_config.bpffs,
        cgroup: &cgroup,
        limits: &agent_config.limits,
        kernel_log: agent_config.kernel_log,
    })?;
    let _kernel_log = datapath
        .logger
        .take()
        .map(crate::datapath::forward_kernel_log)
        .transpose()?;
    let flags = if agent_config.telemetry {
        SETTINGS_F_TELEMETRY
    } else {
        0
    };
    datapath
        .maps
        .set_settings(Settings { flags, _pad: 0 })
        .context("writing settings")?;
    info!(
        bpffs = %agent_config.bpffs.display(),
        cgroup = %cgroup.display(),
        telemetry = agent_config.telemetry,
        "programs attached"
    );

    let metrics = Arc::new(AgentMetrics::new(&agent_config.bpffs)?);
    let limits = IdLimits {
        max_services: agent_config.limits.max_services,
        max_backends: agent_config.limits.max_backends,
    };
    let reconciler = Reconciler::adopt(datapath, limits, metrics.clone())?;
    let (health_tx, mut health_rx) = mpsc::unbounded_channel::<Transition>();
    let mut health = HealthMonitor::new(MAX_CONCURRENT_CHECKS, health_tx);
    health.on_check(metrics.health_check_observer());
    let registry = Registry::new(config);
    let (published, listing) = tokio::sync::watch::channel(crate::sources::listing(&registry));
    let mut agent = Agent {
        args: args.clone(),
        registry,
        merged: Config::default(),
        names: BTreeMap::new(),
        passive_thresholds: BTreeMap::new(),
        reconciler,
        health,
        metrics: metrics.clone(),
        published,
    };
    agent.registry_changed();
    // [sources] Started before the first reconcile: the services they saved (admin API, last
    // Redis read) are applied together with the file's, so a restart keeps their VIPs mapped.
    let (sources_tx, mut sources_rx) = mpsc::channel::<SourceUpdate>(16);
    let _sources =
        crate::sources::start(&agent_config, sources_tx, listing, metrics.clone()).await?;
    while let Ok(update) = sources_rx.try_recv() {
        agent.source_update(update);
    }
    agent.update_health_targets();
    agent.await_first_checks().await;
    agent.reconcile(&format!("services from {}", args.config.display()))?;

    let server = http::serve(agent_config.metrics, metrics.clone()).await?;
    let (changed_tx, mut changed_rx) = mpsc::channel(1);
    let _watcher = watch_file(&args.config, changed_tx)?;
    metrics.set_ready(true);
    info!(metrics = %agent_config.metrics, "mesh agent ready");

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut passive = tokio::time::interval(PASSIVE_POLL);
    passive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut health_gauges = tokio::time::interval(HEALTH_GAUGES);
    health_gauges.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            Some(()) = changed_rx.recv() => {
                // Editors write files in several steps; let them finish.
                tokio::time::sleep(Duration::from_millis(15)).await;
                while changed_rx.try_recv().is_ok() {}
                agent.reload_file();
            }
            Some(update) = sources_rx.recv() => agent.source_update(update),
            Some(transition) = health_rx.recv() => {
                metrics.health_transition(&transition);
                while let Ok(more) = health_rx.try_recv() {
                    metrics.health_transition(&more);
                }
                if let Err(err) = agent.reconcile("health change") {
                    error!("health change could not be applied: {err:#}");
                }
                metrics.set_health(agent.health.snapshot(), &agent.names);
            }
            _ = passive.tick() => agent.passive_tick(),
            _ = health_gauges.tick() => {
                metrics.set_health(agent.health.snapshot(), &agent.names);
            }
        }
    }
    server.abort();
    info!("stopping; the data path stays in place (`mesh cleanup` removes it)");
    Ok(())
}

/// Sends a message when `path` may have changed. Watches the directory, because editors and
/// config management replace files by renaming a new one over them.
fn watch_file(
    path: &Path,
    changed: mpsc::Sender<()>,
) -> anyhow::Result<notify::RecommendedWatcher> {
    use notify::Watcher as _;
    let path = std::path::absolute(path)?;
    let dir = path
        .parent()
        .context("config file has no parent directory")?
        .to_path_buf();
    let name = path.file_name().map(ToOwned::to_owned);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if event.kind.is_access() {
            return;
        }
        if event
            .paths
            .iter()
            .any(|p| p.file_name().map(ToOwned::to_owned) == name)
        {
            // A full channel already holds a wake-up; dropping this one loses nothing.
            let _ = changed.try_send(());
        }
    })?;
    watcher.watch(&dir, notify::RecursiveMode::NonRecursive)?;
    Ok(watcher)
}
