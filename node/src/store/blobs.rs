//! Blobs: immutable byte strings addressed by the SHA-256 of their bytes, stored in fixed-size
//! chunks so that no blob is ever held whole in memory.
//!
//! Chunks live under an internal number, not under the blob's hash, because a local add only
//! learns the hash at the end. A blob becomes visible when its [`BlobMeta`] (length and the hash
//! of every chunk) is written, after the whole-content hash was checked.
//!
//! The bytes live in plain files, one per blob (`db/chunks/<internal as 16 hex digits>`), chunk
//! `i` at offset `i × CHUNK_SIZE`; only the metadata is in sled. sled keeps recently written
//! values in memory well past its cache limit, so a 100 MiB blob in sled cost 100 MiB of RSS;
//! files keep memory flat for any blob size. Every chunk is checked when read, so a torn or
//! damaged file is detected, never served: against a CRC-32 of the chunk recorded when it was
//! stored (SHA-256 is for what comes from outside: a peer's chunk, a local add; re-hashing
//! every chunk served with it was a third of the SHA-256 work of a transfer), or against its
//! SHA-256 for blobs stored by earlier versions, which have no CRCs. The file is fsynced
//! before the blob's metadata is written.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{Store, StoreError, decode_err};

/// Size of one stored (and transferred) blob chunk.
pub const CHUNK_SIZE: usize = 256 * 1024;

/// What the store knows about a complete blob.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BlobMeta {
    /// Internal chunk-key namespace.
    pub internal: u64,
    /// Total length in bytes.
    pub len: u64,
    /// SHA-256 of each chunk, in order.
    pub chunk_hashes: Vec<[u8; 32]>,
    /// Unix seconds when stored.
    pub stored_at: u64,
    /// CRC-32 of each chunk, in order, to check reads cheaply; empty for blobs stored by
    /// earlier versions (their reads are checked against `chunk_hashes`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chunk_crcs: Vec<u32>,
}

impl BlobMeta {
    /// Whether `bytes`, read back as chunk `index`, are what was stored.
    fn chunk_intact(&self, index: usize, bytes: &[u8]) -> bool {
        if self.chunk_crcs.len() == self.chunk_hashes.len() {
            return self.chunk_crcs.get(index) == Some(&crc32fast::hash(bytes));
        }
        self.chunk_hashes
            .get(index)
            .is_some_and(|h| *h == <[u8; 32]>::from(Sha256::digest(bytes)))
    }
}

/// Reads a stored blob's chunks (see [`Store::chunk_reader`]). Blocking.
#[derive(Debug)]
pub struct ChunkReader {
    store: Store,
    file: Option<File>,
    id: [u8; 32],
    meta: std::sync::Arc<BlobMeta>,
}

impl ChunkReader {
    /// Reads chunk `index` into `buf` (replacing what it held) and checks it against what was
    /// stored.
    pub fn read(&self, index: u32, buf: &mut Vec<u8>) -> Result<(), StoreError> {
        self.store
            .read_blob_chunk(self.file.as_ref(), &self.id, &self.meta, index, buf)
    }
}

/// The SHA-256 and the CRC-32 of each stored chunk, gathered while a blob is written.
#[derive(Debug, Default)]
pub(super) struct ChunkSums {
    pub(super) hashes: Vec<[u8; 32]>,
    pub(super) crcs: Vec<u32>,
}

impl ChunkSums {
    /// Records a chunk whose SHA-256 is known.
    pub(super) fn push(&mut self, hash: [u8; 32], bytes: &[u8]) {
        self.record(hash, crc32fast::hash(bytes));
    }

    /// Records a chunk whose SHA-256 and CRC-32 are known.
    pub(super) fn record(&mut self, hash: [u8; 32], crc: u32) {
        self.hashes.push(hash);
        self.crcs.push(crc);
    }

    /// Chunks recorded.
    pub(super) fn len(&self) -> usize {
        self.hashes.len()
    }
}

