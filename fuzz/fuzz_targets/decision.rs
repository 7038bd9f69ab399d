//! The per-request policy: `decision::decide` then `decision::respond`, over header lists
//! mixing valid, expired, forged and foreign tokens and tickets with arbitrary bytes and
//! spoofed filter headers, for several configurations and host sets, at arbitrary times.
//!
//! Invariants:
//! - the tally counts one request and exactly one outcome (requests == sum of outcomes),
//!   and respond adds none;
//! - every client header that spells a filter header is in `remove`, and nothing else;
//! - a forward sets exactly the filter's headers, with values free of control bytes; the
//!   override header lists only hosts of the set, without repeats, `1 + fallbacks` of
//!   them (or all), in the ranking's order after the pinned node;
//! - the ticket used is exactly the one a fresh check accepts; `sticky` means the ticket's
//!   node is first, `moved` names the ticket's node as the previous one;
//! - the memo changes nothing: the same request decided again (warm) and on a fresh
//!   scratch gives the same decision;
//! - a local reply is one of the contract's; respond adds only cookies, the minted token
//!   and a ticket that verifies for the session and names the node that served;
//! - a client-address session (`addr:<ip>`) takes no ticket and gets no token or ticket.
#![no_main]

#[path = "../common/mod.rs"]
mod common;

use std::sync::OnceLock;

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use serde_json::json;
use session_affinity::affinity;
use session_affinity::config::{Config, Mode};
use session_affinity::decision::{self, Given, Scratch, Served, Verdict};
use session_affinity::headers::{self, Header};
use session_affinity::hosts::{self, HostSet, HostSpec};
use session_affinity::jws::{self, Alg, MacKey};
use session_affinity::metrics::{Counter, Outcome, Tally};
use session_affinity::token;

const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const OTHER_KEY: &str = "ZHyFaEazbRm+DDoK9WnS0KR5CpfWH4fC5OOVI3Bh6os=";
const OUTCOMES: [Outcome; 6] =
    [Outcome::New, Outcome::Sticky, Outcome::Moved, Outcome::Unaffined, Outcome::Rejected, Outcome::NoHost];
const SESSIONS: &[&str] = &["alice", "bob", "conv-7f3a", "会话", "x"];
const REASONS: &[&str] = &[
    "missing",
    "malformed",
    "oversized",
    "disallowed_alg",
    "unknown_key",
    "bad_signature",
    "expired",
    "not_yet_valid",
    "bad_claims",
];

fn configs() -> &'static [Config] {
    static C: OnceLock<Vec<Config>> = OnceLock::new();
    C.get_or_init(|| {
        let key = json!([{"kid": "k1", "alg": "HS256", "secret_base64": KEY}]);
        let ticket = json!({"secret_base64": common::TICKET_KEY_B64, "ttl_seconds": 100});
        let hosts = json!({"hosts": [{"address": "127.0.0.1:1"}]});
        let docs = [
            json!({"token": {"keys": key, "sources": [{"header": "x-session-token"}, {"cookie": "session_token"},
                   {"header": "authorization", "prefix": "Bearer "}]},
                   "ticket": ticket, "upstream": {"fallbacks": 2, "hosts": hosts["hosts"]}}),
            json!({"token": {"keys": key}, "on_missing": "pass", "on_invalid": "pass", "mode": "rendezvous",
                   "ticket": ticket, "upstream": {"fallbacks": 0, "hosts": hosts["hosts"]}}),
            json!({"token": {"keys": key, "require_exp": false, "leeway_seconds": 0, "max_token_bytes": 300},
                   "on_missing": "reject", "on_invalid": "mint", "upstream": {"fallbacks": 16, "hosts": hosts["hosts"]}}),
            json!({"token": {"keys": key, "sources": [{"cookie": "session_token"}, {"header": "authorization", "prefix": "Bearer "}]},
                   "on_invalid": "pass", "ticket": ticket,
                   "upstream": {"override_header": "X-Dest", "fallbacks": 1, "hosts": hosts["hosts"]}}),
            // Other identities: an unsigned header before a signed cookie, and the client
            // address for requests with neither.
            json!({"token": {"keys": key, "sources": [{"header": "x-conversation-id", "unsigned": true},
                   {"cookie": "session_token"}]},
                   "on_missing": "client_address", "ticket": ticket, "upstream": {"fallbacks": 2, "hosts": hosts["hosts"]}}),
            json!({"token": {"keys": key, "sources": [{"cookie": "session_token"}, {"cookie": "conv", "unsigned": true}]},
                   "on_missing": "client_address", "on_invalid": "pass", "mode": "rendezvous", "ticket": ticket,
                   "upstream": {"fallbacks": 1, "hosts": hosts["hosts"]}}),
        ];
        docs.iter().map(|d| Config::parse(d.to_string().as_bytes(), &|_| None).unwrap()).collect()
    })
}

