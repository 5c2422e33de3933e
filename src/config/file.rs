//! The serde mirror of `mesh.toml`.
//!
//! One struct per table, keys spelled exactly as in the file, unknown keys rejected. Every
//! optional key is `Option<Spanned<_>>` so that `validate` can resolve `[defaults]` and still
//! point at the line that set a value. A value with a syntax of its own (a duration, an
//! address, an enum) is read through [`Parsed`], so a bad one fails here, during
//! deserialization, with the span of the value itself. Nothing here checks relations between
//! keys: that is `validate`'s job.

use std::fmt;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::time::Duration;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use toml::Spanned;

use super::duration::parse_duration;
use super::limits;
use super::{
    Balance, CheckKind, DnsTarget, Locality, LogFormat, Protocol, ProxyProtocol, TaskAddress,
};

/// An optional key whose string value has its own syntax.
pub type Key<T> = Option<Spanned<Parsed<T>>>;
/// An optional integer key; `validate` checks its range and names the key.
pub type Int = Option<Spanned<i64>>;
/// `accept_proxy = ["10.0.0.0/8", ...]`: each entry keeps its own span.
pub type CidrList = Option<Spanned<Vec<Spanned<Parsed<ipnet::IpNet>>>>>;

/// The whole file. Every table is optional, but the file must hold something: `validate`
/// refuses a file of nothing but whitespace and comments (a truncated file).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// A top-level key (before any table): this file may leave meshd with no service.
    pub allow_empty: Option<bool>,
    #[serde(default)]
    pub admin: Admin,
    #[serde(default)]
    pub log: Log,
    #[serde(default)]
    pub defaults: Policy,
    #[serde(default, rename = "service", deserialize_with = "service_array")]
    pub services: Vec<Service>,
    #[serde(default)]
    pub discovery: Discovery,
    #[serde(default)]
    pub upgrade: Upgrade,
}

/// `[upgrade]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upgrade {
    pub socket: Option<Spanned<String>>,
    pub timeout: Key<Duration>,
}

/// `[admin]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    pub listen: Key<SocketAddr>,
    pub token_file: Option<Spanned<String>>,
    pub metrics: Option<bool>,
}

/// `[log]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Log {
    pub format: Key<LogFormat>,
    pub access_log: Option<bool>,
}

/// `[defaults]`, and the same keys of one `[[service]]` (see [`Service::policy`]).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub balance: Key<Balance>,
    pub locality: Key<Locality>,
    pub connect_timeout: Key<Duration>,
    pub connect_retries: Int,
    pub hedge_delay: Key<Duration>,
    pub queue_timeout: Key<Duration>,
    pub max_ejection_percent: Int,
    pub retry_on_early_close: Option<Spanned<bool>>,
    pub replay_buffer: Int,
    pub idle_timeout: Key<Duration>,
    pub drain_timeout: Key<Duration>,
    pub slow_start: Key<Duration>,
    pub half_close_timeout: Key<Duration>,
    pub max_connections: Int,
    pub proxy_protocol: Key<ProxyProtocol>,
    pub accept_proxy: CidrList,
    pub client_hello_timeout: Key<Duration>,
    pub backlog: Int,
    pub health: Option<Health>,
    pub udp_idle_timeout: Key<Duration>,
    pub max_flows: Int,
    pub udp_responses: Int,
}

/// `[defaults.health]` and `[service.health]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    pub check: Key<CheckKind>,
    pub path: Key<HealthPath>,
    pub interval: Key<Duration>,
    pub timeout: Key<Duration>,
    pub rise: Int,
    pub fall: Int,
}

/// One `[[service]]`. The policy keys repeat [`Policy`]'s: serde's `flatten` would lose
/// both `deny_unknown_fields` and the spans.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub name: Spanned<Parsed<ServiceName>>,
    #[serde(default, deserialize_with = "listen_list")]
    pub listen: Option<Spanned<ListenList>>,
    #[serde(default, deserialize_with = "backend_list")]
    pub backends: Vec<Backend>,
    pub dns: Key<DnsTarget>,

    pub balance: Key<Balance>,
    pub locality: Key<Locality>,
    pub connect_timeout: Key<Duration>,
    pub connect_retries: Int,
    pub hedge_delay: Key<Duration>,
    pub queue_timeout: Key<Duration>,
    pub max_ejection_percent: Int,
    pub retry_on_early_close: Option<Spanned<bool>>,
    pub replay_buffer: Int,
    pub idle_timeout: Key<Duration>,
    pub drain_timeout: Key<Duration>,
    pub slow_start: Key<Duration>,
    pub half_close_timeout: Key<Duration>,
    pub max_connections: Int,
    pub proxy_protocol: Key<ProxyProtocol>,
    pub accept_proxy: CidrList,
    pub client_hello_timeout: Key<Duration>,
    pub backlog: Int,
    pub health: Option<Health>,
    /// `"tcp"` (default) or `"udp"`; a service's own, never from `[defaults]`.
    pub protocol: Key<Protocol>,
    pub udp_idle_timeout: Key<Duration>,
    pub max_flows: Int,
    pub udp_responses: Int,
    /// `[service.tls]`: SNI routing (a service's own, never from `[defaults]`).
    pub tls: Option<Spanned<Tls>>,
}

