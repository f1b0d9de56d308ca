//! Router tests of the HTTP edge, without sockets: every bad input gets an `ApiError`
//! body with a kind and a 4xx status.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use plane_controller::state::Controller;
use plane_controller::{api, ControllerConfig};
use plane_store::sqlite::SqliteStore;
use serde_json::{json, Value};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

async fn app(default_cluster: Option<&str>) -> axum::Router {
    let store = Arc::new(SqliteStore::in_memory().await.unwrap());
    let config = ControllerConfig::new(
        store,
        "http://controller.test",
        default_cluster.map(|c| c.parse().unwrap()),
    );
    api::router(Controller::new(config, CancellationToken::new()))
}

async fn call(app: &axum::Router, method: &str, path: &str, body: &str) -> (StatusCode, Value) {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .body(Body::from(body.to_owned()))
        .unwrap();
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    let v = serde_json::from_slice(&bytes).unwrap_or_else(|_| json!({"raw": String::from_utf8_lossy(&bytes)}));
    (status, v)
}

fn assert_api_error(status: StatusCode, body: &Value, want_status: u16, want_kind: &str) {
    assert_eq!(status.as_u16(), want_status, "body: {body}");
    assert_eq!(body["kind"], want_kind, "body: {body}");
    assert!(
        body["id"].as_str().is_some_and(|s| !s.is_empty()),
        "error id missing: {body}"
    );
    assert!(
        body["message"].as_str().is_some_and(|s| !s.is_empty()),
        "message missing: {body}"
    );
}

#[tokio::test]
async fn malformed_connect_bodies_are_api_errors() {
    let app = app(Some("c.test:9000")).await;
    for body in [
        "",
        "{",
        "[]",
        "null",
        r#"{"key": {"name": 5}}"#,
        r#"{"key": "room"}"#,
        r#"{"spawn_config": {"executable": {"command": "not-a-list"}}}"#,
        r#"{"spawn_config": {"executable": {"command": ["x"]}, "max_idle_seconds": -3}}"#,
        r#"{"spawn_config": {"executable": {"command": ["x"]}, "cluster": "Not A Cluster"}}"#,
        r#"{"spawn_config": {"executable": {"command": ["x"]}, "id": "Bad Id"}}"#,
        r#"{"spawn_config": {"executable": {}}}"#,
        r#"{"spawn_config": {"executable": {"command": ["x"]}, "subdomain": "UPPER"}}"#,
        r#"{"spawn_config": {"executable": {"command": ["x"]}, "pool": "a/b"}}"#,
        r#"{"key": {"name": "../etc"}, "spawn_config": {"executable": {"command": ["x"]}}}"#,
        r#"{"key": {"name": ""}, "spawn_config": {"executable": {"command": ["x"]}}}"#,
    ] {
        let (status, v) = call(&app, "POST", "/ctrl/connect", body).await;
        assert_api_error(status, &v, 400, "Other");
    }
    // NULs anywhere are refused up front, whatever the store would make of them.
    for body in [
        r#"{"key": {"name": "room", "tag": "a\u0000b"}}"#,
        r#"{"key": {"name": "room"}, "user": "\u0000"}"#,
        r#"{"key": {"name": "room"}, "auth": {"k\u0000": 1}}"#,
    ] {
        let (status, v) = call(&app, "POST", "/ctrl/connect", body).await;
        assert_api_error(status, &v, 400, "Other");
        assert!(v["message"].as_str().unwrap_or_default().contains("NUL"), "{body}: {v}");
    }
}

