//! The manager's pieces: the session registry (one session per peer, the preferred initiator),
//! who opens, and what broadcasts and live pushes queue in each session.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use iom_crdt::Inventory;
use iom_crdt::session::Transmit;

use super::session::SessionHandle;
use super::*;

fn handle(peer: PeerId, initiator: PeerId, id: u64) -> SessionHandle {
    SessionHandle::for_test(peer, initiator, id)
}

/// Everything the session would send now (Automerge documents by id).
fn drain(h: &SessionHandle) -> Vec<String> {
    let inv = Inventory::new();
    let mut out = Vec::new();
    loop {
        let next = h.shared.lock().poll_transmit(&inv);
        let Some(t) = next else { break };
        out.push(match t {
            Transmit::Send(m) => m.name().to_string(),
            Transmit::Generate { doc, state, .. } => {
                // Nothing to say; hand the state back as the writer does.
                let st = state.unwrap_or_default();
                assert!(h.shared.lock().generated(doc, st, None).unwrap().is_empty());
                format!("generate {doc}")
            }
            Transmit::LoadSnapshots { .. } => "snapshots".into(),
        });
    }
    out
}

fn peers() -> (PeerId, PeerId) {
    let (a, b) = (PeerId::random(), PeerId::random());
    if a < b { (a, b) } else { (b, a) }
}

#[test]
fn one_session_per_peer_and_the_lower_peers_session_wins() {
    let (low, high) = peers();
    // We are `low`; the peer is `high`. Our own outbound session is the preferred one.
    let reg = Registry::default();
    let theirs = handle(high, high, 1);
    assert!(reg.register(low, theirs.clone()));
    let ours = handle(high, low, 2);
    assert!(
        reg.register(low, ours.clone()),
        "the preferred initiator replaces"
    );
    assert!(theirs.is_closed(), "the replaced session is closed");
    assert!(
        !reg.register(low, handle(high, high, 3)),
        "and is not replaced back"
    );
    assert!(
        !reg.register(low, handle(high, low, 4)),
        "nor by a second equivalent one"
    );
    assert!(reg.has_session(&high));
    assert_eq!(reg.handles().len(), 1);
    assert_eq!(reg.handles()[0].id, 2);
}

#[test]
fn a_closed_session_is_replaced_and_unregistering_spares_newer_ones() {
    let (low, high) = peers();
    let reg = Registry::default();
    let first = handle(low, low, 1);
    assert!(reg.register(high, first.clone()));
    first.close();
    assert!(!reg.has_session(&low));
    let second = handle(low, high, 2);
    assert!(
        reg.register(high, second),
        "a closed session does not block a new one"
    );
    reg.unregister(low, 1); // the old session ends late
    assert!(reg.has_session(&low));
    reg.unregister(low, 2);
    assert!(!reg.has_session(&low));
    assert!(reg.handles().is_empty());
}

#[test]
fn ids_are_unique_and_close_all_closes_every_session() {
    let reg = Registry::default();
    let ids: std::collections::HashSet<u64> = (0..100).map(|_| reg.next_id()).collect();
    assert_eq!(ids.len(), 100);
    let local = PeerId::random();
    let hs: Vec<_> = (0..3).map(|i| handle(PeerId::random(), local, i)).collect();
    for h in &hs {
        assert!(reg.register(local, h.clone()));
    }
    reg.close_all();
    assert!(hs.iter().all(SessionHandle::is_closed));
}

#[tokio::test(start_paused = true)]
async fn only_trusted_peers_without_a_session_are_opened() {
    use super::session::tests::{FakeBlobs, device, node, person};
    let n = node(1, &person(), &[2], FakeBlobs::default()).await;
    let me = n.peer;
    let trusted = device(2).id().to_peer_id();
    assert!(!should_open(&n.deps, me, me), "not ourselves");
    assert!(
        !should_open(&n.deps, me, device(3).id().to_peer_id()),
        "not a stranger"
    );
    assert!(
        !should_open(&n.deps, me, PeerId::random()),
        "not a non-device peer id"
    );
    assert!(should_open(&n.deps, me, trusted));
    assert!(n.deps.registry.register(me, handle(trusted, me, 1)));
    assert!(!should_open(&n.deps, me, trusted), "not twice");
}

#[test]
fn the_lower_peer_opens_at_once_the_higher_after_the_grace() {
    let (low, high) = peers();
    let grace = Duration::from_millis(750);
    assert_eq!(open_delay(low, high, grace), Duration::ZERO);
    assert_eq!(open_delay(high, low, grace), grace);
}

