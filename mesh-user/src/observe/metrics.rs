//! Prometheus metrics: the agent's own, and the kernel's counters read from the pinned maps at
//! scrape time (so they stay monotonic across agent restarts: the maps outlive the agent).

use std::{
    collections::{BTreeMap, HashMap, HashSet, hash_map::Entry},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError, Weak},
    time::Duration,
};

use mesh_common::{
    BackendStats, BackendStatsKey, RTT_BUCKET_BASE_US, RTT_BUCKETS, nodeport::NodeportBackendStats,
};
use prometheus::{
    Encoder as _, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder, core::Collector,
};

use crate::{
    datapath::{Counters, Maps},
    health::{Health, Transition},
    model::{Vip, protocol_name},
    reconcile::Applied,
    registry::SourceObserver,
};

pub struct AgentMetrics {
    registry: Registry,
    kernel: KernelCounters,
    ready_gauge: IntGauge,
    reconcile_runs: IntCounterVec,
    reconcile_duration: prometheus::Histogram,
    config_rejected: IntCounter,
    udp_flows_terminated: IntCounter,
    check_duration: prometheus::HistogramVec,
    health_transitions: IntCounterVec,
    backend_health: IntGaugeVec,
    check_failures: IntGaugeVec,
    /// The two gauges of each health target, kept between refreshes so that a refresh only
    /// stores values: re-creating every labelled gauge each second was most of the control
    /// loop's CPU at 10k services with checks (allocator churn).
    health_gauges: Mutex<HashMap<(Vip, SocketAddr), TargetGauges>>,
    source_up: IntGaugeVec,
    source_services: IntGaugeVec,
    source_skipped: IntGaugeVec,
    resync_repairs: IntCounterVec,
    resync_runs: IntCounterVec,
    desired_generation: IntGauge,
    applied_generation: IntGauge,
    /// The control loop's model of the maps as it last wrote them: a scrape takes the labels
    /// of the kernel's counters from it (see `Applied::counter_labels`). It no longer upgrades
    /// once the model changed; until the loop hands on the new one, scrapes read the maps.
    maps_view: Mutex<Weak<Applied>>,
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
        let source_skipped = IntGaugeVec::new(
            Opts::new(
                "mesh_registry_source_skipped",
                "Objects (or ports of them) the registry source leaves out, by reason (headless, ExternalName, SCTP, another service-proxy-name, ...)",
            ),
            &["source", "reason"],
        )?;
        let resync_repairs = IntCounterVec::new(
            Opts::new(
                "mesh_resync_repairs_total",
                "Map entries the periodic resync found different from the desired state and rewrote or deleted, by map",
            ),
            &["map"],
        )?;
        let resync_runs = IntCounterVec::new(
            Opts::new(
                "mesh_resync_runs_total",
                "Periodic resyncs of the maps, by result",
            ),
            &["result"],
        )?;
        let desired_generation = IntGauge::new(
            "mesh_desired_generation",
            "Version of the desired state (registry and health); bumped on every change",
        )?;
        let applied_generation = IntGauge::new(
            "mesh_applied_generation",
            "Version of the desired state the maps hold; equal to mesh_desired_generation when in sync",
        )?;
        for c in [
            Box::new(resync_repairs.clone()) as Box<dyn Collector>,
            Box::new(resync_runs.clone()),
            Box::new(desired_generation.clone()),
            Box::new(applied_generation.clone()),
            Box::new(udp_flows_terminated.clone()),
            Box::new(check_duration.clone()),
            Box::new(health_transitions.clone()),
            Box::new(backend_health.clone()),
            Box::new(check_failures.clone()),
            Box::new(source_up.clone()),
            Box::new(source_services.clone()),
            Box::new(source_skipped.clone()),
        ] {
            registry.register(c)?;
        }
        registry.register(Box::new(ready_gauge.clone()))?;
        registry.register(Box::new(reconcile_runs.clone()))?;
        registry.register(Box::new(reconcile_duration.clone()))?;
        registry.register(Box::new(config_rejected.clone()))?;
        registry.register(Box::new(build_info))?;
        Ok(Self {
            registry,
            kernel: KernelCounters {
                bpffs: bpffs.to_path_buf(),
            },
            ready_gauge,
            reconcile_runs,
            reconcile_duration,
            config_rejected,
            udp_flows_terminated,
            check_duration,
            health_transitions,
            backend_health,
            check_failures,
            health_gauges: Mutex::new(HashMap::new()),
            source_up,
            source_services,
            source_skipped,
            resync_repairs,
            resync_runs,
            desired_generation,
            applied_generation,
            maps_view: Mutex::new(Weak::new()),
        })
    }

    pub fn resync(&self, repairs: Option<&BTreeMap<&'static str, u64>>) {
        match repairs {
            Some(repairs) => {
                self.resync_runs.with_label_values(&["ok"]).inc();
                for (map, count) in repairs {
                    self.resync_repairs.with_label_values(&[map]).inc_by(*count);
                }
            }
            None => self.resync_runs.with_label_values(&["error"]).inc(),
        }
    }

    pub fn generations(&self, desired: u64, applied: u64) {
        self.desired_generation
            .set(i64::try_from(desired).unwrap_or(i64::MAX));
        self.applied_generation
            .set(i64::try_from(applied).unwrap_or(i64::MAX));
    }

    /// The model of the maps scrapes label the counters from (`maps_view`). The agent is the
    /// only writer of what it labels with, and the resync checks the model against the maps.
    pub fn maps_written(&self, view: Weak<Applied>) {
        *self
            .maps_view
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = view;
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
        let mut gauges = self
            .health_gauges
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut current = HashSet::with_capacity(snapshot.len());
        for (vip, backend, health, failures) in snapshot {
            let name = names.get(&vip).map_or("", String::as_str);
            let key = (vip, backend);
            current.insert(key);
            let target = match gauges.entry(key) {
                Entry::Occupied(entry) if entry.get().labels[0] == name => entry.into_mut(),
                Entry::Occupied(mut entry) => {
                    // Renamed service: the old series goes, a new one is made.
                    entry.get().remove(self);
                    entry.insert(TargetGauges::new(self, name, &vip, &backend));
                    entry.into_mut()
                }
                Entry::Vacant(entry) => entry.insert(TargetGauges::new(self, name, &vip, &backend)),
            };
            target.health.set(match health {
                Health::Healthy => 1,
                Health::Unhealthy => 0,
                Health::Unknown => -1,
            });
            target.failures.set(i64::from(failures));
        }
        gauges.retain(|key, target| {
            let keep = current.contains(key);
            if !keep {
                target.remove(self);
            }
            keep
        });
    }

    fn set_source_state(&self, source: &str, up: bool, services: usize) {
        self.source_up
            .with_label_values(&[source])
            .set(i64::from(up));
        self.source_services
            .with_label_values(&[source])
            .set(services as i64);
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready_gauge.set(i64::from(ready));
    }

    pub fn observe_reconcile(&self, took: Duration, ok: bool) {
        self.reconcile_duration.observe(took.as_secs_f64());
        self.reconcile_runs
            .with_label_values(&[if ok { "ok" } else { "error" }])
            .inc();
    }

    pub fn count_rejected(&self) {
        self.config_rejected.inc();
    }

    /// The Prometheus text exposition of everything registered, handed to `emit` in chunks
    /// of about `CHUNK` bytes as it is written (the whole text is 23 MB at 10k services: no
    /// scrape holds it at once). `emit` returns false when nobody wants more (the client
    /// hung up); rendering then stops.
    pub fn render_to(&self, emit: &mut dyn FnMut(Vec<u8>) -> bool) -> anyhow::Result<()> {
        let mut own = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut own)?;
        if !emit(own) {
            return Ok(());
        }
        let mut out = Sink::new(emit);
        let view = self
            .maps_view
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .upgrade();
        if let Err(err) = self.kernel.render(&mut out, view) {
            // The agent's own metrics still tell what is wrong.
            tracing::warn!("reading kernel counters for /metrics: {err:#}");
        }
        out.flush();
        Ok(())
    }

    /// The whole text at once (tests).
    #[cfg(test)]
    fn render(&self) -> anyhow::Result<String> {
        let mut text = Vec::new();
        self.render_to(&mut |chunk| {
            text.extend_from_slice(&chunk);
            true
        })?;
        Ok(String::from_utf8(text)?)
    }
}

