//! Power of two choices (Mitzenmacher, 2001), weighted.
//!
//! Draw two *distinct* backends at random, each with probability proportional to its
//! weight, and keep the one with the lower `active / weight` (compared by
//! cross-multiplication in `u128`; a tie keeps the first draw, so with no load the pick is
//! simply weighted-random). Two random choices make the maximum load exponentially better
//! than one random choice, at `O(log n)` cost instead of least_conn's `O(n)` scan, and —
//! unlike least_conn — many meshd nodes picking from stale or equal counters do not all
//! herd onto the same "least loaded" backend.
//!
//! Sampling: the cumulative weights are stored as prefix sums; a uniform point in `0..W`
//! is located by binary search. The second draw excludes the first exactly (sampling
//! without replacement): a point in `0..W − w₁` is drawn and shifted past the first
//! backend's range. With all weights equal the position is drawn directly, no search.
//! Randomness comes from a per-thread wyrand generator ([`super::hash::rand_u64`]): no
//! lock, no shared cache line.
//!
//! Cost: **O(log n)** — two draws, two binary searches, two `active` loads. With one
//! eligible backend it is returned (if not skipped) without drawing.
//!
//! Skips: a skipped draw is redrawn, up to [`MAX_DRAWS`] draws in all; if two usable
//! candidates are still not found (most backends skipped), the backends are scanned once
//! from a random position for the first two usable ones — `O(n)`, only in that case.

use super::hash::{rand_below, rand_below_u64};

/// Total random draws per pick before falling back to a scan.
pub(super) const MAX_DRAWS: usize = 6;

#[derive(Debug)]
pub(super) struct P2c {
    /// `(backend index, weight > 0)`, ascending by index.
    backends: Box<[(u32, u32)]>,
    /// `ends[p]` = Σ weights of positions `0..=p`; empty when all weights are equal.
    ends: Box<[u64]>,
    total: u64,
}

impl P2c {
    /// `eligible`: `(backend index, weight > 0)`, ascending by index, non-empty.
    pub(super) fn build(eligible: &[(u32, u32)]) -> P2c {
        let first_weight = eligible.first().map_or(0, |&(_, w)| w);
        let equal = eligible.iter().all(|&(_, w)| w == first_weight);
        let mut sum = 0u64;
        let ends: Box<[u64]> = if equal {
            Box::new([])
        } else {
            eligible
                .iter()
                .map(|&(_, w)| {
                    sum += u64::from(w);
                    sum
                })
                .collect()
        };
        P2c {
            backends: eligible.into(),
            ends,
            total: sum,
        }
    }

    /// A weighted-random position.
    #[inline]
    fn draw(&self) -> usize {
        if self.ends.is_empty() {
            return rand_below(self.backends.len());
        }
        let point = rand_below_u64(self.total);
        self.ends.partition_point(|&end| end <= point)
    }

    /// A weighted-random position other than `first` (needs ≥ 2 positions).
    #[inline]
    fn draw_excluding(&self, first: usize) -> usize {
        if self.ends.is_empty() {
            let pos = rand_below(self.backends.len() - 1);
            return if pos >= first { pos + 1 } else { pos };
        }
        let first_end = self.ends[first];
        let first_weight = u64::from(self.backends[first].1);
        let mut point = rand_below_u64(self.total - first_weight);
        if point >= first_end - first_weight {
            point += first_weight;
        }
        self.ends.partition_point(|&end| end <= point)
    }

    /// The less loaded of two positions relative to weight; ties keep `a`.
    #[inline]
    fn better(&self, a: usize, b: usize, active: &impl Fn(usize) -> u64) -> usize {
        let (index_a, weight_a) = self.backends[a];
        let (index_b, weight_b) = self.backends[b];
        let load_a = active(index_a as usize);
        let load_b = active(index_b as usize);
        if u128::from(load_b) * u128::from(weight_a) < u128::from(load_a) * u128::from(weight_b) {
            b
        } else {
            a
        }
    }

    #[inline]
    pub(super) fn pick(
        &self,
        active: &impl Fn(usize) -> u64,
        skip: &impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let n = self.backends.len();
        if n == 1 {
            let index = self.backends[0].0 as usize;
            return (!skip(index)).then_some(index);
        }
        let mut first: Option<usize> = None;
        for _ in 0..MAX_DRAWS {
            let pos = match first {
                None => self.draw(),
                Some(first) => self.draw_excluding(first),
            };
            if skip(self.backends[pos].0 as usize) {
                continue;
            }
            match first {
                None => first = Some(pos),
                Some(first) => {
                    return Some(self.backends[self.better(first, pos, active)].0 as usize)
                }
            }
        }
        self.pick_by_scan(first, active, skip)
    }

