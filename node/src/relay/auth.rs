//! `/iom/relay-auth/1`: a device proves to a relay that it is a trusted device of a person the
//! relay serves, and so earns long, large circuits.
//!
//! # Wire format
//!
//! Over one raw stream (libp2p-stream), opened by the device:
//!
//! 1. device → relay: one frame (4-byte big-endian length, at most [`MAX_REQUEST_LEN`] bytes)
//!    holding a CBOR array of CBOR byte strings, each the bytes of one
//!    `iom_protocol::cert::Certificate` ([`MAX_CHAIN_CERTS`] at most);
//! 2. relay → device: one frame holding the CBOR map `{ok: bool, reason: text}`.
//!
//! The relay accepts when the certificates make the connection's Noise-authenticated PeerId a
//! trusted, non-revoked device of one of its allowed persons (`iom_protocol::trust::evaluate`).
//! From then on, relay streams the device opens on a *new or not yet used* connection get
//! the allowed limits (see [`super::tiered`]); so authenticate right after connecting, before
//! reserving or dialing through the relay.

use std::sync::Arc;
use std::time::Duration;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use iom_protocol::cert::Certificate;
use iom_protocol::keys::{DeviceId, PersonId};
use iom_protocol::trust;
use libp2p::{PeerId, StreamProtocol};
use serde::{Deserialize, Serialize};

use super::AllowList;

/// The protocol name.
pub const RELAY_AUTH_PROTOCOL: StreamProtocol = StreamProtocol::new("/iom/relay-auth/1");
/// The most certificates a chain may hold.
pub const MAX_CHAIN_CERTS: usize = 16;
/// The largest request frame payload.
pub const MAX_REQUEST_LEN: usize = 64 * 1024;
/// The largest reply frame payload.
pub const MAX_REPLY_LEN: usize = 4 * 1024;
/// How long one exchange may take, on either side.
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(10);
/// Auth exchanges the relay serves at once; more streams are dropped.
pub const MAX_CONCURRENT_AUTHS: usize = 64;

/// The relay's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayAuthReply {
    /// Whether the relay now grants this device the allowed limits.
    pub ok: bool,
    /// Why (for logs): the person on success, the reason on refusal.
    pub reason: String,
}

/// A certificate's bytes, as a CBOR byte string.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CertBytes(#[serde(with = "iom_protocol::cbor::bytes")] Vec<u8>);

