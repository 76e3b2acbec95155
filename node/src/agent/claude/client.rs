//! The streaming Messages API client with retries.

use std::time::Duration;

use futures::StreamExt;
use reqwest::header::{HeaderMap, HeaderValue};
use serde::Serialize;
use tracing::{debug, warn};

use super::assemble::{AssembleError, Assembler, Step};
use super::config::{ANTHROPIC_VERSION, ClaudeConfig};
use super::error::{AttemptError, ClaudeError, ConfigError};
use super::sse::{DEFAULT_MAX_EVENT_BYTES, SseParser};
use super::types::{Message, MessagesRequest, Turn};
use crate::agent::tool_choice::{self, Mode};

/// Longest server-requested `retry-after` honoured.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// Largest error body read from a failed response.
const MAX_ERROR_BODY_BYTES: usize = 64 * 1024;

/// Something that happened while a reply streams in.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum StreamEvent {
    /// A piece of reply text.
    TextDelta(String),
    /// The model started a tool call (its input follows and is complete in the [`Turn`]).
    ToolUseStart {
        /// Tool-use id.
        id: String,
        /// Tool name.
        name: String,
    },
    /// An attempt failed and the request will be sent again after `wait`.
    Retrying {
        /// The retry number (1 for the first retry).
        attempt: u32,
        /// How long the client waits before it.
        wait: Duration,
        /// Why, e.g. `429 rate_limit_error`.
        reason: String,
    },
}

/// A Messages API client. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ClaudeClient {
    cfg: ClaudeConfig,
    url: String,
    http: reqwest::Client,
}

#[derive(Serialize)]
struct WireRequest<'a> {
    model: &'a str,
    max_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    system: Option<&'a str>,
    messages: &'a [Message],
    #[serde(skip_serializing_if = "Option::is_none")]
    tools: Option<&'a serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<serde_json::Value>,
    stream: bool,
}

/// Backoff before retry number `retry` (1-based): `base * 2^(retry-1)`, capped at `max`,
/// then scaled into `[1/2, 1]` of itself by `jitter` (a number in `[0, 1)`). A server's
/// `retry-after` replaces the computed delay, capped at [`MAX_RETRY_AFTER`].
pub fn backoff_delay(
    retry: u32,
    base: Duration,
    max: Duration,
    retry_after: Option<Duration>,
    jitter: f64,
) -> Duration {
    if let Some(after) = retry_after {
        return after.min(MAX_RETRY_AFTER);
    }
    let exp = retry.saturating_sub(1).min(30);
    let delay = base.saturating_mul(1u32 << exp).min(max);
    let jitter = jitter.clamp(0.0, 1.0);
    delay.mul_f64(0.5 + 0.5 * jitter)
}

fn parse_retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get("retry-after")?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    v.parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
}

impl ClaudeClient {
    /// Checks the configuration and builds the HTTP client.
    pub fn new(cfg: ClaudeConfig) -> Result<Self, ConfigError> {
        let (base, http) = checked_http_client(
            &cfg.base_url,
            &cfg.model,
            cfg.max_tokens,
            cfg.request_timeout,
        )
        .map_err(|p| match p {
            SetupProblem::BaseUrl(reason) => ConfigError::BaseUrl {
                url: cfg.base_url.clone(),
                reason,
            },
            SetupProblem::Invalid(what) => ConfigError::Invalid(what),
            SetupProblem::Http(e) => ConfigError::Http(e),
        })?;
        let url = format!("{base}/v1/messages");
        Ok(Self { cfg, url, http })
    }

    /// The configuration in use.
    pub fn config(&self) -> &ClaudeConfig {
        &self.cfg
    }