    #[cold]
    fn pick_by_scan(
        &self,
        mut first: Option<usize>,
        active: &impl Fn(usize) -> u64,
        skip: &impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let n = self.backends.len();
        let start = rand_below(n);
        for k in 0..n {
            let pos = (start + k) % n;
            if Some(pos) == first || skip(self.backends[pos].0 as usize) {
                continue;
            }
            match first {
                None => first = Some(pos),
                Some(first) => {
                    return Some(self.backends[self.better(first, pos, active)].0 as usize)
                }
            }
        }
        first.map(|pos| self.backends[pos].0 as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    fn build(weights: &[u32]) -> P2c {
        let eligible: Vec<(u32, u32)> = weights
            .iter()
            .enumerate()
            .filter(|&(_, &w)| w > 0)
            .map(|(i, &w)| (i as u32, w))
            .collect();
        P2c::build(&eligible)
    }

    fn shares(p2c: &P2c, n: usize, picks: usize, skip: impl Fn(usize) -> bool) -> Vec<f64> {
        let mut counts = vec![0usize; n];
        for _ in 0..picks {
            counts[p2c.pick(&|_| 0, &skip).expect("a backend")] += 1;
        }
        counts.iter().map(|&c| c as f64 / picks as f64).collect()
    }

    #[test]
    fn weighted_shares_within_five_percent_when_idle() {
        let p2c = build(&[100, 200, 300]);
        let got = shares(&p2c, 3, 60_000, |_| false);
        for (share, expected) in got.iter().zip([1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0]) {
            assert!((share - expected).abs() <= 0.05, "{got:?}");
        }
    }

    #[test]
    fn equal_weights_are_uniform() {
        let p2c = build(&[3, 3, 3, 3]);
        for share in shares(&p2c, 4, 40_000, |_| false) {
            assert!((share - 0.25).abs() <= 0.02, "{share}");
        }
    }

    #[test]
    fn prefers_the_less_loaded_of_two() {
        let p2c = build(&[1, 1]);
        let active = [1000u64, 0];
        for _ in 0..1_000 {
            assert_eq!(p2c.pick(&|i| active[i], &|_| false), Some(1));
        }
        // Load is relative to weight: 10 active on weight 100 beats 1 active on weight 1.
        let p2c = build(&[100, 1]);
        let active = [10u64, 1];
        for _ in 0..1_000 {
            assert_eq!(p2c.pick(&|i| active[i], &|_| false), Some(0));
        }
    }

    #[test]
    fn the_most_loaded_backend_is_never_picked() {
        // Candidates are distinct, so a strictly most-loaded backend always loses.
        let p2c = build(&[1; 10]);
        for _ in 0..10_000 {
            let i = p2c
                .pick(&|i| if i == 3 { 1000 } else { 0 }, &|_| false)
                .expect("a backend");
            assert_ne!(i, 3);
        }
    }

    #[test]
    fn open_connections_balance_by_weight() {
        let p2c = build(&[100, 200, 300]);
        let active = RefCell::new([0u64; 3]);
        for _ in 0..6_000 {
            let i = p2c
                .pick(&|i| active.borrow()[i], &|_| false)
                .expect("a backend");
            active.borrow_mut()[i] += 1;
        }
        let active = active.into_inner();
        for (count, expected) in active.iter().zip([1_000u64, 2_000, 3_000]) {
            assert!(count.abs_diff(expected) <= 60, "{active:?}");
        }
    }

    #[test]
    fn single_backend() {
        let p2c = build(&[0, 7, 0]);
        assert_eq!(p2c.pick(&|_| 99, &|_| false), Some(1));
        assert_eq!(p2c.pick(&|_| 99, &|_| true), None);
    }

    #[test]
    fn weight_zero_skip_and_none() {
        let p2c = build(&[0, 1, 0, 1, 2]);
        for share in [
            shares(&p2c, 5, 2_000, |_| false)[0],
            shares(&p2c, 5, 2_000, |_| false)[2],
        ] {
            assert_eq!(share, 0.0);
        }
        let only = shares(&p2c, 5, 2_000, |i| i != 3);
        assert_eq!(only[3], 1.0);
        let two = shares(&p2c, 5, 2_000, |i| i == 4);
        assert_eq!(two[4], 0.0);
        assert_eq!(p2c.pick(&|_| 0, &|_| true), None);
    }

    #[test]
    fn skip_in_a_large_set_falls_back_to_the_scan() {
        let p2c = build(&[5; 1000]);
        for _ in 0..200 {
            assert_eq!(p2c.pick(&|_| 0, &|i| i != 777), Some(777));
            let i = p2c
                .pick(&|i| if i == 10 { 5 } else { 0 }, &|i| i != 10 && i != 20)
                .expect("a backend");
            assert_eq!(i, 20);
        }
    }

    #[test]
    fn second_draw_excludes_the_first_exactly() {
        let p2c = build(&[1, 2, 3, 4]);
        for first in 0..4 {
            let mut counts = [0u32; 4];
            for _ in 0..30_000 {
                counts[p2c.draw_excluding(first)] += 1;
            }
            assert_eq!(counts[first], 0);
            let rest: u32 = [1, 2, 3, 4]
                .iter()
                .enumerate()
                .filter(|&(p, _)| p != first)
                .map(|(_, w)| w)
                .sum();
            for (pos, &count) in counts.iter().enumerate().filter(|&(p, _)| p != first) {
                let expected = 30_000.0 * (pos + 1) as f64 / f64::from(rest);
                assert!(
                    (f64::from(count) - expected).abs() < expected * 0.1,
                    "{counts:?}"
                );
            }
        }
    }
}
