//! `chat-node`: the reference chat backend behind the session-affinity filter
//! (DESIGN.md section 8).
//!
//! A node answers `POST /v1/chat` for the session named by `x-session-id` (set by the
//! Envoy filter, which strips client copies). It keeps recent conversations in a bounded
//! in-memory LRU cache and writes every turn to Redis, through Envoy's `redis_proxy`,
//! *before* it replies: an acknowledged turn is never lost, whichever node serves the next
//! one.
//!
//! # Layout
//!
//! Pure modules, unit-tested natively:
//! - [`conversation`]: messages, turn count, `history_digest`, the stored JSON form and
//!   the Redis key.
//! - [`model`]: the built-in deterministic "model" and the [`model::Model`] seam.
//! - [`lru`]: the bounded conversation cache.
//! - [`resp`]: RESP2 encoding and decoding.
//! - [`http`]: HTTP/1.1 message parsing and writing (server and client side).
//! - [`config`]: flags and environment.
//! - [`service`]: the request handler, `Service::handle(&Request, local address, now) -> Response`, written
//!   against the [`store::Store`] and [`model::Model`] traits so it is tested with fakes.
//!
//! I/O shells:
//! - [`redis`]: a pooled RESP client with retries, implementing [`store::Store`].
//! - [`llm`]: optional forwarding to an OpenAI-compatible endpoint (plain HTTP).
//! - [`server`]: listener, one thread per connection, keep-alive, graceful shutdown.

#![forbid(unsafe_code)]

pub mod config;
pub mod conversation;
pub mod http;
pub mod llm;
pub mod lru;
pub mod model;
pub mod redis;
pub mod resp;
pub mod server;
pub mod service;
pub mod stats;
pub mod store;
