//! Session token claims, past the signature: header and payload JSON (structured or raw
//! bytes) signed with one of the configured keys, validated at an arbitrary time.
//!
//! Invariants: a token signed with the key its header names (or the only key of its
//! algorithm) never fails `bad_signature`; a success agrees with an independent reading
//! of the claims (serde_json): session, `exp`, `nbf`, `iss`, `aud`; the memoized path
//! agrees with full validation.
#![no_main]

#[path = "../common/mod.rs"]
mod common;

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};
use session_affinity::jws;
use session_affinity::token::TokenError;

/// A JSON value biased towards the names and values the validator looks at.
#[derive(Debug)]
struct J(Value);

const NAMES: &[&str] = &["alg", "kid", "crit", "typ", "sid", "exp", "nbf", "iat", "iss", "aud", "x"];
const STRINGS: &[&str] = &[
    "HS256",
    "HS384",
    "HS512",
    "none",
    "RS256",
    "k1",
    "k2",
    "k3",
    "https://auth.example",
    "chat",
    "",
    "s",
    "a\u{0}b",
    "会话",
];

fn value(u: &mut Unstructured<'_>, depth: u32) -> arbitrary::Result<Value> {
    Ok(match u.int_in_range(0..=9)? {
        0 => Value::Null,
        1 => Value::Bool(u.arbitrary()?),
        2 => Value::from(common::NOW + i64::from(u.arbitrary::<i16>()?)),
        3 => Value::from(u.arbitrary::<i64>()?),
        4 => serde_json::Number::from_f64(u.arbitrary()?).map_or(Value::Null, Value::Number),
        5 => Value::from(*u.choose(STRINGS)?),
        6 => Value::from(u.arbitrary::<String>()?),
        7 | 8 if depth < 4 => {
            let n = u.int_in_range(0..=4)?;
            let mut items = Vec::new();
            for _ in 0..n {
                items.push(value(u, depth + 1)?);
            }
            Value::Array(items)
        }
        _ if depth < 4 => Value::Object(object(u, depth + 1)?),
        _ => Value::from(*u.choose(STRINGS)?),
    })
}

fn object(u: &mut Unstructured<'_>, depth: u32) -> arbitrary::Result<Map<String, Value>> {
    let mut m = Map::new();
    let n = u.int_in_range(0..=7)?;
    for _ in 0..n {
        let name = if u.ratio(7, 8)? { (*u.choose(NAMES)?).to_string() } else { u.arbitrary()? };
        m.insert(name, value(u, depth)?);
    }
    Ok(m)
}

impl<'a> Arbitrary<'a> for J {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<J> {
        Ok(J(Value::Object(object(u, 0)?)))
    }
}

#[derive(Debug, Arbitrary)]
enum Doc {
    Structured(J),
    Raw(Vec<u8>),
}

impl Doc {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Doc::Structured(J(v)) => serde_json::to_vec(v).unwrap(),
            Doc::Raw(b) => b.clone(),
        }
    }
}

#[derive(Debug, Arbitrary)]
struct Input {
    key: u8,
    header: Doc,
    payload: Doc,
    now_offset: i32,
}

fuzz_target!(|input: Input| {
    let cfg = common::vectors_config();
    let keys = common::vector_keys();
    let (kid, alg, mac) = &keys[usize::from(input.key) % keys.len()];
    let header = input.header.bytes();
    let payload = input.payload.bytes();
    let token = jws::sign(mac, &header, &payload);
    let now = common::NOW + i64::from(input.now_offset);

    let got = common::assert_memo_agrees(cfg, token.as_bytes(), now, 7);
    let h: Option<Value> = serde_json::from_slice(&header).ok();
    let claims_our_key = h.as_ref().is_some_and(|h| {
        h.get("alg").and_then(Value::as_str) == Some(alg.name())
            && match h.get("kid") {
                None => true,
                Some(k) => k.as_str() == Some(kid.as_str()),
            }
    });
    if claims_our_key {
        assert_ne!(got, Err(TokenError::BadSignature), "signed with the key the header names");
        assert_ne!(got, Err(TokenError::UnknownKey));
    }
    if let Ok(valid) = &got {
        common::assert_valid_shape(cfg, token.as_bytes(), valid, now);
        let p: Value = serde_json::from_slice(&payload).expect("accepted payload is JSON");
        assert_eq!(p.get("sid").and_then(Value::as_str), Some(valid.session.as_str()));
        assert_eq!(p.get("exp").and_then(Value::as_f64), valid.exp);
        assert_eq!(p.get("nbf").and_then(Value::as_f64), valid.nbf);
        assert_eq!(p.get("iss").and_then(Value::as_str), Some("https://auth.example"));
        let aud_ok = match p.get("aud") {
            Some(Value::String(a)) => a == "chat",
            Some(Value::Array(a)) => a.iter().any(|x| x.as_str() == Some("chat")),
            _ => false,
        };
        assert!(aud_ok, "aud {:?}", p.get("aud"));
        // Both are JSON (RFC 8259: UTF-8 throughout, also in members nobody reads).
        assert!(h.is_some_and(|h| h.is_object() && h.get("crit").is_none()), "accepted header is not JSON");
    }
});
