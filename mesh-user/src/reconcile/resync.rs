//! The periodic resync off the control loop's thread. Reading every map back takes about 100 ms
//! at 10k services; done on the loop's thread, an edit arriving meanwhile waited for it. So the
//! read, and the diff against what the agent wrote, run on the `MapReader`'s thread, and the
//! loop keeps serving commands:
//!
//! - the loop takes the expected entries (its model) and hands them to the reader, which reads
//!   the maps and diffs;
//! - every write the loop makes meanwhile is kept; if there were none when the diff comes
//!   back, its repairs are exactly a blocking resync's and are written;
//! - if there were, the snapshot is brought up to date with them (`Snapshot::replay`) and
//!   diffed again against the model as it is now, on the reader again, a bounded number of
//!   times, then on the loop's thread (still without reading the maps again);
//! - if a write failed meanwhile (the model was re-read from the maps), the diff is discarded
//!   and the resync starts again at the next turn; after a bounded number of discards in a row
//!   one resync runs entirely on the loop's thread, so repairs never starve (at most
//!   `(MAX_REDIFFS + 1) * (MAX_DISCARDS + 1)` diffs per resync).

use std::collections::BTreeMap;

use crate::datapath::{MapOp, Pending, Snapshot};

/// Repairs by map.
pub type Repairs = BTreeMap<&'static str, u64>;

/// Diffs redone on the reader because writes came in meanwhile, before one is done on the
/// loop's thread.
pub const MAX_REDIFFS: u32 = 3;
/// Diffs discarded in a row (a write failed meanwhile) before one blocking resync.
pub const MAX_DISCARDS: u32 = 3;

/// The reader's answer: the repairs that make `snap` hold the expected entries, and `snap`
/// itself, for a diff again should writes have come in.
pub struct Diffed {
    pub ops: Vec<MapOp>,
    pub snap: Snapshot,
}

/// A diff the reader works on.
pub struct InFlight {
    pub pending: Pending<anyhow::Result<Diffed>>,
    /// The loop's writes since the expected entries of this diff were taken, in order.
    pub written: Vec<MapOp>,
    /// A write failed meanwhile: what the maps hold is not known from `written`.
    pub failed: bool,
}

impl InFlight {
    pub fn new(pending: Pending<anyhow::Result<Diffed>>) -> Self {
        Self {
            pending,
            written: Vec::new(),
            failed: false,
        }
    }

    /// Keeps what a write did: its ops if it succeeded, that it failed otherwise.
    pub fn record(&mut self, ops: &[MapOp], ok: bool) {
        if ok {
            self.written.extend_from_slice(ops);
        } else {
            self.failed = true;
        }
    }
}

/// What becomes of a diff the reader finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing was written since its expected entries were taken: write its repairs.
    Apply,
    /// Writes came in: replay them onto the snapshot and diff again on the reader.
    Rediff,
    /// Writes came in again and again: replay and diff on the loop's thread now.
    RediffHere,
    /// A write failed meanwhile: drop it, start again at the next turn.
    Discard,
    /// Discarded again and again: one resync on the loop's thread, reading the maps there.
    Blocking,
}

/// Counts rediffs and discards in a row, so neither can go on forever.
#[derive(Clone, Debug, Default)]
pub struct Gate {
    rediffs: u32,
    discards: u32,
}

impl Gate {
    /// The verdict on a finished diff: `written`: writes came in since its expected entries
    /// were taken; `failed`: one of them failed.
    pub fn arrived(&mut self, written: bool, failed: bool) -> Verdict {
        if failed {
            self.rediffs = 0;
            if self.discards >= MAX_DISCARDS {
                self.discards = 0;
                return Verdict::Blocking;
            }
            self.discards += 1;
            return Verdict::Discard;
        }
        if !written {
            *self = Self::default();
            return Verdict::Apply;
        }
        if self.rediffs >= MAX_REDIFFS {
            *self = Self::default();
            return Verdict::RediffHere;
        }
        self.rediffs += 1;
        Verdict::Rediff
    }

    /// A resync ended some other way (the read failed): start counting afresh.
    pub fn reset(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_diff_with_no_write_meanwhile_is_applied() {
        let mut gate = Gate::default();
        for _ in 0..10 {
            assert_eq!(gate.arrived(false, false), Verdict::Apply);
        }
    }

    #[test]
    fn writes_meanwhile_are_rediffed_a_bounded_number_of_times_then_on_the_loop() {
        let mut gate = Gate::default();
        let verdicts: Vec<Verdict> = (0..MAX_REDIFFS + 2)
            .map(|_| gate.arrived(true, false))
            .collect();
        let mut want = vec![Verdict::Rediff; MAX_REDIFFS as usize];
        want.extend([Verdict::RediffHere, Verdict::Rediff]);
        assert_eq!(verdicts, want);
    }

    #[test]
    fn failed_writes_are_discarded_a_bounded_number_of_times_then_one_blocking_resync() {
        let mut gate = Gate::default();
        let verdicts: Vec<Verdict> = (0..MAX_DISCARDS + 2)
            .map(|_| gate.arrived(true, true))
            .collect();
        let mut want = vec![Verdict::Discard; MAX_DISCARDS as usize];
        want.extend([Verdict::Blocking, Verdict::Discard]);
        assert_eq!(verdicts, want);
    }

    /// A resync that completes in between starts the counts afresh: only discards in a row
    /// lead to a blocking resync.
    #[test]
    fn a_completed_resync_resets_the_counts() {
        let mut gate = Gate::default();
        for _ in 0..MAX_DISCARDS {
            assert_eq!(gate.arrived(false, true), Verdict::Discard);
        }
        assert_eq!(gate.arrived(false, false), Verdict::Apply);
        assert_eq!(gate.arrived(false, true), Verdict::Discard);
        for _ in 0..MAX_REDIFFS {
            assert_eq!(gate.arrived(true, false), Verdict::Rediff);
        }
        gate.reset();
        assert_eq!(gate.arrived(true, false), Verdict::Rediff);
    }

    /// Repairs can never starve: whatever comes back, a resync completes (Apply, RediffHere
    /// or Blocking) within a bounded number of diffs. The longest run without one, over every
    /// sequence of outcomes.
    #[test]
    fn every_run_of_diffs_completes_within_a_bound() {
        fn longest(gate: &Gate) -> u32 {
            [(true, false), (true, true)]
                .iter()
                .map(|&(written, failed)| {
                    let mut next = gate.clone();
                    match next.arrived(written, failed) {
                        Verdict::Rediff | Verdict::Discard => 1 + longest(&next),
                        _ => 0,
                    }
                })
                .max()
                .unwrap_or(0)
        }
        let bound = (MAX_REDIFFS + 1) * (MAX_DISCARDS + 1) - 1;
        assert_eq!(longest(&Gate::default()), bound);
    }

    #[test]
    fn a_write_is_recorded_in_order_and_a_failure_spoils_the_diff() {
        let (_tx, rx) = std::sync::mpsc::channel();
        let mut flight = InFlight::new(crate::datapath::Pending::from_receiver(rx));
        flight.record(&[MapOp::DeleteBackend { id: 1 }], true);
        flight.record(&[MapOp::DeleteBackend { id: 2 }], true);
        assert_eq!(
            flight.written,
            [
                MapOp::DeleteBackend { id: 1 },
                MapOp::DeleteBackend { id: 2 }
            ]
        );
        assert!(!flight.failed);
        flight.record(&[MapOp::DeleteBackend { id: 3 }], false);
        assert!(flight.failed);
    }
}
