//! The test Kubernetes API server (`integration_tests::kube_api`) speaks the protocol real
//! clients rely on: plain HTTP against the in-process server (discovery, pagination, selectors,
//! resourceVersion semantics, writes, watch events, bookmarks, 410), then kubectl, the
//! official Python client and kube-rs's watcher against it.
//!
//! No root needed. Every wait is bounded; every test asserts exact objects or events.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use integration_tests::http;
use integration_tests::kube_api::{KubeApi, RequestRecord};
use integration_tests::process::run_bounded;
use integration_tests::{wait_until, workspace_root};
use serde_json::{Value, json};

const IO: Duration = Duration::from_secs(10);

fn fixtures_dir() -> PathBuf {
    workspace_root().join("tests/fixtures/kubernetes")
}

/// A server holding the fixtures.
fn api_with_fixtures() -> KubeApi {
    let api = KubeApi::start();
    let count = api.load_fixtures(fixtures_dir()).expect("fixtures load");
    assert_eq!(
        count, 24,
        "fixture objects (3 namespaces, 2 nodes, 9 services, 10 slices)"
    );
    api
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "mesh-kube-api-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Percent-encodes a query value.
fn enc(value: &str) -> String {
    let mut out = String::new();
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[track_caller]
fn call(api: &KubeApi, method: &str, path: &str, body: Option<(&str, &Value)>) -> (u16, Value) {
    let text = body.map(|(ct, v)| (ct, v.to_string()));
    let response = http::request_typed(
        api.addr(),
        method,
        path,
        text.as_ref().map(|(ct, b)| (*ct, b.as_str())),
        IO,
    )
    .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let value = serde_json::from_str(&response.body)
        .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {}", response.body));
    (response.status, value)
}

#[track_caller]
fn get(api: &KubeApi, path: &str) -> Value {
    let (status, body) = call(api, "GET", path, None);
    assert_eq!(status, 200, "GET {path}: {body}");
    body
}

/// A whole (bounded) watch over plain HTTP: the path must carry `timeoutSeconds`.
#[track_caller]
fn watch_events(api: &KubeApi, path: &str) -> Vec<Value> {
    assert!(path.contains("timeoutSeconds="), "unbounded watch {path}");
    let response = http::request(api.addr(), "GET", path, None, IO)
        .unwrap_or_else(|e| panic!("watch {path}: {e}"));
    assert_eq!(response.status, 200, "watch {path}: {}", response.body);
    response
        .body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("event line {l:?}: {e}")))
        .collect()
}

/// `namespace/name` (or `name`) of every item of a list.
fn names(list: &Value) -> Vec<String> {
    list["items"]
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .map(key)
        .collect()
}

fn key(object: &Value) -> String {
    let m = &object["metadata"];
    match m["namespace"].as_str() {
        Some(ns) => format!("{ns}/{}", m["name"].as_str().unwrap_or_default()),
        None => m["name"].as_str().unwrap_or_default().to_owned(),
    }
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn without_type(object: &Value) -> Value {
    let mut o = object.clone();
    let map = o.as_object_mut().expect("object");
    map.remove("kind");
    map.remove("apiVersion");
    o
}

fn rv_of(object: &Value) -> u64 {
    object["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no resourceVersion in {object}"))
}

fn event_summary(events: &[Value]) -> Vec<(String, String)> {
    events
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap_or_default().to_owned(),
                key(&e["object"]),
            )
        })
        .collect()
}

fn service(ns: &str, name: &str, labels: Value, cluster_ip: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip],
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
            "selector": {"app": name},
            "sessionAffinity": "None"
        }
    })
}

const ALL_SERVICES: &[&str] = &[
    "default/kubernetes",
    "kube-system/kube-dns",
    "shop/api",
    "shop/db",
    "shop/frontend-lb",
    "shop/legacy",
    "shop/metrics",
    "shop/proxy-lb",
    "shop/web",
];

const ALL_SLICES: &[&str] = &[
    "default/kubernetes",
    "kube-system/kube-dns-k8f2x",
    "shop/api-2bh6k",
    "shop/db-h8s7d",
    "shop/frontend-lb-p5r9t",
    "shop/metrics-f3n8v",
    "shop/proxy-lb-z2w4q",
    "shop/web-4vq8n",
    "shop/web-9kd2p",
    "shop/web-x7m3c",
];

// ---------------------------------------------------------------------------------------------
// Plain HTTP against the in-process server.
// ---------------------------------------------------------------------------------------------

#[test]
fn discovery_documents_describe_the_served_types() {
    let api = KubeApi::start();
    let versions = get(&api, "/api");
    assert_eq!(versions["kind"], "APIVersions");
    assert_eq!(versions["versions"], json!(["v1"]));
    assert_eq!(
        versions["serverAddressByClientCIDRs"][0]["serverAddress"],
        api.addr().to_string()
    );

    let core = get(&api, "/api/v1");
    assert_eq!(core["kind"], "APIResourceList");
    assert_eq!(core["groupVersion"], "v1");
    let find = |list: &Value, name: &str| -> Value {
        list["resources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} not in {list}"))
    };
    let services = find(&core, "services");
    assert_eq!(services["kind"], "Service");
    assert_eq!(services["namespaced"], true);
    assert_eq!(services["shortNames"], json!(["svc"]));
    assert!(
        services["verbs"]
            .as_array()
            .unwrap()
            .contains(&json!("watch"))
    );
    assert_eq!(find(&core, "nodes")["namespaced"], false);
    assert_eq!(find(&core, "namespaces")["namespaced"], false);
    assert_eq!(
        find(&core, "services/status")["verbs"],
        json!(["get", "patch", "update"])
    );
    find(&core, "endpoints");

    let groups = get(&api, "/apis");
    assert_eq!(groups["kind"], "APIGroupList");
    let discovery = groups["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == "discovery.k8s.io")
        .expect("discovery.k8s.io group");
    assert_eq!(
        discovery["preferredVersion"],
        json!({"groupVersion": "discovery.k8s.io/v1", "version": "v1"})
    );
    assert_eq!(get(&api, "/apis/discovery.k8s.io")["kind"], "APIGroup");
    let slices = get(&api, "/apis/discovery.k8s.io/v1");
    assert_eq!(slices["groupVersion"], "discovery.k8s.io/v1");
    let eps = find(&slices, "endpointslices");
    assert_eq!(
        (eps["kind"].clone(), eps["namespaced"].clone()),
        (json!("EndpointSlice"), json!(true))
    );

    let version = get(&api, "/version");
    assert_eq!(
        (version["major"].clone(), version["minor"].clone()),
        (json!("1"), json!("33"))
    );

    for path in [
        "/openapi/v2",
        "/openapi/v3",
        "/apis/apps/v1",
        "/api/v1/secrets",
        "/api/v2",
    ] {
        let (status, body) = call(&api, "GET", path, None);
        assert_eq!(status, 404, "{path}");
        assert_eq!(body["kind"], "Status", "{path}");
        assert_eq!(body["reason"], "NotFound", "{path}");
        assert_eq!(body["code"], 404, "{path}");
    }
}

