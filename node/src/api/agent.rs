//! Agent routes: ask, follow a request (SSE), conversations, the agent role.

use super::body::JsonBody;
use std::convert::Infallible;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::routing::{get, post};
use futures::{Stream, StreamExt};
use iom_crdt::{DocKind, Interface};
use serde::Deserialize;
use serde_json::{Value, json};

use super::ApiError;
use super::routes::parse_doc_id;
use crate::agent::ask::AskError;
use crate::agent::conversations::{EditError, ExistingError, ShowError};
use crate::agent::role::{AgentRole, AssignError};
use crate::agent::runner::Poke;
use crate::node::NodeCtx;

type Ctx = State<Arc<NodeCtx>>;

/// Routes for the agent.
pub fn routes() -> axum::Router<Arc<NodeCtx>> {
    axum::Router::new()
        .route("/v1/ask", post(ask_route))
        .route("/v1/conversations", get(list))
        .route("/v1/conversations/{id}", get(show))
        .route("/v1/conversations/{id}/requests/{rid}/events", get(events))
        .route("/v1/agent", get(status))
        .route("/v1/agent/assign", post(assign))
}

/// Body of `POST /v1/ask`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AskBody {
    /// The prompt.
    pub prompt: String,
    /// Existing conversation id.
    #[serde(default)]
    pub conversation: Option<String>,
    /// Client-chosen request id (for deduplication of retries).
    #[serde(default)]
    pub request_id: Option<String>,
    /// `cli` (default), `web`, `webhook`, `schedule` or `email`.
    #[serde(default)]
    pub interface: Option<String>,
    /// Files to attach: blobs already stored here (`POST /v1/blobs`), with their names.
    #[serde(default)]
    pub attachments: Vec<crate::agent::ask::Attach>,
    /// The model to answer with: `NAME` or `NAME/MODEL` (`iom models list`); absent: the
    /// mesh's default.
    #[serde(default)]
    pub model: Option<String>,
}

/// Parses an interface name.
pub fn parse_interface(text: Option<&str>) -> Result<Interface, ApiError> {
    match text.unwrap_or("cli") {
        "cli" => Ok(Interface::Cli),
        "web" => Ok(Interface::Web),
        "webhook" => Ok(Interface::Webhook),
        "schedule" => Ok(Interface::Schedule),
        "email" => Ok(Interface::Email),
        other => Err(ApiError::bad_request(format!(
            "unknown interface {other:?}: expected cli, web, webhook, schedule or email"
        ))),
    }
}

async fn ask_route(
    State(ctx): Ctx,
    JsonBody(body): JsonBody<AskBody>,
) -> Result<Json<Value>, ApiError> {
    let conversation = body.conversation.as_deref().map(parse_doc_id).transpose()?;
    let interface = parse_interface(body.interface.as_deref())?;
    let asked = ctx
        .asking
        .ask_model(
            &body.prompt,
            conversation,
            interface,
            body.request_id,
            &body.attachments,
            body.model.as_deref(),
        )
        .await?;
    Ok(Json(
        serde_json::to_value(asked).map_err(|e| ApiError::internal(e.to_string()))?,
    ))
}

async fn list(State(ctx): Ctx) -> Result<Json<Value>, ApiError> {
    let mut items = Vec::new();
    for (id, meta) in ctx.docs.list()? {
        if meta.kind != DocKind::Conversation.name() {
            continue;
        }
        let summary = ctx
            .asking
            .conversations()
            .read(id, |c| {
                let msgs = c.messages();
                let last = msgs
                    .iter()
                    .rev()
                    .find_map(|m| m.status.map(|s| s.name().to_string()));
                (c.title(), msgs.len(), c.usage_totals(), last)
            })
            .await?
            .ok();
        if let Some((title, messages, usage, last_status)) = summary {
            items.push(json!({
                "id": id.to_string(),
                "title": title,
                "messages": messages,
                "usage": usage,
                "last_status": last_status,
                "updated_at": meta.updated_at,
            }));
        }
    }
    items.sort_by_key(|v| std::cmp::Reverse(v["updated_at"].as_u64().unwrap_or(0)));
    Ok(Json(json!({ "conversations": items })))
}

async fn show(State(ctx): Ctx, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let id = parse_doc_id(&id)?;
    Ok(Json(ctx.asking.conversations().to_json(id).await?))
}

