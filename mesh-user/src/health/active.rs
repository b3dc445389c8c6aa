//! Active health checks: one probe (a tokio task) per distinct (backend, check settings) that
//! checks the backend (TCP connect or HTTP/1.1 GET) and turns consecutive results into a
//! `Health` with rise/fall hysteresis. A target is a (service VIP, backend) pair; targets with
//! the same backend address and the same `[services.health]` settings share one probe, so a
//! backend behind many services is checked once per interval, not once per service.
//!
//! The agent hands the monitor its targets (`set_targets`), reads `health` when it builds the
//! desired state, and re-reconciles when a `Transition` arrives on the events channel: a change
//! of a shared probe's health is sent once for every service that uses it. Passive detection
//! (connect failures the kernel counts) ejects a backend at once with `force_unhealthy`; the
//! active checks then decide when it comes back. Since health belongs to the probe, such an
//! ejection applies to every service that checks that backend with the same settings (passive
//! detection included in those settings).
//!
//! Rules, per probe:
//! - `Unknown` (a new probe) becomes `Healthy` after ONE success, not `rise`: a backend that is
//!   added to a service gets traffic as soon as it answers once, and nothing it has done yet
//!   suggests it is flapping. It becomes `Unhealthy` after `fall` consecutive failures.
//! - `Healthy` becomes `Unhealthy` after `fall` consecutive failures.
//! - `Unhealthy` becomes `Healthy` after `rise` consecutive successes.
//! - `type = "none"`: no task, no checks; the target is `Healthy` and `force_unhealthy` leaves
//!   it alone (nothing would ever bring it back).
//!
//! Every probe runs its checks one after the other, so a backend never has more than one check
//! of one setting in flight; a semaphore caps the checks in flight over all probes. State is
//! shared between the tasks and the monitor through a `std::sync::Mutex` per probe, never held
//! across an `.await`. Transitions are sent while that lock is held, so the events of one
//! target arrive in the order they happened.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    hash::{BuildHasher as _, RandomState},
    io,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock},
    time::{Duration, Instant},
};

use hyper::{
    Request,
    header::{CONNECTION, HOST, USER_AGENT},
};
use hyper_util::rt::TokioIo;
use tokio::{
    net::TcpStream,
    sync::{Semaphore, mpsc::UnboundedSender},
    task::JoinHandle,
};
use tracing::{debug, info};

use crate::{
    config::{HealthConfig, HealthKind},
    model::Vip,
};

/// One backend of one service to check, and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub vip: Vip,
    pub backend: SocketAddr,
    pub check: HealthConfig,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// Not checked successfully or unsuccessfully enough yet (or not a target).
    Unknown,
    Healthy,
    Unhealthy,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        }
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A change of one target's health, with the check result (or the forcing) that caused it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub vip: Vip,
    pub backend: SocketAddr,
    pub from: Health,
    pub to: Health,
    /// `"HTTP status 503"`, `"timeout after 500ms"`, `"connection refused"`, `"connected"`,
    /// `"forced by passive detection: ..."`.
    pub reason: String,
}