/// Why authenticating to a relay failed (a refusal is not an error: see [`RelayAuthReply::ok`]).
#[derive(Debug, thiserror::Error)]
pub enum RelayAuthError {
    /// The chain is longer than [`MAX_CHAIN_CERTS`] or encodes to more than [`MAX_REQUEST_LEN`].
    #[error(
        "certificate chain too large: {certs} certificates, {bytes} bytes (max {MAX_CHAIN_CERTS}, {MAX_REQUEST_LEN} bytes)"
    )]
    ChainTooLarge {
        /// Certificates in the chain.
        certs: usize,
        /// Encoded size.
        bytes: usize,
    },
    /// The relay's stream could not be opened (not connected, or it does not speak the protocol).
    #[error("cannot open {RELAY_AUTH_PROTOCOL} to the relay: {0}")]
    Open(#[source] libp2p_stream::OpenStreamError),
    /// Reading or writing the stream failed.
    #[error("relay auth stream failed: {0}")]
    Io(#[from] std::io::Error),
    /// The chain could not be encoded (a bug), or the relay's reply was not a valid reply.
    #[error("malformed relay auth reply: {0}")]
    Malformed(#[source] serde_cbor::Error),
    /// The relay did not answer within [`AUTH_TIMEOUT`].
    #[error("the relay did not answer within {AUTH_TIMEOUT:?}")]
    Timeout,
}

/// Proves to `relay` that this node (the `control`'s swarm identity) is a device of a person
/// the relay serves, by sending its certificate `chain` (the bytes of the certificates that
/// chain its device to the person key, e.g. all device certificates it knows). Call it after
/// connecting to the relay and before reserving a slot or dialing through it.
pub async fn authenticate_to_relay(
    control: &mut libp2p_stream::Control,
    relay: PeerId,
    chain: Vec<Vec<u8>>,
) -> Result<RelayAuthReply, RelayAuthError> {
    let certs = chain.len();
    let payload = serde_cbor::to_vec(&chain.into_iter().map(CertBytes).collect::<Vec<_>>())
        .map_err(RelayAuthError::Malformed)?;
    if certs > MAX_CHAIN_CERTS || payload.len() > MAX_REQUEST_LEN {
        return Err(RelayAuthError::ChainTooLarge {
            certs,
            bytes: payload.len(),
        });
    }
    let exchange = async {
        let mut stream = control
            .open_stream(relay, RELAY_AUTH_PROTOCOL)
            .await
            .map_err(RelayAuthError::Open)?;
        write_frame(&mut stream, &payload).await?;
        let reply = read_frame(&mut stream, MAX_REPLY_LEN).await?;
        let _ = stream.close().await;
        serde_cbor::from_slice::<RelayAuthReply>(&reply).map_err(RelayAuthError::Malformed)
    };
    tokio::time::timeout(AUTH_TIMEOUT, exchange)
        .await
        .map_err(|_| RelayAuthError::Timeout)?
}

/// Why a relay refused a certificate chain (the text goes back to the device as the reply's
/// `reason`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainRefusal {
    /// More than [`MAX_CHAIN_CERTS`] certificates.
    #[error("chain has {0} certificates (max {MAX_CHAIN_CERTS})")]
    TooLong(usize),
    /// The connection's PeerId is not an ed25519 device id.
    #[error("{0}")]
    NotADevice(iom_protocol::keys::KeyError),
    /// A certificate does not decode (or its signature is wrong).
    #[error("certificate {index}: {source}")]
    BadCertificate {
        /// Its place in the chain.
        index: usize,
        /// Why.
        source: iom_protocol::cert::CertError,
    },
    /// The chain says this device is revoked.
    #[error("this device is revoked")]
    Revoked,
    /// The chain does not reach a person the relay serves.
    #[error(
        "the certificates do not make this device a trusted device of a person this relay serves"
    )]
    NotTrusted,
}

/// Checks that `chain` makes `peer` a trusted, non-revoked device of one of `allowed`.
/// Returns the person, or why it refuses.
pub fn verify_chain(
    peer: &PeerId,
    chain: &[Vec<u8>],
    allowed: &[PersonId],
) -> Result<PersonId, ChainRefusal> {
    if chain.len() > MAX_CHAIN_CERTS {
        return Err(ChainRefusal::TooLong(chain.len()));
    }
    let device = DeviceId::from_peer_id(peer).map_err(ChainRefusal::NotADevice)?;
    let certs = chain
        .iter()
        .enumerate()
        .map(|(index, bytes)| {
            Certificate::from_bytes(bytes)
                .map_err(|source| ChainRefusal::BadCertificate { index, source })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut revoked = false;
    for person in allowed {
        let state = trust::evaluate(person, &certs);
        if state.is_trusted(&device) {
            return Ok(*person);
        }
        revoked |= state.is_revoked(&device);
    }
    if revoked {
        Err(ChainRefusal::Revoked)
    } else {
        Err(ChainRefusal::NotTrusted)
    }
}

/// Serves `/iom/relay-auth/1` on `incoming` until it ends: verifies each chain against
/// `allowed` and records accepted peers in `allow` *before* replying, so any relay stream the
/// device opens after reading `ok: true` gets the allowed limits.
pub async fn serve_auth(
    mut incoming: libp2p_stream::IncomingStreams,
    allowed: Arc<[PersonId]>,
    allow: AllowList,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_AUTHS));
    while let Some((peer, stream)) = incoming.next().await {
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "too many relay auth exchanges at once; dropping a stream");
            continue;
        };
        let allowed = allowed.clone();
        let allow = allow.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(AUTH_TIMEOUT, answer(peer, stream, &allowed, &allow)).await {
                Ok(Ok(reply)) => {
                    tracing::info!(%peer, ok = reply.ok, reason = %reply.reason, "relay auth")
                }
                Ok(Err(e)) => tracing::debug!(%peer, "relay auth stream failed: {e}"),
                Err(_) => tracing::debug!(%peer, "relay auth timed out"),
            }
        });
    }
}

