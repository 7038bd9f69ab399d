//! The conversation store: per-turn compare-and-append on one list per session.
//!
//! Operations (keys in [`crate::conversation`]):
//! - `load`: every stored entry of a session, oldest first.
//! - `append(expected, entries, ttl)`: appends `entries` **only if the list holds exactly
//!   `expected` entries**, in one atomic step, and refreshes the TTL. If the list is
//!   longer and its entry at index `expected` is `entries[0]` (same write id), an
//!   earlier attempt of this very append landed (its reply was lost): that is
//!   [`AppendOutcome::AlreadyApplied`], never a second copy. Otherwise
//!   [`AppendOutcome::Conflict`] with the list's length: another writer got there first.
//! - `legacy` / `delete_legacy`: the previous layout's whole-value key, read once to
//!   migrate it.
//!
//! Two implementations: [`RedisStore`] (through Envoy's redis_proxy, the harness and
//! production) and [`MemoryStore`] (`--store memory`: one node, no Redis; also the
//! fake the service tests use). An `Err` means the store stayed unavailable for the
//! whole retry budget, or refused the command; the caller must not acknowledge the turn.

use crate::redis_store::RedisStore;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// What a compare-and-append did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendOutcome {
    /// Appended; the list now holds `len` entries.
    Appended { len: u64 },
    /// An earlier attempt of the same append had landed; the list holds `len` entries.
    AlreadyApplied { len: u64 },
    /// The list held `len` entries, not the expected number: nothing written.
    Conflict { len: u64 },
}

/// The store could not serve a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// Every attempt failed within the retry budget; the last failure is kept.
    Unavailable { attempts: u32, last: String },
    /// A reply that retrying cannot fix (e.g. `WRONGTYPE`).
    Rejected(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Unavailable { attempts, last } => {
                write!(f, "store unavailable after {attempts} attempt(s): {last}")
            }
            StoreError::Rejected(why) => write!(f, "store rejected the command: {why}"),
        }
    }
}

/// Where conversations live.
pub enum Store {
    Redis(RedisStore),
    Memory(Arc<MemoryStore>),
}

impl Store {
    /// The session's stored entries, oldest first (empty when none).
    pub async fn load(&self, session_id: &str) -> Result<Vec<Vec<u8>>, StoreError> {
        match self {
            Store::Redis(r) => r.load(session_id).await,
            Store::Memory(m) => m.load(session_id),
        }
    }

    /// Compare-and-append (see the module docs).
    pub async fn append(
        &self,
        session_id: &str,
        expected: u64,
        entries: &[String],
        ttl_seconds: u64,
    ) -> Result<AppendOutcome, StoreError> {
        match self {
            Store::Redis(r) => r.append(session_id, expected, entries, ttl_seconds).await,
            Store::Memory(m) => m.append(session_id, expected, entries, ttl_seconds),
        }
    }

    /// The previous layout's value for this session, if any.
    pub async fn legacy(&self, session_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match self {
            Store::Redis(r) => r.legacy(session_id).await,
            Store::Memory(m) => m.legacy(session_id),
        }
    }

    /// Deletes the previous layout's value (after it was migrated).
    pub async fn delete_legacy(&self, session_id: &str) -> Result<(), StoreError> {
        match self {
            Store::Redis(r) => r.delete_legacy(session_id).await,
            Store::Memory(m) => m.delete_legacy(session_id),
        }
    }

    /// For the startup log line.
    pub fn describe(&self) -> String {
        match self {
            Store::Redis(r) => format!("redis {}", r.address()),
            Store::Memory(_) => "in-memory store (no Redis: conversations live and die with this process)".into(),
        }
    }
}

/// An in-process store: the `--store memory` backend of a single node, and the tests'
/// fake (`set_down(true)` makes every command fail as an unreachable Redis would).
/// Entries expire `ttl` after their last append, checked when read and swept every
/// [`SWEEP_EVERY`] appends.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
    down: AtomicBool,
}

#[derive(Debug, Default)]
struct Inner {
    lists: HashMap<String, (Vec<Vec<u8>>, Instant)>,
    legacy: HashMap<String, Vec<u8>>,
    appends: u64,
}

