//! Issue #14, with the real binary: a config file rewritten in place (empty for a moment)
//! never closes a listener, and rejected reloads move no table generation.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::*;

fn reloads(m: &Meshd) -> (u64, u64) {
    let s = m.services();
    (
        s["reloads"]["ok"].as_u64().unwrap(),
        s["reloads"]["error"].as_u64().unwrap(),
    )
}

fn last_error(m: &Meshd) -> String {
    m.services()["reloads"]["last_error"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

fn generation(m: &Meshd) -> u64 {
    m.services()["generation"].as_u64().unwrap()
}

/// Writes `text` as the config and waits until meshd counted one more reload of the kind
/// `ok` (true) or error (false).
fn reload_to(m: &Meshd, text: &str, ok: bool) {
    let (ok0, err0) = reloads(m);
    std::fs::write(&m.config, text).unwrap();
    let counted = wait_until(Duration::from_secs(10), || {
        let (o, e) = reloads(m);
        if ok {
            o > ok0
        } else {
            e > err0
        }
    });
    assert!(
        counted,
        "no {} reload counted for {text:?}: {:?}, last error {:?}; log:\n{}",
        if ok { "good" } else { "rejected" },
        reloads(m),
        last_error(m),
        m.log_text()
    );
}

/// One round trip through an echo service on a new connection.
fn echo_once(listen: SocketAddr) -> Result<(), String> {
    let mut s = TcpStream::connect_timeout(&listen, Duration::from_secs(2))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"ping").map_err(|e| format!("write: {e}"))?;
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).map_err(|e| format!("read: {e}"))?;
    if &buf != b"ping" {
        return Err(format!("got {buf:?}"));
    }
    Ok(())
}

