//! The object store: objects as JSON, one global `resourceVersion` counter (as etcd's
//! revision), and a bounded history of changes that watches and paginated lists read from.

use std::collections::{BTreeMap, VecDeque};
use std::time::SystemTime;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value, json};
use tokio::sync::watch;

use super::patch;
use super::resources::{RESOURCES, ResourceId, ResourceType, by_type};
use super::selector::{FieldSelector, LabelSelector};
use super::status::ApiError;

/// Default number of changes kept for watches and paginated lists.
pub const DEFAULT_MAX_HISTORY: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeType {
    Added,
    Modified,
    Deleted,
}

impl ChangeType {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeType::Added => "ADDED",
            ChangeType::Modified => "MODIFIED",
            ChangeType::Deleted => "DELETED",
        }
    }
}

/// One write, as the history keeps it.
#[derive(Debug, Clone)]
pub struct Change {
    pub rv: u64,
    pub change: ChangeType,
    pub resource: ResourceId,
    pub key: String,
    /// The object after the write; for a deletion, the last state with the deletion's
    /// `resourceVersion`.
    pub object: Value,
    /// The object before the write (`None` for a creation).
    pub prev: Option<Value>,
}

/// Which part of an object a write changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The main resource: for types with a status subresource, `status` is kept as it was.
    Main,
    /// The `/status` subresource: only `status` changes.
    Status,
}

/// How a PATCH body is to be applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    Merge,
    /// Applied as a merge patch (see [`patch`]).
    StrategicMerge,
    Json,
}

/// Options of a list request.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    pub limit: Option<usize>,
    pub continue_token: Option<String>,
    pub resource_version: Option<String>,
    pub resource_version_match: Option<String>,
}

pub struct Store {
    rv: u64,
    objects: BTreeMap<(ResourceId, String), Value>,
    history: VecDeque<Change>,
    max_history: usize,
    /// A watch or snapshot from a `resourceVersion` below this is expired (410).
    compacted: u64,
    next_uid: u64,
    uid_seed: u64,
    notify: watch::Sender<u64>,
}

