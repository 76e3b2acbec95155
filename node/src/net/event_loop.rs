//! The task that owns the swarm: it applies commands, tracks connections in the peer table,
//! cuts revoked devices off within a second of learning of the revocation, reconnects to known
//! trusted devices with backoff, and keeps relay reservations alive.
//!
//! # Relays and hole punching
//!
//! - On every new connection to a relay the node first proves its certificate chain
//!   (`/iom/relay-auth/1`), then reserves: the relay fixes a connection's circuit limits at its
//!   first relay stream. A device that joins a mesh while connected to a relay (it had no
//!   certificate when it authenticated) reconnects to the relay once to prove the new one.
//! - Circuits through our relays are not redialed before that proof is done.
//! - DCUtR's punch candidates are the addresses the relay observes (identify emits them);
//!   they are *not* confirmed as external addresses: the swarm drops candidates that are
//!   already confirmed, which would leave DCUtR with nothing to send.
//! - Once a direct connection to a peer has been up for [`RETIRE_RELAYED_AFTER`], its relayed
//!   connections are closed (streams pick a peer's connections at random, and relayed circuits
//!   are small), and [`NetEvent::Connected`] is sent again so sessions reopen on the direct one.
//! - DCUtR reports a failed punch on one side only, so each side runs its own timer: after
//!   [`HOLE_PUNCH_TIMEOUT`] with only relayed connections to a peer, it logs that it stays
//!   relayed (the link in `iom status` says `relayed`).

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
use tokio::task::JoinSet;

use super::behaviour::{Behaviour, BehaviourEvent};
use super::{Command, DialFailure, Net, NetConfig, NetEvent, Peers, TransportKind};
use crate::store::Store;
use crate::trust::TrustBook;

const ADDR_PREFIX: &[u8] = b"addr/";

/// How long a direct connection must have been up before the relayed connections to the same
/// peer are closed.
pub const RETIRE_RELAYED_AFTER: Duration = Duration::from_secs(2);

/// How long a peer may be reachable only through a relay before this side gives up waiting
/// for a hole punch (DCUtR tells only one side that it failed).
pub const HOLE_PUNCH_TIMEOUT: Duration = Duration::from_secs(60);

/// When to announce a peer again after its relayed connections closed in favour of a direct
/// one (see [`NetEvent::Connected`]).
const REANNOUNCE_AFTER: [Duration; 4] = [
    Duration::from_secs(1),
    Duration::from_secs(3),
    Duration::from_secs(8),
    Duration::from_secs(20),
];

/// After a device that had no certificate when it authenticated to a relay becomes trusted:
/// how long to wait before reconnecting to the relay to prove the certificate (the pairing
/// that made it trusted may still run over a circuit through that relay).
const REAUTH_DELAY: Duration = Duration::from_secs(3);

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
    /// The certificate chain of the last proof (empty before it).
    sent_chain: Vec<Vec<u8>>,
    /// Whether the relay granted the large limits on the current connection.
    granted: bool,
    /// When to drop the relay connection to prove a certificate we got since.
    reauth_at: Option<Instant>,
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
    pending_dials: HashMap<ConnectionId, oneshot::Sender<Result<PeerId, DialFailure>>>,
    pending_peer_dials: HashMap<PeerId, Vec<oneshot::Sender<Result<PeerId, DialFailure>>>>,
    backoff: HashMap<PeerId, Backoff>,
    relays: Vec<RelayState>,
    listen: Vec<Multiaddr>,
    /// Trusted peers whose current addresses are stored for the next run.
    persisted_addrs: std::collections::HashSet<PeerId>,
    /// Peers reachable only through a relay, since when (for [`HOLE_PUNCH_TIMEOUT`]).
    relayed_only_since: HashMap<PeerId, Instant>,
    /// Peers whose relayed connections were replaced by a direct one: when to announce them
    /// again (soonest last) so that sessions which ran over the relayed connections reopen.
    reannounce: HashMap<PeerId, Vec<Instant>>,
    /// Proofs of our certificate to relays in progress (aborted with the loop).
    relay_auths: JoinSet<()>,
}

/// The swarm of a real node: TCP, QUIC, DNS and the relay client.
fn build_os_swarm(
    keypair: libp2p::identity::Keypair,
    mdns_on: bool,
) -> Result<Swarm<Behaviour>, NetStartError> {
    Ok(libp2p::SwarmBuilder::with_existing_identity(keypair)
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
        .build())
}

