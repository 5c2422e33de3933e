//! The control plane: the one task that owns the desired state and decides every backend's
//! life, and the only writer of the routing table.
//!
//! Inputs (all through channels, handled one at a time, so there is no shared mutable
//! state to lock): a validated config (start and reloads), health transitions from the
//! checkers, ejections from the connection path, operator commands from the admin API,
//! providers' `discovery::Update`s (their own channel), and a 250 ms tick that advances drains, slow-start ramps and
//! ejection back-offs.
//!
//! Output: a new `RoutingTable` generation and `Status` snapshot whenever something a
//! connection would see changed (`publish.rs`). Services whose inputs did not change keep
//! their `Arc<ServiceTable>`, and a changed service whose algorithm and eligible (address,
//! weight) list did not change keeps its `Selector`; backends keep their `Arc<Backend>`
//! (identity, counters, health, connections) across every rebuild.
//!
//! ```text
//!  mod.rs        Control, Command, the event loop and dispatch; binds, spawns, logs
//!  reconcile.rs  desired state -> a pure diff (listeners to bind/close, services to remove)
//!  lifecycle.rs  BackendEntry: sources, operator ops, ejection, the tick step (pure, `now`
//!                a parameter, effects returned)
//!  publish.rs    plan -> build selectors (off the runtime thread) -> publish in order
//!  status.rs     the Status snapshot the admin API reads
//! ```
//!
//! The outlier rules (ejection threshold, back-off, re-admission) are `table::outlier`,
//! shared with the connection path.

mod lifecycle;
mod publish;
mod reconcile;
pub mod status;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;

use crate::close::CloseSignal;
use crate::config::{CheckKind, Config, Protocol, ServiceConfig};
use crate::discovery::Update;
use crate::health::{self, Transition};
use crate::metrics::ServiceMetrics;
use crate::proxy::conn::Shared;
use crate::proxy::listener::{self, AcceptLoop, Route};
use crate::proxy::udp::{self, UdpLoop};
use crate::table::sni::{SniRoutes, SniStats};
use crate::table::{Backend, Health, ServiceState, ServiceTable, TableHandle};
pub use lifecycle::{AdminError, AdminOp, Endpoint, Endpoints, Source};
use lifecycle::{BackendEntry, Effects};
use publish::Built;
use reconcile::{Listen, Running};
pub use status::{BackendStatus, ReloadResult, ServiceStatus, Status, StatusHandle};

/// How often drains, ramps and back-offs advance.
const TICK: Duration = Duration::from_millis(250);

/// Why a config could not be applied (the reload is rejected with nothing changed; at start,
/// meshd exits). Displays as the one line shown to the operator.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// A listen address cannot be bound.
    #[error("service {service:?}: cannot listen on {addr}: {}", bind_reason(.source))]
    Bind {
        service: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// A listen address moved from one service to another in one reload.
    #[error("service {service:?}: listen {addr} is still held by service {owner:?}; move it in two reloads (remove it there first)")]
    ListenHeld {
        service: String,
        addr: SocketAddr,
        owner: String,
    },
    /// A reload that would remove every running service (see `allow_empty`).
    #[error("{path}: no [[service]] in the file: it would remove every running service ({names}); add allow_empty = true at the top of the file if that is intended")]
    WouldEmpty { path: String, names: String },
}

/// Endpoint sets from a discovery provider (defined where providers make them).
pub use crate::discovery::Discovered;

pub enum Command {
    /// A validated config to apply (reload). The reply carries the error line if it could
    /// not be applied (e.g. a new listener's port is taken).
    Reload(Box<Config>, oneshot::Sender<Result<(), ControlError>>),
    /// A reload that failed to parse or validate: counted and shown, nothing changes.
    ReloadFailed(String),
    Admin {
        service: String,
        addr: SocketAddr,
        op: AdminOp,
        reply: oneshot::Sender<Result<(), AdminError>>,
    },
    /// Stop accepting on every listener (shutdown begins).
    StopListening(oneshot::Sender<()>),
    /// Close every connection still open (the shutdown grace period is over).
    CloseAll(oneshot::Sender<()>),
}

struct ServiceEntry {
    state: Arc<ServiceState>,
    metrics: Arc<ServiceMetrics>,
    config: Arc<ServiceConfig>,
    listeners: Vec<(Protocol, SocketAddr, Arc<CloseSignal>)>,
    backends: Vec<BackendEntry>,
    /// Removed from the config: no listener, backends draining; freed when all are gone.
    removed: bool,
    /// Needs a new `ServiceTable`.
    dirty: bool,
    /// Has something for `tick` (every 250 ms) to do: a draining backend, an ejection or a
    /// spared ejection to end, a slow start. Set with `dirty` (every change to a
    /// backend's state makes its service dirty) and by an ejection report; cleared by a
    /// tick that finds nothing left, so a tick walks only such services, not all 10,000
    /// backends of a large swarm.
    tick: bool,
    table: Option<Arc<ServiceTable>>,
    /// Its entry in the last published status, reused while it is not dirty; cleared
    /// where what it shows changes without a new table (listeners: `reconcile`).
    status: Option<Arc<status::ServiceStatus>>,
}

impl ServiceEntry {
    /// Its backends changed: a new table, and a look at the next tick.
    fn touch(&mut self) {
        self.dirty = true;
        self.tick = true;
    }
}

/// A listen address shared by `[service.tls]` services: owned by none of them (services
/// come and go on it across reloads; it stays bound while one lists it).
struct SniListener {
    addr: SocketAddr,
    stop: Arc<CloseSignal>,
    /// Its connections that no service took, by outcome (exported with the address as
    /// their `service` label).
    stats: Arc<SniStats>,
}