fn host_sets() -> &'static [HostSet] {
    static H: OnceLock<Vec<HostSet>> = OnceLock::new();
    H.get_or_init(|| {
        let spec =
            |a: &str, w: u32, k: Option<&str>| HostSpec { address: a.into(), key: k.unwrap_or(a).into(), weight: w, draining: false };
        let sets = vec![
            vec![],
            vec![spec("127.0.0.1:8001", 1, None)],
            vec![spec("127.0.0.1:8001", 1, None), spec("127.0.0.1:8002", 1, None), spec("127.0.0.1:8003", 1, None)],
            vec![
                spec("10.1.0.11:8000", 1, None),
                spec("10.1.0.12:8000", 2, None),
                spec("[2001:db8::1]:8080", 1, None),
                spec("10.1.0.14:8000", 5, None),
                spec("[::1]:9000", 1, None),
            ],
            vec![
                spec("127.0.0.1:8001", 1, Some("node-a")),
                spec("127.0.0.1:8002", 3, Some("node-b")),
                spec("127.0.0.1:8003", 1, Some("node-c")),
            ],
        ];
        sets.into_iter().map(|s| HostSet::new(s).unwrap()).collect()
    })
}

struct Gen<'a, 'u> {
    u: &'a mut Unstructured<'u>,
    now: i64,
    hosts: &'a HostSet,
}

impl Gen<'_, '_> {
    fn session(&mut self) -> arbitrary::Result<String> {
        Ok(match self.u.int_in_range(0..=15)? {
            0 => self.u.arbitrary()?,
            // Long session ids (up to what a 4096-byte token can carry), with characters
            // that JSON escapes.
            1 => "\"q\\".repeat(usize::from(self.u.arbitrary::<u8>()?) * 4),
            _ => (*self.u.choose(SESSIONS)?).to_string(),
        })
    }

    fn token(&mut self) -> arbitrary::Result<Vec<u8>> {
        let sid = self.session()?;
        let exp = self.now.saturating_add(i64::from(self.u.int_in_range(-100i16..=600)?));
        let key =
            MacKey::new(Alg::HS256, &common::decode_std(if self.u.ratio(6, 7)? { KEY } else { OTHER_KEY })).unwrap();
        let header: &[u8] = match self.u.int_in_range(0..=3)? {
            0 => br#"{"alg":"HS256"}"#,
            1 => br#"{"alg":"HS256","kid":"k1"}"#,
            2 => br#"{"alg":"HS256","kid":"k9"}"#,
            _ => br#"{"alg":"none"}"#,
        };
        let payload = json!({"sid": sid, "exp": exp, "iat": self.now.saturating_sub(10)}).to_string();
        Ok(jws::sign(&key, header, payload.as_bytes()).into_bytes())
    }

    fn ticket(&mut self) -> arbitrary::Result<Vec<u8>> {
        let sid = self.session()?;
        let node = match self.u.int_in_range(0..=2)? {
            0 if !self.hosts.is_empty() => {
                let i = self.u.choose_index(self.hosts.len())?;
                self.hosts.hosts()[i].h64
            }
            1 => affinity::h64(b"10.9.9.9:1"),
            _ => self.u.arbitrary()?,
        };
        let iat = self.now.saturating_sub(i64::from(self.u.int_in_range(0u8..=150)?));
        let key = if self.u.ratio(6, 7)? { common::TICKET_KEY_B64 } else { OTHER_KEY };
        let tickets = session_affinity::ticket::Tickets {
            mac: MacKey::new(Alg::HS256, &common::decode_std(key)).unwrap(),
            ttl_seconds: 100,
        };
        Ok(tickets.issue(&sid, node, iat).into_bytes())
    }

