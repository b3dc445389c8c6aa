//! The agent's TOML config file: types, parsing and validation.
//!
//! Parsing rejects unknown keys (`deny_unknown_fields`), so a typo fails loudly instead of
//! silently falling back to a default. Validation checks everything the datapath would
//! otherwise refuse at run time (or silently mishandle), and reports every problem at once,
//! each naming the file, the service, the field and the reason.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mesh_common::{
    DEFAULT_MAX_BACKENDS, DEFAULT_MAX_SERVICES, DEFAULT_MAX_SLOTS, PROTO_TCP, PROTO_UDP,
};
use serde::{Deserialize, Serialize};

mod access;
mod redis_config;
mod reparse;
mod validate;

use crate::model::Vip;

pub use redis_config::Scheme as RedisScheme;
pub use reparse::Reparser;
pub use validate::{ConfigError, Usage, distinct_backends, service_slots};

/// The whole config file.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub agent: AgentConfig,
    /// `[[services]]` tables.
    #[serde(default)]
    pub services: Vec<ServiceConfig>,
}

/// `[agent]`: how the agent itself runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Directory on bpffs where maps and links are pinned.
    pub bpffs: PathBuf,
    /// cgroup v2 directory to attach to; `None` means the cgroup v2 root from /proc/mounts.
    pub cgroup: Option<PathBuf>,
    /// Listen address of the Prometheus endpoint.
    pub metrics: SocketAddr,
    /// Unix socket of the admin API (mode 0600, owned by the agent's user; callers other than
    /// root and that user are refused). An empty path turns it off.
    pub admin_socket: PathBuf,
    /// An additional TCP listener for the admin API; `None` (the default) has none. Needs
    /// `admin_token_file`, and `admin_tls` unless the address is a loopback one.
    pub admin: Option<SocketAddr>,
    /// File holding the bearer token TCP clients of the admin API must send
    /// (`Authorization: Bearer <token>`); read once at start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_token_file: Option<PathBuf>,
    /// `admin_tls = { cert = "...", key = "..." }`: serve the TCP admin listener over TLS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_tls: Option<TlsFiles>,
    /// Directory for what must survive a restart: the admin API's services and the last
    /// services read from Redis (sent to the registry again at start).
    pub state_dir: PathBuf,
    /// `[agent.redis]`: a Redis hash as a registry source; `None` turns it off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisConfig>,
    /// `[agent.kubernetes]`: Services and EndpointSlices as a registry source; `None` turns it
    /// off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesConfig>,
    /// `[agent.limits]`: map capacities.
    pub limits: Limits,
    /// `[agent.nodeport]`: the TC programs for traffic from other hosts (external services).
    pub nodeport: NodeportConfig,
    /// Count per-backend bytes and TCP round-trip times in the kernel (a few map updates per
    /// closed connection; see BENCHMARKS.md for its cost).
    pub telemetry: bool,
    /// Answer getsockopt(SO_ORIGINAL_DST) on TCP sockets connected through a VIP, as netfilter
    /// DNAT does. Off by default: it keeps each such socket's translation in socket storage,
    /// allocated per connect (see BENCHMARKS.md), instead of the `tcp_peers` array.
    pub original_dst: bool,
    /// Which log records of the kernel programs reach the agent's log (they are written only
    /// on rare events: a connect without backend, a failed connect, a full map).
    pub kernel_log: KernelLog,
    /// How often the control loop reads every map back and repairs what differs from the
    /// desired state (an entry deleted or changed behind the agent's back).
    #[serde(with = "humantime_serde")]
    pub resync: Duration,
    /// The addresses services may claim as VIPs, from any source. Empty: no restriction (the
    /// agent warns at start): whoever writes a registry could then redirect any destination of
    /// the node, say 8.8.8.8:53.
    pub vip_ranges: Vec<ipnet::IpNet>,
}

/// Where the admin API's Unix socket is by default (and where the CLI looks for it).
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/mesh/admin.sock";

/// PEM files of a TLS server: the certificate chain and its private key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Bounds of `[agent] resync`.
pub const RESYNC_MIN: Duration = Duration::from_millis(100);
pub const RESYNC_MAX: Duration = Duration::from_secs(3600);

