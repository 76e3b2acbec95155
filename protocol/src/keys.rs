//! Device and person keys (ed25519) and their public ids.
//!
//! - A [`DeviceKey`] is one device's ed25519 key. Its public half, the [`DeviceId`], is also the
//!   device's libp2p identity: [`DeviceId::to_peer_id`] and [`DeviceKey::to_libp2p_keypair`]
//!   convert, and a `DeviceId` displays as the libp2p `PeerId` string (`12D3KooW…`).
//! - A [`PersonKey`] is the root of trust; its public half, the [`PersonId`], displays as 64
//!   lowercase hex digits.
//!
//! Keys are built from 32-byte seeds: this crate never reads OS randomness, the caller passes the
//! random bytes in. Every `DeviceId`/`PersonId` holds a valid ed25519 point (checked when it is
//! built or decoded). Signatures are checked with `verify_strict` (no malleable or small-order
//! signatures).

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use libp2p_identity::PeerId;
use serde::{Deserialize, Serialize};

/// Why a key, id or signature was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The 32 bytes are not a valid ed25519 public key.
    #[error("not a valid ed25519 public key")]
    InvalidPublicKey,
    /// The signature does not verify for this key and message.
    #[error("signature does not verify")]
    BadSignature,
    /// The PeerId is valid but does not hold an inline ed25519 key.
    #[error("peer id {0} is not an ed25519 peer id")]
    NotEd25519PeerId(String),
    /// The text is neither a PeerId nor 64 hex digits.
    #[error("cannot parse {0:?} as a device id (expected a PeerId or 64 hex digits)")]
    InvalidDeviceId(String),
    /// The text is not 64 hex digits.
    #[error("cannot parse {0:?} as a person id (expected 64 hex digits)")]
    InvalidPersonId(String),
}

/// Checks an ed25519 signature with `verify_strict`.
pub fn verify(public_key: &[u8; 32], msg: &[u8], signature: &[u8; 64]) -> Result<(), KeyError> {
    let key = VerifyingKey::from_bytes(public_key).map_err(|_| KeyError::InvalidPublicKey)?;
    key.verify_strict(msg, &Signature::from_bytes(signature))
        .map_err(|_| KeyError::BadSignature)
}

/// The raw serde form of a public id: a 32-byte CBOR byte string.
#[derive(Clone, Copy, Serialize, Deserialize)]
#[serde(transparent)]
struct RawPublicKey(#[serde(with = "crate::cbor::bytes")] [u8; 32]);

/// Shared shape of [`DeviceId`] and [`PersonId`].
macro_rules! public_id {
    ($id:ident) => {
        impl $id {
            /// Wraps 32 public-key bytes, checking that they are a valid ed25519 point.
            pub fn from_bytes(bytes: [u8; 32]) -> Result<Self, KeyError> {
                VerifyingKey::from_bytes(&bytes).map_err(|_| KeyError::InvalidPublicKey)?;
                Ok($id(bytes))
            }

            /// The 32 public-key bytes.
            pub const fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }

            /// Checks `signature` over `msg` with this key (`verify_strict`).
            pub fn verify(&self, msg: &[u8], signature: &[u8; 64]) -> Result<(), KeyError> {
                verify(&self.0, msg, signature)
            }
        }

        impl TryFrom<RawPublicKey> for $id {
            type Error = KeyError;

            fn try_from(raw: RawPublicKey) -> Result<Self, KeyError> {
                $id::from_bytes(raw.0)
            }
        }

        impl From<$id> for RawPublicKey {
            fn from(id: $id) -> RawPublicKey {
                RawPublicKey(id.0)
            }
        }

        impl fmt::Debug for $id {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($id), "({})"), self)
            }
        }
    };
}

/// A device's public key; also its libp2p identity.
///
/// Displays as the libp2p `PeerId` (base58, `12D3KooW…`); parses from a `PeerId` string or 64 hex
/// digits; serializes as a 32-byte CBOR byte string.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "RawPublicKey", into = "RawPublicKey")]
pub struct DeviceId([u8; 32]);

public_id!(DeviceId);

impl DeviceId {
    /// The libp2p `PeerId` of this device (identity multihash of the protobuf public key).
    pub fn to_peer_id(&self) -> PeerId {
        self.to_libp2p_public_key().to_peer_id()
    }

