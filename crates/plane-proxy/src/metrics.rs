//! The proxy's Prometheus metrics, served at `/metrics` on every listener in the text
//! exposition format (version 0.0.4).
//!
//! Everything on the request path is a relaxed atomic add: no lock, no allocation.
//! Rendering walks the counters once per scrape.
//!
//! Responses are counted when the proxy's service returns them (its own answers
//! included); what hyper answers by itself (431 for an HTTP/1.1 head over the limit, 400
//! for an unparsable one) and connections closed without a response are not.
//!
//! | metric | type | what |
//! |---|---|---|
//! | `plane_proxy_requests_total{status}` | counter | responses by status code |
//! | `plane_proxy_active_connections` | gauge | open client connections (upgraded ones included) |
//! | `plane_proxy_active_websockets` | gauge | open upgraded (WebSocket) connections |
//! | `plane_proxy_route_cache_hits_total` | counter | lookups answered from the route cache |
//! | `plane_proxy_route_cache_misses_total` | counter | lookups that waited for the controller |
//! | `plane_proxy_upstream_latency_seconds` | histogram | request sent to a backend → its response headers (connecting included; failed requests not counted) |

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The content type of the exposition format.
pub(crate) const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Upper bounds of the latency histogram's buckets, in seconds (`+Inf` comes on top).
const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Status codes are counted in one slot each, from 100 to 599.
const FIRST_STATUS: u16 = 100;
const STATUS_SLOTS: usize = 500;

/// The proxy's metrics; shared by every connection.
pub(crate) struct Metrics {
    /// Responses by status code, `status - 100`.
    statuses: Box<[AtomicU64]>,
    active_connections: AtomicI64,
    active_websockets: AtomicI64,
    route_cache_hits: AtomicU64,
    route_cache_misses: AtomicU64,
    upstream_latency: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            statuses: (0..STATUS_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            active_connections: AtomicI64::new(0),
            active_websockets: AtomicI64::new(0),
            route_cache_hits: AtomicU64::new(0),
            route_cache_misses: AtomicU64::new(0),
            upstream_latency: Histogram::default(),
        }
    }
}

/// Which gauge a [`GaugeGuard`] holds up.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Gauge {
    Connections,
    WebSockets,
}

/// Counts one connection in a gauge while it lives.
pub(crate) struct GaugeGuard {
    metrics: Arc<Metrics>,
    gauge: Gauge,
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.metrics.gauge(self.gauge).fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    fn gauge(&self, gauge: Gauge) -> &AtomicI64 {
        match gauge {
            Gauge::Connections => &self.active_connections,
            Gauge::WebSockets => &self.active_websockets,
        }
    }

    /// Counts one more open connection in `gauge` until the guard is dropped.
    pub(crate) fn open(self: &Arc<Self>, gauge: Gauge) -> GaugeGuard {
        self.gauge(gauge).fetch_add(1, Ordering::Relaxed);
        GaugeGuard {
            metrics: self.clone(),
            gauge,
        }
    }

