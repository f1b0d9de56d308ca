//! Helpers for this crate's tests: temporary directories and polling with a deadline.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A directory under the system temporary directory, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// A fresh, empty directory whose name starts with `prefix`.
    pub fn new(prefix: &str) -> TempDir {
        let suffix: u64 = rand::random();
        let path = std::env::temp_dir().join(format!("plane-drone-test-{prefix}-{}-{suffix:x}", std::process::id()));
        std::fs::create_dir_all(&path).expect("creating a temporary directory");
        TempDir(path)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Polls `check` every few milliseconds until it holds; panics after `limit`.
pub async fn eventually(limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "condition not met within {limit:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A `Spawn` for a process backend running `command`.
pub fn spawn_action(
    id: &str,
    command: &[&str],
    deadlines: plane_types::lease::LeaseDeadlines,
) -> plane_types::protocol::SpawnAction {
    use plane_types::api::KeyConfig;
    use plane_types::executable::Executable;
    use plane_types::protocol::{AcquiredKey, SpawnAction};
    SpawnAction {
        backend_id: id.parse().expect("a valid backend id"),
        executable: Executable::from_json(&serde_json::json!({ "command": command })).expect("a valid executable"),
        key: AcquiredKey {
            key: KeyConfig {
                name: format!("key-{id}"),
                namespace: String::new(),
                tag: String::new(),
            },
            fencing_token: 3,
        },
        static_token: None,
        deadlines,
    }
}

/// Deadlines that do not come up during a test.
pub fn far_deadlines() -> plane_types::lease::LeaseDeadlines {
    let now = crate::state::now_ms();
    plane_types::lease::LeaseDeadlines {
        renew_at: now + 3_600_000,
        soft_terminate_at: now + 4_800_000,
        hard_terminate_at: now + 6_000_000,
    }
}
