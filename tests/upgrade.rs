//! Upgrading meshd under load, against the real binary: `meshd upgrade` hands every
//! listener to a new process (the same socket, never re-bound) and the old one drains; no
//! request is refused, and a long stream that crosses every upgrade stays byte-exact. The
//! negative control (stop, then start) refuses requests under the same load, so the test
//! can fail. Then the failure paths (a new binary that exits, one that is never ready, one
//! killed mid-hand-off, two upgrades at once): the old process keeps serving and `meshd
//! upgrade` exits 1 naming why. And `[upgrade] socket`: a second meshd started with the same
//! setting takes over from the first (a start-first container update).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::load::{Load, LoadOpts, Tally};
use common::*;

/// One test at a time: the load tests count every failure, and the failure-path tests
/// start processes of their own.
static SERIAL: Mutex<()> = Mutex::new(());

/// Fast checks, so a new process's first health round (its warm-up) takes ~0.2 s.
const HEALTH: &str =
    "check = \"tcp\"\ninterval = \"200ms\"\ntimeout = \"200ms\"\nrise = 1\nfall = 2";

const UPGRADES: usize = 10;

/// Every meshd process a test started, directly or through upgrades: stopped at the end
/// (and reaped, for those that are this test's children).
struct Pids(Vec<u32>, Vec<std::process::Child>);

impl Drop for Pids {
    fn drop(&mut self) {
        for &p in &self.0 {
            kill(p, libc::SIGKILL);
        }
        for c in &mut self.1 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn kill(pid: u32, sig: i32) {
    let _ = meshd::sys::send_signal(pid, sig);
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map(|s| {
            !s.lines()
                .any(|l| l.starts_with("State:") && l.contains('Z'))
        })
        .unwrap_or(false)
}

/// The pid of the meshd answering on `admin`.
fn serving_pid(admin: SocketAddr) -> Option<u32> {
    let (code, body) = http_get(admin, "/api/v1/process")?;
    if code != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v["pid"].as_u64().map(|p| p as u32)
}

/// The inode of the socket listening on `addr` (from /proc/net/tcp): the same inode
/// before and after is the same socket, never re-bound.
fn listen_inode(addr: SocketAddr) -> Option<u64> {
    socket_inode("tcp", addr, Some("0A"))
}

/// `TcpExt: ListenOverflows` from /proc/net/netstat.
fn listen_overflows() -> u64 {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "ListenOverflows")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// `meshd upgrade --admin ADDR extra...`: (exit code, stdout + stderr, how long it took).
fn upgrade_cli(admin: SocketAddr, extra: &[&str]) -> (Option<i32>, String, Duration) {
    let t = Instant::now();
    let out = Command::new(BIN)
        .args(["upgrade", "--admin", &admin.to_string()])
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("run meshd upgrade");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text, t.elapsed())
}

/// A stream through meshd to an echo backend that sends 1 KiB every 10 ms and checks
/// every byte that comes back, until stopped; returns the bytes checked or what broke.
struct Stream {
    stop: Arc<AtomicBool>,
    handle: thread::JoinHandle<Result<u64, String>>,
}

impl Stream {
    fn start(listen: SocketAddr) -> Stream {
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let handle = thread::spawn(move || {
            let mut c = TcpStream::connect(listen).map_err(|e| format!("connect: {e}"))?;
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut n: u64 = 0;
            let mut seq: u8 = 0;
            let mut back = [0u8; 1024];
            while !st.load(Ordering::Relaxed) {
                let chunk: Vec<u8> = (0..1024).map(|i| seq.wrapping_add(i as u8)).collect();
                c.write_all(&chunk)
                    .map_err(|e| format!("write after {n} bytes: {e}"))?;
                c.read_exact(&mut back)
                    .map_err(|e| format!("read after {n} bytes: {e}"))?;
                if back[..] != chunk[..] {
                    return Err(format!("bytes differ after {n}"));
                }
                n += 1024;
                seq = seq.wrapping_add(1);
                thread::sleep(Duration::from_millis(10));
            }
            Ok(n)
        });
        Stream { stop, handle }
    }

    fn finish(self) -> Result<u64, String> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap()
    }
}

