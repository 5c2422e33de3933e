//! The lifecycle steps with synthetic instants: no sleeping, no sockets, no tasks.

use super::*;
use crate::table::outlier::{EJECT_BASE, EJECT_FORGET};

const TICK: Duration = Duration::from_millis(250);

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn service_config(check: CheckKind) -> ServiceConfig {
    let config =
        crate::config::Config::parse(std::path::Path::new("t.toml"), "[discovery.docker]\n")
            .unwrap();
    let mut s = config.defaults.clone();
    s.name = "web".into();
    s.health.check = check;
    s.drain_timeout = secs(10);
    s.slow_start = Duration::ZERO;
    s
}

fn addr(i: u8) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, i], 80))
}

fn endpoints(list: &[u8]) -> Endpoints {
    list.iter().map(|&i| Endpoint::at(addr(i), 100)).collect()
}

/// A service's backend list after `source` listed `list` at `now`.
fn listed(cfg: &ServiceConfig, list: &[u8], now: Instant) -> Vec<BackendEntry> {
    let mut backends = Vec::new();
    let fx = set_source(
        &name(),
        &mut backends,
        cfg,
        Source::Static,
        &endpoints(list),
        now,
    );
    assert!(fx.dirty);
    assert_eq!(fx.start_checkers, (0..list.len()).collect::<Vec<_>>());
    backends
}

fn name() -> Arc<str> {
    "web".into()
}

fn state_of(b: &[BackendEntry]) -> Vec<State> {
    b.iter().map(|b| b.backend.state()).collect()
}

#[test]
fn a_drain_ends_when_the_last_connection_does_or_at_its_deadline() {
    let cfg = service_config(CheckKind::None);
    let t0 = Instant::now();
    let mut b = listed(&cfg, &[1, 2], t0);
    b[0].backend.active.store(2, Ordering::Relaxed); // two live connections
    b[1].backend.active.store(1, Ordering::Relaxed);

    // Both unlisted: both drain, with a deadline drain_timeout later.
    let fx = set_source(&name(), &mut b, &cfg, Source::Static, &[], t0);
    assert!(fx.dirty && fx.start_checkers.is_empty());
    assert_eq!(state_of(&b), [State::Draining, State::Draining]);
    assert_eq!(b[0].drain, Some((t0, t0 + secs(10))));

    // Before the deadline nothing is closed.
    let fx = tick("web", &mut b, &cfg, TICK, t0 + secs(9));
    assert!(!fx.dirty);
    assert!(!b[0].backend.close.is_closed());

    // Backend 2's last connection ends: it is gone and leaves the list.
    b[1].backend.active.store(0, Ordering::Relaxed);
    let gone = b[1].backend.clone();
    assert!(tick("web", &mut b, &cfg, TICK, t0 + secs(9)).dirty);
    assert_eq!(gone.state(), State::Gone);
    assert_eq!(b.len(), 1);

    // The deadline passes: the survivors are closed; the backend stays until they end.
    let _ = tick("web", &mut b, &cfg, TICK, t0 + secs(10));
    assert!(b[0].backend.close.is_closed());
    assert_eq!(b[0].backend.state(), State::Draining);
    b[0].backend.active.store(0, Ordering::Relaxed);
    assert!(tick("web", &mut b, &cfg, TICK, t0 + secs(11)).dirty);
    assert!(b.is_empty());
}

#[test]
fn a_draining_backend_listed_again_comes_back_as_it_was() {
    let cfg = service_config(CheckKind::Tcp);
    let t0 = Instant::now();
    let mut b = listed(&cfg, &[1, 2], t0);
    b[0].backend.active.store(1, Ordering::Relaxed);
    let first = b[0].backend.clone();
    let _ = set_source(&name(), &mut b, &cfg, Source::Static, &endpoints(&[2]), t0);
    assert_eq!(state_of(&b), [State::Draining, State::Active]);

    // Listed again before it finished draining: the same backend, active, its checker
    // started again; nothing else changes.
    let fx = set_source(
        &name(),
        &mut b,
        &cfg,
        Source::Static,
        &endpoints(&[1, 2]),
        t0 + secs(1),
    );
    assert_eq!(fx.start_checkers, [0]);
    assert!(fx.dirty);
    assert!(Arc::ptr_eq(&b[0].backend, &first));
    assert_eq!(state_of(&b), [State::Active, State::Active]);
    assert_eq!(b[0].drain, None);
    // Its deadline is gone with the drain: nothing is closed later.
    let _ = tick("web", &mut b, &cfg, TICK, t0 + secs(60));
    assert!(!first.close.is_closed());

    // Another source listing it too changes nothing; losing one of two keeps it.
    let fx = set_source(&name(), &mut b, &cfg, Source::Dns, &endpoints(&[1]), t0);
    assert_eq!(fx, Effects::default());
    assert_eq!(b[0].sources, Source::Static as u8 | Source::Dns as u8);
    let _ = set_source(&name(), &mut b, &cfg, Source::Static, &endpoints(&[2]), t0);
    assert_eq!(b[0].backend.state(), State::Active);
    assert_eq!(sources_label(b[0].sources), "dns");
}

