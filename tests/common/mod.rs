//! Test harness: start the real `meshd` binary and real backend processes on ephemeral
//! loopback ports, wait on `/readyz` and on conditions instead of sleeping, read until EOF.
#![allow(dead_code)]

pub mod load;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_meshd");

/// A port that was free a moment ago (bound then released), never handed out before by
/// this test process: the kernel may give a released port to the next `bind(:0)`.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

pub fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Polls `f` every 20 ms until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "meshd-test-{tag}-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running meshd.
pub struct Meshd {
    pub child: Child,
    pub admin: SocketAddr,
    pub config: PathBuf,
    pub dir: TempDir,
    pub log: PathBuf,
}

impl Meshd {
    /// Writes `toml` (with `{admin}` replaced by a free admin address) and starts meshd;
    /// waits for /readyz.
    pub fn start(toml: &str) -> Meshd {
        Meshd::start_with(toml, |_| {})
    }

    pub fn start_with(toml: &str, tweak: impl FnOnce(&mut Command)) -> Meshd {
        let m = Meshd::spawn(toml, tweak);
        let ok = wait_until(Duration::from_secs(15), || {
            matches!(http_get(m.admin, "/readyz"), Some((200, _)))
        });
        assert!(ok, "meshd did not become ready; log:\n{}", m.log_text());
        m
    }

    /// Starts meshd without waiting for readiness.
    pub fn spawn(toml: &str, tweak: impl FnOnce(&mut Command)) -> Meshd {
        let dir = TempDir::new("meshd");
        let admin = addr(free_port());
        let text = toml.replace("{admin}", &admin.to_string());
        let text = if text.contains("[admin]") {
            text
        } else {
            format!("[admin]\nlisten = \"{admin}\"\n\n{text}")
        };
        let config = dir.0.join("mesh.toml");
        std::fs::write(&config, text).expect("write config");
        let log = dir.0.join("meshd.log");
        let logf = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(BIN);
        cmd.arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf);
        tweak(&mut cmd);
        let child = cmd.spawn().expect("spawn meshd");
        Meshd {
            child,
            admin,
            config,
            dir,
            log,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: i32) {
        // Not reaped yet (we hold the Child): the pid is still our child's.
        let _ = meshd::sys::send_signal(self.child.id(), sig);
    }

    /// Waits for exit; returns the exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let end = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// GET /api/v1/services. The admin API is how tests watch meshd: on a loaded machine
    /// (CI beside other builds) an answer that does not come is said and asked again, up to
    /// three times, and then the failure shows whether meshd still runs and its log's end.
    pub fn services(&self) -> serde_json::Value {
        for attempt in 1..=3 {
            let t = Instant::now();
            if let Some((code, body)) = http_get(self.admin, "/api/v1/services") {
                assert_eq!(code, 200, "{body}");
                return serde_json::from_str(&body).expect("json");
            }
            eprintln!(
                "admin {}: GET /api/v1/services got no answer (attempt {attempt}, {:?}); meshd: {}",
                self.admin,
                t.elapsed(),
                self.process_state()
            );
        }
        let log = self.log_text();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        panic!(
            "admin {} unreachable 3 times; meshd: {}; the end of its log:\n{}",
            self.admin,
            self.process_state(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }

    /// meshd's process state as /proc tells it ("R (running)", "Z (zombie)": exited).
    pub fn process_state(&self) -> String {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("State:").map(|v| v.trim().to_string()))
            })
            .unwrap_or_else(|| "gone".into())
    }

    pub fn backend(&self, service: &str, addr: &str) -> serde_json::Value {
        let s = self.services();
        s["services"]
            .as_array()
            .and_then(|v| v.iter().find(|x| x["name"] == service))
            .and_then(|svc| {
                svc["backends"]
                    .as_array()
                    .and_then(|b| b.iter().find(|b| b["addr"] == addr))
            })
            .cloned()
            .unwrap_or(serde_json::Value::Null)
    }

    pub fn healthy(&self, service: &str) -> u64 {
        let s = self.services();
        s["services"]
            .as_array()
            .and_then(|v| v.iter().find(|x| x["name"] == service))
            .and_then(|svc| svc["healthy_backends"].as_u64())
            .unwrap_or(0)
    }

    /// The sum of all samples of metric `name` whose labels contain every `k="v"` in `labels`.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let (_, text) = http_get(self.admin, "/metrics").expect("metrics");
        metric_sum(&text, name, labels)
    }
}

