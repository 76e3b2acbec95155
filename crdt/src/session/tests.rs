//! Tests of the session state machine: each transition, and properties over random messages
//! and over meshes of 2–5 in-memory peers.

use std::collections::{BTreeMap, HashMap, VecDeque};

use proptest::prelude::*;
use serde_json::json;

use super::*;
use crate::document::Document;
use crate::kind::DocKind;
use crate::sync;
use crate::test_utils::actor;

/// Sessions in these tests carry a device number in `Hello` and a byte as pass-through message.
type M = Msg<u8, u8>;
type Session = Established<u8, u8>;

fn id(n: u8, bucket: u8) -> DocId {
    let mut b = [n; 16];
    b[0] = bucket;
    DocId::from_bytes(b)
}

fn doc_with(n: u8, key: &str) -> Document {
    let mut d = Document::new(DocKind::Generic, &actor(n), 1).expect("doc");
    d.put_json(key, json!(n), "edit", 2).expect("put");
    d
}

/// A pair of established sessions, `a` the initiator.
/// A `Doc` message about `doc` (its bytes are not looked at by the session).
fn doc_msg(doc: DocId) -> M {
    Msg::Doc { doc, msg: vec![1] }
}

fn pair() -> (Session, Session) {
    let (a, hello) = ExpectHello::<u8>::initiate::<u8>(Config::default(), 1);
    let b = ExpectHello::accept(Config::default(), 2)
        .handle(hello)
        .expect("b takes a's hello");
    assert_eq!(*b.hello(), 1);
    let mut b: Session = b.admit();
    let inv = Inventory::new();
    let Some(Transmit::Send(reply)) = b.poll_transmit(&inv) else {
        panic!("b answers with its hello");
    };
    let a = a.handle(reply).expect("a takes b's hello");
    assert_eq!(*a.hello(), 2);
    (a.admit(), b)
}

fn sends(s: &mut Session, inv: &Inventory) -> Vec<M> {
    let mut out = Vec::new();
    while let Some(t) = s.poll_transmit(inv) {
        match t {
            Transmit::Send(m) => out.push(m),
            other => panic!("expected only messages, got {other:?}"),
        }
    }
    out
}

#[test]
fn the_initiator_speaks_first_and_the_responder_answers_after_admission() {
    let (_, hello) = ExpectHello::<u8>::initiate::<u8>(Config::default().with_version(3), 7);
    assert_eq!(
        hello,
        Msg::Hello {
            version: 3,
            hello: 7
        }
    );
    let responder = ExpectHello::accept(Config::default().with_version(3), 9);
    assert_eq!(responder.role(), Role::Responder);
    let check = responder.handle(hello).expect("same version");
    assert_eq!(check.role(), Role::Responder);
    let mut s: Session = check.admit();
    s.queue_root();
    let inv = Inventory::new();
    let out = sends(&mut s, &inv);
    assert_eq!(
        out,
        vec![
            Msg::Hello {
                version: 3,
                hello: 9
            },
            Msg::Root { root: inv.root() }
        ]
    );
}

#[test]
fn a_version_mismatch_is_refused_with_both_versions_named() {
    let responder = ExpectHello::<u8>::accept(Config::default(), 9);
    let err = responder
        .handle::<u8>(Msg::Hello {
            version: 2,
            hello: 1,
        })
        .expect_err("version 2 is not ours");
    assert!(matches!(
        err.error,
        SessionError::Incompatible { ours: 1, theirs: 2 }
    ));
    assert_eq!(err.error.blame(), Blame::Incompatible);
    let Some(Msg::Refused { reason }) = err.reply else {
        panic!("a refusal goes back");
    };
    assert!(
        reason.contains("version 1") && reason.contains("version 2"),
        "{reason}"
    );
}

#[test]
fn anything_but_hello_first_is_a_violation_answered_with_refused() {
    let (initiator, _) = ExpectHello::<u8>::initiate::<u8>(Config::default(), 1);
    let err = initiator
        .handle::<u8>(Msg::Root { root: [0; 32] })
        .expect_err("root before hello");
    assert!(matches!(
        err.error,
        SessionError::Violation(Violation::ExpectedHello { got: "Root" })
    ));
    assert_eq!(err.error.blame(), Blame::Peer);
    assert_eq!(
        err.reply,
        Some(Msg::Refused {
            reason: EXPECTED_HELLO.into()
        })
    );
}

#[test]
fn a_refusal_during_the_handshake_ends_it_without_reply() {
    let (initiator, _) = ExpectHello::<u8>::initiate::<u8>(Config::default(), 1);
    let err = initiator
        .handle::<u8>(Msg::Refused {
            reason: "not trusted".into(),
        })
        .expect_err("refused");
    assert!(err.reply.is_none());
    assert_eq!(err.error.blame(), Blame::Decision);
    assert!(err.error.to_string().contains("not trusted"));
}

#[test]
fn refusing_a_peer_sends_the_reason() {
    let check = ExpectHello::<u8>::accept(Config::default(), 1)
        .handle::<u8>(Msg::Hello {
            version: 1,
            hello: 5,
        })
        .expect("hello");
    let err = check.refuse::<u8>("not trusted: revoked");
    assert_eq!(
        err.reply,
        Some(Msg::Refused {
            reason: "not trusted: revoked".into()
        })
    );
    assert!(matches!(err.error, SessionError::Refused { .. }));
    assert_eq!(err.error.blame(), Blame::Decision);
}

#[test]
fn a_second_hello_is_a_violation_and_closes_the_session() {
    let (mut a, _) = pair();
    let inv = Inventory::new();
    let err = a
        .handle(
            Msg::Hello {
                version: 1,
                hello: 2,
            },
            &inv,
        )
        .expect_err("second hello");
    assert!(matches!(
        err,
        SessionError::Violation(Violation::UnexpectedHello)
    ));
    assert!(a.is_closed());
    assert!(a.poll_transmit(&inv).is_none());
    let after = a
        .handle(Msg::Root { root: [0; 32] }, &inv)
        .expect_err("closed");
    assert_eq!(after.blame(), Blame::OurBug);
}

#[test]
fn unknown_messages_and_refusals_end_established_sessions() {
    let (mut a, mut b) = pair();
    let inv = Inventory::new();
    let err = a
        .handle(
            Msg::Unknown {
                what: "Gossip".into(),
            },
            &inv,
        )
        .expect_err("unknown");
    assert_eq!(err.blame(), Blame::Peer);
    assert!(err.to_string().contains("Gossip"));
    let err = b
        .handle(
            Msg::Refused {
                reason: "revoked".into(),
            },
            &inv,
        )
        .expect_err("refused");
    assert_eq!(err.blame(), Blame::Decision);
    assert!(b.is_closed());
}

