//! The writes the data path knows how to make: the vocabulary the reconciler plans in. Each op
//! is idempotent (a put writes the same value again, a delete of a missing key succeeds), so a
//! failed batch can be retried from the start.

use std::net::SocketAddr;

use mesh_common::{AffinityKey, BackendStatsKey, Service, SlotKey};

use crate::model::Vip;

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
        backends: Vec<u32>,
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
        backend_id: u32,
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
