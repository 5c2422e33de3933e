//! Reconcile: the desired state against the running services, as a pure diff.
//!
//! The desired state is the config's services, each with its endpoint sets by source, plus
//! the services only a discovery provider publishes (`desired`). `diff` compares it with
//! the running services: which listen addresses to bind (in order; one that another running
//! service still holds is an error), which services to remove (their backends drain), which
//! listeners to close, and which running service each desired one is. The caller
//! (`Control::reconcile`) binds, then applies; each desired service's backends go through
//! `lifecycle::set_source`, which decides which to add and which to drain.
//!
//! Invariant: no I/O, no clock.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;

use super::lifecycle::{Endpoint, Endpoints, Source};
use super::ControlError;
use crate::config::{BackendConfig, Config, Protocol, ServiceConfig};

/// A desired service and its endpoint sets by source.
pub type Desired = (ServiceConfig, Vec<(Source, Endpoints)>);

/// A service's `backends` as one source's endpoints.
pub fn endpoints_of(backends: &[BackendConfig]) -> Endpoints {
    backends
        .iter()
        .map(|b| Endpoint {
            addr: b.addr,
            weight: b.weight,
            id: b.id.clone(),
            local: b.local,
        })
        .collect()
}

/// The services meshd should run: the config's, each with its endpoint sets by source
/// (`endpoints`: providers' sets by (source, service name)), plus the services that only a
/// provider publishes (`provided`). A configured service's settings win over a provider's
/// service of the same name, which then gives only its endpoints. O(services): names are
/// looked up in hash maps (1,000 provided services took ~500,000 name comparisons per
/// reconcile with linear scans).
pub fn desired(
    config: &Config,
    endpoints: &[((Source, String), Endpoints)],
    provided: &[(Source, Vec<ServiceConfig>)],
) -> Vec<Desired> {
    let mut given: HashMap<(Source, &str), &Endpoints> = HashMap::with_capacity(endpoints.len());
    for ((src, n), v) in endpoints {
        given.entry((*src, n.as_str())).or_insert(v);
    }
    // The first service of each name per source (as the scan it replaces found it).
    let mut by_name: HashMap<(Source, &str), &ServiceConfig> = HashMap::new();
    for (src, list) in provided {
        for p in list {
            by_name.entry((*src, p.name.as_str())).or_insert(p);
        }
    }
    let mut out = Vec::with_capacity(config.services.len());
    let mut taken: HashSet<&str> = HashSet::with_capacity(config.services.len());
    for s in &config.services {
        taken.insert(s.name.as_str());
        let mut sets = vec![(Source::Static, endpoints_of(&s.backends))];
        for src in [Source::Dns, Source::Docker] {
            // Endpoints given for this service, or the backends of a provider's service
            // of the same name (the configured service's settings win).
            let set = match given.get(&(src, s.name.as_str())) {
                Some(v) => (*v).clone(),
                None => by_name
                    .get(&(src, s.name.as_str()))
                    .map(|p| endpoints_of(&p.backends))
                    .unwrap_or_default(),
            };
            sets.push((src, set));
        }
        out.push((s.clone(), sets));
    }
    for (src, list) in provided {
        for s in list {
            if !taken.insert(s.name.as_str()) {
                continue;
            }
            let sets = vec![(*src, endpoints_of(&s.backends))];
            out.push((s.clone(), sets));
        }
    }
    out
}

/// A running (not removed) service as `diff` sees it.
#[derive(Debug, Clone)]
pub struct Running<'a> {
    /// Its index in `Control::services`.
    pub index: usize,
    pub name: &'a str,
    /// Its listeners: a TCP and a UDP one may share an address.
    pub listen: Vec<(Protocol, SocketAddr)>,
}

/// One step of binding the desired listeners, in the order the config lists them.
#[derive(Debug)]
pub enum Listen {
    /// Bind `addr` for desired service `service` (an index in the desired list), with
    /// that service's protocol.
    Bind {
        service: usize,
        protocol: Protocol,
        addr: SocketAddr,
    },
    /// Bind `addr` for the `[service.tls]` services that share it (desired service
    /// `service` is the first of them: its backlog).
    BindSni { service: usize, addr: SocketAddr },
    /// The address is still held by another running service.
    Held(ControlError),
}

/// What to change so that the running services match the desired ones.
#[derive(Debug, Default)]
pub struct Diff {
    /// New listen addresses to bind, first: if one fails, nothing has changed yet.
    pub listen: Vec<Listen>,
    /// Running services no longer desired (indices): listeners closed, backends drained.
    pub remove: Vec<usize>,
    /// Listeners of running services that their config no longer lists (or lists with
    /// another protocol).
    pub close: Vec<(usize, Protocol, SocketAddr)>,
    /// For each desired service (same order): the running service it is, or `None` (new).
    pub matched: Vec<Option<usize>>,
    /// Every address the desired `[service.tls]` services listen on, in order: one SNI
    /// listener each.
    pub sni: Vec<SocketAddr>,
    /// Running SNI listeners no desired service lists any more.
    pub sni_close: Vec<SocketAddr>,
}

