//! [`TieredRelay`]: a circuit relay v2 server whose circuit limits depend on who opens the
//! circuit.
//!
//! `libp2p::relay` applies `max_circuit_duration` / `max_circuit_bytes` in the connection
//! handler of the circuit's *source* connection, copied from the `relay::Config` when the
//! connection is established. This behaviour therefore owns two `relay::Behaviour`s:
//!
//! - `relay`, configured with the **allowed** limits; it holds all state (reservations,
//!   circuits, rate limiters) and receives every event;
//! - `open_factory`, configured with the **open** (tiny) limits; it is only used to build
//!   connection handlers.
//!
//! Every connection gets a [`TierHandler`] holding one handler of each kind. When the peer opens
//! its first relay stream (a reservation or a circuit request) on that connection, the handler
//! looks the peer up in the [`AllowList`] and keeps the matching inner handler for the rest of
//! the connection. Devices must therefore authenticate (`/iom/relay-auth/1`) *before* they
//! reserve or dial through the relay; a connection that used the relay before authenticating
//! keeps the open limits until it is closed.

use std::task::{Context, Poll};

use libp2p::core::Endpoint;
use libp2p::core::transport::PortUse;
use libp2p::swarm::handler::{
    AddressChange, ConnectionEvent, DialUpgradeError, FullyNegotiatedOutbound,
};
use libp2p::swarm::{
    ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, FromSwarm,
    NetworkBehaviour, SubstreamProtocol, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId, relay};

use super::AllowList;

/// The limits a connection's circuits get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// Everyone: the tiny limits, enough to coordinate a hole punch.
    Open,
    /// Devices of an allowed person: long, large circuits.
    Allowed,
}

/// The relay server behaviour with per-connection circuit limits (see the module docs).
pub struct TieredRelay {
    relay: relay::Behaviour,
    open_factory: relay::Behaviour,
    allow: AllowList,
}

impl TieredRelay {
    /// Builds the relay. `allowed` configures everything (reservation limits, rate limiters,
    /// the number of circuits) and the circuit limits of allowed devices; of `open`, only the
    /// circuit duration, circuit bytes and reservation duration are used.
    ///
    /// The relay advertises the HOP protocol from the start (`Status::Enable`); reservations
    /// carry the swarm's external addresses, so add some (`Swarm::add_external_address`).
    pub fn new(
        local_peer_id: PeerId,
        allowed: relay::Config,
        open: relay::Config,
        allow: AllowList,
    ) -> TieredRelay {
        let mut relay = relay::Behaviour::new(local_peer_id, allowed);
        relay.set_status(Some(relay::Status::Enable));
        let mut open_factory = relay::Behaviour::new(local_peer_id, open);
        open_factory.set_status(Some(relay::Status::Enable));
        TieredRelay {
            relay,
            open_factory,
            allow,
        }
    }

    /// The allow list consulted when a connection picks its tier.
    pub fn allow_list(&self) -> &AllowList {
        &self.allow
    }
}

type Inner = THandler<relay::Behaviour>;

impl NetworkBehaviour for TieredRelay {
    type ConnectionHandler = TierHandler<Inner>;
    type ToSwarm = relay::Event;

    fn handle_pending_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.relay
            .handle_pending_inbound_connection(connection_id, local_addr, remote_addr)
    }

    fn handle_established_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        let allowed = self.relay.handle_established_inbound_connection(
            connection_id,
            peer,
            local_addr,
            remote_addr,
        )?;
        let open = self.open_factory.handle_established_inbound_connection(
            connection_id,
            peer,
            local_addr,
            remote_addr,
        )?;
        Ok(TierHandler::new(peer, open, allowed, self.allow.clone()))
    }

    fn handle_pending_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        maybe_peer: Option<PeerId>,
        addresses: &[Multiaddr],
        effective_role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.relay.handle_pending_outbound_connection(
            connection_id,
            maybe_peer,
            addresses,
            effective_role,
        )
    }

    fn handle_established_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role_override: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        let allowed = self.relay.handle_established_outbound_connection(
            connection_id,
            peer,
            addr,
            role_override,
            port_use,
        )?;
        let open = self.open_factory.handle_established_outbound_connection(
            connection_id,
            peer,
            addr,
            role_override,
            port_use,
        )?;
        Ok(TierHandler::new(peer, open, allowed, self.allow.clone()))
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        self.relay.on_swarm_event(event);
    }

    fn on_connection_handler_event(
        &mut self,
        peer_id: PeerId,
        connection_id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        self.relay
            .on_connection_handler_event(peer_id, connection_id, event);
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        self.relay.poll(cx)
    }
}

