//! `accept_proxy`: the real meshd binary behind a real PROXY protocol sender (HAProxy,
//! `send-proxy` and `send-proxy-v2`), in front of echo backends that send back every byte
//! they received, meshd's own PROXY header included. So the client reads what the backend
//! got: the header meshd sent must name the client's address, not HAProxy's.
//!
//! Also: a trusted source's header split over several segments, a v2 header with TLVs; a
//! header from an untrusted source goes through untouched; a trusted source sending
//! garbage, or nothing, is closed and counted; `maglev` hashes the header's client address;
//! the access log names it.
//!
//! HAProxy comes from scripts/setup.sh (Debian's `haproxy`); without it this test fails.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{addr, free_port, service_toml, wait_until, Backend, Meshd, TempDir};

/// A running HAProxy in TCP mode: one frontend sending v1, one sending v2, both to meshd.
struct Haproxy {
    child: Child,
    v1: SocketAddr,
    v2: SocketAddr,
    _dir: TempDir,
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn haproxy_bin() -> &'static str {
    for p in [
        "/usr/sbin/haproxy",
        "/usr/bin/haproxy",
        "/usr/local/sbin/haproxy",
    ] {
        if Path::new(p).exists() {
            return p;
        }
    }
    panic!("haproxy is not installed: run scripts/setup.sh (Debian package haproxy)");
}

impl Haproxy {
    fn start(meshd: SocketAddr) -> Haproxy {
        let dir = TempDir::new("haproxy");
        let (v1, v2) = (addr(free_port()), addr(free_port()));
        let cfg = format!(
            "global\n  maxconn 200\n\
             defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 10s\n  timeout server 10s\n\
             frontend f1\n  bind {v1}\n  default_backend b1\n\
             backend b1\n  server m {meshd} send-proxy\n\
             frontend f2\n  bind {v2}\n  default_backend b2\n\
             backend b2\n  server m {meshd} send-proxy-v2\n"
        );
        let path = dir.0.join("haproxy.cfg");
        std::fs::write(&path, cfg).unwrap();
        let child = Command::new(haproxy_bin())
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start haproxy");
        let up = wait_until(Duration::from_secs(10), || {
            TcpStream::connect(v1).is_ok() && TcpStream::connect(v2).is_ok()
        });
        assert!(up, "haproxy did not listen on {v1} and {v2}");
        Haproxy {
            child,
            v1,
            v2,
            _dir: dir,
        }
    }
}

/// A connection to `to` from `from_ip` (any port): loopback has all of 127/8.
fn connect_from(from_ip: [u8; 4], to: SocketAddr) -> TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::from((from_ip, 0)).into()).unwrap();
    s.connect_timeout(&to.into(), Duration::from_secs(2))
        .unwrap();
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Sends `pieces` (20 ms apart), closes the write side, reads to the end: what came back,
/// or the error (a reset).
fn exchange(mut s: TcpStream, pieces: &[&[u8]]) -> Result<Vec<u8>, std::io::Error> {
    for (i, p) in pieces.iter().enumerate() {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(20));
        }
        s.write_all(p)?;
    }
    s.shutdown(Shutdown::Write)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(out)
}

const TRUSTED_TIMEOUT: &str = "1s";

/// meshd with two services on one echo backend: `trusted` (accepts headers from
/// 127.0.0.1 only, sends v1 to the backend) and `untrusted` (accepts them from 10/8 only).
fn meshd(echo: SocketAddr, trusted: SocketAddr, untrusted: SocketAddr) -> Meshd {
    let t = service_toml(
        "trusted",
        trusted,
        &[echo],
        &format!(
            "accept_proxy = [\"127.0.0.1/32\"]\nproxy_protocol = \"v1\"\nclient_hello_timeout = \"{TRUSTED_TIMEOUT}\"\n"
        ),
        "check = \"tcp\"",
    );
    let u = service_toml(
        "untrusted",
        untrusted,
        &[echo],
        "accept_proxy = [\"10.0.0.0/8\"]\n",
        "check = \"tcp\"",
    );
    Meshd::start(&format!("[log]\naccess_log = true\n\n{t}{u}"))
}

