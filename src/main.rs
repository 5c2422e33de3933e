//! The `meshd` binary: command line, logging, exit codes. The only place an error becomes an
//! exit status.
#![deny(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use meshd::config::{parse_duration, Config, LogFormat};
use meshd::demo::backend::{BackendMode, BackendOpts};

#[derive(Parser)]
#[command(
    name = "meshd",
    version,
    about = "Layer-4 ingress load balancer and routing-mesh proxy"
)]
struct Cli {
    /// Path to mesh.toml.
    #[arg(long, short = 'c', global = true)]
    config: Option<PathBuf>,
    /// Worker threads for the proxy (default: one per core). 1 runs a single-threaded
    /// event loop, like HAProxy's `nbthread 1`. The control plane (discovery, health
    /// checks, the admin API) runs on one more thread of its own.
    #[arg(long, global = true, env = "MESHD_THREADS")]
    threads: Option<usize>,
    /// Log format (overrides [log] format).
    #[arg(long, global = true, value_parser = ["human", "json"])]
    log_format: Option<String>,
    /// Take the listeners over from the meshd serving this hand-off socket (set by the
    /// process that starts its successor; see `meshd upgrade`).
    #[arg(long, hide = true)]
    takeover: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the proxy (the default).
    Run,
    /// Validate the config: exit 0 if valid, 1 with FILE:LINE:COL: message. An empty file
    /// is an error; a file with no service is valid but warned about (a running meshd
    /// refuses to reload to it unless it says allow_empty = true).
    Check,
    /// Upgrade the running meshd without refusing a connection: it starts the binary at its
    /// path on disk (or --binary) and hands it every listening socket; once the new process
    /// is ready the old one drains and exits. Exit 0 when the new process serves, 1 (with
    /// the reason) when the old one goes on serving. Same as SIGUSR2, with an answer.
    Upgrade {
        /// The running meshd's admin address (default: [admin] listen of --config, else
        /// 127.0.0.1:9901).
        #[arg(long)]
        admin: Option<std::net::SocketAddr>,
        /// The new binary (default: the running one's path on disk).
        #[arg(long)]
        binary: Option<PathBuf>,
        /// How long the new process may take to be ready (default: [upgrade] timeout).
        #[arg(long, value_parser = dur)]
        timeout: Option<Duration>,
    },
    /// A self-contained zero-downtime demonstration: real backend tasks behind meshd under
    /// load, through scale-up, scale-down, rolling updates, a broken release and a kill -9.
    Demo {
        /// Seconds per phase (the whole demo runs about 8 phases).
        #[arg(long, default_value = "6s", value_parser = dur)]
        phase: Duration,
        /// Concurrent clients (half keep-alive, half one connection per request).
        #[arg(long, default_value_t = 40)]
        clients: usize,
    },
    /// Run a demo backend server (used by `meshd demo`, the tests and the images).
    #[command(hide = true)]
    Backend {
        /// Address to bind; port 0 lets the kernel choose. Once bound, one line
        /// `listening on ADDR` goes to stdout.
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// The name it answers with (also from MESHD_BACKEND_NAME: a Swarm service can give
        /// each task its own with `--env MESHD_BACKEND_NAME=t{{.Task.Slot}}`).
        #[arg(long, env = "MESHD_BACKEND_NAME", default_value = "backend")]
        name: String,
        #[arg(long, value_enum, default_value = "http")]
        mode: BackendMode,
        #[arg(long, default_value = "0s", value_parser = dur)]
        bind_delay: Duration,
        #[arg(long, default_value = "10s", value_parser = dur)]
        grace: Duration,
        #[arg(long)]
        unhealthy: bool,
        /// Exit with status 1 at start, before binding (a release that crashes on start).
        #[arg(long)]
        crash_on_start: bool,
    },
}

