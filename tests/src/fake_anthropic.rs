//! A fake Anthropic Messages API server for tests and benchmarks.
//!
//! It speaks the real wire format over real HTTP: `POST /v1/messages` with `x-api-key` and
//! `anthropic-version`, answered by a chunked `text/event-stream` of `message_start`, `ping`,
//! `content_block_start` / `content_block_delta` / `content_block_stop`, `message_delta` and
//! `message_stop` events, or by JSON errors (`{"type":"error","error":{...}}`) with the real
//! status codes (429 with `retry-after`, 529, 500, 401, 400).
//!
//! What it answers:
//! 1. Scripted responses pushed with [`FakeAnthropic::push_script`] come first, one per request
//!    ([`Scripted::Delay`] items delay the response that follows them).
//! 2. Otherwise a deterministic echo model: if the newest user text holds directives
//!    `[[tool NAME JSON]]` that are not yet answered by `tool_result`s, it asks for the next
//!    one as a `tool_use`; otherwise it replies `echo: <that text>`, plus
//!    `\ntool results: <r1> | <r2>` when the last message carried tool results.
//!
//! A request whose system prompt asks to summarize a conversation (it contains "summarize
//! the conversation") is answered `summary: ` and the first 120 characters of its last user
//! message (after its first blank line), so compaction gets a short summary.
//!
//! Usage is deterministic: `input_tokens` = request body bytes / 4, `output_tokens` = reply
//! bytes / 4 (or [`Scripted::TextWithUsage`]'s figure). Requests are checked like the real
//! API does where it matters for a client: the key, the version header, the body shape, the
//! `tool_use` / `tool_result` pairing and the prompt-caching breakpoints (at most 4
//! `cache_control` markers, each `{"type": "ephemeral"}` with an optional `ttl` of `5m` or
//! `1h`, only on tool definitions, system text blocks and message blocks of the types
//! `text`, `image`, `document`, `tool_use`, `tool_result`, never on empty text).
//!
//! **Prompt caching**: the prefix up to each breakpoint (tools, then system, then messages,
//! with the markers taken out) is remembered. The input of a request is then split the way
//! the API reports it: the longest remembered prefix is a cache read
//! (`cache_read_input_tokens` = its bytes / 4), the rest up to the last breakpoint a cache
//! write (`cache_creation_input_tokens`), and what follows `input_tokens`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Most requests kept for [`FakeAnthropic::requests`]; older ones are dropped.
const MAX_RECORDED: usize = 10_000;
/// Pause between stream chunks unless [`FakeConfig::instant`] is set.
const CHUNK_DELAY: Duration = Duration::from_millis(5);
/// Characters per `text_delta` / `input_json_delta`.
const DELTA_CHARS: usize = 8;

/// Settings of the fake server.
#[derive(Debug, Clone)]
pub struct FakeConfig {
    /// The only API key accepted in `x-api-key`.
    pub api_key: String,
    /// Answer at once: whole stream in one chunk, no pauses (for benchmarks).
    pub instant: bool,
    /// Where to listen; port 0 picks a free port.
    pub addr: SocketAddr,
}

impl Default for FakeConfig {
    /// Key `sk-ant-fake-test-key`, streaming with pauses, `127.0.0.1:0`.
    fn default() -> Self {
        Self {
            api_key: "sk-ant-fake-test-key".to_owned(),
            instant: false,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        }
    }
}

/// One scripted response.
#[derive(Debug, Clone, PartialEq)]
pub enum Scripted {
    /// An HTTP error with the body the real API sends for that status.
    Status {
        /// 400, 401, 403, 429, 500, 529, ...
        code: u16,
        /// Value of the `retry-after` header, in seconds.
        retry_after: Option<u64>,
    },
    /// A streamed text reply.
    Text(String),
    /// A streamed text reply that reports this usage, whatever the sizes (no cache figures).
    TextWithUsage {
        /// The text.
        text: String,
        /// Input tokens reported.
        input_tokens: u64,
        /// Output tokens reported.
        output_tokens: u64,
    },
    /// A streamed `tool_use` reply (stop reason `tool_use`).
    ToolUse {
        /// Tool name.
        name: String,
        /// Tool input.
        input: Value,
    },
    /// A stream that starts, then sends an `error` event of this type (e.g.
    /// `overloaded_error`) before any content.
    StreamError(String),
    /// A stream that delivers some text, then fails with an `error` event.
    StreamErrorAfterText {
        /// Text delivered first.
        text: String,
        /// Error type of the `error` event.
        error_type: String,
    },
    /// A stream that starts correctly and then sends data that is not JSON.
    Garbage,
    /// A stream that starts (`message_start`, `ping`) and then closes, with no content and
    /// no `message_stop`.
    Truncated,
    /// A stream that starts and then sends nothing more (for this long), holding the
    /// connection open.
    Hang(Duration),
    /// A 200 response whose JSON body is an error of this type instead of a stream.
    ErrorIn200(String),
    /// A streamed text reply that ends with this (unknown) stop reason.
    OddStop {
        /// The text.
        text: String,
        /// The stop reason sent.
        stop_reason: String,
    },
    /// A `tool_use` whose input JSON is cut off (not valid JSON) at `message_stop`.
    BadToolJson,
    /// Wait this long before answering with the next item (or the echo model).
    Delay(Duration),
}

