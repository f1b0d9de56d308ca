//! The `docker` command for tests: running it, inspecting containers, and guards that
//! remove what a test created even when it fails.

use std::process::{Command, Output};

/// Runs `docker <args>` and returns its output (whatever its exit status).
pub fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .output()
        .expect("running the docker command")
}

/// Runs `docker <args>`, panics with its stderr unless it succeeds, and returns its
/// trimmed stdout.
pub fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(
        out.status.success(),
        "docker {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `docker inspect <container>`, or `None` if there is no such container.
pub fn inspect(container: &str) -> Option<serde_json::Value> {
    let out = docker(&["inspect", container]);
    if !out.status.success() {
        return None;
    }
    let mut all: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("docker inspect prints JSON");
    (!all.is_empty()).then(|| all.remove(0))
}

/// Removes every container labelled `dev.plane.drone=<drone>` (and its anonymous
/// volumes) when dropped.
pub struct RemoveContainers(pub String);

impl Drop for RemoveContainers {
    fn drop(&mut self) {
        let filter = format!("label=dev.plane.drone={}", self.0);
        let out = docker(&["ps", "-aq", "--filter", &filter]);
        let ids = String::from_utf8_lossy(&out.stdout).into_owned();
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f", "-v"];
            args.extend(ids);
            let _ = docker(&args);
        }
    }
}

/// Removes an image reference when dropped.
pub struct RemoveImage(pub String);

impl Drop for RemoveImage {
    fn drop(&mut self) {
        let _ = docker(&["rmi", "-f", &self.0]);
    }
}
