//! [`RelayServer`]: the relay's swarm (TCP + QUIC, Noise, yamux) with [`TieredRelay`], the
//! AutoNAT v2 server, identify, ping, connection limits and `/iom/relay-auth/1`.

use std::future::Future;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use iom_protocol::keys::PersonId;
use libp2p::core::transport::ListenerId;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, Swarm, identity, noise, relay, tcp, yamux};

use super::AllowList;
use super::auth::{RELAY_AUTH_PROTOCOL, serve_auth};
use super::limiter::{Key, Limiter, Rate};
use super::tiered::TieredRelay;
use super::web::{WEB_NAME_PROTOCOL, WebConfig, WebNames};

/// Why the relay could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The key file is readable by others.
    #[error("{path} is readable by other users (mode {mode:o}); run `chmod 600 {path}`")]
    KeyPermissions {
        /// The key file.
        path: PathBuf,
        /// Its mode.
        mode: u32,
    },
    /// The key file is not a 32-byte ed25519 seed.
    #[error("{path} is not a relay key ({len} bytes, expected 32); move it away to make a new one")]
    MalformedKey {
        /// The key file.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
    /// The TCP transport (with Noise and yamux) could not be built.
    #[error("cannot set up the network transports: {0}")]
    Transport(#[source] libp2p::noise::Error),
    /// `/iom/relay-auth/1` is served already (the relay was started twice).
    #[error("cannot set up the network transports: {0}")]
    AuthProtocol(#[source] libp2p_stream::AlreadyRegistered),
    /// Listening on an address failed.
    #[error("cannot listen on {addr}: {reason}")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
    /// No listener came up.
    #[error("the relay has no listen address")]
    NoListenAddress,
    /// The TLS passthrough's (or the ACME HTTP listener's) port could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    TlsListen {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// How long and how much one circuit may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitLimit {
    /// Maximum circuit lifetime (at most `u32::MAX` seconds).
    pub duration: Duration,
    /// Maximum bytes, both directions together (0 = unlimited).
    pub bytes: u64,
}

/// The relay's limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayLimits {
    /// Circuits opened by everyone else: enough to coordinate a hole punch.
    pub open: CircuitLimit,
    /// Circuits opened by authenticated devices of allowed persons.
    pub allowed: CircuitLimit,
    /// How long a reservation lasts before the client must renew it.
    pub reservation_duration: Duration,
    /// Reservations held at once, all peers together.
    pub max_reservations: usize,
    /// Reservations one peer may hold.
    pub max_reservations_per_peer: usize,
    /// Circuits at once, all peers together.
    pub max_circuits: usize,
    /// Circuits one source peer may have open.
    pub max_circuits_per_peer: usize,
    /// Rate limits for new reservations and circuits of peers that are not allowed
    /// (per peer, per IP); `None` switches rate limiting off (for test labs).
    pub rates: Option<RateLimits>,
    /// Established connections, all peers together.
    pub max_connections: u32,
    /// Established connections per peer.
    pub max_connections_per_peer: u32,
}

/// Token-bucket rates (see [`super::limiter`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimits {
    /// New reservations per peer.
    pub reservations_per_peer: Rate,
    /// New reservations per IP address.
    pub reservations_per_ip: Rate,
    /// New circuits per source peer.
    pub circuits_per_peer: Rate,
    /// New circuits per source IP address.
    pub circuits_per_ip: Rate,
}

fn rate(burst: u32, interval_secs: u64) -> Rate {
    Rate {
        burst: NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN),
        interval: Duration::from_secs(interval_secs),
    }
}

impl Default for RateLimits {
    /// The libp2p defaults: per peer a burst of 30 refilled one per 2 minutes, per IP a burst
    /// of 60 refilled one per minute.
    fn default() -> RateLimits {
        RateLimits {
            reservations_per_peer: rate(30, 120),
            reservations_per_ip: rate(60, 60),
            circuits_per_peer: rate(30, 120),
            circuits_per_ip: rate(60, 60),
        }
    }
}

impl Default for RelayLimits {
    fn default() -> RelayLimits {
        RelayLimits {
            open: CircuitLimit {
                duration: Duration::from_secs(2 * 60),
                bytes: 128 * 1024,
            },
            allowed: CircuitLimit {
                duration: Duration::from_secs(24 * 60 * 60),
                bytes: 4 * 1024 * 1024 * 1024,
            },
            reservation_duration: Duration::from_secs(60 * 60),
            max_reservations: 4096,
            max_reservations_per_peer: 4,
            max_circuits: 1024,
            max_circuits_per_peer: 16,
            rates: Some(RateLimits::default()),
            max_connections: 8192,
            max_connections_per_peer: 8,
        }
    }
}

