//! Benchmarks of the load-balancing algorithms: `Selector::pick` with 10, 1,000 and 10,000
//! backends, and `Selector::build` with 10,000 backends.
//!
//! Backends have mixed weights (100, 200, 300 in turn; `build` also runs with equal weights
//! and with 1,000 distinct weights), so round robin runs a real weighted schedule and p2c
//! and least_conn take their weighted paths. Every backend has a non-zero, varying active
//! count, so least_conn scans all of them (its worst case: it stops at the first idle
//! backend). Client addresses change on every pick, so Maglev reads scattered slots as under
//! real traffic. `pick_retry` is a first pick plus a retry that skips the first choice.
//!
//! Run: `cargo bench --bench balance -- --warm-up-time 1 --measurement-time 2`

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use meshd::balance::{Balance, Selector};

const ALGORITHMS: [(Balance, &str); 4] = [
    (Balance::RoundRobin, "round_robin"),
    (Balance::LeastConn, "least_conn"),
    (Balance::P2c, "p2c"),
    (Balance::Maglev, "maglev"),
];

fn backends(n: usize) -> Vec<(SocketAddr, u32)> {
    (0..n)
        .map(|i| {
            let ip = Ipv4Addr::from(0x0A00_0000 + i as u32);
            (SocketAddr::from((ip, 8080)), 100 * (1 + (i % 3) as u32))
        })
        .collect()
}

fn active_counts(n: usize) -> Vec<AtomicU64> {
    (0..n)
        .map(|i| AtomicU64::new(1 + (i as u64 * 7919) % 50))
        .collect()
}

fn bench_pick(c: &mut Criterion) {
    for (algo, name) in ALGORITHMS {
        let mut group = c.benchmark_group(format!("pick/{name}"));
        for n in [10usize, 1_000, 10_000] {
            let selector = Selector::build(algo, &backends(n));
            let active = active_counts(n);
            let mut client = 0u32;
            group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
                b.iter(|| {
                    client = client.wrapping_add(0x9E37_79B9);
                    selector.pick(
                        black_box(IpAddr::V4(Ipv4Addr::from(client))),
                        |i| active[i].load(Ordering::Relaxed),
                        |_| false,
                    )
                })
            });
        }
        group.finish();
    }
}

fn bench_pick_retry(c: &mut Criterion) {
    // A retry: the first choice is skipped, so each algorithm takes its skip path.
    let mut group = c.benchmark_group("pick_retry");
    let n = 1_000;
    for (algo, name) in ALGORITHMS {
        let selector = Selector::build(algo, &backends(n));
        let active = active_counts(n);
        let mut client = 0u32;
        group.bench_function(BenchmarkId::new(name, n), |b| {
            b.iter(|| {
                client = client.wrapping_add(0x9E37_79B9);
                let ip = black_box(IpAddr::V4(Ipv4Addr::from(client)));
                let load = |i: usize| active[i].load(Ordering::Relaxed);
                let first = selector.pick(ip, load, |_| false);
                selector.pick(ip, load, |i| Some(i) == first)
            })
        });
    }
    group.finish();
}

fn bench_build(c: &mut Criterion) {
    let mut group = c.benchmark_group("build");
    group.sample_size(10);
    let n = 10_000;
    let mixed = backends(n);
    let equal: Vec<(SocketAddr, u32)> = mixed.iter().map(|&(addr, _)| (addr, 100)).collect();
    // 1,000 distinct weights (every value of the config's 1..=1000): no shared classes.
    let distinct: Vec<(SocketAddr, u32)> = mixed
        .iter()
        .enumerate()
        .map(|(i, &(addr, _))| (addr, 1 + (i as u32 * 7919) % 1000))
        .collect();
    for (algo, name) in ALGORITHMS {
        group.bench_function(BenchmarkId::new(format!("{name}/mixed"), n), |b| {
            b.iter(|| Selector::build(algo, black_box(&mixed)))
        });
        group.bench_function(BenchmarkId::new(format!("{name}/equal"), n), |b| {
            b.iter(|| Selector::build(algo, black_box(&equal)))
        });
        group.bench_function(BenchmarkId::new(format!("{name}/distinct"), n), |b| {
            b.iter(|| Selector::build(algo, black_box(&distinct)))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_pick, bench_pick_retry, bench_build);
criterion_main!(benches);
