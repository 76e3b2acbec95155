//! A cheap, hierarchical digest of many documents' heads, to find what differs on reconnect.
//!
//! Three levels:
//!
//! 1. [`Inventory::root`]: one hash over everything. Equal roots mean nothing to sync.
//! 2. [`Inventory::bucket_hashes`]: 256 bucket hashes, bucket = first byte of the [`DocId`].
//!    [`diff_buckets`] names the buckets that differ.
//! 3. [`Inventory::entries_in`]: `(DocId, heads digest)` pairs of one bucket.
//!    [`diff_entries`] names the documents to run Automerge sync for.
//!
//! A bucket hash is the XOR of `SHA-256(tag || doc id || heads digest)` over its documents, so it
//! does not depend on insertion order and [`Inventory::update`] costs O(log n), not a rehash of
//! the store. An empty bucket hashes to 32 zero bytes.

use std::collections::BTreeMap;

use automerge::ChangeHash;
use sha2::{Digest, Sha256};

use crate::doc_id::{DOC_ID_LEN, DocId};

/// Number of buckets (one per value of a doc id's first byte).
pub const BUCKETS: usize = 256;

/// A 32-byte digest.
pub type Digest32 = [u8; 32];

const LEAF_TAG: &[u8] = b"iom/inventory/leaf/v1";
const ROOT_TAG: &[u8] = b"iom/inventory/root/v1";
const HEADS_TAG: &[u8] = b"iom/inventory/heads/v1";

/// Digest of a document's heads (order-independent: the heads are sorted first).
pub fn heads_digest(heads: &[ChangeHash]) -> Digest32 {
    let mut sorted: Vec<&ChangeHash> = heads.iter().collect();
    sorted.sort_unstable();
    sorted.dedup();
    let mut h = Sha256::new();
    h.update(HEADS_TAG);
    for head in sorted {
        h.update(head.0);
    }
    h.finalize().into()
}

fn leaf(doc: &DocId, digest: &Digest32) -> Digest32 {
    let mut h = Sha256::new();
    h.update(LEAF_TAG);
    h.update(doc.as_bytes());
    h.update(digest);
    h.finalize().into()
}

fn xor_into(acc: &mut Digest32, x: &Digest32) {
    for (a, b) in acc.iter_mut().zip(x) {
        *a ^= b;
    }
}

/// The digest set of one node's documents.
#[derive(Debug, Clone)]
pub struct Inventory {
    docs: BTreeMap<DocId, Digest32>,
    buckets: Box<[Digest32; BUCKETS]>,
}

impl Default for Inventory {
    fn default() -> Self {
        Inventory {
            docs: BTreeMap::new(),
            buckets: Box::new([[0u8; 32]; BUCKETS]),
        }
    }
}

impl Inventory {
    /// An empty inventory.
    pub fn new() -> Inventory {
        Inventory::default()
    }