#[test]
fn a_change_is_pushed_to_every_session_but_the_one_it_came_from() {
    let reg = Registry::default();
    let local = PeerId::random();
    let (from, other) = (PeerId::random(), PeerId::random());
    let (hf, ho) = (handle(from, local, 1), handle(other, local, 2));
    reg.register(local, hf.clone());
    reg.register(local, ho.clone());
    let doc = DocId::from_bytes([1; 16]);
    mark_dirty_everywhere(&reg, doc, Some(from));
    assert!(drain(&hf).is_empty());
    assert_eq!(drain(&ho), vec![format!("generate {doc}")]);
    // A local change goes everywhere, once per session however often it is marked.
    mark_dirty_everywhere(&reg, doc, None);
    mark_dirty_everywhere(&reg, doc, None);
    assert_eq!(drain(&hf).len(), 1);
    assert_eq!(drain(&ho).len(), 1);
}

#[test]
fn broadcasts_are_queued_not_dropped_and_certificate_sets_supersede() {
    let reg = Registry::default();
    let local = PeerId::random();
    let h = handle(PeerId::random(), local, 1);
    reg.register(local, h.clone());
    for _ in 0..1000 {
        broadcast(&reg, &SyncMsg::Certs { certs: vec![] });
    }
    for i in 0..500u32 {
        let mut id = [0u8; 32];
        id[..4].copy_from_slice(&i.to_be_bytes());
        broadcast(
            &reg,
            &SyncMsg::Blobs {
                have: vec![(ContentId::from_bytes(id), 1)],
            },
        );
    }
    broadcast(&reg, &SyncMsg::Root { root: [0; 32] });
    broadcast(&reg, &SyncMsg::Root { root: [1; 32] });
    let sent = drain(&h);
    assert_eq!(sent.iter().filter(|m| *m == "Other").count(), 1 + 500);
    assert_eq!(sent.iter().filter(|m| *m == "Root").count(), 1);
}

#[test]
fn progress_reports_backlog_and_blob_bytes_per_peer() {
    struct Pending;
    impl BlobHandle for Pending {
        fn announcement_page(&self, _: Option<ContentId>, _: usize) -> Vec<(ContentId, u64)> {
            Vec::new()
        }
        fn has(&self, _: &ContentId) -> bool {
            false
        }
        fn want(&self, _: ContentId, _: u64, _: PeerId) {}
        fn pending_bytes_from(&self, _: &PeerId) -> u64 {
            4096
        }
        fn digest(&self) -> Option<iom_protocol::blobset::BlobSetDigest> {
            None
        }
    }
    let reg = Registry::default();
    let local = PeerId::random();
    let peer = PeerId::random();
    let h = handle(peer, local, 1);
    reg.register(local, h.clone());
    for i in 0..3 {
        h.mark_dirty(DocId::from_bytes([i; 16]));
    }
    h.shared
        .lock()
        .wait_for_peer(DocId::from_bytes([9; 16]), Default::default())
        .expect("open");
    h.shared
        .stats
        .bytes_in
        .store(10, std::sync::atomic::Ordering::Relaxed);
    let (_dir, store) = crate::store::temp_store();
    let docs = Docs::new(store, vec![1; 40], 8).expect("docs");
    let p = progress(&reg, &Pending, &docs);
    assert_eq!(p.len(), 1);
    assert_eq!(p[0]["device"], peer.to_string());
    assert_eq!(p[0]["docs_behind"], 3);
    assert_eq!(p[0]["docs_waiting"], 1);
    assert_eq!(p[0]["bytes_pending"], 4096);
    assert_eq!(p[0]["bytes_in"], 10);
    assert_eq!(p[0]["snapshots_received"], 0);
    assert_eq!(p[0]["docs_incoming"], 0);
    assert_eq!(p[0]["compared"], false);
}

mod two_nodes {
    //! Two managers over real libp2p (TCP on 127.0.0.1, in this process).

    use iom_protocol::cert::{CertBody, Certificate};
    use iom_protocol::keys::{DeviceKey, PersonKey};

    use super::*;
    use crate::testkit::eventually;

    struct TestNode {
        _dir: tempfile::TempDir,
        docs: Docs,
        net: Net,
        sync: Arc<Manager>,
        _net_stop: tokio::sync::watch::Sender<bool>,
        _net_task: tokio::task::JoinSet<()>,
    }

    fn cert(person: &PersonKey, device: &DeviceKey) -> Certificate {
        Certificate::issue_by_person(
            CertBody::Device {
                kind: None,
                person: person.id(),
                device: device.id(),
                name: "test device".into(),
                admin: true,
                issued_at: 1,
            },
            person,
        )
        .unwrap()
    }

    async fn start(n: u8, person: &PersonKey, devices: &[DeviceKey]) -> TestNode {
        let node = start_stopped(n, person, devices).await;
        node.sync.start(CancellationToken::new());
        node
    }

