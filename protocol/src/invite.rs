//! Invite codes and the pairing proof.
//!
//! An [`Invite`] tells a new device whom to dial (`inviter`, `addrs`), which person it is joining,
//! and a 32-byte `secret` it proves knowledge of without sending it.
//!
//! # Code format
//!
//! ```text
//! code    = "iom1" base32( version || payload || checksum )
//! version = 0x01
//! payload = canonical CBOR of the Invite
//! checksum = SHA-256(version || payload)[0..4]
//! ```
//!
//! `base32` is lowercase Crockford-style base32 without padding (alphabet `0-9a-z` minus
//! `i l o u`). Parsing accepts upper case, reads `o` as `0` and `i`/`l` as `1`, and ignores `-`
//! and whitespace anywhere, so codes survive copy-paste, line wrapping and QR alphanumeric mode.
//!
//! # Pairing proof
//!
//! The joiner sends [`pair_proof`] = HMAC-SHA256(secret, `"iom-pair-v1" || inviter || joiner`)
//! (both 32-byte device keys), which binds the proof to both ends of the Noise-authenticated
//! connection. The inviter finds the invite by [`Invite::id`] (a hash of the secret, safe to
//! send) and checks the proof with [`verify_pair_proof`] (constant time).

use std::fmt;

use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::base32;
use crate::cbor;
use crate::id::ContentId;
use crate::keys::{DeviceId, PersonId};

/// The text every invite code starts with.
pub const INVITE_PREFIX: &str = "iom1";
/// The invite format version this crate writes and reads.
pub const INVITE_VERSION: u8 = 1;
/// The most addresses an invite may carry.
pub const MAX_INVITE_ADDRS: usize = 8;
/// The longest address, in bytes.
pub const MAX_ADDR_LEN: usize = 256;
/// The longest code text accepted by the parser, in bytes.
pub const MAX_CODE_LEN: usize = 8192;

const CHECKSUM_LEN: usize = 4;
const INVITE_ID_TAG: &[u8] = b"iom-invite-id-v1\0";
const PAIR_PROOF_TAG: &[u8] = b"iom-pair-v1";

/// Why an invite code was rejected. Each variant is a distinct, user-actionable problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InviteError {
    /// The text does not start with `iom1`.
    #[error("not an iom invite code: it must start with \"iom1\"")]
    MissingPrefix,
    /// A character outside the code alphabet.
    #[error("invalid character {ch:?} at position {position} of the invite code; check for typos")]
    InvalidCharacter {
        /// Index of the character (counted in characters from the start of the text).
        position: usize,
        /// The character.
        ch: char,
    },
    /// The code is shorter than its contents say: part of it was not copied. (A typo that hits
    /// a length inside the payload looks the same, so the message names both.)
    #[error("the invite code is incomplete (or has a typo); copy the whole code again")]
    Truncated,
    /// The checksum does not match: a typo or a damaged code.
    #[error("the invite code has a typo (checksum mismatch); copy it again")]
    ChecksumMismatch,
    /// The code was made by a newer (or unknown) version of iom.
    #[error("invite code version {0} is not supported; upgrade iom")]
    UnsupportedVersion(u8),
    /// The code checks out but its contents are invalid (or the invite to encode is invalid).
    #[error("the invite code is malformed: {0}")]
    Malformed(String),
    /// The invite has expired.
    #[error("the invite expired at {expired_at} (now {now}); ask for a new one")]
    Expired {
        /// When it expired (seconds since the Unix epoch).
        expired_at: u64,
        /// The time used for the check.
        now: u64,
    },
}

/// An invitation for a new device to join a person's mesh.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invite {
    /// The person to join.
    pub person: PersonId,
    /// The admin device that issued the invite (dial it).
    pub inviter: DeviceId,
    /// Multiaddr strings of the inviter (direct, LAN, relay circuit). At most
    /// [`MAX_INVITE_ADDRS`], each at most [`MAX_ADDR_LEN`] bytes.
    pub addrs: Vec<String>,
    /// The pairing secret. Never sent over the wire; only [`pair_proof`] is.
    #[serde(with = "crate::cbor::bytes")]
    pub secret: [u8; 32],
    /// Expiry, seconds since the Unix epoch. Expired when `now >= expires_at`.
    pub expires_at: u64,
    /// Whether the joining device is to be made an admin.
    pub admin: bool,
}

