//! The embedded SQLite implementation of [`Store`].
//!
//! One connection, WAL journal: SQLite serialises writers anyway, and a single
//! connection makes every method's transaction trivially atomic with no busy retries.
//! The store's clock is this process's wall clock.

use crate::rows::{
    duration_ms, json, ms_duration, parse, parse_opt, status_entry, termination_of_update, to_json,
    upgrades_termination, KnownTermination, LOST_MESSAGE,
};
use crate::{
    ApplyOutcome, BackendRecord, BackendUpdate, CleanupPolicy, CleanupReport, CreateOutcome, DroneRecord,
    DroneRegistration, KeyHolder, NewBackend, NewToken, ProxyRecord, ProxyRegistration, Store, StoreError, StoreResult,
    Termination, TokenRoute,
};
use async_trait::async_trait;
use plane_types::api::KeyConfig;
use plane_types::executable::{Executable, RuntimeKind};
use plane_types::names::{BackendName, ClusterName, ControllerName, DroneName, ProxyName};
use plane_types::status::{BackendStatus, StatusEntry, TerminationKind, TerminationReason};
use plane_types::EpochMillis;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous};
use sqlx::{Row, SqlitePool};
use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// The SQLite store.
#[derive(Clone, Debug)]
pub struct SqliteStore {
    pool: SqlitePool,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn age(then: i64) -> Duration {
    Duration::from_millis(now_ms().saturating_sub(then).max(0) as u64)
}

impl SqliteStore {
    /// Sets a drone's `draining` flag. One statement decides, so of two concurrent
    /// calls only one reports a change.
    async fn set_draining(&self, cluster: &ClusterName, name: &DroneName, draining: bool) -> StoreResult<Option<bool>> {
        let updated = sqlx::query("UPDATE drone SET draining = ?3 WHERE name = ?1 AND cluster = ?2 AND draining <> ?3")
            .bind(name.as_str())
            .bind(cluster.as_str())
            .bind(draining)
            .execute(&self.pool)
            .await?
            .rows_affected();
        if updated > 0 {
            return Ok(Some(true));
        }
        let exists = sqlx::query("SELECT 1 FROM drone WHERE name = ?1 AND cluster = ?2")
            .bind(name.as_str())
            .bind(cluster.as_str())
            .fetch_optional(&self.pool)
            .await?;
        Ok(exists.map(|_| false))
    }

