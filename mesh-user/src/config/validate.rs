//! Validation: everything parsing cannot check, reported all at once, each problem naming the
//! file, the service, the field and the reason.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use mesh_common::{MAX_BACKENDS_PER_SERVICE, MAX_SLOTS_PER_SERVICE, MAX_WEIGHT, SERVICE_NAME_LEN};

use super::*;

/// Which service a problem is about: `services[1] "web"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRef {
    pub index: usize,
    pub name: String,
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "services[{}] {:?}", self.index, self.name)
    }
}

/// One validation problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The service it is in, or `None` for `[agent]` and whole-config problems.
    pub service: Option<ServiceRef>,
    /// Path of the field, relative to the service when there is one: `backends[0].weight`,
    /// `agent.limits.max_slots`.
    pub field: String,
    /// What is wrong, with the value found.
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(service) = &self.service {
            write!(f, "{service}: ")?;
        }
        write!(f, "{}: {}", self.field, self.reason)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{origin}: cannot read: {source}")]
    Read {
        origin: String,
        source: std::io::Error,
    },
    /// TOML syntax, a wrong type or an unknown key; toml's message names the key and line.
    #[error("{origin}: {source}")]
    Parse {
        origin: String,
        source: toml::de::Error,
    },
    /// Every validation problem, one per line.
    #[error("{}", fmt_problems(origin, problems))]
    Invalid {
        origin: String,
        problems: Vec<Problem>,
    },
}

fn fmt_problems(origin: &str, problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("{origin}: {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl ConfigError {
    /// The validation problems (empty for read and parse errors).
    #[cfg(test)]
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Invalid { problems, .. } => problems,
            ConfigError::Read { .. } | ConfigError::Parse { .. } => &[],
        }
    }
}

/// Collects problems with their context while walking the config.
#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn agent(&mut self, field: &str, reason: String) {
        self.0.push(Problem {
            service: None,
            field: field.to_owned(),
            reason,
        });
    }

    fn service(&mut self, index: usize, svc: &ServiceConfig, field: &str, reason: String) {
        self.0.push(Problem {
            service: Some(ServiceRef {
                index,
                name: svc.name.clone(),
            }),
            field: field.to_owned(),
            reason,
        });
    }
}

/// Why `ip` cannot be a VIP or backend address, if it cannot.
fn bad_ip(ip: IpAddr) -> Option<&'static str> {
    if ip.is_unspecified() {
        Some("is the unspecified address")
    } else if ip.is_multicast() {
        Some("is a multicast address")
    } else if matches!(ip, IpAddr::V4(v4) if v4.is_broadcast()) {
        Some("is the broadcast address")
    } else if matches!(ip, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some()) {
        // Dual-stack sockets dialling ::ffff:a.b.c.d reach the IPv4 service a.b.c.d.
        Some("is an IPv4-mapped IPv6 address; write the IPv4 address instead")
    } else {
        None
    }
}

fn family(addr: &SocketAddr) -> &'static str {
    if addr.is_ipv4() { "IPv4" } else { "IPv6" }
}

fn fmt_duration(d: Duration) -> humantime_serde::re::humantime::FormattedDuration {
    humantime_serde::re::humantime::format_duration(d)
}

/// Checks `value` is within `lo..=hi` (durations).
fn duration_range(value: Duration, lo: Duration, hi: Duration) -> Option<String> {
    (!(lo..=hi).contains(&value)).then(|| {
        format!(
            "must be between {} and {}, got {}",
            fmt_duration(lo),
            fmt_duration(hi),
            fmt_duration(value)
        )
    })
}

fn u32_range(value: u32, lo: u32, hi: u32) -> Option<String> {
    (!(lo..=hi).contains(&value)).then(|| format!("must be between {lo} and {hi}, got {value}"))
}