/// Called after every check with its outcome (`success`, `timeout`, `refused`, `bad_status` or
/// `error`) and how long it took, from the checker task (keep it cheap).
pub type CheckObserver = Arc<dyn Fn(&'static str, Duration) + Send + Sync>;

type Key = (Vip, SocketAddr);
/// What one probe checks: a backend, with one set of check settings.
type ProbeKey = (SocketAddr, HealthConfig);
type ObserverSlot = Arc<RwLock<Option<CheckObserver>>>;

/// Runs the checks and holds the health of every target.
pub struct HealthMonitor {
    /// Each target's check settings (with the backend, the key of its probe).
    targets: BTreeMap<Key, HealthConfig>,
    probes: HashMap<ProbeKey, Probe>,
    permits: Arc<Semaphore>,
    events: UnboundedSender<Transition>,
    observer: ObserverSlot,
}

/// A probe as the monitor holds it.
struct Probe {
    state: Arc<Mutex<ProbeState>>,
    /// `None` for `type = "none"`.
    task: Option<JoinHandle<()>>,
}

impl Probe {
    /// Stops the task for good: after this it neither changes the state nor sends events, even
    /// if it was in the middle of a check on another thread. Returns the last health.
    fn retire(self) -> Health {
        let health = {
            let mut state = lock(&self.state);
            state.retired = true;
            state.health
        };
        if let Some(task) = self.task {
            task.abort();
        }
        health
    }
}

/// What a probe's task and the monitor share.
#[derive(Debug)]
struct ProbeState {
    health: Health,
    /// Consecutive successes and failures; one of them is always 0.
    successes: u32,
    failures: u32,
    /// Bumped by `force_unhealthy`: a check that was in flight then does not count.
    epoch: u64,
    /// Set when the last target of the probe is removed.
    retired: bool,
    /// The services whose target this probe is; each gets the probe's transitions.
    users: BTreeSet<Vip>,
}

impl ProbeState {
    fn new(health: Health) -> Self {
        Self {
            health,
            successes: 0,
            failures: 0,
            epoch: 0,
            retired: false,
            users: BTreeSet::new(),
        }
    }

    /// Counts one check result; returns `(from, to)` when the health changes.
    fn record(&mut self, success: bool, rise: u32, fall: u32) -> Option<(Health, Health)> {
        let from = self.health;
        if success {
            self.successes = self.successes.saturating_add(1);
            self.failures = 0;
            let needed = match from {
                Health::Healthy => return None,
                // See the module docs: a new backend needs one success only.
                Health::Unknown => 1,
                Health::Unhealthy => rise.max(1),
            };
            if self.successes >= needed {
                self.health = Health::Healthy;
            }
        } else {
            self.failures = self.failures.saturating_add(1);
            self.successes = 0;
            if from != Health::Unhealthy && self.failures >= fall.max(1) {
                self.health = Health::Unhealthy;
            }
        }
        (self.health != from).then_some((from, self.health))
    }

    /// Sends `from -> to` to every service of the probe.
    fn emit(
        &self,
        events: &UnboundedSender<Transition>,
        backend: SocketAddr,
        from: Health,
        to: Health,
        reason: &str,
    ) {
        for &vip in &self.users {
            emit(
                events,
                Transition {
                    vip,
                    backend,
                    from,
                    to,
                    reason: reason.to_owned(),
                },
            );
        }
    }
}

impl HealthMonitor {
    /// `max_concurrent`: global cap on checks in flight (at least 1); events go to `events`.
    pub fn new(max_concurrent: usize, events: UnboundedSender<Transition>) -> Self {
        Self {
            targets: BTreeMap::new(),
            probes: HashMap::new(),
            permits: Arc::new(Semaphore::new(max_concurrent.max(1))),
            events,
            observer: Arc::new(RwLock::new(None)),
        }
    }

    /// Sets the callback called after every check (running tasks use it from their next check).
    pub fn on_check(&mut self, observer: CheckObserver) {
        *self
            .observer
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(observer);
    }

    #[cfg(test)]
    /// Replaces the set of targets (the last one wins if a (vip, backend) appears twice).
    ///
    /// - Unchanged targets keep their probe (state and running task).
    /// - Removed targets leave their probe, which stops with its last target; `health`
    ///   returns `Unknown` for them.
    /// - New targets join the probe of their backend and settings if there is one (and get
    ///   its health), else start one: `Unknown`, or `Healthy` if any of its new targets is in
    ///   `initially_healthy` (the backends that already carry traffic, so an agent restart
    ///   ejects nobody).
    /// - Targets whose check config changed move to the probe of the new settings; a probe
    ///   started for them keeps their health, with the consecutive counts from 0.
    /// - `type = "none"` targets are `Healthy`, without a task.
    ///
    /// Sends no events: the caller reads `health` for the states it has just set.
    pub fn set_targets(&mut self, targets: Vec<Target>, initially_healthy: impl Fn(&Key) -> bool) {
        self.retarget(|_| true, targets, initially_healthy);
    }

    /// `set_targets` for the services at `vips` only: the targets of every other service
    /// are left as they are.
    pub fn set_targets_of(
        &mut self,
        vips: &BTreeSet<Vip>,
        targets: Vec<Target>,
        initially_healthy: impl Fn(&Key) -> bool,
    ) {
        self.retarget(|vip| vips.contains(vip), targets, initially_healthy);
    }

    /// Detaches targets at VIPs `in_scope` accepts that `targets` no longer lists, and attaches
    /// (or moves, when the check changed) those it lists.
    fn retarget(
        &mut self,
        in_scope: impl Fn(&Vip) -> bool,
        targets: Vec<Target>,
        initially_healthy: impl Fn(&Key) -> bool,
    ) {
        let wanted: BTreeMap<Key, HealthConfig> = targets
            .into_iter()
            .map(|t| ((t.vip, t.backend), t.check))
            .collect();
        let gone: Vec<Key> = self
            .targets
            .keys()
            .filter(|key| in_scope(&key.0) && !wanted.contains_key(key))
            .copied()
            .collect();
        for key in gone {
            self.detach(key);
        }
        // The health a probe started now begins with: healthy if any of its new targets
        // already carries traffic, else the health a moved target had.
        let mut starting: HashMap<ProbeKey, Health> = HashMap::new();
        let mut joining: Vec<(Key, HealthConfig)> = Vec::new();
        for (key, check) in wanted {
            let previous = match self.targets.get(&key) {
                Some(current) if *current == check => continue,
                Some(_) => self.detach(key),
                None => None,
            };
            let health = match previous {
                Some(health) => health,
                None if initially_healthy(&key) => Health::Healthy,
                None => Health::Unknown,
            };
            let probe = (key.1, check.clone());
            if !self.probes.contains_key(&probe) {
                let best = starting.entry(probe).or_insert(health);
                if health == Health::Healthy {
                    *best = Health::Healthy;
                }
            }
            joining.push((key, check));
        }
        for ((vip, backend), check) in joining {
            let probe = (backend, check);
            if !self.probes.contains_key(&probe) {
                let health = starting.get(&probe).copied().unwrap_or(Health::Unknown);
                let started = self.start(backend, &probe.1, health);
                self.probes.insert(probe.clone(), started);
            }
            if let Some(p) = self.probes.get(&probe) {
                lock(&p.state).users.insert(vip);
            }
            self.targets.insert((vip, backend), probe.1);
        }
    }

    /// Removes a target; its probe stops with its last target. Returns the target's health.
    fn detach(&mut self, key: Key) -> Option<Health> {
        let check = self.targets.remove(&key)?;
        let probe = (key.1, check);
        let (health, last) = {
            let p = self.probes.get(&probe)?;
            let mut state = lock(&p.state);
            state.users.remove(&key.0);
            (state.health, state.users.is_empty())
        };
        if last && let Some(p) = self.probes.remove(&probe) {
            p.retire();
            debug!(backend = %key.1, "health checks stopped");
        }
        Some(health)
    }

    fn start(&self, backend: SocketAddr, check: &HealthConfig, health: Health) -> Probe {
        if check.kind == HealthKind::None {
            return Probe {
                state: Arc::new(Mutex::new(ProbeState::new(Health::Healthy))),
                task: None,
            };
        }
        let state = Arc::new(Mutex::new(ProbeState::new(health)));
        let checker = Checker {
            backend,
            check: check.clone(),
            state: state.clone(),
            permits: self.permits.clone(),
            events: self.events.clone(),
            observer: self.observer.clone(),
        };
        debug!(%backend, kind = ?check.kind, %health, "health checks started");
        Probe {
            state,
            task: Some(tokio::spawn(checker.run())),
        }
    }

    fn probe_of(&self, vip: &Vip, backend: &SocketAddr) -> Option<(&HealthConfig, &Probe)> {
        let check = self.targets.get(&(*vip, *backend))?;
        let probe = self.probes.get(&(*backend, check.clone()))?;
        Some((check, probe))
    }

    /// The health of a target; `Unknown` if it is not one.
    pub fn health(&self, vip: &Vip, backend: &SocketAddr) -> Health {
        self.probe_of(vip, backend)
            .map_or(Health::Unknown, |(_, probe)| lock(&probe.state).health)
    }

    /// How many probes run (distinct backend and settings).
    #[cfg(test)]
    pub fn probe_count(&self) -> usize {
        self.probes.values().filter(|p| p.task.is_some()).count()
    }

    /// Passive detection (kernel-observed connect failures) makes a backend `Unhealthy` at once
    /// and emits the transition (to every service of its probe); it then needs `rise`
    /// consecutive successful checks, counted from now (a check in flight does not count).
    /// Ignored for targets that are not checked.
    pub fn force_unhealthy(&self, vip: &Vip, backend: &SocketAddr, reason: &str) {
        let Some((check, probe)) = self.probe_of(vip, backend) else {
            debug!(%vip, %backend, reason, "not a health check target; passive failure ignored");
            return;
        };
        if check.kind == HealthKind::None {
            debug!(%vip, %backend, reason, "health checks are off; passive failure ignored");
            return;
        }
        let mut state = lock(&probe.state);
        state.epoch += 1;
        state.successes = 0;
        let from = state.health;
        if from != Health::Unhealthy {
            state.health = Health::Unhealthy;
            state.emit(
                &self.events,
                *backend,
                from,
                Health::Unhealthy,
                &format!("forced by passive detection: {reason}"),
            );
        }
    }

    /// Every target with its health and consecutive failed checks, for metrics.
    pub fn snapshot(&self) -> Vec<(Vip, SocketAddr, Health, u32)> {
        self.targets
            .keys()
            .filter_map(|&(vip, backend)| {
                let (_, probe) = self.probe_of(&vip, &backend)?;
                let state = lock(&probe.state);
                Some((vip, backend, state.health, state.failures))
            })
            .collect()
    }
}

impl Drop for HealthMonitor {
    fn drop(&mut self) {
        // First, so that no check starts with a permit an already aborted task gave back.
        self.permits.close();
        for (_, probe) in std::mem::take(&mut self.probes) {
            probe.retire();
        }
    }
}

fn lock(state: &Mutex<ProbeState>) -> MutexGuard<'_, ProbeState> {
    // The state stays consistent even if a holder panicked: every update is a few assignments.
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

fn emit(events: &UnboundedSender<Transition>, transition: Transition) {
    info!(
        vip = %transition.vip,
        backend = %transition.backend,
        from = %transition.from,
        to = %transition.to,
        reason = %transition.reason,
        "backend health changed"
    );
    // A closed channel means the agent is shutting down; nobody needs the event then.
    let _ = events.send(transition);
}

/// The task of one probe.
struct Checker {
    backend: SocketAddr,
    check: HealthConfig,
    state: Arc<Mutex<ProbeState>>,
    permits: Arc<Semaphore>,
    events: UnboundedSender<Transition>,
    observer: ObserverSlot,
}

impl Checker {
    async fn run(self) {
        let mut rng = Rng::seeded();
        // Spread the first checks so that probes started together do not check in lockstep,
        // but over at most 100 ms: a new backend gets no traffic before its first success.
        let spread = self.check.interval.min(Duration::from_millis(100));
        tokio::time::sleep(rng.below(spread)).await;
        loop {
            let Ok(permit) = self.permits.acquire().await else {
                return; // The semaphore is never closed.
            };
            let epoch = lock(&self.state).epoch;
            let started = Instant::now();
            let outcome = probe(&self.check, self.backend).await;
            let elapsed = started.elapsed();
            drop(permit);
            self.observe(&outcome, elapsed);
            self.record(&outcome, elapsed, epoch);
            tokio::time::sleep(rng.jittered(self.check.interval)).await;
        }
    }

    fn observe(&self, outcome: &Outcome, elapsed: Duration) {
        let observer = self
            .observer
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(observer) = observer {
            observer(outcome.label(), elapsed);
        }
    }

    fn record(&self, outcome: &Outcome, elapsed: Duration, epoch: u64) {
        let reason = outcome.reason();
        let mut state = lock(&self.state);
        if state.retired {
            return;
        }
        if state.epoch != epoch {
            debug!(backend = %self.backend, %reason,
                "health check started before a forced ejection; not counted");
            return;
        }
        let change = state.record(outcome.is_success(), self.check.rise, self.check.fall);
        debug!(
            backend = %self.backend,
            services = state.users.len(),
            outcome = outcome.label(),
            ?elapsed,
            %reason,
            health = %state.health,
            successes = state.successes,
            failures = state.failures,
            "health check"
        );
        if let Some((from, to)) = change {
            state.emit(&self.events, self.backend, from, to, &reason);
        }
    }
}

/// The result of one check.
#[derive(Debug)]
enum Outcome {
    /// A TCP check connected.
    Connected,
    /// An HTTP check got a response with this status.
    Status {
        code: u16,
        accepted: bool,
    },
    Timeout(Duration),
    Refused,
    Error(String),
}

impl Outcome {
    fn is_success(&self) -> bool {
        matches!(
            self,
            Outcome::Connected | Outcome::Status { accepted: true, .. }
        )
    }

    fn label(&self) -> &'static str {
        match self {
            Outcome::Connected | Outcome::Status { accepted: true, .. } => "success",
            Outcome::Status {
                accepted: false, ..
            } => "bad_status",
            Outcome::Timeout(_) => "timeout",
            Outcome::Refused => "refused",
            Outcome::Error(_) => "error",
        }
    }

    fn reason(&self) -> String {
        match self {
            Outcome::Connected => "connected".to_owned(),
            Outcome::Status { code, .. } => format!("HTTP status {code}"),
            Outcome::Timeout(after) => format!(
                "timeout after {}",
                humantime_serde::re::humantime::format_duration(*after)
            ),
            Outcome::Refused => "connection refused".to_owned(),
            Outcome::Error(err) => err.clone(),
        }
    }
}

