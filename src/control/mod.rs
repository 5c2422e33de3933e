//! The control plane: the one task that owns the desired state and decides every backend's
//! life, and the only writer of the routing table.
//!
//! Inputs (all through channels, handled one at a time, so there is no shared mutable
//! state to lock): a validated config (start and reloads), health transitions from the
//! checkers, ejections from the connection path, operator commands from the admin API,
//! discovered endpoints, and a 250 ms tick that advances drains, slow-start ramps and
//! ejection back-offs.
//!
//! Output: a new `RoutingTable` generation and `Status` snapshot whenever something a
//! connection would see changed. Services whose inputs did not change keep their
//! `Arc<ServiceTable>`, and a changed service whose algorithm and eligible (address, weight)
//! list did not change keeps its `Selector`; backends keep their `Arc<Backend>` (identity,
//! counters, health, connections) across every rebuild. Selectors that must be built (a
//! Maglev build takes milliseconds) are built on a blocking thread, never on the runtime
//! thread that moves bytes: one build at a time, published in the order planned, so
//! generations only increase and an older state never replaces a newer one. Only the first
//! table is built in place, before meshd reports ready.
//!
//! A backend's life, decided here:
//! ```text
//!  appears (config/discovery) ─► Active+Unknown ─(rise passes)─► Active+Up ─► eligible
//!        (check = "none": Up at once)             ▲  │ fall failures / ejection
//!                                                 │  ▼
//!                                            Active+Down (or ejected): not eligible
//!  removed from every source, or operator drain ─► Draining ─(0 conns or drain_timeout)─► Gone
//!                                     operator enable ─┘ back to Active
//! ```

pub mod status;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;

use crate::config::{CheckKind, Config, ServiceConfig};
use crate::health::{self, Transition};
use crate::metrics::{BackendMetrics, ServiceMetrics};
use crate::proxy::close::CloseSignal;
use crate::proxy::conn::{Shared, EJECT_AFTER_FAILURES};
use crate::proxy::listener::{self, AcceptLoop};
use crate::table::{
    Backend, Candidate, Health, Prepared, RoutingTable, ServiceState, ServiceTable, State,
    TableHandle,
};
pub use status::{BackendStatus, ReloadResult, ServiceStatus, Status, StatusHandle};

/// How often drains, ramps and back-offs advance.
const TICK: Duration = Duration::from_millis(250);
/// Ejection back-off: 1 s, doubling per ejection in a row, at most this.
const EJECT_MAX: Duration = Duration::from_secs(30);
/// An ejection this long after the previous one starts the back-off from 1 s again.
const EJECT_FORGET: Duration = Duration::from_secs(300);

/// Where a backend comes from (a bit each; a backend drains when no source wants it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Static = 1,
    Dns = 2,
    Docker = 4,
}

/// An endpoint one source gives one service: address, weight, and identity (a Swarm task
/// ID; `None` where the address is the identity: mesh.toml, DNS).
pub type Endpoint = (SocketAddr, u32, Option<Arc<str>>);
/// Endpoints one source gives one service.
pub type Endpoints = Vec<Endpoint>;

fn endpoints_of(backends: &[crate::config::BackendConfig]) -> Endpoints {
    backends
        .iter()
        .map(|b| (b.addr, b.weight, b.id.clone()))
        .collect()
}

/// A desired service and its endpoint sets by source.
type Desired = (ServiceConfig, Vec<(Source, Endpoints)>);

/// An operator's request from the admin API.
#[derive(Debug, Clone)]
pub enum AdminOp {
    Drain,
    Enable,
    Weight(u32),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminError {
    NoService(String),
    NoBackend(String, SocketAddr),
    /// Enabling a backend that no config or discovery source lists any more.
    Removed(SocketAddr),
}

impl std::fmt::Display for AdminError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdminError::NoService(s) => write!(f, "no service named {s:?}"),
            AdminError::NoBackend(s, a) => write!(f, "service {s:?} has no backend {a}"),
            AdminError::Removed(a) => write!(
                f,
                "backend {a} was removed from the config or discovery; it can only drain"
            ),
        }
    }
}

/// A set of endpoints for one service from a discovery provider (replaces that provider's
/// previous set for the service).
#[derive(Debug, Clone)]
pub struct Discovered {
    pub service: String,
    pub endpoints: Vec<(SocketAddr, u32)>,
}

