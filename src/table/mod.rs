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
pub mod outlier;
pub mod slots;
pub mod sni;

use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::balance::Selector;
use crate::config::{Locality, ServiceConfig};
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
    /// Connections from an `accept_proxy` source closed for a bad or missing PROXY header.
    pub rejected_proxy_header: AtomicU64,
    /// Connects retried on another backend after a failure.
    pub retries: AtomicU64,
    /// Ejections refused because the backend was the service's last usable one (counted
    /// once per failure streak).
    pub ejections_spared: AtomicU64,
    /// Backends ejected by passive outlier detection (counted by the control plane).
    pub ejections: AtomicU64,
    /// Connections served by a backend outside the eligible set because none was left
    /// (panic routing: ejected, then failing health checks, then draining).
    pub panic_connections: AtomicU64,
    /// Second connects started because the first had not completed after `hedge_delay`.
    pub hedged_connects: AtomicU64,
    /// Connections replayed on another backend after an early close (`retry_on_early_close`).
    pub replays: AtomicU64,
    /// Connections that no backend took at first and waited for one (`queue_timeout`).
    pub queued: AtomicU64,
    /// `[service.tls]` connections routed here by their server name, and as the default.
    pub tls_routed: [AtomicU64; 2],
    /// `mode = "terminate"`: handshakes that failed after routing, by [`TlsFailure`]
    /// (a terminating service's `tls_routed` counts completed handshakes).
    pub tls_failed: [AtomicU64; 3],
    /// A UDP service's flows and dropped datagrams (zero for a TCP service).
    pub udp: UdpStats,
    /// Seconds a connection lived; registered once, recorded per closed connection.
    pub conn_duration: metrics::Histogram,
    /// Seconds a successful connect took.
    pub connect_duration: metrics::Histogram,
}

impl ServiceState {
    pub fn new(name: Arc<str>, slot: usize) -> ServiceState {
        let labels = [("service", name.to_string())];
        ServiceState {
            conn_duration: metrics::histogram!(crate::metrics::names::CONNECTION_DURATION, &labels),
            connect_duration: metrics::histogram!(crate::metrics::names::CONNECT_DURATION, &labels),
            name,
            slot,
            active: AtomicU64::new(0),
            rejected_no_backend: AtomicU64::new(0),
            rejected_max_connections: AtomicU64::new(0),
            rejected_proxy_header: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            ejections_spared: AtomicU64::new(0),
            ejections: AtomicU64::new(0),
            panic_connections: AtomicU64::new(0),
            hedged_connects: AtomicU64::new(0),
            replays: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            tls_routed: [AtomicU64::new(0), AtomicU64::new(0)],
            tls_failed: [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)],
            udp: UdpStats::default(),
        }
    }
}

/// Why a terminating service's handshake failed (indexes `ServiceState::tls_failed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFailure {
    /// rustls refused it (no common version, cipher suite or ALPN protocol, a bad
    /// message): its alert was sent.
    Error = 0,
    /// Not complete within `client_hello_timeout` from accept.
    Timeout = 1,
    /// The client closed or reset first.
    Closed = 2,
}

