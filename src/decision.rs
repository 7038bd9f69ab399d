//! The per-request policy (DESIGN section 2) as two pure functions.
//!
//! - [`decide`] runs on request headers: it lists the client headers to strip, finds and
//!   validates the session token, reads the ticket, ranks the healthy hosts and returns
//!   either the headers to set upstream or a local reply.
//! - [`respond`] runs on response headers: given the address that really served, it
//!   counts primary/fallback/errors and returns the `set-cookie` and other headers to
//!   add (a minted token, a fresh ticket).
//!
//! Both take the world as arguments (configuration, headers, host set, `now`, and an
//! [`Ask`] for the inputs that cost a host call and are needed only by some requests:
//! randomness for a new session id, the client address) and count into a [`Tally`]; the
//! proxy-wasm glue only gathers and applies.
//!
//! A session is identified (DESIGN sections 3 and 3a) by a signed token, by an unsigned
//! source (trusted callers), or, when no source is present and `on_missing` says so, by
//! the client address. Exactly one of `token.valid`, `token.unsigned`, `token.missing`
//! and `token.invalid.<reason>` is counted per request; `token.minted` and
//! `token.client_address` come on top of `token.missing`.

use crate::affinity;
use crate::config::{
    Action, Config, Mode, Placement, Source, AFFINITY_HEADER, PREVIOUS_NODE_HEADER, SESSION_ID_HEADER, TICKET_HEADER,
    TOKEN_HEADER,
};
use crate::headers::{self, Header};
use crate::hosts::{self, HostSet};
use crate::load::{InFlight, LoadBook};
use crate::memo::{Memos, TokenFacts};
use crate::metrics::{Counter, Outcome, Tally};
use crate::orca;
use crate::placement::{self, NodeView, Placed};
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

/// A local reply (every one the filter can send is listed in docs/protocol.md).
#[derive(Debug, PartialEq, Eq)]
pub struct LocalReply {
    pub status: u32,
    /// Envoy's response-code details (`%RESPONSE_CODE_DETAILS%` in access logs).
    pub details: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

/// What the response phase needs to know about the request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pending {
    /// The session, when the request was affined.
    pub session: Option<String>,
    /// The token of a session minted by this request.
    pub minted: Option<String>,
    /// The request's usable ticket.
    pub ticket: Option<Ticket>,
    /// Whether the session takes tickets: every affined session but one identified by
    /// the client address.
    pub tickets: bool,
    /// Address of the chosen node (first entry of the override header).
    pub primary: Option<String>,
    /// The chosen node's `h64`, so the usual response (served by the primary) needs no
    /// host-set lookup.
    pub primary_node: Option<u64>,
    /// Under `placement`: the request as counted in the chosen node's load, until it ends
    /// ([`LoadBook::finished`]).
    pub in_flight: Option<InFlight>,
    /// Under `placement.saturation`: the filter asked the node for a load report the
    /// client did not ask for, so the report is taken off the response.
    pub strip_load_report: bool,
}

/// Rejection reason for a missing token under `reject`.
pub const MISSING: &str = "missing";

/// The per-VM state a decision reads and updates besides its arguments: counts not yet
/// flushed, the memo of recent successful checks, and (under `placement`) the nodes'
/// loads and load reports.
#[derive(Debug)]
pub struct Scratch {
    pub tally: Tally,
    pub memos: Memos,
    pub load: LoadBook,
    /// The decision's time in milliseconds (set by [`decide_at`]; [`decide`] sets it from
    /// its seconds): load reports age by it.
    pub now_ms: u64,
}

impl Scratch {
    pub fn new(seed: u64) -> Scratch {
        Scratch { tally: Tally::default(), memos: Memos::new(seed), load: LoadBook::default(), now_ms: 0 }
    }

    /// A configuration was applied: the memo, which holds the verdicts of the previous
    /// configuration's keys and settings, starts empty (re-seeded with `seed`). Counts not
    /// yet flushed are kept.
    pub fn new_config(&mut self, seed: u64) {
        self.memos = Memos::new(seed);
    }
}

/// The inputs a decision asks the host for only when it needs them: each is a host call
/// the usual request does not make.
pub trait Ask {
    /// 16 random bytes, for a new session id (only when a session is minted).
    fn random(&mut self) -> Option<[u8; 16]>;
    /// Envoy's `source.address` property: the downstream client as `ip:port` (only
    /// under `on_missing: client_address`, for a request without any session source).
    fn source_address(&mut self) -> Option<Vec<u8>>;
}

