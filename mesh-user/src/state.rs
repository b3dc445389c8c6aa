//! Desired state: what the data path should hold, built from the registry sources and health.
//! Pure data; no I/O.

use std::{collections::BTreeMap, fmt, net::SocketAddr};

use mesh_common::{PROTO_TCP, PROTO_UDP, SVC_F_AFFINITY, SVC_F_REJECT_EMPTY};

use crate::{
    config::{Config, EmptyPolicy, ServiceConfig},
    slots,
};

/// What a client connects to: a virtual IP, port and protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Vip {
    pub addr: SocketAddr,
    /// IP protocol number (`PROTO_TCP` or `PROTO_UDP`).
    pub proto: u8,
}

impl Vip {
    pub fn protocol_name(&self) -> &'static str {
        protocol_name(self.proto)
    }
}

pub fn protocol_name(proto: u8) -> &'static str {
    match proto {
        PROTO_TCP => "tcp",
        PROTO_UDP => "udp",
        _ => "unknown",
    }
}

impl fmt::Display for Vip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.protocol_name())
    }
}

/// A backend as a member of one service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub addr: SocketAddr,
    pub weight: u32,
    /// Receives new connections: not draining and not ejected by health checks.
    pub active: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredService {
    pub name: String,
    /// `SVC_F_*` bits.
    pub flags: u32,
    pub affinity_timeout_secs: u32,
    /// Every configured backend, in registry order (inactive ones keep their counters).
    pub members: Vec<Member>,
}

impl DesiredService {
    /// The weighted round-robin sequence over the active members.
    pub fn slot_layout(&self) -> Vec<SocketAddr> {
        let active: Vec<&Member> = self.members.iter().filter(|m| m.active).collect();
        let weights: Vec<u32> = active.iter().map(|m| m.weight).collect();
        slots::layout(&weights)
            .into_iter()
            .map(|i| active[i].addr)
            .collect()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub services: BTreeMap<Vip, DesiredService>,
}

impl DesiredState {
    /// The state the registry asks for, with every non-draining backend active. Health checks
    /// then deactivate members (see `health`).
    pub fn from_config(config: &Config) -> Self {
        let services = config
            .services
            .iter()
            .map(|svc| (vip_of(svc), desired_service(svc)))
            .collect();
        Self { services }
    }
}

pub fn vip_of(svc: &ServiceConfig) -> Vip {
    Vip {
        addr: svc.vip,
        proto: svc.protocol.ip_proto(),
    }
}

fn desired_service(svc: &ServiceConfig) -> DesiredService {
    let mut flags = 0;
    if svc.on_empty == EmptyPolicy::Reject {
        flags |= SVC_F_REJECT_EMPTY;
    }
    let mut affinity_timeout_secs = 0;
    if let Some(affinity) = &svc.affinity {
        flags |= SVC_F_AFFINITY;
        affinity_timeout_secs = u32::try_from(affinity.timeout.as_secs()).unwrap_or(u32::MAX);
    }
    DesiredService {
        name: svc.name.clone(),
        flags,
        affinity_timeout_secs,
        members: svc
            .backends
            .iter()
            .map(|b| Member {
                addr: b.addr,
                weight: b.weight,
                active: !b.drain,
            })
            .collect(),
    }
}
