//! Locked-down Docker containers for tool calls (bollard).
//!
//! One warm container per conversation runs every tool the model calls (`bash`, `read_file`,
//! `write_file`, `edit_file`, `list_files`) through `docker exec`. Containers have no network,
//! a read-only root, no capabilities, a non-root user, process/memory/CPU limits, an empty
//! environment (the API key never enters) and only the conversation's workspace plus validated
//! config mounts. Each call has a wall-clock timeout and an output cap.
//!
//! # Layout
//! - [`policy`]: [`SandboxConfig`] (the `[sandbox]` TOML section) and [`validate_mounts`].
//! - [`image`]: builds the default image (`iom-sandbox:1`) without a registry.
//! - [`container`]: [`Sandbox`], the runtime: warm containers, exec, reaping.
//! - [`host`]: [`host::DockerHost`], the sandbox as the agent's tool host.
//! - [`tools`]: the tool definitions offered to the model and their implementation.
//! - [`quota`]: the workspace disk quota (loop-mounted ext4 images) and its bookkeeping.
//! - [`check`]: `iom sandbox check`, a list of actionable diagnostics.
//!
//! # Use
//! ```no_run
//! # async fn demo() -> Result<(), iom_node::agent::sandbox::SandboxError> {
//! use iom_node::agent::sandbox::{Sandbox, SandboxConfig};
//! let sandbox = Sandbox::connect(SandboxConfig::default(), "/var/lib/iom".into(), "node1".into())
//!     .await?;
//! sandbox.reap_orphans().await?;
//! let out = sandbox
//!     .run_tool("conv-1", "bash", &serde_json::json!({"command": "echo hi"}))
//!     .await;
//! assert_eq!(out.output.trim(), "hi");
//! sandbox.shutdown().await;
//! # Ok(()) }
//! ```

pub mod check;
pub mod container;
pub mod debian_image;
mod exec;
pub mod host;
pub mod image;
pub mod policy;
pub mod quota;
pub mod tools;
mod ustar;

use std::path::PathBuf;
use std::time::Duration;

pub use container::Sandbox;
pub use policy::{MountError, SandboxConfig, validate_mounts};
pub use tools::ToolOutcome;

/// Errors from the sandbox runtime and image builder.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SandboxError {
    /// The Docker engine could not be reached or refused the version negotiation.
    #[error("Docker engine unreachable: {detail}. {hint}")]
    DockerUnreachable {
        /// What failed.
        detail: String,
        /// What the user can do about it.
        hint: String,
    },
    /// A Docker API call failed.
    #[error("Docker {action} failed: {source}")]
    Docker {
        /// What was being done.
        action: &'static str,
        /// The bollard error.
        source: bollard::errors::Error,
    },
    /// A configured mount was refused.
    #[error(transparent)]
    Mount(#[from] MountError),
    /// A conversation id that cannot be used as a directory or container name.
    #[error(
        "invalid conversation id {0:?}: use 1-128 characters from [A-Za-z0-9_.-], not starting \
         with a dot"
    )]
    BadConversationId(String),
    /// A local file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The rootfs for the image is unusable.
    #[error("image rootfs: {0}")]
    Rootfs(String),
    /// A workspace could not get its disk quota (the total is reached, or it cannot be
    /// enforced and `[sandbox] quota = "required"`).
    #[error(transparent)]
    Quota(#[from] quota::QuotaError),
    /// A tool call ran past its wall-clock limit; the container was removed.
    #[error(
        "timed out after {0:?}; the sandbox was reset (files in /workspace are kept, /tmp and \
         background processes are gone)"
    )]
    Timeout(Duration),
}

impl SandboxError {
    pub(crate) fn docker(action: &'static str) -> impl FnOnce(bollard::errors::Error) -> Self {
        move |source| Self::Docker { action, source }
    }

    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { path, source }
    }
}
