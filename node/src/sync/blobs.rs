//! Blobs between trusted peers over `/iom/blob/1`.
//!
//! Peers announce the blobs they hold in their sync session. Small blobs (up to
//! [`EAGER_LIMIT`]) are fetched at once; larger ones are fetched one at a time in the
//! background, or at once when someone asks for them (`iom blob get`). Every chunk is checked
//! against the manifest's chunk hash as it arrives and written straight to disk, so memory stays
//! flat for any size; the whole-content hash is checked before the blob becomes visible.
//! A transfer's manifest is recorded (durably) before its first chunk, so a broken transfer
//! resumes where its chunk file stops; the chunks there are verified again first.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{AsyncWriteExt, StreamExt};
use iom_protocol::id::ContentId;
use iom_protocol::keys::DeviceId;
use iom_protocol::wire::{BlobRequest, BlobResponse, MAX_BLOB_ANNOUNCE, MAX_BLOB_FRAME, SyncMsg};
use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::gate::Verdict;
use crate::net::BLOB_PROTOCOL;
use crate::net::framed::{read_frame, read_msg, write_frame};
use crate::node::NodeCtx;
use crate::store::{BlobReceiver, CHUNK_SIZE, StoreError, chunk_count};

/// Blobs up to this size are fetched as soon as they are announced.
pub const EAGER_LIMIT: u64 = 1 << 20;
const PROGRESS_PREFIX: &str = "bp/";

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
pub enum FetchError {
    /// No connected peer has the blob.
    #[error("no connected device has blob {0}")]
    Unavailable(String),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

#[derive(Default)]
struct State {
    /// Wanted blob → (length, peers that announced it).
    wanted: HashMap<ContentId, (u64, Vec<PeerId>)>,
    /// Callers waiting for a blob.
    waiters: HashMap<ContentId, Vec<oneshot::Sender<Result<(), String>>>>,
    /// Blob being fetched → chunks done / total.
    active: HashMap<ContentId, (u32, u32)>,
    /// Blobs in a fetch queue or being fetched (each at most once).
    queued: HashSet<ContentId>,
    /// Failed fetches in a row, per blob (for the retry back-off).
    failures: HashMap<ContentId, u32>,
}

/// The blob replication service.
pub struct Blobs {
    state: Mutex<State>,
    small: mpsc::Sender<ContentId>,
    large: mpsc::Sender<ContentId>,
    queues: Mutex<Option<(mpsc::Receiver<ContentId>, mpsc::Receiver<ContentId>)>>,
    /// Fault injection for tests: serve chunks with flipped bytes.
    pub corrupt_chunks: bool,
}

impl std::fmt::Debug for Blobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blobs").finish_non_exhaustive()
    }
}

