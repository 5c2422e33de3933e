//! Passive outlier detection's rules, in one place: after how many failures a backend is
//! ejected, how long it stays out, and when it comes back.
//!
//! ```text
//!  connect fails EJECT_AFTER_FAILURES times in a row ─► ServiceTable::eject (proxy/conn.rs)
//!     ─► control schedules re-admission: back-off 1 s, 2 s, 4 s ... at most EJECT_MAX
//!        (an ejection EJECT_FORGET after the previous one starts again from 1 s)
//!     ─► re-admitted once the back-off passed and a health check passed since the
//!        ejection (at once when the service has no health check)
//! ```
//!
//! Both the connection path (`proxy/`) and the control plane import these; neither imports
//! the other. Pure: nothing here reads a clock; every instant is a parameter.

use std::time::{Duration, Instant};

/// Consecutive connect failures (refused, reset, unreachable; never timeouts) after which a
/// backend is ejected at once, without waiting for its next health check.
pub const EJECT_AFTER_FAILURES: u32 = 3;
/// The first ejection's back-off; each ejection in a row doubles it.
pub const EJECT_BASE: Duration = Duration::from_secs(1);
/// The longest back-off.
pub const EJECT_MAX: Duration = Duration::from_secs(30);
/// An ejection this long after the previous one starts the back-off from `EJECT_BASE` again.
pub const EJECT_FORGET: Duration = Duration::from_secs(300);

/// The ejection count after one more ejection at `now`: `previous + 1`, or 1 when the
/// previous ejection (at `last`) is more than [`EJECT_FORGET`] ago.
pub fn next_count(previous: u32, last: Option<Instant>, now: Instant) -> u32 {
    let forgotten = last.is_some_and(|t| now.saturating_duration_since(t) > EJECT_FORGET);
    let n = if forgotten { 0 } else { previous };
    n.saturating_add(1)
}

/// How long the `n`-th ejection in a row (from 1) keeps a backend out.
pub fn backoff(n: u32) -> Duration {
    EJECT_BASE
        .saturating_mul(1u32 << n.saturating_sub(1).min(16))
        .min(EJECT_MAX)
}

/// Whether an ejected backend comes back at `now`: its back-off (`until`) passed, and a
/// health check passed after the ejection (`last_pass_ms > ejected_ms`, both on
/// `health::now_ms`'s monotonic clock) unless the service has no health check (`trusted`).
pub fn readmit(
    now: Instant,
    until: Instant,
    trusted: bool,
    ejected_ms: u64,
    last_pass_ms: u64,
) -> bool {
    now >= until && (trusted || last_pass_ms > ejected_ms)
}

/// Whether a failure streak that spared the service's last usable backend has ended (the
/// next refusal is reported again).
pub fn streak_ended(consecutive_failures: u32) -> bool {
    consecutive_failures < EJECT_AFTER_FAILURES
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let secs: Vec<u64> = (1..=8).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(backoff(u32::MAX), EJECT_MAX);
        assert_eq!(backoff(0), EJECT_BASE);
    }

    #[test]
    fn an_old_ejection_is_forgotten() {
        let t0 = Instant::now();
        assert_eq!(next_count(0, None, t0), 1);
        assert_eq!(next_count(3, Some(t0), t0 + EJECT_FORGET), 4);
        assert_eq!(
            next_count(3, Some(t0), t0 + EJECT_FORGET + Duration::from_millis(1)),
            1
        );
        assert_eq!(next_count(u32::MAX, Some(t0), t0), u32::MAX);
    }

    #[test]
    fn readmission_needs_the_backoff_and_a_passed_check() {
        let t0 = Instant::now();
        let until = t0 + Duration::from_secs(2);
        assert!(!readmit(t0, until, false, 100, 200), "back-off not over");
        assert!(!readmit(until, until, false, 100, 100), "no check since");
        assert!(!readmit(until, until, false, 100, 0), "never passed");
        assert!(readmit(until, until, false, 100, 101));
        assert!(
            readmit(until, until, true, 100, 0),
            "no health check: back-off only"
        );
    }

    #[test]
    fn the_connection_path_uses_the_same_threshold() {
        // proxy/conn.rs still has its own constant (another change edits that file); until
        // it imports this one, they must agree.
        assert_eq!(
            crate::proxy::conn::EJECT_AFTER_FAILURES,
            EJECT_AFTER_FAILURES
        );
        assert!(!streak_ended(EJECT_AFTER_FAILURES));
        assert!(streak_ended(EJECT_AFTER_FAILURES - 1));
    }
}
