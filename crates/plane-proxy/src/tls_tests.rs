//! End-to-end tests of the HTTPS side: a real proxy with a certificate from a test CA,
//! real TLS clients trusting that CA, HTTP/2 by ALPN, WebSocket over TLS, certificate
//! swaps, the HTTP port's redirects, and [`crate::run_https`] itself.

use crate::proxy_tests::{
    closed_within, collect, echo_backend, full, h1_handshake, h2_handshake, json_body, ms, route_to, ws_backend,
    Harness, Listen, TestBody, DEADLINE,
};
use crate::tls::tests::TestCa;
use crate::tls::CertStore;
use crate::ProxyConfig;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode, Version};
use plane_types::protocol::RouteInfo;
use rustls::pki_types::{CertificateDer, ServerName};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// The cluster of the HTTPS tests; its certificate covers it and `*.plane.test`.
const CLUSTER: &str = "plane.test";
const H2: &[u8] = b"h2";
const H1: &[u8] = b"http/1.1";

/// A proxy for [`CLUSTER`] over HTTPS with a certificate of `ca`.
async fn https_harness(ca: &TestCa, configure: impl FnOnce(&mut ProxyConfig)) -> (Harness, Arc<CertStore>) {
    let certs = CertStore::new();
    let leaf = ca.leaf(&[CLUSTER, "*.plane.test"], (2040, 1, 1));
    certs.install_pem(&leaf.chain_pem, &leaf.key_pem).unwrap();
    let h = Harness::with(Listen::Https(certs.clone()), |c| {
        c.cluster = CLUSTER.parse().unwrap();
        configure(c);
    })
    .await;
    (h, certs)
}

/// A TLS connection to `addr` for `server_name`, trusting only `ca`, offering `alpn`.
async fn tls_connect(
    addr: SocketAddr,
    ca: &CertificateDer<'static>,
    server_name: &str,
    alpn: &[&[u8]],
) -> std::io::Result<TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(server_name.to_owned()).unwrap();
    tokio::time::timeout(DEADLINE, TlsConnector::from(Arc::new(config)).connect(name, tcp))
        .await
        .expect("the handshake ends in time")
}

fn alpn(tls: &TlsStream<TcpStream>) -> Option<&[u8]> {
    tls.get_ref().1.alpn_protocol()
}

fn peer_leaf(tls: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    tls.get_ref().1.peer_certificates().unwrap()[0].clone().into_owned()
}

fn get(uri: &str, host: Option<&str>) -> Request<TestBody> {
    let mut b = Request::get(uri);
    if let Some(host) = host {
        b = b.header("host", host);
    }
    b.body(full("")).unwrap()
}

/// One HTTP/1.1 request on a new plain connection to `addr`.
async fn http_get(addr: SocketAddr, host: &str, path: &str) -> (Response<()>, Bytes) {
    let mut h1 = h1_handshake(TcpStream::connect(addr).await.unwrap()).await;
    collect(h1.send_request(get(path, Some(host))).await.unwrap()).await
}

#[tokio::test]
async fn https_over_http1_and_http2() {
    let ca = TestCa::new();
    let (h, _certs) = https_harness(&ca, |_| {}).await;
    let backend = echo_backend().await;
    h.add_route("tok", route_to("b1", backend));

    // HTTP/1.1 by ALPN.
    let tls = tls_connect(h.addr, &ca.cert, CLUSTER, &[H1]).await.unwrap();
    assert_eq!(alpn(&tls), Some(H1));
    let mut h1 = h1_handshake(tls).await;
    let (resp, body) = collect(h1.send_request(get("/tok/a?b=1", Some(CLUSTER))).await.unwrap()).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), Version::HTTP_11);
    let info = json_body(&body);
    assert_eq!(info["path"], "/a?b=1");
    assert_eq!(info["headers"]["host"], CLUSTER);
    assert_eq!(info["headers"]["x-forwarded-proto"], "https");

    // HTTP/2 is preferred when offered; the backend still gets HTTP/1.1, with the
    // authority as its Host.
    let tls = tls_connect(h.addr, &ca.cert, CLUSTER, &[H2, H1]).await.unwrap();
    assert_eq!(alpn(&tls), Some(H2));
    let (h2, _conn) = h2_handshake(tls).await;
    let send = |path: &str, body: TestBody| {
        let mut h2 = h2.clone();
        let req = Request::post(format!("https://{CLUSTER}{path}")).body(body).unwrap();
        async move { collect(h2.send_request(req).await.unwrap()).await }
    };
    let ((r1, b1), (r2, b2)) = tokio::join!(send("/tok/one", full("")), send("/tok/two", full(vec![b'x'; 100_000])));
    for resp in [&r1, &r2] {
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.version(), Version::HTTP_2);
        assert_eq!(resp.headers()["x-plane-backend-id"], "b1");
    }
    let (i1, i2) = (json_body(&b1), json_body(&b2));
    assert_eq!(i1["path"], "/one");
    assert_eq!(i1["version"], "HTTP/1.1");
    assert_eq!(i1["headers"]["host"], CLUSTER);
    assert_eq!(i1["headers"]["x-forwarded-proto"], "https");
    assert_eq!(i2["body_len"], 100_000);
    h.stop().await;
}

