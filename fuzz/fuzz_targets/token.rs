//! Session token parse + verify on raw bytes (the whole input is the token), with the
//! vectors' keys and settings at the vectors' `now`.
//!
//! Invariants: `oversized` exactly when longer than `max_token_bytes`; a success has a
//! forwardable session id and unexpired time claims and validates again; the memoized
//! path (`decision::check_token`) agrees with a full validation at every time where the
//! verdict can flip; a minted token for any valid session id validates.
#![no_main]

#[path = "../common/mod.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use session_affinity::token::{self, TokenError};

fuzz_target!(|data: &[u8]| {
    let cfg = common::vectors_config();
    let v = &cfg.validator;
    let got = common::assert_memo_agrees(cfg, data, common::NOW, 0x5eed);
    assert_eq!(data.len() > v.max_token_bytes, got == Err(TokenError::Oversized));
    if let Ok(valid) = &got {
        common::assert_valid_shape(cfg, data, valid, common::NOW);
    }
    // Mint round trip: the input as a session id.
    if let Ok(session) = std::str::from_utf8(data) {
        if token::valid_session_id(session) && session.len() <= 512 {
            let minted = v.mint(session, common::NOW, 600).unwrap();
            let valid = v.validate(minted.as_bytes(), common::NOW).unwrap();
            assert_eq!(valid.session, session);
            assert_eq!(v.validate(minted.as_bytes(), common::NOW + 600 + v.leeway_seconds), Err(TokenError::Expired));
        }
    }
});