#[test]
fn list_is_typed_and_carries_the_global_resource_version() {
    let api = api_with_fixtures();
    let list = get(&api, "/api/v1/services");
    assert_eq!(list["kind"], "ServiceList");
    assert_eq!(list["apiVersion"], "v1");
    assert_eq!(
        list["metadata"]["resourceVersion"],
        api.resource_version().to_string()
    );
    assert!(list["metadata"].get("continue").is_none());
    let stored: Vec<Value> = api.list("services").iter().map(without_type).collect();
    assert_eq!(
        list["items"],
        json!(stored),
        "items are the stored objects without kind"
    );
    assert_eq!(names(&list), ALL_SERVICES);

    let shop = get(&api, "/api/v1/namespaces/shop/services");
    assert_eq!(names(&shop).len(), 7);
    assert!(names(&shop).iter().all(|n| n.starts_with("shop/")));

    let nodes = get(&api, "/api/v1/nodes");
    assert_eq!(nodes["kind"], "NodeList");
    assert_eq!(names(&nodes), ["node-a", "node-b"]);
    let node = get(&api, "/api/v1/nodes/node-a");
    assert_eq!(node["kind"], "Node");
    assert_eq!(node, api.get("node", "", "node-a").unwrap());
    let slices = get(&api, "/apis/discovery.k8s.io/v1/endpointslices");
    assert_eq!(slices["kind"], "EndpointSliceList");
    assert_eq!(names(&slices), ALL_SLICES);
    let one = get(
        &api,
        "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices/web-9kd2p",
    );
    assert_eq!(one["apiVersion"], "discovery.k8s.io/v1");
    assert_eq!(
        one["ports"][0],
        json!({"name": "http", "protocol": "TCP", "port": 8081})
    );

    // Every write took one revision of one global counter, shared by all types.
    let mut rvs: Vec<u64> = ["services", "nodes", "endpointslices", "namespaces"]
        .iter()
        .flat_map(|k| api.list(k))
        .map(|o| rv_of(&o))
        .collect();
    rvs.sort();
    assert_eq!(rvs, (2..=25).collect::<Vec<u64>>());

    // A namespaced object is not reachable without its namespace, nor a cluster-scoped one
    // under a namespace.
    assert_eq!(call(&api, "GET", "/api/v1/services/web", None).0, 404);
    assert_eq!(
        call(&api, "GET", "/api/v1/namespaces/shop/nodes/node-a", None).0,
        404
    );
    let (status, missing) = call(&api, "GET", "/api/v1/namespaces/shop/services/nope", None);
    assert_eq!(status, 404);
    assert_eq!(
        missing,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": "services \"nope\" not found", "reason": "NotFound",
               "details": {"name": "nope", "kind": "services"}, "code": 404})
    );
}

#[test]
fn pagination_follows_continue_tokens_over_one_snapshot() {
    let api = api_with_fixtures();
    let path = "/apis/discovery.k8s.io/v1/endpointslices";
    let first = get(&api, &format!("{path}?limit=3"));
    let snapshot_rv = first["metadata"]["resourceVersion"].clone();
    assert_eq!(names(&first), ALL_SLICES[..3]);
    assert_eq!(first["metadata"]["remainingItemCount"], 7);
    let mut token = first["metadata"]["continue"].as_str().unwrap().to_owned();

    // Writes between pages are not seen by the pages of the same list (one etcd revision).
    api.delete("endpointslices", "shop", "web-x7m3c").unwrap();
    let mut late = api.get("endpointslices", "shop", "web-4vq8n").unwrap();
    late["metadata"]["labels"]["changed"] = json!("yes");
    api.apply(late);
    let mut extra = api.get("endpointslices", "shop", "api-2bh6k").unwrap();
    extra["metadata"]["name"] = json!("zz-new");
    extra["metadata"].as_object_mut().unwrap().remove("uid");
    api.apply(extra);

    let mut all = names(&first);
    let mut pages = 1;
    loop {
        let page = get(&api, &format!("{path}?limit=3&continue={}", enc(&token)));
        pages += 1;
        assert_eq!(page["metadata"]["resourceVersion"], snapshot_rv);
        all.extend(names(&page));
        for item in page["items"].as_array().unwrap() {
            if key(item) == "shop/web-4vq8n" {
                assert!(
                    item["metadata"]["labels"].get("changed").is_none(),
                    "page saw a later write"
                );
            }
        }
        match page["metadata"]["continue"].as_str() {
            Some(t) => {
                assert_eq!(
                    page["metadata"]["remainingItemCount"],
                    ALL_SLICES.len() - all.len()
                );
                token = t.to_owned();
            }
            None => break,
        }
    }
    assert_eq!(pages, 4);
    assert_eq!(all, ALL_SLICES);

    // A new list sees the writes.
    let now = get(&api, path);
    let mut expected: Vec<&str> = ALL_SLICES
        .iter()
        .copied()
        .filter(|n| *n != "shop/web-x7m3c")
        .collect();
    expected.push("shop/zz-new");
    assert_eq!(names(&now), expected);

    // Selectors apply to each page; no remainingItemCount with a selector (as the real server).
    let page = get(
        &api,
        &format!("{path}?limit=1&labelSelector={}", enc("app=web")),
    );
    assert_eq!(names(&page), ["shop/web-4vq8n"]);
    assert!(page["metadata"].get("remainingItemCount").is_none());
    let token = page["metadata"]["continue"]
        .as_str()
        .expect("more pages")
        .to_owned();
    let rest = get(
        &api,
        &format!(
            "{path}?limit=2&labelSelector={}&continue={}",
            enc("app=web"),
            enc(&token)
        ),
    );
    assert_eq!(
        names(&rest),
        ["shop/web-9kd2p"],
        "web-x7m3c was deleted before this list"
    );
    assert!(rest["metadata"].get("continue").is_none());

    // Once the history is compacted past the token's revision, the token is expired (a
    // compaction at the current revision would keep it: etcd can always read the latest).
    let mut bump = api.get("endpointslices", "shop", "zz-new").unwrap();
    bump["metadata"]["labels"]["bump"] = json!("1");
    api.apply(bump);
    api.compact();
    let (status, body) = call(
        &api,
        "GET",
        &format!("{path}?limit=2&continue={}", enc(&token)),
        None,
    );
    assert_eq!(status, 410, "{body}");
    assert_eq!(body["kind"], "Status");
    assert_eq!(body["reason"], "Expired");
    assert_eq!(body["code"], 410);
    // A garbage token and a token with a resourceVersion are bad requests.
    assert_eq!(
        call(&api, "GET", &format!("{path}?continue=bm90LWpzb24"), None).0,
        400
    );
    assert_eq!(
        call(
            &api,
            "GET",
            &format!("{path}?continue={}&resourceVersion=5", enc(&token)),
            None
        )
        .0,
        400
    );
}

#[test]
fn label_selectors_of_each_form_select_exactly() {
    let api = api_with_fixtures();
    let all_but = |skip: &[&str]| -> BTreeSet<String> {
        ALL_SERVICES
            .iter()
            .filter(|n| !skip.contains(n))
            .map(|s| s.to_string())
            .collect()
    };
    let cases: Vec<(&str, BTreeSet<String>)> = vec![
        ("app=frontend", set(&["shop/frontend-lb", "shop/proxy-lb"])),
        ("app==web", set(&["shop/web"])),
        (
            "app!=frontend",
            all_but(&["shop/frontend-lb", "shop/proxy-lb"]),
        ),
        (
            "app",
            all_but(&["default/kubernetes", "kube-system/kube-dns"]),
        ),
        ("!app", set(&["default/kubernetes", "kube-system/kube-dns"])),
        ("app in (web,db)", set(&["shop/db", "shop/web"])),
        ("app in (web, nothing)", set(&["shop/web"])),
        ("app notin (web,db)", all_but(&["shop/db", "shop/web"])),
        (
            "app,!service.kubernetes.io/service-proxy-name",
            all_but(&["default/kubernetes", "kube-system/kube-dns", "shop/metrics"]),
        ),
        (
            "service.kubernetes.io/service-proxy-name=other-proxy",
            set(&["shop/metrics"]),
        ),
        ("app=frontend,app!=frontend", set(&[])),
        (
            "kubernetes.io/cluster-service=true,k8s-app in (kube-dns)",
            set(&["kube-system/kube-dns"]),
        ),
        ("", all_but(&[])),
    ];
    for (selector, expected) in cases {
        let list = get(
            &api,
            &format!("/api/v1/services?labelSelector={}", enc(selector)),
        );
        let got: BTreeSet<String> = names(&list).into_iter().collect();
        assert_eq!(got, expected, "labelSelector {selector:?}");
    }
    // Namespaced path and selector together.
    let list = get(
        &api,
        &format!(
            "/api/v1/namespaces/shop/services?labelSelector={}",
            enc("app notin (web)")
        ),
    );
    assert_eq!(
        names(&list),
        [
            "shop/api",
            "shop/db",
            "shop/frontend-lb",
            "shop/legacy",
            "shop/metrics",
            "shop/proxy-lb"
        ]
    );
    // The slice of the headless Service carries the headless label.
    let slices = get(
        &api,
        &format!(
            "/apis/discovery.k8s.io/v1/endpointslices?labelSelector={}",
            enc("!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name")
        ),
    );
    let expected: Vec<&str> = ALL_SLICES
        .iter()
        .copied()
        .filter(|n| !["shop/db-h8s7d", "shop/metrics-f3n8v"].contains(n))
        .collect();
    assert_eq!(names(&slices), expected);
    let by_service = get(
        &api,
        &format!(
            "/apis/discovery.k8s.io/v1/endpointslices?labelSelector={}",
            enc("kubernetes.io/service-name=web")
        ),
    );
    assert_eq!(
        names(&by_service),
        ["shop/web-4vq8n", "shop/web-9kd2p", "shop/web-x7m3c"]
    );

    for bad in ["app in (web", "app ~ x", "-app", "app=a b"] {
        let (status, body) = call(
            &api,
            "GET",
            &format!("/api/v1/services?labelSelector={}", enc(bad)),
            None,
        );
        assert_eq!(status, 400, "{bad:?}: {body}");
        assert_eq!(
            (body["kind"].clone(), body["reason"].clone()),
            (json!("Status"), json!("BadRequest"))
        );
    }
}

