//! How connections the load balancer made turn out (sock_ops): failed connects feed passive
//! health detection; closed connections feed the bytes and RTT telemetry.

use aya_ebpf::{
    bindings::{
        BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
    },
    helpers::bpf_get_socket_cookie,
    programs::SockOpsContext,
};
use aya_log_ebpf::debug;
use mesh_common::{BackendStatsKey, PassiveState, closed_flags, rtt_bucket, tcp_state};

use crate::EEXIST;
use crate::maps::{BACKEND_STATS, PASSIVE};
use crate::reverse::{Translation, forget_tcp_peer, set_state_cb, translation};
use crate::settings::telemetry_on;
use crate::stats::count;

#[inline(always)]
pub fn tcp_outcome(ctx: &SockOpsContext) {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB
        && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
        && op != BPF_SOCK_OPS_STATE_CB
    {
        return;
    }
    // SAFETY: the kernel hands a valid context; `sk` is checked for null where it is read.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    // SAFETY: the helper only reads the valid context's socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    let Some(Translation { key, observe }) = translation(cookie, sk) else {
        return;
    };
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        // Ask for state changes of this connection only, and only when someone reads them.
        if observe
            && ctx
                .set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32)
                .is_ok()
        {
            set_state_cb(cookie, true);
        }
    } else if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        if let Some(state) = PASSIVE.get_ptr_mut(key) {
            // SAFETY: a valid value of the map; a racing failure count is overwritten, as a
            // success after it would do anyway.
            unsafe { (*state).consecutive_failures = 0 };
        }
        // The connect succeeded: without telemetry no later state matters, so the connection
        // costs no more callbacks.
        if observe
            && !telemetry_on()
            && ctx
                .set_cb_flags((ctx.cb_flags() & !BPF_SOCK_OPS_STATE_CB_FLAG) as i32)
                .is_ok()
        {
            set_state_cb(cookie, false);
        }
    } else if ctx.arg(1) == tcp_state::CLOSE {
        if ctx.arg(0) == tcp_state::SYN_SENT {
            connect_failed(&key);
            debug!(
                ctx,
                "connect to backend {} of service {} failed", key.backend_id, key.service_id
            );
        } else if telemetry_on() {
            // SAFETY: the kernel hands a valid context.
            let ops = unsafe { &*ctx.ops };
            let (flags_acked, fin_received) = closed_flags(ctx.arg(0));
            // srtt_us holds 8 times the smoothed RTT, as in tcp_sock.
            record_close(
                &key,
                ops.bytes_acked.saturating_sub(flags_acked),
                ops.bytes_received.saturating_sub(fin_received),
                u64::from(ops.srtt_us >> 3),
            );
        }
        // The last callback of this socket's connection (a reconnect makes a new entry).
        forget_tcp_peer(cookie);
    }
}

/// A failed connect: counted for the backend, and one more consecutive failure in `PASSIVE`,
/// for members of the service only.
#[inline(always)]
fn connect_failed(key: &BackendStatsKey) {
    // The agent creates the counter before a backend enters any slot and deletes it when the
    // pair leaves: no counter, no member, no passive entry (one would never be removed).
    let Some(stats) = BACKEND_STATS.get_ptr_mut(key) else {
        return;
    };
    // SAFETY: a valid per-CPU value of this CPU.
    unsafe { (*stats).connect_failures += 1 };
    if add_failure(key) {
        return;
    }
    let first = PassiveState {
        consecutive_failures: 1,
        _pad: 0,
    };
    match PASSIVE.insert(key, first, BPF_NOEXIST.into()) {
        Ok(()) => {
            // The agent deletes the counter first and the passive entry after it. If the pair
            // left since the lookup above, its entry may already have been deleted: remove
            // the one just made.
            if BACKEND_STATS.get_ptr(key).is_none() {
                let _ = PASSIVE.remove(key);
            }
        }
        // Another CPU recorded its first failure in between: add to that.
        Err(e) if e == -EEXIST => {
            add_failure(key);
        }
        Err(_) => count(|s| s.passive_full += 1),
    }
}

/// One more failure on an existing `PASSIVE` entry; false if there is none.
#[inline(always)]
fn add_failure(key: &BackendStatsKey) -> bool {
    let Some(state) = PASSIVE.get_ptr_mut(key) else {
        return false;
    };
    // SAFETY: a valid value of the shared map; the add is atomic (other CPUs count too).
    unsafe {
        core::intrinsics::atomic_xadd::<u32, u32, { core::intrinsics::AtomicOrdering::SeqCst }>(
            &raw mut (*state).consecutive_failures,
            1,
        );
    }
    true
}

#[inline(always)]
fn record_close(key: &BackendStatsKey, sent: u64, received: u64, rtt_us: u64) {
    let Some(stats) = BACKEND_STATS.get_ptr_mut(key) else {
        return;
    };
    // SAFETY: a valid per-CPU value of this CPU.
    let stats = unsafe { &mut *stats };
    stats.bytes_sent += sent;
    stats.bytes_received += received;
    stats.rtt_samples += 1;
    stats.rtt_sum_us += rtt_us;
    if let Some(count) = stats.rtt_buckets.get_mut(rtt_bucket(rtt_us)) {
        *count += 1;
    }
}
