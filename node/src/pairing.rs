//! Pairing over `/iom/pair/1`: admin devices issue single-use, expiring invites; a new device
//! proves it knows the invite secret with a MAC bound to both PeerIds (the secret never
//! travels) and receives a device certificate plus the whole trust set.
//!
//! An invite is marked used durably *before* the certificate is returned, so a crash between
//! the two can waste an invite but never issue two certificates for one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{AsyncRead, AsyncWrite, StreamExt};
use iom_protocol::cert::{CertBody, Certificate, DeviceKind};
use iom_protocol::frame::{DecodeError, EncodeError};
use iom_protocol::id::ContentId;
use iom_protocol::invite::{Invite, pair_proof, verify_pair_proof};
use iom_protocol::keys::DeviceId;
use iom_protocol::pair::{JoinRejection, JoinRequest, JoinResponse, MAX_PAIR_MESSAGE_LEN};
use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::identity::SharedIdentity;
use crate::net::framed::{FramedError, read_frame, write_frame};
use crate::net::{Net, PAIR_PROTOCOL};
use crate::store::Store;
use crate::trust::TrustBook;

const INVITE_PREFIX: &str = "invite/";
/// Failed join attempts allowed per peer per minute.
const MAX_FAILURES_PER_MINUTE: usize = 5;

/// An invite as the inviter stores it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct InviteRecord {
    #[serde(with = "iom_protocol::cbor::bytes")]
    secret: [u8; 32],
    person: [u8; 32],
    expires_at: u64,
    admin: bool,
    used_by: Option<String>,
    created_at: u64,
}

