//! The Kubernetes source: Services, EndpointSlices and this node's Node as JSON (as the API
//! server sends them; k8s-openapi's types, as kube decodes them) -> the per-Service
//! translation (`Translated`, `translate.rs`) -> the check of each service alone
//! (`valid_alone`) -> the registry, as the source's update. The input is one JSON object:
//! `{"services": [...], "slices": [...], "node": {...}, "proxy_name": "..."}`.
//!
//! Beyond not panicking: translating everything and translating object by object agree, every
//! VIP is an address and port the objects name (or the node's, or 127.0.0.1 for a NodePort),
//! every backend an endpoint address and port of a slice, and names fit the kernel's buffer.

#![no_main]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use k8s_openapi::api::{core::v1::Node, core::v1::Service, discovery::v1::EndpointSlice};
use libfuzzer_sys::fuzz_target;
use mesh_user::fuzzing::{
    Config, Filter, NodeView, ServiceConfig, ServiceView, SliceView, Source, SourceObserver,
    Translated, parse, valid_alone,
};

#[derive(serde::Deserialize)]
struct Input {
    #[serde(default)]
    services: Vec<Service>,
    #[serde(default)]
    slices: Vec<EndpointSlice>,
    node: Option<Node>,
    #[serde(default)]
    proxy_name: String,
}

struct Quiet;

impl SourceObserver for Quiet {
    fn source_state(&self, _: &str, _: bool, _: usize) {}
    fn config_rejected(&self) {}
    fn skipped(&self, _: &str, _: &str, _: usize) {}
}

type Key = (String, String);

fn key(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Key {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

fn ips<'a>(texts: impl IntoIterator<Item = &'a String>) -> impl Iterator<Item = IpAddr> {
    texts.into_iter().filter_map(|t| t.parse().ok())
}

fuzz_target!(|data: &[u8]| {
    let Ok(input) = serde_json::from_slice::<Input>(data) else {
        return;
    };
    // The watchers' caches: one object per (namespace, name), the last one wins.
    let services: BTreeMap<Key, Service> = input
        .services
        .into_iter()
        .map(|s| (key(&s.metadata), s))
        .collect();
    let slices: BTreeMap<Key, EndpointSlice> = input
        .slices
        .into_iter()
        .map(|s| (key(&s.metadata), s))
        .collect();
    let node = NodeView::from_node("node-a", input.node.as_ref());
    let filter = Filter {
        service_proxy_name: input.proxy_name,
    };
    let agent = parse(mesh_fuzz::FILE_CONFIG, "fuzz").unwrap().agent;

    // What the caches keep of each object.
    let service_views: BTreeMap<Key, ServiceView> = services
        .iter()
        .map(|(k, s)| (k.clone(), ServiceView::new(s)))
        .collect();
    let slice_views: BTreeMap<Key, SliceView> = slices
        .iter()
        .map(|(k, s)| (k.clone(), SliceView::new(s)))
        .collect();

    let mut all = Translated::default();
    all.everything_changed();
    all.refresh(&service_views, &slice_views, &node, &filter, |svc| {
        valid_alone(&agent, &Quiet, svc)
    });
    let translated: Vec<ServiceConfig> = all.services().cloned().collect();

    // Object by object, as watch events arrive.
    let mut events = Translated::default();
    for (k, slice) in &slice_views {
        events.slice_changed(k, None, Some(slice));
    }
    for k in services.keys() {
        events.service_changed(k.clone());
    }
    events.refresh(&service_views, &slice_views, &node, &filter, |svc| {
        valid_alone(&agent, &Quiet, svc)
    });
    let by_event: Vec<ServiceConfig> = events.services().cloned().collect();
    assert_eq!(
        translated, by_event,
        "event by event differs from everything"
    );
    assert_eq!(all.skipped(), events.skipped());

    // Every VIP comes from the objects.
    let mut vip_ips: BTreeSet<IpAddr> = BTreeSet::new();
    let mut vip_ports: BTreeSet<i32> = BTreeSet::new();
    for svc in services.values() {
        let Some(spec) = &svc.spec else { continue };
        vip_ips.extend(ips(spec.cluster_ip.iter()));
        vip_ips.extend(ips(spec.cluster_ips.iter().flatten()));
        vip_ips.extend(ips(spec.external_ips.iter().flatten()));
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        vip_ips.extend(ips(ingress
            .into_iter()
            .flatten()
            .filter_map(|i| i.ip.as_ref())));
        for port in spec.ports.iter().flatten() {
            vip_ports.insert(port.port);
            vip_ports.extend(port.node_port);
        }
    }
    let node_ips: BTreeSet<IpAddr> = input
        .node
        .as_ref()
        .and_then(|n| n.status.as_ref())
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|a| a.address.parse().ok())
        .chain([IpAddr::V4(Ipv4Addr::LOCALHOST)])
        .collect();
    // Every backend is an endpoint of a slice.
    let mut endpoint_ips: BTreeSet<IpAddr> = BTreeSet::new();
    let mut endpoint_ports: BTreeSet<i32> = BTreeSet::new();
    for slice in slices.values() {
        endpoint_ips.extend(ips(slice
            .endpoints
            .iter()
            .flat_map(|e| e.addresses.first())));
        endpoint_ports.extend(slice.ports.iter().flatten().filter_map(|p| p.port));
    }
    for svc in &translated {
        let ip = svc.vip.ip();
        assert!(
            vip_ips.contains(&ip) || node_ips.contains(&ip),
            "VIP {} is in no object",
            svc.vip
        );
        assert!(
            vip_ports.contains(&i32::from(svc.vip.port())),
            "VIP port {}",
            svc.vip
        );
        assert!(
            svc.name.len() < mesh_common::SERVICE_NAME_LEN,
            "{:?}",
            svc.name
        );
        for backend in &svc.backends {
            assert!(
                endpoint_ips.contains(&backend.addr.ip()),
                "{}",
                backend.addr
            );
            assert!(endpoint_ports.contains(&i32::from(backend.addr.port())));
            assert_eq!(backend.addr.is_ipv4(), svc.vip.is_ipv4(), "families mix");
        }
        let alone = Config {
            agent: agent.clone(),
            services: vec![svc.clone()],
        };
        alone
            .validate("again")
            .expect("a kept service is valid alone");
    }
    mesh_fuzz::check_update(Source::Kubernetes, translated);
});
