//! The Plane proxy: token-routed HTTP and WebSocket forwarding.
//!
//! A client reaches a session backend at `http://[subdomain.]<cluster>/<token>/…`. The
//! proxy checks the Host, takes the token from the first path segment, asks the
//! controller where the token routes (caching the answer), and forwards the request —
//! or the upgraded connection — to the backend with verified identity headers. Once per
//! keepalive interval it tells the controller which backends had traffic, so idle ones
//! can be swept.
//!
//! ```text
//! request ─► /ready? ─► Host ∈ cluster? ─► token ─► route cache ──(miss)──► controller
//!              │ 200/503    │ 400/403        │ 400      │ 410/504       RouteRequest/Route
//!              ▼            ▼                ▼          ▼
//!                          subdomain ok? ─► forward (HTTP/1.1, pooled) ─► backend
//!                              │ 403          │ 502 if unreachable
//!                              ▼              └─► 101? join both upgraded connections
//! ```
//!
//! Layout:
//! * [`config`]: the [`ProxyConfig`] type.
//! * `connection`: the controller WebSocket (handshake, backoff, keepalives).
//! * `routes`: the route cache, lookup coalescing and invalidation.
//! * `proxy`: the HTTP server and request forwarding.
//! * `path`: token extraction and path rewriting.
//! * `headers`: Host matching, verified/forwarded/CORS/hop-by-hop headers.
//! * `activity`: which backends are active, for keepalives.
//!
//! **Architecture invariant:** the proxy never touches the store; everything it knows
//! about routes comes from the controller socket. Every task it spawns stops when the
//! shutdown token is cancelled or [`run`]'s future is dropped.

pub mod config;

mod activity;
mod connection;
mod headers;
mod path;
mod proxy;
mod routes;

#[cfg(test)]
mod proxy_tests;

pub use config::ProxyConfig;

use activity::Activity;
use routes::RouteCache;
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
    /// True while the controller socket is up (after `Welcome`); drives `/ready`.
    pub(crate) connected: watch::Sender<bool>,
    /// The pooled HTTP/1.1 client to backends.
    pub(crate) client: proxy::BackendClient,
}

impl Shared {
    pub(crate) fn new(config: ProxyConfig) -> Self {
        Shared {
            config,
            routes: RouteCache::default(),
            activity: Activity::default(),
            connected: watch::Sender::new(false),
            client: proxy::backend_client(),
        }
    }
}

/// Serves HTTP on `listener` until `shutdown` is cancelled, keeping a WebSocket to the
/// controller at `config.controller_url` (reconnecting forever with backoff).
///
/// Returns once the listener is closed and every spawned task has stopped (open
/// connections get a short grace period). Fails only on an invalid configuration.
pub async fn run(listener: TcpListener, config: ProxyConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let socket_urls = config.validate()?;
    // Cancelled when `shutdown` is, and when this future ends or is dropped.
    let stop = shutdown.child_token();
    let _stop_on_drop = stop.clone().drop_guard();
    let shared = std::sync::Arc::new(Shared::new(config));
    let tasks = TaskTracker::new();
    tracing::info!(
        addr = ?listener.local_addr().ok(),
        proxy = %shared.config.name,
        cluster = %shared.config.cluster,
        "proxy listening"
    );
    tasks.spawn(connection::maintain(shared.clone(), socket_urls, stop.clone()));
    proxy::serve(listener, shared, stop.clone(), tasks.clone()).await;
    tasks.close();
    tasks.wait().await;
    tracing::info!("proxy stopped");
    Ok(())
}
