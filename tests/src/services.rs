//! Reading what the agent applied, through `mesh services --bpffs <dir> -o json` (the CLI reads
//! the pinned maps directly).
//!
//! JSON contract with the CLI:
//! `{"services":[{"name":"web","id":1,"vip":"127.100.0.1:80","protocol":"tcp","generation":3,
//!   "slot_count":6,"no_backend":0,"backends":[{"id":1,"addr":"127.0.0.1:8081","slots":1,
//!   "connections":100}]}]}`

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::BpffsDir;

/// `mesh services -o json`, parsed.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ServicesDoc {
    pub services: Vec<ServiceStatus>,
}

/// One service as the datapath has it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub id: u64,
    pub vip: String,
    pub protocol: String,
    pub generation: u64,
    pub slot_count: u64,
    /// Connects to the VIP that found no backend.
    pub no_backend: u64,
    pub backends: Vec<BackendStatus>,
}

/// One backend of a service.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BackendStatus {
    pub id: u64,
    pub addr: String,
    /// Slots of the service's current slot set that point at it (its reduced weight).
    pub slots: u64,
    /// Connections the datapath sent to it.
    pub connections: u64,
}

impl BackendStatus {
    /// `addr` as a socket address; panics if the CLI printed something else.
    pub fn socket_addr(&self) -> SocketAddr {
        self.addr
            .parse()
            .unwrap_or_else(|e| panic!("backend addr {:?} is not IP:PORT: {e}", self.addr))
    }
}

impl ServiceStatus {
    /// The set of backend addresses.
    pub fn backend_addrs(&self) -> BTreeSet<SocketAddr> {
        self.backends
            .iter()
            .map(BackendStatus::socket_addr)
            .collect()
    }

    /// The backend at `addr`, if the service has it.
    pub fn backend(&self, addr: SocketAddr) -> Option<&BackendStatus> {
        self.backends.iter().find(|b| b.socket_addr() == addr)
    }

    /// Connections per backend address.
    pub fn connections(&self) -> BTreeMap<SocketAddr, u64> {
        self.backends
            .iter()
            .map(|b| (b.socket_addr(), b.connections))
            .collect()
    }

    /// Slots per backend address.
    pub fn slots(&self) -> BTreeMap<SocketAddr, u64> {
        self.backends
            .iter()
            .map(|b| (b.socket_addr(), b.slots))
            .collect()
    }
}

impl ServicesDoc {
    pub fn service(&self, name: &str) -> Option<&ServiceStatus> {
        self.services.iter().find(|s| s.name == name)
    }
}

/// Parses the JSON document; the error names the field that breaks the contract.
pub fn parse_services(json: &serde_json::Value) -> Result<ServicesDoc, String> {
    ServicesDoc::deserialize(json).map_err(|e| format!("`mesh services -o json` contract: {e}"))
}

/// Runs `mesh services --bpffs <dir> -o json` and parses its stdout as JSON.
pub fn try_services_json(bpffs: &BpffsDir) -> Result<serde_json::Value, String> {
    let mut cmd = Command::new(crate::mesh_bin());
    cmd.arg("services")
        .arg("--bpffs")
        .arg(bpffs.path())
        .args(["-o", "json"]);
    let out = crate::process::run_bounded(&mut cmd, Duration::from_secs(10))
        .map_err(|e| format!("`mesh services`: {e}"))?;
    if !out.status.success() {
        return Err(format!("`mesh services` failed: {}", out.describe()));
    }
    serde_json::from_str(&out.stdout).map_err(|e| {
        format!(
            "`mesh services -o json` printed invalid JSON ({e}): {}",
            out.stdout
        )
    })
}

/// [`try_services_json`], panicking on failure.
pub fn services_json(bpffs: &BpffsDir) -> serde_json::Value {
    try_services_json(bpffs).unwrap_or_else(|e| panic!("{e}"))
}

/// All services, typed. Panics on failure or contract mismatch.
pub fn services(bpffs: &BpffsDir) -> ServicesDoc {
    parse_services(&services_json(bpffs)).unwrap_or_else(|e| panic!("{e}"))
}

