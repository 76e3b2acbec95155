//! Signed certificates: statements a person (or an admin device) makes about a device.
//!
//! A [`Certificate`] is a [`CertBody`] plus the [`Signer`] and an ed25519 signature over
//!
//! ```text
//! b"iom-cert-v1\0" || canonical_cbor([body, signer])
//! ```
//!
//! Its wire and storage form is the canonical CBOR of the whole certificate
//! ([`Certificate::to_bytes`]); its [`ContentId`] is the SHA-256 of those bytes. Decoding
//! ([`Certificate::from_bytes`], or any serde decode of a `Certificate`) checks the size bounds and
//! the signature, so a `Certificate` value always carries a valid signature by its stated signer.
//! Whether that signer is *allowed* to make the statement is decided by [`crate::trust`].

use serde::{Deserialize, Serialize};

use crate::cbor::{self, CborError};
use crate::id::ContentId;
use crate::keys::{DeviceId, DeviceKey, PersonId, PersonKey};

/// Domain separation tag prefixed to every certificate signing input.
pub const CERT_SIGNING_TAG: &[u8] = b"iom-cert-v1\0";
/// The longest device name, in bytes (UTF-8).
pub const MAX_NAME_LEN: usize = 64;
/// The longest revocation reason, in bytes (UTF-8).
pub const MAX_REASON_LEN: usize = 256;
/// The largest encoded certificate, in bytes.
pub const MAX_CERT_LEN: usize = 4096;

/// Why a certificate could not be issued or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// The encoded certificate is larger than [`MAX_CERT_LEN`].
    #[error("certificate is {len} bytes, more than the maximum {max}")]
    TooLarge {
        /// Size of the input.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The device name is longer than [`MAX_NAME_LEN`] bytes.
    #[error("device name is {len} bytes, more than the maximum {max}")]
    NameTooLong {
        /// Length of the name in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The revocation reason is longer than [`MAX_REASON_LEN`] bytes.
    #[error("revocation reason is {len} bytes, more than the maximum {max}")]
    ReasonTooLong {
        /// Length of the reason in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The bytes are not the canonical CBOR of a certificate.
    #[error("certificate encoding: {0}")]
    Cbor(#[from] CborError),
    /// The signature does not verify for the stated signer.
    #[error("certificate signature does not verify")]
    BadSignature,
    /// `issue_by_person` was called with a key that is not the body's person (a caller bug).
    #[error("the person key does not match the certificate's person")]
    WrongPersonKey,
}

/// A device that is not a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceKind {
    /// A web browser holding its own key (WebCrypto Ed25519), paired with an invite URL: it
    /// uses the API of the node that serves its page, with a session, and may not administer.
    Browser,
}

impl DeviceKind {
    /// The kind's name as shown (`browser`).
    pub fn as_str(&self) -> &'static str {
        match self {
            DeviceKind::Browser => "browser",
        }
    }
}

/// What a certificate states. Every statement is about one `device` of one `person`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CertBody {
    /// `device` belongs to `person`, is called `name`, and may administer others if `admin`.
    Device {
        /// The person the device belongs to.
        person: PersonId,
        /// The device.
        device: DeviceId,
        /// A human-readable name, at most [`MAX_NAME_LEN`] bytes.
        name: String,
        /// Whether the device may issue certificates and revocations.
        admin: bool,
        /// Seconds since the Unix epoch, as told by the issuer (informational).
        issued_at: u64,
        /// What kind of device it is; absent (the encoding of every older certificate) for a
        /// node. A browser device is never an admin and runs no node.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        kind: Option<DeviceKind>,
    },
    /// `device` holds the agent role for `person` from `epoch` on.
    AgentRole {
        /// The person.
        person: PersonId,
        /// The device that runs the agent.
        device: DeviceId,
        /// Higher epochs win.
        epoch: u64,
        /// Seconds since the Unix epoch (informational).
        issued_at: u64,
    },
    /// `device` is revoked for `person`, forever.
    Revocation {
        /// The person.
        person: PersonId,
        /// The revoked device.
        device: DeviceId,
        /// Why, at most [`MAX_REASON_LEN`] bytes.
        reason: String,
        /// Seconds since the Unix epoch (informational).
        issued_at: u64,
    },
}

