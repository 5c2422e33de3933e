//! SNI passthrough (`[service.tls] mode = "passthrough"`): the real meshd binary in front
//! of real nginx TLS backends, each with its own self-signed certificate (its CN names the
//! backend), so a client tells which backend answered by the certificate it sees: meshd
//! passes the bytes through, the backend does the handshake. Clients are `openssl
//! s_client` and `curl`, and raw sockets for hellos nobody's client sends (one byte per
//! segment, too large, never finished, after a PROXY header).
//!
//! nginx and openssl come from scripts/setup.sh (Debian's `nginx-light`, `openssl`).

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use common::{addr, free_port, wait_until, Meshd, Svc, TempDir};

/// nginx serving TLS on one port per name, each with a certificate for that name (CN and
/// subjectAltName), answering `GET /` with the name.
struct Nginx {
    child: Child,
    ports: Vec<(String, SocketAddr)>,
    dir: TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nginx_bin() -> &'static str {
    for p in ["/usr/sbin/nginx", "/usr/bin/nginx", "/usr/local/sbin/nginx"] {
        if Path::new(p).exists() {
            return p;
        }
    }
    panic!("nginx is not installed: run scripts/setup.sh (Debian package nginx-light)");
}

/// A self-signed certificate for `cn` (also its subjectAltName) in `dir`.
fn cert(dir: &Path, cn: &str) -> (PathBuf, PathBuf) {
    let (key, pem) = (dir.join(format!("{cn}.key")), dir.join(format!("{cn}.pem")));
    let ok = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:P-256", "-nodes", "-days", "2", "-subj"])
        .arg(format!("/CN={cn}"))
        .arg("-addext")
        .arg(format!("subjectAltName=DNS:{cn}"))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&pem)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl (scripts/setup.sh installs it)");
    assert!(ok.success(), "openssl req failed");
    (key, pem)
}

