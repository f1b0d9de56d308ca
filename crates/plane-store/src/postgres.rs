//! The PostgreSQL implementation of [`Store`], for controllers that share one database.
//!
//! Same semantics as [`crate::sqlite`], method for method; the conformance suite runs
//! against both. What differs is forced by PostgreSQL being a server:
//!
//! * **Clock.** "Now" is the database server's clock (`plane_now_ms()`, defined by the
//!   first migration on `clock_timestamp()`), never the controller's: every controller
//!   sharing the database then agrees on lease expiry, heartbeat ages and sweeps (DESIGN
//!   §5.3). Ages are computed in SQL for the same reason. Inside a transaction, now is
//!   read after the row locks the method needs are held, so a method that waited for a
//!   lock does not decide with a stale time, and one backend's history times never go
//!   backwards.
//! * **Concurrency.** Transactions run concurrently (READ COMMITTED), so every
//!   read-modify-write locks what it reads:
//!   * `create_backend` serialises acquisitions of one key with a transaction-scoped
//!     advisory lock on the key, then frees a dead key row, checks, draws the fencing
//!     token from the `fencing_token` sequence and inserts. The primary key of
//!     `backend_key` still decides (`ON CONFLICT DO NOTHING` answers `KeyHeld`), and a
//!     duplicate backend id is decided by `backend`'s primary key (`IdTaken`). Because
//!     the token is drawn while the key is locked, a key's holders get strictly
//!     increasing tokens, and the sequence makes every token larger than all those
//!     issued before it.
//!   * `apply_update`, `request_termination` lock the backend row (`FOR NO KEY UPDATE`,
//!     which does not block the foreign-key checks of concurrent token inserts).
//!   * `mark_lost` locks its candidate backends, then their key rows, and only then
//!     decides which leases ran out, so a renewal that commits meanwhile is seen.
//!   * Statements that touch many backend rows (`sweep`, `keepalive`, `mark_lost`) lock
//!     them in id order, so they cannot deadlock with each other; the lock order is
//!     always backend row before key row.
//!   * `cleanup` locks what it deletes with `SKIP LOCKED` (token rows, then backend
//!     rows `FOR UPDATE`), so two controllers cleaning at once take disjoint rows and
//!     never wait for each other, nor for a row a report or a keepalive holds. Its
//!     backend lock also keeps out a token insert for that backend (the foreign-key
//!     check waits for it, then fails).
//!   * Single-statement methods (heartbeats, registrations, drains, renewals,
//!     revocations) are atomic as they are, and re-check their conditions on the latest
//!     row version.
//! * **Bounded calls.** Acquiring a connection is bounded by
//!   [`PostgresOptions::acquire_timeout`] (a stopped server gives an error, not a hang),
//!   and each call as a whole by [`PostgresOptions::call_timeout`] (a server that stops
//!   answering mid-query). The pool reconnects by itself when the server comes back.
//! * **Text.** PostgreSQL text cannot hold U+0000. Drone messages are stored with it
//!   replaced by U+FFFD, so that a drone's event can always be stored (the drone re-sends
//!   an event until it is stored); any other string holding U+0000 is refused with
//!   [`StoreError::Database`].

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
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{PgPool, Postgres, Row, Transaction};
use std::collections::HashMap;
use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// The first key of the advisory locks this store takes (`pg_advisory_xact_lock(int,
/// int)`), so they do not collide with another application's on the same database.
const KEY_LOCK_CLASS: i32 = 0x504c_4e45; // "PLNE"

/// How the store connects. [`Default`] suits a controller.
#[derive(Clone, Debug)]
pub struct PostgresOptions {
    /// The most connections the pool opens.
    pub max_connections: u32,
    /// How long a call waits for a connection (also bounds connecting while the server
    /// is down) before it fails.
    pub acquire_timeout: Duration,
    /// How long one store call may take in all before it fails.
    pub call_timeout: Duration,
    /// Whether [`PostgresStore::connect_with`] runs the migrations.
    pub migrate: bool,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            max_connections: 10,
            acquire_timeout: Duration::from_secs(5),
            call_timeout: Duration::from_secs(30),
            migrate: true,
        }
    }
}

/// The PostgreSQL store.
#[derive(Clone)]
pub struct PostgresStore {
    pub(crate) pool: PgPool,
    /// For the migrations' own connection.
    pub(crate) connect: PgConnectOptions,
    acquire_timeout: Duration,
    call_timeout: Duration,
}

impl std::fmt::Debug for PostgresStore {
    /// Where it connects, without the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("host", &self.connect.get_host())
            .field("port", &self.connect.get_port())
            .field("database", &self.connect.get_database())
            .field("user", &self.connect.get_username())
            .field("connections", &self.pool.size())
            .finish()
    }
}

/// An age in milliseconds computed by the server, as a duration (a negative age, from a
/// clock step, is zero).
fn age(ms: i64) -> Duration {
    Duration::from_millis(ms.max(0) as u64)
}

/// Text as PostgreSQL can store it: U+0000 becomes U+FFFD.
fn storable(text: &Option<String>) -> Option<String> {
    text.as_ref().map(|t| t.replace('\0', "\u{FFFD}"))
}

fn clamp_seconds(v: Option<u64>) -> Option<i64> {
    v.map(|v| v.min(i64::MAX as u64) as i64)
}