/// A request as the server received it.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedRequest {
    /// Headers, names in lower case, in arrival order.
    pub headers: Vec<(String, String)>,
    /// The body as JSON (a JSON string holding the raw text if it did not parse).
    pub body: Value,
    /// The body's size in bytes (the fake counts `bytes / 4` input tokens).
    pub bytes: usize,
}

impl RecordedRequest {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// All `tool_result` blocks in the request, as `(tool_use_id, content, is_error)`.
    pub fn tool_results(&self) -> Vec<(String, String, bool)> {
        self.body["messages"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["content"].as_array())
            .flatten()
            .filter(|b| b["type"] == "tool_result")
            .map(|b| {
                (
                    b["tool_use_id"].as_str().unwrap_or_default().to_owned(),
                    b["content"].as_str().unwrap_or_default().to_owned(),
                    b["is_error"].as_bool().unwrap_or(false),
                )
            })
            .collect()
    }
}

#[derive(Debug, Default)]
struct Inner {
    script: VecDeque<Scripted>,
    requests: VecDeque<RecordedRequest>,
    next_id: u64,
    /// Prefixes seen at breakpoints (prompt caching), as hashes.
    cached: std::collections::HashSet<u64>,
}

#[derive(Debug)]
struct Shared {
    cfg: FakeConfig,
    inner: Mutex<Inner>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn next_id(&self, prefix: &str) -> String {
        let mut inner = self.lock();
        inner.next_id += 1;
        format!("{prefix}_fake_{:06}", inner.next_id)
    }
}

/// A running fake server. Dropping it stops the server.
#[derive(Debug)]
pub struct FakeAnthropic {
    url: String,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl FakeAnthropic {
    /// Binds `cfg.addr` and starts serving.
    pub async fn start(cfg: FakeConfig) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(cfg.addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            cfg,
            inner: Mutex::new(Inner::default()),
        });
        let app = Router::new()
            .route("/v1/messages", post(messages))
            .fallback(|| async { error_response(404, "not_found_error", "Not found", None) })
            .with_state(shared.clone());
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await
        });
        Ok(Self {
            url: format!("http://{addr}"),
            shared,
            shutdown: Some(tx),
            task: Some(task),
        })
    }

    /// The base URL (`http://127.0.0.1:PORT`), to use as `ANTHROPIC_BASE_URL`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The API key the server accepts.
    pub fn api_key(&self) -> &str {
        &self.shared.cfg.api_key
    }

    /// The environment that points a node at this server.
    pub fn node_env(&self) -> [(&'static str, &str); 2] {
        [
            ("ANTHROPIC_API_KEY", self.api_key()),
            ("ANTHROPIC_BASE_URL", self.url()),
        ]
    }

    /// Every request received so far (also rejected ones), oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().requests.iter().cloned().collect()
    }

    /// Queues a scripted response.
    pub fn push_script(&self, item: Scripted) {
        self.shared.lock().script.push_back(item);
    }

    /// Queues several scripted responses, in order.
    pub fn push_scripts(&self, items: impl IntoIterator<Item = Scripted>) {
        self.shared.lock().script.extend(items);
    }

    /// Stops the server and waits (up to 5 s) for open connections to finish.
    pub async fn shutdown(mut self) -> std::io::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let Some(mut task) = self.task.take() else {
            return Ok(());
        };
        match tokio::time::timeout(Duration::from_secs(5), &mut task).await {
            Ok(Ok(result)) => result,
            Ok(Err(join)) => Err(std::io::Error::other(join)),
            Err(_) => {
                task.abort();
                Ok(())
            }
        }
    }
}

impl Drop for FakeAnthropic {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

fn error_type_for(code: u16) -> &'static str {
    match code {
        400 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        _ => "api_error",
    }
}

fn error_response(
    code: u16,
    error_type: &str,
    message: &str,
    retry_after: Option<u64>,
) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = json!({"type": "error", "error": {"type": error_type, "message": message}});
    let mut resp = (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response();
    if let Some(secs) = retry_after {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
    }
    resp
}

