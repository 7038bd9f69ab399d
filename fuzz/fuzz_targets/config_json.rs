//! Plugin configuration parse on structured input: JSON documents shaped like the schema
//! (every key of DESIGN section 6, values of the right type most of the time, secrets,
//! environment variable names, addresses, weights, edge numbers), so the checks of phase 2
//! are reached, not only serde's.
//!
//! Invariants: as for `config` (deterministic; errors one line, no secret; a parsed
//! config keeps the rules; `Debug` shows no secret).
#![no_main]

#[path = "../common/config.rs"]
mod config;

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};

type R<T> = arbitrary::Result<T>;

fn any(u: &mut Unstructured<'_>, depth: u32) -> R<Value> {
    Ok(match u.int_in_range(0..=7)? {
        0 => Value::Null,
        1 => Value::Bool(u.arbitrary()?),
        2 => Value::from(u.arbitrary::<i64>()?),
        3 => serde_json::Number::from_f64(u.arbitrary()?).map_or(Value::Null, Value::Number),
        4 => Value::from(u.arbitrary::<String>()?),
        5 => Value::from(*u.choose(config::SECRETS)?),
        6 if depth < 3 => Value::Array(vec![any(u, depth + 1)?, any(u, depth + 1)?]),
        _ if depth < 3 => {
            let mut m = Map::new();
            m.insert(u.arbitrary()?, any(u, depth + 1)?);
            Value::Object(m)
        }
        _ => Value::Null,
    })
}

/// `good` most of the time, else anything.
fn or_any(u: &mut Unstructured<'_>, good: Value) -> R<Value> {
    if u.ratio(5, 6)? {
        Ok(good)
    } else {
        any(u, 0)
    }
}

fn small_uint(u: &mut Unstructured<'_>) -> R<Value> {
    Ok(match u.int_in_range(0..=5)? {
        0 => Value::from(0),
        1 => Value::from(1),
        2 => Value::from(u.int_in_range(0..=20)?),
        3 => Value::from(u32::MAX),
        4 => Value::from(u64::from(u32::MAX) + 1),
        _ => Value::from(-1),
    })
}

fn pick(u: &mut Unstructured<'_>, options: &[&str]) -> R<Value> {
    if u.ratio(7, 8)? {
        Ok(Value::from(*u.choose(options)?))
    } else {
        Ok(Value::from(u.arbitrary::<String>()?))
    }
}