fn chunk_key(internal: u64, index: u32) -> [u8; 12] {
    let mut key = [0u8; 12];
    key[..8].copy_from_slice(&internal.to_be_bytes());
    key[8..].copy_from_slice(&index.to_be_bytes());
    key
}

pub(super) fn file_err(path: &std::path::Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::ChunkFile {
        path: path.display().to_string(),
        source,
    }
}

/// Byte offset of chunk `index`.
pub(super) fn chunk_offset(index: u32) -> u64 {
    u64::from(index) * CHUNK_SIZE as u64
}

/// Length of chunk `index` of a blob of `len` bytes.
pub(super) fn chunk_len(len: u64, index: u32) -> usize {
    len.saturating_sub(chunk_offset(index))
        .min(CHUNK_SIZE as u64) as usize
}

/// Incremental writer for one blob. Feed bytes with [`BlobWriter::write`], then
/// [`BlobWriter::finish`]. Dropping it without finishing leaves garbage chunks that
/// [`Store::collect_blob_garbage`] removes.
pub struct BlobWriter {
    store: Store,
    internal: u64,
    file: Option<File>,
    buf: Vec<u8>,
    sums: ChunkSums,
    whole: Sha256,
    len: u64,
    expected: Option<[u8; 32]>,
}

impl std::fmt::Debug for BlobWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobWriter")
            .field("internal", &self.internal)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl BlobWriter {
    /// Appends bytes; full chunks go to disk at once.
    pub fn write(&mut self, mut bytes: &[u8]) -> Result<(), StoreError> {
        while !bytes.is_empty() {
            let room = CHUNK_SIZE - self.buf.len();
            let take = room.min(bytes.len());
            self.buf.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.buf.len() == CHUNK_SIZE {
                self.flush_chunk()?;
            }
        }
        Ok(())
    }

    /// Appends one whole chunk whose hash the caller already verified.
    pub fn write_chunk(&mut self, chunk: &[u8]) -> Result<(), StoreError> {
        if !self.buf.is_empty() {
            return self.write(chunk);
        }
        self.buf.extend_from_slice(chunk);
        self.flush_chunk()
    }

    fn flush_chunk(&mut self) -> Result<(), StoreError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.store.ensure_space(self.buf.len() as u64)?;
        self.store.wrote(self.buf.len() as u64);
        let index = u32::try_from(self.sums.len()).map_err(|_| StoreError::TooManyChunks)?;
        self.whole.update(&self.buf);
        self.len += self.buf.len() as u64;
        self.sums.push(Sha256::digest(&self.buf).into(), &self.buf);
        let path = self.store.chunk_path(self.internal);
        let file = match self.file.take() {
            Some(f) => f,
            None => File::create(&path).map_err(file_err(&path))?,
        };
        file.write_all_at(&self.buf, chunk_offset(index))
            .map_err(file_err(&path))?;
        self.file = Some(file);
        self.buf.clear();
        Ok(())
    }

    /// Bytes accepted so far.
    pub fn len(&self) -> u64 {
        self.len + self.buf.len() as u64
    }

    /// Whether nothing was written yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks the whole-content hash, publishes the blob and makes it durable.
    pub async fn finish(mut self) -> Result<([u8; 32], BlobMeta), StoreError> {
        self.flush_chunk()?;
        let id: [u8; 32] = self.whole.clone().finalize().into();
        if let Some(expected) = self.expected
            && expected != id
        {
            self.store.remove_chunks(self.internal, self.sums.len())?;
            return Err(StoreError::HashMismatch {
                expected: hex::encode(expected),
                actual: hex::encode(id),
            });
        }
        if let Some(existing) = self.store.blob_meta(&id)? {
            self.store.remove_chunks(self.internal, self.sums.len())?;
            return Ok((id, existing));
        }
        if let Some(file) = self.file.take() {
            let path = self.store.chunk_path(self.internal);
            tokio::task::spawn_blocking(move || file.sync_all().map_err(file_err(&path))).await??;
        }
        let meta =
            self.store
                .publish_blob(id, self.internal, self.len, std::mem::take(&mut self.sums))?;
        self.store.flush().await?;
        Ok((id, meta))
    }
}

