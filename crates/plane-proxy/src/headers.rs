//! Header handling: Host matching against the cluster, the verified identity headers,
//! `x-forwarded-*`, hop-by-hop removal, and the headers added to every response.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use plane_types::names::{BackendName, ClusterName};
use plane_types::protocol::RouteInfo;
use std::net::IpAddr;
use tracing::warn;

/// Prefix of the identity headers only the proxy may set.
pub(crate) const VERIFIED_PREFIX: &str = "x-verified-";
/// The user the token was issued to.
pub(crate) const VERIFIED_USERNAME: HeaderName = HeaderName::from_static("x-verified-username");
/// The `auth` JSON the token was issued with.
pub(crate) const VERIFIED_USER_DATA: HeaderName = HeaderName::from_static("x-verified-user-data");
/// The backend's secret token.
pub(crate) const VERIFIED_SECRET: HeaderName = HeaderName::from_static("x-verified-secret");
/// The backend id.
pub(crate) const VERIFIED_BACKEND: HeaderName = HeaderName::from_static("x-verified-backend");
/// The original request path, token included.
pub(crate) const VERIFIED_PATH: HeaderName = HeaderName::from_static("x-verified-path");
/// Client addresses, appended to by each proxy.
pub(crate) const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// The scheme the client used.
pub(crate) const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// Tells the client which backend answered.
pub(crate) const X_PLANE_BACKEND_ID: HeaderName = HeaderName::from_static("x-plane-backend-id");
/// The `Server` header value.
pub(crate) const SERVER_NAME: HeaderValue = HeaderValue::from_static("Plane");

/// How a request's Host relates to the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HostMatch {
    /// The Host is the cluster name itself.
    Cluster,
    /// The Host is `<subdomain>.<cluster>`; the subdomain is lowercased.
    Subdomain(String),
}

/// Matches a Host (full `host[:port]`, case-insensitive) against the cluster name.
/// `None` means the Host belongs to another site.
pub(crate) fn match_host(host: &str, cluster: &ClusterName) -> Option<HostMatch> {
    match_names(host, cluster.as_str())
}

/// Like [`match_host`], for an HTTPS listener that clients reach on `public_port`: a
/// cluster named without a port (as ACME needs; served on 443 by default) also matches
/// a Host that names `public_port`, as browsers send it when the port is not 443.
pub(crate) fn match_https_host(host: &str, cluster: &ClusterName, public_port: u16) -> Option<HostMatch> {
    match_host(host, cluster).or_else(|| {
        let name = strip_port(host);
        let port = host.get(name.len() + 1..)?.parse::<u16>().ok()?;
        let cluster = cluster.as_str();
        (port == public_port && strip_port(cluster) == cluster)
            .then(|| match_names(name, cluster))
            .flatten()
    })
}

/// Like [`match_host`], but ignoring the ports of both: for the HTTP port of an HTTPS
/// proxy, which clients reach on another port than the cluster name's.
pub(crate) fn match_hostname(host: &str, cluster: &ClusterName) -> Option<HostMatch> {
    match_names(strip_port(host), strip_port(cluster.as_str()))
}

/// The host of `host[:port]` (an IPv6 literal keeps its brackets).
pub(crate) fn strip_port(host: &str) -> &str {
    let port_at = if host.starts_with('[') {
        host.find("]:").map(|i| i + 1)
    } else {
        host.rfind(':')
    };
    match port_at {
        Some(i) if host[i + 1..].bytes().all(|b| b.is_ascii_digit()) => &host[..i],
        _ => host,
    }
}

fn match_names(host: &str, cluster: &str) -> Option<HostMatch> {
    let host = host.to_ascii_lowercase();
    if host == cluster {
        return Some(HostMatch::Cluster);
    }
    let sub = host.strip_suffix(cluster)?.strip_suffix('.')?;
    if sub.is_empty() {
        return None;
    }
    Some(HostMatch::Subdomain(sub.to_owned()))
}

/// Whether a Host match is allowed for a route: a route with a subdomain must be reached
/// through exactly that subdomain, a route without one through the bare cluster name.
pub(crate) fn subdomain_allowed(host: &HostMatch, route_subdomain: Option<&str>) -> bool {
    match (host, route_subdomain) {
        (HostMatch::Cluster, None) => true,
        (HostMatch::Subdomain(got), Some(want)) => got.eq_ignore_ascii_case(want),
        _ => false,
    }
}