fn access_line_names(m: &Meshd, client: &str) -> bool {
    m.log_text()
        .lines()
        .any(|l| l.contains("connection closed") && l.contains(&format!("client={client}")))
}

#[test]
fn haproxy_send_proxy_v1_and_v2_carry_the_client_address_through_meshd() {
    let echo = Backend::echo("echo");
    let (t, u) = (addr(free_port()), addr(free_port()));
    let m = meshd(echo.addr, t, u);
    let h = Haproxy::start(t);

    for (front, what) in [(h.v1, "send-proxy"), (h.v2, "send-proxy-v2")] {
        let s = connect_from([127, 0, 0, 2], front);
        let client = s.local_addr().unwrap();
        let got = exchange(s, &[b"hello through haproxy\n"]).unwrap();
        // meshd's own header to the backend names the client HAProxy saw (127.0.0.2) and
        // the address it connected to (HAProxy's frontend), then the payload, unchanged.
        let want = format!(
            "PROXY TCP4 127.0.0.2 127.0.0.1 {} {}\r\nhello through haproxy\n",
            client.port(),
            front.port()
        );
        assert_eq!(String::from_utf8_lossy(&got), want, "{what}");
        let ok = wait_until(Duration::from_secs(5), || {
            access_line_names(&m, &client.to_string())
        });
        assert!(ok, "{what}: no access line for {client}:\n{}", m.log_text());
    }
    assert_eq!(
        m.metric(
            "meshd_rejected_connections_total",
            &[("service", "trusted"), ("reason", "proxy_header")]
        ),
        0.0
    );

    // A large payload after the header arrives whole (exact-length read, then forward).
    let s = connect_from([127, 0, 0, 2], h.v2);
    let client = s.local_addr().unwrap();
    let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let got = exchange(s, &[&payload]).unwrap();
    let head = format!(
        "PROXY TCP4 127.0.0.2 127.0.0.1 {} {}\r\n",
        client.port(),
        h.v2.port()
    );
    assert_eq!(&got[..head.len()], head.as_bytes());
    assert!(got[head.len()..] == payload[..], "payload changed");
}

#[test]
fn headers_from_a_trusted_source_split_or_with_tlvs() {
    let echo = Backend::echo("echo");
    let (t, u) = (addr(free_port()), addr(free_port()));
    let m = meshd(echo.addr, t, u);

    // v1 in three segments, the payload in the last one.
    let s = connect_from([127, 0, 0, 1], t);
    let got = exchange(
        s,
        &[
            b"PROXY TCP4 192.0",
            b".2.7 198.51.100.9 4711 ",
            b"8443\r\npayload",
        ],
    )
    .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&got),
        "PROXY TCP4 192.0.2.7 198.51.100.9 4711 8443\r\npayload"
    );

    // v2 over IPv6 with TLVs (an authority, a 600-byte custom one): skipped, not forwarded;
    // meshd sends v1 TCP6 for the IPv6 client.
    let mut v2 = vec![
        0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, 0x21, 0x21,
    ];
    let mut body = Vec::new();
    body.extend_from_slice(
        &"2001:db8::7"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    body.extend_from_slice(
        &"2001:db8::1"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    body.extend_from_slice(&5555u16.to_be_bytes());
    body.extend_from_slice(&443u16.to_be_bytes());
    body.extend_from_slice(&[0x02, 0, 6]);
    body.extend_from_slice(b"a.test");
    body.extend_from_slice(&[0xE0, 0x02, 0x58]);
    body.extend_from_slice(&[0xAA; 600]);
    v2.extend_from_slice(&(body.len() as u16).to_be_bytes());
    v2.extend_from_slice(&body);
    let (a, b) = v2.split_at(30);
    let s = connect_from([127, 0, 0, 1], t);
    let got = exchange(s, &[a, b, b"after"]).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&got),
        "PROXY TCP6 2001:db8::7 2001:db8::1 5555 443\r\nafter"
    );
    assert!(wait_until(Duration::from_secs(5), || {
        access_line_names(&m, "[2001:db8::7]:5555")
    }));

    // LOCAL (HAProxy's health checks) and UNKNOWN: the real address stands.
    let local = [
        0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, 0x20, 0x00, 0, 0,
    ];
    for header in [&local[..], b"PROXY UNKNOWN\r\n"] {
        let s = connect_from([127, 0, 0, 1], t);
        let port = s.local_addr().unwrap().port();
        let got = exchange(s, &[header, b"x"]).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&got),
            format!("PROXY TCP4 127.0.0.1 127.0.0.1 {port} {}\r\nx", t.port())
        );
    }
}

