//! The Prometheus exporter: installing the recorder (with `SERIES_IDLE` expiry and the
//! histogram buckets), HELP texts, the per-backend and per-service metric handles, the
//! scrape-time copy of counters (`sync`, `sync_process`) and the histogram upkeep.

use std::sync::atomic::Ordering;
use std::sync::OnceLock;
use std::time::Duration;

use metrics::{Counter, Gauge};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;

use super::names::*;
use crate::table::{Backend, ConnectError, ServiceState, State};

/// How long a series nobody updates survives (a gone backend's last values stay visible
/// this long). The environment variable `MESHD_SERIES_IDLE` (a duration, e.g. `"3s"`)
/// overrides it, so that a test of the expiry takes seconds.
pub const SERIES_IDLE: Duration = Duration::from_secs(60);

/// [`SERIES_IDLE`], or `MESHD_SERIES_IDLE` when set.
fn series_idle() -> anyhow::Result<Duration> {
    match std::env::var("MESHD_SERIES_IDLE") {
        Err(_) => Ok(SERIES_IDLE),
        Ok(v) => match crate::config::parse_duration(&v) {
            Ok(d) if !d.is_zero() => Ok(d),
            Ok(_) => anyhow::bail!("MESHD_SERIES_IDLE must be greater than zero"),
            Err(e) => anyhow::bail!("MESHD_SERIES_IDLE: {e}"),
        },
    }
}

/// Connection lifetimes: 1 ms to 4 h.
const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0,
];
/// Connect times: 50 µs to 5 s.
const CONNECT_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0,
];

/// The control loop's events: 100 µs to 1 s (the control thread is held that long).
const CONTROL_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// How often buffered histogram samples are folded into their buckets.
const UPKEEP: Duration = Duration::from_secs(5);

/// Installs the global recorder (once per process) and describes every metric.
pub fn install() -> anyhow::Result<&'static PrometheusHandle> {
    if let Some(h) = HANDLE.get() {
        return Ok(h);
    }
    let handle = PrometheusBuilder::new()
        .idle_timeout(
            MetricKindMask::COUNTER | MetricKindMask::GAUGE,
            Some(series_idle()?),
        )
        .set_buckets_for_metric(Matcher::Full(CONNECTION_DURATION.into()), DURATION_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(CONNECT_DURATION.into()), CONNECT_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(CONTROL_EVENT.into()), CONTROL_BUCKETS)?
        .install_recorder()?;
    describe();
    let _ = HANDLE.set(handle);
    HANDLE
        .get()
        .ok_or_else(|| anyhow::anyhow!("metrics recorder not installed"))
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(CONNECTIONS, "Connections established to a backend.");
    describe_gauge!(
        ACTIVE_CONNECTIONS,
        "Open connections to a backend (draining ones included)."
    );
    describe_counter!(
        BYTES,
        Unit::Bytes,
        "Bytes forwarded; direction rx is from the client, tx is to the client."
    );
    describe_counter!(CONNECT_ERRORS, "Failed connects to a backend, by reason.");
    describe_counter!(
        CONNECT_RETRIES,
        "Connects retried on another backend after a failure."
    );
    describe_counter!(
        REJECTED,
        "Client connections closed without a backend, by reason."
    );
    describe_gauge!(
        BACKEND_UP,
        "1 if the backend is healthy and active (may get new connections)."
    );
    describe_gauge!(
        BACKEND_DRAINING,
        "1 while the backend drains: no new connections, existing ones finish."
    );
    describe_histogram!(
        CONNECTION_DURATION,
        Unit::Seconds,
        "Lifetime of forwarded connections."
    );
    describe_histogram!(
        CONNECT_DURATION,
        Unit::Seconds,
        "Time to connect to a backend."
    );
    describe_histogram!(
        CONTROL_EVENT,
        Unit::Seconds,
        "Time the control plane spent on one event (a command, a discovery update, a health \
         transition, an ejection, a tick, a finished table build) and the publish it caused, \
         on the control plane's thread."
    );
    describe_counter!(CONFIG_RELOADS, "Configuration reloads, by result.");
    describe_gauge!(TABLE_GENERATION, "Generation of the routing table in use.");
    describe_counter!(
        TLS_HANDSHAKES,
        "ClientHellos read on [service.tls] listeners, by result: ok (routed by name), default (routed to sni_default); for a terminating service counted once its handshake completed, or error, timeout, closed when it failed; or, with the listen address as service, why no service took it."
    );
    describe_gauge!(
        BUILD_INFO,
        "Always 1; the version label names the meshd build."
    );
    describe_counter!(
        DRAIN_CLOSED,
        "Connections closed because their backend's drain_timeout (or shutdown) passed."
    );
    describe_counter!(
        ACCEPT_EXHAUSTED,
        "Accepts that failed for lack of file descriptors or buffers (the listener backs off)."
    );
    describe_counter!(
        FORWARDED_BYTES,
        Unit::Bytes,
        "Bytes forwarded, by mode: splice (zero-copy) or copy (buffered fallback)."
    );
    describe_counter!(
        PIPES_CREATED,
        "Pipes created for splice (pooled and reused)."
    );
    describe_counter!(
        PANIC_CONNECTIONS,
        "Connections served by a backend outside the eligible set because none was left (ejected, unhealthy or draining)."
    );
    describe_counter!(
        EJECTIONS,
        "Backends taken out by passive outlier detection (refused, reset or unreachable connects in a row)."
    );
    describe_counter!(
        HEDGED_CONNECTS,
        "Second connects started on another backend because the first had not completed after hedge_delay."
    );
    describe_counter!(
        UPGRADES,
        "Hand-offs of the listeners to a new meshd process this one started or served, by result (ok, failed, timeout)."
    );
    describe_gauge!(
        INHERITED_LISTENERS,
        "Listening sockets this process took from the meshd it replaced (0: it bound its own)."
    );
    describe_counter!(
        QUEUED_CONNECTIONS,
        "Connections that no backend took at first and waited for one (queue_timeout); those still without one when it passed are also counted as rejected no_backend."
    );
    describe_counter!(
        REPLAYED_CONNECTIONS,
        "Connections replayed on another backend after their backend closed before answering (retry_on_early_close)."
    );
    describe_gauge!(
        UDP_FLOWS,
        "UDP flows open now (one per client address, each with its own backend socket)."
    );
    describe_counter!(UDP_FLOWS_TOTAL, "UDP flows opened.");
    describe_counter!(
        DATAGRAMS,
        "UDP datagrams forwarded; direction rx is from the client, tx is to the client (their bytes are in meshd_bytes_total)."
    );
    describe_counter!(
        UDP_DROPPED,
        "UDP datagrams dropped, by reason: max_flows (a new flow past max_flows), no_backend (a new flow with no usable backend), send (a socket buffer full or a send error), truncated (over 64 KiB)."
    );
    describe_counter!(
        UDP_MOVED_FLOWS,
        "UDP flows moved to another backend because theirs refused a datagram (ICMP port unreachable)."
    );
    describe_counter!(
        DISCOVERY_ERRORS,
        "Failed discovery polls, by provider; the last good state is kept."
    );
}

