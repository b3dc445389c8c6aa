//! A test Kubernetes API server that real clients (kube-rs watchers, kubectl, the official
//! Python client) accept: discovery, list (pagination, selectors, resourceVersion semantics),
//! watch (ordered events after a revision, bookmarks, timeouts, 410 after compaction), and
//! writes (create, replace, patch, delete), with `Status` errors shaped like the real ones.
//!
//! Served types (see [`resources::RESOURCES`]): core `v1` services, endpoints, nodes,
//! namespaces, pods, and `discovery.k8s.io/v1` endpointslices. Objects are JSON values; the
//! server sets what the real one owns (`resourceVersion` from one global counter, `uid`,
//! `creationTimestamp`, `generation`) but applies no defaulting, validation or admission
//! beyond that.
//!
//! ```no_run
//! use integration_tests::kube_api::KubeApi;
//! let api = KubeApi::start();
//! api.load_fixtures("tests/fixtures/kubernetes").unwrap();
//! api.kubeconfig("/tmp/kubeconfig");
//! // ... run a client against http://{api.addr()} ...
//! ```
//!
//! The server runs on its own thread with its own tokio runtime, so it can be used from
//! plain `#[test]`s and from async tests alike. [`KubeApi::stop`] drops every connection and
//! closes the port (an outage); [`KubeApi::restart`] serves again on the same port, with the
//! same objects and history.

pub mod patch;
pub mod resources;
pub mod selector;
mod server;
pub mod status;
pub mod store;
pub mod table;
pub mod watch;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

pub use status::ApiError;
pub use store::DEFAULT_MAX_HISTORY;

use store::Store;

/// Default interval of BOOKMARK events on watches that allow them.
pub const DEFAULT_BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);

/// One request the server answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    pub method: String,
    pub path: String,
    /// The raw query string (percent-encoded, as sent).
    pub query: String,
    pub status: u16,
    /// A watch (its status is that of the response head; the stream may run long after).
    pub watch: bool,
    pub peer: SocketAddr,
}

impl RequestRecord {
    /// The decoded value of query parameter `name`.
    pub fn param(&self, name: &str) -> Option<String> {
        let uri: axum::http::Uri = format!("/?{}", self.query).parse().ok()?;
        let axum::extract::Query(pairs) =
            axum::extract::Query::<Vec<(String, String)>>::try_from_uri(&uri).ok()?;
        pairs
            .into_iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }
}

/// Settings of a server.
#[derive(Debug, Clone)]
pub struct Options {
    /// Port on 127.0.0.1; 0 picks a free one.
    pub port: u16,
    /// `None`: no bookmarks at all.
    pub bookmark_interval: Option<Duration>,
    /// Changes kept for watches and `continue` tokens; older revisions answer 410.
    pub max_history: usize,
    /// Print one line per request on stderr.
    pub log_requests: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            port: 0,
            bookmark_interval: Some(DEFAULT_BOOKMARK_INTERVAL),
            max_history: DEFAULT_MAX_HISTORY,
            log_requests: false,
        }
    }
}

/// State shared by the handle and the HTTP side.
pub(crate) struct Shared {
    store: Mutex<Store>,
    /// 0: no bookmarks.
    pub(crate) bookmark_interval_ms: AtomicU64,
    requests: Mutex<Vec<RequestRecord>>,
    log_requests: AtomicBool,
    server_address: Mutex<String>,
}

impl Shared {
    pub(crate) fn store(&self) -> MutexGuard<'_, Store> {
        // A panicking test thread must not poison the server for the others.
        self.store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn server_address(&self) -> String {
        self.server_address
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn record(&self, record: RequestRecord) {
        if self.log_requests.load(Ordering::Relaxed) {
            eprintln!(
                "kube-api: {} {}{}{} -> {}{}",
                record.method,
                record.path,
                if record.query.is_empty() { "" } else { "?" },
                record.query,
                record.status,
                if record.watch { " (watch)" } else { "" }
            );
        }
        self.requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(record);
    }
}

enum Control {
    Start {
        port: u16,
        reply: std::sync::mpsc::Sender<std::io::Result<SocketAddr>>,
    },
    Stop {
        reply: std::sync::mpsc::Sender<()>,
    },
}

/// A running test API server. Dropping it stops the server and its thread.
pub struct KubeApi {
    shared: Arc<Shared>,
    control: Option<mpsc::UnboundedSender<Control>>,
    thread: Option<JoinHandle<()>>,
    addr: SocketAddr,
    running: bool,
}

impl KubeApi {
    /// Starts a server on a free port of 127.0.0.1 with default options. Panics when it cannot.
    pub fn start() -> KubeApi {
        KubeApi::start_with(Options::default()).expect("start the test Kubernetes API server")
    }