impl TlsFailure {
    /// The `result` label of each, in index order.
    pub const LABELS: [&'static str; 3] = ["error", "timeout", "closed"];
}

/// Counters of a `protocol = "udp"` service, kept by its listener tasks (atomics: the
/// exporter reads them at scrape time).
#[derive(Debug, Default)]
pub struct UdpStats {
    /// Set by the control plane while the service is a UDP one: its UDP series exist.
    pub enabled: std::sync::atomic::AtomicBool,
    /// Flows open now.
    pub flows: AtomicU64,
    /// Flows opened.
    pub flows_total: AtomicU64,
    /// Datagrams that would have opened a flow past `max_flows`.
    pub dropped_max_flows: AtomicU64,
    /// Datagrams that would have opened a flow while no backend was usable.
    pub dropped_no_backend: AtomicU64,
    /// Datagrams a send could not take (socket buffer full, a local error) either way.
    pub dropped_send: AtomicU64,
    /// Datagrams longer than the 64 KiB receive buffer (cut short by the kernel).
    pub dropped_truncated: AtomicU64,
    /// Flows a backend refused (ICMP port unreachable) and that moved to another backend.
    pub moved: AtomicU64,
}

/// One service in one table generation.
#[derive(Debug)]
pub struct ServiceTable {
    pub state: Arc<ServiceState>,
    pub config: Arc<ServiceConfig>,
    /// The backends that may take new connections, index-aligned with `selector`.
    pub backends: Vec<Arc<Backend>>,
    /// Their weights in this generation (what `selector` was built from), index-aligned.
    pub weights: Box<[u32]>,
    /// Shared with the previous generation's table when the algorithm and the (address,
    /// weight) list are unchanged: only services whose backends changed pay for a build.
    pub selector: Arc<Selector>,
    /// The service's other listed backends (not eligible when the table was built: failing
    /// or awaiting health checks, draining, ejected), for panic routing only: when no
    /// eligible backend is left, a connection tries these before it is refused.
    pub fallback: Vec<Arc<Backend>>,
}

/// Panic routing's order of preference (see [`ServiceTable::panic_candidate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PanicClass {
    /// Usable but left out of the eligible set: another node's backend under
    /// `prefer_local` (it takes what this node's backends could not), or one that became
    /// healthy after the table was built.
    Usable,
    /// Active and healthy, but ejected by passive outlier detection.
    Ejected,
    /// Active, but failing (or not yet passing) health checks.
    Unhealthy,
    /// Draining: no longer listed, but possibly still answering (a stopping task).
    Draining,
}

impl PanicClass {
    pub const ALL: [PanicClass; 4] = [
        PanicClass::Usable,
        PanicClass::Ejected,
        PanicClass::Unhealthy,
        PanicClass::Draining,
    ];

    /// The class `b` is in now; `None` for a gone one (never tried).
    pub fn of(b: &Backend) -> Option<PanicClass> {
        match b.state() {
            State::Gone => None,
            State::Draining => Some(PanicClass::Draining),
            State::Active if b.health() != Health::Up => Some(PanicClass::Unhealthy),
            State::Active if b.is_ejected() => Some(PanicClass::Ejected),
            State::Active => Some(PanicClass::Usable),
        }
    }
}

/// A backend offered to `build`, with the weight it should get in this generation
/// (operator override and slow-start ramp already applied).
#[derive(Debug, Clone)]
pub struct Candidate {
    pub backend: Arc<Backend>,
    pub weight: u32,
    /// It runs on this node (for the service's `locality`).
    pub local: bool,
}

/// What passive outlier detection did with a backend that failed too many connects in a
/// row (see [`ServiceTable::eject`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ejection {
    /// Ejected now: the control plane must schedule its re-admission.
    Ejected,
    /// Not ejected: it is the service's last usable backend (Envoy's "panic" rule), or
    /// `max_ejection_percent` of its backends are ejected already. The first refusal of a
    /// failure streak is reported to the control plane (logged).
    SparedFirst,
    /// Not ejected, already reported in this streak; or it was ejected already.
    Nothing,
}

/// One service's next table, split in two so the expensive half can run off the runtime
/// thread: [`ServiceTable::prepare`] picks the eligible backends (it reads their atomics
/// and decides whether the previous selector can be reused: cheap), [`Prepared::finish`]
/// builds the selector if one is needed (a Maglev build takes milliseconds).
#[derive(Debug)]
pub struct Prepared(PreparedKind);