    /// Sends `req` with `stream: true` and returns the assembled reply. Text deltas, tool-use
    /// starts and retries are reported to `on` as they happen. Retries (with backoff and
    /// jitter, honouring `retry-after`) cover 429, 500/502/503/504, 529, connection errors
    /// and in-stream errors that arrive before any content was delivered.
    pub async fn stream(
        &self,
        req: &MessagesRequest,
        on: &mut (dyn FnMut(StreamEvent) + Send),
    ) -> Result<Turn, ClaudeError> {
        let mut tools = req
            .tools
            .as_ref()
            .filter(|t| !(t.is_null() || t.as_array().is_some_and(Vec::is_empty)));
        let forced =
            tools.and_then(|_| tool_choice::forced(self.cfg.tool_choice.as_deref(), &req.messages));
        let only = match (forced, tools) {
            (Some((Some(name), _)), Some(t)) => Some(tool_choice::only_tool(t, name)),
            _ => None,
        };
        if only.is_some() {
            tools = only.as_ref();
        }
        // `schema` is refused for this kind when the provider is configured; as `required`
        // here all the same.
        let tool_choice = forced.map(|(name, mode)| match (name, mode) {
            (Some(name), _) => serde_json::json!({"type": "tool", "name": name}),
            (None, Mode::Required | Mode::Schema) => serde_json::json!({"type": "any"}),
            (None, Mode::None) => serde_json::json!({"type": "none"}),
        });
        let wire = WireRequest {
            model: req.model.as_deref().unwrap_or(&self.cfg.model),
            max_tokens: reply_cap(req.max_tokens, self.cfg.max_tokens),
            system: req.system.as_deref().filter(|s| !s.is_empty()),
            messages: &req.messages,
            tools,
            tool_choice,
            stream: true,
        };
        let encode =
            |e: serde_json::Error| ClaudeError::Protocol(format!("cannot encode request: {e}"));
        let mut wire = serde_json::to_value(&wire).map_err(encode)?;
        if self.cfg.prompt_caching {
            super::cache::add_breakpoints(&mut wire);
        }
        let body = bytes::Bytes::from(serde_json::to_vec(&wire).map_err(encode)?);
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let mut delivered = false;
            let err = match self.attempt(body.clone(), on, &mut delivered).await {
                Ok(turn) => return Ok(turn),
                Err(err) => err,
            };
            let hint = match err.retry {
                Some(hint) if !delivered && attempt <= self.cfg.max_retries => hint,
                _ => return Err(with_attempts(err.error, attempt)),
            };
            let wait = backoff_delay(
                attempt,
                self.cfg.retry_base_delay,
                self.cfg.retry_max_delay,
                hint.retry_after,
                rand::random::<f64>(),
            );
            warn!(
                target: "iom::claude",
                attempt,
                wait_ms = wait.as_millis() as u64,
                reason = %hint.reason,
                "Claude request failed; retrying"
            );
            on(StreamEvent::Retrying {
                attempt,
                wait,
                reason: hint.reason,
            });
            tokio::time::sleep(wait).await;
        }
    }

    async fn attempt(
        &self,
        body: bytes::Bytes,
        on: &mut (dyn FnMut(StreamEvent) + Send),
        delivered: &mut bool,
    ) -> Result<Turn, AttemptError> {
        let timeout = self.cfg.request_timeout;
        let mut key = HeaderValue::from_str(self.cfg.api_key.expose()).map_err(|_| {
            AttemptError::fatal(ClaudeError::Protocol(
                "the API key is not a valid header value".into(),
            ))
        })?;
        key.set_sensitive(true);
        let send = self
            .http
            .post(&self.url)
            .header("x-api-key", key)
            .header("anthropic-version", ANTHROPIC_VERSION)
            .header("content-type", "application/json")
            .header("accept", "text/event-stream")
            .body(body)
            .send();
        let resp = match tokio::time::timeout(timeout, send).await {
            Err(_) => {
                return Err(AttemptError::retryable(
                    ClaudeError::Transport(format!("no response within {timeout:?}")),
                    "timeout",
                    None,
                ));
            }
            Ok(Err(e)) => {
                let msg = describe_reqwest(&e);
                return Err(AttemptError::retryable(
                    ClaudeError::Transport(msg.clone()),
                    format!("connection error: {msg}"),
                    None,
                ));
            }
            Ok(Ok(resp)) => resp,
        };
        let status = resp.status().as_u16();
        debug!(target: "iom::claude", status, "Messages API responded");
        if status != 200 {
            let retry_after = parse_retry_after(resp.headers());
            let (error_type, message) = read_error_body(resp, timeout).await;
            return Err(classify_status(status, error_type, message, retry_after));
        }
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        if content_type.starts_with("application/json") {
            // A 200 that carries an error instead of a stream (some proxies do this).
            let (error_type, message) = read_error_body(resp, timeout).await;
            let status = match error_type.as_str() {
                "overloaded_error" => 529,
                "rate_limit_error" => 429,
                "authentication_error" => 401,
                "api_error" | "unknown_error" => 500,
                _ => 400,
            };
            return Err(classify_status(
                status,
                error_type,
                format!("(in a 200 response) {message}"),
                None,
            ));
        }
        if !content_type.starts_with("text/event-stream") {
            return Err(AttemptError::fatal(ClaudeError::Protocol(format!(
                "expected a text/event-stream response, got content-type {content_type:?}"
            ))));
        }
        let mut parser = SseParser::new(DEFAULT_MAX_EVENT_BYTES);
        let mut assembler = Assembler::default();
        let mut bytes = resp.bytes_stream();
        loop {
            let chunk = match tokio::time::timeout(timeout, bytes.next()).await {
                Err(_) => {
                    return Err(AttemptError::retryable(
                        ClaudeError::Transport(format!("stream stalled for {timeout:?}")),
                        "stream stalled",
                        None,
                    ));
                }
                Ok(None) => {
                    return Err(AttemptError::retryable(
                        ClaudeError::Transport("connection closed before message_stop".into()),
                        "connection closed mid-stream",
                        None,
                    ));
                }
                Ok(Some(Err(e))) => {
                    let msg = describe_reqwest(&e);
                    return Err(AttemptError::retryable(
                        ClaudeError::Transport(msg.clone()),
                        format!("stream error: {msg}"),
                        None,
                    ));
                }
                Ok(Some(Ok(chunk))) => chunk,
            };
            let events = parser
                .push(&chunk)
                .map_err(|e| AttemptError::fatal(ClaudeError::Protocol(e.to_string())))?;
            for ev in &events {
                match assembler.apply(ev) {
                    Ok(Step::Nothing) => {}
                    Ok(Step::Text(text)) => {
                        *delivered = true;
                        on(StreamEvent::TextDelta(text));
                    }
                    Ok(Step::ToolUseStart { id, name }) => {
                        *delivered = true;
                        on(StreamEvent::ToolUseStart { id, name });
                    }
                    Ok(Step::Done(turn)) => return Ok(turn),
                    Err(AssembleError::Api {
                        error_type,
                        message,
                    }) if *delivered => {
                        // Part of the reply is already out; a retry would repeat it.
                        return Err(AttemptError::fatal(ClaudeError::Interrupted {
                            error_type,
                            message,
                        }));
                    }
                    Err(e) => return Err(classify_stream_error(e)),
                }
            }
        }
    }
}

