//! Server-side printing: `meta.k8s.io/v1` `Table`s for clients that ask for them with
//! `Accept: application/json;as=Table;v=v1;g=meta.k8s.io` (kubectl's human-readable output),
//! with the columns of the real server's printers for the served types.

use std::time::SystemTime;

use serde_json::{Value, json};

use super::resources::{RESOURCES, ResourceId};

/// What each row carries (`includeObject`): default `Metadata` (a `PartialObjectMetadata`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IncludeObject {
    None,
    Metadata,
    Object,
}

impl IncludeObject {
    pub fn parse(value: Option<&str>) -> IncludeObject {
        match value {
            Some("None") => IncludeObject::None,
            Some("Object") => IncludeObject::Object,
            _ => IncludeObject::Metadata,
        }
    }
}

/// Whether the Accept header asks for a Table before anything else.
pub fn wants_table(accept: &str) -> bool {
    accept
        .split(',')
        .next()
        .is_some_and(|first| first.contains("as=Table") && first.contains("g=meta.k8s.io"))
}

/// `doc` (an object or a list) as a Table when `accept` asks for one, else unchanged.
pub fn maybe_table(
    resource: ResourceId,
    doc: Value,
    accept: &str,
    include: IncludeObject,
) -> Value {
    if !wants_table(accept) {
        return doc;
    }
    let r = &RESOURCES[resource];
    let (objects, metadata) = match doc.get("items").and_then(Value::as_array) {
        Some(items) => (items.clone(), doc["metadata"].clone()),
        None => (
            vec![doc.clone()],
            json!({"resourceVersion": doc["metadata"]["resourceVersion"]}),
        ),
    };
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| {
            let mut row = json!({"cells": cells(r.kind, o)});
            match include {
                IncludeObject::None => {}
                IncludeObject::Metadata => {
                    row["object"] = json!({
                        "kind": "PartialObjectMetadata",
                        "apiVersion": "meta.k8s.io/v1",
                        "metadata": o["metadata"],
                    });
                }
                IncludeObject::Object => {
                    let mut object = o.clone();
                    object["kind"] = json!(r.kind);
                    object["apiVersion"] = json!(r.api_version());
                    row["object"] = object;
                }
            }
            row
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": metadata,
        "columnDefinitions": columns(r.kind),
        "rows": rows,
    })
}

fn column(name: &str, kind: &str, format: &str, priority: u8, description: &str) -> Value {
    json!({"name": name, "type": kind, "format": format, "description": description, "priority": priority})
}

fn columns(kind: &str) -> Vec<Value> {
    let name = column(
        "Name",
        "string",
        "name",
        0,
        "Name must be unique within a namespace.",
    );
    let age = column(
        "Age",
        "string",
        "",
        0,
        "CreationTimestamp is a timestamp representing the server time when this object was created.",
    );
    match kind {
        "Service" => vec![
            name,
            column(
                "Type",
                "string",
                "",
                0,
                "type determines how the Service is exposed.",
            ),
            column(
                "Cluster-IP",
                "string",
                "",
                0,
                "clusterIP is the IP address of the service.",
            ),
            column(
                "External-IP",
                "string",
                "",
                0,
                "externalIPs and load balancer ingress.",
            ),
            column(
                "Port(s)",
                "string",
                "",
                0,
                "The list of ports that are exposed by this service.",
            ),
            age,
            column(
                "Selector",
                "string",
                "",
                1,
                "Route service traffic to pods with label keys and values matching this selector.",
            ),
        ],
        "Node" => vec![
            name,
            column("Status", "string", "", 0, "The status of the node"),
            column("Roles", "string", "", 0, "The roles of the node"),
            age,
            column(
                "Version",
                "string",
                "",
                0,
                "Kubelet Version reported by the node.",
            ),
            column(
                "Internal-IP",
                "string",
                "",
                1,
                "List of addresses reachable to the node.",
            ),
            column(
                "External-IP",
                "string",
                "",
                1,
                "List of addresses reachable to the node.",
            ),
            column(
                "OS-Image",
                "string",
                "",
                1,
                "OS Image reported by the node.",
            ),
            column(
                "Kernel-Version",
                "string",
                "",
                1,
                "Kernel Version reported by the node.",
            ),
            column(
                "Container-Runtime",
                "string",
                "",
                1,
                "Container Runtime Version reported by the node.",
            ),
        ],
        "EndpointSlice" => vec![
            name,
            column(
                "AddressType",
                "string",
                "",
                0,
                "addressType specifies the type of address carried by this EndpointSlice.",
            ),
            column(
                "Ports",
                "string",
                "",
                0,
                "ports specifies the list of network ports exposed by each endpoint in this slice.",
            ),
            column(
                "Endpoints",
                "string",
                "",
                0,
                "endpoints is a list of unique endpoints in this slice.",
            ),
            age,
        ],
        "Namespace" => vec![
            name,
            column("Status", "string", "", 0, "The status of the namespace"),
            age,
        ],
        "Endpoints" => vec![
            name,
            column(
                "Endpoints",
                "string",
                "",
                0,
                "Endpoints is the list of endpoints.",
            ),
            age,
        ],
        _ => vec![
            name,
            column(
                "Created At",
                "date",
                "",
                0,
                "CreationTimestamp is a timestamp representing the server time when this object was created.",
            ),
        ],
    }
}

