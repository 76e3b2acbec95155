//! What the node knows about connected and known peers, shared between the event loop (which
//! writes it) and the API (which reads it).

use std::collections::HashMap;
use std::time::Instant;

use libp2p::core::ConnectedPoint;
use libp2p::swarm::ConnectionId;
use libp2p::{Multiaddr, PeerId};
use serde::Serialize;

/// How we are connected to a peer right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Link {
    /// At least one direct connection.
    Direct,
    /// Only connections through a relay.
    Relayed,
    /// No connection.
    Offline,
}

impl std::fmt::Display for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Link::Direct => "direct",
            Link::Relayed => "relayed",
            Link::Offline => "offline",
        })
    }
}

/// One open connection.
#[derive(Debug, Clone)]
pub struct Conn {
    /// Remote address.
    pub addr: Multiaddr,
    /// Through a relay circuit?
    pub relayed: bool,
    /// Did we dial?
    pub outbound: bool,
    /// Opened at.
    pub since: Instant,
}

/// A peer we know.
#[derive(Debug, Clone, Default)]
pub struct PeerEntry {
    /// Open connections.
    pub conns: HashMap<ConnectionId, Conn>,
    /// Unix seconds we last had a connection (or now, while connected).
    pub last_seen: u64,
    /// Last measured round-trip time.
    pub rtt_ms: Option<u64>,
    /// Addresses it listens on (from identify), used to reconnect.
    pub addrs: Vec<Multiaddr>,
}

impl PeerEntry {
    /// The current link kind.
    pub fn link(&self) -> Link {
        if self.conns.values().any(|c| !c.relayed) {
            Link::Direct
        } else if self.conns.is_empty() {
            Link::Offline
        } else {
            Link::Relayed
        }
    }
}

/// All peers.
#[derive(Debug, Default)]
pub struct Peers {
    /// By peer id.
    pub map: HashMap<PeerId, PeerEntry>,
}

impl Peers {
    /// Records a new connection; returns the number of connections now open.
    pub fn connected(
        &mut self,
        peer: PeerId,
        id: ConnectionId,
        endpoint: &ConnectedPoint,
    ) -> usize {
        let e = self.map.entry(peer).or_default();
        e.conns.insert(
            id,
            Conn {
                addr: endpoint.get_remote_address().clone(),
                relayed: endpoint.is_relayed(),
                outbound: endpoint.is_dialer(),
                since: Instant::now(),
            },
        );
        e.last_seen = crate::time::now_secs();
        e.conns.len()
    }

    /// Records a closed connection; returns the number still open.
    pub fn closed(&mut self, peer: PeerId, id: ConnectionId) -> usize {
        let Some(e) = self.map.get_mut(&peer) else {
            return 0;
        };
        e.conns.remove(&id);
        e.last_seen = crate::time::now_secs();
        e.conns.len()
    }

    /// The link to a peer.
    pub fn link(&self, peer: &PeerId) -> Link {
        self.map
            .get(peer)
            .map(PeerEntry::link)
            .unwrap_or(Link::Offline)
    }

    /// Connected peers.
    pub fn connected_peers(&self) -> Vec<PeerId> {
        self.map
            .iter()
            .filter(|(_, e)| !e.conns.is_empty())
            .map(|(p, _)| *p)
            .collect()
    }
}
