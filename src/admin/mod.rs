//! The admin HTTP server (hyper): `/metrics`, `/healthz`, `/readyz`, `/api/v1/...`, and the
//! status page at `/`.
//!
//! It only reads (the status snapshot, wait-free) and writes operator requests to the
//! control plane through one channel. Safe by default: it binds loopback unless configured
//! otherwise (validation refuses a non-loopback address without a token), mutations are
//! POST/PUT only and need the bearer token when `token_file` is set (compared in constant
//! time), request bodies are capped at 4 KiB.
//!
//! It cannot be starved by connections that hold a slot and send nothing, or send slowly
//! (slowloris): a connection must send its first byte within 1 s of being accepted, a
//! request head (and body) must be complete within 5 s, a keep-alive connection idle for
//! 5 s is closed; one source address (an IPv6 /64) holds at most 16 connections at once,
//! every source together at most 64, and 32 more are kept for loopback sources, so
//! `/readyz` and a same-host Prometheus are answered while remote sources fill the rest.
//! A connection over a limit is reset at once (no handshake state is kept for it).

pub mod api;
pub mod client;
mod page;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

use crate::close::CloseSignal;
use crate::control::{AdminError, AdminOp, Command, StatusHandle};
use crate::discovery::feed::{self, FeedBody, FeedRx};

const MAX_BODY: usize = 4096;
/// Admin connections at once, from every source together.
const MAX_CONNS: usize = 64;
/// More connections that only loopback sources may take once `MAX_CONNS` are in use.
const LOOPBACK_RESERVE: usize = 32;
/// Connections at once from one source address (IPv6: one /64).
const MAX_CONNS_PER_SOURCE: usize = 16;
/// A connection that has sent nothing this long after it was accepted is closed.
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(1);
/// A request head, and a request body, must arrive within this; a keep-alive connection
/// idle this long is closed.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// At most one log line per this long about refused connections.
const REFUSED_LOG_EVERY: Duration = Duration::from_secs(10);

/// What every admin request can see.
pub struct AdminState {
    /// This process (`GET /api/v1/process`) and how to start its successor
    /// (`POST /api/v1/upgrade`).
    pub upgrades: Arc<crate::upgrade::Upgrades>,
    pub status: StatusHandle,
    pub commands: mpsc::Sender<Command>,
    /// The bearer token for mutations (`None`: open, which validation allows on loopback
    /// only). Replaced by reloads.
    pub token: ArcSwapOption<String>,
    /// Set once every listener is bound and the first table is published.
    pub ready: AtomicBool,
    /// Requests being answered now: a process that handed over waits for them (the
    /// `POST /api/v1/upgrade` that started the hand-off among them) before it exits.
    pub in_flight: std::sync::atomic::AtomicUsize,
    /// This process accepts admin connections (false once `serve` has closed its listener:
    /// after a hand-off, the successor alone answers the admin address).
    pub accepting: AtomicBool,
    pub metrics: Option<&'static metrics_exporter_prometheus::PrometheusHandle>,
    /// The Docker provider's desired state, served to followers (`None`: no
    /// `[discovery.docker]`).
    pub feed: Option<FeedRx>,
}

/// Who holds admin connections: the limits of the module comment.
struct Limits {
    shared: usize,
    reserve: usize,
    per_source: usize,
    held: Mutex<Held>,
}

#[derive(Default)]
struct Held {
    shared: usize,
    reserve: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// One admitted connection's place; given back when dropped.
struct Slot {
    limits: Arc<Limits>,
    source: IpAddr,
    reserve: bool,
}

impl Limits {
    fn new(shared: usize, reserve: usize, per_source: usize) -> Arc<Limits> {
        Arc::new(Limits {
            shared,
            reserve,
            per_source,
            held: Mutex::new(Held::default()),
        })
    }

