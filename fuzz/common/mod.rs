//! Shared by the fuzz targets: the fixed configurations they check against (built from
//! `tests/vectors/tokens.json`, so a fuzz target and the vector tests agree on keys and
//! settings) and the invariants several targets assert.
#![allow(dead_code)]

use std::sync::OnceLock;

use serde_json::{json, Value};
use session_affinity::config::Config;
use session_affinity::decision::{self, Scratch};
use session_affinity::jws::{Alg, MacKey};
use session_affinity::token::{self, TokenError};

/// The token vectors' fixed time.
pub const NOW: i64 = 1_790_000_000;

/// The token vectors' keys and settings.
pub fn vectors() -> &'static Value {
    static V: OnceLock<Value> = OnceLock::new();
    V.get_or_init(|| serde_json::from_str(include_str!("../../tests/vectors/tokens.json")).unwrap())
}

/// A configuration with the vectors' keys and settings (issuer, audience, leeway 30,
/// `require_exp`, 4096 bytes), a ticket key and three static hosts.
pub fn vectors_config() -> &'static Config {
    static C: OnceLock<Config> = OnceLock::new();
    C.get_or_init(|| {
        let v = vectors();
        let s = &v["settings"];
        let json = json!({
            "token": {
                "keys": v["keys"],
                "issuer": s["issuer"], "audience": s["audience"],
                "leeway_seconds": s["leeway_seconds"], "session_claim": s["session_claim"],
                "require_exp": s["require_exp"], "max_token_bytes": s["max_token_bytes"],
            },
            "ticket": {"secret_base64": TICKET_KEY_B64},
            "upstream": {"hosts": [{"address": "127.0.0.1:8001"}, {"address": "127.0.0.1:8002"},
                                   {"address": "127.0.0.1:8003"}]},
        });
        Config::parse(json.to_string().as_bytes(), &|_| None).unwrap()
    })
}

pub const TICKET_KEY_B64: &str = "nBYDAVya04QtPEYa03ebldmm+FIHyQfCwF2oLr3ILHc=";

/// A signing key of the vectors: (kid, alg, MAC).
pub fn vector_keys() -> &'static [(String, Alg, MacKey)] {
    static K: OnceLock<Vec<(String, Alg, MacKey)>> = OnceLock::new();
    K.get_or_init(|| {
        vectors()["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| {
                let alg = Alg::from_name(k["alg"].as_str().unwrap()).unwrap();
                let secret = decode_std(k["secret_base64"].as_str().unwrap());
                (k["kid"].as_str().unwrap().to_string(), alg, MacKey::new(alg, &secret).unwrap())
            })
            .collect()
    })
}

/// Standard base64 with padding (test keys only).
pub fn decode_std(s: &str) -> Vec<u8> {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter(|c| *c != b'=') {
        let v = A.iter().position(|a| *a == c).unwrap() as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// Times at which a token's verdict may change: around `exp + leeway` and
/// `nbf - leeway`, plus the extremes.
pub fn boundary_times(exp: Option<f64>, nbf: Option<f64>, leeway: i64) -> Vec<i64> {
    let mut out = vec![i64::MIN, -1, 0, 1, i64::MAX];
    for (t, sign) in [(exp, 1i64), (nbf, -1i64)] {
        if let Some(t) = t {
            let edge = t + (sign * leeway) as f64;
            if edge.is_finite() && edge.abs() < 9.0e18 {
                let e = edge as i64;
                out.extend([e.saturating_sub(1), e, e.saturating_add(1)]);
            }
        }
    }
    out
}

/// The memoized path (`decision::check_token`) gives exactly the verdict of a full
/// validation, cold and warm, at `now` and at every time where the verdict may flip.
/// Returns the full verdict at `now`.
pub fn assert_memo_agrees(cfg: &Config, raw: &[u8], now: i64, seed: u64) -> Result<token::Valid, TokenError> {
    let v = &cfg.validator;
    let full = v.validate(raw, now);
    assert_eq!(full, v.validate(raw, now), "validation is not deterministic");
    let mut scratch = Scratch::new(seed);
    let cold = decision::check_token(cfg, raw, now, &mut scratch);
    assert_eq!(cold.as_ref().map(|f| f.session.clone()), full.as_ref().map(|v| v.session.clone()));
    if let Ok(facts) = &cold {
        assert_eq!(facts.session_h64, session_affinity::affinity::h64(facts.session.as_bytes()));
        // A validate that succeeds implies re-validation at the same time succeeds, from
        // the memo too.
        let warm = decision::check_token(cfg, raw, now, &mut scratch);
        assert_eq!(warm.as_ref().map(|f| &f.session), Ok(&facts.session));
        for t in boundary_times(facts.exp, facts.nbf, v.leeway_seconds) {
            let memo = decision::check_token(cfg, raw, t, &mut scratch).map(|f| f.session);
            let fresh = v.validate(raw, t).map(|v| v.session);
            assert_eq!(memo, fresh, "memo and full validation disagree at t={t}");
        }
    }
    full
}

/// Invariants of any successful validation under the vectors' settings.
pub fn assert_valid_shape(cfg: &Config, raw: &[u8], valid: &token::Valid, now: i64) {
    let v = &cfg.validator;
    assert!(raw.len() <= v.max_token_bytes);
    assert!(token::valid_session_id(&valid.session), "{:?}", valid.session);
    let leeway = v.leeway_seconds as f64;
    match valid.exp {
        Some(exp) => assert!((now as f64) < exp + leeway),
        None => assert!(!v.require_exp),
    }
    if let Some(nbf) = valid.nbf {
        assert!(nbf <= now as f64 + leeway);
    }
}
