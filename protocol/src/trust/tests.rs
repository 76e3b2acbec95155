use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use proptest::prelude::*;

use super::*;
use crate::cert::signing_input;
use crate::keys::{DeviceKey, PersonKey};

const DEVICES: u8 = 6;

/// Key derivation is slow in debug builds; derive each test key once.
struct Keys {
    person: PersonKey,
    other_person: PersonKey,
    devices: Vec<DeviceKey>,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| Keys {
        person: PersonKey::from_seed([1; 32]),
        other_person: PersonKey::from_seed([2; 32]),
        devices: (0..DEVICES)
            .map(|n| DeviceKey::from_seed([10 + n; 32]))
            .collect(),
    })
}

fn person() -> &'static PersonKey {
    &keys().person
}

fn other_person() -> &'static PersonKey {
    &keys().other_person
}

fn key(n: u8) -> &'static DeviceKey {
    &keys().devices[usize::from(n)]
}

fn dev(n: u8) -> DeviceId {
    key(n).id()
}

fn device_body(n: u8, name: &str, admin: bool) -> CertBody {
    CertBody::Device {
        kind: None,
        person: person().id(),
        device: dev(n),
        name: name.into(),
        admin,
        issued_at: 1,
    }
}

fn by_person(body: CertBody) -> Certificate {
    Certificate::issue_by_person(body, person()).unwrap()
}

fn by_device(body: CertBody, n: u8) -> Certificate {
    Certificate::issue_by_device(body, key(n)).unwrap()
}

fn revocation(n: u8) -> CertBody {
    CertBody::Revocation {
        person: person().id(),
        device: dev(n),
        reason: "lost".into(),
        issued_at: 2,
    }
}

fn agent(n: u8, epoch: u64) -> CertBody {
    CertBody::AgentRole {
        person: person().id(),
        device: dev(n),
        epoch,
        issued_at: 3,
    }
}

fn eval(certs: &[Certificate]) -> TrustState {
    evaluate(&person().id(), certs)
}

#[test]
fn empty_set_trusts_nobody() {
    let state = eval(&[]);
    assert!(state.devices.is_empty());
    assert_eq!(state.agent, None);
    assert_eq!(state.next_agent_epoch(), 1);
}

#[test]
fn person_signed_device_is_trusted() {
    let cert = by_person(device_body(0, "laptop", false));
    let state = eval(std::slice::from_ref(&cert));
    assert!(state.is_trusted(&dev(0)));
    assert!(!state.is_admin(&dev(0)));
    assert_eq!(
        state.devices[&dev(0)],
        TrustedDevice {
            name: "laptop".into(),
            admin: false,
            cert: cert.id()
        }
    );
}

#[test]
fn admin_chain_is_followed_transitively() {
    let certs = [
        by_person(device_body(0, "a", true)),
        by_device(device_body(1, "b", true), 0),
        by_device(device_body(2, "c", false), 1),
    ];
    let state = eval(&certs);
    assert!(state.is_admin(&dev(0)) && state.is_admin(&dev(1)));
    assert!(state.is_trusted(&dev(2)) && !state.is_admin(&dev(2)));
    assert_eq!(state.admins().count(), 2);
}

#[test]
fn non_admin_cannot_issue() {
    let certs = [
        by_person(device_body(0, "a", false)),
        by_device(device_body(1, "b", false), 0),
    ];
    let state = eval(&certs);
    assert!(state.is_trusted(&dev(0)));
    assert!(!state.is_trusted(&dev(1)));
}

#[test]
fn chain_must_start_at_the_person_key() {
    // Two devices vouching for each other, with no person-signed root.
    let certs = [
        by_device(device_body(0, "a", true), 1),
        by_device(device_body(1, "b", true), 0),
    ];
    assert!(eval(&certs).devices.is_empty());
}

