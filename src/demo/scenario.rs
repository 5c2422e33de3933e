//! `meshd demo`: meshd's reason to exist, shown on one machine in about a minute — zero
//! failed requests while a service is scaled up and down, updated twice, given a broken
//! release, and loses a task to `kill -9`.
//!
//! Everything is real and on loopback: a `meshd` child process with its own `mesh.toml`,
//! backend task processes (this binary's hidden `backend` subcommand, see
//! [`super::backend`]), and HTTP/1.1 clients over TCP. No Docker, no network.
//!
//! # The cast
//!
//! - **meshd**: `meshd --config DIR/mesh.toml`, one service `web`, round robin, an HTTP
//!   health check on `/healthz` every 200 ms (timeout 200 ms, rise 2, fall 2),
//!   `drain_timeout` 5 s, `connect_retries` 2, `slow_start` 1 s. It logs to `DIR/meshd.log`
//!   (the last lines are printed if the demo fails).
//! - **tasks**: `meshd backend --name web.vN.K`, each on a fresh port. A task binds its port
//!   400 ms after it starts (a slow app), answers every request with its name, and on
//!   SIGTERM finishes in-flight requests, closes idle keep-alive connections and exits.
//!   Version 3 is broken: its `/healthz` answers 503.
//! - **the orchestrator** (this module) does what Docker Swarm does, in Swarm's order:
//!   - *add a task*: start the process, list it in `mesh.toml`; meshd health-gates it. The
//!     orchestrator polls `GET /api/v1/services` until meshd reports it healthy.
//!   - *remove a task*: unlist it (meshd drains it: no new connection), wait 1 s (Swarm
//!     waits 2 s between unpublishing a task and its stop signal), SIGTERM it, reap it. A
//!     task meshd still calls active after that window is reported as a failure of the
//!     phase, even though meshd's connect retries would hide it from the clients.
//!
//!   `mesh.toml` is rewritten as a temp file renamed over the old one; meshd reloads it on
//!   the change (no SIGHUP).
//! - **the load**: `--clients` concurrent clients for the whole run, half keep-alive
//!   (HTTP/1.1, one connection reused), half one connection per request
//!   (`Connection: close`), each sending `GET /` then pausing 10 ms: a bounded load.
//!
//! # The phases (each lasts at least `--phase`, longer if its action takes longer)
//!
//! 1. `baseline 2 x v1`: two v1 tasks.
//! 2. `scale 2->6`: four tasks added at once.
//! 3. `scale 6->2`: four tasks removed at once.
//! 4. `update v1->v2 stop-first`: per task: remove the old one, add a v2, wait until healthy.
//! 5. `update v2->v1 start-first`: per task: add a v1, wait until healthy, remove the old one.
//! 6. `broken v3 rolled back`: two v3 tasks added (start-first); they never pass the health
//!    check; after watching them for 2 s the orchestrator sees them unhealthy and removes
//!    them. No request may be answered by v3.
//! 7. `kill -9 one task`: SIGKILL, no drain. Only connections open on that task at that
//!    instant may fail; meshd retries new connections elsewhere. Once meshd has noticed
//!    (ejected or health down), the orchestrator unlists it and adds a replacement.
//! 8. `rude tasks: busybox httpd`: tasks nobody here wrote, overloaded on purpose. Two
//!    busybox httpd tasks (`busybox httpd -f`: a fork per connection, a listen backlog of
//!    9, closes after each response, and run as `sh -c 'trap "" TERM; exec busybox httpd'`
//!    it ignores SIGTERM, like PID 1 in a `FROM scratch` image) replace the v1 tasks
//!    (start-first), then are updated `bb1 -> bb2` stop-first: unlisted, SIGTERM 1 s later
//!    (ignored), SIGKILL `RUDE_GRACE` after that, the new one added. Meanwhile `--clients`
//!    more clients, one connection per request and no pause, join the load: the busybox
//!    listen queues overflow and the kernel drops SYNs (the note gives the host's
//!    `TcpExtListenOverflows` delta). Needs `busybox` (Debian `busybox-static`); without
//!    it the phase is skipped with a line saying so.
//!
//! # What is counted
//!
//! A request belongs to the phase in which it started. It **failed** on any error: connect
//! refused or reset, a connection closed before the whole response, a status other than
//! 200, or no complete response within 5 s. A keep-alive client whose *reused* connection
//! is closed before any byte of the response arrived retries that idempotent GET once on a
//! new connection (RFC 9112 §9.3.1, as every HTTP client does): that request is counted in
//! **retried**, and in failed only if the retry fails too. A client with one connection per
//! request never retries. Latency (p50, p99) runs from the first write to the last byte of
//! the response, retry included, over the requests that succeeded.
//!
//! # Output
//!
//! Progress goes to stderr (tracing). The table goes to stdout, a header, then one row per
//! phase as it ends, nine columns separated by `|` (split on `|` and trim; no field
//! contains one):
//!
//! ```text
//! phase                      | requests | failed | retried | allowed | p50 ms | p99 ms | versions             | note
//! update v1->v2 stop-first   |    18450 |      0 |      26 |       0 |   1.73 |   4.67 | v1=7181 v2=11269     | one task at a time: remove old, add new
//! ```
//!
//! `allowed` is the number of failures the phase may have: 0, except for the kill -9, where
//! it is the number of connections that were open on the killed task (an upper bound: its
//! `active_connections` just before the kill plus the connections it accepted between that
//! reading and the kill). `versions` lists `vN=count` for every version that answered; the
//! note says what the orchestrator did, how many connects meshd retried, and why requests
//! failed. The last line starts with `verdict: PASS` or `verdict: FAIL`. [`run`] returns an
//! error when it is FAIL (a phase over its allowance or without requests, the rolled-out
//! version not answering, the broken one answering or admitted, a task not drained in
//! time, meshd not exiting 0 on SIGTERM at the end) or when the demo itself cannot go on.
//!
//! Every process the demo starts is stopped on every path (errors, SIGTERM and Ctrl-C
//! included: children are killed on drop) and the temp dir is removed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinSet;

/// `meshd demo` options.
#[derive(Debug, Clone)]
pub struct DemoOpts {
    /// The least time each phase runs under load.
    pub phase: Duration,
    /// Concurrent clients: half keep-alive, half one connection per request.
    pub clients: usize,
}

// === settings ===

/// The service name in `mesh.toml` and in task names.
const SERVICE: &str = "web";
/// Tasks at the start and after scaling down.
const BASE_TASKS: usize = 2;
/// Tasks after scaling up.
const SCALED_TASKS: usize = 6;
/// How late a task binds its port after it starts.
const BIND_DELAY: &str = "400ms";
/// How long a task may take to finish in-flight requests after SIGTERM.
const TASK_GRACE: Duration = Duration::from_secs(5);
/// The health check meshd runs on every task.
const HEALTH: &str = "check = \"http\"\npath = \"/healthz\"\ninterval = \"200ms\"\ntimeout = \"200ms\"\nrise = 2\nfall = 2";
/// How long a removed task keeps running before its stop signal. Swarm waits 2 s between
/// unpublishing a task and sending SIGTERM (moby PR #31142); meshd must stop sending it new
/// connections within this window. This is the orchestrator's policy, not a synchronisation:
/// the demo checks afterwards that meshd did drain the task in time.
const STOP_WINDOW: Duration = Duration::from_secs(1);
/// How long the orchestrator watches a new release before it gives up on it and rolls back
/// (Swarm's `update_config.monitor`, shortened).
const MONITOR: Duration = Duration::from_secs(2);
/// The longest a new task may take to be reported healthy (it needs ~1 s: bind delay,
/// reload, two checks).
const HEALTHY_WITHIN: Duration = Duration::from_secs(10);
/// The longest meshd may take to notice a killed task (two failed checks: ~0.5 s).
const NOTICED_WITHIN: Duration = Duration::from_secs(5);
/// How often the orchestrator polls `/api/v1/services`.
const POLL: Duration = Duration::from_millis(50);
/// A request with no complete answer after this long failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The pause between two requests of one client. It keeps the load bounded (about
/// `clients / PACE` requests per second at most) so that one small machine can run meshd,
/// up to eight tasks and the clients at once without starving the health checks.
const PACE: Duration = Duration::from_millis(10);
/// The longest the admin API may take to answer one call.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the orchestrator waits for a busybox task to exit after SIGTERM before it
/// sends SIGKILL (it never exits: it ignores SIGTERM). Swarm waits 10 s by default.
const RUDE_GRACE: Duration = Duration::from_secs(1);
/// busybox httpd tasks in the rude phase.
const RUDE_TASKS: usize = 2;
/// The longest meshd may take to exit after SIGTERM once the load stopped.
const MESHD_EXIT_WITHIN: Duration = Duration::from_secs(10);

