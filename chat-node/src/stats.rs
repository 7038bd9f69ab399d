//! Counters served by `GET /stats` (JSON), for tests and operators.
//!
//! Plain relaxed atomics: each counter is exact, a snapshot across counters is not.

use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};

/// Process-wide counters.
#[derive(Debug, Default)]
pub struct Stats {
    /// Turns requested (`/v1/chat` and `/v1/chat/completions`).
    pub chat_requests: AtomicU64,
    /// Turns acknowledged (stored, then answered 200).
    pub turns: AtomicU64,
    /// Turns that found the conversation in memory.
    pub memory_hits: AtomicU64,
    /// Turns that loaded the conversation from Redis.
    pub store_loads: AtomicU64,
    /// Turns that started a conversation.
    pub new_conversations: AtomicU64,
    /// Requests marked `x-session-affinity: moved`.
    pub moved: AtomicU64,
    /// Requests not marked `moved` that reached this node although it is not the first
    /// entry of the override header (an Envoy retry after the primary failed): reloaded
    /// from the store like `moved`.
    pub fallback: AtomicU64,
    /// Retried turns that an earlier attempt had already applied, answered again
    /// instead of being applied twice (the request's `turn` matched the last turn).
    pub replayed: AtomicU64,
    /// Compare-and-append conflicts: another writer appended to the conversation
    /// between this node's load and its append (reloaded and applied again).
    pub append_conflicts: AtomicU64,
    /// Turns the store had lost (a failover) written again from this node's memory.
    pub repaired: AtomicU64,
    /// Conversations migrated from the previous whole-value layout.
    pub migrated: AtomicU64,
    /// Requests to `/v1/chat/completions` (streamed or not).
    pub completions: AtomicU64,
    /// Streamed completions.
    pub streams: AtomicU64,
    /// Requests refused with a 4xx.
    pub bad_requests: AtomicU64,
    /// Failed Redis attempts (connection errors, error replies, timeouts).
    pub redis_errors: AtomicU64,
    /// Redis attempts repeated after a failure.
    pub redis_retries: AtomicU64,
    /// Commands that failed after every retry (answered 503).
    pub store_failures: AtomicU64,
    /// Stored values that could not be decoded (answered 500).
    pub store_corrupt: AtomicU64,
    /// LLM calls that failed (answered 502).
    pub llm_errors: AtomicU64,
}

impl Stats {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one to a counter.
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters as a JSON object; `cache_entries` is read by the caller.
    pub fn to_json(&self, node_id: &str, cache_entries: usize) -> Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "node": node_id,
            "chat_requests": get(&self.chat_requests),
            "turns": get(&self.turns),
            "memory_hits": get(&self.memory_hits),
            "store_loads": get(&self.store_loads),
            "new_conversations": get(&self.new_conversations),
            "moved": get(&self.moved),
            "fallback": get(&self.fallback),
            "replayed": get(&self.replayed),
            "bad_requests": get(&self.bad_requests),
            "redis_errors": get(&self.redis_errors),
            "redis_retries": get(&self.redis_retries),
            "store_failures": get(&self.store_failures),
            "store_corrupt": get(&self.store_corrupt),
            "llm_errors": get(&self.llm_errors),
            "append_conflicts": get(&self.append_conflicts),
            "repaired": get(&self.repaired),
            "migrated": get(&self.migrated),
            "completions": get(&self.completions),
            "streams": get(&self.streams),
            "cache_entries": cache_entries,
        })
    }
}