impl CertBody {
    /// The person the statement is about.
    pub fn person(&self) -> &PersonId {
        match self {
            CertBody::Device { person, .. }
            | CertBody::AgentRole { person, .. }
            | CertBody::Revocation { person, .. } => person,
        }
    }

    /// The device the statement is about.
    pub fn device(&self) -> &DeviceId {
        match self {
            CertBody::Device { device, .. }
            | CertBody::AgentRole { device, .. }
            | CertBody::Revocation { device, .. } => device,
        }
    }

    /// When the issuer says it issued the statement (seconds since the Unix epoch).
    pub fn issued_at(&self) -> u64 {
        match self {
            CertBody::Device { issued_at, .. }
            | CertBody::AgentRole { issued_at, .. }
            | CertBody::Revocation { issued_at, .. } => *issued_at,
        }
    }

    fn check_bounds(&self) -> Result<(), CertError> {
        match self {
            CertBody::Device { name, .. } if name.len() > MAX_NAME_LEN => {
                Err(CertError::NameTooLong {
                    len: name.len(),
                    max: MAX_NAME_LEN,
                })
            }
            CertBody::Revocation { reason, .. } if reason.len() > MAX_REASON_LEN => {
                Err(CertError::ReasonTooLong {
                    len: reason.len(),
                    max: MAX_REASON_LEN,
                })
            }
            _ => Ok(()),
        }
    }
}

/// Who signed a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Signer {
    /// The person's root key.
    Person(PersonId),
    /// A device key (counts only if that device is a trusted admin).
    Device(DeviceId),
}

impl Signer {
    fn verify(&self, msg: &[u8], signature: &[u8; 64]) -> Result<(), CertError> {
        let result = match self {
            Signer::Person(id) => id.verify(msg, signature),
            Signer::Device(id) => id.verify(msg, signature),
        };
        result.map_err(|_| CertError::BadSignature)
    }
}

/// A signed [`CertBody`]. Every value of this type has a valid signature by [`Certificate::signer`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawCertificate")]
pub struct Certificate {
    body: CertBody,
    signer: Signer,
    #[serde(with = "crate::cbor::bytes")]
    signature: [u8; 64],
}

/// The unchecked serde form of a certificate; checked in `TryFrom`.
#[derive(Deserialize)]
struct RawCertificate {
    body: CertBody,
    signer: Signer,
    #[serde(with = "crate::cbor::bytes")]
    signature: [u8; 64],
}

impl TryFrom<RawCertificate> for Certificate {
    type Error = CertError;

    fn try_from(raw: RawCertificate) -> Result<Certificate, CertError> {
        let cert = Certificate {
            body: raw.body,
            signer: raw.signer,
            signature: raw.signature,
        };
        cert.body.check_bounds()?;
        cert.verify_signature()?;
        Ok(cert)
    }
}

/// The bytes a certificate's signature covers: the tag, then canonical `[body, signer]`.
pub fn signing_input(body: &CertBody, signer: &Signer) -> Result<Vec<u8>, CertError> {
    let mut input = CERT_SIGNING_TAG.to_vec();
    input.extend_from_slice(&cbor::canonical_bytes(&(body, signer))?);
    Ok(input)
}

impl Certificate {
    /// Signs `body` with the person's root key. The key must be `body.person()`.
    pub fn issue_by_person(body: CertBody, key: &PersonKey) -> Result<Certificate, CertError> {
        if *body.person() != key.id() {
            return Err(CertError::WrongPersonKey);
        }
        Certificate::sign_with(body, Signer::Person(key.id()), |msg| key.sign(msg))
    }

    /// Signs `body` with a device key. It counts only if that device is a trusted admin of
    /// `body.person()` (see [`crate::trust`]).
    pub fn issue_by_device(body: CertBody, key: &DeviceKey) -> Result<Certificate, CertError> {
        Certificate::sign_with(body, Signer::Device(key.id()), |msg| key.sign(msg))
    }

    fn sign_with(
        body: CertBody,
        signer: Signer,
        sign: impl FnOnce(&[u8]) -> [u8; 64],
    ) -> Result<Certificate, CertError> {
        body.check_bounds()?;
        let signature = sign(&signing_input(&body, &signer)?);
        let cert = Certificate {
            body,
            signer,
            signature,
        };
        let len = cert.to_bytes().len();
        if len > MAX_CERT_LEN {
            return Err(CertError::TooLarge {
                len,
                max: MAX_CERT_LEN,
            });
        }
        Ok(cert)
    }

