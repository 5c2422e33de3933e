//! Upgrading meshd without refusing a connection: the running process (old) hands every
//! listening socket to a new one over a UNIX socket (SCM_RIGHTS), the new one warms up on
//! them, says it is ready, and only then does the old one stop accepting and drain.
//!
//! ```text
//! old                                   new (meshd --takeover PATH, or [upgrade] socket)
//!  │ ◄──────────── Hello {proto, pid, version}
//!  │ Listeners {keys, more} + fds ────► │ keeps them in `sockets::inherit`; its binds take
//!  │   (repeated, 200 fds a message)    │ them instead of binding (one queue, never re-bound)
//!  │                                    │ config, table, first health round
//!  │ ◄──────────── Ready {pid}
//!  │ stops accepting, drains (as on SIGTERM), exits 0
//! ```
//!
//! Both processes accept from the same queues between the new one's first accept and the
//! old one's last, which is harmless. If the new process exits, closes the socket, or is
//! not ready within the timeout, the old one never stopped serving: it kills a process it
//! started, counts the failure, and goes on. One hand-off at a time.
//!
//! Why descriptors and not SO_REUSEPORT: closing a reuseport socket resets the connections
//! queued on it. A passed descriptor is the same socket; the old process's close only drops
//! a reference.

pub mod scm;
pub mod sockets;

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use socket2::{Domain, SockAddr, Socket, Type};

/// The protocol's version; a peer speaking another is refused.
pub const PROTO: u32 = 1;
/// The new process's first message must come within this.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// One frame of the hand-off protocol (JSON, one per message).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Msg {
    Hello {
        proto: u32,
        pid: u32,
        version: String,
    },
    /// `keys[i]` names the i-th descriptor of this message; `more`: another follows.
    Listeners {
        keys: Vec<String>,
        more: bool,
    },
    Refused {
        reason: String,
    },
    Ready {
        pid: u32,
    },
}

fn send(sock: &Socket, msg: &Msg, fds: &[OwnedFd]) -> io::Result<()> {
    let frame = serde_json::to_vec(msg).map_err(io::Error::other)?;
    let fds: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    scm::send(sock.as_fd(), &frame, &fds)
}

fn recv(sock: &Socket) -> io::Result<(Msg, Vec<OwnedFd>)> {
    let (frame, fds) = scm::recv(sock.as_fd()).map_err(|e| match e.kind() {
        io::ErrorKind::WouldBlock => io::Error::new(io::ErrorKind::TimedOut, "timed out"),
        _ => e,
    })?;
    if frame.is_empty() && fds.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the other process closed the hand-off socket",
        ));
    }
    let msg = serde_json::from_slice(&frame)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("bad frame: {e}")))?;
    Ok((msg, fds))
}

/// What one process knows about upgrades: its own start, what it inherited, whether a
/// hand-off is in flight (`GET /api/v1/process`).
#[derive(Debug)]
pub struct ProcessInfo {
    pub pid: u32,
    pub started_at: SystemTime,
    /// The binary on disk as it was at start: an upgrade runs that path (a new file
    /// there is the new version), not /proc/self/exe (the old inode).
    pub exe: PathBuf,
    /// The command line this process was started with (without a `--takeover`), reused
    /// for its successor.
    pub args: Vec<std::ffi::OsString>,
    pub upgrading: AtomicBool,
}

impl ProcessInfo {
    pub fn current() -> ProcessInfo {
        let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("meshd"));
        // A binary replaced since start shows as "path (deleted)": the path is what counts.
        let exe = match exe.to_str().and_then(|s| s.strip_suffix(" (deleted)")) {
            Some(s) => PathBuf::from(s),
            None => exe,
        };
        let mut args = Vec::new();
        let mut it = std::env::args_os().skip(1);
        while let Some(a) = it.next() {
            if a == "--takeover" {
                it.next();
            } else if !a.to_string_lossy().starts_with("--takeover=") {
                args.push(a);
            }
        }
        ProcessInfo {
            pid: std::process::id(),
            started_at: SystemTime::now(),
            exe,
            args,
            upgrading: AtomicBool::new(false),
        }
    }
}

/// Why a hand-off did not happen.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("an upgrade is already in progress")]
    Busy,
    #[error("cannot start {binary}: {error}")]
    Spawn { binary: String, error: io::Error },
    #[error("the new process exited during warm-up ({status})")]
    Exited { status: String },
    #[error("the new process was not ready within {0:?}")]
    Timeout(Duration),
    #[error("hand-off failed: {0}")]
    Io(#[from] io::Error),
}

impl Failure {
    /// The `result` label of `meshd_upgrades_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Failure::Timeout(_) => "timeout",
            _ => "failed",
        }
    }
}

