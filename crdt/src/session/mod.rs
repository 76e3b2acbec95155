//! One sync session with one peer, as a sans-I/O state machine (rustls style): the caller moves
//! the bytes, runs the [`Action`]s and feeds the results back; this module decides.
//!
//! # States
//!
//! ```text
//!   ExpectHello ──Hello (same version)──▶ CheckHello ──admit──▶ Established ──error──▶ closed
//!        │                                    │
//!        └── anything else: refused ──────────┴── refuse: Refused sent
//! ```
//!
//! - [`ExpectHello`]: the opener ([`Role::Initiator`]) has sent its `Hello`
//!   ([`ExpectHello::initiate`]); the other side ([`Role::Responder`]) waits for one
//!   ([`ExpectHello::accept`]). [`ExpectHello::handle`] checks the version: a mismatch, a
//!   `Refused` or any other message ends the handshake with a [`HandshakeError`] that names the
//!   [`Blame`] and the `Refused` to send back, if any.
//! - [`CheckHello`]: the version is right; whether the peer is trusted is the caller's decision
//!   (it needs the trust book). [`CheckHello::admit`] or [`CheckHello::refuse`].
//! - [`Established`]: messages in either direction at any time. It owns what this module knows
//!   of the exchange: the queue of control messages to send (coalesced, so a flood of requests
//!   queues at most one answer each), the *dirty* queue (documents to run Automerge sync for),
//!   the *snapshot* queue (documents the peer has none of, to send whole), the inventory
//!   decisions (`Root` → `Buckets` → `Entries` → which documents go whole and which by sync), and
//!   the per-document [`PeerDocState`]s. Every received message is either handled or refused
//!   with a [`SessionError`] that says who is to blame; none is dropped.
//!
//! # Driving a session
//!
//! Received: [`Established::handle`] returns [`Action`]s (apply an Automerge message to a
//! document, store snapshots, persist a state, apply a message only the caller understands).
//! The caller runs each and reports back ([`Established::received`],
//! [`Established::snapshots_received`]).
//!
//! Sending is pull-based: when the stream can take a frame the caller asks
//! [`Established::poll_transmit`], which hands out, in this order, a ready message, a queued
//! control message, a dirty document to generate for (the caller runs [`crate::sync::generate`]
//! with the handed-out state and reports with [`Established::generated`]), or a batch of
//! documents to load whole ([`Established::snapshots_loaded`]). Receiving never waits for
//! sending, and everything queued is bounded by the number of documents.
//!
//! A document's state is *checked out* while the caller works on it (an action or a transmit
//! holds it) and checked back in with the report. A message for a checked-out document waits in
//! the session and comes back as an action from the report that frees it, so the two directions
//! never work from two copies of one state.
//!
//! The session is generic over the payload of `Hello` (`H`: identity and certificates) and over
//! the messages it passes through untouched (`E`: certificates, addresses, blob announcements),
//! which keeps this crate free of the wire types.
//!
//! ```
//! use iom_crdt::session::{Action, Config, ExpectHello, Msg, Transmit};
//! use iom_crdt::{DocId, DocKind, Document, Inventory, sync};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // The handshake: `a` opens, `b` admits `a`, `a` admits `b`.
//! let (a, hello) = ExpectHello::initiate::<()>(Config::default(), "a");
//! let b = ExpectHello::accept(Config::default(), "b").handle(hello);
//! let mut b = b.map_err(|e| e.error)?.admit::<()>();
//! let (inv_a, inv_b) = (Inventory::new(), Inventory::new());
//! let Some(Transmit::Send(reply)) = b.poll_transmit(&inv_b) else { unreachable!() };
//! let mut a = a.handle(reply).map_err(|e| e.error)?.admit::<()>();
//!
//! // A document changed on `a`: the writer generates for it when the stream can take it.
//! let doc = DocId::from_bytes([1; 16]);
//! let mut on_a = Document::new(DocKind::Generic, b"device-a", 1)?;
//! on_a.put_json("greeting", "hi".into(), "say hi", 2)?;
//! a.mark_dirty(doc);
//! let Some(Transmit::Generate { doc: d, state, .. }) = a.poll_transmit(&inv_a) else {
//!     unreachable!()
//! };
//! let mut state = state.unwrap_or_default(); // nothing persisted yet
//! let msg = sync::generate(&on_a, &mut state);
//! a.generated(d, state, msg)?;
//! let Some(Transmit::Send(msg)) = a.poll_transmit(&inv_a) else { unreachable!() };
//!
//! // `b` receives it: the action says which document to apply it to, with which state.
//! let mut on_b = Document::empty(b"device-b")?;
//! for action in b.handle(msg, &inv_b)? {
//!     if let Action::Receive { doc, msg, state } = action {
//!         let mut state = state.unwrap_or_default();
//!         let outcome = sync::receive(&mut on_b, &mut state, &msg);
//!         b.received(doc, state, outcome)?; // then: persist, and answer
//!     }
//! }
//! assert!(matches!(b.poll_transmit(&inv_b), Some(Transmit::Generate { .. })));
//! # Ok(()) }
//! ```

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};

