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

    /// Gets ready ahead of the first call (connect, clean up leftovers of an earlier run).
    fn prepare(&self) -> BoxFuture<'_, Result<(), ToolHostError>>;

    /// Releases everything the host holds (containers); called once at shutdown.
    fn shutdown(&self) -> BoxFuture<'_, ()>;
}
