//! The desired-state feed: meshd on a Swarm manager serves what it reads from its engine to
//! meshd on the other nodes, so that every node, workers included, routes with the same
//! table.
//!
//! ```text
//!  manager: docker provider ──FeedState (watch)──► admin GET /api/v1/discovery/docker
//!                                                    │  JSON lines: state on change,
//!                                                    │  heartbeat every second
//!  worker:  docker provider (following) ◄────────────┘  bearer token, failover across
//!           ──► Update::Services(Docker, ..)    `[discovery.docker] managers`
//! ```
//!
//! The source of truth stays Swarm's Raft store: a manager's meshd only relays its last
//! good reading of the engine; followers keep their last good table while no manager
//! answers. Nothing here is replicated or voted on by meshd itself.
//!
//! The wire carries resolved services (every policy field, not only the labels), so every
//! node applies the same policy: a follower's own `[defaults]` do not apply to Swarm
//! services. Input from the wire is untrusted: [`WireService::into_config`] checks every
//! field against the same bounds as `mesh.toml` and never panics.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::config::limits::{
    self, DurationKey, IntKey, BALANCES, CHECKS, LOCALITIES, PROTOCOLS, PROXY_PROTOCOLS, UDP_CHECKS,
};
use crate::config::tls::{Terminate, TlsVersion};
use crate::config::{
    defaults, BackendConfig, HealthConfig, Locality, Protocol, ServiceConfig, TlsConfig, UdpConfig,
};

/// How often a manager tells a follower it is alive (with whether its engine answers).
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// A subscriber that has not taken a line for this long is dropped.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// The most services and backends per service accepted from the wire.
const MAX_WIRE_SERVICES: usize = 10_000;
const MAX_WIRE_BACKENDS: usize = 100_000;
/// The longest backend identity accepted from the wire (a Swarm task ID has 25 characters).
const MAX_WIRE_ID: usize = 64;

/// What the local Docker provider publishes for the feed.
#[derive(Debug, Clone, Default)]
pub struct FeedState {
    /// True while this node reads a manager's engine itself (it may then serve the feed);
    /// false while it follows another node, or before its first poll.
    pub serving: bool,
    /// Bumped whenever `services` changes.
    pub seq: u64,
    /// The last good list (`None` before the first successful poll).
    pub services: Option<Arc<Vec<ServiceConfig>>>,
    /// Whether the last poll of the engine succeeded, and why not (while following: why
    /// the last manager failed).
    pub engine_ok: bool,
    pub error: Option<String>,
    /// While following: the manager whose feed is applied now.
    pub following: Option<String>,
}

pub type FeedTx = watch::Sender<FeedState>;
pub type FeedRx = watch::Receiver<FeedState>;

/// One line of the feed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Message {
    /// The whole desired state. Sent first, and again whenever it changes.
    State {
        seq: u64,
        engine_ok: bool,
        services: Vec<WireService>,
    },
    /// Sent every [`HEARTBEAT`]; `engine_ok = false` while the manager's engine fails (its
    /// state is then the last good one).
    Heartbeat {
        seq: u64,
        engine_ok: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
}

/// Why a service (or a whole state) from the wire is not used. A service is left out and
/// named in the state's warnings; the others are applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("service name {0:?} is not usable")]
    Name(String),
    /// A field outside the bounds `mesh.toml` has (`config::limits`); `problem` names it.
    #[error("service {service:?}: {problem}")]
    Field { service: String, problem: String },
    #[error("{0} services is too many")]
    TooManyServices(usize),
}