/// What the relay listens on, advertises and allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayConfig {
    /// Listen addresses (default: TCP and QUIC on port 4001, all interfaces).
    pub listen: Vec<Multiaddr>,
    /// Public addresses to advertise. Empty: advertise the non-loopback listen addresses
    /// (fine on a host with a public IP on an interface; wrong behind a cloud 1:1 NAT).
    pub external: Vec<Multiaddr>,
    /// Persons whose devices get the allowed circuit limits.
    pub allowed_persons: Vec<PersonId>,
    /// Limits.
    pub limits: RelayLimits,
    /// TLS passthrough by server name under a domain (`--domain`), if on.
    pub web: Option<WebConfig>,
}

impl RelayConfig {
    /// The default listen addresses: `/ip4/0.0.0.0/tcp/4001` and `/ip4/0.0.0.0/udp/4001/quic-v1`.
    pub fn default_listen() -> Vec<Multiaddr> {
        let tcp = Multiaddr::empty()
            .with(Protocol::Ip4(std::net::Ipv4Addr::UNSPECIFIED))
            .with(Protocol::Tcp(4001));
        let quic = Multiaddr::empty()
            .with(Protocol::Ip4(std::net::Ipv4Addr::UNSPECIFIED))
            .with(Protocol::Udp(4001))
            .with(Protocol::QuicV1);
        vec![tcp, quic]
    }
}

impl Default for RelayConfig {
    fn default() -> RelayConfig {
        RelayConfig {
            listen: RelayConfig::default_listen(),
            external: Vec::new(),
            allowed_persons: Vec::new(),
            limits: RelayLimits::default(),
            web: None,
        }
    }
}

mod behaviour {
    // The derive generates a public event enum whose variants cannot carry docs.
    #![allow(missing_docs)]

    use libp2p::swarm::NetworkBehaviour;
    use libp2p::{autonat, connection_limits, identify, ping};

    use super::TieredRelay;

    /// Everything the relay speaks.
    #[derive(NetworkBehaviour)]
    pub struct RelayBehaviour {
        pub limits: connection_limits::Behaviour,
        pub relay: TieredRelay,
        pub autonat: autonat::v2::server::Behaviour,
        pub identify: identify::Behaviour,
        pub ping: ping::Behaviour,
        pub stream: libp2p_stream::Behaviour,
    }
}

pub use behaviour::{RelayBehaviour, RelayBehaviourEvent};

/// Agent version announced by identify.
pub const RELAY_AGENT_VERSION: &str = concat!("iom-relay/", env!("CARGO_PKG_VERSION"));

fn relay_config(limits: &RelayLimits, circuit: CircuitLimit, allow: &AllowList) -> relay::Config {
    let mut config = relay::Config {
        max_reservations: limits.max_reservations,
        max_reservations_per_peer: limits.max_reservations_per_peer,
        reservation_duration: limits.reservation_duration,
        reservation_rate_limiters: Vec::new(),
        max_circuits: limits.max_circuits,
        max_circuits_per_peer: limits.max_circuits_per_peer,
        max_circuit_duration: circuit
            .duration
            .min(Duration::from_secs(u64::from(u32::MAX))),
        max_circuit_bytes: circuit.bytes,
        circuit_src_rate_limiters: Vec::new(),
    };
    if let Some(r) = &limits.rates {
        config.reservation_rate_limiters = vec![
            Limiter::boxed(Key::Peer, r.reservations_per_peer, allow.clone()),
            Limiter::boxed(Key::Ip, r.reservations_per_ip, allow.clone()),
        ];
        config.circuit_src_rate_limiters = vec![
            Limiter::boxed(Key::Peer, r.circuits_per_peer, allow.clone()),
            Limiter::boxed(Key::Ip, r.circuits_per_ip, allow.clone()),
        ];
    }
    config
}

/// The running relay.
pub struct RelayServer {
    swarm: Swarm<RelayBehaviour>,
    config: RelayConfig,
    allow: AllowList,
    auth_task: Option<tokio::task::JoinHandle<()>>,
    /// The TLS passthrough's tasks (names, listener).
    web_tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Where the TLS passthrough listens, once started.
    tls_addr: Option<std::net::SocketAddr>,
    /// Where the ACME HTTP-01 listener listens, once started.
    http_addr: Option<std::net::SocketAddr>,
    /// The names devices registered.
    names: WebNames,
    /// Advertise listen addresses as they come and go (no `--external-addr`).
    auto_external: bool,
    /// `start` is done.
    started: bool,
    /// Peers connected now (for the metrics).
    connected: Arc<std::sync::atomic::AtomicU64>,
}

