//! A connection's first bytes -> `proxy::sni::parse` (the ClientHello's server name), with
//! rustls's `server::Acceptor` as a differential oracle. The first byte picks split points;
//! the rest is the input. Invariants: no panic; a complete hello is at most 16 KiB of
//! records and never more than was given; the verdict does not depend on how the bytes
//! arrived (piecewise equals whole); a name found is normalised already (`normalize` is
//! idempotent) and matches itself and its one-label wildcard.
//!
//! Against rustls, fed the same bytes the way a server feeds it (`read_tls`, then
//! `accept`, until the input is used up; docs/fuzzing.md says why only these):
//! - both have a whole ClientHello: meshd's name is rustls's `server_name()` after
//!   `normalize` (`None` on both sides when rustls saw no name or an IP literal);
//! - rustls has a whole ClientHello: meshd is not still waiting for more bytes;
//! - meshd has a whole ClientHello: rustls is not still waiting for more bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshd::proxy::sni::{matches, normalize, parse, Name, Step, MAX_HELLO};

/// What rustls makes of `input`: `Some(Ok(name))` a ClientHello it accepts, `Some(Err)` one
/// it refuses (or bytes it cannot read), `None` it wants more bytes.
fn rustls_verdict(input: &[u8]) -> Option<Result<Option<String>, ()>> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rd = input;
    loop {
        match acceptor.read_tls(&mut rd) {
            Ok(_) => {}
            Err(_) => return Some(Err(())),
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                return Some(Ok(accepted.client_hello().server_name().map(str::to_owned)))
            }
            Ok(None) if rd.is_empty() => return None,
            Ok(None) => {}
            Err(_) => return Some(Err(())),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, input)) = data.split_first() else {
        return;
    };
    let whole = parse(input);
    if let Ok(Step::Done { len, name }) = whole {
        assert!(len <= input.len() && len <= MAX_HELLO);
        if let Some(n) = name {
            assert_eq!(normalize(n.as_str().as_bytes()), Some(n));
            assert!(matches(n.as_str(), n.as_str()));
            if let Some((_, parent)) = n.as_str().split_once('.') {
                assert!(matches(&format!("*.{parent}"), n.as_str()));
            }
        }
    }
    let chunk = 1 + usize::from(split) * 8;
    let mut have = 0;
    let piecewise = loop {
        match parse(&input[..have]) {
            Ok(Step::Incomplete) if have < input.len() => have = (have + chunk).min(input.len()),
            other => break other,
        }
    };
    assert_eq!(whole, piecewise);

    // The oracle.
    let theirs = rustls_verdict(input);
    match (&whole, &theirs) {
        (Ok(Step::Done { name, .. }), Some(Ok(server_name))) => {
            let want: Option<Name> = server_name.as_deref().and_then(|s| normalize(s.as_bytes()));
            assert_eq!(*name, want, "rustls server_name {server_name:?}");
        }
        (Ok(Step::Incomplete), Some(Ok(server_name))) => {
            panic!("rustls accepted a whole ClientHello ({server_name:?}), meshd waits for more")
        }
        (Ok(Step::Done { name, len }), None) => {
            panic!("meshd has a whole ClientHello ({name:?}, {len} bytes), rustls waits for more")
        }
        _ => {}
    }
});
