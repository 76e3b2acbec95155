//! The documents a sync session is exchanging, kept loaded while it exchanges them.
//!
//! A document goes through several messages in one exchange (our message, the peer's answer,
//! our acknowledgement). With hundreds of documents in flight the document cache (128 entries
//! by default, `storage.loaded_docs`) evicted each one between two of its messages, so every message
//! loaded it from the store again: a catch-up of 1,000 documents loaded each about three
//! times on each side. The session now holds a pin on every document it generated for or
//! applied a message to, up to a limit (2,048 in a session; the oldest pin goes first),
//! and drops them all once the session has been quiet for a while or ends.

use std::collections::{HashMap, VecDeque};

use iom_crdt::DocId;

/// Pins of one session, oldest first. `P` is what keeps a document loaded (a
/// [`crate::docs::DocPin`] in the node).
#[derive(Debug)]
pub(crate) struct WorkingSet<P> {
    order: VecDeque<DocId>,
    pins: HashMap<DocId, P>,
    limit: usize,
}

impl<P> WorkingSet<P> {
    /// An empty set that holds at most `limit` documents (at least one).
    pub(crate) fn new(limit: usize) -> WorkingSet<P> {
        WorkingSet {
            order: VecDeque::new(),
            pins: HashMap::new(),
            limit: limit.max(1),
        }
    }

    /// Keeps `doc` loaded with `pin` (a document already held keeps its place). Drops the
    /// oldest pins beyond the limit.
    pub(crate) fn hold(&mut self, doc: DocId, pin: P) {
        if self.pins.contains_key(&doc) {
            return;
        }
        self.pins.insert(doc, pin);
        self.order.push_back(doc);
        while self.pins.len() > self.limit {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            self.pins.remove(&oldest);
        }
    }

    /// Drops every pin (the session went quiet or ended).
    pub(crate) fn release(&mut self) {
        self.order.clear();
        self.pins.clear();
    }

    /// Whether nothing is held.
    pub(crate) fn is_empty(&self) -> bool {
        self.pins.is_empty()
    }

    /// How many documents are held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.pins.len()
    }

    /// Whether `doc` is held.
    #[cfg(test)]
    pub(crate) fn holds(&self, doc: &DocId) -> bool {
        self.pins.contains_key(doc)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn doc(n: u8) -> DocId {
        DocId::from_bytes([n; 16])
    }

    #[test]
    fn the_oldest_pin_goes_first_past_the_limit() {
        let mut set = WorkingSet::new(3);
        for n in 1..=4 {
            set.hold(doc(n), n);
        }
        assert_eq!(set.len(), 3);
        assert!(!set.holds(&doc(1)));
        assert!((2..=4).all(|n| set.holds(&doc(n))));
    }

    #[test]
    fn holding_a_document_again_keeps_one_pin_in_its_place() {
        let mut set = WorkingSet::new(2);
        set.hold(doc(1), 1);
        set.hold(doc(2), 2);
        set.hold(doc(1), 10);
        assert_eq!(set.len(), 2);
        set.hold(doc(3), 3);
        assert!(!set.holds(&doc(1)), "1 was held first, so it goes first");
        assert!(set.holds(&doc(2)) && set.holds(&doc(3)));
    }

    #[test]
    fn release_drops_every_pin() {
        let value = Arc::new(());
        let mut set = WorkingSet::new(8);
        for n in 0..5 {
            set.hold(doc(n), value.clone());
        }
        assert_eq!(Arc::strong_count(&value), 6);
        set.release();
        assert!(set.is_empty());
        assert_eq!(
            Arc::strong_count(&value),
            1,
            "nothing is kept loaded any more"
        );
    }

    #[test]
    fn a_limit_of_zero_still_holds_one() {
        let mut set = WorkingSet::new(0);
        set.hold(doc(1), ());
        set.hold(doc(2), ());
        assert_eq!(set.len(), 1);
        assert!(set.holds(&doc(2)));
    }
}
