//! The Plane proxy: token-routed HTTP and WebSocket forwarding.
//!
//! A client reaches a session backend at `http[s]://[subdomain.]<cluster>/<token>/…`.
//! The proxy checks the Host, takes the token from the first path segment, asks the
//! controller where the token routes (caching the answer), and forwards the request —
//! or the upgraded connection — to the backend with verified identity headers. Once per
//! keepalive interval it tells the controller which backends had traffic, so idle ones
//! can be swept.
//!
//! [`run`] serves plain HTTP on one listener. [`run_https`] serves HTTPS (certificate
//! from a [`CertStore`], HTTP/2 or HTTP/1.1 by ALPN) and, optionally, an HTTP listener
//! that redirects to it.
//!
//! ```text
//! accept ─► TLS handshake (HTTPS; ALPN h2 / http/1.1; tls_handshake_timeout)
//!   │         └─► HTTP/1.1 or HTTP/2; head ≤ max_header_bytes (431), header_read_timeout,
//!   │             idle_timeout between requests
//!   ▼
//! request ─► /ready, /metrics? ─► HTTP port of HTTPS? ─► 308 https://host[:port]/path
//!              │ 200/503, text      │
//!              ▼                    ▼
//!            Host ∈ cluster? ─► token ─► body ≤ max_body_bytes? ─► route cache ──(miss)──► controller
//!              │ 400/403          │ 400    │ 413                     │ 410/504    RouteRequest/Route
//!              ▼                  ▼        ▼                         ▼
//!            subdomain ok? ─► forward (HTTP/1.1, pooled, upstream_connect_timeout) ─► backend
//!              │ 403            │ 502 if unreachable or slow to connect, 413 if the body grows too big
//!              ▼                └─► 101? join both upgraded connections (no idle timeout)
//! ```
//!
//! On shutdown every listener closes at once, requests in flight get
//! [`ProxyLimits::shutdown_grace`] to finish, and upgraded connections are closed.
//!
//! Layout:
//! * [`acme`]: the TLS certificate over ACME DNS-01 (issuance lease, renewal, saved file).
//! * [`config`]: the [`ProxyConfig`] and [`ProxyLimits`] types.
//! * [`tls`]: the swappable certificate ([`CertStore`]) and the rustls server config.
//! * `connection`: the controller WebSocket (handshake, backoff, keepalives).
//! * `routes`: the route cache, lookup coalescing and invalidation.
//! * `proxy`: the listeners, client connections (TLS, limits, timeouts, graceful
//!   shutdown), the HTTPS redirect, and request forwarding.
//! * `metrics`: the Prometheus counters behind `/metrics`.
//! * `path`: token extraction and path rewriting.
//! * `headers`: Host matching, verified/forwarded/CORS/hop-by-hop headers.
//! * `activity`: which backends are active, for keepalives.
//!
//! **Architecture invariant:** the proxy never touches the store; everything it knows
//! about routes comes from the controller socket. Every task it spawns (HTTP/2 streams
//! included) stops when the shutdown token is cancelled or the future of [`run`] or
//! [`run_https`] is dropped.

pub mod acme;
pub mod config;
pub mod tls;

mod activity;
mod connection;
mod headers;
mod issuance;
mod metrics;
mod path;
mod proxy;
mod routes;

#[cfg(test)]
mod proxy_tests;
#[cfg(test)]
mod tls_tests;

pub use config::{ProxyConfig, ProxyLimits};
pub use tls::{CertInfo, CertStore};

use activity::Activity;
use routes::RouteCache;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// State shared by the HTTP server and the controller connection.
pub(crate) struct Shared {
    /// The configuration given to [`run`].
    pub(crate) config: ProxyConfig,
    /// Token → route.
    pub(crate) routes: RouteCache,
    /// Backend activity since the last keepalive.
    pub(crate) activity: Activity,
    /// Certificate issuance requests to the controller.
    pub(crate) issuance: issuance::IssuanceClient,
    /// True while the controller socket is up (after `Welcome`); drives `/ready`.
    pub(crate) connected: watch::Sender<bool>,
    /// The pooled HTTP/1.1 client to backends.
    pub(crate) client: proxy::BackendClient,
    /// The counters behind `/metrics`.
    pub(crate) metrics: Arc<metrics::Metrics>,
}

impl Shared {
    pub(crate) fn new(config: ProxyConfig) -> Self {
        Shared {
            routes: RouteCache::new(config.route_max_age),
            client: proxy::backend_client(&config.limits),
            config,
            activity: Activity::default(),
            issuance: issuance::IssuanceClient::default(),
            connected: watch::Sender::new(false),
            metrics: Arc::default(),
        }
    }
}

