//! Moving bytes both ways between an accepted client and its backend until the connection
//! ends: splice(2) through pooled pipes on Linux, a buffered copy elsewhere (or where splice
//! is refused).
//!
//! Rules every path follows:
//! - Half-close: end of stream from one side is forwarded as a FIN (`shutdown(WR)`) to the
//!   other; the opposite direction keeps flowing until it ends too or `half_close_timeout`.
//! - A reset or error on either side closes both, and the other side gets an RST (linger 0)
//!   so it learns the connection failed rather than ended.
//! - `idle_timeout`: no byte either way for that long closes both.
//! - The backend's `CloseSignal` (drain timeout, shutdown) closes both.
//! - Both sockets are closed by the caller dropping them; a pipe holding bytes is closed,
//!   never pooled (see `splice`).
//!
//! One task drives both directions (two futures polled by one `select!`), so a connection
//! costs one task, and its activity clock is a plain atomic on that task's stack.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::table::Backend;

/// Bytes moved by splice since start: the proof that the zero-copy path is the one taken.
pub static SPLICED_BYTES: AtomicU64 = AtomicU64::new(0);
/// Bytes moved by the buffered fallback since start.
pub static COPIED_BYTES: AtomicU64 = AtomicU64::new(0);

/// Buffer size of the fallback copy, per direction (allocated only in that mode).
const COPY_BUF: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Splice,
    Copy,
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub idle_timeout: Duration,
    pub half_close_timeout: Duration,
}

/// How a forwarded connection ended (the access log's `end` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both sides finished (FIN both ways).
    Done,
    ClientReset,
    BackendReset,
    IdleTimeout,
    HalfCloseTimeout,
    /// Closed by a drain timeout or shutdown.
    Closed,
}

impl End {
    pub fn as_str(self) -> &'static str {
        match self {
            End::Done => "done",
            End::ClientReset => "client_reset",
            End::BackendReset => "backend_reset",
            End::IdleTimeout => "idle_timeout",
            End::HalfCloseTimeout => "half_close_timeout",
            End::Closed => "drained",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    pub end: End,
    /// Client -> backend bytes.
    pub rx: u64,
    /// Backend -> client bytes.
    pub tx: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Backend,
}

/// Forwards until the connection ends; updates the backend's byte counters as it goes.
pub async fn forward(
    client: &TcpStream,
    server: &TcpStream,
    backend: &Backend,
    limits: Limits,
    mode: Mode,
) -> Outcome {
    let start = Instant::now();
    // Milliseconds since `start` of the last byte moved either way.
    let last = AtomicU64::new(0);
    let rx = AtomicU64::new(0);
    let tx = AtomicU64::new(0);
    let up = Pump {
        src: client,
        dst: server,
        src_side: Side::Client,
        total: &rx,
        counter: &backend.stats.bytes_rx,
        last: &last,
        start,
    };
    let down = Pump {
        src: server,
        dst: client,
        src_side: Side::Backend,
        total: &tx,
        counter: &backend.stats.bytes_tx,
        last: &last,
        start,
    };
    let up = up.run(mode);
    let down = down.run(mode);
    tokio::pin!(up, down);
    let closed = backend.close.wait();
    tokio::pin!(closed);
    let sleep = tokio::time::sleep_until(start + limits.idle_timeout);
    tokio::pin!(sleep);

    let mut up_open = true;
    let mut down_open = true;
    let mut half_closed_at: Option<Instant> = None;
    let end = loop {
        tokio::select! {
            biased;
            r = &mut up, if up_open => {
                up_open = false;
                if let Err(side) = r { break reset(side, client, server) }
                if !down_open { break End::Done }
                half_closed_at = Some(Instant::now());
                sleep.as_mut().reset(Instant::now());
            }
            r = &mut down, if down_open => {
                down_open = false;
                if let Err(side) = r { break reset(side, client, server) }
                if !up_open { break End::Done }
                half_closed_at = Some(Instant::now());
                sleep.as_mut().reset(Instant::now());
            }
            _ = &mut closed => break End::Closed,
            _ = &mut sleep => {
                let now = Instant::now();
                let idle_at = start
                    + Duration::from_millis(last.load(Ordering::Relaxed))
                    + limits.idle_timeout;
                let half_at = half_closed_at.map(|t| t + limits.half_close_timeout);
                match half_at {
                    Some(h) if h <= now && h <= idle_at => break End::HalfCloseTimeout,
                    _ if idle_at <= now => break End::IdleTimeout,
                    Some(h) => sleep.as_mut().reset(h.min(idle_at)),
                    None => sleep.as_mut().reset(idle_at),
                }
            }
        }
    };
    Outcome {
        end,
        rx: rx.load(Ordering::Relaxed),
        tx: tx.load(Ordering::Relaxed),
    }
}

/// A failure on `side`: make the other side see a reset too (linger 0 turns the coming
/// close into an RST).
fn reset(side: Side, client: &TcpStream, server: &TcpStream) -> End {
    let _ = SockRef::from(client).set_linger(Some(Duration::ZERO));
    let _ = SockRef::from(server).set_linger(Some(Duration::ZERO));
    match side {
        Side::Client => End::ClientReset,
        Side::Backend => End::BackendReset,
    }
}

/// One direction.
struct Pump<'a> {
    src: &'a TcpStream,
    dst: &'a TcpStream,
    src_side: Side,
    /// This connection's bytes in this direction.
    total: &'a AtomicU64,
    /// The backend's counter for this direction.
    counter: &'a AtomicU64,
    last: &'a AtomicU64,
    start: Instant,
}

