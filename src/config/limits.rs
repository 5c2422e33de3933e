//! A service's limits and keywords, defined once.
//!
//! Three readers build a `ServiceConfig` from outside input: `mesh.toml` validation
//! (`validate.rs`, `file.rs`), Swarm labels (`discovery/docker/labels.rs`, over the
//! `[defaults]` template) and the manager→worker feed (`discovery/feed.rs`,
//! `WireService::into_config`). They check against the constants and functions here, so a
//! service one of them accepts, the others accept too: a worker never drops a service its
//! manager runs. `tests/config_feed.rs` checks it over generated configs.
//!
//! Invariant: no I/O; the messages say what is allowed, the callers add where.

use std::ops::RangeInclusive;
use std::time::Duration;

use super::duration::format_duration;
use super::{defaults, Balance, CheckKind, Locality, LogFormat, Protocol, ProxyProtocol};

/// The longest duration any key accepts: 366 days.
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);
/// Durations are kept to the millisecond (the feed carries milliseconds).
pub const DURATION_RESOLUTION: Duration = Duration::from_millis(1);

/// A duration key of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationKey {
    pub key: &'static str,
    /// Zero is not allowed (it would make the feature unusable, not turn it off).
    pub positive: bool,
    pub default: Duration,
}

pub const CONNECT_TIMEOUT: DurationKey = DurationKey {
    key: "connect_timeout",
    positive: true,
    default: defaults::CONNECT_TIMEOUT,
};
/// Zero turns hedging off.
pub const HEDGE_DELAY: DurationKey = DurationKey {
    key: "hedge_delay",
    positive: false,
    default: defaults::HEDGE_DELAY,
};
/// Zero closes a connection no backend took at once.
pub const QUEUE_TIMEOUT: DurationKey = DurationKey {
    key: "queue_timeout",
    positive: false,
    default: defaults::QUEUE_TIMEOUT,
};
pub const IDLE_TIMEOUT: DurationKey = DurationKey {
    key: "idle_timeout",
    positive: true,
    default: defaults::IDLE_TIMEOUT,
};
/// Zero closes a removed backend's connections at once.
pub const DRAIN_TIMEOUT: DurationKey = DurationKey {
    key: "drain_timeout",
    positive: false,
    default: defaults::DRAIN_TIMEOUT,
};
/// Zero: no ramp.
pub const SLOW_START: DurationKey = DurationKey {
    key: "slow_start",
    positive: false,
    default: defaults::SLOW_START,
};
/// Zero closes a connection as soon as one side has finished sending.
pub const HALF_CLOSE_TIMEOUT: DurationKey = DurationKey {
    key: "half_close_timeout",
    positive: false,
    default: defaults::HALF_CLOSE_TIMEOUT,
};
/// The PROXY header's deadline (`accept_proxy`).
pub const CLIENT_HELLO_TIMEOUT: DurationKey = DurationKey {
    key: "client_hello_timeout",
    positive: true,
    default: defaults::CLIENT_HELLO_TIMEOUT,
};
pub const UDP_IDLE_TIMEOUT: DurationKey = DurationKey {
    key: "udp_idle_timeout",
    positive: true,
    default: defaults::UDP_IDLE_TIMEOUT,
};
pub const HEALTH_INTERVAL: DurationKey = DurationKey {
    key: "health interval",
    positive: true,
    default: defaults::HEALTH_INTERVAL,
};
pub const HEALTH_TIMEOUT: DurationKey = DurationKey {
    key: "health timeout",
    positive: true,
    default: defaults::HEALTH_TIMEOUT,
};

impl DurationKey {
    /// `d` if this key accepts it; else what is allowed (without the position).
    pub fn check(&self, d: Duration) -> Result<Duration, String> {
        duration(d)?;
        if self.positive && d.is_zero() {
            return Err(format!(
                "{} must be greater than zero: use e.g. \"{}\"",
                self.key,
                format_duration(self.default)
            ));
        }
        Ok(d)
    }
}

