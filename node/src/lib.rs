//! The iom node: everything that does I/O.
//!
//! # Layout
//! - [`agent`]: the Claude client, the Docker sandbox and the request runner.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod agent;
