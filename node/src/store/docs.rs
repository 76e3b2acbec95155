//! Documents: each Automerge document is stored as one snapshot plus the incremental chunks
//! written after it. Appending a change writes one chunk; compaction replaces the snapshot and
//! the chunks it covers in one transaction, so a crash at any point leaves a loadable document.

use serde::{Deserialize, Serialize};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};

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

type TxResult<T> = Result<T, ConflictableTransactionError<StoreError>>;

/// One append inside a transaction over the `docs` and `doc_chunks` trees.
fn append_in(
    docs: &TransactionalTree,
    chunks: &TransactionalTree,
    w: &ChunkWrite<'_>,
    now: u64,
) -> TxResult<DocMeta> {
    let id = &w.id;
    let meta = match docs.get(id)? {
        Some(b) => {
            let mut meta: DocMeta = serde_cbor::from_slice(&b)
                .map_err(|e| ConflictableTransactionError::Abort(decode_err("doc meta")(e)))?;
            chunks.insert(&chunk_key(id, meta.next_seq)[..], w.bytes)?;
            meta.next_seq += 1;
            meta.heads.clone_from(&w.heads);
            meta.updated_at = now;
            meta
        }
        None => {
            chunks.insert(&chunk_key(id, 0)[..], w.bytes)?;
            DocMeta {
                kind: w.kind.to_string(),
                snapshot_seq: 0,
                next_seq: 1,
                heads: w.heads.clone(),
                created_at: now,
                updated_at: now,
            }
        }
    };
    let encoded = encode_meta(&meta).map_err(ConflictableTransactionError::Abort)?;
    docs.insert(&id[..], encoded)?;
    Ok(meta)
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
        let mut out = Vec::with_capacity(self.docs.len());
        for entry in self.docs.iter() {
            let (k, v) = entry?;
            let Ok(id) = <[u8; 16]>::try_from(k.as_ref()) else {
                continue;
            };
            out.push((
                id,
                serde_cbor::from_slice(&v).map_err(decode_err("doc meta"))?,
            ));
        }
        Ok(out)
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
        let write = ChunkWrite {
            id: *id,
            kind,
            bytes,
            heads,
        };
        let now = crate::time::now_secs();
        (&self.docs, &self.doc_chunks)
            .transaction(|(docs, chunks)| append_in(docs, chunks, &write, now))
            .map_err(tx_err)
    }

    /// [`Store::append_doc_chunk`] for many documents in one transaction (one sled write
    /// lock, not one per document). Returns each document's new metadata, in order.
    pub fn append_doc_chunks(&self, writes: &[ChunkWrite<'_>]) -> Result<Vec<DocMeta>, StoreError> {
        let now = crate::time::now_secs();
        (&self.docs, &self.doc_chunks)
            .transaction(|(docs, chunks)| {
                writes
                    .iter()
                    .map(|w| append_in(docs, chunks, w, now))
                    .collect()
            })
            .map_err(tx_err)
    }

    /// Reads a document's snapshot and chunks.
    pub fn load_doc(&self, id: &[u8; 16]) -> Result<StoredDoc, StoreError> {
        let meta = self
            .doc_meta(id)?
            .ok_or_else(|| StoreError::NoSuchDoc(hex::encode(id)))?;
        let mut chunks = Vec::with_capacity((meta.next_seq - meta.snapshot_seq) as usize);
        for entry in self
            .doc_chunks
            .range(chunk_key(id, meta.snapshot_seq)..chunk_key(id, meta.next_seq))
        {
            chunks.push(entry?.1.to_vec());
        }
        Ok(StoredDoc { meta, chunks })
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
    use crate::store::temp_store;

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
}
