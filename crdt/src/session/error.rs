//! Why a session ended, and who is to blame.

use crate::doc_id::DocId;
use crate::sync::SyncError;

use super::Msg;

/// Who caused an error, so the caller can choose between disconnecting the peer, telling the
/// user, and logging a bug (rustls' split).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// The peer broke the protocol or sent bad data: disconnect it.
    Peer,
    /// The peer speaks another version of the protocol: nobody misbehaved, but the two can't
    /// talk.
    Incompatible,
    /// A decision, not a fault: one side refused the other.
    Decision,
    /// Our own bug (the caller used the session wrongly).
    OurBug,
}

/// A protocol violation by the peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Violation {
    /// The first message was not `Hello`.
    #[error("expected Hello, got {got}")]
    ExpectedHello {
        /// What came instead.
        got: &'static str,
    },
    /// A second `Hello` in an established session.
    #[error("Hello in an established session")]
    UnexpectedHello,
    /// A message this build does not know.
    #[error("unknown message {what}")]
    Unknown {
        /// What it was.
        what: String,
    },
    /// `Buckets` of the wrong length.
    #[error("bucket digests are {len} bytes, expected 8192")]
    BadBuckets {
        /// The length received.
        len: usize,
    },
    /// `Entries` records that are not whole 48-byte records.
    #[error("entry records are {len} bytes, not a multiple of 48")]
    BadEntries {
        /// The length received.
        len: usize,
    },
    /// An entry for a document outside the buckets the message covers.
    #[error("entry for {doc} outside the buckets covered")]
    EntryOutsideBuckets {
        /// The document.
        doc: DocId,
    },
    /// More documents in one `Snapshots` than allowed.
    #[error("{count} document snapshots in one message, at most {max}")]
    TooManySnapshots {
        /// How many came.
        count: usize,
        /// The maximum.
        max: usize,
    },
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The peer speaks another protocol version.
    #[error("the peer speaks sync protocol version {theirs}, this device version {ours}")]
    Incompatible {
        /// Ours.
        ours: u8,
        /// Theirs.
        theirs: u8,
    },
    /// The peer refused the session.
    #[error("refused by the peer: {reason}")]
    RefusedByPeer {
        /// Its reason.
        reason: String,
    },
    /// We refused the peer.
    #[error("refused: {reason}")]
    Refused {
        /// Our reason.
        reason: String,
    },
    /// The peer broke the protocol.
    #[error("protocol violation: {0}")]
    Violation(#[from] Violation),
    /// An Automerge message that does not decode or apply.
    #[error("bad sync message for {doc}: {source}")]
    BadDoc {
        /// The document.
        doc: DocId,
        /// What the sync state machine said.
        source: SyncError,
    },
    /// A snapshot that does not load.
    #[error("bad snapshot of {doc}: {reason}")]
    BadSnapshot {
        /// The document.
        doc: DocId,
        /// Why it did not load.
        reason: String,
    },
    /// The session was used wrongly (after it closed): a bug on our side.
    #[error("sync session misuse: {0}")]
    Misuse(&'static str),
}

impl SessionError {
    /// Who is to blame.
    pub fn blame(&self) -> Blame {
        match self {
            SessionError::Incompatible { .. } => Blame::Incompatible,
            SessionError::RefusedByPeer { .. } | SessionError::Refused { .. } => Blame::Decision,
            SessionError::Violation(_)
            | SessionError::BadDoc { .. }
            | SessionError::BadSnapshot { .. } => Blame::Peer,
            SessionError::Misuse(_) => Blame::OurBug,
        }
    }

    /// The document whose empty placeholder the caller should drop if it was never stored
    /// (after a bad `Doc` message for a document this side did not have).
    pub fn forget_unstored(&self) -> Option<DocId> {
        match self {
            SessionError::BadDoc { doc, .. } => Some(*doc),
            _ => None,
        }
    }
}

/// The handshake failed: the error, and the `Refused` to send the peer (if any) before closing.
#[derive(Debug)]
pub struct HandshakeError<H, E> {
    /// Send this, then close.
    pub reply: Option<Msg<H, E>>,
    /// Why.
    pub error: SessionError,
}