#[test]
fn field_selectors_select_by_name_namespace_and_type() {
    let api = api_with_fixtures();
    let cases: &[(&str, &str, &[&str])] = &[
        ("/api/v1/services", "metadata.name=web", &["shop/web"]),
        (
            "/api/v1/services",
            "metadata.name==kubernetes",
            &["default/kubernetes"],
        ),
        (
            "/api/v1/services",
            "metadata.namespace=kube-system",
            &["kube-system/kube-dns"],
        ),
        (
            "/api/v1/services",
            "metadata.namespace=shop,metadata.name!=web,metadata.name!=db",
            &[
                "shop/api",
                "shop/frontend-lb",
                "shop/legacy",
                "shop/metrics",
                "shop/proxy-lb",
            ],
        ),
        (
            "/api/v1/services",
            "metadata.name=web,metadata.namespace=default",
            &[],
        ),
        (
            "/api/v1/services",
            "spec.type=LoadBalancer",
            &["shop/frontend-lb", "shop/proxy-lb"],
        ),
        ("/api/v1/services", "spec.clusterIP=None", &["shop/db"]),
        ("/api/v1/nodes", "metadata.name=node-b", &["node-b"]),
        (
            "/api/v1/nodes",
            "spec.unschedulable=false",
            &["node-a", "node-b"],
        ),
        (
            "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices",
            "metadata.name=web-9kd2p",
            &["shop/web-9kd2p"],
        ),
    ];
    for (path, selector, expected) in cases {
        let list = get(&api, &format!("{path}?fieldSelector={}", enc(selector)));
        assert_eq!(names(&list), *expected, "{path} fieldSelector {selector:?}");
    }
    let (status, body) = call(
        &api,
        "GET",
        "/api/v1/services?fieldSelector=spec.foo%3Dx",
        None,
    );
    assert_eq!(status, 400);
    assert_eq!(body["reason"], "BadRequest");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("\"spec.foo\" is not a known field selector"),
        "{body}"
    );
    // Label and field selectors together.
    let list = get(
        &api,
        &format!(
            "/api/v1/services?labelSelector={}&fieldSelector={}",
            enc("app=frontend"),
            enc("metadata.name!=proxy-lb")
        ),
    );
    assert_eq!(names(&list), ["shop/frontend-lb"]);
}

#[test]
fn list_resource_version_parameters_follow_the_real_semantics() {
    let api = api_with_fixtures();
    let path = "/api/v1/namespaces/shop/services";
    let before = api.resource_version();
    let mut web = api.get("svc", "shop", "web").unwrap();
    web["metadata"]["labels"]["v"] = json!("2");
    api.apply(web);
    let now = api.resource_version();
    assert_eq!(now, before + 1);

    for query in [
        "",
        "?resourceVersion=0",
        "?resourceVersion=0&resourceVersionMatch=NotOlderThan",
    ] {
        let list = get(&api, &format!("{path}{query}"));
        assert_eq!(
            list["metadata"]["resourceVersion"],
            now.to_string(),
            "{query}"
        );
    }
    let not_older = get(&api, &format!("{path}?resourceVersion={before}"));
    assert_eq!(not_older["metadata"]["resourceVersion"], now.to_string());
    // Exact: the objects as they were at that revision.
    let exact = get(
        &api,
        &format!("{path}?resourceVersion={before}&resourceVersionMatch=Exact"),
    );
    assert_eq!(exact["metadata"]["resourceVersion"], before.to_string());
    let web_then = exact["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| key(i) == "shop/web")
        .unwrap();
    assert!(web_then["metadata"]["labels"].get("v").is_none());
    // Too new: 504 Timeout with ResourceVersionTooLarge, as the real server after its wait.
    let (status, body) = call(
        &api,
        "GET",
        &format!("{path}?resourceVersion={}", now + 100),
        None,
    );
    assert_eq!(status, 504);
    assert_eq!(
        body["details"]["causes"][0]["reason"],
        "ResourceVersionTooLarge"
    );
    // resourceVersionMatch needs a resourceVersion.
    assert_eq!(
        call(
            &api,
            "GET",
            &format!("{path}?resourceVersionMatch=Exact"),
            None
        )
        .0,
        400
    );
    // Exact at a compacted revision: 410.
    api.compact();
    let (status, body) = call(
        &api,
        "GET",
        &format!("{path}?resourceVersion={before}&resourceVersionMatch=Exact"),
        None,
    );
    assert_eq!((status, body["reason"].clone()), (410, json!("Expired")));
}

#[test]
fn writes_assign_server_fields_answer_status_errors_and_emit_ordered_events() {
    let api = api_with_fixtures();
    let start = api.resource_version();
    let path = "/api/v1/namespaces/shop/services";
    let mut body = service("shop", "cart", json!({"app": "cart"}), "10.96.10.50");
    body["status"] = json!({"loadBalancer": {"ingress": [{"ip": "192.0.2.9"}]}});

    let (status, created) = call(&api, "POST", path, Some(("application/json", &body)));
    assert_eq!(status, 201, "{created}");
    assert_eq!(rv_of(&created), start + 1);
    assert_eq!(created["metadata"]["generation"], 1);
    assert!(
        created["metadata"]["uid"]
            .as_str()
            .is_some_and(|u| u.len() == 36)
    );
    assert!(
        created["metadata"]["creationTimestamp"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );
    assert_eq!(
        created["status"],
        json!({"loadBalancer": {}}),
        "create resets status"
    );
    assert_eq!(created, api.get("svc", "shop", "cart").unwrap());

    let (status, conflict) = call(&api, "POST", path, Some(("application/json", &body)));
    assert_eq!(status, 409);
    assert_eq!(
        conflict,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": "services \"cart\" already exists", "reason": "AlreadyExists",
               "details": {"name": "cart", "kind": "services"}, "code": 409})
    );
    let mut wrong_ns = body.clone();
    wrong_ns["metadata"]["namespace"] = json!("default");
    assert_eq!(
        call(&api, "POST", path, Some(("application/json", &wrong_ns))).0,
        400
    );
    let mut nameless = body.clone();
    nameless["metadata"].as_object_mut().unwrap().remove("name");
    let (status, invalid) = call(&api, "POST", path, Some(("application/json", &nameless)));
    assert_eq!((status, invalid["reason"].clone()), (422, json!("Invalid")));

    // PUT: a stale resourceVersion conflicts; a current one replaces and bumps generation.
    let item = format!("{path}/cart");
    let mut stale = created.clone();
    stale["metadata"]["resourceVersion"] = json!(start.to_string());
    let (status, body409) = call(&api, "PUT", &item, Some(("application/json", &stale)));
    assert_eq!(
        (status, body409["reason"].clone()),
        (409, json!("Conflict"))
    );
    let mut update = created.clone();
    update["spec"]["ports"][0]["port"] = json!(81);
    update["status"] = json!({"loadBalancer": {"ingress": [{"ip": "192.0.2.99"}]}});
    let (status, updated) = call(&api, "PUT", &item, Some(("application/json", &update)));
    assert_eq!(status, 200, "{updated}");
    assert_eq!(rv_of(&updated), start + 2);
    assert_eq!(updated["metadata"]["generation"], 2);
    assert_eq!(updated["metadata"]["uid"], created["metadata"]["uid"]);
    assert_eq!(
        updated["status"],
        json!({"loadBalancer": {}}),
        "PUT keeps status"
    );
    // The same PUT again changes nothing: no new revision, no event.
    let mut same = updated.clone();
    same["status"] = json!({"ignored": true});
    let (status, unchanged) = call(&api, "PUT", &item, Some(("application/json", &same)));
    assert_eq!((status, rv_of(&unchanged)), (200, start + 2));

    // PUT /status changes only status.
    let mut with_status = updated.clone();
    with_status["status"] =
        json!({"loadBalancer": {"ingress": [{"ip": "192.0.2.77", "ipMode": "Proxy"}]}});
    with_status["spec"]["ports"][0]["port"] = json!(9999);
    let (status, status_updated) = call(
        &api,
        "PUT",
        &format!("{item}/status"),
        Some(("application/json", &with_status)),
    );
    assert_eq!(status, 200, "{status_updated}");
    assert_eq!(
        status_updated["status"]["loadBalancer"]["ingress"][0]["ipMode"],
        "Proxy"
    );
    assert_eq!(status_updated["spec"]["ports"][0]["port"], 81);
    assert_eq!(status_updated["metadata"]["generation"], 2);

    // Merge patch of labels: metadata only, generation unchanged.
    let patch = json!({"metadata": {"labels": {"app": null, "tier": "web"}}});
    let (status, patched) = call(
        &api,
        "PATCH",
        &item,
        Some(("application/merge-patch+json", &patch)),
    );
    assert_eq!(status, 200, "{patched}");
    assert_eq!(patched["metadata"]["labels"], json!({"tier": "web"}));
    assert_eq!(patched["metadata"]["generation"], 2);
    assert_eq!(rv_of(&patched), start + 4);
    let json_patch = json!([{"op": "replace", "path": "/spec/ports/0/port", "value": 82}]);
    let (status, patched) = call(
        &api,
        "PATCH",
        &item,
        Some(("application/json-patch+json", &json_patch)),
    );
    assert_eq!(
        (status, patched["spec"]["ports"][0]["port"].clone()),
        (200, json!(82))
    );
    assert_eq!(patched["metadata"]["generation"], 3);
    let (status, _) = call(
        &api,
        "PATCH",
        &item,
        Some(("application/apply-patch+yaml", &json!({}))),
    );
    assert_eq!(status, 415);

    // DELETE returns the last state; then 404.
    let (status, deleted) = call(&api, "DELETE", &item, None);
    assert_eq!(status, 200);
    assert_eq!(rv_of(&deleted), start + 6);
    assert_eq!(deleted["spec"]["ports"][0]["port"], 82);
    let (status, gone) = call(&api, "DELETE", &item, None);
    assert_eq!((status, gone["reason"].clone()), (404, json!("NotFound")));
    assert!(api.get("svc", "shop", "cart").is_none());

    // Every write is one event after `start`, in order, with its revision.
    let events = watch_events(
        &api,
        &format!("{path}?watch=true&resourceVersion={start}&timeoutSeconds=1"),
    );
    let summary: Vec<(String, u64)> = events
        .iter()
        .map(|e| (e["type"].as_str().unwrap().to_owned(), rv_of(&e["object"])))
        .collect();
    let expected: Vec<(String, u64)> = [
        ("ADDED", 1),
        ("MODIFIED", 2),
        ("MODIFIED", 3),
        ("MODIFIED", 4),
        ("MODIFIED", 5),
        ("DELETED", 6),
    ]
    .iter()
    .map(|(t, n)| (t.to_string(), start + n))
    .collect();
    assert_eq!(summary, expected);
    assert_eq!(events[0]["object"], created);
    assert_eq!(events[5]["object"], deleted);
    assert!(events.iter().all(|e| e["object"]["kind"] == "Service"));
}