async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
    peer: PeerId,
    mut stream: S,
    allowed: &[PersonId],
    allow: &AllowList,
) -> Result<RelayAuthReply, std::io::Error> {
    let reply = match read_frame(&mut stream, MAX_REQUEST_LEN).await {
        Ok(payload) => decide(peer, &payload, allowed, allow),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => RelayAuthReply {
            ok: false,
            reason: e.to_string(),
        },
        Err(e) => return Err(e),
    };
    let bytes = serde_cbor::to_vec(&reply).map_err(std::io::Error::other)?;
    write_frame(&mut stream, &bytes).await?;
    let _ = stream.close().await;
    Ok(reply)
}

fn decide(peer: PeerId, payload: &[u8], allowed: &[PersonId], allow: &AllowList) -> RelayAuthReply {
    let refuse = |reason: String| RelayAuthReply { ok: false, reason };
    let chain: Vec<CertBytes> = match serde_cbor::from_slice(payload) {
        Ok(chain) => chain,
        Err(e) => return refuse(format!("not a CBOR list of certificates: {e}")),
    };
    let chain: Vec<Vec<u8>> = chain.into_iter().map(|c| c.0).collect();
    match verify_chain(&peer, &chain, allowed) {
        Ok(person) => {
            if allow.insert(peer, person) {
                RelayAuthReply {
                    ok: true,
                    reason: format!("device of person {person}"),
                }
            } else {
                refuse("the relay's list of allowed devices is full".into())
            }
        }
        Err(reason) => refuse(reason.to_string()),
    }
}

pub(crate) async fn write_frame<S: AsyncWrite + Unpin>(
    stream: &mut S,
    payload: &[u8],
) -> std::io::Result<()> {
    let len = u32::try_from(payload.len()).map_err(std::io::Error::other)?;
    stream.write_all(&len.to_be_bytes()).await?;
    stream.write_all(payload).await?;
    stream.flush().await
}

