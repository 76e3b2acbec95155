//! A blob received from a peer, chunk by chunk in order: each chunk is checked against the
//! manifest's chunk hash and folded into the whole-content hash as it arrives, so publishing
//! needs no second pass over the bytes. A transfer cut short resumes: the chunks already on
//! disk are read back and verified first (they were never fsynced), and receiving continues
//! after the last good one.

use std::fs::File;
use std::os::unix::fs::FileExt;

use sha2::{Digest, Sha256};

use super::blobs::{BlobMeta, CHUNK_SIZE, chunk_len, chunk_offset, file_err};
use super::{Store, StoreError, decode_err};

/// How many chunks a blob of `len` bytes has.
pub fn chunk_count(len: u64) -> u64 {
    len.div_ceil(CHUNK_SIZE as u64)
}

/// A blob being received. Feed the chunks in order with [`BlobReceiver::put`], then call
/// [`BlobReceiver::finish`]. Dropping it keeps the chunks written so far (to resume).
pub struct BlobReceiver {
    store: Store,
    id: [u8; 32],
    internal: u64,
    len: u64,
    chunk_hashes: Vec<[u8; 32]>,
    whole: Sha256,
    done: u32,
    file: File,
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
    /// `internal`, or resumes it: the first `done` chunks are expected on disk from an earlier
    /// attempt and are verified again; the receiver continues after the last good one (see
    /// [`BlobReceiver::done`]). Blocking.
    pub fn receive_blob(
        &self,
        id: [u8; 32],
        internal: u64,
        len: u64,
        chunk_hashes: Vec<[u8; 32]>,
        done: u32,
    ) -> Result<BlobReceiver, StoreError> {
        if chunk_hashes.len() as u64 != chunk_count(len) {
            return Err(StoreError::Decode {
                what: "blob manifest",
                detail: format!(
                    "{} chunk hashes for {len} bytes in chunks of {CHUNK_SIZE}",
                    chunk_hashes.len()
                ),
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
            whole: Sha256::new(),
            done: 0,
            file,
        };
        let mut buf = Vec::new();
        while r.done < done.min(r.count()) {
            buf.resize(chunk_len(len, r.done), 0);
            match r.file.read_exact_at(&mut buf, chunk_offset(r.done)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(file_err(&path)(e)),
            }
            let actual: [u8; 32] = Sha256::digest(&buf).into();
            if actual != r.chunk_hashes[r.done as usize] {
                break;
            }
            r.whole.update(&buf);
            r.done += 1;
        }
        Ok(r)
    }
}

impl BlobReceiver {
    /// Chunks received and verified so far; the next [`BlobReceiver::put`] is this index.
    pub fn done(&self) -> u32 {
        self.done
    }

    /// Chunks in the blob.
    pub fn count(&self) -> u32 {
        u32::try_from(self.chunk_hashes.len()).unwrap_or(u32::MAX)
    }

    /// Verifies chunk [`BlobReceiver::done`] against its hash and writes it. A chunk that
    /// does not match is refused with [`StoreError::HashMismatch`] (the sender's fault) and
    /// nothing is written.
    pub fn put(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        let Some(expected) = self.chunk_hashes.get(self.done as usize) else {
            return Err(StoreError::Decode {
                what: "blob chunk",
                detail: format!("chunk {} of a blob of {}", self.done, self.count()),
            });
        };
        let actual: [u8; 32] = Sha256::digest(bytes).into();
        if &actual != expected || bytes.len() != chunk_len(self.len, self.done) {
            return Err(StoreError::HashMismatch {
                expected: hex::encode(expected),
                actual: hex::encode(actual),
            });
        }
        self.file
            .write_all_at(bytes, chunk_offset(self.done))
            .map_err(file_err(&self.store.chunk_path(self.internal)))?;
        self.whole.update(bytes);
        self.done += 1;
        Ok(())
    }

    /// After the last chunk: checks the whole-content hash, fsyncs the chunk file and
    /// publishes the blob (durable after the next [`Store::flush`]). On a mismatch the chunks
    /// are removed. If the blob arrived another way meanwhile, this copy is dropped. Blocking.
    pub fn finish(self) -> Result<BlobMeta, StoreError> {
        if self.done != self.count() {
            return Err(StoreError::Decode {
                what: "blob",
                detail: format!("finished after {} of {} chunks", self.done, self.count()),
            });
        }
        let actual: [u8; 32] = self.whole.finalize().into();
        if actual != self.id {
            self.store
                .remove_chunks(self.internal, self.chunk_hashes.len())?;
            return Err(StoreError::HashMismatch {
                expected: hex::encode(self.id),
                actual: hex::encode(actual),
            });
        }
        if let Some(existing) = self.store.blob_meta(&self.id)? {
            self.store
                .remove_chunks(self.internal, self.chunk_hashes.len())?;
            return Ok(existing);
        }
        let path = self.store.chunk_path(self.internal);
        self.file.sync_all().map_err(file_err(&path))?;
        let meta = BlobMeta {
            internal: self.internal,
            len: self.len,
            chunk_hashes: self.chunk_hashes,
            stored_at: crate::time::now_secs(),
        };
        let bytes = serde_cbor::to_vec(&meta).map_err(decode_err("blob meta"))?;
        self.store.blobs.insert(self.id, bytes)?;
        Ok(meta)
    }
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
            .receive_blob(id, internal, data.len() as u64, hashes.clone(), 0)
            .unwrap();
        r.put(chunks[0]).unwrap();
        r.put(chunks[1]).unwrap();
        drop(r); // the connection broke
        let mut r = store
            .receive_blob(id, internal, data.len() as u64, hashes, 2)
            .unwrap();
        assert_eq!(r.done(), 2, "the two chunks on disk are kept");
        r.put(chunks[2]).unwrap();
        r.put(chunks[3]).unwrap();
        let meta = r.finish().unwrap();
        let mut back = Vec::new();
        for i in 0..4 {
            back.extend(store.blob_chunk(&id, &meta, i).unwrap());
        }
        assert_eq!(back, data);
    }

    #[test]
    fn a_damaged_chunk_on_disk_is_received_again() {
        let (_dir, store) = temp_store();
        let (data, id, hashes) = blob(CHUNK_SIZE * 2);
        let internal = store.new_blob_internal().unwrap();
        let mut r = store
            .receive_blob(id, internal, data.len() as u64, hashes.clone(), 0)
            .unwrap();
        r.put(&data[..CHUNK_SIZE]).unwrap();
        r.put(&data[CHUNK_SIZE..]).unwrap();
        drop(r);
        let path = store.chunk_path(internal);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[CHUNK_SIZE + 9] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let r = store
            .receive_blob(id, internal, data.len() as u64, hashes, 2)
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
                .receive_blob(id, internal, 100 + CHUNK_SIZE as u64, hashes.clone(), 0)
                .is_err()
        );
        let mut r = store
            .receive_blob(id, internal, 100, hashes.clone(), 0)
            .unwrap();
        assert!(matches!(
            r.put(b"not the chunk"),
            Err(StoreError::HashMismatch { .. })
        ));
        assert_eq!(r.done(), 0);
        // Chunks that match their hashes but not the blob id (a lying manifest).
        let mut r = store
            .receive_blob([9; 32], internal, 100, hashes, 0)
            .unwrap();
        r.put(&data).unwrap();
        assert!(matches!(r.finish(), Err(StoreError::HashMismatch { .. })));
        assert!(store.blob_meta(&[9; 32]).unwrap().is_none());
        assert!(!store.chunk_path(internal).exists());
    }
}
