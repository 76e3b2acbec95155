//! The relay's metrics listener (`iom relay run --metrics-listen IP:PORT`): `GET /metrics` in
//! the Prometheus text format, with `Authorization: Bearer TOKEN` required when a token is set
//! (`--metrics-token-file`). A bind to anything but loopback without a token is refused.

use std::net::SocketAddr;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::server::RelayMetricsSource;

/// Why the metrics listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsListenError {
    /// A non-loopback address without a token.
    #[error(
        "refusing to serve metrics on {0} without a token: it is not a loopback address; pass \
         --metrics-token-file FILE (a file holding the bearer token) or listen on 127.0.0.1"
    )]
    NoToken(SocketAddr),
    /// The address could not be bound.
    #[error("cannot listen for metrics on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
}

#[derive(Clone)]
struct MetricsState {
    source: RelayMetricsSource,
    token: Option<String>,
}

/// Binds `addr` (checking the token policy) and returns the listener.
pub async fn bind(
    addr: SocketAddr,
    token: Option<&str>,
) -> Result<tokio::net::TcpListener, MetricsListenError> {
    if !addr.ip().is_loopback() && token.is_none() {
        return Err(MetricsListenError::NoToken(addr));
    }
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsListenError::Bind { addr, source })
}

/// Serves `GET /metrics` on `listener` until the task is aborted.
pub fn serve(
    listener: tokio::net::TcpListener,
    source: RelayMetricsSource,
    token: Option<String>,
) -> tokio::task::JoinHandle<()> {
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(metrics))
        .with_state(MetricsState { source, token });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "the metrics listener stopped");
        }
    })
}

async fn metrics(State(s): State<MetricsState>, headers: HeaderMap) -> Response {
    if let Some(token) = &s.token {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .unwrap_or("");
        if !crate::http::tokens::eq_ct(presented, token) {
            return (
                StatusCode::UNAUTHORIZED,
                "missing or wrong `Authorization: Bearer TOKEN`\n",
            )
                .into_response();
        }
    }
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        s.source.render(),
    )
        .into_response()
}
