//! The internal WebSocket protocol between the controller and drones and proxies.
//!
//! Each message is one WebSocket text frame holding one JSON object, externally tagged
//! by variant (`{"Heartbeat": {...}}`). A connection starts with a `Hello` from the
//! client carrying [`PROTOCOL_VERSION`]; the controller answers `Welcome` or `Reject`
//! and closes. Nothing else may be sent before the handshake completes.
//!
//! Endpoints: `/ctrl/drone-socket` for drones, `/ctrl/proxy-socket` for proxies.
//!
//! **Delivery:** drone state events carry a drone-local `event_id` and are re-sent until
//! the controller answers `Ack` with that id; the controller applies each event
//! idempotently (statuses only move forward), so duplicates are harmless.

use crate::api::KeyConfig;
use crate::executable::{Executable, RuntimeKind};
use crate::lease::LeaseDeadlines;
use crate::names::{BackendName, ClusterName, ControllerName, DroneName, ProxyName};
use crate::status::{BackendStatus, TerminationKind, TerminationReason};
use crate::EpochMillis;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// The protocol version. Bump it on any incompatible change.
/// Version 3 added token expiry in routes, `ResetRoutes`, and certificate issuance.
pub const PROTOCOL_VERSION: u32 = 3;

/// Path of the drone socket on the controller.
pub const DRONE_SOCKET_PATH: &str = "/ctrl/drone-socket";
/// Path of the proxy socket on the controller.
pub const PROXY_SOCKET_PATH: &str = "/ctrl/proxy-socket";

/// The WebSocket URLs of a socket (`path`, e.g. [`DRONE_SOCKET_PATH`]) on each of the
/// controllers in `controller_urls`: one base URL, or several separated by commas (a
/// drone or proxy moves to the next one whenever its connection fails). `http`/`ws`
/// become `ws`, `https`/`wss` become `wss`; a base path is kept.
pub fn socket_urls(controller_urls: &str, path: &str) -> Result<Vec<String>, String> {
    let mut urls = Vec::new();
    for url in controller_urls.split(',') {
        let url = url.trim();
        let trimmed = url.trim_end_matches('/');
        let Some((scheme, rest)) = trimmed.split_once("://") else {
            return Err(format!(
                "controller URL {url:?} has no scheme (expected http://, https://, ws:// or wss://)"
            ));
        };
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "http" | "ws" => "ws",
            "https" | "wss" => "wss",
            other => return Err(format!("controller URL {url:?} has unsupported scheme {other:?}")),
        };
        if rest.is_empty() || rest.starts_with('/') {
            return Err(format!("controller URL {url:?} has no host"));
        }
        urls.push(format!("{scheme}://{rest}{path}"));
    }
    Ok(urls)
}

/// The first message a drone sends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DroneHello {
    /// Must equal [`PROTOCOL_VERSION`].
    pub protocol_version: u32,
    /// The drone's persistent name.
    pub name: DroneName,
    /// The cluster the drone serves.
    pub cluster: ClusterName,
    /// The pool within the cluster (`""` for the default pool).
    pub pool: String,
    /// The runtimes this drone offers.
    pub runtimes: Vec<RuntimeKind>,
    /// The drone's version.
    pub plane_version: String,
    /// The drone's source hash.
    pub plane_hash: String,
    /// The drone's clock when it sent this message.
    pub local_time: EpochMillis,
}

/// A backend's state change as reported by its drone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendEvent {
    /// Drone-local, strictly increasing id; the controller acks it.
    pub event_id: u64,
    /// The backend.
    pub backend_id: BackendName,
    /// The new status.
    pub status: BackendStatus,
    /// Where the backend listens, once known (from `waiting` on).
    #[serde(default)]
    pub address: Option<SocketAddr>,
    /// Exit code, on `terminated` when the backend exited.
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// Why it is terminating, from `terminating` on.
    #[serde(default)]
    pub termination_reason: Option<TerminationReason>,
    /// How it is terminating, from `terminating` on.
    #[serde(default)]
    pub termination_kind: Option<TerminationKind>,
    /// A human-readable detail (for example a spawn error).
    #[serde(default)]
    pub message: Option<String>,
}

/// How far a backend's loading step (an image pull, for Docker) has got. Sent while the
/// backend is `loading`, at a bounded rate; not persisted (a lost report is replaced by
/// the next one).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoadProgress {
    /// What is happening, e.g. `"pulling 3 of 7 layers"`.
    pub message: String,
    /// Completion in `0.0..=1.0`, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fraction: Option<f32>,
    /// Bytes fetched so far, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_done: Option<u64>,
    /// Bytes to fetch in all, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_total: Option<u64>,
}

impl LoadProgress {
    /// A report with only a message.
    pub fn message(message: impl Into<String>) -> LoadProgress {
        LoadProgress {
            message: message.into(),
            fraction: None,
            bytes_done: None,
            bytes_total: None,
        }
    }
}