/// Per-backend handles, registered when the backend first appears.
#[derive(Debug)]
pub struct BackendMetrics {
    connections: Counter,
    active: Gauge,
    rx: Counter,
    tx: Counter,
    errors: [Counter; 5],
    up: Gauge,
    draining: Gauge,
    drain_closed: Counter,
    /// Registered once the backend forwards a datagram (a UDP service's backend).
    datagrams: std::sync::OnceLock<[Counter; 2]>,
    labels: [(&'static str, String); 2],
}

impl BackendMetrics {
    pub fn new(service: &str, backend: &str) -> BackendMetrics {
        let s = service.to_string();
        let b = backend.to_string();
        let sb = [("service", s.clone()), ("backend", b.clone())];
        let err = |r: ConnectError| metrics::counter!(CONNECT_ERRORS, "service" => s.clone(), "backend" => b.clone(), "reason" => r.reason());
        BackendMetrics {
            connections: metrics::counter!(CONNECTIONS, &sb),
            active: metrics::gauge!(ACTIVE_CONNECTIONS, &sb),
            rx: metrics::counter!(BYTES, "service" => s.clone(), "backend" => b.clone(), "direction" => "rx"),
            tx: metrics::counter!(BYTES, "service" => s.clone(), "backend" => b.clone(), "direction" => "tx"),
            errors: ConnectError::ALL.map(err),
            up: metrics::gauge!(BACKEND_UP, &sb),
            draining: metrics::gauge!(BACKEND_DRAINING, &sb),
            drain_closed: metrics::counter!(DRAIN_CLOSED, &sb),
            datagrams: std::sync::OnceLock::new(),
            labels: sb.clone(),
        }
    }

    /// Copies the backend's atomics into the handles (called at scrape time).
    pub fn sync(&self, b: &Backend) {
        let st = &b.stats;
        self.connections
            .absolute(st.connections.load(Ordering::Relaxed));
        self.active.set(b.active() as f64);
        self.rx.absolute(st.bytes_rx.load(Ordering::Relaxed));
        self.tx.absolute(st.bytes_tx.load(Ordering::Relaxed));
        for (c, a) in self.errors.iter().zip(&st.connect_errors) {
            c.absolute(a.load(Ordering::Relaxed));
        }
        self.up.set(if b.is_usable() { 1.0 } else { 0.0 });
        self.draining.set(if b.state() == State::Draining {
            1.0
        } else {
            0.0
        });
        self.drain_closed
            .absolute(st.drain_closed.load(Ordering::Relaxed));
        let (drx, dtx) = (
            st.datagrams_rx.load(Ordering::Relaxed),
            st.datagrams_tx.load(Ordering::Relaxed),
        );
        if drx + dtx > 0 {
            let [rx, tx] = self.datagrams.get_or_init(|| {
                let [(_, s), (_, b)] = self.labels.clone();
                [
                    metrics::counter!(DATAGRAMS, "service" => s.clone(), "backend" => b.clone(), "direction" => "rx"),
                    metrics::counter!(DATAGRAMS, "service" => s, "backend" => b, "direction" => "tx"),
                ]
            });
            rx.absolute(drx);
            tx.absolute(dtx);
        }
    }
}

/// Per-service handles for the counters kept in `ServiceState`.
#[derive(Debug)]
pub struct ServiceMetrics {
    retries: Counter,
    no_backend: Counter,
    max_conn: Counter,
    proxy_header: Counter,
    panic: Counter,
    ejections: Counter,
    hedged: Counter,
    replayed: Counter,
    queued: Counter,
    /// Registered once the service has taken a connection by SNI (`ok`, `default`).
    tls: std::sync::OnceLock<[Counter; 2]>,
    /// A terminating service's failed handshakes (`TlsFailure::LABELS`).
    tls_failed: std::sync::OnceLock<[Counter; 3]>,
    /// Registered once the service is a UDP one.
    udp: std::sync::OnceLock<UdpMetrics>,
    name: String,
}

/// A UDP service's handles.
#[derive(Debug)]
struct UdpMetrics {
    flows: Gauge,
    flows_total: Counter,
    max_flows: Counter,
    no_backend: Counter,
    send: Counter,
    truncated: Counter,
    moved: Counter,
}

impl UdpMetrics {
    fn new(s: &str) -> UdpMetrics {
        let dropped = |reason: &'static str| metrics::counter!(UDP_DROPPED, "service" => s.to_string(), "reason" => reason);
        UdpMetrics {
            flows: metrics::gauge!(UDP_FLOWS, "service" => s.to_string()),
            flows_total: metrics::counter!(UDP_FLOWS_TOTAL, "service" => s.to_string()),
            max_flows: dropped("max_flows"),
            no_backend: dropped("no_backend"),
            send: dropped("send"),
            truncated: dropped("truncated"),
            moved: metrics::counter!(UDP_MOVED_FLOWS, "service" => s.to_string()),
        }
    }
}

impl ServiceMetrics {
    pub fn new(service: &str) -> ServiceMetrics {
        let s = service.to_string();
        ServiceMetrics {
            retries: metrics::counter!(CONNECT_RETRIES, "service" => s.clone()),
            no_backend: metrics::counter!(REJECTED, "service" => s.clone(), "reason" => "no_backend"),
            max_conn: metrics::counter!(REJECTED, "service" => s.clone(), "reason" => "max_connections"),
            proxy_header: metrics::counter!(REJECTED, "service" => s.clone(), "reason" => "proxy_header"),
            panic: metrics::counter!(PANIC_CONNECTIONS, "service" => s.clone()),
            ejections: metrics::counter!(EJECTIONS, "service" => s.clone()),
            hedged: metrics::counter!(HEDGED_CONNECTS, "service" => s.clone()),
            replayed: metrics::counter!(REPLAYED_CONNECTIONS, "service" => s.clone()),
            queued: metrics::counter!(QUEUED_CONNECTIONS, "service" => s.clone()),
            tls: std::sync::OnceLock::new(),
            tls_failed: std::sync::OnceLock::new(),
            udp: std::sync::OnceLock::new(),
            name: s,
        }
    }

    pub fn sync(&self, s: &ServiceState) {
        self.retries.absolute(s.retries.load(Ordering::Relaxed));
        self.no_backend
            .absolute(s.rejected_no_backend.load(Ordering::Relaxed));
        self.max_conn
            .absolute(s.rejected_max_connections.load(Ordering::Relaxed));
        self.proxy_header
            .absolute(s.rejected_proxy_header.load(Ordering::Relaxed));
        self.panic
            .absolute(s.panic_connections.load(Ordering::Relaxed));
        self.ejections.absolute(s.ejections.load(Ordering::Relaxed));
        self.hedged
            .absolute(s.hedged_connects.load(Ordering::Relaxed));
        self.replayed.absolute(s.replays.load(Ordering::Relaxed));
        self.queued.absolute(s.queued.load(Ordering::Relaxed));
        let [by_name, by_default] = &s.tls_routed;
        let (by_name, by_default) = (
            by_name.load(Ordering::Relaxed),
            by_default.load(Ordering::Relaxed),
        );
        if by_name + by_default > 0 || self.tls.get().is_some() {
            let [ok, default] = self.tls.get_or_init(|| {
                let c = |result: &'static str| metrics::counter!(TLS_HANDSHAKES, "service" => self.name.clone(), "result" => result);
                [c("ok"), c("default")]
            });
            ok.absolute(by_name);
            default.absolute(by_default);
        }
        let failed = s.tls_failed.each_ref().map(|c| c.load(Ordering::Relaxed));
        if failed.iter().any(|&n| n > 0) || self.tls_failed.get().is_some() {
            let counters = self.tls_failed.get_or_init(|| {
                crate::table::TlsFailure::LABELS.map(|result| metrics::counter!(TLS_HANDSHAKES, "service" => self.name.clone(), "result" => result))
            });
            for (c, n) in counters.iter().zip(failed) {
                c.absolute(n);
            }
        }
        let u = &s.udp;
        if u.enabled.load(Ordering::Relaxed) || self.udp.get().is_some() {
            let m = self.udp.get_or_init(|| UdpMetrics::new(&self.name));
            m.flows.set(u.flows.load(Ordering::Relaxed) as f64);
            m.flows_total
                .absolute(u.flows_total.load(Ordering::Relaxed));
            m.max_flows
                .absolute(u.dropped_max_flows.load(Ordering::Relaxed));
            m.no_backend
                .absolute(u.dropped_no_backend.load(Ordering::Relaxed));
            m.send.absolute(u.dropped_send.load(Ordering::Relaxed));
            m.truncated
                .absolute(u.dropped_truncated.load(Ordering::Relaxed));
            m.moved.absolute(u.moved.load(Ordering::Relaxed));
        }
    }
}

/// Folds the histograms' buffered samples into their buckets every `UPKEEP`, scraped or
/// not. The exporter keeps every observation in a buffer until a scrape renders it or
/// `run_upkeep` drains it, and `install_recorder` starts no upkeep task: with nobody
/// scraping `/metrics`, two samples per connection piled up for good (a 300 s soak
/// without a Prometheus: RSS 8.3 -> 28.0 MiB, ~43 bytes per connection; with this task,
/// 8.3 -> 9.4 MiB; docs/BENCHMARKS.md "Soak").
pub async fn upkeep(handle: &'static PrometheusHandle) {
    let mut tick = tokio::time::interval(UPKEEP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        handle.run_upkeep();
    }
}

/// The SNI listeners' counters of connections no service took, copied at scrape time
/// (labelled with the listen address as `service`: service names hold no ':').
pub fn sync_sni(listeners: &[std::sync::Arc<crate::table::sni::SniStats>]) {
    for l in listeners {
        let results = [
            ("unrecognized_name", &l.unrecognized_name),
            ("malformed", &l.malformed),
            ("too_large", &l.too_large),
            ("timeout", &l.timeout),
            ("closed", &l.closed),
            ("proxy_header", &l.proxy_header),
            ("no_service", &l.no_service),
        ];
        for (result, n) in results {
            metrics::counter!(TLS_HANDSHAKES, "service" => l.label.to_string(), "result" => result)
                .absolute(n.load(Ordering::Relaxed));
        }
    }
}

/// Process-wide series, copied at scrape time.
pub fn sync_process(
    generation: u64,
    reloads_ok: u64,
    reloads_err: u64,
    discovery_errors: &[(&'static str, u64)],
) {
    let proxy = crate::proxy::stats::snapshot();
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    metrics::gauge!(TABLE_GENERATION).set(generation as f64);
    metrics::counter!(CONFIG_RELOADS, "result" => "ok").absolute(reloads_ok);
    metrics::counter!(CONFIG_RELOADS, "result" => "error").absolute(reloads_err);
    metrics::counter!(ACCEPT_EXHAUSTED).absolute(proxy.accept_exhausted);
    metrics::counter!(FORWARDED_BYTES, "mode" => "splice").absolute(proxy.spliced_bytes);
    metrics::counter!(FORWARDED_BYTES, "mode" => "copy").absolute(proxy.copied_bytes);
    metrics::counter!(PIPES_CREATED).absolute(proxy.pipes_created);
    for (provider, n) in discovery_errors {
        metrics::counter!(DISCOVERY_ERRORS, "provider" => *provider).absolute(*n);
    }
    for (result, n) in crate::upgrade::RESULTS
        .iter()
        .zip(&crate::upgrade::UPGRADES)
    {
        metrics::counter!(UPGRADES, "result" => *result).absolute(n.load(Ordering::Relaxed));
    }
    metrics::gauge!(INHERITED_LISTENERS)
        .set(crate::upgrade::sockets::INHERITED_TAKEN.load(Ordering::Relaxed) as f64);
}
