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
                kind: None,
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

/// A runner stand-in that records pokes.
#[derive(Default)]
pub(crate) struct Pokes {
    pub(crate) docs: std::sync::Mutex<Vec<iom_crdt::DocId>>,
    pub(crate) running: std::sync::atomic::AtomicUsize,
}

impl super::runner::Poke for Pokes {
    fn poke(&self, doc: iom_crdt::DocId) {
        self.docs.lock().unwrap().push(doc);
    }

    fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }
}

/// An agent link that records notifications; `offline` peers cannot be reached.
#[derive(Default)]
pub(crate) struct Link {
    pub(crate) offline: std::sync::Mutex<std::collections::HashSet<libp2p::PeerId>>,
    pub(crate) notified: std::sync::Mutex<Vec<(libp2p::PeerId, iom_crdt::DocId, String)>>,
}

impl super::ask::AgentLink for Link {
    fn is_offline(&self, peer: &libp2p::PeerId) -> bool {
        self.offline.lock().unwrap().contains(peer)
    }

    fn notify(
        &self,
        peer: libp2p::PeerId,
        doc: iom_crdt::DocId,
        request_id: String,
    ) -> futures::future::BoxFuture<
        'static,
        Result<Option<iom_protocol::wire::AgentResponse>, super::ask::NotifyError>,
    > {
        self.notified.lock().unwrap().push((peer, doc, request_id));
        Box::pin(async {
            Ok(Some(iom_protocol::wire::AgentResponse::Accepted {
                queued: 0,
            }))
        })
    }
}

/// An asking service on `device` of `mesh`, with a recording link and runner.
pub(crate) fn asking(
    mesh: &Mesh,
    device: &SharedIdentity,
) -> (Arc<super::ask::Asking>, Arc<Link>, Arc<Pokes>) {
    let (link, pokes) = (Arc::new(Link::default()), Arc::new(Pokes::default()));
    let asking = super::ask::Asking::new(super::ask::Deps {
        conversations: mesh.conversations(),
        identity: device.clone(),
        trust: mesh.trust.clone(),
        link: link.clone(),
        runner: pokes.clone(),
        gate: Arc::new(crate::sync::gate::Gate::default()),
    });
    (asking, link, pokes)
}
