//! The server roles of the `plane` binary: `controller`, `drone`, `proxy` and `dev`.
//!
//! Each role parses its flags into its component's config struct, binds its listener
//! and runs until Ctrl-C/SIGTERM. `dev` runs all three in one process on an embedded
//! SQLite store, with the process runtime and, when a Docker engine answers, the Docker
//! runtime (executables with an `image` then run as containers).

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use plane_client::PlaneClient;
use plane_controller::ControllerConfig;
use plane_drone::config::{DockerAddressMode, DockerRuntimeConfig};
use plane_drone::{DroneConfig, DroneTimings, ProcessRuntimeConfig};
use plane_proxy::ProxyConfig;
use plane_store::postgres::PostgresStore;
use plane_store::sqlite::SqliteStore;
use plane_store::SharedStore;
use plane_types::api::{ConnectRequest, KeyConfig, SpawnConfig};
use plane_types::names::{ClusterName, DroneName};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Flags of `plane controller`.
#[derive(Debug, Args)]
pub struct ControllerArgs {
    /// The store: a `postgres://` URL, a SQLite file path, or a `sqlite:` URL.
    #[arg(long, env = "PLANE_DB", default_value = "plane.db")]
    db: String,
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port to bind.
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Cluster used when a connect request names none.
    #[arg(long)]
    default_cluster: Option<ClusterName>,
    /// The controller's public URL, used in `status_url` (default: http://<host>:<port>).
    #[arg(long)]
    controller_url: Option<String>,
    /// The key lease, in milliseconds. Drones renew at half of it; a drone that cannot
    /// renew stops its backends at 2/3 (soft) and 5/6 (hard); after all of it without
    /// renewal the key can move to a new backend. Every controller sharing a database
    /// must use the same value.
    #[arg(long, default_value_t = 60_000, value_parser = clap::value_parser!(u64).range(600..))]
    lease_ms: u64,
    /// How often idle, lifetime and lost backends are swept, in milliseconds.
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(10..))]
    sweep_interval_ms: u64,
    /// A drone without a heartbeat for this long gets no new backends, in milliseconds.
    #[arg(long, default_value_t = 45_000, value_parser = clap::value_parser!(u64).range(100..))]
    drone_unhealthy_after_ms: u64,
    /// How long terminated backends (their status history and tokens) are kept, in
    /// hours; older ones are deleted in bounded batches every minute.
    #[arg(long, default_value_t = 168)]
    retain_terminated_hours: u64,
    /// A bearer token every `/ctrl/*` request must carry (`Authorization: Bearer …`);
    /// drones, proxies, DNS servers and the CLI pass it with their `--ctrl-token`.
    #[arg(long, env = "PLANE_CTRL_TOKEN", hide_env_values = true)]
    ctrl_token: Option<String>,
    /// Checks `/ctrl/*` requests with this auth service (http or https, Plane-compatible):
    /// a 2xx answer lets the request through. A request with the `--ctrl-token` needs no check.
    #[arg(long, value_name = "URL")]
    forward_auth: Option<String>,
    /// A CA certificate (PEM file) to trust for an https `--forward-auth` service.
    #[arg(long, value_name = "FILE", requires = "forward_auth")]
    forward_auth_ca: Option<PathBuf>,
    /// Connection tokens expire this many seconds after they are issued; a proxy then
    /// answers 410. Default: they last as long as their backend (as in Plane 0.5).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=10 * 365 * 86_400))]
    token_ttl_seconds: Option<u64>,
}

/// Which runtime a drone uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RuntimeChoice {
    /// Backends are child processes of the drone.
    Process,
    /// Backends are Docker containers.
    Docker,
}

/// How a container's address is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AddressChoice {
    /// Port 8080 published on `--backend-host`; the address is that host and port.
    HostPort,
    /// The container's IP on its Docker network, port 8080.
    ContainerIp,
}

