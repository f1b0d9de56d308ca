//! The command line of the `plane` binary: flags (clap derive) and the client commands.
//!
//! Server roles (`controller`, `drone`, `drone-watchdog`, `proxy`, `dev`) are dispatched
//! to `roles`; the demo backend to `plane_demo`. Client commands (`connect`, `status`,
//! `terminate`, `drain`, `undrain`, `cluster-state`, `revoke`) talk to a controller through
//! `plane_client` and are implemented here. Results go to stdout, errors are returned to
//! `main`.

use crate::roles;
use anyhow::{bail, Context as _};
use clap::{ArgGroup, Args, Parser, Subcommand};
use futures_util::StreamExt;
use plane_client::{ClientError, PlaneClient, StreamItem};
use plane_types::api::{
    ClusterState, ConnectRequest, ConnectResponse, KeyConfig, NodeName, RevokeRequest, SpawnConfig,
};
use plane_types::names::{BackendName, ClusterName, DroneName};
use plane_types::protocol::LoadProgress;
use plane_types::status::{BackendStatus, StatusEntry};
use serde_json::json;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

/// Writes a line to stdout; a closed stdout is an error, not a panic.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout(), $($arg)*).context("cannot write to stdout")?;
    }};
}

/// The controller used when neither `--controller` nor `PLANE_CONTROLLER` is given.
pub const DEFAULT_CONTROLLER: &str = "http://127.0.0.1:8080";
/// The environment variable that names the controller for client commands.
const CONTROLLER_ENV: &str = "PLANE_CONTROLLER";
/// How many times in a row a status stream may end early before `connect` and
/// `status --follow` give up.
const MAX_STREAM_RETRIES: u32 = 5;

/// Plane: a hash map of running processes. One binary for every role and for operators.
#[derive(Parser)]
#[command(name = "plane", version, propagate_version = true, max_term_width = 100)]
pub struct Cli {
    /// URL of the controller for client commands (also accepted after the subcommand)
    /// [env: PLANE_CONTROLLER] [default: http://127.0.0.1:8080]
    #[arg(long, value_name = "URL")]
    controller: Option<String>,

    #[command(subcommand)]
    command: Command,
}

/// The subcommands.
#[derive(Subcommand)]
enum Command {
    /// Run a controller: the HTTP API, and the hub drones and proxies connect to.
    Controller(roles::ControllerArgs),
    /// Run a drone: the agent that runs backends on this machine.
    Drone(Box<roles::DroneArgs>),
    /// Run a drone's watchdog: kills backends whose key lease ran out while their drone
    /// was down (`plane drone` starts one unless `--no-watchdog`).
    DroneWatchdog(roles::WatchdogArgs),
    /// Run a proxy: routes client traffic to backends.
    Proxy(roles::ProxyArgs),
    /// Run a DNS server answering ACME DNS-01 challenges from the controller.
    Dns(roles::DnsArgs),
    /// Run a controller, a drone and a proxy in one process, for development.
    Dev(roles::DevArgs),
    /// Get or create the backend for a key, and wait until it is ready.
    Connect(Box<ConnectArgs>),
    /// Show a backend's status.
    Status(StatusArgs),
    /// Terminate a backend.
    Terminate(TerminateArgs),
    /// Stop scheduling new backends on a drone.
    Drain(DrainArgs),
    /// Schedule new backends on a draining drone again.
    Undrain(DrainArgs),
    /// Show the drones and proxies of a cluster.
    ClusterState(ClusterStateArgs),
    /// Revoke a user's connection tokens for a backend.
    Revoke(RevokeArgs),
    /// Run the bundled multiplayer demo backend on 0.0.0.0:$PORT (default 8080).
    DemoBackend,
    /// Apply the store's migrations (the controller also does so when it starts).
    Migrate(roles::MigrateArgs),
}

impl Command {
    /// Whether this runs a server role (or another long-running or local command)
    /// rather than a client command talking to a controller.
    fn is_role(&self) -> bool {
        matches!(
            self,
            Command::Controller(_)
                | Command::Drone(_)
                | Command::DroneWatchdog(_)
                | Command::Proxy(_)
                | Command::Dns(_)
                | Command::Dev(_)
                | Command::DemoBackend
                | Command::Migrate(_)
        )
    }
}

impl Cli {
    /// The default log filter when `RUST_LOG` is not set: `info` for servers (but
    /// `warn` for hickory-server, which logs every DNS query at `info`), `warn` for
    /// client commands.
    pub fn default_log_filter(&self) -> &'static str {
        if self.command.is_role() {
            "info,hickory_server=warn"
        } else {
            "warn"
        }
    }
}

