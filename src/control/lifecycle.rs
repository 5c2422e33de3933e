//! A backend's life on the control plane: `BackendEntry`, its sources, operator
//! operations, the tick step (drains, re-admission after ejection, slow-start ramps) and
//! its effective weight.
//!
//! ```text
//!  appears (config/discovery) ─► Active+Unknown ─(rise passes)─► Active+Up ─► eligible
//!        (check = "none": Up at once)             ▲  │ fall failures / ejection
//!                                                 │  ▼
//!                                            Active+Down (or ejected): not eligible
//!  removed from every source, or operator drain ─► Draining ─(0 conns or drain_timeout)─► Gone
//!                                     operator enable ─┘ back to Active
//! ```
//!
//! Invariant: nothing here reads a clock, binds a socket or spawns a task. Every function
//! takes `now`; what the caller must do (start a health checker, rebuild the service's
//! table) comes back as [`Effects`]. Closing a drained backend's remaining connections is a
//! [`CloseSignal`](crate::close::CloseSignal) broadcast, done here.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::close::CloseSignal;
use crate::config::{CheckKind, ServiceConfig};
use crate::metrics::BackendMetrics;
use crate::table::{outlier, Backend, Health, ServiceState, State};

/// Where a backend comes from (a bit each; a backend drains when no source wants it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    Static = 1,
    Dns = 2,
    Docker = 4,
}

impl From<crate::discovery::Provider> for Source {
    fn from(p: crate::discovery::Provider) -> Source {
        match p {
            crate::discovery::Provider::Dns => Source::Dns,
            crate::discovery::Provider::Docker => Source::Docker,
        }
    }
}

/// An endpoint one source gives one service.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub weight: u32,
    /// Its identity: a Swarm task ID; `None` where the address is the identity (mesh.toml,
    /// DNS).
    pub id: Option<Arc<str>>,
    /// It runs on this node (what `locality` prefers).
    pub local: bool,
}

impl Endpoint {
    /// An endpoint known by its address alone, not on this node (DNS, tests).
    pub fn at(addr: SocketAddr, weight: u32) -> Endpoint {
        Endpoint {
            addr,
            weight,
            id: None,
            local: false,
        }
    }
}
/// Endpoints one source gives one service.
pub type Endpoints = Vec<Endpoint>;

/// An operator's request from the admin API.
#[derive(Debug, Clone)]
pub enum AdminOp {
    Drain,
    Enable,
    Weight(u32),
}

/// Why an operator's request was refused (the admin API answers 404 or 409).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    #[error("no service named {0:?}")]
    NoService(String),
    #[error("service {0:?} has no backend {1}")]
    NoBackend(String, SocketAddr),
    /// Enabling a backend that no config or discovery source lists any more.
    #[error("backend {0} was removed from the config or discovery; it can only drain")]
    Removed(SocketAddr),
}

/// What the caller must do after a lifecycle step (the steps themselves spawn nothing).
#[must_use]
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Effects {
    /// Something a connection would see changed: the service needs a new table.
    pub dirty: bool,
    /// Indices (in the service's backend list) whose health checker must be (re)started.
    pub start_checkers: Vec<usize>,
}

impl Effects {
    fn dirty() -> Effects {
        Effects {
            dirty: true,
            start_checkers: Vec::new(),
        }
    }
}

/// One backend of one service as the control plane sees it: the shared `Backend` the
/// connection path reads, plus what only the control plane decides with.
pub struct BackendEntry {
    /// Shared with every table generation and connection: state, health, counters.
    pub backend: Arc<Backend>,
    /// The task this backend is (Swarm); `None` where the address is the identity.
    pub id: Option<Arc<str>>,
    /// Its metric handles, registered once (the exporter copies the atomics at scrape time).
    pub metrics: Arc<BackendMetrics>,
    /// The weight its sources give it.
    pub weight: u32,
    /// An operator's weight (admin API), which wins over `weight` until the backend is renewed.
    pub weight_override: Option<u32>,
    /// `Source` bits: which sources list it. 0: it drains.
    pub sources: u8,
    /// `Source` bits: which sources say it runs on this node (for `locality`).
    pub local_sources: u8,
    /// Drained by an operator: being listed again does not bring it back, only an enable.
    pub operator_drained: bool,
    /// When it became healthy: the start of its slow-start ramp.
    pub up_since: Option<Instant>,
    /// While draining: when the drain began and its deadline (`drain_timeout` later).
    pub drain: Option<(Instant, Instant)>,
    /// Stops its health checker task (`None`: no checker runs).
    pub checker: Option<Arc<CloseSignal>>,
    /// When its last health check passed (`health::now_ms`), written by the checker: an
    /// ejected backend is re-admitted only after a check passed since.
    pub last_pass: Arc<AtomicU64>,
    /// When it was last ejected (for the back-off's reset, and `health::now_ms` for the
    /// re-admission rule).
    pub ejected_at: Option<(Instant, u64)>,
    /// While ejected: when its back-off ends.
    pub ejected_until: Option<Instant>,
}

