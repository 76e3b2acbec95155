//! A blob received from a peer, chunk by chunk in order, written as it arrives, and published
//! only once the whole content hashes to the blob's id.
//!
//! One SHA-256 pass: each chunk is folded into the whole-content hash as it arrives. The
//! manifest's per-chunk hashes are not checked on the way: in transit every byte is already
//! authenticated (noise's ChaCha20-Poly1305), and the whole-content hash at the end is what
//! proves the bytes are the blob. They are read back and checked only when that hash fails, to
//! name the chunk at fault, and when a transfer resumes, to find the chunks already on disk
//! that can be kept (they were never fsynced). A chunk of the wrong length is refused on
//! arrival. Nothing is published, or served, before the whole hash matches.
//!
//! Hashing and writing are two stages: [`BlobReceiver::put`] hashes on the caller's thread and
//! hands the chunk to a writer thread of its own (copying into the page cache is the other half
//! of the cost), a few chunks behind.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use sha2::{Digest, Sha256};

use super::blobs::{BlobMeta, CHUNK_SIZE, ChunkSums, chunk_len, chunk_offset, file_err};
use super::{Store, StoreError};

/// How many chunks a blob of `len` bytes has.
pub fn chunk_count(len: u64) -> u64 {
    len.div_ceil(CHUNK_SIZE as u64)
}

/// Chunks the writer thread may hold before [`BlobReceiver::put`] waits.
const WRITE_BEHIND: usize = 4;
/// The writer makes what it wrote durable, and drops it from the page cache, every this many
/// bytes: the final fsync has little left to do, a 1 GiB blob does not push everything else
/// out of the cache, and the pages are reused warm (on a VM, filling fresh page-cache pages
/// cost more than the network).
const WRITE_BACK_EVERY: u64 = 16 << 20;

/// A blob being received. Feed the chunks in order with [`BlobReceiver::put`], then call
/// [`BlobReceiver::finish`]. Dropping it keeps the chunks written so far (to resume).
pub struct BlobReceiver {
    store: Store,
    id: [u8; 32],
    internal: u64,
    len: u64,
    chunk_hashes: Vec<[u8; 32]>,
    /// What is recorded of the chunks taken so far.
    sums: ChunkSums,
    whole: Sha256,
    /// Chunks taken (and handed to the writer).
    done: u32,
    writer: Option<Writer>,
}

/// The writer thread: writes the chunks taken at their offsets, in order.
struct Writer {
    chunks: SyncSender<(u32, bytes::Bytes)>,
    /// Chunks written so far (all chunks below this index are in the file).
    written: Arc<AtomicU32>,
    thread: JoinHandle<Result<File, StoreError>>,
}

impl Writer {
    fn spawn(file: File, path: std::path::PathBuf, written: u32) -> Result<Writer, StoreError> {
        let (chunks, rx): (_, Receiver<(u32, bytes::Bytes)>) = sync_channel(WRITE_BEHIND);
        let start = chunk_offset(written);
        let counter = Arc::new(AtomicU32::new(written));
        let written = counter.clone();
        let thread = std::thread::Builder::new()
            .name("iom-blob-write".into())
            .spawn(move || {
                let mut synced = start;
                for (index, bytes) in rx {
                    let at = chunk_offset(index);
                    file.write_all_at(&bytes, at).map_err(file_err(&path))?;
                    let end = at + bytes.len() as u64;
                    if end >= synced + WRITE_BACK_EVERY {
                        file.sync_data().map_err(file_err(&path))?;
                        // Only advice: if the kernel ignores it, the pages stay cached.
                        let _ = nix::fcntl::posix_fadvise(
                            &file,
                            i64::try_from(synced).unwrap_or(i64::MAX),
                            i64::try_from(end - synced).unwrap_or(i64::MAX),
                            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
                        );
                        synced = end;
                    }
                    counter.store(index + 1, Ordering::Release);
                }
                Ok(file)
            })
            .map_err(|e| StoreError::ChunkFile {
                path: "blob writer thread".into(),
                source: e,
            })?;
        Ok(Writer {
            chunks,
            written,
            thread,
        })
    }

