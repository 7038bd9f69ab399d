//! The request handler: `Service::handle(&Request, local, now) -> Response`, the whole chat
//! policy in one place, written against the [`Store`] and [`Model`] seams so it is
//! tested natively with an in-memory store.
//!
//! Invariants:
//! - A turn is answered 200 only after the whole conversation, this turn included, has
//!   been written to the store (`SET key value EX ttl`). If the store write fails the
//!   reply is 503 and the in-memory copy keeps the last acknowledged state.
//! - Turns of one session are serialised on this node (a striped lock held from load to
//!   store), so two concurrent requests cannot both claim turn n.
//! - The memory copy is trusted only for `x-session-affinity: sticky` (or when the header
//!   is absent, i.e. no filter in front). On `moved` the conversation may have advanced on
//!   another node, and on `new` (no ticket: new session or lost cookie) it may have too,
//!   so both reload from the store. For a new session that costs the same single `GET` a
//!   cache miss costs anyway.
//! - Even a `sticky` request reloads when this node is not the first entry of the
//!   override header ([`OVERRIDE_HEADER`]): Envoy retried it here after the session's
//!   primary failed, so the conversation lives elsewhere and any memory copy here may be
//!   stale (see [`Placement`]).
//! - `x-session-id` is trusted as the identity because the Envoy filter strips every
//!   client copy; the node itself cannot tell a forged one.
//! - A request that says which turn it is (the optional body field `turn`) is applied
//!   only as the next turn. If the conversation already ends with that very turn, an
//!   earlier attempt was applied and its reply lost (a client timeout, a node killed
//!   between the store write and the reply): it is answered again from the conversation,
//!   never applied twice. Any other mismatch is a 409.

use crate::conversation::{store_key, Conversation};
use crate::http::{Request, Response};
use crate::lru::Lru;
use crate::model::Model;
use crate::stats::Stats;
use crate::store::{Store, StoreError};
use serde::Deserialize;
use serde_json::json;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

/// Longest accepted `x-session-id`, in bytes.
pub const MAX_SESSION_ID_BYTES: usize = 512;
/// Most message bytes one conversation may hold (it is rewritten whole every turn).
pub const MAX_CONVERSATION_BYTES: usize = 16 * 1024 * 1024;
/// Number of striped per-session locks.
const LOCK_STRIPES: usize = 4096;
/// The header in which the filter lists the session's primary node first, then its
/// fallbacks (`ip:port`, IPv6 in brackets); Envoy's `override_host` policy reads it and
/// passes it on to the node. The filter's default `upstream.override_header`.
pub const OVERRIDE_HEADER: &str = "x-gateway-destination-endpoint";

/// Where a turn found its conversation (the `context` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Context {
    Memory,
    Store,
    New,
}

impl Context {
    pub fn as_str(self) -> &'static str {
        match self {
            Context::Memory => "memory",
            Context::Store => "store",
            Context::New => "new",
        }
    }
}

/// What the filter says about the session (`x-session-affinity`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Affinity {
    /// No header: no filter in front (direct use, tests).
    Absent,
    New,
    Sticky,
    Moved,
    /// A value this node does not know: treated like `moved` (reload).
    Unknown,
}

impl Affinity {
    pub fn from_header(value: Option<&[u8]>) -> Affinity {
        match value {
            None => Affinity::Absent,
            Some(v) if v.eq_ignore_ascii_case(b"sticky") => Affinity::Sticky,
            Some(v) if v.eq_ignore_ascii_case(b"moved") => Affinity::Moved,
            Some(v) if v.eq_ignore_ascii_case(b"new") => Affinity::New,
            Some(_) => Affinity::Unknown,
        }
    }

    /// Whether the in-memory copy may be used as is.
    pub fn trusts_memory(self) -> bool {
        matches!(self, Affinity::Absent | Affinity::Sticky)
    }
}

/// Whether this node is the session's primary, judged from the override header and the
/// local address of the connection the request came on.
///
/// Envoy sends a request to the first entry of the override header and walks the others
/// only on retries, so a request that arrives at any other entry was retried here after
/// the primary failed. The filter still says `sticky` (it decided before the retry), but
/// the conversation has been served elsewhere since this node last saw it: a memory copy
/// here may be stale (conversation moved A → B, B died, the retry lands on A).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// No override header, or a blank one (no filter in front, or `pass`), or the local
    /// address is unknown.
    Unknown,
    /// This node is the first entry.
    Primary,
    /// Another node is the first entry (or the first entry is not an `ip:port`): a retry.
    Fallback,
}

