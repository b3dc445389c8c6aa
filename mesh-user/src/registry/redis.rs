//! The Redis source (`[agent.redis]`): a hash whose fields are service names and whose values
//! are the services as JSON (the `[[services]]` keys; `name` may be left out).
//!
//! The whole hash is read (HGETALL) when the source connects, on every message on the pub/sub
//! channel `<key>:changed` (any payload) and every `resync` as a safety net, and sent to the
//! agent as the source's complete set. A hash whose entries do not all parse is rejected whole
//! and the previous services stay. While Redis is unreachable the last services stay too: the
//! source reconnects with a capped backoff and sends nothing until it has read the hash again.
//! `mesh_registry_source_up{source="redis"}` is 1 only while the last read was applied.
//!
//! The connection may authenticate (`username`, `password_file`) and use TLS (`rediss://`,
//! `ca_file`, `client_cert`/`client_key`); every file is read once at start, and a problem
//! with one stops the agent naming the field. The password is never logged: messages name the
//! server by `host:port` and the user by name only.

use std::{
    collections::BTreeMap, os::unix::fs::MetadataExt as _, path::Path, sync::Arc, time::Duration,
};

use anyhow::{Context as _, anyhow, bail};
use futures_util::{FutureExt as _, StreamExt as _};
use redis::{AsyncConnectionConfig, IntoConnectionInfo as _};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use tokio::{
    sync::{mpsc, watch},
    time::{Instant, timeout},
};
use tokio_rustls::rustls;
use tracing::{debug, error, info, warn};

use super::{
    Listing, Outcome, Source, SourceObserver, SourceUpdate,
    update::{self, SavedServices, Verdict},
};
use crate::config::{RedisConfig, RedisScheme, ServiceConfig};

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
    let Endpoint {
        client,
        server,
        user,
        tls,
    } = endpoint(config)?;
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
        user,
        tls,
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

/// Where and as whom the source connects.
struct Endpoint {
    /// The address, the credentials and the TLS settings.
    client: redis::Client,
    /// `host:port` for messages (never the URL: it may hold a password).
    server: String,
    /// The ACL user for messages: `None` when the connection sends no password.
    user: Option<String>,
    /// `rediss://`.
    tls: bool,
}

/// The client for `[agent.redis]`: the URL, with the user and the password of `username` and
/// `password_file` set on its connection info (not pasted into the URL), and TLS settings.
fn endpoint(config: &RedisConfig) -> anyhow::Result<Endpoint> {
    // Validation has checked the URL; never echo it, it may hold a password.
    let info = config
        .url
        .as_str()
        .into_connection_info()
        .map_err(|err| anyhow!("[agent.redis] url: is not a valid Redis URL: {err}"))?;
    if config.url_has_password() {
        warn!(
            "[agent.redis] url: holds a password, which whoever can read the config file sees; \
             move it to [agent.redis] password_file (mode 0600)"
        );
    }
    // No `CLIENT SETINFO` after connecting: the source's ACL user needs nothing but HGETALL and
    // SUBSCRIBE, and a refused SETINFO would fill the server's ACL log.
    let mut settings = info.redis_settings().clone().set_skip_set_lib_name();
    if let Some(username) = &config.username {
        settings = settings.set_username(username);
    }
    if let Some(path) = &config.password_file {
        settings = settings.set_password(read_password(path)?);
    }
    let user = settings
        .password()
        .is_some()
        .then(|| settings.username().unwrap_or("default").to_owned());
    let info = info.set_redis_settings(settings);
    let server = info.addr().to_string();
    let tls = config.scheme() == Some(RedisScheme::Tls);
    let client = if tls {
        use_ring_provider();
        redis::Client::build_with_tls(info, tls_certificates(config)?)
            .map_err(|err| anyhow!("[agent.redis] TLS settings: {err}"))?
    } else {
        redis::Client::open(info).map_err(|err| anyhow!("[agent.redis] url: {err}"))?
    };
    info!(
        "redis source: {server}, {}, {}, hash {:?}",
        if tls {
            match &config.ca_file {
                Some(ca) => format!("TLS trusting the CA of {}", ca.display()),
                None => "TLS trusting the system's CAs".to_owned(),
            }
        } else {
            "no TLS".to_owned()
        },
        match &user {
            Some(user) => format!("authenticating as user {user:?}"),
            None => "no password".to_owned(),
        },
        config.key
    );
    Ok(Endpoint {
        client,
        server,
        user,
        tls,
    })
}