fn millis(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

/// The status order as stored (an INTEGER column).
fn order(status: BackendStatus) -> i32 {
    status.order() as i32
}

/// Reads the server's clock inside a transaction.
async fn now_in(tx: &mut Transaction<'_, Postgres>) -> StoreResult<i64> {
    Ok(sqlx::query_scalar("SELECT plane_now_ms()").fetch_one(&mut **tx).await?)
}

const DRONE_SELECT: &str = "SELECT d.name, d.cluster, d.pool, d.runtimes::text AS runtimes, d.plane_version, \
     d.plane_hash, d.controller, d.ready, d.draining, now.ms - d.last_heartbeat AS heartbeat_age, \
     now.ms - c.last_heartbeat AS controller_heartbeat_age, \
     (SELECT COUNT(*) FROM backend b WHERE b.drone = d.name AND b.status_order < 70) AS backend_count \
     FROM drone d LEFT JOIN controller c ON c.name = d.controller CROSS JOIN (SELECT plane_now_ms() AS ms) now";

const BACKEND_COLUMNS: &str = "id, cluster, pool, drone, executable::text AS executable, key_namespace, key_name, \
     key_tag, fencing_token, status, address, exit_code, termination_reason, termination_kind, pending_kind, \
     pending_reason, message, static_token, subdomain, lifetime_limit_seconds, max_idle_seconds, created_at";

impl PostgresStore {
    /// Connects to the database at `url` (`postgres://user:password@host:port/database`)
    /// with the default [`PostgresOptions`], and runs the migrations.
    pub async fn connect(url: &str) -> StoreResult<PostgresStore> {
        Self::connect_with(url, &PostgresOptions::default()).await
    }

    /// Connects with `options`; runs the migrations if `options.migrate`. Fails (after
    /// `options.acquire_timeout`) if the server does not answer.
    pub async fn connect_with(url: &str, options: &PostgresOptions) -> StoreResult<PostgresStore> {
        let mut connect = PgConnectOptions::from_str(url)?;
        if connect.get_application_name().is_none() {
            connect = connect.application_name("plane-controller");
        }
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections.max(1))
            .min_connections(0)
            .acquire_timeout(options.acquire_timeout)
            // A connection broken by a server restart is found and replaced at acquire,
            // so the first call after a restart already works.
            .test_before_acquire(true)
            .connect_with(connect.clone())
            .await?;
        let store = PostgresStore {
            pool,
            connect,
            acquire_timeout: options.acquire_timeout,
            call_timeout: options.call_timeout,
        };
        if options.migrate {
            store.migrate().await?;
        }
        Ok(store)
    }

    /// Brings the schema up to date: runs the migrations not yet applied (none if it is
    /// current). Safe to run from several controllers at once: the migrator holds an
    /// advisory lock while it works, and each migration is one transaction.
    pub async fn migrate(&self) -> StoreResult<()> {
        // On a connection of its own, closed afterwards: the migrator's lock belongs to
        // the session, and a failed run does not release it, so that connection must not
        // go back to the store's pool.
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(self.acquire_timeout)
            .connect_with(self.connect.clone())
            .await?;
        let result = MIGRATOR.run(&pool).await;
        pool.close().await;
        result.map_err(|e| StoreError::Database(format!("migration failed: {e}")))
    }

    /// Closes the pool: waits for connections in use to come back, and closes them all.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Runs one store call, bounded by the call timeout.
    pub(crate) async fn bounded<T>(&self, what: &str, call: impl Future<Output = StoreResult<T>>) -> StoreResult<T> {
        match tokio::time::timeout(self.call_timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Database(format!(
                "{what} did not complete within {:?}",
                self.call_timeout
            ))),
        }
    }

    fn drone_from_row(row: &PgRow) -> StoreResult<DroneRecord> {
        let runtimes: Vec<RuntimeKind> = json("drone runtimes", &row.try_get::<String, _>("runtimes")?)?;
        Ok(DroneRecord {
            name: parse("drone name", &row.try_get::<String, _>("name")?)?,
            cluster: parse("cluster", &row.try_get::<String, _>("cluster")?)?,
            pool: row.try_get("pool")?,
            runtimes,
            plane_version: row.try_get("plane_version")?,
            plane_hash: row.try_get("plane_hash")?,
            controller: parse_opt("controller name", row.try_get("controller")?)?,
            controller_heartbeat_age: row.try_get::<Option<i64>, _>("controller_heartbeat_age")?.map(age),
            ready: row.try_get("ready")?,
            draining: row.try_get("draining")?,
            last_heartbeat_age: age(row.try_get("heartbeat_age")?),
            backend_count: row.try_get::<i64, _>("backend_count")? as u64,
        })
    }

    fn backend_from_row(row: &PgRow) -> StoreResult<BackendRecord> {
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
            exit_code: row.try_get("exit_code")?,
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

    async fn create_backend_tx(&self, b: &NewBackend) -> StoreResult<CreateOutcome> {
        let mut tx = self.pool.begin().await?;
        // One acquisition of this key at a time, until commit. The encoding is
        // injective, so only a hash collision (harmless) makes two keys wait for each
        // other.
        sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext(length($2)::text || ':' || $2 || $3))")
            .bind(KEY_LOCK_CLASS)
            .bind(&b.key.namespace)
            .bind(&b.key.name)
            .execute(&mut *tx)
            .await?;
        let now = now_in(&mut tx).await?;
        // Free the key if its holder is done or its lease ran out.
        sqlx::query(
            "DELETE FROM backend_key WHERE namespace = $1 AND name = $2 AND (expires_at <= $3 OR \
             backend_id IN (SELECT id FROM backend WHERE status_order >= 70))",
        )
        .bind(&b.key.namespace)
        .bind(&b.key.name)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let held = sqlx::query("SELECT 1 FROM backend_key WHERE namespace = $1 AND name = $2")
            .bind(&b.key.namespace)
            .bind(&b.key.name)
            .fetch_optional(&mut *tx)
            .await?;
        if held.is_some() {
            return Ok(CreateOutcome::KeyHeld);
        }
        let scheduled = BackendStatus::Scheduled;
        let fencing_token: Option<i64> = sqlx::query_scalar(
            "INSERT INTO backend (id, cluster, pool, drone, executable, key_namespace, key_name, key_tag, \
             fencing_token, status, status_order, static_token, subdomain, lifetime_limit_seconds, \
             max_idle_seconds, created_at, last_active) \
             VALUES ($1, $2, $3, $4, $5::json, $6, $7, $8, nextval('fencing_token'), $9, $10, $11, $12, $13, $14, \
             $15, $15) \
             ON CONFLICT (id) DO NOTHING RETURNING fencing_token",
        )
        .bind(b.id.as_str())
        .bind(b.cluster.as_str())
        .bind(&b.pool)
        .bind(b.drone.as_str())
        .bind(to_json(&b.executable)?)
        .bind(&b.key.namespace)
        .bind(&b.key.name)
        .bind(&b.key.tag)
        .bind(scheduled.as_str())
        .bind(order(scheduled))
        .bind(&b.static_token)
        .bind(&b.subdomain)
        .bind(clamp_seconds(b.lifetime_limit_seconds))
        .bind(clamp_seconds(b.max_idle_seconds))
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(fencing_token) = fencing_token else {
            return Ok(CreateOutcome::IdTaken);
        };
        sqlx::query("INSERT INTO backend_status (backend_id, status, status_order, time) VALUES ($1, $2, $3, $4)")
            .bind(b.id.as_str())
            .bind(scheduled.as_str())
            .bind(order(scheduled))
            .bind(now)
            .execute(&mut *tx)
            .await?;
        let inserted = sqlx::query(
            "INSERT INTO backend_key (namespace, name, backend_id, tag, fencing_token, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (namespace, name) DO NOTHING",
        )
        .bind(&b.key.namespace)
        .bind(&b.key.name)
        .bind(b.id.as_str())
        .bind(&b.key.tag)
        .bind(fencing_token)
        .bind(now.saturating_add(millis(b.lease_duration)))
        .execute(&mut *tx)
        .await?;
        if inserted.rows_affected() == 0 {
            // Not reachable while the advisory lock is held; the primary key decides
            // anyway. Dropping the transaction rolls the backend back.
            return Ok(CreateOutcome::KeyHeld);
        }
        tx.commit().await?;
        Ok(CreateOutcome::Created { fencing_token })
    }

    /// Sets a drone's `draining` flag. The update re-checks the flag on the latest row,
    /// so of two concurrent calls exactly one reports a change.
    async fn set_draining_tx(
        &self,
        cluster: &ClusterName,
        name: &DroneName,
        draining: bool,
    ) -> StoreResult<Option<bool>> {
        let changed = sqlx::query("UPDATE drone SET draining = $3 WHERE name = $1 AND cluster = $2 AND draining <> $3")
            .bind(name.as_str())
            .bind(cluster.as_str())
            .bind(draining)
            .execute(&self.pool)
            .await?;
        if changed.rows_affected() == 1 {
            return Ok(Some(true));
        }
        let known = sqlx::query("SELECT 1 FROM drone WHERE name = $1 AND cluster = $2")
            .bind(name.as_str())
            .bind(cluster.as_str())
            .fetch_optional(&self.pool)
            .await?;
        Ok(known.map(|_| false))
    }

    async fn cleanup_tx(&self, policy: &CleanupPolicy) -> StoreResult<CleanupReport> {
        let batch = i64::from(policy.batch);
        let mut tx = self.pool.begin().await?;
        // Tokens of terminated backends, longest terminated first. A terminated backend
        // stays terminated, so its row needs no lock; the token rows are locked,
        // skipping those another transaction holds (a concurrent cleanup, a revocation).
        let tokens = sqlx::query(
            "WITH doomed AS (SELECT t.token FROM backend_status s JOIN backend b ON b.id = s.backend_id \
             JOIN token t ON t.backend_id = s.backend_id WHERE s.status_order = 70 AND b.status_order = 70 \
             ORDER BY s.time, s.backend_id, t.token LIMIT $1 FOR UPDATE OF t SKIP LOCKED) \
             DELETE FROM token t USING doomed WHERE t.token = doomed.token",
        )
        .bind(batch)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        // Backends terminated before the cutoff, once their tokens are gone (a backend's
        // tokens are not bounded in number, so they go in the token batches above).
        // Locked `FOR UPDATE` (they are deleted), skipping rows others hold; the limit
        // counts locked rows only. Deciding needs no wait, so the statement's time is
        // current.
        let ids: Vec<String> = sqlx::query_scalar(
            "WITH now AS MATERIALIZED (SELECT plane_now_ms() AS ms) \
             SELECT b.id FROM backend_status s JOIN backend b ON b.id = s.backend_id CROSS JOIN now \
             WHERE s.status_order = 70 AND b.status_order = 70 AND s.time <= now.ms - $1 \
             AND NOT EXISTS (SELECT 1 FROM token t WHERE t.backend_id = b.id) \
             ORDER BY s.time, s.backend_id LIMIT $2 FOR UPDATE OF b SKIP LOCKED",
        )
        .bind(millis(policy.terminated_retention))
        .bind(batch)
        .fetch_all(&mut *tx)
        .await?;
        let mut report = CleanupReport {
            tokens,
            ..CleanupReport::default()
        };
        if ids.is_empty() {
            tx.commit().await?;
            return Ok(report);
        }
        // A token committed after the check above (a connect that raced with the
        // termination) would keep the backend row; the lock keeps any later one out.
        report.tokens += sqlx::query("DELETE FROM token WHERE backend_id = ANY($1)")
            .bind(&ids)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        // A terminated backend holds no key row (termination deletes it); one left over
        // would keep the backend row, so it goes too. Backend row before key row.
        sqlx::query("DELETE FROM backend_key WHERE backend_id = ANY($1)")
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
        report.status_entries = sqlx::query("DELETE FROM backend_status WHERE backend_id = ANY($1)")
            .bind(&ids)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        report.backends = sqlx::query("DELETE FROM backend WHERE id = ANY($1)")
            .bind(&ids)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(report)
    }

    async fn apply_update_tx(&self, drone: &DroneName, u: &BackendUpdate) -> StoreResult<ApplyOutcome> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "SELECT drone, status_order, termination_reason, termination_kind, pending_kind, pending_reason \
             FROM backend WHERE id = $1 FOR NO KEY UPDATE",
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
        if i64::from(row.try_get::<i32, _>("status_order")?) >= u.status.order() {
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
        let message = storable(&u.message);
        // The row is locked already, so the time is read after the wait.
        let now: i64 = sqlx::query_scalar(
            "WITH now AS MATERIALIZED (SELECT plane_now_ms() AS ms) \
             UPDATE backend SET status = $1, status_order = $2, address = COALESCE($3, address), \
             exit_code = COALESCE($4, exit_code), termination_reason = $5, termination_kind = $6, \
             message = COALESCE($7, message), \
             last_active = CASE WHEN $2 = 50 THEN now.ms ELSE last_active END, \
             pending_kind = CASE WHEN $2 >= 70 THEN NULL ELSE pending_kind END, \
             pending_reason = CASE WHEN $2 >= 70 THEN NULL ELSE pending_reason END \
             FROM now WHERE id = $8 RETURNING now.ms",
        )
        .bind(u.status.as_str())
        .bind(order(u.status))
        .bind(u.address.map(|a| a.to_string()))
        .bind(exit_code)
        .bind(reason.map(|r| r.as_str()))
        .bind(kind.map(|k| k.as_str()))
        .bind(&message)
        .bind(u.backend_id.as_str())
        .fetch_one(&mut *tx)
        .await?;
        let entry = status_entry(u.status, now, reason, kind, exit_code, message);
        sqlx::query(
            "INSERT INTO backend_status (backend_id, status, status_order, time, termination_reason, \
             termination_kind, exit_error, message) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(u.backend_id.as_str())
        .bind(u.status.as_str())
        .bind(order(u.status))
        .bind(now)
        .bind(reason.map(|r| r.as_str()))
        .bind(kind.map(|k| k.as_str()))
        .bind(entry.exit_error)
        .bind(&entry.message)
        .execute(&mut *tx)
        .await?;
        if terminated {
            sqlx::query("DELETE FROM backend_key WHERE backend_id = $1")
                .bind(u.backend_id.as_str())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(ApplyOutcome::Advanced(entry))
    }

    async fn request_termination_tx(
        &self,
        id: &BackendName,
        kind: TerminationKind,
        reason: TerminationReason,
    ) -> StoreResult<Option<(DroneName, BackendStatus)>> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query("SELECT drone, status, pending_kind FROM backend WHERE id = $1 FOR NO KEY UPDATE")
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
                "UPDATE backend SET pending_kind = $1, pending_reason = COALESCE(pending_reason, $2) WHERE id = $3",
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

    async fn mark_lost_tx(&self) -> StoreResult<Vec<(BackendName, StatusEntry)>> {
        let mut tx = self.pool.begin().await?;
        // Candidates: not terminated, and no live lease as of this statement's snapshot.
        // Locking them (in id order) keeps their drones' reports out until commit.
        let candidates: Vec<String> = sqlx::query_scalar(
            "SELECT b.id FROM backend b WHERE b.status_order < 70 AND NOT EXISTS \
             (SELECT 1 FROM backend_key k WHERE k.backend_id = b.id AND k.expires_at > plane_now_ms()) \
             ORDER BY b.id FOR NO KEY UPDATE OF b",
        )
        .fetch_all(&mut *tx)
        .await?;
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        // A renewal may have committed after that snapshot: lock the key rows and
        // decide on their latest version, with the time read after the locks. A renewal
        // that comes later waits for this transaction, then finds its key row gone.
        let leases: HashMap<String, i64> = sqlx::query(
            "SELECT backend_id, expires_at FROM backend_key WHERE backend_id = ANY($1) ORDER BY backend_id FOR UPDATE",
        )
        .bind(&candidates)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|row| Ok((row.try_get("backend_id")?, row.try_get("expires_at")?)))
        .collect::<StoreResult<_>>()?;
        let now = now_in(&mut tx).await?;
        let lost_ids: Vec<String> = candidates
            .into_iter()
            .filter(|id| leases.get(id).is_none_or(|&expires_at| expires_at <= now))
            .collect();
        if lost_ids.is_empty() {
            return Ok(Vec::new());
        }
        let terminated = BackendStatus::Terminated;
        let reason = TerminationReason::Lost;
        sqlx::query(
            "UPDATE backend SET status = $1, status_order = $2, termination_reason = $3, \
             pending_kind = NULL, pending_reason = NULL WHERE id = ANY($4)",
        )
        .bind(terminated.as_str())
        .bind(order(terminated))
        .bind(reason.as_str())
        .bind(&lost_ids)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO backend_status (backend_id, status, status_order, time, termination_reason, exit_error, \
             message) SELECT id, $2, $3, $4, $5, FALSE, $6 FROM unnest($1::text[]) AS lost (id)",
        )
        .bind(&lost_ids)
        .bind(terminated.as_str())
        .bind(order(terminated))
        .bind(now)
        .bind(reason.as_str())
        .bind(LOST_MESSAGE)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM backend_key WHERE backend_id = ANY($1)")
            .bind(&lost_ids)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        lost_ids
            .iter()
            .map(|id| {
                Ok((
                    parse("backend id", id)?,
                    status_entry(terminated, now, Some(reason), None, None, Some(LOST_MESSAGE.to_owned())),
                ))
            })
            .collect()
    }
}

