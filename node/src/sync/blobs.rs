//! Blobs between trusted peers over `/iom/blob/1`: the [`Blobs`] service.
//!
//! Peers announce the blobs they hold in their sync session. Small blobs (up to
//! [`EAGER_LIMIT`]) are fetched at once; larger ones are fetched one at a time in the
//! background, or at once when someone asks for them (`iom blob get`). Every chunk is checked
//! against the manifest's chunk hash as it arrives and written straight to disk, so memory stays
//! flat for any size; the whole-content hash is checked before the blob becomes visible.
//! A transfer's manifest is recorded (durably) before its first chunk, so a broken transfer
//! resumes where its chunk file stops; the chunks there are verified again first.
//!
//! The service is built from what it uses: the [`Store`], the network (behind [`BlobNet`], so
//! tests run transfers over in-memory streams), the [`TrustBook`] (who may fetch from us) and
//! the refusal [`Gate`]. It owns its tasks (the server, the transfers it serves, two fetch
//! workers, retry timers) in a task tracker, and stops them when the token given to
//! [`Blobs::start`] is cancelled (or at [`Blobs::shutdown`]). Blobs that arrive are announced
//! on [`Blobs::arrivals`] for the sync side to pass on to every peer.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::BoxStream;
use futures::{AsyncRead, AsyncWrite, AsyncWriteExt, StreamExt};
use iom_protocol::frame::{DecodeError, EncodeError};
use iom_protocol::id::ContentId;
use iom_protocol::keys::DeviceId;
use iom_protocol::wire::{BlobRequest, BlobResponse, MAX_BLOB_FRAME};
use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::{JoinError, JoinSet};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::gate::{Gate, Verdict};
use crate::net::framed::{
    FramedError, read_frame, read_frame_bytes, read_msg, write_frame, write_frame_parts,
};
use crate::net::{BLOB_PROTOCOL, Net, NetError};
use crate::store::{BlobReceiver, CHUNK_SIZE, Store, StoreError, chunk_count};
use crate::trust::TrustBook;

/// Blobs up to this size are fetched as soon as they are announced.
pub const EAGER_LIMIT: u64 = 1 << 20;
const PROGRESS_PREFIX: &str = "bp/";
/// The largest request frame.
const MAX_REQUEST_FRAME: usize = 4096;
/// Chunks received from the network and not yet hashed and written; the network keeps
/// reading while the disk side works.
const RECEIVE_AHEAD: usize = 8;
/// Chunks a server reads per blocking hop (1 MiB), the next group while one is being sent.
const READ_GROUP: u32 = 4;
/// Arrivals kept for a slow subscriber; one that lags misses some (its peers learn of those
/// blobs in their next session).
const ARRIVALS_LEN: usize = 4096;
/// Failed fetches in a row after which the back-off stops growing (1 s << 6 = 64 s).
const MAX_BACKOFF_DOUBLINGS: u32 = 6;

/// The network as the blob service uses it. [`Net`] in production; in tests, in-memory
/// streams.
pub trait BlobNet: Send + Sync + 'static {
    /// A `/iom/blob/1` stream.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// Peers connected now.
    fn connected_peers(&self) -> Vec<PeerId>;
    /// Opens a `/iom/blob/1` stream to `peer`.
    fn open_blob_stream(
        &self,
        peer: PeerId,
    ) -> impl Future<Output = Result<Self::Stream, NetError>> + Send;
    /// Closes every connection to `peer` (it sent bad data, or keeps knocking).
    fn disconnect_peer(&self, peer: PeerId) -> impl Future<Output = ()> + Send;
    /// The `/iom/blob/1` streams peers open to us; `None` if they cannot be accepted (already
    /// accepted elsewhere).
    fn accept_blob_streams(&self) -> Option<BoxStream<'static, (PeerId, Self::Stream)>>;
}

impl BlobNet for Net {
    type Stream = libp2p::Stream;

    fn connected_peers(&self) -> Vec<PeerId> {
        Net::connected_peers(self)
    }

    fn open_blob_stream(
        &self,
        peer: PeerId,
    ) -> impl Future<Output = Result<libp2p::Stream, NetError>> + Send {
        self.open(peer, BLOB_PROTOCOL)
    }

    fn disconnect_peer(&self, peer: PeerId) -> impl Future<Output = ()> + Send {
        self.disconnect(peer)
    }

    fn accept_blob_streams(&self) -> Option<BoxStream<'static, (PeerId, libp2p::Stream)>> {
        match self.control().accept(BLOB_PROTOCOL) {
            Ok(incoming) => Some(incoming.boxed()),
            Err(e) => {
                tracing::warn!(error = %e, "cannot accept /iom/blob/1 streams");
                None
            }
        }
    }
}

/// Settings of the blob service.
#[derive(Debug, Clone)]
pub struct BlobsConfig {
    /// Fault injection for tests (`IOM_FAULT=corrupt-blob-chunks`): serve chunks with flipped
    /// bytes.
    pub corrupt_chunks: bool,
    /// How long a fetch waits for the peer's next response.
    pub response_timeout: Duration,
    /// Blobs waiting in each fetch queue (small, large); an announcement that finds its queue
    /// full is dropped and queued again by the next one.
    pub queue_len: usize,
}

impl Default for BlobsConfig {
    fn default() -> Self {
        BlobsConfig {
            corrupt_chunks: false,
            response_timeout: Duration::from_secs(30),
            queue_len: 4096,
        }
    }
}

/// A transfer in progress: its chunk file and the manifest it follows. How far it got is read
/// from the chunk file itself when it resumes (every chunk there is verified again).
#[derive(Debug, Serialize, Deserialize)]
struct Progress {
    internal: u64,
    len: u64,
    #[serde(with = "iom_protocol::cbor::bytes")]
    hashes: Vec<u8>,
}

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// No connected peer has the blob.
    #[error("no connected device has blob {0}")]
    Unavailable(ContentId),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How a peer broke `/iom/blob/1`. The peer is disconnected; nothing it sent is kept.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerFault {
    /// A bad frame (over the limit, or undecodable).
    #[error(transparent)]
    Frame(FramedError),
    /// A response that does not decode.
    #[error("undecodable response: {0}")]
    Decode(DecodeError),
    /// Something other than a manifest (or a refusal) came first.
    #[error("expected a manifest")]
    ExpectedManifest,
    /// Something other than a chunk came after the manifest.
    #[error("expected a chunk")]
    ExpectedChunk,
    /// The manifest's hashes do not fit its length, or the chunk size is not ours.
    #[error("manifest does not fit: {len} bytes, chunks of {chunk_size}, {hash_bytes} hash bytes")]
    BadManifest {
        /// The length it gave.
        len: u64,
        /// The chunk size it gave.
        chunk_size: u32,
        /// Bytes of chunk hashes it gave.
        hash_bytes: usize,
    },
    /// A chunk that does not match the manifest's hash (or length).
    #[error("chunk {0} does not match its hash")]
    ChunkHash(u32),
    /// A chunk out of order.
    #[error("chunk {index} out of order, expected {expected}")]
    ChunkOrder {
        /// The index it sent.
        index: u32,
        /// The index expected.
        expected: u32,
    },
    /// Every chunk matched, the whole content did not.
    #[error("whole-content hash mismatch")]
    WholeHash,
}

