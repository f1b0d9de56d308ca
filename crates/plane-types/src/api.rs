//! HTTP/JSON bodies of the controller API, compatible with Plane 0.5.
//!
//! See `../shared/compat/plane-http-api.md` in the project's docs for the contract.

use crate::executable::Executable;
use crate::names::{
    check_key_part, check_subdomain, BackendName, ClusterName, ControllerName, DroneName, NameError, ProxyName,
};
use crate::status::BackendStatus;
use base64::Engine;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use std::fmt;

/// The kind of an API error, as in Plane 0.5.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ApiErrorKind {
    /// The key could not be acquired.
    FailedToAcquireKey,
    /// The key is not held and the request has no spawn config.
    KeyUnheldNoSpawnConfig,
    /// The key is held by a backend whose drone is unhealthy.
    KeyHeldUnhealthy,
    /// The key is held with another tag.
    KeyHeld,
    /// No drone can take the backend.
    NoDroneAvailable,
    /// The key could not be removed.
    FailedToRemoveKey,
    /// The store failed.
    DatabaseError,
    /// Neither the request nor the controller names a cluster.
    NoClusterProvided,
    /// The named thing does not exist.
    NotFound,
    /// A cluster name is invalid.
    InvalidClusterName,
    /// The request is malformed or invalid (bad JSON, bad name, bad executable).
    /// Reported as `Other` with a 400 status, as Plane 0.5 clients expect no new kinds.
    Other,
}

/// The body of every failed API request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// A random id, also logged by the controller, to match a report to its log line.
    pub id: String,
    /// What kind of failure this is.
    pub kind: ApiErrorKind,
    /// A human-readable explanation.
    pub message: String,
}

impl ApiError {
    /// A new error with a fresh random id.
    pub fn new(kind: ApiErrorKind, message: impl Into<String>) -> ApiError {
        ApiError {
            id: random_id(10),
            kind,
            message: message.into(),
        }
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {} (error id {})", self.kind, self.message, self.id)
    }
}

impl std::error::Error for ApiError {}

fn random_id(len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut bytes = vec![0u8; len];
    rand::thread_rng().fill_bytes(&mut bytes);
    bytes
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

/// A new connection token: 32 random bytes, base64url without padding (43 characters).
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A new static token: `s.` followed by a [`new_token`].
pub fn new_static_token() -> String {
    format!("{STATIC_TOKEN_PREFIX}{}", new_token())
}

/// Static tokens start with this and are not stripped from proxied paths.
pub const STATIC_TOKEN_PREFIX: &str = "s.";

/// The key a backend holds.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KeyConfig {
    /// The key name, unique within its namespace.
    pub name: String,
    /// The namespace; `""` by default.
    #[serde(default)]
    pub namespace: String,
    /// The tag: connecting to a live key with another tag fails with `KeyHeld`.
    #[serde(default)]
    pub tag: String,
}

impl KeyConfig {
    /// Checks every part of the key.
    pub fn validate(&self) -> Result<(), NameError> {
        check_key_part("key name", &self.name, false)?;
        check_key_part("key namespace", &self.namespace, true)?;
        check_key_part("key tag", &self.tag, true)
    }
}

/// How to spawn a backend when the key is not held.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SpawnConfig {
    /// A backend id to use instead of a random one.
    #[serde(default)]
    pub id: Option<BackendName>,
    /// The cluster; the controller's default cluster if absent.
    #[serde(default)]
    pub cluster: Option<ClusterName>,
    /// The pool of drones within the cluster; `""` by default.
    #[serde(default)]
    pub pool: Option<String>,
    /// What to run. Parsed into an [`Executable`] by [`SpawnConfig::executable`].
    pub executable: serde_json::Value,
    /// Stop the backend this many seconds after it started.
    #[serde(default)]
    pub lifetime_limit_seconds: Option<u64>,
    /// Stop the backend after this many seconds without a connection.
    #[serde(default)]
    pub max_idle_seconds: Option<u64>,
    /// Issue one static token instead of per-connection tokens.
    #[serde(default)]
    pub use_static_token: bool,
    /// A subdomain the backend is served under.
    #[serde(default)]
    pub subdomain: Option<String>,
}

impl SpawnConfig {
    /// Validates the config and parses its executable.
    pub fn executable(&self) -> Result<Executable, String> {
        if let Some(pool) = &self.pool {
            check_key_part("pool", pool, true).map_err(|e| e.to_string())?;
        }
        if let Some(sub) = &self.subdomain {
            check_subdomain(sub).map_err(|e| e.to_string())?;
        }
        Executable::from_json(&self.executable)
    }

    /// The pool, `""` if absent.
    pub fn pool(&self) -> &str {
        self.pool.as_deref().unwrap_or("")
    }
}

/// The body of `POST /ctrl/connect`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ConnectRequest {
    /// The key; absent means a random key (always a new backend).
    #[serde(default)]
    pub key: Option<KeyConfig>,
    /// How to spawn, if the key is not held.
    #[serde(default)]
    pub spawn_config: Option<SpawnConfig>,
    /// The user the token is issued to; reaches the backend as `x-verified-username`.
    #[serde(default)]
    pub user: Option<String>,
    /// Any JSON; reaches the backend as `x-verified-user-data`.
    #[serde(default)]
    pub auth: Option<serde_json::Value>,
}