    fn value(&mut self) -> arbitrary::Result<Vec<u8>> {
        Ok(match self.u.int_in_range(0..=9)? {
            8 => self.session()?.into_bytes(),
            9 => {
                let mut v = b"conv=".to_vec();
                v.extend_from_slice(self.session()?.as_bytes());
                v
            }
            0 | 1 => self.token()?,
            2 => self.ticket()?,
            3 => {
                let t = self.token()?;
                let k = self.ticket()?;
                let mut v = b"a=1; session_token=".to_vec();
                v.extend_from_slice(&t);
                v.extend_from_slice(b"; sa_ticket=\"");
                v.extend_from_slice(&k);
                v.push(b'"');
                v
            }
            4 => {
                let mut v = b"bearer  ".to_vec();
                v.extend_from_slice(&self.token()?);
                v
            }
            5 => {
                let i = self.u.choose_index(self.hosts.len().max(1))?;
                self.hosts.hosts().get(i).map_or(b"10.9.9.9:1".to_vec(), |h| h.address.clone().into_bytes())
            }
            _ => self.u.arbitrary::<Vec<u8>>()?,
        })
    }

    fn name(&mut self) -> arbitrary::Result<Vec<u8>> {
        const NAMES: &[&[u8]] = &[
            b"x-session-token",
            b"cookie",
            b"authorization",
            b"x-session-ticket",
            b"x-gateway-destination-endpoint",
            b"X_Gateway_Destination_Endpoint",
            b"x-session-id",
            b"X_SESSION_ID",
            b"x-session-affinity",
            b"x_session-previous-node",
            b"x-dest",
            b"X_DEST",
            b"host",
            b":path",
            b"x-conversation-id",
        ];
        Ok(if self.u.ratio(7, 8)? { self.u.choose(NAMES)?.to_vec() } else { self.u.arbitrary()? })
    }
}

fn outcomes(t: &Tally) -> u64 {
    OUTCOMES.iter().map(|o| t.get(Counter::Outcome(*o))).sum()
}

fn no_ctl(s: &str) -> bool {
    !s.bytes().any(|b| b < 0x20 || b == 0x7f)
}