impl NodeportConfig {
    fn check(&self, p: &mut Problems) {
        let max = mesh_common::nodeport::MAX_NODEPORT_DEVICES as usize;
        if self.devices.len() > max {
            p.agent(
                "agent.nodeport.devices",
                format!("at most {max} devices, got {}", self.devices.len()),
            );
        }
        let mut seen = BTreeSet::new();
        for (i, dev) in self.devices.iter().enumerate() {
            // IFNAMSIZ is 16 with the terminating zero; '/' and whitespace are never in one.
            if dev.is_empty() || dev.len() > 15 || dev.contains(['/', ' ', '\t', '\n']) {
                p.agent(
                    &format!("agent.nodeport.devices[{i}]"),
                    format!("{dev:?} is not a network device name (1-15 bytes, no '/' or spaces)"),
                );
            } else if !seen.insert(dev.as_str()) {
                p.agent(
                    &format!("agent.nodeport.devices[{i}]"),
                    format!("{dev:?} is listed twice"),
                );
            }
        }
        let day = Duration::from_secs(24 * 3600);
        for (field, value, hi) in [
            ("agent.nodeport.udp_timeout", self.udp_timeout, day),
            ("agent.nodeport.tcp_timeout", self.tcp_timeout, 7 * day),
            (
                "agent.nodeport.tcp_closing_timeout",
                self.tcp_closing_timeout,
                day,
            ),
        ] {
            if let Some(reason) = duration_range(value, Duration::from_secs(1), hi) {
                p.agent(field, reason);
            }
        }
    }
}

impl Config {
    /// Checks everything parsing cannot; returns all problems found, not only the first.
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let mut p = Problems::default();
        self.agent.limits.check(&mut p);
        self.agent.nodeport.check(&mut p);
        p.0.extend(access::check(&self.agent));
        if !self.agent.state_dir.is_absolute() {
            p.agent(
                "agent.state_dir",
                format!(
                    "must be an absolute path, got {:?}",
                    self.agent.state_dir.display().to_string()
                ),
            );
        }
        if let Some(redis) = &self.agent.redis {
            p.0.extend(redis_config::check(redis));
        }
        if let Some(reason) = duration_range(self.agent.resync, RESYNC_MIN, RESYNC_MAX) {
            p.agent("agent.resync", reason);
        }
        let mut total_slots: u64 = 0;
        for (i, svc) in self.services.iter().enumerate() {
            svc.check(i, &mut p);
            check_vip_range(&self.agent.vip_ranges, i, svc, &mut p);
            total_slots += service_slots(svc);
        }
        self.check_unique(&mut p);
        self.check_capacity(total_slots, &mut p);
        if p.0.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid {
                origin: origin.to_owned(),
                problems: p.0,
            })
        }
    }

    /// Names and (vip, protocol) pairs are keys in the agent's state and the services map.
    fn check_unique(&self, p: &mut Problems) {
        let mut names: BTreeMap<&str, usize> = BTreeMap::new();
        let mut vips: BTreeMap<(SocketAddr, Protocol, bool), usize> = BTreeMap::new();
        for (i, svc) in self.services.iter().enumerate() {
            if let Some(&first) = names.get(svc.name.as_str()) {
                p.service(
                    i,
                    svc,
                    "name",
                    format!("duplicate name, already used by services[{first}]"),
                );
            } else {
                names.insert(&svc.name, i);
            }
            let external = svc.external.is_some();
            if let Some(&first) = vips.get(&(svc.vip, svc.protocol, external)) {
                p.service(
                    i,
                    svc,
                    "vip",
                    format!(
                        "{}/{}{} is already the vip of services[{first}] {:?}",
                        svc.vip,
                        svc.protocol,
                        if external { " (external)" } else { "" },
                        self.services[first].name
                    ),
                );
            } else {
                vips.insert((svc.vip, svc.protocol, external), i);
            }
        }
    }

    /// The whole config must fit in the maps sized by `[agent.limits]`.
    fn check_capacity(&self, total_slots: u64, p: &mut Problems) {
        let usage = Usage {
            services: self.services.len() as u64,
            // Backends are shared between services, so only distinct addresses take an entry.
            backends: self
                .services
                .iter()
                .flat_map(|s| s.backends.iter().map(|b| b.addr))
                .collect::<BTreeSet<_>>()
                .len() as u64,
            // Per-(service, backend) maps: a backend shared by services takes an entry in each.
            pairs: self
                .services
                .iter()
                .map(|s| distinct_backends(s).len() as u64)
                .sum::<u64>(),
            slots: total_slots,
        };
        self.agent.limits.check_usage(&usage, p);
    }
}

