//! Backend selection: the load-balancing algorithms of a service.
//!
//! The routing table is rebuilt off the hot path whenever backends, health or weights
//! change; each service in it carries a [`Selector`] built by [`Selector::build`] from the
//! backends that may currently get traffic, with their effective weights (slow start
//! included). The accept path calls [`Selector::pick`] once per connection, and again for
//! each connect retry with the backends already tried marked as skipped.
//!
//! `pick` takes no lock, allocates nothing and formats nothing: a selector is immutable
//! after `build` except for atomics (round robin's and least_conn's rotating counters) and
//! p2c's thread-local random state. Everything costly — schedules, prefix sums, Maglev's
//! lookup table — is computed by `build`.
//!
//! | algorithm | [`Balance`] | pick | build | memory |
//! | --- | --- | --- | --- | --- |
//! | smooth weighted round robin (`round_robin.rs`) | `RoundRobin` | O(1): one `fetch_add`, one load | O(W·n) ≤ 2^24 steps for the exact nginx order, else O(W + n) | W × 4 bytes, W ≤ 2^20 + n (none for equal weights) |
//! | weighted least connections (`least_conn.rs`) | `LeastConn` | O(n) up to 64 backends (reads every active count), then O(log n): the least loaded of 16 samples | O(n) | n × 16 bytes |
//! | power of two choices (`p2c.rs`) | `P2c` | O(log n): two weighted draws, two loads | O(n) | n × 16 bytes |
//! | Maglev consistent hashing (`maglev.rs`) | `Maglev` | O(1): a hash and one table read | O(M log M) | M × 4 bytes, M ≈ 100·n, 65,537 ≤ M ≤ 2,097,143 |
//!
//! (`n` = backends with weight > 0, `W` = sum of their gcd-reduced weights, `M` = Maglev
//! table size.) `benches/balance.rs` measures all of them; at 10,000 backends a build takes
//! under ~50 ms, Maglev's ~0.1 s.
//!
//! Common rules, whatever the algorithm:
//! * a backend with weight 0 is never picked;
//! * `skip(i)` backends are never picked; when the algorithm's first choice is skipped it
//!   moves on to another backend deterministically where the algorithm is deterministic
//!   (round robin walks its schedule, Maglev walks its table);
//! * `pick` returns `None` only when every backend is skipped or has weight 0.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};

pub use crate::config::Balance;

mod hash;
mod least_conn;
mod maglev;
mod p2c;
mod round_robin;

use least_conn::LeastConn;
use maglev::Maglev;
use p2c::P2c;
use round_robin::RoundRobin;

/// A rotating counter alone on its cache line(s), so the writes of `fetch_add` do not
/// invalidate the read-only data (schedule pointer and length) that other cores load on
/// every pick. It is 32 bits wide so positions are taken with [`FastMod`]: it wraps every
/// 2^32 picks, which only makes one rotation restart early.
#[repr(align(128))]
#[derive(Debug, Default)]
struct PaddedCounter(AtomicU32);

impl PaddedCounter {
    #[inline]
    fn next(&self) -> u32 {
        self.0.fetch_add(1, Ordering::Relaxed)
    }
}

/// `a mod d` for a 32-bit `a` by two multiplications instead of a division (Lemire, Kaser &
/// Kurz, "Faster Remainder by Direct Computation", 2019): exact for every `u32` `a` and
/// non-zero `u32` `d`. A 64-bit division costs tens of cycles on common x86 cores, more
/// than the rest of a round-robin pick.
#[derive(Debug, Clone, Copy)]
struct FastMod {
    divisor: u64,
    /// ⌈2^64 / divisor⌉ (wraps to 0 for divisor 1, which still gives 0).
    magic: u64,
}

impl FastMod {
    /// `divisor` must be non-zero (it is clamped to 1).
    fn new(divisor: u32) -> FastMod {
        let divisor = u64::from(divisor.max(1));
        FastMod {
            divisor,
            magic: (u64::MAX / divisor).wrapping_add(1),
        }
    }

    #[inline]
    fn rem(&self, a: u32) -> usize {
        let low = self.magic.wrapping_mul(u64::from(a));
        ((u128::from(low) * u128::from(self.divisor)) >> 64) as usize
    }
}

/// Entries of a round-robin schedule or a Maglev table walked after a skip before falling
/// back to one scan of all eligible backends: keeps a skip `O(n)` in the worst case.
fn walk_limit(eligible: usize) -> usize {
    eligible.saturating_mul(4).max(64)
}