    /// The libp2p public key of this device.
    pub fn to_libp2p_public_key(&self) -> libp2p_identity::PublicKey {
        // Every DeviceId was checked to be a valid point when it was built.
        #[allow(clippy::expect_used)]
        let key = libp2p_identity::ed25519::PublicKey::try_from_bytes(&self.0)
            .expect("DeviceId always holds a valid ed25519 point");
        key.into()
    }

    /// Extracts the ed25519 key from a `PeerId` (only inline ed25519 PeerIds have one).
    pub fn from_peer_id(peer: &PeerId) -> Result<DeviceId, KeyError> {
        const IDENTITY_MULTIHASH: u64 = 0x00;
        let not_ed25519 = || KeyError::NotEd25519PeerId(peer.to_string());
        let multihash = peer.as_ref();
        if multihash.code() != IDENTITY_MULTIHASH {
            return Err(not_ed25519());
        }
        let key = libp2p_identity::PublicKey::try_decode_protobuf(multihash.digest())
            .map_err(|_| not_ed25519())?
            .try_into_ed25519()
            .map_err(|_| not_ed25519())?;
        DeviceId::from_bytes(key.to_bytes())
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.to_peer_id().fmt(f)
    }
}

impl FromStr for DeviceId {
    type Err = KeyError;

    /// Parses a `PeerId` string (`12D3KooW…`) or 64 hex digits.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let invalid = || KeyError::InvalidDeviceId(s.to_string());
        if s.len() == 64 {
            let mut bytes = [0u8; 32];
            if hex::decode_to_slice(s, &mut bytes).is_ok() {
                return DeviceId::from_bytes(bytes).map_err(|_| invalid());
            }
        }
        let peer = PeerId::from_str(s).map_err(|_| invalid())?;
        DeviceId::from_peer_id(&peer)
    }
}

impl From<DeviceId> for PeerId {
    fn from(id: DeviceId) -> PeerId {
        id.to_peer_id()
    }
}

/// The root-of-trust public key of a person.
///
/// Displays and parses as 64 lowercase hex digits; serializes as a 32-byte CBOR byte string.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "RawPublicKey", into = "RawPublicKey")]
pub struct PersonId([u8; 32]);

public_id!(PersonId);

impl fmt::Display for PersonId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl FromStr for PersonId {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let invalid = || KeyError::InvalidPersonId(s.to_string());
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(s, &mut bytes).map_err(|_| invalid())?;
        PersonId::from_bytes(bytes).map_err(|_| invalid())
    }
}

/// Shared shape of [`DeviceKey`] and [`PersonKey`].
macro_rules! secret_key {
    ($key:ident, $id:ident) => {
        impl $key {
            /// Builds the key from a 32-byte secret seed (the caller supplies the randomness).
            pub fn from_seed(seed: [u8; 32]) -> $key {
                $key(SigningKey::from_bytes(&seed))
            }

            /// The 32-byte secret seed, for storage. Keep it secret.
            pub fn seed(&self) -> [u8; 32] {
                self.0.to_bytes()
            }

            /// The public id of this key.
            pub fn id(&self) -> $id {
                $id(self.0.verifying_key().to_bytes())
            }

            /// Signs `msg` (pure ed25519, deterministic).
            pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
                self.0.sign(msg).to_bytes()
            }
        }

        impl fmt::Debug for $key {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                // Never print the secret.
                write!(f, concat!(stringify!($key), "({})"), self.id())
            }
        }
    };
}

/// A device's secret ed25519 key (zeroized on drop by ed25519-dalek).
#[derive(Clone)]
pub struct DeviceKey(SigningKey);

secret_key!(DeviceKey, DeviceId);

impl DeviceKey {
    /// The same key as a libp2p identity, so the node's PeerId is the device id.
    pub fn to_libp2p_keypair(&self) -> libp2p_identity::Keypair {
        // `ed25519_from_bytes` only fails when the input is not 32 bytes long.
        #[allow(clippy::expect_used)]
        libp2p_identity::Keypair::ed25519_from_bytes(self.seed())
            .expect("a 32-byte seed is always a valid ed25519 secret key")
    }
}

/// A person's secret ed25519 root key (zeroized on drop by ed25519-dalek).
#[derive(Clone)]
pub struct PersonKey(SigningKey);

secret_key!(PersonKey, PersonId);

#[cfg(test)]
mod tests {
    use super::*;