/// Fixed answers to [`Ask`], for tests and tools.
#[derive(Clone, Debug, Default)]
pub struct Given {
    pub random: Option<[u8; 16]>,
    pub source_address: Option<String>,
}

impl Given {
    pub fn random(bytes: [u8; 16]) -> Given {
        Given { random: Some(bytes), source_address: None }
    }
}

impl Ask for Given {
    fn random(&mut self) -> Option<[u8; 16]> {
        self.random
    }
    fn source_address(&mut self) -> Option<Vec<u8>> {
        self.source_address.as_ref().map(|a| a.as_bytes().to_vec())
    }
}

/// Decides a request at `now` (Unix seconds).
pub fn decide<'c>(
    cfg: &'c Config,
    request: &[Header<'_>],
    hosts: &HostSet,
    now: i64,
    ask: &mut dyn Ask,
    scratch: &mut Scratch,
) -> Decision<'c> {
    decide_at(cfg, request, hosts, u64::try_from(now).unwrap_or(0).saturating_mul(1000), ask, scratch)
}

/// Decides a request at `now_ms` (Unix milliseconds).
pub fn decide_at<'c>(
    cfg: &'c Config,
    request: &[Header<'_>],
    hosts: &HostSet,
    now_ms: u64,
    ask: &mut dyn Ask,
    scratch: &mut Scratch,
) -> Decision<'c> {
    let now = i64::try_from(now_ms / 1000).unwrap_or(i64::MAX);
    scratch.now_ms = now_ms;
    scratch.tally.add(Counter::Requests);
    let remove = spoofed(cfg, request);
    let verdict = verdict(cfg, request, hosts, now, ask, scratch);
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
    ask: &mut dyn Ask,
    scratch: &mut Scratch,
) -> Verdict<'c> {
    // Step 2-3: the session token, or an unsigned session id.
    let (action, reason) = match find_source(cfg, request) {
        None => {
            scratch.tally.add(Counter::TokenMissing);
            (cfg.on_missing, MISSING)
        }
        Some((source, raw)) if source.unsigned() => match unsigned_session(raw) {
            Some(session) => {
                scratch.tally.add(Counter::TokenUnsigned);
                let h = affinity::h64(session.as_bytes());
                return affined(cfg, request, hosts, now, Session::new(session, h), scratch);
            }
            None => {
                scratch.tally.add(Counter::TokenInvalid(TokenError::BadClaims));
                (cfg.on_invalid, TokenError::BadClaims.reason())
            }
        },
        Some((_, raw)) => match check_token(cfg, raw, now, scratch) {
            Ok(facts) => {
                scratch.tally.add(Counter::TokenValid);
                return affined(cfg, request, hosts, now, Session::new(facts.session, facts.session_h64), scratch);
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
            tally.add(Counter::Outcome(Outcome::Unaffined)); // no session
            Verdict::Forward { set: Vec::new(), pending: Pending::default() }
        }
        Action::ClientAddress => match ask.source_address().as_deref().and_then(client_address_session) {
            Some(session) => {
                tally.add(Counter::TokenClientAddress);
                let h = affinity::h64(session.as_bytes());
                affined(cfg, request, hosts, now, Session { tickets: false, ..Session::new(session, h) }, scratch)
            }
            // No IP client address (a Unix socket listener, say): nothing to be sticky on.
            None => {
                tally.add(Counter::Outcome(Outcome::Unaffined));
                Verdict::Forward { set: Vec::new(), pending: Pending::default() }
            }
        },
        Action::Mint => {
            if hosts.is_empty() {
                tally.add(Counter::Outcome(Outcome::NoHost));
                return Verdict::Reply(no_healthy_upstream());
            }
            let minted = ask.random().and_then(|r| {
                let session = token::new_session_id(&r);
                let tok = cfg.validator.mint(&session, now, cfg.mint_ttl_seconds)?;
                Some((session, tok))
            });
            match minted {
                Some((session, tok)) => {
                    tally.add(Counter::TokenMinted);
                    let h = affinity::h64(session.as_bytes());
                    affined(
                        cfg,
                        request,
                        hosts,
                        now,
                        Session { minted: Some(tok), ..Session::new(session, h) },
                        scratch,
                    )
                }
                None => {
                    tally.add(Counter::Outcome(Outcome::Rejected));
                    Verdict::Reply(no_randomness())
                }
            }
        }
    }
}

/// An identified session, on its way to a node.
struct Session {
    id: String,
    h64: u64,
    /// The token of a session minted by this request.
    minted: Option<String>,
    /// Whether tickets are read and issued (not for client-address sessions).
    tickets: bool,
}

impl Session {
    fn new(id: String, h64: u64) -> Session {
        Session { id, h64, minted: None, tickets: true }
    }
}

