//! When the documents that wait for the peer's first message speak after all.
//!
//! At the start of a session a document that differs is not spoken about by the side whose
//! persisted state shows it holds nothing new ([`iom_crdt::session::Established::wait_for_peer`]):
//! the other side, which holds the news, speaks first, and a catch-up costs one message less
//! per document. If both sides wait (one of them was restored from an older backup), nobody
//! would speak, so the waiting side speaks once the peer has sent no document message for
//! [`QUIET`], or at the latest [`AT_MOST`] after it began to wait (a peer busy with other
//! documents all along). The writer looks whenever it has nothing else to send.

use std::time::Duration;

use tokio::time::Instant;

/// The peer has sent no document message for this long: it has nothing more to say first.
pub(crate) const QUIET: Duration = Duration::from_millis(250);
/// The longest a document waits for the peer, however busy the session is.
pub(crate) const AT_MOST: Duration = Duration::from_secs(5);

/// Watches the peer's document messages while documents wait for it.
#[derive(Debug, Default)]
pub(crate) struct PeerQuiet {
    /// (messages counted, when that count was first seen, when the waiting began).
    watch: Option<(u64, Instant, Instant)>,
}

impl PeerQuiet {
    /// When the waiting documents should speak, given whether any wait and the peer's
    /// document messages received so far (`None`: nothing waits).
    pub(crate) fn deadline(&mut self, waiting: bool, heard: u64, now: Instant) -> Option<Instant> {
        if !waiting {
            self.watch = None;
            return None;
        }
        let (count, quiet_from, since) = self.watch.get_or_insert((heard, now, now));
        if *count != heard {
            *count = heard;
            *quiet_from = now;
        }
        Some((*quiet_from + QUIET).min(*since + AT_MOST))
    }

    /// The waiting documents spoke: start over.
    pub(crate) fn reset(&mut self) {
        self.watch = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn speaks_once_the_peer_is_quiet_or_at_the_latest_after_the_cap() {
        let t0 = Instant::now();
        let mut q = PeerQuiet::default();
        assert_eq!(q.deadline(false, 0, t0), None, "nothing waits");
        assert_eq!(q.deadline(true, 3, t0), Some(t0 + QUIET));
        // Asked again with no new message: the same deadline, however often it is asked.
        let later = t0 + QUIET / 2;
        assert_eq!(q.deadline(true, 3, later), Some(t0 + QUIET));
        // A message arrived: quiet counts from now.
        assert_eq!(q.deadline(true, 4, later), Some(later + QUIET));
        // A peer that never stops talking: the cap since the waiting began.
        let mut now = later;
        for heard in 5..100 {
            now += QUIET / 2;
            let d = q.deadline(true, heard, now).expect("waiting");
            assert!(d <= t0 + AT_MOST);
        }
        assert_eq!(q.deadline(true, 100, t0 + AT_MOST), Some(t0 + AT_MOST));
        // Spoken: a new wait starts its own clock.
        q.reset();
        let t1 = t0 + AT_MOST * 2;
        assert_eq!(q.deadline(true, 100, t1), Some(t1 + QUIET));
        assert_eq!(q.deadline(false, 100, t1), None);
    }
}
