//! Documents: each Automerge document is stored as one snapshot plus the incremental chunks
//! written after it. Appending a change writes one chunk; compaction replaces the snapshot and
//! the chunks it covers in one transaction, so a crash at any point leaves a loadable document.
//!
//! One document's append is two plain inserts, its chunk then its metadata, not a
//! transaction (a batch of documents received together too): sled 0.34 rolls its I/O buffer
//! before and after every transaction's batch manifest, so under concurrent writers a
//! transaction per write cost two thirds of the durable write rate (`bench-store writes`:
//! 2,775 writes/s against 8,212 with plain inserts, 8 writers). The order keeps a crash
//! harmless: sled recovers a prefix of its log, so the metadata is never there without its
//! chunk, and a chunk without its metadata lies past `next_seq` (never read) until the next
//! append writes over it. Every write of a document's metadata holds that document's
//! [`DocLocks`] stripe, so two writers of one document never interleave (a transaction of
//! sled does not isolate it from plain inserts).

use serde::{Deserialize, Serialize};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use super::{Store, StoreError, decode_err};

/// What the store keeps about a document besides its bytes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DocMeta {
    /// Document kind name (`conversation`, `memory`, ...).
    pub kind: String,
    /// Sequence number of the snapshot chunk.
    pub snapshot_seq: u64,
    /// Sequence number the next chunk will get.
    pub next_seq: u64,
    /// Current heads (32-byte change hashes).
    pub heads: Vec<[u8; 32]>,
    /// Unix seconds of creation on this node.
    pub created_at: u64,
    /// Unix seconds of the last write on this node.
    pub updated_at: u64,
}

impl DocMeta {
    /// How many incremental chunks sit on top of the snapshot.
    pub fn pending_chunks(&self) -> u64 {
        self.next_seq.saturating_sub(self.snapshot_seq + 1)
    }
}

/// One chunk to append with [`Store::append_doc_chunks`].
#[derive(Debug, Clone)]
pub struct ChunkWrite<'a> {
    /// The document.
    pub id: [u8; 16],
    /// Its kind name (recorded when the document is new here).
    pub kind: &'a str,
    /// A full save for a new document, an incremental save otherwise.
    pub bytes: &'a [u8],
    /// The document's heads after this chunk.
    pub heads: Vec<[u8; 32]>,
}

/// A document's stored bytes: the snapshot first, then the incremental chunks in order.
#[derive(Debug, Clone)]
pub struct StoredDoc {
    /// The metadata at read time.
    pub meta: DocMeta,
    /// Snapshot then increments.
    pub chunks: Vec<Vec<u8>>,
}

fn chunk_key(id: &[u8; 16], seq: u64) -> [u8; 24] {
    let mut key = [0u8; 24];
    key[..16].copy_from_slice(id);
    key[16..].copy_from_slice(&seq.to_be_bytes());
    key
}

fn tx_err(e: TransactionError<StoreError>) -> StoreError {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => StoreError::Sled(e),
    }
}

fn encode_meta(meta: &DocMeta) -> Result<Vec<u8>, StoreError> {
    serde_cbor::to_vec(meta).map_err(decode_err("doc meta"))
}

/// Stripes of locks over document ids: whoever writes a document's metadata holds its stripe
/// (several stripes are taken in ascending order, so writers never wait on each other in a
/// cycle). Taken after a document's in-memory lock, never before.
#[derive(Debug)]
pub(crate) struct DocLocks([std::sync::Mutex<()>; 64]);

impl Default for DocLocks {
    fn default() -> DocLocks {
        DocLocks(std::array::from_fn(|_| std::sync::Mutex::new(())))
    }
}

impl DocLocks {
    fn stripe(id: &[u8; 16]) -> usize {
        usize::from(id[0]) % 64
    }

    /// Holds `id`'s stripe.
    fn one(&self, id: &[u8; 16]) -> std::sync::MutexGuard<'_, ()> {
        lock(&self.0[DocLocks::stripe(id)])
    }

    /// Holds the stripes of every id in `ids`, each once, in ascending order.
    fn many<'a>(
        &self,
        ids: impl Iterator<Item = &'a [u8; 16]>,
    ) -> Vec<std::sync::MutexGuard<'_, ()>> {
        let mut stripes: Vec<usize> = ids.map(DocLocks::stripe).collect();
        stripes.sort_unstable();
        stripes.dedup();
        stripes.into_iter().map(|i| lock(&self.0[i])).collect()
    }
}