/// The session id an unsigned source carries (DESIGN section 3a): 1 to 256 bytes of
/// visible ASCII (0x21-0x7E), else `None` (the request is invalid, `bad_claims`).
pub fn unsigned_session(raw: &[u8]) -> Option<String> {
    if raw.is_empty() || raw.len() > MAX_UNSIGNED_BYTES || !raw.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return None;
    }
    String::from_utf8(raw.to_vec()).ok()
}

/// Longest session id an unsigned source may carry.
pub const MAX_UNSIGNED_BYTES: usize = 256;

/// The session id of a client identified by its address (DESIGN section 3a): `addr:`
/// followed by the IP of Envoy's `source.address` (`ip:port`, IPv6 in brackets), without
/// the port. The IP is written in its canonical text form: IPv4 dotted decimal, IPv6
/// lowercase with the longest run of zero groups compressed (RFC 5952) and no brackets;
/// an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) counts as its IPv4 address. `None` when
/// the address is not an IP one (a Unix socket, say).
pub fn client_address_session(address: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(address).ok()?;
    let ip = match text.parse::<std::net::SocketAddr>() {
        Ok(sa) => sa.ip(),
        Err(_) => text.parse::<std::net::IpAddr>().ok()?,
    };
    let ip = match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
        v4 => v4,
    };
    Some(format!("addr:{ip}"))
}

/// Steps 4-6 for a request that has a session.
fn affined<'c>(
    cfg: &'c Config,
    request: &[Header<'_>],
    hosts: &HostSet,
    now: i64,
    session: Session,
    scratch: &mut Scratch,
) -> Verdict<'c> {
    let Session { id: session, h64: session_h64, minted, tickets } = session;
    // Step 4: the ticket, only for a session that existed before this request.
    let ticket = match (&cfg.ticket, &minted, tickets) {
        (Some(tc), None, true) => {
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
    if hosts.is_empty() {
        scratch.tally.add(Counter::Outcome(Outcome::NoHost));
        return Verdict::Reply(no_healthy_upstream());
    }

    // Step 5: choose the node and its fallbacks.
    let want = (1 + cfg.fallbacks).min(hosts.len());
    let pinned = match (cfg.mode, ticket) {
        (Mode::Pinned, Some(t)) => hosts.by_node(t.node),
        _ => None,
    };
    let mut order = Vec::with_capacity(want + 1);
    match &cfg.placement {
        None => match pinned {
            Some(p) => {
                hosts.top_k(session_h64, want + 1, &mut order);
                order.retain(|i| *i != p);
                order.insert(0, p);
                order.truncate(want);
            }
            None => hosts.top_k(session_h64, want, &mut order),
        },
        Some(pl) => place_under_load(cfg, pl, hosts, session_h64, pinned, tickets, scratch, &mut order),
    }
    let in_flight = match (&cfg.placement, order.first()) {
        (Some(_), Some(&i)) => scratch.load.routed(i),
        _ => None,
    };
    let tally = &mut scratch.tally;
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
    // Ask every upstream for its load report (DESIGN section 10).
    let mut strip_load_report = false;
    if cfg.placement.as_ref().is_some_and(|p| p.saturation.is_some()) {
        strip_load_report = headers::first(request, orca::FORMAT_HEADER).is_none();
        set.push((orca::FORMAT_HEADER, orca::FORMAT_TEXT.to_string()));
    }
    Verdict::Forward {
        set,
        pending: Pending {
            session: Some(session),
            minted,
            ticket,
            tickets,
            primary: Some(chosen.address.clone()),
            primary_node: Some(chosen.h64),
            in_flight,
            strip_load_report,
        },
    }
}

/// Step 5 under `placement` (DESIGN section 10): a pinned session stays on its node
/// (draining or not) unless `spill` moves it off a saturated one; a session that needs a
/// node goes as far down its full ranking as load, saturation and drain say. `order`
/// receives the chosen host, then its fallbacks (the ranking's next hosts, never a
/// draining one).
///
/// A session without tickets (identified by the client address) has nothing to remember
/// a load-dependent choice: it is placed by its ranking, draining hosts aside, every time
/// (so it stays where it is whatever the loads), and counts no placement.
#[allow(clippy::too_many_arguments)]
fn place_under_load(
    cfg: &Config,
    pl: &Placement,
    hosts: &HostSet,
    session_h64: u64,
    pinned: Option<usize>,
    tickets: bool,
    scratch: &mut Scratch,
    order: &mut Vec<usize>,
) {
    let mut ranking = Vec::with_capacity(hosts.len());
    hosts.top_k(session_h64, hosts.len(), &mut ranking);
    let (load, now_ms) = (&scratch.load, scratch.now_ms);
    let views: Vec<NodeView> = hosts
        .hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| NodeView {
            load: load.load(i),
            weight: h.weight,
            saturated: tickets
                && pl.saturation.as_ref().is_some_and(|s| load.saturated(i, s.threshold, s.stale_ms, now_ms)),
            draining: h.draining,
        })
        .collect();
    if !tickets {
        if let Some(c) = placement::place(&ranking, &views, None) {
            order.push(c.host);
            placement::fallbacks(&ranking, &views, c.host, cfg.fallbacks, order);
        }
        return;
    }
    let tally = &mut scratch.tally;
    let chosen = match pinned {
        Some(p) => {
            let spill = pl.saturation.as_ref().is_some_and(|s| s.spill);
            match spill.then(|| placement::spill(&ranking, &views, p, pl.balance_factor)).flatten() {
                Some(c) => {
                    tally.add(Counter::PlacementSpilled);
                    tally.add_n(Counter::PlacementSaturatedSkips, u64::from(c.saturated_skips));
                    c.host
                }
                None => {
                    if views.get(p).is_some_and(|v| v.draining) {
                        tally.add(Counter::PlacementDrainingKept);
                    }
                    p
                }
            }
        }
        None => match placement::place(&ranking, &views, pl.balance_factor) {
            Some(c) => {
                tally.add(match c.placed {
                    Placed::FirstChoice => Counter::PlacementFirstChoice,
                    Placed::Bounded => Counter::PlacementBounded,
                });
                tally.add_n(Counter::PlacementSaturatedSkips, u64::from(c.saturated_skips));
                c.host
            }
            None => return,
        },
    };
    order.push(chosen);
    placement::fallbacks(&ranking, &views, chosen, cfg.fallbacks, order);
}