    /// Builds a certificate without checking anything. Only for tests and fuzzing: it can hold a
    /// forged signature, which [`Certificate::verify_signature`] and [`crate::trust`] reject.
    #[doc(hidden)]
    pub fn from_parts_unchecked(body: CertBody, signer: Signer, signature: [u8; 64]) -> Self {
        Certificate {
            body,
            signer,
            signature,
        }
    }

    /// What the certificate states.
    pub fn body(&self) -> &CertBody {
        &self.body
    }

    /// Who signed it.
    pub fn signer(&self) -> &Signer {
        &self.signer
    }

    /// The ed25519 signature over [`signing_input`].
    pub fn signature(&self) -> &[u8; 64] {
        &self.signature
    }

    /// Checks the signature against the stated signer.
    pub fn verify_signature(&self) -> Result<(), CertError> {
        let input = signing_input(&self.body, &self.signer)?;
        self.signer.verify(&input, &self.signature)
    }

    /// The canonical CBOR encoding: the storage and hashing form.
    pub fn to_bytes(&self) -> Vec<u8> {
        // A certificate holds only strings, integers, booleans and byte strings, which always
        // encode; an empty vector would fail `from_bytes` rather than pass silently.
        cbor::canonical_bytes(self).unwrap_or_default()
    }

    /// Decodes canonical CBOR, checking the size bounds and the signature.
    pub fn from_bytes(bytes: &[u8]) -> Result<Certificate, CertError> {
        if bytes.len() > MAX_CERT_LEN {
            return Err(CertError::TooLarge {
                len: bytes.len(),
                max: MAX_CERT_LEN,
            });
        }
        // Decode the raw form first, so that encoding errors are reported as such and not hidden
        // behind the signature check done by `Certificate`'s `Deserialize`.
        let raw: RawCertificate =
            serde_cbor::from_slice(bytes).map_err(|e| CborError::Decode(e.to_string()))?;
        let cert = Certificate {
            body: raw.body,
            signer: raw.signer,
            signature: raw.signature,
        };
        if cert.to_bytes() != bytes {
            return Err(CborError::NonCanonical.into());
        }
        cert.body.check_bounds()?;
        cert.verify_signature()?;
        Ok(cert)
    }

