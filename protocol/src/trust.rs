//! Trust evaluation: a pure function from a set of certificates to the trusted devices, the
//! admins, the revoked devices and the agent holder of one person.
//!
//! [`evaluate`] reads the certificates as a *set*: the order they arrived in and duplicates
//! never change the result (it sorts and deduplicates by [`ContentId`], and computes fixpoints).
//!
//! # Rules
//!
//! 1. **Only this person's valid certificates count.** A certificate whose body names another
//!    person, whose signature does not verify, or that is signed by another person's key is
//!    ignored entirely.
//! 2. **Device chain.** A device certificate counts if it is signed by the person key, or by a
//!    device that is itself trusted *as an admin* by a certificate that counts. Chains therefore
//!    always start at the person key. This is computed as a least fixpoint (a worklist from the
//!    person-signed certificates), so the result does not depend on order.
//! 3. **Revocations.** A revocation counts if it is signed by the person key or by a device that is
//!    an admin in the chain computed *ignoring all revocations* (rule 2 on its own). Using that
//!    revocation-free chain keeps the rule order-independent and monotone: a revocation issued
//!    by an admin stays valid even if that admin is revoked later.
//! 4. **Revoked devices lose everything.** The final chain is rule 2 again, with every revoked
//!    device removed: its own certificates never count (whatever they say, whoever signed them),
//!    and it cannot act as an admin, so devices whose only chains pass through a revoked device
//!    are no longer trusted. A revoked device is never trusted again.
//! 5. **Which certificate describes a device.** When several certificates count for one device,
//!    the device is an admin if any of them says so; its name and `cert` come from the first
//!    certificate in the order (admin first, then the latest `issued_at`, then the smaller
//!    content id).
//! 6. **Agent role.** Among agent-role certificates signed by the person key or by a trusted
//!    admin (final chain) whose device is trusted, the highest `epoch` wins; a tie goes to the
//!    smaller content id. [`TrustState::next_agent_epoch`] is one more than the highest epoch of
//!    any agent-role certificate signed by the person or an admin of the revocation-free chain,
//!    so a new agent certificate always beats every earlier one.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::cert::{CertBody, Certificate, Signer};
use crate::id::ContentId;
use crate::keys::{DeviceId, PersonId};

/// A device trusted by the person, with the certificate that describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedDevice {
    /// The device's name, from its describing certificate.
    pub name: String,
    /// Whether any counting certificate makes it an admin.
    pub admin: bool,
    /// The describing certificate (see the module rules).
    pub cert: ContentId,
}

/// The device that holds the agent role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentHolder {
    /// The agent device.
    pub device: DeviceId,
    /// The winning epoch.
    pub epoch: u64,
    /// The winning agent-role certificate.
    pub cert: ContentId,
}

/// The result of [`evaluate`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustState {
    /// Trusted devices (never contains a revoked device).
    pub devices: BTreeMap<DeviceId, TrustedDevice>,
    /// Devices revoked by a counting revocation.
    pub revoked: BTreeSet<DeviceId>,
    /// The agent holder, if any valid agent-role certificate names a trusted device.
    pub agent: Option<AgentHolder>,
    /// The highest epoch of any authorised agent-role certificate (see rule 6).
    pub max_agent_epoch: Option<u64>,
}

impl TrustState {
    /// Whether `device` is trusted (has a chain to the person and is not revoked).
    pub fn is_trusted(&self, device: &DeviceId) -> bool {
        self.devices.contains_key(device)
    }

    /// Whether `device` is a trusted admin.
    pub fn is_admin(&self, device: &DeviceId) -> bool {
        self.devices.get(device).is_some_and(|d| d.admin)
    }

    /// Whether `device` has been revoked.
    pub fn is_revoked(&self, device: &DeviceId) -> bool {
        self.revoked.contains(device)
    }

    /// The trusted admin devices.
    pub fn admins(&self) -> impl Iterator<Item = &DeviceId> {
        self.devices
            .iter()
            .filter(|(_, d)| d.admin)
            .map(|(id, _)| id)
    }

    /// The epoch to put in a new agent-role certificate so that it wins.
    pub fn next_agent_epoch(&self) -> u64 {
        self.max_agent_epoch.map_or(1, |e| e.saturating_add(1))
    }
}

/// One device certificate, unpacked.
struct DeviceCert<'a> {
    id: ContentId,
    signer: Signer,
    device: DeviceId,
    name: &'a str,
    admin: bool,
    issued_at: u64,
}

