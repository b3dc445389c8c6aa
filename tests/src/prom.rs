//! Prometheus from the outside: parsing the agent's `/metrics` text, `promtool check metrics`,
//! and a real `prometheus` server scraping the agent.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::process::{Captured, run_bounded, send_signal, wait_bounded};

/// One sample line: `name{label="value",...} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    /// Whether every `(label, value)` pair of `want` is on this sample.
    pub fn has_labels(&self, want: &[(&str, &str)]) -> bool {
        want.iter()
            .all(|(k, v)| self.labels.get(*k).is_some_and(|have| have == v))
    }
}

/// A parsed text exposition (format 0.0.4).
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    pub text: String,
    pub samples: Vec<Sample>,
    /// Family name -> type, from the `# TYPE` lines.
    pub types: BTreeMap<String, String>,
}

impl Scrape {
    /// Parses `text`; the error names the line that is not valid exposition text.
    pub fn parse(text: &str) -> Result<Scrape, String> {
        let mut scrape = Scrape {
            text: text.to_owned(),
            ..Scrape::default()
        };
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            if let Some(comment) = line.strip_prefix('#') {
                let mut words = comment.split_whitespace();
                if words.next() == Some("TYPE") {
                    let (Some(name), Some(kind)) = (words.next(), words.next()) else {
                        return Err(format!("line {}: bad TYPE line {line:?}", n + 1));
                    };
                    scrape.types.insert(name.to_owned(), kind.to_owned());
                }
                continue;
            }
            let sample =
                parse_sample(line).map_err(|e| format!("line {}: {e}: {line:?}", n + 1))?;
            scrape.samples.push(sample);
        }
        Ok(scrape)
    }

    /// Every sample named `name`.
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| s.name == name)
    }

    /// The samples named `name` that carry all `labels`.
    pub fn matching<'a>(&'a self, name: &'a str, labels: &[(&str, &str)]) -> Vec<&'a Sample> {
        self.all(name).filter(|s| s.has_labels(labels)).collect()
    }

    /// The value of the one sample named `name` with `labels`; None if there is none. Panics if
    /// several match (the labels do not select one series).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let found = self.matching(name, labels);
        assert!(
            found.len() <= 1,
            "{name}{labels:?} matches {} series: {found:#?}",
            found.len()
        );
        found.first().map(|s| s.value)
    }

    /// `label` value -> sample value, for the samples named `name` with `filter`. Panics if two
    /// samples share a `label` value.
    pub fn by_label(
        &self,
        name: &str,
        label: &str,
        filter: &[(&str, &str)],
    ) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for sample in self.matching(name, filter) {
            let key = sample.labels.get(label).cloned().unwrap_or_default();
            let previous = out.insert(key.clone(), sample.value);
            assert!(
                previous.is_none(),
                "{name}{filter:?}: two series with {label}={key:?}"
            );
        }
        out
    }

    /// Every sample name (histograms appear as `_bucket`, `_sum` and `_count`).
    pub fn names(&self) -> BTreeSet<&str> {
        self.samples.iter().map(|s| s.name.as_str()).collect()
    }

    /// Whether `name` is exported: as a sample name, or as a histogram or summary family.
    pub fn exports(&self, name: &str) -> bool {
        self.samples.iter().any(|s| s.name == name) || self.types.contains_key(name)
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .ok_or("no value")?;
    let name = &line[..name_end];
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        rest = after;
        loop {
            rest = rest.trim_start_matches([' ', ',']);
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let eq = rest.find('=').ok_or("label without '='")?;
            let key = rest[..eq].trim().to_owned();
            rest = rest[eq + 1..]
                .strip_prefix('"')
                .ok_or("label value without quotes")?;
            let mut value = String::new();
            let mut chars = rest.char_indices();
            let end = loop {
                match chars.next() {
                    Some((i, '"')) => break i,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c)) => value.push(c),
                        None => return Err("unterminated escape".into()),
                    },
                    Some((_, c)) => value.push(c),
                    None => return Err("unterminated label value".into()),
                }
            };
            rest = &rest[end + 1..];
            if labels.insert(key.clone(), value).is_some() {
                return Err(format!("label {key:?} twice"));
            }
        }
    }
    let mut words = rest.split_whitespace();
    let value = words.next().ok_or("no value")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        other => other
            .parse::<f64>()
            .map_err(|e| format!("value {other:?}: {e}"))?,
    };
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Runs `promtool check metrics` with `text` on stdin (bounded to 30 s).
pub fn promtool_check_metrics(text: &str) -> Captured {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run promtool ({e}): install the Debian package `prometheus` \
                 (`cargo xtask setup` does)"
            )
        });
    let mut stdin = child.stdin.take().expect("piped stdin");
    let input = text.to_owned();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(input.as_bytes());
    });
    let out = capture(child, Duration::from_secs(30), "promtool check metrics");
    let _ = writer.join();
    out
}

