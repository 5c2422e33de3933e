//! The provider loop against a fake engine on a unix socket that serves recorded answers.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::UnixListener;

use super::*;
use crate::config::Config;

macro_rules! fixture {
    ($name:literal) => {
        include_str!(concat!("../../../tests/fixtures/docker/", $name))
    };
}

#[derive(Default)]
struct Answers {
    version: String,
    services: String,
    tasks: String,
    nodes: String,
    /// What `/events` streams (then the stream ends, and the provider reconnects).
    events: String,
    /// Every data call but `/events` answers this status and body instead.
    fail: Option<(u16, String)>,
    /// Paths asked, in order.
    asked: Vec<String>,
}

struct FakeEngine {
    answers: Arc<Mutex<Answers>>,
    endpoint: String,
    dir: PathBuf,
}

impl Drop for FakeEngine {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl FakeEngine {
    fn start(tag: &str) -> FakeEngine {
        let dir =
            std::env::temp_dir().join(format!("meshd-fake-docker-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("docker.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let answers = Arc::new(Mutex::new(Answers {
            version: fixture!("version.json").into(),
            services: fixture!("services.json").into(),
            tasks: fixture!("tasks-steady.json").into(),
            nodes: fixture!("nodes.json").into(),
            events: fixture!("events.jsonl")
                .lines()
                .next()
                .unwrap_or("")
                .to_owned()
                + "\n",
            ..Answers::default()
        }));
        let a = answers.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let a = a.clone();
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let a = a.clone();
                            async move { Ok::<_, Infallible>(answer(&a, &req)) }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        FakeEngine {
            answers,
            endpoint: format!("unix://{}", sock.display()),
            dir,
        }
    }

    fn set(&self, f: impl FnOnce(&mut Answers)) {
        f(&mut self.answers.lock().unwrap());
    }

    fn asked(&self) -> Vec<String> {
        self.answers.lock().unwrap().asked.clone()
    }
}

fn answer(a: &Mutex<Answers>, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let mut a = a.lock().unwrap();
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    a.asked.push(pq);
    let path = req.uri().path();
    let (status, body) = if path == "/version" {
        (200, a.version.clone())
    } else if path.ends_with("/events") {
        (200, a.events.clone())
    } else if let Some((code, body)) = &a.fail {
        (*code, body.clone())
    } else if path.ends_with("/services") {
        (200, a.services.clone())
    } else if path.ends_with("/tasks") {
        (200, a.tasks.clone())
    } else if path.ends_with("/nodes") {
        (200, a.nodes.clone())
    } else {
        (404, r#"{"message":"page not found"}"#.to_owned())
    };
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

fn config(endpoint: &str) -> DockerDiscoveryConfig {
    DockerDiscoveryConfig {
        endpoint: endpoint.to_owned(),
        poll_interval: Duration::from_millis(40),
        managers: Vec::new(),
        token: None,
        token_file: None,
        address: crate::config::TaskAddress::Auto,
    }
}

fn feed() -> std::sync::Arc<crate::discovery::feed::FeedTx> {
    std::sync::Arc::new(tokio::sync::watch::channel(crate::discovery::feed::FeedState::default()).0)
}

fn defaults() -> ServiceConfig {
    Config::parse(std::path::Path::new("mesh.toml"), "[discovery.docker]\n")
        .unwrap()
        .defaults
}

enum Got {
    Services(Vec<ServiceConfig>),
    Failed,
}

async fn next(rx: &mut mpsc::Receiver<Update>) -> Got {
    let cmd = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("a command within 5 s")
        .expect("provider alive");
    match cmd {
        Update::Services(PROVIDER, list) | Update::Changed(PROVIDER, list, _) => {
            Got::Services(list)
        }
        Update::Failed(PROVIDER) => Got::Failed,
        _ => panic!("unexpected command"),
    }
}

fn endpoint_count(list: &[ServiceConfig]) -> usize {
    assert_eq!(list.len(), 1);
    list[0].backends.len()
}

#[tokio::test]
async fn sends_on_change_only_and_keeps_state_on_failure() {
    let engine = FakeEngine::start("loop");
    let (tx, mut rx) = mpsc::channel(16);
    let provider = tokio::spawn(run(config(&engine.endpoint), defaults(), tx, feed()));

    let Got::Services(list) = next(&mut rx).await else {
        panic!("expected services first")
    };
    assert_eq!(list[0].name, "meshfix-web");
    assert_eq!(endpoint_count(&list), 3);

    // A rolling update tells one task to stop: it drops out at the next poll.
    engine.set(|a| {
        a.services = fixture!("services-stop-first.json").into();
        a.tasks = fixture!("tasks-stop-first.json").into();
    });
    let Got::Services(list) = next(&mut rx).await else {
        panic!("expected services")
    };
    assert_eq!(endpoint_count(&list), 2);

    // Nothing changes: nothing is sent (several polls at 40 ms, 150 ms while updating).
    assert!(
        tokio::time::timeout(Duration::from_millis(600), rx.recv())
            .await
            .is_err(),
        "a command was sent although nothing changed"
    );

    // The engine fails: counted, nothing else.
    engine.set(|a| a.fail = Some((500, r#"{"message":"boom"}"#.into())));
    assert!(matches!(next(&mut rx).await, Got::Failed));

    // It answers again with the pre-update state (a lagging manager): the stopped task
    // stays out, so the list is unchanged and nothing is sent.
    engine.set(|a| {
        a.fail = None;
        a.services = fixture!("services.json").into();
        a.tasks = fixture!("tasks-steady.json").into();
    });
    loop {
        match tokio::time::timeout(Duration::from_millis(800), rx.recv()).await {
            Err(_) => break,
            Ok(Some(Update::Failed(_))) => continue,
            Ok(Some(Update::Services(_, list) | Update::Changed(_, list, _))) => {
                panic!("resurrected: {} endpoints", endpoint_count(&list))
            }
            Ok(_) => panic!("unexpected command"),
        }
    }

    let asked = engine.asked();
    assert_eq!(asked[0], "/version");
    assert!(asked.iter().any(|p| p
        == "/v1.41/tasks?filters=%7B%22desired-state%22%3A%5B%22running%22%2C%22shutdown%22%2C%22remove%22%5D%7D"));
    assert!(asked
        .iter()
        .any(|p| p == "/v1.41/services?filters=%7B%22label%22%3A%5B%22mesh.publish%22%5D%7D"));
    assert!(asked.iter().any(|p| p == "/v1.41/nodes"));
    assert!(asked
        .iter()
        .any(|p| p.starts_with("/v1.41/events?filters=")));

    // The provider ends when the control plane goes away.
    drop(rx);
    tokio::time::timeout(Duration::from_secs(2), provider)
        .await
        .expect("provider ends")
        .unwrap();
}

#[tokio::test]
async fn refuses_an_engine_too_old() {
    let engine = FakeEngine::start("old");
    engine.set(|a| {
        a.version = r#"{"Version":"1.11.2","ApiVersion":"1.23","MinAPIVersion":"1.12"}"#.into()
    });
    let (tx, mut rx) = mpsc::channel(16);
    let provider = tokio::spawn(run(config(&engine.endpoint), defaults(), tx, feed()));
    assert!(matches!(next(&mut rx).await, Got::Failed));
    assert!(matches!(next(&mut rx).await, Got::Failed));
    assert!(engine.asked().iter().all(|p| p == "/version"));
    let mut c = Client::new(&engine.endpoint).unwrap();
    assert_eq!(
        c.negotiate().await.unwrap_err().to_string(),
        format!(
            "docker discovery: the engine at {} serves API 1.23 at most; meshd needs 1.24 or newer (Docker 1.12+): upgrade Docker",
            engine.endpoint
        )
    );
    provider.abort();
}

#[tokio::test]
async fn pins_the_newest_common_version() {
    let engine = FakeEngine::start("new");
    engine.set(|a| {
        a.version = r#"{"Version":"99.0","ApiVersion":"1.99","MinAPIVersion":"1.44"}"#.into()
    });
    let mut c = Client::new(&engine.endpoint).unwrap();
    c.negotiate().await.unwrap();
    assert_eq!(c.api_version(), Some("1.50"));
    let nodes: Vec<api::Node> = c.get("/nodes").await.unwrap();
    assert_eq!(nodes.len(), 1);
    assert!(engine.asked().contains(&"/v1.50/nodes".to_string()));
}

#[test]
fn finds_its_own_container_id() {
    let id = "65f48d0e2afe993707eb76f8aa40b7dc9ccd071be6d1364727b8e6520e1c62cb";
    let mountinfo = format!(
        "1 0 0:1 / / rw - fuse-overlayfs fuse-overlayfs rw\n\
         7 1 254:1 /var/lib/docker/containers/{id}/resolv.conf /etc/resolv.conf rw - ext4 /dev/vda rw\n"
    );
    assert_eq!(
        container_id_from_mountinfo(&mountinfo),
        Some(id.to_string())
    );
    assert_eq!(
        container_id_from_mountinfo("1 0 0:1 / / rw - ext4 /dev/vda rw\n"),
        None
    );
    assert_eq!(
        container_id_from_mountinfo("x /var/lib/docker/containers/abc/hostname y\n"),
        None
    );
}

/// meshd on a manager, as far as the feed goes: the provider reading `engine`, and the
/// real admin server serving its feed with token `token`.
struct Manager {
    addr: std::net::SocketAddr,
    provider: Option<tokio::task::JoinHandle<()>>,
    feed: Option<crate::discovery::feed::FeedTx>,
    engine: String,
}

impl Manager {
    async fn start(engine: &str, token: &str) -> Manager {
        use crate::admin::AdminState;
        let (feed_tx, feed_rx) =
            tokio::sync::watch::channel(crate::discovery::feed::FeedState::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cmd_tx, _cmd_rx) = mpsc::channel(1);
        let state = Arc::new(AdminState {
            status: Default::default(),
            commands: cmd_tx,
            token: arc_swap::ArcSwapOption::from(Some(Arc::new(token.to_owned()))),
            ready: std::sync::atomic::AtomicBool::new(true),
            in_flight: std::sync::atomic::AtomicUsize::new(0),
            accepting: std::sync::atomic::AtomicBool::new(true),
            metrics: None,
            feed: Some(feed_rx),
            upgrades: Arc::new(crate::upgrade::Upgrades {
                info: Arc::new(crate::upgrade::ProcessInfo::current()),
                timeout: std::time::Duration::from_secs(60),
                done: mpsc::unbounded_channel().0,
            }),
        });
        tokio::spawn(crate::admin::serve(
            listener,
            state,
            Arc::new(crate::proxy::close::CloseSignal::new()),
        ));
        Manager {
            addr,
            provider: None,
            feed: Some(feed_tx),
            engine: engine.to_owned(),
        }
    }

    /// Starts reading the engine (until then the feed answers 503).
    fn read_engine(&mut self) {
        let (tx, mut rx) = mpsc::channel(16);
        tokio::spawn(async move { while rx.recv().await.is_some() {} });
        let feed = self.feed.take().unwrap();
        self.provider = Some(tokio::spawn(run(
            config(&self.engine),
            defaults(),
            tx,
            std::sync::Arc::new(feed),
        )));
    }

    /// meshd on this manager goes away: its feed ends.
    fn stop(&mut self) {
        if let Some(p) = self.provider.take() {
            p.abort();
        }
    }
}

fn follower_config(managers: &[&Manager], token_ok: bool) -> DockerDiscoveryConfig {
    DockerDiscoveryConfig {
        // A worker: no engine socket at all.
        endpoint: "unix:///nonexistent/meshd-test/docker.sock".into(),
        poll_interval: Duration::from_millis(40),
        managers: managers.iter().map(|m| m.addr.to_string()).collect(),
        token: Some(if token_ok { "f33d" } else { "wrong" }.into()),
        token_file: None,
        address: crate::config::TaskAddress::Auto,
    }
}

/// Skips failures (counted by the control plane) up to the next services, within `limit`.
async fn next_services(rx: &mut mpsc::Receiver<Update>, limit: Duration) -> Vec<ServiceConfig> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let cmd = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("services within the limit")
            .expect("provider alive");
        match cmd {
            Update::Services(PROVIDER, list) | Update::Changed(PROVIDER, list, _) => return list,
            Update::Failed(PROVIDER) => continue,
            _ => panic!("unexpected command"),
        }
    }
}

#[tokio::test]
async fn a_worker_follows_a_manager_and_fails_over_keeping_its_table() {
    let engine = FakeEngine::start("follow");
    let mut m1 = Manager::start(&engine.endpoint, "f33d").await;
    let mut m2 = Manager::start(&engine.endpoint, "f33d").await;
    // Only m1 reads the engine yet: m2 answers 503, so the worker settles on m1
    // whichever manager it tries first.
    m1.read_engine();
    let (tx, mut rx) = mpsc::channel(16);
    let (wfeed, wstatus) =
        tokio::sync::watch::channel(crate::discovery::feed::FeedState::default());
    let worker = tokio::spawn(run(
        follower_config(&[&m1, &m2], true),
        defaults(),
        tx,
        std::sync::Arc::new(wfeed),
    ));
    let list = next_services(&mut rx, Duration::from_secs(5)).await;
    assert_eq!(
        wstatus.borrow().following.as_deref(),
        Some(m1.addr.to_string().as_str())
    );
    assert!(!wstatus.borrow().serving, "a follower serves no feed");
    assert_eq!(list[0].name, "meshfix-web");
    assert_eq!(endpoint_count(&list), 3);
    // The labels' policy (mesh.health=http) reaches the worker resolved.
    assert_eq!(list[0].health.check, crate::config::CheckKind::Http);

    m2.read_engine();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // m1 goes away. Nothing changes on the worker but a counted failure...
    m1.stop();
    match tokio::time::timeout(Duration::from_secs(3), rx.recv()).await {
        Ok(Some(Update::Failed(PROVIDER))) => {}
        Ok(Some(Update::Services(..) | Update::Changed(..))) => {
            panic!("the table changed when a manager went away")
        }
        other => panic!("expected a counted failure, got {:?}", other.is_ok()),
    }
    // ... and it now follows m2: a task stopping in the swarm reaches it through m2.
    engine.set(|a| {
        a.services = fixture!("services-stop-first.json").into();
        a.tasks = fixture!("tasks-stop-first.json").into();
    });
    let list = next_services(&mut rx, Duration::from_secs(5)).await;
    assert_eq!(endpoint_count(&list), 2);
    assert_eq!(
        wstatus.borrow().following.as_deref(),
        Some(m2.addr.to_string().as_str())
    );

    // Every manager gone: failures are counted, the last good table stays (no empty list).
    m2.stop();
    let mut failures = 0;
    while let Ok(cmd) = tokio::time::timeout(Duration::from_millis(2500), rx.recv()).await {
        match cmd {
            Some(Update::Failed(PROVIDER)) => failures += 1,
            Some(Update::Services(_, l) | Update::Changed(_, l, _)) => {
                panic!("table changed to {} services: {l:?}", l.len())
            }
            _ => panic!("unexpected command"),
        }
    }
    assert!(failures >= 2, "{failures} failures counted");
    assert_eq!(wstatus.borrow().following, None);
    assert!(wstatus.borrow().error.is_some());
    worker.abort();

    // A wrong token is refused (401) and counted; nothing is applied.
    let mut m3 = Manager::start(&engine.endpoint, "f33d").await;
    m3.read_engine();
    let (tx, mut rx) = mpsc::channel(16);
    let worker = tokio::spawn(run(follower_config(&[&m3], false), defaults(), tx, feed()));
    for _ in 0..2 {
        assert!(matches!(next(&mut rx).await, Got::Failed));
    }
    worker.abort();
}

#[tokio::test]
async fn a_manager_whose_engine_fails_follows_then_reads_it_again() {
    let engine = FakeEngine::start("back");
    // A worker's answer, until "promoted".
    engine.set(|a| a.fail = Some((503, fixture!("error-no-swarm.json").into())));
    let mut cfg = config(&engine.endpoint);
    cfg.managers = vec!["127.0.0.1:1".into()]; // nothing listens: every attempt fails
    cfg.token = Some("t".into());
    let (tx, mut rx) = mpsc::channel(16);
    let (wfeed, status) = tokio::sync::watch::channel(crate::discovery::feed::FeedState::default());
    let provider = tokio::spawn(run(cfg, defaults(), tx, std::sync::Arc::new(wfeed)));
    assert!(matches!(next(&mut rx).await, Got::Failed));
    assert!(!status.borrow().serving);
    engine.set(|a| a.fail = None);
    let list = next_services(&mut rx, Duration::from_secs(5)).await;
    assert_eq!(endpoint_count(&list), 3);
    assert!(
        status.borrow().serving,
        "reads its engine again and serves it"
    );
    provider.abort();
}

/// A container event line as the engine writes it (`docker events --format '{{json .}}'`).
fn container_event(action: &str, attributes: &[(&str, &str)]) -> String {
    let attrs: serde_json::Map<String, serde_json::Value> = attributes
        .iter()
        .map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(*v)))
        .collect();
    serde_json::json!({
        "status": action,
        "id": "65f48d0e2afe993707eb76f8aa40b7dc9ccd071be6d1364727b8e6520e1c62cb",
        "from": "meshbb:v1",
        "Type": "container",
        "Action": action,
        "Actor": {
            "ID": "65f48d0e2afe993707eb76f8aa40b7dc9ccd071be6d1364727b8e6520e1c62cb",
            "Attributes": attrs,
        },
        "scope": "local",
        "time": 1795311400,
        "timeNano": 1795311400123456789u64,
    })
    .to_string()
}

#[test]
fn which_container_events_stop_a_task() {
    let ev = |action: &str, attrs: &[(&str, &str)]| -> api::Event {
        serde_json::from_str(&container_event(action, attrs)).unwrap()
    };
    let task = ("com.docker.swarm.task.id", "p4m3yb1x0yq8dh5c2w0k6z7ns");
    for signal in ["15", "9", "2", "3"] {
        assert_eq!(
            stopping_task(&ev("kill", &[task, ("signal", signal)])),
            Some("p4m3yb1x0yq8dh5c2w0k6z7ns")
        );
    }
    assert!(stopping_task(&ev("die", &[task, ("exitCode", "0")])).is_some());
    assert!(stopping_task(&ev("stop", &[task])).is_some());
    // A reload signal, another action, a container that is no task: nothing.
    assert_eq!(stopping_task(&ev("kill", &[task, ("signal", "1")])), None);
    assert_eq!(stopping_task(&ev("kill", &[task])), None);
    assert_eq!(stopping_task(&ev("start", &[task])), None);
    assert_eq!(stopping_task(&ev("die", &[("exitCode", "0")])), None);
    assert_eq!(
        stopping_task(&ev("die", &[("com.docker.swarm.task.id", "")])),
        None
    );
    // Service events are triggers only.
    let svc: api::Event =
        serde_json::from_str(fixture!("events.jsonl").lines().next().unwrap()).unwrap();
    assert_eq!(stopping_task(&svc), None);
}

#[tokio::test]
async fn a_task_container_stopping_drains_at_once_even_while_polls_fail() {
    let engine = FakeEngine::start("kill");
    let mut cfg = config(&engine.endpoint);
    // Only the event can remove a task within this test.
    cfg.poll_interval = Duration::from_secs(60);
    let (tx, mut rx) = mpsc::channel(16);
    let provider = tokio::spawn(run(cfg, defaults(), tx, feed()));
    let list = next_services(&mut rx, Duration::from_secs(5)).await;
    assert_eq!(endpoint_count(&list), 3);
    let tasks: Vec<api::Task> = serde_json::from_str(fixture!("tasks-steady.json")).unwrap();
    let id_of = |i: usize| tasks[i].id.as_str();
    let addr_of = |i: usize| {
        list[0]
            .backends
            .iter()
            .find(|b| b.id.as_deref() == Some(id_of(i)))
            .unwrap()
            .addr
    };
    let (reloaded, stopped) = (addr_of(0), addr_of(1));

    // The engine stops answering polls; its event stream (reconnected after 1 s) says: task
    // 0 got SIGHUP (a reload), some container that is no task died, task 1 got SIGTERM.
    let lines = [
        container_event(
            "kill",
            &[("com.docker.swarm.task.id", id_of(0)), ("signal", "1")],
        ),
        container_event("die", &[("exitCode", "0")]),
        container_event(
            "kill",
            &[("com.docker.swarm.task.id", id_of(1)), ("signal", "15")],
        ),
    ];
    engine.set(|a| {
        a.fail = Some((500, r#"{"message":"boom"}"#.into()));
        a.events = lines.join("\n") + "\n";
    });
    let list = next_services(&mut rx, Duration::from_secs(5)).await;
    let addrs: Vec<std::net::SocketAddr> = list[0].backends.iter().map(|b| b.addr).collect();
    assert_eq!(addrs.len(), 2, "{addrs:?}");
    assert!(!addrs.contains(&stopped));
    assert!(addrs.contains(&reloaded));

    // The engine answers again with the old state (the task still running): it stays out.
    engine.set(|a| {
        a.fail = None;
        a.events = String::new();
    });
    while let Ok(Some(cmd)) = tokio::time::timeout(Duration::from_millis(1500), rx.recv()).await {
        if let Update::Services(_, l) | Update::Changed(_, l, _) = cmd {
            panic!("the stopped task came back: {l:?}");
        }
    }
    provider.abort();
}

#[test]
fn a_task_is_local_when_its_node_is_this_engines_node() {
    let mut s = Config::parse(
        std::path::Path::new("t.toml"),
        "[[service]]\nname = \"web\"\nlisten = [\"127.0.0.1:8080\"]\nbackends = [\"10.0.0.1:80\", \"10.0.0.2:80\", \"10.0.0.3:80\"]\n",
    )
    .unwrap()
    .services;
    for (b, node) in s[0].backends.iter_mut().zip(["n1", "n2", "n1"]) {
        b.node = Some(node.into());
    }
    mark_local(&mut s, Some("n1"));
    let local: Vec<bool> = s[0].backends.iter().map(|b| b.local).collect();
    assert_eq!(local, [true, false, true]);
    // The engine is in no swarm (or /info failed): nothing is local.
    mark_local(&mut s, None);
    assert!(s[0].backends.iter().all(|b| !b.local));
}

/// A poll that changes tasks only is sent as the indices of the services that changed; a
/// service added, removed or renamed is the whole list.
#[test]
fn a_change_in_the_same_services_is_sent_as_their_indices() {
    let mut template = Config::parse(std::path::Path::new("t.toml"), "[discovery.docker]\n")
        .unwrap()
        .defaults;
    template.listen = vec!["0.0.0.0:8080".parse().unwrap()];
    let svc = |name: &str, backends: &[&str]| {
        let mut s = template.clone();
        s.name = name.into();
        s.backends = backends
            .iter()
            .map(|a| crate::config::BackendConfig {
                addr: a.parse().unwrap(),
                weight: 100,
                id: None,
                node: None,
                local: false,
            })
            .collect();
        s
    };
    let old = [
        svc("a", &["10.0.0.1:80"]),
        svc("b", &["10.0.0.2:80"]),
        svc("c", &[]),
    ];
    let mut new = old.to_vec();
    assert_eq!(in_place(&old, &new), Some(vec![]));
    new[1] = svc("b", &["10.0.0.3:80"]);
    new[2] = svc("c", &["10.0.0.4:80"]);
    assert_eq!(in_place(&old, &new), Some(vec![1, 2]));
    new[2].name = "d".into();
    assert_eq!(in_place(&old, &new), None);
    assert_eq!(in_place(&old, &new[..2]), None);
}
