//! Prometheus metrics: the agent's own, and the kernel's counters read from the pinned maps at
//! scrape time (so they stay monotonic across agent restarts: the maps outlive the agent).

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use prometheus::{
    Encoder as _, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
    core::{Collector, Desc},
    proto::MetricFamily,
};

use crate::{datapath::Maps, state::protocol_name};

pub struct AgentMetrics {
    registry: Registry,
    ready: AtomicBool,
    ready_gauge: IntGauge,
    reconcile_runs: IntCounterVec,
    reconcile_duration: Histogram,
    config_rejected: IntCounter,
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
        let reconcile_duration = Histogram::with_opts(
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
        })
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

const BACKEND_CONNECTIONS: (&str, &str) = (
    "mesh_backend_connections_total",
    "Connections the kernel sent to the backend",
);
const SERVICE_NO_BACKEND: (&str, &str) = (
    "mesh_service_no_backend_total",
    "Connects to the VIP that found no backend",
);
const SERVICE_SLOTS: (&str, &str) = (
    "mesh_service_active_slots",
    "Round-robin slots of the service's live slot set (0: no backend)",
);

impl KernelCounters {
    fn new(bpffs: PathBuf) -> anyhow::Result<Self> {
        let descs = Self::families()?.desc().into_iter().cloned().collect();
        Ok(Self { bpffs, descs })
    }

    fn families() -> prometheus::Result<(IntCounterVec, IntCounterVec, IntGaugeVec)> {
        Ok((
            IntCounterVec::new(
                Opts::new(BACKEND_CONNECTIONS.0, BACKEND_CONNECTIONS.1),
                &["service", "backend", "protocol"],
            )?,
            IntCounterVec::new(
                Opts::new(SERVICE_NO_BACKEND.0, SERVICE_NO_BACKEND.1),
                &["service", "vip", "protocol"],
            )?,
            IntGaugeVec::new(
                Opts::new(SERVICE_SLOTS.0, SERVICE_SLOTS.1),
                &["service", "vip", "protocol"],
            )?,
        ))
    }

    fn read(&self) -> anyhow::Result<Vec<MetricFamily>> {
        let snap = Maps::open_pinned(&self.bpffs)?.snapshot()?;
        let (connections, no_backend, slots) = Self::families()?;
        for (vip, svc) in &snap.services {
            let name = snap.names.get(&svc.id).map(String::as_str).unwrap_or("");
            let proto = protocol_name(vip.proto);
            let vip_label = vip.addr.to_string();
            let labels = [name, vip_label.as_str(), proto];
            slots
                .with_label_values(&labels)
                .set(i64::from(svc.slot_count));
            if let Some(stats) = snap.service_stats.get(&svc.id) {
                no_backend
                    .with_label_values(&labels)
                    .inc_by(stats.no_backend);
            }
            for (key, stats) in snap.backend_stats.range(
                mesh_common::BackendStatsKey {
                    service_id: svc.id,
                    backend_id: 0,
                }..=mesh_common::BackendStatsKey {
                    service_id: svc.id,
                    backend_id: u32::MAX,
                },
            ) {
                let Some(addr) = snap.backends.get(&key.backend_id) else {
                    continue;
                };
                connections
                    .with_label_values(&[name, &addr.to_string(), proto])
                    .inc_by(stats.connections);
            }
        }
        let mut families = connections.collect();
        families.extend(no_backend.collect());
        families.extend(slots.collect());
        Ok(families)
    }
}

trait DescOf {
    fn desc(&self) -> Vec<&Desc>;
}

impl<A: Collector, B: Collector, C: Collector> DescOf for (A, B, C) {
    fn desc(&self) -> Vec<&Desc> {
        let mut descs = self.0.desc();
        descs.extend(self.1.desc());
        descs.extend(self.2.desc());
        descs
    }
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
