//! Convergence tests for the sync state machine.

use proptest::prelude::*;
use serde_json::json;

use super::*;
use crate::conversation::{Conversation, Interface, Status};
use crate::doc_id::DocId;
use crate::kind::DocKind;
use crate::memory::Memory;
use crate::test_utils::{MAX_ITER, actor, assert_converged, sync_fresh, sync_pair};

#[test]
fn well_known_memory_docs_created_independently_merge_into_one_text() {
    assert_eq!(DocId::MEMORY.well_known_kind(), Some(DocKind::Memory));
    let mut a = Document::new(DocKind::Memory, &actor(1), 1000).expect("a");
    let mut b = Document::new(DocKind::Memory, &actor(2), 2000).expect("b");
    Memory::open(&mut a)
        .expect("a")
        .append("from laptop\n", "note", 1001)
        .expect("append");
    Memory::open(&mut b)
        .expect("b")
        .append("from phone\n", "note", 2001)
        .expect("append");

    // Merge by sync ...
    let mut a2 = Document::load(&a.save(), &actor(3)).expect("copy a");
    let mut b2 = Document::load(&b.save(), &actor(4)).expect("copy b");
    sync_fresh(&mut a, &mut b);
    assert_converged(&[&a, &b]);
    let text = Memory::open(&a).expect("a").text();
    assert!(
        text.contains("from laptop\n") && text.contains("from phone\n"),
        "{text:?}"
    );
    assert_eq!(text.len(), "from laptop\nfrom phone\n".len());
    // ... one text object, no conflict on `text`.
    let all = automerge::ReadDoc::get_all(a.automerge(), automerge::ROOT, "text").expect("get");
    assert_eq!(all.len(), 1);

    // ... and by exchanging saved bytes (the storage path).
    a2.load_incremental(&b2.save()).expect("merge bytes");
    assert_eq!(Memory::open(&a2).expect("a2").text(), text);
    assert_eq!(a2.heads(), a.heads());
    // The shared genesis change appears once in the history.
    assert_eq!(a.history().len(), 3);
}

#[test]
fn two_replicas_with_concurrent_edits_converge() {
    let mut a = Document::new(DocKind::Conversation, &actor(1), 10).expect("a");
    let mut b = Document::empty(&actor(2)).expect("b");
    // Maps that both sides write into must exist before the concurrent edits: two devices
    // creating the same intermediate map concurrently make two maps and one wins.
    a.put_json("extra", json!({}), "a", 10).expect("put");
    let stats = sync_fresh(&mut a, &mut b);
    assert!(stats.messages >= 2);
    assert_eq!(b.kind(), Some(DocKind::Conversation));

    // Concurrent requests from two devices, map puts, usage counters.
    {
        let mut ca = Conversation::open(&mut a).expect("a");
        ca.append_request("ra", "from laptop", Interface::Cli, "laptop", 11)
            .expect("ra");
        ca.add_usage(10, 1, 11).expect("usage a");
        ca.set_title("Laptop title", 11).expect("title");
    }
    {
        let mut cb = Conversation::open(&mut b).expect("b");
        cb.append_request("rb", "from phone", Interface::Web, "phone", 12)
            .expect("rb");
        cb.add_usage(5, 2, 12).expect("usage b");
    }
    a.put_json("extra.a", json!(1), "a", 13).expect("put");
    b.put_json("extra.b", json!([1, 2]), "b", 13).expect("put");

    let mut sa = PeerDocState::new();
    let mut sb = PeerDocState::new();
    sync_pair(&mut a, &mut sa, &mut b, &mut sb);
    assert_converged(&[&a, &b]);
    assert!(in_sync(&a, &sa) && in_sync(&b, &sb));
    let c = Conversation::open(&a).expect("conv");
    let ids: Vec<_> = c
        .requests()
        .into_iter()
        .filter_map(|m| m.request_id)
        .collect();
    assert_eq!(ids.len(), 2);
    assert!(ids.contains(&"ra".to_owned()) && ids.contains(&"rb".to_owned()));
    // Counters add up across devices.
    assert_eq!(
        (
            c.usage_totals().input_tokens,
            c.usage_totals().output_tokens
        ),
        (15, 3)
    );
    assert_eq!(a.to_json()["extra"], json!({"a": 1, "b": [1, 2]}));

    // The agent on b claims a's request; a sees it after the push.
    Conversation::open(&mut b)
        .expect("b")
        .claim("ra", "phone", 1, 14)
        .expect("claim");
    assert!(!in_sync(&b, &sb));
    let msg = generate(&b, &mut sb).expect("push");
    assert!(receive(&mut a, &mut sa, &msg).expect("receive").changed);
    sync_pair(&mut a, &mut sa, &mut b, &mut sb);
    let ra = Conversation::open(&a)
        .expect("a")
        .find_request("ra")
        .expect("ra");
    assert_eq!(ra.status, Some(Status::Running));
}

