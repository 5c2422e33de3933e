//! Following meshd on a manager: on a node whose engine cannot answer for the swarm (a
//! worker), the Docker provider subscribes to the desired-state feed of meshd on one of
//! `[discovery.docker] managers` (`GET /api/v1/discovery/docker`, bearer token) and applies
//! each state it sends. See [`crate::discovery::feed`] for the wire.
//!
//! A manager is left for the next one when: it cannot be resolved or reached (2 s), it
//! answers anything but 200, it sends nothing for [`SILENCE`] (heartbeats come every
//! second), it sends a line that does not parse, or its own engine has failed for
//! [`ENGINE_STALE`] (when another manager is listed). Meanwhile the last good table
//! stays: a lost manager changes nothing but logs and `meshd_discovery_errors_total`.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;

use crate::config::ServiceConfig;
use crate::discovery::feed::{self, Message, WireError};

/// Path of the feed on a manager's admin port.
pub const FEED_PATH: &str = "/api/v1/discovery/docker";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// No line (state or heartbeat) for this long: the manager is gone.
pub const SILENCE: Duration = Duration::from_secs(3);
/// A manager whose engine has failed this long is left for another one.
pub const ENGINE_STALE: Duration = Duration::from_secs(5);
/// The longest line accepted (a state line holds every service and backend).
const MAX_LINE: usize = 64 << 20;

