//! Plugin configuration parse on arbitrary bytes (with a dictionary of the schema's keys,
//! see scripts/fuzz.sh), in the VM environment of the reference config.
//!
//! Invariants: parsing is deterministic; an error is one line and never shows a secret;
//! a configuration that parses keeps every rule of DESIGN section 6 and its `Debug`
//! shows no secret. Also the error-path helper `json_path_at` on any position.
#![no_main]

#[path = "../common/config.rs"]
mod config;

use libfuzzer_sys::fuzz_target;
use session_affinity::config::json_path_at;

fuzz_target!(|data: &[u8]| {
    config::check(data);
    // The error-path helper must survive any position serde_json could report.
    if data.len() >= 2 {
        let line = usize::from(data[0] % 8) + 1;
        let column = usize::from(data[1]) * 7;
        let _ = json_path_at(data, line, column);
        let _ = json_path_at(data, usize::MAX, usize::MAX);
    }
});