/// Why a transfer from one peer failed (the fetch then tries the next peer).
#[derive(Debug, thiserror::Error)]
enum TransferError {
    /// The peer is at fault.
    #[error("peer fault: {0}")]
    Peer(#[from] PeerFault),
    /// The stream could not be opened.
    #[error(transparent)]
    Net(Box<NetError>),
    /// The stream broke (not the peer's fault: a dropped connection looks like this).
    #[error("stream: {0}")]
    Stream(FramedError),
    /// No response within [`BlobsConfig::response_timeout`].
    #[error("timed out")]
    TimedOut,
    /// The stream ended before the transfer did.
    #[error("stream closed")]
    Closed,
    /// The peer does not hold the blob.
    #[error("peer does not have it")]
    NotFound,
    /// The peer refused us.
    #[error("refused: {0}")]
    Refused(String),
    /// The peer's manifest is not the one the resumed transfer follows.
    #[error("manifest changed; restarting")]
    ManifestChanged,
    /// We could not encode the request (a bug).
    #[error("cannot encode the request: {0}")]
    Encode(serde_cbor::Error),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A blocking task panicked.
    #[error("a blocking task failed: {0}")]
    Join(#[from] JoinError),
}

impl From<NetError> for TransferError {
    fn from(e: NetError) -> TransferError {
        TransferError::Net(Box::new(e))
    }
}

impl TransferError {
    fn framed(e: FramedError) -> TransferError {
        if e.is_peer_fault() {
            TransferError::Peer(PeerFault::Frame(e))
        } else {
            TransferError::Stream(e)
        }
    }
}

/// Why serving a request ended early.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// Reading the request or writing a response failed.
    #[error(transparent)]
    Framed(#[from] FramedError),
    /// A response does not encode (a bug).
    #[error("cannot encode a response: {0}")]
    Encode(#[from] EncodeError),
    /// Storage failed (a chunk no longer matches its hash, for one).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A blocking task panicked.
    #[error("a blocking task failed: {0}")]
    Join(#[from] JoinError),
}

#[derive(Default)]
struct State {
    /// Wanted blob → (length, peers that announced it).
    wanted: HashMap<ContentId, (u64, Vec<PeerId>)>,
    /// Callers waiting for a transfer someone else runs: told whether the blob arrived.
    waiters: HashMap<ContentId, Vec<oneshot::Sender<bool>>>,
    /// Blob being fetched → chunks done / total (one transfer per blob at a time).
    active: HashMap<ContentId, (u32, u32)>,
    /// Blobs in a fetch queue or being fetched (each at most once).
    queued: HashSet<ContentId>,
    /// Failed fetches in a row, per blob (for the retry back-off).
    failures: HashMap<ContentId, u32>,
}

type SharedState = Arc<Mutex<State>>;

fn lock(state: &SharedState) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

type Queues = (mpsc::Receiver<ContentId>, mpsc::Receiver<ContentId>);

/// The blob replication service (see the module docs).
pub struct Blobs<N: BlobNet = Net> {
    store: Store,
    net: N,
    trust: Arc<TrustBook>,
    gate: Arc<Gate>,
    config: BlobsConfig,
    state: SharedState,
    small: mpsc::Sender<ContentId>,
    large: mpsc::Sender<ContentId>,
    queues: Mutex<Option<Queues>>,
    arrivals: broadcast::Sender<(ContentId, u64)>,
    tasks: TaskTracker,
    stop: CancellationToken,
}

impl<N: BlobNet> std::fmt::Debug for Blobs<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blobs").finish_non_exhaustive()
    }
}

/// Marks a blob's transfer as running; when dropped (finished, failed or cancelled) it clears
/// the mark and tells the callers who waited for it.
struct InFlight<'a> {
    state: &'a SharedState,
    id: ContentId,
    done: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let waiters = {
            let mut st = lock(self.state);
            st.active.remove(&self.id);
            if self.done {
                st.wanted.remove(&self.id);
            }
            st.waiters.remove(&self.id).unwrap_or_default()
        };
        for w in waiters {
            let _ = w.send(self.done);
        }
    }
}