/// Flags of the Docker runtime (`plane drone --runtime docker`).
#[derive(Debug, Args)]
pub struct DockerArgs {
    /// The Docker engine (`unix:///var/run/docker.sock`, `tcp://host:2375`; default:
    /// `DOCKER_HOST`, else the local socket).
    #[arg(long)]
    docker_host: Option<String>,
    /// The OCI runtime containers run under, e.g. `runsc` for gVisor.
    #[arg(long)]
    docker_runtime: Option<String>,
    /// The containers' log driver (default: the engine's).
    #[arg(long)]
    docker_log_driver: Option<String>,
    /// A log-driver option, `key=value` (repeat the flag).
    #[arg(long = "docker-log-opt", value_parser = parse_key_value)]
    docker_log_opts: Vec<(String, String)>,
    /// Where `mount` directories live on the host; executables with a mount are refused
    /// without it.
    #[arg(long)]
    mount_base: Option<PathBuf>,
    /// The most processes and threads a container may have.
    #[arg(long, default_value_t = 1024)]
    docker_pids_limit: i64,
    /// Give containers a read-only root filesystem (with a writable /tmp).
    #[arg(long)]
    docker_read_only_rootfs: bool,
    /// The Docker network containers join when the executable names none.
    #[arg(long)]
    docker_network: Option<String>,
    /// How a container's address is found.
    #[arg(long, value_enum, default_value = "host-port")]
    docker_address: AddressChoice,
    /// Seconds after which stopped Plane containers of this drone are removed.
    #[arg(long, default_value_t = 600)]
    docker_remove_stopped_after_seconds: u64,
    /// Remove images this drone pulled once no container of it uses them.
    #[arg(long)]
    docker_prune_images: bool,
}

impl DockerArgs {
    fn config(&self, host_ip: IpAddr) -> DockerRuntimeConfig {
        DockerRuntimeConfig {
            docker_host: self.docker_host.clone(),
            oci_runtime: self.docker_runtime.clone(),
            log_driver: self.docker_log_driver.clone(),
            log_options: self.docker_log_opts.iter().cloned().collect(),
            mount_base: self.mount_base.clone(),
            pids_limit: self.docker_pids_limit,
            read_only_rootfs: self.docker_read_only_rootfs,
            address_mode: match self.docker_address {
                AddressChoice::HostPort => DockerAddressMode::HostPort,
                AddressChoice::ContainerIp => DockerAddressMode::ContainerIp,
            },
            host_ip,
            network: self.docker_network.clone(),
            remove_stopped_after: Duration::from_secs(self.docker_remove_stopped_after_seconds),
            prune_images: self.docker_prune_images,
            ..DockerRuntimeConfig::default()
        }
    }
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected key=value, got {s:?}")),
    }
}

/// Flags of `plane drone`.
#[derive(Debug, Args)]
pub struct DroneArgs {
    /// The controller to connect to, or several separated by commas (each reconnect
    /// goes to the next one).
    #[arg(long, env = "PLANE_CONTROLLER_URL", default_value = "http://127.0.0.1:8080")]
    controller_url: String,
    /// The controller's `--ctrl-token`, if it has one.
    #[arg(long, env = "PLANE_CTRL_TOKEN", hide_env_values = true)]
    ctrl_token: Option<String>,
    /// The cluster this drone serves.
    #[arg(long)]
    cluster: ClusterName,
    /// The pool within the cluster.
    #[arg(long, default_value = "")]
    pool: String,
    /// The drone's local state store (SQLite file).
    #[arg(long, default_value = "plane-drone.db")]
    db: PathBuf,
    /// The drone's name (default: the one in its state store, or a new random one).
    #[arg(long)]
    name: Option<DroneName>,
    /// The runtimes that run backends (repeat the flag to offer several).
    #[arg(long = "runtime", value_enum, default_values = ["process"])]
    runtimes: Vec<RuntimeChoice>,
    /// Programs the process runtime may run (glob patterns; repeat the flag).
    #[arg(long = "allow-command")]
    allow_commands: Vec<String>,
    /// Where backend logs go (default: `logs` next to the state store).
    #[arg(long)]
    log_dir: Option<PathBuf>,
    /// The drone's IP: process backends listen on it, Docker publishes container ports
    /// on it, and backends are reached at it.
    #[arg(long, default_value = "127.0.0.1")]
    backend_host: IpAddr,
    /// Seconds between SIGTERM and SIGKILL on a soft termination.
    #[arg(long, default_value_t = 30)]
    soft_terminate_grace_seconds: u64,
    /// Seconds a backend may take to answer HTTP before it is killed.
    #[arg(long, default_value_t = 300)]
    startup_timeout_seconds: u64,
    /// Seconds between two resource-use samples of each backend.
    #[arg(long, default_value_t = 10)]
    metrics_interval_seconds: u64,
    /// Milliseconds between heartbeats (must be well under the controller's unhealthy
    /// threshold; tests use short ones).
    #[arg(long, default_value_t = 7000, hide = true)]
    heartbeat_interval_ms: u64,
    /// Do not start a watchdog. By default the drone starts `plane drone-watchdog` for
    /// its state store as a detached process (unless one runs already), which kills
    /// backends whose lease ran out while the drone was down. Use this when the watchdog
    /// runs as its own service, e.g. when the drone runs in a container whose end would
    /// take a child watchdog with it.
    #[arg(long)]
    no_watchdog: bool,
    /// Milliseconds the started watchdog waits, with no drone and nothing to watch,
    /// before it exits (tests use short ones).
    #[arg(long, hide = true)]
    watchdog_exit_after_ms: Option<u64>,
    /// Append each backend status change the drone records to this file, one JSON line
    /// per change (for fault-injection checks).
    #[arg(long, hide = true)]
    event_journal: Option<PathBuf>,
    #[command(flatten)]
    docker: DockerArgs,
}

