//! End-to-end tests of request handling inside the crate: a real proxy server on a
//! loopback port in front of real HTTP and WebSocket backends, with the controller's
//! part (answering route requests) played by the test through the route cache.

use crate::proxy::serve;
use crate::routes::tests::{eventually, route};
use crate::{ProxyConfig, Shared};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use plane_types::protocol::{ProxyToController, RouteInfo, RouteResult};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{Request as WsRequest, Response as WsResponse};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const CLUSTER: &str = "localhost:9090";
const DEADLINE: Duration = Duration::from_secs(10);

/// A proxy server on a loopback port whose controller socket is this test.
struct Harness {
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// What the proxy sends to the controller.
    to_controller: tokio::sync::Mutex<mpsc::UnboundedReceiver<ProxyToController>>,
    stop: CancellationToken,
    tasks: TaskTracker,
    server: JoinHandle<()>,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Harness {
    async fn start(route_wait: Duration) -> Harness {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut config = ProxyConfig::new("http://127.0.0.1:1".into(), CLUSTER.parse().unwrap());
        config.route_wait = route_wait;
        let shared = Arc::new(Shared::new(config));
        let (tx, to_controller) = mpsc::unbounded_channel();
        shared.routes.connected(tx);
        shared.connected.send_replace(true);
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let server = tokio::spawn(serve(listener, shared.clone(), stop.clone(), tasks.clone()));
        let mut builder = Client::builder(TokioExecutor::new());
        builder.set_host(false);
        let client = builder.build_http();
        let to_controller = tokio::sync::Mutex::new(to_controller);
        Harness {
            addr,
            shared,
            to_controller,
            stop,
            tasks,
            server,
            client,
        }
    }

    /// Caches a route as if the controller had answered it.
    fn add_route(&self, token: &str, route: RouteInfo) {
        self.shared.routes.handle_route(token.into(), RouteResult::Ready(route));
    }

    /// Waits for the proxy's next RouteRequest, checks its token and answers it.
    async fn answer(&self, token: &str, result: RouteResult) {
        let mut rx = self.to_controller.lock().await;
        let msg = tokio::time::timeout(DEADLINE, rx.recv()).await.unwrap().unwrap();
        assert_eq!(msg, ProxyToController::RouteRequest { token: token.into() });
        self.shared.routes.handle_route(token.into(), result);
    }

    fn request(&self, method: &str, host: Option<&str>, path: &str) -> http::request::Builder {
        let mut b = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr));
        if let Some(host) = host {
            b = b.header("host", host);
        }
        b
    }

    async fn send(&self, req: Request<Full<Bytes>>) -> (Response<()>, Bytes) {
        let resp = tokio::time::timeout(DEADLINE, self.client.request(req))
            .await
            .unwrap()
            .unwrap();
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        (Response::from_parts(parts, ()), body)
    }

    async fn get(&self, host: Option<&str>, path: &str) -> (Response<()>, Bytes) {
        self.send(self.request("GET", host, path).body(Full::default()).unwrap())
            .await
    }

    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(DEADLINE, self.server).await.unwrap().unwrap();
        self.tasks.close();
        tokio::time::timeout(DEADLINE, self.tasks.wait())
            .await
            .expect("every task stops");
    }
}

