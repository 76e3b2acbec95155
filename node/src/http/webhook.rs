//! Webhooks: `POST /v1/webhook` with `{user, message, context?, callback_url?}` answers `202`
//! at once with the request id. The request goes into one conversation per webhook `user`
//! (interface `webhook`), so it shows up like any other request. When the answer is ready it
//! is POSTed to `callback_url` as `{request_id, conversation, status, text, usage, error?}`,
//! retried with exponential backoff ([`MAX_ATTEMPTS`] attempts). Pending deliveries are kept in
//! the node's state and resumed after a restart.

use crate::api::body::JsonBody;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use futures::StreamExt;
use iom_crdt::{DocId, Interface};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::agent::ask::RequestEvent;
use crate::api::ApiError;
use crate::api::routes::parse_doc_id;
use crate::node::NodeCtx;

/// Delivery attempts per callback.
pub const MAX_ATTEMPTS: u32 = 5;
/// Pause after the first failed attempt; doubled after each further one.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Time limit of one callback POST.
const CALLBACK_TIMEOUT: Duration = Duration::from_secs(10);
/// State key prefix: webhook user → conversation id.
const USER_PREFIX: &str = "webhook/user/";
/// State key prefix: pending callbacks by request id.
const PENDING_PREFIX: &str = "webhook/callback/";
/// Longest webhook user name.
const MAX_USER: usize = 128;

/// Serialises the "find or create the user's conversation" step.
static USER_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Body of `POST /v1/webhook`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookBody {
    /// Who the message is from (one conversation per user).
    pub user: String,
    /// The message (the prompt).
    pub message: String,
    /// Extra context appended to the prompt (a string, or any JSON shown as JSON).
    #[serde(default)]
    pub context: Option<Value>,
    /// Where to POST the answer (http or https).
    #[serde(default)]
    pub callback_url: Option<String>,
}

/// A callback waiting to be delivered.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PendingCallback {
    /// The request.
    pub request_id: String,
    /// Its conversation.
    pub conversation: String,
    /// Where to POST.
    pub url: String,
    /// Attempts made so far.
    pub attempts: u32,
    /// Why the last attempt failed (an HTTP status or a transport error).
    #[serde(default)]
    pub last_error: Option<String>,
    /// Unix seconds when delivery was given up after [`MAX_ATTEMPTS`]; the record is kept
    /// (see `iom webhook callbacks`) until it is retried or dropped.
    #[serde(default)]
    pub gave_up_at: Option<u64>,
}

impl PendingCallback {
    /// `pending` while deliveries are being attempted, `failed` once given up.
    pub fn state(&self) -> &'static str {
        if self.gave_up_at.is_some() {
            "failed"
        } else {
            "pending"
        }
    }
}

/// The webhook route (the caller adds the token check).
pub fn routes(ctx: Arc<NodeCtx>) -> axum::Router {
    axum::Router::new()
        .route("/v1/webhook", post(webhook))
        .with_state(ctx)
}

/// Checks a callback URL: absolute, http or https, with a host.
pub fn check_callback_url(text: &str) -> Result<reqwest::Url, ApiError> {
    let url = reqwest::Url::parse(text)
        .map_err(|e| ApiError::bad_request(format!("callback_url {text:?} is not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(ApiError::bad_request(format!(
            "callback_url {text:?} must be an http:// or https:// URL with a host"
        )));
    }
    Ok(url)
}