/// `kernel_log`: the most verbose level of kernel program records forwarded to the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelLog {
    Off,
    Error,
    #[default]
    Warn,
    Info,
    Debug,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            bpffs: PathBuf::from("/sys/fs/bpf/mesh"),
            cgroup: None,
            metrics: SocketAddr::from(([127, 0, 0, 1], 9464)),
            admin_socket: PathBuf::from(DEFAULT_ADMIN_SOCKET),
            admin: None,
            admin_token_file: None,
            admin_tls: None,
            state_dir: PathBuf::from("/var/lib/mesh"),
            redis: None,
            kubernetes: None,
            limits: Limits::default(),
            nodeport: NodeportConfig::default(),
            telemetry: true,
            original_dst: false,
            kernel_log: KernelLog::default(),
            resync: Duration::from_secs(30),
            vip_ranges: Vec::new(),
        }
    }
}

/// `[agent.redis]`: services from a Redis hash (field = service name, value = the service as
/// JSON), re-read on every message on the channel `<key>:changed` and every `resync`.
///
/// Whoever can write the hash can redirect any destination of the node, so the connection can
/// authenticate (an ACL user and a password read from a file) and use TLS (`rediss://`, with
/// certificate verification always on).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host[:port][/db]`, or `rediss://...` for TLS. A password in it
    /// (`redis://user:password@...`) works but is visible to whoever reads the config:
    /// prefer `password_file`.
    pub url: String,
    /// The ACL user to authenticate as (`AUTH <username> <password>`); default: the URL's
    /// user, else Redis's `default` user. Needs a password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// A file holding the password (a trailing newline is stripped), read at start; the
    /// password is never logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// TLS: the CA certificates (PEM) that sign the server's certificate, trusted instead of
    /// the system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// TLS: a client certificate chain (PEM) for servers that require one (mutual TLS), with
    /// `client_key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<PathBuf>,
    /// TLS: the private key (PEM) of `client_cert`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key: Option<PathBuf>,
    /// The hash holding the services.
    #[serde(default = "default_redis_key")]
    pub key: String,
    /// How often the whole hash is read even without a change message.
    #[serde(default = "default_redis_resync", with = "humantime_serde")]
    pub resync: Duration,
}

/// The URL's password is never shown (a `Config` may be printed with `{:?}`).
impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let RedisConfig {
            url,
            username,
            password_file,
            ca_file,
            client_cert,
            client_key,
            key,
            resync,
        } = self;
        f.debug_struct("RedisConfig")
            .field("url", &redis_config::redact_url(url))
            .field("username", username)
            .field("password_file", password_file)
            .field("ca_file", ca_file)
            .field("client_cert", client_cert)
            .field("client_key", client_key)
            .field("key", key)
            .field("resync", resync)
            .finish()
    }
}

fn default_redis_key() -> String {
    "mesh:services".to_owned()
}

fn default_redis_resync() -> Duration {
    Duration::from_secs(5)
}

/// `[agent.kubernetes]`: the node's share of a cluster's Services, as kube-proxy serves them.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConfig {
    /// Default: the in-cluster service account, else `$KUBECONFIG`, else `~/.kube/config`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<PathBuf>,
    /// Default: `$NODE_NAME` (the downward API), else the host name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// Like kube-proxy: serve only Services with this `service.kubernetes.io/service-proxy-name`
    /// label; empty serves only Services without it.
    #[serde(default)]
    pub service_proxy_name: String,
}

/// `[agent.nodeport]`: where and how traffic from other hosts to external services is
/// translated (TC programs on the node's external devices).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeportConfig {
    /// Attach the TC programs at all. Off by default: they go on the node's own devices, which
    /// an agent that only balances its cgroup's connections must not touch.
    pub enabled: bool,
    /// The external devices, by name; empty: every device that holds one of the node's global
    /// IPv4 addresses (not loopback), found at start.
    pub devices: Vec<String>,
    /// A UDP flow's translation is forgotten after this long without a packet.
    #[serde(with = "humantime_serde")]
    pub udp_timeout: Duration,
    /// A TCP flow's translation is forgotten after this long without a packet...
    #[serde(with = "humantime_serde")]
    pub tcp_timeout: Duration,
    /// ...or this long after a FIN or RST was seen.
    #[serde(with = "humantime_serde")]
    pub tcp_closing_timeout: Duration,
}

impl Default for NodeportConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            devices: Vec::new(),
            udp_timeout: Duration::from_secs(30),
            tcp_timeout: Duration::from_secs(6 * 3600),
            tcp_closing_timeout: Duration::from_secs(10),
        }
    }
}

