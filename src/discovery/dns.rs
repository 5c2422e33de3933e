//! DNS discovery: every `interval`, resolve each configured `dns = "NAME:PORT"` target
//! (A and AAAA) and hand the addresses to the control plane as that service's DNS endpoints.
//! An address that disappears from the answer drains; a new one is health-gated.
//!
//! Works on any node with no Docker API access (Swarm's embedded resolver at 127.0.0.11
//! answers `tasks.<service>` with the IPs of the tasks whose service binding is active, and
//! drops a stopping task ~2 s before it gets SIGTERM).
//!
//! The resolver keeps no cache: Docker answers with a 600 s TTL, which a router must not
//! honour. A lookup that fails (timeout, SERVFAIL, refused) keeps the last good answer and
//! is counted; a definite "no such name / no records" answer is an empty set (every task of
//! the service is gone) and drains them.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::Resolver;
use tokio::sync::watch;

use super::{Discovered, Provider, Update, UpdateTx};
use crate::config::{defaults, DnsDiscoveryConfig, DnsTarget};

/// One service's DNS target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub service: String,
    pub target: DnsTarget,
}

/// The DNS targets of a config.
pub fn targets(cfg: &crate::config::Config) -> Vec<Target> {
    cfg.services
        .iter()
        .filter_map(|s| {
            s.dns.as_ref().map(|t| Target {
                service: s.name.clone(),
                target: t.clone(),
            })
        })
        .collect()
}

/// Why DNS discovery cannot start.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("dns discovery: cannot read /etc/resolv.conf: {0}")]
    SystemConf(#[source] hickory_resolver::ResolveError),
}

fn resolver(cfg: &DnsDiscoveryConfig) -> Result<Resolver<TokioConnectionProvider>, DnsError> {
    let (config, mut opts) = match cfg.resolver {
        Some(ns) => (
            ResolverConfig::from_parts(
                None,
                vec![],
                NameServerConfigGroup::from_ips_clear(&[ns.ip()], ns.port(), true),
            ),
            ResolverOpts::default(),
        ),
        None => hickory_resolver::system_conf::read_system_conf().map_err(DnsError::SystemConf)?,
    };
    opts.cache_size = 0;
    opts.timeout = Duration::from_secs(1);
    opts.attempts = 2;
    opts.ip_strategy = hickory_resolver::config::LookupIpStrategy::Ipv4AndIpv6;
    Ok(
        Resolver::builder_with_config(config, TokioConnectionProvider::default())
            .with_options(opts)
            .build(),
    )
}

/// Resolves `targets` every `cfg.interval` until `targets` closes; sends a new endpoint
/// list whenever an answer changed.
pub async fn run(
    cfg: DnsDiscoveryConfig,
    mut targets: watch::Receiver<Vec<Target>>,
    commands: UpdateTx,
) {
    let resolver = match resolver(&cfg) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("{e}");
            return;
        }
    };
    let mut last: Vec<Discovered> = Vec::new();
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            r = targets.changed() => if r.is_err() { return },
        }
        let current = targets.borrow().clone();
        let mut sets = Vec::with_capacity(current.len());
        let mut failed = false;
        for t in &current {
            match resolver.lookup_ip(t.target.name.as_str()).await {
                Ok(answer) => {
                    let mut eps: Vec<(SocketAddr, u32)> = answer
                        .iter()
                        .map(|ip| (SocketAddr::new(ip, t.target.port), defaults::WEIGHT))
                        .collect();
                    eps.sort();
                    eps.dedup();
                    sets.push(Discovered {
                        service: t.service.clone(),
                        endpoints: eps,
                    });
                }
                Err(e) if e.is_no_records_found() || e.is_nx_domain() => {
                    sets.push(Discovered {
                        service: t.service.clone(),
                        endpoints: Vec::new(),
                    });
                }
                Err(e) => {
                    failed = true;
                    tracing::warn!(
                        service = t.service.as_str(),
                        name = t.target.name.as_str(),
                        error = %e,
                        "dns lookup failed: keeping the last answer"
                    );
                    // Keep the last good answer for this target.
                    if let Some(prev) = last.iter().find(|d| d.service == t.service) {
                        sets.push(prev.clone());
                    }
                }
            }
        }
        if failed && commands.send(Update::Failed(Provider::Dns)).await.is_err() {
            return;
        }
        if !same(&sets, &last) {
            for s in &sets {
                tracing::info!(
                    service = s.service.as_str(),
                    endpoints = s.endpoints.len(),
                    "dns endpoints changed"
                );
            }
            if commands
                .send(Update::Endpoints(Provider::Dns, sets.clone()))
                .await
                .is_err()
            {
                return;
            }
            last = sets;
        }
    }
}

fn same(a: &[Discovered], b: &[Discovered]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.service == y.service && x.endpoints == y.endpoints)
}
