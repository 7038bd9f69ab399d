//! Request headers as bytes: the proxy-wasm header-map wire format on arbitrary bytes,
//! and header lists (arbitrary names and values, duplicates, non-UTF-8) through the
//! lookups the filter makes: cookies, the token sources, spoofed-header detection.
//!
//! Invariants: a parsed map re-serializes and parses to itself; every lookup equals a
//! straightforward independent implementation of the documented rule (first header wins,
//! first cookie occurrence wins across `cookie` headers, prefix case-insensitive,
//! spellings in any case with `_` for `-`, the first present source wins whether signed or
//! unsigned, an unsigned session id is 1-256 bytes of 0x21-0x7E); a client-address
//! session id is `addr:` and an IP literal without port or brackets.
#![no_main]

use std::sync::OnceLock;

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use session_affinity::config::Config;
use session_affinity::decision;
use session_affinity::headers::{self, Header};

fn config() -> &'static Config {
    static C: OnceLock<Config> = OnceLock::new();
    C.get_or_init(|| {
        let json = r#"{"token":{"keys":[{"alg":"HS256","secret_base64":"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="}],
            "sources":[{"header":"authorization","prefix":"Bearer "},{"cookie":"session_token"},{"header":"x-session-token","unsigned":true}]},
            "upstream":{"override_header":"x-dest","hosts":[{"address":"127.0.0.1:1"}]}}"#;
        Config::parse(json.as_bytes(), &|_| None).unwrap()
    })
}

const NAMES: &[&[u8]] = &[
    b"cookie",
    b"Cookie",
    b"x-session-token",
    b"authorization",
    b"x-dest",
    b"X_DEST",
    b"x-session-id",
    b"X_Session_ID",
    b"x-session_affinity",
    b"x-session-previous-node",
    b"x-session-idx",
    b"x-session-i\xc4",
];
const PIECES: &[&[u8]] =
    &[b"session_token", b"sa_ticket", b"=", b";", b" ", b"\t", b"\"", b"tok", b"Bearer ", b"bEARER ", b"\xff", b"a=1"];

fn bytes(u: &mut Unstructured<'_>) -> arbitrary::Result<Vec<u8>> {
    let mut out = Vec::new();
    for _ in 0..u.int_in_range(0..=8)? {
        if u.arbitrary()? {
            out.extend_from_slice(u.choose(PIECES)?);
        } else {
            out.extend_from_slice(u.arbitrary::<&[u8]>()?);
        }
    }
    Ok(out)
}

fn list(u: &mut Unstructured<'_>) -> arbitrary::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut out = Vec::new();
    for _ in 0..u.int_in_range(0..=10)? {
        let name = if u.ratio(3, 4)? { u.choose(NAMES)?.to_vec() } else { u.arbitrary::<Vec<u8>>()? };
        out.push((name, bytes(u)?));
    }
    Ok(out)
}

// ---- the independent implementations -------------------------------------------------

fn trim(v: &[u8]) -> &[u8] {
    let s = v.iter().position(|b| *b != b' ' && *b != b'\t').unwrap_or(v.len());
    let e = v.iter().rposition(|b| *b != b' ' && *b != b'\t').map_or(s, |i| i + 1);
    &v[s..e.max(s)]
}

fn first<'a>(h: &[Header<'a>], name: &str) -> Option<&'a [u8]> {
    for (n, v) in h {
        if n.to_ascii_lowercase() == name.as_bytes() {
            return Some(v);
        }
    }
    None
}

fn cookie<'a>(h: &[Header<'a>], name: &str) -> Option<&'a [u8]> {
    for (n, v) in h {
        if !n.eq_ignore_ascii_case(b"cookie") {
            continue;
        }
        for pair in v.split(|b| *b == b';') {
            let pair = trim(pair);
            let Some(eq) = pair.iter().position(|b| *b == b'=') else { continue };
            if trim(&pair[..eq]) == name.as_bytes() && pair[..eq].starts_with(name.as_bytes()) {
                let value = trim(&pair[eq + 1..]);
                return Some(if value.len() >= 2 && value[0] == b'"' && value[value.len() - 1] == b'"' {
                    &value[1..value.len() - 1]
                } else {
                    value
                });
            }
        }
    }
    None
}

