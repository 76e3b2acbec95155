//! The trust book: every certificate this node holds (stored as content-addressed objects), the
//! [`TrustState`] evaluated from them, and a watch channel that tells the network when it
//! changes (so a revoked device is cut off at once).

use std::sync::{Arc, RwLock};

use iom_protocol::cert::{CertBody, Certificate, Signer};
use iom_protocol::id::ContentId;
use iom_protocol::keys::{DeviceId, PersonId};
use iom_protocol::trust::{TrustState, evaluate};
use tokio::sync::watch;

use crate::store::{Store, StoreError};

/// Most certificates accepted from a peer in one message.
pub const MAX_CERTS_PER_MESSAGE: usize = 4096;

struct Book {
    person: PersonId,
    certs: Vec<Certificate>,
}

/// The node's certificates and their evaluation.
pub struct TrustBook {
    store: Store,
    book: RwLock<Book>,
    tx: watch::Sender<Arc<TrustState>>,
}

impl std::fmt::Debug for TrustBook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustBook").finish_non_exhaustive()
    }
}

impl TrustBook {
    /// Loads every stored certificate. Objects that are not certificates are ignored.
    pub fn load(store: Store, person: PersonId) -> Result<TrustBook, StoreError> {
        let mut certs = Vec::new();
        for (_, bytes) in store.objects()? {
            if let Ok(cert) = Certificate::from_bytes(&bytes) {
                certs.push(cert);
            }
        }
        let state = evaluate(&person, certs.iter());
        let (tx, _) = watch::channel(Arc::new(state));
        Ok(TrustBook {
            store,
            book: RwLock::new(Book { person, certs }),
            tx,
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Book> {
        self.book.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The current evaluation.
    pub fn state(&self) -> Arc<TrustState> {
        self.tx.borrow().clone()
    }

    /// Watches the evaluation.
    pub fn subscribe(&self) -> watch::Receiver<Arc<TrustState>> {
        self.tx.subscribe()
    }

    /// The person this node belongs to.
    pub fn person(&self) -> PersonId {
        self.read().person
    }

    /// Every certificate held.
    pub fn certs(&self) -> Vec<Certificate> {
        self.read().certs.clone()
    }

    /// Ids of every certificate held.
    pub fn cert_ids(&self) -> Vec<ContentId> {
        self.read().certs.iter().map(Certificate::id).collect()
    }

    /// The certificates that make `device` trusted: its device certificates and, recursively,
    /// those of the admin devices that signed them.
    pub fn chain_for(&self, device: &DeviceId) -> Vec<Certificate> {
        let book = self.read();
        let mut out: Vec<Certificate> = Vec::new();
        let mut todo = vec![*device];
        let mut seen = std::collections::BTreeSet::new();
        while let Some(d) = todo.pop() {
            if !seen.insert(d) {
                continue;
            }
            for c in &book.certs {
                if let CertBody::Device { device, .. } = c.body()
                    && *device == d
                {
                    if let Signer::Device(signer) = c.signer() {
                        todo.push(*signer);
                    }
                    out.push(c.clone());
                }
            }
        }
        out
    }

    /// Adds certificates (already signature-checked by decoding). Certificates for another
    /// person are dropped. Stores the new ones durably, re-evaluates, and returns whether
    /// anything new was learned.
    pub async fn add(&self, certs: Vec<Certificate>) -> Result<bool, StoreError> {
        let fresh: Vec<Certificate> = {
            let book = self.read();
            let known: std::collections::HashSet<ContentId> =
                book.certs.iter().map(Certificate::id).collect();
            let mut seen = std::collections::HashSet::new();
            certs
                .into_iter()
                .filter(|c| c.body().person() == &book.person && c.verify_signature().is_ok())
                .filter(|c| !known.contains(&c.id()) && seen.insert(c.id()))
                .collect()
        };
        if fresh.is_empty() {
            return Ok(false);
        }
        for c in &fresh {
            self.store.put_object(&c.to_bytes())?;
        }
        self.store.flush().await?;
        let state = {
            let mut book = self.book.write().unwrap_or_else(|e| e.into_inner());
            book.certs.extend(fresh);
            evaluate(&book.person, book.certs.iter())
        };
        self.tx.send_replace(Arc::new(state));
        Ok(true)
    }

    /// Switches to another person (after joining their mesh) and re-evaluates.
    pub fn set_person(&self, person: PersonId) {
        let state = {
            let mut book = self.book.write().unwrap_or_else(|e| e.into_inner());
            book.person = person;
            evaluate(&book.person, book.certs.iter())
        };
        self.tx.send_replace(Arc::new(state));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use iom_protocol::keys::{DeviceKey, PersonKey};

    use super::*;

    fn person(n: u8) -> PersonKey {
        PersonKey::from_seed([n; 32])
    }

    fn device(n: u8) -> DeviceKey {
        DeviceKey::from_seed([n; 32])
    }

    fn by_person(p: &PersonKey, d: u8, admin: bool) -> Certificate {
        let body = CertBody::Device {
            kind: None,
            person: p.id(),
            device: device(d).id(),
            name: format!("d{d}"),
            admin,
            issued_at: 1,
        };
        Certificate::issue_by_person(body, p).unwrap()
    }

    fn by_device(p: &PersonKey, signer: u8, d: u8) -> Certificate {
        let body = CertBody::Device {
            kind: None,
            person: p.id(),
            device: device(d).id(),
            name: format!("d{d}"),
            admin: false,
            issued_at: 2,
        };
        Certificate::issue_by_device(body, &device(signer)).unwrap()
    }

    fn revocation(p: &PersonKey, d: u8) -> Certificate {
        let body = CertBody::Revocation {
            person: p.id(),
            device: device(d).id(),
            reason: "lost".into(),
            issued_at: 3,
        };
        Certificate::issue_by_person(body, p).unwrap()
    }

    fn book(p: &PersonKey) -> (tempfile::TempDir, Store, TrustBook) {
        let (dir, store) = crate::store::temp_store();
        let book = TrustBook::load(store.clone(), p.id()).unwrap();
        (dir, store, book)
    }

    #[tokio::test]
    async fn added_certificates_are_stored_evaluated_and_watched() {
        let p = person(1);
        let (_dir, store, book) = book(&p);
        let mut watch = book.subscribe();
        assert!(!book.state().is_trusted(&device(2).id()));
        let cert = by_person(&p, 2, true);
        assert!(book.add(vec![cert.clone()]).await.unwrap());
        assert!(book.state().is_trusted(&device(2).id()));
        assert!(watch.has_changed().unwrap());
        assert!(watch.borrow_and_update().is_trusted(&device(2).id()));
        assert!(store.has_object(cert.id().as_bytes()).unwrap());
        assert_eq!(book.cert_ids(), vec![cert.id()]);
        assert_eq!(book.certs(), vec![cert]);
    }

    #[tokio::test]
    async fn known_duplicate_and_foreign_certificates_teach_nothing() {
        let p = person(1);
        let (_dir, store, book) = book(&p);
        let cert = by_person(&p, 2, true);
        // Twice in one batch: stored once.
        assert!(book.add(vec![cert.clone(), cert.clone()]).await.unwrap());
        assert_eq!(book.certs().len(), 1);
        let watch = book.subscribe();
        assert!(!book.add(vec![cert]).await.unwrap(), "already known");
        // A certificate of another person's mesh is dropped.
        let other = by_person(&person(9), 3, true);
        assert!(!book.add(vec![other.clone()]).await.unwrap());
        assert!(!store.has_object(other.id().as_bytes()).unwrap());
        assert!(!watch.has_changed().unwrap(), "no re-evaluation announced");
    }

    #[tokio::test]
    async fn loading_evaluates_stored_certificates_and_skips_other_objects() {
        let p = person(1);
        let (_dir, store, book) = book(&p);
        book.add(vec![by_person(&p, 2, true)]).await.unwrap();
        store.put_object(b"not a certificate").unwrap();
        let again = TrustBook::load(store.clone(), p.id()).unwrap();
        assert!(again.state().is_trusted(&device(2).id()));
        assert_eq!(again.certs().len(), 1);
        assert_eq!(again.person(), p.id());
    }

    #[tokio::test]
    async fn a_revocation_wins_whatever_the_arrival_order() {
        let p = person(1);
        let (_a, _sa, first) = book(&p);
        first.add(vec![by_person(&p, 2, true)]).await.unwrap();
        first.add(vec![revocation(&p, 2)]).await.unwrap();
        let (_b, _sb, second) = book(&p);
        second.add(vec![revocation(&p, 2)]).await.unwrap();
        second.add(vec![by_person(&p, 2, true)]).await.unwrap();
        for book in [first, second] {
            let state = book.state();
            assert!(!state.is_trusted(&device(2).id()));
            assert!(state.is_revoked(&device(2).id()));
        }
    }

    #[tokio::test]
    async fn devices_certified_by_a_revoked_admin_lose_trust() {
        let p = person(1);
        let (_dir, _store, book) = book(&p);
        book.add(vec![by_person(&p, 2, true), by_device(&p, 2, 3)])
            .await
            .unwrap();
        assert!(book.state().is_trusted(&device(3).id()));
        book.add(vec![revocation(&p, 2)]).await.unwrap();
        assert!(!book.state().is_trusted(&device(3).id()));
    }

    #[tokio::test]
    async fn a_chain_runs_from_the_device_through_the_admins_that_signed() {
        let p = person(1);
        let (_dir, _store, book) = book(&p);
        let root = by_person(&p, 2, true);
        let phone = by_device(&p, 2, 3);
        let unrelated = by_person(&p, 4, false);
        book.add(vec![root.clone(), phone.clone(), unrelated])
            .await
            .unwrap();
        let mut chain: Vec<ContentId> = book
            .chain_for(&device(3).id())
            .iter()
            .map(Certificate::id)
            .collect();
        chain.sort();
        let mut expected = vec![root.id(), phone.id()];
        expected.sort();
        assert_eq!(chain, expected);
        assert_eq!(book.chain_for(&device(2).id()), vec![root]);
        assert!(book.chain_for(&device(8).id()).is_empty());
    }

    #[tokio::test]
    async fn a_chain_with_a_cycle_ends() {
        let p = person(1);
        let (_dir, _store, book) = book(&p);
        // 2 and 3 certify each other (neither chain reaches the person key).
        book.add(vec![by_device(&p, 2, 3), by_device(&p, 3, 2)])
            .await
            .unwrap();
        assert_eq!(book.chain_for(&device(3).id()).len(), 2);
        assert!(!book.state().is_trusted(&device(3).id()));
    }

    #[tokio::test]
    async fn switching_person_re_evaluates_and_notifies() {
        let (a, b) = (person(1), person(2));
        let (_dir, _store, book) = book(&a);
        book.add(vec![by_person(&a, 3, true)]).await.unwrap();
        let watch = book.subscribe();
        book.set_person(b.id());
        assert_eq!(book.person(), b.id());
        assert!(watch.has_changed().unwrap());
        assert!(!book.state().is_trusted(&device(3).id()));
        // Certificates of the new person are accepted now.
        assert!(book.add(vec![by_person(&b, 4, true)]).await.unwrap());
        assert!(book.state().is_trusted(&device(4).id()));
    }
}
