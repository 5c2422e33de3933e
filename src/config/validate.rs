//! Validation: `mesh.toml` text -> [`Config`], or the first problem as one [`ConfigError`].
//!
//! `file` has already rejected malformed values (each at its own span); this module checks
//! what needs more than one value: ranges that name their key, `[defaults]` resolution,
//! unique names, overlapping listen addresses, services that could never get a backend,
//! the admin token. Each error points at the key or value at fault and says how to fix it.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

use super::duration::format_duration as fmt_duration;
use super::file::{self, FileConfig};
use super::limits::{self, DurationKey, IntKey};
use super::tls::{LoadError, Terminate, TlsVersion};
use super::{
    defaults, AdminConfig, BackendConfig, Balance, CheckKind, Config, DiscoveryConfig,
    DnsDiscoveryConfig, DockerDiscoveryConfig, HealthConfig, Locality, LogConfig, LogFormat,
    Protocol, ProxyProtocol, ServiceConfig, TaskAddress, TlsConfig, UdpConfig, UpgradeConfig,
};

/// A configuration that cannot be used. `Display` is one line: `FILE:LINE:COL: message`
/// (`FILE: cannot read: ...` when the file itself cannot be read).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("{}: cannot read: {message}", path.display())]
    Io {
        path: PathBuf,
        kind: io::ErrorKind,
        message: String,
    },
    /// The file holds nothing but whitespace and comments: refused rather than taken for a
    /// configuration without services (a file being rewritten in place is empty for a
    /// moment).
    #[error(
        "{}: the file is empty (nothing but whitespace or comments; truncated, or not \
         written yet?): write the configuration into it",
        path.display()
    )]
    Empty { path: PathBuf },
    /// The file's content is wrong at `line:col` (both 1-based, the column in characters).
    #[error("{}:{line}:{col}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        line: usize,
        col: usize,
        message: String,
    },
}

impl ConfigError {
    /// `path` could not be read.
    pub fn io(path: &Path, err: &io::Error) -> ConfigError {
        ConfigError::Io {
            path: path.to_owned(),
            kind: err.kind(),
            message: err.to_string(),
        }
    }

    /// 1-based line and column (in characters) of the fault; `None` for an I/O error.
    pub fn line_col(&self) -> Option<(usize, usize)> {
        match self {
            ConfigError::Io { .. } | ConfigError::Empty { .. } => None,
            ConfigError::Invalid { line, col, .. } => Some((*line, *col)),
        }
    }

    /// The config file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            ConfigError::Io { path, .. }
            | ConfigError::Empty { path }
            | ConfigError::Invalid { path, .. } => path,
        }
    }

    /// What is wrong and how to fix it, without the file and position.
    pub fn message(&self) -> &str {
        match self {
            ConfigError::Io { message, .. } | ConfigError::Invalid { message, .. } => message,
            ConfigError::Empty { .. } => "the file is empty (only whitespace or comments)",
        }
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = before.matches('\n').count() + 1;
    (line, before[line_start..].chars().count() + 1)
}

/// The file being validated: turns spans into positioned errors.
struct Cx<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Cx<'_> {
    fn err(&self, span: Range<usize>, message: impl Into<String>) -> ConfigError {
        let (line, col) = line_col(self.text, span.start);
        ConfigError::Invalid {
            path: self.path.to_owned(),
            line,
            col,
            message: message.into(),
        }
    }

    fn line(&self, span: Range<usize>) -> usize {
        line_col(self.text, span.start).0
    }

    /// A syntax, type or unknown-key error from `toml`, made one line (no snippet).
    fn toml(&self, e: &toml::de::Error) -> ConfigError {
        let lines: Vec<&str> = e
            .message()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        let message = match lines.join(": ") {
            m if m.is_empty() => "invalid TOML syntax".to_owned(),
            m => m,
        };
        self.err(e.span().unwrap_or(0..0), message)
    }
}

/// The whole pipeline: text -> [`FileConfig`] -> [`Config`].
pub(super) fn validate(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let cx = Cx { path, text };
    let file: FileConfig = toml::from_str(text).map_err(|e| cx.toml(&e))?;
    if is_blank(text) {
        return Err(ConfigError::Empty {
            path: path.to_owned(),
        });
    }

    let admin = admin(&cx, &file.admin)?;
    let log = LogConfig {
        format: value(file.log.format.as_ref(), LogFormat::Human),
        access_log: file.log.access_log.unwrap_or(false),
    };
    // `[defaults]` on its own: a bad default is an error even where every service overrides
    // it. Kept as the template for services that discovery creates.
    let d = resolve(&cx, &file::Policy::default(), &file.defaults)?;
    let defaults = ServiceConfig {
        name: String::new(),
        listen: Vec::new(),
        protocol: Protocol::Tcp,
        udp: d.udp,
        balance: d.balance,
        locality: d.locality,
        connect_timeout: d.connect_timeout,
        connect_retries: d.connect_retries,
        hedge_delay: d.hedge_delay,
        queue_timeout: d.queue_timeout,
        max_ejection_percent: d.max_ejection_percent,
        retry_on_early_close: d.retry_on_early_close,
        replay_buffer: d.replay_buffer,
        idle_timeout: d.idle_timeout,
        drain_timeout: d.drain_timeout,
        slow_start: d.slow_start,
        half_close_timeout: d.half_close_timeout,
        max_connections: d.max_connections,
        proxy_protocol: d.proxy_protocol,
        accept_proxy: d.accept_proxy,
        client_hello_timeout: d.client_hello_timeout,
        backlog: d.backlog,
        backends: Vec::new(),
        dns: None,
        health: d.health,
        tls: None,
    };

    let mut seen = Seen {
        names: HashMap::new(),
        binds: vec![(admin.listen, Protocol::Tcp, Owner::Admin)],
        sni: HashMap::new(),
    };
    let has_docker = file.discovery.docker.is_some();
    let services = file
        .services
        .iter()
        .map(|s| service(&cx, s, &file.defaults, has_docker, &mut seen))
        .collect::<Result<Vec<_>, _>>()?;
    let uses_dns = services.iter().any(|s| s.dns.is_some());
    let discovery = discovery(&cx, &file.discovery, uses_dns)?;
    let upgrade = upgrade(&cx, &file.upgrade)?;

    Ok(Config {
        path: path.to_owned(),
        admin,
        log,
        defaults,
        services,
        discovery,
        allow_empty: file.allow_empty.unwrap_or(false),
        upgrade,
    })
}