pub enum Command {
    /// A validated config to apply (reload). The reply carries the error line if it could
    /// not be applied (e.g. a new listener's port is taken).
    Reload(Box<Config>, oneshot::Sender<Result<(), String>>),
    /// A reload that failed to parse or validate: counted and shown, nothing changes.
    ReloadFailed(String),
    Admin {
        service: String,
        addr: SocketAddr,
        op: AdminOp,
        reply: oneshot::Sender<Result<(), AdminError>>,
    },
    /// A provider's endpoint sets for services it does not create (DNS targets of
    /// configured services, or Swarm tasks of a configured service of the same name).
    Discovered(Source, Vec<Discovered>),
    /// A provider's services, each a full `ServiceConfig` (listeners, policy, and its
    /// endpoints as `backends`); replaces that provider's previous list. A configured
    /// service of the same name wins and takes only the endpoints.
    Services(Source, Vec<ServiceConfig>),
    /// A failed poll: counted; the provider's last good state stays.
    DiscoveryFailed(&'static str),
    /// Stop accepting on every listener (shutdown begins).
    StopListening(oneshot::Sender<()>),
    /// Close every connection still open (the shutdown grace period is over).
    CloseAll(oneshot::Sender<()>),
}

struct BackendEntry {
    backend: Arc<Backend>,
    /// The task this backend is (Swarm); `None` where the address is the identity.
    id: Option<Arc<str>>,
    metrics: Arc<BackendMetrics>,
    weight: u32,
    weight_override: Option<u32>,
    /// `Source` bits.
    sources: u8,
    operator_drained: bool,
    up_since: Option<Instant>,
    drain: Option<(Instant, Instant)>,
    checker: Option<Arc<CloseSignal>>,
    last_pass: Arc<AtomicU64>,
    ejected_at: Option<(Instant, u64)>,
    ejected_until: Option<Instant>,
}

struct ServiceEntry {
    state: Arc<ServiceState>,
    metrics: Arc<ServiceMetrics>,
    config: Arc<ServiceConfig>,
    listeners: Vec<(SocketAddr, Arc<CloseSignal>)>,
    backends: Vec<BackendEntry>,
    /// Removed from the config: no listener, backends draining; freed when all are gone.
    removed: bool,
    /// Needs a new `ServiceTable`.
    dirty: bool,
    table: Option<Arc<ServiceTable>>,
}

pub struct Control {
    table: TableHandle,
    status: StatusHandle,
    shared: &'static Shared,
    tracker: TaskTracker,
    services: Vec<ServiceEntry>,
    free_slots: Vec<usize>,
    next_slot: usize,
    generation: u64,
    health_tx: mpsc::UnboundedSender<Transition>,
    health_rx: mpsc::UnboundedReceiver<Transition>,
    ejected_rx: mpsc::UnboundedReceiver<Arc<Backend>>,
    reloads_ok: u64,
    reloads_err: u64,
    last_reload: Option<ReloadResult>,
    discovery_errors: Vec<(&'static str, u64)>,
    /// The last applied config (discovery changes are reconciled against it).
    config: Option<Arc<Config>>,
    /// Endpoint sets from providers, by (source, service name).
    endpoints: Vec<((Source, String), Endpoints)>,
    /// Services published by providers, by source.
    provided: Vec<(Source, Vec<ServiceConfig>)>,
    /// Accept loops of new listeners, started once a published table holds their service
    /// (until then the socket is bound and the kernel queues connections).
    pending_accept: Vec<AcceptLoop>,
    /// Operators' requests applied since the last plan, answered when it is published: an
    /// API call returns once its change is in the routing table and the status.
    admin_replies: Vec<AdminReply>,
    /// A plan is being finished on a blocking thread (it will publish `generation + 1`).
    building: bool,
    /// The next plan must be published even if no service is dirty: set with
    /// `mark_all_dirty`, which also covers the last service going away (no service is
    /// left to be dirty, but its slot must be emptied and the status updated).
    force_publish: bool,
    /// Counters changed that no table holds (a rejected reload, a failed discovery poll):
    /// publish the status snapshot alone, keeping the generation.
    status_dirty: bool,
}

type AdminReply = oneshot::Sender<Result<(), AdminError>>;

/// A table generation on its way: planned on the control task (eligible backends, status,
/// which selectors can be reused: cheap), finished where the selectors are built (off the
/// runtime thread when any must be), published back on the control task.
struct Plan {
    slots: usize,
    services: Vec<Planned>,
    /// Complete but for each service's `eligible` and the generation.
    status: Status,
    replies: Vec<AdminReply>,
}

struct Planned {
    state: Arc<ServiceState>,
    /// Index in `Control::services` when planned (a hint: services may be removed before
    /// the plan is published).
    index: usize,
    /// Not removed: the table routes to it.
    routed: bool,
    /// Was dirty: its entry takes the finished table.
    fresh: bool,
    table: Prepared,
}

/// A finished plan, ready to publish.
struct Built {
    table: RoutingTable,
    /// `(Planned::index, table)` of each fresh service.
    fresh: Vec<(usize, Arc<ServiceTable>)>,
    status: Status,
    replies: Vec<AdminReply>,
}

impl Plan {
    fn needs_build(&self) -> bool {
        self.services.iter().any(|p| p.table.needs_build())
    }

    /// Builds the selectors that need it: the expensive part of a publish.
    fn finish(self) -> Built {
        let mut table = RoutingTable {
            generation: 0,
            services: vec![None; self.slots],
        };
        let mut status = self.status;
        let mut fresh = Vec::new();
        for (p, st) in self.services.into_iter().zip(status.services.iter_mut()) {
            let t = p.table.finish();
            st.eligible = t.backends.len();
            if p.routed {
                table.services[p.state.slot] = Some(t.clone());
            }
            if p.fresh {
                fresh.push((p.index, t));
            }
        }
        Built {
            table,
            fresh,
            status,
            replies: self.replies,
        }
    }
}

impl Control {
    pub fn new(
        table: TableHandle,
        status: StatusHandle,
        shared: &'static Shared,
        tracker: TaskTracker,
        ejected_rx: mpsc::UnboundedReceiver<Arc<Backend>>,
    ) -> Control {
        let (health_tx, health_rx) = mpsc::unbounded_channel();
        Control {
            table,
            status,
            shared,
            tracker,
            services: Vec::new(),
            free_slots: Vec::new(),
            next_slot: 0,
            generation: 0,
            health_tx,
            health_rx,
            ejected_rx,
            reloads_ok: 0,
            reloads_err: 0,
            last_reload: None,
            discovery_errors: Vec::new(),
            config: None,
            endpoints: Vec::new(),
            provided: Vec::new(),
            pending_accept: Vec::new(),
            admin_replies: Vec::new(),
            building: false,
            force_publish: false,
            status_dirty: false,
        }
    }

    /// Applies the first config: binds every listener (any failure is fatal and nothing is
    /// left bound), then publishes generation 1.
    pub fn start(&mut self, config: &Config) -> Result<(), String> {
        self.apply(config)?;
        Ok(())
    }

