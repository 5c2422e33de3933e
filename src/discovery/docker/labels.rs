//! `mesh.*` service labels -> mesh services.
//!
//! A Swarm service opts in with `mesh.publish=PUBLISHED:TARGET` (several pairs
//! comma-separated: one mesh service per pair; `/udp` after a pair makes it a UDP service,
//! `/tcp` is the default). The other labels override the `[defaults]` template:
//!
//! | label | value | default |
//! | --- | --- | --- |
//! | `mesh.publish` | `8080:80`, `8080:80,8443:443`, `53:53/udp`, `53:53,53:53/udp` | (required: the opt-in) |
//! | `mesh.balance` | `round_robin`, `least_conn`, `p2c`, `maglev` | `[defaults] balance` |
//! | `mesh.health` | `none`, `tcp`, `http` | `[defaults.health] check` |
//! | `mesh.health.path` | `/healthz` (needs `mesh.health=http`, or http as the default) | `[defaults.health] path` |
//! | `mesh.proxy_protocol` | `off`, `v1`, `v2` | `[defaults] proxy_protocol` |
//! | `mesh.network` | the name or ID of the network to reach the tasks on | the one meshd shares with them |
//! | `mesh.listen` | the IP to listen on, e.g. `0.0.0.0`, `::`, `10.1.2.3` | `0.0.0.0` |
//! | `mesh.accept_proxy` | CIDRs, comma-separated, e.g. `10.0.0.0/8,192.168.1.10/32`: these sources must send a PROXY header | `[defaults] accept_proxy` |
//! | `mesh.locality` | `any`, `prefer_local`, `local_only`: this node's tasks first, or only | `[defaults] locality` |
//! | `mesh.retry_early_close` | `true`, `false`: replay a connection whose task closes before answering | `[defaults] retry_on_early_close` |
//! | `mesh.tls` | `passthrough`: route the TCP ports by the ClientHello's server name, the task terminates TLS; `terminate`: the same routing, meshd terminates TLS with `mesh.tls.cert` and `mesh.tls.key` | (plain TCP) |
//! | `mesh.tls.cert`, `mesh.tls.key` | absolute paths of PEM files in meshd's container, e.g. `/run/secrets/api.pem` (needs `mesh.tls=terminate`) | (none) |
//! | `mesh.sni` | names, comma-separated, e.g. `api.example.com,*.example.com` (needs `mesh.tls`; optional with `terminate`) | (none) |
//! | `mesh.sni_default` | `true`, `false`: take the port's connections no service's `mesh.sni` names (needs `mesh.tls`) | `false` |
//!
//! Invariant: pure functions, no I/O (certificate files are named here, read by the
//! provider's loader, `state::Tracker::loading_certs`). A label that does not parse is one [`LabelError`]
//! line naming the Swarm service and the label; that service is skipped, the others go on.
//! An unknown `mesh.*` label is only a warning: a newer meshd's labels must not take a
//! service down on an older meshd during an upgrade.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use crate::config::limits::{self, BALANCES, CHECKS, LOCALITIES, MAX_NAME, PROXY_PROTOCOLS};
use crate::config::{
    Balance, CheckKind, Locality, Protocol, ProxyProtocol, ServiceConfig, TlsConfig,
};

pub const PUBLISH: &str = "mesh.publish";
pub const BALANCE: &str = "mesh.balance";
pub const HEALTH: &str = "mesh.health";
pub const HEALTH_PATH: &str = "mesh.health.path";
pub const PROXY_PROTOCOL: &str = "mesh.proxy_protocol";
pub const NETWORK: &str = "mesh.network";
pub const LISTEN: &str = "mesh.listen";
pub const RETRY_EARLY_CLOSE: &str = "mesh.retry_early_close";
pub const ACCEPT_PROXY: &str = "mesh.accept_proxy";
pub const LOCALITY: &str = "mesh.locality";
pub const TLS: &str = "mesh.tls";
pub const SNI: &str = "mesh.sni";
pub const SNI_DEFAULT: &str = "mesh.sni_default";
pub const TLS_CERT: &str = "mesh.tls.cert";
pub const TLS_KEY: &str = "mesh.tls.key";

const KNOWN: [&str; 15] = [
    PUBLISH,
    BALANCE,
    HEALTH,
    HEALTH_PATH,
    PROXY_PROTOCOL,
    NETWORK,
    LISTEN,
    RETRY_EARLY_CLOSE,
    ACCEPT_PROXY,
    LOCALITY,
    TLS,
    SNI,
    SNI_DEFAULT,
    TLS_CERT,
    TLS_KEY,
];