async fn messages(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let parsed: Option<Value> = serde_json::from_slice(&body).ok();
    let recorded = RecordedRequest {
        headers: headers
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: parsed
            .clone()
            .unwrap_or_else(|| Value::String(String::from_utf8_lossy(&body).into_owned())),
        bytes: body.len(),
    };
    {
        let mut inner = shared.lock();
        if inner.requests.len() >= MAX_RECORDED {
            inner.requests.pop_front();
        }
        inner.requests.push_back(recorded);
    }

    let key_ok = headers
        .get("x-api-key")
        .is_some_and(|k| k.as_bytes() == shared.cfg.api_key.as_bytes());
    if !key_ok {
        return error_response(401, "authentication_error", "invalid x-api-key", None);
    }
    if headers.get("anthropic-version").is_none() {
        return error_response(
            400,
            "invalid_request_error",
            "anthropic-version: header is required",
            None,
        );
    }
    let Some(req) = parsed else {
        return error_response(
            400,
            "invalid_request_error",
            "request body is not valid JSON",
            None,
        );
    };
    if let Err(msg) = validate(&req) {
        return error_response(400, "invalid_request_error", &msg, None);
    }
    if req["stream"] != Value::Bool(true) {
        return error_response(
            400,
            "invalid_request_error",
            "this fake server only implements stream: true",
            None,
        );
    }

    let item = loop {
        let next = shared.lock().script.pop_front();
        match next {
            Some(Scripted::Delay(d)) => tokio::time::sleep(d).await,
            other => break other,
        }
    };
    let mut cache = cache_usage(&req, body.len(), &mut shared.lock().cached);
    let max_tokens = req["max_tokens"].as_u64().unwrap_or(u64::MAX);
    let model = req["model"].as_str().unwrap_or_default().to_owned();
    let start = message_start(&shared.next_id("msg"), &model, cache);
    let events = match item {
        Some(Scripted::Status { code, retry_after }) => {
            let msg = match code {
                429 => "Number of request tokens has exceeded your per-minute rate limit",
                529 => "Overloaded",
                401 => "invalid x-api-key",
                _ => "Internal server error",
            };
            return error_response(code, error_type_for(code), msg, retry_after);
        }
        Some(Scripted::Text(text)) => reply_events(start, Reply::Text(text), max_tokens, &shared),
        Some(Scripted::TextWithUsage {
            text,
            input_tokens,
            output_tokens,
        }) => {
            cache = InputUsage {
                input_tokens,
                ..InputUsage::default()
            };
            let start = message_start(&shared.next_id("msg"), &model, cache);
            reply_events(
                start,
                Reply::TextUsage(text, output_tokens),
                max_tokens,
                &shared,
            )
        }
        Some(Scripted::ToolUse { name, input }) => {
            reply_events(start, Reply::ToolUse { name, input }, max_tokens, &shared)
        }
        Some(Scripted::StreamError(error_type)) => {
            vec![
                start,
                event("ping", json!({"type": "ping"})),
                error_event(&error_type),
            ]
        }
        Some(Scripted::StreamErrorAfterText { text, error_type }) => {
            let mut evs = vec![start];
            evs.extend(text_block_events(0, &text));
            evs.push(error_event(&error_type));
            evs
        }
        Some(Scripted::Garbage) => vec![
            start,
            "event: content_block_delta\ndata: {this is not json at all\n\n".to_owned(),
        ],
        Some(Scripted::Truncated) => vec![start, event("ping", json!({"type": "ping"}))],
        Some(Scripted::Hang(d)) => return hanging_response(start, d),
        Some(Scripted::ErrorIn200(error_type)) => {
            let body =
                json!({"type": "error", "error": {"type": error_type, "message": "in a 200"}});
            return (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                body.to_string(),
            )
                .into_response();
        }
        Some(Scripted::OddStop { text, stop_reason }) => {
            let mut evs = vec![start];
            evs.extend(text_block_events(0, &text));
            evs.push(event(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 0}),
            ));
            evs.push(event(
                "message_delta",
                json!({"type": "message_delta", "delta": {"stop_reason": stop_reason},
                       "usage": {"output_tokens": 1}}),
            ));
            evs.push(event("message_stop", json!({"type": "message_stop"})));
            evs
        }
        Some(Scripted::BadToolJson) => vec![
            start,
            event(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {
                    "type": "tool_use", "id": shared.next_id("toolu"), "name": "bash", "input": {}}}),
            ),
            event(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0,
                       "delta": {"type": "input_json_delta", "partial_json": "{\"command\": \"ec"}}),
            ),
            event(
                "message_delta",
                json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"},
                       "usage": {"output_tokens": 1}}),
            ),
            event("message_stop", json!({"type": "message_stop"})),
        ],
        // Delay items are consumed in the loop above.
        Some(Scripted::Delay(_)) | None => reply_events(start, echo(&req), max_tokens, &shared),
    };
    sse_response(events, shared.cfg.instant)
}

