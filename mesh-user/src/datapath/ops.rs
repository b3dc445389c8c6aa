//! The writes the data path knows how to make: the vocabulary the reconciler plans in. Each op
//! is idempotent (a put writes the same value again, a delete of a missing key succeeds), so a
//! failed batch can be retried from the start.

use std::net::SocketAddr;

use mesh_common::{AffinityKey, BackendStatsKey, Service, SlotKey};

use crate::model::Vip;

/// What a slot holds: a backend's id and a copy of its address, which a connect reads from
/// the slot instead of looking the id up in `backends`. An id keeps its address while in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotBackend {
    pub id: u32,
    pub addr: SocketAddr,
}

/// One write to the maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapOp {
    PutBackend {
        id: u32,
        addr: SocketAddr,
    },
    DeleteBackend {
        id: u32,
    },
    /// Creates the (service, backend) counter, which the maps lack: planned only for pairs the
    /// agent's model of the maps does not hold (one by one it never resets an existing one;
    /// in a batch it cannot tell, see `Maps::counter_batch`).
    CreateCounter(BackendStatsKey),
    /// Deletes the pair's counter and its passive-detection state: the pair left the service.
    DeleteCounter(BackendStatsKey),
    /// Zeroes a service id's per-service counters and round-robin position before the id is
    /// given to a new service.
    ResetService {
        service_id: u32,
    },
    /// Writes slots `0..backends.len()` of one generation.
    PutSlots {
        service_id: u32,
        generation: u32,
        backends: Vec<SlotBackend>,
    },
    /// Deletes slots `0..count` of one generation.
    DeleteSlots {
        service_id: u32,
        generation: u32,
        count: u32,
    },
    /// One slot (repairs).
    PutSlot {
        key: SlotKey,
        backend: SlotBackend,
    },
    DeleteSlot(SlotKey),
    PutName {
        service_id: u32,
        name: String,
    },
    DeleteName {
        service_id: u32,
    },
    PutService {
        vip: Vip,
        service: Service,
    },
    DeleteService {
        vip: Vip,
    },
    /// Marks a backend as taking new connections for a service (read by session affinity).
    PutActive {
        key: BackendStatsKey,
        slots: u32,
    },
    DeleteActive(BackendStatsKey),
    /// Passive-detection state of a pair that is not a member (a leak).
    DeletePassive(BackendStatsKey),
    /// Affinity of a client to a service or backend that is gone.
    DeleteAffinity(AffinityKey),
}

impl MapOp {
    /// Which kind of write this is, as a rank: ops of one kind next to each other go to the
    /// kernel as one batch.
    pub fn kind(&self) -> u8 {
        match self {
            MapOp::PutBackend { .. } => 0,
            MapOp::DeleteBackend { .. } => 1,
            MapOp::CreateCounter(_) => 2,
            MapOp::DeleteCounter(_) => 3,
            MapOp::ResetService { .. } => 4,
            MapOp::PutSlots { .. } => 5,
            MapOp::DeleteSlots { .. } => 6,
            MapOp::PutSlot { .. } => 7,
            MapOp::DeleteSlot(_) => 8,
            MapOp::PutName { .. } => 9,
            MapOp::DeleteName { .. } => 10,
            MapOp::PutService { .. } => 11,
            MapOp::DeleteService { .. } => 12,
            MapOp::PutActive { .. } => 13,
            MapOp::DeleteActive(_) => 14,
            MapOp::DeletePassive(_) => 15,
            MapOp::DeleteAffinity(_) => 16,
        }
    }

    /// A put of an entry the kernel finds only through entries written after it (a slot or a
    /// service entry names it), or never reads (names): the order of such puts among
    /// themselves does not matter to the data path, so runs of them may be written at once.
    pub fn is_reached_through_later_writes(&self) -> bool {
        matches!(
            self,
            MapOp::PutBackend { .. }
                | MapOp::CreateCounter(_)
                | MapOp::ResetService { .. }
                | MapOp::PutActive { .. }
                | MapOp::PutName { .. }
        )
    }

    /// The map this op writes, for logs and repair counts.
    pub fn map(&self) -> &'static str {
        match self {
            MapOp::PutBackend { .. } | MapOp::DeleteBackend { .. } => "backends",
            MapOp::CreateCounter(_) | MapOp::DeleteCounter(_) => "backend_stats",
            MapOp::ResetService { .. } => "rr_state",
            MapOp::PutSlots { .. }
            | MapOp::DeleteSlots { .. }
            | MapOp::PutSlot { .. }
            | MapOp::DeleteSlot(_) => "slots",
            MapOp::PutName { .. } | MapOp::DeleteName { .. } => "service_names",
            MapOp::PutService { vip, .. } | MapOp::DeleteService { vip } if vip.external => {
                "ext_services"
            }
            MapOp::PutService { .. } | MapOp::DeleteService { .. } => "services",
            MapOp::PutActive { .. } | MapOp::DeleteActive(_) => "active",
            MapOp::DeletePassive(_) => "passive",
            MapOp::DeleteAffinity(_) => "affinity",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> BackendStatsKey {
        BackendStatsKey {
            service_id: 1,
            backend_id: 2,
        }
    }

    /// Only puts the kernel cannot reach before a later slot or service write may be written
    /// concurrently: what connects read first (slots, service entries) and every delete keep
    /// their order.
    #[test]
    fn only_puts_behind_later_writes_may_be_reordered() {
        let vip = Vip {
            addr: "127.1.0.1:80".parse().unwrap(),
            proto: mesh_common::PROTO_TCP,
            external: false,
        };
        let slot = SlotKey {
            service_id: 1,
            generation: 0,
            slot: 0,
        };
        let backend = SlotBackend {
            id: 2,
            addr: "127.0.0.1:8080".parse().unwrap(),
        };
        let reorderable = [
            MapOp::PutBackend {
                id: backend.id,
                addr: backend.addr,
            },
            MapOp::CreateCounter(pair()),
            MapOp::ResetService { service_id: 1 },
            MapOp::PutActive {
                key: pair(),
                slots: 1,
            },
            MapOp::PutName {
                service_id: 1,
                name: "web".into(),
            },
        ];
        let ordered = [
            MapOp::DeleteBackend { id: 2 },
            MapOp::DeleteCounter(pair()),
            MapOp::PutSlots {
                service_id: 1,
                generation: 0,
                backends: vec![backend],
            },
            MapOp::DeleteSlots {
                service_id: 1,
                generation: 0,
                count: 1,
            },
            MapOp::PutSlot { key: slot, backend },
            MapOp::DeleteSlot(slot),
            MapOp::DeleteName { service_id: 1 },
            MapOp::PutService {
                vip,
                service: Service::default(),
            },
            MapOp::DeleteService { vip },
            MapOp::DeleteActive(pair()),
            MapOp::DeletePassive(pair()),
            MapOp::DeleteAffinity(AffinityKey::default()),
        ];
        assert_eq!(
            reorderable.len() + ordered.len(),
            17,
            "every kind is listed"
        );
        for op in &reorderable {
            assert!(op.is_reached_through_later_writes(), "{op:?}");
        }
        for op in &ordered {
            assert!(!op.is_reached_through_later_writes(), "{op:?}");
        }
    }
}
