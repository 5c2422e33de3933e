//! Smooth weighted round robin, lock-free.
//!
//! # Semantics
//!
//! nginx's smooth weighted round robin (`ngx_http_upstream_get_peer`): at every step each
//! peer's `current += weight`, the peer with the largest `current` is picked (ties: lowest
//! index) and the picked peer's `current -= total`. Weights `{5, 1, 1}` give
//! `a a b a c a a`, repeating: heavy peers are interleaved, never sent bursts.
//!
//! # Lock-free realisation
//!
//! The sequence only depends on the weights, and it is periodic: after `W = Σ weight` steps
//! every `current` is back to 0. So [`RoundRobin::build`] (off the hot path) divides the
//! weights by their gcd, simulates one period and stores it as a schedule of backend
//! indices; [`RoundRobin::pick`] is `schedule[counter.fetch_add(1, Relaxed) % len]` — one
//! atomic add, a division-free remainder and one load, **O(1)**, whatever the number of
//! backends. All-equal weights
//! need no schedule: the eligible backends in index order *are* the sequence.
//!
//! # Bounds on the schedule
//!
//! Simulating nginx costs `O(W·n)` and the schedule holds `W` entries (`u32`). Both are
//! bounded, so a rebuild stays fast whatever the weights (≤ ~50 ms on the worst inputs):
//!
//! * **Memory**: if the gcd-reduced `W` exceeds [`MAX_SCHEDULE`] (2^20 entries, 4 MiB), the
//!   weights are scaled down proportionally to sum to about 2^20 (each kept ≥ 1, so no
//!   eligible backend disappears). The relative error on a backend's share is below
//!   `1/scaled_weight`, e.g. < 0.1% for a backend scaled to ≥ 1000 slots. With the
//!   product's weights (0..=1000) this needs over ~1,000 backends with unequal weights.
//! * **Work**: if `W·n` exceeds [`MAX_WORK`] (2^24 simulated steps, ~15 ms), the exact nginx
//!   simulation is replaced by an earliest-deadline-first schedule with deadlines
//!   `(k + ½) / weight` for a backend's `k`-th slot (the Sainte-Laguë / Webster sequence),
//!   built by bucket sort in `O(W + n)`. It has the same period and the same per-backend
//!   counts (exactly `weight` slots per period) and is similarly smooth — each backend's
//!   slots are evenly spaced over the period — but orders them differently from nginx
//!   (`{5, 1, 1}` gives `a a a b c a a`). Small services (e.g. 10 backends with weights up
//!   to 1000) always get the exact nginx sequence.
//!
//! # Skips
//!
//! When the scheduled backend must be skipped (already tried for this connection, or
//! ejected), the schedule is walked forward to the next non-skipped entry, so a retry still
//! follows the weighted order. The walk is bounded by [`walk_limit`] entries (the whole
//! schedule when it is short); if that is exhausted — a heavily weighted backend is skipped
//! and its slots cluster — every eligible backend is scanned once in index order. Worst case
//! `O(n)`, only when most backends are skipped.

use super::{walk_limit, FastMod, PaddedCounter};

/// Maximum entries of a precomputed schedule (before the `+ n` slack of keeping every
/// eligible weight ≥ 1 when scaling).
pub(super) const MAX_SCHEDULE: u64 = 1 << 20;
/// Maximum simulated `(step, backend)` pairs for the exact nginx schedule.
pub(super) const MAX_WORK: u64 = 1 << 24;

/// How the schedule was built (observable for tests and diagnostics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ScheduleKind {
    /// All weights equal: the eligible backends in index order.
    Equal,
    /// Exact nginx smooth weighted round robin.
    Nginx,
    /// Earliest-deadline-first (Sainte-Laguë) schedule, used when simulating nginx is too
    /// costly.
    Edf,
}

#[derive(Debug)]
pub(super) struct RoundRobin {
    /// Eligible backend indices, ascending.
    eligible: Box<[u32]>,
    /// One period of the pick sequence; `None` when it is `eligible` itself.
    schedule: Option<Box<[u32]>>,
    kind: ScheduleKind,
    /// Whether the weights had to be scaled down to bound the schedule.
    scaled: bool,
    /// `mod slots().len()`.
    modulo: FastMod,
    counter: PaddedCounter,
}