/// What the model says.
enum Reply {
    Text(String),
    /// Text reporting this many output tokens.
    TextUsage(String, u64),
    ToolUse {
        name: String,
        input: Value,
    },
}

fn event(name: &str, data: Value) -> String {
    format!("event: {name}\ndata: {data}\n\n")
}

fn error_event(error_type: &str) -> String {
    let message = match error_type {
        "overloaded_error" => "Overloaded",
        _ => "Internal server error",
    };
    event(
        "error",
        json!({"type": "error", "error": {"type": error_type, "message": message}}),
    )
}

/// The input of a request as the API reports it with prompt caching.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct InputUsage {
    input_tokens: u64,
    cache_creation_input_tokens: u64,
    cache_read_input_tokens: u64,
}

fn message_start(id: &str, model: &str, input: InputUsage) -> String {
    event(
        "message_start",
        json!({"type": "message_start", "message": {
            "id": id, "type": "message", "role": "assistant", "model": model,
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": input.input_tokens, "output_tokens": 1,
                      "cache_creation_input_tokens": input.cache_creation_input_tokens,
                      "cache_read_input_tokens": input.cache_read_input_tokens}
        }}),
    )
}

/// Removes every `cache_control` marker (a prefix is the same whatever is marked).
fn unmarked(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| k.as_str() != "cache_control")
                .map(|(k, v)| (k.clone(), unmarked(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(unmarked).collect()),
        other => other.clone(),
    }
}

/// The prefixes of `req` at its breakpoints (tools, system, messages order), as text.
fn breakpoint_prefixes(req: &Value) -> Vec<String> {
    let tools: Vec<Value> = req["tools"].as_array().cloned().unwrap_or_default();
    let system: Vec<Value> = match &req["system"] {
        Value::Array(a) => a.clone(),
        Value::String(s) => vec![json!({"type": "text", "text": s})],
        _ => Vec::new(),
    };
    let messages: Vec<Value> = req["messages"].as_array().cloned().unwrap_or_default();
    let marked = |b: &Value| b.get("cache_control").is_some();
    let mut out = Vec::new();
    for i in (0..tools.len()).filter(|&i| marked(&tools[i])) {
        out.push(unmarked(&json!([&tools[..=i]])).to_string());
    }
    for i in (0..system.len()).filter(|&i| marked(&system[i])) {
        out.push(unmarked(&json!([tools, &system[..=i]])).to_string());
    }
    for (m, message) in messages.iter().enumerate() {
        let blocks = blocks(message);
        for b in (0..blocks.len()).filter(|&b| marked(&blocks[b])) {
            let head = &messages[..m];
            let this = json!({"role": message["role"], "content": &blocks[..=b]});
            out.push(unmarked(&json!([tools, system, head, this])).to_string());
        }
    }
    out
}

fn hash(text: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

/// Splits a request's input into plain, cache-write and cache-read tokens (see the module
/// docs), remembering its breakpoint prefixes.
fn cache_usage(
    req: &Value,
    body_len: usize,
    cached: &mut std::collections::HashSet<u64>,
) -> InputUsage {
    let total = (body_len / 4) as u64;
    let prefixes = breakpoint_prefixes(req);
    let read = prefixes
        .iter()
        .filter(|p| cached.contains(&hash(p)))
        .map(|p| (p.len() / 4) as u64)
        .max()
        .unwrap_or(0);
    let last = prefixes
        .iter()
        .map(|p| (p.len() / 4) as u64)
        .max()
        .unwrap_or(0);
    for p in &prefixes {
        cached.insert(hash(p));
    }
    let read = read.min(total);
    let write = last.saturating_sub(read).min(total - read);
    InputUsage {
        input_tokens: total - read - write,
        cache_creation_input_tokens: write,
        cache_read_input_tokens: read,
    }
}

/// Checks the `cache_control` markers the way the API does.
fn validate_cache_control(req: &Value) -> Result<(), String> {
    const ALLOWED: &[&str] = &["text", "image", "document", "tool_use", "tool_result"];
    let mut count = 0usize;
    let mut check = |where_: String, b: &Value, block: bool| -> Result<(), String> {
        let Some(cc) = b.get("cache_control") else {
            return Ok(());
        };
        count += 1;
        if cc["type"] != "ephemeral" {
            return Err(format!(
                "{where_}.cache_control.type: Input should be 'ephemeral'"
            ));
        }
        if let Some(ttl) = cc.get("ttl")
            && ttl != "5m"
            && ttl != "1h"
        {
            return Err(format!(
                "{where_}.cache_control.ttl: Input should be '5m' or '1h'"
            ));
        }
        if block {
            let kind = b["type"].as_str().unwrap_or_default();
            if !ALLOWED.contains(&kind) {
                return Err(format!(
                    "{where_}: cache_control cannot be set on a `{kind}` block"
                ));
            }
            if kind == "text" && b["text"].as_str().is_none_or(str::is_empty) {
                return Err(format!(
                    "{where_}: cache_control cannot be set for empty text blocks"
                ));
            }
        }
        Ok(())
    };
    for (i, t) in req["tools"].as_array().into_iter().flatten().enumerate() {
        check(format!("tools.{i}"), t, false)?;
    }
    for (i, b) in req["system"].as_array().into_iter().flatten().enumerate() {
        check(format!("system.{i}"), b, true)?;
    }
    for (i, m) in req["messages"].as_array().into_iter().flatten().enumerate() {
        for (j, b) in m["content"].as_array().into_iter().flatten().enumerate() {
            check(format!("messages.{i}.content.{j}"), b, true)?;
        }
    }
    if count > 4 {
        return Err(format!(
            "A maximum of 4 blocks with cache_control may be provided. Found {count}."
        ));
    }
    Ok(())
}

/// Splits `s` into pieces of at most `n` characters.
fn pieces(s: &str, n: usize) -> Vec<String> {
    let chars: Vec<char> = s.chars().collect();
    chars.chunks(n).map(|c| c.iter().collect()).collect()
}

fn text_block_events(index: usize, text: &str) -> Vec<String> {
    let mut evs = vec![event(
        "content_block_start",
        json!({"type": "content_block_start", "index": index,
               "content_block": {"type": "text", "text": ""}}),
    )];
    for (i, piece) in pieces(text, DELTA_CHARS).into_iter().enumerate() {
        if i == 1 {
            evs.push(event("ping", json!({"type": "ping"})));
        }
        evs.push(event(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": index,
                   "delta": {"type": "text_delta", "text": piece}}),
        ));
    }
    evs
}

