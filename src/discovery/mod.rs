//! Discovery providers: they produce desired services and endpoints and send them to the
//! control plane as `Command`s. Invariant: they never touch the routing table.
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