impl Drop for Meshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut sum = 0.0;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let (head, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let (n, l) = match head.find('{') {
            Some(i) => (&head[..i], &head[i..]),
            None => (head, ""),
        };
        if n != name {
            continue;
        }
        if labels
            .iter()
            .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        {
            sum += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    sum
}

/// A real backend process (`meshd backend`).
pub struct Backend {
    pub child: Child,
    pub addr: SocketAddr,
    pub name: String,
}

impl Backend {
    pub fn http(name: &str) -> Backend {
        Backend::start(name, "http", &[])
    }

    pub fn echo(name: &str) -> Backend {
        Backend::start(name, "echo", &[])
    }

    /// Starts a backend on a port the kernel picks (`--listen 127.0.0.1:0`) and waits for
    /// its "listening on ADDR" line: no port is picked here and raced for, and a connect
    /// that succeeds proves nothing (another socket may hold the port). With
    /// `--bind-delay` the backend is not listening yet, so it gets a port from
    /// `free_port()` instead.
    pub fn start(name: &str, mode: &str, extra: &[&str]) -> Backend {
        if extra.contains(&"--bind-delay") {
            return Backend::spawn_on(free_port(), name, mode, extra);
        }
        let mut child = Backend::command(addr(0), name, mode, extra)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn backend");
        let out = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = std::io::BufReader::new(out);
            let mut first = String::new();
            let _ = std::io::BufRead::read_line(&mut lines, &mut first);
            let _ = tx.send(first);
            // Keep the pipe drained (and open) for the backend's life.
            let _ = std::io::copy(&mut lines, &mut std::io::sink());
        });
        let line = rx.recv_timeout(Duration::from_secs(10)).unwrap_or_default();
        let addr: SocketAddr = line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| {
                let _ = child.kill();
                panic!("backend {name} did not start: first line {line:?}")
            });
        Backend {
            child,
            addr,
            name: name.to_string(),
        }
    }

    pub fn spawn_on(port: u16, name: &str, mode: &str, extra: &[&str]) -> Backend {
        Backend::spawn_on_addr(addr(port), name, mode, extra)
    }

    pub fn spawn_on_addr(addr: SocketAddr, name: &str, mode: &str, extra: &[&str]) -> Backend {
        let child = Backend::command(addr, name, mode, extra)
            .spawn()
            .expect("spawn backend");
        Backend {
            child,
            addr,
            name: name.to_string(),
        }
    }

    fn command(addr: SocketAddr, name: &str, mode: &str, extra: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args([
            "backend",
            "--listen",
            &addr.to_string(),
            "--name",
            name,
            "--mode",
            mode,
        ])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        c
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One HTTP/1.1 GET with `Connection: close`; returns (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    http_request(addr, "GET", path, &[], "")
}

pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let code = text.split(' ').nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    Some((code, body))
}

/// GET / through the proxy; returns the answering backend's name (its body).
pub fn who(addr: SocketAddr) -> Option<String> {
    match http_get(addr, "/") {
        Some((200, body)) => Some(body.trim().to_string()),
        _ => None,
    }
}

/// The one builder of `[[service]]` tables in the tests: `Svc::new("web", listen)`
/// `.backends(&[a, b])`, `.weighted(a, 3)`, `.local(&[a])` (`local = true`), `.set("drain_timeout = \"1s\"")` (raw lines
/// into the service), `.health("check = \"tcp\"")` (the `[service.health]` body; `check =
/// "none"` unless set). `Display` writes the TOML.
#[derive(Clone)]
pub struct Svc {
    name: String,
    listen: Vec<SocketAddr>,
    backends: Vec<(SocketAddr, Option<u32>)>,
    /// Backends written with `local = true`.
    locals: Vec<SocketAddr>,
    lines: Vec<String>,
    health: String,
}