/// The password in `path`: its content without one trailing newline.
fn read_password(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path).map_err(|err| {
        anyhow!(
            "[agent.redis] password_file: cannot read {}: {err}",
            path.display()
        )
    })?;
    let password = text
        .strip_suffix('\n')
        .map_or(text.as_str(), |t| t.strip_suffix('\r').unwrap_or(t));
    if password.is_empty() {
        bail!("[agent.redis] password_file: {} is empty", path.display());
    }
    if let Ok(meta) = std::fs::metadata(path)
        && meta.mode() & 0o077 != 0
    {
        warn!(
            "[agent.redis] password_file: {} is readable by other users (mode {:o}); chmod 0600 it",
            path.display(),
            meta.mode() & 0o777
        );
    }
    Ok(password.to_owned())
}

/// The redis crate builds its rustls configs with the process's default provider: make it ring,
/// the one the rest of the agent uses, unless one is installed already.
fn use_ring_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race to another installer is fine: there is a default either way.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// Reads one of the TLS files of `[agent.redis]`.
fn read_tls_file(field: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|err| {
        anyhow!(
            "[agent.redis] {field}: cannot read {}: {err}",
            path.display()
        )
    })
}

/// The PEM certificates of `pem` (one at least).
fn certificates(
    field: &str,
    path: &Path,
    pem: &[u8],
) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| anyhow!("[agent.redis] {field}: {}: {err}", path.display()))?;
    if certs.is_empty() {
        bail!(
            "[agent.redis] {field}: {}: no PEM certificate in it",
            path.display()
        );
    }
    Ok(certs)
}

/// The CA and client certificate of `[agent.redis]`, checked here so that a bad file stops the
/// agent naming it, instead of failing every connect.
fn tls_certificates(config: &RedisConfig) -> anyhow::Result<redis::TlsCertificates> {
    let root_cert = match &config.ca_file {
        Some(path) => {
            let pem = read_tls_file("ca_file", path)?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in certificates("ca_file", path, &pem)? {
                roots.add(cert).map_err(|err| {
                    anyhow!(
                        "[agent.redis] ca_file: {}: not a CA certificate: {err}",
                        path.display()
                    )
                })?;
            }
            Some(pem)
        }
        None => None,
    };
    let client_tls = match (&config.client_cert, &config.client_key) {
        (Some(cert_path), Some(key_path)) => {
            let client_cert = read_tls_file("client_cert", cert_path)?;
            let certs = certificates("client_cert", cert_path, &client_cert)?;
            let client_key = read_tls_file("client_key", key_path)?;
            let key = PrivateKeyDer::from_pem_slice(&client_key).map_err(|err| {
                anyhow!("[agent.redis] client_key: {}: {err}", key_path.display())
            })?;
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .context("[agent.redis] TLS protocol versions")?
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_client_auth_cert(certs, key)
                .map_err(|err| {
                    anyhow!(
                        "[agent.redis] client_key: {} does not fit client_cert {}: {err}",
                        key_path.display(),
                        cert_path.display()
                    )
                })?;
            Some(redis::ClientTlsConfig {
                client_cert,
                client_key,
            })
        }
        // Validation allows both or neither.
        _ => None,
    };
    Ok(redis::TlsCertificates {
        client_tls,
        root_cert,
    })
}

