//! Swarm's phases, locally, against servers nobody here wrote, overloaded on purpose
//! (issue #11). meshd's own backend is polite (a large backlog, drains on SIGTERM); the
//! tasks users run are not:
//!
//! - **busybox httpd** (`busybox httpd -f`): a fork per connection, a listen backlog of 9,
//!   closes after each response, and — run as `sh -c 'trap "" TERM; exec busybox httpd'`,
//!   like PID 1 in a `FROM scratch` image — ignores SIGTERM until it is killed;
//! - **python's `http.server`** (`python3 -m http.server`, a thread per connection, a listen
//!   backlog of 5, HTTP/1.0: closes after each response): exits at once on SIGTERM;
//! - **nginx** (`listen ... backlog=4`, one worker with 16 `worker_connections`, so it stops
//!   accepting under load and reuses idle keep-alive connections): stopped with SIGQUIT (the
//!   official image's `STOPSIGNAL`), a graceful stop that closes idle keep-alive connections.
//!
//! Each runs as three "tasks" (processes on ephemeral loopback ports, each in its own
//! process group) behind the real meshd with static backends and default data-plane
//! settings (`connect_timeout`, `connect_retries`, hedging, ejection; a tcp health check
//! every 500 ms) — except that nginx's service opts in to `retry_on_early_close` (see
//! `Kind::service_extra`). An orchestrator changes the backends the way Swarm does, by rewriting mesh.toml
//! and sending SIGHUP: a removed task is unlisted first, gets its stop signal 2 s later and
//! is killed 1.5 s after that if it is still running (Swarm: 2 s, then the stop grace).
//! Phases: baseline; a stop-first update; a start-first update; scale 3 -> 6; scale 6 -> 3;
//! a stop-first update to a release whose process exits at once, rolled back.
//!
//! Load for the whole run: 20 clients with one connection per request and 20 over
//! keep-alive connections, back to back (see `common::load` for what counts as failed).
//! Under it these backends' listen queues overflow and the kernel drops SYNs (the
//! host-wide `TcpExtListenOverflows` count is printed per phase). Every phase must have
//! 0 failed requests, of either kind: each of these servers closes idle connections
//! cleanly (busybox and python after every response, nginx on reuse and on SIGQUIT), so a
//! keep-alive failure is meshd's too. The table (requests, failures, meshd's /metrics
//! deltas) is printed for every phase before the assertions, failing or not.
//!
//! The tools come from scripts/setup.sh (busybox-static, nginx-light). The three tests
//! take the machine one at a time (~40 s each).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use common::load::{Load, LoadOpts, Tally};
use common::*;

/// One test at a time: the point is to overload the backends, not each other's.
static SERIAL: Mutex<()> = Mutex::new(());

/// Tasks at the start, and after scaling down.
const TASKS: usize = 3;
/// The least time a phase runs under load.
const PHASE: Duration = Duration::from_secs(3);
/// Between unlisting a task and its stop signal (Swarm: 2 s).
const STOP_WINDOW: Duration = Duration::from_secs(2);
/// Between the stop signal and SIGKILL (Swarm's stop grace period, shortened).
const GRACE: Duration = Duration::from_millis(1500);
/// How long the orchestrator watches a new release before rolling it back.
const MONITOR: Duration = Duration::from_secs(2);
const HEALTHY_WITHIN: Duration = Duration::from_secs(15);
/// meshd's health check: tcp, as by default, every 500 ms so tasks are admitted quickly.
const HEALTH: &str =
    "check = \"tcp\"\ninterval = \"500ms\"\ntimeout = \"500ms\"\nrise = 2\nfall = 2";

#[test]
fn busybox_httpd_ignoring_sigterm_through_a_rolling_update_under_overload() {
    rolling(Kind::Busybox);
}

#[test]
fn python_http_server_exiting_on_sigterm_through_a_rolling_update_under_overload() {
    rolling(Kind::Python);
}

#[test]
fn nginx_with_a_backlog_of_4_through_a_rolling_update_under_overload() {
    rolling(Kind::Nginx);
}

// === the scenario ===

