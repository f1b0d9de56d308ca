//! End-to-end tests of request handling inside the crate: a real proxy server on a
//! loopback port in front of real HTTP and WebSocket backends, with the controller's
//! part (answering route requests) played by the test through the route cache.
//!
//! Also the client limits and timeouts over plain HTTP (header and body sizes,
//! slowloris, idle connections, backend connect timeouts), `/metrics`, and graceful
//! shutdown. The TLS side is in `tls_tests.rs`, on the same [`Harness`].

use crate::metrics::tests::parse as parse_metrics;
use crate::proxy::{serve, Mode};
use crate::routes::tests::{eventually, route};
use crate::tls::CertStore;
use crate::{ProxyConfig, Shared};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::client::conn::{http1, http2};
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
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{Request as WsRequest, Response as WsResponse};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub(crate) const CLUSTER: &str = "localhost:9090";
pub(crate) const DEADLINE: Duration = Duration::from_secs(10);

/// A proxy server on a loopback port whose controller socket is this test.
pub(crate) struct Harness {
    /// The proxy listener (HTTP, or HTTPS with [`Listen::Https`]).
    pub(crate) addr: SocketAddr,
    /// With [`Listen::Https`]: the HTTP listener that redirects to `addr`.
    pub(crate) redirect_addr: Option<SocketAddr>,
    pub(crate) shared: Arc<Shared>,
    /// What the proxy sends to the controller.
    to_controller: tokio::sync::Mutex<mpsc::UnboundedReceiver<ProxyToController>>,
    stop: CancellationToken,
    tasks: TaskTracker,
    servers: Vec<JoinHandle<()>>,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// What the harness listens with.
pub(crate) enum Listen {
    Http,
    /// HTTPS with this certificate store, plus an HTTP listener that redirects to it.
    Https(Arc<CertStore>),
}

impl Harness {
    async fn start(route_wait: Duration) -> Harness {
        Harness::with(Listen::Http, |config| config.route_wait = route_wait).await
    }

    /// A proxy for [`CLUSTER`] (unless `configure` changes it) with a 10 s route wait.
    pub(crate) async fn with(listen: Listen, configure: impl FnOnce(&mut ProxyConfig)) -> Harness {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut config = ProxyConfig::new("http://127.0.0.1:1".into(), CLUSTER.parse().unwrap());
        config.route_wait = DEADLINE;
        configure(&mut config);
        config.validate().unwrap();
        let shared = Arc::new(Shared::new(config));
        let (tx, to_controller) = mpsc::unbounded_channel();
        shared.routes.connected(tx);
        shared.connected.send_replace(true);
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let spawn = |listener, mode| tokio::spawn(serve(listener, mode, shared.clone(), stop.clone(), tasks.clone()));
        let (servers, redirect_addr) = match listen {
            Listen::Http => (vec![spawn(listener, Mode::Http)], None),
            Listen::Https(certs) => {
                let redirect = TcpListener::bind("127.0.0.1:0").await.unwrap();
                let redirect_addr = redirect.local_addr().unwrap();
                let acceptor = tokio_rustls::TlsAcceptor::from(certs.server_config());
                let servers = vec![
                    spawn(
                        listener,
                        Mode::Https {
                            acceptor,
                            public_port: addr.port(),
                        },
                    ),
                    spawn(
                        redirect,
                        Mode::Redirect {
                            https_port: addr.port(),
                        },
                    ),
                ];
                (servers, Some(redirect_addr))
            }
        };
        let mut builder = Client::builder(TokioExecutor::new());
        builder.set_host(false);
        let client = builder.build_http();
        let to_controller = tokio::sync::Mutex::new(to_controller);
        Harness {
            addr,
            redirect_addr,
            shared,
            to_controller,
            stop,
            tasks,
            servers,
            client,
        }
    }

    /// Caches a route as if the controller had answered it.
    pub(crate) fn add_route(&self, token: &str, route: RouteInfo) {
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

    /// The proxy's `/metrics`, parsed.
    async fn metrics(&self) -> BTreeMap<String, f64> {
        let (resp, body) = self.get(None, "/metrics").await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            resp.headers()["content-type"],
            "text/plain; version=0.0.4; charset=utf-8"
        );
        parse_metrics(std::str::from_utf8(&body).unwrap())
    }

