//! What translation reads of a Service and of an EndpointSlice, kept in the caches instead of
//! the objects: a watch event's object is turned into its view at once and dropped. At 10,000
//! Services the whole objects (metadata, specs, every optional field) were most of the source's
//! memory, and translation reads a few fields of each.
//!
//! A view keeps exactly what `translate.rs` decides on, already parsed where the parse cannot
//! depend on anything else (IPs, the protocol, the defaults of absent fields). Lists are boxed
//! slices and strings `Box<str>`: no spare capacity in what is kept for the agent's life.

use std::net::IpAddr;
use std::time::Duration;

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::config::{Affinity, Protocol};

// The labels and annotations of Services and EndpointSlices mesh reads: the views keep these.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
pub const LABEL_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Opt-in active health checks on a Service: `tcp` or `http` (EndpointSlice readiness is the
/// health signal otherwise, as for kube-proxy). With a check, passive ejection applies too.
pub const ANNOTATION_HEALTH: &str = "mesh.dev/health-check";
/// The request path of `http` checks (default `/healthz`).
pub const ANNOTATION_HEALTH_PATH: &str = "mesh.dev/health-check-path";

/// (namespace, name).
pub type Key = (String, String);

/// kube-proxy's default ClientIP affinity timeout (3 h).
const DEFAULT_AFFINITY_SECS: i32 = 10_800;

/// An object's cache key: its namespace and name (empty when absent).
pub fn key_of(meta: &ObjectMeta) -> Key {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// What translation reads of a Service.
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceView {
    /// It has the `service.kubernetes.io/headless` label.
    pub headless_label: bool,
    /// Its `service.kubernetes.io/service-proxy-name` label.
    pub proxy_name: Option<Box<str>>,
    /// The `mesh.dev/health-check` and `mesh.dev/health-check-path` annotations.
    pub health_kind: Option<Box<str>>,
    pub health_path: Option<Box<str>>,
    pub spec: Option<SpecView>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SpecView {
    pub external_name: bool,
    /// `clusterIPs` (else `clusterIP`) that parse as IPs.
    pub cluster_ips: Box<[IpAddr]>,
    /// `clusterIP: None`, or no cluster IP that parses.
    pub headless: bool,
    /// `sessionAffinity: ClientIP`, with its timeout.
    pub affinity: Option<Affinity>,
    pub internal_local: bool,
    pub external_local: bool,
    pub health_check_node_port: Option<i32>,
    pub publish_not_ready: bool,
    /// `externalIPs`, then the LoadBalancer ingress IPs that are not `ipMode: Proxy`, as far as
    /// they parse.
    pub external: Box<[IpAddr]>,
    pub ports: Box<[PortView]>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PortView {
    /// Empty when absent.
    pub name: Box<str>,
    /// `None`: neither TCP nor UDP (SCTP).
    pub protocol: Option<Protocol>,
    pub port: i32,
    pub node_port: Option<i32>,
}

impl ServiceView {
    pub fn new(service: &Service) -> Self {
        let meta = &service.metadata;
        let labels = meta.labels.as_ref();
        let annotation = |key: &str| {
            meta.annotations
                .as_ref()
                .and_then(|a| a.get(key))
                .map(|v| v.as_str().into())
        };
        Self {
            headless_label: labels.is_some_and(|l| l.contains_key(LABEL_HEADLESS)),
            proxy_name: labels
                .and_then(|l| l.get(LABEL_PROXY_NAME))
                .map(|v| v.as_str().into()),
            health_kind: annotation(ANNOTATION_HEALTH),
            health_path: annotation(ANNOTATION_HEALTH_PATH),
            spec: service.spec.as_ref().map(|spec| {
                let cluster_ips: Box<[IpAddr]> = match &spec.cluster_ips {
                    Some(ips) => ips.iter().filter_map(|ip| ip.parse().ok()).collect(),
                    None => spec
                        .cluster_ip
                        .iter()
                        .filter_map(|ip| ip.parse().ok())
                        .collect(),
                };
                let headless = spec.cluster_ip.as_deref() == Some("None") || cluster_ips.is_empty();
                let affinity = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
                    let secs = spec
                        .session_affinity_config
                        .as_ref()
                        .and_then(|c| c.client_ip.as_ref())
                        .and_then(|c| c.timeout_seconds)
                        .unwrap_or(DEFAULT_AFFINITY_SECS);
                    Affinity {
                        timeout: Duration::from_secs(u64::try_from(secs.max(1)).unwrap_or(1)),
                    }
                });
                let external = spec
                    .external_ips
                    .iter()
                    .flatten()
                    .filter_map(|ip| ip.parse().ok())
                    .chain(
                        service
                            .status
                            .as_ref()
                            .and_then(|s| s.load_balancer.as_ref())
                            .and_then(|lb| lb.ingress.as_ref())
                            .into_iter()
                            .flatten()
                            .filter(|ingress| ingress.ip_mode.as_deref() != Some("Proxy"))
                            .filter_map(|ingress| ingress.ip.as_deref()?.parse().ok()),
                    )
                    .collect();
                SpecView {
                    external_name: spec.type_.as_deref() == Some("ExternalName"),
                    cluster_ips,
                    headless,
                    affinity,
                    internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
                    external_local: spec.external_traffic_policy.as_deref() == Some("Local"),
                    health_check_node_port: spec.health_check_node_port,
                    publish_not_ready: spec.publish_not_ready_addresses == Some(true),
                    external,
                    ports: spec
                        .ports
                        .iter()
                        .flatten()
                        .map(|port| PortView {
                            name: port.name.as_deref().unwrap_or_default().into(),
                            protocol: match port.protocol.as_deref().unwrap_or("TCP") {
                                "TCP" => Some(Protocol::Tcp),
                                "UDP" => Some(Protocol::Udp),
                                _ => None,
                            },
                            port: port.port,
                            node_port: port.node_port,
                        })
                        .collect(),
                }
            }),
        }
    }
}

/// What translation reads of an EndpointSlice.
#[derive(Clone, Debug, PartialEq)]
pub struct SliceView {
    /// The Service it belongs to: (namespace, `kubernetes.io/service-name`).
    pub owner: Option<Key>,
    /// `addressType` is neither IPv4 nor IPv6 (FQDN): its endpoints are not kept.
    pub fqdn: bool,
    pub ports: Box<[SlicePortView]>,
    /// The endpoints whose first address is an IP, in the slice's order.
    pub endpoints: Box<[EndpointView]>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SlicePortView {
    /// Empty when absent.
    pub name: Box<str>,
    /// `None`: neither TCP nor UDP, so no Service port matches it.
    pub protocol: Option<Protocol>,
    pub port: Option<i32>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct EndpointView {
    pub ip: IpAddr,
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
    pub node: Option<Box<str>>,
    /// Boxed: most endpoints have no hints.
    pub hints: Option<Box<Hints>>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Hints {
    pub zones: Box<[Box<str>]>,
    pub nodes: Box<[Box<str>]>,
}

impl SliceView {
    pub fn new(slice: &EndpointSlice) -> Self {
        let fqdn = slice.address_type != "IPv4" && slice.address_type != "IPv6";
        let endpoints = if fqdn {
            Box::default()
        } else {
            slice
                .endpoints
                .iter()
                .filter_map(|ep| {
                    let ip = ep.addresses.first()?.parse::<IpAddr>().ok()?;
                    let conditions = ep.conditions.as_ref();
                    let hints = ep.hints.as_ref();
                    let zones: Box<[Box<str>]> = hints
                        .and_then(|h| h.for_zones.as_ref())
                        .into_iter()
                        .flatten()
                        .map(|z| z.name.as_str().into())
                        .collect();
                    let nodes: Box<[Box<str>]> = hints
                        .and_then(|h| h.for_nodes.as_ref())
                        .into_iter()
                        .flatten()
                        .map(|n| n.name.as_str().into())
                        .collect();
                    Some(EndpointView {
                        ip,
                        ready: conditions.and_then(|c| c.ready),
                        serving: conditions.and_then(|c| c.serving),
                        terminating: conditions.and_then(|c| c.terminating),
                        node: ep.node_name.as_deref().map(Into::into),
                        hints: (!zones.is_empty() || !nodes.is_empty())
                            .then(|| Box::new(Hints { zones, nodes })),
                    })
                })
                .collect()
        };
        Self {
            owner: owner_of(slice),
            fqdn,
            ports: slice
                .ports
                .iter()
                .flatten()
                .map(|p| SlicePortView {
                    name: p.name.as_deref().unwrap_or_default().into(),
                    protocol: match p.protocol.as_deref().unwrap_or("TCP") {
                        "TCP" => Some(Protocol::Tcp),
                        "UDP" => Some(Protocol::Udp),
                        _ => None,
                    },
                    port: p.port,
                })
                .collect(),
            endpoints,
        }
    }
}

/// The Service an EndpointSlice belongs to: (namespace, `kubernetes.io/service-name`).
fn owner_of(slice: &EndpointSlice) -> Option<Key> {
    let labels = slice.metadata.labels.as_ref();
    Some((
        slice.metadata.namespace.clone()?,
        labels?.get(LABEL_SERVICE_NAME)?.clone(),
    ))
}
