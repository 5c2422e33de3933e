//! A small, read-only Docker Engine API client over hyper.
//!
//! - Endpoints: `unix:///var/run/docker.sock`, or `http://HOST:PORT` (`tcp://` too) for a
//!   read-only socket proxy. No TLS: put a proxy on the overlay or on loopback instead.
//! - GET only. `GET /version` first ([`Client::negotiate`]), then every path is pinned to one
//!   API version (`/v1.41/tasks`), the newest both sides know: the engine keeps the
//!   answers' shape stable for a pinned version.
//! - One connection per request (a few per second at most: no pool to go stale), and a
//!   timeout on every request, body included. The event stream has its own connection.
//! - Every failure is one [`ApiError`] line that says what to do (socket not mounted,
//!   permission denied, a worker node, an engine too old, ...).
//!
//! Not bollard: its generated `Task` drops `NetworksAttachments`, the field a router needs.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};

use super::api;

/// The oldest API meshd can use: Docker 1.12 (swarm mode, `/services`, `/tasks`, `/nodes`
/// and their filters).
pub const MIN_API: ApiVersion = ApiVersion(1, 24);
/// The newest API these types were checked against; a newer engine is asked for this one.
pub const MAX_API: ApiVersion = ApiVersion(1, 50);
/// Every request, connect to last body byte.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// A larger answer is refused (a `/tasks` answer is ~2 KiB per task).
pub const MAX_BODY: usize = 64 << 20;
/// A larger answer is decoded on a blocking thread.
const DECODE_INLINE_MAX: usize = 256 << 10;

/// An API version, e.g. 1.41.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ApiVersion(pub u32, pub u32);

impl ApiVersion {
    pub fn parse(s: &str) -> Option<ApiVersion> {
        let (a, b) = s.trim().split_once('.')?;
        Some(ApiVersion(a.parse().ok()?, b.parse().ok()?))
    }
}

impl std::fmt::Display for ApiVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.0, self.1)
    }
}

/// A failed API call. `Display` is one line, starting with `docker discovery:`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("docker discovery: invalid endpoint {0:?}: use unix:///var/run/docker.sock or http://HOST:PORT")]
    Endpoint(String),
    #[error("docker discovery: cannot connect to {endpoint}: {problem}")]
    Connect { endpoint: String, problem: String },
    #[error("docker discovery: GET {path} on {endpoint}: no complete answer within {}s: is the engine overloaded?", REQUEST_TIMEOUT.as_secs())]
    Timeout { endpoint: String, path: String },
    #[error("docker discovery: GET {path}: {message}: this node is a worker, and only managers answer for the swarm; point meshd at a manager (endpoint = \"http://MANAGER:PORT\" through a read-only socket proxy) or run it on managers")]
    NotManager { path: String, message: String },
    #[error("docker discovery: GET {path}: {message}: this Docker engine is not in a swarm; run `docker swarm init` (or join one), or remove [discovery.docker]")]
    NoSwarm { path: String, message: String },
    #[error("docker discovery: the engine at {endpoint} serves API {version} at most; meshd needs {MIN_API} or newer (Docker 1.12+): upgrade Docker")]
    TooOld { endpoint: String, version: String },
    #[error("docker discovery: GET {path}: {status}: {message}{hint}")]
    Status {
        path: String,
        status: u16,
        message: String,
        hint: &'static str,
    },
    #[error("docker discovery: GET {path}: cannot read the answer: {problem}")]
    Decode { path: String, problem: String },
    #[error("docker discovery: GET {path} on {endpoint}: {problem}")]
    Http {
        endpoint: String,
        path: String,
        problem: String,
    },
}