impl fmt::Debug for Invite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Invite")
            .field("person", &self.person)
            .field("inviter", &self.inviter)
            .field("addrs", &self.addrs)
            .field("secret", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .field("admin", &self.admin)
            .finish()
    }
}

impl Invite {
    /// Checks the size bounds on addresses.
    pub fn validate(&self) -> Result<(), InviteError> {
        if self.addrs.len() > MAX_INVITE_ADDRS {
            return Err(InviteError::Malformed(format!(
                "{} addresses, at most {MAX_INVITE_ADDRS} allowed",
                self.addrs.len()
            )));
        }
        if let Some(addr) = self.addrs.iter().find(|a| a.len() > MAX_ADDR_LEN) {
            return Err(InviteError::Malformed(format!(
                "an address is {} bytes, at most {MAX_ADDR_LEN} allowed",
                addr.len()
            )));
        }
        Ok(())
    }

    /// The code text (`iom1…`). Fails only if the invite breaks the size bounds.
    pub fn encode(&self) -> Result<String, InviteError> {
        self.validate()?;
        let payload =
            cbor::canonical_bytes(self).map_err(|e| InviteError::Malformed(e.to_string()))?;
        let mut bytes = Vec::with_capacity(1 + payload.len() + CHECKSUM_LEN);
        bytes.push(INVITE_VERSION);
        bytes.extend_from_slice(&payload);
        let checksum = checksum(&bytes);
        bytes.extend_from_slice(&checksum);
        Ok(format!("{INVITE_PREFIX}{}", base32::encode(&bytes)))
    }

    /// Parses a code and checks that it has not expired at `now` (seconds since the epoch).
    pub fn parse(code: &str, now: u64) -> Result<Invite, InviteError> {
        let invite = Invite::parse_ignoring_expiry(code)?;
        if invite.is_expired(now) {
            return Err(InviteError::Expired {
                expired_at: invite.expires_at,
                now,
            });
        }
        Ok(invite)
    }

    /// Parses a code without looking at the expiry (to show an expired invite's details).
    pub fn parse_ignoring_expiry(code: &str) -> Result<Invite, InviteError> {
        if code.len() > MAX_CODE_LEN {
            return Err(InviteError::Malformed(format!(
                "the code is {} bytes long, at most {MAX_CODE_LEN} allowed",
                code.len()
            )));
        }
        let mut chars = code
            .chars()
            .enumerate()
            .filter(|(_, ch)| !ch.is_whitespace() && *ch != '-');
        for expected in INVITE_PREFIX.chars() {
            match chars.next() {
                Some((_, ch)) if ch.eq_ignore_ascii_case(&expected) => {}
                _ => return Err(InviteError::MissingPrefix),
            }
        }
        let mut decoder = base32::Decoder::default();
        for (position, ch) in chars {
            let value = base32::value(ch).ok_or(InviteError::InvalidCharacter { position, ch })?;
            decoder.push(value);
        }
        let (bytes, clean) = decoder.finish();
        if bytes.len() < 1 + CHECKSUM_LEN + 1 {
            return Err(InviteError::Truncated);
        }
        let (body, sum) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
        if !clean || checksum(body) != sum {
            return Err(if looks_truncated(&bytes[1..]) {
                InviteError::Truncated
            } else {
                InviteError::ChecksumMismatch
            });
        }
        let (version, payload) = (body[0], &body[1..]);
        if version != INVITE_VERSION {
            return Err(InviteError::UnsupportedVersion(version));
        }
        let invite: Invite =
            cbor::decode_canonical(payload).map_err(|e| InviteError::Malformed(e.to_string()))?;
        invite.validate()?;
        Ok(invite)
    }

    /// Whether the invite has expired at `now`.
    pub fn is_expired(&self, now: u64) -> bool {
        now >= self.expires_at
    }

