//! Kubernetes objects -> mesh services, with kube-proxy's semantics for clients on this node.
//! Pure: (Services, EndpointSlices as `objects` keeps them, this Node, settings) -> services and
//! what was skipped.
//!
//! Per Service port and protocol, every VIP a local client can dial becomes one mesh service:
//! each of `clusterIPs`, each `externalIPs` entry, each `status.loadBalancer.ingress` IP (unless
//! `ipMode: Proxy`), and the NodePort on each of this node's addresses and on 127.0.0.1.
//! Endpoints follow pkg/proxy/topology.go: ready endpoints serve; when none is usable,
//! serving-and-terminating ones do (decided separately for the Cluster and the Local set);
//! topology hints apply only when every ready endpoint carries them and one matches this node
//! (PreferSameNode) or zone (PreferSameZone). For traffic from other hosts, the NodePort on each
//! of this node's IPv4 addresses, each ExternalIP and LoadBalancer IP is also an external
//! service (matched by the TC programs) with the Cluster or the Local set as
//! `externalTrafficPolicy` says, and the Local ones carry `healthCheckNodePort` with the count
//! of ready local endpoints. The cluster IP uses the Local set with
//! `internalTrafficPolicy: Local`. External VIPs dialled from this node use the Cluster set, as
//! kube-proxy short-circuits node-local traffic to external destinations. Endpoints that are
//! not used but still terminating stay as draining members: no new connections, and their
//! connected UDP sockets are not terminated.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

use k8s_openapi::api::core::v1::Node;
use mesh_common::SERVICE_NAME_LEN;

use super::objects::{Key, PortView, ServiceView, SliceView};
use crate::config::{
    BackendConfig, EmptyPolicy, ExternalPolicy, HealthCheckNodePort, HealthConfig, HealthKind,
    Protocol, ServiceConfig,
};

pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";

/// What the node and the agent's settings contribute.
#[derive(Clone, Debug, Default)]
pub struct NodeView {
    pub name: String,
    /// `topology.kubernetes.io/zone` of this node, if set.
    pub zone: Option<String>,
    /// This node's InternalIP and ExternalIP addresses (NodePorts listen there).
    pub addresses: Vec<IpAddr>,
}

impl NodeView {
    pub fn from_node(name: &str, node: Option<&Node>) -> Self {
        let zone = node
            .and_then(|n| n.metadata.labels.as_ref())
            .and_then(|labels| labels.get(LABEL_ZONE).cloned());
        let addresses = node
            .and_then(|n| n.status.as_ref())
            .and_then(|s| s.addresses.as_ref())
            .map(|addresses| {
                addresses
                    .iter()
                    .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
                    .filter_map(|a| a.address.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        Self {
            name: name.to_owned(),
            zone,
            addresses,
        }
    }
}

/// Which Services this agent serves, as kube-proxy's `--service-proxy-name` decides.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Empty: only Services without the `service-proxy-name` label.
    pub service_proxy_name: String,
}

/// The translation of everything watched.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Translation {
    pub services: Vec<ServiceConfig>,
    /// Why objects (or ports of them) were left out: reason -> how many.
    pub skipped: BTreeMap<&'static str, usize>,
}

/// One endpoint as kube-proxy sees it.
#[derive(Clone, Debug)]
struct Endpoint {
    addr: SocketAddr,
    ready: bool,
    serving: bool,
    terminating: bool,
    node: Option<String>,
    zones: BTreeSet<String>,
    nodes: BTreeSet<String>,
}

impl Endpoint {
    fn is_local(&self, node: &NodeView) -> bool {
        self.node.as_deref() == Some(node.name.as_str())
    }
}

#[cfg(test)]
use {
    super::objects::key_of,
    k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice},
    std::time::Duration,
};

