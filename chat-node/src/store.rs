//! The conversation store seam: single-key `GET` and `SET key value EX ttl`, the only
//! commands a node needs and ones Envoy's `redis_proxy` supports.
//!
//! Implementations retry internally; an `Err` means the store stayed unavailable for the
//! whole retry budget and the caller must not acknowledge the turn.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Where conversations live.
pub trait Store: Send + Sync {
    /// The value of `key`, `None` when absent.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Sets `key` to `value` with a time-to-live (idempotent, so safe to retry).
    fn set_ex(&self, key: &str, value: &[u8], ttl_seconds: u64) -> Result<(), StoreError>;
}

/// The store could not serve a command within its retry budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// Every attempt failed; the last failure is kept for the log.
    Unavailable { attempts: u32, last: String },
    /// A reply that retrying cannot fix (e.g. `WRONGTYPE`).
    Rejected(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Unavailable { attempts, last } => {
                write!(f, "store unavailable after {attempts} attempts: {last}")
            }
            StoreError::Rejected(why) => write!(f, "store rejected the command: {why}"),
        }
    }
}

/// An in-process store for tests and experiments; `set_down(true)` makes every command
/// fail as an unreachable Redis would.
#[derive(Debug, Default)]
pub struct MemoryStore {
    values: Mutex<HashMap<String, Vec<u8>>>,
    down: AtomicBool,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes every following command fail (`true`) or succeed (`false`).
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// The raw value of a key (tests inspect what was stored).
    pub fn raw(&self, key: &str) -> Option<Vec<u8>> {
        self.lock().get(key).cloned()
    }

    /// Sets a raw value (tests plant corrupt or foreign values).
    pub fn put_raw(&self, key: &str, value: &[u8]) {
        self.lock().insert(key.to_owned(), value.to_vec());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<u8>>> {
        self.values.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_up(&self) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            Err(StoreError::Unavailable { attempts: 1, last: "memory store is down".into() })
        } else {
            Ok(())
        }
    }
}

impl Store for MemoryStore {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.check_up()?;
        Ok(self.lock().get(key).cloned())
    }

    fn set_ex(&self, key: &str, value: &[u8], _ttl_seconds: u64) -> Result<(), StoreError> {
        self.check_up()?;
        self.lock().insert(key.to_owned(), value.to_vec());
        Ok(())
    }
}
