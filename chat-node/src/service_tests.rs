//! Tests of the chat policy against the in-memory store.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use super::*;
use crate::conversation::digest_of;
use crate::engine::EngineConfig;
use crate::store::MemoryStore;
use std::sync::atomic::Ordering;

fn node_with(id: &str, store: &Arc<MemoryStore>, cache: usize, engine: EngineConfig) -> Arc<Service> {
    let config = ServiceConfig { node_id: id.into(), cache_size: cache, ttl_seconds: 3600 };
    Arc::new(Service::new(
        config,
        Store::Memory(Arc::clone(store)),
        Model::Builtin,
        Engine::new(engine),
        Arc::new(Stats::new()),
    ))
}

fn node(id: &str, store: &Arc<MemoryStore>) -> Arc<Service> {
    node_with(id, store, 100, EngineConfig::default())
}

fn req(sid: &str, affinity: Option<&str>, message: &str, turn: Option<u64>) -> TurnRequest {
    TurnRequest {
        session_id: sid.into(),
        message: message.into(),
        turn,
        affinity: Affinity::from_header(affinity.map(str::as_bytes)),
        placement: Placement::Unknown,
        previous_node: "somewhere".into(),
        override_header: String::new(),
    }
}

async fn send(svc: &Arc<Service>, r: TurnRequest) -> Result<TurnReply, ApiError> {
    match svc.begin(r).await? {
        Begun::Replay(reply) => Ok(reply),
        Begun::Run(p) => p.run(None).await,
    }
}

async fn chat(svc: &Arc<Service>, sid: &str, affinity: Option<&str>, message: &str) -> Result<TurnReply, ApiError> {
    send(svc, req(sid, affinity, message, None)).await
}

async fn chat_turn(
    svc: &Arc<Service>,
    sid: &str,
    affinity: Option<&str>,
    message: &str,
    turn: u64,
) -> Result<TurnReply, ApiError> {
    send(svc, req(sid, affinity, message, Some(turn))).await
}

fn tc(r: &TurnReply) -> (u64, &'static str) {
    (r.turn, r.context.as_str())
}

fn stored(store: &MemoryStore, sid: &str) -> Conversation {
    decode_entries(&store.entries(sid)).unwrap()
}

#[tokio::test]
async fn turns_count_up_with_matching_digest() {
    let store = Arc::new(MemoryStore::new());
    let a = node("node-1", &store);
    let messages = ["first message", "second", "third"];
    let contexts = ["new", "memory", "memory"];
    for (i, m) in messages.iter().enumerate() {
        let r = chat(&a, "s1", None, m).await.unwrap();
        assert_eq!(tc(&r), (i as u64 + 1, contexts[i]));
        assert_eq!(r.history_digest, digest_of(messages[..=i].iter().copied()));
    }
    let r = chat(&a, "s1", None, "x").await.unwrap();
    assert!(r.reply.contains("earlier you mentioned 'first message'"));
    // One entry per turn, numbered, each holding only its own turn (O(turn) bytes).
    let entries = store.entries("s1");
    assert_eq!(entries.len(), 4);
    let last = String::from_utf8(entries[3].clone()).unwrap();
    assert!(last.contains("\"n\":4") && last.contains("\"user\":\"x\"") && !last.contains("second"), "{last}");
    assert_eq!(stored(&store, "s1").turns(), 4);
}

