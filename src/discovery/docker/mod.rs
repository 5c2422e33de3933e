//! Docker Swarm discovery: labelled Swarm services become mesh services, their running
//! tasks the backends, on every node that runs meshd.
//!
//! ```text
//!  /events (service, node) ──trigger──┐
//!  /events (this node's task containers: kill, die, stop) ──retire the task, apply the
//!                                     │                     last snapshot again at once
//!                                     ▼
//!  every poll_interval (150 ms while a service updates or a task is stopping):
//!    GET /services (label mesh.publish), /tasks, /nodes ──► state::Tracker::observe
//!        (pure: labels -> ServiceConfig, routable tasks -> backends, retired task IDs;
//!        on a blocking thread, as the decode of the answers: they grow with the swarm)
//!    changed? ──► Update::Changed(Docker, list, which) when the same services changed,
//!                 else Update::Services(Docker, list) ──► control plane (drains, health)
//!    failed?  ──► Update::Failed(Docker), the last good list stays
//! ```
//!
//! Swarm has no task events (moby#37403), so tasks are polled; service and node events
//! only make the next poll happen at once. A task told to stop (`DesiredState`
//! shutdown/remove) still runs for ~3 s before it gets SIGTERM when it is on an overlay
//! network (~1.2 s without one; measured by scripts/swarm-notice-window.py): a poll every
//! 500 ms (150 ms during a rolling update, while a task is stopping, and for 5 s after an
//! event) removes it from meshd well inside that window, and the control plane drains its
//! connections. A task container on this node that is signalled to stop or exits (a
//! `kill` with SIGTERM/SIGKILL/SIGINT/SIGQUIT, `die`, `stop`: also a `docker stop` or a
//! failed HEALTHCHECK, which `/tasks` never shows beforehand) drains at once, without
//! waiting for the next poll.
//!
//! Only managers answer for the swarm: on a worker, point `endpoint` at a manager through a
//! read-only socket proxy (see docs/swarm.md).
//!
//! Layout: [`client`] (the HTTP client and its errors), [`api`] (the engine's objects),
//! [`labels`] (`mesh.*` -> `ServiceConfig`), [`state`] (the pure task-state logic), and
//! here the loop that ties them to the control plane.

pub mod api;
pub mod client;
pub mod follow;
pub mod labels;
pub mod state;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;

pub use client::{ApiError, Client};
pub use state::{Desired, OwnNetworks, Snapshot, Tracker};

use super::{Update, UpdateTx};
use crate::config::{DockerDiscoveryConfig, ServiceConfig};
use crate::discovery::feed::FeedTx;

/// The poll interval while an opted-in service is in a rolling update or rollback, and for
/// a while after an event.
pub const FAST_POLL: Duration = Duration::from_millis(150);
/// How long polls stay fast after a service or node event.
const FAST_AFTER_EVENT: Duration = Duration::from_secs(5);
/// At most one failure line per this long (the first failure is logged at once).
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(30);
/// Consecutive failures back off from the poll interval up to this.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often meshd re-reads which networks its own container is on.
const OWN_REFRESH: Duration = Duration::from_secs(30);
/// The event stream is reopened after this long without a byte (a dead proxy connection
/// must not hang it forever; events are only triggers, so nothing is lost).
const EVENTS_IDLE: Duration = Duration::from_secs(600);
const EVENTS_MAX_BACKOFF: Duration = Duration::from_secs(30);
/// With `managers` listed: consecutive failed polls of an engine that answered before,
/// after which this node follows a manager instead.
const FOLLOW_AFTER_FAILURES: u64 = 2;
/// While following, how often the local engine is asked whether it answers for the swarm
/// now (a worker promoted to manager).
const ENGINE_REPROBE: Duration = Duration::from_secs(30);
/// While following: back-off after every listed manager failed in a row.
const FOLLOW_MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Tasks the orchestrator wants running, and the ones it is stopping: a task seen stopping
/// is retired for good ([`Tracker`]).
const TASKS_FILTER: &str = r#"{"desired-state":["running","shutdown","remove"]}"#;
/// Only the services that opted in.
const SERVICES_FILTER: &str = r#"{"label":["mesh.publish"]}"#;
/// Service and node changes (triggers), and task containers stopping on this node. The
/// `event` key applies to every type: service and node events are create, update and
/// remove; a container's create and update events pass too, and are ignored (a node's
/// containers come and go: they trigger no poll).
const EVENTS_FILTER: &str = r#"{"type":["service","node","container"],"event":["create","update","remove","kill","die","stop"]}"#;
/// Task IDs from container events waiting for the poll loop.
const STOPS_QUEUE: usize = 1024;

