//! The control loop: the one owner of the registry, the health targets and the maps, on its own
//! OS thread (map syscalls, ENOMEM retry sleeps, netlink and file reads never block the async
//! runtime).
//!
//! It is fed commands (source updates, file reloads, health transitions) and coalesces them:
//! everything queued is taken in before one reconcile, so a burst of edits costs one map diff.
//! Every source update gets the real outcome back: rejected (invalid, nothing changed), applied
//! (with the desired-state generation the maps now hold) or failed (the maps do not hold it; the
//! loop retries with a backoff). A periodic resync reads every map back and repairs what
//! differs; its read runs on a thread of its own, so edits are not held up by it. Each turn
//! of the loop beats the heartbeat `/healthz` reports.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc,
        mpsc::{Receiver, RecvTimeoutError, Sender},
    },
    time::{Duration, Instant},
};

use tokio::sync::{oneshot, watch};
use tracing::{debug, error, info, warn};

use crate::{
    config::{Config, ConfigError, HealthKind, ServiceConfig},
    desired::{DesiredState, desired_with_health},
    health::{Health, HealthMonitor, Target, Transition},
    model::Vip,
    observe::{heartbeat::Heartbeat, metrics::AgentMetrics},
    reconcile::{Executor, plan::Scope},
    registry::{
        Changed, Listing, Outcome, Registry, Source, SourceObserver as _, SourceUpdate, listing,
    },
};

/// How often the kernel's connect-failure counters are read for passive detection.
const PASSIVE_POLL: Duration = Duration::from_millis(10);
/// How often the per-backend health gauges are refreshed.
const HEALTH_GAUGES: Duration = Duration::from_secs(1);
/// Editors write files in several steps; a reload waits this long after the last change.
const FILE_SETTLE: Duration = Duration::from_millis(15);
/// Retries of a failed apply start at this pause and double up to the maximum.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

pub enum Command {
    Source(SourceUpdate),
    /// The config file changed (`settle`: wait for the writer to finish) or SIGHUP asked.
    ReloadFile {
        settle: bool,
    },
    Health(Transition),
    Stop,
}

/// What the control loop is built from.
pub struct ControlLoop {
    pub registry: Registry,
    pub executor: Executor,
    pub health: HealthMonitor,
    pub metrics: Arc<AgentMetrics>,
    pub heartbeat: Arc<Heartbeat>,
    /// The merged registry by source, for the admin API: published after each change.
    pub published: watch::Sender<Listing>,
    /// Reads and validates the config file again (with the command-line overrides).
    pub reload: Box<dyn FnMut() -> Result<Config, ConfigError> + Send>,
    /// Where the file is, for messages.
    pub file_origin: String,
    pub resync_every: Duration,
    /// Updates queued before the loop started (saved API and Redis services): applied together
    /// with the file's in the first reconcile.
    pub initial: Vec<SourceUpdate>,
    /// Sources whose first update must be taken in before the agent is ready (a fresh node
    /// must not report ready before the cluster's Services are in the maps).
    pub ready_after: BTreeSet<Source>,
    /// Runs once, when the maps first hold the desired state (before `/readyz` turns 200):
    /// removes the data path of an older pin layout, which translated the VIPs until now.
    pub on_first_apply: Option<Box<dyn FnOnce() + Send>>,
}

struct State {
    parts: ControlLoop,
    /// What the maps should hold, kept per service as the registry and health change.
    desired: DesiredState,
    /// Services whose desired state changed since the last successful apply: all the next
    /// plan has to look at.
    touched: BTreeSet<Vip>,
    names: BTreeMap<Vip, String>,
    passive_thresholds: BTreeMap<Vip, u32>,
    /// Bumped on every accepted registry change and health transition.
    desired_generation: u64,
    applied_generation: u64,
    /// Something changed since the last successful apply.
    dirty: bool,
    /// Replies owed once the maps hold the current desired state.
    pending: Vec<oneshot::Sender<Outcome>>,
    retry: Option<(Instant, Duration)>,
    reload_at: Option<Instant>,
    /// A health transition arrived: refresh the health gauges this turn.
    gauges_stale: bool,
    /// The registry changed since `published` was last sent.
    listing_stale: bool,
}