#[test]
fn finalizers_hold_a_deletion_until_the_last_one_goes() {
    let api = api_with_fixtures();
    let item = "/api/v1/namespaces/shop/services/frontend-lb";
    let start = api.resource_version();
    let (status, marked) = call(&api, "DELETE", item, None);
    assert_eq!(status, 200);
    assert!(marked["metadata"]["deletionTimestamp"].is_string());
    assert!(
        api.get("svc", "shop", "frontend-lb").is_some(),
        "still there with a finalizer"
    );
    let patch = json!({"metadata": {"finalizers": null}});
    let (status, _) = call(
        &api,
        "PATCH",
        item,
        Some(("application/merge-patch+json", &patch)),
    );
    assert_eq!(status, 200);
    assert!(api.get("svc", "shop", "frontend-lb").is_none());
    let events = watch_events(
        &api,
        &format!("/api/v1/services?watch=1&resourceVersion={start}&timeoutSeconds=1"),
    );
    assert_eq!(
        event_summary(&events),
        [
            ("MODIFIED".to_owned(), "shop/frontend-lb".to_owned()),
            ("DELETED".to_owned(), "shop/frontend-lb".to_owned())
        ]
    );
}

#[test]
fn watch_filters_by_selector_and_turns_label_changes_into_added_and_deleted() {
    let api = api_with_fixtures();
    let start = api.resource_version();
    let mut web = api.get("svc", "shop", "web").unwrap();
    web["metadata"]["labels"]["service.kubernetes.io/service-proxy-name"] = json!("other");
    api.apply(web.clone()); // leaves the selection
    web["metadata"]["labels"]
        .as_object_mut()
        .unwrap()
        .remove("service.kubernetes.io/service-proxy-name");
    api.apply(web); // comes back
    let mut metrics = api.get("svc", "shop", "metrics").unwrap();
    metrics["spec"]["ports"][0]["port"] = json!(9091);
    api.apply(metrics); // never selected
    let mut api_svc = api.get("svc", "shop", "api").unwrap();
    api_svc["spec"]["ports"][0]["port"] = json!(8081);
    api.apply(api_svc); // selected throughout
    api.apply(service("default", "other-ns", json!({}), "10.96.0.77")); // other namespace
    let mut node = api.get("node", "", "node-a").unwrap();
    node["metadata"]["labels"]["x"] = json!("y");
    api.apply(node); // other type

    let selector = enc("!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless");
    let events = watch_events(
        &api,
        &format!(
            "/api/v1/namespaces/shop/services?watch=true&resourceVersion={start}&labelSelector={selector}&timeoutSeconds=1"
        ),
    );
    assert_eq!(
        event_summary(&events),
        [
            ("DELETED".to_owned(), "shop/web".to_owned()),
            ("ADDED".to_owned(), "shop/web".to_owned()),
            ("MODIFIED".to_owned(), "shop/api".to_owned()),
        ]
    );
    // The DELETED object is the last state that matched, at the revision that unmatched it.
    assert!(
        events[0]["object"]["metadata"]["labels"]
            .get("service.kubernetes.io/service-proxy-name")
            .is_none()
    );
    assert_eq!(rv_of(&events[0]["object"]), start + 1);
    assert_eq!(rv_of(&events[1]["object"]), start + 2);
    assert_eq!(rv_of(&events[2]["object"]), start + 4);

    let by_field = watch_events(
        &api,
        &format!(
            "/api/v1/services?watch=true&resourceVersion={start}&fieldSelector=metadata.namespace%3Ddefault&timeoutSeconds=1"
        ),
    );
    assert_eq!(
        event_summary(&by_field),
        [("ADDED".to_owned(), "default/other-ns".to_owned())]
    );
}

