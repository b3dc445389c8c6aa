//! Watching what the agent and the kernel hold over time: `mesh services` sampled in the
//! background, polling one service until a condition holds (timed), the agent's metrics and log
//! lines, and the pinned links as `bpftool` sees them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::BpffsDir;
use crate::services::{ServiceStatus, ServicesDoc, parse_services};

/// Runs `mesh services --bpffs <dir> -o json` and parses it (no panics: errors are returned).
pub fn read_services(bpffs: &Path) -> Result<ServicesDoc, String> {
    let mut cmd = Command::new(crate::mesh_bin());
    cmd.arg("services")
        .arg("--bpffs")
        .arg(bpffs)
        .args(["-o", "json"]);
    let out = crate::process::run_bounded(&mut cmd, Duration::from_secs(10))
        .map_err(|e| format!("`mesh services`: {e}"))?;
    if !out.status.success() {
        return Err(format!("`mesh services` failed: {}", out.describe()));
    }
    let json: serde_json::Value = serde_json::from_str(&out.stdout).map_err(|e| {
        format!(
            "`mesh services -o json` printed invalid JSON ({e}): {}",
            out.stdout
        )
    })?;
    parse_services(&json)
}

/// One sample of one service.
#[derive(Debug, Clone)]
pub struct Sample {
    /// When the sample's `mesh services` run ended, since the watcher started.
    pub at: Duration,
    /// The service, `Ok(None)` if `mesh services` did not list it, `Err` if it failed.
    pub service: Result<Option<ServiceStatus>, String>,
}

impl Sample {
    pub fn slot_count(&self) -> Option<u64> {
        self.service.as_ref().ok()?.as_ref().map(|s| s.slot_count)
    }
}

/// Samples one service with `mesh services -o json` in a background thread, sleeping `every`
/// between runs, until stopped or `max` has passed.
pub struct ServicesWatcher {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<Sample>>>,
}

