//! Every error of the API comes back as our JSON [`ErrorBody`](crate::api::error::ErrorBody),
//! including the ones axum produces itself (bad JSON, wrong content type, body too large, no
//! such route, wrong method), which it would otherwise send as plain text.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::api::ApiError;

/// Largest plain-text error body read when converting it.
const MAX_TEXT: usize = 16 * 1024;

/// A 401 with a `WWW-Authenticate: Bearer` header.
pub fn unauthorized(message: impl Into<String>) -> Response {
    let mut r = ApiError {
        status: StatusCode::UNAUTHORIZED,
        code: "unauthorized",
        message: message.into(),
    }
    .into_response();
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

/// The fallback for unknown paths: a JSON 404.
pub async fn no_route() -> ApiError {
    ApiError::not_found("no such route (see docs/openapi.yaml)")
}

/// Response middleware (`axum::middleware::map_response`): an error response that is not JSON
/// is rewritten as a JSON error with a stable code; the status stays, except that axum's 422
/// (JSON of the wrong shape) becomes a 400 like every other invalid request.
pub async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/json"));
    if is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, MAX_TEXT)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let (status, code, fallback): (StatusCode, &'static str, &str) = match status {
        StatusCode::BAD_REQUEST if text.contains("JSON") => {
            (status, "bad_json", "the body is not valid JSON")
        }
        StatusCode::UNPROCESSABLE_ENTITY => (
            StatusCode::BAD_REQUEST,
            "bad_json",
            "the JSON body does not have the expected fields",
        ),
        StatusCode::BAD_REQUEST => (status, "bad_request", "bad request"),
        StatusCode::NOT_FOUND => (status, "not_found", "not found"),
        StatusCode::METHOD_NOT_ALLOWED => (
            status,
            "method_not_allowed",
            "this method is not allowed on this route",
        ),
        StatusCode::PAYLOAD_TOO_LARGE => (
            status,
            "too_large",
            "the request body is larger than the limit",
        ),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => (
            status,
            "unsupported_media_type",
            "send the body as JSON with `Content-Type: application/json`",
        ),
        s if s.is_server_error() => (s, "internal", "internal error"),
        s => (s, "http", "request refused"),
    };
    let message = match (code, text.is_empty()) {
        (_, true) => fallback.to_string(),
        ("too_large", false) => format!(
            "{fallback} ({} bytes for JSON): {text}",
            crate::api::routes::MAX_JSON_BODY
        ),
        ("unsupported_media_type", false) => format!("{fallback}: {text}"),
        _ => text,
    };
    let mut r = ApiError {
        status,
        code,
        message,
    }
    .into_response();
    if let Some(allow) = parts.headers.get(header::ALLOW) {
        r.headers_mut().insert(header::ALLOW, allow.clone());
    }
    r
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    async fn convert(status: StatusCode, text: &str) -> (StatusCode, serde_json::Value) {
        let mut resp = Response::new(axum::body::Body::from(text.to_string()));
        *resp.status_mut() = status;
        let r = json_errors(resp).await;
        let s = r.status();
        let b = axum::body::to_bytes(r.into_body(), 1 << 16).await.unwrap();
        (s, serde_json::from_slice(&b).unwrap())
    }

    #[tokio::test]
    async fn plain_errors_become_json() {
        let (s, v) = convert(
            StatusCode::BAD_REQUEST,
            "Failed to parse the request body as JSON: expected value at line 1 column 1",
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert_eq!(v["error"]["code"], "bad_json");
        let (s, v) = convert(StatusCode::UNPROCESSABLE_ENTITY, "missing field `prompt`").await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert!(v["error"]["message"].as_str().unwrap().contains("prompt"));
        let (s, v) = convert(StatusCode::METHOD_NOT_ALLOWED, "").await;
        assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(v["error"]["code"], "method_not_allowed");
    }
}