impl Store {
    /// Makes a blob visible: records its metadata (its chunk file is already synced). Durable
    /// after the next [`Store::flush`].
    pub(super) fn publish_blob(
        &self,
        id: [u8; 32],
        internal: u64,
        len: u64,
        sums: ChunkSums,
    ) -> Result<BlobMeta, StoreError> {
        let meta = BlobMeta {
            internal,
            len,
            chunk_hashes: sums.hashes,
            stored_at: crate::time::now_secs(),
            chunk_crcs: sums.crcs,
        };
        let bytes = serde_cbor::to_vec(&meta).map_err(decode_err("blob meta"))?;
        self.insert_blob_record(id, len, &bytes)?;
        Ok(meta)
    }

    /// Starts writing a new blob. With `expected`, [`BlobWriter::finish`] refuses other content.
    pub fn blob_writer(&self, expected: Option<[u8; 32]>) -> Result<BlobWriter, StoreError> {
        Ok(BlobWriter {
            store: self.clone(),
            internal: self.db.generate_id()?,
            file: None,
            buf: Vec::with_capacity(CHUNK_SIZE),
            sums: ChunkSums::default(),
            whole: Sha256::new(),
            len: 0,
            expected,
        })
    }

    /// Metadata of a complete blob.
    pub fn blob_meta(&self, id: &[u8; 32]) -> Result<Option<BlobMeta>, StoreError> {
        self.blobs
            .get(id)?
            .map(|b| serde_cbor::from_slice(&b).map_err(decode_err("blob meta")))
            .transpose()
    }

    /// Reads chunk `index` of a blob and checks it against what was stored (see the module's
    /// doc).
    pub fn blob_chunk(
        &self,
        id: &[u8; 32],
        meta: &BlobMeta,
        index: u32,
    ) -> Result<Vec<u8>, StoreError> {
        let mut buf = Vec::new();
        self.read_blob_chunk(
            self.open_chunks(meta.internal)?.as_ref(),
            id,
            meta,
            index,
            &mut buf,
        )?;
        Ok(buf)
    }

    /// A reader of blob `id`'s chunks in turn, from its chunk file opened once, into buffers
    /// the caller reuses (a transfer reads thousands of chunks).
    pub fn chunk_reader(
        &self,
        id: [u8; 32],
        meta: std::sync::Arc<BlobMeta>,
    ) -> Result<ChunkReader, StoreError> {
        Ok(ChunkReader {
            store: self.clone(),
            file: self.open_chunks(meta.internal)?,
            id,
            meta,
        })
    }

    /// The chunk file of `internal`; `None` if there is none (blobs stored by earlier versions
    /// keep their chunks in sled).
    fn open_chunks(&self, internal: u64) -> Result<Option<File>, StoreError> {
        let path = self.chunk_path(internal);
        match File::open(&path) {
            Ok(file) => Ok(Some(file)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(file_err(&path)(e)),
        }
    }

    /// Reads chunk `index` into `buf` (from `file`, or from sled without one) and checks it.
    fn read_blob_chunk(
        &self,
        file: Option<&File>,
        id: &[u8; 32],
        meta: &BlobMeta,
        index: u32,
        buf: &mut Vec<u8>,
    ) -> Result<(), StoreError> {
        let corrupt = || StoreError::Corrupt {
            id: hex::encode(id),
        };
        if index as usize >= meta.chunk_hashes.len() {
            return Err(StoreError::NoSuchBlob(hex::encode(id)));
        }
        let len = chunk_len(meta.len, index);
        match file {
            Some(file) => {
                buf.resize(len, 0);
                match file.read_exact_at(buf, chunk_offset(index)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        return Err(corrupt());
                    }
                    Err(e) => return Err(file_err(&self.chunk_path(meta.internal))(e)),
                }
            }
            None => {
                let stored = self
                    .blob_chunks
                    .get(chunk_key(meta.internal, index))?
                    .ok_or_else(corrupt)?;
                buf.clear();
                buf.extend_from_slice(&stored);
            }
        }
        if buf.len() != len || !meta.chunk_intact(index as usize, buf) {
            return Err(corrupt());
        }
        Ok(())
    }

