//! `meshd demo`'s load: the clients (half keep-alive, half one connection per request),
//! each phase's numbers, and the minimal HTTP/1.1 client they use.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::cluster::*;
use super::scenario::*;

// === load ===

/// One phase's traffic numbers.
#[derive(Debug, Default)]
pub(super) struct PhaseStats {
    pub(super) requests: u64,
    pub(super) failed: u64,
    pub(super) retried: u64,
    /// Latencies of the requests that succeeded.
    pub(super) latencies_us: Vec<u32>,
    /// Answers per version ("v1": n).
    pub(super) versions: BTreeMap<String, u64>,
    /// Failures per reason.
    pub(super) errors: BTreeMap<String, u64>,
}

/// The load's shared state: which phase new requests belong to, and each phase's numbers.
pub(super) struct Load {
    pub(super) target: SocketAddr,
    /// The index of the current phase (`PHASES.len()` after the last one).
    pub(super) phase: AtomicUsize,
    pub(super) stop: AtomicBool,
    /// Requests in flight per phase: a phase's row is computed once its count is 0.
    pub(super) in_flight: Vec<AtomicUsize>,
    pub(super) stats: Vec<Mutex<PhaseStats>>,
}

impl Load {
    pub(super) fn new(target: SocketAddr, phases: usize) -> Load {
        // One more slot for requests that start after the last phase ended.
        Load {
            target,
            phase: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            in_flight: (0..=phases).map(|_| AtomicUsize::new(0)).collect(),
            stats: (0..=phases).map(|_| Mutex::default()).collect(),
        }
    }

    /// Registers a request in the current phase and returns that phase.
    pub(super) fn enter(&self) -> usize {
        loop {
            let i = self.phase.load(Ordering::SeqCst);
            self.in_flight[i].fetch_add(1, Ordering::SeqCst);
            // If the phase changed meanwhile, `settle` may already have seen 0: count the
            // request in the new phase instead.
            if self.phase.load(Ordering::SeqCst) == i {
                return i;
            }
            self.in_flight[i].fetch_sub(1, Ordering::SeqCst);
        }
    }

    pub(super) fn record(&self, i: usize, result: Result<Answer, String>, latency: Duration) {
        let mut s = self.stats[i].lock().unwrap_or_else(|p| p.into_inner());
        s.requests += 1;
        match result {
            Ok(a) => {
                if a.retried {
                    s.retried += 1;
                }
                let us = u32::try_from(latency.as_micros()).unwrap_or(u32::MAX);
                s.latencies_us.push(us);
                *s.versions
                    .entry(version_of(&a.body).to_string())
                    .or_default() += 1;
            }
            Err(reason) => {
                s.failed += 1;
                if reason.starts_with("retried") {
                    s.retried += 1;
                }
                *s.errors.entry(reason).or_default() += 1;
            }
        }
        drop(s);
        self.in_flight[i].fetch_sub(1, Ordering::SeqCst);
    }

    pub(super) fn switch(&self, next: usize) {
        self.phase.store(next, Ordering::SeqCst);
    }