fn rolling(kind: Kind) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    kind.check_installed();
    let mut o = Orchestrator::start(kind);
    let load = Load::start(
        o.listen,
        LoadOpts {
            close_clients: 20,
            keepalive_clients: 20,
            request_timeout: Duration::from_secs(5),
            pace: Duration::ZERO,
            max_run: Duration::from_secs(150),
        },
    );
    let mut p = Phases::new(&o.meshd, load, kind);

    p.run("baseline 3 x v1", &mut o, |_| {});
    p.run("stop-first v1->v2", &mut o, |o| {
        for old in o.listed() {
            o.remove(&[old], false);
            let new = o.spawn("v2");
            o.publish();
            o.wait_healthy(&[new]);
        }
    });
    p.run("start-first v2->v3", &mut o, |o| {
        for old in o.listed() {
            let new = o.spawn("v3");
            o.publish();
            o.wait_healthy(&[new]);
            o.remove(&[old], true);
        }
        o.join_stoppers();
    });
    p.run("scale 3->6", &mut o, |o| {
        let new: Vec<String> = (0..TASKS).map(|_| o.spawn("v3")).collect();
        o.publish();
        o.wait_healthy(&new);
    });
    p.run("scale 6->3", &mut o, |o| {
        let gone: Vec<String> = o.listed().into_iter().skip(TASKS).collect();
        o.remove(&gone, true);
        o.join_stoppers();
    });
    p.run("v4 exits at once, rolled back", &mut o, |o| {
        // Stop-first (Swarm's default order): one v3 task goes, the broken v4 comes.
        let old = o.listed()[0].clone();
        o.remove(&[old], false);
        let broken = o.spawn_broken("v4");
        o.publish();
        thread::sleep(MONITOR);
        let b = o.meshd.backend("web", &o.addr_of(&broken).to_string());
        assert_ne!(b["health"], "up", "a task that exited was admitted: {b}");
        // Rolled back, stop-first again: the dead v4 task goes, a v3 task comes.
        o.forget(&broken);
        let new = o.spawn("v3");
        o.publish();
        o.wait_healthy(&[new]);
    });
    let rows = p.finish();

    let mut problems = Vec::new();
    for r in &rows {
        if r.tally.close.requests == 0 || r.tally.keepalive.requests == 0 {
            problems.push(format!("{}: no requests of one kind", r.phase));
        }
        if r.tally.close.failed > 0 {
            problems.push(format!(
                "{}: {} of {} connection-per-request requests failed",
                r.phase, r.tally.close.failed, r.tally.close.requests
            ));
        }
        if r.tally.keepalive.failed > 0 {
            problems.push(format!(
                "{}: {} of {} keep-alive requests failed",
                r.phase, r.tally.keepalive.failed, r.tally.keepalive.requests
            ));
        }
    }
    let versions = |r: &Row| r.tally.answers_by(|b| version_of(b).to_string());
    for (i, v) in [(1, "v2"), (2, "v3")] {
        if !versions(&rows[i]).contains_key(v) {
            problems.push(format!("{}: {v} never answered", rows[i].phase));
        }
    }
    if versions(&rows[5]).contains_key("v4") {
        problems.push("the broken v4 answered".into());
    }
    assert!(
        problems.is_empty(),
        "{kind:?}: {}\n--- meshd warnings ---\n{}",
        problems.join("; "),
        warnings(&o.meshd.log_text(), 30)
    );
}

// === backend kinds ===

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Busybox,
    Python,
    Nginx,
}