    pub(super) fn chunk_path(&self, internal: u64) -> PathBuf {
        self.chunk_dir.join(format!("{internal:016x}"))
    }

    /// Whether blob `id` is stored complete (without reading its metadata).
    pub fn has_blob(&self, id: &[u8; 32]) -> Result<bool, StoreError> {
        Ok(self.blobs.contains_key(id)?)
    }

    /// How many complete blobs are stored (from the totals: no walk of the blobs).
    pub fn blob_count(&self) -> usize {
        match self.blob_totals() {
            Ok(t) => usize::try_from(t.digest.count).unwrap_or(usize::MAX),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the blob totals");
                0
            }
        }
    }

    /// Stores many small blobs (each at most one chunk) without an fsync per blob, flushing
    /// once at the end: for benchmarks that fill a store with hundreds of thousands of blobs.
    /// Returns how many were new.
    #[cfg(feature = "test-hooks")]
    pub async fn add_small_blobs_unsynced(
        &self,
        blobs: impl IntoIterator<Item = Vec<u8>>,
    ) -> Result<usize, StoreError> {
        let mut added = 0;
        for bytes in blobs {
            if bytes.len() > CHUNK_SIZE {
                return Err(StoreError::TooManyChunks);
            }
            let id: [u8; 32] = Sha256::digest(&bytes).into();
            if self.has_blob(&id)? {
                continue;
            }
            let internal = self.db.generate_id()?;
            let mut sums = ChunkSums::default();
            if !bytes.is_empty() {
                let path = self.chunk_path(internal);
                std::fs::write(&path, &bytes).map_err(file_err(&path))?;
                // One chunk: its hash is the whole blob's.
                sums.push(id, &bytes);
            }
            self.publish_blob(id, internal, bytes.len() as u64, sums)?;
            added += 1;
        }
        self.flush().await?;
        Ok(added)
    }

    /// Up to `max` complete blobs with their lengths, in id order, starting after `after` (from
    /// the first with `None`): pages for announcing a store of any size in bounded memory.
    pub fn blob_page(
        &self,
        after: Option<&[u8; 32]>,
        max: usize,
    ) -> Result<Vec<([u8; 32], u64)>, StoreError> {
        use std::ops::Bound;
        let start = match after {
            Some(a) => Bound::Excluded(a.to_vec()),
            None => Bound::Unbounded,
        };
        let mut out = Vec::with_capacity(max.min(4096));
        for entry in self.blobs.range::<Vec<u8>, _>((start, Bound::Unbounded)) {
            if out.len() >= max {
                break;
            }
            let (k, v) = entry?;
            let Ok(id) = <[u8; 32]>::try_from(k.as_ref()) else {
                continue;
            };
            let meta: BlobMeta = serde_cbor::from_slice(&v).map_err(decode_err("blob meta"))?;
            out.push((id, meta.len));
        }
        Ok(out)
    }

    /// Every complete blob.
    pub fn blobs(&self) -> Result<Vec<([u8; 32], BlobMeta)>, StoreError> {
        let mut out = Vec::new();
        for entry in self.blobs.iter() {
            let (k, v) = entry?;
            let Ok(id) = <[u8; 32]>::try_from(k.as_ref()) else {
                continue;
            };
            let meta: BlobMeta = serde_cbor::from_slice(&v).map_err(decode_err("blob meta"))?;
            out.push((id, meta));
        }
        Ok(out)
    }

    /// A fresh internal chunk namespace for a blob being received.
    pub fn new_blob_internal(&self) -> Result<u64, StoreError> {
        Ok(self.db.generate_id()?)
    }

    /// Removes the chunks of an abandoned transfer.
    pub fn discard_chunks(&self, internal: u64, count: usize) -> Result<(), StoreError> {
        self.remove_chunks(internal, count)
    }

    pub(super) fn remove_chunks(&self, internal: u64, count: usize) -> Result<(), StoreError> {
        let path = self.chunk_path(internal);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(file_err(&path)(e)),
        }
        for index in 0..count {
            let index = u32::try_from(index).unwrap_or(u32::MAX);
            self.blob_chunks.remove(chunk_key(internal, index))?;
        }
        Ok(())
    }

    /// Removes chunks that belong to no complete blob (left by interrupted adds), except those
    /// under `keep` (transfers in progress). Returns how many chunks were removed.
    pub fn collect_blob_garbage(&self, keep: &[u64]) -> Result<usize, StoreError> {
        self.collect_blob_garbage_below(keep, u64::MAX)
    }

    /// [`Store::collect_blob_garbage`] of the chunks under internal numbers below `below`
    /// only. Internal numbers only grow ([`Store::new_blob_internal`]), so with `below` taken
    /// before the sweep starts, adds and transfers that begin while it runs are never touched:
    /// the sweep can run beside them, off the node's start-up path.
    pub fn collect_blob_garbage_below(
        &self,
        keep: &[u64],
        below: u64,
    ) -> Result<usize, StoreError> {
        let mut live: std::collections::HashSet<u64> = keep.iter().copied().collect();
        for entry in self.blobs.iter() {
            let (_, v) = entry?;
            let meta: BlobMeta = serde_cbor::from_slice(&v).map_err(decode_err("blob meta"))?;
            live.insert(meta.internal);
        }
        let garbage = |internal: u64| internal < below && !live.contains(&internal);
        let mut removed = 0;
        let dir = std::fs::read_dir(&self.chunk_dir).map_err(file_err(&self.chunk_dir))?;
        for entry in dir.flatten() {
            let name = entry.file_name();
            let Some(internal) = name.to_str().and_then(|n| u64::from_str_radix(n, 16).ok()) else {
                continue;
            };
            if garbage(internal) {
                let path = entry.path();
                std::fs::remove_file(&path).map_err(file_err(&path))?;
                removed += 1;
            }
        }
        for entry in self.blob_chunks.iter() {
            let (k, _) = entry?;
            let Some(prefix) = k.get(..8) else { continue };
            let mut internal = [0u8; 8];
            internal.copy_from_slice(prefix);
            if garbage(u64::from_be_bytes(internal)) {
                self.blob_chunks.remove(&k)?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::store::temp_store;

    #[tokio::test]
    async fn blob_round_trip_across_chunk_boundaries() {
        let (_dir, store) = temp_store();
        let data: Vec<u8> = (0..(CHUNK_SIZE * 2 + 17))
            .map(|i| (i % 251) as u8)
            .collect();
        let mut w = store.blob_writer(None).unwrap();
        for piece in data.chunks(1000) {
            w.write(piece).unwrap();
        }
        let (id, meta) = w.finish().await.unwrap();
        assert_eq!(id, <[u8; 32]>::from(Sha256::digest(&data)));
        assert_eq!(meta.chunk_hashes.len(), 3);
        let mut back = Vec::new();
        for i in 0..3 {
            back.extend(store.blob_chunk(&id, &meta, i).unwrap());
        }
        assert_eq!(back, data);
    }

    #[tokio::test]
    async fn blob_pages_walk_every_blob_once_in_id_order() {
        let (_dir, store) = temp_store();
        let mut ids = Vec::new();
        for i in 0..25u32 {
            let mut w = store.blob_writer(None).unwrap();
            w.write(&vec![7u8; i as usize]).unwrap();
            let (id, _) = w.finish().await.unwrap();
            ids.push((id, u64::from(i)));
        }
        ids.sort();
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let page = store.blob_page(after.as_ref(), 10).unwrap();
            assert!(page.len() <= 10);
            let Some(last) = page.last() else { break };
            after = Some(last.0);
            seen.extend(page);
        }
        assert_eq!(seen, ids);
        assert!(store.blob_page(Some(&[0xff; 32]), 10).unwrap().is_empty());
    }

    #[tokio::test]
    async fn wrong_expected_hash_is_refused_and_cleaned() {
        let (_dir, store) = temp_store();
        let mut w = store.blob_writer(Some([7u8; 32])).unwrap();
        w.write(b"not what was promised").unwrap();
        assert!(matches!(
            w.finish().await,
            Err(StoreError::HashMismatch { .. })
        ));
        assert!(store.blobs().unwrap().is_empty());
        assert_eq!(std::fs::read_dir(&store.chunk_dir).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn corrupt_chunk_is_detected_on_read() {
        let (_dir, store) = temp_store();
        let mut w = store.blob_writer(None).unwrap();
        w.write(b"abc").unwrap();
        let (id, meta) = w.finish().await.unwrap();
        std::fs::write(store.chunk_path(meta.internal), b"abd").unwrap();
        assert!(matches!(
            store.blob_chunk(&id, &meta, 0),
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[tokio::test]
    async fn reads_are_checked_with_the_crc_of_each_chunk_recorded_at_the_add() {
        let (_dir, store) = temp_store();
        let data: Vec<u8> = (0..2 * CHUNK_SIZE + 9).map(|i| (i % 253) as u8).collect();
        let (id, meta) = add(&store, &data).await;
        let crcs: Vec<u32> = data.chunks(CHUNK_SIZE).map(crc32fast::hash).collect();
        assert_eq!(meta.chunk_crcs, crcs);
        assert_eq!(store.blob_meta(&id).unwrap().unwrap().chunk_crcs, crcs);
        // One flipped byte in the last chunk's file is caught by its CRC alone.
        let path = store.chunk_path(meta.internal);
        let mut file = std::fs::read(&path).unwrap();
        file[2 * CHUNK_SIZE + 3] ^= 1;
        std::fs::write(&path, &file).unwrap();
        assert!(store.blob_chunk(&id, &meta, 0).is_ok());
        let without_hashes = BlobMeta {
            chunk_hashes: vec![[0; 32]; 3],
            ..meta.clone()
        };
        assert!(
            store.blob_chunk(&id, &without_hashes, 1).is_ok(),
            "with CRCs, a read does not hash"
        );
        assert!(matches!(
            store.blob_chunk(&id, &meta, 2),
            Err(StoreError::Corrupt { .. })
        ));
    }

    async fn add(store: &Store, data: &[u8]) -> ([u8; 32], BlobMeta) {
        let mut w = store.blob_writer(None).unwrap();
        w.write(data).unwrap();
        w.finish().await.unwrap()
    }

    #[tokio::test]
    async fn the_same_content_added_twice_is_one_blob() {
        let (_dir, store) = temp_store();
        let data = vec![3u8; CHUNK_SIZE + 5];
        let (a, first) = add(&store, &data).await;
        let (b, second) = add(&store, &data).await;
        assert_eq!(a, b);
        assert_eq!(first.internal, second.internal, "the first copy is kept");
        assert_eq!(store.blob_count(), 1);
        assert!(store.has_blob(&a).unwrap());
        assert_eq!(
            std::fs::read_dir(&store.chunk_dir).unwrap().count(),
            1,
            "the second copy's chunks are removed"
        );
    }

    #[tokio::test]
    async fn whole_chunks_and_pieces_make_the_same_blob() {
        let (_dir, store) = temp_store();
        let data: Vec<u8> = (0..CHUNK_SIZE * 2 + 1).map(|i| (i % 13) as u8).collect();
        let mut w = store.blob_writer(None).unwrap();
        w.write_chunk(&data[..CHUNK_SIZE]).unwrap();
        w.write(&data[CHUNK_SIZE..CHUNK_SIZE + 10]).unwrap();
        // A whole chunk after a partial one is split at the chunk boundary.
        w.write_chunk(&data[CHUNK_SIZE + 10..]).unwrap();
        assert_eq!(w.len(), data.len() as u64);
        assert!(!w.is_empty());
        let (id, meta) = w.finish().await.unwrap();
        assert_eq!(id, <[u8; 32]>::from(Sha256::digest(&data)));
        assert_eq!(meta.chunk_hashes.len(), 3);
        assert_eq!(
            store.blob_chunk(&id, &meta, 2).unwrap(),
            vec![data[data.len() - 1]]
        );
    }

    #[tokio::test]
    async fn a_chunk_past_the_end_is_not_there() {
        let (_dir, store) = temp_store();
        let (id, meta) = add(&store, b"small").await;
        assert!(matches!(
            store.blob_chunk(&id, &meta, 1),
            Err(StoreError::NoSuchBlob(_))
        ));
        assert_eq!(store.blob_meta(&[0; 32]).unwrap().map(|m| m.len), None);
    }

    #[tokio::test]
    async fn blobs_lists_every_complete_blob() {
        let (_dir, store) = temp_store();
        let (a, _) = add(&store, b"one").await;
        let (b, _) = add(&store, &vec![1u8; CHUNK_SIZE * 2]).await;
        // An add that never finished is not a blob.
        let mut unfinished = store.blob_writer(None).unwrap();
        unfinished.write(&vec![2u8; CHUNK_SIZE]).unwrap();
        drop(unfinished);
        let mut listed: Vec<(Vec<u8>, u64)> = store
            .blobs()
            .unwrap()
            .into_iter()
            .map(|(id, m)| (id.to_vec(), m.len))
            .collect();
        listed.sort();
        let mut expected = vec![(a.to_vec(), 3), (b.to_vec(), 2 * CHUNK_SIZE as u64)];
        expected.sort();
        assert_eq!(listed, expected);
    }

    #[tokio::test]
    async fn garbage_collection_removes_unclaimed_chunk_files_only() {
        let (_dir, store) = temp_store();
        let (id, meta) = add(&store, &vec![4u8; CHUNK_SIZE + 1]).await;
        let mut orphan = store.blob_writer(None).unwrap();
        orphan.write(&vec![5u8; CHUNK_SIZE]).unwrap();
        drop(orphan);
        let mut kept = store.blob_writer(None).unwrap();
        kept.write(&vec![6u8; CHUNK_SIZE]).unwrap();
        let kept_internal = kept.internal;
        drop(kept);
        // A file whose name is not an internal number is not ours to judge.
        std::fs::write(store.chunk_dir.join("README"), b"x").unwrap();
        assert_eq!(store.collect_blob_garbage(&[kept_internal]).unwrap(), 1);
        assert!(store.chunk_path(kept_internal).exists());
        assert!(store.chunk_dir.join("README").exists());
        assert_eq!(store.blob_chunk(&id, &meta, 1).unwrap(), vec![4u8]);
        assert_eq!(store.collect_blob_garbage(&[kept_internal]).unwrap(), 0);
    }

    #[tokio::test]
    async fn a_sweep_leaves_chunks_numbered_from_its_watermark_on() {
        let (_dir, store) = temp_store();
        let mut before = store.blob_writer(None).unwrap();
        before.write(&vec![1u8; CHUNK_SIZE]).unwrap();
        let before_internal = before.internal;
        drop(before);
        let below = store.new_blob_internal().unwrap();
        // An add that began after the sweep took its watermark (it is still writing).
        let mut during = store.blob_writer(None).unwrap();
        during.write(&vec![2u8; CHUNK_SIZE]).unwrap();
        assert!(during.internal > below);
        assert_eq!(store.collect_blob_garbage_below(&[], below).unwrap(), 1);
        assert!(!store.chunk_path(before_internal).exists());
        assert!(store.chunk_path(during.internal).exists());
        let (id, meta) = during.finish().await.unwrap();
        assert_eq!(
            store.blob_chunk(&id, &meta, 0).unwrap(),
            vec![2u8; CHUNK_SIZE]
        );
    }

    #[tokio::test]
    async fn blobs_stored_in_sled_by_earlier_versions_are_still_read() {
        let (_dir, store) = temp_store();
        let data = vec![8u8; CHUNK_SIZE + 2];
        let hashes: Vec<[u8; 32]> = data
            .chunks(CHUNK_SIZE)
            .map(|c| Sha256::digest(c).into())
            .collect();
        let internal = store.new_blob_internal().unwrap();
        for (i, c) in data.chunks(CHUNK_SIZE).enumerate() {
            store
                .blob_chunks
                .insert(chunk_key(internal, i as u32), c)
                .unwrap();
        }
        let id: [u8; 32] = Sha256::digest(&data).into();
        // As earlier versions stored it: no CRCs, so reads are checked with the SHA-256.
        let sums = ChunkSums {
            hashes,
            crcs: Vec::new(),
        };
        let meta = store
            .publish_blob(id, internal, data.len() as u64, sums)
            .unwrap();
        let mut back = store.blob_chunk(&id, &meta, 0).unwrap();
        back.extend(store.blob_chunk(&id, &meta, 1).unwrap());
        assert_eq!(back, data);
        // And discarding them removes the sled chunks too.
        store.discard_chunks(internal, 2).unwrap();
        assert!(store.blob_chunks.is_empty());
    }

    #[test]
    fn chunk_lengths_and_offsets() {
        let len = 2 * CHUNK_SIZE as u64 + 7;
        assert_eq!(chunk_offset(2), 2 * CHUNK_SIZE as u64);
        assert_eq!(chunk_len(len, 0), CHUNK_SIZE);
        assert_eq!(chunk_len(len, 2), 7);
        assert_eq!(chunk_len(len, 3), 0);
        assert_eq!(chunk_key(1, 2), [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 2]);
    }

    #[test]
    fn a_blob_meta_keeps_its_stored_shape() {
        use serde_cbor::Value;
        let meta = BlobMeta {
            internal: 3,
            len: 10,
            chunk_hashes: vec![[2; 32]],
            stored_at: 99,
            chunk_crcs: Vec::new(),
        };
        let v: Value = serde_cbor::from_slice(&serde_cbor::to_vec(&meta).unwrap()).unwrap();
        let expected = Value::Map(
            [
                ("internal", Value::Integer(3)),
                ("len", Value::Integer(10)),
                (
                    "chunk_hashes",
                    Value::Array(vec![Value::Array(vec![Value::Integer(2); 32])]),
                ),
                ("stored_at", Value::Integer(99)),
            ]
            .into_iter()
            .map(|(k, v)| (Value::Text(k.into()), v))
            .collect(),
        );
        assert_eq!(v, expected);
        // CRCs are one more field; a record without it (an earlier version's) has none.
        let with_crcs = BlobMeta {
            chunk_crcs: vec![7],
            ..meta
        };
        let v: Value = serde_cbor::from_slice(&serde_cbor::to_vec(&with_crcs).unwrap()).unwrap();
        let Value::Map(fields) = v else {
            panic!("a map")
        };
        assert_eq!(
            fields.get(&Value::Text("chunk_crcs".into())),
            Some(&Value::Array(vec![Value::Integer(7)]))
        );
        let old = serde_cbor::to_vec(&expected).unwrap();
        let decoded: BlobMeta = serde_cbor::from_slice(&old).unwrap();
        assert!(decoded.chunk_crcs.is_empty());
    }
}
