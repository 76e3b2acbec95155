//! The blob totals: the [`BlobSetDigest`] of every complete blob (how many, and a digest of
//! their ids) and their bytes, kept in one `state` record that every blob add updates in the
//! same transaction as the blob's metadata. Sessions read the digest at set-up (two devices
//! with the same blobs skip the announcements), `iom status` reads the count and the bytes:
//! none of them walks the blobs.
//!
//! A store written before the record existed (data format 2) has none: the first open walks
//! the blobs once to make it ([`Store::ensure_blob_totals`]).

use iom_protocol::blobset::{BlobSetDigest, DIGEST_LEN};
use iom_protocol::id::ContentId;
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};

use super::blobs::BlobMeta;
use super::{Store, StoreError, decode_err};

/// The record's key in the `state` tree.
const KEY: &[u8] = b"blob-totals";

/// What the record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BlobTotals {
    /// The digest of the complete blobs' ids (its count is the number of blobs).
    pub digest: BlobSetDigest,
    /// The sum of their lengths.
    pub bytes: u64,
}

impl BlobTotals {
    fn encode(&self) -> [u8; DIGEST_LEN + 8] {
        let mut out = [0u8; DIGEST_LEN + 8];
        out[..DIGEST_LEN].copy_from_slice(&self.digest.to_bytes());
        out[DIGEST_LEN..].copy_from_slice(&self.bytes.to_be_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Result<BlobTotals, StoreError> {
        let corrupt = || StoreError::Corrupt {
            id: "blob totals".into(),
        };
        if bytes.len() != DIGEST_LEN + 8 {
            return Err(corrupt());
        }
        let digest = BlobSetDigest::from_bytes(&bytes[..DIGEST_LEN]).ok_or_else(corrupt)?;
        let mut len = [0u8; 8];
        len.copy_from_slice(&bytes[DIGEST_LEN..]);
        Ok(BlobTotals {
            digest,
            bytes: u64::from_be_bytes(len),
        })
    }
}

impl Store {
    /// The blob totals (zero for a store with no blobs).
    pub fn blob_totals(&self) -> Result<BlobTotals, StoreError> {
        match self.state.get(KEY)? {
            Some(v) => BlobTotals::decode(&v),
            None => Ok(BlobTotals::default()),
        }
    }

    /// The digest of the complete blobs held here.
    pub fn blob_digest(&self) -> Result<BlobSetDigest, StoreError> {
        Ok(self.blob_totals()?.digest)
    }

    /// Records blob `id`'s metadata and counts it in the totals, in one transaction (a blob
    /// already recorded has its metadata replaced and is not counted again).
    pub(super) fn insert_blob_record(
        &self,
        id: [u8; 32],
        len: u64,
        meta: &[u8],
    ) -> Result<(), StoreError> {
        (&self.blobs, &self.state)
            .transaction(|(blobs, state)| {
                let known = blobs.insert(&id, meta)?.is_some();
                if !known {
                    let mut totals = match state.get(KEY)? {
                        Some(v) => {
                            BlobTotals::decode(&v).map_err(ConflictableTransactionError::Abort)?
                        }
                        None => BlobTotals::default(),
                    };
                    totals.digest.insert(&ContentId::from_bytes(id));
                    totals.bytes = totals.bytes.saturating_add(len);
                    state.insert(KEY, &totals.encode()[..])?;
                }
                Ok(())
            })
            .map_err(|e| match e {
                TransactionError::Abort(e) => e,
                TransactionError::Storage(e) => StoreError::Sled(e),
            })
    }

    /// Makes the totals record if the store has none (a store from before it, or a new one):
    /// one walk of the blobs, at the first open only. Returns whether it walked.
    pub(super) fn ensure_blob_totals(&self) -> Result<bool, StoreError> {
        if self.state.contains_key(KEY)? {
            return Ok(false);
        }
        let mut totals = BlobTotals::default();
        for entry in self.blobs.iter() {
            let (k, v) = entry?;
            let Ok(id) = <[u8; 32]>::try_from(k.as_ref()) else {
                continue;
            };
            let meta: BlobMeta = serde_cbor::from_slice(&v).map_err(decode_err("blob meta"))?;
            totals.digest.insert(&ContentId::from_bytes(id));
            totals.bytes = totals.bytes.saturating_add(meta.len);
        }
        // Only if still absent: nothing else writes before the store is handed out, but a
        // record that appeared meanwhile is the one kept up to date.
        let _ = self
            .state
            .compare_and_swap(KEY, None::<&[u8]>, Some(&totals.encode()[..]))?;
        Ok(true)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::store::temp_store;

    async fn add(store: &Store, data: &[u8]) -> [u8; 32] {
        let mut w = store.blob_writer(None).unwrap();
        w.write(data).unwrap();
        w.finish().await.unwrap().0
    }

    #[tokio::test]
    async fn every_add_is_counted_once_in_the_totals() {
        let (_dir, store) = temp_store();
        assert_eq!(store.blob_totals().unwrap(), BlobTotals::default());
        let a = add(&store, b"one").await;
        let b = add(&store, &[9u8; 1000]).await;
        // The same content again is the same blob.
        add(&store, b"one").await;
        let totals = store.blob_totals().unwrap();
        assert_eq!(totals.bytes, 1003);
        assert_eq!(
            totals.digest,
            BlobSetDigest::of(&[ContentId::from_bytes(a), ContentId::from_bytes(b)])
        );
        assert_eq!(store.blob_count(), 2);
    }

    #[tokio::test]
    async fn a_store_without_the_record_gets_it_from_its_blobs_at_open() {
        let (dir, store) = temp_store();
        let a = add(&store, b"before the record").await;
        // As a store written before the record existed.
        store.state.remove(KEY).unwrap();
        store.flush().await.unwrap();
        drop(store);
        let store = Store::open(&dir.path().join("db"), 8 << 20).unwrap();
        let totals = store.blob_totals().unwrap();
        assert_eq!(
            totals.digest,
            BlobSetDigest::of(&[ContentId::from_bytes(a)])
        );
        assert_eq!(totals.bytes, 17);
        assert!(!store.ensure_blob_totals().unwrap(), "made once");
    }

    #[test]
    fn a_damaged_record_is_an_error_not_a_guess() {
        let (_dir, store) = temp_store();
        store.state.insert(KEY, &b"short"[..]).unwrap();
        assert!(matches!(
            store.blob_totals(),
            Err(StoreError::Corrupt { .. })
        ));
    }
}
