//! Wiring: config -> control plane (listeners, health, table) -> admin -> reloads.
//! [`App::build`] binds (nothing is served, no signal handler: signals are the binary's),
//! [`App::spawn`] serves and returns a [`Running`], [`Running::shutdown`] owns the shutdown
//! sequence: stop accepting, let connections finish up to the longest
//! `drain_timeout`, close the rest, return. The same sequence ends a process that handed
//! its listeners to a successor (`upgrade`); a process started to take over receives them
//! before it binds anything, and says it is ready after its first health round.

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;

use crate::admin::{self, AdminState};
use crate::close::CloseSignal;
use crate::config::Config;
use crate::control::{Command, Control, Status, StatusHandle};
use crate::discovery::providers::Providers;
use crate::proxy::conn::Shared;
use crate::proxy::forward::Mode;
use crate::proxy::{listener, splice};
use crate::table::TableHandle;
use crate::upgrade::{self, Predecessor, ProcessInfo, Upgrades};

/// How long a file must be quiet after a change before it is read (editors write in
/// several steps; a half-written file must not be applied).
const RELOAD_QUIET: Duration = Duration::from_millis(250);

/// The longest a new process waits for its first health round before it tells its
/// predecessor it is ready.
const WARM_UP_MAX: Duration = Duration::from_secs(10);
/// Inherited listeners no service claimed are kept this long after ready (a discovery
/// round may still ask for them), then closed.
const UNCLAIMED_GRACE: Duration = Duration::from_secs(30);

/// meshd bound but not yet serving: a predecessor's listeners taken over (if any), every
/// listener bound, the first table built. Nothing is accepted and no signal handler is
/// installed (signals belong to the binary, `main.rs`); [`App::spawn`] starts serving.
pub struct App {
    config: Config,
    info: Arc<ProcessInfo>,
    handoff: Option<upgrade::Takeover>,
    mode: Mode,
    metrics: Option<&'static metrics_exporter_prometheus::PrometheusHandle>,
    status: StatusHandle,
    tracker: TaskTracker,
    admin_listener: tokio::net::TcpListener,
    admin_served: upgrade::sockets::Registered,
    control: Control,
}

