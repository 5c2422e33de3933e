//! The listening sockets this process serves (to hand to a successor) and the ones it
//! inherited from a predecessor (taken instead of binding).
//!
//! Both registries are touched when a listener is bound or closed and during a hand-off,
//! never on the accept path.

#![allow(unsafe_code)]

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// What a listening socket serves; part of its key on the wire (`tcp/127.0.0.1:8080`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A service's listener.
    Tcp,
    /// The admin API's.
    Admin,
    /// A UDP service's socket.
    Udp,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Tcp => "tcp",
            Kind::Admin => "admin",
            Kind::Udp => "udp",
        }
    }
}

/// `kind/addr`, as sent with each descriptor.
pub fn key(kind: Kind, addr: SocketAddr) -> String {
    format!("{}/{addr}", kind.as_str())
}

/// Parses a key; `None` for a kind this version does not know (skipped, and closed).
pub fn parse_key(k: &str) -> Option<(Kind, SocketAddr)> {
    let (kind, addr) = k.split_once('/')?;
    let kind = match kind {
        "tcp" => Kind::Tcp,
        "admin" => Kind::Admin,
        "udp" => Kind::Udp,
        _ => return None,
    };
    Some((kind, addr.parse().ok()?))
}

struct Served {
    id: u64,
    kind: Kind,
    addr: SocketAddr,
    /// A duplicate of the listener's descriptor, closed with the registration.
    fd: OwnedFd,
}

static SERVED: Mutex<Vec<Served>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(1);
/// Received from a predecessor, by whether they are UDP sockets (a TCP and a UDP listener
/// may share an address) and address.
static INHERITED: Mutex<Vec<(bool, SocketAddr, OwnedFd)>> = Mutex::new(Vec::new());
/// Listeners taken from a predecessor (`meshd_inherited_listeners`).
pub static INHERITED_TAKEN: AtomicU64 = AtomicU64::new(0);

/// A listener's place in the served set, for as long as it accepts.
#[derive(Debug)]
pub struct Registered(u64);

