//! The per-request policy (DESIGN section 2) as two pure functions.
//!
//! - [`decide`] runs on request headers: it lists the client headers to strip, finds and
//!   validates the session token, reads the ticket, ranks the healthy hosts and returns
//!   either the headers to set upstream or a local reply.
//! - [`respond`] runs on response headers: given the address that really served, it
//!   counts primary/fallback/errors and returns the `set-cookie` and other headers to
//!   add (a minted token, a fresh ticket).
//!
//! Both take the world as arguments (configuration, headers, host set, `now`, a source of
//! randomness) and count into a [`Tally`]; the proxy-wasm glue only gathers and applies.

use crate::affinity;
use crate::config::{
    Action, Config, Mode, Source, AFFINITY_HEADER, PREVIOUS_NODE_HEADER, SESSION_ID_HEADER, TICKET_HEADER, TOKEN_HEADER,
};
use crate::headers::{self, Header};
use crate::hosts::{self, HostSet};
use crate::memo::{Memos, TokenFacts};
use crate::metrics::{Counter, NodeSlots, Outcome, Tally};
use crate::ticket::{Ticket, MAX_TICKET_BYTES};
use crate::token::{self, TokenError};

/// What to do with a request.
#[derive(Debug, PartialEq, Eq)]
pub struct Decision<'c> {
    /// Client headers to remove, by their received names (spoofed filter headers).
    pub remove: Vec<String>,
    pub verdict: Verdict<'c>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Verdict<'c> {
    /// Continue upstream after setting these headers.
    Forward { set: Vec<(&'c str, String)>, pending: Pending },
    /// Answer locally.
    Reply(LocalReply),
}

/// A local reply.
#[derive(Debug, PartialEq, Eq)]
pub struct LocalReply {
    pub status: u32,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

/// What the response phase needs to know about the request.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pending {
    /// The session, when the request was affined.
    pub session: Option<String>,
    /// The token of a session minted by this request.
    pub minted: Option<String>,
    /// The request's usable ticket.
    pub ticket: Option<Ticket>,
    /// Address of the chosen node (first entry of the override header).
    pub primary: Option<String>,
    /// The chosen node's `h64` and counter slot, so the usual response (served by the
    /// primary) needs no host-set lookup.
    pub primary_node: Option<(u64, usize)>,
}

/// Rejection reason for a missing token under `reject`.
pub const MISSING: &str = "missing";

/// The per-VM state a decision reads and updates besides its arguments: counts not yet
/// flushed, and the memo of recent successful checks.
#[derive(Debug)]
pub struct Scratch {
    pub tally: Tally,
    pub memos: Memos,
}

impl Scratch {
    pub fn new(seed: u64) -> Scratch {
        Scratch { tally: Tally::default(), memos: Memos::new(seed) }
    }
}

/// Decides a request. `random` is asked for 16 bytes only when a session is minted.
pub fn decide<'c>(
    cfg: &'c Config,
    request: &[Header<'_>],
    hosts: &HostSet,
    now: i64,
    random: &mut dyn FnMut() -> Option<[u8; 16]>,
    scratch: &mut Scratch,
) -> Decision<'c> {
    scratch.tally.add(Counter::Requests);
    let remove = spoofed(cfg, request);
    let verdict = verdict(cfg, request, hosts, now, random, scratch);
    Decision { remove, verdict }
}

/// Validates a token, through the memo (see [`crate::memo`]).
pub fn check_token(cfg: &Config, raw: &[u8], now: i64, scratch: &mut Scratch) -> Result<TokenFacts, TokenError> {
    if let Some(facts) = scratch.memos.tokens.get(raw) {
        facts.check_time(now, cfg.validator.leeway_seconds)?;
        return Ok(facts.clone());
    }
    let valid = cfg.validator.validate(raw, now)?;
    let facts = TokenFacts {
        session_h64: affinity::h64(valid.session.as_bytes()),
        session: valid.session,
        exp: valid.exp,
        nbf: valid.nbf,
    };
    scratch.memos.tokens.put(raw, facts.clone());
    Ok(facts)
}

fn verdict<'c>(
    cfg: &'c Config,
    request: &[Header<'_>],
    hosts: &HostSet,
    now: i64,
    random: &mut dyn FnMut() -> Option<[u8; 16]>,
    scratch: &mut Scratch,
) -> Verdict<'c> {
    // Step 2-3: the session token.
    let (action, reason) = match find_token(cfg, request) {
        None => {
            scratch.tally.add(Counter::TokenMissing);
            (cfg.on_missing, MISSING)
        }
        Some(raw) => match check_token(cfg, raw, now, scratch) {
            Ok(facts) => {
                scratch.tally.add(Counter::TokenValid);
                return affined(cfg, request, hosts, now, facts.session, facts.session_h64, None, scratch);
            }
            Err(e) => {
                scratch.tally.add(Counter::TokenInvalid(e));
                (cfg.on_invalid, e.reason())
            }
        },
    };
    let tally = &mut scratch.tally;
    match action {
        Action::Reject => {
            tally.add(Counter::Outcome(Outcome::Rejected));
            Verdict::Reply(unauthorized(reason))
        }
        Action::Pass => {
            tally.add(Counter::Outcome(Outcome::Unaffined));
            Verdict::Forward { set: Vec::new(), pending: Pending::default() }
        }
        Action::Mint => {
            if hosts.is_empty() {
                tally.add(Counter::Outcome(Outcome::NoHost));
                return Verdict::Reply(no_healthy_upstream());
            }
            let minted = random().and_then(|r| {
                let session = token::new_session_id(&r);
                let tok = cfg.validator.mint(&session, now, cfg.mint_ttl_seconds)?;
                Some((session, tok))
            });
            match minted {
                Some((session, tok)) => {
                    tally.add(Counter::TokenMinted);
                    let h = affinity::h64(session.as_bytes());
                    affined(cfg, request, hosts, now, session, h, Some(tok), scratch)
                }
                None => {
                    tally.add(Counter::Outcome(Outcome::Rejected));
                    Verdict::Reply(internal_error())
                }
            }
        }
    }
}

