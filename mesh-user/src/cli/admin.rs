//! `mesh register`, `mesh deregister` and `mesh drain`: changes sent to a running agent through
//! its admin socket (`[agent] admin_socket`). The agent decides; its answer (and, when it
//! rejects a change, its reasons) is printed as it is.

use std::{
    io::ErrorKind,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};
use http_body_util::{BodyExt as _, Full};
use hyper::{
    Method, Request, StatusCode,
    body::Bytes,
    header::{CONTENT_TYPE, HOST},
};
use serde_json::{Value, json};

/// A change is answered once the maps hold it; this bounds a hung agent.
const TIMEOUT: Duration = Duration::from_secs(30);

/// `mesh register`'s service, as the admin API takes it.
#[derive(clap::Args, Debug)]
pub struct RegisterArgs {
    /// The service's name (replaces an admin API service of that name).
    pub name: String,
    /// The virtual address clients connect to, e.g. 10.96.0.10:80 or [fd00::10]:53.
    #[arg(long)]
    pub vip: SocketAddr,
    /// tcp or udp.
    #[arg(long, default_value = "tcp")]
    pub protocol: String,
    /// A backend, `ADDR` or `ADDR=WEIGHT` (repeat for more), e.g. 10.0.0.5:8080=3.
    #[arg(long = "backend", value_parser = parse_backend)]
    pub backends: Vec<(SocketAddr, u32)>,
}

fn parse_backend(text: &str) -> Result<(SocketAddr, u32), String> {
    let (addr, weight) = match text.rsplit_once('=') {
        Some((addr, weight)) => (
            addr,
            weight
                .parse()
                .map_err(|_| format!("weight {weight:?} is not a whole number"))?,
        ),
        None => (text, 1),
    };
    let addr = addr
        .parse()
        .map_err(|_| format!("{addr:?} is not an address like 10.0.0.5:8080 or [fd00::5]:80"))?;
    Ok((addr, weight))
}

/// The agent's admin socket.
pub struct Admin {
    socket: PathBuf,
}