/// How to reach the controller; part of every client command.
#[derive(Debug, Args)]
struct ClientOpts {
    /// URL of the controller [env: PLANE_CONTROLLER] [default: http://127.0.0.1:8080]
    #[arg(long, value_name = "URL")]
    controller: Option<String>,
    /// Bearer token for the controller's control API (its `--ctrl-token`).
    #[arg(
        long,
        alias = "ctrl-token",
        value_name = "TOKEN",
        env = "PLANE_CTRL_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
}

impl ClientOpts {
    /// The client for the controller named after the subcommand, else before it, else
    /// by `PLANE_CONTROLLER`, else [`DEFAULT_CONTROLLER`].
    fn client(&self, global: Option<&str>) -> anyhow::Result<PlaneClient> {
        let from_env = std::env::var(CONTROLLER_ENV).ok().filter(|v| !v.trim().is_empty());
        let url = self
            .controller
            .as_deref()
            .or(global)
            .or(from_env.as_deref())
            .unwrap_or(DEFAULT_CONTROLLER);
        let client = PlaneClient::new(url)?;
        Ok(match &self.token {
            Some(token) => client.with_bearer_token(token),
            None => client,
        })
    }
}

/// Flags of `plane connect`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("executable").args(["command", "image", "executable_json"])))]
struct ConnectArgs {
    #[command(flatten)]
    client: ClientOpts,

    /// Key name; without it a random key is used, so a new backend always starts.
    #[arg(long, value_name = "NAME")]
    key: Option<String>,
    /// Key namespace [default: ""].
    #[arg(long, requires = "key")]
    namespace: Option<String>,
    /// Key tag: connecting to a live key with another tag fails [default: ""].
    #[arg(long, requires = "key")]
    tag: Option<String>,

    /// Run a process backend: a command line, split into words like a shell would.
    #[arg(long, value_name = "COMMAND LINE")]
    command: Option<String>,
    /// Run a Docker backend from this image.
    #[arg(long, value_name = "IMAGE")]
    image: Option<String>,
    /// When to pull the image: `IfNotPresent` (default), `Always` or `Never`.
    #[arg(long, value_name = "POLICY", requires = "image", value_parser = ["IfNotPresent", "Always", "Never"])]
    pull_policy: Option<String>,
    /// Run a backend from this executable JSON (the whole `spawn_config.executable`,
    /// e.g. with `resource_limits` or `mount`).
    #[arg(long = "executable", value_name = "JSON", value_parser = parse_json, conflicts_with = "env")]
    executable_json: Option<serde_json::Value>,
    /// An environment variable for the backend (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env_var, requires = "executable")]
    env: Vec<(String, String)>,
    /// Working directory of a process backend.
    #[arg(long, value_name = "DIR", requires = "command", conflicts_with = "image")]
    cwd: Option<String>,
    /// Cluster to spawn on [default: the controller's default cluster].
    #[arg(long, requires = "executable")]
    cluster: Option<ClusterName>,
    /// Pool of drones within the cluster.
    #[arg(long, requires = "executable")]
    pool: Option<String>,
    /// Stop the backend after this many seconds without a connection.
    #[arg(long, value_name = "SECONDS", requires = "executable")]
    max_idle_seconds: Option<u64>,
    /// Stop the backend this many seconds after it started.
    #[arg(long, value_name = "SECONDS", requires = "executable")]
    lifetime_limit_seconds: Option<u64>,
    /// Issue one static token (`s.…`) instead of per-connection tokens.
    #[arg(long, requires = "executable")]
    static_token: bool,
    /// Serve the backend under this subdomain of the cluster.
    #[arg(long, requires = "executable")]
    subdomain: Option<String>,

    /// The user the token is issued to (reaches the backend as `x-verified-username`).
    #[arg(long)]
    user: Option<String>,
    /// JSON bound to the token (reaches the backend as `x-verified-user-data`).
    #[arg(long, value_name = "JSON", value_parser = parse_json)]
    auth: Option<serde_json::Value>,

    /// Print the connect response and exit without waiting for the backend.
    #[arg(long)]
    no_wait: bool,
    /// Print the connect response as JSON (progress then goes to stderr).
    #[arg(long)]
    json: bool,
}

/// Flags of `plane status`.
#[derive(Debug, Args)]
struct StatusArgs {
    #[command(flatten)]
    client: ClientOpts,
    /// The backend id.
    backend: BackendName,
    /// Keep printing status changes until the backend is terminated.
    #[arg(long, short)]
    follow: bool,
    /// Print status entries as JSON, one per line.
    #[arg(long)]
    json: bool,
}

