//! `GET /v1/doctor`: every `iom doctor` check, run by the node (see [`crate::doctor`]).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::routing::get;
use serde_json::{Value, json};

use crate::node::NodeCtx;

/// The doctor route.
pub fn routes() -> axum::Router<Arc<NodeCtx>> {
    axum::Router::new().route("/v1/doctor", get(doctor))
}

async fn doctor(State(ctx): State<Arc<NodeCtx>>) -> Json<Value> {
    let findings =
        crate::doctor::probe::running(&ctx.config, &ctx.identity, &ctx.trust, &ctx.net).await;
    Json(json!({
        "worst": crate::doctor::worst(&findings),
        "findings": findings,
    }))
}