    /// Stops the proxy and waits for every task.
    pub(crate) async fn stop(self) {
        self.stop.cancel();
        for server in self.servers {
            tokio::time::timeout(DEADLINE, server).await.unwrap().unwrap();
        }
        self.tasks.close();
        tokio::time::timeout(DEADLINE, self.tasks.wait())
            .await
            .expect("every task stops");
    }
}

/// A real HTTP backend that describes each request it gets as JSON (with its
/// `version`); a request whose body fails gets 500.
pub(crate) async fn echo_backend() -> SocketAddr {
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
                    let version = format!("{:?}", req.version());
                    let Ok(body) = req.into_body().collect().await else {
                        let failed = Full::new(Bytes::from_static(b"body failed"));
                        return Ok(Response::builder().status(500).body(failed).unwrap());
                    };
                    let body = body.to_bytes();
                    let info = json!({"path": path, "headers": headers, "body_len": body.len(), "version": version});
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
pub(crate) async fn ws_backend() -> (SocketAddr, Arc<Mutex<Vec<http::HeaderMap>>>) {
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

pub(crate) fn json_body(body: &Bytes) -> Value {
    serde_json::from_slice(body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

pub(crate) fn route_to(backend: &str, addr: SocketAddr) -> RouteInfo {
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

// ---- client limits, timeouts, metrics and shutdown ----

/// A body for the per-connection test clients.
pub(crate) type TestBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

pub(crate) fn full(bytes: impl Into<Bytes>) -> TestBody {
    Full::new(bytes.into()).boxed()
}

/// A body of `chunks` frames of `size` bytes, with no length announced (chunked over
/// HTTP/1.1).
pub(crate) fn streamed(chunks: usize, size: usize) -> TestBody {
    let frames = (0..chunks).map(move |_| Ok(Frame::data(Bytes::from(vec![b'x'; size]))));
    BodyExt::boxed(StreamBody::new(futures_util::stream::iter(frames)))
}

pub(crate) fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// An HTTP/1.1 client connection over `io`.
pub(crate) async fn h1_handshake<I>(io: I) -> http1::SendRequest<TestBody>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = http1::handshake(TokioIo::new(io)).await.unwrap();
    tokio::spawn(conn.with_upgrades());
    sender
}

/// An HTTP/2 client connection over `io` (prior knowledge, or ALPN `h2`); the handle
/// ends when the connection does.
pub(crate) async fn h2_handshake<I>(io: I) -> (http2::SendRequest<TestBody>, JoinHandle<hyper::Result<()>>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await.unwrap();
    (sender, tokio::spawn(conn))
}

/// Reads a whole response.
pub(crate) async fn collect(resp: Response<Incoming>) -> (Response<()>, Bytes) {
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(DEADLINE, body.collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    (Response::from_parts(parts, ()), body)
}

/// Waits until the peer closes `stream` (EOF or reset, after any bytes it sent); returns
/// how long that took.
pub(crate) async fn closed_within<S: tokio::io::AsyncRead + Unpin>(stream: &mut S, limit: Duration) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(start + limit, stream.read(&mut buf)).await {
            Err(_) => panic!("the connection was not closed within {limit:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return start.elapsed(),
            Ok(Ok(_)) => {}
        }
    }
}

/// Reads one HTTP/1.1 response with a `content-length` from `stream`: the status, the
/// head and the body.
async fn read_response(stream: &mut TcpStream) -> (u16, String, Vec<u8>) {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = tokio::time::timeout(DEADLINE, stream.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(
            n > 0,
            "connection closed mid-response: {:?}",
            String::from_utf8_lossy(&data)
        );
        data.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8(data[..head_end].to_vec()).unwrap();
    let status = head[9..12].parse().unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    while data.len() < head_end + len {
        let n = tokio::time::timeout(DEADLINE, stream.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "connection closed mid-body");
        data.extend_from_slice(&buf[..n]);
    }
    (status, head, data[head_end..head_end + len].to_vec())
}

/// A backend that reports each request body it reads (its length, or that it failed)
/// and answers 200.
async fn body_backend() -> (SocketAddr, mpsc::UnboundedReceiver<Result<usize, String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let tx = tx.clone();
                    async move {
                        let result = req.into_body().collect().await;
                        let _ = tx.send(result.map(|b| b.to_bytes().len()).map_err(|e| e.to_string()));
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, rx)
}

/// A backend that tells `arrived` about each request and answers `done` once `release`
/// is notified.
async fn slow_backend() -> (SocketAddr, mpsc::UnboundedReceiver<()>, Arc<tokio::sync::Notify>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let release = Arc::new(tokio::sync::Notify::new());
    let release2 = release.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (tx, release) = (tx.clone(), release2.clone());
            tokio::spawn(async move {
                let service = service_fn(move |_req: Request<Incoming>| {
                    let (tx, release) = (tx.clone(), release.clone());
                    async move {
                        let released = release.notified();
                        let _ = tx.send(());
                        released.await;
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"done"))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, rx, release)
}

#[tokio::test]
async fn oversized_request_heads_get_431() {
    // Above hyper's HTTP/2 default of 16 KiB, so that the setting shows.
    let h = Harness::with(Listen::Http, |c| c.limits.max_header_bytes = 32 * 1024).await;
    let backend = echo_backend().await;
    h.add_route("tok", route_to("b1", backend));
    let with_header = |len: usize| {
        h.request("GET", Some(CLUSTER), "/tok/")
            .header("x-big", "a".repeat(len))
            .body(Full::default())
            .unwrap()
    };
    let (resp, _) = h.send(with_header(24 * 1024)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let (resp, _) = h.send(with_header(40 * 1024)).await;
    assert_eq!(resp.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);

    // HTTP/2 (prior knowledge): the stream gets 431, the connection goes on.
    let (mut h2, _conn) = h2_handshake(TcpStream::connect(h.addr).await.unwrap()).await;
    let req = |len: usize| {
        Request::get("http://localhost:9090/tok/")
            .header("x-big", "a".repeat(len))
            .body(full(""))
            .unwrap()
    };
    let resp = tokio::time::timeout(DEADLINE, h2.send_request(req(40 * 1024)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    let (resp, body) = collect(h2.send_request(req(24 * 1024)).await.unwrap()).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(json_body(&body)["version"], "HTTP/1.1", "forwarded over HTTP/1.1");
    h.stop().await;
}

#[tokio::test]
async fn oversized_bodies_get_413() {
    const LIMIT: usize = 64 * 1024;
    let h = Harness::with(Listen::Http, |c| c.limits.max_body_bytes = Some(LIMIT as u64)).await;
    let (backend, mut bodies) = body_backend().await;
    h.add_route("tok", route_to("b1", backend));

    // An announced length over the limit: 413 before any lookup or backend request.
    let mut tcp = TcpStream::connect(h.addr).await.unwrap();
    tcp.write_all(b"POST /fresh/ HTTP/1.1\r\nHost: localhost:9090\r\nContent-Length: 10485760\r\n\r\n")
        .await
        .unwrap();
    let (status, _, body) = read_response(&mut tcp).await;
    assert_eq!(status, 413);
    assert!(String::from_utf8_lossy(&body).contains("65536 bytes"), "{body:?}");
    assert!(h.to_controller.lock().await.try_recv().is_err(), "no lookup");

    // Exactly the limit passes, announced or streamed.
    let (resp, _) = h
        .send(
            h.request("POST", Some(CLUSTER), "/tok/")
                .body(Full::new(Bytes::from(vec![b'x'; LIMIT])))
                .unwrap(),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(bodies.recv().await.unwrap(), Ok(LIMIT));
    let mut h1 = h1_handshake(TcpStream::connect(h.addr).await.unwrap()).await;
    let post = |body: TestBody| Request::post("/tok/").header("host", CLUSTER).body(body).unwrap();
    let (resp, _) = collect(h1.send_request(post(streamed(16, LIMIT / 16))).await.unwrap()).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(bodies.recv().await.unwrap(), Ok(LIMIT));

    // A chunked body that grows past it is cut off: the backend sees an error.
    let mut h1 = h1_handshake(TcpStream::connect(h.addr).await.unwrap()).await;
    let (resp, body) = collect(h1.send_request(post(streamed(17, LIMIT / 16))).await.unwrap()).await;
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE, "{body:?}");
    assert!(bodies.recv().await.unwrap().is_err());

    // The same over HTTP/2.
    let (mut h2, _conn) = h2_handshake(TcpStream::connect(h.addr).await.unwrap()).await;
    let req = Request::post("http://localhost:9090/tok/")
        .body(streamed(17, LIMIT / 16))
        .unwrap();
    let (resp, _) = collect(h2.send_request(req).await.unwrap()).await;
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(bodies.recv().await.unwrap().is_err());
    h.stop().await;
}

#[tokio::test]
async fn slow_request_heads_are_cut_off() {
    let header_timeout = ms(300);
    let idle_timeout = ms(2000);
    let h = Harness::with(Listen::Http, |c| {
        c.limits.header_read_timeout = header_timeout;
        c.limits.idle_timeout = idle_timeout;
    })
    .await;
    let backend = echo_backend().await;
    h.add_route("tok", route_to("b1", backend));
    const HALF: &[u8] = b"GET /tok/ HTTP/1.1\r\nHost: localhost:9090\r\n";
    const WHOLE: &[u8] = b"GET /tok/ HTTP/1.1\r\nHost: localhost:9090\r\n\r\n";
    let margin = Duration::from_secs(2);

    // The first request: half a head, then nothing.
    let mut tcp = TcpStream::connect(h.addr).await.unwrap();
    tcp.write_all(HALF).await.unwrap();
    let took = closed_within(&mut tcp, header_timeout + margin).await;
    assert!(took >= header_timeout - ms(50), "{took:?}");

    // A connection that sends nothing at all.
    let mut tcp = TcpStream::connect(h.addr).await.unwrap();
    closed_within(&mut tcp, header_timeout + margin).await;

    // A keep-alive follow-up: one whole request, then half of the next one.
    let mut tcp = TcpStream::connect(h.addr).await.unwrap();
    tcp.write_all(WHOLE).await.unwrap();
    assert_eq!(read_response(&mut tcp).await.0, 200);
    tcp.write_all(HALF).await.unwrap();
    let took = closed_within(&mut tcp, header_timeout + margin).await;
    assert!(
        took < idle_timeout - ms(500),
        "cut by the header timeout, not the idle one: {took:?}"
    );

    // An idle keep-alive connection lasts the idle timeout, not the header timeout.
    let mut tcp = TcpStream::connect(h.addr).await.unwrap();
    tcp.write_all(WHOLE).await.unwrap();
    assert_eq!(read_response(&mut tcp).await.0, 200);
    let took = closed_within(&mut tcp, idle_timeout + margin).await;
    assert!(took >= idle_timeout - ms(200), "{took:?}");
    h.stop().await;
}

#[tokio::test]
async fn idle_connections_close_but_websockets_stay() {
    let idle_timeout = ms(300);
    let h = Harness::with(Listen::Http, |c| c.limits.idle_timeout = idle_timeout).await;
    let backend = echo_backend().await;
    let (ws_backend, _) = ws_backend().await;
    h.add_route("tok", route_to("b1", backend));
    h.add_route("ws", route_to("b2", ws_backend));

    let tcp = TcpStream::connect(h.addr).await.unwrap();
    let req = "ws://localhost:9090/ws/".into_client_request().unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
    ws.send(Message::text("before")).await.unwrap();
    assert!(tokio::time::timeout(DEADLINE, ws.next()).await.unwrap().is_some());
    let ws_quiet_since = Instant::now();

    // HTTP/1.1 keep-alive: closed once idle.
    let mut tcp = TcpStream::connect(h.addr).await.unwrap();
    tcp.write_all(b"GET /tok/ HTTP/1.1\r\nHost: localhost:9090\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut tcp).await.0, 200);
    closed_within(&mut tcp, DEADLINE).await;

    // HTTP/2: GOAWAY once idle, and the connection ends.
    let (mut h2, conn) = h2_handshake(TcpStream::connect(h.addr).await.unwrap()).await;
    let req = Request::get("http://localhost:9090/tok/").body(full("")).unwrap();
    let (resp, _) = collect(h2.send_request(req).await.unwrap()).await;
    assert_eq!(resp.status(), StatusCode::OK);
    tokio::time::timeout(DEADLINE, conn).await.unwrap().unwrap().unwrap();

    // The WebSocket has been quiet for longer than the idle timeout and still works.
    assert!(ws_quiet_since.elapsed() > idle_timeout);
    ws.send(Message::text("after")).await.unwrap();
    let echoed = tokio::time::timeout(DEADLINE, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(echoed.into_text().unwrap().as_str(), "after");
    h.stop().await;
}

#[tokio::test]
async fn slow_backend_connects_get_502() {
    let connect_timeout = ms(300);
    let h = Harness::with(Listen::Http, |c| c.limits.upstream_connect_timeout = connect_timeout).await;
    // A listener whose accept queue is full: further connection attempts hang.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let full_listener = socket.listen(0).unwrap();
    let addr = full_listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    loop {
        assert!(fillers.len() < 16, "the accept queue never filled up");
        match tokio::time::timeout(ms(200), TcpStream::connect(addr)).await {
            Ok(stream) => fillers.push(stream.unwrap()),
            Err(_) => break,
        }
    }
    h.add_route("tok", route_to("b1", addr));
    let start = Instant::now();
    let (resp, body) = h.get(Some(CLUSTER), "/tok/").await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(&body[..], b"the backend did not accept a connection within 300ms\n");
    assert!(start.elapsed() >= connect_timeout - ms(50));
    assert!(h.shared.routes.cached("tok").is_none(), "evicted");
    h.stop().await;
}

#[tokio::test]
async fn metrics_count_requests_and_websockets() {
    let h = Harness::start(DEADLINE).await;
    let backend = echo_backend().await;
    let (ws_backend, _) = ws_backend().await;
    h.add_route("tok", route_to("b1", backend));
    h.add_route("ws", route_to("b2", ws_backend));
    let status = |m: &BTreeMap<String, f64>, code: u16| {
        m.get(&format!("plane_proxy_requests_total{{status=\"{code}\"}}"))
            .copied()
            .unwrap_or(0.0)
    };

    let before = h.metrics().await;
    assert_eq!(before["plane_proxy_active_websockets"], 0.0);
    for _ in 0..2 {
        assert_eq!(h.get(Some(CLUSTER), "/tok/").await.0.status(), StatusCode::OK);
    }
    let ((resp, _), ()) = tokio::join!(h.get(Some(CLUSTER), "/gone/"), h.answer("gone", RouteResult::Gone));
    assert_eq!(resp.status(), StatusCode::GONE);
    let after = h.metrics().await;
    // The first /metrics counts too.
    assert_eq!(status(&after, 200) - status(&before, 200), 3.0);
    assert_eq!(status(&after, 410) - status(&before, 410), 1.0);
    let delta = |name: &str| after[name] - before[name];
    assert_eq!(delta("plane_proxy_route_cache_hits_total"), 2.0);
    assert_eq!(delta("plane_proxy_route_cache_misses_total"), 1.0);
    assert_eq!(delta("plane_proxy_upstream_latency_seconds_count"), 2.0);
    assert_eq!(delta("plane_proxy_upstream_latency_seconds_bucket{le=\"+Inf\"}"), 2.0);
    assert!(delta("plane_proxy_upstream_latency_seconds_sum") > 0.0);
    let connections = after["plane_proxy_active_connections"];
    assert!(connections >= 1.0, "the test client's connection");

    // The WebSocket gauge goes up while one is open, and down once it closes; its
    // connection counts as a client connection all along.
    let tcp = TcpStream::connect(h.addr).await.unwrap();
    let req = "ws://localhost:9090/ws/".into_client_request().unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
    let open = h.metrics().await;
    assert_eq!(open["plane_proxy_active_websockets"], 1.0);
    assert_eq!(open["plane_proxy_active_connections"], connections + 1.0);
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = tokio::time::timeout(DEADLINE, ws.next()).await.unwrap() {}
    drop(ws);
    let deadline = Instant::now() + DEADLINE;
    loop {
        let m = h.metrics().await;
        if m["plane_proxy_active_websockets"] == 0.0 && m["plane_proxy_active_connections"] == connections {
            break;
        }
        assert!(Instant::now() < deadline, "gauges never went down: {m:?}");
        tokio::time::sleep(ms(5)).await;
    }
    h.stop().await;
}

#[tokio::test]
async fn shutdown_lets_requests_in_flight_finish() {
    let h = Harness::start(DEADLINE).await;
    let (backend, mut arrived, release) = slow_backend().await;
    h.add_route("tok", route_to("b1", backend));
    let req = h.request("GET", Some(CLUSTER), "/tok/").body(Full::default()).unwrap();
    let slow = tokio::spawn(h.client.request(req));
    tokio::time::timeout(DEADLINE, arrived.recv()).await.unwrap().unwrap();

    h.stop.cancel();
    // The listener closes at once: new connections are refused.
    let deadline = Instant::now() + DEADLINE;
    loop {
        match TcpStream::connect(h.addr).await {
            Err(err) if err.kind() == std::io::ErrorKind::ConnectionRefused => break,
            _ => assert!(Instant::now() < deadline, "still accepting after shutdown"),
        }
        tokio::time::sleep(ms(5)).await;
    }
    // The request in flight still completes.
    release.notify_one();
    let resp = tokio::time::timeout(DEADLINE, slow).await.unwrap().unwrap().unwrap();
    let (resp, body) = collect(resp).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(&body[..], b"done");
    h.stop().await;
}

#[tokio::test]
async fn shutdown_grace_is_bounded() {
    let h = Harness::with(Listen::Http, |c| c.limits.shutdown_grace = ms(200)).await;
    let (backend, mut arrived, _never_released) = slow_backend().await;
    h.add_route("tok", route_to("b1", backend));
    let req = h.request("GET", Some(CLUSTER), "/tok/").body(Full::default()).unwrap();
    let slow = tokio::spawn(h.client.request(req));
    tokio::time::timeout(DEADLINE, arrived.recv()).await.unwrap().unwrap();
    let start = Instant::now();
    h.stop().await;
    let result = tokio::time::timeout(DEADLINE, slow).await.unwrap().unwrap();
    assert!(result.is_err(), "the connection was closed after the grace period");
    assert!(start.elapsed() >= ms(150), "{:?}", start.elapsed());
}
