//! Operator views of the pinned maps: `mesh services`, `mesh backends` and `mesh stats`. They
//! read the pinned maps directly and need no running agent.

use std::{
    collections::BTreeMap,
    io::Write,
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::bail;
use mesh_common::{BackendStats, BackendStatsKey, DatapathStats, Service, SlotKey};
use serde::Serialize;

use crate::{
    datapath::{Maps, Snapshot},
    model::{Vip, protocol_name},
};

#[derive(clap::ValueEnum, Clone, Copy, Debug, Default)]
pub enum Output {
    #[default]
    Table,
    Json,
}

/// Parses `--interval` (humantime: `1s`, `500ms`, `2m`); it must be positive.
pub fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = humantime_serde::re::humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d.is_zero() {
        return Err("the interval must be greater than zero".into());
    }
    Ok(d)
}

// ---------------------------------------------------------------------------------------------
// Reading one service's members out of a snapshot.

/// One backend of one service, as the snapshot has it.
struct Member<'a> {
    id: u32,
    /// `None` when the backend id has no address (only mid-update; shown as `?`).
    addr: Option<SocketAddr>,
    /// Slots of the service's live slot set that point at it.
    slots: u32,
    stats: &'a BackendStats,
}

impl Member<'_> {
    fn addr(&self) -> String {
        self.addr.map_or_else(|| "?".to_string(), |a| a.to_string())
    }
}

/// Backend id -> slots it holds in the service's live slot set (the set the kernel uses).
fn live_slots(snap: &Snapshot, svc: &Service) -> BTreeMap<u32, u32> {
    let mut held = BTreeMap::new();
    if svc.slot_count == 0 {
        return held;
    }
    let first = SlotKey {
        service_id: svc.id,
        generation: svc.generation,
        slot: 0,
    };
    let last = SlotKey {
        slot: svc.slot_count - 1,
        ..first
    };
    for &backend in snap.slots.range(first..=last).map(|(_, b)| b) {
        *held.entry(backend).or_insert(0) += 1;
    }
    held
}

/// Every backend with a counter for the service (configured ones, active or not), by id.
fn members<'a>(snap: &'a Snapshot, svc: &Service) -> Vec<Member<'a>> {
    let held = live_slots(snap, svc);
    snap.members_of(svc.id)
        .map(|(k, stats)| Member {
            id: k.backend_id,
            addr: snap.backends.get(&k.backend_id).copied(),
            slots: held.get(&k.backend_id).copied().unwrap_or(0),
            stats,
        })
        .collect()
}

fn service_name(snap: &Snapshot, svc: &Service) -> String {
    snap.names.get(&svc.id).cloned().unwrap_or_default()
}

/// Services ordered by name, then VIP.
fn services_by_name(snap: &Snapshot) -> Vec<(&Vip, &Service, String)> {
    let mut services: Vec<_> = snap
        .services
        .iter()
        .map(|(vip, svc)| (vip, svc, service_name(snap, svc)))
        .collect();
    services.sort_by(|a, b| (&a.2, a.0).cmp(&(&b.2, b.0)));
    services
}

/// `active` when the backend holds slots of the live set (it gets new connections), else
/// `inactive` (drained, unhealthy, or otherwise out of rotation).
fn state_of(slots: u32) -> &'static str {
    if slots > 0 { "active" } else { "inactive" }
}

/// Mean smoothed RTT of the measured connections, in microseconds.
fn mean_rtt_us(samples: u64, sum_us: u64) -> Option<f64> {
    (samples > 0).then(|| sum_us as f64 / samples as f64)
}

// ---------------------------------------------------------------------------------------------
// `mesh services`

#[derive(Serialize, Debug)]
pub struct ServicesView {
    pub services: Vec<ServiceView>,
}

#[derive(Serialize, Debug)]
pub struct ServiceView {
    pub name: String,
    pub id: u32,
    pub vip: String,
    pub protocol: &'static str,
    pub generation: u32,
    pub slot_count: u32,
    pub no_backend: u64,
    pub backends: Vec<BackendView>,
}

#[derive(Serialize, Debug)]
pub struct BackendView {
    pub id: u32,
    pub addr: String,
    /// Slots in the live round-robin set; 0 means it gets no new connections.
    pub slots: u32,
    pub connections: u64,
}

