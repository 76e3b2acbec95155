//! OpenAI-compatible chat completions client (llama.cpp, Ollama, vLLM, LM Studio, hosted
//! gateways): streaming, tool calls, retries, and leniency with what such servers send.
//!
//! Our provider-neutral format is the Anthropic-shaped [`MessagesRequest`] / [`Turn`] of
//! [`crate::agent::claude`]; this client translates both ways, so the rest of the agent (the
//! tool loop, usage, history) is the same for every provider.
//!
//! # Layout
//! - [`wire`]: the request, translated (pure).
//! - [`stream`]: chunks to a [`Turn`], lenient (pure).
//! - [`client`]: [`OpenAiClient::stream`], one request with retries.
//! - [`error`]: [`OpenAiError`] and what each failure means ([`Failure`]).
//!
//! [`MessagesRequest`]: crate::agent::claude::MessagesRequest
//! [`Turn`]: crate::agent::claude::Turn

pub mod client;
pub mod error;
pub mod stream;
pub mod wire;

pub use client::{OpenAiClient, OpenAiConfig, OpenAiConfigError};
pub use error::{Failure, OpenAiError};

#[cfg(test)]
mod tests;