/// Why an invite could not be created or a join failed.
#[derive(Debug, thiserror::Error)]
pub enum PairError {
    /// Only admin devices may invite.
    #[error("this device is not an admin of its mesh, so it cannot invite; ask an admin device")]
    NotAdmin,
    /// The code did not parse (the error says how).
    #[error(transparent)]
    Invite(#[from] iom_protocol::invite::InviteError),
    /// The inviter refused.
    #[error("the inviting device refused: {0}")]
    Rejected(JoinRejection),
    /// This device already belongs to another mesh with other devices.
    #[error(
        "this device belongs to another person's mesh ({devices} devices); an invite from a \
         different person cannot be used here — use a fresh data dir"
    )]
    OtherPerson {
        /// Trusted devices in our current mesh.
        devices: usize,
    },
    /// Already a member.
    #[error("this device is already part of that mesh")]
    AlreadyMember,
    /// Network trouble.
    #[error(transparent)]
    Net(Box<crate::net::NetError>),
    /// The stream broke, or the other side sent a bad frame.
    #[error("pairing failed: {0}")]
    Stream(#[from] FramedError),
    /// The other side closed the stream without an answer.
    #[error("pairing failed: the other device closed the stream without answering")]
    Closed,
    /// No join request arrived in time.
    #[error("pairing failed: timed out waiting for the join request")]
    Timeout,
    /// A pairing message did not decode (the other side's fault).
    #[error("pairing failed: {0}")]
    Malformed(#[from] DecodeError),
    /// A pairing message could not be encoded (our bug).
    #[error("pairing failed: {0}")]
    Encode(#[from] EncodeError),
    /// The inviter's certificate is not for this device and person (the inviter's fault).
    #[error("pairing failed: the inviter returned a certificate for someone else")]
    WrongCertificate,
    /// The certificates received do not make this device trusted (the inviter's fault).
    #[error("pairing failed: the certificates received do not make this device trusted")]
    NotTrusted,
    /// Switching this device to the invite's person failed.
    #[error("pairing failed: {0}")]
    Identity(#[from] crate::identity::IdentityError),
    /// An invite record could not be written.
    #[error("pairing failed: cannot encode the invite record: {0}")]
    Record(#[from] serde_cbor::Error),
    /// Local storage failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

impl From<crate::net::NetError> for PairError {
    fn from(e: crate::net::NetError) -> PairError {
        PairError::Net(Box::new(e))
    }
}

/// Invites and joins: the inviting side (invites, the `/iom/pair/1` server that admits new
/// devices) and the joining side.
pub struct Pairing {
    identity: SharedIdentity,
    trust: Arc<TrustBook>,
    store: Store,
    net: Net,
    /// This device's name, sent when joining unless the user gives another.
    name: String,
    failures: Failures,
}

impl std::fmt::Debug for Pairing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pairing").finish_non_exhaustive()
    }
}

impl Pairing {
    /// A pairing service for this device.
    pub fn new(
        identity: SharedIdentity,
        trust: Arc<TrustBook>,
        store: Store,
        net: Net,
        name: String,
    ) -> Arc<Pairing> {
        Arc::new(Pairing {
            identity,
            trust,
            store,
            net,
            name,
            failures: Failures::default(),
        })
    }

    /// Creates an invite; only admin devices may.
    pub async fn create_invite(&self, ttl: Duration, admin: bool) -> Result<Invite, PairError> {
        let mut addrs = invite_addrs(self.net.listen_addrs().await);
        addrs.truncate(iom_protocol::invite::MAX_INVITE_ADDRS);
        self.create_invite_at(ttl, admin, addrs, crate::time::now_secs())
            .await
    }

    async fn create_invite_at(
        &self,
        ttl: Duration,
        admin: bool,
        addrs: Vec<String>,
        now: u64,
    ) -> Result<Invite, PairError> {
        let me = self.identity.device_id();
        let person = self.identity.person();
        if !self.trust.state().is_admin(&me) {
            return Err(PairError::NotAdmin);
        }
        let secret = crate::time::random_bytes::<32>();
        let expires_at = now + ttl.as_secs();
        let invite = Invite {
            person,
            inviter: me,
            addrs,
            secret,
            expires_at,
            admin,
        };
        let record = InviteRecord {
            secret,
            person: *person.as_bytes(),
            expires_at,
            admin,
            used_by: None,
            created_at: now,
        };
        let bytes = serde_cbor::to_vec(&record)?;
        self.store.state_put(&invite_key(&invite.id()), &bytes)?;
        self.store.flush().await?;
        Ok(invite)
    }

    /// Joins the mesh of the invite's person. Returns the inviter's PeerId.
    pub async fn join(&self, code: &str, name: Option<String>) -> Result<PeerId, PairError> {
        let invite = Invite::parse(code, crate::time::now_secs())?;
        self.check_can_join(&invite)?;
        let inviter = invite.inviter.to_peer_id();
        let addrs: Vec<Multiaddr> = invite.addrs.iter().filter_map(|a| a.parse().ok()).collect();
        self.net.dial(Some(inviter), addrs).await?;
        let stream = self.net.open(inviter, PAIR_PROTOCOL).await?;
        self.join_over(stream, &invite, name).await?;
        Ok(inviter)
    }

    /// Refuses an invite this device cannot use.
    fn check_can_join(&self, invite: &Invite) -> Result<(), PairError> {
        let me = self.identity.device_id();
        let person = self.identity.person();
        let state = self.trust.state();
        if person == invite.person && state.is_trusted(&me) {
            return Err(PairError::AlreadyMember);
        }
        let others = state.devices.keys().filter(|d| **d != me).count();
        if person != invite.person && others > 0 {
            return Err(PairError::OtherPerson {
                devices: others + 1,
            });
        }
        Ok(())
    }

    /// The joining side of the exchange over an open stream: the proof out, certificates in.
    async fn join_over<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut stream: S,
        invite: &Invite,
        name: Option<String>,
    ) -> Result<(), PairError> {
        let me = self.identity.device_id();
        let request = JoinRequest {
            invite_id: invite.id(),
            joiner: me,
            name: name.unwrap_or_else(|| self.name.clone()),
            proof: pair_proof(&invite.secret, &invite.inviter, &me),
        };
        write_frame(&mut stream, &request.encode()?, MAX_PAIR_MESSAGE_LEN).await?;
        let reply = read_frame(&mut stream, MAX_PAIR_MESSAGE_LEN)
            .await?
            .ok_or(PairError::Closed)?;
        let (device_cert, certs) = match JoinResponse::decode(&reply)? {
            JoinResponse::Accepted { device_cert, certs } => (device_cert, certs),
            JoinResponse::Rejected(r) => return Err(PairError::Rejected(r)),
        };
        match device_cert.body() {
            CertBody::Device { person, device, .. }
                if *person == invite.person && *device == me => {}
            _ => return Err(PairError::WrongCertificate),
        }
        if self.identity.person() != invite.person {
            self.identity.adopt_person(invite.person)?;
            self.trust.set_person(invite.person);
        }
        let mut all = certs;
        all.push(device_cert);
        self.trust.add(all).await?;
        if !self.trust.state().is_trusted(&me) {
            return Err(PairError::NotTrusted);
        }
        Ok(())
    }

    /// Serves `/iom/pair/1` until `shutdown`; each exchange is a task of this server.
    pub fn start(self: &Arc<Self>, tasks: &mut JoinSet<()>, shutdown: CancellationToken) {
        let mut control = self.net.control();
        let Ok(mut incoming) = control.accept(PAIR_PROTOCOL) else {
            tracing::error!("pairing protocol already registered");
            return;
        };
        let this = self.clone();
        tasks.spawn(async move {
            let mut exchanges = JoinSet::new();
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    Some(_) = exchanges.join_next(), if !exchanges.is_empty() => {}
                    next = incoming.next() => {
                        let Some((peer, stream)) = next else { break };
                        let this = this.clone();
                        exchanges.spawn(async move {
                            if let Err(e) = this.serve_one(peer, stream).await {
                                tracing::info!(%peer, error = %e, "pairing attempt failed");
                            }
                        });
                    }
                }
            }
            exchanges.shutdown().await;
        });
    }

    /// Answers one join request on `stream` from `peer`.
    async fn serve_one<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        peer: PeerId,
        mut stream: S,
    ) -> Result<(), PairError> {
        let frame = tokio::time::timeout(JOIN_REQUEST_TIMEOUT, read_frame(&mut stream, 64 * 1024))
            .await
            .map_err(|_| PairError::Timeout)??
            .ok_or(PairError::Closed)?;
        let response = if self.failures.recent(peer, Instant::now()) >= MAX_FAILURES_PER_MINUTE {
            JoinResponse::Rejected(JoinRejection::RateLimited)
        } else {
            match JoinRequest::decode(&frame) {
                Err(e) => {
                    self.failures.add(peer, Instant::now());
                    return Err(e.into());
                }
                Ok(req) => match self.admit(peer, req, crate::time::now_secs()).await {
                    Ok(resp) => resp,
                    Err(rejection) => {
                        self.failures.add(peer, Instant::now());
                        tracing::warn!(%peer, reason = %rejection, "join refused");
                        JoinResponse::Rejected(rejection)
                    }
                },
            }
        };
        write_frame(&mut stream, &response.encode()?, MAX_PAIR_MESSAGE_LEN).await?;
        let _ = futures::AsyncWriteExt::close(&mut stream).await;
        Ok(())
    }

    /// Checks a join request against its invite at time `now` and, if it holds, marks the
    /// invite used (durably) and certifies the joiner.
    async fn admit(
        &self,
        peer: PeerId,
        req: JoinRequest,
        now: u64,
    ) -> Result<JoinResponse, JoinRejection> {
        let joiner = DeviceId::from_peer_id(&peer).map_err(|_| JoinRejection::BadProof)?;
        if joiner != req.joiner {
            return Err(JoinRejection::BadProof);
        }
        let cert = self
            .certify(&req.invite_id, joiner, &req.proof, &req.name, None, now)
            .await?;
        Ok(JoinResponse::Accepted {
            device_cert: cert,
            certs: self.trust.certs(),
        })
    }

    /// Admits a browser device (`POST /v1/pair/browser`): the same invite checks and proof as
    /// [`Pairing`]'s `/iom/pair/1`, with the browser's own public key as the joiner; the
    /// certificate says [`DeviceKind::Browser`] and is never an admin's.
    pub async fn admit_browser(
        &self,
        invite_id: &ContentId,
        joiner: DeviceId,
        proof: &[u8; 32],
        name: &str,
    ) -> Result<Certificate, JoinRejection> {
        let cert = self
            .certify(
                invite_id,
                joiner,
                proof,
                name,
                Some(DeviceKind::Browser),
                crate::time::now_secs(),
            )
            .await?;
        Ok(cert)
    }

    /// Checks an invite and the joiner's proof at `now`, marks the invite used (durably) and
    /// certifies the joiner.
    async fn certify(
        &self,
        invite_id: &ContentId,
        joiner: DeviceId,
        proof: &[u8; 32],
        name: &str,
        kind: Option<DeviceKind>,
        now: u64,
    ) -> Result<Certificate, JoinRejection> {
        let key = invite_key(invite_id);
        let raw = self
            .store
            .state_get(&key)
            .map_err(|_| JoinRejection::UnknownInvite)?
            .ok_or(JoinRejection::UnknownInvite)?;
        let record: InviteRecord =
            serde_cbor::from_slice(&raw).map_err(|_| JoinRejection::UnknownInvite)?;
        let me = self.identity.device_id();
        let person = self.identity.person();
        if record.person != *person.as_bytes() {
            return Err(JoinRejection::WrongPerson);
        }
        if record.used_by.is_some() {
            return Err(JoinRejection::AlreadyUsed);
        }
        if now >= record.expires_at {
            return Err(JoinRejection::Expired);
        }
        if !verify_pair_proof(&record.secret, &me, &joiner, proof) {
            return Err(JoinRejection::BadProof);
        }
        if !self.trust.state().is_admin(&me) {
            return Err(JoinRejection::NotAdmin);
        }
        // Mark used, durably, before anything is issued. The compare-and-swap makes two
        // concurrent joins with the same invite race for one success.
        let mut used = record.clone();
        used.used_by = Some(joiner.to_string());
        let used_bytes = serde_cbor::to_vec(&used).map_err(|_| JoinRejection::UnknownInvite)?;
        match self.store.state_cas(&key, Some(&raw), Some(used_bytes)) {
            Ok(true) => {}
            Ok(false) => return Err(JoinRejection::AlreadyUsed),
            Err(_) => return Err(JoinRejection::UnknownInvite),
        }
        self.store
            .flush()
            .await
            .map_err(|_| JoinRejection::UnknownInvite)?;
        let body = CertBody::Device {
            kind,
            person,
            device: joiner,
            name: name.to_string(),
            admin: record.admin && kind.is_none(),
            issued_at: now,
        };
        let cert = self
            .identity
            .issue(body)
            .map_err(|_| JoinRejection::BadProof)?;
        self.trust
            .add(vec![cert.clone()])
            .await
            .map_err(|_| JoinRejection::UnknownInvite)?;
        tracing::info!(device = %joiner, %name, admin = record.admin, kind = kind.map(|k| k.as_str()), "device joined");
        Ok(cert)
    }
}

