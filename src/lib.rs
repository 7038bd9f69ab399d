//! session-affinity: sticky routing for multi-turn LLM conversations, as a proxy-wasm
//! HTTP filter for Envoy.
//!
//! Each request carries a signed session token; the filter validates it, ranks the
//! healthy hosts of the chat-node cluster by weighted rendezvous hashing of the session id
//! and sets Envoy's override header (`x-gateway-destination-endpoint`) to the chosen node
//! and its fallbacks. A signed affinity ticket remembers which node served the session
//! last, so a conversation stays put (`pinned` mode) and every proxy replica agrees
//! without sharing state. The filter keeps no per-session state.
//!
//! # Layout
//!
//! A pure core, tested natively, and a thin proxy-wasm shell compiled only for wasm32:
//!
//! - [`config`]: the plugin configuration, parsed and checked once (two phases).
//! - [`token`]: session tokens (HMAC JWT) — validation in the contract's order, minting.
//! - [`ticket`]: affinity tickets — which node served a session last.
//! - [`jws`]: the compact-JWS layer both share (strict base64url, keyed MACs).
//! - [`affinity`]: the affinity function (weighted rendezvous hashing).
//! - [`hosts`]: the healthy host set, hashed once per change.
//! - [`admin`]: parsing Envoy's admin `/clusters?format=json` for live discovery.
//! - [`discovery`]: the discovery schedule (fast, settling, steady, backoff, shared set).
//! - [`startup`]: holding requests until the first host set (`startup_wait_ms`).
//! - [`headers`]: request headers as bytes (wire map, cookies, spoofing checks).
//! - [`decision`]: the per-request policy, `decide` and `respond`; session identities.
//! - [`memo`]: per-VM memo of recent successful token and ticket checks.
//! - [`placement`]: placement under load: bounded loads, saturation, drain (pure rules).
//! - [`load`]: per-node load and load reports as one VM sees them.
//! - [`orca`]: parsing ORCA TEXT load reports.
//! - [`metrics`]: metric names and the in-VM tally flushed to Envoy.
//! - `filter` (wasm32 only): root and HTTP contexts; gathers inputs, applies decisions
//!   and the effects of the discovery and startup state types.

// `unsafe` is denied crate-wide; only `filter::raw` (one host call the SDK cannot make
// without panicking on non-UTF-8 input) opts out.
#![deny(unsafe_code)]

pub mod admin;
pub mod affinity;
pub mod config;
pub mod decision;
pub mod discovery;
pub mod headers;
pub mod hosts;
pub mod jws;
pub mod load;
pub mod memo;
pub mod metrics;
pub mod orca;
pub mod placement;
pub mod startup;
pub mod ticket;
pub mod token;

#[cfg(target_arch = "wasm32")]
mod filter;
