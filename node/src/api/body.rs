//! JSON request bodies. [`JsonBody`] is axum's `Json` with one more rule: the body must be a
//! JSON object. serde's derived structs also accept a JSON array of the fields in order (so
//! `[null, null]` would be a valid "empty" body), which the API documents nowhere; refusing it
//! keeps the server and `docs/openapi.yaml` in agreement. Rejections keep axum's statuses
//! (400 not JSON, 413 too large, 415 not `application/json`), and the JSON error shape of
//! `http::errors`.

use axum::Json;
use axum::extract::{FromRequest, OptionalFromRequest, Request};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::ApiError;

/// A JSON object body deserialized into `T`. `Option<JsonBody<T>>` is `None` when the request
/// has no `Content-Type` (no body).
#[derive(Debug, Clone)]
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let Json(value) = <Json<Value> as FromRequest<S>>::from_request(req, state)
            .await
            .map_err(IntoResponse::into_response)?;
        from_object(value)
            .map(JsonBody)
            .map_err(IntoResponse::into_response)
    }
}

impl<S: Send + Sync, T: DeserializeOwned> OptionalFromRequest<S> for JsonBody<T> {
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Option<Self>, Self::Rejection> {
        let value = <Json<Value> as OptionalFromRequest<S>>::from_request(req, state)
            .await
            .map_err(IntoResponse::into_response)?;
        match value {
            None => Ok(None),
            Some(Json(value)) => from_object(value)
                .map(|t| Some(JsonBody(t)))
                .map_err(IntoResponse::into_response),
        }
    }
}

/// `value` as a `T`, if it is an object with the fields `T` expects.
fn from_object<T: DeserializeOwned>(value: Value) -> Result<T, ApiError> {
    if !value.is_object() {
        return Err(ApiError::bad_json("the body must be a JSON object"));
    }
    serde_json::from_value(value).map_err(|e| {
        ApiError::bad_json(format!(
            "the JSON body does not have the expected fields: {e}"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Body {
        #[serde(default)]
        a: Option<u32>,
        #[serde(default)]
        b: Option<String>,
    }

    #[test]
    fn only_objects_are_bodies() {
        assert_eq!(
            from_object::<Body>(serde_json::json!({"a": 1})).expect("an object"),
            Body {
                a: Some(1),
                b: None
            }
        );
        for bad in [
            serde_json::json!([null, null]),
            serde_json::json!([1, "x"]),
            serde_json::json!(null),
            serde_json::json!("text"),
        ] {
            let err = from_object::<Body>(bad.clone()).expect_err("not an object");
            assert_eq!(err.code, "bad_json", "{bad}");
            assert_eq!(err.status, axum::http::StatusCode::BAD_REQUEST);
        }
        let err = from_object::<Body>(serde_json::json!({"c": 1})).expect_err("unknown field");
        assert!(err.message.contains("unknown field"), "{}", err.message);
    }
}
