//! Content ids: the SHA-256 of an immutable object's bytes.
//!
//! For structured objects (certificates) the bytes are the canonical CBOR encoding
//! ([`crate::cbor::canonical_bytes`]); for blobs they are the raw bytes. A receiver always
//! recomputes the id from what it received.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The SHA-256 of an object's bytes. Displays as 64 lowercase hex digits, serializes as a
/// 32-byte CBOR byte string, and orders bytewise.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ContentId(#[serde(with = "crate::cbor::bytes")] [u8; 32]);

impl ContentId {
    /// Hashes `bytes`.
    pub fn of(bytes: &[u8]) -> ContentId {
        ContentId(Sha256::digest(bytes).into())
    }

    /// Wraps an existing 32-byte digest.
    pub const fn from_bytes(bytes: [u8; 32]) -> ContentId {
        ContentId(bytes)
    }

    /// The 32 digest bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for ContentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for ContentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentId({self})")
    }
}

/// A string was not 64 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a content id (expected 64 hex digits): {0:?}")]
pub struct ParseContentIdError(pub String);

impl FromStr for ContentId {
    type Err = ParseContentIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| ParseContentIdError(s.to_string()))?;
        Ok(ContentId(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_abc() {
        let id = ContentId::of(b"abc");
        assert_eq!(
            id.to_string(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(id.to_string().parse::<ContentId>().unwrap(), id);
        assert_eq!(format!("{id:?}"), format!("ContentId({id})"));
    }

    #[test]
    fn parse_rejects_bad_strings() {
        assert!("".parse::<ContentId>().is_err());
        assert!("zz".repeat(32).parse::<ContentId>().is_err());
        assert!("ab".repeat(31).parse::<ContentId>().is_err());
        assert!("ab".repeat(33).parse::<ContentId>().is_err());
    }

    #[test]
    fn serializes_as_byte_string() {
        let id = ContentId::of(b"");
        let bytes = crate::cbor::canonical_bytes(&id).unwrap();
        assert_eq!(&bytes[..2], &[0x58, 0x20]);
        assert_eq!(
            crate::cbor::decode_canonical::<ContentId>(&bytes).unwrap(),
            id
        );
    }

    #[test]
    fn orders_bytewise() {
        assert!(ContentId::from_bytes([0; 32]) < ContentId::from_bytes([1; 32]));
    }
}