    /// Counts a response.
    pub(crate) fn response(&self, status: http::StatusCode) {
        let slot = usize::from(status.as_u16().saturating_sub(FIRST_STATUS));
        if let Some(counter) = self.statuses.get(slot) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a route lookup answered from the cache.
    pub(crate) fn route_cache_hit(&self) {
        self.route_cache_hits.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a route lookup that had to wait for the controller.
    pub(crate) fn route_cache_miss(&self) {
        self.route_cache_misses.fetch_add(1, Ordering::Relaxed);
    }

    /// Records how long a backend took to answer with its response headers.
    pub(crate) fn upstream_latency(&self, took: Duration) {
        self.upstream_latency.observe(took);
    }

    /// The exposition text.
    pub(crate) fn render(&self) -> String {
        let mut out = String::with_capacity(2048);
        header(
            &mut out,
            "plane_proxy_requests_total",
            "counter",
            "Responses sent, by status code.",
        );
        for (slot, counter) in self.statuses.iter().enumerate() {
            let n = counter.load(Ordering::Relaxed);
            if n > 0 {
                let status = slot + usize::from(FIRST_STATUS);
                let _ = writeln!(out, "plane_proxy_requests_total{{status=\"{status}\"}} {n}");
            }
        }
        let gauges = [
            (
                "plane_proxy_active_connections",
                "Open client connections, upgraded ones included.",
                &self.active_connections,
            ),
            (
                "plane_proxy_active_websockets",
                "Open upgraded (WebSocket) connections.",
                &self.active_websockets,
            ),
        ];
        for (name, help, gauge) in gauges {
            header(&mut out, name, "gauge", help);
            let _ = writeln!(out, "{name} {}", gauge.load(Ordering::Relaxed));
        }
        for (name, help, counter) in [
            (
                "plane_proxy_route_cache_hits_total",
                "Route lookups answered from the cache.",
                &self.route_cache_hits,
            ),
            (
                "plane_proxy_route_cache_misses_total",
                "Route lookups that had to wait for the controller.",
                &self.route_cache_misses,
            ),
        ] {
            header(&mut out, name, "counter", help);
            let _ = writeln!(out, "{name} {}", counter.load(Ordering::Relaxed));
        }
        self.upstream_latency.render(
            &mut out,
            "plane_proxy_upstream_latency_seconds",
            "Time from sending a request to a backend to receiving its response headers.",
        );
        out
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A fixed-bucket histogram of durations.
struct Histogram {
    /// Observations per bucket (not cumulative); the last one is `+Inf`.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    /// The sum of observations, in nanoseconds.
    sum_nanos: AtomicU64,
    count: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_nanos: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    fn observe(&self, took: Duration) {
        let secs = took.as_secs_f64();
        let slot = LATENCY_BUCKETS
            .iter()
            .position(|&le| secs <= le)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[slot].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        header(out, name, "histogram", help);
        // Read the buckets first: `_count` is then at least the `+Inf` bucket, as a
        // concurrent observation may land in between.
        let mut cumulative = 0;
        for (slot, bucket) in self.buckets.iter().enumerate() {
            cumulative += bucket.load(Ordering::Relaxed);
            match LATENCY_BUCKETS.get(slot) {
                Some(le) => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
                }
                None => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
                }
            }
        }
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum {sum}");
        let count = self.count.load(Ordering::Relaxed).max(cumulative);
        let _ = writeln!(out, "{name}_count {count}");
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Parses the exposition text into `series → value`, checking that every sample
    /// line is `name[{labels}] value` and follows a `# TYPE` line of its family.
    pub(crate) fn parse(text: &str) -> BTreeMap<String, f64> {
        let mut samples = BTreeMap::new();
        let mut family: Option<String> = None;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE has a kind");
                assert!(
                    ["counter", "gauge", "histogram"].contains(&kind),
                    "unknown type in {line:?}"
                );
                family = Some(name.to_owned());
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad line {line:?}"));
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line:?}"));
            let name = series.split('{').next().unwrap();
            assert!(
                name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "bad name in {line:?}"
            );
            if let Some(labels) = series.strip_prefix(name) {
                if !labels.is_empty() {
                    assert!(
                        labels.starts_with('{') && labels.ends_with('}'),
                        "bad labels in {line:?}"
                    );
                }
            }
            let family = family
                .as_deref()
                .unwrap_or_else(|| panic!("sample before TYPE: {line:?}"));
            assert!(name.starts_with(family), "{name} outside its family {family}");
            assert!(samples.insert(series.to_owned(), value).is_none(), "repeated {series}");
        }
        samples
    }

    #[test]
    fn renders_every_metric() {
        let m = Arc::new(Metrics::default());
        m.response(http::StatusCode::OK);
        m.response(http::StatusCode::OK);
        m.response(http::StatusCode::BAD_GATEWAY);
        let conn = m.open(Gauge::Connections);
        let ws = m.open(Gauge::WebSockets);
        let ws2 = m.open(Gauge::WebSockets);
        drop(ws);
        m.upstream_latency(Duration::from_micros(300));
        m.upstream_latency(Duration::from_millis(3));
        m.upstream_latency(Duration::from_secs(20));
        for _ in 0..7 {
            m.route_cache_hit();
        }
        m.route_cache_miss();
        m.route_cache_miss();
        let text = m.render();
        let s = parse(&text);
        assert_eq!(s[r#"plane_proxy_requests_total{status="200"}"#], 2.0);
        assert_eq!(s[r#"plane_proxy_requests_total{status="502"}"#], 1.0);
        assert!(!s.contains_key(r#"plane_proxy_requests_total{status="404"}"#));
        assert_eq!(s["plane_proxy_active_connections"], 1.0);
        assert_eq!(s["plane_proxy_active_websockets"], 1.0);
        assert_eq!(s["plane_proxy_route_cache_hits_total"], 7.0);
        assert_eq!(s["plane_proxy_route_cache_misses_total"], 2.0);
        let bucket = |le: &str| s[&format!("plane_proxy_upstream_latency_seconds_bucket{{le=\"{le}\"}}")];
        assert_eq!(bucket("0.0005"), 1.0);
        assert_eq!(bucket("0.001"), 1.0);
        assert_eq!(bucket("0.005"), 2.0);
        assert_eq!(bucket("10"), 2.0);
        assert_eq!(bucket("+Inf"), 3.0);
        assert_eq!(s["plane_proxy_upstream_latency_seconds_count"], 3.0);
        let sum = s["plane_proxy_upstream_latency_seconds_sum"];
        assert!((sum - 20.0033).abs() < 1e-6, "{sum}");
        drop((conn, ws2));
        let s = parse(&m.render());
        assert_eq!(s["plane_proxy_active_connections"], 0.0);
        assert_eq!(s["plane_proxy_active_websockets"], 0.0);
    }
}
