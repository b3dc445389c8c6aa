//! Translations kept per Service, so an event costs what it touches: a Service event
//! re-translates that Service, an EndpointSlice event the Service it belongs to (before and
//! after a relabel); the node changing or a relist re-translates everything.

use std::collections::{BTreeMap, BTreeSet};

pub use super::objects::Key;
use super::{
    objects::{ServiceView, SliceView},
    translate::{Filter, NodeView, translate_one},
};
use crate::config::ServiceConfig;

#[derive(Debug, Default)]
pub struct Translated {
    /// Per Service: the services it translates to that `keep` accepted, and what was skipped.
    pieces: BTreeMap<Key, Piece>,
    /// Per Service: the keys of its EndpointSlices, sorted (the order their endpoints are
    /// merged in), each once. A Vec: most Services have one slice, and a set's first node is
    /// about half a kilobyte.
    slices_of: BTreeMap<Key, Vec<Key>>,
    dirty: BTreeSet<Key>,
    everything_dirty: bool,
}

#[derive(Debug, Default)]
struct Piece {
    services: Vec<ServiceConfig>,
    skipped: BTreeMap<&'static str, usize>,
}

impl Translated {
    pub fn service_changed(&mut self, key: Key) {
        self.dirty.insert(key);
    }

    /// Slice `key` was `old` and is now `new` (`None`: absent).
    pub fn slice_changed(&mut self, key: &Key, old: Option<&SliceView>, new: Option<&SliceView>) {
        if let Some(owner) = old.and_then(|s| s.owner.clone()) {
            if let Some(slices) = self.slices_of.get_mut(&owner) {
                slices.retain(|k| k != key);
                if slices.is_empty() {
                    self.slices_of.remove(&owner);
                }
            }
            self.dirty.insert(owner);
        }
        if let Some(owner) = new.and_then(|s| s.owner.clone()) {
            let slices = self.slices_of.entry(owner.clone()).or_default();
            if let Err(at) = slices.binary_search(key) {
                slices.insert(at, key.clone());
            }
            self.dirty.insert(owner);
        }
    }

    pub fn everything_changed(&mut self) {
        self.everything_dirty = true;
    }

    /// Re-translates what changed since the last call; `keep` decides which translated
    /// services are used (it is asked once per translation, so it may log).
    pub fn refresh(
        &mut self,
        services: &BTreeMap<Key, ServiceView>,
        slices: &BTreeMap<Key, SliceView>,
        node: &NodeView,
        filter: &Filter,
        mut keep: impl FnMut(&ServiceConfig) -> bool,
    ) {
        let dirty: Vec<Key> = if std::mem::take(&mut self.everything_dirty) {
            self.slices_of.clear();
            for (key, slice) in slices {
                if let Some(owner) = &slice.owner {
                    // `slices` is sorted by key: each key comes once, in order.
                    self.slices_of
                        .entry(owner.clone())
                        .or_default()
                        .push(key.clone());
                }
            }
            self.pieces.clear();
            self.dirty.clear();
            services.keys().cloned().collect()
        } else {
            std::mem::take(&mut self.dirty).into_iter().collect()
        };
        for key in dirty {
            let Some(service) = services.get(&key) else {
                self.pieces.remove(&key);
                continue;
            };
            let own: Vec<&SliceView> = self
                .slices_of
                .get(&key)
                .into_iter()
                .flatten()
                .filter_map(|slice| slices.get(slice))
                .collect();
            let translation = translate_one(&key, service, &own, node, filter);
            let mut services = translation.services;
            services.retain(|svc| keep(svc));
            // Kept until the Service changes: without the spare room of the pushes.
            services.shrink_to_fit();
            let piece = Piece {
                services,
                skipped: translation.skipped,
            };
            self.pieces.insert(key, piece);
        }
    }

    /// Every kept service, by Service.
    pub fn services(&self) -> impl Iterator<Item = &ServiceConfig> {
        self.pieces.values().flat_map(|p| p.services.iter())
    }

