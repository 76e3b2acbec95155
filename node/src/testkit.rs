//! In-process test nodes: each a real [`Node`] with real sled files in a temp dir and real
//! libp2p (Noise, yamux, every behaviour) over the memory transport, so several nodes run in
//! one test process without binding a port, under tokio's paused clock if the test wants.

use std::time::Duration;

use libp2p::Multiaddr;

use crate::config::{Config, Overrides, RawConfig};
use crate::net::TransportKind;
use crate::node::Node;

/// One in-process node and its data dir.
pub(crate) struct TestNode {
    /// Its name (also the device name).
    pub(crate) name: String,
    node: Option<Node>,
    config: Config,
    _dir: tempfile::TempDir,
}

impl TestNode {
    /// A fresh node (new keys: the first device of its own mesh until it joins another).
    pub(crate) async fn new(name: &str) -> TestNode {
        TestNode::new_with(name, |_| {}).await
    }

    /// A fresh node whose configuration `tweak` adjusts first.
    pub(crate) async fn new_with(name: &str, tweak: impl FnOnce(&mut Config)) -> TestNode {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = RawConfig::default()
            .validate(
                dir.path().to_path_buf(),
                Overrides {
                    name: Some(name.into()),
                    no_mdns: true,
                    ..Overrides::default()
                },
            )
            .expect("default config is valid");
        config.listen = vec![memory_addr()];
        tweak(&mut config);
        let node = Node::start(config.clone(), TransportKind::Memory)
            .await
            .expect("node starts");
        TestNode {
            name: name.into(),
            node: Some(node),
            config,
            _dir: dir,
        }
    }

    /// Stops the node gracefully (its data dir stays).
    pub(crate) async fn stop(&mut self) {
        if let Some(node) = self.node.take() {
            node.stop().await.expect("node stops cleanly");
        }
    }

    /// Stops and starts again on the same data dir, on a new memory address (peers find it
    /// again through the addresses it stored of them).
    pub(crate) async fn restart(&mut self) {
        self.stop().await;
        self.config.listen = vec![memory_addr()];
        let node = Node::start(self.config.clone(), TransportKind::Memory)
            .await
            .expect("node restarts");
        self.node = Some(node);
    }
}

impl std::ops::Deref for TestNode {
    type Target = Node;

    /// The running node (`node.ctx()` is the whole node).
    fn deref(&self) -> &Node {
        self.node.as_ref().expect("node is running")
    }
}

/// A memory address no other test in this process uses.
fn memory_addr() -> Multiaddr {
    let n = u64::from_be_bytes(crate::time::random_bytes::<8>()) | 1;
    format!("/memory/{n}").parse().expect("memory multiaddr")
}

/// Starts nodes named `names`; the first creates the mesh, the others join it with invites.
/// Returns once every node trusts and is connected to every other.
pub(crate) async fn mesh(names: &[&str]) -> Vec<TestNode> {
    let mut nodes = Vec::new();
    for name in names {
        nodes.push(TestNode::new(name).await);
    }
    for i in 1..nodes.len() {
        let invite = nodes[0]
            .ctx()
            .pairing
            .create_invite(Duration::from_secs(600), false)
            .await
            .expect("invite");
        let code = invite.encode().expect("invite code");
        nodes[i]
            .ctx()
            .pairing
            .join(&code, None)
            .await
            .expect("join");
    }
    let all: Vec<&TestNode> = nodes.iter().collect();
    wait_mesh(&all).await;
    nodes
}

/// Waits until every node trusts and has a sync session with every other.
pub(crate) async fn wait_mesh(nodes: &[&TestNode]) {
    eventually("every node to trust and sync with every other", || async {
        nodes.iter().all(|n| {
            nodes.iter().all(|m| {
                let peer = m.ctx().identity.peer_id();
                n.name == m.name
                    || (n
                        .ctx()
                        .trust
                        .state()
                        .is_trusted(&m.ctx().identity.device_id())
                        && n.ctx().sync.has_session(&peer))
            })
        })
    })
    .await;
}

/// Polls `check` every 10 ms (of tokio time) until it holds; panics after 30 s of tokio time
/// **and** 10 s of real time. With paused time the clock jumps ahead whenever every task waits,
/// and that includes waiting on the blocking pool (store reads and writes), so on a loaded
/// machine 30 s of tokio time can pass in a few real milliseconds of blocking work.
pub(crate) async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let real = std::time::Instant::now();
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline || real.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