#[cfg(test)]
/// Translates every Service with its slices, from the objects as the API server sends them.
pub fn translate(
    services: &[Service],
    slices: &[EndpointSlice],
    node: &NodeView,
    filter: &Filter,
) -> Translation {
    let slices: Vec<SliceView> = slices.iter().map(SliceView::new).collect();
    let mut by_service: BTreeMap<Key, Vec<&SliceView>> = BTreeMap::new();
    for slice in &slices {
        if let Some(owner) = &slice.owner {
            by_service.entry(owner.clone()).or_default().push(slice);
        }
    }
    let mut out = Translation::default();
    for service in services {
        let key = key_of(&service.metadata);
        let slices = by_service.get(&key).map(Vec::as_slice).unwrap_or(&[]);
        translate_service(
            &key,
            &ServiceView::new(service),
            slices,
            node,
            filter,
            &mut out,
        );
    }
    out.services.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Translates one Service (`key`: its namespace and name) with its slices.
pub fn translate_one(
    key: &Key,
    service: &ServiceView,
    slices: &[&SliceView],
    node: &NodeView,
    filter: &Filter,
) -> Translation {
    let mut out = Translation::default();
    translate_service(key, service, slices, node, filter, &mut out);
    out
}

fn skip(out: &mut Translation, reason: &'static str) {
    *out.skipped.entry(reason).or_default() += 1;
}

fn translate_service(
    (ns, name): &Key,
    service: &ServiceView,
    slices: &[&SliceView],
    node: &NodeView,
    filter: &Filter,
    out: &mut Translation,
) {
    if service.headless_label {
        return skip(out, "headless label");
    }
    match service.proxy_name.as_deref() {
        Some(name) if name != filter.service_proxy_name => {
            return skip(out, "another service-proxy-name");
        }
        None if !filter.service_proxy_name.is_empty() => {
            return skip(out, "another service-proxy-name");
        }
        _ => {}
    }
    let Some(spec) = &service.spec else {
        return skip(out, "no spec");
    };
    if spec.external_name {
        return skip(out, "ExternalName");
    }
    if spec.headless {
        return skip(out, "headless (clusterIP None)");
    }
    let cluster_ips = &*spec.cluster_ips;
    let affinity = &spec.affinity;
    let health = match health_from_annotations(service) {
        Ok(health) => health,
        Err(reason) => {
            skip(out, reason);
            None
        }
    };
    let internal_local = spec.internal_local;
    let external_policy = if spec.external_local {
        ExternalPolicy::Local
    } else {
        ExternalPolicy::Cluster
    };
    let health_check_port = spec
        .health_check_node_port
        .and_then(|p| u16::try_from(p).ok())
        .filter(|&p| p != 0 && external_policy == ExternalPolicy::Local);
    let publish_not_ready = spec.publish_not_ready;
    let external = &*spec.external;
    for port in spec.ports.iter() {
        let Some(protocol) = port.protocol else {
            skip(out, "protocol other than TCP and UDP (SCTP)");
            continue;
        };
        let Ok(port_number) = u16::try_from(port.port) else {
            skip(out, "port out of range");
            continue;
        };
        let endpoints = endpoints_for(port, protocol, slices, publish_not_ready, out);
        let base = format!(
            "{ns}/{name}:{}",
            Some(&*port.name)
                .filter(|n| !n.is_empty())
                .map_or_else(|| port.port.to_string(), str::to_owned)
        );
        // kube-proxy runs one proxier per IP family: each categorizes its family's endpoints.
        let family = |v4: bool| -> Vec<Endpoint> {
            endpoints
                .iter()
                .filter(|e| e.addr.is_ipv4() == v4)
                .cloned()
                .collect()
        };
        let (v4_all, v6_all) = (family(true), family(false));
        let (v4_cluster, v4_local) = categorize(&v4_all, node);
        let (v6_cluster, v6_local) = categorize(&v6_all, node);
        let sets = |ip: &IpAddr| {
            if ip.is_ipv4() {
                (&v4_cluster, &v4_local, &v4_all)
            } else {
                (&v6_cluster, &v6_local, &v6_all)
            }
        };
        // (VIP, the endpoints it uses, every endpoint of its family)
        let mut vips: Vec<(SocketAddr, &[Endpoint], &[Endpoint])> = Vec::new();
        for ip in cluster_ips {
            let (cluster, local, all) = sets(ip);
            let set = if internal_local { local } else { cluster };
            vips.push((SocketAddr::new(*ip, port_number), set, all));
        }
        for ip in external {
            let (cluster, _, all) = sets(ip);
            vips.push((SocketAddr::new(*ip, port_number), cluster, all));
        }
        if let Some(node_port) = port.node_port.and_then(|p| u16::try_from(p).ok()) {
            let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
            for ip in node.addresses.iter().chain([&loopback]) {
                let (cluster, _, all) = sets(ip);
                vips.push((SocketAddr::new(*ip, node_port), cluster, all));
            }
        }
        let mut seen = BTreeSet::new();
        for (i, (vip, set, all)) in vips.into_iter().enumerate() {
            if !seen.insert(vip) {
                continue;
            }
            let name = if i == 0 {
                base.clone()
            } else {
                format!("{base}@{}:{}", vip.ip(), vip.port())
            };
            out.services.push(ServiceConfig {
                name: fit_name(&name),
                vip,
                protocol,
                backends: members(set, all),
                on_empty: EmptyPolicy::Reject,
                affinity: affinity.clone(),
                health: health.clone(),
                terminate_udp_flows: true,
                external: None,
                health_check_node_port: None,
            });
        }
        // Traffic from other hosts (the TC programs, IPv4): the NodePort on this node's
        // addresses, the ExternalIPs and the LoadBalancer IPs, each an external service with
        // the endpoints externalTrafficPolicy picks (Local: this node's only).
        let mut outside: Vec<SocketAddr> = external
            .iter()
            .map(|ip| SocketAddr::new(*ip, port_number))
            .collect();
        if let Some(node_port) = port.node_port.and_then(|p| u16::try_from(p).ok()) {
            outside.extend(
                node.addresses
                    .iter()
                    .map(|ip| SocketAddr::new(*ip, node_port)),
            );
        }
        let mut seen = BTreeSet::new();
        for vip in outside {
            if !vip.is_ipv4() || !seen.insert(vip) {
                continue;
            }
            let (cluster, local, all) = sets(&vip.ip());
            let set = match external_policy {
                ExternalPolicy::Local => local,
                ExternalPolicy::Cluster => cluster,
            };
            out.services.push(ServiceConfig {
                name: fit_name(&format!("{base}@ext/{}:{}", vip.ip(), vip.port())),
                vip,
                protocol,
                backends: members(set, all),
                on_empty: EmptyPolicy::Reject,
                // ClientIP affinity by the client's address, at the TC programs.
                affinity: affinity.clone(),
                health: health.clone(),
                terminate_udp_flows: true,
                external: Some(external_policy),
                // kube-proxy counts only ready local endpoints: a node left with terminating
                // ones answers 503.
                health_check_node_port: health_check_port.map(|port| HealthCheckNodePort {
                    port,
                    local_endpoints: Some(
                        u32::try_from(all.iter().filter(|e| e.is_local(node) && e.ready).count())
                            .unwrap_or(u32::MAX),
                    ),
                }),
            });
        }
    }
}

/// Active checks the Service's annotations ask for; an unknown kind is reported and ignored.
fn health_from_annotations(service: &ServiceView) -> Result<Option<HealthConfig>, &'static str> {
    let Some(kind) = service.health_kind.as_deref() else {
        return Ok(None);
    };
    let kind = match kind {
        "tcp" => HealthKind::Tcp,
        "http" => HealthKind::Http,
        _ => return Err("unknown mesh.dev/health-check annotation (tcp or http), ignored"),
    };
    let mut health = HealthConfig {
        kind,
        ..HealthConfig::default()
    };
    if let Some(path) = service.health_path.as_deref() {
        health.path = path.to_owned();
    }
    Ok(Some(health))
}