#[test]
fn other_persons_certificates_never_count() {
    let other = other_person();
    let body = CertBody::Device {
        kind: None,
        person: other.id(),
        device: dev(0),
        name: "x".into(),
        admin: true,
        issued_at: 0,
    };
    let theirs = Certificate::issue_by_person(body, other).unwrap();
    // Our person's body, signed by the other person's key.
    let body = device_body(1, "y", true);
    let signer = Signer::Person(other.id());
    let sig = other.sign(&signing_input(&body, &signer).unwrap());
    let cross = Certificate::from_parts_unchecked(body, signer, sig);
    assert_eq!(cross.verify_signature(), Ok(()));
    assert_eq!(eval(&[theirs, cross]), TrustState::default());
}

#[test]
fn forged_certificates_never_count() {
    let good = by_person(device_body(0, "a", true));
    let mut sig = *good.signature();
    sig[5] ^= 1;
    let forged = Certificate::from_parts_unchecked(device_body(1, "b", true), *good.signer(), sig);
    let state = eval(&[forged]);
    assert!(state.devices.is_empty());
}

#[test]
fn revocation_cuts_the_device_and_its_descendants() {
    let certs = vec![
        by_person(device_body(0, "a", true)),
        by_device(device_body(1, "b", true), 0),
        by_device(device_body(2, "c", false), 1),
        by_person(device_body(3, "d", false)),
        by_person(revocation(1)),
    ];
    let state = eval(&certs);
    assert!(state.is_trusted(&dev(0)));
    assert!(state.is_revoked(&dev(1)) && !state.is_trusted(&dev(1)));
    // Only chain of 2 went through 1.
    assert!(!state.is_trusted(&dev(2)));
    assert!(state.is_trusted(&dev(3)));
}

#[test]
fn second_chain_keeps_a_device_trusted() {
    let certs = vec![
        by_person(device_body(0, "a", true)),
        by_person(device_body(1, "b", true)),
        by_device(device_body(2, "c", false), 1),
        by_device(device_body(2, "c", false), 0),
        by_person(revocation(1)),
    ];
    let state = eval(&certs);
    assert!(state.is_trusted(&dev(2)));
    assert_eq!(state.devices[&dev(2)].cert, certs[3].id());
}

#[test]
fn revoked_device_is_never_trusted_again() {
    let certs = vec![
        by_person(revocation(0)),
        by_person(device_body(0, "again", true)),
        by_person(device_body(1, "admin", true)),
        by_device(device_body(0, "again2", false), 1),
    ];
    let state = eval(&certs);
    assert!(!state.is_trusted(&dev(0)));
    assert!(state.is_revoked(&dev(0)));
}

#[test]
fn revocation_by_admin_counts_even_after_the_admin_is_revoked() {
    let certs = vec![
        by_person(device_body(0, "a", true)),
        by_person(device_body(1, "b", false)),
        by_device(revocation(1), 0),
        by_person(revocation(0)),
    ];
    let state = eval(&certs);
    assert_eq!(state.revoked, [dev(0), dev(1)].into_iter().collect());
    assert!(state.devices.is_empty());
}

#[test]
fn revocation_by_non_admin_does_not_count() {
    let certs = vec![
        by_person(device_body(0, "a", false)),
        by_person(device_body(1, "b", false)),
        by_device(revocation(1), 0),
    ];
    let state = eval(&certs);
    assert!(state.revoked.is_empty());
    assert!(state.is_trusted(&dev(1)));
}

#[test]
fn admin_flag_from_any_certificate_and_name_from_the_best() {
    let certs = vec![
        by_person(device_body(0, "plain", false)),
        by_person(device_body(0, "boss", true)),
    ];
    let state = eval(&certs);
    assert_eq!(state.devices[&dev(0)].name, "boss");
    assert!(state.is_admin(&dev(0)));
}

#[test]
fn agent_highest_epoch_wins() {
    let certs = vec![
        by_person(device_body(0, "a", true)),
        by_person(device_body(1, "b", false)),
        by_person(agent(0, 1)),
        by_device(agent(1, 2), 0),
        by_person(agent(2, 9)), // device 2 is not trusted
    ];
    let state = eval(&certs);
    let holder = state.agent.unwrap();
    assert_eq!(
        (holder.device, holder.epoch, holder.cert),
        (dev(1), 2, certs[3].id())
    );
    assert_eq!(state.next_agent_epoch(), 10);
}