    fn device(n: u8) -> DeviceKey {
        DeviceKey::from_seed([n; 32])
    }

    #[test]
    fn seed_round_trips() {
        let key = device(1);
        assert_eq!(DeviceKey::from_seed(key.seed()).id(), key.id());
        let person = PersonKey::from_seed([2; 32]);
        assert_eq!(PersonKey::from_seed(person.seed()).id(), person.id());
    }

    #[test]
    fn sign_and_verify() {
        let key = device(1);
        let sig = key.sign(b"hello");
        assert_eq!(key.id().verify(b"hello", &sig), Ok(()));
        assert_eq!(key.id().verify(b"hellp", &sig), Err(KeyError::BadSignature));
        assert_eq!(
            device(2).id().verify(b"hello", &sig),
            Err(KeyError::BadSignature)
        );
        let mut forged = sig;
        forged[10] ^= 1;
        assert_eq!(
            verify(key.id().as_bytes(), b"hello", &forged),
            Err(KeyError::BadSignature)
        );
    }

    #[test]
    fn invalid_points_are_rejected() {
        // y = 2 is not on the curve.
        let mut bytes = [0u8; 32];
        bytes[0] = 2;
        assert_eq!(DeviceId::from_bytes(bytes), Err(KeyError::InvalidPublicKey));
        assert_eq!(PersonId::from_bytes(bytes), Err(KeyError::InvalidPublicKey));
        assert_eq!(
            verify(&bytes, b"x", &[0; 64]),
            Err(KeyError::InvalidPublicKey)
        );
        let cbor = crate::cbor::canonical_bytes(&RawPublicKey(bytes)).unwrap();
        assert!(crate::cbor::decode_canonical::<DeviceId>(&cbor).is_err());
    }

    #[test]
    fn device_id_is_the_libp2p_peer_id() {
        let key = device(3);
        let keypair = key.to_libp2p_keypair();
        assert_eq!(keypair.public().to_peer_id(), key.id().to_peer_id());
        assert_eq!(DeviceId::from_peer_id(&key.id().to_peer_id()), Ok(key.id()));
        let text = key.id().to_string();
        assert!(text.starts_with("12D3KooW"), "{text}");
        assert_eq!(text.parse::<DeviceId>(), Ok(key.id()));
        assert_eq!(
            hex::encode(key.id().as_bytes()).parse::<DeviceId>(),
            Ok(key.id())
        );
        // A libp2p signature verifies with our verify, and the other way round.
        let sig: [u8; 64] = keypair.sign(b"msg").unwrap().try_into().unwrap();
        assert_eq!(key.id().verify(b"msg", &sig), Ok(()));
        assert!(keypair.public().verify(b"msg2", &key.sign(b"msg2")));
    }

    #[test]
    fn device_id_parse_errors() {
        assert!(matches!(
            "nope".parse::<DeviceId>(),
            Err(KeyError::InvalidDeviceId(_))
        ));
        assert!(matches!(
            "".parse::<DeviceId>(),
            Err(KeyError::InvalidDeviceId(_))
        ));
        // A sha256-multihash PeerId (as used for RSA keys) holds no inline key.
        let hashed = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N";
        assert!(matches!(
            hashed.parse::<DeviceId>(),
            Err(KeyError::NotEd25519PeerId(_))
        ));
    }

    #[test]
    fn person_id_displays_as_hex() {
        let person = PersonKey::from_seed([4; 32]);
        let text = person.id().to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(text, text.to_lowercase());
        assert_eq!(text.parse::<PersonId>(), Ok(person.id()));
        assert!(matches!(
            "xyz".parse::<PersonId>(),
            Err(KeyError::InvalidPersonId(_))
        ));
    }

    #[test]
    fn debug_never_prints_the_seed() {
        let key = device(0xab);
        let text = format!("{key:?}");
        assert!(!text.contains(&hex::encode(key.seed())));
        assert!(text.contains(&key.id().to_string()));
    }

    #[test]
    fn ids_serialize_as_byte_strings() {
        let id = device(5).id();
        let bytes = crate::cbor::canonical_bytes(&id).unwrap();
        assert_eq!(&bytes[..2], &[0x58, 0x20]);
        assert_eq!(&bytes[2..], id.as_bytes());
        assert_eq!(crate::cbor::decode_canonical::<DeviceId>(&bytes), Ok(id));
    }
}
