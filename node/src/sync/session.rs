//! One sync session with one trusted peer over a `/iom/sync/1` stream.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::AsyncReadExt;
use futures::io::{ReadHalf, WriteHalf};
use iom_crdt::DocId;
use iom_crdt::sync::{PeerDocState, generate, receive};
use iom_protocol::keys::DeviceId;
use iom_protocol::wire::{
    DocSnapshot, MAX_SNAPSHOTS, MAX_SYNC_FRAME, PeerAddrs, SYNC_VERSION, SyncMsg,
};
use libp2p::{PeerId, Stream};
use tokio::sync::{Notify, mpsc};

use super::gate::Verdict;
use crate::docs::{DocsError, Origin};
use crate::net::framed::{FramedError, read_frame, write_frame};
use crate::node::NodeCtx;

/// Documents waiting to be sent to one peer (each at most once).
#[derive(Debug, Default)]
pub struct Dirty {
    inner: Mutex<(VecDeque<DocId>, HashSet<DocId>)>,
    notify: Notify,
}

impl Dirty {
    /// Queues a document.
    pub fn mark(&self, doc: DocId) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if g.1.insert(doc) {
            g.0.push_back(doc);
            drop(g);
            self.notify.notify_one();
        }
    }

    /// How many documents wait.
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).0.len()
    }

    /// Whether none wait.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits for at least one document and takes up to `max` of them, oldest first.
    async fn next_batch(&self, max: usize) -> Vec<DocId> {
        loop {
            {
                let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
                if !g.0.is_empty() {
                    let n = g.0.len().min(max.max(1));
                    let batch: Vec<DocId> = g.0.drain(..n).collect();
                    for doc in &batch {
                        g.1.remove(doc);
                    }
                    return batch;
                }
            }
            self.notify.notified().await;
        }
    }
}

/// Documents read from the store per batch of snapshots.
const SNAPSHOT_BATCH: usize = 256;
/// A document bigger than this is synced the usual way instead of as a snapshot.
const MAX_SNAPSHOT_DOC: usize = 4 * 1024 * 1024;
/// A `Snapshots` message is sent once it holds this many bytes.
const SNAPSHOT_FRAME_BYTES: usize = 512 * 1024;

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

/// The manager's view of a running session.
pub(crate) struct SessionHandle {
    pub(crate) peer: PeerId,
    pub(crate) initiator: PeerId,
    pub(crate) id: u64,
    pub(crate) dirty: Arc<Dirty>,
    /// Documents the peer has none of, waiting to be sent whole.
    pub(crate) snapshots: Arc<Dirty>,
    pub(crate) control: mpsc::Sender<SyncMsg>,
    pub(crate) stats: Arc<Stats>,
    closed: Arc<AtomicBool>,
    stop: Arc<Notify>,
}

impl SessionHandle {
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.stop.notify_waiters();
    }
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Framed(#[from] FramedError),
    #[error("peer misbehaved: {0}")]
    Peer(String),
    #[error("refused: {0}")]
    Refused(String),
    #[error(transparent)]
    Docs(#[from] DocsError),
}

/// Per-document sync state with this peer. Each state has its own lock, held by the writer
/// (generate) and the reader (receive) for the whole operation, inside the document's lock, so
/// neither can work from a stale copy and overwrite the other's update.
type SharedState = Arc<Mutex<PeerDocState>>;
type States = Arc<Mutex<HashMap<DocId, SharedState>>>;

fn state_key(peer: &PeerId, doc: &DocId) -> Vec<u8> {
    let mut k = b"ps/".to_vec();
    k.extend_from_slice(&peer.to_bytes());
    k.push(b'/');
    k.extend_from_slice(doc.as_bytes());
    k
}

/// The state for `doc`, loaded from the store the first time this session needs it.
fn state_for(ctx: &NodeCtx, states: &States, peer: &PeerId, doc: &DocId) -> SharedState {
    let mut map = states.lock().unwrap_or_else(|e| e.into_inner());
    map.entry(*doc)
        .or_insert_with(|| {
            let st = ctx
                .store
                .state_get(&state_key(peer, doc))
                .ok()
                .flatten()
                .and_then(|b| PeerDocState::resume(&b).ok())
                .unwrap_or_default();
            Arc::new(Mutex::new(st))
        })
        .clone()
}

fn lock_state(st: &SharedState) -> std::sync::MutexGuard<'_, PeerDocState> {
    st.lock().unwrap_or_else(|e| e.into_inner())
}

