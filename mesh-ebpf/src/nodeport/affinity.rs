//! Session affinity of external services (`sessionAffinity: ClientIP`): a client, known here
//! by its IPv4 address, keeps the backend it got first while that backend takes new
//! connections and the entry has not timed out. Entries live in the shared `AFFINITY` map
//! under the external service's own id; the client's address takes the place of the
//! network-namespace cookie (and the cgroup id is 0), so they never meet a socket-level entry.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use mesh_common::{AffinityKey, AffinityValue, Backend, BackendStatsKey, Service, ServiceKey};

use crate::maps::{ACTIVE, AFFINITY, BACKENDS, EXT_SERVICES};
use crate::service::pick_round_robin;
use crate::stats::count as count_datapath;

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
    // SAFETY: no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let timeout_ns = u64::from(service.affinity_timeout_secs) * 1_000_000_000;
    if let Some(entry) = AFFINITY.get_ptr_mut(key) {
        // SAFETY: a valid value of the LRU map; concurrent updates of the timestamp race
        // harmlessly (both write "now").
        let entry = unsafe { &mut *entry };
        let member = BackendStatsKey {
            service_id: service.id,
            backend_id: entry.backend_id,
        };
        if now.wrapping_sub(entry.last_used_ns) < timeout_ns
            && ACTIVE.get_ptr(member).is_some()
            && let Some(found) = unsafe { BACKENDS.get(entry.backend_id) }
        {
            entry.last_used_ns = now;
            *backend = *found;
            return entry.backend_id;
        }
    }
    let backend_id = pick_round_robin(&EXT_SERVICES, skey, service, backend);
    if backend_id == 0 {
        return 0;
    }
    let value = AffinityValue {
        backend_id,
        _pad: 0,
        last_used_ns: now,
    };
    if AFFINITY.insert(key, value, 0).is_err() {
        count_datapath(|s| s.affinity_full += 1);
    }
    backend_id
}
