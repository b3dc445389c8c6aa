//! The control loop's heartbeat: `/healthz` fails when the loop stops turning, `/readyz` waits
//! for its first full apply.

use std::{
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

/// When the control loop last finished a turn, and whether it has applied a first state.
#[derive(Debug)]
pub struct Heartbeat {
    started: Instant,
    last_ms: AtomicU64,
    ready: AtomicBool,
}

impl Heartbeat {
    pub fn new() -> Self {
        Self {
            started: Instant::now(),
            last_ms: AtomicU64::new(0),
            ready: AtomicBool::new(false),
        }
    }

    pub fn beat(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Time since the loop last finished a turn.
    pub fn age(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }

    /// Marks the first full apply done; true the first time.
    pub fn set_ready(&self) -> bool {
        !self.ready.swap(true, Ordering::Relaxed)
    }

    /// The first full apply is done (`/readyz`).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

impl Default for Heartbeat {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_beat_resets_the_age_and_ready_is_set_once() {
        let heartbeat = Heartbeat::new();
        std::thread::sleep(Duration::from_millis(20));
        assert!(heartbeat.age() >= Duration::from_millis(20));
        heartbeat.beat();
        assert!(heartbeat.age() < Duration::from_millis(20));
        assert!(!heartbeat.is_ready());
        assert!(heartbeat.set_ready());
        assert!(!heartbeat.set_ready());
        assert!(heartbeat.is_ready());
    }
}
