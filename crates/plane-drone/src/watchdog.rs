//! The drone watchdog (`plane drone-watchdog`): a process beside the drone that kills a
//! backend once its key lease's hard deadline has passed and nobody stopped it.
//!
//! The drone renews each backend's key lease and, when renewal fails, hard-terminates the
//! backend at its hard deadline, before the store lets the key move on. But backends
//! outlive their drone: if the drone process is down (killed, crashed) past the lease
//! expiry, its backends keep running while the key gets a new backend elsewhere. The
//! watchdog closes that hole.
//!
//! * Every `poll_interval` (250 ms; sooner when a kill time comes up earlier) it reads
//!   the drone's state database through a read-only connection
//!   ([`StateStore::open_read_only`]: no migration, no write, no writer lock) and looks
//!   at every backend not recorded `terminated`.
//! * A backend is killed once the drone clock (same machine: the watchdog's clock) passes
//!   its stored `hard_terminate_at` plus a slack ([`kill_time`]): a tenth of the step
//!   from the soft to the hard deadline, at most `max_slack` (250 ms). The store expires
//!   the lease one such step (a sixth of the lease, 10 s by default, 500 ms in tests)
//!   after the hard deadline, so the watchdog acts well before the key can move, yet
//!   after a drone that is alive but cannot renew has killed the backend itself.
//! * Killing reuses the runtimes: [`Runtime::adopt`] says whether the backend still
//!   runs (a process: pid and `/proc` start time match and it leads its process group;
//!   a container: it carries this drone's and this backend's labels and runs), then
//!   [`Runtime::signal`] sends SIGKILL (to the whole process group; `docker kill`).
//!   A backend whose container id was never recorded is looked up by its container
//!   name; a process whose pid was never recorded cannot be found, which is logged.
//! * Every kill is logged with its cause. Nothing is reported to the controller: the
//!   drone reports `lost` or `terminated` when it comes back, and the controller marks
//!   the backend lost once the lease expired anyway.
//! * While the drone is alive and renewing, deadlines keep moving forward, so the
//!   watchdog finds nothing to kill.
//!
//! Lock files next to the state database `<db>` tell the two about each other:
//! * `<db>.watchdog.lock`: the watchdog holds an exclusive `flock` on it for its lifetime
//!   and writes its pid in it; a second watchdog for the same database exits at once.
//!   [`launch`] (used by `plane drone`) starts a watchdog only if none holds it.
//! * `<db>.drone.lock`: every running drone holds a shared `flock` on it
//!   ([`DroneLock`], taken by [`crate::run`]); [`drone_running`] probes it.
//!
//! **Exit rule:** the watchdog exits once, for `exit_after` (60 s) in a row, no drone has
//! held the drone lock and no backend needs watching — every backend the database
//! records as live is past its kill time and seen not running (killed, or gone), or
//! cannot be found. Before it exits it releases its own lock and probes the drone lock
//! once more: a drone that started meanwhile (and may have seen the watchdog's lock
//! held, and so started none) keeps it running.

