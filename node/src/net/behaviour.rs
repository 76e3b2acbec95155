//! The composed libp2p behaviour of a node.
// The derive generates a public event enum whose variants cannot carry docs.
#![allow(missing_docs)]

use std::time::Duration;

use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{connection_limits, dcutr, identify, identity, mdns, ping, relay};

/// Protocol name announced by identify.
pub const AGENT_VERSION: &str = concat!("iom/", env!("CARGO_PKG_VERSION"));

/// Everything a node speaks. Our own protocols (`/iom/pair/1`, `/iom/sync/1`, `/iom/blob/1`,
/// `/iom/agent/1`) run as raw streams over `stream`; gating happens where they are accepted.
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    /// Connection limits (at least 3 per peer: relayed plus up to two direct after a punch).
    pub limits: connection_limits::Behaviour,
    /// Identify: addresses and protocols; required by DCUtR.
    pub identify: identify::Behaviour,
    /// Liveness and RTT.
    pub ping: ping::Behaviour,
    /// LAN discovery, can be switched off.
    pub mdns: Toggle<mdns::tokio::Behaviour>,
    /// Circuit relay v2 client (reservations and relayed dials).
    pub relay_client: relay::client::Behaviour,
    /// Hole punching over a relayed connection.
    pub dcutr: dcutr::Behaviour,
    /// Raw streams for our own protocols.
    pub stream: libp2p_stream::Behaviour,
}

impl Behaviour {
    /// Builds the behaviour.
    pub fn new(
        key: &identity::Keypair,
        relay_client: relay::client::Behaviour,
        mdns_on: bool,
    ) -> Result<Behaviour, std::io::Error> {
        let me = key.public().to_peer_id();
        let mdns = if mdns_on {
            Some(mdns::tokio::Behaviour::new(mdns::Config::default(), me)?)
        } else {
            None
        };
        Ok(Behaviour {
            limits: connection_limits::Behaviour::new(
                connection_limits::ConnectionLimits::default()
                    .with_max_established_per_peer(Some(4))
                    .with_max_pending_incoming(Some(64))
                    .with_max_established(Some(512)),
            ),
            identify: identify::Behaviour::new(
                identify::Config::new("/iom/id/1".into(), key.public())
                    .with_agent_version(AGENT_VERSION.into())
                    .with_interval(Duration::from_secs(60))
                    .with_push_listen_addr_updates(true),
            ),
            ping: ping::Behaviour::new(ping::Config::new().with_interval(Duration::from_secs(15))),
            mdns: Toggle::from(mdns),
            relay_client,
            dcutr: dcutr::Behaviour::new(me),
            stream: libp2p_stream::Behaviour::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn mdns_is_off_when_asked_and_identify_names_the_build() {
        let key = identity::Keypair::generate_ed25519();
        let (_transport, client) = relay::client::new(key.public().to_peer_id());
        let off = Behaviour::new(&key, client, false).unwrap_or_else(|e| panic!("{e}"));
        assert!(!off.mdns.is_enabled());
        assert!(AGENT_VERSION.starts_with("iom/"));
        assert!(AGENT_VERSION.ends_with(env!("CARGO_PKG_VERSION")));
    }
}
