//! Pairing over `/iom/pair/1`: admin devices issue single-use, expiring invites; a new device
//! proves it knows the invite secret with a MAC bound to both PeerIds (the secret never
//! travels) and receives a device certificate plus the whole trust set.
//!
//! An invite is marked used durably *before* the certificate is returned, so a crash between
//! the two can waste an invite but never issue two certificates for one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use iom_protocol::cert::CertBody;
use iom_protocol::invite::{Invite, pair_proof, verify_pair_proof};
use iom_protocol::keys::DeviceId;
use iom_protocol::pair::{JoinRejection, JoinRequest, JoinResponse, MAX_PAIR_MESSAGE_LEN};
use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};

use crate::net::framed::{read_frame, write_frame};
use crate::net::{Net, PAIR_PROTOCOL};
use crate::node::NodeCtx;

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
    Net(#[from] crate::net::NetError),
    /// The exchange broke off or was malformed.
    #[error("pairing failed: {0}")]
    Protocol(String),
    /// Local storage failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// Creates an invite; only admin devices may.
pub async fn create_invite(ctx: &NodeCtx, ttl: Duration, admin: bool) -> Result<Invite, PairError> {
    let (me, person) = {
        let id = ctx.identity();
        (id.device.id(), id.person)
    };
    if !ctx.trust.state().is_admin(&me) {
        return Err(PairError::NotAdmin);
    }
    let secret = crate::time::random_bytes::<32>();
    let expires_at = crate::time::now_secs() + ttl.as_secs();
    let mut addrs = invite_addrs(&ctx.net).await;
    addrs.truncate(iom_protocol::invite::MAX_INVITE_ADDRS);
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
        created_at: crate::time::now_secs(),
    };
    let bytes = serde_cbor::to_vec(&record).map_err(|e| PairError::Protocol(e.to_string()))?;
    ctx.store
        .state_put(format!("{INVITE_PREFIX}{}", invite.id()).as_bytes(), &bytes)?;
    ctx.store.flush().await?;
    Ok(invite)
}

