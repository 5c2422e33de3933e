//! The admin API's JSON shapes (its own DTOs: the internal types can change freely).

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::control::{BackendStatus, ServiceStatus, Status};
use crate::table::{Health, State};

#[derive(Serialize)]
pub struct ServicesDto<'a> {
    pub generation: u64,
    pub version: &'static str,
    pub reloads: ReloadsDto,
    /// `[discovery.docker]` only: whether this node reads its engine or follows a manager.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub docker: Option<DockerDto>,
    pub services: Vec<ServiceDto<'a>>,
}

#[derive(Serialize)]
pub struct DockerDto {
    /// True while this node reads a Swarm manager's engine itself (and serves its feed).
    pub reads_engine: bool,
    /// The manager whose feed this node applies now (`HOST:PORT`), when following.
    pub following: Option<String>,
    /// The last poll (or feed) succeeded; else why not.
    pub ok: bool,
    pub error: Option<String>,
    /// Bumped on every change of the state this node serves.
    pub seq: u64,
}

pub fn docker(f: &crate::discovery::feed::FeedState) -> DockerDto {
    DockerDto {
        reads_engine: f.serving,
        following: f.following.clone(),
        ok: if f.serving {
            f.engine_ok
        } else {
            f.following.is_some()
        },
        error: f.error.clone(),
        seq: f.seq,
    }
}

#[derive(Serialize)]
pub struct ReloadsDto {
    pub ok: u64,
    pub error: u64,
    /// Unix seconds of the last reload attempt.
    pub last_at: Option<u64>,
    pub last_error: Option<String>,
}

#[derive(Serialize)]
pub struct ServiceDto<'a> {
    pub name: &'a str,
    pub listen: Vec<String>,
    /// `tcp` or `udp`.
    pub protocol: &'static str,
    pub balance: &'static str,
    /// `any`, `prefer_local` or `local_only`.
    pub locality: &'static str,
    pub active_connections: u64,
    pub max_connections: u32,
    pub healthy_backends: usize,
    pub rejected_no_backend: u64,
    pub rejected_max_connections: u64,
    pub rejected_proxy_header: u64,
    pub connect_retries: u64,
    /// A UDP service's flows and drops (absent for a TCP service).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub udp: Option<UdpDto>,
    pub backends: Vec<BackendDto<'a>>,
}

#[derive(Serialize)]
pub struct UdpDto {
    pub flows: u64,
    pub flows_total: u64,
    pub max_flows: u32,
    pub udp_responses: u32,
    pub idle_timeout_ms: u64,
    pub dropped_max_flows: u64,
    pub dropped_no_backend: u64,
    pub dropped_send: u64,
    pub moved_flows: u64,
}

#[derive(Serialize)]
pub struct BackendDto<'a> {
    pub addr: &'a str,
    /// active | draining | gone
    pub state: &'static str,
    /// unknown | up | down
    pub health: &'static str,
    /// Shown on the status page: draining, down, ejected, slow-start, active, pending.
    pub status: &'static str,
    pub weight: u32,
    pub weight_override: Option<u32>,
    pub effective_weight: u32,
    pub source: &'static str,
    pub ejected: bool,
    /// Runs on this node (what `locality` prefers).
    pub local: bool,
    pub active_connections: u64,
    pub connections_total: u64,
    pub bytes_rx: u64,
    pub bytes_tx: u64,
    pub connect_errors: u64,
    pub drain: Option<DrainDto>,
    pub slow_start_remaining_ms: Option<u64>,
}

#[derive(Serialize)]
pub struct DrainDto {
    pub elapsed_ms: u64,
    pub remaining_ms: u64,
    pub remaining_connections: u64,
}

pub fn services(st: &Status) -> ServicesDto<'_> {
    let now = Instant::now();
    ServicesDto {
        docker: None,
        generation: st.generation,
        version: env!("CARGO_PKG_VERSION"),
        reloads: ReloadsDto {
            ok: st.reloads_ok,
            error: st.reloads_err,
            last_at: st.last_reload.as_ref().map(|r| {
                r.at.duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0)
            }),
            last_error: st.last_reload.as_ref().and_then(|r| r.error.clone()),
        },
        services: st
            .services
            .iter()
            .flatten()
            .map(|s| service(s, now))
            .collect(),
    }
}

