//! Durable storage on sled: content-addressed objects, chunked blobs, documents as snapshot plus
//! incremental chunks, and small node state (per-peer sync state, invites, tokens).
//!
//! Every write that is acknowledged to a caller has been flushed first ([`Store::flush`]).
//! Everything read back from disk that carries a content id is verified against it.

mod blobs;
mod blobset;
mod docs;
mod group_flush;
mod objects;
mod received;
pub mod space;

use std::path::Path;

pub use blobs::{BlobMeta, BlobWriter, CHUNK_SIZE, ChunkReader};
pub use blobset::BlobTotals;
pub use docs::{ChunkWrite, DocMeta, StoredDoc};
pub use objects::StoredObject;
pub use received::{BlobReceiver, chunk_count};

/// Errors from the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// sled reported an error (I/O, or corruption of its own files).
    #[error("storage error: {0}")]
    Sled(#[from] sled::Error),
    /// Stored bytes no longer match their content id.
    #[error("stored object {id} is corrupt: its bytes do not match its hash")]
    Corrupt {
        /// The content id (hex) whose bytes were wrong.
        id: String,
    },
    /// Bytes offered for a content id do not hash to it.
    #[error("hash mismatch: expected {expected}, got {actual}")]
    HashMismatch {
        /// The id the caller claimed.
        expected: String,
        /// The hash of the bytes actually given.
        actual: String,
    },
    /// A record on disk could not be decoded (or encoded).
    #[error("stored record {what} is unreadable: {source}")]
    Decode {
        /// Which record.
        what: &'static str,
        /// What the CBOR codec said.
        source: serde_cbor::Error,
    },
    /// A received blob's whole content did not match its id, and chunk `index` is the first
    /// that does not match the manifest's hash for it (the sender's fault).
    #[error("blob chunk {index} does not match its hash")]
    BadChunk {
        /// The first chunk that does not match.
        index: u32,
    },
    /// A received chunk whose length is not the one its place in the blob requires.
    #[error("blob chunk {index} is {got} bytes, {want} expected")]
    ChunkLength {
        /// The chunk's index.
        index: u32,
        /// Its length.
        got: usize,
        /// The length its place in the blob requires.
        want: usize,
    },
    /// A blob manifest whose chunk hashes do not fit its length.
    #[error("blob manifest: {hashes} chunk hashes for {len} bytes in chunks of {CHUNK_SIZE}")]
    BadManifest {
        /// Chunk hashes given.
        hashes: usize,
        /// The blob's length.
        len: u64,
    },
    /// A chunk was offered past the end of a blob.
    #[error("blob chunk {index} is past the end of a blob of {count} chunks")]
    ExtraChunk {
        /// The chunk's index.
        index: u32,
        /// Chunks in the blob.
        count: u32,
    },
    /// A received blob was finished before all of its chunks arrived.
    #[error("blob finished after {done} of {count} chunks")]
    Incomplete {
        /// Chunks received.
        done: u32,
        /// Chunks in the blob.
        count: u32,
    },
    /// A blob has more chunks than a manifest can name.
    #[error("blob has too many chunks")]
    TooManyChunks,
    /// The thread writing a received blob's chunks stopped (panicked, or was stopped before).
    #[error("the blob writer thread stopped")]
    WriterStopped,
    /// A blocking task of the store panicked or was cancelled.
    #[error("storage error: {0}")]
    Join(#[from] tokio::task::JoinError),
    /// A blob was asked for that is not (completely) stored.
    #[error("blob {0} is not stored here")]
    NoSuchBlob(String),
    /// A document was asked for that is not stored.
    #[error("document {0} is not stored here")]
    NoSuchDoc(String),
    /// The disk holding the store is below the reserve: the write was refused, and nothing
    /// stored was touched.
    #[error(
        "the disk holding {dir} has {} free, below the reserve of {}: new documents, changes \
         and blobs are refused until space is freed (nothing stored is lost; writes resume by \
         themselves; `[storage] reserve_mb` sets the reserve)",
        human_bytes(*free), human_bytes(*reserve)
    )]
    DiskFull {
        /// The store dir.
        dir: String,
        /// Bytes free.
        free: u64,
        /// The reserve, in bytes.
        reserve: u64,
    },
    /// Flushing the database to disk failed (the write may not be durable).
    #[error("storage flush failed: {0}")]
    FlushFailed(String),
    /// Reading or writing a blob chunk file failed.
    #[error("blob chunk file {path}: {source}")]
    ChunkFile {
        /// The file.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// A key and its value.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// The node's sled database and its trees.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    objects: sled::Tree,
    blobs: sled::Tree,
    /// Chunks of blobs stored by earlier versions, inside sled (read-only fallback).
    blob_chunks: sled::Tree,
    /// Directory of blob chunk files, one file per blob (see [`blobs`]).
    chunk_dir: std::path::PathBuf,
    docs: sled::Tree,
    doc_chunks: sled::Tree,
    state: sled::Tree,
    /// Refuses document and blob writes below the disk reserve.
    space: std::sync::Arc<space::SpaceGuard>,
    /// Concurrent flushes share one (group commit).
    flusher: std::sync::Arc<group_flush::GroupFlush>,
    /// Serialise the writes of one document's metadata (see [`docs::DocLocks`]).
    doc_locks: std::sync::Arc<docs::DocLocks>,
}