fn upgrade(cx: &Cx, u: &file::Upgrade) -> Result<UpgradeConfig, ConfigError> {
    let socket = match &u.socket {
        None => None,
        Some(s) => {
            let p = PathBuf::from(s.get_ref());
            if !p.is_absolute() || s.get_ref().len() > 100 {
                let msg = format!(
                    "upgrade socket {:?} must be an absolute path of at most 100 bytes (a UNIX socket address), e.g. \"/run/meshd/upgrade.sock\"",
                    s.get_ref()
                );
                return Err(cx.err(s.span(), msg));
            }
            Some(p)
        }
    };
    let timeout = positive(cx, "timeout", u.timeout.as_ref(), defaults::UPGRADE_TIMEOUT)?;
    Ok(UpgradeConfig { socket, timeout })
}

/// Valid TOML with nothing in it: every line blank or a comment. (Checked after parsing, so
/// a line that only looks blank, or a comment inside a multi-line string, is never
/// mistaken: the parser has seen the text first.)
fn is_blank(text: &str) -> bool {
    text.lines().all(|l| {
        let l = l.trim_matches([' ', '\t', '\r', '\u{feff}']);
        l.is_empty() || l.starts_with('#')
    })
}

fn admin(cx: &Cx, a: &file::Admin) -> Result<AdminConfig, ConfigError> {
    let listen = match &a.listen {
        Some(l) => l.get_ref().0,
        None => defaults::ADMIN_LISTEN
            .parse()
            .expect("defaults::ADMIN_LISTEN is a valid address"),
    };
    let Some(token_file) = &a.token_file else {
        if let Some(l) = &a.listen {
            if !listen.ip().to_canonical().is_loopback() {
                let msg = format!(
                    "admin listen {listen} is not a loopback address and no token_file is set: \
                     set [admin] token_file, or listen on 127.0.0.1"
                );
                return Err(cx.err(l.span(), msg));
            }
        }
        return Ok(AdminConfig {
            listen,
            token: None,
            token_file: None,
            metrics: a.metrics.unwrap_or(true),
        });
    };
    let (token, path) = read_token(cx, token_file, "the admin bearer token")?;
    Ok(AdminConfig {
        listen,
        token: Some(token),
        token_file: Some(path),
        metrics: a.metrics.unwrap_or(true),
    })
}

/// The largest token file read: a token is a line, not a file to load into memory (a path
/// pointing at a log or a device by mistake is refused, not read to its end).
const MAX_TOKEN_FILE: u64 = 4096;

/// Reads a bearer token from `file` (relative to the config file, not to whatever directory
/// meshd was started in): trimmed, not empty, at most [`MAX_TOKEN_FILE`] bytes.
fn read_token(
    cx: &Cx,
    file: &Spanned<String>,
    what: &str,
) -> Result<(String, PathBuf), ConfigError> {
    let dir = cx.path.parent().unwrap_or(Path::new(""));
    let path = dir.join(file.get_ref());
    let shown = path.display();
    let read = || -> std::io::Result<String> {
        use std::io::Read;
        let mut s = String::new();
        std::fs::File::open(&path)?
            .take(MAX_TOKEN_FILE + 1)
            .read_to_string(&mut s)?;
        Ok(s)
    };
    let token = read().map_err(|e| {
        cx.err(
            file.span(),
            format!("token_file \"{shown}\": cannot read: {e}"),
        )
    })?;
    if token.len() as u64 > MAX_TOKEN_FILE {
        let msg = format!(
            "token_file \"{shown}\" is larger than {MAX_TOKEN_FILE} bytes: it should hold {what} alone"
        );
        return Err(cx.err(file.span(), msg));
    }
    let token = token.trim();
    if token.is_empty() {
        let msg = format!("token_file \"{shown}\" is empty: write {what} into it");
        return Err(cx.err(file.span(), msg));
    }
    Ok((token.to_owned(), path))
}

/// Who binds an address already.
enum Owner<'f> {
    Admin,
    Service(&'f str),
}

/// What earlier services claimed: names (with their offset) and listen addresses (a TCP
/// and a UDP listener may share an address: DNS serves both on port 53).
struct Seen<'f> {
    names: HashMap<&'f str, usize>,
    binds: Vec<(SocketAddr, Protocol, Owner<'f>)>,
    /// Addresses of `[service.tls]` services: who shares each.
    sni: HashMap<SocketAddr, SniGroup<'f>>,
}

/// The `[service.tls]` services on one listen address so far.
struct SniGroup<'f> {
    /// The first service, whose `accept_proxy` and `client_hello_timeout` the others must
    /// repeat (both apply before the name, and so the service, is known).
    first: &'f str,
    accept_proxy: Vec<ipnet::IpNet>,
    client_hello_timeout: Duration,
    /// Each name listed on the address, with its service.
    names: HashMap<String, &'f str>,
    default: Option<&'f str>,
}

/// Two binds collide: the same port and family, and the same IP or a wildcard on either side.
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

