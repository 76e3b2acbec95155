//! Waiting for a just-joined device's first sync (`iom join` at a terminal, or `--wait`):
//! documents and blobs still to arrive, read from the node's status, with a bar on stderr.
//!
//! The node reports, per session, whether the two inventories have been compared yet
//! (`compared`), how many documents the peer holds that have not arrived here
//! (`docs_incoming`) and the bytes of blobs it announced that are not here (`bytes_pending`).
//! The first sync is done when at least one session has compared and nothing is outstanding.

use std::io::Write;
use std::time::{Duration, Instant};

use serde_json::Value;

/// How often the status is read.
const POLL: Duration = Duration::from_millis(250);
/// With no session at all for this long, `--wait` gives up (no peer is reachable).
const NO_PEER: Duration = Duration::from_secs(60);
/// With sessions but no progress for this long, `--wait` gives up (the sync is stuck).
const STALLED: Duration = Duration::from_secs(120);

/// What one status reading says about the first sync.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reading {
    /// Documents on this device.
    pub documents: u64,
    /// Sync sessions up.
    pub sessions: usize,
    /// Whether every session has compared inventories.
    pub compared: bool,
    /// Documents the peers hold that have not arrived (the largest count of any one peer:
    /// peers in sync with each other list the same documents).
    pub incoming: u64,
    /// Bytes of blobs announced and not here yet.
    pub bytes_pending: u64,
}

impl Reading {
    /// Reads `GET /v1/status`.
    pub fn from_status(status: &Value) -> Reading {
        let sessions: Vec<&Value> = status["sync"].as_array().into_iter().flatten().collect();
        let num = |v: &Value, key: &str| v[key].as_u64().unwrap_or(0);
        Reading {
            documents: num(status, "documents"),
            sessions: sessions.len(),
            compared: sessions.iter().all(|s| s["compared"] == true),
            incoming: sessions
                .iter()
                .map(|s| num(s, "docs_incoming"))
                .max()
                .unwrap_or(0),
            bytes_pending: sessions.iter().map(|s| num(s, "bytes_pending")).sum(),
        }
    }

    /// Whether the first sync is over: a session has compared and nothing is outstanding.
    pub fn done(&self) -> bool {
        self.sessions > 0 && self.compared && self.incoming == 0 && self.bytes_pending == 0
    }
}

/// Documents received since the wait began against what is known to be coming, kept
/// monotone so the bar never moves back.
#[derive(Debug, Clone, Copy)]
pub struct Tally {
    start: u64,
    total: u64,
    last: Reading,
}

impl Tally {
    /// A tally from the first reading.
    pub fn new(first: Reading) -> Tally {
        Tally {
            start: first.documents,
            total: first.incoming,
            last: first,
        }
    }

    /// Takes a reading; true when it shows progress (more documents here, fewer bytes to go).
    pub fn update(&mut self, r: Reading) -> bool {
        let progressed = r.documents > self.last.documents
            || r.bytes_pending < self.last.bytes_pending
            || (r.sessions > 0 && self.last.sessions == 0);
        self.total = self.total.max(self.received_in(&r) + r.incoming);
        self.last = r;
        progressed
    }

    fn received_in(&self, r: &Reading) -> u64 {
        r.documents.saturating_sub(self.start)
    }

    /// Documents received since the wait began.
    pub fn received(&self) -> u64 {
        self.received_in(&self.last)
    }

    /// Documents known to be coming in all (received plus still to arrive).
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The latest reading.
    pub fn last(&self) -> Reading {
        self.last
    }

    /// One line of progress: `first sync [=====>    ]  45% 120/300 documents, 3.0 MiB of blobs
    /// to fetch`.
    pub fn line(&self, elapsed: Duration) -> String {
        let r = self.last;
        if r.sessions == 0 {
            return format!("first sync: waiting for a peer {}s", elapsed.as_secs());
        }
        if !r.compared {
            return format!("first sync: comparing with peers {}s", elapsed.as_secs());
        }
        let mut line =
            crate::progress::counted_line("first sync", self.received(), self.total, "documents");
        if r.bytes_pending > 0 {
            line.push_str(&format!(
                ", {} of blobs to fetch",
                iom_node::store::human_bytes(r.bytes_pending)
            ));
        }
        line
    }
}

