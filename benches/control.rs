//! The control plane at Swarm scale (issue #18, part 3): what one discovery update costs the
//! thread that moves bytes (`Control::apply_timed`: the update applied and the next table
//! generation planned and published, selectors built off that thread excluded), for
//! 100 / 1,000 / 5,000 discovered services of 10 tasks each, with 10 services changed
//! (one task replaced in each: a rolling update's step):
//!
//! - `whole`: the provider's list as `Update::Services` (every service reconciled);
//! - `changed`: the same list as `Update::Changed` with the 10 indices (what the Docker
//!   provider sends when the services stayed the same): its cost should not grow with the
//!   services that did not change.
//!
//! And `health_transition`: one backend's health check failing or passing, applied and
//! published, at the same sizes (finding the backend is the part that could grow).
//!
//! `cargo bench --bench control`

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use meshd::config::{BackendConfig, CheckKind, Config, ServiceConfig};
use meshd::control::status::StatusHandle;
use meshd::control::Control;
use meshd::discovery::{Provider, Update};
use meshd::proxy::conn::Shared;
use meshd::table::TableHandle;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

const TASKS: usize = 10;
const CHANGED: usize = 10;

fn control(config: &Config) -> Control {
    let (tx, rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        mode: meshd::proxy::forward::Mode::Copy,
        access_log: std::sync::atomic::AtomicBool::new(false),
        ejected: tx,
        table: TableHandle::new(),
    });
    let mut c = Control::new(
        TableHandle::new(),
        StatusHandle::default(),
        shared,
        TaskTracker::new(),
        rx,
    );
    c.start(config).expect("the bench config applies");
    c
}

/// `n` services of TASKS tasks; `round` moves one task of each of the first CHANGED
/// services to a new address (a new task).
fn services(template: &ServiceConfig, listen: &[SocketAddr], round: usize) -> Vec<ServiceConfig> {
    listen
        .iter()
        .enumerate()
        .map(|(i, addr)| {
            let mut s = template.clone();
            s.name = format!("svc-{i:05}");
            s.listen = vec![*addr];
            s.health.check = CheckKind::None;
            s.backends = (0..TASKS)
                .map(|t| {
                    let moved = i < CHANGED && t == 0;
                    let host = if moved { 100 + (round % 100) } else { t };
                    let ip = format!("10.{}.{}.{}:80", i / 250, i % 250, host);
                    BackendConfig {
                        addr: ip.parse().expect("an address"),
                        weight: 100,
                        id: Some(format!("task-{i}-{t}-{}", if moved { round } else { 0 }).into()),
                        node: None,
                        local: false,
                    }
                })
                .collect();
            s
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let config = Config::parse(std::path::Path::new("bench.toml"), "[discovery.docker]\n")
        .expect("a valid config");
    let mut group = c.benchmark_group("discovery_update");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(5));
    for n in [100usize, 1_000, 5_000] {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let _guard = rt.enter();
        // Ephemeral ports bound once: each service keeps its address across updates.
        let listen: Vec<SocketAddr> = (0..n)
            .map(|_| {
                let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
                l.local_addr().expect("its address")
            })
            .collect();
        let mut ctl = control(&config);
        let mut round = 0usize;
        rt.block_on(ctl.apply_timed(Update::Services(
            Provider::Docker,
            services(&config.defaults, &listen, round),
        )));
        for kind in ["whole", "changed"] {
            group.bench_with_input(BenchmarkId::new(kind, n), &n, |b, _| {
                b.iter_custom(|iters| {
                    let mut held = Duration::ZERO;
                    for _ in 0..iters {
                        round += 1;
                        let list = services(&config.defaults, &listen, round);
                        let update = if kind == "whole" {
                            Update::Services(Provider::Docker, list)
                        } else {
                            Update::Changed(Provider::Docker, list, (0..CHANGED).collect())
                        };
                        held += rt.block_on(ctl.apply_timed(update));
                    }
                    held
                })
            });
        }
    }
    group.finish();
}

/// A health transition (a task's check failing, then passing again) at 100 / 1,000 /
/// 5,000 services of TASKS tasks: finding the backend, recording it, publishing the
/// generation. Finding it should not grow with the other services' backends.
fn health(c: &mut Criterion) {
    let config = Config::parse(std::path::Path::new("bench.toml"), "[discovery.docker]\n")
        .expect("a valid config");
    let mut group = c.benchmark_group("health_transition");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(5));
    for n in [100usize, 1_000, 5_000] {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let _guard = rt.enter();
        let listen: Vec<SocketAddr> = (0..n)
            .map(|_| {
                let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
                l.local_addr().expect("its address")
            })
            .collect();
        let mut ctl = control(&config);
        rt.block_on(ctl.apply_timed(Update::Services(
            Provider::Docker,
            services(&config.defaults, &listen, 0),
        )));
        // The last service: a scan from the front finds it last.
        let name = format!("svc-{:05}", n - 1);
        let mut up = true;
        group.bench_with_input(BenchmarkId::new("down_up", n), &n, |b, _| {
            b.iter_custom(|iters| {
                let mut held = Duration::ZERO;
                for _ in 0..iters {
                    up = !up;
                    held += rt.block_on(ctl.health_timed(&name, TASKS - 1, up));
                }
                held
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench, health);
criterion_main!(benches);