/// The store key of an object: `namespace/name`, or `name` for cluster-scoped types. Lists
/// are ordered by it, as etcd orders keys.
pub fn key_of(resource: &ResourceType, namespace: &str, name: &str) -> String {
    if resource.namespaced {
        format!("{namespace}/{name}")
    } else {
        name.to_owned()
    }
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

fn meta(object: &Value, field: &str) -> Option<String> {
    object["metadata"][field].as_str().map(str::to_owned)
}

/// Everything but metadata and status: a change to it bumps `metadata.generation`.
fn spec_part(object: &Value) -> Map<String, Value> {
    let mut rest = object.as_object().cloned().unwrap_or_default();
    for field in ["metadata", "status", "kind", "apiVersion"] {
        rest.remove(field);
    }
    rest
}

/// The object as a list returns it: list items carry no `kind`/`apiVersion` (only the
/// list does), as with the real server's typed lists.
pub fn as_list_item(object: &Value) -> Value {
    let mut item = object.clone();
    if let Some(map) = item.as_object_mut() {
        map.remove("kind");
        map.remove("apiVersion");
    }
    item
}

impl Store {
    pub fn new(max_history: usize) -> Store {
        let seed = {
            use std::hash::{BuildHasher as _, Hasher as _};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u32(std::process::id());
            h.finish()
        };
        Store {
            rv: 1,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            max_history: max_history.max(1),
            compacted: 1,
            next_uid: 0,
            uid_seed: seed,
            notify: watch::channel(1).0,
        }
    }

    /// A receiver that changes whenever a write commits (its value is the new revision).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.notify.subscribe()
    }

    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    /// The oldest `resourceVersion` a watch may start from.
    pub fn compacted(&self) -> u64 {
        self.compacted
    }

    /// Drops the whole history: watches and `continue` tokens from before now get 410.
    pub fn compact(&mut self) {
        self.history.clear();
        self.compacted = self.rv;
    }

    pub fn set_max_history(&mut self, max: usize) {
        self.max_history = max.max(1);
        self.trim();
    }

    fn trim(&mut self) {
        while self.history.len() > self.max_history {
            let dropped = self.history.pop_front().expect("longer than max >= 1");
            self.compacted = dropped.rv;
        }
    }

    fn new_uid(&mut self) -> String {
        self.next_uid += 1;
        let a = self.uid_seed ^ self.next_uid.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let b = self.next_uid;
        format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            (a >> 32) as u32,
            (a >> 16) as u16,
            (a & 0xfff) as u16,
            (b >> 48) as u16 & 0xfff,
            b & 0xffff_ffff_ffff
        )
    }

    /// Commits a write: assigns the next revision, stores (or removes) the object, records
    /// the change and wakes watchers.
    fn commit(
        &mut self,
        resource: ResourceId,
        key: String,
        mut object: Value,
        prev: Option<Value>,
        change: ChangeType,
    ) -> Value {
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        if change == ChangeType::Deleted {
            self.objects.remove(&(resource, key.clone()));
        } else {
            self.objects.insert((resource, key.clone()), object.clone());
        }
        self.history.push_back(Change {
            rv: self.rv,
            change,
            resource,
            key,
            object: object.clone(),
            prev,
        });
        self.trim();
        self.notify.send_replace(self.rv);
        object
    }

    /// Sets `kind` and `apiVersion`, checking any the body carries.
    fn typed(resource: &ResourceType, mut body: Value) -> Result<Value, ApiError> {
        if !body.is_object() {
            return Err(ApiError::bad_request(format!(
                "the body of the request is not a {} object",
                resource.kind
            )));
        }
        let api_version = resource.api_version();
        if let Some(v) = body["apiVersion"].as_str()
            && v != api_version
        {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({v}) does not match the expected API version \
                 ({api_version})"
            )));
        }
        if let Some(k) = body["kind"].as_str()
            && k != resource.kind
        {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({k}) does not match the expected kind ({})",
                resource.kind
            )));
        }
        body["apiVersion"] = json!(api_version);
        body["kind"] = json!(resource.kind);
        if !body["metadata"].is_object() {
            body["metadata"] = json!({});
        }
        Ok(body)
    }

    fn check_namespace(
        resource: &ResourceType,
        body: &mut Value,
        namespace: &str,
    ) -> Result<(), ApiError> {
        let metadata = body["metadata"].as_object_mut().expect("typed() made it");
        if resource.namespaced {
            match metadata.get("namespace").and_then(Value::as_str) {
                Some(ns) if !ns.is_empty() && ns != namespace => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace \
                         sent on the request",
                    ));
                }
                _ => {
                    metadata.insert("namespace".into(), json!(namespace));
                }
            }
        } else {
            metadata.remove("namespace");
        }
        Ok(())
    }

    pub fn get(
        &self,
        resource: ResourceId,
        namespace: &str,
        name: &str,
    ) -> Result<Value, ApiError> {
        let r = &RESOURCES[resource];
        self.objects
            .get(&(resource, key_of(r, namespace, name)))
            .cloned()
            .ok_or_else(|| ApiError::not_found(r, name))
    }

    /// Every object of a type (all namespaces), in key order.
    pub fn all(&self, resource: ResourceId) -> Vec<Value> {
        self.objects
            .range((resource, String::new())..)
            .take_while(|((r, _), _)| *r == resource)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// POST: creates the object (`409 AlreadyExists` when it exists).
    pub fn create(
        &mut self,
        resource: ResourceId,
        namespace: &str,
        body: Value,
    ) -> Result<Value, ApiError> {
        let r = &RESOURCES[resource];
        let mut body = Self::typed(r, body)?;
        Self::check_namespace(r, &mut body, namespace)?;
        if meta(&body, "resourceVersion").is_some_and(|v| !v.is_empty()) {
            return Err(ApiError::internal(
                "resourceVersion should not be set on objects to be created",
            ));
        }
        let name = match meta(&body, "name").filter(|n| !n.is_empty()) {
            Some(name) => name,
            None => match meta(&body, "generateName").filter(|n| !n.is_empty()) {
                Some(prefix) => {
                    let suffix: String = self
                        .new_uid()
                        .chars()
                        .filter(char::is_ascii_alphanumeric)
                        .take(5)
                        .collect();
                    format!("{prefix}{suffix}")
                }
                None => {
                    return Err(ApiError::invalid(
                        r,
                        "",
                        "metadata.name",
                        "Required value: name or generateName is required",
                    ));
                }
            },
        };
        let key = key_of(r, namespace, &name);
        if self.objects.contains_key(&(resource, key.clone())) {
            return Err(ApiError::already_exists(r, &name));
        }
        let uid = self.new_uid();
        let metadata = body["metadata"].as_object_mut().expect("typed() made it");
        metadata.insert("name".into(), json!(name));
        metadata.insert("uid".into(), json!(uid));
        metadata.insert("creationTimestamp".into(), json!(now_rfc3339()));
        metadata.insert("generation".into(), json!(1));
        for field in ["deletionTimestamp", "deletionGracePeriodSeconds"] {
            metadata.remove(field);
        }
        match r.kind {
            // The real strategies' PrepareForCreate.
            "Service" => body["status"] = json!({"loadBalancer": {}}),
            "Namespace" => {
                body["status"] = json!({"phase": "Active"});
                body["metadata"]["labels"]["kubernetes.io/metadata.name"] = json!(name);
            }
            _ => {}
        }
        Ok(self.commit(resource, key, body, None, ChangeType::Added))
    }

    /// PUT: replaces the object (404 when absent, 409 when the body's `resourceVersion` is not
    /// the current one).
    pub fn update(
        &mut self,
        resource: ResourceId,
        namespace: &str,
        name: &str,
        body: Value,
        target: Target,
    ) -> Result<Value, ApiError> {
        let r = &RESOURCES[resource];
        let old = self.get(resource, namespace, name)?;
        let mut body = Self::typed(r, body)?;
        Self::check_namespace(r, &mut body, namespace)?;
        match meta(&body, "name") {
            Some(n) if n == name => {}
            Some(n) => {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({n}) does not match the name on the URL ({name})"
                )));
            }
            None => body["metadata"]["name"] = json!(name),
        }
        if let Some(rv) = meta(&body, "resourceVersion").filter(|v| !v.is_empty())
            && Some(&rv) != meta(&old, "resourceVersion").as_ref()
        {
            return Err(ApiError::conflict(r, name));
        }
        self.write_update(resource, old, body, target)
    }

    /// PATCH: applies the patch to the current object, then writes it as an update.
    pub fn patch(
        &mut self,
        resource: ResourceId,
        namespace: &str,
        name: &str,
        patch_type: PatchType,
        body: &Value,
        target: Target,
    ) -> Result<Value, ApiError> {
        let r = &RESOURCES[resource];
        let old = self.get(resource, namespace, name)?;
        let mut new = old.clone();
        match patch_type {
            PatchType::Merge | PatchType::StrategicMerge => {
                if !body.is_object() {
                    return Err(ApiError::bad_request("a merge patch must be a JSON object"));
                }
                patch::merge_patch(&mut new, body);
            }
            PatchType::Json => patch::json_patch(&mut new, body).map_err(|e| {
                ApiError::invalid(
                    r,
                    name,
                    "",
                    &format!("the server rejected our request due to an error in our request: {e}"),
                )
            })?,
        }
        if meta(&new, "name").as_deref() != Some(name)
            || (r.namespaced && meta(&new, "namespace").as_deref() != Some(namespace))
        {
            return Err(ApiError::bad_request(
                "a patch cannot change metadata.name or metadata.namespace",
            ));
        }
        // A resourceVersion in the patch is a precondition.
        if meta(&new, "resourceVersion") != meta(&old, "resourceVersion") {
            return Err(ApiError::conflict(r, name));
        }
        let new = Self::typed(r, new)?;
        self.write_update(resource, old, new, target)
    }

    /// The common end of PUT and PATCH: keeps what the server owns, bumps `generation` when
    /// the spec changed, finishes a deletion whose last finalizer went, and skips no-op writes
    /// (no new revision, no event) as the real server does.
    fn write_update(
        &mut self,
        resource: ResourceId,
        old: Value,
        mut new: Value,
        target: Target,
    ) -> Result<Value, ApiError> {
        let r = &RESOURCES[resource];
        if r.has_status {
            match target {
                Target::Main => match old.get("status") {
                    Some(status) => new["status"] = status.clone(),
                    None => {
                        new.as_object_mut().expect("typed").remove("status");
                    }
                },
                Target::Status => {
                    let status = new.get("status").cloned();
                    new = old.clone();
                    match status {
                        Some(status) => new["status"] = status,
                        None => {
                            new.as_object_mut().expect("typed").remove("status");
                        }
                    }
                }
            }
        }
        for field in [
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "resourceVersion",
        ] {
            match old["metadata"].get(field) {
                Some(v) => new["metadata"][field] = v.clone(),
                None => {
                    new["metadata"]
                        .as_object_mut()
                        .expect("typed")
                        .remove(field);
                }
            }
        }
        let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
        let bump = spec_part(&old) != spec_part(&new);
        new["metadata"]["generation"] = json!(generation + i64::from(bump));
        Ok(self.finish_update(resource, old, new))
    }

    fn finish_update(&mut self, resource: ResourceId, old: Value, new: Value) -> Value {
        if new == old {
            return old;
        }
        let r = &RESOURCES[resource];
        let key = key_of(
            r,
            &meta(&new, "namespace").unwrap_or_default(),
            &meta(&new, "name").unwrap_or_default(),
        );
        let deleting = new["metadata"].get("deletionTimestamp").is_some();
        let finalizers_left = new["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if deleting && !finalizers_left {
            return self.commit(resource, key, new, Some(old), ChangeType::Deleted);
        }
        self.commit(resource, key, new, Some(old), ChangeType::Modified)
    }

    /// DELETE: removes the object and returns its last state. An object with finalizers only
    /// gets `metadata.deletionTimestamp` (a MODIFIED event) and goes when the last finalizer
    /// is removed. `preconditions` are DeleteOptions' `uid` / `resourceVersion`.
    pub fn delete(
        &mut self,
        resource: ResourceId,
        namespace: &str,
        name: &str,
        preconditions: &Value,
    ) -> Result<Value, ApiError> {
        let r = &RESOURCES[resource];
        let old = self.get(resource, namespace, name)?;
        for field in ["uid", "resourceVersion"] {
            if let Some(want) = preconditions[field].as_str()
                && Some(want) != old["metadata"][field].as_str()
            {
                return Err(ApiError::conflict(r, name));
            }
        }
        let finalizers = old["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if finalizers {
            if old["metadata"].get("deletionTimestamp").is_some() {
                return Ok(old);
            }
            let mut new = old.clone();
            new["metadata"]["deletionTimestamp"] = json!(now_rfc3339());
            new["metadata"]["deletionGracePeriodSeconds"] = json!(0);
            return Ok(self.finish_update(resource, old, new));
        }
        let key = key_of(r, namespace, name);
        Ok(self.commit(resource, key, old.clone(), Some(old), ChangeType::Deleted))
    }

    /// In-process create-or-replace of a whole object (spec, status and all), as a test or a
    /// fixture sets it. Keeps the stored `uid` and `creationTimestamp`; a new object keeps the
    /// ones it carries or gets fresh ones. A write that changes nothing commits nothing.
    pub fn apply(&mut self, object: Value) -> Result<Value, ApiError> {
        let api_version = object["apiVersion"].as_str().unwrap_or_default();
        let kind = object["kind"].as_str().unwrap_or_default();
        let resource = by_type(api_version, kind).ok_or_else(|| {
            ApiError::bad_request(format!(
                "no resource served for apiVersion {api_version:?} kind {kind:?}"
            ))
        })?;
        let r = &RESOURCES[resource];
        let name = meta(&object, "name")
            .filter(|n| !n.is_empty())
            .ok_or_else(|| ApiError::invalid(r, "", "metadata.name", "Required value"))?;
        let namespace = if r.namespaced {
            meta(&object, "namespace").unwrap_or_else(|| "default".to_owned())
        } else {
            String::new()
        };
        let mut new = Self::typed(r, object)?;
        Self::check_namespace(r, &mut new, &namespace)?;
        match self.get(resource, &namespace, &name) {
            Ok(old) => {
                for field in ["uid", "creationTimestamp", "resourceVersion"] {
                    new["metadata"][field] = old["metadata"][field].clone();
                }
                let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
                let bump = spec_part(&old) != spec_part(&new);
                new["metadata"]["generation"] = json!(generation + i64::from(bump));
                Ok(self.finish_update(resource, old, new))
            }
            Err(_) => {
                if meta(&new, "uid").is_none() {
                    new["metadata"]["uid"] = json!(self.new_uid());
                }
                if meta(&new, "creationTimestamp").is_none() {
                    new["metadata"]["creationTimestamp"] = json!(now_rfc3339());
                }
                new["metadata"]["generation"] = json!(1);
                let key = key_of(r, &namespace, &name);
                Ok(self.commit(resource, key, new, None, ChangeType::Added))
            }
        }
    }

    /// The objects of a type as they were at revision `at` (current objects with later changes
    /// undone), or 410 when the history no longer reaches back to `at`.
    /// The objects of `resource` at revision `at`, borrowed: every page of a paginated list
    /// rebuilds it, so it must not copy the objects (a list of 10,000 Services in pages of 500
    /// would copy 200,000 of them).
    fn snapshot(&self, resource: ResourceId, at: u64) -> Option<BTreeMap<&str, &Value>> {
        if at < self.compacted {
            return None;
        }
        let mut objects: BTreeMap<&str, &Value> = self
            .objects
            .range((resource, String::new())..)
            .take_while(|((r, _), _)| *r == resource)
            .map(|((_, k), v)| (k.as_str(), v))
            .collect();
        for change in self.history.iter().rev() {
            if change.rv <= at {
                break;
            }
            if change.resource != resource {
                continue;
            }
            match &change.prev {
                None => {
                    objects.remove(change.key.as_str());
                }
                Some(prev) => {
                    objects.insert(change.key.as_str(), prev);
                }
            }
        }
        Some(objects)
    }

    /// GET on a collection: a `...List` with `metadata.resourceVersion`, paginated with
    /// `limit`/`continue` (pages are served from the revision of the first page, as etcd does),
    /// filtered by the selectors, at the revision `resourceVersion`/`resourceVersionMatch` ask.
    pub fn list(
        &self,
        resource: ResourceId,
        namespace: Option<&str>,
        query: &ListQuery,
    ) -> Result<Value, ApiError> {
        let r = &RESOURCES[resource];
        let rv_param = query.resource_version.as_deref().unwrap_or("");
        let rv_match = query.resource_version_match.as_deref().unwrap_or("");
        if !rv_match.is_empty() && rv_param.is_empty() {
            return Err(ApiError::invalid_param(
                "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden unless \
                 resourceVersion is provided",
            ));
        }
        let (at, start) = match query.continue_token.as_deref().filter(|c| !c.is_empty()) {
            Some(token) => {
                if !rv_param.is_empty() && rv_param != "0" {
                    return Err(ApiError::invalid_param(
                        "resourceVersion: Forbidden: specifying resource version is not allowed \
                         when using continue",
                    ));
                }
                let (at, start) = decode_continue(token)?;
                (at, Some(start))
            }
            None => {
                let at = match (rv_param, rv_match) {
                    ("", _) | ("0", "" | "NotOlderThan") => self.rv,
                    (rv, m) => {
                        let requested: u64 = rv.parse().map_err(|_| {
                            ApiError::bad_request(format!("invalid resource version: {rv:?}"))
                        })?;
                        match m {
                            "" | "NotOlderThan" => {
                                if requested > self.rv {
                                    return Err(ApiError::too_large_resource_version(
                                        requested, self.rv,
                                    ));
                                }
                                self.rv
                            }
                            "Exact" => {
                                if requested > self.rv {
                                    return Err(ApiError::too_large_resource_version(
                                        requested, self.rv,
                                    ));
                                }
                                if requested < self.compacted {
                                    return Err(ApiError::resource_version_expired(
                                        requested,
                                        self.compacted,
                                    ));
                                }
                                requested
                            }
                            other => {
                                return Err(ApiError::invalid_param(format!(
                                    "resourceVersionMatch: Unsupported value: {other:?}: \
                                     supported values: \"Exact\", \"NotOlderThan\""
                                )));
                            }
                        }
                    }
                };
                (at, None)
            }
        };
        let objects = self
            .snapshot(resource, at)
            .ok_or_else(ApiError::continue_expired)?;
        let prefix = namespace.map(|ns| format!("{ns}/"));
        let mut matching = objects
            .range(start.as_deref().unwrap_or("")..)
            .filter(|(k, _)| prefix.as_deref().is_none_or(|p| k.starts_with(p)))
            .filter(|(_, v)| query.labels.matches(v) && query.fields.matches(v));
        let mut items = Vec::new();
        let mut last_key = None;
        let limit = query.limit.filter(|l| *l > 0).unwrap_or(usize::MAX);
        let mut remaining = 0;
        for (k, v) in matching.by_ref() {
            if items.len() == limit {
                // This one and every matching one after it are left for the next pages.
                remaining = 1;
                break;
            }
            items.push(as_list_item(v));
            last_key = Some(*k);
        }
        if remaining > 0 {
            remaining += matching.count();
        }
        let mut metadata = json!({"resourceVersion": at.to_string()});
        if remaining > 0 {
            let last = last_key.expect("a full page has a last key");
            metadata["continue"] = json!(encode_continue(at, &format!("{last}\u{0}")));
            if query.labels.is_empty() && query.fields.is_empty() {
                metadata["remainingItemCount"] = json!(remaining);
            }
        }
        Ok(json!({
            "kind": r.list_kind(),
            "apiVersion": r.api_version(),
            "metadata": metadata,
            "items": items,
        }))
    }

    /// The changes after revision `cursor`, or 410 when some of them were compacted away.
    pub fn changes_after(&self, cursor: u64) -> Result<Vec<Change>, ApiError> {
        if cursor < self.compacted {
            return Err(ApiError::watch_expired(cursor, self.compacted + 1));
        }
        let start = self.history.partition_point(|c| c.rv <= cursor);
        Ok(self.history.range(start..).cloned().collect())
    }
}