/// Why a manager was left (its `Display` is the one log line).
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    #[error("cannot resolve within {} s", CONNECT_TIMEOUT.as_secs())]
    ResolveTimeout,
    #[error("cannot resolve: {0}")]
    Resolve(#[source] std::io::Error),
    #[error("resolves to no address")]
    NoAddress,
    /// Each address the name resolved to failed: the address and why, in order.
    #[error("{}", every_address(.0))]
    EveryAddress(Vec<(std::net::SocketAddr, FollowError)>),
    #[error("no answer within {} s", CONNECT_TIMEOUT.as_secs())]
    NoAnswer,
    #[error("cannot connect: {0}")]
    Connect(#[source] std::io::Error),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("HTTP: {0}")]
    Request(#[from] hyper::http::Error),
    #[error(
        "rejected our token (401): [discovery.docker] token_file must hold the managers' \
         [admin] token ({0})"
    )]
    Unauthorized(String),
    #[error("answered {status}: {message}")]
    Status { status: StatusCode, message: String },
    #[error("sent a line meshd cannot read: {0}")]
    BadLine(#[source] serde_json::Error),
    #[error("sent a line longer than {} MiB", MAX_LINE >> 20)]
    LineTooLong,
    #[error("sent nothing for {} s (heartbeats are due every second)", SILENCE.as_secs())]
    Silent,
    #[error("closed the feed")]
    Closed,
    #[error("the feed broke off ({0})")]
    BrokeOff(#[source] hyper::Error),
    #[error("its engine has failed for {} s ({why})", ENGINE_STALE.as_secs())]
    EngineStale { why: String },
    #[error("sent an unusable state: {0}")]
    Unusable(#[from] WireError),
}

/// One address's error alone; several as `ADDR: why; ADDR: why`.
fn every_address(errors: &[(std::net::SocketAddr, FollowError)]) -> String {
    match errors {
        [(_, e)] => e.to_string(),
        _ => errors
            .iter()
            .map(|(ip, e)| format!("{ip}: {e}"))
            .collect::<Vec<_>>()
            .join("; "),
    }
}

/// An open feed of one manager.
pub struct Session {
    body: hyper::body::Incoming,
    buf: Vec<u8>,
    engine_failing_since: Option<Instant>,
    /// Whether leaving this manager because its engine fails could help.
    has_alternatives: bool,
}

/// A state read from a manager: the services (checked) and those left out, with why.
pub struct State {
    pub services: Vec<ServiceConfig>,
    pub warnings: Vec<String>,
}

impl Session {
    /// Resolves `addr` (`HOST:PORT`), connects and asks for the feed.
    pub async fn open(
        addr: &str,
        token: &str,
        has_alternatives: bool,
    ) -> Result<Session, FollowError> {
        Ok(Session {
            body: open(addr, token).await?,
            buf: Vec::new(),
            engine_failing_since: None,
            has_alternatives,
        })
    }

    /// The next fresh state; `Err` when the manager failed. Cancel-safe: a line half read
    /// stays buffered for the next call.
    pub async fn next_state(&mut self) -> Result<State, FollowError> {
        loop {
            while let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let msg = serde_json::from_slice::<Message>(&self.buf[..i]);
                self.buf.drain(..=i);
                let msg = msg.map_err(FollowError::BadLine)?;
                if let Some(state) = self.take(msg)? {
                    return Ok(state);
                }
            }
            if self.buf.len() > MAX_LINE {
                return Err(FollowError::LineTooLong);
            }
            let data: Bytes = match tokio::time::timeout(SILENCE, self.body.frame()).await {
                Err(_) => return Err(FollowError::Silent),
                Ok(None) => return Err(FollowError::Closed),
                Ok(Some(Err(e))) => return Err(FollowError::BrokeOff(e)),
                Ok(Some(Ok(f))) => match f.into_data() {
                    Ok(d) => d,
                    Err(_) => continue,
                },
            };
            self.buf.extend_from_slice(&data);
        }
    }

    fn take(&mut self, msg: Message) -> Result<Option<State>, FollowError> {
        let engine_ok = match &msg {
            Message::State { engine_ok, .. } | Message::Heartbeat { engine_ok, .. } => *engine_ok,
        };
        if engine_ok {
            self.engine_failing_since = None;
        } else {
            let since = *self.engine_failing_since.get_or_insert_with(Instant::now);
            if self.has_alternatives && since.elapsed() >= ENGINE_STALE {
                let why = match &msg {
                    Message::Heartbeat { error: Some(e), .. } => e.clone(),
                    _ => "no reason given".into(),
                };
                return Err(FollowError::EngineStale { why });
            }
        }
        // A state sent while the manager's engine fails is its last good one: it may be
        // older than what this node has, so only a fresh state is applied.
        match msg {
            Message::State {
                services,
                engine_ok: true,
                ..
            } => {
                let (services, warnings) = feed::services_from_wire(services)?;
                Ok(Some(State { services, warnings }))
            }
            _ => Ok(None),
        }
    }
}

/// Resolves `addr`, then asks each of its addresses in turn for the feed: the first that
/// answers 200 wins. A name may stand for every manager (`tasks.mesh_meshd:9901` resolves
/// to every meshd task; the ones on workers answer 503 and are skipped).
async fn open(addr: &str, token: &str) -> Result<hyper::body::Incoming, FollowError> {
    let ips: Vec<std::net::SocketAddr> =
        tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::lookup_host(addr))
            .await
            .map_err(|_| FollowError::ResolveTimeout)?
            .map_err(FollowError::Resolve)?
            .collect();
    let mut errors = Vec::new();
    for ip in ips.iter().take(64) {
        match tokio::time::timeout(CONNECT_TIMEOUT, open_one(*ip, addr, token)).await {
            Ok(Ok(body)) => return Ok(body),
            Ok(Err(e)) => errors.push((*ip, e)),
            Err(_) => errors.push((*ip, FollowError::NoAnswer)),
        }
    }
    if errors.is_empty() {
        return Err(FollowError::NoAddress);
    }
    Err(FollowError::EveryAddress(errors))
}

async fn open_one(
    ip: std::net::SocketAddr,
    host: &str,
    token: &str,
) -> Result<hyper::body::Incoming, FollowError> {
    let stream = tokio::net::TcpStream::connect(ip)
        .await
        .map_err(FollowError::Connect)?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = Request::get(FEED_PATH)
        .header(hyper::header::HOST, host)
        .header(hyper::header::AUTHORIZATION, format!("Bearer {token}"))
        .header(
            hyper::header::USER_AGENT,
            concat!("meshd/", env!("CARGO_PKG_VERSION")),
        )
        .body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    if status == StatusCode::OK {
        return Ok(resp.into_body());
    }
    let body = http_body_util::Limited::new(resp.into_body(), 4096)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let message = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(&body).trim().to_owned());
    Err(match status {
        StatusCode::UNAUTHORIZED => FollowError::Unauthorized(message),
        _ => FollowError::Status { status, message },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manager_failure_is_one_line_naming_each_address_only_when_there_are_several() {
        let a: std::net::SocketAddr = "10.0.0.1:9901".parse().expect("addr");
        let b: std::net::SocketAddr = "10.0.0.2:9901".parse().expect("addr");
        let one = FollowError::EveryAddress(vec![(a, FollowError::NoAnswer)]);
        assert_eq!(one.to_string(), "no answer within 2 s");
        let two = FollowError::EveryAddress(vec![
            (a, FollowError::NoAnswer),
            (
                b,
                FollowError::Status {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    message: "not a manager".into(),
                },
            ),
        ]);
        assert_eq!(
            two.to_string(),
            "10.0.0.1:9901: no answer within 2 s; 10.0.0.2:9901: answered 503 Service Unavailable: not a manager"
        );
        let token = FollowError::Unauthorized("bad token".into()).to_string();
        assert!(token.starts_with("rejected our token (401): [discovery.docker] token_file"));
        assert!(
            !token.contains('\n') && token.ends_with("(bad token)"),
            "{token}"
        );
    }
}