fn s<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn or_none(v: String) -> String {
    if v.is_empty() { "<none>".to_owned() } else { v }
}

/// At most three entries, then ` + N more...`, as the real printers shorten lists.
fn shorten(list: &[String], empty: &str) -> String {
    if list.is_empty() {
        return empty.to_owned();
    }
    let shown = list.iter().take(3).cloned().collect::<Vec<_>>().join(",");
    if list.len() > 3 {
        format!("{shown} + {} more...", list.len() - 3)
    } else {
        shown
    }
}

fn strings(v: &Value, pointer: &str) -> Vec<String> {
    v.pointer(pointer)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn cells(kind: &str, o: &Value) -> Vec<Value> {
    let name = json!(s(o, "/metadata/name"));
    let age = json!(age(s(o, "/metadata/creationTimestamp")));
    match kind {
        "Service" => {
            let service_type = match s(o, "/spec/type") {
                "" => "ClusterIP",
                t => t,
            };
            let cluster_ip = or_none(s(o, "/spec/clusterIP").to_owned());
            let external_ips = strings(o, "/spec/externalIPs");
            let external = match service_type {
                "ExternalName" => s(o, "/spec/externalName").to_owned(),
                "LoadBalancer" => {
                    let mut ips: Vec<String> = o
                        .pointer("/status/loadBalancer/ingress")
                        .and_then(Value::as_array)
                        .map(|a| {
                            a.iter()
                                .map(|i| match i["ip"].as_str() {
                                    Some(ip) => ip.to_owned(),
                                    None => s(i, "/hostname").to_owned(),
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    ips.extend(external_ips);
                    if ips.is_empty() {
                        "<pending>".to_owned()
                    } else {
                        ips.join(",")
                    }
                }
                _ => or_none(external_ips.join(",")),
            };
            let ports: Vec<String> = o
                .pointer("/spec/ports")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .map(|p| {
                            let protocol = p["protocol"].as_str().unwrap_or("TCP");
                            match p["nodePort"].as_u64() {
                                Some(node_port) => {
                                    format!("{}:{node_port}/{protocol}", p["port"])
                                }
                                None => format!("{}/{protocol}", p["port"]),
                            }
                        })
                        .collect()
                })
                .unwrap_or_default();
            let mut selector: Vec<String> = o
                .pointer("/spec/selector")
                .and_then(Value::as_object)
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                        .collect()
                })
                .unwrap_or_default();
            selector.sort();
            vec![
                name,
                json!(service_type),
                json!(cluster_ip),
                json!(external),
                json!(or_none(ports.join(","))),
                age,
                json!(or_none(selector.join(","))),
            ]
        }
        "Node" => {
            let ready = o
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
                .map(|c| c["status"].as_str().unwrap_or_default().to_owned());
            let mut status = match ready.as_deref() {
                Some("True") => "Ready".to_owned(),
                Some("False") => "NotReady".to_owned(),
                _ => "Unknown".to_owned(),
            };
            if o.pointer("/spec/unschedulable") == Some(&json!(true)) {
                status.push_str(",SchedulingDisabled");
            }
            let mut roles: Vec<String> = o
                .pointer("/metadata/labels")
                .and_then(Value::as_object)
                .map(|m| {
                    m.iter()
                        .filter_map(|(k, v)| {
                            k.strip_prefix("node-role.kubernetes.io/")
                                .map(str::to_owned)
                                .or_else(|| {
                                    (k == "kubernetes.io/role")
                                        .then(|| v.as_str().unwrap_or_default().to_owned())
                                })
                        })
                        .filter(|r| !r.is_empty())
                        .collect()
                })
                .unwrap_or_default();
            roles.sort();
            let address = |t: &str| {
                o.pointer("/status/addresses")
                    .and_then(Value::as_array)
                    .and_then(|a| a.iter().find(|a| a["type"] == t))
                    .and_then(|a| a["address"].as_str())
                    .unwrap_or("<none>")
                    .to_owned()
            };
            vec![
                name,
                json!(status),
                json!(or_none(roles.join(","))),
                age,
                json!(s(o, "/status/nodeInfo/kubeletVersion")),
                json!(address("InternalIP")),
                json!(address("ExternalIP")),
                json!(or_none(s(o, "/status/nodeInfo/osImage").to_owned())),
                json!(or_none(s(o, "/status/nodeInfo/kernelVersion").to_owned())),
                json!(or_none(
                    s(o, "/status/nodeInfo/containerRuntimeVersion").to_owned()
                )),
            ]
        }
        "EndpointSlice" => {
            let ports: Vec<String> = o["ports"]
                .as_array()
                .map(|a| a.iter().map(|p| p["port"].to_string()).collect())
                .unwrap_or_default();
            let addresses: Vec<String> = o["endpoints"]
                .as_array()
                .map(|a| a.iter().flat_map(|e| strings(e, "/addresses")).collect())
                .unwrap_or_default();
            vec![
                name,
                json!(s(o, "/addressType")),
                json!(shorten(&ports, "<unset>")),
                json!(shorten(&addresses, "<unset>")),
                age,
            ]
        }
        "Namespace" => vec![name, json!(s(o, "/status/phase")), age],
        "Endpoints" => {
            let mut list = Vec::new();
            for subset in o["subsets"].as_array().into_iter().flatten() {
                for address in subset["addresses"].as_array().into_iter().flatten() {
                    for port in subset["ports"].as_array().into_iter().flatten() {
                        list.push(format!("{}:{}", s(address, "/ip"), port["port"]));
                    }
                }
            }
            vec![name, json!(shorten(&list, "<none>")), age]
        }
        _ => vec![name, json!(s(o, "/metadata/creationTimestamp"))],
    }
}

/// kubectl's `HumanDuration` of the time since `timestamp` (RFC 3339), `<unknown>` if none.
fn age(timestamp: &str) -> String {
    let Ok(created) = humantime::parse_rfc3339_weak(timestamp) else {
        return "<unknown>".to_owned();
    };
    let secs = SystemTime::now()
        .duration_since(created)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    human_duration(secs)
}

pub fn human_duration(secs: u64) -> String {
    let (m, h, d) = (secs / 60, secs / 3600, secs / 86400);
    let y = d / 365;
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 600 => match s % 60 {
            0 => format!("{m}m"),
            rest => format!("{m}m{rest}s"),
        },
        s if s < 3 * 3600 => format!("{m}m"),
        s if s < 8 * 3600 => match m % 60 {
            0 => format!("{h}h"),
            rest => format!("{h}h{rest}m"),
        },
        s if s < 48 * 3600 => format!("{h}h"),
        s if s < 8 * 86400 => match h % 24 {
            0 => format!("{d}d"),
            rest => format!("{d}d{rest}h"),
        },
        s if s < 2 * 365 * 86400 => format!("{d}d"),
        s if s < 8 * 365 * 86400 => match d % 365 {
            0 => format!("{y}y"),
            rest => format!("{y}y{rest}d"),
        },
        _ => format!("{y}y"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_kubectl() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(150), "2m30s");
        assert_eq!(human_duration(3600), "60m");
        assert_eq!(human_duration(4 * 3600 + 60), "4h1m");
        assert_eq!(human_duration(30 * 3600), "30h");
        assert_eq!(human_duration(3 * 86400 + 3600), "3d1h");
        assert_eq!(human_duration(100 * 86400), "100d");
    }

    #[test]
    fn service_cells() {
        let lb = json!({
            "metadata": {"name": "web", "creationTimestamp": "2020-01-01T00:00:00Z"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10",
                     "ports": [{"port": 80, "nodePort": 30080, "protocol": "TCP"}],
                     "selector": {"app": "web"}},
            "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.10"}]}}
        });
        let c = cells("Service", &lb);
        assert_eq!(c[1], "LoadBalancer");
        assert_eq!(c[2], "10.96.0.10");
        assert_eq!(c[3], "192.0.2.10");
        assert_eq!(c[4], "80:30080/TCP");
        assert_eq!(c[6], "app=web");
        assert!(wants_table(
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
        ));
        assert!(!wants_table("application/json"));
    }
}