#[test]
fn agent_tie_goes_to_the_smaller_content_id() {
    let certs = vec![
        by_person(device_body(0, "a", false)),
        by_person(device_body(1, "b", false)),
        by_person(agent(0, 5)),
        by_person(agent(1, 5)),
    ];
    let state = eval(&certs);
    let expected = certs[2].id().min(certs[3].id());
    assert_eq!(state.agent.unwrap().cert, expected);
}

#[test]
fn agent_issued_by_non_admin_or_revoked_device_is_ignored() {
    let certs = vec![
        by_person(device_body(0, "a", false)),
        by_person(device_body(1, "b", true)),
        by_device(agent(0, 3), 0),
        by_person(agent(1, 1)),
        by_person(revocation(1)),
    ];
    let state = eval(&certs);
    assert_eq!(state.agent, None);
    assert_eq!(state.next_agent_epoch(), 2);
}

// ---- property tests ----

/// A certificate drawn from a small universe, so that chains and conflicts are common.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Spec {
    /// 0 = device, 1 = revocation, 2 = agent role.
    kind: u8,
    subject: u8,
    /// `None` = the person key; `Some(n)` = device n.
    signer: Option<u8>,
    admin: bool,
    epoch: u64,
    /// Signed by (and/or about) the other person.
    wrong_person: bool,
    /// Signature bit-flipped.
    forged: bool,
}

impl Spec {
    fn is_bad(&self) -> bool {
        self.wrong_person || self.forged
    }

    fn certificate(&self) -> Certificate {
        static CACHE: OnceLock<Mutex<HashMap<Spec, Certificate>>> = OnceLock::new();
        let cache = CACHE.get_or_init(Default::default);
        if let Some(cert) = cache.lock().unwrap().get(self) {
            return cert.clone();
        }
        let cert = self.build();
        cache.lock().unwrap().insert(*self, cert.clone());
        cert
    }

    fn build(&self) -> Certificate {
        let owner = if self.wrong_person && self.subject.is_multiple_of(2) {
            other_person()
        } else {
            person()
        };
        let device = dev(self.subject);
        let body = match self.kind {
            0 => CertBody::Device {
                kind: None,
                person: owner.id(),
                device,
                name: format!("d{}", self.subject),
                admin: self.admin,
                issued_at: self.epoch,
            },
            1 => CertBody::Revocation {
                person: owner.id(),
                device,
                reason: String::new(),
                issued_at: 0,
            },
            _ => CertBody::AgentRole {
                person: owner.id(),
                device,
                epoch: self.epoch,
                issued_at: 0,
            },
        };
        // Wrong person with no device signer: signed by the other person's key (for an odd
        // subject that is our person's body signed by the other person).
        let person_key = if self.wrong_person {
            other_person()
        } else {
            person()
        };
        let signer = match self.signer {
            None => Signer::Person(person_key.id()),
            Some(n) => Signer::Device(dev(n)),
        };
        let input = signing_input(&body, &signer).unwrap();
        let mut signature = match self.signer {
            None => person_key.sign(&input),
            Some(n) => key(n).sign(&input),
        };
        if self.forged {
            signature[(self.epoch as usize) % 64] ^= 0x10;
        }
        Certificate::from_parts_unchecked(body, signer, signature)
    }
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        prop_oneof![5 => Just(0u8), 2 => Just(1u8), 3 => Just(2u8)],
        0..DEVICES,
        prop_oneof![2 => Just(None), 3 => (0..DEVICES).prop_map(Some)],
        any::<bool>(),
        0u64..4,
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.1),
    )
        .prop_map(
            |(kind, subject, signer, admin, epoch, wrong_person, forged)| Spec {
                kind,
                subject,
                signer,
                admin,
                epoch,
                // A device signer can't be "the other person"; wrong_person then only changes
                // the body's person (even subjects) or nothing (odd subjects).
                wrong_person: wrong_person && (signer.is_none() || subject % 2 == 0),
                forged,
            },
        )
}

fn certs_of(specs: &[Spec]) -> Vec<Certificate> {
    specs.iter().map(Spec::certificate).collect()
}

