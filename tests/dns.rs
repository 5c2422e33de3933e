//! DNS discovery against a real DNS server (dnsmasq on loopback, installed by
//! scripts/setup.sh): the answer's addresses become backends, an address that leaves the
//! answer drains, the 600 s TTL is not honoured, and a resolver that stops answering keeps
//! the last good backends (counted as a discovery error).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::*;

struct Dnsmasq {
    child: Child,
    port: u16,
}

impl Dnsmasq {
    fn start(hosts: &std::path::Path) -> Dnsmasq {
        let bin = if std::path::Path::new("/usr/sbin/dnsmasq").exists() {
            "/usr/sbin/dnsmasq"
        } else {
            "dnsmasq"
        };
        // dnsmasq serves UDP and TCP on the port: find one free for both.
        let port = loop {
            let p = free_port();
            if std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok() {
                break p;
            }
        };
        let child = Command::new(bin)
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--listen-address=127.0.0.1",
                "--pid-file=",
                "--user=root",
                "--local-ttl=600", // what Docker's resolver answers with
            ])
            .arg(format!("--port={port}"))
            .arg(format!("--addn-hosts={}", hosts.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq (scripts/setup.sh installs dnsmasq-base)");
        assert!(wait_until(Duration::from_secs(10), || TcpStream::connect(
            ("127.0.0.1", port)
        )
        .is_ok()));
        Dnsmasq { child, port }
    }

    fn reload(&self) {
        let _ = meshd::sys::send_signal(self.child.id(), libc::SIGHUP);
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn dns_answers_become_backends_and_a_vanished_address_drains() {
    let dir = TempDir::new("dns");
    let hosts = dir.0.join("hosts");
    let port = free_port();
    let two: SocketAddr = format!("127.0.0.2:{port}").parse().unwrap();
    let three: SocketAddr = format!("127.0.0.3:{port}").parse().unwrap();
    std::fs::write(&hosts, "127.0.0.2 tasks.web\n127.0.0.3 tasks.web\n").unwrap();
    let dns = Dnsmasq::start(&hosts);

    let b2 = Backend::spawn_on_addr(two, "two", "http", &[]);
    let b3 = Backend::spawn_on_addr(three, "three", "http", &[]);
    assert!(wait_until(Duration::from_secs(10), || TcpStream::connect(
        two
    )
    .is_ok()
        && TcpStream::connect(three).is_ok()));

    let listen = addr(free_port());
    let m = Meshd::start(&format!(
        "[discovery.dns]\nresolver = \"127.0.0.1:{}\"\ninterval = \"200ms\"\n\n\
         [[service]]\nname = \"web\"\nlisten = [\"{listen}\"]\ndns = \"tasks.web:{port}\"\n\
         balance = \"round_robin\"\ndrain_timeout = \"2s\"\n\
         [service.health]\ncheck = \"http\"\ninterval = \"200ms\"\ntimeout = \"200ms\"\n",
        dns.port
    ));
    assert!(wait_until(Duration::from_secs(15), || m.healthy("web") == 2));
    let names: Vec<String> = (0..10).filter_map(|_| who(listen)).collect();
    assert!(names.contains(&"two".to_string()) && names.contains(&"three".to_string()));
    assert_eq!(m.backend("web", &two.to_string())["source"], "dns");

    // Under load, the task at .3 leaves the DNS answer: it drains, nothing fails.
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicU64::new(0));
    let load = {
        let (stop, failed) = (stop.clone(), failed.clone());
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if who(listen).is_none() {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    std::fs::write(&hosts, "127.0.0.2 tasks.web\n").unwrap();
    dns.reload();
    let ts = three.to_string();
    assert!(wait_until(Duration::from_secs(10), || {
        let b = m.backend("web", &ts);
        b.is_null() || b["state"] == "draining"
    }));
    assert!((0..10).all(|_| who(listen).as_deref() == Some("two")));
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    assert_eq!(failed.load(Ordering::Relaxed), 0);
    drop(b3);

    // The resolver goes away: the last good answer stays, the failure is counted.
    drop(dns);
    assert!(wait_until(Duration::from_secs(10), || m
        .metric("meshd_discovery_errors_total", &[("provider", "dns")])
        >= 1.0));
    assert_eq!(who(listen).as_deref(), Some("two"));
    assert_eq!(m.backend("web", &two.to_string())["state"], "active");
    drop(b2);
}

/// `[discovery.dns]` applies on reload: pointing meshd at another resolver (which answers
/// with another task) moves the service there; the old task drains; nothing fails.
#[test]
fn a_reload_that_changes_the_resolver_restarts_dns_discovery() {
    let dir = TempDir::new("dns-reload");
    let port = free_port();
    let two: SocketAddr = format!("127.0.0.2:{port}").parse().unwrap();
    let three: SocketAddr = format!("127.0.0.3:{port}").parse().unwrap();
    let (hosts_a, hosts_b) = (dir.0.join("hosts-a"), dir.0.join("hosts-b"));
    std::fs::write(&hosts_a, "127.0.0.2 tasks.web\n").unwrap();
    std::fs::write(&hosts_b, "127.0.0.3 tasks.web\n").unwrap();
    let (dns_a, dns_b) = (Dnsmasq::start(&hosts_a), Dnsmasq::start(&hosts_b));
    let _b2 = Backend::spawn_on_addr(two, "two", "http", &[]);
    let _b3 = Backend::spawn_on_addr(three, "three", "http", &[]);
    assert!(wait_until(Duration::from_secs(10), || TcpStream::connect(
        two
    )
    .is_ok()
        && TcpStream::connect(three).is_ok()));

    let listen = addr(free_port());
    let config = |resolver: u16| {
        format!(
            "[discovery.dns]\nresolver = \"127.0.0.1:{resolver}\"\ninterval = \"200ms\"\n\n\
             [[service]]\nname = \"web\"\nlisten = [\"{listen}\"]\ndns = \"tasks.web:{port}\"\n\
             drain_timeout = \"2s\"\n\
             [service.health]\ncheck = \"http\"\ninterval = \"200ms\"\ntimeout = \"200ms\"\n"
        )
    };
    let m = Meshd::start(&config(dns_a.port));
    assert!(wait_until(Duration::from_secs(15), || m.healthy("web") == 1));
    assert_eq!(who(listen).as_deref(), Some("two"));

    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicU64::new(0));
    let load = {
        let (stop, failed) = (stop.clone(), failed.clone());
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if who(listen).is_none() {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    // The same file (with the admin section the harness added), another resolver.
    let text = std::fs::read_to_string(&m.config).unwrap().replace(
        &format!("127.0.0.1:{}\"", dns_a.port),
        &format!("127.0.0.1:{}\"", dns_b.port),
    );
    assert!(text.contains(&format!(":{}", dns_b.port)));
    std::fs::write(&m.config, text).unwrap();
    m.signal(libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(15), || {
            let b = m.backend("web", &two.to_string());
            (b.is_null() || b["state"] == "draining") && m.healthy("web") == 1
        }),
        "{}",
        m.log_text()
    );
    assert!((0..10).all(|_| who(listen).as_deref() == Some("three")));
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    assert_eq!(failed.load(Ordering::Relaxed), 0);
    assert!(m.log_text().contains("DNS discovery restarted"));
}