#[async_trait]
impl Store for PostgresStore {
    fn fanout(&self) -> Option<crate::fanout::SharedFanout> {
        Some(std::sync::Arc::new(crate::fanout::PgFanout::new(self)))
    }

    async fn ping(&self) -> StoreResult<()> {
        self.bounded("ping", async {
            sqlx::query("SELECT 1").execute(&self.pool).await?;
            Ok(())
        })
        .await
    }

    async fn controller_heartbeat(&self, name: &ControllerName) -> StoreResult<()> {
        self.bounded("controller_heartbeat", async {
            sqlx::query(
                "INSERT INTO controller (name, last_heartbeat) VALUES ($1, plane_now_ms()) \
                 ON CONFLICT (name) DO UPDATE SET last_heartbeat = excluded.last_heartbeat",
            )
            .bind(name.as_str())
            .execute(&self.pool)
            .await?;
            Ok(())
        })
        .await
    }

    async fn register_drone(&self, reg: &DroneRegistration) -> StoreResult<()> {
        self.bounded("register_drone", async {
            sqlx::query(
                "INSERT INTO drone (name, cluster, pool, runtimes, plane_version, plane_hash, controller, ready, \
                 last_heartbeat) VALUES ($1, $2, $3, $4::json, $5, $6, $7, TRUE, plane_now_ms()) \
                 ON CONFLICT (name) DO UPDATE SET cluster = excluded.cluster, pool = excluded.pool, \
                   runtimes = excluded.runtimes, plane_version = excluded.plane_version, \
                   plane_hash = excluded.plane_hash, controller = excluded.controller, ready = TRUE, \
                   last_heartbeat = excluded.last_heartbeat",
            )
            .bind(reg.name.as_str())
            .bind(reg.cluster.as_str())
            .bind(&reg.pool)
            .bind(to_json(&reg.runtimes)?)
            .bind(&reg.plane_version)
            .bind(&reg.plane_hash)
            .bind(reg.controller.as_str())
            .execute(&self.pool)
            .await?;
            Ok(())
        })
        .await
    }