/// Removes every client-sent `x-verified-*` header.
pub(crate) fn strip_verified(headers: &mut HeaderMap) {
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().starts_with(VERIFIED_PREFIX)) // names are lowercase
        .cloned()
        .collect();
    for name in names {
        headers.remove(&name);
    }
}

/// Sets the verified identity headers from the route. `original_path` is the request
/// path as the client sent it (token included, without the query).
pub(crate) fn set_verified(headers: &mut HeaderMap, route: &RouteInfo, original_path: &str) {
    let mut set = |name: HeaderName, value: &str| match HeaderValue::from_str(value) {
        Ok(v) => {
            headers.insert(name, v);
        }
        Err(_) => warn!(header = %name, backend_id = %route.backend_id, "value not valid in a header; not sent"),
    };
    if let Some(user) = &route.user {
        set(VERIFIED_USERNAME, user);
    }
    if let Some(data) = &route.user_data {
        // Serializing a `Value` cannot fail; compact JSON escapes control characters.
        set(VERIFIED_USER_DATA, &serde_json::to_string(data).unwrap_or_default());
    }
    if let Some(secret) = &route.secret_token {
        set(VERIFIED_SECRET, secret);
    }
    set(VERIFIED_BACKEND, route.backend_id.as_str());
    set(VERIFIED_PATH, original_path);
}

/// Appends the client address to `x-forwarded-for` (merging repeated headers) and sets
/// `x-forwarded-proto` (`https` if the client came over TLS, else `http`).
pub(crate) fn set_forwarded(headers: &mut HeaderMap, client: IpAddr, tls: bool) {
    let client = client.to_canonical().to_string();
    let mut parts: Vec<String> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .collect();
    parts.push(client.clone());
    // The parts came from valid header strings, so joining them stays valid; fall back to
    // the client address alone rather than panicking.
    if let Ok(v) = HeaderValue::from_str(&parts.join(", ")).or_else(|_| HeaderValue::from_str(&client)) {
        headers.insert(X_FORWARDED_FOR, v);
    }
    let proto = if tls { "https" } else { "http" };
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
}

/// Headers that describe one hop and must not be forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Whether a request asks for an HTTP/1.1 protocol upgrade (`Connection: upgrade` plus an
/// `Upgrade` header).
pub(crate) fn is_upgrade_request(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE) && connection_tokens(headers).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Removes hop-by-hop headers, including those named in `Connection`. With `upgrade`,
/// the `Upgrade` header is kept and `Connection` is reduced to `upgrade`.
pub(crate) fn remove_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let listed: Vec<HeaderName> = connection_tokens(headers)
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    let upgrade_values: Vec<HeaderValue> = if upgrade {
        headers.get_all(header::UPGRADE).iter().cloned().collect()
    } else {
        Vec::new()
    };
    for name in listed.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    if upgrade && !upgrade_values.is_empty() {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        for v in upgrade_values {
            headers.append(header::UPGRADE, v);
        }
    }
}

