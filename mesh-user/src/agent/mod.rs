//! `mesh agent`: builds the components from the config and runs them until a signal.
//!
//! State flows one way: sources (config file, admin API, Redis) -> registry -> desired state
//! (with health) -> reconcile -> maps. The control loop (`control`) is the only writer of the
//! maps and runs on its own thread; the async runtime serves HTTP, the sources, health checks
//! and signals.

pub mod control;

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use mesh_common::{SETTINGS_F_ORIGINAL_DST, SETTINGS_F_TELEMETRY};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, watch},
};
use tracing::{debug, error, info, warn};

use self::control::{Command, ControlHandle, ControlLoop};
use crate::{
    config::{self, Config, KernelLog, Reparser},
    datapath::{self, Datapath, LoadOptions, PinsLock, system},
    health::HealthMonitor,
    observe::{heartbeat::Heartbeat, http, metrics::AgentMetrics},
    reconcile::Executor,
    registry::{Registry, Source, SourceObserver, SourceUpdate, file, listing, sources},
};

/// At most this many health checks run at once, whatever the number of backends.
const MAX_CONCURRENT_CHECKS: usize = 256;
/// How long a stopping agent waits for the control loop to finish its turn.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(clap::Args, Debug, Clone)]
pub struct AgentArgs {
    /// The config file: `[agent]` settings and the embedded service registry. Watched for edits
    /// and re-read on SIGHUP.
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
    /// Overrides `[agent] admin_socket`: the admin API's Unix socket ("" turns it off).
    #[arg(long, value_parser = parse_path_or_empty)]
    pub admin_socket: Option<PathBuf>,
    /// Overrides `[agent] state_dir`: where the admin API's and Redis's services are saved.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
}

/// clap refuses an empty path by default; "" is how the socket is turned off.
fn parse_path_or_empty(text: &str) -> Result<PathBuf, std::convert::Infallible> {
    Ok(PathBuf::from(text))
}

impl AgentArgs {
    /// The file at start, parsed and validated whole; `reparser` keeps its pieces.
    fn load_config(&self, reparser: &mut Reparser) -> Result<Config, config::ConfigError> {
        Ok(self.overridden(config::load(&self.config, reparser)?))
    }

    /// The file again after an edit: only its changed services are parsed, and the registry
    /// validates what changed.
    fn reload_config(&self, reparser: &mut Reparser) -> Result<Config, config::ConfigError> {
        let text = config::read(&self.config)?;
        let config = reparser.parse(text, &self.config.display().to_string())?;
        Ok(self.overridden(config))
    }

    /// The command line's settings override the file's.
    fn overridden(&self, mut config: Config) -> Config {
        if let Some(bpffs) = &self.bpffs {
            config.agent.bpffs = bpffs.clone();
        }
        if let Some(cgroup) = &self.cgroup {
            config.agent.cgroup = Some(cgroup.clone());
        }
        if let Some(metrics) = self.metrics {
            config.agent.metrics = metrics;
        }
        if let Some(socket) = &self.admin_socket {
            config.agent.admin_socket = socket.clone();
        }
        if let Some(state_dir) = &self.state_dir {
            config.agent.state_dir = state_dir.clone();
        }
        config
    }
}

/// Sources the agent waits for before it is ready: Kubernetes, unless it already sent the set
/// it saved at its last run (that set then serves until the watchers have listed).
fn ready_after(agent: &config::AgentConfig, initial: &[SourceUpdate]) -> BTreeSet<Source> {
    let mut sources = BTreeSet::new();
    if agent.kubernetes.is_some() && !initial.iter().any(|u| u.source == Source::Kubernetes) {
        sources.insert(Source::Kubernetes);
    }
    sources
}

/// The data path as the agent starts it: programs attached, maps adopted, pins locked.
struct Started {
    _lock: PinsLock,
    datapath: Datapath,
    executor: Executor,
}

fn kernel_log_level(level: KernelLog) -> datapath::KernelLogLevel {
    match level {
        KernelLog::Off => 0,
        KernelLog::Error => aya_log::Level::Error as u8,
        KernelLog::Warn => aya_log::Level::Warn as u8,
        KernelLog::Info => aya_log::Level::Info as u8,
        KernelLog::Debug => aya_log::Level::Debug as u8,
    }
}