// Phase names: the first column of the table.
const BASELINE: &str = "baseline 2 x v1";
const SCALE_UP: &str = "scale 2->6";
const SCALE_DOWN: &str = "scale 6->2";
const STOP_FIRST: &str = "update v1->v2 stop-first";
const START_FIRST: &str = "update v2->v1 start-first";
const BROKEN: &str = "broken v3 rolled back";
const KILL: &str = "kill -9 one task";
const RUDE: &str = "rude tasks: busybox httpd";
const PHASES: [&str; 8] = [
    BASELINE,
    SCALE_UP,
    SCALE_DOWN,
    STOP_FIRST,
    START_FIRST,
    BROKEN,
    KILL,
    RUDE,
];

// === entry ===

/// Runs the demonstration; `Err` if a zero-failure phase failed or anything broke.
pub async fn run(opts: DemoOpts) -> anyhow::Result<()> {
    if opts.clients == 0 {
        bail!("demo: --clients must be at least 1");
    }
    if opts.phase < Duration::from_millis(100) {
        bail!("demo: --phase must be at least 100ms");
    }
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let dir = TempDir::create()?;
    // On a signal the demo future is dropped: its children are killed on drop, then the
    // temp dir goes.
    let result = tokio::select! {
        r = demo(&opts, &dir.0) => r,
        _ = term.recv() => Err(anyhow!("demo: stopped by SIGTERM")),
        _ = int.recv() => Err(anyhow!("demo: interrupted")),
    };
    drop(dir);
    result
}

async fn demo(opts: &DemoOpts, dir: &Path) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("demo: locating the meshd binary")?;
    let mut cluster = Cluster::start(exe, dir).await?;
    let result = scenario(opts, &mut cluster).await;
    let result = match result {
        Ok(rows) => {
            let exit = cluster.shutdown().await;
            verdict(&rows, exit)
        }
        Err(e) => Err(e),
    };
    if let Err(e) = &result {
        tracing::error!("demo failed: {e:#}");
        eprintln!(
            "--- last lines of meshd's log ---\n{}",
            tail(&dir.join("meshd.log"), 25)
        );
    }
    result
}

// === the scenario ===

async fn scenario(opts: &DemoOpts, c: &mut Cluster) -> anyhow::Result<Vec<Row>> {
    let load = Arc::new(Load::new(c.listen, PHASES.len()));
    let mut clients = JoinSet::new();
    let keepalive = opts.clients.div_ceil(2);
    for i in 0..opts.clients {
        let start_after = PACE.mul_f64(i as f64 / opts.clients as f64);
        clients.spawn(client(load.clone(), i < keepalive, start_after));
    }
    tracing::info!(
        clients = opts.clients,
        keepalive,
        close = opts.clients - keepalive,
        target = %c.listen,
        "load started"
    );
    println!("{}", header());

    let mut r = Runner::new(opts.phase, load.clone(), c.admin, c.problems.clone());
    r.phase(BASELINE, async { Ok(Outcome::default()) }).await?;
    r.phase(SCALE_UP, scale_up(c)).await?;
    r.phase(SCALE_DOWN, scale_down(c)).await?;
    r.phase(STOP_FIRST, update_stop_first(c, "v2")).await?;
    r.phase(START_FIRST, update_start_first(c, "v1")).await?;
    r.phase(BROKEN, broken_release(c)).await?;
    r.phase(KILL, kill_one(c)).await?;
    match busybox() {
        Some(bb) => {
            r.phase(RUDE, rude_tasks(c, load.clone(), opts.clients, bb))
                .await?
        }
        None => println!(
            "{RUDE}: skipped: no busybox on this machine (Debian: apt-get install busybox-static)"
        ),
    }

    load.stop.store(true, Ordering::Relaxed);
    let joined = tokio::time::timeout(REQUEST_TIMEOUT + PACE * 2, async {
        while clients.join_next().await.is_some() {}
    })
    .await;
    if joined.is_err() {
        bail!("demo: the clients did not stop");
    }
    Ok(r.rows)
}

async fn scale_up(c: &mut Cluster) -> anyhow::Result<Outcome> {
    let mut new = Vec::new();
    for _ in BASE_TASKS..SCALED_TASKS {
        new.push(c.spawn_task("v1", false)?);
    }
    c.list(&new)?;
    c.wait_healthy(&new).await?;
    Ok(Outcome::with_note(format!(
        "{} tasks started, admitted once healthy",
        new.len()
    )))
}

async fn scale_down(c: &mut Cluster) -> anyhow::Result<Outcome> {
    let gone: Vec<u32> = c
        .tasks
        .iter()
        .rev()
        .take(SCALED_TASKS - BASE_TASKS)
        .map(|t| t.id)
        .collect();
    c.remove(&gone).await?;
    Ok(Outcome::with_note(format!(
        "{} tasks drained, then stopped",
        gone.len()
    )))
}

async fn update_stop_first(c: &mut Cluster, to: &'static str) -> anyhow::Result<Outcome> {
    let old: Vec<u32> = c.tasks.iter().map(|t| t.id).collect();
    for id in old {
        c.remove(&[id]).await?;
        let new = c.spawn_task(to, false)?;
        c.list(&[new])?;
        c.wait_healthy(&[new]).await?;
    }
    Ok(Outcome {
        must_answer: Some(to),
        note: "one task at a time: remove old, add new".into(),
        ..Outcome::default()
    })
}

async fn update_start_first(c: &mut Cluster, to: &'static str) -> anyhow::Result<Outcome> {
    let old: Vec<u32> = c.tasks.iter().map(|t| t.id).collect();
    for id in old {
        let new = c.spawn_task(to, false)?;
        c.list(&[new])?;
        c.wait_healthy(&[new]).await?;
        c.remove(&[id]).await?;
    }
    Ok(Outcome {
        must_answer: Some(to),
        note: "one task at a time: add new, remove old".into(),
        ..Outcome::default()
    })
}

