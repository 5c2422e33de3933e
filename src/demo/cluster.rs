//! `meshd demo`'s cluster: the meshd child and its `mesh.toml`, the task processes, the
//! orchestrator's view of meshd (`/api/v1/services`), and the process and file helpers.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use serde::Deserialize;
use tokio::process::{Child, Command};

use super::load::*;
use super::scenario::*;

// === meshd's view (the subset of /api/v1/services the orchestrator reads) ===

#[derive(Debug, Deserialize)]
pub(super) struct ServicesView {
    pub(super) services: Vec<ServiceView>,
}

#[derive(Debug, Clone, Deserialize)]
pub(super) struct ServiceView {
    pub(super) name: String,
    pub(super) connect_retries: u64,
    pub(super) backends: Vec<BackendView>,
}

#[derive(Debug, Clone, Deserialize)]
pub(super) struct BackendView {
    pub(super) addr: SocketAddr,
    /// active | draining | gone
    pub(super) state: String,
    /// unknown | up | down
    pub(super) health: String,
    pub(super) ejected: bool,
    pub(super) active_connections: u64,
    pub(super) connections_total: u64,
}

impl ServiceView {
    pub(super) fn backend(&self, addr: SocketAddr) -> Option<&BackendView> {
        self.backends.iter().find(|b| b.addr == addr)
    }
}

impl BackendView {
    pub(super) fn healthy(&self) -> bool {
        self.state == "active" && self.health == "up" && !self.ejected
    }
}