impl ControlLoop {
    /// Runs until `Stop` or until every sender is gone. Call on a dedicated thread inside the
    /// runtime's context (health checks are tokio tasks).
    pub fn run(self, commands: Receiver<Command>) {
        let mut state = State::new(self);
        state.start();
        state.publish_maps_view();
        let now = Instant::now();
        let mut next_passive = now + PASSIVE_POLL;
        let mut next_gauges = now + HEALTH_GAUGES;
        let mut next_resync = now + state.parts.resync_every;
        loop {
            state.parts.heartbeat.beat();
            let mut wake = next_passive.min(next_gauges).min(next_resync);
            if let Some((at, _)) = state.retry {
                wake = wake.min(at);
            }
            if let Some(at) = state.reload_at {
                wake = wake.min(at);
            }
            let mut stop = false;
            match commands.recv_timeout(wake.saturating_duration_since(Instant::now())) {
                Ok(Command::Stop) | Err(RecvTimeoutError::Disconnected) => stop = true,
                Ok(command) => state.handle(command),
                Err(RecvTimeoutError::Timeout) => {}
            }
            // Coalesce: everything already queued goes into the same reconcile.
            while !stop && let Ok(command) = commands.try_recv() {
                match command {
                    Command::Stop => stop = true,
                    command => state.handle(command),
                }
            }
            let now = Instant::now();
            if state.reload_at.is_some_and(|at| at <= now) {
                state.reload_at = None;
                state.reload_file();
            }
            let retry_due = state.retry.is_some_and(|(at, _)| at <= now);
            if state.dirty || retry_due {
                state.reconcile();
            }
            if now >= next_passive {
                state.passive_tick();
                next_passive = now + PASSIVE_POLL;
            }
            if now >= next_gauges || state.gauges_stale {
                state.refresh_health_gauges();
                state.gauges_stale = false;
                next_gauges = now + HEALTH_GAUGES;
            }
            // The resync's read runs on a thread of its own: a turn only starts it or takes
            // in its result (the loop wakes every PASSIVE_POLL at least to look).
            let resync_due = now >= next_resync;
            if resync_due {
                next_resync = now + state.parts.resync_every;
            }
            state.resync_turn(resync_due);
            // Applies and resyncs change the model: every turn, as it is cheap.
            state.publish_maps_view();
            if stop {
                break;
            }
        }
        for reply in state.pending.drain(..) {
            let _ = reply.send(Outcome::AgentGone);
        }
    }
}

impl State {
    fn new(parts: ControlLoop) -> Self {
        let mut state = Self {
            parts,
            desired: DesiredState::default(),
            touched: BTreeSet::new(),
            names: BTreeMap::new(),
            passive_thresholds: BTreeMap::new(),
            desired_generation: 0,
            applied_generation: 0,
            dirty: true,
            pending: Vec::new(),
            retry: None,
            reload_at: None,
            gauges_stale: true,
            listing_stale: true,
        };
        let everything = state.parts.registry.services().map(|s| s.vip()).collect();
        state.registry_changed(everything);
        state
    }