use crate::config::{DockerRuntimeConfig, ProcessRuntimeConfig};
use crate::runtime::docker::{DockerHandle, DockerRuntime};
use crate::runtime::process::ProcessRuntime;
use crate::runtime::{Adoption, Runtime, RuntimeHandle, StopSignal};
use crate::state::{now_ms, BackendRecord, StateStore};
use anyhow::Context as _;
use plane_types::executable::RuntimeKind;
use plane_types::lease::LeaseDeadlines;
use plane_types::names::{BackendName, DroneName};
use plane_types::status::BackendStatus;
use plane_types::EpochMillis;
use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read as _};
use std::os::unix::fs::{FileExt as _, MetadataExt as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How often the state database is read, by default.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(250);
/// How long the watchdog stays with no drone and nothing to watch, by default.
pub const DEFAULT_EXIT_AFTER: Duration = Duration::from_secs(60);
/// The largest slack after a hard deadline, by default.
pub const DEFAULT_MAX_SLACK: Duration = Duration::from_millis(250);

/// The slack is this fraction (1/n) of the step from the soft to the hard deadline.
const SLACK_DIVISOR: u64 = 10;
/// A backend killed but still seen running is sent SIGKILL again this often.
const RESEND_KILL_AFTER: Duration = Duration::from_secs(1);
/// The same failure is logged at most this often per backend.
const ERROR_LOG_EVERY: Duration = Duration::from_secs(5);
/// How long one runtime call (an engine request) may take.
const RUNTIME_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long after a failed connection to the Docker engine it is tried again.
const DOCKER_RETRY: Duration = Duration::from_secs(2);
/// How long [`launch`] waits for the new watchdog to hold its lock.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`DroneLock::acquire`] waits out a probe of the lock.
const DRONE_LOCK_WAIT: Duration = Duration::from_secs(2);
/// How long a starting watchdog waits out a probe of its lock (a probe holds it for
/// microseconds; another watchdog, for its whole life).
const PROBE_WAIT: Duration = Duration::from_millis(50);

/// What the watchdog watches and how.
#[derive(Clone, Debug)]
pub struct WatchdogConfig {
    /// The drone's state database.
    pub db_path: PathBuf,
    /// The Docker engine of the drone's containers (`None`: `DOCKER_HOST`, else the
    /// local socket); connected to only when a container is to be killed.
    pub docker_host: Option<String>,
    /// How often the database is read.
    pub poll_interval: Duration,
    /// The watchdog exits after this long with no drone and nothing to watch.
    pub exit_after: Duration,
    /// The slack after a hard deadline is at most this.
    pub max_slack: Duration,
}

impl WatchdogConfig {
    /// The defaults for the database at `db_path`.
    pub fn new(db_path: impl Into<PathBuf>) -> WatchdogConfig {
        WatchdogConfig {
            db_path: db_path.into(),
            docker_host: None,
            poll_interval: DEFAULT_POLL_INTERVAL,
            exit_after: DEFAULT_EXIT_AFTER,
            max_slack: DEFAULT_MAX_SLACK,
        }
    }
}

/// The drone clock time after which a backend with these deadlines is killed:
/// `hard_terminate_at` plus a tenth of `hard_terminate_at - soft_terminate_at`, at most
/// `max_slack`.
pub fn kill_time(deadlines: &LeaseDeadlines, max_slack: Duration) -> EpochMillis {
    let step = deadlines.hard_terminate_at.saturating_sub(deadlines.soft_terminate_at);
    let slack = (step / SLACK_DIVISOR).min(max_slack.as_millis() as u64);
    deadlines.hard_terminate_at.saturating_add(slack)
}

fn sibling(db: &Path, suffix: &str) -> PathBuf {
    let mut name = db
        .file_name()
        .map(OsString::from)
        .unwrap_or_else(|| OsString::from("plane-drone.db"));
    name.push(suffix);
    db.with_file_name(name)
}

/// `<db>.watchdog.lock`: held by the watchdog, with its pid in it.
pub fn watchdog_lock_path(db: &Path) -> PathBuf {
    sibling(db, ".watchdog.lock")
}

/// `<db>.drone.lock`: held (shared) by every running drone.
pub fn drone_lock_path(db: &Path) -> PathBuf {
    sibling(db, ".drone.lock")
}

/// `<db>.watchdog.log`: the output of a watchdog started by [`launch`].
pub fn watchdog_log_path(db: &Path) -> PathBuf {
    sibling(db, ".watchdog.log")
}

/// `flock(2)` locks through `std`: false when another open file holds a conflicting one.
mod flock {
    use std::fs::{File, TryLockError};
    use std::io;

    fn tried(r: Result<(), TryLockError>) -> io::Result<bool> {
        match r {
            Ok(()) => Ok(true),
            Err(TryLockError::WouldBlock) => Ok(false),
            Err(TryLockError::Error(err)) => Err(err),
        }
    }

    /// Takes an exclusive lock; false if another open file holds a lock.
    pub fn try_exclusive(file: &File) -> io::Result<bool> {
        tried(file.try_lock())
    }

    /// Takes a shared lock; false if another open file holds an exclusive one.
    pub fn try_shared(file: &File) -> io::Result<bool> {
        tried(file.try_lock_shared())
    }

    /// Releases the lock this open file holds.
    pub fn unlock(file: &File) -> io::Result<()> {
        file.unlock()
    }
}

/// Opens (creating it and its directory) a lock file, without truncating what is in it.
fn open_lock_file(path: &Path) -> io::Result<File> {
    create_parent(path)?;
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
}

fn create_parent(path: &Path) -> io::Result<()> {
    match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) => std::fs::create_dir_all(parent),
        None => Ok(()),
    }
}

/// Whether the lock file at `path` is locked by someone; `Ok(false)` if it is missing.
fn is_locked(path: &Path) -> io::Result<Option<File>> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err),
    };
    if flock::try_exclusive(&file)? {
        flock::unlock(&file)?;
        return Ok(None);
    }
    Ok(Some(file))
}

/// A running drone's shared lock on `<db>.drone.lock`, released when dropped (or when
/// the process dies, however it dies).
#[derive(Debug)]
pub struct DroneLock {
    _file: File,
}

