//! Wiring: config -> control plane (listeners, health, table) -> admin -> reloads -> signals.
//! Owns the shutdown sequence: stop accepting, let connections finish up to the longest
//! `drain_timeout`, close the rest, return.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;

use crate::admin::{self, AdminState};
use crate::close::CloseSignal;
use crate::config::Config;
use crate::control::{Command, Control, Status};
use crate::proxy::conn::Shared;
use crate::proxy::forward::Mode;
use crate::proxy::{listener, splice};
use crate::table::TableHandle;

/// How long a file must be quiet after a change before it is read (editors write in
/// several steps; a half-written file must not be applied).
const RELOAD_QUIET: Duration = Duration::from_millis(250);

/// Runs meshd until SIGTERM/SIGINT, then drains and returns.
pub async fn run(config: Config) -> anyhow::Result<()> {
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
        tracing::info!("[admin] metrics = false: no metrics are recorded, /metrics answers 404");
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

    if let Some(h) = metrics {
        tokio::spawn(crate::metrics::upkeep(h));
    }

    // Signal handlers first: a signal that arrives once we are ready must find them.
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;

    let (ejected_tx, ejected_rx) = mpsc::unbounded_channel();
    let table = TableHandle::new();
    let shared: &'static Shared = Box::leak(Box::new(Shared {
        mode,
        access_log: AtomicBool::new(config.log.access_log),
        ejected: ejected_tx,
        table: table.clone(),
    }));
    let status = Arc::new(ArcSwap::from_pointee(Status::default()));
    let tracker = TaskTracker::new();

    // Bind everything before serving anything: a port in use is fatal at start.
    let admin_listener = listener::bind(config.admin.listen, 128).map_err(|e| {
        anyhow::anyhow!(crate::control::bind_error("admin", config.admin.listen, &e))
    })?;
    let admin_listener = tokio::net::TcpListener::from_std(admin_listener)?;
    let mut control = Control::new(
        table.clone(),
        status.clone(),
        shared,
        tracker.clone(),
        ejected_rx,
    );
    control.start(&config).map_err(anyhow::Error::msg)?;
    control.publish();

    let (cmd_tx, cmd_rx) = mpsc::channel(64);
    let control_task = tokio::spawn(control.run(cmd_rx));

    // The desired-state feed: what the Docker provider reads, served to followers.
    let (feed_tx, feed_rx) =
        tokio::sync::watch::channel(crate::discovery::feed::FeedState::default());
    let admin_state = Arc::new(AdminState {
        feed: config.discovery.docker.as_ref().map(|_| feed_rx),
        status: status.clone(),
        commands: cmd_tx.clone(),
        token: ArcSwapOption::from(config.admin.token.clone().map(Arc::new)),
        ready: AtomicBool::new(false),
        metrics,
    });
    let admin_stop = Arc::new(CloseSignal::new());
    tokio::spawn(admin::serve(
        admin_listener,
        admin_state.clone(),
        admin_stop.clone(),
    ));
    // Discovery providers. DNS targets follow reloads; the Docker provider's settings are
    // read at start (changing [discovery.docker] needs a restart).
    let (dns_tx, dns_rx) = tokio::sync::watch::channel(crate::discovery::dns::targets(&config));
    if let Some(dns) = &config.discovery.dns {
        tokio::spawn(crate::discovery::dns::run(
            dns.clone(),
            dns_rx,
            cmd_tx.clone(),
        ));
    }
    if let Some(docker) = &config.discovery.docker {
        tokio::spawn(crate::discovery::docker::run(
            docker.clone(),
            config.defaults.clone(),
            cmd_tx.clone(),
            feed_tx,
        ));
    }

    let reloader = tokio::spawn(watch_reloads(
        config.path.clone(),
        hup,
        cmd_tx.clone(),
        admin_state.clone(),
        dns_tx,
    ));
    admin_state.ready.store(true, Ordering::Release);
    tracing::info!(
        admin = %config.admin.listen,
        services = config.services.len(),
        mode = ?mode,
        "meshd ready"
    );

    // Wait for the signal to stop.
    let sig = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    let grace = config.max_drain_timeout();
    tracing::info!(
        signal = sig,
        grace_ms = grace.as_millis() as u64,
        "shutting down: listeners closed, draining connections"
    );
    reloader.abort();
    admin_state.ready.store(false, Ordering::Release);
    let (tx, rx) = oneshot::channel();
    if cmd_tx.send(Command::StopListening(tx)).await.is_ok() {
        let _ = rx.await;
    }
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
    drop(cmd_tx);
    drop(admin_state);
    control_task.abort();
    tracing::info!("meshd stopped");
    Ok(())
}

/// Reloads on SIGHUP and when the config file changes. Watches the file's directory (not
/// the file), so editors and config managers that replace the file by rename are followed.
async fn watch_reloads(
    path: PathBuf,
    mut hup: tokio::signal::unix::Signal,
    commands: mpsc::Sender<Command>,
    admin: Arc<AdminState>,
    dns_targets: tokio::sync::watch::Sender<Vec<crate::discovery::dns::Target>>,
) {
    let (ftx, mut frx) = mpsc::channel::<()>(1);
    let _watcher = watch_file(&path, ftx);
    let mut last_text: Option<String> = std::fs::read_to_string(&path).ok();
    loop {
        let forced = tokio::select! {
            _ = hup.recv() => true,
            Some(()) = frx.recv() => false,
        };
        if !forced {
            // Wait for the writes to settle.
            while let Ok(Some(())) = tokio::time::timeout(RELOAD_QUIET, frx.recv()).await {}
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
        tracing::info!(
            reason = if forced { "SIGHUP" } else { "file changed" },
            "reloading config"
        );
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
                let token = cfg.admin.token.clone().map(Arc::new);
                let targets = crate::discovery::dns::targets(&cfg);
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
                    dns_targets.send_if_modified(|t| {
                        let changed = *t != targets;
                        *t = targets;
                        changed
                    });
                }
            }
        }
    }
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