    /// The first apply: the file's services and what sources saved, after the first health
    /// results, then ready.
    fn start(&mut self) {
        for update in std::mem::take(&mut self.parts.initial) {
            self.source_update(update);
        }
        self.await_first_checks();
        // The first checks answered while the loop waited: their services again.
        let checked: BTreeSet<Vip> = self
            .parts
            .registry
            .services()
            .filter(|svc| {
                svc.health
                    .as_ref()
                    .is_some_and(|h| h.kind != HealthKind::None)
            })
            .map(ServiceConfig::vip)
            .collect();
        self.refresh_desired(&checked);
        self.reconcile();
        if !self.parts.ready_after.is_empty() {
            let waiting: Vec<&str> = self.parts.ready_after.iter().map(|s| s.name()).collect();
            info!(
                ?waiting,
                "the maps hold the file's services; ready once these sources sent their first set"
            );
        }
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Source(update) => self.source_update(update),
            Command::ReloadFile { settle: true } => {
                self.reload_at = Some(Instant::now() + FILE_SETTLE);
            }
            // Now, but once for everything queued (a rename can be reported twice).
            Command::ReloadFile { settle: false } => self.reload_at = Some(Instant::now()),
            Command::Health(transition) => {
                self.parts.metrics.health_transition(&transition);
                self.gauges_stale = true;
                self.refresh_desired(&BTreeSet::from([transition.vip]));
                self.desired_changed();
            }
            Command::Stop => {}
        }
    }

    fn desired_changed(&mut self) {
        self.desired_generation += 1;
        self.dirty = true;
    }

    /// Recomputes the desired state of the services at `vips` (health included).
    fn refresh_desired(&mut self, vips: &BTreeSet<Vip>) {
        for vip in vips {
            self.touched.insert(*vip);
            let Some(svc) = self.parts.registry.service(vip) else {
                self.desired.services.remove(vip);
                self.names.remove(vip);
                self.passive_thresholds.remove(vip);
                continue;
            };
            let health = &self.parts.health;
            let want = desired_with_health(svc, |vip, addr| health.health(vip, addr));
            self.desired.services.insert(*vip, want);
            self.names.insert(*vip, svc.name.clone());
            match svc.health.as_ref() {
                Some(check) if check.kind != HealthKind::None && check.passive_failures > 0 => {
                    self.passive_thresholds.insert(*vip, check.passive_failures)
                }
                _ => self.passive_thresholds.remove(vip),
            };
        }
    }

    /// Brings the views of the registry up to date after the services at `changed` did.
    fn registry_changed(&mut self, changed: Changed) {
        self.listing_stale = true;
        self.update_health_targets(&changed);
        self.refresh_desired(&changed);
        self.desired_changed();
    }

    fn reconcile(&mut self) {
        let generation = self.desired_generation;
        self.dirty = false;
        let scope = Scope::Only(&self.touched);
        let applied = self.parts.executor.apply(&self.desired, scope);
        // After the writes, not before: it copies every service (milliseconds at 10k), and
        // the data path should not wait for it. Before any reply, so that whoever is told
        // "applied" then lists what is in force.
        self.publish_listing();
        match applied {
            Ok(report) => {
                self.touched.clear();
                self.parts.metrics.observe_reconcile(report.took, true);
                self.parts
                    .metrics
                    .udp_flows_terminated(report.udp_terminated);
                let services = self.desired.services.len();
                if report.writes > 0 {
                    info!(
                        writes = report.writes,
                        services,
                        generation,
                        took_ms = report.took.as_secs_f64() * 1e3,
                        plan_ms = report.planned.as_secs_f64() * 1e3,
                        write_ms = report.written.as_secs_f64() * 1e3,
                        "applied"
                    );
                }
                self.applied_generation = generation;
                self.retry = None;
                for reply in self.pending.drain(..) {
                    let _ = reply.send(Outcome::Applied { generation });
                }
                if !self.parts.heartbeat.is_ready() && self.parts.ready_after.is_empty() {
                    if let Some(first_apply_done) = self.parts.on_first_apply.take() {
                        first_apply_done();
                    }
                    self.parts.heartbeat.set_ready();
                    self.parts.metrics.set_ready(true);
                    // Start-up parsed, translated and planned everything once.
                    crate::datapath::system::return_free_memory();
                    info!(services, "first state applied: ready");
                }
            }
            Err(err) => {
                self.parts.metrics.observe_reconcile(Duration::ZERO, false);
                let pause = next_retry(self.retry.map(|(_, pause)| pause));
                error!(
                    generation,
                    retry_in_ms = pause.as_millis() as u64,
                    "writing the maps failed; the data path keeps its last consistent state: {err:#}"
                );
                self.retry = Some((Instant::now() + pause, pause));
                let reason = format!("{err:#}");
                for reply in self.pending.drain(..) {
                    let _ = reply.send(Outcome::Failed(reason.clone()));
                }
            }
        }
        self.parts
            .metrics
            .generations(self.desired_generation, self.applied_generation);
    }

    /// Hands the metrics the model of what the maps now hold (a change made it stale).
    fn publish_maps_view(&self) {
        self.parts.metrics.maps_written(self.parts.executor.view());
    }

    fn resync_turn(&mut self, due: bool) {
        match self.parts.executor.resync_turn(due) {
            None => {}
            Some(Ok(repairs)) => {
                if !repairs.is_empty() {
                    warn!(
                        ?repairs,
                        "resync: the maps differed from the desired state and were repaired"
                    );
                }
                self.parts.metrics.resync(Some(&repairs));
            }
            Some(Err(err)) => {
                self.parts.metrics.resync(None);
                error!("resync failed: {err:#}");
            }
        }
    }

    fn source_update(&mut self, update: SourceUpdate) {
        let source = update.source;
        self.parts.ready_after.remove(&source);
        match self.parts.registry.replace(source, update.services) {
            Ok(changed) => {
                self.registry_changed(changed);
                if let Some(reply) = update.reply {
                    self.pending.push(reply);
                }
            }
            Err(err) => {
                let reasons = err.to_string();
                self.rejected(source.name(), &reasons);
                if let Some(reply) = update.reply {
                    let _ = reply.send(Outcome::Rejected(reasons));
                }
            }
        }
    }

    fn reload_file(&mut self) {
        let started = Instant::now();
        let config = match (self.parts.reload)() {
            Ok(config) => config,
            Err(err) => return self.rejected("config edit", &err.to_string()),
        };
        let running = self.parts.registry.file_config().agent.clone();
        if config.agent != running {
            warn!("changes to [agent] take effect when the agent restarts");
        }
        let mut config = config;
        config.agent = running;
        let origin = self.parts.file_origin.clone();
        let parsed = started.elapsed();
        match self.parts.registry.replace_file(config, &origin) {
            Ok(changed) => self.registry_changed(changed),
            Err(err) => self.rejected("config edit", &err.to_string()),
        }
        debug!(
            parse_ms = parsed.as_secs_f64() * 1e3,
            registry_ms = (started.elapsed() - parsed).as_secs_f64() * 1e3,
            "config file reloaded"
        );
    }

    /// Sends the admin API and the sources the registry as it now is, if it changed.
    fn publish_listing(&mut self) {
        if std::mem::take(&mut self.listing_stale) {
            self.parts
                .published
                .send_replace(listing(&self.parts.registry));
        }
    }

    fn rejected(&self, what: &str, reasons: &str) {
        self.parts.metrics.config_rejected();
        // One line, so line-based log readers keep the reason with the level.
        let reasons = reasons.replace('\n', "; ");
        error!("{what} rejected, the running services stay in force: {reasons}");
    }

    /// Points the health checks of the services at `vips` at their backends.
    fn update_health_targets(&mut self, vips: &BTreeSet<Vip>) {
        let registry = &self.parts.registry;
        let targets = health_targets(vips.iter().filter_map(|vip| registry.service(vip)));
        let executor = &self.parts.executor;
        self.parts
            .health
            .set_targets_of(vips, targets, |(vip, addr)| executor.is_active(vip, addr));
    }

    /// At a fresh start nothing is known about checked backends, and unknown backends get no
    /// traffic. Give their first checks (spread over 100 ms) time to answer before the first
    /// write, so a new service does not start out refusing connects. Bounded by the slowest
    /// check's timeout.
    fn await_first_checks(&self) {
        let longest = self
            .parts
            .registry
            .services()
            .filter_map(|svc| svc.health.as_ref())
            .filter(|check| check.kind != HealthKind::None)
            .map(|check| check.timeout)
            .max();
        let Some(longest) = longest else { return };
        let deadline = Instant::now() + Duration::from_millis(150) + longest;
        while Instant::now() < deadline
            && self
                .parts
                .health
                .snapshot()
                .iter()
                .any(|(_, _, health, _)| *health == Health::Unknown)
        {
            self.parts.heartbeat.beat();
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn passive_tick(&mut self) {
        let failing = self
            .parts
            .executor
            .passive_failures(&self.passive_thresholds);
        for (vip, addr, count) in &failing {
            self.parts.health.force_unhealthy(
                vip,
                addr,
                &format!("{count} consecutive failed connects seen by the kernel"),
            );
        }
        if !failing.is_empty() {
            let vips = failing.iter().map(|(vip, _, _)| *vip).collect();
            self.refresh_desired(&vips);
            self.desired_changed();
            self.reconcile();
        }
    }

    fn refresh_health_gauges(&self) {
        self.parts
            .metrics
            .set_health(self.parts.health.snapshot(), &self.names);
    }
}

/// The pause before retrying a failed apply: 100 ms, doubling up to 5 s.
fn next_retry(previous: Option<Duration>) -> Duration {
    previous.map_or(RETRY_MIN, |pause| (pause * 2).min(RETRY_MAX))
}

fn health_targets<'a>(services: impl Iterator<Item = &'a ServiceConfig>) -> Vec<Target> {
    services
        .filter_map(|svc| {
            let check = svc.health.as_ref()?;
            Some(
                svc.backends
                    .iter()
                    .filter(|b| !b.drain)
                    .map(|b| Target {
                        vip: svc.vip(),
                        backend: b.addr,
                        check: check.clone(),
                    })
                    .collect::<Vec<_>>(),
            )
        })
        .flatten()
        .collect()
}

/// A cheap handle for sending commands to the loop from any thread or task.
#[derive(Clone)]
pub struct ControlHandle(pub Sender<Command>);

impl ControlHandle {
    /// False once the loop has stopped.
    pub fn send(&self, command: Command) -> bool {
        self.0.send(command).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_applies_are_retried_after_100ms_doubling_up_to_5s() {
        let mut pause = None;
        let mut seen = Vec::new();
        for _ in 0..8 {
            let next = next_retry(pause);
            seen.push(next.as_millis());
            pause = Some(next);
        }
        assert_eq!(seen, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
    }
}