impl Drop for Registered {
    fn drop(&mut self) {
        lock(&SERVED).retain(|s| s.id != self.0);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Adds a listener that accepts (until the returned guard drops) to what a hand-off sends.
pub fn register(kind: Kind, addr: SocketAddr, fd: BorrowedFd<'_>) -> io::Result<Registered> {
    let fd = fd.try_clone_to_owned()?;
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    lock(&SERVED).push(Served { id, kind, addr, fd });
    Ok(Registered(id))
}

/// Duplicates of every served listener, with their keys, for a hand-off.
pub fn served() -> io::Result<Vec<(String, OwnedFd)>> {
    lock(&SERVED)
        .iter()
        .map(|s| Ok((key(s.kind, s.addr), s.fd.try_clone()?)))
        .collect()
}

/// Keeps the listeners received from a predecessor until a bind asks for their address.
pub fn inherit(items: Vec<(Kind, SocketAddr, OwnedFd)>) {
    lock(&INHERITED).extend(items.into_iter().map(|(k, a, fd)| (k == Kind::Udp, a, fd)));
}

/// The inherited listener for `addr`, if there is one: checked to be a listening TCP
/// socket bound to exactly `addr`, given the new `backlog`, non-blocking. A descriptor that
/// fails a check is closed and the error returned (the caller then binds, which fails
/// while the predecessor holds the address: a clear error instead of a wrong socket).
pub fn take(addr: SocketAddr, backlog: u32) -> Option<io::Result<std::net::TcpListener>> {
    let fd = claim(false, addr)?;
    Some(adopt(fd, addr, backlog))
}

fn claim(udp: bool, addr: SocketAddr) -> Option<OwnedFd> {
    let mut pool = lock(&INHERITED);
    let i = pool.iter().position(|(u, a, _)| *u == udp && *a == addr)?;
    Some(pool.swap_remove(i).2)
}

/// The inherited UDP socket for `addr`, if there is one: checked to be a datagram socket
/// bound to exactly `addr`, non-blocking (it keeps the options its first owner set,
/// `IP_PKTINFO` among them). A descriptor that fails a check is closed and the error
/// returned, as for [`take`].
pub fn take_udp(addr: SocketAddr) -> Option<io::Result<std::net::UdpSocket>> {
    let fd = claim(true, addr)?;
    let adopt = || -> io::Result<std::net::UdpSocket> {
        let s = socket2::Socket::from(fd);
        let bad = |what: &str| io::Error::other(format!("inherited UDP socket for {addr}: {what}"));
        if s.r#type()? != socket2::Type::DGRAM {
            return Err(bad("not a datagram socket"));
        }
        if s.local_addr()?.as_socket() != Some(addr) {
            return Err(bad("bound to another address"));
        }
        s.set_nonblocking(true)?;
        INHERITED_TAKEN.fetch_add(1, Ordering::Relaxed);
        Ok(s.into())
    };
    Some(adopt())
}

fn adopt(fd: OwnedFd, addr: SocketAddr, backlog: u32) -> io::Result<std::net::TcpListener> {
    let s = socket2::Socket::from(fd);
    let bad = |what: &str| io::Error::other(format!("inherited socket for {addr}: {what}"));
    if s.r#type()? != socket2::Type::STREAM {
        return Err(bad("not a stream socket"));
    }
    if s.local_addr()?.as_socket() != Some(addr) {
        return Err(bad("bound to another address"));
    }
    let listening = {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt(SO_ACCEPTCONN) writes one c_int into `v`, whose size is `len`.
        let r = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ACCEPTCONN,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        v != 0
    };
    if !listening {
        return Err(bad("not listening"));
    }
    // listen(2) again on a listening socket only changes its backlog: queued connections stay.
    s.listen(backlog.min(i32::MAX as u32) as i32)?;
    s.set_nonblocking(true)?;
    INHERITED_TAKEN.fetch_add(1, Ordering::Relaxed);
    Ok(s.into())
}

/// Closes the inherited listeners no bind asked for (addresses the new config no longer
/// lists); returns their addresses.
pub fn close_unclaimed() -> Vec<SocketAddr> {
    std::mem::take(&mut *lock(&INHERITED))
        .into_iter()
        .map(|(_, a, _)| a)
        .collect()
}

/// How many inherited listeners wait to be claimed.
pub fn unclaimed() -> usize {
    lock(&INHERITED).len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn keys_round_trip_and_unknown_kinds_are_skipped() {
        let a: SocketAddr = "[::1]:8080".parse().unwrap();
        assert_eq!(parse_key(&key(Kind::Tcp, a)), Some((Kind::Tcp, a)));
        assert_eq!(parse_key(&key(Kind::Admin, a)), Some((Kind::Admin, a)));
        assert_eq!(parse_key(&key(Kind::Udp, a)), Some((Kind::Udp, a)));
        assert_eq!(parse_key("sctp/127.0.0.1:53"), None);
        assert_eq!(parse_key("tcp/nonsense"), None);
    }

    #[test]
    fn an_inherited_listener_keeps_its_queue_and_a_wrong_one_is_refused() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        // A connection queued before the hand-off is accepted after it.
        let _c = std::net::TcpStream::connect(addr).unwrap();
        let dup = l.as_fd().try_clone_to_owned().unwrap();
        drop(l);
        inherit(vec![(Kind::Tcp, addr, dup)]);
        let got = take(addr, 64).unwrap().unwrap();
        got.set_nonblocking(false).unwrap();
        assert!(got.accept().is_ok());
        assert!(take(addr, 64).is_none(), "taken once");

        // A descriptor bound elsewhere is refused.
        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let want: SocketAddr = "127.0.0.1:1".parse().unwrap();
        inherit(vec![(
            Kind::Tcp,
            want,
            other.as_fd().try_clone_to_owned().unwrap(),
        )]);
        assert!(take(want, 64).unwrap().is_err());
    }
}
