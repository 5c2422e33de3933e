//! Staying up when backends misbehave, against the real binary: a backend that drops SYNs
//! (a full listen queue) costs a client a hedge delay, not a failure or a 1 s retransmit,
//! and is never ejected for it; ejection keeps capacity (`max_ejection_percent`); with no
//! eligible backend left, panic routing tries unhealthy and draining backends before it
//! refuses; a backend that closes before answering is replayed elsewhere when the service
//! opts in (`retry_on_early_close`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// A listener whose accept queue is full and never drained: the kernel drops every new
/// SYN to it, as a busy task's full backlog does. Holds the sockets that fill the queue.
struct Blackhole {
    addr: SocketAddr,
    _listener: socket2::Socket,
    _fill: Vec<TcpStream>,
}

impl Blackhole {
    fn new() -> Blackhole {
        use socket2::{Domain, Socket, Type};
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        s.set_reuse_address(true).unwrap();
        s.bind(&addr(0).into()).unwrap();
        // Backlog 0: the accept queue holds one connection.
        s.listen(0).unwrap();
        let a = s.local_addr().unwrap().as_socket().unwrap();
        let mut fill = Vec::new();
        for _ in 0..4 {
            if let Ok(c) = TcpStream::connect_timeout(&a, Duration::from_millis(200)) {
                fill.push(c);
            }
        }
        // The queue is full once a connect no longer completes.
        assert!(
            TcpStream::connect_timeout(&a, Duration::from_millis(300)).is_err(),
            "the blackhole still accepts connections"
        );
        Blackhole {
            addr: a,
            _listener: s,
            _fill: fill,
        }
    }
}

/// A backend that accepts every connection and closes it at once, unread (an exiting task
/// flushing its queue); counts what it accepted.
struct Slammer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accepted: Arc<std::sync::atomic::AtomicU64>,
}

impl Slammer {
    fn new() -> Slammer {
        let l = TcpListener::bind(addr(0)).unwrap();
        l.set_nonblocking(true).unwrap();
        let a = l.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (st, n) = (stop.clone(), accepted.clone());
        thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((c, _)) => {
                        n.fetch_add(1, Ordering::Relaxed);
                        // Linger 0: an RST, like a process that exits with a full queue.
                        let _ = socket2::SockRef::from(&c).set_linger(Some(Duration::ZERO));
                        drop(c);
                    }
                    Err(_) => thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Slammer {
            addr: a,
            stop,
            accepted,
        }
    }
}

impl Drop for Slammer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One request through `listen`: the answering backend's name, and how long it took.
fn timed_who(listen: SocketAddr) -> (Option<String>, Duration) {
    let t = Instant::now();
    let w = who(listen);
    (w, t.elapsed())
}

#[test]
fn a_backend_dropping_syns_costs_a_hedge_delay_not_a_failure() {
    let hole = Blackhole::new();
    let good = Backend::http("good");
    let listen = addr(free_port());
    // round_robin alternates: every other connection picks the blackhole first.
    let m = Meshd::start(&service_toml(
        "svc",
        listen,
        &[hole.addr, good.addr],
        "balance = \"round_robin\"\nhedge_delay = \"100ms\"\nconnect_timeout = \"5s\"",
        "check = \"none\"",
    ));
    let mut slowest = Duration::ZERO;
    for i in 0..20 {
        let (w, took) = timed_who(listen);
        assert_eq!(w.as_deref(), Some("good"), "request {i}");
        slowest = slowest.max(took);
    }
    println!("slowest of 20: {slowest:?}");
    // A dropped SYN is resent by the kernel after 1 s; the hedge answered long before.
    assert!(
        slowest < Duration::from_millis(900),
        "a request waited {slowest:?}: the hedge did not race the dropped SYN"
    );
    let hedges = m.metric("meshd_hedged_connects_total", &[("service", "svc")]);
    assert!(hedges >= 5.0, "hedged connects: {hedges}");
    // Busy is not dead: the blackhole is never ejected for its timeouts (round robin
    // keeps picking it first, and hedging keeps answering).
    assert_eq!(
        m.metric("meshd_ejections_total", &[("service", "svc")]),
        0.0,
        "log:\n{}",
        m.log_text()
    );
    assert_eq!(
        m.metric(
            "meshd_rejected_connections_total",
            &[("service", "svc"), ("reason", "no_backend")]
        ),
        0.0
    );
}