#[test]
fn pass_through_messages_become_actions_and_certs_are_coalesced() {
    let (mut a, _) = pair();
    let inv = Inventory::new();
    assert_eq!(
        a.handle(Msg::Other(42), &inv).expect("other"),
        vec![Action::Apply(42)]
    );
    // Queued "certificate sets" (even numbers here) replace each other; others queue up.
    a.queue_replacing(10, |m| m % 2 == 0);
    a.queue_replacing(11, |m| m % 2 == 1);
    a.queue_replacing(12, |m| m % 2 == 0);
    let out = sends(&mut a, &inv);
    assert_eq!(out, vec![Msg::Other(12), Msg::Other(11)]);
}

#[test]
fn equal_roots_need_nothing_and_a_flood_of_roots_gets_one_answer() {
    let (mut a, _) = pair();
    let inv = Inventory::from_heads([(id(1, 3), &doc_with(1, "k").heads()[..])]);
    a.handle(Msg::Root { root: inv.root() }, &inv)
        .expect("root");
    assert!(a.poll_transmit(&inv).is_none());
    for _ in 0..100 {
        a.handle(Msg::Root { root: [9; 32] }, &inv).expect("root");
    }
    let out = sends(&mut a, &inv);
    assert_eq!(out.len(), 1);
    let Msg::Buckets { digests } = &out[0] else {
        panic!("buckets, got {out:?}");
    };
    assert_eq!(digests, &inv.bucket_hashes().concat());
}

#[test]
fn buckets_are_checked_and_entries_answered_for_the_union_of_differences() {
    let (mut a, _) = pair();
    let d3 = doc_with(1, "x");
    let d7 = doc_with(2, "y");
    let inv = Inventory::from_heads([(id(1, 3), &d3.heads()[..]), (id(2, 7), &d7.heads()[..])]);
    let err = a
        .handle(
            Msg::Buckets {
                digests: vec![0; 10],
            },
            &inv,
        )
        .expect_err("short buckets");
    assert!(matches!(
        err,
        SessionError::Violation(Violation::BadBuckets { len: 10 })
    ));

    let (mut a, _) = pair();
    // The peer has nothing in bucket 3, and the same as us in bucket 7.
    let mut theirs = inv.bucket_hashes();
    theirs[3] = [0; 32];
    a.handle(
        Msg::Buckets {
            digests: theirs.concat(),
        },
        &inv,
    )
    .expect("buckets");
    // Then it differs in bucket 7 as well: one Entries answer covers both.
    theirs[7] = [1; 32];
    a.handle(
        Msg::Buckets {
            digests: theirs.concat(),
        },
        &inv,
    )
    .expect("buckets");
    let out = sends(&mut a, &inv);
    let [Msg::Entries { buckets, records }] = &out[..] else {
        panic!("one entries message, got {out:?}");
    };
    assert_eq!(buckets, &vec![3, 7]);
    assert_eq!(records.len(), 2 * ENTRY_LEN);
    assert_eq!(&records[..16], id(1, 3).as_bytes());
}

#[test]
fn entries_decide_whole_documents_versus_sync() {
    let (mut a, _) = pair();
    let (mine_only, both, with_state) = (id(1, 5), id(2, 5), id(3, 5));
    let heads = doc_with(1, "k").heads();
    let inv = Inventory::from_heads([
        (mine_only, &heads[..]),
        (both, &heads[..]),
        (with_state, &heads[..]),
    ]);
    // This session already exchanged a message about `with_state`.
    let actions = a.handle(doc_msg(with_state), &inv).expect("doc");
    let [Action::Receive { state: None, .. }] = &actions[..] else {
        panic!("{actions:?}");
    };
    a.generated(with_state, PeerDocState::new(), None)
        .expect("back");
    // Back in: what the peer has now is... it is also marked dirty to answer. Send it first.
    let _ = a.poll_transmit(&inv);
    a.generated(with_state, PeerDocState::new(), None)
        .expect("back");

    let mut records = Vec::new();
    records.extend_from_slice(both.as_bytes());
    records.extend_from_slice(&[7; 32]); // other heads
    a.handle(
        Msg::Entries {
            buckets: vec![5],
            records,
        },
        &inv,
    )
    .expect("entries");
    assert!(a.is_snapshot_queued(&mine_only));
    assert!(a.is_dirty(&both));
    assert!(a.is_dirty(&with_state));
    assert_eq!(a.backlog(), 3);
}

#[test]
fn documents_only_the_peer_has_are_counted_until_they_arrive() {
    let (mut a, _) = pair();
    let (theirs_1, theirs_2, theirs_3, shared) = (id(1, 9), id(2, 9), id(3, 9), id(4, 9));
    let heads = doc_with(1, "k").heads();
    let inv = Inventory::from_heads([(shared, &heads[..])]);
    assert!(!a.compared(), "nothing compared before the peer's entries");
    let mut records = Vec::new();
    for doc in [theirs_1, theirs_2, theirs_3, shared] {
        records.extend_from_slice(doc.as_bytes());
        records.extend_from_slice(&[7; 32]);
    }
    a.handle(
        Msg::Entries {
            buckets: vec![9],
            records,
        },
        &inv,
    )
    .expect("entries");
    assert!(a.compared());
    assert_eq!(a.incoming().count(), 3, "three documents only the peer has");
    assert_eq!(a.backlog(), 1, "the shared one is ours to sync");
    let snapshot = doc_with(2, "k").save();
    a.handle(
        Msg::Snapshots {
            docs: vec![(theirs_1, snapshot.clone()), (theirs_2, snapshot)],
        },
        &inv,
    )
    .expect("snapshots");
    assert_eq!(a.incoming().count(), 3, "received is not stored yet");
    a.snapshots_received(SnapshotsStored {
        new: vec![(theirs_1, heads.clone()), (theirs_2, heads.clone())],
        ..SnapshotsStored::default()
    })
    .expect("stored");
    assert_eq!(a.incoming().count(), 1);
    let actions = a
        .handle(
            Msg::Doc {
                doc: theirs_3,
                msg: vec![1],
            },
            &inv,
        )
        .expect("doc");
    assert_eq!(actions.len(), 1, "{actions:?}");
    assert_eq!(a.incoming().count(), 1, "a message is not applied yet");
    a.received(
        theirs_3,
        PeerDocState::new(),
        Ok(ReceiveOutcome { changed: true }),
    )
    .expect("received");
    assert_eq!(a.incoming().count(), 0, "everything listed has arrived");
}

