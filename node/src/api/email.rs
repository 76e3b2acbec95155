//! Email channel routes: `GET /v1/email/status` (the connection, the last mail seen, the
//! counts and the recent failures; `{"configured": false}` without `[email]`).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::routing::get;
use serde_json::{Value, json};

use super::ApiError;
use crate::node::NodeCtx;

/// Routes for the email channel.
pub fn routes() -> axum::Router<Arc<NodeCtx>> {
    axum::Router::new().route("/v1/email/status", get(status))
}

async fn status(State(ctx): State<Arc<NodeCtx>>) -> Result<Json<Value>, ApiError> {
    Ok(Json(match &ctx.email {
        Some(e) => e.status_json(),
        None => json!({
            "configured": false,
            "note": "no [email] section in this node's config.toml (see docs/email.md)",
        }),
    }))
}
