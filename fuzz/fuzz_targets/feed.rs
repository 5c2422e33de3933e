//! The discovery feed's wire format (JSON, from meshd on a manager) ->
//! `WireService::into_config` / `services_from_wire`. Invariants: no panic; what is
//! accepted survives a round trip through the wire format unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshd::discovery::feed::{services_from_wire, WireService};

fuzz_target!(|data: &[u8]| {
    if let Ok(wire) = serde_json::from_slice::<Vec<WireService>>(data) {
        if let Ok((services, _warnings)) = services_from_wire(wire) {
            for s in services {
                let back = WireService::from_config(&s).into_config();
                assert_eq!(back.as_ref(), Ok(&s), "round trip changed {s:?}");
            }
        }
    } else if let Ok(w) = serde_json::from_slice::<WireService>(data) {
        let _ = w.into_config();
    }
});
