//! The switches the agent sets for the programs (`SETTINGS`, index 0).

use mesh_common::{SETTINGS_F_ORIGINAL_DST, SETTINGS_F_TELEMETRY};

use crate::maps::SETTINGS;

#[inline(always)]
fn flags() -> u32 {
    SETTINGS.get(0).map_or(0, |s| s.flags)
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