/// The answer to `POST /ctrl/connect`. Every key is present, `null` when empty.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectResponse {
    /// The backend's id.
    pub backend_id: BackendName,
    /// Whether this request started the backend.
    pub spawned: bool,
    /// The backend's status when the answer was made.
    pub status: BackendStatus,
    /// The connection token (the static token for static-token backends).
    pub token: String,
    /// `{proto}://[{subdomain}.]{cluster}/{token}/`.
    pub url: String,
    /// The backend's subdomain.
    pub subdomain: Option<String>,
    /// A secret passed to the backend in `x-verified-secret`; null with a static token.
    pub secret_token: Option<String>,
    /// `{controller url}/pub/b/{backend_id}/status`.
    pub status_url: String,
    /// The drone that runs the backend.
    pub drone: Option<DroneName>,
}

/// Builds a connection URL.
pub fn connect_url(cluster: &ClusterName, subdomain: Option<&str>, token: &str) -> String {
    let proto = if cluster.is_https() { "https" } else { "http" };
    match subdomain {
        Some(s) => format!("{proto}://{s}.{cluster}/{token}/"),
        None => format!("{proto}://{cluster}/{token}/"),
    }
}

/// The body of `POST /ctrl/b/revoke`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokeRequest {
    /// The backend whose tokens are revoked.
    pub backend_id: BackendName,
    /// The user whose tokens are revoked.
    pub user: String,
}

/// The answer to `POST /ctrl/c/:cluster/d/:drone/drain`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainResponse {
    /// False if the drone was already draining.
    pub updated: bool,
}

/// The answer to `GET /ctrl/status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusResponse {
    /// Always `"ok"`.
    pub status: String,
    /// The controller's version.
    pub version: String,
    /// The controller's source hash.
    pub hash: String,
}

/// The name of a node in the cluster state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeName {
    /// A drone.
    Drone(DroneName),
    /// A proxy.
    Proxy(ProxyName),
}

/// A node as shown in the cluster state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeState {
    /// The node's name.
    pub name: NodeName,
    /// The node's version.
    pub plane_version: String,
    /// The node's source hash.
    pub plane_hash: String,
    /// The controller the node is connected to.
    pub controller: Option<ControllerName>,
    /// Seconds since that controller last heartbeated in the store.
    pub controller_heartbeat_age: Option<f64>,
}

/// A drone as shown in the cluster state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DroneState {
    /// Whether the drone is connected and heartbeating.
    pub ready: bool,
    /// Whether the drone is draining (takes no new backends).
    pub draining: bool,
    /// Seconds since the drone's last heartbeat.
    pub last_heartbeat_age: Option<f64>,
    /// How many non-terminated backends the drone runs.
    pub backend_count: u64,
    /// The runtimes the drone offers (an extension of ours).
    #[serde(default)]
    pub runtimes: Vec<crate::executable::RuntimeKind>,
    /// The node record.
    pub node: NodeState,
}

/// The answer to `GET /ctrl/b/:backend/metrics` (an extension of ours).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendMetricsResponse {
    /// The backend.
    pub backend_id: BackendName,
    /// The drone it runs on.
    pub drone: DroneName,
    /// Its current status.
    pub status: BackendStatus,
    /// The latest sample, if the drone has sent one since this controller started
    /// (the process runtime samples `/proc`, the Docker runtime Docker's stats).
    pub metrics: Option<crate::protocol::BackendMetrics>,
    /// The latest load progress, while it is relevant (until the backend runs).
    pub progress: Option<crate::protocol::LoadProgress>,
}

/// The answer to `GET /ctrl/c/:cluster/state`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClusterState {
    /// The drones of the cluster.
    pub drones: Vec<DroneState>,
    /// The proxies of the cluster.
    pub proxies: Vec<NodeState>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tokens() {
        let t = new_token();
        assert_eq!(t.len(), 43);
        assert!(t.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
        let s = new_static_token();
        assert!(s.starts_with("s.") && s.len() == 45);
        assert_ne!(new_token(), new_token());
    }

    #[test]
    fn urls() {
        let c: ClusterName = "localhost:9090".parse().unwrap();
        assert_eq!(connect_url(&c, None, "tok"), "http://localhost:9090/tok/");
        let c: ClusterName = "plane.example.com".parse().unwrap();
        assert_eq!(
            connect_url(&c, Some("app"), "tok"),
            "https://app.plane.example.com/tok/"
        );
    }

    #[test]
    fn connect_request_compat() {
        let r: ConnectRequest = serde_json::from_value(json!({
            "key": {"name": "room-1"},
            "spawn_config": {"cluster": "c1.example.com", "executable": {"image": "x"}, "extra": 1},
            "user": "u", "auth": {"a": 1}, "unknown": true
        }))
        .unwrap();
        let k = r.key.unwrap();
        assert_eq!((k.namespace.as_str(), k.tag.as_str()), ("", ""));
        assert!(r.spawn_config.unwrap().executable().is_ok());
        // Wrong types are errors, not ignored.
        assert!(serde_json::from_value::<ConnectRequest>(json!({"key": {"name": 5}})).is_err());
        assert!(serde_json::from_value::<ConnectRequest>(
            json!({"spawn_config": {"executable": {}, "cluster": "Bad Name"}})
        )
        .is_err());
        assert!(serde_json::from_value::<ConnectRequest>(
            json!({"spawn_config": {"executable": {}, "max_idle_seconds": -1}})
        )
        .is_err());
    }

    #[test]
    fn error_body() {
        let e = ApiError::new(ApiErrorKind::KeyHeld, "held");
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["kind"], "KeyHeld");
        assert_eq!(v["message"], "held");
        assert!(!v["id"].as_str().unwrap().is_empty());
    }

    #[test]
    fn node_name_shape() {
        let n = NodeName::Drone("dr-1".parse().unwrap());
        assert_eq!(serde_json::to_value(&n).unwrap(), json!({"Drone": "dr-1"}));
    }
}
