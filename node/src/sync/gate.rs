//! Gating: untrusted peers may only pair (and identify, ping, relay). Every other protocol
//! answers them with an explicit refusal, which is logged and rate-limited; a peer that keeps
//! knocking is disconnected.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use libp2p::PeerId;

/// Refusals per peer per minute before the peer is disconnected.
pub const MAX_REFUSALS_PER_MINUTE: u32 = 10;
/// Refusals logged per peer per minute (the rest are counted silently).
const LOGGED_PER_MINUTE: u32 = 3;

/// Counts refusals per peer.
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
        if counts.len() > 10_000 {
            counts.clear();
        }
        let entry = counts.entry(peer).or_insert((Instant::now(), 0));
        if entry.0.elapsed() > Duration::from_secs(60) {
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
}
