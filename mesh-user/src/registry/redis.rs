//! The Redis source (`[agent.redis]`): a hash whose fields are service names and whose values
//! are the services as JSON (the `[[services]]` keys; `name` may be left out).
//!
//! The whole hash is read (HGETALL) when the source connects, on every message on the pub/sub
//! channel `<key>:changed` (any payload) and every `resync` as a safety net, and sent to the
//! agent as the source's complete set. A hash whose entries do not all parse is rejected whole
//! and the previous services stay. While Redis is unreachable the last services stay too: the
//! source reconnects with a capped backoff and sends nothing until it has read the hash again.
//! `mesh_registry_source_up{source="redis"}` is 1 only while the last read was applied.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use anyhow::Context as _;
use futures_util::{FutureExt as _, StreamExt as _};
use redis::AsyncConnectionConfig;
use tokio::{
    sync::{mpsc, watch},
    time::{Instant, timeout},
};
use tracing::{debug, error, info, warn};

use super::{
    Listing, Outcome, Source, SourceObserver, SourceUpdate,
    update::{self, SavedServices, Verdict},
};
use crate::config::{RedisConfig, ServiceConfig};

/// Connecting (and subscribing) gives up after this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A command (HGETALL) gives up after this long; the connection is then replaced.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// The first retry after a failure, doubled after each further failure...
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// ...up to this.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The pub/sub channel that announces changes of the hash `key`.
pub fn channel(key: &str) -> String {
    format!("{key}:changed")
}

/// Queues the services saved by the last run as the source's first update and starts it.
pub async fn start(
    config: &RedisConfig,
    saved: SavedServices,
    updates: mpsc::Sender<SourceUpdate>,
    registry: watch::Receiver<Listing>,
    metrics: Arc<dyn SourceObserver>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let client = redis::Client::open(config.url.as_str()).context("[agent.redis] url")?;
    // The address only: the URL may hold a password.
    let server = client.get_connection_info().addr().to_string();
    let initial = match saved.load() {
        Ok(initial) => initial,
        Err(err) => {
            // Redis is the source of truth; its last services are only a head start.
            warn!("redis: ignoring the last known services: {err:#}");
            None
        }
    };
    let initial = match initial {
        Some(services) => {
            let verdict = update::send_initial(&updates, Source::Redis, services.clone())?;
            Some((services, verdict))
        }
        None => None,
    };
    let source = RedisSource {
        client,
        server,
        key: config.key.clone(),
        channel: channel(&config.key),
        resync: config.resync,
        updates,
        registry,
        metrics,
        saved,
        applied: None,
        rejected: None,
        problem: None,
        up: false,
    };
    Ok(tokio::spawn(source.run(initial)))
}

struct RedisSource {
    client: redis::Client,
    /// `host:port` for messages.
    server: String,
    key: String,
    channel: String,
    resync: Duration,
    updates: mpsc::Sender<SourceUpdate>,
    registry: watch::Receiver<Listing>,
    metrics: Arc<dyn SourceObserver>,
    saved: SavedServices,
    /// What the agent has from this source.
    applied: Option<Vec<ServiceConfig>>,
    /// The last set the agent rejected: sent again only when the hash or the registry changes.
    rejected: Option<Vec<ServiceConfig>>,
    /// The last problem reported, so a resync finding the same one does not log it again.
    problem: Option<String>,
    /// Whether the last read was applied (and Redis is reachable).
    up: bool,
}

/// Why a session with Redis ended.
enum End {
    /// Unreachable, or the connection broke: reconnect.
    Redis(String),
    /// The agent is stopping.
    AgentGone,
}

/// What woke the session up.
enum Wake {
    Message(Option<redis::Msg>),
    Resync,
    RegistryChanged(bool),
}