fn conflict(name: &str, addr: SocketAddr, prev: SocketAddr, owner: &Owner) -> String {
    const WILDCARD: &str = "a wildcard address takes the port on every address";
    let other = match owner {
        Owner::Admin => "[admin] listen".to_owned(),
        Owner::Service(n) if *n == name => {
            return if prev == addr {
                format!("service {name:?}: listen {addr} is listed twice: remove one")
            } else {
                format!("service {name:?}: listen {addr} overlaps its own {prev}: {WILDCARD}, keep only one of them")
            };
        }
        Owner::Service(n) => format!("service {n:?}"),
    };
    if prev == addr {
        format!(
            "service {name:?}: listen {addr} is already used by {other}{}",
            match owner {
                Owner::Service(_) =>
                    "; services may share a listen address only when each has [service.tls] with sni (TLS passthrough routed by server name)",
                Owner::Admin => "",
            }
        )
    } else {
        format!("service {name:?}: listen {addr} overlaps {prev} of {other}: {WILDCARD}, use another port")
    }
}

fn service<'f>(
    cx: &Cx,
    s: &'f file::Service,
    def: &file::Policy,
    has_docker: bool,
    seen: &mut Seen<'f>,
) -> Result<ServiceConfig, ConfigError> {
    let name = s.name.get_ref().0 .0.as_str();
    // The first definition's offset; its line is counted only for the error (counting it
    // for every service made validation O(services × file size)).
    if let Some(first) = seen.names.insert(name, s.name.span().start) {
        let first = cx.line(first..first);
        let msg = format!(
            "service {name:?} is defined twice (first at line {first}): service names must be unique"
        );
        return Err(cx.err(s.name.span(), msg));
    }

    let addrs = match &s.listen {
        Some(l) if !l.get_ref().0.is_empty() => &l.get_ref().0,
        other => {
            let span = other.as_ref().map_or(s.name.span(), Spanned::span);
            let msg =
                format!(r#"service {name:?} has no listen address: add listen = ["0.0.0.0:8080"]"#);
            return Err(cx.err(span, msg));
        }
    };
    if addrs.len() > limits::MAX_LISTEN {
        let span = s.listen.as_ref().map_or(s.name.span(), Spanned::span);
        let msg = format!(
            "service {name:?} has {} listen addresses: use at most {}",
            addrs.len(),
            limits::MAX_LISTEN
        );
        return Err(cx.err(span, msg));
    }
    let protocol = value(s.protocol.as_ref(), Protocol::Tcp);
    let tls = tls(cx, name, s, protocol)?;
    let mut listen = Vec::with_capacity(addrs.len());
    for a in addrs {
        let addr = a.get_ref().0;
        if let Some((prev, _, owner)) = seen
            .binds
            .iter()
            .find(|(b, p, _)| *p == protocol && overlaps(*b, addr))
        {
            // TLS services routed by name share one address (checked once resolved).
            let shared = *prev == addr
                && tls.is_some()
                && seen.sni.contains_key(&addr)
                && !listen.contains(&addr);
            if !shared {
                return Err(cx.err(a.span(), conflict(name, addr, *prev, owner)));
            }
        } else {
            seen.binds.push((addr, protocol, Owner::Service(name)));
            if tls.is_some() {
                seen.sni.insert(
                    addr,
                    SniGroup {
                        first: name,
                        accept_proxy: Vec::new(),
                        client_hello_timeout: Duration::ZERO,
                        names: HashMap::new(),
                        default: None,
                    },
                );
            }
        }
        listen.push(addr);
    }
    protocol_keys(cx, name, s, protocol)?;

    let mut policy = resolve(cx, &s.policy(), def)?;
    if protocol == Protocol::Udp {
        // `[defaults.health] check` is for TCP services (an "http" default would not
        // apply); a UDP service checks only if it asks, with a TCP connect.
        let own = s.health.as_ref().and_then(|h| h.check.as_ref());
        policy.health.check = match own {
            None => CheckKind::None,
            Some(k) if limits::UDP_CHECKS.contains(&k.get_ref().0) => k.get_ref().0,
            Some(k) => {
                let msg = format!(
                    r#"service {name:?}: health check "{}" cannot check a UDP service: use "tcp" (a TCP connect to each backend's address) or "none""#,
                    k.get_ref().0.name()
                );
                return Err(cx.err(k.span(), msg));
            }
        };
    }

    let mut backends: Vec<BackendConfig> = Vec::with_capacity(s.backends.len());
    // A set, not a scan of the list so far: 10,000 backends took 5·10^7 comparisons.
    let mut listed = std::collections::HashSet::with_capacity(s.backends.len());
    for b in &s.backends {
        let addr = b.addr.get_ref().0;
        if !listed.insert(addr) {
            let msg = format!(
                "service {name:?}: backend {addr} is listed twice: remove one (weight sets its share)"
            );
            return Err(cx.err(b.addr.span(), msg));
        }
        backends.push(BackendConfig {
            addr,
            weight: b.weight.map_or(defaults::WEIGHT, |w| w.0),
            id: None,
            node: None,
            local: b.local.unwrap_or(false),
        });
    }
    let dns = s.dns.as_ref().map(|d| d.get_ref().0.clone());
    if backends.is_empty() && dns.is_none() && !has_docker {
        let msg = format!(
            r#"service {name:?} has no backends: add backends = [{{ addr = "127.0.0.1:9001" }}], a dns = "tasks.{name}:80" target, or [discovery.docker]"#
        );
        return Err(cx.err(s.name.span(), msg));
    }

    let Resolved {
        balance,
        locality,
        connect_timeout,
        connect_retries,
        hedge_delay,
        queue_timeout,
        max_ejection_percent,
        retry_on_early_close,
        replay_buffer,
        idle_timeout,
        drain_timeout,
        slow_start,
        half_close_timeout,
        max_connections,
        proxy_protocol,
        accept_proxy,
        client_hello_timeout,
        backlog,
        health,
        udp,
    } = policy;
    if let Some(t) = &tls {
        share_sni(cx, name, s, t, &accept_proxy, client_hello_timeout, seen)?;
    }
    Ok(ServiceConfig {
        name: name.to_owned(),
        listen,
        protocol,
        udp,
        balance,
        locality,
        connect_timeout,
        connect_retries,
        hedge_delay,
        queue_timeout,
        max_ejection_percent,
        retry_on_early_close,
        replay_buffer,
        idle_timeout,
        drain_timeout,
        slow_start,
        half_close_timeout,
        max_connections,
        proxy_protocol,
        accept_proxy,
        client_hello_timeout,
        backlog,
        backends,
        dns,
        health,
        tls,
    })
}

/// `[service.tls]` on its own: the mode, names checked and normalised, and for
/// termination the certificate and key loaded (a file that does not load is this
/// service's error, naming the file).
fn tls(
    cx: &Cx,
    name: &str,
    s: &file::Service,
    protocol: Protocol,
) -> Result<Option<TlsConfig>, ConfigError> {
    let Some(t) = &s.tls else { return Ok(None) };
    let at = t.span();
    let t = t.get_ref();
    if protocol == Protocol::Udp {
        let msg = format!(
            r#"service {name:?}: [service.tls] applies to TCP services only (this one has protocol = "udp"): remove it"#
        );
        return Err(cx.err(at, msg));
    }
    let terminate = match &t.mode {
        None => {
            let msg = format!(
                r#"service {name:?}: [service.tls] has no mode: add mode = "terminate" (meshd holds the certificate) or mode = "passthrough" (the backend does)"#
            );
            return Err(cx.err(at, msg));
        }
        Some(m) if m.get_ref() == "passthrough" => false,
        Some(m) if m.get_ref() == "terminate" => true,
        Some(m) => {
            let msg = format!(
                r#"service {name:?}: invalid tls mode {:?}: use "terminate" or "passthrough""#,
                m.get_ref()
            );
            return Err(cx.err(m.span(), msg));
        }
    };
    let terminate = if terminate {
        Some(std::sync::Arc::new(terminate_config(
            cx,
            name,
            t,
            at.clone(),
        )?))
    } else {
        let only = [
            ("cert", t.cert.as_ref().map(Spanned::span)),
            ("key", t.key.as_ref().map(Spanned::span)),
            ("alpn", t.alpn.as_ref().map(Spanned::span)),
            ("min_version", t.min_version.as_ref().map(Spanned::span)),
        ];
        if let Some((k, Some(span))) = only.into_iter().find(|(_, s)| s.is_some()) {
            let msg = format!(
                r#"service {name:?}: tls {k} is for mode = "terminate" (with passthrough the backend holds the certificate): remove it"#
            );
            return Err(cx.err(span, msg));
        }
        None
    };
    let mut sni: Vec<String> = Vec::new();
    if let Some(list) = &t.sni {
        if list.get_ref().len() > limits::MAX_SNI {
            let msg = format!(
                "service {name:?}: sni lists {} names: use at most {} (or a wildcard)",
                list.get_ref().len(),
                limits::MAX_SNI
            );
            return Err(cx.err(list.span(), msg));
        }
        for n in list.get_ref() {
            let v = limits::sni_name(n.get_ref())
                .map_err(|e| cx.err(n.span(), format!("service {name:?}: {e}")))?;
            if sni.contains(&v) {
                let msg = format!("service {name:?}: sni lists {v:?} twice: remove one");
                return Err(cx.err(n.span(), msg));
            }
            sni.push(v);
        }
    }
    let mut sni_default = t.sni_default.as_ref().is_some_and(|d| *d.get_ref());
    // A terminating service that lists no name takes every connection of its addresses
    // (alone on its port, the usual case).
    if terminate.is_some() && sni.is_empty() && t.sni_default.is_none() {
        sni_default = true;
    }
    if sni.is_empty() && !sni_default {
        let msg = format!(
            r#"service {name:?}: [service.tls] lists no sni name and is not sni_default: no connection could reach it; add sni = ["api.example.com"] or sni_default = true"#
        );
        return Err(cx.err(t.sni.as_ref().map_or(at, Spanned::span), msg));
    }
    Ok(Some(TlsConfig {
        sni,
        sni_default,
        terminate,
    }))
}

/// `mode = "terminate"`: `cert` and `key` (relative to the config file's directory)
/// loaded into a server configuration, with `alpn` and `min_version`.
fn terminate_config(
    cx: &Cx,
    name: &str,
    t: &file::Tls,
    at: Range<usize>,
) -> Result<Terminate, ConfigError> {
    let dir = cx.path.parent().unwrap_or(Path::new(""));
    let file = |k: &str, v: Option<&Spanned<String>>| {
        match v {
        Some(v) if !v.get_ref().is_empty() => Ok((dir.join(v.get_ref()), v.span())),
        Some(v) => Err(cx.err(
            v.span(),
            format!("service {name:?}: tls {k} is empty: name a PEM file"),
        )),
        None => Err(cx.err(
            at.clone(),
            format!(
                r#"service {name:?}: mode = "terminate" needs tls cert and key: add cert = "/etc/meshd/{name}.pem" and key = "/etc/meshd/{name}.key""#
            ),
        )),
    }
    };
    let (cert, cert_at) = file("cert", t.cert.as_ref())?;
    let (key, key_at) = file("key", t.key.as_ref())?;
    let mut alpn = Vec::new();
    if let Some(list) = &t.alpn {
        if list.get_ref().len() > limits::MAX_ALPN {
            let msg = format!(
                "service {name:?}: alpn lists {} protocols: use at most {}",
                list.get_ref().len(),
                limits::MAX_ALPN
            );
            return Err(cx.err(list.span(), msg));
        }
        for p in list.get_ref() {
            let v = p.get_ref();
            if v.is_empty() || v.len() > 255 || !v.bytes().all(|b| b.is_ascii_graphic()) {
                let msg = format!(
                    r#"service {name:?}: invalid alpn protocol {v:?}: use names like "h2" or "http/1.1" (1 to 255 printable ASCII characters)"#
                );
                return Err(cx.err(p.span(), msg));
            }
            if alpn.contains(v) {
                let msg = format!("service {name:?}: alpn lists {v:?} twice: remove one");
                return Err(cx.err(p.span(), msg));
            }
            alpn.push(v.clone());
        }
    }
    let min_version = match &t.min_version {
        None => TlsVersion::default(),
        Some(v) => TlsVersion::parse(v.get_ref()).ok_or_else(|| {
            cx.err(
                v.span(),
                format!(
                    r#"service {name:?}: invalid tls min_version {:?}: use "1.2" or "1.3""#,
                    v.get_ref()
                ),
            )
        })?,
    };
    Terminate::load(cert, key, alpn, min_version).map_err(|e| {
        let span = match e {
            LoadError::NoKey { .. } | LoadError::Mismatch { .. } => key_at,
            LoadError::Read { what: "key", .. } | LoadError::TooLarge { what: "key", .. } => key_at,
            _ => cert_at,
        };
        cx.err(span, format!("service {name:?}: {e}"))
    })
}

/// Adds a `[service.tls]` service's names to each of its addresses: a name routes to one
/// service per address, one service per address is the default, and services sharing an
/// address agree on what is read before the name (`accept_proxy`, `client_hello_timeout`).
fn share_sni<'f>(
    cx: &Cx,
    name: &'f str,
    s: &file::Service,
    t: &TlsConfig,
    accept_proxy: &[ipnet::IpNet],
    client_hello_timeout: Duration,
    seen: &mut Seen<'f>,
) -> Result<(), ConfigError> {
    let Some(file_tls) = &s.tls else {
        return Ok(());
    };
    let file_tls = file_tls.get_ref();
    let addrs = s.listen.as_ref().map(|l| &l.get_ref().0[..]).unwrap_or(&[]);
    for a in addrs {
        let addr = a.get_ref().0;
        let Some(g) = seen.sni.get_mut(&addr) else {
            continue;
        };
        if g.first == name {
            g.accept_proxy = accept_proxy.to_vec();
            g.client_hello_timeout = client_hello_timeout;
        } else {
            let differs = if g.accept_proxy != accept_proxy {
                Some("accept_proxy")
            } else if g.client_hello_timeout != client_hello_timeout {
                Some("client_hello_timeout")
            } else {
                None
            };
            if let Some(key) = differs {
                let msg = format!(
                    "service {name:?}: listen {addr} is shared with service {:?}, whose {key} differs: services sharing an address must set the same {key} (it applies before the server name picks the service)",
                    g.first
                );
                return Err(cx.err(a.span(), msg));
            }
        }
        let spans = file_tls
            .sni
            .as_ref()
            .map(|l| &l.get_ref()[..])
            .unwrap_or(&[]);
        for (v, n) in t.sni.iter().zip(spans) {
            if let Some(other) = g.names.insert(v.clone(), name) {
                let msg = format!(
                    "service {name:?}: sni {v:?} on {addr} is already listed by service {other:?}: a name routes to one service, remove it from one of them"
                );
                return Err(cx.err(n.span(), msg));
            }
        }
        if t.sni_default {
            if let Some(other) = g.default.replace(name) {
                let at = file_tls
                    .sni_default
                    .as_ref()
                    .map_or(a.span(), Spanned::span);
                let msg = format!(
                    "service {name:?}: sni_default on {addr}: service {other:?} is the default there already: only one service per address may be"
                );
                return Err(cx.err(at, msg));
            }
        }
    }
    Ok(())
}