/// This provider, as its updates name it.
pub const PROVIDER: super::Provider = super::Provider::Docker;

/// Runs the Docker provider until the control plane goes away: polls the engine at
/// `cfg.endpoint`, builds mesh services from `defaults` (the `[defaults]` template) and
/// the `mesh.*` labels, and sends `Update::Services(Docker, ..)` whenever the list
/// changes. What it reads is published on `feed` for followers. With `cfg.managers`
/// listed, it follows meshd on those managers whenever the local engine cannot answer for
/// the swarm ([`follow`]).
pub async fn run(
    cfg: DockerDiscoveryConfig,
    defaults: ServiceConfig,
    commands: UpdateTx,
    feed: Arc<FeedTx>,
) {
    let client = match Client::new(&cfg.endpoint) {
        Ok(c) => c,
        Err(e) => {
            // The config validator accepts only usable endpoints; this is a safety net.
            tracing::error!("{e}");
            return;
        }
    };
    tracing::info!(
        endpoint = client.endpoint(),
        poll_interval_ms = cfg.poll_interval.as_millis() as u64,
        managers = cfg.managers.join(",").as_str(),
        "docker discovery: starting"
    );
    Provider::new(cfg, defaults, client, commands, feed)
        .run()
        .await;
}

struct Provider {
    cfg: DockerDiscoveryConfig,
    defaults: ServiceConfig,
    client: Client,
    commands: UpdateTx,
    tracker: Tracker,
    /// The last list sent (`None`: nothing sent yet).
    sent: Option<Vec<ServiceConfig>>,
    /// Warnings of the last poll: a warning is logged when it first appears.
    warnings: BTreeSet<String>,
    /// Services in an update at the last poll.
    updating: Vec<String>,
    negotiated: bool,
    own: Own,
    failures: Failures,
    /// Wakes the loop for an immediate poll (the event stream).
    trigger: Arc<Notify>,
    events: Option<JoinHandle<()>>,
    /// Tasks whose container the event stream saw stopping on this node.
    stops_tx: mpsc::Sender<String>,
    stops: mpsc::Receiver<String>,
    /// The last snapshot the engine answered: a stopping container's task is left out of
    /// it at once, without waiting for the next poll.
    last: Option<Arc<Snapshot>>,
    /// What followers on other nodes are served.
    feed: Arc<FeedTx>,
    /// The engine has answered a whole poll at least once.
    ever_ok: bool,
    /// The Swarm node of the engine meshd reads (`GET /info`): its tasks are local for a
    /// service's `locality`. `None` until known (then nothing is local).
    node: Option<Arc<str>>,
}

/// What [`Provider::apply`]'s blocking half hands back.
struct Observed {
    tracker: Tracker,
    /// The list last sent to the control plane, when this poll did not change it.
    sent: Option<Vec<ServiceConfig>>,
    desired: Desired,
    /// The new list for the control plane, when it differs from `sent`.
    send: Option<Vec<ServiceConfig>>,
    /// Which of `send`'s services differ from `sent`'s, when both hold the same names in
    /// the same order ([`in_place`]).
    delta: Option<Vec<usize>>,
    /// The new list for followers, when it differs from the feed's.
    feed: Option<Arc<Vec<ServiceConfig>>>,
    /// One log line per change from `sent`.
    changes: Vec<String>,
}

/// meshd's own container and the networks it is attached to.
#[derive(Default)]
struct Own {
    /// `None`: not in a container (or cannot tell); never looked up.
    container: Option<String>,
    networks: Option<OwnNetworks>,
    checked: Option<Instant>,
}