/// Replaces the state for `doc` (under its lock, so a concurrent user sees old or new).
fn set_state(states: &States, doc: DocId, state: PeerDocState) {
    let mut map = states.lock().unwrap_or_else(|e| e.into_inner());
    match map.get(&doc) {
        Some(st) => *lock_state(st) = state,
        None => {
            map.insert(doc, Arc::new(Mutex::new(state)));
        }
    }
}

/// Whether this session has exchanged anything about `doc` yet.
fn has_state(states: &States, doc: &DocId) -> bool {
    states
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains_key(doc)
}

/// Sends `ids` whole (documents the peer has none of), in messages of about
/// [`SNAPSHOT_FRAME_BYTES`]. Documents too big for that, or gone, go to `dirty` instead.
async fn send_snapshots(
    ctx: &NodeCtx,
    wr: &mut WriteHalf<Stream>,
    ids: Vec<DocId>,
    states: &States,
    dirty: &Dirty,
    stats: &Stats,
) -> Result<(), SessionError> {
    let (snaps, other) = ctx.docs.snapshots(ids, MAX_SNAPSHOT_DOC).await?;
    for doc in other {
        dirty.mark(doc);
    }
    let mut frame: Vec<DocSnapshot> = Vec::new();
    let mut size = 0;
    let count = snaps.len();
    for (i, snap) in snaps.into_iter().enumerate() {
        // Both sides will hold exactly these heads: later changes travel in one message.
        set_state(states, snap.id, PeerDocState::after_snapshot(&snap.heads));
        size += snap.bytes.len();
        frame.push(DocSnapshot {
            doc: *snap.id.as_bytes(),
            bytes: snap.bytes,
        });
        if size >= SNAPSHOT_FRAME_BYTES || frame.len() == MAX_SNAPSHOTS || i + 1 == count {
            let docs = std::mem::take(&mut frame);
            size = 0;
            send(wr, &SyncMsg::Snapshots { docs }, stats).await?;
        }
    }
    Ok(())
}

async fn send(
    wr: &mut WriteHalf<Stream>,
    msg: &SyncMsg,
    stats: &Stats,
) -> Result<(), SessionError> {
    let bytes = msg
        .encode()
        .map_err(|e| FramedError::Encode(e.to_string()))?;
    write_frame(wr, &bytes, MAX_SYNC_FRAME).await?;
    stats
        .bytes_out
        .fetch_add(bytes.len() as u64 + 4, Ordering::Relaxed);
    Ok(())
}

async fn recv(rd: &mut ReadHalf<Stream>, stats: &Stats) -> Result<Option<SyncMsg>, SessionError> {
    let Some(bytes) = read_frame(rd, MAX_SYNC_FRAME).await? else {
        return Ok(None);
    };
    stats
        .bytes_in
        .fetch_add(bytes.len() as u64 + 4, Ordering::Relaxed);
    SyncMsg::decode(&bytes)
        .map(Some)
        .map_err(|e| SessionError::Framed(FramedError::Decode(e.to_string())))
}