#[test]
fn watch_without_resource_version_replays_state_and_send_initial_events_ends_with_a_bookmark() {
    let api = api_with_fixtures();
    let (status, _) = call(
        &api,
        "GET",
        "/api/v1/namespaces/shop/endpointslices?watch=true&timeoutSeconds=1",
        None,
    );
    assert_eq!(status, 404, "endpointslices are not core v1");
    let events = watch_events(
        &api,
        "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices?watch=true&timeoutSeconds=1",
    );
    let expected: Vec<(String, String)> = ALL_SLICES
        .iter()
        .filter(|n| n.starts_with("shop/"))
        .map(|n| ("ADDED".to_owned(), n.to_string()))
        .collect();
    assert_eq!(event_summary(&events), expected);
    assert_eq!(
        events[0]["object"],
        api.get("endpointslices", "shop", "api-2bh6k").unwrap(),
        "watch events carry kind and apiVersion"
    );

    api.set_bookmark_interval(None);
    let rv = api.resource_version();
    let events = watch_events(
        &api,
        "/api/v1/nodes?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true&timeoutSeconds=1",
    );
    assert_eq!(events.len(), 3);
    assert_eq!(
        event_summary(&events[..2]),
        [
            ("ADDED".to_owned(), "node-a".to_owned()),
            ("ADDED".to_owned(), "node-b".to_owned())
        ]
    );
    assert_eq!(
        events[2],
        json!({"type": "BOOKMARK", "object": {"kind": "Node", "apiVersion": "v1", "metadata": {
            "resourceVersion": rv.to_string(), "creationTimestamp": null,
            "annotations": {"k8s.io/initial-events-end": "true"}}}})
    );
    // sendInitialEvents needs resourceVersionMatch=NotOlderThan and bookmarks.
    for bad in [
        "/api/v1/nodes?watch=true&sendInitialEvents=true&allowWatchBookmarks=true",
        "/api/v1/nodes?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan",
        "/api/v1/nodes?watch=true&resourceVersionMatch=Exact&resourceVersion=1",
    ] {
        let (status, body) = call(&api, "GET", &format!("{bad}&timeoutSeconds=1"), None);
        assert_eq!(
            (status, body["reason"].clone()),
            (400, json!("BadRequest")),
            "{bad}"
        );
    }
}

#[test]
fn bookmarks_carry_only_the_current_resource_version() {
    let api = api_with_fixtures();
    api.set_bookmark_interval(Some(Duration::from_millis(300)));
    let rv = api.resource_version();
    let started = Instant::now();
    let events = watch_events(
        &api,
        &format!(
            "/api/v1/services?watch=true&resourceVersion={rv}&allowWatchBookmarks=true&timeoutSeconds=2"
        ),
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(4),
        "timeoutSeconds=2 took {took:?}"
    );
    assert!(
        (4..=8).contains(&events.len()),
        "bookmarks every 300 ms for 2 s: {events:?}"
    );
    for e in &events {
        assert_eq!(
            e,
            &json!({"type": "BOOKMARK", "object": {"kind": "Service", "apiVersion": "v1",
                "metadata": {"resourceVersion": rv.to_string(), "creationTimestamp": null}}})
        );
    }
    // Without allowWatchBookmarks there are none.
    let events = watch_events(
        &api,
        &format!("/api/v1/services?watch=true&resourceVersion={rv}&timeoutSeconds=1"),
    );
    assert!(events.is_empty(), "{events:?}");
}

#[test]
fn watch_from_a_compacted_revision_gets_a_410_error_event() {
    let api = api_with_fixtures();
    let old = api.resource_version();
    api.delete("svc", "shop", "legacy").unwrap();
    api.compact();
    let events = watch_events(
        &api,
        &format!(
            "/api/v1/services?watch=true&resourceVersion={old}&allowWatchBookmarks=true&timeoutSeconds=5"
        ),
    );
    assert_eq!(
        events,
        [
            json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": format!("too old resource version: {old} ({})", old + 2),
            "reason": "Expired", "code": 410}})
        ]
    );
    // From the current revision the watch works.
    let now = api.resource_version();
    api.set_bookmark_interval(Some(Duration::from_millis(200)));
    let events = watch_events(
        &api,
        &format!(
            "/api/v1/services?watch=true&resourceVersion={now}&allowWatchBookmarks=true&timeoutSeconds=1"
        ),
    );
    assert!(
        !events.is_empty() && events.iter().all(|e| e["type"] == "BOOKMARK"),
        "{events:?}"
    );

    // A bounded history expires the oldest revisions by itself.
    api.set_max_history(2);
    let before = api.resource_version();
    for port in [1, 2, 3] {
        let mut web = api.get("svc", "shop", "web").unwrap();
        web["spec"]["ports"][0]["port"] = json!(port);
        api.apply(web);
    }
    let events = watch_events(
        &api,
        &format!("/api/v1/services?watch=true&resourceVersion={before}&timeoutSeconds=1"),
    );
    assert_eq!(events[0]["object"]["code"], 410, "{events:?}");
    let events = watch_events(
        &api,
        &format!(
            "/api/v1/services?watch=true&resourceVersion={}&timeoutSeconds=1",
            before + 1
        ),
    );
    assert_eq!(
        event_summary(&events),
        [
            ("MODIFIED".to_owned(), "shop/web".to_owned()),
            ("MODIFIED".to_owned(), "shop/web".to_owned())
        ]
    );
}

#[test]
fn stop_drops_connections_and_restart_serves_the_same_state_on_the_same_port() {
    let mut api = api_with_fixtures();
    let addr = api.addr();
    let rv = api.resource_version();
    // An open watch ends when the server stops.
    let watcher = {
        let addr = api.addr();
        std::thread::spawn(move || {
            http::request(
                addr,
                "GET",
                "/api/v1/services?watch=true&resourceVersion=1&timeoutSeconds=30",
                None,
                IO,
            )
        })
    };
    assert!(wait_until(IO, || api.watch_count("/api/v1/services") == 1));
    let stopped_at = Instant::now();
    api.stop();
    assert!(!api.is_running());
    let result = watcher.join().unwrap();
    assert!(stopped_at.elapsed() < Duration::from_secs(5));
    // Cut off mid-stream: the chunked body never ends properly.
    assert!(
        result.is_err() || result.as_ref().is_ok_and(|r| r.status == 200),
        "{result:?}"
    );
    let refused = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1));
    assert!(refused.is_err(), "port still open after stop");
    // In-process writes go on during the outage.
    api.delete("svc", "shop", "legacy").unwrap();
    api.restart().expect("restart on the same port");
    assert_eq!(api.addr(), addr);
    let list = get(&api, "/api/v1/services");
    assert_eq!(list["metadata"]["resourceVersion"], (rv + 1).to_string());
    assert!(!names(&list).contains(&"shop/legacy".to_owned()));
    let paths: Vec<RequestRecord> = api.requests();
    assert!(
        paths
            .iter()
            .any(|r| r.watch && r.param("resourceVersion").as_deref() == Some("1"))
    );
}

// ---------------------------------------------------------------------------------------------
// kubectl
// ---------------------------------------------------------------------------------------------

struct Kubectl {
    kubeconfig: PathBuf,
    cache: PathBuf,
    _dir: TempDir,
}

