//! Watch streams: JSON lines `{"type": ..., "object": ...}` of every change after the start
//! revision, filtered by the selectors, with periodic BOOKMARKs, closed after `timeoutSeconds`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::Bytes;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;

use super::Shared;
use super::resources::{RESOURCES, ResourceId};
use super::selector::{FieldSelector, LabelSelector};
use super::store::{Change, ChangeType, as_list_item};
use super::table::{self, IncludeObject};

/// Where a watch starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchStart {
    /// `resourceVersion` unset or `"0"`: synthetic ADDED events for the current objects, then
    /// the changes after the current revision.
    CurrentWithState,
    /// `resourceVersion=N`: the changes after N (410 when N is compacted away).
    After(u64),
    /// `sendInitialEvents=true`: ADDED for the current objects, a BOOKMARK annotated
    /// `k8s.io/initial-events-end: "true"`, then the changes.
    InitialEvents,
    /// `sendInitialEvents=false` without a `resourceVersion`: changes after the current
    /// revision only.
    Current,
}

#[derive(Debug, Clone)]
pub struct WatchRequest {
    pub resource: ResourceId,
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    pub start: WatchStart,
    pub bookmarks: bool,
    pub timeout: Duration,
    /// Objects of ADDED/MODIFIED/DELETED events as one-row Tables (kubectl's `get --watch`).
    pub table: Option<IncludeObject>,
}

pub struct WatchStream {
    shared: Arc<Shared>,
    request: WatchRequest,
    cursor: u64,
    pending: VecDeque<Bytes>,
    done: bool,
    deadline: Instant,
    last_bookmark: Instant,
    changed: watch::Receiver<u64>,
}

fn line(event_type: &str, object: &Value) -> Bytes {
    let mut bytes = serde_json::to_vec(&json!({"type": event_type, "object": object}))
        .expect("JSON values serialize");
    bytes.push(b'\n');
    Bytes::from(bytes)
}

impl WatchStream {
    pub(crate) fn new(shared: Arc<Shared>, request: WatchRequest) -> WatchStream {
        let store = shared.store();
        let changed = store.subscribe();
        let mut pending = VecDeque::new();
        let cursor = match request.start {
            WatchStart::After(rv) => rv,
            WatchStart::Current => store.resource_version(),
            WatchStart::CurrentWithState | WatchStart::InitialEvents => {
                for object in store.all(request.resource) {
                    if Self::selects(&request, &object) {
                        pending.push_back(Self::event_line(&request, "ADDED", object));
                    }
                }
                store.resource_version()
            }
        };
        drop(store);
        let now = Instant::now();
        let mut stream = WatchStream {
            shared,
            request,
            cursor,
            pending,
            done: false,
            deadline: now + Duration::ZERO,
            last_bookmark: now,
            changed,
        };
        stream.deadline = now + stream.request.timeout;
        if stream.request.start == WatchStart::InitialEvents {
            let mut bookmark = stream.bookmark();
            bookmark["metadata"]["annotations"] = json!({"k8s.io/initial-events-end": "true"});
            stream.pending.push_back(line("BOOKMARK", &bookmark));
        }
        stream
    }

    fn event_line(request: &WatchRequest, event_type: &str, object: Value) -> Bytes {
        match request.table {
            None => line(event_type, &object),
            Some(include) => {
                let accept = "application/json;as=Table;v=v1;g=meta.k8s.io";
                let table = table::maybe_table(
                    request.resource,
                    json!({"metadata": {"resourceVersion": object["metadata"]["resourceVersion"]},
                           "items": [as_list_item(&object)]}),
                    accept,
                    include,
                );
                line(event_type, &table)
            }
        }
    }

    fn selects(request: &WatchRequest, object: &Value) -> bool {
        if let Some(ns) = &request.namespace
            && object["metadata"]["namespace"].as_str() != Some(ns)
        {
            return false;
        }
        request.labels.matches(object) && request.fields.matches(object)
    }

    /// The event this watcher sees for a change, as the watch cache decides it: an object
    /// that starts matching the selectors is ADDED, one that stops matching is DELETED (its
    /// previous state at the change's revision).
    fn event_for(&self, change: &Change) -> Option<(&'static str, Value)> {
        if change.resource != self.request.resource {
            return None;
        }
        let now = Self::selects(&self.request, &change.object);
        let before = change
            .prev
            .as_ref()
            .is_some_and(|p| Self::selects(&self.request, p));
        match change.change {
            ChangeType::Added => now.then(|| ("ADDED", change.object.clone())),
            ChangeType::Deleted => now.then(|| ("DELETED", change.object.clone())),
            ChangeType::Modified => match (before, now) {
                (true, true) => Some(("MODIFIED", change.object.clone())),
                (false, true) => Some(("ADDED", change.object.clone())),
                (true, false) => {
                    let mut prev = change.prev.clone().expect("before implies prev");
                    prev["metadata"]["resourceVersion"] = json!(change.rv.to_string());
                    Some(("DELETED", prev))
                }
                (false, false) => None,
            },
        }
    }

    /// A BOOKMARK object: the type with only `metadata.resourceVersion`.
    fn bookmark(&self) -> Value {
        let r = &RESOURCES[self.request.resource];
        json!({
            "kind": r.kind,
            "apiVersion": r.api_version(),
            "metadata": {"resourceVersion": self.cursor.to_string(), "creationTimestamp": null},
        })
    }

    fn bookmark_interval(&self) -> Option<Duration> {
        match self.shared.bookmark_interval_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    /// The next chunk of the response body, or `None` when the watch ends.
    pub async fn next_chunk(&mut self) -> Option<Bytes> {
        loop {
            if let Some(chunk) = self.pending.pop_front() {
                return Some(chunk);
            }
            if self.done {
                return None;
            }
            self.changed.borrow_and_update();
            {
                let store = self.shared.store();
                match store.changes_after(self.cursor) {
                    Err(expired) => {
                        self.pending.push_back(line("ERROR", &expired.to_status()));
                        self.done = true;
                        continue;
                    }
                    Ok(changes) => {
                        for change in &changes {
                            if let Some((event_type, object)) = self.event_for(change) {
                                let chunk = Self::event_line(&self.request, event_type, object);
                                self.pending.push_back(chunk);
                            }
                        }
                        self.cursor = self.cursor.max(store.resource_version());
                    }
                }
            }
            if !self.pending.is_empty() {
                continue;
            }
            // With bookmarks off (or not asked for) the loop still wakes now and then, so that
            // `set_bookmark_interval` takes effect on open watches.
            let bookmark_at = self
                .bookmark_interval()
                .filter(|_| self.request.bookmarks)
                .map(|interval| self.last_bookmark + interval);
            let wake_at =
                bookmark_at.unwrap_or_else(|| Instant::now() + Duration::from_millis(200));
            tokio::select! {
                changed = self.changed.changed() => {
                    if changed.is_err() {
                        self.done = true;
                    }
                }
                () = tokio::time::sleep_until(self.deadline) => self.done = true,
                () = tokio::time::sleep_until(wake_at) => {
                    if bookmark_at.is_some() {
                        self.last_bookmark = Instant::now();
                        let bookmark = self.bookmark();
                        self.pending.push_back(line("BOOKMARK", &bookmark));
                    }
                }
            }
        }
    }
}
