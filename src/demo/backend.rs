//! `meshd backend`: a small real backend for the demo, the tests and the Docker images (one
//! binary, one image). It behaves like a well-written app task:
//! - it can bind late (`--bind-delay`), like an app that starts slowly;
//! - `http` mode answers every request with its name (`X-Backend` header and body) and
//!   `/healthz` with 200, over keep-alive connections;
//! - `echo` mode writes back every byte it reads and closes its write side after the client
//!   does (for byte-exact and half-close tests);
//! - on SIGTERM it stops accepting at once, finishes in-flight requests, closes idle
//!   keep-alive connections cleanly, and exits 0 (after at most `--grace`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendMode {
    Http,
    Echo,
    /// UDP: every datagram is answered with the backend's name, a space, and the
    /// datagram (the Docker tests' UDP task).
    Udp,
}

#[derive(Debug, Clone)]
pub struct BackendOpts {
    pub listen: SocketAddr,
    pub name: String,
    pub mode: BackendMode,
    pub bind_delay: Duration,
    pub grace: Duration,
    /// Answer /healthz with 503 (a broken release that never becomes healthy).
    pub unhealthy: bool,
}

pub async fn run(opts: BackendOpts) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    if !opts.bind_delay.is_zero() {
        tokio::select! {
            _ = tokio::time::sleep(opts.bind_delay) => {}
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
        }
    }
    if opts.mode == BackendMode::Udp {
        return udp(&opts, term, int).await;
    }
    let listener = TcpListener::bind(opts.listen)
        .await
        .map_err(|e| anyhow::anyhow!("backend: cannot listen on {}: {e}", opts.listen))?;
    // One line on stdout once bound, like `python3 -m http.server`: with `--listen
    // 127.0.0.1:0` a caller learns the port the kernel chose and that it is listening.
    println!("listening on {}", listener.local_addr()?);
    let (stop_tx, stop_rx) = watch::channel(false);
    let tracker = TaskTracker::new();
    let name: Arc<str> = opts.name.as_str().into();
    loop {
        let (sock, _) = tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(_) => { tokio::time::sleep(Duration::from_millis(10)).await; continue; }
            },
        };
        let _ = sock.set_nodelay(true);
        match opts.mode {
            BackendMode::Echo => {
                tracker.spawn(echo(sock));
            }
            BackendMode::Udp => unreachable!("served by udp()"),
            BackendMode::Http => {
                tracker.spawn(http_conn(
                    sock,
                    name.clone(),
                    opts.unhealthy,
                    stop_rx.clone(),
                ));
            }
        }
    }
    // Stop accepting at once; let in-flight work finish.
    drop(listener);
    let _ = stop_tx.send(true);
    tracker.close();
    let _ = tokio::time::timeout(opts.grace, tracker.wait()).await;
    Ok(())
}

/// `--mode udp`: answers each datagram with `NAME ` and the datagram, until SIGTERM.
async fn udp(
    opts: &BackendOpts,
    mut term: tokio::signal::unix::Signal,
    mut int: tokio::signal::unix::Signal,
) -> anyhow::Result<()> {
    let sock = tokio::net::UdpSocket::bind(opts.listen)
        .await
        .map_err(|e| anyhow::anyhow!("backend: cannot bind UDP {}: {e}", opts.listen))?;
    println!("listening on {}/udp", sock.local_addr()?);
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = Vec::with_capacity(64 * 1024 + opts.name.len() + 1);
    loop {
        let (n, from) = tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            r = sock.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(_) => continue,
            },
        };
        out.clear();
        out.extend_from_slice(opts.name.as_bytes());
        out.push(b' ');
        out.extend_from_slice(&buf[..n]);
        let _ = sock.send_to(&out, from).await;
    }
}

async fn echo(mut sock: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match sock.read(&mut buf).await {
            Ok(0) => {
                let _ = sock.shutdown().await;
                return;
            }
            Ok(n) => {
                if sock.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

async fn http_conn(
    sock: TcpStream,
    name: Arc<str>,
    unhealthy: bool,
    mut stop: watch::Receiver<bool>,
) {
    let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let name = name.clone();
        async move {
            let (code, body) = if req.uri().path() == "/healthz" {
                if unhealthy {
                    (503, Bytes::from_static(b"unhealthy\n"))
                } else {
                    (200, Bytes::from_static(b"ok\n"))
                }
            } else {
                (200, Bytes::from(format!("{name}\n")))
            };
            let resp = Response::builder()
                .status(code)
                .header("x-backend", &*name)
                .header("content-type", "text/plain")
                .body(Full::new(body));
            Ok::<_, Infallible>(resp.unwrap_or_else(|_| Response::new(Full::new(Bytes::new()))))
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(sock), svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = async { let _ = stop.wait_for(|s| *s).await; } => {
            // Finish the request in flight, then close the keep-alive connection cleanly.
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