fn lock(m: &std::sync::Mutex<()>) -> std::sync::MutexGuard<'_, ()> {
    // Guards no data: a panic elsewhere leaves nothing half-done behind it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A document's metadata after one more chunk is appended (`before`: what it was, if the
/// document is stored). The new chunk's sequence number is the result's `next_seq - 1`.
fn appended(before: Option<DocMeta>, kind: &str, heads: Vec<[u8; 32]>, now: u64) -> DocMeta {
    match before {
        Some(mut meta) => {
            meta.next_seq += 1;
            meta.heads = heads;
            meta.updated_at = now;
            meta
        }
        None => DocMeta {
            kind: kind.to_string(),
            snapshot_seq: 0,
            next_seq: 1,
            heads,
            created_at: now,
            updated_at: now,
        },
    }
}

impl Store {
    /// Metadata of one document.
    pub fn doc_meta(&self, id: &[u8; 16]) -> Result<Option<DocMeta>, StoreError> {
        self.docs
            .get(id)?
            .map(|b| serde_cbor::from_slice(&b).map_err(decode_err("doc meta")))
            .transpose()
    }

    /// Metadata of every document.
    pub fn doc_metas(&self) -> Result<Vec<([u8; 16], DocMeta)>, StoreError> {
        let mut out = Vec::new();
        self.for_each_doc_meta(|id, meta| out.push((id, meta)))?;
        Ok(out)
    }

    /// Calls `f` with the metadata of every document, one at a time: nothing holds all of
    /// them at once (start-up reads 100,000 of them into the inventory this way).
    pub fn for_each_doc_meta(
        &self,
        mut f: impl FnMut([u8; 16], DocMeta),
    ) -> Result<(), StoreError> {
        for entry in self.docs.iter() {
            let (k, v) = entry?;
            let Ok(id) = <[u8; 16]>::try_from(k.as_ref()) else {
                continue;
            };
            f(
                id,
                serde_cbor::from_slice(&v).map_err(decode_err("doc meta"))?,
            );
        }
        Ok(())
    }

    /// Number of stored documents.
    pub fn doc_count(&self) -> usize {
        self.docs.len()
    }

    /// Appends a chunk (a full save for a new document, an incremental save otherwise) and
    /// records the new heads. Not durable until [`Store::flush`].
    pub fn append_doc_chunk(
        &self,
        id: &[u8; 16],
        kind: &str,
        bytes: &[u8],
        heads: Vec<[u8; 32]>,
    ) -> Result<DocMeta, StoreError> {
        self.ensure_space(bytes.len() as u64)?;
        let _stripe = self.doc_locks.one(id);
        let meta = self.append_locked(id, kind, bytes, heads, crate::time::now_secs())?;
        self.wrote(bytes.len() as u64);
        Ok(meta)
    }

