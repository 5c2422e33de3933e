//! A connection's first bytes -> `proxy::sni::parse` (the ClientHello's server name). The
//! first byte picks split points; the rest is the input. Invariants: no panic; a complete
//! hello is at most 16 KiB of records and never more than was given; the verdict does not
//! depend on how the bytes arrived (piecewise equals whole); a
//! name found is normalised already (`normalize` is idempotent) and matches itself and
//! its one-label wildcard.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshd::proxy::sni::{matches, normalize, parse, Step, MAX_HELLO};

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
});
