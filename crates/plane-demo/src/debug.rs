//! The `/debug/*` handlers: what tests use to look inside a backend and make it act.
//!
//! * `/debug/request` echoes the request as it arrived (after the proxy);
//! * `/debug/exit` exits the process;
//! * `/debug/limits` reports the cgroup and rlimit limits ([`Limits`]);
//! * `/debug/file` writes or reads a file, to check what the filesystem allows;
//! * `/debug/signals` lists the signals received so far.
//!
//! Errors of `/debug/file` are JSON `{"error": "<text>"}`, with the I/O error's own text
//! (e.g. `Read-only file system (os error 30)`), so tests can match on it.

use crate::{AppState, Limits, ReceivedSignal};
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::path::PathBuf;
use std::sync::Arc;

/// Largest body `POST /debug/file` accepts, in bytes (64 MiB).
pub const MAX_FILE_BYTES: usize = 64 * 1024 * 1024;

/// `/debug/request` (any method): `{"method", "path" (with the query), "headers"}`.
/// Repeated headers are joined with `, `.
pub(crate) async fn request(method: Method, uri: Uri, headers: HeaderMap) -> Json<serde_json::Value> {
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in &headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        seen.entry(name.as_str().to_owned())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(&value);
            })
            .or_insert_with(|| value.into_owned());
    }
    let path = uri
        .path_and_query()
        .map_or_else(|| uri.path().to_owned(), |p| p.as_str().to_owned());
    Json(serde_json::json!({ "method": method.as_str(), "path": path, "headers": seen }))
}

/// The query of `POST /debug/exit`.
#[derive(Debug, Deserialize)]
pub(crate) struct ExitQuery {
    #[serde(default)]
    code: u8,
}

/// `POST /debug/exit?code=N`: calls the exit hook (outside tests, the process is gone
/// before the answer is written).
pub(crate) async fn exit(
    State(state): State<Arc<AppState>>,
    Query(query): Query<ExitQuery>,
) -> Json<serde_json::Value> {
    (state.exit)(i32::from(query.code));
    Json(serde_json::json!({ "exiting": query.code }))
}

/// `GET /debug/limits`: read afresh on every request.
pub(crate) async fn limits() -> Json<Limits> {
    Json(Limits::read())
}

/// `GET /debug/signals`: the signals received so far, oldest first.
pub(crate) async fn signals(State(state): State<Arc<AppState>>) -> Json<Vec<ReceivedSignal>> {
    Json(state.signals.snapshot())
}

/// The query of `/debug/file`.
#[derive(Debug, Deserialize)]
pub(crate) struct FileQuery {
    /// An absolute path. Optional here so that a missing one gets a JSON error.
    path: Option<PathBuf>,
}

impl FileQuery {
    /// The path, or why it cannot be used.
    fn absolute_path(self) -> Result<PathBuf, String> {
        match self.path {
            Some(path) if path.is_absolute() => Ok(path),
            Some(path) => Err(format!("{path:?} is not an absolute path")),
            None => Err("the `path` query parameter is missing".to_owned()),
        }
    }
}

/// `POST /debug/file?path=…`: writes the body to the file, creating its parent directories.
pub(crate) async fn write_file(Query(query): Query<FileQuery>, body: Bytes) -> Response {
    let path = match query.absolute_path() {
        Ok(path) => path,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let written = async {
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        tokio::fs::write(&path, &body).await
    };
    match written.await {
        Ok(()) => {
            tracing::debug!(path = %path.display(), bytes = body.len(), "wrote a file for /debug/file");
            Json(serde_json::json!({ "ok": true })).into_response()
        }
        Err(err) => error(StatusCode::INTERNAL_SERVER_ERROR, err.to_string()),
    }
}

/// `GET /debug/file?path=…`: the file's content.
pub(crate) async fn read_file(Query(query): Query<FileQuery>) -> Response {
    let path = match query.absolute_path() {
        Ok(path) => path,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    match tokio::fs::read(&path).await {
        Ok(content) => ([(header::CONTENT_TYPE, "application/octet-stream")], content).into_response(),
        Err(err) if err.kind() == ErrorKind::NotFound => error(StatusCode::NOT_FOUND, err.to_string()),
        Err(err) => error(StatusCode::INTERNAL_SERVER_ERROR, err.to_string()),
    }
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}
