//! Discovery providers: they produce desired services and endpoints and send them to the
//! control plane as [`Update`]s. Invariant: they never touch the routing table, and import
//! nothing from the control plane (config → discovery → control).
//!
//! - `dns`: A/AAAA records of a name (e.g. Swarm's `tasks.web`) become a configured
//!   service's backends.
//! - `docker`: labelled Swarm services become mesh services, their running tasks backends;
//!   on nodes whose engine cannot answer for the swarm, read from meshd on a manager.
//! - `feed`: the desired-state feed a manager's meshd serves to the other nodes.
//! - `providers`: which providers run; a reload that changes their settings restarts them.

pub mod dns;
pub mod docker;
pub mod feed;
pub mod providers;

use std::net::SocketAddr;

use crate::config::ServiceConfig;

/// Which provider an update comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    Dns,
    Docker,
}

impl Provider {
    /// The provider's name in metrics (`meshd_discovery_errors_total{provider}`), the
    /// status page and the logs.
    pub fn name(self) -> &'static str {
        match self {
            Provider::Dns => "dns",
            Provider::Docker => "docker",
        }
    }
}

/// A set of endpoints for one configured service (replaces the provider's previous set
/// for that service).
#[derive(Debug, Clone, PartialEq)]
pub struct Discovered {
    pub service: String,
    pub endpoints: Vec<(SocketAddr, u32)>,
}

/// What a provider tells the control plane.
#[derive(Debug)]
pub enum Update {
    /// Endpoint sets for services the provider does not create (DNS targets of configured
    /// services, or Swarm tasks of a configured service of the same name); replaces the
    /// provider's previous sets.
    Endpoints(Provider, Vec<Discovered>),
    /// The provider's services, each a full `ServiceConfig` (listeners, policy, and its
    /// endpoints as `backends`); replaces the provider's previous list. A configured
    /// service of the same name wins and takes only the endpoints.
    Services(Provider, Vec<ServiceConfig>),
    /// The provider's services, as `Services`, when only some changed: the same names in
    /// the same order as its previous list, and the services at these indices (ascending)
    /// are the only ones that differ. The control plane then touches those alone (a task
    /// replaced in one of 1,000 services costs one service's work, not 1,000's); it falls
    /// back to the whole list when it cannot.
    Changed(Provider, Vec<ServiceConfig>, Vec<usize>),
    /// A failed poll: counted; the provider's last good state stays.
    Failed(Provider),
}

/// Where providers send their updates (the control plane reads the other end).
pub type UpdateTx = tokio::sync::mpsc::Sender<Update>;