/// Steps 4-6 for a request that has a session.
#[allow(clippy::too_many_arguments)]
fn affined<'c>(
    cfg: &'c Config,
    request: &[Header<'_>],
    hosts: &HostSet,
    now: i64,
    session: String,
    session_h64: u64,
    minted: Option<String>,
    scratch: &mut Scratch,
) -> Verdict<'c> {
    // Step 4: the ticket, only for a session that existed before this request.
    let ticket = match (&cfg.ticket, &minted) {
        (Some(tc), None) => {
            let raw = headers::first(request, TICKET_HEADER).or_else(|| headers::cookie(request, &tc.cookie));
            match raw.map(headers::trim) {
                Some(raw) => {
                    let memo = match scratch.memos.tickets.get(raw) {
                        Some((sid, t)) if *sid == session && now < t.exp => Some(*t),
                        _ => None,
                    };
                    let t = memo.or_else(|| {
                        let t = tc.tickets.verify(raw, &session, now)?;
                        scratch.memos.tickets.put(raw, (session.clone(), t));
                        Some(t)
                    });
                    if t.is_none() {
                        scratch.tally.add(Counter::TicketIgnored);
                    }
                    t
                }
                None => None,
            }
        }
        _ => None,
    };
    let tally = &mut scratch.tally;

    if hosts.is_empty() {
        tally.add(Counter::Outcome(Outcome::NoHost));
        return Verdict::Reply(no_healthy_upstream());
    }

    // Step 5: choose the node and its fallbacks.
    let want = (1 + cfg.fallbacks).min(hosts.len());
    let pinned = match (cfg.mode, ticket) {
        (Mode::Pinned, Some(t)) => hosts.by_node(t.node),
        _ => None,
    };
    let mut order = Vec::with_capacity(want + 1);
    match pinned {
        Some(p) => {
            hosts.top_k(session_h64, want + 1, &mut order);
            order.retain(|i| *i != p);
            order.insert(0, p);
            order.truncate(want);
        }
        None => hosts.top_k(session_h64, want, &mut order),
    }
    let list = hosts.hosts();
    let Some(chosen) = order.first().and_then(|i| list.get(*i)) else {
        tally.add(Counter::Outcome(Outcome::NoHost));
        return Verdict::Reply(no_healthy_upstream());
    };

    let mut value = String::with_capacity(order.len() * 22);
    for (n, i) in order.iter().enumerate() {
        if let Some(h) = list.get(*i) {
            if n > 0 {
                value.push(',');
            }
            value.push_str(&h.address);
        }
    }

    // Step 6: tell the node.
    let outcome = match ticket {
        None => Outcome::New,
        Some(t) if t.node == chosen.h64 => Outcome::Sticky,
        Some(_) => Outcome::Moved,
    };
    tally.add(Counter::Outcome(outcome));
    let mut set: Vec<(&'c str, String)> = Vec::with_capacity(4);
    set.push((cfg.override_header.as_str(), value));
    set.push((SESSION_ID_HEADER, session.clone()));
    set.push((AFFINITY_HEADER, outcome.name().to_string()));
    if let (Outcome::Moved, Some(t)) = (outcome, ticket) {
        set.push((PREVIOUS_NODE_HEADER, hosts::node_id(t.node)));
    }
    Verdict::Forward {
        set,
        pending: Pending {
            session: Some(session),
            minted,
            ticket,
            primary: Some(chosen.address.clone()),
            primary_node: Some((chosen.h64, chosen.slot)),
        },
    }
}

