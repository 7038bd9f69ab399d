//! Configuration from flags and environment (flags win), checked once at startup.
//!
//! Invariant: a `Config` is valid: positive TTL and thread count, a node id usable as a
//! header value, an LLM endpoint that parses. Any problem is a [`ConfigError`] naming the
//! flag or variable; `main` prints it and exits with status 2.

use crate::llm::{ApiKey, Endpoint, LlmConfig, DEFAULT_SYSTEM_PROMPT};
use std::fmt;
use std::time::Duration;

/// Usage text for `--help`.
pub const USAGE: &str = "\
chat-node: reference chat backend for session-affinity (sticky LLM conversations)

Usage: chat-node [OPTIONS]

Options (flags win over environment variables):
  --listen ADDR           address to serve HTTP on        [CHAT_LISTEN, default 127.0.0.1:8001]
  --node-id ID            name reported in replies         [CHAT_NODE_ID, default node-1]
  --redis ADDR            Redis / Envoy redis_proxy        [CHAT_REDIS, default 127.0.0.1:6380]
  --cache-size N          conversations kept in memory     [CHAT_CACHE_SIZE, default 10000]
  --ttl-seconds N         lifetime of a stored conversation [CHAT_TTL_SECONDS, default 86400]
  --redis-retry-ms N      retry budget of a Redis command  [CHAT_REDIS_RETRY_MS, default 5000]
  --threads N             max concurrent connections, one thread each
                                                           [CHAT_THREADS, default 1024]
  -h, --help              print this help

LLM forwarding (environment only; without LLM_BASE_URL a built-in deterministic model answers):
  LLM_BASE_URL            http://host[:port][/prefix]; requests go to {base}/v1/chat/completions
  LLM_MODEL               model name (required with LLM_BASE_URL)
  LLM_API_KEY             optional bearer token
  LLM_SYSTEM_PROMPT       optional system prompt
  LLM_TIMEOUT_MS          optional, default 60000

API: POST /v1/chat (header x-session-id, body {\"message\": \"...\"}), GET /healthz, GET /stats
";

/// Validated settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub listen: String,
    pub node_id: String,
    pub redis: String,
    pub cache_size: usize,
    pub ttl_seconds: u64,
    pub redis_retry: Duration,
    pub threads: usize,
    pub llm: Option<LlmConfig>,
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Run(Box<Config>),
    Help,
}

/// A configuration problem, naming the flag or variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A flag, its environment variable, and its default.
struct Setting {
    flag: &'static str,
    env: &'static str,
    default: &'static str,
}

const SETTINGS: [Setting; 7] = [
    Setting { flag: "--listen", env: "CHAT_LISTEN", default: "127.0.0.1:8001" },
    Setting { flag: "--node-id", env: "CHAT_NODE_ID", default: "node-1" },
    Setting { flag: "--redis", env: "CHAT_REDIS", default: "127.0.0.1:6380" },
    Setting { flag: "--cache-size", env: "CHAT_CACHE_SIZE", default: "10000" },
    Setting { flag: "--ttl-seconds", env: "CHAT_TTL_SECONDS", default: "86400" },
    Setting { flag: "--redis-retry-ms", env: "CHAT_REDIS_RETRY_MS", default: "5000" },
    Setting { flag: "--threads", env: "CHAT_THREADS", default: "1024" },
];

/// Parses the arguments (without the program name), reading the environment through
/// `env` so tests pass their own.
pub fn parse<I, E>(args: I, env: E) -> Result<Command, ConfigError>
where
    I: IntoIterator<Item = String>,
    E: Fn(&str) -> Option<String>,
{
    let mut flags: Vec<Option<String>> = vec![None; SETTINGS.len()];
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        if arg == "-h" || arg == "--help" {
            return Ok(Command::Help);
        }
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let Some(index) = SETTINGS.iter().position(|s| s.flag == name) else {
            return Err(ConfigError(format!("unknown argument {arg:?} (see --help)")));
        };
        let value = match inline {
            Some(v) => v,
            None => args.next().ok_or_else(|| ConfigError(format!("{name} needs a value")))?,
        };
        flags[index] = Some(value);
    }

    // Each value with where it came from, for error messages.
    let value = |i: usize| -> (String, String) {
        let s = &SETTINGS[i];
        match (&flags[i], env(s.env)) {
            (Some(v), _) => (v.clone(), s.flag.to_owned()),
            (None, Some(v)) => (v, s.env.to_owned()),
            (None, None) => (s.default.to_owned(), s.flag.to_owned()),
        }
    };

    let (listen, from) = value(0);
    non_empty(&listen, &from)?;
    let (node_id, from) = value(1);
    if node_id.is_empty() || !node_id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ConfigError(format!(
            "{from}: node id must be non-empty printable ASCII without spaces, got {node_id:?}"
        )));
    }
    let (redis, from) = value(2);
    non_empty(&redis, &from)?;
    let cache_size = number(value(3), 0)?;
    let ttl_seconds = number(value(4), 1)?;
    let redis_retry_ms = number(value(5), 0)?;
    let threads = number(value(6), 1)?;
    let llm = llm_config(&env)?;

    Ok(Command::Run(Box::new(Config {
        listen,
        node_id,
        redis,
        cache_size: usize::try_from(cache_size).map_err(|_| ConfigError("--cache-size: too large".into()))?,
        ttl_seconds,
        redis_retry: Duration::from_millis(redis_retry_ms),
        threads: usize::try_from(threads).map_err(|_| ConfigError("--threads: too large".into()))?,
        llm,
    })))
}