    /// Opens (creating if needed) the database at `path` and runs migrations.
    pub async fn open(path: &Path) -> StoreResult<SqliteStore> {
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| StoreError::Database(format!("cannot create {}: {e}", dir.display())))?;
            }
        }
        let opts = SqliteConnectOptions::new().filename(path).create_if_missing(true);
        Self::with_options(opts).await
    }

    /// Opens a database from a `sqlite:` URL (`sqlite::memory:` for a private in-memory store).
    pub async fn open_url(url: &str) -> StoreResult<SqliteStore> {
        let opts = SqliteConnectOptions::from_str(url)?.create_if_missing(true);
        Self::with_options(opts).await
    }

    /// A fresh in-memory store.
    pub async fn in_memory() -> StoreResult<SqliteStore> {
        Self::open_url("sqlite::memory:").await
    }

    async fn with_options(opts: SqliteConnectOptions) -> StoreResult<SqliteStore> {
        let opts = opts
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a commit the controller has acked to a drone (or a key row, or a
            // fencing token) must survive an OS crash, not only a process crash.
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(opts)
            .await?;
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|e| StoreError::Database(format!("migration failed: {e}")))?;
        Ok(SqliteStore { pool })
    }

    fn drone_from_row(row: &SqliteRow) -> StoreResult<DroneRecord> {
        let runtimes: Vec<RuntimeKind> = json("drone runtimes", &row.try_get::<String, _>("runtimes")?)?;
        let controller_hb: Option<i64> = row.try_get("controller_heartbeat")?;
        Ok(DroneRecord {
            name: parse("drone name", &row.try_get::<String, _>("name")?)?,
            cluster: parse("cluster", &row.try_get::<String, _>("cluster")?)?,
            pool: row.try_get("pool")?,
            runtimes,
            plane_version: row.try_get("plane_version")?,
            plane_hash: row.try_get("plane_hash")?,
            controller: parse_opt("controller name", row.try_get("controller")?)?,
            controller_heartbeat_age: controller_hb.map(age),
            ready: row.try_get("ready")?,
            draining: row.try_get("draining")?,
            last_heartbeat_age: age(row.try_get("last_heartbeat")?),
            backend_count: row.try_get::<i64, _>("backend_count")? as u64,
        })
    }

    fn backend_from_row(row: &SqliteRow) -> StoreResult<BackendRecord> {
        let executable: Executable = json("executable", &row.try_get::<String, _>("executable")?)?;
        let pending_kind: Option<String> = row.try_get("pending_kind")?;
        let pending_reason: Option<String> = row.try_get("pending_reason")?;
        let pending_termination = match (pending_kind, pending_reason) {
            (Some(k), Some(r)) => Some((parse("termination kind", &k)?, parse("termination reason", &r)?)),
            _ => None,
        };
        Ok(BackendRecord {
            id: parse("backend id", &row.try_get::<String, _>("id")?)?,
            cluster: parse("cluster", &row.try_get::<String, _>("cluster")?)?,
            pool: row.try_get("pool")?,
            drone: parse("drone name", &row.try_get::<String, _>("drone")?)?,
            executable,
            key: KeyConfig {
                name: row.try_get("key_name")?,
                namespace: row.try_get("key_namespace")?,
                tag: row.try_get("key_tag")?,
            },
            fencing_token: row.try_get("fencing_token")?,
            status: parse("status", &row.try_get::<String, _>("status")?)?,
            address: parse_opt("address", row.try_get("address")?)?,
            exit_code: row.try_get::<Option<i64>, _>("exit_code")?.map(|c| c as i32),
            termination_reason: parse_opt("termination reason", row.try_get("termination_reason")?)?,
            termination_kind: parse_opt("termination kind", row.try_get("termination_kind")?)?,
            pending_termination,
            message: row.try_get("message")?,
            static_token: row.try_get("static_token")?,
            subdomain: row.try_get("subdomain")?,
            lifetime_limit_seconds: row
                .try_get::<Option<i64>, _>("lifetime_limit_seconds")?
                .map(|v| v as u64),
            max_idle_seconds: row.try_get::<Option<i64>, _>("max_idle_seconds")?.map(|v| v as u64),
            created_at: row.try_get::<i64, _>("created_at")? as EpochMillis,
        })
    }
}

const DRONE_SELECT: &str = "SELECT d.*, c.last_heartbeat AS controller_heartbeat, \
     (SELECT COUNT(*) FROM backend b WHERE b.drone = d.name AND b.status_order < 70) AS backend_count \
     FROM drone d LEFT JOIN controller c ON c.name = d.controller";