/// What the relay's metrics endpoint reads while the relay runs (cheap to clone).
#[derive(Debug, Clone)]
pub struct RelayMetricsSource {
    connected: Arc<std::sync::atomic::AtomicU64>,
    allow: AllowList,
}

impl RelayMetricsSource {
    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        crate::metrics::render_relay(
            self.connected.load(std::sync::atomic::Ordering::Relaxed),
            self.allow.len() as u64,
        )
    }
}

impl RelayServer {
    /// Builds the relay's swarm with identity `key`. Nothing listens until [`start`](Self::start).
    pub fn new(key: identity::Keypair, config: RelayConfig) -> Result<RelayServer, RelayError> {
        let allow = AllowList::new();
        let limits = config.limits.clone();
        let allow_for_behaviour = allow.clone();
        let swarm = libp2p::SwarmBuilder::with_existing_identity(key)
            .with_tokio()
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )
            .map_err(RelayError::Transport)?
            .with_quic()
            .with_behaviour(|key| {
                let me = key.public().to_peer_id();
                let allowed = relay_config(&limits, limits.allowed, &allow_for_behaviour);
                let open = relay_config(&limits, limits.open, &allow_for_behaviour);
                RelayBehaviour {
                    limits: libp2p::connection_limits::Behaviour::new(
                        libp2p::connection_limits::ConnectionLimits::default()
                            .with_max_established(Some(limits.max_connections))
                            .with_max_established_per_peer(Some(limits.max_connections_per_peer))
                            .with_max_pending_incoming(Some(256)),
                    ),
                    relay: TieredRelay::new(me, allowed, open, allow_for_behaviour.clone()),
                    autonat: libp2p::autonat::v2::server::Behaviour::default(),
                    identify: libp2p::identify::Behaviour::new(
                        libp2p::identify::Config::new("/iom/id/1".into(), key.public())
                            .with_agent_version(RELAY_AGENT_VERSION.into()),
                    ),
                    ping: libp2p::ping::Behaviour::new(libp2p::ping::Config::new()),
                    stream: libp2p_stream::Behaviour::new(),
                }
            })
            .map_err(|never| -> RelayError { match never {} })?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
            .build();
        let auto_external = config.external.is_empty();
        Ok(RelayServer {
            swarm,
            config,
            allow,
            auth_task: None,
            web_tasks: Vec::new(),
            tls_addr: None,
            http_addr: None,
            names: WebNames::default(),
            auto_external,
            started: false,
            connected: Arc::default(),
        })
    }

    /// The relay's PeerId.
    pub fn peer_id(&self) -> PeerId {
        *self.swarm.local_peer_id()
    }

    /// A handle for serving the relay's metrics.
    pub fn metrics(&self) -> RelayMetricsSource {
        RelayMetricsSource {
            connected: self.connected.clone(),
            allow: self.allow.clone(),
        }
    }

    /// The devices that authenticated so far.
    pub fn allow_list(&self) -> AllowList {
        self.allow.clone()
    }

    /// Where the TLS passthrough listens (after [`start`](Self::start), with `--domain`).
    pub fn tls_addr(&self) -> Option<std::net::SocketAddr> {
        self.tls_addr
    }

    /// Where the ACME HTTP-01 listener listens (after [`start`](Self::start), with
    /// `--http-listen`).
    pub fn http_addr(&self) -> Option<std::net::SocketAddr> {
        self.http_addr
    }

    /// The names devices registered for the TLS passthrough.
    pub fn web_names(&self) -> WebNames {
        self.names.clone()
    }

    /// Binds the TLS passthrough and serves `/iom/web-name/1`.
    async fn start_web(&mut self, web: WebConfig) -> Result<(), RelayError> {
        let addr = web.tls_listen;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| RelayError::TlsListen { addr, source })?;
        let bound = listener
            .local_addr()
            .map_err(|source| RelayError::TlsListen { addr, source })?;
        let mut control = self.swarm.behaviour().stream.new_control();
        let incoming = control
            .accept(WEB_NAME_PROTOCOL)
            .map_err(RelayError::AuthProtocol)?;
        if let Some(http) = web.http_listen {
            let listener = tokio::net::TcpListener::bind(http)
                .await
                .map_err(|source| RelayError::TlsListen { addr: http, source })?;
            self.http_addr = Some(
                listener
                    .local_addr()
                    .map_err(|source| RelayError::TlsListen { addr: http, source })?,
            );
            self.web_tasks
                .push(tokio::spawn(super::acme_http::serve_http(
                    listener,
                    self.names.clone(),
                    control.clone(),
                    web.domain.clone().into(),
                )));
        }
        let port = web.public_port.unwrap_or(bound.port());
        self.web_tasks
            .push(tokio::spawn(super::web::serve_web_names(
                incoming,
                self.names.clone(),
                self.allow.clone(),
                web.domain.clone().into(),
                port,
            )));
        self.web_tasks
            .push(tokio::spawn(super::passthrough::serve_tls(
                listener,
                self.names.clone(),
                control,
                Arc::new(web),
            )));
        self.tls_addr = Some(bound);
        Ok(())
    }

    /// Starts listening and serving `/iom/relay-auth/1`, waits (at most 5 s) for the listen
    /// addresses, and returns the addresses to give to nodes: the advertised (external)
    /// addresses, each ending in `/p2p/<relay id>`.
    pub async fn start(&mut self) -> Result<Vec<Multiaddr>, RelayError> {
        let incoming = self
            .swarm
            .behaviour()
            .stream
            .new_control()
            .accept(RELAY_AUTH_PROTOCOL)
            .map_err(RelayError::AuthProtocol)?;
        let persons: Arc<[PersonId]> = self.config.allowed_persons.clone().into();
        self.auth_task = Some(tokio::spawn(serve_auth(
            incoming,
            persons,
            self.allow.clone(),
        )));
        if let Some(web) = self.config.web.clone() {
            self.start_web(web).await?;
        }

        let mut pending: Vec<ListenerId> = Vec::new();
        for addr in self.config.listen.clone() {
            let id = self
                .swarm
                .listen_on(addr.clone())
                .map_err(|e| RelayError::Listen {
                    addr: addr.clone(),
                    reason: e.to_string(),
                })?;
            pending.push(id);
        }
        let mut listen_addrs: Vec<Multiaddr> = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let mut grace: Option<tokio::time::Instant> = None;
        loop {
            let until = grace.map_or(deadline, |g| g.min(deadline));
            let event = match tokio::time::timeout_at(until, self.swarm.next()).await {
                Ok(Some(event)) => event,
                Ok(None) | Err(_) => break,
            };
            match &event {
                SwarmEvent::NewListenAddr {
                    listener_id,
                    address,
                } => {
                    listen_addrs.push(address.clone());
                    pending.retain(|id| id != listener_id);
                    if pending.is_empty() && grace.is_none() {
                        // 0.0.0.0 reports one address per interface; give them a moment.
                        grace = Some(tokio::time::Instant::now() + Duration::from_millis(300));
                    }
                }
                SwarmEvent::ListenerClosed {
                    listener_id,
                    reason: Err(e),
                    ..
                }
                | SwarmEvent::ListenerError {
                    listener_id,
                    error: e,
                } if pending.contains(listener_id) => {
                    return Err(RelayError::Listen {
                        addr: Multiaddr::empty(),
                        reason: e.to_string(),
                    });
                }
                _ => {}
            }
            self.on_event(event);
        }
        if listen_addrs.is_empty() {
            return Err(RelayError::NoListenAddress);
        }

        let external = if self.auto_external {
            let public: Vec<Multiaddr> = listen_addrs
                .iter()
                .filter(|a| !is_loopback(a))
                .cloned()
                .collect();
            if public.is_empty() {
                tracing::warn!(
                    "no --external-addr and only loopback listen addresses: advertising {listen_addrs:?}; \
                     only clients on this machine can use the relay"
                );
                listen_addrs.clone()
            } else {
                tracing::warn!(
                    "no --external-addr: advertising the listen addresses {public:?}; behind a \
                     NAT (most cloud VMs) pass --external-addr /ip4/PUBLIC_IP/tcp/4001 (and the \
                     quic-v1 one) or reservations will carry unreachable addresses"
                );
                public
            }
        } else {
            self.config.external.clone()
        };
        for addr in &external {
            self.swarm.add_external_address(addr.clone());
        }
        self.started = true;
        let me = self.peer_id();
        Ok(external.into_iter().map(|a| with_peer_id(a, me)).collect())
    }

    /// Runs until `shutdown` completes.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<(), RelayError> {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                event = self.swarm.next() => match event {
                    Some(event) => self.on_event(event),
                    None => break,
                },
            }
        }
        if let Some(task) = self.auth_task.take() {
            task.abort();
        }
        for task in self.web_tasks.drain(..) {
            task.abort();
        }
        tracing::info!("relay stopped");
        Ok(())
    }

    fn count_peers(&self) {
        let n = self.swarm.connected_peers().count() as u64;
        self.connected
            .store(n, std::sync::atomic::Ordering::Relaxed);
    }

    fn on_event(&mut self, event: SwarmEvent<RelayBehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "relay listening");
                if self.auto_external && self.started && !is_loopback(&address) {
                    self.swarm.add_external_address(address);
                }
            }
            SwarmEvent::ExpiredListenAddr { address, .. } if self.auto_external => {
                self.swarm.remove_external_address(&address);
            }
            SwarmEvent::Behaviour(RelayBehaviourEvent::Relay(event)) => log_relay_event(&event),
            SwarmEvent::ConnectionEstablished {
                peer_id, endpoint, ..
            } => {
                crate::metrics::relay().connections.inc();
                self.count_peers();
                tracing::debug!(%peer_id, addr = %endpoint.get_remote_address(), "connection");
            }
            SwarmEvent::ConnectionClosed { .. } => self.count_peers(),
            SwarmEvent::IncomingConnectionError {
                error,
                send_back_addr,
                ..
            } => {
                tracing::debug!(%send_back_addr, "incoming connection failed: {error}");
            }
            _ => {}
        }
    }
}