#[test]
fn unknown_fields_survive_sync_typed_edits_and_storage() {
    let mut old = Document::new(DocKind::Conversation, &actor(1), 0).expect("old build");
    Conversation::open(&mut old)
        .expect("conv")
        .append_request("r", "q", Interface::Cli, "laptop", 1)
        .expect("request");
    let mut new = Document::empty(&actor(2)).expect("newer build");
    let (mut so, mut sn) = (PeerDocState::new(), PeerDocState::new());
    sync_pair(&mut old, &mut so, &mut new, &mut sn);
    // A newer build adds fields at the root and inside a message.
    new.put_json("future_field", json!({"v": 3}), "v3 field", 2)
        .expect("put");
    new.put_json("messages.0.priority", json!("high"), "v3 field", 2)
        .expect("put");
    sync_pair(&mut old, &mut so, &mut new, &mut sn);

    // The older build edits through its typed API, persists, reloads and syncs back.
    {
        let mut c = Conversation::open(&mut old).expect("conv");
        c.claim("r", "agent", 1, 3).expect("claim");
        c.set_status("r", Status::Done, None, 4).expect("done");
        c.set_title("t", 4).expect("title");
    }
    let mut old = Document::load(&old.save(), &actor(3)).expect("reload");
    sync_pair(
        &mut old,
        &mut PeerDocState::new(),
        &mut new,
        &mut PeerDocState::new(),
    );
    assert_converged(&[&old, &new]);
    let j = new.to_json();
    assert_eq!(j["future_field"], json!({"v": 3}));
    assert_eq!(j["messages"][0]["priority"], "high");
    assert_eq!(j["messages"][0]["status"], "done");
}

#[test]
fn three_replicas_full_mesh_converge() {
    let mut docs: Vec<Document> = (1..=3)
        .map(|n| Document::new(DocKind::Memory, &actor(n), 0).expect("doc"))
        .collect();
    for (i, d) in docs.iter_mut().enumerate() {
        Memory::open(&mut *d)
            .expect("m")
            .append(&format!("line {i}\n"), "m", 1)
            .expect("append");
        d.put_json(&format!("k{i}"), json!(i), "put", 1)
            .expect("put");
        d.put_json("same", json!(i), "put", 1).expect("put");
    }
    let mut states: Vec<Vec<PeerDocState>> = (0..3)
        .map(|_| (0..3).map(|_| PeerDocState::new()).collect())
        .collect();
    for (i, j) in [(0, 1), (1, 2), (0, 2), (0, 1)] {
        let (lo, hi) = docs.split_at_mut(j);
        let mut s_ij = std::mem::take(&mut states[i][j]);
        let mut s_ji = std::mem::take(&mut states[j][i]);
        sync_pair(&mut lo[i], &mut s_ij, &mut hi[0], &mut s_ji);
        states[i][j] = s_ij;
        states[j][i] = s_ji;
    }
    assert_converged(&[&docs[0], &docs[1], &docs[2]]);
    let text = Memory::open(&docs[2]).expect("m").text();
    for i in 0..3 {
        assert!(text.contains(&format!("line {i}\n")));
    }
    assert_eq!(docs[0].to_json()["k2"], 2);
}

