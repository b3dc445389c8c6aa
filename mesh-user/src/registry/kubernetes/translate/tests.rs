//! kube-proxy semantics, case by case, from objects shaped as the API server returns them.

use serde_json::{Value, json};

use super::*;
use crate::registry::kubernetes::objects::{
    ANNOTATION_HEALTH, ANNOTATION_HEALTH_PATH, LABEL_HEADLESS, LABEL_PROXY_NAME,
};

fn node() -> NodeView {
    NodeView {
        name: "node-a".into(),
        zone: Some("zone-1".into()),
        addresses: vec!["127.10.0.1".parse().unwrap()],
    }
}

fn service(name: &str, spec: Value) -> Service {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default", "resourceVersion": "1"},
        "spec": spec,
    }))
    .unwrap()
}

fn slice(service: &str, name: &str, family: &str, ports: Value, endpoints: Value) -> EndpointSlice {
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "default",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": family, "ports": ports, "endpoints": endpoints,
    }))
    .unwrap()
}

fn ep(ip: &str, node: &str, conditions: Value) -> Value {
    json!({"addresses": [ip], "nodeName": node, "conditions": conditions})
}

fn ready(ip: &str, node: &str) -> Value {
    ep(
        ip,
        node,
        json!({"ready": true, "serving": true, "terminating": false}),
    )
}

fn http_port() -> Value {
    json!([{"name": "http", "port": 8080, "protocol": "TCP"}])
}