impl App {
    /// Takes over the listeners of the meshd at `takeover` (or `[upgrade] socket`), then
    /// binds the admin address and every service's listeners: a port in use is an error
    /// here, before anything is served. The data plane (accept loops, connections, UDP
    /// flows) runs on `data`; everything else on the runtime that calls this (the binary
    /// gives each its own threads; a test may pass `Handle::current()`).
    pub async fn build(
        config: Config,
        takeover: Option<PathBuf>,
        data: tokio::runtime::Handle,
    ) -> anyhow::Result<App> {
        let info = Arc::new(ProcessInfo::current());
        // A predecessor's listeners first: every bind below takes them instead of binding.
        let from = match (takeover, &config.upgrade.socket) {
            (Some(p), _) => Some(Predecessor::Required(p)),
            (None, Some(p)) => Some(Predecessor::IfPresent(p.clone())),
            (None, None) => None,
        };
        let handoff = match from {
            None => None,
            Some(from) => {
                let what = match &from {
                    Predecessor::Required(p) | Predecessor::IfPresent(p) => p.display().to_string(),
                };
                match tokio::task::spawn_blocking(move || upgrade::take_over(from)).await? {
                    Ok(t) => t,
                    Err(e) => anyhow::bail!("cannot take over from the meshd at {what}: {e}"),
                }
            }
        };
        if let Some(t) = &handoff {
            tracing::info!(
                listeners = t.received,
                "upgrade: took the running meshd's listeners; warming up"
            );
        }
        match crate::sys::raise_nofile() {
            Ok(n) => tracing::info!(nofile = n, "open-files limit"),
            Err(e) => tracing::warn!(error = %e, "cannot raise the open-files limit"),
        }
        let mode = if splice::probe() {
            Mode::Splice
        } else {
            tracing::warn!("splice(2) unavailable: forwarding with a buffered copy");
            Mode::Copy
        };
        let metrics = if !config.admin.metrics {
            tracing::info!(
                "[admin] metrics = false: no metrics are recorded, /metrics answers 404"
            );
            None
        } else {
            match crate::metrics::install() {
                Ok(h) => Some(h),
                Err(e) => {
                    tracing::warn!(error = %e, "metrics exporter not installed: /metrics disabled");
                    None
                }
            }
        };

        let (ejected_tx, ejected_rx) = mpsc::unbounded_channel();
        let table = TableHandle::new();
        let shared = Arc::new(Shared {
            mode,
            access_log: AtomicBool::new(config.log.access_log),
            ejected: ejected_tx,
            table: table.clone(),
        });
        let status = Arc::new(ArcSwap::from_pointee(Status::default()));
        let tracker = TaskTracker::new();

        // Bind everything before serving anything: a port in use is fatal at start.
        let admin_listener = listener::bind(config.admin.listen, 128).map_err(|e| {
            anyhow::anyhow!(crate::control::bind_error("admin", config.admin.listen, &e))
        })?;
        let admin_listener = tokio::net::TcpListener::from_std(admin_listener)?;
        let admin_served = upgrade::sockets::register(
            upgrade::sockets::Kind::Admin,
            config.admin.listen,
            admin_listener.as_fd(),
        )?;
        let mut control = Control::new(table, status.clone(), shared, tracker.clone(), ejected_rx);
        control.set_data_runtime(data);
        control.start(&config).map_err(anyhow::Error::msg)?;
        control.publish();
        Ok(App {
            config,
            info,
            handoff,
            mode,
            metrics,
            status,
            tracker,
            admin_listener,
            admin_served,
            control,
        })
    }

    /// The admin API's address (useful when `[admin] listen` asked for port 0).
    pub fn admin_addr(&self) -> std::io::Result<SocketAddr> {
        self.admin_listener.local_addr()
    }

