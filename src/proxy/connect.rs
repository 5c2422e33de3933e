//! Dialing a backend: one non-blocking connect bounded by `connect_timeout`, with
//! TCP_NODELAY set as on client sockets. Keepalive (well under 900 s, as on client sockets)
//! is added by `forward` once the connection is a second old: no probe could be sent
//! earlier, and most connections end before that.

use std::net::SocketAddr;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::{TcpSocket, TcpStream};

use crate::config::defaults;
use crate::table::ConnectError;

/// Keepalive probes after `TCP_KEEPALIVE` idle (then the kernel's interval and count).
/// Two setsockopt calls on a backend socket (SO_KEEPALIVE, TCP_KEEPIDLE), made only by
/// connections that live past `forward::KEEPALIVE_AFTER`; listeners set it once and
/// accepted sockets inherit it.
pub fn keepalive() -> TcpKeepalive {
    TcpKeepalive::new().with_time(defaults::TCP_KEEPALIVE)
}

/// Why a connect failed.
#[derive(Debug)]
pub enum Failure {
    /// The backend's fault (or the network's): counted against it, retried elsewhere.
    Backend(ConnectError),
    /// This host ran out of something (descriptors, ephemeral ports, memory): not the
    /// backend's fault, so it is neither counted against it nor ejected, and another
    /// backend would fail the same way.
    Local(std::io::Error),
}

fn is_local(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL)
    )
}

/// Connects to `addr` within `timeout`.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, Failure> {
    let sock = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(Failure::Local)?;
    // Best effort: a failure here only costs latency.
    let _ = SockRef::from(&sock).set_nodelay(true);
    match tokio::time::timeout(timeout, sock.connect(addr)).await {
        Err(_) => Err(Failure::Backend(ConnectError::Timeout)),
        Ok(Err(e)) if is_local(&e) => Err(Failure::Local(e)),
        Ok(Err(e)) => Err(Failure::Backend(ConnectError::from_io(&e))),
        Ok(Ok(s)) => Ok(s),
    }
}