async fn broken_release(c: &mut Cluster) -> anyhow::Result<Outcome> {
    let mut new = Vec::new();
    for _ in 0..BASE_TASKS {
        new.push(c.spawn_task("v3", true)?);
    }
    c.list(&new)?;
    // The orchestrator watches the release for MONITOR: it would keep it if its tasks
    // became healthy. They never do (their /healthz answers 503), so it rolls back.
    let addrs: Vec<SocketAddr> = new
        .iter()
        .filter_map(|id| c.task(*id))
        .map(|t| t.addr)
        .collect();
    let all_healthy = |v: &ServiceView| {
        addrs
            .iter()
            .all(|a| v.backend(*a).is_some_and(BackendView::healthy))
    };
    let end = Instant::now() + MONITOR;
    let view = loop {
        let view = c.service().await?;
        if all_healthy(&view) || Instant::now() >= end {
            break view;
        }
        tokio::time::sleep(POLL).await;
    };
    let health: Vec<&str> = addrs
        .iter()
        .map(|a| view.backend(*a).map_or("missing", |b| b.health.as_str()))
        .collect();
    let health = health.join(",");
    let mut problems = Vec::new();
    if addrs
        .iter()
        .any(|a| view.backend(*a).is_some_and(BackendView::healthy))
    {
        problems.push(format!(
            "meshd admitted a task whose /healthz answers 503 ({health})"
        ));
    }
    tracing::info!(%health, "release v3 not healthy after {}: rolling back", fmt_dur(MONITOR));
    c.remove(&new).await?;
    Ok(Outcome {
        must_not_answer: Some("v3"),
        note: format!("health after {}: {health}; rolled back", fmt_dur(MONITOR)),
        problems,
        ..Outcome::default()
    })
}

async fn kill_one(c: &mut Cluster) -> anyhow::Result<Outcome> {
    let id = c
        .tasks
        .first()
        .map(|t| t.id)
        .ok_or_else(|| anyhow!("demo: no task left to kill"))?;
    let killed = c.kill(id).await?;
    let (name, addr) = (killed.name, killed.addr);
    // meshd finds out by itself: connect errors (ejection) and failed checks.
    c.wait_for(
        NOTICED_WITHIN,
        &format!("meshd to notice that {name} died"),
        |v| {
            v.backend(addr)
                .is_some_and(|b| b.ejected || b.health == "down")
        },
    )
    .await?;
    // The orchestrator replaces the dead task.
    c.unlist(id)?;
    let new = c.spawn_task("v1", false)?;
    c.list(&[new])?;
    c.wait_healthy(&[new]).await?;
    Ok(Outcome {
        allowed_failures: killed.open,
        note: format!(
            "{name} killed with at most {} connections open, replaced",
            killed.open
        ),
        ..Outcome::default()
    })
}

