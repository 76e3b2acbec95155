//! Content-addressed immutable objects (signed certificates and other small canonical CBOR).

use sha2::{Digest, Sha256};

use super::{Store, StoreError};

/// An object id and its bytes.
pub type StoredObject = ([u8; 32], Vec<u8>);

impl Store {
    /// Stores `bytes` under their SHA-256 and returns the id. Idempotent.
    pub fn put_object(&self, bytes: &[u8]) -> Result<[u8; 32], StoreError> {
        let id: [u8; 32] = Sha256::digest(bytes).into();
        self.objects.insert(id, bytes)?;
        Ok(id)
    }

    /// Reads an object and verifies its bytes against the id.
    pub fn object(&self, id: &[u8; 32]) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(bytes) = self.objects.get(id)? else {
            return Ok(None);
        };
        let actual: [u8; 32] = Sha256::digest(&bytes).into();
        if &actual != id {
            return Err(StoreError::Corrupt {
                id: hex::encode(id),
            });
        }
        Ok(Some(bytes.to_vec()))
    }

    /// Every stored object, verified.
    pub fn objects(&self) -> Result<Vec<StoredObject>, StoreError> {
        let mut out = Vec::new();
        for entry in self.objects.iter() {
            let (k, v) = entry?;
            let Ok(id) = <[u8; 32]>::try_from(k.as_ref()) else {
                continue;
            };
            let actual: [u8; 32] = Sha256::digest(&v).into();
            if actual != id {
                tracing::warn!(id = %hex::encode(id), "skipping corrupt object");
                continue;
            }
            out.push((id, v.to_vec()));
        }
        Ok(out)
    }

    /// Whether an object is stored.
    pub fn has_object(&self, id: &[u8; 32]) -> Result<bool, StoreError> {
        Ok(self.objects.contains_key(id)?)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use crate::store::temp_store;

    #[test]
    fn objects_are_verified_on_read() {
        let (_dir, store) = temp_store();
        let id = store.put_object(b"hello").unwrap();
        assert_eq!(store.object(&id).unwrap().unwrap(), b"hello");
        // Corrupt the stored bytes behind the store's back.
        store.objects.insert(id, b"hellp".as_slice()).unwrap();
        assert!(matches!(
            store.object(&id),
            Err(crate::store::StoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn objects_are_addressed_by_their_hash_and_stored_once() {
        use sha2::{Digest, Sha256};
        let (_dir, store) = temp_store();
        let id = store.put_object(b"cert").unwrap();
        assert_eq!(id, <[u8; 32]>::from(Sha256::digest(b"cert")));
        assert_eq!(store.put_object(b"cert").unwrap(), id, "idempotent");
        assert_eq!(store.objects().unwrap().len(), 1);
        assert!(store.has_object(&id).unwrap());
        assert!(!store.has_object(&[0; 32]).unwrap());
        assert_eq!(store.object(&[0; 32]).unwrap(), None);
    }

    #[test]
    fn listing_skips_corrupt_objects_and_keeps_the_rest() {
        let (_dir, store) = temp_store();
        let good = store.put_object(b"good").unwrap();
        let bad = store.put_object(b"bad").unwrap();
        store.objects.insert(bad, b"tampered".as_slice()).unwrap();
        // A key that is not an id at all.
        store.objects.insert(b"short", b"x".as_slice()).unwrap();
        let all = store.objects().unwrap();
        assert_eq!(all, vec![(good, b"good".to_vec())]);
    }
}
