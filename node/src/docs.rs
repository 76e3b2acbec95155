//! The document service: loads Automerge documents from the store on demand, keeps a bounded
//! set of them in memory, persists every change as an incremental chunk (flushed before the
//! caller hears back), compacts in the background, and announces changes to subscribers
//! (the sync sessions, the agent, event streams).
//!
//! Automerge work runs on the blocking pool, except short work on documents that are already
//! loaded (see `Docs::near`): one small change takes tens of microseconds, a hop to the pool
//! and back about 90.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use automerge::ChangeHash;
use iom_crdt::{DocId, DocKind, Document, DocumentError, Inventory};
use libp2p::PeerId;
use tokio::sync::broadcast;

use crate::doc_cache::LruCache;
use crate::store::{ChunkWrite, DocMeta, Store, StoreError};

/// Chunks on top of a snapshot before a compaction is started.
const COMPACT_AFTER_CHUNKS: u64 = 64;

/// At most this many documents are handled on the calling task (see [`Docs::near`]).
const NEAR_MAX_DOCS: usize = 2;
/// Work on the calling task that took longer than this sends its documents' later work to
/// the blocking pool.
const NEAR_BUDGET: Duration = Duration::from_micros(500);
/// Slow documents remembered; past it the set starts over (they are measured again).
const SLOW_DOCS_MAX: usize = 4096;

/// Where a change came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Made on this node.
    Local,
    /// Received from a peer by sync.
    Peer(PeerId),
}

/// A document changed. Heard from [`Docs::subscribe`], the change is durable; from
/// [`Docs::on_stored`], it is stored and a local change's flush may still be running.
#[derive(Debug, Clone)]
pub struct DocChanged {
    /// Which document.
    pub id: DocId,
    /// Its heads after the change.
    pub heads: Vec<ChangeHash>,
    /// Who made the change.
    pub origin: Origin,
}