/// `[agent.limits]`: `max_entries` of the maps, fixed when they are created. Every map's
/// capacity follows from these in one table (`mesh_common::capacity::Limits::table`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Entries of the services map and the per-service arrays (id 0 is reserved).
    pub max_services: u32,
    /// Entries of the backends map: distinct backend addresses (id 0 is reserved).
    pub max_backends: u32,
    /// Entries of the per-(service, backend) maps: counters, active and passive state. A
    /// backend shared by two services is two entries.
    pub max_service_backends: u32,
    /// Entries of the slots map, shared by all services and both generations.
    pub max_slots: u32,
    /// Flows from other hosts translated at once (two `nat_flows` entries each; LRU).
    pub max_external_flows: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_services: DEFAULT_MAX_SERVICES,
            max_backends: DEFAULT_MAX_BACKENDS,
            max_service_backends: mesh_common::capacity::DEFAULT_MAX_SERVICE_BACKENDS,
            max_slots: DEFAULT_MAX_SLOTS,
            max_external_flows: mesh_common::nodeport::DEFAULT_MAX_EXTERNAL_FLOWS,
        }
    }
}

impl Limits {
    /// The capacity table the maps are created with.
    pub fn capacities(&self) -> mesh_common::capacity::Limits {
        mesh_common::capacity::Limits {
            max_services: self.max_services,
            max_backends: self.max_backends,
            max_service_backends: self.max_service_backends,
            max_slots: self.max_slots,
            max_external_flows: self.max_external_flows,
        }
    }
}

/// Bounds of each `[agent.limits]` value: below 2 nothing fits next to the reserved id 0, and
/// above 2^24 a map would take gigabytes of locked kernel memory, which is surely a typo.
pub const LIMIT_MIN: u32 = 2;
pub const LIMIT_MAX: u32 = 16_777_216;

/// One `[[services]]` table: a virtual address and the backends behind it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub name: String,
    pub vip: SocketAddr,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default)]
    pub backends: Vec<BackendConfig>,
    #[serde(default)]
    pub on_empty: EmptyPolicy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthConfig>,
    /// UDP services: when a backend leaves, terminate the connected UDP sockets the load
    /// balancer pointed at it, so clients notice and reconnect.
    #[serde(default = "default_true")]
    pub terminate_udp_flows: bool,
    /// Set: an external service, for traffic from other hosts arriving on the node's external
    /// devices (NodePort on a node address, ExternalIP, LoadBalancer IP); the value is its
    /// `externalTrafficPolicy`. Unset: a socket-level service for clients on this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<ExternalPolicy>,
    /// `external = "local"` only: serve kube-proxy's health check for this service on this
    /// TCP port of the node (`healthCheckNodePort`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check_node_port: Option<HealthCheckNodePort>,
}

/// `health_check_node_port = { port = 32000 }`: 200 while the node has local endpoints, 503
/// otherwise, with kube-proxy's JSON body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckNodePort {
    pub port: u16,
    /// The local endpoints to report; unset: the service's non-draining backends (by address).
    /// The Kubernetes source sets it to the ready ones, so a node whose local endpoints are
    /// all terminating answers 503 while they still finish their work.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_endpoints: Option<u32>,
}

impl ServiceConfig {
    /// What clients connect to: the VIP with this service's protocol.
    pub fn vip(&self) -> Vip {
        Vip {
            addr: self.vip,
            proto: self.protocol.ip_proto(),
            external: self.external.is_some(),
        }
    }
}

/// `external`: how traffic from other hosts reaches the backends (kube-proxy's
/// `externalTrafficPolicy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExternalPolicy {
    /// The client's source address is kept (the backends are expected to be on this node).
    Local,
    /// A backend reached through an external device (another node) gets the node's address
    /// as source, so its reply comes back through this node.
    Cluster,
}

fn default_true() -> bool {
    true
}

/// One `[[services.backends]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub addr: SocketAddr,
    /// Relative share of new connections, 1..=`MAX_WEIGHT`.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// A draining backend gets no new connections; existing ones are left alone.
    #[serde(default)]
    pub drain: bool,
}