fn dur(s: &str) -> Result<Duration, String> {
    parse_duration(s)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd.unwrap_or(Cmd::Run) {
        Cmd::Check => {
            let Some(path) = cli.config else {
                eprintln!("meshd check: pass --config FILE");
                return ExitCode::from(2);
            };
            match Config::load(&path) {
                Ok(cfg) => {
                    println!(
                        "{}: ok ({} services, {} listeners)",
                        path.display(),
                        cfg.services.len(),
                        cfg.services.iter().map(|s| s.listen.len()).sum::<usize>()
                    );
                    // Services may come from Docker discovery; otherwise none will run.
                    if cfg.services.is_empty() && !cfg.allow_empty && cfg.discovery.docker.is_none()
                    {
                        eprintln!(
                            "{}: warning: no [[service]]: meshd would serve nothing, and a running \
                             meshd with services refuses to reload to this file; add \
                             allow_empty = true at the top of the file if that is intended",
                            path.display()
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Upgrade {
            admin,
            binary,
            timeout,
        } => upgrade(cli.config, admin, binary, timeout),
        Cmd::Demo { phase, clients } => {
            init_logging(LogFormat::Human);
            block_on(
                None,
                meshd::demo::scenario::run(meshd::demo::scenario::DemoOpts { phase, clients }),
            )
        }
        Cmd::Backend {
            listen,
            name,
            mode,
            bind_delay,
            grace,
            unhealthy,
            crash_on_start,
        } => {
            init_logging(LogFormat::Human);
            if crash_on_start {
                eprintln!("meshd backend: --crash-on-start: exiting with status 1");
                return ExitCode::FAILURE;
            }
            let opts = BackendOpts {
                listen,
                name,
                mode,
                bind_delay,
                grace,
                unhealthy,
            };
            block_on(None, meshd::demo::backend::run(opts))
        }
        Cmd::Run => {
            let Some(path) = cli.config else {
                eprintln!("meshd: pass --config FILE (see config/mesh.toml for an example)");
                return ExitCode::from(2);
            };
            let cfg = match Config::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            let format = match cli.log_format.as_deref() {
                Some("json") => LogFormat::Json,
                Some(_) => LogFormat::Human,
                None => cfg.log.format,
            };
            init_logging(format);
            // The data plane (accept loops, connections, UDP flows) runs on a runtime of
            // its own; the control plane, admin API, discovery, health checks and signals
            // on this thread. A control-plane burst (a 15 MB discovery answer, a table of
            // 10,000 backends published) then never holds a thread a connection waits on.
            let data = match DataRuntime::start(cli.threads) {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("meshd: cannot start the proxy's runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let code = block_on(Some(1), serve(cfg, cli.takeover, data.handle()));
            data.stop();
            code
        }
    }
}

/// Runs meshd until SIGTERM/SIGINT or a hand-off to a successor, then drains. Signals
/// are handled here and only here: SIGHUP reloads, SIGUSR2 upgrades.
async fn serve(
    cfg: Config,
    takeover: Option<PathBuf>,
    data: tokio::runtime::Handle,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use tokio::signal::unix::{signal, SignalKind};
    // Installed before anything is bound: a signal that arrives once meshd serves must
    // find them (a SIGTERM until then ends the process, as it should).
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut usr2 = signal(SignalKind::user_defined2()).context("installing the SIGUSR2 handler")?;

    let mut running = meshd::app::App::build(cfg, takeover, data)
        .await?
        .spawn()
        .await?;
    let why = loop {
        tokio::select! {
            _ = term.recv() => {
                if !running.upgrading() {
                    break "SIGTERM";
                }
                // Stopped while handing over (a Swarm start-first update stops the old
                // task as soon as the new one runs): serve until the new process is ready
                // or the hand-off fails, so that someone accepts all along.
                tracing::info!("SIGTERM during a hand-off: serving until the new meshd is ready");
                break if running.finish_handover().await { "upgrade" } else { "SIGTERM" };
            }
            _ = int.recv() => break "SIGINT",
            _ = hup.recv() => running.reload(),
            _ = usr2.recv() => {
                tracing::info!("SIGUSR2: upgrading");
                running.upgrade();
            }
            _ = running.handed_over() => break "upgrade",
        }
    };
    tracing::info!(signal = why, "stopping");
    let grace = running.drain_timeout();
    running.shutdown(grace).await;
    Ok(())
}

/// The data plane's runtime: `--threads` workers named `meshd-proxy` (one per core by
/// default); with `--threads 1`, a single-threaded event loop on a thread of its own
/// (HAProxy's `nbthread 1`), beside the control plane's thread.
enum DataRuntime {
    Multi(tokio::runtime::Runtime),
    Single {
        handle: tokio::runtime::Handle,
        stop: tokio::sync::oneshot::Sender<()>,
        thread: std::thread::JoinHandle<()>,
    },
}

impl DataRuntime {
    fn start(threads: Option<usize>) -> std::io::Result<DataRuntime> {
        if threads == Some(1) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let handle = rt.handle().clone();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name("meshd-proxy".into())
                .spawn(move || {
                    // A current-thread runtime runs its tasks only inside block_on: this
                    // thread drives them until the process stops.
                    let _ = rt.block_on(stopped);
                    rt.shutdown_background();
                })?;
            return Ok(DataRuntime::Single {
                handle,
                stop,
                thread,
            });
        }
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if let Some(n) = threads {
            b.worker_threads(n.max(1));
        }
        Ok(DataRuntime::Multi(
            b.thread_name("meshd-proxy").enable_all().build()?,
        ))
    }

    fn handle(&self) -> tokio::runtime::Handle {
        match self {
            DataRuntime::Multi(rt) => rt.handle().clone(),
            DataRuntime::Single { handle, .. } => handle.clone(),
        }
    }

    /// After the shutdown sequence (every connection has ended or was closed): drops
    /// what is left without waiting for it.
    fn stop(self) {
        match self {
            DataRuntime::Multi(rt) => rt.shutdown_background(),
            DataRuntime::Single { stop, thread, .. } => {
                let _ = stop.send(());
                let _ = thread.join();
            }
        }
    }
}

fn block_on(
    threads: Option<usize>,
    fut: impl std::future::Future<Output = anyhow::Result<()>>,
) -> ExitCode {
    let mut builder = match threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n.max(1));
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match format {
        LogFormat::Json => b.json().flatten_event(true).try_init(),
        LogFormat::Human => b.try_init(),
    };
}

/// `meshd upgrade`: one `POST /api/v1/upgrade` to the running meshd, answered when the
/// hand-off is over.
fn upgrade(
    config: Option<PathBuf>,
    admin: Option<std::net::SocketAddr>,
    binary: Option<PathBuf>,
    timeout: Option<Duration>,
) -> ExitCode {
    let cfg = match config.as_deref().map(Config::load) {
        Some(Err(e)) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
        Some(Ok(c)) => Some(c),
        None => None,
    };
    let addr = admin
        .or(cfg.as_ref().map(|c| c.admin.listen))
        .unwrap_or_else(|| {
            meshd::config::defaults::ADMIN_LISTEN
                .parse()
                .expect("a valid default")
        });
    let token = cfg
        .as_ref()
        .and_then(|c| c.admin.token.clone())
        .or_else(|| std::env::var("MESHD_ADMIN_TOKEN").ok());
    let mut body = serde_json::Map::new();
    if let Some(b) = binary {
        let b = std::fs::canonicalize(&b).unwrap_or(b);
        body.insert("binary".into(), b.display().to_string().into());
    }
    if let Some(t) = timeout {
        body.insert("timeout".into(), format!("{}ms", t.as_millis()).into());
    }
    let wait = timeout.unwrap_or(Duration::from_secs(600)) + Duration::from_secs(30);
    match meshd::admin::client::post(
        addr,
        "/api/v1/upgrade",
        token.as_deref(),
        &serde_json::Value::Object(body).to_string(),
        wait,
    ) {
        Ok((200, text)) => {
            let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            println!(
                "meshd upgrade: pid {} took over from pid {}; the old process drains",
                v["pid"], v["old_pid"]
            );
            ExitCode::SUCCESS
        }
        Ok((code, text)) => {
            let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            let why = v["error"].as_str().map(str::to_owned).unwrap_or(text);
            eprintln!("meshd upgrade: failed ({code}): {why}; the running meshd keeps serving");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("meshd upgrade: cannot reach the admin API at {addr}: {e}");
            ExitCode::FAILURE
        }
    }
}