/// A VIP outside `[agent] vip_ranges` would let a registry writer take over an address the
/// node's processes really mean to reach.
fn check_vip_range(ranges: &[ipnet::IpNet], i: usize, svc: &ServiceConfig, p: &mut Problems) {
    if ranges.is_empty() || ranges.iter().any(|r| r.contains(&svc.vip.ip())) {
        return;
    }
    let listed = ranges
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    p.service(
        i,
        svc,
        "vip",
        format!("{} is outside [agent] vip_ranges ({listed})", svc.vip.ip()),
    );
}

/// What a set of services takes in the maps, as the capacity check counts it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub services: u64,
    /// Distinct backend addresses.
    pub backends: u64,
    /// (service, backend) pairs.
    pub pairs: u64,
    /// Round-robin slots.
    pub slots: u64,
}

/// A service's distinct backend addresses.
pub fn distinct_backends(svc: &ServiceConfig) -> BTreeSet<SocketAddr> {
    svc.backends.iter().map(|b| b.addr).collect()
}

/// The round-robin slots a service's weights need (weights out of range left out, as the
/// whole-config check does).
pub fn service_slots(svc: &ServiceConfig) -> u64 {
    u64::from(mesh_common::capacity::slot_count(&valid_weights(svc)))
}

impl AgentConfig {
    /// Whether `svc` passes every check that looks at it alone (its fields and
    /// `vip_ranges`); what it shares with other services (names, VIPs, capacity) is not
    /// looked at.
    pub fn service_is_valid(&self, svc: &ServiceConfig) -> bool {
        let mut p = Problems::default();
        svc.check(0, &mut p);
        check_vip_range(&self.vip_ranges, 0, svc, &mut p);
        p.0.is_empty()
    }
}

impl Limits {
    /// Whether the maps hold `usage`, also while it replaces another registry.
    pub fn holds(&self, usage: &Usage) -> bool {
        let mut p = Problems::default();
        self.check_usage(usage, &mut p);
        p.0.is_empty()
    }

    /// During an update the entries of the old state stay until the new ones are written (new
    /// ids are never an old one's), so every id space and map needs room for two registries.
    /// The full backend set gives a service's longest slot layout (a subset's gcd is a
    /// multiple of the full set's), so health changes never need more than this.
    fn check_usage(&self, usage: &Usage, p: &mut Problems) {
        // Id 0 is reserved in the services and backends maps, hence the +1.
        for (field, limit, what, count, reserved) in [
            (
                "agent.limits.max_services",
                self.max_services,
                "services",
                usage.services,
                1,
            ),
            (
                "agent.limits.max_backends",
                self.max_backends,
                "distinct backend addresses",
                usage.backends,
                1,
            ),
            (
                "agent.limits.max_service_backends",
                self.max_service_backends,
                "(service, backend) pairs",
                usage.pairs,
                0,
            ),
            (
                "agent.limits.max_slots",
                self.max_slots,
                "round-robin slots",
                usage.slots,
                0,
            ),
        ] {
            let needed = 2 * count + reserved;
            if needed > u64::from(limit) {
                let id = if reserved > 0 {
                    ", plus id 0 which is reserved"
                } else {
                    ""
                };
                p.agent(
                    field,
                    format!(
                        "is {limit} but the services have {count} {what}, which needs at least \
                         {needed} (old and new entries coexist during an update{id})"
                    ),
                );
            }
        }
    }
}

/// The weights that are in range, so the slot counts of the other checks stay meaningful when
/// some weight is already reported as wrong.
fn valid_weights(svc: &ServiceConfig) -> Vec<u32> {
    svc.backends
        .iter()
        .map(|b| b.weight)
        .filter(|w| (1..=MAX_WEIGHT).contains(w))
        .collect()
}

