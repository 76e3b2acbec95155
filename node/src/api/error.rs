//! API errors: a status code, a stable machine-readable code and a sentence for people.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

/// An error returned by the local API.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable code, e.g. `not_found`, `bad_request`.
    pub code: &'static str,
    /// What went wrong, in words a user can act on.
    pub message: String,
}

/// The JSON body of an error.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// Inside [`ErrorBody`].
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable code.
    pub code: String,
    /// Human message.
    pub message: String,
}

impl ApiError {
    /// 400 `bad_json`: the body is JSON of the wrong shape.
    pub fn bad_json(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "bad_json",
            message: message.into(),
        }
    }

    /// 400.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "bad_request",
            message: message.into(),
        }
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            code: "not_found",
            message: message.into(),
        }
    }

    /// 409.
    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::CONFLICT,
            code: "conflict",
            message: message.into(),
        }
    }

    /// 403.
    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::FORBIDDEN,
            code: "forbidden",
            message: message.into(),
        }
    }

    /// 503.
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "unavailable",
            message: message.into(),
        }
    }

    /// 500.
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "internal",
            message: message.into(),
        }
    }

    /// 507 `disk_full`: below the disk reserve; the write was refused and nothing changed.
    pub fn disk_full(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::INSUFFICIENT_STORAGE,
            code: "disk_full",
            message: message.into(),
        }
    }

    /// 507: the disk is full or the store cannot write.
    pub fn storage(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::INSUFFICIENT_STORAGE,
            code: "storage",
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.into(),
                message: self.message,
            },
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<crate::docs::DocsError> for ApiError {
    fn from(e: crate::docs::DocsError) -> ApiError {
        use crate::docs::DocsError;
        match e {
            DocsError::NotFound(_) => ApiError::not_found(e.to_string()),
            DocsError::Store(s) => s.into(),
            DocsError::Document(_) => ApiError::bad_request(e.to_string()),
            _ => ApiError::internal(e.to_string()),
        }
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> ApiError {
        use crate::store::StoreError;
        match e {
            StoreError::NoSuchBlob(_) | StoreError::NoSuchDoc(_) => {
                ApiError::not_found(e.to_string())
            }
            StoreError::HashMismatch { .. } => ApiError::bad_request(e.to_string()),
            StoreError::DiskFull { .. } => ApiError::disk_full(e.to_string()),
            _ => ApiError::storage(e.to_string()),
        }
    }
}