impl<N: BlobNet> Blobs<N> {
    /// A new service; nothing runs until [`Blobs::start`].
    pub fn new(
        store: Store,
        net: N,
        trust: Arc<TrustBook>,
        gate: Arc<Gate>,
        config: BlobsConfig,
    ) -> Blobs<N> {
        let (small, small_rx) = mpsc::channel(config.queue_len.max(1));
        let (large, large_rx) = mpsc::channel(config.queue_len.max(1));
        let (arrivals, _) = broadcast::channel(ARRIVALS_LEN);
        Blobs {
            store,
            net,
            trust,
            gate,
            config,
            state: SharedState::default(),
            small,
            large,
            queues: Mutex::new(Some((small_rx, large_rx))),
            arrivals,
            tasks: TaskTracker::new(),
            stop: CancellationToken::new(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Blobs that arrived here by transfer, with their lengths, for the sync side to announce
    /// to every peer.
    pub fn arrivals(&self) -> broadcast::Receiver<(ContentId, u64)> {
        self.arrivals.subscribe()
    }

    /// Runs `fut` as one of this service's tasks, until it ends or the service stops.
    fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static) {
        let stop = self.stop.clone();
        self.tasks.spawn(async move {
            stop.run_until_cancelled(fut).await;
        });
    }

    /// Starts the blob server and the two fetch workers (small blobs, large blobs), after
    /// removing chunk files that no transfer will resume. The service's own tasks (these, the
    /// transfers they serve and the retry timers) run until `shutdown` is cancelled; one task
    /// in `tasks` waits for that and then for all of them, so joining `tasks` joins the
    /// service. Starting twice starts nothing new.
    pub fn start(self: &Arc<Self>, tasks: &mut JoinSet<()>, shutdown: CancellationToken) {
        if !self.start_tasks() {
            return;
        }
        let this = self.clone();
        tasks.spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = this.stop.cancelled() => {}
            }
            this.shutdown().await;
        });
    }

    /// Spawns the service's long-running tasks; false if they run already.
    fn start_tasks(self: &Arc<Self>) -> bool {
        let Some((small, large)) = self.queues.lock().unwrap_or_else(|e| e.into_inner()).take()
        else {
            return false;
        };
        // The sweep reads every blob's record: off the start-up path, beside everything else
        // (it leaves what begins after it started alone).
        match self.store.new_blob_internal() {
            Ok(below) => {
                let this = self.clone();
                self.spawn(async move {
                    let swept = tokio::task::spawn_blocking(move || this.collect_garbage(below));
                    match swept.await {
                        Err(e) if e.is_panic() => tracing::warn!("the blob garbage sweep panicked"),
                        // Cancelled before it ran: the node is shutting down.
                        Err(_) => {
                            tracing::debug!("the blob garbage sweep did not run (shutting down)")
                        }
                        Ok(()) => {}
                    }
                });
            }
            Err(e) => tracing::warn!(error = %e, "cannot collect blob garbage"),
        }
        if let Some(mut incoming) = self.net.accept_blob_streams() {
            let this = self.clone();
            self.spawn(async move {
                while let Some((peer, stream)) = incoming.next().await {
                    let server = this.clone();
                    this.spawn(async move {
                        if let Err(e) = server.serve(peer, stream).await {
                            tracing::debug!(%peer, error = %e, "blob request ended");
                        }
                    });
                }
            });
        }
        for mut rx in [small, large] {
            let this = self.clone();
            self.spawn(async move {
                while let Some(id) = rx.recv().await {
                    let peers = this.announcers(&id);
                    let done = match this.fetch(id, &peers).await {
                        Ok(true) => true,
                        Ok(false) => {
                            tracing::debug!(blob = %id, "blob not available from any peer yet");
                            false
                        }
                        Err(e) => {
                            tracing::warn!(blob = %id, error = %e, "blob fetch failed");
                            false
                        }
                    };
                    this.fetched(id, done);
                }
            });
        }
        true
    }

    /// Stops every task of the service (server, workers, retry timers) and waits for them.
    /// A transfer cut off here resumes at the next start.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Peers that announced `id`.
    fn announcers(&self, id: &ContentId) -> Vec<PeerId> {
        self.state()
            .wanted
            .get(id)
            .map(|(_, p)| p.clone())
            .unwrap_or_default()
    }

    /// A peer announced a blob. Unless it is queued or being fetched already, it is queued:
    /// a new announcement (a new peer, or one that reconnected) is also when a transfer that
    /// failed before is tried again.
    pub fn want(&self, id: ContentId, len: u64, peer: PeerId) {
        let mut st = self.state();
        let entry = st.wanted.entry(id).or_insert((len, Vec::new()));
        if !entry.1.contains(&peer) {
            entry.1.push(peer);
        }
        let len = entry.0;
        if st.queued.insert(id) {
            drop(st);
            self.enqueue(id, len);
        }
    }

    /// Puts a blob (already marked queued) in its fetch queue.
    fn enqueue(&self, id: ContentId, len: u64) {
        let q = if len <= EAGER_LIMIT {
            &self.small
        } else {
            &self.large
        };
        if q.try_send(id).is_err() {
            // Full: the next announcement queues it again.
            self.state().queued.remove(&id);
        }
    }

    /// The back-off before retrying a blob that failed `failures` times in a row: 1 s,
    /// doubling to 64 s.
    pub fn backoff(failures: u32) -> Duration {
        Duration::from_secs(1 << failures.saturating_sub(1).min(MAX_BACKOFF_DOUBLINGS))
    }

    /// After a fetch: forgets the failures of a blob that arrived; for one that did not, tries
    /// again after a back-off ([`Blobs::backoff`]) if a device that announced it is still
    /// connected. If none is, the next announcement (on reconnect) queues it.
    fn fetched(self: &Arc<Self>, id: ContentId, done: bool) {
        let mut st = self.state();
        st.queued.remove(&id);
        if done {
            st.failures.remove(&id);
            return;
        }
        let failures = st.failures.entry(id).or_insert(0);
        *failures += 1;
        let delay = Self::backoff(*failures);
        drop(st);
        let this = self.clone();
        self.spawn(async move {
            tokio::time::sleep(delay).await;
            let connected = this.net.connected_peers();
            let mut st = this.state();
            let Some((len, peers)) = st.wanted.get(&id) else {
                return;
            };
            let len = *len;
            if peers.iter().any(|p| connected.contains(p)) && st.queued.insert(id) {
                drop(st);
                tracing::debug!(blob = %id, ?delay, "retrying blob fetch");
                this.enqueue(id, len);
            }
        });
    }

    /// Transfers in progress: `(blob, chunks done, chunks total)`.
    pub fn active(&self) -> Vec<(ContentId, u32, u32)> {
        self.state()
            .active
            .iter()
            .map(|(id, (d, t))| (*id, *d, *t))
            .collect()
    }

    /// Bytes of blobs that `peer` announced and that are not here yet.
    pub fn pending_bytes_from(&self, peer: &PeerId) -> u64 {
        self.state()
            .wanted
            .values()
            .filter(|(_, peers)| peers.contains(peer))
            .map(|(l, _)| *l)
            .sum()
    }

    /// Bytes announced by peers and not yet here.
    pub fn pending_bytes(&self) -> u64 {
        self.state().wanted.values().map(|(l, _)| *l).sum()
    }

    /// Fetches a blob now (from any connected device that announced it, or any connected
    /// trusted device), waiting for the transfer.
    pub async fn fetch_now(&self, id: ContentId) -> Result<(), FetchError> {
        if self.store.blob_meta(id.as_bytes())?.is_some() {
            return Ok(());
        }
        let mut peers = self.announcers(&id);
        let trusted = self.trust.state();
        for p in self.net.connected_peers() {
            if !peers.contains(&p)
                && DeviceId::from_peer_id(&p).is_ok_and(|d| trusted.is_trusted(&d))
            {
                peers.push(p);
            }
        }
        if self.fetch(id, &peers).await? {
            Ok(())
        } else {
            Err(FetchError::Unavailable(id))
        }
    }

    /// Removes chunk files left by adds and transfers that were interrupted and will not resume
    /// (transfers with a progress record are kept, to resume), under internal numbers below
    /// `below` (see [`Store::collect_blob_garbage_below`]).
    fn collect_garbage(&self, below: u64) {
        let keep: Vec<u64> = self
            .store
            .state_scan(PROGRESS_PREFIX.as_bytes())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(_, v)| serde_cbor::from_slice::<Progress>(&v).ok())
            .map(|p| p.internal)
            .collect();
        match self.store.collect_blob_garbage_below(&keep, below) {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "removed chunks of interrupted blob adds"),
            Err(e) => tracing::warn!(error = %e, "cannot collect blob garbage"),
        }
    }

    /// Answers one `/iom/blob/1` request from `peer`: a refusal if it is not trusted, else the
    /// manifest and the chunks from the one asked for.
    pub async fn serve<S>(&self, peer: PeerId, mut stream: S) -> Result<(), ServeError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let req: Option<BlobRequest> = read_msg(&mut stream, MAX_REQUEST_FRAME).await?;
        let Some(BlobRequest::Get { id, from_chunk }) = req else {
            return Ok(());
        };
        let trusted =
            DeviceId::from_peer_id(&peer).is_ok_and(|d| self.trust.state().is_trusted(&d));
        if !trusted {
            let reason = "not trusted: /iom/blob/1 is only for devices of this person".to_string();
            send(
                &mut stream,
                &BlobResponse::Refused {
                    reason: reason.clone(),
                },
            )
            .await?;
            if self.gate.refuse(peer, "/iom/blob/1", &reason) == Verdict::Disconnect {
                self.net.disconnect_peer(peer).await;
            }
            return Ok(());
        }
        let Some(meta) = self.store.blob_meta(id.as_bytes())? else {
            return send(&mut stream, &BlobResponse::NotFound).await;
        };
        send(
            &mut stream,
            &BlobResponse::Manifest {
                len: meta.len,
                chunk_size: CHUNK_SIZE as u32,
                chunk_hashes: meta.chunk_hashes.concat(),
            },
        )
        .await?;
        let count = meta.chunk_hashes.len() as u32;
        let reader = {
            let store = self.store.clone();
            let id = *id.as_bytes();
            Arc::new(
                tokio::task::spawn_blocking(move || store.chunk_reader(id, Arc::new(meta)))
                    .await??,
            )
        };
        // Read (and check) the next chunks while these are being sent, a few per blocking hop
        // (each hop is two thread hand-overs), into the buffers the ones before were sent from.
        let read = |first: u32, mut bufs: Vec<Vec<u8>>| {
            let reader = reader.clone();
            let last = first.saturating_add(READ_GROUP).min(count);
            tokio::task::spawn_blocking(move || {
                bufs.resize_with((last - first) as usize, Vec::new);
                for (index, buf) in (first..last).zip(bufs.iter_mut()) {
                    reader.read(index, buf)?;
                }
                Ok::<_, StoreError>(bufs)
            })
        };
        let mut next = (from_chunk < count).then(|| read(from_chunk, Vec::new()));
        let mut spare = Vec::new();
        let mut index = from_chunk;
        while let Some(pending) = next.take() {
            let mut group = pending.await??;
            let after = index + group.len() as u32;
            if after < count {
                next = Some(read(after, std::mem::take(&mut spare)));
            }
            for bytes in &mut group {
                if self.config.corrupt_chunks
                    && let Some(b) = bytes.first_mut()
                {
                    *b ^= 0xff;
                }
                let head = BlobResponse::chunk_prefix(index, bytes.len())?;
                write_frame_parts(&mut stream, &head, bytes, MAX_BLOB_FRAME).await?;
                stream.flush().await.map_err(FramedError::Io)?;
                index += 1;
            }
            spare = group;
        }
        let _ = stream.close().await;
        Ok(())
    }

    /// Fetches `id`, trying each peer in turn; returns whether the blob is now stored. One
    /// transfer per blob runs at a time: a second caller waits for the first one's outcome.
    async fn fetch(&self, id: ContentId, peers: &[PeerId]) -> Result<bool, FetchError> {
        let waiter = {
            let mut guard = self.state();
            let st = &mut *guard;
            match st.active.entry(id) {
                std::collections::hash_map::Entry::Occupied(_) => {
                    let (tx, rx) = oneshot::channel();
                    st.waiters.entry(id).or_default().push(tx);
                    Some(rx)
                }
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert((0, 0));
                    None
                }
            }
        };
        if let Some(rx) = waiter {
            // The transfer's owner went away without an answer only if it was cancelled.
            return Ok(rx.await.unwrap_or(false));
        }
        let mut flight = InFlight {
            state: &self.state,
            id,
            done: false,
        };
        for peer in peers {
            if self.store.blob_meta(id.as_bytes())?.is_some() {
                break;
            }
            match self.fetch_from(id, *peer).await {
                Ok(()) => break,
                Err(TransferError::Peer(fault)) => {
                    tracing::warn!(%peer, blob = %id, reason = %fault, "peer sent bad blob data; disconnecting");
                    self.net.disconnect_peer(*peer).await;
                }
                Err(TransferError::Store(e)) => return Err(e.into()),
                Err(reason) => {
                    tracing::debug!(%peer, blob = %id, %reason, "blob fetch from peer failed");
                }
            }
        }
        let arrived = self.store.blob_meta(id.as_bytes())?;
        flight.done = arrived.is_some();
        drop(flight);
        match arrived {
            Some(meta) => {
                let _ = self.arrivals.send((id, meta.len));
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn next_response<S>(&self, s: &mut S) -> Result<BlobResponse, TransferError>
    where
        S: AsyncRead + Unpin,
    {
        let frame = self.next_frame(s, read_frame).await?;
        BlobResponse::decode(&frame).map_err(|e| PeerFault::Decode(e).into())
    }

    /// The next chunk, kept in the frame it arrived in (no copy), with its index.
    async fn next_chunk<S>(&self, s: &mut S) -> Result<(u32, bytes::Bytes), TransferError>
    where
        S: AsyncRead + Unpin,
    {
        let frame = self.next_frame(s, read_frame_bytes).await?;
        match BlobResponse::chunk_span(&frame) {
            Some(span) => Ok((span.index, frame.slice(span.bytes))),
            None => match BlobResponse::decode(&frame) {
                Ok(_) => Err(PeerFault::ExpectedChunk.into()),
                Err(e) => Err(PeerFault::Decode(e).into()),
            },
        }
    }

    /// The next frame read by `read` (within the response timeout).
    async fn next_frame<'s, S, F, T>(
        &self,
        s: &'s mut S,
        read: impl FnOnce(&'s mut S, usize) -> F,
    ) -> Result<T, TransferError>
    where
        S: AsyncRead + Unpin,
        F: Future<Output = Result<Option<T>, FramedError>>,
    {
        match tokio::time::timeout(self.config.response_timeout, read(s, MAX_BLOB_FRAME)).await {
            Err(_) => Err(TransferError::TimedOut),
            Ok(Err(e)) => Err(TransferError::framed(e)),
            Ok(Ok(None)) => Err(TransferError::Closed),
            Ok(Ok(Some(frame))) => Ok(frame),
        }
    }

    /// The manifest a transfer is following, persisted once so a transfer can resume.
    fn load_progress(&self, key: &[u8]) -> Result<Option<Progress>, StoreError> {
        Ok(self
            .store
            .state_get(key)?
            .and_then(|b| serde_cbor::from_slice(&b).ok()))
    }

    /// Opens (or resumes) the receiver for `p` on the blocking pool.
    async fn open_receiver(
        &self,
        id: ContentId,
        p: &Progress,
    ) -> Result<BlobReceiver, TransferError> {
        let store = self.store.clone();
        let (internal, len, hashes) = (p.internal, p.len, chunk_hashes(&p.hashes));
        Ok(tokio::task::spawn_blocking(move || {
            store.receive_blob(*id.as_bytes(), internal, len, hashes)
        })
        .await??)
    }

    async fn fetch_from(&self, id: ContentId, peer: PeerId) -> Result<(), TransferError> {
        let key = progress_key(&id);
        let mut progress = self.load_progress(&key)?;
        // Resuming: the chunks on disk are verified again first; go on after the last good one.
        let mut receiver = match &progress {
            Some(p) => match self.open_receiver(id, p).await {
                Ok(r) => Some(r),
                Err(_) => {
                    self.store.discard_chunks(p.internal, p.hashes.len() / 32)?;
                    self.store.state_remove(&key)?;
                    progress = None;
                    None
                }
            },
            None => None,
        };
        let from_chunk = receiver.as_ref().map_or(0, BlobReceiver::done);
        if from_chunk > 0 {
            tracing::info!(blob = %id, from_chunk, "resuming blob transfer");
        }
        let mut stream = self.net.open_blob_stream(peer).await?;
        let req = serde_cbor::to_vec(&BlobRequest::Get { id, from_chunk })
            .map_err(TransferError::Encode)?;
        write_frame(&mut stream, &req, MAX_REQUEST_FRAME)
            .await
            .map_err(TransferError::framed)?;
        let (len, chunk_size, hashes) = match self.next_response(&mut stream).await? {
            BlobResponse::Manifest {
                len,
                chunk_size,
                chunk_hashes,
            } => (len, chunk_size, chunk_hashes),
            BlobResponse::NotFound => return Err(TransferError::NotFound),
            BlobResponse::Refused { reason } => return Err(TransferError::Refused(reason)),
            _ => return Err(PeerFault::ExpectedManifest.into()),
        };
        if chunk_size as usize != CHUNK_SIZE
            || hashes.len() % 32 != 0
            || (hashes.len() / 32) as u64 != chunk_count(len)
        {
            return Err(PeerFault::BadManifest {
                len,
                chunk_size,
                hash_bytes: hashes.len(),
            }
            .into());
        }
        // A different manifest than the one we resumed: start over.
        if let Some(p) = &progress
            && (p.hashes != hashes || p.len != len)
        {
            self.store.discard_chunks(p.internal, p.hashes.len() / 32)?;
            self.store.state_remove(&key)?;
            return Err(TransferError::ManifestChanged);
        }
        let receiver = match receiver.take() {
            Some(r) => r,
            None => {
                let p = Progress {
                    internal: self.store.new_blob_internal()?,
                    len,
                    hashes,
                };
                if let Ok(b) = serde_cbor::to_vec(&p) {
                    self.store.state_put(&key, &b)?;
                }
                // Durable before the first chunk lands: without it a crash would leave a chunk
                // file nobody claims, removed as garbage at the next start, and the transfer
                // would start over instead of resuming.
                self.store.flush().await?;
                self.open_receiver(id, &p).await?
            }
        };
        let count = receiver.count();
        self.state().active.insert(id, (from_chunk, count));

        // The network side reads chunks and checks their order; the disk side (a blocking
        // thread) hashes each into the whole content, writes it and records progress, a few
        // chunks behind. Wrong bytes are found when the whole hash is checked at the end.
        let (tx, mut rx) = mpsc::channel::<bytes::Bytes>(RECEIVE_AHEAD);
        let disk = {
            let state = self.state.clone();
            let mut receiver = receiver;
            tokio::task::spawn_blocking(move || -> Result<BlobReceiver, TransferError> {
                while let Some(bytes) = rx.blocking_recv() {
                    match receiver.put(bytes) {
                        Ok(()) => {}
                        Err(StoreError::ChunkLength { index, .. }) => {
                            return Err(PeerFault::ChunkHash(index).into());
                        }
                        Err(e) => return Err(e.into()),
                    }
                    lock(&state)
                        .active
                        .insert(id, (receiver.written(), receiver.count()));
                }
                Ok(receiver)
            })
        };
        let network = async {
            for expected in from_chunk..count {
                let (index, bytes) = self.next_chunk(&mut stream).await?;
                if index != expected {
                    return Err(PeerFault::ChunkOrder { index, expected }.into());
                }
                if tx.send(bytes).await.is_err() {
                    break; // the disk side stopped; its error says why
                }
            }
            Ok(())
        }
        .await;
        drop(tx);
        let receiver = disk.await??;
        if let Err(e) = network {
            // Dropping the receiver waits for its writer: not on this thread. Waited for, so a
            // retry finds every chunk that arrived on disk.
            tokio::task::spawn_blocking(move || drop(receiver)).await?;
            return Err(e);
        }
        let published = tokio::task::spawn_blocking(move || receiver.finish()).await?;
        self.store.state_remove(&key)?;
        match published {
            Ok(_) => {
                self.store.flush().await?;
                tracing::info!(blob = %id, len, "blob received");
                Ok(())
            }
            Err(StoreError::BadChunk { index }) => Err(PeerFault::ChunkHash(index).into()),
            Err(StoreError::HashMismatch { .. }) => Err(PeerFault::WholeHash.into()),
            Err(e) => Err(e.into()),
        }
    }
}

/// One page of announcements of the blobs in `store`: up to `max` blobs after `after`, in id
/// order (a storage error is logged and reads as no more blobs).
pub fn announcement_page(
    store: &Store,
    after: Option<ContentId>,
    max: usize,
) -> Vec<(ContentId, u64)> {
    match store.blob_page(after.as_ref().map(ContentId::as_bytes), max) {
        Ok(page) => page
            .into_iter()
            .map(|(id, len)| (ContentId::from_bytes(id), len))
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read blobs to announce");
            Vec::new()
        }
    }
}