impl Kind {
    fn check_installed(self) {
        let (bin, arg, pkg) = match self {
            Kind::Busybox => ("busybox", "true", "busybox-static"),
            Kind::Python => ("python3", "--version", "python3"),
            Kind::Nginx => (nginx(), "-v", "nginx-light"),
        };
        let ok = Command::new(bin)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "{bin} is needed ({pkg}; scripts/setup.sh installs it)");
    }

    /// Service settings beyond meshd's defaults. nginx, out of `worker_connections`, closes
    /// connections that are still waiting for their request ("reusing connections"): the
    /// backend closes before sending a byte, which no connect-side fix can hide. An HTTP
    /// service whose requests are idempotent opts in to replaying them
    /// (`retry_on_early_close`); `MESHD_RUDE_NO_REPLAY=1` runs nginx without it, to see
    /// those failures. busybox and python run with the defaults.
    fn service_extra(self) -> &'static str {
        match self {
            Kind::Nginx if std::env::var_os("MESHD_RUDE_NO_REPLAY").is_none() => {
                "retry_on_early_close = true"
            }
            _ => "",
        }
    }

    /// What the orchestrator sends first to stop a task.
    fn stop_signal(self) -> i32 {
        match self {
            // Ignored: the task is killed after the grace period.
            Kind::Busybox => libc::SIGTERM,
            Kind::Python => libc::SIGTERM,
            // The official nginx image's STOPSIGNAL: graceful.
            Kind::Nginx => libc::SIGQUIT,
        }
    }

    fn command(self, dir: &Path, addr: SocketAddr) -> Command {
        match self {
            Kind::Busybox => {
                let mut c = Command::new("busybox");
                // An ignored signal stays ignored across exec: httpd never sees SIGTERM,
                // like PID 1 without a handler.
                c.args([
                    "sh",
                    "-c",
                    "trap '' TERM; exec busybox httpd -f -p \"$0\" -h \"$1\"",
                ])
                .arg(addr.to_string())
                .arg(dir.join("www"));
                c
            }
            Kind::Python => {
                let mut c = Command::new("python3");
                c.args(["-m", "http.server", "--bind", "127.0.0.1", "--directory"])
                    .arg(dir.join("www"))
                    .arg(addr.port().to_string());
                c
            }
            Kind::Nginx => {
                let conf = nginx_conf(dir, addr);
                std::fs::write(dir.join("nginx.conf"), conf).unwrap();
                let mut c = Command::new(nginx());
                c.arg("-p")
                    .arg(dir)
                    .arg("-c")
                    .arg(dir.join("nginx.conf"))
                    .arg("-e")
                    .arg(dir.join("error.log"));
                c
            }
        }
    }

    /// A release whose process exits at once.
    fn broken_command(self, dir: &Path, addr: SocketAddr) -> Command {
        match self {
            Kind::Nginx => {
                // A typo in the config: nginx exits 1 with "unknown directive".
                let conf = nginx_conf(dir, addr).replace("keepalive_timeout", "keepalive_timout");
                std::fs::write(dir.join("nginx.conf"), conf).unwrap();
                let mut c = Command::new(nginx());
                c.arg("-p")
                    .arg(dir)
                    .arg("-c")
                    .arg(dir.join("nginx.conf"))
                    .arg("-e")
                    .arg(dir.join("error.log"));
                c
            }
            _ => {
                let mut c = Command::new("sh");
                c.args(["-c", "echo 'broken release: exiting' >&2; exit 1"]);
                c
            }
        }
    }
}

fn nginx() -> &'static str {
    if Path::new("/usr/sbin/nginx").exists() {
        "/usr/sbin/nginx"
    } else {
        "nginx"
    }
}

fn nginx_conf(dir: &Path, addr: SocketAddr) -> String {
    let d = dir.display();
    format!(
        "daemon off;\nmaster_process on;\nworker_processes 1;\npid {d}/nginx.pid;\n\
         error_log {d}/error.log warn;\n\
         events {{ worker_connections 16; }}\n\
         http {{\n  access_log off;\n  keepalive_timeout 2s;\n\
           client_body_temp_path {d}/tmp;\n  proxy_temp_path {d}/tmp;\n  fastcgi_temp_path {d}/tmp;\n\
           uwsgi_temp_path {d}/tmp;\n  scgi_temp_path {d}/tmp;\n\
           server {{\n    listen {addr} backlog=4;\n    root {d}/www;\n  }}\n}}\n"
    )
}

/// `web.v2.5` -> `v2`.
fn version_of(name: &str) -> &str {
    name.split('.').nth(1).unwrap_or("?")
}

// === tasks ===

struct Task {
    name: String,
    addr: SocketAddr,
    kind: Kind,
    child: Child,
    listed: bool,
    _dir: TempDir,
}

