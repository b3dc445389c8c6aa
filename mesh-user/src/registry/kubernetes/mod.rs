//! The Kubernetes source: kube-rs watchers for Services, EndpointSlices and this node's Node,
//! translated (`translate`) into the source's complete set of services.
//!
//! - Start-up: nothing is sent until every watcher's initial list is done; then the whole
//!   cluster is applied as one update (no half-programmed cluster).
//! - A relist (reconnect, `410 Gone`) is buffered the same way and replaces the cache at once.
//! - While the API server is unreachable the last applied services stay in force; the outage
//!   is logged once and `mesh_registry_source_up{source="kubernetes"}` is 0.
//! - The last applied set is saved to `<state_dir>/kubernetes-services.json` and sent again
//!   when the agent starts, before its first map write: a restarted agent (a rolling update,
//!   a crash) keeps every Kubernetes VIP in the maps until its watchers have relisted, also
//!   while the API server is unreachable.
//! - A translated service whose VIP or name another source already has is a reported conflict:
//!   it is left out (logged, counted as a rejection), never a silent override.

pub mod objects;
pub mod translate;
pub mod translated;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Debug,
    sync::Arc,
};

use anyhow::Context as _;
use futures_util::{FutureExt as _, StreamExt as _, stream::BoxStream};
use k8s_openapi::api::{core::v1::Node, core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    Api, Client, Resource, ResourceExt as _,
    api::ListParams,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, watcher},
};
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use self::{
    objects::{Key, ServiceView, SliceView, key_of},
    objects::{LABEL_HEADLESS, LABEL_PROXY_NAME, LABEL_SERVICE_NAME},
    translate::{Filter, NodeView},
    translated::Translated,
};
use super::{
    Listing, Outcome, Source, SourceObserver, SourceUpdate,
    update::{self, SavedServices, Verdict},
};
use crate::config::{AgentConfig, Config, KubernetesConfig, ServiceConfig};

/// Objects of one kind (or what is kept of them) by (namespace, name), with the relist buffer.
struct Cache<V> {
    objects: BTreeMap<Key, V>,
    relisting: Option<BTreeMap<Key, V>>,
    synced: bool,
}

/// A watch event with its object as kept: (namespace, name) and the view.
type Event<V> = watcher::Event<(Key, V)>;

impl<V> Cache<V> {
    fn new() -> Self {
        Self {
            objects: BTreeMap::new(),
            relisting: None,
            synced: false,
        }
    }

    /// Applies one watcher event; true when the visible objects changed.
    fn apply(&mut self, event: Event<V>) -> bool {
        match event {
            watcher::Event::Init => {
                self.relisting = Some(BTreeMap::new());
                false
            }
            watcher::Event::InitApply((key, obj)) => {
                self.relisting.get_or_insert_default().insert(key, obj);
                false
            }
            watcher::Event::InitDone => {
                self.objects = self.relisting.take().unwrap_or_default();
                self.synced = true;
                true
            }
            watcher::Event::Apply((key, obj)) => {
                self.objects.insert(key, obj);
                true
            }
            watcher::Event::Delete((key, _)) => self.objects.remove(&key).is_some(),
        }
    }
}

/// kube-proxy's label selector for the Services it serves.
fn service_selector(service_proxy_name: &str) -> String {
    if service_proxy_name.is_empty() {
        format!("!{LABEL_PROXY_NAME},!{LABEL_HEADLESS}")
    } else {
        format!("{LABEL_PROXY_NAME}={service_proxy_name},!{LABEL_HEADLESS}")
    }
}

/// The node this agent runs on: `node_name`, else `$NODE_NAME` (downward API), else the host
/// name.
pub fn node_name(config: &KubernetesConfig) -> String {
    config
        .node_name
        .clone()
        .or_else(|| std::env::var("NODE_NAME").ok().filter(|n| !n.is_empty()))
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_default()
}

async fn client(config: &KubernetesConfig) -> anyhow::Result<Client> {
    let config = match &config.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?
        }
        // In-cluster service account, else $KUBECONFIG, else ~/.kube/config.
        None => kube::Config::infer()
            .await
            .context("no Kubernetes config (in-cluster, $KUBECONFIG or ~/.kube/config)")?,
    };
    Client::try_from(config).context("building the Kubernetes client")
}

/// Objects per page of the initial lists (kube-runtime's default is 500): fewer round trips at
/// start-up, for a few MB more while a page is decoded.
const LIST_PAGE: u32 = 5_000;

const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

