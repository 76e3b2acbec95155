//! Messages of the trusted-peer protocols: `/iom/sync/1` (trust exchange, inventory, Automerge
//! sync, live push, blob announcements), `/iom/blob/1` (chunked blob transfer) and
//! `/iom/agent/1` (requests to the agent). Each message is one frame ([`crate::frame`]) of
//! plain (not canonical) CBOR. Decoding never panics; a peer that sends an undecodable or
//! out-of-bounds message is disconnected by the node.

use serde::{Deserialize, Serialize};

use crate::blobset::BlobSetDigest;
use crate::cert::Certificate;
use crate::frame::{self, DecodeError, EncodeError};
use crate::id::ContentId;
use crate::keys::PersonId;

/// Largest frame on `/iom/sync/1`.
pub const MAX_SYNC_FRAME: usize = 8 * 1024 * 1024;
/// Largest frame on `/iom/blob/1` (a chunk plus framing).
pub const MAX_BLOB_FRAME: usize = 1024 * 1024;
/// Largest frame on `/iom/agent/1`.
pub const MAX_AGENT_FRAME: usize = 1024 * 1024;
/// Most blob announcements in one message.
pub const MAX_BLOB_ANNOUNCE: usize = 4096;
/// Most documents in one [`SyncMsg::Snapshots`] message.
pub const MAX_SNAPSHOTS: usize = 1024;
/// Most addresses announced per peer.
pub const MAX_PEER_ADDRS: usize = 16;
/// Version of the sync protocol spoken by this build.
pub const SYNC_VERSION: u8 = 1;

/// A message on `/iom/sync/1`. The initiator sends `Hello` first; the responder answers with
/// its own `Hello` or `Refused`. Then either side may send any other message at any time.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[non_exhaustive]
pub enum SyncMsg {
    /// Who I am: my person and the certificates that make me trusted.
    Hello {
        /// Protocol version.
        version: u8,
        /// The sender's person.
        person: PersonId,
        /// The sender's certificate chain.
        chain: Vec<Certificate>,
        /// The digest of the blobs the sender holds, when the session opens. When both sides'
        /// digests are equal, neither announces its blobs ([`SyncMsg::Blobs`]); a peer that
        /// sends none (built before the digest) gets and sends every announcement. Optional
        /// and skipped when absent, so both shapes decode on builds before and after it:
        /// older builds ignore the field.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        blobs: Option<BlobSetDigest>,
    },
    /// The session is refused (the reason is for logs and users).
    Refused {
        /// Why.
        reason: String,
    },
    /// Certificates the receiver may not have (the whole set after `Hello`, then new ones).
    Certs {
        /// The certificates.
        certs: Vec<Certificate>,
    },
    /// Addresses of other trusted devices the sender is connected to, so the mesh can connect
    /// directly.
    Addrs {
        /// One entry per peer.
        peers: Vec<PeerAddrs>,
    },
    /// The root of the sender's document inventory.
    Root {
        /// Root digest.
        #[serde(with = "crate::cbor::bytes")]
        root: [u8; 32],
    },
    /// All 256 bucket digests, concatenated (8 KiB), sent when roots differ.
    Buckets {
        /// 256 × 32 bytes.
        #[serde(with = "crate::cbor::bytes")]
        digests: Vec<u8>,
    },
    /// The sender's entries for buckets that differ: `(doc id, heads digest)` pairs,
    /// concatenated as 16 + 32 byte records.
    Entries {
        /// Bucket numbers covered (so an empty bucket on the sender's side is explicit).
        #[serde(with = "crate::cbor::bytes")]
        buckets: Vec<u8>,
        /// 48-byte records.
        #[serde(with = "crate::cbor::bytes")]
        records: Vec<u8>,
    },
    /// One Automerge sync message for one document.
    Doc {
        /// Document id.
        #[serde(with = "crate::cbor::bytes")]
        doc: [u8; 16],
        /// Encoded `automerge::sync::Message`.
        #[serde(with = "crate::cbor::bytes")]
        msg: Vec<u8>,
    },
    /// Whole documents the receiver does not have at all (its inventory entries showed it),
    /// sent instead of running the Automerge sync rounds for each: the bytes are the sender's
    /// stored chunks (a saved document, possibly followed by incremental saves), which the
    /// receiver loads, verifying every change hash.
    Snapshots {
        /// At most [`MAX_SNAPSHOTS`] documents.
        docs: Vec<DocSnapshot>,
    },
    /// Blobs the sender holds: `(id, length)`.
    Blobs {
        /// Announced blobs.
        have: Vec<(ContentId, u64)>,
    },
}

