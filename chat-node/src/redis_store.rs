//! The Redis store, through the `redis` crate: one endpoint (Envoy's `redis_proxy`
//! listener in the harness; a plain Redis works too), an async multiplexed connection
//! kept by a [`ConnectionManager`] (it reconnects after a failure), and a bounded retry
//! loop with backoff around every command.
//!
//! Commands, all on one key each, all supported by `redis_proxy`:
//! - `LRANGE sa:turns:{sid} 0 -1` (load),
//! - `EVAL <APPEND_SCRIPT> 1 sa:turns:{sid} ttl expected entry…` (compare-and-append:
//!   `EVAL` with one key is routed to that key's shard; `FUNCTION` is refused by Envoy and
//!   `EVALSHA` needs the script loaded on every shard first, so the script's text is sent
//!   each time: a few hundred bytes),
//! - `GET` / `DEL sa:conv:{sid}` (the previous layout, migration only).
//!
//! Retry semantics: a command is attempted until it succeeds or its budget
//! (`--redis-retry-ms`, default 5 s, from the first attempt) is spent. Connection errors,
//! timeouts and error replies that a failover or a proxy without a healthy upstream
//! produce (`CLUSTERDOWN`, `TRYAGAIN`, `LOADING`, `READONLY`, `MASTERDOWN`, Envoy's
//! `no upstream host`, …) are retried with exponential backoff (25 ms doubling to
//! 500 ms, the last pause cut to end at the deadline, where one last attempt is made); replies that cannot improve (`WRONGTYPE`, unknown command, script errors, …)
//! fail at once. Every command is safe to repeat: `LRANGE`, `GET` and `DEL` trivially, the
//! append because its entry carries a unique write id (a repeat that finds its entry
//! already there reports `AlreadyApplied`).