#[test]
fn operator_drain_enable_and_weight() {
    let cfg = service_config(CheckKind::Tcp);
    let t0 = Instant::now();
    let mut b = listed(&cfg, &[1, 2], t0);

    let fx = admin("web", &mut b, &cfg, addr(1), AdminOp::Drain, t0).unwrap();
    assert!(fx.dirty && fx.start_checkers.is_empty());
    assert_eq!(b[0].backend.state(), State::Draining);
    assert!(b[0].operator_drained);

    // An operator's drain holds when the source lists it again.
    let fx = set_source(
        &name(),
        &mut b,
        &cfg,
        Source::Static,
        &endpoints(&[1, 2]),
        t0,
    );
    assert!(fx.start_checkers.is_empty());
    assert_eq!(b[0].backend.state(), State::Draining);

    // Enable brings it back, with its checker.
    let fx = admin("web", &mut b, &cfg, addr(1), AdminOp::Enable, t0).unwrap();
    assert_eq!(fx.start_checkers, [0]);
    assert_eq!(b[0].backend.state(), State::Active);
    assert!(!b[0].operator_drained && b[0].drain.is_none());

    // A weight override wins over the configured weight.
    let _ = admin("web", &mut b, &cfg, addr(2), AdminOp::Weight(7), t0).unwrap();
    assert_eq!(b[1].effective_weight(Duration::ZERO, t0), 7);
    let _ = admin("web", &mut b, &cfg, addr(2), AdminOp::Weight(0), t0).unwrap();
    assert_eq!(b[1].effective_weight(secs(10), t0), 0);

    // Unknown backends, and backends no source lists any more, are refused.
    assert_eq!(
        admin("web", &mut b, &cfg, addr(9), AdminOp::Drain, t0).unwrap_err(),
        AdminError::NoBackend("web".into(), addr(9))
    );
    let _ = set_source(&name(), &mut b, &cfg, Source::Static, &endpoints(&[1]), t0);
    assert_eq!(
        admin("web", &mut b, &cfg, addr(2), AdminOp::Enable, t0).unwrap_err(),
        AdminError::Removed(addr(2))
    );
    assert_eq!(b[1].backend.state(), State::Draining);
}

/// An operator's drain that finishes keeps the backend (an `enable` must find it after
/// the maintenance, however long); a drain that finishes after its source dropped it
/// removes it, as does its source dropping a backend already drained.
#[test]
fn an_operator_drain_that_finishes_keeps_the_backend_until_enabled() {
    let cfg = service_config(CheckKind::Tcp);
    let t0 = Instant::now();
    let mut b = listed(&cfg, &[1, 2], t0);
    b[0].backend.active.store(1, Ordering::Relaxed);
    let _ = admin("web", &mut b, &cfg, addr(1), AdminOp::Drain, t0).unwrap();
    assert!(!b[0].kept_drained());
    assert!(tick_pending(&b, &cfg, TICK, t0));

    // Its last connection ends: drained, kept, nothing left for a tick to do.
    b[0].backend.active.store(0, Ordering::Relaxed);
    assert!(tick("web", &mut b, &cfg, TICK, t0 + secs(1)).dirty);
    assert_eq!(state_of(&b), [State::Draining, State::Active]);
    assert!(b[0].kept_drained() && b[0].drain.is_none());
    assert!(!tick_pending(&b, &cfg, TICK, t0 + secs(1)));
    assert!(!tick("web", &mut b, &cfg, TICK, t0 + secs(3600)).dirty);
    assert_eq!(b.len(), 2);

    // Listed again by its source: still drained (the operator's word holds).
    let _ = set_source(
        &name(),
        &mut b,
        &cfg,
        Source::Static,
        &endpoints(&[1, 2]),
        t0,
    );
    assert!(b[0].kept_drained());

    // Enabled an hour later: active, with its checker.
    let t1 = t0 + secs(3600);
    let fx = admin("web", &mut b, &cfg, addr(1), AdminOp::Enable, t1).unwrap();
    assert_eq!(fx.start_checkers, [0]);
    assert_eq!(state_of(&b), [State::Active, State::Active]);

    // Drained again and kept; then its source drops it: it leaves at the next tick.
    let _ = admin("web", &mut b, &cfg, addr(1), AdminOp::Drain, t1).unwrap();
    let _ = tick("web", &mut b, &cfg, TICK, t1);
    assert!(b[0].kept_drained());
    let fx = set_source(&name(), &mut b, &cfg, Source::Static, &endpoints(&[2]), t1);
    assert!(fx.dirty);
    assert!(tick_pending(&b, &cfg, TICK, t1));
    let gone = b[0].backend.clone();
    assert!(tick("web", &mut b, &cfg, TICK, t1).dirty);
    assert_eq!(gone.state(), State::Gone);
    assert_eq!(b.len(), 1);

    // Dropped by its source while an operator's drain runs: it leaves when the drain ends.
    let mut b = listed(&cfg, &[1], t0);
    b[0].backend.active.store(1, Ordering::Relaxed);
    let _ = admin("web", &mut b, &cfg, addr(1), AdminOp::Drain, t0).unwrap();
    let _ = set_source(&name(), &mut b, &cfg, Source::Static, &[], t0);
    b[0].backend.active.store(0, Ordering::Relaxed);
    assert!(tick("web", &mut b, &cfg, TICK, t0 + secs(1)).dirty);
    assert!(b.is_empty());
}