impl RedisSource {
    async fn run(mut self, initial: Option<(Vec<ServiceConfig>, Verdict)>) {
        if let Some((services, verdict)) = initial {
            match verdict.await {
                Ok(Outcome::Applied { .. } | Outcome::Failed(_)) => {
                    info!(
                        services = services.len(),
                        "redis: the last known services stay in force until Redis is read"
                    );
                    self.applied = Some(services);
                }
                // The agent logged why.
                Ok(Outcome::Rejected(_)) => {}
                Ok(Outcome::AgentGone) | Err(_) => return,
            }
        }
        self.report();
        let mut backoff = MIN_BACKOFF;
        // An outage was reported and Redis has not been read since.
        let mut down = false;
        loop {
            let (reached, end) = self.session().await;
            let reason = match end {
                End::AgentGone => return,
                End::Redis(reason) => reason,
            };
            self.up = false;
            self.report();
            if reached {
                // The connection worked: this is a new outage.
                backoff = MIN_BACKOFF;
                down = false;
            }
            if down {
                debug!("redis {}: {reason}; retrying in {backoff:?}", self.server);
            } else {
                let kept = self.applied.as_ref().map_or(0, Vec::len);
                warn!(
                    "redis {}: {reason}; the last {kept} services stay in force, retrying (backoff up to {MAX_BACKOFF:?})",
                    self.server
                );
                down = true;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Connects, subscribes, reads the hash and keeps reading it on changes until something
    /// breaks. Returns whether the hash was read at all, and why it ended.
    async fn session(&mut self) -> (bool, End) {
        let mut pubsub = match timeout(CONNECT_TIMEOUT, self.client.get_async_pubsub()).await {
            Ok(Ok(pubsub)) => pubsub,
            Ok(Err(err)) => return (false, End::Redis(format!("connecting: {err}"))),
            Err(_) => {
                return (
                    false,
                    End::Redis(format!("connecting: no answer within {CONNECT_TIMEOUT:?}")),
                );
            }
        };
        // Subscribed before the first read: a change made while the hash is read is announced
        // after it and triggers another read.
        match timeout(CONNECT_TIMEOUT, pubsub.subscribe(&self.channel)).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                return (
                    false,
                    End::Redis(format!("subscribing to {}: {err}", self.channel)),
                );
            }
            Err(_) => {
                return (
                    false,
                    End::Redis(format!(
                        "subscribing to {}: no answer within {CONNECT_TIMEOUT:?}",
                        self.channel
                    )),
                );
            }
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT));
        let mut conn = match self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
        {
            Ok(conn) => conn,
            Err(err) => return (false, End::Redis(format!("connecting: {err}"))),
        };
        if let Err(end) = self.sync(&mut conn, false).await {
            return (false, end);
        }
        let mut messages = pubsub.on_message();
        let mut resync = tokio::time::interval_at(Instant::now() + self.resync, self.resync);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let wake = tokio::select! {
                message = messages.next() => Wake::Message(message),
                _ = resync.tick() => Wake::Resync,
                changed = self.registry.changed(), if self.rejected.is_some() => {
                    Wake::RegistryChanged(changed.is_ok())
                }
            };
            let result = match wake {
                Wake::Message(None) => {
                    return (true, End::Redis("the pub/sub connection closed".to_owned()));
                }
                Wake::Message(Some(_)) => {
                    // One read covers every change announced so far.
                    while let Some(Some(_)) = messages.next().now_or_never() {}
                    self.sync(&mut conn, false).await
                }
                Wake::Resync => self.sync(&mut conn, false).await,
                Wake::RegistryChanged(false) => Err(End::AgentGone),
                // Another source changed: the rejected set may fit now.
                Wake::RegistryChanged(true) => self.sync(&mut conn, true).await,
            };
            if let Err(end) = result {
                return (true, end);
            }
        }
    }

    /// Reads the hash and sends it unless the agent already has it (or rejected it and
    /// nothing changed since, unless `retry`).
    async fn sync(
        &mut self,
        conn: &mut redis::aio::MultiplexedConnection,
        retry: bool,
    ) -> Result<(), End> {
        let entries: Result<BTreeMap<String, Vec<u8>>, _> =
            redis::cmd("HGETALL").arg(&self.key).query_async(conn).await;
        let entries = match entries {
            Ok(entries) => entries,
            // Redis answered, but not with a hash of UTF-8 names (WRONGTYPE...): the data is
            // wrong, the connection is fine.
            Err(err)
                if matches!(
                    err.kind(),
                    redis::ErrorKind::Server(_) | redis::ErrorKind::UnexpectedReturnType
                ) =>
            {
                self.problem(format!("key {:?}: {err}", self.key));
                return Ok(());
            }
            Err(err) => return Err(End::Redis(format!("HGETALL {}: {err}", self.key))),
        };
        let services = match parse_hash(&self.key, &entries) {
            Ok(services) => services,
            Err(problems) => {
                self.problem(problems.join("; "));
                return Ok(());
            }
        };
        if self.rejected.is_none() && self.applied.as_ref() == Some(&services) {
            self.problem = None;
            self.set_up(true);
            return Ok(());
        }
        if !retry && self.rejected.as_ref() == Some(&services) {
            return Ok(());
        }
        let count = services.len();
        match update::send(&self.updates, Source::Redis, services.clone()).await {
            Outcome::Applied { generation } => {
                info!(services = count, generation, "redis: services applied");
                // fsync blocks: off the async workers.
                let saved = self.saved.clone();
                let copy = services.clone();
                match tokio::task::spawn_blocking(move || saved.save(&copy)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(err)) => warn!("redis: {err:#}"),
                    Err(err) => warn!("redis: saving task failed: {err}"),
                }
                self.applied = Some(services);
                self.rejected = None;
                self.problem = None;
                self.set_up(true);
            }
            Outcome::Rejected(reason) => {
                // The agent logged the reason. Wait for a change before sending it again.
                self.registry.borrow_and_update();
                self.rejected = Some(services);
                self.problem = Some(reason);
                self.set_up(false);
            }
            Outcome::Failed(reason) => {
                // Accepted: the agent holds the set and retries the map writes itself. Not up
                // until the maps hold it; the next read or resync asks again.
                warn!("redis: services accepted but not yet in the maps: {reason}");
                self.applied = Some(services);
                self.rejected = None;
                self.set_up(false);
            }
            Outcome::AgentGone => return Err(End::AgentGone),
        }
        Ok(())
    }

    /// Reports a problem with the hash's contents: the previous services stay.
    fn problem(&mut self, reason: String) {
        if self.problem.as_ref() != Some(&reason) {
            self.metrics.config_rejected();
            error!("redis update rejected, the running services stay in force: {reason}");
        }
        self.problem = Some(reason);
        self.rejected = None;
        self.set_up(false);
    }

    fn set_up(&mut self, up: bool) {
        if up && !self.up {
            info!("redis {}: read and applied", self.server);
        }
        self.up = up;
        self.report();
    }

    fn report(&self) {
        let services = self.applied.as_ref().map_or(0, Vec::len);
        self.metrics
            .source_state(Source::Redis.name(), self.up, services);
    }
}