#[tokio::test]
async fn connect_errors_have_compatible_kinds() {
    let app = app(None).await;
    let exe = json!({"command": ["plane", "demo-backend"]});
    let (s, v) = call(
        &app,
        "POST",
        "/ctrl/connect",
        &json!({"key": {"name": "k"}}).to_string(),
    )
    .await;
    assert_api_error(s, &v, 409, "KeyUnheldNoSpawnConfig");
    let (s, v) = call(
        &app,
        "POST",
        "/ctrl/connect",
        &json!({"spawn_config": {"executable": exe}}).to_string(),
    )
    .await;
    assert_api_error(s, &v, 400, "NoClusterProvided");
    let body = json!({"spawn_config": {"executable": exe, "cluster": "c.test:9000"}}).to_string();
    let (s, v) = call(&app, "POST", "/ctrl/connect", &body).await;
    assert_api_error(s, &v, 503, "NoDroneAvailable");
}

#[tokio::test]
async fn invalid_names_in_paths_are_api_errors() {
    let app = app(None).await;
    let (s, v) = call(&app, "GET", "/pub/b/NOT%20VALID/status", "").await;
    assert_api_error(s, &v, 400, "Other");
    let (s, v) = call(&app, "GET", "/pub/b/%FF%FE/status", "").await;
    assert_api_error(s, &v, 400, "Other");
    let (s, v) = call(&app, "GET", "/pub/b/unknown-backend/status", "").await;
    assert_api_error(s, &v, 404, "NotFound");
    let (s, v) = call(&app, "GET", "/pub/b/unknown-backend/status-stream", "").await;
    assert_api_error(s, &v, 404, "NotFound");
    let (s, v) = call(&app, "POST", "/ctrl/b/unknown-backend/soft-terminate", "null").await;
    assert_api_error(s, &v, 404, "NotFound");
    let (s, v) = call(&app, "POST", "/ctrl/b/Bad_Id/hard-terminate", "null").await;
    assert_api_error(s, &v, 400, "Other");
    let (s, v) = call(&app, "GET", "/ctrl/c/Bad%20Cluster/state", "").await;
    assert_api_error(s, &v, 400, "InvalidClusterName");
    let (s, v) = call(&app, "POST", "/ctrl/c/c.test:1/d/not-a-drone/drain", "null").await;
    assert_api_error(s, &v, 400, "Other");
    let (s, v) = call(&app, "POST", "/ctrl/c/c.test:1/d/dr-unknown/drain", "null").await;
    assert_api_error(s, &v, 404, "NotFound");
    let (s, v) = call(&app, "POST", "/ctrl/b/revoke", r#"{"backend_id": "x"}"#).await;
    assert_api_error(s, &v, 400, "Other");
    let (s, v) = call(&app, "POST", "/ctrl/b/revoke", r#"{"backend_id": "nope", "user": "u"}"#).await;
    assert_api_error(s, &v, 404, "NotFound");
    let (s, v) = call(&app, "GET", "/no/such/route", "").await;
    assert_api_error(s, &v, 404, "NotFound");
    let (s, v) = call(&app, "GET", "/ctrl/connect", "").await;
    assert_api_error(s, &v, 405, "Other");
}

#[tokio::test]
async fn status_and_health() {
    let app = app(None).await;
    let (s, v) = call(&app, "GET", "/ctrl/status", "").await;
    assert_eq!(s, 200);
    assert_eq!(v["status"], "ok");
    assert!(v["version"].is_string() && v["hash"].is_string());
    let (s, v) = call(&app, "GET", "/pub/health", "").await;
    assert_eq!((s.as_u16(), v), (200, json!({"status": "ok"})));
    let (s, v) = call(&app, "GET", "/ctrl/c/c.test:1/state", "").await;
    assert_eq!((s.as_u16(), v), (200, json!({"drones": [], "proxies": []})));
}

#[tokio::test]
async fn public_routes_allow_any_origin() {
    let app = app(None).await;
    let req = Request::builder()
        .method("OPTIONS")
        .uri("/pub/health")
        .header("origin", "https://app.example")
        .header("access-control-request-method", "GET")
        .body(Body::empty())
        .unwrap();
    let res = app.oneshot(req).await.unwrap();
    assert_eq!(
        res.headers().get("access-control-allow-origin").map(|v| v.as_bytes()),
        Some(&b"*"[..]),
        "{res:?}"
    );
}