    pub fn start_with(options: Options) -> std::io::Result<KubeApi> {
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new(options.max_history)),
            bookmark_interval_ms: AtomicU64::new(interval_ms(options.bookmark_interval)),
            requests: Mutex::new(Vec::new()),
            log_requests: AtomicBool::new(options.log_requests),
            server_address: Mutex::new(String::new()),
        });
        let (control, commands) = mpsc::unbounded_channel();
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("kube-api".into())
            .spawn(move || server_thread(thread_shared, commands))?;
        let mut api = KubeApi {
            shared,
            control: Some(control),
            thread: Some(thread),
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, options.port)),
            running: false,
        };
        api.listen(options.port)?;
        Ok(api)
    }

    fn listen(&mut self, port: u16) -> std::io::Result<()> {
        let (reply, answer) = std::sync::mpsc::channel();
        self.send(Control::Start { port, reply });
        let addr = answer
            .recv()
            .map_err(|_| std::io::Error::other("the kube-api server thread is gone"))??;
        self.addr = addr;
        *self
            .shared
            .server_address
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = addr.to_string();
        self.running = true;
        Ok(())
    }

    fn send(&self, command: Control) {
        self.control
            .as_ref()
            .expect("control channel lives as long as the handle")
            .send(command)
            .unwrap_or_else(|_| panic!("the kube-api server thread is gone"));
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Whether the port is served (false between [`stop`](Self::stop) and
    /// [`restart`](Self::restart)).
    pub fn is_running(&self) -> bool {
        self.running
    }

    /// Drops every open connection (watches end without a final event, as when an API server
    /// dies) and closes the port: clients get "connection refused" until [`restart`]. The
    /// store stays, and in-process writes keep working.
    ///
    /// [`restart`]: Self::restart
    pub fn stop(&mut self) {
        if !self.running {
            return;
        }
        let (reply, done) = std::sync::mpsc::channel();
        self.send(Control::Stop { reply });
        let _ = done.recv();
        self.running = false;
    }

    /// Serves again on the same port after [`stop`](Self::stop).
    pub fn restart(&mut self) -> std::io::Result<()> {
        if self.running {
            return Ok(());
        }
        // The old socket may linger for a moment; retry binding briefly.
        let mut last = None;
        for _ in 0..50 {
            match self.listen(self.addr.port()) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                    last = Some(e);
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.expect("looped at least once"))
    }

    /// Creates or replaces a whole object (spec, status, metadata) as a controller would,
    /// emitting ADDED or MODIFIED. The type comes from `apiVersion` and `kind`; a namespaced
    /// object without `metadata.namespace` goes to `default`. Returns the stored object.
    /// Panics when the type is not served or the name is missing.
    #[track_caller]
    pub fn apply(&self, object: Value) -> Value {
        self.try_apply(object)
            .unwrap_or_else(|e| panic!("kube-api apply: {e}"))
    }

    pub fn try_apply(&self, object: Value) -> Result<Value, ApiError> {
        self.shared.store().apply(object)
    }

    /// Deletes an object as a DELETE request does (an object with finalizers only gets a
    /// `deletionTimestamp`). `kind` is a kind, plural or short name (`Service`, `services`,
    /// `svc`, `EndpointSlice`); `namespace` is ignored for cluster-scoped types. Returns the
    /// object's last state, `None` when it did not exist.
    #[track_caller]
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let resource = resource_named(kind);
        self.shared
            .store()
            .delete(resource, namespace, name, &Value::Null)
            .ok()
    }

    /// The stored object, with `kind` and `apiVersion`.
    #[track_caller]
    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        self.shared
            .store()
            .get(resource_named(kind), namespace, name)
            .ok()
    }

    /// Every stored object of a type, in all namespaces, ordered by namespace then name.
    #[track_caller]
    pub fn list(&self, kind: &str) -> Vec<Value> {
        self.shared.store().all(resource_named(kind))
    }

    /// The current revision (the last write's `resourceVersion`).
    pub fn resource_version(&self) -> u64 {
        self.shared.store().resource_version()
    }

    /// Forgets the whole change history: watches from any earlier `resourceVersion` get an
    /// ERROR event with a 410 `Expired` Status, and older `continue` tokens a 410 response.
    pub fn compact(&self) {
        self.shared.store().compact();
    }

    /// Keeps at most `max` changes (older revisions expire as with [`compact`](Self::compact)).
    pub fn set_max_history(&self, max: usize) {
        self.shared.store().set_max_history(max);
    }

    /// BOOKMARK interval for open and new watches; `None` stops bookmarks.
    pub fn set_bookmark_interval(&self, interval: Option<Duration>) {
        self.shared
            .bookmark_interval_ms
            .store(interval_ms(interval), Ordering::Relaxed);
    }

    pub fn set_log_requests(&self, on: bool) {
        self.shared.log_requests.store(on, Ordering::Relaxed);
    }

    /// Writes a kubeconfig pointing at `http://127.0.0.1:PORT` (no auth, namespace
    /// `default`) to `path`.
    pub fn kubeconfig(&self, path: impl AsRef<Path>) -> std::io::Result<()> {
        std::fs::write(path, kubeconfig_yaml(&self.url()))
    }

    /// Loads fixtures: a JSON file (one object, or a list with `items`) or a directory of
    /// them (`*.json`, in name order). Returns how many objects were applied.
    pub fn load_fixtures(&self, path: impl AsRef<Path>) -> Result<usize, String> {
        let objects = read_fixtures(path.as_ref())?;
        let count = objects.len();
        for object in objects {
            self.try_apply(object).map_err(|e| e.to_string())?;
        }
        Ok(count)
    }

    /// Every request answered so far, in order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// How many requests (any method, watches included) were made to `path`.
    pub fn request_count(&self, path: &str) -> usize {
        self.requests().iter().filter(|r| r.path == path).count()
    }

    /// How many watches were opened on `path`.
    pub fn watch_count(&self, path: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.path == path && r.watch)
            .count()
    }

    pub fn clear_requests(&self) {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        // Closing the channel ends the server thread's loop, which stops the server.
        self.control.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn interval_ms(interval: Option<Duration>) -> u64 {
    interval.map_or(0, |d| (d.as_millis() as u64).max(1))
}

#[track_caller]
fn resource_named(kind: &str) -> resources::ResourceId {
    resources::by_name(kind).unwrap_or_else(|| panic!("kube-api: no served type named {kind:?}"))
}

fn server_thread(shared: Arc<Shared>, mut commands: mpsc::UnboundedReceiver<Control>) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("kube-api-rt")
        .enable_all()
        .build()
        .expect("build the kube-api tokio runtime");
    runtime.block_on(async move {
        let mut running: Option<(oneshot::Sender<()>, tokio::task::JoinHandle<()>)> = None;
        while let Some(command) = commands.recv().await {
            match command {
                Control::Start { port, reply } => {
                    if running.is_some() {
                        let _ = reply.send(Err(std::io::Error::other("already serving")));
                        continue;
                    }
                    match bind(port) {
                        Ok(listener) => {
                            let addr = listener.local_addr();
                            let (stop, stopped) = oneshot::channel();
                            let task =
                                tokio::spawn(server::serve(listener, shared.clone(), stopped));
                            running = Some((stop, task));
                            let _ = reply.send(addr);
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    }
                }
                Control::Stop { reply } => {
                    if let Some((stop, task)) = running.take() {
                        let _ = stop.send(());
                        let _ = task.await;
                    }
                    let _ = reply.send(());
                }
            }
        }
        if let Some((stop, task)) = running.take() {
            let _ = stop.send(());
            let _ = task.await;
        }
    });
}

fn bind(port: u16) -> std::io::Result<tokio::net::TcpListener> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))?;
    socket.listen(1024)
}

