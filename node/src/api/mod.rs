//! The local API: HTTP/JSON over a unix socket (mode 0600) for the CLI, and the same routes over
//! TCP with bearer tokens for scripts and the web page.
//!
//! # Layout
//! - [`error`]: the JSON error body and status codes.
//! - [`routes`]: the router and its handlers.
//! - [`client`]: the client the CLI (and tests) use.
//! - [`ws`]: the WebSocket API (`GET /v1/ws`).

pub mod agent;
pub mod approvals;
pub mod backup;
pub mod body;
pub mod callbacks;
pub mod client;
pub mod doctor;
pub mod email;
pub mod error;
pub mod mesh;
pub mod metrics;
pub mod models;
pub mod routes;
pub mod schedules;
pub mod socket_only;
pub mod tokens;
pub mod tools;
pub mod usage;
pub mod ws;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use tokio::net::UnixListener;

pub use error::ApiError;

/// Binds the unix socket at `path` with mode 0600, replacing a stale socket file.
pub fn bind_socket(path: &Path) -> std::io::Result<UnixListener> {
    if path.exists() {
        // We hold the data-dir lock, so no live node owns this socket: it is stale.
        std::fs::remove_file(path)?;
    }
    // Create the socket with no permissions for others from the first instant.
    let old = set_umask(0o177);
    let listener = UnixListener::bind(path);
    set_umask(old);
    let listener = listener?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Sets the process umask and returns the previous one. Only called around the socket bind
/// during start-up, before other threads create files.
#[allow(unsafe_code)]
fn set_umask(mask: u32) -> u32 {
    // SAFETY: umask(2) has no memory-safety preconditions.
    unsafe { libc::umask(mask as libc::mode_t) as u32 }
}
