//! Metric names (DESIGN.md's table, one constant each), their HELP texts, the Prometheus
//! exporter, and the scrape-time copy of counters.
//!
//! How a number reaches Prometheus without costing the connection path anything:
//! - Connections bump plain atomics in `Backend`/`ServiceState` (no registry call, no label).
//! - Per-backend metric handles are registered once, when the control plane first sees the
//!   backend (`BackendMetrics::new`), and at scrape time `sync` copies each atomic into its
//!   handle. Only the two histograms are recorded per connection, through per-service
//!   handles registered when the service appears.
//! - Series of a backend that is gone stop being touched and the exporter drops them after
//!   `SERIES_IDLE` (or `MESHD_SERIES_IDLE`; counters and gauges only), so label sets stay
//!   bounded under churn.
//!
//! No label ever carries a client address.
//!
//! `names.rs` holds the names (a leaf anyone may import); `export.rs` the exporter.

pub mod export;
pub mod names;

pub use export::{install, sync_process, upkeep, BackendMetrics, ServiceMetrics, SERIES_IDLE};
pub use names::*;
