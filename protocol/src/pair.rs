//! The `/iom/pair/1` messages: one request from the joiner, one response from the inviter.
//!
//! Each message is one frame ([`crate::frame`]) holding plain serde CBOR. The joiner sends a
//! [`JoinRequest`] with the invite id and its [`crate::invite::pair_proof`]; the inviter answers
//! with [`JoinResponse::Accepted`] (the new device certificate and the whole trust set) or
//! [`JoinResponse::Rejected`]. Decoding validates sizes, and every certificate's signature is
//! checked while decoding (see [`Certificate`]).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::cert::{Certificate, MAX_NAME_LEN};
use crate::frame::{self, DecodeError, EncodeError};
use crate::id::ContentId;
use crate::keys::DeviceId;

/// The libp2p protocol name.
pub const PAIR_PROTOCOL: &str = "/iom/pair/1";
/// Frame size limit for pairing messages.
pub const MAX_PAIR_MESSAGE_LEN: usize = 1024 * 1024;
/// The most certificates a [`JoinResponse::Accepted`] may carry.
pub const MAX_TRUST_SET: usize = 4096;

/// The joiner's request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequest {
    /// [`crate::invite::Invite::id`] of the invite being used.
    pub invite_id: ContentId,
    /// The joining device (must equal the Noise-authenticated peer).
    pub joiner: DeviceId,
    /// The name the joiner wants, at most [`MAX_NAME_LEN`] bytes.
    pub name: String,
    /// [`crate::invite::pair_proof`] over (secret, inviter, joiner).
    #[serde(with = "crate::cbor::bytes")]
    pub proof: [u8; 32],
}

impl JoinRequest {
    /// Encodes the request as a frame payload.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        frame::encode_message(self)
    }

    /// Decodes and validates a frame payload.
    pub fn decode(payload: &[u8]) -> Result<JoinRequest, DecodeError> {
        let request: JoinRequest = frame::decode_message(payload)?;
        if request.name.len() > MAX_NAME_LEN {
            return Err(DecodeError::Malformed(format!(
                "device name is {} bytes, at most {MAX_NAME_LEN} allowed",
                request.name.len()
            )));
        }
        Ok(request)
    }
}

/// Why the inviter refused a join.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum JoinRejection {
    /// No invite with that id exists on the inviter.
    UnknownInvite,
    /// The invite was already used.
    AlreadyUsed,
    /// The invite has expired.
    Expired,
    /// The proof does not match the invite secret and the two devices.
    BadProof,
    /// The invite belongs to a different person than the inviter serves.
    WrongPerson,
    /// Too many failed attempts; wait before retrying.
    RateLimited,
    /// The inviter is no longer an admin and cannot issue certificates.
    NotAdmin,
}

impl fmt::Display for JoinRejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            JoinRejection::UnknownInvite => {
                "the inviting device does not know this invite; ask for a new code"
            }
            JoinRejection::AlreadyUsed => "this invite was already used; ask for a new code",
            JoinRejection::Expired => "this invite has expired; ask for a new code",
            JoinRejection::BadProof => {
                "the invite secret did not check out; copy the code again exactly"
            }
            JoinRejection::WrongPerson => {
                "the device you reached belongs to a different person; check the code"
            }
            JoinRejection::RateLimited => "too many failed attempts; wait a minute and retry",
            JoinRejection::NotAdmin => {
                "the inviting device is no longer an admin; ask an admin device for a new code"
            }
        })
    }
}

impl std::error::Error for JoinRejection {}

/// The inviter's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[allow(clippy::large_enum_variant)]
pub enum JoinResponse {
    /// The join succeeded.
    Accepted {
        /// The new device's certificate.
        device_cert: Certificate,
        /// The person's whole trust set (all certificates the inviter holds).
        certs: Vec<Certificate>,
    },
    /// The join was refused.
    Rejected(JoinRejection),
}

