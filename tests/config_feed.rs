//! Every config that validates survives the manager→worker feed: a Swarm service built from
//! `[defaults]` (or any `[[service]]`) crosses the wire and comes back equal, so a worker
//! never drops a service its manager runs (`config::limits` is the one definition both
//! sides check against).
//!
//! Property-style: thousands of generated `mesh.toml` files mixing valid and invalid values
//! at the edges of every limit, from a fixed seed (a failure names its case and text).

#![allow(clippy::unwrap_used)]

use std::path::Path;

use meshd::config::{Config, ServiceConfig};
use meshd::discovery::feed::{Message, WireService};

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn pick<'a, T: ?Sized>(&mut self, from: &[&'a T]) -> &'a T {
        from[(self.next() % from.len() as u64) as usize]
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    /// Mostly an ordinary value; sometimes one from the edges (valid or not).
    fn value<'a>(&mut self, ordinary: &[&'a str], edges: &[&'a str]) -> &'a str {
        if self.chance(15) {
            self.pick(edges)
        } else {
            self.pick(ordinary)
        }
    }
}

const ORDINARY_DURATIONS: &[&str] = &["1ms", "250ms", "1.5s", "5s", "1m30s", "1h"];
const ORDINARY_INTS: &[&str] = &["1", "2", "3", "16", "50", "100"];

const DURATIONS: &[&str] = &[
    "0s",
    "1ms",
    "2ms",
    "250ms",
    "1.5s",
    "5s",
    "1m30s",
    "1h",
    "8784h", // valid
    "100us",
    "1500us",
    "1.0001s",
    "8785h",
    "99999999h", // finer than 1 ms, or too long
];
const INTS: &[&str] = &[
    "-1",
    "0",
    "1",
    "2",
    "3",
    "16",
    "17",
    "50",
    "100",
    "101",
    "1000",
    "1001",
    "65535",
    "65536",
    "1048576",
    "1048577",
    "4294967295",
    "4294967296",
];
const DURATION_KEYS: &[&str] = &[
    "connect_timeout",
    "hedge_delay",
    "queue_timeout",
    "idle_timeout",
    "drain_timeout",
    "slow_start",
    "half_close_timeout",
    "client_hello_timeout",
    "udp_idle_timeout",
];
const INT_KEYS: &[&str] = &[
    "connect_retries",
    "max_ejection_percent",
    "replay_buffer",
    "max_connections",
    "backlog",
    "max_flows",
    "udp_responses",
];
/// The keys of a `protocol = "udp"` service (the others are refused in its own table).
const UDP_KEYS: &[&str] = &[
    "drain_timeout",
    "slow_start",
    "udp_idle_timeout",
    "max_ejection_percent",
    "max_flows",
    "udp_responses",
    "balance",
];
/// Keys only a UDP service takes (refused in a TCP service's own table).
const UDP_ONLY: &[&str] = &["udp_idle_timeout", "max_flows", "udp_responses"];

/// A policy table's keys (`[defaults]` or a service's), each set with some chance. A
/// service's own table (`protocol`) mostly gets the keys its protocol takes, now and then
/// one it refuses.
fn policy(r: &mut Rng, out: &mut String, protocol: Option<&str>) {
    let wanted = |r: &mut Rng, k: &str| {
        let fits = match protocol {
            None => true,
            Some("udp") => UDP_KEYS.contains(&k),
            Some(_) => !UDP_ONLY.contains(&k),
        };
        r.chance(if fits { 40 } else { 2 })
    };
    for k in DURATION_KEYS {
        if wanted(r, k) {
            out.push_str(&format!(
                "{k} = \"{}\"\n",
                r.value(ORDINARY_DURATIONS, DURATIONS)
            ));
        }
    }
    for k in INT_KEYS {
        if wanted(r, k) {
            out.push_str(&format!("{k} = {}\n", r.value(ORDINARY_INTS, INTS)));
        }
    }
    if wanted(r, "balance") {
        let b = r.pick(&["round_robin", "least_conn", "p2c", "maglev", "random"]);
        out.push_str(&format!("balance = \"{b}\"\n"));
    }
    if wanted(r, "locality") {
        let l = r.pick(&["any", "prefer_local", "local_only", "nearest"]);
        out.push_str(&format!("locality = \"{l}\"\n"));
    }
    if wanted(r, "proxy_protocol") {
        let p = r.pick(&["off", "v1", "v2"]);
        out.push_str(&format!("proxy_protocol = \"{p}\"\n"));
    }
    if wanted(r, "retry_on_early_close") {
        let v = r.pick(&["true", "false"]);
        out.push_str(&format!("retry_on_early_close = {v}\n"));
    }
    if r.chance(30) {
        let many: Vec<String> = (0..65).map(|i| format!("\"10.{i}.0.0/16\"")).collect();
        let many = many.join(", ");
        let list = r.value(
            &[
                "",
                "\"10.0.0.0/8\"",
                "\"127.0.0.1\", \"192.168.1.10/32\"",
                "\"::1\", \"2001:db8::/32\", \"0.0.0.0/0\"",
            ],
            &[
                "\"10.0.0.1/8\"",
                "\"10.0.0.0/8\", \"10.0.0.0/8\"",
                "\"x\"",
                many.as_str(),
            ],
        );
        out.push_str(&format!("accept_proxy = [{list}]\n"));
    }
}

