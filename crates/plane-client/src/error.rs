//! The error type of the client, and how a failed HTTP response is classified.

use plane_types::api::ApiError;
use std::error::Error as _;

/// How many bytes of an unexpected response body are kept for the error message.
const MAX_BODY_IN_ERROR: usize = 2000;

/// Why a call to the controller failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The controller answered with an [`ApiError`] body.
    #[error("{} ({:?}, HTTP {status}, error id {})", .error.message, .error.kind, .error.id)]
    Api {
        /// The HTTP status code.
        status: u16,
        /// The error the controller reported.
        error: ApiError,
    },
    /// The request could not be sent or the response could not be read.
    #[error("request to the controller failed: {}", http_error_chain(.0))]
    Http(reqwest::Error),
    /// The controller answered with a status and body this client does not understand.
    #[error("unexpected response from the controller (HTTP {status}): {body}")]
    UnexpectedResponse {
        /// The HTTP status code.
        status: u16,
        /// The (possibly truncated) response body.
        body: String,
    },
    /// The controller URL is not a usable `http(s)://` URL.
    #[error("invalid controller URL: {0}")]
    InvalidUrl(String),
    /// A successful response had a body that could not be decoded.
    #[error("could not decode the controller's response: {0}")]
    Decode(String),
}

impl ClientError {
    /// The API error, if the controller reported one.
    pub fn api_error(&self) -> Option<&ApiError> {
        match self {
            ClientError::Api { error, .. } => Some(error),
            _ => None,
        }
    }

    /// The HTTP status of the response, if there was one.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } | ClientError::UnexpectedResponse { status, .. } => Some(*status),
            ClientError::Http(e) => e.status().map(|s| s.as_u16()),
            _ => None,
        }
    }
}

impl From<reqwest::Error> for ClientError {
    fn from(e: reqwest::Error) -> ClientError {
        ClientError::Http(e)
    }
}

/// A reqwest error with its causes (`error sending request: … : connection refused`),
/// since reqwest's own message leaves the cause out.
fn http_error_chain(e: &reqwest::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let msg = s.to_string();
        if !out.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        source = s.source();
    }
    out
}

/// Classifies a non-2xx response: an [`ApiError`] body gives [`ClientError::Api`],
/// anything else [`ClientError::UnexpectedResponse`].
pub(crate) fn error_from_response(status: u16, body: &[u8]) -> ClientError {
    match serde_json::from_slice::<ApiError>(body) {
        Ok(error) => ClientError::Api { status, error },
        Err(_) => ClientError::UnexpectedResponse {
            status,
            body: truncated_text(body),
        },
    }
}

/// The body as text, cut to [`MAX_BODY_IN_ERROR`] bytes on a character boundary.
pub(crate) fn truncated_text(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.len() <= MAX_BODY_IN_ERROR {
        return text.to_owned();
    }
    let mut end = MAX_BODY_IN_ERROR;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use plane_types::api::ApiErrorKind;

    #[test]
    fn api_errors_are_recognised() {
        let body = br#"{"id":"abc","kind":"KeyHeld","message":"key room-1 is held with another tag"}"#;
        let e = error_from_response(409, body);
        let api = e.api_error().expect("an API error");
        assert_eq!(api.kind, ApiErrorKind::KeyHeld);
        assert_eq!(e.status(), Some(409));
        assert_eq!(
            e.to_string(),
            "key room-1 is held with another tag (KeyHeld, HTTP 409, error id abc)"
        );
    }

    #[test]
    fn other_bodies_are_unexpected() {
        let e = error_from_response(502, b"  Bad Gateway\n");
        assert!(matches!(&e, ClientError::UnexpectedResponse { status: 502, body } if body == "Bad Gateway"));
        assert_eq!(
            e.to_string(),
            "unexpected response from the controller (HTTP 502): Bad Gateway"
        );
        // JSON that is not an ApiError.
        let e = error_from_response(500, br#"{"status":"store unreachable"}"#);
        assert!(matches!(e, ClientError::UnexpectedResponse { status: 500, .. }));
    }

    #[test]
    fn long_bodies_are_truncated() {
        let body = "é".repeat(MAX_BODY_IN_ERROR);
        let t = truncated_text(body.as_bytes());
        assert!(t.len() <= MAX_BODY_IN_ERROR + '…'.len_utf8());
        assert!(t.ends_with('…'));
    }
}
