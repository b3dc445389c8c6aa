//! `mesh agent`: builds the components from the config and runs them until a signal.
//!
//! State flows one way: sources (config file) -> desired state -> `Reconciler` (diff + map
//! writes). The reconciler task is the only writer of the maps.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{debug, error, info, warn};

use crate::{
    config::{self, Config},
    datapath::{Datapath, LoadOptions},
    http,
    metrics::AgentMetrics,
    reconcile::{Applied, IdLimits, plan},
    state::DesiredState,
    system,
};

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
        self.applied = next;
        Ok(ops.len())
    }
}

pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let config = args
        .load_config()
        .map_err(|err| anyhow::anyhow!("invalid config:\n{err}"))?;
    let agent = &config.agent;
    system::ensure_bpffs(&agent.bpffs)?;
    let cgroup = match &agent.cgroup {
        Some(cgroup) => cgroup.clone(),
        None => system::cgroup2_root()?,
    };
    let datapath = Datapath::load(&LoadOptions {
        bpffs: &agent.bpffs,
        cgroup: &cgroup,
        limits: &agent.limits,
    })?;
    info!(
        bpffs = %agent.bpffs.display(),
        cgroup = %cgroup.display(),
        "programs attached"
    );

    let metrics = Arc::new(AgentMetrics::new(&agent.bpffs)?);
    let limits = IdLimits {
        max_services: agent.limits.max_services,
        max_backends: agent.limits.max_backends,
    };
    let mut reconciler = Reconciler::adopt(datapath, limits, metrics.clone())?;
    let writes = reconciler.reconcile(&DesiredState::from_config(&config))?;
    info!(
        services = config.services.len(),
        writes,
        "services from {} applied",
        args.config.display()
    );

    let server = http::serve(config.agent.metrics, metrics.clone()).await?;
    let (changed_tx, mut changed_rx) = mpsc::channel(1);
    let _watcher = watch_file(&args.config, changed_tx)?;
    metrics.set_ready(true);
    info!(metrics = %config.agent.metrics, "mesh agent ready");

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut running = config;
    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            Some(()) = changed_rx.recv() => {
                // Editors write files in several steps; let them finish.
                tokio::time::sleep(Duration::from_millis(15)).await;
                while changed_rx.try_recv().is_ok() {}
                reload(&args, &mut running, &mut reconciler, &metrics);
            }
        }
    }
    server.abort();
    info!("stopping; the data path stays in place (`mesh cleanup` removes it)");
    Ok(())
}

fn reload(
    args: &AgentArgs,
    running: &mut Config,
    reconciler: &mut Reconciler,
    metrics: &AgentMetrics,
) {
    let config = match args.load_config() {
        Ok(config) => config,
        Err(err) => {
            metrics.config_rejected();
            // One line, so line-based log readers keep the reason with the level.
            let reasons = err.to_string().replace('\n', "; ");
            error!("config edit rejected, the running services stay in force: {reasons}");
            return;
        }
    };
    if config.agent != running.agent {
        warn!("changes to [agent] take effect when the agent restarts");
    }
    let desired = DesiredState::from_config(&config);
    match reconciler.reconcile(&desired) {
        Ok(writes) => {
            info!(
                services = config.services.len(),
                writes, "config edit applied"
            );
            *running = Config {
                agent: running.agent.clone(),
                services: config.services,
            };
        }
        Err(err) => {
            metrics.config_rejected();
            error!("config edit could not be applied, the running services stay in force: {err:#}");
        }
    }
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
