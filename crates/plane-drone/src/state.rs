//! The drone's SQLite state store: its name, the backends it owns, the outbox of state
//! events, and the Docker images the drone pulled itself (the only ones it may prune).
//!
//! **Architecture invariant:** a status change is recorded here — the outbox row and the
//! backend's new status, in one transaction — before the event is sent to the
//! controller; the outbox row is deleted only when the controller acks it
//! ([`StateStore::record_event`], [`StateStore::ack`]). The schema is versioned by the
//! migrations in `migrations/`, embedded at build time.
//!
//! The database runs in WAL mode with `synchronous=NORMAL`: a committed event survives
//! a crash of the drone process; an OS crash may lose the last events, but it also kills
//! the backends they were about.
//!
//! The watchdog (`crate::watchdog`) reads the same file through
//! [`StateStore::open_read_only`], a read-only connection that never migrates or writes.
//!
//! With an event journal ([`StateStore::with_event_journal`]), every status change is
//! also appended to a file as one JSON line, `{"backend_id", "status", "time"}`, when it
//! is recorded: `scheduled` when a spawn is recorded, then each outbox event once
//! committed. Journal failures are logged, never returned.

use plane_types::lease::LeaseDeadlines;
use plane_types::names::{BackendName, DroneName};
use plane_types::protocol::{BackendEvent, SpawnAction};
use plane_types::status::{BackendStatus, TerminationKind, TerminationReason};
use plane_types::EpochMillis;
use serde::de::DeserializeOwned;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::SqlitePool;
use std::collections::HashSet;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::{error, warn};

use crate::runtime::RuntimeHandle;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

const DRONE_NAME_KEY: &str = "drone_name";

/// Why a state store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The database reported an error.
    #[error("state database error: {0}")]
    Db(#[from] sqlx::Error),
    /// The schema could not be brought up to date.
    #[error("state database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The database's directory could not be created.
    #[error("creating {path}: {source}")]
    Io {
        /// The directory.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A stored value could not be encoded or decoded.
    #[error("corrupt state record: {0}")]
    Corrupt(String),
}

/// A status change about to be recorded; the store assigns the event id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusUpdate {
    /// The new status.
    pub status: BackendStatus,
    /// Where the backend listens, once known.
    pub address: Option<SocketAddr>,
    /// The exit code, on `terminated`.
    pub exit_code: Option<i32>,
    /// Why the backend terminates.
    pub termination_reason: Option<TerminationReason>,
    /// How the backend terminates.
    pub termination_kind: Option<TerminationKind>,
    /// A human-readable detail.
    pub message: Option<String>,
}

impl StatusUpdate {
    /// An update to `status` with no other fields.
    pub fn new(status: BackendStatus) -> StatusUpdate {
        StatusUpdate {
            status,
            address: None,
            exit_code: None,
            termination_reason: None,
            termination_kind: None,
            message: None,
        }
    }
}

/// What the drone knows about one backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendRecord {
    /// The backend.
    pub backend_id: BackendName,
    /// How it was spawned; `None` if only known from a `Terminate` (or undecodable).
    pub spawn: Option<SpawnAction>,
    /// The current lease deadlines (the spawn's, or the last renewal's).
    pub deadlines: Option<LeaseDeadlines>,
    /// The last status recorded.
    pub status: BackendStatus,
    /// Where it listens, once started.
    pub address: Option<SocketAddr>,
    /// How the runtime finds it, once started.
    pub handle: Option<RuntimeHandle>,
    /// Why it terminates, once known.
    pub termination_reason: Option<TerminationReason>,
    /// How it terminates, once known.
    pub termination_kind: Option<TerminationKind>,
}

/// An image the Docker runtime pulled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PulledImage {
    /// The reference as pulled, e.g. `registry/name:tag`.
    pub image: String,
    /// The engine's id of the pulled image (`sha256:…`).
    pub image_id: String,
    /// When it was pulled (drone clock, ms).
    pub pulled_at: EpochMillis,
    /// When a backend was last prepared with it (drone clock, ms).
    pub last_used_at: EpochMillis,
}