    /// A node whose network runs but whose sync manager is not started yet (a node still
    /// starting up: connections are accepted, `/iom/sync/1` is not).
    async fn start_stopped(n: u8, person: &PersonKey, devices: &[DeviceKey]) -> TestNode {
        let (dir, store) = crate::store::temp_store();
        let key = &devices[usize::from(n)];
        let docs = Docs::new(
            store.clone(),
            iom_crdt::actor_for(key.id().as_bytes(), [n; 8]),
            64,
        )
        .unwrap();
        let trust = Arc::new(TrustBook::load(store.clone(), person.id()).unwrap());
        trust
            .add(devices.iter().map(|d| cert(person, d)).collect())
            .await
            .unwrap();
        let (net_stop, net_stop_rx) = tokio::sync::watch::channel(false);
        let mut net_task = tokio::task::JoinSet::new();
        let net = crate::net::event_loop::start(
            key,
            crate::net::NetConfig {
                listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
                relays: Vec::new(),
                mdns: false,
                transport: crate::net::TransportKind::Os,
            },
            trust.clone(),
            store.clone(),
            net_stop_rx,
            &mut net_task,
        )
        .await
        .unwrap();
        net.go_online();
        let blobs = Arc::new(StoreBlobs::new(
            store.clone(),
            Arc::new(blobs::Blobs::new(
                store.clone(),
                net.clone(),
                trust.clone(),
                Arc::default(),
                blobs::BlobsConfig::default(),
            )),
        ));
        let sync = Arc::new(Manager::new(
            docs.clone(),
            trust,
            net.clone(),
            store,
            blobs,
            Arc::default(),
            SyncConfig::default(),
        ));
        TestNode {
            _dir: dir,
            docs,
            net,
            sync,
            _net_stop: net_stop,
            _net_task: net_task,
        }
    }

    async fn heads(docs: &Docs, doc: DocId) -> Option<Vec<iom_crdt::ChangeHash>> {
        docs.read(doc, |d| d.heads()).await.ok()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn managers_open_a_session_on_connect_push_changes_and_shut_down() {
        let person = PersonKey::from_seed([1; 32]);
        let devices = [DeviceKey::from_seed([2; 32]), DeviceKey::from_seed([3; 32])];
        let a = start(0, &person, &devices).await;
        let b = start(1, &person, &devices).await;
        let doc = a.docs.create(iom_crdt::DocKind::Generic).await.unwrap();
        let addrs = b.net.listen_addrs().await;
        a.net.dial(Some(b.net.local), addrs).await.unwrap();
        eventually("a session on both sides", async || {
            a.sync.has_session(&b.net.local) && b.sync.has_session(&a.net.local)
        })
        .await;
        eventually("b to hold a's document", async || {
            heads(&b.docs, doc).await == heads(&a.docs, doc).await
        })
        .await;
        // A live change on b reaches a without any inventory round.
        b.docs
            .modify(doc, Origin::Local, false, |d| {
                Ok(d.put_json("from_b", serde_json::json!(true), "edit", 2))
            })
            .await
            .unwrap()
            .unwrap();
        eventually("a to hold b's change", async || {
            heads(&a.docs, doc).await == heads(&b.docs, doc).await
        })
        .await;
        let progress = a.sync.progress();
        assert_eq!(progress.len(), 1);
        assert_eq!(progress[0]["device"], b.net.local.to_string());
        // Shutdown ends every task it owns, sessions included, without needing the grace period.
        let started = std::time::Instant::now();
        a.sync.shutdown().await;
        assert!(
            started.elapsed() < SHUTDOWN_GRACE,
            "{:?}",
            started.elapsed()
        );
        assert!(!a.sync.has_session(&b.net.local));
        eventually("b to see the session end", async || {
            !b.sync.has_session(&a.net.local)
        })
        .await;
        b.sync.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_whose_sync_protocol_comes_up_after_the_connection_gets_a_session() {
        let person = PersonKey::from_seed([1; 32]);
        let devices = [DeviceKey::from_seed([2; 32]), DeviceKey::from_seed([3; 32])];
        let a = start(0, &person, &devices).await;
        let b = start_stopped(1, &person, &devices).await;
        let addrs = b.net.listen_addrs().await;
        a.net.dial(Some(b.net.local), addrs).await.unwrap();
        // a's first open is refused (b does not speak /iom/sync/1 yet); b's manager comes up.
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        assert!(!a.sync.has_session(&b.net.local));
        b.sync.start(CancellationToken::new());
        eventually("a session once b's sync is up", async || {
            a.sync.has_session(&b.net.local) && b.sync.has_session(&a.net.local)
        })
        .await;
        a.sync.shutdown().await;
        b.sync.shutdown().await;
    }
}