/// Runs a session to its end. `initiator` is true when we opened the stream.
pub(crate) async fn run(ctx: Arc<NodeCtx>, peer: PeerId, stream: Stream, initiator: bool) {
    let span = tracing::debug_span!(parent: tracing::Span::none(), "sync", %peer, initiator);
    let _e = span.enter();
    drop(_e);
    match run_inner(&ctx, peer, stream, initiator).await {
        Ok(()) => tracing::debug!(%peer, "sync session ended"),
        Err(SessionError::Refused(reason)) => {
            tracing::debug!(%peer, %reason, "sync session refused");
        }
        Err(e @ SessionError::Peer(_)) => {
            tracing::warn!(%peer, error = %e, "disconnecting misbehaving peer");
            ctx.net.disconnect(peer).await;
        }
        Err(SessionError::Framed(e)) if e.is_peer_fault() => {
            tracing::warn!(%peer, error = %e, "disconnecting peer that sent a bad frame");
            ctx.net.disconnect(peer).await;
        }
        Err(e) => tracing::debug!(%peer, error = %e, "sync session ended"),
    }
}

fn hello(ctx: &NodeCtx) -> SyncMsg {
    let (me, person) = {
        let id = ctx.identity();
        (id.device.id(), id.person)
    };
    SyncMsg::Hello {
        version: SYNC_VERSION,
        person,
        chain: ctx.trust.chain_for(&me),
    }
}

/// Checks a peer's `Hello`; on failure tells the peer why and counts the refusal.
async fn admit(
    ctx: &NodeCtx,
    peer: PeerId,
    msg: Option<SyncMsg>,
    wr: &mut WriteHalf<Stream>,
    stats: &Stats,
) -> Result<(), SessionError> {
    let reason = match msg {
        Some(SyncMsg::Hello { person, chain, .. }) => {
            if person != ctx.trust.person() {
                Some("not trusted: this device belongs to a different person".to_string())
            } else {
                let _ = ctx.trust.add(chain).await;
                match DeviceId::from_peer_id(&peer) {
                    Ok(d) if ctx.trust.state().is_revoked(&d) => {
                        Some("not trusted: this device has been revoked".into())
                    }
                    Ok(d) if ctx.trust.state().is_trusted(&d) => None,
                    _ => Some("not trusted: no valid certificate chain to our person".into()),
                }
            }
        }
        Some(SyncMsg::Refused { reason }) => return Err(SessionError::Refused(reason)),
        Some(_) => Some("protocol error: expected Hello".into()),
        None => return Err(SessionError::Refused("stream closed before Hello".into())),
    };
    if let Some(reason) = reason {
        let _ = send(
            wr,
            &SyncMsg::Refused {
                reason: reason.clone(),
            },
            stats,
        )
        .await;
        if ctx.sync.gate.refuse(peer, "/iom/sync/1", &reason) == Verdict::Disconnect {
            ctx.net.disconnect(peer).await;
        }
        return Err(SessionError::Refused(reason));
    }
    Ok(())
}

