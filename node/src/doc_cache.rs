//! The bounded set of documents kept loaded, least recently used first out. A document that
//! someone is using right now (its `Arc` is shared) is never evicted, so a document is never
//! loaded twice at once; the cache may then hold more than its capacity for a while.
//!
//! Every operation is O(1) amortized: recency is a queue of (use, key) beside the documents,
//! and a use appends to it without looking for the key's earlier place. An earlier place is
//! recognised as stale when eviction reaches it (its use is not the key's latest), and the
//! queue is rebuilt without stale places when they outnumber the live ones. (An ordered map
//! kept exact cost a removal and an insertion per use: 4–6% of a catch-up's CPU, where every
//! message uses its document several times.)

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// Values in use skipped by one eviction before it gives up (see [`LruCache::insert`]).
const MAX_SKIPPED: usize = 8;

/// A cache of shared values by key.
#[derive(Debug)]
pub(crate) struct LruCache<K, V> {
    /// Each value with its latest use.
    entries: HashMap<K, (Arc<V>, u64)>,
    /// Uses, oldest first; a place whose use is not its key's latest is stale.
    order: VecDeque<(u64, K)>,
    tick: u64,
    capacity: usize,
}

impl<K: Copy + Eq + std::hash::Hash, V> LruCache<K, V> {
    /// An empty cache for at least one value.
    pub(crate) fn new(capacity: usize) -> Self {
        LruCache {
            entries: HashMap::new(),
            order: VecDeque::new(),
            tick: 0,
            capacity: capacity.max(1),
        }
    }

    /// The value for `key`, marked as just used.
    pub(crate) fn get(&mut self, key: &K) -> Option<Arc<V>> {
        let tick = self.tick + 1;
        let (value, t) = self.entries.get_mut(key)?;
        *t = tick;
        let value = value.clone();
        self.tick = tick;
        self.push_use(tick, *key);
        Some(value)
    }

    /// Whether `key` is cached (without marking it used).
    pub(crate) fn contains(&self, key: &K) -> bool {
        self.entries.contains_key(key)
    }

    /// Caches `value` as just used, then evicts least recently used values that nobody else
    /// holds until the cache is within its capacity. A value found in use is marked as just
    /// used and skipped; after [`MAX_SKIPPED`] of those the eviction stops, so a cache full of
    /// values in use (a sync session's working set) costs each insert O(1), not a walk of
    /// everything held. The cache then stays above its capacity until values are released.
    pub(crate) fn insert(&mut self, key: K, value: Arc<V>) {
        self.tick += 1;
        let tick = self.tick;
        self.entries.insert(key, (value, tick));
        self.push_use(tick, key);
        let mut skipped = 0;
        while self.entries.len() > self.capacity && skipped < MAX_SKIPPED {
            let Some((t, k)) = self.order.pop_front() else {
                break;
            };
            let Some((v, latest)) = self.entries.get(&k) else {
                continue; // removed since
            };
            if *latest != t {
                continue; // used again since: a later place stands for it
            }
            if Arc::strong_count(v) == 1 && k != key {
                self.entries.remove(&k);
                continue;
            }
            skipped += 1;
            self.tick += 1;
            let tick = self.tick;
            if let Some((_, latest)) = self.entries.get_mut(&k) {
                *latest = tick;
            }
            self.order.push_back((tick, k));
        }
    }

    /// Drops `key` (its places in the queue go stale).
    pub(crate) fn remove(&mut self, key: &K) {
        self.entries.remove(key);
        if self.entries.is_empty() {
            self.order.clear();
        }
    }