/// Flags of `plane drone-watchdog`.
#[derive(Debug, Args)]
pub struct WatchdogArgs {
    /// The state store of the drone to watch (its SQLite file; only read).
    #[arg(long, default_value = "plane-drone.db")]
    db: PathBuf,
    /// The Docker engine of the drone's containers (default: `DOCKER_HOST`, else the
    /// local socket).
    #[arg(long)]
    docker_host: Option<String>,
    /// Milliseconds between two reads of the state store.
    #[arg(long, default_value_t = plane_drone::watchdog::DEFAULT_POLL_INTERVAL.as_millis() as u64, value_parser = clap::value_parser!(u64).range(1..))]
    poll_interval_ms: u64,
    /// Exit after this many milliseconds in which no drone ran for the state store and no
    /// backend it records needed watching.
    #[arg(long, default_value_t = plane_drone::watchdog::DEFAULT_EXIT_AFTER.as_millis() as u64)]
    exit_after_ms: u64,
}

/// Flags of `plane proxy`.
#[derive(Debug, Args)]
pub struct ProxyArgs {
    /// The controller to connect to, or several separated by commas (each reconnect
    /// goes to the next one).
    #[arg(long, env = "PLANE_CONTROLLER_URL", default_value = "http://127.0.0.1:8080")]
    controller_url: String,
    /// The cluster this proxy serves (the Host clients use).
    #[arg(long)]
    cluster: ClusterName,
    /// Address to bind.
    #[arg(long, default_value = "0.0.0.0")]
    host: IpAddr,
    /// HTTP port to bind.
    #[arg(long, default_value_t = 9090)]
    http_port: u16,
    /// Seconds a request waits for a starting backend.
    #[arg(long, default_value_t = 30)]
    route_wait_seconds: u64,
    /// The controller's `--ctrl-token`, if it has one.
    #[arg(long, env = "PLANE_CTRL_TOKEN", hide_env_values = true)]
    ctrl_token: Option<String>,
    /// Serve HTTPS on this port (HTTP/2 and HTTP/1.1 by ALPN); the HTTP port then
    /// answers `/ready` and `/metrics` and redirects everything else to HTTPS. Needs
    /// `--cert-file` and `--key-file`, or `--acme-directory`.
    #[arg(long)]
    https_port: Option<u16>,
    /// The port HTTP→HTTPS redirects name, if clients reach HTTPS on another port than
    /// `--https-port` (port forwarding, a load balancer); 443 is left out of the URL.
    #[arg(long)]
    public_https_port: Option<u16>,
    /// A PEM certificate chain to serve (with `--key-file`), without ACME.
    #[arg(long, requires = "key_file", conflicts_with = "acme_directory")]
    cert_file: Option<PathBuf>,
    /// The PEM private key of `--cert-file`.
    #[arg(long, requires = "cert_file")]
    key_file: Option<PathBuf>,
    /// Obtain and renew the certificate for `<cluster>` and `*.<cluster>` from this ACME
    /// directory URL through DNS-01 (run `plane dns` for the cluster's zone).
    #[arg(long, value_name = "URL")]
    acme_directory: Option<String>,
    /// Where the ACME certificate and key (one PEM file, mode 0600) and the account are
    /// kept and reused at start.
    #[arg(long, default_value = "plane-proxy-cert.pem")]
    acme_cert_path: PathBuf,
    /// Contact email for the ACME account.
    #[arg(long)]
    acme_email: Option<String>,
    /// External account binding: the key id the CA gave.
    #[arg(long, requires = "acme_eab_hmac_key")]
    acme_eab_kid: Option<String>,
    /// External account binding: the base64url HMAC key the CA gave.
    #[arg(
        long,
        requires = "acme_eab_kid",
        env = "PLANE_ACME_EAB_HMAC_KEY",
        hide_env_values = true
    )]
    acme_eab_hmac_key: Option<String>,
    /// A CA certificate (PEM) to trust for the ACME server itself (test CAs).
    #[arg(long)]
    acme_server_ca: Option<PathBuf>,
    /// The largest request head in bytes (over it: 431).
    #[arg(long, default_value_t = 64 * 1024)]
    max_header_bytes: usize,
    /// The largest request body in bytes (over it: 413); 0 for no limit.
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    max_body_bytes: u64,
    /// Seconds a client has to send a request head (against slow clients).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    header_read_timeout_seconds: u64,
    /// Seconds a client connection may stay idle between requests.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    idle_timeout_seconds: u64,
    /// Seconds to wait for a TCP connection to a backend (then 502).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    upstream_connect_timeout_seconds: u64,
}

