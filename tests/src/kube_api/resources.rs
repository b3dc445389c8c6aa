//! The resource types the test API server serves, and the discovery documents built from them.

use serde_json::{Value, json};

/// One served resource type (one `APIResource` of discovery).
#[derive(Debug, PartialEq, Eq)]
pub struct ResourceType {
    /// API group: `""` for the core group, `discovery.k8s.io`, ...
    pub group: &'static str,
    pub version: &'static str,
    /// Plural name as in the URL: `services`.
    pub plural: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    pub categories: &'static [&'static str],
    /// Has a `/status` subresource: writes to the main resource keep the old `status`, writes
    /// to `/status` change only `status` (as the real server's strategies do).
    pub has_status: bool,
    /// Field selectors beyond `metadata.name` and `metadata.namespace`.
    pub extra_fields: &'static [&'static str],
}

/// Index of a [`ResourceType`] in [`RESOURCES`].
pub type ResourceId = usize;

/// Every type the server serves. Order is discovery order within a group version.
pub static RESOURCES: &[ResourceType] = &[
    ResourceType {
        group: "",
        version: "v1",
        plural: "endpoints",
        singular: "endpoints",
        kind: "Endpoints",
        namespaced: true,
        short_names: &["ep"],
        categories: &[],
        has_status: false,
        extra_fields: &[],
    },
    ResourceType {
        group: "",
        version: "v1",
        plural: "namespaces",
        singular: "namespace",
        kind: "Namespace",
        namespaced: false,
        short_names: &["ns"],
        categories: &[],
        has_status: true,
        extra_fields: &["status.phase"],
    },
    ResourceType {
        group: "",
        version: "v1",
        plural: "nodes",
        singular: "node",
        kind: "Node",
        namespaced: false,
        short_names: &["no"],
        categories: &[],
        has_status: true,
        extra_fields: &["spec.unschedulable"],
    },
    ResourceType {
        group: "",
        version: "v1",
        plural: "pods",
        singular: "pod",
        kind: "Pod",
        namespaced: true,
        short_names: &["po"],
        categories: &["all"],
        has_status: true,
        extra_fields: &["spec.nodeName", "status.phase", "status.podIP"],
    },
    ResourceType {
        group: "",
        version: "v1",
        plural: "services",
        singular: "service",
        kind: "Service",
        namespaced: true,
        short_names: &["svc"],
        categories: &["all"],
        has_status: true,
        extra_fields: &["spec.clusterIP", "spec.type"],
    },
    ResourceType {
        group: "discovery.k8s.io",
        version: "v1",
        plural: "endpointslices",
        singular: "endpointslice",
        kind: "EndpointSlice",
        namespaced: true,
        short_names: &[],
        categories: &[],
        has_status: false,
        extra_fields: &[],
    },
];

/// Verbs every resource supports here (no `deletecollection`).
pub const VERBS: &[&str] = &[
    "create", "delete", "get", "list", "patch", "update", "watch",
];

impl ResourceType {
    /// `v1` or `discovery.k8s.io/v1`: the `apiVersion` of its objects.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `ServiceList`.
    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }

    /// The qualified resource name used in error messages: `services`,
    /// `endpointslices.discovery.k8s.io`.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_owned()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// Field selectors this resource accepts.
    pub fn selectable_fields(&self) -> Vec<&'static str> {
        let mut fields = vec!["metadata.name", "metadata.namespace"];
        fields.extend_from_slice(self.extra_fields);
        fields
    }
}

/// The resource served at `group/version/plural`.
pub fn by_path(group: &str, version: &str, plural: &str) -> Option<ResourceId> {
    RESOURCES
        .iter()
        .position(|r| r.group == group && r.version == version && r.plural == plural)
}

/// The resource of objects with this `apiVersion` and `kind`.
pub fn by_type(api_version: &str, kind: &str) -> Option<ResourceId> {
    RESOURCES
        .iter()
        .position(|r| r.api_version() == api_version && r.kind == kind)
}

/// Looks a resource up by kind, plural, singular or short name (case-insensitive), as the
/// in-process API accepts it: `Service`, `services`, `svc`, `EndpointSlice`.
pub fn by_name(name: &str) -> Option<ResourceId> {
    let lower = name.to_ascii_lowercase();
    RESOURCES.iter().position(|r| {
        r.kind.eq_ignore_ascii_case(&lower)
            || r.plural == lower
            || r.singular == lower
            || r.short_names.contains(&lower.as_str())
            || r.qualified() == lower
    })
}

