//! The bounded set of documents kept loaded, least recently used first out. A document that
//! someone is using right now (its `Arc` is shared) is never evicted, so a document is never
//! loaded twice at once; the cache may then hold more than its capacity for a while.
//!
//! Every operation is O(log n): recency is kept in an ordered map beside the documents, so
//! eviction does not scan the cache (it used to, which made a large `storage.loaded_docs` cost
//! more than it saved).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// Values in use skipped by one eviction before it gives up (see [`LruCache::insert`]).
const MAX_SKIPPED: usize = 8;

/// A cache of shared values by key.
#[derive(Debug)]
pub(crate) struct LruCache<K, V> {
    entries: HashMap<K, (Arc<V>, u64)>,
    order: BTreeMap<u64, K>,
    tick: u64,
    capacity: usize,
}

impl<K: Copy + Eq + std::hash::Hash, V> LruCache<K, V> {
    /// An empty cache for at least one value.
    pub(crate) fn new(capacity: usize) -> Self {
        LruCache {
            entries: HashMap::new(),
            order: BTreeMap::new(),
            tick: 0,
            capacity: capacity.max(1),
        }
    }

    /// The value for `key`, marked as just used.
    pub(crate) fn get(&mut self, key: &K) -> Option<Arc<V>> {
        self.tick += 1;
        let tick = self.tick;
        let (value, t) = self.entries.get_mut(key)?;
        self.order.remove(t);
        *t = tick;
        self.order.insert(tick, *key);
        Some(value.clone())
    }

    /// Whether `key` is cached (without marking it used).
    pub(crate) fn contains(&self, key: &K) -> bool {
        self.entries.contains_key(key)
    }

    /// Caches `value` as just used, then evicts least recently used values that nobody else
    /// holds until the cache is within its capacity. A value found in use is marked as just
    /// used and skipped; after [`MAX_SKIPPED`] of those the eviction stops, so a cache full of
    /// values in use (a sync session's working set) costs each insert O(log n), not a walk
    /// of everything held. The cache then stays above its capacity until values are released.
    pub(crate) fn insert(&mut self, key: K, value: Arc<V>) {
        self.tick += 1;
        let tick = self.tick;
        if let Some((_, old)) = self.entries.insert(key, (value, tick)) {
            self.order.remove(&old);
        }
        self.order.insert(tick, key);
        let mut skipped = 0;
        while self.entries.len() > self.capacity && skipped < MAX_SKIPPED {
            let Some((_, k)) = self.order.pop_first() else {
                break;
            };
            let free = self
                .entries
                .get(&k)
                .is_some_and(|(v, _)| Arc::strong_count(v) == 1);
            if free && k != key {
                self.entries.remove(&k);
                continue;
            }
            skipped += 1;
            self.tick += 1;
            self.order.insert(self.tick, k);
            if let Some((_, t)) = self.entries.get_mut(&k) {
                *t = self.tick;
            }
        }
    }

    /// Drops `key`.
    pub(crate) fn remove(&mut self, key: &K) {
        if let Some((_, t)) = self.entries.remove(key) {
            self.order.remove(&t);
        }
    }

    /// How many values are cached.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
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
        assert_eq!(
            c.order.len(),
            c.entries.len(),
            "one recency entry per value"
        );
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