fn default_weight() -> u32 {
    1
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl Protocol {
    /// The IP protocol number used in `ServiceKey::proto`.
    pub fn ip_proto(&self) -> u8 {
        match self {
            Protocol::Tcp => PROTO_TCP,
            Protocol::Udp => PROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// What a connect to the VIP does when no backend is available.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmptyPolicy {
    /// Fail the connect with ECONNREFUSED, so clients fail fast instead of timing out.
    #[default]
    Reject,
    /// Leave the connect to the VIP untouched (for a VIP that is also a real address).
    Passthrough,
}

/// `[services.affinity]`: pin each client to the backend it got first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Affinity {
    /// How long a client stays pinned after its last connect (default 3h, as kube-proxy).
    #[serde(default = "default_affinity_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_affinity_timeout() -> Duration {
    Duration::from_secs(3 * 3600)
}

impl Default for Affinity {
    fn default() -> Self {
        Self {
            timeout: default_affinity_timeout(),
        }
    }
}

/// `[services.health]`: active health checks of the backends.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// TOML key `type`.
    #[serde(rename = "type")]
    pub kind: HealthKind,
    /// Request path of `http` checks.
    pub path: String,
    /// Status codes an `http` check accepts, as inclusive ranges. TOML: `expect = "200-399"`,
    /// `"200"` or `"200,204,300-399"`.
    #[serde(with = "status_ranges")]
    pub expect: Vec<(u16, u16)>,
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive successes that make an unhealthy backend healthy.
    pub rise: u32,
    /// Consecutive failures that make a healthy backend unhealthy.
    pub fall: u32,
    /// Consecutive failed connects seen by the kernel that eject a backend at once, without
    /// waiting for the next check (passive detection); 0 turns it off.
    pub passive_failures: u32,
    /// What to do when no backend is healthy.
    pub all_unhealthy: AllUnhealthy,
}

/// `all_unhealthy`: the policy when every backend of a service fails its checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AllUnhealthy {
    /// Send to every non-draining backend, as if checks were off (Envoy's panic mode): when
    /// all checks fail at once, the checker or the network is the likelier culprit.
    #[default]
    FailOpen,
    /// Send nowhere: connects fail as for a service without backends (HAProxy's behaviour).
    FailClosed,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            kind: HealthKind::Tcp,
            path: "/healthz".to_owned(),
            expect: vec![(200, 399)],
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            rise: 2,
            fall: 3,
            passive_failures: 3,
            all_unhealthy: AllUnhealthy::FailOpen,
        }
    }
}

impl HealthConfig {
    /// Whether an `http` check's response status counts as healthy.
    pub fn accepts_status(&self, status: u16) -> bool {
        self.expect
            .iter()
            .any(|&(lo, hi)| (lo..=hi).contains(&status))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthKind {
    /// A TCP connect succeeds.
    #[default]
    Tcp,
    /// `GET path` answers with an expected status.
    Http,
    /// No active checks: every backend counts as healthy.
    None,
}

/// `expect = "200,204,300-399"` <-> `vec![(200, 200), (204, 204), (300, 399)]`. Only the syntax
/// is checked here; code ranges are checked by `validate`, so a config built in code gets the
/// same checks and every problem is reported together.
mod status_ranges {
    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    pub fn parse(text: &str) -> Result<Vec<(u16, u16)>, String> {
        let bad = |part: &str| {
            format!(
                "invalid status code list {text:?} at {part:?}: expected codes or ranges like \"200,204,300-399\""
            )
        };
        let code = |s: &str, part: &str| s.trim().parse::<u16>().map_err(|_| bad(part));
        if text.trim().is_empty() {
            return Ok(Vec::new());
        }
        text.split(',')
            .map(|part| match part.split_once('-') {
                Some((lo, hi)) => Ok((code(lo, part)?, code(hi, part)?)),
                None => code(part, part).map(|c| (c, c)),
            })
            .collect()
    }

    pub fn format(ranges: &[(u16, u16)]) -> String {
        ranges
            .iter()
            .map(|&(lo, hi)| {
                if lo == hi {
                    lo.to_string()
                } else {
                    format!("{lo}-{hi}")
                }
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn serialize<S: Serializer>(ranges: &[(u16, u16)], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(ranges))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(u16, u16)>, D::Error> {
        let text = String::deserialize(d)?;
        parse(&text).map_err(D::Error::custom)
    }
}

/// Parses and validates a whole config text; `origin` (usually the file name) prefixes every
/// message. The agent reads its file through `Reparser` (the same result, checked against this
/// by the tests and the fuzz target, and the pieces kept for the next edit).
#[cfg(any(test, feature = "fuzzing"))]
pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
    let config: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
        origin: origin.to_owned(),
        source,
    })?;
    config.validate(origin)?;
    Ok(config)
}

/// Reads, parses and validates the config file at `path`, through `reparser`, which then knows
/// every piece of it: the first edit re-parses only what it changed, like every later one.
pub fn load(path: &Path, reparser: &mut Reparser) -> Result<Config, ConfigError> {
    let origin = path.display().to_string();
    let config = reparser.parse(read(path)?, &origin)?;
    config.validate(&origin)?;
    Ok(config)
}

/// The text of the config file at `path`.
pub fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        origin: path.display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests;