/// Failure accounting for the log.
#[derive(Default)]
struct Failures {
    /// Consecutive failed polls and when the streak began.
    streak: u64,
    since: Option<Instant>,
    logged_at: Option<Instant>,
    /// Failures not logged since the last line.
    unlogged: u64,
}

impl Provider {
    fn new(
        cfg: DockerDiscoveryConfig,
        defaults: ServiceConfig,
        client: Client,
        commands: UpdateTx,
        feed: Arc<FeedTx>,
    ) -> Provider {
        let (stops_tx, stops) = mpsc::channel(STOPS_QUEUE);
        let tracker = Tracker::default()
            .dialling(cfg.address)
            .loading_certs(cert_loader());
        Provider {
            cfg,
            defaults,
            client,
            commands,
            tracker,
            sent: None,
            warnings: BTreeSet::new(),
            updating: Vec::new(),
            negotiated: false,
            own: Own {
                container: own_container_id(),
                ..Own::default()
            },
            failures: Failures::default(),
            trigger: Arc::new(Notify::new()),
            events: None,
            stops_tx,
            stops,
            last: None,
            feed,
            ever_ok: false,
            node: None,
        }
    }

    async fn run(mut self) {
        loop {
            self.read_engine().await;
            if self.commands.is_closed() {
                return;
            }
            self.follow().await;
            if self.commands.is_closed() {
                return;
            }
        }
    }

