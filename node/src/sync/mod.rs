//! Sync between trusted devices over `/iom/sync/1` and `/iom/blob/1`.
//!
//! One session per peer. On connect, in this order: trust certificates (`Hello`, then the whole
//! set), an inventory root, bucket digests and entries only where roots differ, then Automerge
//! sync only for documents that differ, and from then on live pushes of every change.
//!
//! What a session says and when is decided by the pure state machine in
//! [`iom_crdt::session`]; [`session`] drives it over a stream. Sending is pull-based: a session
//! keeps a set of *dirty* documents and its writer generates one Automerge message per dirty
//! document when the stream can take it. The reader never waits on the writer, so two peers
//! flooding each other can't deadlock, and the set is bounded by the number of documents.
//!
//! [`Manager`] is the service: built from the handles it uses, started with
//! [`Manager::start`], it owns its tasks (the accept loop, the connection, trust and change
//! watchers, and every session) and ends them in [`Manager::shutdown`].
//!
//! # Layout
//! - [`gate`]: refusing untrusted peers.
//! - [`session`]: one peer's session (the driver), and the registry of running sessions.
//! - [`blobs`]: the blob server and the resumable, verifying fetcher.
//! - `working_set`: the documents a session keeps loaded while it exchanges them.

pub mod blobs;
pub mod gate;
mod peer_quiet;
pub mod session;
mod working_set;

use std::sync::{Arc, Mutex};

use futures::StreamExt;
use futures::future::BoxFuture;
use iom_crdt::DocId;
use iom_crdt::session::Role;
use iom_protocol::id::ContentId;
use iom_protocol::keys::DeviceId;
use iom_protocol::wire::SyncMsg;
use libp2p::{Multiaddr, PeerId};
use serde_json::{Value, json};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::docs::{Docs, Origin};
use crate::net::{Net, NetEvent, SYNC_PROTOCOL};
use crate::store::Store;
use crate::trust::TrustBook;
use gate::Gate;
pub use session::{BlobHandle, Network, Stats, SyncConfig};
use session::{Deps, Registry};

/// How long [`Manager::shutdown`] lets tasks finish before aborting them.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// The sync service: sessions with every trusted peer.
pub struct Manager {
    deps: Deps,
    net: Net,
    /// Refusal accounting for untrusted peers, shared with the other gated protocols.
    pub gate: Arc<Gate>,
    tasks: Mutex<JoinSet<()>>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager").finish_non_exhaustive()
    }
}

impl Manager {
    /// A manager over these handles. Nothing runs until [`Manager::start`].
    pub fn new(
        docs: Docs,
        trust: Arc<TrustBook>,
        net: Net,
        store: Store,
        blobs: Arc<dyn BlobHandle>,
        gate: Arc<Gate>,
        config: SyncConfig,
    ) -> Manager {
        let deps = Deps {
            docs,
            trust,
            store,
            net: Arc::new(net.clone()),
            blobs,
            gate: gate.clone(),
            registry: Arc::default(),
            config,
            shutdown: CancellationToken::new(),
        };
        Manager {
            deps,
            net,
            gate,
            tasks: Mutex::new(JoinSet::new()),
        }
    }

