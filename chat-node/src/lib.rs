//! `chat-node`: the reference chat backend behind the session-affinity filter
//! (DESIGN.md section 8).
//!
//! A node answers `POST /v1/chat` and the OpenAI-compatible `POST /v1/chat/completions`
//! for the session named by `x-session-id` (set by the Envoy filter, which strips client
//! copies). It keeps recent conversations in a bounded in-memory LRU cache and appends
//! every turn to the store with a compare-and-append *before* it replies: an acknowledged
//! turn is never lost or duplicated, whichever node serves the next one, even when two
//! nodes serve one conversation at the same moment.
//!
//! # Layout
//!
//! Pure modules, unit-tested natively:
//! - [`conversation`]: turns, `history_digest`, Redis keys, the stored form of a turn.
//! - [`model`]: the built-in deterministic model.
//! - [`engine`]: the engine model (slots, prefill/decode costs, KV cache) and the ORCA
//!   load report.
//! - [`lru`]: the bounded cache.
//! - [`openai`]: the OpenAI-compatible request and response shapes.
//! - [`config`]: flags and environment (clap).
//! - [`service`]: the chat policy (`begin` a turn, `run` it), written against the
//!   [`store::Store`] so it is tested with the in-memory store.
//!
//! I/O shells on standard parts:
//! - [`redis_store`]: `redis` crate (async, `ConnectionManager`) with bounded retries.
//! - [`llm`]: `reqwest` (rustls) to an OpenAI-compatible endpoint, streaming too.
//! - [`app`]: axum routes, tower limits and timeouts, server-sent events, and
//!   `serve(listener, router, shutdown)`.
//! - [`run`]: builds a node from a [`config::Config`] and serves until `shutdown`.

#![forbid(unsafe_code)]

pub mod app;
pub mod config;
pub mod conversation;
pub mod engine;
pub mod llm;
pub mod lru;
pub mod model;
pub mod openai;
pub mod redis_store;
pub mod service;
pub mod stats;
pub mod store;

use config::{Config, StoreKind};
use engine::Engine;
use service::{Model, Service, ServiceConfig};
use stats::Stats;
use std::future::Future;
use std::sync::Arc;
use store::{MemoryStore, Store};
use tokio::net::TcpListener;

/// The node's service, built from its configuration.
pub fn build(config: &Config) -> Result<Arc<Service>, String> {
    let stats = Arc::new(Stats::new());
    let store = match config.store {
        StoreKind::Redis => {
            Store::Redis(redis_store::RedisStore::new(&config.redis, config.redis_retry, Arc::clone(&stats))?)
        }
        StoreKind::Memory => Store::Memory(Arc::new(MemoryStore::new())),
    };
    let model = match &config.llm {
        Some(llm) => Model::Llm(llm::Llm::new(llm.clone())?),
        None => Model::Builtin,
    };
    let service_config = ServiceConfig {
        node_id: config.node_id.clone(),
        cache_size: config.cache_size,
        ttl_seconds: config.ttl_seconds,
    };
    Ok(Arc::new(Service::new(service_config, store, model, Engine::new(config.engine), stats)))
}

/// Binds the listeners, logs where they are (tests read `listening on <addr>;` and
/// `admin on <addr>`), and serves until `shutdown` completes; then both listeners close
/// and in-flight requests finish.
pub async fn run<F>(config: Config, shutdown: F) -> Result<(), String>
where
    F: Future<Output = ()> + Send + 'static,
{
    let svc = build(&config)?;
    let listener =
        TcpListener::bind(&config.listen).await.map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let local = listener.local_addr().map_err(|e| format!("cannot read the listening address: {e}"))?;
    let admin = match &config.admin_listen {
        Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| format!("cannot listen on {addr}: {e}"))?),
        None => None,
    };
    let e = config.engine;
    eprintln!(
        "chat-node {}: listening on {local}; {}; {}; engine slots {} prefill {} us/token decode {} us/token kv {} tokens",
        config.node_id,
        svc.store().describe(),
        svc.model().describe(),
        e.slots,
        e.prefill_us_per_token,
        e.decode_us_per_token,
        e.kv_capacity_tokens
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let limits = app::Limits { concurrency: config.max_in_flight, request_timeout: config.request_timeout };
    let admin_task = match admin {
        Some(listener) => {
            let addr = listener.local_addr().map_err(|e| format!("cannot read the admin address: {e}"))?;
            eprintln!("chat-node {}: admin on {addr}", config.node_id);
            let router = app::admin_router(Arc::clone(&svc));
            Some(tokio::spawn(app::serve(listener, router, stopped(stop_rx.clone()))))
        }
        None => None,
    };
    let served = app::serve(listener, app::router(svc, limits), stopped(stop_rx)).await;
    if let Some(task) = admin_task {
        let _ = task.await;
    }
    served.map_err(|e| format!("server failed: {e}"))
}
