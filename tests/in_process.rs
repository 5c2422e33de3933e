//! meshd as a library, in this test's own process: `App::build` binds, `App::spawn` serves,
//! `Running::reload` and `Running::shutdown` do what SIGHUP and SIGTERM do in the binary.
//! Two meshd's run one after the other on the same ports: a shutdown releases every
//! socket and ends every connection it was given the grace for.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{addr, free_port, Svc, TempDir};
use meshd::app::App;
use meshd::config::Config;

/// A backend that answers every connection with `name` and closes it, or, for a
/// connection that first sends "hold", keeps it open until the client closes it.
async fn backend(name: &'static str) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = [0u8; 16];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let _ = s.write_all(name.as_bytes()).await;
                if &buf[..n] == b"hold" {
                    let _ = s.read(&mut buf).await;
                }
            });
        }
    });
    a
}

/// One request through `to` on a blocking thread: what the backend said.
async fn ask(to: SocketAddr) -> Option<String> {
    tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(b"hi").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    })
    .await
    .unwrap()
}

fn config_text(admin: SocketAddr, listen: SocketAddr, backends: &[SocketAddr]) -> String {
    format!(
        "[admin]\nlisten = \"{admin}\"\n\n{}",
        Svc::new("web", listen)
            .backends(backends)
            .set("drain_timeout = \"300ms\"")
            .health("check = \"tcp\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\nrise = 1")
    )
}

async fn until(timeout: Duration, mut f: impl AsyncFnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_started_in_process_serves_reloads_and_shuts_down_releasing_its_ports() {
    let one = backend("one").await;
    let two = backend("two").await;
    let dir = TempDir::new("in-process");
    let path = dir.0.join("mesh.toml");
    let admin = addr(free_port());
    let listen = addr(free_port());
    std::fs::write(&path, config_text(admin, listen, &[one])).unwrap();

    for round in 0..2 {
        let config = Config::load(&path).unwrap();
        let app = App::build(config, None, tokio::runtime::Handle::current())
            .await
            .expect("build");
        assert_eq!(app.admin_addr().unwrap(), admin);
        let running = app.spawn().await.expect("spawn");
        let first = if round == 0 { "one" } else { "two" };
        assert!(
            until(Duration::from_secs(10), async || ask(listen)
                .await
                .as_deref()
                == Some(first))
            .await,
            "round {round}: {first} never answered through meshd"
        );

        if round == 0 {
            // A reload, as SIGHUP asks for it: `two` replaces `one`.
            std::fs::write(&path, config_text(admin, listen, &[two])).unwrap();
            running.reload();
            assert!(
                until(Duration::from_secs(10), async || ask(listen)
                    .await
                    .as_deref()
                    == Some("two"))
                .await,
                "the reload never took effect"
            );
        }

        // A connection still open at shutdown is closed when the grace is over.
        let held = tokio::task::spawn_blocking(move || {
            let mut s = TcpStream::connect(listen).unwrap();
            s.write_all(b"hold").unwrap();
            let mut b = [0u8; 3];
            s.read_exact(&mut b).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let t = Instant::now();
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest);
            t.elapsed()
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!running.upgrading());
        let grace = Duration::from_millis(300);
        let t = Instant::now();
        tokio::time::timeout(Duration::from_secs(10), running.shutdown(grace))
            .await
            .expect("shutdown returns");
        let took = t.elapsed();
        assert!(
            took >= grace,
            "shutdown returned after {took:?}, before its grace with a connection open"
        );
        let held_for = held.await.unwrap();
        assert!(
            held_for < Duration::from_secs(9),
            "the held connection was not closed by the shutdown ({held_for:?})"
        );

        // Every socket is released: the same ports bind again (the next round needs them).
        for a in [listen, admin] {
            let again = std::net::TcpListener::bind(a);
            assert!(
                again.is_ok(),
                "round {round}: {a} still bound after shutdown: {again:?}"
            );
        }
    }
}