/// Who holds an SNI listener (for `ControlError::ListenHeld`).
const SNI_OWNER: &str = "[service.tls] services sharing it";

/// Compares the desired services with the running ones. O(services + listeners): a config
/// of n services costs O(n) lookups, not O(n²) (1,000 services took ~10^6 string
/// comparisons per reload).
/// `sni_running`: the SNI listeners (addresses shared by `[service.tls]` services, owned
/// by no one service) that are open.
pub fn diff(running: &[Running<'_>], desired: &[Desired], sni_running: &[SocketAddr]) -> Diff {
    let mut live: HashMap<&str, usize> = HashMap::with_capacity(running.len());
    let mut listening: HashMap<(Protocol, SocketAddr), &Running<'_>> = HashMap::new();
    for r in running {
        live.insert(r.name, r.index);
        for a in &r.listen {
            listening.insert(*a, r);
        }
    }
    let sni_live: HashSet<SocketAddr> = sni_running.iter().copied().collect();
    let mut sni_wanted: HashSet<SocketAddr> = HashSet::new();
    let mut d = Diff::default();
    for (k, (svc, _)) in desired.iter().enumerate() {
        for &addr in &svc.listen {
            if svc.tls.is_some() && svc.protocol == Protocol::Tcp {
                if !sni_wanted.insert(addr) {
                    continue;
                }
                d.sni.push(addr);
                if sni_live.contains(&addr) {
                    continue;
                }
                d.listen.push(match listening.get(&(Protocol::Tcp, addr)) {
                    Some(owner) => Listen::Held(ControlError::ListenHeld {
                        service: svc.name.clone(),
                        addr,
                        owner: owner.name.to_string(),
                    }),
                    None => Listen::BindSni { service: k, addr },
                });
                continue;
            }
            if svc.protocol == Protocol::Tcp && sni_live.contains(&addr) {
                d.listen.push(Listen::Held(ControlError::ListenHeld {
                    service: svc.name.clone(),
                    addr,
                    owner: SNI_OWNER.to_string(),
                }));
                continue;
            }
            match listening.get(&(svc.protocol, addr)) {
                Some(owner) if owner.name == svc.name => {}
                Some(owner) => d.listen.push(Listen::Held(ControlError::ListenHeld {
                    service: svc.name.clone(),
                    addr,
                    owner: owner.name.to_string(),
                })),
                None => d.listen.push(Listen::Bind {
                    service: k,
                    protocol: svc.protocol,
                    addr,
                }),
            }
        }
    }
    let wanted: HashSet<&str> = desired.iter().map(|(s, _)| s.name.as_str()).collect();
    d.remove = running
        .iter()
        .filter(|r| !wanted.contains(r.name))
        .map(|r| r.index)
        .collect();
    for (svc, _) in desired {
        let index = live.get(svc.name.as_str()).copied();
        if let Some(r) = index.and_then(|i| running.iter().find(|r| r.index == i)) {
            for &(p, a) in &r.listen {
                // A service that turns into a `[service.tls]` one gives its own listeners
                // up (the shared SNI listener is bound in a later reload: `Held`).
                if p != svc.protocol || !svc.listen.contains(&a) || svc.tls.is_some() {
                    d.close.push((r.index, p, a));
                }
            }
        }
        d.matched.push(index);
    }
    d.sni_close = sni_running
        .iter()
        .filter(|a| !sni_wanted.contains(a))
        .copied()
        .collect();
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::parse(std::path::Path::new("t.toml"), text).unwrap()
    }

    const TWO: &str = r#"
[[service]]
name = "web"
listen = ["127.0.0.1:8080", "127.0.0.1:8081"]
backends = [{ addr = "127.0.0.1:9001" }]

[[service]]
name = "api"
listen = ["127.0.0.1:8090"]
backends = [{ addr = "127.0.0.1:9002" }]
"#;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn tcp(s: &str) -> (Protocol, SocketAddr) {
        (Protocol::Tcp, addr(s))
    }

    #[test]
    fn a_protocol_is_part_of_a_listener() {
        // A UDP service next to a TCP one on the same address: both bound.
        let both = r#"
[[service]]
name = "dns-tcp"
listen = ["127.0.0.1:5353"]
backends = ["127.0.0.1:53"]

[[service]]
name = "dns"
protocol = "udp"
listen = ["127.0.0.1:5353"]
backends = ["127.0.0.1:53"]
"#;
        let d = diff(&[], &desired(&config(both), &[], &[]), &[]);
        let binds: Vec<(usize, Protocol)> = d
            .listen
            .iter()
            .map(|l| match l {
                Listen::Bind {
                    service, protocol, ..
                } => (*service, *protocol),
                l => panic!("{l:?}"),
            })
            .collect();
        assert_eq!(binds, [(0, Protocol::Tcp), (1, Protocol::Udp)]);

        // A service that turns from TCP to UDP: its TCP listener closes, a UDP one binds.
        let running = [Running {
            index: 0,
            name: "dns",
            listen: vec![tcp("127.0.0.1:5353")],
        }];
        let udp_only = r#"
[[service]]
name = "dns"
protocol = "udp"
listen = ["127.0.0.1:5353"]
backends = ["127.0.0.1:53"]
"#;
        let d = diff(&running, &desired(&config(udp_only), &[], &[]), &[]);
        assert_eq!(d.close, [(0, Protocol::Tcp, addr("127.0.0.1:5353"))]);
        assert!(matches!(
            d.listen[..],
            [Listen::Bind {
                service: 0,
                protocol: Protocol::Udp,
                ..
            }]
        ));
    }

    #[test]
    fn a_first_config_binds_everything() {
        let want = desired(&config(TWO), &[], &[]);
        let d = diff(&[], &want, &[]);
        let binds: Vec<(usize, SocketAddr)> = d
            .listen
            .iter()
            .map(|l| match l {
                Listen::Bind { service, addr, .. } => (*service, *addr),
                l => panic!("{l:?}"),
            })
            .collect();
        assert_eq!(
            binds,
            [
                (0, addr("127.0.0.1:8080")),
                (0, addr("127.0.0.1:8081")),
                (1, addr("127.0.0.1:8090"))
            ]
        );
        assert_eq!(d.matched, [None, None]);
        assert!(d.remove.is_empty() && d.close.is_empty());
        assert_eq!(want[0].1[0].0, Source::Static);
        assert_eq!(want[0].1[0].1, [Endpoint::at(addr("127.0.0.1:9001"), 100)]);
    }

    #[test]
    fn a_reload_closes_removes_and_refuses_a_moved_address() {
        let running = [
            Running {
                index: 0,
                name: "web",
                listen: vec![tcp("127.0.0.1:8080"), tcp("127.0.0.1:8081")],
            },
            Running {
                index: 1,
                name: "old",
                listen: vec![tcp("127.0.0.1:7000")],
            },
            Running {
                index: 2,
                name: "api",
                listen: vec![tcp("127.0.0.1:8090")],
            },
        ];
        // web drops 8081 and takes api's 8090 in the same reload; "old" is gone.
        let want = desired(
            &config(
                r#"
[[service]]
name = "web"
listen = ["127.0.0.1:8080", "127.0.0.1:8090"]
backends = [{ addr = "127.0.0.1:9001" }]

[[service]]
name = "api"
listen = ["127.0.0.1:8091"]
backends = [{ addr = "127.0.0.1:9002" }]
"#,
            ),
            &[],
            &[],
        );
        let d = diff(&running, &want, &[]);
        assert_eq!(d.matched, [Some(0), Some(2)]);
        assert_eq!(d.remove, [1]);
        assert_eq!(
            d.close,
            [
                (0, Protocol::Tcp, addr("127.0.0.1:8081")),
                (2, Protocol::Tcp, addr("127.0.0.1:8090"))
            ]
        );
        assert_eq!(d.listen.len(), 2);
        match &d.listen[0] {
            Listen::Held(e) => assert_eq!(
                e.to_string(),
                "service \"web\": listen 127.0.0.1:8090 is still held by service \"api\"; \
                 move it in two reloads (remove it there first)"
            ),
            l => panic!("{l:?}"),
        }
        assert!(matches!(
            d.listen[1],
            Listen::Bind { service: 1, addr: a, .. } if a == addr("127.0.0.1:8091")
        ));
    }

    #[test]
    fn a_provider_gives_endpoints_to_a_configured_service_of_its_name() {
        let cfg = config(TWO);
        let mut swarm = cfg.services[0].clone();
        swarm.listen = vec![addr("127.0.0.1:9999")];
        swarm.backends[0].addr = addr("10.0.0.7:80");
        let mut only = swarm.clone();
        only.name = "only-swarm".into();
        let dns = [(
            (Source::Dns, "api".to_string()),
            vec![Endpoint::at(addr("10.0.0.9:80"), 5)],
        )];
        let want = desired(&cfg, &dns, &[(Source::Docker, vec![swarm, only])]);
        let names: Vec<&str> = want.iter().map(|(s, _)| s.name.as_str()).collect();
        assert_eq!(names, ["web", "api", "only-swarm"]);
        // The configured web keeps its own listeners and takes Swarm's endpoints.
        assert_eq!(want[0].0.listen, cfg.services[0].listen);
        assert_eq!(
            want[0].1[2],
            (Source::Docker, vec![Endpoint::at(addr("10.0.0.7:80"), 100)])
        );
        assert_eq!(
            want[1].1[1],
            (Source::Dns, vec![Endpoint::at(addr("10.0.0.9:80"), 5)])
        );
        assert_eq!(want[2].1.len(), 1);
    }

    #[test]
    fn each_name_is_desired_once_in_order_the_first_provider_winning() {
        let cfg = config(TWO);
        let svc = |name: &str, ip: &str| {
            let mut s = cfg.services[0].clone();
            s.name = name.into();
            s.backends[0].addr = addr(ip);
            s
        };
        // 3,000 provider-only services (in order), one also given by DNS and twice by
        // Docker, and one named like a configured service.
        let mut docker: Vec<ServiceConfig> = (0..3000)
            .map(|i| svc(&format!("s{i}"), "10.0.0.1:80"))
            .collect();
        docker.push(svc("s7", "10.0.0.2:80"));
        docker.push(svc("web", "10.0.0.3:80"));
        let dns = vec![svc("s7", "10.0.0.4:80")];
        let want = desired(&cfg, &[], &[(Source::Dns, dns), (Source::Docker, docker)]);
        let names: Vec<&str> = want.iter().map(|(s, _)| s.name.as_str()).collect();
        assert_eq!(names.len(), 2 + 3000);
        assert_eq!(&names[..4], ["web", "api", "s7", "s0"]);
        assert_eq!(names.iter().filter(|n| **n == "s7").count(), 1);
        // s7 comes from the first provider that published it.
        assert_eq!(
            want[2].1,
            vec![(Source::Dns, vec![Endpoint::at(addr("10.0.0.4:80"), 100)])]
        );
        // The configured web takes Docker's endpoints for its name.
        assert_eq!(
            want[0].1[2],
            (Source::Docker, vec![Endpoint::at(addr("10.0.0.3:80"), 100)])
        );
    }

    #[test]
    fn tls_services_share_one_sni_listener_that_reloads_keep() {
        let text = |names: &[&str]| {
            names
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    format!(
                        "[[service]]\nname = \"{n}\"\nlisten = [\"127.0.0.1:8443\"]\nbackends = [\"127.0.0.1:900{i}\"]\n[service.tls]\nmode = \"passthrough\"\nsni = [\"{n}.test\"]\n"
                    )
                })
                .collect::<String>()
        };
        // Two services, one address: one SNI bind (with the first service's backlog).
        let d = diff(&[], &desired(&config(&text(&["a", "b"])), &[], &[]), &[]);
        assert!(matches!(
            d.listen[..],
            [Listen::BindSni { service: 0, addr: a }] if a == addr("127.0.0.1:8443")
        ));
        assert_eq!(d.sni, [addr("127.0.0.1:8443")]);

        // A reload adding a third service on the open SNI listener binds nothing, and one
        // removing all of them closes it.
        let open = [addr("127.0.0.1:8443")];
        let running = [
            Running {
                index: 0,
                name: "a",
                listen: vec![],
            },
            Running {
                index: 1,
                name: "b",
                listen: vec![],
            },
        ];
        let d = diff(
            &running,
            &desired(&config(&text(&["a", "b", "c"])), &[], &[]),
            &open,
        );
        assert!(d.listen.is_empty() && d.sni_close.is_empty() && d.close.is_empty());
        assert_eq!(d.matched, [Some(0), Some(1), None]);
        let d = diff(&running, &desired(&config(TWO), &[], &[]), &open);
        assert_eq!(d.sni_close, open);
        assert!(d.sni.is_empty());

        // A plain service cannot take the SNI listener's address in the same reload.
        let plain = "[[service]]\nname = \"p\"\nlisten = [\"127.0.0.1:8443\"]\nbackends = [\"127.0.0.1:9000\"]\n";
        let d = diff(&running, &desired(&config(plain), &[], &[]), &open);
        match &d.listen[..] {
            [Listen::Held(e)] => assert!(
                e.to_string()
                    .contains("still held by service \"[service.tls] services sharing it\""),
                "{e}"
            ),
            l => panic!("{l:?}"),
        }

        // A Swarm service labelled mesh.tls joins a configured TLS service's address.
        let cfg = config(&text(&["a"]));
        let mut swarm = cfg.services[0].clone();
        swarm.name = "swarm-b".into();
        swarm.tls.as_mut().unwrap().sni = vec!["b.test".into()];
        let d = diff(
            &running[..1],
            &desired(&cfg, &[], &[(Source::Docker, vec![swarm])]),
            &open,
        );
        assert!(d.listen.is_empty() && d.sni_close.is_empty() && d.close.is_empty());
        assert_eq!(d.sni, open);
        assert_eq!(d.matched, [Some(0), None]);
    }
}