    async fn drone_heartbeat(&self, name: &DroneName) -> StoreResult<()> {
        self.bounded("drone_heartbeat", async {
            // A heartbeat comes only over a live socket, so it also marks the drone ready:
            // this repairs a late disconnect record from a replaced connection.
            sqlx::query("UPDATE drone SET last_heartbeat = plane_now_ms(), ready = TRUE WHERE name = $1")
                .bind(name.as_str())
                .execute(&self.pool)
                .await?;
            Ok(())
        })
        .await
    }

    async fn drone_disconnected(&self, name: &DroneName, controller: &ControllerName) -> StoreResult<()> {
        self.bounded("drone_disconnected", async {
            sqlx::query("UPDATE drone SET ready = FALSE WHERE name = $1 AND controller = $2")
                .bind(name.as_str())
                .bind(controller.as_str())
                .execute(&self.pool)
                .await?;
            Ok(())
        })
        .await
    }

    async fn drain_drone(&self, cluster: &ClusterName, name: &DroneName) -> StoreResult<Option<bool>> {
        self.bounded("drain_drone", self.set_draining_tx(cluster, name, true))
            .await
    }

    async fn undrain_drone(&self, cluster: &ClusterName, name: &DroneName) -> StoreResult<Option<bool>> {
        self.bounded("undrain_drone", self.set_draining_tx(cluster, name, false))
            .await
    }