    /// Polls the local engine until the control plane goes away, or, with `managers`
    /// listed, until the engine cannot answer for the swarm.
    async fn read_engine(&mut self) {
        let mut fast_until: Option<Instant> = None;
        loop {
            let fast = match self.poll().await {
                Ok(updating) => {
                    self.failures.recovered();
                    updating
                }
                Err(e) => {
                    if matches!(e, ApiError::Connect { .. })
                        || matches!(&e, ApiError::Status { status: 400, .. })
                    {
                        // The engine may have restarted or been upgraded: ask its version again.
                        self.negotiated = false;
                    }
                    if !self.cfg.managers.is_empty()
                        && (!self.ever_ok || self.failures.streak + 1 >= FOLLOW_AFTER_FAILURES)
                    {
                        let line = format!(
                            "docker discovery: the local engine cannot answer for the swarm ({e}); \
                             following meshd on the managers {}",
                            self.cfg.managers.join(", ")
                        );
                        if self.ever_ok {
                            tracing::warn!("{line}");
                        } else {
                            tracing::info!("{line}");
                        }
                        self.failures = Failures::default();
                        self.feed.send_modify(|f| {
                            f.serving = false;
                            f.services = None;
                            f.engine_ok = false;
                            f.error = Some(e.to_string());
                        });
                        return;
                    }
                    self.failures.failed(&e);
                    let error = e.to_string();
                    self.feed.send_if_modified(|f| {
                        let changed = f.engine_ok || f.error.as_deref() != Some(error.as_str());
                        f.engine_ok = false;
                        f.error = Some(error);
                        changed
                    });
                    if !self.report_failure().await {
                        return;
                    }
                    false
                }
            };
            let now = Instant::now();
            let delay = if self.failures.streak > 0 {
                let n = self.failures.streak.min(8) as u32;
                (self.cfg.poll_interval * 2u32.saturating_pow(n - 1))
                    .min(MAX_BACKOFF.max(self.cfg.poll_interval))
            } else if fast || fast_until.is_some_and(|t| now < t) {
                FAST_POLL.min(self.cfg.poll_interval)
            } else {
                self.cfg.poll_interval
            };
            let deadline = tokio::time::Instant::now() + delay;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => {}
                    _ = self.trigger.notified() => {
                        fast_until = Some(Instant::now() + FAST_AFTER_EVENT);
                    }
                    Some(id) = self.stops.recv() => {
                        // A drain does not wait for a poll, and needs none; a routed task
                        // stopping is usually replaced soon: polls go fast for a while.
                        if self.task_stopped(&id).await {
                            fast_until = Some(Instant::now() + FAST_AFTER_EVENT);
                        }
                        continue;
                    }
                    _ = self.commands.closed() => return,
                }
                break;
            }
        }
    }

    /// One poll; `Ok(true)` while an opted-in service is updating or a task is stopping.
    async fn poll(&mut self) -> Result<bool, ApiError> {
        if !self.negotiated {
            let v = self.client.negotiate().await?;
            self.negotiated = true;
            tracing::info!(
                engine = v.version.as_str(),
                engine_api = v.api_version.as_str(),
                api = self.client.api_version().unwrap_or(""),
                "docker discovery: connected"
            );
            self.learn_node().await;
            if self.events.is_none() {
                self.events = Some(tokio::spawn(watch_events(
                    self.client.clone(),
                    self.trigger.clone(),
                    self.stops_tx.clone(),
                )));
            }
        }
        self.refresh_own().await;

        let services_path = format!(
            "/services?filters={}",
            client::encode_query(SERVICES_FILTER)
        );
        let tasks_path = format!("/tasks?filters={}", client::encode_query(TASKS_FILTER));
        let (services, tasks, nodes) = tokio::try_join!(
            self.client.get::<Vec<api::Service>>(&services_path),
            self.client.get::<Vec<api::Task>>(&tasks_path),
            self.client.get::<Vec<api::Node>>("/nodes"),
        )?;
        let snap = Arc::new(Snapshot {
            services,
            tasks,
            nodes,
        });
        self.ever_ok = true;
        let old = self.last.take();
        let fast = self.apply(snap.clone(), old, true).await;
        self.last = Some(snap);
        Ok(fast)
    }

    /// A task container on this node is stopping (event): the task leaves the table at
    /// once, computed from the last snapshot (which may be older than the engine's state:
    /// the next poll corrects everything else). True if meshd routed to that task.
    async fn task_stopped(&mut self, id: &str) -> bool {
        if self.tracker.is_retired(id) {
            return false;
        }
        self.tracker.retire(id);
        let Some(snap) = self.last.take() else {
            return false;
        };
        let routed = self.sent.as_ref().is_some_and(|list| {
            list.iter()
                .any(|s| s.backends.iter().any(|b| b.id.as_deref() == Some(id)))
        });
        if routed {
            tracing::info!(
                task = id,
                "docker discovery: a task's container is stopping on this node (container event): drained now"
            );
        }
        self.apply(snap.clone(), None, false).await;
        self.last = Some(snap);
        routed
    }

    /// Asks the local engine which Swarm node it is (`GET /info`, answered on workers too),
    /// and logs it when that changes. A failure leaves the last answer.
    async fn learn_node(&mut self) {
        let id = match self.client.get::<api::Info>("/info").await {
            Ok(info) => info.swarm.node_id,
            Err(e) => {
                tracing::debug!("docker discovery: GET /info: {e}");
                return;
            }
        };
        let node = (!id.is_empty()).then(|| Arc::<str>::from(id));
        if node != self.node {
            match &node {
                Some(n) => tracing::info!(node = &**n, "docker discovery: this is Swarm node {n}"),
                None => tracing::info!("docker discovery: the local engine is in no swarm"),
            }
            self.node = node;
        }
    }

    /// Turns `snap` into mesh services, publishes them for followers and sends them to the
    /// control plane when they changed; `fresh`: `snap` was just read from the engine.
    /// True while an opted-in service is updating or a task is stopping.
    ///
    /// What grows with the swarm (observing every task, comparing and copying the whole
    /// list, dropping the last snapshot `old`) runs on a blocking thread: at 10,000 tasks it
    /// is tens of milliseconds a poll, which the runtime thread that moves bytes must not
    /// spend (docs/BENCHMARKS.md, "The control plane at Swarm scale").
    async fn apply(
        &mut self,
        snap: Arc<Snapshot>,
        old: Option<Arc<Snapshot>>,
        fresh: bool,
    ) -> bool {
        let mut tracker = std::mem::replace(&mut self.tracker, Tracker::new(0));
        let defaults = self.defaults.clone();
        let networks = self.own.networks.clone();
        let node = self.node.clone();
        let sent = self.sent.take();
        let feed_now = self.feed.borrow().services.clone();
        let job = move || {
            drop(old);
            let mut desired = tracker.observe(&snap, &defaults, networks.as_ref());
            mark_local(&mut desired.services, node.as_deref());
            let feed = (feed_now.as_deref() != Some(&desired.services))
                .then(|| Arc::new(desired.services.clone()));
            drop(feed_now);
            let changed = sent.as_ref() != Some(&desired.services);
            let changes = if changed {
                state::changes(sent.as_deref().unwrap_or(&[]), &desired.services)
            } else {
                Vec::new()
            };
            let send = changed.then(|| desired.services.clone());
            let delta = match &sent {
                Some(old) if changed => in_place(old, &desired.services),
                _ => None,
            };
            // A changed list replaces the old one: freed here, not on the runtime thread.
            let sent = if changed { None } else { sent };
            Observed {
                tracker,
                sent,
                desired,
                send,
                delta,
                feed,
                changes,
            }
        };
        let o = match crate::sys::spawn_background(job).await {
            Ok(o) => o,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => {
                // The runtime is shutting down.
                self.tracker = Tracker::default().dialling(self.cfg.address);
                return false;
            }
        };
        self.tracker = o.tracker;
        self.sent = o.sent;
        let desired = o.desired;
        self.report(&desired);
        let fast = !desired.updating.is_empty() || desired.stopping > 0;
        let mut replaced = None;
        self.feed.send_if_modified(|f| {
            let mut changed = false;
            if fresh && (!f.serving || !f.engine_ok || f.error.is_some() || f.following.is_some()) {
                f.following = None;
                f.serving = true;
                f.engine_ok = true;
                f.error = None;
                changed = true;
            }
            if let Some(list) = o.feed {
                f.seq += 1;
                replaced = f.services.replace(list);
                changed = true;
            }
            changed
        });
        if let Some(list) = o.send {
            for line in o.changes {
                tracing::info!("docker discovery: {line}");
            }
            let update = match o.delta {
                Some(changed) => Update::Changed(PROVIDER, list, changed),
                None => Update::Services(PROVIDER, list),
            };
            if self.commands.send(update).await.is_err() {
                return fast;
            }
            self.sent = Some(desired.services);
        }
        if let Some(list) = replaced {
            // Freeing 10,000 backends is not free either.
            crate::sys::spawn_background(move || drop(list));
        }
        fast
    }

    /// Follows meshd on the listed managers until the local engine answers for the swarm
    /// again (checked every [`ENGINE_REPROBE`]) or the control plane goes away. Managers
    /// are tried in turn, starting at a random one so that followers spread out.
    async fn follow(&mut self) {
        let managers = self.cfg.managers.clone();
        let token = self.cfg.token.clone().unwrap_or_default();
        let n = managers.len();
        let mut i = start_index(n);
        let mut misses = 0usize; // sessions in a row that applied no state
        let mut backoff = Duration::from_millis(500);
        let mut failing_since: Option<Instant> = None;
        let mut logged_at: Option<Instant> = None;
        let probe = engine_probe(self.client.clone(), self.commands.clone());
        tokio::pin!(probe);
        loop {
            let addr = managers[i % n].clone();
            let mut got_state = false;
            let why = tokio::select! {
                why = self.follow_one(&addr, &token, n > 1, &mut got_state) => why,
                _ = probe.as_mut() => None,
            };
            match why {
                None => {
                    if !self.commands.is_closed() {
                        tracing::info!(
                            "docker discovery: the local engine answers for the swarm: reading it instead of following"
                        );
                        self.negotiated = false;
                    }
                    return;
                }
                Some(why) => {
                    self.feed.send_modify(|f| {
                        f.following = None;
                        f.error = Some(format!("manager {addr}: {why}"));
                    });
                    i += 1;
                    let next = &managers[i % n];
                    let now = Instant::now();
                    if got_state {
                        misses = 0;
                        backoff = Duration::from_millis(500);
                        failing_since = None;
                    } else {
                        misses += 1;
                    }
                    let since = *failing_since.get_or_insert(now);
                    // Every failure of the first round is logged; then one line per
                    // FAILURE_LOG_EVERY while no manager answers.
                    if misses <= n || logged_at.is_none_or(|t| now - t >= FAILURE_LOG_EVERY) {
                        tracing::warn!(
                            failing_for_s = (now - since).as_secs(),
                            "docker discovery: manager {addr}: {why}; trying {next}; the last good table stays"
                        );
                        logged_at = Some(now);
                    }
                    if !self.report_failure().await {
                        return;
                    }
                    if misses > 0 && misses % n == 0 {
                        // No manager answers: maybe the local engine does again (a manager
                        // whose engine restarted follows only until it answers again).
                        if engine_answers(&mut self.client).await {
                            tracing::info!(
                                "docker discovery: no manager serves, and the local engine answers for the swarm: reading it"
                            );
                            self.negotiated = false;
                            return;
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = probe.as_mut() => return,
                        }
                        backoff = (backoff * 2).min(FOLLOW_MAX_BACKOFF);
                    }
                }
            }
        }
    }

    /// Reads manager `addr`'s feed and applies each state; returns why the manager failed
    /// (`None`: the control plane is gone).
    async fn follow_one(
        &mut self,
        addr: &str,
        token: &str,
        has_alternatives: bool,
        got_state: &mut bool,
    ) -> Option<follow::FollowError> {
        let mut session = match follow::Session::open(addr, token, has_alternatives).await {
            Ok(s) => s,
            Err(why) => return Some(why),
        };
        loop {
            match session.next_state().await {
                Ok(st) => {
                    if !self.followed(addr, got_state, st).await {
                        return None;
                    }
                }
                Err(why) => return Some(why),
            }
        }
    }

    /// Applies one state read from manager `addr`; false once the control plane is gone.
    async fn followed(&mut self, addr: &str, got_state: &mut bool, st: follow::State) -> bool {
        let follow::State {
            mut services,
            warnings,
        } = st;
        mark_local(&mut services, self.node.as_deref());
        for w in &warnings {
            if !self.warnings.contains(w) {
                tracing::warn!("docker discovery: manager {addr}: service left out: {w}");
            }
        }
        self.warnings = warnings.into_iter().collect();
        if !*got_state {
            *got_state = true;
            self.feed.send_modify(|f| {
                f.following = Some(addr.to_owned());
                f.error = None;
            });
            tracing::info!(
                services = services.len(),
                "docker discovery: following meshd on manager {addr}"
            );
        }
        if self.sent.as_ref() != Some(&services) {
            for line in state::changes(self.sent.as_deref().unwrap_or(&[]), &services) {
                tracing::info!("docker discovery: {line} (from manager {addr})");
            }
            if self
                .commands
                .send(Update::Services(PROVIDER, services.clone()))
                .await
                .is_err()
            {
                return false;
            }
            self.sent = Some(services);
        }
        true
    }

    /// Counts a failed poll or manager with the control plane; false once it is gone.
    async fn report_failure(&self) -> bool {
        self.commands.send(Update::Failed(PROVIDER)).await.is_ok()
    }

    /// Logs warnings when they first appear and update phases when they change.
    fn report(&mut self, d: &Desired) {
        for w in &d.warnings {
            if !self.warnings.contains(w) {
                tracing::warn!("docker discovery: {w}");
            }
        }
        self.warnings = d.warnings.iter().cloned().collect();
        if d.updating != self.updating {
            if d.updating.is_empty() {
                tracing::info!("docker discovery: no rolling update in progress");
            } else {
                tracing::info!(
                    poll_ms = FAST_POLL.min(self.cfg.poll_interval).as_millis() as u64,
                    "docker discovery: rolling update in progress: {}",
                    d.updating.join(", ")
                );
            }
            self.updating.clone_from(&d.updating);
        }
    }

    /// Reads which networks meshd's own container is on (when it runs in one), at most
    /// every [`OWN_REFRESH`]. A failure leaves the networks unknown: tasks are then reached
    /// on their only non-ingress network (or `mesh.network`).
    async fn refresh_own(&mut self) {
        let Some(id) = &self.own.container else {
            return;
        };
        if self.own.checked.is_some_and(|t| t.elapsed() < OWN_REFRESH) {
            return;
        }
        self.own.checked = Some(Instant::now());
        let networks = match self
            .client
            .get::<api::Container>(&format!("/containers/{id}/json"))
            .await
        {
            Ok(c) => {
                let mut set = OwnNetworks::new();
                for (name, n) in c.network_settings.networks {
                    if !n.network_id.is_empty() {
                        set.insert(n.network_id);
                    }
                    set.insert(name);
                }
                Some(set)
            }
            Err(e) => {
                tracing::debug!(
                    "docker discovery: cannot read meshd's own container ({e}); tasks are reached on their only non-ingress network"
                );
                None
            }
        };
        if networks != self.own.networks {
            if let Some(n) = &networks {
                tracing::info!(
                    container = id.get(..12).unwrap_or(id),
                    "docker discovery: meshd's container is on networks: {}",
                    n.iter().cloned().collect::<Vec<_>>().join(", ")
                );
            }
            self.own.networks = networks;
        }
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        if let Some(h) = self.events.take() {
            h.abort();
        }
    }
}

