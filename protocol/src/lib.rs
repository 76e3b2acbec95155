//! `iom-protocol`: identities, certificates, trust evaluation, invite codes and wire framing for
//! iom. Pure: no async runtime, no sockets, no files, no clocks and no OS randomness; the caller
//! passes the time and random bytes in.
//!
//! The wire protocol is specified in `docs/protocol.md`.
//!
//! # Layout
//!
//! - [`cbor`]: canonical CBOR (the bytes we hash and sign) and the byte-string serde helper.
//! - [`id`]: [`ContentId`], the SHA-256 of an object's bytes.
//! - [`blobset`]: [`blobset::BlobSetDigest`], a constant-size summary of a set of blobs.
//! - [`keys`]: device and person ed25519 keys and ids; device ids are libp2p PeerIds.
//! - [`cert`]: signed certificates (device, agent role, revocation).
//! - [`trust`]: [`trust::evaluate`], from a set of certificates to the trusted devices.
//! - [`frame`]: length-prefixed frames and CBOR message helpers.
//! - [`invite`]: `iom1…` invite codes and the pairing proof.
//! - [`pair`]: the `/iom/pair/1` request and response.
//! - [`http_head`]: the head of a plain HTTP request (the relay's ACME HTTP-01 listener).
//! - [`sni`]: the server name of a TLS ClientHello (the relay's passthrough) and devices'
//!   names under a relay's domain.
//! - [`recovery_words`]: the person key as words for a printed recovery kit.
//! - [`wire`]: the `/iom/sync/1` and `/iom/blob/1` messages.
//!
//! # Example
//!
//! ```
//! use iom_protocol::cert::{CertBody, Certificate};
//! use iom_protocol::keys::{DeviceKey, PersonKey};
//! use iom_protocol::trust;
//!
//! // Seeds come from the OS RNG in the node; fixed here.
//! let person = PersonKey::from_seed([1; 32]);
//! let laptop = DeviceKey::from_seed([2; 32]);
//! let phone = DeviceKey::from_seed([3; 32]);
//!
//! let body = |device: &DeviceKey, name: &str, admin| CertBody::Device {
//!     person: person.id(),
//!     device: device.id(),
//!     name: name.into(),
//!     admin,
//!     issued_at: 1_700_000_000,
//! };
//! let root = Certificate::issue_by_person(body(&laptop, "laptop", true), &person)?;
//! let by_admin = Certificate::issue_by_device(body(&phone, "phone", false), &laptop)?;
//!
//! // Certificates travel as canonical CBOR and are checked when decoded.
//! let received = Certificate::from_bytes(&by_admin.to_bytes())?;
//!
//! let state = trust::evaluate(&person.id(), [&received, &root]);
//! assert!(state.is_admin(&laptop.id()));
//! assert!(state.is_trusted(&phone.id()));
//! # Ok::<(), iom_protocol::cert::CertError>(())
//! ```

#![deny(missing_docs, rustdoc::broken_intra_doc_links, unreachable_pub)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod base32;
pub mod blobset;
pub mod cbor;
pub mod cert;
pub mod frame;
#[doc(hidden)]
pub mod fuzzing;
pub mod http_head;
pub mod id;
pub mod invite;
pub mod keys;
pub mod pair;
pub mod recovery_words;
pub mod sni;
pub mod trust;
pub mod wire;

pub use cert::{CertBody, Certificate, Signer};
pub use id::ContentId;
pub use invite::Invite;
pub use keys::{DeviceId, DeviceKey, PersonId, PersonKey};
pub use trust::{TrustState, evaluate};