fn health(r: &mut Rng, out: &mut String, table: &str) {
    if !r.chance(60) {
        return;
    }
    out.push_str(&format!("[{table}]\n"));
    let check = r.pick(&["none", "tcp", "http"]);
    out.push_str(&format!("check = \"{check}\"\n"));
    if check == "http" && r.chance(50) {
        let long = format!("/{}", "a".repeat(1100));
        let path = r
            .pick(&["/healthz", "/ready?x=1", long.as_str()])
            .to_owned();
        out.push_str(&format!("path = \"{path}\"\n"));
    }
    for k in ["interval", "timeout"] {
        if r.chance(40) {
            out.push_str(&format!(
                "{k} = \"{}\"\n",
                r.value(ORDINARY_DURATIONS, DURATIONS)
            ));
        }
    }
    for k in ["rise", "fall"] {
        if r.chance(40) {
            out.push_str(&format!("{k} = {}\n", r.value(ORDINARY_INTS, INTS)));
        }
    }
}

fn config(r: &mut Rng) -> String {
    let mut t = String::from("[discovery.docker]\n\n[defaults]\n");
    policy(r, &mut t, None);
    health(r, &mut t, "defaults.health");
    t.push_str("\n[[service]]\n");
    let long = "s".repeat(65);
    let name = r
        .value(&["web", "a.b_c-d", "x"], &["web", long.as_str()])
        .to_owned();
    t.push_str(&format!("name = \"{name}\"\n"));
    let protocol = if r.chance(30) { "udp" } else { "tcp" };
    if protocol == "udp" || r.chance(20) {
        t.push_str(&format!("protocol = \"{protocol}\"\n"));
    }
    let listen: Vec<String> = if r.chance(5) {
        (0..65)
            .map(|i| format!("\"127.0.0.1:{}\"", 20000 + i))
            .collect()
    } else {
        vec!["\"127.0.0.1:18080\"".into()]
    };
    t.push_str(&format!("listen = [{}]\n", listen.join(", ")));
    let w = r.value(&["0", "1", "100"], &["1000", "1001"]);
    let local = r.pick(&["", ", local = true", ", local = false"]);
    t.push_str(&format!(
        "backends = [{{ addr = \"10.0.0.1:80\", weight = {w}{local} }}, \"10.0.0.2:80\"]\n"
    ));
    policy(r, &mut t, Some(protocol));
    health(r, &mut t, "service.health");
    t
}

/// The Swarm service the Docker provider would make from the `[defaults]` template.
fn swarm_service(defaults: &ServiceConfig) -> ServiceConfig {
    let mut s = defaults.clone();
    s.name = "web-8080".into();
    s.listen = vec!["0.0.0.0:8080".parse().unwrap()];
    s.backends = vec![meshd::config::BackendConfig {
        addr: "10.0.1.5:80".parse().unwrap(),
        weight: 100,
        id: Some("0123456789abcdefghijklmno".into()),
        node: Some("node0123456789abcdefghijk".into()),
        local: false,
    }];
    s
}

/// `s` as a worker gets it: serialized by a manager, read back, checked.
fn across_the_wire(s: &ServiceConfig) -> Result<ServiceConfig, String> {
    let line = serde_json::to_string(&Message::State {
        seq: 1,
        engine_ok: true,
        services: vec![WireService::from_config(s)],
    })
    .unwrap();
    match serde_json::from_str::<Message>(&line).unwrap() {
        Message::State { mut services, .. } => {
            services.remove(0).into_config().map_err(|e| e.to_string())
        }
        m => panic!("{m:?}"),
    }
}