/// The swarm of an in-process test node: the memory transport with the same Noise and yamux
/// upgrades, and the same behaviour (mDNS off).
fn build_memory_swarm(
    keypair: libp2p::identity::Keypair,
) -> Result<Swarm<Behaviour>, NetStartError> {
    use libp2p::Transport as _;
    use libp2p::core::transport::MemoryTransport;
    use libp2p::core::upgrade::Version;
    Ok(libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_other_transport(|key| {
            let noise = noise::Config::new(key)
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)?;
            Ok(MemoryTransport::default()
                .upgrade(Version::V1)
                .authenticate(noise)
                .multiplex(yamux::Config::default())
                .boxed())
        })
        .map_err(|e| NetStartError::Build(e.to_string()))?
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| NetStartError::Build(e.to_string()))?
        .with_behaviour(|key, relay_client| {
            Behaviour::new(key, relay_client, false)
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
        })
        .map_err(|e| NetStartError::Build(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(30)))
        .build())
}

/// Builds the swarm, binds the listen addresses and spawns the event loop into `tasks`; it
/// runs from [`Net::go_online`] on and ends when `shutdown` turns true or every [`Net`]
/// handle is gone.
pub async fn start(
    key: &DeviceKey,
    cfg: NetConfig,
    trust: Arc<TrustBook>,
    store: Store,
    mut shutdown: watch::Receiver<bool>,
    tasks: &mut JoinSet<()>,
) -> Result<Net, NetStartError> {
    let keypair = key.to_libp2p_keypair();
    let mdns_on = cfg.mdns;
    let mut swarm = match cfg.transport {
        TransportKind::Os => build_os_swarm(keypair, mdns_on)?,
        TransportKind::Memory => build_memory_swarm(keypair)?,
    };

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
                sent_chain: Vec::new(),
                granted: false,
                reauth_at: None,
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
        relayed_only_since: HashMap::new(),
        reannounce: HashMap::new(),
        relay_auths: JoinSet::new(),
    };
    let (online, mut online_rx) = watch::channel(false);
    tasks.spawn(async move {
        tokio::select! {
            r = online_rx.wait_for(|o| *o) => if r.is_err() { return },
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                ev = el.swarm.select_next_some() => el.on_swarm(ev),
                Some(_) = el.relay_auths.join_next(), if !el.relay_auths.is_empty() => {}
                cmd = el.cmd.recv() => match cmd {
                    Some(c) => el.on_command(c),
                    None => break,
                },
                changed = el.trust_rx.changed() => {
                    if changed.is_err() { break; }
                    el.cut_revoked();
                    el.persist_trusted_addrs();
                    el.redial_trusted_now();
                    el.schedule_relay_reauth();
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
        online: Arc::new(online),
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
                            let _ = reply.send(Err(DialFailure("no address to dial".into())));
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
                        let _ = reply.send(Err(DialFailure(e.to_string())));
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
            Command::RelayAuthDone { relay, granted } => {
                for r in &mut self.relays {
                    if r.peer == relay && r.auth == RelayAuth::InProgress {
                        r.auth = RelayAuth::Done;
                        r.granted = granted;
                        r.next_try = Instant::now();
                    }
                }
                // A certificate may have arrived while the proof was under way.
                self.schedule_relay_reauth();
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
            // Not through one of our relays before we proved our certificate to it: the
            // circuit would fix that relay connection at the small limits.
            let addrs: Vec<Multiaddr> = addrs
                .into_iter()
                .filter(|a| {
                    circuit_relay(a).is_none_or(|relay| {
                        self.relays
                            .iter()
                            .all(|r| r.peer != relay || r.auth == RelayAuth::Done)
                    })
                })
                .collect();
            if addrs.is_empty() {
                continue;
            }
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
        self.retire_relayed(now);
        self.hole_punch_timers(now);
        self.reannounce_due(now);
        // A certificate to prove: start over with the relay (see `schedule_relay_reauth`).
        for r in &mut self.relays {
            if r.reauth_at.is_some_and(|at| at <= now) {
                r.reauth_at = None;
                if self.swarm.is_connected(&r.peer) {
                    tracing::info!(
                        relay = %r.peer,
                        "reconnecting to the relay to prove this device's new certificate"
                    );
                    r.auth = RelayAuth::NotStarted;
                    r.next_try = now;
                    r.delay = Duration::from_secs(1);
                    let _ = self.swarm.disconnect_peer_id(r.peer);
                }
            }
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
                self.start_relay_auth(i);
            } else if auth == RelayAuth::Done {
                let circuit = self.relays[i].addr.clone().with(Protocol::P2pCircuit);
                match self.swarm.listen_on(circuit) {
                    Ok(id) => self.relays[i].listener = Some(id),
                    Err(e) => tracing::warn!(relay = %peer, error = %e, "cannot reserve on relay"),
                }
            }
        }
    }

    /// Our certificate chain, as sent to relays (at most 16 certificates).
    fn own_chain(&self) -> Vec<Vec<u8>> {
        self.local_device
            .map(|d| self.trust.chain_for(&d))
            .unwrap_or_default()
            .iter()
            .take(16)
            .map(iom_protocol::cert::Certificate::to_bytes)
            .collect()
    }

    /// Starts proving our certificate to relay `i` (on its current connection).
    fn start_relay_auth(&mut self, i: usize) {
        let chain = self.own_chain();
        let Some(r) = self.relays.get_mut(i) else {
            return;
        };
        r.auth = RelayAuth::InProgress;
        r.granted = false;
        r.sent_chain = chain.clone();
        r.next_try = Instant::now() + Duration::from_secs(15);
        spawn_relay_auth(
            &mut self.relay_auths,
            self.control.clone(),
            self.cmd_tx.clone(),
            r.peer,
            chain,
        );
    }

    /// After a trust change: a relay that refused the large limits to a certificate chain we
    /// no longer have (this device just joined a mesh: before, its chain led to a person of
    /// its own, or there was none) gets a fresh connection and a proof of the new chain,
    /// because limits are fixed per connection. Once per change of our chain.
    fn schedule_relay_reauth(&mut self) {
        let chain = self.own_chain();
        if chain.is_empty() {
            return;
        }
        for r in &mut self.relays {
            if r.auth == RelayAuth::Done
                && !r.granted
                && r.sent_chain != chain
                && r.reauth_at.is_none()
            {
                r.reauth_at = Some(Instant::now() + REAUTH_DELAY);
            }
        }
    }

    /// Closes relayed connections to peers that have had a direct connection for a while.
    fn retire_relayed(&mut self, now: Instant) {
        let close: Vec<(PeerId, ConnectionId)> = {
            let peers = self.peers.read().unwrap_or_else(|e| e.into_inner());
            peers
                .map
                .iter()
                .filter(|(_, e)| {
                    e.conns.values().any(|c| {
                        !c.relayed && now.saturating_duration_since(c.since) >= RETIRE_RELAYED_AFTER
                    })
                })
                .flat_map(|(p, e)| {
                    e.conns
                        .iter()
                        .filter(|(_, c)| c.relayed)
                        .map(move |(id, _)| (*p, *id))
                })
                .collect()
        };
        for (peer, id) in close {
            if self.swarm.close_connection(id) {
                tracing::info!(%peer, "direct connection is up; closing the relayed one");
            }
        }
    }

    /// Our own hole punch timeout (see [`HOLE_PUNCH_TIMEOUT`]).
    fn hole_punch_timers(&mut self, now: Instant) {
        let expired: Vec<PeerId> = self
            .relayed_only_since
            .iter()
            .filter(|(_, since)| now.saturating_duration_since(**since) >= HOLE_PUNCH_TIMEOUT)
            .map(|(p, _)| *p)
            .collect();
        for peer in expired {
            self.relayed_only_since.remove(&peer);
            let link = self
                .peers
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .link(&peer);
            if link == super::Link::Relayed {
                tracing::info!(
                    %peer,
                    secs = HOLE_PUNCH_TIMEOUT.as_secs(),
                    "no direct connection after the hole punch timeout; staying relayed"
                );
            }
        }
    }

    /// Announces peers whose relayed connections were replaced by a direct one.
    fn reannounce_due(&mut self, now: Instant) {
        let mut due = Vec::new();
        self.reannounce.retain(|peer, times| {
            if times.last().is_some_and(|at| *at <= now) {
                times.pop();
                due.push(*peer);
            }
            !times.is_empty()
        });
        for peer in due {
            if self.swarm.is_connected(&peer) {
                let _ = self.events.send(NetEvent::Connected(peer));
            }
        }
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
            let _ = self.events.send(NetEvent::Addresses(peer));
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

    /// After a trust change: every trusted device without a connection is called at the next
    /// tick instead of after the back-off its failed attempts built up (a device that just
    /// joined was refused while its certificate was on the way). Trust changes are rare.
    fn redial_trusted_now(&mut self) {
        let state = self.trust_state();
        let peers = self.peers.read().unwrap_or_else(|e| e.into_inner());
        self.backoff.retain(|p, _| {
            let waiting = peers.map.get(p).is_none_or(|e| e.conns.is_empty());
            !(waiting && device_of(p).is_some_and(|d| state.is_trusted(&d)))
        });
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
                    tracing::info!(
                        peer = %peer_id,
                        addr = %endpoint.get_remote_address(),
                        "direct connection to a relayed peer"
                    );
                    let _ = self.events.send(NetEvent::Direct(peer_id));
                }
                if relayed && !had_direct {
                    self.relayed_only_since
                        .entry(peer_id)
                        .or_insert_with(Instant::now);
                } else if !relayed {
                    self.relayed_only_since.remove(&peer_id);
                }
                let mut auth_now = None;
                for (i, r) in self.relays.iter_mut().enumerate() {
                    if r.peer == peer_id {
                        r.next_try = Instant::now();
                        r.delay = Duration::from_secs(1);
                        if r.auth == RelayAuth::NotStarted {
                            auth_now = Some(i);
                        }
                    }
                }
                // Prove our certificate before anything else uses the relay connection.
                if let Some(i) = auth_now {
                    self.start_relay_auth(i);
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                let n = self.peers().closed(peer_id, connection_id);
                if endpoint.is_relayed() && n > 0 {
                    let link = self
                        .peers
                        .read()
                        .unwrap_or_else(|e| e.into_inner())
                        .link(&peer_id);
                    if link == super::Link::Direct {
                        // Sessions that ran over the relayed connection end once they notice
                        // (it can take a second or more): announce the peer a few times; a
                        // session that is still up makes the announcement a no-op.
                        let now = Instant::now();
                        self.reannounce.insert(
                            peer_id,
                            REANNOUNCE_AFTER.iter().rev().map(|d| now + *d).collect(),
                        );
                    }
                }
                if n == 0 {
                    self.relayed_only_since.remove(&peer_id);
                    self.reannounce.remove(&peer_id);
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
                    let _ = reply.send(Err(DialFailure(msg.clone())));
                }
                if let Some(p) = peer_id
                    && !self.swarm.is_connected(&p)
                {
                    for reply in self.pending_peer_dials.remove(&p).unwrap_or_default() {
                        let _ = reply.send(Err(DialFailure(msg.clone())));
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
                    // The relay tells us how the internet sees us. identify hands it to DCUtR
                    // as a punch candidate; confirming it as an external address here would
                    // make the swarm drop that candidate (it skips confirmed addresses).
                    tracing::debug!(observed = %info.observed_addr, "the relay observes us at");
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
                crate::metrics::node().relay_reservations.inc();
                self.peers()
                    .reservations
                    .insert(relay_peer_id, crate::time::now_secs());
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
                    crate::metrics::node().hole_punches_ok.inc();
                    tracing::info!(peer = %remote_peer_id, "hole punch succeeded: direct connection")
                }
                Err(e) => {
                    crate::metrics::node().hole_punches_failed.inc();
                    tracing::info!(peer = %remote_peer_id, error = %e, "hole punch failed; staying relayed")
                }
            },
            _ => {}
        }
    }
}

/// Proves `chain` to `relay` over `/iom/relay-auth/1`, then reports back so the reservation
/// can go ahead (with the large limits if the relay serves our person, with the default ones
/// otherwise).
fn spawn_relay_auth(
    tasks: &mut JoinSet<()>,
    mut control: libp2p_stream::Control,
    tx: mpsc::Sender<Command>,
    relay: PeerId,
    chain: Vec<Vec<u8>>,
) {
    tasks.spawn(async move {
        let granted = match crate::relay::auth::authenticate_to_relay(&mut control, relay, chain)
            .await
        {
            Ok(reply) if reply.ok => {
                tracing::info!(%relay, "relay grants this device long, large circuits");
                true
            }
            Ok(reply) => {
                tracing::info!(
                    %relay,
                    reason = %reply.reason,
                    "relay gives this device the default (small) circuits only"
                );
                false
            }
            Err(e) => {
                tracing::info!(%relay, error = %e, "relay authentication failed; default limits");
                false
            }
        };
        let _ = tx.send(Command::RelayAuthDone { relay, granted }).await;
    });
}

/// The relay a circuit address goes through (`.../p2p/RELAY/p2p-circuit/...`).
fn circuit_relay(addr: &Multiaddr) -> Option<PeerId> {
    let mut relay = None;
    for p in addr.iter() {
        match p {
            Protocol::P2p(id) => relay = Some(id),
            Protocol::P2pCircuit => return relay,
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn circuit_relay_is_the_peer_before_p2p_circuit() {
        let relay = PeerId::random();
        let target = PeerId::random();
        let addr: Multiaddr =
            format!("/ip4/10.0.0.1/tcp/4001/p2p/{relay}/p2p-circuit/p2p/{target}")
                .parse()
                .expect("valid multiaddr");
        assert_eq!(circuit_relay(&addr), Some(relay));
        let direct: Multiaddr = format!("/ip4/10.0.0.1/tcp/4001/p2p/{target}")
            .parse()
            .expect("valid multiaddr");
        assert_eq!(circuit_relay(&direct), None);
    }
}
