//! The peers that proved (with `/iom/relay-auth/1`) that they are trusted devices of an allowed
//! person. Written by the auth task, read by the relay's connection handlers when a peer opens
//! its first relay stream on a connection. Bounded: at most [`MAX_ALLOWED_PEERS`] entries.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use iom_protocol::keys::PersonId;
use libp2p::PeerId;

/// The most peers the list remembers; beyond that, new devices are refused (the auth reply
/// says so) until the relay restarts.
pub const MAX_ALLOWED_PEERS: usize = 65_536;

/// A shared, cloneable set of allowed peers and the person each one belongs to.
#[derive(Debug, Clone, Default)]
pub struct AllowList {
    inner: Arc<RwLock<HashMap<PeerId, PersonId>>>,
}

impl AllowList {
    /// An empty list.
    pub fn new() -> AllowList {
        AllowList::default()
    }

    /// Records that `peer` is a device of `person`. Returns `false` if the list is full.
    pub fn insert(&self, peer: PeerId, person: PersonId) -> bool {
        let mut map = self.inner.write().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_ALLOWED_PEERS && !map.contains_key(&peer) {
            return false;
        }
        map.insert(peer, person);
        true
    }

    /// Whether `peer` has authenticated.
    pub fn contains(&self, peer: &PeerId) -> bool {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(peer)
    }

    /// The person `peer` authenticated for, if any.
    pub fn person_of(&self, peer: &PeerId) -> Option<PersonId> {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(peer)
            .copied()
    }

    /// How many peers are allowed.
    pub fn len(&self) -> usize {
        self.inner.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether no peer is allowed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use iom_protocol::keys::PersonKey;

    use super::*;

    #[test]
    fn peers_are_remembered_with_their_person_and_shared_by_clones() {
        let list = AllowList::new();
        assert!(list.is_empty());
        let (a, b) = (
            PersonKey::from_seed([1; 32]).id(),
            PersonKey::from_seed([2; 32]).id(),
        );
        let peer = PeerId::random();
        let clone = list.clone();
        assert!(clone.insert(peer, a));
        assert!(list.contains(&peer));
        assert_eq!(list.person_of(&peer), Some(a));
        // Authenticating again (for another person) replaces the entry.
        assert!(list.insert(peer, b));
        assert_eq!(list.person_of(&peer), Some(b));
        assert_eq!(list.len(), 1);
        assert_eq!(list.person_of(&PeerId::random()), None);
    }
}