    async fn drones(&self, cluster: &ClusterName) -> StoreResult<Vec<DroneRecord>> {
        self.bounded("drones", async {
            let rows = sqlx::query(&format!("{DRONE_SELECT} WHERE d.cluster = $1 ORDER BY d.name"))
                .bind(cluster.as_str())
                .fetch_all(&self.pool)
                .await?;
            rows.iter().map(Self::drone_from_row).collect()
        })
        .await
    }

    async fn schedulable_drones(
        &self,
        cluster: &ClusterName,
        pool: &str,
        runtime: RuntimeKind,
        max_heartbeat_age: Duration,
    ) -> StoreResult<Vec<DroneRecord>> {
        self.bounded("schedulable_drones", async {
            let rows = sqlx::query(&format!(
                "{DRONE_SELECT} WHERE d.cluster = $1 AND d.pool = $2 AND d.ready AND NOT d.draining \
                 AND d.last_heartbeat >= now.ms - $3"
            ))
            .bind(cluster.as_str())
            .bind(pool)
            .bind(millis(max_heartbeat_age))
            .fetch_all(&self.pool)
            .await?;
            let drones: Vec<DroneRecord> = rows.iter().map(Self::drone_from_row).collect::<StoreResult<_>>()?;
            Ok(drones.into_iter().filter(|d| d.runtimes.contains(&runtime)).collect())
        })
        .await
    }