impl Blobs {
    /// A new service (workers start in [`spawn`]).
    pub fn new(corrupt_chunks: bool) -> Blobs {
        let (small, small_rx) = mpsc::channel(4096);
        let (large, large_rx) = mpsc::channel(4096);
        Blobs {
            state: Mutex::default(),
            small,
            large,
            queues: Mutex::new(Some((small_rx, large_rx))),
            corrupt_chunks,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
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

    /// After a fetch: forgets the failures of a blob that arrived; for one that did not, tries
    /// again after a back-off (1 s, doubling to 64 s) if a device that announced it is still
    /// connected. If none is, the next announcement (on reconnect) queues it.
    fn fetched(&self, ctx: &Arc<NodeCtx>, id: ContentId, done: bool) {
        let mut st = self.state();
        st.queued.remove(&id);
        if done {
            st.failures.remove(&id);
            return;
        }
        let failures = st.failures.entry(id).or_insert(0);
        *failures += 1;
        let delay = Duration::from_secs(1 << (*failures - 1).min(6));
        drop(st);
        let ctx = ctx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let connected = ctx.net.connected_peers();
            let mut st = ctx.blobs.state();
            let Some((len, peers)) = st.wanted.get(&id) else {
                return;
            };
            let len = *len;
            if peers.iter().any(|p| connected.contains(p)) && st.queued.insert(id) {
                drop(st);
                tracing::debug!(blob = %id, ?delay, "retrying blob fetch");
                ctx.blobs.enqueue(id, len);
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
}

/// Announcements of every local blob, in messages of at most [`MAX_BLOB_ANNOUNCE`].
pub fn announcements(ctx: &NodeCtx) -> Vec<Vec<(ContentId, u64)>> {
    let Ok(blobs) = ctx.store.blobs() else {
        return Vec::new();
    };
    let all: Vec<(ContentId, u64)> = blobs
        .into_iter()
        .map(|(id, m)| (ContentId::from_bytes(id), m.len))
        .collect();
    all.chunks(MAX_BLOB_ANNOUNCE).map(<[_]>::to_vec).collect()
}

/// Fetches a blob now (from any connected device that announced it, or any connected
/// trusted device), waiting for the transfer.
pub async fn fetch_now(ctx: &Arc<NodeCtx>, id: ContentId) -> Result<(), FetchError> {
    if ctx.store.blob_meta(id.as_bytes())?.is_some() {
        return Ok(());
    }
    let mut peers: Vec<PeerId> = ctx
        .blobs
        .state()
        .wanted
        .get(&id)
        .map(|(_, p)| p.clone())
        .unwrap_or_default();
    let trusted = ctx.trust.state();
    for p in ctx.net.connected_peers() {
        if !peers.contains(&p) && DeviceId::from_peer_id(&p).is_ok_and(|d| trusted.is_trusted(&d)) {
            peers.push(p);
        }
    }
    if fetch(ctx, id, &peers).await? {
        Ok(())
    } else {
        Err(FetchError::Unavailable(id.to_string()))
    }
}

/// Removes chunk files left by adds and transfers that were interrupted and will not resume
/// (transfers with a progress record are kept, to resume).
fn collect_garbage(ctx: &NodeCtx) {
    let keep: Vec<u64> = ctx
        .store
        .state_scan(PROGRESS_PREFIX.as_bytes())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(_, v)| serde_cbor::from_slice::<Progress>(&v).ok())
        .map(|p| p.internal)
        .collect();
    match ctx.store.collect_blob_garbage(&keep) {
        Ok(0) => {}
        Ok(n) => tracing::info!(removed = n, "removed chunks of interrupted blob adds"),
        Err(e) => tracing::warn!(error = %e, "cannot collect blob garbage"),
    }
}

/// Starts the blob server and the two fetch workers (small blobs, large blobs).
pub fn spawn(ctx: Arc<NodeCtx>) {
    collect_garbage(&ctx);
    let mut control = ctx.net.control();
    if let Ok(mut incoming) = control.accept(BLOB_PROTOCOL) {
        let ctx2 = ctx.clone();
        tokio::spawn(async move {
            while let Some((peer, stream)) = incoming.next().await {
                let ctx = ctx2.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve(&ctx, peer, stream).await {
                        tracing::debug!(%peer, error = %e, "blob request ended");
                    }
                });
            }
        });
    }
    let Some((small, large)) = ctx
        .blobs
        .queues
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
    else {
        return;
    };
    for mut rx in [small, large] {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            while let Some(id) = rx.recv().await {
                let peers = ctx
                    .blobs
                    .state()
                    .wanted
                    .get(&id)
                    .map(|(_, p)| p.clone())
                    .unwrap_or_default();
                let done = match fetch(&ctx, id, &peers).await {
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
                ctx.blobs.fetched(&ctx, id, done);
            }
        });
    }
}

async fn serve(ctx: &NodeCtx, peer: PeerId, mut stream: libp2p::Stream) -> Result<(), String> {
    let req: Option<BlobRequest> = read_msg(&mut stream, 4096)
        .await
        .map_err(|e| e.to_string())?;
    let Some(BlobRequest::Get { id, from_chunk }) = req else {
        return Ok(());
    };
    let trusted = DeviceId::from_peer_id(&peer).is_ok_and(|d| ctx.trust.state().is_trusted(&d));
    if !trusted {
        let reason = "not trusted: /iom/blob/1 is only for devices of this person".to_string();
        send(
            &mut stream,
            &BlobResponse::Refused {
                reason: reason.clone(),
            },
        )
        .await?;
        if ctx.sync.gate.refuse(peer, "/iom/blob/1", &reason) == Verdict::Disconnect {
            ctx.net.disconnect(peer).await;
        }
        return Ok(());
    }
    let Some(meta) = ctx
        .store
        .blob_meta(id.as_bytes())
        .map_err(|e| e.to_string())?
    else {
        return send(&mut stream, &BlobResponse::NotFound).await;
    };
    send(
        &mut stream,
        &BlobResponse::Manifest {
            len: meta.len,
            chunk_size: crate::store::CHUNK_SIZE as u32,
            chunk_hashes: meta.chunk_hashes.concat(),
        },
    )
    .await?;
    let count = meta.chunk_hashes.len() as u32;
    let meta = Arc::new(meta);
    // Read (and verify) the next chunk while this one is being sent.
    let read = |index: u32| {
        let store = ctx.store.clone();
        let m = meta.clone();
        tokio::task::spawn_blocking(move || store.blob_chunk(id.as_bytes(), &m, index))
    };
    let mut next = (from_chunk < count).then(|| read(from_chunk));
    for index in from_chunk..count {
        let Some(pending) = next.take() else { break };
        let mut bytes = pending
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        if index + 1 < count {
            next = Some(read(index + 1));
        }
        if ctx.blobs.corrupt_chunks
            && let Some(b) = bytes.first_mut()
        {
            *b ^= 0xff;
        }
        send(&mut stream, &BlobResponse::Chunk { index, bytes }).await?;
    }
    let _ = stream.close().await;
    Ok(())
}