/// How long the server waits for a join request on a new stream.
const JOIN_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

fn invite_key(invite_id: &iom_protocol::id::ContentId) -> Vec<u8> {
    format!("{INVITE_PREFIX}{invite_id}").into_bytes()
}

/// The addresses to put in an invite: relay circuits first (they work across NATs), then
/// routable listen addresses, loopback last; wildcard and over-long addresses are left out.
fn invite_addrs(mut addrs: Vec<Multiaddr>) -> Vec<String> {
    let rank = |a: &Multiaddr| {
        let s = a.to_string();
        if s.contains("/p2p-circuit") {
            0
        } else if s.starts_with("/ip4/127.") || s.starts_with("/ip6/::1") {
            3
        } else if s.contains("/quic") {
            2
        } else {
            1
        }
    };
    addrs.sort_by_key(rank);
    addrs.dedup();
    addrs
        .into_iter()
        .filter(|a| !a.to_string().contains("/ip4/0.0.0.0"))
        .map(|a| a.to_string())
        .filter(|a| a.len() <= iom_protocol::invite::MAX_ADDR_LEN)
        .collect()
}

/// Failed join attempts per peer in the last minute.
#[derive(Default)]
struct Failures(Mutex<HashMap<PeerId, Vec<Instant>>>);

impl Failures {
    /// Failures of `peer` within the minute before `now`.
    fn recent(&self, peer: PeerId, now: Instant) -> usize {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let list = map.entry(peer).or_default();
        list.retain(|t| now.saturating_duration_since(*t) < Duration::from_secs(60));
        list.len()
    }