/// Evaluates `certs` for `person`. See the module docs for the rules.
pub fn evaluate<'a>(
    person: &PersonId,
    certs: impl IntoIterator<Item = &'a Certificate>,
) -> TrustState {
    // Rule 1: deduplicate by content id, keep this person's certificates with good signatures.
    let mut unique: BTreeMap<ContentId, &Certificate> = BTreeMap::new();
    for cert in certs {
        if cert.body().person() == person {
            unique.entry(cert.id()).or_insert(cert);
        }
    }
    unique.retain(|_, cert| {
        let signer_ok = match cert.signer() {
            Signer::Person(p) => p == person,
            Signer::Device(_) => true,
        };
        signer_ok && cert.verify_signature().is_ok()
    });

    let mut device_certs = Vec::new();
    let mut revocations = Vec::new();
    let mut agent_certs = Vec::new();
    for (id, cert) in &unique {
        match cert.body() {
            CertBody::Device {
                device,
                name,
                admin,
                issued_at,
                ..
            } => {
                device_certs.push(DeviceCert {
                    id: *id,
                    signer: *cert.signer(),
                    device: *device,
                    name,
                    admin: *admin,
                    issued_at: *issued_at,
                });
            }
            CertBody::Revocation { device, .. } => revocations.push((*cert.signer(), *device)),
            CertBody::AgentRole { device, epoch, .. } => {
                agent_certs.push((*id, *cert.signer(), *device, *epoch));
            }
        }
    }

    // Rule 2 without revocations, then rule 3.
    let unrevoked = chain(person, &device_certs, &BTreeSet::new());
    let authorised_unrevoked = |signer: &Signer| match signer {
        Signer::Person(p) => p == person,
        Signer::Device(d) => unrevoked.get(d).is_some_and(|t| t.admin),
    };
    let revoked: BTreeSet<DeviceId> = revocations
        .iter()
        .filter(|(signer, _)| authorised_unrevoked(signer))
        .map(|(_, device)| *device)
        .collect();

    // Rule 4.
    let devices = chain(person, &device_certs, &revoked);

    // Rule 6.
    let max_agent_epoch = agent_certs
        .iter()
        .filter(|(_, signer, _, _)| authorised_unrevoked(signer))
        .map(|(_, _, _, epoch)| *epoch)
        .max();
    let authorised = |signer: &Signer| match signer {
        Signer::Person(p) => p == person,
        Signer::Device(d) => devices.get(d).is_some_and(|t| t.admin),
    };
    let agent = agent_certs
        .iter()
        .filter(|(_, signer, device, _)| authorised(signer) && devices.contains_key(device))
        // Highest epoch, then the smaller content id.
        .max_by(|a, b| a.3.cmp(&b.3).then_with(|| b.0.cmp(&a.0)))
        .map(|&(cert, _, device, epoch)| AgentHolder {
            device,
            epoch,
            cert,
        });

    TrustState {
        devices,
        revoked,
        agent,
        max_agent_epoch,
    }
}

/// Rule 2 (and 5): the devices chained to the person key, never counting any device in
/// `excluded` (neither as a subject nor as an issuer).
fn chain(
    person: &PersonId,
    certs: &[DeviceCert<'_>],
    excluded: &BTreeSet<DeviceId>,
) -> BTreeMap<DeviceId, TrustedDevice> {
    let mut by_issuer: BTreeMap<DeviceId, Vec<usize>> = BTreeMap::new();
    let mut queue = VecDeque::new();
    for (index, cert) in certs.iter().enumerate() {
        if excluded.contains(&cert.device) {
            continue;
        }
        match cert.signer {
            Signer::Person(p) if p == *person => queue.push_back(index),
            Signer::Person(_) => {}
            Signer::Device(issuer) => by_issuer.entry(issuer).or_default().push(index),
        }
    }

    let mut counted = BTreeSet::new();
    let mut admins = BTreeSet::new();
    while let Some(index) = queue.pop_front() {
        if !counted.insert(index) {
            continue;
        }
        let cert = &certs[index];
        if cert.admin
            && admins.insert(cert.device)
            && let Some(issued) = by_issuer.get(&cert.device)
        {
            queue.extend(issued.iter().copied());
        }
    }

    let mut devices: BTreeMap<DeviceId, (&DeviceCert<'_>, bool)> = BTreeMap::new();
    for cert in counted.iter().map(|&i| &certs[i]) {
        let rank = |c: &DeviceCert<'_>| (c.admin, c.issued_at, std::cmp::Reverse(c.id));
        devices
            .entry(cert.device)
            .and_modify(|(best, admin)| {
                *admin |= cert.admin;
                if rank(cert) > rank(best) {
                    *best = cert;
                }
            })
            .or_insert((cert, cert.admin));
    }
    devices
        .into_iter()
        .map(|(device, (best, admin))| {
            let trusted = TrustedDevice {
                name: best.name.to_string(),
                admin,
                cert: best.id,
            };
            (device, trusted)
        })
        .collect()
}

#[cfg(test)]
mod tests;
