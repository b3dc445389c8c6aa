//! Session affinity of external services (`sessionAffinity: ClientIP`): a client, known here
//! by its IPv4 address, keeps the backend it got first while that backend takes new
//! connections and the entry has not timed out. Entries live in the shared `AFFINITY` map
//! under the external service's own id; the client's address takes the place of the
//! network-namespace cookie (and the cgroup id is 0), so they never meet a socket-level entry.

use mesh_common::{AffinityKey, Backend, Service, ServiceKey};

use crate::maps::EXT_SERVICES;
use crate::service::pick_with_affinity;

/// The backend `client` used last, while it is still active and the entry has not timed out;
/// otherwise a round-robin pick, remembered for next time. 0: no backend.
#[inline(always)]
pub fn pick(skey: &ServiceKey, service: &Service, client: [u8; 4], backend: &mut Backend) -> u32 {
    let key = AffinityKey {
        service_id: service.id,
        _pad: 0,
        netns_cookie: u64::from(u32::from_be_bytes(client)),
        cgroup_id: 0,
    };
    pick_with_affinity(&EXT_SERVICES, skey, service, key, backend)
}