/// Service `web` as meshd reports it.
pub(super) async fn service(admin: SocketAddr) -> anyhow::Result<ServiceView> {
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
pub(super) struct Task {
    /// The K in `web.vN.K`: unique for the whole demo.
    pub(super) id: u32,
    pub(super) name: String,
    pub(super) addr: SocketAddr,
    /// Listed in `mesh.toml`.
    pub(super) listed: bool,
    /// Killed on drop (with its process group, see `Drop`).
    pub(super) child: Child,
    pub(super) log: PathBuf,
    /// How long the orchestrator waits for it to exit after SIGTERM before SIGKILL.
    pub(super) grace: Duration,
    /// busybox httpd: ignores SIGTERM (expected, not a problem), forks per connection.
    pub(super) rude: bool,
}

impl Drop for Task {
    fn drop(&mut self) {
        kill_group(&self.child);
    }
}

/// SIGKILL to a task's whole process group (busybox httpd's forked children too), then
/// the task itself. Only while the task is not reaped: until then its pid, which is also
/// its group's id, cannot belong to anyone else.
pub(super) fn kill_group(child: &Child) {
    if let Some(pid) = child.id() {
        let _ = crate::sys::signal_group(pid, libc::SIGKILL);
    }
}

/// What a `kill -9` left behind.
pub(super) struct Killed {
    pub(super) name: String,
    pub(super) addr: SocketAddr,
    /// Connections that were open on the task when it died (an upper bound).
    pub(super) open: u64,
}

/// The orchestrator's world. Dropping it kills every process it started.
pub(super) struct Cluster {
    pub(super) exe: PathBuf,
    pub(super) dir: PathBuf,
    pub(super) config: PathBuf,
    pub(super) admin: SocketAddr,
    pub(super) listen: SocketAddr,
    /// meshd itself; killed on drop.
    pub(super) meshd: Child,
    /// What meshd got wrong while the orchestrator worked (read by the phase runner).
    pub(super) problems: Problems,
    pub(super) tasks: Vec<Task>,
    pub(super) next_id: u32,
}

impl Cluster {
    /// Starts two v1 tasks and meshd in front of them; returns once they are healthy.
    pub(super) async fn start(exe: PathBuf, dir: &Path) -> anyhow::Result<Cluster> {
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

    pub(super) async fn wait_ready(&mut self) -> anyhow::Result<()> {
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

    pub(super) fn task(&self, id: u32) -> Option<&Task> {
        self.tasks.iter().find(|t| t.id == id)
    }

    pub(super) fn task_mut(&mut self, id: u32) -> anyhow::Result<&mut Task> {
        self.tasks
            .iter_mut()
            .find(|t| t.id == id)
            .ok_or_else(|| anyhow!("demo: no task {id}"))
    }

    /// Starts a task process (not listed yet); returns its id.
    pub(super) fn spawn_task(&mut self, version: &str, broken: bool) -> anyhow::Result<u32> {
        let id = self.next_id;
        self.next_id += 1;
        let t = Task::spawn(&self.exe, &self.dir, id, version, broken)?;
        tracing::info!(task = %t.name, addr = %t.addr, "task started");
        self.tasks.push(t);
        Ok(id)
    }

    /// Starts a busybox httpd task (not listed yet); returns its id.
    pub(super) fn spawn_busybox(&mut self, busybox: &Path, version: &str) -> anyhow::Result<u32> {
        let id = self.next_id;
        self.next_id += 1;
        let t = Task::spawn_busybox(busybox, &self.dir, id, version)?;
        tracing::info!(task = %t.name, addr = %t.addr, "busybox httpd task started");
        self.tasks.push(t);
        Ok(id)
    }

    /// Lists tasks in mesh.toml: meshd health-gates them.
    pub(super) fn list(&mut self, ids: &[u32]) -> anyhow::Result<()> {
        for &id in ids {
            self.task_mut(id)?.listed = true;
        }
        self.publish()?;
        tracing::info!(tasks = %self.names(ids), "tasks listed in mesh.toml");
        Ok(())
    }

    /// Unlists a task that is already dead and forgets it.
    pub(super) fn unlist(&mut self, id: u32) -> anyhow::Result<()> {
        self.task_mut(id)?.listed = false;
        self.publish()?;
        tracing::info!(tasks = %self.names(&[id]), "dead task unlisted");
        self.tasks.retain(|t| t.id != id);
        Ok(())
    }

    /// Swarm's order: unlist (meshd drains them), wait `STOP_WINDOW`, SIGTERM, reap.
    pub(super) async fn remove(&mut self, ids: &[u32]) -> anyhow::Result<()> {
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
    pub(super) async fn kill(&mut self, id: u32) -> anyhow::Result<Killed> {
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
    pub(super) async fn wait_healthy(&mut self, ids: &[u32]) -> anyhow::Result<()> {
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
    pub(super) async fn wait_for(
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

    pub(super) async fn service(&self) -> anyhow::Result<ServiceView> {
        service(self.admin).await
    }

    /// Rewrites mesh.toml with the listed tasks (temp file, then rename).
    pub(super) fn publish(&self) -> anyhow::Result<()> {
        write_config(&self.config, self.admin, self.listen, &self.tasks)
    }

    pub(super) fn names(&self, ids: &[u32]) -> String {
        let tasks: Vec<&Task> = self.tasks.iter().filter(|t| ids.contains(&t.id)).collect();
        tasks
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Stops meshd (SIGTERM: it must drain and exit 0), then every task (SIGTERM).
    pub(super) async fn shutdown(&mut self) -> anyhow::Result<()> {
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
    pub(super) fn spawn(
        exe: &Path,
        dir: &Path,
        id: u32,
        version: &str,
        broken: bool,
    ) -> anyhow::Result<Task> {
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
    pub(super) fn spawn_busybox(
        busybox: &Path,
        dir: &Path,
        id: u32,
        version: &str,
    ) -> anyhow::Result<Task> {
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
pub(super) fn command(exe: &Path) -> Command {
    let mut cmd = Command::new(exe);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .env("RUST_LOG", "info")
        .process_group(0)
        .kill_on_drop(true);
    cmd
}

pub(super) fn write_config(
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

pub(super) fn names(tasks: &[Task]) -> String {
    tasks
        .iter()
        .map(|t| t.name.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// "web: 127.0.0.1:4001 active/up, ..." for error messages.
pub(super) fn summary(view: &ServiceView) -> String {
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
pub(super) fn send_signal(child: &Child, sig: libc::c_int) -> std::io::Result<()> {
    // `id()` is None once the child was reaped, so the pid cannot have been recycled.
    child
        .id()
        .map_or(Ok(()), |pid| crate::sys::send_signal(pid, sig))
}

/// A loopback address whose port was free a moment ago, and never handed out before by
/// this process: the kernel may give a released port to the next `bind(:0)`, and two
/// demo tasks must not be told the same port.
pub(super) fn free_addr() -> anyhow::Result<SocketAddr> {
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
pub(super) fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// "400ms", "5s" (the forms mesh.toml and the command line accept).
pub(super) fn fmt_dur(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// A directory removed on drop.
pub(super) struct TempDir(pub(super) PathBuf);

impl TempDir {
    pub(super) fn create() -> anyhow::Result<TempDir> {
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