/// The endpoints of one Service port over all its slices: the slice port with the Service
/// port's name and protocol gives the number (named target ports differ per slice). The first
/// address of each endpoint counts, as in kube-proxy; an address seen twice counts once.
fn endpoints_for(
    port: &PortView,
    protocol: Protocol,
    slices: &[&SliceView],
    publish_not_ready: bool,
    out: &mut Translation,
) -> Vec<Endpoint> {
    let mut endpoints: BTreeMap<SocketAddr, Endpoint> = BTreeMap::new();
    for slice in slices {
        if slice.fqdn {
            skip(out, "FQDN EndpointSlice");
            continue;
        }
        let Some(slice_port) = slice
            .ports
            .iter()
            .find(|p| p.name == port.name && p.protocol == Some(protocol))
        else {
            continue;
        };
        let Some(number) = slice_port.port.and_then(|p| u16::try_from(p).ok()) else {
            continue;
        };
        for ep in slice.endpoints.iter() {
            let ready = publish_not_ready || ep.ready.unwrap_or(true);
            let serving = ep.serving.unwrap_or(ready);
            let terminating = ep.terminating.unwrap_or(false);
            let hints = ep.hints.as_deref();
            let endpoint = Endpoint {
                addr: SocketAddr::new(ep.ip, number),
                ready,
                serving,
                terminating,
                node: ep.node.as_deref().map(str::to_owned),
                zones: hints
                    .into_iter()
                    .flat_map(|h| h.zones.iter())
                    .map(|z| z.to_string())
                    .collect(),
                nodes: hints
                    .into_iter()
                    .flat_map(|h| h.nodes.iter())
                    .map(|n| n.to_string())
                    .collect(),
            };
            // A ready copy wins over a not-ready one (an endpoint moving between slices).
            match endpoints.get(&endpoint.addr) {
                Some(existing) if existing.ready || !endpoint.ready => {}
                _ => {
                    endpoints.insert(endpoint.addr, endpoint);
                }
            }
        }
    }
    endpoints.into_values().collect()
}

