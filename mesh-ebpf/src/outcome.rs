//! How connections the load balancer made turned out, read from the TCP socket itself when it
//! is released: a connect that never completed feeds passive health detection; a completed one
//! resets it and feeds the bytes and RTT telemetry.
//!
//! Nothing runs for a connection between its connect() and its release: no sock_ops program is
//! attached, so TCP sockets of the cgroup cost no callbacks at all (a sock_ops program would
//! run at least five times for every one of them, translated or not).

use aya_ebpf::{bindings::BPF_NOEXIST, programs::SockContext};
use aya_log_ebpf::debug;
use mesh_common::{
    BackendStats, BackendStatsKey, PassiveState, RTT_BUCKETS, TcpCounters, TcpSockFields,
    peer_fin_possible, released_payload, rtt_bucket,
};

use crate::EEXIST;
use crate::maps::{BACKEND_STATS, PASSIVE};
use crate::settings::telemetry_on;
use crate::stats::{add, count};

/// Offsets of the fields read, in this kernel's `struct tcp_sock`: set by the agent from the
/// kernel's BTF at load (a read-only global; all 0 means not set).
#[unsafe(no_mangle)]
static TCP_SOCK_FIELDS: TcpSockFields = TcpSockFields {
    sk_flags: 0,
    sock_done_bit: 0,
    write_seq: 0,
    snd_una: 0,
    srtt_us: 0,
    bytes_received: 0,
    bytes_acked: 0,
    sk_cookie: 0,
};

#[inline(always)]
fn fields() -> TcpSockFields {
    // SAFETY: a read of a static; volatile so the compiler keeps the load the loader patches.
    unsafe { core::ptr::read_volatile(&raw const TCP_SOCK_FIELDS) }
}

/// The TCP socket's cookie as it stands, without creating one; None if its offset is not
/// known. 0 means nobody ever asked for it, so the socket was certainly never translated (a
/// translated TCP connect always does): one load for every TCP socket of the cgroup that mesh
/// has nothing to do with, instead of creating a cookie and looking it up.
#[inline(always)]
pub fn current_cookie(tcp: *const u8) -> Option<u64> {
    let offset = fields().sk_cookie;
    if offset == 0 {
        return None;
    }
    Some(load::<u64>(tcp, offset))
}

/// A translated TCP socket is released: record how its connection went.
#[inline(always)]
pub fn tcp_released(ctx: &SockContext, tcp: *const u8, key: &BackendStatsKey) {
    // SAFETY: the kernel hands a valid socket to sock_release programs.
    let state = unsafe { (*ctx.sock).state };
    let fields = fields();
    if fields.bytes_acked == 0 {
        return;
    }
    match released_payload(&read_counters(tcp, state, &fields)) {
        None => {
            connect_failed(key);
            debug!(
                ctx,
                "connect to backend {} of service {} failed", key.backend_id, key.service_id
            );
        }
        Some((sent, received)) => {
            // No counter: the pair left the service, and its passive entry with it.
            let Some(stats) = BACKEND_STATS.get_ptr_mut(key) else {
                return;
            };
            connect_succeeded(key, stats);
            if telemetry_on() {
                let srtt = load::<u32>(tcp, fields.srtt_us);
                // srtt_us holds 8 times the smoothed RTT.
                record_close(stats, sent, received, u64::from(srtt >> 3));
            }
        }
    }
}

#[inline(always)]
fn read_counters(tcp: *const u8, state: u32, f: &TcpSockFields) -> TcpCounters {
    let bytes_acked = load::<u64>(tcp, f.bytes_acked);
    if bytes_acked == 0 {
        // The connect never completed: nothing else matters.
        return TcpCounters {
            state,
            ..TcpCounters::default()
        };
    }
    let fin_received = if peer_fin_possible(state) {
        let sk_flags = load::<u64>(tcp, f.sk_flags);
        (sk_flags >> (f.sock_done_bit & 63)) & 1 != 0
    } else {
        false
    };
    TcpCounters {
        state,
        fin_received,
        write_seq: load::<u32>(tcp, f.write_seq),
        snd_una: load::<u32>(tcp, f.snd_una),
        bytes_acked,
        bytes_received: load::<u64>(tcp, f.bytes_received),
    }
}

/// The field at `offset` of the socket's `struct tcp_sock` (`kfunc::tcp_sock`). The offset is
/// a constant to the verifier (a frozen read-only global), which checks the load against the
/// kernel's BTF; a fault reads 0.
#[inline(always)]
fn load<T>(tcp: *const u8, offset: u32) -> T {
    // SAFETY: `tcp` is the BTF pointer of the released socket and `offset` lies inside its
    // `struct tcp_sock` (the agent took it from this kernel's BTF). Volatile: one load of
    // exactly this field, which is what the verifier accepts.
    unsafe { core::ptr::read_volatile(tcp.wrapping_add(offset as usize).cast::<T>()) }
}

/// A completed connect ends the backend's run of consecutive failures. A pair that never
/// failed has no `PASSIVE` entry (`connect_failed` counts in `stats` before it makes one), so
/// its counters, which the release reads anyway, spare the lookup of a missing entry.
#[inline(always)]
fn connect_succeeded(key: &BackendStatsKey, stats: *mut BackendStats) {
    // SAFETY: a field of a valid value of the map.
    if unsafe { (*stats).connect_failures } == 0 {
        return;
    }
    if let Some(state) = PASSIVE.get_ptr_mut(key) {
        // SAFETY: a valid value of the map; a racing failure count is overwritten, as a
        // success after it would do anyway.
        unsafe { (*state).consecutive_failures = 0 };
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
    // SAFETY: a field of a valid value of the map.
    unsafe { add(&raw mut (*stats).connect_failures, 1) };
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
fn record_close(stats: *mut BackendStats, sent: u64, received: u64, rtt_us: u64) {
    // SAFETY: fields of a valid value of the map; no reference to it is made, other CPUs add
    // to the same value.
    unsafe {
        add(&raw mut (*stats).bytes_sent, sent);
        add(&raw mut (*stats).bytes_received, received);
        add(&raw mut (*stats).rtt_samples, 1);
        add(&raw mut (*stats).rtt_sum_us, rtt_us);
        let bucket = rtt_bucket(rtt_us);
        if bucket < RTT_BUCKETS {
            add((&raw mut (*stats).rtt_buckets).cast::<u64>().add(bucket), 1);
        }
    }
}
