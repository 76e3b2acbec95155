//! `GET /v1/usage`: tokens and cost per day, asking device, model and conversation (from the
//! conversation documents, so any device can answer), with the budgets this device enforces
//! when it holds the agent role.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use axum::routing::get;
use serde::Deserialize;
use serde_json::{Value, json};

use super::ApiError;
use crate::agent::budget::Scope;
use crate::agent::usage;
use crate::node::NodeCtx;

/// Most days a report covers.
pub const MAX_DAYS: u32 = 3660;

/// The usage route.
pub fn routes() -> axum::Router<Arc<NodeCtx>> {
    axum::Router::new().route("/v1/usage", get(report))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UsageQuery {
    /// Days covered, today included (default 30).
    #[serde(default)]
    days: Option<u32>,
}

async fn report(
    State(ctx): State<Arc<NodeCtx>>,
    Query(q): Query<UsageQuery>,
) -> Result<Json<Value>, ApiError> {
    let days = q.days.unwrap_or(30);
    if days == 0 || days > MAX_DAYS {
        return Err(ApiError::bad_request(format!(
            "days must be 1 to {MAX_DAYS}, not {days}"
        )));
    }
    Ok(Json(report_json(&ctx, days).await?))
}

/// The report of the last `days` days as JSON (also used by the web page).
pub async fn report_json(ctx: &NodeCtx, days: u32) -> Result<Value, ApiError> {
    let entries = usage::collect(ctx.asking.conversations()).await?;
    let trust = ctx.trust.state();
    let name = |d: &str| -> Option<String> {
        let id = d.parse::<iom_protocol::keys::DeviceId>().ok()?;
        trust.devices.get(&id).map(|t| t.name.clone())
    };
    let now = crate::time::now_secs() as i64 + ctx.config.clock_offset_secs;
    let report = usage::fold(&entries, now, days, &name);
    let me = ctx.identity.device_id();
    let is_agent = trust.agent.as_ref().is_some_and(|a| a.device == me);
    let budgets = is_agent.then(|| {
        let ledger = ctx.agent.ledger();
        let mut all = ledger.states(None);
        for (id, d) in &trust.devices {
            let id = id.to_string();
            all.extend(
                ledger
                    .states(Some((&id, Some(&d.name))))
                    .into_iter()
                    .filter(|s| s.scope != Scope::Mesh),
            );
        }
        all
    });
    let mut v = serde_json::to_value(report).map_err(|e| ApiError::internal(e.to_string()))?;
    v["agent_here"] = json!(is_agent);
    v["budgets"] = json!(budgets);
    Ok(v)
}
