//! The engine model (DESIGN.md section 8): what an inference engine's time and memory
//! would be, without a GPU, so that the value of stickiness (time to first token) and the
//! cost of load skew can be measured.
//!
//! - **Tokens** are whitespace-separated words ([`tokens`]): simple, deterministic, and
//!   recomputable by any client.
//! - **Slots**: at most `--slots` turns run at once; the others wait in FIFO order (a
//!   tokio semaphore) and are counted in `num_requests_waiting`. 0 = no limit.
//! - **Prefill**: a turn costs `prefill_us_per_token` × the prompt tokens that are not
//!   cached. The prompt is the whole history plus the new message. A conversation held
//!   in this node's memory (`context: "memory"`) has its history cached, as an engine's
//!   prefix cache would, unless the KV cache evicted it; a conversation loaded from the
//!   store, moved here, or new pays for its whole history ([`KvCache::plan`]).
//! - **Decode**: `decode_us_per_token` × the reply's tokens, paced token by token when
//!   streaming.
//! - **KV cache**: each conversation held keeps its tokens (history + reply) until it is
//!   evicted, least recently used first, to stay within `--kv-capacity-tokens`.
//!   `kv_cache_usage_perc` = cached tokens / capacity, in 0..=1.
//!
//! With the defaults (0 µs per token, no slot limit) the model costs nothing: it is off,
//! but the KV bookkeeping and the load report still work. Per-token costs can be changed
//! while the node runs (the admin listener, docs/chat-node.md), so a benchmark can slow
//! one node down.
//!
//! The pure parts ([`KvCache`], [`tokens`], [`split_tokens`], [`load_report`]) are
//! unit-tested; [`Engine`] adds the semaphore and the atomics.

use crate::conversation::Conversation;
use crate::lru::Lru;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Tokens in `text`: its whitespace-separated words.
pub fn tokens(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

/// Tokens of every message of a conversation (user messages and replies).
pub fn history_tokens(c: &Conversation) -> u64 {
    c.messages().map(|(_, m)| tokens(m)).sum()
}

/// `text` cut into pieces that concatenate to exactly `text`, one word each (a word
/// carries the whitespace before it; trailing whitespace goes with the last word). A
/// text without words is one piece (or none, when empty). The streamed form of a reply.
pub fn split_tokens(text: &str) -> Vec<&str> {
    // Byte offsets where a word starts after whitespace: the whitespace run before each
    // word but the first opens that word's piece.
    let mut cuts = Vec::new();
    let mut prev_space = true;
    let mut run_start = 0;
    let mut seen_word = false;
    for (i, ch) in text.char_indices() {
        let space = ch.is_whitespace();
        if space && !prev_space {
            run_start = i;
        }
        if !space && prev_space {
            if seen_word {
                cuts.push(if i > 0 && run_start < i { run_start } else { i });
            }
            seen_word = true;
        }
        prev_space = space;
    }
    let mut pieces = Vec::with_capacity(cuts.len() + 1);
    let mut start = 0;
    for cut in cuts {
        pieces.push(&text[start..cut]);
        start = cut;
    }
    if start < text.len() {
        pieces.push(&text[start..]);
    }
    pieces
}

/// What a turn costs in the model, reported with the reply (`engine` in the JSON, the
/// `x-engine-*` headers): token counts are exact, times are the modelled ones (the
/// sleeps), except `queued_us`, which is measured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Time spent waiting for a slot (measured).
    pub queued_us: u64,
    /// Prompt tokens found in the KV cache.
    pub cached_tokens: u64,
    /// Prompt tokens prefilled (prompt − cached).
    pub prefill_tokens: u64,
    /// `prefill_tokens` × `prefill_us_per_token`.
    pub prefill_us: u64,
    /// Reply tokens.
    pub decode_tokens: u64,
    /// `decode_tokens` × `decode_us_per_token`.
    pub decode_us: u64,
}

/// The prefill half of a turn's cost, decided before it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub cached_tokens: u64,
    pub prefill_tokens: u64,
}

/// Per-conversation cached tokens, bounded by a token capacity, least recently used out
/// first. Invariant: `used() <= capacity()`; an entry larger than the capacity is not
/// kept.
#[derive(Debug)]
pub struct KvCache {
    entries: Lru<String, u64>,
    used: u64,
    capacity: u64,
}

