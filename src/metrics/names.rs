//! Every metric name, one constant each (the contract's table, then meshd's own). A leaf:
//! the table (which registers its histograms) and the exporter both import it, and it
//! imports nothing.

pub const CONNECTIONS: &str = "meshd_connections_total";
pub const ACTIVE_CONNECTIONS: &str = "meshd_active_connections";
pub const BYTES: &str = "meshd_bytes_total";
pub const CONNECT_ERRORS: &str = "meshd_connect_errors_total";
pub const CONNECT_RETRIES: &str = "meshd_connect_retries_total";
pub const REJECTED: &str = "meshd_rejected_connections_total";
pub const BACKEND_UP: &str = "meshd_backend_up";
pub const BACKEND_DRAINING: &str = "meshd_backend_draining";
pub const CONNECTION_DURATION: &str = "meshd_connection_duration_seconds";
pub const CONNECT_DURATION: &str = "meshd_connect_duration_seconds";
pub const CONFIG_RELOADS: &str = "meshd_config_reloads_total";
pub const TABLE_GENERATION: &str = "meshd_table_generation";
pub const BUILD_INFO: &str = "meshd_build_info";
pub const TLS_HANDSHAKES: &str = "meshd_tls_handshakes_total";
// Beyond DESIGN.md's table:
pub const DRAIN_CLOSED: &str = "meshd_drain_closed_connections_total";
pub const ACCEPT_EXHAUSTED: &str = "meshd_accept_exhausted_total";
pub const FORWARDED_BYTES: &str = "meshd_forwarded_bytes_total";
pub const PIPES_CREATED: &str = "meshd_pipes_created_total";
pub const DISCOVERY_ERRORS: &str = "meshd_discovery_errors_total";
pub const CONTROL_EVENT: &str = "meshd_control_event_seconds";
pub const PANIC_CONNECTIONS: &str = "meshd_panic_connections_total";
pub const EJECTIONS: &str = "meshd_ejections_total";
pub const HEDGED_CONNECTS: &str = "meshd_hedged_connects_total";
pub const REPLAYED_CONNECTIONS: &str = "meshd_replayed_connections_total";
pub const QUEUED_CONNECTIONS: &str = "meshd_queued_connections_total";
pub const UPGRADES: &str = "meshd_upgrades_total";
pub const INHERITED_LISTENERS: &str = "meshd_inherited_listeners";
// UDP services (`protocol = "udp"`):
pub const UDP_FLOWS: &str = "meshd_udp_flows";
pub const UDP_FLOWS_TOTAL: &str = "meshd_udp_flows_total";
pub const DATAGRAMS: &str = "meshd_datagrams_total";
pub const UDP_DROPPED: &str = "meshd_udp_dropped_datagrams_total";
pub const UDP_MOVED_FLOWS: &str = "meshd_udp_moved_flows_total";