fn survives(s: &ServiceConfig) -> Result<(), String> {
    let mut want = s.clone();
    want.dns = None; // not on the wire: a Swarm service has none
    for b in &mut want.backends {
        // Each node says which tasks are its own; their node goes along only when the
        // service's locality uses it.
        b.local = false;
        if want.locality == meshd::config::Locality::Any {
            b.node = None;
        }
    }
    match across_the_wire(s) {
        Ok(got) if got == want => Ok(()),
        Ok(got) => Err(format!(
            "changed on the wire:\n sent {want:?}\n got  {got:?}"
        )),
        Err(e) => Err(format!("dropped by the worker: {e}")),
    }
}

#[test]
fn every_config_that_validates_survives_the_feed() {
    let mut r = Rng(0x6d65_7368_6421_0012);
    let (mut valid, mut invalid) = (0, 0);
    for case in 0..4000 {
        let text = config(&mut r);
        let Ok(cfg) = Config::parse(Path::new("mesh.toml"), &text) else {
            invalid += 1;
            continue;
        };
        valid += 1;
        for s in cfg.services.iter().chain([&swarm_service(&cfg.defaults)]) {
            if let Err(e) = survives(s) {
                panic!(
                    "case {case}: service {:?} {e}\n--- mesh.toml\n{text}",
                    s.name
                );
            }
        }
    }
    // The generator must reach both sides of the limits.
    assert!(
        valid > 200 && invalid > 200,
        "valid {valid}, invalid {invalid}"
    );
}

/// The bugs this test was written for, each on its own.
#[test]
fn the_limits_mesh_toml_and_the_feed_used_to_disagree_on() {
    let parse = |defaults: &str| {
        Config::parse(
            Path::new("mesh.toml"),
            &format!("[discovery.docker]\n[defaults]\n{defaults}\n"),
        )
    };
    // Zero half-close timeout: valid in mesh.toml, and now on the wire too.
    let cfg = parse("half_close_timeout = \"0s\"").unwrap();
    survives(&swarm_service(&cfg.defaults)).unwrap();
    // Sub-millisecond durations were 0 on the wire; durations over 366 days passed.
    for (text, want) in [
        ("connect_timeout = \"100us\"", "finer than a millisecond"),
        ("drain_timeout = \"1500us\"", "use e.g. \"1ms\""),
        ("slow_start = \"8785h\"", "use at most \"8784h\""),
        (
            "[defaults.health]\nrise = 101",
            "rise 101 is out of range: use 1..=100",
        ),
        ("[defaults.health]\nfall = 0", "fall 0 is out of range"),
    ] {
        let e = parse(text).unwrap_err().to_string();
        assert!(e.contains(want), "{text}: {e}");
    }
    let cfg = parse("[defaults.health]\nrise = 100\nfall = 100").unwrap();
    survives(&swarm_service(&cfg.defaults)).unwrap();
}

/// A UDP service crosses the wire with its keys; a line from an older manager (no protocol
/// fields) is a TCP service with the UDP defaults; a UDP service with an HTTP check is
/// refused by the worker as by mesh.toml.
#[test]
fn udp_services_cross_the_wire() {
    let cfg = Config::parse(
        Path::new("mesh.toml"),
        "[[service]]\nname = \"dns\"\nprotocol = \"udp\"\nlisten = [\"0.0.0.0:53\"]\n\
         backends = [\"10.0.0.2:53\"]\nudp_idle_timeout = \"2s\"\nmax_flows = 9\nudp_responses = 1\n",
    )
    .unwrap();
    let s = &cfg.services[0];
    survives(s).unwrap();
    let got = across_the_wire(s).unwrap();
    assert_eq!(got.protocol, meshd::config::Protocol::Udp);
    assert_eq!(got.udp.max_flows, 9);
    assert_eq!(got.udp.responses, 1);

    let mut v = serde_json::to_value(WireService::from_config(s)).unwrap();
    for k in [
        "protocol",
        "udp_idle_timeout_ms",
        "max_flows",
        "udp_responses",
    ] {
        v.as_object_mut().unwrap().remove(k);
    }
    let old: WireService = serde_json::from_value(v).unwrap();
    let old = old.into_config().unwrap();
    assert_eq!(old.protocol, meshd::config::Protocol::Tcp);
    assert_eq!(old.udp, meshd::config::UdpConfig::default());

    let mut w = WireService::from_config(s);
    w.health.check = "http".into();
    let e = w.into_config().unwrap_err().to_string();
    assert!(e.contains("cannot check a UDP service"), "{e}");
}
