//! The running discovery providers, started from the config and restarted by a reload that
//! changes their settings: `[discovery.docker]` (or `[defaults]`, the Swarm services'
//! template), `[discovery.dns]`. A provider's last answer stays in the control plane while
//! its successor makes its first poll (which replaces it); a removed provider's services
//! and endpoints are withdrawn (they drain like services removed from mesh.toml).

use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::dns::{self, Target};
use super::feed::FeedTx;
use super::{Provider, Update, UpdateTx};
use crate::config::{Config, DnsDiscoveryConfig, DockerDiscoveryConfig, ServiceConfig};

/// What a running Docker provider was started with.
type DockerRun = (DockerDiscoveryConfig, ServiceConfig, JoinHandle<()>);

pub struct Providers {
    commands: UpdateTx,
    /// Followers' feed: kept across provider restarts (their streams stay open).
    feed: Arc<FeedTx>,
    dns_targets: watch::Sender<Vec<Target>>,
    docker: Option<DockerRun>,
    dns: Option<(DnsDiscoveryConfig, JoinHandle<()>)>,
}

impl Providers {
    /// Starts the providers `config` asks for.
    pub fn start(config: &Config, commands: UpdateTx, feed: Arc<FeedTx>) -> Providers {
        let (dns_targets, _) = watch::channel(dns::targets(config));
        let mut p = Providers {
            commands,
            feed,
            dns_targets,
            docker: None,
            dns: None,
        };
        p.apply(config);
        p
    }

    /// Brings the providers in line with `config` (already applied by the control plane).
    pub fn apply(&mut self, config: &Config) {
        let targets = dns::targets(config);
        self.dns_targets.send_if_modified(|t| {
            let changed = *t != targets;
            *t = targets;
            changed
        });

        let want = config.discovery.dns.clone();
        if self.dns.as_ref().map(|(c, _)| c) != want.as_ref() {
            if let Some((_, h)) = self.dns.take() {
                h.abort();
                tracing::info!("[discovery.dns] changed: DNS discovery restarted");
            }
            if let Some(cfg) = want {
                let h = tokio::spawn(dns::run(
                    cfg.clone(),
                    self.dns_targets.subscribe(),
                    self.commands.clone(),
                ));
                self.dns = Some((cfg, h));
            }
        }

        let want = config.discovery.docker.clone();
        let same = match (&self.docker, &want) {
            (Some((c, d, _)), Some(w)) => c == w && *d == config.defaults,
            (None, None) => true,
            _ => false,
        };
        if same {
            return;
        }
        if let Some((_, _, h)) = self.docker.take() {
            h.abort();
            if want.is_some() {
                tracing::info!(
                    "[discovery.docker] or [defaults] changed: Docker discovery restarted (the current Swarm services stay until its first poll)"
                );
            } else {
                tracing::info!("[discovery.docker] removed: its services are withdrawn");
                self.withdraw_docker();
            }
        }
        if let Some(cfg) = want {
            let h = tokio::spawn(super::docker::run(
                cfg.clone(),
                config.defaults.clone(),
                self.commands.clone(),
                self.feed.clone(),
            ));
            self.docker = Some((cfg, config.defaults.clone(), h));
        }
    }

    fn withdraw_docker(&self) {
        let tx = self.commands.clone();
        tokio::spawn(async move {
            let _ = tx
                .send(Update::Services(Provider::Docker, Vec::new()))
                .await;
            let _ = tx
                .send(Update::Endpoints(Provider::Docker, Vec::new()))
                .await;
        });
    }
}

impl Drop for Providers {
    fn drop(&mut self) {
        if let Some((_, _, h)) = self.docker.take() {
            h.abort();
        }
        if let Some((_, h)) = self.dns.take() {
            h.abort();
        }
    }
}