    /// Runs until every sender of `commands` is gone.
    pub async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The generation whose selectors are being built on a blocking thread. One at a
        // time: generations are published in the order they were planned, so an older
        // state finishing late never replaces a newer one. Changes that arrive meanwhile
        // mark their services dirty and go into the next plan.
        let mut building: Option<JoinHandle<Built>> = None;
        loop {
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    Some(cmd) => self.command(cmd),
                    None => return,
                },
                Some(t) = self.health_rx.recv() => self.health(t),
                Some(b) = self.ejected_rx.recv() => self.eject(&b),
                _ = tick.tick() => self.tick(),
                built = async {
                    match building.as_mut() {
                        Some(job) => job.await,
                        None => std::future::pending().await,
                    }
                } => {
                    building = None;
                    self.building = false;
                    match built {
                        Ok(built) => self.publish_built(built),
                        // A build panicked: the bug surfaces as it did when builds ran here.
                        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                        Err(_) => return,
                    }
                }
            }
            if building.is_none() {
                building = self.publish_if_dirty();
                self.building = building.is_some();
            }
            if building.is_none() && self.status_dirty {
                self.publish_status();
            }
            self.start_accept_loops();
        }
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Reload(cfg, reply) => {
                let r = self.refuse_emptying(&cfg).and_then(|()| self.apply(&cfg));
                let error = r.as_ref().err().cloned();
                match &error {
                    None => {
                        self.reloads_ok += 1;
                        tracing::info!(generation = self.next_generation(), "config reloaded");
                    }
                    Some(e) => {
                        self.reloads_err += 1;
                        tracing::error!(error = %e, "config reload rejected, keeping the running config: {e}");
                    }
                }
                // A rejected reload changed no table: its counters go out in the status
                // alone, without a new generation.
                if error.is_none() {
                    self.mark_all_dirty();
                } else {
                    self.status_dirty = true;
                }
                self.last_reload = Some(ReloadResult {
                    at: SystemTime::now(),
                    error,
                });
                let _ = reply.send(r);
            }
            Command::ReloadFailed(e) => {
                self.reloads_err += 1;
                tracing::error!(error = %e, "config reload rejected, keeping the running config: {e}");
                self.last_reload = Some(ReloadResult {
                    at: SystemTime::now(),
                    error: Some(e),
                });
                self.status_dirty = true;
            }
            Command::Admin {
                service,
                addr,
                op,
                reply,
            } => match self.admin(&service, addr, op) {
                // Answered once the generation holding the change is published.
                Ok(()) => self.admin_replies.push(reply),
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Command::Discovered(source, sets) => self.discovered(source, sets),
            Command::Services(source, services) => self.provided(source, services),
            Command::DiscoveryFailed(provider) => {
                match self
                    .discovery_errors
                    .iter_mut()
                    .find(|(p, _)| *p == provider)
                {
                    Some((_, n)) => *n += 1,
                    None => self.discovery_errors.push((provider, 1)),
                }
                self.status_dirty = true;
            }
            Command::StopListening(reply) => {
                for s in &mut self.services {
                    for (_, stop) in s.listeners.drain(..) {
                        stop.close();
                    }
                }
                let _ = reply.send(());
            }
            Command::CloseAll(reply) => {
                for s in &self.services {
                    for b in &s.backends {
                        b.backend.close.close();
                    }
                }
                let _ = reply.send(());
            }
        }
    }

    // === config and discovery ===

    /// A reload that would leave no service while some run is refused, unless the file says
    /// `allow_empty = true` (a file rewritten in place is empty or half-written for a
    /// moment; applying it closed every listener).
    fn refuse_emptying(&self, config: &Config) -> Result<(), String> {
        let running: Vec<&str> = self
            .services
            .iter()
            .filter(|s| !s.removed)
            .map(|s| &*s.state.name)
            .collect();
        if config.allow_empty
            || running.is_empty()
            || !config.services.is_empty()
            || self.provided.iter().any(|(_, list)| !list.is_empty())
        {
            return Ok(());
        }
        let mut names = running
            .iter()
            .take(3)
            .map(|n| format!("{n:?}"))
            .collect::<Vec<_>>();
        if running.len() > 3 {
            names.push(format!("and {} more", running.len() - 3));
        }
        Err(format!(
            "{}: no [[service]] in the file: it would remove every running service ({}); \
             add allow_empty = true at the top of the file if that is intended",
            config.path.display(),
            names.join(", ")
        ))
    }

    /// Applies a config (start or reload): binding a new listener fails the whole reload
    /// with nothing changed.
    fn apply(&mut self, config: &Config) -> Result<(), String> {
        self.reconcile(Some(config), true)?;
        self.config = Some(Arc::new(config.clone()));
        self.shared
            .access_log
            .store(config.log.access_log, Ordering::Relaxed);
        Ok(())
    }

    /// The services meshd should run: the config's, each with its endpoint sets by source,
    /// plus services that only a discovery provider publishes.
    fn desired(&self, config: &Config) -> Vec<Desired> {
        let endpoints = |name: &str, source: Source| -> Option<Endpoints> {
            self.endpoints
                .iter()
                .find(|((src, n), _)| *src == source && n == name)
                .map(|(_, v)| v.clone())
        };
        let mut out = Vec::new();
        for s in &config.services {
            let mut sets = vec![(Source::Static, endpoints_of(&s.backends))];
            for src in [Source::Dns, Source::Docker] {
                // Endpoints given for this service, or the backends of a provider's service
                // of the same name (the configured service's settings win).
                let from_service = self
                    .provided
                    .iter()
                    .filter(|(p, _)| *p == src)
                    .flat_map(|(_, list)| list.iter())
                    .find(|p| p.name == s.name)
                    .map(|p| endpoints_of(&p.backends));
                let set = endpoints(&s.name, src).or(from_service).unwrap_or_default();
                sets.push((src, set));
            }
            out.push((s.clone(), sets));
        }
        for (src, list) in &self.provided {
            for s in list {
                if config.services.iter().any(|c| c.name == s.name)
                    || out
                        .iter()
                        .any(|(c, _): &(ServiceConfig, _)| c.name == s.name)
                {
                    continue;
                }
                let sets = vec![(*src, endpoints_of(&s.backends))];
                out.push((s.clone(), sets));
            }
        }
        out
    }

    /// Makes the running services match `config` (or the last applied config) plus what
    /// discovery provides. With `strict`, a listener that cannot bind fails the whole call
    /// before anything changed (a reload); otherwise it is logged and skipped (discovery).
    fn reconcile(&mut self, config: Option<&Config>, strict: bool) -> Result<(), String> {
        let held;
        let config = match config {
            Some(c) => c,
            None => match &self.config {
                Some(c) => {
                    held = c.clone();
                    &held
                }
                None => return Ok(()),
            },
        };
        let desired = self.desired(config);
        // Running services by name and listen address: a config of n services costs O(n)
        // lookups, not O(n²) (1,000 services took ~10^6 string comparisons per reload).
        let mut live: HashMap<Arc<str>, usize> = HashMap::with_capacity(self.services.len());
        let mut listening: HashMap<SocketAddr, usize> = HashMap::new();
        for (i, s) in self.services.iter().enumerate() {
            if !s.removed {
                live.insert(s.state.name.clone(), i);
                for (a, _) in &s.listeners {
                    listening.insert(*a, i);
                }
            }
        }

        // 1. Bind every new listen address first: if one fails, nothing has changed.
        let mut bound: HashMap<&str, Vec<(SocketAddr, std::net::TcpListener)>> = HashMap::new();
        for (svc, _) in &desired {
            for &addr in &svc.listen {
                let held_by = listening.get(&addr).map(|&i| &self.services[i]);
                if held_by.is_some_and(|s| *s.state.name == svc.name) {
                    continue;
                }
                let err = match held_by {
                    Some(owner) => Some(format!(
                        "service {:?}: listen {addr} is still held by service {:?}; move it in two reloads (remove it there first)",
                        svc.name, owner.state.name
                    )),
                    None => match listener::bind(addr, svc.backlog) {
                        Ok(l) => {
                            bound.entry(svc.name.as_str()).or_default().push((addr, l));
                            None
                        }
                        Err(e) => Some(bind_error(&svc.name, addr, &e)),
                    },
                };
                if let Some(e) = err {
                    if strict {
                        return Err(e);
                    }
                    tracing::error!("{e}");
                }
            }
        }

        // 2. Services no longer desired: stop accepting, drain their backends.
        let now = Instant::now();
        let wanted: HashSet<&str> = desired.iter().map(|(s, _)| s.name.as_str()).collect();
        for i in 0..self.services.len() {
            let name = self.services[i].state.name.clone();
            if self.services[i].removed || wanted.contains(&*name) {
                continue;
            }
            let s = &mut self.services[i];
            s.removed = true;
            s.dirty = true;
            for (_, stop) in s.listeners.drain(..) {
                stop.close();
            }
            for b in &mut s.backends {
                b.sources = 0;
                if b.backend.state() == State::Active {
                    start_drain(b, s.config.drain_timeout, now);
                }
            }
            tracing::info!(
                service = &*name,
                "service removed: listeners closed, backends draining"
            );
        }

        // 3. New and changed services.
        for (cfg, sets) in &desired {
            let idx = match live.get(cfg.name.as_str()) {
                Some(&i) => i,
                None => self.add_service(cfg),
            };
            let health_changed = self.services[idx].config.health != cfg.health;
            if *self.services[idx].config != *cfg {
                self.services[idx].config = Arc::new(cfg.clone());
                self.services[idx].dirty = true;
            }
            // Listeners: start the new ones, stop the ones no longer listed.
            for (a, l) in bound.remove(cfg.name.as_str()).unwrap_or_default() {
                self.start_listener(idx, a, l);
            }
            let s = &mut self.services[idx];
            s.listeners.retain(|(a, stop)| {
                let keep = cfg.listen.contains(a);
                if !keep {
                    stop.close();
                    tracing::info!(service = cfg.name.as_str(), listen = %a, "listener closed");
                }
                keep
            });
            for (source, wanted) in sets {
                self.set_source(idx, *source, wanted);
            }
            if health_changed {
                self.restart_checkers(idx);
            }
        }
        Ok(())
    }

    /// A provider's complete set of endpoints for the services it knows about (DNS: per
    /// configured service; Docker: per Swarm service). Replaces its previous sets.
    fn discovered(&mut self, source: Source, sets: Vec<Discovered>) {
        self.endpoints.retain(|((src, _), _)| *src != source);
        for set in sets {
            let endpoints = set
                .endpoints
                .into_iter()
                .map(|(a, w)| (a, w, None))
                .collect();
            self.endpoints.push(((source, set.service), endpoints));
        }
        if let Err(e) = self.reconcile(None, false) {
            tracing::error!("applying discovered endpoints: {e}");
        }
    }

    /// A provider's complete set of services it publishes (listeners from its labels).
    fn provided(&mut self, source: Source, services: Vec<ServiceConfig>) {
        self.provided.retain(|(src, _)| *src != source);
        self.provided.push((source, services));
        if let Err(e) = self.reconcile(None, false) {
            tracing::error!("applying discovered services: {e}");
        }
    }

    fn add_service(&mut self, cfg: &ServiceConfig) -> usize {
        let slot = self.free_slots.pop().unwrap_or_else(|| {
            self.next_slot += 1;
            self.next_slot - 1
        });
        let name: Arc<str> = cfg.name.as_str().into();
        self.services.push(ServiceEntry {
            state: Arc::new(ServiceState::new(name.clone(), slot)),
            metrics: Arc::new(ServiceMetrics::new(&name)),
            config: Arc::new(cfg.clone()),
            listeners: Vec::new(),
            backends: Vec::new(),
            removed: false,
            dirty: true,
            table: None,
        });
        self.services.len() - 1
    }

    fn start_listener(&mut self, idx: usize, addr: SocketAddr, l: std::net::TcpListener) {
        let s = &mut self.services[idx];
        let listener = match tokio::net::TcpListener::from_std(l) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(service = &*s.state.name, listen = %addr, error = %e, "cannot register listener");
                return;
            }
        };
        let stop = Arc::new(CloseSignal::new());
        // Started by `start_accept_loops` once a published table holds the service: an
        // accept before that would find no service and turn the connection away.
        self.pending_accept.push(AcceptLoop {
            listener,
            service: s.state.clone(),
            table: self.table.clone(),
            shared: self.shared,
            tracker: self.tracker.clone(),
            stop: stop.clone(),
        });
        tracing::info!(service = &*s.state.name, listen = %addr, "listener bound");
        s.listeners.push((addr, stop));
    }

    /// Spawns the accept loops whose service the published table now holds, and those
    /// already stopped (they return at once and release their socket).
    fn start_accept_loops(&mut self) {
        if self.pending_accept.is_empty() {
            return;
        }
        let table = self.table.load();
        let mut k = 0;
        while k < self.pending_accept.len() {
            let l = &self.pending_accept[k];
            if l.stop.is_closed() || table.service(&l.service).is_some() {
                tokio::spawn(self.pending_accept.swap_remove(k).run());
            } else {
                k += 1;
            }
        }
    }

    // === backends ===

    /// Makes `wanted` the set of endpoints `source` gives service `idx`: new ones are added
    /// (gated by health checks), missing ones lose this source and drain if no source is left.
    fn set_source(&mut self, idx: usize, source: Source, wanted: &[Endpoint]) {
        let bit = source as u8;
        let now = Instant::now();
        let s = &mut self.services[idx];
        let cfg = s.config.clone();
        // Looked up by address: a set of n endpoints costs O(n), not O(n²) (10,000 backends
        // took ~10^8 comparisons on every reload).
        let wanted_addrs: HashSet<SocketAddr> = wanted.iter().map(|(a, _, _)| *a).collect();
        for b in &mut s.backends {
            if b.sources & bit != 0 && !wanted_addrs.contains(&b.backend.addr) {
                b.sources &= !bit;
                if b.sources == 0 && b.backend.state() == State::Active {
                    start_drain(b, cfg.drain_timeout, now);
                    s.dirty = true;
                    tracing::info!(
                        service = &*s.state.name,
                        backend = &*b.backend.addr_label,
                        "backend removed: draining"
                    );
                }
            }
        }
        let mut by_addr: HashMap<SocketAddr, usize> = HashMap::with_capacity(s.backends.len());
        for (i, b) in s.backends.iter().enumerate() {
            if b.backend.state() != State::Gone {
                by_addr.entry(b.backend.addr).or_insert(i);
            }
        }
        for (addr, weight, id) in wanted {
            let (addr, weight) = (*addr, *weight);
            if let Some(b) = by_addr.get(&addr).map(|&i| &mut s.backends[i]) {
                if let Some(id) = id {
                    match &b.id {
                        // A new task on a stopped task's address (Swarm reuses overlay
                        // addresses): a new backend, with none of the old one's health,
                        // ejection or back-off.
                        Some(old) if old != id => {
                            tracing::info!(
                                service = &*s.state.name,
                                backend = &*b.backend.addr_label,
                                old_task = &**old,
                                new_task = &**id,
                                "new task on a stopped task's address: fresh health and ejection state"
                            );
                            renew(b, &cfg, id.clone(), bit, now);
                            spawn_checker(b, &cfg, &self.health_tx);
                            b.weight = weight;
                            s.dirty = true;
                            continue;
                        }
                        Some(_) => {}
                        None => b.id = Some(id.clone()),
                    }
                }
                b.sources |= bit;
                if b.weight != weight {
                    b.weight = weight;
                    s.dirty = true;
                }
                if b.backend.state() == State::Draining && !b.operator_drained {
                    // Listed again before it finished draining: it comes back as it was.
                    b.backend.set_state(State::Active);
                    b.drain = None;
                    s.dirty = true;
                    spawn_checker(b, &cfg, &self.health_tx);
                    tracing::info!(
                        service = &*s.state.name,
                        backend = &*b.backend.addr_label,
                        "backend listed again: active"
                    );
                }
                continue;
            }
            let trusted = cfg.health.check == CheckKind::None;
            let backend = Arc::new(Backend::new(
                s.state.name.clone(),
                addr,
                if trusted { Health::Up } else { Health::Unknown },
            ));
            let mut e = BackendEntry {
                metrics: Arc::new(BackendMetrics::new(&s.state.name, &backend.addr_label)),
                backend,
                id: id.clone(),
                weight,
                weight_override: None,
                sources: bit,
                operator_drained: false,
                up_since: trusted.then_some(now),
                drain: None,
                checker: None,
                last_pass: Arc::new(AtomicU64::new(0)),
                ejected_at: None,
                ejected_until: None,
            };
            spawn_checker(&mut e, &cfg, &self.health_tx);
            tracing::info!(
                service = &*s.state.name,
                backend = &*e.backend.addr_label,
                check = crate::health::check_name(cfg.health.check),
                "backend added"
            );
            by_addr.insert(addr, s.backends.len());
            s.backends.push(e);
            s.dirty = true;
        }
    }

    fn restart_checkers(&mut self, idx: usize) {
        let s = &mut self.services[idx];
        let cfg = s.config.clone();
        for b in &mut s.backends {
            if b.backend.state() == State::Active {
                if cfg.health.check == CheckKind::None {
                    if let Some(stop) = b.checker.take() {
                        stop.close();
                    }
                    if b.backend.health() != Health::Up {
                        b.backend.set_health(Health::Up);
                        b.up_since = Some(Instant::now());
                    }
                } else {
                    spawn_checker(b, &cfg, &self.health_tx);
                }
            }
        }
        s.dirty = true;
    }

    fn health(&mut self, t: Transition) {
        let Some((si, bi)) = self.locate(&t.backend) else {
            return;
        };
        let s = &mut self.services[si];
        let b = &mut s.backends[bi];
        match t.health {
            Health::Up => {
                b.up_since = Some(Instant::now());
                tracing::info!(
                    service = &*s.state.name,
                    backend = &*b.backend.addr_label,
                    "backend up: health check passed"
                );
            }
            // Never healthy yet: a task still starting up, not an outage.
            Health::Down if b.up_since.is_none() => {
                tracing::info!(
                    service = &*s.state.name,
                    backend = &*b.backend.addr_label,
                    "backend not ready yet: health check failing"
                );
            }
            Health::Down => {
                tracing::warn!(
                    service = &*s.state.name,
                    backend = &*b.backend.addr_label,
                    "backend down: health check failed"
                );
            }
            Health::Unknown => {}
        }
        s.dirty = true;
    }

    /// A backend ejected by passive outlier detection (or spared: see
    /// `ServiceTable::eject`).
    fn eject(&mut self, backend: &Arc<Backend>) {
        let Some((si, bi)) = self.locate(backend) else {
            return;
        };
        let now = Instant::now();
        let s = &mut self.services[si];
        if !backend.is_ejected() {
            // Refused on the connection path: the service's last usable backend, or its
            // ejection budget is spent.
            let others = s
                .backends
                .iter()
                .any(|o| !Arc::ptr_eq(&o.backend, backend) && o.backend.is_usable());
            if others {
                tracing::warn!(
                    service = &*s.state.name,
                    backend = &*backend.addr_label,
                    max_ejection_percent = s.config.max_ejection_percent,
                    "backend not ejected after consecutive connect failures: max_ejection_percent of the service's backends are ejected already"
                );
            } else {
                spared_log(&s.state, backend);
            }
            return;
        }
        if s.backends[bi].ejected_until.is_some() {
            return; // already scheduled
        }
        // Two backends failing at the same moment may each have seen the other usable on
        // the connection path; here ejections are seen one at a time.
        let others = s.backends.iter().enumerate().any(|(k, o)| {
            k != bi && o.backend.is_usable() && o.weight_override.unwrap_or(o.weight) > 0
        });
        if !others {
            backend.set_ejected(false);
            if backend.mark_eject_spared() {
                s.state.ejections_spared.fetch_add(1, Ordering::Relaxed);
            }
            spared_log(&s.state, backend);
            return;
        }
        let b = &mut s.backends[bi];
        let mut n = backend.ejections.load(Ordering::Relaxed);
        if b.ejected_at.is_some_and(|(t, _)| now - t > EJECT_FORGET) {
            n = 0;
        }
        let n = n.saturating_add(1);
        backend.ejections.store(n, Ordering::Relaxed);
        let backoff = Duration::from_secs(1)
            .saturating_mul(1u32 << (n - 1).min(16))
            .min(EJECT_MAX);
        b.ejected_at = Some((now, health::now_ms()));
        b.ejected_until = Some(now + backoff);
        s.state.ejections.fetch_add(1, Ordering::Relaxed);
        s.dirty = true;
        tracing::warn!(
            service = &*s.state.name,
            backend = &*backend.addr_label,
            backoff_ms = backoff.as_millis() as u64,
            "backend ejected after consecutive connect failures"
        );
    }

    fn locate(&self, backend: &Arc<Backend>) -> Option<(usize, usize)> {
        self.services.iter().enumerate().find_map(|(si, s)| {
            s.backends
                .iter()
                .position(|b| Arc::ptr_eq(&b.backend, backend))
                .map(|bi| (si, bi))
        })
    }

    fn admin(&mut self, service: &str, addr: SocketAddr, op: AdminOp) -> Result<(), AdminError> {
        let now = Instant::now();
        let Some(s) = self
            .services
            .iter_mut()
            .find(|s| !s.removed && *s.state.name == *service)
        else {
            return Err(AdminError::NoService(service.to_string()));
        };
        let Some(b) = s
            .backends
            .iter_mut()
            .find(|b| b.backend.addr == addr && b.backend.state() != State::Gone)
        else {
            return Err(AdminError::NoBackend(service.to_string(), addr));
        };
        match op {
            AdminOp::Drain => {
                if b.backend.state() == State::Active {
                    start_drain(b, s.config.drain_timeout, now);
                }
                b.operator_drained = true;
                tracing::info!(service, backend = %addr, "backend draining (operator)");
            }
            AdminOp::Enable => {
                if b.sources == 0 {
                    return Err(AdminError::Removed(addr));
                }
                b.operator_drained = false;
                if b.backend.state() == State::Draining {
                    b.backend.set_state(State::Active);
                    b.drain = None;
                    spawn_checker(b, &s.config, &self.health_tx);
                }
                tracing::info!(service, backend = %addr, "backend enabled (operator)");
            }
            AdminOp::Weight(w) => {
                b.weight_override = Some(w);
                tracing::info!(service, backend = %addr, weight = w, "backend weight set (operator)");
            }
        }
        s.dirty = true;
        Ok(())
    }

    // === time ===

    fn tick(&mut self) {
        let now = Instant::now();
        let now_ms = health::now_ms();
        for s in &mut self.services {
            let slow_start = s.config.slow_start;
            let trusted = s.config.health.check == CheckKind::None;
            let mut gone = false;
            for b in &mut s.backends {
                // Drains: done when the last connection ends; survivors closed at the deadline.
                if let Some((_, deadline)) = b.drain {
                    if b.backend.active() == 0 {
                        b.backend.set_state(State::Gone);
                        gone = true;
                        tracing::info!(
                            service = &*s.state.name,
                            backend = &*b.backend.addr_label,
                            "backend gone: drained"
                        );
                    } else if now >= deadline && !b.backend.close.is_closed() {
                        tracing::info!(
                            service = &*s.state.name,
                            backend = &*b.backend.addr_label,
                            remaining = b.backend.active(),
                            "drain_timeout passed: closing remaining connections"
                        );
                        b.backend.close.close();
                    }
                }
                // A failure streak that spared the last usable backend has ended.
                if b.backend.is_eject_spared()
                    && b.backend.consecutive_failures.load(Ordering::Relaxed) < EJECT_AFTER_FAILURES
                {
                    b.backend.clear_eject_spared();
                }
                // Ejections end after their back-off, once a health check passed since.
                if let Some(until) = b.ejected_until {
                    let passed = b
                        .ejected_at
                        .is_some_and(|(_, at)| b.last_pass.load(Ordering::Relaxed) > at);
                    if now >= until && (trusted || passed) {
                        b.ejected_until = None;
                        b.backend.consecutive_failures.store(0, Ordering::Relaxed);
                        b.backend.set_ejected(false);
                        s.dirty = true;
                        tracing::info!(
                            service = &*s.state.name,
                            backend = &*b.backend.addr_label,
                            "backend re-admitted after ejection"
                        );
                    }
                }
                // Slow start ramps rebuild the table each tick until they end.
                if let Some(up) = b.up_since {
                    if !slow_start.is_zero() && now.duration_since(up) <= slow_start + TICK {
                        s.dirty = true;
                    }
                }
            }
            if gone {
                // Counters are copied to the exporter at scrape time: give a departing
                // backend's series their final values before it leaves the snapshot.
                for b in s
                    .backends
                    .iter()
                    .filter(|b| b.backend.state() == State::Gone)
                {
                    b.metrics.sync(&b.backend);
                }
                s.backends.retain(|b| b.backend.state() != State::Gone);
                s.dirty = true;
            }
        }
        // Services removed from the config whose backends have all drained.
        let mut k = 0;
        while k < self.services.len() {
            if self.services[k].removed && self.services[k].backends.is_empty() {
                let s = self.services.swap_remove(k);
                self.free_slots.push(s.state.slot);
                // Its slot must be emptied in the next table.
                self.mark_all_dirty();
            } else {
                k += 1;
            }
        }
        let _ = now_ms;
    }

    fn mark_all_dirty(&mut self) {
        self.force_publish = true;
        for s in &mut self.services {
            s.dirty = true;
        }
    }

    // === publishing ===

    /// The generation that will hold a change made now: the next plan's.
    fn next_generation(&self) -> u64 {
        self.generation + 1 + u64::from(self.building)
    }

    /// Publishes a new generation if anything changed: at once when every selector can be
    /// reused, else returns the blocking task that builds them.
    fn publish_if_dirty(&mut self) -> Option<JoinHandle<Built>> {
        // An operator's reply waits for a published generation: never leave one parked
        // because nothing is dirty (e.g. its service was purged meanwhile).
        if self.generation > 0
            && !self.force_publish
            && self.admin_replies.is_empty()
            && !self.services.iter().any(|s| s.dirty)
        {
            return None;
        }
        self.force_publish = false;
        // A backend leaves service immediately (its state is an atomic the published table
        // reads), but a new table built off-thread arrives later. If a changed service has
        // no usable backend left in the published table (say its only backend was
        // replaced by a reload), every connection would be turned away until then: build
        // that table here and now instead.
        let urgent = self.services.iter().any(|s| {
            s.dirty
                && s.table
                    .as_ref()
                    .is_some_and(|t| !t.backends.iter().any(|b| b.is_usable()))
        });
        let plan = self.plan();
        if urgent || !plan.needs_build() {
            self.publish_built(plan.finish());
            return None;
        }
        Some(tokio::task::spawn_blocking(move || plan.finish()))
    }

    /// Stores a status snapshot with the counters as they are now and the published
    /// services as they are: no new table, the generation stays.
    fn publish_status(&mut self) {
        self.status_dirty = false;
        let current = self.status.load();
        self.status.store(Arc::new(Status {
            generation: current.generation,
            services: current.services.clone(),
            reloads_ok: self.reloads_ok,
            reloads_err: self.reloads_err,
            last_reload: self.last_reload.clone(),
            discovery_errors: self.discovery_errors.clone(),
        }));
    }

    /// Builds and stores a new table generation and status snapshot, here and now (the
    /// first table, before meshd reports ready).
    pub fn publish(&mut self) {
        let plan = self.plan();
        self.publish_built(plan.finish());
    }

    /// The next generation's inputs: each dirty service's eligible backends (reusing its
    /// selector, or its whole table, when nothing a connection sees changed), the clean
    /// services' tables as they are, and the status snapshot.
    fn plan(&mut self) -> Plan {
        let now = Instant::now();
        self.status_dirty = false; // the counters go out with this plan
        let mut planned = Vec::with_capacity(self.services.len());
        let mut services = Vec::with_capacity(self.services.len());
        for (index, s) in self.services.iter_mut().enumerate() {
            let weights: Vec<u32> = s
                .backends
                .iter()
                .map(|b| effective_weight(b, s.config.slow_start, now))
                .collect();
            let fresh = s.dirty || s.table.is_none();
            let table = match &s.table {
                Some(t) if !fresh => Prepared::unchanged(t.clone()),
                previous => {
                    let candidates: Vec<Candidate> = s
                        .backends
                        .iter()
                        .zip(&weights)
                        .map(|(b, &w)| Candidate {
                            backend: b.backend.clone(),
                            weight: w,
                        })
                        .collect();
                    ServiceTable::prepare(
                        s.state.clone(),
                        s.config.clone(),
                        &candidates,
                        previous.as_ref(),
                    )
                }
            };
            s.dirty = false;
            planned.push(Planned {
                state: s.state.clone(),
                index,
                routed: !s.removed,
                fresh,
                table,
            });
            services.push(ServiceStatus {
                state: s.state.clone(),
                config: s.config.clone(),
                metrics: s.metrics.clone(),
                listeners: s.listeners.iter().map(|(a, _)| *a).collect(),
                backends: s
                    .backends
                    .iter()
                    .zip(&weights)
                    .map(|(b, &w)| BackendStatus {
                        backend: b.backend.clone(),
                        metrics: b.metrics.clone(),
                        weight: b.weight,
                        weight_override: b.weight_override,
                        effective_weight: if b.backend.is_usable() { w } else { 0 },
                        sources: sources_label(b.sources),
                        drain: b.drain,
                        slow_start_until: b
                            .up_since
                            .map(|u| u + s.config.slow_start)
                            .filter(|t| *t > now),
                        ejected: b.backend.is_ejected(),
                    })
                    .collect(),
                eligible: 0,
            });
        }
        Plan {
            slots: self.next_slot,
            services: planned,
            // Counters as of the plan: a reload counted here is in this generation's table.
            status: Status {
                generation: 0,
                services,
                reloads_ok: self.reloads_ok,
                reloads_err: self.reloads_err,
                last_reload: self.last_reload.clone(),
                discovery_errors: self.discovery_errors.clone(),
            },
            replies: std::mem::take(&mut self.admin_replies),
        }
    }

    /// Stores a finished plan as the next generation; its services' entries keep the
    /// tables (the next plan compares against them).
    fn publish_built(&mut self, built: Built) {
        let Built {
            mut table,
            fresh,
            mut status,
            replies,
        } = built;
        for (index, t) in fresh {
            let entry = match self.services.get_mut(index) {
                Some(s) if Arc::ptr_eq(&s.state, &t.state) => Some(s),
                _ => self
                    .services
                    .iter_mut()
                    .find(|s| Arc::ptr_eq(&s.state, &t.state)),
            };
            if let Some(s) = entry {
                s.table = Some(t);
            }
        }
        self.generation += 1;
        table.generation = self.generation;
        status.generation = self.generation;
        self.table.store(table);
        self.status.store(Arc::new(status));
        for reply in replies {
            let _ = reply.send(Ok(()));
        }
        self.start_accept_loops();
    }
}