    /// Why objects (or ports of them) were left out: reason -> how many.
    pub fn skipped(&self) -> BTreeMap<&'static str, usize> {
        let mut total = BTreeMap::new();
        for piece in self.pieces.values() {
            for (reason, count) in &piece.skipped {
                *total.entry(*reason).or_default() += count;
            }
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;
    use crate::registry::kubernetes::translate::{Translation, translate};

    fn node() -> NodeView {
        NodeView {
            name: "node-a".into(),
            zone: Some("z1".into()),
            addresses: vec!["192.0.2.10".parse().unwrap()],
        }
    }

    fn service(name: &str, ip: u8, port: u16) -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"clusterIP": format!("10.96.0.{ip}"), "clusterIPs": [format!("10.96.0.{ip}")],
                     "ports": [{"name": "http", "port": port, "protocol": "TCP"}]}
        }))
        .unwrap()
    }

    /// Not ready and `terminating`: serving while terminating. Two slices with the same
    /// address and different conditions make the merge order of a Service's slices count.
    fn slice(name: &str, owner: &str, ip: u8, ready: bool, terminating: bool) -> EndpointSlice {
        let terminating = terminating && !ready;
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "default",
                         "labels": {"kubernetes.io/service-name": owner}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [format!("10.244.0.{ip}")], "nodeName": "node-a",
                           "conditions": {"ready": ready, "serving": ready || terminating,
                                          "terminating": terminating}}]
        }))
        .unwrap()
    }

    #[derive(Clone, Debug)]
    enum Event {
        Service(u8, Option<(u8, u16)>),
        Slice(u8, Option<(u8, u8, bool, bool)>),
        Relist,
    }

    fn arb_event() -> impl Strategy<Value = Event> {
        prop_oneof![
            (0u8..4, proptest::option::of((1u8..5, 80u16..83)))
                .prop_map(|(n, s)| Event::Service(n, s)),
            (
                0u8..5,
                proptest::option::of((0u8..4, 1u8..6, any::<bool>(), any::<bool>()))
            )
                .prop_map(|(n, s)| Event::Slice(n, s)),
            Just(Event::Relist),
        ]
    }

    fn key(name: String) -> Key {
        ("default".into(), name)
    }

    proptest! {
        /// After any sequence of events, the kept translations are what translating
        /// everything from scratch gives.
        #[test]
        fn translating_what_changed_equals_translating_everything(
            events in proptest::collection::vec(arb_event(), 1..30)
        ) {
            let (node, filter) = (node(), Filter::default());
            let mut services = BTreeMap::new();
            let mut slices: BTreeMap<Key, EndpointSlice> = BTreeMap::new();
            let mut translated = Translated::default();
            translated.everything_changed();
            for event in events {
                match event {
                    Event::Service(n, spec) => {
                        let k = key(format!("svc{n}"));
                        match spec {
                            Some((ip, port)) => services.insert(k.clone(), service(&k.1, ip, port)),
                            None => services.remove(&k),
                        };
                        translated.service_changed(k);
                    }
                    Event::Slice(n, spec) => {
                        let k = key(format!("slice{n}"));
                        let new = spec.map(|(owner, ip, ready, terminating)| {
                            slice(&k.1, &format!("svc{owner}"), ip, ready, terminating)
                        });
                        let old = match &new {
                            Some(new) => slices.insert(k.clone(), new.clone()),
                            None => slices.remove(&k),
                        };
                        translated.slice_changed(
                            &k,
                            old.as_ref().map(SliceView::new).as_ref(),
                            new.as_ref().map(SliceView::new).as_ref(),
                        );
                    }
                    Event::Relist => translated.everything_changed(),
                }
                // The caches hold views of the objects, as the source's do.
                let service_views = services.iter().map(|(k, s)| (k.clone(), ServiceView::new(s))).collect();
                let slice_views = slices.iter().map(|(k, s)| (k.clone(), SliceView::new(s))).collect();
                translated.refresh(&service_views, &slice_views, &node, &filter, |_| true);
                let all: Vec<Service> = services.values().cloned().collect();
                let all_slices: Vec<EndpointSlice> = slices.values().cloned().collect();
                let Translation { services: mut want, skipped } = translate(&all, &all_slices, &node, &filter);
                let mut got: Vec<ServiceConfig> = translated.services().cloned().collect();
                want.sort_by(|a, b| a.name.cmp(&b.name));
                got.sort_by(|a, b| a.name.cmp(&b.name));
                prop_assert_eq!(got, want);
                prop_assert_eq!(translated.skipped(), skipped);
            }
        }
    }
}
