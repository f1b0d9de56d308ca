//! The controller's SQL store.
//!
//! Layout:
//! * this file: the [`Store`] trait and the plain records it speaks;
//! * [`sqlite`]: the embedded SQLite implementation (with migrations);
//! * [`postgres`]: the PostgreSQL implementation, for controllers sharing one database
//!   (with its own migrations, `migrations/postgres`);
//! * [`conformance`]: a test suite written against the trait, run for every implementation.
//!
//! **Architecture invariant:** only the controller uses this crate (DESIGN §5.4), and
//! controller logic speaks only the [`Store`] trait, so the PostgreSQL implementation
//! needed no change outside this crate. Every method is one atomic step; times in rows
//! are in the store's clock.
//!
//! **Architecture invariant:** the `backend_key` table has one row per (namespace, key
//! name), so at most one backend holds a key at a time (DESIGN §5.1); the row is freed
//! only when its backend is terminated or its lease has expired.

pub mod conformance;
pub mod fanout;
pub mod postgres;
mod rows;
pub use rows::LOST_MESSAGE;
pub mod sqlite;

use async_trait::async_trait;
use plane_types::api::KeyConfig;
use plane_types::executable::{Executable, RuntimeKind};
use plane_types::names::{BackendName, ClusterName, ControllerName, DroneName, ProxyName};
use plane_types::status::{BackendStatus, StatusEntry, TerminationKind, TerminationReason};
use plane_types::EpochMillis;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// A store failure. The controller reports it as `DatabaseError`.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error("database error: {0}")]
    Database(String),
    /// A row could not be decoded (a bug or a corrupted row).
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::Database(e.to_string())
    }
}

/// Shorthand for store results.
pub type StoreResult<T> = Result<T, StoreError>;

/// A shared store handle.
pub type SharedStore = Arc<dyn Store>;

/// A drone announcing itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DroneRegistration {
    /// The drone's name.
    pub name: DroneName,
    /// Its cluster.
    pub cluster: ClusterName,
    /// Its pool.
    pub pool: String,
    /// The runtimes it offers.
    pub runtimes: Vec<RuntimeKind>,
    /// Its version.
    pub plane_version: String,
    /// Its source hash.
    pub plane_hash: String,
    /// The controller it is connected to.
    pub controller: ControllerName,
}

/// A drone as recorded.
#[derive(Clone, Debug, PartialEq)]
pub struct DroneRecord {
    /// The drone's name.
    pub name: DroneName,
    /// Its cluster.
    pub cluster: ClusterName,
    /// Its pool.
    pub pool: String,
    /// The runtimes it offers.
    pub runtimes: Vec<RuntimeKind>,
    /// Its version.
    pub plane_version: String,
    /// Its source hash.
    pub plane_hash: String,
    /// The controller it is (or was last) connected to.
    pub controller: Option<ControllerName>,
    /// Time since that controller's last heartbeat.
    pub controller_heartbeat_age: Option<Duration>,
    /// Whether it is connected.
    pub ready: bool,
    /// Whether it is draining.
    pub draining: bool,
    /// Time since its last heartbeat.
    pub last_heartbeat_age: Duration,
    /// Its backends that are not terminated.
    pub backend_count: u64,
}

/// A proxy announcing itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyRegistration {
    /// The proxy's name.
    pub name: ProxyName,
    /// Its cluster.
    pub cluster: ClusterName,
    /// Its version.
    pub plane_version: String,
    /// Its source hash.
    pub plane_hash: String,
    /// The controller it is connected to.
    pub controller: ControllerName,
}

/// A connected proxy as recorded.
#[derive(Clone, Debug, PartialEq)]
pub struct ProxyRecord {
    /// The proxy's registration.
    pub registration: ProxyRegistration,
    /// Time since the controller's last heartbeat.
    pub controller_heartbeat_age: Option<Duration>,
}

/// A backend to create.
#[derive(Clone, Debug, PartialEq)]
pub struct NewBackend {
    /// Its id.
    pub id: BackendName,
    /// Its cluster.
    pub cluster: ClusterName,
    /// Its pool.
    pub pool: String,
    /// The drone chosen to run it.
    pub drone: DroneName,
    /// What it runs.
    pub executable: Executable,
    /// The key it acquires.
    pub key: KeyConfig,
    /// Stop it this long after creation.
    pub lifetime_limit_seconds: Option<u64>,
    /// Stop it after this long without traffic.
    pub max_idle_seconds: Option<u64>,
    /// Its static token, if it uses one.
    pub static_token: Option<String>,
    /// Its subdomain.
    pub subdomain: Option<String>,
    /// How long the key lease lasts before renewal.
    pub lease_duration: Duration,
}