impl BackendEntry {
    /// A backend that just appeared: `Unknown` until its checks pass, or `Up` at once (and
    /// ramping from `now`) when the service has no health check.
    pub fn new(
        service: &Arc<str>,
        addr: SocketAddr,
        weight: u32,
        id: Option<Arc<str>>,
        sources: u8,
        cfg: &ServiceConfig,
        now: Instant,
    ) -> BackendEntry {
        let trusted = cfg.health.check == CheckKind::None;
        let backend = Arc::new(Backend::new(
            service.clone(),
            addr,
            if trusted { Health::Up } else { Health::Unknown },
        ));
        BackendEntry {
            metrics: Arc::new(BackendMetrics::new(service, &backend.addr_label)),
            backend,
            id,
            weight,
            weight_override: None,
            sources,
            local_sources: 0,
            operator_drained: false,
            up_since: trusted.then_some(now),
            drain: None,
            checker: None,
            last_pass: Arc::new(AtomicU64::new(0)),
            ejected_at: None,
            ejected_until: None,
        }
    }

    /// Active → Draining: no new connections; the tick makes it Gone once its last
    /// connection ends, and closes what is left at `now + drain_timeout`.
    pub fn start_drain(&mut self, drain_timeout: Duration, now: Instant) {
        self.backend.set_state(State::Draining);
        self.drain = Some((now, now + drain_timeout));
        self.stop_checker();
    }

    /// No source lists it any more: an active backend drains; one an operator drained
    /// and that finished draining (kept for an `enable`) leaves at the next tick. Returns
    /// whether anything changed.
    pub fn retire(&mut self, drain_timeout: Duration, now: Instant) -> bool {
        match self.backend.state() {
            State::Active => {
                self.start_drain(drain_timeout, now);
                true
            }
            State::Draining if self.drain.is_none() => {
                self.drain = Some((now, now));
                true
            }
            _ => false,
        }
    }

    /// An operator's drain that has finished: kept (listed, in no table, not even as a
    /// panic-routing candidate) until enabled.
    pub fn kept_drained(&self) -> bool {
        self.backend.state() == State::Draining && self.drain.is_none()
    }

    /// Draining → Active (listed again, or an operator's enable). The caller starts its
    /// health checker again.
    fn reactivate(&mut self) {
        self.backend.set_state(State::Active);
        self.drain = None;
    }

    pub fn stop_checker(&mut self) {
        if let Some(stop) = self.checker.take() {
            stop.close();
        }
    }

    /// Makes this entry a new backend at the same address, for task `id`: the old task is
    /// gone (its address was given to a new one), so its connections are closed and nothing
    /// of its health, ejection or back-off carries over. The metric series (by address)
    /// stay.
    fn renew(&mut self, cfg: &ServiceConfig, id: Arc<str>, bit: u8, now: Instant) {
        let old = self.backend.clone();
        if old.state() == State::Active {
            old.set_state(State::Draining);
        }
        old.close.close();
        old.set_state(State::Gone);
        self.stop_checker();
        let trusted = cfg.health.check == CheckKind::None;
        self.backend = Arc::new(Backend::new(
            old.service.clone(),
            old.addr,
            if trusted { Health::Up } else { Health::Unknown },
        ));
        self.id = Some(id);
        self.sources = bit;
        self.local_sources = 0;
        self.weight_override = None;
        self.operator_drained = false;
        self.up_since = trusted.then_some(now);
        self.drain = None;
        self.last_pass = Arc::new(AtomicU64::new(0));
        self.ejected_at = None;
        self.ejected_until = None;
    }

    /// Some source says it runs on this node.
    pub fn is_local(&self) -> bool {
        self.local_sources != 0
    }