    /// A place for a connection from `peer`, or `None` when a limit is reached.
    fn admit(self: &Arc<Self>, peer: IpAddr) -> Option<Slot> {
        let source = source_key(peer);
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if held.by_source.get(&source).copied().unwrap_or(0) >= self.per_source {
            return None;
        }
        let reserve = if held.shared < self.shared {
            held.shared += 1;
            false
        } else if source.is_loopback() && held.reserve < self.reserve {
            held.reserve += 1;
            true
        } else {
            return None;
        };
        *held.by_source.entry(source).or_insert(0) += 1;
        Some(Slot {
            limits: self.clone(),
            source,
            reserve,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.limits.held.lock().unwrap_or_else(|e| e.into_inner());
        if self.reserve {
            held.reserve -= 1;
        } else {
            held.shared -= 1;
        }
        if let Some(n) = held.by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                held.by_source.remove(&self.source);
            }
        }
    }
}

/// The address a per-source limit counts: IPv4 (also when IPv4-mapped), or an IPv6 /64
/// (one host commonly holds a whole /64).
fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let mut o = v6.octets();
            if !v6.is_loopback() {
                o[8..].fill(0);
            }
            IpAddr::from(o)
        }
        v4 => v4,
    }
}

/// Closes with an RST: a refused or silent connection leaves no state behind.
fn reset(sock: TcpStream) {
    let _ = socket2::SockRef::from(&sock).set_linger(Some(Duration::ZERO));
    drop(sock);
}

/// Serves the admin API on `listener` until `stop` closes.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, stop: Arc<CloseSignal>) {
    let limits = Limits::new(MAX_CONNS, LOOPBACK_RESERVE, MAX_CONNS_PER_SOURCE);
    let mut refused = 0u64;
    let mut refused_logged: Option<Instant> = None;
    let stopped = stop.wait();
    tokio::pin!(stopped);
    loop {
        let (sock, peer) = tokio::select! {
            _ = &mut stopped => {
                drop(listener);
                state.accepting.store(false, Ordering::Release);
                return;
            }
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(_) => {
                    // Out of descriptors: back off like the data plane does.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(slot) = limits.admit(peer.ip()) else {
            reset(sock);
            refused += 1;
            if refused_logged.is_none_or(|t| t.elapsed() >= REFUSED_LOG_EVERY) {
                tracing::warn!(
                    refused,
                    last_source = %peer.ip(),
                    "admin connections refused: a limit is reached (16 per source address, 64 in all, 32 more for loopback)"
                );
                refused_logged = Some(Instant::now());
                refused = 0;
            }
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            // Nothing sent within FIRST_BYTE_TIMEOUT: a client that would send a request
            // has done so; an idle connection only holds a place.
            let mut one = [0u8; 1];
            match tokio::time::timeout(FIRST_BYTE_TIMEOUT, sock.peek(&mut one)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => {
                    reset(sock);
                    drop(slot);
                    return;
                }
            }
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move {
                    state.in_flight.fetch_add(1, Ordering::AcqRel);
                    let r = handle(&state, req).await;
                    state.in_flight.fetch_sub(1, Ordering::AcqRel);
                    Ok::<_, std::convert::Infallible>(r)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(sock), svc)
                .await;
            drop(slot);
        });
    }
}

type Resp = Response<Either<Full<Bytes>, FeedBody>>;