/// kube-proxy's topology mode from the hints of the ready endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topology {
    None,
    SameNode,
    SameZone,
}

fn topology_mode(endpoints: &[Endpoint], node: &NodeView) -> Topology {
    let ready: Vec<&Endpoint> = endpoints.iter().filter(|e| e.ready).collect();
    if ready.is_empty() {
        return Topology::None;
    }
    if ready.iter().all(|e| !e.nodes.is_empty())
        && ready.iter().any(|e| e.nodes.contains(&node.name))
    {
        return Topology::SameNode;
    }
    let zone = node.zone.as_deref().unwrap_or_default();
    if ready.iter().all(|e| !e.zones.is_empty()) && ready.iter().any(|e| e.zones.contains(zone)) {
        return Topology::SameZone;
    }
    Topology::None
}

fn available(endpoint: &Endpoint, mode: Topology, node: &NodeView) -> bool {
    match mode {
        Topology::None => true,
        Topology::SameNode => endpoint.nodes.contains(&node.name),
        Topology::SameZone => endpoint
            .zones
            .contains(node.zone.as_deref().unwrap_or_default()),
    }
}

/// (Cluster set, Local set) of usable endpoints, as `CategorizeEndpoints` computes them.
fn categorize(endpoints: &[Endpoint], node: &NodeView) -> (Vec<Endpoint>, Vec<Endpoint>) {
    let mode = topology_mode(endpoints, node);
    let mut cluster: Vec<Endpoint> = endpoints
        .iter()
        .filter(|e| e.ready && available(e, mode, node))
        .cloned()
        .collect();
    if cluster.is_empty() {
        cluster = endpoints
            .iter()
            .filter(|e| e.serving && e.terminating)
            .cloned()
            .collect();
    }
    let local_ready: Vec<Endpoint> = endpoints
        .iter()
        .filter(|e| e.is_local(node) && e.ready)
        .cloned()
        .collect();
    let local = if local_ready.is_empty() {
        endpoints
            .iter()
            .filter(|e| e.is_local(node) && e.serving && e.terminating)
            .cloned()
            .collect()
    } else {
        local_ready
    };
    (cluster, local)
}

/// The set's endpoints as active members, plus every other terminating endpoint of the VIP's
/// family as a draining one (established connections go on, nothing new reaches it).
fn members(set: &[Endpoint], all: &[Endpoint]) -> Vec<BackendConfig> {
    let used: BTreeSet<SocketAddr> = set.iter().map(|e| e.addr).collect();
    let active = set.iter().map(|e| BackendConfig {
        addr: e.addr,
        weight: 1,
        drain: false,
    });
    let draining = all
        .iter()
        .filter(|e| e.terminating && !used.contains(&e.addr))
        .map(|e| BackendConfig {
            addr: e.addr,
            weight: 1,
            drain: true,
        });
    active.chain(draining).collect()
}

/// Names longer than the kernel's name buffer keep their start and a hash of the whole, so
/// they stay unique and recognisable.
fn fit_name(name: &str) -> String {
    let max = SERVICE_NAME_LEN - 1;
    if name.len() <= max {
        return name.to_owned();
    }
    // FNV-1a: stable across builds, so a restarted agent names the service the same.
    let hash = name.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    let suffix = format!("~{hash:08x}");
    let mut cut = max - suffix.len();
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{suffix}", &name[..cut])
}

#[cfg(test)]
mod tests;