use automerge::ChangeHash;

use crate::doc_id::{DOC_ID_LEN, DocId};
use crate::inventory::{self, BUCKETS, Digest32, Inventory};
use crate::sync::{PeerDocState, ReceiveOutcome, SyncError};

mod error;

pub use error::{Blame, HandshakeError, SessionError, Violation};

/// Length of one `Entries` record: doc id and heads digest.
pub const ENTRY_LEN: usize = DOC_ID_LEN + 32;
/// Length of a `Buckets` message's digests.
pub const BUCKETS_LEN: usize = BUCKETS * 32;

/// Which side opened the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// We opened it and speak first.
    Initiator,
    /// The peer opened it.
    Responder,
}

/// Limits and batch sizes of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The sync protocol version this build speaks (sent in `Hello`, required of the peer).
    pub version: u8,
    /// Documents handed out per [`Transmit::LoadSnapshots`].
    pub snapshot_batch: usize,
    /// A `Snapshots` message is closed once it holds this many bytes.
    pub snapshot_frame_bytes: usize,
    /// Most documents in one `Snapshots` message (sent or received).
    pub max_snapshots: usize,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            version: 1,
            snapshot_batch: 256,
            snapshot_frame_bytes: 512 * 1024,
            max_snapshots: 1024,
        }
    }
}

impl Config {
    /// Sets the protocol version.
    pub fn with_version(mut self, version: u8) -> Config {
        self.version = version;
        self
    }

    /// Sets the documents per snapshot batch (at least 1).
    pub fn with_snapshot_batch(mut self, docs: usize) -> Config {
        self.snapshot_batch = docs.max(1);
        self
    }

    /// Sets the byte size at which a `Snapshots` message is closed.
    pub fn with_snapshot_frame_bytes(mut self, bytes: usize) -> Config {
        self.snapshot_frame_bytes = bytes;
        self
    }

    /// Sets the most documents per `Snapshots` message (at least 1).
    pub fn with_max_snapshots(mut self, docs: usize) -> Config {
        self.max_snapshots = docs.max(1);
        self
    }
}

/// A message of the sync protocol, as the session sees it. `H` is the `Hello` payload and `E`
/// the messages the session passes through to the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg<H, E> {
    /// Who the sender is.
    Hello {
        /// The sender's protocol version.
        version: u8,
        /// Identity and certificates (the caller's business).
        hello: H,
    },
    /// The sender refuses the session.
    Refused {
        /// Why (for logs and users).
        reason: String,
    },
    /// The sender's inventory root.
    Root {
        /// Root digest.
        root: Digest32,
    },
    /// The sender's 256 bucket digests, concatenated.
    Buckets {
        /// [`BUCKETS_LEN`] bytes.
        digests: Vec<u8>,
    },
    /// The sender's `(doc, heads digest)` entries of the buckets named.
    Entries {
        /// Bucket numbers covered.
        buckets: Vec<u8>,
        /// [`ENTRY_LEN`]-byte records.
        records: Vec<u8>,
    },
    /// One Automerge sync message for one document.
    Doc {
        /// The document.
        doc: DocId,
        /// The encoded Automerge message.
        msg: Vec<u8>,
    },
    /// Whole documents.
    Snapshots {
        /// `(doc, stored bytes)` pairs.
        docs: Vec<(DocId, Vec<u8>)>,
    },
    /// A message the caller handles (certificates, addresses, blobs).
    Other(E),
    /// A message this build does not know.
    Unknown {
        /// What it was, for the error.
        what: String,
    },
}

impl<H, E> Msg<H, E> {
    /// The message's name, for errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Msg::Hello { .. } => "Hello",
            Msg::Refused { .. } => "Refused",
            Msg::Root { .. } => "Root",
            Msg::Buckets { .. } => "Buckets",
            Msg::Entries { .. } => "Entries",
            Msg::Doc { .. } => "Doc",
            Msg::Snapshots { .. } => "Snapshots",
            Msg::Other(_) => "Other",
            Msg::Unknown { .. } => "Unknown",
        }
    }
}