type Events<V> = BoxStream<'static, Result<Event<V>, watcher::Error>>;

/// The watch of one kind, each object turned into what is kept of it (`view`) as it arrives,
/// so the decoded object is dropped at once.
fn watch_kind<K, V>(api: Api<K>, config: watcher::Config, view: fn(K) -> V) -> Events<V>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    V: Send + 'static,
{
    let keep = move |obj: K| (key_of(obj.meta()), view(obj));
    watcher(api, config)
        .default_backoff()
        .map(move |event| {
            event.map(|event| match event {
                watcher::Event::Apply(obj) => watcher::Event::Apply(keep(obj)),
                watcher::Event::Delete(obj) => watcher::Event::Delete(keep(obj)),
                watcher::Event::InitApply(obj) => watcher::Event::InitApply(keep(obj)),
                watcher::Event::Init => watcher::Event::Init,
                watcher::Event::InitDone => watcher::Event::InitDone,
            })
        })
        .boxed()
}

/// The Node is kept whole (there is one), without what is never read: an API server's
/// managedFields and kubectl's copy of the last applied object are often most of an
/// object's bytes.
fn node_view(mut node: Node) -> Node {
    drop(std::mem::take(node.managed_fields_mut()));
    node.annotations_mut().remove(LAST_APPLIED);
    node
}

/// Starts the source; it sends nothing until every initial list is done.
pub async fn start(
    agent: &AgentConfig,
    config: &KubernetesConfig,
    saved: SavedServices,
    updates: mpsc::Sender<SourceUpdate>,
    registry: watch::Receiver<Listing>,
    metrics: Arc<dyn SourceObserver>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let client = client(config).await?;
    let node = node_name(config);
    let filter = Filter {
        service_proxy_name: config.service_proxy_name.clone(),
    };
    let services = watch_kind(
        Api::<Service>::all(client.clone()),
        watcher::Config::default()
            .labels(&service_selector(&filter.service_proxy_name))
            .page_size(LIST_PAGE),
        |svc| ServiceView::new(&svc),
    );
    let slices = watch_kind(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default()
            .labels(LABEL_SERVICE_NAME)
            .page_size(LIST_PAGE),
        |slice| SliceView::new(&slice),
    );
    let nodes = watch_kind(
        Api::<Node>::all(client.clone()),
        watcher::Config::default().fields(&format!("metadata.name={node}")),
        node_view,
    );
    info!(node = %node, service_proxy_name = %filter.service_proxy_name, "kubernetes: watching");
    let initial = match saved.load() {
        Ok(Some(services)) => {
            let verdict = update::send_initial(&updates, Source::Kubernetes, services.clone())?;
            Some((services, verdict))
        }
        Ok(None) => None,
        Err(err) => {
            // The API server is the source of truth; the saved set is only a head start.
            warn!("kubernetes: ignoring the last known services: {err:#}");
            None
        }
    };
    metrics.source_state(Source::Kubernetes.name(), false, 0);
    let source = KubernetesSource {
        saver: start_saver(saved),
        agent: agent.clone(),
        node,
        filter,
        updates,
        registry,
        metrics,
        services: Cache::new(),
        slices: Cache::new(),
        nodes: Cache::new(),
        sent: None,
        down: None,
        resend: false,
        reachability: Api::all(client),
        skipped: BTreeMap::new(),
        translated: Translated::default(),
        started: Some(std::time::Instant::now()),
    };
    Ok(tokio::spawn(source.run(initial, services, slices, nodes)))
}

struct KubernetesSource {
    /// Keeps the last applied set for the next start.
    saver: watch::Sender<Option<Arc<Vec<ServiceConfig>>>>,
    /// What each translated service is validated against on its own, so one bad Service is
    /// reported and left out instead of rejecting the whole cluster.
    agent: AgentConfig,
    node: String,
    filter: Filter,
    updates: mpsc::Sender<SourceUpdate>,
    registry: watch::Receiver<Listing>,
    metrics: Arc<dyn SourceObserver>,
    services: Cache<ServiceView>,
    slices: Cache<SliceView>,
    nodes: Cache<Node>,
    /// The last set the agent accepted, shared with the saver (one copy of a large set, not
    /// two).
    sent: Option<Arc<Vec<ServiceConfig>>>,
    /// The watch error being reported, so an outage is logged once.
    down: Option<String>,
    /// The API server answers again after `down`: the next publish sends the set even if it
    /// did not change, so the source's state is reported again.
    resend: bool,
    /// Asked while `down`: a watch that resumes where it left off yields nothing until the
    /// cluster changes, so the end of an outage is seen by asking.
    reachability: Api<Service>,
    skipped: BTreeMap<&'static str, usize>,
    /// The caches translated, per Service.
    translated: Translated,
    /// When the source started, until its first set is sent: the start-up's phases are logged
    /// once (lists, translation, apply), as operators of large clusters ask where it goes.
    started: Option<std::time::Instant>,
}