impl ApiError {
    /// A short, bounded name for the kind of failure.
    pub fn reason(&self) -> &'static str {
        match self {
            ApiError::Endpoint(_) => "endpoint",
            ApiError::Connect { .. } => "connect",
            ApiError::Timeout { .. } => "timeout",
            ApiError::NotManager { .. } => "not_manager",
            ApiError::NoSwarm { .. } => "no_swarm",
            ApiError::TooOld { .. } => "api_too_old",
            ApiError::Status { .. } => "status",
            ApiError::Decode { .. } => "decode",
            ApiError::Http { .. } => "http",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Transport {
    Unix(PathBuf),
    /// host:port
    Tcp(String),
}

/// A Docker Engine API client (cheap to clone).
#[derive(Debug, Clone)]
pub struct Client {
    /// As configured, for messages.
    endpoint: String,
    transport: Transport,
    /// `/v1.41` once negotiated, empty before.
    prefix: String,
    timeout: Duration,
}

impl Client {
    /// A client for `endpoint`; nothing is connected yet.
    pub fn new(endpoint: &str) -> Result<Client, ApiError> {
        let transport = if let Some(path) = endpoint.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(ApiError::Endpoint(endpoint.to_owned()));
            }
            Transport::Unix(PathBuf::from(path))
        } else if let Some(rest) = endpoint
            .strip_prefix("http://")
            .or_else(|| endpoint.strip_prefix("tcp://"))
        {
            let hostport = rest.trim_end_matches('/');
            let port_ok = hostport
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0));
            if !port_ok || hostport.contains('/') {
                return Err(ApiError::Endpoint(endpoint.to_owned()));
            }
            Transport::Tcp(hostport.to_owned())
        } else {
            return Err(ApiError::Endpoint(endpoint.to_owned()));
        };
        Ok(Client {
            endpoint: endpoint.to_owned(),
            transport,
            prefix: String::new(),
            timeout: REQUEST_TIMEOUT,
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The pinned API version, once [`Client::negotiate`] succeeded.
    pub fn api_version(&self) -> Option<&str> {
        self.prefix.strip_prefix("/v")
    }

    /// `GET /version`, then pins the newest API version both sides know. Refuses an
    /// engine older than [`MIN_API`].
    pub async fn negotiate(&mut self) -> Result<api::Version, ApiError> {
        let v: api::Version = self.get_json("/version").await?;
        let max = ApiVersion::parse(&v.api_version).ok_or_else(|| ApiError::Decode {
            path: "/version".into(),
            problem: format!("ApiVersion {:?} is not a version", v.api_version),
        })?;
        if max < MIN_API {
            return Err(ApiError::TooOld {
                endpoint: self.endpoint.clone(),
                version: v.api_version.clone(),
            });
        }
        let min = ApiVersion::parse(&v.min_api_version).unwrap_or(MIN_API);
        let pinned = max.min(MAX_API).max(min);
        self.prefix = format!("/v{pinned}");
        Ok(v)
    }

    /// `GET <prefix><path>` decoded as JSON.
    pub async fn get<T: DeserializeOwned + Send + 'static>(
        &self,
        path: &str,
    ) -> Result<T, ApiError> {
        self.get_json(&format!("{}{path}", self.prefix)).await
    }

    async fn get_json<T: DeserializeOwned + Send + 'static>(
        &self,
        path: &str,
    ) -> Result<T, ApiError> {
        let body = self.get_bytes(path).await?;
        // A large answer (a `/tasks` of 10,000 tasks is ~15 MB, ~40 ms to decode) is
        // decoded on a blocking thread: on the runtime thread it held up every connection
        // for that long (benches/swarm-scale.py). A small one is not worth the hop.
        let decoded = if body.len() > DECODE_INLINE_MAX {
            crate::sys::spawn_background(move || serde_json::from_slice::<T>(&body))
                .await
                .map_err(|e| ApiError::Decode {
                    path: shown(path),
                    problem: e.to_string(),
                })?
        } else {
            serde_json::from_slice(&body)
        };
        decoded.map_err(|e| ApiError::Decode {
            path: shown(path),
            problem: e.to_string(),
        })
    }

    async fn get_bytes(&self, path: &str) -> Result<Bytes, ApiError> {
        let call = async {
            let resp = self.send(path).await?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| self.http_error(path, &*e))?
                .to_bytes();
            if !status.is_success() {
                return Err(status_error(path, status, &body));
            }
            Ok(body)
        };
        match tokio::time::timeout(self.timeout, call).await {
            Ok(r) => r,
            Err(_) => Err(ApiError::Timeout {
                endpoint: self.endpoint.clone(),
                path: shown(path),
            }),
        }
    }

    /// Opens `GET <prefix><path>` as a stream (the answer's head within the timeout, the
    /// body as it comes).
    pub async fn stream(&self, path: &str) -> Result<Incoming, ApiError> {
        let path = format!("{}{path}", self.prefix);
        let resp = tokio::time::timeout(self.timeout, self.send(&path))
            .await
            .map_err(|_| ApiError::Timeout {
                endpoint: self.endpoint.clone(),
                path: shown(&path),
            })??;
        let status = resp.status();
        if !status.is_success() {
            let body = tokio::time::timeout(
                self.timeout,
                Limited::new(resp.into_body(), 64 << 10).collect(),
            )
            .await
            .ok()
            .and_then(Result::ok)
            .map(|c| c.to_bytes())
            .unwrap_or_default();
            return Err(status_error(&path, status, &body));
        }
        Ok(resp.into_body())
    }

    async fn send(&self, path: &str) -> Result<Response<Incoming>, ApiError> {
        match &self.transport {
            Transport::Unix(p) => {
                let s = tokio::net::UnixStream::connect(p)
                    .await
                    .map_err(|e| self.connect_error(&e))?;
                self.exchange(s, "docker", path).await
            }
            Transport::Tcp(hostport) => {
                let s = tokio::net::TcpStream::connect(hostport.as_str())
                    .await
                    .map_err(|e| self.connect_error(&e))?;
                let _ = s.set_nodelay(true);
                self.exchange(s, hostport, path).await
            }
        }
    }

    async fn exchange<S>(
        &self,
        io: S,
        host: &str,
        path: &str,
    ) -> Result<Response<Incoming>, ApiError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| self.http_error(path, &e))?;
        // Drives the connection until the answer's body is read (or dropped).
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = Request::get(path)
            .header(hyper::header::HOST, host)
            .header(
                hyper::header::USER_AGENT,
                concat!("meshd/", env!("CARGO_PKG_VERSION")),
            )
            .body(Empty::<Bytes>::new())
            .map_err(|e| self.http_error(path, &e))?;
        sender
            .send_request(req)
            .await
            .map_err(|e| self.http_error(path, &e))
    }

    fn http_error(&self, path: &str, e: &(dyn std::error::Error + 'static)) -> ApiError {
        let mut problem = e.to_string();
        let mut src = e.source();
        while let Some(s) = src {
            problem.push_str(": ");
            problem.push_str(&s.to_string());
            src = s.source();
        }
        ApiError::Http {
            endpoint: self.endpoint.clone(),
            path: shown(path),
            problem,
        }
    }

    fn connect_error(&self, e: &std::io::Error) -> ApiError {
        use std::io::ErrorKind;
        let unix = matches!(self.transport, Transport::Unix(_));
        let problem = match e.kind() {
            ErrorKind::NotFound if unix => "No such file or directory: is Docker running, and is the socket mounted into the meshd container?".to_owned(),
            ErrorKind::PermissionDenied => if unix {
                "permission denied: meshd needs read access to the socket: run it as root or in the socket's group (docker run --group-add $(stat -c %g /var/run/docker.sock)), or use a read-only socket proxy".to_owned()
            } else {
                "permission denied".to_owned()
            },
            ErrorKind::ConnectionRefused => if unix {
                "connection refused: the socket exists but nothing listens on it: is Docker running?".to_owned()
            } else {
                "connection refused: is the engine (or the socket proxy) listening there?".to_owned()
            },
            _ => strip_os_error(&e.to_string()),
        };
        ApiError::Connect {
            endpoint: self.endpoint.clone(),
            problem,
        }
    }
}

