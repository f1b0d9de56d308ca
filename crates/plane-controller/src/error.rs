//! The HTTP edge of every failure: an [`ApiError`] body with a status code.
//!
//! Internals (store errors, say) are logged with the error's id and reported to the
//! client only by kind and a short message.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use plane_store::StoreError;
use plane_types::api::{ApiError, ApiErrorKind};

/// A failed request: the status code and the body sent.
#[derive(Debug)]
pub struct HttpError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The body.
    pub error: ApiError,
}

impl HttpError {
    /// An error with an explicit status.
    pub fn new(status: StatusCode, kind: ApiErrorKind, message: impl Into<String>) -> HttpError {
        HttpError {
            status,
            error: ApiError::new(kind, message),
        }
    }

    /// 400 `Other`: a malformed or invalid request.
    pub fn bad_request(message: impl Into<String>) -> HttpError {
        HttpError::new(StatusCode::BAD_REQUEST, ApiErrorKind::Other, message)
    }

    /// 404 `NotFound`.
    pub fn not_found(message: impl Into<String>) -> HttpError {
        HttpError::new(StatusCode::NOT_FOUND, ApiErrorKind::NotFound, message)
    }
}

impl From<StoreError> for HttpError {
    fn from(e: StoreError) -> Self {
        let err = HttpError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ApiErrorKind::DatabaseError,
            "the store failed",
        );
        tracing::error!(error_id = %err.error.id, error = %e, "store error");
        err
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(error_id = %self.error.id, kind = ?self.error.kind, message = %self.error.message, "request failed");
        } else {
            tracing::debug!(error_id = %self.error.id, kind = ?self.error.kind, message = %self.error.message, "request rejected");
        }
        (self.status, Json(self.error)).into_response()
    }
}