impl Nginx {
    fn start(names: &[&str]) -> Nginx {
        let dir = TempDir::new("nginx-tls");
        let d = dir.0.display().to_string();
        let mut servers = String::new();
        let mut ports = Vec::new();
        for n in names {
            let (key, pem) = cert(&dir.0, n);
            let a = addr(free_port());
            servers.push_str(&format!(
                "server {{ listen {a} ssl; ssl_protocols TLSv1.2 TLSv1.3; \
                 ssl_certificate {}; ssl_certificate_key {}; keepalive_timeout 60s; \
                 location / {{ return 200 \"{n}\\n\"; }} }}\n",
                pem.display(),
                key.display()
            ));
            ports.push((n.to_string(), a));
        }
        let conf = format!(
            // One process (no master): `Drop` kills it, and no orphaned worker outlives
            // the test (with a master, SIGKILL left its worker running).
            "master_process off;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 256; }}\n\
             http {{ access_log off; client_body_temp_path {d}; proxy_temp_path {d}; \
             fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};\n{servers}}}\n"
        );
        let path = dir.0.join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        let child = Command::new(nginx_bin())
            .arg("-c")
            .arg(&path)
            .arg("-p")
            .arg(&dir.0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx");
        let up = wait_until(Duration::from_secs(10), || {
            ports.iter().all(|(_, a)| TcpStream::connect(a).is_ok())
        });
        assert!(up, "nginx did not listen on {ports:?}");
        Nginx { child, ports, dir }
    }

    fn at(&self, name: &str) -> SocketAddr {
        self.ports.iter().find(|(n, _)| n == name).unwrap().1
    }

    fn pem(&self, name: &str) -> PathBuf {
        self.dir.0.join(format!("{name}.pem"))
    }
}

/// `[service.tls]` lines for `Svc::set`.
fn tls(sni: &[&str], default: bool) -> String {
    let names: Vec<String> = sni.iter().map(|n| format!("\"{n}\"")).collect();
    format!(
        "[service.tls]\nmode = \"passthrough\"\nsni = [{}]\nsni_default = {default}",
        names.join(", ")
    )
}

/// What `openssl s_client` saw: the CN of the certificate it was shown (`None`: no
/// handshake), and everything it printed.
fn s_client(to: SocketAddr, servername: Option<&str>, extra: &[&str]) -> (Option<String>, String) {
    let mut cmd = Command::new("timeout");
    cmd.args(["10", "openssl", "s_client", "-connect"])
        .arg(to.to_string());
    match servername {
        Some(n) => cmd.args(["-servername", n]),
        None => cmd.arg("-noservername"),
    };
    let out = cmd
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("openssl s_client");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let cn = text
        .lines()
        .find_map(|l| l.strip_prefix("subject=CN = "))
        .map(str::to_owned);
    (cn, text)
}

fn tls_metric(m: &Meshd, service: &str, result: &str) -> f64 {
    m.metric(
        "meshd_tls_handshakes_total",
        &[("service", service), ("result", result)],
    )
}

/// meshd with `api` (api.test, backend api.test), `wild` (*.wild.test and one exact name,
/// backend wild.test) and, when `default`, `fallback` (sni_default, backend fallback.test)
/// on one address.
fn mesh(n: &Nginx, listen: SocketAddr, default: bool) -> Meshd {
    let mut text = Svc::new("api", listen)
        .backends(&[n.at("api.test")])
        .set(&tls(&["api.test"], false))
        .to_string();
    text += &Svc::new("wild", listen)
        .backends(&[n.at("wild.test")])
        .set(&tls(&["*.wild.test", "exact.test"], false))
        .to_string();
    if default {
        text += &Svc::new("fallback", listen)
            .backends(&[n.at("fallback.test")])
            .set(&tls(&[], true))
            .to_string();
    }
    Meshd::start(&text)
}

#[test]
fn names_route_to_their_backend_and_the_default_takes_the_rest() {
    let n = Nginx::start(&["api.test", "wild.test", "fallback.test"]);
    let listen = addr(free_port());
    let m = mesh(&n, listen, true);
    let cases: &[(Option<&str>, &[&str], &str)] = &[
        (Some("api.test"), &[], "api.test"),
        // Case and one trailing dot do not matter (Traefik CVE-2022-23632).
        (Some("API.Test"), &[], "api.test"),
        (Some("api.test."), &[], "api.test"),
        (Some("exact.test"), &[], "wild.test"),
        // A wildcard stands for one label, not two, and not none.
        (Some("a.wild.test"), &[], "wild.test"),
        (Some("a.b.wild.test"), &[], "fallback.test"),
        (Some("wild.test"), &[], "fallback.test"),
        (Some("nobody.test"), &[], "fallback.test"),
        (None, &[], "fallback.test"),
        // A TLS 1.3-only hello (no 1.2 fallback) routes like any other (Envoy
        // CVE-2020-8660).
        (Some("api.test"), &["-tls1_3"], "api.test"),
    ];
    for (name, extra, want) in cases {
        let (cn, text) = s_client(listen, *name, extra);
        assert_eq!(cn.as_deref(), Some(*want), "{name:?} {extra:?}:\n{text}");
        if extra.contains(&"-tls1_3") {
            assert!(text.contains("TLSv1.3"), "{text}");
        }
    }
    // An HTTPS client end to end: the backend's certificate verifies, its answer arrives.
    let out = Command::new("curl")
        .args(["-s", "--max-time", "10", "--resolve"])
        .arg(format!("api.test:{}:127.0.0.1", listen.port()))
        .arg("--cacert")
        .arg(n.pem("api.test"))
        .arg(format!("https://api.test:{}/", listen.port()))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "api.test\n");

