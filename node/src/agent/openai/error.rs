//! Errors of the OpenAI-compatible client, split by who is at fault, with what a caller may
//! do about them ([`Failure`]).

/// What a failure means for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Our request or setting is wrong (fix it; another provider would not help).
    Fatal,
    /// A per-minute rate limit, still hit after the retries (wait and ask again).
    RateLimited,
    /// The server is overloaded or failing (5xx); another provider can answer.
    Overloaded,
    /// The account is out of quota or credit; another provider can answer.
    Quota,
    /// The server cannot be reached or the stream broke; another provider can answer.
    Unreachable,
}

/// Why a request to an OpenAI-compatible server failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OpenAiError {
    /// 401/403: the key was rejected.
    #[error("the model server at {url} refused the key ({status}): {message}")]
    Auth {
        /// The endpoint.
        url: String,
        /// HTTP status.
        status: u16,
        /// The server's message.
        message: String,
    },
    /// Another 4xx: the request is wrong (a bad model name, too long a prompt, ...).
    #[error("the model server at {url} rejected the request ({status}): {message}")]
    BadRequest {
        /// The endpoint.
        url: String,
        /// HTTP status.
        status: u16,
        /// The server's message.
        message: String,
    },
    /// 429 on every attempt.
    #[error("rate limited by the model server at {url}; gave up after {attempts} attempts")]
    RateLimited {
        /// The endpoint.
        url: String,
        /// Attempts made.
        attempts: u32,
    },
    /// Out of quota or credit (`insufficient_quota`, 402).
    #[error("the model server at {url} refused for quota or billing: {message}")]
    Quota {
        /// The endpoint.
        url: String,
        /// The server's message.
        message: String,
    },
    /// 5xx (or 529) on every attempt, or an error reported in the stream.
    #[error("the model server at {url} failed ({status}) on all {attempts} attempts: {message}")]
    Server {
        /// The endpoint.
        url: String,
        /// The last HTTP status (200 for an error inside a stream).
        status: u16,
        /// The server's message.
        message: String,
        /// Attempts made.
        attempts: u32,
    },
    /// The connection failed, timed out, or the stream stopped early, on every attempt.
    #[error("cannot reach the model server at {url}: {message}")]
    Transport {
        /// The endpoint.
        url: String,
        /// What happened.
        message: String,
    },
    /// The server sent something that is not a chat completion.
    #[error("the model server at {url} sent a malformed response: {message}")]
    Protocol {
        /// The endpoint.
        url: String,
        /// What is wrong.
        message: String,
    },
    /// The stream failed after part of the reply was delivered, so it was not retried.
    #[error("the model server at {url} failed mid-reply: {message}")]
    Interrupted {
        /// The endpoint.
        url: String,
        /// What happened.
        message: String,
    },
}

impl OpenAiError {
    /// What the failure means for the caller.
    pub fn failure(&self) -> Failure {
        match self {
            Self::Auth { .. } | Self::BadRequest { .. } | Self::Protocol { .. } => Failure::Fatal,
            Self::RateLimited { .. } => Failure::RateLimited,
            Self::Quota { .. } => Failure::Quota,
            Self::Server { .. } => Failure::Overloaded,
            Self::Transport { .. } | Self::Interrupted { .. } => Failure::Unreachable,
        }
    }
}