fn llm_config<E: Fn(&str) -> Option<String>>(env: &E) -> Result<Option<LlmConfig>, ConfigError> {
    let Some(base) = env("LLM_BASE_URL").filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let endpoint = Endpoint::parse(&base).map_err(ConfigError)?;
    let model = env("LLM_MODEL")
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ConfigError("LLM_MODEL must be set when LLM_BASE_URL is".into()))?;
    let timeout_ms = match env("LLM_TIMEOUT_MS") {
        Some(v) => number((v, "LLM_TIMEOUT_MS".into()), 1)?,
        None => 60_000,
    };
    Ok(Some(LlmConfig {
        endpoint,
        model,
        api_key: env("LLM_API_KEY").filter(|k| !k.is_empty()).map(ApiKey),
        system_prompt: env("LLM_SYSTEM_PROMPT").unwrap_or_else(|| DEFAULT_SYSTEM_PROMPT.into()),
        timeout: Duration::from_millis(timeout_ms),
    }))
}

fn non_empty(value: &str, from: &str) -> Result<(), ConfigError> {
    if value.trim().is_empty() {
        Err(ConfigError(format!("{from}: must not be empty")))
    } else {
        Ok(())
    }
}

fn number((text, from): (String, String), min: u64) -> Result<u64, ConfigError> {
    let n = text
        .trim()
        .parse::<u64>()
        .map_err(|_| ConfigError(format!("{from}: expected a whole number, got {text:?}")))?;
    if n < min {
        return Err(ConfigError(format!("{from}: must be at least {min}, got {n}")));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use std::collections::HashMap;

    fn run(args: &[&str], env: &[(&str, &str)]) -> Result<Command, ConfigError> {
        let env: HashMap<String, String> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        parse(args.iter().map(|a| a.to_string()), |k| env.get(k).cloned())
    }

    fn config(args: &[&str], env: &[(&str, &str)]) -> Config {
        match run(args, env).unwrap() {
            Command::Run(c) => *c,
            Command::Help => panic!("help"),
        }
    }

    #[test]
    fn defaults() {
        let c = config(&[], &[]);
        assert_eq!(c.listen, "127.0.0.1:8001");
        assert_eq!(c.node_id, "node-1");
        assert_eq!(c.redis, "127.0.0.1:6380");
        assert_eq!(c.cache_size, 10_000);
        assert_eq!(c.ttl_seconds, 86_400);
        assert_eq!(c.redis_retry, Duration::from_secs(5));
        assert_eq!(c.threads, 1024);
        assert_eq!(c.llm, None);
    }

    #[test]
    fn flags_win_over_env() {
        let env = [
            ("CHAT_LISTEN", "0.0.0.0:9000"),
            ("CHAT_NODE_ID", "env-node"),
            ("CHAT_REDIS", "r:1"),
            ("CHAT_CACHE_SIZE", "5"),
        ];
        let c = config(&["--node-id", "node-2", "--cache-size=0", "--ttl-seconds", "60"], &env);
        assert_eq!(c.listen, "0.0.0.0:9000");
        assert_eq!(c.node_id, "node-2");
        assert_eq!(c.redis, "r:1");
        assert_eq!(c.cache_size, 0);
        assert_eq!(c.ttl_seconds, 60);
    }

    #[test]
    fn help() {
        assert_eq!(run(&["--listen", "x", "--help"], &[]).unwrap(), Command::Help);
        assert_eq!(run(&["-h"], &[]).unwrap(), Command::Help);
    }

    #[test]
    fn refuses_bad_input_naming_the_source() {
        type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
        let table: [Case; 9] = [
            (&["--bogus"], &[], "unknown argument"),
            (&["--listen"], &[], "--listen needs a value"),
            (&["--threads", "0"], &[], "--threads: must be at least 1"),
            (&["--ttl-seconds", "x"], &[], "--ttl-seconds: expected a whole number"),
            (&[], &[("CHAT_REDIS_RETRY_MS", "-1")], "CHAT_REDIS_RETRY_MS: expected"),
            (&["--node-id", "a b"], &[], "--node-id: node id"),
            (&["--redis="], &[], "--redis: must not be empty"),
            (&[], &[("LLM_BASE_URL", "https://x")], "https is not supported"),
            (&[], &[("LLM_BASE_URL", "http://x")], "LLM_MODEL must be set"),
        ];
        for (args, env, want) in table {
            let err = run(args, env).unwrap_err();
            assert!(err.0.contains(want), "{args:?} {env:?}: {err}");
        }
    }

    #[test]
    fn llm_from_env() {
        let c = config(
            &[],
            &[
                ("LLM_BASE_URL", "http://127.0.0.1:11434"),
                ("LLM_MODEL", "llama"),
                ("LLM_API_KEY", "k"),
                ("LLM_TIMEOUT_MS", "1500"),
            ],
        );
        let llm = c.llm.unwrap();
        assert_eq!(llm.endpoint.authority, "127.0.0.1:11434");
        assert_eq!(llm.model, "llama");
        assert_eq!(llm.api_key, Some(ApiKey("k".into())));
        assert_eq!(llm.system_prompt, DEFAULT_SYSTEM_PROMPT);
        assert_eq!(llm.timeout, Duration::from_millis(1500));
    }
}