impl SyncMsg {
    /// Encodes as a frame payload.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        frame::encode_message(self)
    }

    /// Decodes a frame payload and checks its bounds.
    pub fn decode(payload: &[u8]) -> Result<SyncMsg, DecodeError> {
        let msg: SyncMsg = frame::decode_message(payload)?;
        let bad = |m: String| Err(DecodeError::Malformed(m));
        match &msg {
            SyncMsg::Buckets { digests } if digests.len() != 256 * 32 => bad(format!(
                "bucket digests are {} bytes, expected 8192",
                digests.len()
            )),
            SyncMsg::Entries { records, .. } if records.len() % 48 != 0 => {
                bad("entry records are not 48-byte aligned".into())
            }
            SyncMsg::Snapshots { docs } if docs.len() > MAX_SNAPSHOTS => bad(format!(
                "{} document snapshots in one message, at most {MAX_SNAPSHOTS}",
                docs.len()
            )),
            SyncMsg::Blobs { have } if have.len() > MAX_BLOB_ANNOUNCE => bad(format!(
                "{} blob announcements, at most {MAX_BLOB_ANNOUNCE}",
                have.len()
            )),
            SyncMsg::Addrs { peers } if peers.iter().any(|p| p.addrs.len() > MAX_PEER_ADDRS) => {
                bad("too many addresses for one peer".into())
            }
            SyncMsg::Certs { certs } | SyncMsg::Hello { chain: certs, .. }
                if certs.len() > crate::pair::MAX_TRUST_SET =>
            {
                bad(format!("{} certificates, too many", certs.len()))
            }
            _ => Ok(msg),
        }
    }
}

/// One whole document in [`SyncMsg::Snapshots`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DocSnapshot {
    /// Document id.
    #[serde(with = "crate::cbor::bytes")]
    pub doc: [u8; 16],
    /// The document's bytes, loadable with `automerge::Automerge::load`.
    #[serde(with = "crate::cbor::bytes")]
    pub bytes: Vec<u8>,
}

/// Addresses of one peer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerAddrs {
    /// The peer id (libp2p multihash bytes).
    #[serde(with = "crate::cbor::bytes")]
    pub peer: Vec<u8>,
    /// Multiaddr strings.
    pub addrs: Vec<String>,
}

/// A request on `/iom/blob/1`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[non_exhaustive]
pub enum BlobRequest {
    /// Send blob `id` starting at chunk `from_chunk` (to resume a broken transfer).
    Get {
        /// The blob.
        id: ContentId,
        /// First chunk wanted.
        from_chunk: u32,
    },
}

/// Answers on `/iom/blob/1`: `Manifest` then `Chunk`s in order, or one of the refusals.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[non_exhaustive]
pub enum BlobResponse {
    /// Size and the hash of every chunk (so each chunk can be verified as it arrives).
    Manifest {
        /// Blob length.
        len: u64,
        /// Chunk size used (the last chunk may be shorter).
        chunk_size: u32,
        /// Concatenated 32-byte chunk hashes.
        #[serde(with = "crate::cbor::bytes")]
        chunk_hashes: Vec<u8>,
    },
    /// One chunk.
    Chunk {
        /// Chunk index.
        index: u32,
        /// The bytes.
        #[serde(with = "crate::cbor::bytes")]
        bytes: Vec<u8>,
    },
    /// The sender does not hold this blob.
    NotFound,
    /// The request is refused (untrusted peer).
    Refused {
        /// Why.
        reason: String,
    },
}

/// Where a [`BlobResponse::Chunk`]'s bytes lie in its frame payload (see
/// [`BlobResponse::chunk_span`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkSpan {
    /// Chunk index.
    pub index: u32,
    /// The chunk's bytes, as a range of the payload.
    pub bytes: std::ops::Range<usize>,
}