async fn run_inner(
    ctx: &Arc<NodeCtx>,
    peer: PeerId,
    stream: Stream,
    initiator: bool,
) -> Result<(), SessionError> {
    let (mut rd, mut wr) = stream.split();
    let stats = Arc::new(Stats::default());
    if initiator {
        send(&mut wr, &hello(ctx), &stats).await?;
        let reply = tokio::time::timeout(Duration::from_secs(15), recv(&mut rd, &stats))
            .await
            .map_err(|_| SessionError::Refused("no Hello within 15 s".into()))??;
        admit(ctx, peer, reply, &mut wr, &stats).await?;
    } else {
        let first = tokio::time::timeout(Duration::from_secs(15), recv(&mut rd, &stats))
            .await
            .map_err(|_| SessionError::Refused("no Hello within 15 s".into()))??;
        admit(ctx, peer, first, &mut wr, &stats).await?;
        send(&mut wr, &hello(ctx), &stats).await?;
    }

    let (control_tx, mut control_rx) = mpsc::channel::<SyncMsg>(64);
    let dirty = Arc::new(Dirty::default());
    let snapshots = Arc::new(Dirty::default());
    let closed = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(Notify::new());
    let id = ctx.sync.next_id();
    let handle = SessionHandle {
        peer,
        initiator: if initiator { ctx.net.local } else { peer },
        id,
        dirty: dirty.clone(),
        snapshots: snapshots.clone(),
        control: control_tx.clone(),
        stats: stats.clone(),
        closed: closed.clone(),
        stop: stop.clone(),
    };
    if ctx.sync.register(ctx.net.local, handle).is_none() {
        return Ok(()); // a session with this peer already runs
    }
    tracing::info!(%peer, "sync session up");

    // What the peer needs first: certificates, where other devices are, our inventory root,
    // and the blobs we hold.
    let _ = control_tx.try_send(SyncMsg::Certs {
        certs: ctx.trust.certs(),
    });
    if !ctx.config.fault_no_addr_sharing {
        let _ = control_tx.try_send(SyncMsg::Addrs {
            peers: known_addrs(ctx, peer),
        });
    }
    if ctx.config.fault_garbage_sync
        && let Some(msg) = garbage_doc_message(ctx)
    {
        tracing::warn!(%peer, "fault injection: sending a garbage sync message");
        let _ = control_tx.try_send(msg);
    }
    if ctx.config.fault_garbage_snapshot {
        tracing::warn!(%peer, "fault injection: sending a garbage document snapshot");
        let _ = control_tx.try_send(SyncMsg::Snapshots {
            docs: vec![DocSnapshot {
                doc: crate::time::random_bytes::<16>(),
                bytes: b"\x85\x6f\x4a\x83 garbage, not an automerge document".to_vec(),
            }],
        });
    }
    let root = ctx.docs.with_inventory(|i| i.root());
    let _ = control_tx.try_send(SyncMsg::Root { root });
    for have in ctx.blobs.announcements() {
        let _ = control_tx.send(SyncMsg::Blobs { have }).await;
    }

    let states: States = Arc::default();
    let writer = {
        let ctx = ctx.clone();
        let states = states.clone();
        let dirty = dirty.clone();
        let snapshots = snapshots.clone();
        let stats = stats.clone();
        let stop = stop.clone();
        let closed = closed.clone();
        tokio::spawn(async move {
            let r: Result<(), SessionError> = async {
                loop {
                    tokio::select! {
                        biased;
                        _ = stop.notified() => return Ok(()),
                        msg = control_rx.recv() => match msg {
                            Some(m) => {
                                tracing::debug!(%peer, "writer: control message");
                                send(&mut wr, &m, &stats).await?;
                                tracing::debug!(%peer, "writer: control message sent");
                            }
                            None => return Ok(()),
                        },
                        batch = dirty.next_batch(1) => for doc in batch {
                            tracing::debug!(%peer, %doc, "writer: dirty");
                            let st = state_for(&ctx, &states, &peer, &doc);
                            let out = ctx.docs.read(doc, move |d| generate(d, &mut lock_state(&st))).await;
                            match out {
                                Ok(m) => {
                                    tracing::debug!(%peer, %doc, sent = m.is_some(), "generated");
                                    if let Some(msg) = m {
                                        send(&mut wr, &SyncMsg::Doc { doc: *doc.as_bytes(), msg }, &stats).await?;
                                    }
                                }
                                Err(DocsError::NotFound(_)) => {}
                                Err(e) => return Err(e.into()),
                            }
                        },
                        ids = snapshots.next_batch(SNAPSHOT_BATCH) => {
                            tracing::debug!(%peer, docs = ids.len(), "writer: snapshots");
                            send_snapshots(&ctx, &mut wr, ids, &states, &dirty, &stats).await?;
                        }
                    }
                }
            }
            .await;
            if let Err(e) = &r {
                tracing::debug!(%peer, error = %e, "sync writer stopped");
                // End the session: the reader may never see the end of a stream whose
                // connection we closed ourselves (yamux does not wake readers on a graceful
                // local close), and a session that looks alive blocks a new one.
                closed.store(true, Ordering::Relaxed);
                stop.notify_one();
            }
            let _ = futures::AsyncWriteExt::close(&mut wr).await;
            r
        })
    };

    let result = read_loop(
        ctx,
        peer,
        &mut rd,
        &control_tx,
        &dirty,
        &snapshots,
        &states,
        &stats,
        &stop,
    )
    .await;
    closed.store(true, Ordering::Relaxed);
    stop.notify_waiters();
    writer.abort();
    ctx.sync.unregister(peer, id);
    // Persist what each side is known to have, so a reconnect costs only what changed.
    let all: Vec<(DocId, SharedState)> = states
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .drain()
        .collect();
    for (doc, st) in all {
        let bytes = lock_state(&st).encode();
        let _ = ctx.store.state_put(&state_key(&peer, &doc), &bytes);
    }
    result
}

