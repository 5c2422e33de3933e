//! A bounded HTTP/1.1 load for the tests: client threads that `GET /` a target in a loop,
//! some with one connection per request (`Connection: close`), some over kept-alive
//! connections, each request counted in the phase in which it started.
//!
//! Counting (the same rules as `meshd demo`): a request **failed** on any error — connect
//! refused or reset, a connection closed before the whole response, a status other than
//! 200, an empty body, or no complete response within `request_timeout`. A keep-alive
//! client whose *reused* connection is closed before any byte of the response sends the
//! idempotent GET once more on a new connection (RFC 9112 §9.3.1, what every HTTP client
//! does): counted in **retried**, and in failed only if the retry fails too. A
//! connection-per-request client never retries.
//!
//! Bounded in time: every client stops at `max_run` after the start even if nobody calls
//! [`Load::stop`]; dropping the `Load` stops and joins the clients.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Numbers of one kind of client in one phase.
#[derive(Debug, Default, Clone)]
pub struct Counts {
    pub requests: u64,
    pub failed: u64,
    pub retried: u64,
}

/// One phase's numbers.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    /// Connection-per-request clients.
    pub close: Counts,
    /// Keep-alive clients.
    pub keepalive: Counts,
    /// Successful answers per body (the answering task's name, trimmed).
    pub answers: BTreeMap<String, u64>,
    /// Failures per reason, `close: ...` or `keep-alive: ...`.
    pub errors: BTreeMap<String, u64>,
    /// The slowest successful request.
    pub max_latency: Duration,
}

impl Tally {
    /// Answers grouped by a key of the body (e.g. the version in `web.v2.5`).
    pub fn answers_by(&self, key: impl Fn(&str) -> String) -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        for (body, n) in &self.answers {
            *m.entry(key(body)).or_default() += n;
        }
        m
    }

    pub fn errors_line(&self) -> String {
        let v: Vec<String> = self
            .errors
            .iter()
            .map(|(e, n)| format!("{e} x{n}"))
            .collect();
        v.join(", ")
    }
}

/// Load options.
#[derive(Debug, Clone)]
pub struct LoadOpts {
    pub close_clients: usize,
    pub keepalive_clients: usize,
    /// A request with no complete answer after this long failed.
    pub request_timeout: Duration,
    /// The pause between two requests of one client (0: back to back).
    pub pace: Duration,
    /// Every client stops this long after the start, whatever happens.
    pub max_run: Duration,
}

struct Shared {
    target: SocketAddr,
    opts: LoadOpts,
    stop: AtomicBool,
    deadline: Instant,
    /// The index of the current phase.
    phase: AtomicUsize,
    /// Requests in flight per phase (grown on demand up to `MAX_PHASES`).
    in_flight: Vec<AtomicUsize>,
    stats: Vec<Mutex<Tally>>,
}

const MAX_PHASES: usize = 64;

/// A running load.
pub struct Load {
    shared: Arc<Shared>,
    clients: Vec<thread::JoinHandle<()>>,
}

impl Load {
    pub fn start(target: SocketAddr, opts: LoadOpts) -> Load {
        let shared = Arc::new(Shared {
            target,
            deadline: Instant::now() + opts.max_run,
            opts: opts.clone(),
            stop: AtomicBool::new(false),
            phase: AtomicUsize::new(0),
            in_flight: (0..MAX_PHASES).map(|_| AtomicUsize::new(0)).collect(),
            stats: (0..MAX_PHASES).map(|_| Mutex::default()).collect(),
        });
        let n = opts.close_clients + opts.keepalive_clients;
        // Each load gets its own 127.X.0.0/16 of source addresses, one per client (see
        // `SOURCE`): a new load's connects never meet the TIME_WAIT sockets that earlier
        // loads left on loopback (tens of thousands after the rude tests), whose 4-tuples
        // would otherwise be reused and answered by a TIME_WAIT socket (a connect delayed
        // by a SYN retransmission, 1 s, then 3 s...: a test artefact, not meshd's).
        static LOADS: AtomicUsize = AtomicUsize::new(0);
        let net =
            10 + (std::process::id() as usize * 7 + LOADS.fetch_add(1, Ordering::Relaxed)) % 200;
        let clients = (0..n)
            .map(|i| {
                let s = shared.clone();
                let source = [127, net as u8, (i / 250) as u8, (1 + i % 250) as u8];
                let keepalive = i >= opts.close_clients;
                // Spread the starts over a few ms so the clients do not move in lockstep.
                let delay = Duration::from_micros(500 * i as u64);
                thread::Builder::new()
                    .name(format!("load-{i}"))
                    .spawn(move || {
                        SOURCE.with(|c| c.set(Some(source)));
                        thread::sleep(delay);
                        client(&s, keepalive)
                    })
                    .expect("spawn a load client")
            })
            .collect();
        Load { shared, clients }
    }

