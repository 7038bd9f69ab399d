//! The chat policy: one turn of a conversation, from "which history do I trust" to "the
//! turn is stored, answer it". Transport-free (the HTTP layer is [`crate::app`]) and
//! tested natively against the in-memory store.
//!
//! A turn runs in two steps: [`Service::begin`] (checks, per-session lock, load, `turn`
//! check: anything that must be known before a response starts, such as a 409) and
//! [`Pending::run`] (engine slot, prefill, the reply, the compare-and-append).
//!
//! Invariants:
//! - A turn is answered 200 (or its stream ends with `[DONE]`) only after the store
//!   appended it. The append is a compare-and-append: turn n is written only if the store
//!   holds exactly n − 1 turns ([`crate::store`]), so two nodes serving one conversation
//!   at once can never both write turn n, and none overwrites the other.
//! - On a conflict the node reloads the store and applies the turn again on top of what
//!   it finds: without `turn`, the reply is generated again for the new history (a
//!   stream, whose tokens are already out, appends the reply it sent); with `turn`, the
//!   turn check runs again: the next turn is applied, a replay is answered, anything else
//!   is `409 turn_conflict`. Bounded by [`MAX_CONFLICT_ROUNDS`], then 503.
//! - If the store holds fewer turns than this node's memory copy and they are a prefix of
//!   it (a Redis failover lost acknowledged writes that had not reached the replica), the
//!   missing turns are appended again from memory before this turn ("repair").
//! - Turns of one session are serialised on this node (striped async locks held from
//!   load to store), so two requests on one node do not race each other.
//! - The memory copy is trusted only for `x-session-affinity: sticky` (or when the header
//!   is absent, i.e. no filter in front), and not when this node is not the first entry
//!   of the override header ([`OVERRIDE_HEADER`]: Envoy retried the request here after
//!   the primary failed). `moved`, `new` and unknown values reload.
//! - A request that says which turn it is (`turn`) is applied only as the next turn; if
//!   the conversation already ends with that very turn (same message), it is a retry of
//!   an applied turn whose reply was lost and is answered again, never applied twice.

use crate::conversation::{decode_entries, decode_legacy, encode_entry, Conversation, Turn};
use crate::engine::{self, Engine, Report};
use crate::llm::Llm;
use crate::lru::Lru;
use crate::model::{Builtin, ModelError};
use crate::stats::Stats;
use crate::store::{AppendOutcome, Store, StoreError};
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, OwnedMutexGuard};

/// Longest accepted `x-session-id`, in bytes.
pub const MAX_SESSION_ID_BYTES: usize = 512;
/// Most message bytes one conversation may hold.
pub const MAX_CONVERSATION_BYTES: usize = 16 * 1024 * 1024;
/// Compare-and-append conflicts one turn may meet before it gives up with 503.
pub const MAX_CONFLICT_ROUNDS: u32 = 32;
/// Number of striped per-session locks.
const LOCK_STRIPES: usize = 4096;
/// The header in which the filter lists the session's primary node first, then its
/// fallbacks (`ip:port`, IPv6 in brackets); the filter's default `upstream.override_header`.
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
/// the conversation has been served elsewhere since this node last saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// No override header, or a blank one, or the local address is unknown.
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

/// How a request's `turn` relates to the conversation it found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnCheck {
    /// No `turn`, or the conversation has `turn - 1` turns: append.
    Next,
    /// The conversation's last turn is this turn with this message: a retry of a turn
    /// already applied. Answer it again, do not append.
    Replay,
    /// Anything else: the client and the conversation disagree.
    Conflict,
}

impl TurnCheck {
    pub fn of(history: &Conversation, turn: Option<u64>, message: &str) -> TurnCheck {
        let Some(turn) = turn else {
            return TurnCheck::Next;
        };
        let have = history.turns();
        if turn == have + 1 {
            TurnCheck::Next
        } else if turn == have && turn > 0 && history.last().map(|t| t.user.as_str()) == Some(message) {
            TurnCheck::Replay
        } else {
            TurnCheck::Conflict
        }
    }
}

