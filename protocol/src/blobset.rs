//! [`BlobSetDigest`]: a constant-size summary of a set of blob ids, kept up to date one blob
//! at a time, so that two devices can tell whether they hold the same blobs without listing
//! them. Sent in the sync `Hello` ([`crate::wire::SyncMsg::Hello`]): when both digests are
//! equal, neither side announces its blobs.
//!
//! The digest is the number of blobs and the sum, modulo 2^256, of `SHA-256(DOMAIN || id)`
//! over the ids. A sum (unlike a XOR) can be updated for an add and a removal alike, in any
//! order, and hashing the ids first keeps sets that an adversary chooses from summing alike
//! by arithmetic on the ids themselves. Equal sets always give equal digests; two different
//! sets of honest devices give equal digests with probability about 2^-256.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::id::ContentId;

/// Hashed before each id.
const DOMAIN: &[u8] = b"iom blob-set digest v1\0";

/// Bytes of [`BlobSetDigest::to_bytes`].
pub const DIGEST_LEN: usize = 40;

/// The number of blobs in a set and the sum of their hashed ids (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct BlobSetDigest {
    /// How many blobs the set holds.
    pub count: u64,
    /// The sum of the hashed ids, little-endian, modulo 2^256.
    #[serde(with = "crate::cbor::bytes")]
    pub sum: [u8; 32],
}

impl BlobSetDigest {
    /// The digest of the empty set.
    pub const EMPTY: BlobSetDigest = BlobSetDigest {
        count: 0,
        sum: [0; 32],
    };

    /// The digest of `ids` (each counted once per occurrence: pass a set).
    pub fn of<'a>(ids: impl IntoIterator<Item = &'a ContentId>) -> BlobSetDigest {
        let mut d = BlobSetDigest::EMPTY;
        for id in ids {
            d.insert(id);
        }
        d
    }

    /// Adds `id`, which the set did not hold.
    pub fn insert(&mut self, id: &ContentId) {
        self.count = self.count.wrapping_add(1);
        add(&mut self.sum, &term(id));
    }

    /// Removes `id`, which the set held.
    pub fn remove(&mut self, id: &ContentId) {
        self.count = self.count.wrapping_sub(1);
        sub(&mut self.sum, &term(id));
    }

    /// The stored form: the count (big-endian) and the sum.
    pub fn to_bytes(&self) -> [u8; DIGEST_LEN] {
        let mut out = [0u8; DIGEST_LEN];
        out[..8].copy_from_slice(&self.count.to_be_bytes());
        out[8..].copy_from_slice(&self.sum);
        out
    }

    /// Reads [`BlobSetDigest::to_bytes`]; `None` if `bytes` is not [`DIGEST_LEN`] long.
    pub fn from_bytes(bytes: &[u8]) -> Option<BlobSetDigest> {
        if bytes.len() != DIGEST_LEN {
            return None;
        }
        let mut count = [0u8; 8];
        count.copy_from_slice(&bytes[..8]);
        let mut sum = [0u8; 32];
        sum.copy_from_slice(&bytes[8..]);
        Some(BlobSetDigest {
            count: u64::from_be_bytes(count),
            sum,
        })
    }
}

/// What `id` adds to the sum.
fn term(id: &ContentId) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(DOMAIN);
    h.update(id.as_bytes());
    h.finalize().into()
}

/// `acc += x` modulo 2^256, little-endian.
fn add(acc: &mut [u8; 32], x: &[u8; 32]) {
    let mut carry = 0u16;
    for (a, b) in acc.iter_mut().zip(x) {
        let s = u16::from(*a) + u16::from(*b) + carry;
        *a = s as u8;
        carry = s >> 8;
    }
}

/// `acc -= x` modulo 2^256, little-endian.
fn sub(acc: &mut [u8; 32], x: &[u8; 32]) {
    let mut borrow = 0i16;
    for (a, b) in acc.iter_mut().zip(x) {
        let mut d = i16::from(*a) - i16::from(*b) - borrow;
        borrow = 0;
        if d < 0 {
            d += 256;
            borrow = 1;
        }
        *a = d as u8;
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn id(i: u32) -> ContentId {
        ContentId::of(&i.to_be_bytes())
    }

    #[test]
    fn the_empty_set_is_all_zero() {
        assert_eq!(BlobSetDigest::of([]), BlobSetDigest::EMPTY);
        assert_eq!(BlobSetDigest::EMPTY.to_bytes(), [0; DIGEST_LEN]);
    }

    #[test]
    fn adds_carry_across_bytes_and_removals_borrow() {
        let mut acc = [0xff; 32];
        add(&mut acc, &{
            let mut one = [0; 32];
            one[0] = 1;
            one
        });
        assert_eq!(acc, [0; 32], "2^256 - 1 + 1 wraps to 0");
        sub(&mut acc, &{
            let mut one = [0; 32];
            one[0] = 1;
            one
        });
        assert_eq!(acc, [0xff; 32], "0 - 1 wraps to 2^256 - 1");
    }

    #[test]
    fn one_blob_more_or_less_changes_the_digest() {
        let base = BlobSetDigest::of(&[id(1), id(2)]);
        assert_ne!(base, BlobSetDigest::of(&[id(1)]));
        assert_ne!(base, BlobSetDigest::of(&[id(1), id(3)]));
        assert_ne!(base, BlobSetDigest::of(&[id(1), id(2), id(3)]));
    }

    #[test]
    fn the_stored_form_round_trips_and_refuses_other_lengths() {
        let d = BlobSetDigest::of(&[id(7), id(9)]);
        assert_eq!(BlobSetDigest::from_bytes(&d.to_bytes()), Some(d));
        assert_eq!(d.to_bytes()[..8], 2u64.to_be_bytes());
        assert_eq!(BlobSetDigest::from_bytes(&[0; 39]), None);
        assert_eq!(BlobSetDigest::from_bytes(&[0; 41]), None);
    }

    proptest! {
        #[test]
        fn the_digest_depends_on_the_set_not_the_order(
            ids in proptest::collection::btree_set(any::<u32>(), 0..40),
            seed in any::<u64>(),
        ) {
            let ids: Vec<ContentId> = ids.into_iter().map(id).collect();
            let mut shuffled = ids.clone();
            // A deterministic shuffle from the seed.
            let mut s = seed;
            for i in (1..shuffled.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                shuffled.swap(i, (s >> 33) as usize % (i + 1));
            }
            prop_assert_eq!(BlobSetDigest::of(&ids), BlobSetDigest::of(&shuffled));
        }

        #[test]
        fn removing_what_was_added_gives_the_digest_back(
            base in proptest::collection::btree_set(any::<u32>(), 0..30),
            extra in proptest::collection::btree_set(any::<u32>(), 0..30),
        ) {
            let before = BlobSetDigest::of(&base.iter().copied().map(id).collect::<Vec<_>>());
            let mut d = before;
            let extra: Vec<ContentId> =
                extra.difference(&base).copied().map(id).collect();
            for e in &extra {
                d.insert(e);
            }
            prop_assert_eq!(d.count, before.count + extra.len() as u64);
            for e in extra.iter().rev() {
                d.remove(e);
            }
            prop_assert_eq!(d, before);
        }
    }
}