/// Flags of `plane dns`.
#[derive(Debug, Args)]
pub struct DnsArgs {
    /// The controller to read TXT values from, or several separated by commas.
    #[arg(long, env = "PLANE_CONTROLLER_URL", default_value = "http://127.0.0.1:8080")]
    controller_url: String,
    /// The controller's `--ctrl-token`, if it has one.
    #[arg(long, env = "PLANE_CTRL_TOKEN", hide_env_values = true)]
    ctrl_token: Option<String>,
    /// The zone this server answers for (clusters are this name or under it).
    #[arg(long)]
    zone: String,
    /// Address to bind.
    #[arg(long, default_value = "0.0.0.0")]
    host: IpAddr,
    /// The port to serve DNS on (UDP and TCP).
    #[arg(long, default_value_t = 53)]
    port: u16,
}

/// Flags of `plane dev`.
#[derive(Debug, Args)]
pub struct DevArgs {
    /// Where the stores and backend logs live.
    #[arg(long, default_value = ".plane")]
    data_dir: PathBuf,
    /// Controller port.
    #[arg(long, default_value_t = 8080)]
    controller_port: u16,
    /// Proxy port; the cluster is `localhost:<proxy port>`.
    #[arg(long, default_value_t = 9090)]
    proxy_port: u16,
    /// More programs backends may run (glob patterns; the demo backend is always allowed).
    #[arg(long = "allow-command")]
    allow_commands: Vec<String>,
    /// Start a demo backend (key `demo`) and print its URL.
    #[arg(long)]
    demo: bool,
    /// Seconds between SIGTERM and SIGKILL on a soft termination.
    #[arg(long, default_value_t = 10)]
    soft_terminate_grace_seconds: u64,
    /// Do not offer the Docker runtime even if an engine is reachable (by default,
    /// executables with an `image` run as containers when one is).
    #[arg(long)]
    no_docker: bool,
}

/// Cancelled on Ctrl-C or SIGTERM.
fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(s) => { s.recv().await; } None => std::future::pending().await } } => {}
        }
        tracing::info!("shutting down");
        t.cancel();
    });
    token
}

fn is_postgres(db: &str) -> bool {
    db.starts_with("postgres://") || db.starts_with("postgresql://")
}

/// Opens (and migrates) the store `db` names: a `postgres://` URL, a `sqlite:` URL or a
/// SQLite file path.
async fn open_store(db: &str) -> anyhow::Result<SharedStore> {
    if is_postgres(db) {
        let store = PostgresStore::connect(db)
            .await
            .with_context(|| format!("cannot open the PostgreSQL store {}", redact_url(db)))?;
        return Ok(Arc::new(store));
    }
    let store = if db.starts_with("sqlite:") {
        SqliteStore::open_url(db).await
    } else {
        SqliteStore::open(Path::new(db)).await
    }
    .with_context(|| format!("cannot open the store {db:?}"))?;
    Ok(Arc::new(store))
}

