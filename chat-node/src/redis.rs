//! A small Redis client for the [`Store`] seam: a pool of RESP connections to one
//! address (Envoy's `redis_proxy` listener in the harness) and a retry loop.
//!
//! Retry semantics: a command is attempted until it succeeds or its budget (default
//! 5 s, measured from the first attempt) runs out. Connection errors, timeouts and error
//! replies such as `CLUSTERDOWN`, `TRYAGAIN`, `LOADING`, `READONLY` or Envoy's
//! `no upstream host` are retried with exponential backoff (25 ms doubling to 500 ms),
//! reconnecting as needed; replies that cannot improve (`WRONGTYPE`, unknown command,
//! ...) fail at once. Only `GET` and `SET ... EX` are sent, both safe to repeat: a `SET`
//! whose reply was lost and that is sent again writes the same value.
//!
//! A failure on a pooled connection empties the pool (its peers are likely stale too,
//! e.g. after a Redis restart) and retries at once on a fresh connection.

use crate::resp::{self, Value};
use crate::stats::Stats;
use crate::store::{Store, StoreError};
use std::io::{BufReader, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Idle connections kept for reuse.
const MAX_IDLE: usize = 64;
/// Bounds of one attempt's connect/read/write timeout.
const MIN_IO_TIMEOUT: Duration = Duration::from_millis(50);
const MAX_IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Backoff after the first failure, and its ceiling.
const FIRST_BACKOFF: Duration = Duration::from_millis(25);
const MAX_BACKOFF: Duration = Duration::from_millis(500);

/// Pause after the `failures`-th consecutive failure (1-based).
pub fn backoff(failures: u32) -> Duration {
    let shift = failures.saturating_sub(1).min(16);
    FIRST_BACKOFF.saturating_mul(1 << shift).min(MAX_BACKOFF)
}

/// Whether an error reply may go away by itself (failover, loading, proxy without a
/// healthy upstream). Errors about the command itself never do.
pub fn is_retryable(error_reply: &str) -> bool {
    let upper = error_reply.to_ascii_uppercase();
    let first = upper.split_whitespace().next().unwrap_or("");
    if matches!(first, "WRONGTYPE" | "NOAUTH" | "WRONGPASS" | "NOPERM") {
        return false;
    }
    const PERMANENT: [&str; 5] =
        ["UNKNOWN COMMAND", "UNSUPPORTED COMMAND", "WRONG NUMBER OF ARGUMENTS", "SYNTAX ERROR", "NOT AN INTEGER"];
    !PERMANENT.iter().any(|p| upper.contains(p))
}

/// Pooled, retrying client for one Redis (or `redis_proxy`) address.
pub struct RedisStore {
    addr: String,
    budget: Duration,
    pool: Mutex<Vec<Conn>>,
    stats: Arc<Stats>,
}

struct Conn {
    reader: BufReader<TcpStream>,
}

/// How one attempt failed.
enum Failure {
    /// Retry after a pause (or at once if the connection came from the pool).
    Transient { msg: String, pooled: bool },
    /// Give up now.
    Permanent(String),
}

impl RedisStore {
    /// A client for `addr` (`host:port`) that retries each command for up to `budget`.
    pub fn new(addr: &str, budget: Duration, stats: Arc<Stats>) -> Self {
        Self { addr: addr.to_owned(), budget, pool: Mutex::new(Vec::new()), stats }
    }

    /// Sends `args` until a reply satisfies `accept`, the reply is a permanent error, or
    /// the budget is spent.
    fn command(&self, args: &[&[u8]], accept: fn(&Value) -> bool) -> Result<Value, StoreError> {
        let start = Instant::now();
        let deadline = start + self.budget;
        let mut attempts: u32 = 0;
        let mut failures: u32 = 0;
        loop {
            attempts += 1;
            let remaining = deadline.saturating_duration_since(Instant::now());
            let timeout = remaining.clamp(MIN_IO_TIMEOUT, MAX_IO_TIMEOUT);
            let failure = match self.attempt(args, timeout, accept) {
                Ok(value) => {
                    if failures > 0 {
                        eprintln!(
                            "redis {}: {} succeeded after {failures} failed attempt(s) in {} ms",
                            self.addr,
                            command_name(args),
                            start.elapsed().as_millis()
                        );
                    }
                    return Ok(value);
                }
                Err(failure) => failure,
            };
            Stats::inc(&self.stats.redis_errors);
            let (msg, pooled) = match failure {
                Failure::Permanent(msg) => {
                    eprintln!("redis {}: {} rejected: {msg}", self.addr, command_name(args));
                    return Err(StoreError::Rejected(msg));
                }
                Failure::Transient { msg, pooled } => (msg, pooled),
            };
            let now = Instant::now();
            if now >= deadline {
                eprintln!(
                    "redis {}: {} gave up after {attempts} attempt(s) in {} ms: {msg}",
                    self.addr,
                    command_name(args),
                    start.elapsed().as_millis()
                );
                return Err(StoreError::Unavailable { attempts, last: msg });
            }
            if pooled {
                // The pooled peers are likely dead as well: start over with fresh ones.
                self.lock_pool().clear();
            } else {
                failures += 1;
                std::thread::sleep(backoff(failures).min(deadline - now));
            }
            Stats::inc(&self.stats.redis_retries);
        }
    }

    fn attempt(&self, args: &[&[u8]], timeout: Duration, accept: fn(&Value) -> bool) -> Result<Value, Failure> {
        let pooled_conn = self.lock_pool().pop();
        let pooled = pooled_conn.is_some();
        let transient = |msg: String| Failure::Transient { msg, pooled };
        let mut conn = match pooled_conn {
            Some(conn) => conn,
            None => self.connect(timeout).map_err(|msg| Failure::Transient { msg, pooled: false })?,
        };
        let stream = conn.reader.get_mut();
        stream
            .set_read_timeout(Some(timeout))
            .and_then(|()| stream.set_write_timeout(Some(timeout)))
            .map_err(|e| transient(format!("socket option: {e}")))?;
        stream
            .write_all(&resp::encode_command(args))
            .and_then(|()| stream.flush())
            .map_err(|e| transient(format!("write: {e}")))?;
        let value = resp::read_value(&mut conn.reader).map_err(|e| transient(e.to_string()))?;
        // The connection is in sync after any complete reply, error replies included.
        let mut pool = self.lock_pool();
        if pool.len() < MAX_IDLE {
            pool.push(conn);
        }
        drop(pool);
        match value {
            Value::Error(msg) if is_retryable(&msg) => Err(transient(msg)),
            Value::Error(msg) => Err(Failure::Permanent(msg)),
            value if accept(&value) => Ok(value),
            other => Err(transient(format!("unexpected reply {other:?}"))),
        }
    }

    fn connect(&self, timeout: Duration) -> Result<Conn, String> {
        let addrs = self.addr.to_socket_addrs().map_err(|e| format!("resolve {}: {e}", self.addr))?;
        let mut last = format!("{} resolves to no address", self.addr);
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, timeout) {
                Ok(stream) => {
                    // Latency matters more than packet count for one small command.
                    let _ = stream.set_nodelay(true);
                    return Ok(Conn { reader: BufReader::new(stream) });
                }
                Err(e) => last = format!("connect {addr}: {e}"),
            }
        }
        Err(last)
    }

    fn lock_pool(&self) -> MutexGuard<'_, Vec<Conn>> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Store for RedisStore {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let accept = |v: &Value| matches!(v, Value::Bulk(_));
        match self.command(&[b"GET", key.as_bytes()], accept)? {
            Value::Bulk(value) => Ok(value),
            other => Err(StoreError::Rejected(format!("GET replied {other:?}"))),
        }
    }

    fn set_ex(&self, key: &str, value: &[u8], ttl_seconds: u64) -> Result<(), StoreError> {
        let ttl = ttl_seconds.to_string();
        let accept = |v: &Value| matches!(v, Value::Simple(s) if s == "OK");
        self.command(&[b"SET", key.as_bytes(), value, b"EX", ttl.as_bytes()], accept).map(|_| ())
    }
}