impl Kubectl {
    fn new(api: &KubeApi) -> Kubectl {
        let dir = TempDir::new("kubectl");
        let kubeconfig = dir.path().join("kubeconfig");
        api.kubeconfig(&kubeconfig).unwrap();
        Kubectl {
            kubeconfig,
            cache: dir.path().join("cache"),
            _dir: dir,
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("kubectl");
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(&self.cache)
            .args(args)
            .env_remove("KUBECONFIG");
        cmd
    }

    #[track_caller]
    fn run(&self, args: &[&str]) -> String {
        let out = run_bounded(&mut self.command(args), Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("kubectl {args:?}: {e} (is kubectl installed?)"));
        assert!(out.status.success(), "kubectl {args:?}: {}", out.describe());
        out.stdout
    }

    #[track_caller]
    fn json(&self, args: &[&str]) -> Value {
        let out = self.run(args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("kubectl {args:?}: {e}: {out}"))
    }
}

#[test]
fn kubectl_gets_the_objects_the_server_holds() {
    let api = api_with_fixtures();
    let kubectl = Kubectl::new(&api);
    let services = kubectl.json(&["get", "services", "-A", "-o", "json"]);
    assert_eq!(services["items"], json!(api.list("services")));
    let slices = kubectl.json(&["get", "endpointslices", "-A", "-o", "json"]);
    assert_eq!(slices["items"], json!(api.list("endpointslices")));
    let nodes = kubectl.json(&["get", "nodes", "-o", "json"]);
    assert_eq!(nodes["items"], json!(api.list("nodes")));

    let not_headless = kubectl.json(&[
        "get",
        "endpointslices",
        "-A",
        "-o",
        "json",
        "-l",
        "!service.kubernetes.io/headless",
    ]);
    let expected: Vec<Value> = api
        .list("endpointslices")
        .into_iter()
        .filter(|s| key(s) != "shop/db-h8s7d")
        .collect();
    assert_eq!(not_headless["items"], json!(expected));
    let proxied = kubectl.json(&[
        "get",
        "services",
        "-A",
        "-o",
        "json",
        "-l",
        "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless",
    ]);
    let expected: Vec<Value> = api
        .list("services")
        .into_iter()
        .filter(|s| key(s) != "shop/metrics")
        .collect();
    assert_eq!(proxied["items"], json!(expected));
    let one = kubectl.json(&["get", "service", "-n", "shop", "proxy-lb", "-o", "json"]);
    assert_eq!(one, api.get("svc", "shop", "proxy-lb").unwrap());
    assert_eq!(
        one["status"]["loadBalancer"]["ingress"][0]["ipMode"],
        "Proxy"
    );

    // Human-readable output comes from the server's Tables.
    let table = kubectl.run(&["get", "nodes"]);
    let rows: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows[0], ["NAME", "STATUS", "ROLES", "AGE", "VERSION"]);
    assert_eq!(
        (rows[1][0], rows[1][1], rows[1][2], rows[1][4]),
        ("node-a", "Ready", "control-plane", "v1.33.0")
    );
    assert_eq!(
        (rows[2][0], rows[2][1], rows[2][2], rows[2][4]),
        ("node-b", "Ready", "<none>", "v1.33.0")
    );
    assert_eq!(rows.len(), 3);
    let wide = kubectl.run(&[
        "get",
        "services",
        "-n",
        "shop",
        "-o",
        "wide",
        "-l",
        "app=frontend",
    ]);
    let lines: Vec<&str> = wide.lines().collect();
    assert_eq!(lines.len(), 3, "{wide}");
    assert!(lines[0].split_whitespace().eq([
        "NAME",
        "TYPE",
        "CLUSTER-IP",
        "EXTERNAL-IP",
        "PORT(S)",
        "AGE",
        "SELECTOR"
    ]));
    let lb: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        (lb[0], lb[1], lb[2], lb[3], lb[4], lb[6]),
        (
            "frontend-lb",
            "LoadBalancer",
            "10.96.10.30",
            "192.0.2.100",
            "80:31080/TCP",
            "app=frontend"
        )
    );
    let names_only = kubectl.run(&["get", "svc", "-A", "-o", "name", "-l", "app in (web,db)"]);
    assert_eq!(
        names_only.lines().collect::<Vec<_>>(),
        ["service/db", "service/web"]
    );

    // Writes through kubectl: label, annotate, delete.
    kubectl.run(&["label", "service", "-n", "shop", "web", "team=payments"]);
    kubectl.run(&["annotate", "service", "-n", "shop", "web", "note=hi"]);
    let web = api.get("svc", "shop", "web").unwrap();
    assert_eq!(web["metadata"]["labels"]["team"], "payments");
    assert_eq!(web["metadata"]["annotations"]["note"], "hi");
    kubectl.run(&["delete", "service", "-n", "shop", "legacy"]);
    assert!(api.get("svc", "shop", "legacy").is_none());
    let missing = run_bounded(
        &mut kubectl.command(&["get", "service", "-n", "shop", "legacy"]),
        Duration::from_secs(30),
    )
    .unwrap();
    assert!(!missing.status.success());
    assert!(
        missing.stderr.contains("services \"legacy\" not found"),
        "{}",
        missing.describe()
    );
    // kubectl needed discovery, and nothing here needed OpenAPI.
    assert!(api.request_count("/api") > 0 && api.request_count("/apis") > 0);
    assert_eq!(
        api.request_count("/openapi/v2") + api.request_count("/openapi/v3"),
        0
    );
}

/// Reads concatenated JSON values from a child's stdout on a thread.
fn json_values(child: &mut Child) -> mpsc::Receiver<Value> {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for value in
            serde_json::Deserializer::from_reader(BufReader::new(stdout)).into_iter::<Value>()
        {
            match value {
                Ok(v) => {
                    if tx.send(v).is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    });
    rx
}

/// Kills a child process on drop.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn kubectl_watch_sees_the_objects_then_added_modified_deleted_in_order() {
    let api = api_with_fixtures();
    let kubectl = Kubectl::new(&api);
    let mut child = kubectl
        .command(&[
            "get",
            "services",
            "-A",
            "--watch",
            "-o",
            "json",
            "--output-watch-events",
            "--request-timeout=60s",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn kubectl (is it installed?)");
    let events = json_values(&mut child);
    let _guard = KillOnDrop(child);
    let next = |what: &str| -> Value {
        events
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("kubectl printed no {what}: {e}"))
    };
    let mut initial = Vec::new();
    for _ in ALL_SERVICES {
        initial.push(next("initial event"));
    }
    assert_eq!(
        event_summary(&initial),
        ALL_SERVICES
            .iter()
            .map(|n| ("ADDED".to_owned(), n.to_string()))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        initial
            .iter()
            .map(|e| e["object"].clone())
            .collect::<Vec<_>>(),
        api.list("services")
    );
    // The watch is open once the server has answered it.
    assert!(
        wait_until(IO, || api.watch_count("/api/v1/services") == 1),
        "{:?}",
        api.requests()
    );

    let added = api.apply(service(
        "shop",
        "cart",
        json!({"app": "cart"}),
        "10.96.10.50",
    ));
    let mut changed = added.clone();
    changed["spec"]["ports"][0]["port"] = json!(8080);
    let modified = api.apply(changed);
    let deleted = api.delete("svc", "shop", "cart").unwrap();
    let got: Vec<Value> = (0..3).map(|_| next("change event")).collect();
    assert_eq!(
        got,
        [
            json!({"type": "ADDED", "object": added}),
            json!({"type": "MODIFIED", "object": modified}),
            json!({"type": "DELETED", "object": deleted}),
        ]
    );
    let watch = api.requests().into_iter().find(|r| r.watch).unwrap();
    assert_eq!(
        watch.param("resourceVersion"),
        Some((rv_of(&added) - 1).to_string())
    );
}

// ---------------------------------------------------------------------------------------------
// The official Python client
// ---------------------------------------------------------------------------------------------

/// The venv `cargo xtask setup` makes (`/opt/mesh-test/python`), or `$MESH_TEST_PYTHON`.
/// Installs the client there when it is missing, so the test also runs without setup.
fn python_with_kubernetes() -> PathBuf {
    let python = std::env::var_os("MESH_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/mesh-test/python/bin/python"));
    let has_client = |python: &Path| {
        run_bounded(
            Command::new(python).args(["-c", "import kubernetes"]),
            Duration::from_secs(30),
        )
        .is_ok_and(|o| o.status.success())
    };
    if has_client(&python) {
        return python;
    }
    let venv = python
        .parent()
        .and_then(Path::parent)
        .expect("<venv>/bin/python");
    eprintln!(
        "kube_api: installing the Python Kubernetes client into {}",
        venv.display()
    );
    if !python.exists() {
        let out = run_bounded(
            Command::new("/usr/bin/python3")
                .arg("-m")
                .arg("venv")
                .arg(venv),
            Duration::from_secs(120),
        )
        .unwrap_or_else(|e| panic!("python3 -m venv: {e}"));
        assert!(
            out.status.success(),
            "python3 -m venv {}: {}",
            venv.display(),
            out.describe()
        );
    }
    let out = run_bounded(
        Command::new(&python).args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "kubernetes==37.0.2",
        ]),
        Duration::from_secs(300),
    )
    .unwrap_or_else(|e| panic!("pip install kubernetes: {e}"));
    assert!(
        out.status.success(),
        "pip install kubernetes (or run `cargo xtask setup`): {}",
        out.describe()
    );
    assert!(
        has_client(&python),
        "kubernetes still not importable by {}",
        python.display()
    );
    python
}

const PYTHON_SCRIPT: &str = r#"
import json, sys
from kubernetes import client, config, watch

def out(**kw):
    print(json.dumps(kw), flush=True)

config.load_kube_config(config_file=sys.argv[1])
v1 = client.CoreV1Api()
services = v1.list_service_for_all_namespaces()
out(step="list", rv=services.metadata.resource_version,
    names=[s.metadata.namespace + "/" + s.metadata.name for s in services.items],
    web=[{"clusterIPs": s.spec.cluster_ips, "ipFamilies": s.spec.ip_families, "policy": s.spec.ip_family_policy,
          "ports": [[p.name, p.port, p.target_port] for p in s.spec.ports]}
         for s in services.items if s.metadata.name == "web"][0],
    lb=[[i.ip, i.hostname, i.ip_mode] for s in services.items if s.metadata.name == "proxy-lb"
        for i in s.status.load_balancer.ingress])

