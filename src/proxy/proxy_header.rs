//! The PROXY protocol header a trusted sender puts before a client's bytes (HAProxy's
//! doc/proxy-protocol.txt, v1 and v2): a pure parser over the bytes received so far.
//!
//! [`parse`] looks at a prefix of the connection's bytes and says one of three things:
//! the prefix may still become a header ([`Step::Incomplete`]: every byte of it belongs to
//! the header, so the caller may consume them all and wait for more), the header is
//! complete ([`Step::Done`]: its total length, which may be shorter than the prefix — bytes
//! after it are the client's — or longer — v2 TLVs, which are skipped unread), or it
//! cannot be a header ([`HeaderError`]). It never reads past what it is given, never
//! allocates and never panics, whatever the input: the bytes come from the network.
//!
//! Bounds: a v1 line must end (CRLF) within [`V1_MAX`] bytes; a v2 header's declared length
//! (addresses and TLVs after the 16-byte fixed part) must be at most [`V2_MAX_LEN`]. The
//! caller needs at most [`PREFIX_MAX`] bytes of buffer to reach a verdict.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The longest v1 line, CRLF included (the spec's bound).
pub const V1_MAX: usize = 107;
/// The longest v2 address-and-TLV block accepted (nginx's 4 KiB; go-proxyproto's
/// `MaxV2HeaderSize`).
pub const V2_MAX_LEN: usize = 4096;
/// The v2 fixed part: signature, version/command, family/protocol, length.
pub const V2_FIXED: usize = 16;
/// Enough buffer for any verdict: a v1 line plus one byte (to see that it is too long), and
/// more than a v2 fixed part with IPv6 addresses (52 bytes).
pub const PREFIX_MAX: usize = V1_MAX + 1;

/// The v2 signature.
pub const V2_SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];
const V1_PREFIX: &[u8] = b"PROXY ";
/// The shortest v1 header, `PROXY UNKNOWN\r\n`: until this many bytes arrived, every one
/// of them belongs to any header.
pub const V1_MIN: usize = 15;

/// What a complete header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// The connection came from `src` (the client) to `dst` (the address it connected to).
    Proxy { src: SocketAddr, dst: SocketAddr },
    /// No client address: v2 `LOCAL` (the sender's own health check), v1 `UNKNOWN`, v2
    /// `AF_UNSPEC` or `AF_UNIX`. The connection's real addresses stand.
    Local,
}

/// One look at a prefix of the connection's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The bytes so far are all part of a header that is not complete yet.
    Incomplete,
    /// The header is complete; it is `len` bytes long in all (which may be more than was
    /// looked at: v2 TLVs, to be skipped).
    Done { header: Header, len: usize },
}

/// Why the bytes cannot be a PROXY header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("no PROXY header signature")]
    Signature,
    #[error("PROXY v1 line longer than 107 bytes")]
    V1TooLong,
    #[error("malformed PROXY v1 line")]
    V1Malformed,
    #[error("PROXY v2 version or command not supported")]
    V2Command,
    #[error("PROXY v2 address family or protocol not supported")]
    V2Family,
    #[error("PROXY v2 length over 4096")]
    V2TooLong,
    #[error("PROXY v2 length shorter than its addresses")]
    V2Short,
}

/// Looks at `buf`, the connection's first bytes (any number, even none).
pub fn parse(buf: &[u8]) -> Result<Step, HeaderError> {
    if buf.is_empty() {
        return Ok(Step::Incomplete);
    }
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] == V2_SIGNATURE[..n] {
        return parse_v2(buf);
    }
    let n = buf.len().min(V1_PREFIX.len());
    if buf[..n] == V1_PREFIX[..n] {
        return parse_v1(buf);
    }
    Err(HeaderError::Signature)
}