async fn webhook(
    State(ctx): State<Arc<NodeCtx>>,
    JsonBody(body): JsonBody<WebhookBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let user = body.user.trim().to_string();
    if user.is_empty() || user.chars().count() > MAX_USER || user.chars().any(char::is_control) {
        return Err(ApiError::bad_request(format!(
            "user is 1 to {MAX_USER} printable characters"
        )));
    }
    if let Some(url) = &body.callback_url {
        check_callback_url(url)?;
    }
    let mut prompt = body.message.trim().to_string();
    match body.context {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s.trim().is_empty() => {}
        Some(Value::String(s)) => prompt = format!("{prompt}\n\nContext:\n{s}"),
        Some(v) => {
            let text = serde_json::to_string_pretty(&v).unwrap_or_default();
            prompt = format!("{prompt}\n\nContext:\n{text}");
        }
    }
    if body.message.trim().is_empty() {
        return Err(ApiError::bad_request("the message is empty"));
    }
    let conversation = user_conversation(&ctx, &user).await?;
    let rid = format!("wh-{}", hex::encode(crate::time::random_bytes::<12>()));
    let asked = ctx
        .asking
        .ask(
            &prompt,
            Some(conversation),
            Interface::Webhook,
            Some(rid.clone()),
        )
        .await?;
    if let Some(url) = body.callback_url {
        let pending = PendingCallback {
            request_id: rid.clone(),
            conversation: conversation.to_string(),
            url,
            attempts: 0,
            last_error: None,
            gave_up_at: None,
        };
        save(&ctx, &pending).await?;
        spawn_delivery(ctx.clone(), pending);
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "request_id": rid,
            "conversation": conversation.to_string(),
            "agent": asked.agent,
            "queued": asked.queued,
            "note": asked.note,
        })),
    ))
}

/// The conversation of a webhook user, created on first use.
async fn user_conversation(ctx: &Arc<NodeCtx>, user: &str) -> Result<DocId, ApiError> {
    let _guard = USER_LOCK.lock().await;
    let key = format!("{USER_PREFIX}{user}");
    if let Some(bytes) = ctx.store.state_get(key.as_bytes())?
        && let Ok(id) = parse_doc_id(&String::from_utf8_lossy(&bytes))
        && ctx.docs.meta(id)?.is_some()
    {
        return Ok(id);
    }
    let id = ctx
        .asking
        .conversations()
        .create(&format!("webhook: {user}"))
        .await?;
    ctx.store
        .state_put(key.as_bytes(), id.to_string().as_bytes())?;
    ctx.store.flush().await?;
    Ok(id)
}

pub(crate) async fn save(ctx: &NodeCtx, p: &PendingCallback) -> Result<(), ApiError> {
    let bytes = serde_json::to_vec(p).map_err(|e| ApiError::internal(e.to_string()))?;
    ctx.store.state_put(
        format!("{PENDING_PREFIX}{}", p.request_id).as_bytes(),
        &bytes,
    )?;
    ctx.store.flush().await?;
    Ok(())
}

pub(crate) async fn forget(ctx: &NodeCtx, rid: &str) {
    let _ = ctx
        .store
        .state_remove(format!("{PENDING_PREFIX}{rid}").as_bytes());
    let _ = ctx.store.flush().await;
}

/// Restarts the deliveries that were pending when the node stopped.
pub fn resume(ctx: &Arc<NodeCtx>) {
    let rows = match ctx.store.state_scan(PENDING_PREFIX.as_bytes()) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read pending webhook callbacks");
            return;
        }
    };
    for (_, v) in rows {
        match serde_json::from_slice::<PendingCallback>(&v) {
            Ok(p) if p.gave_up_at.is_some() => {} // waits for `iom webhook retry`
            Ok(p) => {
                tracing::info!(request = %p.request_id, attempts = p.attempts, "resuming a webhook callback");
                spawn_delivery(ctx.clone(), p);
            }
            Err(e) => tracing::warn!(error = %e, "unreadable pending webhook callback"),
        }
    }
}

/// The pause after `attempts` failed attempts.
pub fn backoff(attempts: u32) -> Duration {
    FIRST_BACKOFF.saturating_mul(1 << attempts.saturating_sub(1).min(6))
}

/// Every callback record: pending deliveries and the ones given up.
pub fn callbacks(ctx: &NodeCtx) -> Result<Vec<PendingCallback>, ApiError> {
    Ok(ctx
        .store
        .state_scan(PENDING_PREFIX.as_bytes())?
        .into_iter()
        .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
        .collect())
}

