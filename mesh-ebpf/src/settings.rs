//! The agent's switches for the programs (`[agent] telemetry`, `original_dst`): a read-only
//! global the agent sets at load. Settings change only when an agent starts, and every start
//! loads the programs again and swaps them into the pinned links. The verifier reads a frozen
//! read-only global as a known constant, so what a switch turns off is pruned before the
//! program first runs, and a connect reads no map for them.

use mesh_common::{SETTINGS_F_ORIGINAL_DST, SETTINGS_F_TELEMETRY};

/// `SETTINGS_F_*` bits.
#[unsafe(no_mangle)]
static SETTINGS_FLAGS: u32 = 0;

#[inline(always)]
fn flags() -> u32 {
    // SAFETY: a read of a static; volatile so the compiler keeps the load the loader patches.
    unsafe { core::ptr::read_volatile(&raw const SETTINGS_FLAGS) }
}

/// Per-backend bytes and RTT of closed TCP connections are recorded.
#[inline(always)]
pub fn telemetry_on() -> bool {
    flags() & SETTINGS_F_TELEMETRY != 0
}

/// TCP translations go to socket storage, where getsockopt(SO_ORIGINAL_DST) can read them.
#[inline(always)]
pub fn original_dst_on() -> bool {
    flags() & SETTINGS_F_ORIGINAL_DST != 0
}