async fn send<S>(stream: &mut S, msg: &BlobResponse) -> Result<(), ServeError>
where
    S: AsyncWrite + Unpin,
{
    let bytes = msg.encode()?;
    write_frame(stream, &bytes, MAX_BLOB_FRAME).await?;
    Ok(())
}

fn progress_key(id: &ContentId) -> Vec<u8> {
    format!("{PROGRESS_PREFIX}{id}").into_bytes()
}

fn chunk_hashes(hashes: &[u8]) -> Vec<[u8; 32]> {
    hashes
        .chunks_exact(32)
        .filter_map(|c| <[u8; 32]>::try_from(c).ok())
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use futures::future::BoxFuture;
    use iom_protocol::cert::{CertBody, Certificate};
    use iom_protocol::keys::{DeviceKey, PersonKey};
    use iom_protocol::wire::MAX_BLOB_ANNOUNCE;
    use tokio_util::compat::{Compat, TokioAsyncReadCompatExt};

    use super::*;

    type Duplex = Compat<tokio::io::DuplexStream>;
    type Handler = Arc<dyn Fn(Duplex) -> BoxFuture<'static, ()> + Send + Sync>;

    /// A network of in-memory streams: each open runs the handler registered for the peer.
    #[derive(Default)]
    struct FakeNet {
        connected: Mutex<Vec<PeerId>>,
        handlers: Mutex<HashMap<PeerId, Handler>>,
        opens: AtomicUsize,
        disconnected: Mutex<Vec<PeerId>>,
    }

    impl BlobNet for Arc<FakeNet> {
        type Stream = Duplex;

        fn connected_peers(&self) -> Vec<PeerId> {
            self.connected.lock().unwrap().clone()
        }

        fn open_blob_stream(
            &self,
            peer: PeerId,
        ) -> impl Future<Output = Result<Duplex, NetError>> + Send {
            self.opens.fetch_add(1, Ordering::SeqCst);
            let handler = self.handlers.lock().unwrap().get(&peer).cloned();
            async move {
                let Some(handler) = handler else {
                    return Err(NetError::Stream {
                        peer,
                        protocol: BLOB_PROTOCOL.to_string(),
                        reason: "not connected".into(),
                    });
                };
                let (ours, theirs) = tokio::io::duplex(64 * 1024);
                tokio::spawn(handler(theirs.compat()));
                Ok(ours.compat())
            }
        }

        fn disconnect_peer(&self, peer: PeerId) -> impl Future<Output = ()> + Send {
            self.disconnected.lock().unwrap().push(peer);
            async {}
        }

        fn accept_blob_streams(&self) -> Option<BoxStream<'static, (PeerId, Duplex)>> {
            None
        }
    }

    fn person() -> PersonKey {
        PersonKey::from_seed([1; 32])
    }

    fn device(seed: u8) -> DeviceKey {
        DeviceKey::from_seed([seed; 32])
    }

    fn device_cert(seed: u8) -> Certificate {
        let body = CertBody::Device {
            kind: None,
            person: person().id(),
            device: device(seed).id(),
            name: format!("d{seed}"),
            admin: false,
            issued_at: 1,
        };
        Certificate::issue_by_person(body, &person()).unwrap()
    }

    /// One device: a store, a trust book trusting `trusted`, and its blob service.
    struct Side {
        _dir: tempfile::TempDir,
        store: Store,
        net: Arc<FakeNet>,
        blobs: Arc<Blobs<Arc<FakeNet>>>,
        peer: PeerId,
    }

    async fn side(seed: u8, trusted: &[u8], config: BlobsConfig) -> Side {
        let (dir, store) = crate::store::temp_store();
        let trust = Arc::new(TrustBook::load(store.clone(), person().id()).unwrap());
        trust
            .add(trusted.iter().map(|s| device_cert(*s)).collect())
            .await
            .unwrap();
        let net = Arc::new(FakeNet::default());
        let blobs = Arc::new(Blobs::new(
            store.clone(),
            net.clone(),
            trust,
            Arc::new(Gate::default()),
            config,
        ));
        Side {
            _dir: dir,
            store,
            net,
            blobs,
            peer: device(seed).id().to_peer_id(),
        }
    }

    /// A client (device 2) and a server (device 3) that trust each other.
    async fn pair() -> (Side, Side) {
        let client = side(2, &[2, 3], BlobsConfig::default()).await;
        let server = side(3, &[2, 3], BlobsConfig::default()).await;
        connect(&client, &server);
        (client, server)
    }

    /// `client` reaches `server`'s real blob server.
    fn connect(client: &Side, server: &Side) {
        let blobs = server.blobs.clone();
        let from = client.peer;
        let handler: Handler = Arc::new(move |s| {
            let blobs = blobs.clone();
            Box::pin(async move {
                let _ = blobs.serve(from, s).await;
            })
        });
        connect_with(client, server.peer, handler);
    }

    fn connect_with(client: &Side, peer: PeerId, handler: Handler) {
        client.net.handlers.lock().unwrap().insert(peer, handler);
        client.net.connected.lock().unwrap().push(peer);
    }

    fn content(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    async fn add_blob(store: &Store, len: usize) -> (ContentId, Vec<u8>) {
        let bytes = content(len);
        let mut w = store.blob_writer(None).unwrap();
        w.write(&bytes).unwrap();
        let (id, _) = w.finish().await.unwrap();
        (ContentId::from_bytes(id), bytes)
    }

    fn read_blob(store: &Store, id: &ContentId) -> Option<Vec<u8>> {
        let meta = store.blob_meta(id.as_bytes()).unwrap()?;
        let mut out = Vec::new();
        for i in 0..meta.chunk_hashes.len() as u32 {
            out.extend(store.blob_chunk(id.as_bytes(), &meta, i).unwrap());
        }
        Some(out)
    }

    /// How a fake server misbehaves.
    #[derive(Clone, Copy)]
    enum Fake {
        /// Serves honestly.
        Honest,
        /// Closes the stream after this many chunks.
        CutAfter(u32),
        /// Numbers chunks one too high.
        OutOfOrder,
        /// A manifest with one hash too many.
        BadManifest,
        /// A chunk where the manifest should be.
        ChunkFirst,
        /// Reads the request and never answers.
        Silent,
    }

    /// A server over `store` that behaves as `how` says and records the `from_chunk` of
    /// every request.
    fn fake_server(store: &Store, how: Fake, asked: &Arc<Mutex<Vec<u32>>>) -> Handler {
        let (store, asked) = (store.clone(), asked.clone());
        Arc::new(move |mut s: Duplex| {
            let (store, asked) = (store.clone(), asked.clone());
            Box::pin(async move {
                let Ok(Some(BlobRequest::Get { id, from_chunk })) =
                    read_msg::<BlobRequest, _>(&mut s, MAX_REQUEST_FRAME).await
                else {
                    return;
                };
                asked.lock().unwrap().push(from_chunk);
                let meta = store.blob_meta(id.as_bytes()).unwrap().unwrap();
                let count = meta.chunk_hashes.len() as u32;
                let manifest = match how {
                    Fake::Silent => return futures::future::pending().await,
                    Fake::ChunkFirst => BlobResponse::Chunk {
                        index: 0,
                        bytes: vec![1],
                    },
                    Fake::BadManifest => BlobResponse::Manifest {
                        len: meta.len,
                        chunk_size: CHUNK_SIZE as u32,
                        chunk_hashes: vec![0; 32 * (count as usize + 1)],
                    },
                    _ => BlobResponse::Manifest {
                        len: meta.len,
                        chunk_size: CHUNK_SIZE as u32,
                        chunk_hashes: meta.chunk_hashes.concat(),
                    },
                };
                if send(&mut s, &manifest).await.is_err() {
                    return;
                }
                for index in from_chunk..count {
                    if matches!(how, Fake::CutAfter(n) if index >= n) {
                        return;
                    }
                    let bytes = store.blob_chunk(id.as_bytes(), &meta, index).unwrap();
                    let index = if matches!(how, Fake::OutOfOrder) {
                        index + 1
                    } else {
                        index
                    };
                    if send(&mut s, &BlobResponse::Chunk { index, bytes })
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                let _ = s.close().await;
            })
        })
    }

    fn queues(b: &Blobs<Arc<FakeNet>>) -> Queues {
        b.queues.lock().unwrap().take().unwrap()
    }

    fn blob_id(n: u8) -> ContentId {
        ContentId::from_bytes([n; 32])
    }

    #[tokio::test]
    async fn want_queues_each_blob_once_and_records_every_announcer() {
        let s = side(2, &[], BlobsConfig::default()).await;
        let (mut small, mut large) = queues(&s.blobs);
        let (a, b) = (device(5).id().to_peer_id(), device(6).id().to_peer_id());
        s.blobs.want(blob_id(1), 100, a);
        s.blobs.want(blob_id(1), 100, b);
        s.blobs.want(blob_id(1), 100, b);
        s.blobs.want(blob_id(2), 50, b);
        assert_eq!(small.try_recv().unwrap(), blob_id(1));
        assert_eq!(small.try_recv().unwrap(), blob_id(2));
        assert!(small.try_recv().is_err(), "each blob is queued once");
        assert!(large.try_recv().is_err());
        assert_eq!(s.blobs.announcers(&blob_id(1)), vec![a, b]);
        assert_eq!(s.blobs.pending_bytes(), 150);
        assert_eq!(s.blobs.pending_bytes_from(&a), 100);
        assert_eq!(s.blobs.pending_bytes_from(&b), 150);
        let stranger = device(7).id().to_peer_id();
        assert_eq!(s.blobs.pending_bytes_from(&stranger), 0);
    }

    #[tokio::test]
    async fn blobs_over_the_eager_limit_go_to_the_background_queue() {
        let s = side(2, &[], BlobsConfig::default()).await;
        let (mut small, mut large) = queues(&s.blobs);
        let peer = device(5).id().to_peer_id();
        s.blobs.want(blob_id(1), EAGER_LIMIT, peer);
        s.blobs.want(blob_id(2), EAGER_LIMIT + 1, peer);
        assert_eq!(small.try_recv().unwrap(), blob_id(1));
        assert_eq!(large.try_recv().unwrap(), blob_id(2));
        assert!(small.try_recv().is_err() && large.try_recv().is_err());
    }

    #[tokio::test]
    async fn an_announcement_that_finds_its_queue_full_is_queued_by_the_next() {
        let config = BlobsConfig {
            queue_len: 1,
            ..BlobsConfig::default()
        };
        let s = side(2, &[], config).await;
        let (mut small, _large) = queues(&s.blobs);
        let peer = device(5).id().to_peer_id();
        s.blobs.want(blob_id(1), 10, peer);
        s.blobs.want(blob_id(2), 10, peer); // the queue is full
        assert!(!s.blobs.state().queued.contains(&blob_id(2)));
        assert_eq!(small.try_recv().unwrap(), blob_id(1));
        s.blobs.want(blob_id(2), 10, peer);
        assert_eq!(small.try_recv().unwrap(), blob_id(2));
        // Still wanted meanwhile: its bytes count as pending.
        assert_eq!(s.blobs.pending_bytes(), 20);
    }

    #[test]
    fn the_backoff_doubles_from_one_second_to_64() {
        let secs: Vec<u64> = (1..=9)
            .map(|f| Blobs::<Net>::backoff(f).as_secs())
            .collect();
        assert_eq!(secs, vec![1, 2, 4, 8, 16, 32, 64, 64, 64]);
        assert_eq!(Blobs::<Net>::backoff(u32::MAX).as_secs(), 64);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_fetch_is_retried_after_the_backoff_while_an_announcer_is_connected() {
        let s = side(2, &[], BlobsConfig::default()).await;
        let (mut small, _large) = queues(&s.blobs);
        let peer = device(5).id().to_peer_id();
        s.net.connected.lock().unwrap().push(peer);
        s.blobs.want(blob_id(1), 10, peer);
        assert_eq!(small.try_recv().unwrap(), blob_id(1));

        s.blobs.fetched(blob_id(1), false);
        tokio::time::sleep(Duration::from_millis(999)).await;
        assert!(small.try_recv().is_err(), "not before one second");
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert_eq!(small.try_recv().unwrap(), blob_id(1));

        // The second failure in a row waits two seconds.
        s.blobs.fetched(blob_id(1), false);
        tokio::time::sleep(Duration::from_millis(1999)).await;
        assert!(small.try_recv().is_err(), "not before two seconds");
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert_eq!(small.try_recv().unwrap(), blob_id(1));
        assert_eq!(s.blobs.state().failures.get(&blob_id(1)), Some(&2));
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_connected_announcer_only_the_next_announcement_retries() {
        let s = side(2, &[], BlobsConfig::default()).await;
        let (mut small, _large) = queues(&s.blobs);
        let peer = device(5).id().to_peer_id();
        s.blobs.want(blob_id(1), 10, peer);
        assert_eq!(small.try_recv().unwrap(), blob_id(1));
        s.blobs.fetched(blob_id(1), false);
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert!(small.try_recv().is_err(), "nobody who has it is connected");
        assert!(!s.blobs.state().queued.contains(&blob_id(1)));
        // It reconnects and announces again.
        s.blobs.want(blob_id(1), 10, peer);
        assert_eq!(small.try_recv().unwrap(), blob_id(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_blob_that_arrived_forgets_its_failures_and_is_not_retried() {
        let s = side(2, &[], BlobsConfig::default()).await;
        let (mut small, _large) = queues(&s.blobs);
        let peer = device(5).id().to_peer_id();
        s.net.connected.lock().unwrap().push(peer);
        s.blobs.want(blob_id(1), 10, peer);
        let _ = small.try_recv();
        s.blobs.fetched(blob_id(1), false);
        tokio::time::sleep(Duration::from_millis(1001)).await;
        assert_eq!(small.try_recv().unwrap(), blob_id(1));
        s.blobs.fetched(blob_id(1), true);
        assert!(s.blobs.state().failures.is_empty());
        assert!(s.blobs.state().queued.is_empty());
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert!(small.try_recv().is_err());
    }

    #[tokio::test]
    async fn a_blob_travels_whole_across_chunks_and_is_announced() {
        let (client, server) = pair().await;
        let (id, bytes) = add_blob(&server.store, 2 * CHUNK_SIZE + CHUNK_SIZE / 2).await;
        let mut arrivals = client.blobs.arrivals();
        client.blobs.want(id, bytes.len() as u64, server.peer);
        assert_eq!(client.blobs.pending_bytes(), bytes.len() as u64);
        assert!(client.blobs.fetch(id, &[server.peer]).await.unwrap());
        assert_eq!(read_blob(&client.store, &id).unwrap(), bytes);
        assert_eq!(arrivals.try_recv().unwrap(), (id, bytes.len() as u64));
        assert_eq!(client.blobs.pending_bytes(), 0, "no longer wanted");
        assert!(client.blobs.active().is_empty());
        assert!(
            client
                .store
                .state_get(&progress_key(&id))
                .unwrap()
                .is_none()
        );
        assert!(client.net.disconnected.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn an_empty_blob_travels_too() {
        let (client, server) = pair().await;
        let (id, _) = add_blob(&server.store, 0).await;
        assert!(client.blobs.fetch(id, &[server.peer]).await.unwrap());
        assert_eq!(read_blob(&client.store, &id).unwrap(), Vec::<u8>::new());
    }

    #[tokio::test]
    async fn fetch_now_asks_connected_trusted_devices_that_never_announced_it() {
        let (client, server) = pair().await;
        let (id, bytes) = add_blob(&server.store, 1000).await;
        client.blobs.fetch_now(id).await.unwrap();
        assert_eq!(read_blob(&client.store, &id).unwrap(), bytes);
    }

    #[tokio::test]
    async fn fetch_now_skips_connected_devices_that_are_not_trusted() {
        // The client trusts only itself: the connected server is a stranger to it.
        let client = side(2, &[2], BlobsConfig::default()).await;
        let server = side(3, &[2, 3], BlobsConfig::default()).await;
        connect(&client, &server);
        let (id, _) = add_blob(&server.store, 1000).await;
        let err = client.blobs.fetch_now(id).await.unwrap_err();
        assert!(
            matches!(err, FetchError::Unavailable(i) if i == id),
            "{err}"
        );
        assert_eq!(client.net.opens.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn fetch_now_of_a_blob_held_opens_nothing() {
        let (client, _server) = pair().await;
        let (id, _) = add_blob(&client.store, 1000).await;
        client.blobs.fetch_now(id).await.unwrap();
        assert_eq!(client.net.opens.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn fetch_now_without_a_peer_that_has_it_is_unavailable() {
        let (client, _server) = pair().await;
        let err = client.blobs.fetch_now(blob_id(9)).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("no connected device has blob {}", blob_id(9))
        );
        assert!(
            client.net.disconnected.lock().unwrap().is_empty(),
            "not having a blob is not a fault"
        );
    }

    #[tokio::test]
    async fn an_untrusted_peer_is_refused_and_disconnected_when_it_keeps_knocking() {
        let client = side(2, &[2, 3], BlobsConfig::default()).await;
        let server = side(3, &[3], BlobsConfig::default()).await; // does not trust the client
        connect(&client, &server);
        let (id, _) = add_blob(&server.store, 1000).await;
        for _ in 0..super::super::gate::MAX_REFUSALS_PER_MINUTE {
            assert!(!client.blobs.fetch(id, &[server.peer]).await.unwrap());
        }
        assert!(server.net.disconnected.lock().unwrap().is_empty());
        assert!(!client.blobs.fetch(id, &[server.peer]).await.unwrap());
        assert_eq!(*server.net.disconnected.lock().unwrap(), vec![client.peer]);
        assert!(
            client.net.disconnected.lock().unwrap().is_empty(),
            "a refusal is not the server's fault"
        );
        assert!(client.store.blob_meta(id.as_bytes()).unwrap().is_none());
    }

    #[tokio::test]
    async fn corrupted_chunks_disconnect_the_sender_and_nothing_is_kept() {
        let client = side(2, &[2, 3], BlobsConfig::default()).await;
        let config = BlobsConfig {
            corrupt_chunks: true,
            ..BlobsConfig::default()
        };
        let server = side(3, &[2, 3], config).await;
        connect(&client, &server);
        let (id, _) = add_blob(&server.store, CHUNK_SIZE + 10).await;
        assert!(!client.blobs.fetch(id, &[server.peer]).await.unwrap());
        assert_eq!(*client.net.disconnected.lock().unwrap(), vec![server.peer]);
        assert!(client.store.blob_meta(id.as_bytes()).unwrap().is_none());
    }

    #[tokio::test]
    async fn after_a_bad_peer_the_next_one_is_tried() {
        let client = side(2, &[2, 3, 4], BlobsConfig::default()).await;
        let bad = side(
            3,
            &[2, 3],
            BlobsConfig {
                corrupt_chunks: true,
                ..BlobsConfig::default()
            },
        )
        .await;
        let good = side(4, &[2, 4], BlobsConfig::default()).await;
        connect(&client, &bad);
        connect(&client, &good);
        let (id, bytes) = add_blob(&bad.store, 3000).await;
        add_blob(&good.store, 3000).await;
        assert!(
            client
                .blobs
                .fetch(id, &[bad.peer, good.peer])
                .await
                .unwrap()
        );
        assert_eq!(read_blob(&client.store, &id).unwrap(), bytes);
        assert_eq!(*client.net.disconnected.lock().unwrap(), vec![bad.peer]);
    }

    #[tokio::test]
    async fn a_peer_that_lacks_the_blob_or_cannot_be_reached_is_not_blamed() {
        let (client, server) = pair().await;
        let stranger = device(9).id().to_peer_id(); // no handler: opening fails
        assert!(
            !client
                .blobs
                .fetch(blob_id(1), &[stranger, server.peer])
                .await
                .unwrap()
        );
        assert_eq!(client.net.opens.load(Ordering::SeqCst), 2);
        assert!(client.net.disconnected.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_broken_transfer_resumes_after_the_chunks_on_disk() {
        let client = side(2, &[2, 3], BlobsConfig::default()).await;
        let server = side(3, &[2, 3], BlobsConfig::default()).await;
        let (id, bytes) = add_blob(&server.store, 3 * CHUNK_SIZE + 1).await;
        let asked = Arc::new(Mutex::new(Vec::new()));
        connect_with(
            &client,
            server.peer,
            fake_server(&server.store, Fake::CutAfter(2), &asked),
        );
        assert!(!client.blobs.fetch(id, &[server.peer]).await.unwrap());
        assert!(client.store.blob_meta(id.as_bytes()).unwrap().is_none());
        assert!(
            client
                .store
                .state_get(&progress_key(&id))
                .unwrap()
                .is_some(),
            "the manifest is kept to resume"
        );
        assert!(client.net.disconnected.lock().unwrap().is_empty());

        connect_with(
            &client,
            server.peer,
            fake_server(&server.store, Fake::Honest, &asked),
        );
        assert!(client.blobs.fetch(id, &[server.peer]).await.unwrap());
        assert_eq!(*asked.lock().unwrap(), vec![0, 2], "resumed at chunk 2");
        assert_eq!(read_blob(&client.store, &id).unwrap(), bytes);
        assert!(
            client
                .store
                .state_get(&progress_key(&id))
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test]
    async fn a_resumed_transfer_whose_manifest_changed_starts_over() {
        let client = side(2, &[2, 3], BlobsConfig::default()).await;
        let server = side(3, &[2, 3], BlobsConfig::default()).await;
        let (id, bytes) = add_blob(&server.store, 2 * CHUNK_SIZE + 1).await;
        // A progress record for a manifest the server does not have (a different length).
        let p = Progress {
            internal: client.store.new_blob_internal().unwrap(),
            len: 5,
            hashes: vec![7; 32],
        };
        client
            .store
            .state_put(&progress_key(&id), &serde_cbor::to_vec(&p).unwrap())
            .unwrap();
        let asked = Arc::new(Mutex::new(Vec::new()));
        connect_with(
            &client,
            server.peer,
            fake_server(&server.store, Fake::Honest, &asked),
        );
        let err = client.blobs.fetch_from(id, server.peer).await.unwrap_err();
        assert!(matches!(err, TransferError::ManifestChanged), "{err}");
        assert!(
            client
                .store
                .state_get(&progress_key(&id))
                .unwrap()
                .is_none()
        );
        // The next attempt starts from the beginning and succeeds.
        assert!(client.blobs.fetch(id, &[server.peer]).await.unwrap());
        assert_eq!(read_blob(&client.store, &id).unwrap(), bytes);
        assert_eq!(*asked.lock().unwrap(), vec![0, 0]);
    }

    async fn fault_of(how: Fake) -> TransferError {
        let client = side(2, &[2, 3], BlobsConfig::default()).await;
        let server = side(3, &[2, 3], BlobsConfig::default()).await;
        let (id, _) = add_blob(&server.store, 2 * CHUNK_SIZE + 1).await;
        let asked = Arc::new(Mutex::new(Vec::new()));
        connect_with(
            &client,
            server.peer,
            fake_server(&server.store, how, &asked),
        );
        let err = client.blobs.fetch_from(id, server.peer).await.unwrap_err();
        assert!(client.store.blob_meta(id.as_bytes()).unwrap().is_none());
        err
    }

    #[tokio::test]
    async fn chunks_out_of_order_are_the_peers_fault() {
        let err = fault_of(Fake::OutOfOrder).await;
        assert!(
            matches!(
                err,
                TransferError::Peer(PeerFault::ChunkOrder {
                    index: 1,
                    expected: 0
                })
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_manifest_that_does_not_fit_its_length_is_the_peers_fault() {
        let err = fault_of(Fake::BadManifest).await;
        assert!(
            matches!(
                err,
                TransferError::Peer(PeerFault::BadManifest {
                    hash_bytes: 128,
                    ..
                })
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_chunk_before_the_manifest_is_the_peers_fault() {
        let err = fault_of(Fake::ChunkFirst).await;
        assert!(
            matches!(err, TransferError::Peer(PeerFault::ExpectedManifest)),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_silent_peer_times_out_without_blame() {
        let client = side(
            2,
            &[2, 3],
            BlobsConfig {
                response_timeout: Duration::from_millis(50),
                ..BlobsConfig::default()
            },
        )
        .await;
        let server = side(3, &[2, 3], BlobsConfig::default()).await;
        let (id, _) = add_blob(&server.store, 10).await;
        let asked = Arc::new(Mutex::new(Vec::new()));
        connect_with(
            &client,
            server.peer,
            fake_server(&server.store, Fake::Silent, &asked),
        );
        let err = client.blobs.fetch_from(id, server.peer).await.unwrap_err();
        assert!(matches!(err, TransferError::TimedOut), "{err}");
        assert!(!client.blobs.fetch(id, &[server.peer]).await.unwrap());
        assert!(client.net.disconnected.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn concurrent_fetches_of_one_blob_share_one_transfer() {
        let (client, server) = pair().await;
        let (id, bytes) = add_blob(&server.store, CHUNK_SIZE * 2).await;
        let peers = [server.peer];
        let (a, b) = tokio::join!(
            client.blobs.fetch(id, &peers),
            client.blobs.fetch(id, &peers)
        );
        assert!(a.unwrap() && b.unwrap());
        assert_eq!(client.net.opens.load(Ordering::SeqCst), 1);
        assert_eq!(read_blob(&client.store, &id).unwrap(), bytes);
        assert!(client.blobs.state().waiters.is_empty());
    }

    #[tokio::test]
    async fn a_cancelled_transfer_releases_the_callers_waiting_for_it() {
        let client = side(2, &[2, 3], BlobsConfig::default()).await;
        let server = side(3, &[2, 3], BlobsConfig::default()).await;
        let (id, _) = add_blob(&server.store, 10).await;
        let asked = Arc::new(Mutex::new(Vec::new()));
        connect_with(
            &client,
            server.peer,
            fake_server(&server.store, Fake::Silent, &asked),
        );
        let peers = [server.peer];
        let mut first = Box::pin(client.blobs.fetch(id, &peers));
        assert!(futures::poll!(&mut first).is_pending());
        let mut second = Box::pin(client.blobs.fetch(id, &peers));
        assert!(futures::poll!(&mut second).is_pending());
        assert_eq!(client.blobs.active().len(), 1);
        drop(first);
        assert!(!second.await.unwrap(), "the transfer it waited for is gone");
        assert!(client.blobs.active().is_empty());
    }

    #[tokio::test]
    async fn the_server_sends_the_manifest_then_the_chunks_from_the_one_asked_for() {
        let server = side(3, &[2, 3], BlobsConfig::default()).await;
        let (id, bytes) = add_blob(&server.store, 3 * CHUNK_SIZE).await;
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let task = {
            let blobs = server.blobs.clone();
            let from = device(2).id().to_peer_id();
            tokio::spawn(async move { blobs.serve(from, theirs.compat()).await })
        };
        let mut s = ours.compat();
        let req = serde_cbor::to_vec(&BlobRequest::Get { id, from_chunk: 1 }).unwrap();
        write_frame(&mut s, &req, MAX_REQUEST_FRAME).await.unwrap();
        let mut got = Vec::new();
        while let Some(frame) = read_frame(&mut s, MAX_BLOB_FRAME).await.unwrap() {
            got.push(BlobResponse::decode(&frame).unwrap());
        }
        task.await.unwrap().unwrap();
        assert_eq!(got.len(), 3, "a manifest and chunks 1 and 2");
        let BlobResponse::Manifest {
            len, chunk_hashes, ..
        } = &got[0]
        else {
            panic!("expected a manifest first: {:?}", got[0]);
        };
        assert_eq!(*len, bytes.len() as u64);
        assert_eq!(chunk_hashes.len(), 3 * 32);
        for (i, r) in got[1..].iter().enumerate() {
            let BlobResponse::Chunk { index, bytes: b } = r else {
                panic!("expected a chunk: {r:?}");
            };
            let index = *index as usize;
            assert_eq!(index, i + 1);
            assert_eq!(b[..], bytes[index * CHUNK_SIZE..(index + 1) * CHUNK_SIZE]);
        }
    }

    #[tokio::test]
    async fn the_server_answers_not_found_for_a_blob_it_lacks() {
        let server = side(3, &[2, 3], BlobsConfig::default()).await;
        let (ours, theirs) = tokio::io::duplex(4096);
        let blobs = server.blobs.clone();
        let from = device(2).id().to_peer_id();
        let task = tokio::spawn(async move { blobs.serve(from, theirs.compat()).await });
        let mut s = ours.compat();
        let req = serde_cbor::to_vec(&BlobRequest::Get {
            id: blob_id(4),
            from_chunk: 0,
        })
        .unwrap();
        write_frame(&mut s, &req, MAX_REQUEST_FRAME).await.unwrap();
        let frame = read_frame(&mut s, MAX_BLOB_FRAME).await.unwrap().unwrap();
        assert!(matches!(
            BlobResponse::decode(&frame).unwrap(),
            BlobResponse::NotFound
        ));
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn announcements_name_every_stored_blob_with_its_length() {
        let s = side(2, &[], BlobsConfig::default()).await;
        assert!(announcement_page(&s.store, None, MAX_BLOB_ANNOUNCE).is_empty());
        let (a, _) = add_blob(&s.store, 10).await;
        let (b, _) = add_blob(&s.store, CHUNK_SIZE + 3).await;
        let all = announcement_page(&s.store, None, MAX_BLOB_ANNOUNCE);
        let mut expected = vec![(a, 10), (b, CHUNK_SIZE as u64 + 3)];
        expected.sort();
        assert_eq!(all, expected, "in id order");
        // Paged: the second page starts after the first.
        let first = announcement_page(&s.store, None, 1);
        assert_eq!(first, expected[..1]);
        assert_eq!(
            announcement_page(&s.store, Some(first[0].0), 1),
            expected[1..]
        );
        assert!(announcement_page(&s.store, Some(expected[1].0), 1).is_empty());
    }

    #[tokio::test]
    async fn started_workers_fetch_announced_blobs_and_shutdown_stops_them() {
        let (client, server) = pair().await;
        let (id, bytes) = add_blob(&server.store, 5000).await;
        let mut arrivals = client.blobs.arrivals();
        let (mut tasks, shutdown) = (JoinSet::new(), CancellationToken::new());
        client.blobs.start(&mut tasks, shutdown.clone());
        client.blobs.start(&mut tasks, shutdown.clone()); // a second start starts nothing
        assert_eq!(tasks.len(), 1);
        client.blobs.want(id, bytes.len() as u64, server.peer);
        let arrived = tokio::time::timeout(Duration::from_secs(10), arrivals.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(arrived, (id, 5000));
        assert_eq!(read_blob(&client.store, &id).unwrap(), bytes);
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), tasks.join_all())
            .await
            .unwrap();
        assert!(
            client.blobs.tasks.is_empty(),
            "every task of the service ended"
        );
    }

    #[tokio::test]
    async fn shutdown_cuts_a_transfer_that_hangs() {
        let client = side(2, &[2, 3], BlobsConfig::default()).await;
        let server = side(3, &[2, 3], BlobsConfig::default()).await;
        let (id, _) = add_blob(&server.store, 10).await;
        let asked = Arc::new(Mutex::new(Vec::new()));
        connect_with(
            &client,
            server.peer,
            fake_server(&server.store, Fake::Silent, &asked),
        );
        let mut tasks = JoinSet::new();
        client.blobs.start(&mut tasks, CancellationToken::new());
        client.blobs.want(id, 10, server.peer);
        while asked.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(client.blobs.active().len(), 1);
        tokio::time::timeout(Duration::from_secs(10), client.blobs.shutdown())
            .await
            .unwrap();
        assert!(client.blobs.active().is_empty());
        // The supervising task in the caller's set ends with it.
        tokio::time::timeout(Duration::from_secs(10), tasks.join_all())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn garbage_collection_keeps_chunks_of_transfers_that_will_resume() {
        let client = side(2, &[2, 3], BlobsConfig::default()).await;
        let server = side(3, &[2, 3], BlobsConfig::default()).await;
        let (id, bytes) = add_blob(&server.store, 2 * CHUNK_SIZE + 1).await;
        // An interrupted local add leaves a chunk file nobody claims.
        let mut orphan = client.store.blob_writer(None).unwrap();
        orphan.write(&content(CHUNK_SIZE + 1)).unwrap();
        drop(orphan);
        // An interrupted transfer leaves one that will resume.
        let asked = Arc::new(Mutex::new(Vec::new()));
        connect_with(
            &client,
            server.peer,
            fake_server(&server.store, Fake::CutAfter(1), &asked),
        );
        assert!(!client.blobs.fetch(id, &[server.peer]).await.unwrap());
        client.blobs.collect_garbage(u64::MAX);
        let p: Progress =
            serde_cbor::from_slice(&client.store.state_get(&progress_key(&id)).unwrap().unwrap())
                .unwrap();
        assert_eq!(
            client.store.collect_blob_garbage(&[p.internal]).unwrap(),
            0,
            "the orphan is gone already"
        );
        connect_with(
            &client,
            server.peer,
            fake_server(&server.store, Fake::Honest, &asked),
        );
        assert!(client.blobs.fetch(id, &[server.peer]).await.unwrap());
        assert_eq!(
            *asked.lock().unwrap(),
            vec![0, 1],
            "the kept chunk was used"
        );
        assert_eq!(read_blob(&client.store, &id).unwrap(), bytes);
    }

    #[test]
    fn a_progress_record_keeps_its_stored_shape() {
        // `bp/<blob>` -> CBOR map {internal, len, hashes: byte string}; a transfer that an
        // earlier build started resumes with this one.
        use serde_cbor::Value;
        let p = Progress {
            internal: 7,
            len: 300,
            hashes: vec![1; 32],
        };
        let v: Value = serde_cbor::from_slice(&serde_cbor::to_vec(&p).unwrap()).unwrap();
        let expected = Value::Map(
            [
                ("internal", Value::Integer(7)),
                ("len", Value::Integer(300)),
                ("hashes", Value::Bytes(vec![1; 32])),
            ]
            .into_iter()
            .map(|(k, v)| (Value::Text(k.into()), v))
            .collect(),
        );
        assert_eq!(v, expected);
        assert_eq!(
            progress_key(&blob_id(0xab)),
            format!("bp/{}", "ab".repeat(32)).into_bytes()
        );
    }
}