/// The session id from `x-session-id` (bytes), or the error to send.
pub fn session_id(raw: Option<&[u8]>) -> Result<String, ApiError> {
    let raw = raw.unwrap_or_default();
    if raw.is_empty() {
        return Err(ApiError::bad(400, "missing_session_id", "x-session-id header is required"));
    }
    if raw.len() > MAX_SESSION_ID_BYTES {
        return Err(ApiError::bad(400, "bad_session_id", "x-session-id is too long"));
    }
    std::str::from_utf8(raw)
        .ok()
        .filter(|s| !s.chars().any(char::is_control))
        .map(str::to_owned)
        .ok_or_else(|| ApiError::bad(400, "bad_session_id", "x-session-id must be printable UTF-8"))
}

/// An error answer: status, code (`error` field), detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub code: &'static str,
    pub detail: String,
    /// A client error (counted in `bad_requests`).
    pub client: bool,
    /// On `409 turn_conflict`: the turns the conversation has (the `turns` field).
    pub turns: Option<u64>,
}

impl ApiError {
    pub fn bad(status: u16, code: &'static str, detail: &str) -> Self {
        Self { status, code, detail: detail.to_owned(), client: true, turns: None }
    }

    pub fn server(status: u16, code: &'static str, detail: &str) -> Self {
        Self { status, code, detail: detail.to_owned(), client: false, turns: None }
    }

    fn store(e: &StoreError) -> Self {
        Self::server(503, "store_unavailable", &e.to_string())
    }
}

/// One turn as the HTTP layer hands it over.
#[derive(Debug, Clone)]
pub struct TurnRequest {
    pub session_id: String,
    pub message: String,
    pub turn: Option<u64>,
    pub affinity: Affinity,
    pub placement: Placement,
    /// `x-session-previous-node` (logged only).
    pub previous_node: String,
    /// The override header as received (logged only).
    pub override_header: String,
}

/// An acknowledged turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurnReply {
    pub reply: String,
    pub turn: u64,
    pub context: Context,
    pub history_digest: String,
    /// A retry of a turn already applied, answered again.
    pub replayed: bool,
    /// Tokens of the prompt (history + message) and of the reply.
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub engine: Report,
}

/// The result of [`Service::begin`].
pub enum Begun {
    /// A retry of a turn already applied: here is its answer.
    Replay(TurnReply),
    /// Run it.
    Run(Pending),
}

/// The reply model.
pub enum Model {
    Builtin,
    Llm(Llm),
}

impl Model {
    pub fn describe(&self) -> String {
        match self {
            Model::Builtin => "built-in deterministic model".into(),
            Model::Llm(llm) => format!("LLM {} at {}", llm.config().model, llm.config().url),
        }
    }
}

/// Node settings the service needs.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub node_id: String,
    pub cache_size: usize,
    pub ttl_seconds: u64,
}