impl BlobResponse {
    /// Encodes as a frame payload.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        frame::encode_message(self)
    }

    /// The start of the encoding of a `Chunk` of `len` bytes, up to where its bytes begin: a
    /// sender writes this and then the bytes from wherever they are, instead of copying them
    /// into one encoded message first. The two together are exactly what
    /// [`BlobResponse::encode`] gives.
    pub fn chunk_prefix(index: u32, len: usize) -> Result<Vec<u8>, EncodeError> {
        let mut out = BlobResponse::Chunk {
            index,
            bytes: Vec::new(),
        }
        .encode()?;
        // The bytes are the last field, so the encoding ends with the head of an empty byte
        // string; it becomes the head of one of `len` bytes.
        if out.pop() != Some(cbor_bytes_head(0)[0]) {
            return Err(EncodeError("a chunk no longer ends with its bytes".into()));
        }
        let head = cbor_bytes_head(len as u64);
        out.extend_from_slice(&head[..cbor_head_len(len as u64)]);
        Ok(out)
    }

    /// If `payload` is a `Chunk`, its index and where its bytes lie in `payload`, found without
    /// copying them: a receiver keeps the frame's buffer as the chunk (copying 256 KiB out of
    /// every frame, into a fresh allocation, was a tenth of a receiving node's CPU). `None`
    /// for any other response, or one that does not decode: [`BlobResponse::decode`] then
    /// says what it is.
    pub fn chunk_span(payload: &[u8]) -> Option<ChunkSpan> {
        #[derive(Deserialize)]
        enum Borrowed<'a> {
            Chunk {
                index: u32,
                #[serde(borrow)]
                bytes: &'a [u8],
            },
        }
        let Borrowed::Chunk { index, bytes } = serde_cbor::from_slice(payload).ok()?;
        let start = (bytes.as_ptr() as usize).checked_sub(payload.as_ptr() as usize)?;
        let end = start.checked_add(bytes.len())?;
        (end <= payload.len()).then_some(ChunkSpan {
            index,
            bytes: start..end,
        })
    }

    /// Decodes a frame payload and checks its bounds.
    pub fn decode(payload: &[u8]) -> Result<BlobResponse, DecodeError> {
        let msg: BlobResponse = frame::decode_message(payload)?;
        match &msg {
            BlobResponse::Manifest { chunk_hashes, .. } if chunk_hashes.len() % 32 != 0 => Err(
                DecodeError::Malformed("chunk hashes are not 32-byte aligned".into()),
            ),
            _ => Ok(msg),
        }
    }
}

/// The CBOR head of a byte string of `n` bytes (major type 2), in its shortest form: the first
/// [`cbor_head_len`] bytes of the array.
fn cbor_bytes_head(n: u64) -> [u8; 9] {
    const BYTES: u8 = 2 << 5;
    let mut head = [0u8; 9];
    let be = n.to_be_bytes();
    match cbor_head_len(n) {
        1 => head[0] = BYTES | be[7],
        2 => {
            head[0] = BYTES | 24;
            head[1] = be[7];
        }
        3 => {
            head[0] = BYTES | 25;
            head[1..3].copy_from_slice(&be[6..]);
        }
        5 => {
            head[0] = BYTES | 26;
            head[1..5].copy_from_slice(&be[4..]);
        }
        _ => {
            head[0] = BYTES | 27;
            head[1..].copy_from_slice(&be);
        }
    }
    head
}

/// How many bytes the CBOR head of `n` takes.
fn cbor_head_len(n: u64) -> usize {
    match n {
        0..24 => 1,
        24..0x100 => 2,
        0x100..0x1_0000 => 3,
        0x1_0000..0x1_0000_0000 => 5,
        _ => 9,
    }
}

/// A request on `/iom/agent/1`: a device tells the agent that a conversation has a new
/// request, so it runs at once rather than when the document arrives by sync.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[non_exhaustive]
pub enum AgentRequest {
    /// A new request is waiting in a conversation.
    Notify {
        /// Conversation document id.
        #[serde(with = "crate::cbor::bytes")]
        doc: [u8; 16],
        /// The request id.
        request_id: String,
    },
}

/// The agent's answer on `/iom/agent/1`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[non_exhaustive]
pub enum AgentResponse {
    /// This device holds the agent role and will run the request.
    Accepted {
        /// Requests waiting or running on the agent.
        queued: u32,
    },
    /// This device does not hold the agent role (any more).
    NotAgent,
    /// The request is refused (untrusted peer).
    Refused {
        /// Why.
        reason: String,
    },
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// `Hello` as builds before the blob-set digest define it.
    #[derive(Debug, Serialize, Deserialize)]
    enum OldSyncMsg {
        Hello {
            version: u8,
            person: PersonId,
            chain: Vec<Certificate>,
        },
    }