/// The `Refused` reason sent for a message other than `Hello` before the handshake.
pub const EXPECTED_HELLO: &str = "protocol error: expected Hello";

/// A session waiting for the peer's `Hello`.
#[derive(Debug)]
pub struct ExpectHello<H> {
    role: Role,
    config: Config,
    /// The responder's own `Hello`, sent once the peer is admitted.
    ours: Option<H>,
}

impl<H> ExpectHello<H> {
    /// Opens a session: returns the state and the `Hello` to send first.
    pub fn initiate<E>(config: Config, hello: H) -> (ExpectHello<H>, Msg<H, E>) {
        let msg = Msg::Hello {
            version: config.version,
            hello,
        };
        let state = ExpectHello {
            role: Role::Initiator,
            config,
            ours: None,
        };
        (state, msg)
    }

    /// Answers a session the peer opened; `hello` is sent once the peer is admitted.
    pub fn accept(config: Config, hello: H) -> ExpectHello<H> {
        ExpectHello {
            role: Role::Responder,
            config,
            ours: Some(hello),
        }
    }

    /// Which side we are.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Handles the peer's first message.
    pub fn handle<E>(self, msg: Msg<H, E>) -> Result<CheckHello<H>, HandshakeError<H, E>> {
        match msg {
            Msg::Hello { version, hello } if version == self.config.version => Ok(CheckHello {
                role: self.role,
                config: self.config,
                ours: self.ours,
                theirs: hello,
            }),
            Msg::Hello { version, .. } => {
                let ours = self.config.version;
                Err(HandshakeError {
                    reply: Some(Msg::Refused {
                        reason: format!(
                            "incompatible sync protocol: this device speaks version {ours}, \
                             the peer version {version}"
                        ),
                    }),
                    error: SessionError::Incompatible {
                        ours,
                        theirs: version,
                    },
                })
            }
            Msg::Refused { reason } => Err(HandshakeError {
                reply: None,
                error: SessionError::RefusedByPeer { reason },
            }),
            other => Err(HandshakeError {
                reply: Some(Msg::Refused {
                    reason: EXPECTED_HELLO.into(),
                }),
                error: Violation::ExpectedHello { got: other.name() }.into(),
            }),
        }
    }
}

/// The peer's `Hello` has the right version; the caller decides whether it is trusted.
#[derive(Debug)]
pub struct CheckHello<H> {
    role: Role,
    config: Config,
    ours: Option<H>,
    theirs: H,
}

impl<H> CheckHello<H> {
    /// The peer's `Hello` payload.
    pub fn hello(&self) -> &H {
        &self.theirs
    }

    /// The peer's `Hello` payload, to take what the check consumes (its certificates).
    pub fn hello_mut(&mut self) -> &mut H {
        &mut self.theirs
    }

    /// Which side we are.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Admits the peer. A responder's first message is its own `Hello`; then, on both sides,
    /// whatever the caller queues and the inventory root ([`Established::queue_root`]).
    pub fn admit<E>(self) -> Established<H, E> {
        let mut session = Established::new(self.config);
        if let Some(hello) = self.ours {
            session.outbox.push_back(Out::Msg(Msg::Hello {
                version: session.config.version,
                hello,
            }));
        }
        session
    }

    /// Refuses the peer: the `Refused` to send and the error that ends the session.
    pub fn refuse<E>(self, reason: impl Into<String>) -> HandshakeError<H, E> {
        let reason = reason.into();
        HandshakeError {
            reply: Some(Msg::Refused {
                reason: reason.clone(),
            }),
            error: SessionError::Refused { reason },
        }
    }
}

/// What the caller must do for a received message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action<E> {
    /// Apply a message the session does not interpret (certificates, addresses, blobs).
    Apply(E),
    /// Apply an Automerge sync message to `doc` (creating it empty if missing) with `state`,
    /// then report with [`Established::received`]. `state: None`: use the persisted state
    /// ([`PeerDocState::resume`]) if there is one, else a fresh one.
    Receive {
        /// The document.
        doc: DocId,
        /// The encoded Automerge message.
        msg: Vec<u8>,
        /// The checked-out state.
        state: Option<PeerDocState>,
    },
    /// Store whole documents (load each, which verifies it; merge into a document that
    /// exists), then report with [`Established::snapshots_received`].
    StoreSnapshots {
        /// `(doc, bytes)` pairs, in order.
        docs: Vec<(DocId, Vec<u8>)>,
    },
    /// Persist `doc`'s state (encoded), so a reconnect costs only what changed.
    Persist {
        /// The document.
        doc: DocId,
        /// [`PeerDocState::encode`] bytes.
        state: Vec<u8>,
    },
    /// Drop the empty placeholder of `doc` if it was never stored (a bad message for a document
    /// this side did not have).
    ForgetUnstored {
        /// The document.
        doc: DocId,
    },
}

