//! The network layer: one event loop task owns the libp2p [`Swarm`](libp2p::Swarm); the cloneable [`Net`]
//! handle sends it commands over a bounded channel and opens raw protocol streams.
//!
//! # Layout
//! - [`behaviour`]: the composed behaviour.
//! - [`peers`]: the shared peer table (connections, direct or relayed, last seen).
//! - [`framed`]: length-prefixed CBOR frames over streams.
//! - [`event_loop`]: the task that drives the swarm.

pub mod behaviour;
pub mod event_loop;
pub mod framed;
pub mod peers;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use libp2p::{Multiaddr, PeerId, StreamProtocol};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

pub use peers::{Link, Peers};

/// `/iom/pair/1`: joining with an invite. Open to anyone (rate-limited).
pub const PAIR_PROTOCOL: StreamProtocol = StreamProtocol::new("/iom/pair/1");
/// `/iom/sync/1`: trust exchange, inventory, Automerge sync, live push. Trusted peers only.
pub const SYNC_PROTOCOL: StreamProtocol = StreamProtocol::new("/iom/sync/1");
/// `/iom/blob/1`: chunked blob transfer. Trusted peers only.
pub const BLOB_PROTOCOL: StreamProtocol = StreamProtocol::new("/iom/blob/1");
/// `/iom/agent/1`: requests to the agent. Trusted peers only.
pub const AGENT_PROTOCOL: StreamProtocol = StreamProtocol::new("/iom/agent/1");

/// Something that happened on the network.
#[derive(Debug, Clone)]
pub enum NetEvent {
    /// A peer became reachable on a new path: its first connection opened, or its relayed
    /// connections were just replaced by a direct one (sessions that ran over them ended, so
    /// open them again).
    Connected(PeerId),
    /// The last connection to a peer closed.
    Disconnected(PeerId),
    /// A relayed peer now also has a direct connection (hole punch or direct dial).
    Direct(PeerId),
    /// A peer's listen addresses were learned or changed (identify): devices connected to
    /// this one can be told, so they reach that peer without waiting for it to call.
    Addresses(PeerId),
}

/// Why the event loop could not dial: libp2p's reason, as text (a `DialError` is not `Clone`,
/// and one failure answers every caller waiting on that peer).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub(crate) struct DialFailure(pub(crate) String);

/// Commands to the event loop.
#[derive(Debug)]
pub(crate) enum Command {
    Dial {
        peer: Option<PeerId>,
        addrs: Vec<Multiaddr>,
        reply: oneshot::Sender<Result<PeerId, DialFailure>>,
    },
    Disconnect {
        peer: PeerId,
    },
    ListenAddrs {
        reply: oneshot::Sender<Vec<Multiaddr>>,
    },
    AddAddresses {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
    },
    RelayAuthDone {
        relay: PeerId,
        /// The relay gave us the large limits.
        granted: bool,
    },
}

/// Network settings, validated.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Listen addresses.
    pub listen: Vec<Multiaddr>,
    /// Relays to reserve a slot on.
    pub relays: Vec<Multiaddr>,
    /// mDNS on or off.
    pub mdns: bool,
    /// Which transports carry connections.
    pub transport: TransportKind,
}

/// The transports a node's swarm uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TransportKind {
    /// TCP and QUIC over the OS's sockets, DNS, and circuits through relays.
    #[default]
    Os,
    /// libp2p's in-process memory transport (`/memory/N` addresses), for tests that run
    /// several nodes in one process without binding ports.
    Memory,
}

/// Handle to the network; cheap to clone.
#[derive(Clone)]
pub struct Net {
    cmd: mpsc::Sender<Command>,
    control: libp2p_stream::Control,
    /// The shared peer table.
    pub peers: Arc<RwLock<Peers>>,
    events: broadcast::Sender<NetEvent>,
    /// Our PeerId.
    pub local: PeerId,
    /// Set once by [`Net::go_online`]: until then the event loop does not run.
    online: Arc<watch::Sender<bool>>,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net").field("local", &self.local).finish()
    }
}

