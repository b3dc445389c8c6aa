//! What `loadgen` prints (one JSON object on stdout per run) and xtask reads back. This file is
//! compiled into both binaries (`#[path]` in `src/bin/loadgen.rs`), so the two cannot drift.

use serde::{Deserialize, Serialize};

/// Percentiles of a set of samples, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

/// Whole-machine CPU time from /proc/stat over the measured window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuWindow {
    /// user + nice + system + irq + softirq + steal, in clock ticks.
    pub busy_ticks: u64,
    /// busy + idle + iowait, in clock ticks (all CPUs).
    pub total_ticks: u64,
    /// `sysconf(_SC_CLK_TCK)`.
    pub ticks_per_sec: u64,
}

/// `loadgen crr`: connect, send 1 byte, read 1 byte, close (RST), in a loop per thread.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CrrResult {
    pub threads: usize,
    /// Connections that started and finished inside the measured window.
    pub conns: u64,
    pub window_secs: f64,
    pub conns_per_sec: f64,
    /// Failed connects or reads inside the window.
    pub errors: u64,
    /// connect() to the reply read and close: the whole transaction.
    pub latency_us: Percentiles,
    /// The connect() call alone (where a socket-level LB does its work).
    pub connect_us: Percentiles,
    /// Connections per backend id (the 1-byte reply names the backend).
    pub per_backend: Vec<u64>,
    pub cpu: CpuWindow,
}

/// `loadgen connects`: an exact number of sequential connect/1 byte/close transactions.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConnectsResult {
    /// Transactions that completed.
    pub conns: u64,
    /// Transactions that failed (connect or read).
    pub errors: u64,
    pub secs: f64,
    /// Completed transactions per backend id (the 1-byte reply names the backend).
    pub per_backend: Vec<u64>,
}

/// `loadgen rr`: 1-byte round trips on one established connection.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RrResult {
    pub round_trips: u64,
    pub latency_us: Percentiles,
}

/// `loadgen bulk`: each connection uploads its share; the backend confirms the byte count.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BulkResult {
    pub conns: usize,
    pub bytes: u64,
    pub secs: f64,
    /// 10^9 bytes per second.
    pub gbytes_per_sec: f64,
}