    /// Stops the thread after it wrote everything handed to it; the file, or its error.
    fn join(self) -> Result<File, StoreError> {
        drop(self.chunks);
        self.thread.join().map_err(|_| StoreError::WriterStopped)?
    }
}

impl std::fmt::Debug for BlobReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobReceiver")
            .field("id", &hex::encode(self.id))
            .field("done", &self.done)
            .field("count", &self.chunk_hashes.len())
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Starts receiving blob `id` (`len` bytes, one hash per chunk) into the chunk file of
    /// `internal`, or resumes it: the chunks an earlier attempt left in the file are verified
    /// again, and the receiver continues after the last good one (see [`BlobReceiver::done`]).
    /// The file is the truth, not a recorded count: the count may be older than the file (it
    /// is not flushed per chunk), and the file may have lost unsynced chunks in a crash.
    /// Blocking.
    pub fn receive_blob(
        &self,
        id: [u8; 32],
        internal: u64,
        len: u64,
        chunk_hashes: Vec<[u8; 32]>,
    ) -> Result<BlobReceiver, StoreError> {
        if chunk_hashes.len() as u64 != chunk_count(len) {
            return Err(StoreError::BadManifest {
                hashes: chunk_hashes.len(),
                len,
            });
        }
        let path = self.chunk_path(internal);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(false)
            .open(&path)
            .map_err(file_err(&path))?;
        let mut r = BlobReceiver {
            store: self.clone(),
            id,
            internal,
            len,
            chunk_hashes,
            sums: ChunkSums::default(),
            whole: Sha256::new(),
            done: 0,
            writer: None,
        };
        r.done = matching_prefix(&file, &path, len, &r.chunk_hashes, |buf, hash| {
            r.whole.update(buf);
            r.sums.push(hash, buf);
        })?;
        r.writer = Some(Writer::spawn(file, path, r.done)?);
        Ok(r)
    }
}