/// The first configured source that is present. A header source with a prefix is present
/// only when the value starts with the prefix (so `Authorization: Basic ...` is skipped).
pub fn find_token<'a>(cfg: &Config, request: &[Header<'a>]) -> Option<&'a [u8]> {
    cfg.sources.iter().find_map(|s| match s {
        Source::Header { name, prefix: None } => headers::first(request, name).map(headers::trim),
        Source::Header { name, prefix: Some(p) } => {
            headers::first(request, name).and_then(|v| headers::strip_prefix_ci(headers::trim(v), p)).map(headers::trim)
        }
        Source::Cookie { name } => headers::cookie(request, name),
    })
}

/// Client headers that spell one the filter sets upstream.
pub fn spoofed(cfg: &Config, request: &[Header<'_>]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (name, _) in request {
        let reserved = [cfg.override_header.as_str(), SESSION_ID_HEADER, AFFINITY_HEADER, PREVIOUS_NODE_HEADER];
        if reserved.iter().any(|r| headers::is_spelling_of(name, r)) {
            // A spelling of an ASCII name is ASCII.
            let n = String::from_utf8_lossy(name).into_owned();
            if !out.contains(&n) {
                out.push(n);
            }
        }
    }
    out
}

/// The contract's 401.
pub fn unauthorized(reason: &str) -> LocalReply {
    LocalReply {
        status: 401,
        headers: vec![
            ("content-type", "application/json".into()),
            ("www-authenticate", r#"Bearer error="invalid_token""#.into()),
        ],
        body: format!(r#"{{"error":"invalid_session_token","reason":"{reason}"}}"#),
    }
}

/// The contract's 503.
pub fn no_healthy_upstream() -> LocalReply {
    LocalReply {
        status: 503,
        headers: vec![("content-type", "application/json".into())],
        body: r#"{"error":"no_healthy_upstream"}"#.into(),
    }
}

fn internal_error() -> LocalReply {
    LocalReply {
        status: 500,
        headers: vec![("content-type", "application/json".into())],
        body: r#"{"error":"internal","detail":"no randomness for a new session"}"#.into(),
    }
}

/// What the response phase observed.
#[derive(Debug, Clone, Copy)]
pub struct Served<'a> {
    /// `upstream.address`: the host that answered, if any.
    pub address: Option<&'a str>,
    /// The response `:status`, if any.
    pub status: Option<u32>,
}

/// Handles response headers for a forwarded request. Returns headers to add.
pub fn respond(
    cfg: &Config,
    pending: &Pending,
    served: Served<'_>,
    hosts: &HostSet,
    slots: &mut NodeSlots,
    now: i64,
    tally: &mut Tally,
) -> Vec<(&'static str, String)> {
    let mut add = Vec::new();
    let failed = served.status.is_none_or(|s| s >= 500);
    if failed {
        tally.add(Counter::UpstreamErrors);
    }
    let on_primary = served.address.is_some() && served.address == pending.primary.as_deref();
    // (h64, counter slot) of the node that served.
    let node = match (served.address, pending.primary_node) {
        (Some(_), Some(p)) if on_primary => Some(p),
        (Some(addr), _) => Some(match hosts.by_address(addr).and_then(|i| hosts.hosts().get(i)) {
            Some(h) => (h.h64, h.slot),
            None => (affinity::h64(addr.as_bytes()), slots.slot(&hosts::metric_label(addr))),
        }),
        (None, _) => None,
    };
    if let Some((_, slot)) = node {
        tally.add_node(slot);
        if pending.primary.is_some() {
            tally.add(if on_primary { Counter::ServedPrimary } else { Counter::ServedFallback });
        }
    }
    let Some(session) = &pending.session else { return add };
    if let Some(tok) = &pending.minted {
        add.push(("set-cookie", cookie(&cfg.mint_cookie, tok, cfg.mint_ttl_seconds)));
        add.push((TOKEN_HEADER, tok.clone()));
    }
    if let (Some(tc), Some((node, _)), false) = (&cfg.ticket, node, failed) {
        let fresh = match &pending.ticket {
            Some(t) => t.node != node || tc.tickets.needs_refresh(t, now),
            None => true,
        };
        if fresh {
            let t = tc.tickets.issue(session, node, now);
            // A session id long enough to make the ticket larger than verify accepts
            // (about 650 bytes) gets no ticket: it could never come back usable.
            if t.len() <= MAX_TICKET_BYTES {
                add.push(("set-cookie", cookie(&tc.cookie, &t, tc.tickets.ttl_seconds)));
                add.push((TICKET_HEADER, t));
                tally.add(Counter::TicketIssued);
            }
        }
    }
    add
}

/// A `set-cookie` value with the contract's attributes.
pub fn cookie(name: &str, value: &str, max_age: i64) -> String {
    format!("{name}={value}; Max-Age={max_age}; Path=/; HttpOnly; Secure; SameSite=Lax")
}
