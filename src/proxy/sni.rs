//! The server name of a TLS ClientHello, for SNI passthrough routing (DESIGN.md "TLS and
//! SNI"): a pure, bounded, incremental parser over the connection's first bytes, the name
//! normalisation routing compares on, and wildcard matching.
//!
//! `conn::serve_sni` runs it on the listeners of `[service.tls]` services; the routes
//! it looks names up in are `table::sni::SniRoutes`, part of the published table.
//!
//! [`parse`] reassembles the handshake message from as many TLS records as it takes (a
//! ClientHello may be split over records, and records over segments), and says
//! [`Step::Incomplete`] until the whole ClientHello is in, at most [`MAX_HELLO`] bytes of
//! records. It never panics and never reads past what it is given; the bytes it looked at
//! are still the caller's to forward to the backend.

/// The most bytes of records buffered for one ClientHello.
pub const MAX_HELLO: usize = 16 * 1024;
/// The longest DNS name (without a trailing dot).
pub const MAX_NAME: usize = crate::config::limits::MAX_DNS_NAME;

const RECORD_HEADER: usize = 5;
const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;

/// One look at the connection's first bytes.
// The name is kept inline (254 bytes) on purpose: boxing it would allocate per connection.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// More bytes are needed.
    Incomplete,
    /// A whole ClientHello: its server name, normalised (`None`: it sent none, or one that
    /// is not a DNS name, such as an IP literal), and how many bytes of records it took.
    Done { name: Option<Name>, len: usize },
}

/// Why the bytes are not a ClientHello meshd can route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SniError {
    #[error("not a TLS handshake record")]
    NotHandshake,
    #[error("not a ClientHello")]
    NotClientHello,
    #[error("ClientHello larger than 16 KiB")]
    TooLarge,
    #[error("malformed ClientHello")]
    Malformed,
}

/// A normalised server name: ASCII lowercase, no trailing dot, at most [`MAX_NAME`] bytes
/// (kept inline: no allocation).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Name {
    buf: [u8; MAX_NAME],
    len: u8,
}

impl Name {
    pub fn as_str(&self) -> &str {
        // Only ASCII letters, digits, '-', '_' and '.' are ever stored.
        std::str::from_utf8(&self.buf[..usize::from(self.len)]).unwrap_or("")
    }
}

impl std::fmt::Debug for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

/// Normalises a server name as routing compares it: ASCII lowercase, one trailing dot
/// removed. `None` when it is not a DNS name: empty, too long, an empty label, a label over
/// 63 bytes, a byte other than letters, digits, `-` and `_`, or all digits and dots (an
/// IPv4 literal, which RFC 6066 does not allow as SNI).
pub fn normalize(raw: &[u8]) -> Option<Name> {
    let raw = raw.strip_suffix(b".").unwrap_or(raw);
    if !crate::config::limits::dns_name(raw) {
        return None;
    }
    let mut name = Name {
        buf: [0; MAX_NAME],
        len: raw.len() as u8,
    };
    for (i, &b) in raw.iter().enumerate() {
        name.buf[i] = b.to_ascii_lowercase();
    }
    Some(name)
}

/// Whether `pattern` (normalised: `a.example.com`, or `*.example.com`) matches `name`. A
/// wildcard stands for exactly one label: `*.example.com` matches `a.example.com`, not
/// `example.com` nor `a.b.example.com`.
pub fn matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix("*.") {
        None => pattern == name,
        Some(suffix) => name
            .strip_suffix(suffix)
            .and_then(|head| head.strip_suffix('.'))
            .is_some_and(|label| !label.is_empty() && !label.contains('.')),
    }
}