/// Picks backends for one service; built by [`Selector::build`], shared by every accept
/// task (it is `Send + Sync`).
pub struct Selector {
    algorithm: Balance,
    len: usize,
    eligible: usize,
    inner: Inner,
}

enum Inner {
    /// No backend with weight > 0.
    Empty,
    RoundRobin(RoundRobin),
    LeastConn(LeastConn),
    P2c(P2c),
    Maglev(Maglev),
}

impl Selector {
    /// Builds the selector of `algo` over `backends`: `backends[i]` = (address, effective
    /// weight). Entries with weight 0 are never picked. Indices returned by [`pick`] are
    /// indices into `backends`.
    ///
    /// Runs off the hot path; its cost is in the module table (at 10,000 backends: well
    /// under 50 ms, except Maglev's ~0.1 s).
    ///
    /// [`pick`]: Selector::pick
    pub fn build(algo: Balance, backends: &[(SocketAddr, u32)]) -> Selector {
        // Indices are stored as u32: entries past u32::MAX (never seen in practice) are
        // left out rather than truncated.
        let eligible: Vec<(u32, u32)> = backends
            .iter()
            .enumerate()
            .take(u32::MAX as usize)
            .filter(|&(_, &(_, weight))| weight > 0)
            .map(|(index, &(_, weight))| (index as u32, weight))
            .collect();
        let inner = if eligible.is_empty() {
            Inner::Empty
        } else {
            match algo {
                Balance::RoundRobin => Inner::RoundRobin(RoundRobin::build(&eligible)),
                Balance::LeastConn => Inner::LeastConn(LeastConn::build(&eligible)),
                Balance::P2c => Inner::P2c(P2c::build(&eligible)),
                Balance::Maglev => Inner::Maglev(Maglev::build(&eligible, backends)),
            }
        };
        Selector {
            algorithm: algo,
            len: backends.len(),
            eligible: eligible.len(),
            inner,
        }
    }

    /// Picks an index into the `backends` given to [`build`](Selector::build).
    ///
    /// `active(i)` = live connections of backend `i` (an atomic load by the caller; only
    /// least_conn and p2c call it); `skip(i)` = true for backends to avoid (already tried
    /// for this connection, or ejected). `client` is only used by Maglev. Returns `None`
    /// when every backend is skipped or has weight 0.
    ///
    /// No lock, no allocation; see the module docs for each algorithm's cost.
    #[inline]
    pub fn pick(
        &self,
        client: IpAddr,
        active: impl Fn(usize) -> u64,
        skip: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        match &self.inner {
            Inner::Empty => None,
            Inner::RoundRobin(rr) => rr.pick(&skip),
            Inner::LeastConn(lc) => lc.pick(&active, &skip),
            Inner::P2c(p2c) => p2c.pick(&active, &skip),
            Inner::Maglev(maglev) => maglev.pick(client, &skip),
        }
    }

    /// Number of backends given to [`build`](Selector::build), weight 0 included.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether [`build`](Selector::build) was given no backend at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of backends that can be picked (weight > 0).
    pub fn eligible(&self) -> usize {
        self.eligible
    }

    /// The algorithm this selector runs.
    pub fn algorithm(&self) -> Balance {
        self.algorithm
    }
}

impl fmt::Debug for Selector {
    /// A summary: schedules and lookup tables are far too large to print.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = f.debug_struct("Selector");
        s.field("algorithm", &self.algorithm)
            .field("len", &self.len)
            .field("eligible", &self.eligible);
        match &self.inner {
            Inner::RoundRobin(rr) => {
                s.field("schedule", &rr.kind())
                    .field("schedule_len", &rr.schedule_len())
                    .field("weights_scaled", &rr.scaled());
            }
            Inner::Maglev(maglev) => {
                s.field("table_len", &maglev.table_len());
            }
            Inner::Empty | Inner::LeastConn(_) | Inner::P2c(_) => {}
        }
        s.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const ALL: [Balance; 4] = [
        Balance::RoundRobin,
        Balance::LeastConn,
        Balance::P2c,
        Balance::Maglev,
    ];

