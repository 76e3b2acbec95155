//! Schedule routes (`/v1/schedules`): edit the synced schedules document from any device.

use super::body::JsonBody;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::routing::{get, put};
use iom_crdt::schedules::ScheduleError;
use iom_crdt::{DocId, DocKind, ScheduleView, Schedules};
use serde::Deserialize;
use serde_json::{Value, json};

use super::ApiError;
use super::routes::parse_doc_id;
use crate::docs::Origin;
use crate::node::NodeCtx;
use crate::schedule;

type Ctx = State<Arc<NodeCtx>>;

/// Longest scheduled prompt.
const MAX_PROMPT: usize = 64 * 1024;

/// Routes for schedules.
pub fn routes() -> axum::Router<Arc<NodeCtx>> {
    axum::Router::new()
        .route("/v1/schedules", get(list).post(add))
        .route("/v1/schedules/{id}", get(show).delete(remove))
        .route("/v1/schedules/{id}/enabled", put(set_enabled))
}

/// Body of `PUT /v1/schedules/{id}/enabled`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnabledBody {
    /// Whether the schedule fires.
    pub enabled: bool,
}

/// Body of `POST /v1/schedules`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddBody {
    /// Cron expression (UTC).
    pub cron: String,
    /// The prompt.
    pub prompt: String,
    /// Post into this conversation; absent: a new conversation for this schedule.
    #[serde(default)]
    pub conversation: Option<String>,
    /// Deliver results by mail too: `email` (the email channel mails them to its owner).
    #[serde(default)]
    pub to: Option<String>,
    /// The model its requests ask for (`NAME` or `NAME/MODEL`); absent: the mesh's default.
    #[serde(default)]
    pub model: Option<String>,
}

fn view_json(ctx: &NodeCtx, v: &ScheduleView, raw: Option<&Value>) -> Value {
    let now = ctx.scheduler.now();
    let cron = schedule::parse_cron(&v.cron);
    let next = cron.as_ref().ok().and_then(|s| schedule::next_slot(s, now));
    let mut j = serde_json::to_value(v).unwrap_or_else(|_| json!({}));
    j["next_slot"] = json!(next);
    j["cron_error"] = json!(cron.err().map(|e| e.to_string()));
    j["missed_slots"] = raw
        .and_then(|r| r.get("missed_slots").cloned())
        .unwrap_or(json!(0));
    j["last_missed_slot"] = raw
        .and_then(|r| r.get("last_missed_slot").cloned())
        .unwrap_or(Value::Null);
    j
}

async fn read_all(ctx: &NodeCtx) -> Result<Vec<(ScheduleView, Value)>, ApiError> {
    if ctx.docs.meta(DocId::SCHEDULES)?.is_none() {
        return Ok(Vec::new());
    }
    Ok(ctx
        .docs
        .read(DocId::SCHEDULES, |d| {
            let raw = d.to_json();
            Schedules::open(d)
                .map(|s| {
                    s.list()
                        .into_iter()
                        .map(|v| {
                            let r = raw[iom_crdt::schedules::FIELD_ENTRIES][&v.id].clone();
                            (v, r)
                        })
                        .collect()
                })
                .unwrap_or_default()
        })
        .await?)
}

async fn list(State(ctx): Ctx) -> Result<Json<Value>, ApiError> {
    let items: Vec<Value> = read_all(&ctx)
        .await?
        .iter()
        .map(|(v, r)| view_json(&ctx, v, Some(r)))
        .collect();
    Ok(Json(
        json!({ "schedules": items, "now": ctx.scheduler.now() }),
    ))
}

async fn show(State(ctx): Ctx, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    read_all(&ctx)
        .await?
        .iter()
        .find(|(v, _)| v.id == id)
        .map(|(v, r)| Json(view_json(&ctx, v, Some(r))))
        .ok_or_else(|| no_such(&id))
}