    async fn register_proxy(&self, reg: &ProxyRegistration) -> StoreResult<()> {
        self.bounded("register_proxy", async {
            sqlx::query(
                "INSERT INTO proxy (name, cluster, plane_version, plane_hash, controller, connected, last_seen) \
                 VALUES ($1, $2, $3, $4, $5, TRUE, plane_now_ms()) \
                 ON CONFLICT (name) DO UPDATE SET cluster = excluded.cluster, \
                   plane_version = excluded.plane_version, plane_hash = excluded.plane_hash, \
                   controller = excluded.controller, connected = TRUE, last_seen = excluded.last_seen",
            )
            .bind(reg.name.as_str())
            .bind(reg.cluster.as_str())
            .bind(&reg.plane_version)
            .bind(&reg.plane_hash)
            .bind(reg.controller.as_str())
            .execute(&self.pool)
            .await?;
            Ok(())
        })
        .await
    }

    async fn proxy_disconnected(&self, name: &ProxyName, controller: &ControllerName) -> StoreResult<()> {
        self.bounded("proxy_disconnected", async {
            sqlx::query(
                "UPDATE proxy SET connected = FALSE, last_seen = plane_now_ms() WHERE name = $1 AND controller = $2",
            )
            .bind(name.as_str())
            .bind(controller.as_str())
            .execute(&self.pool)
            .await?;
            Ok(())
        })
        .await
    }

