//! A bounded least-recently-used map, used as the node's conversation cache.
//!
//! Invariants: `len() <= capacity()`; a `get` or `put` makes its key the most recent;
//! inserting a new key into a full map evicts the least recent one; capacity 0 caches
//! nothing. Operations are O(log n): a hash map from key to (value, tick) plus an ordered
//! map from tick to key.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

/// Bounded LRU map.
#[derive(Debug)]
pub struct Lru<K, V> {
    capacity: usize,
    tick: u64,
    entries: HashMap<K, (V, u64)>,
    order: BTreeMap<u64, K>,
}

impl<K: Hash + Eq + Clone, V: Clone> Lru<K, V> {
    /// An empty map holding at most `capacity` entries.
    pub fn new(capacity: usize) -> Self {
        Self { capacity, tick: 0, entries: HashMap::new(), order: BTreeMap::new() }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// A clone of the value, marking the key most recently used.
    pub fn get(&mut self, key: &K) -> Option<V> {
        let tick = self.next_tick();
        let (value, used) = self.entries.get_mut(key)?;
        self.order.remove(used);
        *used = tick;
        self.order.insert(tick, key.clone());
        Some(value.clone())
    }

    /// Inserts or replaces, evicting the least recently used entry when full.
    pub fn put(&mut self, key: K, value: V) {
        if self.capacity == 0 {
            return;
        }
        let tick = self.next_tick();
        if let Some((_, old)) = self.entries.remove(&key) {
            self.order.remove(&old);
        } else if self.entries.len() >= self.capacity {
            if let Some((_, oldest)) = self.order.pop_first() {
                self.entries.remove(&oldest);
            }
        }
        self.order.insert(tick, key.clone());
        self.entries.insert(key, (value, tick));
    }

    /// Removes a key; returns its value.
    pub fn remove(&mut self, key: &K) -> Option<V> {
        let (value, tick) = self.entries.remove(key)?;
        self.order.remove(&tick);
        Some(value)
    }

    /// Removes and returns the least recently used entry.
    pub fn pop_oldest(&mut self) -> Option<(K, V)> {
        let (_, key) = self.order.pop_first()?;
        let (value, _) = self.entries.remove(&key)?;
        Some((key, value))
    }

    /// A clone of the value without touching the recency order.
    pub fn peek(&self, key: &K) -> Option<V> {
        self.entries.get(key).map(|(v, _)| v.clone())
    }

    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn evicts_least_recently_used() {
        let mut lru = Lru::new(2);
        lru.put("a", 1);
        lru.put("b", 2);
        assert_eq!(lru.get(&"a"), Some(1)); // a is now most recent
        lru.put("c", 3); // evicts b
        assert_eq!(lru.get(&"b"), None);
        assert_eq!(lru.get(&"a"), Some(1));
        assert_eq!(lru.get(&"c"), Some(3));
        assert_eq!(lru.len(), 2);
    }

    #[test]
    fn replacing_does_not_evict() {
        let mut lru = Lru::new(2);
        lru.put("a", 1);
        lru.put("b", 2);
        lru.put("a", 10); // a most recent, b oldest
        assert_eq!(lru.len(), 2);
        lru.put("c", 3); // evicts b
        assert_eq!(lru.get(&"a"), Some(10));
        assert_eq!(lru.get(&"b"), None);
    }

    #[test]
    fn capacity_zero_caches_nothing() {
        let mut lru = Lru::new(0);
        lru.put("a", 1);
        assert!(lru.is_empty());
        assert_eq!(lru.get(&"a"), None);
    }

    #[test]
    fn remove_forgets() {
        let mut lru = Lru::new(3);
        lru.put("a", 1);
        assert_eq!(lru.remove(&"a"), Some(1));
        assert_eq!(lru.remove(&"a"), None);
        assert!(lru.is_empty());
        lru.put("b", 2);
        lru.put("c", 3);
        lru.put("d", 4);
        lru.put("e", 5); // evicts b only
        assert_eq!(lru.len(), 3);
        assert_eq!(lru.get(&"b"), None);
    }

    #[test]
    fn pop_oldest_goes_in_lru_order() {
        let mut lru = Lru::new(3);
        lru.put("a", 1);
        lru.put("b", 2);
        lru.put("c", 3);
        lru.get(&"a");
        assert_eq!(lru.peek(&"b"), Some(2)); // peek does not refresh b
        assert_eq!(lru.pop_oldest(), Some(("b", 2)));
        assert_eq!(lru.pop_oldest(), Some(("c", 3)));
        assert_eq!(lru.pop_oldest(), Some(("a", 1)));
        assert_eq!(lru.pop_oldest(), None);
    }

    #[test]
    fn stays_bounded_under_churn() {
        let mut lru = Lru::new(10);
        for i in 0..1000 {
            lru.put(i, i);
            if i % 3 == 0 {
                lru.get(&(i / 2));
            }
            assert!(lru.len() <= 10);
        }
        assert_eq!(lru.len(), 10);
        assert_eq!(lru.order.len(), 10);
        assert_eq!(lru.get(&999), Some(999));
    }
}