#[test]
fn malformed_entries_are_violations() {
    let inv = Inventory::new();
    let (mut a, _) = pair();
    let err = a
        .handle(
            Msg::Entries {
                buckets: vec![1],
                records: vec![0; 47],
            },
            &inv,
        )
        .expect_err("short record");
    assert!(matches!(
        err,
        SessionError::Violation(Violation::BadEntries { len: 47 })
    ));
    let (mut a, _) = pair();
    let mut records = id(1, 9).as_bytes().to_vec();
    records.extend_from_slice(&[0; 32]);
    let err = a
        .handle(
            Msg::Entries {
                buckets: vec![1],
                records,
            },
            &inv,
        )
        .expect_err("outside buckets");
    assert!(matches!(
        err,
        SessionError::Violation(Violation::EntryOutsideBuckets { .. })
    ));
}

#[test]
fn a_message_for_a_document_in_use_waits_for_its_state() {
    let (mut a, _) = pair();
    let inv = Inventory::new();
    let doc = id(1, 1);
    a.mark_dirty(doc);
    let Some(Transmit::Generate {
        doc: g,
        state: None,
        ..
    }) = a.poll_transmit(&inv)
    else {
        panic!("generate first");
    };
    assert_eq!(g, doc);
    // Two messages arrive while the writer holds the state: both wait.
    assert!(
        a.handle(Msg::Doc { doc, msg: vec![1] }, &inv)
            .expect("doc")
            .is_empty()
    );
    assert!(
        a.handle(Msg::Doc { doc, msg: vec![2] }, &inv)
            .expect("doc")
            .is_empty()
    );
    // A change meanwhile: generate again once the state is back.
    a.mark_dirty(doc);
    assert!(!a.is_dirty(&doc));
    let next = a
        .generated(doc, PeerDocState::new(), Some(vec![9]))
        .expect("generated");
    assert_eq!(
        next,
        vec![Action::Receive {
            doc,
            msg: vec![1],
            state: Some(PeerDocState::new())
        }]
    );
    let next = a
        .received(
            doc,
            PeerDocState::new(),
            Ok(ReceiveOutcome { changed: true }),
        )
        .expect("received");
    assert_eq!(next.len(), 2, "{next:?}");
    assert!(matches!(next[0], Action::Persist { doc: d, .. } if d == doc));
    assert!(matches!(&next[1], Action::Receive { msg, .. } if msg == &vec![2]));
    let next = a
        .received(
            doc,
            PeerDocState::new(),
            Ok(ReceiveOutcome { changed: false }),
        )
        .expect("received");
    assert_eq!(next.len(), 1);
    // The generated message goes first, then the document is generated for again.
    assert_eq!(
        a.poll_transmit(&inv),
        Some(Transmit::Send(Msg::Doc { doc, msg: vec![9] }))
    );
    assert!(matches!(
        a.poll_transmit(&inv),
        Some(Transmit::Generate { state: Some(_), .. })
    ));
}

#[test]
fn a_bad_doc_message_blames_the_peer_and_names_the_placeholder() {
    let (mut a, _) = pair();
    let inv = Inventory::new();
    let doc = id(4, 4);
    let actions = a
        .handle(
            Msg::Doc {
                doc,
                msg: vec![0x42, 0xde],
            },
            &inv,
        )
        .expect("doc");
    let [Action::Receive { msg, .. }] = &actions[..] else {
        panic!("{actions:?}");
    };
    let mut d = Document::empty(&actor(1)).expect("doc");
    let mut st = PeerDocState::new();
    let outcome = sync::receive(&mut d, &mut st, msg);
    let err = a.received(doc, st, outcome).expect_err("garbage");
    assert_eq!(err.blame(), Blame::Peer);
    assert_eq!(err.forget_unstored(), Some(doc));
    assert!(a.is_closed());
    assert!(!a.has_state(&doc));
}