/// Runs `promtool <args>` (bounded to 30 s).
pub fn promtool(args: &[&str]) -> Captured {
    let mut cmd = Command::new("promtool");
    cmd.args(args);
    run_bounded(&mut cmd, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("promtool {args:?}: {e}"))
}

fn capture(mut child: Child, timeout: Duration, what: &str) -> Captured {
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let Some(status) = wait_bounded(&mut child, timeout) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{what} still ran after {timeout:?}; killed");
    };
    Captured {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

fn drain(pipe: Option<impl std::io::Read + Send + 'static>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Path of the Prometheus server binary (Debian package `prometheus`).
pub const PROMETHEUS_BIN: &str = "/usr/bin/prometheus";

/// A real Prometheus server on a free loopback port, scraping `targets` every `interval`, with
/// its TSDB, config and log in a private temp directory. Drop stops it (SIGTERM, SIGKILL after
/// 10 s) and removes the directory (kept, with the log printed, when the test panics).
pub struct PrometheusServer {
    child: Child,
    dir: PathBuf,
    addr: SocketAddr,
}

impl PrometheusServer {
    /// Starts the server and waits (bounded by 30 s) until `/-/ready` answers 200.
    pub fn start(tag: &str, targets: &[SocketAddr], interval: Duration) -> PrometheusServer {
        let dir = std::env::temp_dir().join(format!("{}-prometheus", crate::unique_name(tag)));
        std::fs::create_dir_all(dir.join("data"))
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let config = dir.join("prometheus.yml");
        std::fs::write(&config, prometheus_config(targets, interval))
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", config.display()));
        let addr = free_loopback_addr();
        let log_path = dir.join("prometheus.log");
        let log = File::create(&log_path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", log_path.display()));
        let log_err = log.try_clone().expect("clone log handle");
        let args: Vec<OsString> = vec![
            format!("--config.file={}", config.display()).into(),
            format!("--storage.tsdb.path={}", dir.join("data").display()).into(),
            format!("--web.listen-address={addr}").into(),
            "--storage.tsdb.retention.time=1h".into(),
        ];
        let mut cmd = Command::new(PROMETHEUS_BIN);
        cmd.args(&args)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        // SAFETY: prctl is async-signal-safe and the closure allocates nothing. If the test
        // process dies without running Drop, the server gets SIGTERM instead of running on.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot start {PROMETHEUS_BIN} ({e}): install the Debian package `prometheus` \
                 (`cargo xtask setup` does)"
            )
        });
        let mut server = PrometheusServer { child, dir, addr };
        let ready = crate::wait_until(Duration::from_secs(30), || {
            assert!(
                server.child.try_wait().ok().flatten().is_none(),
                "prometheus exited before it was ready; log:\n{}",
                server.log_text()
            );
            server
                .get("/-/ready")
                .is_ok_and(|response| response.status == 200)
        });
        assert!(
            ready,
            "prometheus was not ready within 30 s; log:\n{}",
            server.log_text()
        );
        server
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// GET `path` on the server's web address.
    pub fn get(&self, path: &str) -> std::io::Result<crate::http::Response> {
        crate::http::get(self.addr, path, Duration::from_secs(5))
    }

    /// `/api/v1/query?query=<promql>`: the `data.result` vector of an instant query.
    pub fn query(&self, promql: &str) -> Result<Vec<serde_json::Value>, String> {
        let path = format!("/api/v1/query?query={}", url_encode(promql));
        let response = self.get(&path).map_err(|e| format!("GET {path}: {e}"))?;
        if response.status != 200 {
            return Err(format!(
                "GET {path}: HTTP {}: {}",
                response.status, response.body
            ));
        }
        let doc: serde_json::Value = serde_json::from_str(&response.body)
            .map_err(|e| format!("GET {path}: invalid JSON ({e}): {}", response.body))?;
        if doc["status"] != "success" {
            return Err(format!("GET {path}: {doc}"));
        }
        doc["data"]["result"]
            .as_array()
            .cloned()
            .ok_or_else(|| format!("GET {path}: no data.result list: {doc}"))
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            send_signal(self.child.id(), libc::SIGTERM);
            if wait_bounded(&mut self.child, Duration::from_secs(10)).is_none() {
                eprintln!("harness: prometheus ignored SIGTERM for 10 s; SIGKILL");
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "===== prometheus log (kept in {}) =====\n{}\n===== end of prometheus log =====",
                self.dir.display(),
                self.log_text()
            );
        } else if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("harness: could not remove {}: {e}", self.dir.display());
        }
    }
}