/// Bytes handed on at a time: big enough that sending costs little per byte, small enough
/// that the few chunks in flight are nothing next to the agent's maps, and that a chunk's
/// buffer stays below the allocator's mapping threshold (reused, not mapped afresh).
const CHUNK: usize = 120 * 1024;

/// The exposition text being written: bytes go to a buffer that is handed on whenever it
/// reaches `CHUNK` (chunks need not end at a line).
pub struct Sink<'a> {
    buf: Vec<u8>,
    emit: &'a mut dyn FnMut(Vec<u8>) -> bool,
    /// The receiver wants no more.
    closed: bool,
}

impl<'a> Sink<'a> {
    fn new(emit: &'a mut dyn FnMut(Vec<u8>) -> bool) -> Self {
        Self {
            buf: Vec::with_capacity(CHUNK + 8192),
            emit,
            closed: false,
        }
    }

    fn bytes(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() >= CHUNK {
            self.flush();
        }
    }

    fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }

    #[cfg(test)]
    fn u64(&mut self, value: u64) {
        let mut digits = [0u8; 20];
        let at = decimal(&mut digits, value);
        self.bytes(&digits[at..]);
    }

    /// `name{labels<extra>} value\n`, `labels` already escaped and joined. Most of the text
    /// is these lines: one reservation and one chunk check each.
    fn series(&mut self, name: &str, labels: &[u8], extra: &str, value: u64) {
        let mut digits = [0u8; 20];
        let at = decimal(&mut digits, value);
        let buf = &mut self.buf;
        buf.reserve(name.len() + labels.len() + extra.len() + 24);
        buf.extend_from_slice(name.as_bytes());
        buf.push(b'{');
        buf.extend_from_slice(labels);
        buf.extend_from_slice(extra.as_bytes());
        buf.extend_from_slice(b"} ");
        buf.extend_from_slice(&digits[at..]);
        buf.push(b'\n');
        if buf.len() >= CHUNK {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if self.closed {
            self.buf.clear();
        } else if !self.buf.is_empty() {
            let full = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK + 8192));
            self.closed = !(self.emit)(full);
        }
    }
}

