//! The status snapshot: everything the admin API, the status page and `/metrics` show —
//! every service and every backend, draining ones included (the routing table holds only
//! eligible backends). Published by the control plane with each table, read wait-free.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwap;

use crate::config::ServiceConfig;
use crate::metrics::{BackendMetrics, ServiceMetrics};
use crate::table::slots::Slots;
use crate::table::{Backend, ServiceState};

#[derive(Debug, Default)]
pub struct Status {
    pub generation: u64,
    /// By service slot (`None`: a free slot; `iter().flatten()` gives the services). Shared
    /// chunk by chunk with the last snapshot: a plan rewrites only the entries of the
    /// services that changed, and a status published without a new table (a counter
    /// changed) shares them all.
    pub services: Slots<Option<Arc<ServiceStatus>>>,
    pub reloads_ok: u64,
    pub reloads_err: u64,
    pub last_reload: Option<ReloadResult>,
    /// Failed discovery polls per provider.
    pub discovery_errors: Vec<(&'static str, u64)>,
    /// The SNI listeners' counters of connections no service took.
    pub sni: Vec<Arc<crate::table::sni::SniStats>>,
}

#[derive(Debug, Clone)]
pub struct ReloadResult {
    pub at: SystemTime,
    /// `None`: the reload was applied. `Some(line)`: rejected, with the one-line reason.
    pub error: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ServiceStatus {
    pub state: Arc<ServiceState>,
    pub config: Arc<ServiceConfig>,
    pub metrics: Arc<ServiceMetrics>,
    pub listeners: Vec<SocketAddr>,
    pub backends: Vec<BackendStatus>,
    /// Backends that may take a new connection now.
    pub eligible: usize,
}

#[derive(Debug, Clone)]
pub struct BackendStatus {
    pub backend: Arc<Backend>,
    pub metrics: Arc<BackendMetrics>,
    /// Configured (or discovered) weight.
    pub weight: u32,
    /// The operator's weight, if set through the admin API.
    pub weight_override: Option<u32>,
    /// The weight in the current table (slow start applied); 0 when not eligible.
    pub effective_weight: u32,
    /// Where it came from: "static", "dns", "docker" (joined with '+').
    pub sources: &'static str,
    /// Set while draining: when it started and when survivors get closed.
    pub drain: Option<(Instant, Instant)>,
    /// Ends of the slow-start ramp, while ramping.
    pub slow_start_until: Option<Instant>,
    pub ejected: bool,
    /// It runs on this node (for the service's `locality`).
    pub local: bool,
}

pub type StatusHandle = Arc<ArcSwap<Status>>;