impl Limits {
    fn check(&self, p: &mut Problems) {
        for (field, value) in [
            ("agent.limits.max_services", self.max_services),
            ("agent.limits.max_backends", self.max_backends),
            (
                "agent.limits.max_service_backends",
                self.max_service_backends,
            ),
            ("agent.limits.max_slots", self.max_slots),
            ("agent.limits.max_external_flows", self.max_external_flows),
        ] {
            if let Some(reason) = u32_range(value, LIMIT_MIN, LIMIT_MAX) {
                p.agent(field, reason);
            }
        }
    }
}

impl ServiceConfig {
    fn check(&self, i: usize, p: &mut Problems) {
        self.check_name(i, p);
        if self.vip.port() == 0 {
            p.service(i, self, "vip", format!("{}: port must not be 0", self.vip));
        }
        if let Some(why) = bad_ip(self.vip.ip()) {
            p.service(i, self, "vip", format!("{} {why}", self.vip));
        }
        self.check_backends(i, p);
        if let Some(affinity) = &self.affinity {
            let t = affinity.timeout;
            if let Some(reason) =
                duration_range(t, Duration::from_secs(1), Duration::from_secs(24 * 3600))
            {
                p.service(i, self, "affinity.timeout", reason);
            } else if t.subsec_nanos() != 0 {
                // The kernel keeps the timeout in whole seconds.
                p.service(
                    i,
                    self,
                    "affinity.timeout",
                    format!("must be a whole number of seconds, got {}", fmt_duration(t)),
                );
            }
        }
        if let Some(health) = &self.health {
            health.check(i, self, p);
        }
        if self.external.is_some() {
            // The TC programs translate IPv4 only.
            if !self.vip.is_ipv4() {
                p.service(
                    i,
                    self,
                    "external",
                    format!(
                        "{} is IPv6; external services (traffic from other hosts) are IPv4 only",
                        self.vip
                    ),
                );
            }
        }
        if let Some(hc) = &self.health_check_node_port {
            if self.external != Some(ExternalPolicy::Local) {
                p.service(
                    i,
                    self,
                    "health_check_node_port",
                    "only external = \"local\" services have a health check node port".to_owned(),
                );
            }
            if hc.port == 0 {
                p.service(
                    i,
                    self,
                    "health_check_node_port.port",
                    "must not be 0".to_owned(),
                );
            }
        }
    }

    fn check_name(&self, i: usize, p: &mut Problems) {
        let name = &self.name;
        // One byte of the kernel's name buffer stays for the terminating zero.
        let max = SERVICE_NAME_LEN - 1;
        if name.is_empty() {
            p.service(i, self, "name", "must not be empty".to_owned());
        } else if name.len() > max {
            p.service(
                i,
                self,
                "name",
                format!("must be at most {max} bytes, got {}", name.len()),
            );
        }
        // Names appear in metrics labels, map dumps and URLs: keep them to a safe alphabet.
        let allowed =
            |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '/' | '-' | ':' | '@');
        if let Some(c) = name.chars().find(|&c| !allowed(c)) {
            p.service(
                i,
                self,
                "name",
                format!("may only contain A-Z a-z 0-9 . _ / - : @, got {c:?}"),
            );
        }
    }

    fn check_backends(&self, i: usize, p: &mut Problems) {
        let max_backends = MAX_BACKENDS_PER_SERVICE as usize;
        if self.backends.len() > max_backends {
            p.service(
                i,
                self,
                "backends",
                format!(
                    "at most {max_backends} backends per service, got {}",
                    self.backends.len()
                ),
            );
        }
        let mut seen: BTreeMap<SocketAddr, usize> = BTreeMap::new();
        for (j, b) in self.backends.iter().enumerate() {
            let field = format!("backends[{j}].addr");
            if b.addr.port() == 0 {
                p.service(i, self, &field, format!("{}: port must not be 0", b.addr));
            }
            if let Some(why) = bad_ip(b.addr.ip()) {
                p.service(i, self, &field, format!("{} {why}", b.addr));
            }
            // connect4 can only rewrite to an IPv4 address, connect6 to an IPv6 one.
            if b.addr.is_ipv4() != self.vip.is_ipv4() {
                p.service(
                    i,
                    self,
                    &field,
                    format!(
                        "{} is {} but the vip {} is {}; a backend must have the vip's address family",
                        b.addr,
                        family(&b.addr),
                        self.vip,
                        family(&self.vip)
                    ),
                );
            }
            if let Some(&first) = seen.get(&b.addr) {
                p.service(
                    i,
                    self,
                    &field,
                    format!("{} is already backends[{first}]", b.addr),
                );
            } else {
                seen.insert(b.addr, j);
            }
            if let Some(reason) = u32_range(b.weight, 1, MAX_WEIGHT) {
                p.service(i, self, &format!("backends[{j}].weight"), reason);
            }
        }
        let slot_count = mesh_common::capacity::slot_count(&valid_weights(self));
        if slot_count > MAX_SLOTS_PER_SERVICE {
            p.service(
                i,
                self,
                "backends",
                format!(
                    "the weights need {slot_count} slots (sum of weights divided by their gcd), at most {MAX_SLOTS_PER_SERVICE} are allowed per service"
                ),
            );
        }
    }
}

