//! Tests of the built `plane-demo-backend` binary: it serves on `$PORT`, shows its
//! environment in `/env`, and handles SIGTERM as documented (recorded in `DEMO_SIGTERM_FILE` and on
//! stdout, then a graceful exit 0, or ignored with `DEMO_IGNORE_SIGTERM=1`).

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use std::io::{BufRead as _, BufReader, Read as _};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long a test waits for something that should happen at once.
const WAIT: Duration = Duration::from_secs(20);

/// A running `plane-demo-backend`, killed when dropped.
struct Backend {
    child: Child,
    addr: SocketAddr,
}

impl Backend {
    /// Starts the binary on a free port (`PORT=0`) with `env`, and waits until it listens.
    fn start(env: &[(&str, &str)]) -> Backend {
        let mut child = Command::new(env!("CARGO_BIN_EXE_plane-demo-backend"))
            .env("PORT", "0")
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn plane-demo-backend");
        // The log line `demo backend listening addr=0.0.0.0:N …` says which port it got.
        let (lines, received) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = lines.send(line);
            }
        });
        let deadline = Instant::now() + WAIT;
        let port = loop {
            let line = received
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("no `listening` log line from plane-demo-backend");
            if let Some(rest) = line.split("addr=").nth(1).filter(|_| line.contains("listening")) {
                let addr: SocketAddr = rest.split_whitespace().next().unwrap().parse().unwrap();
                break addr.port();
            }
        };
        Backend {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    fn get(&self, path: &str) -> Value {
        let url = format!("http://{}{path}", self.addr);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let res = reqwest::get(&url).await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
            assert_eq!(res.status(), 200, "GET {url}");
            res.json().await.unwrap()
        })
    }

    fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), signal).unwrap();
    }

    /// Waits for the process to exit, and returns its status and its stdout.
    fn wait_exit(&mut self) -> (ExitStatus, String) {
        let deadline = Instant::now() + WAIT;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "plane-demo-backend did not exit");
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stdout = String::new();
        self.child.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
        (status, stdout)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `GET path` until `done` holds for the answer, and returns it.
fn poll(backend: &Backend, path: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let value = backend.get(path);
        if done(&value) {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}: last {value}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigterm_is_recorded_and_stops_gracefully() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sigterm.log");
    let mut backend = Backend::start(&[
        ("DEMO_SIGTERM_FILE", file.to_str().unwrap()),
        ("SESSION_BACKEND_ID", "bk-1"),
        ("GREETING", "hello"),
    ]);
    let env = backend.get("/env");
    assert_eq!(env["PORT"], "0");
    assert_eq!(env["SESSION_BACKEND_ID"], "bk-1");
    assert_eq!(env["GREETING"], "hello", "/env is the whole environment");
    assert_eq!(backend.get("/debug/signals"), serde_json::json!([]));
    let limits = backend.get("/debug/limits");
    assert!(limits.get("memory_limit_bytes").is_some(), "{limits}");

    backend.signal(Signal::SIGTERM);
    let (status, stdout) = backend.wait_exit();
    assert_eq!(status.code(), Some(0), "a graceful stop exits 0");
    assert!(stdout.contains("SIGTERM received"), "{stdout:?}");
    let recorded = std::fs::read_to_string(&file).unwrap();
    let ms: u64 = recorded
        .strip_prefix("SIGTERM ")
        .and_then(|rest| rest.strip_suffix('\n'))
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("unexpected DEMO_SIGTERM_FILE content {recorded:?}"));
    assert!(ms > 1_600_000_000_000, "{ms} is a Unix time in milliseconds");
}

#[test]
fn ignored_sigterm_keeps_it_running_until_killed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sigterm.log");
    let mut backend = Backend::start(&[
        ("DEMO_SIGTERM_FILE", file.to_str().unwrap()),
        ("DEMO_IGNORE_SIGTERM", "1"),
    ]);
    backend.signal(Signal::SIGTERM);
    let signals = poll(&backend, "/debug/signals", "the SIGTERM to be recorded", |s| {
        s.as_array().is_some_and(|a| !a.is_empty())
    });
    assert_eq!(signals[0]["signal"], "SIGTERM");
    assert_eq!(signals[0]["ignored"], true);
    backend.signal(Signal::SIGTERM);
    poll(&backend, "/debug/signals", "the second SIGTERM", |s| {
        s.as_array().is_some_and(|a| a.len() == 2)
    });
    assert_eq!(std::fs::read_to_string(&file).unwrap().lines().count(), 2);
    assert!(backend.child.try_wait().unwrap().is_none(), "still running");

    backend.signal(Signal::SIGKILL);
    let (status, stdout) = backend.wait_exit();
    assert_eq!(status.code(), None, "killed by a signal");
    assert_eq!(stdout.matches("ignoring it").count(), 2, "{stdout:?}");
}

#[test]
fn bad_port_is_an_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_plane-demo-backend"))
        .env("PORT", "http")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("error: PORT=\"http\" is not a port number"), "{stderr}");
}