/// One service by name. Panics if it is not there.
pub fn service_status(bpffs: &BpffsDir, name: &str) -> ServiceStatus {
    let doc = services(bpffs);
    doc.service(name)
        .cloned()
        .unwrap_or_else(|| panic!("`mesh services` has no service {name:?}: {doc:#?}"))
}

/// Polls `mesh services` until service `service` has exactly the backend addresses `addrs`;
/// returns how long that took. Panics with the last state seen after `timeout`.
pub fn wait_for_backends(
    bpffs: &BpffsDir,
    service: &str,
    addrs: &[SocketAddr],
    timeout: Duration,
) -> Duration {
    let want: BTreeSet<SocketAddr> = addrs.iter().copied().collect();
    let start = Instant::now();
    let mut last = String::from("nothing read yet");
    let done = crate::wait_until(timeout, || {
        let doc = match try_services_json(bpffs).and_then(|json| parse_services(&json)) {
            Ok(doc) => doc,
            Err(e) => {
                last = e;
                return false;
            }
        };
        match doc.service(service) {
            Some(status) if status.backend_addrs() == want => true,
            Some(status) => {
                last = format!("{status:#?}");
                false
            }
            None => {
                last = format!("no service {service:?} in {doc:#?}");
                false
            }
        }
    });
    let took = start.elapsed();
    assert!(
        done,
        "service {service:?} did not get backends {want:?} within {timeout:?}; last seen: {last}"
    );
    took
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"{"services":[{"name":"web","id":1,"vip":"127.100.0.1:80",
        "protocol":"tcp","generation":3,"slot_count":6,"no_backend":0,
        "backends":[{"id":1,"addr":"127.0.0.1:8081","slots":1,"connections":100},
                    {"id":2,"addr":"127.0.0.1:8082","slots":2,"connections":7}]}]}"#;

    #[test]
    fn parses_the_contract_example() {
        let json: serde_json::Value = serde_json::from_str(EXAMPLE).expect("valid JSON");
        let doc = parse_services(&json).expect("matches contract");
        let web = doc.service("web").expect("web");
        assert_eq!(web.vip, "127.100.0.1:80");
        assert_eq!(web.slot_count, 6);
        let a: SocketAddr = "127.0.0.1:8081".parse().expect("addr");
        let b: SocketAddr = "127.0.0.1:8082".parse().expect("addr");
        assert_eq!(web.backend_addrs(), BTreeSet::from([a, b]));
        assert_eq!(web.connections(), BTreeMap::from([(a, 100), (b, 7)]));
        assert_eq!(web.backend(b).map(|b| b.slots), Some(2));
        assert!(doc.service("db").is_none());
    }

    #[test]
    fn extra_fields_are_fine_missing_ones_are_named() {
        let json = serde_json::json!({"services": [{"name": "web", "id": 1, "vip": "x",
            "protocol": "tcp", "generation": 1, "slot_count": 0, "no_backend": 0,
            "backends": [], "health": "whatever"}]});
        assert!(parse_services(&json).is_ok());
        let json = serde_json::json!({"services": [{"name": "web"}]});
        let err = parse_services(&json).expect_err("missing fields");
        assert!(err.contains("missing field"), "{err}");
    }

    #[test]
    fn ipv6_backend_addresses_compare_as_addresses() {
        let json = serde_json::json!({"services": [{"name": "v6", "id": 1, "vip": "[::1]:80",
            "protocol": "tcp", "generation": 1, "slot_count": 1, "no_backend": 0,
            "backends": [{"id": 1, "addr": "[0:0:0:0:0:0:0:1]:8080", "slots": 1,
                          "connections": 0}]}]});
        let doc = parse_services(&json).expect("parses");
        let want: SocketAddr = "[::1]:8080".parse().expect("addr");
        assert_eq!(doc.services[0].backend_addrs(), BTreeSet::from([want]));
    }
}