/// The response phase's part in placement: the served node's load report (the
/// `endpoint-load-metrics` response header, under `placement.saturation`) is recorded;
/// a malformed, hostile or oversized one is ignored. `served` is the node that answered
/// ([`served_node`]).
pub fn observe_load(cfg: &Config, served: Option<u64>, report: Option<&[u8]>, now_ms: u64, load: &mut LoadBook) {
    let Some(s) = cfg.placement.as_ref().and_then(|p| p.saturation.as_ref()) else { return };
    if let (Some(node), Some(value)) = (served, report.and_then(|r| orca::named_metric(r, &s.metric))) {
        load.report(node, value, now_ms);
    }
}

/// What the response phase reads from the response head, in one pass over the response
/// header map (one host call instead of one per header).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResponseHead<'a> {
    /// `:status`.
    pub status: Option<u32>,
    /// Envoy's `x-envoy-attempt-count` (route `include_attempt_count_in_response`) is `1`:
    /// the first attempt answered, so the first entry of the override header served it
    /// (Envoy's `override_host` sends the first attempt there) and the served node needs no
    /// `upstream.address` lookup.
    pub first_attempt: bool,
    /// The ORCA `endpoint-load-metrics` report, if any.
    pub load_report: Option<&'a [u8]>,
}

/// Reads a [`ResponseHead`] from the response headers.
pub fn response_head<'a>(headers: &[Header<'a>]) -> ResponseHead<'a> {
    let mut head = ResponseHead::default();
    for (name, value) in headers {
        if *name == b":status" {
            head.status = std::str::from_utf8(value).ok().and_then(|s| s.parse().ok());
        } else if name.eq_ignore_ascii_case(b"x-envoy-attempt-count") {
            head.first_attempt = *value == b"1";
        } else if name.eq_ignore_ascii_case(orca::REPORT_HEADER.as_bytes()) && head.load_report.is_none() {
            head.load_report = Some(value);
        }
    }
    head
}

/// The node (`h64` of its host key) that answered a forwarded request, by the served
/// address: the primary's without a lookup when it served.
pub fn served_node(pending: &Pending, served: Served<'_>, hosts: &HostSet) -> Option<u64> {
    let addr = served.address?;
    if Some(addr) == pending.primary.as_deref() {
        return pending.primary_node;
    }
    Some(match hosts.by_address(addr).and_then(|i| hosts.hosts().get(i)) {
        Some(h) => h.h64,
        None => affinity::h64(addr.as_bytes()),
    })
}