/// The outcome of [`Store::create_backend`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CreateOutcome {
    /// Created, with the key's new fencing token.
    Created {
        /// Strictly greater than every fencing token issued before.
        fencing_token: i64,
    },
    /// Another backend holds the key (the caller re-reads it).
    KeyHeld,
    /// A backend with this id exists already.
    IdTaken,
}

/// The live holder of a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyHolder {
    /// The holding backend.
    pub backend_id: BackendName,
    /// The tag it was acquired with.
    pub tag: String,
    /// The holder's status.
    pub status: BackendStatus,
    /// The holder's drone.
    pub drone: DroneName,
    /// The holder's cluster.
    pub cluster: ClusterName,
    /// The holder's subdomain.
    pub subdomain: Option<String>,
    /// The holder's static token.
    pub static_token: Option<String>,
}

/// A backend as recorded.
#[derive(Clone, Debug, PartialEq)]
pub struct BackendRecord {
    /// Its id.
    pub id: BackendName,
    /// Its cluster.
    pub cluster: ClusterName,
    /// Its pool.
    pub pool: String,
    /// Its drone.
    pub drone: DroneName,
    /// What it runs.
    pub executable: Executable,
    /// Its key.
    pub key: KeyConfig,
    /// The fencing token of its key acquisition.
    pub fencing_token: i64,
    /// Its current status.
    pub status: BackendStatus,
    /// Where it listens, once known.
    pub address: Option<SocketAddr>,
    /// Its exit code, once terminated.
    pub exit_code: Option<i32>,
    /// Why it terminated.
    pub termination_reason: Option<TerminationReason>,
    /// How it terminated.
    pub termination_kind: Option<TerminationKind>,
    /// A termination asked for but not yet reported done by the drone.
    pub pending_termination: Option<(TerminationKind, TerminationReason)>,
    /// A detail from the drone (a spawn error, say).
    pub message: Option<String>,
    /// Its static token.
    pub static_token: Option<String>,
    /// Its subdomain.
    pub subdomain: Option<String>,
    /// Its lifetime limit.
    pub lifetime_limit_seconds: Option<u64>,
    /// Its idle limit.
    pub max_idle_seconds: Option<u64>,
    /// When it was created.
    pub created_at: EpochMillis,
}

/// A token to issue.
#[derive(Clone, Debug, PartialEq)]
pub struct NewToken {
    /// The token.
    pub token: String,
    /// The backend it routes to.
    pub backend_id: BackendName,
    /// The user it was issued to.
    pub user: Option<String>,
    /// The auth JSON bound to it.
    pub auth: Option<serde_json::Value>,
    /// The secret passed to the backend.
    pub secret_token: Option<String>,
    /// How long the token stays valid, from its insertion (store clock); `None`: for
    /// the backend's life.
    pub ttl: Option<Duration>,
}

/// A state change reported by a drone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendUpdate {
    /// The backend.
    pub backend_id: BackendName,
    /// Its new status.
    pub status: BackendStatus,
    /// Where it listens.
    pub address: Option<SocketAddr>,
    /// Its exit code.
    pub exit_code: Option<i32>,
    /// Why it is terminating.
    pub termination_reason: Option<TerminationReason>,
    /// How it is terminating.
    pub termination_kind: Option<TerminationKind>,
    /// A detail.
    pub message: Option<String>,
}

/// The outcome of [`Store::apply_update`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// The status moved forward; this entry was appended to the history.
    Advanced(StatusEntry),
    /// The status was not after the current one (a duplicate or late event).
    Stale,
    /// No such backend.
    UnknownBackend,
    /// The backend belongs to another drone.
    WrongDrone,
}

/// Where a token routes.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenRoute {
    /// The backend.
    pub backend_id: BackendName,
    /// Its status.
    pub status: BackendStatus,
    /// Where it listens.
    pub address: Option<SocketAddr>,
    /// The token's user.
    pub user: Option<String>,
    /// The token's auth JSON.
    pub user_data: Option<serde_json::Value>,
    /// The token's secret.
    pub secret_token: Option<String>,
    /// The backend's subdomain.
    pub subdomain: Option<String>,
    /// How long the token has left (store clock, at the lookup); `None`: no expiry.
    pub expires_in: Option<Duration>,
}

/// A termination requested by the store's sweep.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Termination {
    /// The backend.
    pub backend_id: BackendName,
    /// Its drone.
    pub drone: DroneName,
    /// Soft or hard.
    pub kind: TerminationKind,
    /// Why.
    pub reason: TerminationReason,
}

