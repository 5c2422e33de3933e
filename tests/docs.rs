//! docs/configuration.md is the reference of `mesh.toml`: every key the parser accepts must
//! be documented there, in the section of its table, as a table row `` | `key` | ``, and
//! every complete example in it (a ```toml block) must be a valid configuration.
//!
//! The keys come from the parser itself, not from a list kept here: an unknown key makes
//! serde answer "unknown field `x`, expected one of `a`, `b`, ...", naming every key of that
//! table. A key added to src/config/file.rs without a row in the doc fails this test.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use meshd::config::Config;

const DOC: &str = include_str!("../docs/configuration.md");

/// (what the table is called in the doc's headings, a file whose last table has an unknown
/// key `zz_unknown`). A `[[service]]` key may be documented in the `[[service]]` section
/// or, for the policy keys it shares with `[defaults]`, in that one (its heading says
/// "per-service policy keys").
const TABLES: &[(&str, &str)] = &[
    ("Top-level tables", "zz_unknown = 1\n"),
    ("`[admin]`", "[admin]\nzz_unknown = 1\n"),
    ("`[log]`", "[log]\nzz_unknown = 1\n"),
    ("`[defaults]`", "[defaults]\nzz_unknown = 1\n"),
    ("`[defaults.health]`", "[defaults.health]\nzz_unknown = 1\n"),
    ("`[[service]]`", "[[service]]\nzz_unknown = 1\n"),
    (
        "`[service.health]`",
        "[[service]]\nname = \"web\"\n[service.health]\nzz_unknown = 1\n",
    ),
    (
        "`backends`",
        "[[service]]\nname = \"web\"\nbackends = [{ zz_unknown = 1 }]\n",
    ),
    (
        "`[service.tls]`",
        "[[service]]\nname = \"web\"\n[service.tls]\nzz_unknown = 1\n",
    ),
    ("`[discovery]`", "[discovery]\nzz_unknown = 1\n"),
    (
        "`[discovery.docker]`",
        "[discovery.docker]\nzz_unknown = 1\n",
    ),
    ("`[discovery.dns]`", "[discovery.dns]\nzz_unknown = 1\n"),
    ("`[upgrade]`", "[upgrade]\nzz_unknown = 1\n"),
];

/// The keys serde lists after "expected" for the unknown key in `probe`.
fn keys_of(probe: &str) -> Vec<String> {
    let err = Config::parse(Path::new("mesh.toml"), probe)
        .expect_err(probe)
        .to_string();
    let (_, expected) = err
        .split_once("unknown field `zz_unknown`, expected ")
        .unwrap_or_else(|| panic!("not an unknown-field error: {err}"));
    let keys: Vec<String> = expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect();
    assert!(!keys.is_empty(), "no keys in: {err}");
    keys
}

/// The text of every section whose heading contains `needle`, up to the next heading of
/// the same or a higher level. Lines inside ``` fences are never headings.
fn sections(doc: &str, needle: &str) -> String {
    let mut out = String::new();
    let mut fenced = false;
    let mut open: Option<usize> = None; // level of the section being copied
    for line in doc.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
        }
        let level = (!fenced && line.starts_with('#'))
            .then(|| line.chars().take_while(|&c| c == '#').count());
        if let Some(level) = level {
            if open.is_some_and(|o| level <= o) {
                open = None;
            }
            if open.is_none() && line.contains(needle) {
                open = Some(level);
            }
        }
        if open.is_some() {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[test]
fn every_key_is_documented_in_its_section() {
    let mut missing = Vec::new();
    let mut total = 0;
    for (heading, probe) in TABLES {
        let mut text = sections(DOC, heading);
        if *heading == "`[[service]]`" {
            text += &sections(DOC, "per-service policy keys");
        }
        assert!(
            !text.is_empty(),
            "docs/configuration.md has no heading containing {heading}"
        );
        for key in keys_of(probe) {
            total += 1;
            if !text.contains(&format!("| `{key}` |")) {
                missing.push(format!("{heading}: `{key}`"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "keys mesh.toml accepts but docs/configuration.md does not document \
         (add a row `| `key` | ...` in the section):\n{}",
        missing.join("\n")
    );
    // The probes found the tables' keys (a broken probe would find few).
    assert!(total >= 50, "only {total} keys found");
}

/// The probe really fails on a key the doc lacks (the check is not vacuous).
#[test]
fn a_missing_key_is_noticed() {
    let doc = DOC.replace("| `hedge_delay` |", "| hedge_delay |");
    let text = sections(&doc, "`[defaults]`");
    assert!(keys_of("[defaults]\nzz_unknown = 1\n").contains(&"hedge_delay".to_owned()));
    assert!(!text.contains("| `hedge_delay` |"));
}

/// Every ```toml block of the doc is a whole, valid mesh.toml; a TLS termination example
/// names certificate files that do not exist here, so reading its first one is the only
/// error it may have.
#[test]
fn toml_examples_are_valid() {
    let mut fenced: Option<String> = None;
    let mut n = 0;
    for (i, line) in DOC.lines().enumerate() {
        match (&mut fenced, line) {
            (None, "```toml") => fenced = Some(String::new()),
            (Some(block), "```") => {
                n += 1;
                let terminates = block.contains("mode = \"terminate\"");
                if let Err(e) = Config::parse(Path::new("mesh.toml"), block) {
                    let e = e.to_string();
                    let missing_cert = terminates
                        && e.contains(": tls cert \"/etc/meshd/")
                        && e.contains("cannot read");
                    assert!(
                        missing_cert,
                        "docs/configuration.md, the block ending at line {}: {e}\n{block}",
                        i + 1
                    );
                }
                fenced = None;
            }
            (Some(block), l) => {
                block.push_str(l);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    assert!(n >= 3, "only {n} toml examples");
}