#[test]
fn snapshots_are_split_into_frames_and_set_both_sides_states() {
    let (mut a, mut b) = pair();
    let config = Config::default()
        .with_snapshot_frame_bytes(10)
        .with_max_snapshots(2);
    a.config = config;
    let inv = Inventory::new();
    let docs: Vec<DocId> = (1..=5).map(|n| id(n, n)).collect();
    for d in &docs {
        a.snapshots.mark(*d);
    }
    let Some(Transmit::LoadSnapshots { docs: batch }) = a.poll_transmit(&inv) else {
        panic!("load");
    };
    assert_eq!(batch, docs);
    let heads = doc_with(1, "k").heads();
    let loaded: Vec<Loaded> = docs[..4]
        .iter()
        .enumerate()
        .map(|(i, d)| Loaded {
            doc: *d,
            heads: heads.clone(),
            bytes: vec![0; if i == 0 { 20 } else { 3 }],
        })
        .collect();
    a.snapshots_loaded(loaded, vec![docs[4]]);
    let frames: Vec<M> = std::iter::from_fn(|| match a.poll_transmit(&inv) {
        Some(Transmit::Send(m)) => Some(m),
        _ => None,
    })
    .collect();
    // 20 bytes closes a frame at once; then two documents per frame.
    let sizes: Vec<usize> = frames
        .iter()
        .map(|m| match m {
            Msg::Snapshots { docs } => docs.len(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(sizes, vec![1, 2, 1]);
    assert!(docs[..4].iter().all(|d| a.has_state(d)));
    // Too big or gone: synced instead (it came out of the loop above as a Generate).
    assert!(!a.has_state(&docs[3]) || a.is_dirty(&docs[4]) || a.has_state(&docs[4]));

    // The receiver stores them and knows what the sender holds.
    let Msg::Snapshots { docs: first } = frames[0].clone() else {
        unreachable!()
    };
    let actions = b
        .handle(Msg::Snapshots { docs: first }, &inv)
        .expect("snapshots");
    assert!(matches!(&actions[..], [Action::StoreSnapshots { docs }] if docs.len() == 1));
    b.snapshots_received(SnapshotsStored {
        new: vec![(docs[0], heads.clone())],
        merged: vec![docs[1]],
        rejected: None,
    })
    .expect("stored");
    assert!(b.has_state(&docs[0]));
    assert!(b.is_dirty(&docs[1]));
    let err = b
        .snapshots_received(SnapshotsStored {
            rejected: Some((docs[2], "does not load".into())),
            ..SnapshotsStored::default()
        })
        .expect_err("rejected");
    assert!(matches!(err, SessionError::BadSnapshot { .. }));
    assert_eq!(err.blame(), Blame::Peer);
}

#[test]
fn too_many_snapshots_in_one_message_is_a_violation() {
    let (mut a, _) = pair();
    a.config = Config::default().with_max_snapshots(2);
    let docs = (0..3).map(|n| (id(n, n), vec![])).collect();
    let err = a
        .handle(Msg::Snapshots { docs }, &Inventory::new())
        .expect_err("three");
    assert!(matches!(
        err,
        SessionError::Violation(Violation::TooManySnapshots { count: 3, max: 2 })
    ));
}

#[test]
fn a_queued_snapshot_that_gained_a_state_is_synced_instead() {
    let (mut a, _) = pair();
    let inv = Inventory::new();
    let doc = id(1, 1);
    a.snapshots.mark(doc);
    let actions = a.handle(Msg::Doc { doc, msg: vec![1] }, &inv).expect("doc");
    assert_eq!(actions.len(), 1);
    a.received(
        doc,
        PeerDocState::new(),
        Ok(ReceiveOutcome { changed: false }),
    )
    .expect("received");
    // Dirty (the answer) goes first; the snapshot queue then finds a state and syncs instead.
    assert!(matches!(
        a.poll_transmit(&inv),
        Some(Transmit::Generate { .. })
    ));
    a.generated(doc, PeerDocState::new(), None).expect("back");
    assert!(matches!(
        a.poll_transmit(&inv),
        Some(Transmit::Generate { .. })
    ));
    a.generated(doc, PeerDocState::new(), None).expect("back");
    assert!(a.poll_transmit(&inv).is_none());
}

#[test]
fn transmit_order_is_ready_then_control_then_dirty_then_snapshots() {
    let (mut a, _) = pair();
    let inv = Inventory::new();
    a.snapshots.mark(id(1, 1));
    a.mark_dirty(id(2, 2));
    a.queue(Msg::Other(5));
    a.queue_root();
    a.queue_root();
    assert_eq!(a.poll_transmit(&inv), Some(Transmit::Send(Msg::Other(5))));
    assert_eq!(
        a.poll_transmit(&inv),
        Some(Transmit::Send(Msg::Root { root: inv.root() }))
    );
    assert!(
        matches!(a.poll_transmit(&inv), Some(Transmit::Generate { doc, .. }) if doc == id(2, 2))
    );
    a.generated(id(2, 2), PeerDocState::new(), Some(vec![1]))
        .expect("gen");
    a.queue(Msg::Other(6));
    // The generated message goes before the control message queued after it.
    assert!(matches!(
        a.poll_transmit(&inv),
        Some(Transmit::Send(Msg::Doc { .. }))
    ));
    assert_eq!(a.poll_transmit(&inv), Some(Transmit::Send(Msg::Other(6))));
    assert!(matches!(
        a.poll_transmit(&inv),
        Some(Transmit::LoadSnapshots { .. })
    ));
    assert!(a.poll_transmit(&inv).is_none());
    // Every idle state is handed over at the end.
    let states = a.take_states();
    assert_eq!(states.len(), 1);
    assert!(!a.has_state(&id(2, 2)));
}

#[test]
fn a_snapshot_received_for_a_document_in_use_replaces_its_state_on_check_in() {
    let (mut a, _) = pair();
    let inv = Inventory::new();
    let doc = id(1, 1);
    a.mark_dirty(doc);
    assert!(matches!(
        a.poll_transmit(&inv),
        Some(Transmit::Generate { .. })
    ));
    let heads = doc_with(1, "k").heads();
    a.snapshots_received(SnapshotsStored {
        new: vec![(doc, heads.clone())],
        ..SnapshotsStored::default()
    })
    .expect("stored");
    // The writer's state comes back stale; the snapshot's heads win.
    a.generated(doc, PeerDocState::new(), None).expect("back");
    let states = a.take_states();
    assert_eq!(states.len(), 1);
    assert_eq!(states[0].1, PeerDocState::after_snapshot(&heads));
}

#[test]
fn states_in_use_are_not_taken_at_the_end() {
    let (mut a, _) = pair();
    let inv = Inventory::new();
    a.mark_dirty(id(1, 1));
    a.mark_dirty(id(2, 2));
    assert!(matches!(
        a.poll_transmit(&inv),
        Some(Transmit::Generate { .. })
    ));
    let Some(Transmit::Generate { doc, .. }) = a.poll_transmit(&inv) else {
        panic!("second generate");
    };
    a.generated(doc, PeerDocState::new(), None).expect("back");
    let taken = a.take_states();
    assert_eq!(taken.iter().map(|(d, _)| *d).collect::<Vec<_>>(), vec![doc]);
    assert!(a.has_state(&id(1, 1)), "the one handed out stays");
}

// ---------------------------------------------------------------------------------------------
// Any message in any state.

fn any_msg() -> impl Strategy<Value = M> {
    let doc = any::<[u8; 16]>().prop_map(DocId::from_bytes);
    prop_oneof![
        (0u8..3, any::<u8>()).prop_map(|(version, hello)| Msg::Hello { version, hello }),
        "[a-z ]{0,12}".prop_map(|reason| Msg::Refused { reason }),
        any::<[u8; 32]>().prop_map(|root| Msg::Root { root }),
        prop_oneof![Just(BUCKETS_LEN), 0usize..300]
            .prop_flat_map(|n| prop::collection::vec(any::<u8>(), n))
            .prop_map(|digests| Msg::Buckets { digests }),
        (
            prop::collection::vec(any::<u8>(), 0..4),
            prop::collection::vec(any::<u8>(), 0..150)
        )
            .prop_map(|(buckets, records)| Msg::Entries { buckets, records }),
        // Well-formed entries (every record inside the covered buckets).
        prop::collection::vec((doc.clone(), any::<[u8; 32]>()), 0..4).prop_map(|entries| {
            let buckets = entries.iter().map(|(d, _)| d.bucket()).collect();
            let records = entries
                .iter()
                .flat_map(|(d, h)| d.as_bytes().iter().chain(h).copied().collect::<Vec<u8>>())
                .collect();
            Msg::Entries { buckets, records }
        }),
        (doc.clone(), prop::collection::vec(any::<u8>(), 0..40))
            .prop_map(|(doc, msg)| Msg::Doc { doc, msg }),
        prop::collection::vec((doc, prop::collection::vec(any::<u8>(), 0..20)), 0..3)
            .prop_map(|docs| Msg::Snapshots { docs }),
        any::<u8>().prop_map(Msg::Other),
        "[A-Z][a-z]{0,8}".prop_map(|what| Msg::Unknown { what }),
    ]
}

/// Runs the actions a message produced the way a driver would, with real (empty) documents.
fn run_actions(s: &mut Session, mut actions: VecDeque<Action<u8>>) -> Result<(), SessionError> {
    while let Some(action) = actions.pop_front() {
        match action {
            Action::Receive { doc, msg, state } => {
                let mut d = Document::empty(&actor(9)).expect("doc");
                let mut st = state.unwrap_or_default();
                let outcome = sync::receive(&mut d, &mut st, &msg);
                actions.extend(s.received(doc, st, outcome)?);
            }
            Action::StoreSnapshots { docs } => {
                let mut stored = SnapshotsStored::default();
                for (doc, bytes) in docs {
                    match Document::load(&bytes, &actor(9)) {
                        Ok(d) => stored.new.push((doc, d.heads())),
                        Err(e) => {
                            stored.rejected = Some((doc, e.to_string()));
                            break;
                        }
                    }
                }
                s.snapshots_received(stored)?;
            }
            Action::Apply(_) | Action::Persist { .. } | Action::ForgetUnstored { .. } => {}
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Before the handshake every message is either the `Hello` that moves it on or an error
    /// with a blame, and every error the peer caused (or can't help) is answered with `Refused`.
    #[test]
    fn any_first_message_is_handled_or_refused_with_a_reason(
        msg in any_msg(),
        initiator in any::<bool>(),
    ) {
        let state = if initiator {
            ExpectHello::initiate::<u8>(Config::default(), 1).0
        } else {
            ExpectHello::accept(Config::default(), 1)
        };
        let is_good_hello = matches!(msg, Msg::Hello { version: 1, .. });
        match state.handle(msg) {
            Ok(check) => {
                prop_assert!(is_good_hello, "only a v1 Hello is accepted, got {}", check.hello());
            }
            Err(HandshakeError { reply, error }) => {
                prop_assert!(!is_good_hello);
                prop_assert!(!error.to_string().is_empty());
                match error.blame() {
                    Blame::Peer | Blame::Incompatible => prop_assert!(
                        matches!(&reply, Some(Msg::Refused { reason }) if !reason.is_empty()),
                        "{error} without a Refused"
                    ),
                    Blame::Decision => prop_assert!(reply.is_none()),
                    Blame::OurBug => prop_assert!(false, "no bug of ours before the handshake"),
                }
            }
        }
    }

    /// In an established session every message sequence is handled, or ends the session with
    /// an error that blames the peer or records a refusal; after that the session only
    /// reports misuse and sends nothing. Nothing panics.
    #[test]
    fn any_message_sequence_is_handled_or_refused_with_a_reason(
        msgs in prop::collection::vec(any_msg(), 1..12),
    ) {
        let (mut s, _) = pair();
        let d = doc_with(1, "k");
        let inv = Inventory::from_heads([(id(1, 1), &d.heads()[..])]);
        let mut ended = None;
        for msg in msgs {
            if let Some(first) = &ended {
                let e = s.handle(msg, &inv).expect_err("closed");
                prop_assert_eq!(e.blame(), Blame::OurBug, "after {}", first);
                continue;
            }
            let name = msg.name();
            let r = s
                .handle(msg, &inv)
                .and_then(|actions| run_actions(&mut s, actions.into()));
            if let Err(e) = r {
                prop_assert!(!e.to_string().is_empty());
                prop_assert!(
                    matches!(e.blame(), Blame::Peer | Blame::Decision),
                    "{name}: {e} blamed on {:?}", e.blame()
                );
                prop_assert!(s.is_closed());
                prop_assert!(s.poll_transmit(&inv).is_none());
                ended = Some(e.to_string());
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// However the peer floods us with requests, at most one answer of each kind waits.
    #[test]
    fn replies_stay_bounded_under_any_flood(
        msgs in prop::collection::vec(
            prop_oneof![
                any::<[u8; 32]>().prop_map(|root| Msg::Root { root }),
                (any::<u8>(), any::<[u8; 32]>()).prop_map(|(bucket, digest)| {
                    let mut digests = vec![0; BUCKETS_LEN];
                    let at = usize::from(bucket) * 32;
                    digests[at..at + 32].copy_from_slice(&digest);
                    Msg::Buckets { digests }
                }),
                any::<u8>().prop_map(Msg::Other),
            ],
            1..100,
        ),
    ) {
        let (mut s, _) = pair();
        let d = doc_with(1, "k");
        let inv = Inventory::from_heads([(id(1, 1), &d.heads()[..])]);
        for msg in msgs {
            s.handle(msg, &inv).expect("well-formed");
            prop_assert!(s.outbox.len() <= 2, "{} answers wait", s.outbox.len());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Meshes of in-memory peers.

/// A device's documents and persisted states, copied aside.
type Backup = (BTreeMap<DocId, Document>, HashMap<(u8, DocId), Vec<u8>>);

/// One in-memory device: its documents (all stored), inventory, and persisted states.
struct Peer {
    n: u8,
    docs: BTreeMap<DocId, Document>,
    inv: Inventory,
    /// `(other device, doc)` → encoded state.
    persisted: HashMap<(u8, DocId), Vec<u8>>,
    /// A backup of the documents and persisted states ([`Op::Backup`]).
    backup: Option<Backup>,
    clock: i64,
}

impl Peer {
    fn new(n: u8) -> Peer {
        Peer {
            n,
            docs: BTreeMap::new(),
            inv: Inventory::new(),
            persisted: HashMap::new(),
            backup: None,
            clock: 10,
        }
    }

    fn state(&self, other: u8, doc: DocId, state: Option<PeerDocState>) -> PeerDocState {
        state
            .or_else(|| self.resumed(other, doc))
            .unwrap_or_default()
    }

    /// The persisted state with `other` for `doc`, resumed, if there is one.
    fn resumed(&self, other: u8, doc: DocId) -> Option<PeerDocState> {
        let bytes = self.persisted.get(&(other, doc))?;
        PeerDocState::resume(bytes).ok()
    }

    /// Records a change (the node's `Docs::announce`).
    fn stored(&mut self, doc: DocId) {
        if let Some(d) = self.docs.get(&doc)
            && !d.heads().is_empty()
        {
            self.inv.update(doc, &d.heads());
        }
    }
}

/// One open session between two devices, with the messages in flight each way.
struct Link {
    a: usize,
    b: usize,
    sa: Session,
    sb: Session,
    a_to_b: VecDeque<M>,
    b_to_a: VecDeque<M>,
}

struct Mesh {
    peers: Vec<Peer>,
    links: Vec<Link>,
    next_doc: u8,
}

#[derive(Debug, Clone)]
enum Op {
    Create(usize),
    Edit(usize, usize, u8),
    Connect(usize, usize),
    Disconnect(usize, usize),
    Restart {
        peer: usize,
        keep_states: bool,
    },
    /// Copies a device's documents and persisted states aside.
    Backup(usize),
    /// Restarts a device from its backup: its documents and states go back together.
    Restore(usize),
    Transmit(usize, bool),
    Deliver(usize, bool),
}

fn any_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => (0usize..5).prop_map(Op::Create),
        3 => (0usize..5, 0usize..8, any::<u8>()).prop_map(|(p, d, v)| Op::Edit(p, d, v)),
        2 => (0usize..5, 0usize..5).prop_map(|(a, b)| Op::Connect(a, b)),
        1 => (0usize..5, 0usize..5).prop_map(|(a, b)| Op::Disconnect(a, b)),
        1 => (0usize..5, any::<bool>())
            .prop_map(|(peer, keep_states)| Op::Restart { peer, keep_states }),
        1 => (0usize..5).prop_map(Op::Backup),
        1 => (0usize..5).prop_map(Op::Restore),
        6 => (0usize..16, any::<bool>()).prop_map(|(l, d)| Op::Transmit(l, d)),
        6 => (0usize..16, any::<bool>()).prop_map(|(l, d)| Op::Deliver(l, d)),
    ]
}

impl Mesh {
    fn new(n: usize) -> Mesh {
        Mesh {
            peers: (0..n).map(|i| Peer::new(i as u8 + 1)).collect(),
            links: Vec::new(),
            next_doc: 0,
        }
    }

    fn link_of(&self, a: usize, b: usize) -> Option<usize> {
        self.links
            .iter()
            .position(|l| (l.a, l.b) == (a, b) || (l.a, l.b) == (b, a))
    }

    /// `peer`'s sessions other than the one with `except`: mark `doc` dirty (a change).
    fn announce(&mut self, peer: usize, doc: DocId, except: Option<usize>) {
        self.peers[peer].stored(doc);
        for l in &mut self.links {
            if l.a == peer && Some(l.b) != except {
                l.sa.mark_dirty(doc);
            }
            if l.b == peer && Some(l.a) != except {
                l.sb.mark_dirty(doc);
            }
        }
    }

    fn create(&mut self, p: usize) {
        let doc = DocId::from_bytes([self.next_doc.wrapping_mul(37); 16]);
        self.next_doc = self.next_doc.wrapping_add(1);
        if self.peers.iter().any(|peer| peer.docs.contains_key(&doc)) {
            return;
        }
        let peer = &mut self.peers[p];
        peer.clock += 1;
        let mut d = Document::new(DocKind::Generic, &actor(peer.n), peer.clock).expect("doc");
        d.put_json(
            &format!("by{}", peer.n),
            json!(peer.clock),
            "create",
            peer.clock,
        )
        .expect("put");
        peer.docs.insert(doc, d);
        self.announce(p, doc, None);
    }

    fn edit(&mut self, p: usize, pick: usize, value: u8) {
        let peer = &mut self.peers[p];
        let stored: Vec<DocId> = peer.inv.entries().map(|(d, _)| d).collect();
        if stored.is_empty() {
            return;
        }
        let doc = stored[pick % stored.len()];
        peer.clock += 1;
        let key = format!("k{}", value % 4);
        let d = peer.docs.get_mut(&doc).expect("stored doc is here");
        d.put_json(&key, json!(value), "edit", peer.clock)
            .expect("put");
        self.announce(p, doc, None);
    }

    fn connect(&mut self, a: usize, b: usize) {
        if a == b || self.link_of(a, b).is_some() {
            return;
        }
        let (ea, hello) = ExpectHello::initiate::<u8>(Config::default(), self.peers[a].n);
        let eb = ExpectHello::accept(Config::default(), self.peers[b].n);
        let mut sb: Session = eb.handle(hello).expect("hello").admit();
        let Some(Transmit::Send(reply)) = sb.poll_transmit(&self.peers[b].inv) else {
            panic!("responder hello");
        };
        let mut sa: Session = ea.handle(reply).expect("hello").admit();
        sa.queue_root();
        sb.queue_root();
        self.links.push(Link {
            a,
            b,
            sa,
            sb,
            a_to_b: VecDeque::new(),
            b_to_a: VecDeque::new(),
        });
    }

    fn disconnect(&mut self, i: usize, keep_states: bool) {
        let mut l = self.links.remove(i);
        let (na, nb) = (self.peers[l.a].n, self.peers[l.b].n);
        if keep_states {
            for (doc, st) in l.sa.take_states() {
                self.peers[l.a].persisted.insert((nb, doc), st.encode());
            }
            for (doc, st) in l.sb.take_states() {
                self.peers[l.b].persisted.insert((na, doc), st.encode());
            }
        }
    }

    fn restart(&mut self, p: usize, keep_states: bool) {
        while let Some(i) = self.links.iter().position(|l| l.a == p || l.b == p) {
            self.disconnect(i, true);
        }
        if !keep_states {
            self.peers[p].persisted.clear();
        }
    }

    fn backup(&mut self, p: usize) {
        let peer = &mut self.peers[p];
        let docs = peer
            .docs
            .iter()
            .map(|(id, d)| {
                (
                    *id,
                    Document::load(&d.snapshot(), &actor(peer.n)).expect("copy"),
                )
            })
            .collect();
        peer.backup = Some((docs, peer.persisted.clone()));
    }

    /// A restore from backup: the device restarts holding older documents and the states that
    /// went with them, while its peers' states say it has more.
    fn restore(&mut self, p: usize) {
        let Some((docs, persisted)) = self.peers[p].backup.take() else {
            return;
        };
        self.restart(p, true);
        let peer = &mut self.peers[p];
        let copy = docs
            .iter()
            .map(|(id, d)| {
                (
                    *id,
                    Document::load(&d.snapshot(), &actor(peer.n)).expect("copy"),
                )
            })
            .collect();
        peer.backup = Some((copy, persisted.clone()));
        peer.docs = docs;
        peer.persisted = persisted;
        peer.inv = Inventory::new();
        let ids: Vec<DocId> = peer.docs.keys().copied().collect();
        for doc in ids {
            peer.stored(doc);
        }
    }

    /// Runs a peer's actions for its session on link `i` (side `a` if `side_a`).
    fn run(&mut self, i: usize, side_a: bool, mut actions: VecDeque<Action<u8>>) {
        while let Some(action) = actions.pop_front() {
            let (me, other) = {
                let l = &self.links[i];
                if side_a { (l.a, l.b) } else { (l.b, l.a) }
            };
            let other_n = self.peers[other].n;
            match action {
                Action::Receive { doc, msg, state } => {
                    let peer = &mut self.peers[me];
                    let mut st = peer.state(other_n, doc, state);
                    let actor = actor(peer.n);
                    let d = peer
                        .docs
                        .entry(doc)
                        .or_insert_with(|| Document::empty(&actor).expect("empty"));
                    let outcome = sync::receive(d, &mut st, &msg).expect("honest peers agree");
                    if outcome.changed {
                        self.announce(me, doc, Some(other));
                    }
                    let l = &mut self.links[i];
                    let s = if side_a { &mut l.sa } else { &mut l.sb };
                    actions.extend(s.received(doc, st, Ok(outcome)).expect("received"));
                }
                Action::StoreSnapshots { docs } => {
                    let mut stored = SnapshotsStored::default();
                    for (doc, bytes) in docs {
                        let peer = &mut self.peers[me];
                        match peer.docs.get_mut(&doc) {
                            Some(d) => {
                                let before = d.heads();
                                d.load_incremental(&bytes).expect("merge");
                                if d.heads() != before {
                                    stored.merged.push(doc);
                                }
                            }
                            None => {
                                let d = Document::load(&bytes, &actor(peer.n)).expect("load");
                                stored.new.push((doc, d.heads()));
                                peer.docs.insert(doc, d);
                            }
                        }
                        self.announce(me, doc, Some(other));
                    }
                    let l = &mut self.links[i];
                    let s = if side_a { &mut l.sa } else { &mut l.sb };
                    s.snapshots_received(stored).expect("snapshots");
                }
                Action::Persist { doc, state } => {
                    self.peers[me].persisted.insert((other_n, doc), state);
                }
                Action::Apply(_) | Action::ForgetUnstored { .. } => {}
            }
        }
    }

    /// Lets side `a` (or `b`) of link `i` send one message, if it has one.
    fn transmit(&mut self, i: usize, side_a: bool) -> bool {
        loop {
            let (me, other) = {
                let l = &self.links[i];
                if side_a { (l.a, l.b) } else { (l.b, l.a) }
            };
            let other_n = self.peers[other].n;
            let l = &mut self.links[i];
            let s = if side_a { &mut l.sa } else { &mut l.sb };
            let Some(t) = s.poll_transmit(&self.peers[me].inv) else {
                return false;
            };
            match t {
                Transmit::Send(m) => {
                    let l = &mut self.links[i];
                    if side_a { &mut l.a_to_b } else { &mut l.b_to_a }.push_back(m);
                    return true;
                }
                Transmit::Generate {
                    doc,
                    state,
                    may_wait,
                } => {
                    let peer = &mut self.peers[me];
                    // As the node does: a resumed state at our own heads waits for the peer.
                    let resumed = if state.is_none() && may_wait {
                        peer.resumed(other_n, doc)
                    } else {
                        None
                    };
                    if let (Some(st), Some(d)) = (resumed, peer.docs.get(&doc))
                        && sync::nothing_new_for_peer(&d.heads(), &st)
                    {
                        let l = &mut self.links[i];
                        let s = if side_a { &mut l.sa } else { &mut l.sb };
                        let actions = s.wait_for_peer(doc, st).expect("wait");
                        self.run(i, side_a, actions.into());
                        continue;
                    }
                    let mut st = peer.state(other_n, doc, state);
                    let msg = peer.docs.get(&doc).and_then(|d| sync::generate(d, &mut st));
                    let l = &mut self.links[i];
                    let s = if side_a { &mut l.sa } else { &mut l.sb };
                    let actions = s.generated(doc, st, msg).expect("generated");
                    self.run(i, side_a, actions.into());
                }
                Transmit::LoadSnapshots { docs } => {
                    let peer = &mut self.peers[me];
                    let mut loaded = Vec::new();
                    let mut other = Vec::new();
                    for doc in docs {
                        match peer.docs.get_mut(&doc) {
                            Some(d) if peer.inv.digest_of(&doc).is_some() => loaded.push(Loaded {
                                doc,
                                heads: d.heads(),
                                bytes: d.save(),
                            }),
                            _ => other.push(doc),
                        }
                    }
                    let l = &mut self.links[i];
                    let s = if side_a { &mut l.sa } else { &mut l.sb };
                    s.snapshots_loaded(loaded, other);
                }
            }
        }
    }

    /// Delivers one message in flight towards side `a` (or `b`) of link `i`.
    fn deliver(&mut self, i: usize, to_a: bool) -> bool {
        let me = if to_a {
            self.links[i].a
        } else {
            self.links[i].b
        };
        let l = &mut self.links[i];
        let Some(msg) = (if to_a { &mut l.b_to_a } else { &mut l.a_to_b }).pop_front() else {
            return false;
        };
        let s = if to_a { &mut l.sa } else { &mut l.sb };
        let actions = s
            .handle(msg, &self.peers[me].inv)
            .expect("honest peers agree");
        self.run(i, to_a, actions.into());
        true
    }

    fn apply(&mut self, op: Op) {
        let n = self.peers.len();
        match op {
            Op::Create(p) => self.create(p % n),
            Op::Edit(p, d, v) => self.edit(p % n, d, v),
            Op::Connect(a, b) => self.connect(a % n, b % n),
            Op::Disconnect(a, b) => {
                if let Some(i) = self.link_of(a % n, b % n) {
                    self.disconnect(i, true);
                }
            }
            Op::Restart { peer, keep_states } => self.restart(peer % n, keep_states),
            Op::Backup(p) => self.backup(p % n),
            Op::Restore(p) => self.restore(p % n),
            Op::Transmit(l, side) if !self.links.is_empty() => {
                let i = l % self.links.len();
                self.transmit(i, side);
            }
            Op::Deliver(l, side) if !self.links.is_empty() => {
                let i = l % self.links.len();
                self.deliver(i, side);
            }
            Op::Transmit(..) | Op::Deliver(..) => {}
        }
    }

    /// One pass over every link: each side sends all it has, then everything in flight is
    /// delivered. Returns whether anything moved, the messages sent and the `Doc` messages
    /// among them.
    fn round(&mut self) -> (bool, usize, usize) {
        let (mut moved, mut sent, mut docs) = (false, 0, 0);
        for i in 0..self.links.len() {
            for side in [true, false] {
                while self.transmit(i, side) {
                    moved = true;
                    sent += 1;
                }
            }
            let l = &self.links[i];
            docs += l
                .a_to_b
                .iter()
                .chain(&l.b_to_a)
                .filter(|m| matches!(m, Msg::Doc { .. }))
                .count();
            for side in [true, false] {
                while self.deliver(i, side) {
                    moved = true;
                }
            }
        }
        (moved, sent, docs)
    }

    /// Connects everyone to everyone and runs every link until nothing moves.
    fn settle(&mut self) -> usize {
        let n = self.peers.len();
        for a in 0..n {
            for b in a + 1..n {
                self.connect(a, b);
            }
        }
        let mut messages = 0;
        for _ in 0..200 {
            let (moved, sent, _) = self.round();
            messages += sent;
            if !moved {
                // Quiet: what waits for a peer that said nothing speaks after all (the node
                // does this once a session's peer has sent no document message for a while).
                let mut waiting = false;
                for l in &mut self.links {
                    waiting |= l.sa.waiting() + l.sb.waiting() > 0;
                    l.sa.speak_waiting();
                    l.sb.speak_waiting();
                }
                if !waiting {
                    return messages;
                }
            }
        }
        panic!("the mesh did not settle within 200 rounds");
    }

    fn assert_converged(&self) {
        let first = &self.peers[0];
        for p in &self.peers[1..] {
            assert_eq!(
                p.inv.root(),
                first.inv.root(),
                "inventories of 1 and {}",
                p.n
            );
            for (doc, d) in &first.docs {
                if d.heads().is_empty() {
                    continue;
                }
                let other = p.docs.get(doc).expect("every device holds every document");
                assert_eq!(other.heads(), d.heads(), "{doc} on 1 and {}", p.n);
                assert_eq!(other.to_json(), d.to_json(), "{doc} on 1 and {}", p.n);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// 2–5 peers, random documents and edits, sessions that open and close, restarts that keep
    /// or lose the persisted states, and messages delivered in any interleaving: once everyone
    /// meets everyone and the links drain, every device holds every document at the same heads.
    #[test]
    fn meshes_converge_under_any_interleaving(
        n in 2usize..=5,
        ops in prop::collection::vec(any_op(), 0..60),
    ) {
        let mut mesh = Mesh::new(n);
        mesh.create(0);
        for op in ops {
            mesh.apply(op);
        }
        mesh.settle();
        mesh.assert_converged();
    }
}

/// Two devices, `docs` documents created on the first, settled.
fn settled_pair(docs: usize) -> Mesh {
    let mut mesh = Mesh::new(2);
    for _ in 0..docs {
        mesh.create(0);
    }
    mesh.settle();
    mesh
}

#[test]
fn after_settling_a_change_travels_in_one_message_per_link() {
    let mut mesh = settled_pair(3);
    mesh.assert_converged();
    // Reconnect with kept states: equal roots, so nothing but the roots is sent.
    mesh.disconnect(0, true);
    assert_eq!(mesh.settle(), 2);
    mesh.edit(1, 0, 7);
    // One Doc message to the peer, and its acknowledgement.
    assert_eq!(mesh.settle(), 2);
    mesh.assert_converged();
}

/// Runs every link until nothing moves, without the quiet fallback; returns the `Doc`
/// messages sent.
fn drain_links(mesh: &mut Mesh) -> usize {
    let mut docs = 0;
    loop {
        let (moved, _, d) = mesh.round();
        docs += d;
        if !moved {
            return docs;
        }
    }
}

#[test]
fn a_catch_up_is_the_changes_and_one_acknowledgement() {
    let mut mesh = settled_pair(3);
    mesh.disconnect(0, true);
    // Two documents change on 0 while 1 is away.
    mesh.edit(0, 0, 1);
    mesh.edit(0, 1, 2);
    mesh.connect(0, 1);
    // 1 holds what it last shared, so it waits for 0: per document, 0's changes and 1's
    // acknowledgement, and no opening message from 1.
    assert_eq!(drain_links(&mut mesh), 4);
    assert_eq!(mesh.links[0].sa.waiting() + mesh.links[0].sb.waiting(), 0);
    mesh.assert_converged();
}

#[test]
fn a_device_restored_from_an_older_backup_converges_once_the_waiting_side_speaks() {
    let mut mesh = Mesh::new(2);
    mesh.create(0);
    mesh.settle();
    mesh.disconnect(0, true); // the states are persisted
    mesh.backup(1);
    mesh.edit(1, 0, 5);
    mesh.settle();
    mesh.assert_converged();
    // 1 goes back to before its edit, with the states that went with it: each side is at the
    // heads its own state says it shared, and the heads differ.
    mesh.restore(1);
    mesh.connect(0, 1);
    drain_links(&mut mesh);
    let l = &mesh.links[0];
    assert_eq!(
        l.sa.waiting() + l.sb.waiting(),
        2,
        "both sides wait for the other"
    );
    assert_ne!(mesh.peers[0].inv.root(), mesh.peers[1].inv.root());
    // The quiet fallback: both speak, and the edit comes back to 1.
    for l in &mut mesh.links {
        l.sa.speak_waiting();
        l.sb.speak_waiting();
    }
    assert!(drain_links(&mut mesh) > 0);
    mesh.assert_converged();
    assert_eq!(mesh.links[0].sa.waiting() + mesh.links[0].sb.waiting(), 0);
}

#[test]
fn a_message_or_a_change_ends_the_wait() {
    let (mut a, _) = pair();
    let inv = Inventory::new();
    let (d1, d2) = (id(1, 1), id(2, 2));
    for doc in [d1, d2] {
        a.mark_dirty(doc);
        a.may_wait.insert(doc);
        let Some(Transmit::Generate { may_wait: true, .. }) = a.poll_transmit(&inv) else {
            panic!("a first generate that may wait");
        };
        assert!(
            a.wait_for_peer(doc, PeerDocState::new())
                .expect("open")
                .is_empty()
        );
    }
    assert_eq!(a.waiting(), 2);
    // The peer speaks about one: it is received with the state that waited.
    let actions = a.handle(doc_msg(d1), &inv).expect("a document message");
    assert!(matches!(
        &actions[..],
        [Action::Receive { state: Some(_), .. }]
    ));
    assert_eq!(a.doc_messages_received(), 1);
    // A change here to the other: generated for at once, and it cannot wait again.
    a.mark_dirty(d2);
    assert_eq!(a.waiting(), 0);
    assert!(matches!(
        a.poll_transmit(&inv),
        Some(Transmit::Generate {
            state: Some(_),
            may_wait: false,
            ..
        })
    ));
}

#[test]
fn a_new_device_gets_documents_whole() {
    let mut mesh = Mesh::new(2);
    for _ in 0..4 {
        mesh.create(0);
    }
    mesh.connect(0, 1);
    // Roots, buckets, entries, then one Snapshots message with all four documents.
    let mut snapshots = 0;
    let mut docs_msgs = 0;
    for _ in 0..20 {
        for side in [true, false] {
            while mesh.transmit(0, side) {}
        }
        let l = &mesh.links[0];
        snapshots += l
            .a_to_b
            .iter()
            .filter(|m| matches!(m, Msg::Snapshots { .. }))
            .count();
        docs_msgs += l
            .a_to_b
            .iter()
            .filter(|m| matches!(m, Msg::Doc { .. }))
            .count();
        for side in [true, false] {
            while mesh.deliver(0, side) {}
        }
    }
    assert_eq!(snapshots, 1);
    assert_eq!(docs_msgs, 0);
    mesh.assert_converged();
}