/// Node state shared by every request.
pub struct Service {
    node_id: String,
    ttl_seconds: u64,
    cache: Mutex<Lru<String, Arc<Conversation>>>,
    locks: Vec<Arc<tokio::sync::Mutex<()>>>,
    lock_hasher: RandomState,
    store: Store,
    model: Model,
    engine: Engine,
    stats: Arc<Stats>,
    write_prefix: String,
    writes: AtomicU64,
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Service {
    pub fn new(config: ServiceConfig, store: Store, model: Model, engine: Engine, stats: Arc<Stats>) -> Self {
        let started = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        Self {
            write_prefix: format!("{}-{started:x}", config.node_id),
            node_id: config.node_id,
            ttl_seconds: config.ttl_seconds,
            cache: Mutex::new(Lru::new(config.cache_size)),
            locks: (0..LOCK_STRIPES).map(|_| Arc::new(tokio::sync::Mutex::new(()))).collect(),
            lock_hasher: RandomState::new(),
            store,
            model,
            engine,
            stats,
            writes: AtomicU64::new(0),
        }
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Conversations in the memory cache.
    pub fn cache_len(&self) -> usize {
        self.lock_cache().len()
    }

    /// Counts a refused request (called by the HTTP layer for its own refusals too).
    pub fn refused(&self, e: ApiError) -> ApiError {
        if e.client {
            Stats::inc(&self.stats.bad_requests);
        }
        e
    }

    /// A write id unique to this process and write.
    fn write_id(&self) -> String {
        format!("{}-{}", self.write_prefix, self.writes.fetch_add(1, Ordering::Relaxed))
    }

    /// Checks, locks the session, loads its history and checks `turn`.
    pub async fn begin(self: &Arc<Self>, req: TurnRequest) -> Result<Begun, ApiError> {
        Stats::inc(&self.stats.chat_requests);
        if req.turn == Some(0) {
            return Err(self.refused(ApiError::bad(400, "bad_request", "body: turn must be at least 1")));
        }
        if req.affinity == Affinity::Moved {
            Stats::inc(&self.stats.moved);
        }
        // A retry on a fallback node is a move the filter could not see: reload.
        let retried_here = req.placement == Placement::Fallback && req.affinity.trusts_memory();
        if retried_here {
            Stats::inc(&self.stats.fallback);
        }
        let trust_memory = req.affinity.trusts_memory() && !retried_here;

        let stripe = self.lock_hasher.hash_one(&req.session_id) as usize % self.locks.len();
        let guard = Arc::clone(&self.locks[stripe]).lock_owned().await;

        let (mut history, mut context) = self.load(&req.session_id, trust_memory).await?;
        if context == Context::Memory && TurnCheck::of(&history, req.turn, &req.message) == TurnCheck::Conflict {
            // The client numbers its turn differently from this node's copy: the copy
            // may be behind (another node served turns since); the store decides.
            (history, context) = self.load(&req.session_id, false).await?;
        }
        if req.affinity == Affinity::Moved {
            eprintln!(
                "node {}: conversation moved here from node {:?}: context {}, {} turn(s) so far",
                self.node_id,
                req.previous_node,
                context.as_str(),
                history.turns()
            );
        } else if retried_here {
            eprintln!(
                "node {}: retried here as a fallback (override header {:?}): context {}, {} turn(s) so far",
                self.node_id,
                req.override_header,
                context.as_str(),
                history.turns()
            );
        }

        match TurnCheck::of(&history, req.turn, &req.message) {
            TurnCheck::Next => Ok(Begun::Run(Pending { svc: Arc::clone(self), _guard: guard, req, history, context })),
            TurnCheck::Replay => {
                let reply = self.replay(&history, context);
                self.remember(&req.session_id, history);
                Ok(Begun::Replay(reply))
            }
            TurnCheck::Conflict => {
                let have = history.turns();
                self.remember(&req.session_id, history);
                Err(self.refused(turn_conflict(req.turn.unwrap_or(0), have)))
            }
        }
    }

    fn replay(&self, history: &Conversation, context: Context) -> TurnReply {
        Stats::inc(&self.stats.replayed);
        eprintln!(
            "node {}: turn {} of a conversation was already applied (a retry whose earlier reply was lost): answered again",
            self.node_id,
            history.turns()
        );
        let last =
            history.last().cloned().unwrap_or(Turn { user: String::new(), reply: String::new(), id: String::new() });
        let prompt = engine::history_tokens(history) - engine::tokens(&last.reply);
        TurnReply {
            completion_tokens: engine::tokens(&last.reply),
            reply: last.reply,
            turn: history.turns(),
            context,
            history_digest: history.digest(),
            replayed: true,
            prompt_tokens: prompt,
            engine: Report::default(),
        }
    }

    /// The conversation before this turn, and where it came from; the memory copy is
    /// used only if `trust_memory`.
    async fn load(&self, session_id: &str, trust_memory: bool) -> Result<(Arc<Conversation>, Context), ApiError> {
        if trust_memory {
            if let Some(found) = self.lock_cache().get(&session_id.to_owned()) {
                return Ok((found, Context::Memory));
            }
        } else {
            // The memory copy may be stale; drop it now so a failed reload cannot leave
            // it behind for the next sticky turn.
            self.lock_cache().remove(&session_id.to_owned());
        }
        match self.load_store(session_id).await? {
            Some(c) => Ok((Arc::new(c), Context::Store)),
            None => Ok((Arc::new(Conversation::new()), Context::New)),
        }
    }

    /// The stored conversation (`None` when the store has none), migrating a value of
    /// the previous layout when that is all there is.
    async fn load_store(&self, session_id: &str) -> Result<Option<Conversation>, ApiError> {
        let entries = self.store.load(session_id).await.map_err(|e| self.store_failed(&e))?;
        if !entries.is_empty() {
            return self.decode(session_id, &entries).map(Some);
        }
        let Some(value) = self.store.legacy(session_id).await.map_err(|e| self.store_failed(&e))? else {
            return Ok(None);
        };
        let old = decode_legacy(&value, session_id).map_err(|e| self.corrupt(session_id, &e.to_string()))?;
        let now = unix_now();
        let entries: Vec<String> = old
            .turn_list()
            .iter()
            .enumerate()
            .map(|(i, t)| encode_entry(i as u64 + 1, t, &self.node_id, now))
            .collect();
        match self.store.append(session_id, 0, &entries, self.ttl_seconds).await.map_err(|e| self.store_failed(&e))? {
            AppendOutcome::Appended { .. } | AppendOutcome::AlreadyApplied { .. } => {
                self.store.delete_legacy(session_id).await.map_err(|e| self.store_failed(&e))?;
                Stats::inc(&self.stats.migrated);
                eprintln!(
                    "node {}: migrated a conversation of {} turn(s) from the previous layout",
                    self.node_id,
                    old.turns()
                );
                Ok(Some(old))
            }
            AppendOutcome::Conflict { .. } => {
                // Another node migrated it (or a turn was appended) meanwhile.
                let entries = self.store.load(session_id).await.map_err(|e| self.store_failed(&e))?;
                self.decode(session_id, &entries).map(|c| (c.turns() > 0).then_some(c))
            }
        }
    }

    fn decode(&self, session_id: &str, entries: &[Vec<u8>]) -> Result<Conversation, ApiError> {
        decode_entries(entries).map_err(|e| self.corrupt(session_id, &e.to_string()))
    }

    fn corrupt(&self, session_id: &str, why: &str) -> ApiError {
        Stats::inc(&self.stats.store_corrupt);
        eprintln!("node {}: session {session_id:?}: {why}", self.node_id);
        ApiError::server(500, "corrupt_conversation", why)
    }

    fn store_failed(&self, e: &StoreError) -> ApiError {
        Stats::inc(&self.stats.store_failures);
        ApiError::store(e)
    }

    fn remember(&self, session_id: &str, conversation: Arc<Conversation>) {
        self.lock_cache().put(session_id.to_owned(), conversation);
    }

    fn forget(&self, session_id: &str) {
        self.lock_cache().remove(&session_id.to_owned());
    }

    fn lock_cache(&self) -> MutexGuard<'_, Lru<String, Arc<Conversation>>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A reply for `history` + `message`, without engine time (used again after a
    /// conflict).
    async fn generate(&self, history: &Conversation, message: &str) -> Result<String, ModelError> {
        match &self.model {
            Model::Builtin => Ok(Builtin.reply(history, message)),
            Model::Llm(llm) => llm.complete(history, message).await,
        }
    }
}

fn turn_conflict(turn: u64, have: u64) -> ApiError {
    let mut e = ApiError::bad(
        409,
        "turn_conflict",
        &format!("this message was sent as turn {turn} but the conversation has {have} turn(s)"),
    );
    e.turns = Some(have);
    e
}

/// A turn that passed [`Service::begin`]: it holds the session's lock.
pub struct Pending {
    svc: Arc<Service>,
    _guard: OwnedMutexGuard<()>,
    req: TurnRequest,
    history: Arc<Conversation>,
    context: Context,
}

impl Pending {
    pub fn context(&self) -> Context {
        self.context
    }

    /// The turn number this turn becomes unless another writer gets there first.
    pub fn next_turn(&self) -> u64 {
        self.history.turns() + 1
    }

    /// Runs the turn: waits for an engine slot, models the prefill, produces the reply
    /// (streamed piece by piece to `sink` when given, paced by the modelled decode), and
    /// stores it with a compare-and-append.
    pub async fn run(self, sink: Option<mpsc::Sender<String>>) -> Result<TurnReply, ApiError> {
        let svc = Arc::clone(&self.svc);
        let result = self.run_inner(sink).await;
        if let Err(e) = &result {
            if e.code == "model_unavailable" {
                Stats::inc(&svc.stats.llm_errors);
            }
            if e.client {
                Stats::inc(&svc.stats.bad_requests);
            }
        }
        result
    }

    async fn run_inner(self, sink: Option<mpsc::Sender<String>>) -> Result<TurnReply, ApiError> {
        let Pending { svc, _guard, req, mut history, mut context } = self;
        let sid = req.session_id.as_str();
        let engine = &svc.engine;

        let (slot, queued) = engine.acquire().await;
        let history_tokens = engine::history_tokens(&history);
        let message_tokens = engine::tokens(&req.message);
        let plan = engine.kv().plan(sid, context == Context::Memory, history_tokens, message_tokens);
        let costs = engine.costs();
        let mut report = Report {
            queued_us: u64::try_from(queued.as_micros()).unwrap_or(u64::MAX),
            cached_tokens: plan.cached_tokens,
            prefill_tokens: plan.prefill_tokens,
            prefill_us: plan.prefill_tokens.saturating_mul(costs.prefill_us_per_token),
            ..Report::default()
        };
        tokio::time::sleep(engine::cost(plan.prefill_tokens, costs.prefill_us_per_token)).await;

        let streamed = sink.is_some();
        let produced = match (&svc.model, &sink) {
            (Model::Builtin, _) => {
                let reply = Builtin.reply(&history, &req.message);
                let pause = engine::cost(1, costs.decode_us_per_token);
                match &sink {
                    Some(sink) => {
                        for piece in engine::split_tokens(&reply) {
                            tokio::time::sleep(pause).await;
                            let _ = sink.send(piece.to_owned()).await;
                        }
                    }
                    None => {
                        tokio::time::sleep(engine::cost(engine::tokens(&reply), costs.decode_us_per_token)).await;
                    }
                }
                Ok(reply)
            }
            (Model::Llm(llm), Some(sink)) => llm.stream(&history, &req.message, sink).await,
            (Model::Llm(llm), None) => llm.complete(&history, &req.message).await,
        };
        let mut reply = match produced {
            Ok(r) => r,
            Err(e) => {
                eprintln!("node {}: {e}", svc.node_id);
                svc.remember(sid, history);
                return Err(ApiError::server(502, "model_unavailable", &e.to_string()));
            }
        };
        report.decode_tokens = engine::tokens(&reply);
        report.decode_us = report.decode_tokens.saturating_mul(costs.decode_us_per_token);
        drop(slot);

        // Compare-and-append, reloading on conflicts.
        let turn_id = svc.write_id();
        let mut rounds = 0u32;
        loop {
            let turn = Turn { user: req.message.clone(), reply: reply.clone(), id: turn_id.clone() };
            let next = Arc::new(history.with_turn(turn));
            if next.content_bytes() > MAX_CONVERSATION_BYTES {
                svc.remember(sid, history);
                return Err(ApiError::bad(
                    413,
                    "conversation_too_large",
                    "this conversation holds too much text to store another turn",
                ));
            }
            let n = next.turns();
            let entry = next.last().map(|t| encode_entry(n, t, &svc.node_id, unix_now())).unwrap_or_default();
            let outcome = match svc.store.append(sid, n - 1, &[entry], svc.ttl_seconds).await {
                Ok(o) => o,
                Err(e) => {
                    // Memory keeps the last acknowledged state: the client will retry.
                    svc.remember(sid, history);
                    return Err(svc.store_failed(&e));
                }
            };
            match outcome {
                AppendOutcome::Appended { .. } | AppendOutcome::AlreadyApplied { .. } => {
                    if matches!(outcome, AppendOutcome::AlreadyApplied { len } if len != n) {
                        // Our write landed earlier and others followed it: our copy is
                        // behind; the next turn reloads.
                        svc.forget(sid);
                        engine.kv().forget(sid);
                    } else {
                        svc.remember(sid, Arc::clone(&next));
                        engine.kv().hold(sid, engine::history_tokens(&next));
                    }
                    Stats::inc(&svc.stats.turns);
                    match context {
                        Context::Memory => Stats::inc(&svc.stats.memory_hits),
                        Context::Store => Stats::inc(&svc.stats.store_loads),
                        Context::New => Stats::inc(&svc.stats.new_conversations),
                    }
                    return Ok(TurnReply {
                        reply,
                        turn: n,
                        context,
                        history_digest: next.digest(),
                        replayed: false,
                        prompt_tokens: history_tokens + message_tokens,
                        completion_tokens: report.decode_tokens,
                        engine: report,
                    });
                }
                AppendOutcome::Conflict { .. } => {
                    rounds += 1;
                    Stats::inc(&svc.stats.append_conflicts);
                    if rounds > MAX_CONFLICT_ROUNDS {
                        svc.forget(sid);
                        return Err(ApiError::server(
                            503,
                            "store_contention",
                            "the conversation kept changing under this turn; retry",
                        ));
                    }
                    let stored = match svc.load_store(sid).await {
                        Ok(c) => c.unwrap_or_default(),
                        Err(e) => {
                            svc.forget(sid);
                            return Err(e);
                        }
                    };
                    if stored.turns() < history.turns() && stored.is_prefix_of(&history) {
                        // The store lost turns this node acknowledged (a failover
                        // without replication): write them again, then this turn.
                        let missing: Vec<String> = history.turn_list()[stored.turns() as usize..]
                            .iter()
                            .enumerate()
                            .map(|(i, t)| encode_entry(stored.turns() + i as u64 + 1, t, &svc.node_id, unix_now()))
                            .collect();
                        eprintln!(
                            "node {}: the store holds {} of this conversation's {} turns: writing the missing ones again",
                            svc.node_id,
                            stored.turns(),
                            history.turns()
                        );
                        match svc.store.append(sid, stored.turns(), &missing, svc.ttl_seconds).await {
                            Ok(AppendOutcome::Appended { .. } | AppendOutcome::AlreadyApplied { .. }) => {
                                Stats::inc(&svc.stats.repaired);
                            }
                            Ok(AppendOutcome::Conflict { .. }) => {}
                            Err(e) => {
                                svc.remember(sid, history);
                                return Err(svc.store_failed(&e));
                            }
                        }
                        continue;
                    }
                    history = Arc::new(stored);
                    context = if history.turns() == 0 { Context::New } else { Context::Store };
                    engine.kv().forget(sid);
                    match TurnCheck::of(&history, req.turn, &req.message) {
                        TurnCheck::Next => {}
                        TurnCheck::Replay => {
                            let answer = svc.replay(&history, context);
                            svc.remember(sid, history);
                            return Ok(answer);
                        }
                        TurnCheck::Conflict => {
                            let have = history.turns();
                            svc.remember(sid, history);
                            return Err(turn_conflict(req.turn.unwrap_or(0), have));
                        }
                    }
                    if !streamed {
                        // Apply the turn again on top of what is stored now.
                        reply = match svc.generate(&history, &req.message).await {
                            Ok(r) => r,
                            Err(e) => {
                                svc.remember(sid, history);
                                return Err(ApiError::server(502, "model_unavailable", &e.to_string()));
                            }
                        };
                        report.decode_tokens = engine::tokens(&reply);
                        report.decode_us = report.decode_tokens.saturating_mul(costs.decode_us_per_token);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "service_tests.rs"]
mod tests;