fn parse_v2(buf: &[u8]) -> Result<Step, HeaderError> {
    if buf.len() < V2_FIXED {
        return Ok(Step::Incomplete);
    }
    let ver_cmd = buf[12];
    let fam_proto = buf[13];
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if ver_cmd >> 4 != 2 {
        return Err(HeaderError::V2Command);
    }
    let local = match ver_cmd & 0x0F {
        0 => true,
        1 => false,
        _ => return Err(HeaderError::V2Command),
    };
    // Family: 0 unspecified, 1 INET, 2 INET6, 3 UNIX; protocol: 0 unspecified, 1 STREAM,
    // 2 DGRAM.
    let family = fam_proto >> 4;
    if family > 3 || fam_proto & 0x0F > 2 {
        return Err(HeaderError::V2Family);
    }
    if len > V2_MAX_LEN {
        return Err(HeaderError::V2TooLong);
    }
    let total = V2_FIXED + len;
    let need = match family {
        1 => 12,
        2 => 36,
        3 => 216,
        _ => 0,
    };
    if local {
        // LOCAL: the receiver must ignore the address block, whatever it holds.
        return Ok(Step::Done {
            header: Header::Local,
            len: total,
        });
    }
    if len < need {
        return Err(HeaderError::V2Short);
    }
    let a = &buf[V2_FIXED..];
    let header = match family {
        1 if a.len() >= 12 => {
            let ip = |i: usize| IpAddr::V4(Ipv4Addr::new(a[i], a[i + 1], a[i + 2], a[i + 3]));
            let port = |i: usize| u16::from_be_bytes([a[i], a[i + 1]]);
            Header::Proxy {
                src: SocketAddr::new(ip(0), port(8)),
                dst: SocketAddr::new(ip(4), port(10)),
            }
        }
        2 if a.len() >= 36 => {
            let ip = |i: usize| {
                let mut o = [0u8; 16];
                o.copy_from_slice(&a[i..i + 16]);
                IpAddr::V6(Ipv6Addr::from(o))
            };
            let port = |i: usize| u16::from_be_bytes([a[i], a[i + 1]]);
            Header::Proxy {
                src: SocketAddr::new(ip(0), port(32)),
                dst: SocketAddr::new(ip(16), port(34)),
            }
        }
        1 | 2 => return Ok(Step::Incomplete),
        // AF_UNSPEC and AF_UNIX carry no address meshd can use: the real ones stand.
        _ => Header::Local,
    };
    Ok(Step::Done { header, len: total })
}

fn parse_v1(buf: &[u8]) -> Result<Step, HeaderError> {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
        if buf.len() >= V1_MAX {
            return Err(HeaderError::V1TooLong);
        }
        // A CR must be the last byte seen (its LF still to come).
        return match window.iter().position(|&b| b == b'\r') {
            Some(cr) if cr + 1 != window.len() => Err(HeaderError::V1Malformed),
            _ => Ok(Step::Incomplete),
        };
    };
    if lf < V1_PREFIX.len() + 1 || window[lf - 1] != b'\r' {
        return Err(HeaderError::V1Malformed);
    }
    let line = &window[V1_PREFIX.len()..lf - 1];
    let header = v1_fields(line).ok_or(HeaderError::V1Malformed)?;
    Ok(Step::Done {
        header,
        len: lf + 1,
    })
}

/// The fields after `PROXY `, CRLF excluded.
fn v1_fields(line: &[u8]) -> Option<Header> {
    if line.contains(&b'\r') {
        return None;
    }
    if let Some(rest) = line.strip_prefix(b"UNKNOWN") {
        // The sender may add anything after UNKNOWN; the receiver ignores it.
        return (rest.is_empty() || rest[0] == b' ').then_some(Header::Local);
    }
    let line = std::str::from_utf8(line).ok()?;
    let mut f = line.split(' ');
    let proto = f.next()?;
    let (s, d, sp, dp) = (f.next()?, f.next()?, f.next()?, f.next()?);
    if f.next().is_some() {
        return None;
    }
    let (src, dst): (IpAddr, IpAddr) = match proto {
        "TCP4" => (
            IpAddr::V4(s.parse::<Ipv4Addr>().ok()?),
            IpAddr::V4(d.parse::<Ipv4Addr>().ok()?),
        ),
        "TCP6" => (
            IpAddr::V6(s.parse::<Ipv6Addr>().ok()?),
            IpAddr::V6(d.parse::<Ipv6Addr>().ok()?),
        ),
        _ => return None,
    };
    Some(Header::Proxy {
        src: SocketAddr::new(src, port(sp)?),
        dst: SocketAddr::new(dst, port(dp)?),
    })
}