/// A mesh service on the wire. Durations in milliseconds; keywords as in `mesh.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireService {
    pub name: String,
    pub listen: Vec<SocketAddr>,
    pub balance: String,
    pub connect_timeout_ms: u64,
    pub connect_retries: u32,
    /// Added after the first release: absent from an older manager's feed, so defaulted.
    #[serde(default = "wire_hedge_delay_ms")]
    pub hedge_delay_ms: u64,
    #[serde(default = "wire_queue_timeout_ms")]
    pub queue_timeout_ms: u64,
    #[serde(default = "wire_max_ejection_percent")]
    pub max_ejection_percent: u32,
    #[serde(default)]
    pub retry_on_early_close: bool,
    #[serde(default = "wire_replay_buffer")]
    pub replay_buffer: u32,
    pub idle_timeout_ms: u64,
    pub drain_timeout_ms: u64,
    pub slow_start_ms: u64,
    pub half_close_timeout_ms: u64,
    pub max_connections: u32,
    pub proxy_protocol: String,
    /// `accept_proxy` CIDRs (`10.0.0.0/8`). Left out when empty, so an older follower
    /// still reads every service that does not use it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub accept_proxy: Vec<String>,
    /// Like every key added after the first release, sent only when it is not the
    /// default: a follower older than its manager (it refuses unknown keys) still reads
    /// every service that does not use what it does not know.
    #[serde(
        default = "wire_client_hello_timeout_ms",
        skip_serializing_if = "is_default_client_hello_timeout"
    )]
    pub client_hello_timeout_ms: u64,
    pub backlog: u32,
    pub health: WireHealth,
    pub backends: Vec<WireBackend>,
    /// `tcp` or `udp`; the UDP keys below. Added with UDP services: absent from an older
    /// manager's feed (its services are all TCP), so defaulted.
    #[serde(default = "wire_protocol", skip_serializing_if = "is_tcp")]
    pub protocol: String,
    #[serde(
        default = "wire_udp_idle_timeout_ms",
        skip_serializing_if = "is_default_udp_idle_timeout"
    )]
    pub udp_idle_timeout_ms: u64,
    #[serde(
        default = "wire_max_flows",
        skip_serializing_if = "is_default_max_flows"
    )]
    pub max_flows: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub udp_responses: u32,
    /// `any`, `prefer_local` or `local_only`; with anything but `any`, each backend carries
    /// its Swarm node so that every follower tells its own node's tasks.
    #[serde(default = "wire_locality", skip_serializing_if = "is_any")]
    pub locality: String,
    /// `[service.tls]` (the labels `mesh.tls`, `mesh.tls.cert`, `mesh.tls.key`, `mesh.sni`,
    /// `mesh.sni_default`); absent for a
    /// plain service. A follower older than this key refuses the state while such a
    /// service exists (keeping its last good table) rather than serve it as plain TCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<WireTls>,
}

