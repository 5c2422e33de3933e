//! Configuration: `mesh.toml` -> [`Config`].
//!
//! The pipeline is `file text -> file::FileConfig (serde mirror, spans) -> validate -> Config`.
//! Only `validate` converts; everything downstream sees validated types (Durations,
//! SocketAddrs, enums) and never a raw string. Every error a user can cause is one
//! [`ConfigError`] whose `Display` is `FILE:LINE:COL: what is wrong and how to fix it`.
//!
//! Invariant: this module does no network I/O. It reads the config file and, when
//! `token_file` is set, the token file, and a terminating service's `cert` and `key`.

mod duration;
mod file;
pub mod limits;
pub mod tls;
mod validate;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use duration::{format_duration, parse_duration};
pub use validate::ConfigError;

/// Default values, documented in one place (docs/configuration.md lists each).
pub mod defaults {
    use std::time::Duration;
    pub const ADMIN_LISTEN: &str = "127.0.0.1:9901";
    /// One connect attempt's bound. Longer than Linux's first SYN retransmission (1 s), so a
    /// SYN dropped by a busy task's full listen queue is retried by the kernel instead of
    /// failing the attempt; hedging (`HEDGE_DELAY`) keeps the client's wait short meanwhile.
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
    /// A second connect to another backend starts when the first has not completed after
    /// this long (a dropped SYN would otherwise cost the client a 1 s retransmission).
    pub const HEDGE_DELAY: Duration = Duration::from_millis(200);
    /// How long a connection that no backend took waits for one (HAProxy's `timeout
    /// queue`, which defaults to `timeout connect`): covers a rollout's moment with no
    /// task accepting (Swarm stops every old task before a rollback starts new ones).
    pub const QUEUE_TIMEOUT: Duration = Duration::from_secs(5);
    /// How long a connection from an `accept_proxy` source has to send its PROXY header
    /// (and, with SNI routing, its ClientHello): a sender that stalls holds nothing longer.
    pub const CLIENT_HELLO_TIMEOUT: Duration = Duration::from_secs(5);
    /// Passive ejection never takes more than this share of a service's backends out.
    pub const MAX_EJECTION_PERCENT: u32 = 50;
    /// Client bytes kept for a replay on early close (`retry_on_early_close`).
    pub const REPLAY_BUFFER: u32 = 16 * 1024;
    pub const MAX_REPLAY_BUFFER: u32 = 1024 * 1024;
    pub const CONNECT_RETRIES: u32 = 2;
    /// Upper bound for `connect_retries`: the set of tried backends lives on the stack.
    pub const MAX_CONNECT_RETRIES: u32 = 16;
    /// How long a new process has to take the listeners over and say it is ready.
    pub const UPGRADE_TIMEOUT: Duration = Duration::from_secs(60);
    pub const IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
    pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
    pub const SLOW_START: Duration = Duration::ZERO;
    pub const HALF_CLOSE_TIMEOUT: Duration = Duration::from_secs(30);
    pub const BACKLOG: u32 = 1024;
    pub const WEIGHT: u32 = 100;
    pub const MAX_WEIGHT: u32 = 1000;
    /// Keepalive idle time on both sockets: well under the 900 s after which IPVS and many
    /// middleboxes silently forget a flow.
    pub const TCP_KEEPALIVE: Duration = Duration::from_secs(60);
    pub const HEALTH_INTERVAL: Duration = Duration::from_secs(1);
    pub const HEALTH_TIMEOUT: Duration = Duration::from_millis(500);
    pub const HEALTH_RISE: u32 = 2;
    pub const HEALTH_FALL: u32 = 2;
    pub const HEALTH_PATH: &str = "/healthz";
    pub const DOCKER_ENDPOINT: &str = "unix:///var/run/docker.sock";
    pub const DOCKER_POLL_INTERVAL: Duration = Duration::from_millis(500);
    pub const DNS_INTERVAL: Duration = Duration::from_secs(1);
    /// A UDP flow with no datagram either way for this long ends (its socket is closed).
    /// Sōzu's default and Linux conntrack's `nf_conntrack_udp_timeout`: a client silent
    /// for longer has been forgotten by the NATs on its path anyway. (nginx's 10 min
    /// `proxy_timeout` would hold a descriptor per client address for 10 min.)
    pub const UDP_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
    /// Flows (one connected socket, so one descriptor, each) a UDP service keeps at once.
    pub const MAX_FLOWS: u32 = 65536;
    /// The largest `max_flows`: 2^20, the open-files limit meshd raises itself to.
    pub const MAX_MAX_FLOWS: u32 = 1 << 20;
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Where it was read from: error messages and reloads name this file.
    pub path: PathBuf,
    pub admin: AdminConfig,
    pub log: LogConfig,
    /// `[defaults]` resolved into a service template (empty name, listen and backends):
    /// what a service created by discovery starts from.
    pub defaults: ServiceConfig,
    /// In file order. Names and listen addresses are unique (validated).
    pub services: Vec<ServiceConfig>,
    pub discovery: DiscoveryConfig,
    /// Top-level `allow_empty = true`: a reload to this file may remove every running
    /// service. Without it, a reload that would leave no service while some run is refused
    /// (a file rewritten in place is empty, or half-written, for a moment).
    pub allow_empty: bool,
    pub upgrade: UpgradeConfig,
}