/// A database URL without its password, for messages.
fn redact_url(db: &str) -> String {
    match url_password_span(db) {
        Some((start, end)) => format!("{}***{}", &db[..start], &db[end..]),
        None => db.to_owned(),
    }
}

/// Where the password of `scheme://user:password@host…` is, if there is one.
fn url_password_span(db: &str) -> Option<(usize, usize)> {
    let authority_start = db.find("://")? + 3;
    let authority_end = db[authority_start..]
        .find('/')
        .map_or(db.len(), |i| authority_start + i);
    let at = db[authority_start..authority_end].rfind('@')? + authority_start;
    let colon = db[authority_start..at].find(':')? + authority_start;
    Some((colon + 1, at))
}

/// Flags of `plane migrate`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// The store: a `postgres://` URL, a SQLite file path, or a `sqlite:` URL.
    #[arg(long, env = "PLANE_DB")]
    db: String,
}

/// Runs `plane migrate`: opening a store applies its pending migrations.
pub async fn run_migrate(args: MigrateArgs) -> anyhow::Result<()> {
    open_store(&args.db).await?;
    tracing::info!(db = %redact_url(&args.db), "the store's migrations are applied");
    Ok(())
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot bind the {what} to {addr}"))
}

/// A secret flag's value; an empty one is refused (it would look set but match nothing
/// useful, or everything).
fn nonempty(value: Option<String>, flag: &str) -> anyhow::Result<Option<String>> {
    match value {
        Some(v) if v.trim().is_empty() => bail!("{flag} must not be empty"),
        Some(v) if v.trim() != v || v.chars().any(|c| c.is_control()) => {
            bail!("{flag} must not contain whitespace at its ends or control characters")
        }
        other => Ok(other),
    }
}

/// Runs `plane controller`.
pub async fn run_controller(args: ControllerArgs) -> anyhow::Result<()> {
    let store = open_store(&args.db).await?;
    let listener = bind(SocketAddr::new(args.host, args.port), "controller").await?;
    let url = args
        .controller_url
        .unwrap_or_else(|| format!("http://{}", SocketAddr::new(args.host, args.port)));
    let mut config = ControllerConfig::new(store, url, args.default_cluster);
    config.timings.lease = plane_types::lease::LeaseTimings::scaled(Duration::from_millis(args.lease_ms) / 6);
    config.timings.sweep_interval = Duration::from_millis(args.sweep_interval_ms);
    config.timings.drone_unhealthy_after = Duration::from_millis(args.drone_unhealthy_after_ms);
    config.timings.terminated_retention = Duration::from_secs(args.retain_terminated_hours.saturating_mul(3600));
    config.ctrl_token = nonempty(args.ctrl_token, "--ctrl-token")?;
    config.token_ttl = args.token_ttl_seconds.map(Duration::from_secs);
    if let Some(url) = &args.forward_auth {
        let ca = match &args.forward_auth_ca {
            Some(path) => Some(std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?),
            None => None,
        };
        config.forward_auth = Some(plane_controller::auth::ForwardAuth::new(url, ca.as_deref())?);
    }
    plane_controller::serve(listener, config, shutdown_on_signal()).await
}