/// The `[defaults]`-resolved keys of one service.
#[derive(Debug, PartialEq)]
struct Resolved {
    balance: Balance,
    locality: Locality,
    connect_timeout: Duration,
    connect_retries: u32,
    hedge_delay: Duration,
    queue_timeout: Duration,
    max_ejection_percent: u32,
    retry_on_early_close: bool,
    replay_buffer: u32,
    idle_timeout: Duration,
    drain_timeout: Duration,
    slow_start: Duration,
    half_close_timeout: Duration,
    max_connections: u32,
    proxy_protocol: ProxyProtocol,
    accept_proxy: Vec<ipnet::IpNet>,
    client_hello_timeout: Duration,
    backlog: u32,
    health: HealthConfig,
    udp: UdpConfig,
}

/// Keys a service sets in its own table that its protocol has no use for: one error naming
/// the first. (`[defaults]` may hold both kinds: each service takes what applies.)
fn protocol_keys(
    cx: &Cx,
    name: &str,
    s: &file::Service,
    protocol: Protocol,
) -> Result<(), ConfigError> {
    fn at<T>(k: &Option<Spanned<T>>) -> Option<Range<usize>> {
        k.as_ref().map(Spanned::span)
    }
    type Keys<'k> = Vec<(&'k str, Option<Range<usize>>)>;
    let (keys, fix): (Keys, fn(&str) -> &'static str) = match protocol {
        Protocol::Udp => (
            vec![
                ("connect_timeout", at(&s.connect_timeout)),
                ("connect_retries", at(&s.connect_retries)),
                ("hedge_delay", at(&s.hedge_delay)),
                ("queue_timeout", at(&s.queue_timeout)),
                ("retry_on_early_close", at(&s.retry_on_early_close)),
                ("replay_buffer", at(&s.replay_buffer)),
                ("idle_timeout", at(&s.idle_timeout)),
                ("half_close_timeout", at(&s.half_close_timeout)),
                ("max_connections", at(&s.max_connections)),
                ("proxy_protocol", at(&s.proxy_protocol)),
                ("backlog", at(&s.backlog)),
            ],
            |key| match key {
                "idle_timeout" => "use udp_idle_timeout",
                "max_connections" => "use max_flows",
                _ => "remove it",
            },
        ),
        Protocol::Tcp => (
            vec![
                ("udp_idle_timeout", at(&s.udp_idle_timeout)),
                ("max_flows", at(&s.max_flows)),
                ("udp_responses", at(&s.udp_responses)),
            ],
            |_| r#"add protocol = "udp", or remove it"#,
        ),
    };
    let Some((key, span)) = keys
        .into_iter()
        .find_map(|(k, span)| span.map(|sp| (k, sp)))
    else {
        return Ok(());
    };
    let msg = match protocol {
        Protocol::Udp => format!(
            r#"service {name:?}: {key} applies to TCP services only (this one has protocol = "udp"): {}"#,
            fix(key)
        ),
        Protocol::Tcp => format!(
            r#"service {name:?}: {key} applies to protocol = "udp" services only: {}"#,
            fix(key)
        ),
    };
    Err(cx.err(span, msg))
}

