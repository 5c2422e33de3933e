//! TLS termination (`[service.tls] mode = "terminate"`): the real meshd binary holds
//! openssl-made certificates and forwards plaintext to `meshd backend` processes. Clients
//! are `curl`, `openssl s_client` (which prints the certificate's subject, the protocol
//! and the ALPN protocol it got) and, where a client must half-close or move many bytes, a
//! rustls client in the test.
//!
//! openssl and curl come from scripts/setup.sh.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{addr, free_port, wait_until, Backend, Meshd, Svc, TempDir, BIN};

/// A self-signed certificate in `dir` as `{file}.pem` / `{file}.key`: subject
/// `/O={org}/CN={cn}`, subjectAltName the `names`.
fn cert(dir: &Path, file: &str, org: &str, cn: &str, names: &[&str]) -> (PathBuf, PathBuf) {
    cert_ext(dir, file, org, cn, names, &[])
}

/// [`cert`] with more `-addext` extensions.
fn cert_ext(
    dir: &Path,
    file: &str,
    org: &str,
    cn: &str,
    names: &[&str],
    ext: &[&str],
) -> (PathBuf, PathBuf) {
    let (pem, key) = (
        dir.join(format!("{file}.pem")),
        dir.join(format!("{file}.key")),
    );
    let san: Vec<String> = names.iter().map(|n| format!("DNS:{n}")).collect();
    let ok = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:P-256", "-nodes", "-days", "2", "-subj"])
        .arg(format!("/O={org}/CN={cn}"))
        .arg("-addext")
        .arg(format!("subjectAltName={}", san.join(",")))
        .args(ext.iter().flat_map(|e| ["-addext", e]))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&pem)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl (scripts/setup.sh installs it)");
    assert!(ok.success(), "openssl req failed");
    (pem, key)
}

/// `[service.tls]` lines for a terminating service.
fn terminate(pem: &Path, key: &Path, sni: &[&str], extra: &str) -> String {
    let names: Vec<String> = sni.iter().map(|n| format!("\"{n}\"")).collect();
    format!(
        "[service.tls]\nmode = \"terminate\"\ncert = \"{}\"\nkey = \"{}\"\nsni = [{}]\n{extra}",
        pem.display(),
        key.display(),
        names.join(", ")
    )
}

/// What `openssl s_client` saw: the certificate's subject line (`None`: no handshake),
/// and everything it printed.
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
    // A completed handshake prints the negotiated cipher; a refused one "(NONE)".
    let done = text.contains("Cipher is ") && !text.contains("Cipher is (NONE)");
    let subject = text
        .lines()
        .find_map(|l| l.strip_prefix("subject="))
        .filter(|_| done)
        .map(str::to_owned);
    (subject, text)
}

/// `curl` over HTTPS to `name` at `to`, trusting `ca`: the body.
fn curl(to: SocketAddr, name: &str, ca: &Path) -> String {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "10", "--resolve"])
        .arg(format!("{name}:{}:127.0.0.1", to.port()))
        .arg("--cacert")
        .arg(ca)
        .arg(format!("https://{name}:{}/", to.port()))
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn tls_metric(m: &Meshd, service: &str, result: &str) -> f64 {
    m.metric(
        "meshd_tls_handshakes_total",
        &[("service", service), ("result", result)],
    )
}

