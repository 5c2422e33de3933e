//! A backend's life against the real binary: health-gated admission, ejection and
//! re-admission, drain with a timeout, slow start, hot reload (SIGHUP, file rename, partial
//! writes, bad files), and the admin API's auth, methods and errors.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::*;

fn svc(
    name: &str,
    listen: SocketAddr,
    backends: &[SocketAddr],
    extra: &str,
    health: &str,
) -> String {
    service_toml(name, listen, backends, extra, health)
}

const FAST_HTTP: &str =
    "check = \"http\"\npath = \"/healthz\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\nrise = 2\nfall = 2";

/// Requests `listen` from `n` threads until `stop`; returns (ok, failed) and records names.
fn load(
    listen: SocketAddr,
    n: usize,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<(u64, u64, Vec<String>)> {
    thread::spawn(move || {
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let names = Arc::new(std::sync::Mutex::new(Vec::new()));
        let hs: Vec<_> = (0..n)
            .map(|_| {
                let (ok, failed, names, stop) =
                    (ok.clone(), failed.clone(), names.clone(), stop.clone());
                thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match who(listen) {
                            Some(n) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                                names.lock().unwrap().push(n);
                            }
                            None => {
                                failed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        let v = names.lock().unwrap().clone();
        (
            ok.load(Ordering::Relaxed),
            failed.load(Ordering::Relaxed),
            v,
        )
    })
}

#[test]
fn a_backend_that_binds_late_gets_no_connection_before_it_is_healthy() {
    let a = Backend::http("a");
    let port = free_port();
    let listen = addr(free_port());
    let late = addr(port);
    let m = Meshd::start(&svc(
        "web",
        listen,
        &[a.addr, late],
        "balance = \"round_robin\"",
        FAST_HTTP,
    ));
    // Start the late task now: it binds its socket 1.5 s from now.
    assert!(wait_until(Duration::from_secs(10), || m.healthy("web") == 1));
    let _b = Backend::spawn_on(port, "b", "http", &["--bind-delay", "1500ms"]);
    let stop = Arc::new(AtomicBool::new(false));
    let h = load(listen, 4, stop.clone());
    assert!(wait_until(Duration::from_secs(15), || m.healthy("web") == 2));
    thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let (ok, failed, names) = h.join().unwrap();
    assert_eq!(failed, 0, "no request failed");
    assert!(ok > 50);
    assert!(names.iter().any(|n| n == "b"), "b got traffic once healthy");
    let b = m.backend("web", &late.to_string());
    // Never dialled while it was not listening: not one connect error.
    assert_eq!(b["connect_errors"], 0, "{b}");
}

#[test]
fn ejected_backend_comes_back_after_backoff_and_a_passing_check() {
    let a = Backend::http("a");
    let mut b = Backend::http("b");
    let listen = addr(free_port());
    // Health checks are slow (2 s): passive ejection must act first.
    let health = "check = \"tcp\"\ninterval = \"2s\"\ntimeout = \"200ms\"\nrise = 1\nfall = 3";
    let m = Meshd::start(&svc(
        "web",
        listen,
        &[a.addr, b.addr],
        "balance = \"round_robin\"",
        health,
    ));
    assert!(wait_until(Duration::from_secs(10), || m.healthy("web") == 2));
    let baddr = b.addr;
    b.kill();
    let mut failed = 0;
    for _ in 0..20 {
        if who(listen).as_deref() != Some("a") {
            failed += 1;
        }
    }
    assert_eq!(failed, 0, "connect failures were retried on a");
    assert_eq!(m.backend("web", &baddr.to_string())["ejected"], true);
    // Bring it back on the same port: after the back-off and a passing check it returns.
    let _b2 = Backend::spawn_on(baddr.port(), "b2", "http", &[]);
    assert!(wait_until(Duration::from_secs(15), || m
        .backend("web", &baddr.to_string())["ejected"]
        == false));
    assert!(wait_until(Duration::from_secs(5), || (0..10).any(|_| who(
        listen
    )
    .as_deref()
        == Some("b2"))));
}

#[test]
fn the_last_usable_backend_of_a_service_is_never_ejected() {
    let a = Backend::http("a");
    let mut b = Backend::http("b");
    let listen = addr(free_port());
    // One health check at start, then none during the test: only passive outlier
    // detection changes anything, and nothing is re-admitted behind the test's back.
    let health = "check = \"tcp\"\ninterval = \"1h\"\ntimeout = \"500ms\"\nrise = 1\nfall = 3";
    let m = Meshd::start(&svc(
        "web",
        listen,
        &[a.addr, b.addr],
        // No queue: a connection that finds no backend is closed after one round.
        "balance = \"round_robin\"\nqueue_timeout = \"0s\"",
        health,
    ));
    assert!(wait_until(Duration::from_secs(10), || m.healthy("web") == 2));
    let (aa, ba) = (a.addr, b.addr.to_string());
    let a_str = aa.to_string();

    // b dies while a is usable: b is ejected after 3 failed connects, as always.
    b.kill();
    for _ in 0..10 {
        assert_eq!(
            who(listen).as_deref(),
            Some("a"),
            "b's failures retried on a"
        );
    }
    assert_eq!(m.backend("web", &ba)["ejected"], true);

    // a dies too: it is the last usable backend, so it is not ejected. Every connection
    // still tries it (one connect error each) instead of being turned away unseen.
    drop(a);
    for _ in 0..5 {
        assert_eq!(who(listen), None);
    }
    let ab = m.backend("web", &a_str);
    assert_eq!(ab["ejected"], false, "{ab}");
    assert_eq!(ab["connect_errors"], 5, "{ab}");
    assert_eq!(m.backend("web", &ba)["ejected"], true);
    let log = m.log_text();
    assert_eq!(
        log.matches("it is the service's last usable backend")
            .count(),
        1,
        "logged once per failure streak:\n{log}"
    );

    // a comes back on its port: the very next connection reaches it, no back-off to sit out.
    let _a2 = Backend::spawn_on_addr(aa, "a2", "http", &[]);
    assert!(wait_until(Duration::from_secs(10), || TcpStream::connect(
        aa
    )
    .is_ok()));
    assert_eq!(who(listen).as_deref(), Some("a2"));
}

#[test]
fn removed_backend_drains_then_survivors_are_closed_at_drain_timeout() {
    let x = Backend::echo("x");
    let y = Backend::echo("y");
    let listen = addr(free_port());
    let extra = "balance = \"round_robin\"\ndrain_timeout = \"1500ms\"";
    let m = Meshd::start(&svc("web", listen, &[x.addr], extra, "check = \"none\""));
    let mut held = TcpStream::connect(listen).unwrap();
    held.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    held.write_all(b"1").unwrap();
    let mut one = [0u8; 1];
    held.read_exact(&mut one).unwrap();

    // Reload: x replaced by y.
    std::fs::write(
        &m.config,
        format!(
            "[admin]\nlisten = \"{}\"\n{}",
            m.admin,
            svc("web", listen, &[y.addr], extra, "check = \"none\"")
        ),
    )
    .unwrap();
    m.signal(libc::SIGHUP);
    let xs = x.addr.to_string();
    assert!(wait_until(Duration::from_secs(5), || m.backend("web", &xs)
        ["state"]
        == "draining"));
    // No new connection goes to x; the held one still works.
    let mut c = TcpStream::connect(listen).unwrap();
    c.write_all(b"new").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut v = Vec::new();
    c.read_to_end(&mut v).unwrap();
    assert_eq!(v, b"new");
    assert_eq!(m.backend("web", &xs)["connections_total"], 1);
    held.write_all(b"2").unwrap();
    held.read_exact(&mut one).unwrap();
    assert_eq!(&one, b"2");
    let d = m.backend("web", &xs);
    assert_eq!(d["drain"]["remaining_connections"], 1, "{d}");
    // At drain_timeout meshd closes it, counts it, and the backend is gone.
    let mut rest = Vec::new();
    let _ = held.read_to_end(&mut rest);
    assert!(wait_until(Duration::from_secs(5), || m
        .backend("web", &xs)
        .is_null()));
    assert_eq!(
        m.metric("meshd_drain_closed_connections_total", &[("backend", &xs)]),
        1.0
    );
}

#[test]
fn slow_start_ramps_a_new_backend() {
    let a = Backend::http("a");
    let b = Backend::http("b");
    let listen = addr(free_port());
    let extra = "balance = \"round_robin\"\nslow_start = \"3s\"";
    let m = Meshd::start(&svc("web", listen, &[a.addr], extra, FAST_HTTP));
    assert!(wait_until(Duration::from_secs(10), || m.healthy("web") == 1));
    std::fs::write(
        &m.config,
        format!(
            "[admin]\nlisten = \"{}\"\n{}",
            m.admin,
            svc("web", listen, &[a.addr, b.addr], extra, FAST_HTTP)
        ),
    )
    .unwrap();
    m.signal(libc::SIGHUP);
    let bs = b.addr.to_string();
    let mut seen = Vec::new();
    assert!(wait_until(Duration::from_secs(15), || {
        let w = m.backend("web", &bs)["effective_weight"]
            .as_u64()
            .unwrap_or(0);
        seen.push(w);
        w == 100
    }));
    assert!(
        seen.iter().any(|&w| w > 0 && w < 50),
        "weight ramped up from near zero: {seen:?}"
    );
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(sorted, seen, "the ramp only goes up");
}

#[test]
fn reload_keeps_connections_and_stats_and_a_bad_file_changes_nothing() {
    let a = Backend::echo("a");
    let b = Backend::echo("b");
    let listen = addr(free_port());
    let m = Meshd::start(&svc("web", listen, &[a.addr], "", "check = \"none\""));
    let mut held = TcpStream::connect(listen).unwrap();
    held.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    held.write_all(b"x").unwrap();
    let mut one = [0u8; 1];
    held.read_exact(&mut one).unwrap();
    let gen0 = m.services()["generation"].as_u64().unwrap();

    // A bad file: one error line with file:line:col, old table kept, connection kept.
    let good = std::fs::read_to_string(&m.config).unwrap();
    std::fs::write(
        &m.config,
        good.replace("[[service]]", "[[service]]\nbogus_key = 1"),
    )
    .unwrap();
    m.signal(libc::SIGHUP);
    // Both the file watcher and SIGHUP may trigger an attempt: each is counted.
    assert!(wait_until(Duration::from_secs(5), || m.services()
        ["reloads"]["error"]
        .as_u64()
        >= Some(1)));
    let err = m.services()["reloads"]["last_error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        err.starts_with(&format!("{}:", m.config.display())) && err.contains("bogus_key"),
        "{err}"
    );
    assert!(m.metric("meshd_config_reloads_total", &[("result", "error")]) >= 1.0);
    assert!(m.log_text().contains("bogus_key"));
    held.write_all(b"y").unwrap();
    held.read_exact(&mut one).unwrap();
    assert_eq!(&one, b"y");

    // A good reload: a second backend; the first keeps its identity and counters.
    let before = m.backend("web", &a.addr.to_string())["connections_total"].clone();
    std::fs::write(
        &m.config,
        good.replace(
            &format!("{{ addr = \"{}\" }}", a.addr),
            &format!("{{ addr = \"{}\" }}, {{ addr = \"{}\" }}", a.addr, b.addr),
        ),
    )
    .unwrap();
    m.signal(libc::SIGHUP);
    assert!(wait_until(Duration::from_secs(5), || m.healthy("web") == 2));
    let s = m.services();
    assert!(s["generation"].as_u64().unwrap() > gen0);
    assert!(s["reloads"]["ok"].as_u64() >= Some(1));
    assert!(s["reloads"]["last_error"].is_null());
    assert_eq!(
        m.backend("web", &a.addr.to_string())["connections_total"],
        before
    );
    assert_eq!(
        m.backend("web", &a.addr.to_string())["active_connections"],
        1
    );
    held.write_all(b"z").unwrap();
    held.read_exact(&mut one).unwrap();
    assert_eq!(&one, b"z");
}

#[test]
fn file_replaced_by_rename_is_reloaded_and_a_partial_write_is_never_applied() {
    let a = Backend::http("a");
    let b = Backend::http("b");
    let listen = addr(free_port());
    let m = Meshd::start(&svc("web", listen, &[a.addr], "", "check = \"none\""));
    let text = |bs: &[SocketAddr]| {
        format!(
            "[admin]\nlisten = \"{}\"\n{}",
            m.admin,
            svc("web", listen, bs, "", "check = \"none\"")
        )
    };

    // An editor-style save: write a temp file, rename it over the config. No SIGHUP.
    let tmp = m.dir.0.join(".mesh.toml.swp");
    std::fs::write(&tmp, text(&[b.addr])).unwrap();
    std::fs::rename(&tmp, &m.config).unwrap();
    assert!(wait_until(Duration::from_secs(10), || who(listen)
        .as_deref()
        == Some("b")));
    assert_eq!(m.services()["reloads"]["ok"], 1);

    // A writer that stops half-way through, then finishes: only the whole file applies.
    let full = text(&[a.addr]);
    let (head, tail) = full.split_at(full.len() - 20);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&m.config)
        .unwrap();
    f.write_all(head.as_bytes()).unwrap();
    f.flush().unwrap();
    thread::sleep(Duration::from_millis(60));
    f.write_all(tail.as_bytes()).unwrap();
    drop(f);
    assert!(wait_until(Duration::from_secs(10), || who(listen)
        .as_deref()
        == Some("a")));
    let s = m.services();
    assert_eq!(
        s["reloads"]["error"], 0,
        "the half-written file was never parsed: {s}"
    );
    assert_eq!(s["reloads"]["ok"], 2);
}

#[test]
fn reload_adds_and_removes_listeners_without_touching_the_others() {
    let a = Backend::http("a");
    let l1 = addr(free_port());
    let l2 = addr(free_port());
    let m = Meshd::start(&svc("one", l1, &[a.addr], "", "check = \"none\""));
    let mut held = TcpStream::connect(l1).unwrap();
    held.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let two = format!(
        "[admin]\nlisten = \"{}\"\n{}{}",
        m.admin,
        svc("one", l1, &[a.addr], "", "check = \"none\""),
        svc("two", l2, &[a.addr], "", "check = \"none\"")
    );
    std::fs::write(&m.config, two).unwrap();
    m.signal(libc::SIGHUP);
    assert!(wait_until(Duration::from_secs(5), || who(l2).as_deref() == Some("a")));
    // Remove "one": its listener stops accepting; "two" keeps serving.
    std::fs::write(
        &m.config,
        format!(
            "[admin]\nlisten = \"{}\"\n{}",
            m.admin,
            svc("two", l2, &[a.addr], "", "check = \"none\"")
        ),
    )
    .unwrap();
    m.signal(libc::SIGHUP);
    assert!(wait_until(Duration::from_secs(5), || TcpStream::connect(
        l1
    )
    .is_err()));
    assert_eq!(who(l2).as_deref(), Some("a"));
    // The connection accepted by the removed listener was not cut.
    held.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut v = Vec::new();
    held.read_to_end(&mut v).unwrap();
    assert!(String::from_utf8_lossy(&v).starts_with("HTTP/1.1 200"));
}

#[test]
fn admin_api_auth_methods_and_errors() {
    let a = Backend::http("a");
    let b = Backend::http("b");
    let listen = addr(free_port());
    let dir = TempDir::new("token");
    let token_file = dir.0.join("token");
    std::fs::write(&token_file, "s3cret\n").unwrap();
    let toml = format!(
        "[admin]\nlisten = \"{{admin}}\"\ntoken_file = \"{}\"\n{}",
        token_file.display(),
        svc(
            "web",
            listen,
            &[a.addr, b.addr],
            "balance = \"round_robin\"",
            "check = \"none\""
        )
    );
    let m = Meshd::start(&toml);
    let bs = b.addr.to_string();
    let path = |action: &str| format!("/api/v1/services/web/backends/{bs}/{action}");
    let auth = [("Authorization", "Bearer s3cret")];
    let bad = [("Authorization", "Bearer nope")];

    assert_eq!(http_get(m.admin, "/healthz").unwrap().0, 200);
    assert_eq!(http_get(m.admin, "/readyz").unwrap().0, 200);
    assert_eq!(http_get(m.admin, "/nope").unwrap().0, 404);
    assert_eq!(
        http_request(m.admin, "POST", &path("drain"), &[], "")
            .unwrap()
            .0,
        401
    );
    assert_eq!(
        http_request(m.admin, "POST", &path("drain"), &bad, "")
            .unwrap()
            .0,
        401
    );
    // Mutations are POST/PUT only: a GET is 405, not a drain.
    let (code, body) = http_request(m.admin, "GET", &path("drain"), &auth, "").unwrap();
    assert_eq!(code, 405, "{body}");
    assert_eq!(
        http_request(m.admin, "POST", "/api/v1/services", &auth, "")
            .unwrap()
            .0,
        405
    );
    let (code, body) = http_request(
        m.admin,
        "POST",
        "/api/v1/services/nope/backends/127.0.0.1:1/drain",
        &auth,
        "",
    )
    .unwrap();
    assert_eq!(code, 404);
    assert!(body.contains("no service named"), "{body}");
    assert_eq!(
        http_request(
            m.admin,
            "POST",
            "/api/v1/services/web/backends/127.0.0.1:1/drain",
            &auth,
            ""
        )
        .unwrap()
        .0,
        404
    );
    assert_eq!(
        http_request(
            m.admin,
            "POST",
            "/api/v1/services/web/backends/not-an-addr/drain",
            &auth,
            ""
        )
        .unwrap()
        .0,
        400
    );
    assert_eq!(
        http_request(m.admin, "PUT", &path("weight"), &auth, "{\"weight\": 5000}")
            .unwrap()
            .0,
        400
    );
    assert_eq!(
        http_request(m.admin, "PUT", &path("weight"), &auth, "not json")
            .unwrap()
            .0,
        400
    );
    assert_eq!(
        http_request(m.admin, "PUT", &path("weight"), &auth, "{\"weight\": 0}")
            .unwrap()
            .0,
        200
    );
    assert_eq!(m.backend("web", &bs)["weight_override"], 0);
    // Weight 0: no new connections to b.
    assert!(wait_until(Duration::from_secs(5), || (0..10).all(|_| who(
        listen
    )
    .as_deref()
        == Some("a"))));
    assert_eq!(
        http_request(m.admin, "PUT", &path("weight"), &auth, "{\"weight\": 100}")
            .unwrap()
            .0,
        200
    );

    // Drain, then enable again.
    let (code, body) = http_request(m.admin, "POST", &path("drain"), &auth, "").unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(m.backend("web", &bs)["state"], "draining");
    assert!((0..10).all(|_| who(listen).as_deref() == Some("a")));
    assert_eq!(
        http_request(m.admin, "POST", &path("enable"), &auth, "")
            .unwrap()
            .0,
        200
    );
    assert_eq!(m.backend("web", &bs)["state"], "active");
    assert!(wait_until(Duration::from_secs(5), || (0..10).any(|_| who(
        listen
    )
    .as_deref()
        == Some("b"))));
}
