//! What the pinned maps can hold, derived from the agent's `[agent.limits]` in one place: the
//! agent sizes the maps from this table and validates every registry against it, so a registry
//! that validation accepts always fits (nothing is found full half-way through writing it).

use crate::{
    DEFAULT_MAX_AFFINITY, DEFAULT_MAX_TCP_PEERS, DEFAULT_MAX_UDP_FLOWS, map_names,
    nodeport::MAX_NODEPORT_DEVICES,
};

/// Default `max_service_backends`: (service, backend) pairs, old and new during an update.
pub const DEFAULT_MAX_SERVICE_BACKENDS: u32 = 524_288;

/// The limits an operator sets (`[agent.limits]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Services (ids 1..max_services; 0 is reserved).
    pub max_services: u32,
    /// Distinct backend addresses (ids 1..max_backends; 0 is reserved).
    pub max_backends: u32,
    /// (service, backend) pairs: a backend shared by two services is two pairs.
    pub max_service_backends: u32,
    /// Round-robin slots of all services, counting the live and the previous generation.
    pub max_slots: u32,
    /// Flows from other hosts translated at once by the TC programs (each is two `nat_flows`
    /// entries: the client's direction and the replies').
    pub max_external_flows: u32,
}

/// What each map holds and how many entries it has room for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapCapacity {
    /// Map name as declared in the eBPF object (`map_names`).
    pub map: &'static str,
    /// `max_entries` the map is created with.
    pub max_entries: u32,
    /// What one entry is, for the README table and error messages.
    pub entry: &'static str,
    /// Sized from the limits (true) or fixed at compile time (false).
    pub from_limits: bool,
}

impl Limits {
    /// Every map with a capacity (socket storage has none: it lives with its socket).
    pub fn table(&self) -> [MapCapacity; 20] {
        let sized = |map, max_entries, entry| MapCapacity {
            map,
            max_entries,
            entry,
            from_limits: true,
        };
        let fixed = |map, max_entries, entry| MapCapacity {
            map,
            max_entries,
            entry,
            from_limits: false,
        };
        [
            sized(map_names::SERVICES, self.max_services, "service (VIP)"),
            // External services share the id space (and rr_state, slots, ...) of the others.
            sized(
                map_names::EXT_SERVICES,
                self.max_services,
                "external service (address)",
            ),
            sized(
                map_names::NAT_FLOWS,
                self.max_external_flows.saturating_mul(2),
                "direction of a flow from another host, LRU",
            ),
            sized(map_names::RR_STATE, self.max_services, "service id"),
            sized(map_names::SERVICE_STATS, self.max_services, "service id"),
            sized(map_names::SERVICE_NAMES, self.max_services, "service id"),
            sized(map_names::BACKENDS, self.max_backends, "backend address"),
            sized(
                map_names::SLOTS,
                self.max_slots,
                "slot (live + previous generation)",
            ),
            sized(
                map_names::BACKEND_STATS,
                self.max_service_backends,
                "(service, backend) pair",
            ),
            sized(
                map_names::ACTIVE,
                self.max_service_backends,
                "(service, backend) pair",
            ),
            sized(
                map_names::PASSIVE,
                self.max_service_backends,
                "(service, backend) pair",
            ),
            fixed(
                map_names::AFFINITY,
                DEFAULT_MAX_AFFINITY,
                "(service, client), LRU",
            ),
            fixed(
                map_names::UDP_FLOWS,
                DEFAULT_MAX_UDP_FLOWS,
                "connected UDP socket",
            ),
            fixed(
                map_names::TCP_PEERS,
                DEFAULT_MAX_TCP_PEERS,
                "TCP socket connected through a VIP (beyond: socket storage)",
            ),
            fixed(map_names::DATAPATH_STATS, 1, "node-wide counters"),
            fixed(map_names::SETTINGS, 1, "agent settings"),
            fixed(
                map_names::NP_DEVICES,
                MAX_NODEPORT_DEVICES,
                "external device",
            ),
            fixed(map_names::NP_STATS, 1, "node-wide TC counters"),
            // Created and deleted with the pair's `backend_stats` entry.
            sized(
                map_names::NP_BACKEND_STATS,
                self.max_service_backends,
                "(service, backend) pair",
            ),
            fixed(map_names::NP_EVENTS, 1, "TC ICMP rate limit and counters"),
        ]
    }

    /// `max_entries` of `map`, if it has a capacity.
    pub fn capacity_of(&self, map: &str) -> Option<u32> {
        self.table()
            .iter()
            .find(|c| c.map == map)
            .map(|c| c.max_entries)
    }
}

/// Greatest common divisor; `gcd(0, x) == x`, so zero weights do not affect the reduction.
pub const fn gcd(mut a: u32, mut b: u32) -> u32 {
    while b != 0 {
        let r = a % b;
        a = b;
        b = r;
    }
    a
}

/// Number of slots a service with these weights takes: their sum divided by their gcd.
/// Saturates at `u32::MAX`. Any subset of the weights (backends out of rotation) takes at most
/// as many: the subset's gcd is a multiple of the whole set's.
pub fn slot_count(weights: &[u32]) -> u32 {
    let g = weights.iter().fold(0, |g, &w| gcd(g, w));
    if g == 0 {
        return 0;
    }
    let sum: u64 = weights.iter().map(|&w| u64::from(w / g)).sum();
    u32::try_from(sum).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_count_reduces_by_the_gcd() {
        assert_eq!(slot_count(&[]), 0);
        assert_eq!(slot_count(&[0, 0]), 0);
        assert_eq!(slot_count(&[2, 4, 6]), 6);
        assert_eq!(slot_count(&[1, 2, 3]), 6);
        assert_eq!(slot_count(&[1000, 1000]), 2);
        assert_eq!(slot_count(&[7]), 1);
    }

    #[test]
    fn a_subset_never_needs_more_slots_than_the_whole_set() {
        let weights = [6u32, 4, 9, 12, 1000, 3];
        let full = slot_count(&weights);
        for mask in 0u32..(1 << weights.len()) {
            let subset: [u32; 6] =
                core::array::from_fn(|i| if mask & (1 << i) != 0 { weights[i] } else { 0 });
            assert!(slot_count(&subset) <= full, "mask {mask:b}");
        }
    }

    #[test]
    fn every_pair_map_is_sized_by_pairs() {
        let limits = Limits {
            max_services: 10,
            max_backends: 20,
            max_service_backends: 30,
            max_slots: 40,
            max_external_flows: 50,
        };
        for map in [
            map_names::BACKEND_STATS,
            map_names::ACTIVE,
            map_names::PASSIVE,
        ] {
            assert_eq!(limits.capacity_of(map), Some(30), "{map}");
        }
        assert_eq!(limits.capacity_of(map_names::BACKENDS), Some(20));
        assert_eq!(limits.capacity_of(map_names::SLOTS), Some(40));
        assert_eq!(limits.capacity_of(map_names::SERVICES), Some(10));
        assert_eq!(limits.capacity_of(map_names::EXT_SERVICES), Some(10));
        assert_eq!(limits.capacity_of(map_names::NAT_FLOWS), Some(100));
    }
}