#[test]
fn terminates_and_routes_by_name() {
    let dir = TempDir::new("tls-route");
    let (api_pem, api_key) = cert(&dir.0, "api", "api", "api.test", &["api.test"]);
    let (wild_pem, wild_key) = cert(&dir.0, "wild", "wild", "wild", &["*.wild.test"]);
    let api = Backend::http("api-backend");
    let wild = Backend::http("wild-backend");
    let listen = addr(free_port());
    let mut text = Svc::new("api", listen)
        .backends(&[api.addr])
        .set(&terminate(&api_pem, &api_key, &["api.test"], ""))
        .to_string();
    text += &Svc::new("wild", listen)
        .backends(&[wild.addr])
        .set(&terminate(&wild_pem, &wild_key, &["*.wild.test"], ""))
        .to_string();
    let m = Meshd::start(&text);

    // HTTPS end to end: meshd's certificate verifies, the plaintext backend answers.
    assert_eq!(curl(listen, "api.test", &api_pem).trim(), "api-backend");
    assert_eq!(
        curl(listen, "x.wild.test", &wild_pem).trim(),
        "wild-backend"
    );
    // Case and one trailing dot do not matter; a wildcard is one label.
    for (name, want) in [
        ("API.Test", "O = api, CN = api.test"),
        ("api.test.", "O = api, CN = api.test"),
        ("Y.wild.test", "O = wild, CN = wild"),
    ] {
        let (subject, text) = s_client(listen, Some(name), &[]);
        assert_eq!(subject.as_deref(), Some(want), "{name}:\n{text}");
    }
    // No service for the name, no default: alert unrecognized_name, no handshake.
    for name in [Some("nobody.test"), Some("a.b.wild.test"), None] {
        let (subject, text) = s_client(listen, name, &[]);
        assert_eq!(subject, None, "{name:?}:\n{text}");
        assert!(
            text.contains("unrecognized name") && text.contains("alert number 112"),
            "{name:?}:\n{text}"
        );
    }
    assert_eq!(tls_metric(&m, "api", "ok"), 3.0);
    assert_eq!(tls_metric(&m, "wild", "ok"), 2.0);
    assert_eq!(
        tls_metric(&m, &listen.to_string(), "unrecognized_name"),
        3.0
    );
    // The plaintext bytes are counted like any connection's.
    let rx = m.metric(
        "meshd_bytes_total",
        &[
            ("service", "api"),
            ("backend", &api.addr.to_string()),
            ("direction", "rx"),
        ],
    );
    assert!(rx > 0.0, "{rx}");
}

#[test]
fn versions_alpn_and_min_version() {
    let dir = TempDir::new("tls-versions");
    let (pem, key) = cert(&dir.0, "a", "a", "a.test", &["a.test"]);
    let b = Backend::http("a-backend");
    let any = addr(free_port());
    let only13 = addr(free_port());
    // A terminating service alone on its port needs no sni: it takes every name.
    let mut text = Svc::new("any", any)
        .backends(&[b.addr])
        .set(&terminate(&pem, &key, &[], "alpn = [\"h2\", \"http/1.1\"]"))
        .to_string()
        .replace("sni = []\n", "");
    text += &Svc::new("only13", only13)
        .backends(&[b.addr])
        .set(&terminate(&pem, &key, &["a.test"], "min_version = \"1.3\""))
        .to_string();
    let m = Meshd::start(&text);

    let (subject, t) = s_client(any, Some("a.test"), &["-tls1_2"]);
    assert!(
        subject.is_some() && t.contains("Protocol  : TLSv1.2"),
        "{t}"
    );
    let (subject, t) = s_client(any, Some("a.test"), &["-tls1_3"]);
    assert!(subject.is_some() && t.contains("TLSv1.3"), "{t}");
    let (_, t) = s_client(any, None, &["-alpn", "h2"]);
    assert!(t.contains("ALPN protocol: h2"), "{t}");
    let (_, t) = s_client(any, Some("other.test"), &["-alpn", "http/1.1"]);
    assert!(t.contains("ALPN protocol: http/1.1"), "{t}");
    assert_eq!(tls_metric(&m, "any", "default"), 4.0);

    // Without alpn none is offered back.
    let (subject, t) = s_client(only13, Some("a.test"), &["-alpn", "h2", "-tls1_3"]);
    assert!(subject.is_some() && t.contains("No ALPN negotiated"), "{t}");
    // A TLS 1.2 client is refused by the 1.3-only service.
    let (subject, t) = s_client(only13, Some("a.test"), &["-tls1_2"]);
    assert_eq!(subject, None, "{t}");
    assert!(t.contains("alert protocol version"), "{t}");
    assert!(wait_until(Duration::from_secs(5), || tls_metric(
        &m, "only13", "error"
    ) == 1.0));
    assert_eq!(tls_metric(&m, "only13", "ok"), 1.0);
}

