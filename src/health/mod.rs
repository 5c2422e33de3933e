//! Active health checks: a pure rise/fall state machine (`Verdict`) and the probes that feed
//! it (`probe`), run by one task per backend (`run_checker`).
//!
//! A new backend starts `Unknown` and gets no traffic until it has passed `rise` checks in a
//! row; a healthy one leaves rotation after `fall` failures in a row. The checker only writes
//! the backend's health atomic and tells the control plane about transitions; it never
//! touches the routing table.

pub mod probe;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::close::CloseSignal;
use crate::config::HealthConfig;
use crate::table::{Backend, Health, ServiceState};

/// The rise/fall counter. Pure: no I/O, no clock.
#[derive(Debug, Clone)]
pub struct Verdict {
    rise: u32,
    fall: u32,
    passes: u32,
    failures: u32,
    health: Health,
}

impl Verdict {
    pub fn new(rise: u32, fall: u32, initial: Health) -> Verdict {
        Verdict {
            rise: rise.max(1),
            fall: fall.max(1),
            passes: 0,
            failures: 0,
            health: initial,
        }
    }

    pub fn health(&self) -> Health {
        self.health
    }

    /// Records one check result; returns the new health if it changed.
    pub fn observe(&mut self, ok: bool) -> Option<Health> {
        if ok {
            self.failures = 0;
            self.passes = self.passes.saturating_add(1);
            if self.health != Health::Up && self.passes >= self.rise {
                self.health = Health::Up;
                return Some(Health::Up);
            }
        } else {
            self.passes = 0;
            self.failures = self.failures.saturating_add(1);
            // A backend never seen healthy goes Down on its first failure streak too, so
            // the admin API can tell "not ready yet" from "failing".
            if self.health != Health::Down && self.failures >= self.fall {
                self.health = Health::Down;
                return Some(Health::Down);
            }
        }
        None
    }
}

/// A health transition, reported to the control plane.
#[derive(Debug)]
pub struct Transition {
    /// The backend's service: the control plane finds the backend among that service's
    /// few, not among every backend it has.
    pub service: Arc<ServiceState>,
    pub backend: Arc<Backend>,
    pub health: Health,
}

/// Milliseconds on a monotonic clock (since the first call in this process), for the last
/// passed check of a backend: an ejected backend is re-admitted only after a check passed
/// since its ejection. Monotonic, so a wall-clock step back cannot keep a backend out.
pub fn now_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    // +1: a check that passes in the very first millisecond still reads as "after" an
    // ejection recorded at 0.
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
        + 1
}

/// Checks `backend` every `interval` (±10% jitter, so checks of many backends spread out)
/// until `stop` closes. Writes the backend's health and reports transitions on `tx`.
pub async fn run_checker(
    service: Arc<ServiceState>,
    backend: Arc<Backend>,
    cfg: HealthConfig,
    last_pass: Arc<AtomicU64>,
    tx: mpsc::UnboundedSender<Transition>,
    stop: Arc<CloseSignal>,
) {
    let mut verdict = Verdict::new(cfg.rise, cfg.fall, backend.health());
    let stopped = stop.wait();
    tokio::pin!(stopped);
    let mut first = true;
    loop {
        let wait = if first {
            Duration::ZERO
        } else {
            jitter(cfg.interval)
        };
        first = false;
        tokio::select! {
            _ = &mut stopped => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let ok = tokio::select! {
            _ = &mut stopped => return,
            ok = probe::probe(backend.addr, &cfg) => ok,
        };
        if ok {
            last_pass.store(now_ms(), Ordering::Relaxed);
        }
        if let Some(h) = verdict.observe(ok) {
            backend.set_health(h);
            let _ = tx.send(Transition {
                service: service.clone(),
                backend: backend.clone(),
                health: h,
            });
        }
    }
}

/// `d` ± 10%, from a cheap per-call pseudo-random value (no shared RNG).
fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    let mut x = u64::from(nanos) ^ 0x9E37_79B9_7F4A_7C15;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    let frac = (x % 2001) as f64 / 10_000.0 - 0.1; // -0.1 ..= +0.1
    d.mul_f64(1.0 + frac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rise_gates_a_new_backend() {
        let mut v = Verdict::new(2, 2, Health::Unknown);
        assert_eq!(v.observe(true), None);
        assert_eq!(v.health(), Health::Unknown);
        assert_eq!(v.observe(true), Some(Health::Up));
        assert_eq!(v.observe(true), None);
    }

    #[test]
    fn fall_needs_consecutive_failures() {
        let mut v = Verdict::new(2, 3, Health::Up);
        assert_eq!(v.observe(false), None);
        assert_eq!(v.observe(false), None);
        assert_eq!(v.observe(true), None); // streak broken
        assert_eq!(v.observe(false), None);
        assert_eq!(v.observe(false), None);
        assert_eq!(v.observe(false), Some(Health::Down));
        assert_eq!(v.observe(true), None);
        assert_eq!(v.observe(true), Some(Health::Up));
    }

    #[test]
    fn unknown_goes_down_after_fall_failures() {
        let mut v = Verdict::new(2, 2, Health::Unknown);
        assert_eq!(v.observe(false), None);
        assert_eq!(v.observe(false), Some(Health::Down));
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        for _ in 0..1000 {
            let j = jitter(Duration::from_secs(1));
            assert!(j >= Duration::from_millis(900) && j <= Duration::from_millis(1100));
        }
    }
}
