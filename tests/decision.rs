//! Table-driven tests of the per-request policy (`decide` and `respond`), natively.

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::json;
use session_affinity::affinity;
use session_affinity::config::Config;
use session_affinity::decision::{decide, respond, Decision, Given, Pending, Scratch, Served, Verdict};
use session_affinity::headers::Header;
use session_affinity::hosts::{node_id, HostSet};
use session_affinity::jws::{self, Alg, MacKey};
use session_affinity::metrics::{Counter, Outcome, Tally};
use session_affinity::token::TokenError;

const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const TICKET_KEY: &str = "nBYDAVya04QtPEYa03ebldmm+FIHyQfCwF2oLr3ILHc=";
const NOW: i64 = 1_790_000_000;

fn config(extra: serde_json::Value) -> Config {
    let mut base = json!({
        "token": {
            "keys": [{"kid": "k1", "alg": "HS256", "secret_base64": KEY}],
            "sources": [{"header": "x-session-token"}, {"cookie": "session_token"},
                        {"header": "authorization", "prefix": "Bearer "}],
        },
        "ticket": {"secret_base64": TICKET_KEY},
        "upstream": {"hosts": [{"address": "127.0.0.1:8001"}, {"address": "127.0.0.1:8002"},
                               {"address": "127.0.0.1:8003"}, {"address": "127.0.0.1:8004"}]},
    });
    for (k, v) in extra.as_object().unwrap() {
        base[k] = v.clone();
    }
    Config::parse(base.to_string().as_bytes(), &|_| None).unwrap()
}

fn hosts(cfg: &Config) -> HostSet {
    match &cfg.hosts {
        session_affinity::config::Hosts::Static(s) => s.clone(),
        _ => panic!("static hosts expected"),
    }
}

fn token(sid: &str, exp: i64) -> String {
    let key = MacKey::new(Alg::HS256, &jws_key(KEY)).unwrap();
    let payload = json!({"sid": sid, "exp": exp});
    jws::sign(&key, br#"{"alg":"HS256","kid":"k1"}"#, payload.to_string().as_bytes())
}

fn ticket(sid: &str, node: u64) -> String {
    let key = MacKey::new(Alg::HS256, &jws_key(TICKET_KEY)).unwrap();
    let payload = json!({"sid": sid, "node": node_id(node), "iat": NOW, "exp": NOW + 100});
    jws::sign(&key, br#"{"alg":"HS256","typ":"JWT"}"#, payload.to_string().as_bytes())
}

fn jws_key(b64: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(b64).unwrap()
}

fn run<'c>(cfg: &'c Config, set: &HostSet, headers: &[(&str, &str)], tally: &mut Scratch) -> Decision<'c> {
    let hs: Vec<Header<'_>> = headers.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())).collect();
    decide(cfg, &hs, set, NOW, &mut Given::random([7u8; 16]), tally)
}

fn forwarded<'a>(d: &'a Decision<'_>) -> (&'a [(&'a str, String)], &'a Pending) {
    match &d.verdict {
        Verdict::Forward { set, pending } => (set, pending),
        Verdict::Reply(r) => panic!("expected forward, got {} {}", r.status, r.body),
    }
}

fn header<'a>(set: &'a [(&str, String)], name: &str) -> Option<&'a str> {
    set.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
}

/// The expected override header: the head of the reference ranking.
fn expected_override(set: &HostSet, sid: &str, n: usize) -> String {
    let rank = set.rank(sid.as_bytes());
    rank.iter().take(n).map(|i| set.hosts()[*i].address.as_str()).collect::<Vec<_>>().join(",")
}

#[test]
fn valid_token_routes_by_ranking_with_fallbacks() {
    let cfg = config(json!({}));
    let set = hosts(&cfg);
    for i in 0..200 {
        let sid = format!("conversation-{i}");
        let mut tally = Scratch::new(1);
        let d = run(&cfg, &set, &[("x-session-token", &token(&sid, NOW + 60))], &mut tally);
        let (hdrs, pending) = forwarded(&d);
        assert_eq!(header(hdrs, "x-gateway-destination-endpoint").unwrap(), expected_override(&set, &sid, 3));
        assert_eq!(header(hdrs, "x-session-id"), Some(sid.as_str()));
        assert_eq!(header(hdrs, "x-session-affinity"), Some("new"));
        assert_eq!(header(hdrs, "x-session-previous-node"), None);
        assert_eq!(pending.session.as_deref(), Some(sid.as_str()));
        assert_eq!(pending.primary.as_deref(), expected_override(&set, &sid, 1).split(',').next());
        assert_eq!(tally.tally.get(Counter::Requests), 1);
        assert_eq!(tally.tally.get(Counter::TokenValid), 1);
        assert_eq!(tally.tally.get(Counter::Outcome(Outcome::New)), 1);
    }
}

