//! UDP services (`protocol = "udp"`) through the real meshd binary, with real DNS servers
//! as backends (dnsmasq on loopback, installed by scripts/setup.sh): answers come back,
//! new flows spread over the backends, a flow keeps its backend until it idles out,
//! `udp_responses = 1` ends each flow at its answer, a killed backend loses at most the
//! queries in flight, a drained backend gets no new flows, `max_flows` holds, replies
//! leave a wildcard listener from the address the client sent to, a reload adds and
//! removes a UDP listener, and meshd's descriptors are back to their number after a load.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// A dnsmasq answering `who.test` with `answer`, on `listen`.
struct Dnsmasq {
    child: Child,
    addr: SocketAddr,
}

impl Dnsmasq {
    fn start(ip: Ipv4Addr, port: u16, answer: Ipv4Addr) -> Dnsmasq {
        let bin = if std::path::Path::new("/usr/sbin/dnsmasq").exists() {
            "/usr/sbin/dnsmasq"
        } else {
            "dnsmasq"
        };
        let child = Command::new(bin)
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--pid-file=",
                "--user=root",
            ])
            .arg(format!("--listen-address={ip}"))
            .arg(format!("--port={port}"))
            .arg(format!("--address=/who.test/{answer}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq (scripts/setup.sh installs dnsmasq-base)");
        let addr = SocketAddr::from((ip, port));
        assert!(wait_until(Duration::from_secs(10), || TcpStream::connect(
            addr
        )
        .is_ok()));
        Dnsmasq { child, addr }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A port free for TCP and UDP on every address used here (dnsmasq serves both), taken
/// below the kernel's ephemeral range: the many client sockets these tests open (each
/// `bind(:0)` gets an ephemeral port) can then never take it between this pick and the
/// bind by meshd or dnsmasq (a CI run lost a test to exactly that).
fn free_udp_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let ephemeral_lo: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let (lo, hi) = (10_000u32, ephemeral_lo.max(10_001));
    // A different start per test process; then consecutive candidates.
    let seed = std::process::id().wrapping_mul(2_654_435_761);
    loop {
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        let p = (lo + (seed.wrapping_add(k.wrapping_mul(7919))) % (hi - lo)) as u16;
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if given.contains(&p) {
            continue;
        }
        let free = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, p)).is_ok()
            && [1u8, 2, 3]
                .iter()
                .all(|&last| UdpSocket::bind((Ipv4Addr::new(127, 0, 0, last), p)).is_ok());
        if free {
            given.push(p);
            return p;
        }
    }
}

/// Two dnsmasq on 127.0.0.2 and 127.0.0.3 (same port), answering 10.0.0.2 and 10.0.0.3.
fn two_servers() -> (Dnsmasq, Dnsmasq) {
    let port = free_udp_port();
    (
        Dnsmasq::start(
            Ipv4Addr::new(127, 0, 0, 2),
            port,
            Ipv4Addr::new(10, 0, 0, 2),
        ),
        Dnsmasq::start(
            Ipv4Addr::new(127, 0, 0, 3),
            port,
            Ipv4Addr::new(10, 0, 0, 3),
        ),
    )
}

/// A DNS query for `who.test` A with id `id`.
fn query(id: u16) -> Vec<u8> {
    let mut q = Vec::with_capacity(32);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD; 1 question
    for label in ["who", "test"] {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]); // root, type A, class IN
    q
}

/// The first A record of a response to query `id`, if it is one.
fn answer(id: u16, r: &[u8]) -> Option<Ipv4Addr> {
    if r.len() < 12 || r[..2] != id.to_be_bytes() || r[2] & 0x80 == 0 {
        return None;
    }
    let an = u16::from_be_bytes([r[6], r[7]]);
    if an == 0 {
        return None;
    }
    // Skip the question: labels to the root, then type and class.
    let mut i = 12;
    while *r.get(i)? != 0 {
        i += 1 + usize::from(r[i]);
    }
    i += 5;
    // The answer's name (a pointer or labels), type, class, ttl, rdlength, rdata.
    if *r.get(i)? & 0xc0 == 0xc0 {
        i += 2;
    } else {
        while *r.get(i)? != 0 {
            i += 1 + usize::from(r[i]);
        }
        i += 1;
    }
    let kind = u16::from_be_bytes([*r.get(i)?, *r.get(i + 1)?]);
    let len = u16::from_be_bytes([*r.get(i + 8)?, *r.get(i + 9)?]);
    if kind != 1 || len != 4 {
        return None;
    }
    let d = r.get(i + 10..i + 14)?;
    Some(Ipv4Addr::new(d[0], d[1], d[2], d[3]))
}