pub fn services_view(snap: &Snapshot) -> ServicesView {
    let services = snap
        .services
        .iter()
        .map(|(vip, svc)| ServiceView {
            name: service_name(snap, svc),
            id: svc.id,
            vip: vip.addr.to_string(),
            protocol: protocol_name(vip.proto),
            generation: svc.generation,
            slot_count: svc.slot_count,
            no_backend: snap.service_stats.get(&svc.id).map_or(0, |s| s.no_backend),
            backends: members(snap, svc)
                .iter()
                .map(|m| BackendView {
                    id: m.id,
                    addr: m.addr(),
                    slots: m.slots,
                    connections: m.stats.connections,
                })
                .collect(),
        })
        .collect();
    ServicesView { services }
}

pub fn services(bpffs: &Path, output: Output) -> anyhow::Result<()> {
    let view = services_view(&Maps::open_pinned(bpffs)?.snapshot()?);
    let mut out = std::io::stdout().lock();
    match output {
        Output::Json => write_json(&mut out, &view)?,
        Output::Table => write_services_table(&mut out, &view)?,
    }
    Ok(())
}

fn write_services_table(out: &mut impl Write, view: &ServicesView) -> std::io::Result<()> {
    let mut rows = vec![[
        "SERVICE".to_string(),
        "VIP".to_string(),
        "PROTO".to_string(),
        "BACKEND".to_string(),
        "SLOTS".to_string(),
        "CONNECTIONS".to_string(),
    ]];
    for svc in &view.services {
        if svc.backends.is_empty() {
            rows.push([
                svc.name.clone(),
                svc.vip.clone(),
                svc.protocol.to_string(),
                "-".into(),
                "0".into(),
                format!("{} refused (no backend)", svc.no_backend),
            ]);
        }
        for (i, b) in svc.backends.iter().enumerate() {
            let (name, vip, proto) = if i == 0 {
                (svc.name.clone(), svc.vip.clone(), svc.protocol.to_string())
            } else {
                (String::new(), String::new(), String::new())
            };
            rows.push([
                name,
                vip,
                proto,
                b.addr.clone(),
                b.slots.to_string(),
                b.connections.to_string(),
            ]);
        }
    }
    write_table(out, &rows)
}

// ---------------------------------------------------------------------------------------------
// `mesh backends`

#[derive(Serialize, Debug)]
pub struct BackendsView {
    pub backends: Vec<BackendRow>,
}

/// One (service, backend) pair. Counters are totals since the pair was configured.
#[derive(Serialize, Debug, PartialEq)]
pub struct BackendRow {
    pub service: String,
    pub vip: String,
    pub protocol: &'static str,
    pub id: u32,
    pub addr: String,
    /// `active` (holds slots: gets new connections) or `inactive`.
    pub state: &'static str,
    pub slots: u32,
    pub connections: u64,
    pub connect_failures: u64,
    /// Telemetry of closed TCP connections (0 while telemetry is off or nothing closed yet).
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Closed TCP connections whose RTT was measured.
    pub rtt_samples: u64,
    /// Mean smoothed RTT of those connections; `null` without samples.
    pub mean_rtt_us: Option<f64>,
}

/// Every (service, backend) pair, or only those of the services named `service`.
pub fn backends_view(snap: &Snapshot, service: Option<&str>) -> anyhow::Result<BackendsView> {
    let services = services_by_name(snap);
    if let Some(wanted) = service
        && !services.iter().any(|(_, _, name)| name == wanted)
    {
        let mut known: Vec<&str> = services.iter().map(|(_, _, n)| n.as_str()).collect();
        known.dedup();
        bail!(
            "no service named {wanted:?} in the pinned maps (services: {})",
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        );
    }
    let backends = services
        .iter()
        .filter(|(_, _, name)| service.is_none_or(|wanted| name == wanted))
        .flat_map(|(vip, svc, name)| {
            members(snap, svc).into_iter().map(|m| BackendRow {
                service: name.clone(),
                vip: vip.addr.to_string(),
                protocol: protocol_name(vip.proto),
                id: m.id,
                addr: m.addr(),
                state: state_of(m.slots),
                slots: m.slots,
                connections: m.stats.connections,
                connect_failures: m.stats.connect_failures,
                bytes_sent: m.stats.bytes_sent,
                bytes_received: m.stats.bytes_received,
                rtt_samples: m.stats.rtt_samples,
                mean_rtt_us: mean_rtt_us(m.stats.rtt_samples, m.stats.rtt_sum_us),
            })
        })
        .collect();
    Ok(BackendsView { backends })
}

pub fn backends(bpffs: &Path, service: Option<&str>, output: Output) -> anyhow::Result<()> {
    let view = backends_view(&Maps::open_pinned(bpffs)?.snapshot()?, service)?;
    let mut out = std::io::stdout().lock();
    match output {
        Output::Json => write_json(&mut out, &view)?,
        Output::Table => write_backends_table(&mut out, &view)?,
    }
    Ok(())
}