impl ServicesWatcher {
    pub fn start(bpffs: &BpffsDir, service: &str, every: Duration, max: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = Arc::clone(&stop);
        let path: PathBuf = bpffs.path().to_path_buf();
        let service = service.to_owned();
        let thread = std::thread::Builder::new()
            .name("services-watcher".into())
            .spawn(move || {
                let started = Instant::now();
                let mut samples = Vec::new();
                while !thread_stop.load(Ordering::Relaxed) && started.elapsed() < max {
                    let service = read_services(&path).map(|doc| doc.service(&service).cloned());
                    samples.push(Sample {
                        at: started.elapsed(),
                        service,
                    });
                    std::thread::sleep(every);
                }
                samples
            })
            .expect("spawn the services watcher");
        ServicesWatcher {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops sampling and returns the samples.
    pub fn stop(mut self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("joined once")
            .join()
            .expect("the services watcher panicked")
    }
}

impl Drop for ServicesWatcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The largest gap between consecutive samples (and from 0 to the first).
pub fn max_gap(samples: &[Sample]) -> Duration {
    let mut last = Duration::ZERO;
    let mut gap = Duration::ZERO;
    for s in samples {
        gap = gap.max(s.at.saturating_sub(last));
        last = s.at;
    }
    gap
}

/// Polls `mesh services` as fast as it runs until service `name` satisfies `condition`, for at
/// most `timeout`. Ok(time it took, the status) or Err(the last state seen).
pub fn poll_service(
    bpffs: &BpffsDir,
    name: &str,
    timeout: Duration,
    mut condition: impl FnMut(&ServiceStatus) -> bool,
) -> Result<(Duration, ServiceStatus), String> {
    let started = Instant::now();
    loop {
        let last = match read_services(bpffs.path()) {
            Ok(doc) => match doc.service(name) {
                Some(status) if condition(status) => {
                    return Ok((started.elapsed(), status.clone()));
                }
                Some(status) => format!("{status:?}"),
                None => format!("no service {name:?} in {doc:?}"),
            },
            Err(e) => e,
        };
        if started.elapsed() >= timeout {
            return Err(format!(
                "service {name:?}: condition not met within {timeout:?}; last seen: {last}"
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The backend at `addr` in `status`, if listed.
///
/// Unlike [`ServiceStatus::backend`] this tolerates the `"?"` address `mesh services` prints
/// for a backend whose address it did not find (its snapshot of the maps is not atomic: during
/// an update it can see a counter before, or after, the backend entry).
pub fn find_backend(
    status: &ServiceStatus,
    addr: std::net::SocketAddr,
) -> Option<&crate::services::BackendStatus> {
    status
        .backends
        .iter()
        .find(|b| b.addr.parse::<std::net::SocketAddr>() == Ok(addr))
}

/// Slots of the backend at `addr` in `status` (0 when it is listed without slots or not at all).
pub fn slots_of(status: &ServiceStatus, addr: std::net::SocketAddr) -> u64 {
    find_backend(status, addr).map_or(0, |b| b.slots)
}

/// Slots per backend address as `mesh services` printed it (`"?"` included, see
/// [`find_backend`]).
pub fn slot_map(status: &ServiceStatus) -> BTreeMap<String, u64> {
    status
        .backends
        .iter()
        .map(|b| (b.addr.clone(), b.slots))
        .collect()
}

/// The value of the Prometheus sample `name{labels...}` in a `/metrics` text: the first sample of
/// that name whose labels include all of `labels`. Panics if the text is not valid exposition
/// text ([`crate::prom::Scrape::parse`]).
#[track_caller]
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let scrape = crate::prom::Scrape::parse(text).unwrap_or_else(|e| panic!("/metrics: {e}"));
    scrape
        .matching(name, labels)
        .first()
        .map(|sample| sample.value)
}

/// A `backend health changed` line of the agent's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthTransition {
    /// `127.100.0.1:80/tcp`
    pub vip: String,
    pub backend: String,
    pub from: String,
    pub to: String,
    pub reason: String,
    pub line: String,
}

/// The health transitions logged in `log` (tracing's `key=value` fields; `reason` comes last).
pub fn health_transitions(log: &str) -> Vec<HealthTransition> {
    log.lines()
        .filter(|line| line.contains("backend health changed"))
        .filter_map(|line| {
            let field = |key: &str| {
                let start = line.find(&format!(" {key}="))? + key.len() + 2;
                let value = &line[start..];
                Some(value.split(' ').next().unwrap_or_default().to_owned())
            };
            let reason_at = line.find(" reason=")? + " reason=".len();
            Some(HealthTransition {
                vip: field("vip")?,
                backend: field("backend")?,
                from: field("from")?,
                to: field("to")?,
                reason: line[reason_at..].trim().to_owned(),
                line: line.to_owned(),
            })
        })
        .collect()
}

/// The time of an agent log line (tracing's `2026-11-24T12:00:00.123456Z` prefix), as seconds
/// since the Unix epoch.
pub fn log_line_time(line: &str) -> Option<f64> {
    let stamp = line.split_ascii_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = stamp.split_once('T')?;
    let mut ymd = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, d) = (ymd.next()??, ymd.next()??, ymd.next()??);
    let mut hms = time.split(':');
    let h: f64 = hms.next()?.parse().ok()?;
    let min: f64 = hms.next()?.parse().ok()?;
    let sec: f64 = hms.next()?.parse().ok()?;
    // Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    #[allow(clippy::cast_precision_loss)]
    let days = days as f64;
    Some(days * 86_400.0 + h * 3_600.0 + min * 60.0 + sec)
}

/// Now, as seconds since the Unix epoch (to compare with [`log_line_time`]).
pub fn now_epoch_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// `writes=N` of an agent `...: applied` log line.
pub fn applied_writes(line: &str) -> Option<u64> {
    if !line.contains("applied") {
        return None;
    }
    let start = line.find("writes=")? + "writes=".len();
    line[start..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// A pinned link as `bpftool link show pinned <pin> -j` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkInfo {
    pub id: u64,
    pub prog_id: u64,
}

/// Every link pinned under `<bpffs>/v3/links/`, by pin name (the program's name).
pub fn pinned_links(bpffs: &BpffsDir) -> BTreeMap<String, LinkInfo> {
    let dir = bpffs.path().join(crate::maps::LAYOUT_DIR).join("links");
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list the pinned links in {}: {e}", dir.display()));
    let mut links = BTreeMap::new();
    for entry in entries {
        let entry = entry.expect("read a pinned link entry");
        let pin = entry.path();
        let json = bpftool_json(&[
            "link".as_ref(),
            "show".as_ref(),
            "pinned".as_ref(),
            pin.as_os_str(),
        ]);
        let id = json.get("id").and_then(serde_json::Value::as_u64);
        let prog_id = json.get("prog_id").and_then(serde_json::Value::as_u64);
        let (Some(id), Some(prog_id)) = (id, prog_id) else {
            panic!(
                "`bpftool link show pinned {}`: no id/prog_id in {json}",
                pin.display()
            );
        };
        links.insert(
            entry.file_name().to_string_lossy().into_owned(),
            LinkInfo { id, prog_id },
        );
    }
    links
}

/// Runs `bpftool <args> -j` and parses its JSON; panics with its output on failure.
pub fn bpftool_json<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> serde_json::Value {
    let mut cmd = Command::new("bpftool");
    cmd.args(args).arg("-j");
    let out = crate::process::run_bounded(&mut cmd, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("`bpftool {cmd:?}`: {e}"));
    assert!(
        out.status.success(),
        "`{cmd:?}` failed (is bpftool installed?): {}",
        out.describe()
    );
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("`{cmd:?}` printed invalid JSON ({e}): {}", out.stdout))
}

/// The `id` fields of a bpftool JSON list (`bpftool link show -j`, `bpftool prog show -j`).
pub fn listed_ids(list: &serde_json::Value) -> BTreeMap<u64, serde_json::Value> {
    list.as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|item| Some((item.get("id")?.as_u64()?, item.clone())))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRICS: &str = "\
# HELP mesh_backend_health Health
# TYPE mesh_backend_health gauge
mesh_backend_health{backend=\"127.0.0.1:8081\",protocol=\"tcp\",vip=\"127.100.0.1:80\"} 1
mesh_backend_health{backend=\"127.0.0.1:8082\",protocol=\"tcp\",vip=\"127.100.0.1:80\"} -1
mesh_agent_ready 1
";

    #[test]
    fn finds_metric_values_by_labels() {
        assert_eq!(
            metric_value(
                METRICS,
                "mesh_backend_health",
                &[("backend", "127.0.0.1:8082"), ("vip", "127.100.0.1:80")]
            ),
            Some(-1.0)
        );
        assert_eq!(
            metric_value(
                METRICS,
                "mesh_backend_health",
                &[("backend", "127.0.0.1:8081")]
            ),
            Some(1.0)
        );
        assert_eq!(metric_value(METRICS, "mesh_agent_ready", &[]), Some(1.0));
        assert_eq!(
            metric_value(METRICS, "mesh_backend_health", &[("backend", "x")]),
            None
        );
    }

    #[test]
    fn parses_health_transitions_and_applied_lines() {
        let log = "2026-11-24T12:00:00.1Z  INFO mesh::health: backend health changed \
                   vip=127.100.42.1:80/tcp backend=127.0.0.1:4000 from=healthy to=unhealthy \
                   reason=HTTP status 503\n\
                   2026-11-24T12:00:00.2Z  INFO mesh::agent: health change: applied writes=4 \
                   services=2\n";
        let t = health_transitions(log);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].vip, "127.100.42.1:80/tcp");
        assert_eq!(t[0].backend, "127.0.0.1:4000");
        assert_eq!(
            (t[0].from.as_str(), t[0].to.as_str()),
            ("healthy", "unhealthy")
        );
        assert_eq!(t[0].reason, "HTTP status 503");
        let applied: Vec<u64> = log.lines().filter_map(applied_writes).collect();
        assert_eq!(applied, vec![4]);
        let at = log_line_time(log.lines().next().unwrap()).expect("a timestamp");
        // 2026-11-24T12:00:00.1Z
        assert!((at - 1_795_521_600.1).abs() < 1e-3, "{at}");
        assert!(log_line_time("no timestamp here").is_none());
    }
}
