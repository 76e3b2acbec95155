//! The streaming chat completions client with retries.

use std::time::Duration;

use futures::StreamExt;
use reqwest::header::HeaderValue;
use tracing::{debug, warn};

use super::error::OpenAiError;
use super::stream::{Assembler, Step, StreamError, whole};
use super::wire::{WireOptions, request};
use crate::agent::claude::client::{
    SetupProblem, checked_http_client, describe_reqwest as describe, is_quota,
};
use crate::agent::claude::sse::{DEFAULT_MAX_EVENT_BYTES, SseParser};
use crate::agent::claude::{
    ApiKey, ClaudeError, ContentBlock, MessagesRequest, StreamEvent, Turn, backoff_delay,
};
use crate::agent::tool_choice;

/// Largest error body read from a failed response.
const MAX_ERROR_BODY_BYTES: usize = 64 * 1024;
/// Largest non-streamed response body read.
const MAX_WHOLE_BODY_BYTES: usize = 32 * 1024 * 1024;

/// Settings of an [`OpenAiClient`].
#[derive(Debug, Clone)]
pub struct OpenAiConfig {
    /// Base URL (`http://127.0.0.1:8080`, with or without `/v1`).
    pub base_url: String,
    /// Model name.
    pub model: String,
    /// `max_tokens` when the request does not set it.
    pub max_tokens: u32,
    /// Sent as `Authorization: Bearer`; local servers need none.
    pub api_key: Option<ApiKey>,
    /// Retries after the first attempt (429, 5xx, connection errors, broken streams).
    pub max_retries: u32,
    /// Longest wait for the response headers, and for each piece of the stream after that.
    pub request_timeout: Duration,
    /// First backoff delay; doubles per retry (with jitter).
    pub retry_base_delay: Duration,
    /// Largest computed backoff delay.
    pub retry_max_delay: Duration,
    /// The provider's `tool_choice` setting.
    pub tool_choice: Option<String>,
}

impl OpenAiConfig {
    /// Defaults: no key, 4 retries, 120 s timeout, backoff from 500 ms up to 60 s.
    pub fn new(base_url: impl Into<String>, model: impl Into<String>, max_tokens: u32) -> Self {
        Self {
            base_url: base_url.into(),
            model: model.into(),
            max_tokens,
            api_key: None,
            max_retries: 4,
            request_timeout: Duration::from_secs(120),
            retry_base_delay: Duration::from_millis(500),
            retry_max_delay: Duration::from_secs(60),
            tool_choice: None,
        }
    }
}

/// An OpenAI-compatible chat completions client. Cheap to clone.
#[derive(Debug, Clone)]
pub struct OpenAiClient {
    cfg: OpenAiConfig,
    url: String,
    http: reqwest::Client,
}

/// A failed attempt, and whether (and when) to retry it.
struct Attempt {
    error: OpenAiError,
    retry: Option<(String, Option<Duration>)>,
}

impl Attempt {
    fn fatal(error: OpenAiError) -> Self {
        Self { error, retry: None }
    }

    fn retry(error: OpenAiError, reason: impl Into<String>, after: Option<Duration>) -> Self {
        Self {
            error,
            retry: Some((reason.into(), after)),
        }
    }
}

