//! Document identifiers: 16 bytes, shown as 32 lowercase hex characters.
//!
//! Ordinary documents get a random id (the caller passes the random bytes in). Three singleton
//! documents have fixed, well-known ids so that every device of a person shares them without any
//! coordination: [`DocId::MEMORY`], [`DocId::SCHEDULES`] and [`DocId::SETTINGS`].

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::kind::DocKind;

/// Length of a [`DocId`] in bytes.
pub const DOC_ID_LEN: usize = 16;

/// The identifier of a versioned document (an Automerge document).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DocId([u8; DOC_ID_LEN]);

/// Why a string or byte slice is not a [`DocId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseDocIdError {
    /// The input does not have the right length.
    #[error("a document id is {expected} {unit}, got {found}")]
    BadLength {
        /// Expected length.
        expected: usize,
        /// `"hex characters"` or `"bytes"`.
        unit: &'static str,
        /// Length found.
        found: usize,
    },
    /// The string contains a character that is not a hex digit.
    #[error("a document id is hex, found a non-hex character")]
    NotHex,
}

impl DocId {
    /// The person's memory document (CLAUDE.md-style text), shared by all devices.
    pub const MEMORY: DocId = DocId::well_known_byte(0x01);
    /// The schedules document, shared by all devices.
    pub const SCHEDULES: DocId = DocId::well_known_byte(0x02);
    /// The settings document, shared by all devices.
    pub const SETTINGS: DocId = DocId::well_known_byte(0x03);

    const fn well_known_byte(b: u8) -> DocId {
        let mut bytes = [0u8; DOC_ID_LEN];
        bytes[DOC_ID_LEN - 1] = b;
        DocId(bytes)
    }

    /// Wraps 16 bytes. For a new document pass 16 random bytes.
    pub const fn from_bytes(bytes: [u8; DOC_ID_LEN]) -> DocId {
        DocId(bytes)
    }

    /// Reads a document id from a byte slice of exactly 16 bytes.
    pub fn from_slice(bytes: &[u8]) -> Result<DocId, ParseDocIdError> {
        let arr: [u8; DOC_ID_LEN] = bytes.try_into().map_err(|_| ParseDocIdError::BadLength {
            expected: DOC_ID_LEN,
            unit: "bytes",
            found: bytes.len(),
        })?;
        Ok(DocId(arr))
    }

    /// The 16 bytes.
    pub const fn as_bytes(&self) -> &[u8; DOC_ID_LEN] {
        &self.0
    }

    /// The inventory bucket of this id (its first byte).
    pub const fn bucket(&self) -> u8 {
        self.0[0]
    }

    /// The well-known id of a singleton kind (`Memory`, `Schedules`, `Settings`), if any.
    pub const fn well_known(kind: DocKind) -> Option<DocId> {
        match kind {
            DocKind::Memory => Some(DocId::MEMORY),
            DocKind::Schedules => Some(DocId::SCHEDULES),
            DocKind::Settings => Some(DocId::SETTINGS),
            DocKind::Conversation | DocKind::Generic => None,
        }
    }

    /// The kind of a well-known id, or `None` for an ordinary (random) id.
    pub fn well_known_kind(&self) -> Option<DocKind> {
        match *self {
            DocId::MEMORY => Some(DocKind::Memory),
            DocId::SCHEDULES => Some(DocKind::Schedules),
            DocId::SETTINGS => Some(DocKind::Settings),
            _ => None,
        }
    }
}

impl fmt::Display for DocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for DocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DocId({self})")
    }
}

impl FromStr for DocId {
    type Err = ParseDocIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != DOC_ID_LEN * 2 {
            return Err(ParseDocIdError::BadLength {
                expected: DOC_ID_LEN * 2,
                unit: "hex characters",
                found: s.len(),
            });
        }
        let mut out = [0u8; DOC_ID_LEN];
        hex::decode_to_slice(s, &mut out).map_err(|_| ParseDocIdError::NotHex)?;
        Ok(DocId(out))
    }
}

impl Serialize for DocId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for DocId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_bytes(DocIdVisitor)
    }
}

struct DocIdVisitor;

impl<'de> serde::de::Visitor<'de> for DocIdVisitor {
    type Value = DocId;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("16 bytes")
    }

    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<DocId, E> {
        DocId::from_slice(v).map_err(E::custom)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<DocId, A::Error> {
        let mut out = [0u8; DOC_ID_LEN];
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = seq
                .next_element()?
                .ok_or_else(|| serde::de::Error::invalid_length(i, &self))?;
        }
        if seq.next_element::<u8>()?.is_some() {
            return Err(serde::de::Error::invalid_length(DOC_ID_LEN + 1, &self));
        }
        Ok(DocId(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_parse_round_trip() {
        let id = DocId::from_bytes([0xab; 16]);
        let s = id.to_string();
        assert_eq!(s, "ab".repeat(16));
        assert_eq!(s.parse::<DocId>(), Ok(id));
        assert_eq!("AB".repeat(16).parse::<DocId>(), Ok(id));
    }

    #[test]
    fn parse_rejects_bad_input() {
        assert!(matches!(
            "abc".parse::<DocId>(),
            Err(ParseDocIdError::BadLength { .. })
        ));
        assert_eq!(
            "zz".repeat(16).parse::<DocId>(),
            Err(ParseDocIdError::NotHex)
        );
        // Multi-byte characters must not panic.
        assert!("é".repeat(16).parse::<DocId>().is_err());
    }

    #[test]
    fn well_known_ids_are_fixed() {
        assert_eq!(
            DocId::MEMORY.to_string(),
            "00000000000000000000000000000001"
        );
        assert_eq!(DocId::SCHEDULES.well_known_kind(), Some(DocKind::Schedules));
        assert_eq!(DocId::well_known(DocKind::Settings), Some(DocId::SETTINGS));
        assert_eq!(DocId::from_bytes([7; 16]).well_known_kind(), None);
    }

    #[test]
    fn serde_as_cbor_bytes() {
        let id = DocId::from_bytes([9; 16]);
        let bytes = serde_cbor::to_vec(&id).expect("encode");
        // 0x50 = CBOR byte string of length 16.
        assert_eq!(bytes[0], 0x50);
        assert_eq!(serde_cbor::from_slice::<DocId>(&bytes).expect("decode"), id);
        assert!(serde_cbor::from_slice::<DocId>(&[0x43, 1, 2, 3]).is_err());
        let json = serde_json::to_string(&id).expect("json");
        assert_eq!(serde_json::from_str::<DocId>(&json).expect("json back"), id);
    }
}