/// Another `meshd --config` with `m`'s config, logging into `m`'s log.
fn start_beside(m: &Meshd) -> std::process::Child {
    let log = std::fs::OpenOptions::new()
        .append(true)
        .open(&m.log)
        .unwrap();
    Command::new(BIN)
        .arg("--config")
        .arg(&m.config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// Two services (http behind three backends; echo for the stream) and the load.
struct Bench {
    _backends: Vec<Backend>,
    m: Meshd,
    web: SocketAddr,
    echo: SocketAddr,
}

fn bench(extra_top: &str) -> Bench {
    let backends: Vec<Backend> = ["a", "b", "c"].iter().map(|n| Backend::http(n)).collect();
    let echo_b = Backend::echo("echo");
    let (web, echo) = (addr(free_port()), addr(free_port()));
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let toml = format!(
        "{extra_top}{}{}",
        service_toml("web", web, &addrs, "", HEALTH),
        service_toml("echo", echo, &[echo_b.addr], "", HEALTH)
    );
    let m = Meshd::start(&toml);
    assert!(wait_until(Duration::from_secs(10), || m.healthy("web")
        == 3
        && m.healthy("echo") == 1));
    let mut all = backends;
    all.push(echo_b);
    Bench {
        _backends: all,
        m,
        web,
        echo,
    }
}

fn load(web: SocketAddr) -> Load {
    Load::start(
        web,
        LoadOpts {
            close_clients: 20,
            keepalive_clients: 20,
            request_timeout: Duration::from_secs(5),
            pace: Duration::ZERO,
            max_run: Duration::from_secs(120),
        },
    )
}

fn line(what: &str, t: &Tally) -> String {
    format!(
        "{what}: connection-per-request {} failed of {}; keep-alive {} failed of {} ({} retried); {}",
        t.close.failed,
        t.close.requests,
        t.keepalive.failed,
        t.keepalive.requests,
        t.keepalive.retried,
        t.errors_line()
    )
}

#[test]
fn ten_upgrades_under_load_refuse_nothing_and_keep_the_same_socket() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let b = bench("");
    let mut pids = Pids(vec![b.m.child.id()], Vec::new());
    let inode = listen_inode(b.web).expect("the web listener's inode");
    let overflows = listen_overflows();
    let stream = Stream::start(b.echo);
    let load = load(b.web);
    thread::sleep(Duration::from_secs(1));

    let mut took = Vec::new();
    for i in 0..UPGRADES {
        let before = serving_pid(b.m.admin).expect("a meshd answers");
        let (code, out, t) = upgrade_cli(b.m.admin, &[]);
        assert_eq!(
            code,
            Some(0),
            "upgrade {i}: {out}\nlog:\n{}",
            b.m.log_text()
        );
        let after = serving_pid(b.m.admin).expect("a meshd answers");
        assert_ne!(before, after, "upgrade {i}: the same process still answers");
        pids.0.push(after);
        took.push(t);
        thread::sleep(Duration::from_millis(300));
    }
    thread::sleep(Duration::from_millis(500));
    let tally = load.stop();
    let streamed = stream.finish();
    let overflowed = listen_overflows() - overflows;
    took.sort();
    println!("{}", line(&format!("{UPGRADES} upgrades"), &tally));
    println!(
        "hand-off (meshd upgrade until the new process is ready): median {:?}, max {:?}; stream {streamed:?}; ListenOverflows +{overflowed}",
        took[took.len() / 2],
        took[took.len() - 1]
    );

    assert_eq!(
        listen_inode(b.web),
        Some(inode),
        "the listener was re-bound"
    );
    assert!(tally.close.requests > 0 && tally.keepalive.requests > 0);
    assert_eq!(tally.close.failed, 0, "{}", line("upgrades", &tally));
    assert_eq!(tally.keepalive.failed, 0, "{}", line("upgrades", &tally));
    let n = streamed.expect("the stream crossing every upgrade");
    assert!(n > 100 * 1024, "the stream moved only {n} bytes");
    assert_eq!(overflowed, 0, "listen queues overflowed");
    // Every old process drained and exited once its last connection closed.
    let last = *pids.0.last().unwrap();
    assert!(wait_until(Duration::from_secs(10), || pids
        .0
        .iter()
        .filter(|&&p| p != last)
        .all(|&p| !alive(p))));
    let log = b.m.log_text();
    assert_eq!(
        log.matches("upgrade: the new meshd is ready; handing over")
            .count(),
        UPGRADES,
        "{log}"
    );
}

#[test]
fn negative_control_stop_then_start_refuses_requests_under_the_same_load() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // A short drain, so the stopped process frees the admin address soon.
    let mut b = bench("[defaults]\ndrain_timeout = \"1s\"\n\n");
    let mut pids = Pids(Vec::new(), Vec::new());
    let load = load(b.web);
    thread::sleep(Duration::from_secs(1));
    for _ in 0..3 {
        // What an upgrade without hand-off does: the old process stops, a new one binds.
        let pid = serving_pid(b.m.admin).expect("a meshd answers");
        kill(pid, libc::SIGTERM);
        if pid == b.m.child.id() {
            b.m.wait_exit(Duration::from_secs(10));
        } else {
            wait_until(Duration::from_secs(10), || !alive(pid));
        }
        let child = start_beside(&b.m);
        let id = child.id();
        pids.1.push(child);
        assert!(wait_until(Duration::from_secs(10), || serving_pid(
            b.m.admin
        ) == Some(id)));
        thread::sleep(Duration::from_millis(500));
    }
    let tally = load.stop();
    println!("{}", line("3 stop-then-start restarts", &tally));
    assert!(
        tally.close.failed > 0,
        "stop-then-start lost nothing: this test could not tell an upgrade from a restart; {}",
        line("restarts", &tally)
    );
}

