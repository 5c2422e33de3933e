//! UDP services (`protocol = "udp"`): one task per listening socket, one flow per client.
//!
//! ```text
//!  client ──► listening socket ──► UdpLoop (owns the flow map) ──► flow's connected socket ──► backend
//!  client ◄── listening socket ◄────────── flow task (reads replies) ◄─────────────────────────┘
//! ```
//!
//! A flow is keyed by the client's address and the local address it sent to. It has its
//! own socket `connect`ed to one backend, picked with the service's balancer from the
//! table snapshot the TCP path uses (only usable backends: never a draining, ejected or
//! unhealthy one; UDP has no panic routing), so the kernel sorts the replies by flow. The
//! loop task owns the map (no lock); each flow's task waits for replies and sends them
//! from the listening socket to the client (from the address the client sent to, with
//! `IP_PKTINFO` / `IPV6_PKTINFO`, when listening on a wildcard address).
//!
//! A flow ends when it has seen no datagram either way for `udp_idle_timeout`, once it
//! relayed `udp_responses` replies for each datagram the client sent on it (nginx's
//! `proxy_responses`: a client with many DNS queries in flight from one port loses none of
//! their answers), or when its backend's drain is over (`drain_timeout` after its
//! removal: the backend's `CloseSignal`). A refusal (`ECONNREFUSED` on the connected
//! socket: the backend answered with ICMP port unreachable) counts as a refused connect
//! of that backend, towards its ejection as on the TCP path, and moves the flow: a new
//! flow to another backend takes its place, and the client's last datagram (if at most
//! [`KEEP`] bytes) is sent again there.
//!
//! Per datagram: no allocation and no lock. The loop reads into its own buffer; a flow
//! task reads into the thread's scratch buffer, inside one synchronous receive and send.
//! Sends never wait: a datagram a full socket buffer does not take is dropped and counted,
//! as the network would.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, SockRef, Socket, Type};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::close::CloseSignal;
use super::conn::{Shared, EJECT_AFTER_FAILURES};
use crate::table::{Backend, ConnectError, Ejection, ServiceState, ServiceTable, TableHandle};
use crate::upgrade;

/// The largest UDP payload: every datagram fits the buffers.
const MAX_DATAGRAM: usize = 65536;
/// A flow keeps a copy of its client's last datagram up to this size, to send it again on
/// the backend a refusal moves the flow to (a DNS query is well under it).
pub const KEEP: usize = 1232;
/// Datagrams the loop reads in one go before it looks at ended flows again.
const BATCH: usize = 64;
/// Receive buffer asked for the listening socket: a burst of small datagrams waits there
/// while the loop task is busy (the kernel caps it at `net.core.rmem_max`).
const RCVBUF: usize = 4 << 20;
/// How long a stopped listener (removed by a reload, handed to a successor, shutdown)
/// still relays replies to its flows before they all end.
const STOP_GRACE: Duration = Duration::from_secs(1);

thread_local! {
    /// The flow tasks' reply buffer, one per thread (see `forward.rs`'s scratch buffer):
    /// borrowed only inside `relay`, which never awaits.
    static REPLY_BUF: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0; MAX_DATAGRAM].into_boxed_slice());
}