/// The first configured source that is present, and its value. A header source with a
/// prefix is present only when the value starts with the prefix (so `Authorization:
/// Basic ...` is skipped).
pub fn find_source<'c, 'a>(cfg: &'c Config, request: &[Header<'a>]) -> Option<(&'c Source, &'a [u8])> {
    cfg.sources.iter().find_map(|s| {
        let value = match s {
            Source::Header { name, prefix: None, .. } => headers::first(request, name).map(headers::trim),
            Source::Header { name, prefix: Some(p), .. } => headers::first(request, name)
                .and_then(|v| headers::strip_prefix_ci(headers::trim(v), p))
                .map(headers::trim),
            Source::Cookie { name, .. } => headers::cookie(request, name),
        };
        value.map(|v| (s, v))
    })
}

/// The value of the first configured source that is present (see [`find_source`]).
pub fn find_token<'a>(cfg: &Config, request: &[Header<'a>]) -> Option<&'a [u8]> {
    find_source(cfg, request).map(|(_, v)| v)
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

/// The contract's 401: a missing token under `on_missing: reject`, or an invalid one
/// under `on_invalid: reject`.
pub fn unauthorized(reason: &str) -> LocalReply {
    LocalReply {
        status: 401,
        details: if reason == MISSING { "session_affinity_missing_token" } else { "session_affinity_invalid_token" },
        headers: vec![
            ("content-type", "application/json".into()),
            ("www-authenticate", r#"Bearer error="invalid_token""#.into()),
        ],
        body: format!(r#"{{"error":"invalid_session_token","reason":"{reason}"}}"#),
    }
}

/// The contract's 503: no healthy host for a request that needs one.
pub fn no_healthy_upstream() -> LocalReply {
    LocalReply {
        status: 503,
        details: "session_affinity_no_healthy_upstream",
        headers: vec![("content-type", "application/json".into())],
        body: r#"{"error":"no_healthy_upstream"}"#.into(),
    }
}

/// 500: the host gave no randomness for a new session id (never expected).
pub fn no_randomness() -> LocalReply {
    LocalReply {
        status: 500,
        details: "session_affinity_no_randomness",
        headers: vec![("content-type", "application/json".into())],
        body: r#"{"error":"internal","detail":"no randomness for a new session"}"#.into(),
    }
}

/// 500: the request headers could not be read from the host (never expected). Refusing
/// is the safe answer: without them the filter can neither strip spoofed headers nor
/// find the session.
pub fn unreadable_headers() -> LocalReply {
    LocalReply {
        status: 500,
        details: "session_affinity_unreadable_headers",
        headers: vec![("content-type", "application/json".into())],
        body: r#"{"error":"internal","detail":"request headers unreadable"}"#.into(),
    }
}

/// Every local reply the filter can send, one of each kind (for docs and tests).
pub fn all_local_replies() -> Vec<LocalReply> {
    vec![
        unauthorized(MISSING),
        unauthorized(TokenError::Expired.reason()),
        no_healthy_upstream(),
        no_randomness(),
        unreadable_headers(),
    ]
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
    now: i64,
    tally: &mut Tally,
) -> Vec<(&'static str, String)> {
    let mut add = Vec::new();
    let failed = served.status.is_none_or(|s| s >= 500);
    if failed {
        tally.add(Counter::UpstreamErrors);
    }
    let on_primary = served.address.is_some() && served.address == pending.primary.as_deref();
    // The node that served, by `h64(host key)`; its key names its counter (asked for
    // only the first time this VM counts the node).
    let node = match (served.address, pending.primary_node) {
        (Some(_), Some(p)) if on_primary => {
            tally.add_node(p, || {
                hosts
                    .by_node(p)
                    .and_then(|i| hosts.hosts().get(i))
                    .map_or_else(|| pending.primary.clone().unwrap_or_default(), |h| h.key.clone())
            });
            Some(p)
        }
        (Some(addr), _) => {
            let (h, key) = match hosts.by_address(addr).and_then(|i| hosts.hosts().get(i)) {
                Some(h) => (h.h64, h.key.as_str()),
                // Not in the set: its host key is its address.
                None => (affinity::h64(addr.as_bytes()), addr),
            };
            tally.add_node(h, || key.to_string());
            Some(h)
        }
        (None, _) => None,
    };
    if node.is_some() && pending.primary.is_some() {
        tally.add(if on_primary { Counter::ServedPrimary } else { Counter::ServedFallback });
    }
    let Some(session) = &pending.session else { return add };
    if let Some(tok) = &pending.minted {
        add.push(("set-cookie", cookie(&cfg.mint_cookie, tok, cfg.mint_ttl_seconds)));
        add.push((TOKEN_HEADER, tok.clone()));
    }
    if let (Some(tc), Some(node), false, true) = (&cfg.ticket, node, failed, pending.tickets) {
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