/// Holds an open-tier and an allowed-tier handler until the peer's first relay stream on the
/// connection, then only the one for the peer's tier.
pub struct TierHandler<H> {
    peer: PeerId,
    allow: AllowList,
    /// The handler in use: before the lock the open one, after it the one of `main_tier`.
    main: H,
    main_tier: Tier,
    /// The allowed-tier handler, until the lock.
    spare: Option<H>,
    locked: bool,
}

impl<H> TierHandler<H> {
    fn new(peer: PeerId, open: H, allowed: H, allow: AllowList) -> TierHandler<H> {
        TierHandler {
            peer,
            allow,
            main: open,
            main_tier: Tier::Open,
            spare: Some(allowed),
            locked: false,
        }
    }

    /// The tier this connection uses (final once a relay stream was opened).
    pub fn tier(&self) -> Tier {
        self.main_tier
    }

    fn lock(&mut self) {
        if self.locked {
            return;
        }
        self.locked = true;
        let spare = self.spare.take();
        if self.allow.contains(&self.peer)
            && let Some(mut allowed) = spare
        {
            std::mem::swap(&mut self.main, &mut allowed);
            self.main_tier = Tier::Allowed;
            tracing::debug!(peer = %self.peer, "relay connection uses the allowed limits");
        }
    }

    fn handler_for(&mut self, tier: Tier) -> Option<&mut H> {
        if tier == self.main_tier {
            Some(&mut self.main)
        } else {
            self.spare.as_mut()
        }
    }

    fn each(&mut self) -> impl Iterator<Item = &mut H> {
        std::iter::once(&mut self.main).chain(self.spare.as_mut())
    }
}

impl<H: ConnectionHandler> ConnectionHandler for TierHandler<H> {
    type FromBehaviour = H::FromBehaviour;
    type ToBehaviour = H::ToBehaviour;
    type InboundProtocol = H::InboundProtocol;
    type OutboundProtocol = H::OutboundProtocol;
    type InboundOpenInfo = H::InboundOpenInfo;
    type OutboundOpenInfo = (Tier, H::OutboundOpenInfo);

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol, Self::InboundOpenInfo> {
        self.main.listen_protocol()
    }

