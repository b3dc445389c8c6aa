//! Prometheus metrics: the agent's own, and the kernel's counters read from the pinned maps at
//! scrape time (so they stay monotonic across agent restarts: the maps outlive the agent).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use mesh_common::{BackendStats, RTT_BUCKET_BASE_US, RTT_BUCKETS};
use prometheus::{
    Encoder as _, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
    core::{Collector, Desc},
    proto::{Bucket, Histogram, LabelPair, Metric, MetricFamily, MetricType},
};

use crate::{
    datapath::Maps,
    health::{Health, Transition},
    state::{Vip, protocol_name},
};

pub struct AgentMetrics {
    registry: Registry,
    ready: AtomicBool,
    ready_gauge: IntGauge,
    reconcile_runs: IntCounterVec,
    reconcile_duration: prometheus::Histogram,
    config_rejected: IntCounter,
    udp_flows_terminated: IntCounter,
    check_duration: prometheus::HistogramVec,
    health_transitions: IntCounterVec,
    backend_health: IntGaugeVec,
    check_failures: IntGaugeVec,
    source_up: IntGaugeVec,
    source_services: IntGaugeVec,
}

impl AgentMetrics {
    pub fn new(bpffs: &Path) -> anyhow::Result<Self> {
        let registry = Registry::new();
        let ready_gauge = IntGauge::new(
            "mesh_agent_ready",
            "1 once the agent has applied its first config",
        )?;
        let reconcile_runs = IntCounterVec::new(
            Opts::new("mesh_reconcile_runs_total", "Reconcile runs by result"),
            &["result"],
        )?;
        let reconcile_duration = prometheus::Histogram::with_opts(
            HistogramOpts::new(
                "mesh_reconcile_duration_seconds",
                "Time to diff the desired state and write the maps",
            )
            .buckets(prometheus::exponential_buckets(0.0001, 4.0, 10)?),
        )?;
        let config_rejected = IntCounter::new(
            "mesh_config_rejected_total",
            "Config edits rejected as invalid; the previous services stayed in force",
        )?;
        let build_info = IntGaugeVec::new(
            Opts::new("mesh_build_info", "Build of the running agent"),
            &["version"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let udp_flows_terminated = IntCounter::new(
            "mesh_udp_flows_terminated_total",
            "Connected UDP sockets terminated because their backend left the service",
        )?;
        let check_duration = prometheus::HistogramVec::new(
            HistogramOpts::new(
                "mesh_health_check_duration_seconds",
                "Duration of active health checks, by outcome",
            )
            .buckets(prometheus::exponential_buckets(0.0001, 3.0, 12)?),
            &["outcome"],
        )?;
        let health_transitions = IntCounterVec::new(
            Opts::new(
                "mesh_health_transitions_total",
                "Backend health state changes, by the state entered",
            ),
            &["to"],
        )?;
        let backend_health = IntGaugeVec::new(
            Opts::new(
                "mesh_backend_health",
                "Health of each checked backend: 1 healthy, 0 unhealthy, -1 unknown (no result yet)",
            ),
            &["service", "vip", "protocol", "backend"],
        )?;
        let check_failures = IntGaugeVec::new(
            Opts::new(
                "mesh_backend_check_consecutive_failures",
                "Consecutive failed active checks of each checked backend",
            ),
            &["service", "vip", "protocol", "backend"],
        )?;
        let source_up = IntGaugeVec::new(
            Opts::new(
                "mesh_registry_source_up",
                "1 when the registry source is reachable and its last update applied",
            ),
            &["source"],
        )?;
        let source_services = IntGaugeVec::new(
            Opts::new(
                "mesh_registry_source_services",
                "Services the registry source currently provides",
            ),
            &["source"],
        )?;
        for c in [
            Box::new(udp_flows_terminated.clone()) as Box<dyn Collector>,
            Box::new(check_duration.clone()),
            Box::new(health_transitions.clone()),
            Box::new(backend_health.clone()),
            Box::new(check_failures.clone()),
            Box::new(source_up.clone()),
            Box::new(source_services.clone()),
        ] {
            registry.register(c)?;
        }
        registry.register(Box::new(ready_gauge.clone()))?;
        registry.register(Box::new(reconcile_runs.clone()))?;
        registry.register(Box::new(reconcile_duration.clone()))?;
        registry.register(Box::new(config_rejected.clone()))?;
        registry.register(Box::new(build_info))?;
        registry.register(Box::new(KernelCounters::new(bpffs.to_path_buf())?))?;
        Ok(Self {
            registry,
            ready: AtomicBool::new(false),
            ready_gauge,
            reconcile_runs,
            reconcile_duration,
            config_rejected,
            udp_flows_terminated,
            check_duration,
            health_transitions,
            backend_health,
            check_failures,
            source_up,
            source_services,
        })
    }

    pub fn udp_flows_terminated(&self, count: u64) {
        self.udp_flows_terminated.inc_by(count);
    }

    /// For `HealthMonitor::on_check`: records each check's outcome and duration.
    pub fn health_check_observer(&self) -> Arc<dyn Fn(&'static str, Duration) + Send + Sync> {
        let histogram = self.check_duration.clone();
        Arc::new(move |outcome, took| {
            histogram
                .with_label_values(&[outcome])
                .observe(took.as_secs_f64())
        })
    }

    pub fn health_transition(&self, transition: &Transition) {
        let to = match transition.to {
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
            Health::Unknown => "unknown",
        };
        self.health_transitions.with_label_values(&[to]).inc();
    }

    /// Replaces the per-backend health gauges (backends no longer checked disappear).
    pub fn set_health(
        &self,
        snapshot: Vec<(Vip, SocketAddr, Health, u32)>,
        names: &BTreeMap<Vip, String>,
    ) {
        self.backend_health.reset();
        self.check_failures.reset();
        for (vip, backend, health, failures) in snapshot {
            let labels = [
                names.get(&vip).cloned().unwrap_or_default(),
                vip.addr.to_string(),
                vip.protocol_name().to_string(),
                backend.to_string(),
            ];
            let labels = [
                labels[0].as_str(),
                labels[1].as_str(),
                labels[2].as_str(),
                labels[3].as_str(),
            ];
            let value = match health {
                Health::Healthy => 1,
                Health::Unhealthy => 0,
                Health::Unknown => -1,
            };
            self.backend_health.with_label_values(&labels).set(value);
            self.check_failures
                .with_label_values(&labels)
                .set(i64::from(failures));
        }
    }

    pub fn source_state(&self, source: &str, up: bool, services: usize) {
        self.source_up
            .with_label_values(&[source])
            .set(i64::from(up));
        self.source_services
            .with_label_values(&[source])
            .set(services as i64);
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
        self.ready_gauge.set(i64::from(ready));
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn observe_reconcile(&self, took: Duration, ok: bool) {
        self.reconcile_duration.observe(took.as_secs_f64());
        self.reconcile_runs
            .with_label_values(&[if ok { "ok" } else { "error" }])
            .inc();
    }

    pub fn config_rejected(&self) {
        self.config_rejected.inc();
    }

    /// The Prometheus text exposition of everything registered.
    pub fn render(&self) -> anyhow::Result<String> {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(String::from_utf8(out)?)
    }
}

/// Reads the kernel's per-CPU counters from the pinned maps on every scrape and builds fresh
/// metric families, so a removed backend stops being exported.
struct KernelCounters {
    bpffs: PathBuf,
    descs: Vec<Desc>,
}

/// The families built from one snapshot of the maps.
struct Families {
    connections: IntCounterVec,
    connect_failures: IntCounterVec,
    bytes_sent: IntCounterVec,
    bytes_received: IntCounterVec,
    backend_active: IntGaugeVec,
    no_backend: IntCounterVec,
    slots: IntGaugeVec,
    backends: IntGaugeVec,
    datapath: IntCounterVec,
    map_entries: IntGaugeVec,
    map_capacity: IntGaugeVec,
}

const BACKEND_LABELS: &[&str] = &["service", "backend", "protocol"];
const SERVICE_LABELS: &[&str] = &["service", "vip", "protocol"];

impl Families {
    fn new() -> prometheus::Result<Self> {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels)
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            IntGaugeVec::new(Opts::new(name, help), labels)
        };
        Ok(Self {
            connections: counter(
                "mesh_backend_connections_total",
                "Connections (and unconnected UDP datagrams) the kernel sent to the backend",
                BACKEND_LABELS,
            )?,
            connect_failures: counter(
                "mesh_backend_connect_failures_total",
                "TCP connects to the backend that failed before establishing (passive detection)",
                BACKEND_LABELS,
            )?,
            bytes_sent: counter(
                "mesh_backend_sent_bytes_total",
                "Bytes clients sent to the backend on closed TCP connections (telemetry)",
                BACKEND_LABELS,
            )?,
            bytes_received: counter(
                "mesh_backend_received_bytes_total",
                "Bytes clients received from the backend on closed TCP connections (telemetry)",
                BACKEND_LABELS,
            )?,
            backend_active: gauge(
                "mesh_backend_active",
                "1 when the backend takes new connections (in the live slot set), else 0",
                BACKEND_LABELS,
            )?,
            no_backend: counter(
                "mesh_service_no_backend_total",
                "Connects to the VIP that found no backend",
                SERVICE_LABELS,
            )?,
            slots: gauge(
                "mesh_service_slots",
                "Round-robin slots of the service's live slot set (0: no backend)",
                SERVICE_LABELS,
            )?,
            backends: gauge(
                "mesh_service_backends",
                "Backends of the service by state: configured, or active (taking connections)",
                &["service", "vip", "protocol", "state"],
            )?,
            datapath: counter(
                "mesh_datapath_events_total",
                "Node-wide data path events: reverse state created/released, UDP flows tracked/untracked (map full)",
                &["event"],
            )?,
            map_entries: gauge(
                "mesh_map_entries",
                "Entries in each pinned map (per-CPU maps count keys)",
                &["map"],
            )?,
            map_capacity: gauge(
                "mesh_map_capacity",
                "max_entries of each pinned map (alert before entries reach it)",
                &["map"],
            )?,
        })
    }

    fn collectors(&self) -> [&dyn Collector; 11] {
        [
            &self.connections,
            &self.connect_failures,
            &self.bytes_sent,
            &self.bytes_received,
            &self.backend_active,
            &self.no_backend,
            &self.slots,
            &self.backends,
            &self.datapath,
            &self.map_entries,
            &self.map_capacity,
        ]
    }
}

const RTT_NAME: &str = "mesh_backend_rtt_seconds";
const RTT_HELP: &str =
    "Smoothed TCP round-trip time of closed connections to the backend, at close (telemetry)";

impl KernelCounters {
    fn new(bpffs: PathBuf) -> anyhow::Result<Self> {
        let families = Families::new()?;
        let mut descs: Vec<Desc> = families
            .collectors()
            .iter()
            .flat_map(|c| c.desc().into_iter().cloned())
            .collect();
        descs.push(Desc::new(
            RTT_NAME.into(),
            RTT_HELP.into(),
            BACKEND_LABELS.iter().map(|l| l.to_string()).collect(),
            Default::default(),
        )?);
        Ok(Self { bpffs, descs })
    }