/// Writes each set it is given to `saved`, the newest first: a burst of changes costs one
/// write, and the watchers never wait for the disk (fsync).
fn start_saver(saved: SavedServices) -> watch::Sender<Option<Arc<Vec<ServiceConfig>>>> {
    let (saver, mut sets) = watch::channel(None);
    tokio::spawn(async move {
        while sets.changed().await.is_ok() {
            let Some(set): Option<Arc<Vec<ServiceConfig>>> = sets.borrow_and_update().clone()
            else {
                continue;
            };
            let saved = saved.clone();
            match tokio::task::spawn_blocking(move || saved.save(&set)).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => warn!("kubernetes: {err:#}"),
                Err(err) => warn!("kubernetes: saving task failed: {err}"),
            }
        }
    });
    saver
}

/// Whether the API server answers a one-item list, asked after a pause (while the watches
/// fail, which they retry on their own).
async fn answers(api: &Api<Service>) -> bool {
    tokio::time::sleep(REACHABILITY_EVERY).await;
    api.list(&ListParams::default().limit(1)).await.is_ok()
}

const REACHABILITY_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// Which watcher an event came from.
/// Objects are boxed: they are large and of very different sizes.
enum Woken {
    Services(Box<Result<Event<ServiceView>, watcher::Error>>),
    Slices(Box<Result<Event<SliceView>, watcher::Error>>),
    Nodes(Box<Result<Event<Node>, watcher::Error>>),
    /// The API server answered while the watches were failing.
    Reachable,
    RegistryChanged,
    Ended,
}

impl KubernetesSource {
    async fn run(
        mut self,
        initial: Option<(Vec<ServiceConfig>, Verdict)>,
        mut services: Events<ServiceView>,
        mut slices: Events<SliceView>,
        mut nodes: Events<Node>,
    ) {
        if let Some((saved, verdict)) = initial {
            match verdict.await {
                Ok(Outcome::Applied { .. } | Outcome::Failed(_)) => {
                    info!(
                        services = saved.len(),
                        "kubernetes: the last known services stay in force until the lists are in"
                    );
                    self.sent = Some(Arc::new(saved));
                }
                // The agent logged why.
                Ok(Outcome::Rejected(_)) => {}
                Ok(Outcome::AgentGone) | Err(_) => return,
            }
        }
        loop {
            let woken = tokio::select! {
                e = services.next() => e.map_or(Woken::Ended, |e| Woken::Services(Box::new(e))),
                e = slices.next() => e.map_or(Woken::Ended, |e| Woken::Slices(Box::new(e))),
                e = nodes.next() => e.map_or(Woken::Ended, |e| Woken::Nodes(Box::new(e))),
                changed = self.registry.changed() => match changed {
                    Ok(()) => Woken::RegistryChanged,
                    Err(_) => Woken::Ended,
                },
                true = answers(&self.reachability), if self.down.is_some() => Woken::Reachable,
            };
            let mut changed = self.wake(woken);
            if changed.is_none() {
                return;
            }
            // Take in everything already queued before translating once.
            for _ in 0..10_000 {
                let more = if let Some(Some(e)) = services.next().now_or_never() {
                    Woken::Services(Box::new(e))
                } else if let Some(Some(e)) = slices.next().now_or_never() {
                    Woken::Slices(Box::new(e))
                } else if let Some(Some(e)) = nodes.next().now_or_never() {
                    Woken::Nodes(Box::new(e))
                } else {
                    break;
                };
                match self.wake(more) {
                    Some(c) => changed = Some(changed.unwrap_or(false) || c),
                    None => return,
                }
            }
            if changed == Some(true) && self.synced() && !self.publish().await {
                return;
            }
        }
    }

    fn synced(&self) -> bool {
        self.services.synced && self.slices.synced && self.nodes.synced
    }