fn reply_events(start: String, reply: Reply, max_tokens: u64, shared: &Shared) -> Vec<String> {
    let mut evs = vec![start, event("ping", json!({"type": "ping"}))];
    let mut reported = None;
    let reply = match reply {
        Reply::TextUsage(text, n) => {
            reported = Some(n);
            Reply::Text(text)
        }
        other => other,
    };
    let (stop_reason, output_len) = match reply {
        Reply::TextUsage(..) => ("end_turn", 0),
        Reply::Text(text) => {
            let (text, stop) = if (text.len() / 4) as u64 > max_tokens {
                let limit = usize::try_from(max_tokens.saturating_mul(4)).unwrap_or(usize::MAX);
                let cut: String = text.chars().take(limit).collect();
                (cut, "max_tokens")
            } else {
                (text, "end_turn")
            };
            evs.extend(text_block_events(0, &text));
            evs.push(event(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 0}),
            ));
            (stop, text.len())
        }
        Reply::ToolUse { name, input } => {
            let json_text = input.to_string();
            evs.push(event(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {
                    "type": "tool_use", "id": shared.next_id("toolu"), "name": name,
                    "input": {}
                }}),
            ));
            for piece in pieces(&json_text, DELTA_CHARS) {
                evs.push(event(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": 0,
                           "delta": {"type": "input_json_delta", "partial_json": piece}}),
                ));
            }
            evs.push(event(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 0}),
            ));
            ("tool_use", json_text.len())
        }
    };
    evs.push(event(
        "message_delta",
        json!({"type": "message_delta",
               "delta": {"stop_reason": stop_reason, "stop_sequence": null},
               "usage": {"output_tokens": reported.unwrap_or((output_len / 4) as u64)}}),
    ));
    evs.push(event("message_stop", json!({"type": "message_stop"})));
    evs
}

/// A stream that sends `start` and then nothing for `hold`.
fn hanging_response(start: String, hold: Duration) -> Response {
    let stream = futures::stream::iter([Bytes::from(start)])
        .map(Ok::<Bytes, Infallible>)
        .chain(futures::stream::once(async move {
            tokio::time::sleep(hold).await;
            Ok::<Bytes, Infallible>(Bytes::new())
        }));
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| error_response(500, "api_error", "cannot build response", None))
}