impl KvCache {
    pub fn new(capacity: u64) -> Self {
        Self { entries: Lru::new(usize::MAX), used: 0, capacity }
    }

    pub fn used(&self) -> u64 {
        self.used
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// `used / capacity`, in 0..=1 (0 when the capacity is 0).
    pub fn usage(&self) -> f64 {
        if self.capacity == 0 {
            0.0
        } else {
            (self.used as f64 / self.capacity as f64).min(1.0)
        }
    }

    /// The prefill of a turn of `session` whose history has `history` tokens and whose
    /// new message has `message` tokens. The history counts as cached only when the
    /// conversation came from this node's memory (`from_memory`) and the cache holds
    /// exactly that many tokens for it; otherwise any entry is stale and dropped.
    pub fn plan(&mut self, session: &str, from_memory: bool, history: u64, message: u64) -> Plan {
        let key = session.to_owned();
        let cached = if from_memory {
            match self.entries.get(&key) {
                Some(held) if held == history => history,
                _ => 0,
            }
        } else {
            0
        };
        if cached == 0 {
            self.forget(session);
        }
        Plan { cached_tokens: cached, prefill_tokens: history + message - cached }
    }

    /// After a turn: the conversation's tokens (`total`) stay cached.
    pub fn hold(&mut self, session: &str, total: u64) {
        self.forget(session);
        if total > self.capacity {
            return;
        }
        while self.used + total > self.capacity {
            match self.entries.pop_oldest() {
                Some((_, t)) => self.used -= t,
                None => break,
            }
        }
        self.entries.put(session.to_owned(), total);
        self.used += total;
    }

    /// Drops a conversation's entry.
    pub fn forget(&mut self, session: &str) {
        if let Some(t) = self.entries.remove(&session.to_owned()) {
            self.used -= t;
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// A float as Python prints it (`1.0`, `0.25`), as vLLM's ORCA header shows values.
fn py_float(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 {
        format!("{v:.1}")
    } else {
        format!("{v}")
    }
}

/// The `endpoint-load-metrics` header value for the requested format (the value of
/// `endpoint-load-metrics-format`, case-insensitive `TEXT` or `JSON`), or `None` for any
/// other format. Same names and shape as vLLM's OpenAI server:
/// `TEXT named_metrics.kv_cache_usage_perc=0.25, named_metrics.num_requests_waiting=0.0`.
pub fn load_report(format: &[u8], kv_cache_usage_perc: f64, num_requests_waiting: u64) -> Option<String> {
    let waiting = num_requests_waiting as f64;
    let format = std::str::from_utf8(format).ok()?.trim();
    if format.eq_ignore_ascii_case("text") {
        Some(format!(
            "TEXT named_metrics.kv_cache_usage_perc={}, named_metrics.num_requests_waiting={}",
            py_float(kv_cache_usage_perc),
            py_float(waiting)
        ))
    } else if format.eq_ignore_ascii_case("json") {
        let doc = serde_json::json!({"named_metrics": {
            "kv_cache_usage_perc": kv_cache_usage_perc, "num_requests_waiting": waiting}});
        Some(format!("JSON {doc}"))
    } else {
        None
    }
}

/// Engine settings from the flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// Turns that run at once; 0 = unlimited.
    pub slots: usize,
    pub prefill_us_per_token: u64,
    pub decode_us_per_token: u64,
    pub kv_capacity_tokens: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self { slots: 0, prefill_us_per_token: 0, decode_us_per_token: 0, kv_capacity_tokens: 1_000_000 }
    }
}

/// The per-token costs, as read and changed at run time (`GET`/`PUT /admin/engine`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Costs {
    pub prefill_us_per_token: u64,
    pub decode_us_per_token: u64,
}

/// The node's engine: slots, per-token costs, KV cache.
#[derive(Debug)]
pub struct Engine {
    slots: Option<Arc<Semaphore>>,
    slot_count: usize,
    waiting: Arc<AtomicU64>,
    running: Arc<AtomicU64>,
    prefill_us: AtomicU64,
    decode_us: AtomicU64,
    kv: Mutex<KvCache>,
}

/// A running turn's slot; dropping it frees the slot.
#[derive(Debug)]
pub struct Slot {
    _permit: Option<OwnedSemaphorePermit>,
    running: Arc<AtomicU64>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.running.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Decrements the waiting count even when the waiting future is dropped.
struct Waiting(Arc<AtomicU64>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Engine {
    pub fn new(config: EngineConfig) -> Self {
        Self {
            slots: (config.slots > 0).then(|| Arc::new(Semaphore::new(config.slots))),
            slot_count: config.slots,
            waiting: Arc::new(AtomicU64::new(0)),
            running: Arc::new(AtomicU64::new(0)),
            prefill_us: AtomicU64::new(config.prefill_us_per_token),
            decode_us: AtomicU64::new(config.decode_us_per_token),
            kv: Mutex::new(KvCache::new(config.kv_capacity_tokens)),
        }
    }

    /// Waits for a slot (FIFO); returns it with the time waited.
    pub async fn acquire(&self) -> (Slot, Duration) {
        let started = tokio::time::Instant::now();
        let permit = match &self.slots {
            Some(sem) => {
                self.waiting.fetch_add(1, Ordering::Relaxed);
                let _waiting = Waiting(Arc::clone(&self.waiting));
                // The semaphore is never closed, so acquiring cannot fail.
                Arc::clone(sem).acquire_owned().await.ok()
            }
            None => None,
        };
        self.running.fetch_add(1, Ordering::Relaxed);
        (Slot { _permit: permit, running: Arc::clone(&self.running) }, started.elapsed())
    }

    pub fn costs(&self) -> Costs {
        Costs {
            prefill_us_per_token: self.prefill_us.load(Ordering::Relaxed),
            decode_us_per_token: self.decode_us.load(Ordering::Relaxed),
        }
    }

    pub fn set_costs(&self, costs: Costs) {
        self.prefill_us.store(costs.prefill_us_per_token, Ordering::Relaxed);
        self.decode_us.store(costs.decode_us_per_token, Ordering::Relaxed);
    }

    /// Turns waiting for a slot.
    pub fn waiting(&self) -> u64 {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Turns holding a slot.
    pub fn running(&self) -> u64 {
        self.running.load(Ordering::Relaxed)
    }

    pub fn slot_count(&self) -> usize {
        self.slot_count
    }

    pub fn kv(&self) -> MutexGuard<'_, KvCache> {
        self.kv.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `kv_cache_usage_perc` now.
    pub fn kv_usage(&self) -> f64 {
        self.kv().usage()
    }

    /// The load report header value for `format`, or `None`.
    pub fn load_report(&self, format: &[u8]) -> Option<String> {
        load_report(format, self.kv_usage(), self.waiting())
    }
}

/// `tokens` × `us_per_token` as a duration.
pub fn cost(tokens: u64, us_per_token: u64) -> Duration {
    Duration::from_micros(tokens.saturating_mul(us_per_token))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::conversation::Turn;

    #[test]
    fn tokens_are_words() {
        assert_eq!(tokens(""), 0);
        assert_eq!(tokens("  "), 0);
        assert_eq!(tokens("one"), 1);
        assert_eq!(tokens(" two  words\n"), 2);
        let c = Conversation::new().with_turn(Turn { user: "a b".into(), reply: "c d e".into(), id: "1".into() });
        assert_eq!(history_tokens(&c), 5);
    }

    #[test]
    fn split_tokens_concatenates_to_the_text() {
        let table: [(&str, &[&str]); 6] = [
            ("", &[]),
            ("   ", &["   "]),
            ("one", &["one"]),
            ("turn 1: you said 'hi'", &["turn", " 1:", " you", " said", " 'hi'"]),
            ("  lead and trail  ", &["  lead", " and", " trail  "]),
            ("é ü\nx", &["é", " ü", "\nx"]),
        ];
        for (text, want) in table {
            let got = split_tokens(text);
            assert_eq!(got, want, "{text:?}");
            assert_eq!(got.concat(), text);
            if tokens(text) > 0 {
                assert_eq!(got.len() as u64, tokens(text));
            }
        }
    }

    #[test]
    fn kv_cache_plans_prefill_from_what_memory_holds() {
        let mut kv = KvCache::new(100);
        // New conversation: pays the message.
        assert_eq!(kv.plan("s", false, 0, 4), Plan { cached_tokens: 0, prefill_tokens: 4 });
        kv.hold("s", 10);
        // Sticky, from memory, cache holds exactly the history: only the message.
        assert_eq!(kv.plan("s", true, 10, 3), Plan { cached_tokens: 10, prefill_tokens: 3 });
        // From the store (moved here, or memory not trusted): the whole history, and
        // the stale entry is dropped.
        assert_eq!(kv.plan("s", false, 10, 3), Plan { cached_tokens: 0, prefill_tokens: 13 });
        assert_eq!(kv.used(), 0);
        kv.hold("s", 10);
        // Memory copy, but the cache holds another length (a stale entry): whole history.
        assert_eq!(kv.plan("s", true, 12, 1), Plan { cached_tokens: 0, prefill_tokens: 13 });
        assert!(kv.is_empty());
    }

    #[test]
    fn kv_cache_evicts_lru_within_capacity() {
        let mut kv = KvCache::new(100);
        kv.hold("a", 40);
        kv.hold("b", 40);
        assert_eq!((kv.used(), kv.usage()), (80, 0.8));
        kv.plan("a", true, 40, 0); // a is now the most recent
        kv.hold("c", 30); // evicts b
        assert_eq!(kv.used(), 70);
        assert_eq!(kv.plan("b", true, 40, 1).cached_tokens, 0);
        assert_eq!(kv.plan("a", true, 40, 1).cached_tokens, 40);
        // Replacing an entry does not count it twice.
        kv.hold("a", 50);
        assert_eq!(kv.used(), 80);
        // Larger than the whole capacity: not kept, nothing else evicted.
        kv.hold("huge", 101);
        assert_eq!((kv.used(), kv.len()), (80, 2));
        kv.forget("a");
        kv.forget("a");
        assert_eq!(kv.used(), 30);
        assert_eq!(KvCache::new(0).usage(), 0.0);
    }

    #[test]
    fn load_report_matches_vllm() {
        assert_eq!(
            load_report(b"TEXT", 0.25, 3).unwrap(),
            "TEXT named_metrics.kv_cache_usage_perc=0.25, named_metrics.num_requests_waiting=3.0"
        );
        assert_eq!(
            load_report(b"text", 0.0, 0).unwrap(),
            "TEXT named_metrics.kv_cache_usage_perc=0.0, named_metrics.num_requests_waiting=0.0"
        );
        assert_eq!(
            load_report(b"JSON", 1.0, 2).unwrap(),
            r#"JSON {"named_metrics":{"kv_cache_usage_perc":1.0,"num_requests_waiting":2.0}}"#
        );
        assert_eq!(load_report(b"BINARY", 0.5, 0), None);
        assert_eq!(load_report(b"\xff", 0.5, 0), None);
    }

    #[tokio::test]
    async fn slots_queue_and_count_waiting() {
        let engine = Arc::new(Engine::new(EngineConfig { slots: 1, ..EngineConfig::default() }));
        let (first, waited) = engine.acquire().await;
        assert_eq!((engine.running(), engine.waiting()), (1, 0));
        assert!(waited < Duration::from_secs(60));
        let e = Arc::clone(&engine);
        let second = tokio::spawn(async move { e.acquire().await });
        // Wait for the second turn to queue (an event, not a sleep).
        while engine.waiting() != 1 {
            tokio::task::yield_now().await;
        }
        assert!(!second.is_finished());
        drop(first);
        let (slot, _) = second.await.unwrap();
        assert_eq!((engine.running(), engine.waiting()), (1, 0));
        drop(slot);
        assert_eq!(engine.running(), 0);
        // Unlimited: never waits.
        let free = Engine::new(EngineConfig::default());
        let (_a, _) = free.acquire().await;
        let (_b, _) = free.acquire().await;
        assert_eq!(free.running(), 2);
    }

    #[test]
    fn costs_change_at_run_time() {
        let e = Engine::new(EngineConfig { prefill_us_per_token: 5, ..EngineConfig::default() });
        assert_eq!(e.costs(), Costs { prefill_us_per_token: 5, decode_us_per_token: 0 });
        e.set_costs(Costs { prefill_us_per_token: 50, decode_us_per_token: 7 });
        assert_eq!(e.costs().decode_us_per_token, 7);
        assert_eq!(cost(3, 7), Duration::from_micros(21));
        assert_eq!(cost(u64::MAX, 2), Duration::from_micros(u64::MAX));
    }
}