#[test]
fn fallbacks_count_is_respected() {
    for (fallbacks, want) in [(0, 1), (1, 2), (3, 4), (10, 4)] {
        let cfg = config(json!({"upstream": {"fallbacks": fallbacks, "hosts": [
            {"address": "127.0.0.1:8001"}, {"address": "127.0.0.1:8002"},
            {"address": "127.0.0.1:8003"}, {"address": "127.0.0.1:8004"}]}}));
        let set = hosts(&cfg);
        let d = run(&cfg, &set, &[("x-session-token", &token("s", NOW + 60))], &mut Scratch::new(1));
        let (hdrs, _) = forwarded(&d);
        let v = header(hdrs, "x-gateway-destination-endpoint").unwrap();
        assert_eq!(v.split(',').count(), want, "{v}");
        assert_eq!(v, expected_override(&set, "s", want));
    }
}

#[test]
fn token_sources_in_order() {
    let cfg = config(json!({}));
    let set = hosts(&cfg);
    let a = token("from-header", NOW + 60);
    let b = token("from-cookie", NOW + 60);
    let c = token("from-bearer", NOW + 60);
    let cookie = format!("other=1; session_token={b}");
    let bearer = format!("bearer {c}");
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (vec![("x-session-token", &a), ("cookie", &cookie), ("authorization", &bearer)], "from-header"),
        (vec![("cookie", &cookie), ("authorization", &bearer)], "from-cookie"),
        (vec![("authorization", &bearer)], "from-bearer"),
        (vec![("authorization", "Basic abc"), ("cookie", &cookie)], "from-cookie"),
    ];
    for (hs, want) in cases {
        let d = run(&cfg, &set, &hs, &mut Scratch::new(1));
        let (hdrs, _) = forwarded(&d);
        assert_eq!(header(hdrs, "x-session-id"), Some(want));
    }
    // Duplicate token headers: the first wins.
    let d = run(&cfg, &set, &[("x-session-token", &a), ("x-session-token", &b)], &mut Scratch::new(1));
    assert_eq!(header(forwarded(&d).0, "x-session-id"), Some("from-header"));
}