#[derive(Debug)]
enum PreparedKind {
    /// Nothing a connection could see changed: the previous table as it is.
    Same(Arc<ServiceTable>),
    New {
        state: Arc<ServiceState>,
        config: Arc<ServiceConfig>,
        backends: Vec<Arc<Backend>>,
        weights: Box<[u32]>,
        /// `None`: must be built.
        selector: Option<Arc<Selector>>,
        fallback: Vec<Arc<Backend>>,
    },
}

impl Prepared {
    /// The previous table, kept as it is (its service did not change).
    pub fn unchanged(table: Arc<ServiceTable>) -> Prepared {
        Prepared(PreparedKind::Same(table))
    }

    /// Whether [`finish`](Prepared::finish) builds a selector (the costly part).
    pub fn needs_build(&self) -> bool {
        matches!(self.0, PreparedKind::New { selector: None, .. })
    }

    /// The table: the previous one, or a new one around the reused or a new selector.
    pub fn finish(self) -> Arc<ServiceTable> {
        match self.0 {
            PreparedKind::Same(t) => t,
            PreparedKind::New {
                state,
                config,
                backends,
                weights,
                selector,
                fallback,
            } => Arc::new(ServiceTable::assemble(
                state, config, backends, weights, selector, fallback,
            )),
        }
    }
}

impl ServiceTable {
    /// Builds one service's snapshot: keeps the candidates that are active, healthy and
    /// weighted, and builds the selector over them. Pure: no I/O, no lock.
    pub fn build(
        state: Arc<ServiceState>,
        config: Arc<ServiceConfig>,
        candidates: &[Candidate],
    ) -> ServiceTable {
        let (backends, weights, fallback) = eligible(config.locality, candidates);
        ServiceTable::assemble(state, config, backends, weights, None, fallback)
    }

    /// A table around `selector`, or a selector built now over `backends` and `weights`.
    fn assemble(
        state: Arc<ServiceState>,
        config: Arc<ServiceConfig>,
        backends: Vec<Arc<Backend>>,
        weights: Box<[u32]>,
        selector: Option<Arc<Selector>>,
        fallback: Vec<Arc<Backend>>,
    ) -> ServiceTable {
        let selector = selector.unwrap_or_else(|| {
            let list: Vec<_> = backends
                .iter()
                .zip(weights.iter())
                .map(|(b, &w)| (b.addr, w))
                .collect();
            Arc::new(Selector::build(config.balance, &list))
        });
        ServiceTable {
            state,
            config,
            backends,
            weights,
            selector,
            fallback,
        }
    }

    /// The first, cheap half of a build: the eligible candidates (active, healthy,
    /// weighted), and the previous table's selector when the algorithm and every eligible
    /// (address, weight) are unchanged — or the previous table itself when the backends
    /// and config are the very same too. Pure: no I/O, no lock.
    pub fn prepare(
        state: Arc<ServiceState>,
        config: Arc<ServiceConfig>,
        candidates: &[Candidate],
        previous: Option<&Arc<ServiceTable>>,
    ) -> Prepared {
        let (backends, weights, fallback) = eligible(config.locality, candidates);
        let selector = previous
            .filter(|p| {
                p.selector.algorithm() == config.balance
                    && *p.weights == *weights
                    && p.backends.len() == backends.len()
                    && p.backends
                        .iter()
                        .zip(&backends)
                        .all(|(a, b)| a.addr == b.addr)
            })
            .map(|p| p.selector.clone());
        if let (Some(p), Some(_)) = (previous, &selector) {
            if Arc::ptr_eq(&p.state, &state)
                && Arc::ptr_eq(&p.config, &config)
                && p.backends
                    .iter()
                    .zip(&backends)
                    .all(|(a, b)| Arc::ptr_eq(a, b))
                && p.fallback.len() == fallback.len()
                && p.fallback
                    .iter()
                    .zip(&fallback)
                    .all(|(a, b)| Arc::ptr_eq(a, b))
            {
                return Prepared(PreparedKind::Same(p.clone()));
            }
        }
        Prepared(PreparedKind::New {
            state,
            config,
            backends,
            weights,
            selector,
            fallback,
        })
    }