/// The service's own value if it sets the key, else the `[defaults]` one.
fn pick<'a, T>(own: &'a Option<Spanned<T>>, def: &'a Option<Spanned<T>>) -> Option<&'a Spanned<T>> {
    own.as_ref().or(def.as_ref())
}

fn value<T: Clone>(key: Option<&Spanned<file::Parsed<T>>>, default: T) -> T {
    key.map_or(default, |k| k.get_ref().0.clone())
}

/// A duration that must not be zero.
fn positive(
    cx: &Cx,
    name: &str,
    key: Option<&Spanned<file::Parsed<Duration>>>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match key {
        Some(k) if k.get_ref().0.is_zero() => {
            let msg = format!(
                "{name} must be greater than zero: use e.g. \"{}\"",
                fmt_duration(default)
            );
            Err(cx.err(k.span(), msg))
        }
        k => Ok(value(k, default)),
    }
}

/// A duration key of a service (`limits`: whether zero is allowed, the default).
fn duration(
    cx: &Cx,
    k: &DurationKey,
    key: Option<&Spanned<file::Parsed<Duration>>>,
) -> Result<Duration, ConfigError> {
    if k.positive {
        positive(cx, k.key, key, k.default)
    } else {
        Ok(value(key, k.default))
    }
}

/// An integer key of a service within its `limits` range.
fn int(cx: &Cx, k: &IntKey, key: Option<&Spanned<i64>>) -> Result<u32, ConfigError> {
    let Some(v) = key else { return Ok(k.default) };
    k.check(*v.get_ref()).map_err(|e| cx.err(v.span(), e))
}

