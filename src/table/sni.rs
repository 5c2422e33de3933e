//! SNI routes: which service of a listen address shared by `[service.tls]` services takes
//! a connection, by the ClientHello's normalised server name. Part of the published
//! `RoutingTable`, so a reload that moves a name swaps it with the services it names.
//!
//! Lookup order: the exact name, then a wildcard (`*.example.com` stands for exactly one
//! label: the name minus its first label is looked up), then the address's default.
//! Both lists are sorted: a lookup is two binary searches over `&str`, no allocation.
//!
//! Invariant: no I/O, no lock; built by the control plane off the accept path.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use super::ServiceState;
use crate::config::ServiceConfig;

/// Outcomes of ClientHellos on one SNI listen address that no service took (the
/// `meshd_tls_handshakes_total` series labelled with the address). Kept by the control
/// plane for as long as the address is listened on: reloads do not reset them.
#[derive(Debug)]
pub struct SniStats {
    /// The listen address, as the `service` label of these series.
    pub label: Arc<str>,
    /// No service's name matched and there is no default: alert `unrecognized_name` sent.
    pub unrecognized_name: AtomicU64,
    /// Not a TLS ClientHello (or a broken one).
    pub malformed: AtomicU64,
    /// Larger than 16 KiB of records.
    pub too_large: AtomicU64,
    /// Not complete within `client_hello_timeout`.
    pub timeout: AtomicU64,
    /// The client closed (or reset) before its hello was complete.
    pub closed: AtomicU64,
    /// A trusted source's PROXY header, read before the hello, was missing or bad.
    pub proxy_header: AtomicU64,
    /// The name picked a service that the table no longer holds (a reload removing it).
    pub no_service: AtomicU64,
}

impl SniStats {
    pub fn new(addr: SocketAddr) -> SniStats {
        SniStats {
            label: addr.to_string().into(),
            unrecognized_name: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
            too_large: AtomicU64::new(0),
            timeout: AtomicU64::new(0),
            closed: AtomicU64::new(0),
            proxy_header: AtomicU64::new(0),
            no_service: AtomicU64::new(0),
        }
    }
}

/// The routes of one listen address.
#[derive(Debug)]
pub struct SniRoutes {
    pub addr: SocketAddr,
    /// Read before the name is known, so the same for every service of the address
    /// (validation sees to it): sources whose connections start with a PROXY header.
    pub accept_proxy: Vec<ipnet::IpNet>,
    /// The deadline for the PROXY header (if any) and the whole ClientHello.
    pub client_hello_timeout: Duration,
    /// Sorted by name.
    exact: Vec<(Box<str>, Arc<ServiceState>)>,
    /// `*.example.com` as `example.com`, sorted.
    wildcard: Vec<(Box<str>, Arc<ServiceState>)>,
    default: Option<Arc<ServiceState>>,
    pub stats: Arc<SniStats>,
}

/// How a name found its service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// An exact name or a wildcard.
    Name,
    /// The address's `sni_default`.
    Default,
}

impl SniRoutes {
    /// The routes of `addr` from the `[service.tls]` services that list it (with their
    /// state). Validation has made names unique per address and left one default at most;
    /// should two services still claim one (a provider's service), the first listed wins.
    pub fn build(
        addr: SocketAddr,
        stats: Arc<SniStats>,
        services: &[(&ServiceConfig, Arc<ServiceState>)],
    ) -> SniRoutes {
        let mut exact: Vec<(Box<str>, Arc<ServiceState>)> = Vec::new();
        let mut wildcard: Vec<(Box<str>, Arc<ServiceState>)> = Vec::new();
        let mut default = None;
        let mut first: Option<&ServiceConfig> = None;
        for (cfg, state) in services {
            let Some(tls) = &cfg.tls else { continue };
            if !cfg.listen.contains(&addr) {
                continue;
            }
            first.get_or_insert(cfg);
            for n in &tls.sni {
                let (list, key) = match n.strip_prefix("*.") {
                    Some(suffix) => (&mut wildcard, suffix),
                    None => (&mut exact, n.as_str()),
                };
                if !list.iter().any(|(k, _)| &**k == key) {
                    list.push((key.into(), state.clone()));
                }
            }
            if tls.sni_default && default.is_none() {
                default = Some(state.clone());
            }
        }
        exact.sort_by(|a, b| a.0.cmp(&b.0));
        wildcard.sort_by(|a, b| a.0.cmp(&b.0));
        SniRoutes {
            addr,
            accept_proxy: first.map(|c| c.accept_proxy.clone()).unwrap_or_default(),
            client_hello_timeout: first
                .map_or(crate::config::defaults::CLIENT_HELLO_TIMEOUT, |c| {
                    c.client_hello_timeout
                }),
            exact,
            wildcard,
            default,
            stats,
        }
    }

