//! A client for the agent's admin API (`[agent] admin`): one request per connection, JSON
//! bodies, over [`crate::http`].

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use crate::http::Response;

/// Every request is bounded by this.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// A loopback address with a port that was free a moment ago (for `[agent] admin`).
pub fn free_loopback_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral loopback port");
    listener.local_addr().expect("local address")
}

/// `method path` with an optional JSON body.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<Response> {
    crate::http::request(addr, method, path, body, TIMEOUT)
}

/// The admin API of one agent.
#[derive(Debug, Clone, Copy)]
pub struct AdminApi {
    pub addr: SocketAddr,
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
    #[track_caller]
    fn call(&self, method: &str, path: &str, body: Option<&str>) -> JsonResponse {
        let response = request(self.addr, method, path, body)
            .unwrap_or_else(|e| panic!("{method} {path} on {}: {e}", self.addr));
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