fn respond(code: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Resp {
    let mut r = Response::new(Either::Left(Full::new(body.into())));
    *r.status_mut() = code;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn json(code: StatusCode, body: String) -> Resp {
    respond(code, "application/json", body)
}

fn error(code: StatusCode, msg: &str) -> Resp {
    json(code, api::error_body(msg))
}

fn method_not_allowed(allow: &'static str) -> Resp {
    let mut r = error(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!("method not allowed; use {allow}"),
    );
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    r
}

async fn handle(state: &AdminState, req: Request<Incoming>) -> Resp {
    let path = req.uri().path().to_string();
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let m = req.method().clone();
    match segs.as_slice() {
        [""] => match m {
            Method::GET | Method::HEAD => respond(
                StatusCode::OK,
                "text/html; charset=utf-8",
                page::PAGE.as_bytes(),
            ),
            _ => method_not_allowed("GET"),
        },
        ["healthz"] => match m {
            Method::GET | Method::HEAD => respond(StatusCode::OK, "text/plain", "ok\n"),
            _ => method_not_allowed("GET"),
        },
        ["readyz"] => match m {
            Method::GET | Method::HEAD => {
                if state.ready.load(Ordering::Acquire) {
                    respond(StatusCode::OK, "text/plain", "ready\n")
                } else {
                    respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n")
                }
            }
            _ => method_not_allowed("GET"),
        },
        ["metrics"] => match m {
            Method::GET | Method::HEAD => metrics(state),
            _ => method_not_allowed("GET"),
        },
        ["api", "v1", "services"] => match m {
            Method::GET | Method::HEAD => {
                let st = state.status.load();
                let mut dto = api::services(&st);
                dto.docker = state.feed.as_ref().map(|rx| api::docker(&rx.borrow()));
                match serde_json::to_string(&dto) {
                    Ok(s) => json(StatusCode::OK, s),
                    Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
                }
            }
            _ => method_not_allowed("GET"),
        },
        ["api", "v1", "process"] => match m {
            Method::GET | Method::HEAD => {
                let info = &state.upgrades.info;
                let body = serde_json::json!({
                    "pid": info.pid,
                    "version": env!("CARGO_PKG_VERSION"),
                    "started_at": info.started_at
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0),
                    "inherited_listeners": crate::upgrade::sockets::INHERITED_TAKEN
                        .load(Ordering::Relaxed),
                    "upgrading": info.upgrading.load(Ordering::Relaxed),
                });
                json(StatusCode::OK, body.to_string())
            }
            _ => method_not_allowed("GET"),
        },
        ["api", "v1", "upgrade"] => match m {
            Method::POST => {
                if let Some(r) = check_token(state, &req) {
                    return r;
                }
                let body = match read_body::<UpgradeBody>(req).await {
                    Ok(b) => b,
                    Err(r) => return r,
                };
                let timeout = match body.timeout.as_deref().map(crate::config::parse_duration) {
                    None => None,
                    Some(Ok(d)) if !d.is_zero() => Some(d),
                    Some(_) => {
                        return error(
                            StatusCode::BAD_REQUEST,
                            "timeout must be a positive duration, e.g. \"60s\"",
                        )
                    }
                };
                let out = state
                    .upgrades
                    .upgrade(body.binary.map(std::path::PathBuf::from), timeout)
                    .await;
                match out.result {
                    Ok(pid) => {
                        // Answered once this process no longer accepts on the admin
                        // address: the caller's next request reaches the new process.
                        let end = Instant::now() + Duration::from_secs(2);
                        while state.accepting.load(Ordering::Acquire) && Instant::now() < end {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        json(
                        StatusCode::OK,
                        serde_json::json!({"result": "ok", "pid": pid, "old_pid": std::process::id()})
                            .to_string(),
                    )
                    }
                    Err(e) => {
                        let code = if out.label == "failed" && e.contains("already in progress") {
                            StatusCode::CONFLICT
                        } else {
                            StatusCode::INTERNAL_SERVER_ERROR
                        };
                        json(
                            code,
                            serde_json::json!({"result": out.label, "error": e}).to_string(),
                        )
                    }
                }
            }
            _ => method_not_allowed("POST"),
        },
        ["api", "v1", "discovery", "docker"] => match m {
            Method::GET => discovery_feed(state, &req),
            _ => method_not_allowed("GET"),
        },
        ["api", "v1", "services", service, "backends", addr, action] => {
            let (allow, want) = match *action {
                "drain" | "enable" => ("POST", Method::POST),
                "weight" => ("PUT", Method::PUT),
                _ => {
                    return error(
                        StatusCode::NOT_FOUND,
                        &format!("no such action {action:?}: use drain, enable or weight"),
                    )
                }
            };
            if m != want {
                return method_not_allowed(allow);
            }
            if let Some(r) = check_token(state, &req) {
                return r;
            }
            let service = percent_decode(service);
            let addr_text = percent_decode(addr);
            let Ok(addr) = addr_text.parse::<SocketAddr>() else {
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!("backend {addr_text:?} is not an IP:PORT address (IPv6 as [::1]:80, percent-encoded)"),
                );
            };
            let op = match *action {
                "drain" => AdminOp::Drain,
                "enable" => AdminOp::Enable,
                _ => match read_weight(req).await {
                    Ok(w) => AdminOp::Weight(w),
                    Err(r) => return r,
                },
            };
            mutate(state, service, addr, op).await
        }
        _ => error(
            StatusCode::NOT_FOUND,
            &format!("no route {path:?}: see GET /api/v1/services"),
        ),
    }
}

/// `Some(401)` unless the request carries the configured bearer token.
fn check_token(state: &AdminState, req: &Request<Incoming>) -> Option<Resp> {
    let want = state.token.load_full()?;
    let got = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    use subtle::ConstantTimeEq;
    if bool::from(got.as_bytes().ct_eq(want.as_bytes())) {
        return None;
    }
    let mut r = error(
        StatusCode::UNAUTHORIZED,
        "missing or wrong token: send Authorization: Bearer <token from token_file>",
    );
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    Some(r)
}

/// `GET /api/v1/discovery/docker`: the desired-state stream for meshd on other nodes
/// (JSON lines, see `discovery::feed`). Read-only, but it describes the cluster, so it
/// always needs the token: without `[admin] token_file` it is refused.
fn discovery_feed(state: &AdminState, req: &Request<Incoming>) -> Resp {
    if state.token.load().is_none() {
        return error(
            StatusCode::FORBIDDEN,
            "this meshd serves its discovery state only with a token: set [admin] token_file",
        );
    }
    if let Some(r) = check_token(state, req) {
        return r;
    }
    let Some(rx) = &state.feed else {
        return error(
            StatusCode::NOT_FOUND,
            "no [discovery.docker] on this node: it has no Swarm state to serve",
        );
    };
    // A provider that has ended (its sender dropped) serves nothing, not its last state.
    if rx.has_changed().is_err() || !rx.borrow().serving {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "this node does not read a Swarm manager's engine (not yet, or it follows a manager itself): ask another manager",
        );
    }
    let mut r = Response::new(Either::Right(feed::subscribe(rx.clone())));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WeightBody {
    weight: u32,
}

/// `POST /api/v1/upgrade`'s body (empty, or JSON with either key).
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct UpgradeBody {
    binary: Option<String>,
    timeout: Option<String>,
}

/// A request body of at most `MAX_BODY` bytes, within `HEADER_TIMEOUT`; else a 400 whose
/// message ends with `hint`.
async fn collect_body(req: Request<Incoming>, hint: &str) -> Result<Bytes, Resp> {
    let body = Limited::new(req.into_body(), MAX_BODY).collect();
    match tokio::time::timeout(HEADER_TIMEOUT, body).await {
        Ok(Ok(b)) => Ok(b.to_bytes()),
        Ok(Err(_)) | Err(_) => Err(error(
            StatusCode::BAD_REQUEST,
            &format!("body too large or unreadable{hint}"),
        )),
    }
}

/// A small JSON body (an empty one is `T::default()`).
async fn read_body<T: serde::de::DeserializeOwned + Default>(
    req: Request<Incoming>,
) -> Result<T, Resp> {
    let body = collect_body(req, "").await?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(&body)
        .map_err(|e| error(StatusCode::BAD_REQUEST, &format!("bad body: {e}")))
}

async fn read_weight(req: Request<Incoming>) -> Result<u32, Resp> {
    let body = collect_body(req, ": send {\"weight\": N}").await?;
    match serde_json::from_slice::<WeightBody>(&body) {
        Ok(w) if w.weight <= crate::config::defaults::MAX_WEIGHT => Ok(w.weight),
        Ok(w) => Err(error(
            StatusCode::BAD_REQUEST,
            &format!(
                "weight {} is out of range: use 0..=1000 (0 = no new connections)",
                w.weight
            ),
        )),
        Err(e) => Err(error(
            StatusCode::BAD_REQUEST,
            &format!("bad body: {e}; send {{\"weight\": N}} with N in 0..=1000"),
        )),
    }
}

async fn mutate(state: &AdminState, service: String, addr: SocketAddr, op: AdminOp) -> Resp {
    let (reply, rx) = oneshot::channel();
    let cmd = Command::Admin {
        service,
        addr,
        op,
        reply,
    };
    if state.commands.send(cmd).await.is_err() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    }
    match rx.await {
        Ok(Ok(())) => json(StatusCode::OK, r#"{"ok":true}"#.to_string()),
        Ok(Err(e @ (AdminError::NoService(_) | AdminError::NoBackend(..)))) => {
            error(StatusCode::NOT_FOUND, &e.to_string())
        }
        Ok(Err(e @ AdminError::Removed(_))) => error(StatusCode::CONFLICT, &e.to_string()),
        Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "shutting down"),
    }
}