    /// Builds an inventory from `(doc, heads)` pairs (later pairs for the same doc win).
    pub fn from_heads<'a, I>(docs: I) -> Inventory
    where
        I: IntoIterator<Item = (DocId, &'a [ChangeHash])>,
    {
        let mut inv = Inventory::new();
        for (doc, heads) in docs {
            inv.update(doc, heads);
        }
        inv
    }

    /// Records a document's current heads.
    pub fn update(&mut self, doc: DocId, heads: &[ChangeHash]) {
        self.update_digest(doc, heads_digest(heads));
    }

    /// Records a document's heads digest (from [`heads_digest`]).
    pub fn update_digest(&mut self, doc: DocId, digest: Digest32) {
        let bucket = &mut self.buckets[usize::from(doc.bucket())];
        if let Some(old) = self.docs.insert(doc, digest) {
            xor_into(bucket, &leaf(&doc, &old));
        }
        xor_into(bucket, &leaf(&doc, &digest));
    }

    /// Forgets a document. Returns `true` if it was present.
    pub fn remove(&mut self, doc: &DocId) -> bool {
        match self.docs.remove(doc) {
            Some(old) => {
                xor_into(
                    &mut self.buckets[usize::from(doc.bucket())],
                    &leaf(doc, &old),
                );
                true
            }
            None => false,
        }
    }

    /// Number of documents.
    pub fn len(&self) -> usize {
        self.docs.len()
    }

    /// True if no documents are recorded.
    pub fn is_empty(&self) -> bool {
        self.docs.is_empty()
    }

    /// The heads digest recorded for `doc`.
    pub fn digest_of(&self, doc: &DocId) -> Option<Digest32> {
        self.docs.get(doc).copied()
    }

    /// One hash over all 256 bucket hashes.
    pub fn root(&self) -> Digest32 {
        let mut h = Sha256::new();
        h.update(ROOT_TAG);
        for b in self.buckets.iter() {
            h.update(b);
        }
        h.finalize().into()
    }

    /// The 256 bucket hashes, indexed by bucket.
    pub fn bucket_hashes(&self) -> Vec<Digest32> {
        self.buckets.to_vec()
    }

    /// The `(doc, heads digest)` pairs of one bucket, sorted by doc id.
    pub fn entries_in(&self, bucket: u8) -> Vec<(DocId, Digest32)> {
        let lo = DocId::from_bytes(bucket_bound(bucket, 0x00));
        let hi = DocId::from_bytes(bucket_bound(bucket, 0xff));
        self.docs.range(lo..=hi).map(|(d, h)| (*d, *h)).collect()
    }

    /// Every `(doc, heads digest)` pair, sorted by doc id.
    pub fn entries(&self) -> impl Iterator<Item = (DocId, Digest32)> + '_ {
        self.docs.iter().map(|(d, h)| (*d, *h))
    }
}

fn bucket_bound(bucket: u8, fill: u8) -> [u8; DOC_ID_LEN] {
    let mut b = [fill; DOC_ID_LEN];
    b[0] = bucket;
    b
}

/// The buckets whose hashes differ. A missing entry on either side (a short or malformed list
/// from a peer) counts as an empty bucket.
pub fn diff_buckets(ours: &[Digest32], theirs: &[Digest32]) -> Vec<u8> {
    const EMPTY: Digest32 = [0u8; 32];
    (0..=u8::MAX)
        .filter(|&b| {
            let i = usize::from(b);
            ours.get(i).unwrap_or(&EMPTY) != theirs.get(i).unwrap_or(&EMPTY)
        })
        .collect()
}