/// A label that cannot be used. `Display`: `service "web": label mesh.publish="80:abc":
/// expected PUBLISHED:TARGET ports, e.g. 8080:80`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("service {service:?}: label {label}={value:?}: {problem}")]
pub struct LabelError {
    /// The Swarm service's name.
    pub service: String,
    pub label: String,
    pub value: String,
    /// What is wrong and how to fix it.
    pub problem: String,
}

/// A Swarm service's parsed `mesh.*` labels.
#[derive(Debug, Clone, PartialEq)]
pub struct MeshLabels {
    /// (published, target, protocol), in label order; a published port appears once per
    /// protocol.
    pub ports: Vec<(u16, u16, Protocol)>,
    pub listen_ip: IpAddr,
    /// `mesh.network`: the network (name or ID) to reach the tasks on.
    pub network: Option<String>,
    pub balance: Option<Balance>,
    pub check: Option<CheckKind>,
    pub path: Option<String>,
    pub proxy_protocol: Option<ProxyProtocol>,
    /// `mesh.retry_early_close`: replay a connection whose task closes or resets before
    /// sending a byte (opt-in: the task may have acted on what it read).
    pub retry_early_close: Option<bool>,
    /// `mesh.accept_proxy`: the sources whose PROXY header is read.
    pub accept_proxy: Option<Vec<ipnet::IpNet>>,
    /// `mesh.locality`: this node's tasks first (`prefer_local`) or only (`local_only`).
    pub locality: Option<Locality>,
    /// `mesh.tls=passthrough` with `mesh.sni` / `mesh.sni_default`: the TCP ports are
    /// routed by server name and may share their port with other such services.
    pub tls: Option<TlsConfig>,
    /// `mesh.tls=terminate`: `mesh.tls.cert` and `mesh.tls.key`, files in meshd's own
    /// container, for the provider to load (`tls.terminate` is `None` until then).
    pub tls_files: Option<(PathBuf, PathBuf)>,
    /// Unknown `mesh.*` labels, each as a one-line warning.
    pub warnings: Vec<String>,
}

/// One mesh service to create from a Swarm service: its settings (without backends) and
/// the task port its backends use.
#[derive(Debug, Clone, PartialEq)]
pub struct MeshService {
    pub config: ServiceConfig,
    pub target: u16,
}

/// Reads `labels` of Swarm service `service`: `Ok(None)` when it has not opted in (no
/// `mesh.publish`).
pub fn parse(
    service: &str,
    labels: &BTreeMap<String, String>,
) -> Result<Option<MeshLabels>, LabelError> {
    let Some(publish) = labels.get(PUBLISH) else {
        return Ok(None);
    };
    let err = |label: &str, value: &str, problem: String| LabelError {
        service: service.to_owned(),
        label: label.to_owned(),
        value: value.to_owned(),
        problem,
    };
    let ports = parse_ports(publish).map_err(|p| err(PUBLISH, publish, p))?;

    let listen_ip = match labels.get(LISTEN) {
        None => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        Some(v) => v.trim().parse().map_err(|_| {
            err(
                LISTEN,
                v,
                "expected an IP address to listen on, e.g. 0.0.0.0, :: or 10.0.0.5".into(),
            )
        })?,
    };
    let balance = keyword(labels, BALANCE, &BALANCES).map_err(|(v, p)| err(BALANCE, &v, p))?;
    let check = keyword(labels, HEALTH, &CHECKS).map_err(|(v, p)| err(HEALTH, &v, p))?;
    let proxy_protocol = keyword(labels, PROXY_PROTOCOL, &PROXY_PROTOCOLS)
        .map_err(|(v, p)| err(PROXY_PROTOCOL, &v, p))?;
    let locality = keyword(labels, LOCALITY, &LOCALITIES).map_err(|(v, p)| err(LOCALITY, &v, p))?;
    let retry_early_close = keyword(labels, RETRY_EARLY_CLOSE, &BOOLS)
        .map_err(|(v, p)| err(RETRY_EARLY_CLOSE, &v, p))?;
    let accept_proxy = match labels.get(ACCEPT_PROXY) {
        None => None,
        Some(v) => {
            let list = limits::accept_proxy(v.split(',').map(str::trim))
                .map_err(|p| err(ACCEPT_PROXY, v, p))?;
            if let Some(dup) = list
                .iter()
                .enumerate()
                .find(|(i, n)| list[..*i].contains(n))
            {
                let problem = format!("{} is listed twice: remove one", dup.1);
                return Err(err(ACCEPT_PROXY, v, problem));
            }
            Some(list)
        }
    };
    let (tls, tls_files) = tls(labels).map_err(|(label, problem)| {
        err(label, labels.get(label).map_or("", String::as_str), problem)
    })?;
    let path = match labels.get(HEALTH_PATH) {
        None => None,
        Some(v) => {
            if limits::health_path(v).is_err() {
                return Err(err(
                    HEALTH_PATH,
                    v,
                    format!(
                        "expected a path starting with '/', without spaces, at most {} bytes, \
                         e.g. /healthz",
                        limits::MAX_HEALTH_PATH
                    ),
                ));
            }
            Some(v.clone())
        }
    };
    let network = match labels.get(NETWORK).map(|v| v.trim()) {
        None => None,
        Some("") => {
            return Err(err(
                NETWORK,
                "",
                "expected a network name or ID, e.g. mesh".into(),
            ))
        }
        Some(v) => Some(v.to_owned()),
    };
    let warnings = labels
        .keys()
        .filter(|k| k.starts_with("mesh.") && !KNOWN.contains(&k.as_str()))
        .map(|k| {
            format!(
                "service {service:?}: unknown label {k} ignored: meshd reads {}",
                KNOWN.join(", ")
            )
        })
        .collect();
    Ok(Some(MeshLabels {
        ports,
        listen_ip,
        network,
        balance,
        check,
        path,
        proxy_protocol,
        retry_early_close,
        accept_proxy,
        locality,
        tls,
        tls_files,
        warnings,
    }))
}

