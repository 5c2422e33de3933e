//! One client connection: pick a backend from the service snapshot taken at accept, connect
//! (retrying on other backends before the client sees anything), send the PROXY header if
//! configured, then forward until the connection ends.
//!
//! Invariant: no lock, no string formatting (the access log, off by default, aside), no
//! allocation: the snapshot and backend are `Arc` clones, the tried-set and PROXY header live
//! on this task's stack.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::forward::{self, End, Limits, Mode};
use super::{connect, proxy_protocol};
use crate::config::defaults::MAX_CONNECT_RETRIES;
use crate::config::ProxyProtocol;
use crate::table::{Backend, Ejection, ServiceTable};

/// Consecutive connect failures after which a backend is ejected at once (passive outlier
/// detection), without waiting for its next health check.
pub const EJECT_AFTER_FAILURES: u32 = 3;

/// What every connection of the process shares.
#[derive(Debug)]
pub struct Shared {
    pub mode: Mode,
    /// One log line per closed connection (`[log] access_log`); changed by reloads.
    pub access_log: AtomicBool,
    /// Backends ejected by passive outlier detection, for the control plane to schedule
    /// their re-admission.
    pub ejected: mpsc::UnboundedSender<Arc<Backend>>,
}

/// Decrements a live-connection counter however the task ends (also on cancellation).
struct Live<'a>(&'a AtomicU64);

impl Drop for Live<'_> {
    fn drop(&mut self) {
        let prev = self.0.fetch_sub(1, Ordering::Relaxed);
        debug_assert!(prev > 0, "live-connection counter went negative");
    }
}

/// Indices of the backends already tried for this connection, on the stack.
struct Tried {
    idx: [u32; MAX_CONNECT_RETRIES as usize + 1],
    len: usize,
}

impl Tried {
    fn contains(&self, i: usize) -> bool {
        self.idx[..self.len].contains(&(i as u32))
    }

    fn push(&mut self, i: usize) {
        if self.len < self.idx.len() {
            self.idx[self.len] = i as u32;
            self.len += 1;
        }
    }
}

/// Serves one accepted connection. The accept loop has already counted it in
/// `svc.state.active`; this function un-counts it when it returns.
pub async fn serve(client: TcpStream, peer: SocketAddr, svc: Arc<ServiceTable>, shared: &Shared) {
    let _service_live = Live(&svc.state.active);
    let accepted = Instant::now();
    let cfg = &*svc.config;
    let mut tried = Tried {
        idx: [0; MAX_CONNECT_RETRIES as usize + 1],
        len: 0,
    };
    let mut failures = 0u32;
    let (mut server, backend) = loop {
        let pick = svc.selector.pick(
            peer.ip(),
            |i| svc.backends[i].active(),
            |i| tried.contains(i) || !svc.backends[i].is_usable(),
        );
        let Some(i) = pick else {
            svc.state
                .rejected_no_backend
                .fetch_add(1, Ordering::Relaxed);
            return;
        };
        if failures > 0 {
            // A retry is counted only when another backend is actually tried.
            svc.state.retries.fetch_add(1, Ordering::Relaxed);
        }
        tried.push(i);
        let b = &svc.backends[i];
        b.active.fetch_add(1, Ordering::Relaxed);
        let t0 = Instant::now();
        match connect::connect(b.addr, cfg.connect_timeout).await {
            Ok(s) => {
                svc.state
                    .connect_duration
                    .record(t0.elapsed().as_secs_f64());
                b.consecutive_failures.store(0, Ordering::Relaxed);
                break (s, b);
            }
            Err(connect::Failure::Local(_)) => {
                // Out of descriptors or ports here: retrying elsewhere fails the same way,
                // and the backend is not to blame.
                b.active.fetch_sub(1, Ordering::Relaxed);
                svc.state
                    .rejected_no_backend
                    .fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err(connect::Failure::Backend(e)) => {
                b.active.fetch_sub(1, Ordering::Relaxed);
                b.stats.connect_errors[e as usize].fetch_add(1, Ordering::Relaxed);
                let n = b.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
                // Never the service's last usable backend (`ServiceTable::eject`).
                if n >= EJECT_AFTER_FAILURES && svc.eject(i) != Ejection::Nothing {
                    let _ = shared.ejected.send(b.clone());
                }
                if failures == cfg.connect_retries {
                    svc.state
                        .rejected_no_backend
                        .fetch_add(1, Ordering::Relaxed);
                    return;
                }
                failures += 1;
            }
        }
    };
    let _backend_live = Live(&backend.active);
    backend.stats.connections.fetch_add(1, Ordering::Relaxed);

    // The address the client connected to costs a getsockname: only the header needs it.
    let header = match cfg.proxy_protocol {
        ProxyProtocol::Off => None,
        v => proxy_protocol::encode(v, peer, client.local_addr().unwrap_or(peer)),
    };
    if let Some(h) = header {
        if server.write_all(h.as_bytes()).await.is_err() {
            log_access(
                shared,
                &svc,
                backend,
                peer,
                accepted,
                End::BackendReset,
                0,
                0,
            );
            return;
        }
    }

    let limits = Limits {
        idle_timeout: cfg.idle_timeout,
        half_close_timeout: cfg.half_close_timeout,
    };
    let out = forward::forward(&client, &server, backend, limits, shared.mode).await;
    if out.end == End::Closed {
        backend.stats.drain_closed.fetch_add(1, Ordering::Relaxed);
    }
    svc.state
        .conn_duration
        .record(accepted.elapsed().as_secs_f64());
    log_access(
        shared, &svc, backend, peer, accepted, out.end, out.rx, out.tx,
    );
}

#[allow(clippy::too_many_arguments)]
fn log_access(
    shared: &Shared,
    svc: &ServiceTable,
    backend: &Backend,
    client: SocketAddr,
    accepted: Instant,
    end: End,
    rx: u64,
    tx: u64,
) {
    if shared.access_log.load(Ordering::Relaxed) {
        tracing::info!(
            target: "meshd::access",
            service = &*svc.state.name,
            backend = &*backend.addr_label,
            client = %client,
            rx_bytes = rx,
            tx_bytes = tx,
            duration_ms = accepted.elapsed().as_millis() as u64,
            end = end.as_str(),
            "connection closed"
        );
    }
}