/// `value` in decimal at the end of `digits`, without `fmt`; returns where it starts.
fn decimal(digits: &mut [u8; 20], mut value: u64) -> usize {
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            return at;
        }
    }
}

impl std::fmt::Write for Sink<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.str(s);
        Ok(())
    }
}

/// Renders the kernel's counters from the pinned maps on every scrape, straight into the
/// exposition text: a node with 10k services has ~40k backends and ~300k series, and building
/// them as metric objects first cost hundreds of MB per scrape. A removed backend stops being
/// exported because it is no longer in the maps.
struct KernelCounters {
    bpffs: PathBuf,
}

/// One backend of one service: where its labels are in the label buffer, and its counters.
struct Row<'a> {
    labels: std::ops::Range<usize>,
    stats: &'a BackendStats,
    active: bool,
}

/// One service: where its labels are, and its per-service values.
struct ServiceRow {
    labels: std::ops::Range<usize>,
    slots: u32,
    no_backend: u64,
    configured: u32,
    active: u32,
}

impl KernelCounters {
    /// `model`: what the maps hold as the agent wrote it, if known; only the counters are
    /// then read from the maps.
    ///
    /// The model is let go as soon as the labels are taken: while a scrape holds it, the
    /// control loop's next change copies it instead of changing it in place.
    fn render(&self, out: &mut Sink, model: Option<Arc<Applied>>) -> anyhow::Result<()> {
        use std::fmt::Write as _;
        let started = std::time::Instant::now();
        let maps = Maps::open_pinned(&self.bpffs)?;
        let read = match model {
            Some(model) => maps.counters_labelled(move || model.counter_labels())?,
            None => maps.counters()?,
        };
        let read_took = started.elapsed();
        render_services(out, &read);
        tracing::debug!(
            "/metrics: maps read in {read_took:?}, services and backends written in {:?}",
            started.elapsed() - read_took
        );

        let dp = maps.datapath_stats()?;
        header(
            out,
            "mesh_datapath_events_total",
            "counter",
            "Node-wide data path events: reverse state created/released, UDP flows tracked/untracked (map full), slot re-reads after a generation switch",
        );
        for (event, value) in [
            ("reverse_state_created", dp.rev_created),
            ("reverse_state_released", dp.rev_released),
            ("udp_flow_tracked", dp.udp_flows_added),
            ("udp_flow_untracked_map_full", dp.udp_flows_full),
            ("slot_retry", dp.slot_retries),
            ("slot_miss", dp.slot_misses),
        ] {
            let _ = writeln!(
                out,
                "mesh_datapath_events_total{{event=\"{event}\"}} {value}"
            );
        }
        header(
            out,
            "mesh_map_full_total",
            "counter",
            "Inserts the kernel programs could not make because the map (or socket storage) was full, by map",
        );
        for (map, value) in [
            ("udp_flows", dp.udp_flows_full),
            ("passive", dp.passive_full),
            ("affinity", dp.affinity_full),
            ("sock_rev", dp.rev_failed),
        ] {
            let _ = writeln!(out, "mesh_map_full_total{{map=\"{map}\"}} {value}");
        }
        header(
            out,
            "mesh_map_entries",
            "gauge",
            "Entries in each pinned map (per-CPU maps count keys, not CPUs)",
        );
        for (map, entries) in [
            ("services", read.services.len()),
            ("slots", read.slots),
            ("backends", read.backends.len()),
            ("backend_stats", read.backend_stats.len()),
            ("active", read.active.len()),
            ("service_names", read.names.len()),
        ]
        .into_iter()
        .chain(maps.extra_entry_counts()?)
        .chain(crate::datapath::tc::nat_flow_entries(&self.bpffs)?.map(|n| ("nat_flows", n)))
        {
            let _ = writeln!(out, "mesh_map_entries{{map=\"{map}\"}} {entries}");
        }
        if let Some(np) = crate::datapath::tc::counters(&self.bpffs)? {
            let s = &np.stats;
            header(
                out,
                "mesh_nodeport_events_total",
                "counter",
                "Traffic from other hosts at the TC programs: flows created/expired, packets without backend, flows that could not be recorded, route lookups that failed, ICMP port unreachables sent (or not, rate limit) for UDP without backend, ICMP errors about translated flows translated, TCP flows replaced by a new connection on the client's reused port, flows given another source port because the client's was taken towards that backend",
            );
            for (event, value) in [
                ("flow_created", s.flows_created),
                ("flow_expired", np.flows_expired),
                ("no_backend", s.no_backend),
                ("flow_failed", s.flow_failures),
                ("fib_miss", s.fib_misses),
                ("icmp_unreachable_sent", np.icmp.unreachable_sent),
                ("icmp_unreachable_rate_limited", np.icmp.rate_limited),
                ("icmp_error_translated", np.icmp.errors_translated),
                ("flow_reopened", np.icmp.flows_reopened),
                ("source_port_remapped", np.icmp.ports_remapped),
            ] {
                let _ = writeln!(
                    out,
                    "mesh_nodeport_events_total{{event=\"{event}\"}} {value}"
                );
            }
            for (name, help, values) in [
                (
                    "mesh_nodeport_packets_total",
                    "Packets the TC programs translated, towards backends (in) and back to clients (out)",
                    [s.packets_in, s.packets_out],
                ),
                (
                    "mesh_nodeport_bytes_total",
                    "Bytes (whole frames) the TC programs translated, by direction",
                    [s.bytes_in, s.bytes_out],
                ),
            ] {
                header(out, name, "counter", help);
                for (dir, value) in ["in", "out"].into_iter().zip(values) {
                    let _ = writeln!(out, "{name}{{direction=\"{dir}\"}} {value}");
                }
            }
            header(
                out,
                "mesh_nodeport_flows",
                "gauge",
                "Flows from other hosts in nat_flows at the last expiry pass",
            );
            let _ = writeln!(out, "mesh_nodeport_flows {}", np.flows_live);
            render_nodeport_backends(out, &read, &maps.nodeport_backend_stats()?);
        }
        header(
            out,
            "mesh_map_capacity",
            "gauge",
            "max_entries of each pinned map (alert before entries reach it)",
        );
        for (map, capacity) in crate::datapath::map_capacities(&self.bpffs)? {
            let _ = writeln!(out, "mesh_map_capacity{{map=\"{map}\"}} {capacity}");
        }
        Ok(())
    }
}