/// Resolves one service's policy keys (`own`) against `[defaults]` (`def`), key by key,
/// health keys included; a key set nowhere takes [`defaults`].
fn resolve(cx: &Cx, own: &file::Policy, def: &file::Policy) -> Result<Resolved, ConfigError> {
    let none = file::Health::default();
    let oh = own.health.as_ref().unwrap_or(&none);
    let dh = def.health.as_ref().unwrap_or(&none);

    let check = value(pick(&oh.check, &dh.check), CheckKind::Tcp);
    let health = HealthConfig {
        check,
        path: value(
            pick(&oh.path, &dh.path),
            file::HealthPath(defaults::HEALTH_PATH.into()),
        )
        .0,
        interval: duration(
            cx,
            &limits::HEALTH_INTERVAL,
            pick(&oh.interval, &dh.interval),
        )?,
        timeout: duration(cx, &limits::HEALTH_TIMEOUT, pick(&oh.timeout, &dh.timeout))?,
        rise: int(cx, &limits::RISE, pick(&oh.rise, &dh.rise))?,
        fall: int(cx, &limits::FALL, pick(&oh.fall, &dh.fall))?,
    };
    // Only a service's own `path` is checked: `[defaults.health] path` may serve the
    // services that choose `check = "http"`.
    if let Some(p) = oh.path.as_ref().filter(|_| check != CheckKind::Http) {
        let msg = format!(
            r#"health path is set but check is "{}": add check = "http", or remove path"#,
            check.name()
        );
        return Err(cx.err(p.span(), msg));
    }
    if health.timeout > health.interval {
        let at = pick(&oh.timeout, &dh.timeout).or(pick(&oh.interval, &dh.interval));
        if let Some(k) = at {
            let msg = format!(
                "health timeout {} is longer than interval {}: make timeout at most the interval",
                fmt_duration(health.timeout),
                fmt_duration(health.interval)
            );
            return Err(cx.err(k.span(), msg));
        }
    }

    Ok(Resolved {
        balance: value(pick(&own.balance, &def.balance), Balance::P2c),
        locality: value(pick(&own.locality, &def.locality), Locality::Any),
        connect_timeout: duration(
            cx,
            &limits::CONNECT_TIMEOUT,
            pick(&own.connect_timeout, &def.connect_timeout),
        )?,
        connect_retries: int(
            cx,
            &limits::CONNECT_RETRIES,
            pick(&own.connect_retries, &def.connect_retries),
        )?,
        hedge_delay: duration(
            cx,
            &limits::HEDGE_DELAY,
            pick(&own.hedge_delay, &def.hedge_delay),
        )?,
        queue_timeout: duration(
            cx,
            &limits::QUEUE_TIMEOUT,
            pick(&own.queue_timeout, &def.queue_timeout),
        )?,
        max_ejection_percent: int(
            cx,
            &limits::MAX_EJECTION_PERCENT,
            pick(&own.max_ejection_percent, &def.max_ejection_percent),
        )?,
        retry_on_early_close: pick(&own.retry_on_early_close, &def.retry_on_early_close)
            .is_some_and(|k| *k.get_ref()),
        replay_buffer: int(
            cx,
            &limits::REPLAY_BUFFER,
            pick(&own.replay_buffer, &def.replay_buffer),
        )?,
        idle_timeout: duration(
            cx,
            &limits::IDLE_TIMEOUT,
            pick(&own.idle_timeout, &def.idle_timeout),
        )?,
        drain_timeout: duration(
            cx,
            &limits::DRAIN_TIMEOUT,
            pick(&own.drain_timeout, &def.drain_timeout),
        )?,
        slow_start: duration(
            cx,
            &limits::SLOW_START,
            pick(&own.slow_start, &def.slow_start),
        )?,
        half_close_timeout: duration(
            cx,
            &limits::HALF_CLOSE_TIMEOUT,
            pick(&own.half_close_timeout, &def.half_close_timeout),
        )?,
        max_connections: int(
            cx,
            &limits::MAX_CONNECTIONS,
            pick(&own.max_connections, &def.max_connections),
        )?,
        proxy_protocol: value(
            pick(&own.proxy_protocol, &def.proxy_protocol),
            ProxyProtocol::Off,
        ),
        accept_proxy: accept_proxy(cx, pick(&own.accept_proxy, &def.accept_proxy))?,
        client_hello_timeout: duration(
            cx,
            &limits::CLIENT_HELLO_TIMEOUT,
            pick(&own.client_hello_timeout, &def.client_hello_timeout),
        )?,
        backlog: int(cx, &limits::BACKLOG, pick(&own.backlog, &def.backlog))?,
        health,
        udp: UdpConfig {
            idle_timeout: duration(
                cx,
                &limits::UDP_IDLE_TIMEOUT,
                pick(&own.udp_idle_timeout, &def.udp_idle_timeout),
            )?,
            max_flows: int(cx, &limits::MAX_FLOWS, pick(&own.max_flows, &def.max_flows))?,
            responses: int(
                cx,
                &limits::UDP_RESPONSES,
                pick(&own.udp_responses, &def.udp_responses),
            )?,
        },
    })
}

