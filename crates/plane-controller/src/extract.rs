//! Request extractors that turn every parse failure into an [`HttpError`], so malformed
//! JSON, wrong field types and invalid names in paths get an `ApiError` body with a 4xx
//! instead of a framework rejection.

use crate::error::HttpError;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use plane_types::api::ApiErrorKind;
use serde::de::DeserializeOwned;
use std::str::FromStr;

/// A JSON body parsed with serde; any content type is accepted.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = HttpError;

    async fn from_request(req: Request, state: &S) -> Result<Self, HttpError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            let status = e.status();
            let status = if status.is_client_error() {
                status
            } else {
                StatusCode::BAD_REQUEST
            };
            HttpError::new(
                status,
                ApiErrorKind::Other,
                format!("cannot read the request body: {e}"),
            )
        })?;
        let value: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| HttpError::bad_request(format!("invalid JSON body: {e}")))?;
        // serde would also accept the sequence form of a struct (`[]`); bodies are objects.
        if !value.is_object() {
            return Err(HttpError::bad_request("the request body must be a JSON object"));
        }
        // No store can keep a NUL in text (PostgreSQL refuses it): refuse it here, with
        // the same answer whatever the store.
        if has_nul(&value) {
            return Err(HttpError::bad_request(
                "the request body must not contain NUL characters (\\u0000)",
            ));
        }
        T::deserialize(value)
            .map(ApiJson)
            .map_err(|e| HttpError::bad_request(format!("invalid request body: {e}")))
    }
}

/// Whether any string (or object key) in `value` contains U+0000.
fn has_nul(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::String(s) => s.contains('\0'),
        serde_json::Value::Array(items) => items.iter().any(has_nul),
        serde_json::Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

/// Parses a name from a URL path segment.
pub fn path_name<T: FromStr>(what: &str, s: &str) -> Result<T, HttpError>
where
    T::Err: std::fmt::Display,
{
    s.parse()
        .map_err(|e| HttpError::bad_request(format!("invalid {what} {s:?} in path: {e}")))
}

/// Parses a cluster name from a URL path segment (`InvalidClusterName` on failure).
pub fn path_cluster(s: &str) -> Result<plane_types::names::ClusterName, HttpError> {
    s.parse().map_err(|e| {
        HttpError::new(
            StatusCode::BAD_REQUEST,
            ApiErrorKind::InvalidClusterName,
            format!("invalid cluster name {s:?}: {e}"),
        )
    })
}

/// Path parameters; a malformed segment (bad percent-encoding, say) is an `ApiError`.
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> axum::extract::FromRequestParts<S> for ApiPath<T> {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, HttpError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| ApiPath(p.0))
            .map_err(|e| HttpError::bad_request(format!("invalid path: {e}")))
    }
}