#[test]
fn missing_token_per_action() {
    // mint
    let cfg = config(json!({"on_missing": "mint"}));
    let set = hosts(&cfg);
    let mut tally = Scratch::new(1);
    let d = run(&cfg, &set, &[], &mut tally);
    let (hdrs, pending) = forwarded(&d);
    let sid = header(hdrs, "x-session-id").unwrap();
    assert_eq!(sid.len(), 22);
    assert_eq!(header(hdrs, "x-session-affinity"), Some("new"));
    let minted = pending.minted.as_deref().unwrap();
    assert_eq!(cfg.validator.validate(minted.as_bytes(), NOW).unwrap().session, sid);
    assert_eq!(tally.tally.get(Counter::TokenMissing), 1);
    assert_eq!(tally.tally.get(Counter::TokenMinted), 1);
    assert_eq!(tally.tally.get(Counter::Outcome(Outcome::New)), 1);

    // reject
    let cfg = config(json!({"on_missing": "reject"}));
    let mut tally = Scratch::new(1);
    let d = run(&cfg, &set, &[], &mut tally);
    match d.verdict {
        Verdict::Reply(r) => {
            assert_eq!(r.status, 401);
            assert_eq!(r.body, r#"{"error":"invalid_session_token","reason":"missing"}"#);
            assert!(r.headers.contains(&("www-authenticate", r#"Bearer error="invalid_token""#.to_string())));
            assert!(r.headers.contains(&("content-type", "application/json".to_string())));
        }
        _ => panic!("expected 401"),
    }
    assert_eq!(tally.tally.get(Counter::Outcome(Outcome::Rejected)), 1);

    // pass
    let cfg = config(json!({"on_missing": "pass"}));
    let mut tally = Scratch::new(1);
    let d = run(&cfg, &set, &[], &mut tally);
    let (hdrs, pending) = forwarded(&d);
    assert!(hdrs.is_empty());
    assert_eq!(pending, &Pending::default());
    assert_eq!(tally.tally.get(Counter::Outcome(Outcome::Unaffined)), 1);
}

#[test]
fn invalid_tokens_per_action() {
    let cfg = config(json!({"on_invalid": "reject"}));
    let set = hosts(&cfg);
    let cases: Vec<(String, TokenError)> = vec![
        ("x.y".into(), TokenError::Malformed),
        ("a".repeat(5000), TokenError::Oversized),
        (token("s", NOW - 100), TokenError::Expired),
        (format!("{}x", token("s", NOW + 60)), TokenError::BadSignature),
    ];
    for (tok, reason) in cases {
        let mut tally = Scratch::new(1);
        let d = run(&cfg, &set, &[("x-session-token", &tok)], &mut tally);
        match d.verdict {
            Verdict::Reply(r) => {
                assert_eq!(r.status, 401);
                assert_eq!(r.body, format!(r#"{{"error":"invalid_session_token","reason":"{}"}}"#, reason.reason()));
                assert!(!r.body.contains(&tok[..3.min(tok.len())]) || tok.len() < 4);
            }
            _ => panic!("expected 401 for {reason}"),
        }
        assert_eq!(tally.tally.get(Counter::TokenInvalid(reason)), 1);
    }
    let cfg = config(json!({"on_invalid": "mint"}));
    let mut tally = Scratch::new(1);
    let d = run(&cfg, &set, &[("x-session-token", "garbage")], &mut tally);
    let (_, pending) = forwarded(&d);
    assert!(pending.minted.is_some());
    assert_eq!(tally.tally.get(Counter::TokenInvalid(TokenError::Malformed)), 1);
    assert_eq!(tally.tally.get(Counter::TokenMinted), 1);
    let cfg = config(json!({"on_invalid": "pass"}));
    let d = run(&cfg, &set, &[("x-session-token", "garbage")], &mut Scratch::new(1));
    assert!(forwarded(&d).0.is_empty());
}

#[test]
fn spoofed_headers_are_stripped_in_every_spelling() {
    let cfg = config(json!({"on_missing": "pass"}));
    let set = hosts(&cfg);
    let d = run(
        &cfg,
        &set,
        &[
            ("x-gateway-destination-endpoint", "10.9.9.9:1"),
            ("x_gateway_destination_endpoint", "10.9.9.9:1"),
            ("x-session-id", "victim"),
            ("X_Session_Id", "victim"),
            ("x-session-affinity", "sticky"),
            ("x-session-previous-node", "abc"),
            ("x-session-idx", "kept"),
        ],
        &mut Scratch::new(1),
    );
    assert_eq!(
        d.remove,
        vec![
            "x-gateway-destination-endpoint",
            "x_gateway_destination_endpoint",
            "x-session-id",
            "X_Session_Id",
            "x-session-affinity",
            "x-session-previous-node"
        ]
    );
}

#[test]
fn tickets_sticky_moved_pinned_and_ignored() {
    let sid = "conv-1";
    for mode in ["pinned", "rendezvous"] {
        let cfg = config(json!({"mode": mode}));
        let set = hosts(&cfg);
        let rank = set.rank(sid.as_bytes());
        let top = set.hosts()[rank[0]].h64;
        let other = set.hosts()[rank[2]].h64;
        let tok = token(sid, NOW + 60);

        // Ticket names the ranking's top: sticky in both modes.
        let mut tally = Scratch::new(1);
        let t = ticket(sid, top);
        let d = run(&cfg, &set, &[("x-session-token", &tok), ("x-session-ticket", &t)], &mut tally);
        let (hdrs, pending) = forwarded(&d);
        assert_eq!(header(hdrs, "x-session-affinity"), Some("sticky"), "{mode}");
        assert_eq!(pending.ticket.unwrap().node, top);

        // Ticket names another healthy node: pinned stays there, rendezvous moves.
        let mut tally = Scratch::new(1);
        let t = ticket(sid, other);
        let cookie = format!("sa_ticket={t}");
        let d = run(&cfg, &set, &[("x-session-token", &tok), ("cookie", &cookie)], &mut tally);
        let (hdrs, _) = forwarded(&d);
        let ov = header(hdrs, "x-gateway-destination-endpoint").unwrap();
        if mode == "pinned" {
            assert_eq!(header(hdrs, "x-session-affinity"), Some("sticky"));
            let want = [rank[2], rank[0], rank[1]].map(|i| set.hosts()[i].address.clone()).join(",");
            assert_eq!(ov, want, "pinned node first, then the ranking without it");
        } else {
            assert_eq!(header(hdrs, "x-session-affinity"), Some("moved"));
            assert_eq!(header(hdrs, "x-session-previous-node"), Some(node_id(other).as_str()));
            assert_eq!(ov, expected_override(&set, sid, 3));
            assert_eq!(tally.tally.get(Counter::Outcome(Outcome::Moved)), 1);
        }

        // Ticket names a node that is gone: moved, in both modes, to the ranking.
        let gone = affinity::h64(b"10.0.0.99:1");
        let t = ticket(sid, gone);
        let d = run(&cfg, &set, &[("x-session-token", &tok), ("x-session-ticket", &t)], &mut Scratch::new(1));
        let (hdrs, _) = forwarded(&d);
        assert_eq!(header(hdrs, "x-session-affinity"), Some("moved"));
        assert_eq!(header(hdrs, "x-session-previous-node"), Some(node_id(gone).as_str()));
        assert_eq!(header(hdrs, "x-gateway-destination-endpoint").unwrap(), expected_override(&set, sid, 3));

        // Another session's ticket, or a forged one: ignored and counted.
        for bad in [ticket("someone-else", other), format!("{}A", ticket(sid, other)), "junk".into()] {
            let mut tally = Scratch::new(1);
            let d = run(&cfg, &set, &[("x-session-token", &tok), ("x-session-ticket", &bad)], &mut tally);
            let (hdrs, pending) = forwarded(&d);
            assert_eq!(header(hdrs, "x-session-affinity"), Some("new"));
            assert!(pending.ticket.is_none());
            assert_eq!(tally.tally.get(Counter::TicketIgnored), 1);
        }
    }
}

#[test]
fn no_healthy_host_is_503() {
    let cfg = config(json!({}));
    let empty = HostSet::new(vec![]).unwrap();
    let mut tally = Scratch::new(1);
    let d = run(&cfg, &empty, &[("x-session-token", &token("s", NOW + 60))], &mut tally);
    match d.verdict {
        Verdict::Reply(r) => {
            assert_eq!(r.status, 503);
            assert_eq!(r.body, r#"{"error":"no_healthy_upstream"}"#);
        }
        _ => panic!("expected 503"),
    }
    assert_eq!(tally.tally.get(Counter::Outcome(Outcome::NoHost)), 1);
    // Nothing is minted for a request that cannot be served.
    let mut tally = Scratch::new(1);
    let _ = run(&cfg, &empty, &[], &mut tally);
    assert_eq!(tally.tally.get(Counter::TokenMinted), 0);
    assert_eq!(tally.tally.get(Counter::Outcome(Outcome::NoHost)), 1);
}

#[test]
fn respond_issues_tickets_and_counts() {
    let cfg = config(json!({}));
    let set = hosts(&cfg);
    let sid = "conv-2";
    let rank = set.rank(sid.as_bytes());
    let primary = set.hosts()[rank[0]].clone();
    let fallback = set.hosts()[rank[1]].clone();

    // A new session served by its primary: a ticket naming the primary.
    let pending = Pending {
        session: Some(sid.into()),
        minted: None,
        ticket: None,
        tickets: true,
        primary: Some(primary.address.clone()),
        primary_node: None,
        ..Pending::default()
    };
    let mut tally = Tally::default();
    let add =
        respond(&cfg, &pending, Served { address: Some(&primary.address), status: Some(200) }, &set, NOW, &mut tally);
    let cookie = add.iter().find(|(n, _)| *n == "set-cookie").map(|(_, v)| v.clone()).unwrap();
    assert!(cookie.starts_with("sa_ticket="));
    assert!(cookie.ends_with("; Max-Age=86400; Path=/; HttpOnly; Secure; SameSite=Lax"));
    let raw = add.iter().find(|(n, _)| *n == "x-session-ticket").map(|(_, v)| v.clone()).unwrap();
    let t = cfg.ticket.as_ref().unwrap().tickets.verify(raw.as_bytes(), sid, NOW).unwrap();
    assert_eq!(t.node, primary.h64);
    assert!(!raw.contains(&primary.address));
    assert_eq!(tally.get(Counter::ServedPrimary), 1);
    assert_eq!(tally.get(Counter::TicketIssued), 1);
    assert_eq!(tally.get_node(primary.h64), 1);

    // Same node again with a fresh ticket: nothing to send.
    let pending = Pending { ticket: Some(t), ..pending };
    let mut tally = Tally::default();
    let add = respond(
        &cfg,
        &pending,
        Served { address: Some(&primary.address), status: Some(200) },
        &set,
        NOW + 1,
        &mut tally,
    );
    assert!(add.is_empty());
    assert_eq!(tally.get(Counter::TicketIssued), 0);

    // Served by a fallback after a retry: counted, and the ticket follows the node.
    let mut tally = Tally::default();
    let add = respond(
        &cfg,
        &pending,
        Served { address: Some(&fallback.address), status: Some(200) },
        &set,
        NOW + 1,
        &mut tally,
    );
    assert_eq!(tally.get(Counter::ServedFallback), 1);
    let raw = add.iter().find(|(n, _)| *n == "x-session-ticket").map(|(_, v)| v.clone()).unwrap();
    assert_eq!(cfg.ticket.as_ref().unwrap().tickets.verify(raw.as_bytes(), sid, NOW).unwrap().node, fallback.h64);

    // 5xx or no response: an upstream error, and no ticket.
    for served in
        [Served { address: Some(&primary.address), status: Some(503) }, Served { address: None, status: None }]
    {
        let mut tally = Tally::default();
        let add = respond(&cfg, &Pending { ticket: None, ..pending_of(sid) }, served, &set, NOW, &mut tally);
        assert_eq!(tally.get(Counter::UpstreamErrors), 1);
        assert!(add.iter().all(|(n, _)| *n != "x-session-ticket"));
    }

    // A minted session gets its token back as a cookie and a header.
    let mut tally = Tally::default();
    let pending = Pending { minted: Some("tok".into()), ..pending_of(sid) };
    let add =
        respond(&cfg, &pending, Served { address: Some(&primary.address), status: Some(200) }, &set, NOW, &mut tally);
    assert!(add
        .contains(&("set-cookie", "session_token=tok; Max-Age=86400; Path=/; HttpOnly; Secure; SameSite=Lax".into())));
    assert!(add.contains(&("x-session-token", "tok".into())));
}

fn pending_of(sid: &str) -> Pending {
    Pending {
        session: Some(sid.into()),
        minted: None,
        ticket: None,
        tickets: true,
        primary: Some("127.0.0.1:8001".into()),
        primary_node: None,
        ..Pending::default()
    }
}

#[test]
fn weighted_hosts_follow_the_ranking() {
    let cfg = config(json!({"upstream": {"hosts": [
        {"address": "10.1.0.11:8000", "weight": 1}, {"address": "10.1.0.12:8000", "weight": 2},
        {"address": "[2001:db8::1]:8080", "weight": 5}, {"address": "10.1.0.14:8000", "weight": 1, "key": "node-14"}]}}));
    let set = hosts(&cfg);
    let mut wins = std::collections::HashMap::new();
    for i in 0..2000 {
        let sid = format!("w-{i}");
        let d = run(&cfg, &set, &[("x-session-token", &token(&sid, NOW + 60))], &mut Scratch::new(1));
        let v = header(forwarded(&d).0, "x-gateway-destination-endpoint").unwrap().to_string();
        assert_eq!(v, expected_override(&set, &sid, 3));
        *wins.entry(v.split(',').next().unwrap().to_string()).or_insert(0) += 1;
    }
    // weight 5 of 9 wins about 5/9 of sessions
    let heavy = wins["[2001:db8::1]:8080"] as f64 / 2000.0;
    assert!((heavy - 5.0 / 9.0).abs() < 0.05, "{heavy}");
    // A custom key is hashed instead of the address.
    let h = set.hosts().iter().find(|h| h.address == "10.1.0.14:8000").unwrap();
    assert_eq!(h.h64, affinity::h64(b"node-14"));
}

#[test]
fn memoized_checks_give_the_same_answers() {
    let cfg =
        config(json!({"token": {"keys": [{"kid": "k1", "alg": "HS256", "secret_base64": KEY}], "leeway_seconds": 0}}));
    let set = hosts(&cfg);
    let mut scratch = Scratch::new(9);
    let tok = token("memo", NOW + 10);
    let hs: Vec<Header<'_>> = vec![(b"x-session-token", tok.as_bytes())];
    let mut random = Given::random([7u8; 16]);
    // Same answer from scratch and from the memo, until the exact second of expiry.
    for now in [NOW, NOW + 5, NOW + 9] {
        let d = decide(&cfg, &hs, &set, now, &mut random, &mut scratch);
        assert_eq!(header(forwarded(&d).0, "x-session-id"), Some("memo"));
    }
    let d = decide(&cfg, &hs, &set, NOW + 10, &mut random, &mut scratch);
    assert!(matches!(d.verdict, Verdict::Reply(ref r) if r.body.contains("expired")));
    assert_eq!(scratch.tally.get(Counter::TokenInvalid(TokenError::Expired)), 1);
    assert_eq!(scratch.memos.tokens.get(tok.as_bytes()).map(|f| f.session.as_str()), Some("memo"));
    // A token differing in one byte is checked in full.
    let mut bad = tok.clone().into_bytes();
    let last = bad.len() - 1;
    bad[last] = if bad[last] == b'A' { b'B' } else { b'A' };
    let hs: Vec<Header<'_>> = vec![(b"x-session-token", &bad)];
    let d = decide(&cfg, &hs, &set, NOW, &mut random, &mut scratch);
    assert!(matches!(d.verdict, Verdict::Reply(ref r) if r.body.contains("bad_signature")));

    // A memoized ticket stays bound to its session.
    let rank = set.rank(b"memo");
    let t = ticket("memo", set.hosts()[rank[1]].h64);
    let other = token("someone-else", NOW + 10);
    let mut scratch = Scratch::new(9);
    let d = run(&cfg, &set, &[("x-session-token", &tok), ("x-session-ticket", &t)], &mut scratch);
    assert_eq!(header(forwarded(&d).0, "x-session-affinity"), Some("sticky"));
    let d = run(&cfg, &set, &[("x-session-token", &tok), ("x-session-ticket", &t)], &mut scratch);
    assert_eq!(header(forwarded(&d).0, "x-session-affinity"), Some("sticky"));
    let d = run(&cfg, &set, &[("x-session-token", &other), ("x-session-ticket", &t)], &mut scratch);
    assert_eq!(header(forwarded(&d).0, "x-session-affinity"), Some("new"));
    assert_eq!(scratch.tally.get(Counter::TicketIgnored), 1);
}

/// Answers `Ask` with fixed values and counts how often each was asked for.
#[derive(Default)]
struct Counting {
    source_address: Option<String>,
    asked_random: usize,
    asked_address: usize,
}

impl session_affinity::decision::Ask for Counting {
    fn random(&mut self) -> Option<[u8; 16]> {
        self.asked_random += 1;
        Some([9u8; 16])
    }
    fn source_address(&mut self) -> Option<Vec<u8>> {
        self.asked_address += 1;
        self.source_address.as_ref().map(|a| a.as_bytes().to_vec())
    }
}

fn unsigned_config(extra: serde_json::Value) -> Config {
    let mut c = json!({
        "token": {
            "keys": [{"kid": "k1", "alg": "HS256", "secret_base64": KEY}],
            "sources": [{"header": "x-conversation-id", "unsigned": true}, {"cookie": "conv", "unsigned": true},
                        {"header": "x-session-token"}],
        },
        "on_invalid": "reject",
    });
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    config(c)
}

#[test]
fn unsigned_sources_carry_the_session_id() {
    let cfg = unsigned_config(json!({}));
    let set = hosts(&cfg);
    let tok = token("signed", NOW + 60);
    let long = "x".repeat(256);
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (vec![("x-conversation-id", "conv-42")], "conv-42"),
        (vec![("cookie", "a=1; conv=from-cookie")], "from-cookie"),
        (vec![("cookie", "conv=\"quoted\"")], "quoted"),
        // Sources in order: the first present one wins, signed or not.
        (vec![("x-session-token", &tok), ("x-conversation-id", "first")], "first"),
        (vec![("x-session-token", &tok), ("cookie", "conv=second")], "second"),
        (vec![("x-session-token", &tok)], "signed"),
        (vec![("x-conversation-id", "!~{}\"'\\")], "!~{}\"'\\"),
        (vec![("x-conversation-id", &long)], &long),
        // Envoy trims header values; so does the filter.
        (vec![("x-conversation-id", " padded\t")], "padded"),
    ];
    for (hs, want) in cases {
        let mut scratch = Scratch::new(1);
        let d = run(&cfg, &set, &hs, &mut scratch);
        let (hdrs, pending) = forwarded(&d);
        assert_eq!(header(hdrs, "x-session-id"), Some(want), "{hs:?}");
        assert_eq!(header(hdrs, "x-gateway-destination-endpoint").unwrap(), expected_override(&set, want, 3));
        assert_eq!(header(hdrs, "x-session-affinity"), Some("new"));
        assert!(pending.tickets && pending.minted.is_none());
        let signed = want == "signed";
        assert_eq!(scratch.tally.get(Counter::TokenUnsigned), u64::from(!signed));
        assert_eq!(scratch.tally.get(Counter::TokenValid), u64::from(signed));
        assert_eq!(scratch.tally.get(Counter::Outcome(Outcome::New)), 1);
    }
}

#[test]
fn unsigned_values_outside_the_contract_are_bad_claims() {
    let long = "x".repeat(257);
    let tok = token("signed", NOW + 60);
    fn h<'a>(n: &'a [u8], v: &'a [u8]) -> Header<'a> {
        (n, v)
    }
    let id = b"x-conversation-id".as_slice();
    let bad: Vec<Vec<Header<'_>>> = vec![
        vec![h(id, b"")],
        vec![h(id, long.as_bytes())],
        vec![h(id, b"has space")],
        vec![h(id, b"tab\there")],
        vec![h(id, b"nul\0")],
        vec![h(id, b"del\x7f")],
        vec![h(id, "caf\u{e9}".as_bytes())],
        vec![h(id, b"\xff")],
        vec![h(b"cookie", b"conv=")],
        // An invalid unsigned source is not skipped for a later one.
        vec![h(id, b"a b"), h(b"x-session-token", tok.as_bytes())],
    ];
    for (action, want) in [("reject", 401u32), ("pass", 0), ("mint", 1)] {
        let cfg = unsigned_config(json!({"on_invalid": action}));
        let set = hosts(&cfg);
        for hs in &bad {
            let mut scratch = Scratch::new(1);
            let d = decide(&cfg, hs, &set, NOW, &mut Given::random([3u8; 16]), &mut scratch);
            assert_eq!(scratch.tally.get(Counter::TokenInvalid(TokenError::BadClaims)), 1, "{hs:?}");
            assert_eq!(scratch.tally.get(Counter::TokenUnsigned), 0);
            match (&d.verdict, want) {
                (Verdict::Reply(r), 401) => {
                    assert_eq!(r.status, 401);
                    assert_eq!(r.body, r#"{"error":"invalid_session_token","reason":"bad_claims"}"#);
                    assert_eq!(r.details, "session_affinity_invalid_token");
                }
                (Verdict::Forward { set, .. }, 0) => assert!(set.is_empty()),
                (Verdict::Forward { pending, .. }, 1) => assert!(pending.minted.is_some()),
                (v, _) => panic!("{action}: unexpected {v:?} for {hs:?}"),
            }
        }
    }
    assert_eq!(session_affinity::decision::unsigned_session(b"!~"), Some("!~".into()));
    assert_eq!(session_affinity::decision::unsigned_session(&[b'a'; 256]).map(|s| s.len()), Some(256));
}

#[test]
fn unsigned_sessions_use_tickets_like_signed_ones() {
    let cfg = unsigned_config(json!({}));
    let set = hosts(&cfg);
    let sid = "trusted-7";
    let rank = set.rank(sid.as_bytes());
    let other = set.hosts()[rank[2]].h64;
    let t = ticket(sid, other);
    let mut scratch = Scratch::new(1);
    let d = run(&cfg, &set, &[("x-conversation-id", sid), ("x-session-ticket", &t)], &mut scratch);
    let (hdrs, pending) = forwarded(&d);
    assert_eq!(header(hdrs, "x-session-affinity"), Some("sticky"), "pinned to the ticket's node");
    assert_eq!(pending.primary.as_deref(), Some(set.hosts()[rank[2]].address.as_str()));
    // The response issues a ticket for the node that served.
    let fresh = Pending { ticket: None, ..pending.clone() };
    let add = respond(
        &cfg,
        &fresh,
        Served { address: fresh.primary.as_deref(), status: Some(200) },
        &set,
        NOW,
        &mut Tally::default(),
    );
    let raw = add.iter().find(|(n, _)| *n == "x-session-ticket").map(|(_, v)| v.clone()).unwrap();
    assert_eq!(cfg.ticket.as_ref().unwrap().tickets.verify(raw.as_bytes(), sid, NOW).unwrap().node, other);
}

#[test]
fn client_address_sessions() {
    let cfg = config(json!({"on_missing": "client_address"}));
    let set = hosts(&cfg);
    let cases = [
        ("127.0.0.1:54321", "addr:127.0.0.1"),
        ("10.1.2.3:1", "addr:10.1.2.3"),
        ("[2001:DB8:0:0:0:0:0:1]:443", "addr:2001:db8::1"),
        ("[::1]:80", "addr:::1"),
        ("[fe80::1:0:0:1]:80", "addr:fe80::1:0:0:1"),
        // An IPv4 client on a dual-stack listener, as a mapped address: its IPv4 address.
        ("[::ffff:192.0.2.7]:9", "addr:192.0.2.7"),
        // A bare IP (no port) is taken as it is.
        ("192.0.2.8", "addr:192.0.2.8"),
    ];
    for (address, want) in cases {
        let mut ask = Counting { source_address: Some(address.into()), ..Counting::default() };
        let mut scratch = Scratch::new(1);
        // A ticket in the request is not read: client-address sessions take none.
        let t = ticket(want, set.hosts()[0].h64);
        let hs: Vec<Header<'_>> = vec![(b"x-session-ticket", t.as_bytes())];
        let d = decide(&cfg, &hs, &set, NOW, &mut ask, &mut scratch);
        let (hdrs, pending) = forwarded(&d);
        assert_eq!(header(hdrs, "x-session-id"), Some(want), "{address}");
        assert_eq!(header(hdrs, "x-gateway-destination-endpoint").unwrap(), expected_override(&set, want, 3));
        assert_eq!(header(hdrs, "x-session-affinity"), Some("new"));
        assert!(pending.minted.is_none() && pending.ticket.is_none() && !pending.tickets);
        assert_eq!((ask.asked_address, ask.asked_random), (1, 0));
        assert_eq!(scratch.tally.get(Counter::TokenMissing), 1);
        assert_eq!(scratch.tally.get(Counter::TokenClientAddress), 1);
        assert_eq!(scratch.tally.get(Counter::TicketIgnored), 0);
        // No ticket and no token on the response.
        let add = respond(
            &cfg,
            pending,
            Served { address: pending.primary.as_deref(), status: Some(200) },
            &set,
            NOW,
            &mut Tally::default(),
        );
        assert!(add.is_empty(), "{add:?}");
    }
    // Not an IP address (a Unix socket listener): forwarded without affinity.
    for address in [Some("/tmp/envoy.sock"), Some("envoy://internal"), None] {
        let mut ask = Counting { source_address: address.map(Into::into), ..Counting::default() };
        let mut scratch = Scratch::new(1);
        let d = decide(&cfg, &[], &set, NOW, &mut ask, &mut scratch);
        assert!(forwarded(&d).0.is_empty());
        assert_eq!(scratch.tally.get(Counter::Outcome(Outcome::Unaffined)), 1);
        assert_eq!(scratch.tally.get(Counter::TokenClientAddress), 0);
    }
    // No healthy host: the contract's 503.
    let mut ask = Counting { source_address: Some("127.0.0.1:1".into()), ..Counting::default() };
    let d = decide(&cfg, &[], &HostSet::new(vec![]).unwrap(), NOW, &mut ask, &mut Scratch::new(1));
    assert!(matches!(d.verdict, Verdict::Reply(ref r) if r.status == 503));
    // A request with a token never asks for the address; an invalid one is not
    // downgraded to it (on_invalid cannot be client_address).
    for hs in [vec![("x-session-token", token("s", NOW + 60))], vec![("x-session-token", "garbage".to_string())]] {
        let hs: Vec<Header<'_>> = hs.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())).collect();
        let mut ask = Counting { source_address: Some("127.0.0.1:1".into()), ..Counting::default() };
        let _ = decide(&cfg, &hs, &set, NOW, &mut ask, &mut Scratch::new(1));
        assert_eq!(ask.asked_address, 0);
    }
}

#[test]
fn every_local_reply_has_its_own_details() {
    let all = session_affinity::decision::all_local_replies();
    let mut details: Vec<&str> = all.iter().map(|r| r.details).collect();
    details.sort();
    details.dedup();
    assert_eq!(details.len(), all.len(), "{details:?}");
    for r in &all {
        assert!(r.details.starts_with("session_affinity_"), "{}", r.details);
        assert!(r.details.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'), "{}", r.details);
        assert!(r.headers.contains(&("content-type", "application/json".into())));
        let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert!(body["error"].is_string());
    }
    // No randomness for a new session: a 500 with its own details, counted rejected.
    let cfg = config(json!({}));
    let mut scratch = Scratch::new(1);
    let d = decide(&cfg, &[], &hosts(&cfg), NOW, &mut Given::default(), &mut scratch);
    match d.verdict {
        Verdict::Reply(r) => assert_eq!((r.status, r.details), (500, "session_affinity_no_randomness")),
        _ => panic!("expected 500"),
    }
    assert_eq!(scratch.tally.get(Counter::Outcome(Outcome::Rejected)), 1);
}

#[test]
fn node_counters_are_keyed_by_the_host_key() {
    let cfg = config(json!({"upstream": {"hosts": [
        {"address": "127.0.0.1:8001", "key": "node-a"}, {"address": "127.0.0.1:8002"}]}}));
    let set = hosts(&cfg);
    let a = set.hosts().iter().find(|h| h.key == "node-a").unwrap().clone();
    let b = set.hosts().iter().find(|h| h.address == "127.0.0.1:8002").unwrap().clone();
    let mut tally = Tally::default();
    let pending = Pending {
        session: Some("s".into()),
        tickets: true,
        primary: Some(a.address.clone()),
        primary_node: Some(a.h64),
        ..Pending::default()
    };
    for served in [&a.address, &b.address, &"10.9.9.9:1".to_string()] {
        respond(&cfg, &pending, Served { address: Some(served), status: Some(200) }, &set, NOW, &mut tally);
    }
    assert_eq!(tally.node_key(a.h64), Some("node-a"));
    assert_eq!(tally.node_key(b.h64), Some("127.0.0.1:8002"));
    assert_eq!(tally.node_key(affinity::h64(b"10.9.9.9:1")), Some("10.9.9.9:1"));
    let mut names = vec![];
    tally.drain(|d| {
        if let session_affinity::metrics::Delta::Node { key, count, .. } = d {
            names.push((session_affinity::metrics::node_metric(key), count));
        }
    });
    names.sort();
    assert_eq!(
        names,
        vec![
            ("session_affinity.node.10_9_9_9_1.requests".to_string(), 1),
            ("session_affinity.node.127_0_0_1_8002.requests".to_string(), 1),
            ("session_affinity.node.node-a.requests".to_string(), 1),
        ]
    );
}

#[test]
fn a_new_configuration_starts_an_empty_memo() {
    let cfg = config(json!({}));
    let set = hosts(&cfg);
    let tok = token("memo-reset", NOW + 60);
    let mut scratch = Scratch::new(5);
    let _ = run(&cfg, &set, &[("x-session-token", &tok)], &mut scratch);
    assert!(scratch.memos.tokens.get(tok.as_bytes()).is_some());
    scratch.tally.add(Counter::DiscoveryOk);
    scratch.new_config(6);
    assert!(scratch.memos.tokens.get(tok.as_bytes()).is_none(), "a removed key's token must be checked again");
    assert_eq!(scratch.tally.get(Counter::DiscoveryOk), 1, "counts not yet flushed are kept");
    // A key removed by the new configuration refuses the token memoized under the old.
    let other = config(json!({"token": {"keys": [{"kid": "k2", "alg": "HS256", "secret_base64": TICKET_KEY}],
                         "sources": [{"header": "x-session-token"}]}}));
    let d = run(&other, &set, &[("x-session-token", &tok)], &mut scratch);
    assert!(matches!(d.verdict, Verdict::Reply(ref r) if r.body.contains("unknown_key")));
}

#[test]
fn the_response_head_is_read_in_one_pass() {
    use session_affinity::decision::{response_head, ResponseHead};
    let h = |pairs: &[(&'static str, &'static str)]| -> Vec<Header<'static>> {
        pairs.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())).collect()
    };
    let report = "TEXT named_metrics.kv_cache_usage_perc=0.5";
    for (pairs, want) in [
        (h(&[(":status", "200"), ("x-envoy-attempt-count", "1")]), (Some(200), true, None)),
        (h(&[(":status", "503"), ("X-Envoy-Attempt-Count", "2")]), (Some(503), false, None)),
        // Without the header (the route does not include the attempt count), or with a
        // value that is not exactly 1, the served address is looked up.
        (h(&[(":status", "200")]), (Some(200), false, None)),
        (h(&[(":status", "200"), ("x-envoy-attempt-count", " 1")]), (Some(200), false, None)),
        (
            h(&[(":status", "2x0"), ("endpoint-load-metrics", report), ("endpoint-load-metrics", "TEXT a=1")]),
            (None, false, Some(report.as_bytes())),
        ),
        (vec![], (None, false, None)),
    ] {
        let ResponseHead { status, first_attempt, load_report } = response_head(&pairs);
        assert_eq!((status, first_attempt, load_report), want, "{pairs:?}");
    }
}
