//! Model provider routes (`/v1/models`): the mesh's providers, default model and fallback
//! chain, kept in the synced settings document and edited from any admin device. Keys are
//! never sent here: a provider names the environment variable or key file that holds its key
//! on the agent device.

use super::body::JsonBody;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::routing::{delete, get, put};
use iom_crdt::{DocId, DocKind, ModelChoice, Models, ModelsError, ProviderEntry};
use serde::Deserialize;
use serde_json::{Value, json};

use super::ApiError;
use crate::agent::providers::{BUILTIN, read_settings};
use crate::docs::Origin;
use crate::node::NodeCtx;

type Ctx = State<Arc<NodeCtx>>;

/// Routes for model providers.
pub fn routes() -> axum::Router<Arc<NodeCtx>> {
    axum::Router::new()
        .route("/v1/models", get(list).post(add))
        .route("/v1/models/default", put(set_default))
        .route("/v1/models/{name}", delete(remove))
}

/// Body of `PUT /v1/models/default`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefaultBody {
    /// `NAME` or `NAME/MODEL`.
    pub model: String,
    /// Providers tried in order after it; absent: the chain is left as it is.
    #[serde(default)]
    pub fallback: Option<Vec<String>>,
}

fn require_admin(ctx: &NodeCtx) -> Result<(), ApiError> {
    if ctx.trust.state().is_admin(&ctx.identity.device_id()) {
        Ok(())
    } else {
        Err(ApiError::forbidden(
            "only an admin device can change the mesh's model providers",
        ))
    }
}

fn models_error(e: ModelsError) -> ApiError {
    match e {
        ModelsError::Invalid(_) => ApiError::bad_request(e.to_string()),
        ModelsError::NotFound(_) => ApiError::not_found(e.to_string()),
        other => ApiError::internal(other.to_string()),
    }
}

async fn list(State(ctx): Ctx) -> Result<Json<Value>, ApiError> {
    let s = read_settings(&ctx.docs).await?;
    let unreadable: Vec<Value> = s
        .unreadable
        .iter()
        .map(|(k, why)| json!({ "key": k, "reason": why }))
        .collect();
    Ok(Json(json!({
        "providers": s.providers,
        "default": s.default.clone().unwrap_or_else(|| BUILTIN.to_string()),
        "fallback": s.fallback,
        "builtin": { "name": BUILTIN, "kind": "anthropic", "model": ctx.config.agent.model },
        "unreadable": unreadable,
    })))
}

/// Runs `f` on the models part of the settings document (created if missing).
async fn edit<F>(ctx: &NodeCtx, f: F) -> Result<(), ApiError>
where
    F: FnOnce(&mut Models<&mut iom_crdt::Document>, i64) -> Result<(), ModelsError>
        + Send
        + 'static,
{
    require_admin(ctx)?;
    ctx.docs.create(DocKind::Settings).await?;
    let now = crate::time::now_secs() as i64;
    ctx.docs
        .modify(DocId::SETTINGS, Origin::Local, false, move |d| {
            Ok(Models::open(&mut *d)
                .map_err(ModelsError::from)
                .and_then(|mut m| f(&mut m, now)))
        })
        .await?
        .map_err(models_error)
}

async fn add(
    State(ctx): Ctx,
    JsonBody(entry): JsonBody<ProviderEntry>,
) -> Result<Json<Value>, ApiError> {
    entry.validate().map_err(models_error)?;
    let e = entry.clone();
    edit(&ctx, move |m, now| m.put_provider(&e, now)).await?;
    Ok(Json(json!({ "provider": entry })))
}

async fn remove(State(ctx): Ctx, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    let n = name.clone();
    edit(&ctx, move |m, now| m.remove_provider(&n, now)).await?;
    Ok(Json(json!({ "removed": name })))
}

async fn set_default(
    State(ctx): Ctx,
    JsonBody(body): JsonBody<DefaultBody>,
) -> Result<Json<Value>, ApiError> {
    let choice = ModelChoice::parse(&body.model).map_err(models_error)?;
    let fallback = body.fallback.clone();
    edit(&ctx, move |m, now| {
        m.set_default(&choice, BUILTIN, now)?;
        match &fallback {
            Some(f) => m.set_fallback(f, BUILTIN, now),
            None => Ok(()),
        }
    })
    .await?;
    list(State(ctx)).await
}