#[test]
fn hedging_off_waits_for_the_kernel_to_resend_the_syn() {
    // The negative control of the test above: with hedge_delay = "0s" a connection that
    // picks the blackhole first waits for its connect_timeout, then is retried elsewhere.
    let hole = Blackhole::new();
    let good = Backend::http("good");
    let listen = addr(free_port());
    let m = Meshd::start(&service_toml(
        "svc",
        listen,
        &[hole.addr, good.addr],
        "balance = \"round_robin\"\nhedge_delay = \"0s\"\nconnect_timeout = \"300ms\"",
        "check = \"none\"",
    ));
    let mut slowest = Duration::ZERO;
    for _ in 0..4 {
        let (w, took) = timed_who(listen);
        assert_eq!(w.as_deref(), Some("good"));
        slowest = slowest.max(took);
    }
    assert!(slowest >= Duration::from_millis(300), "slowest {slowest:?}");
    assert_eq!(m.metric("meshd_hedged_connects_total", &[]), 0.0);
    let timeouts = m.metric("meshd_connect_errors_total", &[("reason", "timeout")]);
    assert!(timeouts >= 1.0, "timeouts: {timeouts}");
    // Timeouts alone never eject.
    assert_eq!(m.metric("meshd_ejections_total", &[]), 0.0);
}

#[test]
fn ejection_never_takes_more_than_max_ejection_percent() {
    // Four backends, three of them refusing: with max_ejection_percent = 50 at most two
    // are ejected at once; the other refusing one is still retried around.
    let good = Backend::http("good");
    let dead: Vec<SocketAddr> = (0..3).map(|_| addr(free_port())).collect();
    let mut all = dead.clone();
    all.push(good.addr);
    let listen = addr(free_port());
    let m = Meshd::start(&service_toml(
        "svc",
        listen,
        &all,
        "balance = \"round_robin\"\nconnect_retries = 3\nmax_ejection_percent = 50",
        "check = \"none\"",
    ));
    for i in 0..60 {
        assert_eq!(who(listen).as_deref(), Some("good"), "request {i}");
    }
    let s = m.services();
    let ejected = s["services"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["ejected"].as_bool() == Some(true))
        .count();
    assert_eq!(ejected, 2, "ejected now: {s}");
    assert!(m.metric("meshd_ejections_total", &[("service", "svc")]) >= 2.0);
}

#[test]
fn panic_routing_serves_from_unhealthy_backends_rather_than_refusing() {
    // Both backends answer requests but fail their HTTP health check (503 on /healthz): none
    // is eligible, yet they could answer. Without panic routing every connection would be
    // refused for no_backend.
    let a = Backend::start("a", "http", &["--unhealthy"]);
    let b = Backend::start("b", "http", &["--unhealthy"]);
    let listen = addr(free_port());
    let m = Meshd::start(&service_toml(
        "svc",
        listen,
        &[a.addr, b.addr],
        "",
        "check = \"http\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\nrise = 1\nfall = 1",
    ));
    assert!(wait_until(Duration::from_secs(5), || {
        m.backend("svc", &a.addr.to_string())["health"] == "down"
            && m.backend("svc", &b.addr.to_string())["health"] == "down"
    }));
    for i in 0..10 {
        let w = who(listen);
        assert!(
            matches!(w.as_deref(), Some("a" | "b")),
            "request {i}: {w:?}"
        );
    }
    assert_eq!(
        m.metric("meshd_panic_connections_total", &[("service", "svc")]),
        10.0
    );
    assert_eq!(
        m.metric(
            "meshd_rejected_connections_total",
            &[("reason", "no_backend")]
        ),
        0.0
    );
}

#[test]
fn a_draining_backend_answers_while_its_replacement_is_not_ready() {
    // A stop-first update: the old task leaves the config (drains) before the new one
    // passes its checks. The old one still answers, so nobody is refused meanwhile.
    let old = Backend::http("old");
    let listen = addr(free_port());
    let health = "check = \"tcp\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\nrise = 1";
    let m = Meshd::start(&service_toml("svc", listen, &[old.addr], "", health));
    assert!(wait_until(Duration::from_secs(5), || m.healthy("svc") == 1));
    assert_eq!(who(listen).as_deref(), Some("old"));
    // The new task's address does not listen yet.
    let new_addr = addr(free_port());
    std::fs::write(
        &m.config,
        format!(
            "[admin]\nlisten = \"{}\"\n\n{}",
            m.admin,
            service_toml("svc", listen, &[new_addr], "", health)
        ),
    )
    .unwrap();
    m.signal(libc::SIGHUP);
    assert!(wait_until(Duration::from_secs(5), || {
        m.backend("svc", &old.addr.to_string())["state"] == "draining"
    }));
    for i in 0..10 {
        assert_eq!(who(listen).as_deref(), Some("old"), "request {i}");
    }
    assert!(m.metric("meshd_panic_connections_total", &[("service", "svc")]) >= 10.0);
    // The new task starts listening: it takes over once healthy.
    let _new = Backend::spawn_on_addr(new_addr, "new", "http", &[]);
    assert!(wait_until(Duration::from_secs(10), || who(listen)
        .as_deref()
        == Some("new")));
}

