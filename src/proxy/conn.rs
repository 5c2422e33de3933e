//! One client connection: pick a backend from the service snapshot taken at accept, connect
//! (hedging and retrying on other backends before the client sees anything; panic routing
//! when no eligible backend is left), send the PROXY header if configured, optionally hold
//! the request for a replay until the backend answers, then forward until the connection
//! ends.
//!
//! Why connects are hedged: a busy task (full listen queue) drops SYNs, and Linux resends a
//! dropped SYN only after 1 s. So when a connect has not completed after `hedge_delay`, a
//! second one starts on another backend and the first to complete wins; the other is
//! dropped (its socket closed). Each attempt is bounded by `connect_timeout`, and a timeout
//! only says the backend is busy: it is retried elsewhere but never counts towards
//! ejection. Refused, reset and unreachable do.
//!
//! With `accept_proxy`, a connection from a trusted source first yields its PROXY header
//! (`accept_proxy::read`, within `client_hello_timeout`; a bad or missing one closes it and
//! counts it), and the header's client address stands for the peer from then on.
//!
//! On an SNI listener (`[service.tls]` services sharing an address), `serve_sni` first
//! reads the ClientHello and picks the service by its server name; from there it is the
//! same path, the hello's bytes sent to the backend first, unless the service terminates
//! TLS (`mode = "terminate"`): then `terminate::serve` completes the handshake and
//! forwards the plaintext.
//!
//! Invariant: no lock, no string formatting (the access log, off by default, aside), no
//! allocation unless `retry_on_early_close` asks for a replay buffer, or an SNI connection
//! reads its hello (a buffer of 2 to 16 KiB, freed once the backend has it): the snapshot
//! and backend are `Arc` clones, the tried-set, both connect attempts and the PROXY header
//! live in this task's own state.

use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::forward::{self, End, Limits, Mode};
use super::proxy_header::Header;
use super::sni::{self, SniError, Step};
use super::{accept_proxy, connect, proxy_protocol, terminate};
use crate::config::defaults::MAX_CONNECT_RETRIES;
use crate::config::ProxyProtocol;
use crate::table::sni::SniRoutes;
use crate::table::{Backend, ConnectError, Ejection, ServiceState, ServiceTable, TableHandle};

/// The outlier rules live in one place (`table::outlier`).
pub use crate::table::outlier::EJECT_AFTER_FAILURES;

/// At most this many panic-routing attempts per connection (beyond the normal ones): a
/// service with thousands of listed backends does not hold a client for thousands of tries.
const PANIC_ATTEMPTS: usize = 8;

/// What every connection of the process shares.
#[derive(Debug)]
pub struct Shared {
    pub mode: Mode,
    /// One log line per closed connection (`[log] access_log`); changed by reloads.
    pub access_log: AtomicBool,
    /// Backends ejected by passive outlier detection, for the control plane to schedule
    /// their re-admission.
    pub ejected: mpsc::UnboundedSender<(Arc<ServiceState>, Arc<Backend>)>,
    /// The published table: a queued connection (`queue_timeout`) reads its service again
    /// from it before each new round.
    pub table: TableHandle,
}

/// Decrements a live-connection counter however the task ends (also on cancellation).
pub(super) struct Live<'a>(pub(super) &'a AtomicU64);

impl<'a> Live<'a> {
    fn count(c: &'a AtomicU64) -> Live<'a> {
        c.fetch_add(1, Ordering::Relaxed);
        Live(c)
    }
}

impl Drop for Live<'_> {
    fn drop(&mut self) {
        let prev = self.0.fetch_sub(1, Ordering::Relaxed);
        debug_assert!(prev > 0, "live-connection counter went negative");
    }
}

/// The backend a connection is bound to, counted in its live connections for as long as
/// this is held (an `Arc`: the connection may outlive the snapshot it was dialed from).
pub(super) struct Serving(pub(super) Arc<Backend>);

impl Serving {
    pub(super) fn new(b: Arc<Backend>) -> Serving {
        b.active.fetch_add(1, Ordering::Relaxed);
        Serving(b)
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        let prev = self.0.active.fetch_sub(1, Ordering::Relaxed);
        debug_assert!(prev > 0, "live-connection counter went negative");
    }
}

/// Capacity of the tried-set: every normal attempt, one hedge, every panic attempt.
const TRIED: usize = MAX_CONNECT_RETRIES as usize + 2 + PANIC_ATTEMPTS;