impl Placement {
    /// Compares the first entry of `header` with `local`, the local socket address of the
    /// connection Envoy opened to this node. IPv4-mapped IPv6 addresses (a dual-stack
    /// listener) compare equal to their IPv4 form.
    pub fn of(header: Option<&[u8]>, local: Option<SocketAddr>) -> Placement {
        let (Some(header), Some(local)) = (header, local) else {
            return Placement::Unknown;
        };
        if header.iter().all(|b| b.is_ascii_whitespace()) {
            return Placement::Unknown;
        }
        let first = header.split(|&b| b == b',').next().unwrap_or_default();
        let primary = std::str::from_utf8(first).ok().and_then(|f| f.trim().parse::<SocketAddr>().ok());
        match primary {
            Some(primary) if same_endpoint(primary, local) => Placement::Primary,
            _ => Placement::Fallback,
        }
    }
}

fn same_endpoint(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && a.ip().to_canonical() == b.ip().to_canonical()
}

#[derive(Deserialize)]
struct ChatBody {
    message: String,
    /// The turn number the client expects this message to become: its acknowledged
    /// turns + 1. Optional; without it every request is appended.
    #[serde(default)]
    turn: Option<u64>,
}

/// How a request's `turn` relates to the conversation it found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TurnCheck {
    /// No `turn`, or the conversation has `turn - 1` turns: append.
    Next,
    /// The conversation's last turn is this turn with this message: a retry of a turn
    /// already applied. Answer it again, do not append.
    Replay,
    /// Anything else: the client and the conversation disagree.
    Conflict,
}

impl TurnCheck {
    fn of(history: &Conversation, turn: Option<u64>, message: &str) -> TurnCheck {
        let Some(turn) = turn else {
            return TurnCheck::Next;
        };
        let have = history.turns();
        if turn == have + 1 {
            TurnCheck::Next
        } else if turn == have && turn > 0 && history.user_messages().last() == Some(message) {
            TurnCheck::Replay
        } else {
            TurnCheck::Conflict
        }
    }
}

/// Node state shared by every connection thread.
pub struct Service {
    node_id: String,
    ttl_seconds: u64,
    cache: Mutex<Lru<String, Arc<Conversation>>>,
    locks: Vec<Mutex<()>>,
    lock_hasher: RandomState,
    store: Arc<dyn Store>,
    model: Box<dyn Model>,
    stats: Arc<Stats>,
}