#[tokio::test]
async fn websocket_over_tls() {
    let ca = TestCa::new();
    let (h, _certs) = https_harness(&ca, |_| {}).await;
    let (backend, seen) = ws_backend().await;
    h.add_route("tok", route_to("b1", backend));
    let tls = tls_connect(h.addr, &ca.cert, CLUSTER, &[H1]).await.unwrap();
    let req = "wss://plane.test/tok/chat".into_client_request().unwrap();
    let (mut ws, resp) = tokio::time::timeout(DEADLINE, tokio_tungstenite::client_async(req, tls))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.headers()["x-plane-backend-id"], "b1");
    for text in ["hello", "over tls"] {
        ws.send(Message::text(text)).await.unwrap();
        let echoed = tokio::time::timeout(DEADLINE, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), text);
    }
    assert_eq!(seen.lock().unwrap()[0]["x-forwarded-proto"], "https");
    ws.close(None).await.unwrap();
    h.stop().await;
}

#[tokio::test]
async fn wildcard_subdomains_over_tls() {
    let ca = TestCa::new();
    let (h, _certs) = https_harness(&ca, |_| {}).await;
    let backend = echo_backend().await;
    h.add_route(
        "sub",
        RouteInfo {
            subdomain: Some("app".into()),
            ..route_to("b1", backend)
        },
    );
    let tls = tls_connect(h.addr, &ca.cert, "app.plane.test", &[H1]).await.unwrap();
    let mut h1 = h1_handshake(tls).await;
    let (resp, _) = collect(h1.send_request(get("/sub/", Some("app.plane.test"))).await.unwrap()).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let (resp, _) = collect(h1.send_request(get("/sub/", Some(CLUSTER))).await.unwrap()).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN, "only through its subdomain");

    let tls = tls_connect(h.addr, &ca.cert, "app.plane.test", &[H2]).await.unwrap();
    let (mut h2, _conn) = h2_handshake(tls).await;
    let (resp, body) = collect(
        h2.send_request(get("https://app.plane.test/sub/x", None))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(json_body(&body)["headers"]["host"], "app.plane.test");
    let (resp, _) = collect(
        h2.send_request(get("https://other.plane.test/sub/x", None))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    h.stop().await;
}

#[tokio::test]
async fn certificates_are_swapped_for_new_connections() {
    let ca = TestCa::new();
    let certs = CertStore::new();
    let h = Harness::with(Listen::Https(certs.clone()), |c| c.cluster = CLUSTER.parse().unwrap()).await;
    let backend = echo_backend().await;
    h.add_route("tok", route_to("b1", backend));

    // No certificate: handshakes fail, nothing else does.
    assert!(tls_connect(h.addr, &ca.cert, CLUSTER, &[H1]).await.is_err());
    let (resp, _) = http_get(h.redirect_addr.unwrap(), CLUSTER, "/ready").await;
    assert_eq!(resp.status(), StatusCode::OK);

    let first = ca.leaf(&[CLUSTER], (2040, 1, 1));
    certs.install_pem(&first.chain_pem, &first.key_pem).unwrap();
    let tls = tls_connect(h.addr, &ca.cert, CLUSTER, &[H1]).await.unwrap();
    assert_eq!(peer_leaf(&tls), first.der);
    let mut old = h1_handshake(tls).await;

    let second = ca.leaf(&[CLUSTER], (2041, 1, 1));
    certs.install_pem(&second.chain_pem, &second.key_pem).unwrap();
    let tls = tls_connect(h.addr, &ca.cert, CLUSTER, &[H1]).await.unwrap();
    assert_eq!(peer_leaf(&tls), second.der);
    let mut new = h1_handshake(tls).await;
    for h1 in [&mut old, &mut new] {
        let (resp, _) = collect(h1.send_request(get("/tok/", Some(CLUSTER))).await.unwrap()).await;
        assert_eq!(resp.status(), StatusCode::OK, "both connections keep working");
    }
    h.stop().await;
}

#[tokio::test]
async fn slow_tls_handshakes_are_cut_off() {
    let ca = TestCa::new();
    let timeout = ms(300);
    let (h, _certs) = https_harness(&ca, |c| c.limits.tls_handshake_timeout = timeout).await;
    let mut tcp = TcpStream::connect(h.addr).await.unwrap();
    let took = closed_within(&mut tcp, timeout + Duration::from_secs(2)).await;
    assert!(took >= timeout - ms(50), "{took:?}");
    h.stop().await;
}

#[tokio::test]
async fn the_http_port_redirects_to_https() {
    let ca = TestCa::new();
    let (h, _certs) = https_harness(&ca, |_| {}).await;
    let http = h.redirect_addr.unwrap();
    let port = h.addr.port();

    let (resp, body) = http_get(http, "whatever.example", "/ready").await;
    assert_eq!((resp.status(), &body[..]), (StatusCode::OK, &b"ready\n"[..]));
    let (resp, body) = http_get(http, "whatever.example", "/metrics").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(std::str::from_utf8(&body)
        .unwrap()
        .contains("plane_proxy_active_connections"));

    for (host, path, location) in [
        (
            "plane.test",
            "/tok/a?b=1",
            format!("https://plane.test:{port}/tok/a?b=1"),
        ),
        ("Plane.Test:80", "/", format!("https://Plane.Test:{port}/")),
        (
            "app.plane.test:8080",
            "/tok/",
            format!("https://app.plane.test:{port}/tok/"),
        ),
    ] {
        let (resp, _) = http_get(http, host, path).await;
        assert_eq!(resp.status(), StatusCode::PERMANENT_REDIRECT, "{host}");
        assert_eq!(resp.headers()["location"], location.as_str());
        assert_eq!(resp.headers()["server"], "Plane");
    }
    let (resp, _) = http_get(http, "evil.example", "/tok/").await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN, "no redirects to other sites");

    h.shared.connected.send_replace(false);
    let (resp, _) = http_get(http, CLUSTER, "/ready").await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    h.stop().await;
}

