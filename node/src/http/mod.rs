//! The HTTP listeners: plain HTTP (`iom node run --http IP:PORT` or `[http] listen`, loopback
//! unless forced with `--insecure-http`) and HTTPS (`--https IP:PORT`, [`tls`]). Both serve
//! the same API as the unix socket, with `Authorization: Bearer TOKEN` required on every `/v1`
//! route, plus the webhook endpoint and the embedded web chat page.
//!
//! A forced plain-HTTP bind to anything but loopback is also refused while no token exists, so
//! a node never exposes an API that nobody can use safely. Token management (`/v1/tokens`) is only on the unix
//! socket: a leaked token cannot mint more tokens or revoke the others.
//!
//! # Layout
//! - [`tokens`]: bearer tokens (hashes in the node's state).
//! - [`browser`]: browser devices: pairing with an invite URL, sessions signed with their key.
//! - [`errors`]: JSON errors for everything, including axum's own rejections.
//! - [`webhook`]: `POST /v1/webhook` and durable callback delivery.
//! - [`page`]: the web chat page (`GET /`), embedded in the binary.
//! - [`tls`]: the HTTPS listener's certificate and handshakes.

pub mod browser;
pub mod errors;
pub mod page;
pub mod relayed;
pub mod tls;
pub mod tokens;
pub mod webhook;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::Response;
use tokio::task::JoinHandle;

use axum::response::IntoResponse;

use crate::api::ApiError;
use crate::node::NodeCtx;

/// Why the HTTP listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// A non-loopback bind without any token.
    #[error(
        "refusing to serve HTTP on {addr}: it is not a loopback address and no API token exists; \
         create one first with `iom token create` (while the node runs without --http, or with \
         --http 127.0.0.1:PORT), or listen on 127.0.0.1"
    )]
    NoToken {
        /// The address asked for.
        addr: SocketAddr,
    },
    /// The address could not be bound.
    #[error("cannot listen for HTTP on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The token store could not be read.
    #[error("cannot read the API tokens: {0}")]
    Tokens(#[from] tokens::TokenError),
    /// The HTTPS certificate could not be loaded or made.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

/// Checks the bind policy and binds the listener (call before the node reports ready).
pub async fn bind(ctx: &NodeCtx, addr: SocketAddr) -> Result<tokio::net::TcpListener, HttpError> {
    if !addr.ip().is_loopback() && !tokens::any(&ctx.store)? {
        return Err(HttpError::NoToken { addr });
    }
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })
}

/// The HTTP router: the page (no token), and the API and webhook (token required).
pub fn router(ctx: Arc<NodeCtx>) -> axum::Router {
    let ctx_for_browser = ctx.clone();
    let api = crate::api::routes::router(ctx.clone())
        .merge(webhook::routes(ctx.clone()))
        .merge(crate::api::socket_only::refused_over_http())
        .layer(middleware::from_fn_with_state(ctx, require_token));
    page::routes()
        .merge(browser::routes(ctx_for_browser))
        .merge(api)
        .fallback(errors::no_route)
        .layer(middleware::map_response(errors::json_errors))
}

/// Binds the HTTPS listener with its certificate (the user's, or the node's self-signed one,
/// made now if there is none).
pub async fn bind_https(
    ctx: &NodeCtx,
    config: &crate::config::HttpsConfig,
) -> Result<(tls::TlsListener, tls::TlsMaterial), HttpError> {
    let addr = config.addr;
    let mut names = Vec::new();
    if !addr.ip().is_unspecified() {
        names.push(addr.ip().to_string());
    }
    let material = tls::load(&ctx.config.data_dir, config.cert.as_ref(), &names)?;
    let tcp = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })?;
    let listener =
        tls::TlsListener::new(tcp, &material).map_err(|source| HttpError::Bind { addr, source })?;
    Ok((listener, material))
}

/// Serves `listener` (plain or TLS) until the node shuts down. Call [`webhook::resume`] once
/// beside it.
pub fn serve<L>(ctx: Arc<NodeCtx>, listener: L) -> JoinHandle<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let app = router(ctx.clone());
    let mut shutdown = ctx.shutdown.clone();
    tokio::spawn(async move {
        let r = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = shutdown.wait_for(|s| *s).await;
            })
            .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "the HTTP listener stopped");
        }
    })
}

/// The browser device of a request that came with a session cookie (not a token).
#[derive(Debug, Clone, Copy)]
pub struct SessionDevice(pub iom_protocol::keys::DeviceId);

/// Routes a browser session may not use: inviting, joining, revoking, moving the agent,
/// backups and the person key.
fn admin_only(path: &str) -> bool {
    [
        "/v1/invites",
        "/v1/join",
        "/v1/agent/assign",
        "/v1/backup",
        "/v1/person",
    ]
    .iter()
    .any(|p| path.starts_with(p))
        || (path.starts_with("/v1/devices/") && path.ends_with("/revoke"))
}

/// The presented token: `Authorization: Bearer TOKEN`, or for a WebSocket upgrade (browsers
/// cannot set headers there) a `Sec-WebSocket-Protocol` entry `iom.bearer.TOKEN`.
fn presented_token(headers: &axum::http::HeaderMap) -> Option<String> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(|t| t.trim().to_string());
    bearer.or_else(|| {
        headers
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .find_map(|p| {
                p.trim()
                    .strip_prefix(crate::api::ws::codec::BEARER_PROTOCOL_PREFIX)
                    .map(str::to_string)
            })
    })
}

/// Middleware: a valid `Authorization: Bearer TOKEN` or 401. The token's record goes into the
/// request's extensions (the WebSocket route watches it for revocation).
async fn require_token(State(ctx): State<Arc<NodeCtx>>, mut req: Request, next: Next) -> Response {
    let token = presented_token(req.headers());
    if token.is_none()
        && let Some(device) = browser::session_device(&ctx, req.headers())
    {
        if admin_only(req.uri().path()) {
            return ApiError::forbidden("a browser device may not administer the mesh")
                .into_response();
        }
        req.extensions_mut().insert(SessionDevice(device));
        return next.run(req).await;
    }
    let Some(token) = token else {
        return errors::unauthorized(
            "missing `Authorization: Bearer TOKEN` (create a token with `iom token create`)",
        );
    };
    match tokens::verify(&ctx.store, &token) {
        Ok(Some(record)) => {
            req.extensions_mut().insert(record);
            next.run(req).await
        }
        Ok(None) => errors::unauthorized("unknown or revoked token"),
        Err(e) => {
            tracing::warn!(error = %e, "cannot check a token");
            errors::unauthorized("cannot check the token")
        }
    }
}
