//! `accept_proxy`: reading the PROXY header a trusted sender (a load balancer in front of
//! meshd) puts before the client's bytes.
//!
//! [`trusted`] is the one check every connection of a service with `accept_proxy` pays: the
//! peer address against the service's precomputed CIDR list. A service without it pays a
//! length check. From an untrusted source nothing is read here: its bytes are the
//! client's and go to the backend untouched.
//!
//! [`read`] takes exactly the header's bytes off the socket and not one more (what follows
//! is the client's, and may be spliced): it peeks at what has arrived, lets
//! [`proxy_header::parse`] judge it, and consumes only bytes that belong to the header (a
//! v2 header's TLVs are read and dropped in small pieces). It lives in the connection's own
//! state: a [`PREFIX_MAX`]-byte buffer, no allocation.

use std::net::{IpAddr, SocketAddr};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::proxy_header::{self, Header, HeaderError, Step, PREFIX_MAX};

/// Whether `peer` is inside one of `cidrs` (an IPv4 client of an IPv6 listener, seen as
/// `::ffff:a.b.c.d`, is matched as IPv4).
pub fn trusted(cidrs: &[ipnet::IpNet], peer: IpAddr) -> bool {
    if cidrs.is_empty() {
        return false;
    }
    let ip = peer.to_canonical();
    cidrs.iter().any(|n| n.contains(&ip))
}

/// Why no header was read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{0}")]
    Header(#[from] HeaderError),
    #[error("connection closed before the PROXY header ended")]
    Eof,
    #[error("reading the PROXY header: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads one PROXY header off `s`, exactly: on success the next byte `s` yields is the
/// first byte after the header. Not bounded in time: the caller wraps it in
/// `client_hello_timeout`.
pub async fn read(s: &mut TcpStream) -> Result<Header, ReadError> {
    let mut buf = [0u8; PREFIX_MAX];
    let mut have = 0;
    loop {
        // What has arrived (without taking it), after what was already taken.
        let n = s.peek(&mut buf[have..]).await?;
        if n == 0 {
            return Err(ReadError::Eof);
        }
        let seen = have + n;
        match proxy_header::parse(&buf[..seen])? {
            Step::Incomplete if seen == PREFIX_MAX => {
                // Cannot happen (a verdict needs at most PREFIX_MAX bytes); refused rather
                // than looped on.
                return Err(HeaderError::V1TooLong.into());
            }
            Step::Incomplete => {
                // All of it belongs to the header: take it, wait for more.
                s.read_exact(&mut buf[have..seen]).await?;
                have = seen;
            }
            Step::Done { header, len } => {
                let take = len.min(seen);
                s.read_exact(&mut buf[have..take]).await?;
                // v2 TLVs beyond what was looked at: read and dropped.
                let mut rest = len - take;
                while rest > 0 {
                    let k = rest.min(buf.len());
                    s.read_exact(&mut buf[..k]).await.map_err(|e| {
                        if e.kind() == std::io::ErrorKind::UnexpectedEof {
                            ReadError::Eof
                        } else {
                            ReadError::Io(e)
                        }
                    })?;
                    rest -= k;
                }
                return Ok(header);
            }
        }
    }
}

/// The client and local addresses a connection stands for: the header's when it names
/// them, else the socket's own.
pub fn addresses(header: Header, peer: SocketAddr, local: SocketAddr) -> (SocketAddr, SocketAddr) {
    match header {
        Header::Proxy { src, dst } => (src, dst),
        Header::Local => (peer, local),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    fn nets(list: &[&str]) -> Vec<ipnet::IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn trust_is_a_cidr_check_that_sees_through_mapped_addresses() {
        let n = nets(&["10.0.0.0/8", "127.0.0.1/32", "2001:db8::/32"]);
        assert!(trusted(&n, "10.200.1.1".parse().unwrap()));
        assert!(trusted(&n, "127.0.0.1".parse().unwrap()));
        assert!(!trusted(&n, "127.0.0.2".parse().unwrap()));
        assert!(trusted(&n, "::ffff:10.1.1.1".parse().unwrap()));
        assert!(trusted(&n, "2001:db8::5".parse().unwrap()));
        assert!(!trusted(&n, "2001:db9::5".parse().unwrap()));
        assert!(!trusted(&[], "10.0.0.1".parse().unwrap()));
    }

    /// Sends `pieces` (with a pause between them) to a fresh connection and reads the
    /// header on the other side; what `read` said and the bytes left after it.
    async fn over_socket(pieces: &[&[u8]]) -> (Result<Header, String>, Vec<u8>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let pieces: Vec<Vec<u8>> = pieces.iter().map(|p| p.to_vec()).collect();
        let sender = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.set_nodelay(true).unwrap();
            for p in pieces {
                c.write_all(&p).await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        });
        let (mut s, _) = l.accept().await.unwrap();
        let r = read(&mut s).await.map_err(|e| e.to_string());
        sender.await.unwrap();
        let mut rest = Vec::new();
        if r.is_ok() {
            s.read_to_end(&mut rest).await.unwrap();
        }
        (r, rest)
    }

    #[tokio::test]
    async fn reads_exactly_the_header_even_split_byte_by_byte() {
        let line = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n";
        let mut pieces: Vec<&[u8]> = line.chunks(1).collect();
        pieces.push(b"payload");
        let (r, rest) = over_socket(&pieces).await;
        assert_eq!(
            r.unwrap(),
            Header::Proxy {
                src: "192.0.2.1:56324".parse().unwrap(),
                dst: "198.51.100.2:443".parse().unwrap()
            }
        );
        assert_eq!(rest, b"payload");

        // v1 line and payload in one segment.
        let mut one = line.to_vec();
        one.extend_from_slice(b"PROXY TCP4 not a header");
        let (r, rest) = over_socket(&[&one]).await;
        assert!(r.is_ok());
        assert_eq!(rest, b"PROXY TCP4 not a header");
    }

    #[tokio::test]
    async fn v2_tlvs_are_dropped_and_the_payload_kept() {
        let mut h = proxy_header::V2_SIGNATURE.to_vec();
        h.extend_from_slice(&[0x21, 0x11]);
        let body_len = 12 + 3 + 2000;
        h.extend_from_slice(&(body_len as u16).to_be_bytes());
        h.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2, 0, 1, 0, 2]);
        h.extend_from_slice(&[0xE0, 0x07, 0xD0]);
        h.extend_from_slice(&[0x55; 2000]);
        h.extend_from_slice(b"after");
        let (a, b) = h.split_at(700);
        let (r, rest) = over_socket(&[a, b]).await;
        assert_eq!(
            r.unwrap(),
            Header::Proxy {
                src: "10.0.0.1:1".parse().unwrap(),
                dst: "10.0.0.2:2".parse().unwrap()
            }
        );
        assert_eq!(rest, b"after");
    }

    #[tokio::test]
    async fn garbage_and_truncation_are_errors() {
        let (r, _) = over_socket(&[b"GET / HTTP/1.0\r\n\r\n"]).await;
        assert_eq!(r.unwrap_err(), "no PROXY header signature");
        let (r, _) = over_socket(&[b"PROXY TCP4 1.2.3.4"]).await;
        assert_eq!(
            r.unwrap_err(),
            "connection closed before the PROXY header ended"
        );
        let mut h = proxy_header::V2_SIGNATURE.to_vec();
        h.extend_from_slice(&[0x21, 0x11, 0, 100]);
        h.extend_from_slice(&[1; 50]);
        let (r, _) = over_socket(&[&h]).await;
        assert_eq!(
            r.unwrap_err(),
            "connection closed before the PROXY header ended"
        );
    }
}