/// One query over `sock` (connected to meshd); the answer, or `None` after `wait`.
fn ask_on(sock: &UdpSocket, id: u16, wait: Duration) -> Option<Ipv4Addr> {
    sock.set_read_timeout(Some(wait)).unwrap();
    sock.send(&query(id)).ok()?;
    let mut buf = [0u8; 512];
    let end = Instant::now() + wait;
    while Instant::now() < end {
        let n = sock.recv(&mut buf).ok()?;
        if let Some(a) = answer(id, &buf[..n]) {
            return Some(a);
        }
    }
    None
}

/// One query from a new client socket (so a new flow).
fn ask(to: SocketAddr, id: u16) -> Option<Ipv4Addr> {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.connect(to).unwrap();
    ask_on(&s, id, Duration::from_secs(1))
}

fn udp_service(name: &str, listen: SocketAddr, backends: &[SocketAddr], extra: &str) -> String {
    Svc::new(name, listen)
        .backends(backends)
        .set("protocol = \"udp\"\nbalance = \"round_robin\"")
        .set(extra)
        .health("check = \"tcp\"\ninterval = \"200ms\"\ntimeout = \"200ms\"")
        .to_string()
}

fn fds(m: &Meshd) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", m.child.id()))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn udp_field(m: &Meshd, service: &str, field: &str) -> u64 {
    let s = m.services();
    s["services"]
        .as_array()
        .and_then(|v| v.iter().find(|x| x["name"] == service))
        .and_then(|svc| svc["udp"][field].as_u64())
        .unwrap_or(u64::MAX)
}

const TWO: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const THREE: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);

#[test]
fn answers_spread_over_both_backends_and_one_response_ends_each_flow() {
    let (a, b) = two_servers();
    let listen = SocketAddr::from(([127, 0, 0, 1], free_udp_port()));
    let m = Meshd::start(&udp_service(
        "dns",
        listen,
        &[a.addr, b.addr],
        "udp_responses = 1",
    ));
    assert!(wait_until(Duration::from_secs(10), || m.healthy("dns") == 2));
    let api = m.services();
    assert_eq!(api["services"][0]["protocol"], "udp", "{api}");
    let before = fds(&m);

    let (mut two, mut three, mut lost) = (0, 0, 0);
    for id in 0..400u16 {
        match ask(listen, id) {
            Some(TWO) => two += 1,
            Some(THREE) => three += 1,
            Some(other) => panic!("answer {other}"),
            None => lost += 1,
        }
    }
    eprintln!("10.0.0.2: {two}, 10.0.0.3: {three}, lost {lost}");
    assert_eq!(lost, 0);
    // round_robin over new flows: an even split.
    assert!((180..=220).contains(&two), "two {two} three {three}");

    // Every flow ended at its answer: none open, each socket closed.
    assert!(
        wait_until(Duration::from_secs(3), || udp_field(&m, "dns", "flows")
            == 0),
        "flows {}",
        udp_field(&m, "dns", "flows")
    );
    assert_eq!(m.metric("meshd_udp_flows", &[("service", "dns")]), 0.0);
    assert_eq!(
        m.metric("meshd_udp_flows_total", &[("service", "dns")]),
        400.0
    );
    for dir in ["rx", "tx"] {
        assert_eq!(
            m.metric(
                "meshd_datagrams_total",
                &[("service", "dns"), ("direction", dir)]
            ),
            400.0,
            "{dir}"
        );
    }
    assert!(
        m.metric(
            "meshd_bytes_total",
            &[("service", "dns"), ("direction", "tx")]
        ) > 400.0 * 30.0
    );
    assert!(
        wait_until(Duration::from_secs(3), || fds(&m) <= before),
        "fds {before} before, {} after",
        fds(&m)
    );
}