#[async_trait]
impl Store for SqliteStore {
    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn controller_heartbeat(&self, name: &ControllerName) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO controller (name, last_heartbeat) VALUES (?1, ?2) \
             ON CONFLICT (name) DO UPDATE SET last_heartbeat = excluded.last_heartbeat",
        )
        .bind(name.as_str())
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn register_drone(&self, reg: &DroneRegistration) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO drone (name, cluster, pool, runtimes, plane_version, plane_hash, controller, ready, last_heartbeat) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 1, ?8) \
             ON CONFLICT (name) DO UPDATE SET cluster = excluded.cluster, pool = excluded.pool, \
               runtimes = excluded.runtimes, plane_version = excluded.plane_version, \
               plane_hash = excluded.plane_hash, controller = excluded.controller, ready = 1, \
               last_heartbeat = excluded.last_heartbeat",
        )
        .bind(reg.name.as_str())
        .bind(reg.cluster.as_str())
        .bind(&reg.pool)
        .bind(to_json(&reg.runtimes)?)
        .bind(&reg.plane_version)
        .bind(&reg.plane_hash)
        .bind(reg.controller.as_str())
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn drone_heartbeat(&self, name: &DroneName) -> StoreResult<()> {
        // A heartbeat comes only over a live socket, so it also marks the drone ready:
        // this repairs a late disconnect record from a replaced connection.
        sqlx::query("UPDATE drone SET last_heartbeat = ?1, ready = 1 WHERE name = ?2")
            .bind(now_ms())
            .bind(name.as_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn drone_disconnected(&self, name: &DroneName, controller: &ControllerName) -> StoreResult<()> {
        sqlx::query("UPDATE drone SET ready = 0 WHERE name = ?1 AND controller = ?2")
            .bind(name.as_str())
            .bind(controller.as_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn drain_drone(&self, cluster: &ClusterName, name: &DroneName) -> StoreResult<Option<bool>> {
        self.set_draining(cluster, name, true).await
    }

    async fn undrain_drone(&self, cluster: &ClusterName, name: &DroneName) -> StoreResult<Option<bool>> {
        self.set_draining(cluster, name, false).await
    }

    async fn drones(&self, cluster: &ClusterName) -> StoreResult<Vec<DroneRecord>> {
        let rows = sqlx::query(&format!("{DRONE_SELECT} WHERE d.cluster = ?1 ORDER BY d.name"))
            .bind(cluster.as_str())
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(Self::drone_from_row).collect()
    }

    async fn schedulable_drones(
        &self,
        cluster: &ClusterName,
        pool: &str,
        runtime: RuntimeKind,
        max_heartbeat_age: Duration,
    ) -> StoreResult<Vec<DroneRecord>> {
        let rows = sqlx::query(&format!(
            "{DRONE_SELECT} WHERE d.cluster = ?1 AND d.pool = ?2 AND d.ready = 1 AND d.draining = 0 \
             AND d.last_heartbeat >= ?3"
        ))
        .bind(cluster.as_str())
        .bind(pool)
        .bind(now_ms() - max_heartbeat_age.as_millis() as i64)
        .fetch_all(&self.pool)
        .await?;
        let drones: Vec<DroneRecord> = rows.iter().map(Self::drone_from_row).collect::<StoreResult<_>>()?;
        Ok(drones.into_iter().filter(|d| d.runtimes.contains(&runtime)).collect())
    }

    async fn register_proxy(&self, reg: &ProxyRegistration) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO proxy (name, cluster, plane_version, plane_hash, controller, connected, last_seen) \
             VALUES (?1, ?2, ?3, ?4, ?5, 1, ?6) \
             ON CONFLICT (name) DO UPDATE SET cluster = excluded.cluster, plane_version = excluded.plane_version, \
               plane_hash = excluded.plane_hash, controller = excluded.controller, connected = 1, \
               last_seen = excluded.last_seen",
        )
        .bind(reg.name.as_str())
        .bind(reg.cluster.as_str())
        .bind(&reg.plane_version)
        .bind(&reg.plane_hash)
        .bind(reg.controller.as_str())
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn proxy_disconnected(&self, name: &ProxyName, controller: &ControllerName) -> StoreResult<()> {
        sqlx::query("UPDATE proxy SET connected = 0, last_seen = ?1 WHERE name = ?2 AND controller = ?3")
            .bind(now_ms())
            .bind(name.as_str())
            .bind(controller.as_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn proxies(&self, cluster: &ClusterName) -> StoreResult<Vec<ProxyRecord>> {
        let rows = sqlx::query(
            "SELECT p.*, c.last_heartbeat AS controller_heartbeat FROM proxy p \
             LEFT JOIN controller c ON c.name = p.controller WHERE p.cluster = ?1 AND p.connected = 1 ORDER BY p.name",
        )
        .bind(cluster.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(ProxyRecord {
                    registration: ProxyRegistration {
                        name: parse("proxy name", &row.try_get::<String, _>("name")?)?,
                        cluster: parse("cluster", &row.try_get::<String, _>("cluster")?)?,
                        plane_version: row.try_get("plane_version")?,
                        plane_hash: row.try_get("plane_hash")?,
                        controller: parse("controller name", &row.try_get::<String, _>("controller")?)?,
                    },
                    controller_heartbeat_age: row.try_get::<Option<i64>, _>("controller_heartbeat")?.map(age),
                })
            })
            .collect()
    }

    async fn key_holder(&self, key: &KeyConfig) -> StoreResult<Option<KeyHolder>> {
        let row = sqlx::query(
            "SELECT k.backend_id, k.tag, b.status, b.drone, b.cluster, b.subdomain, b.static_token \
             FROM backend_key k JOIN backend b ON b.id = k.backend_id \
             WHERE k.namespace = ?1 AND k.name = ?2 AND k.expires_at > ?3 AND b.status_order < 70",
        )
        .bind(&key.namespace)
        .bind(&key.name)
        .bind(now_ms())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| {
            Ok(KeyHolder {
                backend_id: parse("backend id", &row.try_get::<String, _>("backend_id")?)?,
                tag: row.try_get("tag")?,
                status: parse("status", &row.try_get::<String, _>("status")?)?,
                drone: parse("drone name", &row.try_get::<String, _>("drone")?)?,
                cluster: parse("cluster", &row.try_get::<String, _>("cluster")?)?,
                subdomain: row.try_get("subdomain")?,
                static_token: row.try_get("static_token")?,
            })
        })
        .transpose()
    }

    async fn create_backend(&self, b: &NewBackend) -> StoreResult<CreateOutcome> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        // Free the key if its holder is done or its lease ran out.
        sqlx::query(
            "DELETE FROM backend_key WHERE namespace = ?1 AND name = ?2 AND (expires_at <= ?3 OR \
             backend_id IN (SELECT id FROM backend WHERE status_order >= 70))",
        )
        .bind(&b.key.namespace)
        .bind(&b.key.name)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let held = sqlx::query("SELECT 1 FROM backend_key WHERE namespace = ?1 AND name = ?2")
            .bind(&b.key.namespace)
            .bind(&b.key.name)
            .fetch_optional(&mut *tx)
            .await?;
        if held.is_some() {
            return Ok(CreateOutcome::KeyHeld);
        }
        let taken = sqlx::query("SELECT 1 FROM backend WHERE id = ?1")
            .bind(b.id.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        if taken.is_some() {
            return Ok(CreateOutcome::IdTaken);
        }
        let fencing_token: i64 =
            sqlx::query("UPDATE counter SET value = value + 1 WHERE name = 'fencing_token' RETURNING value")
                .fetch_one(&mut *tx)
                .await?
                .try_get("value")?;
        let scheduled = BackendStatus::Scheduled;
        sqlx::query(
            "INSERT INTO backend (id, cluster, pool, drone, executable, key_namespace, key_name, key_tag, \
             fencing_token, status, status_order, static_token, subdomain, lifetime_limit_seconds, \
             max_idle_seconds, created_at, last_active) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?16)",
        )
        .bind(b.id.as_str())
        .bind(b.cluster.as_str())
        .bind(&b.pool)
        .bind(b.drone.as_str())
        .bind(to_json(&b.executable)?)
        .bind(&b.key.namespace)
        .bind(&b.key.name)
        .bind(&b.key.tag)
        .bind(fencing_token)
        .bind(scheduled.as_str())
        .bind(scheduled.order())
        .bind(&b.static_token)
        .bind(&b.subdomain)
        .bind(b.lifetime_limit_seconds.map(|v| v.min(i64::MAX as u64) as i64))
        .bind(b.max_idle_seconds.map(|v| v.min(i64::MAX as u64) as i64))
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query("INSERT INTO backend_status (backend_id, status, status_order, time) VALUES (?1, ?2, ?3, ?4)")
            .bind(b.id.as_str())
            .bind(scheduled.as_str())
            .bind(scheduled.order())
            .bind(now)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO backend_key (namespace, name, backend_id, tag, fencing_token, expires_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .bind(&b.key.namespace)
        .bind(&b.key.name)
        .bind(b.id.as_str())
        .bind(&b.key.tag)
        .bind(fencing_token)
        .bind(now + b.lease_duration.as_millis() as i64)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(CreateOutcome::Created { fencing_token })
    }

    async fn insert_token(&self, t: &NewToken) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO token (token, backend_id, username, auth, secret_token, created_at, expires_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6 + ?7) ON CONFLICT (token) DO NOTHING",
        )
        .bind(&t.token)
        .bind(t.backend_id.as_str())
        .bind(&t.user)
        .bind(t.auth.as_ref().map(to_json).transpose()?)
        .bind(&t.secret_token)
        .bind(now_ms())
        .bind(t.ttl.map(duration_ms))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn backend(&self, id: &BackendName) -> StoreResult<Option<BackendRecord>> {
        let row = sqlx::query("SELECT * FROM backend WHERE id = ?1")
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(Self::backend_from_row).transpose()
    }

    async fn status_history(&self, id: &BackendName) -> StoreResult<Vec<StatusEntry>> {
        let rows = sqlx::query(
            "SELECT s.status, s.time, s.termination_reason, s.termination_kind, s.exit_error, s.message \
             FROM backend_status s WHERE s.backend_id = ?1 ORDER BY s.status_order",
        )
        .bind(id.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(StatusEntry {
                    status: parse("status", &row.try_get::<String, _>("status")?)?,
                    time: row.try_get::<i64, _>("time")? as EpochMillis,
                    termination_reason: parse_opt("termination reason", row.try_get("termination_reason")?)?,
                    termination_kind: parse_opt("termination kind", row.try_get("termination_kind")?)?,
                    exit_error: row.try_get::<Option<bool>, _>("exit_error")?,
                    message: row.try_get("message")?,
                })
            })
            .collect()
    }

    async fn apply_update(&self, drone: &DroneName, u: &BackendUpdate) -> StoreResult<ApplyOutcome> {
        let mut outcomes = self.apply_updates(drone, std::slice::from_ref(u)).await?;
        Ok(outcomes.pop().expect("one outcome per update"))
    }

    async fn apply_updates(&self, drone: &DroneName, updates: &[BackendUpdate]) -> StoreResult<Vec<ApplyOutcome>> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let mut outcomes = Vec::with_capacity(updates.len());
        for u in updates {
            outcomes.push(apply_update_in(&mut tx, drone, u, now).await?);
        }
        // One commit, and so one fsync, for the whole batch.
        tx.commit().await?;
        Ok(outcomes)
    }

    async fn renew_key(&self, backend_id: &BackendName, fencing_token: i64, lease: Duration) -> StoreResult<bool> {
        let now = now_ms();
        let res = sqlx::query(
            "UPDATE backend_key SET expires_at = ?1 WHERE backend_id = ?2 AND fencing_token = ?3 AND expires_at > ?4 \
             AND backend_id IN (SELECT id FROM backend WHERE status_order < 70)",
        )
        .bind(now + lease.as_millis() as i64)
        .bind(backend_id.as_str())
        .bind(fencing_token)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(res.rows_affected() == 1)
    }

    async fn request_termination(
        &self,
        id: &BackendName,
        kind: TerminationKind,
        reason: TerminationReason,
    ) -> StoreResult<Option<(DroneName, BackendStatus)>> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query("SELECT drone, status, pending_kind FROM backend WHERE id = ?1")
            .bind(id.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let drone: DroneName = parse("drone name", &row.try_get::<String, _>("drone")?)?;
        let status: BackendStatus = parse("status", &row.try_get::<String, _>("status")?)?;
        let pending: Option<TerminationKind> = parse_opt("termination kind", row.try_get("pending_kind")?)?;
        let upgrade = upgrades_termination(pending, kind);
        if upgrade && !status.is_terminal() {
            sqlx::query(
                "UPDATE backend SET pending_kind = ?1, pending_reason = COALESCE(pending_reason, ?2) WHERE id = ?3",
            )
            .bind(kind.as_str())
            .bind(reason.as_str())
            .bind(id.as_str())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(Some((drone, status)))
    }

    async fn scheduled_backends(&self, drone: &DroneName) -> StoreResult<Vec<BackendRecord>> {
        let rows = sqlx::query("SELECT * FROM backend WHERE drone = ?1 AND status_order = 10 ORDER BY created_at")
            .bind(drone.as_str())
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(Self::backend_from_row).collect()
    }

    async fn pending_terminations(&self, drone: &DroneName) -> StoreResult<Vec<Termination>> {
        let rows = sqlx::query(
            "SELECT id, drone, pending_kind, pending_reason FROM backend \
             WHERE drone = ?1 AND status_order < 70 AND pending_kind IS NOT NULL",
        )
        .bind(drone.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(termination_from_row).collect()
    }

    async fn route(&self, token: &str) -> StoreResult<Option<TokenRoute>> {
        let row = sqlx::query(
            "SELECT t.backend_id, t.username, t.auth, t.secret_token, t.expires_at - ?2 AS expires_in, b.status, \
             b.address, b.subdomain FROM token t JOIN backend b ON b.id = t.backend_id \
             WHERE t.token = ?1 AND t.revoked = 0 AND (t.expires_at IS NULL OR t.expires_at > ?2)",
        )
        .bind(token)
        .bind(now_ms())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| {
            let auth: Option<String> = row.try_get("auth")?;
            let expires_in: Option<i64> = row.try_get("expires_in")?;
            Ok(TokenRoute {
                backend_id: parse("backend id", &row.try_get::<String, _>("backend_id")?)?,
                status: parse("status", &row.try_get::<String, _>("status")?)?,
                address: parse_opt("address", row.try_get("address")?)?,
                user: row.try_get("username")?,
                user_data: auth.map(|a| json("token auth", &a)).transpose()?,
                secret_token: row.try_get("secret_token")?,
                subdomain: row.try_get("subdomain")?,
                expires_in: expires_in.map(ms_duration),
            })
        })
        .transpose()
    }

    async fn revoke(&self, backend_id: &BackendName, user: &str) -> StoreResult<Vec<String>> {
        let rows = sqlx::query(
            // Already revoked tokens too: a retried revoke invalidates caches again.
            "UPDATE token SET revoked = 1 WHERE backend_id = ?1 AND username = ?2 RETURNING token",
        )
        .bind(backend_id.as_str())
        .bind(user)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| Ok(r.try_get::<String, _>("token")?)).collect()
    }

    async fn keepalive(&self, backends: &[BackendName]) -> StoreResult<()> {
        if backends.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        for b in backends {
            sqlx::query("UPDATE backend SET last_active = ?1 WHERE id = ?2")
                .bind(now)
                .bind(b.as_str())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn sweep(&self) -> StoreResult<Vec<Termination>> {
        let now = now_ms();
        let rows = sqlx::query(
            "UPDATE backend SET pending_kind = 'soft', pending_reason = 'swept' \
             WHERE status_order < 60 AND pending_kind IS NULL AND ( \
               (max_idle_seconds IS NOT NULL AND status_order = 50 AND last_active + max_idle_seconds * 1000 <= ?1) \
               OR (lifetime_limit_seconds IS NOT NULL AND created_at + lifetime_limit_seconds * 1000 <= ?1)) \
             RETURNING id, drone, pending_kind, pending_reason",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(termination_from_row).collect()
    }

    async fn mark_lost(&self) -> StoreResult<Vec<(BackendName, StatusEntry)>> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(
            "SELECT b.id FROM backend b WHERE b.status_order < 70 AND NOT EXISTS \
             (SELECT 1 FROM backend_key k WHERE k.backend_id = b.id AND k.expires_at > ?1)",
        )
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        let mut lost = Vec::with_capacity(rows.len());
        let terminated = BackendStatus::Terminated;
        let reason = TerminationReason::Lost;
        for row in rows {
            let id: BackendName = parse("backend id", &row.try_get::<String, _>("id")?)?;
            sqlx::query(
                "UPDATE backend SET status = ?1, status_order = ?2, termination_reason = ?3, \
                 pending_kind = NULL, pending_reason = NULL WHERE id = ?4",
            )
            .bind(terminated.as_str())
            .bind(terminated.order())
            .bind(reason.as_str())
            .bind(id.as_str())
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO backend_status (backend_id, status, status_order, time, termination_reason, exit_error, message) \
                 VALUES (?1, ?2, ?3, ?4, ?5, 0, ?6)",
            )
            .bind(id.as_str())
            .bind(terminated.as_str())
            .bind(terminated.order())
            .bind(now)
            .bind(reason.as_str())
            .bind(LOST_MESSAGE)
            .execute(&mut *tx)
            .await?;
            sqlx::query("DELETE FROM backend_key WHERE backend_id = ?1")
                .bind(id.as_str())
                .execute(&mut *tx)
                .await?;
            lost.push((
                id,
                status_entry(terminated, now, Some(reason), None, None, Some(LOST_MESSAGE.to_owned())),
            ));
        }
        tx.commit().await?;
        Ok(lost)
    }

    async fn cleanup(&self, policy: &CleanupPolicy) -> StoreResult<CleanupReport> {
        let retention = i64::try_from(policy.terminated_retention.as_millis()).unwrap_or(i64::MAX);
        let cutoff = now_ms().saturating_sub(retention);
        let batch = i64::from(policy.batch);
        let mut tx = self.pool.begin().await?;
        // Tokens of terminated backends (status 70 is final), longest terminated first.
        // CROSS JOIN fixes SQLite's join order: the walk starts on the index of
        // terminations (migration 0003), in order, and stops at the limit.
        let tokens = sqlx::query(
            "DELETE FROM token WHERE token IN (SELECT t.token FROM backend_status s \
             CROSS JOIN backend b ON b.id = s.backend_id CROSS JOIN token t ON t.backend_id = s.backend_id \
             WHERE s.status_order = 70 AND b.status_order = 70 ORDER BY s.time, s.backend_id, t.token LIMIT ?1)",
        )
        .bind(batch)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        // Backends terminated before the cutoff, once their tokens are gone: a backend's
        // tokens are not bounded in number, so they go in the token batches above.
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT s.backend_id FROM backend_status s CROSS JOIN backend b ON b.id = s.backend_id \
             WHERE s.status_order = 70 AND b.status_order = 70 AND s.time <= ?1 \
             AND NOT EXISTS (SELECT 1 FROM token t WHERE t.backend_id = s.backend_id) \
             ORDER BY s.time, s.backend_id LIMIT ?2",
        )
        .bind(cutoff)
        .bind(batch)
        .fetch_all(&mut *tx)
        .await?;
        let mut report = CleanupReport {
            tokens,
            ..CleanupReport::default()
        };
        if !ids.is_empty() {
            let ids = to_json(&ids)?;
            // A terminated backend holds no key row (termination deletes it); one left
            // over would keep the backend row, so it goes too.
            sqlx::query("DELETE FROM backend_key WHERE backend_id IN (SELECT value FROM json_each(?1))")
                .bind(&ids)
                .execute(&mut *tx)
                .await?;
            report.status_entries =
                sqlx::query("DELETE FROM backend_status WHERE backend_id IN (SELECT value FROM json_each(?1))")
                    .bind(&ids)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
            report.backends = sqlx::query("DELETE FROM backend WHERE id IN (SELECT value FROM json_each(?1))")
                .bind(&ids)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        tx.commit().await?;
        Ok(report)
    }

    async fn acquire_cert_lease(&self, cluster: &ClusterName, holder: &ProxyName, ttl: Duration) -> StoreResult<bool> {
        let now = now_ms();
        // One statement decides: of two proxies racing for a free lease, one wins.
        let rows = sqlx::query(
            "INSERT INTO cert_lease (cluster, holder, expires_at) VALUES (?1, ?2, ?3 + ?4) \
             ON CONFLICT (cluster) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at, \
               txt_values = CASE WHEN cert_lease.holder = excluded.holder THEN cert_lease.txt_values ELSE '[]' END \
             WHERE cert_lease.holder = excluded.holder OR cert_lease.expires_at <= ?3",
        )
        .bind(cluster.as_str())
        .bind(holder.as_str())
        .bind(now)
        .bind(duration_ms(ttl))
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(rows > 0)
    }

    async fn set_acme_txt(&self, cluster: &ClusterName, holder: &ProxyName, values: &[String]) -> StoreResult<bool> {
        let rows =
            sqlx::query("UPDATE cert_lease SET txt_values = ?3 WHERE cluster = ?1 AND holder = ?2 AND expires_at > ?4")
                .bind(cluster.as_str())
                .bind(holder.as_str())
                .bind(to_json(&values)?)
                .bind(now_ms())
                .execute(&self.pool)
                .await?
                .rows_affected();
        Ok(rows > 0)
    }

    async fn release_cert_lease(&self, cluster: &ClusterName, holder: &ProxyName) -> StoreResult<()> {
        sqlx::query("DELETE FROM cert_lease WHERE cluster = ?1 AND holder = ?2")
            .bind(cluster.as_str())
            .bind(holder.as_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn acme_txt(&self, cluster: &ClusterName) -> StoreResult<Vec<String>> {
        let values: Option<String> =
            sqlx::query_scalar("SELECT txt_values FROM cert_lease WHERE cluster = ?1 AND expires_at > ?2")
                .bind(cluster.as_str())
                .bind(now_ms())
                .fetch_optional(&self.pool)
                .await?;
        values.map_or(Ok(Vec::new()), |v| json("TXT values", &v))
    }
}

fn termination_from_row(row: &SqliteRow) -> StoreResult<Termination> {
    Ok(Termination {
        backend_id: parse("backend id", &row.try_get::<String, _>("id")?)?,
        drone: parse("drone name", &row.try_get::<String, _>("drone")?)?,
        kind: parse("termination kind", &row.try_get::<String, _>("pending_kind")?)?,
        reason: parse("termination reason", &row.try_get::<String, _>("pending_reason")?)?,
    })
}

/// Applies one drone report on `tx` (see [`Store::apply_update`]); writes nothing unless
/// the outcome is [`ApplyOutcome::Advanced`].
async fn apply_update_in(
    tx: &mut sqlx::SqliteConnection,
    drone: &DroneName,
    u: &BackendUpdate,
    now: i64,
) -> StoreResult<ApplyOutcome> {
    let row = sqlx::query(
        "SELECT drone, status_order, termination_reason, termination_kind, pending_kind, pending_reason, exit_code \
         FROM backend WHERE id = ?1",
    )
    .bind(u.backend_id.as_str())
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        return Ok(ApplyOutcome::UnknownBackend);
    };
    if row.try_get::<String, _>("drone")? != drone.as_str() {
        return Ok(ApplyOutcome::WrongDrone);
    }
    if row.try_get::<i64, _>("status_order")? >= u.status.order() {
        return Ok(ApplyOutcome::Stale);
    }
    // Keep what is already known about the termination unless the drone says more.
    let known = KnownTermination {
        reason: parse_opt("termination reason", row.try_get("termination_reason")?)?,
        kind: parse_opt("termination kind", row.try_get("termination_kind")?)?,
        pending_reason: parse_opt("termination reason", row.try_get("pending_reason")?)?,
        pending_kind: parse_opt("termination kind", row.try_get("pending_kind")?)?,
    };
    let (reason, kind) = termination_of_update(u.status, u.termination_reason, u.termination_kind, known);
    let terminated = u.status == BackendStatus::Terminated;
    let exit_code = if terminated { u.exit_code } else { None };
    sqlx::query(
        "UPDATE backend SET status = ?1, status_order = ?2, address = COALESCE(?3, address), \
         exit_code = COALESCE(?4, exit_code), termination_reason = ?5, termination_kind = ?6, \
         message = COALESCE(?7, message), \
         last_active = CASE WHEN ?2 = 50 THEN ?8 ELSE last_active END, \
         pending_kind = CASE WHEN ?2 >= 70 THEN NULL ELSE pending_kind END, \
         pending_reason = CASE WHEN ?2 >= 70 THEN NULL ELSE pending_reason END \
         WHERE id = ?9",
    )
    .bind(u.status.as_str())
    .bind(u.status.order())
    .bind(u.address.map(|a| a.to_string()))
    .bind(exit_code)
    .bind(reason.map(|r| r.as_str()))
    .bind(kind.map(|k| k.as_str()))
    .bind(&u.message)
    .bind(now)
    .bind(u.backend_id.as_str())
    .execute(&mut *tx)
    .await?;
    let entry = status_entry(u.status, now, reason, kind, exit_code, u.message.clone());
    sqlx::query(
        "INSERT INTO backend_status (backend_id, status, status_order, time, termination_reason, termination_kind, exit_error, message) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )
    .bind(u.backend_id.as_str())
    .bind(u.status.as_str())
    .bind(u.status.order())
    .bind(now)
    .bind(reason.map(|r| r.as_str()))
    .bind(kind.map(|k| k.as_str()))
    .bind(entry.exit_error)
    .bind(&entry.message)
    .execute(&mut *tx)
    .await?;
    if terminated {
        sqlx::query("DELETE FROM backend_key WHERE backend_id = ?1")
            .bind(u.backend_id.as_str())
            .execute(&mut *tx)
            .await?;
    }
    Ok(ApplyOutcome::Advanced(entry))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn conformance_in_memory() {
        crate::conformance::run_all(|| async {
            Arc::new(SqliteStore::in_memory().await.unwrap()) as crate::SharedStore
        })
        .await;
    }

    #[tokio::test]
    async fn survives_reopen() {
        let dir = std::env::temp_dir().join(format!("plane-store-{}", std::process::id()));
        let path = dir.join("nested").join("c.db");
        let _ = std::fs::remove_dir_all(&dir);
        {
            let s = SqliteStore::open(&path).await.unwrap();
            s.controller_heartbeat(&"co-a".parse().unwrap()).await.unwrap();
        }
        let s = SqliteStore::open(&path).await.unwrap();
        s.ping().await.unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