/// Group versions served, core first.
fn group_versions() -> Vec<(&'static str, &'static str)> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for r in RESOURCES {
        if !out.contains(&(r.group, r.version)) {
            out.push((r.group, r.version));
        }
    }
    out
}

/// `GET /api`: `APIVersions`.
pub fn api_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [
            {"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}
        ]
    })
}

fn api_group(group: &str) -> Value {
    let versions: Vec<Value> = group_versions()
        .into_iter()
        .filter(|(g, _)| *g == group)
        .map(|(g, v)| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
        .collect();
    json!({
        "name": group,
        "versions": versions.clone(),
        "preferredVersion": versions[0],
    })
}

/// `GET /apis`: `APIGroupList` (named groups only; the core group is at `/api`).
pub fn api_group_list() -> Value {
    let mut groups: Vec<&str> = Vec::new();
    for (g, _) in group_versions() {
        if !g.is_empty() && !groups.contains(&g) {
            groups.push(g);
        }
    }
    json!({
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": groups.into_iter().map(api_group).collect::<Vec<_>>(),
    })
}

/// `GET /apis/{group}`: `APIGroup`, or `None` when the group is not served.
pub fn api_group_doc(group: &str) -> Option<Value> {
    if group.is_empty() || !group_versions().iter().any(|(g, _)| *g == group) {
        return None;
    }
    let mut doc = api_group(group);
    doc["kind"] = json!("APIGroup");
    doc["apiVersion"] = json!("v1");
    Some(doc)
}

/// `GET /api/v1` or `/apis/{group}/{version}`: `APIResourceList`, or `None` when not served.
pub fn api_resource_list(group: &str, version: &str) -> Option<Value> {
    let mut resources = Vec::new();
    for r in RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
    {
        let mut entry = json!({
            "name": r.plural,
            "singularName": r.singular,
            "namespaced": r.namespaced,
            "kind": r.kind,
            "verbs": VERBS,
        });
        if !r.short_names.is_empty() {
            entry["shortNames"] = json!(r.short_names);
        }
        if !r.categories.is_empty() {
            entry["categories"] = json!(r.categories);
        }
        resources.push(entry);
        if r.has_status {
            resources.push(json!({
                "name": format!("{}/status", r.plural),
                "singularName": "",
                "namespaced": r.namespaced,
                "kind": r.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
    }
    if resources.is_empty() {
        return None;
    }
    let group_version = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    }))
}

/// `GET /version`.
pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "emulationMajor": "1",
        "emulationMinor": "33",
        "minCompatibilityMajor": "1",
        "minCompatibilityMinor": "32",
        "gitVersion": "v1.33.0-mesh-test",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-04-23T00:00:00Z",
        "goVersion": "go1.24.2",
        "compiler": "gc",
        "platform": "linux/amd64"
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_find_the_same_type() {
        let svc = by_path("", "v1", "services").unwrap();
        assert_eq!(by_type("v1", "Service"), Some(svc));
        assert_eq!(by_name("svc"), Some(svc));
        assert_eq!(by_name("Service"), Some(svc));
        let eps = by_path("discovery.k8s.io", "v1", "endpointslices").unwrap();
        assert_eq!(by_type("discovery.k8s.io/v1", "EndpointSlice"), Some(eps));
        assert_eq!(by_name("endpointslices.discovery.k8s.io"), Some(eps));
        assert_eq!(by_type("v1", "EndpointSlice"), None);
    }

    #[test]
    fn discovery_lists_status_subresources_and_groups() {
        let core = api_resource_list("", "v1").unwrap();
        let names: Vec<&str> = core["resources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap())
            .collect();
        assert!(names.contains(&"services") && names.contains(&"services/status"));
        assert!(!names.contains(&"endpoints/status"));
        let groups = api_group_list();
        assert_eq!(groups["groups"][0]["name"], "discovery.k8s.io");
        assert_eq!(
            groups["groups"][0]["preferredVersion"]["groupVersion"],
            "discovery.k8s.io/v1"
        );
        assert!(api_resource_list("apps", "v1").is_none());
    }
}
