//! `mesh.toml` errors, as the user sees them: one line, `FILE:LINE:COL: message`, saying what
//! is wrong and how to fix it. The table below is the catalogue of those messages.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use meshd::config::{
    AdminConfig, BackendConfig, Balance, CheckKind, Config, ConfigError, DiscoveryConfig,
    DnsDiscoveryConfig, DnsTarget, DockerDiscoveryConfig, HealthConfig, Locality, LogConfig,
    LogFormat, Protocol, ProxyProtocol, ServiceConfig, UdpConfig, UpgradeConfig,
};

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(Path::new("mesh.toml"), text)
}

/// `None` if `text` fails with exactly `expected`, else what went wrong.
fn mismatch(text: &str, expected: &str) -> Option<String> {
    match parse(text) {
        Ok(_) => Some(format!("accepted, expected `{expected}`:\n{text}")),
        Err(e) => {
            let got = e.to_string();
            let (line, col) = e.line_col()?;
            if got != expected {
                Some(format!("got      `{got}`\nexpected `{expected}`\n{text}"))
            } else if got.contains('\n') || !got.starts_with(&format!("mesh.toml:{line}:{col}: ")) {
                Some(format!("not one line, or line_col() disagrees: `{got}`"))
            } else {
                None
            }
        }
    }
}