/// Adds `key` with a value from `f` half of the time (or always when `always`).
fn maybe(
    u: &mut Unstructured<'_>,
    m: &mut Map<String, Value>,
    key: &str,
    always: bool,
    f: impl FnOnce(&mut Unstructured<'_>) -> R<Value>,
) -> R<()> {
    if always || u.arbitrary()? {
        let v = f(u)?;
        m.insert(key.to_string(), v);
    }
    Ok(())
}

fn secret_fields(u: &mut Unstructured<'_>, m: &mut Map<String, Value>) -> R<()> {
    match u.int_in_range(0..=3)? {
        0 => {
            m.insert("secret_base64".into(), pick(u, config::SECRETS)?);
        }
        1 => {
            m.insert(
                "secret_env".into(),
                pick(u, &["SA_TOKEN_KEY_K1", "SA_TICKET_KEY", "SA_KEY_K0", "SA_BAD", "NOPE"])?,
            );
        }
        2 => {
            m.insert("secret_base64".into(), pick(u, config::SECRETS)?);
            m.insert("secret_env".into(), Value::from("SA_KEY_K0"));
        }
        _ => {}
    }
    Ok(())
}

fn token(u: &mut Unstructured<'_>) -> R<Value> {
    let mut t = Map::new();
    maybe(u, &mut t, "sources", false, |u| {
        let n = u.int_in_range(0..=3)?;
        let mut list = Vec::new();
        for _ in 0..n {
            let mut s = Map::new();
            maybe(u, &mut s, "header", false, |u| {
                pick(u, &["x-session-token", "Authorization", "bad header", ":path", ""])
            })?;
            maybe(u, &mut s, "cookie", false, |u| pick(u, &["session_token", "sa;ticket", ""]))?;
            maybe(u, &mut s, "prefix", false, |u| pick(u, &["Bearer ", "", "\u{1}"]))?;
            maybe(u, &mut s, "unsigned", false, |u| Ok(Value::Bool(u.arbitrary()?)))?;
            list.push(or_any(u, Value::Object(s))?);
        }
        Ok(Value::Array(list))
    })?;
    maybe(u, &mut t, "keys", true, |u| {
        let n = u.int_in_range(0..=3)?;
        let mut list = Vec::new();
        for _ in 0..n {
            let mut k = Map::new();
            maybe(u, &mut k, "kid", false, |u| pick(u, &["k1", "k2", ""]))?;
            maybe(u, &mut k, "alg", true, |u| pick(u, &["HS256", "HS384", "HS512", "none"]))?;
            secret_fields(u, &mut k)?;
            list.push(or_any(u, Value::Object(k))?);
        }
        Ok(Value::Array(list))
    })?;
    maybe(u, &mut t, "issuer", false, |u| pick(u, &["https://auth.example"]))?;
    maybe(u, &mut t, "audience", false, |u| pick(u, &["chat"]))?;
    maybe(u, &mut t, "session_claim", false, |u| pick(u, &["sid", ""]))?;
    maybe(u, &mut t, "leeway_seconds", false, small_uint)?;
    maybe(u, &mut t, "require_exp", false, |u| Ok(Value::Bool(u.arbitrary()?)))?;
    maybe(u, &mut t, "max_token_bytes", false, small_uint)?;
    or_any(u, Value::Object(t))
}

fn upstream(u: &mut Unstructured<'_>) -> R<Value> {
    let mut m = Map::new();
    maybe(u, &mut m, "override_header", false, |u| {
        pick(u, &["x-gateway-destination-endpoint", "X-Dest", "x-session-id", ":authority", "bad name"])
    })?;
    maybe(u, &mut m, "fallbacks", false, small_uint)?;
    if u.ratio(2, 3)? {
        maybe(u, &mut m, "hosts", true, |u| {
            let n = u.int_in_range(0..=4)?;
            let mut list = Vec::new();
            for _ in 0..n {
                let mut h = Map::new();
                maybe(u, &mut h, "address", true, |u| {
                    pick(
                        u,
                        &[
                            "127.0.0.1:8001",
                            "127.0.0.1:8002",
                            "[::1]:8001",
                            "[2001:DB8::1]:80",
                            "localhost:80",
                            "1.2.3.4",
                            "[fe80::1%2]:80",
                        ],
                    )
                })?;
                maybe(u, &mut h, "weight", false, small_uint)?;
                maybe(u, &mut h, "key", false, |u| pick(u, &["node-a", "node-b", "", "127.0.0.1:8001"]))?;
                list.push(or_any(u, Value::Object(h))?);
            }
            Ok(Value::Array(list))
        })?;
    }
    if u.ratio(1, 2)? {
        maybe(u, &mut m, "discovery", true, |u| {
            let mut d = Map::new();
            maybe(u, &mut d, "admin_cluster", true, |u| pick(u, &["envoy_admin", ""]))?;
            maybe(u, &mut d, "cluster", true, |u| pick(u, &["chat_nodes", ""]))?;
            maybe(u, &mut d, "refresh_ms", false, small_uint)?;
            maybe(u, &mut d, "timeout_ms", false, small_uint)?;
            maybe(u, &mut d, "startup_wait_ms", false, |u| {
                Ok(match u.int_in_range(0..=3)? {
                    0 => Value::from(60_000),
                    1 => Value::from(60_001),
                    _ => small_uint(u)?,
                })
            })?;
            or_any(u, Value::Object(d))
        })?;
    }
    or_any(u, Value::Object(m))
}

fn document(u: &mut Unstructured<'_>) -> R<Value> {
    let mut top = Map::new();
    let always = u.ratio(9, 10)?;
    maybe(u, &mut top, "token", always, token)?;
    maybe(u, &mut top, "on_missing", false, |u| pick(u, &["mint", "reject", "pass", "client_address", "allow"]))?;
    maybe(u, &mut top, "on_invalid", false, |u| pick(u, &["mint", "reject", "pass", "client_address"]))?;
    maybe(u, &mut top, "mint", false, |u| {
        let mut m = Map::new();
        maybe(u, &mut m, "ttl_seconds", false, small_uint)?;
        maybe(u, &mut m, "cookie", false, |u| pick(u, &["session_token", "bad cookie"]))?;
        or_any(u, Value::Object(m))
    })?;
    maybe(u, &mut top, "ticket", false, |u| {
        let mut m = Map::new();
        secret_fields(u, &mut m)?;
        maybe(u, &mut m, "cookie", false, |u| pick(u, &["sa_ticket", "a=b"]))?;
        maybe(u, &mut m, "ttl_seconds", false, small_uint)?;
        or_any(u, Value::Object(m))
    })?;
    maybe(u, &mut top, "mode", false, |u| pick(u, &["pinned", "rendezvous", "sticky"]))?;
    let always = u.ratio(9, 10)?;
    maybe(u, &mut top, "upstream", always, upstream)?;
    maybe(u, &mut top, "metrics", false, |u| {
        let mut m = Map::new();
        maybe(u, &mut m, "flush_ms", false, small_uint)?;
        or_any(u, Value::Object(m))
    })?;
    if u.ratio(1, 20)? {
        top.insert(u.arbitrary()?, any(u, 0)?);
    }
    Ok(Value::Object(top))
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(doc) = document(&mut u) else { return };
    let pretty: bool = u.arbitrary().unwrap_or(false);
    let bytes = if pretty { serde_json::to_vec_pretty(&doc).unwrap() } else { serde_json::to_vec(&doc).unwrap() };
    config::check(&bytes);
});