#[test]
fn a_flow_keeps_its_backend_until_it_idles_out() {
    let (a, b) = two_servers();
    let listen = SocketAddr::from(([127, 0, 0, 1], free_udp_port()));
    let m = Meshd::start(&udp_service(
        "dns",
        listen,
        &[a.addr, b.addr],
        "udp_idle_timeout = \"1s\"",
    ));
    assert!(wait_until(Duration::from_secs(10), || m.healthy("dns") == 2));
    let before = fds(&m);
    let socks: Vec<UdpSocket> = (0..4)
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            s.connect(listen).unwrap();
            s
        })
        .collect();
    let mut seen = Vec::new();
    for (k, s) in socks.iter().enumerate() {
        let first = ask_on(s, 1, Duration::from_secs(1)).expect("answer");
        for id in 2..20u16 {
            let got = ask_on(s, id, Duration::from_secs(1));
            assert_eq!(got, Some(first), "client {k} query {id} changed backend");
        }
        seen.push(first);
    }
    // Four flows, round-robin: both backends took some.
    assert!(seen.contains(&TWO) && seen.contains(&THREE), "{seen:?}");
    assert_eq!(udp_field(&m, "dns", "flows"), 4);
    // Idle for longer than udp_idle_timeout: every flow ends, its socket closed.
    assert!(wait_until(Duration::from_secs(4), || udp_field(
        &m, "dns", "flows"
    ) == 0));
    assert!(
        wait_until(Duration::from_secs(2), || fds(&m) <= before),
        "fds {before} before, {} after",
        fds(&m)
    );
}

