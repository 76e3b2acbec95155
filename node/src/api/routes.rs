//! Routes of the local API. Every handler is thin: it validates input, calls a service and maps
//! errors to [`ApiError`].

use super::body::JsonBody;
use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use iom_crdt::{DocId, DocKind, Document};
use serde::Deserialize;
use serde_json::{Value, json};

use super::ApiError;
use crate::docs::Origin;
use crate::node::NodeCtx;

/// Largest JSON body accepted.
pub const MAX_JSON_BODY: usize = 1 << 20;

type Ctx = State<Arc<NodeCtx>>;
type ApiResult<T = Json<Value>> = Result<T, ApiError>;

/// Builds the router shared by the unix socket and the HTTP listener.
pub fn router(ctx: Arc<NodeCtx>) -> axum::Router {
    axum::Router::new()
        .route("/v1/status", get(status))
        .route("/v1/docs", get(doc_list).post(doc_new))
        .route("/v1/docs/{id}", get(doc_get).put(doc_put))
        .route("/v1/docs/{id}/log", get(doc_log))
        .route(
            "/v1/blobs",
            get(blob_list)
                .post(blob_add)
                .layer(DefaultBodyLimit::disable()),
        )
        .route("/v1/blobs/{hash}", get(blob_get))
        .route("/v1/memory", get(memory_show).put(memory_replace))
        .route("/v1/memory/append", post(memory_append))
        .merge(super::mesh::routes())
        .merge(super::metrics::routes())
        .merge(super::usage::routes())
        .merge(super::doctor::routes())
        .merge(super::agent::routes())
        .merge(super::schedules::routes())
        .merge(super::models::routes())
        .merge(super::approvals::routes())
        .merge(super::tools::routes())
        .merge(super::callbacks::routes())
        .merge(super::ws::routes())
        .merge(super::email::routes())
        .layer(DefaultBodyLimit::max(MAX_JSON_BODY))
        .layer(axum::middleware::map_response(
            crate::http::errors::json_errors,
        ))
        .with_state(ctx)
}

/// Parses a document id from a path segment.
pub fn parse_doc_id(text: &str) -> Result<DocId, ApiError> {
    text.parse::<DocId>()
        .map_err(|e| ApiError::bad_request(format!("{text:?} is not a document id: {e}")))
}

async fn status(State(ctx): Ctx) -> ApiResult {
    Ok(Json(ctx.status_json().await))
}