/// A kubeconfig for `server` (`http://...`): one cluster, one context, a user without
/// credentials.
pub fn kubeconfig_yaml(server: &str) -> String {
    format!(
        "apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: mesh-test\n  \
           cluster:\n    \
             server: {server}\n\
         contexts:\n\
         - name: mesh-test\n  \
           context:\n    \
             cluster: mesh-test\n    \
             user: mesh-test\n    \
             namespace: default\n\
         current-context: mesh-test\n\
         users:\n\
         - name: mesh-test\n  \
           user: {{}}\n\
         preferences: {{}}\n"
    )
}

/// The objects in a fixture file or directory. A list's items get the list's item kind
/// (`ServiceList` -> `Service`) and apiVersion when they carry none, as list items from a
/// real server do not.
pub fn read_fixtures(path: &Path) -> Result<Vec<Value>, String> {
    let mut files = Vec::new();
    if path.is_dir() {
        let entries = std::fs::read_dir(path).map_err(|e| format!("{}: {e}", path.display()))?;
        for entry in entries {
            let entry = entry.map_err(|e| format!("{}: {e}", path.display()))?;
            let p = entry.path();
            if p.extension().is_some_and(|e| e == "json") {
                files.push(p);
            }
        }
        files.sort();
    } else {
        files.push(path.to_path_buf());
    }
    let mut objects = Vec::new();
    for file in files {
        let text =
            std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        let doc: Value =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", file.display()))?;
        match doc.get("items").and_then(Value::as_array) {
            Some(items) => {
                let list_kind = doc["kind"].as_str().unwrap_or_default();
                let item_kind = list_kind.strip_suffix("List").unwrap_or_default();
                for item in items {
                    let mut item = item.clone();
                    if item.get("kind").is_none() && !item_kind.is_empty() {
                        item["kind"] = Value::from(item_kind);
                        item["apiVersion"] = doc["apiVersion"].clone();
                    }
                    objects.push(item);
                }
            }
            None => objects.push(doc),
        }
    }
    Ok(objects)
}