/// The services of the hash `key`, in field order, or every entry's problem.
pub fn parse_hash(
    key: &str,
    entries: &BTreeMap<String, Vec<u8>>,
) -> Result<Vec<ServiceConfig>, Vec<String>> {
    let mut services = Vec::with_capacity(entries.len());
    let mut problems = Vec::new();
    for (name, json) in entries {
        match update::parse_service(name, json) {
            Ok(service) => services.push(service),
            Err(reason) => problems.push(format!("hash {key:?} field {name:?}: {reason}")),
        }
    }
    if problems.is_empty() {
        Ok(services)
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_channel_is_named_after_the_key() {
        assert_eq!(channel("mesh:services"), "mesh:services:changed");
    }

    #[test]
    fn every_bad_entry_is_reported_by_field() {
        let entries = BTreeMap::from([
            ("a".to_owned(), br#"{"vip": "127.100.0.1:80"}"#.to_vec()),
            (
                "b".to_owned(),
                br#"{"vip": "127.100.0.2:80", "backends": [{"addr": "x"}]}"#.to_vec(),
            ),
            ("c".to_owned(), b"{".to_vec()),
        ]);
        let problems = parse_hash("mesh:services", &entries).unwrap_err();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].starts_with(
                "hash \"mesh:services\" field \"b\": backends[0].addr: invalid socket address"
            ),
            "{problems:?}"
        );
        assert!(
            problems[1].starts_with("hash \"mesh:services\" field \"c\": invalid JSON"),
            "{problems:?}"
        );
    }

    #[test]
    fn a_good_hash_gives_its_services_by_name() {
        let entries = BTreeMap::from([
            ("b".to_owned(), br#"{"vip": "127.100.0.2:80"}"#.to_vec()),
            ("a".to_owned(), br#"{"vip": "127.100.0.1:80"}"#.to_vec()),
        ]);
        let names: Vec<String> = parse_hash("k", &entries)
            .unwrap()
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(parse_hash("k", &BTreeMap::new()).unwrap(), []);
    }
}
