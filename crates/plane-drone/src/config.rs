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
    /// Sent as `Authorization: Bearer <token>` to the controller (its `--ctrl-token`).
    pub ctrl_token: Option<String>,
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
    /// The Docker runtime, if this drone offers one.
    pub docker: Option<DockerRuntimeConfig>,
    /// Loop timings.
    pub timings: DroneTimings,
    /// If set, every status change the drone records is also appended to this file as
    /// one JSON line, `{"backend_id": …, "status": …, "time": <drone clock, ms>}` (for
    /// fault-injection checkers). Opened in append mode, so restarts keep appending;
    /// write failures are logged, never fatal.
    pub event_journal: Option<PathBuf>,
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

/// Where a container is reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DockerAddressMode {
    /// Port 8080 of the container is published on `host_ip` at a port the engine picks;
    /// the backend's address is `host_ip:<that port>`.
    HostPort,
    /// The container's own IP on its network (`network_name`, or the runtime's
    /// `network`), port 8080: for drones and proxies that share a Docker network.
    ContainerIp,
}

/// Configuration of the Docker runtime, which runs each backend as a container.
#[derive(Clone, Debug)]
pub struct DockerRuntimeConfig {
    /// The engine's address (`unix:///var/run/docker.sock`, `tcp://…`); `None`: bollard's
    /// defaults (`DOCKER_HOST`, else the local socket).
    pub docker_host: Option<String>,
    /// The OCI runtime containers run under (`runsc` for gVisor); `None`: the engine's
    /// default.
    pub oci_runtime: Option<String>,
    /// The log driver of the containers; `None`: the engine's default.
    pub log_driver: Option<String>,
    /// Options of the log driver (`max-size=10m`, …).
    pub log_options: HashMap<String, String>,
    /// Where `mount` paths live on the host. An executable with a mount is refused when
    /// this is unset.
    pub mount_base: Option<PathBuf>,
    /// The most processes and threads a container may have (`--pids-limit`).
    pub pids_limit: i64,
    /// Whether containers get a read-only root filesystem (plus a writable `/tmp`).
    pub read_only_rootfs: bool,
    /// How a backend's address is found.
    pub address_mode: DockerAddressMode,
    /// The drone's IP: published ports bind to it and addresses use it (host-port mode).
    pub host_ip: IpAddr,
    /// The network containers join when the executable names none (`None`: the
    /// engine's default bridge).
    pub network: Option<String>,
    /// Stopped Plane containers of this drone are removed once they have been stopped
    /// this long.
    pub remove_stopped_after: Duration,
    /// How often stopped containers (and, with `prune_images`, unused pulled images) are
    /// looked for. A pass also runs when the runtime starts.
    pub cleanup_interval: Duration,
    /// Whether images this drone pulled (and only those) are removed once no container
    /// of this drone uses them.
    pub prune_images: bool,
}

impl Default for DockerRuntimeConfig {
    /// The engine's defaults, hardened: pids limit 1024, read-write root, host ports on
    /// loopback, stopped containers removed after 10 minutes (looked for every 30 s), no
    /// image pruning.
    fn default() -> Self {
        DockerRuntimeConfig {
            docker_host: None,
            oci_runtime: None,
            log_driver: None,
            log_options: HashMap::new(),
            mount_base: None,
            pids_limit: 1024,
            read_only_rootfs: false,
            address_mode: DockerAddressMode::HostPort,
            host_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            network: None,
            remove_stopped_after: Duration::from_secs(600),
            cleanup_interval: Duration::from_secs(30),
            prune_images: false,
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
    /// How often each running backend's resource use is sampled and reported.
    pub metrics_interval: Duration,
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
            metrics_interval: Duration::from_secs(10),
        }
    }
}