/// One sample of a running backend's resource use. Sent at a bounded rate; not persisted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendMetrics {
    /// Memory in use, in bytes (for Docker: usage minus page cache, as `docker stats`).
    pub memory_bytes: u64,
    /// The memory limit, in bytes, if one applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit_bytes: Option<u64>,
    /// CPU time used since the backend started, in nanoseconds.
    pub cpu_total_nanos: u64,
    /// CPU use since the previous sample, in percent of one core (may exceed 100 with
    /// several cores); absent on the first sample.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_percent: Option<f64>,
    /// The drone's clock when the sample was taken.
    pub sampled_at: EpochMillis,
}

/// Messages from a drone to the controller.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum DroneToController {
    /// The handshake.
    Hello(DroneHello),
    /// Sent periodically; `local_time` is the drone's clock.
    Heartbeat {
        /// The drone's clock when it sent the heartbeat.
        local_time: EpochMillis,
    },
    /// A state change; re-sent until acked.
    Event(BackendEvent),
    /// Asks to extend a backend's key lease.
    RenewKey {
        /// The backend holding the key.
        backend_id: BackendName,
        /// The fencing token the drone holds.
        fencing_token: i64,
        /// The drone's clock when it sent the request.
        local_time: EpochMillis,
    },
    /// Progress of a backend's loading step. Not acked.
    LoadProgress {
        /// The backend.
        backend_id: BackendName,
        /// How far it has got.
        progress: LoadProgress,
    },
    /// A resource-use sample of a running backend. Not acked.
    Metrics {
        /// The backend.
        backend_id: BackendName,
        /// The sample.
        metrics: BackendMetrics,
    },
}

/// The key of a backend, with the fencing token of this acquisition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcquiredKey {
    /// The key.
    pub key: KeyConfig,
    /// Strictly increases with each acquisition of any key.
    pub fencing_token: i64,
}

/// Tells a drone to start a backend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpawnAction {
    /// The backend's id.
    pub backend_id: BackendName,
    /// What to run.
    pub executable: Executable,
    /// The key and fencing token.
    pub key: AcquiredKey,
    /// The static token, if the backend uses one.
    pub static_token: Option<String>,
    /// The lease deadlines, in the drone's clock.
    pub deadlines: LeaseDeadlines,
}

/// Messages from the controller to a drone.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ControllerToDrone {
    /// The handshake succeeded.
    Welcome {
        /// Must equal [`PROTOCOL_VERSION`].
        protocol_version: u32,
        /// The controller's name.
        controller: ControllerName,
    },
    /// The handshake failed; the controller closes the socket after this.
    Reject {
        /// Why.
        message: String,
    },
    /// Start a backend (boxed: it is much larger than the other messages).
    Spawn(Box<SpawnAction>),
    /// Stop a backend.
    Terminate {
        /// The backend.
        backend_id: BackendName,
        /// Soft (SIGTERM, grace, SIGKILL) or hard (SIGKILL).
        kind: TerminationKind,
        /// Why.
        reason: TerminationReason,
    },
    /// The event with this id is durably recorded; stop re-sending it.
    Ack {
        /// The acked event's id.
        event_id: u64,
    },
    /// The answer to `RenewKey`.
    Renewed {
        /// The backend.
        backend_id: BackendName,
        /// New deadlines, or `None` if the lease is gone (the drone must terminate).
        deadlines: Option<LeaseDeadlines>,
    },
}

/// The first message a proxy sends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyHello {
    /// Must equal [`PROTOCOL_VERSION`].
    pub protocol_version: u32,
    /// The proxy's name.
    pub name: ProxyName,
    /// The cluster the proxy serves.
    pub cluster: ClusterName,
    /// The proxy's version.
    pub plane_version: String,
    /// The proxy's source hash.
    pub plane_hash: String,
}

/// Messages from a proxy to the controller.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ProxyToController {
    /// The handshake.
    Hello(ProxyHello),
    /// Asks where a token routes. The controller answers `Route` once the backend is
    /// ready, terminated, unknown, or after its bounded wait.
    RouteRequest {
        /// The connection token (first path segment).
        token: String,
    },
    /// These backends had traffic or open connections since the last keepalive.
    Keepalive {
        /// The active backends.
        backends: Vec<BackendName>,
    },
    /// A step of ACME certificate issuance for the proxy's cluster; the controller
    /// answers `IssuanceReply` with the same `request_id`.
    Issuance {
        /// Chosen by the proxy, echoed in the reply.
        request_id: u64,
        /// What to do.
        op: IssuanceOp,
    },
}

/// A step of certificate issuance, done by the controller for the asking proxy.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum IssuanceOp {
    /// Take or extend the cluster's issuance lease ([`ISSUANCE_LEASE`]). The reply's
    /// `ok` says whether this proxy holds it (false: another proxy is issuing).
    Acquire,
    /// Publish the `_acme-challenge.<cluster>` TXT values (replacing earlier ones). The
    /// reply's `ok` is false if this proxy no longer holds the lease.
    SetTxt {
        /// The values, served by the DNS servers at the same time.
        values: Vec<String>,
    },
    /// Give the lease up, with its TXT values.
    Release,
}