/// Looks at `buf`, the connection's first bytes.
pub fn parse(buf: &[u8]) -> Result<Step, SniError> {
    // The handshake message, gathered from the records' payloads.
    let mut msg = [0u8; MAX_HELLO];
    let mut have = 0;
    let mut at = 0;
    loop {
        let Some(head) = buf.get(at..at + RECORD_HEADER) else {
            // A partial record header: check what there is of it.
            let part = &buf[at.min(buf.len())..];
            if part.first().is_some_and(|&t| t != CONTENT_HANDSHAKE)
                || part.get(1).is_some_and(|&v| v != 3)
            {
                return Err(SniError::NotHandshake);
            }
            return Ok(Step::Incomplete);
        };
        if head[0] != CONTENT_HANDSHAKE || head[1] != 3 {
            return Err(SniError::NotHandshake);
        }
        let len = usize::from(u16::from_be_bytes([head[3], head[4]]));
        if len == 0 || len > 1 << 14 {
            return Err(SniError::Malformed);
        }
        if at + RECORD_HEADER + len > MAX_HELLO {
            return Err(SniError::TooLarge);
        }
        let Some(payload) = buf.get(at + RECORD_HEADER..at + RECORD_HEADER + len) else {
            return Ok(Step::Incomplete);
        };
        msg[have..have + len].copy_from_slice(payload);
        have += len;
        at += RECORD_HEADER + len;
        if have >= 4 {
            if msg[0] != HANDSHAKE_CLIENT_HELLO {
                return Err(SniError::NotClientHello);
            }
            let body =
                (usize::from(msg[1]) << 16) | (usize::from(msg[2]) << 8) | usize::from(msg[3]);
            if 4 + body > MAX_HELLO {
                return Err(SniError::TooLarge);
            }
            if have >= 4 + body {
                let name = client_hello(&msg[4..4 + body])?;
                return Ok(Step::Done { name, len: at });
            }
        }
    }
}

/// A cursor over a ClientHello body; every read is bounds-checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SniError> {
        if n > self.0.len() {
            return Err(SniError::Malformed);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<usize, SniError> {
        Ok(usize::from(self.take(1)?[0]))
    }
    fn u16(&mut self) -> Result<usize, SniError> {
        let b = self.take(2)?;
        Ok(usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
    fn vec8(&mut self) -> Result<&'a [u8], SniError> {
        let n = self.u8()?;
        self.take(n)
    }
    fn vec16(&mut self) -> Result<&'a [u8], SniError> {
        let n = self.u16()?;
        self.take(n)
    }
}

fn client_hello(body: &[u8]) -> Result<Option<Name>, SniError> {
    let mut r = Reader(body);
    r.take(2 + 32)?; // legacy_version, random
    if r.vec8()?.len() > 32 {
        return Err(SniError::Malformed); // legacy_session_id
    }
    let suites = r.vec16()?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(SniError::Malformed);
    }
    if r.vec8()?.is_empty() {
        return Err(SniError::Malformed); // legacy_compression_methods
    }
    if r.0.is_empty() {
        return Ok(None); // no extensions at all
    }
    let mut exts = Reader(r.vec16()?);
    if !r.0.is_empty() {
        return Err(SniError::Malformed);
    }
    let mut name = None;
    let mut seen_sni = false;
    while !exts.0.is_empty() {
        let ty = exts.u16()?;
        let data = exts.vec16()?;
        if ty as u16 != EXT_SERVER_NAME {
            continue; // GREASE, ECH (the outer hello routes on its public name), ...
        }
        if seen_sni {
            return Err(SniError::Malformed); // the extension twice
        }
        seen_sni = true;
        let mut d = Reader(data);
        let mut list = Reader(d.vec16()?);
        if !d.0.is_empty() || list.0.is_empty() {
            return Err(SniError::Malformed);
        }
        while !list.0.is_empty() {
            let kind = list.u8()?;
            let host = list.vec16()?;
            if kind == 0 && name.is_none() {
                name = Some(normalize(host));
            }
        }
    }
    Ok(name.flatten())
}