/// Phase 8: busybox httpd tasks replace the v1 tasks, then are updated stop-first, under
/// `burst` extra unpaced connection-per-request clients.
async fn rude_tasks(
    c: &mut Cluster,
    load: Arc<Load>,
    burst: usize,
    busybox: PathBuf,
) -> anyhow::Result<Outcome> {
    let overflows_at_start = listen_overflows();
    let stop_burst = Arc::new(AtomicBool::new(false));
    let mut burst_clients = JoinSet::new();
    for _ in 0..burst {
        burst_clients.spawn(burst_client(load.clone(), stop_burst.clone()));
    }
    let result = async {
        let mut rude = Vec::new();
        for _ in 0..RUDE_TASKS {
            rude.push(c.spawn_busybox(&busybox, "bb1")?);
        }
        c.list(&rude)?;
        c.wait_healthy(&rude).await?;
        let polite: Vec<u32> = c
            .tasks
            .iter()
            .map(|t| t.id)
            .filter(|id| !rude.contains(id))
            .collect();
        c.remove(&polite).await?;
        for id in rude {
            c.remove(&[id]).await?;
            let new = c.spawn_busybox(&busybox, "bb2")?;
            c.list(&[new])?;
            c.wait_healthy(&[new]).await?;
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    stop_burst.store(true, Ordering::Relaxed);
    while burst_clients.join_next().await.is_some() {}
    result?;
    let overflows = listen_overflows().saturating_sub(overflows_at_start);
    Ok(Outcome {
        must_answer: Some("bb2"),
        note: format!(
            "{RUDE_TASKS} busybox httpd replaced v1, then bb1->bb2 stop-first (SIGTERM ignored, \
             SIGKILL after {}), +{burst} unpaced clients; listen overflows +{overflows}",
            fmt_dur(RUDE_GRACE)
        ),
        ..Outcome::default()
    })
}

/// A connection-per-request client with no pause, until `stop` (the rude phase's burst).
async fn burst_client(load: Arc<Load>, stop: Arc<AtomicBool>) {
    let mut buf = Vec::with_capacity(1024);
    while !stop.load(Ordering::Relaxed) && !load.stop.load(Ordering::Relaxed) {
        let i = load.enter();
        let t0 = Instant::now();
        let result = tokio::time::timeout(REQUEST_TIMEOUT, request_close(load.target, &mut buf))
            .await
            .unwrap_or_else(|_| Err("timeout".to_string()));
        load.record(i, result, t0.elapsed());
        tokio::task::yield_now().await;
    }
}

/// The busybox binary, if this machine has one that runs.
fn busybox() -> Option<PathBuf> {
    ["busybox", "/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| {
            std::process::Command::new(p)
                .arg("true")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
}

/// The host's `TcpExtListenOverflows` (/proc/net/netstat): SYNs dropped because a listen
/// queue was full. Host-wide; 0 if it cannot be read.
fn listen_overflows() -> u64 {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut tcp_ext = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (tcp_ext.next(), tcp_ext.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "ListenOverflows")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

// === phases and rows ===

/// What a phase's action reports besides the traffic numbers.
#[derive(Debug, Default)]
struct Outcome {
    /// Failures the phase may have without failing the demo (only a kill -9 has any).
    allowed_failures: u64,
    /// The version being rolled out: it must have answered.
    must_answer: Option<&'static str>,
    /// A broken version: it must not have answered.
    must_not_answer: Option<&'static str>,
    /// What the action saw go wrong in meshd (fails the demo).
    problems: Vec<String>,
    note: String,
}

impl Outcome {
    fn with_note(note: String) -> Outcome {
        Outcome {
            note,
            ..Outcome::default()
        }
    }
}

/// Runs phases back to back under the load and prints a row as each one ends.
struct Runner {
    phase: Duration,
    load: Arc<Load>,
    admin: SocketAddr,
    /// Problems the orchestrator saw during the current phase's action.
    problems: Problems,
    /// When the current phase began (the previous one ended).
    started: Instant,
    /// meshd's `connect_retries` counter when the current phase began.
    retries_at_start: u64,
    rows: Vec<Row>,
}

impl Runner {
    fn new(phase: Duration, load: Arc<Load>, admin: SocketAddr, problems: Problems) -> Runner {
        Runner {
            phase,
            load,
            admin,
            problems,
            started: Instant::now(),
            retries_at_start: 0,
            rows: Vec::new(),
        }
    }

    /// Runs `action` under the load; the phase ends `phase` after it began, or a quarter
    /// phase after the action finished if that is later (so its effect is measured).
    async fn phase(
        &mut self,
        name: &'static str,
        action: impl Future<Output = anyhow::Result<Outcome>>,
    ) -> anyhow::Result<()> {
        let idx = self.rows.len();
        debug_assert_eq!(PHASES.get(idx), Some(&name), "phases run in PHASES order");
        tracing::info!(phase = name, "phase begins");
        let mut outcome = action.await.with_context(|| format!("phase {name:?}"))?;
        outcome.problems.extend(self.problems.take());
        let end = (self.started + self.phase).max(Instant::now() + self.phase / 4);
        tokio::time::sleep_until(end.into()).await;

        self.load.switch(idx + 1);
        self.started = Instant::now();
        let retries = match service(self.admin).await {
            Ok(s) => s.connect_retries,
            Err(_) => self.retries_at_start,
        };
        let meshd_retries = retries.saturating_sub(self.retries_at_start);
        self.retries_at_start = retries;
        self.load.settle(idx).await;

        let row = Row::new(name, self.load.take(idx), outcome, meshd_retries);
        println!("{}", row.format());
        tracing::info!(
            phase = name,
            requests = row.requests,
            failed = row.failed,
            retried = row.retried,
            "phase ends"
        );
        self.rows.push(row);
        Ok(())
    }
}

/// Problems found by the orchestrator, shared with the phase runner.
#[derive(Debug, Clone, Default)]
struct Problems(Arc<Mutex<Vec<String>>>);

impl Problems {
    fn report(&self, p: String) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(p);
    }

    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// One line of the table.
#[derive(Debug)]
struct Row {
    name: &'static str,
    requests: u64,
    failed: u64,
    retried: u64,
    allowed: u64,
    p50_ms: f64,
    p99_ms: f64,
    versions: BTreeMap<String, u64>,
    note: String,
    /// Why this phase fails the demo (empty: it passed).
    problems: Vec<String>,
}

impl Row {
    fn new(name: &'static str, mut s: PhaseStats, o: Outcome, meshd_retries: u64) -> Row {
        s.latencies_us.sort_unstable();
        let mut problems = o.problems;
        if s.requests == 0 {
            problems.push("no request completed".to_string());
        }
        if s.failed > o.allowed_failures {
            problems.push(format!(
                "{} failed requests, {} allowed",
                s.failed, o.allowed_failures
            ));
        }
        if let Some(v) = o.must_answer {
            if !s.versions.contains_key(v) {
                problems.push(format!("{v} never answered"));
            }
        }
        if let Some(v) = o.must_not_answer {
            if let Some(n) = s.versions.get(v) {
                problems.push(format!("{v} answered {n} requests"));
            }
        }
        let mut note = o.note;
        if meshd_retries > 0 {
            let _ = write!(note, "; meshd retried {meshd_retries} connects");
        }
        if !s.errors.is_empty() {
            let errors: Vec<String> = s.errors.iter().map(|(e, n)| format!("{e} x{n}")).collect();
            let _ = write!(note, "; errors: {}", errors.join(", "));
        }
        Row {
            name,
            requests: s.requests,
            failed: s.failed,
            retried: s.retried,
            allowed: o.allowed_failures,
            p50_ms: percentile_ms(&s.latencies_us, 50.0),
            p99_ms: percentile_ms(&s.latencies_us, 99.0),
            versions: s.versions,
            note: note.trim_start_matches("; ").to_string(),
            problems,
        }
    }

    fn format(&self) -> String {
        let versions: Vec<String> = self
            .versions
            .iter()
            .map(|(v, n)| format!("{v}={n}"))
            .collect();
        format!(
            "{:<26} | {:>8} | {:>6} | {:>7} | {:>7} | {:>6.2} | {:>6.2} | {:<20} | {}",
            self.name,
            self.requests,
            self.failed,
            self.retried,
            self.allowed,
            self.p50_ms,
            self.p99_ms,
            versions.join(" "),
            self.note.replace('|', "/"),
        )
        .trim_end()
        .to_string()
    }
}

fn header() -> String {
    format!(
        "{:<26} | {:>8} | {:>6} | {:>7} | {:>7} | {:>6} | {:>6} | {:<20} | note",
        "phase", "requests", "failed", "retried", "allowed", "p50 ms", "p99 ms", "versions"
    )
}

/// Prints the verdict line; `Err` when the demo failed.
fn verdict(rows: &[Row], meshd_exit: anyhow::Result<()>) -> anyhow::Result<()> {
    let mut problems: Vec<String> = rows
        .iter()
        .flat_map(|r| r.problems.iter().map(move |p| format!("{}: {p}", r.name)))
        .collect();
    if let Err(e) = meshd_exit {
        problems.push(format!("meshd shutdown: {e:#}"));
    }
    if problems.is_empty() {
        let (zero, other): (Vec<&Row>, Vec<&Row>) = rows.iter().partition(|r| r.allowed == 0);
        let requests: u64 = zero.iter().map(|r| r.requests).sum();
        let mut line = format!(
            "verdict: PASS: 0 of {requests} requests failed in {} phases of scaling, rolling updates and a rollback",
            zero.len()
        );
        for r in other {
            let _ = write!(
                line,
                "; {}: {} failed, at most {} allowed (connections open on the killed task)",
                r.name, r.failed, r.allowed
            );
        }
        println!("{line}");
        Ok(())
    } else {
        println!("verdict: FAIL: {}", problems.join("; "));
        Err(anyhow!("demo failed: {}", problems.join("; ")))
    }
}

/// The `p`th percentile (nearest rank) of sorted microseconds, in milliseconds.
fn percentile_ms(sorted_us: &[u32], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted_us.len() as f64).ceil() as usize;
    let i = rank.clamp(1, sorted_us.len()) - 1;
    f64::from(sorted_us[i]) / 1000.0
}

// === load ===

/// One phase's traffic numbers.
#[derive(Debug, Default)]
struct PhaseStats {
    requests: u64,
    failed: u64,
    retried: u64,
    /// Latencies of the requests that succeeded.
    latencies_us: Vec<u32>,
    /// Answers per version ("v1": n).
    versions: BTreeMap<String, u64>,
    /// Failures per reason.
    errors: BTreeMap<String, u64>,
}

/// The load's shared state: which phase new requests belong to, and each phase's numbers.
struct Load {
    target: SocketAddr,
    /// The index of the current phase (`PHASES.len()` after the last one).
    phase: AtomicUsize,
    stop: AtomicBool,
    /// Requests in flight per phase: a phase's row is computed once its count is 0.
    in_flight: Vec<AtomicUsize>,
    stats: Vec<Mutex<PhaseStats>>,
}

impl Load {
    fn new(target: SocketAddr, phases: usize) -> Load {
        // One more slot for requests that start after the last phase ended.
        Load {
            target,
            phase: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            in_flight: (0..=phases).map(|_| AtomicUsize::new(0)).collect(),
            stats: (0..=phases).map(|_| Mutex::default()).collect(),
        }
    }

    /// Registers a request in the current phase and returns that phase.
    fn enter(&self) -> usize {
        loop {
            let i = self.phase.load(Ordering::SeqCst);
            self.in_flight[i].fetch_add(1, Ordering::SeqCst);
            // If the phase changed meanwhile, `settle` may already have seen 0: count the
            // request in the new phase instead.
            if self.phase.load(Ordering::SeqCst) == i {
                return i;
            }
            self.in_flight[i].fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn record(&self, i: usize, result: Result<Answer, String>, latency: Duration) {
        let mut s = self.stats[i].lock().unwrap_or_else(|p| p.into_inner());
        s.requests += 1;
        match result {
            Ok(a) => {
                if a.retried {
                    s.retried += 1;
                }
                let us = u32::try_from(latency.as_micros()).unwrap_or(u32::MAX);
                s.latencies_us.push(us);
                *s.versions
                    .entry(version_of(&a.body).to_string())
                    .or_default() += 1;
            }
            Err(reason) => {
                s.failed += 1;
                if reason.starts_with("retried") {
                    s.retried += 1;
                }
                *s.errors.entry(reason).or_default() += 1;
            }
        }
        drop(s);
        self.in_flight[i].fetch_sub(1, Ordering::SeqCst);
    }

    fn switch(&self, next: usize) {
        self.phase.store(next, Ordering::SeqCst);
    }

    /// Waits until every request of phase `i` has been recorded (each ends within
    /// `REQUEST_TIMEOUT`).
    async fn settle(&self, i: usize) {
        let end = Instant::now() + REQUEST_TIMEOUT + Duration::from_secs(1);
        while self.in_flight[i].load(Ordering::SeqCst) > 0 && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn take(&self, i: usize) -> PhaseStats {
        std::mem::take(&mut *self.stats[i].lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// One successful answer.
#[derive(Debug)]
struct Answer {
    body: String,
    /// The reused connection was closed first: the request was sent again.
    retried: bool,
}

/// One client: `GET /` every `PACE` until the load stops.
async fn client(load: Arc<Load>, keepalive: bool, start_after: Duration) {
    tokio::time::sleep(start_after).await;
    let mut conn: Option<TcpStream> = None;
    let mut buf = Vec::with_capacity(1024);
    while !load.stop.load(Ordering::Relaxed) {
        let i = load.enter();
        let t0 = Instant::now();
        let attempt = async {
            if keepalive {
                request_keepalive(load.target, &mut conn, &mut buf).await
            } else {
                request_close(load.target, &mut buf).await
            }
        };
        let result = match tokio::time::timeout(REQUEST_TIMEOUT, attempt).await {
            Ok(r) => r,
            Err(_) => {
                conn = None;
                Err("timeout".to_string())
            }
        };
        load.record(i, result, t0.elapsed());
        tokio::time::sleep(PACE).await;
    }
}

/// One request on a new connection with `Connection: close`; never retried.
async fn request_close(target: SocketAddr, buf: &mut Vec<u8>) -> Result<Answer, String> {
    let mut s = connect(target).await?;
    let r = exchange(&mut s, CLOSE_REQUEST, buf)
        .await
        .map_err(|e| e.reason)?;
    ok_answer(r, false)
}

/// One request on the client's kept-alive connection (opened if there is none). If the
/// reused connection was closed before any byte of the answer, the request is sent once
/// more on a new connection.
async fn request_keepalive(
    target: SocketAddr,
    conn: &mut Option<TcpStream>,
    buf: &mut Vec<u8>,
) -> Result<Answer, String> {
    let mut retried = false;
    if let Some(s) = conn.as_mut() {
        match exchange(s, KEEPALIVE_REQUEST, buf).await {
            Ok(r) => {
                if r.close {
                    *conn = None;
                }
                return ok_answer(r, false);
            }
            Err(e) if !e.answer_started => {
                *conn = None;
                retried = true;
            }
            Err(e) => {
                *conn = None;
                return Err(e.reason);
            }
        }
    }
    let prefix = if retried { "retried, then " } else { "" };
    let mut s = connect(target).await.map_err(|e| format!("{prefix}{e}"))?;
    let r = exchange(&mut s, KEEPALIVE_REQUEST, buf)
        .await
        .map_err(|e| format!("{prefix}{}", e.reason))?;
    if !r.close {
        *conn = Some(s);
    }
    ok_answer(r, retried).map_err(|e| format!("{prefix}{e}"))
}

fn ok_answer(r: Response, retried: bool) -> Result<Answer, String> {
    if r.status != 200 {
        return Err(format!("status {}", r.status));
    }
    Ok(Answer {
        body: String::from_utf8_lossy(&r.body).trim().to_string(),
        retried,
    })
}

async fn connect(target: SocketAddr) -> Result<TcpStream, String> {
    let s = TcpStream::connect(target)
        .await
        .map_err(|e| format!("connect: {:?}", e.kind()))?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// The version in a task name: `web.v2.7` -> `v2`.
fn version_of(name: &str) -> &str {
    name.split('.').nth(1).unwrap_or("?")
}

// === a minimal HTTP/1.1 client ===

const KEEPALIVE_REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: web\r\nUser-Agent: meshd-demo\r\n\r\n";
const CLOSE_REQUEST: &[u8] =
    b"GET / HTTP/1.1\r\nHost: web\r\nUser-Agent: meshd-demo\r\nConnection: close\r\n\r\n";
/// The largest response head and body accepted.
const MAX_HEAD: usize = 16 * 1024;
const MAX_BODY: usize = 1024 * 1024;

#[derive(Debug)]
struct Response {
    status: u16,
    body: Vec<u8>,
    /// The connection cannot carry another request.
    close: bool,
}

#[derive(Debug)]
struct ExchangeError {
    reason: String,
    /// Some byte of the answer had arrived (a retry would not be safe to hide).
    answer_started: bool,
}

/// The parsed status line and the headers that matter here.
#[derive(Debug, PartialEq, Eq)]
struct Head {
    status: u16,
    content_length: Option<usize>,
    close: bool,
}

/// Sends `request` and reads one whole response (Content-Length or close-delimited body).
async fn exchange(
    s: &mut TcpStream,
    request: &[u8],
    buf: &mut Vec<u8>,
) -> Result<Response, ExchangeError> {
    let fail = |reason: String, started: bool| ExchangeError {
        reason,
        answer_started: started,
    };
    buf.clear();
    if let Err(e) = s.write_all(request).await {
        return Err(fail(format!("write: {:?}", e.kind()), false));
    }
    let head_len = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_HEAD {
            return Err(fail("response head too large".into(), true));
        }
        match s.read_buf(buf).await {
            Ok(0) if buf.is_empty() => return Err(fail("closed before the answer".into(), false)),
            Ok(0) => return Err(fail("closed in the response head".into(), true)),
            Ok(_) => {}
            Err(e) => {
                let started = !buf.is_empty();
                return Err(fail(format!("read: {:?}", e.kind()), started));
            }
        }
    };
    let head = parse_head(&buf[..head_len]).map_err(|e| fail(e.into(), true))?;
    let mut close = head.close;
    let body_len = match head.content_length {
        Some(n) if n > MAX_BODY => return Err(fail("response body too large".into(), true)),
        Some(n) => {
            while buf.len() < head_len + n {
                match s.read_buf(buf).await {
                    Ok(0) => return Err(fail("closed in the body".into(), true)),
                    Ok(_) => {}
                    Err(e) => return Err(fail(format!("read body: {:?}", e.kind()), true)),
                }
            }
            // Bytes nobody asked for: the connection is out of step.
            close |= buf.len() > head_len + n;
            n
        }
        None => {
            close = true;
            loop {
                if buf.len() > head_len + MAX_BODY {
                    return Err(fail("response body too large".into(), true));
                }
                match s.read_buf(buf).await {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) => return Err(fail(format!("read body: {:?}", e.kind()), true)),
                }
            }
            buf.len() - head_len
        }
    };
    Ok(Response {
        status: head.status,
        body: buf[head_len..head_len + body_len].to_vec(),
        close,
    })
}

fn parse_head(head: &[u8]) -> Result<Head, &'static str> {
    let text = std::str::from_utf8(head).map_err(|_| "response head is not UTF-8")?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err("not an HTTP/1.x response");
    }
    let status = parts
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or("bad status line")?;
    let mut h = Head {
        status,
        content_length: None,
        close: version == "HTTP/1.0",
    };
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':').ok_or("bad header line")?;
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("content-length") {
            h.content_length = Some(value.parse().map_err(|_| "bad content-length")?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err("transfer-encoding is not supported");
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    h.close = true;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    h.close = false;
                }
            }
        }
    }
    Ok(h)
}

/// `GET path` on the admin API; the status and body.
async fn admin_get(admin: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
    let call = async {
        let mut s = connect(admin).await.map_err(|e| anyhow!(e))?;
        let mut buf = Vec::new();
        let r = exchange(&mut s, request.as_bytes(), &mut buf)
            .await
            .map_err(|e| anyhow!(e.reason))?;
        Ok::<_, anyhow::Error>((r.status, String::from_utf8_lossy(&r.body).into_owned()))
    };
    tokio::time::timeout(ADMIN_TIMEOUT, call)
        .await
        .map_err(|_| anyhow!("no answer within {}", fmt_dur(ADMIN_TIMEOUT)))?
        .with_context(|| format!("admin API GET {path} on {admin}"))
}

// === meshd's view (the subset of /api/v1/services the orchestrator reads) ===

#[derive(Debug, Deserialize)]
struct ServicesView {
    services: Vec<ServiceView>,
}

#[derive(Debug, Clone, Deserialize)]
struct ServiceView {
    name: String,
    connect_retries: u64,
    backends: Vec<BackendView>,
}

#[derive(Debug, Clone, Deserialize)]
struct BackendView {
    addr: SocketAddr,
    /// active | draining | gone
    state: String,
    /// unknown | up | down
    health: String,
    ejected: bool,
    active_connections: u64,
    connections_total: u64,
}

impl ServiceView {
    fn backend(&self, addr: SocketAddr) -> Option<&BackendView> {
        self.backends.iter().find(|b| b.addr == addr)
    }
}

impl BackendView {
    fn healthy(&self) -> bool {
        self.state == "active" && self.health == "up" && !self.ejected
    }
}

/// Service `web` as meshd reports it.
async fn service(admin: SocketAddr) -> anyhow::Result<ServiceView> {
    let (status, body) = admin_get(admin, "/api/v1/services").await?;
    if status != 200 {
        bail!("admin API GET /api/v1/services: status {status}: {body}");
    }
    let view: ServicesView =
        serde_json::from_str(&body).context("admin API GET /api/v1/services: bad JSON")?;
    view.services
        .into_iter()
        .find(|s| s.name == SERVICE)
        .ok_or_else(|| anyhow!("meshd reports no service {SERVICE:?}"))
}

// === the cluster: meshd, the tasks, mesh.toml ===

/// One backend task process.
struct Task {
    /// The K in `web.vN.K`: unique for the whole demo.
    id: u32,
    name: String,
    addr: SocketAddr,
    /// Listed in `mesh.toml`.
    listed: bool,
    /// Killed on drop (with its process group, see `Drop`).
    child: Child,
    log: PathBuf,
    /// How long the orchestrator waits for it to exit after SIGTERM before SIGKILL.
    grace: Duration,
    /// busybox httpd: ignores SIGTERM (expected, not a problem), forks per connection.
    rude: bool,
}

impl Drop for Task {
    fn drop(&mut self) {
        kill_group(&self.child);
    }
}

/// SIGKILL to a task's whole process group (busybox httpd's forked children too), then
/// the task itself. Only while the task is not reaped: until then its pid, which is also
/// its group's id, cannot belong to anyone else.
fn kill_group(child: &Child) {
    if let Some(pid) = child.id() {
        let _ = crate::sys::signal_group(pid, libc::SIGKILL);
    }
}

/// What a `kill -9` left behind.
struct Killed {
    name: String,
    addr: SocketAddr,
    /// Connections that were open on the task when it died (an upper bound).
    open: u64,
}

/// The orchestrator's world. Dropping it kills every process it started.
struct Cluster {
    exe: PathBuf,
    dir: PathBuf,
    config: PathBuf,
    admin: SocketAddr,
    listen: SocketAddr,
    /// meshd itself; killed on drop.
    meshd: Child,
    /// What meshd got wrong while the orchestrator worked (read by the phase runner).
    problems: Problems,
    tasks: Vec<Task>,
    next_id: u32,
}

impl Cluster {
    /// Starts two v1 tasks and meshd in front of them; returns once they are healthy.
    async fn start(exe: PathBuf, dir: &Path) -> anyhow::Result<Cluster> {
        let admin = free_addr()?;
        let listen = free_addr()?;
        let config = dir.join("mesh.toml");
        let mut tasks = Vec::new();
        for id in 1..=BASE_TASKS as u32 {
            let mut t = Task::spawn(&exe, dir, id, "v1", false)?;
            t.listed = true;
            tasks.push(t);
        }
        write_config(&config, admin, listen, &tasks)?;
        let meshd_log = dir.join("meshd.log");
        let log = std::fs::File::create(&meshd_log)
            .with_context(|| format!("creating {}", meshd_log.display()))?;
        let meshd = command(&exe)
            .arg("--config")
            .arg(&config)
            .stderr(log)
            .spawn()
            .context("demo: starting meshd")?;
        tracing::info!(config = %config.display(), admin = %admin, listen = %listen, "meshd started");
        let mut c = Cluster {
            exe,
            dir: dir.to_path_buf(),
            config,
            admin,
            listen,
            meshd,
            problems: Problems::default(),
            tasks,
            next_id: BASE_TASKS as u32 + 1,
        };
        c.wait_ready().await?;
        let ids: Vec<u32> = c.tasks.iter().map(|t| t.id).collect();
        c.wait_healthy(&ids).await?;
        Ok(c)
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let end = Instant::now() + HEALTHY_WITHIN;
        loop {
            if let Ok((200, _)) = admin_get(self.admin, "/readyz").await {
                return Ok(());
            }
            if let Ok(Some(status)) = self.meshd.try_wait() {
                bail!("meshd exited at start ({status})");
            }
            if Instant::now() >= end {
                bail!("meshd not ready within {}", fmt_dur(HEALTHY_WITHIN));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    fn task(&self, id: u32) -> Option<&Task> {
        self.tasks.iter().find(|t| t.id == id)
    }

    fn task_mut(&mut self, id: u32) -> anyhow::Result<&mut Task> {
        self.tasks
            .iter_mut()
            .find(|t| t.id == id)
            .ok_or_else(|| anyhow!("demo: no task {id}"))
    }

    /// Starts a task process (not listed yet); returns its id.
    fn spawn_task(&mut self, version: &str, broken: bool) -> anyhow::Result<u32> {
        let id = self.next_id;
        self.next_id += 1;
        let t = Task::spawn(&self.exe, &self.dir, id, version, broken)?;
        tracing::info!(task = %t.name, addr = %t.addr, "task started");
        self.tasks.push(t);
        Ok(id)
    }

    /// Starts a busybox httpd task (not listed yet); returns its id.
    fn spawn_busybox(&mut self, busybox: &Path, version: &str) -> anyhow::Result<u32> {
        let id = self.next_id;
        self.next_id += 1;
        let t = Task::spawn_busybox(busybox, &self.dir, id, version)?;
        tracing::info!(task = %t.name, addr = %t.addr, "busybox httpd task started");
        self.tasks.push(t);
        Ok(id)
    }

    /// Lists tasks in mesh.toml: meshd health-gates them.
    fn list(&mut self, ids: &[u32]) -> anyhow::Result<()> {
        for &id in ids {
            self.task_mut(id)?.listed = true;
        }
        self.publish()?;
        tracing::info!(tasks = %self.names(ids), "tasks listed in mesh.toml");
        Ok(())
    }

    /// Unlists a task that is already dead and forgets it.
    fn unlist(&mut self, id: u32) -> anyhow::Result<()> {
        self.task_mut(id)?.listed = false;
        self.publish()?;
        tracing::info!(tasks = %self.names(&[id]), "dead task unlisted");
        self.tasks.retain(|t| t.id != id);
        Ok(())
    }

    /// Swarm's order: unlist (meshd drains them), wait `STOP_WINDOW`, SIGTERM, reap.
    async fn remove(&mut self, ids: &[u32]) -> anyhow::Result<()> {
        for &id in ids {
            self.task_mut(id)?.listed = false;
        }
        self.publish()?;
        tracing::info!(tasks = %self.names(ids), "tasks unlisted: meshd drains them");
        tokio::time::sleep(STOP_WINDOW).await;
        let view = service(self.admin).await?;
        for t in self.tasks.iter().filter(|t| ids.contains(&t.id)) {
            if view.backend(t.addr).is_some_and(|b| b.state == "active") {
                // Its connect retries would hide this from the clients: report it.
                let p = format!(
                    "{} still active in meshd {} after it was unlisted",
                    t.name,
                    fmt_dur(STOP_WINDOW)
                );
                tracing::warn!("{p}");
                self.problems.report(p);
            }
        }
        let (mut stopping, keep): (Vec<Task>, Vec<Task>) = std::mem::take(&mut self.tasks)
            .into_iter()
            .partition(|t| ids.contains(&t.id));
        self.tasks = keep;
        for t in &stopping {
            send_signal(&t.child, libc::SIGTERM)
                .with_context(|| format!("sending SIGTERM to {}", t.name))?;
        }
        tracing::info!(tasks = %names(&stopping), "SIGTERM sent");
        for t in &mut stopping {
            match tokio::time::timeout(t.grace, t.child.wait()).await {
                Ok(Ok(status)) if status.success() => {}
                Ok(Ok(status)) => tracing::warn!(task = %t.name, %status, "task exited uncleanly"),
                Ok(Err(e)) => tracing::warn!(task = %t.name, error = %e, "cannot reap task"),
                Err(_) => {
                    if t.rude {
                        tracing::info!(task = %t.name, "task ignored SIGTERM (as busybox httpd as PID 1 does): killing it");
                    } else {
                        tracing::warn!(task = %t.name, "task ignored SIGTERM: killing it");
                    }
                    kill_group(&t.child);
                    let _ = t.child.start_kill();
                    let _ = t.child.wait().await;
                }
            }
        }
        Ok(())
    }

    /// SIGKILL, no drain first. Reads the task's connection counters just before and just
    /// after, to bound how many connections it had open when it died.
    async fn kill(&mut self, id: u32) -> anyhow::Result<Killed> {
        let admin = self.admin;
        let t = self.task_mut(id)?;
        let (name, addr) = (t.name.clone(), t.addr);
        let before = service(admin).await?;
        let before = before
            .backend(addr)
            .ok_or_else(|| anyhow!("meshd does not list {name}"))?
            .clone();
        let t = self.task_mut(id)?;
        send_signal(&t.child, libc::SIGKILL).with_context(|| format!("killing {name}"))?;
        let status = t
            .child
            .wait()
            .await
            .with_context(|| format!("reaping {name}"))?;
        let after = service(admin).await?;
        let accepted_since = after.backend(addr).map_or(0, |b| {
            b.connections_total.saturating_sub(before.connections_total)
        });
        let open = before.active_connections + accepted_since;
        tracing::info!(task = %name, %status, open_connections = open, "task killed with SIGKILL");
        Ok(Killed { name, addr, open })
    }

    /// Polls meshd until every task in `ids` is reported healthy.
    async fn wait_healthy(&mut self, ids: &[u32]) -> anyhow::Result<()> {
        let addrs: Vec<SocketAddr> = ids
            .iter()
            .filter_map(|id| self.task(*id))
            .map(|t| t.addr)
            .collect();
        let what = format!("{} to be healthy", self.names(ids));
        let end = Instant::now() + HEALTHY_WITHIN;
        loop {
            let view = service(self.admin).await?;
            if addrs
                .iter()
                .all(|a| view.backend(*a).is_some_and(BackendView::healthy))
            {
                tracing::info!(tasks = %self.names(ids), "tasks healthy: they get traffic");
                return Ok(());
            }
            for t in self.tasks.iter_mut().filter(|t| ids.contains(&t.id)) {
                if let Ok(Some(status)) = t.child.try_wait() {
                    bail!(
                        "task {} exited ({status}) while waiting for it to be healthy; its log:\n{}",
                        t.name,
                        tail(&t.log, 10)
                    );
                }
            }
            if Instant::now() >= end {
                bail!(
                    "waited {} for {what}; meshd reports {}",
                    fmt_dur(HEALTHY_WITHIN),
                    summary(&view)
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Polls meshd until `ok` holds for service `web`.
    async fn wait_for(
        &self,
        within: Duration,
        what: &str,
        ok: impl Fn(&ServiceView) -> bool,
    ) -> anyhow::Result<ServiceView> {
        let end = Instant::now() + within;
        loop {
            let view = service(self.admin).await?;
            if ok(&view) {
                return Ok(view);
            }
            if Instant::now() >= end {
                bail!(
                    "waited {} for {what}; meshd reports {}",
                    fmt_dur(within),
                    summary(&view)
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn service(&self) -> anyhow::Result<ServiceView> {
        service(self.admin).await
    }

    /// Rewrites mesh.toml with the listed tasks (temp file, then rename).
    fn publish(&self) -> anyhow::Result<()> {
        write_config(&self.config, self.admin, self.listen, &self.tasks)
    }

    fn names(&self, ids: &[u32]) -> String {
        let tasks: Vec<&Task> = self.tasks.iter().filter(|t| ids.contains(&t.id)).collect();
        tasks
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Stops meshd (SIGTERM: it must drain and exit 0), then every task (SIGTERM).
    async fn shutdown(&mut self) -> anyhow::Result<()> {
        send_signal(&self.meshd, libc::SIGTERM).context("sending SIGTERM to meshd")?;
        let exit = match tokio::time::timeout(MESHD_EXIT_WITHIN, self.meshd.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => Err(anyhow!("meshd exited with {status} after SIGTERM")),
            Ok(Err(e)) => Err(anyhow!("cannot reap meshd: {e}")),
            Err(_) => Err(anyhow!(
                "meshd did not exit within {} of SIGTERM",
                fmt_dur(MESHD_EXIT_WITHIN)
            )),
        };
        for t in &self.tasks {
            let _ = send_signal(&t.child, libc::SIGTERM);
        }
        for t in &mut self.tasks {
            if tokio::time::timeout(t.grace.min(TASK_GRACE), t.child.wait())
                .await
                .is_err()
            {
                kill_group(&t.child);
                let _ = t.child.start_kill();
                let _ = t.child.wait().await;
            }
        }
        tracing::info!("meshd and every task stopped");
        exit
    }
}

impl Task {
    fn spawn(exe: &Path, dir: &Path, id: u32, version: &str, broken: bool) -> anyhow::Result<Task> {
        let name = format!("{SERVICE}.{version}.{id}");
        let addr = free_addr()?;
        let log = dir.join(format!("{name}.log"));
        let logf =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = command(exe);
        cmd.args(["backend", "--listen", &addr.to_string(), "--name", &name])
            .args(["--mode", "http", "--bind-delay", BIND_DELAY])
            .args(["--grace", &fmt_dur(TASK_GRACE)])
            .stderr(logf);
        if broken {
            cmd.arg("--unhealthy");
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting task {name}"))?;
        Ok(Task {
            id,
            name,
            addr,
            listed: false,
            child,
            log,
            grace: TASK_GRACE + Duration::from_secs(2),
            rude: false,
        })
    }

    /// A busybox httpd task: serves `index.html` (its name) and `healthz` from its own
    /// directory; SIGTERM is ignored across the exec, as for PID 1 in a container.
    fn spawn_busybox(busybox: &Path, dir: &Path, id: u32, version: &str) -> anyhow::Result<Task> {
        let name = format!("{SERVICE}.{version}.{id}");
        let addr = free_addr()?;
        let www = dir.join(&name);
        std::fs::create_dir(&www).with_context(|| format!("creating {}", www.display()))?;
        std::fs::write(www.join("index.html"), format!("{name}\n"))
            .and_then(|()| std::fs::write(www.join("healthz"), "ok\n"))
            .with_context(|| format!("writing the pages of {name}"))?;
        let log = dir.join(format!("{name}.log"));
        let logf =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = command(busybox);
        cmd.args([
            "sh",
            "-c",
            "trap '' TERM; exec \"$0\" httpd -f -p \"$1\" -h \"$2\"",
        ])
        .arg(busybox)
        .arg(addr.to_string())
        .arg(&www)
        .stderr(logf);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting task {name} (busybox httpd)"))?;
        Ok(Task {
            id,
            name,
            addr,
            listed: false,
            child,
            log,
            grace: RUDE_GRACE,
            rude: true,
        })
    }
}

/// A child of this process: its own process group (a Ctrl-C reaches only the demo, which
/// then stops it), no stdin/stdout, killed if dropped.
fn command(exe: &Path) -> Command {
    let mut cmd = Command::new(exe);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .env("RUST_LOG", "info")
        .process_group(0)
        .kill_on_drop(true);
    cmd
}

fn write_config(
    path: &Path,
    admin: SocketAddr,
    listen: SocketAddr,
    tasks: &[Task],
) -> anyhow::Result<()> {
    let backends: String = tasks
        .iter()
        .filter(|t| t.listed)
        .map(|t| format!("  {{ addr = \"{}\" }}, # {}\n", t.addr, t.name))
        .collect();
    // `connect_timeout` is meshd's default. A connect timeout under Linux's first SYN
    // retransmission (1 s) gives up on a connect that a busy task's full listen queue merely
    // delayed: with one busybox task left in the rude phase's stop-first window (nothing to
    // hedge to), 500 ms failed 157 of 11,490 requests; the default, 0.
    let text = format!(
        "# Written by `meshd demo`, the orchestrator: rewritten (temp file + rename) at every step.\n\
         [admin]\n\
         listen = \"{admin}\"\n\
         \n\
         [[service]]\n\
         name = \"{SERVICE}\"\n\
         listen = [\"{listen}\"]\n\
         balance = \"round_robin\"\n\
         connect_retries = 2\n\
         drain_timeout = \"5s\"\n\
         slow_start = \"1s\"\n\
         backends = [\n{backends}]\n\
         \n\
         [service.health]\n\
         {HEALTH}\n"
    );
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} over {}", tmp.display(), path.display()))?;
    Ok(())
}

fn names(tasks: &[Task]) -> String {
    tasks
        .iter()
        .map(|t| t.name.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// "web: 127.0.0.1:4001 active/up, ..." for error messages.
fn summary(view: &ServiceView) -> String {
    let b: Vec<String> = view
        .backends
        .iter()
        .map(|b| {
            format!(
                "{} {}/{}{}",
                b.addr,
                b.state,
                b.health,
                if b.ejected { "/ejected" } else { "" }
            )
        })
        .collect();
    format!("{}: [{}]", view.name, b.join(", "))
}

// === process and file helpers ===

/// Sends `sig` to `child` unless it has been reaped already.
fn send_signal(child: &Child, sig: libc::c_int) -> std::io::Result<()> {
    // `id()` is None once the child was reaped, so the pid cannot have been recycled.
    child
        .id()
        .map_or(Ok(()), |pid| crate::sys::send_signal(pid, sig))
}

/// A loopback address whose port was free a moment ago, and never handed out before by
/// this process: the kernel may give a released port to the next `bind(:0)`, and two
/// demo tasks must not be told the same port.
fn free_addr() -> anyhow::Result<SocketAddr> {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    for _ in 0..100 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
        let a = l.local_addr()?;
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if !given.contains(&a.port()) {
            given.push(a.port());
            return Ok(a);
        }
    }
    anyhow::bail!("finding a free port: the kernel keeps handing out ports already in use")
}

/// The last `n` lines of a file (empty if it cannot be read).
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// "400ms", "5s" (the forms mesh.toml and the command line accept).
fn fmt_dur(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn create() -> anyhow::Result<TempDir> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let p = std::env::temp_dir().join(format!("meshd-demo-{}-{nanos}", std::process::id()));
        std::fs::create_dir(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_response_head() {
        let h = parse_head(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\nx-backend: web.v1.1\r\n\r\n");
        assert_eq!(
            h,
            Ok(Head {
                status: 200,
                content_length: Some(9),
                close: false
            })
        );
        let h = parse_head(b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n\r\n");
        assert_eq!(
            h,
            Ok(Head {
                status: 503,
                content_length: None,
                close: true
            })
        );
        assert!(parse_head(b"HTTP/1.0 200 OK\r\n\r\n").is_ok_and(|h| h.close));
        assert!(parse_head(b"SSH-2.0-x\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n").is_err());
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let v: Vec<u32> = (1..=100).map(|i| i * 1000).collect();
        assert_eq!(percentile_ms(&v, 50.0), 50.0);
        assert_eq!(percentile_ms(&v, 99.0), 99.0);
        assert_eq!(percentile_ms(&[1500], 99.0), 1.5);
        assert_eq!(percentile_ms(&[], 50.0), 0.0);
    }

    #[test]
    fn version_is_the_second_part_of_a_task_name() {
        assert_eq!(version_of("web.v2.7"), "v2");
        assert_eq!(version_of("nonsense"), "?");
    }

    #[test]
    fn rows_split_on_bars_into_nine_fields() {
        let mut s = PhaseStats {
            requests: 3,
            failed: 1,
            latencies_us: vec![2000, 1000],
            ..PhaseStats::default()
        };
        s.versions.insert("v1".into(), 2);
        s.errors.insert("read: ConnectionReset".into(), 1);
        let o = Outcome {
            allowed_failures: 1,
            note: "a|b".into(),
            ..Outcome::default()
        };
        let row = Row::new(KILL, s, o, 2);
        assert!(row.problems.is_empty(), "{:?}", row.problems);
        let line = row.format();
        let f: Vec<&str> = line.split('|').map(str::trim).collect();
        assert_eq!(f.len(), 9, "{line}");
        assert_eq!(f[0], KILL);
        assert_eq!(&f[1..7], ["3", "1", "0", "1", "1.00", "2.00"]);
        assert_eq!(f[7], "v1=2");
        assert_eq!(
            f[8],
            "a/b; meshd retried 2 connects; errors: read: ConnectionReset x1"
        );
        assert_eq!(header().split('|').count(), 9);
    }

    #[test]
    fn a_row_fails_on_extra_failures_and_on_wrong_versions() {
        let mut s = PhaseStats {
            requests: 5,
            failed: 1,
            ..PhaseStats::default()
        };
        s.versions.insert("v3".into(), 4);
        let o = Outcome {
            must_answer: Some("v2"),
            must_not_answer: Some("v3"),
            ..Outcome::default()
        };
        let row = Row::new(BROKEN, s, o, 0);
        assert_eq!(row.problems.len(), 3, "{:?}", row.problems);
        let empty = Row::new(BASELINE, PhaseStats::default(), Outcome::default(), 0);
        assert_eq!(empty.problems, ["no request completed"]);
    }
}