/// A minimal `prometheus.yml`: one job `mesh` scraping `targets` every `interval`.
pub fn prometheus_config(targets: &[SocketAddr], interval: Duration) -> String {
    let ms = interval.as_millis().max(1);
    let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
    format!(
        "global:\n  scrape_interval: {ms}ms\n  evaluation_interval: {ms}ms\n\
         scrape_configs:\n  - job_name: mesh\n    scrape_interval: {ms}ms\n    \
         scrape_timeout: {ms}ms\n    static_configs:\n      - targets: [{}]\n",
        targets.join(", ")
    )
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
pub fn url_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// A loopback address with a port that was free a moment ago.
fn free_loopback_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral loopback port");
    listener.local_addr().expect("local address")
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP mesh_backend_connections_total Connections
# TYPE mesh_backend_connections_total counter
mesh_backend_connections_total{backend="127.0.0.1:1",protocol="tcp",service="web"} 100
mesh_backend_connections_total{backend="127.0.0.1:2",protocol="tcp",service="web"} 7
# TYPE mesh_backend_rtt_seconds histogram
mesh_backend_rtt_seconds_bucket{service="web",backend="127.0.0.1:1",protocol="tcp",le="0.000016"} 3
mesh_backend_rtt_seconds_bucket{service="web",backend="127.0.0.1:1",protocol="tcp",le="+Inf"} 4
mesh_backend_rtt_seconds_sum{service="web",backend="127.0.0.1:1",protocol="tcp"} 0.00003
mesh_backend_rtt_seconds_count{service="web",backend="127.0.0.1:1",protocol="tcp"} 4
mesh_config_rejected_total 0
odd{a="x\"y\\z\n",b=""} -Inf 1700000000000
"#;

    #[test]
    fn parses_samples_labels_and_types() {
        let scrape = Scrape::parse(TEXT).expect("parses");
        assert_eq!(scrape.samples.len(), 8);
        assert_eq!(
            scrape.by_label(
                "mesh_backend_connections_total",
                "backend",
                &[("service", "web")]
            ),
            BTreeMap::from([("127.0.0.1:1".into(), 100.0), ("127.0.0.1:2".into(), 7.0)])
        );
        assert_eq!(
            scrape.value("mesh_backend_rtt_seconds_bucket", &[("le", "+Inf")]),
            Some(4.0)
        );
        assert_eq!(scrape.value("mesh_config_rejected_total", &[]), Some(0.0));
        assert_eq!(scrape.value("mesh_nothing", &[]), None);
        let odd = &scrape.matching("odd", &[])[0];
        assert_eq!(odd.labels["a"], "x\"y\\z\n");
        assert_eq!(odd.labels["b"], "");
        assert_eq!(odd.value, f64::NEG_INFINITY);
        assert_eq!(scrape.types["mesh_backend_rtt_seconds"], "histogram");
        assert!(scrape.exports("mesh_backend_rtt_seconds"));
        assert!(scrape.exports("mesh_backend_rtt_seconds_bucket"));
        assert!(!scrape.exports("mesh_backend_rtt"));
    }

    #[test]
    #[should_panic(expected = "matches 2 series")]
    fn value_refuses_ambiguous_labels() {
        let scrape = Scrape::parse(TEXT).expect("parses");
        scrape.value("mesh_backend_connections_total", &[("service", "web")]);
    }

    #[test]
    fn rejects_broken_lines() {
        assert!(Scrape::parse("mesh_x{a=\"1\" 2\n").is_err());
        assert!(Scrape::parse("mesh_x{a=1} 2\n").is_err());
        assert!(Scrape::parse("mesh_x\n").is_err());
        assert!(Scrape::parse("mesh_x abc\n").is_err());
    }

    #[test]
    fn encodes_promql_for_a_url() {
        assert_eq!(
            url_encode("sum by (a) (x{b=\"c\"})"),
            "sum%20by%20%28a%29%20%28x%7Bb%3D%22c%22%7D%29"
        );
    }

    #[test]
    fn writes_a_scrape_config() {
        let config = prometheus_config(
            &["127.0.0.1:9464".parse().expect("addr")],
            Duration::from_secs(1),
        );
        assert!(config.contains("scrape_interval: 1000ms"), "{config}");
        assert!(config.contains("targets: ['127.0.0.1:9464']"), "{config}");
    }
}