    /// Spawns `task` into the manager's task set (reaping the finished ones).
    fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        while tasks.try_join_next().is_some() {}
        if self.deps.shutdown.is_cancelled() {
            return;
        }
        tasks.spawn(task);
    }

    /// Starts the sync machinery: the accept loop, session initiation on connect and on trust
    /// changes, and live pushes. Everything stops when `shutdown` is cancelled (or at
    /// [`Manager::shutdown`]).
    pub fn start(self: &Arc<Self>, shutdown: CancellationToken) {
        let stop = self.deps.shutdown.clone();
        self.spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => stop.cancel(),
                _ = stop.cancelled() => {}
            }
        });
        self.accept_sessions();
        self.open_on_connect();
        self.follow_trust();
        self.push_changes();
    }

    /// Inbound sessions.
    fn accept_sessions(self: &Arc<Self>) {
        let mut control = self.net.control();
        let mut incoming = match control.accept(SYNC_PROTOCOL) {
            Ok(incoming) => incoming,
            Err(e) => {
                tracing::error!(error = %e, "sync protocol already registered");
                return;
            }
        };
        let this = self.clone();
        let stop = self.deps.shutdown.clone();
        self.spawn(async move {
            loop {
                let next = tokio::select! {
                    next = incoming.next() => next,
                    _ = stop.cancelled() => return,
                };
                let Some((peer, stream)) = next else { return };
                this.spawn(session::run(
                    this.deps.clone(),
                    peer,
                    stream,
                    Role::Responder,
                ));
            }
        });
    }

    /// Outbound sessions when a peer connects.
    fn open_on_connect(self: &Arc<Self>) {
        let this = self.clone();
        let stop = self.deps.shutdown.clone();
        let mut events = self.net.subscribe();
        self.spawn(async move {
            loop {
                let event = tokio::select! {
                    e = events.recv() => e,
                    _ = stop.cancelled() => return,
                };
                match event {
                    Ok(NetEvent::Connected(peer)) => this.maybe_open(peer),
                    // The last connection closed: end the session now. Its reader may never
                    // see the stream end (yamux does not wake readers of a connection closed
                    // locally, as when a revoked device is cut off), and a session that looks
                    // alive blocks the next one.
                    Ok(NetEvent::Disconnected(peer)) => this.deps.registry.close(&peer),
                    Ok(NetEvent::Addresses(peer)) => share_addresses(&this.deps, peer),
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        for peer in this.net.connected_peers() {
                            this.maybe_open(peer);
                        }
                    }
                    Err(_) => return,
                }
            }
        });
    }

    /// Trust changes: certificates to every session, and sessions to peers that just became
    /// trusted.
    fn follow_trust(self: &Arc<Self>) {
        let this = self.clone();
        let stop = self.deps.shutdown.clone();
        let mut trust = self.deps.trust.subscribe();
        self.spawn(async move {
            loop {
                let changed = tokio::select! {
                    c = trust.changed() => c,
                    _ = stop.cancelled() => return,
                };
                if changed.is_err() {
                    return;
                }
                this.broadcast(SyncMsg::Certs {
                    certs: this.deps.trust.certs(),
                });
                // A device that just became trusted is connected here (it joined through this
                // node): the others learn where it is now, not at their next session. Every
                // connected device's addresses go out again; trust changes are rare.
                for peer in this.net.connected_peers() {
                    this.maybe_open(peer);
                    share_addresses(&this.deps, peer);
                }
            }
        });
    }

    /// Live push of every stored change: a local one goes out while its flush runs, marked
    /// for every session on the thread that stored it (see
    /// [`Docs::on_stored`](crate::docs::Docs::on_stored)).
    fn push_changes(self: &Arc<Self>) {
        let registry = self.deps.registry.clone();
        self.deps.docs.on_stored(move |ch| {
            let from = match ch.origin {
                Origin::Peer(p) => Some(p),
                Origin::Local => None,
            };
            mark_dirty_everywhere(&registry, ch.id, from);
        });
    }

    /// Opens a session to `peer` if it is trusted and none runs. The lower peer id opens at
    /// once; the higher one after a grace period, in case the lower one doesn't know our
    /// certificate yet (our `Hello` carries it).
    fn maybe_open(self: &Arc<Self>, peer: PeerId) {
        self.maybe_open_attempt(peer, 0);
    }

    /// [`Manager::maybe_open`], attempt `attempt`. A session that ends within
    /// [`QUICK_END`] of opening (one side refused the other's `Hello`, as when a device that
    /// just joined has not yet switched to the mesh's person), or that cannot be opened at all
    /// (a peer still starting: its transport is up before its sync protocol is), is opened
    /// again after [`REOPEN_AFTER`] doubled per attempt, up to [`REOPEN_ATTEMPTS`] times:
    /// nothing else would trigger it, since the peer stays connected and trust here does not
    /// change.
    fn maybe_open_attempt(self: &Arc<Self>, peer: PeerId, attempt: u32) {
        let local = self.net.local;
        if !should_open(&self.deps, local, peer) {
            return;
        }
        let delay = open_delay(local, peer, self.deps.config.open_grace);
        let this = self.clone();
        self.spawn(async move {
            tokio::time::sleep(delay).await;
            if this.has_session(&peer) {
                return;
            }
            match this.net.open(peer, SYNC_PROTOCOL).await {
                Ok(stream) => {
                    let opened = tokio::time::Instant::now();
                    session::run(this.deps.clone(), peer, stream, Role::Initiator).await;
                    if opened.elapsed() < QUICK_END {
                        this.reopen_later(peer, attempt).await;
                    }
                }
                Err(e) => {
                    tracing::debug!(%peer, error = %e, attempt, "cannot open sync session");
                    if this.net.connected_peers().contains(&peer) {
                        this.reopen_later(peer, attempt).await;
                    }
                }
            }
        });
    }

    /// Waits [`REOPEN_AFTER`] × 2^`attempt`, then opens the session again (attempt
    /// `attempt + 1`), unless the attempts are used up or the node is stopping.
    async fn reopen_later(self: &Arc<Self>, peer: PeerId, attempt: u32) {
        if attempt >= REOPEN_ATTEMPTS || self.deps.shutdown.is_cancelled() {
            return;
        }
        tokio::time::sleep(REOPEN_AFTER * 2u32.pow(attempt)).await;
        self.maybe_open_attempt(peer, attempt + 1);
    }

    /// Ends every session and task, and waits for them: sessions get [`SHUTDOWN_GRACE`] to
    /// persist their states, then whatever still runs is aborted.
    pub async fn shutdown(&self) {
        self.deps.shutdown.cancel();
        self.deps.registry.close_all();
        let mut tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
    }

    /// Whether a live session with `peer` exists.
    pub fn has_session(&self, peer: &PeerId) -> bool {
        self.deps.registry.has_session(peer)
    }

    /// Queues a message to every session. Nothing is dropped: certificate sets replace a set
    /// still queued (the newest holds the older), roots are queued once.
    pub fn broadcast(&self, msg: SyncMsg) {
        broadcast(&self.deps.registry, &msg);
    }

    /// Per-peer progress for `iom status`: documents waiting to be sent to the peer
    /// (`docs_behind`), documents that differ and wait for the peer's first message
    /// (`docs_waiting`: it holds the news), documents it holds that have not arrived here yet
    /// (`docs_incoming`, meaningful once `compared`: the two inventories have been compared),
    /// bytes of blobs it announced that are not here yet (`bytes_pending`), and traffic so far.
    pub fn progress(&self) -> Vec<Value> {
        progress(
            &self.deps.registry,
            self.deps.blobs.as_ref(),
            &self.deps.docs,
        )
    }
}

