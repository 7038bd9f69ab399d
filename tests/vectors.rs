//! The shared test vectors (`tests/vectors/`, byte-identical copies of the project's
//! reference vectors): every build must reproduce every case.

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use serde_json::Value;
use session_affinity::affinity::{self, Plain};
use session_affinity::config::Config;
use session_affinity::hosts::{HostSet, HostSpec};

fn load(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// Builds the plugin configuration the token vectors describe.
fn token_config(v: &Value) -> Config {
    let s = &v["settings"];
    let json = serde_json::json!({
        "token": {
            "keys": v["keys"],
            "issuer": s["issuer"],
            "audience": s["audience"],
            "leeway_seconds": s["leeway_seconds"],
            "session_claim": s["session_claim"],
            "require_exp": s["require_exp"],
            "max_token_bytes": s["max_token_bytes"],
        },
        "upstream": {"hosts": [{"address": "127.0.0.1:8001"}]},
    });
    Config::parse(json.to_string().as_bytes(), &|_| None).unwrap()
}

#[test]
fn tokens_json_every_case() {
    let v = load("tokens.json");
    let cfg = token_config(&v);
    let now = v["now"].as_i64().unwrap();
    let cases = v["cases"].as_array().unwrap();
    assert!(cases.len() >= 20, "vectors look truncated");
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let token = case["token"].as_str().unwrap();
        let got = cfg.validator.validate(token.as_bytes(), now);
        if case["valid"].as_bool().unwrap() {
            let valid = got.unwrap_or_else(|e| panic!("{name}: rejected as {e}"));
            assert_eq!(valid.session, case["session"].as_str().unwrap(), "{name}");
        } else {
            let want = case["reason"].as_str().unwrap();
            match got {
                Ok(v) => panic!("{name}: accepted (session {:?}), want {want}", v.session),
                Err(e) => assert_eq!(e.reason(), want, "{name}"),
            }
        }
    }
}

fn host_set(v: &Value, name: &str) -> (HostSet, Vec<Plain>) {
    let list = v["host_sets"][name].as_array().unwrap();
    let specs: Vec<HostSpec> = list
        .iter()
        .map(|h| {
            let a = h["address"].as_str().unwrap().to_string();
            HostSpec { key: a.clone(), address: a, weight: h["weight"].as_u64().unwrap() as u32, draining: false }
        })
        .collect();
    let plain = specs.iter().map(|s| Plain::new(&s.key, s.weight)).collect();
    (HostSet::new(specs).unwrap(), plain)
}

#[test]
fn affinity_json_every_ranking() {
    let v = load("affinity.json");
    let cases = v["cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        let set_name = case["host_set"].as_str().unwrap();
        let session = case["session"].as_str().unwrap();
        let want: Vec<&str> = case["ranking"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
        let (set, plain) = host_set(&v, set_name);

        // The reference form over the configuration's order...
        let ranked: Vec<&str> =
            affinity::rank(session.as_bytes(), &plain).into_iter().map(|i| plain[i].key.as_str()).collect();
        assert_eq!(ranked, want, "rank: {set_name} / {session:?}");
        // ...the host set's full ranking...
        let full: Vec<&str> =
            set.rank(session.as_bytes()).into_iter().map(|i| set.hosts()[i].address.as_str()).collect();
        assert_eq!(full, want, "HostSet::rank: {set_name} / {session:?}");
        // ...and the request path's top-k, for every k.
        let mut out = Vec::new();
        for k in 1..=want.len() {
            set.top_k(affinity::h64(session.as_bytes()), k, &mut out);
            let got: Vec<&str> = out.iter().map(|i| set.hosts()[*i].address.as_str()).collect();
            assert_eq!(got, want[..k], "top_k {k}: {set_name} / {session:?}");
        }
    }
}

#[test]
fn affinity_steps_intermediate_values() {
    let steps = load("affinity-steps.json");
    for s in steps.as_array().unwrap() {
        let session = s["session"].as_str().unwrap();
        let host = s["host"].as_str().unwrap();
        let hs = affinity::h64(session.as_bytes());
        let hh = affinity::h64(host.as_bytes());
        assert_eq!(format!("{hs:016x}"), s["h64_session"].as_str().unwrap());
        assert_eq!(format!("{hh:016x}"), s["h64_host"].as_str().unwrap());
        let m = affinity::mix(hs, hh);
        assert_eq!(format!("{m:016x}"), s["mix"].as_str().unwrap());
        let score = affinity::score(s["weight"].as_u64().unwrap() as u32, m);
        let want = s["score"].as_f64().unwrap();
        assert!((score - want).abs() <= want.abs() * 1e-15, "{session}/{host}: {score} vs {want}");
    }
}