impl Service {
    pub fn new(
        node_id: &str,
        cache_size: usize,
        ttl_seconds: u64,
        store: Arc<dyn Store>,
        model: Box<dyn Model>,
        stats: Arc<Stats>,
    ) -> Self {
        Self {
            node_id: node_id.to_owned(),
            ttl_seconds,
            cache: Mutex::new(Lru::new(cache_size)),
            locks: (0..LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
            lock_hasher: RandomState::new(),
            store,
            model,
            stats,
        }
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Answers one request that arrived on a connection whose local socket address is
    /// `local` (`None` if unknown); `unix_now` is recorded in the stored value.
    pub fn handle(&self, req: &Request, local: Option<SocketAddr>, unix_now: u64) -> Response {
        let resp = match (req.method.as_str(), req.path()) {
            ("POST", "/v1/chat") => self.chat(req, local, unix_now),
            ("GET" | "HEAD", "/healthz") => Response::text(200, "ok"),
            ("GET" | "HEAD", "/stats") => {
                let entries = self.lock_cache().len();
                Response::json(200, &self.stats.to_json(&self.node_id, entries))
            }
            (_, "/v1/chat") => error(405, "method_not_allowed", "use POST").with_header("allow", "POST"),
            (_, "/healthz" | "/stats") => error(405, "method_not_allowed", "use GET").with_header("allow", "GET, HEAD"),
            _ => error(404, "not_found", "no such resource"),
        };
        resp.with_header("x-served-by", &self.node_id)
    }

    fn chat(&self, req: &Request, local: Option<SocketAddr>, unix_now: u64) -> Response {
        Stats::inc(&self.stats.chat_requests);
        let session_id = match session_id(req) {
            Ok(sid) => sid,
            Err(resp) => return self.bad_request(resp),
        };
        let (message, turn) = match serde_json::from_slice::<ChatBody>(&req.body) {
            Ok(ChatBody { turn: Some(0), .. }) => {
                return self.bad_request(error(400, "bad_request", "body: turn must be at least 1"));
            }
            Ok(body) => (body.message, body.turn),
            Err(e) => {
                return self.bad_request(error(400, "bad_request", &format!("body: {e}")));
            }
        };
        let affinity = Affinity::from_header(req.header("x-session-affinity"));
        if affinity == Affinity::Moved {
            Stats::inc(&self.stats.moved);
        }
        let placement = Placement::of(req.header(OVERRIDE_HEADER), local);
        // A retry on a fallback node is a move the filter could not see: reload.
        let retried_here = placement == Placement::Fallback && affinity.trusts_memory();
        if retried_here {
            Stats::inc(&self.stats.fallback);
        }
        let trust_memory = affinity.trusts_memory() && !retried_here;

        let stripe = self.lock_hasher.hash_one(session_id) as usize % self.locks.len();
        let _turn_guard = self.locks[stripe].lock().unwrap_or_else(|e| e.into_inner());
        let key = store_key(session_id);

        let (history, context) = match self.load(session_id, &key, trust_memory) {
            Ok(found) => found,
            Err(resp) => return resp,
        };
        if affinity == Affinity::Moved {
            let previous = req.header("x-session-previous-node").map(String::from_utf8_lossy).unwrap_or_default();
            eprintln!(
                "node {}: conversation moved here from node {previous:?}: context {}, {} turn(s) so far",
                self.node_id,
                context.as_str(),
                history.turns()
            );
        } else if retried_here {
            let primary = req.header(OVERRIDE_HEADER).map(String::from_utf8_lossy).unwrap_or_default();
            eprintln!(
                "node {}: retried here as a fallback (override header {primary:?}): context {}, {} turn(s) so far",
                self.node_id,
                context.as_str(),
                history.turns()
            );
        }

        match TurnCheck::of(&history, turn, &message) {
            TurnCheck::Next => {}
            TurnCheck::Replay => return self.replay(session_id, &key, history, context, unix_now),
            TurnCheck::Conflict => {
                let have = history.turns();
                self.remember(session_id, history);
                return self.bad_request(error(
                    409,
                    "turn_conflict",
                    &format!(
                        "this message was sent as turn {} but the conversation has {have} turn(s)",
                        turn.unwrap_or(0)
                    ),
                ));
            }
        }

        let reply = match self.model.reply(&history, &message) {
            Ok(reply) => reply,
            Err(e) => {
                Stats::inc(&self.stats.llm_errors);
                eprintln!("node {}: {e}", self.node_id);
                self.remember(session_id, history);
                return error(502, "model_unavailable", &e.to_string());
            }
        };
        let next = Arc::new(history.with_turn(&message, &reply));
        if next.content_bytes() > MAX_CONVERSATION_BYTES {
            self.remember(session_id, history);
            return self.bad_request(error(
                413,
                "conversation_too_large",
                "this conversation holds too much text to store another turn",
            ));
        }
        let value = next.encode(session_id, &self.node_id, unix_now);
        if let Err(e) = self.store.set_ex(&key, &value, self.ttl_seconds) {
            Stats::inc(&self.stats.store_failures);
            // Memory keeps the last acknowledged state: the client will retry this turn.
            self.remember(session_id, history);
            return store_error(&e);
        }
        self.remember(session_id, Arc::clone(&next));

        Stats::inc(&self.stats.turns);
        match context {
            Context::Memory => Stats::inc(&self.stats.memory_hits),
            Context::Store => Stats::inc(&self.stats.store_loads),
            Context::New => Stats::inc(&self.stats.new_conversations),
        }
        Response::json(
            200,
            &json!({
                "reply": reply,
                "turn": next.turns(),
                "node": self.node_id,
                "context": context.as_str(),
                "history_digest": next.digest(),
            }),
        )
    }

    /// Answers a retried turn that an earlier attempt already applied: the stored reply
    /// of the last turn, after writing the conversation again (as every acknowledgement
    /// follows a store write; it also re-replicates a write a failed-over Redis master
    /// may have lost).
    fn replay(
        &self,
        session_id: &str,
        key: &str,
        history: Arc<Conversation>,
        context: Context,
        unix_now: u64,
    ) -> Response {
        let value = history.encode(session_id, &self.node_id, unix_now);
        if let Err(e) = self.store.set_ex(key, &value, self.ttl_seconds) {
            Stats::inc(&self.stats.store_failures);
            self.remember(session_id, history);
            return store_error(&e);
        }
        Stats::inc(&self.stats.replayed);
        eprintln!(
            "node {}: turn {} was already applied (a retry whose earlier reply was lost): answered again",
            self.node_id,
            history.turns()
        );
        let reply = history.messages().last().map(|m| m.content.clone()).unwrap_or_default();
        let body = json!({
            "reply": reply,
            "turn": history.turns(),
            "node": self.node_id,
            "context": context.as_str(),
            "history_digest": history.digest(),
            "replayed": true,
        });
        self.remember(session_id, history);
        Response::json(200, &body)
    }

    /// The conversation before this turn, and where it came from; the memory copy is
    /// used only if `trust_memory`.
    fn load(&self, session_id: &str, key: &str, trust_memory: bool) -> Result<(Arc<Conversation>, Context), Response> {
        if trust_memory {
            if let Some(found) = self.lock_cache().get(&session_id.to_owned()) {
                return Ok((found, Context::Memory));
            }
        } else {
            // The memory copy may be stale; drop it now so a failed reload cannot leave
            // it behind for the next sticky turn.
            self.lock_cache().remove(&session_id.to_owned());
        }
        match self.store.get(key) {
            Ok(Some(bytes)) => match Conversation::decode(&bytes, session_id) {
                Ok(conversation) => Ok((Arc::new(conversation), Context::Store)),
                Err(e) => {
                    Stats::inc(&self.stats.store_corrupt);
                    eprintln!("node {}: key {key}: {e}", self.node_id);
                    Err(error(500, "corrupt_conversation", &e.to_string()))
                }
            },
            Ok(None) => Ok((Arc::new(Conversation::new()), Context::New)),
            Err(e) => {
                Stats::inc(&self.stats.store_failures);
                Err(store_error(&e))
            }
        }
    }

    fn remember(&self, session_id: &str, conversation: Arc<Conversation>) {
        self.lock_cache().put(session_id.to_owned(), conversation);
    }

    fn lock_cache(&self) -> MutexGuard<'_, Lru<String, Arc<Conversation>>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bad_request(&self, resp: Response) -> Response {
        Stats::inc(&self.stats.bad_requests);
        resp
    }
}

/// The session id from `x-session-id`, or the 400 to send.
fn session_id(req: &Request) -> Result<&str, Response> {
    let raw = req.header("x-session-id").unwrap_or_default();
    if raw.is_empty() {
        return Err(error(400, "missing_session_id", "x-session-id header is required"));
    }
    if raw.len() > MAX_SESSION_ID_BYTES {
        return Err(error(400, "bad_session_id", "x-session-id is too long"));
    }
    std::str::from_utf8(raw)
        .ok()
        .filter(|s| !s.chars().any(char::is_control))
        .ok_or_else(|| error(400, "bad_session_id", "x-session-id must be printable UTF-8"))
}

fn store_error(e: &StoreError) -> Response {
    error(503, "store_unavailable", &e.to_string()).with_header("retry-after", "1")
}

/// `{"error": code, "detail": detail}`.
pub fn error(status: u16, code: &str, detail: &str) -> Response {
    Response::json(status, &json!({"error": code, "detail": detail}))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::conversation::digest_of;
    use crate::model::{Builtin, ModelError};
    use crate::store::MemoryStore;
    use serde_json::Value;
    use std::sync::atomic::Ordering;

    fn node(id: &str, store: &Arc<MemoryStore>) -> Service {
        let store: Arc<dyn Store> = store.clone();
        Service::new(id, 100, 3600, store, Box::new(Builtin), Arc::new(Stats::new()))
    }

    fn post(sid: Option<&str>, affinity: Option<&str>, body: &str) -> Request {
        let mut headers = Vec::new();
        if let Some(sid) = sid {
            headers.push(("x-session-id".to_string(), sid.as_bytes().to_vec()));
        }
        if let Some(a) = affinity {
            headers.push(("x-session-affinity".to_string(), a.as_bytes().to_vec()));
        }
        Request {
            method: "POST".into(),
            target: "/v1/chat".into(),
            minor_version: 1,
            headers,
            body: body.as_bytes().to_vec(),
        }
    }

    fn chat(svc: &Service, sid: &str, affinity: Option<&str>, message: &str) -> (u16, Value) {
        let body = json!({ "message": message }).to_string();
        let resp = svc.handle(&post(Some(sid), affinity, &body), None, 1_700_000_000);
        assert_eq!(resp.header("x-served-by"), Some(svc.node_id()));
        (resp.status, serde_json::from_slice(&resp.body).unwrap())
    }

    fn turn_context(v: &Value) -> (u64, &str) {
        (v["turn"].as_u64().unwrap(), v["context"].as_str().unwrap())
    }

    #[test]
    fn turns_count_up_with_matching_digest() {
        let store = Arc::new(MemoryStore::new());
        let a = node("node-1", &store);
        let messages = ["first message", "second", "third"];
        let contexts = ["new", "memory", "memory"];
        for (i, m) in messages.iter().enumerate() {
            let (status, v) = chat(&a, "s1", None, m);
            assert_eq!(status, 200);
            assert_eq!(turn_context(&v), (i as u64 + 1, contexts[i]));
            assert_eq!(v["node"], "node-1");
            assert_eq!(v["history_digest"], digest_of(messages[..=i].iter().copied()));
        }
        let (_, v) = chat(&a, "s1", None, "x");
        assert!(v["reply"].as_str().unwrap().contains("earlier you mentioned 'first message'"));
        let stored = store.raw("sa:conv:{s1}").unwrap();
        assert_eq!(Conversation::decode(&stored, "s1").unwrap().turns(), 4);
    }

    #[test]
    fn another_node_loads_from_store_and_moved_reloads() {
        let store = Arc::new(MemoryStore::new());
        let (a, b) = (node("node-1", &store), node("node-2", &store));
        for m in ["1", "2", "3"] {
            chat(&a, "s", Some("sticky"), m);
        }
        let (_, v) = chat(&b, "s", Some("moved"), "4");
        assert_eq!(turn_context(&v), (4, "store"));
        assert_eq!(v["node"], "node-2");
        // Back on node-1: its memory copy (3 turns) is stale.
        let (_, v) = chat(&a, "s", Some("moved"), "5");
        assert_eq!(turn_context(&v), (5, "store"));
        assert_eq!(v["history_digest"], digest_of(["1", "2", "3", "4", "5"]));
        let (_, v) = chat(&a, "s", Some("sticky"), "6");
        assert_eq!(turn_context(&v), (6, "memory"));
        assert_eq!(a.stats().moved.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn new_and_unknown_affinity_do_not_trust_memory() {
        let store = Arc::new(MemoryStore::new());
        let (a, b) = (node("node-1", &store), node("node-2", &store));
        chat(&a, "s", None, "1");
        chat(&b, "s", None, "2");
        let (_, v) = chat(&a, "s", Some("new"), "3");
        assert_eq!(turn_context(&v), (3, "store"));
        chat(&b, "s", Some("moved"), "4");
        let (_, v) = chat(&a, "s", Some("whatever"), "5");
        assert_eq!(turn_context(&v), (5, "store"));
        // A brand-new session under `new` is `new`.
        let (_, v) = chat(&a, "fresh", Some("new"), "hi");
        assert_eq!(turn_context(&v), (1, "new"));
    }

    #[test]
    fn store_outage_is_503_and_the_turn_is_not_acknowledged() {
        let store = Arc::new(MemoryStore::new());
        let a = node("node-1", &store);
        chat(&a, "s", None, "1");
        store.set_down(true);
        let (status, v) = chat(&a, "s", None, "2");
        assert_eq!(status, 503);
        assert_eq!(v["error"], "store_unavailable");
        // A moved request must reload and so fails too.
        let (status, _) = chat(&a, "s", Some("moved"), "2");
        assert_eq!(status, 503);
        store.set_down(false);
        let (status, v) = chat(&a, "s", None, "2");
        assert_eq!(status, 200);
        assert_eq!(turn_context(&v), (2, "store"));
        assert_eq!(v["history_digest"], digest_of(["1", "2"]));
        assert_eq!(a.stats().store_failures.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn bad_requests_are_400_json() {
        let store = Arc::new(MemoryStore::new());
        let a = node("node-1", &store);
        let long = "x".repeat(MAX_SESSION_ID_BYTES + 1);
        let table: [(Option<&str>, &str, &str); 8] = [
            (None, r#"{"message":"hi"}"#, "missing_session_id"),
            (Some(""), r#"{"message":"hi"}"#, "missing_session_id"),
            (Some("a\u{7}b"), r#"{"message":"hi"}"#, "bad_session_id"),
            (Some(&long), r#"{"message":"hi"}"#, "bad_session_id"),
            (Some("s"), "", "bad_request"),
            (Some("s"), "{not json", "bad_request"),
            (Some("s"), r#"{"msg":"hi"}"#, "bad_request"),
            (Some("s"), r#"{"message":3}"#, "bad_request"),
        ];
        for (sid, body, code) in table {
            let resp = a.handle(&post(sid, None, body), None, 0);
            assert_eq!(resp.status, 400, "{sid:?} {body}");
            assert_eq!(resp.header("content-type"), Some("application/json"));
            let v: Value = serde_json::from_slice(&resp.body).unwrap();
            assert_eq!(v["error"], code, "{sid:?} {body}");
        }
        let mut non_utf8 = post(None, None, r#"{"message":"hi"}"#);
        non_utf8.headers.push(("x-session-id".into(), b"\xff\xfe".to_vec()));
        assert_eq!(a.handle(&non_utf8, None, 0).status, 400);
        assert!(store.raw("sa:conv:{s}").is_none());
        assert_eq!(a.stats().bad_requests.load(Ordering::Relaxed), 9);
    }

    #[test]
    fn corrupt_stored_value_is_500_and_left_alone() {
        let store = Arc::new(MemoryStore::new());
        store.put_raw("sa:conv:{s}", b"garbage");
        let a = node("node-1", &store);
        let (status, v) = chat(&a, "s", None, "hi");
        assert_eq!(status, 500);
        assert_eq!(v["error"], "corrupt_conversation");
        assert_eq!(store.raw("sa:conv:{s}").unwrap(), b"garbage");
    }

    #[test]
    fn model_failure_is_502_and_not_stored() {
        struct Down;
        impl Model for Down {
            fn reply(&self, _: &Conversation, _: &str) -> Result<String, ModelError> {
                Err(ModelError::Status(500))
            }
        }
        let store = Arc::new(MemoryStore::new());
        let dyn_store: Arc<dyn Store> = store.clone();
        let a = Service::new("n", 10, 60, dyn_store, Box::new(Down), Arc::new(Stats::new()));
        let (status, v) = chat(&a, "s", None, "hi");
        assert_eq!(status, 502);
        assert_eq!(v["error"], "model_unavailable");
        assert!(store.raw("sa:conv:{s}").is_none());
    }

    #[test]
    fn other_routes() {
        let store = Arc::new(MemoryStore::new());
        let a = node("node-1", &store);
        let req = |method: &str, target: &str| Request {
            method: method.into(),
            target: target.into(),
            minor_version: 1,
            headers: vec![],
            body: vec![],
        };
        let health = a.handle(&req("GET", "/healthz"), None, 0);
        assert_eq!((health.status, health.body.as_slice()), (200, &b"ok"[..]));
        assert_eq!(health.header("x-served-by"), Some("node-1"));
        let stats = a.handle(&req("GET", "/stats?x"), None, 0);
        let v: Value = serde_json::from_slice(&stats.body).unwrap();
        assert_eq!(v["turns"], 0);
        assert_eq!(v["node"], "node-1");
        assert_eq!(a.handle(&req("GET", "/v1/chat"), None, 0).status, 405);
        assert_eq!(a.handle(&req("POST", "/healthz"), None, 0).status, 405);
        assert_eq!(a.handle(&req("GET", "/nope"), None, 0).status, 404);
    }

    #[test]
    fn cache_size_zero_always_uses_the_store() {
        let store = Arc::new(MemoryStore::new());
        let dyn_store: Arc<dyn Store> = store.clone();
        let a = Service::new("n", 0, 60, dyn_store, Box::new(Builtin), Arc::new(Stats::new()));
        chat(&a, "s", None, "1");
        let (_, v) = chat(&a, "s", None, "2");
        assert_eq!(turn_context(&v), (2, "store"));
    }

    #[test]
    fn concurrent_turns_of_one_session_are_serialised() {
        let store = Arc::new(MemoryStore::new());
        let a = Arc::new(node("node-1", &store));
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let a = Arc::clone(&a);
                std::thread::spawn(move || {
                    for i in 0..25 {
                        let (status, _) = chat(&a, "shared", None, &format!("{t}-{i}"));
                        assert_eq!(status, 200);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let stored = store.raw("sa:conv:{shared}").unwrap();
        assert_eq!(Conversation::decode(&stored, "shared").unwrap().turns(), 200);
    }

    fn chat_turn(svc: &Service, sid: &str, affinity: Option<&str>, message: &str, turn: u64) -> (u16, Value) {
        let body = json!({ "message": message, "turn": turn }).to_string();
        let resp = svc.handle(&post(Some(sid), affinity, &body), None, 1_700_000_000);
        (resp.status, serde_json::from_slice(&resp.body).unwrap())
    }

    fn stored_turns(store: &MemoryStore, sid: &str) -> u64 {
        let raw = store.raw(&store_key(sid)).unwrap();
        Conversation::decode(&raw, sid).unwrap().turns()
    }

    #[test]
    fn a_retry_of_an_applied_turn_is_answered_again_not_applied_twice() {
        // The client sent turn 2, the node stored it, and the reply never arrived (client
        // timeout, node killed after the write): the client sends turn 2 again.
        let store = Arc::new(MemoryStore::new());
        let (a, b) = (node("node-1", &store), node("node-2", &store));
        assert_eq!(chat_turn(&a, "s", Some("new"), "hello", 1).0, 200);
        let (_, first) = chat_turn(&a, "s", Some("sticky"), "again", 2);
        assert_eq!(turn_context(&first), (2, "memory"));

        // Same node, from memory.
        let (status, v) = chat_turn(&a, "s", Some("sticky"), "again", 2);
        assert_eq!(status, 200);
        assert_eq!(turn_context(&v), (2, "memory"));
        assert_eq!((&v["reply"], &v["replayed"]), (&first["reply"], &json!(true)));
        assert_eq!(v["history_digest"], digest_of(["hello", "again"]));
        assert_eq!(stored_turns(&store, "s"), 2);
        // Another node (the retry was routed elsewhere), from the store.
        let (status, v) = chat_turn(&b, "s", Some("moved"), "again", 2);
        assert_eq!(status, 200);
        assert_eq!(turn_context(&v), (2, "store"));
        assert_eq!(v["reply"], first["reply"]);
        assert_eq!(stored_turns(&store, "s"), 2);
        assert_eq!((a.stats().replayed.load(Ordering::Relaxed), b.stats().replayed.load(Ordering::Relaxed)), (1, 1));
        assert_eq!(a.stats().turns.load(Ordering::Relaxed), 2);

        // The conversation goes on at turn 3, and the same text twice in a row is two
        // turns when the client numbers them so.
        let (_, v) = chat_turn(&b, "s", Some("sticky"), "again", 3);
        assert_eq!(turn_context(&v), (3, "memory"));
        assert!(v.get("replayed").is_none());
        assert_eq!(v["history_digest"], digest_of(["hello", "again", "again"]));

        // Without `turn` the node cannot tell a retry from a new turn: appended.
        let (_, v) = chat(&b, "s", Some("sticky"), "again");
        assert_eq!(turn_context(&v), (4, "memory"));
    }

    #[test]
    fn a_turn_that_does_not_follow_the_conversation_is_409() {
        let store = Arc::new(MemoryStore::new());
        let a = node("node-1", &store);
        for (i, m) in ["1", "2", "3"].iter().enumerate() {
            assert_eq!(chat_turn(&a, "s", None, m, i as u64 + 1).0, 200);
        }
        // Ahead of the conversation (the node has lost turns), behind it, and the last
        // turn's number with another message.
        for (message, turn) in [("5", 5), ("4", 2), ("x", 3)] {
            let (status, v) = chat_turn(&a, "s", None, message, turn);
            assert_eq!((status, v["error"].as_str()), (409, Some("turn_conflict")), "{message} as turn {turn}");
        }
        let (status, v) = chat_turn(&a, "s", None, "0", 0);
        assert_eq!((status, v["error"].as_str()), (400, Some("bad_request")));
        assert_eq!(stored_turns(&store, "s"), 3);
        assert_eq!(a.stats().bad_requests.load(Ordering::Relaxed), 4);
        // The conversation is untouched and goes on.
        let (_, v) = chat_turn(&a, "s", None, "4", 4);
        assert_eq!(turn_context(&v), (4, "memory"));
        assert_eq!(v["history_digest"], digest_of(["1", "2", "3", "4"]));
    }

    #[test]
    fn a_replay_that_cannot_be_stored_is_503() {
        let store = Arc::new(MemoryStore::new());
        let a = node("node-1", &store);
        chat_turn(&a, "s", None, "1", 1);
        store.set_down(true);
        let (status, v) = chat_turn(&a, "s", None, "1", 1);
        assert_eq!((status, v["error"].as_str()), (503, Some("store_unavailable")));
        store.set_down(false);
        let (status, v) = chat_turn(&a, "s", None, "1", 1);
        assert_eq!((status, turn_context(&v), &v["replayed"]), (200, (1, "memory"), &json!(true)));
    }

    fn chat_via(svc: &Service, local: &str, header: &str, sid: &str, message: &str) -> (u16, Value) {
        let body = json!({ "message": message }).to_string();
        let mut req = post(Some(sid), Some("sticky"), &body);
        req.headers.push((OVERRIDE_HEADER.to_string(), header.as_bytes().to_vec()));
        let resp = svc.handle(&req, Some(local.parse().unwrap()), 1_700_000_000);
        (resp.status, serde_json::from_slice(&resp.body).unwrap())
    }

    #[test]
    fn placement_compares_the_first_entry_with_the_local_address() {
        use Placement::*;
        let table: [(Option<&str>, Option<&str>, Placement); 12] = [
            (None, Some("127.0.0.1:8001"), Unknown),
            (Some("127.0.0.1:8001"), None, Unknown),
            (Some(" "), Some("127.0.0.1:8001"), Unknown),
            (Some(" ,127.0.0.1:8001"), Some("127.0.0.1:8001"), Fallback),
            (Some("127.0.0.1:8001"), Some("127.0.0.1:8001"), Primary),
            (Some(" 127.0.0.1:8001 ,127.0.0.1:8002"), Some("127.0.0.1:8001"), Primary),
            (Some("127.0.0.1:8002,127.0.0.1:8001"), Some("127.0.0.1:8001"), Fallback),
            (Some("127.0.0.1:8002"), Some("127.0.0.1:8001"), Fallback),
            (Some("127.0.0.2:8001"), Some("127.0.0.1:8001"), Fallback),
            (Some("[2001:db8::1]:8080,10.0.0.1:8080"), Some("[2001:db8::1]:8080"), Primary),
            // A dual-stack listener sees IPv4 peers on IPv4-mapped addresses.
            (Some("10.0.0.1:8080"), Some("[::ffff:10.0.0.1]:8080"), Primary),
            (Some("node-a:8080,10.0.0.1:8080"), Some("10.0.0.1:8080"), Fallback),
        ];
        for (header, local, want) in table {
            let got = Placement::of(header.map(str::as_bytes), local.map(|l| l.parse().unwrap()));
            assert_eq!(got, want, "{header:?} on {local:?}");
        }
        assert_eq!(Placement::of(Some(b"\xff:1"), Some("10.0.0.1:1".parse().unwrap())), Fallback);
    }

    #[test]
    fn a_retry_on_a_fallback_node_reloads_a_stale_memory_copy() {
        // A serves turns 1-2, the conversation moves to B for turns 3-4, B dies and
        // Envoy retries turn 5 on A, which the filter still calls `sticky`.
        let store = Arc::new(MemoryStore::new());
        let (a, b) = (node("node-1", &store), node("node-2", &store));
        let (addr_a, addr_b) = ("127.0.0.1:8001", "127.0.0.1:8002");
        let on_a = format!("{addr_a},{addr_b}");
        let on_b = format!("{addr_b},{addr_a}");
        for m in ["1", "2"] {
            let (status, _) = chat_via(&a, addr_a, &on_a, "s", m);
            assert_eq!(status, 200);
        }
        let (_, v) = chat(&b, "s", Some("moved"), "3");
        assert_eq!(turn_context(&v), (3, "store"));
        let (_, v) = chat_via(&b, addr_b, &on_b, "s", "4");
        assert_eq!(turn_context(&v), (4, "memory"));

        let (status, v) = chat_via(&a, addr_a, &on_b, "s", "5");
        assert_eq!(status, 200);
        assert_eq!(turn_context(&v), (5, "store"));
        assert_eq!(v["history_digest"], digest_of(["1", "2", "3", "4", "5"]));
        assert_eq!(a.stats().fallback.load(Ordering::Relaxed), 1);
        // The reload refreshed A's copy: once A is the primary again, memory is right.
        let (_, v) = chat_via(&a, addr_a, &on_a, "s", "6");
        assert_eq!(turn_context(&v), (6, "memory"));
        assert_eq!(v["history_digest"], digest_of(["1", "2", "3", "4", "5", "6"]));
        assert_eq!(a.stats().fallback.load(Ordering::Relaxed), 1);
        // `moved` on a fallback is a reload anyway, counted once, as moved.
        let body = json!({ "message": "7" }).to_string();
        let mut req = post(Some("s"), Some("moved"), &body);
        req.headers.push((OVERRIDE_HEADER.to_string(), on_b.as_bytes().to_vec()));
        let v: Value = serde_json::from_slice(&a.handle(&req, Some(addr_a.parse().unwrap()), 0).body).unwrap();
        assert_eq!(turn_context(&v), (7, "store"));
        assert_eq!(a.stats().fallback.load(Ordering::Relaxed), 1);
    }
}