/// The public entry point: both listeners serve, redirects name the HTTPS port (or
/// none for 443), and cancelling the token makes `run_https` return.
#[tokio::test]
async fn run_https_serves_until_shutdown() {
    let ca = TestCa::new();
    let leaf = ca.leaf(&[CLUSTER], (2040, 1, 1));
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    for redirect_port in [None, Some(443)] {
        let certs = CertStore::new();
        certs.install_pem(&leaf.chain_pem, &leaf.key_pem).unwrap();
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let https = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (http_addr, https_addr) = (http.local_addr().unwrap(), https.local_addr().unwrap());
        let mut config = ProxyConfig::new(format!("http://{closed}"), CLUSTER.parse().unwrap());
        config.reconnect_min = ms(10);
        config.reconnect_max = ms(50);
        config.https_redirect_port = redirect_port;
        let shutdown = CancellationToken::new();
        let run = tokio::spawn(crate::run_https(Some(http), https, certs, config, shutdown.clone()));

        let (resp, _) = http_get(http_addr, CLUSTER, "/ready").await;
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        let (resp, _) = http_get(http_addr, CLUSTER, "/tok/").await;
        let expected = match redirect_port {
            None => format!("https://plane.test:{}/tok/", https_addr.port()),
            Some(_) => "https://plane.test/tok/".to_owned(),
        };
        assert_eq!(resp.headers()["location"], expected.as_str());

        let tls = tls_connect(https_addr, &ca.cert, CLUSTER, &[H2]).await.unwrap();
        let (mut h2, _conn) = h2_handshake(tls).await;
        let (resp, _) = collect(h2.send_request(get("https://plane.test/ready", None)).await.unwrap()).await;
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        let (resp, body) = collect(h2.send_request(get("https://plane.test/metrics", None)).await.unwrap()).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(std::str::from_utf8(&body)
            .unwrap()
            .contains("plane_proxy_requests_total{status=\"503\"} 2"));

        shutdown.cancel();
        tokio::time::timeout(DEADLINE, run).await.unwrap().unwrap().unwrap();
    }
}

/// A proxy given an `https://` controller URL speaks TLS to it (`wss://`), and keeps
/// retrying when the handshake fails.
#[tokio::test]
async fn https_controller_urls_use_tls_and_are_retried() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut config = ProxyConfig::new(
        format!("https://{}", listener.local_addr().unwrap()),
        CLUSTER.parse().unwrap(),
    );
    config.reconnect_min = Duration::from_millis(10);
    config.reconnect_max = Duration::from_millis(50);
    let shutdown = CancellationToken::new();
    let proxy = tokio::spawn(crate::run(proxy_listener, config, shutdown.clone()));
    for _ in 0..2 {
        let (mut tcp, _) = tokio::time::timeout(DEADLINE, listener.accept())
            .await
            .unwrap()
            .unwrap();
        // A TLS handshake starts with a handshake record (content type 22).
        let mut first = [0u8; 1];
        tokio::io::AsyncReadExt::read_exact(&mut tcp, &mut first).await.unwrap();
        assert_eq!(first[0], 22);
    }
    shutdown.cancel();
    tokio::time::timeout(DEADLINE, proxy).await.unwrap().unwrap().unwrap();
}