/// A service's `[service.tls]` on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireTls {
    /// `passthrough` or `terminate`.
    pub mode: String,
    /// `terminate`: the certificate and key files (labels `mesh.tls.cert`, `mesh.tls.key`),
    /// paths in meshd's container, read by each follower from its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Normalised names; checked again on arrival.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sni: Vec<String>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub sni_default: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireHealth {
    pub check: String,
    pub path: String,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub rise: u32,
    pub fall: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireBackend {
    pub addr: SocketAddr,
    pub weight: u32,
    /// The backend's identity (the Swarm task ID), so that a follower too tells a new task
    /// from the stopped one whose address it reuses. Absent from older managers' lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The Swarm node ID of the task; sent only for a service whose `locality` uses it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

fn name_of<T: PartialEq + Copy>(table: &[(&'static str, T)], v: T) -> String {
    limits::name_of(table, v).to_owned()
}

fn keyword<T: Copy>(table: &[(&'static str, T)], what: &str, v: &str) -> Result<T, String> {
    limits::keyword(table, v).ok_or_else(|| format!("unknown {what} {v:?}"))
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A duration from the wire (milliseconds), checked like the same key in `mesh.toml`.
fn duration(k: &DurationKey, v: u64) -> Result<Duration, String> {
    k.check(Duration::from_millis(v)).map_err(|e| {
        if e.starts_with(k.key) {
            e
        } else {
            format!("{} {v} ms: {e}", k.key)
        }
    })
}

/// An integer from the wire, checked like the same key in `mesh.toml`.
fn int(k: &IntKey, v: u32) -> Result<u32, String> {
    k.check(i64::from(v))
}

fn wire_hedge_delay_ms() -> u64 {
    ms(defaults::HEDGE_DELAY)
}

fn wire_queue_timeout_ms() -> u64 {
    ms(defaults::QUEUE_TIMEOUT)
}

fn is_default_client_hello_timeout(v: &u64) -> bool {
    *v == wire_client_hello_timeout_ms()
}

fn is_any(v: &str) -> bool {
    v == Locality::Any.name()
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn wire_locality() -> String {
    Locality::Any.name().to_owned()
}

fn is_tcp(v: &str) -> bool {
    v == Protocol::Tcp.name()
}

fn is_default_udp_idle_timeout(v: &u64) -> bool {
    *v == wire_udp_idle_timeout_ms()
}

fn is_default_max_flows(v: &u32) -> bool {
    *v == wire_max_flows()
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

fn wire_client_hello_timeout_ms() -> u64 {
    ms(defaults::CLIENT_HELLO_TIMEOUT)
}

fn wire_max_ejection_percent() -> u32 {
    defaults::MAX_EJECTION_PERCENT
}

fn wire_replay_buffer() -> u32 {
    defaults::REPLAY_BUFFER
}

fn wire_protocol() -> String {
    Protocol::Tcp.name().to_owned()
}

fn wire_udp_idle_timeout_ms() -> u64 {
    ms(defaults::UDP_IDLE_TIMEOUT)
}

fn wire_max_flows() -> u32 {
    defaults::MAX_FLOWS
}

/// A backend identity from the wire: 1 to [`MAX_WIRE_ID`] printable ASCII characters, no
/// space (it is logged and may be shown on the status page).
fn id_ok(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_WIRE_ID && id.bytes().all(|b| b.is_ascii_graphic())
}

impl WireService {
    pub fn from_config(s: &ServiceConfig) -> WireService {
        WireService {
            name: s.name.clone(),
            listen: s.listen.clone(),
            balance: name_of(&BALANCES, s.balance),
            connect_timeout_ms: ms(s.connect_timeout),
            connect_retries: s.connect_retries,
            hedge_delay_ms: ms(s.hedge_delay),
            queue_timeout_ms: ms(s.queue_timeout),
            max_ejection_percent: s.max_ejection_percent,
            retry_on_early_close: s.retry_on_early_close,
            replay_buffer: s.replay_buffer,
            idle_timeout_ms: ms(s.idle_timeout),
            drain_timeout_ms: ms(s.drain_timeout),
            slow_start_ms: ms(s.slow_start),
            half_close_timeout_ms: ms(s.half_close_timeout),
            max_connections: s.max_connections,
            proxy_protocol: name_of(&PROXY_PROTOCOLS, s.proxy_protocol),
            accept_proxy: s.accept_proxy.iter().map(ToString::to_string).collect(),
            client_hello_timeout_ms: ms(s.client_hello_timeout),
            backlog: s.backlog,
            health: WireHealth {
                check: name_of(&CHECKS, s.health.check),
                path: s.health.path.clone(),
                interval_ms: ms(s.health.interval),
                timeout_ms: ms(s.health.timeout),
                rise: s.health.rise,
                fall: s.health.fall,
            },
            backends: s
                .backends
                .iter()
                .map(|b| WireBackend {
                    addr: b.addr,
                    weight: b.weight,
                    id: b.id.as_deref().map(str::to_owned),
                    node: b
                        .node
                        .as_deref()
                        .filter(|_| s.locality != Locality::Any)
                        .map(str::to_owned),
                })
                .collect(),
            locality: name_of(&LOCALITIES, s.locality),
            protocol: name_of(&PROTOCOLS, s.protocol),
            udp_idle_timeout_ms: ms(s.udp.idle_timeout),
            max_flows: s.udp.max_flows,
            udp_responses: s.udp.responses,
            tls: s.tls.as_ref().map(|t| WireTls {
                mode: if t.terminate.is_some() {
                    "terminate"
                } else {
                    "passthrough"
                }
                .into(),
                cert: t.terminate.as_ref().map(|x| x.cert.display().to_string()),
                key: t.terminate.as_ref().map(|x| x.key.display().to_string()),
                sni: t.sni.clone(),
                sni_default: t.sni_default,
            }),
        }
    }

    /// Checks every field against the bounds `mesh.toml` has; the error names the field.
    pub fn into_config(self) -> Result<ServiceConfig, WireError> {
        if limits::service_name(&self.name).is_err() {
            return Err(WireError::Name(self.name));
        }
        let err = |problem: String| WireError::Field {
            service: self.name.clone(),
            problem,
        };
        if self.listen.is_empty() || self.listen.len() > limits::MAX_LISTEN {
            return Err(err(format!(
                "listen must hold 1 to {} addresses",
                limits::MAX_LISTEN
            )));
        }
        let h = &self.health;
        if let Err(e) = limits::health_path(&h.path) {
            return Err(err(e));
        }
        if self.backends.len() > MAX_WIRE_BACKENDS {
            return Err(err(format!("{} backends is too many", self.backends.len())));
        }
        for b in &self.backends {
            int(&limits::WEIGHT, b.weight).map_err(|e| err(format!("backend {}: {e}", b.addr)))?;
        }
        if let Some(b) = self
            .backends
            .iter()
            .find(|b| b.node.as_deref().is_some_and(|n| !id_ok(n)))
        {
            return Err(err(format!(
                "backend {} node {:?} is not usable (1 to {MAX_WIRE_ID} printable ASCII characters)",
                b.addr,
                b.node.as_deref().unwrap_or_default()
            )));
        }
        let locality = keyword(&LOCALITIES, "locality", &self.locality).map_err(err)?;
        if let Some(b) = self
            .backends
            .iter()
            .find(|b| b.id.as_deref().is_some_and(|id| !id_ok(id)))
        {
            return Err(err(format!(
                "backend {} id {:?} is not usable (1 to {MAX_WIRE_ID} printable ASCII characters)",
                b.addr,
                b.id.as_deref().unwrap_or_default()
            )));
        }
        let protocol = keyword(&PROTOCOLS, "protocol", &self.protocol).map_err(err)?;
        let check = keyword(&CHECKS, "health check", &h.check).map_err(err)?;
        if protocol == Protocol::Udp && !UDP_CHECKS.contains(&check) {
            return Err(err(format!(
                "health check {:?} cannot check a UDP service",
                h.check
            )));
        }
        let tls = match &self.tls {
            None => None,
            Some(t) => Some(wire_tls(t, protocol).map_err(err)?),
        };
        Ok(ServiceConfig {
            locality,
            protocol,
            udp: UdpConfig {
                idle_timeout: duration(&limits::UDP_IDLE_TIMEOUT, self.udp_idle_timeout_ms)
                    .map_err(err)?,
                max_flows: int(&limits::MAX_FLOWS, self.max_flows).map_err(err)?,
                responses: int(&limits::UDP_RESPONSES, self.udp_responses).map_err(err)?,
            },
            balance: keyword(&BALANCES, "balance", &self.balance).map_err(err)?,
            connect_timeout: duration(&limits::CONNECT_TIMEOUT, self.connect_timeout_ms)
                .map_err(err)?,
            connect_retries: int(&limits::CONNECT_RETRIES, self.connect_retries).map_err(err)?,
            hedge_delay: duration(&limits::HEDGE_DELAY, self.hedge_delay_ms).map_err(err)?,
            queue_timeout: duration(&limits::QUEUE_TIMEOUT, self.queue_timeout_ms).map_err(err)?,
            max_ejection_percent: int(&limits::MAX_EJECTION_PERCENT, self.max_ejection_percent)
                .map_err(err)?,
            retry_on_early_close: self.retry_on_early_close,
            replay_buffer: int(&limits::REPLAY_BUFFER, self.replay_buffer).map_err(err)?,
            idle_timeout: duration(&limits::IDLE_TIMEOUT, self.idle_timeout_ms).map_err(err)?,
            drain_timeout: duration(&limits::DRAIN_TIMEOUT, self.drain_timeout_ms).map_err(err)?,
            slow_start: duration(&limits::SLOW_START, self.slow_start_ms).map_err(err)?,
            half_close_timeout: duration(&limits::HALF_CLOSE_TIMEOUT, self.half_close_timeout_ms)
                .map_err(err)?,
            max_connections: int(&limits::MAX_CONNECTIONS, self.max_connections).map_err(err)?,
            proxy_protocol: keyword(&PROXY_PROTOCOLS, "proxy_protocol", &self.proxy_protocol)
                .map_err(err)?,
            accept_proxy: limits::accept_proxy(self.accept_proxy.iter().map(String::as_str))
                .map_err(err)?,
            client_hello_timeout: duration(
                &limits::CLIENT_HELLO_TIMEOUT,
                self.client_hello_timeout_ms,
            )
            .map_err(err)?,
            backlog: int(&limits::BACKLOG, self.backlog).map_err(err)?,
            health: HealthConfig {
                check,
                path: h.path.clone(),
                interval: duration(&limits::HEALTH_INTERVAL, h.interval_ms).map_err(err)?,
                timeout: duration(&limits::HEALTH_TIMEOUT, h.timeout_ms).map_err(err)?,
                rise: int(&limits::RISE, h.rise).map_err(err)?,
                fall: int(&limits::FALL, h.fall).map_err(err)?,
            },
            backends: self
                .backends
                .iter()
                .map(|b| BackendConfig {
                    addr: b.addr,
                    weight: b.weight,
                    id: b.id.as_deref().map(Arc::from),
                    node: b.node.as_deref().map(Arc::from),
                    local: false,
                })
                .collect(),
            dns: None,
            tls,
            listen: self.listen,
            name: self.name,
        })
    }
}

/// A service's `tls` from the wire, held to `[service.tls]`'s rules.
fn wire_tls(t: &WireTls, protocol: Protocol) -> Result<TlsConfig, String> {
    // `terminate`: the files are this follower's own (the same secrets mounted into
    // every meshd task); read now, so a follower without them leaves the service out.
    let terminate = match (t.mode.as_str(), &t.cert, &t.key) {
        ("passthrough", None, None) => None,
        ("terminate", Some(cert), Some(key)) if cert.starts_with('/') && key.starts_with('/') => {
            let loaded =
                Terminate::load(cert.into(), key.into(), Vec::new(), TlsVersion::default())
                    .map_err(|e| e.to_string())?;
            Some(std::sync::Arc::new(loaded))
        }
        ("passthrough" | "terminate", _, _) => {
            return Err(format!(
                "tls mode {:?} with cert {:?} and key {:?} is not a valid combination",
                t.mode, t.cert, t.key
            ))
        }
        _ => return Err(format!("tls mode {:?} is not one this meshd has", t.mode)),
    };
    if protocol != Protocol::Tcp {
        return Err("tls applies to TCP services only".into());
    }
    if t.sni.len() > limits::MAX_SNI {
        return Err(format!("{} sni names is too many", t.sni.len()));
    }
    let mut sni: Vec<String> = Vec::with_capacity(t.sni.len());
    for n in &t.sni {
        let n = limits::sni_name(n)?;
        if sni.contains(&n) {
            return Err(format!("sni {n:?} is listed twice"));
        }
        sni.push(n);
    }
    if sni.is_empty() && !t.sni_default {
        return Err("tls lists no sni name and is not sni_default".into());
    }
    Ok(TlsConfig {
        sni,
        sni_default: t.sni_default,
        terminate,
    })
}

/// Reads the services of a `State` line; a service that does not pass the checks is left
/// out and named in the returned warnings (like a label that does not parse).
pub fn services_from_wire(
    wire: Vec<WireService>,
) -> Result<(Vec<ServiceConfig>, Vec<String>), WireError> {
    if wire.len() > MAX_WIRE_SERVICES {
        return Err(WireError::TooManyServices(wire.len()));
    }
    let mut out: Vec<ServiceConfig> = Vec::with_capacity(wire.len());
    let mut warnings = Vec::new();
    for w in wire {
        match w.into_config() {
            Ok(s) if out.iter().any(|o| o.name == s.name) => {
                warnings.push(format!("service {:?} is listed twice", s.name));
            }
            Ok(s) => out.push(s),
            Err(e) => warnings.push(e.to_string()),
        }
    }
    Ok((out, warnings))
}

fn line(m: &Message) -> Bytes {
    // Serializing these types cannot fail (no maps with non-string keys, no floats).
    let mut v = serde_json::to_vec(m).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

/// The response body of one subscriber: a state line first (once there is one), then a
/// state line on every change and a heartbeat every [`HEARTBEAT`]. A task per subscriber
/// writes the lines; it ends when the subscriber goes away or stops reading.
pub fn subscribe(mut rx: FeedRx) -> FeedBody {
    let (tx, body) = mpsc::channel::<Bytes>(4);
    tokio::spawn(async move {
        let mut sent_seq: Option<u64> = None;
        loop {
            let msg = {
                let st = rx.borrow_and_update();
                match &st.services {
                    Some(list) if sent_seq != Some(st.seq) => {
                        sent_seq = Some(st.seq);
                        Message::State {
                            seq: st.seq,
                            engine_ok: st.engine_ok,
                            services: list.iter().map(WireService::from_config).collect(),
                        }
                    }
                    _ => Message::Heartbeat {
                        seq: st.seq,
                        engine_ok: st.engine_ok && st.serving,
                        error: if st.serving {
                            st.error.clone()
                        } else {
                            Some("this node no longer reads a manager's engine".into())
                        },
                    },
                }
            };
            match tokio::time::timeout(SEND_TIMEOUT, tx.send(line(&msg))).await {
                Ok(Ok(())) => {}
                _ => return,
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(HEARTBEAT) => {}
                _ = tx.closed() => return,
            }
        }
    });
    FeedBody { rx: body }
}

/// A streamed response body fed by a channel.
pub struct FeedBody {
    rx: mpsc::Receiver<Bytes>,
}

impl Body for FeedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn service() -> ServiceConfig {
        let cfg = Config::parse(
            std::path::Path::new("mesh.toml"),
            r#"
[defaults]
balance = "maglev"
connect_timeout = "750ms"
slow_start = "10s"
proxy_protocol = "v2"
[defaults.health]
check = "http"
path = "/ready"
rise = 3
[[service]]
name = "web-8080"
listen = ["0.0.0.0:8080", "[::]:8080"]
backends = [{ addr = "10.0.1.5:80" }, { addr = "10.0.1.6:80", weight = 50 }]
"#,
        )
        .unwrap();
        cfg.services[0].clone()
    }

    #[test]
    fn a_service_survives_the_wire_unchanged() {
        let s = service();
        let text = serde_json::to_string(&Message::State {
            seq: 3,
            engine_ok: true,
            services: vec![WireService::from_config(&s)],
        })
        .unwrap();
        let Message::State { services, .. } = serde_json::from_str(&text).unwrap() else {
            panic!("not a state line: {text}");
        };
        let (back, warnings) = services_from_wire(services).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(back, vec![s]);
    }

    /// A service using nothing added since the first release is written with the first
    /// release's keys only: a follower older than its manager (it refuses unknown keys)
    /// reads it as before, so managers can be upgraded before workers.
    #[test]
    fn a_service_with_default_new_keys_is_written_as_an_older_follower_reads_it() {
        let text = serde_json::to_string(&WireService::from_config(&service())).unwrap();
        for key in [
            "client_hello_timeout_ms",
            "accept_proxy",
            "protocol",
            "udp_idle_timeout_ms",
            "max_flows",
            "udp_responses",
        ] {
            assert!(
                !text.contains(&format!("\"{key}\"")),
                "{key} on the wire: {text}"
            );
        }
        let mut udp = service();
        udp.protocol = crate::config::Protocol::Udp;
        udp.udp.responses = 1;
        let text = serde_json::to_string(&WireService::from_config(&udp)).unwrap();
        assert!(text.contains(r#""protocol":"udp""#), "{text}");
        assert!(text.contains(r#""udp_responses":1"#), "{text}");
    }

    #[test]
    fn accept_proxy_crosses_the_wire_and_is_checked() {
        let mut s = service();
        let text = serde_json::to_string(&WireService::from_config(&s)).unwrap();
        // Unused: not on the wire at all (an older follower reads the line as before).
        assert!(!text.contains("accept_proxy"), "{text}");
        s.accept_proxy = vec!["10.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()];
        s.client_hello_timeout = Duration::from_millis(1500);
        let wire = WireService::from_config(&s);
        let text = serde_json::to_string(&wire).unwrap();
        assert!(
            text.contains(r#""accept_proxy":["10.0.0.0/8","::1/128"]"#),
            "{text}"
        );
        assert!(text.contains(r#""client_hello_timeout_ms":1500"#), "{text}");
        assert_eq!(wire.clone().into_config().unwrap(), s);
        let mut bad = wire;
        bad.accept_proxy.push("10.0.0.1/8".into());
        let e = bad.into_config().unwrap_err().to_string();
        assert!(e.contains("has bits set past its prefix"), "{e}");
    }

    #[test]
    fn backend_ids_cross_the_wire_and_are_checked() {
        let mut s = service();
        s.backends[0].id = Some(Arc::from("p4m3yb1x0yq8dh5c2w0k6z7ns"));
        let wire = WireService::from_config(&s);
        let text = serde_json::to_string(&wire).unwrap();
        // A backend without an identity has no "id" key on the wire.
        assert_eq!(text.matches("\"id\"").count(), 1, "{text}");
        let back: WireService = serde_json::from_str(&text).unwrap();
        assert_eq!(back.clone().into_config().unwrap(), s);
        // An older manager sends no "id" at all: the backends have none.
        let old = text.replace(r#","id":"p4m3yb1x0yq8dh5c2w0k6z7ns""#, "");
        assert!(!old.contains("\"id\""), "{old}");
        let parsed = serde_json::from_str::<WireService>(&old)
            .unwrap()
            .into_config()
            .unwrap();
        assert!(parsed.backends.iter().all(|b| b.id.is_none()));
        // Bounded, printable ASCII, not empty.
        for bad in [
            String::new(),
            "x".repeat(MAX_WIRE_ID + 1),
            "task one".into(),
            "task\u{1b}[31m".into(),
            "tâche".into(),
        ] {
            let mut w = back.clone();
            w.backends[1].id = Some(bad.clone());
            let e = w.into_config().unwrap_err().to_string();
            assert!(
                e.contains("backend 10.0.1.6:80 id") && e.contains("not usable"),
                "{bad:?}: {e}"
            );
        }
        let mut w = back;
        w.backends[1].id = Some("x".repeat(MAX_WIRE_ID));
        assert!(w.into_config().is_ok());
    }

    #[test]
    fn task_nodes_cross_the_wire_only_for_a_service_that_uses_locality() {
        let mut s = service();
        s.backends = vec![BackendConfig {
            addr: "10.0.1.5:80".parse().unwrap(),
            weight: 100,
            id: Some("task1".into()),
            node: Some("node1".into()),
            local: true,
        }];
        // `any`: no node on the wire (an older follower reads the line as before).
        let w = WireService::from_config(&s);
        assert_eq!(w.backends[0].node, None);
        let line = serde_json::to_string(&w).unwrap();
        assert!(
            !line.contains("node") && !line.contains("locality"),
            "{line}"
        );

        s.locality = Locality::PreferLocal;
        let back = WireService::from_config(&s).into_config().unwrap();
        assert_eq!(back.locality, Locality::PreferLocal);
        assert_eq!(back.backends[0].node.as_deref(), Some("node1"));
        // Which tasks are local is each follower's own call.
        assert!(!back.backends[0].local);

        let mut w = WireService::from_config(&s);
        w.locality = "nearest".into();
        assert!(w.into_config().is_err());
        let mut w = WireService::from_config(&s);
        w.backends[0].node = Some("bad node\n".into());
        assert!(w.into_config().is_err());
    }

    /// `mesh.tls=terminate`: the files' paths cross the wire, each follower loads its own.
    #[test]
    fn terminating_services_cross_the_wire_as_file_paths() {
        let (pem, key) = crate::config::tls::testing::self_signed("a.test");
        let t = Terminate::load(pem.clone(), key.clone(), Vec::new(), TlsVersion::V1_2).unwrap();
        let mut s = service();
        s.tls = Some(TlsConfig {
            sni: Vec::new(),
            sni_default: true,
            terminate: Some(std::sync::Arc::new(t)),
        });
        let w = WireService::from_config(&s);
        let line = serde_json::to_string(&w).unwrap();
        let want = format!(
            r#""tls":{{"mode":"terminate","cert":"{}","key":"{}","sni_default":true}}"#,
            pem.display(),
            key.display()
        );
        assert!(line.contains(&want), "{line}");
        let back = w.clone().into_config().unwrap();
        assert_eq!(back.tls, s.tls);

        // A follower without the files leaves the service out; so does a bad combination.
        let mut missing = w.clone();
        missing.tls.as_mut().unwrap().cert = Some("/nonexistent/a.pem".into());
        let e = missing.into_config().unwrap_err().to_string();
        assert!(
            e.contains("/nonexistent/a.pem") && e.contains("cannot read"),
            "{e}"
        );
        let mut bad = w;
        bad.tls.as_mut().unwrap().mode = "passthrough".into();
        assert!(bad.into_config().is_err());
        let _ = std::fs::remove_dir_all(pem.parent().unwrap());
    }

    #[test]
    fn tls_services_cross_the_wire_and_are_checked_on_arrival() {
        let mut s = service();
        // Plain: no `tls` key at all (an older follower reads the line as before).
        let line = serde_json::to_string(&WireService::from_config(&s)).unwrap();
        assert!(!line.contains("tls"), "{line}");

        s.tls = Some(TlsConfig {
            sni: vec!["a.test".into(), "*.b.test".into()],
            sni_default: true,
            terminate: None,
        });
        let w = WireService::from_config(&s);
        let line = serde_json::to_string(&w).unwrap();
        assert!(
            line.contains(
                r#""tls":{"mode":"passthrough","sni":["a.test","*.b.test"],"sni_default":true}"#
            ),
            "{line}"
        );
        let back: WireService = serde_json::from_str(&line).unwrap();
        assert_eq!(back.into_config().unwrap().tls, s.tls);

        let bad = |f: &dyn Fn(&mut WireTls)| {
            let mut w = WireService::from_config(&s);
            f(w.tls.as_mut().unwrap());
            w.into_config().unwrap_err().to_string()
        };
        assert!(bad(&|t| t.mode = "terminate".into()).contains("tls mode \"terminate\""));
        assert!(bad(&|t| t.sni.push("A.test.".into())).contains("sni \"a.test\" is listed twice"));
        assert!(bad(&|t| t.sni.push("a..test".into())).contains("invalid sni name"));
        assert!(bad(&|t| {
            t.sni.clear();
            t.sni_default = false;
        })
        .contains("no sni name"));
        let mut w = WireService::from_config(&s);
        w.protocol = "udp".into();
        w.health.check = "none".into();
        assert!(w
            .into_config()
            .unwrap_err()
            .to_string()
            .contains("TCP services only"));
    }

    #[test]
    fn bad_services_are_left_out_with_a_reason() {
        let good = WireService::from_config(&service());
        let mut bad_weight = good.clone();
        bad_weight.name = "w".into();
        bad_weight.backends[0].weight = 5000;
        let mut bad_name = good.clone();
        bad_name.name = "a/b".into();
        let mut bad_balance = good.clone();
        bad_balance.name = "b".into();
        bad_balance.balance = "random".into();
        let mut huge = good.clone();
        huge.name = "h".into();
        huge.idle_timeout_ms = u64::MAX;
        let mut zero = good.clone();
        zero.name = "z".into();
        zero.health.interval_ms = 0;
        let (ok, warnings) = services_from_wire(vec![
            good.clone(),
            bad_weight,
            bad_name,
            bad_balance,
            huge,
            zero,
            good,
        ])
        .unwrap();
        assert_eq!(ok.len(), 1);
        let all = warnings.join("\n");
        for want in [
            "weight 5000",
            "\"a/b\" is not usable",
            "unknown balance \"random\"",
            "idle_timeout",
            "health interval must be greater than zero",
            "listed twice",
        ] {
            assert!(all.contains(want), "missing {want:?} in:\n{all}");
        }
    }

    #[test]
    fn garbage_lines_are_errors_not_panics() {
        for text in [
            "",
            "{}",
            "null",
            r#"{"kind":"state"}"#,
            r#"{"kind":"state","seq":-1,"engine_ok":true,"services":[]}"#,
            r#"{"kind":"state","seq":1,"engine_ok":true,"services":[{"name":"x"}]}"#,
            r#"{"kind":"other"}"#,
            "[1,2,3]",
            "\u{0}\u{1}",
        ] {
            assert!(serde_json::from_str::<Message>(text).is_err(), "{text:?}");
        }
        let hb: Message =
            serde_json::from_str(r#"{"kind":"heartbeat","seq":4,"engine_ok":false}"#).unwrap();
        assert_eq!(
            hb,
            Message::Heartbeat {
                seq: 4,
                engine_ok: false,
                error: None
            }
        );
    }

    #[tokio::test]
    async fn a_subscriber_gets_state_on_change_and_heartbeats() {
        use http_body_util::BodyExt;
        let (tx, rx) = watch::channel(FeedState::default());
        let mut body = subscribe(rx);
        async fn next(b: &mut FeedBody) -> Message {
            let bytes = b.frame().await.unwrap().unwrap().into_data().unwrap();
            serde_json::from_slice::<Message>(&bytes).unwrap()
        }
        // Nothing read yet: heartbeats only, saying the node does not serve.
        assert!(matches!(
            next(&mut body).await,
            Message::Heartbeat {
                engine_ok: false,
                ..
            }
        ));
        tx.send_modify(|f| {
            f.serving = true;
            f.engine_ok = true;
            f.seq = 1;
            f.services = Some(Arc::new(vec![service()]));
        });
        match next(&mut body).await {
            Message::State { seq, services, .. } => {
                assert_eq!(seq, 1);
                assert_eq!(services.len(), 1);
            }
            m => panic!("expected state, got {m:?}"),
        }
        // Unchanged: a heartbeat follows.
        assert!(matches!(
            next(&mut body).await,
            Message::Heartbeat {
                seq: 1,
                engine_ok: true,
                ..
            }
        ));
    }
}