#[tokio::test]
async fn another_node_loads_from_store_and_moved_reloads() {
    let store = Arc::new(MemoryStore::new());
    let (a, b) = (node("node-1", &store), node("node-2", &store));
    for m in ["1", "2", "3"] {
        chat(&a, "s", Some("sticky"), m).await.unwrap();
    }
    let r = chat(&b, "s", Some("moved"), "4").await.unwrap();
    assert_eq!(tc(&r), (4, "store"));
    // Back on node-1: its memory copy (3 turns) is stale.
    let r = chat(&a, "s", Some("moved"), "5").await.unwrap();
    assert_eq!(tc(&r), (5, "store"));
    assert_eq!(r.history_digest, digest_of(["1", "2", "3", "4", "5"]));
    let r = chat(&a, "s", Some("sticky"), "6").await.unwrap();
    assert_eq!(tc(&r), (6, "memory"));
    assert_eq!(a.stats().moved.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn new_and_unknown_affinity_do_not_trust_memory() {
    let store = Arc::new(MemoryStore::new());
    let (a, b) = (node("node-1", &store), node("node-2", &store));
    chat(&a, "s", None, "1").await.unwrap();
    chat(&b, "s", None, "2").await.unwrap();
    assert_eq!(tc(&chat(&a, "s", Some("new"), "3").await.unwrap()), (3, "store"));
    chat(&b, "s", Some("moved"), "4").await.unwrap();
    assert_eq!(tc(&chat(&a, "s", Some("whatever"), "5").await.unwrap()), (5, "store"));
    assert_eq!(tc(&chat(&a, "fresh", Some("new"), "hi").await.unwrap()), (1, "new"));
}

#[tokio::test]
async fn a_stale_sticky_copy_conflicts_reloads_and_applies_again() {
    // The case the old whole-value SET lost: node A holds turns 1-2 in memory, node B
    // appends turn 3, then A is asked (sticky) for another turn without `turn`.
    let store = Arc::new(MemoryStore::new());
    let (a, b) = (node("node-1", &store), node("node-2", &store));
    chat(&a, "s", None, "1").await.unwrap();
    chat(&a, "s", None, "2").await.unwrap();
    chat(&b, "s", Some("moved"), "3").await.unwrap();
    let r = chat(&a, "s", Some("sticky"), "4").await.unwrap();
    assert_eq!(tc(&r), (4, "store"));
    assert_eq!(r.history_digest, digest_of(["1", "2", "3", "4"]));
    // The reply was generated again for the real history.
    assert!(r.reply.starts_with("turn 4:"), "{}", r.reply);
    assert_eq!(a.stats().append_conflicts.load(Ordering::Relaxed), 1);
    assert_eq!(stored(&store, "s").user_messages().collect::<Vec<_>>(), ["1", "2", "3", "4"]);
    // With `turn` the stale copy is told apart: the client's turn 5 is the next one.
    chat(&b, "s", Some("sticky"), "5").await.unwrap();
    let r = chat_turn(&a, "s", Some("sticky"), "6", 6).await.unwrap();
    assert_eq!(tc(&r), (6, "store"));
    // ... and a client that is itself behind gets a 409 after the reload.
    chat(&b, "s", Some("sticky"), "7").await.unwrap();
    let e = chat_turn(&a, "s", Some("sticky"), "x", 7).await.unwrap_err();
    assert_eq!((e.status, e.code), (409, "turn_conflict"));
    assert_eq!(stored(&store, "s").turns(), 7);
}

#[tokio::test]
async fn concurrent_appends_on_two_nodes_lose_and_duplicate_nothing() {
    let store = Arc::new(MemoryStore::new());
    let nodes = [node("node-1", &store), node("node-2", &store), node("node-3", &store)];
    let mut tasks = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        for w in 0..4 {
            let n = Arc::clone(n);
            tasks.push(tokio::spawn(async move {
                let mut acked = Vec::new();
                for t in 0..25 {
                    let m = format!("n{i}-w{w}-t{t}");
                    let r = chat(&n, "shared", Some("sticky"), &m).await.unwrap();
                    acked.push((r.turn, m, r.history_digest));
                }
                acked
            }));
        }
    }
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    let conv = stored(&store, "shared");
    assert_eq!(conv.turns(), acked.len() as u64);
    let users: Vec<&str> = conv.user_messages().collect();
    for (turn, message, digest) in &acked {
        assert_eq!(users[*turn as usize - 1], message.as_str());
        assert_eq!(*digest, digest_of(users[..*turn as usize].iter().copied()));
    }
}

#[tokio::test]
async fn store_outage_is_503_and_the_turn_is_not_acknowledged() {
    let store = Arc::new(MemoryStore::new());
    let a = node("node-1", &store);
    chat(&a, "s", None, "1").await.unwrap();
    store.set_down(true);
    let e = chat(&a, "s", None, "2").await.unwrap_err();
    assert_eq!((e.status, e.code), (503, "store_unavailable"));
    let e = chat(&a, "s", Some("moved"), "2").await.unwrap_err();
    assert_eq!(e.status, 503);
    store.set_down(false);
    let r = chat(&a, "s", None, "2").await.unwrap();
    assert_eq!(tc(&r), (2, "store"));
    assert_eq!(r.history_digest, digest_of(["1", "2"]));
    assert_eq!(a.stats().store_failures.load(Ordering::Relaxed), 2);
}

#[tokio::test]
async fn corrupt_stored_value_is_500_and_left_alone() {
    let store = Arc::new(MemoryStore::new());
    store.put_entries("s", vec![b"garbage".to_vec()]);
    let a = node("node-1", &store);
    let e = chat(&a, "s", None, "hi").await.unwrap_err();
    assert_eq!((e.status, e.code), (500, "corrupt_conversation"));
    assert_eq!(store.entries("s"), vec![b"garbage".to_vec()]);
}

#[tokio::test]
async fn previous_layout_is_migrated_on_first_read() {
    let store = Arc::new(MemoryStore::new());
    let old = br#"{"v":1,"session":"s","turns":2,"written_by":"node-1","written_at":0,"messages":[
        {"role":"user","content":"a"},{"role":"assistant","content":"ra"},
        {"role":"user","content":"b"},{"role":"assistant","content":"rb"}]}"#;
    store.put_legacy("s", old);
    let a = node("node-1", &store);
    let r = chat(&a, "s", Some("moved"), "c").await.unwrap();
    assert_eq!(tc(&r), (3, "store"));
    assert_eq!(r.history_digest, digest_of(["a", "b", "c"]));
    assert!(!store.has_legacy("s"));
    assert_eq!(stored(&store, "s").turns(), 3);
    assert_eq!(a.stats().migrated.load(Ordering::Relaxed), 1);
    // A corrupt old value is refused and kept.
    store.put_legacy("t", b"garbage");
    assert_eq!(chat(&a, "t", None, "x").await.unwrap_err().code, "corrupt_conversation");
    assert!(store.has_legacy("t"));
}