    #[test]
    fn a_hello_with_a_blob_digest_decodes_on_older_builds_and_theirs_here() {
        let person = crate::keys::PersonKey::from_seed([1; 32]).id();
        let digest = BlobSetDigest::of(&[ContentId::of(b"x")]);
        let new = |blobs| SyncMsg::Hello {
            version: SYNC_VERSION,
            person,
            chain: Vec::new(),
            blobs,
        };
        // Ours, read by an older build: the digest is ignored.
        let old: OldSyncMsg = frame::decode_message(&new(Some(digest)).encode().unwrap()).unwrap();
        let OldSyncMsg::Hello { version, .. } = old;
        assert_eq!(version, SYNC_VERSION);
        // Without a digest, ours is byte for byte what an older build sends.
        let theirs = OldSyncMsg::Hello {
            version: SYNC_VERSION,
            person,
            chain: Vec::new(),
        };
        let theirs = frame::encode_message(&theirs).unwrap();
        assert_eq!(new(None).encode().unwrap(), theirs);
        // Theirs, read here: no digest.
        assert!(matches!(
            SyncMsg::decode(&theirs).unwrap(),
            SyncMsg::Hello { blobs: None, .. }
        ));
        // Ours, read here: the digest.
        assert!(matches!(
            SyncMsg::decode(&new(Some(digest)).encode().unwrap()).unwrap(),
            SyncMsg::Hello { blobs: Some(d), .. } if d == digest
        ));
    }

    #[test]
    fn garbage_never_panics() {
        for len in 0..64 {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let _ = SyncMsg::decode(&bytes);
            let _ = BlobResponse::decode(&bytes);
            let _ = BlobResponse::chunk_span(&bytes);
        }
    }

    #[test]
    fn a_chunk_is_found_in_its_frame_and_other_responses_are_not_chunks() {
        let bytes: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        let frame = BlobResponse::Chunk {
            index: 7,
            bytes: bytes.clone(),
        }
        .encode()
        .unwrap();
        let span = BlobResponse::chunk_span(&frame).unwrap();
        assert_eq!(span.index, 7);
        assert_eq!(&frame[span.bytes.clone()], &bytes[..]);
        assert_eq!(
            span.bytes.end,
            frame.len(),
            "the bytes are the frame's tail"
        );
        for other in [
            BlobResponse::NotFound,
            BlobResponse::Refused {
                reason: "no".into(),
            },
            BlobResponse::Manifest {
                len: 1,
                chunk_size: 1,
                chunk_hashes: vec![0; 32],
            },
        ] {
            assert_eq!(BlobResponse::chunk_span(&other.encode().unwrap()), None);
        }
        // Cut short: not a chunk (decode then names the fault).
        assert_eq!(BlobResponse::chunk_span(&frame[..frame.len() - 1]), None);
        assert!(BlobResponse::decode(&frame[..frame.len() - 1]).is_err());
    }

    #[test]
    fn a_chunk_prefix_and_its_bytes_are_the_chunks_encoding() {
        let edges = [0usize, 1, 23, 24, 255, 256, 65_535, 65_536, 262_144];
        for index in [0u32, 23, 24, 255, 256, 65_536, u32::MAX] {
            for len in edges {
                let bytes: Vec<u8> = (0..len).map(|i| i as u8).collect();
                let whole = BlobResponse::Chunk {
                    index,
                    bytes: bytes.clone(),
                }
                .encode()
                .unwrap();
                let mut parts = BlobResponse::chunk_prefix(index, len).unwrap();
                parts.extend_from_slice(&bytes);
                assert_eq!(parts, whole, "index {index}, {len} bytes");
            }
        }
        assert_eq!(
            &cbor_bytes_head(u64::MAX)[..cbor_head_len(u64::MAX)],
            &[0x5b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]
        );
        assert_eq!(&cbor_bytes_head(1 << 32)[..5], &[0x5b, 0, 0, 0, 1]);
    }

    #[test]
    fn bounds_are_checked() {
        let m = SyncMsg::Buckets {
            digests: vec![0; 10],
        };
        assert!(SyncMsg::decode(&m.encode().unwrap()).is_err());
        let m = SyncMsg::Doc {
            doc: [1; 16],
            msg: vec![1, 2, 3],
        };
        assert!(matches!(
            SyncMsg::decode(&m.encode().unwrap()).unwrap(),
            SyncMsg::Doc { .. }
        ));
        let snapshot = |i: usize| DocSnapshot {
            doc: [i as u8; 16],
            bytes: vec![0x85, 0x6f],
        };
        let m = SyncMsg::Snapshots {
            docs: (0..MAX_SNAPSHOTS).map(snapshot).collect(),
        };
        assert!(SyncMsg::decode(&m.encode().unwrap()).is_ok());
        let m = SyncMsg::Snapshots {
            docs: (0..=MAX_SNAPSHOTS).map(snapshot).collect(),
        };
        assert!(SyncMsg::decode(&m.encode().unwrap()).is_err());
    }
}