fn write_backends_table(out: &mut impl Write, view: &BackendsView) -> std::io::Result<()> {
    let mut rows = vec![
        [
            "SERVICE", "VIP", "PROTO", "BACKEND", "STATE", "SLOTS", "CONNS", "FAILS", "SENT",
            "RECEIVED", "MEAN_RTT",
        ]
        .map(String::from),
    ];
    for b in &view.backends {
        // Bytes are measured with the RTT, at close; without samples nothing was measured
        // (telemetry off, a UDP service, or no connection closed yet).
        let bytes = |n: u64| {
            if b.rtt_samples > 0 {
                human_bytes(n)
            } else {
                dash()
            }
        };
        rows.push([
            display_name(&b.service),
            b.vip.clone(),
            b.protocol.to_string(),
            b.addr.clone(),
            b.state.to_string(),
            b.slots.to_string(),
            b.connections.to_string(),
            b.connect_failures.to_string(),
            bytes(b.bytes_sent),
            bytes(b.bytes_received),
            b.mean_rtt_us.map(human_rtt).unwrap_or_else(dash),
        ]);
    }
    write_table(out, &rows)
}

// ---------------------------------------------------------------------------------------------
// `mesh stats`: counters and their rates between two samples.

/// What one read of the maps gives.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    pub snap: Snapshot,
    pub datapath: DatapathStats,
}

impl Sample {
    pub fn read(maps: &Maps) -> anyhow::Result<Self> {
        Ok(Self {
            snap: maps.snapshot()?,
            datapath: maps.datapath_stats()?,
        })
    }
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct StatsView {
    /// Measured time between the two samples the rates are computed over.
    pub interval_secs: f64,
    pub datapath: DatapathView,
    pub services: Vec<ServiceRates>,
}

/// Node-wide data path counters (totals) and their rates.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct DatapathView {
    pub rev_created: u64,
    pub rev_created_per_sec: f64,
    pub rev_released: u64,
    pub rev_released_per_sec: f64,
    pub udp_flows_added: u64,
    pub udp_flows_added_per_sec: f64,
    pub udp_flows_full: u64,
    pub udp_flows_full_per_sec: f64,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct ServiceRates {
    pub name: String,
    pub id: u32,
    pub vip: String,
    pub protocol: &'static str,
    pub slot_count: u32,
    /// Connects to the VIP that found no backend.
    pub no_backend: u64,
    pub no_backend_per_sec: f64,
    pub backends: Vec<BackendRates>,
}

/// One backend of a service: totals (from the second sample) and rates over the interval.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct BackendRates {
    pub id: u32,
    pub addr: String,
    pub state: &'static str,
    pub slots: u32,
    pub connections: u64,
    pub connections_per_sec: f64,
    pub connect_failures: u64,
    pub connect_failures_per_sec: f64,
    pub bytes_sent: u64,
    pub bytes_sent_per_sec: f64,
    pub bytes_received: u64,
    pub bytes_received_per_sec: f64,
    pub rtt_samples: u64,
    /// Mean RTT of every measured connection; `null` without samples.
    pub mean_rtt_us: Option<f64>,
    /// Mean RTT of the connections that closed during the interval; `null` if none did.
    pub interval_mean_rtt_us: Option<f64>,
}

/// How much a counter grew between two reads. A counter smaller than before was reset (its
/// service or backend was removed and configured again) and counted from zero since.
fn delta(before: u64, after: u64) -> u64 {
    if after >= before {
        after - before
    } else {
        after
    }
}

fn per_sec(delta: u64, secs: f64) -> f64 {
    if secs > 0.0 { delta as f64 / secs } else { 0.0 }
}