/// Why an [`OpenAiClient`] cannot be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenAiConfigError {
    /// The base URL does not parse or is not http(s).
    #[error("invalid base URL {url:?}: {reason}")]
    BaseUrl {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// A setting is unusable.
    #[error("invalid model client setting: {0}")]
    Invalid(&'static str),
    /// The HTTP client could not be created.
    #[error("cannot create the HTTP client: {0}")]
    Http(String),
}

impl OpenAiClient {
    /// Checks the configuration and builds the HTTP client.
    pub fn new(cfg: OpenAiConfig) -> Result<Self, OpenAiConfigError> {
        let (base, http) = checked_http_client(
            &cfg.base_url,
            &cfg.model,
            cfg.max_tokens,
            cfg.request_timeout,
        )
        .map_err(|p| match p {
            SetupProblem::BaseUrl(reason) => OpenAiConfigError::BaseUrl {
                url: cfg.base_url.clone(),
                reason,
            },
            SetupProblem::Invalid(what) => OpenAiConfigError::Invalid(what),
            SetupProblem::Http(e) => OpenAiConfigError::Http(e),
        })?;
        let url = if base.ends_with("/v1") {
            format!("{base}/chat/completions")
        } else {
            format!("{base}/v1/chat/completions")
        };
        Ok(Self { cfg, url, http })
    }

    /// The endpoint.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The model it asks for.
    pub fn model(&self) -> &str {
        &self.cfg.model
    }

    /// Sends `req` and returns the assembled reply; text deltas, tool-call starts and retries
    /// are reported to `on`. Retries (backoff with jitter, `retry-after` honoured) cover 429,
    /// 5xx, connection errors, stalled or truncated streams and errors inside a stream, as long
    /// as nothing of the reply was delivered yet.
    pub async fn stream(
        &self,
        req: &MessagesRequest,
        on: &mut (dyn FnMut(StreamEvent) + Send),
    ) -> Result<Turn, ClaudeError> {
        let (body, by_schema) = request(
            req,
            WireOptions {
                model: &self.cfg.model,
                max_tokens: self.cfg.max_tokens,
                tool_choice: self.cfg.tool_choice.as_deref(),
            },
        );
        // A call forced by schema writes the call as text: that text is not the answer.
        let mut on = |ev: StreamEvent| {
            if by_schema.is_none() || !matches!(ev, StreamEvent::TextDelta(_)) {
                on(ev)
            }
        };
        let body = bytes::Bytes::from(body.to_string());
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let mut delivered = false;
            let err = match self.attempt(body.clone(), &mut on, &mut delivered).await {
                Ok(turn) => return self.forced_call(turn, by_schema.as_deref(), &mut on),
                Err(err) => err,
            };
            let (reason, after) = match err.retry {
                Some(hint) if !delivered && attempt <= self.cfg.max_retries => hint,
                _ => return Err(self.with_attempts(err.error, attempt).into()),
            };
            let wait = backoff_delay(
                attempt,
                self.cfg.retry_base_delay,
                self.cfg.retry_max_delay,
                after,
                rand::random::<f64>(),
            );
            warn!(
                target: "iom::openai",
                attempt,
                wait_ms = wait.as_millis() as u64,
                reason = %reason,
                "chat completion failed; retrying"
            );
            on(StreamEvent::Retrying {
                attempt,
                wait,
                reason,
            });
            tokio::time::sleep(wait).await;
        }
    }

    /// The reply as is, or, for a call forced by schema, as the call to one of `offered`.
    fn forced_call(
        &self,
        turn: Turn,
        offered: Option<&[String]>,
        on: &mut (dyn FnMut(StreamEvent) + Send),
    ) -> Result<Turn, ClaudeError> {
        let Some(offered) = offered else {
            return Ok(turn);
        };
        let call = tool_choice::call_from_reply(turn, offered).map_err(|e| {
            ClaudeError::from(OpenAiError::Protocol {
                url: self.url.clone(),
                message: e.to_string(),
            })
        })?;
        for block in &call.content {
            if let ContentBlock::ToolUse { id, name, .. } = block {
                on(StreamEvent::ToolUseStart {
                    id: id.clone(),
                    name: name.clone(),
                });
            }
        }
        Ok(call)
    }

    fn with_attempts(&self, err: OpenAiError, attempts: u32) -> OpenAiError {
        match err {
            OpenAiError::RateLimited { url, .. } => OpenAiError::RateLimited { url, attempts },
            OpenAiError::Server {
                url,
                status,
                message,
                ..
            } => OpenAiError::Server {
                url,
                status,
                message,
                attempts,
            },
            OpenAiError::Transport { url, message } if attempts > 1 => OpenAiError::Transport {
                url,
                message: format!("{message} (after {attempts} attempts)"),
            },
            other => other,
        }
    }

    fn transport(&self, message: impl Into<String>) -> OpenAiError {
        OpenAiError::Transport {
            url: self.url.clone(),
            message: message.into(),
        }
    }

    async fn attempt(
        &self,
        body: bytes::Bytes,
        on: &mut (dyn FnMut(StreamEvent) + Send),
        delivered: &mut bool,
    ) -> Result<Turn, Attempt> {
        let timeout = self.cfg.request_timeout;
        let mut send = self
            .http
            .post(&self.url)
            .header("content-type", "application/json")
            .header("accept", "text/event-stream")
            .body(body);
        if let Some(key) = &self.cfg.api_key {
            let mut v = HeaderValue::from_str(&format!("Bearer {}", key.expose()))
                .map_err(|_| Attempt::fatal(self.transport("the key is not a header value")))?;
            v.set_sensitive(true);
            send = send.header("authorization", v);
        }
        let resp = match tokio::time::timeout(timeout, send.send()).await {
            Err(_) => {
                return Err(Attempt::retry(
                    self.transport(format!("no response within {timeout:?}")),
                    "timeout",
                    None,
                ));
            }
            Ok(Err(e)) => {
                let msg = describe(&e);
                return Err(Attempt::retry(
                    self.transport(msg.clone()),
                    format!("connection error: {msg}"),
                    None,
                ));
            }
            Ok(Ok(resp)) => resp,
        };
        let status = resp.status().as_u16();
        debug!(target: "iom::openai", status, "chat completions responded");
        if status != 200 {
            let after = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let body = read_body(resp, timeout, MAX_ERROR_BODY_BYTES).await;
            let (kind, message) = error_of(&body);
            return Err(self.classify(status, &kind, message, after));
        }
        let is_stream = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|c| c.starts_with("text/event-stream"));
        if !is_stream {
            // A server that ignored `stream: true`, or a 200 with an error body.
            let body = read_body(resp, timeout, MAX_WHOLE_BODY_BYTES).await;
            return match whole(&body) {
                Ok((steps, turn)) => {
                    for s in steps {
                        self.report(s, on, delivered);
                    }
                    Ok(turn)
                }
                Err(e) => Err(self.stream_error(e, false)),
            };
        }
        let mut parser = SseParser::new(DEFAULT_MAX_EVENT_BYTES);
        let mut assembler = Assembler::default();
        let mut bytes = resp.bytes_stream();
        loop {
            let chunk = match tokio::time::timeout(timeout, bytes.next()).await {
                Err(_) => {
                    return Err(Attempt::retry(
                        self.transport(format!("the stream stalled for {timeout:?}")),
                        "stream stalled",
                        None,
                    ));
                }
                Ok(None) => {
                    return assembler
                        .finish()
                        .map_err(|e| self.stream_error(e, *delivered));
                }
                Ok(Some(Err(e))) => {
                    let msg = describe(&e);
                    return Err(Attempt::retry(
                        self.transport(format!("stream error: {msg}")),
                        format!("stream error: {msg}"),
                        None,
                    ));
                }
                Ok(Some(Ok(chunk))) => chunk,
            };
            let events = parser.push(&chunk).map_err(|e| {
                Attempt::fatal(OpenAiError::Protocol {
                    url: self.url.clone(),
                    message: e.to_string(),
                })
            })?;
            for ev in events {
                let steps = assembler
                    .apply(&ev.data)
                    .map_err(|e| self.stream_error(e, *delivered))?;
                for s in steps {
                    self.report(s, on, delivered);
                }
                if assembler.is_done() {
                    return assembler
                        .finish()
                        .map_err(|e| self.stream_error(e, *delivered));
                }
            }
        }
    }

    fn report(&self, step: Step, on: &mut (dyn FnMut(StreamEvent) + Send), delivered: &mut bool) {
        *delivered = true;
        on(match step {
            Step::Text(t) => StreamEvent::TextDelta(t),
            Step::ToolUseStart { id, name } => StreamEvent::ToolUseStart { id, name },
        });
    }

    fn stream_error(&self, e: StreamError, delivered: bool) -> Attempt {
        let url = self.url.clone();
        match e {
            StreamError::Protocol(message) => {
                Attempt::fatal(OpenAiError::Protocol { url, message })
            }
            StreamError::Truncated if delivered => Attempt::fatal(OpenAiError::Interrupted {
                url,
                message: "the stream ended before the reply was complete".into(),
            }),
            StreamError::Truncated => Attempt::retry(
                self.transport("the connection closed before the reply was complete"),
                "connection closed mid-stream",
                None,
            ),
            StreamError::Api { message, .. } if delivered => {
                Attempt::fatal(OpenAiError::Interrupted { url, message })
            }
            StreamError::Api { kind, message } => {
                if is_quota(429, &kind, &message) {
                    return Attempt::fatal(OpenAiError::Quota { url, message });
                }
                let reason = format!("error in the response: {kind}");
                Attempt::retry(
                    OpenAiError::Server {
                        url,
                        status: 200,
                        message,
                        attempts: 0,
                    },
                    reason,
                    None,
                )
            }
        }
    }

    fn classify(
        &self,
        status: u16,
        kind: &str,
        message: String,
        after: Option<Duration>,
    ) -> Attempt {
        let url = self.url.clone();
        let reason = format!("{status} {kind}");
        if is_quota(status, kind, &message) {
            return Attempt::fatal(OpenAiError::Quota { url, message });
        }
        match status {
            401 | 403 => Attempt::fatal(OpenAiError::Auth {
                url,
                status,
                message,
            }),
            429 => Attempt::retry(OpenAiError::RateLimited { url, attempts: 0 }, reason, after),
            408 => Attempt::retry(self.transport("408 request timeout"), reason, after),
            500..=599 => Attempt::retry(
                OpenAiError::Server {
                    url,
                    status,
                    message,
                    attempts: 0,
                },
                reason,
                after,
            ),
            _ => Attempt::fatal(OpenAiError::BadRequest {
                url,
                status,
                message,
            }),
        }
    }
}

async fn read_body(resp: reqwest::Response, timeout: Duration, max: usize) -> Vec<u8> {
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while body.len() < max {
        match tokio::time::timeout(timeout, stream.next()).await {
            Ok(Some(Ok(chunk))) => body.extend_from_slice(&chunk),
            _ => break,
        }
    }
    body.truncate(max);
    body
}

/// The `(type or code, message)` of an error body, leniently.
fn error_of(body: &[u8]) -> (String, String) {
    let parsed: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let err = parsed.as_ref().and_then(|v| v.get("error"));
    let kind = err
        .and_then(|e| e.get("type").or_else(|| e.get("code")))
        .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
        .unwrap_or_else(|| "error".into());
    let message = err
        .and_then(|e| {
            e.get("message")
                .and_then(|m| m.as_str())
                .or_else(|| e.as_str())
        })
        .map(str::to_owned)
        .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(300).collect());
    (kind, message)
}
