//! The runtime abstraction: how a drone prepares, starts, probes, signals, watches and
//! re-adopts a backend, in runtime-neutral types.
//!
//! The backend state machine ([`crate::backend`]) only speaks [`Runtime`]; it never
//! sees a process id or a container id except inside the opaque-to-it, serializable
//! [`RuntimeHandle`] it persists. Two runtimes implement it:
//! * [`process`]: backends are child processes of the drone;
//! * [`docker`]: backends are containers; `prepare` pulls the image (reporting
//!   [`LoadProgress`]), `start` creates the container and returns its handle, `wait_exit`
//!   reads the exit code from the engine's events, `adopt` checks the container's labels.
//!
//! Adding one means a new [`RuntimeHandle`] variant and a new module here, not a change
//! to the state machine.
//!
//! [`wait_for_http`] is the readiness probe shared by runtimes whose backends are
//! reachable over TCP.

pub mod docker;
pub mod process;

use async_trait::async_trait;
use plane_types::executable::{Executable, RuntimeKind};
use plane_types::names::BackendName;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What a runtime needs to know to run one backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    /// The backend's id.
    pub backend_id: BackendName,
    /// What to run.
    pub executable: Executable,
    /// The key name (`SESSION_BACKEND_KEY`).
    pub key_name: String,
    /// The fencing token of this key acquisition (`SESSION_BACKEND_FENCING_TOKEN`).
    pub fencing_token: i64,
    /// The static token, if any (`SESSION_BACKEND_STATIC_TOKEN`).
    pub static_token: Option<String>,
}

impl BackendSpec {
    /// The variables Plane sets for every backend, `PORT` included. Runtimes apply them
    /// after the executable's own `env`, so they cannot be overridden by it.
    pub fn plane_env(&self, port: u16) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        env.insert("PORT".to_owned(), port.to_string());
        env.insert("SESSION_BACKEND_ID".to_owned(), self.backend_id.to_string());
        env.insert("SESSION_BACKEND_KEY".to_owned(), self.key_name.clone());
        env.insert(
            "SESSION_BACKEND_FENCING_TOKEN".to_owned(),
            self.fencing_token.to_string(),
        );
        if let Some(token) = &self.static_token {
            env.insert("SESSION_BACKEND_STATIC_TOKEN".to_owned(), token.clone());
        }
        env
    }
}

pub use plane_types::protocol::{BackendMetrics, LoadProgress};

/// How a runtime finds a backend again: persisted by the drone after `start` and handed
/// back to `signal`, `wait_exit` and `adopt`, also by a restarted drone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "runtime", rename_all = "lowercase")]
pub enum RuntimeHandle {
    /// A child process and its process group.
    Process(process::ProcessHandle),
    /// A container of the drone's Docker engine.
    Docker(docker::DockerHandle),
}

impl RuntimeHandle {
    /// The runtime this handle belongs to.
    pub fn kind(&self) -> RuntimeKind {
        match self {
            RuntimeHandle::Process(_) => RuntimeKind::Process,
            RuntimeHandle::Docker(_) => RuntimeKind::Docker,
        }
    }
}

/// A backend that has been started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StartedBackend {
    /// Where the backend is reached (reported to the controller with `waiting`).
    pub address: SocketAddr,
    /// How to find the backend again.
    pub handle: RuntimeHandle,
}

/// Which signal to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopSignal {
    /// Ask to stop (SIGTERM).
    Term,
    /// Stop now (SIGKILL).
    Kill,
}

/// How a backend ended.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ExitInfo {
    /// The exit code if the backend exited normally; `None` if it was killed by a signal
    /// or the code is unknown (e.g. an adopted process).
    pub exit_code: Option<i32>,
    /// A human-readable detail, e.g. `"killed by signal SIGKILL"`.
    pub detail: Option<String>,
}

/// The outcome of re-adopting a backend after a drone restart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Adoption {
    /// The backend still runs and is now tracked again.
    Running,
    /// The backend is gone (or the handle refers to something else now).
    Gone,
}

/// Why a runtime operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The drone's configuration forbids running this backend.
    #[error("{0}")]
    NotAllowed(String),
    /// The executable cannot be run by this runtime.
    #[error("invalid executable: {0}")]
    InvalidExecutable(String),
    /// An I/O operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Any other failure.
    #[error("{0}")]
    Other(String),
}

impl RuntimeError {
    /// An [`RuntimeError::Io`] with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> RuntimeError {
        RuntimeError::Io {
            context: context.into(),
            source,
        }
    }
}