fn sse_response(events: Vec<String>, instant: bool) -> Response {
    let chunks: Vec<(Duration, Bytes)> = if instant {
        vec![(Duration::ZERO, Bytes::from(events.concat()))]
    } else {
        // Each event in two chunks, split mid-event, so clients must reassemble.
        events
            .into_iter()
            .flat_map(|e| {
                let bytes = Bytes::from(e);
                let mid = bytes.len() / 2;
                [
                    (CHUNK_DELAY, bytes.slice(..mid)),
                    (CHUNK_DELAY, bytes.slice(mid..)),
                ]
            })
            .collect()
    };
    let stream = futures::stream::iter(chunks).then(|(delay, bytes)| async move {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Ok::<Bytes, Infallible>(bytes)
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| error_response(500, "api_error", "cannot build response", None))
}

/// The content of a message as a list of blocks (a string becomes one text block).
fn blocks(message: &Value) -> Vec<Value> {
    match &message["content"] {
        Value::String(s) => vec![json!({"type": "text", "text": s})],
        Value::Array(a) => a.clone(),
        _ => Vec::new(),
    }
}

fn text_of(message: &Value) -> String {
    blocks(message)
        .iter()
        .filter(|b| b["type"] == "text")
        .filter_map(|b| b["text"].as_str())
        .collect()
}

/// Checks the request the way the real API does, for the rules a client can break.
/// Image and document blocks as the Messages API checks them: inline base64 of a supported
/// type whose bytes are what the type says, at most 5 MB for an image; only in user messages.
fn validate_media(b: &Value) -> Result<(), String> {
    use base64::Engine as _;
    let kind = b["type"].as_str().unwrap_or_default();
    if kind != "image" && kind != "document" {
        return Ok(());
    }
    let src = &b["source"];
    if src["type"] != "base64" {
        return Err(format!("{kind}.source.type: only base64 is accepted here"));
    }
    let media_type = src["media_type"].as_str().unwrap_or_default();
    let data = base64::engine::general_purpose::STANDARD
        .decode(src["data"].as_str().unwrap_or_default())
        .map_err(|e| format!("{kind}.source.data: invalid base64 data: {e}"))?;
    let magic_ok = match (kind, media_type) {
        ("image", "image/png") => data.starts_with(b"\x89PNG\r\n\x1a\n"),
        ("image", "image/jpeg") => data.starts_with(&[0xFF, 0xD8, 0xFF]),
        ("image", "image/gif") => data.starts_with(b"GIF8"),
        ("image", "image/webp") => data.len() > 12 && &data[8..12] == b"WEBP",
        ("document", "application/pdf") => data.starts_with(b"%PDF-"),
        _ => {
            return Err(format!(
                "{kind}.source.media_type: {media_type:?} is not supported"
            ));
        }
    };
    if !magic_ok {
        return Err(format!(
            "{kind}.source: the data does not match the media type {media_type}"
        ));
    }
    if kind == "image" && data.len() > 5 * 1000 * 1000 {
        return Err(format!(
            "image.source.data: image exceeds 5 MB maximum: {} bytes",
            data.len()
        ));
    }
    Ok(())
}

fn validate(req: &Value) -> Result<(), String> {
    if req["model"].as_str().is_none_or(str::is_empty) {
        return Err("model: Field required".into());
    }
    if req["max_tokens"].as_u64().is_none_or(|n| n == 0) {
        return Err("max_tokens: Field required (a positive integer)".into());
    }
    if !(req["system"].is_null() || req["system"].is_string() || req["system"].is_array()) {
        return Err("system: Input should be a valid string".into());
    }
    if !(req["tools"].is_null() || req["tools"].is_array()) {
        return Err("tools: Input should be a valid list".into());
    }
    if req["system"].is_array()
        && !req["system"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|b| b["type"] == "text" && b["text"].is_string())
    {
        return Err("system: Input should be a valid list of text blocks".into());
    }
    validate_cache_control(req)?;
    for (i, tool) in req["tools"].as_array().into_iter().flatten().enumerate() {
        if !tool["name"].is_string() || !tool["input_schema"].is_object() {
            return Err(format!("tools.{i}: name and input_schema are required"));
        }
    }
    let messages = req["messages"]
        .as_array()
        .ok_or("messages: Field required")?;
    if messages.first().map(|m| &m["role"]) != Some(&json!("user")) {
        return Err("messages: first message must use the \"user\" role".into());
    }
    for (i, m) in messages.iter().enumerate() {
        if m["role"] != "user" && m["role"] != "assistant" {
            return Err(format!(
                "messages.{i}.role: must be \"user\" or \"assistant\""
            ));
        }
        let content_ok = match &m["content"] {
            Value::String(s) => !s.is_empty(),
            Value::Array(a) => !a.is_empty() && a.iter().all(|b| b["type"].is_string()),
            _ => false,
        };
        if !content_ok {
            return Err(format!(
                "messages.{i}: all messages must have non-empty content"
            ));
        }
    }
    for (i, m) in messages.iter().enumerate() {
        for (j, b) in blocks(m).iter().enumerate() {
            validate_media(b).map_err(|e| format!("messages.{i}.content.{j}: {e}"))?;
        }
    }
    // tool_use / tool_result pairing.
    for (i, m) in messages.iter().enumerate() {
        let bl = blocks(m);
        if m["role"] == "assistant" {
            let ids: Vec<String> = bl
                .iter()
                .filter(|b| b["type"] == "tool_use")
                .filter_map(|b| b["id"].as_str().map(str::to_owned))
                .collect();
            if ids.is_empty() {
                continue;
            }
            let answered: Vec<String> = messages
                .get(i + 1)
                .map(blocks)
                .unwrap_or_default()
                .iter()
                .filter(|b| b["type"] == "tool_result")
                .filter_map(|b| b["tool_use_id"].as_str().map(str::to_owned))
                .collect();
            let missing: Vec<&String> = ids.iter().filter(|id| !answered.contains(id)).collect();
            if !missing.is_empty() {
                return Err(format!(
                    "messages.{}: `tool_use` ids were found without `tool_result` blocks \
                     immediately after: {missing:?}",
                    i + 1
                ));
            }
        } else {
            let results: Vec<String> = bl
                .iter()
                .filter(|b| b["type"] == "tool_result")
                .map(|b| b["tool_use_id"].as_str().unwrap_or_default().to_owned())
                .collect();
            if results.is_empty() {
                continue;
            }
            let prev_ids: Vec<String> = i
                .checked_sub(1)
                .and_then(|p| messages.get(p))
                .filter(|p| p["role"] == "assistant")
                .map(blocks)
                .unwrap_or_default()
                .iter()
                .filter(|b| b["type"] == "tool_use")
                .filter_map(|b| b["id"].as_str().map(str::to_owned))
                .collect();
            if let Some(bad) = results.iter().find(|id| !prev_ids.contains(id)) {
                return Err(format!(
                    "messages.{i}.content: unexpected `tool_use_id` found in `tool_result` \
                     blocks: {bad}. Each `tool_result` block must have a corresponding \
                     `tool_use` block in the previous message."
                ));
            }
        }
    }
    Ok(())
}

/// Parses `[[tool NAME JSON]]` directives in order; malformed ones are skipped.
fn directives(text: &str) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(pos) = rest.find("[[tool ") {
        rest = &rest[pos + "[[tool ".len()..];
        let name_end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        let name = &rest[..name_end];
        let after_name = rest[name_end..].trim_start();
        let mut de = serde_json::Deserializer::from_str(after_name).into_iter::<Value>();
        match de.next() {
            Some(Ok(input)) => {
                let tail = after_name[de.byte_offset()..].trim_start();
                if let Some(after) = tail.strip_prefix("]]") {
                    if !name.is_empty() {
                        out.push((name.to_owned(), input));
                    }
                    rest = after;
                }
            }
            _ => continue,
        }
    }
    out
}

