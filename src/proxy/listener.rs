//! Listening sockets (socket2) and the accept loop.
//!
//! Per accepted connection the loop does: one wait-free table `load()`, the service's
//! `max_connections` check (one atomic add), one `Arc` clone of the service snapshot, and a
//! task spawn. Backend choice and connect happen in the connection's own task, so a slow
//! backend never holds up accepting.
//!
//! Running out of file descriptors (EMFILE/ENFILE, or the kernel out of buffers) must not
//! spin a core, which is what an accept loop that simply retries does (tokio#3529): the loop
//! backs off from 5 ms up to 100 ms, counts every failure, logs at most once a second, and
//! resumes at the first accept that succeeds.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;

use super::close::CloseSignal;
use super::conn::{self, Shared};
use super::connect::keepalive;
use crate::table::{ServiceState, TableHandle};
use crate::upgrade;

const BACKOFF_MIN: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_millis(100);

/// Binds a listening socket: SO_REUSEADDR, IPV6_V6ONLY for IPv6 (so `[::]:P` and
/// `0.0.0.0:P` can both be listed), the given backlog, and TCP_NODELAY plus keepalive, which
/// Linux copies to every accepted socket (no per-connection setsockopt). A listener
/// inherited from the process this one upgraded is taken instead (the same socket and
/// queue; never re-bound).
pub fn bind(addr: SocketAddr, backlog: u32) -> io::Result<std::net::TcpListener> {
    if let Some(inherited) = upgrade::sockets::take(addr, backlog) {
        match inherited {
            Ok(l) => return Ok(l),
            Err(e) => tracing::warn!(%addr, error = %e, "inherited listener refused; binding anew"),
        }
    }
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_nodelay(true)?;
    s.set_tcp_keepalive(&keepalive())?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(s.into())
}

/// Where an accept loop's connections go.
pub enum Route {
    /// One service's listener.
    Service(Arc<ServiceState>),
    /// An address shared by `[service.tls]` services: the connection's ClientHello picks
    /// one (`RoutingTable::sni`, `conn::serve_sni`).
    Sni(SocketAddr),
}

/// What an accept loop needs.
pub struct AcceptLoop {
    pub listener: TcpListener,
    pub route: Route,
    pub table: TableHandle,
    pub shared: Arc<Shared>,
    pub tracker: TaskTracker,
    /// Closed to stop accepting (listener removed by a reload, or shutdown).
    pub stop: Arc<CloseSignal>,
}

impl AcceptLoop {
    pub async fn run(self) {
        let AcceptLoop {
            listener,
            route,
            table,
            shared,
            tracker,
            stop,
        } = self;
        // Offered to a successor (`meshd upgrade`) for as long as this loop accepts.
        let _served = listener.local_addr().ok().and_then(|a| {
            use std::os::fd::AsFd;
            upgrade::sockets::register(upgrade::sockets::Kind::Tcp, a, listener.as_fd()).ok()
        });
        let stopped = stop.wait();
        tokio::pin!(stopped);
        let mut backoff = BACKOFF_MIN;
        let mut last_log: Option<tokio::time::Instant> = None;
        loop {
            let accepted = tokio::select! {
                biased;
                _ = &mut stopped => return,
                r = listener.accept() => r,
            };
            match accepted {
                Ok((sock, peer)) => {
                    backoff = BACKOFF_MIN;
                    let guard = table.load();
                    let service = match &route {
                        Route::Service(s) => s,
                        Route::Sni(addr) => {
                            // The service is known once the ClientHello is in: limits
                            // apply then, in the connection's task.
                            if let Some(routes) = guard.sni(*addr) {
                                let routes = routes.clone();
                                drop(guard);
                                tracker.spawn(conn::serve_sni(sock, peer, routes, shared.clone()));
                            }
                            continue;
                        }
                    };
                    let Some(svc) = guard.service(service) else {
                        service.rejected_no_backend.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    let max = u64::from(svc.config.max_connections);
                    let live = service.active.fetch_add(1, Ordering::Relaxed);
                    if max > 0 && live >= max {
                        service.active.fetch_sub(1, Ordering::Relaxed);
                        service
                            .rejected_max_connections
                            .fetch_add(1, Ordering::Relaxed);
                        // An RST tells the client at once that it was turned away.
                        let _ = SockRef::from(&sock).set_linger(Some(Duration::ZERO));
                        continue;
                    }
                    let svc = svc.clone();
                    drop(guard);
                    tracker.spawn(conn::serve(sock, peer, svc, shared.clone()));
                }
                Err(e) if is_exhaustion(&e) => {
                    super::stats::STATS
                        .accept_exhausted
                        .fetch_add(1, Ordering::Relaxed);
                    let now = tokio::time::Instant::now();
                    if last_log.is_none_or(|t| now - t >= Duration::from_secs(1)) {
                        last_log = Some(now);
                        let label = match &route {
                            Route::Service(s) => s.name.to_string(),
                            Route::Sni(a) => a.to_string(),
                        };
                        tracing::warn!(
                            service = label,
                            error = %e,
                            "accept failed: out of file descriptors or buffers; pausing this listener up to 100ms"
                        );
                    }
                    tokio::select! {
                        _ = &mut stopped => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
                // ECONNABORTED and friends: that one connection is gone; keep accepting.
                Err(_) => {}
            }
        }
    }
}

fn is_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}
