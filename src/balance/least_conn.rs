//! Weighted least connections.
//!
//! Picks the non-skipped backend with the smallest `active / weight`, compared exactly by
//! cross-multiplication in `u128` (`active_a · weight_b < active_b · weight_a`; no floats,
//! no overflow for any `u64` count and `u32` weight).
//!
//! Ties go to the first minimum met in scan order, and the scan starts at a rotating
//! position drawn from an atomic counter, so backends that are equally loaded share new
//! connections instead of the lowest index taking them all. With unequal weights the start
//! position is weighted too: counter `c` maps to the point `frac(c·φ)·W` on the
//! cumulative-weight line (`W = Σ weight`; the golden-ratio Weyl sequence, which spreads
//! consecutive points as evenly as possible), and a binary search over the prefix sums
//! finds whose range holds it — one multiply, no division. So when everything is
//! idle — every `active` is 0, all tied, typical of short connections — backends still get
//! new connections in proportion to their weight, like nginx's least_conn, which breaks
//! ties by weighted round robin.
//!
//! Cost: up to [`EXACT_UP_TO`] backends, **O(n)** per pick — one `skip` and one `active`
//! call (an atomic load) per backend — plus `O(log n)` for the weighted start. The scan
//! stops early at the first backend with no active connection, since nothing can beat
//! `0 / weight`.
//!
//! Larger services: **O(k + log n)**. The pick compares [`SAMPLES`] candidates — the
//! weighted start, then uniformly random others — and keeps the lowest `active / weight`
//! (power of k choices, Mitzenmacher 2001, with k = 16 where p2c has 2). Idle services
//! still share by weight (the weighted start wins ties at 0), and loaded ones converge to
//! `active ∝ weight` because the comparison is normalised by weight. A backend that is far
//! below its share gets every pick that samples it, so it catches up within ~n/k picks
//! instead of at once, which also avoids the herd onto a new backend that an exact scan
//! causes. If every sample is skipped (most backends tried or ejected), the exact scan
//! decides, so `None` still means that every backend is skipped.

use super::hash::rand_below;
use super::{FastMod, PaddedCounter};

/// Services with at most this many backends are scanned exactly on every pick.
pub(super) const EXACT_UP_TO: usize = 64;
/// Candidates compared per pick in larger services.
pub(super) const SAMPLES: usize = 16;

#[derive(Debug)]
pub(super) struct LeastConn {
    /// `(backend index, weight > 0)`, ascending by index.
    backends: Box<[(u32, u32)]>,
    /// Weighted start positions; `None` when all weights are equal (start = counter mod n).
    weighted_start: Option<WeightedStart>,
    /// `mod backends.len()`.
    modulo: FastMod,
    counter: PaddedCounter,
}

#[derive(Debug)]
struct WeightedStart {
    /// `ends[p]` = Σ weights of positions `0..=p`.
    ends: Box<[u64]>,
    total: u64,
}

impl WeightedStart {
    fn new(weights: impl Iterator<Item = u32>) -> WeightedStart {
        let mut total = 0u64;
        let ends: Box<[u64]> = weights
            .map(|w| {
                total += u64::from(w);
                total
            })
            .collect();
        WeightedStart { ends, total }
    }

    /// The position whose cumulative-weight range holds the `counter`-th point of the
    /// golden-ratio sequence `frac(counter · φ) · total`.
    #[inline]
    fn position(&self, counter: u32) -> usize {
        let fraction = u64::from(counter).wrapping_mul(GOLDEN_RATIO_64);
        let point = ((u128::from(fraction) * u128::from(self.total)) >> 64) as u64;
        self.ends.partition_point(|&end| end <= point)
    }
}

/// 2^64 / φ: multiplying by it and keeping the low 64 bits steps around the unit circle
/// by the golden ratio (a Weyl sequence, the most evenly spread one).
const GOLDEN_RATIO_64: u64 = 0x9E37_79B9_7F4A_7C15;

impl LeastConn {
    /// `eligible`: `(backend index, weight > 0)`, ascending by index, non-empty.
    pub(super) fn build(eligible: &[(u32, u32)]) -> LeastConn {
        let first_weight = eligible.first().map_or(0, |&(_, w)| w);
        let equal = eligible.iter().all(|&(_, w)| w == first_weight);
        LeastConn {
            backends: eligible.into(),
            // n ≤ u32::MAX (`Selector::build`).
            modulo: FastMod::new(eligible.len() as u32),
            weighted_start: (!equal).then(|| WeightedStart::new(eligible.iter().map(|&(_, w)| w))),
            counter: PaddedCounter::default(),
        }
    }

