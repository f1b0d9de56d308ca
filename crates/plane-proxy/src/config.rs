//! The proxy's configuration: where the controller is, which cluster the proxy serves,
//! its timings, and the limits it puts on clients ([`ProxyLimits`]).

use plane_types::names::{ClusterName, ProxyName};
use plane_types::protocol::PROXY_SOCKET_PATH;
use std::time::Duration;

/// Everything [`crate::run`] needs besides the listener and the shutdown signal.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// The controller's base URL, e.g. `http://127.0.0.1:8080`, or several separated by
    /// commas (the proxy moves to the next one whenever its connection fails). The proxy
    /// connects to `ws://…/ctrl/proxy-socket` (`https` becomes `wss`).
    pub controller_url: String,
    /// The cluster this proxy serves; requests must carry it (or `<subdomain>.<cluster>`)
    /// as their Host.
    pub cluster: ClusterName,
    /// The proxy's name, as reported to the controller.
    pub name: ProxyName,
    /// The longest a request waits for a route (for example while its backend starts)
    /// before the proxy answers 504.
    pub route_wait: Duration,
    /// How often the proxy reports active backends to the controller.
    pub keepalive_interval: Duration,
    /// The first delay before reconnecting to the controller.
    pub reconnect_min: Duration,
    /// The cap of the exponential reconnect delay (also the delay after a `Reject`).
    pub reconnect_max: Duration,
    /// Sizes and timeouts applied to client connections and to backend connections.
    pub limits: ProxyLimits,
    /// With [`crate::run_https`]: the port that HTTP→HTTPS redirects send clients to
    /// (`https://<host>[:port]/…`, the port left out when it is 443). `None` means the
    /// port the HTTPS listener is bound to; the default is `Some(443)`, for a proxy
    /// behind port forwarding or a load balancer that publishes 443.
    pub https_redirect_port: Option<u16>,
    /// Sent as `Authorization: Bearer <token>` to the controller (its `--ctrl-token`).
    pub ctrl_token: Option<String>,
    /// The longest a cached route is used before the controller is asked again (it is
    /// also dropped when its token expires). Bounds how long a missed invalidation lasts.
    pub route_max_age: Duration,
}

/// What a client may send and how long the proxy waits, on every listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyLimits {
    /// The largest request head (request line plus headers) in bytes. HTTP/1.1 requests
    /// over it get 431 and the connection is closed (it is hyper's read buffer size, so
    /// it does not limit bodies, which are streamed); over HTTP/2 it is the advertised
    /// `SETTINGS_MAX_HEADER_LIST_SIZE` and the stream gets 431. At least 8192 (hyper's
    /// smallest HTTP/1.1 buffer). Default 64 KiB. (HTTP/1.1 requests with more than 100
    /// header fields also get 431: hyper's fixed limit.)
    pub max_header_bytes: usize,
    /// The largest request body in bytes, `None` for no limit. A `Content-Length` over it
    /// gets 413 before any backend is contacted; a streamed body that grows past it is
    /// cut off (the backend sees the body end in an error, the client gets 413 unless
    /// the backend already answered). Default 64 MiB.
    pub max_body_bytes: Option<u64>,
    /// How long a client has to send a whole request head, against slowloris clients:
    /// from the first byte of each HTTP/1.1 request, and on a new connection from the
    /// moment it is accepted (or its TLS handshake completed) even if nothing comes. The
    /// connection is closed when it runs out. Not applied to HTTP/2 after its first
    /// request, nor to new connections that chose HTTP/2 by ALPN (they get
    /// `idle_timeout`). Default 10 s.
    pub header_read_timeout: Duration,
    /// How long a client has to complete the TLS handshake. Default 10 s.
    pub tls_handshake_timeout: Duration,
    /// How long the proxy waits for a TCP connection to a backend before answering 502.
    /// Default 5 s.
    pub upstream_connect_timeout: Duration,
    /// A client connection with no request in flight for this long is closed (HTTP/1.1
    /// keep-alive as well as HTTP/2; HTTP/2 clients get a GOAWAY first). Upgraded
    /// connections (WebSocket) never count as idle. Default 60 s.
    pub idle_timeout: Duration,
    /// On shutdown, how long requests in flight get to finish before their connections
    /// are closed. Default 10 s.
    pub shutdown_grace: Duration,
    /// Idle pooled connections to backends are closed after this. Default 60 s.
    pub upstream_pool_idle_timeout: Duration,
}