fn check_err(text: &str, expected: &str) {
    if let Some(m) = mismatch(text, expected) {
        panic!("{m}");
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// (file text, the complete error line)
const ERRORS: &[(&str, &str)] = &[
    // --- TOML syntax, unknown keys, wrong types: toml's own text, made one line ---
    (
        "[[service]]\nname = \"web\"\nlistn = [\"0.0.0.0:8080\"]\n",
        "mesh.toml:3:1: unknown field `listn`, expected one of `name`, `listen`, `backends`, \
         `dns`, `balance`, `locality`, `connect_timeout`, `connect_retries`, `hedge_delay`, \
         `queue_timeout`, `max_ejection_percent`, `retry_on_early_close`, `replay_buffer`, `idle_timeout`, \
         `drain_timeout`, `slow_start`, `half_close_timeout`, `max_connections`, \
         `proxy_protocol`, `accept_proxy`, `client_hello_timeout`, `backlog`, `health`, \
         `protocol`, `udp_idle_timeout`, `max_flows`, `udp_responses`, `tls`",
    ),
    (
        "[admin]\ntoken = \"secret\"\n",
        "mesh.toml:2:1: unknown field `token`, expected one of `listen`, `token_file`, `metrics`",
    ),
    (
        "[discovery.consul]\n",
        "mesh.toml:1:12: unknown field `consul`, expected `docker` or `dns`",
    ),
    (
        "[admin\nlisten = \"127.0.0.1:9901\"\n",
        "mesh.toml:1:7: invalid table header: expected `.`, `]`",
    ),
    ("x = \n", "mesh.toml:1:5: invalid string: expected `\"`, `'`"),
    // toml gives no message at the end of the text.
    ("x = ", "mesh.toml:1:5: invalid TOML syntax"),
    (
        "[[service]]\nname = \"web\"\nname = \"api\"\n",
        "mesh.toml:3:1: duplicate key `name` in table `service`",
    ),
    (
        "[[service]]\nlisten = [\"0.0.0.0:8080\"]\n",
        "mesh.toml:1:1: missing field `name`",
    ),
    (
        "[service]\nname = \"web\"\n",
        "mesh.toml:1:1: invalid type: map, expected an array of tables: write each service as \
         [[service]] (double brackets)",
    ),
    (
        "[defaults]\ndrain_timeout = 30\n",
        "mesh.toml:2:17: invalid type: integer `30`, expected a duration string such as \"250ms\" or \"2s\"",
    ),
    // --- durations ---
    (
        "[defaults]\nconnect_timeout = \"5 parsecs\"\n",
        "mesh.toml:2:19: invalid duration \"5 parsecs\": use a number followed by ms, s, m or h, \
         e.g. \"250ms\", \"2s\", \"1h\"",
    ),
    (
        "[defaults]\nidle_timeout = \"5\"\n",
        "mesh.toml:2:16: invalid duration \"5\": use a number followed by ms, s, m or h, \
         e.g. \"250ms\", \"2s\", \"1h\"",
    ),
    (
        "[defaults.health]\ninterval = \"-1s\"\n",
        "mesh.toml:2:12: invalid duration \"-1s\": use a number followed by ms, s, m or h, \
         e.g. \"250ms\", \"2s\", \"1h\"",
    ),
    (
        "[defaults]\nslow_start = \"\"\n",
        "mesh.toml:2:14: invalid duration \"\": use a number followed by ms, s, m or h, \
         e.g. \"250ms\", \"2s\", \"1h\"",
    ),
    (
        "[defaults]\nconnect_timeout = \"0s\"\n",
        "mesh.toml:2:19: connect_timeout must be greater than zero: use e.g. \"5s\"",
    ),
    (
        "[discovery.docker]\npoll_interval = \"0ms\"\n",
        "mesh.toml:2:17: poll_interval must be greater than zero: use e.g. \"500ms\"",
    ),
    // --- addresses ---
    (
        "[[service]]\nname = \"web\"\nlisten = [\"1.2.3.4\"]\n",
        "mesh.toml:3:11: invalid address \"1.2.3.4\": expected IP:PORT, e.g. \"0.0.0.0:8080\" or \"[::]:8080\"",
    ),
    (
        "[[service]]\nname = \"web\"\nlisten = [\"0.0.0.0:0\"]\n",
        "mesh.toml:3:11: invalid address \"0.0.0.0:0\": port 0 is not allowed, use a port in 1..=65535",
    ),
    (
        "[[service]]\nname = \"web\"\nlisten = [\"0.0.0.0:8080\"]\n\
         backends = [{ addr = \"localhost:9001\" }]\n",
        "mesh.toml:4:22: invalid address \"localhost:9001\": expected IP:PORT, e.g. \"0.0.0.0:8080\" or \"[::]:8080\"",
    ),
    (
        "[discovery.dns]\nresolver = \"8.8.8.8\"\n",
        "mesh.toml:2:12: invalid address \"8.8.8.8\": expected IP:PORT, e.g. \"0.0.0.0:8080\" or \"[::]:8080\"",
    ),
    // The single-string shorthand: the error points at the string.
    (
        "[[service]]\nname = \"web\"\nlisten = \"1.2.3.4\"\n",
        "mesh.toml:3:10: invalid address \"1.2.3.4\": expected IP:PORT, e.g. \"0.0.0.0:8080\" or \"[::]:8080\"",
    ),
    (
        "[[service]]\nname = \"web\"\nlisten = 8080\n",
        "mesh.toml:3:10: invalid type: integer `8080`, expected an address such as \"0.0.0.0:8080\", \
         or an array of them",
    ),
    (
        "[[service]]\nname = \"web\"\nlisten = \"0.0.0.0:8080\"\nbackends = [\"127.0.0.1:9001\"]\n\
         [[service]]\nname = \"api\"\nlisten = \"0.0.0.0:8080\"\nbackends = [\"127.0.0.1:9001\"]\n",
        "mesh.toml:7:10: service \"api\": listen 0.0.0.0:8080 is already used by service \"web\"; services may share a listen address only when each has [service.tls] with sni (TLS passthrough routed by server name)",
    ),
    // --- backends ---
    // The string shorthand: a bad address points at its own string, among strings and tables.
    (
        "[[service]]\nname = \"web\"\nlisten = [\"0.0.0.0:8080\"]\n\
         backends = [\"127.0.0.1:9001\", \"localhost:9002\"]\n",
        "mesh.toml:4:31: invalid address \"localhost:9002\": expected IP:PORT, e.g. \"0.0.0.0:8080\" or \"[::]:8080\"",
    ),
    (
        "[[service]]\nname = \"web\"\nlisten = [\"0.0.0.0:8080\"]\n\
         backends = [\n  { addr = \"127.0.0.1:9001\" },\n  \"127.0.0.1:0\",\n]\n",
        "mesh.toml:6:3: invalid address \"127.0.0.1:0\": port 0 is not allowed, use a port in 1..=65535",
    ),
    (
        "[[service]]\nname = \"web\"\nlisten = [\"0.0.0.0:8080\"]\n\
         backends = [\"127.0.0.1:9001\", { addr = \"127.0.0.1:9001\" }]\n",
        "mesh.toml:4:40: service \"web\": backend 127.0.0.1:9001 is listed twice: remove one \
         (weight sets its share)",
    ),
    (
        "[[service]]\nname = \"web\"\nlisten = [\"0.0.0.0:8080\"]\n\
         backends = [{ addr = \"127.0.0.1:9001\" }, \"127.0.0.1:9001\"]\n",
        "mesh.toml:4:42: service \"web\": backend 127.0.0.1:9001 is listed twice: remove one \
         (weight sets its share)",
    ),
    (
        "[[service]]\nname = \"web\"\nlisten = [\"0.0.0.0:8080\"]\nbackends = [5]\n",
        "mesh.toml:4:13: invalid type: integer `5`, expected an address such as \"127.0.0.1:9001\" \
         or a table such as { addr = \"127.0.0.1:9001\", weight = 100 }",
    ),
    (
        "[[service]]\nname = \"web\"\nlisten = [\"0.0.0.0:8080\"]\n\
         backends = [\"127.0.0.1:9001\", { addr = \"127.0.0.1:9002\", wieght = 5 }]\n",
        "mesh.toml:4:58: unknown field `wieght`, expected one of `addr`, `weight`, `local`",
    ),
    (
        "[[service]]\nname = \"web\"\nlisten = [\"0.0.0.0:8080\"]\n\
         backends = [{ weight = 5 }]\n",
        "mesh.toml:4:13: missing field `addr`",
    ),
    (
        "[[service]]\nname = \"web\"\nlisten = [\"0.0.0.0:8080\"]\n\
         backends = [{ addr = \"127.0.0.1:9001\", weight = 1001 }]\n",
        "mesh.toml:4:49: weight 1001 is out of range: use 0..=1000 (0 = no new connections)",
    ),
    (
        "[[service]]\nname = \"web\"\nlisten = [\"0.0.0.0:8080\"]\n\
         backends = [{ addr = \"127.0.0.1:9001\", weight = -1 }]\n",
        "mesh.toml:4:49: weight -1 is out of range: use 0..=1000 (0 = no new connections)",
    ),
    (
        "[[service]]\nname = \"web\"\nlisten = [\"0.0.0.0:8080\"]\n\
         backends = [{ addr = \"127.0.0.1:9001\" }, { addr = \"127.0.0.1:9001\" }]\n",
        "mesh.toml:4:51: service \"web\": backend 127.0.0.1:9001 is listed twice: remove one \
         (weight sets its share)",
    ),
    (
        "[[service]]\nname = \"web\"\nlisten = [\"0.0.0.0:8080\"]\n",
        "mesh.toml:2:8: service \"web\" has no backends: add backends = [{ addr = \"127.0.0.1:9001\" }], \
         a dns = \"tasks.web:80\" target, or [discovery.docker]",
    ),
    (
        "[[service]]\nname = \"api\"\nlisten = [\"0.0.0.0:8080\"]\nbackends = []\n",
        "mesh.toml:2:8: service \"api\" has no backends: add backends = [{ addr = \"127.0.0.1:9001\" }], \
         a dns = \"tasks.api:80\" target, or [discovery.docker]",
    ),
    (
        "[[service]]\nname = \"web\"\nlisten = [\"0.0.0.0:8080\"]\ndns = \"tasks.web\"\n",
        "mesh.toml:4:7: invalid dns target \"tasks.web\": expected NAME:PORT, e.g. \"tasks.web:80\"",
    ),
    // --- service names ---
    (
        "[[service]]\nname = \"web\"\nlisten = [\"0.0.0.0:8080\"]\nbackends = [{ addr = \"127.0.0.1:9001\" }]\n\n\
         [[service]]\nname = \"web\"\nlisten = [\"0.0.0.0:8081\"]\nbackends = [{ addr = \"127.0.0.1:9001\" }]\n",
        "mesh.toml:7:8: service \"web\" is defined twice (first at line 2): service names must be unique",
    ),
    (
        "[[service]]\nname = \"\"\n",
        "mesh.toml:2:8: service name is empty: use only letters, digits, '.', '_' and '-' \
         (names become metric labels and URL path segments), e.g. name = \"web\"",
    ),
    (
        "[[service]]\nname = \"web/api\"\n",
        "mesh.toml:2:8: invalid service name \"web/api\": use only letters, digits, '.', '_' and '-' \
         (names become metric labels and URL path segments)",
    ),
    (
        "[[service]]\nname = \"..\"\n",
        "mesh.toml:2:8: invalid service name \"..\": use only letters, digits, '.', '_' and '-' \
         (names become metric labels and URL path segments)",
    ),
    (
        "[[service]]\nname = \"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"\n",
        "mesh.toml:2:8: service name \"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\" \
         is 65 characters long: use at most 64",
    ),
    // --- listen addresses ---
    (
        "[[service]]\nname = \"web\"\nbackends = [{ addr = \"127.0.0.1:9001\" }]\n",
        "mesh.toml:2:8: service \"web\" has no listen address: add listen = [\"0.0.0.0:8080\"]",
    ),
    (
        "[[service]]\nname = \"web\"\nlisten = []\n",
        "mesh.toml:3:10: service \"web\" has no listen address: add listen = [\"0.0.0.0:8080\"]",
    ),
    (
        "[[service]]\nname = \"web\"\nlisten = [\"0.0.0.0:8080\"]\nbackends = [{ addr = \"127.0.0.1:9001\" }]\n\n\
         [[service]]\nname = \"api\"\nlisten = [\"0.0.0.0:8080\"]\nbackends = [{ addr = \"127.0.0.1:9002\" }]\n",
        "mesh.toml:8:11: service \"api\": listen 0.0.0.0:8080 is already used by service \"web\"; services may share a listen address only when each has [service.tls] with sni (TLS passthrough routed by server name)",
    ),
    (
        "[[service]]\nname = \"web\"\nlisten = [\"0.0.0.0:8080\", \"0.0.0.0:8080\"]\n",
        "mesh.toml:3:27: service \"web\": listen 0.0.0.0:8080 is listed twice: remove one",
    ),
    (
        "[[service]]\nname = \"web\"\nlisten = [\"127.0.0.1:8080\", \"0.0.0.0:8080\"]\n",
        "mesh.toml:3:29: service \"web\": listen 0.0.0.0:8080 overlaps its own 127.0.0.1:8080: \
         a wildcard address takes the port on every address, keep only one of them",
    ),
    (
        "[[service]]\nname = \"web\"\nlisten = [\"127.0.0.1:8080\"]\nbackends = [{ addr = \"127.0.0.1:9001\" }]\n\n\
         [[service]]\nname = \"api\"\nlisten = [\"0.0.0.0:8080\"]\nbackends = [{ addr = \"127.0.0.1:9002\" }]\n",
        "mesh.toml:8:11: service \"api\": listen 0.0.0.0:8080 overlaps 127.0.0.1:8080 of service \"web\": \
         a wildcard address takes the port on every address, use another port",
    ),
    (
        "[[service]]\nname = \"web\"\nlisten = [\"0.0.0.0:8080\"]\nbackends = [{ addr = \"127.0.0.1:9001\" }]\n\n\
         [[service]]\nname = \"api\"\nlisten = [\"10.0.0.5:8080\"]\nbackends = [{ addr = \"127.0.0.1:9002\" }]\n",
        "mesh.toml:8:11: service \"api\": listen 10.0.0.5:8080 overlaps 0.0.0.0:8080 of service \"web\": \
         a wildcard address takes the port on every address, use another port",
    ),
    // --- protocol = "udp" ---
    (
        "[[service]]\nname = \"dns\"\nprotocol = \"sctp\"\n",
        "mesh.toml:3:12: invalid protocol \"sctp\": use one of \"tcp\", \"udp\"",
    ),
    (
        "[[service]]\nname = \"dns\"\nprotocol = \"udp\"\nlisten = [\"127.0.0.1:5353\"]\n\
         backends = [\"127.0.0.1:53\"]\nidle_timeout = \"5s\"\n",
        "mesh.toml:6:16: service \"dns\": idle_timeout applies to TCP services only (this one has \
         protocol = \"udp\"): use udp_idle_timeout",
    ),
    (
        "[[service]]\nname = \"dns\"\nprotocol = \"udp\"\nlisten = [\"127.0.0.1:5353\"]\n\
         backends = [\"127.0.0.1:53\"]\nproxy_protocol = \"v2\"\n",
        "mesh.toml:6:18: service \"dns\": proxy_protocol applies to TCP services only (this one has \
         protocol = \"udp\"): remove it",
    ),
    (
        "[[service]]\nname = \"web\"\nlisten = [\"127.0.0.1:8080\"]\nbackends = [\"127.0.0.1:9001\"]\n\
         max_flows = 10\n",
        "mesh.toml:5:13: service \"web\": max_flows applies to protocol = \"udp\" services only: \
         add protocol = \"udp\", or remove it",
    ),
    (
        "[[service]]\nname = \"dns\"\nprotocol = \"udp\"\nlisten = [\"127.0.0.1:5353\"]\n\
         backends = [\"127.0.0.1:53\"]\nmax_flows = 0\n",
        "mesh.toml:6:13: max_flows 0 is out of range: use 1..=1048576 (UDP flows kept at once, one \
         socket each)",
    ),
    (
        "[[service]]\nname = \"dns\"\nprotocol = \"udp\"\nlisten = [\"127.0.0.1:5353\"]\n\
         backends = [\"127.0.0.1:53\"]\nudp_idle_timeout = \"0s\"\n",
        "mesh.toml:6:20: udp_idle_timeout must be greater than zero: use e.g. \"30s\"",
    ),
    (
        "[[service]]\nname = \"dns\"\nprotocol = \"udp\"\nlisten = [\"127.0.0.1:5353\"]\n\
         backends = [\"127.0.0.1:53\"]\n[service.health]\ncheck = \"http\"\n",
        "mesh.toml:7:9: service \"dns\": health check \"http\" cannot check a UDP service: use \
         \"tcp\" (a TCP connect to each backend's address) or \"none\"",
    ),
    (
        "[[service]]\nname = \"a\"\nprotocol = \"udp\"\nlisten = [\"0.0.0.0:53\"]\nbackends = [\"127.0.0.1:9001\"]\n\n\
         [[service]]\nname = \"b\"\nprotocol = \"udp\"\nlisten = [\"127.0.0.1:53\"]\nbackends = [\"127.0.0.1:9002\"]\n",
        "mesh.toml:10:11: service \"b\": listen 127.0.0.1:53 overlaps 0.0.0.0:53 of service \"a\": \
         a wildcard address takes the port on every address, use another port",
    ),
    (
        "[[service]]\nname = \"web\"\nlisten = [\"[::]:8080\"]\nbackends = [{ addr = \"127.0.0.1:9001\" }]\n\n\
         [[service]]\nname = \"api\"\nlisten = [\"[::1]:8080\"]\nbackends = [{ addr = \"127.0.0.1:9002\" }]\n",
        "mesh.toml:8:11: service \"api\": listen [::1]:8080 overlaps [::]:8080 of service \"web\": \
         a wildcard address takes the port on every address, use another port",
    ),
    (
        "[[service]]\nname = \"web\"\nlisten = [\"127.0.0.1:9901\"]\n",
        "mesh.toml:3:11: service \"web\": listen 127.0.0.1:9901 is already used by [admin] listen",
    ),
    (
        "[[service]]\nname = \"web\"\nlisten = [\"0.0.0.0:9901\"]\n",
        "mesh.toml:3:11: service \"web\": listen 0.0.0.0:9901 overlaps 127.0.0.1:9901 of [admin] listen: \
         a wildcard address takes the port on every address, use another port",
    ),
    // --- policy keys ---
    (
        "[defaults]\nconnect_retries = 17\n",
        "mesh.toml:2:19: connect_retries 17 is out of range: use 0..=16 \
         (other backends tried after a failed connect)",
    ),
    (
        "[[service]]\nname = \"web\"\nlisten = [\"0.0.0.0:8080\"]\nbacklog = 0\n",
        "mesh.toml:4:11: backlog 0 is out of range: use 1..=65535 (the listen queue length)",
    ),
    (
        "[defaults]\nbacklog = 65536\n",
        "mesh.toml:2:11: backlog 65536 is out of range: use 1..=65535 (the listen queue length)",
    ),
    (
        "[defaults]\nmax_connections = -1\n",
        "mesh.toml:2:19: max_connections -1 is out of range: use 0 or more (0 = unlimited)",
    ),
    (
        "[defaults]\nbalance = \"fastest\"\n",
        "mesh.toml:2:11: invalid balance \"fastest\": use one of \"round_robin\", \"least_conn\", \"p2c\", \"maglev\"",
    ),
    (
        "[defaults]\nproxy_protocol = \"v3\"\n",
        "mesh.toml:2:18: invalid proxy_protocol \"v3\": use one of \"off\", \"v1\", \"v2\"",
    ),
    (
        "[[service]]\nname = \"web\"\nlisten = [\"0.0.0.0:8080\"]\naccept_proxy = [\"10.0.0.0/8\", \"10.0.0.1/8\"]\n",
        "mesh.toml:4:31: CIDR \"10.0.0.1/8\" in accept_proxy has bits set past its prefix: use \"10.0.0.0/8\"",
    ),
    (
        "[defaults]\naccept_proxy = [\"haproxy\"]\n",
        "mesh.toml:2:17: invalid CIDR \"haproxy\" in accept_proxy: use e.g. \"10.0.0.0/8\", \"192.168.1.10/32\" or \"2001:db8::/32\"",
    ),
    (
        "[defaults]\naccept_proxy = \"10.0.0.0/8\"\n",
        "mesh.toml:2:16: invalid type: string \"10.0.0.0/8\", expected a sequence",
    ),
    (
        "[defaults]\naccept_proxy = [\"127.0.0.1\", \"127.0.0.1/32\"]\n",
        "mesh.toml:2:30: accept_proxy lists 127.0.0.1/32 twice: remove one",
    ),
    (
        "[defaults]\nclient_hello_timeout = \"0s\"\n",
        "mesh.toml:2:24: client_hello_timeout must be greater than zero: use e.g. \"5s\"",
    ),
    // --- health ---
    (
        "[defaults.health]\nrise = 0\n",
        "mesh.toml:2:8: rise 0 is out of range: use 1..=100 \
         (consecutive passes before a backend gets traffic)",
    ),
    (
        "[[service]]\nname = \"web\"\nlisten = [\"0.0.0.0:8080\"]\n\n[service.health]\nfall = 0\n",
        "mesh.toml:6:8: fall 0 is out of range: use 1..=100 \
         (consecutive failures before a backend stops getting traffic)",
    ),
    (
        "[[service]]\nname = \"web\"\nlisten = [\"0.0.0.0:8080\"]\n\n\
         [service.health]\ninterval = \"1s\"\ntimeout = \"2s\"\n",
        "mesh.toml:7:11: health timeout 2s is longer than interval 1s: make timeout at most the interval",
    ),
    (
        "[defaults.health]\ninterval = \"200ms\"\n",
        "mesh.toml:2:12: health timeout 500ms is longer than interval 200ms: make timeout at most the interval",
    ),
    (
        "[defaults.health]\ncheck = \"udp\"\n",
        "mesh.toml:2:9: invalid health check \"udp\": use one of \"none\", \"tcp\", \"http\"",
    ),
    (
        "[[service]]\nname = \"web\"\nlisten = [\"0.0.0.0:8080\"]\n\n\
         [service.health]\ncheck = \"http\"\npath = \"healthz\"\n",
        "mesh.toml:7:8: invalid health path \"healthz\": it must start with '/', e.g. \"/healthz\"",
    ),
    (
        "[defaults.health]\npath = \"/health check\"\n",
        "mesh.toml:2:8: invalid health path \"/health check\": it must not contain spaces or \
         control characters (percent-encode them, e.g. %20)",
    ),
    (
        "[[service]]\nname = \"web\"\nlisten = [\"0.0.0.0:8080\"]\n\
         backends = [{ addr = \"127.0.0.1:9001\" }]\n\n[service.health]\npath = \"/healthz\"\n",
        "mesh.toml:7:8: health path is set but check is \"tcp\": add check = \"http\", or remove path",
    ),
    // Columns count characters, not bytes: "ü" is two bytes.
    (
        "[[service]]\nname = \"web\"\nlisten = [\"0.0.0.0:8080\"]\n\
         health = { path = \"/ü\", interval = \"5 parsecs\" }\n",
        "mesh.toml:4:36: invalid duration \"5 parsecs\": use a number followed by ms, s, m or h, \
         e.g. \"250ms\", \"2s\", \"1h\"",
    ),
    // --- admin, log, discovery ---
    (
        "[admin]\nlisten = \"0.0.0.0:9901\"\n",
        "mesh.toml:2:10: admin listen 0.0.0.0:9901 is not a loopback address and no token_file \
         is set: set [admin] token_file, or listen on 127.0.0.1",
    ),
    (
        "[admin]\nlisten = \"[::]:9901\"\n",
        "mesh.toml:2:10: admin listen [::]:9901 is not a loopback address and no token_file \
         is set: set [admin] token_file, or listen on 127.0.0.1",
    ),
    (
        "[[service]]\nname = \"web\"\nlisten = [\"0.0.0.0:8080\"]\nbackends = [\"127.0.0.1:9001\"]\nlocality = \"nearest\"\n",
        "mesh.toml:5:12: invalid locality \"nearest\": use one of \"any\", \"prefer_local\", \"local_only\"",
    ),
    (
        "[log]\nformat = \"xml\"\n",
        "mesh.toml:2:10: invalid log format \"xml\": use one of \"human\", \"json\"",
    ),
    (
        "[discovery.docker]\nendpoint = \"tcp://10.0.0.1:2375\"\n",
        "mesh.toml:2:12: invalid docker endpoint \"tcp://10.0.0.1:2375\": use \
         \"unix:///var/run/docker.sock\" or \"http://HOST:PORT\" (e.g. a read-only socket proxy)",
    ),
    (
        "[discovery.docker]\naddress = \"vip\"\n",
        "mesh.toml:2:11: invalid address mode \"vip\": use \"auto\" (overlay when meshd shares a \
         network with the task, else its host-mode published port), \"overlay\" or \"host_port\"",
    ),
];

/// A `[service.tls]` service `name` on `listen` with `tls` lines in its table.
fn tls_svc(name: &str, listen: &str, tls: &str) -> String {
    format!(
        "[[service]]\nname = \"{name}\"\nlisten = [\"{listen}\"]\nbackends = [\"127.0.0.1:9001\"]\n[service.tls]\n{tls}\n"
    )
}

#[test]
fn tls_errors() {
    let pass = "mode = \"passthrough\"\n";
    let cases: Vec<(String, &str)> = vec![
        (
            tls_svc("a", "127.0.0.1:443", "mode = \"terminate\"\nkey = \"/x.key\""),
            "mesh.toml:5:1: service \"a\": mode = \"terminate\" needs tls cert and key: add cert = \"/etc/meshd/a.pem\" and key = \"/etc/meshd/a.key\"",
        ),
        (
            tls_svc("a", "127.0.0.1:443", "mode = \"terminate\"\ncert = \"/nonexistent/x.pem\"\nkey = \"/x.key\""),
            "mesh.toml:7:8: service \"a\": tls cert \"/nonexistent/x.pem\": cannot read: No such file or directory (os error 2)",
        ),
        (
            tls_svc("a", "127.0.0.1:443", "mode = \"passthrough\"\nsni = [\"a.test\"]\ncert = \"/x.pem\""),
            "mesh.toml:8:8: service \"a\": tls cert is for mode = \"terminate\" (with passthrough the backend holds the certificate): remove it",
        ),
        (
            tls_svc("a", "127.0.0.1:443", "mode = \"passthrough\"\nsni = [\"a.test\"]\nmin_version = \"1.3\""),
            "mesh.toml:8:15: service \"a\": tls min_version is for mode = \"terminate\" (with passthrough the backend holds the certificate): remove it",
        ),
        (
            tls_svc("a", "127.0.0.1:443", "mode = \"tls\""),
            "mesh.toml:6:8: service \"a\": invalid tls mode \"tls\": use \"terminate\" or \"passthrough\"",
        ),
        (
            tls_svc("a", "127.0.0.1:443", "mode = \"passthrough\"\nsni = [\"a..b\"]"),
            "mesh.toml:7:8: service \"a\": invalid sni name \"a..b\": not a DNS name (labels of 1 to 63 letters, digits, '-' or '_'; at most 253 bytes; no IP address); use e.g. \"api.example.com\" or \"*.example.com\"",
        ),
        (
            tls_svc("a", "127.0.0.1:443", "mode = \"passthrough\"\nsni = [\"a.*.test\"]"),
            "mesh.toml:7:8: service \"a\": invalid sni name \"a.*.test\": a wildcard is allowed only as the whole first label (\"*.\"); use e.g. \"api.example.com\" or \"*.example.com\"",
        ),
        (
            tls_svc("a", "127.0.0.1:443", pass),
            "mesh.toml:5:1: service \"a\": [service.tls] lists no sni name and is not sni_default: no connection could reach it; add sni = [\"api.example.com\"] or sni_default = true",
        ),
        (
            format!(
                "{}protocol = \"udp\"\n",
                tls_svc("a", "127.0.0.1:53", "mode = \"passthrough\"\nsni_default = true")
            )
            .replace("[service.tls]\nmode", "protocol = \"udp\"\n[service.tls]\nmode")
            .replace("sni_default = true\nprotocol = \"udp\"\n", "sni_default = true\n"),
            "mesh.toml:6:1: service \"a\": [service.tls] applies to TCP services only (this one has protocol = \"udp\"): remove it",
        ),
        (
            "[[service]]\nname = \"a\"\nlisten = [\"127.0.0.1:443\"]\nbackends = [\"127.0.0.1:9001\"]\n\n[[service]]\nname = \"b\"\nlisten = [\"127.0.0.1:443\"]\nbackends = [\"127.0.0.1:9001\"]\n".to_string(),
            "mesh.toml:8:11: service \"b\": listen 127.0.0.1:443 is already used by service \"a\"; services may share a listen address only when each has [service.tls] with sni (TLS passthrough routed by server name)",
        ),
        (
            format!(
                "{}{}",
                tls_svc("a", "127.0.0.1:443", "mode = \"passthrough\"\nsni = [\"x.test\", \"*.y.test\"]"),
                tls_svc("b", "127.0.0.1:443", "mode = \"passthrough\"\nsni = [\"X.test.\"]")
            ),
            "mesh.toml:14:8: service \"b\": sni \"x.test\" on 127.0.0.1:443 is already listed by service \"a\": a name routes to one service, remove it from one of them",
        ),
        (
            format!(
                "{}{}",
                tls_svc("a", "127.0.0.1:443", "mode = \"passthrough\"\nsni_default = true"),
                tls_svc("b", "127.0.0.1:443", "mode = \"passthrough\"\nsni_default = true")
            ),
            "mesh.toml:14:15: service \"b\": sni_default on 127.0.0.1:443: service \"a\" is the default there already: only one service per address may be",
        ),
        (
            format!(
                "{}{}",
                tls_svc("a", "127.0.0.1:443", "mode = \"passthrough\"\nsni_default = true"),
                tls_svc("b", "127.0.0.1:443", "mode = \"passthrough\"\nsni = [\"b.test\"]")
                    .replace("[service.tls]", "client_hello_timeout = \"1s\"\n[service.tls]")
            ),
            "mesh.toml:10:11: service \"b\": listen 127.0.0.1:443 is shared with service \"a\", whose client_hello_timeout differs: services sharing an address must set the same client_hello_timeout (it applies before the server name picks the service)",
        ),
    ];
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|(text, expected)| mismatch(text, expected))
        .collect();
    assert!(failures.is_empty(), "\n{}", failures.join("\n\n"));

    // What validates: two services share an address, names normalised.
    let ok = parse(&format!(
        "{}{}",
        tls_svc(
            "a",
            "127.0.0.1:443",
            "mode = \"passthrough\"\nsni = [\"A.Test.\", \"*.B.test\"]"
        ),
        tls_svc(
            "b",
            "127.0.0.1:443",
            "mode = \"passthrough\"\nsni_default = true"
        )
    ))
    .unwrap();
    let tls = ok.services[0].tls.as_ref().unwrap();
    assert_eq!(tls.sni, ["a.test", "*.b.test"]);
    assert!(!tls.sni_default);
    assert!(ok.services[1].tls.as_ref().unwrap().sni_default);
}

#[test]
fn every_error_message() {
    let failures: Vec<String> = ERRORS
        .iter()
        .filter_map(|(text, expected)| mismatch(text, expected))
        .collect();
    assert!(failures.is_empty(), "\n{}", failures.join("\n\n"));
}

/// A scratch directory of this test process.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("meshd-config-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn unreadable_config_file() {
    let e = Config::load(Path::new("/nonexistent/meshd/mesh.toml")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "/nonexistent/meshd/mesh.toml: cannot read: No such file or directory (os error 2)"
    );
    assert_eq!(e.line_col(), None);
}