/// A path for messages: without its query (the URL-encoded filters are noise there).
fn shown(path: &str) -> String {
    path.split('?').next().unwrap_or(path).to_owned()
}

/// "No such file or directory (os error 2)" -> "No such file or directory".
fn strip_os_error(s: &str) -> String {
    match s.rfind(" (os error ") {
        Some(i) => s[..i].to_owned(),
        None => s.to_owned(),
    }
}

/// The error for a non-2xx answer: the engine's `{"message": ...}` (or the body's text),
/// with what to do for the answers a router meets.
fn status_error(path: &str, status: StatusCode, body: &[u8]) -> ApiError {
    let message = serde_json::from_slice::<api::ErrorBody>(body)
        .ok()
        .map(|b| b.message)
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_owned());
    let mut message: String = message
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(300)
        .collect();
    if message.is_empty() {
        message = status.canonical_reason().unwrap_or("no message").to_owned();
    }
    // The engine's sentence ends with a period; the hint follows after a colon.
    let message = message.trim_end_matches('.').to_owned();
    let path = shown(path);
    if status == StatusCode::SERVICE_UNAVAILABLE {
        if message.contains("Worker nodes") || message.contains("not a swarm manager. Worker") {
            return ApiError::NotManager { path, message };
        }
        if message.contains("swarm init") || message.contains("not part of a swarm") {
            return ApiError::NoSwarm { path, message };
        }
    }
    let hint = match status {
        StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED => {
            ": the socket proxy refuses this call: allow read access to services, tasks, nodes, \
             events, version (and containers, for meshd to find its own networks)"
        }
        StatusCode::BAD_REQUEST if message.contains("client version") => {
            ": the engine does not serve the pinned API version"
        }
        StatusCode::SERVICE_UNAVAILABLE => {
            ": the swarm manager is not available (no quorum, or starting): meshd keeps the last good state"
        }
        _ => "",
    };
    ApiError::Status {
        path,
        status: status.as_u16(),
        message,
        hint,
    }
}