fn log_relay_event(event: &relay::Event) {
    let m = crate::metrics::relay();
    match event {
        relay::Event::ReservationReqAccepted { .. } => m.reservations_accepted.inc(),
        relay::Event::ReservationReqDenied { .. } => m.reservations_denied.inc(),
        relay::Event::CircuitReqAccepted { .. } => m.circuits_accepted.inc(),
        relay::Event::CircuitReqDenied { .. } => m.circuits_denied.inc(),
        relay::Event::CircuitClosed { .. } => m.circuits_closed.inc(),
        _ => {}
    }
    match event {
        relay::Event::ReservationReqAccepted {
            src_peer_id,
            renewed,
        } => {
            tracing::info!(peer = %src_peer_id, renewed, "reservation accepted");
        }
        relay::Event::ReservationReqDenied {
            src_peer_id,
            status,
        } => {
            tracing::info!(peer = %src_peer_id, ?status, "reservation denied");
        }
        relay::Event::CircuitReqAccepted {
            src_peer_id,
            dst_peer_id,
        } => {
            tracing::info!(src = %src_peer_id, dst = %dst_peer_id, "circuit accepted");
        }
        relay::Event::CircuitReqDenied {
            src_peer_id,
            dst_peer_id,
            status,
        } => {
            tracing::info!(src = %src_peer_id, dst = %dst_peer_id, ?status, "circuit denied");
        }
        relay::Event::CircuitClosed {
            src_peer_id,
            dst_peer_id,
            error,
        } => {
            tracing::info!(src = %src_peer_id, dst = %dst_peer_id, error = ?error, "circuit closed");
        }
        other => tracing::debug!(?other, "relay event"),
    }
}

