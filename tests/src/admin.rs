//! A client for the agent's admin API: on its Unix socket (`[agent] admin_socket`, what the
//! harness gives every agent), or on the TCP listener (`[agent] admin`) with a bearer token.
//! One request per connection, JSON bodies.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::time::Duration;

use crate::http::Response;

/// Every request is bounded by this.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// A loopback address with a port that was free a moment ago (for `[agent] admin`).
pub fn free_loopback_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral loopback port");
    listener.local_addr().expect("local address")
}

/// Where an admin API listens.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// The Unix socket.
    Socket(PathBuf),
    /// The TCP listener; `token` is sent as `Authorization: Bearer <token>` when given.
    Tcp {
        addr: SocketAddr,
        token: Option<String>,
    },
}

/// `method path` on `endpoint` with an optional JSON body. Any status is a response.
pub fn request_on(
    endpoint: &Endpoint,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<Response> {
    let io = |e: reqwest::Error| std::io::Error::other(format!("{e:?}"));
    // No pool and no proxy, like `crate::http`; a client per request is cheap enough here.
    let builder = reqwest::blocking::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(0)
        .timeout(TIMEOUT);
    let (client, url, token) = match endpoint {
        Endpoint::Socket(socket) => (
            builder.unix_socket(socket.clone()).build().map_err(io)?,
            format!("http://localhost{path}"),
            None,
        ),
        Endpoint::Tcp { addr, token } => (
            builder.build().map_err(io)?,
            format!("http://{addr}{path}"),
            token.as_deref(),
        ),
    };
    let method = reqwest::Method::from_bytes(method.as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut request = client.request(method, url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_owned());
    }
    let response = request.send().map_err(io)?;
    let status = response.status().as_u16();
    let body = response.text().map_err(io)?;
    Ok(Response { status, body })
}

/// The admin API of one agent.
#[derive(Debug, Clone)]
pub struct AdminApi {
    pub endpoint: Endpoint,
}

/// A response with its body parsed as JSON.
#[derive(Debug, Clone)]
pub struct JsonResponse {
    pub status: u16,
    pub body: serde_json::Value,
    pub raw: String,
}

impl JsonResponse {
    /// The `error` string of an error response ("" if there is none).
    pub fn error(&self) -> &str {
        self.body["error"].as_str().unwrap_or_default()
    }
}

impl AdminApi {
    /// The API on the Unix socket at `path`.
    pub fn socket(path: impl Into<PathBuf>) -> AdminApi {
        AdminApi {
            endpoint: Endpoint::Socket(path.into()),
        }
    }

    #[track_caller]
    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> JsonResponse {
        let response = request_on(&self.endpoint, method, path, body)
            .unwrap_or_else(|e| panic!("{method} {path} on {:?}: {e}", self.endpoint));
        let body = serde_json::from_str(&response.body).unwrap_or_else(|e| {
            panic!(
                "{method} {path}: HTTP {} with a body that is not JSON ({e}): {}",
                response.status, response.body
            )
        });
        JsonResponse {
            status: response.status,
            body,
            raw: response.body,
        }
    }

    /// `GET /v1/services`.
    #[track_caller]
    pub fn list(&self) -> JsonResponse {
        self.call("GET", "/v1/services", None)
    }

    /// `(source, name)` of every service `GET /v1/services` lists.
    #[track_caller]
    pub fn names(&self) -> Vec<(String, String)> {
        let list = self.list();
        assert_eq!(list.status, 200, "GET /v1/services: {}", list.raw);
        list.body["services"]
            .as_array()
            .unwrap_or_else(|| panic!("no services array: {}", list.raw))
            .iter()
            .map(|entry| {
                (
                    entry["source"].as_str().unwrap_or_default().to_owned(),
                    entry["service"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                )
            })
            .collect()
    }

    /// `PUT /v1/services/{name}` with `body`.
    #[track_caller]
    pub fn put(&self, name: &str, body: &str) -> JsonResponse {
        self.call("PUT", &format!("/v1/services/{name}"), Some(body))
    }

    /// `DELETE /v1/services/{name}`.
    #[track_caller]
    pub fn delete(&self, name: &str) -> JsonResponse {
        self.call("DELETE", &format!("/v1/services/{name}"), None)
    }
}