    /// Folds one event into the caches: Some(changed), or None when the agent is gone.
    fn wake(&mut self, woken: Woken) -> Option<bool> {
        let result = match woken {
            Woken::Services(e) => (*e).map(|e| {
                self.note_service(&e);
                self.services.apply(e)
            }),
            Woken::Slices(e) => (*e).map(|e| {
                self.note_slice(&e);
                self.slices.apply(e)
            }),
            Woken::Nodes(e) => (*e).map(|e| {
                let changed = self.nodes.apply(e);
                if changed {
                    // Topology and NodePorts depend on the node: everything again.
                    self.translated.everything_changed();
                }
                changed
            }),
            Woken::Reachable => Ok(false),
            Woken::RegistryChanged => Ok(true),
            Woken::Ended => return None,
        };
        match result {
            Ok(changed) => {
                if self.down.take().is_some() {
                    info!("kubernetes: the API server answers again");
                    // Publish even if nothing changed: sending the set again reports the
                    // source up (a relist after an outage often brings no change at all).
                    self.resend = true;
                    return Some(true);
                }
                Some(changed)
            }
            Err(err) => {
                let reason = err.to_string();
                if self.down.as_ref() != Some(&reason) {
                    warn!("kubernetes: watch failed, the last services stay in force: {reason}");
                    let count = self.sent.as_ref().map_or(0, |s| s.len());
                    self.metrics
                        .source_state(Source::Kubernetes.name(), false, count);
                }
                self.down = Some(reason);
                Some(false)
            }
        }
    }

    /// Which Service an event touches (a relist touches them all).
    fn note_service(&mut self, event: &Event<ServiceView>) {
        match event {
            watcher::Event::Apply((key, _)) | watcher::Event::Delete((key, _)) => {
                self.translated.service_changed(key.clone());
            }
            watcher::Event::InitDone => self.translated.everything_changed(),
            watcher::Event::Init | watcher::Event::InitApply(_) => {}
        }
    }

    /// Which Services a slice event touches: its owner before and after.
    fn note_slice(&mut self, event: &Event<SliceView>) {
        match event {
            watcher::Event::Apply((key, obj)) => {
                let old = self.slices.objects.get(key);
                self.translated.slice_changed(key, old, Some(obj));
            }
            watcher::Event::Delete((key, obj)) => {
                let old = self.slices.objects.get(key).or(Some(obj));
                self.translated.slice_changed(key, old, None);
            }
            watcher::Event::InitDone => self.translated.everything_changed(),
            watcher::Event::Init | watcher::Event::InitApply(_) => {}
        }
    }

    /// Translates what changed in the caches and sends the set if it differs from the last
    /// one accepted. False when the agent is gone.
    async fn publish(&mut self) -> bool {
        let listed = self.started.take().map(|at| (at, at.elapsed()));
        let node = NodeView::from_node(&self.node, self.nodes.objects.values().next());
        let (agent, metrics) = (&self.agent, &self.metrics);
        self.translated.refresh(
            &self.services.objects,
            &self.slices.objects,
            &node,
            &self.filter,
            |svc| valid_alone(agent, metrics.as_ref(), svc),
        );
        let skipped = self.translated.skipped();
        if skipped != self.skipped {
            for (reason, count) in &skipped {
                info!(reason, count, "kubernetes: skipped");
            }
            let source = Source::Kubernetes.name();
            for reason in self.skipped.keys().filter(|r| !skipped.contains_key(*r)) {
                self.metrics.skipped(source, reason, 0);
            }
            for (reason, count) in &skipped {
                self.metrics.skipped(source, reason, *count);
            }
            self.skipped = skipped;
        }
        // Compared by reference first: most publishes (the agent's own listing changing after
        // each applied update) change nothing, and a copy of 10,000 services each time only
        // churns the heap.
        let services = self.without_conflicts(self.translated.services());
        let same = self.sent.as_deref().is_some_and(|sent| {
            sent.len() == services.len() && sent.iter().zip(&services).all(|(a, b)| a == *b)
        });
        if same && self.down.is_none() && !std::mem::take(&mut self.resend) {
            return true;
        }
        let services: Vec<ServiceConfig> = services.into_iter().cloned().collect();
        let count = services.len();
        let translated = listed.map(|(at, lists)| (at, lists, at.elapsed() - lists));
        let outcome = update::send(&self.updates, Source::Kubernetes, services.clone()).await;
        if let Some((at, lists, translate)) = translated {
            info!(
                services = self.services.objects.len(),
                slices = self.slices.objects.len(),
                lists_ms = lists.as_millis() as u64,
                translate_ms = translate.as_millis() as u64,
                apply_ms = (at.elapsed() - lists - translate).as_millis() as u64,
                "kubernetes: start-up"
            );
        }
        match outcome {
            Outcome::Applied { generation } => {
                info!(services = count, generation, "kubernetes: services applied");
                self.save(services);
                self.metrics
                    .source_state(Source::Kubernetes.name(), self.down.is_none(), count);
            }
            Outcome::Failed(reason) => {
                warn!("kubernetes: services accepted but not yet in the maps: {reason}");
                self.save(services);
                self.metrics
                    .source_state(Source::Kubernetes.name(), false, count);
            }
            Outcome::Rejected(reason) => {
                // The agent logged the reasons; the previous services stay in force.
                self.metrics
                    .source_state(Source::Kubernetes.name(), false, count);
                let _ = reason;
            }
            Outcome::AgentGone => return false,
        }
        true
    }