/// The per-backend and per-service families. Each label set is escaped once into one
/// buffer, and every line is written from it: no allocation per series.
fn render_services(out: &mut Sink, read: &Counters) {
    use std::io::Write as _;
    let mut labels: Vec<u8> = Vec::with_capacity(read.backend_stats.len() * 64);
    let mut services = Vec::with_capacity(read.services.len());
    let mut rows = Vec::with_capacity(read.backend_stats.len());
    let members = read.members();
    for (vip, svc) in &read.services {
        let name = read.names.get(&svc.id).map_or("", String::as_str);
        let proto = protocol_name(vip.proto);
        let start = labels.len();
        push_label(&mut labels, "service", name);
        labels.extend_from_slice(b",vip=\"");
        let _ = write!(labels, "{}", vip.addr);
        labels.extend_from_slice(b"\",protocol=\"");
        labels.extend_from_slice(proto.as_bytes());
        labels.push(b'"');
        let service_labels = start..labels.len();
        let (mut configured, mut active) = (0, 0);
        for (key, stats) in members.of(svc.id) {
            let Some(addr) = read.backends.get(&key.backend_id) else {
                continue;
            };
            let is_active = read.active.contains(key);
            configured += 1;
            active += u32::from(is_active);
            let start = labels.len();
            push_label(&mut labels, "service", name);
            labels.extend_from_slice(b",backend=\"");
            let _ = write!(labels, "{addr}");
            labels.extend_from_slice(b"\",protocol=\"");
            labels.extend_from_slice(proto.as_bytes());
            labels.push(b'"');
            rows.push(Row {
                labels: start..labels.len(),
                stats,
                active: is_active,
            });
        }
        services.push(ServiceRow {
            labels: service_labels,
            slots: svc.slot_count,
            no_backend: read.no_backend.get(&svc.id).copied().unwrap_or(0),
            configured,
            active,
        });
    }

    /// A per-backend family: name, type, help, and its value.
    type Family = (&'static str, &'static str, &'static str, fn(&Row) -> u64);
    let families: [Family; 5] = [
        (
            "mesh_backend_connections_total",
            "counter",
            "Connections (and unconnected UDP datagrams) the kernel sent to the backend",
            |r| r.stats.connections,
        ),
        (
            "mesh_backend_connect_failures_total",
            "counter",
            "TCP connects to the backend that failed before establishing (passive detection)",
            |r| r.stats.connect_failures,
        ),
        (
            "mesh_backend_sent_bytes_total",
            "counter",
            "Payload bytes clients sent to the backend on closed TCP connections (telemetry)",
            |r| r.stats.bytes_sent,
        ),
        (
            "mesh_backend_received_bytes_total",
            "counter",
            "Payload bytes clients received from the backend on closed TCP connections (telemetry)",
            |r| r.stats.bytes_received,
        ),
        (
            "mesh_backend_active",
            "gauge",
            "1 when the backend takes new connections (in the live slot set), else 0",
            |r| u64::from(r.active),
        ),
    ];
    for (name, kind, help, value) in families {
        header(out, name, kind, help);
        for row in &rows {
            if out.closed {
                return;
            }
            out.series(name, &labels[row.labels.clone()], "", value(row));
        }
    }

    // A histogram is 18 series: only backends with measured connections get one.
    header(out, RTT_NAME, "histogram", RTT_HELP);
    let bucket = format!("{RTT_NAME}_bucket");
    let bounds: Vec<String> = (0..RTT_BUCKETS - 1)
        .map(|i| format!(",le=\"{}\"", (RTT_BUCKET_BASE_US << i) as f64 / 1e6))
        .collect();
    for row in rows.iter().filter(|r| r.stats.rtt_samples > 0) {
        let row_labels = &labels[row.labels.clone()];
        let mut cumulative = 0;
        for (count, bound) in row.stats.rtt_buckets.iter().zip(&bounds) {
            cumulative += count;
            out.series(&bucket, row_labels, bound, cumulative);
        }
        out.series(&bucket, row_labels, ",le=\"+Inf\"", row.stats.rtt_samples);
        out.str(RTT_NAME);
        out.bytes(b"_sum{");
        out.bytes(row_labels);
        let _ = std::fmt::Write::write_fmt(
            out,
            format_args!("}} {}\n", row.stats.rtt_sum_us as f64 / 1e6),
        );
        out.series(
            &format!("{RTT_NAME}_count"),
            row_labels,
            "",
            row.stats.rtt_samples,
        );
    }

    header(
        out,
        "mesh_service_no_backend_total",
        "counter",
        "Connects to the VIP that found no backend",
    );
    for svc in &services {
        out.series(
            "mesh_service_no_backend_total",
            &labels[svc.labels.clone()],
            "",
            svc.no_backend,
        );
    }
    header(
        out,
        "mesh_service_slots",
        "gauge",
        "Round-robin slots of the service's live slot set (0: no backend)",
    );
    for svc in &services {
        out.series(
            "mesh_service_slots",
            &labels[svc.labels.clone()],
            "",
            u64::from(svc.slots),
        );
    }
    header(
        out,
        "mesh_service_backends",
        "gauge",
        "Backends of the service by state: configured, or active (taking connections)",
    );
    for svc in &services {
        let svc_labels = &labels[svc.labels.clone()];
        for (state, value) in [
            (",state=\"configured\"", svc.configured),
            (",state=\"active\"", svc.active),
        ] {
            out.series("mesh_service_backends", svc_labels, state, u64::from(value));
        }
    }
}

/// Packets and bytes of each backend of each external service at the TC programs, by
/// direction: `in` towards the backend, `out` its replies back to the client.
fn render_nodeport_backends(
    out: &mut Sink,
    read: &Counters,
    stats: &std::collections::BTreeMap<BackendStatsKey, NodeportBackendStats>,
) {
    let mut rows = Vec::new();
    let members = read.members();
    for (vip, svc) in read.services.iter().filter(|(vip, _)| vip.external) {
        let name = read.names.get(&svc.id).map_or("", String::as_str);
        for (key, _) in members.of(svc.id) {
            let (Some(addr), Some(s)) = (read.backends.get(&key.backend_id), stats.get(key)) else {
                continue;
            };
            let labels = labels_inner(&[
                ("service", name),
                ("backend", &addr.to_string()),
                ("protocol", protocol_name(vip.proto)),
            ]);
            rows.push((labels, *s));
        }
    }
    /// A metric family: name, help, and its (in, out) values.
    type Family = (
        &'static str,
        &'static str,
        fn(&NodeportBackendStats) -> [u64; 2],
    );
    let families: [Family; 2] = [
        (
            "mesh_nodeport_backend_packets_total",
            "Packets the TC programs translated for the backend of an external service, towards it (in) and back to the client (out)",
            |s| [s.packets_in, s.packets_out],
        ),
        (
            "mesh_nodeport_backend_bytes_total",
            "Bytes (whole frames) the TC programs translated for the backend of an external service, by direction",
            |s| [s.bytes_in, s.bytes_out],
        ),
    ];
    for (name, help, values) in families {
        header(out, name, "counter", help);
        for (labels, s) in &rows {
            for (dir, value) in [",direction=\"in\"", ",direction=\"out\""]
                .into_iter()
                .zip(values(s))
            {
                out.series(name, labels.as_bytes(), dir, value);
            }
        }
    }
}

const RTT_NAME: &str = "mesh_backend_rtt_seconds";
const RTT_HELP: &str =
    "Smoothed TCP round-trip time of closed connections to the backend, at close (telemetry)";

fn header(out: &mut Sink, name: &str, kind: &str, help: &str) {
    for part in [
        "# HELP ",
        name,
        " ",
        help,
        "\n# TYPE ",
        name,
        " ",
        kind,
        "\n",
    ] {
        out.str(part);
    }
}

/// `{a="x",b="y"}`.
#[cfg(test)]
fn labels(pairs: &[(&str, &str)]) -> String {
    format!("{{{}}}", labels_inner(pairs))
}

/// `a="x",b="y"`, values escaped as the text format requires.
fn labels_inner(pairs: &[(&str, &str)]) -> String {
    let mut out = Vec::new();
    for (i, (name, value)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        push_label(&mut out, name, value);
    }
    String::from_utf8(out).expect("labels are built from strings")
}

/// `name="value"`, the value escaped as the text format requires.
fn push_label(out: &mut Vec<u8>, name: &str, value: &str) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"=\"");
    for &b in value.as_bytes() {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'"' => out.extend_from_slice(b"\\\""),
            b'\n' => out.extend_from_slice(b"\\n"),
            b => out.push(b),
        }
    }
    out.push(b'"');
}