#[test]
fn unreadable_token_file() {
    check_err(
        "[admin]\ntoken_file = \"/nonexistent/meshd-token\"\n",
        "mesh.toml:2:14: token_file \"/nonexistent/meshd-token\": cannot read: \
         No such file or directory (os error 2)",
    );
}

#[test]
fn empty_token_file() {
    let path = scratch("empty-token").join("token");
    std::fs::write(&path, " \n\n").unwrap();
    let p = path.display();
    check_err(
        &format!("[admin]\nlisten = \"0.0.0.0:9901\"\ntoken_file = \"{p}\"\n"),
        &format!(
            "mesh.toml:3:14: token_file \"{p}\" is empty: write the admin bearer token into it"
        ),
    );
}

#[test]
fn a_token_file_larger_than_a_token_is_refused_unread() {
    let path = scratch("big-token").join("token");
    std::fs::write(&path, "x".repeat(5000)).unwrap();
    let p = path.display();
    check_err(
        &format!("[admin]\nlisten = \"0.0.0.0:9901\"\ntoken_file = \"{p}\"\n"),
        &format!(
            "mesh.toml:3:14: token_file \"{p}\" is larger than 4096 bytes: it should hold the admin bearer token alone"
        ),
    );
}

#[test]
fn token_file_is_read_trimmed_and_relative_to_the_config() {
    let dir = scratch("token");
    std::fs::write(dir.join("token"), "  s3cret\n").unwrap();
    let text = "[admin]\nlisten = \"0.0.0.0:9901\"\ntoken_file = \"token\"\n";
    let c = Config::parse(&dir.join("mesh.toml"), text).unwrap();
    assert_eq!(
        c.admin,
        AdminConfig {
            listen: addr("0.0.0.0:9901"),
            token: Some("s3cret".into()),
            token_file: Some(dir.join("token")),
            metrics: true,
        }
    );
}