    /// Serves: the control plane, the admin API, discovery, the reload watcher. After a
    /// take-over, returns once the predecessor was told this process is ready (its first
    /// health round is over).
    pub async fn spawn(self) -> anyhow::Result<Running> {
        let App {
            config,
            info,
            handoff,
            mode,
            metrics,
            status,
            tracker,
            admin_listener,
            admin_served,
            control,
        } = self;
        let upkeep = metrics.map(|h| tokio::spawn(crate::metrics::upkeep(h)));
        let (cmd_tx, cmd_rx) = mpsc::channel(64);
        let (update_tx, update_rx) = mpsc::channel(64);
        let accept_loops = control.accept_loops();
        let control_task = tokio::spawn(control.run(cmd_rx, update_rx));

        // The desired-state feed: what the Docker provider reads, served to followers.
        let (feed_tx, feed_rx) =
            tokio::sync::watch::channel(crate::discovery::feed::FeedState::default());
        let (upgraded_tx, upgraded_rx) = mpsc::unbounded_channel();
        let upgrades = Arc::new(Upgrades {
            info: info.clone(),
            timeout: config.upgrade.timeout,
            done: upgraded_tx.clone(),
        });
        let admin_state = Arc::new(AdminState {
            upgrades: upgrades.clone(),
            feed: config.discovery.docker.as_ref().map(|_| feed_rx),
            status: status.clone(),
            commands: cmd_tx.clone(),
            token: ArcSwapOption::from(config.admin.token.clone().map(Arc::new)),
            ready: AtomicBool::new(false),
            in_flight: std::sync::atomic::AtomicUsize::new(0),
            accepting: AtomicBool::new(true),
            metrics,
        });
        let admin_stop = Arc::new(CloseSignal::new());
        let admin_task = tokio::spawn(admin::serve(
            admin_listener,
            admin_state.clone(),
            admin_stop.clone(),
        ));
        // Discovery providers; a reload that changes their settings restarts them.
        let providers = Providers::start(&config, update_tx, Arc::new(feed_tx));

        // The watch is set up before /readyz says ready: a change made right after must not
        // fall between the two (it would be neither seen nor compared).
        let (ftx, frx) = mpsc::channel::<()>(1);
        let watcher = watch_file(&config.path, ftx);
        let last_text: Option<String> = std::fs::read_to_string(&config.path).ok();
        let mut certs = CertWatch::new();
        certs.watch(&config);
        let (reload_tx, reload_rx) = mpsc::channel::<()>(1);
        let reloader = tokio::spawn(watch_reloads(
            config.path.clone(),
            (watcher, frx, last_text, certs),
            reload_rx,
            cmd_tx.clone(),
            admin_state.clone(),
            providers,
        ));
        admin_state.ready.store(true, Ordering::Release);
        tracing::info!(
            admin = %config.admin.listen,
            services = config.services.len(),
            mode = ?mode,
            "meshd ready"
        );

        let took_over = handoff.is_some();
        if let Some(t) = handoff {
            warm_up(&status, WARM_UP_MAX).await;
            let taken = upgrade::sockets::INHERITED_TAKEN.load(Ordering::Relaxed);
            // The old process may be gone already (stopped while this one warmed up, e.g.
            // by a Swarm start-first update's SIGTERM): the listeners are this process's
            // now, and it serves on.
            match tokio::task::spawn_blocking(move || t.ready()).await? {
                Ok(()) => tracing::info!(
                    inherited = taken,
                    "upgrade: ready; the old meshd stops accepting and drains"
                ),
                Err(e) => tracing::warn!(
                    inherited = taken,
                    error = %e,
                    "upgrade: the old meshd did not hear that this one is ready (it was stopped?); serving on"
                ),
            }
            tokio::spawn(async {
                tokio::time::sleep(UNCLAIMED_GRACE).await;
                let gone = upgrade::sockets::close_unclaimed();
                if !gone.is_empty() {
                    tracing::info!(addrs = ?gone, "inherited listeners no service asked for were closed");
                }
            });
        }
        // systemd (Type=notify, NotifyAccess=all): ready, and after an upgrade the main
        // process is this one. Nothing happens outside systemd (no NOTIFY_SOCKET).
        let mut notify = vec![sd_notify::NotifyState::Ready];
        if took_over {
            notify.insert(0, sd_notify::NotifyState::MainPid(std::process::id()));
        }
        if let Err(e) = sd_notify::notify(false, &notify) {
            tracing::warn!(error = %e, "cannot notify systemd");
        }
        // `[upgrade] socket`: from now on, a meshd that starts with the same setting takes
        // over.
        let socket_server = match &config.upgrade.socket {
            None => None,
            Some(p) => Some(
                upgrade::serve_socket(p, info.clone(), config.upgrade.timeout, upgraded_tx)
                    .with_context(|| format!("serving the upgrade socket {}", p.display()))?,
            ),
        };
        Ok(Running {
            info,
            upgrades,
            upgraded_rx,
            upgrade_timeout: config.upgrade.timeout,
            drain_timeout: config.max_drain_timeout(),
            handed_over: false,
            cmd_tx,
            control_task,
            admin_state,
            admin_stop,
            admin_task,
            admin_served,
            accept_loops,
            socket_server,
            reload_tx,
            reloader,
            upkeep,
            tracker,
        })
    }
}