impl RoundRobin {
    /// `eligible`: `(backend index, weight > 0)`, ascending by index, non-empty.
    pub(super) fn build(eligible: &[(u32, u32)]) -> RoundRobin {
        let indices: Box<[u32]> = eligible.iter().map(|&(i, _)| i).collect();
        let first_weight = eligible.first().map_or(0, |&(_, w)| w);
        if eligible.iter().all(|&(_, w)| w == first_weight) {
            return RoundRobin {
                // n ≤ u32::MAX (`Selector::build`).
                modulo: FastMod::new(indices.len() as u32),
                eligible: indices,
                schedule: None,
                kind: ScheduleKind::Equal,
                scaled: false,
                counter: PaddedCounter::default(),
            };
        }

        let mut weights: Vec<u64> = eligible.iter().map(|&(_, w)| u64::from(w)).collect();
        reduce_by_gcd(&mut weights);
        let mut total: u64 = weights.iter().sum();
        let scaled = total > MAX_SCHEDULE;
        if scaled {
            for w in &mut weights {
                // ≤ MAX_SCHEDULE · u32::MAX: no overflow in u128, result ≤ MAX_SCHEDULE.
                *w =
                    ((u128::from(*w) * u128::from(MAX_SCHEDULE) / u128::from(total)) as u64).max(1);
            }
            reduce_by_gcd(&mut weights);
            total = weights.iter().sum();
        }

        let n = weights.len() as u64;
        let (kind, positions) = if total.saturating_mul(n) <= MAX_WORK {
            (ScheduleKind::Nginx, nginx_schedule(&weights, total))
        } else {
            (ScheduleKind::Edf, edf_schedule(&weights, total))
        };
        let schedule: Box<[u32]> = positions.into_iter().map(|p| indices[p as usize]).collect();
        RoundRobin {
            // ≤ MAX_SCHEDULE + n entries. Should that ever exceed u32::MAX, positions stay
            // in bounds (below u32::MAX), the tail is just never scheduled first.
            modulo: FastMod::new(u32::try_from(schedule.len()).unwrap_or(u32::MAX)),
            eligible: indices,
            schedule: Some(schedule),
            kind,
            scaled,
            counter: PaddedCounter::default(),
        }
    }

    #[inline]
    fn slots(&self) -> &[u32] {
        self.schedule.as_deref().unwrap_or(&self.eligible)
    }

    #[inline]
    pub(super) fn pick(&self, skip: &impl Fn(usize) -> bool) -> Option<usize> {
        let slots = self.slots();
        let start = self.modulo.rem(self.counter.next());
        let backend = slots[start] as usize;
        if !skip(backend) {
            return Some(backend);
        }
        self.pick_after_skip(slots, start, skip)
    }

    #[cold]
    fn pick_after_skip(
        &self,
        slots: &[u32],
        start: usize,
        skip: &impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let len = slots.len();
        let walk = len.min(walk_limit(self.eligible.len()));
        let mut pos = start;
        for _ in 1..walk {
            pos += 1;
            if pos == len {
                pos = 0;
            }
            let backend = slots[pos] as usize;
            if !skip(backend) {
                return Some(backend);
            }
        }
        if walk == len {
            // The whole schedule was seen, and it contains every eligible backend.
            return None;
        }
        let n = self.eligible.len();
        let first = start % n;
        (0..n)
            .map(|k| self.eligible[(first + k) % n] as usize)
            .find(|&backend| !skip(backend))
    }

    pub(super) fn kind(&self) -> ScheduleKind {
        self.kind
    }

    /// Whether the weights were scaled down to bound the schedule (shares are then
    /// approximate, see the module docs).
    pub(super) fn scaled(&self) -> bool {
        self.scaled
    }