#[test]
fn a_killed_backend_loses_at_most_the_queries_in_flight() {
    let (a, mut b) = two_servers();
    let listen = SocketAddr::from(([127, 0, 0, 1], free_udp_port()));
    let m = Meshd::start(&udp_service(
        "dns",
        listen,
        &[a.addr, b.addr],
        "udp_idle_timeout = \"2s\"",
    ));
    assert!(wait_until(Duration::from_secs(10), || m.healthy("dns") == 2));
    let before = fds(&m);

    const CLIENTS: usize = 4;
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, lost) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let from_three_late = Arc::new(AtomicU64::new(0));
    let killed = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (stop, ok, lost) = (stop.clone(), ok.clone(), lost.clone());
            let (killed, late) = (killed.clone(), from_three_late.clone());
            thread::spawn(move || {
                // Half the clients keep one socket (their flow must move), half use a new
                // one per query (new flows must avoid the dead backend).
                let fixed = UdpSocket::bind("127.0.0.1:0").unwrap();
                fixed.connect(listen).unwrap();
                let mut id = 0u16;
                while !stop.load(Ordering::Relaxed) {
                    id = id.wrapping_add(1);
                    let was_killed = killed.load(Ordering::Relaxed);
                    let got = if c % 2 == 0 {
                        ask_on(&fixed, id, Duration::from_millis(500))
                    } else {
                        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
                        s.connect(listen).unwrap();
                        ask_on(&s, id, Duration::from_millis(500))
                    };
                    match got {
                        Some(ip) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            if was_killed && ip == THREE {
                                late.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        None => {
                            lost.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    thread::sleep(Duration::from_secs(1));
    let ok_before = ok.load(Ordering::Relaxed);
    assert!(ok_before > 50, "only {ok_before} answers before the kill");
    killed.store(true, Ordering::Relaxed);
    b.kill();
    thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.join().unwrap();
    }
    let (ok, lost) = (ok.load(Ordering::Relaxed), lost.load(Ordering::Relaxed));
    eprintln!(
        "answered {ok}, lost {lost}, moved {}",
        udp_field(&m, "dns", "moved_flows")
    );
    // Each client has one query in flight: those the killed process had read are lost
    // (no ICMP comes back for them), plus at most a couple that reached its socket while
    // it was dying. Every other query to it is refused and moved (asserted below).
    assert!(
        lost <= CLIENTS as u64 + 2,
        "lost {lost} of {ok}: more than the queries in flight"
    );
    assert_eq!(from_three_late.load(Ordering::Relaxed), 0);
    assert!(
        ok > ok_before + 100,
        "{ok} answers, {ok_before} before the kill"
    );
    // The fixed clients' flows on the dead backend moved.
    assert!(udp_field(&m, "dns", "moved_flows") >= 1);
    assert!(
        m.metric(
            "meshd_connect_errors_total",
            &[("backend", &b.addr.to_string()), ("reason", "refused")]
        ) >= 1.0
    );
    assert!(
        wait_until(Duration::from_secs(5), || udp_field(&m, "dns", "flows")
            == 0
            && fds(&m) <= before),
        "flows {}, fds {before} before, {} after",
        udp_field(&m, "dns", "flows"),
        fds(&m)
    );
}

#[test]
fn a_drained_or_removed_backend_gets_no_new_flows() {
    let (a, b) = two_servers();
    let listen = SocketAddr::from(([127, 0, 0, 1], free_udp_port()));
    let m = Meshd::start(&udp_service(
        "dns",
        listen,
        &[a.addr, b.addr],
        "udp_responses = 1\ndrain_timeout = \"5s\"",
    ));
    assert!(wait_until(Duration::from_secs(10), || m.healthy("dns") == 2));
    // Operator drain of 127.0.0.3.
    let path = format!("/api/v1/services/dns/backends/{}/drain", b.addr);
    let (code, body) = http_request(m.admin, "POST", &path, &[], "").unwrap();
    assert_eq!(code, 200, "POST {path}: {body:?}");
    for id in 0..100u16 {
        assert_eq!(ask(listen, id), Some(TWO), "query {id}");
    }
    // With no flow left it has drained, and stays listed for the operator's enable.
    let b_s = b.addr.to_string();
    assert!(wait_until(Duration::from_secs(5), || m
        .backend("dns", &b_s)["status"]
        == "drained"));
    let enable = format!("/api/v1/services/dns/backends/{}/enable", b.addr);
    assert_eq!(
        http_request(m.admin, "POST", &enable, &[], "").unwrap().0,
        200
    );
    assert!(wait_until(Duration::from_secs(5), || m.healthy("dns") == 2));
    let answers: Vec<_> = (0..20u16).filter_map(|id| ask(listen, id)).collect();
    assert!(answers.contains(&THREE), "{answers:?}");

    // A reload that removes 127.0.0.2: no new flow goes there.
    std::fs::write(
        &m.config,
        format!(
            "[admin]\nlisten = \"{}\"\n{}",
            m.admin,
            udp_service("dns", listen, &[b.addr], "udp_responses = 1")
        ),
    )
    .unwrap();
    m.signal(libc::SIGHUP);
    let a_s = a.addr.to_string();
    assert!(wait_until(Duration::from_secs(5), || {
        let st = &m.backend("dns", &a_s)["state"];
        st == "draining" || st == "gone" || st.is_null()
    }));
    for id in 0..100u16 {
        assert_eq!(ask(listen, id), Some(THREE), "query {id}");
    }
}

#[test]
fn max_flows_drops_datagrams_of_new_flows_beyond_it() {
    let (a, _b) = two_servers();
    let listen = SocketAddr::from(([127, 0, 0, 1], free_udp_port()));
    let m = Meshd::start(&udp_service(
        "dns",
        listen,
        &[a.addr],
        "max_flows = 2\nudp_idle_timeout = \"10s\"",
    ));
    assert!(wait_until(Duration::from_secs(10), || m.healthy("dns") == 1));
    let socks: Vec<UdpSocket> = (0..3)
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            s.connect(listen).unwrap();
            s
        })
        .collect();
    assert_eq!(ask_on(&socks[0], 1, Duration::from_secs(1)), Some(TWO));
    assert_eq!(ask_on(&socks[1], 2, Duration::from_secs(1)), Some(TWO));
    assert_eq!(ask_on(&socks[2], 3, Duration::from_millis(500)), None);
    // The flows in place still work.
    assert_eq!(ask_on(&socks[0], 4, Duration::from_secs(1)), Some(TWO));
    assert_eq!(udp_field(&m, "dns", "flows"), 2);
    assert_eq!(udp_field(&m, "dns", "dropped_max_flows"), 1);
    assert_eq!(
        m.metric(
            "meshd_udp_dropped_datagrams_total",
            &[("service", "dns"), ("reason", "max_flows")]
        ),
        1.0
    );
}

#[test]
fn replies_leave_a_wildcard_listener_from_the_address_the_client_used() {
    let (a, _b) = two_servers();
    let port = free_udp_port();
    let m = Meshd::start(&udp_service(
        "dns",
        SocketAddr::from(([0, 0, 0, 0], port)),
        &[a.addr],
        "udp_responses = 1",
    ));
    assert!(wait_until(Duration::from_secs(10), || m.healthy("dns") == 1));
    // A connected client socket takes only datagrams from the address it sent to: a reply
    // from 127.0.0.1 to a query for 127.0.0.5 would never arrive.
    for last in [1u8, 5, 9] {
        let to = SocketAddr::from((IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)), port));
        assert_eq!(ask(to, u16::from(last)), Some(TWO), "to {to}");
    }
}