/// A serving meshd. The binary drives it from signals (SIGHUP [`Running::reload`],
/// SIGUSR2 [`Running::upgrade`], SIGTERM [`Running::shutdown`]); a test drives it the same
/// way in-process.
pub struct Running {
    info: Arc<ProcessInfo>,
    upgrades: Arc<Upgrades>,
    upgraded_rx: mpsc::UnboundedReceiver<upgrade::Outcome>,
    upgrade_timeout: Duration,
    drain_timeout: Duration,
    handed_over: bool,
    cmd_tx: mpsc::Sender<Command>,
    control_task: tokio::task::JoinHandle<()>,
    admin_state: Arc<AdminState>,
    admin_stop: Arc<CloseSignal>,
    admin_task: tokio::task::JoinHandle<()>,
    admin_served: upgrade::sockets::Registered,
    accept_loops: TaskTracker,
    socket_server: Option<upgrade::SocketServer>,
    reload_tx: mpsc::Sender<()>,
    reloader: tokio::task::JoinHandle<()>,
    upkeep: Option<tokio::task::JoinHandle<()>>,
    tracker: TaskTracker,
}

impl Running {
    /// Reads the config file again and applies it (as SIGHUP does). A reload already
    /// asked for and not yet started covers this one.
    pub fn reload(&self) {
        let _ = self.reload_tx.try_send(());
    }

    /// Starts a successor from the binary on disk and hands it the listeners (as SIGUSR2
    /// does); [`Running::handed_over`] resolves when it is ready.
    pub fn upgrade(&self) {
        let u = self.upgrades.clone();
        tokio::spawn(async move { u.upgrade(None, None).await });
    }

    /// A hand-off to a successor is in flight.
    pub fn upgrading(&self) -> bool {
        self.info.upgrading.load(Ordering::Acquire)
    }

    /// Resolves when a successor (started by [`Running::upgrade`], the admin API or a
    /// meshd on `[upgrade] socket`) is ready: this process should then shut down. A
    /// failed hand-off is logged and waited past. Cancel-safe.
    pub async fn handed_over(&mut self) -> u32 {
        loop {
            let Some(out) = self.upgraded_rx.recv().await else {
                return std::future::pending().await;
            };
            if let Some(pid) = self.outcome(out, false) {
                return pid;
            }
        }
    }

    /// Counts and logs a hand-off's outcome; the successor's pid if it took over.
    /// `stopping`: this process was asked to stop meanwhile (it will not serve on).
    fn outcome(&mut self, out: upgrade::Outcome, stopping: bool) -> Option<u32> {
        out.count();
        match out.result {
            Ok(pid) => {
                tracing::info!(
                    new_pid = pid,
                    "upgrade: the new meshd is ready; handing over"
                );
                self.handed_over = true;
                Some(pid)
            }
            Err(e) if stopping => {
                tracing::error!(error = %e, "upgrade failed while stopping");
                None
            }
            Err(e) => {
                tracing::error!(error = %e, "upgrade failed; this meshd keeps serving");
                None
            }
        }
    }

    /// Asked to stop while handing over (a Swarm start-first update stops the old task as
    /// soon as the new one runs): waits for the hand-off's outcome, up to `[upgrade]
    /// timeout`, so that someone accepts all along. True if the successor took over.
    pub async fn finish_handover(&mut self) -> bool {
        match tokio::time::timeout(self.upgrade_timeout, self.upgraded_rx.recv()).await {
            Ok(Some(out)) => self.outcome(out, true).is_some(),
            _ => false,
        }
    }

    /// The longest `drain_timeout` of the running config: the grace a shutdown gives.
    pub fn drain_timeout(&self) -> Duration {
        self.drain_timeout
    }