#[test]
fn slow_start_ramps_from_near_zero_to_full() {
    let mut cfg = service_config(CheckKind::None);
    cfg.slow_start = secs(10);
    let t0 = Instant::now();
    let mut b = listed(&cfg, &[1], t0);
    let ss = cfg.slow_start;
    // check = "none": healthy, and ramping, from the moment it is listed.
    assert_eq!(b[0].up_since, Some(t0));
    assert_eq!(b[0].effective_weight(ss, t0), 1);
    assert_eq!(b[0].effective_weight(ss, t0 + secs(5)), 50);
    assert_eq!(b[0].effective_weight(ss, t0 + secs(10)), 100);
    assert_eq!(b[0].effective_weight(Duration::ZERO, t0), 100);
    // An instant before `up_since` (not possible with one monotonic clock) stays at 1%.
    assert_eq!(
        b[0].effective_weight(ss, t0.checked_sub(secs(1)).unwrap_or(t0)),
        1
    );

    // Every tick of the ramp, and one more, rebuilds the table; then none do.
    assert!(tick("web", &mut b, &cfg, TICK, t0 + secs(5)).dirty);
    assert!(tick("web", &mut b, &cfg, TICK, t0 + ss + TICK).dirty);
    assert!(!tick("web", &mut b, &cfg, TICK, t0 + ss + TICK * 2).dirty);

    // With a health check, the ramp starts when the check passes.
    let cfg = {
        let mut c = service_config(CheckKind::Tcp);
        c.slow_start = ss;
        c
    };
    let mut b = listed(&cfg, &[1], t0);
    assert_eq!(b[0].up_since, None);
    assert_eq!(b[0].effective_weight(ss, t0 + secs(60)), 100); // weight; health gates it
    b[0].health_changed(Health::Up, t0 + secs(3));
    assert_eq!(b[0].effective_weight(ss, t0 + secs(4)), 10);
    assert!(tick("web", &mut b, &cfg, TICK, t0 + secs(4)).dirty);
}

/// Two healthy backends; the first is ejected by the connection path.
fn ejected_pair(cfg: &ServiceConfig, t0: Instant) -> (Arc<ServiceState>, Vec<BackendEntry>) {
    let state = Arc::new(ServiceState::new(name(), 0));
    let b = listed(cfg, &[1, 2], t0);
    for e in &b {
        e.backend.set_health(Health::Up);
    }
    (state, b)
}

fn eject_now(
    state: &ServiceState,
    b: &mut [BackendEntry],
    cfg: &ServiceConfig,
    now: Instant,
    now_ms: u64,
) {
    b[0].backend
        .consecutive_failures
        .store(3, Ordering::Relaxed);
    b[0].backend.set_ejected(true);
    assert!(eject(state, b, cfg, 0, now, now_ms).dirty);
}