/// Flags of `plane terminate`.
#[derive(Debug, Args)]
struct TerminateArgs {
    #[command(flatten)]
    client: ClientOpts,
    /// The backend id.
    backend: BackendName,
    /// Kill at once (SIGKILL) instead of SIGTERM and a grace period.
    #[arg(long)]
    hard: bool,
}

/// Flags of `plane drain` and `plane undrain`.
#[derive(Debug, Args)]
struct DrainArgs {
    #[command(flatten)]
    client: ClientOpts,
    /// The cluster of the drone.
    #[arg(long)]
    cluster: ClusterName,
    /// The drone name (`dr-…`).
    drone: DroneName,
}

/// Flags of `plane cluster-state`.
#[derive(Debug, Args)]
struct ClusterStateArgs {
    #[command(flatten)]
    client: ClientOpts,
    /// The cluster.
    #[arg(long)]
    cluster: ClusterName,
    /// Print the state as JSON instead of tables.
    #[arg(long)]
    json: bool,
}

/// Flags of `plane revoke`.
#[derive(Debug, Args)]
struct RevokeArgs {
    #[command(flatten)]
    client: ClientOpts,
    /// The backend id.
    backend: BackendName,
    /// The user whose tokens are revoked.
    #[arg(long)]
    user: String,
}

fn parse_env_var(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("`{s}` is not of the form KEY=VALUE")),
    }
}

fn parse_json(s: &str) -> Result<serde_json::Value, String> {
    serde_json::from_str(s).map_err(|e| format!("not valid JSON: {e}"))
}

/// Runs the command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let global = cli.controller.as_deref();
    if global.is_some() && cli.command.is_role() {
        bail!("`--controller` before the subcommand applies to client commands only");
    }
    match cli.command {
        Command::Controller(args) => roles::run_controller(args).await,
        Command::Drone(args) => roles::run_drone(*args).await,
        Command::DroneWatchdog(args) => roles::run_watchdog(args).await,
        Command::Proxy(args) => roles::run_proxy(args).await,
        Command::Dns(args) => roles::run_dns(args).await,
        Command::Dev(args) => roles::run_dev(args).await,
        Command::DemoBackend => plane_demo::run().await,
        Command::Migrate(args) => roles::run_migrate(args).await,
        Command::Connect(args) => connect(&args.client.client(global)?, &args).await,
        Command::Status(args) => status(&args.client.client(global)?, &args).await,
        Command::Terminate(args) => {
            let client = args.client.client(global)?;
            if args.hard {
                client.hard_terminate(&args.backend).await?;
                say!("hard termination of backend {} requested", args.backend);
            } else {
                client.soft_terminate(&args.backend).await?;
                say!("termination of backend {} requested", args.backend);
            }
            Ok(())
        }
        Command::Drain(args) => {
            let response = args.client.client(global)?.drain(&args.cluster, &args.drone).await?;
            if response.updated {
                say!("drone {} of cluster {} is now draining", args.drone, args.cluster);
            } else {
                say!("drone {} of cluster {} was already draining", args.drone, args.cluster);
            }
            Ok(())
        }
        Command::Undrain(args) => {
            let response = args.client.client(global)?.undrain(&args.cluster, &args.drone).await?;
            if response.updated {
                say!(
                    "drone {} of cluster {} takes new backends again",
                    args.drone,
                    args.cluster
                );
            } else {
                say!("drone {} of cluster {} was not draining", args.drone, args.cluster);
            }
            Ok(())
        }
        Command::ClusterState(args) => {
            let state = args.client.client(global)?.cluster_state(&args.cluster).await?;
            if args.json {
                say!("{}", serde_json::to_string_pretty(&state)?);
            } else {
                say!("{}", cluster_tables(&state).trim_end());
            }
            Ok(())
        }
        Command::Revoke(args) => {
            let client = args.client.client(global)?;
            client
                .revoke(&RevokeRequest {
                    backend_id: args.backend.clone(),
                    user: args.user.clone(),
                })
                .await?;
            say!("revoked the tokens of user {} for backend {}", args.user, args.backend);
            Ok(())
        }
    }
}