fn run(data: &[u8]) -> arbitrary::Result<()> {
    let mut u = Unstructured::new(data);
    let cfg = &configs()[u.choose_index(configs().len())?];
    let hosts = &host_sets()[u.choose_index(host_sets().len())?];
    let now = if u.ratio(15, 16)? { common::NOW + i64::from(u.arbitrary::<i32>()?) } else { u.arbitrary()? };
    let rand: Option<[u8; 16]> = if u.ratio(15, 16)? { Some(u.arbitrary()?) } else { None };
    let source_address: Option<String> = match u.int_in_range(0..=5)? {
        0 => Some("127.0.0.1:5000".into()),
        1 => Some("[2001:db8::1]:443".into()),
        2 => Some("[::ffff:10.0.0.1]:1".into()),
        3 => Some("/tmp/envoy.sock".into()),
        4 => None,
        _ => Some(u.arbitrary()?),
    };
    let given = Given { random: rand, source_address };
    let mut owned: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    {
        let mut g = Gen { u: &mut u, now, hosts };
        for _ in 0..g.u.int_in_range(0..=8)? {
            owned.push((g.name()?, g.value()?));
        }
    }
    let request: Vec<Header<'_>> = owned.iter().map(|(n, v)| (&n[..], &v[..])).collect();
    let seed: u64 = u.arbitrary()?;

    let mut scratch = Scratch::new(seed);
    let d = decision::decide(cfg, &request, hosts, now, &mut given.clone(), &mut scratch);
    let t = &scratch.tally;
    assert_eq!(t.get(Counter::Requests), 1);
    assert_eq!(outcomes(t), 1, "exactly one outcome");

    // The memo changes nothing: warm, and on another fresh scratch.
    let again = decision::decide(cfg, &request, hosts, now, &mut given.clone(), &mut scratch);
    assert_eq!(again, d, "warm memo changed the decision");
    let fresh = decision::decide(cfg, &request, hosts, now, &mut given.clone(), &mut Scratch::new(seed ^ 1));
    assert_eq!(fresh, d);
    assert_eq!(scratch.tally.get(Counter::Requests), outcomes(&scratch.tally));

    // Spoofed headers: every spelling of a filter header, nothing else.
    let reserved = [cfg.override_header.as_str(), "x-session-id", "x-session-affinity", "x-session-previous-node"];
    for (n, _) in &request {
        let canon: Vec<u8> = n.iter().map(|b| if *b == b'_' { b'-' } else { b.to_ascii_lowercase() }).collect();
        let spoof = reserved.iter().any(|r| r.as_bytes() == canon);
        assert_eq!(spoof, d.remove.iter().any(|r| r.as_bytes() == *n), "{:?}", String::from_utf8_lossy(n));
    }

    let mut tally = Tally::default();
    match &d.verdict {
        Verdict::Reply(r) => {
            assert!(matches!(r.status, 401 | 503 | 500), "{r:?}");
            if r.status == 401 {
                assert!(REASONS.iter().any(|reason| decision::unauthorized(reason) == *r), "{r:?}");
            }
            if r.status == 503 {
                assert!(hosts.is_empty());
                assert_eq!(*r, decision::no_healthy_upstream());
            }
            return Ok(());
        }
        Verdict::Forward { set, pending } if set.is_empty() => {
            assert_eq!(*pending, Default::default());
            assert_eq!(scratch.tally.get(Counter::Outcome(Outcome::Unaffined)), 2);
        }
        Verdict::Forward { set, pending } => {
            let get = |name: &str| set.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str());
            let names: Vec<&str> = set.iter().map(|(n, _)| *n).collect();
            let session = pending.session.as_deref().unwrap();
            assert!(token::valid_session_id(session));
            assert_eq!(get("x-session-id"), Some(session));
            for (_, v) in set {
                assert!(no_ctl(v), "control byte in a header value: {v:?}");
            }
            let affinity_h = get("x-session-affinity").unwrap();
            let want_names: Vec<&str> = if affinity_h == "moved" {
                vec![cfg.override_header.as_str(), "x-session-id", "x-session-affinity", "x-session-previous-node"]
            } else {
                vec![cfg.override_header.as_str(), "x-session-id", "x-session-affinity"]
            };
            assert_eq!(names, want_names);

            // The override list: hosts of the set, no repeats, in the ranking's order.
            let list: Vec<&str> = get(&cfg.override_header).unwrap().split(',').collect();
            let want_len = (1 + cfg.fallbacks).min(hosts.len());
            assert_eq!(list.len(), want_len);
            let idx: Vec<usize> =
                list.iter().map(|a| hosts.by_address(a).expect("listed host not in the set")).collect();
            for (i, a) in idx.iter().enumerate() {
                assert!(!idx[..i].contains(a), "repeated host {list:?}");
            }
            assert_eq!(pending.primary.as_deref(), Some(list[0]));
            let ranking = hosts.rank(session.as_bytes());

            // The ticket: exactly what a fresh check accepts.
            // A client-address session: `addr:<ip>`, no token, no ticket.
            if !pending.tickets {
                assert!(session.starts_with("addr:"), "{session:?}");
                assert!(pending.minted.is_none());
                assert_eq!(scratch.tally.get(Counter::TokenClientAddress), 2);
            } else {
                assert_eq!(scratch.tally.get(Counter::TokenClientAddress), 0);
            }
            let expected_ticket = match (&cfg.ticket, &pending.minted, pending.tickets) {
                (Some(tc), None, true) => headers::first(&request, "x-session-ticket")
                    .or_else(|| headers::cookie(&request, &tc.cookie))
                    .and_then(|raw| tc.tickets.verify(headers::trim(raw), session, now)),
                _ => None,
            };
            assert_eq!(pending.ticket, expected_ticket);
            let pinned = match (cfg.mode, pending.ticket) {
                (Mode::Pinned, Some(t)) => hosts.by_node(t.node),
                _ => None,
            };
            let want_order: Vec<usize> = match pinned {
                Some(p) => {
                    std::iter::once(p).chain(ranking.iter().copied().filter(|i| *i != p)).take(want_len).collect()
                }
                None => ranking.iter().copied().take(want_len).collect(),
            };
            assert_eq!(idx, want_order);
            let first_node = hosts.hosts()[idx[0]].h64;
            match (affinity_h, pending.ticket) {
                ("new", None) => {}
                ("sticky", Some(t)) => assert_eq!(t.node, first_node),
                ("moved", Some(t)) => {
                    assert_ne!(t.node, first_node);
                    assert_eq!(get("x-session-previous-node"), Some(hosts::node_id(t.node).as_str()));
                }
                other => panic!("affinity {other:?}"),
            }
            if let (Some(tok), true) = (&pending.minted, now.unsigned_abs() < 1 << 52) {
                let v = cfg.validator.validate(tok.as_bytes(), now).expect("minted token validates");
                assert_eq!(v.session, session);
            }
        }
    }

    // The response.
    let Verdict::Forward { pending, .. } = &d.verdict else { return Ok(()) };
    let address: Option<String> = match u.int_in_range(0..=3)? {
        0 => pending.primary.clone(),
        1 if !hosts.is_empty() => Some(hosts.hosts()[u.choose_index(hosts.len())?].address.clone()),
        2 => Some("10.9.9.9:1".into()),
        _ => None,
    };
    let status = match u.int_in_range(0..=3)? {
        0 => Some(200),
        1 => Some(503),
        2 => Some(u.arbitrary()?),
        _ => None,
    };
    let served = Served { address: address.as_deref(), status };
    let add = decision::respond(cfg, pending, served, hosts, now, &mut tally);
    assert_eq!(outcomes(&tally), 0);
    assert_eq!(tally.get(Counter::Requests), 0);
    let failed = status.is_none_or(|s| s >= 500);
    assert_eq!(tally.get(Counter::UpstreamErrors), u64::from(failed));
    assert!(tally.get(Counter::ServedPrimary) + tally.get(Counter::ServedFallback) <= 1);
    for (name, v) in &add {
        assert!(matches!(*name, "set-cookie" | "x-session-token" | "x-session-ticket"), "{name}");
        assert!(no_ctl(v));
    }
    let issued: Vec<&String> = add.iter().filter(|(n, _)| *n == "x-session-ticket").map(|(_, v)| v).collect();
    if !pending.tickets {
        assert!(add.is_empty(), "a client-address session gets no token and no ticket: {add:?}");
    }
    assert_eq!(tally.get(Counter::TicketIssued), issued.len() as u64);
    assert!(issued.len() <= 1);
    // Times where f64 seconds are exact (the contract's numeric dates are JSON numbers).
    let sane_time = now.unsigned_abs() < 1 << 52;
    if let (Some(raw), Some(tc), true) = (issued.first(), &cfg.ticket, sane_time) {
        assert!(!failed, "ticket issued on a failed response");
        let session = pending.session.as_deref().unwrap();
        let t = tc
            .tickets
            .verify(raw.as_bytes(), session, now)
            .unwrap_or_else(|| panic!("issued ticket does not verify: session {session:?} now {now} ticket {raw}"));
        let addr = address.as_deref().unwrap();
        let want = hosts.by_address(addr).map_or_else(|| affinity::h64(addr.as_bytes()), |i| hosts.hosts()[i].h64);
        assert_eq!(t.node, want, "ticket names another node than the one that served");
    }
    if let Some(tok) = &pending.minted {
        assert!(add.iter().any(|(n, v)| *n == "x-session-token" && v == tok));
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(data);
});
