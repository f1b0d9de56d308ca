//! The whole ACME DNS-01 chain with real components: a controller (SQLite) holds the
//! issuance lease and the TXT values, a proxy issues through Debian's `pebble`, which
//! validates by asking our DNS server (`plane_dns` reading the controller over HTTP,
//! with the ctrl token). Then clients that trust pebble's root reach the proxy over
//! TLS, by HTTP/2 and HTTP/1.1, on the bare cluster name and a wildcard subdomain.

use plane_test_pebble::{Pebble, PebbleOptions};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "tls-test-token";

#[tokio::test]
async fn a_proxy_gets_its_certificate_through_the_controller_and_our_dns_server() {
    plane_tests::init_logging();
    let dir = tempfile::tempdir().unwrap();
    let stop = CancellationToken::new();

    // The controller.
    let store = Arc::new(
        plane_store::sqlite::SqliteStore::open(&dir.path().join("c.db"))
            .await
            .unwrap(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let controller_url = format!("http://{}", listener.local_addr().unwrap());
    let mut config = plane_controller::ControllerConfig::new(store.clone(), controller_url.clone(), None);
    config.ctrl_token = Some(TOKEN.into());
    tokio::spawn(plane_controller::serve(listener, config, stop.clone()));

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
    let cert_path = dir.path().join("proxy-cert.pem");
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
    for (h2, host) in [(true, "plane.test"), (false, "plane.test"), (true, "app.plane.test")] {
        let resp = client(h2)
            .get(format!("https://{host}:{}/ready", https_addr.port()))
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
            .get(format!("https://{host}:{}/no-such-token/", https_addr.port()))
            .send()
            .await
            .unwrap();
        assert!(
            gone.status() == 410 || gone.status() == 403,
            "{host}: {}",
            gone.status()
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
    assert_eq!(redirect.headers()["location"], "https://plane.test/some/path?q=1");
    stop.cancel();
}