impl ConnectArgs {
    /// The connect request these flags describe, validated as far as the client can.
    fn request(&self) -> anyhow::Result<ConnectRequest> {
        let key = match &self.key {
            Some(name) => {
                let key = KeyConfig {
                    name: name.clone(),
                    namespace: self.namespace.clone().unwrap_or_default(),
                    tag: self.tag.clone().unwrap_or_default(),
                };
                key.validate()?;
                Some(key)
            }
            None => None,
        };
        let env: BTreeMap<String, String> = self.env.iter().cloned().collect();
        let executable = match (&self.command, &self.image) {
            _ if self.executable_json.is_some() => self.executable_json.clone(),
            (Some(line), _) => {
                let words = shlex::split(line)
                    .with_context(|| format!("cannot split `{line}` into words: unbalanced quotes"))?;
                if words.is_empty() {
                    bail!("`--command` must name a program");
                }
                let mut exe = json!({ "command": words });
                if !env.is_empty() {
                    exe["env"] = json!(env);
                }
                if let Some(cwd) = &self.cwd {
                    exe["cwd"] = json!(cwd);
                }
                Some(exe)
            }
            (None, Some(image)) => {
                let mut exe = json!({ "image": image });
                if !env.is_empty() {
                    exe["env"] = json!(env);
                }
                if let Some(policy) = &self.pull_policy {
                    exe["pull_policy"] = json!(policy);
                }
                Some(exe)
            }
            (None, None) => None,
        };
        let spawn_config = match executable {
            Some(executable) => {
                let config = SpawnConfig {
                    id: None,
                    cluster: self.cluster.clone(),
                    pool: self.pool.clone(),
                    executable,
                    lifetime_limit_seconds: self.lifetime_limit_seconds,
                    max_idle_seconds: self.max_idle_seconds,
                    use_static_token: self.static_token,
                    subdomain: self.subdomain.clone(),
                };
                config.executable().map_err(anyhow::Error::msg)?;
                Some(config)
            }
            None => None,
        };
        Ok(ConnectRequest {
            key,
            spawn_config,
            user: self.user.clone(),
            auth: self.auth.clone(),
        })
    }
}

/// `plane connect`: connects, then follows the status stream until ready or terminated.
async fn connect(client: &PlaneClient, args: &ConnectArgs) -> anyhow::Result<()> {
    let request = args.request()?;
    let started = Instant::now();
    let response = client.connect(&request).await?;
    tracing::debug!(backend = %response.backend_id, spawned = response.spawned, "connected");
    // With --json, stdout carries only the JSON; progress goes to stderr.
    let progress = |line: String| -> anyhow::Result<()> {
        if args.json {
            eprintln!("{line}");
        } else {
            say!("{line}");
        }
        Ok(())
    };
    if args.json {
        say!("{}", serde_json::to_string_pretty(&response)?);
    } else {
        print_connect_response(&response)?;
    }
    if args.no_wait {
        if !args.json {
            say!("{}", response.url);
        }
        return Ok(());
    }
    let bar = std::cell::RefCell::new(ProgressBar::new(args.json));
    let mut on_progress = |p: &LoadProgress| bar.borrow_mut().show(p);
    let last = follow_status(client, &response.backend_id, Some(&mut on_progress), |entry| {
        bar.borrow_mut().clear();
        progress(format!(
            "{:>7} ms  {}",
            started.elapsed().as_millis(),
            describe_entry(entry)
        ))?;
        Ok(if entry.status == BackendStatus::Ready {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        })
    })
    .await?;
    if last.status == BackendStatus::Ready {
        if args.json {
            eprintln!("ready: {}", response.url);
        } else {
            say!("{}", response.url);
        }
        Ok(())
    } else {
        bail!(
            "backend {} ended before it became ready: {}",
            response.backend_id,
            describe_entry(&last)
        )
    }
}

fn print_connect_response(r: &ConnectResponse) -> anyhow::Result<()> {
    say!("backend   {}", r.backend_id);
    say!("spawned   {}", r.spawned);
    say!("drone     {}", r.drone.as_ref().map_or("-", |d| d.as_str()));
    say!("status    {}", r.status);
    Ok(())
}

/// `plane status`.
async fn status(client: &PlaneClient, args: &StatusArgs) -> anyhow::Result<()> {
    let print = |entry: &StatusEntry| -> anyhow::Result<()> {
        if args.json {
            say!("{}", serde_json::to_string(entry)?);
        } else {
            say!("{}  {}", format_epoch_millis(entry.time), describe_entry(entry));
        }
        Ok(())
    };
    if !args.follow {
        return print(&client.status(&args.backend).await?);
    }
    follow_status(client, &args.backend, None, |entry| {
        print(entry).map(ControlFlow::Continue)
    })
    .await?;
    Ok(())
}