/// `mesh.tls`, `mesh.sni`, `mesh.sni_default`, `mesh.tls.cert`, `mesh.tls.key`, checked
/// as `[service.tls]` is in mesh.toml (the files are only named here). The error is
/// (label, problem).
#[allow(clippy::type_complexity)]
fn tls(
    labels: &BTreeMap<String, String>,
) -> Result<(Option<TlsConfig>, Option<(PathBuf, PathBuf)>), (&'static str, String)> {
    let mode = keyword(labels, TLS, &TLS_MODES).map_err(|(_, p)| (TLS, p))?;
    let sni_default = keyword(labels, SNI_DEFAULT, &BOOLS).map_err(|(_, p)| (SNI_DEFAULT, p))?;
    let Some(terminate) = mode else {
        for label in [SNI, SNI_DEFAULT, TLS_CERT, TLS_KEY] {
            if labels.contains_key(label) {
                return Err((
                    label,
                    "only a TLS service is routed by server name: add the label \
                     mesh.tls=passthrough or mesh.tls=terminate"
                        .into(),
                ));
            }
        }
        return Ok((None, None));
    };
    let files = if terminate {
        let file = |label: &'static str| match labels.get(label).map(|v| v.trim()) {
            Some(v) if v.starts_with('/') && !v.contains(',') => Ok(PathBuf::from(v)),
            Some(_) => Err((
                label,
                "expected the absolute path of a PEM file in meshd's container, e.g. \
                 /run/secrets/api.pem"
                    .into(),
            )),
            None => Err((
                TLS,
                "meshd terminates TLS with a certificate and key in its own container: add \
                 the labels mesh.tls.cert=/run/secrets/NAME.pem and \
                 mesh.tls.key=/run/secrets/NAME.key"
                    .into(),
            )),
        };
        Some((file(TLS_CERT)?, file(TLS_KEY)?))
    } else {
        for label in [TLS_CERT, TLS_KEY] {
            if labels.contains_key(label) {
                return Err((
                    label,
                    "with mesh.tls=passthrough the task holds the certificate: remove it, or \
                     use mesh.tls=terminate"
                        .into(),
                ));
            }
        }
        None
    };
    let mut sni: Vec<String> = Vec::new();
    if let Some(v) = labels.get(SNI) {
        for n in v.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let n = limits::sni_name(n).map_err(|p| (SNI, p))?;
            if sni.contains(&n) {
                return Err((SNI, format!("{n} is listed twice: remove one")));
            }
            sni.push(n);
        }
        if sni.len() > limits::MAX_SNI {
            return Err((
                SNI,
                format!(
                    "{} names: use at most {} (or a wildcard)",
                    sni.len(),
                    limits::MAX_SNI
                ),
            ));
        }
    }
    // A terminating service that names no server takes every name of its port (as in
    // mesh.toml).
    let sni_default = sni_default.unwrap_or(files.is_some() && sni.is_empty());
    if sni.is_empty() && !sni_default {
        return Err((
            TLS,
            "no connection could reach this service: add the label \
             mesh.sni=api.example.com (names, comma-separated) or mesh.sni_default=true"
                .into(),
        ));
    }
    Ok((
        Some(TlsConfig {
            sni,
            sni_default,
            terminate: None,
        }),
        files,
    ))
}

