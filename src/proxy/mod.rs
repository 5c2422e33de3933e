//! The data plane: listening sockets, the accept loop, and each connection's life from
//! backend pick to the last byte.
//!
//! ```text
//! listener::AcceptLoop ─► conn::serve ─► connect (retry elsewhere) ─► forward (splice | copy)
//!                     └─► conn::serve_sni (ClientHello, route) ─► the same, or
//!                         terminate::serve (TLS handshake) ─► connect ─► terminate's copy
//! ```
//!
//! Invariants: nothing in this module takes a lock on the accept path or per byte (the
//! only mutex is `CloseSignal`'s waiter registry, touched once when a connection starts
//! forwarding and once when it ends); `splice` holds the data plane's only `unsafe`.
//! Process-wide counters are in `stats` (the exporter reads them at scrape time).

/// `CloseSignal` lives in `crate::close` (table and health use it too); re-exported so
/// the data plane can name it where it always did.
pub use crate::close;
pub mod accept_proxy;
pub mod conn;
pub mod connect;
pub mod forward;
pub mod listener;
pub mod proxy_header;
pub mod proxy_protocol;
pub mod sni;
pub mod splice;
pub mod stats;
pub mod terminate;
pub mod udp;