/// A session shorter than this was refused rather than ended (see
/// [`Manager::maybe_open_attempt`]).
const QUICK_END: std::time::Duration = std::time::Duration::from_secs(2);
/// How long to wait before opening a refused session again (doubled per attempt).
const REOPEN_AFTER: std::time::Duration = std::time::Duration::from_secs(1);
/// How many times a refused session is opened again (1 + 2 + 4 + 8 s in all).
const REOPEN_ATTEMPTS: u32 = 4;

fn should_open(deps: &Deps, local: PeerId, peer: PeerId) -> bool {
    if peer == local || deps.registry.has_session(&peer) {
        return false;
    }
    DeviceId::from_peer_id(&peer).is_ok_and(|d| deps.trust.state().is_trusted(&d))
}

/// The preferred initiator (the lower peer id) opens at once, the other after `grace`.
fn open_delay(local: PeerId, peer: PeerId, grace: std::time::Duration) -> std::time::Duration {
    if local < peer {
        std::time::Duration::ZERO
    } else {
        grace
    }
}

/// Marks a document dirty in every session (it changed), except the session with the peer
/// the change came from: that session answers what it received by itself.
fn mark_dirty_everywhere(registry: &Registry, doc: DocId, except: Option<PeerId>) {
    for s in registry.handles() {
        if Some(s.peer) != except {
            s.mark_dirty(doc);
        }
    }
}