    fn read(&self) -> anyhow::Result<Vec<MetricFamily>> {
        let maps = Maps::open_pinned(&self.bpffs)?;
        let snap = maps.snapshot()?;
        let f = Families::new()?;
        let mut rtt = Vec::new();
        for (vip, svc) in &snap.services {
            let name = snap.names.get(&svc.id).map(String::as_str).unwrap_or("");
            let proto = protocol_name(vip.proto);
            let vip_label = vip.addr.to_string();
            let labels = [name, vip_label.as_str(), proto];
            f.slots
                .with_label_values(&labels)
                .set(i64::from(svc.slot_count));
            if let Some(stats) = snap.service_stats.get(&svc.id) {
                f.no_backend
                    .with_label_values(&labels)
                    .inc_by(stats.no_backend);
            }
            let members = snap.members_of(svc.id);
            let mut configured = 0;
            let mut active = 0;
            for (key, stats) in members {
                let Some(addr) = snap.backends.get(&key.backend_id) else {
                    continue;
                };
                configured += 1;
                let is_active = snap.active.contains_key(key);
                active += i64::from(is_active);
                let addr = addr.to_string();
                let b = [name, addr.as_str(), proto];
                f.connections
                    .with_label_values(&b)
                    .inc_by(stats.connections);
                f.connect_failures
                    .with_label_values(&b)
                    .inc_by(stats.connect_failures);
                f.bytes_sent.with_label_values(&b).inc_by(stats.bytes_sent);
                f.bytes_received
                    .with_label_values(&b)
                    .inc_by(stats.bytes_received);
                f.backend_active
                    .with_label_values(&b)
                    .set(i64::from(is_active));
                rtt.push(rtt_histogram(&b, stats));
            }
            f.backends
                .with_label_values(&[name, &vip_label, proto, "configured"])
                .set(configured);
            f.backends
                .with_label_values(&[name, &vip_label, proto, "active"])
                .set(active);
        }
        let dp = maps.datapath_stats()?;
        for (event, value) in [
            ("reverse_state_created", dp.rev_created),
            ("reverse_state_released", dp.rev_released),
            ("udp_flow_tracked", dp.udp_flows_added),
            ("udp_flow_untracked_map_full", dp.udp_flows_full),
        ] {
            f.datapath.with_label_values(&[event]).inc_by(value);
        }
        for (map, entries) in [
            ("services", snap.services.len()),
            ("slots", snap.slots.len()),
            ("backends", snap.backends.len()),
            ("backend_stats", snap.backend_stats.len()),
            ("active", snap.active.len()),
            ("service_names", snap.names.len()),
        ]
        .into_iter()
        .chain(maps.extra_entry_counts())
        {
            f.map_entries.with_label_values(&[map]).set(entries as i64);
        }
        for (map, capacity) in crate::datapath::map_capacities(&self.bpffs)? {
            f.map_capacity
                .with_label_values(&[&map])
                .set(i64::from(capacity));
        }
        let mut families: Vec<MetricFamily> =
            f.collectors().iter().flat_map(|c| c.collect()).collect();
        if !rtt.is_empty() {
            let mut family = MetricFamily::default();
            family.set_name(RTT_NAME.into());
            family.set_help(RTT_HELP.into());
            family.set_field_type(MetricType::HISTOGRAM);
            family.set_metric(rtt);
            families.push(family);
        }
        Ok(families)
    }
}

/// The kernel's log2 RTT buckets as a cumulative Prometheus histogram in seconds.
fn rtt_histogram(labels: &[&str; 3], stats: &BackendStats) -> Metric {
    let mut buckets = Vec::with_capacity(RTT_BUCKETS);
    let mut cumulative = 0;
    for (i, count) in stats.rtt_buckets.iter().enumerate().take(RTT_BUCKETS - 1) {
        cumulative += count;
        let mut bucket = Bucket::default();
        bucket.set_upper_bound((RTT_BUCKET_BASE_US << i) as f64 / 1e6);
        bucket.set_cumulative_count(cumulative);
        buckets.push(bucket);
    }
    let mut histogram = Histogram::default();
    histogram.set_bucket(buckets);
    histogram.set_sample_count(stats.rtt_samples);
    histogram.set_sample_sum(stats.rtt_sum_us as f64 / 1e6);
    let mut metric = Metric::default();
    metric.set_label(
        BACKEND_LABELS
            .iter()
            .zip(labels)
            .map(|(name, value)| {
                let mut pair = LabelPair::default();
                pair.set_name(name.to_string());
                pair.set_value(value.to_string());
                pair
            })
            .collect(),
    );
    metric.set_histogram(histogram);
    metric
}

impl Collector for KernelCounters {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        match self.read() {
            Ok(families) => families,
            Err(err) => {
                tracing::warn!("reading kernel counters for /metrics: {err:#}");
                Vec::new()
            }
        }
    }
}