/// The TLS alert meshd answers an unknown name with: fatal (2) `unrecognized_name` (112),
/// in a TLS 1.0-versioned record as servers answer a ClientHello.
pub const ALERT_UNRECOGNIZED_NAME: [u8; 7] = [21, 3, 1, 0, 2, 2, 112];

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello with `exts` (type, data) pairs, in one record.
    fn hello_body(exts: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut b = vec![3, 3];
        b.extend_from_slice(&[7; 32]);
        b.push(32);
        b.extend_from_slice(&[9; 32]);
        b.extend_from_slice(&[0, 4, 0x13, 0x01, 0x13, 0x02]);
        b.extend_from_slice(&[1, 0]);
        let mut e = Vec::new();
        for (t, d) in exts {
            e.extend_from_slice(&t.to_be_bytes());
            e.extend_from_slice(&(d.len() as u16).to_be_bytes());
            e.extend_from_slice(d);
        }
        b.extend_from_slice(&(e.len() as u16).to_be_bytes());
        b.extend_from_slice(&e);
        let mut m = vec![1];
        m.extend_from_slice(&(b.len() as u32).to_be_bytes()[1..]);
        m.extend_from_slice(&b);
        m
    }

    fn sni_ext(name: &[u8]) -> (u16, Vec<u8>) {
        let mut entry = vec![0];
        entry.extend_from_slice(&(name.len() as u16).to_be_bytes());
        entry.extend_from_slice(name);
        let mut d = (entry.len() as u16).to_be_bytes().to_vec();
        d.extend_from_slice(&entry);
        (0, d)
    }

    /// `msg` split into records of at most `max` bytes each.
    fn records(msg: &[u8], max: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for c in msg.chunks(max) {
            out.extend_from_slice(&[22, 3, 1]);
            out.extend_from_slice(&(c.len() as u16).to_be_bytes());
            out.extend_from_slice(c);
        }
        out
    }

    fn name_of(buf: &[u8]) -> Option<String> {
        match parse(buf) {
            Ok(Step::Done { name, len }) => {
                assert!(len <= buf.len());
                name.map(|n| n.as_str().to_owned())
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn names_are_normalised() {
        let n = |s: &str| normalize(s.as_bytes()).map(|n| n.as_str().to_owned());
        assert_eq!(n("A.Example.COM").as_deref(), Some("a.example.com"));
        assert_eq!(n("a.example.com.").as_deref(), Some("a.example.com"));
        assert_eq!(n("a.example.com.."), None);
        assert_eq!(n(""), None);
        assert_eq!(n("."), None);
        assert_eq!(n("a..b"), None);
        assert_eq!(n("192.0.2.1"), None);
        assert_eq!(n("a b"), None);
        assert_eq!(n("ä.test"), None);
        assert_eq!(n(&"a".repeat(64)), None);
        assert!(n(&format!("{}.b", "a".repeat(63))).is_some());
        let long = vec!["abc"; 64].join(".");
        assert_eq!(n(&long[..254]), None);
    }

    #[test]
    fn wildcards_match_exactly_one_label() {
        assert!(matches("a.example.com", "a.example.com"));
        assert!(!matches("a.example.com", "b.example.com"));
        assert!(matches("*.example.com", "a.example.com"));
        assert!(!matches("*.example.com", "example.com"));
        assert!(!matches("*.example.com", "a.b.example.com"));
        assert!(!matches("*.example.com", ".example.com"));
        assert!(!matches("*.example.com", "aexample.com"));
    }

    #[test]
    fn the_server_name_is_found_across_records_and_segments() {
        let msg = hello_body(&[
            (0x0A0A, vec![]), // GREASE
            (10, vec![0, 2, 0, 29]),
            sni_ext(b"Shop.Example.COM."),
            (0xfe0d, vec![0; 40]), // an ECH extension: skipped
        ]);
        for max in [1, 7, 64, 16384] {
            let wire = records(&msg, max);
            assert_eq!(name_of(&wire).as_deref(), Some("shop.example.com"), "{max}");
            for cut in 0..wire.len() {
                assert_eq!(parse(&wire[..cut]), Ok(Step::Incomplete), "{max} {cut}");
            }
            // Bytes after the hello are the client's: not taken.
            let mut more = wire.clone();
            more.extend_from_slice(&[23, 3, 3, 0, 1, 0]);
            assert_eq!(
                parse(&more).map(|s| match s {
                    Step::Done { len, .. } => len,
                    Step::Incomplete => 0,
                }),
                Ok(wire.len())
            );
        }
    }

    #[test]
    fn a_real_openssl_client_hello() {
        // `openssl s_client -servername Shop.Example.COM.` (OpenSSL 3.0, TLS 1.3 and 1.2
        // offered), captured off the wire.
        let wire = include_bytes!("../../tests/fixtures/openssl-client-hello.bin");
        assert_eq!(name_of(wire).as_deref(), Some("shop.example.com"));
        for cut in 0..wire.len() {
            assert_eq!(parse(&wire[..cut]), Ok(Step::Incomplete), "{cut}");
        }
    }

    #[test]
    fn no_name_ip_literals_and_no_extensions() {
        assert_eq!(name_of(&records(&hello_body(&[]), 16384)), None);
        let ip = hello_body(&[sni_ext(b"192.0.2.1")]);
        assert_eq!(name_of(&records(&ip, 16384)), None);
        // No extensions block at all.
        let mut bare = hello_body(&[]);
        bare.truncate(bare.len() - 2);
        let body = (bare.len() - 4) as u32;
        bare[1..4].copy_from_slice(&body.to_be_bytes()[1..]);
        assert_eq!(name_of(&records(&bare, 16384)), None);
    }

    #[test]
    fn not_tls_too_large_and_malformed_are_refused() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(SniError::NotHandshake));
        assert_eq!(parse(b"PROXY TCP4"), Err(SniError::NotHandshake));
        assert_eq!(parse(&[22, 2]), Err(SniError::NotHandshake));
        assert_eq!(parse(&[22]), Ok(Step::Incomplete));
        assert_eq!(parse(&[]), Ok(Step::Incomplete));
        // A ServerHello (2), not a ClientHello.
        assert_eq!(
            parse(&[22, 3, 3, 0, 4, 2, 0, 0, 0]),
            Err(SniError::NotClientHello)
        );
        // A handshake that says it is larger than 16 KiB.
        assert_eq!(
            parse(&[22, 3, 1, 0, 4, 1, 0, 0x40, 0]),
            Err(SniError::TooLarge)
        );
        // Records that would pass 16 KiB before the hello ends.
        // (16,265 bytes of handshake: under the cap alone, over it with 163 record headers.)
        let big = hello_body(&[(0xAAAA, vec![0; 16180])]);
        assert_eq!(big.len(), 16265);
        assert!(matches!(
            parse(&records(&big, 16384)),
            Ok(Step::Done { .. })
        ));
        assert_eq!(parse(&records(&big, 100)), Err(SniError::TooLarge));
        // The server_name extension twice.
        let twice = hello_body(&[sni_ext(b"a.test"), sni_ext(b"b.test")]);
        assert_eq!(parse(&records(&twice, 16384)), Err(SniError::Malformed));
        // A length that points past the end.
        let mut bad = hello_body(&[sni_ext(b"a.test")]);
        let n = bad.len();
        bad[n - 7] = 0xFF;
        assert_eq!(parse(&records(&bad, 16384)), Err(SniError::Malformed));
        // Empty record.
        assert_eq!(parse(&[22, 3, 1, 0, 0]), Err(SniError::Malformed));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let seed = records(
            &hello_body(&[sni_ext(b"a.example.com"), (10, vec![0, 2, 0, 29])]),
            50,
        );
        for round in 0..20_000 {
            let mut buf = seed.clone();
            for _ in 0..(next() % 4) {
                let i = (next() as usize) % buf.len();
                buf[i] = next() as u8;
            }
            buf.truncate((next() as usize) % (buf.len() + 1));
            if round % 5 == 0 {
                buf = (0..next() % 300).map(|_| next() as u8).collect();
                if round % 10 == 0 && !buf.is_empty() {
                    buf[0] = 22;
                }
            }
            if let Ok(Step::Done { len, name }) = parse(&buf) {
                assert!(len <= buf.len() && len <= MAX_HELLO);
                if let Some(n) = name {
                    assert_eq!(normalize(n.as_str().as_bytes()), Some(n), "idempotent");
                }
            }
        }
    }
}
