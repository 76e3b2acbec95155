//! In-process scenarios across services: several [`testkit`](crate::testkit) nodes over
//! libp2p's memory transport, tokio's clock paused. What the real-process tests in `tests/`
//! show over sockets, here in milliseconds: cold sync, concurrent edits, blobs, chains.

use std::time::Duration;

use iom_crdt::{DocId, DocKind};
use serde_json::{Value, json};

use crate::docs::Origin;
use crate::testkit::{TestNode, eventually, mesh};

async fn new_doc(n: &TestNode, key: &str, value: Value) -> DocId {
    let id = n.ctx().docs.create(DocKind::Generic).await.expect("create");
    put(n, id, key, value).await;
    id
}

async fn put(n: &TestNode, id: DocId, key: &str, value: Value) {
    let key = key.to_string();
    n.ctx()
        .docs
        .modify(id, Origin::Local, false, move |d| {
            Ok(d.put_json(&key, value, "edit", 1))
        })
        .await
        .expect("modify")
        .expect("valid path");
}

async fn get(n: &TestNode, id: DocId, key: &str) -> Option<Value> {
    let key = key.to_string();
    n.ctx()
        .docs
        .read(id, move |d| d.get_json(&key).ok().flatten())
        .await
        .ok()
        .flatten()
}

fn root(n: &TestNode) -> [u8; 32] {
    n.ctx().docs.with_inventory(|i| i.root())
}

async fn wait_roots_equal(nodes: &[&TestNode]) {
    eventually("every inventory root to be equal", || async {
        let first = root(nodes[0]);
        nodes.iter().all(|n| root(n) == first)
    })
    .await;
}

async fn add_blob(n: &TestNode, bytes: &[u8]) -> [u8; 32] {
    let mut w = n.ctx().store.blob_writer(None).expect("writer");
    w.write(bytes).expect("write");
    let (id, meta) = w.finish().await.expect("finish");
    n.ctx().blob_added(id, meta.len);
    id
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_new_device_receives_every_document_and_then_live_edits() {
    let a = TestNode::new("a").await;
    let mut ids = Vec::new();
    for i in 0..150 {
        ids.push(new_doc(&a, "n", json!(i)).await);
    }
    let b = TestNode::new("b").await;
    let code = a
        .ctx()
        .pairing
        .create_invite(Duration::from_secs(60), false)
        .await
        .expect("invite")
        .encode()
        .expect("code");
    b.ctx().pairing.join(&code, None).await.expect("join");
    wait_roots_equal(&[&a, &b]).await;
    assert_eq!(get(&b, ids[149], "n").await, Some(json!(149)));
    assert_eq!(b.ctx().store.doc_count(), a.ctx().store.doc_count());
    // Live, both ways.
    put(&b, ids[0], "from", json!("b")).await;
    put(&a, ids[1], "from", json!("a")).await;
    eventually("b's edit to reach a", || async {
        get(&a, ids[0], "from").await == Some(json!("b"))
    })
    .await;
    eventually("a's edit to reach b", || async {
        get(&b, ids[1], "from").await == Some(json!("a"))
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn concurrent_edits_to_one_document_merge_on_every_device() {
    let nodes = mesh(&["a", "b", "c"]).await;
    let id = new_doc(&nodes[0], "title", json!("plan")).await;
    for n in &nodes[1..] {
        eventually("the document to arrive", || async {
            get(n, id, "title").await.is_some()
        })
        .await;
    }
    // All three write different keys at once.
    for (i, n) in nodes.iter().enumerate() {
        put(n, id, &format!("k{i}"), json!(i)).await;
    }
    let all: Vec<&TestNode> = nodes.iter().collect();
    wait_roots_equal(&all).await;
    for n in &nodes {
        for i in 0..3 {
            assert_eq!(
                get(n, id, &format!("k{i}")).await,
                Some(json!(i)),
                "{}",
                n.name
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn small_and_large_blobs_reach_other_devices_verified() {
    let nodes = mesh(&["a", "b"]).await;
    let small = pattern(100_000, 1);
    let large = pattern(3 * 1024 * 1024 + 17, 2); // over the eager limit: fetched in the background
    let small_id = add_blob(&nodes[0], &small).await;
    let large_id = add_blob(&nodes[0], &large).await;
    let b = &nodes[1];
    eventually("both blobs to arrive", || async {
        b.ctx().store.has_blob(&small_id).unwrap_or(false)
            && b.ctx().store.has_blob(&large_id).unwrap_or(false)
    })
    .await;
    let meta = b
        .ctx()
        .store
        .blob_meta(&large_id)
        .expect("meta")
        .expect("present");
    assert_eq!(meta.len, large.len() as u64);
}

#[tokio::test(start_paused = true)]
async fn a_change_travels_through_a_middle_device() {
    // a - b - c as a chain: nobody tells a and c where the other is.
    let a = TestNode::new_with("a", |c| c.fault_no_addr_sharing = true).await;
    let b = TestNode::new_with("b", |c| c.fault_no_addr_sharing = true).await;
    let c = TestNode::new_with("c", |c| c.fault_no_addr_sharing = true).await;
    for (inviter, joiner) in [(&a, &b), (&b, &c)] {
        let code = inviter
            .ctx()
            .pairing
            .create_invite(Duration::from_secs(60), true)
            .await
            .expect("invite")
            .encode()
            .expect("code");
        joiner.ctx().pairing.join(&code, None).await.expect("join");
    }
    let id = new_doc(&a, "hop", json!(2)).await;
    eventually("a's document to reach c through b", || async {
        get(&c, id, "hop").await == Some(json!(2))
    })
    .await;
    assert!(
        !a.ctx()
            .net
            .connected_peers()
            .contains(&c.ctx().identity.peer_id()),
        "a and c stayed apart"
    );
    put(&c, id, "back", json!(true)).await;
    eventually("c's edit to come back to a", || async {
        get(&a, id, "back").await == Some(json!(true))
    })
    .await;
}