discovery = client.DiscoveryV1Api()
pages, names, token = 0, [], None
while True:
    page = discovery.list_namespaced_endpoint_slice("shop", limit=2, _continue=token)
    pages += 1
    names += [s.metadata.name for s in page.items]
    token = page.metadata._continue
    if not token:
        break
web = [s for s in discovery.list_namespaced_endpoint_slice("shop", label_selector="kubernetes.io/service-name=web").items]
out(step="pages", pages=pages, names=names,
    web_ports={s.metadata.name: {p.name: p.port for p in s.ports} for s in web},
    terminating=[e.addresses[0] for s in web for e in s.endpoints if e.conditions.terminating])

old_rv = sys.stdin.readline().strip()
try:
    for event in watch.Watch().stream(v1.list_service_for_all_namespaces, resource_version=old_rv, timeout_seconds=5):
        out(step="unexpected", type=event["type"])
    out(step="no-error")
except client.exceptions.ApiException as e:
    out(step="expired", status=e.status, reason=e.reason)

relisted = v1.list_service_for_all_namespaces()
out(step="relisted", rv=relisted.metadata.resource_version,
    names=[s.metadata.namespace + "/" + s.metadata.name for s in relisted.items])
w = watch.Watch()
seen = 0
for event in w.stream(v1.list_service_for_all_namespaces, resource_version=relisted.metadata.resource_version,
                      timeout_seconds=20, allow_watch_bookmarks=True):
    if event["type"] == "BOOKMARK":
        continue
    o = event["object"]
    out(step="event", type=event["type"], name=o.metadata.namespace + "/" + o.metadata.name,
        rv=o.metadata.resource_version)
    seen += 1
    if seen == 3:
        w.stop()
out(step="done")
"#;