#[test]
fn chain_a_b_c_converges_without_a_meeting_c() {
    let mut a = Document::new(DocKind::Generic, &actor(1), 0).expect("a");
    let mut b = Document::empty(&actor(2)).expect("b");
    let mut c = Document::empty(&actor(3)).expect("c");
    let (mut ab, mut ba, mut bc, mut cb) = (
        PeerDocState::new(),
        PeerDocState::new(),
        PeerDocState::new(),
        PeerDocState::new(),
    );
    sync_pair(&mut a, &mut ab, &mut b, &mut ba);
    sync_pair(&mut b, &mut bc, &mut c, &mut cb);
    a.put_json("from_a", json!("a"), "a", 1).expect("a");
    c.put_json("from_c", json!("c"), "c", 1).expect("c");
    b.put_json("from_b", json!("b"), "b", 1).expect("b");

    let mut rounds = 0;
    while !(a.heads() == b.heads() && b.heads() == c.heads()) {
        rounds += 1;
        assert!(rounds <= MAX_ITER, "chain did not converge");
        sync_pair(&mut a, &mut ab, &mut b, &mut ba);
        sync_pair(&mut b, &mut bc, &mut c, &mut cb);
    }
    assert_converged(&[&a, &b, &c]);
    assert_eq!(a.to_json()["from_c"], "c");
    assert_eq!(c.to_json()["from_a"], "a");
}

#[test]
fn persisted_state_makes_the_next_sync_cheaper() {
    let mut a = Document::new(DocKind::Generic, &actor(1), 0).expect("a");
    for i in 0..300 {
        a.put_json(&format!("k{i}"), json!(i), "bulk", i)
            .expect("put");
    }
    let mut b = Document::empty(&actor(2)).expect("b");
    let (mut sa, mut sb) = (PeerDocState::new(), PeerDocState::new());
    let first = sync_pair(&mut a, &mut sa, &mut b, &mut sb);

    // Persist, "disconnect", change a little, reconnect with the restored states.
    let (pa, pb) = (sa.encode(), sb.encode());
    let mut a_fresh = Document::load(&a.save(), &actor(1)).expect("copy a");
    let mut b_fresh = Document::load(&b.save(), &actor(2)).expect("copy b");
    for d in [&mut a, &mut a_fresh] {
        d.put_json("k0", json!("changed"), "small", 1000)
            .expect("put");
    }
    let mut sa = PeerDocState::decode(&pa).expect("decode a");
    let mut sb = PeerDocState::decode(&pb).expect("decode b");
    assert_eq!(sa.shared_heads(), b.heads().as_slice());
    let second = sync_pair(&mut a, &mut sa, &mut b, &mut sb);
    assert_converged(&[&a, &b]);

    // The same small change with forgotten states.
    let without_state = sync_fresh(&mut a_fresh, &mut b_fresh);
    assert_converged(&[&a_fresh, &b_fresh]);

    eprintln!("first {first:?}, after reconnect {second:?}, without state {without_state:?}");
    assert!(
        second.bytes < first.bytes,
        "second sync {second:?} should be smaller than the first {first:?}"
    );
    assert!(
        second.bytes < without_state.bytes,
        "persisted {second:?} vs fresh {without_state:?}"
    );
}