/// Why a network operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The event loop has stopped.
    #[error("the network is shutting down")]
    Stopped,
    /// Dialing failed.
    #[error("cannot reach {target}: {reason}")]
    Dial {
        /// What we dialed.
        target: String,
        /// Why it failed.
        reason: String,
    },
    /// Opening a stream failed.
    #[error("cannot open {protocol} to {peer}: {reason}")]
    Stream {
        /// The peer.
        peer: PeerId,
        /// The protocol.
        protocol: String,
        /// Why.
        reason: String,
    },
}

impl Net {
    /// Subscribes to network events.
    pub fn subscribe(&self) -> broadcast::Receiver<NetEvent> {
        self.events.subscribe()
    }

    /// A stream control for accepting or opening raw protocol streams.
    pub fn control(&self) -> libp2p_stream::Control {
        self.control.clone()
    }

    /// Dials addresses (optionally of a known peer) and waits for a connection.
    pub async fn dial(
        &self,
        peer: Option<PeerId>,
        addrs: Vec<Multiaddr>,
    ) -> Result<PeerId, NetError> {
        let target = addrs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let (reply, rx) = oneshot::channel();
        self.cmd
            .send(Command::Dial { peer, addrs, reply })
            .await
            .map_err(|_| NetError::Stopped)?;
        match tokio::time::timeout(Duration::from_secs(20), rx).await {
            Ok(Ok(Ok(p))) => Ok(p),
            Ok(Ok(Err(DialFailure(reason)))) => Err(NetError::Dial { target, reason }),
            Ok(Err(_)) => Err(NetError::Stopped),
            Err(_) => Err(NetError::Dial {
                target,
                reason: "timed out after 20 s".into(),
            }),
        }
    }

    /// Closes every connection to a peer.
    pub async fn disconnect(&self, peer: PeerId) {
        let _ = self.cmd.send(Command::Disconnect { peer }).await;
    }

    /// Tells the swarm more addresses of a peer.
    pub async fn add_addresses(&self, peer: PeerId, addrs: Vec<Multiaddr>) {
        let _ = self.cmd.send(Command::AddAddresses { peer, addrs }).await;
    }

    /// Our listen addresses (and confirmed external ones, including relay circuits).
    pub async fn listen_addrs(&self) -> Vec<Multiaddr> {
        let (reply, rx) = oneshot::channel();
        if self.cmd.send(Command::ListenAddrs { reply }).await.is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// Opens a stream for `protocol` to `peer` (dialing it if needed).
    pub async fn open(
        &self,
        peer: PeerId,
        protocol: StreamProtocol,
    ) -> Result<libp2p::Stream, NetError> {
        let mut control = self.control.clone();
        let name = protocol.to_string();
        match tokio::time::timeout(Duration::from_secs(20), control.open_stream(peer, protocol))
            .await
        {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(NetError::Stream {
                peer,
                protocol: name,
                reason: e.to_string(),
            }),
            Err(_) => Err(NetError::Stream {
                peer,
                protocol: name,
                reason: "timed out".into(),
            }),
        }
    }

    /// The link to a peer.
    pub fn link(&self, peer: &PeerId) -> Link {
        self.peers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .link(peer)
    }

    /// Lets the event loop run: inbound connections are taken, dials go out and commands are
    /// answered from now on. A node calls it once every service has registered its protocols,
    /// so no peer ever reaches it while a protocol it speaks is still missing (connections
    /// that arrive earlier wait in the listener's backlog; commands wait in their queue).
    pub fn go_online(&self) {
        self.online.send_replace(true);
    }

    /// Connected peers.
    pub fn connected_peers(&self) -> Vec<PeerId> {
        self.peers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .connected_peers()
    }
}