/// Runs one check, bounded by its timeout.
async fn probe(check: &HealthConfig, backend: SocketAddr) -> Outcome {
    let attempt = async {
        match check.kind {
            HealthKind::Tcp => connect(backend)
                .await
                .map_or_else(|o| o, |_| Outcome::Connected),
            HealthKind::Http => match connect(backend).await {
                Ok(stream) => match http_status(stream, &check.path, backend).await {
                    Ok(code) => Outcome::Status {
                        code,
                        accepted: check.accepts_status(code),
                    },
                    Err(err) => Outcome::Error(format!("HTTP request failed: {err}")),
                },
                Err(outcome) => outcome,
            },
            // Never started for `none`; count it as a success should it happen.
            HealthKind::None => Outcome::Connected,
        }
    };
    tokio::time::timeout(check.timeout, attempt)
        .await
        .unwrap_or(Outcome::Timeout(check.timeout))
}

async fn connect(backend: SocketAddr) -> Result<TcpStream, Outcome> {
    TcpStream::connect(backend).await.map_err(|err| {
        if err.kind() == io::ErrorKind::ConnectionRefused {
            Outcome::Refused
        } else {
            Outcome::Error(format!("connect failed: {err}"))
        }
    })
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// `GET path` over `stream` (HTTP/1.1, `Connection: close`); the status of the response. The
/// body is not read.
async fn http_status(stream: TcpStream, path: &str, backend: SocketAddr) -> Result<u16, BoxError> {
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, String>(TokioIo::new(stream)).await?;
    // The connection future does the I/O; it is aborted when the check ends or is cancelled.
    let _connection = AbortOnDrop(tokio::spawn(connection));
    let request = Request::get(path)
        .header(HOST, backend.to_string())
        .header(CONNECTION, "close")
        .header(
            USER_AGENT,
            concat!("mesh-health/", env!("CARGO_PKG_VERSION")),
        )
        .body(String::new())?;
    let response = sender.send_request(request).await?;
    Ok(response.status().as_u16())
}

struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A small per-task PRNG (splitmix64) for jitter; seeded from std's random hasher keys.
struct Rng(u64);

impl Rng {
    fn seeded() -> Self {
        Self(RandomState::new().hash_one(Instant::now()))
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..max` (0 for a zero `max`).
    fn below(&mut self, max: Duration) -> Duration {
        let nanos = nanos(max);
        if nanos == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(self.next() % nanos)
    }

    /// `interval` ± up to 10%.
    fn jittered(&mut self, interval: Duration) -> Duration {
        let nanos = nanos(interval);
        let spread = nanos / 10;
        let offset = self.next() % (2 * spread + 1);
        Duration::from_nanos(nanos - spread + offset)
    }
}

/// Saturates at ~584 years, far above any valid interval.
fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX / 4)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};

    use mesh_common::PROTO_TCP;
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::{TcpListener, TcpSocket},
        sync::mpsc::{UnboundedReceiver, unbounded_channel},
        time::{sleep, timeout},
    };

    use super::*;

    /// Upper bound of every wait; a broken test fails after it instead of hanging.
    const WAIT: Duration = Duration::from_secs(10);

    fn vip(port: u16) -> Vip {
        Vip {
            addr: SocketAddr::from(([127, 100, 0, 1], port)),
            proto: PROTO_TCP,
            external: false,
        }
    }

    fn tcp(interval_ms: u64, rise: u32, fall: u32) -> HealthConfig {
        HealthConfig {
            kind: HealthKind::Tcp,
            interval: Duration::from_millis(interval_ms),
            timeout: Duration::from_millis(200),
            rise,
            fall,
            ..HealthConfig::default()
        }
    }

    fn http(interval_ms: u64, rise: u32, fall: u32) -> HealthConfig {
        HealthConfig {
            kind: HealthKind::Http,
            ..tcp(interval_ms, rise, fall)
        }
    }

    fn target(vip: Vip, backend: SocketAddr, check: HealthConfig) -> Target {
        Target {
            vip,
            backend,
            check,
        }
    }

    fn monitor(max_concurrent: usize) -> (HealthMonitor, UnboundedReceiver<Transition>) {
        let (tx, rx) = unbounded_channel();
        (HealthMonitor::new(max_concurrent, tx), rx)
    }

    type Outcomes = Arc<Mutex<Vec<&'static str>>>;

    /// Records the outcome of every check of `monitor`.
    fn record_outcomes(monitor: &mut HealthMonitor) -> Outcomes {
        let outcomes = Outcomes::default();
        let sink = outcomes.clone();
        monitor.on_check(Arc::new(move |outcome, _| {
            sink.lock().unwrap().push(outcome);
        }));
        outcomes
    }

    /// How many checks at the end of `outcomes` succeeded in a row.
    fn trailing_successes(outcomes: &Outcomes) -> usize {
        let outcomes = outcomes.lock().unwrap();
        outcomes
            .iter()
            .rev()
            .take_while(|&&o| o == "success")
            .count()
    }

    async fn next_transition(events: &mut UnboundedReceiver<Transition>) -> Transition {
        timeout(WAIT, events.recv())
            .await
            .expect("no health transition within the wait bound")
            .expect("events channel closed")
    }

    async fn no_transition(events: &mut UnboundedReceiver<Transition>, within: Duration) {
        if let Ok(event) = timeout(within, events.recv()).await {
            panic!("unexpected transition {event:?}");
        }
    }

    /// Polls until `cond` holds, failing after `WAIT`.
    async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + WAIT;
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            sleep(Duration::from_millis(5)).await;
        }
    }

    fn listen(addr: SocketAddr) -> TcpListener {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket.bind(addr).unwrap();
        socket.listen(1024).unwrap()
    }

    /// A real TCP server on 127.0.0.1 that accepts and closes, counting connections.
    struct TcpServer {
        addr: SocketAddr,
        accepted: Arc<AtomicUsize>,
        task: JoinHandle<()>,
    }

    impl TcpServer {
        fn start(addr: SocketAddr) -> Self {
            let listener = listen(addr);
            let addr = listener.local_addr().unwrap();
            let accepted = Arc::new(AtomicUsize::new(0));
            let count = accepted.clone();
            let task = tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    count.fetch_add(1, Ordering::SeqCst);
                    drop(stream);
                }
            });
            Self {
                addr,
                accepted,
                task,
            }
        }

        fn accepted(&self) -> usize {
            self.accepted.load(Ordering::SeqCst)
        }

        /// Closes the listening socket (connects are refused once this returns).
        async fn stop(mut self) {
            self.task.abort();
            let _ = timeout(WAIT, &mut self.task).await;
        }
    }

    impl Drop for TcpServer {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    /// A real HTTP/1.1 server on 127.0.0.1: reads the request head, waits `hold`, answers with
    /// `status` (0 = never answer) and closes. Counts connections open at once.
    struct HttpServer {
        addr: SocketAddr,
        status: Arc<AtomicU16>,
        heads: Arc<Mutex<Vec<String>>>,
        max_open: Arc<AtomicUsize>,
        accepted: Arc<AtomicUsize>,
        task: JoinHandle<()>,
    }

    impl HttpServer {
        fn start(status: u16, hold: Duration) -> Self {
            let listener = listen(SocketAddr::from(([127, 0, 0, 1], 0)));
            let addr = listener.local_addr().unwrap();
            let status = Arc::new(AtomicU16::new(status));
            let heads: Arc<Mutex<Vec<String>>> = Arc::default();
            let max_open: Arc<AtomicUsize> = Arc::default();
            let accepted: Arc<AtomicUsize> = Arc::default();
            let task = tokio::spawn({
                let (status, heads, max_open, accepted) = (
                    status.clone(),
                    heads.clone(),
                    max_open.clone(),
                    accepted.clone(),
                );
                let open = Arc::new(AtomicUsize::new(0));
                async move {
                    while let Ok((mut stream, _)) = listener.accept().await {
                        accepted.fetch_add(1, Ordering::SeqCst);
                        let now_open = open.fetch_add(1, Ordering::SeqCst) + 1;
                        max_open.fetch_max(now_open, Ordering::SeqCst);
                        let (status, heads, open) = (status.clone(), heads.clone(), open.clone());
                        tokio::spawn(async move {
                            let head = read_head(&mut stream).await;
                            heads.lock().unwrap().push(head);
                            sleep(hold).await;
                            let code = status.load(Ordering::SeqCst);
                            // Before answering: the client's check (and permit) outlasts this.
                            open.fetch_sub(1, Ordering::SeqCst);
                            if code == 0 {
                                // Never answer; the client's timeout ends the check.
                                sleep(WAIT).await;
                                return;
                            }
                            let response = format!(
                                "HTTP/1.1 {code} Test\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                            );
                            let _ = stream.write_all(response.as_bytes()).await;
                            let _ = stream.shutdown().await;
                        });
                    }
                }
            });
            Self {
                addr,
                status,
                heads,
                max_open,
                accepted,
                task,
            }
        }

        fn set_status(&self, code: u16) {
            self.status.store(code, Ordering::SeqCst);
        }
    }

    impl Drop for HttpServer {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    /// Reads up to the end of the request head (bounded in size).
    async fn read_head(stream: &mut TcpStream) -> String {
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8_lossy(&head).into_owned()
    }

    #[test]
    fn health_rules_follow_rise_and_fall() {
        let (rise, fall) = (3, 2);
        // Unknown: one success is enough.
        let mut s = ProbeState::new(Health::Unknown);
        assert_eq!(
            s.record(true, rise, fall),
            Some((Health::Unknown, Health::Healthy))
        );
        // Unknown: `fall` failures make it unhealthy.
        let mut s = ProbeState::new(Health::Unknown);
        assert_eq!(s.record(false, rise, fall), None);
        assert_eq!(
            s.record(false, rise, fall),
            Some((Health::Unknown, Health::Unhealthy))
        );
        // Healthy: a success resets the failures, so only consecutive ones count.
        let mut s = ProbeState::new(Health::Healthy);
        assert_eq!(s.record(false, rise, fall), None);
        assert_eq!(s.record(true, rise, fall), None);
        assert_eq!(s.record(false, rise, fall), None);
        assert_eq!(
            s.record(false, rise, fall),
            Some((Health::Healthy, Health::Unhealthy))
        );
        assert_eq!(s.failures, 2);
        // Unhealthy: `rise` consecutive successes.
        assert_eq!(s.record(true, rise, fall), None);
        assert_eq!(s.record(true, rise, fall), None);
        assert_eq!(s.record(false, rise, fall), None);
        assert_eq!(s.record(true, rise, fall), None);
        assert_eq!(s.record(true, rise, fall), None);
        assert_eq!(
            s.record(true, rise, fall),
            Some((Health::Unhealthy, Health::Healthy))
        );
        assert_eq!((s.successes, s.failures), (3, 0));
    }

    #[test]
    fn health_jitter_stays_within_ten_percent() {
        let mut rng = Rng::seeded();
        let interval = Duration::from_millis(100);
        for _ in 0..1000 {
            let d = rng.jittered(interval);
            assert!(
                (Duration::from_millis(90)..=Duration::from_millis(110)).contains(&d),
                "{d:?}"
            );
            assert!(rng.below(interval) < interval);
        }
        assert_eq!(rng.below(Duration::ZERO), Duration::ZERO);
    }

    #[tokio::test]
    async fn health_tcp_check_follows_the_listener() {
        let (interval_ms, rise, fall) = (40, 2, 3);
        let check = tcp(interval_ms, rise, fall);
        let server = TcpServer::start(SocketAddr::from(([127, 0, 0, 1], 0)));
        let backend = server.addr;
        let (mut mon, mut events) = monitor(4);
        let outcomes = record_outcomes(&mut mon);
        mon.set_targets(vec![target(vip(80), backend, check.clone())], |_: &Key| {
            false
        });

        let up = next_transition(&mut events).await;
        assert_eq!((up.from, up.to), (Health::Unknown, Health::Healthy));
        assert_eq!(up.reason, "connected");
        assert_eq!(mon.health(&vip(80), &backend), Health::Healthy);

        server.stop().await;
        let stopped = Instant::now();
        let down = next_transition(&mut events).await;
        assert_eq!((down.from, down.to), (Health::Healthy, Health::Unhealthy));
        assert_eq!(down.reason, "connection refused");
        let bound = check.interval * fall * 11 / 10 + check.timeout + Duration::from_secs(1);
        assert!(
            stopped.elapsed() <= bound,
            "took {:?}, bound {bound:?}",
            stopped.elapsed()
        );
        // `fall` failures, or one more if a check ended since.
        let failures = mon.snapshot()[0].3;
        assert!((fall..=fall + 1).contains(&failures), "{failures}");

        let _server = TcpServer::start(backend);
        let back = next_transition(&mut events).await;
        assert_eq!((back.from, back.to), (Health::Unhealthy, Health::Healthy));
        assert_eq!(back.reason, "connected");
        // Exactly `rise` is proven by `health_rules_follow_rise_and_fall`; here a later check
        // may already have ended.
        assert!(trailing_successes(&outcomes) >= rise as usize);
        assert_eq!(mon.snapshot(), [(vip(80), backend, Health::Healthy, 0)]);
    }

    #[tokio::test]
    async fn health_services_sharing_a_backend_and_settings_share_one_probe() {
        let server = TcpServer::start(SocketAddr::from(([127, 0, 0, 1], 0)));
        let backend = server.addr;
        let check = tcp(50, 2, 2);
        let (mut mon, mut events) = monitor(64);
        let services: Vec<Vip> = (0..50).map(|i| vip(1000 + i)).collect();
        let targets = services
            .iter()
            .map(|&v| target(v, backend, check.clone()))
            .collect();
        mon.set_targets(targets, |_: &Key| false);
        assert_eq!(mon.probe_count(), 1);

        // One success turns all 50 targets healthy, each told once.
        let mut told = BTreeSet::new();
        while told.len() < services.len() {
            let t = next_transition(&mut events).await;
            assert_eq!(
                (t.from, t.to, t.backend),
                (Health::Unknown, Health::Healthy, backend)
            );
            assert!(told.insert(t.vip), "{} told twice", t.vip);
        }
        assert!(
            services
                .iter()
                .all(|v| mon.health(v, &backend) == Health::Healthy)
        );

        // Checked once per interval, not 50 times: ~10 checks in 500 ms (jitter 10%).
        let before = server.accepted();
        sleep(Duration::from_millis(500)).await;
        let checks = server.accepted() - before;
        assert!((5..=15).contains(&checks), "{checks} checks in 500 ms");

        // Other settings for the same backend are another probe.
        mon.set_targets_of(
            &BTreeSet::from([vip(2000)]),
            vec![target(vip(2000), backend, tcp(60, 2, 2))],
            |_: &Key| false,
        );
        assert_eq!(mon.probe_count(), 2);
    }

    #[tokio::test]
    async fn health_a_shared_probe_stops_with_its_last_service() {
        let server = TcpServer::start(SocketAddr::from(([127, 0, 0, 1], 0)));
        let backend = server.addr;
        let check = tcp(20, 2, 2);
        let (mut mon, _events) = monitor(4);
        mon.set_targets(
            vec![
                target(vip(80), backend, check.clone()),
                target(vip(81), backend, check.clone()),
            ],
            |_: &Key| true,
        );
        // Both start healthy: one of them already carried traffic.
        assert_eq!(mon.health(&vip(81), &backend), Health::Healthy);
        mon.set_targets(vec![target(vip(81), backend, check.clone())], |_: &Key| {
            false
        });
        assert_eq!(mon.health(&vip(80), &backend), Health::Unknown);
        assert_eq!(mon.health(&vip(81), &backend), Health::Healthy);
        let before = server.accepted();
        eventually("checks continue for the remaining service", || {
            server.accepted() >= before + 3
        })
        .await;

        mon.set_targets(vec![], |_: &Key| false);
        assert_eq!(mon.probe_count(), 0);
        // A check in flight may still land; after that, none.
        sleep(Duration::from_millis(100)).await;
        let stopped = server.accepted();
        sleep(Duration::from_millis(200)).await;
        assert_eq!(server.accepted(), stopped);
    }

    #[tokio::test]
    async fn health_passive_ejection_reaches_every_service_of_the_probe() {
        let server = TcpServer::start(SocketAddr::from(([127, 0, 0, 1], 0)));
        let backend = server.addr;
        let check = HealthConfig {
            passive_failures: 3,
            ..tcp(10_000, 2, 2)
        };
        let unobserved = HealthConfig {
            passive_failures: 0,
            ..check.clone()
        };
        let (mut mon, mut events) = monitor(4);
        mon.set_targets(
            vec![
                target(vip(80), backend, check.clone()),
                target(vip(81), backend, check.clone()),
                // Same backend without passive detection: not the same settings, not ejected.
                target(vip(82), backend, unobserved),
            ],
            |_: &Key| true,
        );
        mon.force_unhealthy(&vip(80), &backend, "3 failed connects");
        let mut ejected = BTreeSet::new();
        for _ in 0..2 {
            let t = next_transition(&mut events).await;
            assert_eq!((t.from, t.to), (Health::Healthy, Health::Unhealthy));
            assert!(
                t.reason.starts_with("forced by passive detection"),
                "{}",
                t.reason
            );
            ejected.insert(t.vip);
        }
        assert_eq!(ejected, BTreeSet::from([vip(80), vip(81)]));
        assert_eq!(mon.health(&vip(82), &backend), Health::Healthy);
        no_transition(&mut events, Duration::from_millis(100)).await;
    }

    #[tokio::test]
    async fn health_http_check_follows_the_status() {
        let server = HttpServer::start(200, Duration::ZERO);
        let backend = server.addr;
        let mut check = http(30, 2, 2);
        check.path = "/ready".to_owned();
        let (mut mon, mut events) = monitor(4);
        mon.set_targets(vec![target(vip(80), backend, check)], |_: &Key| false);

        let up = next_transition(&mut events).await;
        assert_eq!((up.from, up.to), (Health::Unknown, Health::Healthy));
        assert_eq!(up.reason, "HTTP status 200");

        server.set_status(503);
        let down = next_transition(&mut events).await;
        assert_eq!((down.from, down.to), (Health::Healthy, Health::Unhealthy));
        assert!(down.reason.contains("503"), "{}", down.reason);
        assert_eq!(down.reason, "HTTP status 503");

        server.set_status(204);
        let back = next_transition(&mut events).await;
        assert_eq!((back.from, back.to), (Health::Unhealthy, Health::Healthy));
        assert_eq!(back.reason, "HTTP status 204");

        // The request: GET path, HTTP/1.1, Host = the backend address, Connection: close.
        let head = server.heads.lock().unwrap()[0].to_ascii_lowercase();
        assert!(head.starts_with("get /ready http/1.1\r\n"), "{head}");
        assert!(head.contains(&format!("\r\nhost: {backend}\r\n")), "{head}");
        assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
    }

    #[tokio::test]
    async fn health_http_expect_range_decides_which_statuses_pass() {
        let server = HttpServer::start(302, Duration::ZERO);
        let backend = server.addr;
        let strict = HealthConfig {
            expect: vec![(200, 299)],
            ..http(30, 2, 2)
        };
        let (mut mon, mut events) = monitor(4);
        let outcomes = record_outcomes(&mut mon);
        // Same backend behind two VIPs: the default 200-399 accepts the redirect.
        mon.set_targets(
            vec![
                target(vip(80), backend, strict),
                target(vip(81), backend, http(30, 2, 2)),
            ],
            |_: &Key| false,
        );
        let mut seen = BTreeMap::new();
        while seen.len() < 2 {
            let t = next_transition(&mut events).await;
            assert_eq!(t.reason, "HTTP status 302");
            assert_eq!(t.from, Health::Unknown);
            seen.insert(t.vip, t.to);
        }
        assert_eq!(seen[&vip(80)], Health::Unhealthy);
        assert_eq!(seen[&vip(81)], Health::Healthy);
        assert!(outcomes.lock().unwrap().contains(&"bad_status"));
    }

    #[tokio::test]
    async fn health_http_server_that_never_answers_times_out() {
        let server = HttpServer::start(0, Duration::ZERO);
        let backend = server.addr;
        let check = HealthConfig {
            timeout: Duration::from_millis(50),
            ..http(30, 1, 2)
        };
        let (mut mon, mut events) = monitor(4);
        let outcomes = record_outcomes(&mut mon);
        mon.set_targets(vec![target(vip(80), backend, check)], |_: &Key| false);
        let down = next_transition(&mut events).await;
        assert_eq!((down.from, down.to), (Health::Unknown, Health::Unhealthy));
        assert_eq!(down.reason, "timeout after 50ms");
        assert_eq!(outcomes.lock().unwrap()[..2], ["timeout", "timeout"]);
        assert!(server.accepted.load(Ordering::SeqCst) >= 2);
    }

    #[tokio::test]
    async fn health_new_target_is_healthy_after_one_success() {
        let server = TcpServer::start(SocketAddr::from(([127, 0, 0, 1], 0)));
        let (mut mon, mut events) = monitor(4);
        let outcomes = record_outcomes(&mut mon);
        // A long interval: the first check comes within one interval, the second much later.
        mon.set_targets(
            vec![target(vip(80), server.addr, tcp(300, 5, 3))],
            |_: &Key| false,
        );
        assert_eq!(mon.health(&vip(80), &server.addr), Health::Unknown);
        let up = next_transition(&mut events).await;
        assert_eq!((up.from, up.to), (Health::Unknown, Health::Healthy));
        // One success, not `rise` (the next check is an interval later).
        assert_eq!(outcomes.lock().unwrap()[..], ["success"]);
        assert_eq!(mon.health(&vip(80), &server.addr), Health::Healthy);
    }

    #[tokio::test]
    async fn health_initially_healthy_target_starts_healthy() {
        // Nothing listens: the target goes from Healthy (not Unknown) to Unhealthy.
        let free = TcpServer::start(SocketAddr::from(([127, 0, 0, 1], 0)));
        let backend = free.addr;
        free.stop().await;
        let (mut mon, mut events) = monitor(4);
        let adopted = BTreeSet::from([(vip(80), backend)]);
        mon.set_targets(vec![target(vip(80), backend, tcp(30, 2, 2))], |k: &Key| {
            adopted.contains(k)
        });
        assert_eq!(mon.health(&vip(80), &backend), Health::Healthy);
        let down = next_transition(&mut events).await;
        assert_eq!((down.from, down.to), (Health::Healthy, Health::Unhealthy));
        assert_eq!(down.reason, "connection refused");
    }

    #[tokio::test]
    async fn health_unchecked_targets_are_healthy_and_never_probed() {
        let server = TcpServer::start(SocketAddr::from(([127, 0, 0, 1], 0)));
        let (mut mon, mut events) = monitor(4);
        let none = HealthConfig {
            kind: HealthKind::None,
            ..tcp(20, 2, 2)
        };
        mon.set_targets(vec![target(vip(80), server.addr, none)], |_: &Key| false);
        assert_eq!(mon.health(&vip(80), &server.addr), Health::Healthy);
        mon.force_unhealthy(&vip(80), &server.addr, "ignored");
        no_transition(&mut events, Duration::from_millis(200)).await;
        assert_eq!(mon.health(&vip(80), &server.addr), Health::Healthy);
        assert_eq!(server.accepted(), 0);
    }

    #[tokio::test]
    async fn health_removed_target_is_no_longer_checked() {
        let server = TcpServer::start(SocketAddr::from(([127, 0, 0, 1], 0)));
        let backend = server.addr;
        let (mut mon, mut events) = monitor(4);
        mon.set_targets(vec![target(vip(80), backend, tcp(20, 2, 2))], |_: &Key| {
            false
        });
        next_transition(&mut events).await;

        mon.set_targets(Vec::new(), |_: &Key| false);
        assert_eq!(mon.health(&vip(80), &backend), Health::Unknown);
        assert_eq!(mon.snapshot(), []);
        // Grace period for a check that was already connecting.
        sleep(Duration::from_millis(100)).await;
        let before = server.accepted();
        no_transition(&mut events, Duration::from_millis(300)).await;
        assert_eq!(server.accepted(), before, "checks continued after removal");
    }

    #[tokio::test]
    async fn health_unchanged_targets_keep_state_and_changed_ones_restart() {
        let server = TcpServer::start(SocketAddr::from(([127, 0, 0, 1], 0)));
        let backend = server.addr;
        let (mut mon, mut events) = monitor(4);
        let targets = vec![target(vip(80), backend, tcp(20, 2, 2))];
        mon.set_targets(targets.clone(), |_: &Key| false);
        next_transition(&mut events).await;
        // Re-setting the same targets (even without `initially_healthy`) changes nothing.
        mon.set_targets(targets, |_: &Key| false);
        assert_eq!(mon.health(&vip(80), &backend), Health::Healthy);
        // A changed check config restarts the task but carries the health over.
        mon.set_targets(vec![target(vip(80), backend, tcp(25, 2, 2))], |_: &Key| {
            false
        });
        assert_eq!(mon.health(&vip(80), &backend), Health::Healthy);
        no_transition(&mut events, Duration::from_millis(200)).await;
    }

    #[tokio::test]
    async fn health_dropping_the_monitor_stops_every_check() {
        let server = TcpServer::start(SocketAddr::from(([127, 0, 0, 1], 0)));
        let (mut mon, mut events) = monitor(4);
        let targets = (0..5)
            .map(|i| target(vip(80 + i), server.addr, tcp(20, 2, 2)))
            .collect();
        mon.set_targets(targets, |_: &Key| false);
        eventually("five checks", || server.accepted() >= 5).await;
        drop(mon);
        sleep(Duration::from_millis(100)).await;
        let before = server.accepted();
        sleep(Duration::from_millis(200)).await;
        assert_eq!(server.accepted(), before, "checks continued after drop");
        // Transitions sent before the drop may still be queued; then the channel closes.
        let closed = timeout(WAIT, async { while events.recv().await.is_some() {} }).await;
        assert!(closed.is_ok(), "events channel stayed open");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn health_checks_in_flight_never_exceed_the_cap() {
        let server = HttpServer::start(200, Duration::from_millis(50));
        let check = HealthConfig {
            timeout: Duration::from_secs(5),
            ..http(20, 2, 2)
        };
        let (mut mon, _events) = monitor(5);
        let outcomes = record_outcomes(&mut mon);
        // Distinct settings (paths): 50 probes of one server. The same settings would share
        // one probe, which never overlaps with itself.
        let targets = (0..50)
            .map(|i| {
                let check = HealthConfig {
                    path: format!("/{i}"),
                    ..check.clone()
                };
                target(vip(1000 + i), server.addr, check)
            })
            .collect();
        mon.set_targets(targets, |_: &Key| false);
        assert_eq!(mon.probe_count(), 50);
        eventually("100 checks", || {
            server.accepted.load(Ordering::SeqCst) >= 100
        })
        .await;
        // Read before dropping the monitor: its tasks are aborted one by one, and a task that is
        // not aborted yet can take a permit an aborted one gave back while the server still
        // holds the aborted check's connection.
        let max_open = server.max_open.load(Ordering::SeqCst);
        drop(mon);
        let failed = outcomes
            .lock()
            .unwrap()
            .iter()
            .filter(|&&o| o != "success")
            .count();
        assert_eq!(failed, 0, "checks failed");
        assert!(max_open <= 5, "{max_open} checks in flight at once");
        // The checks did overlap: the cap, not the test, limited them.
        assert!(max_open >= 2, "{max_open} checks in flight at once");
    }

    #[tokio::test]
    async fn health_forced_unhealthy_flips_at_once_and_recovers_after_rise() {
        let server = TcpServer::start(SocketAddr::from(([127, 0, 0, 1], 0)));
        let backend = server.addr;
        let rise = 3;
        let (mut mon, mut events) = monitor(4);
        let outcomes = record_outcomes(&mut mon);
        mon.set_targets(
            vec![target(vip(80), backend, tcp(20, rise, 2))],
            |_: &Key| false,
        );
        next_transition(&mut events).await;

        let checks_before = outcomes.lock().unwrap().len();
        mon.force_unhealthy(&vip(80), &backend, "3 connect failures");
        assert_eq!(mon.health(&vip(80), &backend), Health::Unhealthy);
        let forced = events.try_recv().expect("transition sent at once");
        assert_eq!(
            (forced.from, forced.to),
            (Health::Healthy, Health::Unhealthy)
        );
        assert_eq!(
            forced.reason,
            "forced by passive detection: 3 connect failures"
        );
        // Forcing an unhealthy backend again, or a backend that is not a target: no event.
        mon.force_unhealthy(&vip(80), &backend, "again");
        mon.force_unhealthy(&vip(99), &backend, "unknown");
        assert_eq!(mon.health(&vip(99), &backend), Health::Unknown);

        let back = next_transition(&mut events).await;
        assert_eq!((back.from, back.to), (Health::Unhealthy, Health::Healthy));
        // At least `rise` successes since the forcing (one in flight then may not count).
        let successes = outcomes.lock().unwrap().len() - checks_before;
        assert!(successes >= rise as usize, "{successes} checks");
        assert!(
            trailing_successes(&outcomes) >= rise as usize,
            "{:?}",
            outcomes.lock().unwrap()
        );
    }

    #[tokio::test]
    async fn health_snapshot_counts_consecutive_failures() {
        let free = TcpServer::start(SocketAddr::from(([127, 0, 0, 1], 0)));
        let backend = free.addr;
        free.stop().await;
        let (mut mon, mut events) = monitor(4);
        mon.set_targets(vec![target(vip(80), backend, tcp(20, 2, 4))], |_: &Key| {
            false
        });
        next_transition(&mut events).await;
        let (_, _, health, failures) = mon.snapshot()[0];
        assert_eq!(health, Health::Unhealthy);
        assert!(failures >= 4, "{failures}");
    }
}