/// Bytes as people read them (`1.5 GiB`).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (or creates) the store under `dir`, with no disk reserve.
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<Store, StoreError> {
        Store::open_with_reserve(dir, cache_bytes, 0, Box::new(space::Statvfs))
    }

    /// Opens (or creates) the store under `dir`, refusing document and blob writes while
    /// `free_space` reports less than `reserve` bytes free ([`space::SpaceGuard`]).
    pub fn open_with_reserve(
        dir: &Path,
        cache_bytes: u64,
        reserve: u64,
        free_space: Box<dyn space::FreeSpace>,
    ) -> Result<Store, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .flush_every_ms(Some(500))
            .open()?;
        let chunk_dir = dir.join("chunks");
        std::fs::create_dir_all(&chunk_dir).map_err(|source| StoreError::ChunkFile {
            path: chunk_dir.display().to_string(),
            source,
        })?;
        let store = Store {
            chunk_dir,
            objects: db.open_tree("objects")?,
            blobs: db.open_tree("blobs")?,
            blob_chunks: db.open_tree("blob_chunks")?,
            docs: db.open_tree("docs")?,
            doc_chunks: db.open_tree("doc_chunks")?,
            state: db.open_tree("state")?,
            space: std::sync::Arc::new(space::SpaceGuard::new(dir, reserve, free_space)),
            flusher: group_flush::GroupFlush::new(),
            doc_locks: std::sync::Arc::new(docs::DocLocks::default()),
            db,
        };
        if store.ensure_blob_totals()? {
            tracing::info!(
                blobs = store.blob_count(),
                "counted the stored blobs once (a store from before the blob totals)"
            );
        }
        Ok(store)
    }

    /// `Ok` if `bytes` more of documents or blobs may be written (see [`space::SpaceGuard`]).
    pub fn ensure_space(&self, bytes: u64) -> Result<(), StoreError> {
        self.space.check(bytes)
    }

    /// Counts `bytes` as written, for the reserve's estimate between readings.
    pub(crate) fn wrote(&self, bytes: u64) {
        self.space.wrote(bytes);
    }

    /// The free space of the store's disk and the reserve.
    pub fn space(&self) -> Result<space::SpaceState, StoreError> {
        self.space.state()
    }

    /// Makes every write so far durable. Call before acknowledging a write.
    ///
    /// Concurrent callers share flushes (group commit, `group_flush`): one flush runs at a
    /// time and covers every write made before it started. It is sled's synchronous flush on
    /// the blocking pool: sled 0.34's `flush_async` deadlocks when several flushes overlap
    /// (spacejam/sled#1308; seen in release builds, where every node hung on its first
    /// document write).
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.flusher.flush(&self.db).await
    }

    /// Reads a small state record (`namespace/key`).
    pub fn state_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.state.get(key)?.map(|v| v.to_vec()))
    }

    /// Writes a small state record. Not durable until [`Store::flush`].
    pub fn state_put(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.state.insert(key, value)?;
        Ok(())
    }

    /// Writes several small state records, in order (each on its own: a sled batch takes
    /// sled's global write lock and rolls its I/O buffer, and no caller needs them atomic).
    /// Not durable until [`Store::flush`].
    pub fn state_put_many(&self, records: Vec<KeyValue>) -> Result<(), StoreError> {
        for (k, v) in records {
            self.state.insert(k, v)?;
        }
        Ok(())
    }

    /// Removes a small state record.
    pub fn state_remove(&self, key: &[u8]) -> Result<(), StoreError> {
        self.state.remove(key)?;
        Ok(())
    }

    /// Atomically replaces `key`'s value with `new` if it is currently `old`.
    /// Returns `false` when the current value differed.
    pub fn state_cas(
        &self,
        key: &[u8],
        old: Option<&[u8]>,
        new: Option<Vec<u8>>,
    ) -> Result<bool, StoreError> {
        Ok(self.state.compare_and_swap(key, old, new)?.is_ok())
    }

    /// All state records under a key prefix.
    pub fn state_scan(&self, prefix: &[u8]) -> Result<Vec<KeyValue>, StoreError> {
        self.state
            .scan_prefix(prefix)
            .map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(Into::into))
            .collect()
    }

    /// Bytes used on disk by the database and the stored blobs (their lengths: chunk files of
    /// transfers in progress are not counted).
    pub fn size_on_disk(&self) -> u64 {
        // The blobs' bytes from their totals, not from a walk of their files (which costs a
        // `stat` per blob on every `iom status`).
        let blobs = self.blob_totals().map(|t| t.bytes).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read the blob totals");
            0
        });
        self.db.size_on_disk().unwrap_or(0) + blobs
    }
}