/// `[service.tls]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// `"terminate"` (meshd completes the handshake) or `"passthrough"`.
    pub mode: Option<Spanned<String>>,
    /// Termination only: the PEM certificate chain and private key files.
    pub cert: Option<Spanned<String>>,
    pub key: Option<Spanned<String>>,
    /// Termination only: ALPN protocols offered, in preference order.
    pub alpn: Option<Spanned<Vec<Spanned<String>>>>,
    /// Termination only: `"1.2"` (the default) or `"1.3"`.
    pub min_version: Option<Spanned<String>>,
    /// The server names this service answers (`*.example.com`: exactly one label).
    pub sni: Option<Spanned<Vec<Spanned<String>>>>,
    /// Answers connections whose name no service on the address lists (or that send none).
    pub sni_default: Option<Spanned<bool>>,
}

impl Service {
    /// This service's own policy keys, to be resolved against `[defaults]`.
    pub fn policy(&self) -> Policy {
        Policy {
            balance: self.balance.clone(),
            locality: self.locality.clone(),
            connect_timeout: self.connect_timeout.clone(),
            connect_retries: self.connect_retries.clone(),
            hedge_delay: self.hedge_delay.clone(),
            queue_timeout: self.queue_timeout.clone(),
            max_ejection_percent: self.max_ejection_percent.clone(),
            retry_on_early_close: self.retry_on_early_close.clone(),
            replay_buffer: self.replay_buffer.clone(),
            idle_timeout: self.idle_timeout.clone(),
            drain_timeout: self.drain_timeout.clone(),
            slow_start: self.slow_start.clone(),
            half_close_timeout: self.half_close_timeout.clone(),
            max_connections: self.max_connections.clone(),
            proxy_protocol: self.proxy_protocol.clone(),
            accept_proxy: self.accept_proxy.clone(),
            client_hello_timeout: self.client_hello_timeout.clone(),
            backlog: self.backlog.clone(),
            health: self.health.clone(),
            udp_idle_timeout: self.udp_idle_timeout.clone(),
            max_flows: self.max_flows.clone(),
            udp_responses: self.udp_responses.clone(),
        }
    }
}

/// `{ addr = "127.0.0.1:9001", weight = 50 }`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    pub addr: Spanned<Parsed<SocketAddr>>,
    pub weight: Option<Weight>,
    /// Runs on this node (what `locality` prefers).
    pub local: Option<bool>,
}

/// `[discovery]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Discovery {
    pub docker: Option<Docker>,
    pub dns: Option<Dns>,
}

/// `[discovery.docker]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Docker {
    pub endpoint: Key<DockerEndpoint>,
    pub poll_interval: Key<Duration>,
    /// Admin addresses (`HOST:PORT`) of meshd on Swarm managers, followed when the local
    /// engine cannot answer for the swarm (a worker node).
    pub managers: Option<Spanned<Vec<Spanned<String>>>>,
    /// The managers' admin bearer token, for following them.
    pub token_file: Option<Spanned<String>>,
    /// `auto`, `overlay` or `host_port`: which address of a task is dialled.
    pub address: Key<TaskAddress>,
}

/// `[discovery.dns]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dns {
    pub interval: Key<Duration>,
    pub resolver: Key<SocketAddr>,
}

/// The syntax of a string value: what it looks like and how to read it. The error is the
/// whole message (what is wrong and how to fix it) without the position.
pub trait FromValue: Sized {
    /// Completes serde's "invalid type: integer `5`, expected ..." for a non-string value.
    const EXPECTING: &'static str;
    fn from_value(s: &str) -> Result<Self, String>;
}

/// A `T` read from a TOML string by [`FromValue`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsed<T>(pub T);

impl<'de, T: FromValue> Deserialize<'de> for Parsed<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<T: FromValue> Visitor<'_> for V<T> {
            type Value = Parsed<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(T::EXPECTING)
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
                T::from_value(s).map(Parsed).map_err(E::custom)
            }
        }
        d.deserialize_str(V(PhantomData))
    }
}