impl ApiError {
    /// 400 for a query parameter the request may not combine (the real server answers these
    /// as BadRequest-ish `Invalid` errors on ListOptions).
    pub fn invalid_param(message: impl Into<String>) -> ApiError {
        ApiError::bad_request(message)
    }
}

/// `continue` tokens as the real server makes them: base64url of
/// `{"v":"meta.k8s.io/v1","rv":N,"start":"<key>\u0000"}`.
pub fn encode_continue(rv: u64, start: &str) -> String {
    let token = json!({"v": "meta.k8s.io/v1", "rv": rv, "start": start});
    URL_SAFE_NO_PAD.encode(token.to_string())
}

fn decode_continue(token: &str) -> Result<(u64, String), ApiError> {
    let invalid = |why: &str| ApiError::bad_request(format!("continue key is not valid: {why}"));
    let bytes = URL_SAFE_NO_PAD
        .decode(token.trim_end_matches('='))
        .map_err(|e| invalid(&e.to_string()))?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|e| invalid(&e.to_string()))?;
    if value["v"] != "meta.k8s.io/v1" {
        return Err(invalid(
            "incorrect encoded start resourceVersion (version meta.k8s.io/v1)",
        ));
    }
    let rv = value["rv"].as_u64().ok_or_else(|| invalid("no rv"))?;
    let start = value["start"]
        .as_str()
        .ok_or_else(|| invalid("no start"))?
        .to_owned();
    Ok((rv, start))
}