#[test]
fn an_untrusted_source_is_not_parsed() {
    let echo = Backend::echo("echo");
    let (t, u) = (addr(free_port()), addr(free_port()));
    let _m = meshd(echo.addr, t, u);
    let header = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nhello";

    // `untrusted` trusts 10/8 only: the client's bytes, header and all, reach the backend.
    let got = exchange(connect_from([127, 0, 0, 1], u), &[header]).unwrap();
    assert_eq!(got, header);
    // Garbage is just bytes there.
    let got = exchange(
        connect_from([127, 0, 0, 1], u),
        &[b"GET / HTTP/1.0\r\n\r\n"],
    )
    .unwrap();
    assert_eq!(got, b"GET / HTTP/1.0\r\n\r\n");

    // `trusted` trusts 127.0.0.1/32: from 127.0.0.3 the header is the client's payload,
    // after meshd's own header naming the real source.
    let s = connect_from([127, 0, 0, 3], t);
    let port = s.local_addr().unwrap().port();
    let got = exchange(s, &[header]).unwrap();
    let mut want = format!("PROXY TCP4 127.0.0.3 127.0.0.1 {port} {}\r\n", t.port()).into_bytes();
    want.extend_from_slice(header);
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(&want)
    );
}

#[test]
fn a_trusted_source_without_a_valid_header_is_closed_and_counted() {
    let echo = Backend::echo("echo");
    let (t, u) = (addr(free_port()), addr(free_port()));
    let m = meshd(echo.addr, t, u);
    let rejected = || {
        m.metric(
            "meshd_rejected_connections_total",
            &[("service", "trusted"), ("reason", "proxy_header")],
        )
    };
    let served = || {
        m.metric(
            "meshd_connection_duration_seconds_count",
            &[("service", "trusted")],
        )
    };

    // A v1 line with no end within 107 bytes.
    let mut endless = b"PROXY TCP4 ".to_vec();
    endless.resize(120, b'1');
    let cases: [&[u8]; 5] = [
        b"GET / HTTP/1.0\r\n\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
        // v2 with a length over 4096.
        &[
            0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, 0x21, 0x11,
            0x10, 0x01,
        ],
        &endless,
    ];
    for (i, bad) in cases.iter().enumerate() {
        let s = connect_from([127, 0, 0, 1], t);
        // Closed: nothing comes back (EOF, or a reset for the unread bytes).
        match exchange(s, &[bad]) {
            Ok(got) => assert!(got.is_empty(), "case {i}: got {got:?}"),
            Err(e) => assert!(
                matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::BrokenPipe
                        | std::io::ErrorKind::NotConnected
                ),
                "case {i}: {e}"
            ),
        }
        let n = (i + 1) as f64;
        assert!(
            wait_until(Duration::from_secs(5), || rejected() == n),
            "case {i}: rejected {}",
            rejected()
        );
    }

    // Silence: closed once client_hello_timeout (1 s) passed, and counted.
    let mut s = connect_from([127, 0, 0, 1], t);
    let t0 = Instant::now();
    let mut buf = [0u8; 16];
    let n = s.read(&mut buf).unwrap_or(0);
    let waited = t0.elapsed();
    assert_eq!(n, 0);
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(4),
        "closed after {waited:?}"
    );
    // Half a header, then silence: the same.
    let mut s = connect_from([127, 0, 0, 1], t);
    s.write_all(b"PROXY TCP4 1.2.3.4 ").unwrap();
    let n = s.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0);
    assert!(wait_until(Duration::from_secs(5), || rejected() == 7.0));
    // None of them reached a backend.
    assert_eq!(served(), 0.0);
    // The admin API shows the count too.
    let svc = m.services();
    let trusted = svc["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "trusted")
        .unwrap();
    assert_eq!(trusted["rejected_proxy_header"], 7);
}