    /// Passive outlier detection: backend `i` failed too many connects in a row. Ejects it
    /// (every pick skips it) unless no other backend of this table is usable: the last
    /// usable backend is never ejected, since ejecting it would turn every connection away
    /// while it may still answer some (Envoy's "panic" rule). Atomics only; O(n) in the
    /// worst case, and only on a failed connect.
    ///
    /// Two threads may eject the last two usable backends at the same instant, each seeing
    /// the other still usable. So an ejection is made first and checked after: each thread
    /// sets its flag, then (past a SeqCst fence) looks for another usable backend again and
    /// takes its ejection back if there is none. With the fences, of two such threads at
    /// least one sees the other's flag (store, fence, load on both sides), so at least one
    /// backend stays usable; both may take theirs back, which only delays an ejection.
    pub fn eject(&self, i: usize) -> Ejection {
        let Some(b) = self.backends.get(i) else {
            return Ejection::Nothing;
        };
        if b.is_ejected() {
            return Ejection::Nothing;
        }
        if self.another_usable(i) {
            if !self.ejection_allowed() {
                // Capacity first (`max_ejection_percent`): reported once per streak, like
                // the last usable backend below.
                return if b.mark_eject_spared() {
                    Ejection::SparedFirst
                } else {
                    Ejection::Nothing
                };
            }
            if b.set_ejected(true) {
                return Ejection::Nothing;
            }
            fence(Ordering::SeqCst);
            if self.another_usable(i) {
                return Ejection::Ejected;
            }
            b.set_ejected(false);
        }
        if b.mark_eject_spared() {
            self.state.ejections_spared.fetch_add(1, Ordering::Relaxed);
            Ejection::SparedFirst
        } else {
            Ejection::Nothing
        }
    }

    /// `max_ejection_percent`: one more ejection keeps the ejected share of the backends
    /// within it (one ejection is always allowed with two or more backends, as in Envoy,
    /// unless the percentage is 0). Two threads ejecting at once may both pass: the bound
    /// can be exceeded by one for a moment, never the last-usable rule below.
    fn ejection_allowed(&self) -> bool {
        let pct = u64::from(self.config.max_ejection_percent);
        if pct == 0 {
            return false;
        }
        let n = self.backends.len() as u64;
        let ejected = self.backends.iter().filter(|b| b.is_ejected()).count() as u64;
        ejected == 0 || (ejected + 1) * 100 <= pct * n
    }

    /// Backend `k` of the combined index space of panic routing: `backends`, then
    /// `fallback`.
    #[inline]
    pub fn listed(&self, k: usize) -> Option<&Arc<Backend>> {
        match k.checked_sub(self.backends.len()) {
            None => self.backends.get(k),
            Some(f) => self.fallback.get(f),
        }
    }

    /// Panic routing: the first listed backend, in [`PanicClass`] order, that `skip` does
    /// not exclude, as an index into [`listed`](ServiceTable::listed). Called only when no
    /// eligible backend is left; O(n), atomics only.
    pub fn panic_candidate(&self, skip: impl Fn(usize) -> bool) -> Option<usize> {
        let n = self.backends.len() + self.fallback.len();
        let eligible = self.backends.len();
        PanicClass::ALL.into_iter().find_map(|class| {
            (0..n).find(|&k| {
                // A usable eligible backend is the selector's to pick, not panic routing's.
                let first = if class == PanicClass::Usable {
                    eligible
                } else {
                    0
                };
                k >= first
                    && !skip(k)
                    && self.listed(k).and_then(|b| PanicClass::of(b)) == Some(class)
            })
        })
    }

    fn another_usable(&self, i: usize) -> bool {
        let n = self.backends.len();
        (1..n).any(|k| self.backends[(i + k) % n].is_usable())
    }
}

