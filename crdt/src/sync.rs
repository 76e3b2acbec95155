//! The per-peer, per-document Automerge sync state machine. Pure: the caller moves the bytes.
//!
//! Keep one [`PeerDocState`] per (peer, document). Loop: [`generate`] and send while it returns
//! `Some`, feed every message received to [`receive`], and stop when neither side has anything
//! to send. After a local change call [`generate`] again to push it.
//!
//! Persist the state with [`PeerDocState::encode`] when a session ends. Only the heads both
//! sides had in common survive (per-connection fields reset on decode, as Automerge intends);
//! that is enough to make the next session cost in proportion to what changed.
//!
//! ```
//! use iom_crdt::{Document, DocKind, sync::{self, PeerDocState}};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut a = Document::new(DocKind::Generic, b"device-a", 1)?;
//! a.put_json("greeting", "hi".into(), "say hi", 2)?;
//! let mut b = Document::empty(b"device-b")?;
//! let (mut sa, mut sb) = (PeerDocState::new(), PeerDocState::new());
//! loop {
//!     let a_to_b = sync::generate(&a, &mut sa);
//!     if let Some(m) = &a_to_b { sync::receive(&mut b, &mut sb, m)?; }
//!     let b_to_a = sync::generate(&b, &mut sb);
//!     if let Some(m) = &b_to_a { sync::receive(&mut a, &mut sa, m)?; }
//!     if a_to_b.is_none() && b_to_a.is_none() { break; }
//! }
//! assert_eq!(b.get_json("greeting")?, Some("hi".into()));
//! # Ok(()) }
//! ```

use automerge::ChangeHash;
use automerge::sync::{self as am_sync, SyncDoc};

use crate::document::Document;

/// Errors of the sync state machine, by who is at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    /// The peer sent bytes that are not a sync message (peer at fault: close and score).
    #[error("malformed sync message: {0}")]
    Malformed(#[source] am_sync::ReadMessageError),
    /// The message decoded but its changes could not be applied (peer at fault).
    #[error("sync message rejected: {0}")]
    Rejected(#[source] Box<automerge::AutomergeError>),
    /// Persisted state bytes are corrupt (local storage at fault; start from a fresh state).
    #[error("corrupt persisted sync state: {0}")]
    BadState(#[source] am_sync::DecodeStateError),
}

/// What [`receive`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceiveOutcome {
    /// The document gained changes (persist them and tell other peers).
    pub changed: bool,
}

/// Sync state for one peer and one document.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerDocState(am_sync::State);

impl PeerDocState {
    /// A fresh state (first contact, or after losing the persisted one).
    pub fn new() -> PeerDocState {
        PeerDocState(am_sync::State::new())
    }

    /// Bytes to persist between sessions.
    pub fn encode(&self) -> Vec<u8> {
        self.0.encode()
    }

    /// Restores a persisted state.
    pub fn decode(bytes: &[u8]) -> Result<PeerDocState, SyncError> {
        am_sync::State::decode(bytes)
            .map(PeerDocState)
            .map_err(SyncError::BadState)
    }

    /// Heads both sides are known to have.
    pub fn shared_heads(&self) -> &[ChangeHash] {
        &self.0.shared_heads
    }

    /// The peer's heads, as last reported in this session.
    pub fn their_heads(&self) -> Option<&[ChangeHash]> {
        self.0.their_heads.as_deref()
    }

    /// Restores a persisted state for a new session, assuming the peer still holds exactly the
    /// heads both had in common ([`PeerDocState::shared_heads`]). Automerge's own restore
    /// ([`PeerDocState::decode`]) knows nothing of the peer, so the first message of a session
    /// carries no changes and a change made while apart takes four messages (heads, need,
    /// changes, acknowledgement); with this assumption the first message carries the changes
    /// since the shared heads, and the other side's reply settles it. If the peer has more
    /// (from a third device) it sends that; if it has less (it lost data) it answers with a
    /// reset and the exchange starts over, as Automerge intends.
    pub fn resume(bytes: &[u8]) -> Result<PeerDocState, SyncError> {
        let mut st = PeerDocState::decode(bytes)?;
        let shared = st.0.shared_heads.clone();
        st.0.their_need = Some(Vec::new());
        st.0.their_have = Some(vec![am_sync::Have {
            last_sync: shared,
            bloom: am_sync::BloomFilter::default(),
        }]);
        st.0.their_capabilities = Some(current_capabilities());
        Ok(st)
    }

    /// The state of both sides right after one of them sent the other a whole document whose
    /// heads are `heads` (an iom snapshot transfer, which replaces the sync protocol's rounds
    /// for a document the peer did not have). Both sides know the other holds exactly `heads`
    /// and nothing else of this document, so [`generate`] stays silent until something
    /// changes, and the next change travels in one message.
    ///
    /// Only use it for what is known to be true: if the peer ends up holding more (a
    /// concurrent change), the normal exchange corrects it, at the cost of a round trip.
    pub fn after_snapshot(heads: &[ChangeHash]) -> PeerDocState {
        let mut heads = heads.to_vec();
        heads.sort_unstable();
        PeerDocState(am_sync::State {
            shared_heads: heads.clone(),
            last_sent_heads: heads.clone(),
            their_heads: Some(heads.clone()),
            their_need: Some(Vec::new()),
            their_have: Some(vec![am_sync::Have {
                last_sync: heads,
                bloom: am_sync::BloomFilter::default(),
            }]),
            have_responded: true,
            their_capabilities: Some(current_capabilities()),
            ..am_sync::State::default()
        })
    }
}

/// Every iom node runs this Automerge: a peer speaks the current messages.
fn current_capabilities() -> Vec<am_sync::Capability> {
    vec![
        am_sync::Capability::MessageV1,
        am_sync::Capability::MessageV2,
        am_sync::Capability::SyncReset,
    ]
}

/// The next message to send to the peer, or `None` if there is nothing to send now.
pub fn generate(doc: &Document, state: &mut PeerDocState) -> Option<Vec<u8>> {
    doc.automerge()
        .generate_sync_message(&mut state.0)
        .map(am_sync::Message::encode)
}

/// Applies a message from the peer. Never panics on bad bytes; errors are the peer's fault.
pub fn receive(
    doc: &mut Document,
    state: &mut PeerDocState,
    message: &[u8],
) -> Result<ReceiveOutcome, SyncError> {
    let message = am_sync::Message::decode(message).map_err(SyncError::Malformed)?;
    let before = doc.heads();
    doc.automerge_mut()
        .receive_sync_message(&mut state.0, message)
        .map_err(|e| SyncError::Rejected(Box::new(e)))?;
    Ok(ReceiveOutcome {
        changed: doc.heads() != before,
    })
}

/// True if `heads` (a document's heads, sorted, as [`Document::heads`] gives them) are exactly
/// the heads last shared with the peer (`state`'s [`PeerDocState::shared_heads`]): if the peer
/// still holds them too, we have nothing it lacks, and its first message of a session can come
/// before ours. A state that shares nothing (a fresh one) only matches an empty document.
pub fn nothing_new_for_peer(heads: &[ChangeHash], state: &PeerDocState) -> bool {
    let mut shared = state.shared_heads().to_vec();
    shared.sort_unstable();
    shared == heads
}

/// True if the peer reported exactly our heads in this session (nothing left to exchange).
pub fn in_sync(doc: &Document, state: &PeerDocState) -> bool {
    let ours = doc.heads();
    match state.their_heads() {
        Some(theirs) => {
            let mut theirs = theirs.to_vec();
            theirs.sort_unstable();
            theirs == ours
        }
        None => false,
    }
}

#[cfg(test)]
mod tests;
