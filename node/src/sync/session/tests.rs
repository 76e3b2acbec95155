//! The driver over in-memory streams: real documents and trust in temp stores, fakes for the
//! network and the blob service, tokio's paused clock.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::time::Duration;

use crate::net::framed::write_frame;
use futures::{AsyncRead, AsyncWrite};
use iom_crdt::{DocKind, Document};
use iom_protocol::cert::CertBody;
use iom_protocol::keys::{DeviceKey, PersonKey};
use iom_protocol::wire::MAX_BLOB_ANNOUNCE;
use tokio_util::compat::{Compat, TokioAsyncReadCompatExt};

use super::*;
use crate::docs::Origin;
use crate::testkit::eventually;

#[derive(Default)]
struct FakeNet {
    local: Option<PeerId>,
    known: Vec<(PeerId, Vec<Multiaddr>)>,
    disconnected: Mutex<Vec<PeerId>>,
    added: Mutex<Vec<(PeerId, Vec<Multiaddr>)>>,
}

impl Network for FakeNet {
    fn local_peer(&self) -> PeerId {
        self.local.unwrap()
    }
    fn disconnect(&self, peer: PeerId) -> BoxFuture<'_, ()> {
        self.disconnected.lock().unwrap().push(peer);
        Box::pin(async {})
    }
    fn add_addresses(&self, peer: PeerId, addrs: Vec<Multiaddr>) -> BoxFuture<'_, ()> {
        self.added.lock().unwrap().push((peer, addrs));
        Box::pin(async {})
    }
    fn known_addresses(&self) -> Vec<(PeerId, Vec<Multiaddr>)> {
        self.known.clone()
    }
}

#[derive(Default)]
pub(crate) struct FakeBlobs {
    announce: Vec<Vec<(ContentId, u64)>>,
    here: HashSet<ContentId>,
    wanted: Mutex<Vec<(ContentId, u64, PeerId)>>,
    /// Whether it has a digest (of the blobs in `announce`), as a store does.
    digest: bool,
}

impl BlobHandle for FakeBlobs {
    fn announcement_page(&self, after: Option<ContentId>, max: usize) -> Vec<(ContentId, u64)> {
        let mut all: Vec<_> = self.announce.concat();
        all.sort();
        all.into_iter()
            .filter(|(id, _)| after.is_none_or(|a| *id > a))
            .take(max)
            .collect()
    }
    fn has(&self, id: &ContentId) -> bool {
        self.here.contains(id)
    }
    fn want(&self, id: ContentId, len: u64, peer: PeerId) {
        self.wanted.lock().unwrap().push((id, len, peer));
    }
    fn pending_bytes_from(&self, _: &PeerId) -> u64 {
        0
    }
    fn digest(&self) -> Option<BlobSetDigest> {
        let ids: Vec<ContentId> = self
            .announce
            .concat()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        self.digest.then(|| BlobSetDigest::of(&ids))
    }
}

pub(crate) fn person() -> PersonKey {
    PersonKey::from_seed([1; 32])
}

pub(crate) fn device(n: u8) -> DeviceKey {
    DeviceKey::from_seed([n + 10; 32])
}

fn cert(person: &PersonKey, device: &DeviceKey) -> Certificate {
    Certificate::issue_by_person(
        CertBody::Device {
            kind: None,
            person: person.id(),
            device: device.id(),
            name: format!("device {}", device.id()),
            admin: true,
            issued_at: 1,
        },
        person,
    )
    .unwrap()
}

/// A node with its own store: documents, trust in `person`'s mesh (certifying `trusted`).
pub(crate) struct Node {
    _dir: tempfile::TempDir,
    pub(crate) deps: Deps,
    net: Arc<FakeNet>,
    blobs: Arc<FakeBlobs>,
    pub(crate) peer: PeerId,
}

pub(crate) async fn node(n: u8, person: &PersonKey, trusted: &[u8], blobs: FakeBlobs) -> Node {
    let (dir, store) = crate::store::temp_store();
    let key = device(n);
    let peer = key.id().to_peer_id();
    let docs = Docs::new(
        store.clone(),
        iom_crdt::actor_for(key.id().as_bytes(), [n; 8]),
        64,
    )
    .unwrap();
    let trust = Arc::new(TrustBook::load(store.clone(), person.id()).unwrap());
    let mut certs = vec![cert(person, &key)];
    certs.extend(trusted.iter().map(|t| cert(&self::person(), &device(*t))));
    trust.add(certs).await.unwrap();
    let net = Arc::new(FakeNet {
        local: Some(peer),
        ..FakeNet::default()
    });
    let blobs = Arc::new(blobs);
    let deps = Deps {
        docs,
        trust,
        store,
        net: net.clone(),
        blobs: blobs.clone(),
        gate: Arc::default(),
        registry: Arc::default(),
        config: SyncConfig::default(),
        shutdown: CancellationToken::new(),
    };
    Node {
        _dir: dir,
        deps,
        net,
        blobs,
        peer,
    }
}

type Io = Compat<tokio::io::DuplexStream>;

fn pipe(buffer: usize) -> (Io, Io) {
    let (a, b) = tokio::io::duplex(buffer);
    (a.compat(), b.compat())
}

/// Runs a session between `a` (initiator) and `b` over a pipe.
fn connect(a: &Node, b: &Node) -> (tokio::task::JoinHandle<()>, tokio::task::JoinHandle<()>) {
    let (x, y) = pipe(64 * 1024);
    let ta = tokio::spawn(run(a.deps.clone(), b.peer, x, Role::Initiator));
    let tb = tokio::spawn(run(b.deps.clone(), a.peer, y, Role::Responder));
    (ta, tb)
}

