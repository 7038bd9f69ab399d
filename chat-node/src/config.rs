//! Configuration: flags with environment fallbacks (clap; a flag wins over its
//! variable), then [`Config::try_from`] checks what clap cannot and builds the parts.
//!
//! Invariant: a `Config` is valid: a node id usable as a header value, an LLM endpoint
//! that parses, a Redis address when the store is Redis. Usage errors exit with status 2
//! (clap's convention, kept for the checks here too).

use crate::engine::EngineConfig;
use crate::llm::{endpoint, ApiKey, LlmConfig, DEFAULT_SYSTEM_PROMPT};
use clap::{Parser, ValueEnum};
use std::fmt;
use std::time::Duration;

/// Where conversations are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    /// Redis (through Envoy's redis_proxy): conversations survive any node.
    Redis,
    /// This process's memory: one node, no Redis; lost when the node dies.
    Memory,
}

/// chat-node: reference chat backend for session-affinity (sticky LLM conversations).
///
/// API: POST /v1/chat (header x-session-id, body {"message": "...", "turn": n}),
/// POST /v1/chat/completions (OpenAI-compatible, streaming too), GET /healthz, GET /stats.
/// Without LLM_BASE_URL a built-in deterministic model answers.
#[derive(Debug, Clone, Parser)]
#[command(name = "chat-node", version, about, long_about = None)]
pub struct Args {
    /// Address to serve HTTP on (port 0 picks a free port; the address is logged)
    #[arg(long, env = "CHAT_LISTEN", default_value = "127.0.0.1:8001", value_name = "ADDR")]
    pub listen: String,
    /// Name reported in replies, x-served-by and stored entries
    #[arg(long = "node-id", env = "CHAT_NODE_ID", default_value = "node-1", value_name = "ID")]
    pub node_id: String,
    /// Where conversations are stored
    #[arg(long, env = "CHAT_STORE", value_enum, default_value = "redis")]
    pub store: StoreKind,
    /// Redis or Envoy redis_proxy address (host:port or redis:// URL)
    #[arg(long, env = "CHAT_REDIS", default_value = "127.0.0.1:6380", value_name = "ADDR")]
    pub redis: String,
    /// Conversations kept in memory (0 disables the cache)
    #[arg(long = "cache-size", env = "CHAT_CACHE_SIZE", default_value_t = 10_000, value_name = "N")]
    pub cache_size: usize,
    /// Lifetime of a stored conversation in seconds, renewed every turn
    #[arg(long = "ttl-seconds", env = "CHAT_TTL_SECONDS", default_value_t = 86_400, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub ttl_seconds: u64,
    /// Retry budget of one Redis command in ms (0: a single attempt)
    #[arg(long = "redis-retry-ms", env = "CHAT_REDIS_RETRY_MS", default_value_t = 5_000, value_name = "N")]
    pub redis_retry_ms: u64,
    /// Most requests served at once; more wait (the flag keeps its historic name)
    #[arg(long, env = "CHAT_THREADS", default_value_t = 1024, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub threads: u64,
    /// Time allowed until a response starts, in ms
    #[arg(long = "request-timeout-ms", env = "CHAT_REQUEST_TIMEOUT_MS", default_value_t = 120_000, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub request_timeout_ms: u64,
    /// Optional admin listener (GET/PUT /admin/engine, GET /stats); off when not set
    #[arg(long = "admin-listen", env = "CHAT_ADMIN_LISTEN", value_name = "ADDR")]
    pub admin_listen: Option<String>,

