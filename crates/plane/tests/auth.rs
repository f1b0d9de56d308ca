//! Control-API authentication and connection-token expiry, on an in-process cluster
//! (controller, process-runtime drone and proxy) running the real demo backend.

use axum::http::{HeaderMap, StatusCode};
use plane_tests::{Options, TestCluster};
use plane_types::status::BackendStatus;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn options() -> Options {
    Options::new(env!("CARGO_BIN_EXE_plane"))
}

/// With `--ctrl-token`, `/ctrl/*` needs the token: the drone and proxy (which pass it)
/// work, the client with it works, and requests without it or with a wrong one get 401
/// with an `ApiError` body. `/pub/*` stays open.
#[tokio::test]
async fn the_control_api_needs_the_ctrl_token() {
    let mut opts = options();
    opts.ctrl_token = Some("s3cret-token".into());
    let tc = TestCluster::start(opts)
        .await
        .expect("the drone and proxy connect with the token");
    let res = tc.connect_ready(&tc.demo_request("auth-1")).await.unwrap();
    assert_eq!(tc.http.get(&res.url).send().await.unwrap().status(), 200);

    let http = reqwest::Client::new();
    let connect = format!("{}/ctrl/connect", tc.controller_url);
    let body = serde_json::json!({"key": {"name": "auth-2"}});
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("s3cret-token"),
        Some("Basic s3cret-token"),
    ] {
        let mut req = http.post(&connect).json(&body);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 401, "{auth:?}");
        assert_eq!(resp.headers()["www-authenticate"], "Bearer");
        let err: plane_types::api::ApiError = resp.json().await.unwrap();
        assert!(err.message.contains("token"), "{err:?}");
    }
    // The sockets are under /ctrl too: a drone without the token cannot even upgrade.
    let ws = format!("{}/ctrl/drone-socket", tc.controller_url.replace("http", "ws"));
    match tokio_tungstenite::connect_async(ws).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 401),
        other => panic!("a socket without the token must be refused, got {other:?}"),
    }
    let ok = http
        .get(format!("{}/ctrl/status", tc.controller_url))
        .bearer_auth("s3cret-token")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let public = http
        .get(format!("{}/pub/b/{}/status", tc.controller_url, res.backend_id))
        .send()
        .await
        .unwrap();
    assert_eq!(public.status(), 200);
    tc.shutdown().await.unwrap();
}

/// What the forward-auth service saw: (method, path, x-forwarded-uri, x-api-key).
type Seen = Arc<Mutex<Vec<(String, String, String, String)>>>;