use crate::conversation::{legacy_key, turns_key};
use crate::stats::Stats;
use crate::store::{AppendOutcome, StoreError};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, RedisError, RedisResult};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The compare-and-append script. `KEYS[1]`: the session's list; `ARGV[1]`: TTL in
/// seconds; `ARGV[2]`: the number of entries the writer expects the list to hold;
/// `ARGV[3..]`: the entries to append. Returns `{1, len}` appended, `{2, len}` already
/// applied (the entry at index `expected` is `ARGV[3]`), `{0, len}` conflict.
pub const APPEND_SCRIPT: &str = r#"
local n = redis.call('LLEN', KEYS[1])
local expected = tonumber(ARGV[2])
if n == expected then
  for i = 3, #ARGV do redis.call('RPUSH', KEYS[1], ARGV[i]) end
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
  return {1, n + #ARGV - 2}
end
if n > expected and redis.call('LINDEX', KEYS[1], expected) == ARGV[3] then
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
  return {2, n}
end
return {0, n}
"#;

/// Bounds of one attempt's timeout.
const MIN_ATTEMPT_TIMEOUT: Duration = Duration::from_millis(50);
const MAX_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// Backoff after the first failure, and its ceiling.
const FIRST_BACKOFF: Duration = Duration::from_millis(25);
const MAX_BACKOFF: Duration = Duration::from_millis(500);

/// Pause after the `failures`-th consecutive failure (1-based).
pub fn backoff(failures: u32) -> Duration {
    let shift = failures.saturating_sub(1).min(16);
    FIRST_BACKOFF.saturating_mul(1 << shift).min(MAX_BACKOFF)
}

/// Whether an error reply (its text) may go away by itself (failover, loading, a proxy
/// without a healthy upstream). Errors about the command itself never do.
pub fn is_retryable_reply(error_reply: &str) -> bool {
    let upper = error_reply.to_ascii_uppercase();
    let first = upper.split_whitespace().next().unwrap_or("");
    if matches!(first, "WRONGTYPE" | "NOAUTH" | "WRONGPASS" | "NOPERM" | "NOSCRIPT" | "CROSSSLOT") {
        return false;
    }
    const PERMANENT: [&str; 8] = [
        "UNKNOWN COMMAND",
        "UNSUPPORTED COMMAND",
        "WRONG NUMBER OF ARGUMENTS",
        "SYNTAX ERROR",
        "NOT AN INTEGER",
        "ERROR RUNNING SCRIPT",
        "USER_SCRIPT",
        "ERROR COMPILING SCRIPT",
    ];
    !PERMANENT.iter().any(|p| upper.contains(p))
}

/// Whether a failed attempt should be retried.
fn is_retryable(e: &RedisError) -> bool {
    use redis::ErrorKind;
    if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() {
        return true;
    }
    match e.kind() {
        ErrorKind::Client | ErrorKind::InvalidClientConfig | ErrorKind::UnexpectedReturnType | ErrorKind::Parse => {
            false
        }
        _ => is_retryable_reply(&e.to_string()),
    }
}

/// The retrying client for one Redis (or `redis_proxy`) address.
pub struct RedisStore {
    address: String,
    conn: ConnectionManager,
    budget: Duration,
    stats: Arc<Stats>,
}

impl RedisStore {
    /// A client for `address` (`host:port`, or a `redis://` URL) that retries each
    /// command for up to `budget`. Connects lazily: a node starts while Redis is down.
    pub fn new(address: &str, budget: Duration, stats: Arc<Stats>) -> Result<Self, String> {
        let url = if address.contains("://") { address.to_owned() } else { format!("redis://{address}") };
        let client = Client::open(url.as_str()).map_err(|e| format!("--redis {address:?}: {e}"))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(MAX_ATTEMPT_TIMEOUT))
            // Our own loop retries commands; the manager's reconnect attempts stay short.
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(25))
            .set_max_delay(Duration::from_millis(200));
        let conn =
            ConnectionManager::new_lazy_with_config(client, config).map_err(|e| format!("--redis {address:?}: {e}"))?;
        Ok(Self { address: address.to_owned(), conn, budget, stats })
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    /// Runs `attempt` until it succeeds, fails permanently, or the budget is spent.
    async fn retrying<T, F, Fut>(&self, what: &str, mut attempt: F) -> Result<T, StoreError>
    where
        F: FnMut(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let start = Instant::now();
        let deadline = start + self.budget;
        let mut failures = 0u32;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let limit = left.clamp(MIN_ATTEMPT_TIMEOUT, MAX_ATTEMPT_TIMEOUT);
            let error = match tokio::time::timeout(limit, attempt(self.conn.clone())).await {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(e)) if !is_retryable(&e) => {
                    Stats::inc(&self.stats.redis_errors);
                    return Err(StoreError::Rejected(format!("{what}: {e}")));
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no reply within {limit:?}"),
            };
            Stats::inc(&self.stats.redis_errors);
            failures += 1;
            let now = Instant::now();
            if now >= deadline {
                return Err(StoreError::Unavailable { attempts: failures, last: format!("{what}: {error}") });
            }
            // The last pause ends at the deadline, with one more attempt there.
            Stats::inc(&self.stats.redis_retries);
            tokio::time::sleep(backoff(failures).min(deadline - now)).await;
        }
    }

    pub async fn load(&self, session_id: &str) -> Result<Vec<Vec<u8>>, StoreError> {
        let key = turns_key(session_id);
        self.retrying("LRANGE", |mut c| {
            let key = key.clone();
            async move { redis::cmd("LRANGE").arg(&key).arg(0).arg(-1).query_async(&mut c).await }
        })
        .await
    }

    pub async fn append(
        &self,
        session_id: &str,
        expected: u64,
        entries: &[String],
        ttl_seconds: u64,
    ) -> Result<AppendOutcome, StoreError> {
        let key = turns_key(session_id);
        let reply: Vec<i64> = self
            .retrying("EVAL append", |mut c| {
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(APPEND_SCRIPT).arg(1).arg(&key).arg(ttl_seconds).arg(expected);
                for e in entries {
                    cmd.arg(e.as_str());
                }
                async move { cmd.query_async(&mut c).await }
            })
            .await?;
        let len = |v: i64| u64::try_from(v).unwrap_or(0);
        match reply.as_slice() {
            [1, n] => Ok(AppendOutcome::Appended { len: len(*n) }),
            [2, n] => Ok(AppendOutcome::AlreadyApplied { len: len(*n) }),
            [0, n] => Ok(AppendOutcome::Conflict { len: len(*n) }),
            other => Err(StoreError::Rejected(format!("EVAL append: unexpected reply {other:?}"))),
        }
    }

    pub async fn legacy(&self, session_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let key = legacy_key(session_id);
        self.retrying("GET", |mut c| {
            let key = key.clone();
            async move { redis::cmd("GET").arg(&key).query_async(&mut c).await }
        })
        .await
    }

    pub async fn delete_legacy(&self, session_id: &str) -> Result<(), StoreError> {
        let key = legacy_key(session_id);
        self.retrying("DEL", |mut c| {
            let key = key.clone();
            async move { redis::cmd("DEL").arg(&key).query_async::<i64>(&mut c).await.map(|_| ()) }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_ceiling() {
        let ms: Vec<u128> = (1..=7).map(|f| backoff(f).as_millis()).collect();
        assert_eq!(ms, [25, 50, 100, 200, 400, 500, 500]);
        assert_eq!(backoff(0).as_millis(), 25);
        assert_eq!(backoff(u32::MAX).as_millis(), 500);
    }

    #[test]
    fn classifies_error_replies() {
        for transient in [
            "CLUSTERDOWN The cluster is down",
            "TRYAGAIN Multiple keys request during rehashing of slot",
            "LOADING Redis is loading the dataset in memory",
            "READONLY You can't write against a read only replica.",
            "MASTERDOWN Link with MASTER is down",
            "no upstream host",
            "upstream failure",
        ] {
            assert!(is_retryable_reply(transient), "{transient}");
        }
        for permanent in [
            "WRONGTYPE Operation against a key holding the wrong kind of value",
            "ERR unknown command 'FOO'",
            "unsupported command 'FUNCTION'",
            "ERR wrong number of arguments for 'get' command",
            "ERR syntax error",
            "NOSCRIPT No matching script",
            "ERR Error running script (call to f_x): @user_script:3: oops",
        ] {
            assert!(!is_retryable_reply(permanent), "{permanent}");
        }
    }
}