async fn send(stream: &mut libp2p::Stream, msg: &BlobResponse) -> Result<(), String> {
    let bytes = msg.encode().map_err(|e| e.to_string())?;
    write_frame(stream, &bytes, MAX_BLOB_FRAME)
        .await
        .map_err(|e| e.to_string())
}

async fn next_response(s: &mut libp2p::Stream) -> Result<BlobResponse, FromError> {
    match tokio::time::timeout(Duration::from_secs(30), read_frame(s, MAX_BLOB_FRAME)).await {
        Err(_) => Err(FromError::Other("timed out".into())),
        Ok(Err(e)) if e.is_peer_fault() => Err(FromError::PeerFault(e.to_string())),
        Ok(Err(e)) => Err(FromError::Other(e.to_string())),
        Ok(Ok(None)) => Err(FromError::Other("stream closed".into())),
        Ok(Ok(Some(b))) => {
            BlobResponse::decode(&b).map_err(|e| FromError::PeerFault(e.to_string()))
        }
    }
}

fn progress_key(id: &ContentId) -> Vec<u8> {
    format!("{PROGRESS_PREFIX}{id}").into_bytes()
}

/// Tries each peer in turn. Returns whether the blob is now stored.
async fn fetch(ctx: &Arc<NodeCtx>, id: ContentId, peers: &[PeerId]) -> Result<bool, FetchError> {
    for peer in peers {
        if ctx.store.blob_meta(id.as_bytes())?.is_some() {
            break;
        }
        match fetch_from(ctx, id, *peer).await {
            Ok(()) => break,
            Err(FromError::PeerFault(reason)) => {
                tracing::warn!(%peer, blob = %id, %reason, "peer sent bad blob data; disconnecting");
                ctx.net.disconnect(*peer).await;
            }
            Err(FromError::Other(reason)) => {
                tracing::debug!(%peer, blob = %id, %reason, "blob fetch from peer failed");
            }
            Err(FromError::Store(e)) => return Err(e.into()),
        }
    }
    ctx.blobs.state().active.remove(&id);
    let done = ctx.store.blob_meta(id.as_bytes())?.is_some();
    let mut st = ctx.blobs.state();
    let len = st.wanted.get(&id).map(|(l, _)| *l);
    if done {
        st.wanted.remove(&id);
    }
    let waiters = if done {
        st.waiters.remove(&id).unwrap_or_default()
    } else {
        Vec::new()
    };
    drop(st);
    for w in waiters {
        let _ = w.send(Ok(()));
    }
    if done && let Some(len) = len {
        ctx.sync.broadcast(SyncMsg::Blobs {
            have: vec![(id, len)],
        });
    }
    Ok(done)
}

enum FromError {
    PeerFault(String),
    Other(String),
    Store(crate::store::StoreError),
}

impl From<crate::store::StoreError> for FromError {
    fn from(e: crate::store::StoreError) -> FromError {
        FromError::Store(e)
    }
}

/// Chunks received from the network and not yet verified and written; the network keeps
/// reading while the disk side works.
const RECEIVE_AHEAD: usize = 8;

/// The manifest a transfer is following, persisted once so a transfer can resume.
fn load_progress(ctx: &NodeCtx, key: &[u8]) -> Result<Option<Progress>, FromError> {
    Ok(ctx
        .store
        .state_get(key)?
        .and_then(|b| serde_cbor::from_slice(&b).ok()))
}

fn chunk_hashes(hashes: &[u8]) -> Vec<[u8; 32]> {
    hashes
        .chunks_exact(32)
        .filter_map(|c| <[u8; 32]>::try_from(c).ok())
        .collect()
}

/// Opens (or resumes) the receiver for `p` on the blocking pool.
async fn open_receiver(
    ctx: &NodeCtx,
    id: ContentId,
    p: &Progress,
) -> Result<BlobReceiver, FromError> {
    let store = ctx.store.clone();
    let (internal, len, hashes) = (p.internal, p.len, chunk_hashes(&p.hashes));
    tokio::task::spawn_blocking(move || store.receive_blob(*id.as_bytes(), internal, len, hashes))
        .await
        .map_err(|e| FromError::Other(e.to_string()))?
        .map_err(FromError::Store)
}