/// Follows a backend's status stream, calling `on_entry` once per new status, until it
/// breaks or the backend is terminated; returns the last entry. Reconnects (skipping
/// what was seen) when the stream ends early or the connection fails.
async fn follow_status(
    client: &PlaneClient,
    backend: &BackendName,
    mut on_progress: Option<&mut dyn FnMut(&LoadProgress)>,
    mut on_entry: impl FnMut(&StatusEntry) -> anyhow::Result<ControlFlow<()>>,
) -> anyhow::Result<StatusEntry> {
    let mut last: Option<StatusEntry> = None;
    let mut failures = 0;
    loop {
        let last_status = last.as_ref().map(|e| e.status);
        let failure = match client.status_stream_with_progress(backend, last_status).await {
            Err(err) => anyhow::Error::from(err),
            Ok(mut stream) => loop {
                match stream.next().await {
                    None => break None,
                    Some(Err(ClientError::Decode(msg))) => {
                        tracing::warn!(%backend, %msg, "skipping a bad status event")
                    }
                    Some(Err(err)) => break Some(err),
                    Some(Ok(StreamItem::Progress(p))) => {
                        if let Some(f) = on_progress.as_mut() {
                            f(&p);
                        }
                    }
                    Some(Ok(StreamItem::Status(entry))) => {
                        if last.as_ref().is_some_and(|l| entry.status <= l.status) {
                            continue; // Already seen (statuses only move forward).
                        }
                        failures = 0;
                        if on_entry(&entry)?.is_break() || entry.status.is_terminal() {
                            return Ok(entry);
                        }
                        last = Some(entry);
                    }
                }
            }
            .map_or_else(|| anyhow::anyhow!("the status stream ended early"), anyhow::Error::from),
        };
        // Errors from the controller itself (e.g. an unknown backend) are final.
        if let Some(ClientError::Api { .. } | ClientError::UnexpectedResponse { .. }) =
            failure.downcast_ref::<ClientError>()
        {
            return Err(failure);
        }
        failures += 1;
        if failures > MAX_STREAM_RETRIES {
            return Err(failure.context(format!("cannot follow the status of backend {backend}")));
        }
        let delay = Duration::from_millis(200 << failures.min(4));
        tracing::warn!(%backend, error = %format!("{failure:#}"), ?delay, "status stream interrupted; reconnecting");
        tokio::time::sleep(delay).await;
    }
}

/// The loading progress of `plane connect`, on stderr: one line redrawn in place on a
/// terminal, else a line per report. Nothing in `--json` mode.
struct ProgressBar {
    enabled: bool,
    tty: bool,
    drawn: bool,
}

impl ProgressBar {
    fn new(json: bool) -> ProgressBar {
        use std::io::IsTerminal;
        ProgressBar {
            enabled: !json,
            tty: std::io::stderr().is_terminal(),
            drawn: false,
        }
    }

    fn show(&mut self, p: &LoadProgress) {
        if !self.enabled {
            return;
        }
        let line = progress_line(p);
        if self.tty {
            eprint!("\r\x1b[2K{line}");
            self.drawn = true;
        } else {
            eprintln!("{line}");
        }
    }

    fn clear(&mut self) {
        if self.drawn {
            eprint!("\r\x1b[2K");
            self.drawn = false;
        }
    }
}

/// `loading [##########----------]  50%  12.5/25.0 MB  pulling 3 of 7 layers`.
fn progress_line(p: &LoadProgress) -> String {
    const WIDTH: usize = 20;
    let fraction = p.fraction.or_else(|| match (p.bytes_done, p.bytes_total) {
        (Some(done), Some(total)) if total > 0 => Some(done as f32 / total as f32),
        _ => None,
    });
    let mut line = String::from("loading ");
    if let Some(f) = fraction {
        let f = f.clamp(0.0, 1.0);
        let filled = (f * WIDTH as f32).round() as usize;
        let _ = write!(
            line,
            "[{}{}] {:>3.0}%",
            "#".repeat(filled),
            "-".repeat(WIDTH - filled),
            f * 100.0
        );
    }
    if let (Some(done), Some(total)) = (p.bytes_done, p.bytes_total) {
        let mb = |b: u64| b as f64 / 1_000_000.0;
        let _ = write!(line, "  {:.1}/{:.1} MB", mb(done), mb(total));
    }
    if !p.message.is_empty() {
        let _ = write!(line, "  {}", p.message);
    }
    line.trim_end().to_owned()
}

/// `ready`, or `terminated (reason swept, soft, exit error)`.
fn describe_entry(entry: &StatusEntry) -> String {
    let mut details = Vec::new();
    if let Some(reason) = entry.termination_reason {
        details.push(format!("reason {}", reason.as_str()));
    }
    if let Some(kind) = entry.termination_kind {
        details.push(kind.as_str().to_owned());
    }
    // `exit_error: false` also covers "no exit code" (a backend that never ran), so
    // only an error is worth saying.
    if entry.exit_error == Some(true) {
        details.push("exited with an error".to_owned());
    }
    let mut text = if details.is_empty() {
        entry.status.to_string()
    } else {
        format!("{} ({})", entry.status, details.join(", "))
    };
    if let Some(message) = &entry.message {
        let _ = write!(text, ": {message}");
    }
    text
}