impl Pump<'_> {
    /// Runs to end of stream (then forwards the FIN) or to the first error, which names
    /// the side that failed.
    async fn run(self, mode: Mode) -> Result<(), Side> {
        let r = match mode {
            Mode::Splice => self.splice().await,
            Mode::Copy => self.copy().await,
        };
        r?;
        // Forward the FIN. ENOTCONN here means the peer is already gone; the other
        // direction will find out on its own.
        let _ = SockRef::from(self.dst).shutdown(std::net::Shutdown::Write);
        Ok(())
    }

    fn dst_side(&self) -> Side {
        match self.src_side {
            Side::Client => Side::Backend,
            Side::Backend => Side::Client,
        }
    }

    fn moved(&self, n: usize, global: &AtomicU64) {
        let n = n as u64;
        self.total.fetch_add(n, Ordering::Relaxed);
        self.counter.fetch_add(n, Ordering::Relaxed);
        global.fetch_add(n, Ordering::Relaxed);
        self.last
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    async fn splice(&self) -> Result<(), Side> {
        use super::splice::PooledPipe;
        let (sfd, dfd) = (self.src.as_raw_fd(), self.dst.as_raw_fd());
        loop {
            self.src.readable().await.map_err(|_| self.src_side)?;
            // Hold a pipe only while bytes move: taken here, returned empty below.
            let mut pipe = PooledPipe::take().map_err(|_| self.src_side)?;
            let n = match self.src.try_io(Interest::READABLE, || pipe.fill_from(sfd)) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(_) => return Err(self.src_side),
            };
            while pipe.len > 0 {
                self.dst.writable().await.map_err(|_| self.dst_side())?;
                match self.dst.try_io(Interest::WRITABLE, || pipe.drain_to(dfd)) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // `pipe` still holds bytes: dropping it closes it.
                    Err(_) => return Err(self.dst_side()),
                }
            }
            self.moved(n, &SPLICED_BYTES);
        }
    }

    async fn copy(&self) -> Result<(), Side> {
        let mut buf = vec![0u8; COPY_BUF];
        loop {
            self.src.readable().await.map_err(|_| self.src_side)?;
            let n = match self.src.try_read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(_) => return Err(self.src_side),
            };
            let mut off = 0;
            while off < n {
                self.dst.writable().await.map_err(|_| self.dst_side())?;
                match self.dst.try_write(&buf[off..n]) {
                    Ok(m) => off += m,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => return Err(self.dst_side()),
                }
            }
            self.moved(n, &COPIED_BYTES);
        }
    }
}
