//! meshd on a real multi-node swarm: the lab of `scripts/swarm-lab.sh` (this machine's
//! engine as manager, more dockerd in network namespaces).
//!
//! Runs as root on a machine whose Docker engine answers and is not in a swarm (the lab
//! makes its own and leaves it again); otherwise it says why, once, and passes.
//! `MESHD_LAB=0` skips it too. Two labs, one after the other (a lock keeps the tests
//! apart), each torn down when its test ends, passed or not:
//!
//! - one manager and two workers: a worker's meshd answers from tasks on every node; the
//!   seeds' phases (scale down, start-first update, scale up, stop-first update, rollback)
//!   under a connection per request through the worker, 0 errors each; node 2 cut off
//!   (its link down) under load: 0 errors, its tasks out of every other node's table before
//!   Swarm marks it Down, back after the link is; locality by answering node;
//! - three managers and a worker: the engine of the manager the worker's meshd follows is
//!   stopped under load: the worker follows another, 0 errors, the engine comes back.
//!
//! `up` builds the meshd image if `MESHD_LAB_IMAGE` (default `meshd:lab`) is missing
//! (deploy/build-image.sh: the static build tests/docker.rs also uses).
//!
//! `cargo test --test cluster -- --nocapture`

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/swarm-lab.sh");
/// `up` may build the image (a static release build: minutes on a cold cache).
const UP_TIMEOUT: Duration = Duration::from_secs(1800);
const DEMO_TIMEOUT: Duration = Duration::from_secs(240);
const DOWN_TIMEOUT: Duration = Duration::from_secs(180);
/// The worker whose meshd the client talks to (node 3, `MESHD_LAB_NET`.3) and the port
/// the demo publishes (`MESHD_LAB_PORT`).
fn worker_target(node: u8) -> SocketAddr {
    let net = std::env::var("MESHD_LAB_NET").unwrap_or_else(|_| "10.213.0".into());
    let port = std::env::var("MESHD_LAB_PORT").unwrap_or_else(|_| "18080".into());
    format!("{net}.{node}:{port}")
        .parse()
        .expect("MESHD_LAB_NET / MESHD_LAB_PORT")
}

/// Runs the lab script with a deadline (killed after it); (success, stdout + stderr).
fn lab(args: &[&str], timeout: Duration) -> (bool, String) {
    let mut child = Command::new("bash")
        .arg(SCRIPT)
        .args(args)
        .current_dir(PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run scripts/swarm-lab.sh");
    let mut so = child.stdout.take().expect("stdout");
    let mut se = child.stderr.take().expect("stderr");
    let to = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = so.read_to_string(&mut s);
        s
    });
    let te = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = se.read_to_string(&mut s);
        s
    });
    let end = Instant::now() + timeout;
    let ok = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break st.success();
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut out = to.join().unwrap_or_default();
    out.push_str(&te.join().unwrap_or_default());
    if Instant::now() >= end {
        out.push_str(&format!("\n(killed after {}s)", timeout.as_secs()));
    }
    (ok, out)
}

/// Tears the lab down when the test ends, passed or not.
struct Down;
impl Drop for Down {
    fn drop(&mut self) {
        let (ok, out) = lab(&["down"], DOWN_TIMEOUT);
        print!("{out}");
        if !ok {
            eprintln!("cleanup: scripts/swarm-lab.sh down failed");
        }
    }
}