/// Fault injection (`IOM_FAULT=garbage-sync`): an Automerge sync message for a real document
/// whose bytes are not a sync message at all. The peer must disconnect us and change nothing.
fn garbage_doc_message(ctx: &NodeCtx) -> Option<SyncMsg> {
    let (doc, _) = ctx.docs.list().ok()?.into_iter().next()?;
    Some(SyncMsg::Doc {
        doc: *doc.as_bytes(),
        msg: b"\x42\xde\xad\xbe\xef garbage, not an automerge sync message".to_vec(),
    })
}

fn known_addrs(ctx: &NodeCtx, except: PeerId) -> Vec<PeerAddrs> {
    let state = ctx.trust.state();
    let peers = ctx.net.peers.read().unwrap_or_else(|e| e.into_inner());
    peers
        .map
        .iter()
        .filter(|(p, e)| {
            **p != except
                && !e.addrs.is_empty()
                && DeviceId::from_peer_id(p).is_ok_and(|d| state.is_trusted(&d))
        })
        .map(|(p, e)| PeerAddrs {
            peer: p.to_bytes(),
            addrs: e
                .addrs
                .iter()
                .take(iom_protocol::wire::MAX_PEER_ADDRS)
                .map(ToString::to_string)
                .collect(),
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
async fn read_loop(
    ctx: &Arc<NodeCtx>,
    peer: PeerId,
    rd: &mut ReadHalf<Stream>,
    control: &mpsc::Sender<SyncMsg>,
    dirty: &Arc<Dirty>,
    snapshots: &Dirty,
    states: &States,
    stats: &Arc<Stats>,
    stop: &Notify,
) -> Result<(), SessionError> {
    loop {
        let msg = tokio::select! {
            m = recv(rd, stats) => m?,
            _ = stop.notified() => return Ok(()),
        };
        let Some(msg) = msg else { return Ok(()) };
        match msg {
            SyncMsg::Doc { doc, msg } => {
                let doc = DocId::from_bytes(doc);
                let st = state_for(ctx, states, &peer, &doc);
                let (r, encoded) = ctx
                    .docs
                    .modify(doc, Origin::Peer(peer), true, move |d| {
                        let mut st = lock_state(&st);
                        let r = receive(d, &mut st, &msg);
                        Ok((r, st.encode()))
                    })
                    .await?;
                tracing::debug!(%peer, %doc, result = ?r, queued = dirty.len(), "received doc message");
                let _ = ctx.store.state_put(&state_key(&peer, &doc), &encoded);
                if let Err(e) = r {
                    let _ = ctx.docs.forget_unstored(doc);
                    return Err(SessionError::Peer(format!(
                        "bad sync message for {doc}: {e}"
                    )));
                }
                stats.docs_received.fetch_add(1, Ordering::Relaxed);
                dirty.mark(doc);
            }
            SyncMsg::Snapshots { docs } => {
                let count = docs.len();
                let docs = docs
                    .into_iter()
                    .map(|s| (DocId::from_bytes(s.doc), s.bytes))
                    .collect();
                let applied = ctx.docs.receive_snapshots(peer, docs).await?;
                tracing::debug!(%peer, count, new = applied.new.len(), merged = applied.merged.len(), "received snapshots");
                for (doc, heads) in &applied.new {
                    set_state(states, *doc, PeerDocState::after_snapshot(heads));
                }
                // Merged into what was here: the usual exchange settles the rest.
                for doc in applied.merged {
                    dirty.mark(doc);
                }
                stats
                    .snapshots_received
                    .fetch_add(count as u64, Ordering::Relaxed);
                if let Some((doc, e)) = applied.rejected {
                    return Err(SessionError::Peer(format!("bad snapshot of {doc}: {e}")));
                }
            }
            SyncMsg::Certs { certs } => {
                let _ = ctx.trust.add(certs).await;
                if let Ok(d) = DeviceId::from_peer_id(&peer)
                    && !ctx.trust.state().is_trusted(&d)
                {
                    return Err(SessionError::Refused("peer is no longer trusted".into()));
                }
            }
            SyncMsg::Addrs { peers } => {
                for p in peers {
                    let Ok(pid) = PeerId::from_bytes(&p.peer) else {
                        continue;
                    };
                    if pid == ctx.net.local {
                        continue;
                    }
                    let addrs = p.addrs.iter().filter_map(|a| a.parse().ok()).collect();
                    ctx.net.add_addresses(pid, addrs).await;
                }
            }
            SyncMsg::Root { root } => {
                tracing::debug!(%peer, "root");
                let ours = ctx.docs.with_inventory(|i| (i.root(), i.bucket_hashes()));
                if ours.0 != root {
                    let digests: Vec<u8> = ours.1.concat();
                    let _ = control.send(SyncMsg::Buckets { digests }).await;
                }
            }
            SyncMsg::Buckets { digests } => {
                let theirs: Vec<[u8; 32]> = digests
                    .chunks_exact(32)
                    .filter_map(|c| <[u8; 32]>::try_from(c).ok())
                    .collect();
                let (buckets, records) = ctx.docs.with_inventory(|i| {
                    let diff = iom_crdt::inventory::diff_buckets(&i.bucket_hashes(), &theirs);
                    let mut records = Vec::new();
                    for b in &diff {
                        for (doc, digest) in i.entries_in(*b) {
                            records.extend_from_slice(doc.as_bytes());
                            records.extend_from_slice(&digest);
                        }
                    }
                    (diff, records)
                });
                if !buckets.is_empty() {
                    let _ = control.send(SyncMsg::Entries { buckets, records }).await;
                }
            }
            SyncMsg::Entries { buckets, records } => {
                tracing::debug!(%peer, buckets = buckets.len(), records = records.len() / 48, "entries");
                let theirs: Vec<(DocId, [u8; 32])> = records
                    .chunks_exact(48)
                    .filter_map(|r| {
                        let doc = DocId::from_slice(&r[..16]).ok()?;
                        let digest = <[u8; 32]>::try_from(&r[16..]).ok()?;
                        Some((doc, digest))
                    })
                    .collect();
                let ours: Vec<(DocId, [u8; 32])> = ctx
                    .docs
                    .with_inventory(|i| buckets.iter().flat_map(|b| i.entries_in(*b)).collect());
                let have: HashSet<DocId> = ours.iter().map(|(d, _)| *d).collect();
                let their_docs: HashSet<DocId> = theirs.iter().map(|(d, _)| *d).collect();
                for doc in iom_crdt::inventory::diff_entries(&ours, &theirs) {
                    if !have.contains(&doc) {
                        continue;
                    }
                    // A document the peer has none of travels whole, unless this session
                    // already exchanged something about it.
                    if their_docs.contains(&doc) || has_state(states, &doc) {
                        dirty.mark(doc);
                    } else {
                        snapshots.mark(doc);
                    }
                }
            }
            SyncMsg::Blobs { have } => {
                // Every session announces every blob; only the ones not here are wanted (the
                // fetch queues are bounded, and held blobs would crowd them).
                for (id, len) in have {
                    // (A storage error: want it anyway; the fetch reports the error.)
                    if !matches!(ctx.store.has_blob(id.as_bytes()), Ok(true)) {
                        ctx.blobs.want(id, len, peer);
                    }
                }
            }
            SyncMsg::Hello { .. } | SyncMsg::Refused { .. } => {
                return Err(SessionError::Peer("unexpected handshake message".into()));
            }
            _ => {}
        }
    }
}