fn metrics(state: &AdminState) -> Resp {
    let Some(handle) = state.metrics else {
        return error(StatusCode::NOT_FOUND, "metrics are disabled");
    };
    let st = state.status.load();
    for s in st.services.iter().flatten() {
        s.metrics.sync(&s.state);
        for b in &s.backends {
            b.metrics.sync(&b.backend);
        }
    }
    crate::metrics::export::sync_sni(&st.sni);
    crate::metrics::sync_process(
        st.generation,
        st.reloads_ok,
        st.reloads_err,
        &st.discovery_errors,
    );
    respond(
        StatusCode::OK,
        "text/plain; version=0.0.4; charset=utf-8",
        handle.render(),
    )
}

/// Decodes `%XX` escapes (for IPv6 backends like `%5B::1%5D:80`); invalid escapes stay as
/// they are.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::{percent_decode, source_key, Limits};
    use std::net::IpAddr;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn limits_per_source_in_all_and_a_loopback_reserve() {
        let l = Limits::new(4, 2, 2);
        let a1 = l.admit(ip("10.0.0.1")).expect("first");
        let _a2 = l.admit(ip("10.0.0.1")).expect("second");
        assert!(l.admit(ip("10.0.0.1")).is_none(), "per-source limit");
        let _b1 = l.admit(ip("10.0.0.2")).expect("another source");
        let _b2 = l.admit(ip("10.0.0.2")).expect("another source");
        assert!(l.admit(ip("10.0.0.3")).is_none(), "all shared places taken");
        let lo1 = l.admit(ip("127.0.0.1")).expect("loopback reserve");
        let _lo2 = l.admit(ip("::1")).expect("loopback reserve");
        assert!(l.admit(ip("127.0.0.9")).is_none(), "reserve full");
        drop(lo1);
        assert!(
            l.admit(ip("10.0.0.3")).is_none(),
            "the reserve is loopback only"
        );
        let _lo3 = l.admit(ip("127.0.0.1")).expect("reserve place given back");
        drop(a1);
        let _c = l.admit(ip("10.0.0.3")).expect("shared place given back");
        let held = l.held.lock().unwrap_or_else(|e| e.into_inner());
        assert_eq!((held.shared, held.reserve), (4, 2));
    }

    #[test]
    fn one_ipv6_64_is_one_source_and_mapped_ipv4_is_ipv4() {
        assert_eq!(
            source_key(ip("2001:db8:1:2:aaaa::1")),
            source_key(ip("2001:db8:1:2:bbbb::2"))
        );
        assert_ne!(
            source_key(ip("2001:db8:1:2::1")),
            source_key(ip("2001:db8:1:3::1"))
        );
        assert_eq!(source_key(ip("::ffff:10.1.2.3")), ip("10.1.2.3"));
        assert!(source_key(ip("::1")).is_loopback());
    }

    #[test]
    fn decodes_ipv6_paths_and_survives_garbage() {
        assert_eq!(percent_decode("%5B::1%5D:80"), "[::1]:80");
        assert_eq!(percent_decode("127.0.0.1:80"), "127.0.0.1:80");
        assert_eq!(percent_decode("%"), "%");
        assert_eq!(percent_decode("%4"), "%4");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("a%20b"), "a b");
    }
}
