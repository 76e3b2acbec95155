//! One sync session with one trusted peer over a `/iom/sync/1` stream: the driver of the pure
//! state machine in [`iom_crdt::session`]. The driver only moves frames and runs the actions the
//! state machine returns; every decision (what to answer, what goes whole, which state to use)
//! is made there.
//!
//! After the handshake two tasks share the state machine (behind a mutex never held across an
//! `.await`):
//!
//! - the **reader** reads a frame, hands the message to [`Established::handle`] and runs the
//!   actions (apply to a document, store snapshots, add certificates or addresses, want blobs).
//!   It never waits on the writer: what it wants sent is queued in the state machine, which
//!   coalesces replies and keeps per-document work in its dirty set.
//! - the **writer** asks [`Established::poll_transmit`] for the next message whenever the stream
//!   can take one (generating Automerge messages and reading snapshots on demand), and sleeps on
//!   a [`Notify`] when there is nothing to send.
//!
//! Everything the session sends at set-up (certificates, addresses, root) is queued in the
//! state machine before the writer starts: nothing waits on a bounded channel that no task
//! drains yet. Each `Hello` carries the digest of the sender's blobs (read from the store's
//! running totals, no walk): when both are equal, neither side announces anything. Otherwise
//! our blobs are announced last, by the writer, one page read from the store at a time
//! whenever it has nothing else to send: a store of any size costs a session one page of
//! memory, and documents never wait behind announcements. Messages other services broadcast (`SessionHandle::queue`) are
//! queued the same way, so none is dropped; certificate sets supersede each other.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use iom_crdt::ChangeHash;
use iom_crdt::DocId;
use iom_crdt::session::{
    self as machine, Action, Blame, CheckHello, ExpectHello, HandshakeError, Loaded, Role,
    SessionError, SnapshotsStored, Transmit,
};
use iom_crdt::sync::{PeerDocState, generate, nothing_new_for_peer, receive};
use iom_protocol::blobset::BlobSetDigest;
use iom_protocol::cert::Certificate;
use iom_protocol::frame::EncodeError;
use iom_protocol::id::ContentId;
use iom_protocol::keys::{DeviceId, PersonId};
use iom_protocol::wire::{
    DocSnapshot, MAX_BLOB_ANNOUNCE, MAX_PEER_ADDRS, MAX_SNAPSHOTS, MAX_SYNC_FRAME, PeerAddrs,
    SYNC_VERSION, SyncMsg,
};
use libp2p::{Multiaddr, PeerId};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::gate::{Gate, Verdict};
use super::peer_quiet::PeerQuiet;
use super::working_set::WorkingSet;
use crate::docs::{DocPin, Docs, DocsError};
use crate::net::framed::{FramedError, read_frame, write_frame_unflushed};
use crate::store::Store;
use crate::trust::TrustBook;

/// The protocol name the gate counts refusals under.
const PROTOCOL: &str = "/iom/sync/1";

/// Messages read ahead of the one being handled; also the most handled as one batch.
const READ_AHEAD: usize = 128;
/// The most received Automerge messages applied in one blocking hop and store transaction.
const RECEIVE_BATCH: usize = 64;
/// The most documents generated for in one blocking hop.
const GENERATE_BATCH: usize = 64;

/// The most documents one session keeps loaded while it exchanges them.
const WORKING_SET: usize = 2048;
/// A session quiet (nothing sent, nothing received) this long lets its documents go.
const RELEASE_WHEN_QUIET: Duration = Duration::from_secs(2);
/// Buffer of each direction of an established session: the writer's frames go out together
/// until it is about to wait (or this fills), and the reader reads many frames per poll of
/// the stream.
const IO_BUFFER: usize = 64 * 1024;

/// A received Automerge message and the state handed out with it (if any).
type Received = (Vec<u8>, Option<PeerDocState>);

/// What a session needs of the network.
pub trait Network: Send + Sync + 'static {
    /// Our own peer id.
    fn local_peer(&self) -> PeerId;
    /// Closes every connection to `peer`.
    fn disconnect(&self, peer: PeerId) -> BoxFuture<'_, ()>;
    /// Tells the network where `peer` can be reached.
    fn add_addresses(&self, peer: PeerId, addrs: Vec<Multiaddr>) -> BoxFuture<'_, ()>;
    /// Every peer the network knows addresses of.
    fn known_addresses(&self) -> Vec<(PeerId, Vec<Multiaddr>)>;
}

/// What a session needs of the blob service.
pub trait BlobHandle: Send + Sync + 'static {
    /// Up to `max` local blobs with their lengths, in id order, after `after` (from the first
    /// with `None`): one page of announcements. A storage error reads as no more blobs.
    fn announcement_page(&self, after: Option<ContentId>, max: usize) -> Vec<(ContentId, u64)>;
    /// Whether the blob is here (a storage error counts as not here: the fetch reports it).
    fn has(&self, id: &ContentId) -> bool;
    /// `peer` announced a blob that is not here.
    fn want(&self, id: ContentId, len: u64, peer: PeerId);
    /// Bytes of blobs `peer` announced that are not here yet.
    fn pending_bytes_from(&self, peer: &PeerId) -> u64;
    /// The digest of the local blobs (`None` if it cannot be read: the session then announces
    /// every blob, as to a peer that sends no digest).
    fn digest(&self) -> Option<BlobSetDigest>;
}

/// Settings of the sync sessions.
#[derive(Debug, Clone)]
pub struct SyncConfig {
    /// How long to wait for the peer's `Hello`.
    pub hello_timeout: Duration,
    /// How long the higher peer id waits before opening a session itself (the lower one
    /// opens at once).
    pub open_grace: Duration,
    /// A document bigger than this is synced the usual way instead of as a snapshot.
    pub max_snapshot_doc: usize,
    /// Tell peers where the other trusted devices are (off only to test relayed paths).
    pub share_addrs: bool,
    /// Fault injection: send a garbage Automerge message on every session.
    pub fault_garbage_sync: bool,
    /// Fault injection: send a garbage document snapshot on every session.
    pub fault_garbage_snapshot: bool,
}

