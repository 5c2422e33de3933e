//! Bytes from a trusted PROXY sender -> `proxy_header::parse`. The first byte picks split
//! points; the rest is the connection's bytes. Invariants: no panic; a complete header is
//! at least 15 and at most 16 + 4096 bytes; the verdict does not depend on how the bytes
//! arrived (fed piecewise the way `accept_proxy::read` does, as any prefix that the parser
//! calls incomplete and then more, the result equals feeding them whole); and a header
//! that meshd's own encoder writes parses back to its addresses.
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
