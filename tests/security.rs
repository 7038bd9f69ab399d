//! Native tests for docs/security.md: the key rotation procedure, a ticket key change,
//! and secrets in `Debug` output.

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::{json, Value};
use session_affinity::config::{Config, Hosts};
use session_affinity::decision::{decide, Given, Scratch, Verdict};
use session_affinity::headers::Header;
use session_affinity::token::TokenError;

const OLD: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const NEW: &str = "ZHyFaEazbRm+DDoK9WnS0KR5CpfWH4fC5OOVI3Bh6os=";
const TICKET_A: &str = "nBYDAVya04QtPEYa03ebldmm+FIHyQfCwF2oLr3ILHc=";
const TICKET_B: &str = "BwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyAhIiMkJSYnKCkqKywtLi8wMTIzNDU2Nzg5Ojs8PT4/QEFCQ0RFRg==";
const NOW: i64 = 1_790_000_000;

fn config(keys: Value, ticket_key: &str) -> Config {
    let doc = json!({
        "token": {"keys": keys},
        "ticket": {"secret_base64": ticket_key},
        "upstream": {"hosts": [{"address": "127.0.0.1:8001"}, {"address": "127.0.0.1:8002"},
                               {"address": "127.0.0.1:8003"}]},
    });
    Config::parse(doc.to_string().as_bytes(), &|_| None).unwrap()
}

fn key(kid: &str, secret: &str) -> Value {
    json!({"kid": kid, "alg": "HS256", "secret_base64": secret})
}

fn mint(cfg: &Config, sid: &str) -> String {
    cfg.validator.mint(sid, NOW, 3600).unwrap()
}

fn kid_of(token: &str) -> String {
    let header = session_affinity::jws::split(token.as_bytes()).unwrap().header;
    serde_json::from_slice::<Value>(&header).unwrap()["kid"].as_str().unwrap().to_string()
}

/// docs/security.md "Token keys": add the new key after the old one, then move it first,
/// then remove the old one. At no step does a valid session lose its token.
#[test]
fn token_key_rotation_procedure() {
    let step0 = config(json!([key("k-old", OLD)]), TICKET_A);
    let step1 = config(json!([key("k-old", OLD), key("k-new", NEW)]), TICKET_A);
    let step2 = config(json!([key("k-new", NEW), key("k-old", OLD)]), TICKET_A);
    let step3 = config(json!([key("k-new", NEW)]), TICKET_A);

    let old_token = mint(&step0, "before-rotation");
    assert_eq!(kid_of(&old_token), "k-old");
    // Step 1 (deployed everywhere before step 2): still signs with the old key, accepts
    // both; a replica still at step 0 accepts everything step 1 mints.
    let t1 = mint(&step1, "during-1");
    assert_eq!(kid_of(&t1), "k-old");
    assert!(step0.validator.validate(t1.as_bytes(), NOW).is_ok());
    assert!(step1.validator.validate(old_token.as_bytes(), NOW).is_ok());
    // Step 2: signs with the new key; replicas at step 1 accept it; old tokens still pass.
    let t2 = mint(&step2, "during-2");
    assert_eq!(kid_of(&t2), "k-new");
    assert!(step1.validator.validate(t2.as_bytes(), NOW).is_ok());
    assert!(step2.validator.validate(old_token.as_bytes(), NOW).is_ok());
    // Step 3, once every old token has expired: the old kid is unknown.
    assert!(step3.validator.validate(t2.as_bytes(), NOW).is_ok());
    assert_eq!(step3.validator.validate(old_token.as_bytes(), NOW).err(), Some(TokenError::UnknownKey));
    // Skipping step 1 is what breaks: a replica still at step 0 refuses step 2's tokens.
    assert_eq!(step0.validator.validate(t2.as_bytes(), NOW).err(), Some(TokenError::UnknownKey));
}

fn route(cfg: &Config, token: &str, ticket: Option<&str>) -> (String, String, Option<String>) {
    let Hosts::Static(set) = &cfg.hosts else { panic!("static") };
    let mut h: Vec<Header<'_>> = vec![(b"x-session-token", token.as_bytes())];
    if let Some(t) = ticket {
        h.push((b"x-session-ticket", t.as_bytes()));
    }
    let mut scratch = Scratch::new(3);
    let d = decide(cfg, &h, set, NOW, &mut Given::default(), &mut scratch);
    let Verdict::Forward { set: hs, .. } = d.verdict else { panic!("forward expected") };
    let get = |n: &str| hs.iter().find(|(k, _)| *k == n).map(|(_, v)| v.clone());
    let node = get("x-gateway-destination-endpoint").unwrap().split(',').next().unwrap().to_string();
    (node, get("x-session-affinity").unwrap(), get("x-session-previous-node"))
}

/// docs/security.md "Ticket key": a new ticket key makes every old ticket unusable, so a
/// pinned session falls back to its ranking (a session pinned away from its ranking's
/// first node moves once); nothing else breaks.
#[test]
fn ticket_key_change_falls_back_to_the_ranking() {
    let a = config(json!([key("k1", OLD)]), TICKET_A);
    let b = config(json!([key("k1", OLD)]), TICKET_B);
    let Hosts::Static(set) = &a.hosts else { panic!("static") };
    let tok = mint(&a, "pinned-session");
    let ranking = set.rank(b"pinned-session");
    // A ticket pinning the session to its ranking's second node (it was moved there).
    let second = &set.hosts()[ranking[1]];
    let ticket = a.ticket.as_ref().unwrap().tickets.issue("pinned-session", second.h64, NOW);
    assert_eq!(route(&a, &tok, Some(&ticket)), (second.address.clone(), "sticky".into(), None));
    let first = &set.hosts()[ranking[0]].address;
    let (node, affinity, previous) = route(&b, &tok, Some(&ticket));
    assert_eq!((&node, affinity.as_str(), previous), (first, "new", None));
}

/// Secrets never show in `Debug` (the configuration, keys, tickets) or errors.
#[test]
fn debug_output_shows_no_secret() {
    let cfg = config(json!([key("k-old", OLD), key("k-new", NEW)]), TICKET_A);
    let debug = format!("{cfg:?}");
    for secret in [OLD, NEW, TICKET_A] {
        assert!(!debug.contains(secret.trim_end_matches('=')), "{debug}");
    }
    assert!(debug.contains("<redacted>"));
    let raw_bytes = format!("{:?}", session_affinity::jws::b64_decode(b"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8"));
    assert!(!debug.contains(raw_bytes.trim_start_matches("Some(").trim_end_matches(')')));
}