    /// The service for `name` (normalised; `None`: the client sent no usable name): exact
    /// match, then a one-label wildcard, then the default.
    pub fn route(&self, name: Option<&str>) -> Option<(&Arc<ServiceState>, Via)> {
        if let Some(name) = name {
            if let Ok(i) = self.exact.binary_search_by(|(k, _)| (**k).cmp(name)) {
                return Some((&self.exact[i].1, Via::Name));
            }
            if let Some((label, rest)) = name.split_once('.') {
                if !label.is_empty() {
                    if let Ok(i) = self.wildcard.binary_search_by(|(k, _)| (**k).cmp(rest)) {
                        return Some((&self.wildcard[i].1, Via::Name));
                    }
                }
            }
        }
        self.default.as_ref().map(|s| (s, Via::Default))
    }

    /// Whether the routes are the same as `other`'s (same names to the same services).
    pub fn same_as(&self, other: &SniRoutes) -> bool {
        let eq = |a: &[(Box<str>, Arc<ServiceState>)], b: &[(Box<str>, Arc<ServiceState>)]| {
            a.len() == b.len()
                && a.iter()
                    .zip(b)
                    .all(|(x, y)| x.0 == y.0 && Arc::ptr_eq(&x.1, &y.1))
        };
        self.addr == other.addr
            && self.accept_proxy == other.accept_proxy
            && self.client_hello_timeout == other.client_hello_timeout
            && eq(&self.exact, &other.exact)
            && eq(&self.wildcard, &other.wildcard)
            && match (&self.default, &other.default) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, TlsConfig};

    #[test]
    fn exact_then_one_label_wildcard_then_default() {
        let cfg = Config::parse(
            std::path::Path::new("t.toml"),
            r#"
[[service]]
name = "api"
listen = ["127.0.0.1:8443"]
backends = ["127.0.0.1:9001"]
[service.tls]
mode = "passthrough"
sni = ["api.example.com"]

[[service]]
name = "wild"
listen = ["127.0.0.1:8443"]
backends = ["127.0.0.1:9002"]
[service.tls]
mode = "passthrough"
sni = ["*.example.com", "x.test"]
sni_default = true
"#,
        )
        .unwrap();
        let addr: SocketAddr = "127.0.0.1:8443".parse().unwrap();
        let api = Arc::new(ServiceState::new("api".into(), 0));
        let wild = Arc::new(ServiceState::new("wild".into(), 1));
        let r = SniRoutes::build(
            addr,
            Arc::new(SniStats::new(addr)),
            &[
                (&cfg.services[0], api.clone()),
                (&cfg.services[1], wild.clone()),
            ],
        );
        let to = |n: Option<&str>| r.route(n).map(|(s, via)| (s.name.to_string(), via));
        assert_eq!(to(Some("api.example.com")), Some(("api".into(), Via::Name)));
        assert_eq!(to(Some("b.example.com")), Some(("wild".into(), Via::Name)));
        assert_eq!(to(Some("x.test")), Some(("wild".into(), Via::Name)));
        // Two labels are not one: the default takes it.
        assert_eq!(
            to(Some("a.b.example.com")),
            Some(("wild".into(), Via::Default))
        );
        assert_eq!(to(Some("example.com")), Some(("wild".into(), Via::Default)));
        assert_eq!(to(None), Some(("wild".into(), Via::Default)));

        // Without a default, an unknown name has no route.
        let mut no_default = cfg.services[1].clone();
        no_default.tls = Some(TlsConfig {
            sni: vec!["*.example.com".into()],
            sni_default: false,
            terminate: None,
        });
        let r = SniRoutes::build(
            addr,
            Arc::new(SniStats::new(addr)),
            &[(&no_default, wild.clone())],
        );
        assert!(r.route(Some("a.b.example.com")).is_none());
        assert!(r.route(None).is_none());
        assert!(r.route(Some("a.example.com")).is_some());
    }
}
