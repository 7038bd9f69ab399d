//! The request handler: `Service::handle(&Request, now) -> Response`, the whole chat
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
//! - `x-session-id` is trusted as the identity because the Envoy filter strips every
//!   client copy; the node itself cannot tell a forged one.

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
use std::sync::{Arc, Mutex, MutexGuard};

/// Longest accepted `x-session-id`, in bytes.
pub const MAX_SESSION_ID_BYTES: usize = 512;
/// Most message bytes one conversation may hold (it is rewritten whole every turn).
pub const MAX_CONVERSATION_BYTES: usize = 16 * 1024 * 1024;
/// Number of striped per-session locks.
const LOCK_STRIPES: usize = 4096;

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

#[derive(Deserialize)]
struct ChatBody {
    message: String,
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

    /// Answers one request; `unix_now` is recorded in the stored value.
    pub fn handle(&self, req: &Request, unix_now: u64) -> Response {
        let resp = match (req.method.as_str(), req.path()) {
            ("POST", "/v1/chat") => self.chat(req, unix_now),
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

    fn chat(&self, req: &Request, unix_now: u64) -> Response {
        Stats::inc(&self.stats.chat_requests);
        let session_id = match session_id(req) {
            Ok(sid) => sid,
            Err(resp) => return self.bad_request(resp),
        };
        let message = match serde_json::from_slice::<ChatBody>(&req.body) {
            Ok(body) => body.message,
            Err(e) => {
                return self.bad_request(error(400, "bad_request", &format!("body: {e}")));
            }
        };
        let affinity = Affinity::from_header(req.header("x-session-affinity"));
        if affinity == Affinity::Moved {
            Stats::inc(&self.stats.moved);
        }

        let stripe = self.lock_hasher.hash_one(session_id) as usize % self.locks.len();
        let _turn_guard = self.locks[stripe].lock().unwrap_or_else(|e| e.into_inner());
        let key = store_key(session_id);

        let (history, context) = match self.load(session_id, &key, affinity) {
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

    /// The conversation before this turn, and where it came from.
    fn load(&self, session_id: &str, key: &str, affinity: Affinity) -> Result<(Arc<Conversation>, Context), Response> {
        if affinity.trusts_memory() {
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
        let resp = svc.handle(&post(Some(sid), affinity, &body), 1_700_000_000);
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
            let resp = a.handle(&post(sid, None, body), 0);
            assert_eq!(resp.status, 400, "{sid:?} {body}");
            assert_eq!(resp.header("content-type"), Some("application/json"));
            let v: Value = serde_json::from_slice(&resp.body).unwrap();
            assert_eq!(v["error"], code, "{sid:?} {body}");
        }
        let mut non_utf8 = post(None, None, r#"{"message":"hi"}"#);
        non_utf8.headers.push(("x-session-id".into(), b"\xff\xfe".to_vec()));
        assert_eq!(a.handle(&non_utf8, 0).status, 400);
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
        let health = a.handle(&req("GET", "/healthz"), 0);
        assert_eq!((health.status, health.body.as_slice()), (200, &b"ok"[..]));
        assert_eq!(health.header("x-served-by"), Some("node-1"));
        let stats = a.handle(&req("GET", "/stats?x"), 0);
        let v: Value = serde_json::from_slice(&stats.body).unwrap();
        assert_eq!(v["turns"], 0);
        assert_eq!(v["node"], "node-1");
        assert_eq!(a.handle(&req("GET", "/v1/chat"), 0).status, 405);
        assert_eq!(a.handle(&req("POST", "/healthz"), 0).status, 405);
        assert_eq!(a.handle(&req("GET", "/nope"), 0).status, 404);
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
}