/// A v1 port: decimal, 0..=65535, no sign, no leading zero.
fn port(s: &str) -> Option<u16> {
    let ok = !s.is_empty()
        && s.len() <= 5
        && s.bytes().all(|b| b.is_ascii_digit())
        && (s == "0" || !s.starts_with('0'));
    if ok {
        s.parse().ok()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ProxyProtocol;
    use crate::proxy::proxy_protocol;

    fn v4(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// Feeds `input` in pieces of `chunk` bytes the way the reader does (a piece is looked
    /// at together with everything before it); the verdict and how many bytes it took.
    fn incremental(input: &[u8], chunk: usize) -> Result<Option<(Header, usize)>, HeaderError> {
        let mut have = 0;
        loop {
            match parse(&input[..have])? {
                Step::Done { header, len } => return Ok(Some((header, len))),
                Step::Incomplete if have == input.len() => return Ok(None),
                Step::Incomplete => have = (have + chunk).min(input.len()),
            }
        }
    }

    fn done(input: &[u8]) -> (Header, usize) {
        match parse(input) {
            Ok(Step::Done { header, len }) => (header, len),
            other => panic!("{other:?} for {input:?}"),
        }
    }

    fn v2(cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(cmd);
        h.push(fam);
        h.extend_from_slice(&(body.len() as u16).to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    #[test]
    fn v1_tcp4_and_tcp6_with_payload_after() {
        let line = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\nGET / HTTP/1.1\r\n";
        let (h, len) = done(line);
        assert_eq!(len, 45);
        assert_eq!(
            h,
            Header::Proxy {
                src: v4("192.0.2.1:56324"),
                dst: v4("198.51.100.2:443")
            }
        );
        let (h, len) = done(b"PROXY TCP6 2001:db8::1 ::1 65535 0\r\n");
        assert_eq!(len, 36);
        assert_eq!(
            h,
            Header::Proxy {
                src: "[2001:db8::1]:65535".parse().unwrap(),
                dst: "[::1]:0".parse().unwrap()
            }
        );
    }

    #[test]
    fn v1_unknown_is_local_and_ignores_the_rest() {
        assert_eq!(done(b"PROXY UNKNOWN\r\n"), (Header::Local, 15));
        assert_eq!(
            done(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\nxyz"),
            (Header::Local, 35)
        );
        assert_eq!(parse(b"PROXY UNKNOWNX\r\n"), Err(HeaderError::V1Malformed));
    }

    #[test]
    fn v1_malformed_lines_are_refused() {
        for bad in [
            &b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"[..],  // LF without CR
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX",      // CR not followed by LF
            b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n",    // two spaces
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",    // leading zero
            b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", // port out of range
            b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
            b"PROXY TCP4 ::1 ::1 1 2\r\n", // v6 address as TCP4
            b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", // a field missing
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", // one too many
            b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY \r\n",
            b"PROXY TCP4 \xff.2.3.4 5.6.7.8 1 2\r\n",
        ] {
            assert_eq!(parse(bad), Err(HeaderError::V1Malformed), "{bad:?}");
        }
    }

    #[test]
    fn v1_line_without_end_is_refused_at_107_bytes() {
        let mut line = b"PROXY UNKNOWN ".to_vec();
        line.resize(105, b'a');
        line.push(b'\r');
        assert_eq!(parse(&line), Ok(Step::Incomplete));
        let mut ok = line.clone();
        ok.push(b'\n');
        // 107 bytes with its CRLF: the longest line there may be.
        assert_eq!(
            parse(&ok),
            Ok(Step::Done {
                header: Header::Local,
                len: 107
            })
        );
        // One more byte before the CR: 107 bytes seen and no end.
        line.insert(20, b'a');
        assert_eq!(parse(&line), Err(HeaderError::V1TooLong));
        line.push(b'\n');
        assert_eq!(parse(&line), Err(HeaderError::V1TooLong));
        let mut long_line = b"PROXY UNKNOWN ".to_vec();
        long_line.extend_from_slice(&[b'a'; 200]);
        assert_eq!(parse(&long_line), Err(HeaderError::V1TooLong));
    }

    #[test]
    fn truncated_headers_are_incomplete_at_every_length() {
        let headers: [Vec<u8>; 4] = [
            b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n".to_vec(),
            b"PROXY UNKNOWN\r\n".to_vec(),
            proxy_protocol::encode(ProxyProtocol::V2, v4("10.1.2.3:4"), v4("10.5.6.7:8"))
                .unwrap()
                .as_bytes()
                .to_vec(),
            v2(0x21, 0x21, &[7u8; 36]),
        ];
        for h in &headers {
            let (_, len) = done(h);
            assert_eq!(len, h.len());
            for cut in 0..h.len() {
                assert_eq!(parse(&h[..cut]), Ok(Step::Incomplete), "{h:?} cut at {cut}");
            }
            for chunk in 1..=h.len() {
                assert_eq!(incremental(h, chunk), Ok(Some(done(h))), "chunk {chunk}");
            }
        }
    }

    #[test]
    fn bad_signatures_are_refused_at_the_first_wrong_byte() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(HeaderError::Signature));
        assert_eq!(parse(b"PROXX"), Err(HeaderError::Signature));
        assert_eq!(parse(b"proxy TCP4"), Err(HeaderError::Signature));
        assert_eq!(parse(b"\x16\x03\x01"), Err(HeaderError::Signature));
        let mut sig = V2_SIGNATURE.to_vec();
        sig[11] = 0x0B;
        assert_eq!(parse(&sig), Err(HeaderError::Signature));
        assert_eq!(parse(&sig[..11]), Ok(Step::Incomplete));
        assert_eq!(parse(b"P"), Ok(Step::Incomplete));
        assert_eq!(parse(b""), Ok(Step::Incomplete));
    }

    #[test]
    fn v2_matches_what_meshd_sends() {
        let cases = [
            (v4("192.0.2.1:56324"), v4("198.51.100.2:443")),
            (
                "[2001:db8::1]:1".parse().unwrap(),
                "[2001:db8::2]:65535".parse().unwrap(),
            ),
        ];
        for (src, dst) in cases {
            let h = proxy_protocol::encode(ProxyProtocol::V2, src, dst).unwrap();
            assert_eq!(
                done(h.as_bytes()),
                (Header::Proxy { src, dst }, h.as_bytes().len())
            );
            let h = proxy_protocol::encode(ProxyProtocol::V1, src, dst).unwrap();
            assert_eq!(
                done(h.as_bytes()),
                (Header::Proxy { src, dst }, h.as_bytes().len())
            );
        }
    }

    #[test]
    fn v2_local_unspec_and_unix_keep_the_real_addresses() {
        // LOCAL with whatever address block: ignored.
        assert_eq!(done(&v2(0x20, 0x00, &[])), (Header::Local, 16));
        assert_eq!(done(&v2(0x20, 0x11, &[1; 3])), (Header::Local, 19));
        // PROXY over AF_UNSPEC, AF_UNIX.
        assert_eq!(done(&v2(0x21, 0x00, &[9; 5])), (Header::Local, 21));
        assert_eq!(done(&v2(0x21, 0x31, &[0; 216])), (Header::Local, 232));
    }

    #[test]
    fn v2_tlvs_are_skipped_by_length() {
        let mut body = vec![10, 0, 0, 1, 10, 0, 0, 2, 0x1F, 0x90, 0, 80];
        // PP2_TYPE_AUTHORITY "a.test", then a NOOP TLV, then 1000 bytes of a custom one.
        body.extend_from_slice(&[0x02, 0, 6]);
        body.extend_from_slice(b"a.test");
        body.extend_from_slice(&[0x04, 0, 0]);
        body.extend_from_slice(&[0xE0, 0x03, 0xE8]);
        body.extend_from_slice(&[0xAB; 1000]);
        let h = v2(0x21, 0x11, &body);
        let want = Header::Proxy {
            src: v4("10.0.0.1:8080"),
            dst: v4("10.0.0.2:80"),
        };
        // Done as soon as the addresses are in: the TLVs are not looked at.
        assert_eq!(done(&h[..28]), (want, h.len()));
        assert_eq!(done(&h), (want, h.len()));
        // Truncated or malformed TLV content cannot matter either.
        let mut junk = h.clone();
        junk[30] = 0xFF;
        assert_eq!(done(&junk), (want, h.len()));
    }

    #[test]
    fn v2_bad_fields_are_refused() {
        assert_eq!(
            parse(&v2(0x11, 0x11, &[0; 12])),
            Err(HeaderError::V2Command)
        );
        assert_eq!(
            parse(&v2(0x22, 0x11, &[0; 12])),
            Err(HeaderError::V2Command)
        );
        assert_eq!(parse(&v2(0x21, 0x41, &[0; 12])), Err(HeaderError::V2Family));
        assert_eq!(parse(&v2(0x21, 0x13, &[0; 12])), Err(HeaderError::V2Family));
        assert_eq!(parse(&v2(0x21, 0x11, &[0; 11])), Err(HeaderError::V2Short));
        assert_eq!(parse(&v2(0x21, 0x21, &[0; 35])), Err(HeaderError::V2Short));
        assert_eq!(parse(&v2(0x21, 0x31, &[0; 215])), Err(HeaderError::V2Short));
        // Oversized: refused from the fixed part alone, before any of it is read.
        let mut big = v2(0x21, 0x11, &[]);
        big[14..16].copy_from_slice(&4097u16.to_be_bytes());
        assert_eq!(parse(&big), Err(HeaderError::V2TooLong));
        big[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
        assert_eq!(parse(&big), Err(HeaderError::V2TooLong));
        big[14..16].copy_from_slice(&4096u16.to_be_bytes());
        assert_eq!(parse(&big), Ok(Step::Incomplete));
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_stay_in_bounds() {
        // A small deterministic generator: mutations of valid headers and random bytes.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let seeds: [Vec<u8>; 3] = [
            b"PROXY TCP6 2001:db8::1 ::1 65535 0\r\n".to_vec(),
            v2(0x21, 0x11, &[1; 40]),
            v2(0x20, 0x21, &[2; 36]),
        ];
        for round in 0..20_000 {
            let mut buf = seeds[round % 3].clone();
            for _ in 0..(next() % 4) {
                let i = (next() as usize) % buf.len();
                buf[i] = next() as u8;
            }
            buf.truncate((next() as usize) % (buf.len() + 1));
            if round % 7 == 0 {
                buf = (0..next() % 200).map(|_| next() as u8).collect();
            }
            if let Ok(Step::Done { len, .. }) = parse(&buf) {
                assert!((V1_MIN..=V2_FIXED + V2_MAX_LEN).contains(&len));
            }
            // Split invariance: piecewise gives what the whole gave.
            let whole = match parse(&buf) {
                Ok(Step::Done { header, len }) => Ok(Some((header, len))),
                Ok(Step::Incomplete) => Ok(None),
                Err(e) => Err(e),
            };
            let chunk = 1 + (next() as usize) % 20;
            let piecewise = incremental(&buf, chunk);
            match (whole, piecewise) {
                (Ok(Some(w)), Ok(Some(p))) => assert_eq!(w, p),
                (Ok(None), Ok(None)) | (Err(_), Err(_)) => {}
                (w, p) => panic!("{buf:?}: whole {w:?}, piecewise {p:?}"),
            }
        }
    }
}