    /// Engine model: turns that run at once, the rest queue (0: no limit)
    #[arg(long, env = "CHAT_SLOTS", default_value_t = 0, value_name = "N", help_heading = "Engine model")]
    pub slots: usize,
    /// Engine model: prefill cost per uncached prompt token, in microseconds
    #[arg(
        long = "prefill-us-per-token",
        env = "CHAT_PREFILL_US_PER_TOKEN",
        default_value_t = 0,
        value_name = "US",
        help_heading = "Engine model"
    )]
    pub prefill_us_per_token: u64,
    /// Engine model: decode cost per reply token, in microseconds
    #[arg(
        long = "decode-us-per-token",
        env = "CHAT_DECODE_US_PER_TOKEN",
        default_value_t = 0,
        value_name = "US",
        help_heading = "Engine model"
    )]
    pub decode_us_per_token: u64,
    /// Engine model: KV cache capacity in tokens (kv_cache_usage_perc = cached / this)
    #[arg(long = "kv-capacity-tokens", env = "CHAT_KV_CAPACITY_TOKENS", default_value_t = 1_000_000,
          value_name = "N", help_heading = "Engine model", value_parser = clap::value_parser!(u64).range(1..))]
    pub kv_capacity_tokens: u64,

    /// Forward turns to {LLM_BASE_URL}/v1/chat/completions (http or https)
    #[arg(long = "llm-base-url", env = "LLM_BASE_URL", value_name = "URL", help_heading = "LLM forwarding")]
    pub llm_base_url: Option<String>,
    /// Model name (required with LLM_BASE_URL)
    #[arg(long = "llm-model", env = "LLM_MODEL", value_name = "NAME", help_heading = "LLM forwarding")]
    pub llm_model: Option<String>,
    /// Bearer token (environment only, never logged)
    #[arg(long = "llm-api-key", env = "LLM_API_KEY", hide_env_values = true, hide = true)]
    pub llm_api_key: Option<String>,
    /// System prompt
    #[arg(long = "llm-system-prompt", env = "LLM_SYSTEM_PROMPT", value_name = "TEXT", help_heading = "LLM forwarding")]
    pub llm_system_prompt: Option<String>,
    /// Connect and read timeout in ms
    #[arg(long = "llm-timeout-ms", env = "LLM_TIMEOUT_MS", default_value_t = 60_000, value_name = "N",
          help_heading = "LLM forwarding", value_parser = clap::value_parser!(u64).range(1..))]
    pub llm_timeout_ms: u64,
}

/// Validated settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub listen: String,
    pub node_id: String,
    pub store: StoreKind,
    pub redis: String,
    pub cache_size: usize,
    pub ttl_seconds: u64,
    pub redis_retry: Duration,
    pub max_in_flight: usize,
    pub request_timeout: Duration,
    pub admin_listen: Option<String>,
    pub engine: EngineConfig,
    pub llm: Option<LlmConfig>,
}