/// Sends one HTTP request through `listen`; the status, or None for a failure.
fn status(listen: SocketAddr) -> Option<u16> {
    let mut s = TcpStream::connect(listen).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    String::from_utf8_lossy(&out)
        .split(' ')
        .nth(1)?
        .parse()
        .ok()
}

#[test]
fn an_early_close_is_replayed_on_another_backend_when_the_service_opts_in() {
    let slam = Slammer::new();
    let good = Backend::http("good");
    let listen_on = addr(free_port());
    let listen_off = addr(free_port());
    let backends = [slam.addr, good.addr];
    // Ejection off, so the slammer keeps being picked first by round robin.
    let extra = "balance = \"round_robin\"\nmax_ejection_percent = 0";
    let m = Meshd::start(&format!(
        "{}{}",
        service_toml(
            "on",
            listen_on,
            &backends,
            &format!("{extra}\nretry_on_early_close = true"),
            "check = \"none\""
        ),
        service_toml("off", listen_off, &backends, extra, "check = \"none\"")
    ));
    let ok_on = (0..20).filter(|_| status(listen_on) == Some(200)).count();
    let ok_off = (0..20).filter(|_| status(listen_off) == Some(200)).count();
    println!(
        "with replay: {ok_on}/20, without: {ok_off}/20; the slammer accepted {}",
        slam.accepted.load(Ordering::Relaxed)
    );
    assert_eq!(ok_on, 20, "log:\n{}", m.log_text());
    assert!(
        m.metric("meshd_replayed_connections_total", &[("service", "on")]) >= 10.0,
        "replays counted"
    );
    // Without the opt-in, the client sees the early close: the test can fail.
    assert!(ok_off <= 12, "without replay {ok_off}/20 succeeded");
    assert_eq!(
        m.metric("meshd_replayed_connections_total", &[("service", "off")]),
        0.0
    );
}

#[test]
fn a_connection_waits_in_the_queue_while_no_task_accepts() {
    // A crashing release: the service's only task is gone (its port refuses) and its
    // replacement starts listening a moment later, on the same address (a restart) and
    // then on a new one (a reload lists it). Clients that arrive meanwhile wait for it
    // (`queue_timeout`) instead of being refused.
    let mut first = Backend::http("first");
    let listen = addr(free_port());
    let health = "check = \"tcp\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\nrise = 1\nfall = 1";
    let m = Meshd::start(&service_toml(
        "svc",
        listen,
        &[first.addr],
        "queue_timeout = \"10s\"",
        health,
    ));
    assert!(wait_until(Duration::from_secs(5), || m.healthy("svc") == 1));
    assert_eq!(who(listen).as_deref(), Some("first"));
    let port = first.addr.port();
    first.kill();

    // Restarted on the same address after 700 ms.
    let clients: Vec<_> = (0..8).map(|_| thread::spawn(move || who(listen))).collect();
    thread::sleep(Duration::from_millis(700));
    let again = Backend::spawn_on(port, "again", "http", &[]);
    for c in clients {
        assert_eq!(c.join().unwrap().as_deref(), Some("again"));
    }
    assert!(m.metric("meshd_queued_connections_total", &[("service", "svc")]) >= 8.0);

    // Gone for good; the replacement is on a new address that a reload lists.
    drop(again);
    let clients: Vec<_> = (0..8).map(|_| thread::spawn(move || who(listen))).collect();
    thread::sleep(Duration::from_millis(500));
    let new = Backend::http("new");
    std::fs::write(
        &m.config,
        format!(
            "[admin]\nlisten = \"{}\"\n\n{}",
            m.admin,
            service_toml(
                "svc",
                listen,
                &[new.addr],
                "queue_timeout = \"10s\"",
                health
            )
        ),
    )
    .unwrap();
    m.signal(libc::SIGHUP);
    for c in clients {
        assert_eq!(c.join().unwrap().as_deref(), Some("new"));
    }
    assert_eq!(
        m.metric(
            "meshd_rejected_connections_total",
            &[("reason", "no_backend")]
        ),
        0.0
    );
}

#[test]
fn with_no_queue_a_connection_no_task_takes_is_closed_at_once() {
    // The negative control of the test above: queue_timeout = "0s".
    let mut first = Backend::http("first");
    let listen = addr(free_port());
    let m = Meshd::start(&service_toml(
        "svc",
        listen,
        &[first.addr],
        "queue_timeout = \"0s\"",
        "check = \"none\"",
    ));
    assert_eq!(who(listen).as_deref(), Some("first"));
    let port = first.addr.port();
    first.kill();
    for i in 0..4 {
        assert_eq!(who(listen), None, "request {i}");
    }
    let _again = Backend::spawn_on(port, "again", "http", &[]);
    assert!(wait_until(Duration::from_secs(5), || who(listen)
        .as_deref()
        == Some("again")));
    assert_eq!(
        m.metric("meshd_queued_connections_total", &[("service", "svc")]),
        0.0
    );
}
