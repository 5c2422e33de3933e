//! Swarm service labels -> `labels::parse` -> `labels::services`. The input is lines of
//! `key=value`. Invariants: no panic; every produced service has a valid name and at least
//! one listen address.
#![no_main]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use meshd::config::{Config, ServiceConfig};
use meshd::discovery::docker::labels;

fn defaults() -> &'static ServiceConfig {
    static D: OnceLock<ServiceConfig> = OnceLock::new();
    D.get_or_init(|| {
        Config::parse(Path::new("mesh.toml"), "[discovery.docker]\n")
            .expect("a valid config")
            .defaults
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let map: BTreeMap<String, String> = text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let Ok(Some(parsed)) = labels::parse("svc", &map) else {
        return;
    };
    if let Ok(services) = labels::services("svc", &parsed, defaults()) {
        for s in services {
            assert!(!s.config.name.is_empty());
            assert!(!s.config.listen.is_empty(), "{s:?}");
        }
    }
});