/// Adds the headers every response from the proxy carries: `Server`, CORS headers when
/// the backend set no `access-control-allow-origin`, and the backend id if known.
pub(crate) fn add_response_headers(headers: &mut HeaderMap, backend: Option<&BackendName>) {
    if !headers.contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN) {
        let star = HeaderValue::from_static("*");
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, star.clone());
        headers.insert(header::ACCESS_CONTROL_ALLOW_METHODS, star.clone());
        headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, star);
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
    }
    headers.insert(header::SERVER, SERVER_NAME);
    if let Some(backend) = backend {
        if let Ok(v) = HeaderValue::from_str(backend.as_str()) {
            headers.insert(X_PLANE_BACKEND_ID, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cluster(s: &str) -> ClusterName {
        s.parse().unwrap()
    }

    fn check_host(host: &str, cluster_name: &str, expected: Option<HostMatch>) {
        assert_eq!(
            match_host(host, &cluster(cluster_name)),
            expected,
            "{host} vs {cluster_name}"
        );
    }

    #[test]
    fn host_matching() {
        use HostMatch::*;
        check_host("localhost:9090", "localhost:9090", Some(Cluster));
        check_host("LocalHost:9090", "localhost:9090", Some(Cluster));
        check_host("app.localhost:9090", "localhost:9090", Some(Subdomain("app".into())));
        check_host("APP.Localhost:9090", "localhost:9090", Some(Subdomain("app".into())));
        check_host("localhost", "localhost:9090", None);
        check_host("localhost:9091", "localhost:9090", None);
        check_host("localhost:9090", "localhost", None);
        check_host("evil-localhost:9090", "localhost:9090", None);
        check_host(".localhost:9090", "localhost:9090", None);
        check_host("example.com", "plane.example.com", None);
        check_host("plane.example.com", "plane.example.com", Some(Cluster));
        check_host(
            "a.b.plane.example.com",
            "plane.example.com",
            Some(Subdomain("a.b".into())),
        );
    }

    #[test]
    fn https_hosts_may_name_the_public_port() {
        use HostMatch::*;
        let c = cluster("plane.test");
        assert_eq!(match_https_host("plane.test", &c, 8443), Some(Cluster));
        assert_eq!(match_https_host("plane.test:8443", &c, 8443), Some(Cluster));
        assert_eq!(
            match_https_host("App.Plane.Test:8443", &c, 8443),
            Some(Subdomain("app".into()))
        );
        assert_eq!(match_https_host("plane.test:8444", &c, 8443), None);
        assert_eq!(match_https_host("plane.test:", &c, 8443), None);
        assert_eq!(match_https_host("evil.test:8443", &c, 8443), None);
        // A cluster named with a port keeps matching exactly.
        let c = cluster("plane.test:9000");
        assert_eq!(match_https_host("plane.test:9000", &c, 8443), Some(Cluster));
        assert_eq!(match_https_host("plane.test:8443", &c, 8443), None);
    }

    #[test]
    fn hostnames_ignore_ports() {
        use HostMatch::*;
        let c = cluster("plane.test:8443");
        assert_eq!(match_hostname("plane.test", &c), Some(Cluster));
        assert_eq!(match_hostname("Plane.Test:80", &c), Some(Cluster));
        assert_eq!(match_hostname("app.plane.test:8080", &c), Some(Subdomain("app".into())));
        assert_eq!(match_hostname("evil.test", &c), None);
        assert_eq!(match_hostname("xplane.test", &c), None);
        for (host, expected) in [
            ("a.test", "a.test"),
            ("a.test:80", "a.test"),
            ("a.test:", "a.test"),
            ("[::1]:8080", "[::1]"),
            ("[::1]", "[::1]"),
            ("a.test:x", "a.test:x"),
        ] {
            assert_eq!(strip_port(host), expected, "{host}");
        }
    }

    #[test]
    fn subdomain_rules() {
        let sub = |s: &str| HostMatch::Subdomain(s.into());
        assert!(subdomain_allowed(&HostMatch::Cluster, None));
        assert!(!subdomain_allowed(&HostMatch::Cluster, Some("app")));
        assert!(subdomain_allowed(&sub("app"), Some("app")));
        assert!(!subdomain_allowed(&sub("other"), Some("app")));
        assert!(!subdomain_allowed(&sub("app"), None));
    }

    fn route() -> RouteInfo {
        RouteInfo {
            backend_id: "backend123".parse().unwrap(),
            address: "127.0.0.1:1".parse().unwrap(),
            secret_token: Some("secret987".into()),
            user: Some("auser123".into()),
            user_data: Some(json!({"access": "readonly", "email": "a@example.com"})),
            subdomain: None,
            expires_in_ms: None,
        }
    }

    #[test]
    fn verified_headers_are_replaced() {
        let mut h = HeaderMap::new();
        h.insert("X-Verified-Username", HeaderValue::from_static("mallory"));
        h.insert("x-verified-admin", HeaderValue::from_static("true"));
        h.append("x-VERIFIED-secret", HeaderValue::from_static("guess"));
        h.insert("x-verifiedish", HeaderValue::from_static("kept"));
        h.insert("accept", HeaderValue::from_static("*/*"));
        strip_verified(&mut h);
        assert!(h.keys().all(|k| !k.as_str().starts_with("x-verified-")));
        assert_eq!(h["x-verifiedish"], "kept");
        assert_eq!(h["accept"], "*/*");

        set_verified(&mut h, &route(), "/abc123/a/b/c/");
        assert_eq!(h[VERIFIED_USERNAME], "auser123");
        assert_eq!(
            h[VERIFIED_USER_DATA],
            r#"{"access":"readonly","email":"a@example.com"}"#
        );
        assert_eq!(h[VERIFIED_SECRET], "secret987");
        assert_eq!(h[VERIFIED_BACKEND], "backend123");
        assert_eq!(h[VERIFIED_PATH], "/abc123/a/b/c/");

        let mut bare = route();
        bare.user = None;
        bare.user_data = None;
        bare.secret_token = None;
        let mut h = HeaderMap::new();
        set_verified(&mut h, &bare, "/t/");
        assert!(!h.contains_key(VERIFIED_USERNAME) && !h.contains_key(VERIFIED_SECRET));
        assert_eq!(h[VERIFIED_BACKEND], "backend123");
    }

    #[test]
    fn forwarded_for_appends() {
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        let mut h = HeaderMap::new();
        set_forwarded(&mut h, ip, false);
        assert_eq!(h[X_FORWARDED_FOR], "10.0.0.7");
        assert_eq!(h[X_FORWARDED_PROTO], "http");

        let mut h = HeaderMap::new();
        h.append(X_FORWARDED_FOR, HeaderValue::from_static("1.1.1.1, 2.2.2.2"));
        h.append(X_FORWARDED_FOR, HeaderValue::from_static("3.3.3.3"));
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        set_forwarded(&mut h, ip, true);
        assert_eq!(h.get_all(X_FORWARDED_FOR).iter().count(), 1);
        assert_eq!(h[X_FORWARDED_FOR], "1.1.1.1, 2.2.2.2, 3.3.3.3, 10.0.0.7");
        assert_eq!(h[X_FORWARDED_PROTO], "https");

        let mut h = HeaderMap::new();
        set_forwarded(&mut h, "::ffff:10.1.2.3".parse().unwrap(), false);
        assert_eq!(h[X_FORWARDED_FOR], "10.1.2.3");
    }

    #[test]
    fn hop_by_hop() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-custom-hop"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-custom-hop", HeaderValue::from_static("1"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        assert!(!is_upgrade_request(&h));
        remove_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
        assert_eq!(h[header::CONTENT_LENGTH], "3");

        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("sec-websocket-key", HeaderValue::from_static("k"));
        assert!(is_upgrade_request(&h));
        remove_hop_by_hop(&mut h, true);
        assert_eq!(h[header::CONNECTION], "upgrade");
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h["sec-websocket-key"], "k");
    }

    #[test]
    fn cors_only_when_absent() {
        let backend: BackendName = "b1".parse().unwrap();
        let mut h = HeaderMap::new();
        add_response_headers(&mut h, Some(&backend));
        assert_eq!(h[header::ACCESS_CONTROL_ALLOW_ORIGIN], "*");
        assert_eq!(h[header::ACCESS_CONTROL_ALLOW_METHODS], "*");
        assert_eq!(h[header::ACCESS_CONTROL_ALLOW_HEADERS], "*");
        assert_eq!(h[header::ACCESS_CONTROL_ALLOW_CREDENTIALS], "true");
        assert_eq!(h[header::SERVER], "Plane");
        assert_eq!(h[X_PLANE_BACKEND_ID], "b1");

        let mut h = HeaderMap::new();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("https://app.example"),
        );
        h.insert(header::SERVER, HeaderValue::from_static("backend/1.0"));
        add_response_headers(&mut h, None);
        assert_eq!(h[header::ACCESS_CONTROL_ALLOW_ORIGIN], "https://app.example");
        assert!(!h.contains_key(header::ACCESS_CONTROL_ALLOW_METHODS));
        assert!(!h.contains_key(header::ACCESS_CONTROL_ALLOW_CREDENTIALS));
        assert_eq!(h[header::SERVER], "Plane");
        assert!(!h.contains_key(X_PLANE_BACKEND_ID));
    }
}
