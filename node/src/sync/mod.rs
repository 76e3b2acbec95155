//! Sync between trusted devices over `/iom/sync/1` and `/iom/blob/1`.
//!
//! One session per peer. On connect, in this order: trust certificates (`Hello`, then the whole
//! set), an inventory root, bucket digests and entries only where roots differ, then Automerge
//! sync only for documents that differ, and from then on live pushes of every change.
//!
//! Sending is pull-based: a session keeps a set of *dirty* documents and a writer task
//! generates one Automerge message per dirty document when the stream can take it. The reader
//! never waits on the writer, so two peers flooding each other can't deadlock, and the set is
//! bounded by the number of documents.
//!
//! # Layout
//! - [`gate`]: refusing untrusted peers.
//! - [`session`]: one peer's session.
//! - [`blobs`]: the blob server and the resumable, verifying fetcher.

pub mod blobs;
pub mod gate;
pub mod session;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use iom_protocol::keys::DeviceId;
use libp2p::PeerId;
use serde_json::{Value, json};

use crate::net::{NetEvent, SYNC_PROTOCOL};
use crate::node::NodeCtx;
use session::SessionHandle;

/// Owns the sessions with all peers.
#[derive(Default)]
pub struct SyncManager {
    sessions: Mutex<HashMap<PeerId, SessionHandle>>,
    next_id: std::sync::atomic::AtomicU64,
    /// Refusal accounting for untrusted peers (shared with the blob service).
    pub gate: Arc<gate::Gate>,
}

impl std::fmt::Debug for SyncManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncManager").finish_non_exhaustive()
    }
}

impl SyncManager {
    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<PeerId, SessionHandle>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a session; returns `None` if an equivalent one already runs (the session
    /// opened by the lower PeerId wins when both sides opened at once).
    pub(crate) fn register(&self, local: PeerId, handle: SessionHandle) -> Option<u64> {
        let mut sessions = self.sessions();
        let preferred = local.min(handle.peer);
        if let Some(existing) = sessions.get(&handle.peer)
            && !existing.is_closed()
            && (existing.initiator == preferred || handle.initiator != preferred)
        {
            return None;
        }
        let id = handle.id;
        if let Some(old) = sessions.insert(handle.peer, handle) {
            old.close();
        }
        Some(id)
    }

    pub(crate) fn unregister(&self, peer: PeerId, id: u64) {
        let mut sessions = self.sessions();
        if sessions.get(&peer).is_some_and(|s| s.id == id) {
            sessions.remove(&peer);
        }
    }

    pub(crate) fn next_id(&self) -> u64 {
        self.next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether a live session with `peer` exists.
    pub fn has_session(&self, peer: &PeerId) -> bool {
        self.sessions().get(peer).is_some_and(|s| !s.is_closed())
    }

    /// Marks a document dirty in every session (it changed), except the session with the peer
    /// the change came from: that session answers what it received by itself.
    pub fn mark_dirty_everywhere(&self, doc: iom_crdt::DocId, except: Option<PeerId>) {
        for s in self.sessions().values() {
            if Some(s.peer) != except {
                s.dirty.mark(doc);
            }
        }
    }

    /// Sends a message to every session.
    pub fn broadcast(&self, msg: iom_protocol::wire::SyncMsg) {
        for s in self.sessions().values() {
            let _ = s.control.try_send(msg.clone());
        }
    }

    /// Per-peer progress for `iom status`: documents waiting to be sent to the peer
    /// (`docs_behind`), bytes of blobs it announced that are not here yet (`bytes_pending`),
    /// and traffic so far.
    pub fn progress(&self, blobs: &blobs::Blobs) -> Vec<Value> {
        self.sessions()
            .values()
            .map(|s| {
                json!({
                    "device": s.peer.to_string(),
                    "docs_behind": s.dirty.len() + s.snapshots.len(),
                    "bytes_pending": blobs.pending_bytes_from(&s.peer),
                    "docs_received": s.stats.docs_received.load(std::sync::atomic::Ordering::Relaxed),
                    "snapshots_received": s.stats.snapshots_received.load(std::sync::atomic::Ordering::Relaxed),
                    "bytes_in": s.stats.bytes_in.load(std::sync::atomic::Ordering::Relaxed),
                    "bytes_out": s.stats.bytes_out.load(std::sync::atomic::Ordering::Relaxed),
                })
            })
            .collect()
    }
}

/// Starts the sync machinery: the accept loop, session initiation on connect and on trust
/// changes, and live pushes.
pub fn spawn(ctx: Arc<NodeCtx>) {
    // Inbound sessions.
    let mut control = ctx.net.control();
    match control.accept(SYNC_PROTOCOL) {
        Ok(mut incoming) => {
            let ctx2 = ctx.clone();
            tokio::spawn(async move {
                while let Some((peer, stream)) = incoming.next().await {
                    let ctx = ctx2.clone();
                    tokio::spawn(session::run(ctx, peer, stream, false));
                }
            });
        }
        Err(e) => tracing::error!(error = %e, "sync protocol already registered"),
    }
    // Outbound sessions on connect.
    let ctx2 = ctx.clone();
    let mut events = ctx.net.subscribe();
    tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(NetEvent::Connected(peer)) => maybe_open(&ctx2, peer),
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    for peer in ctx2.net.connected_peers() {
                        maybe_open(&ctx2, peer);
                    }
                }
                Err(_) => break,
            }
        }
    });
    // Trust changes: push certificates to every session and open sessions to peers that just
    // became trusted.
    let ctx2 = ctx.clone();
    let mut trust = ctx.trust.subscribe();
    tokio::spawn(async move {
        while trust.changed().await.is_ok() {
            ctx2.sync.broadcast(iom_protocol::wire::SyncMsg::Certs {
                certs: ctx2.trust.certs(),
            });
            for peer in ctx2.net.connected_peers() {
                maybe_open(&ctx2, peer);
            }
        }
    });
    // Live push of every durable change.
    let ctx2 = ctx.clone();
    let mut changes = ctx.docs.subscribe();
    tokio::spawn(async move {
        loop {
            match changes.recv().await {
                Ok(ch) => {
                    let from = match ch.origin {
                        crate::docs::Origin::Peer(p) => Some(p),
                        crate::docs::Origin::Local => None,
                    };
                    ctx2.sync.mark_dirty_everywhere(ch.id, from);
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    // Too many changes at once: fall back to comparing inventories.
                    let root = ctx2.docs.with_inventory(|i| i.root());
                    ctx2.sync
                        .broadcast(iom_protocol::wire::SyncMsg::Root { root });
                }
                Err(_) => break,
            }
        }
    });
}

fn maybe_open(ctx: &Arc<NodeCtx>, peer: PeerId) {
    if peer == ctx.net.local || ctx.sync.has_session(&peer) {
        return;
    }
    let Ok(device) = DeviceId::from_peer_id(&peer) else {
        return;
    };
    let state = ctx.trust.state();
    if !state.is_trusted(&device) {
        return;
    }
    // The lower PeerId opens; the higher one opens too after a grace period, in case the
    // lower one doesn't know our certificate yet (our Hello carries it).
    let delay = if ctx.net.local < peer {
        std::time::Duration::ZERO
    } else {
        std::time::Duration::from_millis(750)
    };
    let ctx = ctx.clone();
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        if ctx.sync.has_session(&peer) {
            return;
        }
        match ctx.net.open(peer, SYNC_PROTOCOL).await {
            Ok(stream) => session::run(ctx, peer, stream, true).await,
            Err(e) => tracing::debug!(%peer, error = %e, "cannot open sync session"),
        }
    });
}