/// Runs `plane drone`.
pub async fn run_drone(args: DroneArgs) -> anyhow::Result<()> {
    let process = args.runtimes.contains(&RuntimeChoice::Process);
    if process && args.allow_commands.is_empty() {
        bail!("--runtime process needs at least one --allow-command (the programs backends may run)");
    }
    if !process && !args.allow_commands.is_empty() {
        bail!("--allow-command applies to the process runtime; add --runtime process");
    }
    if args.metrics_interval_seconds == 0 {
        bail!("--metrics-interval-seconds must be at least 1");
    }
    if args.heartbeat_interval_ms == 0 {
        bail!("--heartbeat-interval-ms must be at least 1");
    }
    let docker = args
        .runtimes
        .contains(&RuntimeChoice::Docker)
        .then(|| args.docker.config(args.backend_host));
    let log_dir = args
        .log_dir
        .unwrap_or_else(|| args.db.parent().unwrap_or(Path::new(".")).join("logs"));
    let config = DroneConfig {
        controller_url: args.controller_url,
        name: args.name,
        cluster: args.cluster,
        pool: args.pool,
        db_path: args.db,
        process: ProcessRuntimeConfig {
            allow_commands: args.allow_commands,
            program_aliases: HashMap::new(),
            log_dir,
            bind_host: args.backend_host,
        },
        docker,
        timings: DroneTimings {
            soft_terminate_grace: Duration::from_secs(args.soft_terminate_grace_seconds),
            startup_timeout: Duration::from_secs(args.startup_timeout_seconds),
            metrics_interval: Duration::from_secs(args.metrics_interval_seconds),
            heartbeat_interval: Duration::from_millis(args.heartbeat_interval_ms),
            ..DroneTimings::default()
        },
        event_journal: args.event_journal,
        ctrl_token: nonempty(args.ctrl_token, "--ctrl-token")?,
    };
    // The drone lock comes before the watchdog check (see `plane_drone::watchdog::launch`).
    let _drone_lock = plane_drone::watchdog::DroneLock::acquire(&config.db_path).await;
    if args.no_watchdog {
        tracing::info!("not starting a watchdog (--no-watchdog)");
    } else {
        start_watchdog(&config, args.watchdog_exit_after_ms).await;
    }
    plane_drone::run(config, shutdown_on_signal()).await
}

/// Starts the drone's watchdog unless one runs. A failure is logged: the drone still
/// works, only without protection against outliving its leases while it is down.
async fn start_watchdog(config: &DroneConfig, exit_after_ms: Option<u64>) {
    let mut args: Vec<std::ffi::OsString> = Vec::new();
    if let Some(host) = config.docker.as_ref().and_then(|d| d.docker_host.as_ref()) {
        args.extend(["--docker-host".into(), host.into()]);
    }
    if let Some(ms) = exit_after_ms {
        args.extend(["--exit-after-ms".into(), ms.to_string().into()]);
    }
    let launched = match std::env::current_exe() {
        Ok(exe) => plane_drone::watchdog::launch(&exe, &config.db_path, &args)
            .await
            .map_err(anyhow::Error::from),
        Err(err) => Err(anyhow::Error::from(err).context("cannot find the plane executable")),
    };
    let log = plane_drone::watchdog::watchdog_log_path(&config.db_path);
    match launched {
        Ok(plane_drone::watchdog::Launched::Started { pid }) => {
            tracing::info!(pid, log = %log.display(), "started the watchdog")
        }
        Ok(plane_drone::watchdog::Launched::AlreadyRunning { pid }) => {
            tracing::info!(?pid, "a watchdog runs for this state store already")
        }
        Err(err) => tracing::error!(
            err = format!("{err:#}"),
            "could not start the watchdog: backends whose lease runs out while this drone is down will keep running"
        ),
    }
}

/// Runs `plane drone-watchdog`.
pub async fn run_watchdog(args: WatchdogArgs) -> anyhow::Result<()> {
    let mut config = plane_drone::watchdog::WatchdogConfig::new(args.db);
    config.docker_host = args.docker_host;
    config.poll_interval = Duration::from_millis(args.poll_interval_ms);
    config.exit_after = Duration::from_millis(args.exit_after_ms);
    plane_drone::watchdog::run(config, shutdown_on_signal()).await
}