    #[inline]
    pub(super) fn pick(
        &self,
        active: &impl Fn(usize) -> u64,
        skip: &impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let n = self.backends.len();
        let counter = self.counter.next();
        let start = match &self.weighted_start {
            Some(weighted) => weighted.position(counter),
            None => self.modulo.rem(counter),
        };
        if n > EXACT_UP_TO {
            if let Some(index) = self.pick_sampled(start, active, skip) {
                return Some(index);
            }
        }
        let (head, tail) = self.backends.split_at(start.min(n));
        // The best so far; starts as an "infinitely loaded" sentinel (1 / 0) that any
        // backend beats.
        let (mut best_index, mut best_load, mut best_weight) = (None, 1u64, 0u32);
        for part in [tail, head] {
            for &(index, weight) in part {
                let index = index as usize;
                if skip(index) {
                    continue;
                }
                let load = active(index);
                if load == 0 {
                    return Some(index);
                }
                if u128::from(load) * u128::from(best_weight)
                    < u128::from(best_load) * u128::from(weight)
                {
                    (best_index, best_load, best_weight) = (Some(index), load, weight);
                }
            }
        }
        best_index
    }

    /// The least loaded (per weight) of [`SAMPLES`] candidates: position `start`, then
    /// uniformly random positions. `None` if every candidate was skipped.
    #[inline]
    fn pick_sampled(
        &self,
        start: usize,
        active: &impl Fn(usize) -> u64,
        skip: &impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let n = self.backends.len();
        let (mut best_index, mut best_load, mut best_weight) = (None, 1u64, 0u32);
        let mut position = start.min(n - 1);
        for k in 0..SAMPLES {
            if k > 0 {
                position = rand_below(n);
            }
            let (index, weight) = self.backends[position];
            let index = index as usize;
            if skip(index) {
                continue;
            }
            let load = active(index);
            if load == 0 {
                return Some(index);
            }
            if u128::from(load) * u128::from(best_weight)
                < u128::from(best_load) * u128::from(weight)
            {
                (best_index, best_load, best_weight) = (Some(index), load, weight);
            }
        }
        best_index
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    fn build(weights: &[u32]) -> LeastConn {
        let eligible: Vec<(u32, u32)> = weights
            .iter()
            .enumerate()
            .filter(|&(_, &w)| w > 0)
            .map(|(i, &w)| (i as u32, w))
            .collect();
        LeastConn::build(&eligible)
    }

    #[test]
    fn picks_the_lowest_active_per_weight() {
        let lc = build(&[1, 3, 1]);
        let active = [1u64, 2, 5];
        // 1/1 vs 2/3 vs 5/1: backend 1.
        for _ in 0..10 {
            assert_eq!(lc.pick(&|i| active[i], &|_| false), Some(1));
        }
        // Skipping 1 leaves 1/1 vs 5/1.
        assert_eq!(lc.pick(&|i| active[i], &|i| i == 1), Some(0));
    }

    #[test]
    fn ties_rotate_across_equal_backends() {
        let lc = build(&[10, 10, 10, 10]);
        let mut counts = [0u32; 4];
        for _ in 0..400 {
            counts[lc.pick(&|_| 3, &|_| false).expect("a backend")] += 1;
        }
        assert_eq!(counts, [100; 4]);
    }

    #[test]
    fn idle_backends_share_by_weight() {
        let lc = build(&[100, 200, 300]);
        let mut counts = [0u32; 3];
        for _ in 0..6_000 {
            counts[lc.pick(&|_| 0, &|_| false).expect("a backend")] += 1;
        }
        for (count, expected) in counts.iter().zip([1_000u32, 2_000, 3_000]) {
            assert!(count.abs_diff(expected) <= 5, "{counts:?}");
        }
    }

    #[test]
    fn open_connections_balance_by_weight() {
        // Every picked connection stays open: active counts must track the weights.
        let lc = build(&[100, 200, 300]);
        let active = RefCell::new([0u64; 3]);
        for _ in 0..6_000 {
            let i = lc
                .pick(&|i| active.borrow()[i], &|_| false)
                .expect("a backend");
            active.borrow_mut()[i] += 1;
        }
        let active = active.into_inner();
        for (count, expected) in active.iter().zip([1_000u64, 2_000, 3_000]) {
            assert!(count.abs_diff(expected) <= 1, "{active:?}");
        }
    }

    #[test]
    fn churning_connections_balance_by_weight() {
        // Connections open and close at random; the open ones stay balanced by weight.
        let lc = build(&[100, 200, 300, 0]);
        let active = RefCell::new([0u64; 4]);
        let mut open: Vec<usize> = Vec::new();
        let mut state = 0x1234_5678_9ABC_DEF0u64;
        for _ in 0..50_000 {
            state = super::super::hash::mix64(state);
            if open.len() > 600 || (!open.is_empty() && state % 3 == 0) {
                let victim = (state >> 8) as usize % open.len();
                active.borrow_mut()[open.swap_remove(victim)] -= 1;
            } else {
                let i = lc
                    .pick(&|i| active.borrow()[i], &|_| false)
                    .expect("a backend");
                active.borrow_mut()[i] += 1;
                open.push(i);
            }
        }
        let active = active.into_inner();
        let total: u64 = active.iter().sum();
        assert_eq!(active[3], 0);
        for (count, share) in active.iter().zip([1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0]) {
            let got = *count as f64 / total as f64;
            assert!((got - share).abs() <= 0.02, "{active:?}");
        }
    }

    #[test]
    fn weight_zero_skip_and_none() {
        let lc = build(&[0, 5, 0, 5]);
        for _ in 0..100 {
            let i = lc.pick(&|_| 0, &|_| false).expect("a backend");
            assert!(i == 1 || i == 3);
        }
        for _ in 0..10 {
            assert_eq!(lc.pick(&|_| 0, &|i| i == 1), Some(3));
        }
        assert_eq!(lc.pick(&|_| 0, &|_| true), None);
    }

    #[test]
    fn extreme_counts_do_not_overflow() {
        let lc = build(&[u32::MAX, 1]);
        let active = [u64::MAX, u64::MAX - 1];
        assert_eq!(lc.pick(&|i| active[i], &|_| false), Some(0));
    }

    fn mixed(n: usize) -> Vec<u32> {
        (0..n).map(|i| 100 * (1 + (i % 3) as u32)).collect()
    }

    #[test]
    fn large_services_balance_held_connections_by_weight() {
        // Sampled picks (n > EXACT_UP_TO): every picked connection stays open.
        let n = 1_000;
        let weights = mixed(n);
        let lc = build(&weights);
        let active = RefCell::new(vec![0u64; n]);
        for _ in 0..60_000 {
            let i = lc
                .pick(&|i| active.borrow()[i], &|_| false)
                .expect("a backend");
            active.borrow_mut()[i] += 1;
        }
        let active = active.into_inner();
        // 60,000 over a total weight of 200,000: 0.3 connections per unit of weight.
        let mut by_class = [0u64; 3];
        for (i, &a) in active.iter().enumerate() {
            by_class[i % 3] += a;
            let expected = 0.3 * f64::from(weights[i]);
            assert!(
                (a as f64 - expected).abs() <= 0.25 * expected + 2.0,
                "backend {i} (weight {}) holds {a}, expected ~{expected}",
                weights[i]
            );
        }
        for (count, expected) in by_class.iter().zip([10_020u64, 19_980, 30_000]) {
            assert!(
                count.abs_diff(expected) <= expected / 50,
                "{by_class:?} by weight class"
            );
        }
    }

    #[test]
    fn large_idle_services_share_by_weight_and_honour_skips() {
        let n = 999;
        let lc = build(&mixed(n));
        let mut by_class = [0u32; 3];
        for _ in 0..60_000 {
            by_class[lc.pick(&|_| 0, &|_| false).expect("a backend") % 3] += 1;
        }
        for (count, expected) in by_class.iter().zip([10_000u32, 20_000, 30_000]) {
            assert!(count.abs_diff(expected) <= 300, "{by_class:?}");
        }
        // Everything but one backend skipped: the exact scan finds it.
        for _ in 0..100 {
            assert_eq!(lc.pick(&|_| 5, &|i| i != 777), Some(777));
        }
        assert_eq!(lc.pick(&|_| 5, &|_| true), None);
        // A skipped backend is never picked, however idle.
        for _ in 0..100 {
            let i = lc
                .pick(&|i| if i == 4 { 0 } else { 7 }, &|i| i == 4)
                .expect("a backend");
            assert_ne!(i, 4);
        }
    }

    #[test]
    fn weighted_start_follows_weights() {
        let start = WeightedStart::new([1u32, 2, 3, 4].into_iter());
        assert_eq!(start.total, 10);
        let mut counts = [0u32; 4];
        for c in 0..10_000 {
            counts[start.position(c)] += 1;
        }
        for (count, expected) in counts.iter().zip([1_000u32, 2_000, 3_000, 4_000]) {
            assert!(count.abs_diff(expected) <= 5, "{counts:?}");
        }
    }
}
