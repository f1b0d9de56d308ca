//! Configuration of a drone: where its controller is, who it is, where it keeps its
//! state, how its process runtime runs backends, and the timings of its loops.
//!
//! The binary builds a [`DroneConfig`] from flags; tests build one by hand with short
//! timings. Nothing here performs I/O.

use plane_types::names::{ClusterName, DroneName};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

/// Everything [`crate::run`] needs.
#[derive(Clone, Debug)]
pub struct DroneConfig {
    /// The controller's base URL, e.g. `http://127.0.0.1:8080`. The drone connects to
    /// `ws(s)://…` + [`plane_types::protocol::DRONE_SOCKET_PATH`]; `http`/`ws` give
    /// plain WebSocket, `https`/`wss` TLS.
    pub controller_url: String,
    /// The drone's name. `None`: the name stored in the state database, or a new random
    /// one that is then stored, so that a restarted drone keeps its identity (and with it
    /// the backends the controller believes it runs).
    pub name: Option<DroneName>,
    /// The cluster this drone serves.
    pub cluster: ClusterName,
    /// The pool within the cluster (`""` for the default pool).
    pub pool: String,
    /// The SQLite state store (created, with its parent directories, if missing).
    pub db_path: PathBuf,
    /// How the process runtime runs backends.
    pub process: ProcessRuntimeConfig,
    /// Loop timings.
    pub timings: DroneTimings,
}

/// Configuration of the process runtime, which runs backends as child processes.
#[derive(Clone, Debug)]
pub struct ProcessRuntimeConfig {
    /// Glob patterns (the `glob` crate's syntax) a program must match to be run. Each is
    /// tried against the program as written (`command[0]`, unless it contains a `..`
    /// component) and against its resolved absolute path, before and after resolving
    /// symlinks. Empty: nothing may run.
    pub allow_commands: Vec<String>,
    /// Programs that resolve to a fixed path instead of a `PATH` lookup, e.g. `plane` →
    /// the running binary, so `plane dev` can run `plane demo-backend` without `plane`
    /// on `PATH`. The alias name is still subject to `allow_commands`.
    pub program_aliases: HashMap<String, PathBuf>,
    /// Each backend's stdout and stderr are appended to `<log_dir>/<backend id>.log`.
    pub log_dir: PathBuf,
    /// The address backends listen on and are reached at. An unspecified address
    /// (`0.0.0.0`, `::`) is reported and probed as the loopback address of its family.
    pub bind_host: IpAddr,
}

impl Default for ProcessRuntimeConfig {
    /// Nothing allowed, logs under the system temporary directory, loopback.
    fn default() -> Self {
        ProcessRuntimeConfig {
            allow_commands: Vec::new(),
            program_aliases: HashMap::new(),
            log_dir: std::env::temp_dir().join("plane-backend-logs"),
            bind_host: IpAddr::V4(Ipv4Addr::LOCALHOST),
        }
    }
}

/// How often and how long the drone's loops wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DroneTimings {
    /// Interval between heartbeats; also how long an unacked event waits before it is
    /// re-sent on a live connection.
    pub heartbeat_interval: Duration,
    /// Soft termination: SIGTERM, then SIGKILL after this long.
    pub soft_terminate_grace: Duration,
    /// A backend that does not answer HTTP this long after it was started is
    /// hard-terminated with reason `startuptimeout`.
    pub startup_timeout: Duration,
    /// First reconnection delay (capped exponential backoff with jitter).
    pub reconnect_min: Duration,
    /// Largest reconnection delay.
    pub reconnect_max: Duration,
    /// How often an unanswered `RenewKey` is repeated.
    pub renew_retry: Duration,
}

impl Default for DroneTimings {
    fn default() -> Self {
        DroneTimings {
            heartbeat_interval: Duration::from_secs(7),
            soft_terminate_grace: Duration::from_secs(30),
            startup_timeout: Duration::from_secs(300),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            renew_retry: Duration::from_secs(1),
        }
    }
}