/// `meshd_upgrades_total` by `result`, in [`RESULTS`]'s order.
pub static UPGRADES: [std::sync::atomic::AtomicU64; 3] = [
    std::sync::atomic::AtomicU64::new(0),
    std::sync::atomic::AtomicU64::new(0),
    std::sync::atomic::AtomicU64::new(0),
];
pub const RESULTS: [&str; 3] = ["ok", "failed", "timeout"];

/// A finished hand-off attempt, as the process's main loop learns of it: `Ok(pid)` means
/// stop accepting and drain.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub result: Result<u32, String>,
    /// `meshd_upgrades_total{result}`: `ok`, `failed`, `timeout`.
    pub label: &'static str,
}

impl Outcome {
    /// Counts it in [`UPGRADES`].
    pub fn count(&self) {
        if let Some(i) = RESULTS.iter().position(|r| *r == self.label) {
            UPGRADES[i].fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl From<Result<u32, Failure>> for Outcome {
    fn from(r: Result<u32, Failure>) -> Outcome {
        match r {
            Ok(pid) => Outcome {
                result: Ok(pid),
                label: "ok",
            },
            Err(e) => Outcome {
                label: e.label(),
                result: Err(e.to_string()),
            },
        }
    }
}

/// What the admin API needs to start an upgrade and report on this process.
#[derive(Debug)]
pub struct Upgrades {
    pub info: Arc<ProcessInfo>,
    /// `[upgrade] timeout` at start.
    pub timeout: Duration,
    /// Outcomes go to the main loop (which drains on success).
    pub done: tokio::sync::mpsc::UnboundedSender<Outcome>,
}

impl Upgrades {
    /// Spawns a successor and reports the outcome both to the caller and the main loop.
    pub async fn upgrade(&self, binary: Option<PathBuf>, timeout: Option<Duration>) -> Outcome {
        let out = Outcome::from(
            spawn_successor(&self.info, binary, timeout.unwrap_or(self.timeout)).await,
        );
        let _ = self.done.send(out.clone());
        out
    }
}

/// Marks a hand-off in flight; cleared on drop.
struct Busy<'a>(&'a AtomicBool);

impl<'a> Busy<'a> {
    fn take(flag: &'a AtomicBool) -> Result<Busy<'a>, Failure> {
        if flag.swap(true, Ordering::AcqRel) {
            return Err(Failure::Busy);
        }
        Ok(Busy(flag))
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Old side, on an accepted connection: sends every served listener, then waits for the
/// new process to be ready (until `deadline`). Blocking; returns the new process's pid.
fn give(conn: &Socket, deadline: Instant) -> Result<u32, Failure> {
    let left = |d: Instant| {
        d.saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    conn.set_read_timeout(Some(left(deadline).min(HELLO_TIMEOUT)))?;
    let (hello, stray) = recv(conn)?;
    drop(stray);
    let pid = match hello {
        Msg::Hello {
            proto,
            pid,
            version,
        } if proto == PROTO => {
            tracing::info!(
                pid,
                version,
                "upgrade: a new process asks for the listeners"
            );
            pid
        }
        Msg::Hello { proto, .. } => {
            let reason = format!("hand-off protocol {proto} is not {PROTO}");
            let _ = send(
                conn,
                &Msg::Refused {
                    reason: reason.clone(),
                },
                &[],
            );
            return Err(Failure::Io(io::Error::other(reason)));
        }
        other => {
            return Err(Failure::Io(io::Error::other(format!(
                "expected hello, got {other:?}"
            ))))
        }
    };
    let served = sockets::served()?;
    let total = served.len();
    let mut it = served.into_iter().peekable();
    loop {
        let chunk: Vec<(String, OwnedFd)> = it.by_ref().take(scm::MAX_FDS).collect();
        let more = it.peek().is_some();
        let (keys, fds): (Vec<String>, Vec<OwnedFd>) = chunk.into_iter().unzip();
        send(conn, &Msg::Listeners { keys, more }, &fds)?;
        if !more {
            break;
        }
    }
    tracing::info!(
        pid,
        listeners = total,
        "upgrade: listeners sent; waiting for the new process to be ready"
    );
    conn.set_read_timeout(Some(left(deadline)))?;
    match recv(conn) {
        Ok((Msg::Ready { pid: ready }, _)) => Ok(if ready == 0 { pid } else { ready }),
        Ok((other, _)) => Err(Failure::Io(io::Error::other(format!(
            "expected ready, got {other:?}"
        )))),
        Err(e) if e.kind() == io::ErrorKind::TimedOut => Err(Failure::Timeout(
            deadline.saturating_duration_since(Instant::now()),
        )),
        Err(e) => Err(Failure::Io(e)),
    }
}

/// A UNIX `SOCK_SEQPACKET` listener at `path`, readable by this user only. Bound under a
/// temporary name and renamed into place, so `path` always names a live socket.
fn listen_at(path: &Path) -> io::Result<Socket> {
    let s = Socket::new(Domain::UNIX, Type::SEQPACKET, None)?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    s.bind(&SockAddr::unix(&tmp)?)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    s.listen(4)?;
    std::fs::rename(&tmp, path)?;
    Ok(s)
}

/// Whether the peer of `conn` runs as this process's user (or root): nobody else may take
/// the listeners.
fn same_user(conn: &Socket) -> bool {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    match getsockopt(conn, PeerCredentials) {
        Ok(c) => c.uid() == 0 || c.uid() == nix::unistd::geteuid().as_raw(),
        Err(_) => false,
    }
}

/// The old side of an upgrade this process starts (SIGUSR2, `POST /api/v1/upgrade`):
/// spawns `binary` (default: this one's path on disk) with this process's arguments plus
/// `--takeover PATH` on a private socket, gives it the listeners, and waits for it to be
/// ready. `Ok(pid)`: the caller stops accepting and drains. On failure the new process is
/// killed (if it still runs) and this one goes on serving.
pub async fn spawn_successor(
    info: &ProcessInfo,
    binary: Option<PathBuf>,
    timeout: Duration,
) -> Result<u32, Failure> {
    let _busy = Busy::take(&info.upgrading)?;
    let dir = private_dir()?;
    let path = dir.join("takeover.sock");
    let listener = Arc::new(listen_at(&path)?);
    let binary = binary.unwrap_or_else(|| info.exe.clone());
    let mut cmd = std::process::Command::new(&binary);
    cmd.args(&info.args)
        .arg("--takeover")
        .arg(&path)
        .stdin(std::process::Stdio::null());
    // Its own process group: a terminal's Ctrl-C to the old process is not the new one's.
    use std::os::unix::process::CommandExt;
    cmd.process_group(0);
    let mut child = cmd.spawn().map_err(|error| Failure::Spawn {
        binary: binary.display().to_string(),
        error,
    })?;
    tracing::info!(pid = child.id(), binary = %binary.display(), "upgrade: new process started");
    let deadline = Instant::now() + timeout;

    // The hand-off blocks (accept, recv) on its own thread; this task watches the child.
    let (l, conn_slot) = (
        listener.clone(),
        Arc::new(std::sync::Mutex::new(None::<Arc<Socket>>)),
    );
    let slot = conn_slot.clone();
    let mut handoff = tokio::task::spawn_blocking(move || -> Result<u32, Failure> {
        l.set_read_timeout(Some(timeout))?;
        let (conn, _) = l.accept().map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock => Failure::Timeout(timeout),
            _ => Failure::Io(e),
        })?;
        let conn = Arc::new(conn);
        *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn.clone());
        if !same_user(&conn) {
            return Err(Failure::Io(io::Error::other(
                "the peer runs as another user",
            )));
        }
        give(&conn, deadline)
    });
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let outcome = loop {
        tokio::select! {
            r = &mut handoff => break r.unwrap_or_else(|e| Err(Failure::Io(io::Error::other(e)))),
            _ = tick.tick() => {
                let exited = match child.try_wait() {
                    Ok(Some(st)) => Some(st.to_string()),
                    Ok(None) => None,
                    Err(e) => Some(e.to_string()),
                };
                if exited.is_some() || Instant::now() >= deadline {
                    // Wake the blocked thread: a shut-down socket returns at once.
                    let _ = listener.shutdown(std::net::Shutdown::Both);
                    if let Some(c) = &*conn_slot.lock().unwrap_or_else(|e| e.into_inner()) {
                        let _ = c.shutdown(std::net::Shutdown::Both);
                    }
                    let _ = (&mut handoff).await;
                    break Err(match exited {
                        Some(status) => Failure::Exited { status },
                        None => Failure::Timeout(timeout),
                    });
                }
            }
        }
    };
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_dir(&dir);
    match outcome {
        Ok(pid) => Ok(pid),
        Err(e) => {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
            }
            let e = match (e, child.wait()) {
                // It died on its own; say how.
                (Failure::Io(_), Ok(st)) if !st.success() && st.code().is_some() => {
                    Failure::Exited {
                        status: st.to_string(),
                    }
                }
                (e, _) => e,
            };
            Err(e)
        }
    }
}

/// A new directory only this user can enter, for one hand-off's socket.
fn private_dir() -> io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let base = std::env::temp_dir();
    for n in 0..100u32 {
        let d = base.join(format!("meshd-upgrade-{}-{n}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&d) {
            Ok(()) => return Ok(d),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other(
        "no free private directory for the hand-off socket",
    ))
}

/// `[upgrade] socket`: serves hand-offs to any meshd of this user that connects, for as
/// long as this process runs. `Ok(pid)` of the first successful one is sent on `done`.
pub fn serve_socket(
    path: &Path,
    info: Arc<ProcessInfo>,
    timeout: Duration,
    done: tokio::sync::mpsc::UnboundedSender<Outcome>,
) -> io::Result<SocketServer> {
    let listener = Arc::new(listen_at(path)?);
    let ino = inode(path);
    let l = listener.clone();
    std::thread::Builder::new()
        .name("meshd-upgrade".into())
        .spawn(move || loop {
            let Ok((conn, _)) = l.accept() else {
                return; // shut down
            };
            if !same_user(&conn) {
                tracing::warn!("upgrade socket: a process of another user was refused");
                continue;
            }
            let outcome = match Busy::take(&info.upgrading) {
                Err(e) => {
                    let _ = send(
                        &conn,
                        &Msg::Refused {
                            reason: e.to_string(),
                        },
                        &[],
                    );
                    Err(e)
                }
                Ok(_busy) => give(&conn, Instant::now() + timeout),
            };
            let ok = outcome.is_ok();
            if done.send(Outcome::from(outcome)).is_err() || ok {
                return;
            }
        })?;
    Ok(SocketServer {
        listener,
        path: path.to_owned(),
        ino,
    })
}

/// The `[upgrade] socket` listener; `close` removes the path unless a successor's socket
/// has replaced it.
pub struct SocketServer {
    listener: Arc<Socket>,
    path: PathBuf,
    ino: Option<u64>,
}

impl SocketServer {
    pub fn close(&self, unlink: bool) {
        let _ = self.listener.shutdown(std::net::Shutdown::Both);
        if unlink && self.ino.is_some() && inode(&self.path) == self.ino {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn inode(p: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(p).ok().map(|m| m.ino())
}

/// The new side's end of a hand-off, from the listeners' arrival to `ready`.
pub struct Takeover {
    conn: Socket,
    /// Listeners received (also those this version does not know, which were closed).
    pub received: usize,
}

/// How a starting process looks for a predecessor.
pub enum Predecessor {
    /// `--takeover PATH`: one must answer there (a failure is fatal).
    Required(PathBuf),
    /// `[upgrade] socket`: take over if a meshd serves there, else start fresh.
    IfPresent(PathBuf),
}

/// New side: connects, says hello, receives every listener into [`sockets::inherit`].
/// `Ok(None)`: nobody serves the optional socket.
pub fn take_over(from: Predecessor) -> io::Result<Option<Takeover>> {
    let (path, required) = match &from {
        Predecessor::Required(p) => (p.as_path(), true),
        Predecessor::IfPresent(p) => (p.as_path(), false),
    };
    let conn = Socket::new(Domain::UNIX, Type::SEQPACKET, None)?;
    if let Err(e) = conn.connect(&SockAddr::unix(path)?) {
        let absent = matches!(
            e.kind(),
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
        );
        if absent && !required {
            return Ok(None);
        }
        return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display())));
    }
    conn.set_read_timeout(Some(HELLO_TIMEOUT))?;
    send(
        &conn,
        &Msg::Hello {
            proto: PROTO,
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").into(),
        },
        &[],
    )?;
    let mut received = 0;
    loop {
        match recv(&conn)? {
            (Msg::Listeners { keys, more }, fds) => {
                if keys.len() != fds.len() {
                    return Err(io::Error::other(format!(
                        "{} keys for {} descriptors",
                        keys.len(),
                        fds.len()
                    )));
                }
                received += fds.len();
                let items: Vec<(sockets::Kind, SocketAddr, OwnedFd)> = keys
                    .iter()
                    .zip(fds)
                    .filter_map(|(k, fd)| match sockets::parse_key(k) {
                        Some((kind, addr)) => Some((kind, addr, fd)),
                        None => {
                            tracing::warn!(key = %k, "upgrade: a listener of a kind this version does not serve was closed");
                            None
                        }
                    })
                    .collect();
                sockets::inherit(items);
                if !more {
                    break;
                }
            }
            (Msg::Refused { reason }, _) => {
                return Err(io::Error::other(format!(
                    "the running meshd refused: {reason}"
                )))
            }
            (other, _) => return Err(io::Error::other(format!("unexpected {other:?}"))),
        }
    }
    Ok(Some(Takeover { conn, received }))
}

impl Takeover {
    /// Tells the old process this one is ready: it stops accepting and drains.
    pub fn ready(self) -> io::Result<()> {
        send(
            &self.conn,
            &Msg::Ready {
                pid: std::process::id(),
            },
            &[],
        )
    }
}
