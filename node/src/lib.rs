//! The iom node: everything that does I/O.
//!
//! # Layout
//! - [`node`]: the running node's shared state and lifecycle.
//! - [`config`]: configuration, raw then validated.
//! - [`identity`]: key files.
//! - [`lock`]: one node per data dir.
//! - [`backup`]: encrypted backups of one device, restore, and the person key's recovery kit.
//! - [`store`]: sled storage for objects, blobs and documents.
//! - [`docs`]: the document service (load, persist, compact, announce).
//! - [`net`]: the libp2p event loop and its handle.
//! - [`trust`]: certificates and their evaluation.
//! - [`pairing`]: invites and joining.
//! - [`devices`]: finding and revoking devices.
//! - [`sync`]: document and blob sync between trusted devices.
//! - [`api`]: the local API (unix socket, HTTP) and its client.
//! - [`metrics`]: Prometheus counters and the text exposition format.
//! - [`doctor`]: `iom doctor` findings.
//! - [`channels`]: email (IMAP in, SMTP out).
//! - [`http`]: the HTTP listener (bearer tokens, webhooks, the web chat page).
//! - [`schedule`]: the scheduler (cron prompts fired once per slot by the agent).
//! - [`agent`]: the Claude client, the Docker sandbox and the request runner.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod agent;
pub mod api;
pub mod backup;
pub mod channels;
pub mod config;
pub mod devices;
mod doc_cache;
pub mod docs;
pub mod doctor;
pub mod format;
pub mod http;
pub mod identity;
pub mod lock;
pub mod metrics;
pub mod net;
pub mod node;
pub mod pairing;
pub mod relay;
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod scenarios;
pub mod schedule;
pub mod secret_file;
pub mod store;
pub mod sync;
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod testkit;
pub mod time;
pub mod trust;