/// The mesh services of Swarm service `service`: `defaults` (the `[defaults]` template)
/// with the labels' overrides, one per published port, without backends. Named `service`
/// for one port, `service-PUBLISHED` for several.
pub fn services(
    service: &str,
    labels: &MeshLabels,
    defaults: &ServiceConfig,
) -> Result<Vec<MeshService>, LabelError> {
    let err = |label: &str, value: String, problem: String| LabelError {
        service: service.to_owned(),
        label: label.to_owned(),
        value,
        problem,
    };
    let mut template = defaults.clone();
    template.backends.clear();
    template.dns = None;
    if let Some(b) = labels.balance {
        template.balance = b;
    }
    if let Some(c) = labels.check {
        template.health.check = c;
    }
    if let Some(p) = labels.proxy_protocol {
        template.proxy_protocol = p;
    }
    if let Some(r) = labels.retry_early_close {
        template.retry_on_early_close = r;
    }
    if let Some(l) = labels.locality {
        template.locality = l;
    }
    if let Some(a) = &labels.accept_proxy {
        template.accept_proxy = a.clone();
    }
    if let Some(path) = &labels.path {
        if template.health.check != CheckKind::Http {
            return Err(err(
                HEALTH_PATH,
                path.clone(),
                "the health check is not http: add the label mesh.health=http".into(),
            ));
        }
        template.health.path = path.clone();
    }
    let several = labels.ports.len() > 1;
    let mut out = Vec::with_capacity(labels.ports.len());
    for &(published, target, protocol) in &labels.ports {
        let name = match (several, protocol) {
            (false, _) => service.to_owned(),
            (true, Protocol::Tcp) => format!("{service}-{published}"),
            (true, Protocol::Udp) => format!("{service}-{published}-udp"),
        };
        if limits::service_name(&name).is_err() {
            return Err(err(
                PUBLISH,
                labels
                    .ports
                    .iter()
                    .map(|(p, t, proto)| match proto {
                        Protocol::Tcp => format!("{p}:{t}"),
                        Protocol::Udp => format!("{p}:{t}/udp"),
                    })
                    .collect::<Vec<_>>()
                    .join(","),
                format!(
                    "the mesh service name {name:?} is not usable: at most {MAX_NAME} letters, \
                     digits, '.', '_' or '-' (rename the Swarm service)"
                ),
            ));
        }
        let mut config = template.clone();
        config.name = name;
        config.listen = vec![SocketAddr::new(labels.listen_ip, published)];
        config.tls = labels.tls.clone();
        if protocol == Protocol::Udp {
            udp(&mut config, labels)
                .map_err(|(label, problem)| err(label, labels_value(labels, label), problem))?;
        }
        out.push(MeshService { config, target });
    }
    Ok(out)
}

/// Turns a TCP template into the UDP service of a `/udp` pair: the health check is the
/// label's (`none` or `tcp`) or none (`[defaults.health] check` is for TCP services, as
/// in mesh.toml); PROXY protocol either way is TCP's. The error is (label, problem).
fn udp(config: &mut ServiceConfig, labels: &MeshLabels) -> Result<(), (&'static str, String)> {
    config.protocol = Protocol::Udp;
    config.health.check = match labels.check {
        None => CheckKind::None,
        Some(k) if limits::UDP_CHECKS.contains(&k) => k,
        Some(k) => {
            return Err((
                HEALTH,
                format!(
                    "health check {:?} cannot check a UDP service (a /udp port in mesh.publish): \
                     use tcp or none",
                    k.name()
                ),
            ))
        }
    };
    if labels
        .proxy_protocol
        .is_some_and(|p| p != ProxyProtocol::Off)
    {
        return Err((
            PROXY_PROTOCOL,
            "PROXY protocol is for TCP: a /udp port in mesh.publish cannot send it".into(),
        ));
    }
    config.proxy_protocol = ProxyProtocol::Off;
    if labels.accept_proxy.as_ref().is_some_and(|a| !a.is_empty()) {
        return Err((
            ACCEPT_PROXY,
            "PROXY protocol is for TCP: a /udp port in mesh.publish cannot accept it".into(),
        ));
    }
    config.accept_proxy.clear();
    if labels.tls.is_some() {
        return Err((
            TLS,
            "TLS is for TCP: a /udp port in mesh.publish cannot be routed by server name".into(),
        ));
    }
    Ok(())
}

