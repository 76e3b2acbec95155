//! Gating: untrusted peers may only pair (and identify, ping, relay). Every other protocol
//! answers them with an explicit refusal, which is logged and rate-limited; a peer that keeps
//! knocking is disconnected.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use libp2p::PeerId;
use tokio::time::Instant;

/// Refusals per peer per minute before the peer is disconnected.
pub const MAX_REFUSALS_PER_MINUTE: u32 = 10;
/// Refusals logged per peer per minute (the rest are counted silently).
const LOGGED_PER_MINUTE: u32 = 3;
/// The counting window.
const WINDOW: Duration = Duration::from_secs(60);
/// Peers tracked before the table is cleared (a flood of fresh peer ids can't grow it).
const MAX_TRACKED: usize = 10_000;

/// Counts refusals per peer, for every gated protocol (shared as an `Arc<Gate>` by sync, blobs
/// and the agent protocol). Time is tokio's clock, so tests can pause it.
#[derive(Debug, Default)]
pub struct Gate {
    counts: Mutex<HashMap<PeerId, (Instant, u32)>>,
}

/// What to do after a refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Keep the connection.
    Keep,
    /// Disconnect the peer: it keeps knocking.
    Disconnect,
}

impl Gate {
    /// Records a refusal of `protocol` to `peer` and decides what to do.
    pub fn refuse(&self, peer: PeerId, protocol: &str, reason: &str) -> Verdict {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if counts.len() > MAX_TRACKED {
            counts.clear();
        }
        let entry = counts.entry(peer).or_insert((Instant::now(), 0));
        if entry.0.elapsed() > WINDOW {
            *entry = (Instant::now(), 0);
        }
        entry.1 += 1;
        if entry.1 <= LOGGED_PER_MINUTE {
            tracing::warn!(%peer, protocol, reason, "refused untrusted peer");
        }
        if entry.1 > MAX_REFUSALS_PER_MINUTE {
            Verdict::Disconnect
        } else {
            Verdict::Keep
        }
    }

    /// Peers with refusals counted now.
    pub fn tracked(&self) -> usize {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refuse_n(gate: &Gate, peer: PeerId, n: u32) -> Vec<Verdict> {
        (0..n)
            .map(|_| gate.refuse(peer, "/iom/sync/1", "not trusted"))
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_keeps_knocking_is_disconnected() {
        let gate = Gate::default();
        let peer = PeerId::random();
        let verdicts = refuse_n(&gate, peer, MAX_REFUSALS_PER_MINUTE);
        assert!(verdicts.iter().all(|v| *v == Verdict::Keep));
        assert_eq!(gate.refuse(peer, "/iom/blob/1", "x"), Verdict::Disconnect);
        assert_eq!(gate.refuse(peer, "/iom/agent/1", "x"), Verdict::Disconnect);
    }

    #[tokio::test(start_paused = true)]
    async fn the_count_starts_over_after_a_minute() {
        let gate = Gate::default();
        let peer = PeerId::random();
        refuse_n(&gate, peer, MAX_REFUSALS_PER_MINUTE + 1);
        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(gate.refuse(peer, "/iom/sync/1", "x"), Verdict::Disconnect);
        tokio::time::advance(Duration::from_secs(2)).await;
        // 61 s after the first refusal: a new window.
        assert_eq!(gate.refuse(peer, "/iom/sync/1", "x"), Verdict::Keep);
        let verdicts = refuse_n(&gate, peer, MAX_REFUSALS_PER_MINUTE - 1);
        assert!(verdicts.iter().all(|v| *v == Verdict::Keep));
        assert_eq!(gate.refuse(peer, "/iom/sync/1", "x"), Verdict::Disconnect);
    }

    #[tokio::test(start_paused = true)]
    async fn peers_are_counted_apart() {
        let gate = Gate::default();
        let (a, b) = (PeerId::random(), PeerId::random());
        refuse_n(&gate, a, MAX_REFUSALS_PER_MINUTE + 1);
        assert_eq!(gate.refuse(b, "/iom/sync/1", "x"), Verdict::Keep);
        assert_eq!(gate.tracked(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_of_peer_ids_does_not_grow_the_table_without_bound() {
        let gate = Gate::default();
        for _ in 0..=MAX_TRACKED {
            gate.refuse(PeerId::random(), "/iom/sync/1", "x");
        }
        assert_eq!(gate.tracked(), MAX_TRACKED + 1);
        gate.refuse(PeerId::random(), "/iom/sync/1", "x");
        assert_eq!(gate.tracked(), 1);
    }
}