/// Eligible backends, their weights, and the panic-routing fallback.
type Split = (Vec<Arc<Backend>>, Box<[u32]>, Vec<Arc<Backend>>);

/// The candidates that may take connections (active, healthy, weighted) and their weights;
/// and the rest that panic routing may try (every other one not gone, except an active one
/// an operator weighted 0).
///
/// `locality` narrows the first set to this node's candidates: always with `local_only`
/// (the others are left out entirely, even from panic routing), and with `prefer_local`
/// while at least one of this node's active candidates is healthy and no fewer than half
/// of them are (the others then wait in the fallback, tried first when every local one
/// fails; otherwise every candidate is eligible). O(n), decided each time the table is
/// built (a health change rebuilds it), never per connection.
fn eligible(locality: Locality, candidates: &[Candidate]) -> Split {
    let takes = |c: &Candidate| {
        c.weight > 0 && c.backend.state() == State::Active && c.backend.health() == Health::Up
    };
    let local_only = match locality {
        Locality::Any => false,
        Locality::LocalOnly => true,
        Locality::PreferLocal => {
            let (mut listed, mut healthy) = (0usize, 0usize);
            for c in candidates.iter().filter(|c| c.local) {
                if c.backend.state() == State::Active {
                    listed += 1;
                    healthy += usize::from(takes(c));
                }
            }
            healthy > 0 && healthy * 2 >= listed
        }
    };
    let mut backends = Vec::with_capacity(candidates.len());
    let mut weights = Vec::with_capacity(candidates.len());
    let mut fallback = Vec::new();
    for c in candidates {
        let state = c.backend.state();
        if local_only && !c.local {
            if locality == Locality::PreferLocal
                && (state == State::Draining || (state == State::Active && c.weight > 0))
            {
                fallback.push(c.backend.clone());
            }
            continue;
        }
        if takes(c) {
            backends.push(c.backend.clone());
            weights.push(c.weight);
        } else if state == State::Draining || (state == State::Active && c.weight > 0) {
            fallback.push(c.backend.clone());
        }
    }
    (backends, weights.into_boxed_slice(), fallback)
}

/// The whole snapshot.
#[derive(Debug, Default)]
pub struct RoutingTable {
    /// Increases by one with every published table.
    pub generation: u64,
    /// Indexed by `ServiceState::slot`; `None` for a free slot. The next generation shares
    /// every chunk of slots it does not change (`slots`).
    pub services: slots::Slots<Option<Arc<ServiceTable>>>,
    /// The routes of each listen address shared by `[service.tls]` services (a few: the
    /// accept loop finds its own by a scan).
    pub sni: Vec<Arc<sni::SniRoutes>>,
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

    /// The SNI routes of listen address `addr`.
    #[inline]
    pub fn sni(&self, addr: std::net::SocketAddr) -> Option<&Arc<sni::SniRoutes>> {
        self.sni.iter().find(|r| r.addr == addr)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Balance, Config};

    fn config(balance: Balance) -> Arc<ServiceConfig> {
        config_with(balance, 50)
    }

    fn config_with(balance: Balance, max_ejection_percent: u32) -> Arc<ServiceConfig> {
        let text = "[[service]]\nname = \"web\"\nlisten = [\"127.0.0.1:8080\"]\nbackends = [{ addr = \"127.0.0.1:9001\" }]\n";
        let mut cfg = Config::parse(std::path::Path::new("t.toml"), text)
            .expect("valid config")
            .services
            .remove(0);
        cfg.balance = balance;
        cfg.max_ejection_percent = max_ejection_percent;
        Arc::new(cfg)
    }