    /// [`Store::append_doc_chunk`] for many documents, in order, under one check of the disk
    /// reserve. Plain inserts, not one transaction: a sled batch or transaction takes sled's
    /// global write lock and rolls its I/O buffer, which made a one-document batch of a live
    /// change cost 0.3 ms, and nothing here needs the batch to be atomic (each document's
    /// append is safe alone, see the module's doc). Returns each document's new metadata.
    pub fn append_doc_chunks(&self, writes: &[ChunkWrite<'_>]) -> Result<Vec<DocMeta>, StoreError> {
        let bytes: u64 = writes.iter().map(|w| w.bytes.len() as u64).sum();
        self.ensure_space(bytes)?;
        let now = crate::time::now_secs();
        let _stripes = self.doc_locks.many(writes.iter().map(|w| &w.id));
        let metas = writes
            .iter()
            .map(|w| self.append_locked(&w.id, w.kind, w.bytes, w.heads.clone(), now))
            .collect::<Result<Vec<_>, _>>()?;
        self.wrote(bytes);
        Ok(metas)
    }

    /// One append: the chunk, then the metadata (see the module's doc). The caller holds
    /// `id`'s stripe.
    fn append_locked(
        &self,
        id: &[u8; 16],
        kind: &str,
        bytes: &[u8],
        heads: Vec<[u8; 32]>,
        now: u64,
    ) -> Result<DocMeta, StoreError> {
        let meta = appended(self.doc_meta(id)?, kind, heads, now);
        let encoded = encode_meta(&meta)?;
        self.doc_chunks
            .insert(&chunk_key(id, meta.next_seq - 1)[..], bytes)?;
        self.docs.insert(&id[..], encoded)?;
        Ok(meta)
    }

    /// Reads a document's snapshot and chunks.
    pub fn load_doc(&self, id: &[u8; 16]) -> Result<StoredDoc, StoreError> {
        let meta = self
            .doc_meta(id)?
            .ok_or_else(|| StoreError::NoSuchDoc(hex::encode(id)))?;
        // One lookup per chunk: a compact document is one `get`, where a range scan paid for an
        // iterator (sled clones a node per step: 28% of a catch-up's loads). A chunk a
        // compaction removed meanwhile is skipped, as the scan skipped it: the compaction's
        // snapshot, at the last chunk's place, holds it.
        let mut chunks = Vec::with_capacity((meta.next_seq - meta.snapshot_seq) as usize);
        for seq in meta.snapshot_seq..meta.next_seq {
            if let Some(chunk) = self.doc_chunks.get(chunk_key(id, seq))? {
                chunks.push(chunk.to_vec());
            }
        }
        Ok(StoredDoc { meta, chunks })
    }

    /// Reads a document's snapshot and chunks as one consistent state while the node runs: a
    /// compaction between reading the metadata and the chunks is detected (the snapshot moved,
    /// or a chunk is missing) and the read is repeated. Chunks appended meanwhile are left out,
    /// which is the document as of the metadata read.
    pub fn load_doc_consistent(&self, id: &[u8; 16]) -> Result<StoredDoc, StoreError> {
        let mut last = None;
        for _ in 0..16 {
            let doc = self.load_doc(id)?;
            let expected = (doc.meta.next_seq - doc.meta.snapshot_seq) as usize;
            let now = self.doc_meta(id)?;
            if doc.chunks.len() == expected
                && now
                    .as_ref()
                    .is_some_and(|m| m.snapshot_seq == doc.meta.snapshot_seq)
            {
                return Ok(doc);
            }
            last = Some(doc);
        }
        last.ok_or_else(|| StoreError::NoSuchDoc(hex::encode(id)))
    }

    /// Stores a document read from a backup as it was: its chunks (snapshot first) under fresh
    /// sequence numbers, with its heads and times. Replaces nothing: the document must be new.
    pub fn import_doc(
        &self,
        id: &[u8; 16],
        meta: &DocMeta,
        chunks: &[Vec<u8>],
    ) -> Result<(), StoreError> {
        let meta = DocMeta {
            snapshot_seq: 0,
            next_seq: chunks.len() as u64,
            ..meta.clone()
        };
        let encoded = encode_meta(&meta)?;
        let _stripe = self.doc_locks.one(id);
        (&self.docs, &self.doc_chunks)
            .transaction(|(docs, tree)| {
                for (seq, c) in chunks.iter().enumerate() {
                    tree.insert(&chunk_key(id, seq as u64)[..], c.as_slice())?;
                }
                docs.insert(&id[..], encoded.as_slice())?;
                Ok(())
            })
            .map_err(tx_err)
    }

    /// Replaces the snapshot and every chunk up to `covered_seq` (exclusive) with `snapshot`,
    /// which must contain all of them. Chunks written meanwhile stay.
    pub fn compact_doc(
        &self,
        id: &[u8; 16],
        snapshot: &[u8],
        covered_seq: u64,
    ) -> Result<(), StoreError> {
        let Some(old) = self.doc_meta(id)? else {
            return Ok(());
        };
        if covered_seq <= old.snapshot_seq + 1 || covered_seq > old.next_seq {
            return Ok(());
        }
        let new_snapshot_seq = covered_seq - 1;
        let _stripe = self.doc_locks.one(id);
        (&self.docs, &self.doc_chunks)
            .transaction(|(docs, chunks)| {
                let Some(b) = docs.get(id)? else {
                    return Ok(());
                };
                let mut meta: DocMeta = serde_cbor::from_slice(&b)
                    .map_err(|e| ConflictableTransactionError::Abort(decode_err("doc meta")(e)))?;
                if meta.snapshot_seq != old.snapshot_seq {
                    return Ok(()); // someone else compacted
                }
                for seq in meta.snapshot_seq..new_snapshot_seq {
                    chunks.remove(&chunk_key(id, seq)[..])?;
                }
                chunks.insert(&chunk_key(id, new_snapshot_seq)[..], snapshot)?;
                meta.snapshot_seq = new_snapshot_seq;
                let encoded = encode_meta(&meta).map_err(ConflictableTransactionError::Abort)?;
                docs.insert(&id[..], encoded)?;
                Ok(())
            })
            .map_err(tx_err)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::store::{StoreError, temp_store};

    #[test]
    fn a_chunk_left_without_its_metadata_is_never_read_and_the_next_append_replaces_it() {
        let (_dir, store) = temp_store();
        let id = [4u8; 16];
        store
            .append_doc_chunk(&id, "generic", b"snap", vec![[1; 32]])
            .unwrap();
        // A crash between the two inserts of an append: the chunk is there, its metadata not.
        store
            .doc_chunks
            .insert(&chunk_key(&id, 1)[..], &b"lost"[..])
            .unwrap();
        assert_eq!(store.load_doc(&id).unwrap().chunks, vec![b"snap".to_vec()]);
        store
            .append_doc_chunk(&id, "generic", b"next", vec![[2; 32]])
            .unwrap();
        let doc = store.load_doc(&id).unwrap();
        assert_eq!(doc.chunks, vec![b"snap".to_vec(), b"next".to_vec()]);
        assert_eq!(doc.meta.next_seq, 2);
        assert_eq!(doc.meta.heads, vec![[2; 32]]);
    }

    #[test]
    fn concurrent_appends_and_compactions_of_one_document_lose_no_chunk() {
        let (_dir, store) = temp_store();
        let id = [5u8; 16];
        store
            .append_doc_chunk(&id, "generic", b"s", vec![[0; 32]])
            .unwrap();
        let writers: Vec<_> = (0..4u8)
            .map(|w| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for i in 0..50u8 {
                        store
                            .append_doc_chunk(&id, "generic", &[0xff, w, i, 0xfe], vec![[w; 32]])
                            .unwrap();
                    }
                })
            })
            .collect();
        // Compactions meanwhile, each covering whatever is there when it starts.
        let compactor = {
            let store = store.clone();
            std::thread::spawn(move || {
                for _ in 0..20 {
                    let doc = store.load_doc(&id).unwrap();
                    let joined: Vec<u8> = doc.chunks.concat();
                    store.compact_doc(&id, &joined, doc.meta.next_seq).unwrap();
                }
            })
        };
        for w in writers {
            w.join().unwrap();
        }
        compactor.join().unwrap();
        let doc = store.load_doc(&id).unwrap();
        let meta = store.doc_meta(&id).unwrap().unwrap();
        assert_eq!(meta.next_seq - meta.snapshot_seq, doc.chunks.len() as u64);
        // Every write is in the document exactly once: in the snapshot (compacted) or after.
        let all: Vec<u8> = doc.chunks.concat();
        for w in 0..4u8 {
            for i in 0..50u8 {
                let n = all.windows(4).filter(|p| *p == [0xff, w, i, 0xfe]).count();
                assert_eq!(n, 1, "write {w}/{i}");
            }
        }
    }

    #[test]
    fn append_load_compact() {
        let (_dir, store) = temp_store();
        let id = [1u8; 16];
        store
            .append_doc_chunk(&id, "generic", b"snap", vec![[1; 32]])
            .unwrap();
        store
            .append_doc_chunk(&id, "generic", b"c1", vec![[2; 32]])
            .unwrap();
        store
            .append_doc_chunk(&id, "generic", b"c2", vec![[3; 32]])
            .unwrap();
        let doc = store.load_doc(&id).unwrap();
        assert_eq!(
            doc.chunks,
            vec![b"snap".to_vec(), b"c1".to_vec(), b"c2".to_vec()]
        );
        assert_eq!(doc.meta.heads, vec![[3; 32]]);
        // compact snapshot + c1 (seq 0..2), then a chunk arrives, c2 survives
        store.compact_doc(&id, b"snap+c1", 2).unwrap();
        store
            .append_doc_chunk(&id, "generic", b"c3", vec![[4; 32]])
            .unwrap();
        let doc = store.load_doc(&id).unwrap();
        assert_eq!(
            doc.chunks,
            vec![b"snap+c1".to_vec(), b"c2".to_vec(), b"c3".to_vec()]
        );
        assert_eq!(store.doc_chunks.len(), 3);
    }

    #[test]
    fn many_documents_are_appended_in_order() {
        let (_dir, store) = temp_store();
        store
            .append_doc_chunk(&[1; 16], "memory", b"s1", vec![[1; 32]])
            .unwrap();
        let writes = [
            ChunkWrite {
                id: [1; 16],
                kind: "ignored for a known document",
                bytes: b"c1",
                heads: vec![[2; 32]],
            },
            ChunkWrite {
                id: [2; 16],
                kind: "conversation",
                bytes: b"s2",
                heads: vec![[3; 32], [4; 32]],
            },
        ];
        let metas = store.append_doc_chunks(&writes).unwrap();
        assert_eq!(metas.len(), 2);
        assert_eq!(metas[0].kind, "memory", "the kind is recorded once");
        assert_eq!((metas[0].snapshot_seq, metas[0].next_seq), (0, 2));
        assert_eq!(metas[0].pending_chunks(), 1);
        assert_eq!(metas[1].kind, "conversation");
        assert_eq!(metas[1].heads, vec![[3; 32], [4; 32]]);
        assert_eq!(metas[1].pending_chunks(), 0);
        assert_eq!(store.doc_count(), 2);
        let mut all = store.doc_metas().unwrap();
        all.sort_by_key(|(id, _)| *id);
        assert_eq!(all[0], ([1; 16], metas[0].clone()));
        assert_eq!(all[1], ([2; 16], metas[1].clone()));
        assert_eq!(
            store.load_doc(&[1; 16]).unwrap().chunks,
            vec![b"s1".to_vec(), b"c1".to_vec()]
        );
    }

    #[test]
    fn a_missing_document_is_named() {
        let (_dir, store) = temp_store();
        let err = store.load_doc(&[0xab; 16]).unwrap_err();
        assert!(matches!(&err, StoreError::NoSuchDoc(id) if id == &"ab".repeat(16)));
        assert_eq!(store.doc_meta(&[0xab; 16]).unwrap(), None);
    }

    #[test]
    fn compaction_outside_the_chunks_is_a_no_op() {
        let (_dir, store) = temp_store();
        let id = [3u8; 16];
        for (i, b) in [b"s", b"a", b"b"].iter().enumerate() {
            store
                .append_doc_chunk(&id, "generic", *b, vec![[i as u8; 32]])
                .unwrap();
        }
        // Covers only the snapshot itself, or more than was written: nothing happens.
        store.compact_doc(&id, b"X", 1).unwrap();
        store.compact_doc(&id, b"X", 4).unwrap();
        // An unknown document: nothing happens either.
        store.compact_doc(&[4; 16], b"X", 2).unwrap();
        assert_eq!(
            store.load_doc(&id).unwrap().chunks,
            vec![b"s".to_vec(), b"a".to_vec(), b"b".to_vec()]
        );
        // Covering everything leaves just the new snapshot.
        store.compact_doc(&id, b"sab", 3).unwrap();
        let doc = store.load_doc(&id).unwrap();
        assert_eq!(doc.chunks, vec![b"sab".to_vec()]);
        assert_eq!(doc.meta.pending_chunks(), 0);
        assert_eq!(store.doc_chunks.len(), 1, "the covered chunks are gone");
    }

    #[test]
    fn a_doc_meta_written_by_earlier_versions_still_decodes() {
        // The stored shape: a CBOR map with these field names (data dirs stay readable).
        use serde_cbor::Value;
        let heads = Value::Array(vec![Value::Array(vec![Value::Integer(7); 32])]);
        let record = Value::Map(
            [
                ("kind", Value::Text("memory".into())),
                ("snapshot_seq", Value::Integer(2)),
                ("next_seq", Value::Integer(5)),
                ("heads", heads),
                ("created_at", Value::Integer(100)),
                ("updated_at", Value::Integer(200)),
            ]
            .into_iter()
            .map(|(k, v)| (Value::Text(k.into()), v))
            .collect(),
        );
        let bytes = serde_cbor::to_vec(&record).unwrap();
        let meta: DocMeta = serde_cbor::from_slice(&bytes).unwrap();
        assert_eq!(meta.heads, vec![[7; 32]]);
        assert_eq!(meta.pending_chunks(), 2);
        // And it is written back in the same shape.
        let again: Value = serde_cbor::from_slice(&encode_meta(&meta).unwrap()).unwrap();
        assert_eq!(again, record);
    }
}