impl Task {
    fn start(kind: Kind, name: &str) -> Task {
        for _ in 0..5 {
            let (dir, addr) = task_dir(name);
            let mut child = spawn(kind.command(&dir.0, addr), &dir.0);
            let up = wait_until(Duration::from_secs(15), || {
                matches!(child.try_wait(), Ok(Some(_)))
                    || std::net::TcpStream::connect(addr).is_ok()
            });
            if matches!(child.try_wait(), Ok(Some(_))) {
                // The port was taken before it bound: try another.
                continue;
            }
            assert!(
                up,
                "task {name} ({kind:?}) did not start listening on {addr}"
            );
            return Task {
                name: name.to_string(),
                addr,
                kind,
                child,
                listed: true,
                _dir: dir,
            };
        }
        panic!("task {name}: could not start on 5 ports in a row");
    }

    fn start_broken(kind: Kind, name: &str) -> Task {
        let (dir, addr) = task_dir(name);
        let mut child = spawn(kind.broken_command(&dir.0, addr), &dir.0);
        assert!(
            wait_until(Duration::from_secs(10), || matches!(
                child.try_wait(),
                Ok(Some(_))
            )),
            "the broken task {name} did not exit"
        );
        Task {
            name: name.to_string(),
            addr,
            kind,
            child,
            listed: true,
            _dir: dir,
        }
    }

    fn signal(&self, sig: i32) {
        // Not reaped yet (we hold the Child): the pid is still our child's.
        let _ = meshd::sys::send_signal(self.child.id(), sig);
    }