impl Admin {
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_owned(),
        }
    }

    /// One request; the status and the JSON body of the answer.
    fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(StatusCode, Value)> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            tokio::time::timeout(TIMEOUT, self.send(method, path, body))
                .await
                .with_context(|| {
                    format!(
                        "the agent did not answer within {TIMEOUT:?} on {}",
                        self.socket.display()
                    )
                })?
        })
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(StatusCode, Value)> {
        let socket = self.socket.display();
        let stream = match tokio::net::UnixStream::connect(&self.socket).await {
            Ok(stream) => stream,
            Err(err) => match err.kind() {
                ErrorKind::NotFound | ErrorKind::ConnectionRefused => bail!(
                    "the mesh agent is not running: nothing listens on {socket} ({err}); start \
                     `mesh agent`, or point --admin-socket (MESH_ADMIN_SOCKET) at its \
                     [agent] admin_socket"
                ),
                ErrorKind::PermissionDenied => bail!(
                    "permission denied on {socket}: the admin socket is for root and the \
                     agent's user only"
                ),
                _ => return Err(err).with_context(|| format!("connecting to {socket}")),
            },
        };
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .with_context(|| format!("HTTP handshake on {socket}"))?;
        tokio::spawn(connection);
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, "localhost")
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))?;
        let response = sender
            .send_request(request)
            .await
            .with_context(|| format!("the agent closed {socket} without an answer"))?;
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| json!({ "error": String::from_utf8_lossy(&bytes).into_owned() }));
        Ok((status, value))
    }

    /// Turns an answer into what the operator sees: `done` on success, the agent's reason
    /// otherwise.
    fn report(
        &self,
        what: &str,
        (status, body): (StatusCode, Value),
        done: &str,
    ) -> anyhow::Result<()> {
        let reason = body["error"].as_str().unwrap_or_default();
        match status {
            StatusCode::OK => {
                match body["generation"].as_u64() {
                    Some(generation) => println!("{done} (generation {generation})"),
                    None => println!("{done}"),
                }
                if !reason.is_empty() {
                    eprintln!("warning: {reason}");
                }
                Ok(())
            }
            StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED => {
                bail!("{what}: the agent refused the caller (HTTP {status}): {reason}")
            }
            _ if status.is_server_error() && body["applied"] == json!(false) => {
                bail!("{what}: accepted but not yet applied (HTTP {status}): {reason}")
            }
            _ => bail!("{what}: rejected by the agent (HTTP {status}):\n{reason}"),
        }
    }

    pub fn register(&self, args: &RegisterArgs) -> anyhow::Result<()> {
        let backends: Vec<Value> = args
            .backends
            .iter()
            .map(|(addr, weight)| json!({ "addr": addr, "weight": weight }))
            .collect();
        let service = json!({
            "vip": args.vip,
            "protocol": args.protocol,
            "backends": backends,
        });
        let answer = self.call(Method::PUT, &service_path(&args.name), Some(service))?;
        self.report(
            &format!("register {:?}", args.name),
            answer,
            &format!("registered {}", args.name),
        )
    }

    pub fn deregister(&self, name: &str) -> anyhow::Result<()> {
        let answer = self.call(Method::DELETE, &service_path(name), None)?;
        self.report(
            &format!("deregister {name:?}"),
            answer,
            &format!("deregistered {name}"),
        )
    }

    /// Marks the service's backends (or only `only`) draining, or no longer draining with
    /// `undo`: the service is read, changed and put back whole.
    pub fn drain(&self, name: &str, only: &[SocketAddr], undo: bool) -> anyhow::Result<()> {
        let what = format!("drain {name:?}");
        let (status, listing) = self.call(Method::GET, "/v1/services", None)?;
        if status != StatusCode::OK {
            return self.report(&what, (status, listing), "");
        }
        let entry = listing["services"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|entry| entry["service"]["name"] == json!(name))
            .with_context(|| format!("{what}: the agent has no service {name:?}"))?;
        let source = entry["source"].as_str().unwrap_or_default();
        if source != "api" {
            bail!(
                "{what}: the service comes from the {source} source; the admin API changes only \
                 its own services, so drain it in the {source} source"
            );
        }
        let mut service = entry["service"].clone();
        let backends = service["backends"]
            .as_array_mut()
            .with_context(|| format!("{what}: the agent listed the service without backends"))?;
        for addr in only {
            let listed = backends
                .iter()
                .any(|b| b["addr"].as_str().and_then(|a| a.parse().ok()) == Some(*addr));
            if !listed {
                bail!("{what}: the service has no backend {addr}");
            }
        }
        let mut changed = Vec::new();
        for backend in backends.iter_mut() {
            let addr: Option<SocketAddr> = backend["addr"].as_str().and_then(|a| a.parse().ok());
            if only.is_empty() || addr.is_some_and(|a| only.contains(&a)) {
                backend["drain"] = json!(!undo);
                changed.push(backend["addr"].as_str().unwrap_or_default().to_owned());
            }
        }
        let answer = self.call(Method::PUT, &service_path(name), Some(service))?;
        let verb = if undo { "undrained" } else { "draining" };
        self.report(
            &what,
            answer,
            &format!("{name}: {verb} {}", changed.join(", ")),
        )
    }
}

/// `/v1/services/<name>` with the name percent-encoded.
fn service_path(name: &str) -> String {
    let mut path = String::from("/v1/services/");
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            path.push(char::from(byte));
        } else {
            path.push_str(&format!("%{byte:02X}"));
        }
    }
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backends_take_an_optional_weight() {
        assert_eq!(
            parse_backend("10.0.0.5:8080=3").unwrap(),
            ("10.0.0.5:8080".parse().unwrap(), 3)
        );
        assert_eq!(
            parse_backend("[fd00::5]:80").unwrap(),
            ("[fd00::5]:80".parse().unwrap(), 1)
        );
        assert!(parse_backend("10.0.0.5").is_err());
        assert!(parse_backend("10.0.0.5:80=x").is_err());
    }

    #[test]
    fn names_are_percent_encoded() {
        assert_eq!(service_path("web-1.a"), "/v1/services/web-1.a");
        assert_eq!(service_path("a b/c"), "/v1/services/a%20b%2Fc");
    }
}