impl SourceObserver for AgentMetrics {
    fn source_state(&self, source: &str, up: bool, services: usize) {
        self.set_source_state(source, up, services);
    }

    fn config_rejected(&self) {
        self.count_rejected();
    }

    fn skipped(&self, source: &str, reason: &str, count: usize) {
        self.source_skipped
            .with_label_values(&[source, reason])
            .set(count as i64);
    }
}

/// The health gauges of one (service, backend) target and their label values.
struct TargetGauges {
    /// service, vip, protocol, backend.
    labels: [String; 4],
    health: IntGauge,
    failures: IntGauge,
}

impl TargetGauges {
    fn new(metrics: &AgentMetrics, name: &str, vip: &Vip, backend: &SocketAddr) -> Self {
        let labels = [
            name.to_owned(),
            vip.addr.to_string(),
            vip.protocol_name().to_string(),
            backend.to_string(),
        ];
        let values = label_values(&labels);
        Self {
            health: metrics.backend_health.with_label_values(&values),
            failures: metrics.check_failures.with_label_values(&values),
            labels,
        }
    }

    fn remove(&self, metrics: &AgentMetrics) {
        let values = label_values(&self.labels);
        // Absent only if never made, which `new` rules out; nothing to do then.
        let _ = metrics.backend_health.remove_label_values(&values);
        let _ = metrics.check_failures.remove_label_values(&values);
    }
}