fn decode_err(what: &'static str) -> impl Fn(serde_cbor::Error) -> StoreError {
    move |source| StoreError::Decode { what, source }
}

#[cfg(test)]
pub(crate) fn temp_store() -> (tempfile::TempDir, Store) {
    #[allow(clippy::unwrap_used)]
    let dir = tempfile::tempdir().unwrap();
    #[allow(clippy::unwrap_used)]
    let store = Store::open(&dir.path().join("db"), 8 << 20).unwrap();
    (dir, store)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn state_records_round_trip_and_scan_by_prefix() {
        let (_dir, store) = temp_store();
        store.state_put(b"peer/a", b"1").unwrap();
        store.state_put(b"peer/b", b"2").unwrap();
        store.state_put(b"token/x", b"3").unwrap();
        assert_eq!(store.state_get(b"peer/a").unwrap(), Some(b"1".to_vec()));
        assert_eq!(store.state_get(b"peer/c").unwrap(), None);
        let scanned = store.state_scan(b"peer/").unwrap();
        assert_eq!(
            scanned,
            vec![
                (b"peer/a".to_vec(), b"1".to_vec()),
                (b"peer/b".to_vec(), b"2".to_vec())
            ]
        );
        store.state_remove(b"peer/a").unwrap();
        assert_eq!(store.state_get(b"peer/a").unwrap(), None);
        assert_eq!(store.state_scan(b"peer/").unwrap().len(), 1);
        // Removing what is not there is fine.
        store.state_remove(b"nothing").unwrap();
    }

    #[test]
    fn state_cas_swaps_only_from_the_expected_value() {
        let (_dir, store) = temp_store();
        // Insert where nothing is.
        assert!(store.state_cas(b"k", None, Some(b"v1".to_vec())).unwrap());
        // Not from nothing any more.
        assert!(!store.state_cas(b"k", None, Some(b"v2".to_vec())).unwrap());
        // From the wrong value.
        assert!(
            !store
                .state_cas(b"k", Some(b"v0"), Some(b"v2".to_vec()))
                .unwrap()
        );
        assert_eq!(store.state_get(b"k").unwrap(), Some(b"v1".to_vec()));
        assert!(
            store
                .state_cas(b"k", Some(b"v1"), Some(b"v2".to_vec()))
                .unwrap()
        );
        // To nothing: removes.
        assert!(store.state_cas(b"k", Some(b"v2"), None).unwrap());
        assert_eq!(store.state_get(b"k").unwrap(), None);
    }

    #[tokio::test]
    async fn flushed_writes_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let (object, blob) = {
            let store = Store::open(&path, 1 << 20).unwrap();
            let object = store.put_object(b"certificate bytes").unwrap();
            store
                .append_doc_chunk(&[4; 16], "memory", b"snapshot", vec![[9; 32]])
                .unwrap();
            store.state_put(b"ps/peer", b"state").unwrap();
            let mut w = store.blob_writer(None).unwrap();
            w.write(&vec![5u8; CHUNK_SIZE + 1]).unwrap();
            let (blob, _) = w.finish().await.unwrap();
            store.flush().await.unwrap();
            (object, blob)
        };
        let store = Store::open(&path, 1 << 20).unwrap();
        assert_eq!(
            store.object(&object).unwrap().unwrap(),
            b"certificate bytes"
        );
        let doc = store.load_doc(&[4; 16]).unwrap();
        assert_eq!(doc.meta.kind, "memory");
        assert_eq!(doc.chunks, vec![b"snapshot".to_vec()]);
        assert_eq!(
            store.state_get(b"ps/peer").unwrap(),
            Some(b"state".to_vec())
        );
        let meta = store.blob_meta(&blob).unwrap().unwrap();
        assert_eq!(meta.len, CHUNK_SIZE as u64 + 1);
        assert_eq!(store.blob_chunk(&blob, &meta, 1).unwrap(), vec![5u8]);
    }

    #[tokio::test]
    async fn size_on_disk_counts_blob_chunk_files() {
        let (_dir, store) = temp_store();
        let before = store.size_on_disk();
        let mut w = store.blob_writer(None).unwrap();
        w.write(&vec![1u8; 2 * CHUNK_SIZE]).unwrap();
        w.finish().await.unwrap();
        assert!(store.size_on_disk() >= before + 2 * CHUNK_SIZE as u64);
    }

    #[test]
    fn a_record_that_does_not_decode_is_named() {
        let (_dir, store) = temp_store();
        store
            .docs
            .insert([1u8; 16], b"\xff\xff".as_slice())
            .unwrap();
        let err = store.doc_meta(&[1; 16]).unwrap_err();
        assert!(matches!(
            err,
            StoreError::Decode {
                what: "doc meta",
                ..
            }
        ));
        assert!(
            err.to_string()
                .starts_with("stored record doc meta is unreadable"),
            "{err}"
        );
        assert!(store.doc_metas().is_err(), "listing reports it too");
    }
}