async fn fetch_from(ctx: &Arc<NodeCtx>, id: ContentId, peer: PeerId) -> Result<(), FromError> {
    let key = progress_key(&id);
    let mut progress = load_progress(ctx, &key)?;
    // Resuming: the chunks on disk are verified again first; go on after the last good one.
    let mut receiver = match &progress {
        Some(p) => match open_receiver(ctx, id, p).await {
            Ok(r) => Some(r),
            Err(_) => {
                ctx.store.discard_chunks(p.internal, p.hashes.len() / 32)?;
                ctx.store.state_remove(&key)?;
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
    let mut stream = ctx
        .net
        .open(peer, BLOB_PROTOCOL)
        .await
        .map_err(|e| FromError::Other(e.to_string()))?;
    let req = serde_cbor::to_vec(&BlobRequest::Get { id, from_chunk })
        .map_err(|e| FromError::Other(e.to_string()))?;
    write_frame(&mut stream, &req, 4096)
        .await
        .map_err(|e| FromError::Other(e.to_string()))?;
    let (len, chunk_size, hashes) = match next_response(&mut stream).await? {
        BlobResponse::Manifest {
            len,
            chunk_size,
            chunk_hashes,
        } => (len, chunk_size, chunk_hashes),
        BlobResponse::NotFound => return Err(FromError::Other("peer does not have it".into())),
        BlobResponse::Refused { reason } => return Err(FromError::Other(reason)),
        _ => return Err(FromError::PeerFault("expected a manifest".into())),
    };
    if chunk_size as usize != CHUNK_SIZE
        || hashes.len() % 32 != 0
        || (hashes.len() / 32) as u64 != chunk_count(len)
    {
        return Err(FromError::PeerFault(format!(
            "manifest does not fit: {len} bytes, chunks of {chunk_size}, {} hash bytes",
            hashes.len()
        )));
    }
    // A different manifest than the one we resumed: start over.
    if let Some(p) = &progress
        && (p.hashes != hashes || p.len != len)
    {
        ctx.store.discard_chunks(p.internal, p.hashes.len() / 32)?;
        ctx.store.state_remove(&key)?;
        return Err(FromError::Other("manifest changed; restarting".into()));
    }
    let receiver = match receiver.take() {
        Some(r) => r,
        None => {
            let p = Progress {
                internal: ctx.store.new_blob_internal()?,
                len,
                hashes,
            };
            if let Ok(b) = serde_cbor::to_vec(&p) {
                ctx.store.state_put(&key, &b)?;
            }
            // Durable before the first chunk lands: without it a crash would leave a chunk
            // file nobody claims, removed as garbage at the next start, and the transfer would
            // start over instead of resuming.
            ctx.store.flush().await?;
            open_receiver(ctx, id, &p).await?
        }
    };
    let count = receiver.count();
    ctx.blobs.state().active.insert(id, (from_chunk, count));

    // The network side reads chunks and checks their order; the disk side (a blocking thread)
    // verifies each against its hash, writes it and records progress, a few chunks behind.
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(RECEIVE_AHEAD);
    let disk = {
        let ctx = ctx.clone();
        let mut receiver = receiver;
        tokio::task::spawn_blocking(move || -> Result<BlobReceiver, FromError> {
            while let Some(bytes) = rx.blocking_recv() {
                let index = receiver.done();
                match receiver.put(bytes) {
                    Ok(()) => {}
                    Err(StoreError::HashMismatch { .. }) => {
                        return Err(FromError::PeerFault(format!(
                            "chunk {index} does not match its hash"
                        )));
                    }
                    Err(e) => return Err(e.into()),
                }
                ctx.blobs
                    .state()
                    .active
                    .insert(id, (receiver.written(), receiver.count()));
            }
            Ok(receiver)
        })
    };
    let network = async {
        for expected in from_chunk..count {
            match next_response(&mut stream).await? {
                BlobResponse::Chunk { index, bytes } if index == expected => {
                    if tx.send(bytes).await.is_err() {
                        break; // the disk side stopped; its error says why
                    }
                }
                BlobResponse::Chunk { index, .. } => {
                    return Err(FromError::PeerFault(format!(
                        "chunk {index} out of order, expected {expected}"
                    )));
                }
                _ => return Err(FromError::PeerFault("expected a chunk".into())),
            }
        }
        Ok(())
    }
    .await;
    drop(tx);
    let receiver = disk.await.map_err(|e| FromError::Other(e.to_string()))??;
    if let Err(e) = network {
        // Dropping the receiver waits for its writer: not on this thread.
        tokio::task::spawn_blocking(move || drop(receiver));
        return Err(e);
    }
    let published = tokio::task::spawn_blocking(move || receiver.finish())
        .await
        .map_err(|e| FromError::Other(e.to_string()))?;
    ctx.store.state_remove(&key)?;
    match published {
        Ok(_) => {
            ctx.store.flush().await?;
            tracing::info!(blob = %id, len, "blob received");
            Ok(())
        }
        Err(StoreError::HashMismatch { .. }) => {
            Err(FromError::PeerFault("whole-content hash mismatch".into()))
        }
        Err(e) => Err(e.into()),
    }
}