/// What to send next ([`Established::poll_transmit`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transmit<H, E> {
    /// Send this message.
    Send(Msg<H, E>),
    /// Run [`crate::sync::generate`] on `doc` with `state` (`None`: the persisted or a fresh
    /// state, as for [`Action::Receive`]), then report with [`Established::generated`].
    Generate {
        /// The document.
        doc: DocId,
        /// The checked-out state.
        state: Option<PeerDocState>,
        /// The inventories differ on `doc` and this session has said nothing about it yet.
        /// If the persisted state shows we hold nothing the peer lacks
        /// ([`crate::sync::nothing_new_for_peer`] on a resumed state), the caller may send
        /// nothing and report with [`Established::wait_for_peer`] instead: the peer, which
        /// holds something we lack, speaks first (see [`Established::speak_waiting`]).
        may_wait: bool,
    },
    /// Read these documents' stored bytes and heads, then report with
    /// [`Established::snapshots_loaded`].
    LoadSnapshots {
        /// The documents.
        docs: Vec<DocId>,
    },
}

/// A document read whole for the peer ([`Established::snapshots_loaded`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    /// The document.
    pub doc: DocId,
    /// Its heads.
    pub heads: Vec<ChangeHash>,
    /// Its stored bytes (loadable as one document).
    pub bytes: Vec<u8>,
}

/// What storing received snapshots did ([`Established::snapshots_received`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotsStored {
    /// Documents new here, with their heads (exactly the sender's).
    pub new: Vec<(DocId, Vec<ChangeHash>)>,
    /// Documents that existed here and were merged.
    pub merged: Vec<DocId>,
    /// The first document that did not load, and why (nothing after it was looked at).
    pub rejected: Option<(DocId, String)>,
}

/// A queued control message. Replies are computed when sent, from the inventory then.
#[derive(Debug)]
enum Out<H, E> {
    Msg(Msg<H, E>),
    Root,
    Buckets,
    Entries(BTreeSet<u8>),
}

/// A FIFO of documents, each at most once.
#[derive(Debug, Default)]
struct DocQueue {
    order: VecDeque<DocId>,
    set: HashSet<DocId>,
}

impl DocQueue {
    fn mark(&mut self, doc: DocId) {
        if self.set.insert(doc) {
            self.order.push_back(doc);
        }
    }

    fn pop(&mut self) -> Option<DocId> {
        let doc = self.order.pop_front()?;
        self.set.remove(&doc);
        Some(doc)
    }

    fn len(&self) -> usize {
        self.order.len()
    }

    fn contains(&self, doc: &DocId) -> bool {
        self.set.contains(doc)
    }
}

/// One document's state in this session.
#[derive(Debug)]
enum Slot {
    /// Here, not in use.
    Idle(PeerDocState),
    /// Handed out to the caller.
    Busy {
        /// Received messages waiting for the state.
        pending: VecDeque<Vec<u8>>,
        /// The document became dirty while the state was out.
        redirty: bool,
        /// Snapshot heads learned while the state was out: the state to keep on check-in.
        replace: Option<PeerDocState>,
    },
}

/// An admitted session: messages in both directions.
#[derive(Debug)]
pub struct Established<H, E> {
    config: Config,
    /// Messages to send before anything else (a generated message, snapshot frames).
    ready: VecDeque<Msg<H, E>>,
    outbox: VecDeque<Out<H, E>>,
    dirty: DocQueue,
    snapshots: DocQueue,
    states: HashMap<DocId, Slot>,
    /// Documents the peer listed that we hold none of and that have not arrived yet (what a
    /// first sync still has to receive).
    incoming: HashSet<DocId>,
    /// Whether the inventories have been compared once: the peer's root equalled ours, or its
    /// entries arrived (from then on [`incoming`](Self::incoming) is meaningful).
    compared: bool,
    /// Dirty documents the inventory comparison found different before this session had a
    /// state for them: their first generate may wait for the peer ([`Transmit::Generate`]).
    may_wait: HashSet<DocId>,
    /// Documents whose first message waits for the peer's ([`Established::wait_for_peer`]).
    waiting: HashSet<DocId>,
    /// `Doc` messages received in this session.
    doc_messages: u64,
    closed: bool,
}