    fn backends(weights: &[u32]) -> Vec<(SocketAddr, u32)> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| (SocketAddr::from(([10, 0, 0, i as u8 + 1], 8080)), w))
            .collect()
    }

    fn client(i: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0xC0A8_0000 + i))
    }

    #[test]
    fn fast_mod_is_exact() {
        let mut x = 0x0123_4567_89AB_CDEFu64;
        let divisors = [
            1u32,
            2,
            3,
            7,
            10,
            1_000,
            65_537,
            1 << 20,
            u32::MAX - 1,
            u32::MAX,
        ];
        for d in divisors {
            let fast = FastMod::new(d);
            for a in [0u32, 1, d - 1, d, d.wrapping_add(1), u32::MAX - 1, u32::MAX] {
                assert_eq!(fast.rem(a), (a % d) as usize, "{a} mod {d}");
            }
            for _ in 0..10_000 {
                x = hash::mix64(x);
                let a = x as u32;
                assert_eq!(fast.rem(a), (a % d) as usize, "{a} mod {d}");
            }
        }
    }

    #[test]
    fn selector_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Selector>();
    }

    #[test]
    fn empty_and_all_zero_weight_pick_none() {
        for algo in ALL {
            let empty = Selector::build(algo, &[]);
            assert!(empty.is_empty());
            assert_eq!(empty.len(), 0);
            assert_eq!(empty.pick(client(1), |_| 0, |_| false), None, "{algo:?}");

            let zero = Selector::build(algo, &backends(&[0, 0, 0]));
            assert!(!zero.is_empty());
            assert_eq!(zero.len(), 3);
            assert_eq!(zero.eligible(), 0);
            assert_eq!(zero.pick(client(1), |_| 0, |_| false), None, "{algo:?}");
        }
    }

    #[test]
    fn weight_zero_is_never_picked_by_any_algorithm() {
        for algo in ALL {
            let selector = Selector::build(algo, &backends(&[0, 100, 0, 300, 0]));
            assert_eq!(selector.eligible(), 2);
            for i in 0..5_000 {
                let picked = selector
                    .pick(client(i), |_| 0, |_| false)
                    .expect("a backend");
                assert!(picked == 1 || picked == 3, "{algo:?} picked {picked}");
            }
        }
    }

    #[test]
    fn skip_is_honoured_by_every_algorithm() {
        let weights = [100, 200, 300, 0, 50];
        for algo in ALL {
            let selector = Selector::build(algo, &backends(&weights));
            for i in 0..5_000 {
                // Skip one backend, as a retry after a failed connect does.
                let avoid = i as usize % weights.len();
                let picked = selector
                    .pick(client(i), |_| 0, |b| b == avoid)
                    .expect("a backend");
                assert_ne!(picked, avoid, "{algo:?}");
                assert_ne!(picked, 3, "{algo:?}");
                // Only backend 4 left.
                let last = selector.pick(client(i), |_| 0, |b| b != 4);
                assert_eq!(last, Some(4), "{algo:?}");
            }
            assert_eq!(selector.pick(client(1), |_| 0, |_| true), None, "{algo:?}");
            assert_eq!(
                selector.pick(client(1), |_| 0, |b| b != 3),
                None,
                "{algo:?}: only a weight-0 backend is left"
            );
        }
    }

    #[test]
    fn every_algorithm_shares_by_weight() {
        let weights = [100, 200, 300];
        // (algorithm, tolerance on each share)
        for (algo, tolerance) in [
            (Balance::RoundRobin, 0.02),
            (Balance::LeastConn, 0.02),
            (Balance::P2c, 0.05),
            (Balance::Maglev, 0.02),
        ] {
            let selector = Selector::build(algo, &backends(&weights));
            let mut counts = [0u32; 3];
            for i in 0..60_000 {
                counts[selector
                    .pick(client(i), |_| 0, |_| false)
                    .expect("a backend")] += 1;
            }
            for (count, w) in counts.iter().zip(weights) {
                let share = f64::from(*count) / 60_000.0;
                let expected = f64::from(w) / 600.0;
                assert!((share - expected).abs() <= tolerance, "{algo:?} {counts:?}");
            }
        }
    }

    #[test]
    fn debug_is_a_summary() {
        let text = format!(
            "{:?}",
            Selector::build(Balance::Maglev, &backends(&[1, 2, 3]))
        );
        assert!(text.contains("table_len: 65537"), "{text}");
        let text = format!(
            "{:?}",
            Selector::build(Balance::RoundRobin, &backends(&[5, 1, 1]))
        );
        assert!(text.contains("schedule_len: 7"), "{text}");
    }
}