impl Default for SyncConfig {
    fn default() -> SyncConfig {
        SyncConfig {
            hello_timeout: Duration::from_secs(15),
            open_grace: Duration::from_millis(750),
            max_snapshot_doc: 4 * 1024 * 1024,
            share_addrs: true,
            fault_garbage_sync: false,
            fault_garbage_snapshot: false,
        }
    }
}

/// The `Hello` payload: who the sender is, and the digest of its blobs.
#[derive(Debug, Clone)]
pub(crate) struct HelloInfo {
    person: PersonId,
    chain: Vec<Certificate>,
    blobs: Option<BlobSetDigest>,
}

/// The messages the state machine passes through to the driver.
#[derive(Debug, Clone)]
pub(crate) enum Extra {
    Certs(Vec<Certificate>),
    Addrs(Vec<PeerAddrs>),
    Blobs(Vec<(ContentId, u64)>),
}

type Msg = machine::Msg<HelloInfo, Extra>;
type Established = machine::Established<HelloInfo, Extra>;

fn from_wire(msg: SyncMsg) -> Msg {
    match msg {
        SyncMsg::Hello {
            version,
            person,
            chain,
            blobs,
        } => Msg::Hello {
            version,
            hello: HelloInfo {
                person,
                chain,
                blobs,
            },
        },
        SyncMsg::Refused { reason } => Msg::Refused { reason },
        SyncMsg::Certs { certs } => Msg::Other(Extra::Certs(certs)),
        SyncMsg::Addrs { peers } => Msg::Other(Extra::Addrs(peers)),
        SyncMsg::Root { root } => Msg::Root { root },
        SyncMsg::Buckets { digests } => Msg::Buckets { digests },
        SyncMsg::Entries { buckets, records } => Msg::Entries { buckets, records },
        SyncMsg::Doc { doc, msg } => Msg::Doc {
            doc: DocId::from_bytes(doc),
            msg,
        },
        SyncMsg::Snapshots { docs } => Msg::Snapshots {
            docs: docs
                .into_iter()
                .map(|s| (DocId::from_bytes(s.doc), s.bytes))
                .collect(),
        },
        SyncMsg::Blobs { have } => Msg::Other(Extra::Blobs(have)),
        other => Msg::Unknown {
            what: format!("{other:?}").chars().take(40).collect(),
        },
    }
}