/// One callback record.
pub fn callback(ctx: &NodeCtx, rid: &str) -> Result<Option<PendingCallback>, ApiError> {
    Ok(ctx
        .store
        .state_get(format!("{PENDING_PREFIX}{rid}").as_bytes())?
        .and_then(|v| serde_json::from_slice(&v).ok()))
}

pub(crate) fn spawn_delivery(ctx: Arc<NodeCtx>, p: PendingCallback) {
    let mut shutdown = ctx.shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = deliver(ctx.clone(), p) => {}
            _ = shutdown.wait_for(|s| *s) => {}
        }
    });
}

/// Waits for the answer, then POSTs it until it is accepted or the attempts run out.
async fn deliver(ctx: Arc<NodeCtx>, mut p: PendingCallback) {
    let Ok(doc) = parse_doc_id(&p.conversation) else {
        forget(&ctx, &p.request_id).await;
        return;
    };
    let mut events = std::pin::pin!(ctx.asking.follow(doc, p.request_id.clone()));
    let mut outcome = None;
    while let Some(ev) = events.next().await {
        if ev.is_final() {
            outcome = Some(ev);
            break;
        }
    }
    let payload = match outcome {
        Some(RequestEvent::Done {
            text,
            input_tokens,
            output_tokens,
            note,
            model,
        }) => json!({
            "request_id": p.request_id, "conversation": p.conversation, "status": "done",
            "text": text, "note": note, "model": model,
            "usage": { "input_tokens": input_tokens, "output_tokens": output_tokens },
        }),
        Some(RequestEvent::Failed { error, .. }) => json!({
            "request_id": p.request_id, "conversation": p.conversation, "status": "failed",
            "text": "", "error": error,
            "usage": { "input_tokens": 0, "output_tokens": 0 },
        }),
        _ => return,
    };
    let client = match reqwest::Client::builder()
        .timeout(CALLBACK_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "cannot build the callback client");
            return;
        }
    };
    while p.attempts < MAX_ATTEMPTS {
        if p.attempts > 0 {
            tokio::time::sleep(backoff(p.attempts)).await;
        }
        let result = client
            .post(&p.url)
            .header("x-iom-request-id", &p.request_id)
            .json(&payload)
            .send()
            .await;
        p.attempts += 1;
        match result {
            Ok(r) if r.status().is_success() => {
                tracing::info!(request = %p.request_id, attempts = p.attempts, "webhook callback delivered");
                forget(&ctx, &p.request_id).await;
                return;
            }
            Ok(r) => {
                tracing::info!(request = %p.request_id, attempt = p.attempts, status = %r.status(), "webhook callback refused; will retry");
                p.last_error = Some(format!("the receiver answered {}", r.status()));
            }
            Err(e) => {
                tracing::info!(request = %p.request_id, attempt = p.attempts, error = %e, "webhook callback failed; will retry");
                p.last_error = Some(format!("cannot reach the receiver: {e}"));
            }
        }
        if p.attempts >= MAX_ATTEMPTS {
            p.gave_up_at = Some(crate::time::now_secs());
        }
        if save(&ctx, &p).await.is_err() {
            tracing::warn!(request = %p.request_id, "cannot record a callback attempt");
        }
    }
    tracing::warn!(
        request = %p.request_id, url = %p.url, attempts = p.attempts,
        "giving up on a webhook callback (kept: `iom webhook callbacks`, `iom webhook retry {}`)",
        p.request_id
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(4), Duration::from_secs(8));
        assert_eq!(backoff(40), Duration::from_secs(64));
    }

    #[test]
    fn callback_urls() {
        assert!(check_callback_url("http://127.0.0.1:9/x").is_ok());
        assert!(check_callback_url("https://example.com/hook").is_ok());
        assert!(check_callback_url("ftp://example.com/").is_err());
        assert!(check_callback_url("file:///etc/passwd").is_err());
        assert!(check_callback_url("not a url").is_err());
    }
}