/// Binds a UDP listening socket: SO_REUSEADDR, IPV6_V6ONLY for IPv6, a large receive
/// buffer, and on a wildcard address the destination of each datagram reported
/// (`IP_PKTINFO` / `IPV6_RECVPKTINFO`) so replies leave from the address the client used.
///
/// No `SO_REUSEADDR`: on UDP it would let a second meshd bind the same address silently
/// (and take part of its datagrams); a socket inherited from the process this one
/// upgraded is taken instead (the same socket, never re-bound).
pub fn bind(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    if let Some(inherited) = upgrade::sockets::take_udp(addr) {
        match inherited {
            Ok(s) => return Ok(s),
            Err(e) => {
                tracing::warn!(%addr, error = %e, "inherited UDP socket refused; binding anew")
            }
        }
    }
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    let _ = s.set_recv_buffer_size(RCVBUF);
    if addr.ip().is_unspecified() {
        crate::sys::set_pktinfo(s.as_raw_fd(), addr.is_ipv6())?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// What a UDP listener task needs.
pub struct UdpLoop {
    socket: UdpSocket,
    pub service: Arc<ServiceState>,
    table: TableHandle,
    shared: Arc<Shared>,
    /// Closed to stop (listener removed by a reload, or shutdown): every flow ends.
    pub stop: Arc<CloseSignal>,
    /// Its place among the sockets a hand-off sends, until it ends.
    _served: Option<upgrade::sockets::Registered>,
}

impl UdpLoop {
    /// A loop for `socket`, offered to a successor (`meshd upgrade`) from now until it
    /// stops, also while it waits for its service's first eligible backend.
    pub fn new(
        socket: UdpSocket,
        service: Arc<ServiceState>,
        table: TableHandle,
        shared: Arc<Shared>,
        stop: Arc<CloseSignal>,
    ) -> UdpLoop {
        let served = socket.local_addr().ok().and_then(|a| {
            use std::os::fd::AsFd;
            upgrade::sockets::register(upgrade::sockets::Kind::Udp, a, socket.as_fd()).ok()
        });
        UdpLoop {
            socket,
            service,
            table,
            shared,
            stop,
            _served: served,
        }
    }
}

/// A flow's key: the client, and the local address it sent to (on a wildcard listener).
type Key = (SocketAddr, Option<IpAddr>);

/// Why a flow ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Idle,
    Responses,
    /// Its backend's drain is over (or shutdown).
    Drained,
    /// The backend refused (ICMP port unreachable): the flow moves.
    Refused,
    /// Another error on its socket.
    Error,
}

/// What the loop and a flow's task share.
struct FlowShared {
    sock: UdpSocket,
    backend: Arc<Backend>,
    /// Milliseconds since the loop's epoch of the last datagram either way.
    last: AtomicU64,
    /// Datagrams the client sent on this flow (written by the loop only).
    requests: AtomicU64,
    /// Replies relayed (written by the flow's task only).
    replies: AtomicU64,
}

/// A flow as the loop owns it.
struct Flow {
    id: u64,
    /// `udp_responses` when it opened.
    responses: u32,
    shared: Arc<FlowShared>,
    task: tokio::task::AbortHandle,
    /// The client's last datagram (if at most `KEEP` bytes; empty otherwise).
    last_datagram: Vec<u8>,
}

/// A flow's task's report: key, flow id, why it ended.
type Ended = (Key, u64, End);

/// Everything a flow task needs besides its flow.
#[derive(Clone)]
struct Env {
    listen: Arc<UdpSocket>,
    service: Arc<ServiceState>,
    epoch: Instant,
    ended: mpsc::UnboundedSender<Ended>,
}

fn ms_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

impl UdpLoop {
    pub async fn run(self) {
        let UdpLoop {
            socket,
            service,
            table,
            shared,
            stop,
            _served,
        } = self;
        let listen = Arc::new(socket);
        let (tx, mut rx) = mpsc::unbounded_channel::<Ended>();
        let env = Env {
            listen: listen.clone(),
            service: service.clone(),
            epoch: Instant::now(),
            ended: tx,
        };
        let mut lp = Loop {
            service,
            table,
            shared,
            env,
            flows: HashMap::new(),
            next_id: 0,
            stopping: false,
            buf: vec![0; MAX_DATAGRAM].into_boxed_slice(),
        };
        let stopped = stop.wait();
        tokio::pin!(stopped);
        loop {
            tokio::select! {
                biased;
                _ = &mut stopped => break,
                Some((key, id, end)) = rx.recv() => lp.ended(key, id, end),
                r = listen.readable() => {
                    if r.is_err() {
                        break;
                    }
                    for _ in 0..BATCH {
                        let got = listen.try_io(Interest::READABLE, || {
                            crate::sys::recv_with_dst(listen.as_raw_fd(), &mut lp.buf)
                        });
                        match got {
                            Ok((n, from, dst, truncated)) => {
                                if truncated {
                                    lp.service.udp.dropped_truncated.fetch_add(1, Ordering::Relaxed);
                                    continue;
                                }
                                lp.datagram(n, (from, dst));
                            }
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            // An error queued on the socket (an ICMP error for an earlier
                            // reply): that datagram is gone; read on.
                            Err(_) => {}
                        }
                    }
                }
            }
        }
        // Stopped: no datagram is read any more (after an upgrade, the successor reads the
        // same socket); flows waiting for a reply get [`STOP_GRACE`] to relay it, then every
        // flow ends with the listener (it carries their replies).
        lp.stopping = true;
        let grace = tokio::time::sleep(STOP_GRACE);
        tokio::pin!(grace);
        while !lp.flows.is_empty() {
            tokio::select! {
                Some((key, id, end)) = rx.recv() => lp.ended(key, id, end),
                _ = &mut grace => break,
            }
        }
        for (_, f) in lp.flows.drain() {
            f.task.abort();
            lp.service.udp.flows.fetch_sub(1, Ordering::Relaxed);
            f.shared.backend.active.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

struct Loop {
    service: Arc<ServiceState>,
    table: TableHandle,
    shared: Arc<Shared>,
    env: Env,
    flows: HashMap<Key, Flow>,
    next_id: u64,
    /// The listener stopped: no new flow (a refused flow just ends).
    stopping: bool,
    buf: Box<[u8]>,
}

impl Loop {
    /// A datagram of `n` bytes (in `self.buf`) from `key`'s client.
    fn datagram(&mut self, n: usize, key: Key) {
        if let Some(f) = self.flows.get_mut(&key) {
            f.shared
                .last
                .store(ms_since(self.env.epoch), Ordering::Relaxed);
            if n <= KEEP {
                f.last_datagram.clear();
                f.last_datagram.extend_from_slice(&self.buf[..n]);
            } else {
                f.last_datagram.clear();
            }
            // Counted before it is sent: the flow ends only once every datagram the loop
            // sent has its replies (`ended`).
            f.shared.requests.fetch_add(1, Ordering::Relaxed);
            match SockRef::from(&f.shared.sock).send(&self.buf[..n]) {
                Ok(_) => count_rx(&f.shared.backend, n),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    let id = f.id;
                    self.ended(key, id, End::Refused);
                }
                Err(_) => {
                    self.service
                        .udp
                        .dropped_send
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
            return;
        }
        let keep = if n <= KEEP {
            self.buf[..n].to_vec()
        } else {
            Vec::new()
        };
        self.open(key, None, keep, Some(n));
    }

    /// Opens a flow for `key` on a usable backend other than `avoid`, and sends it the
    /// client's datagram: the first `fresh` bytes of `self.buf`, or (a moved flow) `keep`.
    /// Counts a drop when no flow can be opened.
    fn open(
        &mut self,
        key: Key,
        avoid: Option<&Arc<Backend>>,
        keep: Vec<u8>,
        fresh: Option<usize>,
    ) -> bool {
        let udp = &self.service.udp;
        if self.stopping {
            return false;
        }
        let table = self.table.load();
        let Some(svc) = table.service(&self.service) else {
            udp.dropped_no_backend.fetch_add(1, Ordering::Relaxed);
            return false;
        };
        // Per service (all its listeners): the service-wide count.
        if udp.flows.load(Ordering::Relaxed) >= u64::from(svc.config.udp.max_flows) {
            udp.dropped_max_flows.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let (cfg_idle, cfg_responses) = (svc.config.udp.idle_timeout, svc.config.udp.responses);
        let mut avoid_ptr = avoid.cloned();
        // A backend whose socket cannot be made (its family unreachable) is skipped once.
        for _ in 0..2 {
            let Some(i) = svc.selector.pick(
                key.0.ip(),
                |i| svc.backends[i].active(),
                |i| {
                    !svc.backends[i].is_usable()
                        || avoid_ptr
                            .as_ref()
                            .is_some_and(|a| Arc::ptr_eq(a, &svc.backends[i]))
                },
            ) else {
                udp.dropped_no_backend.fetch_add(1, Ordering::Relaxed);
                return false;
            };
            let backend = svc.backends[i].clone();
            let sock = match connected(backend.addr) {
                Ok(s) => s,
                Err(e) => {
                    if is_local_exhaustion(&e) {
                        udp.dropped_send.fetch_add(1, Ordering::Relaxed);
                        return false;
                    }
                    failed(svc, &backend, ConnectError::from_io(&e), &self.shared);
                    avoid_ptr = Some(backend);
                    continue;
                }
            };
            backend.active.fetch_add(1, Ordering::Relaxed);
            backend.stats.connections.fetch_add(1, Ordering::Relaxed);
            udp.flows.fetch_add(1, Ordering::Relaxed);
            udp.flows_total.fetch_add(1, Ordering::Relaxed);
            let shared = Arc::new(FlowShared {
                sock,
                backend: backend.clone(),
                last: AtomicU64::new(ms_since(self.env.epoch)),
                requests: AtomicU64::new(0),
                replies: AtomicU64::new(0),
            });
            self.next_id += 1;
            let id = self.next_id;
            let task = tokio::spawn(flow(
                shared.clone(),
                self.env.clone(),
                key,
                id,
                cfg_idle,
                cfg_responses,
            ))
            .abort_handle();
            let data: &[u8] = match fresh {
                Some(n) => &self.buf[..n],
                None => &keep,
            };
            if !data.is_empty() {
                shared.requests.store(1, Ordering::Relaxed);
                match SockRef::from(&shared.sock).send(data) {
                    Ok(_) => count_rx(&backend, data.len()),
                    Err(_) => {
                        udp.dropped_send.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            self.flows.insert(
                key,
                Flow {
                    id,
                    responses: cfg_responses,
                    shared,
                    task,
                    last_datagram: keep,
                },
            );
            return true;
        }
        udp.dropped_no_backend.fetch_add(1, Ordering::Relaxed);
        false
    }

    /// Flow `id` of `key` ended (reported by its task, or a refused send here).
    fn ended(&mut self, key: Key, id: u64, end: End) {
        let Some(f) = self.flows.get(&key) else {
            return;
        };
        if f.id != id {
            return; // an older flow of the same client, already replaced
        }
        // Decided here, where requests are counted: a datagram the client sent after the
        // task saw its last reply keeps the flow (the task reports again later).
        if end == End::Responses {
            let want = u64::from(f.responses) * f.shared.requests.load(Ordering::Relaxed);
            if f.shared.replies.load(Ordering::Relaxed) < want {
                return;
            }
        }
        let Some(f) = self.flows.remove(&key) else {
            return;
        };
        f.task.abort();
        self.service.udp.flows.fetch_sub(1, Ordering::Relaxed);
        let prev = f.shared.backend.active.fetch_sub(1, Ordering::Relaxed);
        debug_assert!(prev > 0, "live-flow counter went negative");
        if end == End::Drained {
            f.shared
                .backend
                .stats
                .drain_closed
                .fetch_add(1, Ordering::Relaxed);
        }
        if end != End::Refused {
            return;
        }
        let table = self.table.load();
        if let Some(svc) = table.service(&self.service) {
            failed(svc, &f.shared.backend, ConnectError::Refused, &self.shared);
        }
        drop(table);
        self.service.udp.moved.fetch_add(1, Ordering::Relaxed);
        self.open(key, Some(&f.shared.backend), f.last_datagram, None);
    }
}

fn count_rx(b: &Backend, n: usize) {
    b.stats.datagrams_rx.fetch_add(1, Ordering::Relaxed);
    b.stats.bytes_rx.fetch_add(n as u64, Ordering::Relaxed);
}

/// A socket connected to `backend` (a fresh ephemeral port).
fn connected(backend: SocketAddr) -> io::Result<UdpSocket> {
    let s = Socket::new(
        Domain::for_address(backend),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    s.set_nonblocking(true)?;
    s.connect(&SockAddr::from(backend))?;
    UdpSocket::from_std(s.into())
}

/// Out of descriptors or memory here: not the backend's fault.
fn is_local_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL)
    )
}

/// A backend refused a flow (or its socket could not be connected): counted like a failed
/// connect on the TCP path, towards its ejection (never the last usable backend, never
/// past `max_ejection_percent`: `ServiceTable::eject`).
fn failed(svc: &ServiceTable, b: &Arc<Backend>, e: ConnectError, shared: &Shared) {
    b.stats.connect_errors[e as usize].fetch_add(1, Ordering::Relaxed);
    let n = b.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
    if n < EJECT_AFTER_FAILURES {
        return;
    }
    if let Some(k) = svc.backends.iter().position(|x| Arc::ptr_eq(x, b)) {
        if svc.eject(k) != Ejection::Nothing {
            let _ = shared.ejected.send((svc.state.clone(), b.clone()));
        }
    }
}

/// A flow's task: relays replies to the client until the flow ends, then reports why.
/// With `udp_responses`, it reports each time the replies reach `responses` per datagram
/// the client sent, and relays on until the loop ends it (the loop may have sent another
/// datagram meanwhile: nginx's `proxy_responses`).
async fn flow(f: Arc<FlowShared>, env: Env, key: Key, id: u64, idle: Duration, responses: u32) {
    let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
    let closed = f.backend.close.wait();
    tokio::pin!(closed);
    let timer = tokio::time::sleep(idle);
    tokio::pin!(timer);
    let mut replies: u64 = 0;
    let mut answered = false;
    let end = loop {
        tokio::select! {
            biased;
            _ = &mut closed => break End::Drained,
            // An ICMP error is ERROR readiness alone (EPOLLERR without EPOLLIN), waited
            // for on its own (tokio gives a combined READABLE | ERROR interest no
            // readiness at all).
            r = f.sock.ready(Interest::ERROR) => {
                let e = match r {
                    Ok(_) => SockRef::from(&f.sock).take_error().ok().flatten(),
                    Err(e) => Some(e),
                };
                match e {
                    Some(e) if e.kind() == io::ErrorKind::ConnectionRefused => break End::Refused,
                    Some(_) => break End::Error,
                    // Read already by a send or receive: nothing pending.
                    None => {
                        let _ = f.sock.try_io(Interest::ERROR, || {
                            Err::<(), _>(io::Error::from(io::ErrorKind::WouldBlock))
                        });
                    }
                }
            }
            r = f.sock.readable() => {
                if r.is_err() {
                    break End::Error;
                }
                match relay(&f, &env, key) {
                    Ok(k) => {
                        if k > 0 && !answered {
                            answered = true;
                            // A reply: the backend answers; its failure streak ends.
                            if f.backend.consecutive_failures.load(Ordering::Relaxed) != 0 {
                                f.backend.consecutive_failures.store(0, Ordering::Relaxed);
                            }
                        }
                        replies += u64::from(k);
                        f.replies.store(replies, Ordering::Relaxed);
                        let want = u64::from(responses) * f.requests.load(Ordering::Relaxed);
                        if responses > 0 && k > 0 && replies >= want {
                            let _ = env.ended.send((key, id, End::Responses));
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => break End::Refused,
                    Err(_) => break End::Error,
                }
            }
            _ = &mut timer => {
                let last = f.last.load(Ordering::Relaxed);
                let now = ms_since(env.epoch);
                let quiet = now.saturating_sub(last);
                if quiet >= idle_ms {
                    break End::Idle;
                }
                let left = Duration::from_millis(idle_ms - quiet);
                timer.as_mut().reset(Instant::now() + left);
            }
        }
    };
    let _ = env.ended.send((key, id, end));
}

/// Reads every reply waiting on the flow's socket and sends each to the client; returns
/// how many it read.
fn relay(f: &FlowShared, env: &Env, key: Key) -> io::Result<u32> {
    let (client, local) = key;
    REPLY_BUF.with(|cell| {
        let mut buf = cell.borrow_mut();
        let mut k: u32 = 0;
        loop {
            let n = match f.sock.try_recv(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(k),
                Err(e) => return Err(e),
            };
            k += 1;
            f.last.store(ms_since(env.epoch), Ordering::Relaxed);
            let b = &f.backend.stats;
            b.datagrams_tx.fetch_add(1, Ordering::Relaxed);
            b.bytes_tx.fetch_add(n as u64, Ordering::Relaxed);
            let data = &buf[..n];
            let sent = match local {
                Some(ip) => crate::sys::send_from(env.listen.as_raw_fd(), data, client, ip),
                None => SockRef::from(&*env.listen).send_to(data, &SockAddr::from(client)),
            };
            if sent.is_err() {
                // A full buffer, or the client's own error (ICMP for an earlier reply):
                // this reply is gone.
                env.service.udp.dropped_send.fetch_add(1, Ordering::Relaxed);
            }
        }
    })
}