/// Runs `plane proxy`.
pub async fn run_proxy(args: ProxyArgs) -> anyhow::Result<()> {
    let listener = bind(SocketAddr::new(args.host, args.http_port), "proxy").await?;
    let mut config = ProxyConfig::new(args.controller_url, args.cluster);
    config.route_wait = Duration::from_secs(args.route_wait_seconds);
    config.ctrl_token = nonempty(args.ctrl_token, "--ctrl-token")?;
    config.https_redirect_port = args.public_https_port;
    config.limits.max_header_bytes = args.max_header_bytes;
    config.limits.max_body_bytes = (args.max_body_bytes > 0).then_some(args.max_body_bytes);
    config.limits.header_read_timeout = Duration::from_secs(args.header_read_timeout_seconds);
    config.limits.idle_timeout = Duration::from_secs(args.idle_timeout_seconds);
    config.limits.upstream_connect_timeout = Duration::from_secs(args.upstream_connect_timeout_seconds);
    let Some(https_port) = args.https_port else {
        if args.cert_file.is_some() || args.acme_directory.is_some() {
            bail!("--cert-file and --acme-directory need --https-port");
        }
        return plane_proxy::run(listener, config, shutdown_on_signal()).await;
    };
    let https = bind(SocketAddr::new(args.host, https_port), "proxy (https)").await?;
    let certs = plane_proxy::CertStore::new();
    if let (Some(cert), Some(key)) = (&args.cert_file, &args.key_file) {
        certs.load_files(cert, key)?;
        return plane_proxy::run_https(Some(listener), https, certs, config, shutdown_on_signal()).await;
    }
    let Some(directory) = args.acme_directory else {
        bail!("--https-port needs --cert-file and --key-file, or --acme-directory");
    };
    plane_proxy::acme::certificate_names(config.cluster.as_str())?;
    let mut acme = plane_proxy::acme::AcmeConfig::new(directory, args.acme_cert_path);
    acme.contact_email = args.acme_email;
    acme.eab = args.acme_eab_kid.zip(args.acme_eab_hmac_key);
    acme.acme_server_ca = args.acme_server_ca;
    plane_proxy::run_https_acme(Some(listener), https, certs, acme, config, shutdown_on_signal()).await
}

/// Runs `plane dns`.
pub async fn run_dns(args: DnsArgs) -> anyhow::Result<()> {
    let addr = SocketAddr::new(args.host, args.port);
    let udp = tokio::net::UdpSocket::bind(addr)
        .await
        .with_context(|| format!("cannot bind the DNS server (UDP) to {addr}"))?;
    let tcp = bind(addr, "DNS server (TCP)").await?;
    let source = plane_dns::ControllerTxtSource::new(&args.controller_url, nonempty(args.ctrl_token, "--ctrl-token")?)?;
    plane_dns::run(
        udp,
        tcp,
        plane_dns::DnsConfig::new(args.zone),
        Arc::new(source),
        shutdown_on_signal(),
    )
    .await
}

/// Runs `plane dev`: controller, drone and proxy in one process.
pub async fn run_dev(args: DevArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create the data directory {}", args.data_dir.display()))?;
    let data_dir = args
        .data_dir
        .canonicalize()
        .context("cannot resolve the data directory")?;
    let cluster: ClusterName = format!("localhost:{}", args.proxy_port)
        .parse()
        .context("invalid proxy port")?;
    let controller_url = format!("http://127.0.0.1:{}", args.controller_port);
    let shutdown = shutdown_on_signal();

    let store = open_store(&data_dir.join("controller.db").to_string_lossy()).await?;
    let controller_listener = bind(
        SocketAddr::from(([127, 0, 0, 1], args.controller_port)),
        "controller (use --controller-port)",
    )
    .await?;
    let proxy_listener = bind(
        SocketAddr::from(([127, 0, 0, 1], args.proxy_port)),
        "proxy (use --proxy-port)",
    )
    .await?;

    let docker = if args.no_docker {
        None
    } else {
        let config = DockerRuntimeConfig {
            mount_base: Some(data_dir.join("mounts")),
            ..DockerRuntimeConfig::default()
        };
        if plane_drone::docker_reachable(&config).await {
            tracing::info!("Docker engine reachable: executables with an `image` run as containers");
            Some(config)
        } else {
            tracing::info!("no Docker engine reachable: only the process runtime is offered");
            None
        }
    };
    let exe = std::env::current_exe().context("cannot find the plane executable")?;
    let mut allow_commands = vec!["plane".to_owned(), exe.to_string_lossy().into_owned()];
    allow_commands.extend(args.allow_commands.iter().cloned());
    let drone_config = DroneConfig {
        controller_url: controller_url.clone(),
        name: None,
        cluster: cluster.clone(),
        pool: String::new(),
        db_path: data_dir.join("drone.db"),
        process: ProcessRuntimeConfig {
            allow_commands,
            program_aliases: HashMap::from([("plane".to_owned(), exe)]),
            log_dir: data_dir.join("logs"),
            bind_host: IpAddr::from([127, 0, 0, 1]),
        },
        docker,
        timings: DroneTimings {
            soft_terminate_grace: Duration::from_secs(args.soft_terminate_grace_seconds),
            ..DroneTimings::default()
        },
        event_journal: None,
        ctrl_token: None,
    };
    let controller_config = ControllerConfig::new(store, controller_url.clone(), Some(cluster.clone()));
    let proxy_config = ProxyConfig::new(controller_url.clone(), cluster.clone());

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(plane_controller::serve(
        controller_listener,
        controller_config,
        shutdown.clone(),
    ));
    tasks.spawn(plane_drone::run(drone_config, shutdown.clone()));
    tasks.spawn(plane_proxy::run(proxy_listener, proxy_config, shutdown.clone()));

    let client = PlaneClient::new(&controller_url)?;
    tokio::select! {
        r = wait_for_drone(&client, &cluster) => r?,
        Some(r) = tasks.join_next() => return component_ended(r, &shutdown, &mut tasks).await,
    }
    print_welcome(&controller_url, &cluster, &data_dir);
    if args.demo {
        start_demo(&client).await?;
    }
    match tasks.join_next().await {
        Some(r) => component_ended(r, &shutdown, &mut tasks).await,
        None => Ok(()),
    }
}