    /// Records whether source `bit` says it runs on this node; true if that changed
    /// whether it is local.
    fn set_local(&mut self, bit: u8, local: bool) -> bool {
        let was = self.is_local();
        if local {
            self.local_sources |= bit;
        } else {
            self.local_sources &= !bit;
        }
        was != self.is_local()
    }

    /// The weight it gets at `now`: the operator's override or its configured weight,
    /// ramped from 1% to full over `slow_start` after it became healthy.
    pub fn effective_weight(&self, slow_start: Duration, now: Instant) -> u32 {
        let base = self.weight_override.unwrap_or(self.weight);
        if base == 0 || slow_start.is_zero() {
            return base;
        }
        match self.up_since {
            Some(up) if now.saturating_duration_since(up) < slow_start => {
                let frac = (now.saturating_duration_since(up).as_secs_f64()
                    / slow_start.as_secs_f64())
                .max(0.01);
                ((f64::from(base) * frac).ceil() as u32).clamp(1, base)
            }
            _ => base,
        }
    }

    /// A health transition reported by its checker.
    pub fn health_changed(&mut self, health: Health, now: Instant) {
        if health == Health::Up {
            self.up_since = Some(now);
        }
    }
}

/// Makes `wanted` the set of endpoints `source` gives a service: new ones are added (gated
/// by health checks), missing ones lose this source and drain if no source is left, a
/// draining one listed again comes back, and a new task on a stopped task's address is a
/// new backend.
pub fn set_source(
    service: &Arc<str>,
    backends: &mut Vec<BackendEntry>,
    cfg: &ServiceConfig,
    source: Source,
    wanted: &[Endpoint],
    now: Instant,
) -> Effects {
    let bit = source as u8;
    let mut fx = Effects::default();
    // Looked up by address: a set of n endpoints costs O(n), not O(n²) (10,000 backends
    // took ~10^8 comparisons on every reload).
    let wanted_addrs: HashSet<SocketAddr> = wanted.iter().map(|e| e.addr).collect();
    for b in backends.iter_mut() {
        if b.sources & bit != 0 && !wanted_addrs.contains(&b.backend.addr) {
            b.sources &= !bit;
            if b.set_local(bit, false) {
                fx.dirty = true;
            }
            if b.sources == 0 && b.retire(cfg.drain_timeout, now) {
                fx.dirty = true;
                tracing::info!(
                    service = &**service,
                    backend = &*b.backend.addr_label,
                    "backend removed: draining"
                );
            }
        }
    }
    let mut by_addr: HashMap<SocketAddr, usize> = HashMap::with_capacity(backends.len());
    for (i, b) in backends.iter().enumerate() {
        if b.backend.state() != State::Gone {
            by_addr.entry(b.backend.addr).or_insert(i);
        }
    }
    for Endpoint {
        addr,
        weight,
        id,
        local,
    } in wanted
    {
        let (addr, weight) = (*addr, *weight);
        if let Some(&i) = by_addr.get(&addr) {
            let b = &mut backends[i];
            if let Some(id) = id {
                match &b.id {
                    // A new task on a stopped task's address (Swarm reuses overlay
                    // addresses): a new backend, with none of the old one's health,
                    // ejection or back-off.
                    Some(old) if old != id => {
                        tracing::info!(
                            service = &**service,
                            backend = &*b.backend.addr_label,
                            old_task = &**old,
                            new_task = &**id,
                            "new task on a stopped task's address: fresh health and ejection state"
                        );
                        b.renew(cfg, id.clone(), bit, now);
                        b.weight = weight;
                        let _ = b.set_local(bit, *local);
                        fx.start_checkers.push(i);
                        fx.dirty = true;
                        continue;
                    }
                    Some(_) => {}
                    None => b.id = Some(id.clone()),
                }
            }
            b.sources |= bit;
            if b.set_local(bit, *local) {
                fx.dirty = true;
            }
            if b.weight != weight {
                b.weight = weight;
                fx.dirty = true;
            }
            if b.backend.state() == State::Draining && !b.operator_drained {
                // Listed again before it finished draining: it comes back as it was.
                b.reactivate();
                fx.start_checkers.push(i);
                fx.dirty = true;
                tracing::info!(
                    service = &**service,
                    backend = &*b.backend.addr_label,
                    "backend listed again: active"
                );
            }
            continue;
        }
        let mut e = BackendEntry::new(service, addr, weight, id.clone(), bit, cfg, now);
        let _ = e.set_local(bit, *local);
        tracing::info!(
            service = &**service,
            backend = &*e.backend.addr_label,
            check = cfg.health.check.name(),
            "backend added"
        );
        by_addr.insert(addr, backends.len());
        fx.start_checkers.push(backends.len());
        backends.push(e);
        fx.dirty = true;
    }
    fx
}

