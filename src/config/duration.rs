//! Durations as `mesh.toml` writes them: `parse_duration` reads `"250ms"`, `"1m30s"`;
//! `format_duration` writes the shortest exact form. A leaf: `file.rs` (reading values),
//! `validate.rs` and `limits.rs` (messages) use it, and it uses none of them.

use std::time::Duration;

const DURATION_HELP: &str = r#"use a number followed by ms, s, m or h, e.g. "250ms", "2s", "1h""#;

/// Parses `"250ms"`, `"2s"`, `"1.5s"`, `"1m30s"`, `"1h"`, `"100us"`. A unit is required;
/// negative and empty values are rejected. The error is a complete one-line message.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    const NS: [(&str, u128); 5] = [
        ("us", 1_000),
        ("ms", 1_000_000),
        ("s", 1_000_000_000),
        ("m", 60_000_000_000),
        ("h", 3_600_000_000_000),
    ];
    let invalid = || format!("invalid duration {s:?}: {DURATION_HELP}");
    let too_large = || {
        let max_h = u64::MAX as u128 / NS[4].1;
        format!("invalid duration {s:?}: too large, use at most \"{max_h}h\"")
    };
    if s.is_empty() {
        return Err(invalid());
    }
    let mut total: u128 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let is_num = |c: char| c.is_ascii_digit() || c == '.';
        let num_end = rest.find(|c: char| !is_num(c)).unwrap_or(rest.len());
        let (num, tail) = rest.split_at(num_end);
        let unit_end = tail.find(is_num).unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_end);
        rest = tail;

        let unit_ns = NS.iter().find(|(u, _)| *u == unit).ok_or_else(invalid)?.1;
        let (int, frac) = num.split_once('.').unwrap_or((num, ""));
        if int.is_empty() || (num.contains('.') && frac.is_empty()) || frac.contains('.') {
            return Err(invalid());
        }
        let int: u128 = int.parse().map_err(|_| too_large())?;
        // Digits past the 12th are below a nanosecond for every unit: drop them.
        let frac = &frac[..frac.len().min(12)];
        let frac_ns = match frac {
            "" => 0,
            f => f.parse::<u128>().map_err(|_| invalid())? * unit_ns / 10u128.pow(f.len() as u32),
        };
        total = int
            .checked_mul(unit_ns)
            .and_then(|n| n.checked_add(frac_ns))
            .and_then(|n| n.checked_add(total))
            .ok_or_else(too_large)?;
    }
    u64::try_from(total)
        .map(Duration::from_nanos)
        .map_err(|_| too_large())
}

/// `d` the way `mesh.toml` writes it: the largest unit that is exact.
pub fn format_duration(d: Duration) -> String {
    let ns = d.as_nanos();
    let units = [
        ("h", 3_600_000_000_000),
        ("m", 60_000_000_000),
        ("s", 1_000_000_000),
        ("ms", 1_000_000),
    ];
    match units.iter().find(|(_, n)| ns >= *n && ns % n == 0) {
        Some((u, n)) => format!("{}{u}", ns / n),
        None if ns == 0 => "0s".to_owned(),
        None => format!("{}us", ns / 1_000),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let ok = [
            ("250ms", Duration::from_millis(250)),
            ("2s", Duration::from_secs(2)),
            ("0s", Duration::ZERO),
            ("1h", Duration::from_secs(3600)),
            ("5m", Duration::from_secs(300)),
            ("100us", Duration::from_micros(100)),
            ("1m30s", Duration::from_secs(90)),
            ("1h0m1s", Duration::from_secs(3601)),
            ("1.5s", Duration::from_millis(1500)),
            ("0.25ms", Duration::from_micros(250)),
            ("007s", Duration::from_secs(7)),
        ];
        for (s, d) in ok {
            assert_eq!(parse_duration(s), Ok(d), "{s}");
        }
        for s in [
            "",
            "5",
            "0",
            "s",
            "-5s",
            "5 s",
            " 5s",
            "5s ",
            "5parsecs",
            "5 parsecs",
            "1.s",
            ".5s",
            "1..5s",
            "1.2.3s",
            "5ns",
            "5S",
            "1h 30m",
            "5µs",
            "+5s",
        ] {
            let e = parse_duration(s).expect_err(s);
            assert_eq!(e, format!("invalid duration {s:?}: {DURATION_HELP}"));
        }
        assert_eq!(
            parse_duration("5 parsecs").unwrap_err(),
            r#"invalid duration "5 parsecs": use a number followed by ms, s, m or h, e.g. "250ms", "2s", "1h""#
        );
        for s in [
            "99999999999999999999999999999999999999999h",
            "5124096h",
            "6000000h",
        ] {
            let e = parse_duration(s).expect_err(s);
            assert!(e.ends_with(r#"too large, use at most "5124095h""#), "{e}");
        }
        assert!(parse_duration("5124095h").is_ok());
    }

    #[test]
    fn durations_print_as_they_parse() {
        for s in ["0s", "250ms", "2s", "1h", "90s", "100us", "1500ms", "36h"] {
            let d = parse_duration(s).unwrap();
            assert_eq!(format_duration(d), s);
        }
        assert_eq!(format_duration(Duration::from_secs(60)), "1m");
    }
}