async fn add(State(ctx): Ctx, JsonBody(body): JsonBody<AddBody>) -> Result<Json<Value>, ApiError> {
    schedule::parse_cron(&body.cron).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let prompt = body.prompt.trim().to_string();
    if prompt.is_empty() || prompt.len() > MAX_PROMPT {
        return Err(ApiError::bad_request(format!(
            "the prompt is 1 to {MAX_PROMPT} bytes"
        )));
    }
    let to = match body.to.as_deref().map(str::trim) {
        None | Some("" | "conversation") => None,
        Some("email") => Some("email".to_string()),
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "to {other:?}: expected \"email\" (results always go to the conversation)"
            )));
        }
    };
    let model = match body.model.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(m) => Some(
            iom_crdt::ModelChoice::parse(m)
                .map_err(|e| ApiError::bad_request(format!("model: {e}")))?
                .to_string(),
        ),
    };
    let conversation = match body.conversation.as_deref() {
        Some(c) => ctx.asking.conversations().existing(parse_doc_id(c)?)?,
        None => ctx.scheduler.new_conversation(&prompt).await?,
    };
    ctx.docs.create(DocKind::Schedules).await?;
    let id = format!("s{}", hex::encode(crate::time::random_bytes::<4>()));
    let (sid, cron, conv) = (id.clone(), body.cron.trim().to_string(), conversation);
    let now = ctx.scheduler.now();
    ctx.docs
        .modify(DocId::SCHEDULES, Origin::Local, false, move |d| {
            Ok(Schedules::open(&mut *d)
                .map_err(ScheduleError::from)
                .and_then(|mut s| {
                    s.add(&sid, &cron, &prompt, Some(&conv.to_string()), now)?;
                    if let Some(m) = &model {
                        s.set_model(&sid, m, now)?;
                    }
                    match &to {
                        Some(t) => s.set_to(&sid, t, now),
                        None => Ok(()),
                    }
                }))
        })
        .await?
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let all = read_all(&ctx).await?;
    let (v, r) = all
        .iter()
        .find(|(v, _)| v.id == id)
        .ok_or_else(|| ApiError::internal("the new schedule is not readable"))?;
    Ok(Json(view_json(&ctx, v, Some(r))))
}

fn no_such(id: &str) -> ApiError {
    ApiError::not_found(format!("no schedule {id:?} (see `iom schedule list`)"))
}

/// Runs `f` on the schedules document (a local, durable change); `Ok(None)` when there is no
/// schedule `id`.
async fn edit<R, F>(ctx: &NodeCtx, id: &str, f: F) -> Result<Option<R>, ApiError>
where
    F: FnOnce(
            &mut Schedules<&mut iom_crdt::Document>,
            &str,
            i64,
        ) -> Result<Option<R>, ScheduleError>
        + Send
        + 'static,
    R: Send + 'static,
{
    if ctx.docs.meta(DocId::SCHEDULES)?.is_none() {
        return Ok(None);
    }
    let sid = id.to_string();
    let now = ctx.scheduler.now();
    let r = ctx
        .docs
        .modify(DocId::SCHEDULES, Origin::Local, false, move |d| {
            let mut s = Schedules::open(&mut *d)?;
            Ok(match f(&mut s, &sid, now) {
                Err(ScheduleError::NotFound(_)) => Ok(None),
                r => r,
            })
        })
        .await?;
    r.map_err(|e| ApiError::internal(e.to_string()))
}

async fn remove(State(ctx): Ctx, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    edit(&ctx, &id, |s, id, now| Ok(s.remove(id, now)?.then_some(())))
        .await?
        .ok_or_else(|| no_such(&id))?;
    Ok(Json(json!({ "id": id, "removed": true })))
}

/// Enables or disables a schedule (from any device; the change syncs like any other). A
/// disabled schedule keeps its history and fires again from the next slot once enabled.
async fn set_enabled(
    State(ctx): Ctx,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<EnabledBody>,
) -> Result<Json<Value>, ApiError> {
    let enabled = body.enabled;
    edit(&ctx, &id, move |s, id, now| {
        s.set_enabled(id, enabled, now).map(Some)
    })
    .await?
    .ok_or_else(|| no_such(&id))?;
    show(State(ctx), Path(id)).await
}