impl DroneLock {
    /// Takes the lock (creating the file and its directory). Several drones may hold it
    /// at once; a watchdog's probe holds it exclusively for an instant, which this waits
    /// out.
    pub async fn acquire(db: &Path) -> io::Result<DroneLock> {
        let path = drone_lock_path(db);
        let file = open_lock_file(&path)?;
        let deadline = Instant::now() + DRONE_LOCK_WAIT;
        loop {
            if flock::try_shared(&file)? {
                return Ok(DroneLock { _file: file });
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!("{} stays locked exclusively", path.display()),
                ));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// Whether a drone holds the drone lock of the database at `db`.
pub fn drone_running(db: &Path) -> io::Result<bool> {
    Ok(is_locked(&drone_lock_path(db))?.is_some())
}

/// A watchdog that holds its lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunningWatchdog {
    /// Its pid, once it has written it.
    pub pid: Option<u32>,
}

/// The watchdog of the database at `db`, if one runs.
pub fn running_watchdog(db: &Path) -> io::Result<Option<RunningWatchdog>> {
    let Some(mut file) = is_locked(&watchdog_lock_path(db))? else {
        return Ok(None);
    };
    let mut text = String::new();
    file.read_to_string(&mut text)?;
    Ok(Some(RunningWatchdog {
        pid: text.trim().parse().ok(),
    }))
}

/// What [`launch`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launched {
    /// A new watchdog runs, with this pid.
    Started {
        /// Its pid.
        pid: u32,
    },
    /// A watchdog was running for this database already.
    AlreadyRunning {
        /// Its pid, if it has written it yet.
        pid: Option<u32>,
    },
}

