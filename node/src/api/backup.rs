//! Backup routes, served on the unix socket only (a snapshot holds the device's keys):
//! `POST /v1/backup/snapshot` streams the plaintext of a consistent snapshot (the CLI encrypts
//! it), and `POST /v1/person/key` installs an imported person key in the running node.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::Deserialize;
use serde_json::{Value, json};

use super::ApiError;
use crate::backup::snapshot::{Snapshot, SnapshotOptions};
use crate::node::NodeCtx;

type Ctx = State<Arc<NodeCtx>>;

/// The backup routes, with state.
pub fn routes(ctx: Arc<NodeCtx>) -> axum::Router {
    axum::Router::new()
        .route("/v1/backup/snapshot", post(snapshot))
        .route("/v1/person/key", post(person_key))
        .with_state(ctx)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotBody {
    #[serde(default)]
    blobs: bool,
    /// Catalog hashes of blobs earlier archives hold, with the archive holding each.
    #[serde(default)]
    known: HashMap<String, String>,
}

/// A `Write` that sends what it gets to the response body.
struct ChannelWriter(tokio::sync::mpsc::Sender<std::io::Result<bytes::Bytes>>);

impl std::io::Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .blocking_send(Ok(bytes::Bytes::copy_from_slice(buf)))
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client went away")
            })?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn snapshot(State(ctx): Ctx, Json(body): Json<SnapshotBody>) -> Result<Response, ApiError> {
    // Every acknowledged write is flushed already; this makes received changes durable too.
    ctx.store.flush().await?;
    let store = ctx.store.clone();
    let data_dir = ctx.config.data_dir.clone();
    let opts = SnapshotOptions {
        blobs: body.blobs,
        known: body.known,
    };
    let snap = tokio::task::spawn_blocking(move || Snapshot::collect(&store, &data_dir, &opts))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::internal(format!("cannot take a snapshot: {e}")))?;
    tracing::info!(
        entries = snap.manifest().entries.len(),
        bytes = snap.manifest().bytes(),
        "backup snapshot taken"
    );
    let (tx, mut rx) = tokio::sync::mpsc::channel(8);
    let store = ctx.store.clone();
    tokio::task::spawn_blocking(move || {
        let mut w = ChannelWriter(tx.clone());
        if let Err(e) = snap.write(&store, &mut w) {
            tracing::warn!(%e, "backup snapshot stream failed");
            let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
        }
    });
    let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Body::from_stream(stream),
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PersonKeyBody {
    /// The key's seed, hex.
    seed: String,
}

async fn person_key(
    State(ctx): Ctx,
    Json(body): Json<PersonKeyBody>,
) -> Result<Json<Value>, ApiError> {
    let seed: [u8; 32] = hex::decode(body.seed.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| ApiError::bad_request("seed must be 64 hex digits"))?;
    let key = iom_protocol::keys::PersonKey::from_seed(seed);
    crate::backup::kit::check_person(&key, &ctx.identity.person())
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    ctx.identity
        .install_person_key(key)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    // The person key makes this device an admin: certify it as one, as the first device is.
    let name = ctx
        .trust
        .state()
        .devices
        .get(&ctx.identity.device_id())
        .map(|d| d.name.clone())
        .unwrap_or_else(|| ctx.config.name.clone());
    let me = ctx.identity.device_id();
    if !ctx.trust.state().is_admin(&me) {
        let cert = ctx
            .identity
            .issue(iom_protocol::cert::CertBody::Device {
                kind: None,
                person: ctx.identity.person(),
                device: me,
                name,
                admin: true,
                issued_at: crate::time::now_secs(),
            })
            .map_err(|e| ApiError::internal(format!("cannot certify this device: {e}")))?;
        ctx.trust.add(vec![cert]).await?;
    }
    tracing::info!("person key imported from a recovery kit");
    Ok(Json(json!({
        "person": ctx.identity.person().to_string(),
        "holds_person_key": true,
    })))
}