    pub(super) fn schedule_len(&self) -> usize {
        self.slots().len()
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

fn reduce_by_gcd(weights: &mut [u64]) {
    let g = weights.iter().fold(0, |g, &w| gcd(g, w));
    if g > 1 {
        for w in weights {
            *w /= g;
        }
    }
}

/// One period of nginx's smooth weighted round robin, as positions into `weights`.
/// `O(total · n)`; the caller bounds it by [`MAX_WORK`].
fn nginx_schedule(weights: &[u64], total: u64) -> Vec<u32> {
    // |current| ≤ total, far inside i64.
    let weights: Vec<i64> = weights.iter().map(|&w| w as i64).collect();
    let total_i = total as i64;
    let mut current = vec![0i64; weights.len()];
    let mut schedule = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        let mut best_current = i64::MIN;
        for (pos, (cur, &w)) in current.iter_mut().zip(&weights).enumerate() {
            *cur += w;
            // Strictly greater: ties go to the lowest index, as in nginx.
            if *cur > best_current {
                best = pos;
                best_current = *cur;
            }
        }
        current[best] -= total_i;
        schedule.push(best as u32);
    }
    schedule
}

/// One period of the earliest-deadline-first (Sainte-Laguë) schedule, as positions into
/// `weights`: slot `k` of position `p` is due at `(2k + 1) / (2·weights[p])`, slots are
/// served earliest first, ties by lower position. Exactly `weights[p]` entries for each `p`
/// (its deadlines below 1), evenly spread.
///
/// `O(total + n)` by bucket sort: all deadlines lie in `[0, 1)`, so slot `(p, k)` goes to
/// bucket `⌊deadline · total⌋` (computed incrementally, without division), and each bucket
/// — one entry on average, one per backend of a weight class at exact ties — is sorted
/// exactly by deadline.
fn edf_schedule(weights: &[u64], total: u64) -> Vec<u32> {
    let buckets = total as usize;
    // starts[b] = first entry of bucket b, after the prefix sum below.
    let mut starts = vec![0u32; buckets + 1];
    let for_each_slot = |visit: &mut dyn FnMut(usize, u32, u32)| {
        for (pos, &weight) in weights.iter().enumerate() {
            // bucket(k) = ⌊(2k + 1)·total / (2·weight)⌋, advanced by 2·total / (2·weight)
            // per slot as quotient + remainder.
            let denominator = 2 * weight;
            let step_quotient = (2 * total) / denominator;
            let step_remainder = (2 * total) % denominator;
            let mut bucket = total / denominator;
            let mut remainder = total % denominator;
            // k < weight ≤ total ≤ MAX_SCHEDULE + n: fits in u32.
            for k in 0..weight as u32 {
                visit(bucket as usize, pos as u32, k);
                bucket += step_quotient;
                remainder += step_remainder;
                if remainder >= denominator {
                    remainder -= denominator;
                    bucket += 1;
                }
            }
        }
    };
    for_each_slot(&mut |bucket, _, _| starts[bucket + 1] += 1);
    for b in 0..buckets {
        starts[b + 1] += starts[b];
    }
    // (position, k) of every slot, grouped by bucket.
    let mut entries = vec![(0u32, 0u32); buckets];
    let mut fill = starts.clone();
    for_each_slot(&mut |bucket, pos, k| {
        entries[fill[bucket] as usize] = (pos, k);
        fill[bucket] += 1;
    });
    for b in 0..buckets {
        let bucket = &mut entries[starts[b] as usize..starts[b + 1] as usize];
        if bucket.len() > 1 {
            bucket.sort_unstable_by(|&(pa, ka), &(pb, kb)| {
                // (2ka + 1) / wa  vs  (2kb + 1) / wb, then position.
                let a = u128::from(2 * u64::from(ka) + 1) * u128::from(weights[pb as usize]);
                let b = u128::from(2 * u64::from(kb) + 1) * u128::from(weights[pa as usize]);
                a.cmp(&b).then(pa.cmp(&pb))
            });
        }
    }
    entries.into_iter().map(|(pos, _)| pos).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BinaryHeap;

    /// Deadline of a backend's next slot in the EDF schedule: `(2·k + 1) / (2·weight)` for its
    /// `k`-th slot, stored as the numerator `2k + 1` and the weight.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    struct Deadline {
        numerator: u64,
        weight: u64,
        pos: u32,
    }

    impl Ord for Deadline {
        /// "Greater" = due earlier (`BinaryHeap` is a max-heap); ties: lower position first.
        fn cmp(&self, other: &Self) -> std::cmp::Ordering {
            let mine = u128::from(self.numerator) * u128::from(other.weight);
            let theirs = u128::from(other.numerator) * u128::from(self.weight);
            theirs.cmp(&mine).then(other.pos.cmp(&self.pos))
        }
    }

