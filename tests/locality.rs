//! `locality` through the real binary: static backends marked `local = true` stand for this
//! node's tasks, the others for tasks on other nodes. Which backend answered is read from
//! its reply (each `meshd backend` answers with its name), one connection per request.
//! Swarm's half (a task is local when its node is the engine's own) is in the unit tests
//! of `discovery::docker` and `discovery::feed`, and on a real cluster in the lab
//! (`scripts/swarm-lab.sh`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;

/// Fast checks, so that a killed backend leaves the table within a few hundred ms.
const HEALTH: &str =
    "check = \"tcp\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\nrise = 1\nfall = 1";

/// `n` requests, each on its own connection: who answered how often ("failed": no answer).
fn tally(listen: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for _ in 0..n {
        let who = who(listen).unwrap_or_else(|| "failed".to_owned());
        *m.entry(who).or_insert(0) += 1;
    }
    m
}

fn only(counts: &BTreeMap<String, usize>, names: &[&str]) -> bool {
    counts.keys().all(|k| names.contains(&k.as_str()))
}

fn up(m: &Meshd, b: &Backend) -> bool {
    m.metric("meshd_backend_up", &[("backend", &b.addr.to_string())]) == 1.0
}

#[test]
fn prefer_local_keeps_traffic_on_this_node_until_fewer_than_half_its_tasks_are_healthy() {
    let mut l1 = Backend::http("l1");
    let mut l2 = Backend::http("l2");
    let r1 = Backend::http("r1");
    let r2 = Backend::http("r2");
    let listen = addr(free_port());
    let m = Meshd::start(
        &Svc::new("web", listen)
            .local(&[l1.addr, l2.addr])
            .backends(&[r1.addr, r2.addr])
            .set("locality = \"prefer_local\"\nbalance = \"round_robin\"")
            .health(HEALTH)
            .to_string(),
    );
    assert!(wait_until(Duration::from_secs(10), || m.healthy("web") == 2));
    let svc = &m.services()["services"][0];
    assert_eq!(svc["locality"], "prefer_local");
    let local: Vec<bool> = svc["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["local"].as_bool().unwrap())
        .collect();
    assert_eq!(local, [true, true, false, false]);

    // Both local tasks healthy: every request stays here, spread over both.
    let c = tally(listen, 100);
    assert!(only(&c, &["l1", "l2"]), "{c:?}");
    assert!(c["l1"] >= 30 && c["l2"] >= 30, "{c:?}");

    // One of two down: half of this node's tasks are healthy, which is not fewer than
    // half: still local.
    l1.kill();
    assert!(wait_until(Duration::from_secs(10), || !up(&m, &l1)));
    let c = tally(listen, 100);
    assert_eq!(c, BTreeMap::from([("l2".to_owned(), 100)]), "{c:?}");

    // None local left: every request goes to the other nodes, none fails.
    l2.kill();
    assert!(wait_until(Duration::from_secs(10), || !up(&m, &l2)));
    let c = tally(listen, 100);
    assert!(only(&c, &["r1", "r2"]), "{c:?}");
    assert_eq!(c.values().sum::<usize>(), 100);

    // A local task comes back (same address): traffic returns to this node.
    let _l1 = Backend::spawn_on_addr(l1.addr, "l1-again", "http", &[]);
    assert!(wait_until(Duration::from_secs(10), || up(&m, &l1)));
    let c = tally(listen, 100);
    assert_eq!(c, BTreeMap::from([("l1-again".to_owned(), 100)]), "{c:?}");
}

#[test]
fn prefer_local_spills_to_other_nodes_when_every_local_connect_fails() {
    // The local task dies between two health checks: the connects it refuses are retried
    // on the other nodes' tasks (panic routing tries them first), none reaches the client.
    let mut l1 = Backend::http("l1");
    let r1 = Backend::http("r1");
    let listen = addr(free_port());
    let m = Meshd::start(
        &Svc::new("web", listen)
            .local(&[l1.addr])
            .backends(&[r1.addr])
            .set("locality = \"prefer_local\"\nconnect_retries = 1")
            // Checks too slow to notice the kill during the test.
            .health("check = \"tcp\"\ninterval = \"60s\"\nrise = 1\nfall = 1")
            .to_string(),
    );
    assert!(wait_until(Duration::from_secs(10), || m.healthy("web") == 1));
    assert_eq!(tally(listen, 20), BTreeMap::from([("l1".to_owned(), 20)]));
    l1.kill();
    let c = tally(listen, 50);
    assert_eq!(c, BTreeMap::from([("r1".to_owned(), 50)]), "{c:?}");
}

#[test]
fn local_only_never_leaves_the_node() {
    let mut l1 = Backend::http("l1");
    let r1 = Backend::http("r1");
    let r2 = Backend::http("r2");
    let listen = addr(free_port());
    let m = Meshd::start(
        &Svc::new("web", listen)
            .local(&[l1.addr])
            .backends(&[r1.addr, r2.addr])
            // A refused connection is closed at once instead of waiting for a task.
            .set("locality = \"local_only\"\nqueue_timeout = \"0s\"")
            .health(HEALTH)
            .to_string(),
    );
    assert!(wait_until(Duration::from_secs(10), || m.healthy("web") == 1));
    assert_eq!(tally(listen, 50), BTreeMap::from([("l1".to_owned(), 50)]));

    // Its only local task gone: connections are refused, none goes to another node.
    l1.kill();
    assert!(wait_until(Duration::from_secs(10), || !up(&m, &l1)));
    let c = tally(listen, 20);
    assert_eq!(c, BTreeMap::from([("failed".to_owned(), 20)]), "{c:?}");
    assert!(
        m.metric(
            "meshd_rejected_connections_total",
            &[("reason", "no_backend")]
        ) >= 20.0
    );
    let remote_connections: f64 = [&r1, &r2]
        .iter()
        .map(|b| {
            m.metric(
                "meshd_connections_total",
                &[("backend", &b.addr.to_string())],
            )
        })
        .sum();
    assert_eq!(remote_connections, 0.0);
}

#[test]
fn a_reload_moves_traffic_with_the_local_flags() {
    let a = Backend::http("a");
    let b = Backend::http("b");
    let listen = addr(free_port());
    let cfg = |local: &Backend, other: &Backend| {
        Svc::new("web", listen)
            .local(&[local.addr])
            .backends(&[other.addr])
            .set("locality = \"prefer_local\"")
            .to_string()
    };
    let m = Meshd::start(&cfg(&a, &b));
    assert_eq!(tally(listen, 30), BTreeMap::from([("a".to_owned(), 30)]));
    let reloads = || m.services()["reloads"]["ok"].as_u64().unwrap();
    let before = reloads();
    let tmp = m.dir.0.join(".mesh.toml.tmp");
    let text = format!("[admin]\nlisten = \"{}\"\n\n{}", m.admin, cfg(&b, &a));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &m.config).unwrap();
    assert!(wait_until(Duration::from_secs(10), || reloads() > before));
    assert_eq!(tally(listen, 30), BTreeMap::from([("b".to_owned(), 30)]));
}
