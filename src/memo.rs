//! Per-VM memo of recent successful token and ticket checks.
//!
//! A conversation sends the same session token (and, between moves, the same ticket) on
//! every turn. Verifying them costs two HMACs, base64 decoding and JSON parsing, about
//! half of the filter's own work per request; a hit here costs a hash and a comparison of
//! the token bytes.
//!
//! Invariants:
//! - Only tokens and tickets that passed every check are stored, keyed by their exact
//!   bytes (compared in full on lookup, so a hash collision is a miss, never a wrong
//!   answer).
//! - The time-dependent checks are redone on every hit (`exp`, `nbf` with the leeway for
//!   tokens; `exp` and the session binding for tickets), so a memoized token expires at
//!   the same second as one checked from scratch.
//! - The memo belongs to one configuration: a new configuration starts an empty one.
//! - Size is fixed (direct-mapped slots); an entry is replaced by any later one that
//!   maps to its slot. The slot hash is seeded per VM, so a client cannot choose tokens
//!   that evict each other.

use crate::token::TokenError;

/// Slots per memo (a power of two).
pub const SLOTS: usize = 1024;

/// A validated session token, minus the time checks.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenFacts {
    pub session: String,
    /// `h64(session)`, so a hit also saves the affinity function's SHA-256.
    pub session_h64: u64,
    pub exp: Option<f64>,
    pub nbf: Option<f64>,
}

impl TokenFacts {
    /// The time checks of DESIGN section 3, exactly as a full validation makes them.
    pub fn check_time(&self, now: i64, leeway: i64) -> Result<(), TokenError> {
        let (now, leeway) = (now as f64, leeway as f64);
        if let Some(exp) = self.exp {
            if now >= exp + leeway {
                return Err(TokenError::Expired);
            }
        }
        if let Some(nbf) = self.nbf {
            if nbf > now + leeway {
                return Err(TokenError::NotYetValid);
            }
        }
        Ok(())
    }
}

/// A fixed-size map from exact byte strings to values.
#[derive(Clone, Debug)]
pub struct Memo<V> {
    slots: Vec<Option<(Box<[u8]>, V)>>,
    seed: u64,
}

impl<V> Memo<V> {
    pub fn new(seed: u64) -> Memo<V> {
        Memo { slots: (0..SLOTS).map(|_| None).collect(), seed }
    }

    fn slot(&self, key: &[u8]) -> usize {
        (hash(self.seed, key) as usize) & (SLOTS - 1)
    }

    pub fn get(&self, key: &[u8]) -> Option<&V> {
        match self.slots.get(self.slot(key)) {
            Some(Some((k, v))) if **k == *key => Some(v),
            _ => None,
        }
    }

    pub fn put(&mut self, key: &[u8], value: V) {
        let i = self.slot(key);
        if let Some(slot) = self.slots.get_mut(i) {
            *slot = Some((key.into(), value));
        }
    }
}

/// A fast keyed hash of a byte string (multiply-rotate over 8-byte words, then a
/// finalizer). Not cryptographic: it only spreads keys over slots.
pub fn hash(seed: u64, bytes: &[u8]) -> u64 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut h = seed ^ (bytes.len() as u64).wrapping_mul(K);
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        h = (h.rotate_left(23) ^ w).wrapping_mul(K);
    }
    let mut tail = [0u8; 8];
    let rest = chunks.remainder();
    tail[..rest.len()].copy_from_slice(rest);
    h = (h.rotate_left(23) ^ u64::from_le_bytes(tail)).wrapping_mul(K);
    crate::affinity::fmix64(h)
}

/// The memos a request path uses: tokens, and tickets (value: session, node, iat, exp).
#[derive(Clone, Debug)]
pub struct Memos {
    pub tokens: Memo<TokenFacts>,
    pub tickets: Memo<(String, crate::ticket::Ticket)>,
}

impl Memos {
    pub fn new(seed: u64) -> Memos {
        Memos { tokens: Memo::new(seed), tickets: Memo::new(seed.rotate_left(17) ^ 0x5bd1_e995) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_keys_only() {
        let mut m: Memo<u32> = Memo::new(42);
        m.put(b"token-a", 1);
        assert_eq!(m.get(b"token-a"), Some(&1));
        assert_eq!(m.get(b"token-b"), None);
        assert_eq!(m.get(b"token-"), None);
        // Many keys: a key is either its own value or a miss, never another's value.
        for i in 0..5000u32 {
            m.put(format!("k{i}").as_bytes(), i);
        }
        let mut hits = 0;
        for i in 0..5000u32 {
            if let Some(v) = m.get(format!("k{i}").as_bytes()) {
                assert_eq!(*v, i);
                hits += 1;
            }
        }
        assert!(hits > 500 && hits <= SLOTS, "{hits}");
    }

    #[test]
    fn seeds_change_slots() {
        let a: Vec<u64> = (0..64).map(|i| hash(1, format!("x{i}").as_bytes()) % SLOTS as u64).collect();
        let b: Vec<u64> = (0..64).map(|i| hash(2, format!("x{i}").as_bytes()) % SLOTS as u64).collect();
        assert_ne!(a, b);
        assert_ne!(hash(0, b""), hash(0, b"\0"));
    }

    #[test]
    fn time_checks_match_full_validation() {
        let f = TokenFacts { session: "s".into(), session_h64: 0, exp: Some(100.0), nbf: Some(50.0) };
        assert_eq!(f.check_time(99, 0), Ok(()));
        assert_eq!(f.check_time(100, 0), Err(TokenError::Expired));
        assert_eq!(f.check_time(104, 5), Ok(()));
        assert_eq!(f.check_time(105, 5), Err(TokenError::Expired));
        assert_eq!(f.check_time(49, 0), Err(TokenError::NotYetValid));
        assert_eq!(f.check_time(45, 5), Ok(()));
    }
}