impl<H, E> Established<H, E> {
    fn new(config: Config) -> Established<H, E> {
        Established {
            config,
            ready: VecDeque::new(),
            outbox: VecDeque::new(),
            dirty: DocQueue::default(),
            snapshots: DocQueue::default(),
            states: HashMap::new(),
            incoming: HashSet::new(),
            compared: false,
            may_wait: HashSet::new(),
            waiting: HashSet::new(),
            doc_messages: 0,
            closed: false,
        }
    }

    /// Whether an error ended the session.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Documents waiting to be sent (by sync or whole).
    pub fn backlog(&self) -> usize {
        self.dirty.len() + self.snapshots.len()
    }

    /// Documents the peer listed that we held none of and that have not arrived from it yet:
    /// what a first sync still has to receive from this peer. (One that arrived from another
    /// peer meanwhile is still listed: check against the inventory.)
    pub fn incoming(&self) -> impl Iterator<Item = &DocId> + '_ {
        self.incoming.iter()
    }

    /// Whether the two inventories have been compared at least once in this session (the
    /// peer's root equalled ours, or its entries arrived): until then [`incoming`] says
    /// nothing yet.
    ///
    /// [`incoming`]: Self::incoming
    pub fn compared(&self) -> bool {
        self.compared
    }

    /// Whether this session holds (or has handed out) a state for `doc`: it has exchanged
    /// something about it.
    pub fn has_state(&self, doc: &DocId) -> bool {
        self.states.contains_key(doc)
    }

    /// Queues a message (sent after the messages queued before it).
    pub fn queue(&mut self, msg: Msg<H, E>) {
        self.outbox.push_back(Out::Msg(msg));
    }

    /// Queues a pass-through message, replacing a queued one for which `same` is true (for
    /// messages that carry a whole set, like certificates: the newest supersedes).
    pub fn queue_replacing(&mut self, msg: E, same: impl Fn(&E) -> bool) {
        for out in &mut self.outbox {
            if let Out::Msg(Msg::Other(queued)) = out
                && same(queued)
            {
                *queued = msg;
                return;
            }
        }
        self.outbox.push_back(Out::Msg(Msg::Other(msg)));
    }

    /// Queues our inventory root (at most one is queued; its value is read when it is sent).
    pub fn queue_root(&mut self) {
        if !self.outbox.iter().any(|o| matches!(o, Out::Root)) {
            self.outbox.push_back(Out::Root);
        }
    }

    /// `doc` changed here (or the peer needs an answer about it): generate for it when the
    /// stream can take a message.
    pub fn mark_dirty(&mut self, doc: DocId) {
        self.may_wait.remove(&doc);
        self.waiting.remove(&doc);
        match self.states.get_mut(&doc) {
            Some(Slot::Busy { redirty, .. }) => *redirty = true,
            _ => self.dirty.mark(doc),
        }
    }

    fn check_open(&self) -> Result<(), SessionError> {
        if self.closed {
            Err(SessionError::Misuse("the session is closed"))
        } else {
            Ok(())
        }
    }

    /// Ends the session with `error` (no later call does anything but report misuse).
    fn fail<T>(&mut self, error: SessionError) -> Result<T, SessionError> {
        self.closed = true;
        Err(error)
    }

    /// Handles a message from the peer. `inventory` is ours, now.
    pub fn handle(
        &mut self,
        msg: Msg<H, E>,
        inventory: &Inventory,
    ) -> Result<Vec<Action<E>>, SessionError> {
        self.check_open()?;
        match msg {
            Msg::Hello { .. } => self.fail(Violation::UnexpectedHello.into()),
            Msg::Refused { reason } => self.fail(SessionError::RefusedByPeer { reason }),
            Msg::Unknown { what } => self.fail(Violation::Unknown { what }.into()),
            Msg::Other(e) => Ok(vec![Action::Apply(e)]),
            Msg::Root { root } => {
                if inventory.root() == root {
                    self.compared = true;
                }
                if inventory.root() != root
                    && !self.outbox.iter().any(|o| matches!(o, Out::Buckets))
                {
                    self.outbox.push_back(Out::Buckets);
                }
                Ok(Vec::new())
            }
            Msg::Buckets { digests } => {
                if digests.len() != BUCKETS_LEN {
                    return self.fail(Violation::BadBuckets { len: digests.len() }.into());
                }
                let theirs: Vec<Digest32> = digests
                    .chunks_exact(32)
                    .filter_map(|c| <Digest32>::try_from(c).ok())
                    .collect();
                let differ = inventory::diff_buckets(&inventory.bucket_hashes(), &theirs);
                if !differ.is_empty() {
                    let pending = self.outbox.iter_mut().find_map(|o| match o {
                        Out::Entries(set) => Some(set),
                        _ => None,
                    });
                    match pending {
                        Some(set) => set.extend(differ),
                        None => self
                            .outbox
                            .push_back(Out::Entries(differ.into_iter().collect())),
                    }
                }
                Ok(Vec::new())
            }
            Msg::Entries { buckets, records } => {
                self.entries(&buckets, &records, inventory)?;
                self.compared = true;
                Ok(Vec::new())
            }
            Msg::Doc { doc, msg } => Ok(self.receive(doc, msg).into_iter().collect()),
            Msg::Snapshots { docs } => {
                if docs.len() > self.config.max_snapshots {
                    return self.fail(
                        Violation::TooManySnapshots {
                            count: docs.len(),
                            max: self.config.max_snapshots,
                        }
                        .into(),
                    );
                }
                if docs.is_empty() {
                    return Ok(Vec::new());
                }
                Ok(vec![Action::StoreSnapshots { docs }])
            }
        }
    }

    /// The peer's entries: every document we hold whose digest differs is sent, whole if the
    /// peer has none of it and this session has exchanged nothing about it, else by sync.
    fn entries(
        &mut self,
        buckets: &[u8],
        records: &[u8],
        inventory: &Inventory,
    ) -> Result<(), SessionError> {
        if !records.len().is_multiple_of(ENTRY_LEN) {
            return self.fail(Violation::BadEntries { len: records.len() }.into());
        }
        let covered: HashSet<u8> = buckets.iter().copied().collect();
        let mut theirs = Vec::with_capacity(records.len() / ENTRY_LEN);
        for r in records.chunks_exact(ENTRY_LEN) {
            let (id, digest) = r.split_at(DOC_ID_LEN);
            let (Ok(doc), Ok(digest)) = (DocId::from_slice(id), <Digest32>::try_from(digest))
            else {
                return self.fail(Violation::BadEntries { len: records.len() }.into());
            };
            if !covered.contains(&doc.bucket()) {
                return self.fail(Violation::EntryOutsideBuckets { doc }.into());
            }
            theirs.push((doc, digest));
        }
        let ours: Vec<(DocId, Digest32)> = covered
            .iter()
            .flat_map(|b| inventory.entries_in(*b))
            .collect();
        let have: HashSet<DocId> = ours.iter().map(|(d, _)| *d).collect();
        let their_docs: HashSet<DocId> = theirs.iter().map(|(d, _)| *d).collect();
        for doc in inventory::diff_entries(&ours, &theirs) {
            if !have.contains(&doc) {
                self.incoming.insert(doc); // only they have it: they send it
                continue;
            }
            if self.has_state(&doc) {
                self.mark_dirty(doc);
            } else if their_docs.contains(&doc) {
                // Both hold it and nothing was said yet: the first message may wait for the
                // peer's, if the persisted state shows the peer is the one with news.
                self.mark_dirty(doc);
                self.may_wait.insert(doc);
            } else {
                self.snapshots.mark(doc);
            }
        }
        Ok(())
    }

    /// A `Doc` message: hands the state out, or keeps the message until the state is back.
    fn receive(&mut self, doc: DocId, msg: Vec<u8>) -> Option<Action<E>> {
        self.doc_messages += 1;
        self.waiting.remove(&doc);
        match self.states.remove(&doc) {
            Some(Slot::Busy {
                mut pending,
                redirty,
                replace,
            }) => {
                pending.push_back(msg);
                self.states.insert(
                    doc,
                    Slot::Busy {
                        pending,
                        redirty,
                        replace,
                    },
                );
                None
            }
            idle => {
                let state = match idle {
                    Some(Slot::Idle(state)) => Some(state),
                    _ => None,
                };
                self.states.insert(doc, Slot::busy());
                Some(Action::Receive { doc, msg, state })
            }
        }
    }

    /// Checks a state back in; returns the next waiting message for it as an action.
    fn check_in(&mut self, doc: DocId, state: PeerDocState) -> Option<Action<E>> {
        let Some(Slot::Busy {
            mut pending,
            redirty,
            replace,
        }) = self.states.remove(&doc)
        else {
            // Not handed out (a report after a restart of the state): keep what came back.
            self.states.insert(doc, Slot::Idle(state));
            return None;
        };
        let state = replace.unwrap_or(state);
        if redirty {
            self.dirty.mark(doc);
        }
        match pending.pop_front() {
            Some(msg) => {
                self.states.insert(
                    doc,
                    Slot::Busy {
                        pending,
                        redirty: false,
                        replace: None,
                    },
                );
                Some(Action::Receive {
                    doc,
                    msg,
                    state: Some(state),
                })
            }
            None => {
                self.states.insert(doc, Slot::Idle(state));
                None
            }
        }
    }

    /// The result of an [`Action::Receive`]: the state back and what applying did. A message
    /// that did not apply ends the session with [`SessionError::BadDoc`] (the peer is to
    /// blame); the caller then drops the document's placeholder if it was never stored
    /// ([`Action::ForgetUnstored`], named by [`SessionError::forget_unstored`]), and the state
    /// from that attempt is discarded (the persisted one stays).
    pub fn received(
        &mut self,
        doc: DocId,
        state: PeerDocState,
        outcome: Result<ReceiveOutcome, SyncError>,
    ) -> Result<Vec<Action<E>>, SessionError> {
        self.check_open()?;
        if let Err(source) = outcome {
            self.states.remove(&doc);
            return self.fail(SessionError::BadDoc { doc, source });
        }
        self.incoming.remove(&doc);
        let mut actions = vec![Action::Persist {
            doc,
            state: state.encode(),
        }];
        // Answer: the next generate tells the peer what we have now.
        self.mark_dirty(doc);
        actions.extend(self.check_in(doc, state));
        Ok(actions)
    }

    /// The result of an [`Action::StoreSnapshots`]. A snapshot that did not load ends the
    /// session (the peer is to blame); the ones before it were kept.
    pub fn snapshots_received(&mut self, stored: SnapshotsStored) -> Result<(), SessionError> {
        self.check_open()?;
        for (doc, heads) in stored.new {
            self.incoming.remove(&doc);
            let state = PeerDocState::after_snapshot(&heads);
            match self.states.get_mut(&doc) {
                Some(Slot::Busy { replace, .. }) => *replace = Some(state),
                _ => {
                    self.states.insert(doc, Slot::Idle(state));
                }
            }
        }
        // Merged into what was here: the usual exchange settles the rest.
        for doc in stored.merged {
            self.mark_dirty(doc);
        }
        match stored.rejected {
            Some((doc, reason)) => self.fail(SessionError::BadSnapshot { doc, reason }),
            None => Ok(()),
        }
    }

    /// The next thing to send, if any: call when the stream can take a message.
    pub fn poll_transmit(&mut self, inventory: &Inventory) -> Option<Transmit<H, E>> {
        if self.closed {
            return None;
        }
        if let Some(msg) = self.ready.pop_front() {
            return Some(Transmit::Send(msg));
        }
        if let Some(out) = self.outbox.pop_front() {
            let msg = match out {
                Out::Msg(msg) => msg,
                Out::Root => Msg::Root {
                    root: inventory.root(),
                },
                Out::Buckets => Msg::Buckets {
                    digests: inventory.bucket_hashes().concat(),
                },
                Out::Entries(buckets) => {
                    let mut records = Vec::new();
                    for b in &buckets {
                        for (doc, digest) in inventory.entries_in(*b) {
                            records.extend_from_slice(doc.as_bytes());
                            records.extend_from_slice(&digest);
                        }
                    }
                    Msg::Entries {
                        buckets: buckets.into_iter().collect(),
                        records,
                    }
                }
            };
            return Some(Transmit::Send(msg));
        }
        if let Some(t) = self.next_dirty() {
            return Some(t);
        }
        let mut docs = Vec::new();
        while docs.len() < self.config.snapshot_batch
            && let Some(doc) = self.snapshots.pop()
        {
            if self.has_state(&doc) {
                // Exchanged something meanwhile: sync it instead.
                self.mark_dirty(doc);
            } else {
                docs.push(doc);
            }
        }
        if docs.is_empty() {
            self.next_dirty()
        } else {
            Some(Transmit::LoadSnapshots { docs })
        }
    }

    /// Hands out the next dirty document that is not in use.
    fn next_dirty(&mut self) -> Option<Transmit<H, E>> {
        while let Some(doc) = self.dirty.pop() {
            match self.states.remove(&doc) {
                Some(Slot::Busy {
                    pending, replace, ..
                }) => {
                    // In use: generate once it is back.
                    self.states.insert(
                        doc,
                        Slot::Busy {
                            pending,
                            redirty: true,
                            replace,
                        },
                    );
                }
                idle => {
                    let state = match idle {
                        Some(Slot::Idle(state)) => Some(state),
                        _ => None,
                    };
                    let may_wait = self.may_wait.remove(&doc) && state.is_none();
                    self.states.insert(doc, Slot::busy());
                    return Some(Transmit::Generate {
                        doc,
                        state,
                        may_wait,
                    });
                }
            }
        }
        None
    }

    /// The result of a [`Transmit::Generate`]: the state back and the message generated, if
    /// any (`None` also when the document is gone). Returns what to do next (a message that
    /// waited for the state); the generated message is the next [`Established::poll_transmit`].
    pub fn generated(
        &mut self,
        doc: DocId,
        state: PeerDocState,
        msg: Option<Vec<u8>>,
    ) -> Result<Vec<Action<E>>, SessionError> {
        self.check_open()?;
        if let Some(msg) = msg {
            self.ready.push_back(Msg::Doc { doc, msg });
        }
        Ok(self.check_in(doc, state).into_iter().collect())
    }

    /// Instead of [`Established::generated`], for a [`Transmit::Generate`] with `may_wait`:
    /// nothing was sent, because the persisted state shows we hold nothing the peer lacks.
    /// The state is checked in and the document waits for the peer's message, which is then
    /// answered as usual. If the peer waits too (both sides' persisted states are at their
    /// own heads, yet the heads differ: one side was restored from an older backup), nobody
    /// would speak: [`Established::speak_waiting`] ends that.
    pub fn wait_for_peer(
        &mut self,
        doc: DocId,
        state: PeerDocState,
    ) -> Result<Vec<Action<E>>, SessionError> {
        self.check_open()?;
        let pending = matches!(
            self.states.get(&doc),
            Some(Slot::Busy { pending, redirty, .. }) if !pending.is_empty() || *redirty
        );
        if !pending {
            // A message that came meanwhile, or a change here, is answered the usual way.
            self.waiting.insert(doc);
        }
        Ok(self.check_in(doc, state).into_iter().collect())
    }

    /// Documents waiting for the peer's first message ([`Established::wait_for_peer`]).
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// `Doc` messages received so far in this session: the caller calls
    /// [`Established::speak_waiting`] when this has not moved for a while.
    pub fn doc_messages_received(&self) -> u64 {
        self.doc_messages
    }

    /// The peer sent nothing about the documents that wait for it: generate for them after
    /// all (with the state checked in, so they cannot wait again).
    pub fn speak_waiting(&mut self) {
        for doc in std::mem::take(&mut self.waiting) {
            self.mark_dirty(doc);
        }
    }

    /// The result of a [`Transmit::LoadSnapshots`]: the documents read, and the ones that are
    /// too big to send whole or gone (they are synced the usual way). The `Snapshots` messages
    /// are the next [`Established::poll_transmit`]s.
    pub fn snapshots_loaded(&mut self, loaded: Vec<Loaded>, other: Vec<DocId>) {
        if self.closed {
            return;
        }
        for doc in other {
            self.mark_dirty(doc);
        }
        let mut frame: Vec<(DocId, Vec<u8>)> = Vec::new();
        let mut size = 0;
        for snap in loaded {
            if self.has_state(&snap.doc) {
                // Exchanged something while it was read: sync it instead.
                self.mark_dirty(snap.doc);
                continue;
            }
            // Both sides will hold exactly these heads: later changes travel in one message.
            self.states.insert(
                snap.doc,
                Slot::Idle(PeerDocState::after_snapshot(&snap.heads)),
            );
            size += snap.bytes.len();
            frame.push((snap.doc, snap.bytes));
            if size >= self.config.snapshot_frame_bytes || frame.len() >= self.config.max_snapshots
            {
                let docs = std::mem::take(&mut frame);
                size = 0;
                self.ready.push_back(Msg::Snapshots { docs });
            }
        }
        if !frame.is_empty() {
            self.ready.push_back(Msg::Snapshots { docs: frame });
        }
    }

    /// Takes every state this session holds (not the ones handed out), to persist them at the
    /// end of the session.
    pub fn take_states(&mut self) -> Vec<(DocId, PeerDocState)> {
        let mut out = Vec::new();
        self.states.retain(|doc, slot| match slot {
            Slot::Idle(state) => {
                out.push((*doc, std::mem::take(state)));
                false
            }
            Slot::Busy { .. } => true,
        });
        out
    }

    /// Whether `doc` waits to be sent by sync.
    pub fn is_dirty(&self, doc: &DocId) -> bool {
        self.dirty.contains(doc)
    }

    /// Whether `doc` waits to be sent whole.
    pub fn is_snapshot_queued(&self, doc: &DocId) -> bool {
        self.snapshots.contains(doc)
    }
}

impl Slot {
    fn busy() -> Slot {
        Slot::Busy {
            pending: VecDeque::new(),
            redirty: false,
            replace: None,
        }
    }
}

#[cfg(test)]
mod tests;