/// Any duration a service (or discovery) key accepts: at most [`MAX_DURATION`], a whole
/// number of milliseconds.
pub fn duration(d: Duration) -> Result<Duration, String> {
    if d > MAX_DURATION {
        return Err(format!(
            "duration {} is too long: use at most \"{}h\" (366 days)",
            format_duration(d),
            MAX_DURATION.as_secs() / 3600
        ));
    }
    if d.subsec_nanos() % 1_000_000 != 0 {
        return Err(format!(
            "duration {} is finer than a millisecond: meshd keeps durations to the \
             millisecond, use e.g. \"{}ms\"",
            format_duration(d),
            d.as_millis().max(1)
        ));
    }
    Ok(d)
}

/// An integer key of a service, with the values it accepts and what it means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntKey {
    pub key: &'static str,
    pub range: RangeInclusive<u32>,
    pub default: u32,
    /// Completes "out of range" messages: " (what the key means)".
    pub hint: &'static str,
}

pub const CONNECT_RETRIES: IntKey = IntKey {
    key: "connect_retries",
    range: 0..=defaults::MAX_CONNECT_RETRIES,
    default: defaults::CONNECT_RETRIES,
    hint: " (other backends tried after a failed connect)",
};
pub const MAX_EJECTION_PERCENT: IntKey = IntKey {
    key: "max_ejection_percent",
    range: 0..=100,
    default: defaults::MAX_EJECTION_PERCENT,
    hint: " (the most of a service's backends passive ejection takes out at once)",
};
pub const REPLAY_BUFFER: IntKey = IntKey {
    key: "replay_buffer",
    range: 0..=defaults::MAX_REPLAY_BUFFER,
    default: defaults::REPLAY_BUFFER,
    hint: " (bytes of a client's request kept for a replay)",
};
pub const MAX_CONNECTIONS: IntKey = IntKey {
    key: "max_connections",
    range: 0..=u32::MAX,
    default: 0,
    hint: " (0 = unlimited)",
};
pub const BACKLOG: IntKey = IntKey {
    key: "backlog",
    range: 1..=65535,
    default: defaults::BACKLOG,
    hint: " (the listen queue length)",
};
pub const MAX_FLOWS: IntKey = IntKey {
    key: "max_flows",
    range: 1..=defaults::MAX_MAX_FLOWS,
    default: defaults::MAX_FLOWS,
    hint: " (UDP flows kept at once, one socket each)",
};
pub const UDP_RESPONSES: IntKey = IntKey {
    key: "udp_responses",
    range: 0..=u32::MAX,
    default: 0,
    hint: " (replies after which a UDP flow ends; 0 = any number)",
};
pub const RISE: IntKey = IntKey {
    key: "rise",
    range: 1..=100,
    default: defaults::HEALTH_RISE,
    hint: " (consecutive passes before a backend gets traffic)",
};
pub const FALL: IntKey = IntKey {
    key: "fall",
    range: 1..=100,
    default: defaults::HEALTH_FALL,
    hint: " (consecutive failures before a backend stops getting traffic)",
};
pub const WEIGHT: IntKey = IntKey {
    key: "weight",
    range: 0..=defaults::MAX_WEIGHT,
    default: defaults::WEIGHT,
    hint: " (0 = no new connections)",
};

impl IntKey {
    /// `v` if this key accepts it; else what is allowed (without the position).
    pub fn check(&self, v: i64) -> Result<u32, String> {
        match u32::try_from(v) {
            Ok(n) if self.range.contains(&n) => Ok(n),
            _ => {
                let (lo, hi) = (self.range.start(), self.range.end());
                let allowed = if *hi == u32::MAX {
                    format!("{lo} or more")
                } else {
                    format!("{lo}..={hi}")
                };
                Err(format!(
                    "{} {v} is out of range: use {allowed}{}",
                    self.key, self.hint
                ))
            }
        }
    }
}