    fn connection_keep_alive(&self) -> bool {
        self.main.connection_keep_alive()
            || self
                .spare
                .as_ref()
                .is_some_and(ConnectionHandler::connection_keep_alive)
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<
        ConnectionHandlerEvent<Self::OutboundProtocol, Self::OutboundOpenInfo, Self::ToBehaviour>,
    > {
        let main_tier = self.main_tier;
        if let Poll::Ready(event) = self.main.poll(cx) {
            return Poll::Ready(event.map_outbound_open_info(|info| (main_tier, info)));
        }
        if let Some(spare) = self.spare.as_mut()
            && let Poll::Ready(event) = spare.poll(cx)
        {
            return Poll::Ready(event.map_outbound_open_info(|info| (Tier::Allowed, info)));
        }
        Poll::Pending
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<Option<Self::ToBehaviour>> {
        let mut pending = false;
        for handler in self.each() {
            match handler.poll_close(cx) {
                Poll::Ready(Some(event)) => return Poll::Ready(Some(event)),
                Poll::Ready(None) => {}
                Poll::Pending => pending = true,
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(None)
        }
    }

    fn on_behaviour_event(&mut self, event: Self::FromBehaviour) {
        // Before the lock the relay has nothing to tell this connection (status changes are
        // off: the status is fixed at `Enable`), so everything goes to the handler in use.
        self.main.on_behaviour_event(event);
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<
            Self::InboundProtocol,
            Self::OutboundProtocol,
            Self::InboundOpenInfo,
            Self::OutboundOpenInfo,
        >,
    ) {
        match event {
            ConnectionEvent::FullyNegotiatedInbound(inbound) => {
                self.lock();
                self.main
                    .on_connection_event(ConnectionEvent::FullyNegotiatedInbound(inbound));
            }
            ConnectionEvent::FullyNegotiatedOutbound(FullyNegotiatedOutbound {
                protocol,
                info: (tier, info),
            }) => {
                if let Some(handler) = self.handler_for(tier) {
                    handler.on_connection_event(ConnectionEvent::FullyNegotiatedOutbound(
                        FullyNegotiatedOutbound { protocol, info },
                    ));
                }
            }
            ConnectionEvent::DialUpgradeError(DialUpgradeError {
                info: (tier, info),
                error,
            }) => {
                if let Some(handler) = self.handler_for(tier) {
                    handler.on_connection_event(ConnectionEvent::DialUpgradeError(
                        DialUpgradeError { info, error },
                    ));
                }
            }
            ConnectionEvent::ListenUpgradeError(error) => {
                self.main
                    .on_connection_event(ConnectionEvent::ListenUpgradeError(error));
            }
            ConnectionEvent::AddressChange(AddressChange { new_address }) => {
                for handler in self.each() {
                    handler.on_connection_event(ConnectionEvent::AddressChange(AddressChange {
                        new_address,
                    }));
                }
            }
            ConnectionEvent::LocalProtocolsChange(change) => {
                for handler in self.each() {
                    handler
                        .on_connection_event(ConnectionEvent::LocalProtocolsChange(change.clone()));
                }
            }
            ConnectionEvent::RemoteProtocolsChange(change) => {
                for handler in self.each() {
                    handler.on_connection_event(ConnectionEvent::RemoteProtocolsChange(
                        change.clone(),
                    ));
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use iom_protocol::keys::{DeviceKey, PersonKey};

    use super::*;

    fn handler(allow: &AllowList) -> (PeerId, TierHandler<&'static str>) {
        let peer = DeviceKey::from_seed([2; 32]).id().to_peer_id();
        (
            peer,
            TierHandler::new(peer, "open", "allowed", allow.clone()),
        )
    }

    #[test]
    fn a_connection_starts_open_with_both_handlers() {
        let (_, mut h) = handler(&AllowList::new());
        assert_eq!(h.tier(), Tier::Open);
        assert_eq!(h.handler_for(Tier::Open).copied(), Some("open"));
        assert_eq!(h.handler_for(Tier::Allowed).copied(), Some("allowed"));
        assert_eq!(h.each().count(), 2);
    }

    #[test]
    fn an_allowed_peer_gets_the_allowed_handler_at_its_first_relay_stream() {
        let allow = AllowList::new();
        let (peer, mut h) = handler(&allow);
        allow.insert(peer, PersonKey::from_seed([1; 32]).id());
        h.lock();
        assert_eq!(h.tier(), Tier::Allowed);
        assert_eq!(h.handler_for(Tier::Allowed).copied(), Some("allowed"));
        assert_eq!(h.handler_for(Tier::Open), None, "the other one is gone");
        assert_eq!(h.each().map(|x| *x).collect::<Vec<_>>(), vec!["allowed"]);
    }

    #[test]
    fn the_tier_is_final_once_locked() {
        let allow = AllowList::new();
        let (peer, mut h) = handler(&allow);
        h.lock(); // used the relay before authenticating
        assert_eq!(h.tier(), Tier::Open);
        allow.insert(peer, PersonKey::from_seed([1; 32]).id());
        h.lock();
        assert_eq!(
            h.tier(),
            Tier::Open,
            "authenticating later does not upgrade it"
        );
        assert_eq!(h.each().map(|x| *x).collect::<Vec<_>>(), vec!["open"]);
    }
}