#[test]
fn an_ipv6_wildcard_listener_replies_from_the_address_the_client_used() {
    let (a, _b) = two_servers();
    let port = free_udp_port();
    let m = Meshd::start(&udp_service(
        "dns",
        "[::]:0"
            .parse::<SocketAddr>()
            .map(|mut s| {
                s.set_port(port);
                s
            })
            .unwrap(),
        &[a.addr],
        "udp_responses = 1",
    ));
    assert!(wait_until(Duration::from_secs(10), || m.healthy("dns") == 1));
    // IPV6_RECVPKTINFO in, IPV6_PKTINFO out: a reply with a wrong (or no) source would
    // not reach this connected socket.
    let s = UdpSocket::bind("[::1]:0").unwrap();
    s.connect(SocketAddr::from(([0, 0, 0, 0, 0, 0, 0, 1], port)))
        .unwrap();
    assert_eq!(ask_on(&s, 6, Duration::from_secs(1)), Some(TWO));
}

#[test]
fn a_reload_adds_and_removes_a_udp_listener() {
    let (a, _b) = two_servers();
    let tcp_listen = addr(free_port());
    let tcp_backend = Backend::http("web");
    let udp_listen = SocketAddr::from(([127, 0, 0, 1], free_udp_port()));
    let web = service_toml(
        "web",
        tcp_listen,
        &[tcp_backend.addr],
        "",
        "check = \"none\"",
    );
    let m = Meshd::start(&web);
    assert_eq!(ask(udp_listen, 1), None);

    let write = |text: &str| {
        std::fs::write(
            &m.config,
            format!("[admin]\nlisten = \"{}\"\n{text}", m.admin),
        )
        .unwrap();
        m.signal(libc::SIGHUP);
    };
    write(&format!(
        "{web}{}",
        udp_service("dns", udp_listen, &[a.addr], "udp_responses = 1")
    ));
    assert!(
        wait_until(Duration::from_secs(10), || ask(udp_listen, 2) == Some(TWO)),
        "log:\n{}",
        m.log_text()
    );
    write(&web);
    assert!(wait_until(Duration::from_secs(5), || {
        m.services()["services"]
            .as_array()
            .is_some_and(|v| v.iter().all(|s| s["name"] != "dns"))
    }));
    assert!(m.log_text().contains("listener closed") || m.log_text().contains("service removed"));
    assert_eq!(ask(udp_listen, 3), None);
    assert_eq!(who(tcp_listen).as_deref(), Some("web"));
}

/// The inode of the UDP socket bound to `addr` (from /proc/net/udp): the same inode before
/// and after an upgrade is the same socket, handed over, never re-bound.
fn udp_inode(addr: SocketAddr) -> Option<u64> {
    socket_inode("udp", addr, None)
}