/// `[upgrade]`: how this meshd hands its listeners to a new one.
#[derive(Debug, Clone, PartialEq)]
pub struct UpgradeConfig {
    /// A UNIX socket this meshd serves hand-offs on for as long as it runs, and that a
    /// meshd starting with the same setting tries first (a start-first container update).
    /// `None`: hand-offs go through a private socket made for each `meshd upgrade`.
    pub socket: Option<PathBuf>,
    /// How long a new process may take to say it is ready.
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// The bearer token read from `token_file` (trimmed). `None`: mutations are open,
    /// which validation allows only on a loopback address.
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    /// `[admin] metrics = false` turns the Prometheus exporter off (no recorder is
    /// installed; /metrics answers 404). For measuring what metrics cost.
    pub metrics: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    pub format: LogFormat,
    /// One structured line per closed connection at info level (off by default).
    pub access_log: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Balance {
    RoundRobin,
    LeastConn,
    P2c,
    Maglev,
}

/// `protocol`: what a service's listeners carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Protocol {
    /// TCP connections (the default).
    #[default]
    Tcp,
    /// UDP datagrams, grouped into flows by client address.
    Udp,
}

/// The settings of a `protocol = "udp"` service (kept, unused, by a TCP service).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpConfig {
    /// `udp_idle_timeout`: a flow with no datagram either way for this long ends.
    pub idle_timeout: Duration,
    /// `max_flows`: flows kept at once; datagrams that would start another are dropped.
    pub max_flows: u32,
    /// `udp_responses`: a flow ends after this many replies (0: any number).
    pub responses: u32,
}

impl Default for UdpConfig {
    fn default() -> UdpConfig {
        UdpConfig {
            idle_timeout: defaults::UDP_IDLE_TIMEOUT,
            max_flows: defaults::MAX_FLOWS,
            responses: 0,
        }
    }
}