impl Failures {
    fn failed(&mut self, e: &ApiError) {
        let now = Instant::now();
        self.streak += 1;
        self.since.get_or_insert(now);
        let first = self.streak == 1;
        if first || self.logged_at.is_none_or(|t| now - t >= FAILURE_LOG_EVERY) {
            let more = if self.unlogged > 0 {
                format!(
                    " ({} more failed polls since the last message)",
                    self.unlogged
                )
            } else {
                String::new()
            };
            tracing::error!(
                reason = e.reason(),
                "{e}; keeping the last good state{more}"
            );
            self.logged_at = Some(now);
            self.unlogged = 0;
        } else {
            self.unlogged += 1;
        }
    }

    fn recovered(&mut self) {
        if self.streak > 0 {
            tracing::info!(
                failed_polls = self.streak,
                down_ms = self.since.map_or(0, |t| t.elapsed().as_millis() as u64),
                "docker discovery: the engine answers again"
            );
        }
        self.streak = 0;
        self.since = None;
        self.unlogged = 0;
    }
}

/// Resolves when the local engine answers for the swarm (its `/nodes`), asked every
/// [`ENGINE_REPROBE`], or when the control plane goes away.
async fn engine_probe(mut client: Client, commands: UpdateTx) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(ENGINE_REPROBE) => {}
            _ = commands.closed() => return,
        }
        if engine_answers(&mut client).await {
            return;
        }
    }
}