/// `accept_proxy = ["10.0.0.0/8", ...]`: each entry was read as a CIDR already; the list
/// is bounded and free of repeats.
fn accept_proxy(
    cx: &Cx,
    list: Option<&Spanned<Vec<Spanned<file::Parsed<ipnet::IpNet>>>>>,
) -> Result<Vec<ipnet::IpNet>, ConfigError> {
    let Some(list) = list else {
        return Ok(Vec::new());
    };
    let mut out: Vec<ipnet::IpNet> = Vec::with_capacity(list.get_ref().len());
    for e in list.get_ref() {
        let net = e.get_ref().0;
        if out.contains(&net) {
            return Err(cx.err(
                e.span(),
                format!("accept_proxy lists {net} twice: remove one"),
            ));
        }
        out.push(net);
        if out.len() > limits::MAX_ACCEPT_PROXY {
            let msg = format!(
                "accept_proxy lists more than {} sources: use wider CIDRs",
                limits::MAX_ACCEPT_PROXY
            );
            return Err(cx.err(e.span(), msg));
        }
    }
    Ok(out)
}

/// `managers = ["HOST:PORT", ...]`: admin addresses of meshd on Swarm managers. Host
/// names are resolved at each connection attempt (Swarm's DNS names them).
fn managers(
    cx: &Cx,
    list: Option<&Spanned<Vec<Spanned<String>>>>,
) -> Result<Vec<String>, ConfigError> {
    let Some(list) = list else {
        return Ok(Vec::new());
    };
    let mut out: Vec<String> = Vec::new();
    for m in list.get_ref() {
        let s = m.get_ref().trim();
        let ok = s.rsplit_once(':').is_some_and(|(host, port)| {
            let host = host.trim_start_matches('[').trim_end_matches(']');
            !host.is_empty()
                && !host.contains('/')
                && !host.contains(char::is_whitespace)
                && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !ok {
            return Err(cx.err(
                m.span(),
                format!(
                    "manager {s:?} is not HOST:PORT: use the admin address of meshd on a \
                     manager, e.g. \"manager1:9901\" or \"10.0.0.2:9901\""
                ),
            ));
        }
        if out.iter().any(|o| o == s) {
            return Err(cx.err(m.span(), format!("manager {s:?} is listed twice")));
        }
        out.push(s.to_owned());
    }
    Ok(out)
}

fn discovery(cx: &Cx, d: &file::Discovery, uses_dns: bool) -> Result<DiscoveryConfig, ConfigError> {
    let docker = match &d.docker {
        None => None,
        Some(k) => Some(DockerDiscoveryConfig {
            endpoint: k.endpoint.as_ref().map_or_else(
                || defaults::DOCKER_ENDPOINT.to_owned(),
                |e| e.get_ref().0 .0.clone(),
            ),
            poll_interval: positive(
                cx,
                "poll_interval",
                k.poll_interval.as_ref(),
                defaults::DOCKER_POLL_INTERVAL,
            )?,
            managers: managers(cx, k.managers.as_ref())?,
            token: None,
            token_file: None,
            address: k
                .address
                .as_ref()
                .map_or(TaskAddress::default(), |a| a.get_ref().0),
        }),
    };
    let docker = match (docker, d.docker.as_ref()) {
        (Some(mut dc), Some(k)) => {
            match (&k.token_file, &k.managers) {
                (Some(f), _) => {
                    let (token, path) = read_token(
                        cx,
                        f,
                        "the managers' admin bearer token ([admin] token_file on the managers)",
                    )?;
                    dc.token = Some(token);
                    dc.token_file = Some(path);
                }
                (None, Some(m)) if !dc.managers.is_empty() => {
                    return Err(cx.err(
                        m.span(),
                        "managers needs a token: set [discovery.docker] token_file to a file \
                         holding the managers' admin token ([admin] token_file on the managers)"
                            .to_owned(),
                    ));
                }
                _ => {}
            }
            Some(dc)
        }
        (dc, _) => dc,
    };
    // A service's `dns = ...` target needs the resolver: it runs with defaults when
    // `[discovery.dns]` is absent.
    let dns = match &d.dns {
        Some(k) => Some(DnsDiscoveryConfig {
            interval: positive(cx, "interval", k.interval.as_ref(), defaults::DNS_INTERVAL)?,
            resolver: k.resolver.as_ref().map(|r| r.get_ref().0),
        }),
        None if uses_dns => Some(DnsDiscoveryConfig {
            interval: defaults::DNS_INTERVAL,
            resolver: None,
        }),
        None => None,
    };
    Ok(DiscoveryConfig { docker, dns })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::file::Key;

    fn key<T>(span: Range<usize>, v: T) -> Key<T> {
        Some(Spanned::new(span, file::Parsed(v)))
    }

    #[test]
    fn positions_are_one_based_in_characters() {
        let text = "a = 1\nwéb = \"x\"\n";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 4), (1, 5));
        assert_eq!(line_col(text, 6), (2, 1));
        // 'é' is two bytes but one column.
        let eq2 = text.rfind('=').unwrap();
        assert_eq!(line_col(text, eq2), (2, 5));
        // Inside a multi-byte char, and past the end: clamped, no panic.
        assert_eq!(line_col(text, 8), (2, 2));
        assert_eq!(line_col(text, 1000), (3, 1));
    }

    #[test]
    fn admin_default_parses() {
        assert!(defaults::ADMIN_LISTEN.parse::<SocketAddr>().is_ok());
    }

    fn cx() -> Cx<'static> {
        Cx {
            path: Path::new("mesh.toml"),
            text: "",
        }
    }

    #[test]
    fn nothing_set_takes_the_defaults() {
        let p = resolve(&cx(), &file::Policy::default(), &file::Policy::default()).unwrap();
        assert_eq!(
            p,
            Resolved {
                balance: Balance::P2c,
                locality: Locality::Any,
                connect_timeout: defaults::CONNECT_TIMEOUT,
                connect_retries: defaults::CONNECT_RETRIES,
                hedge_delay: defaults::HEDGE_DELAY,
                queue_timeout: defaults::QUEUE_TIMEOUT,
                max_ejection_percent: defaults::MAX_EJECTION_PERCENT,
                retry_on_early_close: false,
                replay_buffer: defaults::REPLAY_BUFFER,
                idle_timeout: defaults::IDLE_TIMEOUT,
                drain_timeout: defaults::DRAIN_TIMEOUT,
                slow_start: defaults::SLOW_START,
                half_close_timeout: defaults::HALF_CLOSE_TIMEOUT,
                max_connections: 0,
                proxy_protocol: ProxyProtocol::Off,
                accept_proxy: Vec::new(),
                client_hello_timeout: defaults::CLIENT_HELLO_TIMEOUT,
                backlog: defaults::BACKLOG,
                health: HealthConfig {
                    check: CheckKind::Tcp,
                    path: defaults::HEALTH_PATH.to_owned(),
                    interval: defaults::HEALTH_INTERVAL,
                    timeout: defaults::HEALTH_TIMEOUT,
                    rise: defaults::HEALTH_RISE,
                    fall: defaults::HEALTH_FALL,
                },
                udp: UdpConfig::default(),
            }
        );
    }

    #[test]
    fn service_keys_override_defaults_key_by_key() {
        let def = file::Policy {
            balance: key(0..1, Balance::Maglev),
            connect_retries: Some(Spanned::new(0..1, 5)),
            drain_timeout: key(0..1, Duration::from_secs(7)),
            health: Some(file::Health {
                check: key(0..1, CheckKind::Http),
                path: key(0..1, file::HealthPath("/ready".into())),
                interval: key(0..1, Duration::from_secs(5)),
                rise: Some(Spanned::new(0..1, 4)),
                ..Default::default()
            }),
            ..Default::default()
        };
        let own = file::Policy {
            balance: key(0..1, Balance::LeastConn),
            connect_retries: Some(Spanned::new(0..1, 0)),
            health: Some(file::Health {
                interval: key(0..1, Duration::from_secs(2)),
                fall: Some(Spanned::new(0..1, 9)),
                ..Default::default()
            }),
            ..Default::default()
        };
        let p = resolve(&cx(), &own, &def).unwrap();
        assert_eq!(p.balance, Balance::LeastConn); // service wins
        assert_eq!(p.connect_retries, 0); // service wins, even with 0
        assert_eq!(p.drain_timeout, Duration::from_secs(7)); // from [defaults]
        assert_eq!(p.idle_timeout, defaults::IDLE_TIMEOUT); // set nowhere
        assert_eq!(
            p.health,
            HealthConfig {
                check: CheckKind::Http,            // [defaults.health]
                path: "/ready".into(),             // [defaults.health]
                interval: Duration::from_secs(2),  // [service.health]
                timeout: defaults::HEALTH_TIMEOUT, // nowhere
                rise: 4,                           // [defaults.health]
                fall: 9,                           // [service.health]
            }
        );
    }

    #[test]
    fn a_service_without_health_table_inherits_defaults_health() {
        let def = file::Policy {
            health: Some(file::Health {
                check: key(0..1, CheckKind::None),
                ..Default::default()
            }),
            ..Default::default()
        };
        let p = resolve(&cx(), &file::Policy::default(), &def).unwrap();
        assert_eq!(p.health.check, CheckKind::None);
    }

    #[test]
    fn overlap_rules() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(overlaps(a("0.0.0.0:80"), a("10.0.0.1:80")));
        assert!(overlaps(a("10.0.0.1:80"), a("0.0.0.0:80")));
        assert!(overlaps(a("[::]:80"), a("[::1]:80")));
        assert!(!overlaps(a("0.0.0.0:80"), a("0.0.0.0:81")));
        assert!(!overlaps(a("10.0.0.1:80"), a("10.0.0.2:80")));
        assert!(!overlaps(a("0.0.0.0:80"), a("[::]:80")));
        assert!(!overlaps(a("0.0.0.0:80"), a("[::1]:80")));
    }
}