pub struct Control {
    table: TableHandle,
    status: StatusHandle,
    shared: Arc<Shared>,
    tracker: TaskTracker,
    /// The accept loops (a shutdown waits for them: their sockets are closed then).
    accepts: TaskTracker,
    /// The runtime the data plane runs on (accept loops and what they spawn), when it is
    /// not the control plane's own.
    data: Option<tokio::runtime::Handle>,
    services: Vec<ServiceEntry>,
    free_slots: Vec<usize>,
    /// Slots freed since the last plan: the next one empties them in the table and status.
    cleared_slots: Vec<usize>,
    next_slot: usize,
    generation: u64,
    health_tx: mpsc::UnboundedSender<Transition>,
    health_rx: mpsc::UnboundedReceiver<Transition>,
    ejected_rx: mpsc::UnboundedReceiver<(Arc<ServiceState>, Arc<Backend>)>,
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
    /// Running services by name, for `provided_changed`: rebuilt when a lookup finds it
    /// stale (services are added, removed and moved by `swap_remove` elsewhere), so every
    /// hit is checked against the entry it names.
    by_name: HashMap<Arc<str>, usize>,
    /// Accept loops of new listeners, started once a published table holds their service
    /// (until then the socket is bound and the kernel queues connections).
    pending_accept: Vec<AcceptLoop>,
    /// UDP listener tasks waiting the same way (until then datagrams queue in the socket).
    pending_udp: Vec<UdpLoop>,
    /// The SNI listeners that are open.
    sni: Vec<SniListener>,
    /// Their routes, as the next table publishes them.
    sni_routes: Vec<Arc<SniRoutes>>,
    /// Operators' requests applied since the last plan, answered when it is published: an
    /// API call returns once its change is in the routing table and the status.
    admin_replies: Vec<AdminReply>,
    /// A plan is being finished on a blocking thread (it will publish `generation + 1`).
    building: bool,
    /// The next plan must be published even if no service is dirty: set with
    /// `mark_all_dirty` and when a service is purged (no service may be left to be dirty,
    /// but its slot must be emptied and the status updated).
    force_publish: bool,
    /// Counters changed that no table holds (a rejected reload, a failed discovery poll):
    /// publish the status snapshot alone, keeping the generation.
    status_dirty: bool,
}

type AdminReply = oneshot::Sender<Result<(), AdminError>>;

/// `meshd_control_event_seconds{event}`: one histogram per kind of event of the control
/// loop, measuring the event and the publish it caused.
struct EventTimers {
    command: metrics::Histogram,
    discovery: metrics::Histogram,
    health: metrics::Histogram,
    ejection: metrics::Histogram,
    tick: metrics::Histogram,
    built: metrics::Histogram,
}

impl EventTimers {
    fn new() -> EventTimers {
        let h = |event: &'static str| metrics::histogram!(crate::metrics::names::CONTROL_EVENT, "event" => event);
        EventTimers {
            command: h("command"),
            discovery: h("discovery"),
            health: h("health"),
            ejection: h("ejection"),
            tick: h("tick"),
            built: h("built"),
        }
    }
}

/// A socket bound for a new listener, before its task starts.
enum Bound {
    Tcp(std::net::TcpListener),
    Udp(std::net::UdpSocket),
}

impl Control {
    pub fn new(
        table: TableHandle,
        status: StatusHandle,
        shared: Arc<Shared>,
        tracker: TaskTracker,
        ejected_rx: mpsc::UnboundedReceiver<(Arc<ServiceState>, Arc<Backend>)>,
    ) -> Control {
        let (health_tx, health_rx) = mpsc::unbounded_channel();
        Control {
            table,
            status,
            shared,
            tracker,
            accepts: TaskTracker::new(),
            data: None,
            services: Vec::new(),
            by_name: HashMap::new(),
            free_slots: Vec::new(),
            cleared_slots: Vec::new(),
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
            pending_udp: Vec::new(),
            sni: Vec::new(),
            sni_routes: Vec::new(),
            admin_replies: Vec::new(),
            building: false,
            force_publish: false,
            status_dirty: false,
        }
    }

    /// Runs the data plane on `data`: listeners are registered with its reactor and their
    /// accept loops spawned on it, so that the control plane's work (decoding a discovery
    /// answer, publishing a table) never holds a thread a connection waits on.
    pub fn set_data_runtime(&mut self, data: tokio::runtime::Handle) {
        self.data = Some(data);
    }

    /// Runs `f` inside the data plane's runtime, if it has its own: a socket converted
    /// from std there registers with that runtime's reactor.
    fn on_data<T>(&self, f: impl FnOnce() -> T) -> T {
        let _entered = self.data.as_ref().map(|h| h.enter());
        f()
    }

    /// Spawns an accept loop on the data plane's runtime.
    fn spawn_accept<F>(&self, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        match &self.data {
            Some(h) => drop(self.accepts.spawn_on(task, h)),
            None => drop(self.accepts.spawn(task)),
        }
    }

    /// Applies the first config: binds every listener (any failure is fatal and nothing is
    /// left bound), then publishes generation 1.
    pub fn start(&mut self, config: &Config) -> Result<(), ControlError> {
        self.apply(config)?;
        Ok(())
    }

    /// Applies a provider's update and publishes the next table generation as `run` does,
    /// and returns how long this took on the calling thread (the control thread, in `run`;
    /// selectors built on a blocking thread excluded): the stall the data plane sees.
    /// Then, untimed, a tick (drained backends with no connection leave). For
    /// benches/control.rs.
    #[doc(hidden)]
    pub async fn apply_timed(&mut self, update: Update) -> Duration {
        let t = Instant::now();
        self.update(update);
        let job = self.publish_if_dirty();
        let mut held = t.elapsed();
        if let Some(job) = job {
            if let Ok(built) = job.await {
                let t = Instant::now();
                self.publish_built(built);
                held += t.elapsed();
            }
        }
        self.tick();
        held
    }