    /// The invite's public id: SHA-256 of a domain tag and the secret. Safe to send; the inviter
    /// uses it to look the invite up.
    pub fn id(&self) -> ContentId {
        invite_id(&self.secret)
    }
}

/// The public id of the invite with this secret (see [`Invite::id`]).
pub fn invite_id(secret: &[u8; 32]) -> ContentId {
    let mut input = INVITE_ID_TAG.to_vec();
    input.extend_from_slice(secret);
    ContentId::of(&input)
}

fn checksum(bytes: &[u8]) -> [u8; CHECKSUM_LEN] {
    let digest = Sha256::digest(bytes);
    let mut out = [0u8; CHECKSUM_LEN];
    out.copy_from_slice(&digest[..CHECKSUM_LEN]);
    out
}

/// Whether `data` (payload then checksum) is shorter than the CBOR payload it starts says.
fn looks_truncated(data: &[u8]) -> bool {
    let mut de = serde_cbor::Deserializer::from_slice(data);
    match serde::de::IgnoredAny::deserialize(&mut de) {
        Ok(_) => data.len().saturating_sub(de.byte_offset()) < CHECKSUM_LEN,
        Err(e) => e.is_eof(),
    }
}

/// HMAC-SHA256 with a key of any length.
fn hmac_sha256(key: &[u8]) -> Hmac<Sha256> {
    // HMAC pads keys up to the 64-byte block with zeros and hashes longer ones first (RFC 2104),
    // so building the block ourselves gives the infallible constructor.
    let mut block = [0u8; 64];
    if key.len() > block.len() {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    <Hmac<Sha256> as KeyInit>::new(&block.into())
}

fn pair_mac(secret: &[u8; 32], inviter: &DeviceId, joiner: &DeviceId) -> Hmac<Sha256> {
    let mut mac = hmac_sha256(secret);
    mac.update(PAIR_PROOF_TAG);
    mac.update(inviter.as_bytes());
    mac.update(joiner.as_bytes());
    mac
}

/// The joiner's proof that it knows the invite secret, bound to both devices.
pub fn pair_proof(secret: &[u8; 32], inviter: &DeviceId, joiner: &DeviceId) -> [u8; 32] {
    pair_mac(secret, inviter, joiner)
        .finalize()
        .into_bytes()
        .into()
}

/// Checks a pairing proof in constant time.
pub fn verify_pair_proof(
    secret: &[u8; 32],
    inviter: &DeviceId,
    joiner: &DeviceId,
    proof: &[u8; 32],
) -> bool {
    pair_mac(secret, inviter, joiner)
        .verify_slice(proof)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::keys::{DeviceKey, PersonKey};

    fn invite() -> Invite {
        Invite {
            person: PersonKey::from_seed([1; 32]).id(),
            inviter: DeviceKey::from_seed([2; 32]).id(),
            addrs: vec![
                "/ip4/192.168.1.20/tcp/4001".into(),
                "/ip4/203.0.113.5/udp/4001/quic-v1/p2p/12D3KooWRelay/p2p-circuit".into(),
            ],
            secret: [7; 32],
            expires_at: 1_000,
            admin: false,
        }
    }

    /// Replaces the character at `index` (a base32 position after the prefix) with another
    /// valid one.
    fn with_typo(code: &str, index: usize) -> String {
        let mut chars: Vec<char> = code.chars().collect();
        chars[index] = if chars[index] == 'a' { 'b' } else { 'a' };
        chars.into_iter().collect()
    }

    #[test]
    fn round_trip() {
        let code = invite().encode().unwrap();
        assert!(code.starts_with("iom1"));
        assert_eq!(code, code.to_lowercase());
        assert_eq!(Invite::parse(&code, 999).unwrap(), invite());
    }

    #[test]
    fn parse_is_forgiving() {
        let code = invite().encode().unwrap();
        let shouty = code.to_uppercase();
        assert_eq!(Invite::parse(&shouty, 0).unwrap(), invite());
        let grouped: String = code
            .chars()
            .collect::<Vec<_>>()
            .chunks(5)
            .map(|c| c.iter().collect::<String>())
            .collect::<Vec<_>>()
            .join("-");
        assert_eq!(
            Invite::parse(&format!("  {grouped}\n"), 0).unwrap(),
            invite()
        );
        let wrapped = code.replacen('0', " 0\n", 3);
        assert_eq!(Invite::parse(&wrapped, 0).unwrap(), invite());
    }

    #[test]
    fn missing_prefix() {
        let code = invite().encode().unwrap();
        assert_eq!(
            Invite::parse(&code[4..], 0),
            Err(InviteError::MissingPrefix)
        );
        assert_eq!(Invite::parse("", 0), Err(InviteError::MissingPrefix));
        assert_eq!(Invite::parse("iom", 0), Err(InviteError::MissingPrefix));
        assert_eq!(Invite::parse("iom2abc", 0), Err(InviteError::MissingPrefix));
    }

    #[test]
    fn invalid_character() {
        let code = invite().encode().unwrap();
        let mut chars: Vec<char> = code.chars().collect();
        chars[10] = 'u';
        let bad: String = chars.iter().collect();
        assert_eq!(
            Invite::parse(&bad, 0),
            Err(InviteError::InvalidCharacter {
                position: 10,
                ch: 'u'
            })
        );
        chars[10] = '!';
        let bad: String = chars.into_iter().collect();
        assert_eq!(
            Invite::parse(&bad, 0),
            Err(InviteError::InvalidCharacter {
                position: 10,
                ch: '!'
            })
        );
    }

    #[test]
    fn truncated() {
        let code = invite().encode().unwrap();
        assert_eq!(Invite::parse("iom1", 0), Err(InviteError::Truncated));
        assert_eq!(Invite::parse("iom1abcd", 0), Err(InviteError::Truncated));
        // Cut anywhere: always Truncated, never a panic or a wrong invite.
        for cut in 5..code.len() {
            assert_eq!(
                Invite::parse(&code[..cut], 0),
                Err(InviteError::Truncated),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn typo_is_a_checksum_mismatch() {
        let code = invite().encode().unwrap();
        for index in 4..code.len() {
            let err = Invite::parse(&with_typo(&code, index), 0).unwrap_err();
            assert!(
                matches!(err, InviteError::ChecksumMismatch | InviteError::Truncated),
                "index {index}: {err:?}"
            );
        }
        // A typo in the middle of the payload is reported as such.
        assert_eq!(
            Invite::parse(&with_typo(&code, code.len() / 2), 0),
            Err(InviteError::ChecksumMismatch)
        );
    }

    fn code_from(version: u8, payload: &[u8]) -> String {
        let mut bytes = vec![version];
        bytes.extend_from_slice(payload);
        let sum = checksum(&bytes);
        bytes.extend_from_slice(&sum);
        format!("iom1{}", base32::encode(&bytes))
    }

    #[test]
    fn unsupported_version() {
        let payload = cbor::canonical_bytes(&invite()).unwrap();
        assert_eq!(
            Invite::parse(&code_from(2, &payload), 0),
            Err(InviteError::UnsupportedVersion(2))
        );
    }

    #[test]
    fn malformed_payloads() {
        // Valid checksum around a non-invite payload.
        assert!(matches!(
            Invite::parse(&code_from(1, &[0x01]), 0),
            Err(InviteError::Malformed(_))
        ));
        // Non-canonical CBOR (declaration order) of a real invite.
        let plain = serde_cbor::to_vec(&invite()).unwrap();
        assert!(matches!(
            Invite::parse(&code_from(1, &plain), 0),
            Err(InviteError::Malformed(_))
        ));
        // Too many addresses.
        let mut big = invite();
        big.addrs = vec!["/ip4/1.2.3.4/tcp/1".into(); MAX_INVITE_ADDRS + 1];
        assert!(matches!(big.encode(), Err(InviteError::Malformed(_))));
        let payload = cbor::canonical_bytes(&big).unwrap();
        assert!(matches!(
            Invite::parse(&code_from(1, &payload), 0),
            Err(InviteError::Malformed(_))
        ));
        // Too long an address.
        let mut long = invite();
        long.addrs = vec!["a".repeat(MAX_ADDR_LEN + 1)];
        assert!(matches!(long.encode(), Err(InviteError::Malformed(_))));
        // Absurdly long input.
        let huge = format!("iom1{}", "0".repeat(MAX_CODE_LEN));
        assert!(matches!(
            Invite::parse(&huge, 0),
            Err(InviteError::Malformed(_))
        ));
    }

    #[test]
    fn expired() {
        let code = invite().encode().unwrap();
        assert_eq!(
            Invite::parse(&code, 1_000),
            Err(InviteError::Expired {
                expired_at: 1_000,
                now: 1_000
            })
        );
        assert_eq!(Invite::parse_ignoring_expiry(&code).unwrap(), invite());
        assert!(invite().is_expired(5_000));
        assert!(!invite().is_expired(999));
    }

    #[test]
    fn debug_redacts_the_secret() {
        let text = format!("{:?}", invite());
        assert!(text.contains("redacted"));
        assert!(!text.contains("[7, 7"));
    }

    #[test]
    fn id_depends_only_on_the_secret() {
        let mut other = invite();
        other.addrs.clear();
        assert_eq!(other.id(), invite().id());
        other.secret = [8; 32];
        assert_ne!(other.id(), invite().id());
        assert_ne!(invite().id(), ContentId::of(&invite().secret));
    }

    #[test]
    fn hmac_sha256_rfc4231_vectors() {
        let cases: [(Vec<u8>, &[u8], &str); 3] = [
            (
                vec![0x0b; 20],
                b"Hi There",
                "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
            ),
            (
                b"Jefe".to_vec(),
                b"what do ya want for nothing?",
                "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
            ),
            (
                vec![0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First",
                "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54",
            ),
        ];
        for (key, data, expected) in cases {
            let mut mac = hmac_sha256(&key);
            mac.update(data);
            assert_eq!(hex::encode(mac.finalize().into_bytes()), expected);
        }
    }

    #[test]
    fn pair_proof_binds_secret_and_both_devices() {
        let inviter = DeviceKey::from_seed([2; 32]).id();
        let joiner = DeviceKey::from_seed([3; 32]).id();
        let other = DeviceKey::from_seed([4; 32]).id();
        let proof = pair_proof(&[7; 32], &inviter, &joiner);
        assert!(verify_pair_proof(&[7; 32], &inviter, &joiner, &proof));
        assert!(!verify_pair_proof(&[8; 32], &inviter, &joiner, &proof));
        assert!(!verify_pair_proof(&[7; 32], &joiner, &inviter, &proof));
        assert!(!verify_pair_proof(&[7; 32], &inviter, &other, &proof));
        let mut bad = proof;
        bad[31] ^= 1;
        assert!(!verify_pair_proof(&[7; 32], &inviter, &joiner, &bad));
        // It is HMAC-SHA256(secret, tag || inviter || joiner).
        let mut mac = hmac_sha256(&[7; 32]);
        mac.update(b"iom-pair-v1");
        mac.update(inviter.as_bytes());
        mac.update(joiner.as_bytes());
        assert_eq!(proof, <[u8; 32]>::from(mac.finalize().into_bytes()));
    }

    proptest! {
        #[test]
        fn invites_round_trip(
            addrs in prop::collection::vec("[a-z0-9/.:-]{0,80}", 0..=MAX_INVITE_ADDRS),
            secret in any::<[u8; 32]>(),
            expires_at in 1u64..,
            admin in any::<bool>(),
            person_seed in any::<[u8; 32]>(),
        ) {
            let invite = Invite {
                person: PersonKey::from_seed(person_seed).id(),
                inviter: DeviceKey::from_seed(secret).id(),
                addrs,
                secret,
                expires_at,
                admin,
            };
            let code = invite.encode().unwrap();
            prop_assert_eq!(Invite::parse(&code, expires_at - 1).unwrap(), invite.clone());
            prop_assert_eq!(
                Invite::parse(&code, expires_at),
                Err(InviteError::Expired { expired_at: expires_at, now: expires_at })
            );
        }

        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
            let _ = Invite::parse(&text, 0);
            let _ = Invite::parse(&format!("iom1{text}"), 0);
        }
    }
}