    fn candidates(weights: &[u32]) -> Vec<Candidate> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| Candidate {
                backend: Arc::new(Backend::new(
                    "web".into(),
                    SocketAddr::from(([127, 0, 0, 1], 9000 + i as u16)),
                    Health::Up,
                )),
                weight,
                local: false,
            })
            .collect()
    }

    use std::net::SocketAddr;

    #[test]
    fn unchanged_inputs_reuse_the_table_or_its_selector() {
        let state = Arc::new(ServiceState::new("web".into(), 0));
        let cfg = config(Balance::Maglev);
        let cands = candidates(&[100, 200, 0]);
        let first = ServiceTable::prepare(state.clone(), cfg.clone(), &cands, None);
        assert!(first.needs_build());
        let first = first.finish();
        assert_eq!(first.backends.len(), 2);

        // Same backends, weights and config: the very same table.
        let same = ServiceTable::prepare(state.clone(), cfg.clone(), &cands, Some(&first));
        assert!(!same.needs_build());
        assert!(Arc::ptr_eq(&same.finish(), &first));

        // A new config with the same algorithm: a new table around the same selector.
        let cfg2 = config(Balance::Maglev);
        let t = ServiceTable::prepare(state.clone(), cfg2, &cands, Some(&first));
        assert!(!t.needs_build());
        let t = t.finish();
        assert!(!Arc::ptr_eq(&t, &first));
        assert!(Arc::ptr_eq(&t.selector, &first.selector));

        // A weight, the backend set, a health change or the algorithm: a new selector.
        let mut w = cands.clone();
        w[1].weight = 300;
        assert!(ServiceTable::prepare(state.clone(), cfg.clone(), &w, Some(&first)).needs_build());
        assert!(
            ServiceTable::prepare(state.clone(), cfg.clone(), &cands[..1], Some(&first))
                .needs_build()
        );
        cands[0].backend.set_health(Health::Down);
        assert!(
            ServiceTable::prepare(state.clone(), cfg.clone(), &cands, Some(&first)).needs_build()
        );
        cands[0].backend.set_health(Health::Up);
        assert!(
            ServiceTable::prepare(state.clone(), config(Balance::P2c), &cands, Some(&first))
                .needs_build()
        );
    }

    /// Ports of the backends a `locality` table makes eligible, and of its fallback.
    fn by_locality(locality: Locality, cands: &[Candidate]) -> (Vec<u16>, Vec<u16>) {
        let mut cfg = (*config(Balance::RoundRobin)).clone();
        cfg.locality = locality;
        let state = Arc::new(ServiceState::new("web".into(), 0));
        let t = ServiceTable::build(state, Arc::new(cfg), cands);
        let ports = |v: &[Arc<Backend>]| v.iter().map(|b| b.addr.port() - 9000).collect();
        (ports(&t.backends), ports(&t.fallback))
    }

    #[test]
    fn locality_narrows_the_eligible_set_to_this_nodes_backends() {
        // 0, 1, 2 run here; 3, 4 elsewhere.
        let mut cands = candidates(&[100; 5]);
        for c in &mut cands[..3] {
            c.local = true;
        }
        let all = (vec![0, 1, 2, 3, 4], vec![]);
        assert_eq!(by_locality(Locality::Any, &cands), all);
        // Every local one healthy: only they; the others wait as the spill-over.
        assert_eq!(
            by_locality(Locality::PreferLocal, &cands),
            (vec![0, 1, 2], vec![3, 4])
        );
        assert_eq!(
            by_locality(Locality::LocalOnly, &cands),
            (vec![0, 1, 2], vec![])
        );

        // One of three local ones down: 2 of 3 healthy is at least half, still local.
        cands[0].backend.set_health(Health::Down);
        assert_eq!(
            by_locality(Locality::PreferLocal, &cands),
            (vec![1, 2], vec![0, 3, 4])
        );
        // Two of three down: fewer than half: every healthy one, wherever it runs.
        cands[1].backend.set_health(Health::Down);
        assert_eq!(
            by_locality(Locality::PreferLocal, &cands),
            (vec![2, 3, 4], vec![0, 1])
        );
        // local_only never leaves the node, whatever is healthy elsewhere.
        assert_eq!(
            by_locality(Locality::LocalOnly, &cands),
            (vec![2], vec![0, 1])
        );
        cands[2].backend.set_health(Health::Down);
        assert_eq!(
            by_locality(Locality::PreferLocal, &cands),
            (vec![3, 4], vec![0, 1, 2])
        );
        assert_eq!(
            by_locality(Locality::LocalOnly, &cands),
            (vec![], vec![0, 1, 2])
        );

        // A draining local task does not count among this node's tasks: one local task,
        // healthy, is all of them.
        cands[0].backend.set_state(State::Draining);
        cands[1].backend.set_state(State::Draining);
        cands[2].backend.set_health(Health::Up);
        assert_eq!(
            by_locality(Locality::PreferLocal, &cands),
            (vec![2], vec![0, 1, 3, 4])
        );
    }

    #[test]
    fn under_prefer_local_panic_routing_tries_a_usable_remote_backend_first() {
        let mut cands = candidates(&[100; 3]);
        cands[0].local = true;
        cands[2].backend.set_health(Health::Down);
        let mut cfg = (*config(Balance::RoundRobin)).clone();
        cfg.locality = Locality::PreferLocal;
        let state = Arc::new(ServiceState::new("web".into(), 0));
        let t = ServiceTable::build(state, Arc::new(cfg), &cands);
        assert_eq!(t.backends.len(), 1);
        // The local one failed: the healthy remote one (1) before the unhealthy one (2).
        let k = t.panic_candidate(|k| k == 0).unwrap();
        assert_eq!(t.listed(k).unwrap().addr.port(), 9001);
        let k2 = t.panic_candidate(|k| k == 0 || t.listed(k).unwrap().addr.port() == 9001);
        assert_eq!(t.listed(k2.unwrap()).unwrap().addr.port(), 9002);
    }

    #[test]
    fn the_last_usable_backend_is_never_ejected() {
        let state = Arc::new(ServiceState::new("web".into(), 0));
        let t = ServiceTable::build(
            state.clone(),
            config_with(Balance::RoundRobin, 100),
            &candidates(&[100, 100]),
        );
        assert_eq!(t.eject(0), Ejection::Ejected);
        assert!(t.backends[0].is_ejected());
        assert_eq!(t.eject(0), Ejection::Nothing, "already ejected");
        // Backend 1 is now the only usable one.
        assert_eq!(t.eject(1), Ejection::SparedFirst);
        assert!(!t.backends[1].is_ejected());
        assert_eq!(t.eject(1), Ejection::Nothing, "reported once per streak");
        assert_eq!(state.ejections_spared.load(Ordering::Relaxed), 1);
        // The streak ends (the control plane clears the mark): reported again next time.
        assert!(t.backends[1].clear_eject_spared());
        assert_eq!(t.eject(1), Ejection::SparedFirst);
        // Once another backend is usable again, it can be ejected.
        t.backends[0].set_ejected(false);
        assert_eq!(t.eject(1), Ejection::Ejected);
    }

    #[test]
    fn ejection_stops_at_max_ejection_percent() {
        let state = Arc::new(ServiceState::new("web".into(), 0));
        let t = ServiceTable::build(
            state,
            config_with(Balance::RoundRobin, 50),
            &candidates(&[100; 5]),
        );
        // 5 backends at 50%: two may be ejected (40%), a third would make 60%.
        assert_eq!(t.eject(0), Ejection::Ejected);
        assert_eq!(t.eject(1), Ejection::Ejected);
        assert_eq!(t.eject(2), Ejection::SparedFirst);
        assert_eq!(t.eject(2), Ejection::Nothing, "reported once per streak");
        assert!(!t.backends[2].is_ejected());
        // 0% ejects nothing, ever; one backend of two is always allowed above 0%.
        let off = ServiceTable::build(
            Arc::new(ServiceState::new("web".into(), 0)),
            config_with(Balance::RoundRobin, 0),
            &candidates(&[100; 4]),
        );
        assert_ne!(off.eject(0), Ejection::Ejected);
        let two = ServiceTable::build(
            Arc::new(ServiceState::new("web".into(), 0)),
            config_with(Balance::RoundRobin, 10),
            &candidates(&[100; 2]),
        );
        assert_eq!(two.eject(0), Ejection::Ejected);
    }

    #[test]
    fn panic_routing_prefers_ejected_then_unhealthy_then_draining() {
        let state = Arc::new(ServiceState::new("web".into(), 0));
        let cands = candidates(&[100; 4]);
        // 1 draining, 2 never healthy: both listed as fallback at build time.
        cands[1].backend.set_state(State::Draining);
        cands[2].backend.set_health(Health::Unknown);
        let t = ServiceTable::build(state, config(Balance::RoundRobin), &cands);
        assert_eq!(t.backends.len(), 2);
        assert_eq!(t.fallback.len(), 2);
        let addr_of = |k: usize| t.listed(k).map(|b| b.addr.port());
        // The eligible ones are usable: not panic candidates.
        assert_eq!(t.panic_candidate(|_| false).map(addr_of), Some(Some(9002)));
        // After the table was built, backend 0 is ejected and 3 fails its checks.
        t.backends[0].set_ejected(true);
        t.backends[1].set_health(Health::Down);
        let mut tried = Vec::new();
        while let Some(k) = t.panic_candidate(|k| tried.contains(&k)) {
            tried.push(k);
        }
        let order: Vec<_> = tried.iter().map(|&k| addr_of(k).unwrap()).collect();
        // Ejected (9000), unhealthy (9003, then 9002 never healthy), draining (9001).
        assert_eq!(order, vec![9000, 9003, 9002, 9001]);
        // Gone backends are never tried.
        cands[1].backend.set_state(State::Gone);
        assert!(t.panic_candidate(|k| tried[..3].contains(&k)).is_none());
    }

    /// Two worker threads failing the last two usable backends at the same instant must not
    /// eject both (the first version checked "another usable" and then ejected, and both
    /// threads could pass the check). The two usable backends sit half a table apart among
    /// unhealthy ones, so each check scans ~10,000 backends: a wide window for the race.
    #[test]
    fn racing_ejections_leave_a_usable_backend() {
        use std::hint::spin_loop;
        use std::sync::atomic::AtomicUsize;
        const N: usize = 20_000;
        const ROUNDS: usize = 20_000;
        let state = Arc::new(ServiceState::new("web".into(), 0));
        let t = ServiceTable::build(state, config(Balance::RoundRobin), &candidates(&[1; N]));
        let (a, b) = (0, N / 2);
        for (i, be) in t.backends.iter().enumerate() {
            if i != a && i != b {
                be.set_health(Health::Down);
            }
        }
        let go = AtomicUsize::new(0);
        let done = AtomicUsize::new(0);
        let mut both_ejected = 0;
        std::thread::scope(|s| {
            let (t, go, done) = (&t, &go, &done);
            s.spawn(move || {
                for round in 1..=ROUNDS {
                    while go.load(Ordering::Acquire) < round {
                        spin_loop();
                    }
                    t.eject(b);
                    done.store(round, Ordering::Release);
                }
            });
            for round in 1..=ROUNDS {
                for i in [a, b] {
                    t.backends[i].set_ejected(false);
                    t.backends[i].clear_eject_spared();
                }
                go.store(round, Ordering::Release);
                t.eject(a);
                while done.load(Ordering::Acquire) < round {
                    spin_loop();
                }
                if !t.backends[a].is_usable() && !t.backends[b].is_usable() {
                    both_ejected += 1;
                }
            }
        });
        assert_eq!(both_ejected, 0, "rounds of {ROUNDS} that ejected both");
    }
}