/// Errors of document operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DocsError {
    /// No such document here.
    #[error("no document {0} on this device (see `iom doc list`)")]
    NotFound(DocId),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The document operation failed.
    #[error(transparent)]
    Document(#[from] DocumentError),
    /// The stored bytes do not load (the chunk is named).
    #[error("document {id} does not load from its stored bytes: {detail}")]
    Unloadable {
        /// The document.
        id: DocId,
        /// What automerge said.
        detail: String,
    },
    /// A conversation edit failed (no such request, or an Automerge error).
    #[error("internal error: {0}")]
    Conversation(#[from] iom_crdt::ConversationError),
    /// A schedules edit failed.
    #[error("internal error: {0}")]
    Schedule(#[from] iom_crdt::ScheduleError),
    /// A settings edit failed.
    #[error("internal error: {0}")]
    Settings(#[from] iom_crdt::SettingsError),
    /// A JSON path edit failed (a bad path, a reserved field, too deep a value).
    #[error("internal error: {0}")]
    Path(#[from] iom_crdt::PathError),
    /// The blocking task that ran the operation panicked or was cancelled.
    #[error("internal error: {0}")]
    Join(#[from] tokio::task::JoinError),
}

type Shared = Arc<Mutex<Document>>;

/// What [`Docs::on_stored`] calls.
type StoredHook = Box<dyn Fn(&DocChanged) + Send + Sync>;

/// A document's heads and metadata right after a write.
type Stored = (Vec<ChangeHash>, DocMeta);
/// A received document that did not load, and why.
type Rejected = (DocId, DocumentError);

/// A received whole document that was stored.
struct AppliedSnapshot {
    id: DocId,
    stored: Stored,
    /// It was not here before (else it was merged into what was).
    new: bool,
}

struct Inner {
    store: Store,
    actor: Vec<u8>,
    cache: Mutex<LruCache<DocId, Mutex<Document>>>,
    changes: broadcast::Sender<DocChanged>,
    /// Called with the same changes as soon as they are stored, before a local change's flush.
    stored: std::sync::RwLock<Vec<StoredHook>>,
    /// Serialises loads so that one document is never loaded twice concurrently.
    load_lock: Mutex<()>,
    /// Heads digest of every document, for cheap comparisons with peers.
    inventory: Mutex<Inventory>,
    /// Documents whose work took longer than [`NEAR_BUDGET`] on the calling task.
    slow: Mutex<HashSet<DocId>>,
}

/// Handle to the document service; cheap to clone.
#[derive(Clone)]
pub struct Docs {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Docs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Docs").finish_non_exhaustive()
    }
}

/// The kind a document says it is, for its first metadata record.
fn kind_of(doc: &Document) -> String {
    doc.kind_name().unwrap_or_else(|| "generic".into())
}

/// CPU time of the calling thread (zero if the clock can't be read): what work on the
/// calling task cost, without the time the thread was preempted.
fn thread_cpu_time() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(Duration::from)
        .unwrap_or_default()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock means a panic elsewhere already; the data is still consistent because
    // every critical section here either completes or leaves the previous value.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Docs {
    /// Starts the service over `store`. `actor` is this process's Automerge actor id.
    pub fn new(store: Store, actor: Vec<u8>, capacity: usize) -> Result<Docs, DocsError> {
        // Big enough for the documents of a few snapshot batches, so a cold sync does not make
        // subscribers (the page's WebSocket, the agent) lag and have to look again.
        let (changes, _) = broadcast::channel(8192);
        let mut inventory = Inventory::new();
        store.for_each_doc_meta(|id, meta| {
            let heads: Vec<ChangeHash> = meta.heads.iter().map(|h| ChangeHash(*h)).collect();
            inventory.update(DocId::from_bytes(id), &heads);
        })?;
        Ok(Docs {
            inner: Arc::new(Inner {
                store,
                actor,
                cache: Mutex::new(LruCache::new(capacity)),
                changes,
                stored: std::sync::RwLock::new(Vec::new()),
                load_lock: Mutex::new(()),
                inventory: Mutex::new(inventory),
                slow: Mutex::new(HashSet::new()),
            }),
        })
    }

    /// Runs `f` on the inventory of all documents.
    pub fn with_inventory<R>(&self, f: impl FnOnce(&Inventory) -> R) -> R {
        f(&lock(&self.inner.inventory))
    }

    /// Tells both kinds of subscribers that `id` changed (a change that needs no flush, or
    /// whose flush is done). The inventory is updated before, while the document is still
    /// locked (see [`Docs::record_heads`]).
    fn announce(&self, id: DocId, heads: Vec<ChangeHash>, origin: Origin) {
        let change = DocChanged { id, heads, origin };
        self.call_stored_hooks(&change);
        let _ = self.inner.changes.send(change);
    }

    /// Announces a local change while `flush` runs: the [`Docs::on_stored`] hooks hear it
    /// before the flush, [`Docs::subscribe`] after it (and only if it succeeded).
    async fn announce_around_flush(
        &self,
        change: DocChanged,
        flush: impl std::future::Future<Output = Result<(), StoreError>>,
    ) -> Result<(), DocsError> {
        self.call_stored_hooks(&change);
        flush.await?;
        let _ = self.inner.changes.send(change);
        Ok(())
    }

    /// Records `id`'s new heads in the inventory. Called while the document's lock is held (or
    /// before the document is visible), so concurrent changes record their heads in the order
    /// they were made: recording after an await (a flush) let an older change's heads
    /// overwrite a newer one's, and two devices in sync then reported different roots.
    fn record_heads(&self, id: DocId, heads: &[ChangeHash]) {
        lock(&self.inner.inventory).update(id, heads);
    }

    /// The store underneath.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Subscribes to durable changes.
    pub fn subscribe(&self) -> broadcast::Receiver<DocChanged> {
        self.inner.changes.subscribe()
    }

    /// Calls `hook` with every change as soon as it is stored, on the thread that stored it:
    /// a local change is heard while its flush still runs, so sync sends it to peers during
    /// the fsync instead of after it, and with no hop to another task (a broadcast and the
    /// task that read it were 35 µs of a live change's 600, more under load). Its caller is
    /// still acknowledged only once it is durable. (Safe to share early: this process's actor
    /// id is new on every run, so a change lost in a crash here is never made again with the
    /// same actor and sequence number, and the copy a peer holds syncs back.) The hook must be
    /// quick and must not call back into the document service.
    pub fn on_stored(&self, hook: impl Fn(&DocChanged) + Send + Sync + 'static) {
        self.inner
            .stored
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(Box::new(hook));
    }

    fn call_stored_hooks(&self, change: &DocChanged) {
        let hooks = self.inner.stored.read().unwrap_or_else(|e| e.into_inner());
        for hook in hooks.iter() {
            hook(change);
        }
    }

    /// Every stored document with its metadata.
    pub fn list(&self) -> Result<Vec<(DocId, DocMeta)>, DocsError> {
        Ok(self
            .inner
            .store
            .doc_metas()?
            .into_iter()
            .map(|(id, m)| (DocId::from_bytes(id), m))
            .collect())
    }

    /// Every stored document of kind `kind` with its metadata (the others are read one at a
    /// time and dropped, never all held at once).
    pub fn list_kind(&self, kind: DocKind) -> Result<Vec<(DocId, DocMeta)>, DocsError> {
        let mut out = Vec::new();
        self.inner.store.for_each_doc_meta(|id, meta| {
            if meta.kind == kind.name() {
                out.push((DocId::from_bytes(id), meta));
            }
        })?;
        Ok(out)
    }

    /// Metadata of one document.
    pub fn meta(&self, id: DocId) -> Result<Option<DocMeta>, DocsError> {
        Ok(self.inner.store.doc_meta(id.as_bytes())?)
    }

    /// Creates a document. Singleton kinds use their well-known id and are not recreated.
    pub async fn create(&self, kind: DocKind) -> Result<DocId, DocsError> {
        self.create_with(kind, |_| Ok(())).await
    }

    /// Creates a document with its first content, written by `init`, and stores it as one
    /// compact snapshot. Written as a change after the creation, the content would be stored
    /// as a chunk of raw changes, and every load of the document, here and on each device it
    /// is sent to whole, would replay them one by one (several times the cost of loading a
    /// snapshot). A singleton kind's existing document gets `init` as an ordinary change.
    pub async fn create_with<F>(&self, kind: DocKind, init: F) -> Result<DocId, DocsError>
    where
        F: FnOnce(&mut Document) -> Result<(), DocsError> + Send + 'static,
    {
        let id = DocId::well_known(kind)
            .unwrap_or_else(|| DocId::from_bytes(crate::time::random_bytes::<16>()));
        let this = self.clone();
        let now = crate::time::now_secs() as i64;
        let existing = self
            .blocking(move || {
                let _guard = lock(&this.inner.load_lock);
                if this.inner.store.doc_meta(id.as_bytes())?.is_some() {
                    return Ok(Some(init));
                }
                let mut doc = Document::new(kind, &this.inner.actor, now)?;
                init(&mut doc)?;
                let bytes = doc.save();
                let heads = heads_bytes(&doc.heads());
                this.inner
                    .store
                    .append_doc_chunk(id.as_bytes(), kind.name(), &bytes, heads)?;
                this.record_heads(id, &doc.heads());
                this.insert_cached(id, Arc::new(Mutex::new(doc)));
                Ok(None)
            })
            .await?;
        if let Some(init) = existing {
            // A singleton that exists: the content is a change like any other.
            self.modify(id, Origin::Local, false, init).await?;
            return Ok(id);
        }
        let heads = self.read(id, |d| d.heads()).await?;
        let change = DocChanged {
            id,
            heads,
            origin: Origin::Local,
        };
        self.announce_around_flush(change, self.inner.store.flush())
            .await?;
        Ok(id)
    }

    /// Runs `f` on a document for reading.
    pub async fn read<R, F>(&self, id: DocId, f: F) -> Result<R, DocsError>
    where
        F: FnOnce(&Document) -> R + Send + 'static,
        R: Send + 'static,
    {
        let this = self.clone();
        self.near(&[id], move || {
            let doc = this.load(id, false)?.ok_or(DocsError::NotFound(id))?;
            let guard = lock(&doc);
            Ok(f(&guard))
        })
        .await
    }

    /// Runs `f` on a document for writing. When `f` changed the document, the change is
    /// stored and flushed before this returns, then announced. With `create_missing`, an
    /// unknown document starts empty (to receive it from a peer).
    pub async fn modify<R, F>(
        &self,
        id: DocId,
        origin: Origin,
        create_missing: bool,
        f: F,
    ) -> Result<R, DocsError>
    where
        F: FnOnce(&mut Document) -> Result<R, DocsError> + Send + 'static,
        R: Send + 'static,
    {
        let this = self.clone();
        let (result, changed) = self
            .near(&[id], move || this.modify_blocking(id, create_missing, f))
            .await?;
        if let Some((heads, meta)) = changed {
            if meta.pending_chunks() >= COMPACT_AFTER_CHUNKS {
                self.spawn_compaction(id);
            }
            // A local write is acknowledged only once it is on disk. A change received from a
            // peer needs no flush of its own: sled recovers a prefix of its log after a crash,
            // so the sync state saved after it can't survive without it, and whatever is lost
            // is simply synced again. (Flushing per received change made a cold sync of
            // 10,000 documents spend most of its time in fsync.)
            if origin == Origin::Local {
                let change = DocChanged { id, heads, origin };
                self.announce_around_flush(change, self.inner.store.flush())
                    .await?;
            } else {
                self.announce(id, heads, origin);
            }
        }
        Ok(result)
    }

    /// The blocking part of [`Docs::modify`]: runs `f`, stores what it changed, and returns
    /// the new heads and metadata when something changed (not yet flushed or announced).
    fn modify_blocking<R, F>(
        &self,
        id: DocId,
        create_missing: bool,
        f: F,
    ) -> Result<(R, Option<Stored>), DocsError>
    where
        F: FnOnce(&mut Document) -> Result<R, DocsError>,
    {
        // Refused below the disk reserve before anything changes in memory.
        self.inner.store.ensure_space(0)?;
        let doc = self
            .load(id, create_missing)?
            .ok_or(DocsError::NotFound(id))?;
        let mut guard = lock(&doc);
        let result = f(&mut guard)?;
        let bytes = guard.save_incremental();
        if bytes.is_empty() {
            return Ok((result, None));
        }
        let heads = guard.heads();
        let store = &self.inner.store;
        let stored = match store.doc_meta(id.as_bytes())? {
            // First persistence of a document received by sync: a full snapshot.
            None => store.append_doc_chunk(
                id.as_bytes(),
                &kind_of(&guard),
                &guard.snapshot(),
                heads_bytes(&heads),
            ),
            Some(meta) => {
                store.append_doc_chunk(id.as_bytes(), &meta.kind, &bytes, heads_bytes(&heads))
            }
        };
        let meta = match stored {
            Ok(meta) => meta,
            Err(e) => {
                // The change is in memory but not on disk: drop the cached copy so the next
                // use loads what is stored, and nothing unacknowledged lingers.
                drop(guard);
                lock(&self.inner.cache).remove(&id);
                return Err(e.into());
            }
        };
        self.record_heads(id, &heads);
        Ok((result, Some((heads, meta))))
    }

    /// [`Docs::read`] for several documents in one blocking hop, each result with a pin that
    /// keeps its document loaded (taken while it was, so nothing loaded meanwhile evicts it
    /// first). Documents that are not here come back as `None`; a document that does not load
    /// stops the batch with its error.
    pub async fn read_many<T, R, F>(
        &self,
        items: Vec<(DocId, T)>,
        f: F,
    ) -> Result<Vec<Option<(R, DocPin)>>, DocsError>
    where
        T: Send + 'static,
        R: Send + 'static,
        F: Fn(&Document, T) -> R + Send + 'static,
    {
        let this = self.clone();
        let ids: Vec<DocId> = items.iter().map(|(id, _)| *id).collect();
        self.near(&ids, move || {
            let mut out = Vec::with_capacity(items.len());
            for (id, item) in items {
                match this.load(id, false)? {
                    Some(doc) => {
                        let r = f(&lock(&doc), item);
                        out.push(Some((r, DocPin { _loaded: doc })));
                    }
                    None => out.push(None),
                }
            }
            Ok(out)
        })
        .await
    }

    /// [`Docs::modify`] for several distinct documents received from a peer, in one blocking
    /// hop and one store transaction (no flush: see [`Docs::modify`]), each result with a pin
    /// of its document (as [`Docs::read_many`]). Unknown documents start empty. Items run in
    /// order; the first that fails (its document does not load) stops the batch: what came
    /// before is stored and returned with the error.
    pub async fn modify_many<T, R, F>(
        &self,
        peer: PeerId,
        items: Vec<(DocId, T)>,
        f: F,
    ) -> Result<(Vec<(R, DocPin)>, Option<DocsError>), DocsError>
    where
        T: Send + 'static,
        R: Send + 'static,
        F: Fn(DocId, &mut Document, T) -> R + Send + 'static,
    {
        let this = self.clone();
        let ids: Vec<DocId> = items.iter().map(|(id, _)| *id).collect();
        let (results, stored, failed) = self
            .near(&ids, move || this.modify_many_blocking(items, f))
            .await?;
        for (id, heads, meta) in stored {
            if meta.pending_chunks() >= COMPACT_AFTER_CHUNKS {
                self.spawn_compaction(id);
            }
            self.announce(id, heads, Origin::Peer(peer));
        }
        Ok((results, failed))
    }

    /// The blocking part of [`Docs::modify_many`]. The documents' locks are taken in id order
    /// (so two batches never wait on each other) and held until their heads are recorded.
    #[allow(clippy::type_complexity)]
    fn modify_many_blocking<T, R, F>(
        &self,
        items: Vec<(DocId, T)>,
        f: F,
    ) -> Result<
        (
            Vec<(R, DocPin)>,
            Vec<(DocId, Vec<ChangeHash>, DocMeta)>,
            Option<DocsError>,
        ),
        DocsError,
    >
    where
        F: Fn(DocId, &mut Document, T) -> R,
    {
        self.inner.store.ensure_space(0)?;
        // Load every document first (in the caller's order: the first that fails stops the
        // batch there), then lock them in id order.
        let mut shared = Vec::with_capacity(items.len());
        let mut todo = Vec::with_capacity(items.len());
        let mut failed = None;
        for (id, item) in items {
            match self.load(id, true) {
                Ok(Some(doc)) => {
                    shared.push(doc);
                    todo.push((id, item));
                }
                Ok(None) => {
                    failed = Some(DocsError::NotFound(id));
                    break;
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        let mut order: Vec<usize> = (0..todo.len()).collect();
        order.sort_by_key(|&i| todo[i].0);
        let mut guards: Vec<Option<std::sync::MutexGuard<'_, Document>>> =
            (0..todo.len()).map(|_| None).collect();
        for &i in &order {
            guards[i] = Some(lock(&shared[i]));
        }
        let mut results = Vec::with_capacity(todo.len());
        // (id, heads, kind, bytes) of each document that changed.
        let mut changed = Vec::new();
        let store = &self.inner.store;
        for ((id, item), guard) in todo.into_iter().zip(guards.iter_mut()) {
            let Some(guard) = guard.as_mut() else {
                continue;
            };
            results.push(f(id, guard, item));
            let bytes = guard.save_incremental();
            if bytes.is_empty() {
                continue;
            }
            let heads = guard.heads();
            // First persistence of a document received by sync: a full snapshot. (A stored
            // document's kind is its metadata's: reading it from Automerge was 1% of a
            // receiving node's CPU in a live profile.)
            let (kind, bytes) = match store.doc_meta(id.as_bytes())? {
                None => (kind_of(guard), guard.snapshot()),
                Some(meta) => (meta.kind, bytes),
            };
            changed.push((id, heads, kind, bytes));
        }
        let writes: Vec<ChunkWrite<'_>> = changed
            .iter()
            .map(|(id, heads, kind, bytes)| ChunkWrite {
                id: *id.as_bytes(),
                kind,
                bytes,
                heads: heads_bytes(heads),
            })
            .collect();
        let metas = match store.append_doc_chunks(&writes) {
            Ok(metas) => metas,
            Err(e) => {
                // The changes are in memory but not on disk: drop the cached copies so the
                // next use loads what is stored.
                drop(writes);
                drop(guards);
                let mut cache = lock(&self.inner.cache);
                for (id, ..) in &changed {
                    cache.remove(id);
                }
                return Err(e.into());
            }
        };
        drop(writes);
        let mut stored = Vec::with_capacity(changed.len());
        for ((id, heads, _, _), meta) in changed.into_iter().zip(metas) {
            self.record_heads(id, &heads);
            stored.push((id, heads, meta));
        }
        drop(guards);
        let results = results
            .into_iter()
            .zip(shared)
            .map(|(r, doc)| (r, DocPin { _loaded: doc }))
            .collect();
        Ok((results, stored, failed))
    }

    /// Whole stored documents for a peer that has none of them: each document's stored chunks
    /// concatenated (loadable as one), with its heads, read from the store without loading
    /// them into Automerge. Documents bigger than `max_bytes` (and ones deleted meanwhile) come
    /// back in the second list, to be synced the usual way.
    pub async fn snapshots(
        &self,
        ids: Vec<DocId>,
        max_bytes: usize,
    ) -> Result<(Vec<Snapshot>, Vec<DocId>), DocsError> {
        let this = self.clone();
        self.blocking(move || {
            let mut out = Vec::with_capacity(ids.len());
            let mut other = Vec::new();
            for id in ids {
                let stored = match this.inner.store.load_doc(id.as_bytes()) {
                    Ok(stored) => stored,
                    Err(StoreError::NoSuchDoc(_)) => {
                        other.push(id);
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                if stored.chunks.iter().map(Vec::len).sum::<usize>() > max_bytes {
                    other.push(id);
                    continue;
                }
                out.push(Snapshot {
                    id,
                    bytes: stored.chunks.concat(),
                    heads: stored.meta.heads.iter().map(|h| ChangeHash(*h)).collect(),
                });
            }
            Ok((out, other))
        })
        .await
    }

    /// Stores whole documents received from `peer` ([`Docs::snapshots`] on its side). Each
    /// one is loaded first, which verifies every change hash. A document that is new here is
    /// stored as received, all of them in one transaction; one that exists (or is being
    /// received another way) is merged into it. Every document that changed is announced.
    ///
    /// Stops at the first document that does not load and reports it in
    /// [`SnapshotsApplied::rejected`]; the ones before it are kept.
    pub async fn receive_snapshots(
        &self,
        peer: PeerId,
        snapshots: Vec<(DocId, Vec<u8>)>,
    ) -> Result<SnapshotsApplied, DocsError> {
        let this = self.clone();
        let (applied, rejected) = self
            .blocking(move || this.receive_snapshots_blocking(snapshots))
            .await?;
        let mut out = SnapshotsApplied {
            rejected,
            ..SnapshotsApplied::default()
        };
        for AppliedSnapshot {
            id,
            stored: (heads, meta),
            new,
        } in applied
        {
            if meta.pending_chunks() >= COMPACT_AFTER_CHUNKS {
                self.spawn_compaction(id);
            }
            if new {
                out.new.push((id, heads.clone()));
            } else {
                out.merged.push(id);
            }
            self.announce(id, heads, Origin::Peer(peer));
        }
        Ok(out)
    }

    /// The blocking part of [`Docs::receive_snapshots`]: what was stored (id, heads and
    /// metadata, and whether the document is new here), and the first rejected document.
    fn receive_snapshots_blocking(
        &self,
        snapshots: Vec<(DocId, Vec<u8>)>,
    ) -> Result<(Vec<AppliedSnapshot>, Option<Rejected>), DocsError> {
        let mut rejected = None;
        let mut loaded = Vec::with_capacity(snapshots.len());
        for (id, bytes) in snapshots {
            match Document::load(&bytes, &self.inner.actor) {
                Ok(doc) => loaded.push((id, doc, bytes)),
                Err(e) => {
                    rejected = Some((id, e));
                    break;
                }
            }
        }
        let mut applied = Vec::with_capacity(loaded.len());
        let mut merge = Vec::new();
        {
            // New documents: stored as received, in one transaction, and cached. The load
            // lock keeps a concurrent load or creation of the same id out meanwhile.
            let _guard = lock(&self.inner.load_lock);
            let mut fresh = Vec::with_capacity(loaded.len());
            for (id, mut doc, bytes) in loaded {
                let known = lock(&self.inner.cache).contains(&id)
                    || self.inner.store.doc_meta(id.as_bytes())?.is_some();
                if known {
                    merge.push((id, bytes));
                } else {
                    let kind = kind_of(&doc);
                    // A document sent whole is its sender's chunks one after the other; stored
                    // so, every load here would replay its changes one by one. It is loaded
                    // already: saving it compact costs only the encoding.
                    let bytes = if Document::is_compact(&bytes) {
                        bytes
                    } else {
                        doc.save()
                    };
                    fresh.push((id, doc, bytes, kind));
                }
            }
            let writes: Vec<ChunkWrite<'_>> = fresh
                .iter()
                .map(|(id, doc, bytes, kind)| ChunkWrite {
                    id: *id.as_bytes(),
                    kind,
                    bytes,
                    heads: heads_bytes(&doc.heads()),
                })
                .collect();
            let metas = self.inner.store.append_doc_chunks(&writes)?;
            drop(writes);
            for ((id, doc, _, _), meta) in fresh.into_iter().zip(metas) {
                self.record_heads(id, &doc.heads());
                applied.push(AppliedSnapshot {
                    id,
                    stored: (doc.heads(), meta),
                    new: true,
                });
                self.insert_cached(id, Arc::new(Mutex::new(doc)));
            }
        }
        for (id, bytes) in merge {
            let ((), changed) = self.modify_blocking(id, true, move |d| {
                d.load_incremental(&bytes)
                    .map(drop)
                    .map_err(DocsError::from)
            })?;
            if let Some(stored) = changed {
                applied.push(AppliedSnapshot {
                    id,
                    stored,
                    new: false,
                });
            }
        }
        Ok((applied, rejected))
    }

    /// Drops the in-memory placeholder of a document that was never stored (one that
    /// [`Docs::modify`] with `create_missing` started empty, when what arrived for it was bad),
    /// so it does not pose as a stored, empty document.
    pub fn forget_unstored(&self, id: DocId) -> Result<(), DocsError> {
        let _guard = lock(&self.inner.load_lock);
        if self.inner.store.doc_meta(id.as_bytes())?.is_none() {
            lock(&self.inner.cache).remove(&id);
        }
        Ok(())
    }

    fn spawn_compaction(&self, id: DocId) {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let result = (|| -> Result<(), DocsError> {
                let Some(doc) = this.load(id, false)? else {
                    return Ok(());
                };
                let guard = lock(&doc);
                let Some(meta) = this.inner.store.doc_meta(id.as_bytes())? else {
                    return Ok(());
                };
                let snapshot = guard.snapshot();
                this.inner
                    .store
                    .compact_doc(id.as_bytes(), &snapshot, meta.next_seq)?;
                Ok(())
            })();
            if let Err(e) = result {
                tracing::warn!(doc = %id, error = %e, "compaction failed; will retry later");
            }
        });
    }

    async fn blocking<R, F>(&self, f: F) -> Result<R, DocsError>
    where
        F: FnOnce() -> Result<R, DocsError> + Send + 'static,
        R: Send + 'static,
    {
        tokio::task::spawn_blocking(f).await?
    }

    /// Runs `f` on the calling task when every document in `ids` (at most
    /// [`NEAR_MAX_DOCS`]) is loaded and none was slow before, else on the blocking pool. A
    /// live change spent about 90 µs of its 230 in the hop to the pool and back; work here
    /// that costs more than [`NEAR_BUDGET`] of CPU time (not wall time: a preempted thread
    /// is not slow work) marks its documents slow, so a big document holds an executor
    /// thread once, not every time.
    async fn near<R, F>(&self, ids: &[DocId], f: F) -> Result<R, DocsError>
    where
        F: FnOnce() -> Result<R, DocsError> + Send + 'static,
        R: Send + 'static,
    {
        if !self.quick_here(ids) {
            return self.blocking(f).await;
        }
        let started = thread_cpu_time();
        let result = f();
        if thread_cpu_time().saturating_sub(started) > NEAR_BUDGET {
            let mut slow = lock(&self.inner.slow);
            if slow.len() + ids.len() > SLOW_DOCS_MAX {
                slow.clear();
            }
            slow.extend(ids.iter().copied());
        }
        result
    }

    /// Whether work on `ids` may run on the calling task (see [`Docs::near`]).
    fn quick_here(&self, ids: &[DocId]) -> bool {
        if ids.is_empty() || ids.len() > NEAR_MAX_DOCS {
            return false;
        }
        {
            let slow = lock(&self.inner.slow);
            if ids.iter().any(|id| slow.contains(id)) {
                return false;
            }
        }
        let cache = lock(&self.inner.cache);
        ids.iter().all(|id| cache.contains(id))
    }

    fn insert_cached(&self, id: DocId, doc: Shared) {
        lock(&self.inner.cache).insert(id, doc);
    }

    /// Loads a document into the cache (blocking).
    fn load(&self, id: DocId, create_missing: bool) -> Result<Option<Shared>, DocsError> {
        if let Some(doc) = lock(&self.inner.cache).get(&id) {
            return Ok(Some(doc));
        }
        let _guard = lock(&self.inner.load_lock);
        if let Some(doc) = lock(&self.inner.cache).get(&id) {
            return Ok(Some(doc));
        }
        let doc = match self.inner.store.load_doc(id.as_bytes()) {
            Ok(stored) => {
                crate::metrics::node().docs_loaded.add(1);
                let mut chunks = stored.chunks.iter();
                let first = chunks.next().map(Vec::as_slice).unwrap_or_default();
                let mut doc = Document::load(first, &self.inner.actor).map_err(|e| {
                    DocsError::Unloadable {
                        id,
                        detail: e.to_string(),
                    }
                })?;
                for chunk in chunks {
                    doc.load_incremental(chunk)
                        .map_err(|e| DocsError::Unloadable {
                            id,
                            detail: e.to_string(),
                        })?;
                }
                // Everything loaded is already stored: start the incremental cursor here.
                doc.mark_saved();
                doc
            }
            Err(StoreError::NoSuchDoc(_)) if create_missing => Document::empty(&self.inner.actor)?,
            Err(StoreError::NoSuchDoc(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let shared = Arc::new(Mutex::new(doc));
        self.insert_cached(id, shared.clone());
        Ok(Some(shared))
    }
}

/// Keeps one document loaded while it lives (from [`Docs::read_many`] and
/// [`Docs::modify_many`]): the cache never evicts a document someone holds, so a sync session
/// keeps the documents it is exchanging and does not load them again for each message. Gives
/// no access to the document.
pub struct DocPin {
    _loaded: Shared,
}

impl std::fmt::Debug for DocPin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DocPin").finish_non_exhaustive()
    }
}

/// One whole stored document, from [`Docs::snapshots`].
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The document.
    pub id: DocId,
    /// Its stored chunks, concatenated.
    pub bytes: Vec<u8>,
    /// Its heads.
    pub heads: Vec<ChangeHash>,
}

/// What [`Docs::receive_snapshots`] did.
#[derive(Debug, Default)]
pub struct SnapshotsApplied {
    /// Documents that were new here, with their heads (exactly the sender's).
    pub new: Vec<(DocId, Vec<ChangeHash>)>,
    /// Documents that existed here and gained changes by the merge.
    pub merged: Vec<DocId>,
    /// The first document that did not load, and why; none after it was looked at.
    pub rejected: Option<Rejected>,
}

/// Change hashes as raw 32-byte arrays.
pub fn heads_bytes(heads: &[ChangeHash]) -> Vec<[u8; 32]> {
    heads.iter().map(|h| h.0).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_document_received_empty_stays_readable() {
        let (_dir, store) = crate::store::temp_store();
        let docs = Docs::new(store, vec![1; 40], 8).unwrap();
        let id = DocId::from_bytes([9; 16]);
        docs.modify(id, Origin::Local, true, |_| Ok(()))
            .await
            .unwrap();
        let heads = docs.read(id, |d| d.heads()).await.unwrap();
        assert!(heads.is_empty());
    }

    use std::time::Duration;

    use iom_crdt::PathError;
    use serde_json::json;

    fn actor(n: u8) -> Vec<u8> {
        iom_crdt::actor_for(&[n; 32], [n; 8])
    }

    fn docs(store: &Store, n: u8) -> Docs {
        Docs::new(store.clone(), actor(n), 8).unwrap()
    }

    async fn put(docs: &Docs, id: DocId, path: &str, value: serde_json::Value) {
        let path = path.to_string();
        docs.modify(id, Origin::Local, false, move |d| {
            d.put_json(&path, value, "test edit", 1)
                .map_err(DocsError::from)
        })
        .await
        .unwrap();
    }

    /// A change to `id` as if received from `peer` (no flush).
    async fn peer_edit(docs: &Docs, id: DocId, peer: PeerId) {
        docs.modify(id, Origin::Peer(peer), false, |d| {
            d.put_json("from", json!("peer"), "peer edit", 2)
                .map_err(DocsError::from)
        })
        .await
        .unwrap();
    }

    async fn get(docs: &Docs, id: DocId, path: &str) -> Option<serde_json::Value> {
        let path = path.to_string();
        docs.read(id, move |d| d.get_json(&path).unwrap())
            .await
            .unwrap()
    }

    /// Which thread ran a read of `id`.
    async fn reading_thread(docs: &Docs, id: DocId) -> std::thread::ThreadId {
        docs.read(id, |_| std::thread::current().id())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn quick_work_on_a_loaded_document_runs_here_until_it_is_slow_once() {
        let (_dir, store) = crate::store::temp_store();
        let docs = docs(&store, 1);
        let id = docs.create(DocKind::Generic).await.unwrap();
        let here = std::thread::current().id();
        assert_eq!(reading_thread(&docs, id).await, here);
        put(&docs, id, "n", json!(1)).await;
        assert_eq!(get(&docs, id, "n").await, Some(json!(1)));
        // Work that burns more CPU than the budget marks the document slow.
        docs.read(id, |_| {
            let start = thread_cpu_time();
            while thread_cpu_time().saturating_sub(start) <= NEAR_BUDGET {}
        })
        .await
        .unwrap();
        assert_ne!(
            reading_thread(&docs, id).await,
            here,
            "slow once: the pool from then on"
        );
        assert_ne!(reading_thread(&docs, id).await, here);
    }

    #[tokio::test]
    async fn documents_not_loaded_and_batches_of_many_go_to_the_pool() {
        let (_dir, store) = crate::store::temp_store();
        let first = docs(&store, 1);
        let mut ids = Vec::new();
        for _ in 0..3 {
            ids.push(first.create(DocKind::Generic).await.unwrap());
        }
        let here = std::thread::current().id();
        // A second service over the same store has none of them loaded.
        let docs = docs(&store, 2);
        assert_ne!(
            reading_thread(&docs, ids[0]).await,
            here,
            "loading is I/O: the pool"
        );
        assert_eq!(reading_thread(&docs, ids[0]).await, here, "loaded now");
        for id in &ids {
            reading_thread(&docs, *id).await;
        }
        let items = ids.iter().map(|id| (*id, ())).collect();
        let threads = docs
            .read_many(items, |_, ()| std::thread::current().id())
            .await
            .unwrap();
        let threads: Vec<_> = threads.into_iter().map(|r| r.map(|(t, _)| t)).collect();
        assert_eq!(threads.len(), NEAR_MAX_DOCS + 1);
        assert!(
            threads.iter().all(|t| *t != Some(here)),
            "more than NEAR_MAX_DOCS: the pool"
        );
        let two = ids[..NEAR_MAX_DOCS].iter().map(|id| (*id, ())).collect();
        let threads = docs
            .read_many(two, |_, ()| std::thread::current().id())
            .await
            .unwrap();
        assert!(
            threads
                .iter()
                .all(|r| r.as_ref().map(|(t, _)| *t) == Some(here))
        );
    }

    #[tokio::test]
    async fn a_created_document_is_stored_readable_and_announced() {
        let (_dir, store) = crate::store::temp_store();
        let docs = docs(&store, 1);
        let mut changes = docs.subscribe();
        let id = docs.create(DocKind::Generic).await.unwrap();
        let meta = docs.meta(id).unwrap().unwrap();
        assert_eq!(meta.kind, "generic");
        let change = changes.try_recv().unwrap();
        assert_eq!(change.id, id);
        assert_eq!(change.origin, Origin::Local);
        assert_eq!(heads_bytes(&change.heads), meta.heads);
        let kind = docs.read(id, |d| d.kind()).await.unwrap();
        assert_eq!(kind, Some(DocKind::Generic));
        assert_eq!(docs.list().unwrap().len(), 1);
        assert!(docs.with_inventory(|i| i.digest_of(&id).is_some()));
    }

    #[tokio::test]
    async fn singletons_keep_their_well_known_id_and_are_created_once() {
        let (_dir, store) = crate::store::temp_store();
        let docs = docs(&store, 1);
        let a = docs.create(DocKind::Memory).await.unwrap();
        let mut changes = docs.subscribe();
        let b = docs.create(DocKind::Memory).await.unwrap();
        assert_eq!(a, DocId::MEMORY);
        assert_eq!(a, b);
        assert_eq!(docs.list().unwrap().len(), 1);
        assert!(changes.try_recv().is_err(), "nothing new to announce");
    }

    #[tokio::test]
    async fn a_change_is_stored_as_a_chunk_and_announced_with_its_origin() {
        let (_dir, store) = crate::store::temp_store();
        let docs = docs(&store, 1);
        let id = docs.create(DocKind::Generic).await.unwrap();
        let before = docs.meta(id).unwrap().unwrap();
        let root_before = docs.with_inventory(|i| i.root());
        let mut changes = docs.subscribe();
        put(&docs, id, "note", json!("hello")).await;
        assert_eq!(get(&docs, id, "note").await, Some(json!("hello")));
        let after = docs.meta(id).unwrap().unwrap();
        assert_eq!(after.next_seq, before.next_seq + 1, "one incremental chunk");
        assert_ne!(after.heads, before.heads);
        assert_ne!(docs.with_inventory(|i| i.root()), root_before);
        let change = changes.try_recv().unwrap();
        assert_eq!((change.id, change.origin), (id, Origin::Local));

        let peer = PeerId::random();
        peer_edit(&docs, id, peer).await;
        assert_eq!(changes.try_recv().unwrap().origin, Origin::Peer(peer));
    }

    #[tokio::test]
    async fn sync_hears_a_local_change_during_its_flush_and_the_others_after_it() {
        let (_dir, store) = crate::store::temp_store();
        let docs = docs(&store, 1);
        let id = docs.create(DocKind::Generic).await.unwrap();
        let (tx, mut early) = tokio::sync::mpsc::channel(16);
        docs.on_stored(move |c| {
            let _ = tx.try_send(c.clone());
        });
        let mut durable = docs.subscribe();
        let change = DocChanged {
            id,
            heads: Vec::new(),
            origin: Origin::Local,
        };
        let (done, flushed) = tokio::sync::oneshot::channel::<()>();
        let announcing = tokio::spawn({
            let docs = docs.clone();
            let change = change.clone();
            async move {
                let flush = async move {
                    let _ = flushed.await;
                    Ok(())
                };
                docs.announce_around_flush(change, flush).await
            }
        });
        let heard = early.recv().await.unwrap();
        assert_eq!((heard.id, heard.origin), (id, Origin::Local));
        tokio::task::yield_now().await;
        assert!(durable.try_recv().is_err(), "not durable before the flush");
        done.send(()).unwrap();
        announcing.await.unwrap().unwrap();
        assert_eq!(durable.recv().await.unwrap().id, id);

        // A flush that fails is reported, and nobody hears of a durable change.
        let failed = docs
            .announce_around_flush(change, async {
                Err(StoreError::Corrupt { id: "x".into() })
            })
            .await;
        assert!(matches!(failed, Err(DocsError::Store(_))));
        assert_eq!(early.try_recv().unwrap().id, id);
        assert!(durable.try_recv().is_err());

        // A real local write reaches both; a peer's change (no flush) too.
        put(&docs, id, "note", json!("hello")).await;
        assert_eq!(early.try_recv().unwrap().origin, Origin::Local);
        assert_eq!(durable.try_recv().unwrap().origin, Origin::Local);
        let peer = PeerId::random();
        peer_edit(&docs, id, peer).await;
        assert_eq!(early.try_recv().unwrap().origin, Origin::Peer(peer));
        assert_eq!(durable.try_recv().unwrap().origin, Origin::Peer(peer));
    }

    #[tokio::test]
    async fn a_modification_that_changes_nothing_stores_and_announces_nothing() {
        let (_dir, store) = crate::store::temp_store();
        let docs = docs(&store, 1);
        let id = docs.create(DocKind::Generic).await.unwrap();
        let before = docs.meta(id).unwrap().unwrap();
        let mut changes = docs.subscribe();
        let answer = docs
            .modify(id, Origin::Local, false, |d| Ok(d.heads().len()))
            .await
            .unwrap();
        assert_eq!(answer, 1);
        assert_eq!(docs.meta(id).unwrap().unwrap(), before);
        assert!(changes.try_recv().is_err());
    }

    #[tokio::test]
    async fn an_unknown_document_is_not_found_unless_asked_to_create_it() {
        let (_dir, store) = crate::store::temp_store();
        let docs = docs(&store, 1);
        let id = DocId::from_bytes([7; 16]);
        let err = docs.read(id, |_| ()).await.unwrap_err();
        assert!(matches!(err, DocsError::NotFound(i) if i == id));
        assert!(err.to_string().contains("see `iom doc list`"), "{err}");
        let err = docs
            .modify(id, Origin::Local, false, |_| Ok(()))
            .await
            .unwrap_err();
        assert!(matches!(err, DocsError::NotFound(_)));
        // Created empty to receive it: the first change stores a whole snapshot.
        docs.modify(id, Origin::Local, true, |d| {
            d.put_json("x", json!(1), "first", 1)
                .map_err(DocsError::from)
        })
        .await
        .unwrap();
        let stored = store.load_doc(id.as_bytes()).unwrap();
        assert_eq!(stored.meta.kind, "generic");
        assert_eq!(stored.chunks.len(), 1);
        let loaded = Document::load(&stored.chunks[0], &actor(2)).unwrap();
        assert_eq!(loaded.get_json("x").unwrap(), Some(json!(1)));
    }

    #[tokio::test]
    async fn an_error_inside_a_modification_is_returned_typed() {
        let (_dir, store) = crate::store::temp_store();
        let docs = docs(&store, 1);
        let id = docs.create(DocKind::Generic).await.unwrap();
        let err = docs
            .modify(id, Origin::Local, false, |d| {
                d.put_json("", json!(1), "bad", 1).map_err(DocsError::from)
            })
            .await
            .unwrap_err();
        assert!(
            matches!(err, DocsError::Path(PathError::EmptyPath)),
            "{err}"
        );
        assert!(
            err.to_string().starts_with("internal error: empty path"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn changes_survive_a_restart_and_the_inventory_is_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let (id, root) = {
            let store = Store::open(&path, 1 << 20).unwrap();
            let docs = docs(&store, 1);
            let id = docs.create(DocKind::Generic).await.unwrap();
            put(&docs, id, "note", json!({"a": [1, 2]})).await;
            docs.create(DocKind::Settings).await.unwrap();
            (id, docs.with_inventory(|i| i.root()))
        };
        let store = Store::open(&path, 1 << 20).unwrap();
        let docs = docs(&store, 2);
        assert_eq!(docs.with_inventory(|i| i.root()), root);
        assert_eq!(docs.with_inventory(Inventory::len), 2);
        assert_eq!(get(&docs, id, "note.a").await, Some(json!([1, 2])));
    }

    #[tokio::test]
    async fn a_document_created_with_content_is_stored_as_one_snapshot() {
        let (_dir, store) = crate::store::temp_store();
        let docs = docs(&store, 1);
        let id = docs
            .create_with(DocKind::Generic, |d| {
                for (i, field) in ["a", "b", "c"].into_iter().enumerate() {
                    d.put_json(field, json!(i), "initial content", 1)
                        .map_err(DocsError::from)?;
                }
                Ok(())
            })
            .await
            .unwrap();
        let meta = docs.meta(id).unwrap().unwrap();
        assert_eq!(meta.pending_chunks(), 0, "one chunk, the snapshot");
        let stored = store.load_doc(id.as_bytes()).unwrap();
        assert_eq!(stored.chunks.len(), 1);
        let fresh = Docs::new(store.clone(), actor(2), 8).unwrap();
        assert_eq!(get(&fresh, id, "c").await, Some(json!(2)));
        // Content that fails leaves no document behind.
        let err = docs
            .create_with(DocKind::Generic, |_| {
                Err(DocsError::NotFound(DocId::from_bytes([7; 16])))
            })
            .await;
        assert!(err.is_err());
        assert_eq!(docs.list().unwrap().len(), 1);
        // A singleton that exists gets the content as a change.
        let first = docs.create(DocKind::Memory).await.unwrap();
        let again = docs
            .create_with(DocKind::Memory, |d| {
                d.put_json("note", json!("x"), "edit", 1)
                    .map_err(DocsError::from)
            })
            .await
            .unwrap();
        assert_eq!(again, first);
        assert_eq!(get(&docs, first, "note").await, Some(json!("x")));
    }

    #[tokio::test]
    async fn documents_evicted_from_the_cache_load_again_from_the_store() {
        let (_dir, store) = crate::store::temp_store();
        let docs = Docs::new(store.clone(), actor(1), 1).unwrap();
        let a = docs.create(DocKind::Generic).await.unwrap();
        let b = docs.create(DocKind::Generic).await.unwrap();
        put(&docs, a, "n", json!("a")).await;
        put(&docs, b, "n", json!("b")).await;
        let loaded = crate::metrics::node().docs_loaded.get();
        for _ in 0..3 {
            assert_eq!(get(&docs, a, "n").await, Some(json!("a")));
            assert_eq!(get(&docs, b, "n").await, Some(json!("b")));
        }
        assert_eq!(
            lock(&docs.inner.cache).len(),
            1,
            "the cache stays at its capacity"
        );
        // The counter is the process's (other tests load too): at least these six loads.
        assert!(
            crate::metrics::node().docs_loaded.get() >= loaded + 6,
            "every miss is counted"
        );
    }

    #[tokio::test]
    async fn a_document_whose_bytes_do_not_load_is_named() {
        let (_dir, store) = crate::store::temp_store();
        let id = DocId::from_bytes([5; 16]);
        store
            .append_doc_chunk(id.as_bytes(), "generic", b"not automerge", vec![])
            .unwrap();
        let docs = docs(&store, 1);
        let err = docs.read(id, |_| ()).await.unwrap_err();
        assert!(
            matches!(err, DocsError::Unloadable { id: i, .. } if i == id),
            "{err}"
        );
    }

    #[tokio::test]
    async fn many_changes_are_compacted_into_one_snapshot() {
        let (_dir, store) = crate::store::temp_store();
        let docs = docs(&store, 1);
        let id = docs.create(DocKind::Generic).await.unwrap();
        for i in 0..COMPACT_AFTER_CHUNKS {
            put(&docs, id, "count", json!(i)).await;
        }
        let compacted = async {
            loop {
                let meta = docs.meta(id).unwrap().unwrap();
                if meta.pending_chunks() < COMPACT_AFTER_CHUNKS {
                    return meta;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        let meta = tokio::time::timeout(Duration::from_secs(10), compacted)
            .await
            .unwrap();
        assert!(meta.snapshot_seq > 0);
        let stored = store.load_doc(id.as_bytes()).unwrap();
        assert!(stored.chunks.len() < COMPACT_AFTER_CHUNKS as usize);
        // Still the same document, loaded fresh.
        let fresh = Docs::new(store.clone(), actor(2), 8).unwrap();
        assert_eq!(
            get(&fresh, id, "count").await,
            Some(json!(COMPACT_AFTER_CHUNKS - 1))
        );
    }

    #[tokio::test]
    async fn whole_documents_travel_to_a_peer_that_has_none() {
        let (_a_dir, a_store) = crate::store::temp_store();
        let (_b_dir, b_store) = crate::store::temp_store();
        let (a, b) = (docs(&a_store, 1), docs(&b_store, 2));
        let x = a.create(DocKind::Generic).await.unwrap();
        put(&a, x, "n", json!("x")).await;
        let y = a.create(DocKind::Generic).await.unwrap();
        let big = a.create(DocKind::Generic).await.unwrap();
        put(&a, big, "n", json!("y".repeat(4000))).await;
        let missing = DocId::from_bytes([9; 16]);
        let (snapshots, other) = a.snapshots(vec![x, y, big, missing], 2000).await.unwrap();
        assert_eq!(
            snapshots.iter().map(|s| s.id).collect::<Vec<_>>(),
            vec![x, y]
        );
        assert_eq!(other, vec![big, missing], "too big, and not here");

        let mut changes = b.subscribe();
        let peer = PeerId::random();
        let applied = b
            .receive_snapshots(
                peer,
                snapshots.iter().map(|s| (s.id, s.bytes.clone())).collect(),
            )
            .await
            .unwrap();
        assert!(applied.rejected.is_none());
        assert!(applied.merged.is_empty());
        assert_eq!(applied.new.len(), 2);
        for s in &snapshots {
            let heads = b.read(s.id, |d| d.heads()).await.unwrap();
            assert_eq!(heads, s.heads, "exactly the sender's heads");
            assert_eq!(changes.try_recv().unwrap().origin, Origin::Peer(peer));
        }
        assert_eq!(get(&b, x, "n").await, Some(json!("x")));
        // `y` is one compact chunk on A: stored as received. `x` arrived as A's two chunks
        // (created, then changed): stored compact, so a load here does not replay the change.
        assert!(Document::is_compact(&snapshots[1].bytes));
        assert_eq!(
            b_store.load_doc(y.as_bytes()).unwrap().chunks.concat(),
            snapshots[1].bytes,
            "stored as received"
        );
        assert!(!Document::is_compact(&snapshots[0].bytes));
        let stored = b_store.load_doc(x.as_bytes()).unwrap().chunks;
        assert_eq!(stored.len(), 1);
        assert!(Document::is_compact(&stored[0]), "stored compact");
        let fresh = Docs::new(b_store.clone(), actor(3), 8).unwrap();
        assert_eq!(get(&fresh, x, "n").await, Some(json!("x")));
        assert_eq!(
            fresh.read(x, |d| d.heads()).await.unwrap(),
            snapshots[0].heads
        );
    }

    #[tokio::test]
    async fn a_snapshot_of_a_document_held_here_is_merged() {
        let (_a_dir, a_store) = crate::store::temp_store();
        let (_b_dir, b_store) = crate::store::temp_store();
        let (a, b) = (docs(&a_store, 1), docs(&b_store, 2));
        let id = a.create(DocKind::Generic).await.unwrap();
        let (snap, _) = a.snapshots(vec![id], usize::MAX).await.unwrap();
        b.receive_snapshots(PeerId::random(), vec![(id, snap[0].bytes.clone())])
            .await
            .unwrap();
        put(&a, id, "from_a", json!(1)).await;
        put(&b, id, "from_b", json!(2)).await;
        let (snap, _) = a.snapshots(vec![id], usize::MAX).await.unwrap();
        let applied = b
            .receive_snapshots(PeerId::random(), vec![(id, snap[0].bytes.clone())])
            .await
            .unwrap();
        assert_eq!(applied.merged, vec![id]);
        assert!(applied.new.is_empty());
        assert_eq!(get(&b, id, "from_a").await, Some(json!(1)));
        assert_eq!(get(&b, id, "from_b").await, Some(json!(2)));
    }

    #[tokio::test]
    async fn a_snapshot_that_does_not_load_stops_the_batch_and_keeps_what_came_before() {
        let (_a_dir, a_store) = crate::store::temp_store();
        let (_b_dir, b_store) = crate::store::temp_store();
        let (a, b) = (docs(&a_store, 1), docs(&b_store, 2));
        let x = a.create(DocKind::Generic).await.unwrap();
        let z = a.create(DocKind::Generic).await.unwrap();
        let (snaps, _) = a.snapshots(vec![x, z], usize::MAX).await.unwrap();
        let bad = DocId::from_bytes([6; 16]);
        let batch = vec![
            (x, snaps[0].bytes.clone()),
            (bad, b"garbage".to_vec()),
            (z, snaps[1].bytes.clone()),
        ];
        let applied = b.receive_snapshots(PeerId::random(), batch).await.unwrap();
        assert_eq!(applied.new.len(), 1);
        assert_eq!(applied.rejected.as_ref().map(|r| r.0), Some(bad));
        assert!(b.meta(x).unwrap().is_some());
        assert!(b.meta(bad).unwrap().is_none());
        assert!(
            b.meta(z).unwrap().is_none(),
            "nothing after it is looked at"
        );
    }

    #[tokio::test]
    async fn an_unstored_placeholder_is_forgotten_and_a_stored_document_is_not() {
        let (_dir, store) = crate::store::temp_store();
        let docs = docs(&store, 1);
        let ghost = DocId::from_bytes([3; 16]);
        docs.modify(ghost, Origin::Local, true, |_| Ok(()))
            .await
            .unwrap();
        assert!(docs.read(ghost, |_| ()).await.is_ok(), "cached, empty");
        assert!(docs.meta(ghost).unwrap().is_none(), "but not stored");
        docs.forget_unstored(ghost).unwrap();
        assert!(matches!(
            docs.read(ghost, |_| ()).await,
            Err(DocsError::NotFound(_))
        ));
        let real = docs.create(DocKind::Generic).await.unwrap();
        docs.forget_unstored(real).unwrap();
        assert!(docs.read(real, |_| ()).await.is_ok());
    }

    /// Free space a test sets.
    #[derive(Clone, Default)]
    struct FakeDisk(std::sync::Arc<std::sync::atomic::AtomicU64>);

    impl crate::store::space::FreeSpace for FakeDisk {
        fn free_bytes(&self, _: &std::path::Path) -> std::io::Result<u64> {
            Ok(self.0.load(std::sync::atomic::Ordering::SeqCst))
        }
    }

    #[tokio::test]
    async fn below_the_reserve_writes_are_refused_before_anything_changes_and_resume_after() {
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().unwrap();
        let disk = FakeDisk::default();
        disk.0.store(1 << 30, Ordering::SeqCst);
        let store = Store::open_with_reserve(
            &dir.path().join("db"),
            8 << 20,
            64 << 20,
            Box::new(disk.clone()),
        )
        .unwrap();
        let docs = Docs::new(store.clone(), actor(1), 8).unwrap();
        let id = docs.create(DocKind::Generic).await.unwrap();
        docs.modify(id, Origin::Local, false, |d| {
            d.put_json("a", json!(1), "one", 1).map_err(DocsError::from)
        })
        .await
        .unwrap();

        disk.0.store(10 << 20, Ordering::SeqCst);
        tokio::time::sleep(crate::store::space::RECHECK).await;
        let err = docs
            .modify(id, Origin::Local, false, |d| {
                d.put_json("a", json!(2), "two", 2).map_err(DocsError::from)
            })
            .await
            .unwrap_err();
        assert!(
            matches!(err, DocsError::Store(StoreError::DiskFull { .. })),
            "{err:?}"
        );
        let api: crate::api::ApiError = err.into();
        assert_eq!(api.code, "disk_full");
        assert!(api.message.contains("reserve"), "{}", api.message);
        // Nothing changed, in memory or on disk.
        let now = docs.read(id, |d| d.get_json("a").unwrap()).await.unwrap();
        assert_eq!(now, Some(json!(1)));
        assert!(
            docs.create(DocKind::Generic).await.is_err(),
            "no new documents"
        );
        let mut blob = store.blob_writer(None).unwrap();
        assert!(
            matches!(
                blob.write(&vec![7; crate::store::CHUNK_SIZE]),
                Err(StoreError::DiskFull { .. })
            ),
            "no blob chunks"
        );

        // Space is freed: writes resume by themselves, and a reopened store has every
        // acknowledged write and nothing else.
        disk.0.store(1 << 30, Ordering::SeqCst);
        docs.modify(id, Origin::Local, false, |d| {
            d.put_json("a", json!(3), "three", 3)
                .map_err(DocsError::from)
        })
        .await
        .unwrap();
        drop(docs);
        let fresh = Docs::new(store.clone(), actor(2), 8).unwrap();
        let stored = fresh.read(id, |d| d.get_json("a").unwrap()).await.unwrap();
        assert_eq!(stored, Some(json!(3)));
    }
}