fn web(extra: Value) -> Service {
    let mut spec = json!({"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                          "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"}]});
    spec.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    service("web", spec)
}

fn run(services: &[Service], slices: &[EndpointSlice]) -> Translation {
    translate(services, slices, &node(), &Filter::default())
}

/// (vip, active backends, draining backends) per mesh service.
fn view(t: &Translation) -> Vec<(String, String, Vec<String>, Vec<String>)> {
    t.services
        .iter()
        .map(|s| {
            let pick = |drain: bool| {
                s.backends
                    .iter()
                    .filter(|b| b.drain == drain)
                    .map(|b| b.addr.to_string())
                    .collect::<Vec<_>>()
            };
            (s.name.clone(), s.vip.to_string(), pick(false), pick(true))
        })
        .collect()
}

#[test]
fn cluster_ip_uses_ready_endpoints_of_every_slice_with_their_own_port_numbers() {
    let slices = [
        slice(
            "web",
            "web-1",
            "IPv4",
            http_port(),
            json!([ready("10.1.0.1", "node-a")]),
        ),
        // A named targetPort can map to another number in another slice (other pods).
        slice(
            "web",
            "web-2",
            "IPv4",
            json!([{"name": "http", "port": 9090, "protocol": "TCP"}]),
            json!([
                ready("10.1.0.2", "node-b"),
                ep(
                    "10.1.0.3",
                    "node-b",
                    json!({"ready": false, "serving": false, "terminating": false})
                )
            ]),
        ),
    ];
    let t = run(&[web(json!({}))], &slices);
    assert_eq!(
        view(&t),
        vec![(
            "default/web:http".to_owned(),
            "10.96.0.10:80".to_owned(),
            vec!["10.1.0.1:8080".to_owned(), "10.1.0.2:9090".to_owned()],
            vec![]
        )]
    );
    let svc = &t.services[0];
    assert_eq!(svc.on_empty, EmptyPolicy::Reject);
    assert!(svc.health.is_none() && svc.affinity.is_none());
}

#[test]
fn no_usable_endpoint_leaves_a_service_that_refuses() {
    let slices = [slice(
        "web",
        "web-1",
        "IPv4",
        http_port(),
        json!([ep(
            "10.1.0.1",
            "node-a",
            json!({"ready": false, "serving": false, "terminating": false})
        )]),
    )];
    let t = run(&[web(json!({}))], &slices);
    assert_eq!(t.services.len(), 1);
    assert!(t.services[0].backends.is_empty());
    assert_eq!(t.services[0].on_empty, EmptyPolicy::Reject);
}

#[test]
fn serving_terminating_endpoints_serve_only_when_nothing_is_ready() {
    let terminating = ep(
        "10.1.0.9",
        "node-a",
        json!({"ready": false, "serving": true, "terminating": true}),
    );
    let with_ready = [slice(
        "web",
        "w",
        "IPv4",
        http_port(),
        json!([ready("10.1.0.1", "node-b"), terminating.clone()]),
    )];
    let t = run(&[web(json!({}))], &with_ready);
    // Ready wins; the terminating one drains (no new connections, established ones go on).
    assert_eq!(view(&t)[0].2, vec!["10.1.0.1:8080"]);
    assert_eq!(view(&t)[0].3, vec!["10.1.0.9:8080"]);

    let only_terminating = [slice("web", "w", "IPv4", http_port(), json!([terminating]))];
    let t = run(&[web(json!({}))], &only_terminating);
    assert_eq!(view(&t)[0].2, vec!["10.1.0.9:8080"]);
    assert!(view(&t)[0].3.is_empty());
}

#[test]
fn internal_traffic_policy_local_uses_this_nodes_endpoints_only() {
    let slices = [slice(
        "web",
        "w",
        "IPv4",
        http_port(),
        json!([ready("10.1.0.1", "node-a"), ready("10.1.0.2", "node-b")]),
    )];
    let t = run(&[web(json!({"internalTrafficPolicy": "Local"}))], &slices);
    assert_eq!(view(&t)[0].2, vec!["10.1.0.1:8080"]);
    // None on this node: refused, even though node-b has one.
    let remote = [slice(
        "web",
        "w",
        "IPv4",
        http_port(),
        json!([ready("10.1.0.2", "node-b")]),
    )];
    let t = run(&[web(json!({"internalTrafficPolicy": "Local"}))], &remote);
    assert!(t.services[0].backends.is_empty());
}

#[test]
fn local_set_falls_back_to_local_serving_terminating_endpoints() {
    let slices = [slice(
        "web",
        "w",
        "IPv4",
        http_port(),
        json!([
            ready("10.1.0.2", "node-b"),
            ep(
                "10.1.0.1",
                "node-a",
                json!({"ready": false, "serving": true, "terminating": true})
            )
        ]),
    )];
    let t = run(&[web(json!({"internalTrafficPolicy": "Local"}))], &slices);
    assert_eq!(view(&t)[0].2, vec!["10.1.0.1:8080"]);
}

fn hinted(ip: &str, node: &str, zones: &[&str], nodes: &[&str]) -> Value {
    let mut e = ready(ip, node);
    let mut hints = serde_json::Map::new();
    if !zones.is_empty() {
        hints.insert(
            "forZones".into(),
            zones.iter().map(|z| json!({"name": z})).collect(),
        );
    }
    if !nodes.is_empty() {
        hints.insert(
            "forNodes".into(),
            nodes.iter().map(|n| json!({"name": n})).collect(),
        );
    }
    e.as_object_mut()
        .unwrap()
        .insert("hints".into(), Value::Object(hints));
    e
}

#[test]
fn zone_hints_apply_only_when_every_ready_endpoint_has_one_and_one_matches() {
    let all_hinted = [slice(
        "web",
        "w",
        "IPv4",
        http_port(),
        json!([
            hinted("10.1.0.1", "node-a", &["zone-1"], &[]),
            hinted("10.1.0.2", "node-b", &["zone-2"], &[])
        ]),
    )];
    let t = run(
        &[web(json!({"trafficDistribution": "PreferSameZone"}))],
        &all_hinted,
    );
    assert_eq!(view(&t)[0].2, vec!["10.1.0.1:8080"]);

    // One ready endpoint without hints: no topology at all.
    let partly = [slice(
        "web",
        "w",
        "IPv4",
        http_port(),
        json!([
            hinted("10.1.0.1", "node-a", &["zone-1"], &[]),
            ready("10.1.0.2", "node-b")
        ]),
    )];
    let t = run(&[web(json!({}))], &partly);
    assert_eq!(view(&t)[0].2.len(), 2);

    // Hints for other zones only: no topology.
    let elsewhere = [slice(
        "web",
        "w",
        "IPv4",
        http_port(),
        json!([
            hinted("10.1.0.1", "node-a", &["zone-3"], &[]),
            hinted("10.1.0.2", "node-b", &["zone-2"], &[])
        ]),
    )];
    assert_eq!(view(&run(&[web(json!({}))], &elsewhere))[0].2.len(), 2);
}

#[test]
fn node_hints_win_over_zone_hints() {
    let slices = [slice(
        "web",
        "w",
        "IPv4",
        http_port(),
        json!([
            hinted("10.1.0.1", "node-a", &["zone-1"], &["node-a"]),
            hinted("10.1.0.2", "node-c", &["zone-1"], &["node-c"])
        ]),
    )];
    let t = run(
        &[web(json!({"trafficDistribution": "PreferSameNode"}))],
        &slices,
    );
    assert_eq!(view(&t)[0].2, vec!["10.1.0.1:8080"]);
}

#[test]
fn dual_stack_services_get_one_vip_per_family_with_that_familys_endpoints() {
    let svc = web(
        json!({"clusterIPs": ["10.96.0.10", "fd00:96::10"], "ipFamilies": ["IPv4", "IPv6"],
                         "ipFamilyPolicy": "RequireDualStack"}),
    );
    let slices = [
        slice(
            "web",
            "w4",
            "IPv4",
            http_port(),
            json!([ready("10.1.0.1", "node-a")]),
        ),
        slice(
            "web",
            "w6",
            "IPv6",
            http_port(),
            json!([ready("fd00:1::1", "node-a")]),
        ),
    ];
    let t = run(&[svc], &slices);
    assert_eq!(
        view(&t),
        vec![
            (
                "default/web:http".into(),
                "10.96.0.10:80".into(),
                vec!["10.1.0.1:8080".into()],
                vec![]
            ),
            (
                "default/web:http@fd00:96::10:80".into(),
                "[fd00:96::10]:80".into(),
                vec!["[fd00:1::1]:8080".into()],
                vec![]
            ),
        ]
    );
}

#[test]
fn node_ports_external_ips_and_load_balancer_ips_are_vips_too() {
    let mut svc = web(
        json!({"type": "LoadBalancer", "externalIPs": ["127.20.0.1"],
                             "externalTrafficPolicy": "Local"}),
    );
    svc.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].node_port = Some(30080);
    svc.status = serde_json::from_value(json!({"loadBalancer": {"ingress": [
        {"ip": "127.30.0.1"}, {"ip": "127.30.0.2", "ipMode": "Proxy"}, {"hostname": "lb.example"}]}}))
    .unwrap();
    let slices = [slice(
        "web",
        "w",
        "IPv4",
        http_port(),
        json!([ready("10.1.0.1", "node-a"), ready("10.1.0.2", "node-b")]),
    )];
    let t = run(&[svc], &slices);
    let socket: Vec<&ServiceConfig> = t.services.iter().filter(|s| s.external.is_none()).collect();
    let vips: Vec<String> = socket.iter().map(|s| s.vip.to_string()).collect();
    assert_eq!(
        vips,
        [
            "10.96.0.10:80",
            "127.0.0.1:30080",
            "127.10.0.1:30080",
            "127.20.0.1:80",
            "127.30.0.1:80"
        ]
    );
    // externalTrafficPolicy: Local does not narrow what clients on this node reach.
    assert!(socket.iter().all(|s| s.backends.len() == 2));
}

/// Traffic from other hosts: the NodePort on the node's addresses, the ExternalIPs and the
/// LoadBalancer IPs are external services too (not 127.0.0.1, not the cluster IP), with the
/// endpoints externalTrafficPolicy picks.
fn external_view(policy: &str) -> Vec<(String, String, Vec<String>, Option<ExternalPolicy>)> {
    let mut svc = web(
        json!({"type": "LoadBalancer", "externalIPs": ["127.20.0.1"],
                             "externalTrafficPolicy": policy}),
    );
    svc.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].node_port = Some(30080);
    svc.status = serde_json::from_value(json!({"loadBalancer": {"ingress": [
        {"ip": "127.30.0.1"}, {"ip": "127.30.0.2", "ipMode": "Proxy"}]}}))
    .unwrap();
    let slices = [slice(
        "web",
        "w",
        "IPv4",
        http_port(),
        json!([ready("10.1.0.1", "node-a"), ready("10.1.0.2", "node-b")]),
    )];
    run(&[svc], &slices)
        .services
        .iter()
        .filter(|s| s.external.is_some())
        .map(|s| {
            let backends = s.backends.iter().map(|b| b.addr.to_string()).collect();
            (s.name.clone(), s.vip.to_string(), backends, s.external)
        })
        .collect()
}