/// `[defaults]` with nothing set: the built-in defaults as a service template.
fn builtin_defaults() -> ServiceConfig {
    ServiceConfig {
        name: String::new(),
        listen: vec![],
        protocol: Protocol::Tcp,
        locality: Locality::Any,
        udp: UdpConfig {
            idle_timeout: Duration::from_secs(30),
            max_flows: 65536,
            responses: 0,
        },
        balance: Balance::P2c,
        connect_timeout: Duration::from_secs(5),
        connect_retries: 2,
        hedge_delay: Duration::from_millis(200),
        queue_timeout: Duration::from_secs(5),
        max_ejection_percent: 50,
        retry_on_early_close: false,
        replay_buffer: 16384,
        idle_timeout: Duration::from_secs(3600),
        drain_timeout: Duration::from_secs(30),
        slow_start: Duration::ZERO,
        half_close_timeout: Duration::from_secs(30),
        max_connections: 0,
        proxy_protocol: ProxyProtocol::Off,
        accept_proxy: vec![],
        client_hello_timeout: Duration::from_secs(5),
        backlog: 1024,
        backends: vec![],
        dns: None,
        health: HealthConfig {
            check: CheckKind::Tcp,
            path: "/healthz".into(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            rise: 2,
            fall: 2,
        },
        tls: None,
    }
}

#[test]
fn an_empty_file_is_refused() {
    for text in [
        "",
        "\n",
        "  \t\r\n\n",
        "# only a comment\n",
        "\n  # indented comment\n\n# another\n",
    ] {
        let e = parse(text).unwrap_err();
        assert_eq!(
            e.to_string(),
            "mesh.toml: the file is empty (nothing but whitespace or comments; truncated, or not \
             written yet?): write the configuration into it",
            "{text:?}"
        );
        assert_eq!(e.line_col(), None);
        assert_eq!(e.path(), Path::new("mesh.toml"));
    }
    // Something in it, however little, is a configuration; a comment-like line inside a
    // string is not a comment.
    assert!(parse("[admin]\n").is_ok());
    assert!(parse("# x\n[log]\naccess_log = false # y\n").is_ok());
    assert!(parse("allow_empty = true\n").unwrap().allow_empty);
    assert!(!parse("[log]\n").unwrap().allow_empty);
    check_err(
        "[admin]\nallow_empty = true\n",
        "mesh.toml:2:1: unknown field `allow_empty`, expected one of `listen`, `token_file`, \
         `metrics`",
    );
    check_err(
        "allow_empty = \"yes\"\n",
        "mesh.toml:1:15: invalid type: string \"yes\", expected a boolean",
    );
}

#[test]
fn a_file_with_an_empty_table_is_the_default_config() {
    let c = parse("[admin]\n").unwrap();
    assert_eq!(
        c,
        Config {
            path: "mesh.toml".into(),
            admin: AdminConfig {
                listen: addr("127.0.0.1:9901"),
                token: None,
                token_file: None,
                metrics: true,
            },
            log: LogConfig {
                format: LogFormat::Human,
                access_log: false,
            },
            defaults: builtin_defaults(),
            services: vec![],
            discovery: DiscoveryConfig::default(),
            allow_empty: false,
            upgrade: UpgradeConfig {
                socket: None,
                timeout: Duration::from_secs(60),
            },
        }
    );
}

/// The `mesh.toml` section of DESIGN.md, verbatim.
const DESIGN_EXAMPLE: &str = r#"
[admin]
listen = "127.0.0.1:9901"     # /metrics, /healthz, /readyz, /api/v1/*, / (status page)
# token_file = "/run/secrets/meshd-admin-token"   # when set, mutating calls need
                                                   # "Authorization: Bearer <token>"

[defaults]                    # every key may also be set per service
balance = "p2c"               # round_robin | least_conn | p2c | maglev
connect_timeout = "1s"
connect_retries = 2           # other backends tried after a failed connect
idle_timeout = "1h"           # a connection with no bytes either way for this long is closed
drain_timeout = "30s"
slow_start = "0s"             # ramp a new backend's weight from ~0 to full over this long
half_close_timeout = "30s"    # after one side sent FIN, how long the other may keep sending
max_connections = 0           # per service; 0 = unlimited
proxy_protocol = "off"        # off | v1 | v2: send the client's address to the backend first

[[service]]
name = "web"
listen = ["0.0.0.0:8080"]     # published ports; several allowed, IPv6 too
balance = "round_robin"
backends = [                  # static backends; discovery adds more
  { addr = "127.0.0.1:9001" },
  { addr = "127.0.0.1:9002", weight = 50 },   # weight 0..=1000, default 100
]

[service.health]
check = "http"                # none | tcp | http
path = "/healthz"             # http only; 2xx/3xx is healthy
interval = "1s"
timeout = "500ms"
rise = 2                      # consecutive passes before a backend gets traffic
fall = 2                      # consecutive failures before it stops getting traffic

[discovery.docker]            # optional: Swarm services become mesh services
endpoint = "unix:///var/run/docker.sock"
# A Swarm service opts in with labels, e.g. mesh.publish=8080:80 (published:target)

[discovery.dns]               # optional: names resolved to A/AAAA records, e.g. tasks.web
"#;

#[test]
fn design_example() {
    let c = parse(DESIGN_EXAMPLE).unwrap();
    assert_eq!(
        c,
        Config {
            path: "mesh.toml".into(),
            admin: AdminConfig {
                listen: addr("127.0.0.1:9901"),
                token: None,
                token_file: None,
                metrics: true,
            },
            log: LogConfig {
                format: LogFormat::Human,
                access_log: false,
            },
            defaults: ServiceConfig {
                // The example sets the DESIGN.md value, not meshd's built-in 5 s.
                connect_timeout: Duration::from_secs(1),
                ..builtin_defaults()
            },
            services: vec![ServiceConfig {
                name: "web".into(),
                listen: vec![addr("0.0.0.0:8080")],
                protocol: Protocol::Tcp,
                udp: builtin_defaults().udp,
                balance: Balance::RoundRobin,
                locality: Locality::Any,
                connect_timeout: Duration::from_secs(1),
                connect_retries: 2,
                hedge_delay: Duration::from_millis(200),
                queue_timeout: Duration::from_secs(5),
                max_ejection_percent: 50,
                retry_on_early_close: false,
                replay_buffer: 16384,
                idle_timeout: Duration::from_secs(3600),
                drain_timeout: Duration::from_secs(30),
                slow_start: Duration::ZERO,
                half_close_timeout: Duration::from_secs(30),
                max_connections: 0,
                proxy_protocol: ProxyProtocol::Off,
                accept_proxy: vec![],
                client_hello_timeout: Duration::from_secs(5),
                backlog: 1024,
                backends: vec![
                    BackendConfig {
                        addr: addr("127.0.0.1:9001"),
                        weight: 100,
                        id: None,
                        node: None,
                        local: false,
                    },
                    BackendConfig {
                        addr: addr("127.0.0.1:9002"),
                        weight: 50,
                        id: None,
                        node: None,
                        local: false,
                    },
                ],
                dns: None,
                health: HealthConfig {
                    check: CheckKind::Http,
                    path: "/healthz".into(),
                    interval: Duration::from_secs(1),
                    timeout: Duration::from_millis(500),
                    rise: 2,
                    fall: 2,
                },
                tls: None,
            }],
            discovery: DiscoveryConfig {
                docker: Some(DockerDiscoveryConfig {
                    endpoint: "unix:///var/run/docker.sock".into(),
                    poll_interval: Duration::from_millis(500),
                    managers: Vec::new(),
                    token: None,
                    token_file: None,
                    address: meshd::config::TaskAddress::Auto,
                }),
                dns: Some(DnsDiscoveryConfig {
                    interval: Duration::from_secs(1),
                    resolver: None,
                }),
            },
            allow_empty: false,
            upgrade: UpgradeConfig {
                socket: None,
                timeout: Duration::from_secs(60),
            },
        }
    );
}

/// DESIGN.md's shorthands: `listen = "ADDR"` and `backends = ["ADDR", ...]` (a string is
/// `{ addr = "ADDR" }` with the default weight; strings and tables mix in one array).
#[test]
fn listen_and_backend_shorthands() {
    let short = parse(
        r#"
[[service]]
name = "web"
listen = "0.0.0.0:8080"
backends = ["127.0.0.1:9001", { addr = "127.0.0.1:9002", weight = 50 }, "[::1]:9003"]
"#,
    )
    .unwrap();
    let long = parse(
        r#"
[[service]]
name = "web"
listen = ["0.0.0.0:8080"]
backends = [
  { addr = "127.0.0.1:9001" },
  { addr = "127.0.0.1:9002", weight = 50 },
  { addr = "[::1]:9003", weight = 100 },
]
"#,
    )
    .unwrap();
    assert_eq!(short, long);
    let s = &short.services[0];
    assert_eq!(s.listen, vec![addr("0.0.0.0:8080")]);
    let backends: Vec<(SocketAddr, u32)> = s.backends.iter().map(|b| (b.addr, b.weight)).collect();
    assert_eq!(
        backends,
        vec![
            (addr("127.0.0.1:9001"), 100),
            (addr("127.0.0.1:9002"), 50),
            (addr("[::1]:9003"), 100)
        ]
    );
    assert!(s.backends.iter().all(|b| b.id.is_none()));
}

#[test]
fn ipv6_listen_and_backends() {
    let c = parse(
        r#"
[[service]]
name = "v6"
listen = ["[::]:8080", "0.0.0.0:8080", "[::1]:8081"]
backends = [{ addr = "[::1]:9001" }, { addr = "[fd00::5]:9001", weight = 0 }]
"#,
    )
    .unwrap();
    let s = &c.services[0];
    assert_eq!(
        s.listen,
        vec![addr("[::]:8080"), addr("0.0.0.0:8080"), addr("[::1]:8081")]
    );
    assert_eq!(s.backends[1].addr, addr("[fd00::5]:9001"));
    assert_eq!(s.backends[1].weight, 0);
}

#[test]
fn defaults_are_inherited_key_by_key() {
    let c = parse(
        r#"
[log]
format = "json"
access_log = true

[defaults]
balance = "least_conn"
connect_retries = 4
slow_start = "1m30s"
proxy_protocol = "v2"
backlog = 4096

[defaults.health]
check = "http"
path = "/ready"
interval = "2s"
rise = 3

[[service]]
name = "a"
listen = ["127.0.0.1:8001"]
backends = [{ addr = "127.0.0.1:9001" }]

[[service]]
name = "b"
listen = ["127.0.0.1:8002"]
backends = [{ addr = "127.0.0.1:9001" }]
balance = "maglev"
connect_retries = 0
max_connections = 1000

[service.health]
timeout = "1s"
fall = 5
"#,
    )
    .unwrap();
    assert_eq!(
        c.log,
        LogConfig {
            format: LogFormat::Json,
            access_log: true
        }
    );
    let (a, b) = (&c.services[0], &c.services[1]);
    assert_eq!(a.balance, Balance::LeastConn);
    assert_eq!(a.connect_retries, 4);
    assert_eq!(a.slow_start, Duration::from_secs(90));
    assert_eq!(a.proxy_protocol, ProxyProtocol::V2);
    assert_eq!(a.backlog, 4096);
    assert_eq!(a.max_connections, 0);
    assert_eq!(
        a.health,
        HealthConfig {
            check: CheckKind::Http,
            path: "/ready".into(),
            interval: Duration::from_secs(2),
            timeout: Duration::from_millis(500),
            rise: 3,
            fall: 2,
        }
    );
    assert_eq!(b.balance, Balance::Maglev);
    assert_eq!(b.connect_retries, 0);
    assert_eq!(b.max_connections, 1000);
    assert_eq!(b.slow_start, Duration::from_secs(90));
    assert_eq!(
        b.health,
        HealthConfig {
            check: CheckKind::Http,
            path: "/ready".into(),
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 3,
            fall: 5,
        }
    );
}

#[test]
fn every_keyword() {
    let svc = "[[service]]\nname = \"s\"\nlisten = [\"127.0.0.1:8080\"]\n\
               backends = [{ addr = \"127.0.0.1:9001\" }]\n";
    let one = |key: &str, word: &str| {
        let c = parse(&format!("{svc}{key} = \"{word}\"\n")).unwrap_or_else(|e| panic!("{e}"));
        c.services.into_iter().next().unwrap()
    };
    let balances = [
        ("round_robin", Balance::RoundRobin),
        ("least_conn", Balance::LeastConn),
        ("p2c", Balance::P2c),
        ("maglev", Balance::Maglev),
    ];
    for (word, b) in balances {
        assert_eq!(one("balance", word).balance, b);
    }
    for (word, p) in [
        ("off", ProxyProtocol::Off),
        ("v1", ProxyProtocol::V1),
        ("v2", ProxyProtocol::V2),
    ] {
        assert_eq!(one("proxy_protocol", word).proxy_protocol, p);
    }
    for (word, k) in [
        ("none", CheckKind::None),
        ("tcp", CheckKind::Tcp),
        ("http", CheckKind::Http),
    ] {
        let c = parse(&format!("{svc}\n[service.health]\ncheck = \"{word}\"\n")).unwrap();
        assert_eq!(c.services[0].health.check, k);
    }
}

#[test]
fn backends_may_come_from_discovery_alone() {
    let c =
        parse("[[service]]\nname = \"web\"\nlisten = [\"0.0.0.0:8080\"]\ndns = \"tasks.web:80\"\n")
            .unwrap();
    assert_eq!(
        c.services[0].dns,
        Some(DnsTarget {
            name: "tasks.web".into(),
            port: 80
        })
    );
    // A dns target turns the resolver on with its defaults.
    assert_eq!(
        c.discovery.dns,
        Some(DnsDiscoveryConfig {
            interval: Duration::from_secs(1),
            resolver: None,
        })
    );

    let c = parse(
        "[[service]]\nname = \"web\"\nlisten = [\"0.0.0.0:8080\"]\n\n\
         [discovery.docker]\nendpoint = \"http://docker-proxy:2375\"\npoll_interval = \"2s\"\n",
    )
    .unwrap();
    assert!(c.services[0].backends.is_empty());
    assert_eq!(
        c.discovery.docker,
        Some(DockerDiscoveryConfig {
            endpoint: "http://docker-proxy:2375".into(),
            poll_interval: Duration::from_secs(2),
            managers: Vec::new(),
            token: None,
            token_file: None,
            address: meshd::config::TaskAddress::Auto,
        })
    );
}

#[test]
fn docker_managers_need_host_port_and_a_token() {
    check_err(
        "[discovery.docker]
managers = [\"m1:9901\", \"m2\"]
token_file = \"t\"
",
        "mesh.toml:2:24: manager \"m2\" is not HOST:PORT: use the admin address of meshd on a \
         manager, e.g. \"manager1:9901\" or \"10.0.0.2:9901\"",
    );
    check_err(
        "[discovery.docker]\nmanagers = [\"m1:9901\", \"m1:9901\"]\n",
        "mesh.toml:2:24: manager \"m1:9901\" is listed twice",
    );
    check_err(
        "[discovery.docker]\nmanagers = [\"http://m1:9901\"]\n",
        "mesh.toml:2:13: manager \"http://m1:9901\" is not HOST:PORT: use the admin address of \
         meshd on a manager, e.g. \"manager1:9901\" or \"10.0.0.2:9901\"",
    );
    check_err(
        "[discovery.docker]\nmanagers = [\"m1:9901\"]\n",
        "mesh.toml:2:12: managers needs a token: set [discovery.docker] token_file to a file \
         holding the managers' admin token ([admin] token_file on the managers)",
    );
    check_err(
        "[discovery.docker]\nmanagers = [\"m1:9901\"]\ntoken_file = \"/nonexistent/t\"\n",
        "mesh.toml:3:14: token_file \"/nonexistent/t\": cannot read: No such file or directory \
         (os error 2)",
    );
    let dir = scratch("managers");
    std::fs::write(dir.join("feed-token"), "f33d\n").unwrap();
    let c = Config::parse(
        &dir.join("mesh.toml"),
        "[discovery.docker]\nmanagers = [\"manager1:9901\", \"[fd00::2]:9901\"]\n\
         token_file = \"feed-token\"\n",
    )
    .unwrap();
    let d = c.discovery.docker.unwrap();
    assert_eq!(d.managers, vec!["manager1:9901", "[fd00::2]:9901"]);
    assert_eq!(d.token.as_deref(), Some("f33d"));
    assert_eq!(d.token_file, Some(dir.join("feed-token")));
}

#[test]
fn shipped_example_is_valid() {
    let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config/mesh.toml"));
    let c = Config::load(path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.admin.listen, addr("127.0.0.1:9901"));
    let web = &c.services[0];
    assert_eq!(web.name, "web");
    assert_eq!(web.listen, vec![addr("127.0.0.1:8080")]);
    assert_eq!(web.balance, Balance::RoundRobin);
    assert_eq!(
        web.backends.iter().map(|b| b.addr).collect::<Vec<_>>(),
        vec![addr("127.0.0.1:9001"), addr("127.0.0.1:9002")]
    );
    assert_eq!(web.health.check, CheckKind::Http);
    assert_eq!(web.health.path, "/healthz");
    assert_eq!(c.discovery, DiscoveryConfig::default());
}

/// A TCP and a UDP service may share an address (DNS on port 53); a UDP service checks its
/// backends only if it asks (`[defaults.health] check` is for TCP services), and takes the
/// UDP keys from `[defaults]` like any other.
#[test]
fn udp_services_share_addresses_with_tcp_and_take_their_own_keys() {
    let cfg = parse(
        "[defaults]\nmax_flows = 7\nudp_responses = 1\nidle_timeout = \"9s\"\n\
         [defaults.health]\ncheck = \"http\"\n\n\
         [[service]]\nname = \"dns-tcp\"\nlisten = [\"0.0.0.0:5353\"]\nbackends = [\"127.0.0.1:53\"]\n\n\
         [[service]]\nname = \"dns\"\nprotocol = \"udp\"\nlisten = [\"0.0.0.0:5353\"]\n\
         backends = [\"127.0.0.1:53\"]\nudp_idle_timeout = \"2s\"\n",
    )
    .unwrap();
    let (tcp, udp) = (&cfg.services[0], &cfg.services[1]);
    assert_eq!(tcp.protocol, Protocol::Tcp);
    assert_eq!(tcp.health.check, CheckKind::Http);
    assert_eq!(udp.protocol, Protocol::Udp);
    assert_eq!(udp.health.check, CheckKind::None);
    assert_eq!(
        udp.udp,
        UdpConfig {
            idle_timeout: Duration::from_secs(2),
            max_flows: 7,
            responses: 1,
        }
    );
    let own = parse(
        "[[service]]\nname = \"dns\"\nprotocol = \"udp\"\nlisten = [\"0.0.0.0:5353\"]\n\
         backends = [\"127.0.0.1:53\"]\n[service.health]\ncheck = \"tcp\"\n",
    )
    .unwrap();
    assert_eq!(own.services[0].health.check, CheckKind::Tcp);
}