/// The log line of an ejection refused because the backend is its service's last usable one.
fn spared_log(state: &ServiceState, backend: &Backend) {
    tracing::warn!(
        service = &*state.name,
        backend = &*backend.addr_label,
        spared_total = state.ejections_spared.load(Ordering::Relaxed),
        "backend not ejected after consecutive connect failures: it is the service's last usable backend"
    );
}

/// Makes `b` a new backend at the same address, for task `id`: the old task is gone (its
/// address was given to a new one), so its connections are closed and nothing of its
/// health, ejection or back-off carries over. The metric series (by address) stay.
fn renew(b: &mut BackendEntry, cfg: &ServiceConfig, id: Arc<str>, bit: u8, now: Instant) {
    let old = &b.backend;
    if old.state() == State::Active {
        old.set_state(State::Draining);
    }
    old.close.close();
    old.set_state(State::Gone);
    if let Some(stop) = b.checker.take() {
        stop.close();
    }
    let trusted = cfg.health.check == CheckKind::None;
    b.backend = Arc::new(Backend::new(
        old.service.clone(),
        old.addr,
        if trusted { Health::Up } else { Health::Unknown },
    ));
    b.id = Some(id);
    b.sources = bit;
    b.weight_override = None;
    b.operator_drained = false;
    b.up_since = trusted.then_some(now);
    b.drain = None;
    b.last_pass = Arc::new(AtomicU64::new(0));
    b.ejected_at = None;
    b.ejected_until = None;
}

