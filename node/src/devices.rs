//! The mesh's devices as a user manages them: finding one by name or id prefix, and revoking
//! one (a revocation certificate, which wins forever on every device it reaches).

use std::sync::Arc;

use iom_protocol::cert::{CertBody, CertError};
use iom_protocol::keys::DeviceId;
use iom_protocol::trust::TrustState;

use crate::identity::SharedIdentity;
use crate::store::StoreError;
use crate::trust::TrustBook;

/// Why a device could not be found from what the user typed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// Nothing matches.
    #[error("no trusted device named or starting with {0:?} (see `iom devices`)")]
    NotFound(String),
    /// Several devices match.
    #[error("{text:?} matches {count} devices; use the full device id")]
    Ambiguous {
        /// What the user typed.
        text: String,
        /// How many devices match.
        count: usize,
    },
}

/// Finds a device by its full id, or by a unique name or id prefix among trusted devices.
pub fn resolve(state: &TrustState, text: &str) -> Result<DeviceId, ResolveError> {
    if let Ok(id) = text.parse::<DeviceId>() {
        return Ok(id);
    }
    let matches: Vec<DeviceId> = state
        .devices
        .iter()
        .filter(|(id, d)| d.name == text || id.to_string().starts_with(text))
        .map(|(id, _)| *id)
        .collect();
    match matches.as_slice() {
        [one] => Ok(*one),
        [] => Err(ResolveError::NotFound(text.into())),
        _ => Err(ResolveError::Ambiguous {
            text: text.into(),
            count: matches.len(),
        }),
    }
}

/// Why a revocation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum RevokeError {
    /// Only admin devices (or the holder of the person key) may revoke.
    #[error("only an admin device can revoke devices; run this on an admin device")]
    NotAdmin,
    /// A device cannot revoke itself.
    #[error("a device cannot revoke itself; revoke it from another admin device")]
    Itself,
    /// The certificate could not be signed (our bug).
    #[error("cannot sign the revocation: {0}")]
    Sign(#[from] CertError),
    /// The certificate could not be stored.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a revocation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// The revoked device.
    pub device: DeviceId,
    /// It was revoked already; nothing new was issued.
    pub already: bool,
    /// Devices that were trusted only through the revoked one and lost trust with it.
    pub also_untrusted: Vec<DeviceId>,
}

/// Revokes devices on behalf of this device.
#[derive(Debug, Clone)]
pub struct Devices {
    identity: SharedIdentity,
    trust: Arc<TrustBook>,
}

impl Devices {
    /// A device manager for this device.
    pub fn new(identity: SharedIdentity, trust: Arc<TrustBook>) -> Devices {
        Devices { identity, trust }
    }