/// Totals of `after` and rates from `before` to `after`, `elapsed` apart. Pure: no I/O.
///
/// Services and backends are those of `after`. A service (or backend) that `before` does not
/// have at the same VIP (or address) appeared during the interval: its counters started at
/// zero, so all of them count.
pub fn stats_view(before: &Sample, after: &Sample, elapsed: Duration) -> StatsView {
    let secs = elapsed.as_secs_f64();
    let rate = |b: u64, a: u64| per_sec(delta(b, a), secs);
    let (b, a) = (&before.datapath, &after.datapath);
    let datapath = DatapathView {
        rev_created: a.rev_created,
        rev_created_per_sec: rate(b.rev_created, a.rev_created),
        rev_released: a.rev_released,
        rev_released_per_sec: rate(b.rev_released, a.rev_released),
        udp_flows_added: a.udp_flows_added,
        udp_flows_added_per_sec: rate(b.udp_flows_added, a.udp_flows_added),
        udp_flows_full: a.udp_flows_full,
        udp_flows_full_per_sec: rate(b.udp_flows_full, a.udp_flows_full),
    };
    let zero = BackendStats::default();
    let services = services_by_name(&after.snap)
        .into_iter()
        .map(|(vip, svc, name)| {
            let same_service = before
                .snap
                .services
                .get(vip)
                .is_some_and(|s| s.id == svc.id);
            let no_backend = after
                .snap
                .service_stats
                .get(&svc.id)
                .map_or(0, |s| s.no_backend);
            let no_backend_before = before
                .snap
                .service_stats
                .get(&svc.id)
                .filter(|_| same_service)
                .map_or(0, |s| s.no_backend);
            let backends = members(&after.snap, svc)
                .into_iter()
                .map(|m| {
                    let key = BackendStatsKey {
                        service_id: svc.id,
                        backend_id: m.id,
                    };
                    let old = before
                        .snap
                        .backend_stats
                        .get(&key)
                        .filter(|_| {
                            same_service && before.snap.backends.get(&m.id).copied() == m.addr
                        })
                        .unwrap_or(&zero);
                    let s = m.stats;
                    BackendRates {
                        id: m.id,
                        addr: m.addr(),
                        state: state_of(m.slots),
                        slots: m.slots,
                        connections: s.connections,
                        connections_per_sec: rate(old.connections, s.connections),
                        connect_failures: s.connect_failures,
                        connect_failures_per_sec: rate(old.connect_failures, s.connect_failures),
                        bytes_sent: s.bytes_sent,
                        bytes_sent_per_sec: rate(old.bytes_sent, s.bytes_sent),
                        bytes_received: s.bytes_received,
                        bytes_received_per_sec: rate(old.bytes_received, s.bytes_received),
                        rtt_samples: s.rtt_samples,
                        mean_rtt_us: mean_rtt_us(s.rtt_samples, s.rtt_sum_us),
                        interval_mean_rtt_us: if s.rtt_samples >= old.rtt_samples {
                            mean_rtt_us(
                                s.rtt_samples - old.rtt_samples,
                                delta(old.rtt_sum_us, s.rtt_sum_us),
                            )
                        } else {
                            mean_rtt_us(s.rtt_samples, s.rtt_sum_us)
                        },
                    }
                })
                .collect();
            ServiceRates {
                name,
                id: svc.id,
                vip: vip.addr.to_string(),
                protocol: protocol_name(vip.proto),
                slot_count: svc.slot_count,
                no_backend,
                no_backend_per_sec: rate(no_backend_before, no_backend),
                backends,
            }
        })
        .collect();
    StatsView {
        interval_secs: secs,
        datapath,
        services,
    }
}

pub fn stats(bpffs: &Path, output: Output, interval: Duration) -> anyhow::Result<()> {
    let maps = Maps::open_pinned(bpffs)?;
    let start = Instant::now();
    let before = Sample::read(&maps)?;
    std::thread::sleep(interval.saturating_sub(start.elapsed()));
    let elapsed = start.elapsed();
    let after = Sample::read(&maps)?;
    let view = stats_view(&before, &after, elapsed);
    let mut out = std::io::stdout().lock();
    match output {
        Output::Json => write_json(&mut out, &view)?,
        Output::Table => write_stats_table(&mut out, &view)?,
    }
    Ok(())
}

