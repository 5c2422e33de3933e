//! `Backend`: one upstream address of one service, and everything that must survive a table
//! rebuild — its lifecycle state, health, live-connection count and byte counters.
//!
//! A backend's identity is `(service, addr)`. The control plane creates the `Arc<Backend>` the
//! first time that pair appears and hands the same `Arc` to every table after that, so a
//! reload or a health change never resets counters or forgets connections.
//!
//! Everything a connection touches is an atomic: the connection path never locks a backend.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use crate::close::CloseSignal;

/// Lifecycle: `Active -> Draining -> Gone`, or `Draining -> Active` by an operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    /// Eligible for new connections (if healthy and weighted).
    Active = 0,
    /// No new connections; existing ones run until they end or `drain_timeout`.
    Draining = 1,
    /// Drained and removed; kept alive only by connections' and tables' references.
    Gone = 2,
}

/// What the active health check last concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Health {
    /// Not yet passed `rise` checks: a new backend gets no traffic in this state.
    Unknown = 0,
    Up = 1,
    Down = 2,
}

/// Why a connect failed: the `reason` label of `meshd_connect_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ConnectError {
    Refused = 0,
    Reset = 1,
    Unreachable = 2,
    Timeout = 3,
    Other = 4,
}

impl ConnectError {
    pub const ALL: [ConnectError; 5] = [
        ConnectError::Refused,
        ConnectError::Reset,
        ConnectError::Unreachable,
        ConnectError::Timeout,
        ConnectError::Other,
    ];

    pub fn reason(self) -> &'static str {
        match self {
            ConnectError::Refused => "refused",
            ConnectError::Reset => "reset",
            ConnectError::Unreachable => "unreachable",
            ConnectError::Timeout => "timeout",
            ConnectError::Other => "other",
        }
    }

    pub fn from_io(e: &std::io::Error) -> ConnectError {
        use std::io::ErrorKind as K;
        match e.kind() {
            K::ConnectionRefused => ConnectError::Refused,
            K::ConnectionReset | K::ConnectionAborted => ConnectError::Reset,
            K::TimedOut => ConnectError::Timeout,
            // EADDRNOTAVAIL (no ephemeral port left) never gets here: `proxy::connect`
            // counts it as a local failure, not the backend's.
            K::HostUnreachable | K::NetworkUnreachable => ConnectError::Unreachable,
            _ => ConnectError::Other,
        }
    }
}

/// Counters of one backend. Plain atomics: the Prometheus exporter copies them at scrape
/// time (see `metrics.rs`), so the connection path never calls into a metrics registry.
#[derive(Debug, Default)]
pub struct BackendStats {
    /// Connections established (after a successful connect).
    pub connections: AtomicU64,
    /// Bytes from the client to the backend.
    pub bytes_rx: AtomicU64,
    /// Bytes from the backend to the client.
    pub bytes_tx: AtomicU64,
    /// Failed connects, by `ConnectError as usize`.
    pub connect_errors: [AtomicU64; 5],
    /// Connections closed by a drain timeout or shutdown.
    pub drain_closed: AtomicU64,
    /// UDP datagrams from clients to this backend (their bytes are in `bytes_rx`).
    pub datagrams_rx: AtomicU64,
    /// UDP datagrams from this backend to clients (their bytes are in `bytes_tx`).
    pub datagrams_tx: AtomicU64,
}

#[derive(Debug)]
pub struct Backend {
    pub service: Arc<str>,
    pub addr: SocketAddr,
    /// The address as text, made once: the admin API and metric labels use it.
    pub addr_label: Arc<str>,
    /// Live connections (counted from the connect attempt until the connection closes, so
    /// `least_conn` and `p2c` see in-flight connects too).
    pub active: AtomicU64,
    state: AtomicU8,
    health: AtomicU8,
    /// Set by passive outlier detection: skipped by every pick until the health check
    /// brings it back.
    ejected: AtomicBool,
    /// Connect failures in a row (reset by a successful connect).
    pub consecutive_failures: AtomicU32,
    /// How many times it was ejected in a row without a healthy period between: the
    /// back-off exponent.
    pub ejections: AtomicU32,
    /// An ejection was refused in the current failure streak because this was the
    /// service's last usable backend; cleared by the control plane once the streak ends.
    eject_spared: AtomicBool,
    /// Closes the connections that outlive `drain_timeout`.
    pub close: CloseSignal,
    pub stats: BackendStats,
}

impl Backend {
    pub fn new(service: Arc<str>, addr: SocketAddr, health: Health) -> Backend {
        Backend {
            service,
            addr,
            addr_label: addr.to_string().into(),
            active: AtomicU64::new(0),
            state: AtomicU8::new(State::Active as u8),
            health: AtomicU8::new(health as u8),
            ejected: AtomicBool::new(false),
            consecutive_failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            eject_spared: AtomicBool::new(false),
            close: CloseSignal::new(),
            stats: BackendStats::default(),
        }
    }

    pub fn state(&self) -> State {
        match self.state.load(Ordering::Acquire) {
            0 => State::Active,
            1 => State::Draining,
            _ => State::Gone,
        }
    }

    /// Moves the lifecycle state; only `Active -> Draining -> Gone` and an operator's
    /// `Draining -> Active` are legal.
    pub fn set_state(&self, to: State) {
        let from = self.state();
        debug_assert!(
            matches!(
                (from, to),
                (State::Active, State::Draining)
                    | (State::Draining, State::Gone)
                    | (State::Draining, State::Active)
                    | (State::Active, State::Active)
                    | (State::Draining, State::Draining)
            ),
            "illegal backend transition {from:?} -> {to:?}"
        );
        self.state.store(to as u8, Ordering::Release);
    }

    pub fn health(&self) -> Health {
        match self.health.load(Ordering::Acquire) {
            0 => Health::Unknown,
            1 => Health::Up,
            _ => Health::Down,
        }
    }

    pub fn set_health(&self, h: Health) {
        self.health.store(h as u8, Ordering::Release);
    }

    pub fn is_ejected(&self) -> bool {
        self.ejected.load(Ordering::Relaxed)
    }

    pub fn set_ejected(&self, on: bool) -> bool {
        self.ejected.swap(on, Ordering::AcqRel)
    }

    /// Records that an ejection was refused (last usable backend); true the first time in
    /// a failure streak.
    pub fn mark_eject_spared(&self) -> bool {
        !self.eject_spared.swap(true, Ordering::AcqRel)
    }

    /// Ends a failure streak's "spared" mark (the next refusal is reported again); true if
    /// it was set.
    pub fn clear_eject_spared(&self) -> bool {
        self.eject_spared.swap(false, Ordering::AcqRel)
    }

    pub fn is_eject_spared(&self) -> bool {
        self.eject_spared.load(Ordering::Relaxed)
    }

    /// Active, healthy and not ejected: may take a new connection.
    pub fn is_usable(&self) -> bool {
        self.state() == State::Active && self.health() == Health::Up && !self.is_ejected()
    }

    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }
}