/// `locality`: which backends a service's connections go to, by node (DESIGN.md
/// "Locality").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Locality {
    /// Every healthy backend, wherever it runs (Swarm's own mesh).
    #[default]
    Any,
    /// This node's healthy backends, unless fewer than half of this node's backends of the
    /// service are healthy (or none is): then every healthy backend.
    PreferLocal,
    /// Only this node's backends; with none healthy, a connection is refused.
    LocalOnly,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyProtocol {
    Off,
    V1,
    V2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckKind {
    None,
    Tcp,
    Http,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HealthConfig {
    pub check: CheckKind,
    /// HTTP path, starts with '/'.
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BackendConfig {
    pub addr: SocketAddr,
    /// 0..=1000; 0 means "no new connections".
    pub weight: u32,
    /// What the backend is, beyond its address: the Swarm task ID for a backend found by
    /// Docker discovery (Swarm reuses a stopped task's overlay address for a new task, and
    /// the new task must not inherit the old one's health, ejection or back-off). `None`
    /// for `mesh.toml`, static and DNS backends: their address is their identity.
    pub id: Option<std::sync::Arc<str>>,
    /// The Swarm node the task runs on (Docker discovery), carried to followers so each
    /// node can tell its own tasks; `None` for other backends.
    pub node: Option<std::sync::Arc<str>>,
    /// Runs on this node (`local = true` in `mesh.toml`, or a task on this meshd's Swarm
    /// node): what `locality` prefers.
    pub local: bool,
}

/// One service: its published ports, its policy, its static backends.
/// Every `[defaults]` key is resolved into each service here.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceConfig {
    pub name: String,
    pub listen: Vec<SocketAddr>,
    /// `protocol`: TCP (default) or UDP. Listen addresses are unique per protocol.
    pub protocol: Protocol,
    /// `udp_idle_timeout`, `max_flows`, `udp_responses` (used by UDP services only).
    pub udp: UdpConfig,
    pub balance: Balance,
    /// `locality`: this node's backends first, only, or no preference.
    pub locality: Locality,
    pub connect_timeout: Duration,
    pub connect_retries: u32,
    /// Start a second connect to another backend after this long without an answer; zero
    /// turns hedging off.
    pub hedge_delay: Duration,
    /// A connection that no backend took (none listed, every one refused) waits up to this
    /// long for one, trying again as the table changes; zero closes it at once.
    pub queue_timeout: Duration,
    /// 0..=100: the most of this service's backends passive ejection takes out at once.
    pub max_ejection_percent: u32,
    /// Replay a connection on another backend when its backend closes or resets it before
    /// sending a byte (opt-in: the backend may have acted on what it received).
    pub retry_on_early_close: bool,
    /// The most client bytes kept for such a replay; past it the connection is not replayed.
    pub replay_buffer: u32,
    pub idle_timeout: Duration,
    pub drain_timeout: Duration,
    pub slow_start: Duration,
    pub half_close_timeout: Duration,
    /// 0 = unlimited.
    pub max_connections: u32,
    pub proxy_protocol: ProxyProtocol,
    /// `accept_proxy`: connections from these sources must start with a PROXY v1/v2
    /// header, whose client address then stands for the connection's. Empty: none.
    pub accept_proxy: Vec<ipnet::IpNet>,
    /// How long such a connection has to send its header.
    pub client_hello_timeout: Duration,
    pub backlog: u32,
    pub backends: Vec<BackendConfig>,
    /// `dns = "tasks.web:80"`: the name's A/AAAA records (re-resolved every
    /// `[discovery.dns] interval`) become backends on that port.
    pub dns: Option<DnsTarget>,
    pub health: HealthConfig,
    /// `[service.tls]`: the service is routed by the ClientHello's server name (TLS
    /// passthrough or termination); several such services may share a listen address.
    pub tls: Option<TlsConfig>,
}

/// `[service.tls]`: SNI routing, and with `mode = "terminate"` the TLS server meshd runs
/// for the service.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsConfig {
    /// Normalised names (lowercase, no trailing dot); `*.example.com` matches exactly one
    /// label.
    pub sni: Vec<String>,
    /// Takes the connections of its listen addresses that no service's `sni` matches,
    /// and those that send no server name.
    pub sni_default: bool,
    /// `mode = "terminate"`: meshd completes the handshake with this certificate and
    /// forwards plaintext. `None`: passthrough (the backend terminates TLS).
    pub terminate: Option<std::sync::Arc<tls::Terminate>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsTarget {
    pub name: String,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct DiscoveryConfig {
    pub docker: Option<DockerDiscoveryConfig>,
    pub dns: Option<DnsDiscoveryConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DockerDiscoveryConfig {
    /// `unix:///var/run/docker.sock` or `http://host:port` (a read-only socket proxy).
    pub endpoint: String,
    pub poll_interval: Duration,
    /// `HOST:PORT` admin addresses of meshd on Swarm managers. Empty: this node reads its
    /// own engine only. Otherwise, whenever the local engine cannot answer for the swarm
    /// (a worker, no socket), meshd follows the desired state these managers serve.
    pub managers: Vec<String>,
    /// The bearer token the managers' admin API expects (read from `token_file`).
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    /// Which address of a task meshd dials (`address`).
    pub address: TaskAddress,
}

/// `[discovery.docker] address`: how meshd reaches a Swarm task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TaskAddress {
    /// The overlay address on a network meshd shares with the task; else the task's
    /// host-mode published port on its node; else (meshd cannot tell its own networks) the
    /// task's only non-ingress overlay address.
    #[default]
    Auto,
    /// Only the overlay address (meshd shares an overlay network with the tasks).
    Overlay,
    /// Only `NodeAddr:PublishedPort` of a host-mode publish of the target port (meshd on the
    /// host network, tasks published `mode=host`).
    HostPort,
}

impl TaskAddress {
    /// Every value with its name in mesh.toml.
    pub const NAMES: [(TaskAddress, &'static str); 3] = [
        (TaskAddress::Auto, "auto"),
        (TaskAddress::Overlay, "overlay"),
        (TaskAddress::HostPort, "host_port"),
    ];

    pub fn name(self) -> &'static str {
        Self::NAMES
            .iter()
            .find(|(v, _)| *v == self)
            .map_or("auto", |(_, n)| n)
    }

    pub fn parse(s: &str) -> Option<TaskAddress> {
        Self::NAMES.iter().find(|(_, n)| *n == s).map(|(v, _)| *v)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct DnsDiscoveryConfig {
    pub interval: Duration,
    /// `None`: the system resolver configuration (/etc/resolv.conf).
    pub resolver: Option<SocketAddr>,
}

impl Config {
    /// Reads and validates `path`. The error's `Display` is one line naming the file,
    /// line and column.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::io(path, &e))?;
        Config::parse(path, &text)
    }

    /// Validates `text` as if it had been read from `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        validate::validate(path, text)
    }

    /// The longest `drain_timeout` of any service: how long a graceful shutdown may take.
    pub fn max_drain_timeout(&self) -> Duration {
        self.services
            .iter()
            .map(|s| s.drain_timeout)
            .max()
            .unwrap_or(defaults::DRAIN_TIMEOUT)
    }
}