fn write_stats_table(out: &mut impl Write, view: &StatsView) -> std::io::Result<()> {
    writeln!(
        out,
        "Rates over {:.2}s; counters are totals.",
        view.interval_secs
    )?;
    writeln!(out)?;
    let mut rows = vec![
        [
            "SERVICE", "VIP", "PROTO", "BACKEND", "STATE", "SLOTS", "CONNS", "CONN/S", "FAILS",
            "FAIL/S", "SENT/S", "RECV/S",
        ]
        .map(String::from),
    ];
    for svc in &view.services {
        for b in &svc.backends {
            rows.push([
                display_name(&svc.name),
                svc.vip.clone(),
                svc.protocol.to_string(),
                b.addr.clone(),
                b.state.to_string(),
                b.slots.to_string(),
                b.connections.to_string(),
                fmt_rate(b.connections_per_sec),
                b.connect_failures.to_string(),
                fmt_rate(b.connect_failures_per_sec),
                human_byte_rate(b.bytes_sent_per_sec),
                human_byte_rate(b.bytes_received_per_sec),
            ]);
        }
    }
    write_table(out, &rows)?;
    writeln!(out)?;
    let mut rows =
        vec![["SERVICE", "VIP", "PROTO", "NO_BACKEND", "NO_BACKEND/S"].map(String::from)];
    for svc in &view.services {
        rows.push([
            display_name(&svc.name),
            svc.vip.clone(),
            svc.protocol.to_string(),
            svc.no_backend.to_string(),
            fmt_rate(svc.no_backend_per_sec),
        ]);
    }
    write_table(out, &rows)?;
    writeln!(out)?;
    let d = &view.datapath;
    let mut rows = vec![["DATAPATH", "TOTAL", "PER_SEC"].map(String::from)];
    for (name, total, rate) in [
        ("rev_created", d.rev_created, d.rev_created_per_sec),
        ("rev_released", d.rev_released, d.rev_released_per_sec),
        (
            "udp_flows_added",
            d.udp_flows_added,
            d.udp_flows_added_per_sec,
        ),
        ("udp_flows_full", d.udp_flows_full, d.udp_flows_full_per_sec),
    ] {
        rows.push([name.to_string(), total.to_string(), fmt_rate(rate)]);
    }
    write_table(out, &rows)
}

// ---------------------------------------------------------------------------------------------
// Formatting.

fn write_json(out: &mut impl Write, view: &impl Serialize) -> anyhow::Result<()> {
    serde_json::to_writer_pretty(&mut *out, view)?;
    writeln!(out)?;
    Ok(())
}

fn dash() -> String {
    "-".to_string()
}

/// A service name for a table cell (`-` when the maps hold none).
pub fn display_name(name: &str) -> String {
    if name.is_empty() {
        dash()
    } else {
        name.to_string()
    }
}

/// A rate with one decimal (never `-0.0`: an empty float sum is negative zero).
pub fn fmt_rate(rate: f64) -> String {
    let rate = if rate == 0.0 { 0.0 } else { rate };
    format!("{rate:.1}")
}

const BYTE_UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];

/// `512 B`, `1.5 KiB`, `3.2 MiB`, ... (binary units).
pub fn human_bytes(bytes: u64) -> String {
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < BYTE_UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", BYTE_UNITS[unit])
}

/// `human_bytes` of a rate: `0 B/s`, `1.5 KiB/s`.
pub fn human_byte_rate(bytes_per_sec: f64) -> String {
    format!("{}/s", human_bytes(bytes_per_sec.round() as u64))
}

/// `850us`, `1.25ms`, `2.10s`.
pub fn human_rtt(us: f64) -> String {
    if us < 1_000.0 {
        format!("{us:.0}us")
    } else if us < 1_000_000.0 {
        format!("{:.2}ms", us / 1_000.0)
    } else {
        format!("{:.2}s", us / 1_000_000.0)
    }
}

/// Left-aligned columns separated by two spaces.
pub fn write_table<const N: usize>(
    out: &mut impl Write,
    rows: &[[String; N]],
) -> std::io::Result<()> {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        writeln!(out, "{}", line.join("  ").trim_end())?;
    }
    Ok(())
}

#[cfg(test)]
pub mod tests {
    use mesh_common::{PROTO_TCP, PROTO_UDP, ServiceStats};
    use serde_json::json;

    use super::*;

    const WEB: u32 = 1;
    const DNS: u32 = 2;

    fn vip(addr: &str, proto: u8) -> Vip {
        Vip {
            addr: addr.parse().unwrap(),
            proto,
            external: false,
        }
    }

    fn key(service_id: u32, backend_id: u32) -> BackendStatsKey {
        BackendStatsKey {
            service_id,
            backend_id,
        }
    }

    fn conns(connections: u64, connect_failures: u64) -> BackendStats {
        BackendStats {
            connections,
            connect_failures,
            ..Default::default()
        }
    }