fn admins(state: &TrustState) -> BTreeSet<DeviceId> {
    state.admins().copied().collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn invariant_under_permutation_and_duplication(
        specs in prop::collection::vec(spec(), 0..14),
        order in any::<prop::sample::Index>(),
        dups in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
        rotate in 0usize..14,
    ) {
        let certs = certs_of(&specs);
        let base = eval(&certs);
        let mut shuffled = certs.clone();
        if !shuffled.is_empty() {
            let len = shuffled.len();
            shuffled.rotate_left(rotate % len);
            let swap = order.index(shuffled.len());
            shuffled.swap(0, swap);
            shuffled.reverse();
            for d in &dups {
                let extra = shuffled[d.index(shuffled.len())].clone();
                shuffled.push(extra);
            }
        }
        prop_assert_eq!(eval(&shuffled), base);
    }

    #[test]
    fn shuffled_sets_agree(specs in prop::collection::vec(spec(), 0..14).prop_shuffle()) {
        let certs = certs_of(&specs);
        let mut sorted = certs.clone();
        sorted.sort_by_key(Certificate::id);
        prop_assert_eq!(eval(&certs), eval(&sorted));
    }

    #[test]
    fn forged_or_wrong_person_certificates_never_change_anything(
        specs in prop::collection::vec(spec(), 0..16),
    ) {
        let all = certs_of(&specs);
        let good: Vec<Spec> = specs.iter().copied().filter(|s| !s.is_bad()).collect();
        prop_assert_eq!(eval(&all), eval(&certs_of(&good)));
    }

    #[test]
    fn revoked_devices_are_never_trusted(specs in prop::collection::vec(spec(), 0..16)) {
        let state = eval(&certs_of(&specs));
        for device in &state.revoked {
            prop_assert!(!state.devices.contains_key(device));
        }
        if let Some(agent) = state.agent {
            prop_assert!(state.is_trusted(&agent.device));
            prop_assert!(agent.epoch < state.next_agent_epoch());
        }
    }

    #[test]
    fn adding_a_revocation_never_adds_trust(
        specs in prop::collection::vec(spec(), 0..14),
        extra in spec(),
    ) {
        let revocation = Spec { kind: 1, ..extra };
        let before = eval(&certs_of(&specs));
        let mut more = specs.clone();
        more.push(revocation);
        let after = eval(&certs_of(&more));
        let before_devices: BTreeSet<_> = before.devices.keys().collect();
        let after_devices: BTreeSet<_> = after.devices.keys().collect();
        prop_assert!(after_devices.is_subset(&before_devices));
        prop_assert!(admins(&after).is_subset(&admins(&before)));
        prop_assert!(before.revoked.is_subset(&after.revoked));
    }
}

/// The generator must produce the interesting cases the properties talk about, or they would
/// pass vacuously.
#[test]
fn generator_covers_chains_revocations_and_agents() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    let mut runner = TestRunner::deterministic();
    let strategy = prop::collection::vec(spec(), 0..16);
    let (mut via_admin, mut revoked_trusted_elsewhere, mut agents, mut bad) = (0, 0, 0, 0);
    for _ in 0..300 {
        let specs = strategy.new_tree(&mut runner).unwrap().current();
        let state = eval(&certs_of(&specs));
        let unrevoked = eval(&certs_of(
            &specs
                .iter()
                .copied()
                .filter(|s| s.kind != 1)
                .collect::<Vec<_>>(),
        ));
        via_admin += usize::from(specs.iter().any(|s| {
            s.kind == 0 && !s.is_bad() && s.signer.is_some_and(|n| state.is_admin(&dev(n)))
        }));
        revoked_trusted_elsewhere +=
            usize::from(state.revoked.iter().any(|d| unrevoked.is_trusted(d)));
        agents += usize::from(state.agent.is_some());
        bad += usize::from(specs.iter().any(Spec::is_bad));
    }
    assert!(via_admin > 30, "admin-issued certificates: {via_admin}");
    assert!(
        revoked_trusted_elsewhere > 30,
        "effective revocations: {revoked_trusted_elsewhere}"
    );
    assert!(agents > 30, "agent holders: {agents}");
    assert!(bad > 30, "bad certificates: {bad}");
}