/// A handle on the state database; cheap to clone.
#[derive(Clone, Debug)]
pub struct StateStore {
    pool: SqlitePool,
    journal: Option<Arc<EventJournal>>,
}

/// The append-only file of status changes (see the module documentation).
#[derive(Debug)]
struct EventJournal {
    path: PathBuf,
    /// `None` until opened; a failed open is retried at the next line.
    file: Mutex<Option<std::fs::File>>,
}

impl EventJournal {
    fn open(path: &Path) -> std::io::Result<std::fs::File> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::OpenOptions::new().create(true).append(true).open(path)
    }

    /// Appends one line (and flushes it); failures are logged.
    fn append(&self, backend_id: &BackendName, status: BackendStatus, time: i64) {
        let line = serde_json::json!({
            "backend_id": backend_id.as_str(),
            "status": status.as_str(),
            "time": time,
        });
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if file.is_none() {
            match EventJournal::open(&self.path) {
                Ok(f) => *file = Some(f),
                Err(err) => {
                    error!(path = %self.path.display(), %err, %backend_id, %status, "cannot open the event journal; the line is lost");
                    return;
                }
            }
        }
        if let Some(f) = file.as_mut() {
            // One write per line: with O_APPEND, lines of concurrent writers never mix.
            let written = f.write_all(format!("{line}\n").as_bytes());
            if let Err(err) = written {
                error!(path = %self.path.display(), %err, %backend_id, %status, "cannot write to the event journal");
            }
        }
    }
}

pub(crate) fn now_ms() -> EpochMillis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as EpochMillis)
        .unwrap_or(0)
}