/// How long an issuance lease lives unless the holder renews it with another `Acquire`.
pub const ISSUANCE_LEASE: std::time::Duration = std::time::Duration::from_secs(60);

/// Path of the endpoint DNS servers read TXT values from: `GET /ctrl/c/<cluster>/acme-txt`
/// answers `{"values": [...]}`.
pub fn acme_txt_path(cluster: &str) -> String {
    format!("/ctrl/c/{cluster}/acme-txt")
}

/// The TXT values of a cluster, as the controller serves them to DNS servers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcmeTxt {
    /// The values of `_acme-challenge.<cluster>` (empty when nothing is being issued).
    pub values: Vec<String>,
}

/// Where a token routes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RouteInfo {
    /// The backend.
    pub backend_id: BackendName,
    /// Where the backend listens.
    pub address: SocketAddr,
    /// Sent to the backend as `x-verified-secret`.
    pub secret_token: Option<String>,
    /// Sent to the backend as `x-verified-username`.
    pub user: Option<String>,
    /// Sent to the backend as `x-verified-user-data` (JSON).
    pub user_data: Option<serde_json::Value>,
    /// The backend's subdomain; requests must use it in their Host.
    pub subdomain: Option<String>,
    /// How long the token has left, from when the controller answered; the proxy stops
    /// routing it then. `None`: no expiry. (Relative, so no clocks are compared.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_ms: Option<u64>,
}

/// The outcome of a route lookup.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum RouteResult {
    /// The backend is ready at this route.
    Ready(RouteInfo),
    /// No such token, or its backend is terminated or the token revoked (HTTP 410).
    Gone,
    /// The backend did not become ready within the controller's bounded wait (HTTP 504).
    NotReady,
}

/// Messages from the controller to a proxy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ControllerToProxy {
    /// The handshake succeeded.
    Welcome {
        /// Must equal [`PROTOCOL_VERSION`].
        protocol_version: u32,
        /// The controller's name.
        controller: ControllerName,
    },
    /// The handshake failed; the controller closes the socket after this.
    Reject {
        /// Why.
        message: String,
    },
    /// The answer to a `RouteRequest`.
    Route {
        /// The token asked about.
        token: String,
        /// Where it routes.
        result: RouteResult,
    },
    /// The backend is terminating or gone: drop every cached route to it.
    BackendRemoved {
        /// The backend.
        backend_id: BackendName,
    },
    /// The token was revoked: drop its cached route.
    TokenRevoked {
        /// The token.
        token: String,
    },
    /// The controller may have missed invalidations (its fan-out from other
    /// controllers was interrupted): drop every cached route. Lookups in flight stay.
    ResetRoutes,
    /// The answer to an `Issuance` request.
    IssuanceReply {
        /// The request's id.
        request_id: u64,
        /// See [`IssuanceOp`]; false also when the controller could not do it.
        ok: bool,
        /// Why the step failed, if it did (a store error); `ok` is then false.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
}

#[cfg(test)]
mod tests {
    #[test]
    fn socket_urls_of_one_or_several_controllers() {
        let urls = |s: &str| socket_urls(s, DRONE_SOCKET_PATH);
        assert_eq!(
            urls("http://127.0.0.1:8080").unwrap(),
            ["ws://127.0.0.1:8080/ctrl/drone-socket"]
        );
        assert_eq!(
            urls("https://ctrl.example.com/").unwrap(),
            ["wss://ctrl.example.com/ctrl/drone-socket"]
        );
        assert_eq!(urls("ws://h:1/base").unwrap(), ["ws://h:1/base/ctrl/drone-socket"]);
        assert_eq!(urls("WSS://h").unwrap(), ["wss://h/ctrl/drone-socket"]);
        assert_eq!(
            urls("http://a:1, https://b:2/").unwrap(),
            ["ws://a:1/ctrl/drone-socket", "wss://b:2/ctrl/drone-socket"]
        );
        for bad in ["127.0.0.1:8080", "ftp://h", "http://", "http://a:1,", "http:///x"] {
            assert!(urls(bad).is_err(), "{bad}");
        }
    }

    use super::*;

    #[test]
    fn messages_round_trip() {
        let m = DroneToController::Heartbeat { local_time: 7 };
        let s = serde_json::to_string(&m).unwrap();
        assert_eq!(s, r#"{"Heartbeat":{"local_time":7}}"#);
        assert_eq!(serde_json::from_str::<DroneToController>(&s).unwrap(), m);
        let m = ControllerToProxy::Route {
            token: "t".into(),
            result: RouteResult::Gone,
        };
        let s = serde_json::to_string(&m).unwrap();
        assert_eq!(serde_json::from_str::<ControllerToProxy>(&s).unwrap(), m);
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(serde_json::from_str::<DroneToController>("{\"Nope\":1}").is_err());
        assert!(serde_json::from_str::<ProxyToController>("[]").is_err());
    }
}