impl FromValue for Duration {
    const EXPECTING: &'static str = r#"a duration string such as "250ms" or "2s""#;
    fn from_value(s: &str) -> Result<Self, String> {
        parse_duration(s).and_then(limits::duration)
    }
}

impl FromValue for SocketAddr {
    const EXPECTING: &'static str = r#"an address string such as "0.0.0.0:8080""#;
    fn from_value(s: &str) -> Result<Self, String> {
        match s.parse::<SocketAddr>() {
            Ok(a) if a.port() == 0 => Err(format!(
                "invalid address {s:?}: port 0 is not allowed, use a port in 1..=65535"
            )),
            Ok(a) => Ok(a),
            Err(_) => Err(format!(
                r#"invalid address {s:?}: expected IP:PORT, e.g. "0.0.0.0:8080" or "[::]:8080""#
            )),
        }
    }
}

/// Reads one of a fixed set of keywords.
fn keyword<T: Copy>(what: &str, s: &str, table: &[(&str, T)]) -> Result<T, String> {
    table
        .iter()
        .find(|(k, _)| *k == s)
        .map(|&(_, v)| v)
        .ok_or_else(|| {
            let names: Vec<String> = table.iter().map(|(k, _)| format!("{k:?}")).collect();
            format!("invalid {what} {s:?}: use one of {}", names.join(", "))
        })
}

impl FromValue for Balance {
    const EXPECTING: &'static str = r#"one of "round_robin", "least_conn", "p2c", "maglev""#;
    fn from_value(s: &str) -> Result<Self, String> {
        keyword("balance", s, &limits::BALANCES)
    }
}

impl FromValue for Locality {
    const EXPECTING: &'static str = r#"one of "any", "prefer_local", "local_only""#;
    fn from_value(s: &str) -> Result<Self, String> {
        keyword("locality", s, &limits::LOCALITIES)
    }
}

impl FromValue for ProxyProtocol {
    const EXPECTING: &'static str = r#"one of "off", "v1", "v2""#;
    fn from_value(s: &str) -> Result<Self, String> {
        keyword("proxy_protocol", s, &limits::PROXY_PROTOCOLS)
    }
}

impl FromValue for ipnet::IpNet {
    const EXPECTING: &'static str = r#"a CIDR string such as "10.0.0.0/8""#;
    fn from_value(s: &str) -> Result<Self, String> {
        limits::cidr(s)
    }
}

impl FromValue for Protocol {
    const EXPECTING: &'static str = r#"one of "tcp", "udp""#;
    fn from_value(s: &str) -> Result<Self, String> {
        keyword("protocol", s, &limits::PROTOCOLS)
    }
}

impl FromValue for CheckKind {
    const EXPECTING: &'static str = r#"one of "none", "tcp", "http""#;
    fn from_value(s: &str) -> Result<Self, String> {
        keyword("health check", s, &limits::CHECKS)
    }
}

impl FromValue for LogFormat {
    const EXPECTING: &'static str = r#"one of "human", "json""#;
    fn from_value(s: &str) -> Result<Self, String> {
        keyword("log format", s, &limits::LOG_FORMATS)
    }
}

