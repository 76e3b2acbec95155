//! Canonical CBOR: the one encoding we hash and sign.
//!
//! Everything that gets a content id or a signature is encoded with [`canonical_bytes`]: the value
//! is first turned into a [`serde_cbor::Value`], whose `Map` is a `BTreeMap` ordered the canonical
//! way (major type, then length, then bytes: RFC 7049 §3.9, the "length-first" order of RFC 8949
//! §4.2.3; for the short text keys we use it is the same as the bytewise order of RFC 8949
//! §4.2.1), and then written out with minimal-length integers and definite lengths.
//!
//! [`decode_canonical`] accepts only bytes that re-encode to exactly themselves, so a value has
//! one and only one accepted encoding (no non-minimal integers, indefinite lengths, unsorted or
//! duplicate keys, unknown fields or trailing bytes).
//!
//! `serde_cbor` writes `Vec<u8>` and `[u8; N]` as arrays of integers; fields that hold bytes use
//! `#[serde(with = "crate::cbor::bytes")]` so they become CBOR byte strings.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Why a value could not be encoded or decoded as canonical CBOR.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CborError {
    /// The value could not be serialized (a bug on our side, not bad input).
    #[error("cannot encode value as CBOR: {0}")]
    Encode(String),
    /// The bytes are not valid CBOR for the expected type.
    #[error("malformed CBOR: {0}")]
    Decode(String),
    /// The bytes decode, but are not the canonical encoding of what they hold.
    #[error("CBOR is not in canonical form")]
    NonCanonical,
}

/// Encodes `value` as canonical CBOR (sorted map keys, minimal lengths).
pub fn canonical_bytes<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CborError> {
    let value = serde_cbor::value::to_value(value).map_err(|e| CborError::Encode(e.to_string()))?;
    serde_cbor::to_vec(&value).map_err(|e| CborError::Encode(e.to_string()))
}

/// Decodes `bytes` as a `T`, rejecting anything but the canonical encoding of that `T`.
///
/// The check is "decode, re-encode canonically, compare": it rejects non-minimal integers,
/// indefinite lengths, unsorted keys, unknown fields and trailing bytes alike.
pub fn decode_canonical<T: Serialize + DeserializeOwned>(bytes: &[u8]) -> Result<T, CborError> {
    let value: T = serde_cbor::from_slice(bytes).map_err(|e| CborError::Decode(e.to_string()))?;
    if canonical_bytes(&value)? != bytes {
        return Err(CborError::NonCanonical);
    }
    Ok(value)
}

/// Serde helper that encodes `[u8; N]` and `Vec<u8>` as CBOR byte strings.
///
/// Use as `#[serde(with = "crate::cbor::bytes")]`. Decoding accepts only byte strings, and for
/// fixed-size arrays only the exact length.
pub mod bytes {
    use std::fmt;
    use std::marker::PhantomData;

    use serde::de::{Error as _, Visitor};
    use serde::{Deserializer, Serializer};

    /// Serializes any byte container as a CBOR byte string.
    pub fn serialize<S: Serializer, T: AsRef<[u8]> + ?Sized>(
        value: &T,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(value.as_ref())
    }

    /// Deserializes a CBOR byte string into `[u8; N]` (exact length) or `Vec<u8>`.
    pub fn deserialize<'de, D: Deserializer<'de>, T: TryFrom<Vec<u8>>>(
        deserializer: D,
    ) -> Result<T, D::Error> {
        let bytes = deserializer.deserialize_bytes(BytesVisitor(PhantomData))?;
        let len = bytes.len();
        T::try_from(bytes)
            .map_err(|_| D::Error::invalid_length(len, &"a byte string of the expected length"))
    }

    struct BytesVisitor(PhantomData<()>);

    impl Visitor<'_> for BytesVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a byte string")
        }

        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::Deserialize;

    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Manifest {
        name: String,
        attrs: BTreeMap<String, String>,
        #[serde(with = "crate::cbor::bytes")]
        blob: Vec<u8>,
    }

    fn manifest() -> Manifest {
        Manifest {
            name: "x".into(),
            attrs: [("b", "1"), ("aa", "2")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            blob: vec![1, 2, 3],
        }
    }

    /// The test vector from TECH-NOTES §8: shorter keys first, then bytewise.
    #[test]
    fn canonical_order_test_vector() {
        let plain = serde_cbor::to_vec(&manifest()).unwrap();
        let plain_hex =
            "a3 646e616d65 6178 656174747273 a2 6261616132 616261 31 64626c6f62 43010203";
        assert_eq!(hex::encode(&plain), plain_hex.replace(' ', ""));
        let canonical = canonical_bytes(&manifest()).unwrap();
        let canonical_hex =
            "a3 64626c6f62 43010203 646e616d65 6178 656174747273 a2 616261 31 6261616132";
        assert_eq!(hex::encode(&canonical), canonical_hex.replace(' ', ""));
    }

    #[test]
    fn decode_canonical_round_trips() {
        let bytes = canonical_bytes(&manifest()).unwrap();
        let back: Manifest = decode_canonical(&bytes).unwrap();
        assert_eq!(back, manifest());
    }

    #[test]
    fn decode_canonical_rejects_plain_order() {
        let plain = serde_cbor::to_vec(&manifest()).unwrap();
        assert_eq!(
            decode_canonical::<Manifest>(&plain),
            Err(CborError::NonCanonical)
        );
    }

    #[test]
    fn decode_canonical_rejects_non_minimal_integer() {
        // 24 encoded as `18 18` is minimal; `19 00 18` is the same number in two extra bytes.
        assert_eq!(decode_canonical::<u32>(&[0x18, 0x18]), Ok(24));
        assert_eq!(
            decode_canonical::<u32>(&[0x19, 0x00, 0x18]),
            Err(CborError::NonCanonical)
        );
    }

    #[test]
    fn decode_canonical_rejects_indefinite_length() {
        // An indefinite-length byte string holding one chunk `01 02`.
        let bytes = [0x5f, 0x42, 0x01, 0x02, 0xff];
        let err = decode_canonical::<ByteBox>(&bytes).unwrap_err();
        assert!(
            matches!(err, CborError::NonCanonical | CborError::Decode(_)),
            "{err:?}"
        );
    }

    #[test]
    fn decode_canonical_rejects_trailing_bytes_and_garbage() {
        assert!(matches!(
            decode_canonical::<u32>(&[0x01, 0x00]),
            Err(CborError::Decode(_))
        ));
        assert!(matches!(
            decode_canonical::<u32>(&[0xff]),
            Err(CborError::Decode(_))
        ));
        assert!(matches!(
            decode_canonical::<u32>(&[]),
            Err(CborError::Decode(_))
        ));
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(transparent)]
    struct ByteBox(#[serde(with = "crate::cbor::bytes")] [u8; 2]);

    #[test]
    fn bytes_helper_writes_byte_strings_and_checks_length() {
        let bytes = canonical_bytes(&ByteBox([7, 8])).unwrap();
        assert_eq!(bytes, [0x42, 7, 8]);
        assert_eq!(
            decode_canonical::<ByteBox>(&bytes).unwrap(),
            ByteBox([7, 8])
        );
        // Wrong length: three bytes for a two-byte array.
        assert!(matches!(
            decode_canonical::<ByteBox>(&[0x43, 1, 2, 3]),
            Err(CborError::Decode(_))
        ));
        // An array of integers is not a byte string.
        assert!(matches!(
            decode_canonical::<ByteBox>(&[0x82, 1, 2]),
            Err(CborError::Decode(_))
        ));
    }
}