/// Fills the attempt count into errors that carry one.
fn with_attempts(err: ClaudeError, attempts: u32) -> ClaudeError {
    match err {
        ClaudeError::RateLimited { .. } => ClaudeError::RateLimited { attempts },
        ClaudeError::Overloaded { .. } => ClaudeError::Overloaded { attempts },
        ClaudeError::Server {
            status, message, ..
        } => ClaudeError::Server {
            status,
            message,
            attempts,
        },
        ClaudeError::Transport(msg) if attempts > 1 => {
            ClaudeError::Transport(format!("{msg} (after {attempts} attempts)"))
        }
        other => other,
    }
}

/// What is wrong with a model provider's settings; each client words it as its own error.
pub(crate) enum SetupProblem {
    /// The base URL does not parse or is not http(s): why.
    BaseUrl(String),
    /// A setting is unusable.
    Invalid(&'static str),
    /// The HTTP client could not be created.
    Http(String),
}

/// Checks the settings every model provider client needs (an http(s) base URL, a model name,
/// `max_tokens` of at least 1, a non-zero timeout) and builds its HTTP client. Returns the base
/// URL without trailing slashes.
pub(crate) fn checked_http_client<'a>(
    base_url: &'a str,
    model: &str,
    max_tokens: u32,
    request_timeout: Duration,
) -> Result<(&'a str, reqwest::Client), SetupProblem> {
    let base = base_url.trim_end_matches('/');
    let parsed = reqwest::Url::parse(base).map_err(|e| SetupProblem::BaseUrl(e.to_string()))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(SetupProblem::BaseUrl(
            "the scheme must be http or https".into(),
        ));
    }
    if max_tokens == 0 {
        return Err(SetupProblem::Invalid("max_tokens must be at least 1"));
    }
    if model.trim().is_empty() {
        return Err(SetupProblem::Invalid("the model name is empty"));
    }
    if request_timeout.is_zero() {
        return Err(SetupProblem::Invalid("request_timeout must not be zero"));
    }
    let http = reqwest::Client::builder()
        .connect_timeout(request_timeout.min(Duration::from_secs(30)))
        .user_agent(concat!("iom/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| SetupProblem::Http(e.to_string()))?;
    Ok((base, http))
}

/// A reqwest error with its chain of causes.
pub(crate) fn describe_reqwest(e: &reqwest::Error) -> String {
    use std::error::Error as _;
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

async fn read_error_body(resp: reqwest::Response, timeout: Duration) -> (String, String) {
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while body.len() < MAX_ERROR_BODY_BYTES {
        match tokio::time::timeout(timeout, stream.next()).await {
            Ok(Some(Ok(chunk))) => body.extend_from_slice(&chunk),
            _ => break,
        }
    }
    body.truncate(MAX_ERROR_BODY_BYTES);
    let parsed: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
    let err = parsed.as_ref().and_then(|v| v.get("error"));
    let error_type = err
        .and_then(|e| e.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("unknown_error")
        .to_owned();
    let message = err
        .and_then(|e| e.get("message"))
        .and_then(|m| m.as_str())
        .map(str::to_owned)
        .unwrap_or_else(|| {
            let text = String::from_utf8_lossy(&body);
            text.chars().take(300).collect()
        });
    (error_type, message)
}

fn classify_status(
    status: u16,
    error_type: String,
    message: String,
    retry_after: Option<Duration>,
) -> AttemptError {
    let reason = format!("{status} {error_type}");
    if is_quota(status, &error_type, &message) {
        return AttemptError::fatal(ClaudeError::Quota { status, message });
    }
    match status {
        401 => AttemptError::fatal(ClaudeError::Auth),
        403 => AttemptError::fatal(ClaudeError::PermissionDenied(message)),
        429 => AttemptError::retryable(
            ClaudeError::RateLimited { attempts: 0 },
            reason,
            retry_after,
        ),
        529 => {
            AttemptError::retryable(ClaudeError::Overloaded { attempts: 0 }, reason, retry_after)
        }
        500 | 502 | 503 | 504 => AttemptError::retryable(
            ClaudeError::Server {
                status,
                message,
                attempts: 0,
            },
            reason,
            retry_after,
        ),
        _ => AttemptError::fatal(ClaudeError::BadRequest {
            status,
            message: format!("{error_type}: {message}"),
        }),
    }
}

/// Whether a refusal is about credit or quota (which a fallback provider can answer) rather
/// than the request itself.
pub(crate) fn is_quota(status: u16, error_type: &str, message: &str) -> bool {
    if status == 402 {
        return true;
    }
    let text = format!("{error_type} {message}").to_ascii_lowercase();
    matches!(status, 400 | 403 | 429)
        && ["credit balance", "insufficient_quota", "quota", "billing"]
            .iter()
            .any(|w| text.contains(w))
}

/// The `max_tokens` of one call: the request's (the runner's, which compaction may lower),
/// never above the provider's own (`iom models add --max-tokens`: a small local model's cap).
pub(crate) fn reply_cap(requested: Option<u32>, provider: u32) -> u32 {
    requested.map_or(provider, |r| r.min(provider))
}

fn classify_stream_error(e: AssembleError) -> AttemptError {
    match e {
        AssembleError::Protocol(msg) => AttemptError::fatal(ClaudeError::Protocol(msg)),
        AssembleError::TruncatedToolInput { name } => {
            AttemptError::fatal(ClaudeError::MaxTokens { tool: name })
        }
        AssembleError::Api {
            error_type,
            message,
        } => {
            let reason = format!("stream {error_type}");
            let retry = |error| AttemptError::retryable(error, reason.clone(), None);
            match error_type.as_str() {
                "overloaded_error" => retry(ClaudeError::Overloaded { attempts: 0 }),
                "rate_limit_error" => retry(ClaudeError::RateLimited { attempts: 0 }),
                "api_error" => retry(ClaudeError::Server {
                    status: 500,
                    message,
                    attempts: 0,
                }),
                "authentication_error" => AttemptError::fatal(ClaudeError::Auth),
                _ => AttemptError::fatal(ClaudeError::Interrupted {
                    error_type,
                    message,
                }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_caps_and_honours_retry_after() {
        let base = Duration::from_millis(500);
        let max = Duration::from_secs(60);
        assert_eq!(
            backoff_delay(1, base, max, None, 1.0),
            Duration::from_millis(500)
        );
        assert_eq!(
            backoff_delay(1, base, max, None, 0.0),
            Duration::from_millis(250)
        );
        assert_eq!(
            backoff_delay(3, base, max, None, 0.0),
            Duration::from_secs(1)
        );
        assert_eq!(
            backoff_delay(40, base, max, None, 0.0),
            Duration::from_secs(30)
        );
        assert_eq!(
            backoff_delay(1, base, max, Some(Duration::from_secs(7)), 0.5),
            Duration::from_secs(7)
        );
        assert_eq!(
            backoff_delay(1, base, max, Some(Duration::from_secs(3600)), 0.5),
            MAX_RETRY_AFTER
        );
        // retry-after is honoured even when it exceeds the backoff cap.
        assert_eq!(
            backoff_delay(
                1,
                base,
                Duration::from_millis(100),
                Some(Duration::from_secs(2)),
                0.5
            ),
            Duration::from_secs(2)
        );
    }

    #[test]
    fn retry_after_header_parses_seconds() {
        let mut h = HeaderMap::new();
        assert_eq!(parse_retry_after(&h), None);
        h.insert("retry-after", HeaderValue::from_static("3"));
        assert_eq!(parse_retry_after(&h), Some(Duration::from_secs(3)));
        h.insert(
            "retry-after",
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(parse_retry_after(&h), None);
    }

    #[test]
    fn statuses_are_classified_by_blame() {
        let e = classify_status(401, "authentication_error".into(), "bad key".into(), None);
        assert!(e.retry.is_none());
        assert_eq!(e.error, ClaudeError::Auth);
        let e = classify_status(400, "invalid_request_error".into(), "no".into(), None);
        assert!(e.retry.is_none());
        let e = classify_status(529, "overloaded_error".into(), "busy".into(), None);
        assert!(e.retry.is_some());
        let e = classify_status(
            429,
            "rate_limit_error".into(),
            "slow".into(),
            Some(Duration::from_secs(1)),
        );
        assert_eq!(
            e.retry.and_then(|r| r.retry_after),
            Some(Duration::from_secs(1))
        );
    }
}