/// Everything that must happen before the runtime starts: it blocks on syscalls.
fn start_datapath(config: &Config) -> anyhow::Result<Started> {
    let agent = &config.agent;
    system::check_prerequisites(&agent.bpffs, agent.cgroup.as_deref())?;
    system::ensure_bpffs(&agent.bpffs)?;
    system::create_private_dir(&agent.bpffs, true)?;
    let lock = PinsLock::acquire(&agent.bpffs)?;
    let cgroup = match &agent.cgroup {
        Some(cgroup) => cgroup.clone(),
        None => system::cgroup2_root()?,
    };
    let capacities = agent.limits.capacities();
    let nodeport = &agent.nodeport;
    let devices = if nodeport.enabled {
        let devices = datapath::tc::devices(&nodeport.devices)?;
        if devices.is_empty() {
            warn!(
                "[agent.nodeport]: no device holds a node address; traffic from other hosts is not translated"
            );
        }
        Some(devices)
    } else {
        None
    };
    let mut flags = 0;
    if agent.telemetry {
        flags |= SETTINGS_F_TELEMETRY;
    }
    if agent.original_dst {
        flags |= SETTINGS_F_ORIGINAL_DST;
    }
    let mut datapath = Datapath::load(&LoadOptions {
        bpffs: &agent.bpffs,
        cgroup: &cgroup,
        capacities,
        kernel_log: kernel_log_level(agent.kernel_log),
        nodeport_devices: devices.as_deref(),
        settings_flags: flags,
    })?;
    if let Some(devices) = &devices {
        let timeouts = mesh_common::nodeport::FlowTimeouts {
            udp_ns: nodeport.udp_timeout.as_nanos() as u64,
            tcp_ns: nodeport.tcp_timeout.as_nanos() as u64,
            tcp_closing_ns: nodeport.tcp_closing_timeout.as_nanos() as u64,
        };
        // A pass every quarter of the shortest timeout (at most every second), so an idle
        // flow is gone within 1.25 x its timeout.
        let every = nodeport
            .udp_timeout
            .min(nodeport.tcp_closing_timeout)
            .div_f64(4.0)
            .clamp(Duration::from_millis(100), Duration::from_secs(1));
        datapath::tc::spawn_expiry(&agent.bpffs, timeouts, every)?;
        let names: Vec<String> = devices
            .iter()
            .map(|d| match d.ipv4 {
                Some(ip) => format!("{} ({ip})", d.name),
                None => d.name.clone(),
            })
            .collect();
        info!(devices = ?names, "TC programs attached for traffic from other hosts");
    }
    let maps = datapath.take_maps().context("maps already taken")?;
    let executor = Executor::adopt(maps, capacities, flags).context("adopting the maps")?;
    info!(
        bpffs = %agent.bpffs.display(),
        cgroup = %cgroup.display(),
        telemetry = agent.telemetry,
        original_dst = agent.original_dst,
        "programs attached"
    );
    Ok(Started {
        _lock: lock,
        datapath,
        executor,
    })
}

pub fn run(args: AgentArgs) -> anyhow::Result<()> {
    // Before any thread starts: the agent's large buffers (config parses, map reads, /metrics
    // renders) are transient, and must go back to the kernel when freed.
    datapath::system::map_large_allocations();
    let mut reparser = Reparser::default();
    let began = Instant::now();
    let config = args
        .load_config(&mut reparser)
        .map_err(|err| anyhow::anyhow!("invalid config:\n{err}"))?;
    info!(
        services = config.services.len(),
        took_ms = began.elapsed().as_secs_f64() * 1e3,
        "config read"
    );
    let loading = Instant::now();
    let started = start_datapath(&config)?;
    info!(
        took_ms = loading.elapsed().as_secs_f64() * 1e3,
        "data path loaded"
    );
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve(args, config, started, reparser))
}