fn label_values(labels: &[String; 4]) -> [&str; 4] {
    [
        labels[0].as_str(),
        labels[1].as_str(),
        labels[2].as_str(),
        labels[3].as_str(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(
            labels(&[("a", "x\"y\\z\n"), ("b", "1")]),
            r#"{a="x\"y\\z\n",b="1"}"#
        );
    }

    /// Two services, three pairs (one with RTT samples), and a counter of a backend the read
    /// did not see (dropped, as a half-done update would be).
    fn counters() -> Counters {
        let tcp = Vip {
            addr: SocketAddr::from(([127, 100, 0, 1], 80)),
            proto: mesh_common::PROTO_TCP,
            external: false,
        };
        let udp = Vip {
            addr: SocketAddr::from(([127, 100, 0, 2], 53)),
            proto: mesh_common::PROTO_UDP,
            external: false,
        };
        let service = |id, slot_count| mesh_common::Service {
            id,
            slot_count,
            ..Default::default()
        };
        let key = |service_id, backend_id| BackendStatsKey {
            service_id,
            backend_id,
        };
        let mut measured = BackendStats {
            connections: 5,
            connect_failures: 1,
            bytes_sent: 100,
            bytes_received: 200,
            rtt_samples: 3,
            rtt_sum_us: 48,
            ..Default::default()
        };
        measured.rtt_buckets[0] = 1;
        measured.rtt_buckets[2] = 1;
        measured.rtt_buckets[RTT_BUCKETS - 1] = 1;
        let connections = |connections| BackendStats {
            connections,
            ..Default::default()
        };
        Counters {
            services: vec![(tcp, service(1, 2)), (udp, service(2, 0))],
            backends: [
                (10, SocketAddr::from(([127, 0, 0, 1], 8001))),
                (11, SocketAddr::from(([127, 0, 0, 1], 8002))),
                (12, SocketAddr::from(([127, 0, 0, 1], 9053))),
            ]
            .into_iter()
            .collect(),
            names: [(1, "web\"x".to_owned()), (2, "dns".to_owned())]
                .into_iter()
                .collect(),
            backend_stats: vec![
                (key(1, 10), measured),
                (key(1, 11), connections(3)),
                (key(2, 12), connections(7)),
                (key(2, 99), connections(1)),
            ],
            active: [key(1, 10)].into_iter().collect(),
            no_backend: [(2, 4)].into_iter().collect(),
            slots: 2,
        }
    }

    const EXPECTED: &str = r#"# HELP mesh_backend_connections_total Connections (and unconnected UDP datagrams) the kernel sent to the backend
# TYPE mesh_backend_connections_total counter
mesh_backend_connections_total{service="web\"x",backend="127.0.0.1:8001",protocol="tcp"} 5
mesh_backend_connections_total{service="web\"x",backend="127.0.0.1:8002",protocol="tcp"} 3
mesh_backend_connections_total{service="dns",backend="127.0.0.1:9053",protocol="udp"} 7
# HELP mesh_backend_connect_failures_total TCP connects to the backend that failed before establishing (passive detection)
# TYPE mesh_backend_connect_failures_total counter
mesh_backend_connect_failures_total{service="web\"x",backend="127.0.0.1:8001",protocol="tcp"} 1
mesh_backend_connect_failures_total{service="web\"x",backend="127.0.0.1:8002",protocol="tcp"} 0
mesh_backend_connect_failures_total{service="dns",backend="127.0.0.1:9053",protocol="udp"} 0
# HELP mesh_backend_sent_bytes_total Payload bytes clients sent to the backend on closed TCP connections (telemetry)
# TYPE mesh_backend_sent_bytes_total counter
mesh_backend_sent_bytes_total{service="web\"x",backend="127.0.0.1:8001",protocol="tcp"} 100
mesh_backend_sent_bytes_total{service="web\"x",backend="127.0.0.1:8002",protocol="tcp"} 0
mesh_backend_sent_bytes_total{service="dns",backend="127.0.0.1:9053",protocol="udp"} 0
# HELP mesh_backend_received_bytes_total Payload bytes clients received from the backend on closed TCP connections (telemetry)
# TYPE mesh_backend_received_bytes_total counter
mesh_backend_received_bytes_total{service="web\"x",backend="127.0.0.1:8001",protocol="tcp"} 200
mesh_backend_received_bytes_total{service="web\"x",backend="127.0.0.1:8002",protocol="tcp"} 0
mesh_backend_received_bytes_total{service="dns",backend="127.0.0.1:9053",protocol="udp"} 0
# HELP mesh_backend_active 1 when the backend takes new connections (in the live slot set), else 0
# TYPE mesh_backend_active gauge
mesh_backend_active{service="web\"x",backend="127.0.0.1:8001",protocol="tcp"} 1
mesh_backend_active{service="web\"x",backend="127.0.0.1:8002",protocol="tcp"} 0
mesh_backend_active{service="dns",backend="127.0.0.1:9053",protocol="udp"} 0
# HELP mesh_backend_rtt_seconds Smoothed TCP round-trip time of closed connections to the backend, at close (telemetry)
# TYPE mesh_backend_rtt_seconds histogram
mesh_backend_rtt_seconds_bucket{service="web\"x",backend="127.0.0.1:8001",protocol="tcp",le="0.000016"} 1
mesh_backend_rtt_seconds_bucket{service="web\"x",backend="127.0.0.1:8001",protocol="tcp",le="0.000032"} 1
mesh_backend_rtt_seconds_bucket{service="web\"x",backend="127.0.0.1:8001",protocol="tcp",le="0.000064"} 2
mesh_backend_rtt_seconds_bucket{service="web\"x",backend="127.0.0.1:8001",protocol="tcp",le="0.000128"} 2
mesh_backend_rtt_seconds_bucket{service="web\"x",backend="127.0.0.1:8001",protocol="tcp",le="0.000256"} 2
mesh_backend_rtt_seconds_bucket{service="web\"x",backend="127.0.0.1:8001",protocol="tcp",le="0.000512"} 2
mesh_backend_rtt_seconds_bucket{service="web\"x",backend="127.0.0.1:8001",protocol="tcp",le="0.001024"} 2
mesh_backend_rtt_seconds_bucket{service="web\"x",backend="127.0.0.1:8001",protocol="tcp",le="0.002048"} 2
mesh_backend_rtt_seconds_bucket{service="web\"x",backend="127.0.0.1:8001",protocol="tcp",le="0.004096"} 2
mesh_backend_rtt_seconds_bucket{service="web\"x",backend="127.0.0.1:8001",protocol="tcp",le="0.008192"} 2
mesh_backend_rtt_seconds_bucket{service="web\"x",backend="127.0.0.1:8001",protocol="tcp",le="0.016384"} 2
mesh_backend_rtt_seconds_bucket{service="web\"x",backend="127.0.0.1:8001",protocol="tcp",le="0.032768"} 2
mesh_backend_rtt_seconds_bucket{service="web\"x",backend="127.0.0.1:8001",protocol="tcp",le="0.065536"} 2
mesh_backend_rtt_seconds_bucket{service="web\"x",backend="127.0.0.1:8001",protocol="tcp",le="0.131072"} 2
mesh_backend_rtt_seconds_bucket{service="web\"x",backend="127.0.0.1:8001",protocol="tcp",le="0.262144"} 2
mesh_backend_rtt_seconds_bucket{service="web\"x",backend="127.0.0.1:8001",protocol="tcp",le="+Inf"} 3
mesh_backend_rtt_seconds_sum{service="web\"x",backend="127.0.0.1:8001",protocol="tcp"} 0.000048
mesh_backend_rtt_seconds_count{service="web\"x",backend="127.0.0.1:8001",protocol="tcp"} 3
# HELP mesh_service_no_backend_total Connects to the VIP that found no backend
# TYPE mesh_service_no_backend_total counter
mesh_service_no_backend_total{service="web\"x",vip="127.100.0.1:80",protocol="tcp"} 0
mesh_service_no_backend_total{service="dns",vip="127.100.0.2:53",protocol="udp"} 4
# HELP mesh_service_slots Round-robin slots of the service's live slot set (0: no backend)
# TYPE mesh_service_slots gauge
mesh_service_slots{service="web\"x",vip="127.100.0.1:80",protocol="tcp"} 2
mesh_service_slots{service="dns",vip="127.100.0.2:53",protocol="udp"} 0
# HELP mesh_service_backends Backends of the service by state: configured, or active (taking connections)
# TYPE mesh_service_backends gauge
mesh_service_backends{service="web\"x",vip="127.100.0.1:80",protocol="tcp",state="configured"} 2
mesh_service_backends{service="web\"x",vip="127.100.0.1:80",protocol="tcp",state="active"} 1
mesh_service_backends{service="dns",vip="127.100.0.2:53",protocol="udp",state="configured"} 1
mesh_service_backends{service="dns",vip="127.100.0.2:53",protocol="udp",state="active"} 0
"#;

    #[test]
    fn services_and_backends_render_in_the_exposition_format() {
        let mut text = Vec::new();
        let mut emit = |chunk: Vec<u8>| {
            text.extend_from_slice(&chunk);
            true
        };
        let mut out = Sink::new(&mut emit);
        render_services(&mut out, &counters());
        out.flush();
        assert_eq!(String::from_utf8(text).unwrap(), EXPECTED);
    }

    #[test]
    fn the_text_goes_out_in_bounded_chunks_until_the_receiver_stops() {
        let line = "x".repeat(1000);
        let mut chunks = Vec::new();
        let mut emit = |chunk: Vec<u8>| {
            chunks.push(chunk.len());
            chunks.len() < 3
        };
        let mut out = Sink::new(&mut emit);
        for i in 0..(CHUNK / 100) {
            out.str(&line);
            out.u64(i as u64);
            out.str("\n");
        }
        out.flush();
        assert!(out.closed);
        // The third chunk was refused: nothing more was handed on.
        assert_eq!(chunks.len(), 3, "{chunks:?}");
        assert!(
            chunks.iter().all(|&n| (CHUNK..CHUNK + 1100).contains(&n)),
            "{chunks:?}"
        );
    }

    #[test]
    fn numbers_are_written_in_decimal() {
        let mut text = Vec::new();
        let mut emit = |chunk: Vec<u8>| {
            text.extend_from_slice(&chunk);
            true
        };
        let mut out = Sink::new(&mut emit);
        for n in [0, 7, 10, 12_345, u64::MAX] {
            out.u64(n);
            out.str(" ");
        }
        out.flush();
        assert_eq!(
            String::from_utf8(text).unwrap(),
            "0 7 10 12345 18446744073709551615 "
        );
    }

    #[test]
    fn without_pinned_maps_the_agents_own_families_still_render() {
        let metrics = AgentMetrics::new(Path::new("/nonexistent")).unwrap();
        metrics.set_ready(true);
        let text = metrics.render().unwrap();
        assert!(text.contains("\nmesh_agent_ready 1\n"), "{text}");
        assert!(!text.contains("mesh_backend_connections_total"), "{text}");
    }

    /// The agent's own families only (no pinned maps behind `bpffs`).
    fn health_lines(metrics: &AgentMetrics) -> Vec<String> {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&metrics.registry.gather(), &mut out)
            .unwrap();
        let mut lines: Vec<String> = String::from_utf8(out)
            .unwrap()
            .lines()
            .filter(|l| {
                l.starts_with("mesh_backend_health{")
                    || l.starts_with("mesh_backend_check_consecutive_failures{")
            })
            .map(str::to_owned)
            .collect();
        lines.sort();
        lines
    }

    #[test]
    fn health_gauges_follow_the_targets_across_refreshes() {
        let metrics = AgentMetrics::new(Path::new("/nonexistent")).unwrap();
        let vip = |port| Vip {
            addr: SocketAddr::from(([127, 100, 0, 1], port)),
            proto: mesh_common::PROTO_TCP,
            external: false,
        };
        let b1 = SocketAddr::from(([127, 0, 0, 1], 8001));
        let b2 = SocketAddr::from(([127, 0, 0, 1], 8002));
        let mut names = BTreeMap::from([(vip(80), "web".to_owned())]);
        metrics.set_health(
            vec![
                (vip(80), b1, Health::Healthy, 0),
                (vip(80), b2, Health::Unhealthy, 4),
            ],
            &names,
        );
        let first = health_lines(&metrics);
        assert_eq!(first.len(), 4, "{first:#?}");
        assert!(
            first
                .iter()
                .any(|l| l.contains("backend=\"127.0.0.1:8002\"")
                    && l.starts_with("mesh_backend_health")
                    && l.ends_with(" 0")),
            "{first:#?}"
        );

        // b2 left, b1 changed, the service was renamed: no series of b2 or of the old name.
        names.insert(vip(80), "www".to_owned());
        metrics.set_health(vec![(vip(80), b1, Health::Unknown, 2)], &names);
        let second = health_lines(&metrics);
        assert_eq!(second.len(), 2, "{second:#?}");
        assert!(
            second
                .iter()
                .all(|l| l.contains("service=\"www\"") && l.contains("127.0.0.1:8001")),
            "{second:#?}"
        );
        assert!(
            second
                .iter()
                .any(|l| l.starts_with("mesh_backend_health") && l.ends_with(" -1")),
            "{second:#?}"
        );
        assert!(
            second
                .iter()
                .any(|l| !l.starts_with("mesh_backend_health") && l.ends_with(" 2")),
            "{second:#?}"
        );

        metrics.set_health(vec![], &names);
        assert_eq!(health_lines(&metrics), Vec::<String>::new());
    }
}