    /// A health transition of backend `index` of service `service` (found untimed), as
    /// the control loop applies it: located, recorded, and the next generation published;
    /// returns how long that held the calling thread. For benches/control.rs.
    #[doc(hidden)]
    pub async fn health_timed(&mut self, service: &str, index: usize, up: bool) -> Duration {
        let si = self.index_of(service).expect("a running service");
        let t = Transition {
            service: self.services[si].state.clone(),
            backend: self.services[si].backends[index].backend.clone(),
            health: if up { Health::Up } else { Health::Down },
        };
        let start = Instant::now();
        self.health(t);
        let job = self.publish_if_dirty();
        let mut held = start.elapsed();
        if let Some(job) = job {
            if let Ok(built) = job.await {
                let t = Instant::now();
                self.publish_built(built);
                held += t.elapsed();
            }
        }
        held
    }

    /// The accept loops' tracker: once `Command::StopListening` is answered, closing it and
    /// waiting returns when every listening socket is closed.
    pub fn accept_loops(&self) -> TaskTracker {
        self.accepts.clone()
    }

    /// Runs until every sender of `commands` is gone.
    pub async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut updates: mpsc::Receiver<Update>,
    ) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The generation whose selectors are being built on a blocking thread. One at a
        // time: generations are published in the order they were planned, so an older
        // state finishing late never replaces a newer one. Changes that arrive meanwhile
        // mark their services dirty and go into the next plan.
        let mut building: Option<JoinHandle<Built>> = None;
        // How long each event holds this task, as `meshd_control_event_seconds`. In the
        // binary the data plane has threads of its own; where both share a runtime (a
        // library user's single one), this is how long connections on it waited.
        let held = EventTimers::new();
        loop {
            let (event, started);
            tokio::select! {
                cmd = commands.recv() => {
                    (event, started) = (&held.command, Instant::now());
                    match cmd {
                        Some(cmd) => self.command(cmd),
                        None => return,
                    }
                }
                Some(u) = updates.recv() => {
                    (event, started) = (&held.discovery, Instant::now());
                    self.update(u)
                }
                Some(t) = self.health_rx.recv() => {
                    (event, started) = (&held.health, Instant::now());
                    self.health(t)
                }
                Some((s, b)) = self.ejected_rx.recv() => {
                    (event, started) = (&held.ejection, Instant::now());
                    self.eject(&s, &b)
                }
                _ = tick.tick() => {
                    (event, started) = (&held.tick, Instant::now());
                    self.tick()
                }
                built = async {
                    match building.as_mut() {
                        Some(job) => job.await,
                        None => std::future::pending().await,
                    }
                } => {
                    (event, started) = (&held.built, Instant::now());
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
            event.record(started.elapsed());
        }
    }

    /// A discovery provider's update.
    fn update(&mut self, update: Update) {
        match update {
            Update::Endpoints(p, sets) => self.discovered(p.into(), sets),
            Update::Services(p, services) => self.provided(p.into(), services),
            Update::Changed(p, services, changed) => {
                self.provided_changed(p.into(), services, &changed)
            }
            Update::Failed(p) => {
                let provider = p.name();
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
        }
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Reload(cfg, reply) => {
                let r = self.refuse_emptying(&cfg).and_then(|()| self.apply(&cfg));
                let error = r.as_ref().err().map(ToString::to_string);
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
            Command::StopListening(reply) => {
                for s in &mut self.services {
                    s.status = None;
                    for (_, _, stop) in s.listeners.drain(..) {
                        stop.close();
                    }
                }
                for l in self.sni.drain(..) {
                    l.stop.close();
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
    fn refuse_emptying(&self, config: &Config) -> Result<(), ControlError> {
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
        Err(ControlError::WouldEmpty {
            path: config.path.display().to_string(),
            names: names.join(", "),
        })
    }

    /// Applies a config (start or reload): binding a new listener fails the whole reload
    /// with nothing changed.
    fn apply(&mut self, config: &Config) -> Result<(), ControlError> {
        self.reconcile(Some(config), true)?;
        self.config = Some(Arc::new(config.clone()));
        self.shared
            .access_log
            .store(config.log.access_log, Ordering::Relaxed);
        Ok(())
    }

    /// Makes the running services match `config` (or the last applied config) plus what
    /// discovery provides (`reconcile::diff`). With `strict`, a listener that cannot bind
    /// fails the whole call before anything changed (a reload); otherwise it is logged and
    /// skipped (discovery).
    fn reconcile(&mut self, config: Option<&Config>, strict: bool) -> Result<(), ControlError> {
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
        let desired = reconcile::desired(config, &self.endpoints, &self.provided);
        // Listeners may open and close below: every service's status is built afresh.
        for s in &mut self.services {
            s.status = None;
        }
        let running: Vec<Running<'_>> = self
            .services
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.removed)
            .map(|(index, s)| Running {
                index,
                name: &s.state.name,
                listen: s.listeners.iter().map(|(p, a, _)| (*p, *a)).collect(),
            })
            .collect();
        let sni_running: Vec<SocketAddr> = self.sni.iter().map(|l| l.addr).collect();
        let diff = reconcile::diff(&running, &desired, &sni_running);

        // 1. Bind every new listen address first: if one fails, nothing has changed.
        let mut bound: Vec<Vec<(SocketAddr, Bound)>> = desired.iter().map(|_| Vec::new()).collect();
        let mut bound_sni: Vec<(SocketAddr, std::net::TcpListener)> = Vec::new();
        for step in diff.listen {
            let err = match step {
                Listen::Held(e) => e,
                Listen::BindSni { service, addr } => {
                    let svc = &desired[service].0;
                    match listener::bind(addr, svc.backlog) {
                        Ok(l) => {
                            bound_sni.push((addr, l));
                            continue;
                        }
                        Err(source) => ControlError::Bind {
                            service: svc.name.clone(),
                            addr,
                            source,
                        },
                    }
                }
                Listen::Bind {
                    service,
                    protocol,
                    addr,
                } => {
                    let svc = &desired[service].0;
                    let r = match protocol {
                        Protocol::Tcp => listener::bind(addr, svc.backlog).map(Bound::Tcp),
                        Protocol::Udp => udp::bind(addr).map(Bound::Udp),
                    };
                    match r {
                        Ok(l) => {
                            bound[service].push((addr, l));
                            continue;
                        }
                        Err(source) => ControlError::Bind {
                            service: svc.name.clone(),
                            addr,
                            source,
                        },
                    }
                }
            };
            if strict {
                return Err(err);
            }
            tracing::error!("{err}");
        }

        // 2. Services no longer desired: stop accepting, drain their backends.
        let now = Instant::now();
        for &i in &diff.remove {
            let s = &mut self.services[i];
            s.removed = true;
            s.touch();
            for (_, _, stop) in s.listeners.drain(..) {
                stop.close();
            }
            for b in &mut s.backends {
                b.sources = 0;
                b.retire(s.config.drain_timeout, now);
            }
            tracing::info!(
                service = &*s.state.name,
                "service removed: listeners closed, backends draining"
            );
        }
        // SNI listeners no service lists any more.
        self.sni.retain(|l| {
            let gone = diff.sni_close.contains(&l.addr);
            if gone {
                l.stop.close();
                tracing::info!(listen = %l.addr, "SNI listener closed");
            }
            !gone
        });
        // Listeners the config no longer lists.
        for &(i, protocol, addr) in &diff.close {
            let s = &mut self.services[i];
            s.listeners.retain(|(p, a, stop)| {
                let gone = *p == protocol && *a == addr;
                if gone {
                    stop.close();
                    tracing::info!(service = &*s.state.name, listen = %a, protocol = p.name(), "listener closed");
                }
                !gone
            });
        }

        // 3. New and changed services.
        let mut tls_services: Vec<usize> = Vec::new();
        for ((cfg, sets), (matched, bound)) in
            desired.iter().zip(diff.matched.into_iter().zip(bound))
        {
            let idx = match matched {
                Some(i) => i,
                None => self.add_service(cfg),
            };
            if cfg.tls.is_some() && cfg.protocol == Protocol::Tcp {
                tls_services.push(idx);
            }
            let health_changed = self.services[idx].config.health != cfg.health;
            if *self.services[idx].config != *cfg {
                self.services[idx].config = Arc::new(cfg.clone());
                self.services[idx].touch();
            }
            self.services[idx]
                .state
                .udp
                .enabled
                .store(cfg.protocol == Protocol::Udp, Ordering::Relaxed);
            for (a, l) in bound {
                self.start_listener(idx, a, l);
            }
            for (source, wanted) in sets {
                let s = &mut self.services[idx];
                let fx = lifecycle::set_source(
                    &s.state.name,
                    &mut s.backends,
                    &s.config,
                    *source,
                    wanted,
                    now,
                );
                self.effects(idx, fx);
            }
            if health_changed {
                let s = &mut self.services[idx];
                let fx = lifecycle::health_config_changed(&mut s.backends, &s.config, now);
                self.effects(idx, fx);
            }
        }
        for (addr, l) in bound_sni {
            self.start_sni_listener(addr, l);
        }
        self.route_sni(&diff.sni, &tls_services);
        Ok(())
    }

    /// Rebuilds the SNI routes of every open SNI listener from the `[service.tls]`
    /// services (`tls`: their indices, in config order); the next table publishes them
    /// when they changed.
    fn route_sni(&mut self, wanted: &[SocketAddr], tls: &[usize]) {
        let services: Vec<(&ServiceConfig, Arc<ServiceState>)> = tls
            .iter()
            .map(|&i| (&*self.services[i].config, self.services[i].state.clone()))
            .collect();
        let routes: Vec<Arc<SniRoutes>> = self
            .sni
            .iter()
            .filter(|l| wanted.contains(&l.addr))
            .map(|l| Arc::new(SniRoutes::build(l.addr, l.stats.clone(), &services)))
            .collect();
        let same = routes.len() == self.sni_routes.len()
            && routes
                .iter()
                .zip(&self.sni_routes)
                .all(|(a, b)| a.same_as(b));
        if !same {
            self.sni_routes = routes;
            self.force_publish = true;
        }
    }

    /// A provider's complete set of endpoints for the services it knows about (DNS: per
    /// configured service; Docker: per Swarm service). Replaces its previous sets.
    fn discovered(&mut self, source: Source, sets: Vec<Discovered>) {
        self.endpoints.retain(|((src, _), _)| *src != source);
        for set in sets {
            let endpoints = set
                .endpoints
                .into_iter()
                .map(|(a, w)| Endpoint::at(a, w))
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

    /// `Update::Changed`: a provider's list in which only the services at `changed`
    /// differ from its previous one. When each of those keeps its name, listen addresses,
    /// protocol and TLS routing, and no configured service of that name takes its
    /// endpoints, only those services are updated: O(what changed), not O(what runs) (at
    /// 1,000 services the whole reconcile holds the runtime thread ~10 ms per poll,
    /// docs/BENCHMARKS.md). Anything else takes the whole reconcile (`provided`).
    fn provided_changed(
        &mut self,
        source: Source,
        services: Vec<ServiceConfig>,
        changed: &[usize],
    ) {
        let Some(plan) = self.plan_in_place(source, &services, changed) else {
            return self.provided(source, services);
        };
        let now = Instant::now();
        for (idx, i) in plan {
            let cfg = &services[i];
            let health_changed = self.services[idx].config.health != cfg.health;
            if *self.services[idx].config != *cfg {
                self.services[idx].config = Arc::new(cfg.clone());
                self.services[idx].touch();
            }
            let wanted = reconcile::endpoints_of(&cfg.backends);
            let s = &mut self.services[idx];
            let fx = lifecycle::set_source(
                &s.state.name,
                &mut s.backends,
                &s.config,
                source,
                &wanted,
                now,
            );
            self.effects(idx, fx);
            if health_changed {
                let s = &mut self.services[idx];
                let fx = lifecycle::health_config_changed(&mut s.backends, &s.config, now);
                self.effects(idx, fx);
            }
        }
        let Some(slot) = self.provided.iter_mut().find(|(src, _)| *src == source) else {
            unreachable!("plan_in_place found the source's list");
        };
        let old = std::mem::replace(&mut slot.1, services);
        // 1,000 services' worth of memory is freed off the runtime thread too.
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(move || {
                crate::sys::background_thread();
                drop(old)
            })),
            Err(_) => drop(old),
        }
    }

    /// For `provided_changed`: (running service, index in `services`) for each changed
    /// service, or `None` when the change needs the whole reconcile.
    fn plan_in_place(
        &mut self,
        source: Source,
        services: &[ServiceConfig],
        changed: &[usize],
    ) -> Option<Vec<(usize, usize)>> {
        let config = self.config.clone()?;
        let old = &self.provided.iter().find(|(src, _)| *src == source)?.1;
        // Another source's services could take a name first (`reconcile::desired`).
        let alone = self
            .provided
            .iter()
            .all(|(src, l)| *src == source || l.is_empty());
        if !alone || old.len() != services.len() {
            return None;
        }
        let mut names = Vec::with_capacity(changed.len());
        for &i in changed {
            let (new, old) = (services.get(i)?, &old[i]);
            let same_routing = new.name == old.name
                && new.listen == old.listen
                && new.protocol == old.protocol
                && new.tls == old.tls;
            if !same_routing || config.services.iter().any(|s| s.name == new.name) {
                return None;
            }
            names.push((i, old.clone()));
        }
        let mut plan = Vec::with_capacity(names.len());
        for (i, old) in names {
            let idx = self.index_of(&old.name)?;
            // What runs must be what the provider last sent, or the delta does not apply.
            if *self.services[idx].config != old {
                return None;
            }
            plan.push((idx, i));
        }
        Some(plan)
    }

    /// The running (not removed) service called `name`.
    fn index_of(&mut self, name: &str) -> Option<usize> {
        let hit = |services: &[ServiceEntry], i: usize| {
            services
                .get(i)
                .is_some_and(|s| !s.removed && &*s.state.name == name)
        };
        if let Some(&i) = self.by_name.get(name) {
            if hit(&self.services, i) {
                return Some(i);
            }
        }
        self.by_name = self
            .services
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.removed)
            .map(|(i, s)| (s.state.name.clone(), i))
            .collect();
        self.by_name
            .get(name)
            .copied()
            .filter(|&i| hit(&self.services, i))
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
            tick: true,
            table: None,
            status: None,
        });
        self.services.len() - 1
    }

    fn start_listener(&mut self, idx: usize, addr: SocketAddr, l: Bound) {
        let l = match l {
            Bound::Tcp(l) => l,
            Bound::Udp(u) => return self.start_udp(idx, addr, u),
        };
        let listener = self.on_data(|| tokio::net::TcpListener::from_std(l));
        let s = &mut self.services[idx];
        let listener = match listener {
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
            route: Route::Service(s.state.clone()),
            table: self.table.clone(),
            shared: self.shared.clone(),
            tracker: self.tracker.clone(),
            stop: stop.clone(),
        });
        tracing::info!(service = &*s.state.name, listen = %addr, "listener bound");
        s.listeners.push((Protocol::Tcp, addr, stop));
    }

    /// An SNI listener: its accept loop starts once a published table holds its routes.
    fn start_sni_listener(&mut self, addr: SocketAddr, l: std::net::TcpListener) {
        let listener = self.on_data(|| tokio::net::TcpListener::from_std(l));
        let listener = match listener {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(listen = %addr, error = %e, "cannot register SNI listener");
                return;
            }
        };
        let stop = Arc::new(CloseSignal::new());
        self.pending_accept.push(AcceptLoop {
            listener,
            route: Route::Sni(addr),
            table: self.table.clone(),
            shared: self.shared.clone(),
            tracker: self.tracker.clone(),
            stop: stop.clone(),
        });
        tracing::info!(listen = %addr, "SNI listener bound");
        self.sni.push(SniListener {
            addr,
            stop,
            stats: Arc::new(SniStats::new(addr)),
        });
    }

    fn start_udp(&mut self, idx: usize, addr: SocketAddr, u: std::net::UdpSocket) {
        let socket = self.on_data(|| tokio::net::UdpSocket::from_std(u));
        let s = &mut self.services[idx];
        let socket = match socket {
            Ok(u) => u,
            Err(e) => {
                tracing::error!(service = &*s.state.name, listen = %addr, error = %e, "cannot register UDP listener");
                return;
            }
        };
        let stop = Arc::new(CloseSignal::new());
        // Started like an accept loop, once a published table holds the service with an
        // eligible backend (`start_accept_loops`).
        self.pending_udp.push(UdpLoop::new(
            socket,
            s.state.clone(),
            self.table.clone(),
            self.shared.clone(),
            stop.clone(),
        ));
        tracing::info!(service = &*s.state.name, listen = %addr, protocol = "udp", "listener bound");
        s.listeners.push((Protocol::Udp, addr, stop));
    }

    /// Spawns the accept loops whose service the published table now holds, and those
    /// already stopped (they return at once and release their socket).
    fn start_accept_loops(&mut self) {
        if self.pending_accept.is_empty() && self.pending_udp.is_empty() {
            return;
        }
        let table = self.table.load();
        // A UDP listener starts reading once its service has an eligible backend: a
        // datagram read before would be dropped (UDP has no queue_timeout), while in the
        // socket it waits (and after a hand-off, the predecessor still reads it).
        let mut k = 0;
        while k < self.pending_udp.len() {
            let l = &self.pending_udp[k];
            if l.stop.is_closed()
                || table
                    .service(&l.service)
                    .is_some_and(|s| !s.backends.is_empty())
            {
                let l = self.pending_udp.swap_remove(k);
                self.spawn_accept(l.run());
            } else {
                k += 1;
            }
        }
        let mut k = 0;
        while k < self.pending_accept.len() {
            let l = &self.pending_accept[k];
            let routed = match &l.route {
                Route::Service(s) => table.service(s).is_some(),
                Route::Sni(addr) => table.sni(*addr).is_some(),
            };
            if l.stop.is_closed() || routed {
                let l = self.pending_accept.swap_remove(k);
                self.spawn_accept(l.run());
            } else {
                k += 1;
            }
        }
    }

    // === backends: lifecycle steps and their effects ===

    /// Carries out what a lifecycle step asks for: marks the service dirty, starts health
    /// checkers.
    fn effects(&mut self, idx: usize, fx: Effects) {
        let s = &mut self.services[idx];
        if fx.dirty {
            s.touch();
        }
        for i in fx.start_checkers {
            if let Some(b) = s.backends.get_mut(i) {
                spawn_checker(&s.state, b, &s.config, &self.health_tx);
            }
        }
    }

    fn health(&mut self, t: Transition) {
        let Some((si, bi)) = self.locate(&t.service, &t.backend) else {
            return;
        };
        let s = &mut self.services[si];
        let b = &mut s.backends[bi];
        b.health_changed(t.health, Instant::now());
        match t.health {
            Health::Up => {
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
        s.touch();
    }

    /// A backend ejected by passive outlier detection (or spared: see
    /// `ServiceTable::eject`).
    fn eject(&mut self, service: &Arc<ServiceState>, backend: &Arc<Backend>) {
        let Some((si, bi)) = self.locate(service, backend) else {
            return;
        };
        let s = &mut self.services[si];
        let fx = lifecycle::eject(
            &s.state,
            &mut s.backends,
            &s.config,
            bi,
            Instant::now(),
            health::now_ms(),
        );
        // A spared ejection is not dirty, but its end is the tick's to see.
        s.tick = true;
        self.effects(si, fx);
    }

    /// Where `backend` of `service` is: (index in `services`, index in its backends). The
    /// service by the name cache (as it is: a removed service, which the cache leaves out,
    /// is found by a scan of the services, not of their backends), then the backend among
    /// that service's own. A health transition or an ejection report used to scan every
    /// backend of every service (10,000 in a large swarm).
    fn locate(
        &self,
        service: &Arc<ServiceState>,
        backend: &Arc<Backend>,
    ) -> Option<(usize, usize)> {
        let mine = |i: &usize| {
            self.services
                .get(*i)
                .is_some_and(|s| Arc::ptr_eq(&s.state, service))
        };
        let si = match self.by_name.get(&*service.name).copied().filter(mine) {
            Some(si) => si,
            None => self
                .services
                .iter()
                .position(|s| Arc::ptr_eq(&s.state, service))?,
        };
        let bi = self.services[si]
            .backends
            .iter()
            .position(|b| Arc::ptr_eq(&b.backend, backend))?;
        Some((si, bi))
    }

    fn admin(&mut self, service: &str, addr: SocketAddr, op: AdminOp) -> Result<(), AdminError> {
        let Some(idx) = self
            .services
            .iter()
            .position(|s| !s.removed && *s.state.name == *service)
        else {
            return Err(AdminError::NoService(service.to_string()));
        };
        let s = &mut self.services[idx];
        let fx = lifecycle::admin(
            service,
            &mut s.backends,
            &s.config,
            addr,
            op,
            Instant::now(),
        )?;
        self.effects(idx, fx);
        Ok(())
    }

    // === time ===

    fn tick(&mut self) {
        let now = Instant::now();
        // Only services with something pending: the others' backends would all be
        // walked for nothing (10,000 of them, every 250 ms, in a large swarm).
        for s in self.services.iter_mut().filter(|s| s.tick) {
            let fx = lifecycle::tick(&s.state.name, &mut s.backends, &s.config, TICK, now);
            debug_assert!(fx.start_checkers.is_empty());
            s.dirty |= fx.dirty;
            s.tick = lifecycle::tick_pending(&s.backends, &s.config, TICK, now);
        }
        // Services removed from the config whose backends have all drained.
        let mut k = 0;
        while k < self.services.len() {
            if self.services[k].removed && self.services[k].backends.is_empty() {
                let s = self.services.swap_remove(k);
                self.free_slots.push(s.state.slot);
                // Its slot must be emptied in the next table and status (even if no
                // service is left to be dirty).
                self.cleared_slots.push(s.state.slot);
                self.force_publish = true;
            } else {
                k += 1;
            }
        }
    }

    fn mark_all_dirty(&mut self) {
        self.force_publish = true;
        for s in &mut self.services {
            s.touch();
        }
    }
}

/// Starts `b`'s health checker (stopping the one it had), unless the service has no check.
fn spawn_checker(
    service: &Arc<ServiceState>,
    b: &mut BackendEntry,
    cfg: &ServiceConfig,
    tx: &mpsc::UnboundedSender<Transition>,
) {
    b.stop_checker();
    if cfg.health.check == CheckKind::None {
        return;
    }
    let stop = Arc::new(CloseSignal::new());
    tokio::spawn(health::run_checker(
        service.clone(),
        b.backend.clone(),
        cfg.health.clone(),
        b.last_pass.clone(),
        tx.clone(),
        stop.clone(),
    ));
    b.checker = Some(stop);
}

/// What a failed bind means, and what to do about it.
fn bind_reason(e: &std::io::Error) -> String {
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
        _ => return e.to_string(),
    };
    hint.to_string()
}

