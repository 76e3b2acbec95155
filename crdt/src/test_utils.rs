//! Helpers for tests of code that uses this crate (feature `test-utils`). They panic on failure.

use crate::actor::actor_for;
use crate::document::Document;
use crate::sync::{self, PeerDocState};

/// Rounds after which [`sync_pair`] gives up and panics (sync converges in a handful).
pub const MAX_ITER: usize = 50;

/// What one sync session exchanged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Messages sent in both directions.
    pub messages: usize,
    /// Bytes sent in both directions.
    pub bytes: usize,
}

/// A deterministic iom actor id for device number `n`.
pub fn actor(n: u8) -> Vec<u8> {
    actor_for(&[n; 32], [n; 8])
}

/// Runs the sync loop between two in-memory replicas until neither has anything to send.
///
/// # Panics
///
/// If a message is rejected or the loop does not settle within [`MAX_ITER`] rounds.
pub fn sync_pair(
    a: &mut Document,
    sa: &mut PeerDocState,
    b: &mut Document,
    sb: &mut PeerDocState,
) -> SyncStats {
    let mut stats = SyncStats::default();
    for _ in 0..MAX_ITER {
        let a_to_b = sync::generate(a, sa);
        if let Some(m) = &a_to_b {
            stats.messages += 1;
            stats.bytes += m.len();
            if let Err(e) = sync::receive(b, sb, m) {
                panic!("b rejected a's message: {e}");
            }
        }
        let b_to_a = sync::generate(b, sb);
        if let Some(m) = &b_to_a {
            stats.messages += 1;
            stats.bytes += m.len();
            if let Err(e) = sync::receive(a, sa, m) {
                panic!("a rejected b's message: {e}");
            }
        }
        if a_to_b.is_none() && b_to_a.is_none() {
            return stats;
        }
    }
    panic!("sync did not settle within {MAX_ITER} rounds");
}

/// Syncs two replicas with fresh states.
pub fn sync_fresh(a: &mut Document, b: &mut Document) -> SyncStats {
    sync_pair(a, &mut PeerDocState::new(), b, &mut PeerDocState::new())
}

/// Asserts that all replicas have the same heads and the same JSON.
///
/// # Panics
///
/// If they differ.
pub fn assert_converged(docs: &[&Document]) {
    let Some((first, rest)) = docs.split_first() else {
        return;
    };
    for (i, d) in rest.iter().enumerate() {
        assert_eq!(first.heads(), d.heads(), "heads of replica 0 and {}", i + 1);
        assert_eq!(
            first.to_json(),
            d.to_json(),
            "JSON of replica 0 and {}",
            i + 1
        );
    }
}