    /// Stops accepting, lets connections finish for up to `grace`, closes the rest, and
    /// returns when every task of this meshd has ended. After a hand-off the admin
    /// address is the successor's at once, and the request that asked for the upgrade is
    /// answered first.
    pub async fn shutdown(self, grace: Duration) {
        let Running {
            handed_over,
            cmd_tx,
            control_task,
            admin_state,
            admin_stop,
            admin_task,
            admin_served,
            accept_loops,
            socket_server,
            reloader,
            upkeep,
            tracker,
            ..
        } = self;
        if handed_over {
            // The successor answers the admin address from now on.
            admin_stop.close();
        }
        if let Some(s) = &socket_server {
            s.close(!handed_over);
        }
        tracing::info!(
            handed_over,
            grace_ms = grace.as_millis() as u64,
            "shutting down: listeners closed, draining connections"
        );
        reloader.abort();
        admin_state.ready.store(false, Ordering::Release);
        let (tx, rx) = oneshot::channel();
        if cmd_tx.send(Command::StopListening(tx)).await.is_ok() {
            let _ = rx.await;
        }
        // Every accept loop sees its stop at once; when they have returned, no listening
        // socket of this meshd is open any more (in-process, the ports are free again).
        accept_loops.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), accept_loops.wait()).await;
        tracker.close();
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            tracing::warn!(
                remaining = tracker.len(),
                "drain grace period over: closing the remaining connections"
            );
            let (tx, rx) = oneshot::channel();
            if cmd_tx.send(Command::CloseAll(tx)).await.is_ok() {
                let _ = rx.await;
            }
            let _ = tokio::time::timeout(Duration::from_secs(2), tracker.wait()).await;
        }
        admin_stop.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), admin_task).await;
        if handed_over {
            // The request that started the hand-off is answered before this process exits
            // (up to 2 s; the answer is written a moment after its handler returns).
            let end = tokio::time::Instant::now() + Duration::from_secs(2);
            while admin_state.in_flight.load(Ordering::Acquire) > 0
                && tokio::time::Instant::now() < end
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(admin_served);
        drop(cmd_tx);
        drop(admin_state);
        control_task.abort();
        let _ = control_task.await;
        if let Some(u) = upkeep {
            u.abort();
        }
        tracing::info!("meshd stopped");
    }
}

/// Reloads when asked ([`Running::reload`], SIGHUP), when the config file changes, and
/// when a terminating service's certificate or key file changes (the whole config is read
/// again: a certificate that does not load fails the reload like a bad config, and the
/// old table is kept). Watches the files' directories (not the files), so editors and
/// config managers that replace a file by rename are followed.
async fn watch_reloads(
    path: PathBuf,
    watch: (
        Option<notify::RecommendedWatcher>,
        mpsc::Receiver<()>,
        Option<String>,
        CertWatch,
    ),
    mut asked: mpsc::Receiver<()>,
    commands: mpsc::Sender<Command>,
    admin: Arc<AdminState>,
    mut providers: Providers,
) {
    let (_watcher, mut frx, mut last_text, mut certs) = watch;
    loop {
        // `forced`: read and apply even if the config file's text is unchanged.
        let (forced, reason) = tokio::select! {
            Some(()) = asked.recv() => (true, "SIGHUP"),
            Some(()) = frx.recv() => (false, "file changed"),
            Some(()) = certs.rx.recv() => (true, "certificate files changed"),
        };
        if reason != "SIGHUP" {
            // Wait for the writes to settle (a certificate and its key are two files).
            loop {
                tokio::select! {
                    Some(()) = frx.recv() => {}
                    Some(()) = certs.rx.recv() => {}
                    _ = tokio::time::sleep(RELOAD_QUIET) => break,
                }
            }
        }
        // Reading and parsing (a third of a 1,000-service reload) run on a blocking thread,
        // so connections on the runtime thread are not held up by a large file.
        let p = path.clone();
        let text = match tokio::task::spawn_blocking(move || std::fs::read_to_string(&p)).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                let msg = format!("{}: cannot read: {e}", path.display());
                let _ = commands.send(Command::ReloadFailed(msg)).await;
                continue;
            }
            Err(_) => return, // the runtime is shutting down
        };
        if !forced && last_text.as_deref() == Some(text.as_str()) {
            continue; // touched but unchanged
        }
        tracing::info!(reason, "reloading config");
        let p = path.clone();
        let Ok((text, parsed)) = tokio::task::spawn_blocking(move || {
            let parsed = Config::parse(&p, &text);
            (text, parsed)
        })
        .await
        else {
            return;
        };
        last_text = Some(text);
        match parsed {
            Err(e) => {
                let _ = commands.send(Command::ReloadFailed(e.to_string())).await;
            }
            Ok(cfg) => {
                certs.watch(&cfg);
                let token = cfg.admin.token.clone().map(Arc::new);
                let applied = cfg.clone();
                let (tx, rx) = oneshot::channel();
                if commands
                    .send(Command::Reload(Box::new(cfg), tx))
                    .await
                    .is_err()
                {
                    return;
                }
                if let Ok(Ok(())) = rx.await {
                    admin.token.store(token);
                    providers.apply(&applied);
                }
            }
        }
    }
}