/// One connection's connect budget and the backends it already tried (indices into
/// [`ServiceTable::listed`]), on the task's own state.
pub(super) struct Attempts {
    tried: [u32; TRIED],
    len: usize,
    /// Failed attempts outside panic routing (bounded by `connect_retries`).
    failures: u32,
    /// Attempts started by panic routing.
    panics: usize,
    /// Whether an attempt failed: the next one started is a retry.
    retrying: bool,
    /// Per tried backend (aligned with `tried`): it failed this connection hard (refused,
    /// unreachable): never tried again. A timeout or an early close (an overloaded task
    /// shedding connections) is transient: another round may try it again.
    hard: [bool; TRIED],
    /// Early closes replayed (bounded by `connect_retries + 1`, apart from `failures`: the
    /// backend accepted the connect, it did not fail it).
    early: u32,
    /// The next attempt goes to a backend this connection already tried: it waits
    /// [`AGAIN_PAUSE`] first.
    again: bool,
}

impl Attempts {
    pub(super) fn new() -> Attempts {
        Attempts {
            tried: [0; TRIED],
            len: 0,
            failures: 0,
            panics: 0,
            retrying: false,
            hard: [false; TRIED],
            early: 0,
            again: false,
        }
    }

    fn contains(&self, i: usize) -> bool {
        self.tried[..self.len].contains(&(i as u32))
    }

    fn failed_hard(&self, i: usize) -> bool {
        (0..self.len).any(|j| self.tried[j] == i as u32 && self.hard[j])
    }

    fn push(&mut self, i: usize) {
        if self.len < self.tried.len() {
            self.tried[self.len] = i as u32;
            self.len += 1;
        }
    }

    /// The next backend to try, as an index into [`ServiceTable::listed`], and whether it
    /// is a panic-routing pick. Eligible, usable, untried backends first (the balancer's
    /// pick); when none is left, panic routing: ejected, then unhealthy, then draining.
    fn next(&mut self, svc: &ServiceTable, client: SocketAddr) -> Option<(usize, bool)> {
        let budget = svc.config.connect_retries;
        if self.failures > budget || self.early > budget {
            return None;
        }
        let pick = svc.selector.pick(
            client.ip(),
            |i| svc.backends[i].active(),
            |i| self.contains(i) || !svc.backends[i].is_usable(),
        );
        if let Some(i) = pick {
            self.push(i);
            return Some((i, false));
        }
        if self.panics >= PANIC_ATTEMPTS || self.len >= TRIED {
            return None;
        }
        if let Some(k) = svc.panic_candidate(|k| self.contains(k)) {
            self.push(k);
            self.panics += 1;
            return Some((k, true));
        }
        // Every listed backend was tried. While the budget lasts, go round again (after a
        // pause) over the eligible backends that only timed out or closed early: an
        // overloaded task that shed this connection a moment ago accepts the next one.
        // A backend that refused is never tried again.
        if self.failures + self.early == 0 {
            return None;
        }
        let i = svc.selector.pick(
            client.ip(),
            |i| svc.backends[i].active(),
            |i| !svc.backends[i].is_usable() || self.failed_hard(i),
        )?;
        self.again = true;
        Some((i, false))
    }

