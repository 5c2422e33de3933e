//! meshd on a real multi-node swarm: the lab of `scripts/swarm-lab.sh` (this machine's
//! engine as manager, two more dockerd in network namespaces as workers).
//!
//! Runs only with `MESHD_LAB=1`, as root, on a machine whose Docker engine is not in a
//! swarm (the lab makes its own and leaves it again); otherwise it says why, once, and
//! passes. It brings the lab up (building the meshd image if `MESHD_LAB_IMAGE`, default
//! `meshd:lab`, is missing), runs the demo (meshd as a global service on the host network,
//! a labelled service with 2 tasks per node), checks from here that a worker's meshd
//! answers from tasks on every node with no failed request, and tears the lab down, also
//! when a check fails.
//!
//! `MESHD_LAB=1 cargo test --test cluster -- --nocapture`

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/swarm-lab.sh");
/// `up` may build the image (a static release build: minutes on a cold cache).
const UP_TIMEOUT: Duration = Duration::from_secs(1800);
const DEMO_TIMEOUT: Duration = Duration::from_secs(240);
const DOWN_TIMEOUT: Duration = Duration::from_secs(180);
/// The worker whose meshd the client talks to (node 3, `MESHD_LAB_NET`.3) and the port
/// the demo publishes (`MESHD_LAB_PORT`).
fn worker_target() -> SocketAddr {
    let net = std::env::var("MESHD_LAB_NET").unwrap_or_else(|_| "10.213.0".into());
    let port = std::env::var("MESHD_LAB_PORT").unwrap_or_else(|_| "18080".into());
    format!("{net}.3:{port}")
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
    if std::env::var_os("MESHD_LAB").is_none() {
        return Some("MESHD_LAB is not set (the multi-node lab needs root and this machine's Docker engine; MESHD_LAB=1 runs it)".into());
    }
    match Command::new("docker")
        .args(["info", "-f", "{{.ServerVersion}}"])
        .output()
    {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "no Docker engine (docker info: {})",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!("no Docker engine (cannot run docker: {e})")),
    }
}

#[test]
fn a_worker_meshd_routes_to_tasks_on_every_node() {
    if let Some(why) = skip_reason() {
        eprintln!("cluster test skipped: {why}");
        return;
    }
    let (ok, out) = lab(&["status"], Duration::from_secs(30));
    assert!(
        !ok,
        "a lab is up already (scripts/swarm-lab.sh down first):\n{out}"
    );

    let _down = Down;
    let t0 = Instant::now();
    let (ok, out) = lab(&["up"], UP_TIMEOUT);
    print!("{out}");
    assert!(ok, "scripts/swarm-lab.sh up failed");
    println!("test: lab up in {:.1}s", t0.elapsed().as_secs_f64());

    let nodes = Command::new("docker")
        .args(["node", "ls", "--format", "{{.Hostname}} {{.Status}}"])
        .output()
        .expect("docker node ls");
    let nodes = String::from_utf8_lossy(&nodes.stdout).into_owned();
    assert_eq!(
        nodes.lines().filter(|l| l.ends_with(" Ready")).count(),
        3,
        "3 Ready nodes expected:\n{nodes}"
    );

    let (ok, out) = lab(&["demo"], DEMO_TIMEOUT);
    print!("{out}");
    assert!(ok, "scripts/swarm-lab.sh demo failed");

    // Our own count, from this process: a connection per request to the worker's meshd.
    let target = worker_target();
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
}