    /// Issues a revocation for `target` at `now` (unix seconds). Its sessions are cut by the
    /// network as soon as the trust book changes, here and on every device it reaches.
    pub async fn revoke(&self, target: DeviceId, now: u64) -> Result<Revoked, RevokeError> {
        let me = self.identity.device_id();
        let before = self.trust.state();
        if !self.identity.holds_person_key() && !before.is_admin(&me) {
            return Err(RevokeError::NotAdmin);
        }
        if target == me {
            return Err(RevokeError::Itself);
        }
        if before.is_revoked(&target) {
            return Ok(Revoked {
                device: target,
                already: true,
                also_untrusted: Vec::new(),
            });
        }
        let cert = self.identity.issue(CertBody::Revocation {
            person: self.identity.person(),
            device: target,
            reason: "revoked with `iom devices revoke`".into(),
            issued_at: now,
        })?;
        self.trust.add(vec![cert]).await?;
        let after = self.trust.state();
        let also_untrusted = before
            .devices
            .keys()
            .filter(|d| **d != target && !after.is_trusted(d))
            .copied()
            .collect();
        Ok(Revoked {
            device: target,
            already: false,
            also_untrusted,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::testkit::{TestNode, eventually, mesh};

    fn devices(n: &TestNode) -> Devices {
        Devices::new(n.ctx().identity.clone(), n.ctx().trust.clone())
    }

    async fn join(inviter: &TestNode, joiner: &TestNode, admin: bool) {
        let code = inviter
            .ctx()
            .pairing
            .create_invite(Duration::from_secs(60), admin)
            .await
            .expect("invite")
            .encode()
            .expect("code");
        joiner.ctx().pairing.join(&code, None).await.expect("join");
    }

    #[tokio::test(start_paused = true)]
    async fn revoking_cuts_the_device_off_everywhere() {
        let nodes = mesh(&["a", "b", "c"]).await;
        let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
        let target = c.ctx().identity.device_id();
        let done = devices(a).revoke(target, 100).await.expect("revoke");
        assert_eq!(
            done,
            Revoked {
                device: target,
                already: false,
                also_untrusted: vec![]
            }
        );
        let cpeer = c.ctx().identity.peer_id();
        for n in [a, b] {
            eventually("the revocation to reach every device", || async {
                n.ctx().trust.state().is_revoked(&target)
            })
            .await;
            eventually("the revoked device's connections to close", || async {
                !n.ctx().net.connected_peers().contains(&cpeer)
            })
            .await;
            eventually("its session to end", || async {
                !n.ctx().sync.has_session(&cpeer)
            })
            .await;
        }
        // Again: nothing new.
        let again = devices(a).revoke(target, 101).await.expect("revoke again");
        assert!(again.already);
    }

    #[tokio::test(start_paused = true)]
    async fn only_admins_revoke_and_nobody_revokes_itself() {
        let nodes = mesh(&["a", "b"]).await;
        let (a, b) = (&nodes[0], &nodes[1]);
        let err = devices(b).revoke(a.ctx().identity.device_id(), 1).await;
        assert!(matches!(err, Err(RevokeError::NotAdmin)), "{err:?}");
        let err = devices(a).revoke(a.ctx().identity.device_id(), 1).await;
        assert!(matches!(err, Err(RevokeError::Itself)), "{err:?}");
        assert!(
            !a.ctx()
                .trust
                .state()
                .is_revoked(&a.ctx().identity.device_id())
        );
    }

    #[tokio::test(start_paused = true)]
    async fn devices_certified_only_by_a_revoked_admin_lose_trust_too() {
        let a = TestNode::new("a").await;
        let b = TestNode::new("b").await;
        let c = TestNode::new("c").await;
        join(&a, &b, true).await; // b is an admin
        join(&b, &c, false).await; // c is certified by b only
        let cid = c.ctx().identity.device_id();
        eventually("a to learn of c", || async {
            a.ctx().trust.state().is_trusted(&cid)
        })
        .await;
        let done = devices(&a)
            .revoke(b.ctx().identity.device_id(), 5)
            .await
            .expect("revoke b");
        assert_eq!(done.also_untrusted, vec![cid]);
        assert!(!a.ctx().trust.state().is_trusted(&cid));
    }

    #[tokio::test(start_paused = true)]
    async fn devices_resolve_by_id_name_or_unique_prefix() {
        let nodes = mesh(&["alpha", "beta"]).await;
        let state = nodes[0].ctx().trust.state();
        let beta = nodes[1].ctx().identity.device_id();
        assert_eq!(resolve(&state, &beta.to_string()), Ok(beta));
        assert_eq!(resolve(&state, "beta"), Ok(beta));
        let id = beta.to_string();
        let unique_prefix = (8..id.len())
            .map(|n| &id[..n])
            .find(|p| resolve(&state, p) == Ok(beta))
            .expect("some prefix of the id is unique");
        assert!(unique_prefix.len() < id.len());
        assert_eq!(
            resolve(&state, "gamma"),
            Err(ResolveError::NotFound("gamma".into()))
        );
        // Every id starts with the same multihash prefix: ambiguous.
        assert_eq!(
            resolve(&state, "12D3KooW"),
            Err(ResolveError::Ambiguous {
                text: "12D3KooW".into(),
                count: 2
            })
        );
    }
}
