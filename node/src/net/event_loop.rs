//! The task that owns the swarm: it applies commands, tracks connections in the peer table,
//! cuts revoked devices off within a second of learning of the revocation, reconnects to known
//! trusted devices with backoff, and keeps relay reservations alive.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use iom_protocol::keys::{DeviceId, DeviceKey};
use iom_protocol::trust::TrustState;
use libp2p::core::transport::ListenerId;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, identify, mdns, noise, relay, tcp, yamux};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use super::behaviour::{Behaviour, BehaviourEvent};
use super::{Command, Net, NetConfig, NetEvent, Peers};
use crate::store::Store;
use crate::trust::TrustBook;

const ADDR_PREFIX: &[u8] = b"addr/";

/// Why the network could not start.
#[derive(Debug, thiserror::Error)]
pub enum NetStartError {
    /// Building the transport or behaviour failed.
    #[error("cannot build the network stack: {0}")]
    Build(String),
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}: {reason} (is another program using the port? pass --listen)")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
}

struct Backoff {
    next: Instant,
    delay: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RelayAuth {
    NotStarted,
    InProgress,
    Done,
}

struct RelayState {
    addr: Multiaddr,
    peer: PeerId,
    listener: Option<ListenerId>,
    /// Proving our certificate to the relay (for long, large circuits) comes before the
    /// reservation, because a relay connection's limits are fixed by its first relay stream.
    auth: RelayAuth,
    next_try: Instant,
    delay: Duration,
}

struct EventLoop {
    swarm: Swarm<Behaviour>,
    cmd: mpsc::Receiver<Command>,
    peers: Arc<RwLock<Peers>>,
    events: broadcast::Sender<NetEvent>,
    trust_rx: watch::Receiver<Arc<TrustState>>,
    trust: Arc<TrustBook>,
    local_device: Option<DeviceId>,
    cmd_tx: mpsc::Sender<Command>,
    control: libp2p_stream::Control,
    store: Store,
    pending_dials: HashMap<ConnectionId, oneshot::Sender<Result<PeerId, String>>>,
    pending_peer_dials: HashMap<PeerId, Vec<oneshot::Sender<Result<PeerId, String>>>>,
    backoff: HashMap<PeerId, Backoff>,
    relays: Vec<RelayState>,
    listen: Vec<Multiaddr>,
    /// Trusted peers whose current addresses are stored for the next run.
    persisted_addrs: std::collections::HashSet<PeerId>,
}

/// Builds the swarm, binds the listen addresses and spawns the event loop.
pub async fn start(
    key: &DeviceKey,
    cfg: NetConfig,
    trust: Arc<TrustBook>,
    store: Store,
    mut shutdown: watch::Receiver<bool>,
) -> Result<Net, NetStartError> {
    let keypair = key.to_libp2p_keypair();
    let mdns_on = cfg.mdns;
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| NetStartError::Build(e.to_string()))?
        .with_quic()
        .with_dns()
        .map_err(|e| NetStartError::Build(e.to_string()))?
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| NetStartError::Build(e.to_string()))?
        .with_behaviour(|key, relay_client| {
            Behaviour::new(key, relay_client, mdns_on)
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
        })
        .map_err(|e| NetStartError::Build(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(30)))
        .build();

    let mut bound = Vec::new();
    for addr in &cfg.listen {
        let id = swarm
            .listen_on(addr.clone())
            .map_err(|e| NetStartError::Listen {
                addr: addr.clone(),
                reason: e.to_string(),
            })?;
        bound.push(id);
    }
    // Wait until each listener reports an address or fails, so that a port in use is a clear
    // start-up error rather than a silent background failure.
    let mut listen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut waiting: std::collections::HashSet<ListenerId> = bound.iter().copied().collect();
    while !waiting.is_empty() {
        let ev = tokio::time::timeout_at(deadline, swarm.select_next_some()).await;
        match ev {
            Ok(SwarmEvent::NewListenAddr {
                listener_id,
                address,
            }) => {
                waiting.remove(&listener_id);
                listen.push(address);
            }
            Ok(SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            }) if waiting.contains(&listener_id) => {
                return Err(listen_failed(
                    &bound,
                    &cfg.listen,
                    listener_id,
                    format!("{reason:?}"),
                ));
            }
            Ok(SwarmEvent::ListenerError { listener_id, error })
                if waiting.contains(&listener_id) =>
            {
                return Err(listen_failed(
                    &bound,
                    &cfg.listen,
                    listener_id,
                    error.to_string(),
                ));
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }

    let control = swarm.behaviour().stream.new_control();
    let (cmd_tx, cmd_rx) = mpsc::channel(256);
    let (events, _) = broadcast::channel(256);
    let peers = Arc::new(RwLock::new(Peers::default()));
    let local = *swarm.local_peer_id();

    // Known addresses of trusted devices from earlier runs.
    let mut known = Peers::default();
    if let Ok(rows) = store.state_scan(ADDR_PREFIX) {
        for (k, v) in rows {
            let Ok(peer) = PeerId::from_bytes(&k[ADDR_PREFIX.len()..]) else {
                continue;
            };
            let Ok(addrs) = serde_cbor::from_slice::<Vec<String>>(&v) else {
                continue;
            };
            let addrs: Vec<Multiaddr> = addrs.iter().filter_map(|a| a.parse().ok()).collect();
            for a in &addrs {
                swarm.add_peer_address(peer, a.clone());
            }
            known.map.entry(peer).or_default().addrs = addrs;
        }
    }
    *peers.write().unwrap_or_else(|e| e.into_inner()) = known;

    let relays = cfg
        .relays
        .iter()
        .filter_map(|addr| {
            let peer = addr.iter().find_map(|p| match p {
                Protocol::P2p(id) => Some(id),
                _ => None,
            })?;
            Some(RelayState {
                addr: addr.clone(),
                peer,
                listener: None,
                auth: RelayAuth::NotStarted,
                next_try: Instant::now(),
                delay: Duration::from_secs(1),
            })
        })
        .collect();

    let trust_rx = trust.subscribe();
    let local_device = device_of(&local);
    let mut el = EventLoop {
        local_device,
        trust,
        cmd_tx: cmd_tx.clone(),
        control: control.clone(),
        swarm,
        cmd: cmd_rx,
        peers: peers.clone(),
        events: events.clone(),
        trust_rx,
        store,
        pending_dials: HashMap::new(),
        pending_peer_dials: HashMap::new(),
        backoff: HashMap::new(),
        relays,
        listen,
        persisted_addrs: std::collections::HashSet::new(),
    };
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                ev = el.swarm.select_next_some() => el.on_swarm(ev),
                cmd = el.cmd.recv() => match cmd {
                    Some(c) => el.on_command(c),
                    None => break,
                },
                changed = el.trust_rx.changed() => {
                    if changed.is_err() { break; }
                    el.cut_revoked();
                    el.persist_trusted_addrs();
                }
                _ = tick.tick() => el.on_tick(),
                _ = shutdown.wait_for(|s| *s) => break,
            }
        }
        tracing::debug!("network event loop stopped");
    });
    Ok(Net {
        cmd: cmd_tx,
        control,
        peers,
        events,
        local,
    })
}