impl JoinResponse {
    /// Encodes the response as a frame payload.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        frame::encode_message(self)
    }

    /// Decodes and validates a frame payload (certificate signatures included).
    pub fn decode(payload: &[u8]) -> Result<JoinResponse, DecodeError> {
        let response: JoinResponse = frame::decode_message(payload)?;
        if let JoinResponse::Accepted { certs, .. } = &response
            && certs.len() > MAX_TRUST_SET
        {
            return Err(DecodeError::Malformed(format!(
                "{} certificates, at most {MAX_TRUST_SET} allowed",
                certs.len()
            )));
        }
        Ok(response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cert::CertBody;
    use crate::invite::pair_proof;
    use crate::keys::{DeviceKey, PersonKey};

    fn request() -> JoinRequest {
        let inviter = DeviceKey::from_seed([2; 32]).id();
        let joiner = DeviceKey::from_seed([3; 32]).id();
        JoinRequest {
            invite_id: crate::invite::invite_id(&[7; 32]),
            joiner,
            name: "phone".into(),
            proof: pair_proof(&[7; 32], &inviter, &joiner),
        }
    }

    fn accepted() -> JoinResponse {
        let person = PersonKey::from_seed([1; 32]);
        let body = CertBody::Device {
            kind: None,
            person: person.id(),
            device: DeviceKey::from_seed([3; 32]).id(),
            name: "phone".into(),
            admin: false,
            issued_at: 5,
        };
        let cert = Certificate::issue_by_person(body, &person).unwrap();
        JoinResponse::Accepted {
            device_cert: cert.clone(),
            certs: vec![cert],
        }
    }

    #[test]
    fn messages_round_trip() {
        assert_eq!(
            JoinRequest::decode(&request().encode().unwrap()).unwrap(),
            request()
        );
        assert_eq!(
            JoinResponse::decode(&accepted().encode().unwrap()).unwrap(),
            accepted()
        );
        let rejected = JoinResponse::Rejected(JoinRejection::BadProof);
        assert_eq!(
            JoinResponse::decode(&rejected.encode().unwrap()).unwrap(),
            rejected
        );
    }

    #[test]
    fn long_name_is_rejected() {
        let mut req = request();
        req.name = "x".repeat(MAX_NAME_LEN + 1);
        assert!(matches!(
            JoinRequest::decode(&req.encode().unwrap()),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn forged_certificate_in_response_is_rejected() {
        let JoinResponse::Accepted { device_cert, .. } = accepted() else {
            unreachable!()
        };
        let mut sig = *device_cert.signature();
        sig[1] ^= 4;
        let forged = Certificate::from_parts_unchecked(
            device_cert.body().clone(),
            *device_cert.signer(),
            sig,
        );
        let bad = JoinResponse::Accepted {
            device_cert: forged,
            certs: vec![],
        };
        assert!(JoinResponse::decode(&bad.encode().unwrap()).is_err());
    }

    #[test]
    fn garbage_and_truncation_never_panic() {
        let bytes = accepted().encode().unwrap();
        for len in 0..bytes.len() {
            assert!(JoinResponse::decode(&bytes[..len]).is_err());
        }
        let bytes = request().encode().unwrap();
        for len in 0..bytes.len() {
            assert!(JoinRequest::decode(&bytes[..len]).is_err());
        }
        assert!(JoinRequest::decode(&[0xff; 10]).is_err());
        assert!(JoinResponse::decode(b"\xa1\x67Unknown\x00").is_err());
    }

    #[test]
    fn rejections_explain_themselves() {
        for r in [
            JoinRejection::UnknownInvite,
            JoinRejection::AlreadyUsed,
            JoinRejection::Expired,
            JoinRejection::BadProof,
            JoinRejection::WrongPerson,
            JoinRejection::RateLimited,
            JoinRejection::NotAdmin,
        ] {
            assert!(r.to_string().len() > 20, "{r:?}");
        }
    }
}