#[test]
fn external_traffic_policy_picks_the_endpoints_of_external_services() {
    let both = vec!["10.1.0.1:8080".to_owned(), "10.1.0.2:8080".to_owned()];
    let cluster = Some(ExternalPolicy::Cluster);
    assert_eq!(
        external_view("Cluster"),
        vec![
            (
                "default/web:http@ext/127.10.0.1:30080".into(),
                "127.10.0.1:30080".into(),
                both.clone(),
                cluster
            ),
            (
                "default/web:http@ext/127.20.0.1:80".into(),
                "127.20.0.1:80".into(),
                both.clone(),
                cluster
            ),
            (
                "default/web:http@ext/127.30.0.1:80".into(),
                "127.30.0.1:80".into(),
                both,
                cluster
            ),
        ]
    );
    let local = external_view("Local");
    assert_eq!(local.len(), 3);
    for (_, _, backends, policy) in &local {
        assert_eq!(
            backends,
            &["10.1.0.1:8080".to_owned()],
            "only node-a's endpoint"
        );
        assert_eq!(*policy, Some(ExternalPolicy::Local));
    }
}

#[test]
fn tcp_and_udp_on_the_same_port_are_separate_services() {
    let svc = service(
        "dns",
        json!({"clusterIP": "10.96.0.53", "ports": [
            {"name": "dns", "port": 53, "protocol": "UDP"},
            {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
            {"name": "sctp", "port": 99, "protocol": "SCTP"}]}),
    );
    let slices = [slice(
        "dns",
        "d",
        "IPv4",
        json!([{"name": "dns", "port": 5353, "protocol": "UDP"},
               {"name": "dns-tcp", "port": 5353, "protocol": "TCP"}]),
        json!([ready("10.1.0.5", "node-a")]),
    )];
    let t = run(&[svc], &slices);
    let got: Vec<(String, Protocol)> = t
        .services
        .iter()
        .map(|s| (s.name.clone(), s.protocol))
        .collect();
    assert_eq!(
        got,
        [
            ("default/dns:dns".to_owned(), Protocol::Udp),
            ("default/dns:dns-tcp".to_owned(), Protocol::Tcp)
        ]
    );
    assert_eq!(
        t.skipped.get("protocol other than TCP and UDP (SCTP)"),
        Some(&1)
    );
}

#[test]
fn session_affinity_client_ip_maps_to_affinity_with_its_timeout() {
    let default = run(&[web(json!({"sessionAffinity": "ClientIP"}))], &[]);
    assert_eq!(
        default.services[0].affinity.as_ref().map(|a| a.timeout),
        Some(Duration::from_secs(10_800))
    );
    let custom = run(
        &[web(json!({"sessionAffinity": "ClientIP",
                     "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}))],
        &[],
    );
    assert_eq!(
        custom.services[0].affinity.as_ref().map(|a| a.timeout),
        Some(Duration::from_secs(60))
    );
}

#[test]
fn headless_external_name_and_other_proxies_services_are_skipped() {
    let headless = service("h", json!({"clusterIP": "None", "ports": [{"port": 80}]}));
    let external = service(
        "e",
        json!({"type": "ExternalName", "externalName": "example.com"}),
    );
    let mut labelled = web(json!({}));
    labelled.metadata.labels = Some([(LABEL_PROXY_NAME.to_owned(), "other".to_owned())].into());
    let mut headless_label = web(json!({}));
    headless_label.metadata.name = Some("hl".into());
    headless_label.metadata.labels = Some([(LABEL_HEADLESS.to_owned(), String::new())].into());
    let t = run(&[headless, external, labelled.clone(), headless_label], &[]);
    assert!(t.services.is_empty());
    assert_eq!(t.skipped.values().sum::<usize>(), 4, "{:?}", t.skipped);

    // An agent with that proxy name serves exactly the labelled one.
    let mine = translate(
        &[labelled, web(json!({}))],
        &[],
        &node(),
        &Filter {
            service_proxy_name: "other".into(),
        },
    );
    assert_eq!(mine.services.len(), 1);
}

#[test]
fn publish_not_ready_addresses_serves_every_endpoint() {
    let slices = [slice(
        "web",
        "w",
        "IPv4",
        http_port(),
        json!([ep("10.1.0.1", "node-a", json!({"ready": false}))]),
    )];
    let t = run(&[web(json!({"publishNotReadyAddresses": true}))], &slices);
    assert_eq!(view(&t)[0].2, vec!["10.1.0.1:8080"]);
}

#[test]
fn fqdn_slices_are_skipped_and_an_address_in_two_slices_counts_once() {
    let slices = [
        slice(
            "web",
            "a",
            "IPv4",
            http_port(),
            json!([ready("10.1.0.1", "node-a")]),
        ),
        slice(
            "web",
            "b",
            "IPv4",
            http_port(),
            json!([ready("10.1.0.1", "node-a")]),
        ),
        slice(
            "web",
            "c",
            "FQDN",
            http_port(),
            json!([ready("db.example", "node-a")]),
        ),
    ];
    let t = run(&[web(json!({}))], &slices);
    assert_eq!(view(&t)[0].2, vec!["10.1.0.1:8080"]);
    assert_eq!(t.skipped.get("FQDN EndpointSlice"), Some(&1));
}

#[test]
fn translated_services_pass_validation() {
    let mut svc = web(json!({"type": "NodePort", "sessionAffinity": "ClientIP"}));
    svc.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].node_port = Some(30080);
    let slices = [slice(
        "web",
        "w",
        "IPv4",
        http_port(),
        json!([ready("10.1.0.1", "node-a")]),
    )];
    let config = crate::config::Config {
        services: run(&[svc], &slices).services,
        ..Default::default()
    };
    config.validate("kubernetes").unwrap();
}

#[test]
fn long_names_are_cut_to_the_kernel_buffer_and_stay_unique() {
    let long = "n".repeat(80);
    let a = fit_name(&format!("{long}-a"));
    let b = fit_name(&format!("{long}-b"));
    assert!(a.len() < SERVICE_NAME_LEN && b.len() < SERVICE_NAME_LEN);
    assert_ne!(a, b);
    assert_eq!(fit_name("default/web:http"), "default/web:http");
}

#[test]
fn active_checks_only_when_an_annotation_asks() {
    assert!(run(&[web(json!({}))], &[]).services[0].health.is_none());
    let mut svc = web(json!({}));
    svc.metadata.annotations = Some(
        [
            (ANNOTATION_HEALTH.to_owned(), "http".to_owned()),
            (ANNOTATION_HEALTH_PATH.to_owned(), "/ready".to_owned()),
        ]
        .into(),
    );
    let health = run(&[svc.clone()], &[]).services[0].health.clone().unwrap();
    assert_eq!(
        (health.kind, health.path.as_str()),
        (HealthKind::Http, "/ready")
    );
    svc.metadata.annotations = Some([(ANNOTATION_HEALTH.to_owned(), "grpc".to_owned())].into());
    let t = run(&[svc], &[]);
    assert!(t.services[0].health.is_none());
    assert_eq!(t.skipped.len(), 1);
}

#[test]
fn health_check_node_port_counts_only_ready_local_endpoints() {
    let mut svc = web(
        json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                             "healthCheckNodePort": 32100}),
    );
    svc.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].node_port = Some(30080);
    let terminating = ep(
        "10.1.0.1",
        "node-a",
        json!({"ready": false, "serving": true, "terminating": true}),
    );
    let hc = |endpoints: Value| {
        let slices = [slice("web", "w", "IPv4", http_port(), endpoints)];
        let t = run(std::slice::from_ref(&svc), &slices);
        let ext: Vec<&ServiceConfig> = t.services.iter().filter(|s| s.external.is_some()).collect();
        assert_eq!(ext.len(), 1);
        assert!(
            t.services
                .iter()
                .filter(|s| s.external.is_none())
                .all(|s| s.health_check_node_port.is_none())
        );
        (ext[0].health_check_node_port.clone(), ext[0].backends.len())
    };
    let port = |n| {
        Some(HealthCheckNodePort {
            port: 32100,
            local_endpoints: Some(n),
        })
    };
    assert_eq!(
        hc(json!([
            ready("10.1.0.1", "node-a"),
            ready("10.1.0.2", "node-b")
        ])),
        (port(1), 1)
    );
    // Only a terminating local endpoint: it still serves, but the node reports 0 (503).
    assert_eq!(
        hc(json!([terminating, ready("10.1.0.2", "node-b")])).0,
        port(0)
    );
    // Cluster services have no health check port.
    svc.spec.as_mut().unwrap().external_traffic_policy = Some("Cluster".into());
    let slices = [slice(
        "web",
        "w",
        "IPv4",
        http_port(),
        json!([ready("10.1.0.1", "node-a")]),
    )];
    assert!(
        run(&[svc], &slices)
            .services
            .iter()
            .all(|s| s.health_check_node_port.is_none())
    );
}
