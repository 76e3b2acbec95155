//! Claude Messages API client: SSE streaming, retries with backoff, and the tool-use loop.
//!
//! # Layout
//! - [`config`]: [`ClaudeConfig`] and the [`ApiKey`] (env value or a `0600` key file).
//! - [`types`]: wire types ([`Message`], [`ContentBlock`], [`Turn`], [`Usage`], ...).
//! - [`sse`]: an incremental, bounded `text/event-stream` parser (pure).
//! - `assemble`: stream events to a [`Turn`] (pure).
//! - [`cache`]: prompt-caching breakpoints in a request (pure).
//! - [`client`]: [`ClaudeClient::stream`], one request with retries.
//! - [`conversation`]: [`run_conversation`], the tool-use loop over a [`ToolExecutor`].
//! - [`history`]: [`fit_history`], keeping the newest messages within a size budget.
//! - [`error`]: [`ClaudeError`] (by blame) and [`ConfigError`].
//!
//! The API key is only ever placed in the `x-api-key` header (marked sensitive); it is
//! never logged and never part of an error message.

mod assemble;
pub mod cache;
pub mod client;
pub mod config;
pub mod conversation;
pub mod error;
pub mod history;
pub mod sse;
pub mod types;

pub use client::{ClaudeClient, StreamEvent, backoff_delay};
pub use config::{ANTHROPIC_VERSION, ApiKey, ClaudeConfig, KeyError};
pub use conversation::{
    Limits, Outcome, Progress, StoppedBy, TokenBudget, ToolCallRecord, ToolExecutor, ToolResult,
    Unlimited, run_conversation, run_with_budget,
};
pub use error::{ClaudeError, ConfigError};
pub use history::fit_history;
pub use types::{
    Content, ContentBlock, MediaSource, Message, MessagesRequest, Role, StopReason, Turn, Usage,
};