async fn new_doc(n: &Node, key: &str) -> DocId {
    let doc = n.deps.docs.create(DocKind::Generic).await.unwrap();
    edit(n, doc, key).await;
    doc
}

async fn edit(n: &Node, doc: DocId, key: &str) {
    let key = key.to_string();
    n.deps
        .docs
        .modify(doc, Origin::Local, false, move |d| {
            Ok(d.put_json(&key, serde_json::json!(1), "edit", 1))
        })
        .await
        .unwrap()
        .unwrap();
}

async fn heads(n: &Node, doc: DocId) -> Option<Vec<iom_crdt::ChangeHash>> {
    n.deps.docs.read(doc, |d| d.heads()).await.ok()
}

fn session_with(n: &Node, peer: PeerId) -> SessionHandle {
    n.deps
        .registry
        .handles()
        .into_iter()
        .find(|h| h.peer == peer)
        .expect("a session")
}

/// A hand-driven peer: writes and reads raw frames.
struct Raw<S> {
    io: S,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Raw<S> {
    async fn send(&mut self, msg: SyncMsg) {
        write_frame(&mut self.io, &msg.encode().unwrap(), MAX_SYNC_FRAME)
            .await
            .unwrap();
    }
    async fn recv(&mut self) -> Option<SyncMsg> {
        let bytes = read_frame(&mut self.io, MAX_SYNC_FRAME).await.unwrap()?;
        Some(SyncMsg::decode(&bytes).unwrap())
    }
}

fn hello_from(n: u8, version: u8) -> SyncMsg {
    SyncMsg::Hello {
        version,
        person: person().id(),
        chain: vec![cert(&person(), &device(n))],
        blobs: None,
    }
}

#[tokio::test(start_paused = true)]
async fn two_sessions_sync_documents_both_ways_and_count_traffic() {
    let a = node(1, &person(), &[2], FakeBlobs::default()).await;
    let b = node(2, &person(), &[1], FakeBlobs::default()).await;
    let doc = new_doc(&a, "from_a").await;
    let _tasks = connect(&a, &b);
    eventually("b to hold a's document", async || {
        heads(&b, doc).await == heads(&a, doc).await
    })
    .await;
    assert!(a.deps.registry.has_session(&b.peer));
    assert!(b.deps.registry.has_session(&a.peer));
    // A change on b is pushed to a once the session is told (the manager does it on change).
    edit(&b, doc, "from_b").await;
    session_with(&b, a.peer).mark_dirty(doc);
    eventually("a to hold b's change", async || {
        heads(&a, doc).await == heads(&b, doc).await
    })
    .await;
    let json = a.deps.docs.read(doc, |d| d.to_json()).await.unwrap();
    assert_eq!(json["from_b"], 1);
    let stats = &session_with(&a, b.peer).shared.stats;
    assert!(stats.docs_received.load(Ordering::Relaxed) >= 1);
    assert!(stats.bytes_in.load(Ordering::Relaxed) > 0);
    assert!(stats.bytes_out.load(Ordering::Relaxed) > 0);
}

#[tokio::test(start_paused = true)]
async fn a_device_that_has_nothing_gets_documents_whole() {
    let a = node(1, &person(), &[2], FakeBlobs::default()).await;
    let b = node(2, &person(), &[1], FakeBlobs::default()).await;
    let mut docs = Vec::new();
    for i in 0..3 {
        docs.push(new_doc(&a, &format!("k{i}")).await);
    }
    let _tasks = connect(&a, &b);
    eventually("b to hold every document", async || {
        let mut all = true;
        for d in &docs {
            all &= heads(&b, *d).await == heads(&a, *d).await;
        }
        all
    })
    .await;
    let stats = &session_with(&b, a.peer).shared.stats;
    assert_eq!(stats.snapshots_received.load(Ordering::Relaxed), 3);
    assert_eq!(
        stats.docs_received.load(Ordering::Relaxed),
        0,
        "no Automerge rounds"
    );
    let roots = (
        a.deps.docs.with_inventory(|i| i.root()),
        b.deps.docs.with_inventory(|i| i.root()),
    );
    assert_eq!(roots.0, roots.1);
}

#[tokio::test(start_paused = true)]
async fn states_are_persisted_under_the_ps_keys_when_the_session_ends() {
    let (a, b, doc) = synced_then_apart(false).await;
    // The key layout is the stored format: "ps/" || peer id bytes || "/" || doc id.
    let mut key = b"ps/".to_vec();
    key.extend_from_slice(&b.peer.to_bytes());
    key.push(b'/');
    key.extend_from_slice(doc.as_bytes());
    assert_eq!(state_key(&b.peer, &doc), key);
    let stored = a
        .deps
        .store
        .state_get(&key)
        .unwrap()
        .expect("a's state for b");
    let st = PeerDocState::resume(&stored).unwrap();
    assert_eq!(st.shared_heads(), heads(&a, doc).await.unwrap());
    assert!(!a.deps.registry.has_session(&b.peer));
    assert!(!b.deps.registry.has_session(&a.peer));
}

#[tokio::test(start_paused = true)]
async fn a_device_of_another_person_is_refused_and_counted() {
    let a = node(1, &person(), &[], FakeBlobs::default()).await;
    let stranger = PersonKey::from_seed([9; 32]);
    let b = node(2, &stranger, &[], FakeBlobs::default()).await;
    let (ta, tb) = connect(&b, &a);
    ta.await.unwrap();
    tb.await.unwrap();
    assert_eq!(a.deps.gate.tracked(), 1, "the refusal is counted");
    assert!(!a.deps.registry.has_session(&b.peer));
    assert!(!b.deps.registry.has_session(&a.peer));
    assert!(
        a.net.disconnected.lock().unwrap().is_empty(),
        "one refusal keeps the link"
    );
}

#[tokio::test(start_paused = true)]
async fn a_version_mismatch_is_answered_with_a_refusal_naming_both_versions() {
    let a = node(1, &person(), &[2], FakeBlobs::default()).await;
    let (x, y) = pipe(64 * 1024);
    let task = tokio::spawn(run(
        a.deps.clone(),
        device(2).id().to_peer_id(),
        x,
        Role::Responder,
    ));
    let mut raw = Raw { io: y };
    raw.send(hello_from(2, SYNC_VERSION + 1)).await;
    let Some(SyncMsg::Refused { reason }) = raw.recv().await else {
        panic!("a refusal");
    };
    assert!(
        reason.contains(&format!("version {SYNC_VERSION}")),
        "{reason}"
    );
    assert!(
        reason.contains(&format!("version {}", SYNC_VERSION + 1)),
        "{reason}"
    );
    task.await.unwrap();
    assert_eq!(a.deps.gate.tracked(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_message_before_hello_is_refused() {
    let a = node(1, &person(), &[2], FakeBlobs::default()).await;
    let (x, y) = pipe(64 * 1024);
    let task = tokio::spawn(run(
        a.deps.clone(),
        device(2).id().to_peer_id(),
        x,
        Role::Responder,
    ));
    let mut raw = Raw { io: y };
    raw.send(SyncMsg::Root { root: [0; 32] }).await;
    let Some(SyncMsg::Refused { reason }) = raw.recv().await else {
        panic!("a refusal");
    };
    assert_eq!(reason, iom_crdt::session::EXPECTED_HELLO);
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn no_hello_in_time_ends_the_session() {
    let a = node(1, &person(), &[2], FakeBlobs::default()).await;
    let (x, _y) = pipe(64 * 1024);
    let deps = a.deps.clone();
    let peer = device(2).id().to_peer_id();
    let err = run_inner(&deps, peer, x, Role::Responder).await.err();
    assert!(matches!(err, Some(DriveError::HelloTimeout(_))), "{err:?}");
}

/// Completes the handshake as trusted device 2 towards `a` (responder), and reads a's `Hello`.
async fn raw_session(a: &Node, buffer: usize) -> (Raw<Io>, tokio::task::JoinHandle<()>) {
    let (x, y) = pipe(buffer);
    let task = tokio::spawn(run(
        a.deps.clone(),
        device(2).id().to_peer_id(),
        x,
        Role::Responder,
    ));
    let mut raw = Raw { io: y };
    raw.send(hello_from(2, SYNC_VERSION)).await;
    let Some(SyncMsg::Hello { version, .. }) = raw.recv().await else {
        panic!("a's hello");
    };
    assert_eq!(version, SYNC_VERSION);
    (raw, task)
}

#[tokio::test(start_paused = true)]
async fn a_garbage_doc_message_disconnects_the_peer_and_stores_nothing() {
    let a = node(1, &person(), &[2], FakeBlobs::default()).await;
    let (mut raw, task) = raw_session(&a, 64 * 1024).await;
    let doc = DocId::from_bytes([7; 16]);
    raw.send(SyncMsg::Doc {
        doc: *doc.as_bytes(),
        msg: b"\x42\xde\xad garbage".to_vec(),
    })
    .await;
    task.await.unwrap();
    assert_eq!(
        *a.net.disconnected.lock().unwrap(),
        vec![device(2).id().to_peer_id()]
    );
    assert!(a.deps.docs.list().unwrap().is_empty());
    assert!(matches!(
        a.deps.docs.read(doc, |_| ()).await,
        Err(DocsError::NotFound(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn a_garbage_snapshot_disconnects_the_peer() {
    let a = node(1, &person(), &[2], FakeBlobs::default()).await;
    let (mut raw, task) = raw_session(&a, 64 * 1024).await;
    raw.send(SyncMsg::Snapshots {
        docs: vec![DocSnapshot {
            doc: [8; 16],
            bytes: b"\x85\x6f\x4a\x83 not a document".to_vec(),
        }],
    })
    .await;
    task.await.unwrap();
    assert_eq!(a.net.disconnected.lock().unwrap().len(), 1);
    assert!(a.deps.docs.list().unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn certificates_that_no_longer_trust_the_peer_end_the_session_without_blame() {
    let a = node(1, &person(), &[2], FakeBlobs::default()).await;
    let (mut raw, task) = raw_session(&a, 64 * 1024).await;
    // A revocation of device 2 by the person.
    let revocation = Certificate::issue_by_person(
        CertBody::Revocation {
            person: person().id(),
            device: device(2).id(),
            reason: "lost".into(),
            issued_at: 2,
        },
        &person(),
    )
    .unwrap();
    raw.send(SyncMsg::Certs {
        certs: vec![revocation],
    })
    .await;
    task.await.unwrap();
    assert!(!a.deps.registry.has_session(&device(2).id().to_peer_id()));
    assert!(a.net.disconnected.lock().unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn addresses_and_blob_announcements_reach_the_network_and_the_blob_service() {
    let held = ContentId::from_bytes([1; 32]);
    let missing = ContentId::from_bytes([2; 32]);
    let a = node(
        1,
        &person(),
        &[2],
        FakeBlobs {
            here: [held].into_iter().collect(),
            ..FakeBlobs::default()
        },
    )
    .await;
    let (mut raw, _task) = raw_session(&a, 64 * 1024).await;
    let other = device(3).id().to_peer_id();
    raw.send(SyncMsg::Addrs {
        peers: vec![
            PeerAddrs {
                peer: other.to_bytes(),
                addrs: vec!["/ip4/10.0.0.1/tcp/4001".into(), "not an address".into()],
            },
            PeerAddrs {
                peer: a.peer.to_bytes(), // ourselves: skipped
                addrs: vec!["/ip4/10.0.0.2/tcp/4001".into()],
            },
        ],
    })
    .await;
    raw.send(SyncMsg::Blobs {
        have: vec![(held, 10), (missing, 20)],
    })
    .await;
    eventually("the blob to be wanted", async || {
        !a.blobs.wanted.lock().unwrap().is_empty()
    })
    .await;
    assert_eq!(
        *a.blobs.wanted.lock().unwrap(),
        vec![(missing, 20, device(2).id().to_peer_id())]
    );
    let added = a.net.added.lock().unwrap().clone();
    assert_eq!(added.len(), 1);
    assert_eq!(added[0].0, other);
    assert_eq!(
        added[0].1,
        vec!["/ip4/10.0.0.1/tcp/4001".parse::<Multiaddr>().unwrap()]
    );
}

/// 40 announcement messages of 100 blobs each (the peer reads none of them at first).
fn many_blobs() -> FakeBlobs {
    let announce = (0..40u8)
        .map(|m| {
            (0..100u8)
                .map(|i| {
                    let mut id = [m; 32];
                    id[1] = i;
                    (ContentId::from_bytes(id), 1)
                })
                .collect()
        })
        .collect();
    FakeBlobs {
        announce,
        ..FakeBlobs::default()
    }
}

#[tokio::test(start_paused = true)]
async fn the_reader_keeps_applying_while_the_peer_reads_nothing() {
    let a = node(1, &person(), &[2], many_blobs()).await;
    // A 1 KiB pipe: a's writer stalls on its first announcements.
    let (mut raw, _task) = raw_session(&a, 1024).await;
    let raw_peer = device(2).id().to_peer_id();
    // Set-up did not wait for the writer: the session is registered.
    eventually("the session to be up", async || {
        a.deps.registry.has_session(&raw_peer)
    })
    .await;
    // Whole documents from the peer are applied although a's writer can't send.
    let mut docs = Vec::new();
    for i in 0..3u8 {
        let mut d = Document::new(
            DocKind::Generic,
            &iom_crdt::actor_for(&[i + 20; 32], [i; 8]),
            1,
        )
        .unwrap();
        d.put_json("k", serde_json::json!(i), "edit", 2).unwrap();
        docs.push((DocId::from_bytes([i + 40; 16]), d));
    }
    for (id, d) in &mut docs {
        raw.send(SyncMsg::Snapshots {
            docs: vec![DocSnapshot {
                doc: *id.as_bytes(),
                bytes: d.save(),
            }],
        })
        .await;
    }
    eventually("a to store what the peer sent", async || {
        a.deps.docs.list().unwrap().len() == docs.len()
    })
    .await;
    for (id, d) in &docs {
        assert_eq!(heads(&a, *id).await, Some(d.heads()));
    }
    assert!(
        session_with(&a, raw_peer)
            .shared
            .stats
            .bytes_out
            .load(Ordering::Relaxed)
            < 64 * 1024
    );
}

#[tokio::test(start_paused = true)]
async fn broadcasts_queued_while_the_writer_is_stalled_are_all_delivered() {
    let a = node(1, &person(), &[2], many_blobs()).await;
    let (mut raw, _task) = raw_session(&a, 1024).await;
    let raw_peer = device(2).id().to_peer_id();
    eventually("the session to be up", async || {
        a.deps.registry.has_session(&raw_peer)
    })
    .await;
    let handle = session_with(&a, raw_peer);
    let newest = cert(&person(), &device(5));
    for n in 3..=5 {
        handle.queue(SyncMsg::Certs {
            certs: vec![cert(&person(), &device(n))],
        });
    }
    for i in 0..30u8 {
        handle.queue(SyncMsg::Blobs {
            have: vec![(ContentId::from_bytes([i; 32]), 7)],
        });
    }
    // Now read everything.
    // 4,000 blobs of the store (announced by the writer, a page at a time) and the 30 queued.
    let (mut blobs, mut certs) = (0, Vec::new());
    while blobs < 40 * 100 + 30 {
        match raw.recv().await.expect("a message") {
            SyncMsg::Blobs { have } => {
                assert!(have.len() <= MAX_BLOB_ANNOUNCE);
                blobs += have.len();
            }
            SyncMsg::Certs { certs: c } => certs.push(c),
            _ => {}
        }
    }
    assert_eq!(blobs, 4030, "no announcement dropped");
    // The set queued last arrives; the ones it superseded need not.
    let last = certs.last().expect("certificates");
    assert_eq!(last.len(), 1);
    assert_eq!(last[0].id(), newest.id());
}

/// Blobs `0..n` with distinct ids.
fn blobs_numbered(n: u32) -> FakeBlobs {
    let all: Vec<(ContentId, u64)> = (0..n)
        .map(|i| {
            let mut id = [0u8; 32];
            id[..4].copy_from_slice(&i.to_be_bytes());
            (ContentId::from_bytes(id), u64::from(i))
        })
        .collect();
    FakeBlobs {
        announce: vec![all],
        ..FakeBlobs::default()
    }
}

#[tokio::test(start_paused = true)]
async fn a_big_store_is_announced_after_set_up_in_pages_each_blob_once() {
    let n = 3 * MAX_BLOB_ANNOUNCE as u32 + 10;
    let a = node(1, &person(), &[2], blobs_numbered(n)).await;
    let (mut raw, _task) = raw_session(&a, 64 * 1024).await;
    let (mut seen, mut pages, mut root_first) = (Vec::new(), 0, None);
    while seen.len() < n as usize {
        match raw.recv().await.expect("a message") {
            SyncMsg::Blobs { have } => {
                assert!(have.len() <= MAX_BLOB_ANNOUNCE);
                root_first.get_or_insert(false);
                pages += 1;
                seen.extend(have);
            }
            SyncMsg::Root { .. } => {
                root_first.get_or_insert(true);
            }
            _ => {}
        }
    }
    assert_eq!(
        root_first,
        Some(true),
        "set-up goes before the announcements"
    );
    assert_eq!(pages, 4);
    let mut want = a.blobs.announce.concat();
    want.sort();
    assert_eq!(seen, want, "every blob once, in id order");
}

/// [`blobs_numbered`] with its digest.
fn blobs_with_digest(n: u32) -> FakeBlobs {
    FakeBlobs {
        digest: true,
        ..blobs_numbered(n)
    }
}

/// Runs a session between `a` and `b` until a document of `a` reached `b`, then gives
/// announcements 5 s, had there been any. The document exists before the session
/// starts: these sessions have no manager pushing live changes, so a document created while
/// the inventories were being compared was never sent (the test hung on a loaded machine).
async fn session_syncs_a_new_document(a: &Node, b: &Node) {
    let doc = new_doc(a, "after").await;
    let _tasks = connect(a, b);
    eventually("the new document on b", async || {
        heads(b, doc).await.is_some()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
}

#[tokio::test(start_paused = true)]
async fn devices_with_the_same_blobs_announce_none_of_them() {
    let a = node(
        1,
        &person(),
        &[2],
        blobs_with_digest(2 * MAX_BLOB_ANNOUNCE as u32),
    )
    .await;
    let b = node(
        2,
        &person(),
        &[1],
        blobs_with_digest(2 * MAX_BLOB_ANNOUNCE as u32),
    )
    .await;
    session_syncs_a_new_document(&a, &b).await;
    // Neither holds what the other announces (`here` is empty): any announcement is a want.
    assert!(a.blobs.wanted.lock().unwrap().is_empty());
    assert!(b.blobs.wanted.lock().unwrap().is_empty());
    let sent = session_with(&a, b.peer)
        .shared
        .stats
        .bytes_out
        .load(Ordering::Relaxed);
    assert!(sent < 16 * 1024, "{sent} bytes for a document and set-up");
}

#[tokio::test(start_paused = true)]
async fn devices_with_different_blobs_announce_all_of_theirs() {
    let a = node(1, &person(), &[2], blobs_with_digest(100)).await;
    let b = node(2, &person(), &[1], blobs_with_digest(99)).await;
    session_syncs_a_new_document(&a, &b).await;
    assert_eq!(b.blobs.wanted.lock().unwrap().len(), 100);
    assert_eq!(a.blobs.wanted.lock().unwrap().len(), 99);
}

#[tokio::test(start_paused = true)]
async fn a_peer_without_a_digest_gets_every_announcement_and_one_with_ours_none() {
    for (theirs, expected) in [
        (None, 10),
        (Some(blobs_with_digest(10).digest().unwrap()), 0),
        (Some(blobs_with_digest(9).digest().unwrap()), 10),
    ] {
        let a = node(1, &person(), &[2], blobs_with_digest(10)).await;
        let (x, y) = pipe(64 * 1024);
        let _task = tokio::spawn(run(
            a.deps.clone(),
            device(2).id().to_peer_id(),
            x,
            Role::Responder,
        ));
        let mut raw = Raw { io: y };
        raw.send(SyncMsg::Hello {
            version: SYNC_VERSION,
            person: person().id(),
            chain: vec![cert(&person(), &device(2))],
            blobs: theirs,
        })
        .await;
        let Some(SyncMsg::Hello { blobs, .. }) = raw.recv().await else {
            panic!("a's hello");
        };
        assert_eq!(blobs, a.blobs.digest(), "a sends its digest");
        let mut announced = 0;
        while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(5), raw.recv()).await {
            if let SyncMsg::Blobs { have } = msg {
                announced += have.len();
            }
        }
        assert_eq!(announced, expected, "their digest {theirs:?}");
    }
}

#[test]
fn wire_messages_map_to_the_state_machine_and_back_unchanged() {
    let c = cert(&person(), &device(1));
    let msgs = vec![
        hello_from(1, SYNC_VERSION),
        SyncMsg::Hello {
            version: SYNC_VERSION,
            person: person().id(),
            chain: Vec::new(),
            blobs: Some(BlobSetDigest::of(&[ContentId::from_bytes([2; 32])])),
        },
        SyncMsg::Refused {
            reason: "no".into(),
        },
        SyncMsg::Certs { certs: vec![c] },
        SyncMsg::Addrs {
            peers: vec![PeerAddrs {
                peer: vec![1, 2],
                addrs: vec!["/ip4/1.2.3.4/tcp/1".into()],
            }],
        },
        SyncMsg::Root { root: [3; 32] },
        SyncMsg::Buckets {
            digests: vec![4; 8192],
        },
        SyncMsg::Entries {
            buckets: vec![5],
            records: vec![6; 48],
        },
        SyncMsg::Doc {
            doc: [7; 16],
            msg: vec![8],
        },
        SyncMsg::Snapshots {
            docs: vec![DocSnapshot {
                doc: [9; 16],
                bytes: vec![10],
            }],
        },
        SyncMsg::Blobs {
            have: vec![(ContentId::from_bytes([11; 32]), 12)],
        },
    ];
    for msg in msgs {
        let bytes = msg.encode().unwrap();
        let back = to_wire(from_wire(msg)).unwrap().encode().unwrap();
        assert_eq!(back, bytes, "the same CBOR");
    }
    assert!(matches!(
        to_wire(machine::Msg::Unknown { what: "x".into() }),
        Err(DriveError::Bug(_))
    ));
}

#[test]
fn blame_decides_who_is_disconnected() {
    let peer = DriveError::Session(SessionError::Violation(machine::Violation::UnexpectedHello));
    assert!(peer.is_peer_fault());
    assert!(DriveError::Framed(FramedError::Decode("x".into())).is_peer_fault());
    let cut = FramedError::Frame(iom_protocol::frame::FrameError::Truncated { buffered: 3 });
    assert!(!DriveError::Framed(cut).is_peer_fault());
    assert!(!DriveError::NoLongerTrusted.is_peer_fault());
    assert!(!DriveError::HelloTimeout(Duration::from_secs(1)).is_peer_fault());
    let refused = DriveError::Session(SessionError::Refused { reason: "x".into() });
    assert!(!refused.is_peer_fault());
}

#[tokio::test(start_paused = true)]
async fn known_addresses_go_out_for_other_trusted_devices_only() {
    let mut a = node(1, &person(), &[2, 3], FakeBlobs::default()).await;
    let addr = |i: u32| {
        format!("/ip4/10.0.0.{}/tcp/{i}", i % 250)
            .parse::<Multiaddr>()
            .unwrap()
    };
    let trusted = device(3).id().to_peer_id();
    let stranger = device(7).id().to_peer_id();
    let to = device(2).id().to_peer_id();
    a.net = Arc::new(FakeNet {
        local: Some(a.peer),
        known: vec![
            (trusted, (0..20).map(addr).collect()),
            (stranger, vec![addr(1)]),
            (to, vec![addr(2)]),
            (device(2).id().to_peer_id(), vec![]),
        ],
        ..FakeNet::default()
    });
    a.deps.net = a.net.clone();
    let out = known_addrs(&a.deps, to);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].peer, trusted.to_bytes());
    assert_eq!(out[0].addrs.len(), MAX_PEER_ADDRS);
}

#[tokio::test(start_paused = true)]
async fn a_trusted_devices_addresses_go_to_every_other_session_when_learned() {
    let mut a = node(1, &person(), &[2, 3], FakeBlobs::default()).await;
    let (laptop, phone, stranger) = (
        device(2).id().to_peer_id(),
        device(3).id().to_peer_id(),
        device(7).id().to_peer_id(),
    );
    let addr: Multiaddr = "/ip4/10.0.0.3/tcp/4001".parse().unwrap();
    a.net = Arc::new(FakeNet {
        local: Some(a.peer),
        known: vec![(phone, vec![addr.clone()]), (stranger, vec![addr.clone()])],
        ..FakeNet::default()
    });
    a.deps.net = a.net.clone();
    let (to_laptop, to_phone) = (
        SessionHandle::for_test(laptop, a.peer, 1),
        SessionHandle::for_test(phone, a.peer, 2),
    );
    assert!(a.deps.registry.register(a.peer, to_laptop.clone()));
    assert!(a.deps.registry.register(a.peer, to_phone.clone()));
    // The pass-through messages queued in a session since the last look.
    let queued = |h: &SessionHandle| {
        let inv = iom_crdt::Inventory::new();
        let mut out = Vec::new();
        while let Some(t) = h.shared.lock().poll_transmit(&inv) {
            if let iom_crdt::session::Transmit::Send(machine::Msg::Other(e)) = t {
                out.push(e);
            }
        }
        out
    };

    crate::sync::share_addresses(&a.deps, phone);
    let to_laptop_now = queued(&to_laptop);
    assert_eq!(
        to_laptop_now.len(),
        1,
        "the laptop hears where the phone is"
    );
    let Extra::Addrs(peers) = &to_laptop_now[0] else {
        panic!("expected addresses, got {:?}", to_laptop_now[0]);
    };
    assert_eq!(peers[0].peer, phone.to_bytes());
    assert_eq!(peers[0].addrs, vec![addr.to_string()]);
    assert!(
        queued(&to_phone).is_empty(),
        "the phone is not told about itself"
    );

    crate::sync::share_addresses(&a.deps, stranger);
    assert!(queued(&to_laptop).is_empty(), "nothing about a stranger");
    a.deps.config.share_addrs = false;
    crate::sync::share_addresses(&a.deps, phone);
    assert!(queued(&to_laptop).is_empty(), "nothing when sharing is off");
}

#[tokio::test(start_paused = true)]
async fn a_reconnect_with_persisted_states_syncs_only_what_changed() {
    let a = node(1, &person(), &[2], FakeBlobs::default()).await;
    let b = node(2, &person(), &[1], FakeBlobs::default()).await;
    let doc = new_doc(&a, "k").await;
    let _other = new_doc(&a, "unchanged").await;
    let stop = |n: &Node| n.deps.shutdown.cancel();
    let (ta, tb) = connect(&a, &b);
    eventually("b to hold a's documents", async || {
        b.deps.docs.with_inventory(|i| i.root()) == a.deps.docs.with_inventory(|i| i.root())
    })
    .await;
    stop(&a);
    ta.await.unwrap();
    tb.await.unwrap();
    // Apart: one change on a.
    edit(&a, doc, "while_apart").await;
    let mut a = a;
    let mut b = b;
    a.deps.shutdown = CancellationToken::new();
    b.deps.shutdown = CancellationToken::new();
    let _tasks = connect(&a, &b);
    eventually("b to hold the change", async || {
        heads(&b, doc).await == heads(&a, doc).await
    })
    .await;
    eventually("the exchange to settle", async || {
        session_with(&a, b.peer).backlog() == 0 && session_with(&b, a.peer).backlog() == 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let on_b = &session_with(&b, a.peer).shared.stats;
    // The resumed state carries the change in the first message (and both sides, having seen
    // the digest differ, say so once each); the unchanged document costs nothing, and nothing
    // goes whole.
    let received = on_b.docs_received.load(Ordering::Relaxed);
    assert!((1..=2).contains(&received), "{received} Automerge messages");
    assert_eq!(on_b.snapshots_received.load(Ordering::Relaxed), 0);
}

#[tokio::test(start_paused = true)]
async fn being_refused_ends_the_session_without_blame_or_counting() {
    let a = node(1, &person(), &[2], FakeBlobs::default()).await;
    let (x, y) = pipe(64 * 1024);
    let deps = a.deps.clone();
    let peer = device(2).id().to_peer_id();
    let session = tokio::spawn(async move { run_inner(&deps, peer, x, Role::Initiator).await });
    let mut raw = Raw { io: y };
    assert!(matches!(raw.recv().await, Some(SyncMsg::Hello { .. })));
    raw.send(SyncMsg::Refused {
        reason: "not trusted: revoked".into(),
    })
    .await;
    let err = session.await.unwrap().err();
    assert!(
        matches!(&err, Some(DriveError::Session(SessionError::RefusedByPeer { reason })) if reason.contains("revoked")),
        "{err:?}"
    );
    assert!(!err.is_some_and(|e| e.is_peer_fault()));
    assert_eq!(
        a.deps.gate.tracked(),
        0,
        "only our own refusals are counted"
    );
    assert!(a.net.disconnected.lock().unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_second_hello_disconnects_the_peer() {
    let a = node(1, &person(), &[2], FakeBlobs::default()).await;
    let (mut raw, task) = raw_session(&a, 64 * 1024).await;
    raw.send(hello_from(2, SYNC_VERSION)).await;
    task.await.unwrap();
    assert_eq!(a.net.disconnected.lock().unwrap().len(), 1);
    assert!(!a.deps.registry.has_session(&device(2).id().to_peer_id()));
}

#[tokio::test(start_paused = true)]
async fn a_stranger_that_keeps_knocking_is_disconnected_by_the_gate() {
    let a = node(1, &person(), &[], FakeBlobs::default()).await;
    let stranger = PersonKey::from_seed([9; 32]);
    let b = node(2, &stranger, &[], FakeBlobs::default()).await;
    for _ in 0..=crate::sync::gate::MAX_REFUSALS_PER_MINUTE {
        let (ta, tb) = connect(&b, &a);
        ta.await.unwrap();
        tb.await.unwrap();
    }
    assert_eq!(*a.net.disconnected.lock().unwrap(), vec![b.peer]);
}

#[tokio::test(start_paused = true)]
async fn a_second_session_with_the_same_peer_is_dropped_and_the_first_kept() {
    let a = node(1, &person(), &[2], FakeBlobs::default()).await;
    let (_raw, _task) = raw_session(&a, 64 * 1024).await;
    let peer = device(2).id().to_peer_id();
    eventually("the first session", async || {
        a.deps.registry.has_session(&peer)
    })
    .await;
    let first = session_with(&a, peer).id;
    // The same peer opens again (both sessions answered by us: neither is preferred). The
    // second is dropped after the handshake, before it says anything.
    let (x, y) = pipe(64 * 1024);
    let task2 = tokio::spawn(run(a.deps.clone(), peer, x, Role::Responder));
    let mut raw2 = Raw { io: y };
    raw2.send(hello_from(2, SYNC_VERSION)).await;
    task2.await.unwrap();
    assert!(raw2.recv().await.is_none(), "the stream ends");
    assert_eq!(session_with(&a, peer).id, first);
    assert!(a.deps.registry.has_session(&peer));
}

#[tokio::test(start_paused = true)]
async fn a_fault_injected_node_sends_garbage_that_the_peer_refuses() {
    let mut a = node(1, &person(), &[2], FakeBlobs::default()).await;
    let b = node(2, &person(), &[1], FakeBlobs::default()).await;
    new_doc(&a, "k").await;
    a.deps.config.fault_garbage_sync = true;
    let (ta, tb) = connect(&a, &b);
    ta.await.unwrap();
    tb.await.unwrap();
    assert_eq!(*b.net.disconnected.lock().unwrap(), vec![a.peer]);
    assert!(
        b.deps.docs.list().unwrap().is_empty(),
        "nothing from the bad message is kept"
    );
}

#[tokio::test]
async fn a_panicked_task_is_a_bug_and_a_cancelled_one_is_shutting_down() {
    let panicked = tokio::spawn(async { panic!("on purpose") }).await;
    assert!(matches!(
        super::joined::<()>(panicked, "the task panicked"),
        Err(DriveError::Bug("the task panicked"))
    ));
    let pending = tokio::spawn(std::future::pending::<()>());
    pending.abort();
    assert!(matches!(
        super::joined(pending.await, "the task panicked"),
        Err(DriveError::ShuttingDown)
    ));
    assert_eq!(super::joined(Ok(7), "unused").ok(), Some(7));
}

#[test]
fn only_a_document_at_its_shared_heads_waits() {
    let (_dir, store) = crate::store::temp_store();
    let peer = PeerId::random();
    let mut stored = Vec::new();
    for n in 1..=4u8 {
        let id = DocId::from_bytes([n; 16]);
        let mut d = Document::new(DocKind::Generic, &[n; 8], 1).unwrap();
        d.put_json("n", serde_json::json!(n), "set", 2).unwrap();
        let heads = d.heads();
        store
            .append_doc_chunk(
                id.as_bytes(),
                "generic",
                &d.save(),
                crate::docs::heads_bytes(&heads),
            )
            .unwrap();
        stored.push((id, heads));
    }
    let (at_heads, behind, fresh, in_session) =
        (stored[0].0, stored[1].0, stored[2].0, stored[3].0);
    // Persisted states: one at the document's heads, one at an older point.
    let shared = PeerDocState::after_snapshot(&stored[0].1).encode();
    store
        .state_put(&state_key(&peer, &at_heads), &shared)
        .unwrap();
    let older = PeerDocState::new().encode();
    store.state_put(&state_key(&peer, &behind), &older).unwrap();
    store
        .state_put(&state_key(&peer, &in_session), &shared)
        .unwrap();
    let batch = vec![
        (at_heads, None, true),
        (behind, None, true),
        (fresh, None, true),
        (in_session, Some(PeerDocState::new()), true),
        (DocId::from_bytes([9; 16]), None, false),
    ];
    // Given the store, not the documents: it decides from the metadata and loads nothing.
    let (waiting, rest) = split_waiting(&store, &peer, batch);
    assert_eq!(waiting.len(), 1);
    assert_eq!(waiting[0].0, at_heads);
    let rest: Vec<(DocId, bool)> = rest.iter().map(|(d, st)| (*d, st.is_some())).collect();
    assert_eq!(
        rest,
        vec![
            (behind, true), // the state read is handed on, not read again
            (fresh, false),
            (in_session, true),
            (DocId::from_bytes([9; 16]), false),
        ]
    );
}

/// Two nodes in sync, their session ended (states persisted); then, if `change_b`, one edit
/// on b while apart.
async fn synced_then_apart(change_b: bool) -> (Node, Node, DocId) {
    let a = node(1, &person(), &[2], FakeBlobs::default()).await;
    let b = node(2, &person(), &[1], FakeBlobs::default()).await;
    let doc = new_doc(&a, "k").await;
    let (ta, tb) = connect(&a, &b);
    eventually("b to hold a's document", async || {
        heads(&b, doc).await == heads(&a, doc).await
    })
    .await;
    a.deps.shutdown.cancel();
    ta.await.unwrap();
    tb.await.unwrap();
    let (mut a, mut b) = (a, b);
    a.deps.shutdown = CancellationToken::new();
    b.deps.shutdown = CancellationToken::new();
    if change_b {
        edit(&b, doc, "on_b").await;
    }
    (a, b, doc)
}

#[tokio::test(start_paused = true)]
async fn after_being_away_the_side_with_no_news_only_acknowledges() {
    let (a, b, doc) = synced_then_apart(true).await;
    let _tasks = connect(&a, &b);
    eventually("a to hold b's change", async || {
        heads(&a, doc).await == heads(&b, doc).await
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // b has the news and speaks; a, at the heads it last shared, waits and then answers once.
    let on_a = session_with(&a, b.peer)
        .shared
        .stats
        .docs_received
        .load(Ordering::Relaxed);
    let on_b = session_with(&b, a.peer)
        .shared
        .stats
        .docs_received
        .load(Ordering::Relaxed);
    assert_eq!(
        (on_a, on_b),
        (1, 1),
        "b's changes, then a's acknowledgement"
    );
}

#[tokio::test(start_paused = true)]
async fn when_both_sides_wait_for_each_other_they_speak_after_a_quiet_while() {
    let (a, b, doc) = synced_then_apart(true).await;
    // b believes a has its new heads (as after a restore of a from an older backup, which
    // rolls a's documents and states back together): each side is at the heads its own state
    // says it shared, and the heads differ.
    let b_heads = heads(&b, doc).await.unwrap();
    b.deps
        .store
        .state_put(
            &state_key(&a.peer, &doc),
            &PeerDocState::after_snapshot(&b_heads).encode(),
        )
        .unwrap();
    let started = tokio::time::Instant::now();
    let _tasks = connect(&a, &b);
    eventually("a to hold b's change", async || {
        heads(&a, doc).await == heads(&b, doc).await
    })
    .await;
    assert!(
        started.elapsed() >= super::super::peer_quiet::QUIET,
        "nobody spoke before the quiet time: {:?}",
        started.elapsed()
    );
}
