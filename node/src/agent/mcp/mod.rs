//! MCP servers for the agent, each locked down in its own container.
//!
//! Servers are declared in the mesh's settings document (`iom tools add`, from any admin
//! device; see [`spec`]). The agent node runs every enabled one as the main process of a
//! hardened container (no network, read-only root, no capabilities, a non-root user, the
//! sandbox's pids/memory/CPU limits) and speaks MCP to it with `rmcp` over the Docker attach
//! stream ([`stdio`]). A supervisor per server restarts it with back-off when it crashes,
//! hangs, floods stdout or prints something that is not JSON-RPC ([`server`]). [`hub`] keeps
//! the servers in line with the declarations and offers their tools to the model as
//! `mcp__SERVER__TOOL`, beside the sandbox's, through [`hub::McpToolHost`].

pub mod egress;
pub mod hub;
pub mod server;
pub mod spec;
pub mod stdio;

pub use hub::{McpHub, McpToolHost};
pub use spec::{Phase, ServerSpec, ServerStatus};
