//! Regression tests for what `make fuzz` (fuzz/, scripts/fuzz.sh) and the hostile-input
//! suite (tests/e2e/test_hostile.py) found. Each test names where it was found and the
//! invariant that failed; the fix is in src/.

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::json;
use session_affinity::config::{Config, Hosts};
use session_affinity::decision::{decide, respond, Given, Scratch, Served, Verdict};
use session_affinity::headers::Header;
use session_affinity::jws::{self, Alg, MacKey};
use session_affinity::metrics::{Counter, Tally};
use session_affinity::ticket::MAX_TICKET_BYTES;
use session_affinity::token::TokenError;

const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const SECRET: &str = "nBYDAVya04QtPEYa03ebldmm+FIHyQfCwF2oLr3ILHc=";
const NOW: i64 = 1_790_000_000;

fn parse_err(doc: &str) -> String {
    match Config::parse(doc.as_bytes(), &|_| None) {
        Ok(_) => panic!("accepted: {doc}"),
        Err(e) => e.to_string(),
    }
}

/// config_json: "error message shows secret ...: token.keys[0]: invalid type: string
/// "<secret>", expected struct RawKey". serde quotes the string it did not expect, and
/// a secret put where an object belongs (`"ticket": "<secret>"`) went to Envoy's log.
#[test]
fn a_misplaced_secret_is_not_echoed_in_the_error() {
    let cases = [
        (
            format!(r#"{{"token":{{"keys":["{SECRET}"]}},"upstream":{{"hosts":[]}}}}"#),
            "token.keys[0]: invalid type: string, expected struct RawKey",
        ),
        (
            format!(
                r#"{{"token":{{"keys":[{{"alg":"HS256","secret_base64":"{KEY}"}}]}},"ticket":"{SECRET}","upstream":{{"hosts":[]}}}}"#
            ),
            "ticket: invalid type: string, expected struct RawTicket",
        ),
        (format!(r#"{{"token":{{"keys":[{{"alg":{{"a":"{SECRET}"}}}}]}}}}"#), "token.keys[0].alg"),
        (format!(r#"{{"token":"{SECRET}\"\\"}}"#), "token: invalid type: string, expected struct RawToken"),
    ];
    for (doc, want) in cases {
        let err = parse_err(&doc);
        assert!(!err.contains(&SECRET[..20]), "secret in {err}");
        assert!(err.contains(want), "got {err:?}, want {want:?}");
    }
}

/// config: "error message shows secret ...: token.keys[0].<secret>: expected `:`". In a
/// malformed document, the string after a member name was taken for a member name and
/// put into the field path.
#[test]
fn only_member_names_make_the_field_path() {
    let doc = format!(r#"{{"token":{{"keys":[{{"alg":"HS256","secret_base64" "{SECRET}"}}]}}}}"#);
    let err = parse_err(&doc);
    assert!(!err.contains(&SECRET[..20]), "secret in {err}");
    assert!(err.starts_with("token.keys[0]: expected `:`"), "{err}");
    // Names are still found, with spaces before the colon too.
    let err = parse_err(r#"{"token" : {"keys" :[{"alg" : "HS999"}]}}"#);
    assert!(err.starts_with("token.keys[0].alg: unknown variant `HS999`"), "{err}");
}

/// config: "error is not one log line". A control character in a member name of a broken
/// document, in an enum value (`"mode": "a\nb"`, an escaped newline is valid JSON) or in
/// an environment variable name split the log line.
#[test]
fn errors_are_one_line() {
    let cases = [
        ("{\"tok\nen\": 1}", "tok\\nen: control character"),
        (
            &*format!(
                r#"{{"token":{{"keys":[{{"alg":"HS256","secret_base64":"{KEY}"}}]}},"mode":"a\nb","upstream":{{"hosts":[]}}}}"#
            ),
            "mode: unknown variant `a\\nb`",
        ),
        (
            r#"{"token":{"keys":[{"alg":"HS256","secret_env":"A\r\nB"}]},"upstream":{"hosts":[{"address":"1.2.3.4:1"}]}}"#,
            "environment variable A\\r\\nB is not set",
        ),
        (r#"{"tok\u0000en":1}"#, "unknown field `tok\\u{0}en`"),
    ];
    for (doc, want) in cases {
        let err = parse_err(doc);
        assert!(!err.chars().any(char::is_control), "not one line: {err:?}");
        assert!(err.contains(want), "got {err:?}, want {want:?}");
    }
}

/// decision: "issued ticket does not verify". A session id of ~700 bytes or more (a token
/// may carry one up to `max_token_bytes`) made a ticket larger than `Tickets::verify`
/// accepts, so every response sent a ticket that every request then ignored.
#[test]
fn no_ticket_that_could_never_come_back() {
    let cfg = Config::parse(
        json!({"token": {"keys": [{"kid": "k1", "alg": "HS256", "secret_base64": KEY}]},
               "ticket": {"secret_base64": SECRET},
               "upstream": {"hosts": [{"address": "127.0.0.1:8001"}, {"address": "127.0.0.1:8002"}]}})
        .to_string()
        .as_bytes(),
        &|_| None,
    )
    .unwrap();
    let Hosts::Static(hosts) = &cfg.hosts else { panic!("static hosts") };
    let key = MacKey::new(Alg::HS256, &base64_std(KEY)).unwrap();
    let tc = cfg.ticket.as_ref().unwrap();
    let sids = [
        ("a".repeat(100), true),
        ("a".repeat(600), true),
        ("\"q\\".repeat(60), true),
        ("a".repeat(700), false),
        ("\"q\\".repeat(200), false),
        ("a".repeat(2500), false),
    ];
    for (sid, issued) in sids {
        let len = sid.len();
        let tok = jws::sign(
            &key,
            br#"{"alg":"HS256","kid":"k1"}"#,
            json!({"sid": sid, "exp": NOW + 60}).to_string().as_bytes(),
        );
        let request: Vec<Header<'_>> = vec![(b"x-session-token", tok.as_bytes())];
        let mut scratch = Scratch::new(1);
        let d = decide(&cfg, &request, hosts, NOW, &mut Given::default(), &mut scratch);
        let Verdict::Forward { pending, .. } = d.verdict else { panic!("forward expected") };
        let primary = pending.primary.clone().unwrap();
        let mut tally = Tally::default();
        let add =
            respond(&cfg, &pending, Served { address: Some(&primary), status: Some(200) }, hosts, NOW, &mut tally);
        let tickets: Vec<&String> = add.iter().filter(|(n, _)| *n == "x-session-ticket").map(|(_, v)| v).collect();
        assert_eq!(tickets.len(), usize::from(issued), "session of {len} bytes");
        assert_eq!(tally.get(Counter::TicketIssued), u64::from(issued));
        for t in tickets {
            assert!(t.len() <= MAX_TICKET_BYTES);
            assert!(tc.tickets.verify(t.as_bytes(), &sid, NOW).is_some(), "issued ticket does not verify");
        }
    }
}

/// tests/e2e/test_hostile.py ("header: invalid UTF-8"), then the token_signed target's
/// oracle: a token whose header or payload held invalid UTF-8 in a member the filter does
/// not read (`{"alg":"HS256","x":"\xff"}`) was accepted, though it is not JSON (RFC 8259:
/// UTF-8) and the contract says `malformed`. serde_json skips an unread string without
/// checking its bytes.
#[test]
fn invalid_utf8_anywhere_in_header_or_payload_is_malformed() {
    let cfg = Config::parse(
        json!({"token": {"keys": [{"kid": "k1", "alg": "HS256", "secret_base64": KEY}]},
               "upstream": {"hosts": [{"address": "127.0.0.1:8001"}]}})
        .to_string()
        .as_bytes(),
        &|_| None,
    )
    .unwrap();
    let key = MacKey::new(Alg::HS256, &base64_std(KEY)).unwrap();
    let exp = NOW + 60;
    let good_payload = format!(r#"{{"sid":"s","exp":{exp}}}"#).into_bytes();
    let cases: [(&[u8], Vec<u8>); 4] = [
        (b"{\"alg\":\"HS256\",\"kid\":\"k1\",\"x\":\"\xff\"}", good_payload.clone()),
        (b"{\"alg\":\"HS256\",\"kid\":\"k1\",\"x\":[\"\xc3\x28\"]}", good_payload.clone()),
        (br#"{"alg":"HS256","kid":"k1"}"#, [&good_payload[..good_payload.len() - 1], b",\"x\":\"\xff\"}"].concat()),
        (br#"{"alg":"HS256","kid":"k1"}"#, [&good_payload[..good_payload.len() - 1], b",\"\xfe\":1}"].concat()),
    ];
    for (header, payload) in cases {
        let tok = jws::sign(&key, header, &payload);
        assert_eq!(cfg.validator.validate(tok.as_bytes(), NOW).err(), Some(TokenError::Malformed), "{tok}");
    }
    let tok = jws::sign(&key, br#"{"alg":"HS256","kid":"k1","x":"\u00ff"}"#, &good_payload);
    assert!(cfg.validator.validate(tok.as_bytes(), NOW).is_ok(), "escaped non-ASCII is fine");
}

fn base64_std(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}