/// Whether the engine at `client` answers for the swarm (`/nodes`: 503 on a worker).
async fn engine_answers(client: &mut Client) -> bool {
    client.negotiate().await.is_ok() && client.get::<Vec<api::Node>>("/nodes").await.is_ok()
}

/// Marks the backends that run on Swarm node `node` (this meshd's) as local.
fn mark_local(services: &mut [ServiceConfig], node: Option<&str>) {
    for s in services {
        for b in &mut s.backends {
            b.local = node.is_some_and(|n| b.node.as_deref() == Some(n));
        }
    }
}

/// The indices of the services that differ between `old` and `new` when both list the
/// same names in the same order (the usual poll: tasks come and go, services stay), else
/// `None` (a service added, removed or renamed: the control plane takes the whole list).
fn in_place(old: &[ServiceConfig], new: &[ServiceConfig]) -> Option<Vec<usize>> {
    if old.len() != new.len() {
        return None;
    }
    let mut changed = Vec::new();
    for (i, (a, b)) in old.iter().zip(new).enumerate() {
        if a.name != b.name {
            return None;
        }
        if a != b {
            changed.push(i);
        }
    }
    Some(changed)
}

/// Where a follower starts in the managers list: spread over the list, so that not every
/// node's meshd subscribes to the first manager.
fn start_index(n: usize) -> usize {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as usize);
    (nanos ^ std::process::id() as usize) % n.max(1)
}