#[test]
fn meshd_upgrade_hands_the_udp_socket_over_and_answers_throughout() {
    let (a, b) = two_servers();
    let listen = SocketAddr::from(([127, 0, 0, 1], free_udp_port()));
    let mut m = Meshd::start(&udp_service(
        "dns",
        listen,
        &[a.addr, b.addr],
        "udp_responses = 1",
    ));
    assert!(wait_until(Duration::from_secs(10), || m.healthy("dns") == 2));
    let inode = udp_inode(listen).expect("meshd's UDP socket in /proc/net/udp");
    let old_pid = m.child.id();

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, lost) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let load = {
        let (stop, ok, lost) = (stop.clone(), ok.clone(), lost.clone());
        thread::spawn(move || {
            let mut id = 0u16;
            while !stop.load(Ordering::Relaxed) {
                id = id.wrapping_add(1);
                let s = UdpSocket::bind("127.0.0.1:0").unwrap();
                s.connect(listen).unwrap();
                match ask_on(&s, id, Duration::from_millis(500)) {
                    Some(_) => ok.fetch_add(1, Ordering::Relaxed),
                    None => lost.fetch_add(1, Ordering::Relaxed),
                };
            }
        })
    };
    thread::sleep(Duration::from_millis(300));
    let out = Command::new(BIN)
        .args(["upgrade", "--admin", &m.admin.to_string()])
        .stdin(Stdio::null())
        .output()
        .expect("run meshd upgrade");
    assert!(
        out.status.success(),
        "meshd upgrade: {}{}\nlog:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        m.log_text()
    );
    // The new process serves on the very same socket.
    let (_, body) = http_get(m.admin, "/api/v1/process").unwrap();
    let process: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_ne!(
        process["pid"].as_u64(),
        Some(u64::from(old_pid)),
        "{process}"
    );
    assert!(
        process["inherited_listeners"].as_u64() >= Some(2),
        "{process}"
    );
    thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    assert_eq!(
        udp_inode(listen),
        Some(inode),
        "the UDP socket was re-bound"
    );
    let (ok, lost) = (ok.load(Ordering::Relaxed), lost.load(Ordering::Relaxed));
    eprintln!("through the upgrade: answered {ok}, lost {lost}");
    assert!(ok > 100, "answered {ok}");
    // Only a query whose flow the old process held when it stopped may go unanswered.
    assert!(lost <= 2, "lost {lost} of {}", ok + lost);
    assert!(ask(listen, 7).is_some());
    // The old process drained and left.
    assert_eq!(
        m.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        m.log_text()
    );
    // The new meshd is not this test's child: stop it by pid.
    if let Some(pid) = process["pid"].as_u64() {
        // SAFETY: kill(2) on the meshd this test started (through its upgrade).
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
    }
}

/// `udp_responses = 1` with many queries in flight from one client port (a resolver's
/// forwarding socket, dnsperf): the flow ends only once every query has its answer, and
/// then at once.
#[test]
fn one_response_per_query_even_with_many_queries_in_flight_on_one_flow() {
    let (a, b) = two_servers();
    let listen = SocketAddr::from(([127, 0, 0, 1], free_udp_port()));
    let m = Meshd::start(&udp_service(
        "dns",
        listen,
        &[a.addr, b.addr],
        "udp_responses = 1",
    ));
    assert!(wait_until(Duration::from_secs(10), || m.healthy("dns") == 2));
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.connect(listen).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    for round in 0..20u16 {
        const BURST: u16 = 50;
        for k in 0..BURST {
            s.send(&query(round * BURST + k)).unwrap();
        }
        let mut got = std::collections::HashSet::new();
        let mut buf = [0u8; 512];
        while got.len() < usize::from(BURST) {
            let n = s.recv(&mut buf).unwrap_or_else(|e| {
                panic!("round {round}: {} of {BURST} answers, then {e}", got.len())
            });
            let id = u16::from_be_bytes([buf[0], buf[1]]);
            assert!(answer(id, &buf[..n]).is_some());
            got.insert(id);
        }
    }
    assert!(
        wait_until(Duration::from_secs(3), || udp_field(&m, "dns", "flows")
            == 0),
        "flows {}",
        udp_field(&m, "dns", "flows")
    );
}
