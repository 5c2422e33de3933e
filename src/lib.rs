//! meshd: a Layer-4 ingress load balancer and routing-mesh proxy.
//!
//! # Layout, in the order data flows
//!
//! - [`config`]: `mesh.toml` -> validated [`config::Config`]; every user error is one
//!   `FILE:LINE:COL: message` line.
//! - [`control`]: the control plane. Owns the desired state (config, discovery, operator
//!   overrides) and every backend's life (health-gated admission, slow start, ejection,
//!   drain); the only writer of the routing table.
//! - [`health`]: the rise/fall state machine and the tcp/http probes.
//! - [`table`]: the immutable routing-table snapshot behind `ArcSwap`, and [`table::Backend`],
//!   whose atomics carry state across table generations.
//! - [`balance`]: round_robin, least_conn, p2c, maglev selectors, built with the table.
//! - [`proxy`]: listeners and the accept loop, connect with retry, PROXY protocol headers,
//!   splice/copy forwarding.
//! - [`close`]: `CloseSignal`, the drain/shutdown broadcast.
//! - [`admin`]: the admin HTTP server (metrics, health, API, status page).
//! - [`metrics`]: metric names (`metrics::names`, a leaf) and the Prometheus exporter.
//! - [`app`]: wiring ([`app::App::build`] binds, [`app::App::spawn`] serves), reloads and
//!   the shutdown sequence; signals are the binary's (`main.rs`).
//! - [`demo`]: `meshd demo` and the `meshd backend` test/demo server.
//!
//! See ARCHITECTURE.md for the invariants.

// `unsafe` only where a system call needs it: `sys` and `proxy::splice` allow it.
#![deny(unsafe_code)]

pub mod admin;
pub mod app;
pub mod balance;
pub mod close;
pub mod config;
pub mod control;
pub mod demo;
pub mod discovery;
pub mod health;
pub mod metrics;
pub mod proxy;
pub mod sys;
pub mod table;
pub mod upgrade;
