//! `DEMO_LIFECYCLE_DIR`: a record of this backend's life for fault-injection checks.
//!
//! At start the backend takes an exclusive, non-blocking `flock` on
//! `<dir>/locks/<key>.lock` (its `SESSION_BACKEND_KEY`) and holds it until it dies, and
//! appends a `start` line to `<dir>/lifecycle.jsonl` saying whether it got the lock; a
//! graceful stop appends a `stop` line. The kernel drops the lock the moment the
//! process dies, however it dies, so a backend that could not take it is proof that
//! two backends of one key were alive at once.

use anyhow::Context;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

/// One line of `lifecycle.jsonl`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LifecycleEvent {
    /// `start` or `stop`.
    pub event: String,
    /// `SESSION_BACKEND_KEY`.
    pub key: String,
    /// `SESSION_BACKEND_ID`.
    pub backend: String,
    /// `SESSION_BACKEND_FENCING_TOKEN`.
    pub token: i64,
    /// The process id.
    pub pid: u32,
    /// Unix milliseconds.
    pub time: u64,
    /// Whether the key's lock was free (always true on `stop`).
    pub exclusive: bool,
}

/// The held lock and what to write at the stop.
pub struct Lifecycle {
    _lock: Option<Flock<File>>,
    log: PathBuf,
    event: LifecycleEvent,
}

/// The lock file of `key` under `dir`: the key, with every byte outside `[A-Za-z0-9_-]`
/// hex-escaped so any key is one safe file name.
pub fn lock_path(dir: &Path, key: &str) -> PathBuf {
    let mut name = String::new();
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            name.push(b as char);
        } else {
            name.push_str(&format!("%{b:02x}"));
        }
    }
    dir.join("locks").join(format!("{name}.lock"))
}

fn append(log: &Path, event: &LifecycleEvent) -> anyhow::Result<()> {
    // One write of one short line to an O_APPEND file: lines of concurrent backends
    // do not interleave.
    let line = format!("{}\n", serde_json::to_string(event)?);
    crate::signals::append_synced(log, &line).with_context(|| format!("cannot append to {}", log.display()))
}

impl Lifecycle {
    /// Takes the lock and records the start, if `DEMO_LIFECYCLE_DIR` is set.
    pub fn start_from_env() -> anyhow::Result<Option<Lifecycle>> {
        let Some(dir) = std::env::var_os("DEMO_LIFECYCLE_DIR").filter(|d| !d.is_empty()) else {
            return Ok(None);
        };
        let dir = PathBuf::from(dir);
        let var = |name: &str| std::env::var(name).unwrap_or_default();
        let key = var("SESSION_BACKEND_KEY");
        let lock_file = lock_path(&dir, &key);
        std::fs::create_dir_all(lock_file.parent().unwrap_or(&dir))
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_file)
            .with_context(|| format!("cannot open {}", lock_file.display()))?;
        // Only "held by someone else" means another backend; any other error is one.
        let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Some(lock),
            Err((_, Errno::EWOULDBLOCK)) => None,
            Err((_, errno)) => anyhow::bail!("cannot lock {}: {errno}", lock_file.display()),
        };
        let event = LifecycleEvent {
            event: "start".into(),
            key,
            backend: var("SESSION_BACKEND_ID"),
            token: var("SESSION_BACKEND_FENCING_TOKEN").parse().unwrap_or(-1),
            pid: std::process::id(),
            time: crate::now_millis(),
            exclusive: lock.is_some(),
        };
        let log = dir.join("lifecycle.jsonl");
        append(&log, &event)?;
        if lock.is_none() {
            tracing::error!(key = %event.key, "another backend of this key holds its lock");
        }
        Ok(Some(Lifecycle {
            _lock: lock,
            log,
            event,
        }))
    }

    /// Records a graceful stop (the lock goes with the process).
    pub fn stop(mut self) {
        self.event.event = "stop".into();
        self.event.time = crate::now_millis();
        self.event.exclusive = true;
        if let Err(err) = append(&self.log, &self.event) {
            tracing::warn!(%err, "cannot record the stop in DEMO_LIFECYCLE_DIR");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_paths_are_one_safe_file_name() {
        let dir = Path::new("/d");
        assert_eq!(lock_path(dir, "room-1_a"), Path::new("/d/locks/room-1_a.lock"));
        assert_eq!(lock_path(dir, "../x y"), Path::new("/d/locks/%2e%2e%2fx%20y.lock"));
    }

    #[test]
    fn a_second_holder_of_a_key_is_refused_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let path = lock_path(dir.path(), "k");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let open = || {
            OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .unwrap()
        };
        let first = Flock::lock(open(), FlockArg::LockExclusiveNonblock).unwrap();
        assert!(Flock::lock(open(), FlockArg::LockExclusiveNonblock).is_err());
        drop(first);
        assert!(Flock::lock(open(), FlockArg::LockExclusiveNonblock).is_ok());
    }
}