#[tokio::test]
async fn turns_lost_by_the_store_are_written_again_from_memory() {
    // A failover without replication drops the last acknowledged turn from the store;
    // the node that served it still holds it and restores it before the next turn.
    let store = Arc::new(MemoryStore::new());
    let a = node("node-1", &store);
    for m in ["1", "2", "3"] {
        chat(&a, "s", None, m).await.unwrap();
    }
    let mut entries = store.entries("s");
    entries.pop();
    store.put_entries("s", entries);
    let r = chat(&a, "s", Some("sticky"), "4").await.unwrap();
    assert_eq!(tc(&r), (4, "memory"));
    assert_eq!(stored(&store, "s").user_messages().collect::<Vec<_>>(), ["1", "2", "3", "4"]);
    assert_eq!(a.stats().repaired.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn cache_size_zero_always_uses_the_store() {
    let store = Arc::new(MemoryStore::new());
    let a = node_with("n", &store, 0, EngineConfig::default());
    chat(&a, "s", None, "1").await.unwrap();
    assert_eq!(tc(&chat(&a, "s", None, "2").await.unwrap()), (2, "store"));
}

#[tokio::test]
async fn a_retry_of_an_applied_turn_is_answered_again_not_applied_twice() {
    let store = Arc::new(MemoryStore::new());
    let (a, b) = (node("node-1", &store), node("node-2", &store));
    chat_turn(&a, "s", Some("new"), "hello", 1).await.unwrap();
    let first = chat_turn(&a, "s", Some("sticky"), "again", 2).await.unwrap();
    assert_eq!(tc(&first), (2, "memory"));
    let r = chat_turn(&a, "s", Some("sticky"), "again", 2).await.unwrap();
    assert_eq!((tc(&r), r.replayed, &r.reply), ((2, "memory"), true, &first.reply));
    assert_eq!(r.history_digest, digest_of(["hello", "again"]));
    let r = chat_turn(&b, "s", Some("moved"), "again", 2).await.unwrap();
    assert_eq!((tc(&r), r.replayed, &r.reply), ((2, "store"), true, &first.reply));
    assert_eq!(stored(&store, "s").turns(), 2);
    assert_eq!((a.stats().replayed.load(Ordering::Relaxed), b.stats().replayed.load(Ordering::Relaxed)), (1, 1));
    // The same text twice in a row is two turns when the client numbers them so.
    let r = chat_turn(&b, "s", Some("sticky"), "again", 3).await.unwrap();
    assert_eq!((tc(&r), r.replayed), ((3, "memory"), false));
    // Without `turn` the node cannot tell a retry from a new turn: appended.
    assert_eq!(tc(&chat(&b, "s", Some("sticky"), "again").await.unwrap()), (4, "memory"));
}

#[tokio::test]
async fn a_turn_that_does_not_follow_the_conversation_is_409() {
    let store = Arc::new(MemoryStore::new());
    let a = node("node-1", &store);
    for (i, m) in ["1", "2", "3"].iter().enumerate() {
        chat_turn(&a, "s", None, m, i as u64 + 1).await.unwrap();
    }
    for (message, turn) in [("5", 5), ("4", 2), ("x", 3)] {
        let e = chat_turn(&a, "s", None, message, turn).await.unwrap_err();
        assert_eq!((e.status, e.code), (409, "turn_conflict"), "{message} as turn {turn}");
    }
    let e = chat_turn(&a, "s", None, "0", 0).await.unwrap_err();
    assert_eq!((e.status, e.code), (400, "bad_request"));
    assert_eq!(stored(&store, "s").turns(), 3);
    assert_eq!(a.stats().bad_requests.load(Ordering::Relaxed), 4);
    let r = chat_turn(&a, "s", None, "4", 4).await.unwrap();
    assert_eq!(tc(&r), (4, "memory"));
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
        (Some("10.0.0.1:8080"), Some("[::ffff:10.0.0.1]:8080"), Primary),
        (Some("node-a:8080,10.0.0.1:8080"), Some("10.0.0.1:8080"), Fallback),
    ];
    for (header, local, want) in table {
        let got = Placement::of(header.map(str::as_bytes), local.map(|l| l.parse().unwrap()));
        assert_eq!(got, want, "{header:?} on {local:?}");
    }
    assert_eq!(Placement::of(Some(b"\xff:1"), Some("10.0.0.1:1".parse().unwrap())), Fallback);
}

#[tokio::test]
async fn a_retry_on_a_fallback_node_reloads_a_stale_memory_copy() {
    let store = Arc::new(MemoryStore::new());
    let (a, b) = (node("node-1", &store), node("node-2", &store));
    let (addr_a, addr_b) = ("127.0.0.1:8001", "127.0.0.1:8002");
    let via = |local: &str, first: &str, m: &str| {
        let mut r = req("s", Some("sticky"), m, None);
        r.placement = Placement::of(Some(first.as_bytes()), Some(local.parse().unwrap()));
        r
    };
    for m in ["1", "2"] {
        send(&a, via(addr_a, addr_a, m)).await.unwrap();
    }
    assert_eq!(tc(&chat(&b, "s", Some("moved"), "3").await.unwrap()), (3, "store"));
    assert_eq!(tc(&send(&b, via(addr_b, addr_b, "4")).await.unwrap()), (4, "memory"));
    let r = send(&a, via(addr_a, addr_b, "5")).await.unwrap();
    assert_eq!(tc(&r), (5, "store"));
    assert_eq!(r.history_digest, digest_of(["1", "2", "3", "4", "5"]));
    assert_eq!(a.stats().fallback.load(Ordering::Relaxed), 1);
    assert_eq!(tc(&send(&a, via(addr_a, addr_a, "6")).await.unwrap()), (6, "memory"));
}

#[tokio::test]
async fn engine_reports_prefill_of_uncached_tokens_only() {
    // Sticky turns prefill only the new message; a moved conversation prefills its
    // whole history on the node it moved to. Token counts are exact.
    let store = Arc::new(MemoryStore::new());
    let engine = EngineConfig { prefill_us_per_token: 10, decode_us_per_token: 1, ..EngineConfig::default() };
    let (a, b) = (node_with("node-1", &store, 100, engine), node_with("node-2", &store, 100, engine));
    let r1 = chat(&a, "s", Some("new"), "one two three").await.unwrap();
    assert_eq!((r1.engine.cached_tokens, r1.engine.prefill_tokens), (0, 3));
    assert_eq!(r1.engine.prefill_us, 30);
    assert_eq!(r1.engine.decode_tokens, crate::engine::tokens(&r1.reply));
    let history = 3 + r1.engine.decode_tokens;
    let r2 = chat(&a, "s", Some("sticky"), "four five").await.unwrap();
    assert_eq!((r2.engine.cached_tokens, r2.engine.prefill_tokens), (history, 2));
    let history = history + 2 + r2.engine.decode_tokens;
    let r3 = chat(&b, "s", Some("moved"), "six").await.unwrap();
    assert_eq!((r3.engine.cached_tokens, r3.engine.prefill_tokens), (0, history + 1));
    assert_eq!(r3.engine.prefill_us, 10 * (history + 1));
    assert_eq!(r3.prompt_tokens, history + 1);
    assert!(b.engine().kv_usage() > 0.0);
    // A's cache entry is stale now: a moved-back turn pays the whole history again.
    let r4 = chat(&a, "s", Some("moved"), "seven").await.unwrap();
    assert_eq!(r4.engine.cached_tokens, 0);
}

#[tokio::test]
async fn streaming_sends_the_reply_piece_by_piece() {
    let store = Arc::new(MemoryStore::new());
    let a = node("node-1", &store);
    let Begun::Run(p) = a.begin(req("s", None, "hello there", None)).await.unwrap() else { panic!("replay") };
    let (tx, mut rx) = mpsc::channel(256);
    let reply = p.run(Some(tx)).await.unwrap();
    let mut pieces = Vec::new();
    while let Ok(piece) = rx.try_recv() {
        pieces.push(piece);
    }
    assert_eq!(pieces.concat(), reply.reply);
    assert_eq!(pieces.len() as u64, crate::engine::tokens(&reply.reply));
    assert_eq!(stored(&store, "s").turns(), 1);
}
