//! The routing table: an immutable snapshot of every service and its eligible backends,
//! published through an `ArcSwap` so the accept path reads it with one wait-free `load()`.
//!
//! ```text
//! control plane ──build()──► RoutingTable (generation N) ──store()──► TableHandle
//!                                                                        │ load()
//!                                   accept loop / connection task ◄──────┘
//! ```
//!
//! Invariant: nothing here does I/O or takes a lock. `build` is a pure function of its inputs
//! (the backends' atomics aside); the control plane is the only caller of `store`.

pub mod backend;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::balance::Selector;
use crate::config::ServiceConfig;
pub use backend::{Backend, ConnectError, Health, State};

/// Per-service state that outlives table generations: identity is the service name.
#[derive(Debug)]
pub struct ServiceState {
    pub name: Arc<str>,
    /// Index of this service in `RoutingTable::services`, fixed for the service's life.
    pub slot: usize,
    /// Live connections of the service (for `max_connections`).
    pub active: AtomicU64,
    pub rejected_no_backend: AtomicU64,
    pub rejected_max_connections: AtomicU64,
    /// Connects retried on another backend after a failure.
    pub retries: AtomicU64,
    /// Seconds a connection lived; registered once, recorded per closed connection.
    pub conn_duration: metrics::Histogram,
    /// Seconds a successful connect took.
    pub connect_duration: metrics::Histogram,
}

impl ServiceState {
    pub fn new(name: Arc<str>, slot: usize) -> ServiceState {
        let labels = [("service", name.to_string())];
        ServiceState {
            conn_duration: metrics::histogram!(crate::metrics::CONNECTION_DURATION, &labels),
            connect_duration: metrics::histogram!(crate::metrics::CONNECT_DURATION, &labels),
            name,
            slot,
            active: AtomicU64::new(0),
            rejected_no_backend: AtomicU64::new(0),
            rejected_max_connections: AtomicU64::new(0),
            retries: AtomicU64::new(0),
        }
    }
}

/// One service in one table generation.
#[derive(Debug)]
pub struct ServiceTable {
    pub state: Arc<ServiceState>,
    pub config: Arc<ServiceConfig>,
    /// The backends that may take new connections, index-aligned with `selector`.
    pub backends: Vec<Arc<Backend>>,
    pub selector: Selector,
}

/// A backend offered to `build`, with the weight it should get in this generation
/// (operator override and slow-start ramp already applied).
#[derive(Debug, Clone)]
pub struct Candidate {
    pub backend: Arc<Backend>,
    pub weight: u32,
}

impl ServiceTable {
    /// Builds one service's snapshot: keeps the candidates that are active, healthy and
    /// weighted, and builds the selector over them. Pure: no I/O, no lock.
    pub fn build(
        state: Arc<ServiceState>,
        config: Arc<ServiceConfig>,
        candidates: &[Candidate],
    ) -> ServiceTable {
        let eligible: Vec<&Candidate> = candidates
            .iter()
            .filter(|c| {
                c.weight > 0
                    && c.backend.state() == State::Active
                    && c.backend.health() == Health::Up
            })
            .collect();
        let weights: Vec<_> = eligible
            .iter()
            .map(|c| (c.backend.addr, c.weight))
            .collect();
        let selector = Selector::build(config.balance, &weights);
        ServiceTable {
            state,
            config,
            backends: eligible.iter().map(|c| c.backend.clone()).collect(),
            selector,
        }
    }
}

/// The whole snapshot.
#[derive(Debug, Default)]
pub struct RoutingTable {
    /// Increases by one with every published table.
    pub generation: u64,
    /// Indexed by `ServiceState::slot`; `None` for a free slot.
    pub services: Vec<Option<Arc<ServiceTable>>>,
}

impl RoutingTable {
    /// The service in `slot`, if it is still the service `state` names.
    #[inline]
    pub fn service(&self, state: &Arc<ServiceState>) -> Option<&Arc<ServiceTable>> {
        match self.services.get(state.slot) {
            Some(Some(s)) if Arc::ptr_eq(&s.state, state) => Some(s),
            _ => None,
        }
    }
}

/// The published table. Cloning shares it.
#[derive(Debug, Clone, Default)]
pub struct TableHandle {
    inner: Arc<ArcSwap<RoutingTable>>,
    /// Generation of the last stored table (0: none stored yet).
    stored: Arc<AtomicU64>,
}

impl TableHandle {
    pub fn new() -> TableHandle {
        TableHandle::default()
    }

    /// Wait-free read of the current table (the accept path's only table access).
    #[inline]
    pub fn load(&self) -> arc_swap::Guard<Arc<RoutingTable>> {
        self.inner.load()
    }

    /// Publishes `table`; in-flight readers keep the generation they loaded.
    pub fn store(&self, table: RoutingTable) {
        let generation = table.generation;
        self.inner.store(Arc::new(table));
        self.stored.store(generation, Ordering::Release);
    }

    pub fn generation(&self) -> u64 {
        self.stored.load(Ordering::Acquire)
    }
}