    /// Ends the current phase: requests that start from now on count in the next one.
    /// Waits until every request of the ended phase finished (each is bounded by
    /// `request_timeout`), then returns its numbers.
    pub fn next_phase(&self) -> Tally {
        let s = &self.shared;
        let i = s.phase.load(Ordering::SeqCst);
        assert!(i + 1 < MAX_PHASES, "at most {MAX_PHASES} phases");
        s.phase.store(i + 1, Ordering::SeqCst);
        let end = Instant::now() + s.opts.request_timeout + Duration::from_secs(2);
        while s.in_flight[i].load(Ordering::SeqCst) > 0 && Instant::now() < end {
            thread::sleep(Duration::from_millis(5));
        }
        std::mem::take(&mut *s.stats[i].lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Stops the clients and returns the numbers of the phase that was running.
    pub fn stop(mut self) -> Tally {
        let t = self.next_phase();
        self.join();
        t
    }

    fn join(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for h in self.clients.drain(..) {
            let _ = h.join();
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.join();
    }
}

impl Shared {
    fn running(&self) -> bool {
        !self.stop.load(Ordering::Relaxed) && Instant::now() < self.deadline
    }

    fn enter(&self) -> usize {
        loop {
            let i = self.phase.load(Ordering::SeqCst).min(MAX_PHASES - 1);
            self.in_flight[i].fetch_add(1, Ordering::SeqCst);
            // If the phase changed meanwhile, `next_phase` may already have seen 0.
            if self.phase.load(Ordering::SeqCst).min(MAX_PHASES - 1) == i {
                return i;
            }
            self.in_flight[i].fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn record(&self, i: usize, keepalive: bool, r: &Result<(String, bool), String>, t: Duration) {
        let mut s = self.stats[i].lock().unwrap_or_else(|e| e.into_inner());
        let kind = if keepalive { "keep-alive" } else { "close" };
        let c = if keepalive {
            &mut s.keepalive
        } else {
            &mut s.close
        };
        c.requests += 1;
        match r {
            Ok((body, retried)) => {
                if *retried {
                    c.retried += 1;
                }
                *s.answers.entry(body.clone()).or_default() += 1;
                s.max_latency = s.max_latency.max(t);
            }
            Err(e) => {
                c.failed += 1;
                if e.starts_with("retried") {
                    c.retried += 1;
                }
                *s.errors.entry(format!("{kind}: {e}")).or_default() += 1;
            }
        }
        drop(s);
        self.in_flight[i].fetch_sub(1, Ordering::SeqCst);
    }
}

fn client(s: &Shared, keepalive: bool) {
    let mut conn: Option<TcpStream> = None;
    while s.running() {
        let i = s.enter();
        let t0 = Instant::now();
        let deadline = t0 + s.opts.request_timeout;
        let r = if keepalive {
            request_keepalive(s.target, &mut conn, deadline)
        } else {
            request(s.target, CLOSE_REQUEST, deadline).map(|(body, _)| (body, false))
        };
        s.record(i, keepalive, &r, t0.elapsed());
        if !s.opts.pace.is_zero() {
            thread::sleep(s.opts.pace);
        }
    }
}

const CLOSE_REQUEST: &[u8] =
    b"GET / HTTP/1.1\r\nHost: web\r\nUser-Agent: meshd-test\r\nConnection: close\r\n\r\n";
const KEEPALIVE_REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: web\r\nUser-Agent: meshd-test\r\n\r\n";

/// The request on the kept connection if there is one (once more on a new connection if
/// it was closed before any byte of the answer), else on a new connection.
fn request_keepalive(
    target: SocketAddr,
    conn: &mut Option<TcpStream>,
    deadline: Instant,
) -> Result<(String, bool), String> {
    let mut retried = false;
    if let Some(mut c) = conn.take() {
        match exchange(&mut c, KEEPALIVE_REQUEST, deadline) {
            Ok(a) => {
                if !a.close {
                    *conn = Some(c);
                }
                return Ok((a.body, false));
            }
            Err(e) if !e.started => retried = true,
            Err(e) => return Err(e.reason),
        }
    }
    let prefix = if retried { "retried, then " } else { "" };
    let mut c = connect(target, deadline).map_err(|e| format!("{prefix}{e}"))?;
    let a = exchange(&mut c, KEEPALIVE_REQUEST, deadline)
        .map_err(|e| format!("{prefix}{}", e.reason))?;
    if !a.close {
        *conn = Some(c);
    }
    Ok((a.body, retried))
}

fn request(target: SocketAddr, req: &[u8], deadline: Instant) -> Result<(String, bool), String> {
    let mut c = connect(target, deadline)?;
    let a = exchange(&mut c, req, deadline).map_err(|e| e.reason)?;
    Ok((a.body, a.close))
}

thread_local! {
    /// This client thread's source address on loopback (see `Load::start`).
    static SOURCE: std::cell::Cell<Option<[u8; 4]>> = const { std::cell::Cell::new(None) };
}

fn connect(target: SocketAddr, deadline: Instant) -> Result<TcpStream, String> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err("timeout".into());
    }
    let err = |e: std::io::Error| format!("connect: {:?}", e.kind());
    let source = SOURCE
        .with(|c| c.get())
        .filter(|_| target.ip().is_loopback() && target.is_ipv4());
    let c = match source {
        None => TcpStream::connect_timeout(&target, left).map_err(err)?,
        Some(ip) => {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                .map_err(err)?;
            s.bind(&SocketAddr::from((ip, 0)).into()).map_err(err)?;
            s.connect_timeout(&target.into(), left).map_err(err)?;
            s.into()
        }
    };
    let _ = c.set_nodelay(true);
    Ok(c)
}

struct Answer {
    body: String,
    close: bool,
}

struct ExchangeError {
    reason: String,
    /// Some byte of the answer had arrived.
    started: bool,
}

/// Sends `req`, reads one whole response (Content-Length or close-delimited).
fn exchange(c: &mut TcpStream, req: &[u8], deadline: Instant) -> Result<Answer, ExchangeError> {
    let fail = |reason: String, started: bool| ExchangeError { reason, started };
    let arm = |c: &TcpStream| -> Result<(), ExchangeError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(fail("timeout".into(), true));
        }
        let _ = c.set_read_timeout(Some(left));
        let _ = c.set_write_timeout(Some(left));
        Ok(())
    };
    arm(c)?;
    if let Err(e) = c.write_all(req) {
        return Err(fail(format!("write: {:?}", e.kind()), false));
    }
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 4096];
    let mut read = |c: &mut TcpStream, buf: &mut Vec<u8>| -> Result<usize, ExchangeError> {
        arm(c).map_err(|mut e| {
            e.started = !buf.is_empty();
            e
        })?;
        match c.read(&mut chunk) {
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                Ok(n)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Err(fail("timeout".into(), !buf.is_empty()))
            }
            Err(e) => Err(fail(format!("read: {:?}", e.kind()), !buf.is_empty())),
        }
    };
    let head_len = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 16 * 1024 {
            return Err(fail("response head too large".into(), true));
        }
        match read(c, &mut buf)? {
            0 if buf.is_empty() => return Err(fail("closed before the answer".into(), false)),
            0 => return Err(fail("closed in the response head".into(), true)),
            _ => {}
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_len]).to_string();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| fail(format!("bad status line {status_line:?}"), true))?;
    let mut close = status_line.starts_with("HTTP/1.0");
    let mut length = None;
    for l in lines.filter(|l| !l.is_empty()) {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        if k.eq_ignore_ascii_case("content-length") {
            length = v.parse::<usize>().ok();
        } else if k.eq_ignore_ascii_case("connection") {
            if v.eq_ignore_ascii_case("close") {
                close = true;
            } else if v.eq_ignore_ascii_case("keep-alive") {
                close = false;
            }
        }
    }
    match length {
        Some(n) => {
            while buf.len() < head_len + n {
                if read(c, &mut buf)? == 0 {
                    return Err(fail("closed in the body".into(), true));
                }
            }
        }
        None => {
            close = true;
            while read(c, &mut buf)? > 0 {}
        }
    }
    let end = length.map_or(buf.len(), |n| head_len + n);
    let body = String::from_utf8_lossy(&buf[head_len..end])
        .trim()
        .to_string();
    if status != 200 {
        return Err(fail(format!("status {status}"), true));
    }
    if body.is_empty() {
        return Err(fail("empty body".into(), true));
    }
    Ok(Answer { body, close })
}