/// The first present source: (unsigned, value).
fn token<'a>(h: &[Header<'a>]) -> Option<(bool, &'a [u8])> {
    if let Some(v) = first(h, "authorization") {
        let v = trim(v);
        if v.len() >= 7 && v[..7].eq_ignore_ascii_case(b"Bearer ") {
            return Some((false, trim(&v[7..])));
        }
    }
    if let Some(v) = cookie(h, "session_token") {
        return Some((false, v));
    }
    first(h, "x-session-token").map(|v| (true, trim(v)))
}

fn unsigned_ok(v: &[u8]) -> bool {
    (1..=256).contains(&v.len()) && v.iter().all(|b| (0x21..=0x7e).contains(b))
}

fn spoofed(h: &[Header<'_>]) -> Vec<String> {
    let reserved = ["x-dest", "x-session-id", "x-session-affinity", "x-session-previous-node"];
    let mut out: Vec<String> = Vec::new();
    for (n, _) in h {
        let canon: Vec<u8> = n.iter().map(|b| if *b == b'_' { b'-' } else { b.to_ascii_lowercase() }).collect();
        if reserved.iter().any(|r| r.as_bytes() == canon) {
            let s = String::from_utf8(n.to_vec()).unwrap();
            if !out.contains(&s) {
                out.push(s);
            }
        }
    }
    out
}

fn check(h: &[Header<'_>]) {
    for name in ["session_token", "sa_ticket", "a"] {
        assert_eq!(headers::cookie(h, name), cookie(h, name), "cookie {name}");
    }
    for name in ["cookie", "x-session-token", "authorization"] {
        assert_eq!(headers::first(h, name), first(h, name));
    }
    let found = decision::find_source(config(), h).map(|(s, v)| (s.unsigned(), v));
    assert_eq!(found, token(h));
    assert_eq!(decision::find_token(config(), h), token(h).map(|(_, v)| v));
    if let Some((true, v)) = token(h) {
        let id = decision::unsigned_session(v);
        assert_eq!(id.is_some(), unsigned_ok(v));
        if let Some(id) = id {
            assert_eq!(id.as_bytes(), v);
        }
    }
    assert_eq!(decision::spoofed(config(), h), spoofed(h));
}

fuzz_target!(|data: &[u8]| {
    // A client address as Envoy's `source.address` might spell it, or anything.
    if let Some(id) = decision::client_address_session(data) {
        let ip = id.strip_prefix("addr:").expect("addr: prefix");
        let parsed: std::net::IpAddr = ip.parse().expect("an IP literal");
        assert_eq!(parsed.to_string(), ip, "canonical form");
        assert!(!ip.contains('[') && !ip.contains(']'));
        if let std::net::IpAddr::V6(v6) = parsed {
            assert!(v6.to_ipv4_mapped().is_none(), "mapped addresses count as IPv4");
        }
    }
    // The wire format, from arbitrary bytes.
    if let Some(h) = headers::parse_map(data) {
        let again = headers::serialize_map(&h);
        assert_eq!(headers::parse_map(&again).as_deref(), Some(&h[..]));
        check(&h);
    }
    // Header lists, through the wire format.
    let mut u = Unstructured::new(data);
    if let Ok(owned) = list(&mut u) {
        let h: Vec<Header<'_>> = owned.iter().map(|(n, v)| (&n[..], &v[..])).collect();
        let buf = headers::serialize_map(&h);
        assert_eq!(headers::parse_map(&buf).as_deref(), Some(&h[..]));
        check(&h);
    }
});