/// A captured OpenSSL ClientHello for `shop.example.com` (tests/fixtures).
const HELLO: &[u8] = include_bytes!("fixtures/openssl-client-hello.bin");

/// Reads until the peer closes (or resets): true if it did within the read timeout.
fn closed_by_peer(c: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match c.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[test]
fn a_client_that_stops_mid_handshake_is_closed_at_the_deadline() {
    let dir = TempDir::new("tls-stall");
    let (pem, key) = cert(&dir.0, "a", "a", "a.test", &["a.test"]);
    let b = Backend::http("a-backend");
    let listen = addr(free_port());
    let m = Meshd::start(
        &Svc::new("shop", listen)
            .backends(&[b.addr])
            .set("client_hello_timeout = \"1s\"")
            .set(&terminate(&pem, &key, &["shop.example.com"], ""))
            .to_string(),
    );
    let pid = m.child.id();
    let before = fds(pid);
    // A whole ClientHello, then silence: meshd answers it (ServerHello...) and waits for
    // the client's Finished until the deadline.
    let mut c = TcpStream::connect(listen).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(HELLO).unwrap();
    let mut head = [0u8; 3];
    c.read_exact(&mut head).unwrap();
    assert_eq!(head[..2], [22, 3], "{head:?}");
    let t = std::time::Instant::now();
    assert!(closed_by_peer(&mut c), "a stalled handshake was not closed");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(wait_until(Duration::from_secs(5), || tls_metric(
        &m, "shop", "timeout"
    ) == 1.0));
    // A client that leaves mid-handshake: counted as closed.
    let mut c = TcpStream::connect(listen).unwrap();
    c.write_all(HELLO).unwrap();
    c.read_exact(&mut head).unwrap();
    drop(c);
    assert!(wait_until(Duration::from_secs(5), || tls_metric(
        &m, "shop", "closed"
    ) == 1.0));
    // Nothing left behind: no socket, no connection to the backend.
    assert!(
        wait_until(Duration::from_secs(5), || fds(pid) <= before),
        "{} descriptors, {before} before",
        fds(pid)
    );
    assert_eq!(tls_metric(&m, "shop", "ok"), 0.0);
    assert_eq!(
        m.metric(
            "meshd_connections_total",
            &[("service", "shop"), ("backend", &b.addr.to_string())]
        ),
        0.0
    );
}

#[test]
fn a_bad_certificate_or_key_fails_check_naming_the_file() {
    let dir = TempDir::new("tls-check");
    let (pem, key) = cert(&dir.0, "a", "a", "a.test", &["a.test"]);
    let (_, other_key) = cert(&dir.0, "b", "b", "b.test", &["b.test"]);
    let garbage = dir.0.join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let missing = dir.0.join("missing.pem");
    let check = |cert: &Path, key: &Path| {
        let path = dir.0.join("mesh.toml");
        let text = Svc::new("api", addr(free_port()))
            .backends(&[addr(9)])
            .set(&terminate(cert, key, &["a.test"], ""))
            .to_string();
        std::fs::write(&path, text).unwrap();
        let out = Command::new(BIN)
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert!(check(&pem, &key).0);
    for (cert, key, file, what) in [
        (&missing, &key, &missing, "cannot read"),
        (&garbage, &key, &garbage, "holds no PEM certificate"),
        (&pem, &garbage, &garbage, "holds no PEM private key"),
        (&pem, &other_key, &other_key, "cannot serve cert"),
    ] {
        let (ok, err) = check(cert, key);
        assert!(!ok, "{cert:?} {key:?}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains(&format!("\"{}\"", file.display())) && err.contains(what),
            "{err}"
        );
        assert!(err.contains("service \"api\""), "{err}");
    }
}

