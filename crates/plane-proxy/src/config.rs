//! The proxy's configuration: where the controller is, which cluster the proxy serves,
//! and its timings.

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
}

impl ProxyConfig {
    /// A config with a random proxy name and the default timings: 30 s route wait,
    /// 1 s keepalives, reconnect backoff from 100 ms to 5 s.
    pub fn new(controller_url: String, cluster: ClusterName) -> Self {
        ProxyConfig {
            controller_url,
            cluster,
            name: ProxyName::new_random(),
            route_wait: Duration::from_secs(30),
            keepalive_interval: Duration::from_secs(1),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
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
        let mut bad = c;
        bad.reconnect_max = Duration::from_millis(1);
        assert!(bad.validate().is_err());
    }
}