/// The service's health check settings changed: every active backend's checker restarts
/// with them, or, with no check any more, every active backend is healthy from `now`.
pub fn health_config_changed(
    backends: &mut [BackendEntry],
    cfg: &ServiceConfig,
    now: Instant,
) -> Effects {
    let mut fx = Effects::dirty();
    for (i, b) in backends.iter_mut().enumerate() {
        if b.backend.state() != State::Active {
            continue;
        }
        if cfg.health.check == CheckKind::None {
            b.stop_checker();
            if b.backend.health() != Health::Up {
                b.backend.set_health(Health::Up);
                b.up_since = Some(now);
            }
        } else {
            fx.start_checkers.push(i);
        }
    }
    fx
}

/// An operator's drain, enable or weight for the backend at `addr`.
pub fn admin(
    service: &str,
    backends: &mut [BackendEntry],
    cfg: &ServiceConfig,
    addr: SocketAddr,
    op: AdminOp,
    now: Instant,
) -> Result<Effects, AdminError> {
    let Some(i) = backends
        .iter()
        .position(|b| b.backend.addr == addr && b.backend.state() != State::Gone)
    else {
        return Err(AdminError::NoBackend(service.to_string(), addr));
    };
    let b = &mut backends[i];
    let mut fx = Effects::dirty();
    match op {
        AdminOp::Drain => {
            if b.backend.state() == State::Active {
                b.start_drain(cfg.drain_timeout, now);
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
                b.reactivate();
                fx.start_checkers.push(i);
            }
            tracing::info!(service, backend = %addr, "backend enabled (operator)");
        }
        AdminOp::Weight(w) => {
            b.weight_override = Some(w);
            tracing::info!(service, backend = %addr, weight = w, "backend weight set (operator)");
        }
    }
    Ok(fx)
}