#[test]
fn a_config_rewritten_in_place_keeps_every_listener_and_connection() {
    let echo = Backend::echo("echo");
    let listen = addr(free_port());
    let m = Meshd::start(&service_toml(
        "web",
        listen,
        &[echo.addr],
        "",
        "check = \"none\"",
    ));
    let good = std::fs::read_to_string(&m.config).unwrap();
    let admin_only = format!("[admin]\nlisten = \"{}\"\n", m.admin);
    let gen0 = generation(&m);

    let mut held = TcpStream::connect(listen).unwrap();
    held.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut one = [0u8; 1];
    held.write_all(b"a").unwrap();
    held.read_exact(&mut one).unwrap();

    // Clients on new connections the whole time.
    let stop = Arc::new(AtomicBool::new(false));
    let (served, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let client = {
        let (stop, served, failed) = (stop.clone(), served.clone(), failed.clone());
        thread::spawn(move || {
            let mut errors = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match echo_once(listen) {
                    Ok(()) => served.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        errors.push(e);
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
                thread::sleep(Duration::from_millis(10));
            }
            errors
        })
    };

    // Truncated, as `>` or an editor's in-place save leaves it for a moment, and left so
    // for longer than the 250 ms quiet period.
    reload_to(&m, "", false);
    let err = last_error(&m);
    assert!(
        err.starts_with(&format!("{}: the file is empty", m.config.display())),
        "{err}"
    );
    thread::sleep(Duration::from_millis(500));
    // Whitespace and comments only: the same.
    reload_to(&m, "\n  \n# mesh.toml, being rewritten\n", false);
    assert!(
        last_error(&m).contains("the file is empty"),
        "{}",
        last_error(&m)
    );
    // A file that would remove every service, without allow_empty.
    reload_to(&m, &admin_only, false);
    let err = last_error(&m);
    assert!(
        err.starts_with(&format!("{}: ", m.config.display()))
            && err.contains("\"web\"")
            && err.contains("allow_empty = true"),
        "{err}"
    );
    assert_eq!(generation(&m), gen0, "a rejected reload changed the table");
    assert!(m
        .log_text()
        .contains("config reload rejected, keeping the running config"));
    // The whole file again.
    reload_to(&m, &good, true);
    thread::sleep(Duration::from_millis(300));

    stop.store(true, Ordering::Relaxed);
    let errors = client.join().unwrap();
    let (served, failed) = (
        served.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
    );
    assert!(
        failed == 0 && served > 20,
        "{served} served, {failed} failed while the file was empty: {errors:?}; log:\n{}",
        m.log_text()
    );
    held.write_all(b"b").unwrap();
    held.read_exact(&mut one).unwrap();
    assert_eq!(&one, b"b");
    assert_eq!(reloads(&m), (1, 3));

    // Said explicitly, the service goes: its listener closes.
    reload_to(&m, &format!("allow_empty = true\n{admin_only}"), true);
    assert!(
        wait_until(Duration::from_secs(5), || TcpStream::connect(listen)
            .is_err()),
        "listener still open after a reload with allow_empty = true and no service"
    );
}

#[test]
fn rejected_reloads_move_no_table_generation() {
    let echo = Backend::echo("echo");
    let other = Backend::echo("other");
    let listen = addr(free_port());
    let good = service_toml("web", listen, &[echo.addr], "", "check = \"none\"");
    let m = Meshd::start(&good);
    let text = std::fs::read_to_string(&m.config).unwrap();
    let gen0 = generation(&m);
    let metric0 = m.metric("meshd_table_generation", &[]);
    assert_eq!(metric0, gen0 as f64);

    // Files that fail to validate.
    for i in 1..=5 {
        reload_to(
            &m,
            &text.replace("[[service]]", &format!("[[service]]\nbogus_{i} = 1")),
            false,
        );
        assert!(last_error(&m).contains(&format!("bogus_{i}")));
    }
    // A valid file that cannot be applied: its new listener's port is taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap();
    reload_to(
        &m,
        &format!(
            "{text}{}",
            service_toml("api", taken_addr, &[echo.addr], "", "check = \"none\"")
        ),
        false,
    );
    assert!(
        last_error(&m).contains(&taken_addr.to_string()),
        "{}",
        last_error(&m)
    );
    assert_eq!(reloads(&m), (0, 6));
    // Counted and shown at once, in /metrics too, with the same generation.
    assert_eq!(generation(&m), gen0);
    assert_eq!(m.metric("meshd_table_generation", &[]), metric0);
    assert_eq!(
        m.metric("meshd_config_reloads_total", &[("result", "error")]),
        6.0
    );
    echo_once(listen).unwrap();

    // A reload that changes the table moves it.
    reload_to(
        &m,
        &text.replace(
            &format!("{{ addr = \"{}\" }}", echo.addr),
            &format!(
                "{{ addr = \"{}\" }}, {{ addr = \"{}\" }}",
                echo.addr, other.addr
            ),
        ),
        true,
    );
    assert!(wait_until(Duration::from_secs(5), || generation(&m) > gen0));
    assert!(m.metric("meshd_table_generation", &[]) > metric0);
}

#[test]
fn check_refuses_an_empty_file_and_warns_about_a_file_with_no_service() {
    let dir = TempDir::new("check");
    let run = |name: &str, text: &str| {
        let path = dir.0.join(name);
        std::fs::write(&path, text).unwrap();
        let out = Command::new(BIN)
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        (
            path,
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for (i, text) in ["", " \n\t\n", "# nothing yet\n"].iter().enumerate() {
        let (path, code, err) = run(&format!("empty{i}.toml"), text);
        assert_eq!(code, Some(1), "{text:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.starts_with(&format!("{}: the file is empty", path.display())),
            "{err}"
        );
    }
    let (path, code, err) = run("none.toml", "[log]\n");
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!("{}: warning: no [[service]]", path.display()))
            && err.contains("allow_empty = true"),
        "{err}"
    );
    let (_, code, err) = run("allowed.toml", "allow_empty = true\n[log]\n");
    assert_eq!((code, err.as_str()), (Some(0), ""));
}
