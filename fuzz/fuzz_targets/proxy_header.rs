//! Bytes from a trusted PROXY sender -> `proxy_header::parse`. The first byte picks split
//! points; the rest is the connection's bytes. Invariants: no panic; a complete header is
//! at least 15 and at most 16 + 4096 bytes; the verdict does not depend on how the bytes
//! arrived (fed piecewise the way `accept_proxy::read` does, as any prefix that the parser
//! calls incomplete and then more, the result equals feeding them whole); and a header
//! that meshd's own encoder writes parses back to its addresses.
//!
//! Against the ppp crate (`HeaderResult::parse`, v2 then v1) as a differential oracle
//! (docs/fuzzing.md says why only these): where both have a whole header, they agree on
//! the source and destination (or on there being none: v2 LOCAL, v2 AF_UNSPEC / AF_UNIX,
//! v1 UNKNOWN) and on its length; and where ppp has a whole header, meshd is not still
//! waiting for more bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshd::config::ProxyProtocol;
use meshd::proxy::proxy_header::{parse, Header, HeaderError, Step, V1_MIN, V2_FIXED, V2_MAX_LEN};
use meshd::proxy::proxy_protocol;

fn verdict(buf: &[u8]) -> Result<Option<(Header, usize)>, HeaderError> {
    match parse(buf)? {
        Step::Done { header, len } => Ok(Some((header, len))),
        Step::Incomplete => Ok(None),
    }
}

/// What ppp makes of `buf`, when it is a whole header: what meshd would make of it, and its
/// length.
fn ppp_verdict(buf: &[u8]) -> Option<(Header, usize)> {
    use std::net::SocketAddr;
    match ppp::HeaderResult::parse(buf) {
        ppp::HeaderResult::V1(Ok(h)) => {
            let header = match h.addresses {
                ppp::v1::Addresses::Unknown => Header::Local,
                ppp::v1::Addresses::Tcp4(a) => Header::Proxy {
                    src: SocketAddr::from((a.source_address, a.source_port)),
                    dst: SocketAddr::from((a.destination_address, a.destination_port)),
                },
                ppp::v1::Addresses::Tcp6(a) => Header::Proxy {
                    src: SocketAddr::from((a.source_address, a.source_port)),
                    dst: SocketAddr::from((a.destination_address, a.destination_port)),
                },
            };
            Some((header, h.header.len()))
        }
        ppp::HeaderResult::V2(Ok(h)) => {
            let header = match (h.command, h.addresses) {
                (ppp::v2::Command::Local, _) => Header::Local,
                (_, ppp::v2::Addresses::IPv4(a)) => Header::Proxy {
                    src: SocketAddr::from((a.source_address, a.source_port)),
                    dst: SocketAddr::from((a.destination_address, a.destination_port)),
                },
                (_, ppp::v2::Addresses::IPv6(a)) => Header::Proxy {
                    src: SocketAddr::from((a.source_address, a.source_port)),
                    dst: SocketAddr::from((a.destination_address, a.destination_port)),
                },
                (_, ppp::v2::Addresses::Unspecified | ppp::v2::Addresses::Unix(_)) => Header::Local,
            };
            Some((header, h.len()))
        }
        _ => None,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, input)) = data.split_first() else {
        return;
    };
    let whole = verdict(input);
    if let Ok(Some((_, len))) = whole {
        assert!((V1_MIN..=V2_FIXED + V2_MAX_LEN).contains(&len), "len {len}");
    }
    // Piecewise: chunks of 1 + split % 32 bytes.
    let chunk = 1 + usize::from(split % 32);
    let mut have = 0;
    let piecewise = loop {
        match verdict(&input[..have]) {
            Ok(None) if have < input.len() => have = (have + chunk).min(input.len()),
            other => break other,
        }
    };
    match (&whole, &piecewise) {
        (Ok(Some(w)), Ok(Some(p))) => assert_eq!(w, p),
        (Ok(None), Ok(None)) | (Err(_), Err(_)) => {}
        (w, p) => panic!("whole {w:?}, piecewise {p:?}"),
    }
    // The oracle.
    if let Some(theirs) = ppp_verdict(input) {
        match &whole {
            Ok(Some(ours)) => assert_eq!(*ours, theirs, "meshd vs ppp"),
            Ok(None) => panic!("ppp has a whole header {theirs:?}, meshd waits for more"),
            Err(_) => {} // meshd is stricter (docs/fuzzing.md)
        }
    }
    // Round trip through meshd's encoder, with addresses taken from the input.
    if input.len() >= 12 {
        let b = |i: usize| input[i];
        let src = std::net::SocketAddr::from((
            [b(0), b(1), b(2), b(3)],
            u16::from_be_bytes([b(8), b(9)]),
        ));
        let dst = std::net::SocketAddr::from((
            [b(4), b(5), b(6), b(7)],
            u16::from_be_bytes([b(10), b(11)]),
        ));
        for v in [ProxyProtocol::V1, ProxyProtocol::V2] {
            if let Some(h) = proxy_protocol::encode(v, src, dst) {
                let got = verdict(h.as_bytes());
                assert_eq!(
                    got,
                    Ok(Some((Header::Proxy { src, dst }, h.as_bytes().len())))
                );
            }
        }
    }
});