/// Queues `peer`'s addresses (if it is trusted and they are known) in every other session.
/// Sessions share addresses when they open too, but a device that joins later would otherwise
/// be met only if it called first, and its first calls come before the others trust it.
fn share_addresses(deps: &Deps, peer: PeerId) {
    if !deps.config.share_addrs {
        return;
    }
    let Some(entry) = session::addrs_of(deps, peer) else {
        return;
    };
    let msg = SyncMsg::Addrs { peers: vec![entry] };
    for s in deps.registry.handles() {
        if s.peer != peer {
            s.queue(msg.clone());
        }
    }
}

fn broadcast(registry: &Registry, msg: &SyncMsg) {
    for s in registry.handles() {
        s.queue(msg.clone());
    }
}

fn progress(registry: &Registry, blobs: &dyn BlobHandle, docs: &Docs) -> Vec<Value> {
    use std::sync::atomic::Ordering::Relaxed;
    registry
        .handles()
        .iter()
        .map(|s| {
            let stats = &s.shared.stats;
            // Copied out first: the session's lock is never held with the inventory's.
            let listed = s.incoming();
            let incoming =
                docs.with_inventory(|i| listed.iter().filter(|d| i.digest_of(d).is_none()).count());
            json!({
                "device": s.peer.to_string(),
                "docs_behind": s.backlog(),
                "docs_waiting": s.waiting(),
                "docs_incoming": incoming,
                "compared": s.compared(),
                "bytes_pending": blobs.pending_bytes_from(&s.peer),
                "docs_received": stats.docs_received.load(Relaxed),
                "snapshots_received": stats.snapshots_received.load(Relaxed),
                "bytes_in": stats.bytes_in.load(Relaxed),
                "bytes_out": stats.bytes_out.load(Relaxed),
            })
        })
        .collect()
}

impl Network for Net {
    fn local_peer(&self) -> PeerId {
        self.local
    }

    fn disconnect(&self, peer: PeerId) -> BoxFuture<'_, ()> {
        Box::pin(Net::disconnect(self, peer))
    }

    fn add_addresses(&self, peer: PeerId, addrs: Vec<Multiaddr>) -> BoxFuture<'_, ()> {
        Box::pin(Net::add_addresses(self, peer, addrs))
    }

    fn known_addresses(&self) -> Vec<(PeerId, Vec<Multiaddr>)> {
        let peers = self.peers.read().unwrap_or_else(|e| e.into_inner());
        peers
            .map
            .iter()
            .map(|(p, e)| (*p, e.addrs.clone()))
            .collect()
    }
}

/// The blob service as sessions see it: [`blobs::Blobs`] for wants and progress, the store for
/// what is here.
#[derive(Debug, Clone)]
pub struct StoreBlobs {
    store: Store,
    blobs: Arc<blobs::Blobs>,
}

impl StoreBlobs {
    /// Sessions' view of `blobs` over `store`.
    pub fn new(store: Store, blobs: Arc<blobs::Blobs>) -> StoreBlobs {
        StoreBlobs { store, blobs }
    }
}

impl BlobHandle for StoreBlobs {
    fn announcement_page(&self, after: Option<ContentId>, max: usize) -> Vec<(ContentId, u64)> {
        blobs::announcement_page(&self.store, after, max)
    }

    fn has(&self, id: &ContentId) -> bool {
        matches!(self.store.has_blob(id.as_bytes()), Ok(true))
    }

    fn want(&self, id: ContentId, len: u64, peer: PeerId) {
        self.blobs.want(id, len, peer);
    }

    fn pending_bytes_from(&self, peer: &PeerId) -> u64 {
        self.blobs.pending_bytes_from(peer)
    }

    fn digest(&self) -> Option<iom_protocol::blobset::BlobSetDigest> {
        self.store
            .blob_digest()
            .map_err(|e| tracing::warn!(error = %e, "cannot read the blob digest"))
            .ok()
    }
}

#[cfg(test)]
mod tests;