/// Appends between two sweeps of expired conversations.
pub const SWEEP_EVERY: u64 = 1024;

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes every following command fail (`true`) or succeed (`false`).
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// The raw entries of a session (tests inspect what was stored).
    pub fn entries(&self, session_id: &str) -> Vec<Vec<u8>> {
        self.lock().lists.get(session_id).map(|(e, _)| e.clone()).unwrap_or_default()
    }

    /// Plants a raw entry list (tests plant corrupt values).
    pub fn put_entries(&self, session_id: &str, entries: Vec<Vec<u8>>) {
        let far = Instant::now() + Duration::from_secs(86_400);
        self.lock().lists.insert(session_id.to_owned(), (entries, far));
    }

    /// Plants a previous-layout value (tests of the migration).
    pub fn put_legacy(&self, session_id: &str, value: &[u8]) {
        self.lock().legacy.insert(session_id.to_owned(), value.to_vec());
    }

    /// Whether a previous-layout value is still there.
    pub fn has_legacy(&self, session_id: &str) -> bool {
        self.lock().legacy.contains_key(session_id)
    }

    /// Conversations held.
    pub fn len(&self) -> usize {
        self.lock().lists.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_up(&self) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            Err(StoreError::Unavailable { attempts: 1, last: "memory store is down".into() })
        } else {
            Ok(())
        }
    }

    fn load(&self, session_id: &str) -> Result<Vec<Vec<u8>>, StoreError> {
        self.check_up()?;
        let mut inner = self.lock();
        let now = Instant::now();
        match inner.lists.get(session_id) {
            Some((_, expires)) if *expires <= now => {
                inner.lists.remove(session_id);
                Ok(Vec::new())
            }
            Some((entries, _)) => Ok(entries.clone()),
            None => Ok(Vec::new()),
        }
    }

    fn append(
        &self,
        session_id: &str,
        expected: u64,
        entries: &[String],
        ttl_seconds: u64,
    ) -> Result<AppendOutcome, StoreError> {
        self.check_up()?;
        let now = Instant::now();
        let expires = now + Duration::from_secs(ttl_seconds);
        let mut inner = self.lock();
        inner.appends += 1;
        if inner.appends.is_multiple_of(SWEEP_EVERY) {
            inner.lists.retain(|_, (_, e)| *e > now);
        }
        let list = inner.lists.entry(session_id.to_owned()).or_insert_with(|| (Vec::new(), expires));
        if list.1 <= now {
            list.0.clear();
        }
        let len = list.0.len() as u64;
        if len == expected {
            list.0.extend(entries.iter().map(|e| e.as_bytes().to_vec()));
            list.1 = expires;
            return Ok(AppendOutcome::Appended { len: list.0.len() as u64 });
        }
        let first = entries.first().map(|e| e.as_bytes());
        let at = usize::try_from(expected).ok().and_then(|i| list.0.get(i)).map(Vec::as_slice);
        if len > expected && at.is_some() && at == first {
            list.1 = expires;
            return Ok(AppendOutcome::AlreadyApplied { len });
        }
        if len == 0 {
            inner.lists.remove(session_id);
        }
        Ok(AppendOutcome::Conflict { len })
    }

    fn legacy(&self, session_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.check_up()?;
        Ok(self.lock().legacy.get(session_id).cloned())
    }

    fn delete_legacy(&self, session_id: &str) -> Result<(), StoreError> {
        self.check_up()?;
        self.lock().legacy.remove(session_id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn compare_and_append() {
        let m = MemoryStore::new();
        assert_eq!(m.append("a", 0, &s(&["1"]), 60).unwrap(), AppendOutcome::Appended { len: 1 });
        assert_eq!(m.append("a", 0, &s(&["x"]), 60).unwrap(), AppendOutcome::Conflict { len: 1 });
        // A retry of the append that landed is recognised by its entry.
        assert_eq!(m.append("a", 0, &s(&["1"]), 60).unwrap(), AppendOutcome::AlreadyApplied { len: 1 });
        assert_eq!(m.append("a", 2, &s(&["3"]), 60).unwrap(), AppendOutcome::Conflict { len: 1 });
        assert_eq!(m.append("a", 1, &s(&["2", "3"]), 60).unwrap(), AppendOutcome::Appended { len: 3 });
        assert_eq!(m.load("a").unwrap(), vec![b"1".to_vec(), b"2".to_vec(), b"3".to_vec()]);
        // A conflict on an absent list leaves nothing behind.
        assert_eq!(m.append("b", 1, &s(&["x"]), 60).unwrap(), AppendOutcome::Conflict { len: 0 });
        assert_eq!(m.len(), 1);
    }

    #[test]
    fn expired_conversations_are_gone() {
        let m = MemoryStore::new();
        m.append("a", 0, &s(&["1"]), 0).unwrap();
        assert!(m.load("a").unwrap().is_empty());
        assert_eq!(m.append("a", 0, &s(&["1"]), 60).unwrap(), AppendOutcome::Appended { len: 1 });
    }

    #[test]
    fn down_fails_every_command() {
        let m = MemoryStore::new();
        m.set_down(true);
        assert!(matches!(m.load("a"), Err(StoreError::Unavailable { .. })));
        assert!(m.append("a", 0, &s(&["1"]), 60).is_err());
        assert!(m.legacy("a").is_err());
        m.set_down(false);
        assert!(m.load("a").unwrap().is_empty());
    }
}