fn service(s: &ServiceStatus, now: Instant) -> ServiceDto<'_> {
    use std::sync::atomic::Ordering::Relaxed;
    ServiceDto {
        name: &s.state.name,
        listen: s.listeners.iter().map(|a| a.to_string()).collect(),
        protocol: s.config.protocol.name(),
        balance: s.config.balance.name(),
        locality: s.config.locality.name(),
        active_connections: s.state.active.load(Relaxed),
        max_connections: s.config.max_connections,
        healthy_backends: s.eligible,
        rejected_no_backend: s.state.rejected_no_backend.load(Relaxed),
        rejected_max_connections: s.state.rejected_max_connections.load(Relaxed),
        rejected_proxy_header: s.state.rejected_proxy_header.load(Relaxed),
        connect_retries: s.state.retries.load(Relaxed),
        udp: (s.config.protocol == crate::config::Protocol::Udp).then(|| {
            let u = &s.state.udp;
            UdpDto {
                flows: u.flows.load(Relaxed),
                flows_total: u.flows_total.load(Relaxed),
                max_flows: s.config.udp.max_flows,
                udp_responses: s.config.udp.responses,
                idle_timeout_ms: u64::try_from(s.config.udp.idle_timeout.as_millis())
                    .unwrap_or(u64::MAX),
                dropped_max_flows: u.dropped_max_flows.load(Relaxed),
                dropped_no_backend: u.dropped_no_backend.load(Relaxed),
                dropped_send: u.dropped_send.load(Relaxed),
                moved_flows: u.moved.load(Relaxed),
            }
        }),
        backends: s.backends.iter().map(|b| backend(b, now)).collect(),
    }
}

fn backend(b: &BackendStatus, now: Instant) -> BackendDto<'_> {
    use std::sync::atomic::Ordering::Relaxed;
    let be = &b.backend;
    let state = be.state();
    let health = be.health();
    let status = match (state, health) {
        // An operator's drain that has finished: kept until enabled.
        (State::Draining, _) if b.drain.is_none() => "drained",
        (State::Draining, _) => "draining",
        (State::Gone, _) => "gone",
        _ if b.ejected => "ejected",
        (_, Health::Down) => "down",
        (_, Health::Unknown) => "pending",
        _ if b.slow_start_until.is_some() => "slow-start",
        _ => "active",
    };
    BackendDto {
        addr: &be.addr_label,
        state: match state {
            State::Active => "active",
            State::Draining => "draining",
            State::Gone => "gone",
        },
        health: match health {
            Health::Unknown => "unknown",
            Health::Up => "up",
            Health::Down => "down",
        },
        status,
        weight: b.weight,
        weight_override: b.weight_override,
        effective_weight: b.effective_weight,
        source: b.sources,
        ejected: b.ejected,
        local: b.local,
        active_connections: be.active(),
        connections_total: be.stats.connections.load(Relaxed),
        bytes_rx: be.stats.bytes_rx.load(Relaxed),
        bytes_tx: be.stats.bytes_tx.load(Relaxed),
        connect_errors: be
            .stats
            .connect_errors
            .iter()
            .map(|c| c.load(Relaxed))
            .sum(),
        drain: b.drain.map(|(start, deadline)| DrainDto {
            elapsed_ms: now.saturating_duration_since(start).as_millis() as u64,
            remaining_ms: deadline.saturating_duration_since(now).as_millis() as u64,
            remaining_connections: be.active(),
        }),
        slow_start_remaining_ms: b
            .slow_start_until
            .map(|t| t.saturating_duration_since(now).as_millis() as u64),
    }
}

/// `{"error": "..."}`
pub fn error_body(msg: &str) -> String {
    serde_json::json!({ "error": msg }).to_string()
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
