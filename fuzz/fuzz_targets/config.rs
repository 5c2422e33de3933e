//! `mesh.toml` text -> `Config::parse` (serde mirror + validation). Invariants: no panic;
//! an error is one line that names the file (and, for a position, `FILE:LINE:COL: `).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use meshd::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(Path::new("mesh.toml"), text) {
        Ok(c) => {
            // What validation lets through holds its own invariants.
            let mut names: Vec<&str> = c.services.iter().map(|s| s.name.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            assert_eq!(
                names.len(),
                c.services.len(),
                "duplicate service names accepted"
            );
            for s in &c.services {
                assert!(!s.connect_timeout.is_zero());
                assert!(s.backends.iter().all(|b| b.weight <= 1000));
            }
        }
        Err(e) => {
            let line = e.to_string();
            assert!(!line.contains('\n'), "error is not one line: {line:?}");
            assert!(
                line.starts_with("mesh.toml"),
                "error does not name the file: {line:?}"
            );
            if let Some((l, c)) = e.line_col() {
                assert!(l >= 1 && c >= 1);
                let prefix = format!("mesh.toml:{l}:{c}: ");
                assert!(line.starts_with(&prefix), "{line:?} vs line_col {l}:{c}");
            }
        }
    }
});