    impl PartialOrd for Deadline {
        fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
            Some(self.cmp(other))
        }
    }

    /// One period of the earliest-deadline-first (Sainte-Laguë) schedule, as positions into
    /// `weights`: exactly `weights[p]` entries for each `p`, evenly spread. `O(total · log n)`.
    fn edf_reference(weights: &[u64], total: u64) -> Vec<u32> {
        let mut heap: BinaryHeap<Deadline> = weights
            .iter()
            .enumerate()
            .map(|(pos, &weight)| Deadline {
                numerator: 1,
                weight,
                pos: pos as u32,
            })
            .collect();
        let mut schedule = Vec::with_capacity(total as usize);
        for _ in 0..total {
            let Some(mut next) = heap.peek_mut() else {
                break;
            };
            schedule.push(next.pos);
            next.numerator += 2;
        }
        schedule
    }

    #[test]
    fn edf_schedule_matches_the_heap_definition() {
        let cases: Vec<Vec<u64>> = vec![
            vec![5, 1, 1],
            vec![3, 1, 1, 1],
            vec![1, 2, 3],
            (0..300).map(|i| 1 + (i * 37) % 50).collect(),
            (0..50).map(|i| 1 + (i * 7919) % 1000).collect(),
            vec![1, 1_000_000, 3, 999_999],
        ];
        for weights in cases {
            let total = weights.iter().sum();
            assert_eq!(
                edf_schedule(&weights, total),
                edf_reference(&weights, total),
                "{weights:?}"
            );
        }
    }

    fn build(weights: &[u32]) -> RoundRobin {
        let eligible: Vec<(u32, u32)> = weights
            .iter()
            .enumerate()
            .filter(|&(_, &w)| w > 0)
            .map(|(i, &w)| (i as u32, w))
            .collect();
        RoundRobin::build(&eligible)
    }

    fn picks(rr: &RoundRobin, count: usize) -> Vec<usize> {
        (0..count)
            .map(|_| rr.pick(&|_| false).expect("a backend"))
            .collect()
    }

    /// nginx's algorithm verbatim, with no gcd reduction and no precomputation.
    fn nginx_reference(weights: &[u32], count: usize) -> Vec<usize> {
        let mut current = vec![0i64; weights.len()];
        let mut out = Vec::with_capacity(count);
        for _ in 0..count {
            let mut best: Option<usize> = None;
            let mut total = 0i64;
            for (i, &w) in weights.iter().enumerate() {
                if w == 0 {
                    continue;
                }
                current[i] += i64::from(w);
                total += i64::from(w);
                if best.is_none_or(|b| current[i] > current[b]) {
                    best = Some(i);
                }
            }
            let best = best.expect("a weighted peer");
            current[best] -= total;
            out.push(best);
        }
        out
    }

    #[test]
    fn nginx_sequence_5_1_1() {
        let rr = build(&[5, 1, 1]);
        assert_eq!(rr.kind(), ScheduleKind::Nginx);
        let names: String = picks(&rr, 21)
            .into_iter()
            .map(|i| (b'a' + i as u8) as char)
            .collect();
        assert_eq!(names, "aabacaa".repeat(3));
    }

    #[test]
    fn matches_nginx_reference_for_assorted_weights() {
        let cases: &[&[u32]] = &[
            &[5, 1, 1],
            &[100, 200, 300],
            &[3, 0, 7, 7, 2],
            &[1000, 1, 999, 2],
            &[4, 6],
            &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
            &[250, 750, 0, 500],
        ];
        for weights in cases {
            let rr = build(weights);
            let total: u32 = weights.iter().sum();
            let count = 2 * total as usize + 5;
            assert_eq!(
                picks(&rr, count),
                nginx_reference(weights, count),
                "{weights:?}"
            );
        }
    }

    #[test]
    fn gcd_reduction_shortens_the_period() {
        let rr = build(&[100, 200, 300]);
        assert_eq!(rr.schedule_len(), 6);
        assert_eq!(picks(&rr, 12), nginx_reference(&[1, 2, 3], 12));
    }

    #[test]
    fn equal_weights_are_plain_index_order() {
        let rr = build(&[7, 0, 7, 7]);
        assert_eq!(rr.kind(), ScheduleKind::Equal);
        assert_eq!(picks(&rr, 7), vec![0, 2, 3, 0, 2, 3, 0]);
    }

    #[test]
    fn weighted_shares_within_two_percent() {
        let rr = build(&[100, 200, 300]);
        let mut counts = [0usize; 3];
        for i in picks(&rr, 60_000) {
            counts[i] += 1;
        }
        for (count, expected) in counts.iter().zip([1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0]) {
            let share = *count as f64 / 60_000.0;
            assert!((share - expected).abs() <= 0.02, "{counts:?}");
        }
    }

    #[test]
    fn weight_zero_is_never_picked() {
        let rr = build(&[0, 3, 0, 1, 0]);
        assert!(picks(&rr, 1000).iter().all(|&i| i == 1 || i == 3));
    }

    #[test]
    fn skip_walks_forward_in_the_schedule() {
        // Schedule a a b a c a a: skipping a from the first slot walks to b, then c.
        let rr = build(&[5, 1, 1]);
        assert_eq!(rr.pick(&|i| i == 0), Some(1)); // slot 0 (a) -> slot 2 (b)
        assert_eq!(rr.pick(&|i| i == 0), Some(1)); // slot 1 (a) -> slot 2 (b)
        assert_eq!(rr.pick(&|i| i == 1), Some(0)); // slot 2 (b) -> slot 3 (a)
        assert_eq!(rr.pick(&|i| i != 2), Some(2)); // slot 3 (a) -> slot 4 (c)
        assert_eq!(rr.pick(&|_| true), None);
        let equal = build(&[1, 1, 1]);
        assert_eq!(equal.pick(&|i| i == 0), Some(1));
        assert_eq!(equal.pick(&|i| i < 2), Some(2));
        assert_eq!(equal.pick(&|_| true), None);
    }

    #[test]
    fn skip_falls_back_to_a_scan_past_the_walk_limit() {
        // b has 1 slot in 1001: skipping a needs the fallback when the walk is too short.
        let rr = build(&[1000, 1]);
        for _ in 0..2_000 {
            assert_eq!(rr.pick(&|i| i == 0), Some(1));
        }
        for _ in 0..10 {
            assert_eq!(rr.pick(&|_| true), None);
        }
    }

    #[test]
    fn large_weight_sums_are_scaled_and_bounded() {
        // 3000 backends, pairwise coprime-ish weights: W ≈ 1.5e6 > 2^20 before scaling.
        let weights: Vec<u32> = (0..3000).map(|i| 1 + (i * 7919) % 1000).collect();
        let rr = build(&weights);
        assert!(rr.scaled());
        assert_eq!(rr.kind(), ScheduleKind::Edf);
        let len = rr.schedule_len();
        assert!(len as u64 <= MAX_SCHEDULE + 3000, "{len}");
        let mut counts = vec![0u64; weights.len()];
        for i in picks(&rr, len) {
            counts[i] += 1;
        }
        let total_w: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        for (i, (&count, &w)) in counts.iter().zip(&weights).enumerate() {
            assert!(count >= 1, "backend {i} lost its slots");
            let expected = len as f64 * f64::from(w) / total_w as f64;
            assert!(
                (count as f64 - expected).abs() <= 1.0 + expected * 0.01,
                "{i}"
            );
        }
    }

    #[test]
    fn many_backends_use_edf_with_exact_counts() {
        // W = 19,999 and n = 10,000: W·n > MAX_WORK, so no nginx simulation.
        let weights: Vec<u32> = (0..10_000).map(|i| 1 + i % 3).collect();
        let rr = build(&weights);
        assert_eq!(rr.kind(), ScheduleKind::Edf);
        assert!(!rr.scaled());
        assert_eq!(rr.schedule_len(), 19_999);
        let mut counts = vec![0u32; weights.len()];
        for i in picks(&rr, 19_999 * 2) {
            counts[i] += 1;
        }
        for (count, w) in counts.iter().zip(&weights) {
            assert_eq!(*count, 2 * w);
        }
    }

    #[test]
    fn edf_schedule_is_smooth() {
        assert_eq!(edf_schedule(&[5, 1, 1], 7), vec![0, 0, 0, 1, 2, 0, 0]);
        assert_eq!(edf_schedule(&[3, 1, 1, 1], 6), vec![0, 0, 1, 2, 3, 0]);
        // Every prefix of the schedule stays close to the ideal weighted share.
        let weights: Vec<u64> = (0..200).map(|i| 1 + (i * 37) % 50).collect();
        let total: u64 = weights.iter().sum();
        let schedule = edf_schedule(&weights, total);
        let mut counts = vec![0u64; weights.len()];
        for (t, &pos) in schedule.iter().enumerate() {
            counts[pos as usize] += 1;
            let ideal = (t + 1) as f64 * weights[pos as usize] as f64 / total as f64;
            assert!(
                (counts[pos as usize] as f64 - ideal).abs() < 2.0,
                "slot {t}"
            );
        }
        assert_eq!(counts, weights);
    }

    #[test]
    fn concurrent_picks_use_every_slot_exactly_once() {
        let rr = std::sync::Arc::new(build(&[1, 2, 3]));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let rr = rr.clone();
                std::thread::spawn(move || {
                    let mut counts = [0u32; 3];
                    for _ in 0..6_000 {
                        counts[rr.pick(&|_| false).expect("a backend")] += 1;
                    }
                    counts
                })
            })
            .collect();
        let mut counts = [0u32; 3];
        for thread in threads {
            for (total, c) in counts.iter_mut().zip(thread.join().expect("thread")) {
                *total += c;
            }
        }
        assert_eq!(counts, [4_000, 8_000, 12_000]);
    }
}