/// The task whose container this event says is stopping: `die`, `stop`, or a `kill` with
/// a signal that stops (TERM, KILL, INT, QUIT; not e.g. HUP, which asks for a reload).
fn stopping_task(ev: &api::Event) -> Option<&str> {
    if ev.kind != "container" {
        return None;
    }
    let a = &ev.actor.attributes;
    let stops = match ev.action.as_str() {
        "die" | "stop" => true,
        "kill" => matches!(
            a.get("signal").map(String::as_str),
            Some("15" | "9" | "2" | "3" | "SIGTERM" | "SIGKILL" | "SIGINT" | "SIGQUIT")
        ),
        _ => false,
    };
    a.get("com.docker.swarm.task.id")
        .map(String::as_str)
        .filter(|id| stops && !id.is_empty())
}

/// Subscribes to service, node and container events: each service or node event (and each
/// reconnect) wakes the poll loop; a task container stopping is sent on `stops` at once.
/// Reconnects with a back-off when the stream fails or ends.
async fn watch_events(client: Client, trigger: Arc<Notify>, stops: mpsc::Sender<String>) {
    let path = format!("/events?filters={}", client::encode_query(EVENTS_FILTER));
    let mut backoff = Duration::from_secs(1);
    loop {
        match client.stream(&path).await {
            Ok(mut body) => {
                tracing::debug!(
                    "docker discovery: subscribed to service, node and container events"
                );
                backoff = Duration::from_secs(1);
                // Events missed while disconnected: one poll covers them.
                trigger.notify_one();
                let mut line: Vec<u8> = Vec::new();
                loop {
                    let frame = match tokio::time::timeout(EVENTS_IDLE, body.frame()).await {
                        Ok(Some(Ok(f))) => f,
                        Ok(Some(Err(e))) => {
                            tracing::debug!(error = %e, "docker discovery: event stream failed");
                            break;
                        }
                        Ok(None) | Err(_) => break,
                    };
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    line.extend_from_slice(&data);
                    while let Some(i) = line.iter().position(|&b| b == b'\n') {
                        let one: Vec<u8> = line.drain(..=i).collect();
                        if let Ok(ev) = serde_json::from_slice::<api::Event>(&one) {
                            tracing::debug!(
                                kind = ev.kind.as_str(),
                                action = ev.action.as_str(),
                                name = ev.actor.attributes.get("name").map_or("", String::as_str),
                                "docker discovery: event"
                            );
                            if ev.kind != "container" {
                                trigger.notify_one();
                            } else if let Some(id) = stopping_task(&ev) {
                                if stops.try_send(id.to_owned()).is_err() {
                                    // Full (a burst far beyond any real one): a poll
                                    // covers the rest.
                                    trigger.notify_one();
                                }
                            }
                        }
                    }
                    if line.len() > 1 << 20 {
                        line.clear();
                    }
                }
            }
            Err(e) => {
                tracing::debug!("{e} (event stream; polling continues)");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(EVENTS_MAX_BACKOFF);
    }
}

/// meshd's own container ID, when it runs in a Docker container: the engine bind-mounts
/// `/etc/hostname` etc. from `/var/lib/docker/containers/<id>/`, which
/// `/proc/self/mountinfo` shows (with cgroup v1 and v2 alike).
fn own_container_id() -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    container_id_from_mountinfo(&text)
}

fn container_id_from_mountinfo(text: &str) -> Option<String> {
    for line in text.lines() {
        let mut rest = line;
        while let Some(i) = rest.find("/containers/") {
            rest = &rest[i + "/containers/".len()..];
            let id: String = rest.chars().take_while(char::is_ascii_hexdigit).collect();
            if id.len() == 64 && rest[64..].starts_with('/') {
                return Some(id);
            }
        }
    }
    None
}

/// Reads `mesh.tls=terminate` certificates (files in meshd's container, read on every poll:
/// a few KiB) and keeps each service's TLS configuration while its files are unchanged.
fn cert_loader() -> state::CertLoader {
    use crate::config::tls::{Terminate, TlsVersion};
    use std::collections::HashMap;
    use std::path::PathBuf;
    let mut cache: HashMap<(PathBuf, PathBuf), Arc<Terminate>> = HashMap::new();
    Box::new(move |cert, key| {
        let k = (cert.to_path_buf(), key.to_path_buf());
        let prev = cache.get(&k);
        let t = Terminate::load_reusing(
            k.0.clone(),
            k.1.clone(),
            Vec::new(),
            TlsVersion::default(),
            prev,
        )
        .map_err(|e| e.to_string())?;
        // Bounded by the labels in use: entries of files no longer named are dropped
        // when the cache grows past them.
        if cache.len() > 1024 {
            cache.clear();
        }
        cache.insert(k, t.clone());
        Ok(t)
    })
}

#[cfg(test)]
mod tests;