#[test]
fn ejection_backs_off_and_needs_a_passed_check_to_end() {
    let cfg = service_config(CheckKind::Tcp);
    let t0 = Instant::now();
    let (state, mut b) = ejected_pair(&cfg, t0);

    eject_now(&state, &mut b, &cfg, t0, 1_000);
    assert_eq!(b[0].ejected_until, Some(t0 + EJECT_BASE));
    assert_eq!(b[0].backend.ejections.load(Ordering::Relaxed), 1);
    assert_eq!(state.ejections.load(Ordering::Relaxed), 1);
    // Seen twice (two connections reported it): scheduled once.
    assert_eq!(
        eject(&state, &mut b, &cfg, 0, t0, 1_000),
        Effects::default()
    );

    // The back-off is not over; then it is, but no check passed since the ejection.
    assert!(!tick("web", &mut b, &cfg, TICK, t0 + Duration::from_millis(500)).dirty);
    b[0].last_pass.store(900, Ordering::Relaxed);
    assert!(!tick("web", &mut b, &cfg, TICK, t0 + secs(5)).dirty);
    assert!(b[0].backend.is_ejected());

    // A check passes: re-admitted, its failure streak forgotten.
    b[0].last_pass.store(1_001, Ordering::Relaxed);
    assert!(tick("web", &mut b, &cfg, TICK, t0 + secs(5)).dirty);
    assert!(!b[0].backend.is_ejected());
    assert_eq!(b[0].ejected_until, None);
    assert_eq!(b[0].backend.consecutive_failures.load(Ordering::Relaxed), 0);

    // Ejected again soon after: twice the back-off, and four times the next time.
    let t1 = t0 + secs(6);
    eject_now(&state, &mut b, &cfg, t1, 7_000);
    assert_eq!(b[0].ejected_until, Some(t1 + EJECT_BASE * 2));
    b[0].last_pass.store(8_000, Ordering::Relaxed);
    let _ = tick("web", &mut b, &cfg, TICK, t1 + secs(2));
    let t2 = t1 + secs(3);
    eject_now(&state, &mut b, &cfg, t2, 10_000);
    assert_eq!(b[0].ejected_until, Some(t2 + EJECT_BASE * 4));
    b[0].last_pass.store(20_000, Ordering::Relaxed);
    let _ = tick("web", &mut b, &cfg, TICK, t2 + secs(4));

    // An ejection long after the previous one starts from the base back-off again.
    let t3 = t2 + EJECT_FORGET + secs(1);
    eject_now(&state, &mut b, &cfg, t3, 400_000);
    assert_eq!(b[0].ejected_until, Some(t3 + EJECT_BASE));
    assert_eq!(b[0].backend.ejections.load(Ordering::Relaxed), 1);
    assert_eq!(state.ejections.load(Ordering::Relaxed), 4);
}

#[test]
fn without_a_health_check_the_backoff_alone_ends_an_ejection() {
    let cfg = service_config(CheckKind::None);
    let t0 = Instant::now();
    let (state, mut b) = ejected_pair(&cfg, t0);
    eject_now(&state, &mut b, &cfg, t0, 1_000);
    assert!(!tick("web", &mut b, &cfg, TICK, t0).dirty);
    assert!(tick("web", &mut b, &cfg, TICK, t0 + EJECT_BASE).dirty);
    assert!(!b[0].backend.is_ejected());
}

#[test]
fn the_last_usable_backend_is_never_ejected() {
    let cfg = service_config(CheckKind::Tcp);
    let t0 = Instant::now();
    let (state, mut b) = ejected_pair(&cfg, t0);
    b[1].backend.set_health(Health::Down);
    b[0].backend
        .consecutive_failures
        .store(3, Ordering::Relaxed);
    b[0].backend.set_ejected(true);
    assert_eq!(eject(&state, &mut b, &cfg, 0, t0, 1), Effects::default());
    assert!(!b[0].backend.is_ejected(), "taken back");
    assert!(b[0].backend.is_eject_spared());
    assert_eq!(state.ejections_spared.load(Ordering::Relaxed), 1);
    assert_eq!(b[0].ejected_until, None);
    // The streak ends (a connect succeeded): the next refusal is reported again.
    let _ = tick("web", &mut b, &cfg, TICK, t0);
    assert!(b[0].backend.is_eject_spared());
    b[0].backend
        .consecutive_failures
        .store(0, Ordering::Relaxed);
    let _ = tick("web", &mut b, &cfg, TICK, t0);
    assert!(!b[0].backend.is_eject_spared());
}

#[test]
fn a_new_health_check_setting_restarts_checkers_or_trusts_every_backend() {
    let cfg = service_config(CheckKind::Tcp);
    let t0 = Instant::now();
    let mut b = listed(&cfg, &[1, 2, 3], t0);
    let _ = set_source(
        &name(),
        &mut b,
        &cfg,
        Source::Static,
        &endpoints(&[1, 2]),
        t0,
    );
    let fx = health_config_changed(&mut b, &cfg, t0);
    assert!(fx.dirty);
    assert_eq!(fx.start_checkers, [0, 1], "not the draining one");

    let none = service_config(CheckKind::None);
    let fx = health_config_changed(&mut b, &none, t0 + secs(1));
    assert!(fx.start_checkers.is_empty());
    assert_eq!(b[0].backend.health(), Health::Up);
    assert_eq!(b[0].up_since, Some(t0 + secs(1)));
    assert_eq!(b[2].backend.health(), Health::Unknown);
}
