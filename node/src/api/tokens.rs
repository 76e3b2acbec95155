//! Token routes (`/v1/tokens`), served on the unix socket only: creating or revoking a token
//! needs access to the device itself, not just another token.

use super::body::JsonBody;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::routing::{delete, get};
use serde::Deserialize;
use serde_json::{Value, json};

use super::ApiError;
use crate::http::tokens::{self, TokenError};
use crate::node::NodeCtx;

type Ctx = State<Arc<NodeCtx>>;

impl From<TokenError> for ApiError {
    fn from(e: TokenError) -> ApiError {
        match e {
            TokenError::Store(s) => s.into(),
            TokenError::BadName => ApiError::bad_request(e.to_string()),
        }
    }
}

/// The token routes, with state.
pub fn routes(ctx: Arc<NodeCtx>) -> axum::Router {
    axum::Router::new()
        .route("/v1/tokens", get(list).post(create))
        .route("/v1/tokens/{id}", delete(revoke))
        .with_state(ctx)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    #[serde(default)]
    name: Option<String>,
}

async fn create(
    State(ctx): Ctx,
    body: Option<JsonBody<CreateBody>>,
) -> Result<Json<Value>, ApiError> {
    let body = body.map(|JsonBody(b)| b).unwrap_or_default();
    let t = tokens::create(&ctx.store, body.name.as_deref()).await?;
    Ok(Json(json!({
        "id": t.record.id,
        "name": t.record.name,
        "created_at": t.record.created_at,
        "token": t.token,
    })))
}

async fn list(State(ctx): Ctx) -> Result<Json<Value>, ApiError> {
    let items: Vec<Value> = tokens::list(&ctx.store)?
        .into_iter()
        .map(|t| json!({ "id": t.id, "name": t.name, "created_at": t.created_at }))
        .collect();
    Ok(Json(json!({ "tokens": items })))
}

async fn revoke(State(ctx): Ctx, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let t = tokens::revoke(&ctx.store, &id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no token {id:?} (see `iom token list`)")))?;
    // No receiver (no WebSocket open) is fine.
    let _ = ctx.token_revoked.send(t.id.clone());
    Ok(Json(json!({ "id": t.id, "name": t.name, "revoked": true })))
}
