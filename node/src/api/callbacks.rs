//! Webhook callback routes (`/v1/webhook/callbacks`): see which answers are still being
//! delivered and which were given up after every attempt failed, and retry or drop those.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use serde_json::{Value, json};

use super::ApiError;
use crate::http::webhook::{self, PendingCallback};
use crate::node::NodeCtx;

type Ctx = State<Arc<NodeCtx>>;

/// Routes for webhook callbacks.
pub fn routes() -> axum::Router<Arc<NodeCtx>> {
    axum::Router::new()
        .route("/v1/webhook/callbacks", get(list))
        .route("/v1/webhook/callbacks/{rid}", delete(drop_one))
        .route("/v1/webhook/callbacks/{rid}/retry", post(retry))
}

fn view(p: &PendingCallback) -> Value {
    json!({
        "request_id": p.request_id,
        "conversation": p.conversation,
        "url": p.url,
        "state": p.state(),
        "attempts": p.attempts,
        "last_error": p.last_error,
        "gave_up_at": p.gave_up_at,
    })
}

fn unknown(rid: &str) -> ApiError {
    ApiError::not_found(format!(
        "no webhook callback for request {rid:?} (see `iom webhook callbacks`)"
    ))
}

async fn list(State(ctx): Ctx) -> Result<Json<Value>, ApiError> {
    let items: Vec<Value> = webhook::callbacks(&ctx)?.iter().map(view).collect();
    Ok(Json(json!({ "callbacks": items })))
}

/// Starts delivering a given-up callback again, with a fresh set of attempts.
async fn retry(
    State(ctx): Ctx,
    Path(rid): Path<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let mut p = webhook::callback(&ctx, &rid)?.ok_or_else(|| unknown(&rid))?;
    if p.gave_up_at.is_none() {
        return Err(ApiError::conflict(format!(
            "the callback for {rid} is still being delivered ({} attempts so far)",
            p.attempts
        )));
    }
    p.attempts = 0;
    p.gave_up_at = None;
    webhook::save(&ctx, &p).await?;
    webhook::spawn_delivery(ctx.clone(), p.clone());
    Ok((StatusCode::ACCEPTED, Json(view(&p))))
}

/// Forgets a given-up callback.
async fn drop_one(State(ctx): Ctx, Path(rid): Path<String>) -> Result<Json<Value>, ApiError> {
    let p = webhook::callback(&ctx, &rid)?.ok_or_else(|| unknown(&rid))?;
    if p.gave_up_at.is_none() {
        return Err(ApiError::conflict(format!(
            "the callback for {rid} is still being delivered; drop it once it is given up"
        )));
    }
    webhook::forget(&ctx, &rid).await;
    Ok(Json(json!({ "request_id": rid, "dropped": true })))
}
