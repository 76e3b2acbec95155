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