/// A backend ejected by passive outlier detection (or spared: see `ServiceTable::eject`),
/// seen by the control plane at `now` (`now_ms` on `health::now_ms`'s clock): schedules
/// its re-admission after the back-off (`table::outlier`).
pub fn eject(
    state: &ServiceState,
    backends: &mut [BackendEntry],
    cfg: &ServiceConfig,
    bi: usize,
    now: Instant,
    now_ms: u64,
) -> Effects {
    let backend = backends[bi].backend.clone();
    if !backend.is_ejected() {
        // Refused on the connection path: the service's last usable backend, or its
        // ejection budget is spent.
        let others = backends
            .iter()
            .any(|o| !Arc::ptr_eq(&o.backend, &backend) && o.backend.is_usable());
        if others {
            tracing::warn!(
                service = &*state.name,
                backend = &*backend.addr_label,
                max_ejection_percent = cfg.max_ejection_percent,
                "backend not ejected after consecutive connect failures: max_ejection_percent of the service's backends are ejected already"
            );
        } else {
            spared_log(state, &backend);
        }
        return Effects::default();
    }
    if backends[bi].ejected_until.is_some() {
        return Effects::default(); // already scheduled
    }
    // Two backends failing at the same moment may each have seen the other usable on
    // the connection path; here ejections are seen one at a time.
    let others = backends.iter().enumerate().any(|(k, o)| {
        k != bi && o.backend.is_usable() && o.weight_override.unwrap_or(o.weight) > 0
    });
    if !others {
        backend.set_ejected(false);
        if backend.mark_eject_spared() {
            state.ejections_spared.fetch_add(1, Ordering::Relaxed);
        }
        spared_log(state, &backend);
        return Effects::default();
    }
    let b = &mut backends[bi];
    let n = outlier::next_count(
        backend.ejections.load(Ordering::Relaxed),
        b.ejected_at.map(|(t, _)| t),
        now,
    );
    backend.ejections.store(n, Ordering::Relaxed);
    let backoff = outlier::backoff(n);
    b.ejected_at = Some((now, now_ms));
    b.ejected_until = Some(now + backoff);
    state.ejections.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(
        service = &*state.name,
        backend = &*backend.addr_label,
        backoff_ms = backoff.as_millis() as u64,
        "backend ejected after consecutive connect failures"
    );
    Effects::dirty()
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

/// One tick at `now` for a service's backends: drains end (the backend is Gone once its
/// last connection ends; survivors are closed at the deadline) and Gone backends leave the
/// list, ejections end after their back-off, and a slow-start ramp in progress marks the
/// service dirty (`tick` is the loop's period: one more rebuild lands the full weight).
pub fn tick(
    service: &str,
    backends: &mut Vec<BackendEntry>,
    cfg: &ServiceConfig,
    tick: Duration,
    now: Instant,
) -> Effects {
    let slow_start = cfg.slow_start;
    let trusted = cfg.health.check == CheckKind::None;
    let mut fx = Effects::default();
    let mut gone = false;
    for b in backends.iter_mut() {
        // Drains: done when the last connection ends; survivors closed at the deadline.
        if let Some((_, deadline)) = b.drain {
            if b.backend.active() == 0 && b.operator_drained && b.sources != 0 {
                // Drained for maintenance and still listed: kept, with no connection and
                // no check, until the operator enables it or its source drops it (an
                // `enable` must find it, however long the maintenance).
                b.drain = None;
                fx.dirty = true;
                tracing::info!(
                    service,
                    backend = &*b.backend.addr_label,
                    "backend drained (operator): kept until enabled"
                );
            } else if b.backend.active() == 0 {
                b.backend.set_state(State::Gone);
                gone = true;
                tracing::info!(
                    service,
                    backend = &*b.backend.addr_label,
                    "backend gone: drained"
                );
            } else if now >= deadline && !b.backend.close.is_closed() {
                tracing::info!(
                    service,
                    backend = &*b.backend.addr_label,
                    remaining = b.backend.active(),
                    "drain_timeout passed: closing remaining connections"
                );
                b.backend.close.close();
            }
        }
        // A failure streak that spared the last usable backend has ended.
        if b.backend.is_eject_spared()
            && outlier::streak_ended(b.backend.consecutive_failures.load(Ordering::Relaxed))
        {
            b.backend.clear_eject_spared();
        }
        // Ejections end after their back-off, once a health check passed since.
        if let Some(until) = b.ejected_until {
            let at_ms = b.ejected_at.map_or(u64::MAX, |(_, ms)| ms);
            let last_pass = b.last_pass.load(Ordering::Relaxed);
            if outlier::readmit(now, until, trusted, at_ms, last_pass) {
                b.ejected_until = None;
                b.backend.consecutive_failures.store(0, Ordering::Relaxed);
                b.backend.set_ejected(false);
                fx.dirty = true;
                tracing::info!(
                    service,
                    backend = &*b.backend.addr_label,
                    "backend re-admitted after ejection"
                );
            }
        }
        // Slow start ramps rebuild the table each tick until they end.
        if let Some(up) = b.up_since {
            if !slow_start.is_zero() && now.saturating_duration_since(up) <= slow_start + tick {
                fx.dirty = true;
            }
        }
    }
    if gone {
        // Counters are copied to the exporter at scrape time: give a departing backend's
        // series their final values before it leaves the snapshot.
        for b in backends.iter().filter(|b| b.backend.state() == State::Gone) {
            b.metrics.sync(&b.backend);
        }
        backends.retain(|b| b.backend.state() != State::Gone);
        fx.dirty = true;
    }
    fx
}

/// Whether `tick` has anything to do for these backends at `now` or later: a drain to end,
/// a spared ejection's streak or an ejection's back-off to watch, a slow start still
/// ramping (the same test as `tick`'s, which only ever turns false as time passes). A
/// service without any is left out of the ticks until one of its backends changes.
pub fn tick_pending(
    backends: &[BackendEntry],
    cfg: &ServiceConfig,
    tick: Duration,
    now: Instant,
) -> bool {
    backends.iter().any(|b| {
        b.drain.is_some()
            || b.ejected_until.is_some()
            || b.backend.is_eject_spared()
            || b.up_since.is_some_and(|up| {
                !cfg.slow_start.is_zero()
                    && now.saturating_duration_since(up) <= cfg.slow_start + tick
            })
    })
}

/// The `sources` column of the status API.
pub fn sources_label(bits: u8) -> &'static str {
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

#[cfg(test)]
mod tests;