    /// How many values are cached.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Records a use, and drops the stale places once they outnumber the live ones (so the
    /// queue stays within about twice the values, and each rebuild is paid for by as many
    /// uses as it keeps).
    fn push_use(&mut self, tick: u64, key: K) {
        self.order.push_back((tick, key));
        if self.order.len() > 2 * self.entries.len() + 16 {
            let entries = &self.entries;
            self.order
                .retain(|(t, k)| entries.get(k).is_some_and(|(_, latest)| latest == t));
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn least_recently_used_goes_first_and_values_in_use_stay() {
        let mut c: LruCache<u32, String> = LruCache::new(2);
        c.insert(1, Arc::new("one".into()));
        c.insert(2, Arc::new("two".into()));
        assert!(c.get(&1).is_some()); // 2 is now the oldest
        c.insert(3, Arc::new("three".into()));
        assert!(c.contains(&1) && c.contains(&3) && !c.contains(&2));

        // 1 is the oldest but someone holds it: 3 goes instead.
        let held = c.get(&1);
        let _ = c.get(&3);
        let _ = c.get(&1);
        c.insert(4, Arc::new("four".into()));
        assert!(c.contains(&1) && c.contains(&4) && !c.contains(&3));
        assert_eq!(c.len(), 2);

        // Everything in use: the cache grows past its capacity rather than evict.
        let four = c.get(&4);
        c.insert(5, Arc::new("five".into()));
        let five = c.get(&5);
        c.insert(6, Arc::new("six".into()));
        assert!(c.contains(&1) && c.contains(&4) && c.contains(&5) && c.contains(&6));
        drop((held, four, five));
        c.insert(7, Arc::new("seven".into()));
        assert_eq!(c.len(), 2, "back within capacity once released");
        assert!(c.contains(&7));
        c.remove(&7);
        assert!(!c.contains(&7));
    }

    #[test]
    fn a_cache_full_of_values_in_use_keeps_them_and_still_evicts_free_ones() {
        let mut c: LruCache<u32, u32> = LruCache::new(4);
        let held: Vec<Arc<u32>> = (0..100).map(Arc::new).collect();
        for (k, v) in held.iter().enumerate() {
            c.insert(k as u32, v.clone());
        }
        assert_eq!(c.len(), 100, "nothing held is evicted");
        for k in 1000..1100 {
            c.insert(k, Arc::new(k));
        }
        assert!((0..100).all(|k| c.contains(&k)), "the held values stay");
        // Each insert skips at most MAX_SKIPPED held values, so free ones do pile up a little
        // while the held ones are walked past, but not one per insert.
        let free = c.len() - 100;
        assert!(free <= 100 / MAX_SKIPPED + 4, "{free} free values kept");
        drop(held);
        c.insert(2000, Arc::new(2000));
        for k in 2001..2100 {
            c.insert(k, Arc::new(k));
        }
        assert_eq!(c.len(), 4, "back within capacity once released");
    }

    #[test]
    fn a_capacity_of_zero_still_holds_one_value() {
        let mut c: LruCache<u32, u32> = LruCache::new(0);
        c.insert(1, Arc::new(1));
        assert_eq!(c.len(), 1);
        c.insert(2, Arc::new(2));
        assert_eq!(c.len(), 1);
        assert!(c.contains(&2) && !c.contains(&1));
    }

    #[test]
    fn inserting_a_key_again_replaces_its_value_and_refreshes_it() {
        let mut c: LruCache<u32, &str> = LruCache::new(2);
        c.insert(1, Arc::new("old"));
        c.insert(2, Arc::new("two"));
        c.insert(1, Arc::new("new")); // 2 is now the oldest
        assert_eq!(c.len(), 2);
        assert_eq!(*c.get(&1).unwrap(), "new");
        c.insert(3, Arc::new("three"));
        assert!(c.contains(&1) && c.contains(&3) && !c.contains(&2));
        assert!(
            c.order.len() <= 2 * c.entries.len() + 16,
            "the recency queue stays bounded"
        );
    }

    #[test]
    fn many_uses_keep_the_queue_bounded_and_the_order_exact() {
        let mut c: LruCache<u32, u32> = LruCache::new(3);
        for k in 1..=3 {
            c.insert(k, Arc::new(k));
        }
        for round in 0..10_000 {
            assert!(c.get(&(1 + round % 2)).is_some()); // 1 and 2 in turn, never 3
            assert!(c.order.len() <= 2 * c.entries.len() + 16, "queue bounded");
        }
        c.insert(4, Arc::new(4));
        assert!(!c.contains(&3), "3 was used least recently");
        c.insert(5, Arc::new(5));
        assert!(!c.contains(&1), "then 1 (2 was used last)");
        assert!(c.contains(&2) && c.contains(&4) && c.contains(&5));
        c.remove(&4);
        c.insert(4, Arc::new(40));
        c.insert(6, Arc::new(6));
        assert!(
            !c.contains(&2),
            "a removed and re-inserted key counts from its new use"
        );
        assert_eq!(*c.get(&4).unwrap(), 40);
    }

    #[test]
    fn contains_does_not_count_as_use() {
        let mut c: LruCache<u32, u32> = LruCache::new(2);
        c.insert(1, Arc::new(1));
        c.insert(2, Arc::new(2));
        assert!(c.contains(&1));
        c.insert(3, Arc::new(3));
        assert!(!c.contains(&1), "1 was still the least recently used");
        assert!(c.get(&1).is_none());
    }

    #[test]
    fn the_value_just_inserted_is_never_the_one_evicted() {
        let mut c: LruCache<u32, u32> = LruCache::new(1);
        let held = {
            c.insert(1, Arc::new(1));
            c.get(&1).unwrap()
        };
        // 1 is held elsewhere, so inserting 2 leaves both; then 1 is released.
        c.insert(2, Arc::new(2));
        assert_eq!(c.len(), 2);
        drop(held);
        c.insert(3, Arc::new(3));
        assert_eq!(c.len(), 1);
        assert!(c.contains(&3));
    }

    #[test]
    fn removing_an_absent_key_is_harmless() {
        let mut c: LruCache<u32, u32> = LruCache::new(2);
        c.remove(&5);
        c.insert(1, Arc::new(1));
        c.remove(&1);
        c.remove(&1);
        assert_eq!(c.len(), 0);
        assert!(c.order.is_empty());
    }
}