#[test]
fn python_client_lists_pages_and_relists_after_410() {
    let python = python_with_kubernetes();
    let api = api_with_fixtures();
    let dir = TempDir::new("python");
    let kubeconfig = dir.path().join("kubeconfig");
    api.kubeconfig(&kubeconfig).unwrap();
    let script = dir.path().join("client.py");
    std::fs::write(&script, PYTHON_SCRIPT).unwrap();
    let mut child = Command::new(&python)
        .arg(&script)
        .arg(&kubeconfig)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn python");
    let mut stdin = child.stdin.take().unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let (tx, lines) = mpsc::channel::<Value>();
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            let value = serde_json::from_str(&line)
                .unwrap_or_else(|_| json!({"step": "garbage", "line": line}));
            if tx.send(value).is_err() {
                return;
            }
        }
    });
    let _guard = KillOnDrop(child);
    let next = |step: &str| -> Value {
        let v = lines
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("python printed no {step:?} line: {e}"));
        assert_eq!(v["step"], step, "{v}");
        v
    };

    let list = next("list");
    assert_eq!(list["rv"], api.resource_version().to_string());
    assert_eq!(list["names"], json!(ALL_SERVICES));
    assert_eq!(
        list["web"],
        json!({"clusterIPs": ["10.96.10.10", "fd00:10:96::a"], "ipFamilies": ["IPv4", "IPv6"],
               "policy": "RequireDualStack", "ports": [["http", 80, "http"], ["https", 443, 8443]]})
    );
    assert_eq!(
        list["lb"],
        json!([
            ["192.0.2.101", null, "Proxy"],
            ["2001:db8::101", null, "Proxy"],
            [null, "lb.example.com", "Proxy"]
        ])
    );

    let pages = next("pages");
    assert_eq!(pages["pages"], 4);
    let shop: Vec<&str> = ALL_SLICES
        .iter()
        .filter_map(|n| n.strip_prefix("shop/"))
        .collect();
    assert_eq!(pages["names"], json!(shop));
    assert_eq!(
        pages["web_ports"],
        json!({"web-4vq8n": {"http": 8080, "https": 8443}, "web-9kd2p": {"http": 8081, "https": 8443},
               "web-x7m3c": {"http": 8080, "https": 8443}})
    );
    assert_eq!(pages["terminating"], json!(["10.244.2.9"]));

    // Changes the client did not watch, then compaction: its resourceVersion is gone.
    let old_rv = api.resource_version();
    api.delete("svc", "shop", "legacy").unwrap();
    api.compact();
    use std::io::Write as _;
    writeln!(stdin, "{old_rv}").unwrap();
    let expired = next("expired");
    assert_eq!(expired["status"], 410, "{expired}");
    assert!(
        expired["reason"].as_str().unwrap().starts_with("Expired"),
        "{expired}"
    );

    let relisted = next("relisted");
    let relist_rv = api.resource_version().to_string();
    assert_eq!(relisted["rv"], relist_rv);
    let without_legacy: Vec<&str> = ALL_SERVICES
        .iter()
        .copied()
        .filter(|n| *n != "shop/legacy")
        .collect();
    assert_eq!(relisted["names"], json!(without_legacy));
    // Write once its watch from the relisted revision is open.
    assert!(
        wait_until(IO, || api.requests().iter().any(|r| r.watch
            && r.param("resourceVersion").as_deref()
                == Some(relist_rv.as_str()))),
        "{:?}",
        api.requests()
    );
    let added = api.apply(service(
        "shop",
        "cart",
        json!({"app": "cart"}),
        "10.96.10.50",
    ));
    let mut web = api.get("svc", "shop", "web").unwrap();
    web["spec"]["ports"][0]["port"] = json!(8000);
    let modified = api.apply(web);
    let deleted = api.delete("svc", "shop", "api").unwrap();
    let events: Vec<(String, String, String)> = (0..3)
        .map(|_| {
            let e = next("event");
            (
                e["type"].as_str().unwrap().to_owned(),
                e["name"].as_str().unwrap().to_owned(),
                e["rv"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        events,
        [
            (
                "ADDED".to_owned(),
                "shop/cart".to_owned(),
                rv_of(&added).to_string()
            ),
            (
                "MODIFIED".to_owned(),
                "shop/web".to_owned(),
                rv_of(&modified).to_string()
            ),
            (
                "DELETED".to_owned(),
                "shop/api".to_owned(),
                rv_of(&deleted).to_string()
            ),
        ]
    );
    next("done");
}

// ---------------------------------------------------------------------------------------------
// kube-rs
// ---------------------------------------------------------------------------------------------

mod kube_rs {
    use super::*;
    use futures_util::StreamExt as _;
    use k8s_openapi::api::core::v1::Service;
    use kube::api::{Api, ListParams, WatchEvent, WatchParams};
    use kube::config::{KubeConfigOptions, Kubeconfig};
    use kube::runtime::WatchStreamExt as _;
    use kube::runtime::watcher::{self, Event};

    async fn client(api: &KubeApi, dir: &TempDir) -> kube::Client {
        let path = dir.path().join("kubeconfig");
        api.kubeconfig(&path).unwrap();
        let kubeconfig = Kubeconfig::read_from(&path).expect("read kubeconfig");
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .expect("kube config from kubeconfig");
        kube::Client::try_from(config).expect("kube client")
    }

    fn keyed(svc: &Service) -> String {
        format!(
            "{}/{}",
            svc.metadata.namespace.as_deref().unwrap_or_default(),
            svc.metadata.name.as_deref().unwrap_or_default()
        )
    }

    /// What the watcher yields, reduced to comparable text: `Init`, `InitApply ns/name`, ...,
    /// `Error 410`.
    fn describe(event: &Result<Event<Service>, watcher::Error>) -> String {
        match event {
            Ok(Event::Init) => "Init".into(),
            Ok(Event::InitApply(s)) => format!("InitApply {}", keyed(s)),
            Ok(Event::InitDone) => "InitDone".into(),
            Ok(Event::Apply(s)) => format!("Apply {}", keyed(s)),
            Ok(Event::Delete(s)) => format!("Delete {}", keyed(s)),
            Err(watcher::Error::WatchError(status)) => format!("Error {}", status.code),
            Err(e) => format!("Failed {e}"),
        }
    }

    struct AbortOnDrop(tokio::task::JoinHandle<()>);

    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }

    /// `wait_until` for async tests: polls without blocking the runtime.
    async fn wait_async(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if condition() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        condition()
    }

    const SELECTED: &[&str] = &[
        "default/kubernetes",
        "kube-system/kube-dns",
        "shop/api",
        "shop/db",
        "shop/frontend-lb",
        "shop/legacy",
        "shop/proxy-lb",
        "shop/web",
    ];

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watcher_lists_watches_uses_bookmarks_and_relists_after_410() {
        let mut api = api_with_fixtures();
        let dir = TempDir::new("kube-rs");
        let client = client(&api, &dir).await;
        let services: Api<Service> = Api::all(client);
        let config = watcher::Config::default()
            .labels("!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless")
            .timeout(2);
        // The watcher runs on its own task, so that it reads bookmarks and re-watches while the
        // test waits; its events come through a channel.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut stream = std::pin::pin!(watcher::watcher(services, config).default_backoff());
            while let Some(event) = stream.next().await {
                if tx.send(event).is_err() {
                    return;
                }
            }
        });
        let _abort = AbortOnDrop(task);
        let mut next = async || -> Result<Event<Service>, watcher::Error> {
            tokio::time::timeout(Duration::from_secs(20), rx.recv())
                .await
                .expect("a watcher event within 20 s")
                .expect("the watcher stream does not end")
        };
        let mut initial = vec![describe(&next().await)];
        loop {
            let e = next().await;
            let done = matches!(e, Ok(Event::InitDone));
            if let Ok(Event::InitApply(s)) = &e {
                let stored = api
                    .get(
                        "svc",
                        s.metadata.namespace.as_deref().unwrap(),
                        s.metadata.name.as_deref().unwrap(),
                    )
                    .unwrap();
                assert_eq!(
                    serde_json::to_value(s).unwrap(),
                    stored,
                    "kube-rs read the object whole"
                );
            }
            initial.push(describe(&e));
            if done {
                break;
            }
        }
        let mut expected = vec!["Init".to_owned()];
        expected.extend(SELECTED.iter().map(|n| format!("InitApply {n}")));
        expected.push("InitDone".into());
        assert_eq!(initial, expected);

        // Live changes; the service-proxy-name one is filtered out by the server.
        api.apply(service(
            "shop",
            "cart",
            json!({"app": "cart"}),
            "10.96.10.50",
        ));
        api.apply(service(
            "shop",
            "foreign",
            json!({"service.kubernetes.io/service-proxy-name": "x"}),
            "10.96.10.51",
        ));
        let mut web = api.get("svc", "shop", "web").unwrap();
        web["spec"]["ports"][0]["port"] = json!(8000);
        api.apply(web);
        api.delete("svc", "shop", "cart").unwrap();
        let mut live = Vec::new();
        for _ in 0..3 {
            let e = next().await;
            if let Ok(Event::Apply(s)) = &e
                && s.metadata.name.as_deref() == Some("web")
            {
                assert_eq!(
                    s.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port,
                    8000
                );
            }
            live.push(describe(&e));
        }
        assert_eq!(
            live,
            ["Apply shop/cart", "Apply shop/web", "Delete shop/cart"]
        );

        // Bookmarks: writes to another type advance the revision; the watcher learns it from
        // a bookmark and resumes its next watch (after timeoutSeconds=2) from there.
        api.set_bookmark_interval(Some(Duration::from_millis(200)));
        let mut node = api.get("node", "", "node-b").unwrap();
        node["metadata"]["labels"]["bumped"] = json!("yes");
        api.apply(node);
        let bumped = api.resource_version().to_string();
        assert!(
            wait_async(Duration::from_secs(10), || api.requests().iter().any(|r| r
                .watch
                && r.path == "/api/v1/services"
                && r.param("resourceVersion").as_deref() == Some(bumped.as_str())
                && r.param("allowWatchBookmarks").as_deref() == Some("true")))
            .await,
            "no re-watch from the bookmarked revision {bumped}: {:?}",
            api.requests()
                .iter()
                .filter(|r| r.watch)
                .collect::<Vec<_>>()
        );

        // Outage: changes it cannot see, compaction, restart. Its resumed watch gets 410, it
        // relists and converges on the server's state.
        api.set_bookmark_interval(None);
        api.stop();
        let mut lb = api.get("svc", "shop", "proxy-lb").unwrap();
        lb["status"]["loadBalancer"]["ingress"] = json!([{"ip": "192.0.2.200", "ipMode": "Proxy"}]);
        api.apply(lb);
        api.delete("svc", "shop", "legacy").unwrap();
        api.apply(service("default", "late", json!({}), "10.96.0.88"));
        api.compact();
        let lists_before = api
            .requests()
            .iter()
            .filter(|r| !r.watch && r.path == "/api/v1/services")
            .count();
        api.restart().unwrap();
        let mut after = Vec::new();
        let mut relisted = std::collections::BTreeMap::new();
        loop {
            let e = next().await;
            if let Err(watcher::Error::WatchStartFailed(_) | watcher::Error::WatchFailed(_)) = &e {
                continue; // connection refused/reset during the outage
            }
            if let Ok(Event::InitApply(s)) = &e {
                relisted.insert(keyed(s), serde_json::to_value(s).unwrap());
            }
            let done = matches!(e, Ok(Event::InitDone));
            after.push(describe(&e));
            if done {
                break;
            }
        }
        let mut expected = vec!["Error 410".to_owned(), "Init".to_owned()];
        let mut now: Vec<String> = SELECTED
            .iter()
            .filter(|n| **n != "shop/legacy")
            .map(|n| n.to_string())
            .collect();
        now.insert(1, "default/late".into());
        expected.extend(now.iter().map(|n| format!("InitApply {n}")));
        expected.push("InitDone".into());
        assert_eq!(after, expected);
        let selected_now: std::collections::BTreeMap<String, Value> = api
            .list("services")
            .into_iter()
            .filter(|s| now.contains(&key(s)))
            .map(|s| (key(&s), s))
            .collect();
        assert_eq!(relisted, selected_now, "converged on the server's objects");
        let lists_after = api
            .requests()
            .iter()
            .filter(|r| !r.watch && r.path == "/api/v1/services")
            .count();
        assert_eq!(lists_after, lists_before + 1, "one relist");
        let expired_watch = api
            .requests()
            .into_iter()
            .rfind(|r| r.watch && r.param("resourceVersion").as_deref() == Some(bumped.as_str()));
        assert!(expired_watch.is_some());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn raw_watch_decodes_bookmarks_and_the_410_status() {
        let api = api_with_fixtures();
        let dir = TempDir::new("kube-rs-raw");
        let services: Api<Service> = Api::namespaced(client(&api, &dir).await, "shop");
        let list = services
            .list(&ListParams::default().limit(3).labels("app"))
            .await
            .unwrap();
        assert_eq!(list.items.len(), 3);
        assert!(list.metadata.continue_.is_some());
        let rest = services
            .list(
                &ListParams::default()
                    .limit(10)
                    .labels("app")
                    .continue_token(list.metadata.continue_.as_deref().unwrap()),
            )
            .await
            .unwrap();
        assert_eq!(list.items.len() + rest.items.len(), 7);

        api.set_bookmark_interval(Some(Duration::from_millis(100)));
        let rv = api.resource_version().to_string();
        let mut events = services
            .watch(&WatchParams::default().timeout(1), &rv)
            .await
            .unwrap()
            .boxed();
        match events.next().await {
            Some(Ok(WatchEvent::Bookmark(b))) => assert_eq!(b.metadata.resource_version, rv),
            other => panic!(
                "expected a bookmark, got {:?}",
                other.map(|r| r.map(|_| ()))
            ),
        }
        drop(events);

        let old = rv;
        api.delete("svc", "shop", "legacy").unwrap();
        api.compact();
        let mut events = services
            .watch(&WatchParams::default().timeout(5), &old)
            .await
            .unwrap()
            .boxed();
        match events.next().await {
            Some(Ok(WatchEvent::Error(status))) => {
                assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
            }
            other => panic!(
                "expected a 410 ERROR event, got {:?}",
                other.map(|r| r.map(|_| ()))
            ),
        }
        assert!(
            events.next().await.is_none(),
            "the stream ends after the error"
        );
        let missing = services.get("legacy").await.unwrap_err();
        match missing {
            kube::Error::Api(status) => {
                assert_eq!((status.code, status.reason.as_str()), (404, "NotFound"))
            }
            other => panic!("expected a 404 Status, got {other}"),
        }
    }
}