/// Milliseconds since the epoch as `YYYY-MM-DD HH:MM:SS.mmm UTC`.
fn format_epoch_millis(ms: u64) -> String {
    let (days, ms_of_day) = ((ms / 86_400_000) as i64, ms % 86_400_000);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s, milli) = (
        ms_of_day / 3_600_000,
        ms_of_day / 60_000 % 60,
        ms_of_day / 1000 % 60,
        ms_of_day % 1000,
    );
    format!("{year:04}-{month:02}-{day:02} {h:02}:{m:02}:{s:02}.{milli:03} UTC")
}

/// Text tables of the drones and proxies of a cluster.
fn cluster_tables(state: &ClusterState) -> String {
    fn age(a: Option<f64>) -> String {
        a.map_or_else(|| "-".to_owned(), |a| format!("{a:.1}s"))
    }
    fn yes_no(b: bool) -> &'static str {
        if b {
            "yes"
        } else {
            "no"
        }
    }
    fn node_name(n: &NodeName) -> &str {
        match n {
            NodeName::Drone(d) => d.as_str(),
            NodeName::Proxy(p) => p.as_str(),
        }
    }
    let mut out = String::new();
    let drones: Vec<Vec<String>> = state
        .drones
        .iter()
        .map(|d| {
            vec![
                node_name(&d.node.name).to_owned(),
                yes_no(d.ready).to_owned(),
                yes_no(d.draining).to_owned(),
                d.backend_count.to_string(),
                if d.runtimes.is_empty() {
                    "-".to_owned()
                } else {
                    d.runtimes.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(",")
                },
                age(d.last_heartbeat_age),
                d.node.plane_version.clone(),
                d.node.controller.as_ref().map_or("-", |c| c.as_str()).to_owned(),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "DRONE",
            "READY",
            "DRAINING",
            "BACKENDS",
            "RUNTIMES",
            "HEARTBEAT",
            "VERSION",
            "CONTROLLER",
        ],
        &drones,
    ));
    out.push('\n');
    let proxies: Vec<Vec<String>> = state
        .proxies
        .iter()
        .map(|p| {
            vec![
                node_name(&p.name).to_owned(),
                p.plane_version.clone(),
                p.controller.as_ref().map_or("-", |c| c.as_str()).to_owned(),
                age(p.controller_heartbeat_age),
            ]
        })
        .collect();
    out.push_str(&table(
        &["PROXY", "VERSION", "CONTROLLER", "CONTROLLER HEARTBEAT"],
        &proxies,
    ));
    out
}

