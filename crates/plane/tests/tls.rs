//! The whole ACME DNS-01 chain with real components: a controller (SQLite) holds the
//! issuance lease and the TXT values, a proxy issues through Debian's `pebble`, which
//! validates by asking our DNS server (`plane_dns` reading the controller over HTTP,
//! with the ctrl token). Then clients that trust pebble's root reach the proxy over
//! TLS, by HTTP/2 and HTTP/1.1, on the bare cluster name and a wildcard subdomain, and
//! through it real backends (the demo, started by the drone), one of them on its own
//! subdomain.

use plane_test_pebble::{Pebble, PebbleOptions};
use plane_tests::{Options, TestCluster};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "tls-test-token";

#[tokio::test]
async fn a_proxy_gets_its_certificate_through_the_controller_and_our_dns_server() {
    let stop = CancellationToken::new();

    // Controller (SQLite), drone and an HTTP proxy of cluster `plane.test`; the proxy
    // under test is the HTTPS one below.
    let mut options = Options::new(env!("CARGO_BIN_EXE_plane"));
    options.ctrl_token = Some(TOKEN.into());
    options.cluster = Some("plane.test".parse().unwrap());
    let tc = TestCluster::start(options).await.unwrap();
    let store = tc.store.clone();
    let controller_url = tc.controller_url.clone();

    // Our DNS server for the zone, reading the controller.
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let dns_addr: SocketAddr = udp.local_addr().unwrap();
    let tcp = tokio::net::TcpListener::bind(dns_addr).await.unwrap();
    let source = plane_dns::ControllerTxtSource::new(&controller_url, Some(TOKEN.into())).unwrap();
    tokio::spawn(plane_dns::run(
        udp,
        tcp,
        plane_dns::DnsConfig::new("plane.test"),
        Arc::new(source),
        stop.clone(),
    ));

    // Pebble, validating through it.
    let pebble = Pebble::start(PebbleOptions::new(dns_addr)).await.unwrap();

    // The proxy, issuing through the controller.
    let https = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let https_addr = https.local_addr().unwrap();
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_addr = http.local_addr().unwrap();
    let mut proxy = plane_proxy::ProxyConfig::new(controller_url.clone(), "plane.test".parse().unwrap());
    proxy.ctrl_token = Some(TOKEN.into());
    // Clients reach it on its own port, not 443: that port is in their Host, and in
    // the redirects.
    proxy.https_redirect_port = None;
    let cert_path = tc.dir().join("proxy-cert.pem");
    let mut acme = plane_proxy::acme::AcmeConfig::new(pebble.directory_url(), &cert_path);
    acme.acme_server_ca = Some(pebble.listener_ca_pem_path());
    acme.retry_after_failure = Duration::from_millis(500);
    let certs = plane_proxy::CertStore::new();
    tokio::spawn(plane_proxy::run_https_acme(
        Some(http),
        https,
        certs.clone(),
        acme,
        proxy,
        stop.clone(),
    ));

    // The certificate arrives (pebble really queried our DNS server for both values).
    let deadline = Instant::now() + Duration::from_secs(60);
    let info = loop {
        if let Some(info) = certs.current() {
            break info;
        }
        assert!(
            Instant::now() < deadline,
            "no certificate; pebble log:\n{}",
            std::fs::read_to_string(pebble.log_path()).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(info.not_after > std::time::SystemTime::now());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&cert_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the saved key must be private");
    // The lease is released and the TXT values are gone once issuance is done.
    let cluster: plane_types::names::ClusterName = "plane.test".parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !plane_store::Store::acme_txt(&*store, &cluster)
        .await
        .unwrap()
        .is_empty()
    {
        assert!(Instant::now() < deadline, "the TXT values were not cleared");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Clients trusting pebble's root reach the proxy over TLS, HTTP/2 and HTTP/1.1,
    // on the cluster name and a wildcard subdomain.
    let roots = pebble.issuing_roots_pem().await.unwrap();
    let root = reqwest::Certificate::from_pem(roots.as_bytes()).unwrap();
    let client = |h2: bool| {
        let mut b = reqwest::Client::builder()
            .add_root_certificate(root.clone())
            .tls_built_in_root_certs(false)
            .resolve("plane.test", https_addr)
            .resolve("app.plane.test", https_addr);
        if !h2 {
            b = b.http1_only();
        }
        b.build().unwrap()
    };
    let port = https_addr.port();
    for (h2, host) in [(true, "plane.test"), (false, "plane.test"), (true, "app.plane.test")] {
        let resp = client(h2)
            .get(format!("https://{host}:{port}/ready"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("TLS to {host} (h2: {h2}): {e:?}"));
        let version = resp.version();
        assert_eq!(
            version,
            if h2 {
                reqwest::Version::HTTP_2
            } else {
                reqwest::Version::HTTP_11
            },
            "{host}"
        );
        assert_eq!(resp.status(), 200, "the proxy is connected to the controller");
        // An unknown token over TLS reaches the routing: 410, not a TLS or Host error.
        let gone = client(h2)
            .get(format!("https://{host}:{port}/no-such-token/"))
            .send()
            .await
            .unwrap();
        assert_eq!(gone.status(), 410, "{host}");
    }

    // Real backends through TLS: one on the cluster name, one on its subdomain.
    let plain_backend = tc.connect_ready(&tc.demo_request("tls-plain")).await.unwrap();
    let mut on_subdomain = tc.demo_request("tls-subdomain");
    on_subdomain.spawn_config.as_mut().unwrap().subdomain = Some("app".into());
    let sub_backend = tc.connect_ready(&on_subdomain).await.unwrap();
    let env_of = |host: &str, token: &str| format!("https://{host}:{port}/{token}/env");
    for h2 in [true, false] {
        for (host, backend) in [("plane.test", &plain_backend), ("app.plane.test", &sub_backend)] {
            let resp = client(h2)
                .get(env_of(host, &backend.token))
                .send()
                .await
                .unwrap_or_else(|e| panic!("{host} (h2: {h2}): {e:?}"));
            assert_eq!(resp.status(), 200, "{host} (h2: {h2})");
            assert_eq!(resp.headers()["x-plane-backend-id"], backend.backend_id.as_str());
            let env: serde_json::Value = resp.json().await.unwrap();
            assert_eq!(
                env["SESSION_BACKEND_ID"],
                backend.backend_id.as_str(),
                "{host} (h2: {h2})"
            );
        }
        // The subdomain backend answers only on its subdomain.
        let wrong = client(h2)
            .get(env_of("plane.test", &sub_backend.token))
            .send()
            .await
            .unwrap();
        assert!(
            wrong.status().is_client_error(),
            "the subdomain backend on the bare name: {}",
            wrong.status()
        );
    }

    // The HTTP port redirects to HTTPS, but answers /ready itself.
    let plain = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let ready = plain.get(format!("http://{http_addr}/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let redirect = plain
        .get(format!("http://{http_addr}/some/path?q=1"))
        .header("host", "plane.test")
        .send()
        .await
        .unwrap();
    assert_eq!(redirect.status(), 308);
    assert_eq!(
        redirect.headers()["location"],
        format!("https://plane.test:{port}/some/path?q=1").as_str()
    );
    stop.cancel();
    tc.shutdown().await.unwrap();
}
