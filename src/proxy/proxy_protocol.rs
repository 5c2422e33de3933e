//! PROXY protocol v1 and v2 headers (HAProxy's doc/proxy-protocol.txt), sent to a backend
//! before any payload so it learns the client's real address.
//!
//! The header is encoded into a fixed stack buffer and written with one `write` call: no
//! allocation per connection. v1 is text, at most 107 bytes with its CRLF; v2 is binary,
//! 16 bytes + 12 (IPv4) or 36 (IPv6) bytes of addresses.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};

use crate::config::ProxyProtocol;

/// Large enough for the longest v1 line (107 bytes) and the v2 IPv6 header (52 bytes).
pub const MAX_HEADER: usize = 108;

const V2_SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];

/// An encoded header.
pub struct Header {
    buf: [u8; MAX_HEADER],
    len: usize,
}

impl Header {
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Encodes the header announcing a connection from `src` (the client) to `dst` (the address
/// it connected to). Returns `None` for `ProxyProtocol::Off`.
pub fn encode(version: ProxyProtocol, src: SocketAddr, dst: SocketAddr) -> Option<Header> {
    let mut h = Header {
        buf: [0; MAX_HEADER],
        len: 0,
    };
    // An IPv4 client on an IPv6 socket arrives as ::ffff:a.b.c.d; show it as IPv4.
    let src = unmap(src);
    let dst = unmap(dst);
    match version {
        ProxyProtocol::Off => return None,
        ProxyProtocol::V1 => {
            let mut cur = std::io::Cursor::new(&mut h.buf[..]);
            // Writes into a fixed buffer cannot fail: the longest line fits (107 bytes).
            let r = match (src.ip(), dst.ip()) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    write!(cur, "PROXY TCP4 {s} {d} {} {}\r\n", src.port(), dst.port())
                }
                (IpAddr::V6(s), IpAddr::V6(d)) => {
                    write!(cur, "PROXY TCP6 {s} {d} {} {}\r\n", src.port(), dst.port())
                }
                _ => write!(cur, "PROXY UNKNOWN\r\n"),
            };
            debug_assert!(r.is_ok());
            h.len = cur.position() as usize;
        }
        ProxyProtocol::V2 => {
            h.buf[..12].copy_from_slice(&V2_SIGNATURE);
            h.buf[12] = 0x21; // version 2, command PROXY
            match (src.ip(), dst.ip()) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    h.buf[13] = 0x11; // AF_INET, STREAM
                    h.buf[14..16].copy_from_slice(&12u16.to_be_bytes());
                    h.buf[16..20].copy_from_slice(&s.octets());
                    h.buf[20..24].copy_from_slice(&d.octets());
                    h.buf[24..26].copy_from_slice(&src.port().to_be_bytes());
                    h.buf[26..28].copy_from_slice(&dst.port().to_be_bytes());
                    h.len = 28;
                }
                (IpAddr::V6(s), IpAddr::V6(d)) => {
                    h.buf[13] = 0x21; // AF_INET6, STREAM
                    h.buf[14..16].copy_from_slice(&36u16.to_be_bytes());
                    h.buf[16..32].copy_from_slice(&s.octets());
                    h.buf[32..48].copy_from_slice(&d.octets());
                    h.buf[48..50].copy_from_slice(&src.port().to_be_bytes());
                    h.buf[50..52].copy_from_slice(&dst.port().to_be_bytes());
                    h.len = 52;
                }
                _ => {
                    h.buf[13] = 0x00; // AF_UNSPEC
                    h.buf[14..16].copy_from_slice(&0u16.to_be_bytes());
                    h.len = 16;
                }
            }
        }
    }
    Some(h)
}

fn unmap(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => a,
        },
        IpAddr::V4(_) => a,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_ipv4() {
        let h = encode(
            ProxyProtocol::V1,
            sa("192.168.0.1:56324"),
            sa("10.0.0.2:443"),
        )
        .unwrap();
        assert_eq!(
            h.as_bytes(),
            b"PROXY TCP4 192.168.0.1 10.0.0.2 56324 443\r\n"
        );
    }

    #[test]
    fn v1_ipv6_and_mapped() {
        let h = encode(ProxyProtocol::V1, sa("[2001:db8::1]:1"), sa("[::1]:80")).unwrap();
        assert_eq!(h.as_bytes(), b"PROXY TCP6 2001:db8::1 ::1 1 80\r\n");
        let h = encode(
            ProxyProtocol::V1,
            sa("[::ffff:1.2.3.4]:5"),
            sa("[::ffff:5.6.7.8]:6"),
        )
        .unwrap();
        assert_eq!(h.as_bytes(), b"PROXY TCP4 1.2.3.4 5.6.7.8 5 6\r\n");
    }

    #[test]
    fn v1_longest_line_fits() {
        let ip = "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe]";
        let h = encode(
            ProxyProtocol::V1,
            sa(&format!("{ip}:65535")),
            sa(&format!("{ip}:65535")),
        )
        .unwrap();
        assert_eq!(h.as_bytes().len(), 104);
        assert!(h.as_bytes().ends_with(b"65535 65535\r\n"));
    }

    #[test]
    fn v2_ipv4_exact_bytes() {
        let h = encode(ProxyProtocol::V2, sa("1.2.3.4:258"), sa("5.6.7.8:80")).unwrap();
        let mut want = V2_SIGNATURE.to_vec();
        want.extend_from_slice(&[0x21, 0x11, 0, 12, 1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 0, 80]);
        assert_eq!(h.as_bytes(), &want[..]);
    }

    #[test]
    fn v2_ipv6_length() {
        let h = encode(ProxyProtocol::V2, sa("[::1]:1"), sa("[::2]:2")).unwrap();
        assert_eq!(h.as_bytes().len(), 52);
        assert_eq!(&h.as_bytes()[12..16], &[0x21, 0x21, 0, 36]);
    }

    #[test]
    fn off_is_none() {
        assert!(encode(ProxyProtocol::Off, sa("1.1.1.1:1"), sa("2.2.2.2:2")).is_none());
    }
}