async fn serve(
    args: AgentArgs,
    config: Config,
    started: Started,
    mut reparser: Reparser,
) -> anyhow::Result<()> {
    let Started {
        _lock,
        mut datapath,
        executor,
    } = started;
    let agent_config = config.agent.clone();
    if agent_config.vip_ranges.is_empty() {
        warn!(
            "[agent] vip_ranges is empty: any registry source may claim any address as a VIP; \
             set it to the service address ranges"
        );
    }
    let _kernel_log = datapath
        .logger
        .take()
        .map(datapath::forward_kernel_log)
        .transpose()?;
    let metrics = Arc::new(AgentMetrics::new(&agent_config.bpffs)?);
    let heartbeat = Arc::new(Heartbeat::new());

    let (health_tx, mut health_rx) = mpsc::unbounded_channel();
    let mut health = HealthMonitor::new(MAX_CONCURRENT_CHECKS, health_tx);
    health.on_check(metrics.health_check_observer());
    let building = Instant::now();
    let registry = Registry::new(config);
    let (published, listing_rx) = watch::channel(listing(&registry));
    debug!(
        took_ms = building.elapsed().as_secs_f64() * 1e3,
        "registry built"
    );
    // healthCheckNodePort servers follow every applied registry.
    let _health_check_ports = crate::observe::healthcheck::spawn(published.subscribe());
    // Started before the first reconcile: the services they saved (admin API, last Redis read)
    // are applied together with the file's, so a restart keeps their VIPs mapped.
    let (sources_tx, mut sources_rx) = mpsc::channel::<SourceUpdate>(16);
    let observer: Arc<dyn SourceObserver> = metrics.clone();
    let _sources = sources::start(&agent_config, sources_tx, listing_rx, observer).await?;
    let mut initial = Vec::new();
    while let Ok(update) = sources_rx.try_recv() {
        initial.push(update);
    }

    let (commands_tx, commands) = std::sync::mpsc::channel();
    let control = ControlHandle(commands_tx);
    let forward = control.clone();
    tokio::spawn(async move {
        while let Some(update) = sources_rx.recv().await {
            if !forward.send(Command::Source(update)) {
                return;
            }
        }
    });
    let forward = control.clone();
    tokio::spawn(async move {
        while let Some(transition) = health_rx.recv().await {
            if !forward.send(Command::Health(transition)) {
                return;
            }
        }
    });
    let forward = control.clone();
    let _watcher = file::watch(&args.config, move |complete| {
        forward.send(Command::ReloadFile { settle: !complete });
    })?;

    let reload_args = args.clone();
    let pins = agent_config.bpffs.clone();
    let control_loop = ControlLoop {
        registry,
        executor,
        health,
        metrics: metrics.clone(),
        heartbeat: heartbeat.clone(),
        published,
        reload: Box::new(move || reload_args.reload_config(&mut reparser)),
        file_origin: args.config.display().to_string(),
        resync_every: agent_config.resync,
        ready_after: ready_after(&agent_config, &initial),
        initial,
        // Only now that this version's maps translate the VIPs may an older layout's programs
        // go: removed earlier, connects would meet empty maps and pass through untranslated.
        on_first_apply: Some(Box::new(move || {
            if let Err(err) = datapath::remove_other_versions(&pins) {
                error!("removing the pins of an older layout version: {err:#}");
            }
        })),
    };
    let runtime = tokio::runtime::Handle::current();
    let thread = std::thread::Builder::new()
        .name("mesh-control".into())
        .spawn(move || {
            let _context = runtime.enter();
            control_loop.run(commands);
        })
        .context("starting the control loop")?;

    let server = http::serve(agent_config.metrics, metrics.clone(), heartbeat.clone()).await?;
    info!(metrics = %agent_config.metrics, "mesh agent running");

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = sighup.recv() => {
                info!("SIGHUP: re-reading {}", args.config.display());
                control.send(Command::ReloadFile { settle: false });
            }
        }
    }
    control.send(Command::Stop);
    let joined = tokio::time::timeout(
        STOP_TIMEOUT,
        tokio::task::spawn_blocking(move || thread.join()),
    )
    .await;
    if joined.is_err() {
        warn!("the control loop did not stop within {STOP_TIMEOUT:?}");
    }
    server.abort();
    drop(datapath);
    info!("stopping; the data path stays in place (`mesh cleanup` removes it)");
    Ok(())
}