impl HealthConfig {
    fn check(&self, i: usize, svc: &ServiceConfig, p: &mut Problems) {
        let defaults = HealthConfig::default();
        if self.kind == HealthKind::Http {
            if !self.path.starts_with('/') {
                p.service(
                    i,
                    svc,
                    "health.path",
                    format!("must start with '/', got {:?}", self.path),
                );
            }
            // The path goes verbatim into the request line.
            if self
                .path
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
            {
                p.service(
                    i,
                    svc,
                    "health.path",
                    format!(
                        "must not contain whitespace or control characters, got {:?}",
                        self.path
                    ),
                );
            }
            self.check_expect(i, svc, p);
        } else {
            // Non-default http-only settings on another check type are almost surely a mistake.
            if self.path != defaults.path {
                p.service(
                    i,
                    svc,
                    "health.path",
                    format!(
                        "is only used with type = \"http\", not {:?}",
                        self.kind_name()
                    ),
                );
            }
            if self.expect != defaults.expect {
                p.service(
                    i,
                    svc,
                    "health.expect",
                    format!(
                        "is only used with type = \"http\", not {:?}",
                        self.kind_name()
                    ),
                );
            }
        }
        if let Some(reason) = duration_range(
            self.interval,
            Duration::from_millis(10),
            Duration::from_secs(3600),
        ) {
            p.service(i, svc, "health.interval", reason);
        }
        if self.timeout.is_zero() {
            p.service(
                i,
                svc,
                "health.timeout",
                "must be greater than 0".to_owned(),
            );
        } else if self.timeout > self.interval {
            p.service(
                i,
                svc,
                "health.timeout",
                format!(
                    "must be at most the interval ({}), got {}",
                    fmt_duration(self.interval),
                    fmt_duration(self.timeout)
                ),
            );
        }
        if let Some(reason) = u32_range(self.rise, 1, 100) {
            p.service(i, svc, "health.rise", reason);
        }
        if let Some(reason) = u32_range(self.fall, 1, 100) {
            p.service(i, svc, "health.fall", reason);
        }
        if let Some(reason) = u32_range(self.passive_failures, 0, 1000) {
            p.service(i, svc, "health.passive_failures", reason);
        }
    }

    fn check_expect(&self, i: usize, svc: &ServiceConfig, p: &mut Problems) {
        if self.expect.is_empty() {
            p.service(
                i,
                svc,
                "health.expect",
                "must list at least one status code".to_owned(),
            );
        }
        for &(lo, hi) in &self.expect {
            // A single code is stored as (code, code): report it once.
            let codes: &[u16] = if lo == hi { &[lo] } else { &[lo, hi] };
            for &code in codes {
                if !(100..=599).contains(&code) {
                    p.service(
                        i,
                        svc,
                        "health.expect",
                        format!("status codes must be between 100 and 599, got {code}"),
                    );
                }
            }
            if lo > hi {
                p.service(
                    i,
                    svc,
                    "health.expect",
                    format!("range {lo}-{hi} is reversed, write {hi}-{lo}"),
                );
            }
        }
    }

    fn kind_name(&self) -> &'static str {
        match self.kind {
            HealthKind::Tcp => "tcp",
            HealthKind::Http => "http",
            HealthKind::None => "none",
        }
    }
}