    /// Listed backend `k` closed the connection before answering (or before taking the
    /// PROXY header): counted as a reset towards its ejection, and the request is replayed.
    fn closed_early(&mut self, svc: &ServiceTable, k: usize, panic: bool, shared: &Shared) {
        self.failed(svc, k, panic, ConnectError::Reset, true, shared);
        svc.state.replays.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a failed attempt on listed backend `k`: a connect error, or (`early`) a
    /// backend that accepted and closed before answering. Counted by reason; refused,
    /// reset, unreachable and early closes count towards ejection, a timeout (a busy task
    /// dropping SYNs) does not.
    fn failed(
        &mut self,
        svc: &ServiceTable,
        k: usize,
        panic: bool,
        e: ConnectError,
        early: bool,
        shared: &Shared,
    ) {
        self.retrying = true;
        if early {
            self.early += 1;
        } else if !panic {
            self.failures += 1;
        }
        if !early && !matches!(e, ConnectError::Timeout | ConnectError::Reset) {
            for j in 0..self.len {
                if self.tried[j] == k as u32 {
                    self.hard[j] = true;
                }
            }
        }
        let Some(b) = svc.listed(k) else { return };
        b.stats.connect_errors[e as usize].fetch_add(1, Ordering::Relaxed);
        if e == ConnectError::Timeout {
            return;
        }
        let n = b.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        // Never the service's last usable backend, never past `max_ejection_percent`
        // (`ServiceTable::eject`); panic candidates are not in the eligible set.
        if n >= EJECT_AFTER_FAILURES && k < svc.backends.len() && svc.eject(k) != Ejection::Nothing
        {
            let _ = shared.ejected.send((svc.state.clone(), b.clone()));
        }
    }
}

/// The pause before a connection tries a backend it already tried (see `Attempts::next`).
const AGAIN_PAUSE: Duration = Duration::from_millis(100);

/// One connect attempt to `b` after `pause`, counted in its live connections while it runs
/// (so `least_conn` and `p2c` see in-flight connects).
async fn attempt(
    b: &Backend,
    timeout: Duration,
    pause: Duration,
) -> Result<TcpStream, connect::Failure> {
    if !pause.is_zero() {
        tokio::time::sleep(pause).await;
    }
    let _live = Live::count(&b.active);
    connect::connect(b.addr, timeout).await
}

/// How dialing ended.
enum Dialed<'a> {
    Up {
        server: TcpStream,
        backend: &'a Arc<Backend>,
        /// Its index in [`ServiceTable::listed`].
        k: usize,
        /// Picked by panic routing.
        panic: bool,
    },
    /// Every allowed attempt failed, or nothing was left to try.
    NoBackend,
}