fn command_name(args: &[&[u8]]) -> String {
    args.first().map(|a| String::from_utf8_lossy(a).into_owned()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use std::net::TcpListener;
    use std::thread;

    #[test]
    fn backoff_doubles_to_a_ceiling() {
        let ms: Vec<u128> = (1..=8).map(|n| backoff(n).as_millis()).collect();
        assert_eq!(ms, [25, 50, 100, 200, 400, 500, 500, 500]);
        assert_eq!(backoff(0).as_millis(), 25);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }

    #[test]
    fn classifies_error_replies() {
        let table = [
            ("CLUSTERDOWN The cluster is down", true),
            ("TRYAGAIN Multiple keys request during rehashing", true),
            ("LOADING Redis is loading the dataset in memory", true),
            ("READONLY You can't write against a read only replica.", true),
            ("MASTERDOWN Link with MASTER is down", true),
            ("no upstream host", true),
            ("upstream failure", true),
            ("ERR max number of clients reached", true),
            ("WRONGTYPE Operation against a key holding the wrong kind of value", false),
            ("ERR unknown command 'FOO'", false),
            ("unsupported command 'MULTI'", false),
            ("ERR wrong number of arguments for 'get' command", false),
            ("ERR syntax error", false),
            ("NOAUTH Authentication required.", false),
        ];
        for (reply, want) in table {
            assert_eq!(is_retryable(reply), want, "{reply}");
        }
    }

    /// A fake Redis that answers each command with the next scripted reply, one
    /// connection at a time; `None` closes the connection instead of answering.
    fn fake_redis(script: Vec<Option<&'static str>>) -> (String, thread::JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let handle = thread::spawn(move || {
            let mut seen = Vec::new();
            let mut script = script.into_iter();
            'conns: for stream in listener.incoming() {
                let stream = stream.unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut writer = stream;
                loop {
                    let Ok(Value::Array(Some(args))) = resp::read_value(&mut reader) else {
                        continue 'conns;
                    };
                    let words: Vec<String> = args
                        .iter()
                        .map(|a| match a {
                            Value::Bulk(Some(b)) => String::from_utf8_lossy(b).into_owned(),
                            _ => "?".into(),
                        })
                        .collect();
                    seen.push(words.join(" "));
                    match script.next() {
                        Some(Some(reply)) => writer.write_all(reply.as_bytes()).unwrap(),
                        Some(None) => continue 'conns,
                        None => break 'conns,
                    }
                    if script.len() == 0 {
                        break 'conns;
                    }
                }
            }
            seen
        });
        (addr, handle)
    }

    #[test]
    fn retries_transient_errors_then_succeeds() {
        let (addr, server) = fake_redis(vec![
            Some("-CLUSTERDOWN The cluster is down\r\n"),
            None,
            Some("-no upstream host\r\n"),
            Some("+OK\r\n"),
            Some("$5\r\nhello\r\n"),
        ]);
        let stats = Arc::new(Stats::new());
        let store = RedisStore::new(&addr, Duration::from_secs(5), stats.clone());
        store.set_ex("k", b"hello", 60).unwrap();
        assert_eq!(store.get("k").unwrap(), Some(b"hello".to_vec()));
        let seen = server.join().unwrap();
        assert_eq!(seen[0], "SET k hello EX 60");
        assert_eq!(seen.len(), 5);
        assert_eq!(seen[4], "GET k");
        assert_eq!(stats.redis_errors.load(std::sync::atomic::Ordering::Relaxed), 3);
    }

    #[test]
    fn permanent_errors_fail_at_once() {
        let (addr, server) = fake_redis(vec![Some("-WRONGTYPE wrong kind\r\n")]);
        let store = RedisStore::new(&addr, Duration::from_secs(5), Arc::new(Stats::new()));
        let started = Instant::now();
        assert!(matches!(store.get("k"), Err(StoreError::Rejected(_))));
        assert!(started.elapsed() < Duration::from_secs(1));
        server.join().unwrap();
    }

    #[test]
    fn gives_up_after_the_budget() {
        // Nothing listens on a port just released.
        let addr = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let store = RedisStore::new(&addr, Duration::from_millis(300), Arc::new(Stats::new()));
        let started = Instant::now();
        match store.set_ex("k", b"v", 1) {
            Err(StoreError::Unavailable { attempts, .. }) => assert!(attempts >= 3),
            other => panic!("expected Unavailable, got {other:?}"),
        }
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(300), "{took:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
    }

    #[test]
    fn timeouts_count_as_transient() {
        // A server that accepts and never answers: each attempt times out.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let holder = thread::spawn(move || {
            let mut held = Vec::new();
            listener.set_nonblocking(true).unwrap();
            let until = Instant::now() + Duration::from_millis(800);
            while Instant::now() < until {
                if let Ok((s, _)) = listener.accept() {
                    held.push(s);
                }
                thread::sleep(Duration::from_millis(5));
            }
            drop(held);
        });
        let store = RedisStore::new(&addr, Duration::from_millis(250), Arc::new(Stats::new()));
        assert!(matches!(store.get("k"), Err(StoreError::Unavailable { .. })));
        holder.join().unwrap();
    }
}