fn now_db() -> i64 {
    i64::try_from(now_ms()).unwrap_or(i64::MAX)
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<String, StateError> {
    serde_json::to_string(value).map_err(|e| StateError::Corrupt(format!("encoding: {e}")))
}

/// Decodes an optional JSON column, logging (not failing on) values that no longer parse.
fn from_json_lenient<T: DeserializeOwned>(backend_id: &str, column: &str, value: Option<String>) -> Option<T> {
    let value = value?;
    match serde_json::from_str(&value) {
        Ok(v) => Some(v),
        Err(err) => {
            warn!(%backend_id, column, %err, "undecodable value in the state store; ignoring it");
            None
        }
    }
}

fn parse_lenient<T: FromStr>(backend_id: &str, column: &str, value: Option<String>) -> Option<T> {
    let value = value?;
    match value.parse() {
        Ok(v) => Some(v),
        Err(_) => {
            warn!(%backend_id, column, %value, "unparseable value in the state store; ignoring it");
            None
        }
    }
}

type BackendRow = (
    String,
    Option<String>,
    Option<String>,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
);

const BACKEND_COLUMNS: &str =
    "backend_id, spawn, deadlines, status, address, handle, termination_reason, termination_kind";

fn decode_backend(row: BackendRow) -> Option<BackendRecord> {
    let (id, spawn, deadlines, status, address, handle, reason, kind) = row;
    let backend_id = match BackendName::from_str(&id) {
        Ok(b) => b,
        Err(err) => {
            error!(backend_id = %id, %err, "invalid backend id in the state store; skipping the record");
            return None;
        }
    };
    let status = match BackendStatus::from_str(&status) {
        Ok(s) => s,
        Err(err) => {
            // Treat it as not started: recovery then reports it lost, so it still converges.
            error!(%backend_id, %err, "invalid status in the state store; treating the backend as scheduled");
            BackendStatus::Scheduled
        }
    };
    Some(BackendRecord {
        spawn: from_json_lenient(&id, "spawn", spawn),
        deadlines: from_json_lenient(&id, "deadlines", deadlines),
        status,
        address: parse_lenient(&id, "address", address),
        handle: from_json_lenient(&id, "handle", handle),
        termination_reason: parse_lenient(&id, "termination_reason", reason),
        termination_kind: parse_lenient(&id, "termination_kind", kind),
        backend_id,
    })
}

type EventRow = (
    i64,
    String,
    String,
    Option<String>,
    Option<i64>,
    Option<String>,
    Option<String>,
    Option<String>,
);

fn decode_event(row: EventRow) -> Result<BackendEvent, StateError> {
    let (event_id, id, status, address, exit_code, reason, kind, message) = row;
    let corrupt = |what: &str| StateError::Corrupt(format!("outbox event {event_id}: {what}"));
    Ok(BackendEvent {
        event_id: u64::try_from(event_id).map_err(|_| corrupt("negative id"))?,
        backend_id: BackendName::from_str(&id).map_err(|e| corrupt(&e.to_string()))?,
        status: BackendStatus::from_str(&status).map_err(|e| corrupt(&e))?,
        address: address
            .map(|a| a.parse())
            .transpose()
            .map_err(|_| corrupt("bad address"))?,
        exit_code: exit_code
            .map(i32::try_from)
            .transpose()
            .map_err(|_| corrupt("bad exit code"))?,
        termination_reason: reason.map(|r| r.parse()).transpose().map_err(|e: String| corrupt(&e))?,
        termination_kind: kind.map(|k| k.parse()).transpose().map_err(|e: String| corrupt(&e))?,
        message,
    })
}

impl StateStore {
    /// Opens (creating it and its directory if needed) and migrates the database.
    pub async fn open(path: &Path) -> Result<StateStore, StateError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|source| StateError::Io {
                path: parent.display().to_string(),
                source,
            })?;
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5));
        // One connection: writes are serialized anyway, and event ids are then committed
        // in id order, which the outbox relies on.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options)
            .await?;
        MIGRATOR.run(&pool).await?;
        Ok(StateStore { pool, journal: None })
    }

    /// Opens an existing database read-only, for a reader beside the drone (the
    /// watchdog): no migration, no file created, no write; in WAL mode its reads never
    /// block the drone's writes. Its one connection is kept open for good, so a database
    /// deleted meanwhile is still read as it was.
    pub async fn open_read_only(path: &Path) -> Result<StateStore, StateError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .read_only(true)
            .create_if_missing(false)
            .busy_timeout(Duration::from_secs(1));
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .idle_timeout(None)
            .max_lifetime(None)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await?;
        Ok(StateStore { pool, journal: None })
    }

    /// The same store, also appending each status change to the journal at `path`
    /// (created if missing, appended to otherwise). A journal that cannot be opened is
    /// logged, and opening it is tried again at the next line.
    pub fn with_event_journal(mut self, path: &Path) -> StateStore {
        let file = match EventJournal::open(path) {
            Ok(file) => Some(file),
            Err(err) => {
                error!(path = %path.display(), %err, "cannot open the event journal; will retry at the next status change");
                None
            }
        };
        self.journal = Some(Arc::new(EventJournal {
            path: path.to_owned(),
            file: Mutex::new(file),
        }));
        self
    }

    fn journal(&self, backend_id: &BackendName, status: BackendStatus, time: i64) {
        if let Some(journal) = &self.journal {
            journal.append(backend_id, status, time);
        }
    }

    /// Closes the database (checkpointing the WAL).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// The drone name stored by an earlier run.
    pub async fn drone_name(&self) -> Result<Option<DroneName>, StateError> {
        let value: Option<(String,)> = sqlx::query_as("SELECT value FROM meta WHERE key = ?")
            .bind(DRONE_NAME_KEY)
            .fetch_optional(&self.pool)
            .await?;
        value
            .map(|(v,)| {
                v.parse()
                    .map_err(|e| StateError::Corrupt(format!("stored drone name {v:?}: {e}")))
            })
            .transpose()
    }

    /// Stores the drone name.
    pub async fn set_drone_name(&self, name: &DroneName) -> Result<(), StateError> {
        sqlx::query(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        )
        .bind(DRONE_NAME_KEY)
        .bind(name.as_str())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records a newly spawned backend with status `scheduled`. Returns false (and
    /// changes nothing) if the backend is already known.
    pub async fn insert_backend(&self, spawn: &SpawnAction) -> Result<bool, StateError> {
        let now = now_db();
        let result = sqlx::query(
            "INSERT INTO backends (backend_id, spawn, deadlines, status, created_at, updated_at)
             VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(backend_id) DO NOTHING",
        )
        .bind(spawn.backend_id.as_str())
        .bind(to_json(spawn)?)
        .bind(to_json(&spawn.deadlines)?)
        .bind(BackendStatus::Scheduled.as_str())
        .bind(now)
        .bind(now)
        .execute(&self.pool)
        .await?;
        let inserted = result.rows_affected() == 1;
        if inserted {
            self.journal(&spawn.backend_id, BackendStatus::Scheduled, now);
        }
        Ok(inserted)
    }

    /// The record of one backend.
    pub async fn backend(&self, backend_id: &BackendName) -> Result<Option<BackendRecord>, StateError> {
        let row: Option<BackendRow> =
            sqlx::query_as(&format!("SELECT {BACKEND_COLUMNS} FROM backends WHERE backend_id = ?"))
                .bind(backend_id.as_str())
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.and_then(decode_backend))
    }

    /// Every backend not yet `terminated`.
    pub async fn live_backends(&self) -> Result<Vec<BackendRecord>, StateError> {
        let rows: Vec<BackendRow> = sqlx::query_as(&format!(
            "SELECT {BACKEND_COLUMNS} FROM backends WHERE status != ? ORDER BY created_at, backend_id"
        ))
        .bind(BackendStatus::Terminated.as_str())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().filter_map(decode_backend).collect())
    }

    /// The ids of every backend with a record, terminated ones included.
    pub async fn backend_ids(&self) -> Result<HashSet<BackendName>, StateError> {
        let rows: Vec<(String,)> = sqlx::query_as("SELECT backend_id FROM backends")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(id,)| match BackendName::from_str(&id) {
                Ok(b) => Some(b),
                Err(err) => {
                    error!(backend_id = %id, %err, "invalid backend id in the state store; skipping the record");
                    None
                }
            })
            .collect())
    }

    /// Records that the drone pulled `image` (now `image_id`), and uses it now.
    pub async fn record_pulled_image(&self, image: &str, image_id: &str) -> Result<(), StateError> {
        let now = now_db();
        sqlx::query(
            "INSERT INTO docker_images (image, image_id, pulled_at, last_used_at) VALUES (?, ?, ?, ?)
             ON CONFLICT(image) DO UPDATE SET image_id = excluded.image_id, pulled_at = excluded.pulled_at,
                                              last_used_at = excluded.last_used_at",
        )
        .bind(image)
        .bind(image_id)
        .bind(now)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Notes that a backend uses `image` now, if the drone pulled it (else nothing).
    pub async fn touch_pulled_image(&self, image: &str) -> Result<(), StateError> {
        sqlx::query("UPDATE docker_images SET last_used_at = ? WHERE image = ?")
            .bind(now_db())
            .bind(image)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Every image the drone pulled and has not forgotten.
    pub async fn pulled_images(&self) -> Result<Vec<PulledImage>, StateError> {
        let rows: Vec<(String, String, i64, i64)> =
            sqlx::query_as("SELECT image, image_id, pulled_at, last_used_at FROM docker_images ORDER BY image")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows
            .into_iter()
            .map(|(image, image_id, pulled_at, last_used_at)| PulledImage {
                image,
                image_id,
                pulled_at: u64::try_from(pulled_at).unwrap_or(0),
                last_used_at: u64::try_from(last_used_at).unwrap_or(0),
            })
            .collect())
    }

    /// Forgets a pulled image (it was removed, or is no longer the drone's). Only the
    /// record with this `image_id` is removed, so a concurrent re-pull is kept.
    pub async fn forget_pulled_image(&self, image: &str, image_id: &str) -> Result<(), StateError> {
        sqlx::query("DELETE FROM docker_images WHERE image = ? AND image_id = ?")
            .bind(image)
            .bind(image_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Stores how the runtime finds a started backend.
    pub async fn set_handle(
        &self,
        backend_id: &BackendName,
        handle: &RuntimeHandle,
        address: SocketAddr,
    ) -> Result<(), StateError> {
        sqlx::query("UPDATE backends SET handle = ?, address = ?, updated_at = ? WHERE backend_id = ?")
            .bind(to_json(handle)?)
            .bind(address.to_string())
            .bind(now_db())
            .bind(backend_id.as_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Stores renewed lease deadlines.
    pub async fn set_deadlines(&self, backend_id: &BackendName, deadlines: &LeaseDeadlines) -> Result<(), StateError> {
        sqlx::query("UPDATE backends SET deadlines = ?, updated_at = ? WHERE backend_id = ?")
            .bind(to_json(deadlines)?)
            .bind(now_db())
            .bind(backend_id.as_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records a status change: appends it to the outbox and updates the backend's record
    /// (creating a bare record for a backend known only from this event), atomically.
    /// Returns the event to send, with its new id.
    pub async fn record_event(
        &self,
        backend_id: &BackendName,
        update: &StatusUpdate,
    ) -> Result<BackendEvent, StateError> {
        let now = now_db();
        let address = update.address.map(|a| a.to_string());
        let reason = update.termination_reason.map(|r| r.as_str());
        let kind = update.termination_kind.map(|k| k.as_str());
        let mut tx = self.pool.begin().await?;
        let (event_id,): (i64,) = sqlx::query_as(
            "INSERT INTO outbox (backend_id, status, address, exit_code, termination_reason, termination_kind,
                                 message, created_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING event_id",
        )
        .bind(backend_id.as_str())
        .bind(update.status.as_str())
        .bind(&address)
        .bind(update.exit_code)
        .bind(reason)
        .bind(kind)
        .bind(&update.message)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO backends (backend_id, status, address, termination_reason, termination_kind,
                                   created_at, updated_at)
             VALUES (?, ?, ?, ?, ?, ?, ?)
             ON CONFLICT(backend_id) DO UPDATE SET
                 status = excluded.status,
                 address = COALESCE(excluded.address, backends.address),
                 termination_reason = COALESCE(excluded.termination_reason, backends.termination_reason),
                 termination_kind = COALESCE(excluded.termination_kind, backends.termination_kind),
                 updated_at = excluded.updated_at",
        )
        .bind(backend_id.as_str())
        .bind(update.status.as_str())
        .bind(&address)
        .bind(reason)
        .bind(kind)
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.journal(backend_id, update.status, now);
        Ok(BackendEvent {
            event_id: u64::try_from(event_id).map_err(|_| StateError::Corrupt(format!("event id {event_id}")))?,
            backend_id: backend_id.clone(),
            status: update.status,
            address: update.address,
            exit_code: update.exit_code,
            termination_reason: update.termination_reason,
            termination_kind: update.termination_kind,
            message: update.message.clone(),
        })
    }

    /// Every event not yet acked, in `event_id` order. Rows that no longer decode are
    /// logged and left out.
    pub async fn unacked_events(&self) -> Result<Vec<BackendEvent>, StateError> {
        let rows: Vec<EventRow> = sqlx::query_as(
            "SELECT event_id, backend_id, status, address, exit_code, termination_reason, termination_kind, message
             FROM outbox ORDER BY event_id",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|row| match decode_event(row) {
                Ok(e) => Some(e),
                Err(err) => {
                    error!(%err, "skipping an undecodable outbox event");
                    None
                }
            })
            .collect())
    }

    /// Removes an acked event from the outbox. Returns whether it was there.
    pub async fn ack(&self, event_id: u64) -> Result<bool, StateError> {
        let Ok(id) = i64::try_from(event_id) else {
            return Ok(false);
        };
        let result = sqlx::query("DELETE FROM outbox WHERE event_id = ?")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(result.rows_affected() > 0)
    }

    /// Forgets backends terminated before `before` (drone clock, ms) whose events are all
    /// acked. Returns how many were removed.
    pub async fn prune_terminated(&self, before: EpochMillis) -> Result<u64, StateError> {
        let result = sqlx::query(
            "DELETE FROM backends WHERE status = ? AND updated_at < ?
             AND backend_id NOT IN (SELECT backend_id FROM outbox)",
        )
        .bind(BackendStatus::Terminated.as_str())
        .bind(i64::try_from(before).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::process::ProcessHandle;
    use crate::test_util::{spawn_action, TempDir};

    #[tokio::test]
    async fn events_survive_reopening_until_acked() {
        let dir = TempDir::new("state-events");
        let path = dir.path().join("nested/dir/drone.db");
        let b1: BackendName = "b1".parse().unwrap();
        let b2: BackendName = "b2".parse().unwrap();
        let store = StateStore::open(&path).await.unwrap();
        let e1 = store
            .record_event(&b1, &StatusUpdate::new(BackendStatus::Loading))
            .await
            .unwrap();
        let mut update = StatusUpdate::new(BackendStatus::Terminated);
        update.exit_code = Some(-3);
        update.termination_reason = Some(TerminationReason::Lost);
        update.termination_kind = Some(TerminationKind::Hard);
        update.message = Some("gone".into());
        update.address = Some("127.0.0.1:9".parse().unwrap());
        let e2 = store.record_event(&b2, &update).await.unwrap();
        let e3 = store
            .record_event(&b1, &StatusUpdate::new(BackendStatus::Starting))
            .await
            .unwrap();
        assert!(e1.event_id < e2.event_id && e2.event_id < e3.event_id);
        store.close().await;

        let store = StateStore::open(&path).await.unwrap();
        assert_eq!(
            store.unacked_events().await.unwrap(),
            vec![e1.clone(), e2.clone(), e3.clone()]
        );
        assert!(store.ack(e2.event_id).await.unwrap());
        assert!(!store.ack(e2.event_id).await.unwrap());
        assert!(!store.ack(u64::MAX).await.unwrap());
        assert_eq!(store.unacked_events().await.unwrap(), vec![e1.clone(), e3.clone()]);
        store.ack(e3.event_id).await.unwrap();
        store.close().await;

        // Ids keep increasing after the newest rows were deleted and the file reopened.
        let store = StateStore::open(&path).await.unwrap();
        assert_eq!(store.unacked_events().await.unwrap(), vec![e1.clone()]);
        let e4 = store
            .record_event(&b1, &StatusUpdate::new(BackendStatus::Waiting))
            .await
            .unwrap();
        assert!(e4.event_id > e3.event_id);
    }

    #[tokio::test]
    async fn backend_records_round_trip() {
        let dir = TempDir::new("state-backends");
        let path = dir.path().join("drone.db");
        let store = StateStore::open(&path).await.unwrap();
        let deadlines = LeaseDeadlines {
            renew_at: 10,
            soft_terminate_at: 20,
            hard_terminate_at: 30,
        };
        let spawn = spawn_action("b1", &["sleep", "1"], deadlines);
        assert!(store.insert_backend(&spawn).await.unwrap());
        assert!(
            !store.insert_backend(&spawn).await.unwrap(),
            "duplicate spawns are not recorded twice"
        );
        let handle = RuntimeHandle::Process(ProcessHandle {
            pid: 1234,
            start_time: 99,
        });
        let addr: SocketAddr = "127.0.0.1:4567".parse().unwrap();
        store.set_handle(&spawn.backend_id, &handle, addr).await.unwrap();
        let renewed = LeaseDeadlines {
            renew_at: 100,
            soft_terminate_at: 200,
            hard_terminate_at: 300,
        };
        store.set_deadlines(&spawn.backend_id, &renewed).await.unwrap();
        let mut update = StatusUpdate::new(BackendStatus::Terminating);
        update.termination_reason = Some(TerminationReason::Swept);
        update.termination_kind = Some(TerminationKind::Soft);
        store.record_event(&spawn.backend_id, &update).await.unwrap();
        store.close().await;

        let store = StateStore::open(&path).await.unwrap();
        let expected = BackendRecord {
            backend_id: spawn.backend_id.clone(),
            spawn: Some(spawn.clone()),
            deadlines: Some(renewed),
            status: BackendStatus::Terminating,
            address: Some(addr),
            handle: Some(handle),
            termination_reason: Some(TerminationReason::Swept),
            termination_kind: Some(TerminationKind::Soft),
        };
        assert_eq!(store.backend(&spawn.backend_id).await.unwrap(), Some(expected.clone()));
        assert_eq!(store.live_backends().await.unwrap(), vec![expected]);

        // A Terminate-only backend gets a bare record; terminated ones are not live.
        let lost: BackendName = "lost1".parse().unwrap();
        let mut update = StatusUpdate::new(BackendStatus::Terminated);
        update.termination_reason = Some(TerminationReason::Lost);
        store.record_event(&lost, &update).await.unwrap();
        let record = store.backend(&lost).await.unwrap().unwrap();
        assert_eq!(record.spawn, None);
        assert_eq!(record.status, BackendStatus::Terminated);
        assert_eq!(store.live_backends().await.unwrap().len(), 1);
        // Pruning keeps records whose events are unacked.
        assert_eq!(store.prune_terminated(u64::MAX).await.unwrap(), 0);
        for e in store.unacked_events().await.unwrap() {
            store.ack(e.event_id).await.unwrap();
        }
        assert_eq!(store.prune_terminated(u64::MAX).await.unwrap(), 1);
        assert_eq!(store.backend(&lost).await.unwrap(), None);
    }

    #[tokio::test]
    async fn pulled_images_and_backend_ids() {
        let dir = TempDir::new("state-images");
        let store = StateStore::open(&dir.path().join("drone.db")).await.unwrap();
        assert!(store.pulled_images().await.unwrap().is_empty());
        store.record_pulled_image("reg/a:1", "sha256:aa").await.unwrap();
        store.record_pulled_image("reg/b:1", "sha256:bb").await.unwrap();
        // Touching an image the drone did not pull records nothing.
        store.touch_pulled_image("reg/other:1").await.unwrap();
        store.touch_pulled_image("reg/a:1").await.unwrap();
        let images = store.pulled_images().await.unwrap();
        assert_eq!(
            images
                .iter()
                .map(|i| (i.image.as_str(), i.image_id.as_str()))
                .collect::<Vec<_>>(),
            vec![("reg/a:1", "sha256:aa"), ("reg/b:1", "sha256:bb")]
        );
        assert!(images[0].last_used_at >= images[0].pulled_at);
        // A re-pull replaces the id; forgetting the old id then keeps the new record.
        store.record_pulled_image("reg/a:1", "sha256:a2").await.unwrap();
        store.forget_pulled_image("reg/a:1", "sha256:aa").await.unwrap();
        store.forget_pulled_image("reg/b:1", "sha256:bb").await.unwrap();
        let images = store.pulled_images().await.unwrap();
        assert_eq!(images.len(), 1);
        assert_eq!(images[0].image_id, "sha256:a2");

        assert!(store.backend_ids().await.unwrap().is_empty());
        store
            .insert_backend(&spawn_action("b1", &["sleep", "1"], crate::test_util::far_deadlines()))
            .await
            .unwrap();
        let mut update = StatusUpdate::new(BackendStatus::Terminated);
        update.termination_reason = Some(TerminationReason::Lost);
        store.record_event(&"b2".parse().unwrap(), &update).await.unwrap();
        let ids = store.backend_ids().await.unwrap();
        assert_eq!(ids, HashSet::from(["b1".parse().unwrap(), "b2".parse().unwrap()]));
    }

    #[tokio::test]
    async fn the_event_journal_gets_one_line_per_status_change() {
        let dir = TempDir::new("state-journal");
        let journal = dir.path().join("journal/events.jsonl");
        let path = dir.path().join("drone.db");
        let store = StateStore::open(&path).await.unwrap().with_event_journal(&journal);
        let spawn = spawn_action("j1", &["sleep", "1"], crate::test_util::far_deadlines());
        assert!(store.insert_backend(&spawn).await.unwrap());
        assert!(
            !store.insert_backend(&spawn).await.unwrap(),
            "a duplicate spawn is no change"
        );
        for status in [BackendStatus::Loading, BackendStatus::HardTerminating] {
            store
                .record_event(&spawn.backend_id, &StatusUpdate::new(status))
                .await
                .unwrap();
        }
        store.close().await;
        // A restarted drone appends.
        let store = StateStore::open(&path).await.unwrap().with_event_journal(&journal);
        let mut update = StatusUpdate::new(BackendStatus::Terminated);
        update.termination_reason = Some(TerminationReason::Lost);
        store.record_event(&spawn.backend_id, &update).await.unwrap();

        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&journal)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let statuses: Vec<&str> = lines.iter().map(|l| l["status"].as_str().unwrap()).collect();
        assert_eq!(statuses, ["scheduled", "loading", "hard-terminating", "terminated"]);
        for line in &lines {
            assert_eq!(line.as_object().unwrap().len(), 3, "{line}");
            assert_eq!(line["backend_id"], "j1");
        }
        let times: Vec<u64> = lines.iter().map(|l| l["time"].as_u64().unwrap()).collect();
        assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
        assert!(times[0] > 1_600_000_000_000, "epoch ms: {times:?}");
    }

    #[tokio::test]
    async fn a_journal_that_cannot_be_written_is_not_fatal() {
        let dir = TempDir::new("state-journal-bad");
        // A directory where the file should be: opening it fails, every time.
        let journal = dir.path().join("journal");
        std::fs::create_dir_all(&journal).unwrap();
        let store = StateStore::open(&dir.path().join("drone.db"))
            .await
            .unwrap()
            .with_event_journal(&journal);
        let spawn = spawn_action("j2", &["sleep", "1"], crate::test_util::far_deadlines());
        assert!(store.insert_backend(&spawn).await.unwrap());
        let event = store
            .record_event(&spawn.backend_id, &StatusUpdate::new(BackendStatus::Loading))
            .await
            .unwrap();
        assert_eq!(store.unacked_events().await.unwrap(), vec![event]);
    }

    #[tokio::test]
    async fn a_read_only_store_reads_and_never_writes() {
        let dir = TempDir::new("state-ro");
        let path = dir.path().join("drone.db");
        assert!(
            StateStore::open_read_only(&path).await.is_err(),
            "a missing database is not created"
        );
        assert!(!path.exists());
        let store = StateStore::open(&path).await.unwrap();
        let spawn = spawn_action("ro1", &["sleep", "1"], crate::test_util::far_deadlines());
        store.insert_backend(&spawn).await.unwrap();
        // Closed: the WAL is checkpointed and its files removed; it still opens.
        store.close().await;
        let reader = StateStore::open_read_only(&path).await.unwrap();
        assert_eq!(reader.live_backends().await.unwrap().len(), 1);
        let store = StateStore::open(&path).await.unwrap();
        assert!(reader
            .insert_backend(&spawn_action("ro2", &["x"], spawn.deadlines))
            .await
            .is_err());
        // The writer is not blocked by the reader, and the reader sees its changes.
        let renewed = LeaseDeadlines {
            renew_at: 1,
            soft_terminate_at: 2,
            hard_terminate_at: 3,
        };
        store.set_deadlines(&spawn.backend_id, &renewed).await.unwrap();
        assert_eq!(
            reader.backend(&spawn.backend_id).await.unwrap().unwrap().deadlines,
            Some(renewed)
        );
    }

    #[tokio::test]
    async fn drone_name_persists() {
        let dir = TempDir::new("state-name");
        let path = dir.path().join("drone.db");
        let store = StateStore::open(&path).await.unwrap();
        assert_eq!(store.drone_name().await.unwrap(), None);
        let name = DroneName::new_random();
        store.set_drone_name(&name).await.unwrap();
        store.close().await;
        let store = StateStore::open(&path).await.unwrap();
        assert_eq!(store.drone_name().await.unwrap(), Some(name));
    }
}
