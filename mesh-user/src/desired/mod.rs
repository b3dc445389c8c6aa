//! Desired state: what the data path should hold, built from the registry sources and health.
//! Pure data; no I/O.

use std::{collections::BTreeMap, net::SocketAddr};

use mesh_common::{SVC_F_AFFINITY, SVC_F_PASSIVE, SVC_F_REJECT_EMPTY, nodeport::SVC_F_EXT_LOCAL};

pub mod slots;

#[cfg(test)]
use crate::config::Config;

use crate::{
    config::{AllUnhealthy, EmptyPolicy, ExternalPolicy, HealthKind, ServiceConfig},
    health::Health,
    model::Vip,
};

/// A backend as a member of one service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub addr: SocketAddr,
    pub weight: u32,
    /// Receives new connections: not draining and not ejected by health checks.
    pub active: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredService {
    pub name: String,
    /// `SVC_F_*` bits.
    pub flags: u32,
    pub affinity_timeout_secs: u32,
    /// Every configured backend, in registry order (inactive ones keep their counters).
    pub members: Vec<Member>,
    /// UDP: terminate connected sockets pointed at a backend that leaves.
    pub terminate_udp_flows: bool,
}

impl DesiredService {
    /// The weighted round-robin sequence over the active members.
    pub fn slot_layout(&self) -> Vec<SocketAddr> {
        let active: Vec<&Member> = self.members.iter().filter(|m| m.active).collect();
        let weights: Vec<u32> = active.iter().map(|m| m.weight).collect();
        slots::layout(&weights)
            .into_iter()
            .map(|i| active[i].addr)
            .collect()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub services: BTreeMap<Vip, DesiredService>,
}

impl DesiredState {
    #[cfg(test)]
    /// The state the registry asks for, with every non-draining backend active. Health checks
    /// then deactivate members (see `health`).
    pub fn from_config(config: &Config) -> Self {
        let services = config
            .services
            .iter()
            .map(|svc| (svc.vip(), desired_service(svc)))
            .collect();
        Self { services }
    }
}

fn desired_service(svc: &ServiceConfig) -> DesiredService {
    let mut flags = 0;
    if svc.on_empty == EmptyPolicy::Reject {
        flags |= SVC_F_REJECT_EMPTY;
    }
    if svc
        .health
        .as_ref()
        .is_some_and(|h| h.kind != HealthKind::None && h.passive_failures > 0)
    {
        flags |= SVC_F_PASSIVE;
    }
    if svc.external == Some(ExternalPolicy::Local) {
        flags |= SVC_F_EXT_LOCAL;
    }
    let mut affinity_timeout_secs = 0;
    if let Some(affinity) = &svc.affinity {
        flags |= SVC_F_AFFINITY;
        affinity_timeout_secs = u32::try_from(affinity.timeout.as_secs()).unwrap_or(u32::MAX);
    }
    DesiredService {
        name: svc.name.clone(),
        flags,
        affinity_timeout_secs,
        members: svc
            .backends
            .iter()
            .map(|b| Member {
                addr: b.addr,
                weight: b.weight,
                active: !b.drain,
            })
            .collect(),
        terminate_udp_flows: svc.terminate_udp_flows,
    }
}

/// One service as the data path should hold it: the registry's view with health applied.
pub fn desired_with_health(
    svc: &ServiceConfig,
    health: impl Fn(&Vip, &SocketAddr) -> Health,
) -> DesiredService {
    let mut want = desired_service(svc);
    service_health(&mut want, svc, health);
    want
}

#[cfg(test)]
/// Takes backends that are not known healthy out of rotation. When every candidate of a
/// service has failed its checks, `all_unhealthy` decides: fail-open keeps all non-draining
/// backends, fail-closed leaves none. Backends without a result yet (just added, or the agent
/// just started with nothing adopted) never trigger fail-open: they wait for their first check.
pub fn apply_health(
    desired: &mut DesiredState,
    config: &Config,
    health: impl Fn(&Vip, &SocketAddr) -> Health,
) {
    for svc in &config.services {
        if let Some(want) = desired.services.get_mut(&svc.vip()) {
            service_health(want, svc, &health);
        }
    }
}

fn service_health(
    want: &mut DesiredService,
    svc: &ServiceConfig,
    health: impl Fn(&Vip, &SocketAddr) -> Health,
) {
    let Some(check) = svc.health.as_ref().filter(|h| h.kind != HealthKind::None) else {
        return;
    };
    let vip = svc.vip();
    let states: Vec<Option<Health>> = want
        .members
        .iter()
        .map(|m| m.active.then(|| health(&vip, &m.addr)))
        .collect();
    let candidates: Vec<Health> = states.iter().flatten().copied().collect();
    let all_failing = !candidates.is_empty() && candidates.iter().all(|&h| h == Health::Unhealthy);
    if all_failing && check.all_unhealthy == AllUnhealthy::FailOpen {
        return;
    }
    for (member, state) in want.members.iter_mut().zip(states) {
        member.active = state == Some(Health::Healthy);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    const TWO_CHECKED: &str = r#"
[[services]]
name = "web"
vip = "127.100.0.1:80"
[services.health]
type = "tcp"
[[services.backends]]
addr = "127.0.0.1:1"
[[services.backends]]
addr = "127.0.0.1:2"
"#;

    fn active(desired: &DesiredState) -> Vec<bool> {
        desired
            .services
            .values()
            .next()
            .unwrap()
            .members
            .iter()
            .map(|m| m.active)
            .collect()
    }

    #[test]
    fn unhealthy_backend_leaves_the_rotation() {
        let config = config::parse(TWO_CHECKED, "test").unwrap();
        let mut desired = DesiredState::from_config(&config);
        apply_health(&mut desired, &config, |_, addr| {
            if addr.port() == 1 {
                Health::Healthy
            } else {
                Health::Unhealthy
            }
        });
        assert_eq!(active(&desired), vec![true, false]);
    }

    #[test]
    fn new_backend_without_a_result_gets_no_traffic() {
        let config = config::parse(TWO_CHECKED, "test").unwrap();
        let mut desired = DesiredState::from_config(&config);
        apply_health(&mut desired, &config, |_, addr| {
            if addr.port() == 1 {
                Health::Healthy
            } else {
                Health::Unknown
            }
        });
        assert_eq!(active(&desired), vec![true, false]);
    }

    #[test]
    fn all_unhealthy_fails_open_by_default_and_closed_when_asked() {
        let config = config::parse(TWO_CHECKED, "test").unwrap();
        let mut desired = DesiredState::from_config(&config);
        apply_health(&mut desired, &config, |_, _| Health::Unhealthy);
        assert_eq!(active(&desired), vec![true, true]);

        let closed = TWO_CHECKED.replace(
            "type = \"tcp\"",
            "type = \"tcp\"\nall_unhealthy = \"fail-closed\"",
        );
        let config = config::parse(&closed, "test").unwrap();
        let mut desired = DesiredState::from_config(&config);
        apply_health(&mut desired, &config, |_, _| Health::Unhealthy);
        assert_eq!(active(&desired), vec![false, false]);
    }

    #[test]
    fn backends_without_a_result_never_fail_open() {
        let config = config::parse(TWO_CHECKED, "test").unwrap();
        let mut desired = DesiredState::from_config(&config);
        apply_health(&mut desired, &config, |_, addr| {
            if addr.port() == 1 {
                Health::Unhealthy
            } else {
                Health::Unknown
            }
        });
        assert_eq!(active(&desired), vec![false, false]);
    }

    #[test]
    fn draining_backend_stays_out_even_when_failing_open() {
        let drained = TWO_CHECKED.replace(
            "addr = \"127.0.0.1:2\"",
            "addr = \"127.0.0.1:2\"\ndrain = true",
        );
        let config = config::parse(&drained, "test").unwrap();
        let mut desired = DesiredState::from_config(&config);
        apply_health(&mut desired, &config, |_, _| Health::Unhealthy);
        assert_eq!(active(&desired), vec![true, false]);
    }
}