    /// `web` (tcp, 3 slots: backend 10 twice, 11 once; 12 configured but out of rotation, and
    /// a stale slot of an old generation pointing at it) and `dns` (udp, no backend).
    pub fn fixture_before() -> Sample {
        let mut snap = Snapshot::default();
        snap.services.insert(
            vip("127.100.9.1:80", PROTO_TCP),
            Service {
                id: WEB,
                generation: 2,
                slot_count: 3,
                ..Default::default()
            },
        );
        snap.services.insert(
            vip("127.100.9.2:53", PROTO_UDP),
            Service {
                id: DNS,
                generation: 1,
                slot_count: 0,
                ..Default::default()
            },
        );
        for (generation, slot, backend) in [(2, 0, 10), (2, 1, 11), (2, 2, 10), (1, 0, 12)] {
            let key = SlotKey {
                service_id: WEB,
                generation,
                slot,
            };
            snap.slots.insert(key, backend);
        }
        for (id, addr) in [
            (10, "127.0.0.1:8081"),
            (11, "127.0.0.1:8082"),
            (12, "127.0.0.1:8083"),
        ] {
            snap.backends.insert(id, addr.parse().unwrap());
        }
        snap.names.insert(WEB, "web".into());
        snap.names.insert(DNS, "dns".into());
        snap.backend_stats.insert(
            key(WEB, 10),
            BackendStats {
                bytes_sent: 1_000,
                bytes_received: 5_000,
                rtt_samples: 4,
                rtt_sum_us: 2_000,
                ..conns(80, 1)
            },
        );
        snap.backend_stats.insert(key(WEB, 11), conns(18, 0));
        snap.backend_stats.insert(key(WEB, 12), conns(6, 1));
        snap.service_stats
            .insert(WEB, ServiceStats { no_backend: 0 });
        snap.service_stats
            .insert(DNS, ServiceStats { no_backend: 5 });
        snap.active.insert(key(WEB, 10), 2);
        snap.active.insert(key(WEB, 11), 1);
        Sample {
            snap,
            datapath: DatapathStats {
                rev_created: 10,
                rev_released: 8,
                ..Default::default()
            },
        }
    }

    /// `fixture_before` two seconds later.
    pub fn fixture_after() -> Sample {
        let mut sample = fixture_before();
        let snap = &mut sample.snap;
        snap.backend_stats.insert(
            key(WEB, 10),
            BackendStats {
                bytes_sent: 3_048,
                bytes_received: 13_192,
                rtt_samples: 6,
                rtt_sum_us: 5_000,
                ..conns(90, 2)
            },
        );
        snap.backend_stats.insert(key(WEB, 11), conns(20, 0));
        snap.service_stats
            .insert(DNS, ServiceStats { no_backend: 10 });
        sample.datapath.rev_created = 20;
        sample.datapath.rev_released = 16;
        sample
    }

    fn two_secs(before: &Sample, after: &Sample) -> StatsView {
        stats_view(before, after, Duration::from_secs(2))
    }

