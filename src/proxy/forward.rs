//! Moving bytes both ways between an accepted client and its backend until the connection
//! ends: small reads are copied through a per-thread scratch buffer, large transfers are
//! spliced (splice(2)) through pooled pipes, like HAProxy's `splice-auto`.
//!
//! Rules every path follows:
//! - Half-close: end of stream from one side is forwarded as a FIN (`shutdown(WR)`) to the
//!   other; the opposite direction keeps flowing until it ends too or `half_close_timeout`.
//!   When the second side ends, both sockets are closed at once and `close` sends that FIN.
//! - A reset or error on either side closes both, and the other side gets an RST (linger 0)
//!   so it learns the connection failed rather than ended.
//! - `idle_timeout`: no byte either way for that long closes both.
//! - The backend's `CloseSignal` (drain timeout, shutdown) closes both.
//! - Both sockets are closed by the caller dropping them; a pipe holding bytes is closed,
//!   never pooled (see `splice`).
//! - No allocation per connection: the scratch buffer is the thread's, borrowed only within
//!   one synchronous `recv` + `send`; what a destination does not take at once goes into a
//!   pooled pipe before the task waits.
//!
//! One task drives both directions (two futures polled by one `select!`), so a connection
//! costs one task, and its activity clock is a plain atomic on that task's stack.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::connect::keepalive;
use super::splice::PooledPipe;
use super::stats::STATS;
use crate::table::Backend;

/// Size of the per-thread scratch buffer, and the threshold between copying and splicing:
/// a read that fills it makes the next read of that direction a splice, a splice that moves
/// less than it makes the next one a copy.
pub const SCRATCH: usize = 16 * 1024;

/// A backend socket gets TCP keepalive (two setsockopt calls) only once its connection is
/// this old. Keepalive sends its first probe after `TCP_KEEPALIVE` (60 s) of silence, so a
/// shorter connection never sends one anyway; a longer one probes at most this much later.
pub const KEEPALIVE_AFTER: Duration = Duration::from_secs(1);