impl Svc {
    pub fn new(name: &str, listen: SocketAddr) -> Svc {
        Svc {
            name: name.to_owned(),
            listen: vec![listen],
            backends: Vec::new(),
            locals: Vec::new(),
            lines: Vec::new(),
            health: "check = \"none\"".to_owned(),
        }
    }

    /// Another listen address.
    pub fn listen(mut self, a: SocketAddr) -> Svc {
        self.listen.push(a);
        self
    }

    pub fn backends(mut self, addrs: &[SocketAddr]) -> Svc {
        self.backends.extend(addrs.iter().map(|a| (*a, None)));
        self
    }

    pub fn weighted(mut self, addr: SocketAddr, weight: u32) -> Svc {
        self.backends.push((addr, Some(weight)));
        self
    }

    /// Backends on this node (`local = true`, for `locality`).
    pub fn local(mut self, addrs: &[SocketAddr]) -> Svc {
        self.backends.extend(addrs.iter().map(|a| (*a, None)));
        self.locals.extend(addrs);
        self
    }

    /// Raw lines into the service table (`key = value`, one or more).
    pub fn set(mut self, lines: &str) -> Svc {
        if !lines.is_empty() {
            self.lines.push(lines.to_owned());
        }
        self
    }

    /// The `[service.health]` table's body.
    pub fn health(mut self, body: &str) -> Svc {
        self.health = body.to_owned();
        self
    }
}

impl std::fmt::Display for Svc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let listen: Vec<String> = self.listen.iter().map(|a| format!("\"{a}\"")).collect();
        let backends: Vec<String> = self
            .backends
            .iter()
            .map(|(a, w)| {
                let weight = w.map(|w| format!(", weight = {w}")).unwrap_or_default();
                let local = if self.locals.contains(a) {
                    ", local = true"
                } else {
                    ""
                };
                format!("{{ addr = \"{a}\"{weight}{local} }}")
            })
            .collect();
        writeln!(f, "[[service]]\nname = \"{}\"", self.name)?;
        writeln!(f, "listen = [{}]", listen.join(", "))?;
        writeln!(f, "backends = [{}]", backends.join(", "))?;
        for l in &self.lines {
            writeln!(f, "{l}")?;
        }
        writeln!(f, "[service.health]\n{}\n", self.health)
    }
}

/// A `[[service]]` table: `extra` lines go into the service, `health` into its
/// `[service.health]` (shorthand for [`Svc`]).
pub fn service_toml(
    name: &str,
    listen: SocketAddr,
    backends: &[SocketAddr],
    extra: &str,
    health: &str,
) -> String {
    Svc::new(name, listen)
        .backends(backends)
        .set(extra)
        .health(health)
        .to_string()
}

/// The inode of the socket bound to `addr` in `/proc/net/{table}` (`tcp` or `udp`; IPv4),
/// in socket state `state` when given (`"0A"`: listening): the same inode before and after
/// an upgrade is the same socket, handed over, never re-bound.
///
/// Looked for in up to 20 reads, 10 ms apart: the kernel renders these tables a page at
/// a time, and sockets opened and closed between two pages (parallel tests make
/// thousands) shift the rest, so one read can skip the socket sought.
pub fn socket_inode(table: &str, addr: SocketAddr, state: Option<&str>) -> Option<u64> {
    for _ in 0..20 {
        if let Some(inode) = socket_inode_once(table, addr, state) {
            return Some(inode);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

fn socket_inode_once(table: &str, addr: SocketAddr, state: Option<&str>) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/net/{table}")).ok()?;
    let SocketAddr::V4(a) = addr else { return None };
    let want = format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes(a.ip().octets()),
        a.port()
    );
    text.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(1) == Some(&want.as_str()) && state.is_none_or(|st| f.get(3) == Some(&st)))
            .then(|| f.get(9)?.parse().ok())
            .flatten()
    })
}