/// A left-aligned text table; `(none)` under the header when there are no rows.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (cell, w) in cells.zip(&widths) {
            let _ = write!(text, "{cell:<w$}  ");
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    if rows.is_empty() {
        out.push_str("(none)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use plane_types::api::{DroneState, NodeState};
    use plane_types::executable::RuntimeKind;
    use plane_types::status::{TerminationKind, TerminationReason};

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("plane").chain(args.iter().copied()))
    }

    fn connect_request(args: &[&str]) -> anyhow::Result<ConnectRequest> {
        let cli = parse(&[&["connect"], args].concat()).map_err(|e| anyhow::anyhow!("{e}"))?;
        match cli.command {
            Command::Connect(c) => c.request(),
            _ => panic!("not parsed as `connect`"),
        }
    }

    #[test]
    fn command_definition_is_valid() {
        Cli::command().debug_assert();
    }

    #[test]
    fn connect_with_a_process() {
        let req = connect_request(&[
            "--key",
            "room-1",
            "--namespace",
            "ns",
            "--command",
            "plane demo-backend --flag 'two words'",
            "--env",
            "A=b=c",
            "--env",
            "X=",
            "--cwd",
            "/tmp",
            "--max-idle-seconds",
            "30",
            "--user",
            "alice",
            "--auth",
            r#"{"role":"admin"}"#,
        ])
        .unwrap();
        assert_eq!(
            serde_json::to_value(&req).unwrap(),
            json!({
                "key": {"name": "room-1", "namespace": "ns", "tag": ""},
                "spawn_config": {
                    "id": null, "cluster": null, "pool": null,
                    "executable": {"command": ["plane", "demo-backend", "--flag", "two words"], "env": {"A": "b=c", "X": ""}, "cwd": "/tmp"},
                    "lifetime_limit_seconds": null, "max_idle_seconds": 30, "use_static_token": false, "subdomain": null
                },
                "user": "alice",
                "auth": {"role": "admin"}
            })
        );
    }

    #[test]
    fn connect_with_an_image() {
        let req = connect_request(&[
            "--image",
            "ghcr.io/x/y:1",
            "--cluster",
            "localhost:9090",
            "--pool",
            "gpu",
            "--static-token",
            "--subdomain",
            "app",
            "--lifetime-limit-seconds",
            "60",
        ])
        .unwrap();
        assert!(req.key.is_none());
        let spawn = req.spawn_config.unwrap();
        assert_eq!(spawn.executable, json!({"image": "ghcr.io/x/y:1"}));
        assert_eq!(spawn.cluster.as_ref().unwrap().as_str(), "localhost:9090");
        assert_eq!(spawn.pool(), "gpu");
        assert!(spawn.use_static_token);
        assert_eq!(spawn.subdomain.as_deref(), Some("app"));
        assert_eq!(spawn.lifetime_limit_seconds, Some(60));
    }

    #[test]
    fn connect_with_a_pull_policy_or_a_whole_executable() {
        let req = connect_request(&["--image", "x:1", "--pull-policy", "Never"]).unwrap();
        assert_eq!(
            req.spawn_config.unwrap().executable,
            json!({"image": "x:1", "pull_policy": "Never"})
        );
        let req = connect_request(&["--executable", r#"{"image": "x:1", "mount": true}"#]).unwrap();
        assert_eq!(
            req.spawn_config.unwrap().executable,
            json!({"image": "x:1", "mount": true})
        );
        for bad in [
            &["--image", "x", "--pull-policy", "Sometimes"][..],
            &["--pull-policy", "Never"],
            &["--executable", "{}", "--image", "x"],
        ] {
            let err = connect_request(bad).expect_err(&format!("{bad:?} should fail"));
            assert!(err.to_string().contains("error:"), "{bad:?} fails in clap: {err}");
        }
        let err = connect_request(&["--executable", r#"{"image": "x", "mount": "../up"}"#]).unwrap_err();
        assert!(err.to_string().contains("mount"), "{err}");
    }

    #[test]
    fn connect_without_an_executable() {
        let req = connect_request(&["--key", "k"]).unwrap();
        assert!(req.spawn_config.is_none());
        assert_eq!(req.key.unwrap().name, "k");
    }

    #[test]
    fn connect_usage_errors() {
        for bad in [
            &["--command", "a", "--image", "b"][..],
            &["--namespace", "x"],
            &["--cluster", "localhost:1"],
            &["--env", "A=b"],
            &["--image", "x", "--cwd", "/"],
            &["--image", "x", "--env", "novalue"],
            &["--image", "x", "--cluster", "Bad Cluster"],
            &["--auth", "{not json"],
        ] {
            let err = connect_request(bad).expect_err(&format!("{bad:?} should fail"));
            assert!(err.to_string().contains("error:"), "{bad:?} fails in clap: {err}");
        }
        // Errors found after parsing.
        for bad in [
            &["--command", "'unbalanced"][..],
            &["--command", ""],
            &["--key", "a b"],
            &["--image", "x", "--subdomain", "Not_Valid"],
            &["--image", "x", "--pool", "../p"],
            &["--image", ""],
        ] {
            assert!(connect_request(bad).is_err(), "{bad:?} should fail");
        }
    }

    #[test]
    fn other_commands_parse() {
        assert!(matches!(
            parse(&["status", "abc", "--follow"]).unwrap().command,
            Command::Status(StatusArgs { follow: true, .. })
        ));
        assert!(parse(&["status", "Not-Valid"]).is_err());
        assert!(matches!(
            parse(&["terminate", "abc", "--hard"]).unwrap().command,
            Command::Terminate(TerminateArgs { hard: true, .. })
        ));
        assert!(parse(&["drain", "--cluster", "c.example.com", "dr-1"]).is_ok());
        assert!(parse(&["drain", "--cluster", "c.example.com", "px-1"]).is_err());
        assert!(parse(&["cluster-state", "--cluster", "c.example.com", "--json"]).is_ok());
        assert!(parse(&["revoke", "abc", "--user", "u"]).is_ok());
        assert!(parse(&["revoke", "abc"]).is_err());
        assert!(parse(&["demo-backend"]).is_ok());
        // The roles' own flags belong to `roles`; only check the subcommands exist.
        for role in ["controller", "drone", "drone-watchdog", "proxy", "dev"] {
            let err = parse(&[role, "--help"]).err().expect("--help stops parsing");
            assert_eq!(err.kind(), clap::error::ErrorKind::DisplayHelp, "{role}");
        }
    }

    #[test]
    fn controller_url_resolution() {
        let cli = parse(&["--controller", "http://a:1", "status", "abc"]).unwrap();
        let Command::Status(args) = &cli.command else { panic!() };
        assert_eq!(
            args.client
                .client(cli.controller.as_deref())
                .unwrap()
                .controller_url()
                .as_str(),
            "http://a:1/"
        );
        let cli = parse(&[
            "--controller",
            "http://a:1",
            "status",
            "abc",
            "--controller",
            "http://b:2",
        ])
        .unwrap();
        let Command::Status(args) = &cli.command else { panic!() };
        assert_eq!(
            args.client
                .client(cli.controller.as_deref())
                .unwrap()
                .controller_url()
                .as_str(),
            "http://b:2/"
        );
        let cli = parse(&["status", "abc", "--controller", "not a url"]).unwrap();
        let Command::Status(args) = &cli.command else { panic!() };
        assert!(args.client.client(None).is_err());
    }

    #[test]
    fn log_filters() {
        assert_eq!(
            parse(&["demo-backend"]).unwrap().default_log_filter(),
            "info,hickory_server=warn"
        );
        assert_eq!(
            parse(&["dev"]).unwrap().default_log_filter(),
            "info,hickory_server=warn"
        );
        assert_eq!(parse(&["status", "abc"]).unwrap().default_log_filter(), "warn");
    }

    #[test]
    fn progress_lines() {
        let mut p = LoadProgress::message("pulling 3 of 7 layers");
        assert_eq!(progress_line(&p), "loading   pulling 3 of 7 layers");
        p.bytes_done = Some(12_500_000);
        p.bytes_total = Some(25_000_000);
        assert_eq!(
            progress_line(&p),
            "loading [##########----------]  50%  12.5/25.0 MB  pulling 3 of 7 layers"
        );
        p.fraction = Some(1.5);
        assert!(progress_line(&p).starts_with("loading [####################] 100%"));
    }

    #[test]
    fn entries_are_described() {
        let mut e = StatusEntry {
            status: BackendStatus::Ready,
            time: 0,
            termination_reason: None,
            termination_kind: None,
            exit_error: None,
            message: None,
        };
        assert_eq!(describe_entry(&e), "ready");
        e.status = BackendStatus::Terminated;
        e.termination_reason = Some(TerminationReason::Swept);
        e.termination_kind = Some(TerminationKind::Soft);
        e.exit_error = Some(false);
        assert_eq!(describe_entry(&e), "terminated (reason swept, soft)");
        e.exit_error = Some(true);
        e.message = Some("exited with code 3".into());
        assert_eq!(
            describe_entry(&e),
            "terminated (reason swept, soft, exited with an error): exited with code 3"
        );
    }

    #[test]
    fn epoch_millis_are_formatted() {
        assert_eq!(format_epoch_millis(0), "1970-01-01 00:00:00.000 UTC");
        assert_eq!(format_epoch_millis(951_782_400_000), "2000-02-29 00:00:00.000 UTC");
        assert_eq!(format_epoch_millis(1_700_000_000_123), "2023-11-14 22:13:20.123 UTC");
        assert_eq!(format_epoch_millis(4_102_444_799_999), "2099-12-31 23:59:59.999 UTC");
    }

    #[test]
    fn cluster_state_tables() {
        let node = |name: NodeName| NodeState {
            name,
            plane_version: "0.1.0".into(),
            plane_hash: "h".into(),
            controller: Some("co-1".parse().unwrap()),
            controller_heartbeat_age: Some(0.25),
        };
        let state = ClusterState {
            drones: vec![DroneState {
                ready: true,
                draining: false,
                last_heartbeat_age: Some(1.0),
                backend_count: 3,
                runtimes: vec![RuntimeKind::Docker, RuntimeKind::Process],
                node: node(NodeName::Drone("dr-abc".parse().unwrap())),
            }],
            proxies: vec![],
        };
        let text = cluster_tables(&state);
        assert_eq!(
            text,
            "DRONE   READY  DRAINING  BACKENDS  RUNTIMES        HEARTBEAT  VERSION  CONTROLLER\n\
             dr-abc  yes    no        3         docker,process  1.0s       0.1.0    co-1\n\
             \n\
             PROXY  VERSION  CONTROLLER  CONTROLLER HEARTBEAT\n\
             (none)\n"
        );
    }
}