/// How a label error shows the label's value (`MeshLabels` keeps parsed values).
fn labels_value(labels: &MeshLabels, label: &str) -> String {
    match label {
        HEALTH => labels
            .check
            .map(|k| k.name().to_owned())
            .unwrap_or_default(),
        PROXY_PROTOCOL => labels
            .proxy_protocol
            .map(|p| format!("{p:?}").to_lowercase())
            .unwrap_or_default(),
        ACCEPT_PROXY => labels
            .accept_proxy
            .as_ref()
            .map(|a| {
                a.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default(),
        TLS if labels.tls_files.is_some() => "terminate".into(),
        TLS if labels.tls.is_some() => "passthrough".into(),
        _ => String::new(),
    }
}

fn parse_ports(s: &str) -> Result<Vec<(u16, u16, Protocol)>, String> {
    const EXPECTED: &str = "expected PUBLISHED:TARGET ports, e.g. 8080:80 (several: \
                            8080:80,8443:443; UDP: 53:53/udp)";
    let port = |p: &str| p.trim().parse::<u16>().ok().filter(|&p| p != 0);
    let mut out: Vec<(u16, u16, Protocol)> = Vec::new();
    for pair in s.split(',') {
        let (pair, protocol) = match pair.trim().rsplit_once('/') {
            None => (pair, Protocol::Tcp),
            Some((p, proto)) => match proto.trim().to_ascii_lowercase().as_str() {
                "tcp" => (p, Protocol::Tcp),
                "udp" => (p, Protocol::Udp),
                _ => {
                    return Err(format!(
                        "{:?} after a port pair: expected /tcp or /udp",
                        proto.trim()
                    ))
                }
            },
        };
        let (published, target) = pair
            .split_once(':')
            .and_then(|(a, b)| Some((port(a)?, port(b)?)))
            .ok_or_else(|| EXPECTED.to_owned())?;
        if out
            .iter()
            .any(|(p, _, proto)| *p == published && *proto == protocol)
        {
            return Err(format!(
                "published port {published} is listed twice: publish each port once"
            ));
        }
        out.push((published, target, protocol));
    }
    Ok(out)
}

const BOOLS: [(&str, bool); 2] = [("true", true), ("false", false)];
/// `mesh.tls` values: whether meshd terminates.
const TLS_MODES: [(&str, bool); 2] = [("passthrough", false), ("terminate", true)];

/// The value of label `key` from `table`; the error is (value, problem).
fn keyword<T: Copy>(
    labels: &BTreeMap<String, String>,
    key: &str,
    table: &[(&str, T)],
) -> Result<Option<T>, (String, String)> {
    let Some(v) = labels.get(key) else {
        return Ok(None);
    };
    table
        .iter()
        .find(|(k, _)| *k == v.trim())
        .map(|&(_, t)| Some(t))
        .ok_or_else(|| {
            let names: Vec<&str> = table.iter().map(|(k, _)| *k).collect();
            (v.clone(), format!("expected one of {}", names.join(", ")))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn defaults() -> ServiceConfig {
        Config::parse(std::path::Path::new("mesh.toml"), "[discovery.docker]\n")
            .unwrap()
            .defaults
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn err(pairs: &[(&str, &str)]) -> String {
        let l = labels(pairs);
        match parse("web", &l) {
            Err(e) => e.to_string(),
            Ok(Some(m)) => services("web", &m, &defaults()).unwrap_err().to_string(),
            Ok(None) => panic!("not opted in"),
        }
    }

    #[test]
    fn not_opted_in_without_publish() {
        assert_eq!(parse("web", &labels(&[("mesh.balance", "p2c")])), Ok(None));
        assert_eq!(parse("web", &BTreeMap::new()), Ok(None));
    }

    #[test]
    fn one_port_keeps_the_name_and_defaults() {
        let d = defaults();
        let m = parse("web", &labels(&[("mesh.publish", "8080:80")]))
            .unwrap()
            .unwrap();
        let s = services("web", &m, &d).unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].target, 80);
        assert_eq!(s[0].config.name, "web");
        assert_eq!(s[0].config.listen, vec!["0.0.0.0:8080".parse().unwrap()]);
        assert!(s[0].config.backends.is_empty());
        let mut expect = d.clone();
        expect.name = "web".into();
        expect.listen = s[0].config.listen.clone();
        assert_eq!(s[0].config, expect);
    }

    #[test]
    fn several_ports_and_overrides() {
        let m = parse(
            "api",
            &labels(&[
                ("mesh.publish", " 8080:80 , 8443:443"),
                ("mesh.balance", "maglev"),
                ("mesh.health", "http"),
                ("mesh.health.path", "/ready"),
                ("mesh.proxy_protocol", "v2"),
                ("mesh.listen", "::"),
                ("mesh.network", "front"),
                ("mesh.retry_early_close", "true"),
                ("mesh.accept_proxy", "10.0.0.0/8, 127.0.0.1"),
                ("mesh.locality", "prefer_local"),
                ("mesh.colour", "blue"),
                ("com.example.other", "x"),
            ]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(m.network.as_deref(), Some("front"));
        assert_eq!(m.warnings.len(), 1);
        assert!(m.warnings[0].contains("unknown label mesh.colour"), "{m:?}");
        let s = services("api", &m, &defaults()).unwrap();
        let names: Vec<&str> = s.iter().map(|s| s.config.name.as_str()).collect();
        assert_eq!(names, ["api-8080", "api-8443"]);
        assert_eq!(s[1].target, 443);
        assert_eq!(s[1].config.listen, vec!["[::]:8443".parse().unwrap()]);
        assert_eq!(s[0].config.balance, Balance::Maglev);
        assert_eq!(s[0].config.health.check, CheckKind::Http);
        assert_eq!(s[0].config.health.path, "/ready");
        assert_eq!(s[0].config.proxy_protocol, ProxyProtocol::V2);
        assert_eq!(s[1].config.locality, Locality::PreferLocal);
        assert!(s[0].config.retry_on_early_close && s[1].config.retry_on_early_close);
        let want: Vec<ipnet::IpNet> = vec![
            "10.0.0.0/8".parse().unwrap(),
            "127.0.0.1/32".parse().unwrap(),
        ];
        assert_eq!(s[1].config.accept_proxy, want);
        // Absent: the default; false overrides a default of true.
        let m = parse("api", &labels(&[("mesh.publish", "8080:80")]))
            .unwrap()
            .unwrap();
        assert_eq!(m.retry_early_close, None);
        let mut d = defaults();
        d.retry_on_early_close = true;
        let m = parse(
            "api",
            &labels(&[
                ("mesh.publish", "8080:80"),
                ("mesh.retry_early_close", "false"),
            ]),
        )
        .unwrap()
        .unwrap();
        assert!(
            !services("api", &m, &d).unwrap()[0]
                .config
                .retry_on_early_close
        );
    }

    #[test]
    fn errors_name_the_service_and_the_label() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[
                    ("mesh.publish", "8080:80"),
                    ("mesh.retry_early_close", "yes"),
                ],
                r#"service "web": label mesh.retry_early_close="yes": expected one of true, false"#,
            ),
            (
                &[("mesh.publish", "80:abc")],
                r#"service "web": label mesh.publish="80:abc": expected PUBLISHED:TARGET ports, e.g. 8080:80 (several: 8080:80,8443:443; UDP: 53:53/udp)"#,
            ),
            (
                &[("mesh.publish", "8080")],
                r#"service "web": label mesh.publish="8080": expected PUBLISHED:TARGET ports"#,
            ),
            (
                &[("mesh.publish", "0:80")],
                r#"label mesh.publish="0:80": expected PUBLISHED:TARGET"#,
            ),
            (
                &[("mesh.publish", "8080:80,")],
                r#"label mesh.publish="8080:80,": expected"#,
            ),
            (
                &[("mesh.publish", "8080:80,8080:81")],
                "published port 8080 is listed twice",
            ),
            (
                &[("mesh.publish", "80:80"), ("mesh.balance", "random")],
                r#"label mesh.balance="random": expected one of round_robin, least_conn, p2c, maglev"#,
            ),
            (
                &[("mesh.publish", "80:80"), ("mesh.locality", "local")],
                r#"label mesh.locality="local": expected one of any, prefer_local, local_only"#,
            ),
            (
                &[("mesh.publish", "80:80"), ("mesh.health", "grpc")],
                r#"label mesh.health="grpc": expected one of none, tcp, http"#,
            ),
            (
                &[("mesh.publish", "80:80"), ("mesh.proxy_protocol", "v3")],
                r#"label mesh.proxy_protocol="v3": expected one of off, v1, v2"#,
            ),
            (
                &[("mesh.publish", "80:80"), ("mesh.listen", "localhost")],
                r#"label mesh.listen="localhost": expected an IP address"#,
            ),
            (
                &[("mesh.publish", "80:80"), ("mesh.health.path", "healthz")],
                r#"label mesh.health.path="healthz": expected a path starting with '/'"#,
            ),
            (
                &[("mesh.publish", "80:80"), ("mesh.health.path", "/h")],
                r#"label mesh.health.path="/h": the health check is not http: add the label mesh.health=http"#,
            ),
            (
                &[
                    ("mesh.publish", "80:80"),
                    ("mesh.accept_proxy", "10.0.0.0/8,10.1.0.0/8"),
                ],
                r#"label mesh.accept_proxy="10.0.0.0/8,10.1.0.0/8": CIDR "10.1.0.0/8" in accept_proxy has bits set past its prefix: use "10.0.0.0/8""#,
            ),
            (
                &[
                    ("mesh.publish", "80:80"),
                    ("mesh.accept_proxy", "10.0.0.0/8,"),
                ],
                r#"label mesh.accept_proxy="10.0.0.0/8,": invalid CIDR "" in accept_proxy"#,
            ),
            (
                &[
                    ("mesh.publish", "80:80"),
                    ("mesh.accept_proxy", "::1,::1/128"),
                ],
                r#"label mesh.accept_proxy="::1,::1/128": ::1/128 is listed twice: remove one"#,
            ),
            (
                &[("mesh.publish", "80:80"), ("mesh.network", " ")],
                r#"label mesh.network="": expected a network name or ID"#,
            ),
        ];
        for (pairs, want) in cases {
            let got = err(pairs);
            assert!(got.contains(want), "{pairs:?}:\n got  {got}\n want {want}");
            assert!(got.starts_with(r#"service "web": label mesh."#), "{got}");
            assert!(!got.contains('\n'));
        }
    }

    #[test]
    fn long_names_are_refused() {
        let name = "s".repeat(62);
        let m = parse(&name, &labels(&[("mesh.publish", "8080:1,8081:2")]))
            .unwrap()
            .unwrap();
        let e = services(&name, &m, &defaults()).unwrap_err().to_string();
        assert!(e.contains("is not usable"), "{e}");
        // One port: the Swarm name itself (at most 63 characters) is fine.
        let m = parse(&name, &labels(&[("mesh.publish", "1:1")]))
            .unwrap()
            .unwrap();
        assert!(services(&name, &m, &defaults()).is_ok());
    }

    #[test]
    fn a_udp_pair_is_a_udp_service_beside_the_tcp_one_on_the_same_port() {
        let mut d = defaults();
        d.health.check = CheckKind::Http;
        d.proxy_protocol = ProxyProtocol::V2;
        let m = parse("dns", &labels(&[("mesh.publish", "53:53, 53:53/UDP")]))
            .unwrap()
            .unwrap();
        let s = services("dns", &m, &d).unwrap();
        let got: Vec<(&str, Protocol, CheckKind, ProxyProtocol)> = s
            .iter()
            .map(|s| {
                (
                    s.config.name.as_str(),
                    s.config.protocol,
                    s.config.health.check,
                    s.config.proxy_protocol,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("dns-53", Protocol::Tcp, CheckKind::Http, ProxyProtocol::V2),
                // [defaults.health] check and proxy_protocol are TCP's, as in mesh.toml.
                (
                    "dns-53-udp",
                    Protocol::Udp,
                    CheckKind::None,
                    ProxyProtocol::Off
                ),
            ]
        );
        assert_eq!(s[1].target, 53);
        assert_eq!(s[1].config.listen, vec!["0.0.0.0:53".parse().unwrap()]);

        // One UDP pair keeps the Swarm name; a tcp check may be asked for.
        let m = parse(
            "dns",
            &labels(&[("mesh.publish", "5353:53/udp"), ("mesh.health", "tcp")]),
        )
        .unwrap()
        .unwrap();
        let s = services("dns", &m, &d).unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].config.name, "dns");
        assert_eq!(s[0].config.protocol, Protocol::Udp);
        assert_eq!(s[0].config.health.check, CheckKind::Tcp);
    }

    #[test]
    fn udp_pairs_refuse_what_udp_cannot_do() {
        for (pairs, want) in [
            (
                &[("mesh.publish", "53:53/sctp")][..],
                r#"label mesh.publish="53:53/sctp": "sctp" after a port pair: expected /tcp or /udp"#,
            ),
            (
                &[("mesh.publish", "53:53/udp,53:54/udp")][..],
                "published port 53 is listed twice",
            ),
            (
                &[("mesh.publish", "53:53/udp"), ("mesh.health", "http")][..],
                r#"label mesh.health="http": health check "http" cannot check a UDP service"#,
            ),
            (
                &[("mesh.publish", "53:53/udp"), ("mesh.proxy_protocol", "v1")][..],
                "PROXY protocol is for TCP: a /udp port in mesh.publish cannot send it",
            ),
            (
                &[
                    ("mesh.publish", "53:53/udp"),
                    ("mesh.accept_proxy", "10.0.0.0/8"),
                ][..],
                r#"label mesh.accept_proxy="10.0.0.0/8": PROXY protocol is for TCP"#,
            ),
        ] {
            let e = err(pairs);
            assert!(e.contains(want), "{pairs:?}: {e}");
        }
    }

    #[test]
    fn tls_labels_route_the_tcp_ports_by_server_name() {
        let m = parse(
            "api",
            &labels(&[
                ("mesh.publish", "443:8443"),
                ("mesh.tls", "passthrough"),
                ("mesh.sni", " API.Example.com. , *.example.com"),
            ]),
        )
        .unwrap()
        .unwrap();
        let s = services("api", &m, &defaults()).unwrap();
        let tls = s[0].config.tls.as_ref().unwrap();
        assert_eq!(tls.sni, ["api.example.com", "*.example.com"]);
        assert!(!tls.sni_default);

        let m = parse(
            "www",
            &labels(&[
                ("mesh.publish", "443:443"),
                ("mesh.tls", "passthrough"),
                ("mesh.sni_default", "true"),
            ]),
        )
        .unwrap()
        .unwrap();
        let s = services("www", &m, &defaults()).unwrap();
        let tls = s[0].config.tls.as_ref().unwrap();
        assert!(tls.sni.is_empty() && tls.sni_default);

        // Terminate: the files named (loaded by the provider), every name by default.
        let m = parse(
            "shop",
            &labels(&[
                ("mesh.publish", "8443:8080"),
                ("mesh.tls", "terminate"),
                ("mesh.tls.cert", "/run/secrets/shop.pem"),
                ("mesh.tls.key", " /run/secrets/shop.key"),
            ]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            m.tls_files,
            Some((
                "/run/secrets/shop.pem".into(),
                "/run/secrets/shop.key".into()
            ))
        );
        let s = services("shop", &m, &defaults()).unwrap();
        let tls = s[0].config.tls.as_ref().unwrap();
        assert!(tls.sni.is_empty() && tls.sni_default && tls.terminate.is_none());

        // Without mesh.tls the service is plain TCP.
        let m = parse("web", &labels(&[("mesh.publish", "80:80")]))
            .unwrap()
            .unwrap();
        assert!(services("web", &m, &defaults()).unwrap()[0]
            .config
            .tls
            .is_none());
    }

    #[test]
    fn tls_labels_that_cannot_route_are_refused_with_the_label() {
        let cases: [(&[(&str, &str)], &str); 10] = [
            (
                &[("mesh.tls", "passthrough")],
                r#"label mesh.tls="passthrough": no connection could reach this service: add the label mesh.sni"#,
            ),
            (
                &[("mesh.tls", "terminate"), ("mesh.sni", "a.test")],
                r#"label mesh.tls="terminate": meshd terminates TLS with a certificate and key in its own container: add the labels mesh.tls.cert=/run/secrets/NAME.pem"#,
            ),
            (
                &[
                    ("mesh.tls", "terminate"),
                    ("mesh.tls.cert", "api.pem"),
                    ("mesh.tls.key", "/run/secrets/api.key"),
                ],
                r#"label mesh.tls.cert="api.pem": expected the absolute path of a PEM file"#,
            ),
            (
                &[
                    ("mesh.tls", "passthrough"),
                    ("mesh.sni", "a.test"),
                    ("mesh.tls.key", "/run/secrets/api.key"),
                ],
                r#"label mesh.tls.key="/run/secrets/api.key": with mesh.tls=passthrough the task holds the certificate"#,
            ),
            (
                &[("mesh.tls.cert", "/run/secrets/api.pem")],
                r#"label mesh.tls.cert="/run/secrets/api.pem": only a TLS service"#,
            ),
            (
                &[("mesh.sni", "a.test")],
                r#"label mesh.sni="a.test": only a TLS service is routed by server name: add the label mesh.tls=passthrough or mesh.tls=terminate"#,
            ),
            (
                &[("mesh.sni_default", "true")],
                "label mesh.sni_default=\"true\": only a TLS service",
            ),
            (
                &[("mesh.tls", "passthrough"), ("mesh.sni", "a.test,A.test.")],
                r#"label mesh.sni="a.test,A.test.": a.test is listed twice"#,
            ),
            (
                &[("mesh.tls", "passthrough"), ("mesh.sni", "a.*.test")],
                r#"label mesh.sni="a.*.test": invalid sni name"#,
            ),
            (
                &[("mesh.tls", "passthrough"), ("mesh.sni_default", "yes")],
                r#"label mesh.sni_default="yes": expected one of true, false"#,
            ),
        ];
        for (extra, want) in cases {
            let mut pairs = vec![("mesh.publish", "443:443")];
            pairs.extend_from_slice(extra);
            let e = err(&pairs);
            assert!(e.starts_with(r#"service "web": "#), "{e}");
            assert!(e.contains(want), "{e}\nwanted: {want}");
        }
        let e = err(&[
            ("mesh.publish", "53:53/udp"),
            ("mesh.tls", "passthrough"),
            ("mesh.sni", "a.test"),
        ]);
        assert!(e.contains("TLS is for TCP"), "{e}");
    }
}