pub(crate) async fn read_frame<S: AsyncRead + Unpin>(
    stream: &mut S,
    max: usize,
) -> std::io::Result<Vec<u8>> {
    let mut header = [0u8; 4];
    stream.read_exact(&mut header).await?;
    let len = iom_protocol::frame::parse_len(header, max)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).await?;
    Ok(payload)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use iom_protocol::cert::CertBody;
    use iom_protocol::keys::{DeviceKey, PersonKey};

    fn device_cert(person: &PersonKey, device: &DeviceKey, admin: bool) -> Vec<u8> {
        let body = CertBody::Device {
            kind: None,
            person: person.id(),
            device: device.id(),
            name: "d".into(),
            admin,
            issued_at: 1,
        };
        Certificate::issue_by_person(body, person)
            .unwrap()
            .to_bytes()
    }

    #[test]
    fn accepts_a_trusted_device_of_an_allowed_person() {
        let person = PersonKey::from_seed([1; 32]);
        let laptop = DeviceKey::from_seed([2; 32]);
        let phone = DeviceKey::from_seed([3; 32]);
        let root = device_cert(&person, &laptop, true);
        let by_admin = Certificate::issue_by_device(
            CertBody::Device {
                kind: None,
                person: person.id(),
                device: phone.id(),
                name: "phone".into(),
                admin: false,
                issued_at: 2,
            },
            &laptop,
        )
        .unwrap()
        .to_bytes();
        let other = PersonKey::from_seed([9; 32]).id();
        let allowed = [other, person.id()];
        let phone_peer = phone.id().to_peer_id();
        assert_eq!(
            verify_chain(&phone_peer, &[by_admin.clone(), root.clone()], &allowed),
            Ok(person.id())
        );
        // Without the admin's own certificate the chain is broken.
        assert!(verify_chain(&phone_peer, &[by_admin], &allowed).is_err());
        // A valid chain for another device does not help this one.
        let stranger = DeviceKey::from_seed([4; 32]).id().to_peer_id();
        assert!(verify_chain(&stranger, std::slice::from_ref(&root), &allowed).is_err());
        // A person the relay does not serve.
        assert!(verify_chain(&laptop.id().to_peer_id(), &[root], &[other]).is_err());
    }

    #[test]
    fn refuses_revoked_garbage_and_oversized_chains() {
        let person = PersonKey::from_seed([1; 32]);
        let laptop = DeviceKey::from_seed([2; 32]);
        let root = device_cert(&person, &laptop, true);
        let revocation = Certificate::issue_by_person(
            CertBody::Revocation {
                person: person.id(),
                device: laptop.id(),
                reason: "lost".into(),
                issued_at: 3,
            },
            &person,
        )
        .unwrap()
        .to_bytes();
        let peer = laptop.id().to_peer_id();
        let err = verify_chain(&peer, &[root.clone(), revocation], &[person.id()]).unwrap_err();
        assert_eq!(err, ChainRefusal::Revoked);
        let err = verify_chain(&peer, &[b"junk".to_vec()], &[person.id()]).unwrap_err();
        assert!(err.to_string().contains("certificate 0"), "{err}");
        let many = vec![root; MAX_CHAIN_CERTS + 1];
        assert_eq!(
            verify_chain(&peer, &many, &[person.id()]),
            Err(ChainRefusal::TooLong(MAX_CHAIN_CERTS + 1))
        );
    }

    #[test]
    fn decide_records_the_peer_before_replying_ok() {
        let person = PersonKey::from_seed([1; 32]);
        let laptop = DeviceKey::from_seed([2; 32]);
        let payload =
            serde_cbor::to_vec(&vec![CertBytes(device_cert(&person, &laptop, true))]).unwrap();
        let allow = AllowList::new();
        let peer = laptop.id().to_peer_id();
        let reply = decide(peer, &payload, &[person.id()], &allow);
        assert!(reply.ok, "{reply:?}");
        assert_eq!(allow.person_of(&peer), Some(person.id()));
        let other = DeviceKey::from_seed([5; 32]).id().to_peer_id();
        let reply = decide(other, b"\xff\x00", &[person.id()], &allow);
        assert!(!reply.ok);
    }

    /// Runs [`answer`] over an in-memory stream: sends `request` as one frame (or `raw` bytes
    /// as they are), returns the relay's reply.
    async fn exchange(
        peer: PeerId,
        raw: Vec<u8>,
        allowed: Vec<PersonId>,
        allow: &AllowList,
    ) -> RelayAuthReply {
        use tokio_util::compat::TokioAsyncReadCompatExt;
        let (ours, theirs) = tokio::io::duplex(128 * 1024);
        let allow2 = allow.clone();
        let relay =
            tokio::spawn(async move { answer(peer, theirs.compat(), &allowed, &allow2).await });
        let mut s = ours.compat();
        s.write_all(&raw).await.unwrap();
        let reply = read_frame(&mut s, MAX_REPLY_LEN).await.unwrap();
        let from_relay = relay.await.unwrap().unwrap();
        let reply: RelayAuthReply = serde_cbor::from_slice(&reply).unwrap();
        assert_eq!(reply, from_relay, "the relay logs what it sent");
        reply
    }

    fn framed(payload: &[u8]) -> Vec<u8> {
        let mut out = (payload.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(payload);
        out
    }

    #[tokio::test]
    async fn the_relay_answers_a_good_chain_over_the_stream_and_remembers_the_device() {
        let person = PersonKey::from_seed([1; 32]);
        let laptop = DeviceKey::from_seed([2; 32]);
        let payload =
            serde_cbor::to_vec(&vec![CertBytes(device_cert(&person, &laptop, true))]).unwrap();
        let allow = AllowList::new();
        let peer = laptop.id().to_peer_id();
        let reply = exchange(peer, framed(&payload), vec![person.id()], &allow).await;
        assert!(reply.ok, "{reply:?}");
        assert_eq!(reply.reason, format!("device of person {}", person.id()));
        assert!(allow.contains(&peer));
    }

    #[tokio::test]
    async fn an_oversized_request_is_refused_with_a_reason() {
        let peer = DeviceKey::from_seed([2; 32]).id().to_peer_id();
        let allow = AllowList::new();
        let header = ((MAX_REQUEST_LEN + 1) as u32).to_be_bytes().to_vec();
        let reply = exchange(peer, header, vec![], &allow).await;
        assert!(!reply.ok);
        assert!(!reply.reason.is_empty());
        assert!(allow.is_empty());
    }

    #[tokio::test]
    async fn a_request_that_is_not_a_list_of_certificates_is_refused() {
        let peer = DeviceKey::from_seed([2; 32]).id().to_peer_id();
        let allow = AllowList::new();
        let reply = exchange(peer, framed(b"\x01"), vec![], &allow).await;
        assert!(!reply.ok);
        assert!(
            reply.reason.starts_with("not a CBOR list of certificates"),
            "{reply:?}"
        );
    }

    #[test]
    fn a_full_allow_list_refuses_new_devices_but_not_known_ones() {
        let person = PersonKey::from_seed([1; 32]);
        let laptop = DeviceKey::from_seed([2; 32]);
        let allow = AllowList::new();
        for _ in 0..crate::relay::allow::MAX_ALLOWED_PEERS {
            assert!(allow.insert(PeerId::random(), person.id()));
        }
        let payload =
            serde_cbor::to_vec(&vec![CertBytes(device_cert(&person, &laptop, true))]).unwrap();
        let reply = decide(laptop.id().to_peer_id(), &payload, &[person.id()], &allow);
        assert!(!reply.ok);
        assert_eq!(reply.reason, "the relay's list of allowed devices is full");
    }

    #[test]
    fn a_peer_id_that_is_not_a_device_key_is_refused() {
        let person = PersonKey::from_seed([1; 32]);
        let rsa_like = PeerId::random();
        let err = verify_chain(&rsa_like, &[], &[person.id()]).unwrap_err();
        assert!(matches!(err, ChainRefusal::NotADevice(_)), "{err}");
        // An empty chain for a real device: simply not trusted.
        let device = DeviceKey::from_seed([2; 32]).id().to_peer_id();
        assert_eq!(
            verify_chain(&device, &[], &[person.id()]),
            Err(ChainRefusal::NotTrusted)
        );
    }

    #[tokio::test]
    async fn a_chain_too_large_to_send_is_refused_before_any_stream_is_opened() {
        // No swarm behind the control: the size check must come first.
        let behaviour = libp2p_stream::Behaviour::new();
        let mut control = behaviour.new_control();
        let chain = vec![vec![0u8; 10]; MAX_CHAIN_CERTS + 1];
        let err = authenticate_to_relay(&mut control, PeerId::random(), chain)
            .await
            .unwrap_err();
        assert!(
            matches!(err, RelayAuthError::ChainTooLarge { certs, .. } if certs == MAX_CHAIN_CERTS + 1),
            "{err}"
        );
    }
}