/// Serves HTTP on `listener` until `shutdown` is cancelled, keeping a WebSocket to the
/// controller at `config.controller_url` (reconnecting forever with backoff).
///
/// Returns once the listener is closed and every spawned task has stopped (requests in
/// flight get [`ProxyLimits::shutdown_grace`]). Fails only on an invalid configuration.
pub async fn run(listener: TcpListener, config: ProxyConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    serve(vec![(listener, proxy::Mode::Http)], config, None, shutdown).await
}

/// Like [`run`], over TLS: serves HTTPS on `https` with the certificate in `certs`
/// (read at each handshake, so it can be replaced while the proxy runs; handshakes
/// fail while it is empty), HTTP/2 or HTTP/1.1 by ALPN.
///
/// `http`, if given, answers `/ready` and `/metrics`, and redirects every other
/// request of the cluster's hosts with 308 to `https://<host>[:port]<path and query>`,
/// the port being [`ProxyConfig::https_redirect_port`] (or the port of `https` if
/// that is `None`; left out when 443).
pub async fn run_https(
    http: Option<TcpListener>,
    https: TcpListener,
    certs: Arc<CertStore>,
    config: ProxyConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let listeners = https_listeners(http, https, &certs, &config)?;
    serve(listeners, config, None, shutdown).await
}

/// Like [`run_https`], and keeps the certificate in `certs` issued and renewed through
/// ACME DNS-01 (see [`acme`]), coordinated by the controller: a saved certificate is
/// served at once, and issuance runs while the proxy serves.
pub async fn run_https_acme(
    http: Option<TcpListener>,
    https: TcpListener,
    certs: Arc<CertStore>,
    acme: acme::AcmeConfig,
    config: ProxyConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let listeners = https_listeners(http, https, &certs, &config)?;
    serve(listeners, config, Some((acme, certs)), shutdown).await
}

/// The HTTPS listener, and the HTTP one (if any) redirecting to it.
fn https_listeners(
    http: Option<TcpListener>,
    https: TcpListener,
    certs: &Arc<CertStore>,
    config: &ProxyConfig,
) -> anyhow::Result<Vec<(TcpListener, proxy::Mode)>> {
    let https_port = match config.https_redirect_port {
        Some(port) => port,
        None => https.local_addr()?.port(),
    };
    let mut listeners = vec![(
        https,
        proxy::Mode::Https {
            acceptor: tokio_rustls::TlsAcceptor::from(certs.server_config()),
            public_port: https_port,
        },
    )];
    if let Some(http) = http {
        listeners.push((http, proxy::Mode::Redirect { https_port }));
    }
    Ok(listeners)
}

impl acme::CertSink for CertStore {
    fn install(&self, chain_pem: &str, key_pem: &str) -> anyhow::Result<()> {
        self.install_pem(chain_pem, key_pem).map(|_| ())
    }
}

/// What [`run`] and [`run_https`] share: the controller connection and every listener,
/// until `shutdown`.
async fn serve(
    listeners: Vec<(TcpListener, proxy::Mode)>,
    config: ProxyConfig,
    acme: Option<(acme::AcmeConfig, Arc<CertStore>)>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let socket_urls = config.validate()?;
    if socket_urls.iter().any(|u| u.starts_with("wss://")) {
        // A controller behind TLS (`https://` URLs): the WebSocket client's rustls
        // needs a provider; pick ring unless the process already chose one.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    // Cancelled when `shutdown` is, and when this future ends or is dropped.
    let stop = shutdown.child_token();
    let _stop_on_drop = stop.clone().drop_guard();
    let shared = Arc::new(Shared::new(config));
    let tasks = TaskTracker::new();
    for (listener, mode) in &listeners {
        let kind = match mode {
            proxy::Mode::Http => "http",
            proxy::Mode::Https { .. } => "https",
            proxy::Mode::Redirect { .. } => "http (redirect to https)",
        };
        tracing::info!(
            addr = ?listener.local_addr().ok(),
            kind,
            proxy = %shared.config.name,
            cluster = %shared.config.cluster,
            "proxy listening"
        );
    }
    tasks.spawn(connection::maintain(shared.clone(), socket_urls, stop.clone()));
    if let Some((acme_config, certs)) = acme {
        let lease = Arc::new(issuance::ControllerLease(shared.clone()));
        let cluster = shared.config.cluster.to_string();
        tasks.spawn(acme::run(cluster, acme_config, lease, certs, stop.clone()));
    }
    let servers = listeners
        .into_iter()
        .map(|(listener, mode)| proxy::serve(listener, mode, shared.clone(), stop.clone(), tasks.clone()));
    futures_util::future::join_all(servers).await;
    tasks.close();
    tasks.wait().await;
    tracing::info!("proxy stopped");
    Ok(())
}
