//! The tool seam: a [`ToolHost`] offers tools to the model and runs them for a conversation.
//! The Docker sandbox ([`DockerHost`](super::sandbox::host::DockerHost)) is the production
//! host; MCP servers can be another. Tests use in-memory fakes.

use futures::future::BoxFuture;
use serde_json::Value;

use super::claude::ToolResult;
use super::sandbox::SandboxError;

/// Why a tool host cannot run tools now.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ToolHostError {
    /// The Docker sandbox cannot be used.
    #[error("the tool sandbox is unavailable: {0} (run `iom sandbox check`)")]
    Sandbox(#[source] SandboxError),
    /// A file could not be read from the workspace.
    #[error("{0}")]
    File(String),
}

/// Runs the model's tools.
pub trait ToolHost: Send + Sync {
    /// The tool definitions offered to the model (the Messages API `tools` array).
    fn definitions(&self) -> Value;

    /// Runs tool `name` with `input` for `conversation`. Failures come back as an error
    /// result for the model, never as a Rust error.
    fn run<'a>(
        &'a self,
        conversation: &'a str,
        name: &'a str,
        input: &'a Value,
    ) -> BoxFuture<'a, ToolResult>;

    /// Puts a file (an attachment) into the conversation's workspace at `attachments/NAME`,
    /// where the tools read it as `/workspace/attachments/NAME`.
    fn put_attachment<'a>(
        &'a self,
        conversation: &'a str,
        name: &'a str,
        bytes: Vec<u8>,
    ) -> BoxFuture<'a, Result<(), ToolHostError>>;

    /// Reads a file of the conversation's workspace (`path` as the tools see it, relative to
    /// `/workspace`), at most `max` bytes (more is an error). Hosts without a workspace say so.
    fn read_workspace_file<'a>(
        &'a self,
        conversation: &'a str,
        path: &'a str,
        max: usize,
    ) -> BoxFuture<'a, Result<Vec<u8>, ToolHostError>> {
        let _ = (conversation, path, max);
        Box::pin(async {
            Err(ToolHostError::File(
                "this tool host has no workspace".into(),
            ))
        })
    }

    /// Gets ready ahead of the first call (connect, clean up leftovers of an earlier run).
    fn prepare(&self) -> BoxFuture<'_, Result<(), ToolHostError>>;

    /// Releases everything the host holds (containers); called once at shutdown.
    fn shutdown(&self) -> BoxFuture<'_, ()>;
}