fn is_loopback(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_loopback(),
        Protocol::Ip6(ip) => ip.is_loopback(),
        _ => false,
    })
}

/// `addr` ending in `/p2p/<peer>` (unchanged if it already ends in a `/p2p`).
pub fn with_peer_id(addr: Multiaddr, peer: PeerId) -> Multiaddr {
    if matches!(addr.iter().last(), Some(Protocol::P2p(_))) {
        addr
    } else {
        addr.with(Protocol::P2p(peer))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn addresses_get_the_relay_peer_id_once() {
        let peer = PeerId::random();
        let addr: Multiaddr = "/ip4/1.2.3.4/tcp/4001".parse().unwrap();
        let with = with_peer_id(addr.clone(), peer);
        assert_eq!(with, addr.with(Protocol::P2p(peer)));
        assert_eq!(
            with_peer_id(with.clone(), PeerId::random()),
            with,
            "unchanged"
        );
    }

    #[test]
    fn loopback_addresses_are_recognised() {
        let yes: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().unwrap();
        let yes6: Multiaddr = "/ip6/::1/udp/1/quic-v1".parse().unwrap();
        let no: Multiaddr = "/ip4/192.168.1.2/tcp/1".parse().unwrap();
        let name: Multiaddr = "/dns4/localhost/tcp/1".parse().unwrap();
        assert!(is_loopback(&yes) && is_loopback(&yes6));
        assert!(!is_loopback(&no) && !is_loopback(&name));
    }
}
