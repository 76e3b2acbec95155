//! Errors of the Claude client, split by who is at fault.

use std::time::Duration;

/// Why building a [`ClaudeClient`](super::ClaudeClient) failed (our configuration is wrong).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The base URL does not parse or is not http(s).
    #[error("invalid Anthropic base URL {url:?}: {reason}")]
    BaseUrl {
        /// The configured URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// A limit is zero.
    #[error("invalid Claude client setting: {0}")]
    Invalid(&'static str),
    /// The HTTP client could not be created.
    #[error("cannot create the HTTP client: {0}")]
    Http(String),
}

/// Why a Claude request failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ClaudeError {
    /// 401: the key was rejected (the user must fix the key).
    #[error(
        "the Anthropic API rejected the API key (401 authentication_error); check \
         ANTHROPIC_API_KEY or the key file"
    )]
    Auth,
    /// 403: the key may not use this model or feature.
    #[error("the Anthropic API refused the request (403 permission_error): {0}")]
    PermissionDenied(String),
    /// 400 or another 4xx: our request is wrong (a bug here, or a bad setting such as the
    /// model name).
    #[error("the Anthropic API rejected the request ({status}): {message}")]
    BadRequest {
        /// HTTP status.
        status: u16,
        /// The server's message.
        message: String,
    },
    /// 429 on every attempt.
    #[error("rate limited by the Anthropic API; gave up after {attempts} attempts")]
    RateLimited {
        /// Attempts made.
        attempts: u32,
    },
    /// 529 (or an in-stream `overloaded_error`) on every attempt.
    #[error("the Anthropic API is overloaded; gave up after {attempts} attempts")]
    Overloaded {
        /// Attempts made.
        attempts: u32,
    },
    /// 5xx on every attempt.
    #[error("the Anthropic API failed ({status}) on all {attempts} attempts: {message}")]
    Server {
        /// The last HTTP status.
        status: u16,
        /// The server's last message.
        message: String,
        /// Attempts made.
        attempts: u32,
    },
    /// The connection failed or timed out on every attempt.
    #[error("cannot reach the Anthropic API: {0}")]
    Transport(String),
    /// The server sent malformed SSE or JSON.
    #[error("the Anthropic API sent a malformed response: {0}")]
    Protocol(String),
    /// The server reported an error after part of the reply was already delivered, so the
    /// request was not retried.
    #[error("the Anthropic API stream failed mid-reply ({error_type}): {message}")]
    Interrupted {
        /// e.g. `overloaded_error`.
        error_type: String,
        /// The server's message.
        message: String,
    },
    /// The reply hit `max_tokens` in the middle of a tool call.
    #[error("the reply hit max_tokens in the middle of a call to tool {tool}; raise max_tokens")]
    MaxTokens {
        /// The tool whose input was cut off.
        tool: String,
    },
    /// The account is out of credit or quota (402, or a billing error).
    #[error("the Anthropic API refused for quota or billing ({status}): {message}")]
    Quota {
        /// HTTP status.
        status: u16,
        /// The server's message.
        message: String,
    },
    /// An OpenAI-compatible provider failed.
    #[error(transparent)]
    Openai(#[from] crate::agent::openai::OpenAiError),
    /// Every provider of the fallback chain failed (each one's failure, in order).
    #[error("no model provider could answer: {0}")]
    NoProvider(String),
}

impl ClaudeError {
    /// Whether a later retry by the caller may succeed (rate limits, overload, transport).
    pub fn is_transient(&self) -> bool {
        use crate::agent::openai::Failure;
        match self {
            Self::Openai(e) => e.failure() != Failure::Fatal,
            _ => matches!(
                self,
                Self::RateLimited { .. }
                    | Self::Overloaded { .. }
                    | Self::Server { .. }
                    | Self::Transport(_)
                    | Self::Interrupted { .. }
                    | Self::NoProvider(_)
            ),
        }
    }

    /// Whether the next provider of a fallback chain should answer instead: overload, quota
    /// or an unreachable server. Not a rate limit that retries did not fix (the next minute
    /// will), and not our own mistakes (a bad key, a bad request).
    pub fn wants_fallback(&self) -> bool {
        use crate::agent::openai::Failure;
        match self {
            Self::Openai(e) => matches!(
                e.failure(),
                Failure::Overloaded | Failure::Quota | Failure::Unreachable
            ),
            _ => matches!(
                self,
                Self::Overloaded { .. }
                    | Self::Server { .. }
                    | Self::Transport(_)
                    | Self::Quota { .. }
                    | Self::NoProvider(_)
            ),
        }
    }
}

/// A failed attempt, with whether and when it may be retried.
#[derive(Debug)]
pub(crate) struct AttemptError {
    /// The error to report if no retry follows. For retryable errors, the attempt count in
    /// it is filled in by the retry loop.
    pub(crate) error: ClaudeError,
    /// `Some` if the attempt may be retried.
    pub(crate) retry: Option<RetryHint>,
}

/// Why and when to retry.
#[derive(Debug)]
pub(crate) struct RetryHint {
    /// Short reason for the progress event, e.g. `429 rate_limit_error`.
    pub(crate) reason: String,
    /// The server's `retry-after`, if any.
    pub(crate) retry_after: Option<Duration>,
}

impl AttemptError {
    pub(crate) fn fatal(error: ClaudeError) -> Self {
        Self { error, retry: None }
    }

    pub(crate) fn retryable(
        error: ClaudeError,
        reason: impl Into<String>,
        retry_after: Option<Duration>,
    ) -> Self {
        Self {
            error,
            retry: Some(RetryHint {
                reason: reason.into(),
                retry_after,
            }),
        }
    }
}