/// The most listen addresses of one service.
pub const MAX_LISTEN: usize = 64;
/// The longest service name (names become metric labels and URL path segments).
pub const MAX_NAME: usize = 64;
/// The longest health check path (it goes into the request line as is).
pub const MAX_HEALTH_PATH: usize = 1024;

/// A service name: 1 to [`MAX_NAME`] letters, digits, '.', '_' or '-', not "." or "..".
pub fn service_name(s: &str) -> Result<(), String> {
    const RULE: &str = "use only letters, digits, '.', '_' and '-' \
                        (names become metric labels and URL path segments)";
    if s.is_empty() {
        return Err(format!(
            r#"service name is empty: {RULE}, e.g. name = "web""#
        ));
    }
    let len = s.chars().count();
    if len > MAX_NAME {
        return Err(format!(
            "service name {s:?} is {len} characters long: use at most {MAX_NAME}"
        ));
    }
    let chars_ok = s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !chars_ok || s == "." || s == ".." {
        return Err(format!("invalid service name {s:?}: {RULE}"));
    }
    Ok(())
}

/// An HTTP health check path: starts with '/', no spaces or control characters, at most
/// [`MAX_HEALTH_PATH`] bytes.
pub fn health_path(s: &str) -> Result<(), String> {
    if !s.starts_with('/') {
        return Err(format!(
            r#"invalid health path {s:?}: it must start with '/', e.g. "/healthz""#
        ));
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "invalid health path {s:?}: it must not contain spaces or control characters \
             (percent-encode them, e.g. %20)"
        ));
    }
    if s.len() > MAX_HEALTH_PATH {
        return Err(format!(
            "invalid health path: it is {} bytes long, use at most {MAX_HEALTH_PATH}",
            s.len()
        ));
    }
    Ok(())
}

/// The most entries `accept_proxy` may list (each connection of the service is checked
/// against the list: it stays short).
pub const MAX_ACCEPT_PROXY: usize = 64;