/// The echo model.
fn echo(req: &Value) -> Reply {
    let messages: &[Value] = req["messages"].as_array().map_or(&[], Vec::as_slice);
    let system = match &req["system"] {
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().filter_map(|b| b["text"].as_str()).collect(),
        _ => String::new(),
    };
    if system.to_lowercase().contains("summarize the conversation") {
        let last = messages.last().map(text_of).unwrap_or_default();
        // The text after the instruction line, if there is one.
        let body = last.split_once("\n\n").map_or(last.as_str(), |(_, b)| b);
        let head: String = body.chars().take(120).collect();
        return Reply::Text(format!("summary: {head}"));
    }
    // The newest user message with text is the "question".
    let (qi, question) = messages
        .iter()
        .enumerate()
        .rev()
        .filter(|(_, m)| m["role"] == "user")
        .map(|(i, m)| (i, text_of(m)))
        .find(|(_, t)| !t.is_empty())
        .unwrap_or((0, String::new()));
    let wanted = directives(&question);
    let answered = messages
        .iter()
        .skip(qi + 1)
        .filter(|m| m["role"] == "user")
        .flat_map(blocks)
        .filter(|b| b["type"] == "tool_result")
        .count();
    if let Some((name, input)) = wanted.into_iter().nth(answered) {
        return Reply::ToolUse { name, input };
    }
    let mut text = format!("echo: {question}");
    let last_results: Vec<String> = messages
        .last()
        .filter(|m| m["role"] == "user")
        .map(blocks)
        .unwrap_or_default()
        .iter()
        .filter(|b| b["type"] == "tool_result")
        .map(|b| match &b["content"] {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .collect();
    if !last_results.is_empty() {
        text.push_str("\ntool results: ");
        text.push_str(&last_results.join(" | "));
    }
    Reply::Text(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directives_parse_in_order_and_skip_malformed() {
        let d = directives(
            r#"do [[tool write_file {"path":"/workspace/a.txt","content":"]] x"}]] then
               [[tool bash {"cmd":"ls"}]] and [[tool broken {nope]] end"#,
        );
        assert_eq!(
            d,
            vec![
                (
                    "write_file".to_owned(),
                    json!({"path":"/workspace/a.txt","content":"]] x"})
                ),
                ("bash".to_owned(), json!({"cmd":"ls"})),
            ]
        );
    }

    #[test]
    fn echo_asks_for_unanswered_tools_then_echoes_results() {
        let q = r#"hi [[tool t1 {"a":1}]] [[tool t2 {}]]"#;
        let mut req = json!({"messages": [{"role": "user", "content": q}]});
        assert!(matches!(echo(&req), Reply::ToolUse { ref name, .. } if name == "t1"));
        req["messages"] = json!([
            {"role": "user", "content": q},
            {"role": "assistant", "content": [{"type":"tool_use","id":"x1","name":"t1","input":{"a":1}}]},
            {"role": "user", "content": [{"type":"tool_result","tool_use_id":"x1","content":"one"}]},
        ]);
        assert!(matches!(echo(&req), Reply::ToolUse { ref name, .. } if name == "t2"));
        assert!(validate(&json!({"model":"m","max_tokens":5,"messages":req["messages"]})).is_ok());
        let mut msgs = req["messages"].as_array().cloned().unwrap_or_default();
        msgs.push(json!({"role": "assistant", "content": [{"type":"tool_use","id":"x2","name":"t2","input":{}}]}));
        msgs.push(json!({"role": "user", "content": [{"type":"tool_result","tool_use_id":"x2","content":"two"}]}));
        req["messages"] = Value::Array(msgs);
        match echo(&req) {
            Reply::Text(t) => assert_eq!(t, format!("echo: {q}\ntool results: two")),
            Reply::ToolUse { name, .. } => panic!("unexpected tool {name}"),
            Reply::TextUsage(..) => panic!("unexpected scripted usage"),
        }
    }

    #[test]
    fn validation_catches_unpaired_tool_blocks() {
        let bad = json!({"model":"m","max_tokens":5,"messages":[
            {"role":"user","content":"q"},
            {"role":"assistant","content":[{"type":"tool_use","id":"a","name":"t","input":{}}]},
            {"role":"user","content":"no results"}
        ]});
        assert!(validate(&bad).is_err_and(|e| e.contains("without `tool_result`")));
        let bad = json!({"model":"m","max_tokens":5,"messages":[
            {"role":"user","content":"q"},
            {"role":"assistant","content":"a"},
            {"role":"user","content":[{"type":"tool_result","tool_use_id":"zz","content":"r"}]}
        ]});
        assert!(validate(&bad).is_err_and(|e| e.contains("unexpected `tool_use_id`")));
    }

    #[test]
    fn cache_breakpoints_are_checked_and_a_seen_prefix_is_read() {
        let cc = json!({"type": "ephemeral"});
        let mut req = json!({"model": "m", "max_tokens": 5,
            "tools": [{"name": "t", "input_schema": {}, "cache_control": cc}],
            "system": [{"type": "text", "text": "sys", "cache_control": cc}],
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "q1", "cache_control": cc}]}]});
        assert_eq!(validate(&req), Ok(()));
        let mut cached = std::collections::HashSet::new();
        let first = cache_usage(&req, 4000, &mut cached);
        assert_eq!(first.cache_read_input_tokens, 0);
        assert!(first.cache_creation_input_tokens > 0);
        assert_eq!(
            first.input_tokens + first.cache_creation_input_tokens,
            1000,
            "{first:?}"
        );
        // The next turn: the same tools and system, then more messages.
        req["messages"] = json!([
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1"},
            {"role": "user", "content": [{"type": "text", "text": "q2", "cache_control": cc}]},
        ]);
        let second = cache_usage(&req, 4000, &mut cached);
        assert!(second.cache_read_input_tokens > 0, "{second:?}");
        assert_eq!(
            second.input_tokens
                + second.cache_creation_input_tokens
                + second.cache_read_input_tokens,
            1000
        );
        // Malformed markers are refused as the API refuses them.
        let mut five = req.clone();
        five["messages"][1]["content"] = json!([
            {"type": "text", "text": "a", "cache_control": cc},
            {"type": "text", "text": "b", "cache_control": cc},
        ]);
        assert!(validate(&five).is_err_and(|e| e.contains("maximum of 4 blocks")));
        let mut bad = req.clone();
        bad["tools"][0]["cache_control"] = json!({"type": "persistent"});
        assert!(validate(&bad).is_err_and(|e| e.contains("ephemeral")));
        let mut empty = req.clone();
        empty["messages"][2]["content"][0]["text"] = json!("");
        assert!(validate(&empty).is_err_and(|e| e.contains("empty text")));
        let mut thinking = req.clone();
        thinking["messages"][1]["content"] =
            json!([{"type": "thinking", "thinking": "x", "cache_control": cc}]);
        assert!(validate(&thinking).is_err_and(|e| e.contains("`thinking` block")));
    }
}