fn to_wire(msg: Msg) -> Result<SyncMsg, DriveError> {
    Ok(match msg {
        Msg::Hello { version, hello } => SyncMsg::Hello {
            version,
            person: hello.person,
            chain: hello.chain,
            blobs: hello.blobs,
        },
        Msg::Refused { reason } => SyncMsg::Refused { reason },
        Msg::Root { root } => SyncMsg::Root { root },
        Msg::Buckets { digests } => SyncMsg::Buckets { digests },
        Msg::Entries { buckets, records } => SyncMsg::Entries { buckets, records },
        Msg::Doc { doc, msg } => SyncMsg::Doc {
            doc: *doc.as_bytes(),
            msg,
        },
        Msg::Snapshots { docs } => SyncMsg::Snapshots {
            docs: docs
                .into_iter()
                .map(|(doc, bytes)| DocSnapshot {
                    doc: *doc.as_bytes(),
                    bytes,
                })
                .collect(),
        },
        Msg::Other(Extra::Certs(certs)) => SyncMsg::Certs { certs },
        Msg::Other(Extra::Addrs(peers)) => SyncMsg::Addrs { peers },
        Msg::Other(Extra::Blobs(have)) => SyncMsg::Blobs { have },
        Msg::Unknown { .. } => return Err(DriveError::Bug("asked to send an unknown message")),
    })
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DriveError {
    /// Reading or writing a frame failed, or the peer sent undecodable bytes.
    #[error(transparent)]
    Framed(#[from] FramedError),
    /// The state machine ended the session.
    #[error(transparent)]
    Session(#[from] SessionError),
    /// A document operation failed here.
    #[error(transparent)]
    Docs(#[from] DocsError),
    /// The peer sent no `Hello` in time.
    #[error("no Hello within {0:?}")]
    HelloTimeout(Duration),
    /// The stream ended before the handshake.
    #[error("stream closed before Hello")]
    ClosedBeforeHello,
    /// The peer's certificates no longer make it trusted.
    #[error("peer is no longer trusted")]
    NoLongerTrusted,
    /// A message could not be encoded (our bug).
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// The driver misused the state machine, or a task of it panicked (our bug).
    #[error("sync driver bug: {0}")]
    Bug(&'static str),
    /// A task of the session was cancelled: the runtime is shutting down.
    #[error("the node is shutting down")]
    ShuttingDown,
}

/// A joined task's result: a panic is our bug (`what` says which task), a cancellation is the
/// runtime shutting down (not a panic, and not logged as one).
fn joined<T>(r: Result<T, tokio::task::JoinError>, what: &'static str) -> Result<T, DriveError> {
    r.map_err(|e| {
        if e.is_panic() {
            DriveError::Bug(what)
        } else {
            DriveError::ShuttingDown
        }
    })
}

impl DriveError {
    /// Whether the peer is to blame (disconnect it).
    pub(crate) fn is_peer_fault(&self) -> bool {
        match self {
            DriveError::Framed(e) => e.is_peer_fault(),
            DriveError::Session(e) => e.blame() == Blame::Peer,
            _ => false,
        }
    }
}

/// Traffic counters of a session.
#[derive(Debug, Default)]
pub struct Stats {
    /// Bytes received.
    pub bytes_in: AtomicU64,
    /// Bytes sent.
    pub bytes_out: AtomicU64,
    /// Automerge messages received.
    pub docs_received: AtomicU64,
    /// Whole documents received (snapshots, for documents this node did not have).
    pub snapshots_received: AtomicU64,
}

/// What the reader, the writer and the manager share of a session.
pub(crate) struct Shared {
    session: Mutex<Established>,
    /// Wakes the writer: something may be ready to send.
    wake: Notify,
    /// Ends the session (cancelled by either task, the manager, or shutdown).
    stop: CancellationToken,
    pub(crate) stats: Stats,
    /// The documents being exchanged, kept loaded ([`WORKING_SET`] at most).
    working: Mutex<WorkingSet<DocPin>>,
}

impl Shared {
    fn new(session: Established, stop: CancellationToken, stats: Stats) -> Shared {
        Shared {
            session: Mutex::new(session),
            wake: Notify::new(),
            stop,
            stats,
            working: Mutex::new(WorkingSet::new(WORKING_SET)),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Established> {
        self.session.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn working(&self) -> MutexGuard<'_, WorkingSet<DocPin>> {
        self.working.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps documents loaded while the session exchanges them, by the pins taken when they
    /// were used.
    fn hold(&self, pins: impl IntoIterator<Item = (DocId, DocPin)>) {
        let mut working = self.working();
        for (id, pin) in pins {
            working.hold(id, pin);
        }
    }

    /// Runs `f` on the session, then wakes the writer.
    fn with<R>(&self, f: impl FnOnce(&mut Established) -> R) -> R {
        let r = f(&mut self.lock());
        self.wake.notify_one();
        r
    }
}

/// The manager's view of a running session.
#[derive(Clone)]
pub(crate) struct SessionHandle {
    pub(crate) peer: PeerId,
    /// Who opened the stream.
    pub(crate) initiator: PeerId,
    pub(crate) id: u64,
    pub(crate) shared: Arc<Shared>,
}

impl SessionHandle {
    pub(crate) fn is_closed(&self) -> bool {
        self.shared.stop.is_cancelled()
    }

    pub(crate) fn close(&self) {
        self.shared.stop.cancel();
    }

    /// `doc` changed: send it when the stream can take it.
    pub(crate) fn mark_dirty(&self, doc: DocId) {
        self.shared.with(|s| s.mark_dirty(doc));
    }

    /// Queues a message other services send to every peer. Certificate sets replace a queued
    /// one (the newest set holds the older); a root is queued at most once; nothing is dropped.
    pub(crate) fn queue(&self, msg: SyncMsg) {
        self.shared.with(|s| match from_wire(msg) {
            machine::Msg::Other(certs @ Extra::Certs(_)) => {
                s.queue_replacing(certs, |q| matches!(q, Extra::Certs(_)));
            }
            machine::Msg::Root { .. } => s.queue_root(),
            other => s.queue(other),
        });
    }

    /// Documents waiting to be sent.
    pub(crate) fn backlog(&self) -> usize {
        self.shared.lock().backlog()
    }

    /// Documents that differ and wait for the peer's first message (it has the news).
    pub(crate) fn waiting(&self) -> usize {
        self.shared.lock().waiting()
    }

    /// Documents the peer listed that had not arrived from it yet (a first sync's remainder;
    /// some may have arrived from another peer).
    pub(crate) fn incoming(&self) -> Vec<iom_crdt::DocId> {
        self.shared.lock().incoming().copied().collect()
    }

    /// Whether the inventories have been compared in this session yet.
    pub(crate) fn compared(&self) -> bool {
        self.shared.lock().compared()
    }

    /// A handle over an established session with no stream behind it.
    #[cfg(test)]
    pub(crate) fn for_test(peer: PeerId, initiator: PeerId, id: u64) -> SessionHandle {
        let hello = HelloInfo {
            person: iom_protocol::keys::PersonKey::from_seed([0; 32]).id(),
            chain: Vec::new(),
            blobs: None,
        };
        let check = ExpectHello::<HelloInfo>::initiate::<Extra>(machine_config(), hello.clone())
            .0
            .handle::<Extra>(machine::Msg::Hello {
                version: SYNC_VERSION,
                hello,
            });
        let Ok(check) = check else {
            unreachable!("a Hello of our version is accepted")
        };
        SessionHandle {
            peer,
            initiator,
            id,
            shared: Arc::new(Shared::new(
                check.admit(),
                CancellationToken::new(),
                Stats::default(),
            )),
        }
    }
}

/// The running sessions, at most one per peer.
#[derive(Default)]
pub(crate) struct Registry {
    sessions: Mutex<HashMap<PeerId, SessionHandle>>,
    next_id: AtomicU64,
}

impl Registry {
    fn sessions(&self) -> MutexGuard<'_, HashMap<PeerId, SessionHandle>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fresh session id.
    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers a session; `false` if an equivalent one already runs. When both sides opened
    /// at once, the session opened by the lower peer id wins (both sides decide the same).
    pub(crate) fn register(&self, local: PeerId, handle: SessionHandle) -> bool {
        let mut sessions = self.sessions();
        let preferred = local.min(handle.peer);
        if let Some(existing) = sessions.get(&handle.peer)
            && !existing.is_closed()
            && (existing.initiator == preferred || handle.initiator != preferred)
        {
            return false;
        }
        if let Some(old) = sessions.insert(handle.peer, handle) {
            old.close();
        }
        true
    }

    /// Removes session `id` with `peer` (not a newer one that replaced it).
    pub(crate) fn unregister(&self, peer: PeerId, id: u64) {
        let mut sessions = self.sessions();
        if sessions.get(&peer).is_some_and(|s| s.id == id) {
            sessions.remove(&peer);
        }
    }

    /// Whether a live session with `peer` exists.
    pub(crate) fn has_session(&self, peer: &PeerId) -> bool {
        self.sessions().get(peer).is_some_and(|s| !s.is_closed())
    }

    /// The registered sessions (a snapshot: callers lock each session, not the registry).
    pub(crate) fn handles(&self) -> Vec<SessionHandle> {
        self.sessions().values().cloned().collect()
    }

    /// Closes the session with `peer`, if any.
    pub(crate) fn close(&self, peer: &PeerId) {
        if let Some(s) = self.sessions().get(peer) {
            s.close();
        }
    }

    /// Closes every session.
    pub(crate) fn close_all(&self) {
        for s in self.sessions().values() {
            s.close();
        }
    }
}

/// What a session is built from.
#[derive(Clone)]
pub(crate) struct Deps {
    pub(crate) docs: Docs,
    pub(crate) trust: Arc<TrustBook>,
    pub(crate) store: Store,
    pub(crate) net: Arc<dyn Network>,
    pub(crate) blobs: Arc<dyn BlobHandle>,
    pub(crate) gate: Arc<Gate>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) config: SyncConfig,
    /// Ends every session (shutdown).
    pub(crate) shutdown: CancellationToken,
}

/// The sled key of the persisted state for (`peer`, `doc`).
pub(crate) fn state_key(peer: &PeerId, doc: &DocId) -> Vec<u8> {
    let mut k = b"ps/".to_vec();
    k.extend_from_slice(&peer.to_bytes());
    k.push(b'/');
    k.extend_from_slice(doc.as_bytes());
    k
}

/// The persisted state for (`peer`, `doc`) (resumed: the peer is assumed to still hold what
/// it had), or a fresh one.
fn persisted_state(store: &Store, peer: &PeerId, doc: &DocId) -> PeerDocState {
    resumed_state(store, peer, doc).unwrap_or_default()
}

/// The persisted state for (`peer`, `doc`), resumed, if one can be read.
fn resumed_state(store: &Store, peer: &PeerId, doc: &DocId) -> Option<PeerDocState> {
    match store.state_get(&state_key(peer, doc)) {
        Ok(Some(bytes)) => PeerDocState::resume(&bytes)
            .inspect_err(
                |e| tracing::debug!(%peer, %doc, error = %e, "starting a fresh sync state"),
            )
            .ok(),
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(%peer, %doc, error = %e, "cannot read a sync state");
            None
        }
    }
}

/// Splits a generate batch: the documents that may wait and whose persisted state is at the
/// heads stored for them (read from the metadata, without loading the document) wait for the
/// peer, with that state; the rest are generated for, those that may wait with the state
/// just read. A document changed here since the metadata was read is marked dirty by that
/// change, which ends its wait.
#[allow(clippy::type_complexity)]
fn split_waiting(
    store: &Store,
    peer: &PeerId,
    batch: Vec<(DocId, Option<PeerDocState>, bool)>,
) -> (
    Vec<(DocId, PeerDocState)>,
    Vec<(DocId, Option<PeerDocState>)>,
) {
    let mut waiting = Vec::new();
    let mut rest = Vec::with_capacity(batch.len());
    for (doc, state, may_wait) in batch {
        if state.is_some() || !may_wait {
            rest.push((doc, state));
            continue;
        }
        let Some(st) = resumed_state(store, peer, &doc) else {
            rest.push((doc, None));
            continue;
        };
        let heads: Option<Vec<ChangeHash>> = match store.doc_meta(doc.as_bytes()) {
            Ok(Some(meta)) => Some(meta.heads.into_iter().map(ChangeHash).collect()),
            _ => None,
        };
        match heads {
            Some(heads) if nothing_new_for_peer(&heads, &st) => waiting.push((doc, st)),
            _ => rest.push((doc, Some(st))),
        }
    }
    (waiting, rest)
}

fn machine_config() -> machine::Config {
    machine::Config::default()
        .with_version(SYNC_VERSION)
        .with_max_snapshots(MAX_SNAPSHOTS)
}

/// Runs a session to its end. `role`: whether we opened the stream.
pub(crate) async fn run<S>(deps: Deps, peer: PeerId, stream: S, role: Role)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let span = tracing::debug_span!(parent: tracing::Span::none(), "sync", %peer, ?role);
    async move {
        match run_inner(&deps, peer, stream, role).await {
            Ok(()) => tracing::debug!(%peer, "sync session ended"),
            Err(DriveError::Session(
                e @ (SessionError::Refused { .. } | SessionError::RefusedByPeer { .. }),
            )) => tracing::debug!(%peer, reason = %e, "sync session refused"),
            Err(e @ DriveError::Session(SessionError::Incompatible { .. })) => {
                tracing::warn!(%peer, error = %e, "sync session refused");
            }
            Err(e @ DriveError::Framed(_)) if e.is_peer_fault() => {
                tracing::warn!(%peer, error = %e, "disconnecting peer that sent a bad frame");
                deps.net.disconnect(peer).await;
            }
            Err(e) if e.is_peer_fault() => {
                tracing::warn!(%peer, error = %e, "disconnecting misbehaving peer");
                deps.net.disconnect(peer).await;
            }
            Err(e @ (DriveError::Bug(_) | DriveError::Encode(_))) => {
                tracing::error!(%peer, error = %e, "sync session ended by a bug");
            }
            Err(e) => tracing::debug!(%peer, error = %e, "sync session ended"),
        }
    }
    .instrument(span)
    .await
}

async fn send<W: AsyncWrite + Unpin>(
    wr: &mut W,
    msg: Msg,
    stats: &Stats,
) -> Result<(), DriveError> {
    send_buffered(wr, msg, stats).await?;
    wr.flush().await.map_err(FramedError::Io)?;
    Ok(())
}

/// [`send`] without the flush, for the writer of an established session (which flushes when
/// it is about to wait: [`Driver::write_loop`]).
async fn send_buffered<W: AsyncWrite + Unpin>(
    wr: &mut W,
    msg: Msg,
    stats: &Stats,
) -> Result<(), DriveError> {
    let bytes = to_wire(msg)?.encode()?;
    write_frame_unflushed(wr, &bytes, MAX_SYNC_FRAME).await?;
    stats
        .bytes_out
        .fetch_add(bytes.len() as u64 + 4, Ordering::Relaxed);
    Ok(())
}

async fn recv<R: AsyncRead + Unpin>(rd: &mut R, stats: &Stats) -> Result<Option<Msg>, DriveError> {
    let Some(bytes) = read_frame(rd, MAX_SYNC_FRAME).await? else {
        return Ok(None);
    };
    stats
        .bytes_in
        .fetch_add(bytes.len() as u64 + 4, Ordering::Relaxed);
    let msg = SyncMsg::decode(&bytes).map_err(|e| FramedError::Decode(e.to_string()))?;
    Ok(Some(from_wire(msg)))
}

fn our_hello(deps: &Deps) -> HelloInfo {
    let me = DeviceId::from_peer_id(&deps.net.local_peer()).ok();
    HelloInfo {
        person: deps.trust.person(),
        chain: me.map(|d| deps.trust.chain_for(&d)).unwrap_or_default(),
        blobs: deps.blobs.digest(),
    }
}

/// The blob digests the two `Hello`s carried.
#[derive(Debug, Clone, Copy)]
struct Digests {
    ours: Option<BlobSetDigest>,
    theirs: Option<BlobSetDigest>,
}

impl Digests {
    /// Whether both sides held the same blobs when the session opened and ours still are
    /// what we said (a blob added since may have missed the live announcements, which reach
    /// registered sessions only): then neither side announces. Both sides decide the same
    /// from the same two digests; a side whose blobs changed announces all of its own.
    fn skip_announcements(&self, now: Option<BlobSetDigest>) -> bool {
        self.ours.is_some() && self.ours == self.theirs && now == self.ours
    }
}

/// Whether the peer's `Hello` makes it trusted; the refusal reason if not.
async fn admission(deps: &Deps, peer: PeerId, check: &mut CheckHello<HelloInfo>) -> Option<String> {
    if check.hello().person != deps.trust.person() {
        return Some("not trusted: this device belongs to a different person".into());
    }
    let chain = std::mem::take(&mut check.hello_mut().chain);
    if let Err(e) = deps.trust.add(chain).await {
        tracing::warn!(%peer, error = %e, "cannot store the peer's certificates");
    }
    let state = deps.trust.state();
    match DeviceId::from_peer_id(&peer) {
        Ok(d) if state.is_revoked(&d) => Some("not trusted: this device has been revoked".into()),
        Ok(d) if state.is_trusted(&d) => None,
        _ => Some("not trusted: no valid certificate chain to our person".into()),
    }
}

/// The handshake: `Hello` each way, the version check and the trust check.
async fn handshake<R, W>(
    deps: &Deps,
    peer: PeerId,
    rd: &mut R,
    wr: &mut W,
    role: Role,
    stats: &Stats,
) -> Result<(Established, Digests), DriveError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let hello = our_hello(deps);
    let ours = hello.blobs;
    let expect = match role {
        Role::Initiator => {
            let (expect, hello) = ExpectHello::initiate(machine_config(), hello);
            send(wr, hello, stats).await?;
            expect
        }
        Role::Responder => ExpectHello::accept(machine_config(), hello),
    };
    let timeout = deps.config.hello_timeout;
    let first = tokio::time::timeout(timeout, recv(rd, stats))
        .await
        .map_err(|_| DriveError::HelloTimeout(timeout))??
        .ok_or(DriveError::ClosedBeforeHello)?;
    let refused = match expect.handle(first) {
        Ok(mut check) => match admission(deps, peer, &mut check).await {
            None => {
                let theirs = check.hello().blobs;
                return Ok((check.admit(), Digests { ours, theirs }));
            }
            Some(reason) => check.refuse(reason),
        },
        Err(e) => e,
    };
    let HandshakeError { reply, error } = refused;
    if let Some(reply) = reply {
        let reason = match &reply {
            machine::Msg::Refused { reason } => reason.clone(),
            _ => error.to_string(),
        };
        let _ = send(wr, reply, stats).await;
        if deps.gate.refuse(peer, PROTOCOL, &reason) == Verdict::Disconnect {
            deps.net.disconnect(peer).await;
        }
    }
    Err(error.into())
}

async fn run_inner<S>(deps: &Deps, peer: PeerId, stream: S, role: Role) -> Result<(), DriveError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut rd, mut wr) = stream.split();
    let stats = Stats::default();
    let (mut session, digests) = handshake(deps, peer, &mut rd, &mut wr, role, &stats).await?;
    open(deps, peer, &mut session);
    // The handshake read exactly its frames, so nothing is lost to these buffers.
    let mut rd = futures::io::BufReader::with_capacity(IO_BUFFER, rd);
    let mut wr = futures::io::BufWriter::with_capacity(IO_BUFFER, wr);

    let local = deps.net.local_peer();
    let shared = Arc::new(Shared::new(session, deps.shutdown.child_token(), stats));
    let handle = SessionHandle {
        peer,
        initiator: match role {
            Role::Initiator => local,
            Role::Responder => peer,
        },
        id: deps.registry.next_id(),
        shared: shared.clone(),
    };
    let id = handle.id;
    if !deps.registry.register(local, handle) {
        return Ok(()); // a session with this peer already runs
    }
    tracing::info!(%peer, "sync session up");
    // Read after registering: a blob added from here on is announced to this session live.
    let blobs = if digests.skip_announcements(deps.blobs.digest()) {
        tracing::debug!(%peer, "same blobs on both sides: no announcements");
        BlobCursor::Done
    } else {
        BlobCursor::Start
    };

    let writer = {
        let driver = Driver {
            deps: deps.clone(),
            peer,
            shared: shared.clone(),
        };
        tokio::spawn(
            async move {
                let r = driver.write_loop(&mut wr, blobs).await;
                if let Err(e) = &r {
                    tracing::debug!(peer = %driver.peer, error = %e, "sync writer stopped");
                }
                // End the session either way: the reader may never see the end of a stream
                // whose connection we closed ourselves, and a session that looks alive blocks
                // a new one.
                driver.shared.stop.cancel();
                let _ = wr.close().await;
                r
            }
            .in_current_span(),
        )
    };
    let reader = Driver {
        deps: deps.clone(),
        peer,
        shared: shared.clone(),
    };
    let read = reader.read_loop(&mut rd).await;
    shared.stop.cancel();
    let written = joined(writer.await, "the sync writer panicked").and_then(|r| r);
    deps.registry.unregister(peer, id);
    shared.working().release();
    // Persist what each side is known to have, so a reconnect costs only what changed.
    let states = shared.lock().take_states();
    for (doc, st) in states {
        if let Err(e) = deps.store.state_put(&state_key(&peer, &doc), &st.encode()) {
            tracing::warn!(%peer, %doc, error = %e, "cannot persist a sync state");
        }
    }
    // The reader's end names the cause; a writer error counts when the reader just stopped.
    match (read, written) {
        (Err(e), _) => Err(e),
        (Ok(()), Err(e)) => Err(e),
        (Ok(()), Ok(())) => Ok(()),
    }
}

/// What the peer needs first: certificates, where other devices are and our inventory root.
/// All queued in the state machine, before the writer runs (the writer announces our blobs
/// when it has nothing else to send: [`Driver::announce_blobs`]).
fn open(deps: &Deps, peer: PeerId, session: &mut Established) {
    session.queue(machine::Msg::Other(Extra::Certs(deps.trust.certs())));
    if deps.config.share_addrs {
        session.queue(machine::Msg::Other(Extra::Addrs(known_addrs(deps, peer))));
    }
    if deps.config.fault_garbage_sync
        && let Some(msg) = garbage_doc_message(deps)
    {
        tracing::warn!(%peer, "fault injection: sending a garbage sync message");
        session.queue(msg);
    }
    if deps.config.fault_garbage_snapshot {
        tracing::warn!(%peer, "fault injection: sending a garbage document snapshot");
        session.queue(machine::Msg::Snapshots {
            docs: vec![(
                DocId::from_bytes(crate::time::random_bytes::<16>()),
                b"\x85\x6f\x4a\x83 garbage, not an automerge document".to_vec(),
            )],
        });
    }
    session.queue_root();
}

/// How far a session's announcement of our blobs got.
#[derive(Debug, Clone, Copy)]
enum BlobCursor {
    Start,
    After(ContentId),
    Done,
}

/// Fault injection (`IOM_FAULT=garbage-sync`): an Automerge sync message for a real document
/// whose bytes are not a sync message at all. The peer must disconnect us and change nothing.
fn garbage_doc_message(deps: &Deps) -> Option<Msg> {
    let (doc, _) = deps.docs.list().ok()?.into_iter().next()?;
    Some(machine::Msg::Doc {
        doc,
        msg: b"\x42\xde\xad\xbe\xef garbage, not an automerge sync message".to_vec(),
    })
}

/// Addresses of the other trusted devices the network knows.
fn known_addrs(deps: &Deps, except: PeerId) -> Vec<PeerAddrs> {
    trusted_addrs(deps, |p| *p != except)
}

/// The addresses of one trusted device, if the network knows any.
pub(crate) fn addrs_of(deps: &Deps, peer: PeerId) -> Option<PeerAddrs> {
    trusted_addrs(deps, |p| *p == peer).pop()
}

fn trusted_addrs(deps: &Deps, wanted: impl Fn(&PeerId) -> bool) -> Vec<PeerAddrs> {
    let state = deps.trust.state();
    deps.net
        .known_addresses()
        .into_iter()
        .filter(|(p, addrs)| {
            wanted(p)
                && !addrs.is_empty()
                && DeviceId::from_peer_id(p).is_ok_and(|d| state.is_trusted(&d))
        })
        .map(|(p, addrs)| PeerAddrs {
            peer: p.to_bytes(),
            addrs: addrs
                .iter()
                .take(MAX_PEER_ADDRS)
                .map(ToString::to_string)
                .collect(),
        })
        .collect()
}

/// One side (reader or writer) of a running session.
struct Driver {
    deps: Deps,
    peer: PeerId,
    shared: Arc<Shared>,
}

impl Driver {
    /// Reads frames ahead (up to [`READ_AHEAD`] messages) while the messages read so far are
    /// handled: everything that has arrived is handled as one batch, so documents travel
    /// several per blocking hop and per store transaction.
    async fn read_loop<R: AsyncRead + Unpin>(&self, rd: &mut R) -> Result<(), DriveError> {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Msg>(READ_AHEAD);
        let stats = &self.shared.stats;
        let frames = async move {
            while let Some(msg) = recv(rd, stats).await? {
                if tx.send(msg).await.is_err() {
                    break;
                }
            }
            Ok::<(), DriveError>(())
        };
        let handle = async {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while batch.len() < READ_AHEAD
                    && let Ok(msg) = rx.try_recv()
                {
                    batch.push(msg);
                }
                let mut actions = Vec::new();
                self.deps.docs.with_inventory(|inv| {
                    let mut session = self.shared.lock();
                    for msg in batch {
                        actions.extend(session.handle(msg, inv)?);
                    }
                    Ok::<(), SessionError>(())
                })?;
                self.execute(actions).await?;
                // The tasks woken by what this batch changed (the node's own subscribers: the
                // page, `iom watch`) run before the writer answers the peer: the user waits for
                // the first, nobody for the second.
                tokio::task::yield_now().await;
                self.shared.wake.notify_one();
            }
            Ok::<(), DriveError>(())
        };
        tokio::select! {
            r = futures::future::try_join(frames, handle) => r.map(|_| ()),
            _ = self.shared.stop.cancelled() => Ok(()),
        }
    }

    /// Sends what the state machine has, then our blob announcements from `blobs` on. Frames
    /// are written to a buffer and flushed whenever the writer is about to wait (for work, or
    /// for a blocking hop), so a batch of messages goes out as one transport write while the
    /// peer never waits for a frame that is ready.
    async fn write_loop<W: AsyncWrite + Unpin>(
        &self,
        wr: &mut W,
        mut blobs: BlobCursor,
    ) -> Result<(), DriveError> {
        let mut quiet = PeerQuiet::default();
        loop {
            if self.shared.stop.is_cancelled() {
                return Ok(());
            }
            let next = self
                .deps
                .docs
                .with_inventory(|inv| self.shared.lock().poll_transmit(inv));
            match next {
                None => {
                    if self.announce_blobs(wr, &mut blobs).await? {
                        continue;
                    }
                    self.flush(wr).await?;
                    let holding = !self.shared.working().is_empty();
                    let speak_at = {
                        let session = self.shared.lock();
                        quiet.deadline(
                            session.waiting() > 0,
                            session.doc_messages_received(),
                            tokio::time::Instant::now(),
                        )
                    };
                    let speak = async {
                        match speak_at {
                            Some(at) => tokio::time::sleep_until(at).await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        _ = self.shared.wake.notified() => {}
                        _ = self.shared.stop.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(RELEASE_WHEN_QUIET), if holding => {
                            self.shared.working().release();
                        }
                        _ = speak => {
                            // Nothing came from the peer about the documents that wait for it.
                            self.shared.lock().speak_waiting();
                            quiet.reset();
                        }
                    }
                }
                Some(Transmit::Send(msg)) => self.write_msg(wr, msg).await?,
                Some(Transmit::Generate {
                    doc,
                    state,
                    may_wait,
                }) => {
                    // Every document that is ready to generate goes in one blocking hop.
                    let mut batch = vec![(doc, state, may_wait)];
                    let mut after = None;
                    while batch.len() < GENERATE_BATCH {
                        let next = self
                            .deps
                            .docs
                            .with_inventory(|inv| self.shared.lock().poll_transmit(inv));
                        match next {
                            Some(Transmit::Generate {
                                doc,
                                state,
                                may_wait,
                            }) => batch.push((doc, state, may_wait)),
                            other => {
                                after = other;
                                break;
                            }
                        }
                    }
                    self.flush(wr).await?;
                    self.generate_batch(batch).await?;
                    if let Some(Transmit::Send(msg)) = after {
                        self.write_msg(wr, msg).await?;
                    } else if let Some(Transmit::LoadSnapshots { docs }) = after {
                        // Flushed before the batch; generating wrote nothing since.
                        self.load_snapshots(docs).await?;
                    }
                }
                Some(Transmit::LoadSnapshots { docs }) => {
                    self.flush(wr).await?;
                    self.load_snapshots(docs).await?;
                }
            }
        }
    }

    /// Writes one message into the writer's buffer (unless the session stops).
    async fn write_msg<W: AsyncWrite + Unpin>(
        &self,
        wr: &mut W,
        msg: Msg,
    ) -> Result<(), DriveError> {
        tokio::select! {
            r = send_buffered(wr, msg, &self.shared.stats) => r,
            _ = self.shared.stop.cancelled() => Ok(()),
        }
    }

    /// Sends what the writer's buffer holds (unless the session stops).
    async fn flush<W: AsyncWrite + Unpin>(&self, wr: &mut W) -> Result<(), DriveError> {
        tokio::select! {
            r = wr.flush() => r.map_err(|e| DriveError::from(FramedError::Io(e))),
            _ = self.shared.stop.cancelled() => Ok(()),
        }
    }

    /// Generates Automerge messages for a batch of documents in one blocking hop (the states
    /// not handed out are read from the store there), then reports each. A document that may
    /// wait for the peer, and whose persisted state shows we hold nothing new, is not loaded
    /// or generated for: it waits for the peer's message ([`Established::wait_for_peer`]),
    /// and is loaded when that arrives.
    async fn generate_batch(
        &self,
        batch: Vec<(DocId, Option<PeerDocState>, bool)>,
    ) -> Result<(), DriveError> {
        let (store, peer) = (self.deps.store.clone(), self.peer);
        let (waiting, batch) = if batch
            .iter()
            .any(|(_, st, may_wait)| st.is_none() && *may_wait)
        {
            let store = store.clone();
            let split = tokio::task::spawn_blocking(move || split_waiting(&store, &peer, batch));
            joined(split.await, "reading the stored heads panicked")?
        } else {
            let batch = batch.into_iter().map(|(doc, st, _)| (doc, st)).collect();
            (Vec::new(), batch)
        };
        let ids: Vec<DocId> = batch.iter().map(|(doc, _)| *doc).collect();
        let items = batch
            .into_iter()
            .map(|(doc, state)| (doc, (doc, state)))
            .collect();
        let out = if ids.is_empty() {
            Vec::new()
        } else {
            self.deps
                .docs
                .read_many(items, move |d, (doc, state)| {
                    let mut st = state.unwrap_or_else(|| persisted_state(&store, &peer, &doc));
                    let msg = generate(d, &mut st);
                    (st, msg)
                })
                .await?
        };
        // A document we said something about gets an answer: keep it loaded for that.
        let mut talking = Vec::new();
        let mut actions = Vec::new();
        {
            let mut session = self.shared.lock();
            for (doc, st) in waiting {
                actions.extend(session.wait_for_peer(doc, st)?);
            }
            for (doc, r) in ids.into_iter().zip(out) {
                actions.extend(match r {
                    Some(((st, msg), pin)) => {
                        if msg.is_some() {
                            talking.push((doc, pin));
                        }
                        session.generated(doc, st, msg)?
                    }
                    // Gone (or never here): nothing to say about it.
                    None => session.generated(doc, PeerDocState::new(), None)?,
                });
            }
        }
        self.shared.hold(talking);
        self.execute(actions).await
    }

    async fn load_snapshots(&self, docs: Vec<DocId>) -> Result<(), DriveError> {
        let (snaps, other) = self
            .deps
            .docs
            .snapshots(docs, self.deps.config.max_snapshot_doc)
            .await?;
        let loaded = snaps
            .into_iter()
            .map(|s| Loaded {
                doc: s.id,
                heads: s.heads,
                bytes: s.bytes,
            })
            .collect();
        self.shared.lock().snapshots_loaded(loaded, other);
        Ok(())
    }

    /// Sends the next page of our blob announcements, read from the store now (so memory holds
    /// one page, whatever the store's size). Called only when nothing else waits to be sent:
    /// announcements come after every document. Returns whether a page was sent.
    async fn announce_blobs<W: AsyncWrite + Unpin>(
        &self,
        wr: &mut W,
        cursor: &mut BlobCursor,
    ) -> Result<bool, DriveError> {
        let after = match *cursor {
            BlobCursor::Done => return Ok(false),
            BlobCursor::Start => None,
            BlobCursor::After(id) => Some(id),
        };
        let blobs = self.deps.blobs.clone();
        let page =
            tokio::task::spawn_blocking(move || blobs.announcement_page(after, MAX_BLOB_ANNOUNCE))
                .await;
        let page = joined(page, "reading blob announcements panicked")?;
        *cursor = match page.last() {
            Some((id, _)) if page.len() >= MAX_BLOB_ANNOUNCE => BlobCursor::After(*id),
            _ => BlobCursor::Done,
        };
        if page.is_empty() {
            return Ok(false);
        }
        tokio::select! {
            r = send(wr, machine::Msg::Other(Extra::Blobs(page)), &self.shared.stats) => r?,
            _ = self.shared.stop.cancelled() => return Ok(false),
        }
        Ok(true)
    }

    /// Runs actions (and the actions their reports return) in order. Consecutive `Receive`s
    /// (distinct documents: the state machine hands out one state per document) run as one
    /// batch, and the states they persist are written together.
    async fn execute(&self, actions: Vec<Action<Extra>>) -> Result<(), DriveError> {
        let mut queue: std::collections::VecDeque<_> = actions.into();
        let mut persist = Vec::new();
        while let Some(action) = queue.pop_front() {
            match action {
                Action::Receive { doc, msg, state } => {
                    let mut batch = vec![(doc, (msg, state))];
                    while batch.len() < RECEIVE_BATCH
                        && matches!(queue.front(), Some(Action::Receive { .. }))
                    {
                        if let Some(Action::Receive { doc, msg, state }) = queue.pop_front() {
                            batch.push((doc, (msg, state)));
                        }
                    }
                    for more in self.receive_batch(batch).await? {
                        match more {
                            Action::Persist { doc, state } => persist.push((doc, state)),
                            other => queue.push_back(other),
                        }
                    }
                }
                Action::Persist { doc, state } => persist.push((doc, state)),
                other => self.execute_one(other).await?,
            }
        }
        if !persist.is_empty() {
            let peer = self.peer;
            let records = persist
                .into_iter()
                .map(|(doc, state)| (state_key(&peer, &doc), state))
                .collect();
            if let Err(e) = self.deps.store.state_put_many(records) {
                tracing::warn!(%peer, error = %e, "cannot persist sync states");
            }
        }
        Ok(())
    }

    /// Applies received Automerge messages to their documents in one blocking hop and one
    /// store transaction, and reports each; returns what to do next.
    async fn receive_batch(
        &self,
        batch: Vec<(DocId, Received)>,
    ) -> Result<Vec<Action<Extra>>, DriveError> {
        let (store, peer) = (self.deps.store.clone(), self.peer);
        let ids: Vec<DocId> = batch.iter().map(|(doc, _)| *doc).collect();
        let (results, failed) = self
            .deps
            .docs
            .modify_many(self.peer, batch, move |doc, d, (msg, state)| {
                let mut st = state.unwrap_or_else(|| persisted_state(&store, &peer, &doc));
                let outcome = receive(d, &mut st, &msg);
                (st, outcome)
            })
            .await?;
        let mut applied = Vec::with_capacity(results.len());
        let mut pins = Vec::with_capacity(results.len());
        for (doc, (result, pin)) in ids.into_iter().zip(results) {
            applied.push((doc, result));
            pins.push((doc, pin));
        }
        self.shared.hold(pins);
        let mut next = Vec::new();
        for (doc, (st, outcome)) in applied {
            let ok = outcome.is_ok();
            let more = self.shared.lock().received(doc, st, outcome);
            match more {
                Ok(more) => next.extend(more),
                Err(e) => {
                    if let Some(doc) = e.forget_unstored()
                        && let Err(err) = self.deps.docs.forget_unstored(doc)
                    {
                        tracing::warn!(%doc, error = %err, "cannot drop a placeholder");
                    }
                    return Err(e.into());
                }
            }
            if ok {
                self.shared
                    .stats
                    .docs_received
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        match failed {
            Some(e) => Err(e.into()),
            None => Ok(next),
        }
    }

    /// Runs one action other than `Receive` and `Persist`.
    async fn execute_one(&self, action: Action<Extra>) -> Result<(), DriveError> {
        match action {
            Action::Apply(extra) => self.apply(extra).await?,
            Action::StoreSnapshots { docs } => {
                let count = docs.len() as u64;
                let applied = self.deps.docs.receive_snapshots(self.peer, docs).await?;
                let (new, merged) = (applied.new.len(), applied.merged.len());
                tracing::debug!(peer = %self.peer, count, new, merged, "received snapshots");
                self.shared
                    .stats
                    .snapshots_received
                    .fetch_add(count, Ordering::Relaxed);
                self.shared.lock().snapshots_received(SnapshotsStored {
                    new: applied.new,
                    merged: applied.merged,
                    rejected: applied.rejected.map(|(doc, e)| (doc, e.to_string())),
                })?;
            }
            Action::ForgetUnstored { doc } => self.deps.docs.forget_unstored(doc)?,
            Action::Receive { .. } | Action::Persist { .. } => {
                return Err(DriveError::Bug("execute_one given a batched action"));
            }
        }
        Ok(())
    }

    /// Applies a message only the node understands.
    async fn apply(&self, extra: Extra) -> Result<(), DriveError> {
        match extra {
            Extra::Certs(certs) => {
                if let Err(e) = self.deps.trust.add(certs).await {
                    tracing::warn!(peer = %self.peer, error = %e, "cannot store certificates");
                }
                let trusted = DeviceId::from_peer_id(&self.peer)
                    .is_ok_and(|d| self.deps.trust.state().is_trusted(&d));
                if !trusted {
                    return Err(DriveError::NoLongerTrusted);
                }
            }
            Extra::Addrs(peers) => {
                let local = self.deps.net.local_peer();
                for p in peers {
                    let Ok(pid) = PeerId::from_bytes(&p.peer) else {
                        let peer = self.peer;
                        tracing::debug!(%peer, "skipping an address entry with a bad peer id");
                        continue;
                    };
                    if pid == local {
                        continue;
                    }
                    let addrs = p.addrs.iter().filter_map(|a| a.parse().ok()).collect();
                    self.deps.net.add_addresses(pid, addrs).await;
                }
            }
            Extra::Blobs(have) => {
                // Every session announces every blob; only the ones not here are wanted (the
                // fetch queues are bounded, and held blobs would crowd them). A page is up to
                // 4,096 store lookups: off the async threads.
                let blobs = self.deps.blobs.clone();
                let missing = tokio::task::spawn_blocking(move || {
                    have.into_iter()
                        .filter(|(id, _)| !blobs.has(id))
                        .collect::<Vec<_>>()
                })
                .await;
                let missing = joined(missing, "checking announced blobs panicked")?;
                for (id, len) in missing {
                    self.deps.blobs.want(id, len, self.peer);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests;