/// The one-line message for a listener that cannot bind (as `ControlError::Bind` shows it).
pub fn bind_error(service: &str, addr: SocketAddr, e: &std::io::Error) -> String {
    format!(
        "service {service:?}: cannot listen on {addr}: {}",
        bind_reason(e)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::outlier::EJECT_MAX;
    use crate::table::State;

    /// A control plane with no config: services come from a provider only.
    fn control() -> Control {
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            mode: crate::proxy::forward::Mode::Copy,
            access_log: std::sync::atomic::AtomicBool::new(false),
            ejected: tx,
            table: TableHandle::new(),
        });
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
                    node: None,
                    local: false,
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

    /// Each running service: its config and its backends (address, state, task, sources,
    /// weight), by name.
    #[allow(clippy::type_complexity)]
    fn summary(
        c: &Control,
    ) -> Vec<(
        String,
        ServiceConfig,
        Vec<(String, State, Option<Arc<str>>, u8, u32)>,
    )> {
        let mut out: Vec<_> = c
            .services
            .iter()
            .filter(|s| !s.removed)
            .map(|s| {
                let mut b: Vec<_> = s
                    .backends
                    .iter()
                    .map(|b| {
                        let addr = b.backend.addr_label.to_string();
                        (addr, b.backend.state(), b.id.clone(), b.sources, b.weight)
                    })
                    .collect();
                b.sort_by(|x, y| (&x.0, &x.2).cmp(&(&y.0, &y.2)));
                (s.state.name.to_string(), (*s.config).clone(), b)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// `Update::Changed` touches only the services that changed, and leaves the control
    /// plane exactly as the whole reconcile of the same list does; a change of routing
    /// (listen addresses) or of the list's names takes the whole reconcile.
    #[tokio::test]
    async fn changed_services_are_applied_in_place_like_a_whole_reconcile() {
        let (mut whole, mut delta) = (control(), control());
        let web = |c: &Control, task: &str| swarm_service(c, Some(task));
        let api = |c: &Control, check: CheckKind| {
            let mut s = swarm_service(c, Some("task-q"));
            s.name = "api".into();
            s.health.check = check;
            s
        };
        let mut steps = vec![
            vec![web(&whole, "task-a"), api(&whole, CheckKind::None)],
            // A task replaced (a rolling update's step).
            vec![web(&whole, "task-b"), api(&whole, CheckKind::None)],
            // A health setting changed.
            vec![web(&whole, "task-b"), api(&whole, CheckKind::Tcp)],
            // Nothing changed.
            vec![web(&whole, "task-b"), api(&whole, CheckKind::Tcp)],
        ];
        // A listen address changed: the whole reconcile (it binds).
        let mut moved = web(&whole, "task-b");
        moved.listen = vec!["127.0.0.2:0".parse().unwrap()];
        steps.push(vec![moved, api(&whole, CheckKind::Tcp)]);
        let in_place = [true, true, true, false];

        whole.provided(Source::Docker, steps[0].clone());
        delta.provided(Source::Docker, steps[0].clone());
        assert_eq!(summary(&whole), summary(&delta));
        for (k, pair) in steps.windows(2).enumerate() {
            let (old, new) = (&pair[0], &pair[1]);
            let changed: Vec<usize> = (0..new.len()).filter(|&i| old[i] != new[i]).collect();
            let planned = delta.plan_in_place(Source::Docker, new, &changed).is_some();
            assert_eq!(planned, in_place[k], "step {}", k + 1);
            whole.provided(Source::Docker, new.clone());
            delta.provided_changed(Source::Docker, new.clone(), &changed);
            assert_eq!(summary(&whole), summary(&delta), "step {}", k + 1);
            assert_eq!(delta.provided[0].1, *new);
        }
        // The replaced task no longer routes (its address went to task b: gone at once);
        // the new one is active.
        let web_backends = &summary(&delta)[1].2;
        assert!(web_backends
            .iter()
            .all(|b| b.2.as_deref() != Some("task-a") || b.1 == State::Gone));
        assert!(web_backends
            .iter()
            .any(|b| b.2.as_deref() == Some("task-b") && b.1 == State::Active));

        // What runs is not what the delta assumes (a service removed meanwhile): the whole
        // reconcile, never a half-applied delta.
        let mut gone = steps[4].clone();
        gone[0].backends.clear();
        delta
            .services
            .iter_mut()
            .for_each(|s| s.removed |= &*s.state.name == "web");
        assert!(delta.plan_in_place(Source::Docker, &gone, &[0]).is_none());
    }

    #[tokio::test]
    async fn ticks_walk_only_services_with_something_pending() {
        let mut c = control();
        let steady = |c: &Control, task: Option<&str>| {
            let mut s = swarm_service(c, task);
            s.slow_start = Duration::ZERO;
            s
        };
        c.provided(Source::Docker, vec![steady(&c, Some("task-a"))]);
        assert!(
            c.services[0].tick,
            "a changed service is looked at by the next tick"
        );
        c.tick();
        assert!(
            !c.services[0].tick,
            "nothing pending: left out of the ticks"
        );

        // Task a stops: its backend drains, which the ticks must finish.
        c.provided(Source::Docker, vec![steady(&c, None)]);
        let a = c.services[0]
            .backends
            .iter()
            .find(|b| b.backend.addr_label.as_ref() == "10.0.1.5:80")
            .map(|b| b.backend.clone())
            .expect("task a's backend");
        assert_eq!(a.state(), State::Draining);
        assert!(c.services[0].tick);
        c.tick();
        assert_eq!(
            a.state(),
            State::Gone,
            "no connection left: drained at the tick"
        );
        assert_eq!(c.services[0].backends.len(), 1);
        assert!(!c.services[0].tick);

        // An ejection report (here a spared one: the connection path would not eject the
        // last usable backend, marked it spared and reported it) is watched by the ticks
        // until its failure streak ends.
        let z = c.services[0].backends[0].backend.clone();
        z.consecutive_failures.store(5, Ordering::Relaxed);
        assert!(z.mark_eject_spared());
        let web = c.services[0].state.clone();
        c.eject(&web, &z);
        assert!(c.services[0].tick);
        c.tick();
        assert!(c.services[0].tick, "the streak goes on: still pending");
        z.consecutive_failures.store(0, Ordering::Relaxed);
        c.tick();
        assert!(
            !z.is_eject_spared(),
            "the streak ended: cleared by the tick"
        );
        assert!(!c.services[0].tick);
    }

    #[tokio::test]
    async fn a_backend_is_located_within_its_own_service() {
        let mut c = control();
        let named = |c: &Control, name: &str| {
            let mut s = swarm_service(c, Some("task-a"));
            s.name = name.into();
            s
        };
        c.provided(Source::Docker, vec![named(&c, "web"), named(&c, "api")]);
        let (web, api) = (c.services[0].state.clone(), c.services[1].state.clone());
        let b = c.services[1].backends[1].backend.clone();
        assert_eq!(c.locate(&api, &b), Some((1, 1)));
        // The same address in another service is another backend.
        assert_eq!(c.locate(&web, &b), None);
        // A removed service (draining, left out of the name cache) is still found.
        c.provided(Source::Docker, vec![named(&c, "web")]);
        assert!(c.services[1].removed);
        assert_eq!(c.locate(&api, &b), Some((1, 1)));
    }

    /// The published table and status, by slot: (service name, table, status entry).
    #[allow(clippy::type_complexity)]
    fn published(
        c: &Control,
    ) -> Vec<(
        usize,
        Option<Arc<ServiceTable>>,
        Option<Arc<status::ServiceStatus>>,
    )> {
        let (t, st) = (c.table.load(), c.status.load());
        (0..c.next_slot)
            .map(|i| {
                let table = t.services.get(i).cloned().flatten();
                (i, table, st.services.get(i).cloned().flatten())
            })
            .collect()
    }

    /// What a rebuild of every slot would publish: each service's own table (unless
    /// removed) and status entry in its slot, nothing in a free slot.
    fn assert_published_matches_services(c: &Control) {
        for (slot, table, status) in published(c) {
            match c.services.iter().find(|s| s.state.slot == slot) {
                Some(s) => {
                    let want = s.table.as_ref().filter(|_| !s.removed);
                    assert_eq!(table.is_some(), want.is_some(), "slot {slot}");
                    if let (Some(t), Some(w)) = (&table, want) {
                        assert!(Arc::ptr_eq(t, w), "slot {slot}: not its table");
                    }
                    let st = status.expect("a status entry");
                    assert!(Arc::ptr_eq(&st, s.status.as_ref().unwrap()), "slot {slot}");
                    assert!(Arc::ptr_eq(&st.state, &s.state));
                }
                None => assert!(table.is_none() && status.is_none(), "free slot {slot}"),
            }
        }
    }

    /// Both set and the same `Arc`.
    fn same<T>(x: &Option<Arc<T>>, y: &Option<Arc<T>>) -> bool {
        matches!((x, y), (Some(x), Some(y)) if Arc::ptr_eq(x, y))
    }

    async fn publish(c: &mut Control) {
        if let Some(job) = c.publish_if_dirty() {
            let built = job.await.unwrap();
            c.publish_built(built);
        }
    }

    /// A publish rewrites only the slots of the services that changed (the others are
    /// the last generation's, shared), empties a purged service's slot, and fills a slot
    /// taken again: always what a rebuild of every slot would give.
    #[tokio::test]
    async fn a_publish_rewrites_only_the_slots_that_changed() {
        let mut c = control();
        let named = |c: &Control, name: &str, task: &str| {
            let mut s = swarm_service(c, Some(task));
            s.name = name.into();
            s
        };
        let list = |c: &Control, b_task: &str| {
            ["a", "b", "c"].map(|n| named(c, n, if n == "b" { b_task } else { "task-a" }))
        };
        c.provided(Source::Docker, list(&c, "task-a").into());
        publish(&mut c).await;
        assert_published_matches_services(&c);
        let before = published(&c);
        assert!(before.iter().all(|(_, t, s)| t.is_some() && s.is_some()));

        // Service b's task is replaced (a poll's delta; a whole reconcile rebuilds every
        // status entry, listeners may have changed): its slot changes, the others' are
        // shared.
        c.provided_changed(Source::Docker, list(&c, "task-b").into(), &[1]);
        publish(&mut c).await;
        assert_published_matches_services(&c);
        let b = c.services.iter().find(|s| &*s.state.name == "b").unwrap();
        let b_slot = b.state.slot;
        for ((slot, t0, s0), (_, t1, s1)) in before.iter().zip(&published(&c)) {
            assert_eq!(same(t0, t1), *slot != b_slot, "table of slot {slot}");
            assert_eq!(same(s0, s1), *slot != b_slot, "status of slot {slot}");
        }

        // b withdrawn: no longer routed, still shown while its backends drain.
        let withdrawn = [named(&c, "a", "task-a"), named(&c, "c", "task-a")];
        c.provided(Source::Docker, withdrawn.to_vec());
        publish(&mut c).await;
        assert_published_matches_services(&c);
        assert!(published(&c)[b_slot].1.is_none());
        assert!(published(&c)[b_slot].2.is_some());
        // Drained (no connection), purged: its slot is emptied in both.
        let deadline = Instant::now() + Duration::from_secs(10);
        while c.services.len() == 3 {
            assert!(Instant::now() < deadline, "b was never purged");
            c.tick();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        publish(&mut c).await;
        assert_published_matches_services(&c);
        assert!(published(&c)[b_slot].2.is_none());
        assert_eq!(c.status.load().services.iter().flatten().count(), 2);

        // A new service takes the free slot.
        let mut again = withdrawn.to_vec();
        again.push(named(&c, "d", "task-a"));
        c.provided(Source::Docker, again);
        publish(&mut c).await;
        assert_published_matches_services(&c);
        let d = c.services.iter().find(|s| &*s.state.name == "d").unwrap();
        assert_eq!(d.state.slot, b_slot);
        assert_eq!(c.status.load().services.iter().flatten().count(), 3);
    }

    #[test]
    fn bind_errors_say_what_to_do() {
        let e = std::io::Error::from(std::io::ErrorKind::AddrInUse);
        let a: SocketAddr = "0.0.0.0:80".parse().unwrap();
        let typed = ControlError::Bind {
            service: "web".into(),
            addr: a,
            source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
        };
        assert_eq!(typed.to_string(), bind_error("web", a, &e));
        assert!(typed.to_string().contains("address already in use"));
    }
}