    /// Waits until every request of phase `i` has been recorded (each ends within
    /// `REQUEST_TIMEOUT`).
    pub(super) async fn settle(&self, i: usize) {
        let end = Instant::now() + REQUEST_TIMEOUT + Duration::from_secs(1);
        while self.in_flight[i].load(Ordering::SeqCst) > 0 && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub(super) fn take(&self, i: usize) -> PhaseStats {
        std::mem::take(&mut *self.stats[i].lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// One successful answer.
#[derive(Debug)]
pub(super) struct Answer {
    pub(super) body: String,
    /// The reused connection was closed first: the request was sent again.
    pub(super) retried: bool,
}

/// One client: `GET /` every `PACE` until the load stops.
pub(super) async fn client(load: Arc<Load>, keepalive: bool, start_after: Duration) {
    tokio::time::sleep(start_after).await;
    let mut conn: Option<TcpStream> = None;
    let mut buf = Vec::with_capacity(1024);
    while !load.stop.load(Ordering::Relaxed) {
        let i = load.enter();
        let t0 = Instant::now();
        let attempt = async {
            if keepalive {
                request_keepalive(load.target, &mut conn, &mut buf).await
            } else {
                request_close(load.target, &mut buf).await
            }
        };
        let result = match tokio::time::timeout(REQUEST_TIMEOUT, attempt).await {
            Ok(r) => r,
            Err(_) => {
                conn = None;
                Err("timeout".to_string())
            }
        };
        load.record(i, result, t0.elapsed());
        tokio::time::sleep(PACE).await;
    }
}

/// One request on a new connection with `Connection: close`; never retried.
pub(super) async fn request_close(target: SocketAddr, buf: &mut Vec<u8>) -> Result<Answer, String> {
    let mut s = connect(target).await?;
    let r = exchange(&mut s, CLOSE_REQUEST, buf)
        .await
        .map_err(|e| e.reason)?;
    ok_answer(r, false)
}

/// One request on the client's kept-alive connection (opened if there is none). If the
/// reused connection was closed before any byte of the answer, the request is sent once
/// more on a new connection.
pub(super) async fn request_keepalive(
    target: SocketAddr,
    conn: &mut Option<TcpStream>,
    buf: &mut Vec<u8>,
) -> Result<Answer, String> {
    let mut retried = false;
    if let Some(s) = conn.as_mut() {
        match exchange(s, KEEPALIVE_REQUEST, buf).await {
            Ok(r) => {
                if r.close {
                    *conn = None;
                }
                return ok_answer(r, false);
            }
            Err(e) if !e.answer_started => {
                *conn = None;
                retried = true;
            }
            Err(e) => {
                *conn = None;
                return Err(e.reason);
            }
        }
    }
    let prefix = if retried { "retried, then " } else { "" };
    let mut s = connect(target).await.map_err(|e| format!("{prefix}{e}"))?;
    let r = exchange(&mut s, KEEPALIVE_REQUEST, buf)
        .await
        .map_err(|e| format!("{prefix}{}", e.reason))?;
    if !r.close {
        *conn = Some(s);
    }
    ok_answer(r, retried).map_err(|e| format!("{prefix}{e}"))
}

pub(super) fn ok_answer(r: Response, retried: bool) -> Result<Answer, String> {
    if r.status != 200 {
        return Err(format!("status {}", r.status));
    }
    Ok(Answer {
        body: String::from_utf8_lossy(&r.body).trim().to_string(),
        retried,
    })
}

pub(super) async fn connect(target: SocketAddr) -> Result<TcpStream, String> {
    let s = TcpStream::connect(target)
        .await
        .map_err(|e| format!("connect: {:?}", e.kind()))?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// The version in a task name: `web.v2.7` -> `v2`.
pub(super) fn version_of(name: &str) -> &str {
    name.split('.').nth(1).unwrap_or("?")
}

// === a minimal HTTP/1.1 client ===

pub(super) const KEEPALIVE_REQUEST: &[u8] =
    b"GET / HTTP/1.1\r\nHost: web\r\nUser-Agent: meshd-demo\r\n\r\n";
pub(super) const CLOSE_REQUEST: &[u8] =
    b"GET / HTTP/1.1\r\nHost: web\r\nUser-Agent: meshd-demo\r\nConnection: close\r\n\r\n";
/// The largest response head and body accepted.
pub(super) const MAX_HEAD: usize = 16 * 1024;
pub(super) const MAX_BODY: usize = 1024 * 1024;

#[derive(Debug)]
pub(super) struct Response {
    pub(super) status: u16,
    pub(super) body: Vec<u8>,
    /// The connection cannot carry another request.
    pub(super) close: bool,
}

#[derive(Debug)]
pub(super) struct ExchangeError {
    pub(super) reason: String,
    /// Some byte of the answer had arrived (a retry would not be safe to hide).
    pub(super) answer_started: bool,
}

/// The parsed status line and the headers that matter here.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Head {
    pub(super) status: u16,
    pub(super) content_length: Option<usize>,
    pub(super) close: bool,
}

/// Sends `request` and reads one whole response (Content-Length or close-delimited body).
pub(super) async fn exchange(
    s: &mut TcpStream,
    request: &[u8],
    buf: &mut Vec<u8>,
) -> Result<Response, ExchangeError> {
    let fail = |reason: String, started: bool| ExchangeError {
        reason,
        answer_started: started,
    };
    buf.clear();
    if let Err(e) = s.write_all(request).await {
        return Err(fail(format!("write: {:?}", e.kind()), false));
    }
    let head_len = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_HEAD {
            return Err(fail("response head too large".into(), true));
        }
        match s.read_buf(buf).await {
            Ok(0) if buf.is_empty() => return Err(fail("closed before the answer".into(), false)),
            Ok(0) => return Err(fail("closed in the response head".into(), true)),
            Ok(_) => {}
            Err(e) => {
                let started = !buf.is_empty();
                return Err(fail(format!("read: {:?}", e.kind()), started));
            }
        }
    };
    let head = parse_head(&buf[..head_len]).map_err(|e| fail(e.into(), true))?;
    let mut close = head.close;
    let body_len = match head.content_length {
        Some(n) if n > MAX_BODY => return Err(fail("response body too large".into(), true)),
        Some(n) => {
            while buf.len() < head_len + n {
                match s.read_buf(buf).await {
                    Ok(0) => return Err(fail("closed in the body".into(), true)),
                    Ok(_) => {}
                    Err(e) => return Err(fail(format!("read body: {:?}", e.kind()), true)),
                }
            }
            // Bytes nobody asked for: the connection is out of step.
            close |= buf.len() > head_len + n;
            n
        }
        None => {
            close = true;
            loop {
                if buf.len() > head_len + MAX_BODY {
                    return Err(fail("response body too large".into(), true));
                }
                match s.read_buf(buf).await {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) => return Err(fail(format!("read body: {:?}", e.kind()), true)),
                }
            }
            buf.len() - head_len
        }
    };
    Ok(Response {
        status: head.status,
        body: buf[head_len..head_len + body_len].to_vec(),
        close,
    })
}

pub(super) fn parse_head(head: &[u8]) -> Result<Head, &'static str> {
    let text = std::str::from_utf8(head).map_err(|_| "response head is not UTF-8")?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err("not an HTTP/1.x response");
    }
    let status = parts
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or("bad status line")?;
    let mut h = Head {
        status,
        content_length: None,
        close: version == "HTTP/1.0",
    };
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':').ok_or("bad header line")?;
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("content-length") {
            h.content_length = Some(value.parse().map_err(|_| "bad content-length")?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err("transfer-encoding is not supported");
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    h.close = true;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    h.close = false;
                }
            }
        }
    }
    Ok(h)
}

/// `GET path` on the admin API; the status and body.
pub(super) async fn admin_get(admin: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
    let call = async {
        let mut s = connect(admin).await.map_err(|e| anyhow!(e))?;
        let mut buf = Vec::new();
        let r = exchange(&mut s, request.as_bytes(), &mut buf)
            .await
            .map_err(|e| anyhow!(e.reason))?;
        Ok::<_, anyhow::Error>((r.status, String::from_utf8_lossy(&r.body).into_owned()))
    };
    tokio::time::timeout(ADMIN_TIMEOUT, call)
        .await
        .map_err(|_| anyhow!("no answer within {}", fmt_dur(ADMIN_TIMEOUT)))?
        .with_context(|| format!("admin API GET {path} on {admin}"))
}