/// What [`Store::cleanup`] may delete in one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CleanupPolicy {
    /// A terminated backend is kept this long after its termination (the time of its
    /// `terminated` status entry, in the store's clock), so that its status and history
    /// can still be read; after that it may be deleted.
    pub terminated_retention: Duration,
    /// The most backends, and separately the most tokens, one call deletes.
    pub batch: u32,
}

/// What one [`Store::cleanup`] call deleted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CleanupReport {
    /// Backends deleted.
    pub backends: u64,
    /// Tokens deleted.
    pub tokens: u64,
    /// Status history entries deleted (those of the deleted backends).
    pub status_entries: u64,
}

impl CleanupReport {
    /// Whether the call deleted nothing.
    pub fn is_empty(&self) -> bool {
        *self == CleanupReport::default()
    }
}

impl std::ops::AddAssign for CleanupReport {
    fn add_assign(&mut self, other: CleanupReport) {
        self.backends += other.backends;
        self.tokens += other.tokens;
        self.status_entries += other.status_entries;
    }
}

/// The store interface of the controller. Each method is atomic.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// A round trip to the store.
    async fn ping(&self) -> StoreResult<()>;

    /// Fan-out to the other controllers sharing this store; `None` if no other
    /// controller can share it (SQLite).
    fn fanout(&self) -> Option<fanout::SharedFanout> {
        None
    }

    /// Records a controller heartbeat.
    async fn controller_heartbeat(&self, name: &ControllerName) -> StoreResult<()>;

    /// Inserts or updates a drone, marking it connected with a fresh heartbeat.
    async fn register_drone(&self, reg: &DroneRegistration) -> StoreResult<()>;

    /// Records a drone heartbeat.
    async fn drone_heartbeat(&self, name: &DroneName) -> StoreResult<()>;

    /// Marks a drone disconnected, if `controller` is still the one it is connected to
    /// (a drone that moved to another controller stays connected there).
    async fn drone_disconnected(&self, name: &DroneName, controller: &ControllerName) -> StoreResult<()>;

    /// Starts draining a drone. `None` if unknown; `Some(false)` if already draining.
    async fn drain_drone(&self, cluster: &ClusterName, name: &DroneName) -> StoreResult<Option<bool>>;

    /// Stops draining a drone, so that it may take new backends again. `None` if
    /// unknown in this cluster; `Some(false)` if it was not draining; `Some(true)` if it
    /// was. One statement decides, so of concurrent calls one at most reports a change.
    async fn undrain_drone(&self, cluster: &ClusterName, name: &DroneName) -> StoreResult<Option<bool>>;

    /// The drones of a cluster.
    async fn drones(&self, cluster: &ClusterName) -> StoreResult<Vec<DroneRecord>>;

    /// Drones that may take a new backend: connected, not draining, heartbeat younger
    /// than `max_heartbeat_age`, in this cluster and pool, offering this runtime.
    async fn schedulable_drones(
        &self,
        cluster: &ClusterName,
        pool: &str,
        runtime: RuntimeKind,
        max_heartbeat_age: Duration,
    ) -> StoreResult<Vec<DroneRecord>>;

    /// Inserts or updates a proxy, marking it connected.
    async fn register_proxy(&self, reg: &ProxyRegistration) -> StoreResult<()>;

    /// Marks a proxy disconnected, if `controller` is still the one it is connected to.
    async fn proxy_disconnected(&self, name: &ProxyName, controller: &ControllerName) -> StoreResult<()>;

    /// The connected proxies of a cluster.
    async fn proxies(&self, cluster: &ClusterName) -> StoreResult<Vec<ProxyRecord>>;

    /// The live holder of a key: a backend that is not terminated and whose lease has
    /// not expired.
    async fn key_holder(&self, key: &KeyConfig) -> StoreResult<Option<KeyHolder>>;

    /// Atomically frees the key if its holder is terminated or its lease expired,
    /// acquires it with a new fencing token, and creates the backend in `scheduled`.
    async fn create_backend(&self, backend: &NewBackend) -> StoreResult<CreateOutcome>;

    /// Issues a token. Inserting a token that exists already (a static token, issued
    /// again by a concurrent connect) leaves the existing row as it is.
    async fn insert_token(&self, token: &NewToken) -> StoreResult<()>;

    /// A backend.
    async fn backend(&self, id: &BackendName) -> StoreResult<Option<BackendRecord>>;

    /// A backend's status history, oldest first.
    async fn status_history(&self, id: &BackendName) -> StoreResult<Vec<StatusEntry>>;

    /// Applies a drone's report. Only a later status is applied (statuses move forward);
    /// `terminated` releases the key and clears any pending termination.
    async fn apply_update(&self, drone: &DroneName, update: &BackendUpdate) -> StoreResult<ApplyOutcome>;

    /// Applies several reports of one drone, in order, with the outcome of each as
    /// [`Store::apply_update`] gives it. A store may commit them together (SQLite does:
    /// one commit, one fsync, for reports that arrived together); if it fails, none of
    /// the outcomes is known, and the drone re-sends them all.
    async fn apply_updates(&self, drone: &DroneName, updates: &[BackendUpdate]) -> StoreResult<Vec<ApplyOutcome>> {
        let mut outcomes = Vec::with_capacity(updates.len());
        for update in updates {
            outcomes.push(self.apply_update(drone, update).await?);
        }
        Ok(outcomes)
    }

    /// Extends the lease of the key held by `backend_id` with `fencing_token`. False if
    /// the backend no longer holds it (terminated, expired, or another acquisition).
    async fn renew_key(&self, backend_id: &BackendName, fencing_token: i64, lease: Duration) -> StoreResult<bool>;

    /// Records a requested termination; a hard request upgrades a soft one. Returns the
    /// backend's drone and status, or `None` if the backend is unknown.
    async fn request_termination(
        &self,
        id: &BackendName,
        kind: TerminationKind,
        reason: TerminationReason,
    ) -> StoreResult<Option<(DroneName, BackendStatus)>>;

    /// Backends of a drone still in `scheduled` (to re-send their spawn).
    async fn scheduled_backends(&self, drone: &DroneName) -> StoreResult<Vec<BackendRecord>>;

    /// Requested terminations of a drone's backends not yet terminated (to re-send).
    async fn pending_terminations(&self, drone: &DroneName) -> StoreResult<Vec<Termination>>;

    /// Where a token routes; `None` if unknown, revoked or expired.
    async fn route(&self, token: &str) -> StoreResult<Option<TokenRoute>>;

    /// Revokes a user's tokens for a backend; returns all of them, including those
    /// revoked before, so a retried revoke can invalidate caches again.
    async fn revoke(&self, backend_id: &BackendName, user: &str) -> StoreResult<Vec<String>>;

    /// Records traffic for these backends now.
    async fn keepalive(&self, backends: &[BackendName]) -> StoreResult<()>;

    /// Finds backends past their idle or lifetime limit with no termination requested,
    /// records a soft `swept` termination for each and returns them.
    async fn sweep(&self) -> StoreResult<Vec<Termination>>;

    /// Marks `terminated` with reason `lost` every backend whose key lease expired
    /// without it terminating (its drone is gone); returns them with their new entry.
    async fn mark_lost(&self) -> StoreResult<Vec<(BackendName, StatusEntry)>>;

    /// Deletes what terminated backends leave behind, in bounded batches; call it again
    /// until it reports nothing. One call, one transaction:
    /// * deletes at most `policy.batch` tokens of terminated backends (revoked or not,
    ///   of any age: such a token no longer routes), those of the longest terminated
    ///   backends first;
    /// * then deletes at most `policy.batch` backends that are terminated, whose
    ///   termination is older than `policy.terminated_retention`, and that have no token
    ///   left, longest terminated first, with their status history and any key row.
    ///
    /// Nothing of a backend that is not terminated is deleted, not even its revoked
    /// tokens (a revoked static token must stay revoked when a connect issues it again).
    /// Concurrent calls (several controllers) skip each other's rows instead of waiting,
    /// and delete every row once.
    async fn cleanup(&self, policy: &CleanupPolicy) -> StoreResult<CleanupReport>;

    /// Takes or extends `cluster`'s ACME issuance lease for `holder` until `ttl` from
    /// now. Taken only if no one holds it, its holder is `holder`, or it expired (then
    /// the previous holder's TXT values are dropped). Returns whether `holder` holds it.
    async fn acquire_cert_lease(&self, cluster: &ClusterName, holder: &ProxyName, ttl: Duration) -> StoreResult<bool>;

    /// Replaces the `_acme-challenge` TXT values of `cluster`, if `holder` holds its
    /// live lease; returns whether it did.
    async fn set_acme_txt(&self, cluster: &ClusterName, holder: &ProxyName, values: &[String]) -> StoreResult<bool>;

    /// Gives up `holder`'s lease of `cluster` (with its TXT values); a no-op otherwise.
    async fn release_cert_lease(&self, cluster: &ClusterName, holder: &ProxyName) -> StoreResult<()>;

    /// The TXT values of `cluster`'s live lease (empty if none).
    async fn acme_txt(&self, cluster: &ClusterName) -> StoreResult<Vec<String>>;
}
