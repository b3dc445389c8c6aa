//! kube-proxy's `healthCheckNodePort`: for every external service with
//! `external = "local"` and a `health_check_node_port`, an HTTP server on that TCP port of the
//! node answers whether this node has local endpoints, so a cloud load balancer sends traffic
//! only to nodes that can serve it without leaving the node:
//! 200 `{"service":{"namespace":..,"name":..},"localEndpoints":N,"serviceProxyHealthy":true}`
//! when N > 0, the same body with 503 otherwise.
//!
//! The set of servers follows the published registry (every applied change).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    sync::{Arc, RwLock},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
};
use tracing::{info, warn};

use crate::{
    config::{ExternalPolicy, ServiceConfig},
    registry::Listing,
};

/// What one health check port reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub namespace: String,
    pub name: String,
    pub local_endpoints: u32,
}

impl Report {
    pub fn status(&self) -> u16 {
        if self.local_endpoints > 0 { 200 } else { 503 }
    }

    /// kube-proxy's body, its fields in its order.
    pub fn body(&self) -> String {
        let text = |s: &str| serde_json::Value::from(s).to_string();
        format!(
            r#"{{"service":{{"namespace":{},"name":{}}},"localEndpoints":{},"serviceProxyHealthy":true}}"#,
            text(&self.namespace),
            text(&self.name),
            self.local_endpoints
        )
    }
}

/// `namespace/name:port@...` (the Kubernetes source's names) -> (namespace, name); a name
/// without '/' has an empty namespace.
fn service_of(name: &str) -> (String, String) {
    let (namespace, rest) = name.split_once('/').unwrap_or(("", name));
    let service = rest.split([':', '@']).next().unwrap_or(rest);
    (namespace.to_owned(), service.to_owned())
}

/// The servers the registry asks for: port -> report. The services sharing a port are one
/// Service's ports and addresses: its local endpoints are counted once each (by address), or
/// taken from what the source says (`local_endpoints`: the Kubernetes source counts only ready
/// endpoints, not serving-terminating ones).
pub fn desired(services: &[&ServiceConfig]) -> BTreeMap<u16, Report> {
    let mut out: BTreeMap<u16, (Report, BTreeSet<IpAddr>, Option<u32>)> = BTreeMap::new();
    for svc in services {
        let Some(hc) = &svc.health_check_node_port else {
            continue;
        };
        if svc.external != Some(ExternalPolicy::Local) {
            continue;
        }
        let (namespace, name) = service_of(&svc.name);
        let entry = out.entry(hc.port).or_insert_with(|| {
            (
                Report {
                    namespace,
                    name,
                    local_endpoints: 0,
                },
                BTreeSet::new(),
                None,
            )
        });
        entry.1.extend(
            svc.backends
                .iter()
                .filter(|b| !b.drain)
                .map(|b| b.addr.ip()),
        );
        if let Some(n) = hc.local_endpoints {
            entry.2 = Some(entry.2.unwrap_or(0).max(n));
        }
    }
    out.into_iter()
        .map(|(port, (mut report, ips, given))| {
            report.local_endpoints =
                given.unwrap_or_else(|| u32::try_from(ips.len()).unwrap_or(u32::MAX));
            (port, report)
        })
        .collect()
}

struct Server {
    report: Arc<RwLock<Report>>,
    task: JoinHandle<()>,
}

/// Keeps one server per health check port the published registry asks for, for the agent's
/// lifetime.
pub fn spawn(mut listing: watch::Receiver<Listing>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut servers: BTreeMap<u16, Server> = BTreeMap::new();
        loop {
            let want = {
                let listing = listing.borrow_and_update();
                let services: Vec<&ServiceConfig> = listing.iter().map(|(_, s)| s).collect();
                desired(&services)
            };
            servers.retain(|port, server| {
                let keep = want.contains_key(port);
                if !keep {
                    server.task.abort();
                    info!(port, "health check node port closed");
                }
                keep
            });
            for (port, report) in want {
                if let Some(server) = servers.get(&port) {
                    *server.report.write().expect("report lock") = report;
                    continue;
                }
                // All addresses of the node, as kube-proxy listens.
                match TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port))).await {
                    Ok(listener) => {
                        let report = Arc::new(RwLock::new(report));
                        let task = tokio::spawn(serve(listener, report.clone()));
                        info!(port, "health check node port open");
                        servers.insert(port, Server { report, task });
                    }
                    // Tried again at the next registry change.
                    Err(err) => warn!(port, "cannot listen on the health check node port: {err}"),
                }
            }
            if listing.changed().await.is_err() {
                return;
            }
        }
    })
}

async fn serve(listener: TcpListener, report: Arc<RwLock<Report>>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let report = report.read().expect("report lock").clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), answer(stream, report)).await;
        });
    }
}

/// Reads the request head (any method and path get the same answer, as kube-proxy's) and
/// answers with the report.
async fn answer(mut stream: TcpStream, report: Report) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let body = report.body();
    let status = match report.status() {
        200 => "200 OK",
        _ => "503 Service Unavailable",
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BackendConfig, HealthCheckNodePort};

    fn svc(name: &str, hc: u16, given: Option<u32>, backends: &[(&str, bool)]) -> ServiceConfig {
        let mut s: ServiceConfig = toml::from_str(&format!(
            "name = \"{name}\"\nvip = \"10.0.0.1:30080\"\nexternal = \"local\""
        ))
        .unwrap();
        s.backends = backends
            .iter()
            .map(|(a, drain)| BackendConfig {
                addr: a.parse().unwrap(),
                weight: 1,
                drain: *drain,
            })
            .collect();
        s.health_check_node_port = Some(HealthCheckNodePort {
            port: hc,
            local_endpoints: given,
        });
        s
    }

    #[test]
    fn a_port_reports_its_services_local_endpoints_once_each() {
        let a = svc(
            "default/web:http@ext/10.0.0.1:30080",
            32000,
            None,
            &[("10.1.0.1:8080", false), ("10.1.0.2:8080", true)],
        );
        let b = svc(
            "default/web:grpc@ext/10.0.0.1:30090",
            32000,
            None,
            &[("10.1.0.1:9090", false)],
        );
        let empty = svc("default/db:5432@ext/10.0.0.1:30432", 32001, None, &[]);
        let want = desired(&[&a, &b, &empty]);
        let web = &want[&32000];
        assert_eq!(
            (web.namespace.as_str(), web.name.as_str()),
            ("default", "web")
        );
        assert_eq!(web.local_endpoints, 1, "one pod, drained ones not counted");
        assert_eq!(web.status(), 200);
        assert_eq!(
            web.body(),
            r#"{"service":{"namespace":"default","name":"web"},"localEndpoints":1,"serviceProxyHealthy":true}"#
        );
        assert_eq!(want[&32001].status(), 503);
        assert_eq!(want[&32001].local_endpoints, 0);
    }

    #[test]
    fn the_sources_count_wins_so_terminating_endpoints_answer_503() {
        // Serving-terminating endpoints carry the traffic, but the node is not healthy.
        let s = svc(
            "ns/x:80@ext/10.0.0.1:30080",
            32000,
            Some(0),
            &[("10.1.0.1:80", false)],
        );
        assert_eq!(desired(&[&s])[&32000].status(), 503);
        let mut cluster = svc("ns/y:80", 32001, None, &[("10.1.0.1:80", false)]);
        cluster.external = Some(ExternalPolicy::Cluster);
        assert!(
            desired(&[&cluster]).is_empty(),
            "Cluster services have no health check"
        );
    }
}