/// A way of running backends. Implementations must be cheap to share (`Arc<dyn Runtime>`)
/// and must not stop running backends when dropped: backends outlive the drone.
#[async_trait]
pub trait Runtime: Send + Sync + 'static {
    /// Which executables this runtime runs.
    fn kind(&self) -> RuntimeKind;

    /// The loading step: checks the executable and fetches what it needs. May report
    /// progress; may take long (the caller cancels it by dropping the future).
    async fn prepare(
        &self,
        spec: &BackendSpec,
        progress: &(dyn Fn(LoadProgress) + Send + Sync),
    ) -> Result<(), RuntimeError>;

    /// Starts the backend. Should be quick; the caller does not cancel it midway.
    async fn start(&self, spec: &BackendSpec) -> Result<StartedBackend, RuntimeError>;

    /// Returns once the backend answers HTTP at `address`. Loops until then; the caller
    /// applies the startup timeout and watches for an exit meanwhile.
    async fn wait_ready(&self, handle: &RuntimeHandle, address: SocketAddr) -> Result<(), RuntimeError>;

    /// Sends a signal to the backend. Succeeds without effect if it has already exited.
    async fn signal(&self, handle: &RuntimeHandle, signal: StopSignal) -> Result<(), RuntimeError>;

    /// Returns once the backend has exited. Called at most once per started or adopted
    /// backend.
    async fn wait_exit(&self, handle: &RuntimeHandle) -> ExitInfo;

    /// After a drone restart: whether the backend behind `handle` still runs; if so the
    /// runtime tracks it again (`signal` and `wait_exit` work on it).
    async fn adopt(&self, backend_id: &BackendName, handle: &RuntimeHandle) -> Result<Adoption, RuntimeError>;

    /// Makes sure nothing is left running of a backend whose `start` failed, timed out
    /// (and was dropped midway), or whose handle was never recorded (the drone died
    /// during `start`). Runtimes that can find a backend without its handle (Docker, by
    /// its container name and labels) stop and remove it; others do nothing.
    async fn abandon(&self, _backend_id: &BackendName) -> Result<(), RuntimeError> {
        Ok(())
    }

    /// One resource-use sample of a running backend, if this runtime can take one. The
    /// caller bounds the rate (one call per backend per metrics interval).
    async fn metrics(&self, _handle: &RuntimeHandle) -> Option<BackendMetrics> {
        None
    }

    /// After a restart, once every recorded backend has been resumed: `known` holds the
    /// ids of every backend the state store has a record of. The runtime stops (and may
    /// remove) whatever it finds running under this drone's identity that is not among
    /// them. Runtimes that cannot enumerate their backends do nothing.
    async fn reconcile(&self, _known: &HashSet<BackendName>) -> Result<(), RuntimeError> {
        Ok(())
    }
}

/// Returns once something at `address` answers HTTP: each attempt connects, sends
/// `GET /` and reads the status line. Any status code counts; what matters is that the
/// backend speaks HTTP.
///
/// Attempts are [`FAST_PROBE_INTERVAL`] apart for the first [`FAST_PROBE_PERIOD`], then
/// back off by a millisecond per attempt to 10 ms. The gap between the backend starting
/// to listen and the next attempt is what this adds to a cold start, and most backends
/// listen within tens of milliseconds; an attempt on a port nobody listens on yet is a
/// refused loopback connect, a few microseconds of work.
pub async fn wait_for_http(address: SocketAddr) {
    let fast_until = tokio::time::Instant::now() + FAST_PROBE_PERIOD;
    let mut interval = FAST_PROBE_INTERVAL;
    loop {
        if probe_http(address).await {
            return;
        }
        tokio::time::sleep(interval).await;
        if tokio::time::Instant::now() >= fast_until {
            interval = (interval + Duration::from_millis(1)).min(Duration::from_millis(10));
        }
    }
}

/// How often [`wait_for_http`] probes at first (tokio's timer resolution).
pub const FAST_PROBE_INTERVAL: Duration = Duration::from_millis(1);
/// How long [`wait_for_http`] probes every [`FAST_PROBE_INTERVAL`] before backing off.
pub const FAST_PROBE_PERIOD: Duration = Duration::from_millis(250);

/// One readiness attempt; true if an HTTP status line came back.
pub async fn probe_http(address: SocketAddr) -> bool {
    const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
    let attempt = async {
        let mut stream = TcpStream::connect(address).await.ok()?;
        let _ = stream.set_nodelay(true);
        let request = format!("GET / HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut buf = [0u8; 256];
        let mut filled = 0;
        loop {
            let n = stream.read(&mut buf[filled..]).await.ok()?;
            if n == 0 {
                break;
            }
            filled += n;
            if buf[..filled].windows(2).any(|w| w == b"\r\n") || filled == buf.len() {
                break;
            }
        }
        Some(is_status_line(&buf[..filled]))
    };
    matches!(tokio::time::timeout(ATTEMPT_TIMEOUT, attempt).await, Ok(Some(true)))
}

/// Whether `bytes` begins with an HTTP/1.x status line such as `HTTP/1.1 200`.
fn is_status_line(bytes: &[u8]) -> bool {
    let Some(rest) = bytes.strip_prefix(b"HTTP/") else {
        return false;
    };
    let Some(space) = rest.iter().position(|b| *b == b' ') else {
        return false;
    };
    let code = &rest[space + 1..];
    code.len() >= 3 && code[..3].iter().all(u8::is_ascii_digit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert!(is_status_line(b"HTTP/1.1 200 OK\r\n"));
        assert!(is_status_line(b"HTTP/1.0 404"));
        assert!(!is_status_line(b"SSH-2.0-OpenSSH\r\n"));
        assert!(!is_status_line(b"HTTP/1.1 2"));
        assert!(!is_status_line(b""));
    }

    #[tokio::test]
    async fn probe_needs_http() {
        // A listener that never answers is not ready; nothing listening is not ready.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        assert!(!probe_http(addr).await);

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 64];
            let _ = s.read(&mut buf).await.unwrap();
            s.write_all(b"HTTP/1.1 418 I'm a teapot\r\n\r\n").await.unwrap();
        });
        assert!(probe_http(addr).await);
        server.await.unwrap();
    }

    #[test]
    fn plane_env_has_the_session_variables() {
        let spec = BackendSpec {
            backend_id: "b1".parse().unwrap(),
            executable: Executable::from_json(&serde_json::json!({"command": ["x"]})).unwrap(),
            key_name: "room".into(),
            fencing_token: 42,
            static_token: None,
        };
        let env = spec.plane_env(1234);
        assert_eq!(env["PORT"], "1234");
        assert_eq!(env["SESSION_BACKEND_ID"], "b1");
        assert_eq!(env["SESSION_BACKEND_KEY"], "room");
        assert_eq!(env["SESSION_BACKEND_FENCING_TOKEN"], "42");
        assert!(!env.contains_key("SESSION_BACKEND_STATIC_TOKEN"));
    }
}