/// One component stopped: stop the others and report the first failure.
async fn component_ended(
    first: Result<anyhow::Result<()>, tokio::task::JoinError>,
    shutdown: &CancellationToken,
    tasks: &mut tokio::task::JoinSet<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    shutdown.cancel();
    let mut result = first.context("a component panicked").and_then(|r| r);
    while let Some(r) = tasks.join_next().await {
        if result.is_ok() {
            result = r.context("a component panicked").and_then(|r| r);
        }
    }
    result
}

async fn wait_for_drone(client: &PlaneClient, cluster: &ClusterName) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(state) = client.cluster_state(cluster).await {
            if state.drones.iter().any(|d| d.ready) && !state.proxies.is_empty() {
                return Ok(());
            }
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the drone and proxy did not connect to the controller within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn print_welcome(controller_url: &str, cluster: &ClusterName, data_dir: &Path) {
    println!(
        "\nPlane is running.\n  controller  {controller_url}\n  proxy       http://{cluster}  (cluster {cluster})\n  data        {}\n\n\
         Start a backend and open its URL in two browser tabs:\n  plane connect --key room1 --command \"plane demo-backend\"\n\n\
         Then try:\n  plane status <backend id>\n  plane terminate <backend id>\n  plane cluster-state --cluster {cluster}\n\n\
         Press Ctrl-C to stop.\n",
        data_dir.display()
    );
}

async fn start_demo(client: &PlaneClient) -> anyhow::Result<()> {
    let req = ConnectRequest {
        key: Some(KeyConfig {
            name: "demo".into(),
            namespace: String::new(),
            tag: String::new(),
        }),
        spawn_config: Some(SpawnConfig {
            id: None,
            cluster: None,
            pool: None,
            executable: serde_json::json!({"command": ["plane", "demo-backend"]}),
            lifetime_limit_seconds: None,
            max_idle_seconds: None,
            use_static_token: false,
            subdomain: None,
        }),
        user: None,
        auth: None,
    };
    let res = client.connect(&req).await.context("cannot start the demo backend")?;
    println!(
        "Demo backend {} ({}):\n  {}\n",
        res.backend_id,
        if res.spawned { "started" } else { "already running" },
        res.url
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted_from_store_urls() {
        assert_eq!(
            redact_url("postgres://plane:s3cr3t@db.example:5432/plane"),
            "postgres://plane:***@db.example:5432/plane"
        );
        assert_eq!(
            redact_url("postgres://plane@db.example/plane"),
            "postgres://plane@db.example/plane"
        );
        assert_eq!(redact_url("postgresql://u:p@h"), "postgresql://u:***@h");
        assert_eq!(redact_url("plane.db"), "plane.db");
        assert!(is_postgres("postgresql://h/db") && !is_postgres("sqlite:x.db"));
    }

    #[test]
    fn key_values_need_a_key() {
        assert_eq!(
            parse_key_value("max-size=10m").unwrap(),
            ("max-size".into(), "10m".into())
        );
        assert!(parse_key_value("=x").is_err());
        assert!(parse_key_value("novalue").is_err());
    }
}