/// One `accept_proxy` entry: a CIDR (`10.0.0.0/8`, `2001:db8::/32`) or a single address
/// (`/32` or `/128`), with no bits set past the prefix.
pub fn cidr(s: &str) -> Result<ipnet::IpNet, String> {
    let net = if s.contains('/') {
        s.parse::<ipnet::IpNet>().map_err(|_| {
            format!(r#"invalid CIDR {s:?} in accept_proxy: use e.g. "10.0.0.0/8", "192.168.1.10/32" or "2001:db8::/32""#)
        })?
    } else {
        let ip = s.parse::<std::net::IpAddr>().map_err(|_| {
            format!(r#"invalid CIDR {s:?} in accept_proxy: use e.g. "10.0.0.0/8", "192.168.1.10/32" or "2001:db8::/32""#)
        })?;
        ipnet::IpNet::from(ip)
    };
    if net.trunc() != net {
        return Err(format!(
            r#"CIDR {s:?} in accept_proxy has bits set past its prefix: use "{}""#,
            net.trunc()
        ));
    }
    Ok(net)
}

/// The `accept_proxy` list: each entry a [`cidr`], at most [`MAX_ACCEPT_PROXY`].
pub fn accept_proxy<'a>(
    list: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<ipnet::IpNet>, String> {
    let mut out = Vec::new();
    for s in list {
        out.push(cidr(s)?);
        if out.len() > MAX_ACCEPT_PROXY {
            return Err(format!(
                "accept_proxy lists more than {MAX_ACCEPT_PROXY} sources: use wider CIDRs"
            ));
        }
    }
    Ok(out)
}

/// The longest DNS name (without a trailing dot).
pub const MAX_DNS_NAME: usize = 253;
/// The most ALPN protocols one terminating service may offer.
pub const MAX_ALPN: usize = 16;

/// The most names one service's `[service.tls] sni` may list.
pub const MAX_SNI: usize = 256;

/// Whether `raw` (no trailing dot) is a DNS name SNI routing compares: 1 to
/// [`MAX_DNS_NAME`] bytes, labels of 1 to 63 letters, digits, `-` or `_`, and not all
/// digits and dots (an IPv4 literal, which RFC 6066 does not allow as SNI). The one rule
/// for both `mesh.toml`'s names and a ClientHello's (`proxy::sni::normalize`).
pub fn dns_name(raw: &[u8]) -> bool {
    !raw.is_empty()
        && raw.len() <= MAX_DNS_NAME
        && raw
            .split(|&b| b == b'.')
            .all(|l| !l.is_empty() && l.len() <= 63)
        && raw
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !raw.iter().all(|&b| b.is_ascii_digit() || b == b'.')
}

/// One `sni` entry, normalised as connections are (ASCII lowercase, one trailing dot
/// removed): a DNS name, or `*.` and a DNS name (a wildcard for exactly one label).
pub fn sni_name(s: &str) -> Result<String, String> {
    let bad = |why: &str| {
        format!(r#"invalid sni name {s:?}: {why}; use e.g. "api.example.com" or "*.example.com""#)
    };
    let lower = s.to_ascii_lowercase();
    let name = lower.strip_suffix('.').unwrap_or(&lower);
    let rest = name.strip_prefix("*.").unwrap_or(name);
    if rest.contains('*') {
        return Err(bad(
            "a wildcard is allowed only as the whole first label (\"*.\")",
        ));
    }
    if !dns_name(rest.as_bytes()) {
        return Err(bad(
            "not a DNS name (labels of 1 to 63 letters, digits, '-' or '_'; at most 253 bytes; no IP address)",
        ));
    }
    Ok(name.to_owned())
}

/// The keywords of `balance`, in the order messages list them.
pub const BALANCES: [(&str, Balance); 4] = [
    ("round_robin", Balance::RoundRobin),
    ("least_conn", Balance::LeastConn),
    ("p2c", Balance::P2c),
    ("maglev", Balance::Maglev),
];
/// The keywords of `[health] check`.
pub const CHECKS: [(&str, CheckKind); 3] = [
    ("none", CheckKind::None),
    ("tcp", CheckKind::Tcp),
    ("http", CheckKind::Http),
];
/// The keywords of `proxy_protocol`.
pub const PROXY_PROTOCOLS: [(&str, ProxyProtocol); 3] = [
    ("off", ProxyProtocol::Off),
    ("v1", ProxyProtocol::V1),
    ("v2", ProxyProtocol::V2),
];
/// The keywords of `locality`.
pub const LOCALITIES: [(&str, Locality); 3] = [
    ("any", Locality::Any),
    ("prefer_local", Locality::PreferLocal),
    ("local_only", Locality::LocalOnly),
];
/// The keywords of `protocol`.
pub const PROTOCOLS: [(&str, Protocol); 2] = [("tcp", Protocol::Tcp), ("udp", Protocol::Udp)];
/// The health checks a UDP service may use (its backends' TCP port, or none).
pub const UDP_CHECKS: [CheckKind; 2] = [CheckKind::None, CheckKind::Tcp];
/// The keywords of `[log] format`.
pub const LOG_FORMATS: [(&str, LogFormat); 2] =
    [("human", LogFormat::Human), ("json", LogFormat::Json)];

/// The value of keyword `s` in `table`.
pub fn keyword<T: Copy>(table: &[(&'static str, T)], s: &str) -> Option<T> {
    table.iter().find(|(k, _)| *k == s).map(|&(_, v)| v)
}

/// The keyword of `v` in `table` (every value has one: the tables list every variant).
pub fn name_of<T: Copy + PartialEq>(table: &[(&'static str, T)], v: T) -> &'static str {
    table.iter().find(|(_, t)| *t == v).map_or("?", |(k, _)| k)
}

impl Balance {
    pub fn name(self) -> &'static str {
        name_of(&BALANCES, self)
    }
}

impl CheckKind {
    pub fn name(self) -> &'static str {
        name_of(&CHECKS, self)
    }
}

impl ProxyProtocol {
    pub fn name(self) -> &'static str {
        name_of(&PROXY_PROTOCOLS, self)
    }
}

impl Locality {
    pub fn name(self) -> &'static str {
        name_of(&LOCALITIES, self)
    }
}

impl Protocol {
    pub fn name(self) -> &'static str {
        name_of(&PROTOCOLS, self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_has_one_name() {
        for (k, v) in BALANCES {
            assert_eq!(v.name(), k);
            assert_eq!(keyword(&BALANCES, k), Some(v));
        }
        for (k, v) in CHECKS {
            assert_eq!(v.name(), k);
        }
        for (k, v) in PROXY_PROTOCOLS {
            assert_eq!(v.name(), k);
        }
        for (k, v) in PROTOCOLS {
            assert_eq!(v.name(), k);
        }
        for (k, v) in LOCALITIES {
            assert_eq!(v.name(), k);
        }
        assert_eq!(keyword(&CHECKS, "udp"), None);
    }

    #[test]
    fn durations_are_bounded_and_kept_to_the_millisecond() {
        assert_eq!(duration(MAX_DURATION), Ok(MAX_DURATION));
        let e = duration(MAX_DURATION + Duration::from_millis(1)).unwrap_err();
        assert!(e.contains("use at most \"8784h\""), "{e}");
        let e = duration(Duration::from_micros(100)).unwrap_err();
        assert!(e.contains("use e.g. \"1ms\""), "{e}");
        let e = duration(Duration::from_micros(2500)).unwrap_err();
        assert!(e.contains("use e.g. \"2ms\""), "{e}");
        assert!(duration(Duration::from_micros(2000)).is_ok());
        assert!(HALF_CLOSE_TIMEOUT.check(Duration::ZERO).is_ok());
        assert_eq!(
            CONNECT_TIMEOUT.check(Duration::ZERO).unwrap_err(),
            "connect_timeout must be greater than zero: use e.g. \"5s\""
        );
    }

    #[test]
    fn sni_names_are_normalised_and_checked() {
        assert_eq!(sni_name("API.Example.com.").unwrap(), "api.example.com");
        assert_eq!(sni_name("*.Example.com").unwrap(), "*.example.com");
        for bad in [
            "",
            "*",
            "*.",
            "a.*.b",
            "**.a",
            "a..b",
            "192.0.2.1",
            "a b",
            "ä.test",
            "*.*.a",
        ] {
            assert!(sni_name(bad).is_err(), "{bad}");
        }
        assert!(sni_name(&"a".repeat(64)).is_err());
    }

    #[test]
    fn accept_proxy_entries_are_cidrs_or_addresses() {
        assert_eq!(cidr("10.0.0.0/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(cidr("127.0.0.1").unwrap().to_string(), "127.0.0.1/32");
        assert_eq!(cidr("::1").unwrap().to_string(), "::1/128");
        assert_eq!(
            cidr("10.0.0.1/8").unwrap_err(),
            r#"CIDR "10.0.0.1/8" in accept_proxy has bits set past its prefix: use "10.0.0.0/8""#
        );
        assert!(cidr("10.0.0.0/33").unwrap_err().starts_with("invalid CIDR"));
        assert!(cidr("example.com").is_err());
        assert!(cidr("").is_err());
        let many: Vec<String> = (0..65).map(|i| format!("10.0.{i}.0/24")).collect();
        assert!(accept_proxy(many.iter().map(String::as_str)).is_err());
        assert_eq!(
            accept_proxy(many[..64].iter().map(String::as_str))
                .unwrap()
                .len(),
            64
        );
    }

    #[test]
    fn ints_say_their_range() {
        assert_eq!(RISE.check(100), Ok(100));
        assert_eq!(
            RISE.check(101).unwrap_err(),
            "rise 101 is out of range: use 1..=100 (consecutive passes before a backend gets traffic)"
        );
        assert!(MAX_CONNECTIONS.check(-1).unwrap_err().contains("0 or more"));
        assert!(BACKLOG.check(i64::MAX).is_err());
    }
}