struct RedisSource {
    client: redis::Client,
    /// `host:port` for messages.
    server: String,
    /// The ACL user, for messages (`None`: no password is sent).
    user: Option<String>,
    /// Whether the connection uses TLS.
    tls: bool,
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
    /// Redis refused the login or a command for lack of an ACL permission: reconnect too (the
    /// operator may fix it), but this is a configuration error, logged as one.
    Denied(String),
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
        // An outage was reported and Redis has not been read since; whether as a denial.
        let mut down: Option<bool> = None;
        loop {
            let (reached, end) = self.session().await;
            let (reason, denied) = match end {
                End::AgentGone => return,
                End::Redis(reason) => (reason, false),
                End::Denied(reason) => (reason, true),
            };
            self.up = false;
            self.report();
            if reached {
                // The connection worked: this is a new outage.
                backoff = MIN_BACKOFF;
                down = None;
            }
            let kept = self.applied.as_ref().map_or(0, Vec::len);
            match down {
                // A denial is reported even amid an outage (a dropped connection that cannot
                // log in again): it needs the operator.
                Some(reported_denial) if reported_denial || !denied => {
                    debug!("redis {}: {reason}; retrying in {backoff:?}", self.server);
                }
                _ if denied => error!(
                    "redis {}: {reason}; the last {kept} services stay in force, retrying (backoff up to {MAX_BACKOFF:?})",
                    self.server
                ),
                _ => warn!(
                    "redis {}: {reason}; the last {kept} services stay in force, retrying (backoff up to {MAX_BACKOFF:?})",
                    self.server
                ),
            }
            down = Some(denied || down == Some(true));
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Connects, subscribes, reads the hash and keeps reading it on changes until something
    /// breaks. Returns whether the hash was read at all, and why it ended.
    async fn session(&mut self) -> (bool, End) {
        let mut pubsub = match timeout(CONNECT_TIMEOUT, self.client.get_async_pubsub()).await {
            Ok(Ok(pubsub)) => pubsub,
            Ok(Err(err)) => return (false, self.failure("connecting", &err)),
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
                    self.failure(&format!("subscribing to {}", self.channel), &err),
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
            Err(err) => return (false, self.failure("connecting", &err)),
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
            // Not the data's fault: the login or the ACL (NOAUTH, NOPERM).
            Err(err) if denial(&err) => {
                return Err(self.failure(&format!("HGETALL {}", self.key), &err));
            }
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
            Err(err) => return Err(self.failure(&format!("HGETALL {}", self.key), &err)),
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

    /// Why `doing` failed, in words: a refused login or a missing ACL permission is named as
    /// such (neither heals by itself), with what the source needs.
    fn failure(&self, doing: &str, err: &redis::RedisError) -> End {
        let user = self.user.as_deref().unwrap_or("default");
        if err.kind() == redis::ErrorKind::AuthenticationFailed {
            End::Denied(format!(
                "{doing}: Redis refused the login as user {user:?} (wrong password, or the user \
                 does not exist or is disabled): {err}"
            ))
        } else if err.code() == Some("NOAUTH") {
            End::Denied(format!(
                "{doing}: Redis requires a password; set [agent.redis] password_file: {err}"
            ))
        } else if err.code() == Some("NOPERM") {
            End::Denied(format!(
                "{doing}: the ACL user {user:?} lacks a permission the source needs (HGETALL on \
                 the key {:?}, SUBSCRIBE to the channel {:?}): {err}",
                self.key, self.channel
            ))
        } else if self.tls && err.is_io_error() && err.to_string().contains("certificate") {
            End::Denied(format!(
                "{doing}: TLS: the server's certificate was refused (is it signed by a CA of \
                 [agent.redis] ca_file, or of the system when that is unset, and does it name \
                 the host of the URL?): {err}"
            ))
        } else if self.tls && err.is_io_error() {
            End::Redis(format!("{doing} (TLS): {err}"))
        } else {
            End::Redis(format!("{doing}: {err}"))
        }
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

/// Whether Redis refused a command for want of a login or an ACL permission.
fn denial(err: &redis::RedisError) -> bool {
    matches!(err.code(), Some("NOAUTH" | "NOPERM"))
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

    fn temp_dir(tag: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("mesh-unit-redis-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn the_password_file_loses_one_trailing_newline_only() {
        let dir = temp_dir("password");
        let path = dir.join("pw");
        for (content, want) in [
            ("s3cret\n", "s3cret"),
            ("s3cret\r\n", "s3cret"),
            ("s3cret", "s3cret"),
            (" s3 cret \n\n", " s3 cret \n"),
        ] {
            std::fs::write(&path, content).unwrap();
            assert_eq!(read_password(&path).unwrap(), want, "{content:?}");
        }
        std::fs::write(&path, "\n").unwrap();
        assert_eq!(
            read_password(&path).unwrap_err().to_string(),
            format!("[agent.redis] password_file: {} is empty", path.display())
        );
        let missing = dir.join("missing");
        assert_eq!(
            read_password(&missing).unwrap_err().to_string(),
            format!(
                "[agent.redis] password_file: cannot read {}: No such file or directory (os error 2)",
                missing.display()
            )
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_client_carries_the_user_and_the_password_of_the_file() {
        let dir = temp_dir("endpoint");
        let path = dir.join("pw");
        std::fs::write(&path, "file-pw-1\n").unwrap();
        let mut config = crate::config::parse(
            &format!(
                "[agent.redis]\nurl = \"redis://127.0.0.1:6399/3\"\nusername = \"mesh\"\n\
                 password_file = {:?}\n",
                path.display().to_string()
            ),
            "mesh.toml",
        )
        .unwrap()
        .agent
        .redis
        .unwrap();
        let got = endpoint(&config).unwrap();
        let info = got.client.get_connection_info();
        assert_eq!(info.redis_settings().username(), Some("mesh"));
        assert_eq!(info.redis_settings().password(), Some("file-pw-1"));
        assert_eq!(info.redis_settings().db(), 3);
        assert_eq!(got.server, "127.0.0.1:6399");
        assert_eq!(got.user.as_deref(), Some("mesh"));
        assert!(!got.tls);
        assert!(!format!("{info:?}").contains("file-pw-1"));
        // A password in the URL: the default user.
        config.username = None;
        config.password_file = None;
        config.url = "redis://:url-pw@127.0.0.1:6399/".to_owned();
        let got = endpoint(&config).unwrap();
        assert_eq!(got.user.as_deref(), Some("default"));
        // No password: no login.
        config.url = "rediss://127.0.0.1:6399/".to_owned();
        let got = endpoint(&config).unwrap();
        assert_eq!(got.user, None);
        assert!(got.tls);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tls_files_that_do_not_hold_what_they_should_are_named() {
        let dir = temp_dir("tls");
        let not_pem = dir.join("not.pem");
        std::fs::write(&not_pem, "hello\n").unwrap();
        let mut config = crate::config::parse(
            "[agent.redis]\nurl = \"rediss://127.0.0.1:6399/\"\n",
            "mesh.toml",
        )
        .unwrap()
        .agent
        .redis
        .unwrap();
        config.ca_file = Some(not_pem.clone());
        assert_eq!(
            tls_certificates(&config).unwrap_err().to_string(),
            format!(
                "[agent.redis] ca_file: {}: no PEM certificate in it",
                not_pem.display()
            )
        );
        config.ca_file = None;
        config.client_cert = Some(not_pem.clone());
        config.client_key = Some(dir.join("missing.key"));
        assert_eq!(
            tls_certificates(&config).unwrap_err().to_string(),
            format!(
                "[agent.redis] client_cert: {}: no PEM certificate in it",
                not_pem.display()
            )
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
