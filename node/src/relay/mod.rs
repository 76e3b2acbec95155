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

pub mod allow;
pub mod auth;
pub mod key;
pub mod limiter;
pub mod metrics_http;
pub mod server;
pub mod tiered;

pub use allow::AllowList;
pub use auth::{RELAY_AUTH_PROTOCOL, RelayAuthError, RelayAuthReply, authenticate_to_relay};
pub use key::{load_or_create_relay_key, relay_key_path};
pub use server::{
    CircuitLimit, RelayConfig, RelayError, RelayLimits, RelayMetricsSource, RelayServer,
};