/// A real HTTP backend that describes each request it gets as JSON.
async fn echo_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let service = service_fn(|req: Request<Incoming>| async move {
                    let mut headers: BTreeMap<String, String> = BTreeMap::new();
                    for (k, v) in req.headers() {
                        let v = v.to_str().unwrap_or("<binary>");
                        headers
                            .entry(k.to_string())
                            .and_modify(|e| *e = format!("{e}, {v}"))
                            .or_insert_with(|| v.into());
                    }
                    let path = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
                    let cors = path.starts_with("/cors");
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    let info = json!({"path": path, "headers": headers, "body_len": body.len()});
                    let mut resp = Response::builder()
                        .header("content-type", "application/json")
                        .header("connection", "keep-alive, x-hop")
                        .header("x-hop", "1")
                        .header("server", "echo");
                    if cors {
                        resp = resp.header("access-control-allow-origin", "https://app.example");
                    }
                    Ok::<_, Infallible>(resp.body(Full::new(Bytes::from(info.to_string()))).unwrap())
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// A real WebSocket echo backend; records the request headers of each handshake.
#[allow(clippy::result_large_err)] // the handshake callback's error type is tungstenite's
async fn ws_backend() -> (SocketAddr, Arc<Mutex<Vec<http::HeaderMap>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let seen = seen2.clone();
            tokio::spawn(async move {
                let callback = |req: &WsRequest, resp: WsResponse| {
                    let mut headers = req.headers().clone();
                    headers.insert("x-test-path", req.uri().path().parse().unwrap());
                    seen.lock().unwrap().push(headers);
                    Ok(resp)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

fn json_body(body: &Bytes) -> Value {
    serde_json::from_slice(body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

fn route_to(backend: &str, addr: SocketAddr) -> RouteInfo {
    RouteInfo {
        address: addr,
        ..route(backend, 0)
    }
}

#[tokio::test]
async fn forwards_with_verified_headers() {
    let h = Harness::start(DEADLINE).await;
    let backend = echo_backend().await;
    h.add_route(
        "tok",
        RouteInfo {
            secret_token: Some("secret987".into()),
            user: Some("auser123".into()),
            user_data: Some(json!({"access": "readonly"})),
            ..route_to("backend123", backend)
        },
    );
    let req = h
        .request("POST", Some("LocalHost:9090"), "/tok/a/b%20c/?x=1&y=%2F")
        .header("x-verified-username", "mallory")
        .header("X-Verified-Other", "x")
        .header("x-forwarded-for", "1.2.3.4")
        .header("connection", "keep-alive, x-client-hop")
        .header("x-client-hop", "1")
        .body(Full::new(Bytes::from_static(b"hello")))
        .unwrap();
    let (resp, body) = h.send(req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let info = json_body(&body);
    assert_eq!(info["path"], "/a/b%20c/?x=1&y=%2F");
    assert_eq!(info["body_len"], 5);
    let headers = &info["headers"];
    assert_eq!(headers["host"], "LocalHost:9090");
    assert_eq!(headers["x-verified-username"], "auser123");
    assert_eq!(headers["x-verified-user-data"], r#"{"access":"readonly"}"#);
    assert_eq!(headers["x-verified-secret"], "secret987");
    assert_eq!(headers["x-verified-backend"], "backend123");
    assert_eq!(headers["x-verified-path"], "/tok/a/b%20c/");
    assert!(headers.get("x-verified-other").is_none());
    assert!(headers.get("x-client-hop").is_none());
    assert_eq!(headers["x-forwarded-for"], "1.2.3.4, 127.0.0.1");
    assert_eq!(headers["x-forwarded-proto"], "http");

    assert_eq!(resp.headers()["x-plane-backend-id"], "backend123");
    assert_eq!(resp.headers()["server"], "Plane");
    assert_eq!(resp.headers()["access-control-allow-origin"], "*");
    assert_eq!(resp.headers()["access-control-allow-credentials"], "true");
    assert!(!resp.headers().contains_key("x-hop"));

    // The request counted as activity and is no longer in flight.
    let b1 = "backend123".parse().unwrap();
    eventually("response body finished", || h.shared.activity.in_flight_count(&b1) == 0).await;
    assert_eq!(h.shared.activity.take_active(), vec![b1]);

    // The backend's own CORS headers win.
    let (resp, _) = h.get(Some(CLUSTER), "/tok/cors").await;
    assert_eq!(resp.headers()["access-control-allow-origin"], "https://app.example");
    assert!(!resp.headers().contains_key("access-control-allow-methods"));

    // Token-only paths become `/`.
    let (_, body) = h.get(Some(CLUSTER), "/tok").await;
    assert_eq!(json_body(&body)["path"], "/");
    h.stop().await;
}

#[tokio::test]
async fn static_tokens_keep_the_path() {
    let h = Harness::start(DEADLINE).await;
    let backend = echo_backend().await;
    h.add_route("s.abc", route_to("b1", backend));
    let (resp, body) = h.get(Some(CLUSTER), "/s.abc/x?q").await;
    assert_eq!(resp.status(), StatusCode::OK);
    let info = json_body(&body);
    assert_eq!(info["path"], "/s.abc/x?q");
    assert_eq!(info["headers"]["x-verified-path"], "/s.abc/x");
    h.stop().await;
}

#[tokio::test]
async fn host_token_and_readiness_errors() {
    let h = Harness::start(DEADLINE).await;
    let check = |resp: &Response<()>, status: StatusCode| {
        assert_eq!(resp.status(), status);
        assert_eq!(resp.headers()["server"], "Plane");
        assert!(resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain"));
    };
    let (resp, _) = h.get(None, "/tok/").await;
    check(&resp, StatusCode::BAD_REQUEST);
    let (resp, body) = h.get(Some("example.com"), "/tok/").await;
    check(&resp, StatusCode::FORBIDDEN);
    assert!(!body.is_empty());
    let (resp, _) = h.get(Some("localhost:9091"), "/tok/").await;
    check(&resp, StatusCode::FORBIDDEN);
    let (resp, _) = h.get(Some("localhost"), "/tok/").await;
    check(&resp, StatusCode::FORBIDDEN);
    let (resp, _) = h.get(Some(CLUSTER), "/").await;
    check(&resp, StatusCode::BAD_REQUEST);
    let (resp, _) = h.get(Some(CLUSTER), "//x").await;
    check(&resp, StatusCode::BAD_REQUEST);
    assert!(
        h.to_controller.lock().await.try_recv().is_err(),
        "no lookup for refused requests"
    );

    let (resp, body) = h.get(Some("anything.example"), "/ready").await;
    check(&resp, StatusCode::OK);
    assert_eq!(&body[..], b"ready\n");
    h.shared.connected.send_replace(false);
    let (resp, _) = h.get(None, "/ready").await;
    check(&resp, StatusCode::SERVICE_UNAVAILABLE);
    h.stop().await;
}

#[tokio::test]
async fn route_outcomes() {
    let h = Harness::start(DEADLINE).await;
    let backend = echo_backend().await;

    let ((resp, _), ()) = tokio::join!(h.get(Some(CLUSTER), "/gone/"), h.answer("gone", RouteResult::Gone));
    assert_eq!(resp.status(), StatusCode::GONE);
    let ((resp, _), ()) = tokio::join!(h.get(Some(CLUSTER), "/slow/"), h.answer("slow", RouteResult::NotReady));
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    // Neither is cached: the next request asks again.
    let ((resp, _), ()) = tokio::join!(h.get(Some(CLUSTER), "/gone/"), h.answer("gone", RouteResult::Gone));
    assert_eq!(resp.status(), StatusCode::GONE);

    // Subdomain routes must be reached through their subdomain, and only them.
    let sub = RouteInfo {
        subdomain: Some("app".into()),
        ..route_to("b1", backend)
    };
    let ((resp, _), ()) = tokio::join!(
        h.get(Some(CLUSTER), "/subtok/"),
        h.answer("subtok", RouteResult::Ready(sub))
    );
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let (resp, _) = h.get(Some("App.localhost:9090"), "/subtok/").await;
    assert_eq!(resp.status(), StatusCode::OK);
    let (resp, _) = h.get(Some("other.localhost:9090"), "/subtok/").await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    h.add_route("plain", route_to("b2", backend));
    let (resp, _) = h.get(Some("app.localhost:9090"), "/plain/").await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);

    // Invalidation from the controller: the next request looks the token up again.
    h.shared.routes.remove_token("plain");
    let ((resp, _), ()) = tokio::join!(h.get(Some(CLUSTER), "/plain/"), h.answer("plain", RouteResult::Gone));
    assert_eq!(resp.status(), StatusCode::GONE);
    h.stop().await;
}

#[tokio::test]
async fn concurrent_requests_share_one_lookup() {
    let h = Harness::start(DEADLINE).await;
    let backend = echo_backend().await;
    let both = async { tokio::join!(h.get(Some(CLUSTER), "/tok/one"), h.get(Some(CLUSTER), "/tok/two")) };
    let answer = async {
        eventually("both requests wait", || h.shared.routes.waiter_count("tok") == 2).await;
        h.answer("tok", RouteResult::Ready(route_to("b1", backend))).await;
    };
    let (((r1, b1), (r2, b2)), ()) = tokio::join!(both, answer);
    assert_eq!((r1.status(), r2.status()), (StatusCode::OK, StatusCode::OK));
    assert_eq!(json_body(&b1)["path"], "/one");
    assert_eq!(json_body(&b2)["path"], "/two");
    assert!(
        h.to_controller.lock().await.try_recv().is_err(),
        "exactly one RouteRequest"
    );
    h.stop().await;
}

#[tokio::test]
async fn route_wait_is_bounded() {
    let h = Harness::start(Duration::from_millis(100)).await;
    let (resp, _) = h.get(Some(CLUSTER), "/tok/").await;
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    h.stop().await;
}

#[tokio::test]
async fn unreachable_backend_is_502_and_evicted() {
    let h = Harness::start(DEADLINE).await;
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    h.add_route("tok", route_to("b1", closed));
    let (resp, _) = h.get(Some(CLUSTER), "/tok/").await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert!(h.shared.routes.cached("tok").is_none());
    h.stop().await;
}

#[tokio::test]
async fn websocket_upgrade_is_relayed() {
    let h = Harness::start(DEADLINE).await;
    let (backend, seen) = ws_backend().await;
    h.add_route(
        "tok",
        RouteInfo {
            user: Some("u1".into()),
            ..route_to("b1", backend)
        },
    );
    let b1 = "b1".parse().unwrap();

    let mut req = "ws://localhost:9090/tok/ws?x=1".into_client_request().unwrap();
    req.headers_mut()
        .insert("x-verified-username", "mallory".parse().unwrap());
    let tcp = TcpStream::connect(h.addr).await.unwrap();
    let (mut ws, resp) = tokio::time::timeout(DEADLINE, tokio_tungstenite::client_async(req, tcp))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.headers()["x-plane-backend-id"], "b1");
    assert_eq!(resp.headers()["server"], "Plane");
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0]["x-test-path"], "/ws");
        assert_eq!(seen[0]["x-verified-username"], "u1");
        assert_eq!(seen[0]["x-verified-path"], "/tok/ws");
        assert_eq!(seen[0]["x-verified-backend"], "b1");
    }
    for text in ["hello", "world"] {
        ws.send(Message::text(text)).await.unwrap();
        let echoed = tokio::time::timeout(DEADLINE, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), text);
    }
    assert_eq!(h.shared.activity.upgraded_count(&b1), 1);
    let _ = h.shared.activity.take_active();
    assert_eq!(
        h.shared.activity.take_active(),
        vec![b1.clone()],
        "open connections count every interval"
    );

    ws.close(None).await.unwrap();
    // The close handshake completes through the proxy, then the client hangs up.
    while let Some(Ok(_)) = tokio::time::timeout(DEADLINE, ws.next()).await.unwrap() {}
    drop(ws);
    eventually("upgraded connection closed", || {
        h.shared.activity.upgraded_count(&b1) == 0
    })
    .await;
    h.stop().await;
}

#[tokio::test]
async fn shutdown_closes_open_upgrades() {
    let h = Harness::start(DEADLINE).await;
    let (backend, _) = ws_backend().await;
    h.add_route("tok", route_to("b1", backend));
    let tcp = TcpStream::connect(h.addr).await.unwrap();
    let req = "ws://localhost:9090/tok/".into_client_request().unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
    let b1 = "b1".parse().unwrap();
    eventually("upgrade open", || h.shared.activity.upgraded_count(&b1) == 1).await;
    let shared = h.shared.clone();
    h.stop().await;
    assert_eq!(shared.activity.upgraded_count(&b1), 0);
    // The client sees the connection end.
    let end = tokio::time::timeout(DEADLINE, ws.next()).await.unwrap();
    assert!(!matches!(end, Some(Ok(Message::Text(_)))));
}

/// The public entry point: without a controller `/ready` is 503, and cancelling the
/// token makes `run` return.
#[tokio::test]
async fn run_serves_until_shutdown() {
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut config = ProxyConfig::new(format!("http://{closed}"), CLUSTER.parse().unwrap());
    config.reconnect_min = Duration::from_millis(10);
    config.reconnect_max = Duration::from_millis(50);
    config.route_wait = Duration::from_millis(100);
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(crate::run(listener, config, shutdown.clone()));

    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let get = |path: &'static str| {
        let client = client.clone();
        async move {
            let req = Request::get(format!("http://{addr}{path}"))
                .header("host", CLUSTER)
                .body(Full::default())
                .unwrap();
            tokio::time::timeout(DEADLINE, client.request(req))
                .await
                .unwrap()
                .unwrap()
                .status()
        }
    };
    assert_eq!(get("/ready").await, StatusCode::SERVICE_UNAVAILABLE);
    // A lookup waits (bounded) for the socket that never comes up.
    assert_eq!(get("/tok/").await, StatusCode::GATEWAY_TIMEOUT);
    shutdown.cancel();
    tokio::time::timeout(DEADLINE, run).await.unwrap().unwrap().unwrap();

    let bad = ProxyConfig {
        keepalive_interval: Duration::ZERO,
        ..ProxyConfig::new("http://x".into(), CLUSTER.parse().unwrap())
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    assert!(crate::run(listener, bad, CancellationToken::new()).await.is_err());
}
