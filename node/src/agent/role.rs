//! The agent role: exactly one device runs Claude requests for the mesh. The role is an
//! agent-role certificate with an epoch; the valid one with the highest epoch wins
//! ([`iom_protocol::trust`]), so assigning the role again simply issues a higher epoch.

use std::sync::Arc;

use iom_protocol::cert::{CertBody, CertError};
use iom_protocol::keys::DeviceId;
use iom_protocol::trust::TrustState;
use tokio::sync::watch;

use crate::identity::SharedIdentity;
use crate::store::StoreError;
use crate::trust::TrustBook;

/// Why the agent role could not be assigned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AssignError {
    /// This device may not issue the certificate.
    #[error("only an admin device can assign the agent role; run this on an admin device")]
    NotAdmin,
    /// The chosen device is not part of this mesh.
    #[error("{0} is not a trusted device of this mesh (see `iom devices`)")]
    NotTrusted(DeviceId),
    /// Signing the certificate failed.
    #[error("{0}")]
    Issue(#[from] CertError),
    /// Storing the certificate failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Who holds the agent role, as seen by this device; cheap to clone.
#[derive(Debug, Clone)]
pub struct AgentRole {
    identity: SharedIdentity,
    trust: Arc<TrustBook>,
}

impl AgentRole {
    /// The role as this device (`identity`) sees it in `trust`.
    pub fn new(identity: SharedIdentity, trust: Arc<TrustBook>) -> AgentRole {
        AgentRole { identity, trust }
    }

    /// This device.
    pub fn me(&self) -> DeviceId {
        self.identity.device_id()
    }

    /// The name of trusted device `id` (a device id as text), if known.
    pub fn device_name(&self, id: &str) -> Option<String> {
        let id = id.parse::<DeviceId>().ok()?;
        self.trust.state().devices.get(&id).map(|d| d.name.clone())
    }

    /// `(device, epoch)` of the current agent, if any.
    pub fn holder(&self) -> Option<(DeviceId, u64)> {
        self.trust.state().agent.map(|a| (a.device, a.epoch))
    }

    /// Whether this device holds the role; returns the epoch if so.
    pub fn my_epoch(&self) -> Option<u64> {
        let me = self.me();
        self.holder().filter(|(d, _)| *d == me).map(|(_, e)| e)
    }

    /// Changes of the trust state (the role may have moved).
    pub fn subscribe(&self) -> watch::Receiver<Arc<TrustState>> {
        self.trust.subscribe()
    }

    /// Issues an agent-role certificate for `device` with the next epoch and stores it;
    /// returns the epoch.
    pub async fn assign(&self, device: DeviceId) -> Result<u64, AssignError> {
        let state = self.trust.state();
        if !self.identity.holds_person_key() && !state.is_admin(&self.me()) {
            return Err(AssignError::NotAdmin);
        }
        if !state.is_trusted(&device) {
            return Err(AssignError::NotTrusted(device));
        }
        let epoch = state.next_agent_epoch();
        let body = CertBody::AgentRole {
            person: self.identity.person(),
            device,
            epoch,
            issued_at: crate::time::now_secs(),
        };
        let cert = self.identity.issue(body)?;
        self.trust.add(vec![cert]).await?;
        Ok(epoch)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::agent::testkit::Mesh;

    #[tokio::test]
    async fn no_holder_until_assigned() {
        let mesh = Mesh::new().await;
        let role = mesh.role(&mesh.admin);
        assert_eq!(role.holder(), None);
        assert_eq!(role.my_epoch(), None);
    }

    #[tokio::test]
    async fn assign_issues_increasing_epochs() {
        let mesh = Mesh::new().await;
        let role = mesh.role(&mesh.admin);
        let laptop = mesh.add_device(false).await;
        assert_eq!(role.assign(mesh.admin.device_id()).await.unwrap(), 1);
        assert_eq!(role.my_epoch(), Some(1));
        assert_eq!(role.assign(laptop.device_id()).await.unwrap(), 2);
        assert_eq!(role.holder(), Some((laptop.device_id(), 2)));
        // The old holder no longer holds it; the new one does, as seen from its side.
        assert_eq!(role.my_epoch(), None);
        assert_eq!(mesh.role(&laptop).my_epoch(), Some(2));
    }

    #[tokio::test]
    async fn assign_is_for_admins_only() {
        let mesh = Mesh::new().await;
        let plain = mesh.add_device(false).await;
        let e = mesh
            .role(&plain)
            .assign(plain.device_id())
            .await
            .unwrap_err();
        assert!(matches!(e, AssignError::NotAdmin), "{e:?}");
        assert_eq!(
            e.to_string(),
            "only an admin device can assign the agent role; run this on an admin device"
        );
        // An admin device without the person key may assign (signing with its device key).
        let admin = mesh.add_device(true).await;
        assert_eq!(
            mesh.role(&admin).assign(plain.device_id()).await.unwrap(),
            1
        );
        assert_eq!(mesh.role(&plain).my_epoch(), Some(1));
    }

    #[tokio::test]
    async fn assign_refuses_untrusted_devices() {
        let mesh = Mesh::new().await;
        let stranger = iom_protocol::keys::DeviceKey::from_seed([42; 32]).id();
        let e = mesh.role(&mesh.admin).assign(stranger).await.unwrap_err();
        assert!(matches!(e, AssignError::NotTrusted(d) if d == stranger));
        assert_eq!(mesh.role(&mesh.admin).holder(), None);
    }

    #[tokio::test]
    async fn subscribers_see_the_role_move() {
        let mesh = Mesh::new().await;
        let role = mesh.role(&mesh.admin);
        let mut changes = role.subscribe();
        role.assign(mesh.admin.device_id()).await.unwrap();
        assert!(changes.has_changed().unwrap());
        let state = changes.borrow_and_update().clone();
        assert_eq!(state.agent.map(|a| a.epoch), Some(1));
    }
}