#[test]
fn malformed_messages_are_errors_not_panics() {
    let mut a = Document::new(DocKind::Generic, &actor(1), 0).expect("a");
    a.put_json("x", json!("y"), "m", 1).expect("put");
    let mut b = Document::empty(&actor(2)).expect("b");
    let mut st = PeerDocState::new();
    let good = generate(&a, &mut PeerDocState::new()).expect("message");

    for bad in [
        &b""[..],
        b"\x00",
        b"garbage bytes",
        &[0x42; 64],
        &[0x43, 0xff, 0xff, 0xff],
    ] {
        assert!(
            matches!(receive(&mut b, &mut st, bad), Err(SyncError::Malformed(_))),
            "{bad:?}"
        );
    }
    for cut in 0..good.len() {
        let _ = receive(&mut b, &mut PeerDocState::new(), &good[..cut]);
    }
    assert!(receive(&mut b, &mut st, &good[..good.len() / 2]).is_err());
    assert!(matches!(
        PeerDocState::decode(b"nope"),
        Err(SyncError::BadState(_))
    ));
    // The document is untouched and still syncs.
    assert!(b.is_empty());
    sync_fresh(&mut a, &mut b);
    assert_converged(&[&a, &b]);
}

#[test]
fn state_round_trip_keeps_shared_heads_only() {
    let mut a = Document::new(DocKind::Generic, &actor(1), 0).expect("a");
    let mut b = Document::empty(&actor(2)).expect("b");
    let (mut sa, mut sb) = (PeerDocState::new(), PeerDocState::new());
    sync_pair(&mut a, &mut sa, &mut b, &mut sb);
    let back = PeerDocState::decode(&sa.encode()).expect("decode");
    assert_eq!(back.shared_heads(), sa.shared_heads());
    assert_eq!(back.their_heads(), None);
    assert!(!in_sync(&a, &back));
}

/// One random edit on one of two replicas.
#[derive(Debug, Clone)]
enum Edit {
    Append(usize, String),
    Put(usize, u8, i64),
    Delete(usize, u8),
    ListPush(usize, i64),
    Usage(usize, u16),
    Request(usize, u8),
    Sync,
}

fn edit() -> impl Strategy<Value = Edit> {
    let side = 0..2usize;
    prop_oneof![
        (side.clone(), "[a-z ]{0,6}").prop_map(|(s, t)| Edit::Append(s, t)),
        (side.clone(), 0..4u8, any::<i64>()).prop_map(|(s, k, v)| Edit::Put(s, k, v)),
        (side.clone(), 0..4u8).prop_map(|(s, k)| Edit::Delete(s, k)),
        (side.clone(), any::<i64>()).prop_map(|(s, v)| Edit::ListPush(s, v)),
        (side.clone(), any::<u16>()).prop_map(|(s, n)| Edit::Usage(s, n)),
        (side, 0..5u8).prop_map(|(s, r)| Edit::Request(s, r)),
        Just(Edit::Sync),
    ]
}