/// The documents whose heads digest differs, or that only one side has (sorted, unique).
pub fn diff_entries(ours: &[(DocId, Digest32)], theirs: &[(DocId, Digest32)]) -> Vec<DocId> {
    let a: BTreeMap<DocId, Digest32> = ours.iter().copied().collect();
    let b: BTreeMap<DocId, Digest32> = theirs.iter().copied().collect();
    let mut out: Vec<DocId> = a
        .iter()
        .filter(|(d, h)| b.get(d) != Some(h))
        .map(|(d, _)| *d)
        .chain(b.keys().filter(|d| !a.contains_key(d)).copied())
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u32) -> DocId {
        // Spread ids over buckets deterministically.
        let h: [u8; 32] = Sha256::digest(n.to_le_bytes()).into();
        let mut b = [0u8; 16];
        b.copy_from_slice(&h[..16]);
        DocId::from_bytes(b)
    }

    fn head(n: u32) -> ChangeHash {
        ChangeHash(Sha256::digest(format!("head{n}")).into())
    }

    #[test]
    fn order_independent() {
        let pairs: Vec<(DocId, Vec<ChangeHash>)> = (0..200)
            .map(|n| (id(n), vec![head(n), head(n + 1000)]))
            .collect();
        let a = Inventory::from_heads(pairs.iter().map(|(d, h)| (*d, h.as_slice())));
        let b = Inventory::from_heads(pairs.iter().rev().map(|(d, h)| {
            // Head order inside a doc does not matter either.
            (*d, h.as_slice())
        }));
        let mut c = Inventory::new();
        for (d, h) in pairs.iter().rev() {
            let mut h = h.clone();
            h.reverse();
            c.update(*d, &h);
        }
        assert_eq!(a.root(), b.root());
        assert_eq!(a.root(), c.root());
        assert_eq!(a.bucket_hashes(), c.bucket_hashes());
        assert_eq!(a.len(), 200);
    }

    #[test]
    fn incremental_update_matches_rebuild_and_finds_the_difference() {
        let n = 10_000;
        let pairs: Vec<(DocId, [ChangeHash; 1])> = (0..n).map(|i| (id(i), [head(i)])).collect();
        let mut inv = Inventory::from_heads(pairs.iter().map(|(d, h)| (*d, &h[..])));
        let before = inv.clone();
        // Change one doc, remove another, add a third.
        inv.update(id(7), &[head(99_999)]);
        assert!(inv.remove(&id(8)));
        assert!(!inv.remove(&id(8)));
        inv.update(id(n + 1), &[head(5)]);

        let rebuilt_pairs: Vec<(DocId, [ChangeHash; 1])> = (0..=n + 1)
            .filter(|&i| i != 8 && i != n)
            .map(|i| match i {
                7 => (id(i), [head(99_999)]),
                i if i == n + 1 => (id(i), [head(5)]),
                i => (id(i), [head(i)]),
            })
            .collect();
        let rebuilt = Inventory::from_heads(rebuilt_pairs.iter().map(|(d, h)| (*d, &h[..])));
        assert_eq!(inv.root(), rebuilt.root());
        assert_ne!(inv.root(), before.root());

        let buckets = diff_buckets(&before.bucket_hashes(), &inv.bucket_hashes());
        let mut expected = vec![id(7).bucket(), id(8).bucket(), id(n + 1).bucket()];
        expected.sort_unstable();
        expected.dedup();
        assert_eq!(buckets, expected);

        let mut docs = Vec::new();
        for b in buckets {
            docs.extend(diff_entries(&before.entries_in(b), &inv.entries_in(b)));
        }
        docs.sort_unstable();
        let mut want = vec![id(7), id(8), id(n + 1)];
        want.sort_unstable();
        assert_eq!(docs, want);
    }

    #[test]
    fn updating_back_restores_the_hash() {
        let mut inv = Inventory::new();
        let empty_root = inv.root();
        inv.update(id(1), &[head(1)]);
        inv.update(id(1), &[head(2)]);
        inv.update(id(1), &[head(1)]);
        let once = Inventory::from_heads([(id(1), &[head(1)][..])]);
        assert_eq!(inv.root(), once.root());
        assert!(inv.remove(&id(1)));
        assert_eq!(inv.root(), empty_root);
        assert!(inv.bucket_hashes().iter().all(|b| *b == [0; 32]));
    }

    #[test]
    fn entries_in_bucket_boundaries() {
        let mut inv = Inventory::new();
        let lo = DocId::from_bytes([3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let mut hb = [0xff; 16];
        hb[0] = 3;
        let hi = DocId::from_bytes(hb);
        inv.update(lo, &[head(1)]);
        inv.update(hi, &[head(2)]);
        inv.update(DocId::from_bytes([4; 16]), &[head(3)]);
        inv.update(DocId::from_bytes([2; 16]), &[head(4)]);
        let e = inv.entries_in(3);
        assert_eq!(e.iter().map(|(d, _)| *d).collect::<Vec<_>>(), vec![lo, hi]);
        assert_eq!(inv.entries_in(5), vec![]);
    }

    #[test]
    fn diff_buckets_tolerates_short_lists() {
        let inv = Inventory::from_heads([(DocId::from_bytes([9; 16]), &[head(1)][..])]);
        assert_eq!(diff_buckets(&inv.bucket_hashes(), &[]), vec![9]);
        assert_eq!(diff_buckets(&[], &[]), Vec::<u8>::new());
    }
}