async fn events(
    State(ctx): Ctx,
    Path((id, rid)): Path<(String, String)>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let id = parse_doc_id(&id)?;
    ctx.docs
        .meta(id)?
        .ok_or_else(|| ApiError::not_found(format!("no conversation {id} on this device")))?;
    let stream = ctx.asking.follow(id, rid).map(|ev| {
        let name = serde_json::to_value(&ev)
            .ok()
            .and_then(|v| v["type"].as_str().map(str::to_string))
            .unwrap_or_else(|| "event".into());
        Ok(Event::default()
            .event(name)
            .json_data(&ev)
            .unwrap_or_else(|_| Event::default().data("{}")))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// The agent status as JSON.
pub fn status_json(ctx: &NodeCtx) -> Value {
    let state = ctx.trust.state();
    let holder = role(ctx).holder();
    let me = ctx.identity().device.id();
    let (name, link) = match holder {
        Some((d, _)) => (
            state.devices.get(&d).map(|t| t.name.clone()),
            if d == me {
                "self".to_string()
            } else {
                ctx.net.link(&d.to_peer_id()).to_string()
            },
        ),
        None => (None, "none".into()),
    };
    let this_is_agent = holder.is_some_and(|(d, _)| d == me);
    let key = this_is_agent.then(|| {
        crate::agent::claude::ApiKey::from_env_or_file(
            ctx.config.api_key.clone(),
            ctx.config.agent.key_file.as_deref(),
        )
        .map(|_| "configured".to_string())
        .unwrap_or_else(|e| e.to_string())
    });
    json!({
        "agent": holder.map(|(d, _)| d.to_string()),
        "name": name,
        "epoch": holder.map(|(_, e)| e),
        "this_device": this_is_agent,
        "connection": link,
        "running": ctx.agent.running(),
        "api_key": key,
        "model": this_is_agent.then(|| ctx.config.agent.model.clone()),
        "tokens_today": this_is_agent.then(|| ctx.agent.tokens_used_today()),
        "daily_token_budget": this_is_agent.then_some(ctx.config.agent.daily_token_budget),
    })
}

async fn status(State(ctx): Ctx) -> Json<Value> {
    Json(status_json(&ctx))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AssignBody {
    device: String,
}

async fn assign(
    State(ctx): Ctx,
    JsonBody(body): JsonBody<AssignBody>,
) -> Result<Json<Value>, ApiError> {
    let device = super::mesh::resolve_device(&ctx, &body.device)?;
    let epoch = role(&ctx).assign(device).await?;
    Ok(Json(json!({ "agent": device.to_string(), "epoch": epoch })))
}

fn role(ctx: &NodeCtx) -> AgentRole {
    AgentRole::new(ctx.identity.clone(), ctx.trust.clone())
}

impl From<ExistingError> for ApiError {
    fn from(e: ExistingError) -> ApiError {
        match e {
            ExistingError::Docs(e) => e.into(),
            ExistingError::NotFound(_) => ApiError::not_found(e.to_string()),
            ExistingError::WrongKind { .. } => ApiError::bad_request(e.to_string()),
        }
    }
}

impl From<EditError> for ApiError {
    fn from(e: EditError) -> ApiError {
        use iom_crdt::ConversationError;
        match e {
            EditError::Docs(e) => e.into(),
            EditError::Conversation(ConversationError::Document(_)) => {
                ApiError::bad_request(e.to_string())
            }
            _ => ApiError::internal(e.to_string()),
        }
    }
}

impl From<ShowError> for ApiError {
    fn from(e: ShowError) -> ApiError {
        match e {
            ShowError::Docs(e) => e.into(),
            _ => ApiError::bad_request(e.to_string()),
        }
    }
}

impl From<AskError> for ApiError {
    fn from(e: AskError) -> ApiError {
        match e {
            AskError::Conversation(e) => e.into(),
            AskError::Edit(e) => e.into(),
            AskError::Store(e) => e.into(),
            AskError::AttachmentMissing { .. } => ApiError::not_found(e.to_string()),
            _ => ApiError::bad_request(e.to_string()),
        }
    }
}

impl From<AssignError> for ApiError {
    fn from(e: AssignError) -> ApiError {
        match e {
            AssignError::NotAdmin => ApiError::forbidden(e.to_string()),
            AssignError::NotTrusted(_) => ApiError::bad_request(e.to_string()),
            AssignError::Store(e) => e.into(),
            _ => ApiError::internal(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;
    use iom_crdt::{ConversationError, DocId, DocumentError};

    use super::*;
    use crate::docs::DocsError;

    fn status(e: impl Into<ApiError>) -> (StatusCode, String) {
        let e = e.into();
        (e.status, e.message)
    }

    #[test]
    fn ask_errors_keep_their_statuses_and_messages() {
        let id = DocId::from_bytes([1; 16]);
        assert_eq!(
            status(AskError::EmptyPrompt),
            (StatusCode::BAD_REQUEST, "the prompt is empty".into())
        );
        assert_eq!(
            status(AskError::PromptTooLong(300_000)).0,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status(AskError::BadRequestId),
            (
                StatusCode::BAD_REQUEST,
                "a request id is 1 to 128 characters".into()
            )
        );
        assert_eq!(
            status(AskError::Conversation(ExistingError::NotFound(id))),
            (
                StatusCode::NOT_FOUND,
                format!("no conversation {id} on this device (see `iom conversations list`)")
            )
        );
        assert_eq!(
            status(AskError::Conversation(ExistingError::WrongKind {
                id,
                kind: "memory".into()
            }))
            .0,
            StatusCode::BAD_REQUEST
        );
        // Store trouble keeps the document service's mapping.
        assert_eq!(
            status(AskError::Edit(EditError::Docs(DocsError::NotFound(id)))).0,
            StatusCode::NOT_FOUND
        );
        // Not a conversation: the caller's mistake; a refused change: ours.
        assert_eq!(
            status(EditError::Conversation(ConversationError::Document(
                DocumentError::WrongKind {
                    expected: DocKind::Conversation,
                    found: "memory".into(),
                }
            )))
            .0,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status(EditError::Conversation(ConversationError::RequestNotFound(
                "r".into()
            )))
            .0,
            StatusCode::INTERNAL_SERVER_ERROR
        );
        assert_eq!(
            status(ShowError::Docs(DocsError::NotFound(id))).0,
            StatusCode::NOT_FOUND
        );
    }

    #[test]
    fn assign_errors_keep_their_statuses_and_messages() {
        assert_eq!(
            status(AssignError::NotAdmin),
            (
                StatusCode::FORBIDDEN,
                "only an admin device can assign the agent role; run this on an admin device"
                    .into()
            )
        );
        let d = iom_protocol::keys::DeviceKey::from_seed([3; 32]).id();
        assert_eq!(
            status(AssignError::NotTrusted(d)),
            (
                StatusCode::BAD_REQUEST,
                format!("{d} is not a trusted device of this mesh (see `iom devices`)")
            )
        );
    }
}
