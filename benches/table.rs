//! The routing table on the accept path: `load()` + service lookup + pick, alone and while
//! another thread publishes a new table generation in a loop; and the cost of building a
//! table (selector included) for 10 to 10,000 backends, and of reusing it when nothing
//! changed.
//!
//! `cargo bench --bench table`

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use meshd::config::{Balance, Config};
use meshd::table::{
    Backend, Candidate, Health, RoutingTable, ServiceState, ServiceTable, TableHandle,
};

fn service_config(balance: Balance) -> meshd::config::ServiceConfig {
    let text = "[[service]]\nname = \"web\"\nlisten = [\"127.0.0.1:8080\"]\nbackends = [{ addr = \"127.0.0.1:9001\" }]\n";
    let mut cfg = Config::parse(std::path::Path::new("bench.toml"), text)
        .expect("valid bench config")
        .services
        .remove(0);
    cfg.balance = balance;
    cfg
}

fn candidates(n: usize) -> Vec<Candidate> {
    (0..n)
        .map(|i| {
            let addr = SocketAddr::new(
                IpAddr::V4(Ipv4Addr::new(10, (i >> 16) as u8, (i >> 8) as u8, i as u8)),
                8080,
            );
            Candidate {
                backend: Arc::new(Backend::new("web".into(), addr, Health::Up)),
                weight: 100,
                local: false,
            }
        })
        .collect()
}

fn table(state: &Arc<ServiceState>, balance: Balance, n: usize, generation: u64) -> RoutingTable {
    let svc = ServiceTable::build(
        state.clone(),
        Arc::new(service_config(balance)),
        &candidates(n),
    );
    let mut table = RoutingTable {
        generation,
        ..RoutingTable::default()
    };
    table.services.set(state.slot, Some(Arc::new(svc)));
    table
}

/// What the accept path does per connection with the table.
#[inline]
fn accept_path(h: &TableHandle, state: &Arc<ServiceState>, client: IpAddr) -> Option<usize> {
    let t = h.load();
    let svc = t.service(state)?;
    svc.selector.pick(
        client,
        |i| svc.backends[i].active(),
        |i| !svc.backends[i].is_usable(),
    )
}

fn bench_load(c: &mut Criterion) {
    let state = Arc::new(ServiceState::new("web".into(), 0));
    let mut g = c.benchmark_group("accept_path");
    g.measurement_time(Duration::from_secs(3));
    for balance in [Balance::RoundRobin, Balance::P2c, Balance::Maglev] {
        let h = TableHandle::new();
        h.store(table(&state, balance, 10, 1));
        let client = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));
        g.bench_function(BenchmarkId::new("quiet", format!("{balance:?}")), |b| {
            b.iter(|| black_box(accept_path(&h, &state, black_box(client))))
        });
        // Another thread swaps in a new generation as fast as it can build one.
        let stop = Arc::new(AtomicBool::new(false));
        let swapper = {
            let (h, state, stop) = (h.clone(), state.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut gen = 2;
                while !stop.load(Ordering::Relaxed) {
                    h.store(table(&state, balance, 10, gen));
                    gen += 1;
                }
                gen
            })
        };
        g.bench_function(
            BenchmarkId::new("concurrent_swaps", format!("{balance:?}")),
            |b| b.iter(|| black_box(accept_path(&h, &state, black_box(client)))),
        );
        stop.store(true, Ordering::Relaxed);
        let swaps = swapper.join().unwrap_or(0);
        eprintln!("{balance:?}: {swaps} tables published during the concurrent run");
    }
    g.finish();
}

fn bench_build(c: &mut Criterion) {
    let state = Arc::new(ServiceState::new("web".into(), 0));
    let mut g = c.benchmark_group("table_build");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(3));
    for n in [10usize, 1_000, 10_000] {
        let cands = candidates(n);
        for balance in [
            Balance::RoundRobin,
            Balance::LeastConn,
            Balance::P2c,
            Balance::Maglev,
        ] {
            let cfg = Arc::new(service_config(balance));
            g.bench_function(BenchmarkId::new(format!("{balance:?}"), n), |b| {
                b.iter(|| black_box(ServiceTable::build(state.clone(), cfg.clone(), &cands)))
            });
        }
    }
    g.finish();
}

/// What an unchanged service costs a publish since selectors are reused: `prepare` against
/// the previous table (eligibility filter + comparison), Maglev, same inputs.
fn bench_reuse(c: &mut Criterion) {
    let state = Arc::new(ServiceState::new("web".into(), 0));
    let mut g = c.benchmark_group("table_reuse");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(3));
    for n in [10usize, 1_000, 10_000] {
        let cands = candidates(n);
        let cfg = Arc::new(service_config(Balance::Maglev));
        let previous = ServiceTable::prepare(state.clone(), cfg.clone(), &cands, None).finish();
        g.bench_function(BenchmarkId::new("Maglev", n), |b| {
            b.iter(|| {
                let p = ServiceTable::prepare(state.clone(), cfg.clone(), &cands, Some(&previous));
                assert!(!p.needs_build());
                black_box(p.finish())
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_load, bench_build, bench_reuse);
criterion_main!(benches);