fn skip_reason() -> Option<String> {
    if std::env::var("MESHD_LAB").is_ok_and(|v| v == "0") {
        return Some("MESHD_LAB=0".into());
    }
    if !nix::unistd::geteuid().is_root() {
        return Some("not root (the lab makes network namespaces and starts dockerd)".into());
    }
    match Command::new("docker")
        .args(["info", "-f", "{{.Swarm.LocalNodeState}}"])
        .output()
    {
        Ok(o) if o.status.success() => {
            let st = String::from_utf8_lossy(&o.stdout).trim().to_string();
            if st == "inactive" {
                None
            } else {
                Some(format!(
                    "this machine's Docker engine is in a swarm already ({st}); the lab makes its own"
                ))
            }
        }
        Ok(o) => Some(format!(
            "no Docker engine (docker info: {})",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!("no Docker engine (cannot run docker: {e})")),
    }
}

/// One lab at a time: the tests of this file share the machine's engine and addresses.
static LAB: Mutex<()> = Mutex::new(());

/// Brings a lab up (`up ARGS`, then `demo`); the returned guard tears it down.
fn lab_up(args: &[&str], nodes: usize) -> Down {
    let (ok, out) = lab(&["status"], Duration::from_secs(30));
    assert!(
        !ok,
        "a lab is up already (scripts/swarm-lab.sh down first):\n{out}"
    );
    let down = Down;
    let t0 = Instant::now();
    let mut up = vec!["up"];
    up.extend_from_slice(args);
    let (ok, out) = lab(&up, UP_TIMEOUT);
    print!("{out}");
    assert!(ok, "scripts/swarm-lab.sh {} failed", up.join(" "));
    println!("test: lab up in {:.1}s", t0.elapsed().as_secs_f64());

    let ls = Command::new("docker")
        .args(["node", "ls", "--format", "{{.Hostname}} {{.Status}}"])
        .output()
        .expect("docker node ls");
    let ls = String::from_utf8_lossy(&ls.stdout).into_owned();
    assert_eq!(
        ls.lines().filter(|l| l.ends_with(" Ready")).count(),
        nodes,
        "{nodes} Ready nodes expected:\n{ls}"
    );
    let (ok, out) = lab(&["demo"], DEMO_TIMEOUT);
    print!("{out}");
    assert!(ok, "scripts/swarm-lab.sh demo failed");
    down
}

/// Runs a lab step and returns its output (printed), failing the test if the step does.
fn step(args: &[&str], timeout: Duration) -> String {
    let t = Instant::now();
    let (ok, out) = lab(args, timeout);
    print!("{out}");
    println!(
        "test: swarm-lab.sh {} took {:.1}s",
        args.join(" "),
        t.elapsed().as_secs_f64()
    );
    assert!(ok, "scripts/swarm-lab.sh {} failed", args.join(" "));
    out
}

/// The `swarm-lab: result NAME: k=v ...` line of a step, as its `k=v` pairs (values with
/// a trailing `s` or `ms` kept as written).
fn result(out: &str, name: &str) -> BTreeMap<String, String> {
    let prefix = format!("swarm-lab: result {name}:");
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("no line \"{prefix}\" in the step's output"));
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A load step's result: requests sent, and none of them failed.
fn assert_no_errors(out: &str, name: &str) -> u64 {
    let r = result(out, name);
    let requests: u64 = r["requests"].parse().expect("requests=N");
    let errors: u64 = r["errors"].parse().expect("errors=N");
    assert!(requests > 0, "{name}: no request completed: {r:?}");
    assert_eq!(
        errors, 0,
        "{name}: {errors} of {requests} requests failed: {r:?}"
    );
    requests
}

fn seconds(v: &str) -> f64 {
    v.trim_end_matches('s')
        .parse()
        .unwrap_or_else(|_| panic!("a duration in seconds expected, got {v:?}"))
}

#[test]
fn a_worker_meshd_routes_through_phases_a_cut_node_and_locality() {
    if let Some(why) = skip_reason() {
        eprintln!("cluster test skipped: {why}");
        return;
    }
    let _one = LAB.lock().unwrap_or_else(|e| e.into_inner());
    let _down = lab_up(&[], 3);

    // Our own count, from this process: a connection per request to the worker's meshd.
    let target = worker_target(3);
    let mut by_node: BTreeMap<String, usize> = BTreeMap::new();
    let mut by_task: BTreeMap<String, usize> = BTreeMap::new();
    let mut failed = 0;
    let (n, t) = (600, Instant::now());
    for _ in 0..n {
        match common::who(target) {
            Some(name) => {
                let node = name.split_once('@').map(|x| x.1).unwrap_or("?").to_string();
                *by_node.entry(node).or_default() += 1;
                *by_task.entry(name).or_default() += 1;
            }
            None => failed += 1,
        }
    }
    println!(
        "test: {n} requests to the worker's meshd at {target} in {:.1}s: {failed} failed; by node {by_node:?}; by task {by_task:?}",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(failed, 0, "requests through the worker's meshd failed");
    assert_eq!(
        by_node.len(),
        3,
        "answers from every node expected: {by_node:?}"
    );
    assert_eq!(
        by_task.len(),
        6,
        "answers from all 6 tasks expected: {by_task:?}"
    );

    // The seeds' phases, each under load through the worker.
    let out = step(&["phases"], Duration::from_secs(1200));
    for name in [
        "scale-down",
        "start-first",
        "scale-up",
        "stop-first",
        "rollback",
    ] {
        assert_no_errors(&out, name);
    }

    // Node 2 cut off under load: no failed request, its tasks out of node 1's and node
    // 3's tables before Swarm itself marks the node Down, and routed again once back.
    let out = step(&["partition"], Duration::from_secs(300));
    assert_no_errors(&out, "partition");
    let cut = result(&out, "cut");
    let gone = &cut["out-of-tables"];
    assert_ne!(
        gone, "never",
        "a meshd kept routing to the cut node: {cut:?}"
    );
    let (gone, down) = (seconds(gone), seconds(&cut["swarm-down"]));
    assert!(
        gone < down,
        "meshd took the cut node's tasks out after {gone}s, not before Swarm marked it Down ({down}s): {cut:?}"
    );
    let back = out
        .lines()
        .find(|l| l.starts_with("swarm-lab: result rejoin:"))
        .expect("a rejoin line");
    assert!(
        !back.contains("never"),
        "a meshd did not route to the node's tasks again: {back}"
    );

    // Locality, counted by answering node (the worker is lab-node3).
    let out = step(&["locality"], Duration::from_secs(300));
    let only = |name: &str, node: &str| {
        let r = result(&out, &format!("locality-{name}"));
        assert_eq!(r["failed"], "0", "locality {name}: failed requests: {r:?}");
        let others: Vec<_> = r
            .iter()
            .filter(|(k, _)| *k != "failed" && *k != node)
            .collect();
        assert!(
            others.is_empty() && r.contains_key(node),
            "locality {name}: only {node} expected to answer: {r:?}"
        );
    };
    let spread = |name: &str| {
        let r = result(&out, &format!("locality-{name}"));
        assert_eq!(r["failed"], "0", "locality {name}: failed requests: {r:?}");
        let nodes = r.keys().filter(|k| *k != "failed").count();
        assert!(
            nodes >= 2,
            "locality {name}: answers from other nodes expected: {r:?}"
        );
    };
    spread("any");
    only("prefer_local", "lab-node3");
    only("prefer_local-half", "lab-node3");
    spread("prefer_local-none");
    only("prefer_local-back", "lab-node3");
    only("local_only", "lab-node3");
}

#[test]
fn a_worker_meshd_fails_over_when_its_manager_engine_stops() {
    if let Some(why) = skip_reason() {
        eprintln!("cluster test skipped: {why}");
        return;
    }
    let _one = LAB.lock().unwrap_or_else(|e| e.into_inner());
    let _down = lab_up(&["--managers", "3"], 4);
    let out = step(&["failover"], Duration::from_secs(600));
    assert_no_errors(&out, "failover");
    // The worker follows another manager: node 2's or node 3's meshd (not the stopped one,
    // which the step checked; node 1's is allowed too).
    let moved = result(&out, "failover-move");
    let net = std::env::var("MESHD_LAB_NET").unwrap_or_else(|_| "10.213.0".into());
    assert!(
        moved["follows"].starts_with(&format!("{net}.")),
        "the worker follows no manager after the stop: {moved:?}"
    );
    println!("test: worker's meshd follows {moved:?}");
}