    fn render(write: impl FnOnce(&mut Vec<u8>) -> std::io::Result<()>) -> String {
        let mut out = Vec::new();
        write(&mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn live_slots_count_only_the_live_generation() {
        let snap = fixture_before().snap;
        let web = snap.services[&vip("127.100.9.1:80", PROTO_TCP)];
        assert_eq!(live_slots(&snap, &web), BTreeMap::from([(10, 2), (11, 1)]));
        let dns = snap.services[&vip("127.100.9.2:53", PROTO_UDP)];
        assert!(live_slots(&snap, &dns).is_empty());
    }

    #[test]
    fn services_json_keeps_its_contract() {
        let view = services_view(&fixture_before().snap);
        let value = serde_json::to_value(&view).unwrap();
        assert_eq!(
            value["services"][0],
            json!({
                "name": "web", "id": 1, "vip": "127.100.9.1:80", "protocol": "tcp",
                "generation": 2, "slot_count": 3, "no_backend": 0,
                "backends": [
                    {"id": 10, "addr": "127.0.0.1:8081", "slots": 2, "connections": 80},
                    {"id": 11, "addr": "127.0.0.1:8082", "slots": 1, "connections": 18},
                    {"id": 12, "addr": "127.0.0.1:8083", "slots": 0, "connections": 6},
                ],
            })
        );
        assert_eq!(value["services"][1]["backends"], json!([]));
    }

    #[test]
    fn backends_view_has_one_row_per_service_backend_pair() {
        let view = backends_view(&fixture_before().snap, None).unwrap();
        let rows: Vec<_> = view
            .backends
            .iter()
            .map(|b| (b.service.as_str(), b.addr.as_str(), b.state, b.slots))
            .collect();
        assert_eq!(
            rows,
            [
                ("web", "127.0.0.1:8081", "active", 2),
                ("web", "127.0.0.1:8082", "active", 1),
                ("web", "127.0.0.1:8083", "inactive", 0),
            ]
        );
        assert_eq!(view.backends[0].mean_rtt_us, Some(500.0));
        assert_eq!(view.backends[1].mean_rtt_us, None);
    }

    #[test]
    fn backends_view_filters_by_service_name() {
        let snap = fixture_before().snap;
        assert_eq!(backends_view(&snap, Some("web")).unwrap().backends.len(), 3);
        assert!(
            backends_view(&snap, Some("dns"))
                .unwrap()
                .backends
                .is_empty()
        );
    }

    #[test]
    fn backends_view_rejects_an_unknown_service() {
        let err = backends_view(&fixture_before().snap, Some("api")).unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"no service named "api" in the pinned maps (services: dns, web)"#
        );
        let err = backends_view(&Snapshot::default(), Some("api")).unwrap_err();
        assert!(err.to_string().ends_with("(services: none)"), "{err}");
    }

    #[test]
    fn backends_json_has_raw_numbers() {
        let view = backends_view(&fixture_after().snap, Some("web")).unwrap();
        let value = serde_json::to_value(&view).unwrap();
        assert_eq!(
            value["backends"][0],
            json!({
                "service": "web", "vip": "127.100.9.1:80", "protocol": "tcp", "id": 10,
                "addr": "127.0.0.1:8081", "state": "active", "slots": 2, "connections": 90,
                "connect_failures": 2, "bytes_sent": 3048, "bytes_received": 13192,
                "rtt_samples": 6, "mean_rtt_us": 5000.0 / 6.0,
            })
        );
        assert_eq!(value["backends"][2]["mean_rtt_us"], json!(null));
    }

    #[test]
    fn backends_table_is_aligned_and_human_readable() {
        let view = backends_view(&fixture_after().snap, None).unwrap();
        let text = render(|out| write_backends_table(out, &view));
        assert_eq!(
            text,
            "\
SERVICE  VIP             PROTO  BACKEND         STATE     SLOTS  CONNS  FAILS  SENT     RECEIVED  MEAN_RTT
web      127.100.9.1:80  tcp    127.0.0.1:8081  active    2      90     2      3.0 KiB  12.9 KiB  833us
web      127.100.9.1:80  tcp    127.0.0.1:8082  active    1      20     0      -        -         -
web      127.100.9.1:80  tcp    127.0.0.1:8083  inactive  0      6      1      -        -         -
"
        );
    }

    #[test]
    fn counter_deltas_survive_resets() {
        assert_eq!(delta(10, 15), 5);
        assert_eq!(delta(10, 10), 0);
        // Reset to zero, then 3 more: the 3 happened during the interval.
        assert_eq!(delta(10, 3), 3);
        assert_eq!(per_sec(10, 2.0), 5.0);
        assert_eq!(per_sec(10, 0.0), 0.0);
    }

    #[test]
    fn stats_view_computes_rates_between_two_snapshots() {
        let view = two_secs(&fixture_before(), &fixture_after());
        assert_eq!(view.interval_secs, 2.0);
        assert_eq!(view.datapath.rev_created, 20);
        assert_eq!(view.datapath.rev_created_per_sec, 5.0);
        assert_eq!(view.datapath.rev_released_per_sec, 4.0);
        let names: Vec<_> = view.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["dns", "web"]);
        let dns = &view.services[0];
        assert_eq!((dns.no_backend, dns.no_backend_per_sec), (10, 2.5));
        let web = &view.services[1];
        assert_eq!(web.no_backend_per_sec, 0.0);
        let b = &web.backends[0];
        assert_eq!((b.connections, b.connections_per_sec), (90, 5.0));
        assert_eq!((b.connect_failures, b.connect_failures_per_sec), (2, 0.5));
        assert_eq!(b.bytes_sent_per_sec, 1024.0);
        assert_eq!(b.bytes_received_per_sec, 4096.0);
        assert_eq!(b.interval_mean_rtt_us, Some(1500.0));
        assert_eq!(web.backends[1].connections_per_sec, 1.0);
        assert_eq!(web.backends[1].interval_mean_rtt_us, None);
        assert_eq!(web.backends[2].connections_per_sec, 0.0);
        assert_eq!(web.backends[2].state, "inactive");
    }