/// Starts `<program> drone-watchdog --db <db> <args…>` unless a watchdog holds the lock
/// of `db` already: in a session of its own (`setsid`, so neither a terminal nor the
/// drone's process group takes it down), stdin `/dev/null`, stdout and stderr appended
/// to [`watchdog_log_path`]. Returns once the new watchdog holds its lock. The child is
/// reaped in the background if it exits while the caller runs; it keeps running when
/// the caller dies.
///
/// The caller should hold its [`DroneLock`] first: a watchdog about to exit rechecks the
/// drone lock after releasing its own, so one of the two always sees the other.
pub async fn launch(program: &Path, db: &Path, args: &[OsString]) -> io::Result<Launched> {
    if let Some(running) = running_watchdog(db)? {
        return Ok(Launched::AlreadyRunning { pid: running.pid });
    }
    let db = std::path::absolute(db)?;
    create_parent(&db)?;
    let log_path = watchdog_log_path(&db);
    let log = OpenOptions::new().create(true).append(true).open(&log_path)?;
    let mut command = std::process::Command::new(program);
    command
        .arg("drone-watchdog")
        .arg("--db")
        .arg(&db)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: the closure runs in the child between fork and exec and only calls
    // setsid(2), which is async-signal-safe and allocates nothing.
    unsafe {
        command.pre_exec(|| nix::unistd::setsid().map(|_| ()).map_err(io::Error::from));
    }
    let mut child = command.spawn()?;
    let pid = child.id();
    let deadline = Instant::now() + LAUNCH_TIMEOUT;
    let result = loop {
        match running_watchdog(&db)? {
            Some(RunningWatchdog { pid: Some(holder) }) if holder == pid => break Ok(Launched::Started { pid }),
            // Another drone's watchdog won the race; ours exits by itself.
            Some(RunningWatchdog { pid: Some(holder) }) => break Ok(Launched::AlreadyRunning { pid: Some(holder) }),
            _ => {}
        }
        if let Some(status) = child.try_wait()? {
            if let Some(running) = running_watchdog(&db)? {
                break Ok(Launched::AlreadyRunning { pid: running.pid });
            }
            break Err(io::Error::other(format!(
                "the watchdog exited at once ({status}); see {}",
                log_path.display()
            )));
        }
        if Instant::now() > deadline {
            break Err(io::Error::other(format!(
                "the watchdog (pid {pid}) did not take its lock within {LAUNCH_TIMEOUT:?}; see {}",
                log_path.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    // Reaps it if it exits while this process runs (no zombie stays behind).
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    result
}

/// The watchdog's own lock.
struct WatchdogLock {
    file: File,
    held: bool,
}

impl WatchdogLock {
    fn open(db: &Path) -> io::Result<WatchdogLock> {
        let file = open_lock_file(&watchdog_lock_path(db))?;
        Ok(WatchdogLock { file, held: false })
    }

    /// Takes the lock and writes this process's pid in the file; false if another
    /// watchdog holds it. A probe (`is_locked`, run by a starting drone) also holds it
    /// for an instant, so a refusal is retried for a little while: a real holder keeps
    /// it throughout.
    async fn try_lock(&mut self) -> io::Result<bool> {
        let deadline = Instant::now() + PROBE_WAIT;
        while !flock::try_exclusive(&self.file)? {
            if Instant::now() > deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        self.held = true;
        self.file.set_len(0)?;
        self.file
            .write_all_at(format!("{}\n", std::process::id()).as_bytes(), 0)?;
        Ok(true)
    }

    fn release(&mut self) {
        if self.held {
            let _ = self.file.set_len(0);
            let _ = flock::unlock(&self.file);
            self.held = false;
        }
    }
}

/// Runs the watchdog of `config.db_path` until its exit rule holds (see the module
/// documentation) or `shutdown` is cancelled. Returns at once if another watchdog
/// watches that database. Fails only if the lock file cannot be created or locked.
pub async fn run(config: WatchdogConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let db = config.db_path.clone();
    let mut lock = WatchdogLock::open(&db).with_context(|| format!("opening {}", watchdog_lock_path(&db).display()))?;
    if !lock.try_lock().await.context("locking the watchdog lock file")? {
        let pid = running_watchdog(&db).ok().flatten().and_then(|w| w.pid);
        info!(db = %db.display(), ?pid, "another watchdog watches this state database; exiting");
        return Ok(());
    }
    info!(
        db = %db.display(),
        pid = std::process::id(),
        poll_interval = ?config.poll_interval,
        exit_after = ?config.exit_after,
        "watchdog started"
    );
    let mut watchdog = Watchdog::new(config.clone(), shutdown.child_token())?;
    let mut idle_since: Option<Instant> = None;
    let result = loop {
        let drone = match drone_running(&db) {
            Ok(running) => running,
            Err(err) => {
                watchdog.log_error("drone-lock", &format!("cannot probe the drone lock: {err}"));
                // Unknown: assume a drone runs, which only delays exiting.
                true
            }
        };
        let tick = watchdog.tick(drone).await;
        let mut wake = Instant::now() + config.poll_interval;
        if let Some(at) = tick.next_kill_at {
            wake = wake.min(instant_at(at));
        }
        if tick.busy || drone {
            idle_since = None;
        } else {
            let since = *idle_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= config.exit_after {
                lock.release();
                if drone_running(&db).unwrap_or(true) {
                    // A drone started meanwhile; it may have seen this watchdog's lock and
                    // started none, so stay (unless a new watchdog took over already).
                    if !lock.try_lock().await.unwrap_or(false) {
                        info!("another watchdog took over; exiting");
                        break Ok(());
                    }
                    idle_since = None;
                } else {
                    info!(
                        idle = ?config.exit_after,
                        "no drone has run and no backend has needed watching for a while; exiting"
                    );
                    break Ok(());
                }
            } else {
                wake = wake.min(since + config.exit_after);
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => {
                info!("watchdog stopping");
                break Ok(());
            }
            _ = tokio::time::sleep_until(wake) => {}
        }
    };
    watchdog.close().await;
    lock.release();
    result
}

/// The `tokio` instant at which the wall clock reads `at` (ms since the epoch).
fn instant_at(at: EpochMillis) -> Instant {
    Instant::now() + Duration::from_millis(at.saturating_sub(now_ms()))
}

/// What one look at the database found.
struct Tick {
    /// Some backend is before its kill time, or not yet seen dead.
    busy: bool,
    /// The earliest kill time to come.
    next_kill_at: Option<EpochMillis>,
}

/// What the database holds, as far as the watchdog is concerned.
enum Snapshot {
    /// No database (yet, or any more): nothing to watch.
    Missing,
    /// It could not be read.
    Failed,
    /// The drone's name and its live backends.
    Read(Option<DroneName>, Vec<BackendRecord>),
}

/// What to do about one backend.
enum Verdict {
    /// No deadlines: nothing to enforce.
    Ignored,
    /// Its kill time has not come.
    Pending(EpochMillis),
    /// Past its kill time and not running.
    Dead,
    /// Past its kill time, but nothing tells where it runs.
    Unfindable,
    /// Just sent SIGKILL.
    Killed,
    /// Sent SIGKILL a moment ago; not yet seen gone.
    Dying,
    /// The runtime could not check or kill it.
    Failed(String),
}

struct Watchdog {
    config: WatchdogConfig,
    store: Option<StateStore>,
    /// Device and inode of the database file the store reads.
    opened: Option<(u64, u64)>,
    process: ProcessRuntime,
    docker: Option<(DroneName, Arc<DockerRuntime>)>,
    docker_retry_at: Option<Instant>,
    /// When SIGKILL was last sent to a backend not yet seen gone.
    killed: HashMap<BackendName, Instant>,
    /// Backends seen dead past their kill time, with the deadlines they had then.
    dead: HashMap<BackendName, LeaseDeadlines>,
    /// Backends already reported as unfindable.
    unfindable: HashSet<BackendName>,
    /// When each kind of failure was last logged.
    logged: HashMap<String, Instant>,
    cancel: CancellationToken,
}

impl Watchdog {
    fn new(config: WatchdogConfig, cancel: CancellationToken) -> anyhow::Result<Watchdog> {
        let process = ProcessRuntime::new(ProcessRuntimeConfig::default(), cancel.child_token())
            .context("setting up the process runtime")?;
        Ok(Watchdog {
            config,
            store: None,
            opened: None,
            process,
            docker: None,
            docker_retry_at: None,
            killed: HashMap::new(),
            dead: HashMap::new(),
            unfindable: HashSet::new(),
            logged: HashMap::new(),
            cancel,
        })
    }

    async fn close(&mut self) {
        if let Some(store) = self.store.take() {
            store.close().await;
        }
        self.cancel.cancel();
    }

    /// Logs `message` as a warning unless the failure `what` was logged a moment ago.
    fn log_error(&mut self, what: &str, message: &str) {
        let now = Instant::now();
        match self.logged.get(what) {
            Some(at) if now.duration_since(*at) < ERROR_LOG_EVERY => debug!(what, message),
            _ => {
                warn!(what, "{message}");
                self.logged.insert(what.to_owned(), now);
            }
        }
    }

    async fn read(&mut self) -> Snapshot {
        let db = self.config.db_path.clone();
        let identity = std::fs::metadata(&db).ok().map(|m| (m.dev(), m.ino()));
        // A database that was replaced is read anew; one that was deleted is still read
        // through the open connection, as it was (nobody renews its leases any more).
        if identity.is_some() && identity != self.opened {
            if let Some(old) = self.store.take() {
                old.close().await;
            }
        }
        if self.store.is_none() {
            if identity.is_none() {
                return Snapshot::Missing;
            }
            match StateStore::open_read_only(&db).await {
                Ok(store) => {
                    debug!(db = %db.display(), "opened the state database read-only");
                    self.store = Some(store);
                    self.opened = identity;
                }
                Err(err) => {
                    self.log_error(
                        "open",
                        &format!("cannot open the state database {}: {err}", db.display()),
                    );
                    return Snapshot::Failed;
                }
            }
        }
        let Some(store) = self.store.as_ref() else {
            return Snapshot::Failed;
        };
        let read = async { Ok::<_, crate::StateError>((store.drone_name().await?, store.live_backends().await?)) };
        match read.await {
            Ok((name, records)) => Snapshot::Read(name, records),
            // A database the drone is creating has no tables yet: nothing recorded.
            Err(err) if err.to_string().contains("no such table") => Snapshot::Read(None, Vec::new()),
            Err(err) => {
                self.log_error(
                    "read",
                    &format!("cannot read the state database {}: {err}", db.display()),
                );
                Snapshot::Failed
            }
        }
    }

    /// One look at the database; kills what is due. `drone` says whether a drone holds
    /// the drone lock (for the log).
    async fn tick(&mut self, drone: bool) -> Tick {
        let (name, records) = match self.read().await {
            Snapshot::Missing => {
                return Tick {
                    busy: false,
                    next_kill_at: None,
                }
            }
            Snapshot::Failed => {
                return Tick {
                    busy: true,
                    next_kill_at: None,
                }
            }
            Snapshot::Read(name, records) => (name, records),
        };
        let now = now_ms();
        let live: HashSet<BackendName> = records.iter().map(|r| r.backend_id.clone()).collect();
        self.killed.retain(|id, _| live.contains(id));
        self.dead.retain(|id, _| live.contains(id));
        self.unfindable.retain(|id| live.contains(id));
        // Rate-limit entries outlive their failure by at most one log period.
        self.logged.retain(|_, at| at.elapsed() < ERROR_LOG_EVERY);

        // Processes first: a slow Docker engine must not delay them.
        let mut verdicts = Vec::with_capacity(records.len());
        let mut containers = Vec::new();
        for record in &records {
            match handle_of(record) {
                Some(handle @ RuntimeHandle::Docker(_)) => containers.push((record, handle)),
                handle => {
                    let verdict = self.check(record, handle.as_ref(), now, &self.process).await;
                    verdicts.push((record, handle, verdict));
                }
            }
        }
        if !containers.is_empty() {
            // Connected ahead of any deadline, so that a kill does not wait for it.
            let watched = containers
                .iter()
                .any(|(r, _)| r.deadlines.is_some_and(|d| self.dead.get(&r.backend_id) != Some(&d)));
            let docker = if watched {
                self.docker(name.as_ref()).await
            } else {
                None
            };
            let this: &Watchdog = self;
            let checks = containers.iter().map(|(record, handle)| {
                let docker = docker.clone();
                async move {
                    let verdict = match &docker {
                        Some(rt) => this.check(record, Some(handle), now, rt.as_ref()).await,
                        None => match record.deadlines {
                            Some(d) if now < kill_time(&d, this.config.max_slack) => {
                                Verdict::Pending(kill_time(&d, this.config.max_slack))
                            }
                            Some(d) if this.dead.get(&record.backend_id) == Some(&d) => Verdict::Dead,
                            Some(_) => Verdict::Failed("no connection to the Docker engine".to_owned()),
                            None => Verdict::Ignored,
                        },
                    };
                    (*record, Some(handle.clone()), verdict)
                }
            });
            verdicts.extend(futures_util::future::join_all(checks).await);
        }

        let mut tick = Tick {
            busy: false,
            next_kill_at: None,
        };
        for (record, handle, verdict) in verdicts {
            let id = &record.backend_id;
            match verdict {
                Verdict::Ignored => {}
                Verdict::Pending(at) => {
                    tick.busy = true;
                    tick.next_kill_at = Some(tick.next_kill_at.map_or(at, |n| n.min(at)));
                }
                Verdict::Dead => {
                    if self.killed.remove(id).is_some() {
                        info!(backend_id = %id, "the killed backend is gone");
                    }
                    if let Some(d) = record.deadlines {
                        self.dead.insert(id.clone(), d);
                    }
                }
                Verdict::Unfindable => {
                    if self.unfindable.insert(id.clone()) {
                        warn!(
                            backend_id = %id,
                            status = %record.status,
                            "the backend's hard deadline passed, but its drone recorded no process id (it stopped while \
                             starting the backend), so the watchdog cannot find it"
                        );
                    }
                }
                Verdict::Killed => {
                    tick.busy = true;
                    let again = self.killed.insert(id.clone(), Instant::now()).is_some();
                    let hard = record.deadlines.map_or(0, |d| d.hard_terminate_at);
                    let cause = match (drone, record.status) {
                        (false, _) => {
                            "no drone runs for this state database, so nobody renewed the lease or stopped the backend"
                        }
                        (true, BackendStatus::HardTerminating) => {
                            "the drone is killing it as well (it is hard-terminating), but it still runs"
                        }
                        (true, _) => "a drone runs for this state database but did not stop the backend (is it hung?)",
                    };
                    warn!(
                        backend_id = %id,
                        status = %record.status,
                        handle = ?handle,
                        hard_terminate_at = hard,
                        overdue_ms = now.saturating_sub(hard),
                        drone_running = drone,
                        again,
                        "killed the backend with SIGKILL: its key lease's hard deadline passed; {cause}"
                    );
                }
                Verdict::Dying => tick.busy = true,
                Verdict::Failed(message) => {
                    tick.busy = true;
                    self.log_error(
                        &format!("check-{id}"),
                        &format!("cannot check or kill backend {id}, past its hard deadline: {message}"),
                    );
                }
            }
        }
        tick
    }

    /// Whether `record` is past its kill time and not known dead.
    fn is_due(&self, record: &BackendRecord, now: EpochMillis) -> bool {
        record.deadlines.is_some_and(|d| {
            now >= kill_time(&d, self.config.max_slack) && self.dead.get(&record.backend_id) != Some(&d)
        })
    }

    async fn check(
        &self,
        record: &BackendRecord,
        handle: Option<&RuntimeHandle>,
        now: EpochMillis,
        runtime: &dyn Runtime,
    ) -> Verdict {
        let Some(deadlines) = record.deadlines else {
            return Verdict::Ignored;
        };
        let kill_at = kill_time(&deadlines, self.config.max_slack);
        if now < kill_at {
            return Verdict::Pending(kill_at);
        }
        if !self.is_due(record, now) {
            return Verdict::Dead;
        }
        let Some(handle) = handle else {
            return Verdict::Unfindable;
        };
        let id = &record.backend_id;
        match tokio::time::timeout(RUNTIME_CALL_TIMEOUT, runtime.adopt(id, handle)).await {
            Err(_) => return Verdict::Failed(format!("no answer within {RUNTIME_CALL_TIMEOUT:?}")),
            Ok(Err(err)) => return Verdict::Failed(err.to_string()),
            Ok(Ok(Adoption::Gone)) => return Verdict::Dead,
            Ok(Ok(Adoption::Running)) => {}
        }
        if self.killed.get(id).is_some_and(|at| at.elapsed() < RESEND_KILL_AFTER) {
            return Verdict::Dying;
        }
        match tokio::time::timeout(RUNTIME_CALL_TIMEOUT, runtime.signal(handle, StopSignal::Kill)).await {
            Err(_) => Verdict::Failed(format!("SIGKILL not sent within {RUNTIME_CALL_TIMEOUT:?}")),
            Ok(Err(err)) => Verdict::Failed(err.to_string()),
            Ok(Ok(())) => Verdict::Killed,
        }
    }

    /// The Docker runtime for the drone `name`, connected if needed (at most every
    /// [`DOCKER_RETRY`]).
    async fn docker(&mut self, name: Option<&DroneName>) -> Option<Arc<DockerRuntime>> {
        let Some(name) = name else {
            self.log_error(
                "docker-name",
                "the state database holds no drone name, so no container can be told to be the drone's",
            );
            return None;
        };
        if let Some((connected, runtime)) = &self.docker {
            if connected == name {
                return Some(runtime.clone());
            }
        }
        if self.docker_retry_at.is_some_and(|at| Instant::now() < at) {
            return None;
        }
        let config = DockerRuntimeConfig {
            docker_host: self.config.docker_host.clone(),
            ..DockerRuntimeConfig::default()
        };
        match DockerRuntime::connect_passive(config, name.clone(), self.cancel.child_token()).await {
            Ok(runtime) => {
                let runtime = Arc::new(runtime);
                self.docker = Some((name.clone(), runtime.clone()));
                self.docker_retry_at = None;
                Some(runtime)
            }
            Err(err) => {
                self.log_error(
                    "docker-connect",
                    &format!(
                        "cannot connect to the Docker engine, to kill containers once past their hard deadline: {err}"
                    ),
                );
                self.docker_retry_at = Some(Instant::now() + DOCKER_RETRY);
                None
            }
        }
    }
}

/// How the runtime finds a backend: its recorded handle, else (Docker only) its
/// container's name.
fn handle_of(record: &BackendRecord) -> Option<RuntimeHandle> {
    if let Some(handle) = &record.handle {
        return Some(handle.clone());
    }
    match record.spawn.as_ref()?.executable.runtime_kind() {
        RuntimeKind::Docker => Some(RuntimeHandle::Docker(DockerHandle::by_name(&record.backend_id))),
        RuntimeKind::Process => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::BackendSpec;
    use crate::state::StatusUpdate;
    use crate::test_util::{eventually, far_deadlines, spawn_action, TempDir};

    #[test]
    fn kill_time_adds_a_bounded_slack() {
        let d = |soft: u64, hard: u64| LeaseDeadlines {
            renew_at: 0,
            soft_terminate_at: soft,
            hard_terminate_at: hard,
        };
        // Default leases: a 10 s step; the slack is capped.
        assert_eq!(kill_time(&d(40_000, 50_000), DEFAULT_MAX_SLACK), 50_250);
        // Tests' 500 ms step: a tenth of it, well before the expiry 500 ms later.
        assert_eq!(kill_time(&d(2_000, 2_500), DEFAULT_MAX_SLACK), 2_550);
        assert_eq!(kill_time(&d(2_000, 2_500), Duration::ZERO), 2_500);
        // Nonsense deadlines do not overflow or underflow.
        assert_eq!(kill_time(&d(10, 5), DEFAULT_MAX_SLACK), 5);
        assert_eq!(kill_time(&d(0, u64::MAX), DEFAULT_MAX_SLACK), u64::MAX);
    }

    #[test]
    fn lock_files_sit_next_to_the_database() {
        let db = Path::new("/var/lib/plane/drone.db");
        assert_eq!(
            watchdog_lock_path(db),
            Path::new("/var/lib/plane/drone.db.watchdog.lock")
        );
        assert_eq!(drone_lock_path(db), Path::new("/var/lib/plane/drone.db.drone.lock"));
        assert_eq!(watchdog_log_path(db), Path::new("/var/lib/plane/drone.db.watchdog.log"));
        assert_eq!(drone_lock_path(Path::new("d.db")), Path::new("d.db.drone.lock"));
    }

    #[tokio::test]
    async fn locks_tell_drones_and_watchdogs_about_each_other() {
        let dir = TempDir::new("wd-locks");
        let db = dir.path().join("nested/drone.db");
        assert!(!drone_running(&db).unwrap(), "no lock file: no drone");
        let first = DroneLock::acquire(&db).await.unwrap();
        let second = DroneLock::acquire(&db).await.unwrap();
        assert!(drone_running(&db).unwrap());
        drop(first);
        assert!(drone_running(&db).unwrap(), "one drone still holds it");
        drop(second);
        assert!(!drone_running(&db).unwrap());

        assert_eq!(running_watchdog(&db).unwrap(), None);
        let mut lock = WatchdogLock::open(&db).unwrap();
        assert!(lock.try_lock().await.unwrap());
        assert_eq!(
            running_watchdog(&db).unwrap(),
            Some(RunningWatchdog {
                pid: Some(std::process::id())
            })
        );
        let mut other = WatchdogLock::open(&db).unwrap();
        assert!(
            !other.try_lock().await.unwrap(),
            "a second watchdog must not get the lock"
        );
        lock.release();
        assert_eq!(running_watchdog(&db).unwrap(), None);
        assert!(other.try_lock().await.unwrap());
        // Another watchdog started for the same database exits at once.
        let config = WatchdogConfig::new(&db);
        tokio::time::timeout(Duration::from_secs(5), run(config, CancellationToken::new()))
            .await
            .expect("a duplicate watchdog returns at once")
            .unwrap();
        assert!(running_watchdog(&db).unwrap().is_some());
    }

    fn process_runtime(dir: &TempDir) -> ProcessRuntime {
        let config = ProcessRuntimeConfig {
            allow_commands: vec!["sleep".into()],
            log_dir: dir.path().join("logs"),
            ..ProcessRuntimeConfig::default()
        };
        ProcessRuntime::new(config, CancellationToken::new()).unwrap()
    }

    /// Records a `sleep` backend with these deadlines, started and ready.
    async fn sleeping_backend(
        store: &StateStore,
        runtime: &ProcessRuntime,
        id: &str,
        deadlines: LeaseDeadlines,
    ) -> crate::ProcessHandle {
        let spawn = spawn_action(id, &["sleep", "1000"], deadlines);
        assert!(store.insert_backend(&spawn).await.unwrap());
        let spec = BackendSpec {
            backend_id: spawn.backend_id.clone(),
            executable: spawn.executable.clone(),
            key_name: spawn.key.key.name.clone(),
            fencing_token: spawn.key.fencing_token,
            static_token: None,
        };
        let started = runtime.start(&spec).await.unwrap();
        store
            .set_handle(&spawn.backend_id, &started.handle, started.address)
            .await
            .unwrap();
        store
            .record_event(&spawn.backend_id, &StatusUpdate::new(BackendStatus::Ready))
            .await
            .unwrap();
        match started.handle {
            RuntimeHandle::Process(h) => h,
            other => panic!("not a process: {other:?}"),
        }
    }

    use crate::runtime::process::is_alive as alive;

    fn soon(hard_in_ms: u64) -> LeaseDeadlines {
        let now = now_ms();
        LeaseDeadlines {
            renew_at: now + hard_in_ms / 2,
            soft_terminate_at: now + hard_in_ms * 4 / 5,
            hard_terminate_at: now + hard_in_ms,
        }
    }

    #[tokio::test]
    async fn kills_backends_past_their_hard_deadline_only_and_exits_when_done() {
        let dir = TempDir::new("wd-kill");
        let db = dir.path().join("drone.db");
        let store = StateStore::open(&db).await.unwrap();
        let runtime = process_runtime(&dir);
        let drone = DroneLock::acquire(&db).await.unwrap();
        let due_deadlines = soon(1000);
        let due = sleeping_backend(&store, &runtime, "due", due_deadlines).await;
        let renewed = sleeping_backend(&store, &runtime, "renewed", soon(400)).await;
        let far = sleeping_backend(&store, &runtime, "far", far_deadlines()).await;
        // A terminated record is not looked at, whatever its deadlines say.
        let done = sleeping_backend(&store, &runtime, "done", soon(1)).await;
        let mut update = StatusUpdate::new(BackendStatus::Terminated);
        update.termination_reason = Some(plane_types::status::TerminationReason::Swept);
        store.record_event(&"done".parse().unwrap(), &update).await.unwrap();

        let mut config = WatchdogConfig::new(&db);
        config.poll_interval = Duration::from_millis(50);
        config.exit_after = Duration::from_millis(300);
        let watchdog = tokio::spawn(run(config, CancellationToken::new()));

        // "renewed" has its deadlines moved forward as a live drone would.
        let renewed_id: BackendName = "renewed".parse().unwrap();
        let until = Instant::now() + Duration::from_millis(2000);
        let mut died_at = None;
        while Instant::now() < until {
            store.set_deadlines(&renewed_id, &soon(400)).await.unwrap();
            if died_at.is_none() && !alive(&due) {
                died_at = Some(now_ms());
            }
            assert!(alive(&renewed), "a renewed backend was killed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let died_at = died_at.expect("the backend past its hard deadline was killed");
        assert!(
            died_at >= due_deadlines.hard_terminate_at,
            "killed {} ms before its hard deadline",
            due_deadlines.hard_terminate_at - died_at
        );
        // The lease expires one soft→hard step (200 ms here) after the hard deadline.
        let step = due_deadlines.hard_terminate_at - due_deadlines.soft_terminate_at;
        assert!(
            died_at < due_deadlines.hard_terminate_at + step,
            "killed {} ms after its hard deadline",
            died_at - due_deadlines.hard_terminate_at
        );
        assert!(alive(&far) && alive(&done));
        assert!(!watchdog.is_finished(), "a drone runs and backends need watching");

        // The drone goes away: "renewed" runs out too, then the watchdog has only "far"
        // left to watch, and stays.
        drop(drone);
        eventually(Duration::from_secs(5), || !alive(&renewed)).await;
        assert!(!watchdog.is_finished());
        // Once "far" is gone too (its record still says ready), nothing needs watching.
        runtime
            .signal(&RuntimeHandle::Process(far), StopSignal::Kill)
            .await
            .unwrap();
        store.set_deadlines(&"far".parse().unwrap(), &soon(1)).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), watchdog)
            .await
            .expect("the watchdog exits by itself")
            .unwrap()
            .unwrap();
        assert!(
            alive(&done),
            "a terminated record's process is not the watchdog's business"
        );
        runtime
            .signal(&RuntimeHandle::Process(done), StopSignal::Kill)
            .await
            .unwrap();
        // It never wrote the drone's database.
        assert_eq!(
            store.backend(&renewed_id).await.unwrap().unwrap().status,
            BackendStatus::Ready
        );
    }

    #[tokio::test]
    async fn a_watchdog_stays_while_a_drone_runs_and_exits_without_a_database() {
        let dir = TempDir::new("wd-idle");
        let db = dir.path().join("drone.db");
        let drone = DroneLock::acquire(&db).await.unwrap();
        let mut config = WatchdogConfig::new(&db);
        config.poll_interval = Duration::from_millis(20);
        config.exit_after = Duration::from_millis(100);
        let watchdog = tokio::spawn(run(config, CancellationToken::new()));
        eventually(Duration::from_secs(5), || running_watchdog(&db).unwrap().is_some()).await;
        // With a drone but no database yet, it waits for the drone to create one.
        let waited = Instant::now() + Duration::from_millis(400);
        while Instant::now() < waited {
            assert!(!watchdog.is_finished(), "the watchdog left a running drone");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!db.exists(), "the watchdog created the database");
        drop(drone);
        tokio::time::timeout(Duration::from_secs(5), watchdog)
            .await
            .expect("the watchdog exits by itself")
            .unwrap()
            .unwrap();
        assert_eq!(running_watchdog(&db).unwrap(), None);
    }
}