    /// The set the agent accepted: compared with the next one, and kept for the next start.
    fn save(&mut self, services: Vec<ServiceConfig>) {
        let services = Arc::new(services);
        self.saver.send_replace(Some(services.clone()));
        self.sent = Some(services);
    }

    /// Leaves out services whose VIP or name another source has, reporting each conflict.
    fn without_conflicts<'a>(
        &self,
        services: impl Iterator<Item = &'a ServiceConfig>,
    ) -> Vec<&'a ServiceConfig> {
        let others: Vec<(Source, ServiceConfig)> = self
            .registry
            .borrow()
            .iter()
            .filter(|(source, _)| *source != Source::Kubernetes)
            .cloned()
            .collect();
        let vips: BTreeMap<_, _> = others
            .iter()
            .map(|(source, svc)| (svc.vip(), (*source, svc.name.clone())))
            .collect();
        let names: BTreeSet<&str> = others.iter().map(|(_, svc)| svc.name.as_str()).collect();
        services
            .filter(|svc| {
                if let Some((source, name)) = vips.get(&svc.vip()) {
                    error!(
                        "kubernetes: {} is not applied: its VIP {} is already service {name:?} of the {} source",
                        svc.name,
                        svc.vip(),
                        source.name()
                    );
                    self.metrics.config_rejected();
                    return false;
                }
                if names.contains(svc.name.as_str()) {
                    error!(
                        "kubernetes: {} is not applied: another source has a service of that name",
                        svc.name
                    );
                    self.metrics.config_rejected();
                    return false;
                }
                true
            })
            .collect()
    }
}

/// Whether a translated service is valid on its own (a VIP outside `vip_ranges`, ...): one
/// that is not is reported and left out, instead of the whole cluster being rejected.
pub fn valid_alone(agent: &AgentConfig, metrics: &dyn SourceObserver, svc: &ServiceConfig) -> bool {
    let alone = Config {
        agent: agent.clone(),
        services: vec![svc.clone()],
    };
    match alone.validate("kubernetes") {
        Ok(()) => true,
        Err(err) => {
            error!(
                "kubernetes: {} is not applied: {}",
                svc.name,
                err.to_string().replace('\n', "; ")
            );
            metrics.config_rejected();
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_service_selector_matches_kube_proxy() {
        assert_eq!(
            service_selector(""),
            "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
        );
        assert_eq!(
            service_selector("mesh"),
            "service.kubernetes.io/service-proxy-name=mesh,!service.kubernetes.io/headless"
        );
    }

    #[test]
    fn a_relist_replaces_the_cache_only_when_it_is_complete() {
        let svc = |name: &str| -> Service {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": "default"}
            }))
            .unwrap()
        };
        let svc = |name: &str| {
            let svc = svc(name);
            (key_of(&svc.metadata), ServiceView::new(&svc))
        };
        let mut cache = Cache::<ServiceView>::new();
        assert!(!cache.apply(watcher::Event::Init));
        assert!(!cache.apply(watcher::Event::InitApply(svc("a"))));
        assert!(!cache.synced && cache.objects.is_empty());
        assert!(cache.apply(watcher::Event::InitDone));
        assert_eq!(cache.objects.len(), 1);
        // A relist in progress keeps the old objects visible until it is done.
        cache.apply(watcher::Event::Init);
        cache.apply(watcher::Event::InitApply(svc("b")));
        assert!(cache.objects.contains_key(&("default".into(), "a".into())));
        cache.apply(watcher::Event::InitDone);
        let names: Vec<_> = cache.objects.keys().map(|k| k.1.clone()).collect();
        assert_eq!(names, ["b"]);
        assert!(cache.apply(watcher::Event::Delete(svc("b"))));
        assert!(!cache.apply(watcher::Event::Delete(svc("b"))));
    }
}