impl Default for ProxyLimits {
    fn default() -> Self {
        ProxyLimits {
            max_header_bytes: 64 * 1024,
            max_body_bytes: Some(64 * 1024 * 1024),
            header_read_timeout: Duration::from_secs(10),
            tls_handshake_timeout: Duration::from_secs(10),
            upstream_connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(10),
            upstream_pool_idle_timeout: Duration::from_secs(60),
        }
    }
}

impl ProxyLimits {
    /// The smallest `max_header_bytes` (hyper cannot buffer less for HTTP/1.1).
    pub const MIN_HEADER_BYTES: usize = 8192;

    /// Checks that every limit is usable.
    pub(crate) fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.max_header_bytes >= Self::MIN_HEADER_BYTES,
            "max_header_bytes ({}) must be at least {}",
            self.max_header_bytes,
            Self::MIN_HEADER_BYTES
        );
        anyhow::ensure!(
            u32::try_from(self.max_header_bytes).is_ok(),
            "max_header_bytes ({}) must fit in 32 bits",
            self.max_header_bytes
        );
        for (name, value) in [
            ("header_read_timeout", self.header_read_timeout),
            ("tls_handshake_timeout", self.tls_handshake_timeout),
            ("upstream_connect_timeout", self.upstream_connect_timeout),
            ("idle_timeout", self.idle_timeout),
            ("upstream_pool_idle_timeout", self.upstream_pool_idle_timeout),
        ] {
            anyhow::ensure!(!value.is_zero(), "{name} must be positive");
        }
        Ok(())
    }
}

impl ProxyConfig {
    /// A config with a random proxy name and the default timings: 30 s route wait,
    /// 1 s keepalives, reconnect backoff from 100 ms to 5 s, the default
    /// [`ProxyLimits`], and redirects to port 443.
    pub fn new(controller_url: String, cluster: ClusterName) -> Self {
        ProxyConfig {
            controller_url,
            cluster,
            name: ProxyName::new_random(),
            route_wait: Duration::from_secs(30),
            keepalive_interval: Duration::from_secs(1),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            limits: ProxyLimits::default(),
            https_redirect_port: Some(443),
            ctrl_token: None,
            route_max_age: crate::routes::DEFAULT_ROUTE_MAX_AGE,
        }
    }

    /// Checks the timings and the controller URLs; returns the proxy-socket URLs.
    pub(crate) fn validate(&self) -> anyhow::Result<Vec<String>> {
        anyhow::ensure!(
            !self.keepalive_interval.is_zero(),
            "keepalive_interval must be positive"
        );
        anyhow::ensure!(!self.reconnect_min.is_zero(), "reconnect_min must be positive");
        anyhow::ensure!(
            self.reconnect_max >= self.reconnect_min,
            "reconnect_max ({:?}) must not be below reconnect_min ({:?})",
            self.reconnect_max,
            self.reconnect_min
        );
        self.limits.validate()?;
        socket_urls(&self.controller_url)
    }
}

/// The URLs of the proxy socket on each controller of `controller_url` (one base URL,
/// or several separated by commas).
pub(crate) fn socket_urls(controller_url: &str) -> anyhow::Result<Vec<String>> {
    plane_types::protocol::socket_urls(controller_url, PROXY_SOCKET_PATH).map_err(anyhow::Error::msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_urls_use_the_proxy_path() {
        assert_eq!(
            socket_urls("http://a:1/, https://b/prefix").unwrap(),
            ["ws://a:1/ctrl/proxy-socket", "wss://b/prefix/ctrl/proxy-socket"]
        );
        assert!(socket_urls("127.0.0.1:8080").is_err());
    }

    #[test]
    fn defaults_and_validation() {
        let c = ProxyConfig::new("http://127.0.0.1:1".into(), "localhost:9090".parse().unwrap());
        assert_eq!(c.route_wait, Duration::from_secs(30));
        assert_eq!(c.keepalive_interval, Duration::from_secs(1));
        assert!(c.validate().is_ok());
        let mut bad = c.clone();
        bad.keepalive_interval = Duration::ZERO;
        assert!(bad.validate().is_err());
        let mut bad = c.clone();
        bad.reconnect_max = Duration::from_millis(1);
        assert!(bad.validate().is_err());

        assert_eq!(c.limits.max_header_bytes, 64 * 1024);
        assert_eq!(c.limits.max_body_bytes, Some(64 * 1024 * 1024));
        assert_eq!(c.limits.header_read_timeout, Duration::from_secs(10));
        assert_eq!(c.limits.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.https_redirect_port, Some(443));
        let mut bad = c.clone();
        bad.limits.max_header_bytes = 4096;
        assert!(bad.validate().is_err());
        let mut bad = c;
        bad.limits.idle_timeout = Duration::ZERO;
        assert!(bad.validate().is_err());
    }
}
