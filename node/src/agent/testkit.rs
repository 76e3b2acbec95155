//! Test fixtures for the agent: a mesh of identities over one real store in a temp dir.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use iom_protocol::cert::CertBody;
use iom_protocol::keys::{DeviceKey, PersonKey};

use super::clock::ManualClock;
use super::conversations::Conversations;
use super::role::AgentRole;
use crate::docs::Docs;
use crate::identity::{Identity, SharedIdentity};
use crate::store::Store;
use crate::trust::TrustBook;

/// One person's mesh as one device's store sees it.
pub(crate) struct Mesh {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) store: Store,
    pub(crate) docs: Docs,
    pub(crate) trust: Arc<TrustBook>,
    /// The first device (holds the person key; an admin).
    pub(crate) admin: SharedIdentity,
    person: PersonKey,
    next_seed: AtomicU8,
    pub(crate) clock: Arc<ManualClock>,
}

impl Mesh {
    /// A mesh with one certified admin device holding the person key.
    pub(crate) async fn new() -> Mesh {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db"), 1 << 20).unwrap();
        let docs = Docs::new(store.clone(), vec![7; 16], 64).unwrap();
        let person = PersonKey::from_seed([200; 32]);
        let trust = Arc::new(TrustBook::load(store.clone(), person.id()).unwrap());
        let admin = SharedIdentity::new(
            Identity {
                device: DeviceKey::from_seed([1; 32]),
                person: person.id(),
                person_key: Some(PersonKey::from_seed(person.seed())),
            },
            dir.path(),
        );
        let mesh = Mesh {
            dir,
            store,
            docs,
            trust,
            admin,
            person,
            next_seed: AtomicU8::new(2),
            clock: ManualClock::new(1_700_000_000),
        };
        mesh.certify(&mesh.admin.device_id(), "admin", true).await;
        mesh
    }

    async fn certify(&self, device: &iom_protocol::keys::DeviceId, name: &str, admin: bool) {
        let cert = crate::identity::issue(
            CertBody::Device {
                person: self.person.id(),
                device: *device,
                name: name.into(),
                admin,
                issued_at: 1,
            },
            Some(&self.person),
            &DeviceKey::from_seed([1; 32]),
        )
        .unwrap();
        self.trust.add(vec![cert]).await.unwrap();
    }

    /// Another certified device of the mesh (without the person key).
    pub(crate) async fn add_device(&self, admin: bool) -> SharedIdentity {
        let seed = self.next_seed.fetch_add(1, Ordering::SeqCst);
        let device = DeviceKey::from_seed([seed; 32]);
        self.certify(&device.id(), &format!("device{seed}"), admin)
            .await;
        SharedIdentity::new(
            Identity {
                device,
                person: self.person.id(),
                person_key: None,
            },
            self.dir.path(),
        )
    }

    /// The role as `device` sees it.
    pub(crate) fn role(&self, device: &SharedIdentity) -> AgentRole {
        AgentRole::new(device.clone(), self.trust.clone())
    }

    /// Conversations of this store, timed by the mesh's manual clock.
    pub(crate) fn conversations(&self) -> Conversations {
        Conversations::new(self.docs.clone(), self.clock.clone())
    }

    /// Makes `device` the agent; returns the epoch.
    pub(crate) async fn make_agent(&self, device: &SharedIdentity) -> u64 {
        self.role(&self.admin)
            .assign(device.device_id())
            .await
            .unwrap()
    }
}
