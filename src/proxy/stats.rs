//! The data plane's process-wide counters, in one place: the accept loop, the forwarder
//! and the pipe pool add to them (one relaxed `fetch_add`, no lock); the metrics exporter
//! reads a [`Snapshot`] at scrape time. Per-service and per-backend counters live on
//! `table::ServiceState` and `table::Backend`, which outlive table generations.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters since the process started.
pub struct ProxyStats {
    /// Accepts that failed because descriptors or kernel memory ran out.
    pub accept_exhausted: AtomicU64,
    /// Bytes moved by splice.
    pub spliced_bytes: AtomicU64,
    /// Bytes moved by `recv` + `send` through the scratch buffer.
    pub copied_bytes: AtomicU64,
    /// Pipes created (a pool that works keeps this near the peak number of directions
    /// moving bytes at the same instant, not the number of connections).
    pub pipes_created: AtomicU64,
}

/// The process's counters.
pub static STATS: ProxyStats = ProxyStats {
    accept_exhausted: AtomicU64::new(0),
    spliced_bytes: AtomicU64::new(0),
    copied_bytes: AtomicU64::new(0),
    pipes_created: AtomicU64::new(0),
};

/// The counters' values at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub accept_exhausted: u64,
    pub spliced_bytes: u64,
    pub copied_bytes: u64,
    pub pipes_created: u64,
}

/// Reads every counter (each on its own: the snapshot is not one atomic instant, which a
/// scrape does not need).
pub fn snapshot() -> Snapshot {
    let s = &STATS;
    Snapshot {
        accept_exhausted: s.accept_exhausted.load(Ordering::Relaxed),
        spliced_bytes: s.spliced_bytes.load(Ordering::Relaxed),
        copied_bytes: s.copied_bytes.load(Ordering::Relaxed),
        pipes_created: s.pipes_created.load(Ordering::Relaxed),
    }
}