/// Percent-encodes a query parameter value (everything but RFC 3986 unreserved characters).
pub fn encode_query(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            Client::new("unix:///var/run/docker.sock")
                .unwrap()
                .transport,
            Transport::Unix("/var/run/docker.sock".into())
        );
        assert_eq!(
            Client::new("http://docker-api:2375").unwrap().transport,
            Transport::Tcp("docker-api:2375".into())
        );
        assert_eq!(
            Client::new("tcp://10.0.0.1:2375/").unwrap().transport,
            Transport::Tcp("10.0.0.1:2375".into())
        );
        for bad in [
            "unix://relative.sock",
            "http://host",
            "http://:2375",
            "http://h:0",
            "https://h:2376",
            "/var/run/docker.sock",
            "http://h:2375/path",
        ] {
            assert!(
                matches!(Client::new(bad), Err(ApiError::Endpoint(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn versions() {
        assert_eq!(ApiVersion::parse("1.41"), Some(ApiVersion(1, 41)));
        assert!(ApiVersion(1, 9) < ApiVersion(1, 24));
        assert!(ApiVersion(1, 100) > MAX_API);
        assert_eq!(ApiVersion::parse("v1"), None);
        assert_eq!(ApiVersion(1, 41).to_string(), "1.41");
    }

    #[test]
    fn query_encoding() {
        assert_eq!(
            encode_query(r#"{"desired-state":["running"]}"#),
            "%7B%22desired-state%22%3A%5B%22running%22%5D%7D"
        );
    }

    #[test]
    fn status_errors_say_what_to_do() {
        let worker = br#"{"message":"This node is not a swarm manager. Worker nodes can't be used to view or modify cluster state. Please run this command on a manager node or promote the current node to a manager."}"#;
        let e = status_error("/v1.41/tasks", StatusCode::SERVICE_UNAVAILABLE, worker);
        assert_eq!(e.reason(), "not_manager");
        assert!(e.to_string().contains("this node is a worker"), "{e}");
        assert!(e.to_string().contains("point meshd at a manager"), "{e}");

        let no_swarm = include_bytes!("../../../tests/fixtures/docker/error-no-swarm.json");
        let e = status_error(
            "/v1.41/tasks?filters=%7B%7D",
            StatusCode::SERVICE_UNAVAILABLE,
            no_swarm,
        );
        assert_eq!(e.reason(), "no_swarm", "{e}");
        assert_eq!(
            e.to_string(),
            "docker discovery: GET /v1.41/tasks: This node is not a swarm manager. Use \"docker \
             swarm init\" or \"docker swarm join\" to connect this node to swarm and try again: \
             this Docker engine is not in a swarm; run `docker swarm init` (or join one), or \
             remove [discovery.docker]"
        );

        let e = status_error("/v1.41/nodes", StatusCode::FORBIDDEN, b"Forbidden\n");
        assert_eq!(
            e.to_string(),
            "docker discovery: GET /v1.41/nodes: 403: Forbidden: the socket proxy refuses this call: \
             allow read access to services, tasks, nodes, events, version (and containers, for \
             meshd to find its own networks)"
        );
        let e = status_error("/x", StatusCode::INTERNAL_SERVER_ERROR, b"");
        assert_eq!(
            e.to_string(),
            "docker discovery: GET /x: 500: Internal Server Error"
        );
    }

    #[tokio::test]
    async fn connect_errors_say_what_to_do() {
        let dir = std::env::temp_dir().join(format!("meshd-docker-client-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = format!("unix://{}/nope.sock", dir.display());
        let e = Client::new(&missing)
            .unwrap()
            .negotiate()
            .await
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("docker discovery: cannot connect to {missing}: No such file or directory: is Docker running, and is the socket mounted into the meshd container?")
        );
        // A socket file nobody listens on.
        let dead = dir.join("dead.sock");
        drop(std::os::unix::net::UnixListener::bind(&dead).unwrap());
        let e = Client::new(&format!("unix://{}", dead.display()))
            .unwrap()
            .negotiate()
            .await
            .unwrap_err();
        assert!(e.to_string().contains("connection refused"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