/// A configuration problem, naming the flag or variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(a: Args) -> Result<Self, ConfigError> {
        if a.listen.trim().is_empty() {
            return Err(ConfigError("--listen: must not be empty".into()));
        }
        if a.node_id.is_empty() || !a.node_id.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ConfigError(format!(
                "--node-id: node id must be non-empty printable ASCII without spaces, got {:?}",
                a.node_id
            )));
        }
        if a.store == StoreKind::Redis && a.redis.trim().is_empty() {
            return Err(ConfigError("--redis: must not be empty".into()));
        }
        let llm = match a.llm_base_url.filter(|u| !u.is_empty()) {
            None => None,
            Some(base) => {
                let url = endpoint(&base).map_err(ConfigError)?;
                let model = a
                    .llm_model
                    .filter(|m| !m.is_empty())
                    .ok_or_else(|| ConfigError("LLM_MODEL must be set when LLM_BASE_URL is".into()))?;
                Some(LlmConfig {
                    url,
                    model,
                    api_key: a.llm_api_key.filter(|k| !k.is_empty()).map(ApiKey),
                    system_prompt: a.llm_system_prompt.unwrap_or_else(|| DEFAULT_SYSTEM_PROMPT.into()),
                    timeout: Duration::from_millis(a.llm_timeout_ms),
                })
            }
        };
        Ok(Config {
            listen: a.listen,
            node_id: a.node_id,
            store: a.store,
            redis: a.redis,
            cache_size: a.cache_size,
            ttl_seconds: a.ttl_seconds,
            redis_retry: Duration::from_millis(a.redis_retry_ms),
            max_in_flight: usize::try_from(a.threads).unwrap_or(usize::MAX),
            request_timeout: Duration::from_millis(a.request_timeout_ms),
            admin_listen: a.admin_listen.filter(|l| !l.is_empty()),
            engine: EngineConfig {
                slots: a.slots,
                prefill_us_per_token: a.prefill_us_per_token,
                decode_us_per_token: a.decode_us_per_token,
                kv_capacity_tokens: a.kv_capacity_tokens,
            },
            llm,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use clap::CommandFactory;

    // Flags only: the environment is process-wide, so env fallbacks are tested on the
    // binary (tests/redis_integration.rs), one process per case.
    fn parse(args: &[&str]) -> Result<Config, String> {
        let args = Args::try_parse_from(std::iter::once("chat-node").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        Config::try_from(args).map_err(|e| e.0)
    }

    #[test]
    fn clap_definition_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn defaults_and_flags() {
        // Only valid when the test process has none of the variables set.
        if std::env::vars().any(|(k, _)| k.starts_with("CHAT_") || k.starts_with("LLM_")) {
            return;
        }
        let c = parse(&[]).unwrap();
        assert_eq!(c.listen, "127.0.0.1:8001");
        assert_eq!(c.node_id, "node-1");
        assert_eq!(c.store, StoreKind::Redis);
        assert_eq!(c.redis, "127.0.0.1:6380");
        assert_eq!(c.cache_size, 10_000);
        assert_eq!(c.ttl_seconds, 86_400);
        assert_eq!(c.redis_retry, Duration::from_secs(5));
        assert_eq!(c.max_in_flight, 1024);
        assert_eq!(c.engine, EngineConfig::default());
        assert_eq!((c.llm, c.admin_listen), (None, None));

        let c = parse(&[
            "--node-id",
            "node-2",
            "--cache-size=0",
            "--ttl-seconds",
            "60",
            "--store",
            "memory",
            "--slots",
            "2",
            "--prefill-us-per-token",
            "100",
            "--decode-us-per-token=50",
            "--kv-capacity-tokens",
            "5000",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .unwrap();
        assert_eq!((c.node_id.as_str(), c.cache_size, c.ttl_seconds, c.store), ("node-2", 0, 60, StoreKind::Memory));
        assert_eq!(
            c.engine,
            EngineConfig { slots: 2, prefill_us_per_token: 100, decode_us_per_token: 50, kv_capacity_tokens: 5000 }
        );
        assert_eq!(c.admin_listen.as_deref(), Some("127.0.0.1:0"));
    }

    #[test]
    fn refuses_bad_input_naming_the_flag() {
        let table: [(&[&str], &str); 9] = [
            (&["--bogus"], "--bogus"),
            (&["--listen"], "--listen"),
            (&["--threads", "0"], "--threads"),
            (&["--ttl-seconds", "x"], "--ttl-seconds"),
            (&["--node-id", "a b"], "--node-id"),
            (&["--redis="], "--redis"),
            (&["--store", "disk"], "--store"),
            (&["--llm-base-url", "ftp://x", "--llm-model", "m"], "LLM_BASE_URL"),
            (&["--llm-base-url", "http://x"], "LLM_MODEL must be set"),
        ];
        for (args, want) in table {
            let err = parse(args).unwrap_err();
            assert!(err.contains(want), "{args:?}: {err}");
        }
    }

    #[test]
    fn llm_settings() {
        let c =
            parse(&["--llm-base-url", "https://api.example/v2", "--llm-model", "llama", "--llm-timeout-ms", "1500"])
                .unwrap();
        let llm = c.llm.unwrap();
        assert_eq!(llm.url.as_str(), "https://api.example/v2/v1/chat/completions");
        assert_eq!(llm.model, "llama");
        assert_eq!(llm.timeout, Duration::from_millis(1500));
        assert_eq!(llm.system_prompt, DEFAULT_SYSTEM_PROMPT);
    }
}