/// A real HTTP auth service: allows `x-api-key: good`, forbids `x-api-key: banned`,
/// refuses the rest. Returns its URL.
async fn auth_service(seen: Seen) -> String {
    let app = axum::Router::new().fallback(
        move |method: axum::http::Method, uri: axum::http::Uri, headers: HeaderMap| {
            let seen = seen.clone();
            async move {
                let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
                let key = h("x-api-key");
                seen.lock().unwrap().push((
                    method.to_string(),
                    uri.path().to_owned(),
                    h("x-forwarded-uri"),
                    key.clone(),
                ));
                match key.as_str() {
                    "good" => StatusCode::NO_CONTENT,
                    "banned" => StatusCode::FORBIDDEN,
                    _ => StatusCode::UNAUTHORIZED,
                }
            }
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/check?svc=plane")
}

/// Forward auth decides for requests without the ctrl token: 2xx passes, 403 is 403,
/// anything else 401; the service sees the method, the path (appended to its own) and
/// the caller's headers. A dead service is a 502, never a pass.
#[tokio::test]
async fn forward_auth_decides_for_requests_without_the_ctrl_token() {
    let seen: Seen = Arc::default();
    let url = auth_service(seen.clone()).await;
    let controller_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", controller_listener.local_addr().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        plane_store::sqlite::SqliteStore::open(&dir.path().join("c.db"))
            .await
            .unwrap(),
    );
    let mut config = plane_controller::ControllerConfig::new(store, base.clone(), None);
    config.ctrl_token = Some("internal".into());
    config.forward_auth = Some(plane_controller::auth::ForwardAuth::new(&url, None).unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(plane_controller::serve(controller_listener, config, stop.clone()));

    let http = reqwest::Client::new();
    let status = |key: Option<&'static str>, bearer: Option<&'static str>| {
        let mut req = http.get(format!("{base}/ctrl/status?x=1"));
        if let Some(k) = key {
            req = req.header("x-api-key", k);
        }
        if let Some(b) = bearer {
            req = req.bearer_auth(b);
        }
        async move { req.send().await.unwrap().status().as_u16() }
    };
    // A caller cannot tell the auth service it asks for something else.
    let spoofed = http
        .post(format!("{base}/ctrl/b/some-backend/hard-terminate"))
        .header("x-api-key", "nope")
        .header("x-forwarded-uri", "/ctrl/status")
        .header("x-forwarded-method", "GET")
        .send()
        .await
        .unwrap();
    assert_eq!(spoofed.status(), 401);
    let (method, _, uri, _) = seen.lock().unwrap().remove(0);
    assert_eq!(
        (method.as_str(), uri.as_str()),
        ("POST", "/ctrl/b/some-backend/hard-terminate")
    );
    assert_eq!(status(Some("good"), None).await, 200);
    assert_eq!(status(Some("banned"), None).await, 403);
    assert_eq!(status(Some("other"), None).await, 401);
    assert_eq!(status(None, None).await, 401);
    let asked = seen.lock().unwrap().len();
    // The ctrl token needs no check.
    assert_eq!(status(None, Some("internal")).await, 200);
    assert_eq!(
        seen.lock().unwrap().len(),
        asked,
        "a request with the ctrl token is not forwarded"
    );
    let first = seen.lock().unwrap()[0].clone();
    assert_eq!(
        first,
        (
            "GET".into(),
            "/check/ctrl/status".into(),
            "/ctrl/status?x=1".into(),
            "good".into()
        )
    );

    // An auth service that is gone: 502, not a pass.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_url = format!("http://{}/", dead.local_addr().unwrap());
    drop(dead);
    stop.cancel();
    server.await.unwrap().unwrap();
    let controller_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base2 = format!("http://{}", controller_listener.local_addr().unwrap());
    let store = Arc::new(
        plane_store::sqlite::SqliteStore::open(&dir.path().join("c.db"))
            .await
            .unwrap(),
    );
    let mut config = plane_controller::ControllerConfig::new(store, base2.clone(), None);
    config.forward_auth = Some(plane_controller::auth::ForwardAuth::new(&dead_url, None).unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(plane_controller::serve(controller_listener, config, stop.clone()));
    let resp = http.get(format!("{base2}/ctrl/status")).send().await.unwrap();
    assert_eq!(resp.status(), 502);
    let open = http.get(format!("{base2}/pub/health")).send().await.unwrap();
    assert_eq!(open.status(), 200, "/pub is never authenticated");
    stop.cancel();
    server.await.unwrap().unwrap();
}

/// With a token lifetime, a connection token stops routing once it expires: the proxy
/// answers 410 although the backend is still ready (the cached route expires with it).
#[tokio::test]
async fn an_expired_token_is_refused_by_the_proxy() {
    let mut opts = options();
    opts.token_ttl = Some(Duration::from_secs(2));
    let tc = TestCluster::start(opts).await.unwrap();
    let res = tc.connect_ready(&tc.demo_request("expiring")).await.unwrap();
    let issued = Instant::now();
    assert_eq!(tc.http.get(&res.url).send().await.unwrap().status(), 200);
    let status = loop {
        let s = tc.http.get(&res.url).send().await.unwrap().status();
        if s != 200 || issued.elapsed() > Duration::from_secs(10) {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status, 410, "the expired token must be refused");
    assert!(
        issued.elapsed() >= Duration::from_millis(1_900),
        "refused too early: {:?}",
        issued.elapsed()
    );
    let backend = tc.store.backend(&res.backend_id).await.unwrap().unwrap();
    assert_eq!(backend.status, BackendStatus::Ready, "only the token expired");
    // A new connect gets a fresh token that works.
    let again = tc.connect(&tc.demo_request("expiring")).await.unwrap();
    assert_eq!(again.backend_id, res.backend_id);
    assert_eq!(tc.http.get(&again.url).send().await.unwrap().status(), 200);
    tc.shutdown().await.unwrap();
}