/// The start-up error for a listener that failed to bind.
fn listen_failed(
    bound: &[ListenerId],
    addrs: &[Multiaddr],
    failed: ListenerId,
    reason: String,
) -> NetStartError {
    let idx = bound.iter().position(|b| *b == failed).unwrap_or(0);
    NetStartError::Listen {
        addr: addrs.get(idx).cloned().unwrap_or_else(Multiaddr::empty),
        reason,
    }
}

fn device_of(peer: &PeerId) -> Option<DeviceId> {
    DeviceId::from_peer_id(peer).ok()
}

impl EventLoop {
    fn trust_state(&self) -> Arc<TrustState> {
        self.trust_rx.borrow().clone()
    }

    fn is_trusted(&self, peer: &PeerId) -> bool {
        device_of(peer).is_some_and(|d| self.trust_state().is_trusted(&d))
    }

    fn is_revoked(&self, peer: &PeerId) -> bool {
        device_of(peer).is_some_and(|d| self.trust_state().is_revoked(&d))
    }

    fn peers(&self) -> std::sync::RwLockWriteGuard<'_, Peers> {
        self.peers.write().unwrap_or_else(|e| e.into_inner())
    }

    fn cut_revoked(&mut self) {
        let state = self.trust_state();
        let connected = self.peers().connected_peers();
        for peer in connected {
            if device_of(&peer).is_some_and(|d| state.is_revoked(&d)) {
                tracing::warn!(%peer, "disconnecting revoked device");
                let _ = self.swarm.disconnect_peer_id(peer);
            }
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Dial { peer, addrs, reply } => {
                if let Some(p) = peer
                    && self.swarm.is_connected(&p)
                {
                    let _ = reply.send(Ok(p));
                    return;
                }
                let opts = match peer {
                    Some(p) => DialOpts::peer_id(p).addresses(addrs).build(),
                    None => match addrs.first() {
                        Some(a) => DialOpts::unknown_peer_id().address(a.clone()).build(),
                        None => {
                            let _ = reply.send(Err("no address to dial".into()));
                            return;
                        }
                    },
                };
                let id = opts.connection_id();
                match self.swarm.dial(opts) {
                    Ok(()) => {
                        self.pending_dials.insert(id, reply);
                    }
                    Err(libp2p::swarm::DialError::DialPeerConditionFalse(_)) => {
                        // A dial to this peer is already under way: wait for it.
                        if let Some(p) = peer {
                            self.pending_peer_dials.entry(p).or_default().push(reply);
                        }
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.to_string()));
                    }
                }
            }
            Command::Disconnect { peer } => {
                let _ = self.swarm.disconnect_peer_id(peer);
            }
            Command::ListenAddrs { reply } => {
                let mut addrs: Vec<Multiaddr> = self.swarm.listeners().cloned().collect();
                for a in self.swarm.external_addresses() {
                    if !addrs.contains(a) {
                        addrs.push(a.clone());
                    }
                }
                let _ = reply.send(addrs);
            }
            Command::RelayAuthDone { relay } => {
                for r in &mut self.relays {
                    if r.peer == relay {
                        r.auth = RelayAuth::Done;
                        r.next_try = Instant::now();
                    }
                }
            }
            Command::AddAddresses { peer, addrs } => {
                for a in &addrs {
                    self.swarm.add_peer_address(peer, a.clone());
                }
                let mut peers = self.peers();
                let e = peers.map.entry(peer).or_default();
                for a in addrs {
                    if !e.addrs.contains(&a) {
                        e.addrs.push(a);
                    }
                }
            }
        }
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        // Reconnect to trusted devices we know addresses for, with exponential backoff. A
        // device that is not trusted itself (revoked, or not yet joined) has nobody to call.
        let state = self.trust_state();
        let me_trusted =
            device_of(self.swarm.local_peer_id()).is_some_and(|d| state.is_trusted(&d));
        let candidates: Vec<(PeerId, Vec<Multiaddr>)> = {
            let peers = self.peers.read().unwrap_or_else(|e| e.into_inner());
            peers
                .map
                .iter()
                .filter(|(p, e)| {
                    me_trusted
                        && e.conns.is_empty()
                        && !e.addrs.is_empty()
                        && **p != *self.swarm.local_peer_id()
                        && device_of(p).is_some_and(|d| state.is_trusted(&d))
                })
                .map(|(p, e)| (*p, e.addrs.clone()))
                .collect()
        };
        for (peer, addrs) in candidates {
            let b = self.backoff.entry(peer).or_insert(Backoff {
                next: now,
                delay: Duration::from_millis(500),
            });
            if b.next > now {
                continue;
            }
            b.next = now + b.delay;
            b.delay = (b.delay * 2).min(Duration::from_secs(30));
            let _ = self
                .swarm
                .dial(DialOpts::peer_id(peer).addresses(addrs).build());
        }
        // Keep relay connections and reservations up.
        for i in 0..self.relays.len() {
            let (peer, connected, has_listener, due) = {
                let r = &self.relays[i];
                (
                    r.peer,
                    self.swarm.is_connected(&r.peer),
                    r.listener.is_some(),
                    r.next_try <= now,
                )
            };
            if has_listener || !due {
                continue;
            }
            let auth = self.relays[i].auth;
            {
                let r = &mut self.relays[i];
                r.next_try = now + r.delay;
                r.delay = (r.delay * 2).min(Duration::from_secs(30));
            }
            if !connected {
                self.relays[i].auth = RelayAuth::NotStarted;
                let addr = self.relays[i].addr.clone();
                let _ = self
                    .swarm
                    .dial(DialOpts::peer_id(peer).addresses(vec![addr]).build());
            } else if auth == RelayAuth::NotStarted {
                self.relays[i].auth = RelayAuth::InProgress;
                self.relays[i].next_try = now + Duration::from_secs(15);
                self.spawn_relay_auth(peer);
            } else if auth == RelayAuth::Done {
                let circuit = self.relays[i].addr.clone().with(Protocol::P2pCircuit);
                match self.swarm.listen_on(circuit) {
                    Ok(id) => self.relays[i].listener = Some(id),
                    Err(e) => tracing::warn!(relay = %peer, error = %e, "cannot reserve on relay"),
                }
            }
        }
    }

    /// Proves our certificate chain to a relay, then lets the reservation go ahead (with the
    /// large limits if the relay serves our person, with the default ones otherwise).
    fn spawn_relay_auth(&self, relay: PeerId) {
        let chain: Vec<Vec<u8>> = self
            .local_device
            .map(|d| self.trust.chain_for(&d))
            .unwrap_or_default()
            .iter()
            .take(16)
            .map(iom_protocol::cert::Certificate::to_bytes)
            .collect();
        let mut control = self.control.clone();
        let tx = self.cmd_tx.clone();
        tokio::spawn(async move {
            match crate::relay::auth::authenticate_to_relay(&mut control, relay, chain).await {
                Ok(reply) if reply.ok => {
                    tracing::info!(%relay, "relay grants this device long, large circuits");
                }
                Ok(reply) => tracing::info!(
                    %relay,
                    reason = %reply.reason,
                    "relay gives this device the default (small) circuits only"
                ),
                Err(e) => {
                    tracing::info!(%relay, error = %e, "relay authentication failed; default limits")
                }
            }
            let _ = tx.send(Command::RelayAuthDone { relay }).await;
        });
    }

    fn remember_addrs(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
        let usable = addrs;
        if usable.is_empty() {
            return;
        }
        for a in &usable {
            self.swarm.add_peer_address(peer, a.clone());
        }
        let changed = {
            let mut peers = self.peers();
            let e = peers.map.entry(peer).or_default();
            let changed = e.addrs != usable;
            e.addrs = usable.clone();
            changed
        };
        if changed {
            self.persisted_addrs.remove(&peer);
        }
        if self.is_trusted(&peer) {
            self.persist_addrs(peer, &usable);
        }
    }

    /// Stores a trusted peer's addresses for the next run (once per change of addresses).
    fn persist_addrs(&mut self, peer: PeerId, addrs: &[Multiaddr]) {
        if addrs.is_empty() || self.persisted_addrs.contains(&peer) {
            return;
        }
        let strings: Vec<String> = addrs.iter().map(ToString::to_string).collect();
        if let Ok(bytes) = serde_cbor::to_vec(&strings) {
            let mut key = ADDR_PREFIX.to_vec();
            key.extend_from_slice(&peer.to_bytes());
            if self.store.state_put(&key, &bytes).is_ok() {
                self.persisted_addrs.insert(peer);
            }
        }
    }

    /// After a trust change: a peer whose addresses we learned before it became trusted (a
    /// device that just joined) has them stored now, so it is redialed after a restart.
    fn persist_trusted_addrs(&mut self) {
        let state = self.trust_state();
        let todo: Vec<(PeerId, Vec<Multiaddr>)> = {
            let peers = self.peers.read().unwrap_or_else(|e| e.into_inner());
            peers
                .map
                .iter()
                .filter(|(p, e)| {
                    !e.addrs.is_empty()
                        && !self.persisted_addrs.contains(p)
                        && device_of(p).is_some_and(|d| state.is_trusted(&d))
                })
                .map(|(p, e)| (*p, e.addrs.clone()))
                .collect()
        };
        for (peer, addrs) in todo {
            self.persist_addrs(peer, &addrs);
        }
    }

    fn on_swarm(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening");
                if !self.listen.contains(&address) {
                    self.listen.push(address);
                }
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                if self.is_revoked(&peer_id) {
                    tracing::debug!(peer = %peer_id, "refusing connection from revoked device");
                    let _ = self.swarm.close_connection(connection_id);
                    return;
                }
                let relayed = endpoint.is_relayed();
                let (n, had_direct) = {
                    let mut peers = self.peers();
                    let had_direct = peers
                        .map
                        .get(&peer_id)
                        .is_some_and(|e| e.conns.values().any(|c| !c.relayed));
                    (
                        peers.connected(peer_id, connection_id, &endpoint),
                        had_direct,
                    )
                };
                tracing::debug!(peer = %peer_id, relayed, n, "connection established");
                self.backoff.remove(&peer_id);
                if let Some(reply) = self.pending_dials.remove(&connection_id) {
                    let _ = reply.send(Ok(peer_id));
                }
                for reply in self.pending_peer_dials.remove(&peer_id).unwrap_or_default() {
                    let _ = reply.send(Ok(peer_id));
                }
                if n == 1 {
                    let _ = self.events.send(NetEvent::Connected(peer_id));
                } else if !relayed && !had_direct {
                    let _ = self.events.send(NetEvent::Direct(peer_id));
                }
                for r in &mut self.relays {
                    if r.peer == peer_id {
                        r.next_try = Instant::now();
                        r.delay = Duration::from_secs(1);
                    }
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                ..
            } => {
                let n = self.peers().closed(peer_id, connection_id);
                if n == 0 {
                    for r in &mut self.relays {
                        if r.peer == peer_id {
                            // Limits belong to a connection: prove ourselves again next time.
                            r.auth = RelayAuth::NotStarted;
                        }
                    }
                    let _ = self.events.send(NetEvent::Disconnected(peer_id));
                }
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id,
                error,
            } => {
                let msg = error.to_string();
                if let Some(reply) = self.pending_dials.remove(&connection_id) {
                    let _ = reply.send(Err(msg.clone()));
                }
                if let Some(p) = peer_id
                    && !self.swarm.is_connected(&p)
                {
                    for reply in self.pending_peer_dials.remove(&p).unwrap_or_default() {
                        let _ = reply.send(Err(msg.clone()));
                    }
                }
            }
            SwarmEvent::ListenerClosed { listener_id, .. } => {
                for r in &mut self.relays {
                    if r.listener == Some(listener_id) {
                        tracing::warn!(relay = %r.peer, "relay reservation lost; will re-reserve");
                        r.listener = None;
                        r.next_try = Instant::now() + Duration::from_secs(1);
                    }
                }
            }
            SwarmEvent::ExternalAddrConfirmed { address } => {
                tracing::info!(%address, "external address confirmed");
            }
            SwarmEvent::Behaviour(ev) => self.on_behaviour(ev),
            _ => {}
        }
    }

    fn on_behaviour(&mut self, ev: BehaviourEvent) {
        match ev {
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                let is_relay = self.relays.iter().any(|r| r.peer == peer_id);
                if is_relay {
                    // The relay tells us how the internet sees us: a candidate for hole punching.
                    self.swarm.add_external_address(info.observed_addr.clone());
                    return;
                }
                self.remember_addrs(peer_id, info.listen_addrs);
            }
            BehaviourEvent::Mdns(mdns::Event::Discovered(list)) => {
                let mut by_peer: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
                for (peer, addr) in list {
                    by_peer.entry(peer).or_default().push(addr);
                }
                for (peer, addrs) in by_peer {
                    if self.is_trusted(&peer) && !self.swarm.is_connected(&peer) {
                        tracing::debug!(%peer, "mDNS found a trusted device; dialing");
                        let _ = self
                            .swarm
                            .dial(DialOpts::peer_id(peer).addresses(addrs).build());
                    }
                }
            }
            BehaviourEvent::Ping(libp2p::ping::Event {
                peer,
                result: Ok(rtt),
                ..
            }) => {
                if let Some(e) = self.peers().map.get_mut(&peer) {
                    e.rtt_ms = Some(rtt.as_millis() as u64);
                    e.last_seen = crate::time::now_secs();
                }
            }
            BehaviourEvent::RelayClient(relay::client::Event::ReservationReqAccepted {
                relay_peer_id,
                renewal,
                ..
            }) => {
                tracing::info!(relay = %relay_peer_id, renewal, "relay reservation accepted");
                for r in &mut self.relays {
                    if r.peer == relay_peer_id {
                        r.delay = Duration::from_secs(1);
                    }
                }
            }
            BehaviourEvent::Dcutr(libp2p::dcutr::Event {
                remote_peer_id,
                result,
            }) => match result {
                Ok(_) => {
                    tracing::info!(peer = %remote_peer_id, "hole punch succeeded: direct connection")
                }
                Err(e) => {
                    tracing::info!(peer = %remote_peer_id, error = %e, "hole punch failed; staying relayed")
                }
            },
            _ => {}
        }
    }
}