/// A script used as the new binary: `body` after a shebang, with `$MESHD` the real one.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\nMESHD={BIN}\n{body}\n")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

#[test]
fn a_failed_upgrade_leaves_the_old_process_serving_and_says_why() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let b = bench("");
    let _pids = Pids(vec![b.m.child.id()], Vec::new());
    let dir = &b.m.dir.0;
    let pid = b.m.child.id();
    let still_serving = |what: &str| {
        assert_eq!(
            serving_pid(b.m.admin),
            Some(pid),
            "{what}: another process answers"
        );
        assert!(
            who(b.web).is_some(),
            "{what}: the old process does not serve"
        );
    };

    // A new binary that exits during warm-up (a bad release).
    let (code, out, _) = upgrade_cli(b.m.admin, &["--binary", "/bin/false"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("exited during warm-up"), "{out}");
    still_serving("exited");

    // One that never says it is ready.
    let hang = script(dir, "hang.sh", "exec sleep 60");
    let (code, out, t) = upgrade_cli(
        b.m.admin,
        &["--binary", hang.to_str().unwrap(), "--timeout", "1s"],
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("not ready within"), "{out}");
    assert!(
        t < Duration::from_secs(20),
        "the timeout was not kept: {t:?}"
    );
    still_serving("never ready");

    // A real meshd killed (-9) after it took the listeners, before it is ready: its
    // first health round is still running 500 ms in.
    let killed = script(
        dir,
        "killed.sh",
        "\"$MESHD\" \"$@\" & pid=$!\nsleep 0.5\nkill -9 $pid\nwait $pid\nexit 137",
    );
    let slow = Svc::new("slow", addr(free_port()))
        .backends(&[addr(free_port())])
        .health("check = \"tcp\"\ninterval = \"5s\"\nrise = 1")
        .to_string();
    // The slow service's one backend never answers: warm-up waits for it (up to 10 s).
    let text = std::fs::read_to_string(&b.m.config).unwrap();
    std::fs::write(&b.m.config, format!("{text}{slow}")).unwrap();
    b.m.signal(libc::SIGHUP);
    assert!(wait_until(Duration::from_secs(5), || b.m.services()
        ["services"]
        .as_array()
        .is_some_and(|s| s.len() == 3)));
    let (code, out, _) = upgrade_cli(b.m.admin, &["--binary", killed.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("exited") || out.contains("closed the hand-off"),
        "{out}"
    );
    still_serving("killed mid-hand-off");

    // Two at once: the second is refused while the first runs.
    let admin = b.m.admin;
    let hang_s = hang.to_str().unwrap().to_owned();
    let first =
        thread::spawn(move || upgrade_cli(admin, &["--binary", &hang_s, "--timeout", "3s"]));
    assert!(wait_until(Duration::from_secs(5), || {
        http_get(admin, "/api/v1/process").is_some_and(|(_, b)| b.contains("\"upgrading\":true"))
    }));
    let (code, out, _) = upgrade_cli(admin, &["--binary", "/bin/false"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("already in progress"), "{out}");
    let (code, out, _) = first.join().unwrap();
    assert_eq!(code, Some(1), "{out}");
    still_serving("two at once");

    let m = b.m.metric("meshd_upgrades_total", &[("result", "failed")]);
    let t = b.m.metric("meshd_upgrades_total", &[("result", "timeout")]);
    assert_eq!((m, t), (3.0, 2.0), "failed, timeout");
}

#[test]
fn a_meshd_started_on_the_upgrade_socket_takes_over_from_the_running_one() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let sock = std::env::temp_dir().join(format!(
        "meshd-up-{}-{}.sock",
        std::process::id(),
        free_port()
    ));
    let top = format!("[upgrade]\nsocket = \"{}\"\n\n", sock.display());
    let mut b = bench(&top);
    let mut pids = Pids(vec![b.m.child.id()], Vec::new());
    let inode = listen_inode(b.web).unwrap();
    let load = load(b.web);
    thread::sleep(Duration::from_millis(500));

    // The start-first update's new container: the same config, started beside the old.
    let mut new = start_beside(&b.m);
    pids.0.push(new.id());
    assert!(
        wait_until(Duration::from_secs(15), || serving_pid(b.m.admin)
            == Some(new.id())),
        "{}",
        b.m.log_text()
    );
    thread::sleep(Duration::from_millis(500));
    let tally = load.stop();
    // Its keep-alive connections closed with the load: the old one has drained.
    assert_eq!(
        b.m.wait_exit(Duration::from_secs(30)),
        Some(0),
        "the old one exits 0"
    );
    println!("{}", line("socket takeover", &tally));
    assert_eq!(listen_inode(b.web), Some(inode));
    assert_eq!(tally.close.failed, 0, "{}", line("takeover", &tally));
    assert_eq!(tally.keepalive.failed, 0, "{}", line("takeover", &tally));
    assert!(sock.exists(), "the new process serves the upgrade socket");
    kill(new.id(), libc::SIGTERM);
    assert!(wait_until(Duration::from_secs(10), || matches!(
        new.try_wait(),
        Ok(Some(_))
    )));
    assert!(!sock.exists(), "a stopped meshd removes its upgrade socket");
}

/// A Swarm start-first update stops the old task as soon as the new one runs, which can be
/// while the new meshd still warms up on the listeners it received: the old one must keep
/// accepting until the new one is ready (then drain and exit 0), and the new one serves on.
#[test]
fn a_meshd_stopped_during_the_takeover_serves_until_its_successor_is_ready() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let sock = std::env::temp_dir().join(format!(
        "meshd-up-{}-{}.sock",
        std::process::id(),
        free_port()
    ));
    // A third service whose backend accepts and never answers its http check (timeout
    // 1.5 s): the new process's warm-up (its first health round) takes that long, which
    // keeps the hand-off open for the SIGTERM.
    let mute = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let slow = service_toml(
        "slow",
        addr(free_port()),
        &[mute.local_addr().unwrap()],
        "",
        "check = \"http\"\ninterval = \"2s\"\ntimeout = \"1500ms\"\nrise = 1\nfall = 1",
    );
    let top = format!("[upgrade]\nsocket = \"{}\"\n\n{slow}", sock.display());
    let mut b = bench(&top);
    let mut pids = Pids(vec![b.m.child.id()], Vec::new());
    let inode = listen_inode(b.web).unwrap();
    let load = load(b.web);
    thread::sleep(Duration::from_millis(500));

    let mut new = start_beside(&b.m);
    pids.0.push(new.id());
    // SIGTERM to the old one the moment the new one has asked for the listeners.
    assert!(
        wait_until(Duration::from_secs(15), || b
            .m
            .log_text()
            .contains("a new process asks for the listeners")),
        "{}",
        b.m.log_text()
    );
    kill(b.m.child.id(), libc::SIGTERM);
    assert!(
        wait_until(Duration::from_secs(15), || serving_pid(b.m.admin)
            == Some(new.id())),
        "{}",
        b.m.log_text()
    );
    thread::sleep(Duration::from_millis(500));
    let tally = load.stop();
    // Its keep-alive connections closed with the load: the old one has drained.
    assert_eq!(
        b.m.wait_exit(Duration::from_secs(30)),
        Some(0),
        "the old one exits 0 once it handed over: {}",
        b.m.log_text()
    );
    println!("{}", line("SIGTERM during takeover", &tally));
    let log = b.m.log_text();
    assert!(
        log.contains("SIGTERM during a hand-off"),
        "the SIGTERM came after the hand-off ended: the test did not test it\n{log}"
    );
    assert!(matches!(new.try_wait(), Ok(None)), "the new one serves on");
    assert_eq!(listen_inode(b.web), Some(inode));
    assert_eq!(tally.close.failed, 0, "{}", line("takeover", &tally));
    assert_eq!(tally.keepalive.failed, 0, "{}", line("takeover", &tally));
    kill(new.id(), libc::SIGTERM);
    assert!(wait_until(Duration::from_secs(10), || matches!(
        new.try_wait(),
        Ok(Some(_))
    )));
}
