//! The cloud relay node (`iom relay run`): circuit relay v2, the AutoNAT v2 server, identify and
//! ping, with a stable key and per-device circuit limits.
//!
//! # Layout
//! - [`key`]: the relay's stable ed25519 key in `DATA/relay.key`.
//! - [`auth`]: `/iom/relay-auth/1`, where a device proves it belongs to an allowed person
//!   (client side: [`auth::authenticate_to_relay`]).
//! - [`allow`]: the set of peers that proved it, shared between the auth task and the relay.
//! - [`limiter`]: token-bucket rate limiters for reservations and circuits.
//! - [`tiered`]: [`tiered::TieredRelay`], the relay behaviour that gives each connection the
//!   circuit limits of its tier (tiny for everyone, long and large for allowed devices).
//! - [`metrics_http`]: `GET /metrics` of the relay (`--metrics-listen`).
//! - [`web`]: names under the relay's domain and `/iom/web-name/1`, where a device
//!   registers its name (client side: [`web::register_web_name`]).
//! - [`passthrough`]: the TLS listener that forwards connections by server name over
//!   `/iom/tls-forward/1`, TLS ending on the device.
//! - [`acme_http`]: the plain-HTTP listener that answers ACME HTTP-01 challenges for a
//!   device by asking it over `/iom/acme-http/1`.
//! - [`server`]: [`server::RelayServer`], the swarm and its event loop.
//!
//! # Why a tiered behaviour
//!
//! `libp2p::relay::Config` limits are global. The limits of a circuit come from the
//! connection handler of the connection that *opened* the circuit (the source's connection to
//! the relay), and each handler copies the config when the connection is established. So
//! [`tiered::TieredRelay`] builds two handlers per connection, one from a relay configured with
//! the tiny limits and one from a relay configured with the large limits, and keeps the one
//! that matches the peer at its first relay stream: if the peer has authenticated by then, it
//! gets the large limits. All relay state (reservations, circuits) lives in one
//! `relay::Behaviour`, so allowed and other peers share reservations and can reach each other.
//! See `docs/operations.md`.

pub mod acme_http;
pub mod allow;
pub mod auth;
pub mod key;
pub mod limiter;
pub mod metrics_http;
pub mod passthrough;
pub mod server;
pub mod tiered;
pub mod web;

pub use allow::AllowList;
pub use auth::{RELAY_AUTH_PROTOCOL, RelayAuthError, RelayAuthReply, authenticate_to_relay};
pub use key::{load_or_create_relay_key, relay_key_path};
pub use server::{
    CircuitLimit, RelayConfig, RelayError, RelayLimits, RelayMetricsSource, RelayServer,
};
pub use web::{
    TLS_FORWARD_PROTOCOL, WEB_NAME_PROTOCOL, WebConfig, WebNameReply, register_web_name,
};