    assert_eq!(tls_metric(&m, "api", "ok"), 5.0);
    assert_eq!(tls_metric(&m, "wild", "ok"), 2.0);
    assert_eq!(tls_metric(&m, "fallback", "default"), 4.0);
    let s = m.services();
    let api = s["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "api")
        .unwrap();
    assert_eq!(api["listen"][0], listen.to_string(), "{api}");
}

#[test]
fn an_unknown_name_without_a_default_gets_alert_112() {
    let n = Nginx::start(&["api.test", "wild.test"]);
    let listen = addr(free_port());
    let m = mesh(&n, listen, false);
    for name in [Some("nobody.test"), Some("a.b.wild.test"), None] {
        let (cn, text) = s_client(listen, name, &[]);
        assert_eq!(cn, None, "{name:?}:\n{text}");
        assert!(
            text.contains("unrecognized name") && text.contains("alert number 112"),
            "{name:?}:\n{text}"
        );
    }
    let label = listen.to_string();
    assert_eq!(tls_metric(&m, &label, "unrecognized_name"), 3.0);
    // Not TLS at all: closed, counted.
    let mut c = TcpStream::connect(listen).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut buf = Vec::new();
    let _ = c.read_to_end(&mut buf);
    assert!(buf.is_empty(), "{buf:?}");
    assert!(wait_until(Duration::from_secs(5), || tls_metric(
        &m,
        &label,
        "malformed"
    ) == 1.0));
}

/// A captured OpenSSL ClientHello for `shop.example.com` (tests/fixtures).
const HELLO: &[u8] = include_bytes!("fixtures/openssl-client-hello.bin");

#[test]
fn a_hello_sent_one_byte_per_segment_is_reassembled() {
    let n = Nginx::start(&["api.test"]);
    let listen = addr(free_port());
    let m = Meshd::start(
        &Svc::new("shop", listen)
            .backends(&[n.at("api.test")])
            .set(&tls(&["shop.example.com"], false))
            .to_string(),
    );
    let mut c = TcpStream::connect(listen).unwrap();
    c.set_nodelay(true).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for b in HELLO {
        c.write_all(std::slice::from_ref(b)).unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    // nginx answers the hello: a handshake record (ServerHello) comes back through meshd.
    let mut head = [0u8; 3];
    c.read_exact(&mut head).unwrap();
    assert_eq!(head[..2], [22, 3], "{head:?}");
    assert_eq!(tls_metric(&m, "shop", "ok"), 1.0);
}

#[test]
fn a_trusted_sources_proxy_header_comes_before_the_hello() {
    let n = Nginx::start(&["api.test"]);
    let listen = addr(free_port());
    let m = Meshd::start(
        &Svc::new("shop", listen)
            .backends(&[n.at("api.test")])
            .set("accept_proxy = [\"127.0.0.1/32\"]")
            .set(&tls(&["shop.example.com"], false))
            .to_string(),
    );
    let mut c = TcpStream::connect(listen).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut wire = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n".to_vec();
    wire.extend_from_slice(HELLO);
    c.write_all(&wire).unwrap();
    let mut head = [0u8; 3];
    c.read_exact(&mut head).unwrap();
    assert_eq!(head[..2], [22, 3], "{head:?}");
    assert_eq!(tls_metric(&m, "shop", "ok"), 1.0);

    // A trusted source without a header: closed, counted under the address.
    let mut c = TcpStream::connect(listen).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(HELLO).unwrap();
    assert!(closed_by_peer(&mut c));
    let label = listen.to_string();
    assert!(wait_until(Duration::from_secs(5), || tls_metric(
        &m,
        &label,
        "proxy_header"
    ) == 1.0));
}

/// The number of open descriptors of process `pid`.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Reads until the peer closes (or resets): true if it did within the read timeout.
fn closed_by_peer(c: &mut TcpStream) -> bool {
    let mut buf = [0u8; 256];
    loop {
        match c.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[test]
fn oversized_and_unfinished_hellos_are_closed_and_leave_nothing_behind() {
    let n = Nginx::start(&["api.test"]);
    let listen = addr(free_port());
    let m = Meshd::start(
        &Svc::new("api", listen)
            .backends(&[n.at("api.test")])
            .set("client_hello_timeout = \"1s\"")
            .set(&tls(&["api.test"], true))
            .to_string(),
    );
    let label = listen.to_string();
    let pid = m.child.id();
    let before = fds(pid);

    // Over 16 KiB of records before the hello ends: closed.
    let mut c = TcpStream::connect(listen).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut big = vec![22, 3, 1, 0x40, 0x00, 1, 0, 0xff, 0xff];
    big.resize(5 + 16384, 0);
    big.extend_from_slice(&[22, 3, 1, 0x40, 0x00]);
    big.resize(big.len() + 16384, 0);
    let _ = c.write_all(&big);
    assert!(closed_by_peer(&mut c), "an oversized hello was not closed");
    assert!(wait_until(Duration::from_secs(5), || tls_metric(
        &m,
        &label,
        "too_large"
    ) == 1.0));

    // Half a hello, then nothing: closed at client_hello_timeout.
    let mut c = TcpStream::connect(listen).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(&HELLO[..HELLO.len() / 2]).unwrap();
    assert!(closed_by_peer(&mut c), "a stalled hello was not closed");
    assert!(wait_until(Duration::from_secs(5), || tls_metric(
        &m, &label, "timeout"
    ) == 1.0));
    // Nothing left open: no socket, no connection counted to the backend.
    assert!(
        wait_until(Duration::from_secs(5), || fds(pid) <= before),
        "{} descriptors, {before} before",
        fds(pid)
    );
    assert_eq!(
        m.metric(
            "meshd_active_connections",
            &[
                ("service", "api"),
                ("backend", &n.at("api.test").to_string())
            ]
        ),
        0.0
    );
    assert_eq!(tls_metric(&m, "api", "ok"), 0.0);
}

/// An `openssl s_client` session kept open: lines written to it go over the TLS
/// connection.
struct Session {
    child: Child,
    stdin: ChildStdin,
    out: BufReader<std::process::ChildStdout>,
}

impl Session {
    fn open(to: SocketAddr, name: &str) -> Session {
        let mut child = Command::new("openssl")
            .args(["s_client", "-quiet", "-connect"])
            .arg(to.to_string())
            .args(["-servername", name])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        Session { child, stdin, out }
    }

    /// One HTTP/1.1 request on the kept connection; the body's line.
    fn get(&mut self) -> String {
        self.stdin
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut line = String::new();
        loop {
            line.clear();
            if self.out.read_line(&mut line).unwrap() == 0 {
                return String::new();
            }
            if line.ends_with(".test\n") {
                return line.trim().to_owned();
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_reload_moves_a_name_and_an_open_connection_stays() {
    let n = Nginx::start(&["one.test", "two.test"]);
    let listen = addr(free_port());
    let config = |moved: bool| {
        let (a, b): (&[&str], &[&str]) = if moved {
            (&["one.test"], &["two.test", "moving.test"])
        } else {
            (&["one.test", "moving.test"], &["two.test"])
        };
        let mut t = Svc::new("one", listen)
            .backends(&[n.at("one.test")])
            .set(&tls(a, false))
            .to_string();
        t += &Svc::new("two", listen)
            .backends(&[n.at("two.test")])
            .set(&tls(b, false))
            .to_string();
        t
    };
    let m = Meshd::start(&config(false));
    assert_eq!(
        s_client(listen, Some("moving.test"), &[]).0.as_deref(),
        Some("one.test")
    );
    let mut held = Session::open(listen, "moving.test");
    assert_eq!(held.get(), "one.test");
    let generation = m.metric("meshd_table_generation", &[]);

    std::fs::write(
        &m.config,
        format!("[admin]\nlisten = \"{}\"\n{}", m.admin, config(true)),
    )
    .unwrap();
    m.signal(libc::SIGHUP);
    assert!(wait_until(Duration::from_secs(10), || {
        m.metric("meshd_table_generation", &[]) > generation
    }));
    // New connections for the name go to its new service; the listener was not re-bound.
    assert_eq!(
        s_client(listen, Some("moving.test"), &[]).0.as_deref(),
        Some("two.test")
    );
    // The connection opened before the reload is still served by its backend.
    assert_eq!(held.get(), "one.test");
    assert!(m.log_text().matches("SNI listener bound").count() == 1);
}