thread_local! {
    /// The copy-mode buffer, one per thread, in the thread's TLS block (no allocation).
    /// Borrowed only inside `Pump::copy_step`, which never awaits, so no task holds it
    /// across a suspension and a task moving to another thread simply uses that thread's.
    static SCRATCH_BUF: RefCell<[u8; SCRATCH]> = const { RefCell::new([0; SCRATCH]) };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Copy small reads, splice large ones.
    Splice,
    /// Copy only (splice is unusable here).
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
    let mut keepalive_at = Some(start + KEEPALIVE_AFTER);
    let mut half_at: Option<Instant> = None;
    // The one timer: the earliest of keepalive arming, half-close and idle deadlines.
    // Moving it later is free in tokio; moving it earlier (half-close) re-inserts it.
    let next = |keepalive_at: Option<Instant>, half_at: Option<Instant>| {
        let idle_at =
            start + Duration::from_millis(last.load(Ordering::Relaxed)) + limits.idle_timeout;
        [keepalive_at, half_at]
            .into_iter()
            .flatten()
            .fold(idle_at, Instant::min)
    };
    let sleep = tokio::time::sleep_until(next(keepalive_at, half_at));
    tokio::pin!(sleep);

    let mut up_open = true;
    let mut down_open = true;
    let end = loop {
        tokio::select! {
            biased;
            r = &mut up, if up_open => {
                up_open = false;
                if let Err(side) = r { break reset(side, client, server) }
                // Both ends done: the caller closes both sockets now, and `close` sends the
                // FIN that a `shutdown` would.
                if !down_open { break End::Done }
                // Forward the FIN. ENOTCONN here means the peer is already gone; the other
                // direction will find out on its own.
                let _ = SockRef::from(server).shutdown(std::net::Shutdown::Write);
                half_at = Some(Instant::now() + limits.half_close_timeout);
                sleep.as_mut().reset(next(keepalive_at, half_at));
            }
            r = &mut down, if down_open => {
                down_open = false;
                if let Err(side) = r { break reset(side, client, server) }
                if !up_open { break End::Done }
                let _ = SockRef::from(client).shutdown(std::net::Shutdown::Write);
                half_at = Some(Instant::now() + limits.half_close_timeout);
                sleep.as_mut().reset(next(keepalive_at, half_at));
            }
            _ = &mut closed => break End::Closed,
            _ = &mut sleep => {
                let now = Instant::now();
                if keepalive_at.is_some_and(|k| k <= now) {
                    keepalive_at = None;
                    // Best effort, as at connect: a failure only costs dead-peer detection.
                    let _ = SockRef::from(server).set_tcp_keepalive(&keepalive());
                }
                let idle_at = next(None, None);
                match half_at {
                    Some(h) if h <= now && h <= idle_at => break End::HalfCloseTimeout,
                    _ if idle_at <= now => break End::IdleTimeout,
                    _ => sleep.as_mut().reset(next(keepalive_at, half_at)),
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

/// One read and what became of it.
enum Step {
    /// Nothing to read after all (a stale readiness): wait again.
    NotReady,
    Eof,
    /// `n` bytes copied and all of them sent on.
    Sent(usize),
    /// `n` bytes read, some or all of them still to send: spliced into a pipe, or copied
    /// and only partly taken by the destination.
    Pending(usize, Spill),
}

/// Bytes read and not yet sent, held off the shared scratch buffer while the task waits for
/// the destination. Dropped empty, its pipe goes back to the pool; dropped holding bytes
/// (the destination failed), the pipe is closed.
struct Spill {
    /// A pooled pipe: filled by splice, or with `write(2)` from the scratch buffer.
    pipe: Option<PooledPipe>,
    /// Only what no pipe could take: copy-only mode (splice unusable), or a pipe smaller
    /// than the scratch buffer (an unprivileged user past `pipe-user-pages-soft`). Empty,
    /// hence unallocated, otherwise.
    rest: Vec<u8>,
    /// Bytes of `rest` already sent.
    off: usize,
}

impl Spill {
    fn is_empty(&self) -> bool {
        self.pipe.as_ref().is_none_or(|p| p.len == 0) && self.off == self.rest.len()
    }
}

fn would_block() -> io::Error {
    io::ErrorKind::WouldBlock.into()
}

/// A pipe from the thread's pool. It may fail (out of descriptors, the user's pipe quota):
/// the caller then copies, and the connection goes on.
fn take_pipe() -> io::Result<PooledPipe> {
    #[cfg(test)]
    if tests::NO_PIPES.with(std::cell::Cell::get) {
        return Err(io::Error::from_raw_os_error(libc::EMFILE));
    }
    PooledPipe::take()
}

impl Pump<'_> {
    /// Runs to end of stream or to the first error, which names the side that failed.
    ///
    /// Each read copies (`recv` into the thread's scratch buffer, `send` on) unless the
    /// previous read filled its buffer, in which case it splices (up to `CHUNK` through a
    /// pooled pipe); a splice that moves less than `SCRATCH` switches back to copying.
    /// Small messages thus cost one `recv` and one `send`, bulk transfers two splices per
    /// `CHUNK`. With `Mode::Copy` (splice unusable here) every read copies.
    ///
    /// The only awaits are the two readiness polls, which keep no state in this future
    /// (tokio keeps one waker per direction in the socket's registration), so an idle
    /// connection's task stays small.
    async fn run(self, mode: Mode) -> Result<(), Side> {
        let splice_ok = mode == Mode::Splice;
        let mut big = false;
        loop {
            poll_fn(|cx| self.src.poll_read_ready(cx))
                .await
                .map_err(|_| self.src_side)?;
            let copy =
                |p: &Self| SCRATCH_BUF.with(|b| p.copy_step(&mut b.borrow_mut()[..], splice_ok));
            let (spliced, step) = if big {
                match self.splice_in()? {
                    // splice(2) stops at TCP urgent data: EAGAIN with bytes still queued, or
                    // 0 when a FIN is queued behind them. A `recv` goes on past the mark, so
                    // a splice that moves nothing is followed by one copy step: it tells a
                    // real end (or empty queue) from the mark.
                    Step::NotReady | Step::Eof => (false, copy(&self)?),
                    s => (true, s),
                }
            } else {
                (false, copy(&self)?)
            };
            let n = match step {
                // Nothing to read: the next burst starts copying, and splices again once a
                // read fills the scratch buffer (a splicing direction left at the urgent
                // mark must not splice into it again).
                Step::NotReady => {
                    big = false;
                    continue;
                }
                Step::Eof => return Ok(()),
                Step::Sent(n) => n,
                Step::Pending(n, mut spill) => {
                    while !spill.is_empty() {
                        poll_fn(|cx| self.dst.poll_write_ready(cx))
                            .await
                            .map_err(|_| self.dst_side())?;
                        self.send_some(&mut spill)?;
                        // A slow reader draining a full pipe is still activity.
                        self.touch();
                    }
                    n
                }
            };
            if spliced {
                self.moved(n, &STATS.spliced_bytes);
                big = n >= SCRATCH;
            } else {
                self.moved(n, &STATS.copied_bytes);
                big = splice_ok && n == SCRATCH;
            }
        }
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
        self.touch();
    }

    /// Records activity now (the idle timeout counts from the last one).
    fn touch(&self) {
        self.last
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// One `recv` into `buf` and one `send` of what it read, with no await in between (the
    /// buffer is the thread's, shared by every connection on it). What `send` does not take
    /// is moved into a spill before returning.
    fn copy_step(&self, buf: &mut [u8], splice_ok: bool) -> Result<Step, Side> {
        // A short `recv` has emptied the receive queue (tcp_recvmsg walks the whole queue)
        // unless it stopped at TCP urgent data (the mark), with bytes still queued and no
        // new event to come. So after a short read one `SIOCATMARK` (no socket lock) tells
        // the two apart, and when the queue is empty the closure reports WouldBlock: tokio
        // clears the readiness now instead of after one more `recv` failing with EAGAIN.
        // tokio clears only if no event arrived since the readiness was read (its tick),
        // and never clears read-closed, so a FIN or bytes that come later still wake us.
        let mut short = 0;
        let fd = self.src.as_raw_fd();
        let r = self.src.try_io(Interest::READABLE, || {
            let n = (&*SockRef::from(self.src)).read(buf)?;
            if n > 0 && n < buf.len() && !crate::sys::at_urgent_mark(fd) {
                short = n;
                return Err(would_block());
            }
            Ok(n)
        });
        let n = match r {
            Ok(0) => return Ok(Step::Eof),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => match short {
                0 => return Ok(Step::NotReady),
                n => n,
            },
            Err(_) => return Err(self.src_side),
        };
        // A short `send` does mean the send buffer is full (and the kernel signals again
        // when room comes): clear the writability so that the spill below waits for room
        // instead of failing once with EAGAIN.
        let mut partial = 0;
        let r = self.dst.try_io(Interest::WRITABLE, || {
            let m = SockRef::from(self.dst).send_with_flags(&buf[..n], libc::MSG_NOSIGNAL)?;
            if m < n {
                partial = m;
                return Err(would_block());
            }
            Ok(m)
        });
        let sent = match r {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => partial,
            Err(_) => return Err(self.dst_side()),
        };
        if sent == n {
            return Ok(Step::Sent(n));
        }
        let left = &buf[sent..n];
        let mut spill = Spill {
            pipe: None,
            rest: Vec::new(),
            off: 0,
        };
        let mut parked = 0;
        if splice_ok {
            if let Ok(mut pipe) = take_pipe() {
                // An empty pipe takes all of it unless the pipe is smaller than `left`.
                parked = pipe.fill_from_slice(left).unwrap_or(0);
                spill.pipe = Some(pipe);
            }
        }
        if parked < left.len() {
            spill.rest.extend_from_slice(&left[parked..]);
        }
        #[cfg(test)]
        tests::SPILLS.with(|c| c.set(c.get() + 1));
        Ok(Step::Pending(n, spill))
    }

    /// One splice from the source into a pooled pipe, taken here: a connection holds a pipe
    /// only while bytes move. `NotReady` when no pipe can be had: the caller copies instead
    /// (a healthy connection is never reset for want of a pipe).
    fn splice_in(&self) -> Result<Step, Side> {
        let Ok(mut pipe) = take_pipe() else {
            return Ok(Step::NotReady);
        };
        let sfd = self.src.as_raw_fd();
        match self.src.try_io(Interest::READABLE, || pipe.fill_from(sfd)) {
            Ok(0) => Ok(Step::Eof),
            Ok(n) => Ok(Step::Pending(
                n,
                Spill {
                    pipe: Some(pipe),
                    rest: Vec::new(),
                    off: 0,
                },
            )),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Step::NotReady),
            Err(_) => Err(self.src_side),
        }
    }

    /// One attempt to send a spill on: the pipe's bytes first, then the rest.
    fn send_some(&self, spill: &mut Spill) -> Result<(), Side> {
        let r = match &mut spill.pipe {
            Some(pipe) if pipe.len > 0 => {
                let dfd = self.dst.as_raw_fd();
                self.dst.try_io(Interest::WRITABLE, || pipe.drain_to(dfd))
            }
            _ => self.dst.try_write(&spill.rest[spill.off..]).inspect(|m| {
                spill.off += m;
            }),
        };
        match r {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(_) => Err(self.dst_side()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::Shutdown;
    use std::thread;

    use socket2::{Domain, Socket, Type};

    thread_local! {
        /// Copy steps whose send was partial, on this thread (a `#[tokio::test]` runs its
        /// tasks on the test's own thread).
        pub(super) static SPILLS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
        /// Makes taking a pipe fail on this thread, as when descriptors or the pipe quota
        /// run out.
        pub(super) static NO_PIPES: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// The atomics a direction counts into.
    #[derive(Default)]
    struct Counters {
        total: AtomicU64,
        counter: AtomicU64,
        last: AtomicU64,
    }

    impl Counters {
        /// A direction from `src` to `dst` (the client's side) counting into these.
        fn pump<'a>(&'a self, src: &'a TcpStream, dst: &'a TcpStream) -> Pump<'a> {
            Pump {
                src,
                dst,
                src_side: Side::Client,
                total: &self.total,
                counter: &self.counter,
                last: &self.last,
                start: Instant::now(),
            }
        }
    }

    /// A connected pair: meshd's end (tokio) and the peer's (std, blocking). `small` makes
    /// both ends' buffers tiny so that meshd's sends come up short.
    async fn pair(small: bool) -> (TcpStream, std::net::TcpStream) {
        let l = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        if small {
            // Inherited by the accepted socket: a 4 KiB receive window.
            l.set_recv_buffer_size(4096).unwrap();
        }
        l.bind(
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )
        .unwrap();
        l.listen(1).unwrap();
        let addr = l.local_addr().unwrap().as_socket().unwrap();
        let ours = TcpStream::connect(addr).await.unwrap();
        if small {
            SockRef::from(&ours).set_send_buffer_size(4096).unwrap();
        }
        let (peer, _) = l.accept().unwrap();
        (ours, peer.into())
    }

    fn byte(i: usize) -> u8 {
        (i % 251) as u8
    }

    /// A fast sender, a reader that starts late behind tiny buffers: meshd's sends come up
    /// short, the leftovers wait in a spill (a pooled pipe, or the heap in copy-only mode),
    /// and every byte still arrives once, in order.
    async fn slow_reader(mode: Mode) {
        const TOTAL: usize = 2 << 20;
        let (src, mut sender) = pair(false).await;
        let (dst, mut reader) = pair(true).await;
        let send = thread::spawn(move || {
            let buf: Vec<u8> = (0..TOTAL).map(byte).collect();
            for c in buf.chunks(1000) {
                sender.write_all(c).unwrap();
            }
            sender.shutdown(Shutdown::Write).unwrap();
            sender
        });
        let read = thread::spawn(move || {
            thread::sleep(std::time::Duration::from_millis(200));
            let mut got = Vec::new();
            reader.read_to_end(&mut got).unwrap();
            got
        });
        let spills = SPILLS.with(|c| c.get());
        let counters = Counters::default();
        let pump = counters.pump(&src, &dst);
        assert!(pump.run(mode).await.is_ok());
        SockRef::from(&dst).shutdown(Shutdown::Write).unwrap();
        let got = read.join().unwrap();
        drop(send.join().unwrap());
        assert_eq!(got.len(), TOTAL);
        assert!(
            got.iter().enumerate().all(|(i, b)| *b == byte(i)),
            "bytes out of order"
        );
        assert_eq!(counters.total.load(Ordering::Relaxed), TOTAL as u64);
        assert!(SPILLS.with(|c| c.get()) > spills, "no send came up short");
    }

    #[tokio::test]
    async fn a_direction_keeps_little_state_while_it_waits() {
        let (a, _pa) = pair(false).await;
        let (b, _pb) = pair(false).await;
        let counters = Counters::default();
        let pump = counters.pump(&a, &b);
        // Every connection's task holds two of these, idle or not. 280 bytes with rustc
        // 1.95; awaiting tokio's `readable()`/`writable()` futures in nested async fns
        // made it 592 (+0.6 KiB per idle connection, measured).
        let size = std::mem::size_of_val(&pump.run(Mode::Splice));
        println!("Pump::run future: {size} bytes");
        assert!(size <= 384, "Pump::run future is {size} bytes");
    }

    #[tokio::test]
    async fn short_sends_spill_into_a_pipe_and_arrive_in_order() {
        assert!(super::super::splice::probe());
        slow_reader(Mode::Splice).await;
    }

    /// Without pipes a splicing direction copies: every byte arrives, nothing is reset.
    #[tokio::test]
    async fn no_pipe_to_be_had_falls_back_to_copying() {
        assert!(super::super::splice::probe());
        NO_PIPES.with(|c| c.set(true));
        slow_reader(Mode::Splice).await;
        NO_PIPES.with(|c| c.set(false));
    }

    #[tokio::test]
    async fn short_sends_in_copy_only_mode_arrive_in_order() {
        slow_reader(Mode::Copy).await;
    }

    /// TCP urgent data (MSG_OOB, as telnet and FTP's ABOR send it) makes the kernel stop a
    /// read at the mark with bytes still queued. The peer sends `bulk` bytes (so that the
    /// direction splices when `bulk` is large), 100 bytes, one urgent byte and 100 bytes;
    /// everything but the urgent byte (out of band, not in the stream) must come through.
    /// With `fin_at_once` the FIN follows at once (it must not be taken for the end before
    /// the last 100 bytes); without, the peer waits for the reader to have every byte
    /// before it sends the FIN (nothing else would wake a stalled direction).
    async fn urgent_data(mode: Mode, bulk: usize, fin_at_once: bool) {
        let (src, sender) = pair(false).await;
        let (dst, mut reader) = pair(false).await;
        let (got_all_tx, got_all_rx) = std::sync::mpsc::channel::<()>();
        let send = thread::spawn(move || {
            let sock = Socket::from(sender);
            let head: Vec<u8> = (0..bulk + 100).map(byte).collect();
            (&sock).write_all(&head).unwrap();
            sock.send_out_of_band(b"!").unwrap();
            let tail: Vec<u8> = (bulk + 100..bulk + 200).map(byte).collect();
            (&sock).write_all(&tail).unwrap();
            if !fin_at_once {
                let _ = got_all_rx.recv_timeout(std::time::Duration::from_secs(5));
            }
            sock.shutdown(Shutdown::Write).unwrap();
            sock
        });
        let read = thread::spawn(move || {
            reader
                .set_read_timeout(Some(std::time::Duration::from_secs(3)))
                .unwrap();
            let mut got = vec![0u8; bulk + 200];
            let all = reader.read_exact(&mut got).is_ok();
            let _ = got_all_tx.send(());
            let mut rest = Vec::new();
            reader
                .set_read_timeout(Some(std::time::Duration::from_secs(10)))
                .unwrap();
            let ended = reader.read_to_end(&mut rest).is_ok();
            (all, got, ended, rest.len())
        });
        let counters = Counters::default();
        let pump = counters.pump(&src, &dst);
        // Everything is queued before the first read: the mark sits inside it.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let done = tokio::time::timeout(std::time::Duration::from_secs(10), pump.run(mode)).await;
        assert!(matches!(done, Ok(Ok(()))), "the direction did not end");
        SockRef::from(&dst).shutdown(Shutdown::Write).unwrap();
        let (all, got, ended, extra) = read.join().unwrap();
        drop(send.join().unwrap());
        assert!(all, "bytes after the urgent mark were held back or lost");
        assert!(got.iter().enumerate().all(|(i, b)| *b == byte(i)));
        assert!(
            ended && extra == 0,
            "end of stream: {ended}, {extra} bytes too many"
        );
    }

    #[tokio::test]
    async fn urgent_data_does_not_stall_a_copying_direction() {
        urgent_data(Mode::Splice, 0, false).await;
        urgent_data(Mode::Splice, 0, true).await;
    }

    #[tokio::test]
    async fn urgent_data_does_not_stall_or_truncate_a_splicing_direction() {
        assert!(super::super::splice::probe());
        urgent_data(Mode::Splice, 1 << 20, false).await;
        urgent_data(Mode::Splice, 1 << 20, true).await;
    }
}