impl Drop for BlobReceiver {
    /// Waits for the chunks handed to the writer, so they are in the file for a resume.
    fn drop(&mut self) {
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

impl BlobReceiver {
    /// Chunks taken so far; the next [`BlobReceiver::put`] is this index.
    pub fn done(&self) -> u32 {
        self.done
    }

    /// Chunks taken and written to the file so far (at most `WRITE_BEHIND` fewer than
    /// [`BlobReceiver::done`]): the progress to show.
    pub fn written(&self) -> u32 {
        self.writer
            .as_ref()
            .map_or(self.done, |w| w.written.load(Ordering::Acquire))
    }

    /// Chunks in the blob.
    pub fn count(&self) -> u32 {
        u32::try_from(self.chunk_hashes.len()).unwrap_or(u32::MAX)
    }

    /// Takes chunk [`BlobReceiver::done`]: folds it into the whole-content hash and hands it to
    /// the writer. A chunk of the wrong length is refused ([`StoreError::ChunkLength`], the
    /// sender's fault) and nothing is written; wrong bytes are found by
    /// [`BlobReceiver::finish`]. Waits while the writer is `WRITE_BEHIND` chunks behind; a
    /// write error comes back from here or from [`BlobReceiver::finish`].
    pub fn put(&mut self, bytes: impl Into<bytes::Bytes>) -> Result<(), StoreError> {
        let bytes = bytes.into();
        let index = self.done;
        let Some(expected) = self.chunk_hashes.get(index as usize).copied() else {
            return Err(StoreError::ExtraChunk {
                index,
                count: self.count(),
            });
        };
        let want = chunk_len(self.len, index);
        if bytes.len() != want {
            return Err(StoreError::ChunkLength {
                index,
                got: bytes.len(),
                want,
            });
        }
        self.store.ensure_space(bytes.len() as u64)?;
        self.store.wrote(bytes.len() as u64);
        self.whole.update(&bytes);
        let crc = crc32fast::hash(&bytes);
        let sent = self
            .writer
            .as_ref()
            .is_some_and(|w| w.chunks.send((index, bytes)).is_ok());
        if !sent {
            // The writer stopped: say why.
            return match self.writer.take().map(Writer::join) {
                Some(Err(e)) => Err(e),
                _ => Err(StoreError::WriterStopped),
            };
        }
        // The manifest's hash, kept for serving the blob on. Once the whole content matches
        // the id, the bytes are right; a manifest wrong about a chunk whose bytes are right
        // (only a lying device sends one) costs a device that resumes from us that chunk again.
        self.sums.record(expected, crc);
        self.done += 1;
        Ok(())
    }

    /// After the last chunk: checks the whole-content hash, fsyncs the chunk file and
    /// publishes the blob (durable after the next [`Store::flush`]). If the hash does not match,
    /// the chunks are read back to find the first that does not match the manifest
    /// ([`StoreError::BadChunk`]); if every chunk does, the manifest is wrong about the blob
    /// ([`StoreError::HashMismatch`]). Either way the chunks are removed. If the blob arrived
    /// another way meanwhile, this copy is dropped. Blocking.
    pub fn finish(mut self) -> Result<BlobMeta, StoreError> {
        let file = match self.writer.take() {
            Some(w) => w.join()?,
            None => {
                return Err(StoreError::WriterStopped);
            }
        };
        if self.done != self.count() {
            return Err(StoreError::Incomplete {
                done: self.done,
                count: self.count(),
            });
        }
        let actual: [u8; 32] = std::mem::take(&mut self.whole).finalize().into();
        if actual != self.id {
            let bad = self.first_bad_chunk(&file);
            self.store
                .remove_chunks(self.internal, self.chunk_hashes.len())?;
            return Err(match bad? {
                Some(index) => StoreError::BadChunk { index },
                None => StoreError::HashMismatch {
                    expected: hex::encode(self.id),
                    actual: hex::encode(actual),
                },
            });
        }
        if let Some(existing) = self.store.blob_meta(&self.id)? {
            self.store
                .remove_chunks(self.internal, self.chunk_hashes.len())?;
            return Ok(existing);
        }
        let path = self.store.chunk_path(self.internal);
        file.sync_all().map_err(file_err(&path))?;
        self.store.publish_blob(
            self.id,
            self.internal,
            self.len,
            std::mem::take(&mut self.sums),
        )
    }

    /// The first chunk in the file that does not match the manifest's hash for it, if any
    /// (only after the whole-content hash failed: one more pass over the bytes).
    fn first_bad_chunk(&self, file: &File) -> Result<Option<u32>, StoreError> {
        let path = self.store.chunk_path(self.internal);
        let good = matching_prefix(file, &path, self.len, &self.chunk_hashes, |_, _| {})?;
        Ok((good < self.count()).then_some(good))
    }
}

/// How many leading chunks of `file` (a blob of `len` bytes) match their `hashes`; each one
/// that does is handed to `good` with its hash. A chunk the file ends before does not match.
fn matching_prefix(
    file: &File,
    path: &std::path::Path,
    len: u64,
    hashes: &[[u8; 32]],
    mut good: impl FnMut(&[u8], [u8; 32]),
) -> Result<u32, StoreError> {
    let mut buf = Vec::new();
    let mut done = 0u32;
    for expected in hashes {
        buf.resize(chunk_len(len, done), 0);
        match file.read_exact_at(&mut buf, chunk_offset(done)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(file_err(path)(e)),
        }
        let actual: [u8; 32] = Sha256::digest(&buf).into();
        if actual != *expected {
            break;
        }
        good(&buf, actual);
        done += 1;
    }
    Ok(done)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::store::temp_store;

    fn blob(len: usize) -> (Vec<u8>, [u8; 32], Vec<[u8; 32]>) {
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let id = Sha256::digest(&data).into();
        let hashes = data
            .chunks(CHUNK_SIZE)
            .map(|c| Sha256::digest(c).into())
            .collect();
        (data, id, hashes)
    }

    #[test]
    fn a_blob_received_in_two_attempts_is_published_whole() {
        let (_dir, store) = temp_store();
        let (data, id, hashes) = blob(CHUNK_SIZE * 3 + 5);
        let chunks: Vec<&[u8]> = data.chunks(CHUNK_SIZE).collect();
        let internal = store.new_blob_internal().unwrap();
        let mut r = store
            .receive_blob(id, internal, data.len() as u64, hashes.clone())
            .unwrap();
        r.put(chunks[0].to_vec()).unwrap();
        r.put(chunks[1].to_vec()).unwrap();
        drop(r); // the connection broke
        let mut r = store
            .receive_blob(id, internal, data.len() as u64, hashes)
            .unwrap();
        assert_eq!(r.done(), 2, "the two chunks on disk are kept");
        r.put(chunks[2].to_vec()).unwrap();
        r.put(chunks[3].to_vec()).unwrap();
        let meta = r.finish().unwrap();
        let mut back = Vec::new();
        for i in 0..4 {
            back.extend(store.blob_chunk(&id, &meta, i).unwrap());
        }
        assert_eq!(back, data);
        let crcs: Vec<u32> = chunks.iter().map(|c| crc32fast::hash(c)).collect();
        assert_eq!(meta.chunk_crcs, crcs, "the resumed chunks' CRCs too");
    }

    #[test]
    fn a_damaged_chunk_on_disk_is_received_again() {
        let (_dir, store) = temp_store();
        let (data, id, hashes) = blob(CHUNK_SIZE * 2);
        let internal = store.new_blob_internal().unwrap();
        let mut r = store
            .receive_blob(id, internal, data.len() as u64, hashes.clone())
            .unwrap();
        r.put(data[..CHUNK_SIZE].to_vec()).unwrap();
        r.put(data[CHUNK_SIZE..].to_vec()).unwrap();
        drop(r);
        let path = store.chunk_path(internal);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[CHUNK_SIZE + 9] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let r = store
            .receive_blob(id, internal, data.len() as u64, hashes)
            .unwrap();
        assert_eq!(r.done(), 1, "resumes at the damaged chunk");
    }

    #[test]
    fn wrong_chunks_and_wrong_manifests_are_refused() {
        let (_dir, store) = temp_store();
        let (data, id, hashes) = blob(100);
        let internal = store.new_blob_internal().unwrap();
        // A manifest whose chunk count does not fit the length.
        assert!(
            store
                .receive_blob(id, internal, 100 + CHUNK_SIZE as u64, hashes.clone())
                .is_err()
        );
        let mut r = store
            .receive_blob(id, internal, 100, hashes.clone())
            .unwrap();
        assert!(matches!(
            r.put(b"not the chunk".to_vec()),
            Err(StoreError::ChunkLength {
                index: 0,
                got: 13,
                want: 100
            })
        ));
        assert_eq!(r.done(), 0);
        // Chunks that match their hashes but not the blob id (a lying manifest).
        let mut r = store.receive_blob([9; 32], internal, 100, hashes).unwrap();
        r.put(data.clone()).unwrap();
        assert!(matches!(r.finish(), Err(StoreError::HashMismatch { .. })));
        assert!(store.blob_meta(&[9; 32]).unwrap().is_none());
        assert!(!store.chunk_path(internal).exists());
    }

    #[test]
    fn wrong_bytes_are_found_at_the_end_named_by_chunk_and_nothing_is_kept() {
        let (_dir, store) = temp_store();
        let (data, id, hashes) = blob(CHUNK_SIZE * 3 + 7);
        let internal = store.new_blob_internal().unwrap();
        let mut r = store
            .receive_blob(id, internal, data.len() as u64, hashes.clone())
            .unwrap();
        for (i, chunk) in data.chunks(CHUNK_SIZE).enumerate() {
            let mut chunk = chunk.to_vec();
            if i == 2 {
                chunk[100] ^= 0x20; // the right length, the wrong bytes
            }
            r.put(chunk).unwrap();
        }
        assert_eq!(r.done(), 4, "taken: only the whole hash can tell");
        assert!(matches!(r.finish(), Err(StoreError::BadChunk { index: 2 })));
        assert!(store.blob_meta(&id).unwrap().is_none());
        assert!(!store.chunk_path(internal).exists(), "nothing is kept");
        // The next attempt starts from nothing and, given the right bytes, publishes them.
        let mut r = store
            .receive_blob(id, internal, data.len() as u64, hashes)
            .unwrap();
        assert_eq!(r.done(), 0);
        for chunk in data.chunks(CHUNK_SIZE) {
            r.put(chunk.to_vec()).unwrap();
        }
        let meta = r.finish().unwrap();
        assert_eq!(meta.len, data.len() as u64);
    }

    #[test]
    fn typed_errors_name_what_went_wrong() {
        let (_dir, store) = temp_store();
        let (data, id, hashes) = blob(CHUNK_SIZE + 1);
        let internal = store.new_blob_internal().unwrap();
        let err = store
            .receive_blob(id, internal, data.len() as u64, vec![hashes[0]])
            .unwrap_err();
        assert!(
            matches!(err, StoreError::BadManifest { hashes: 1, .. }),
            "{err}"
        );
        // Finishing before the last chunk.
        let mut r = store
            .receive_blob(id, internal, data.len() as u64, hashes.clone())
            .unwrap();
        r.put(data[..CHUNK_SIZE].to_vec()).unwrap();
        assert!(matches!(
            r.finish(),
            Err(StoreError::Incomplete { done: 1, count: 2 })
        ));
        // A chunk past the end.
        let mut r = store
            .receive_blob(id, internal, data.len() as u64, hashes)
            .unwrap();
        r.put(data[CHUNK_SIZE..].to_vec()).unwrap();
        assert_eq!(r.done(), 2);
        assert!(matches!(
            r.put(vec![0]),
            Err(StoreError::ExtraChunk { index: 2, count: 2 })
        ));
        assert!(r.finish().is_ok(), "the blob itself is whole");
    }

    #[test]
    fn a_chunk_of_the_wrong_length_is_refused_even_with_the_right_hash_prefix() {
        let (_dir, store) = temp_store();
        let (data, id, hashes) = blob(CHUNK_SIZE + 10);
        let internal = store.new_blob_internal().unwrap();
        let mut r = store
            .receive_blob(id, internal, data.len() as u64, hashes)
            .unwrap();
        let mut long = data[..CHUNK_SIZE].to_vec();
        long.push(0);
        assert!(matches!(
            r.put(long),
            Err(StoreError::ChunkLength { index: 0, .. })
        ));
        assert_eq!(r.done(), 0);
        assert_eq!(r.count(), 2);
        assert_eq!(chunk_count(0), 0);
        assert_eq!(chunk_count(1), 1);
        assert_eq!(chunk_count(CHUNK_SIZE as u64), 1);
        assert_eq!(chunk_count(CHUNK_SIZE as u64 + 1), 2);
    }

    #[test]
    fn a_blob_that_arrived_another_way_meanwhile_is_kept_once() {
        let (_dir, store) = temp_store();
        let (data, id, hashes) = blob(50);
        let first = store.new_blob_internal().unwrap();
        let second = store.new_blob_internal().unwrap();
        let mut a = store.receive_blob(id, first, 50, hashes.clone()).unwrap();
        let mut b = store.receive_blob(id, second, 50, hashes).unwrap();
        a.put(data.clone()).unwrap();
        b.put(data).unwrap();
        let kept = a.finish().unwrap();
        let again = b.finish().unwrap();
        assert_eq!(again.internal, kept.internal);
        assert!(
            !store.chunk_path(second).exists(),
            "the second copy is removed"
        );
        assert_eq!(store.blob_count(), 1);
    }
}