    /// Records a failure of `peer` at `now`. The table is bounded: past 10,000 peers it
    /// starts over.
    fn add(&self, peer: PeerId, now: Instant) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() > 10_000 {
            map.clear();
        }
        map.entry(peer).or_default().push(now);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use iom_crdt::DocKind;
    use tokio_util::compat::TokioAsyncReadCompatExt;

    use super::*;
    use crate::docs::Origin;
    use crate::testkit::{TestNode, eventually, mesh, wait_mesh};

    const TTL: Duration = Duration::from_secs(600);

    fn request(invite: &Invite, joiner: &TestNode) -> JoinRequest {
        let me = joiner.ctx().identity.device_id();
        JoinRequest {
            invite_id: invite.id(),
            joiner: me,
            name: joiner.name.clone(),
            proof: pair_proof(&invite.secret, &invite.inviter, &me),
        }
    }

    async fn invite(n: &TestNode) -> Invite {
        n.ctx()
            .pairing
            .create_invite(TTL, false)
            .await
            .expect("an admin invites")
    }

    fn rejection(r: Result<JoinResponse, JoinRejection>) -> JoinRejection {
        match r {
            Err(e) => e,
            Ok(_) => panic!("expected a rejection"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_invite_admits_exactly_one_device() {
        let a = TestNode::new("a").await;
        let b = TestNode::new("b").await;
        let c = TestNode::new("c").await;
        let inv = invite(&a).await;
        let now = crate::time::now_secs();
        let pairing = &a.ctx().pairing;
        let resp = pairing
            .admit(b.ctx().identity.peer_id(), request(&inv, &b), now)
            .await
            .expect("the first use is admitted");
        let JoinResponse::Accepted { device_cert, certs } = resp else {
            panic!("accepted");
        };
        assert!(
            matches!(device_cert.body(), CertBody::Device { device, admin: false, .. }
            if *device == b.ctx().identity.device_id())
        );
        assert!(certs.iter().any(|c| c.id() == device_cert.id()));
        assert!(
            a.ctx()
                .trust
                .state()
                .is_trusted(&b.ctx().identity.device_id())
        );
        // Second use, by anyone: refused, and nothing new is trusted.
        let again = pairing
            .admit(c.ctx().identity.peer_id(), request(&inv, &c), now)
            .await;
        assert_eq!(rejection(again), JoinRejection::AlreadyUsed);
        assert!(
            !a.ctx()
                .trust
                .state()
                .is_trusted(&c.ctx().identity.device_id())
        );
    }

    #[tokio::test(start_paused = true)]
    async fn expired_unknown_forged_and_misaddressed_requests_are_refused() {
        let a = TestNode::new("a").await;
        let b = TestNode::new("b").await;
        let pairing = &a.ctx().pairing;
        let peer = b.ctx().identity.peer_id();
        let inv = invite(&a).await;
        let now = crate::time::now_secs();

        let late = pairing.admit(peer, request(&inv, &b), inv.expires_at).await;
        assert_eq!(rejection(late), JoinRejection::Expired);

        let mut forged = request(&inv, &b);
        forged.proof[0] ^= 1;
        assert_eq!(
            rejection(pairing.admit(peer, forged, now).await),
            JoinRejection::BadProof
        );

        // The request names another device than the one on the connection.
        let mut other = request(&inv, &b);
        other.joiner = a.ctx().identity.device_id();
        assert_eq!(
            rejection(pairing.admit(peer, other, now).await),
            JoinRejection::BadProof
        );

        let mut unknown = request(&inv, &b);
        unknown.invite_id = iom_protocol::id::ContentId::from_bytes([7; 32]);
        assert_eq!(
            rejection(pairing.admit(peer, unknown, now).await),
            JoinRejection::UnknownInvite
        );
        // None of the failures used the invite up.
        assert!(pairing.admit(peer, request(&inv, &b), now).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn only_admins_invite_and_admit() {
        let nodes = mesh(&["a", "b"]).await;
        let b = &nodes[1];
        let err = b.ctx().pairing.create_invite(TTL, false).await;
        assert!(matches!(err, Err(PairError::NotAdmin)), "{err:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_exchange_over_a_stream_certifies_the_joiner_and_adopts_the_person() {
        let a = TestNode::new("a").await;
        let b = TestNode::new("b").await;
        let inv = invite(&a).await;
        let (left, right) = tokio::io::duplex(64 * 1024);
        let server = {
            let pairing = a.ctx().pairing.clone();
            let peer = b.ctx().identity.peer_id();
            tokio::spawn(async move { pairing.serve_one(peer, left.compat()).await })
        };
        b.ctx()
            .pairing
            .join_over(right.compat(), &inv, Some("laptop".into()))
            .await
            .expect("joined");
        server.await.expect("server task").expect("served");
        assert_eq!(b.ctx().identity.person(), a.ctx().identity.person());
        assert_eq!(b.ctx().trust.person(), a.ctx().identity.person());
        let state = b.ctx().trust.state();
        let me = b.ctx().identity.device_id();
        assert!(state.is_trusted(&me));
        assert_eq!(
            state.devices.get(&me).map(|d| d.name.as_str()),
            Some("laptop")
        );
        assert!(state.is_admin(&a.ctx().identity.device_id()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_reaches_the_joiner_as_its_reason() {
        let a = TestNode::new("a").await;
        let b = TestNode::new("b").await;
        let mut inv = invite(&a).await;
        inv.secret[0] ^= 1; // a tampered code: its id no longer names a stored invite
        let (left, right) = tokio::io::duplex(64 * 1024);
        let pairing = a.ctx().pairing.clone();
        let peer = b.ctx().identity.peer_id();
        let server = tokio::spawn(async move { pairing.serve_one(peer, left.compat()).await });
        let err = b.ctx().pairing.join_over(right.compat(), &inv, None).await;
        assert!(
            matches!(err, Err(PairError::Rejected(JoinRejection::UnknownInvite))),
            "{err:?}"
        );
        server.await.expect("server task").expect("served");
        assert_ne!(b.ctx().identity.person(), a.ctx().identity.person());
    }

    #[tokio::test(start_paused = true)]
    async fn garbage_and_silence_on_the_pairing_stream_are_errors() {
        let a = TestNode::new("a").await;
        let peer = libp2p::PeerId::random();
        let (left, right) = tokio::io::duplex(1024);
        let pairing = a.ctx().pairing.clone();
        let server = tokio::spawn(async move { pairing.serve_one(peer, left.compat()).await });
        let mut right = right.compat();
        write_frame(&mut right, b"\xff\x00 not a join request", 1024)
            .await
            .expect("write");
        let err = server.await.expect("server task");
        assert!(matches!(err, Err(PairError::Malformed(_))), "{err:?}");

        // Nothing sent at all: the server gives up after its timeout.
        let (left, _right) = tokio::io::duplex(1024);
        let pairing = a.ctx().pairing.clone();
        let err = pairing.serve_one(peer, left.compat()).await;
        assert!(matches!(err, Err(PairError::Timeout)), "{err:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_keeps_failing_is_rate_limited() {
        let a = TestNode::new("a").await;
        let b = TestNode::new("b").await;
        let peer = b.ctx().identity.peer_id();
        let good = invite(&a).await;
        for _ in 0..MAX_FAILURES_PER_MINUTE {
            let mut bad = good.clone();
            bad.secret[1] ^= 1;
            let (left, right) = tokio::io::duplex(64 * 1024);
            let pairing = a.ctx().pairing.clone();
            let server = tokio::spawn(async move { pairing.serve_one(peer, left.compat()).await });
            let _ = b.ctx().pairing.join_over(right.compat(), &bad, None).await;
            server.await.expect("server").expect("served");
        }
        // Even the right secret is refused now.
        let (left, right) = tokio::io::duplex(64 * 1024);
        let pairing = a.ctx().pairing.clone();
        let server = tokio::spawn(async move { pairing.serve_one(peer, left.compat()).await });
        let err = b.ctx().pairing.join_over(right.compat(), &good, None).await;
        assert!(
            matches!(err, Err(PairError::Rejected(JoinRejection::RateLimited))),
            "{err:?}"
        );
        server.await.expect("server").expect("served");
    }

    #[test]
    fn failures_are_counted_per_peer_for_one_minute() {
        let f = Failures::default();
        let (p, q) = (PeerId::random(), PeerId::random());
        let t0 = Instant::now();
        f.add(p, t0);
        f.add(p, t0 + Duration::from_secs(30));
        f.add(q, t0);
        assert_eq!(f.recent(p, t0 + Duration::from_secs(31)), 2);
        assert_eq!(f.recent(p, t0 + Duration::from_secs(61)), 1);
        assert_eq!(f.recent(p, t0 + Duration::from_secs(91)), 0);
        assert_eq!(f.recent(q, t0 + Duration::from_secs(1)), 1);
    }

    #[test]
    fn invite_addresses_put_circuits_first_and_loopback_last() {
        let addrs: Vec<Multiaddr> = [
            "/ip4/127.0.0.1/tcp/7000",
            "/ip4/0.0.0.0/tcp/7000",
            "/ip4/192.168.1.5/udp/7000/quic-v1",
            "/ip4/192.168.1.5/tcp/7000",
            "/ip4/203.0.113.9/tcp/4001/p2p/12D3KooWAv7qMkvESGQV5LbcioRqwkukvvSsjNSocafyW9xMy3D8/p2p-circuit",
            "/ip4/192.168.1.5/tcp/7000",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        let out = invite_addrs(addrs);
        assert!(out[0].ends_with("/p2p-circuit"), "{out:?}");
        assert_eq!(out[1], "/ip4/192.168.1.5/tcp/7000");
        assert_eq!(out[2], "/ip4/192.168.1.5/udp/7000/quic-v1");
        assert_eq!(out[3], "/ip4/127.0.0.1/tcp/7000");
        assert_eq!(out.len(), 4, "wildcard dropped, duplicate dropped: {out:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn joining_twice_or_from_another_mesh_is_refused_before_dialing() {
        let nodes = mesh(&["a", "b"]).await;
        let code = invite(&nodes[0]).await.encode().unwrap();
        let err = nodes[1].ctx().pairing.join(&code, None).await;
        assert!(matches!(err, Err(PairError::AlreadyMember)), "{err:?}");

        // c and d form their own mesh; c cannot then join a's.
        let others = mesh(&["c", "d"]).await;
        let err = others[0].ctx().pairing.join(&code, None).await;
        assert!(
            matches!(err, Err(PairError::OtherPerson { devices: 2 })),
            "{err:?}"
        );
    }

    /// In process, end to end: three devices pair over libp2p (memory transport), a document
    /// made on one reaches the others, and after the last one restarts (same data dir, same
    /// address), its edit comes back.
    #[tokio::test(start_paused = true)]
    async fn three_devices_pair_and_sync_in_process() {
        let mut nodes = mesh(&["a", "b", "c"]).await;
        let id = nodes[0]
            .ctx()
            .docs
            .create(DocKind::Generic)
            .await
            .expect("create");
        nodes[0]
            .ctx()
            .docs
            .modify(id, Origin::Local, false, |d| {
                Ok(d.put_json("title", serde_json::json!("groceries"), "t", 1))
            })
            .await
            .expect("edit")
            .expect("valid path");
        for n in &nodes[1..] {
            eventually("the document to arrive", || async {
                n.ctx()
                    .docs
                    .read(id, |d| d.get_json("title").ok().flatten())
                    .await
                    .ok()
                    .flatten()
                    == Some(serde_json::json!("groceries"))
            })
            .await;
        }
        nodes[2].restart().await;
        let all: Vec<&TestNode> = nodes.iter().collect();
        wait_mesh(&all).await;
        nodes[2]
            .ctx()
            .docs
            .modify(id, Origin::Local, false, |d| {
                Ok(d.put_json("done", serde_json::json!(true), "d", 2))
            })
            .await
            .expect("edit on c")
            .expect("valid path");
        eventually("the edit to come back", || async {
            nodes[0]
                .ctx()
                .docs
                .read(id, |d| d.get_json("done").ok().flatten())
                .await
                .ok()
                .flatten()
                == Some(serde_json::json!(true))
        })
        .await;
        for n in &mut nodes {
            n.stop().await;
        }
    }
}