    /// The stop signal, then SIGKILL after `GRACE`; then whatever is left of its process
    /// group (a container's end).
    fn stop(mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.signal(self.kind.stop_signal());
            let end = Instant::now() + GRACE;
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < end {
                thread::sleep(Duration::from_millis(10));
            }
        }
        // Drop kills the group.
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        // The process group this test created for the task.
        let _ = meshd::sys::signal_group(self.child.id(), libc::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn task_dir(name: &str) -> (TempDir, SocketAddr) {
    let dir = TempDir::new(&format!("rude-{name}"));
    std::fs::create_dir_all(dir.0.join("www")).unwrap();
    std::fs::create_dir_all(dir.0.join("tmp")).unwrap();
    std::fs::write(dir.0.join("www/index.html"), format!("{name}\n")).unwrap();
    (dir, addr(free_port()))
}

fn spawn(mut cmd: Command, dir: &Path) -> Child {
    let log = std::fs::File::create(dir.join("task.log")).unwrap();
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .process_group(0)
        .spawn()
        .expect("spawn a task")
}

// === the orchestrator ===

struct Orchestrator {
    kind: Kind,
    meshd: Meshd,
    listen: SocketAddr,
    tasks: Vec<Task>,
    next_id: u32,
    /// Tasks being stopped in the background (start-first, scale down).
    stoppers: Vec<thread::JoinHandle<()>>,
    /// Every task's name by address, for the diagnosis of a failing phase.
    names: BTreeMap<String, String>,
}

impl Orchestrator {
    fn start(kind: Kind) -> Orchestrator {
        let tasks: Vec<Task> = (1..=TASKS)
            .map(|i| Task::start(kind, &format!("web.v1.{i}")))
            .collect();
        let listen = addr(free_port());
        let meshd = Meshd::start(&config_text(kind, listen, &tasks));
        let mut o = Orchestrator {
            kind,
            meshd,
            listen,
            tasks,
            next_id: TASKS as u32 + 1,
            stoppers: Vec::new(),
            names: BTreeMap::new(),
        };
        for t in &o.tasks {
            o.names.insert(t.addr.to_string(), t.name.clone());
        }
        let names = o.listed();
        o.wait_healthy(&names);
        o
    }

    fn listed(&self) -> Vec<String> {
        self.tasks
            .iter()
            .filter(|t| t.listed)
            .map(|t| t.name.clone())
            .collect()
    }

    fn addr_of(&self, name: &str) -> SocketAddr {
        self.tasks.iter().find(|t| t.name == name).unwrap().addr
    }

    /// Starts a task (listed at the next publish); returns its name.
    fn spawn(&mut self, version: &str) -> String {
        let name = format!("web.{version}.{}", self.next_id);
        self.next_id += 1;
        let t = Task::start(self.kind, &name);
        self.names.insert(t.addr.to_string(), name.clone());
        self.tasks.push(t);
        name
    }

    fn spawn_broken(&mut self, version: &str) -> String {
        let name = format!("web.{version}.{}", self.next_id);
        self.next_id += 1;
        let t = Task::start_broken(self.kind, &name);
        self.names.insert(t.addr.to_string(), name.clone());
        self.tasks.push(t);
        name
    }

    /// Rewrites mesh.toml with the listed tasks (temp file + rename) and sends SIGHUP;
    /// returns once meshd shows the listed ones active and the others not.
    fn publish(&self) {
        let text = config_text(self.kind, self.listen, &self.tasks);
        let text = format!("[admin]\nlisten = \"{}\"\n\n{text}", self.meshd.admin);
        let tmp = self.meshd.config.with_extension("toml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.meshd.config).unwrap();
        self.meshd.signal(libc::SIGHUP);
        let applied = wait_until(Duration::from_secs(10), || {
            let s = self.meshd.services();
            let backends = s["services"][0]["backends"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let active = |a: SocketAddr| {
                backends
                    .iter()
                    .any(|b| b["addr"] == a.to_string() && b["state"] == "active")
            };
            self.tasks.iter().all(|t| active(t.addr) == t.listed)
        });
        assert!(
            applied,
            "meshd did not apply the reload: {}",
            self.meshd.services()
        );
    }

    /// Polls meshd until every task named is reported healthy.
    fn wait_healthy(&self, names: &[String]) {
        let ok = wait_until(HEALTHY_WITHIN, || {
            names.iter().all(|n| {
                let b = self.meshd.backend("web", &self.addr_of(n).to_string());
                b["health"] == "up"
            })
        });
        assert!(
            ok,
            "{names:?} not healthy within {HEALTHY_WITHIN:?}: {}",
            self.meshd.services()
        );
    }

    /// Swarm's order: unlist (meshd drains them), `STOP_WINDOW` later the stop signal,
    /// SIGKILL after `GRACE`. In the background if `background`, else before returning.
    fn remove(&mut self, names: &[String], background: bool) {
        for t in self.tasks.iter_mut().filter(|t| names.contains(&t.name)) {
            t.listed = false;
        }
        self.publish();
        let (gone, keep): (Vec<Task>, Vec<Task>) = std::mem::take(&mut self.tasks)
            .into_iter()
            .partition(|t| names.contains(&t.name));
        self.tasks = keep;
        let stop = move || {
            thread::sleep(STOP_WINDOW);
            let hs: Vec<_> = gone
                .into_iter()
                .map(|t| thread::spawn(move || t.stop()))
                .collect();
            for h in hs {
                let _ = h.join();
            }
        };
        if background {
            self.stoppers.push(thread::spawn(stop));
        } else {
            stop();
        }
    }

    /// Unlists a task that is already dead.
    fn forget(&mut self, name: &str) {
        for t in self.tasks.iter_mut().filter(|t| t.name == name) {
            t.listed = false;
        }
        self.publish();
        self.tasks.retain(|t| t.name != name);
    }

    fn join_stoppers(&mut self) {
        for h in self.stoppers.drain(..) {
            let _ = h.join();
        }
    }
}

fn config_text(kind: Kind, listen: SocketAddr, tasks: &[Task]) -> String {
    let backends: Vec<SocketAddr> = tasks.iter().filter(|t| t.listed).map(|t| t.addr).collect();
    service_toml("web", listen, &backends, kind.service_extra(), HEALTH)
}

// === phases, rows ===

/// meshd's counters (and two log lines) at one instant.
#[derive(Debug, Default, Clone, Copy)]
struct Snapshot {
    no_backend: f64,
    timeout: f64,
    refused: f64,
    reset: f64,
    retries: f64,
    /// `None` while this meshd has no such metric (panic routing, hedging and replay on
    /// early close are newer than this test).
    panic: Option<f64>,
    hedged: Option<f64>,
    replayed: Option<f64>,
    ejected: usize,
    down: usize,
    overflows: u64,
}

impl Snapshot {
    fn take(m: &Meshd) -> Snapshot {
        let (_, text) = http_get(m.admin, "/metrics").expect("metrics");
        let log = m.log_text();
        let errors =
            |reason: &str| metric_sum(&text, "meshd_connect_errors_total", &[("reason", reason)]);
        Snapshot {
            no_backend: metric_sum(
                &text,
                "meshd_rejected_connections_total",
                &[("reason", "no_backend")],
            ),
            timeout: errors("timeout"),
            refused: errors("refused"),
            reset: errors("reset"),
            retries: metric_sum(&text, "meshd_connect_retries_total", &[]),
            panic: optional(&text, "meshd_panic_connections_total"),
            hedged: optional(&text, "meshd_hedged_connects_total"),
            replayed: optional(&text, "meshd_replayed_connections_total"),
            ejected: log.matches("backend ejected after").count(),
            down: log.matches("backend down: health check failed").count(),
            overflows: listen_overflows(),
        }
    }
}

/// `meshd_connect_errors_total` by (backend, reason).
fn backend_errors(m: &Meshd) -> BTreeMap<(String, String), f64> {
    let (_, text) = http_get(m.admin, "/metrics").expect("metrics");
    let label = |l: &str, k: &str| -> String {
        l.split(&format!("{k}=\""))
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or_default()
            .to_string()
    };
    let mut m = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("meshd_connect_errors_total{"))
    {
        let Some((head, v)) = line.rsplit_once(' ') else {
            continue;
        };
        let v: f64 = v.parse().unwrap_or(0.0);
        *m.entry((label(head, "backend"), label(head, "reason")))
            .or_default() += v;
    }
    m
}

fn optional(text: &str, name: &str) -> Option<f64> {
    text.contains(name).then(|| metric_sum(text, name, &[]))
}

/// The host's `TcpExtListenOverflows`: SYNs dropped because a listen queue was full.
fn listen_overflows() -> u64 {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("TcpExt:")).collect();
    if lines.len() < 2 {
        return 0;
    }
    let names = lines[0].split_whitespace();
    let values = lines[1].split_whitespace();
    names
        .zip(values)
        .find(|(n, _)| *n == "ListenOverflows")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

struct Row {
    phase: &'static str,
    tally: Tally,
    secs: f64,
    d: Snapshot,
}

struct Phases {
    load: Option<Load>,
    kind: Kind,
    started: Instant,
    at_start: Snapshot,
    /// `meshd_connect_errors_total` by (backend, reason) when the phase began.
    errors_at_start: BTreeMap<(String, String), f64>,
    rows: Vec<Row>,
}

impl Phases {
    fn new(meshd: &Meshd, load: Load, kind: Kind) -> Phases {
        println!("{kind:?}: {}", header());
        Phases {
            load: Some(load),
            kind,
            started: Instant::now(),
            at_start: Snapshot::take(meshd),
            errors_at_start: backend_errors(meshd),
            rows: Vec::new(),
        }
    }

    /// Runs `action` under the load; the phase lasts at least `PHASE`, and a second more
    /// after the action (so its effect is measured).
    fn run(
        &mut self,
        phase: &'static str,
        o: &mut Orchestrator,
        action: impl FnOnce(&mut Orchestrator),
    ) {
        action(o);
        let end = (self.started + PHASE).max(Instant::now() + Duration::from_secs(1));
        thread::sleep(end.saturating_duration_since(Instant::now()));
        let tally = self.load.as_ref().unwrap().next_phase();
        self.close(phase, tally, o);
    }

    fn close(&mut self, phase: &'static str, tally: Tally, o: &Orchestrator) {
        let meshd = &o.meshd;
        let now = Snapshot::take(meshd);
        let errors = backend_errors(meshd);
        let a = self.at_start;
        let d = Snapshot {
            no_backend: now.no_backend - a.no_backend,
            timeout: now.timeout - a.timeout,
            refused: now.refused - a.refused,
            reset: now.reset - a.reset,
            retries: now.retries - a.retries,
            panic: now.panic.map(|p| p - a.panic.unwrap_or(0.0)),
            hedged: now.hedged.map(|p| p - a.hedged.unwrap_or(0.0)),
            replayed: now.replayed.map(|p| p - a.replayed.unwrap_or(0.0)),
            ejected: now.ejected - a.ejected,
            down: now.down - a.down,
            overflows: now.overflows - a.overflows,
        };
        let row = Row {
            phase,
            tally,
            secs: self.started.elapsed().as_secs_f64(),
            d,
        };
        println!("{:?}: {}", self.kind, row.format());
        if row.tally.close.failed + row.tally.keepalive.failed > 0 {
            // Which backend failed how, and where meshd left each one.
            let s = meshd.services();
            let listed = s["services"][0]["backends"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let mut by_backend: BTreeMap<&str, Vec<String>> = BTreeMap::new();
            for ((b, reason), n) in &errors {
                let d = n - self
                    .errors_at_start
                    .get(&(b.clone(), reason.clone()))
                    .unwrap_or(&0.0);
                if d > 0.0 {
                    by_backend
                        .entry(b)
                        .or_default()
                        .push(format!("{reason}+{d}"));
                }
            }
            for b in &listed {
                let addr = b["addr"].as_str().unwrap_or_default();
                by_backend.entry(addr).or_default();
            }
            let mut line = String::new();
            for (addr, errs) in &by_backend {
                let name = o.names.get(*addr).map_or("?", String::as_str);
                let status =
                    listed
                        .iter()
                        .find(|b| b["addr"] == *addr)
                        .map_or("gone".to_string(), |b| {
                            format!(
                                "{}/{}/{}",
                                b["state"].as_str().unwrap_or("?"),
                                b["health"].as_str().unwrap_or("?"),
                                b["status"].as_str().unwrap_or("?")
                            )
                        });
                let _ = write!(line, "{name} {status} [{}]; ", errs.join(" "));
            }
            println!(
                "{:?}:   connect errors by backend, state at the end: {}",
                self.kind,
                line.trim_end()
            );
        }
        self.errors_at_start = errors;
        self.rows.push(row);
        self.at_start = now;
        self.started = Instant::now();
    }

    fn finish(mut self) -> Vec<Row> {
        if let Some(load) = self.load.take() {
            drop(load.stop());
        }
        self.rows
    }
}

fn header() -> String {
    format!(
        "{:<30} | {:>4} | {:>6} {:>6} | {:>6} {:>6} {:>5} | {:>6} {:>7} {:>7} {:>5} {:>7} {:>5} {:>6} {:>6} | {:>5} {:>4} | {:>8} | versions; errors",
        "phase", "s", "close", "failed", "k-a", "failed", "retry", "no_bk", "timeout", "refused", "reset", "retries", "panic", "hedged", "replay", "eject", "down", "overflow"
    )
}

impl Row {
    fn format(&self) -> String {
        let t = &self.tally;
        let d = &self.d;
        let versions: BTreeMap<String, u64> = t.answers_by(|b| version_of(b).to_string());
        let mut v = String::new();
        for (k, n) in &versions {
            let _ = write!(v, "{k}={n} ");
        }
        format!(
            "{:<30} | {:>4.1} | {:>6} {:>6} | {:>6} {:>6} {:>5} | {:>6} {:>7} {:>7} {:>5} {:>7} {:>5} {:>6} {:>6} | {:>5} {:>4} | {:>8} | {}; {}",
            self.phase,
            self.secs,
            t.close.requests,
            t.close.failed,
            t.keepalive.requests,
            t.keepalive.failed,
            t.keepalive.retried,
            d.no_backend,
            d.timeout,
            d.refused,
            d.reset,
            d.retries,
            opt(d.panic),
            opt(d.hedged),
            opt(d.replayed),
            d.ejected,
            d.down,
            d.overflows,
            v.trim_end(),
            t.errors_line()
        )
    }
}

fn opt(v: Option<f64>) -> String {
    v.map_or("-".to_string(), |v| v.to_string())
}

/// The last `n` warning lines of meshd's log.
fn warnings(log: &str, n: usize) -> String {
    let w: Vec<&str> = log.lines().filter(|l| l.contains("WARN")).collect();
    w[w.len().saturating_sub(n)..].join("\n")
}
