//! TLS termination (`[service.tls] mode = "terminate"`): a connection that `serve_sni`
//! routed to a terminating service completes its handshake here, with the service's
//! `ServerConfig` (rustls through tokio-rustls), then the plaintext goes to a backend.
//!
//! The route is decided before rustls sees a byte: `serve_sni` has read the ClientHello
//! with meshd's own bounded reader (the same routing as passthrough, the same
//! normalisation). Those bytes are replayed to rustls first (`Replay`), so one deadline
//! (`client_hello_timeout`, counted from accept) covers the PROXY header, the hello and the
//! whole handshake; a client that stops mid-handshake is dropped at it, with its task.
//!
//! After the handshake: the same dial as any connection (retries, hedging, queue, panic
//! routing), the PROXY header with the real client address, then `forward`, a copy loop
//! between the TLS stream and the backend with the rules of `forward::forward`: half-close
//! (the client's close_notify or FIN becomes a FIN to the backend; the backend's FIN a
//! close_notify and FIN to the client), `idle_timeout`, `half_close_timeout`, drain, RST on
//! failure, the backend's byte counters. No splice: the client side is encrypted.
//! `retry_on_early_close` does not apply (the handshake has been answered already).
//!
//! Allocations per connection: rustls' own state and the two copy buffers.

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;

use super::conn::{self, Attempts, Live, Serving, Shared};
use super::connect::keepalive;
use super::forward::{End, Limits, Outcome};
use super::proxy_protocol;
use super::stats::STATS;
use crate::config::tls::Terminate;
use crate::config::ProxyProtocol;
use crate::table::sni::Via;
use crate::table::{Backend, ServiceTable, TlsFailure};

/// Plaintext copy buffer per direction.
const BUF: usize = 16 * 1024;

/// A routed connection to a terminating service, as `serve_sni` hands it over: counted in
/// the service's live connections already (un-counted here), its ClientHello in `hello`.
pub(super) struct Routed {
    pub client: TcpStream,
    pub hello: Vec<u8>,
    pub peer: SocketAddr,
    pub proxied_dst: Option<SocketAddr>,
    pub svc: Arc<ServiceTable>,
    pub terminate: Arc<Terminate>,
    pub via: Via,
    pub accepted: Instant,
    /// `client_hello_timeout` from accept: the handshake must be complete by then.
    pub deadline: Instant,
}