/// The addresses to put in an invite: relay circuits first (they work across NATs), then
/// routable listen addresses, loopback last.
async fn invite_addrs(net: &Net) -> Vec<String> {
    let mut addrs: Vec<Multiaddr> = net.listen_addrs().await;
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

/// Joins the mesh of the invite's person. Returns the inviter's PeerId.
pub async fn join(ctx: &NodeCtx, code: &str, name: Option<String>) -> Result<PeerId, PairError> {
    let invite = Invite::parse(code, crate::time::now_secs())?;
    let (me, person) = {
        let id = ctx.identity();
        (id.device.id(), id.person)
    };
    let state = ctx.trust.state();
    if person == invite.person && state.is_trusted(&me) {
        return Err(PairError::AlreadyMember);
    }
    let others = state.devices.keys().filter(|d| **d != me).count();
    if person != invite.person && others > 0 {
        return Err(PairError::OtherPerson {
            devices: others + 1,
        });
    }
    let inviter = invite.inviter.to_peer_id();
    let addrs: Vec<Multiaddr> = invite.addrs.iter().filter_map(|a| a.parse().ok()).collect();
    ctx.net.dial(Some(inviter), addrs).await?;
    let mut stream = ctx.net.open(inviter, PAIR_PROTOCOL).await?;
    let request = JoinRequest {
        invite_id: invite.id(),
        joiner: me,
        name: name.unwrap_or_else(|| ctx.config.name.clone()),
        proof: pair_proof(&invite.secret, &invite.inviter, &me),
    };
    let payload = request
        .encode()
        .map_err(|e| PairError::Protocol(e.to_string()))?;
    write_frame(&mut stream, &payload, MAX_PAIR_MESSAGE_LEN)
        .await
        .map_err(|e| PairError::Protocol(e.to_string()))?;
    let reply = read_frame(&mut stream, MAX_PAIR_MESSAGE_LEN)
        .await
        .map_err(|e| PairError::Protocol(e.to_string()))?
        .ok_or_else(|| PairError::Protocol("the inviter closed the stream".into()))?;
    let response = JoinResponse::decode(&reply).map_err(|e| PairError::Protocol(e.to_string()))?;
    let (device_cert, certs) = match response {
        JoinResponse::Accepted { device_cert, certs } => (device_cert, certs),
        JoinResponse::Rejected(r) => return Err(PairError::Rejected(r)),
    };
    match device_cert.body() {
        CertBody::Device { person, device, .. } if *person == invite.person && *device == me => {}
        _ => {
            return Err(PairError::Protocol(
                "the inviter returned a certificate for someone else".into(),
            ));
        }
    }
    if person != invite.person {
        ctx.adopt_person(invite.person)
            .map_err(|e| PairError::Protocol(e.to_string()))?;
    }
    let mut all = certs;
    all.push(device_cert);
    ctx.trust.add(all).await?;
    if !ctx.trust.state().is_trusted(&me) {
        return Err(PairError::Protocol(
            "the certificates received do not make this device trusted".into(),
        ));
    }
    Ok(inviter)
}

/// Serves `/iom/pair/1` until the node stops.
pub fn spawn_server(ctx: Arc<NodeCtx>) {
    let mut control = ctx.net.control();
    let Ok(mut incoming) = control.accept(PAIR_PROTOCOL) else {
        tracing::error!("pairing protocol already registered");
        return;
    };
    let failures: Arc<Mutex<HashMap<PeerId, Vec<Instant>>>> = Arc::default();
    tokio::spawn(async move {
        while let Some((peer, stream)) = incoming.next().await {
            let ctx = ctx.clone();
            let failures = failures.clone();
            tokio::spawn(async move {
                if let Err(e) = serve_one(&ctx, peer, stream, &failures).await {
                    tracing::info!(%peer, error = %e, "pairing attempt failed");
                }
            });
        }
    });
}

fn failures_recent(
    failures: &Mutex<HashMap<PeerId, Vec<Instant>>>,
    peer: PeerId,
    add: bool,
) -> usize {
    let mut map = failures.lock().unwrap_or_else(|e| e.into_inner());
    if map.len() > 10_000 {
        map.clear();
    }
    let list = map.entry(peer).or_default();
    list.retain(|t| t.elapsed() < Duration::from_secs(60));
    if add {
        list.push(Instant::now());
    }
    list.len()
}

async fn serve_one(
    ctx: &NodeCtx,
    peer: PeerId,
    mut stream: libp2p::Stream,
    failures: &Mutex<HashMap<PeerId, Vec<Instant>>>,
) -> Result<(), PairError> {
    let frame = tokio::time::timeout(Duration::from_secs(10), read_frame(&mut stream, 64 * 1024))
        .await
        .map_err(|_| PairError::Protocol("timed out waiting for the join request".into()))?
        .map_err(|e| PairError::Protocol(e.to_string()))?
        .ok_or_else(|| PairError::Protocol("empty stream".into()))?;
    let response = if failures_recent(failures, peer, false) >= MAX_FAILURES_PER_MINUTE {
        JoinResponse::Rejected(JoinRejection::RateLimited)
    } else {
        match JoinRequest::decode(&frame) {
            Err(e) => {
                failures_recent(failures, peer, true);
                return Err(PairError::Protocol(format!("malformed join request: {e}")));
            }
            Ok(req) => match admit(ctx, peer, req).await {
                Ok(resp) => resp,
                Err(rejection) => {
                    failures_recent(failures, peer, true);
                    tracing::warn!(%peer, reason = %rejection, "join refused");
                    JoinResponse::Rejected(rejection)
                }
            },
        }
    };
    let payload = response
        .encode()
        .map_err(|e| PairError::Protocol(e.to_string()))?;
    write_frame(&mut stream, &payload, MAX_PAIR_MESSAGE_LEN)
        .await
        .map_err(|e| PairError::Protocol(e.to_string()))?;
    let _ = futures::AsyncWriteExt::close(&mut stream).await;
    Ok(())
}

async fn admit(
    ctx: &NodeCtx,
    peer: PeerId,
    req: JoinRequest,
) -> Result<JoinResponse, JoinRejection> {
    let joiner = DeviceId::from_peer_id(&peer).map_err(|_| JoinRejection::BadProof)?;
    if joiner != req.joiner {
        return Err(JoinRejection::BadProof);
    }
    let key = format!("{INVITE_PREFIX}{}", req.invite_id);
    let raw = ctx
        .store
        .state_get(key.as_bytes())
        .map_err(|_| JoinRejection::UnknownInvite)?
        .ok_or(JoinRejection::UnknownInvite)?;
    let record: InviteRecord =
        serde_cbor::from_slice(&raw).map_err(|_| JoinRejection::UnknownInvite)?;
    let (me, person, signer) = {
        let id = ctx.identity();
        (
            id.device.id(),
            id.person,
            id.person_key.as_ref().map(|k| k.seed()),
        )
    };
    if record.person != *person.as_bytes() {
        return Err(JoinRejection::WrongPerson);
    }
    if record.used_by.is_some() {
        return Err(JoinRejection::AlreadyUsed);
    }
    if crate::time::now_secs() >= record.expires_at {
        return Err(JoinRejection::Expired);
    }
    if !verify_pair_proof(&record.secret, &me, &joiner, &req.proof) {
        return Err(JoinRejection::BadProof);
    }
    if !ctx.trust.state().is_admin(&me) {
        return Err(JoinRejection::NotAdmin);
    }
    // Mark used, durably, before anything is issued. The compare-and-swap makes two
    // concurrent joins with the same invite race for one success.
    let mut used = record.clone();
    used.used_by = Some(peer.to_string());
    let used_bytes = serde_cbor::to_vec(&used).map_err(|_| JoinRejection::UnknownInvite)?;
    match ctx
        .store
        .state_cas(key.as_bytes(), Some(&raw), Some(used_bytes))
    {
        Ok(true) => {}
        Ok(false) => return Err(JoinRejection::AlreadyUsed),
        Err(_) => return Err(JoinRejection::UnknownInvite),
    }
    ctx.store
        .flush()
        .await
        .map_err(|_| JoinRejection::UnknownInvite)?;
    let body = CertBody::Device {
        person,
        device: joiner,
        name: req.name.clone(),
        admin: record.admin,
        issued_at: crate::time::now_secs(),
    };
    let person_key = signer.map(iom_protocol::keys::PersonKey::from_seed);
    let cert = crate::identity::issue(body, person_key.as_ref(), &ctx.identity().device)
        .map_err(|_| JoinRejection::BadProof)?;
    ctx.trust
        .add(vec![cert.clone()])
        .await
        .map_err(|_| JoinRejection::UnknownInvite)?;
    tracing::info!(device = %joiner, name = %req.name, admin = record.admin, "device joined");
    Ok(JoinResponse::Accepted {
        device_cert: cert,
        certs: ctx.trust.certs(),
    })
}
