//! Approval routes (`/v1/approvals`): list and answer approval requests, and edit the mesh's
//! approval policy (the synced settings document), from any device. Only admin devices may
//! answer ([`crate::agent::approvals::answer`]).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::routing::{get, post, put};
use iom_crdt::approvals::{self as policy, Action, Decision, Rule};
use serde::Deserialize;
use serde_json::{Value, json};

use super::ApiError;
use super::body::JsonBody;
use crate::agent::approvals::{self, AnswerError, PolicyEditError};
use crate::node::NodeCtx;

type Ctx = State<Arc<NodeCtx>>;

/// Routes for approvals and their policy.
pub fn routes() -> axum::Router<Arc<NodeCtx>> {
    axum::Router::new()
        .route("/v1/approvals", get(list))
        .route("/v1/approvals/policy", get(policy_show))
        .route(
            "/v1/approvals/policy/rules",
            put(rule_set).delete(rule_remove),
        )
        .route("/v1/approvals/policy/timeout", put(timeout_set))
        .route("/v1/approvals/{id}", get(show))
        .route("/v1/approvals/{id}/approve", post(approve))
        .route("/v1/approvals/{id}/deny", post(deny))
}

/// Query of `GET /v1/approvals`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Every approval (decided ones and old conversations too), not only pending ones.
    #[serde(default)]
    pub all: bool,
}

/// Body of `POST /v1/approvals/{id}/approve|deny`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnswerBody {
    /// Why (shown to the asker).
    #[serde(default)]
    pub reason: Option<String>,
}

/// Body of `PUT /v1/approvals/policy/rules`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleBody {
    /// Tool name glob.
    pub tool: String,
    /// Argument glob.
    #[serde(default)]
    pub args: Option<String>,
    /// `allow`, `ask` or `deny`.
    pub action: String,
}

/// Query of `DELETE /v1/approvals/policy/rules`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleQuery {
    /// Tool name glob of the rule.
    pub tool: String,
    /// Argument glob of the rule.
    #[serde(default)]
    pub args: Option<String>,
}

/// Body of `PUT /v1/approvals/policy/timeout`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutBody {
    /// Seconds an approval waits (1 to 86400). JSON Schema counts `60.0` as an integer, so a
    /// number with no fraction is accepted.
    pub secs: f64,
}

/// Unix seconds now (the agent's gate uses the wall clock too).
fn now(_ctx: &NodeCtx) -> i64 {
    crate::time::now_secs() as i64
}

async fn list(State(ctx): Ctx, Query(q): Query<ListQuery>) -> Result<Json<Value>, ApiError> {
    let now = now(&ctx);
    let found = approvals::list(&ctx.docs, now, q.all).await?;
    Ok(Json(json!({ "approvals": found, "now": now })))
}

async fn show(State(ctx): Ctx, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let found = approvals::list(&ctx.docs, now(&ctx), true)
        .await?
        .into_iter()
        .find(|f| f.approval.id == id)
        .ok_or_else(|| ApiError::not_found(AnswerError::NotFound(id).to_string()))?;
    Ok(Json(json!(found)))
}

async fn approve(
    State(ctx): Ctx,
    Path(id): Path<String>,
    body: Option<JsonBody<AnswerBody>>,
) -> Result<Json<Value>, ApiError> {
    answer(&ctx, &id, Decision::Approve, body).await
}

async fn deny(
    State(ctx): Ctx,
    Path(id): Path<String>,
    body: Option<JsonBody<AnswerBody>>,
) -> Result<Json<Value>, ApiError> {
    answer(&ctx, &id, Decision::Deny, body).await
}