#[test]
fn maglev_hashes_the_client_address_of_the_header() {
    let backends: Vec<Backend> = (0..4).map(|i| Backend::http(&format!("b{i}"))).collect();
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let listen = addr(free_port());
    let m = Meshd::start(&service_toml(
        "hashed",
        listen,
        &addrs,
        "balance = \"maglev\"\naccept_proxy = [\"127.0.0.1\"]\n",
        "check = \"tcp\"",
    ));
    assert!(wait_until(Duration::from_secs(10), || m.healthy("hashed") == 4));

    let who = |src: &str, sport: u16| -> String {
        let mut s = connect_from([127, 0, 0, 1], listen);
        let req = format!(
            "PROXY TCP4 {src} 127.0.0.1 {sport} 80\r\nGET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        );
        // No half-close: the HTTP backend answers a request whose connection stays open.
        s.write_all(req.as_bytes()).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        let text = String::from_utf8_lossy(&got).into_owned();
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        text.split_once("\r\n\r\n").unwrap().1.trim().to_owned()
    };
    let mut seen = std::collections::BTreeSet::new();
    for i in 1..=16 {
        let src = format!("10.9.0.{i}");
        let first = who(&src, 1000);
        for sport in [2000, 3000] {
            assert_eq!(who(&src, sport), first, "{src} moved");
        }
        seen.insert(first);
    }
    // Every connection came from 127.0.0.1: only the header's addresses spread them.
    assert!(seen.len() >= 2, "16 client addresses all went to {seen:?}");
}

#[test]
fn a_reload_turns_accept_proxy_on_and_off() {
    let echo = Backend::echo("echo");
    let listen = addr(free_port());
    let body = |extra: &str| service_toml("svc", listen, &[echo.addr], extra, "check = \"tcp\"");
    let m = Meshd::start(&body(""));
    let reloads = |m: &Meshd| {
        let r = &m.services()["reloads"];
        (r["ok"].as_u64().unwrap(), r["error"].as_u64().unwrap())
    };
    let replace = |text: &str| {
        let tmp = m.dir.0.join(".mesh.toml.tmp");
        std::fs::write(&tmp, format!("[admin]\nlisten = \"{}\"\n\n{text}", m.admin)).unwrap();
        std::fs::rename(&tmp, &m.config).unwrap();
    };
    let header: &[u8] = b"PROXY TCP4 203.0.113.5 127.0.0.1 7000 80\r\nping";

    // Off: the header is the client's payload.
    assert_eq!(
        exchange(connect_from([127, 0, 0, 1], listen), &[header]).unwrap(),
        header
    );

    // On (with meshd's own v1 towards the backend): the header is read and passed on.
    replace(&body(
        "accept_proxy = [\"127.0.0.0/8\"]\nproxy_protocol = \"v1\"\n",
    ));
    assert!(wait_until(Duration::from_secs(10), || reloads(&m) == (1, 0)));
    let got = exchange(connect_from([127, 0, 0, 1], listen), &[header]).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&got),
        "PROXY TCP4 203.0.113.5 127.0.0.1 7000 80\r\nping"
    );
    // No header from a trusted source: closed (EOF, or a reset for the unread bytes).
    match exchange(connect_from([127, 0, 0, 1], listen), &[b"ping"]) {
        Ok(got) => assert!(got.is_empty(), "{got:?}"),
        Err(e) => assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::NotConnected
            ),
            "{e}"
        ),
    }
    assert!(wait_until(Duration::from_secs(5), || {
        m.metric(
            "meshd_rejected_connections_total",
            &[("service", "svc"), ("reason", "proxy_header")],
        ) == 1.0
    }));

    // A bad CIDR is refused with its position; the running config stays.
    replace(&body("accept_proxy = [\"127.0.0.1/8\"]\n"));
    assert!(wait_until(Duration::from_secs(10), || reloads(&m) == (1, 1)));
    let err = m.services()["reloads"]["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        err.contains(
            "mesh.toml:8:17: CIDR \"127.0.0.1/8\" in accept_proxy has bits set past its prefix"
        ),
        "{err}"
    );

    // Off again.
    replace(&body(""));
    assert!(wait_until(Duration::from_secs(10), || reloads(&m) == (2, 1)));
    assert_eq!(
        exchange(connect_from([127, 0, 0, 1], listen), &[header]).unwrap(),
        header
    );
}
