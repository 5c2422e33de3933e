//! Dialing a backend: one non-blocking connect bounded by `connect_timeout`, with the same
//! socket options meshd sets on client sockets (TCP_NODELAY, keepalive well under 900 s).

use std::net::SocketAddr;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::{TcpSocket, TcpStream};

use crate::config::defaults;
use crate::table::ConnectError;

/// Keepalive probes: first after `TCP_KEEPALIVE` idle, then every 10 s, 6 tries.
pub fn keepalive() -> TcpKeepalive {
    TcpKeepalive::new()
        .with_time(defaults::TCP_KEEPALIVE)
        .with_interval(Duration::from_secs(10))
        .with_retries(6)
}

/// Connects to `addr` within `timeout`.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ConnectError> {
    let sock = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|e| ConnectError::from_io(&e))?;
    {
        let s = SockRef::from(&sock);
        // Best effort: a failure here only costs latency or dead-peer detection.
        let _ = s.set_nodelay(true);
        let _ = s.set_tcp_keepalive(&keepalive());
    }
    match tokio::time::timeout(timeout, sock.connect(addr)).await {
        Err(_) => Err(ConnectError::Timeout),
        Ok(Err(e)) => Err(ConnectError::from_io(&e)),
        Ok(Ok(s)) => Ok(s),
    }
}