/// The certificate and key files of the config's terminating services, watched for
/// changes (a change triggers a reload).
struct CertWatch {
    /// Sorted, deduplicated.
    files: Vec<PathBuf>,
    watcher: Option<notify::RecommendedWatcher>,
    tx: mpsc::Sender<()>,
    rx: mpsc::Receiver<()>,
}

impl CertWatch {
    fn new() -> CertWatch {
        let (tx, rx) = mpsc::channel(1);
        CertWatch {
            files: Vec::new(),
            watcher: None,
            tx,
            rx,
        }
    }

    /// Watches `cfg`'s files from now on (a new watcher only when the set changed).
    fn watch(&mut self, cfg: &Config) {
        let mut files: Vec<PathBuf> = cfg
            .services
            .iter()
            .filter_map(|s| s.tls.as_ref()?.terminate.as_ref())
            .flat_map(|t| [t.cert.clone(), t.key.clone()])
            .collect();
        files.sort();
        files.dedup();
        if files == self.files {
            return;
        }
        self.watcher = None;
        if !files.is_empty() {
            self.watcher = watch_files(&files, self.tx.clone());
        }
        self.files = files;
    }
}

/// Watches the directories of `files` and signals `tx` when an event names one of them.
fn watch_files(files: &[PathBuf], tx: mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let dir_of = |p: &Path| match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let names: Vec<std::ffi::OsString> = files
        .iter()
        .filter_map(|f| f.file_name().map(ToOwned::to_owned))
        .collect();
    let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            if ev.kind.is_access() {
                return;
            }
            if ev
                .paths
                .iter()
                .any(|p| p.file_name().is_some_and(|n| names.iter().any(|x| x == n)))
            {
                let _ = tx.try_send(());
            }
        }
    })
    .map_err(|e| tracing::warn!(error = %e, "cannot watch the TLS certificate files: reload with SIGHUP after changing them"))
    .ok()?;
    let mut dirs: Vec<PathBuf> = files.iter().map(|f| dir_of(f)).collect();
    dirs.sort();
    dirs.dedup();
    for dir in dirs {
        if let Err(e) = w.watch(&dir, notify::RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch a TLS certificate directory: reload with SIGHUP after changing its files");
        }
    }
    Some(w)
}

fn watch_file(path: &Path, tx: mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name()?.to_owned();
    let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            if ev.kind.is_access() {
                return;
            }
            if ev
                .paths
                .iter()
                .any(|p| p.file_name() == Some(name.as_os_str()))
            {
                let _ = tx.try_send(());
            }
        }
    })
    .map_err(|e| tracing::warn!(error = %e, "cannot watch the config file: reload with SIGHUP"))
    .ok()?;
    if let Err(e) = w.watch(&dir, notify::RecursiveMode::NonRecursive) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the config directory: reload with SIGHUP");
        return None;
    }
    Some(w)
}

/// A new process's first health round: until no backend waits for its first verdict (a
/// backend of unknown health gets no connection), or `max`.
async fn warm_up(status: &crate::control::StatusHandle, max: Duration) {
    let end = tokio::time::Instant::now() + max;
    loop {
        let pending = status
            .load()
            .services
            .iter()
            .flatten()
            .flat_map(|s| s.backends.iter())
            .any(|b| b.backend.health() == crate::table::Health::Unknown);
        if !pending || tokio::time::Instant::now() >= end {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
