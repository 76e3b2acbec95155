//! The agent role: Claude requests for the whole mesh, tools in Docker containers.
//!
//! # Layout
//! - [`runner`]: [`runner::Runner`], claims and runs requests on the agent device.
//! - [`ask`]: [`ask::Asking`], puts requests into conversations, tells the agent, follows
//!   them, and serves `/iom/agent/1`.
//! - [`conversations`]: [`conversations::Conversations`], the conversation documents.
//! - [`role`]: [`role::AgentRole`], who holds the role, and assigning it.
//! - [`model`], [`host`], [`clock`]: the seams of the runner (the model client, the tool
//!   host, the time), with the Anthropic client, the Docker sandbox and the wall clock as the
//!   production implementations.
//! - [`claude`], [`sandbox`]: those implementations; [`openai`]: the OpenAI-compatible
//!   client; [`tool_choice`]: forcing a tool call, for both clients (and by reply schema).
//! - [`providers`]: the mesh's model providers (from the settings document) made into
//!   clients; [`chain`]: the fallback chain over them, with back-off probing.
//! - [`progress`]: the progress of a running request as stored in the document.
//! - [`prompt_files`]: attachments as image and document blocks of the prompt.
//! - [`cost`], [`budget`], [`usage`]: prices per model, budgets with reservations, and the
//!   usage report (`iom usage`).
//! - [`mesh_tools`]: the mesh's own tools (memory, schedules, search, sending files).
//! - [`approvals`]: the approval policy and gate for risky tool calls.
//! - [`compact`]: folding older turns into a summary when a conversation outgrows the window.

pub mod approvals;
pub mod ask;
pub mod budget;
pub mod chain;
pub mod claude;
pub mod clock;
pub mod compact;
pub mod conversations;
pub mod cost;
pub mod host;
pub mod mcp;
pub mod mesh_tools;
pub mod model;
pub mod openai;
pub mod progress;
pub mod prompt_files;
pub mod providers;
pub mod role;
pub mod runner;
pub mod sandbox;
#[cfg(test)]
pub(crate) mod testkit;
pub mod tool_choice;
pub mod usage;