async fn answer(
    ctx: &NodeCtx,
    id: &str,
    decision: Decision,
    body: Option<JsonBody<AnswerBody>>,
) -> Result<Json<Value>, ApiError> {
    let reason = body
        .map(|JsonBody(b)| b.reason)
        .unwrap_or_default()
        .map(|r| r.trim().to_string())
        .filter(|r| !r.is_empty());
    let found = approvals::answer(
        &ctx.docs,
        &ctx.identity,
        &ctx.trust,
        now(ctx),
        id,
        decision,
        reason,
    )
    .await
    .map_err(|e| match e {
        AnswerError::NotFound(_) => ApiError::not_found(e.to_string()),
        AnswerError::NotAdmin => ApiError::forbidden(e.to_string()),
        AnswerError::Decided { .. } => ApiError::conflict(e.to_string()),
        AnswerError::ReasonTooLong => ApiError::bad_request(e.to_string()),
        AnswerError::Docs(d) => ApiError::from(d),
        other => ApiError::internal(other.to_string()),
    })?;
    Ok(Json(json!({
        "answered": decision.name(),
        "approval": found,
        "note": "the agent acts on the answer when it sees it (at once if connected, else after sync)",
    })))
}

async fn policy_json(ctx: &NodeCtx) -> Value {
    let p = approvals::read_policy(&ctx.docs).await;
    let rules: Vec<Value> = p
        .rules
        .iter()
        .map(|(key, r)| json!({ "key": key, "tool": r.tool, "args": r.args, "action": r.action }))
        .collect();
    json!({
        "rules": rules,
        "timeout_secs": p.timeout_secs,
        "default": "allow",
    })
}

async fn policy_show(State(ctx): Ctx) -> Result<Json<Value>, ApiError> {
    Ok(Json(policy_json(&ctx).await))
}

fn edit_error(e: PolicyEditError) -> ApiError {
    match e {
        PolicyEditError::Docs(d) => ApiError::from(d),
        PolicyEditError::Rule(r) => ApiError::bad_request(r.to_string()),
    }
}

async fn rule_set(
    State(ctx): Ctx,
    JsonBody(body): JsonBody<RuleBody>,
) -> Result<Json<Value>, ApiError> {
    let action = Action::parse(body.action.trim()).ok_or_else(|| {
        ApiError::bad_request(format!(
            "action {:?}: expected allow, ask or deny",
            body.action
        ))
    })?;
    let rule = Rule {
        tool: body.tool.trim().to_string(),
        args: body.args.filter(|a| !a.is_empty()),
        action,
    };
    approvals::edit_policy(&ctx.docs, now(&ctx), move |s, now| {
        policy::set_rule(s, &rule, now)
    })
    .await
    .map_err(edit_error)?;
    Ok(Json(policy_json(&ctx).await))
}

async fn rule_remove(State(ctx): Ctx, Query(q): Query<RuleQuery>) -> Result<Json<Value>, ApiError> {
    let key = policy::rule_key(q.tool.trim(), q.args.as_deref().filter(|a| !a.is_empty()));
    let k = key.clone();
    let removed = approvals::edit_policy(&ctx.docs, now(&ctx), move |s, now| {
        s.remove(&k, now).map_err(policy::RuleError::from)
    })
    .await
    .map_err(edit_error)?;
    if !removed {
        return Err(ApiError::not_found(format!(
            "no rule for {:?}{} (see `iom approvals policy list`)",
            q.tool,
            q.args
                .map(|a| format!(" with args {a:?}"))
                .unwrap_or_default()
        )));
    }
    Ok(Json(policy_json(&ctx).await))
}

async fn timeout_set(
    State(ctx): Ctx,
    JsonBody(body): JsonBody<TimeoutBody>,
) -> Result<Json<Value>, ApiError> {
    let secs = body.secs;
    if secs.fract() != 0.0 || !(1.0..=86_400.0).contains(&secs) {
        return Err(ApiError::bad_request(
            policy::RuleError::BadTimeout.to_string(),
        ));
    }
    approvals::edit_policy(&ctx.docs, now(&ctx), move |s, now| {
        policy::set_timeout(s, secs as u64, now)
    })
    .await
    .map_err(edit_error)?;
    Ok(Json(policy_json(&ctx).await))
}