async fn doc_list(State(ctx): Ctx) -> ApiResult {
    let docs = ctx.docs.list()?;
    let items: Vec<Value> = docs
        .into_iter()
        .map(|(id, m)| {
            json!({
                "id": id.to_string(),
                "kind": m.kind,
                "heads": m.heads.iter().map(hex::encode).collect::<Vec<_>>(),
                "created_at": m.created_at,
                "updated_at": m.updated_at,
            })
        })
        .collect();
    Ok(Json(json!({ "documents": items })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewDoc {
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    content: Option<serde_json::Map<String, Value>>,
}

async fn doc_new(State(ctx): Ctx, body: Option<JsonBody<NewDoc>>) -> ApiResult {
    let body = body.map(|JsonBody(b)| b).unwrap_or(NewDoc {
        kind: None,
        content: None,
    });
    let kind = match body.kind.as_deref() {
        None => DocKind::Generic,
        Some(k) => k.parse::<DocKind>().map_err(|e| {
            ApiError::bad_request(format!(
                "{e}; expected one of conversation, memory, schedules, settings, generic"
            ))
        })?,
    };
    let fields = body.content.unwrap_or_default();
    let now = crate::time::now_secs() as i64;
    // Every field is tried on a scratch document first, so bad content (an empty or dotted
    // key, a reserved field, too deep a value) is a 400 and no document is created.
    check_initial_content(kind, &fields, now)?;
    let id = ctx
        .docs
        .create_with(kind, move |doc| {
            for (k, v) in fields {
                doc.put_json(&k, v, "initial content", now)
                    .map_err(crate::docs::DocsError::from)?;
            }
            Ok(())
        })
        .await?;
    Ok(Json(json!({ "id": id.to_string(), "kind": kind.name() })))
}

/// Whether `fields` can be a new document's top-level fields: each key one path segment (not
/// empty, no `.`), each value accepted by a scratch document of `kind`.
fn check_initial_content(
    kind: DocKind,
    fields: &serde_json::Map<String, Value>,
    now: i64,
) -> Result<(), ApiError> {
    if fields.is_empty() {
        return Ok(());
    }
    if let Some(key) = fields.keys().find(|k| k.is_empty() || k.contains('.')) {
        return Err(ApiError::bad_request(format!(
            "content key {key:?}: top-level keys must be non-empty and contain no '.' \
             (set nested values with PUT /v1/docs/{{id}} and a dotted path)"
        )));
    }
    let mut scratch =
        Document::new(kind, &[0; 16], now).map_err(|e| ApiError::internal(e.to_string()))?;
    for (k, v) in fields {
        scratch
            .put_json(k, v.clone(), "check", now)
            .map_err(|e| ApiError::bad_request(format!("content key {k:?}: {e}")))?;
    }
    Ok(())
}

#[derive(Deserialize)]
struct AtQuery {
    at: Option<String>,
    path: Option<String>,
}

async fn doc_get(State(ctx): Ctx, Path(id): Path<String>, Query(q): Query<AtQuery>) -> ApiResult {
    let id = parse_doc_id(&id)?;
    let at =
        q.at.map(|a| iom_crdt::parse_heads(&a).map_err(|e| ApiError::bad_request(e.to_string())))
            .transpose()?;
    let path = q.path;
    let value = ctx
        .docs
        .read(id, move |doc| -> Result<Value, ApiError> {
            let view;
            let doc: &Document = match &at {
                Some(heads) => {
                    view = doc
                        .view_at(heads)
                        .map_err(|e| ApiError::bad_request(e.to_string()))?;
                    &view
                }
                None => doc,
            };
            let content = match &path {
                Some(p) => doc
                    .get_json(p)
                    .map_err(|e| ApiError::bad_request(e.to_string()))?
                    .ok_or_else(|| ApiError::not_found(format!("no value at path {p:?}")))?,
                None => doc.to_json(),
            };
            Ok(json!({ "id": id.to_string(), "heads": doc.heads_hex(), "content": content }))
        })
        .await??;
    Ok(Json(value))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutBody {
    path: String,
    #[serde(default)]
    value: Option<Value>,
    #[serde(default)]
    delete: bool,
    #[serde(default)]
    message: Option<String>,
}

async fn doc_put(
    State(ctx): Ctx,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<PutBody>,
) -> ApiResult {
    let id = parse_doc_id(&id)?;
    let now = crate::time::now_secs() as i64;
    let message = body.message.unwrap_or_else(|| format!("set {}", body.path));
    let heads = ctx
        .docs
        .modify(id, Origin::Local, false, move |doc| {
            let r = if body.delete {
                doc.delete_path(&body.path, &message, now).map(|_| ())
            } else {
                let value = body.value.unwrap_or(Value::Null);
                doc.put_json(&body.path, value, &message, now)
            };
            Ok(r.map(|()| doc.heads_hex()))
        })
        .await?
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(Json(json!({ "id": id.to_string(), "heads": heads })))
}

async fn doc_log(State(ctx): Ctx, Path(id): Path<String>) -> ApiResult {
    let id = parse_doc_id(&id)?;
    let log = ctx
        .docs
        .read(id, |doc| serde_json::to_value(doc.history()))
        .await?
        .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(Json(json!({ "id": id.to_string(), "changes": log })))
}

/// Pieces of an upload waiting for the writer thread.
const UPLOAD_AHEAD: usize = 16;

/// Stores an uploaded blob. Hashing and writing run on a blocking thread, a few pieces behind
/// the network, never on the async workers.
async fn blob_add(State(ctx): Ctx, body: Body) -> ApiResult {
    let mut writer = ctx.store.blob_writer(None)?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(UPLOAD_AHEAD);
    let disk = tokio::task::spawn_blocking(move || {
        while let Some(piece) = rx.blocking_recv() {
            writer.write(&piece)?;
        }
        Ok::<_, crate::store::StoreError>(writer)
    });
    let mut stream = body.into_data_stream();
    let mut interrupted = None;
    while let Some(piece) = stream.next().await {
        match piece {
            Ok(piece) => {
                if tx.send(piece).await.is_err() {
                    break; // the writer failed; its error is returned below
                }
            }
            Err(e) => {
                interrupted = Some(e);
                break;
            }
        }
    }
    drop(tx);
    let writer = disk
        .await
        .map_err(|e| ApiError::internal(format!("blob writer: {e}")))??;
    if let Some(e) = interrupted {
        // The chunks written so far are garbage-collected at the next start.
        return Err(ApiError::bad_request(format!("upload interrupted: {e}")));
    }
    let (id, meta) = writer.finish().await?;
    ctx.blob_added(id, meta.len);
    Ok(Json(json!({ "hash": hex::encode(id), "len": meta.len })))
}

async fn blob_list(State(ctx): Ctx) -> ApiResult {
    let blobs: Vec<Value> = ctx
        .store
        .blobs()?
        .into_iter()
        .map(|(id, m)| json!({ "hash": hex::encode(id), "len": m.len, "stored_at": m.stored_at }))
        .collect();
    Ok(Json(json!({ "blobs": blobs })))
}

/// Parses a blob hash (64 hex characters).
pub fn parse_hash(text: &str) -> Result<[u8; 32], ApiError> {
    let bytes = hex::decode(text).map_err(|_| {
        ApiError::bad_request(format!("{text:?} is not a blob hash (64 hex characters)"))
    })?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| {
        ApiError::bad_request(format!("{text:?} is not a blob hash (64 hex characters)"))
    })
}

async fn blob_get(State(ctx): Ctx, Path(hash): Path<String>) -> ApiResult<Response> {
    let id = parse_hash(&hash)?;
    if ctx.store.blob_meta(&id)?.is_none() {
        // Not here yet: fetch it from a connected device that has it.
        ctx.blobs
            .fetch_now(iom_protocol::id::ContentId::from_bytes(id))
            .await
            .map_err(|e| ApiError::not_found(format!("blob {hash} is not on this device: {e}")))?;
    }
    let meta = ctx
        .store
        .blob_meta(&id)?
        .ok_or_else(|| ApiError::not_found(format!("blob {hash} is not stored on this device")))?;
    let len = meta.len;
    let count = meta.chunk_hashes.len() as u32;
    let store = ctx.store.clone();
    let reader = tokio::task::spawn_blocking(move || store.chunk_reader(id, Arc::new(meta)))
        .await
        .map_err(|e| ApiError::internal(format!("opening the blob failed: {e}")))??;
    let reader = Arc::new(reader);
    // Stream chunk by chunk from the file opened once, each checked as it is read.
    let stream = futures::stream::iter(0..count).then(move |i| {
        let reader = reader.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let mut buf = Vec::new();
                reader.read(i, &mut buf).map(|()| bytes::Bytes::from(buf))
            })
            .await
            .map_err(std::io::Error::other)?
            .map_err(std::io::Error::other)
        }
    });
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, len.to_string()),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

async fn memory_show(State(ctx): Ctx) -> ApiResult {
    let text = ctx.memory_text().await?;
    Ok(Json(json!({ "text": text })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TextBody {
    text: String,
}

async fn memory_append(State(ctx): Ctx, JsonBody(body): JsonBody<TextBody>) -> ApiResult {
    let text = ctx.memory_edit(body.text, true).await?;
    Ok(Json(json!({ "text": text })))
}

async fn memory_replace(State(ctx): Ctx, JsonBody(body): JsonBody<TextBody>) -> ApiResult {
    let text = ctx.memory_edit(body.text, false).await?;
    Ok(Json(json!({ "text": text })))
}