fn start_drain(b: &mut BackendEntry, drain_timeout: Duration, now: Instant) {
    b.backend.set_state(State::Draining);
    b.drain = Some((now, now + drain_timeout));
    if let Some(stop) = b.checker.take() {
        stop.close();
    }
}

fn spawn_checker(
    b: &mut BackendEntry,
    cfg: &ServiceConfig,
    tx: &mpsc::UnboundedSender<Transition>,
) {
    if let Some(stop) = b.checker.take() {
        stop.close();
    }
    if cfg.health.check == CheckKind::None {
        return;
    }
    let stop = Arc::new(CloseSignal::new());
    tokio::spawn(health::run_checker(
        b.backend.clone(),
        cfg.health.clone(),
        b.last_pass.clone(),
        tx.clone(),
        stop.clone(),
    ));
    b.checker = Some(stop);
}

/// The weight a backend gets now: the operator's override or its configured weight, ramped
/// from 1% to full over `slow_start` after it became healthy.
fn effective_weight(b: &BackendEntry, slow_start: Duration, now: Instant) -> u32 {
    let base = b.weight_override.unwrap_or(b.weight);
    if base == 0 || slow_start.is_zero() {
        return base;
    }
    match b.up_since {
        Some(up) if now.duration_since(up) < slow_start => {
            let frac = (now.duration_since(up).as_secs_f64() / slow_start.as_secs_f64()).max(0.01);
            ((f64::from(base) * frac).ceil() as u32).clamp(1, base)
        }
        _ => base,
    }
}