/// Why waiting for the first sync ended without it.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    /// No session came up.
    #[error(
        "no peer became reachable within {}s: the first sync starts when one is (see `iom status` and `iom doctor`)",
        NO_PEER.as_secs()
    )]
    NoPeer,
    /// Sessions, but nothing moved.
    #[error(
        "the first sync made no progress for {}s ({received} of {total} documents here, {pending} bytes of blobs to fetch); it goes on in the node",
        STALLED.as_secs()
    )]
    Stalled {
        /// Documents received.
        received: u64,
        /// Documents known to be coming.
        total: u64,
        /// Bytes of blobs to fetch.
        pending: u64,
    },
    /// Reading the status failed.
    #[error(transparent)]
    Api(#[from] iom_node::api::client::ClientError),
}

/// Waits until the first sync is done, drawing a bar on stderr when `draw`. Returns the
/// final tally.
pub async fn wait(
    client: &iom_node::api::client::ApiClient,
    draw: bool,
) -> Result<Tally, WaitError> {
    let began = Instant::now();
    let first = Reading::from_status(&client.get("/v1/status").await?);
    let mut tally = Tally::new(first);
    let mut moved = Instant::now();
    loop {
        if draw {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K{}", tally.line(began.elapsed()));
            let _ = err.flush();
        }
        if tally.last().done() {
            if draw {
                let _ = writeln!(std::io::stderr());
            }
            return Ok(tally);
        }
        let r = tally.last();
        if r.sessions == 0 && began.elapsed() > NO_PEER {
            return Err(WaitError::NoPeer);
        }
        if r.sessions > 0 && moved.elapsed() > STALLED {
            return Err(WaitError::Stalled {
                received: tally.received(),
                total: tally.total(),
                pending: r.bytes_pending,
            });
        }
        tokio::time::sleep(POLL).await;
        let status = client.get("/v1/status").await?;
        if tally.update(Reading::from_status(&status)) {
            moved = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn status(documents: u64, sessions: &[(bool, u64, u64)]) -> Value {
        json!({
            "documents": documents,
            "sync": sessions.iter().map(|(c, i, b)| json!({
                "compared": c, "docs_incoming": i, "bytes_pending": b,
            })).collect::<Vec<_>>(),
        })
    }

    #[test]
    fn done_needs_a_compared_session_and_nothing_outstanding() {
        assert!(!Reading::from_status(&status(0, &[])).done(), "no peer yet");
        assert!(
            !Reading::from_status(&status(0, &[(false, 0, 0)])).done(),
            "not compared: zero incoming means nothing yet"
        );
        assert!(!Reading::from_status(&status(3, &[(true, 2, 0)])).done());
        assert!(
            !Reading::from_status(&status(5, &[(true, 0, 10)])).done(),
            "blobs"
        );
        assert!(
            !Reading::from_status(&status(5, &[(true, 0, 0), (false, 0, 0)])).done(),
            "every session has compared"
        );
        assert!(Reading::from_status(&status(5, &[(true, 0, 0), (true, 0, 0)])).done());
        assert!(
            !Reading::from_status(&json!({"documents": "x", "sync": "y"})).done(),
            "a malformed status reads as not done"
        );
    }

    #[test]
    fn the_tally_counts_what_arrived_against_what_is_coming_and_never_shrinks() {
        let mut t = Tally::new(Reading::from_status(&status(1, &[])));
        assert_eq!(
            t.line(Duration::from_secs(2)),
            "first sync: waiting for a peer 2s"
        );
        assert!(t.update(Reading::from_status(&status(1, &[(false, 0, 0)]))));
        assert!(t.line(Duration::ZERO).starts_with("first sync: comparing"));
        t.update(Reading::from_status(&status(1, &[(true, 300, 0)])));
        assert_eq!((t.received(), t.total()), (0, 300));
        assert!(t.update(Reading::from_status(&status(121, &[(true, 180, 1 << 20)]))));
        assert_eq!((t.received(), t.total()), (120, 300));
        let line = t.line(Duration::from_secs(1));
        assert!(line.contains(" 40% 120/300 documents"), "{line}");
        assert!(line.ends_with(", 1.0 MiB of blobs to fetch"), "{line}");
        // A peer whose list is shorter does not shrink the total.
        assert!(!t.update(Reading::from_status(&status(121, &[(true, 10, 1 << 20)]))));
        assert_eq!(t.total(), 300);
        t.update(Reading::from_status(&status(301, &[(true, 0, 0)])));
        assert!(t.last().done());
        assert!(t.line(Duration::ZERO).contains("100% 300/300 documents"));
    }
}
