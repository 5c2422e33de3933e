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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinSet;

use super::cluster::*;
use super::load::*;

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
pub(super) const SERVICE: &str = "web";
/// Tasks at the start and after scaling down.
pub(super) const BASE_TASKS: usize = 2;
/// Tasks after scaling up.
pub(super) const SCALED_TASKS: usize = 6;
/// How late a task binds its port after it starts.
pub(super) const BIND_DELAY: &str = "400ms";
/// How long a task may take to finish in-flight requests after SIGTERM.
pub(super) const TASK_GRACE: Duration = Duration::from_secs(5);
/// The health check meshd runs on every task.
pub(super) const HEALTH: &str = "check = \"http\"\npath = \"/healthz\"\ninterval = \"200ms\"\ntimeout = \"200ms\"\nrise = 2\nfall = 2";
/// How long a removed task keeps running before its stop signal. Swarm waits 2 s between
/// unpublishing a task and sending SIGTERM (moby PR #31142); meshd must stop sending it new
/// connections within this window. This is the orchestrator's policy, not a synchronisation:
/// the demo checks afterwards that meshd did drain the task in time.
pub(super) const STOP_WINDOW: Duration = Duration::from_secs(1);
/// How long the orchestrator watches a new release before it gives up on it and rolls back
/// (Swarm's `update_config.monitor`, shortened).
pub(super) const MONITOR: Duration = Duration::from_secs(2);
/// The longest a new task may take to be reported healthy (it needs ~1 s: bind delay,
/// reload, two checks).
pub(super) const HEALTHY_WITHIN: Duration = Duration::from_secs(10);
/// The longest meshd may take to notice a killed task (two failed checks: ~0.5 s).
pub(super) const NOTICED_WITHIN: Duration = Duration::from_secs(5);
/// How often the orchestrator polls `/api/v1/services`.
pub(super) const POLL: Duration = Duration::from_millis(50);
/// A request with no complete answer after this long failed.
pub(super) const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The pause between two requests of one client. It keeps the load bounded (about
/// `clients / PACE` requests per second at most) so that one small machine can run meshd,
/// up to eight tasks and the clients at once without starving the health checks.
pub(super) const PACE: Duration = Duration::from_millis(10);
/// The longest the admin API may take to answer one call.
pub(super) const ADMIN_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the orchestrator waits for a busybox task to exit after SIGTERM before it
/// sends SIGKILL (it never exits: it ignores SIGTERM). Swarm waits 10 s by default.
pub(super) const RUDE_GRACE: Duration = Duration::from_secs(1);
/// busybox httpd tasks in the rude phase.
pub(super) const RUDE_TASKS: usize = 2;
/// The longest meshd may take to exit after SIGTERM once the load stopped.
pub(super) const MESHD_EXIT_WITHIN: Duration = Duration::from_secs(10);

// Phase names: the first column of the table.
pub(super) const BASELINE: &str = "baseline 2 x v1";
pub(super) const SCALE_UP: &str = "scale 2->6";
pub(super) const SCALE_DOWN: &str = "scale 6->2";
pub(super) const STOP_FIRST: &str = "update v1->v2 stop-first";
pub(super) const START_FIRST: &str = "update v2->v1 start-first";
pub(super) const BROKEN: &str = "broken v3 rolled back";
pub(super) const KILL: &str = "kill -9 one task";
pub(super) const RUDE: &str = "rude tasks: busybox httpd";
pub(super) const PHASES: [&str; 8] = [
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

pub(super) async fn demo(opts: &DemoOpts, dir: &Path) -> anyhow::Result<()> {
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

pub(super) async fn scenario(opts: &DemoOpts, c: &mut Cluster) -> anyhow::Result<Vec<Row>> {
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

pub(super) async fn scale_up(c: &mut Cluster) -> anyhow::Result<Outcome> {
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

pub(super) async fn scale_down(c: &mut Cluster) -> anyhow::Result<Outcome> {
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

pub(super) async fn update_stop_first(
    c: &mut Cluster,
    to: &'static str,
) -> anyhow::Result<Outcome> {
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

pub(super) async fn update_start_first(
    c: &mut Cluster,
    to: &'static str,
) -> anyhow::Result<Outcome> {
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

pub(super) async fn broken_release(c: &mut Cluster) -> anyhow::Result<Outcome> {
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

pub(super) async fn kill_one(c: &mut Cluster) -> anyhow::Result<Outcome> {
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
pub(super) async fn rude_tasks(
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
pub(super) async fn burst_client(load: Arc<Load>, stop: Arc<AtomicBool>) {
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
pub(super) fn busybox() -> Option<PathBuf> {
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
pub(super) fn listen_overflows() -> u64 {
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
pub(super) struct Outcome {
    /// Failures the phase may have without failing the demo (only a kill -9 has any).
    pub(super) allowed_failures: u64,
    /// The version being rolled out: it must have answered.
    pub(super) must_answer: Option<&'static str>,
    /// A broken version: it must not have answered.
    pub(super) must_not_answer: Option<&'static str>,
    /// What the action saw go wrong in meshd (fails the demo).
    pub(super) problems: Vec<String>,
    pub(super) note: String,
}

impl Outcome {
    pub(super) fn with_note(note: String) -> Outcome {
        Outcome {
            note,
            ..Outcome::default()
        }
    }
}

/// Runs phases back to back under the load and prints a row as each one ends.
pub(super) struct Runner {
    pub(super) phase: Duration,
    pub(super) load: Arc<Load>,
    pub(super) admin: SocketAddr,
    /// Problems the orchestrator saw during the current phase's action.
    pub(super) problems: Problems,
    /// When the current phase began (the previous one ended).
    pub(super) started: Instant,
    /// meshd's `connect_retries` counter when the current phase began.
    pub(super) retries_at_start: u64,
    pub(super) rows: Vec<Row>,
}

impl Runner {
    pub(super) fn new(
        phase: Duration,
        load: Arc<Load>,
        admin: SocketAddr,
        problems: Problems,
    ) -> Runner {
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
    pub(super) async fn phase(
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
pub(super) struct Problems(pub(super) Arc<Mutex<Vec<String>>>);

impl Problems {
    pub(super) fn report(&self, p: String) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(p);
    }

    pub(super) fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// One line of the table.
#[derive(Debug)]
pub(super) struct Row {
    pub(super) name: &'static str,
    pub(super) requests: u64,
    pub(super) failed: u64,
    pub(super) retried: u64,
    pub(super) allowed: u64,
    pub(super) p50_ms: f64,
    pub(super) p99_ms: f64,
    pub(super) versions: BTreeMap<String, u64>,
    pub(super) note: String,
    /// Why this phase fails the demo (empty: it passed).
    pub(super) problems: Vec<String>,
}

impl Row {
    pub(super) fn new(
        name: &'static str,
        mut s: PhaseStats,
        o: Outcome,
        meshd_retries: u64,
    ) -> Row {
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

    pub(super) fn format(&self) -> String {
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

pub(super) fn header() -> String {
    format!(
        "{:<26} | {:>8} | {:>6} | {:>7} | {:>7} | {:>6} | {:>6} | {:<20} | note",
        "phase", "requests", "failed", "retried", "allowed", "p50 ms", "p99 ms", "versions"
    )
}

/// Prints the verdict line; `Err` when the demo failed.
pub(super) fn verdict(rows: &[Row], meshd_exit: anyhow::Result<()>) -> anyhow::Result<()> {
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
pub(super) fn percentile_ms(sorted_us: &[u32], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted_us.len() as f64).ceil() as usize;
    let i = rank.clamp(1, sorted_us.len()) - 1;
    f64::from(sorted_us[i]) / 1000.0
}