/// An `openssl s_client` session kept open to an echo backend: a line written comes back.
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

    fn echo(&mut self, line: &str) -> String {
        self.stdin
            .write_all(format!("{line}\n").as_bytes())
            .unwrap();
        let mut got = String::new();
        self.out.read_line(&mut got).unwrap();
        got.trim().to_owned()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_rotated_certificate_serves_new_connections_and_open_ones_stay() {
    let dir = TempDir::new("tls-rotate");
    let (pem, key) = cert(&dir.0, "a", "gen1", "a.test", &["a.test"]);
    let b = Backend::echo("echo");
    let listen = addr(free_port());
    let m = Meshd::start(
        &Svc::new("a", listen)
            .backends(&[b.addr])
            .set(&terminate(&pem, &key, &["a.test"], ""))
            .to_string(),
    );
    let subject = || s_client(listen, Some("a.test"), &[]).0;
    assert_eq!(subject().as_deref(), Some("O = gen1, CN = a.test"));
    let mut held = Session::open(listen, "a.test");
    assert_eq!(held.echo("one"), "one");

    // A bad certificate written over the good one: refused, the old one kept.
    let generation = m.metric("meshd_table_generation", &[]);
    let errors = m.metric("meshd_config_reloads_total", &[("result", "error")]);
    std::fs::write(
        &pem,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    m.signal(libc::SIGHUP);
    assert!(wait_until(Duration::from_secs(10), || {
        m.metric("meshd_config_reloads_total", &[("result", "error")]) > errors
    }));
    assert_eq!(m.metric("meshd_table_generation", &[]), generation);
    assert_eq!(subject().as_deref(), Some("O = gen1, CN = a.test"));

    // A new certificate and key, then a reload: new connections see it.
    cert(&dir.0, "a", "gen2", "a.test", &["a.test"]);
    m.signal(libc::SIGHUP);
    assert!(wait_until(Duration::from_secs(10), || {
        subject().as_deref() == Some("O = gen2, CN = a.test")
    }));
    // The stream opened with the old certificate still flows both ways.
    assert_eq!(held.echo("two"), "two");

    // Files rewritten, no signal: the change is seen and applied.
    cert(&dir.0, "a", "gen3", "a.test", &["a.test"]);
    assert!(
        wait_until(Duration::from_secs(10), || {
            subject().as_deref() == Some("O = gen3, CN = a.test")
        }),
        "{}",
        m.log_text()
    );
    assert!(m.log_text().contains("certificate files changed"));
    assert_eq!(held.echo("three"), "three");
}

/// A rustls client trusting `ca`, for what s_client cannot do (half-close, bulk).
fn rustls_client(ca: &Path) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

#[test]
fn bytes_flow_both_ways_and_a_half_close_reaches_the_backend() {
    let dir = TempDir::new("tls-bulk");
    // rustls (webpki) refuses a CA certificate as the server's own.
    let leaf = ["basicConstraints=critical,CA:FALSE"];
    let (pem, key) = cert_ext(&dir.0, "a", "a", "a.test", &["a.test"], &leaf);
    let b = Backend::echo("echo");
    let listen = addr(free_port());
    let m = Meshd::start(
        &Svc::new("a", listen)
            .backends(&[b.addr])
            .set(&terminate(&pem, &key, &["a.test"], ""))
            .to_string(),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let connector = rustls_client(&pem);
    let sent: Vec<u8> = (0..4 * 1024 * 1024u32)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let got = rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let tcp = tokio::net::TcpStream::connect(listen).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("a.test").unwrap();
        let tls = connector.connect(name, tcp).await.unwrap();
        let (mut r, mut w) = tokio::io::split(tls);
        let data = sent.clone();
        let writer = tokio::spawn(async move {
            w.write_all(&data).await.unwrap();
            // close_notify and FIN: the echo backend sees its end of stream, echoes the
            // rest and closes, which comes back as the end of this stream.
            w.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(30), r.read_to_end(&mut got)).await;
        writer.await.unwrap();
        read.expect("the echo did not end").unwrap();
        got
    });
    assert_eq!(got.len(), sent.len());
    assert!(got == sent, "the echoed bytes differ");
    let dir_bytes = |d: &str| {
        m.metric(
            "meshd_bytes_total",
            &[
                ("service", "a"),
                ("backend", &b.addr.to_string()),
                ("direction", d),
            ],
        )
    };
    assert!(wait_until(Duration::from_secs(5), || dir_bytes("tx")
        == sent.len() as f64));
    assert_eq!(dir_bytes("rx"), sent.len() as f64);
}

#[test]
fn the_backend_gets_a_proxy_header_with_the_client_address() {
    let dir = TempDir::new("tls-proxy");
    let leaf = ["basicConstraints=critical,CA:FALSE"];
    let (pem, key) = cert_ext(&dir.0, "a", "a", "a.test", &["a.test"], &leaf);
    // A backend that answers with the first line it got (the PROXY header), then echoes.
    let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let backend_addr = backend.local_addr().unwrap();
    std::thread::spawn(move || {
        if let Ok((s, _)) = backend.accept() {
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            w.write_all(line.as_bytes()).unwrap();
            let _ = std::io::copy(&mut r, &mut w);
        }
    });
    let listen = addr(free_port());
    let _m = Meshd::start(
        &Svc::new("a", listen)
            .backends(&[backend_addr])
            .set("proxy_protocol = \"v1\"")
            .set(&terminate(&pem, &key, &["a.test"], ""))
            .to_string(),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let connector = rustls_client(&pem);
    let (line, local) = rt.block_on(async {
        use tokio::io::AsyncBufReadExt;
        let tcp = tokio::net::TcpStream::connect(listen).await.unwrap();
        let local = tcp.local_addr().unwrap();
        let name = rustls::pki_types::ServerName::try_from("a.test").unwrap();
        let tls = connector.connect(name, tcp).await.unwrap();
        let mut r = tokio::io::BufReader::new(tls);
        let mut line = String::new();
        tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut line))
            .await
            .unwrap()
            .unwrap();
        (line, local)
    });
    assert_eq!(
        line,
        format!(
            "PROXY TCP4 127.0.0.1 127.0.0.1 {} {}\r\n",
            local.port(),
            listen.port()
        )
    );
}

#[test]
fn an_idle_terminated_connection_is_closed_at_idle_timeout() {
    let dir = TempDir::new("tls-idle");
    let (pem, key) = cert(&dir.0, "a", "a", "a.test", &["a.test"]);
    let b = Backend::echo("echo");
    let listen = addr(free_port());
    let _m = Meshd::start(
        &Svc::new("a", listen)
            .backends(&[b.addr])
            .set("idle_timeout = \"1s\"")
            .set(&terminate(&pem, &key, &["a.test"], ""))
            .to_string(),
    );
    let mut s = Session::open(listen, "a.test");
    assert_eq!(s.echo("one"), "one");
    // Nothing either way: meshd closes both sides, s_client sees the end.
    let mut rest = String::new();
    let (tx, rx) = std::sync::mpsc::channel();
    let mut out = std::mem::replace(&mut s.out, BufReader::new(empty_stdout()));
    std::thread::spawn(move || {
        let _ = out.read_to_string(&mut rest);
        let _ = tx.send(());
    });
    assert!(
        rx.recv_timeout(Duration::from_secs(10)).is_ok(),
        "the idle connection stayed open"
    );
}

/// A stdout pipe of a process that has already ended (to swap a `Session`'s out).
fn empty_stdout() -> std::process::ChildStdout {
    let mut c = Command::new("true").stdout(Stdio::piped()).spawn().unwrap();
    let out = c.stdout.take().unwrap();
    let _ = c.wait();
    out
}

#[test]
fn passthrough_and_termination_share_an_address() {
    let dir = TempDir::new("tls-mixed");
    let (term_pem, term_key) = cert(&dir.0, "term", "term", "term.test", &["term.test"]);
    let (pt_pem, pt_key) = cert(&dir.0, "pt", "inner", "pt.test", &["pt.test"]);
    let b = Backend::http("plain");
    let shared = addr(free_port());
    let inner = addr(free_port());
    // `pt` passes pt.test through to `inner`, which terminates it (its own certificate);
    // `term` terminates term.test on the shared address itself.
    let mut text = Svc::new("term", shared)
        .backends(&[b.addr])
        .set(&terminate(&term_pem, &term_key, &["term.test"], ""))
        .to_string();
    text += &Svc::new("pt", shared)
        .backends(&[inner])
        .set("[service.tls]\nmode = \"passthrough\"\nsni = [\"pt.test\"]")
        .to_string();
    text += &Svc::new("inner", inner)
        .backends(&[b.addr])
        .set(&terminate(&pt_pem, &pt_key, &[], "").replace("sni = []\n", ""))
        .to_string();
    let m = Meshd::start(&text);
    assert_eq!(curl(shared, "term.test", &term_pem).trim(), "plain");
    assert_eq!(curl(shared, "pt.test", &pt_pem).trim(), "plain");
    let (subject, t) = s_client(shared, Some("pt.test"), &[]);
    assert_eq!(subject.as_deref(), Some("O = inner, CN = pt.test"), "{t}");
    assert_eq!(tls_metric(&m, "term", "ok"), 1.0);
    assert_eq!(tls_metric(&m, "pt", "ok"), 2.0);
    assert_eq!(tls_metric(&m, "inner", "default"), 2.0);
}

#[test]
fn a_half_sent_hello_is_closed_at_the_deadline() {
    let dir = TempDir::new("tls-half");
    let (pem, key) = cert(&dir.0, "a", "a", "a.test", &["a.test"]);
    let b = Backend::http("a-backend");
    let listen = addr(free_port());
    let m = Meshd::start(
        &Svc::new("shop", listen)
            .backends(&[b.addr])
            .set("client_hello_timeout = \"1s\"")
            .set(&terminate(&pem, &key, &["shop.example.com"], ""))
            .to_string(),
    );
    let mut c = TcpStream::connect(listen).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(&HELLO[..HELLO.len() / 2]).unwrap();
    assert!(closed_by_peer(&mut c), "a stalled hello was not closed");
    assert!(wait_until(Duration::from_secs(5), || tls_metric(
        &m,
        &listen.to_string(),
        "timeout"
    ) == 1.0));
}

#[test]
fn a_draining_backend_closes_its_terminated_connections_at_drain_timeout() {
    let dir = TempDir::new("tls-drain");
    let (pem, key) = cert(&dir.0, "a", "a", "a.test", &["a.test"]);
    let one = Backend::echo("one");
    let two = Backend::echo("two");
    let listen = addr(free_port());
    let config = |b: SocketAddr| {
        Svc::new("a", listen)
            .backends(&[b])
            .set("drain_timeout = \"1s\"")
            .set(&terminate(&pem, &key, &["a.test"], ""))
            .to_string()
    };
    let m = Meshd::start(&config(one.addr));
    let mut s = Session::open(listen, "a.test");
    assert_eq!(s.echo("one"), "one");
    let generation = m.metric("meshd_table_generation", &[]);
    std::fs::write(
        &m.config,
        format!("[admin]\nlisten = \"{}\"\n{}", m.admin, config(two.addr)),
    )
    .unwrap();
    m.signal(libc::SIGHUP);
    assert!(wait_until(Duration::from_secs(10), || {
        m.metric("meshd_table_generation", &[]) > generation
    }));
    // Still served while draining, then closed.
    assert_eq!(s.echo("two"), "two");
    let (tx, rx) = std::sync::mpsc::channel();
    let mut out = std::mem::replace(&mut s.out, BufReader::new(empty_stdout()));
    std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = out.read_to_string(&mut rest);
        let _ = tx.send(());
    });
    assert!(
        rx.recv_timeout(Duration::from_secs(10)).is_ok(),
        "the drained connection stayed open"
    );
    assert!(wait_until(Duration::from_secs(5), || {
        m.metric(
            "meshd_drain_closed_connections_total",
            &[("service", "a"), ("backend", &one.addr.to_string())],
        ) == 1.0
    }));
}