/// Completes the handshake, dials a backend and forwards until the connection ends.
pub(super) async fn serve(r: Routed, shared: Arc<Shared>) {
    let Routed {
        client,
        hello,
        peer,
        proxied_dst,
        mut svc,
        terminate,
        via,
        accepted,
        deadline,
    } = r;
    let shared = &*shared;
    let state = svc.state.clone();
    let _service_live = Live(&state.active);
    let failed = |f: TlsFailure| {
        state.tls_failed[f as usize].fetch_add(1, Ordering::Relaxed);
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(terminate.server.clone());
    let io = Replay {
        prefix: hello,
        off: 0,
        inner: client,
    };
    let mut tls = match tokio::time::timeout_at(deadline, acceptor.accept(io)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            let closed = matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
            );
            tracing::debug!(service = &*state.name, %peer, error = %e, "TLS handshake failed");
            return failed(if closed {
                TlsFailure::Closed
            } else {
                TlsFailure::Error
            });
        }
        Err(_) => return failed(TlsFailure::Timeout),
    };
    // Dropping the handshake's copy of the config: this connection holds it through `tls`.
    drop(terminate);
    state.tls_routed[via as usize].fetch_add(1, Ordering::Relaxed);

    let mut attempts = Attempts::new();
    let mut queue = None;
    let Some((mut server, backend, _k, _panic)) =
        conn::dial_queued(&mut svc, peer, &mut attempts, &mut queue, shared).await
    else {
        state.rejected_no_backend.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let live = Serving::new(backend);
    let backend: &Backend = &live.0;
    let cfg = &*svc.config;
    let header = match cfg.proxy_protocol {
        ProxyProtocol::Off => None,
        v => {
            let client = &tls.get_ref().0.inner;
            let dst = proxied_dst.unwrap_or_else(|| client.local_addr().unwrap_or(peer));
            proxy_protocol::encode(v, peer, dst)
        }
    };
    if let Some(h) = header {
        if server.write_all(h.as_bytes()).await.is_err() {
            conn::log_access(
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
    let _ = SockRef::from(&server).set_tcp_keepalive(&keepalive());
    backend.stats.connections.fetch_add(1, Ordering::Relaxed);
    let limits = Limits {
        idle_timeout: cfg.idle_timeout,
        half_close_timeout: cfg.half_close_timeout,
    };
    let out = forward(&mut tls, &mut server, backend, limits).await;
    if out.end == End::Closed {
        backend.stats.drain_closed.fetch_add(1, Ordering::Relaxed);
    }
    svc.state
        .conn_duration
        .record(accepted.elapsed().as_secs_f64());
    conn::log_access(
        shared, &svc, backend, peer, accepted, out.end, out.rx, out.tx,
    );
}

/// The client's socket with the bytes `serve_sni` already read from it (the
/// ClientHello) put back in front: rustls reads those first.
struct Replay {
    prefix: Vec<u8>,
    off: usize,
    inner: TcpStream,
}

impl AsyncRead for Replay {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.off < this.prefix.len() {
            let n = (this.prefix.len() - this.off).min(buf.remaining());
            buf.put_slice(&this.prefix[this.off..this.off + n]);
            this.off += n;
            if this.off == this.prefix.len() {
                // Freed once rustls has it all.
                this.prefix = Vec::new();
                this.off = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Replay {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Backend,
}

/// One direction of the copy: a buffer read into from one side and written out to the
/// other.
struct Half {
    buf: Box<[u8]>,
    pos: usize,
    cap: usize,
    /// The source ended: once the buffer is out, shut the destination's write side.
    eof: bool,
    /// Bytes written since the last flush.
    unflushed: bool,
    src: Side,
    /// This connection's bytes in this direction.
    total: u64,
}

impl Half {
    fn new(src: Side) -> Half {
        Half {
            buf: vec![0; BUF].into_boxed_slice(),
            pos: 0,
            cap: 0,
            eof: false,
            unflushed: false,
            src,
            total: 0,
        }
    }

    fn dst(&self) -> Side {
        match self.src {
            Side::Client => Side::Backend,
            Side::Backend => Side::Client,
        }
    }

    /// Moves bytes until the source has nothing more for now (`Pending`) or this direction
    /// is finished: end of stream read, everything written, the destination shut down for
    /// writing (`Ready(Ok)`); `Ready(Err)` names the side that failed. `moved` sees every
    /// write.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut r: Pin<&mut R>,
        mut w: Pin<&mut W>,
        moved: &mut dyn FnMut(usize),
    ) -> Poll<Result<(), Side>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if self.pos == self.cap && !self.eof {
                let mut rb = ReadBuf::new(&mut self.buf);
                match r.as_mut().poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        if n == 0 {
                            self.eof = true;
                        } else {
                            self.pos = 0;
                            self.cap = n;
                        }
                    }
                    // A client that closes TCP without close_notify: an end, not a failure
                    // (the backend's protocol decides whether it was complete).
                    Poll::Ready(Err(e))
                        if self.src == Side::Client && e.kind() == io::ErrorKind::UnexpectedEof =>
                    {
                        self.eof = true;
                    }
                    Poll::Ready(Err(_)) => return Poll::Ready(Err(self.src)),
                    Poll::Pending => {
                        if self.unflushed {
                            ready!(w.as_mut().poll_flush(cx)).map_err(|_| self.dst())?;
                            self.unflushed = false;
                        }
                        return Poll::Pending;
                    }
                }
            }
            while self.pos < self.cap {
                let n = ready!(w.as_mut().poll_write(cx, &self.buf[self.pos..self.cap]))
                    .map_err(|_| self.dst())?;
                if n == 0 {
                    return Poll::Ready(Err(self.dst()));
                }
                self.pos += n;
                self.total += n as u64;
                self.unflushed = true;
                moved(n);
            }
            if self.eof {
                // Flushes first (tokio-rustls: close_notify, then the socket's FIN). A peer
                // already gone finds out on its own side.
                let _ = ready!(w.as_mut().poll_shutdown(cx));
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// What the copy loop reports.
enum Ev {
    /// The client -> backend direction finished (the backend got a FIN).
    UpDone,
    /// The backend -> client direction finished (the client got close_notify and a FIN).
    DownDone,
    Failed(Side),
}

/// Forwards until the connection ends (see the module docs for the rules); updates the
/// backend's byte counters as it goes.
async fn forward(
    tls: &mut TlsStream<Replay>,
    server: &mut TcpStream,
    backend: &Backend,
    limits: Limits,
) -> Outcome {
    let start = Instant::now();
    // Milliseconds since `start` of the last byte moved either way.
    let last = AtomicU64::new(0);
    let touch = || {
        last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    };
    let mut up = Half::new(Side::Client);
    let mut down = Half::new(Side::Backend);
    let mut up_open = true;
    let mut down_open = true;
    let mut half_at: Option<Instant> = None;
    let next = |half_at: Option<Instant>| {
        let idle_at =
            start + Duration::from_millis(last.load(Ordering::Relaxed)) + limits.idle_timeout;
        half_at.map_or(idle_at, |h| h.min(idle_at))
    };
    let closed = backend.close.wait();
    tokio::pin!(closed);
    let sleep = tokio::time::sleep_until(next(None));
    tokio::pin!(sleep);
    let end = loop {
        let copy = poll_fn(|cx| {
            if up_open {
                let mut moved = |n: usize| {
                    backend
                        .stats
                        .bytes_rx
                        .fetch_add(n as u64, Ordering::Relaxed);
                    STATS.copied_bytes.fetch_add(n as u64, Ordering::Relaxed);
                    touch();
                };
                if let Poll::Ready(r) =
                    up.poll_copy(cx, Pin::new(&mut *tls), Pin::new(&mut *server), &mut moved)
                {
                    up_open = false;
                    return Poll::Ready(r.map_or_else(Ev::Failed, |()| Ev::UpDone));
                }
            }
            if down_open {
                let mut moved = |n: usize| {
                    backend
                        .stats
                        .bytes_tx
                        .fetch_add(n as u64, Ordering::Relaxed);
                    STATS.copied_bytes.fetch_add(n as u64, Ordering::Relaxed);
                    touch();
                };
                if let Poll::Ready(r) =
                    down.poll_copy(cx, Pin::new(&mut *server), Pin::new(&mut *tls), &mut moved)
                {
                    down_open = false;
                    return Poll::Ready(r.map_or_else(Ev::Failed, |()| Ev::DownDone));
                }
            }
            Poll::Pending
        });
        tokio::select! {
            biased;
            ev = copy => match ev {
                Ev::Failed(side) => {
                    let _ = SockRef::from(&tls.get_ref().0.inner).set_linger(Some(Duration::ZERO));
                    let _ = SockRef::from(&*server).set_linger(Some(Duration::ZERO));
                    break match side {
                        Side::Client => End::ClientReset,
                        Side::Backend => End::BackendReset,
                    };
                }
                Ev::UpDone | Ev::DownDone => {
                    if !up_open && !down_open {
                        break End::Done;
                    }
                    half_at = Some(Instant::now() + limits.half_close_timeout);
                    sleep.as_mut().reset(next(half_at));
                }
            },
            _ = &mut closed => break End::Closed,
            _ = &mut sleep => {
                let now = Instant::now();
                let idle_at = next(None);
                match half_at {
                    Some(h) if h <= now && h <= idle_at => break End::HalfCloseTimeout,
                    _ if idle_at <= now => break End::IdleTimeout,
                    _ => sleep.as_mut().reset(next(half_at)),
                }
            }
        }
    };
    Outcome {
        end,
        rx: up.total,
        tx: down.total,
    }
}
