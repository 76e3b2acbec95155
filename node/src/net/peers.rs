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
    /// Relays holding a reservation for us: when it was last accepted (unix seconds). A
    /// reservation ends with the last connection to its relay.
    pub reservations: HashMap<PeerId, u64>,
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
        let left = e.conns.len();
        if left == 0 {
            self.reservations.remove(&peer);
        }
        left
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use libp2p::core::Endpoint;
    use libp2p::core::transport::PortUse;

    use super::*;

    fn dialed(addr: &str) -> ConnectedPoint {
        ConnectedPoint::Dialer {
            address: addr.parse().unwrap(),
            role_override: Endpoint::Dialer,
            port_use: PortUse::Reuse,
        }
    }

    fn accepted(local: &str) -> ConnectedPoint {
        ConnectedPoint::Listener {
            local_addr: local.parse().unwrap(),
            send_back_addr: "/ip4/10.0.0.9/tcp/5555".parse().unwrap(),
        }
    }

    const CIRCUIT: &str = "/ip4/203.0.113.7/tcp/4001/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN/p2p-circuit";

    #[test]
    fn a_peer_is_direct_while_any_connection_is_direct() {
        let mut peers = Peers::default();
        let p = PeerId::random();
        assert_eq!(peers.link(&p), Link::Offline);
        let (c1, c2) = (
            ConnectionId::new_unchecked(1),
            ConnectionId::new_unchecked(2),
        );
        assert_eq!(peers.connected(p, c1, &dialed(CIRCUIT)), 1);
        assert_eq!(peers.link(&p), Link::Relayed);
        assert_eq!(peers.connected(p, c2, &dialed("/ip4/10.0.0.2/tcp/4646")), 2);
        assert_eq!(peers.link(&p), Link::Direct, "the hole punch worked");
        assert_eq!(peers.closed(p, c2), 1);
        assert_eq!(peers.link(&p), Link::Relayed);
        peers.reservations.insert(p, 1);
        assert_eq!(peers.closed(p, c1), 0);
        assert_eq!(peers.link(&p), Link::Offline);
        assert!(
            peers.reservations.is_empty(),
            "a reservation ends with its connection"
        );
        assert!(peers.map[&p].last_seen > 0, "remembered after it left");
    }

    #[test]
    fn connections_record_direction_and_address() {
        let mut peers = Peers::default();
        let p = PeerId::random();
        let c = ConnectionId::new_unchecked(7);
        peers.connected(p, c, &accepted("/ip4/0.0.0.0/tcp/4646"));
        let conn = &peers.map[&p].conns[&c];
        assert!(!conn.outbound && !conn.relayed);
        assert_eq!(conn.addr.to_string(), "/ip4/10.0.0.9/tcp/5555");
        let relayed_in = ConnectionId::new_unchecked(8);
        peers.connected(p, relayed_in, &accepted(CIRCUIT));
        assert!(peers.map[&p].conns[&relayed_in].relayed);
    }

    #[test]
    fn only_peers_with_open_connections_are_connected() {
        let mut peers = Peers::default();
        let (a, b) = (PeerId::random(), PeerId::random());
        let c = ConnectionId::new_unchecked(1);
        peers.connected(a, c, &dialed("/ip4/10.0.0.1/tcp/1"));
        peers.connected(
            b,
            ConnectionId::new_unchecked(2),
            &dialed("/ip4/10.0.0.2/tcp/1"),
        );
        peers.closed(b, ConnectionId::new_unchecked(2));
        assert_eq!(peers.connected_peers(), vec![a]);
        // A close for a peer never seen, or a connection never opened, changes nothing.
        assert_eq!(peers.closed(PeerId::random(), c), 0);
        assert_eq!(peers.closed(a, ConnectionId::new_unchecked(99)), 1);
    }

    #[test]
    fn links_print_and_serialise_in_lowercase() {
        for (link, text) in [
            (Link::Direct, "direct"),
            (Link::Relayed, "relayed"),
            (Link::Offline, "offline"),
        ] {
            assert_eq!(link.to_string(), text);
            assert_eq!(serde_json::to_value(link).unwrap(), text);
        }
    }
}