impl FromValue for DnsTarget {
    const EXPECTING: &'static str = r#"a "NAME:PORT" string such as "tasks.web:80""#;
    fn from_value(s: &str) -> Result<Self, String> {
        let invalid =
            || format!(r#"invalid dns target {s:?}: expected NAME:PORT, e.g. "tasks.web:80""#);
        let (name, port) = s.rsplit_once(':').ok_or_else(invalid)?;
        let port: u16 = port.parse().map_err(|_| invalid())?;
        let name_ok = !name.is_empty()
            && name.len() <= 253
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
        if !name_ok || port == 0 {
            return Err(invalid());
        }
        Ok(DnsTarget {
            name: name.to_owned(),
            port,
        })
    }
}

/// A service name: it becomes a metric label and a URL path segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceName(pub String);

impl FromValue for ServiceName {
    const EXPECTING: &'static str = r#"a name string such as "web""#;
    fn from_value(s: &str) -> Result<Self, String> {
        limits::service_name(s)?;
        Ok(ServiceName(s.to_owned()))
    }
}

/// The path of an HTTP health check: it goes into the request line as is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthPath(pub String);

impl FromValue for HealthPath {
    const EXPECTING: &'static str = r#"a path string such as "/healthz""#;
    fn from_value(s: &str) -> Result<Self, String> {
        limits::health_path(s)?;
        Ok(HealthPath(s.to_owned()))
    }
}

/// Where the Docker Engine API is: a unix socket or a plain-HTTP (socket proxy) address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerEndpoint(pub String);

impl FromValue for DockerEndpoint {
    const EXPECTING: &'static str = r#"an endpoint string such as "unix:///var/run/docker.sock""#;
    fn from_value(s: &str) -> Result<Self, String> {
        let ok = match (s.strip_prefix("unix://"), s.strip_prefix("http://")) {
            (Some(path), _) => path.len() > 1 && path.starts_with('/'),
            (_, Some(host)) => !host.is_empty() && !host.starts_with('/'),
            _ => false,
        };
        if ok {
            Ok(DockerEndpoint(s.to_owned()))
        } else {
            Err(format!(
                r#"invalid docker endpoint {s:?}: use "unix:///var/run/docker.sock" or "http://HOST:PORT" (e.g. a read-only socket proxy)"#
            ))
        }
    }
}

impl FromValue for TaskAddress {
    const EXPECTING: &'static str = r#"one of "auto", "overlay", "host_port""#;
    fn from_value(s: &str) -> Result<Self, String> {
        TaskAddress::parse(s).ok_or_else(|| {
            format!(
                r#"invalid address mode {s:?}: use "auto" (overlay when meshd shares a network with the task, else its host-mode published port), "overlay" or "host_port""#
            )
        })
    }
}

/// A backend weight, 0..=1000.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Weight(pub u32);

impl<'de> Deserialize<'de> for Weight {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let w = i64::deserialize(d)?;
        limits::WEIGHT
            .check(w)
            .map(Weight)
            .map_err(de::Error::custom)
    }
}

/// `listen = ["0.0.0.0:8080", "[::]:8080"]`, or one address: `listen = "0.0.0.0:8080"`.
/// Each address keeps its own span (a single string: the string's).
#[derive(Debug)]
pub struct ListenList(pub Vec<Spanned<Parsed<SocketAddr>>>);

/// What the file says for `listen`, before the single-string form gets its span.
enum ListenRaw {
    One(Parsed<SocketAddr>),
    Many(Vec<Spanned<Parsed<SocketAddr>>>),
}

impl<'de> Deserialize<'de> for ListenRaw {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ListenRaw;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#"an address such as "0.0.0.0:8080", or an array of them"#)
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
                SocketAddr::from_value(s)
                    .map(|a| ListenRaw::One(Parsed(a)))
                    .map_err(E::custom)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut addrs = Vec::new();
                while let Some(a) = seq.next_element()? {
                    addrs.push(a);
                }
                Ok(ListenRaw::Many(addrs))
            }
        }
        d.deserialize_any(V)
    }
}

fn listen_list<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Spanned<ListenList>>, D::Error> {
    let raw = Spanned::<ListenRaw>::deserialize(d)?;
    let span = raw.span();
    let list = match raw.into_inner() {
        ListenRaw::One(a) => vec![Spanned::new(span.clone(), a)],
        ListenRaw::Many(v) => v,
    };
    Ok(Some(Spanned::new(span, ListenList(list))))
}

/// One entry of `backends`: a table, or the shorthand `"127.0.0.1:9001"` (the default
/// weight). Both may be mixed in one array.
enum BackendRaw {
    Addr(Parsed<SocketAddr>),
    Table(Backend),
}

impl<'de> Deserialize<'de> for BackendRaw {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = BackendRaw;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    r#"an address such as "127.0.0.1:9001" or a table such as { addr = "127.0.0.1:9001", weight = 100 }"#,
                )
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
                SocketAddr::from_value(s)
                    .map(|a| BackendRaw::Addr(Parsed(a)))
                    .map_err(E::custom)
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                Backend::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(BackendRaw::Table)
            }
        }
        d.deserialize_any(V)
    }
}

/// `backends = [...]`: each shorthand string becomes `{ addr = "..." }` with its own span.
fn backend_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Backend>, D::Error> {
    let raw = Vec::<Spanned<BackendRaw>>::deserialize(d)?;
    Ok(raw
        .into_iter()
        .map(|b| {
            let span = b.span();
            match b.into_inner() {
                BackendRaw::Addr(a) => Backend {
                    addr: Spanned::new(span, a),
                    weight: None,
                    local: None,
                },
                BackendRaw::Table(t) => t,
            }
        })
        .collect())
}

/// `[[service]]` is an array of tables; `[service]` (single brackets) is the common mistake.
fn service_array<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Service>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Vec<Service>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an array of tables: write each service as [[service]] (double brackets)")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut services = Vec::new();
            while let Some(s) = seq.next_element()? {
                services.push(s);
            }
            Ok(services)
        }
    }
    d.deserialize_seq(V)
}