    #[test]
    fn stats_view_counts_new_and_reset_counters_from_zero() {
        let before = fixture_before();
        let mut after = fixture_after();
        // Backend 11 was removed and configured again: its counter restarted.
        after.snap.backend_stats.insert(key(WEB, 11), conns(4, 0));
        // Backend 12's id now names another address: a different backend, counted from zero.
        after
            .snap
            .backends
            .insert(12, "127.0.0.1:9999".parse().unwrap());
        // A backend added during the interval.
        after.snap.backend_stats.insert(key(WEB, 13), conns(2, 0));
        after
            .snap
            .backends
            .insert(13, "127.0.0.1:8084".parse().unwrap());
        let view = two_secs(&before, &after);
        let rates: Vec<_> = view.services[1]
            .backends
            .iter()
            .map(|b| (b.id, b.connections_per_sec))
            .collect();
        assert_eq!(rates, [(10, 5.0), (11, 2.0), (12, 3.0), (13, 1.0)]);
    }

    #[test]
    fn stats_view_treats_a_service_id_moved_to_another_vip_as_new() {
        let before = fixture_before();
        let mut after = fixture_after();
        let dns = after
            .snap
            .services
            .remove(&vip("127.100.9.2:53", PROTO_UDP))
            .unwrap();
        after
            .snap
            .services
            .insert(vip("127.100.9.3:53", PROTO_UDP), dns);
        let view = two_secs(&before, &after);
        assert_eq!(view.services[0].no_backend_per_sec, 5.0);
    }

    #[test]
    fn stats_json_shape() {
        let view = two_secs(&fixture_before(), &fixture_after());
        let value = serde_json::to_value(&view).unwrap();
        assert_eq!(value["interval_secs"], json!(2.0));
        assert_eq!(
            value["datapath"],
            json!({
                "rev_created": 20, "rev_created_per_sec": 5.0,
                "rev_released": 16, "rev_released_per_sec": 4.0,
                "udp_flows_added": 0, "udp_flows_added_per_sec": 0.0,
                "udp_flows_full": 0, "udp_flows_full_per_sec": 0.0,
            })
        );
        assert_eq!(
            value["services"][0],
            json!({
                "name": "dns", "id": 2, "vip": "127.100.9.2:53", "protocol": "udp",
                "slot_count": 0, "no_backend": 10, "no_backend_per_sec": 2.5, "backends": [],
            })
        );
        assert_eq!(
            value["services"][1]["backends"][0],
            json!({
                "id": 10, "addr": "127.0.0.1:8081", "state": "active", "slots": 2,
                "connections": 90, "connections_per_sec": 5.0,
                "connect_failures": 2, "connect_failures_per_sec": 0.5,
                "bytes_sent": 3048, "bytes_sent_per_sec": 1024.0,
                "bytes_received": 13192, "bytes_received_per_sec": 4096.0,
                "rtt_samples": 6, "mean_rtt_us": 5000.0 / 6.0, "interval_mean_rtt_us": 1500.0,
            })
        );
    }

    #[test]
    fn stats_table_shows_rates_no_backend_and_datapath() {
        let view = two_secs(&fixture_before(), &fixture_after());
        let text = render(|out| write_stats_table(out, &view));
        assert_eq!(
            text,
            "\
Rates over 2.00s; counters are totals.

SERVICE  VIP             PROTO  BACKEND         STATE     SLOTS  CONNS  CONN/S  FAILS  FAIL/S  SENT/S     RECV/S
web      127.100.9.1:80  tcp    127.0.0.1:8081  active    2      90     5.0     2      0.5     1.0 KiB/s  4.0 KiB/s
web      127.100.9.1:80  tcp    127.0.0.1:8082  active    1      20     1.0     0      0.0     0 B/s      0 B/s
web      127.100.9.1:80  tcp    127.0.0.1:8083  inactive  0      6      0.0     1      0.0     0 B/s      0 B/s

SERVICE  VIP             PROTO  NO_BACKEND  NO_BACKEND/S
dns      127.100.9.2:53  udp    10          2.5
web      127.100.9.1:80  tcp    0           0.0

DATAPATH         TOTAL  PER_SEC
rev_created      20     5.0
rev_released     16     4.0
udp_flows_added  0      0.0
udp_flows_full   0      0.0
"
        );
    }

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 * 1024 * 1024), "5.0 MiB");
        assert_eq!(human_bytes(u64::MAX), "16384.0 PiB");
        assert_eq!(human_byte_rate(1024.4), "1.0 KiB/s");
        assert_eq!(human_rtt(850.0), "850us");
        assert_eq!(fmt_rate(-0.0), "0.0");
        assert_eq!(human_rtt(1_250.0), "1.25ms");
        assert_eq!(human_rtt(2_100_000.0), "2.10s");
    }

    #[test]
    fn intervals_parse_as_humantime() {
        assert_eq!(parse_interval("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_interval("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_interval("0s").is_err());
        assert!(parse_interval("soon").is_err());
    }
}