    async fn proxies(&self, cluster: &ClusterName) -> StoreResult<Vec<ProxyRecord>> {
        self.bounded("proxies", async {
            let rows = sqlx::query(
                "SELECT p.name, p.cluster, p.plane_version, p.plane_hash, p.controller, \
                 plane_now_ms() - c.last_heartbeat AS controller_heartbeat_age FROM proxy p \
                 LEFT JOIN controller c ON c.name = p.controller WHERE p.cluster = $1 AND p.connected \
                 ORDER BY p.name",
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
                        controller_heartbeat_age: row.try_get::<Option<i64>, _>("controller_heartbeat_age")?.map(age),
                    })
                })
                .collect()
        })
        .await
    }

    async fn key_holder(&self, key: &KeyConfig) -> StoreResult<Option<KeyHolder>> {
        self.bounded("key_holder", async {
            let row = sqlx::query(
                "SELECT k.backend_id, k.tag, b.status, b.drone, b.cluster, b.subdomain, b.static_token \
                 FROM backend_key k JOIN backend b ON b.id = k.backend_id \
                 WHERE k.namespace = $1 AND k.name = $2 AND k.expires_at > plane_now_ms() AND b.status_order < 70",
            )
            .bind(&key.namespace)
            .bind(&key.name)
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
        })
        .await
    }

    async fn create_backend(&self, backend: &NewBackend) -> StoreResult<CreateOutcome> {
        self.bounded("create_backend", self.create_backend_tx(backend)).await
    }

    async fn insert_token(&self, t: &NewToken) -> StoreResult<()> {
        self.bounded("insert_token", async {
            sqlx::query(
                "INSERT INTO token (token, backend_id, username, auth, secret_token, created_at, expires_at) \
                 VALUES ($1, $2, $3, $4::json, $5, plane_now_ms(), plane_now_ms() + $6) ON CONFLICT (token) DO NOTHING",
            )
            .bind(&t.token)
            .bind(t.backend_id.as_str())
            .bind(&t.user)
            .bind(t.auth.as_ref().map(to_json).transpose()?)
            .bind(&t.secret_token)
            .bind(t.ttl.map(duration_ms))
            .execute(&self.pool)
            .await?;
            Ok(())
        })
        .await
    }

    async fn backend(&self, id: &BackendName) -> StoreResult<Option<BackendRecord>> {
        self.bounded("backend", async {
            let row = sqlx::query(&format!("SELECT {BACKEND_COLUMNS} FROM backend WHERE id = $1"))
                .bind(id.as_str())
                .fetch_optional(&self.pool)
                .await?;
            row.as_ref().map(Self::backend_from_row).transpose()
        })
        .await
    }

    async fn status_history(&self, id: &BackendName) -> StoreResult<Vec<StatusEntry>> {
        self.bounded("status_history", async {
            let rows = sqlx::query(
                "SELECT status, time, termination_reason, termination_kind, exit_error, message \
                 FROM backend_status WHERE backend_id = $1 ORDER BY status_order",
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
                        exit_error: row.try_get("exit_error")?,
                        message: row.try_get("message")?,
                    })
                })
                .collect()
        })
        .await
    }

    async fn apply_update(&self, drone: &DroneName, update: &BackendUpdate) -> StoreResult<ApplyOutcome> {
        self.bounded("apply_update", self.apply_update_tx(drone, update)).await
    }

    async fn renew_key(&self, backend_id: &BackendName, fencing_token: i64, lease: Duration) -> StoreResult<bool> {
        self.bounded("renew_key", async {
            let res = sqlx::query(
                "WITH now AS MATERIALIZED (SELECT plane_now_ms() AS ms) \
                 UPDATE backend_key k SET expires_at = LEAST(now.ms::numeric + $1, 9223372036854775807)::bigint \
                 FROM now WHERE k.backend_id = $2 AND k.fencing_token = $3 AND k.expires_at > now.ms \
                 AND EXISTS (SELECT 1 FROM backend b WHERE b.id = k.backend_id AND b.status_order < 70)",
            )
            .bind(millis(lease))
            .bind(backend_id.as_str())
            .bind(fencing_token)
            .execute(&self.pool)
            .await?;
            Ok(res.rows_affected() == 1)
        })
        .await
    }

    async fn request_termination(
        &self,
        id: &BackendName,
        kind: TerminationKind,
        reason: TerminationReason,
    ) -> StoreResult<Option<(DroneName, BackendStatus)>> {
        self.bounded("request_termination", self.request_termination_tx(id, kind, reason))
            .await
    }

    async fn scheduled_backends(&self, drone: &DroneName) -> StoreResult<Vec<BackendRecord>> {
        self.bounded("scheduled_backends", async {
            let rows = sqlx::query(&format!(
                "SELECT {BACKEND_COLUMNS} FROM backend WHERE drone = $1 AND status_order = 10 ORDER BY created_at, id"
            ))
            .bind(drone.as_str())
            .fetch_all(&self.pool)
            .await?;
            rows.iter().map(Self::backend_from_row).collect()
        })
        .await
    }

    async fn pending_terminations(&self, drone: &DroneName) -> StoreResult<Vec<Termination>> {
        self.bounded("pending_terminations", async {
            let rows = sqlx::query(
                "SELECT id, drone, pending_kind, pending_reason FROM backend \
                 WHERE drone = $1 AND status_order < 70 AND pending_kind IS NOT NULL ORDER BY id",
            )
            .bind(drone.as_str())
            .fetch_all(&self.pool)
            .await?;
            rows.iter().map(termination_from_row).collect()
        })
        .await
    }

    async fn route(&self, token: &str) -> StoreResult<Option<TokenRoute>> {
        self.bounded("route", async {
            let row = sqlx::query(
                "SELECT t.backend_id, t.username, t.auth::text AS auth, t.secret_token, \
                 t.expires_at - now.ms AS expires_in, b.status, b.address, b.subdomain \
                 FROM token t JOIN backend b ON b.id = t.backend_id CROSS JOIN (SELECT plane_now_ms() AS ms) now \
                 WHERE t.token = $1 AND NOT t.revoked AND (t.expires_at IS NULL OR t.expires_at > now.ms)",
            )
            .bind(token)
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
        })
        .await
    }

    async fn revoke(&self, backend_id: &BackendName, user: &str) -> StoreResult<Vec<String>> {
        self.bounded("revoke", async {
            // Already revoked tokens are returned too: a retried revoke (say, after the
            // controller died before telling the proxies) invalidates caches again.
            Ok(sqlx::query_scalar(
                "UPDATE token SET revoked = TRUE WHERE backend_id = $1 AND username = $2 RETURNING token",
            )
            .bind(backend_id.as_str())
            .bind(user)
            .fetch_all(&self.pool)
            .await?)
        })
        .await
    }

    async fn keepalive(&self, backends: &[BackendName]) -> StoreResult<()> {
        if backends.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = backends.iter().map(|b| b.as_str()).collect();
        self.bounded("keepalive", async {
            sqlx::query(
                "WITH now AS MATERIALIZED (SELECT plane_now_ms() AS ms), \
                 hit AS (SELECT id FROM backend WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE) \
                 UPDATE backend b SET last_active = now.ms FROM now, hit WHERE b.id = hit.id",
            )
            .bind(&ids)
            .execute(&self.pool)
            .await?;
            Ok(())
        })
        .await
    }

    async fn sweep(&self) -> StoreResult<Vec<Termination>> {
        self.bounded("sweep", async {
            // The limits are compared in NUMERIC: a huge limit must not overflow BIGINT
            // (SQLite falls back to floating point there; PostgreSQL would fail the sweep).
            let rows = sqlx::query(
                "WITH now AS MATERIALIZED (SELECT plane_now_ms() AS ms), \
                 due AS (SELECT b.id FROM backend b, now WHERE b.status_order < 60 AND b.pending_kind IS NULL AND ( \
                   (b.max_idle_seconds IS NOT NULL AND b.status_order = 50 \
                    AND b.last_active::numeric + b.max_idle_seconds::numeric * 1000 <= now.ms) \
                   OR (b.lifetime_limit_seconds IS NOT NULL \
                    AND b.created_at::numeric + b.lifetime_limit_seconds::numeric * 1000 <= now.ms)) \
                   ORDER BY b.id FOR NO KEY UPDATE OF b) \
                 UPDATE backend b SET pending_kind = 'soft', pending_reason = 'swept' FROM due WHERE b.id = due.id \
                 RETURNING b.id, b.drone, b.pending_kind, b.pending_reason",
            )
            .fetch_all(&self.pool)
            .await?;
            rows.iter().map(termination_from_row).collect()
        })
        .await
    }

    async fn mark_lost(&self) -> StoreResult<Vec<(BackendName, StatusEntry)>> {
        self.bounded("mark_lost", self.mark_lost_tx()).await
    }

    async fn cleanup(&self, policy: &CleanupPolicy) -> StoreResult<CleanupReport> {
        self.bounded("cleanup", self.cleanup_tx(policy)).await
    }

    async fn acquire_cert_lease(&self, cluster: &ClusterName, holder: &ProxyName, ttl: Duration) -> StoreResult<bool> {
        self.bounded("acquire_cert_lease", async {
            // One statement decides: of two proxies racing for a free lease, one wins.
            let rows = sqlx::query(
                "INSERT INTO cert_lease (cluster, holder, expires_at) VALUES ($1, $2, plane_now_ms() + $3) \
                 ON CONFLICT (cluster) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at, \
                   txt_values = CASE WHEN cert_lease.holder = excluded.holder THEN cert_lease.txt_values ELSE '[]' END \
                 WHERE cert_lease.holder = excluded.holder OR cert_lease.expires_at <= plane_now_ms()",
            )
            .bind(cluster.as_str())
            .bind(holder.as_str())
            .bind(duration_ms(ttl))
            .execute(&self.pool)
            .await?
            .rows_affected();
            Ok(rows > 0)
        })
        .await
    }

    async fn set_acme_txt(&self, cluster: &ClusterName, holder: &ProxyName, values: &[String]) -> StoreResult<bool> {
        self.bounded("set_acme_txt", async {
            let rows = sqlx::query(
                "UPDATE cert_lease SET txt_values = $3 \
                 WHERE cluster = $1 AND holder = $2 AND expires_at > plane_now_ms()",
            )
            .bind(cluster.as_str())
            .bind(holder.as_str())
            .bind(to_json(&values)?)
            .execute(&self.pool)
            .await?
            .rows_affected();
            Ok(rows > 0)
        })
        .await
    }

    async fn release_cert_lease(&self, cluster: &ClusterName, holder: &ProxyName) -> StoreResult<()> {
        self.bounded("release_cert_lease", async {
            sqlx::query("DELETE FROM cert_lease WHERE cluster = $1 AND holder = $2")
                .bind(cluster.as_str())
                .bind(holder.as_str())
                .execute(&self.pool)
                .await?;
            Ok(())
        })
        .await
    }

    async fn acme_txt(&self, cluster: &ClusterName) -> StoreResult<Vec<String>> {
        self.bounded("acme_txt", async {
            let values: Option<String> = sqlx::query_scalar(
                "SELECT txt_values FROM cert_lease WHERE cluster = $1 AND expires_at > plane_now_ms()",
            )
            .bind(cluster.as_str())
            .fetch_optional(&self.pool)
            .await?;
            values.map_or(Ok(Vec::new()), |v| json("TXT values", &v))
        })
        .await
    }
}

fn termination_from_row(row: &PgRow) -> StoreResult<Termination> {
    Ok(Termination {
        backend_id: parse("backend id", &row.try_get::<String, _>("id")?)?,
        drone: parse("drone name", &row.try_get::<String, _>("drone")?)?,
        kind: parse("termination kind", &row.try_get::<String, _>("pending_kind")?)?,
        reason: parse("termination reason", &row.try_get::<String, _>("pending_reason")?)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_lose_nul_characters_only() {
        assert_eq!(storable(&None), None);
        assert_eq!(storable(&Some("a\0b".into())), Some("a\u{FFFD}b".into()));
        assert_eq!(
            storable(&Some("pull failed: ünïcode".into())),
            Some("pull failed: ünïcode".into())
        );
    }

    #[test]
    fn ages_and_limits_saturate() {
        assert_eq!(age(-5), Duration::ZERO);
        assert_eq!(age(1500), Duration::from_millis(1500));
        assert_eq!(clamp_seconds(Some(u64::MAX)), Some(i64::MAX));
        assert_eq!(millis(Duration::MAX), i64::MAX);
    }
}