/// Connects to a backend of `svc`: up to two attempts in flight. The first starts at once;
/// if it has not completed after `hedge_delay`, a second (the hedge) starts on another
/// backend; a failed attempt is replaced at once by the next candidate while the budget
/// lasts. The first attempt to complete wins; the other is dropped (its socket closed).
async fn dial<'a>(
    svc: &'a ServiceTable,
    client: SocketAddr,
    attempts: &mut Attempts,
    shared: &Shared,
) -> Dialed<'a> {
    let cfg = &*svc.config;
    // Two attempt slots and, for each, (listed index, panic pick).
    let mut slots = [pin!(None), pin!(None)];
    let mut meta: [Option<(usize, bool)>; 2] = [None, None];
    let mut hedged = cfg.hedge_delay.is_zero();
    let mut hedge = pin!(tokio::time::sleep(cfg.hedge_delay));
    let t0 = Instant::now();

    // Starts the next candidate in slot `s`; false if there is none.
    macro_rules! start {
        ($s:expr) => {{
            let s = $s;
            match attempts.next(svc, client) {
                Some((k, panic)) => match svc.listed(k) {
                    Some(b) => {
                        if std::mem::take(&mut attempts.retrying) {
                            svc.state.retries.fetch_add(1, Ordering::Relaxed);
                        }
                        let pause = if std::mem::take(&mut attempts.again) {
                            AGAIN_PAUSE
                        } else {
                            Duration::ZERO
                        };
                        slots[s].set(Some(attempt(b, cfg.connect_timeout, pause)));
                        meta[s] = Some((k, panic));
                        true
                    }
                    None => false,
                },
                None => false,
            }
        }};
    }

    start!(0);
    loop {
        if meta.iter().all(Option::is_none) {
            return Dialed::NoBackend;
        }
        enum Ev {
            Done(usize, Result<TcpStream, connect::Failure>),
            Hedge,
        }
        let ev = poll_fn(|cx| {
            for (s, slot) in slots.iter_mut().enumerate() {
                if let Some(f) = slot.as_mut().as_pin_mut() {
                    if let Poll::Ready(r) = f.poll(cx) {
                        return Poll::Ready(Ev::Done(s, r));
                    }
                }
            }
            if !hedged && hedge.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ev::Hedge);
            }
            Poll::Pending
        })
        .await;

        match ev {
            Ev::Hedge => {
                hedged = true;
                // The attempt in flight is slow (a dropped SYN waits 1 s for the kernel to
                // resend it): race a second one on another backend.
                if let Some(free) = meta.iter().position(Option::is_none) {
                    if start!(free) {
                        svc.state.hedged_connects.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Ev::Done(s, r) => {
                slots[s].set(None);
                let Some((k, panic)) = meta[s].take() else {
                    continue;
                };
                match r {
                    Ok(server) => {
                        let Some(backend) = svc.listed(k) else {
                            continue;
                        };
                        backend.consecutive_failures.store(0, Ordering::Relaxed);
                        svc.state
                            .connect_duration
                            .record(t0.elapsed().as_secs_f64());
                        if panic {
                            svc.state.panic_connections.fetch_add(1, Ordering::Relaxed);
                        }
                        return Dialed::Up {
                            server,
                            backend,
                            k,
                            panic,
                        };
                    }
                    Err(connect::Failure::Local(_)) => {
                        // Out of descriptors or ports here: another backend would fail the
                        // same way, and this one is not to blame.
                        return Dialed::NoBackend;
                    }
                    Err(connect::Failure::Backend(e)) => {
                        attempts.failed(svc, k, panic, e, false, shared);
                        start!(s);
                        if !hedged && meta[1 - s].is_none() {
                            // The replacement is the one attempt in flight: it gets its own
                            // hedge delay.
                            hedge.as_mut().reset(Instant::now() + cfg.hedge_delay);
                        }
                    }
                }
            }
        }
    }
}

/// What the replay phase saw (see [`hold_for_replay`]).
enum Replay {
    /// The backend sent a first byte (or the request outgrew the buffer): forward.
    Forward,
    /// The backend closed or reset before sending a byte: try another.
    EarlyClose,
    /// The client went away, or an idle timeout passed.
    Abandon,
}

/// Writes all of `b` to `s` (through `&TcpStream`: the replay phase reads and writes the
/// same socket from two `select!` arms).
async fn send_all(s: &TcpStream, mut b: &[u8]) -> std::io::Result<()> {
    while !b.is_empty() {
        s.writable().await?;
        match s.try_write(b) {
            Ok(n) => b = &b[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `retry_on_early_close`: sends the client's bytes to `server` while keeping a copy (up to
/// `cap`), until the backend sends its first byte. Bytes already in `buf` (kept from an
/// earlier backend) are sent first; `client_eof` remembers a client's FIN across backends.
async fn hold_for_replay(
    client: &TcpStream,
    server: &TcpStream,
    buf: &mut Vec<u8>,
    cap: usize,
    client_eof: &mut bool,
    idle: Duration,
) -> Replay {
    let fin = |s: &TcpStream| socket2::SockRef::from(s).shutdown(std::net::Shutdown::Write);
    if send_all(server, buf).await.is_err() || (*client_eof && fin(server).is_err()) {
        return Replay::EarlyClose;
    }
    let mut deadline = Instant::now() + idle;
    let mut peek = [0u8; 1];
    loop {
        if buf.len() >= cap {
            // Too much to replay: from here on the connection is forwarded as any other
            // (a later early close is the client's to see).
            return Replay::Forward;
        }
        let client_readable = async {
            if *client_eof {
                std::future::pending().await
            } else {
                client.readable().await
            }
        };
        tokio::select! {
            r = server.peek(&mut peek) => return match r {
                Ok(0) | Err(_) => Replay::EarlyClose,
                Ok(_) => Replay::Forward,
            },
            r = client_readable => {
                if r.is_err() {
                    return Replay::Abandon;
                }
                let start = buf.len();
                buf.resize(start + (cap - start).min(forward::SCRATCH), 0);
                match client.try_read(&mut buf[start..]) {
                    Ok(0) => {
                        buf.truncate(start);
                        *client_eof = true;
                        if fin(server).is_err() {
                            return Replay::EarlyClose;
                        }
                    }
                    Ok(n) => {
                        buf.truncate(start + n);
                        deadline = Instant::now() + idle;
                        if send_all(server, &buf[start..]).await.is_err() {
                            return Replay::EarlyClose;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => buf.truncate(start),
                    Err(_) => {
                        buf.truncate(start);
                        return Replay::Abandon;
                    }
                }
            }
            _ = tokio::time::sleep_until(deadline) => return Replay::Abandon,
        }
    }
}

/// `queue_timeout`: a connection that no backend took waits here, then tries again with
/// the service's current snapshot. Rounds come sooner at first (a task restarting listens
/// within moments) and every [`QUEUE_PAUSE_MAX`] at most, until the timeout passes.
pub(super) struct Queue {
    deadline: Instant,
    pause: Duration,
}

const QUEUE_PAUSE_MIN: Duration = Duration::from_millis(25);
const QUEUE_PAUSE_MAX: Duration = Duration::from_millis(400);

impl Queue {
    fn new(timeout: Duration) -> Queue {
        Queue {
            deadline: Instant::now() + timeout,
            pause: QUEUE_PAUSE_MIN,
        }
    }

    /// Waits for the next round; `None` when the timeout has passed, or the service is
    /// gone from the table (removed by a reload: its listeners are closing too).
    async fn wait(
        &mut self,
        state: &Arc<ServiceState>,
        shared: &Shared,
    ) -> Option<Arc<ServiceTable>> {
        let now = Instant::now();
        if now >= self.deadline {
            return None;
        }
        tokio::time::sleep_until((now + self.pause).min(self.deadline)).await;
        self.pause = (self.pause * 2).min(QUEUE_PAUSE_MAX);
        shared.table.load().service(state).cloned()
    }
}

/// Dials a backend of `svc`; when none takes the connection, queues it for up to the
/// service's `queue_timeout` (a round of `dial` after each pause, with a fresh budget and the
/// service's current snapshot, which then replaces `svc`). `None`: nothing took it.
pub(super) async fn dial_queued(
    svc: &mut Arc<ServiceTable>,
    client: SocketAddr,
    attempts: &mut Attempts,
    queue: &mut Option<Queue>,
    shared: &Shared,
) -> Option<(TcpStream, Arc<Backend>, usize, bool)> {
    loop {
        match dial(svc, client, attempts, shared).await {
            Dialed::Up {
                server,
                backend,
                k,
                panic,
            } => return Some((server, backend.clone(), k, panic)),
            Dialed::NoBackend => {}
        }
        let q = match queue {
            Some(q) => q,
            None if svc.config.queue_timeout.is_zero() => return None,
            None => {
                svc.state.queued.fetch_add(1, Ordering::Relaxed);
                queue.insert(Queue::new(svc.config.queue_timeout))
            }
        };
        *svc = q.wait(&svc.state, shared).await?;
        *attempts = Attempts::new();
    }
}

/// Serves one accepted connection. The accept loop has already counted it in
/// `svc.state.active`; the connection un-counts it when it ends. (The same state machine
/// as an SNI connection's after its hello, not a future wrapping it: one more layer made
/// the task larger than tokio boxes separately in debug builds, an allocation more per
/// connection, as `tests/alloc.rs` saw.)
pub fn serve(
    client: TcpStream,
    peer: SocketAddr,
    svc: Arc<ServiceTable>,
    shared: Arc<Shared>,
) -> impl Future<Output = ()> + Send {
    to_backend(
        client,
        peer,
        svc,
        shared,
        Instant::now(),
        Prefix::ProxyHeader,
    )
}

/// Serves one connection accepted on an SNI listener (an address of `[service.tls]`
/// services): a trusted source's PROXY header, then the ClientHello read into the
/// connection's own buffer (grown as needed, at most 16 KiB, freed once the backend has
/// it), both within `client_hello_timeout`; the normalised name picks the service
/// (`SniRoutes::route`), whose limits, pick, connect and forwarding then apply as to any
/// connection, the hello's bytes sent first (a terminating service's connection goes on
/// in `terminate::serve`, the hello replayed to its TLS server, under the same deadline). No service: TLS alert `unrecognized_name`,
/// and the connection is closed; a malformed, oversized or late hello: closed. Each
/// outcome is counted (`meshd_tls_handshakes_total`).
pub async fn serve_sni(
    mut client: TcpStream,
    peer: SocketAddr,
    routes: Arc<SniRoutes>,
    shared: Arc<Shared>,
) {
    let stats = &*routes.stats;
    let count = |c: &AtomicU64| {
        c.fetch_add(1, Ordering::Relaxed);
    };
    let accepted = Instant::now();
    let deadline = accepted + routes.client_hello_timeout;
    let mut proxied_dst: Option<SocketAddr> = None;
    let peer = if accept_proxy::trusted(&routes.accept_proxy, peer.ip()) {
        match tokio::time::timeout_at(deadline, accept_proxy::read(&mut client)).await {
            Ok(Ok(Header::Proxy { src, dst })) => {
                proxied_dst = Some(dst);
                src
            }
            Ok(Ok(Header::Local)) => peer,
            Ok(Err(_)) | Err(_) => return count(&stats.proxy_header),
        }
    } else {
        peer
    };
    let mut hello = Vec::new();
    let name = match tokio::time::timeout_at(deadline, read_hello(&mut client, &mut hello)).await {
        Ok(Ok(name)) => name,
        Ok(Err(HelloEnd::Closed)) => return count(&stats.closed),
        Ok(Err(HelloEnd::Refused(SniError::TooLarge))) => return count(&stats.too_large),
        Ok(Err(HelloEnd::Refused(_))) => return count(&stats.malformed),
        Err(_) => return count(&stats.timeout),
    };
    let Some((state, via)) = routes.route(name.as_ref().map(sni::Name::as_str)) else {
        // One 7-byte record into an empty send buffer: never waits.
        let _ = client.try_write(&sni::ALERT_UNRECOGNIZED_NAME);
        return count(&stats.unrecognized_name);
    };
    let guard = shared.table.load();
    let Some(svc) = guard.service(state) else {
        return count(&stats.no_service);
    };
    // As the accept loop does for a service's own listener.
    let max = u64::from(svc.config.max_connections);
    let live = state.active.fetch_add(1, Ordering::Relaxed);
    if max > 0 && live >= max {
        state.active.fetch_sub(1, Ordering::Relaxed);
        state
            .rejected_max_connections
            .fetch_add(1, Ordering::Relaxed);
        let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
        return;
    }
    let svc = svc.clone();
    drop(guard);
    if let Some(terminate) = svc.config.tls.as_ref().and_then(|t| t.terminate.clone()) {
        // Counted once the handshake is complete.
        let routed = terminate::Routed {
            client,
            hello,
            peer,
            proxied_dst,
            svc,
            terminate,
            via,
            accepted,
            deadline,
        };
        // Boxed: a TLS server's state would otherwise grow every SNI connection's task,
        // passthrough ones included (a terminated connection allocates plenty anyway).
        return Box::pin(terminate::serve(routed, shared)).await;
    }
    count(&state.tls_routed[via as usize]);
    let prefix = Prefix::Hello { proxied_dst, hello };
    to_backend(client, peer, svc, shared, accepted, prefix).await;
}

/// What a connection brings before its first byte for the backend.
enum Prefix {
    /// A service's own listener: a PROXY header if `accept_proxy` trusts the peer.
    ProxyHeader,
    /// An SNI listener's, past its PROXY header (if any, with the address it named) and
    /// its ClientHello (sent to the backend first).
    Hello {
        proxied_dst: Option<SocketAddr>,
        hello: Vec<u8>,
    },
}

/// Why no ClientHello came.
enum HelloEnd {
    /// The client closed or reset first.
    Closed,
    Refused(SniError),
}

/// Reads until `buf` holds a whole ClientHello (what follows it in the same reads stays
/// in `buf` too: all of it goes to the backend); its normalised server name, if any.
/// `buf` grows from 2 KiB by doubling, never past [`sni::MAX_HELLO`].
async fn read_hello(
    client: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> Result<Option<sni::Name>, HelloEnd> {
    loop {
        let have = buf.len();
        let room = (sni::MAX_HELLO - have).min(have.max(2048));
        if room == 0 {
            return Err(HelloEnd::Refused(SniError::TooLarge));
        }
        buf.resize(have + room, 0);
        let n = match client.read(&mut buf[have..]).await {
            Ok(0) | Err(_) => return Err(HelloEnd::Closed),
            Ok(n) => n,
        };
        buf.truncate(have + n);
        match sni::parse(buf) {
            Ok(Step::Done { name, .. }) => return Ok(name),
            Ok(Step::Incomplete) => {}
            Err(e) => return Err(HelloEnd::Refused(e)),
        }
    }
}

/// Everything once the service is known: the PROXY header of a service's own listener
/// (`Prefix`), dial (queue, retries, hedging, panic routing), PROXY header sent, an SNI
/// connection's ClientHello, the replay phase, forwarding, access log. The connection is
/// counted in `svc.state.active` already; this un-counts it.
async fn to_backend(
    mut client: TcpStream,
    peer: SocketAddr,
    mut svc: Arc<ServiceTable>,
    shared: Arc<Shared>,
    accepted: Instant,
    prefix: Prefix,
) {
    let shared = &*shared;
    let state = svc.state.clone();
    let _service_live = Live(&state.active);
    // `accept_proxy`: a trusted source's PROXY header names the client (for the pick, the
    // header meshd sends, the access log) and the address it connected to. Anyone else
    // costs one CIDR check; their bytes are not looked at.
    let (peer, proxied_dst, mut first) = match prefix {
        Prefix::Hello { proxied_dst, hello } => (peer, proxied_dst, hello),
        Prefix::ProxyHeader if accept_proxy::trusted(&svc.config.accept_proxy, peer.ip()) => {
            let read = accept_proxy::read(&mut client);
            match tokio::time::timeout(svc.config.client_hello_timeout, read).await {
                Ok(Ok(Header::Proxy { src, dst })) => (src, Some(dst), Vec::new()),
                Ok(Ok(Header::Local)) => (peer, None, Vec::new()),
                Ok(Err(e)) => {
                    state.rejected_proxy_header.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(service = &*state.name, %peer, error = %e, "PROXY header refused, connection closed");
                    return;
                }
                Err(_) => {
                    state.rejected_proxy_header.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(service = &*state.name, %peer, "no PROXY header within client_hello_timeout, connection closed");
                    return;
                }
            }
        }
        Prefix::ProxyHeader => (peer, None, Vec::new()),
    };
    let mut attempts = Attempts::new();
    let mut queue: Option<Queue> = None;
    // `retry_on_early_close`: the client's bytes kept for a replay (allocated only then).
    let mut replay: Option<(Vec<u8>, bool)> = None;
    let (server, live, replayed_rx) = loop {
        let Some((mut server, backend, k, panic)) =
            dial_queued(&mut svc, peer, &mut attempts, &mut queue, shared).await
        else {
            state.rejected_no_backend.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let cfg = &*svc.config;
        let replays = cfg.retry_on_early_close && cfg.replay_buffer > 0;
        let live = Serving::new(backend);

        // The address the client connected to (the PROXY header's, when one came in) costs
        // a getsockname: only the header needs it.
        let header = match cfg.proxy_protocol {
            ProxyProtocol::Off => None,
            v => {
                let dst = proxied_dst.unwrap_or_else(|| client.local_addr().unwrap_or(peer));
                proxy_protocol::encode(v, peer, dst)
            }
        };
        if let Some(h) = header {
            if server.write_all(h.as_bytes()).await.is_err() {
                if replays {
                    drop(live);
                    attempts.closed_early(&svc, k, panic, shared);
                    continue;
                }
                log_access(
                    shared,
                    &svc,
                    &live.0,
                    peer,
                    accepted,
                    End::BackendReset,
                    0,
                    0,
                );
                return;
            }
        }
        if !replays {
            if !first.is_empty() {
                if server.write_all(&first).await.is_err() {
                    log_access(
                        shared,
                        &svc,
                        &live.0,
                        peer,
                        accepted,
                        End::BackendReset,
                        0,
                        0,
                    );
                    return;
                }
                let sent = first.len() as u64;
                // Freed now: a forwarding connection holds no buffer.
                drop(std::mem::take(&mut first));
                break (server, live, sent);
            }
            break (server, live, 0);
        }
        // The hello (if any) is the first of the bytes kept for a replay.
        let (buf, eof) = replay.get_or_insert_with(|| (std::mem::take(&mut first), false));
        match hold_for_replay(
            &client,
            &server,
            buf,
            cfg.replay_buffer as usize,
            eof,
            cfg.idle_timeout,
        )
        .await
        {
            Replay::Forward => {
                let sent = buf.len() as u64;
                break (server, live, sent);
            }
            Replay::Abandon => {
                log_access(
                    shared,
                    &svc,
                    &live.0,
                    peer,
                    accepted,
                    End::ClientReset,
                    0,
                    0,
                );
                return;
            }
            Replay::EarlyClose => {
                // Closed before a byte came back: nothing reached the client, so the
                // request is sent again elsewhere. A task that accepts and closes counts
                // towards its ejection like a refusal.
                drop(live);
                attempts.closed_early(&svc, k, panic, shared);
            }
        }
    };
    let backend: &Backend = &live.0;
    let cfg = &*svc.config;
    backend.stats.connections.fetch_add(1, Ordering::Relaxed);
    backend
        .stats
        .bytes_rx
        .fetch_add(replayed_rx, Ordering::Relaxed);

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
        shared,
        &svc,
        backend,
        peer,
        accepted,
        out.end,
        out.rx + replayed_rx,
        out.tx,
    );
}

#[allow(clippy::too_many_arguments)]
pub(super) fn log_access(
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