fn sources_label(bits: u8) -> &'static str {
    match bits {
        0 => "none",
        1 => "static",
        2 => "dns",
        3 => "static+dns",
        4 => "docker",
        5 => "static+docker",
        6 => "dns+docker",
        _ => "static+dns+docker",
    }
}

/// The one-line message for a listener that cannot bind.
pub fn bind_error(service: &str, addr: SocketAddr, e: &std::io::Error) -> String {
    let hint = match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            "address already in use: another process (or another meshd) listens there; stop it or change listen"
        }
        std::io::ErrorKind::AddrNotAvailable => {
            "address not available: no interface of this host has that IP; use 0.0.0.0 or one of its addresses"
        }
        std::io::ErrorKind::PermissionDenied => {
            "permission denied: ports below 1024 need root or CAP_NET_BIND_SERVICE"
        }
        _ => "",
    };
    if hint.is_empty() {
        format!("service {service:?}: cannot listen on {addr}: {e}")
    } else {
        format!("service {service:?}: cannot listen on {addr}: {hint}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(weight: u32, up_since: Option<Instant>) -> BackendEntry {
        let backend = Arc::new(Backend::new(
            "s".into(),
            "127.0.0.1:1".parse().unwrap(),
            Health::Up,
        ));
        BackendEntry {
            metrics: Arc::new(BackendMetrics::new("s", "127.0.0.1:1")),
            backend,
            id: None,
            weight,
            weight_override: None,
            sources: 1,
            operator_drained: false,
            up_since,
            drain: None,
            checker: None,
            last_pass: Arc::new(AtomicU64::new(0)),
            ejected_at: None,
            ejected_until: None,
        }
    }

    /// A control plane with no config: services come from a provider only.
    fn control() -> Control {
        let (tx, rx) = mpsc::unbounded_channel();
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            mode: crate::proxy::forward::Mode::Copy,
            access_log: std::sync::atomic::AtomicBool::new(false),
            ejected: tx,
            table: TableHandle::new(),
        }));
        let mut c = Control::new(
            TableHandle::new(),
            StatusHandle::default(),
            shared,
            TaskTracker::new(),
            rx,
        );
        c.config = Some(Arc::new(
            Config::parse(std::path::Path::new("t.toml"), "[discovery.docker]\n").unwrap(),
        ));
        c
    }

    /// Service "web" with task `task` on 10.0.1.5 (if any) and another task on 10.0.1.9.
    fn swarm_service(c: &Control, task: Option<&str>) -> ServiceConfig {
        let mut s = c.config.as_ref().unwrap().defaults.clone();
        s.name = "web".into();
        s.listen = vec!["127.0.0.1:0".parse().unwrap()];
        s.health.check = CheckKind::None;
        let tasks = [("10.0.1.9:80", Some("task-z")), ("10.0.1.5:80", task)];
        s.backends = tasks
            .iter()
            .filter_map(|(a, t)| {
                Some(crate::config::BackendConfig {
                    addr: a.parse().unwrap(),
                    weight: 100,
                    id: Some((*t)?.into()),
                })
            })
            .collect();
        s
    }

    fn entry_at<'a>(c: &'a Control, addr: &str) -> Vec<&'a BackendEntry> {
        c.services[0]
            .backends
            .iter()
            .filter(|b| b.backend.addr_label.as_ref() == addr && b.backend.state() != State::Gone)
            .collect()
    }

    #[tokio::test]
    async fn a_new_task_on_an_old_tasks_address_starts_fresh() {
        let mut c = control();
        c.provided(Source::Docker, vec![swarm_service(&c, Some("task-a"))]);
        let old = entry_at(&c, "10.0.1.5:80")[0].backend.clone();
        // Task a misbehaved: ejected with a back-off, then it stopped (drains).
        old.set_ejected(true);
        old.ejections.store(4, Ordering::Relaxed);
        old.consecutive_failures.store(3, Ordering::Relaxed);
        let i = c.services[0]
            .backends
            .iter()
            .position(|b| Arc::ptr_eq(&b.backend, &old))
            .unwrap();
        c.services[0].backends[i].ejected_until = Some(Instant::now() + EJECT_MAX);
        c.provided(Source::Docker, vec![swarm_service(&c, None)]);
        assert_eq!(old.state(), State::Draining);

        // Swarm gives its address to task b.
        c.provided(Source::Docker, vec![swarm_service(&c, Some("task-b"))]);
        let live = entry_at(&c, "10.0.1.5:80");
        assert_eq!(live.len(), 1);
        let b = live[0];
        assert!(!Arc::ptr_eq(&b.backend, &old), "a new backend");
        assert_eq!(b.id.as_deref(), Some("task-b"));
        assert_eq!(b.backend.state(), State::Active);
        assert!(!b.backend.is_ejected());
        assert_eq!(b.backend.ejections.load(Ordering::Relaxed), 0);
        assert_eq!(b.backend.consecutive_failures.load(Ordering::Relaxed), 0);
        assert!(b.ejected_until.is_none());
        // The old task's connections are closed: it no longer exists.
        assert!(old.close.is_closed());
        assert_eq!(old.state(), State::Gone);
        let new = b.backend.clone();

        // The same task listed again keeps its backend (no churn).
        c.provided(Source::Docker, vec![swarm_service(&c, Some("task-b"))]);
        assert!(c.services[0]
            .backends
            .iter()
            .any(|b| Arc::ptr_eq(&b.backend, &new)));
    }

    #[test]
    fn slow_start_ramps_from_near_zero_to_full() {
        let t0 = Instant::now();
        let b = entry(100, Some(t0));
        let ss = Duration::from_secs(10);
        assert_eq!(effective_weight(&b, ss, t0), 1);
        assert_eq!(effective_weight(&b, ss, t0 + Duration::from_secs(5)), 50);
        assert_eq!(effective_weight(&b, ss, t0 + Duration::from_secs(10)), 100);
        assert_eq!(effective_weight(&b, Duration::ZERO, t0), 100);
    }

    #[test]
    fn override_and_zero_weight() {
        let mut b = entry(100, None);
        b.weight_override = Some(0);
        assert_eq!(
            effective_weight(&b, Duration::from_secs(10), Instant::now()),
            0
        );
        b.weight_override = Some(7);
        assert_eq!(effective_weight(&b, Duration::ZERO, Instant::now()), 7);
    }
}