fn apply(d: &mut Document, e: &Edit, now: i64) {
    match e {
        Edit::Append(_, t) => {
            let mut text = d.get_json("memo").ok().flatten();
            let current = text.take().and_then(|v| v.as_str().map(str::to_owned));
            let next = format!("{}{t}", current.unwrap_or_default());
            d.put_json("memo", json!(next), "append", now)
                .expect("append");
        }
        Edit::Put(_, k, v) => d
            .put_json(&format!("m.k{k}"), json!(v), "put", now)
            .expect("put"),
        Edit::Delete(_, k) => {
            let _ = d.delete_path(&format!("m.k{k}"), "rm", now);
        }
        Edit::ListPush(_, v) => {
            let len = d
                .get_json("list")
                .ok()
                .flatten()
                .and_then(|l| l.as_array().map(Vec::len));
            d.put_json(&format!("list.{}", len.unwrap_or(0)), json!(v), "push", now)
                .expect("push");
        }
        Edit::Usage(_, n) => {
            Conversation::open(d)
                .expect("conv")
                .add_usage(u64::from(*n), 1, now)
                .expect("usage");
        }
        Edit::Request(s, r) => {
            let id = format!("req-{s}-{r}");
            Conversation::open(d)
                .expect("conv")
                .append_request(&id, "q", Interface::Cli, "dev", now)
                .expect("request");
        }
        Edit::Sync => {}
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn random_edits_on_two_replicas_converge(edits in proptest::collection::vec(edit(), 1..40)) {
        let mut a = Document::new(DocKind::Conversation, &actor(1), 0).expect("a");
        let mut b = Document::empty(&actor(2)).expect("b");
        let (mut sa, mut sb) = (PeerDocState::new(), PeerDocState::new());
        sync_pair(&mut a, &mut sa, &mut b, &mut sb);
        let mut usage = 0u64;
        for (i, e) in edits.iter().enumerate() {
            let now = i64::try_from(i).expect("small");
            match e {
                Edit::Sync => { sync_pair(&mut a, &mut sa, &mut b, &mut sb); }
                Edit::Append(s, _) | Edit::Put(s, ..) | Edit::Delete(s, _)
                | Edit::ListPush(s, _) | Edit::Usage(s, _) | Edit::Request(s, _) => {
                    if let Edit::Usage(_, n) = e { usage += u64::from(*n); }
                    let d = if *s == 0 { &mut a } else { &mut b };
                    apply(d, e, now);
                }
            }
        }
        sync_pair(&mut a, &mut sa, &mut b, &mut sb);
        prop_assert_eq!(a.heads(), b.heads());
        prop_assert_eq!(a.to_json(), b.to_json());
        let totals = Conversation::open(&a).expect("conv").usage_totals();
        prop_assert_eq!(totals.input_tokens, usage);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let mut d = Document::new(DocKind::Generic, &actor(1), 0).expect("d");
        let _ = receive(&mut d, &mut PeerDocState::new(), &bytes);
        let _ = PeerDocState::decode(&bytes);
        let _ = Document::load(&bytes, &actor(2));
        let _ = d.load_incremental(&bytes);
    }

    #[test]
    fn perturbed_messages_never_panic(flip in 0usize..512, val in any::<u8>()) {
        let mut a = Document::new(DocKind::Memory, &actor(1), 0).expect("a");
        Memory::open(&mut a).expect("m").append("hello world", "m", 1).expect("append");
        let mut b = Document::empty(&actor(2)).expect("b");
        let (mut sa, mut sb) = (PeerDocState::new(), PeerDocState::new());
        let hello = generate(&b, &mut sb).expect("hello");
        receive(&mut a, &mut sa, &hello).expect("receive");
        // This message carries a's changes.
        let mut msg = generate(&a, &mut sa).expect("changes");
        let i = flip % msg.len();
        msg[i] = val;
        let _ = receive(&mut b, &mut sb, &msg);
    }
}

/// A document with ten changes, as the cold-sync benchmark builds them.
fn ten_change_doc(n: u8) -> Document {
    let mut d = Document::new(DocKind::Generic, &actor(n), 1).expect("new");
    for i in 0..9 {
        d.put_json(&format!("f{i}"), json!(i), "edit", 2 + i)
            .expect("put");
    }
    d
}

#[test]
fn after_a_snapshot_both_sides_are_silent_and_the_next_change_takes_one_message() {
    let mut a = ten_change_doc(1);
    let mut b = Document::load(&a.snapshot(), &actor(2)).expect("load snapshot");
    let mut sa = PeerDocState::after_snapshot(&a.heads());
    let mut sb = PeerDocState::after_snapshot(&b.heads());
    assert!(generate(&a, &mut sa).is_none(), "a has nothing to say");
    assert!(generate(&b, &mut sb).is_none(), "b has nothing to say");

    a.put_json("later", json!("news"), "edit", 100)
        .expect("put");
    let msg = generate(&a, &mut sa).expect("a pushes its change");
    let outcome = receive(&mut b, &mut sb, &msg).expect("b applies it");
    assert!(outcome.changed);
    assert_converged(&[&a, &b]);
    // The rest is acknowledgement only; the replicas settle.
    sync_pair(&mut a, &mut sa, &mut b, &mut sb);
    assert_converged(&[&a, &b]);
}

#[test]
fn a_snapshot_state_that_claims_too_much_still_converges() {
    // A believes B got the snapshot, but B never did (the connection broke).
    let mut a = ten_change_doc(1);
    let mut b = Document::empty(&actor(2)).expect("b");
    let mut sa = PeerDocState::after_snapshot(&a.heads());
    let mut sb = PeerDocState::new();
    a.put_json("later", json!(1), "edit", 100).expect("put");
    sync_pair(&mut a, &mut sa, &mut b, &mut sb);
    assert_converged(&[&a, &b]);

    // And when it is persisted and restored (a new session), too.
    let mut a = ten_change_doc(3);
    let mut b = Document::empty(&actor(4)).expect("b");
    let mut sa =
        PeerDocState::decode(&PeerDocState::after_snapshot(&a.heads()).encode()).expect("decode");
    sync_pair(&mut a, &mut sa, &mut b, &mut PeerDocState::new());
    assert_converged(&[&a, &b]);
}

/// Two replicas in sync, states persisted; `edit` runs on them while apart.
fn apart(
    edit: impl FnOnce(&mut Document, &mut Document),
) -> (Document, Vec<u8>, Document, Vec<u8>) {
    let mut a = ten_change_doc(1);
    let mut b = Document::empty(&actor(2)).expect("b");
    let (mut sa, mut sb) = (PeerDocState::new(), PeerDocState::new());
    sync_pair(&mut a, &mut sa, &mut b, &mut sb);
    edit(&mut a, &mut b);
    (a, sa.encode(), b, sb.encode())
}

#[test]
fn a_resumed_session_sends_changes_made_apart_in_its_first_message() {
    let (mut a, sa, mut b, sb) = apart(|a, _| {
        a.put_json("while_apart", json!(1), "edit", 50)
            .expect("put");
    });
    let (mut sa, mut sb) = (
        PeerDocState::resume(&sa).expect("a"),
        PeerDocState::resume(&sb).expect("b"),
    );
    let first = generate(&a, &mut sa).expect("a speaks first");
    assert!(receive(&mut b, &mut sb, &first).expect("b applies").changed);
    assert_converged(&[&a, &b]);
    let rest = sync_pair(&mut a, &mut sa, &mut b, &mut sb);
    assert!(rest.messages <= 2, "{rest:?}");
    assert_converged(&[&a, &b]);
    // Plain restore, for comparison: the change needs more round trips.
    let (mut a, sa, mut b, sb) = apart(|a, _| {
        a.put_json("while_apart", json!(1), "edit", 50)
            .expect("put");
    });
    let plain = sync_pair(
        &mut a,
        &mut PeerDocState::decode(&sa).expect("a"),
        &mut b,
        &mut PeerDocState::decode(&sb).expect("b"),
    );
    assert!(plain.messages > 2, "{plain:?}");
}

#[test]
fn a_resumed_session_converges_when_both_changed_or_one_lost_data() {
    let (mut a, sa, mut b, sb) = apart(|a, b| {
        a.put_json("from_a", json!(1), "edit", 50).expect("put");
        b.put_json("from_b", json!(2), "edit", 51).expect("put");
    });
    sync_pair(
        &mut a,
        &mut PeerDocState::resume(&sa).expect("a"),
        &mut b,
        &mut PeerDocState::resume(&sb).expect("b"),
    );
    assert_converged(&[&a, &b]);
    assert_eq!(b.get_json("from_a").expect("get"), Some(json!(1)));

    // B lost everything (restored an old backup: empty) but A's state says it had the shared
    // heads: the reset path still converges.
    let (mut a, sa, _, _) = apart(|a, _| {
        a.put_json("later", json!(3), "edit", 52).expect("put");
    });
    let mut b = Document::empty(&actor(9)).expect("b");
    sync_pair(
        &mut a,
        &mut PeerDocState::resume(&sa).expect("a"),
        &mut b,
        &mut PeerDocState::new(),
    );
    assert_converged(&[&a, &b]);
}
