//! Routes served on the unix socket only. Over HTTP the listener answers them with `403
//! forbidden` and the reason, so a client over TCP learns where they live instead of getting a
//! bare 404: a bearer token must not be able to mint or revoke tokens, take a snapshot holding
//! the device's keys, or install a person key.

use axum::routing::{delete, get, post};

use super::ApiError;

/// The stand-ins the HTTP listener serves for the unix-socket-only routes.
pub fn refused_over_http() -> axum::Router {
    async fn tokens() -> ApiError {
        ApiError::forbidden(
            "tokens are managed over the unix socket only (`iom token create|list|revoke` on \
             the device itself): a token cannot mint or revoke tokens",
        )
    }
    async fn backup() -> ApiError {
        ApiError::forbidden(
            "backups and the person key are handled over the unix socket only (`iom backup`, \
             `iom person` on the device itself): a snapshot holds the device's keys",
        )
    }
    axum::Router::new()
        .route("/v1/tokens", get(tokens).post(tokens))
        .route("/v1/tokens/{id}", delete(tokens))
        .route("/v1/backup/snapshot", post(backup))
        .route("/v1/person/key", post(backup))
}