    /// The content id: SHA-256 of [`Certificate::to_bytes`].
    pub fn id(&self) -> ContentId {
        ContentId::of(&self.to_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn person() -> PersonKey {
        PersonKey::from_seed([1; 32])
    }

    fn device(n: u8) -> DeviceKey {
        DeviceKey::from_seed([n; 32])
    }

    fn device_body(name: &str) -> CertBody {
        CertBody::Device {
            kind: None,
            person: person().id(),
            device: device(2).id(),
            name: name.into(),
            admin: true,
            issued_at: 1_700_000_000,
        }
    }

    #[test]
    fn issue_round_trip_and_id() {
        let cert = Certificate::issue_by_person(device_body("laptop"), &person()).unwrap();
        assert_eq!(cert.verify_signature(), Ok(()));
        let bytes = cert.to_bytes();
        let back = Certificate::from_bytes(&bytes).unwrap();
        assert_eq!(back, cert);
        assert_eq!(back.id(), ContentId::of(&bytes));
        assert_eq!(cert.signer(), &Signer::Person(person().id()));
        // Also through plain serde (as inside pairing messages).
        let plain = serde_cbor::to_vec(&cert).unwrap();
        assert_eq!(serde_cbor::from_slice::<Certificate>(&plain).unwrap(), cert);
    }

    #[test]
    fn signing_input_is_domain_separated() {
        let body = device_body("x");
        let signer = Signer::Person(person().id());
        let input = signing_input(&body, &signer).unwrap();
        assert!(input.starts_with(b"iom-cert-v1\0"));
        assert_eq!(
            &input[12..],
            cbor::canonical_bytes(&(&body, &signer)).unwrap()
        );
    }

    #[test]
    fn forged_signature_is_rejected() {
        let cert = Certificate::issue_by_person(device_body("laptop"), &person()).unwrap();
        let mut sig = *cert.signature();
        sig[0] ^= 0x80;
        let forged = Certificate::from_parts_unchecked(cert.body().clone(), *cert.signer(), sig);
        assert_eq!(forged.verify_signature(), Err(CertError::BadSignature));
        assert_eq!(
            Certificate::from_bytes(&forged.to_bytes()),
            Err(CertError::BadSignature)
        );
        let plain = serde_cbor::to_vec(&forged).unwrap();
        assert!(serde_cbor::from_slice::<Certificate>(&plain).is_err());
    }

    #[test]
    fn changed_body_or_signer_is_rejected() {
        let cert = Certificate::issue_by_person(device_body("laptop"), &person()).unwrap();
        let renamed = Certificate::from_parts_unchecked(
            device_body("laptop2"),
            *cert.signer(),
            *cert.signature(),
        );
        assert_eq!(renamed.verify_signature(), Err(CertError::BadSignature));
        // Claiming a device signed it (same key bytes would be needed) fails too.
        let resigned = Certificate::from_parts_unchecked(
            cert.body().clone(),
            Signer::Device(device(2).id()),
            *cert.signature(),
        );
        assert_eq!(resigned.verify_signature(), Err(CertError::BadSignature));
    }

    #[test]
    fn device_signed_certificate_verifies() {
        let cert = Certificate::issue_by_device(device_body("phone"), &device(3)).unwrap();
        assert_eq!(cert.signer(), &Signer::Device(device(3).id()));
        assert_eq!(Certificate::from_bytes(&cert.to_bytes()), Ok(cert));
    }

    #[test]
    fn wrong_person_key_is_refused() {
        let other = PersonKey::from_seed([9; 32]);
        assert_eq!(
            Certificate::issue_by_person(device_body("x"), &other),
            Err(CertError::WrongPersonKey)
        );
    }

    #[test]
    fn bounds_are_enforced() {
        let long_name = "n".repeat(MAX_NAME_LEN + 1);
        assert_eq!(
            Certificate::issue_by_person(device_body(&long_name), &person()),
            Err(CertError::NameTooLong { len: 65, max: 64 })
        );
        assert!(Certificate::issue_by_person(device_body(&"n".repeat(64)), &person()).is_ok());
        let revocation = CertBody::Revocation {
            person: person().id(),
            device: device(2).id(),
            reason: "r".repeat(MAX_REASON_LEN + 1),
            issued_at: 0,
        };
        assert_eq!(
            Certificate::issue_by_person(revocation, &person()),
            Err(CertError::ReasonTooLong { len: 257, max: 256 })
        );
        // A too-long name in a correctly signed certificate is still rejected on decode.
        let body = device_body(&long_name);
        let signer = Signer::Person(person().id());
        let sig = person().sign(&signing_input(&body, &signer).unwrap());
        let cert = Certificate::from_parts_unchecked(body, signer, sig);
        assert!(matches!(
            Certificate::from_bytes(&cert.to_bytes()),
            Err(CertError::NameTooLong { .. })
        ));
        assert!(matches!(
            Certificate::from_bytes(&vec![0u8; MAX_CERT_LEN + 1]),
            Err(CertError::TooLarge { .. })
        ));
    }

    #[test]
    fn non_canonical_encoding_is_rejected() {
        let cert = Certificate::issue_by_person(device_body("laptop"), &person()).unwrap();
        // serde_cbor::to_vec writes struct fields in declaration order, not canonical order.
        let plain = serde_cbor::to_vec(&cert).unwrap();
        assert_ne!(plain, cert.to_bytes());
        assert_eq!(
            Certificate::from_bytes(&plain),
            Err(CertError::Cbor(CborError::NonCanonical))
        );
        let mut trailing = cert.to_bytes();
        trailing.push(0);
        assert!(matches!(
            Certificate::from_bytes(&trailing),
            Err(CertError::Cbor(_))
        ));
    }

    #[test]
    fn garbage_and_truncation_are_rejected() {
        let bytes = Certificate::issue_by_person(device_body("laptop"), &person())
            .unwrap()
            .to_bytes();
        for len in 0..bytes.len() {
            assert!(
                Certificate::from_bytes(&bytes[..len]).is_err(),
                "prefix {len}"
            );
        }
        assert!(matches!(
            Certificate::from_bytes(&[0xff, 0x00]),
            Err(CertError::Cbor(_))
        ));
    }
}
