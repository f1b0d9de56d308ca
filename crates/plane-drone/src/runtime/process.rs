//! The process runtime: each backend is a child process of the drone, in its own process
//! group, listening on a port the drone picked.
//!
//! * Only programs matching the configured allow list run (see
//!   [`ProcessRuntimeConfig::allow_commands`]).
//! * stdout and stderr are appended to `<log_dir>/<backend id>.log`; stdin is `/dev/null`.
//!   Nothing ties the child to the drone (no pipes, no kill-on-drop), so backends survive a
//!   drone restart.
//! * A backend is identified by its pid **and** the start time of that pid
//!   (`/proc/<pid>/stat` field 22), so a recycled pid is never mistaken for it and never
//!   signalled.
//! * Signals go to the whole process group. When the leader exits, what is left of its
//!   group is killed.
//! * Exits of our own children come from `wait`; adopted processes (after a drone restart
//!   they are no longer our children) are polled through `/proc`, exit code unknown.
//! * Metrics sum RSS and CPU time over the backend's process group (descendants that were
//!   reparented but stayed in the group count too). A process group's members can only
//!   be found by reading every `/proc/<pid>/stat`, so that scan is shared: one scan gives
//!   every group's usage, and each backend's sample reads a scan at most
//!   [`PROC_SCAN_MAX_AGE`] old (a new scan is made, one at a time, when the latest is
//!   older, or predates a group it lacks). The cost is one pass over `/proc` per
//!   [`PROC_SCAN_MAX_AGE`] at most, whatever the number of backends, instead of one pass
//!   per backend per sample.

use super::{
    wait_for_http, Adoption, BackendMetrics, BackendSpec, ExitInfo, LoadProgress, Runtime, RuntimeError, RuntimeHandle,
    StartedBackend, StopSignal,
};
use crate::config::ProcessRuntimeConfig;
use async_trait::async_trait;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use plane_types::executable::{Executable, ProcessExecutable, RuntimeKind};
use plane_types::names::BackendName;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// How often an adopted process is checked for exit.
const ADOPTED_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// The oldest shared `/proc` scan a metrics sample may be read from (see the module docs).
const PROC_SCAN_MAX_AGE: Duration = Duration::from_secs(1);

/// CPU samples older than this are dropped (their pids may be reused); checked this often.
const SAMPLE_RETENTION: Duration = Duration::from_secs(3600);
const SAMPLE_PRUNE_EVERY: Duration = Duration::from_secs(60);

/// What identifies a backend process across drone restarts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessHandle {
    /// The process id, which is also its process group id.
    pub pid: u32,
    /// `/proc/<pid>/stat` field 22: when the process started, in clock ticks since boot.
    pub start_time: u64,
}

/// A child we spawned and whose exit a task awaits.
struct OwnedChild {
    start_time: u64,
    exit: watch::Receiver<Option<ExitInfo>>,
}

/// Runs backends as child processes. See the module documentation.
pub struct ProcessRuntime {
    config: ProcessRuntimeConfig,
    patterns: Vec<glob::Pattern>,
    children: Arc<Mutex<HashMap<u32, OwnedChild>>>,
    /// The previous CPU sample per backend process, for `cpu_percent`.
    samples: Mutex<Samples>,
    /// The shared `/proc` scans behind `metrics`.
    scans: ProcScans,
    /// Stops the tasks that wait for children; cancelled on drop too.
    cancel: CancellationToken,
}

impl Drop for ProcessRuntime {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl ProcessRuntime {
    /// A runtime with this configuration. Its background tasks stop when `cancel` is
    /// cancelled or the runtime is dropped; the backends keep running. Fails if an allow
    /// pattern is not a valid glob.
    pub fn new(config: ProcessRuntimeConfig, cancel: CancellationToken) -> Result<ProcessRuntime, RuntimeError> {
        let patterns = config
            .allow_commands
            .iter()
            .map(|p| {
                glob::Pattern::new(p)
                    .map_err(|e| RuntimeError::Other(format!("invalid allow-command pattern {p:?}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ProcessRuntime {
            config,
            patterns,
            children: Arc::new(Mutex::new(HashMap::new())),
            samples: Mutex::new(Samples::default()),
            scans: ProcScans::default(),
            cancel,
        })
    }

    fn children(&self) -> MutexGuard<'_, HashMap<u32, OwnedChild>> {
        // A poisoned lock only means another thread panicked while holding it; the map
        // itself is still consistent.
        self.children.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn matches(&self, candidate: &str) -> bool {
        self.patterns.iter().any(|p| p.matches(candidate))
    }

    fn matches_path(&self, path: &Path) -> bool {
        !has_parent_component(path) && path.to_str().is_some_and(|s| self.matches(s))
    }

    /// Finds the program to run and checks it against the allow list.
    pub fn resolve_program(&self, exe: &ProcessExecutable) -> Result<PathBuf, RuntimeError> {
        let Some(program) = exe.command.first().filter(|p| !p.is_empty()) else {
            return Err(RuntimeError::InvalidExecutable("`command` must name a program".into()));
        };
        let raw_allowed = self.matches_path(Path::new(program));
        let located = self.locate(program, exe);
        let allowed = raw_allowed
            || located.as_deref().is_some_and(|path| {
                self.matches_path(path) || std::fs::canonicalize(path).is_ok_and(|c| self.matches_path(&c))
            });
        if !allowed {
            return Err(RuntimeError::NotAllowed(format!(
                "command `{program}` is not allowed on this drone (allowed: {})",
                if self.config.allow_commands.is_empty() {
                    "nothing".to_owned()
                } else {
                    self.config
                        .allow_commands
                        .iter()
                        .map(|p| format!("`{p}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            )));
        }
        located.ok_or_else(|| RuntimeError::Other(format!("program `{program}` not found")))
    }

    /// Where `program` is: an alias, a path, or the first executable match on `PATH`
    /// (the executable's own `PATH` if it sets one, else the drone's).
    fn locate(&self, program: &str, exe: &ProcessExecutable) -> Option<PathBuf> {
        if let Some(path) = self.config.program_aliases.get(program) {
            return Some(path.clone());
        }
        if program.contains('/') {
            let path = Path::new(program);
            let path = if path.is_absolute() {
                path.to_path_buf()
            } else {
                let base = match &exe.cwd {
                    Some(cwd) => PathBuf::from(cwd),
                    None => std::env::current_dir().ok()?,
                };
                base.join(path)
            };
            return is_executable(&path).then_some(path);
        }
        let search: OsString = match exe.env.get("PATH") {
            Some(p) => p.into(),
            None => std::env::var_os("PATH")?,
        };
        std::env::split_paths(&search)
            .filter(|dir| dir.is_absolute())
            .map(|dir| dir.join(program))
            .find(|candidate| is_executable(candidate))
    }

    fn owned_exit(&self, handle: &ProcessHandle) -> Option<watch::Receiver<Option<ExitInfo>>> {
        self.children()
            .get(&handle.pid)
            .filter(|c| c.start_time == handle.start_time)
            .map(|c| c.exit.clone())
    }
}

fn process_executable(spec: &BackendSpec) -> Result<&ProcessExecutable, RuntimeError> {
    match &spec.executable {
        Executable::Process(p) => Ok(p),
        Executable::Docker(_) => Err(RuntimeError::InvalidExecutable(
            "the process runtime cannot run a Docker image".into(),
        )),
    }
}

fn process_handle(handle: &RuntimeHandle) -> Result<&ProcessHandle, RuntimeError> {
    match handle {
        RuntimeHandle::Process(p) => Ok(p),
        #[allow(unreachable_patterns)]
        _ => Err(RuntimeError::Other(format!("not a process handle: {handle:?}"))),
    }
}

fn has_parent_component(path: &Path) -> bool {
    path.components().any(|c| c == Component::ParentDir)
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The address clients use to reach something bound to `host`.
fn reachable(host: IpAddr) -> IpAddr {
    match host {
        IpAddr::V4(a) if a.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(a) if a.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        other => other,
    }
}

/// A port that is free right now on `host` (bind port 0, read it, release it).
fn pick_port(host: IpAddr) -> Result<u16, RuntimeError> {
    let listener = std::net::TcpListener::bind((host, 0))
        .map_err(|e| RuntimeError::io(format!("picking a free port on {host}"), e))?;
    let port = listener
        .local_addr()
        .map_err(|e| RuntimeError::io("reading the picked port", e))?
        .port();
    Ok(port)
}

/// The fields of `/proc/<pid>/stat` the runtime uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ProcStat {
    /// Field 3: `R`, `S`, `Z`, …
    pub state: char,
    /// Field 5: the process group.
    pub pgrp: i64,
    /// Fields 14 and 15: user plus system CPU time, in `USER_HZ` ticks.
    pub cpu_ticks: u64,
    /// Field 22: start time in clock ticks since boot.
    pub start_time: u64,
}

/// The fields of `/proc/<pid>/stat` from field 3 on. The command name (field 2) is in
/// parentheses and may hold spaces and parentheses itself, so fields are counted from
/// the last `)`.
fn stat_fields(text: &str) -> Option<Vec<&str>> {
    let rest = text.get(text.rfind(')')? + 1..)?;
    Some(rest.split_whitespace().collect())
}

/// Parses `/proc/<pid>/stat`.
pub(crate) fn parse_proc_stat(text: &str) -> Option<ProcStat> {
    let fields = stat_fields(text)?;
    // `fields[0]` is field 3.
    let field = |n: usize| fields.get(n - 3).copied();
    Some(ProcStat {
        state: field(3)?.chars().next()?,
        pgrp: field(5)?.parse().ok()?,
        cpu_ticks: field(14)?.parse::<u64>().ok()? + field(15)?.parse::<u64>().ok()?,
        start_time: field(22)?.parse().ok()?,
    })
}

/// What a `/proc` scan takes from one `/proc/<pid>/stat`: the process group, user plus
/// system CPU ticks, and field 24, the resident set in pages (anonymous, file and
/// shared memory pages, as `VmRSS`). Since Linux 6.2 the kernel keeps these counts per
/// CPU and this field reads them without summing the per-CPU parts, so it can lag by a
/// few dozen pages per CPU: a process that has just started may read 0. `VmRSS` is
/// exact but costs a parse of `/proc/<pid>/status` per process per scan.
fn parse_proc_usage(text: &str) -> Option<(i64, u64, u64)> {
    let fields = stat_fields(text)?;
    let field = |n: usize| fields.get(n - 3).copied();
    Some((
        field(5)?.parse().ok()?,
        field(14)?.parse::<u64>().ok()? + field(15)?.parse::<u64>().ok()?,
        field(24)?.parse().ok()?,
    ))
}

pub(crate) fn read_proc_stat(pid: u32) -> std::io::Result<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_proc_stat(&text)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("malformed /proc/{pid}/stat")))
}

/// Resource use of a process group, summed over its live members.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct GroupUsage {
    rss_bytes: u64,
    cpu_nanos: u64,
}

/// `USER_HZ`, the unit of `/proc/<pid>/stat` CPU times: 100 on every Linux architecture
/// Plane runs on (the kernel exports it as a constant, whatever its internal HZ).
const USER_HZ: u64 = 100;

/// The page size, from the auxiliary vector (`AT_PAGESZ`); 4096 if it cannot be read.
fn page_size() -> u64 {
    static PAGE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *PAGE.get_or_init(|| {
        const AT_PAGESZ: usize = 6;
        const WORD: usize = std::mem::size_of::<usize>();
        let word = |b: &[u8]| b.try_into().map(usize::from_ne_bytes).ok();
        let auxv = std::fs::read("/proc/self/auxv").unwrap_or_default();
        auxv.chunks_exact(2 * WORD)
            .find(|pair| word(&pair[..WORD]) == Some(AT_PAGESZ))
            .and_then(|pair| word(&pair[WORD..]))
            .filter(|page| *page > 0)
            .map_or(4096, |page| page as u64)
    })
}

/// Every process group's usage at one moment, from one pass over `/proc`.
struct ProcScan {
    /// When the scan began (a conservative time for all it read).
    taken_at: std::time::Instant,
    groups: HashMap<i64, GroupUsage>,
}

/// Reads `/proc/<pid>/stat` of every process once and sums RSS and CPU time per process
/// group. `None` if `/proc` cannot be read.
fn scan_proc() -> Option<ProcScan> {
    use std::io::Read;
    let taken_at = std::time::Instant::now();
    let page = page_size();
    let mut groups: HashMap<i64, GroupUsage> = HashMap::new();
    let mut text = String::with_capacity(512);
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().filter(|n| n.bytes().all(|b| b.is_ascii_digit())) else {
            continue;
        };
        text.clear();
        // The process may be gone by now.
        let read = std::fs::File::open(format!("/proc/{pid}/stat")).and_then(|mut f| f.read_to_string(&mut text));
        let Some((pgrp, cpu_ticks, rss_pages)) = read.ok().and_then(|_| parse_proc_usage(&text)) else {
            continue;
        };
        let usage = groups.entry(pgrp).or_default();
        usage.cpu_nanos += cpu_ticks * (1_000_000_000 / USER_HZ);
        usage.rss_bytes += rss_pages * page;
    }
    Some(ProcScan { taken_at, groups })
}

/// The latest shared `/proc` scan, and a lock so that one scan runs at a time.
#[derive(Default)]
struct ProcScans {
    latest: Mutex<Option<Arc<ProcScan>>>,
    scanning: tokio::sync::Mutex<()>,
}

impl ProcScans {
    fn latest_since(&self, since: std::time::Instant) -> Option<Arc<ProcScan>> {
        let latest = self.latest.lock().unwrap_or_else(|e| e.into_inner());
        latest.as_ref().filter(|scan| scan.taken_at >= since).cloned()
    }

    /// A scan that began at `since` or later: the latest one, or a new one.
    async fn since(&self, since: std::time::Instant) -> Option<Arc<ProcScan>> {
        if let Some(scan) = self.latest_since(since) {
            return Some(scan);
        }
        let _one_at_a_time = self.scanning.lock().await;
        // Another caller may have scanned while this one waited.
        if let Some(scan) = self.latest_since(since) {
            return Some(scan);
        }
        let scan = Arc::new(tokio::task::spawn_blocking(scan_proc).await.ok()??);
        *self.latest.lock().unwrap_or_else(|e| e.into_inner()) = Some(scan.clone());
        Some(scan)
    }

    /// The usage of process group `pgid`, from a scan at most [`PROC_SCAN_MAX_AGE`] old
    /// (or a new one if that scan began before `asked` and lacks the group: it may
    /// predate the backend). Zero if the group has no members.
    async fn group(&self, pgid: u32, asked: std::time::Instant) -> Option<(std::time::Instant, GroupUsage)> {
        let oldest = asked.checked_sub(PROC_SCAN_MAX_AGE).unwrap_or(asked);
        let mut scan = self.since(oldest).await?;
        if !scan.groups.contains_key(&i64::from(pgid)) && scan.taken_at < asked {
            scan = self.since(asked).await?;
        }
        let usage = scan.groups.get(&i64::from(pgid)).copied().unwrap_or_default();
        Some((scan.taken_at, usage))
    }
}

/// The previous CPU sample of each backend process, keyed by pid and start time (a reused
/// pid is another backend).
#[derive(Default)]
struct Samples {
    by_process: HashMap<(u32, u64), Sample>,
    last_prune: Option<std::time::Instant>,
}

#[derive(Clone, Copy)]
struct Sample {
    /// The scan it was read from.
    at: std::time::Instant,
    cpu_nanos: u64,
    /// What it reported, repeated while the scan is the same.
    cpu_percent: Option<f64>,
}

impl Samples {
    /// Records `(at, cpu_nanos)` and returns the CPU use since the previous sample.
    fn cpu_percent(&mut self, key: (u32, u64), at: std::time::Instant, cpu_nanos: u64) -> Option<f64> {
        let now = std::time::Instant::now();
        if self
            .last_prune
            .is_none_or(|p| now.duration_since(p) >= SAMPLE_PRUNE_EVERY)
        {
            self.by_process
                .retain(|_, s| now.duration_since(s.at) < SAMPLE_RETENTION);
            self.last_prune = Some(now);
        }
        let previous = self.by_process.get(&key).copied();
        if let Some(p) = previous.filter(|p| p.at == at) {
            // Read from the same scan as last time: nothing new to compare.
            return p.cpu_percent;
        }
        let cpu_percent = previous.and_then(|p| {
            let wall = at.duration_since(p.at).as_nanos() as f64;
            (wall > 0.0 && cpu_nanos >= p.cpu_nanos).then(|| (cpu_nanos - p.cpu_nanos) as f64 * 100.0 / wall)
        });
        self.by_process.insert(
            key,
            Sample {
                at,
                cpu_nanos,
                cpu_percent,
            },
        );
        cpu_percent
    }
}

/// Whether the process behind `handle` still runs (a zombie does not).
pub(crate) fn is_alive(handle: &ProcessHandle) -> bool {
    match read_proc_stat(handle.pid) {
        Ok(stat) => stat.start_time == handle.start_time && !matches!(stat.state, 'Z' | 'X' | 'x'),
        Err(_) => false,
    }
}

/// The process group to signal, refusing ids that would hit the drone or everything.
fn group_of(pid: u32) -> Option<Pid> {
    let raw = i32::try_from(pid).ok().filter(|p| *p > 1)?;
    let group = Pid::from_raw(raw);
    (group != nix::unistd::getpgrp()).then_some(group)
}

/// Kills what is left of a process group whose leader has exited.
fn kill_leftovers(pid: u32) {
    if let Some(group) = group_of(pid) {
        let _ = killpg(group, Signal::SIGKILL);
    }
}

fn exit_info(status: std::io::Result<std::process::ExitStatus>) -> ExitInfo {
    match status {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => ExitInfo {
                exit_code: Some(code),
                detail: None,
            },
            (None, Some(sig)) => {
                let name = Signal::try_from(sig)
                    .map(|s| s.as_str().to_owned())
                    .unwrap_or_else(|_| sig.to_string());
                ExitInfo {
                    exit_code: None,
                    detail: Some(format!("killed by signal {name}")),
                }
            }
            (None, None) => ExitInfo {
                exit_code: None,
                detail: None,
            },
        },
        Err(e) => ExitInfo {
            exit_code: None,
            detail: Some(format!("waiting for the process failed: {e}")),
        },
    }
}

#[async_trait]
impl Runtime for ProcessRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Process
    }

    async fn prepare(
        &self,
        spec: &BackendSpec,
        _progress: &(dyn Fn(LoadProgress) + Send + Sync),
    ) -> Result<(), RuntimeError> {
        let exe = process_executable(spec)?;
        self.resolve_program(exe)?;
        std::fs::create_dir_all(&self.config.log_dir).map_err(|e| {
            RuntimeError::io(
                format!("creating the log directory {}", self.config.log_dir.display()),
                e,
            )
        })?;
        Ok(())
    }

    async fn start(&self, spec: &BackendSpec) -> Result<StartedBackend, RuntimeError> {
        let exe = process_executable(spec)?;
        let program = self.resolve_program(exe)?;
        let host = self.config.bind_host;
        let port = pick_port(host)?;

        std::fs::create_dir_all(&self.config.log_dir).map_err(|e| {
            RuntimeError::io(
                format!("creating the log directory {}", self.config.log_dir.display()),
                e,
            )
        })?;
        let log_path = self.config.log_dir.join(format!("{}.log", spec.backend_id));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| RuntimeError::io(format!("opening the log file {}", log_path.display()), e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| RuntimeError::io("duplicating the log file handle", e))?;

        let mut command = tokio::process::Command::new(&program);
        command
            .arg0(&exe.command[0])
            .args(&exe.command[1..])
            .envs(&exe.env)
            .envs(spec.plane_env(port))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .process_group(0)
            .kill_on_drop(false);
        if let Some(cwd) = &exe.cwd {
            command.current_dir(cwd);
        }
        let mut child = command
            .spawn()
            .map_err(|e| RuntimeError::io(format!("starting `{}`", program.display()), e))?;
        let Some(pid) = child.id() else {
            return Err(RuntimeError::Other(
                "the process exited before its pid could be read".into(),
            ));
        };
        let start_time = match read_proc_stat(pid) {
            Ok(stat) => stat.start_time,
            Err(e) => {
                kill_leftovers(pid);
                let _ = child.start_kill();
                return Err(RuntimeError::io(format!("reading /proc/{pid}/stat"), e));
            }
        };

        let (tx, rx) = watch::channel(None);
        self.children().insert(pid, OwnedChild { start_time, exit: rx });
        let cancel = self.cancel.clone();
        let backend_id = spec.backend_id.clone();
        tokio::spawn(async move {
            tokio::select! {
                status = child.wait() => {
                    let info = exit_info(status);
                    debug!(%backend_id, pid, ?info, "backend process exited");
                    kill_leftovers(pid);
                    let _ = tx.send(Some(info));
                }
                // The drone stops; the child keeps running and is re-adopted later.
                _ = cancel.cancelled() => {}
            }
        });

        debug!(backend_id = %spec.backend_id, pid, port, program = %program.display(), "backend process started");
        Ok(StartedBackend {
            address: SocketAddr::new(reachable(host), port),
            handle: RuntimeHandle::Process(ProcessHandle { pid, start_time }),
        })
    }

    async fn wait_ready(&self, _handle: &RuntimeHandle, address: SocketAddr) -> Result<(), RuntimeError> {
        wait_for_http(address).await;
        Ok(())
    }

    async fn signal(&self, handle: &RuntimeHandle, signal: StopSignal) -> Result<(), RuntimeError> {
        let handle = process_handle(handle)?;
        match self.owned_exit(handle) {
            Some(exit) if exit.borrow().is_some() => return Ok(()),
            Some(_) => {}
            None if !is_alive(handle) => return Ok(()),
            None => {}
        }
        let Some(group) = group_of(handle.pid) else {
            return Err(RuntimeError::Other(format!(
                "refusing to signal process group {}",
                handle.pid
            )));
        };
        let sig = match signal {
            StopSignal::Term => Signal::SIGTERM,
            StopSignal::Kill => Signal::SIGKILL,
        };
        match killpg(group, sig) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
            Err(e) => Err(RuntimeError::Other(format!(
                "sending {sig} to process group {}: {e}",
                handle.pid
            ))),
        }
    }

    async fn wait_exit(&self, handle: &RuntimeHandle) -> ExitInfo {
        let handle = match process_handle(handle) {
            Ok(h) => *h,
            Err(e) => {
                return ExitInfo {
                    exit_code: None,
                    detail: Some(e.to_string()),
                }
            }
        };
        if let Some(mut exit) = self.owned_exit(&handle) {
            let info = loop {
                if let Some(info) = exit.borrow_and_update().clone() {
                    break info;
                }
                if exit.changed().await.is_err() {
                    // The runtime is shutting down: the exit will never be observed here.
                    std::future::pending::<()>().await;
                }
            };
            self.children().remove(&handle.pid);
            return info;
        }
        let mut ticker = tokio::time::interval(ADOPTED_POLL_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            if !is_alive(&handle) {
                kill_leftovers(handle.pid);
                return ExitInfo {
                    exit_code: None,
                    detail: Some("exit code unknown (adopted process)".into()),
                };
            }
        }
    }

    async fn metrics(&self, handle: &RuntimeHandle) -> Option<BackendMetrics> {
        let handle = *process_handle(handle).ok()?;
        if !is_alive(&handle) {
            return None;
        }
        let (at, usage) = self.scans.group(handle.pid, std::time::Instant::now()).await?;
        let cpu_percent = self.samples.lock().unwrap_or_else(|e| e.into_inner()).cpu_percent(
            (handle.pid, handle.start_time),
            at,
            usage.cpu_nanos,
        );
        Some(BackendMetrics {
            memory_bytes: usage.rss_bytes,
            memory_limit_bytes: None,
            cpu_total_nanos: usage.cpu_nanos,
            cpu_percent,
            sampled_at: crate::state::now_ms(),
        })
    }

    async fn adopt(&self, backend_id: &BackendName, handle: &RuntimeHandle) -> Result<Adoption, RuntimeError> {
        let handle = process_handle(handle)?;
        let stat = match read_proc_stat(handle.pid) {
            Ok(stat) => stat,
            Err(e) => {
                debug!(%backend_id, pid = handle.pid, %e, "backend process is gone");
                return Ok(Adoption::Gone);
            }
        };
        if stat.start_time != handle.start_time {
            warn!(%backend_id, pid = handle.pid, "pid now belongs to another process");
            return Ok(Adoption::Gone);
        }
        if matches!(stat.state, 'Z' | 'X' | 'x') || stat.pgrp != i64::from(handle.pid) {
            return Ok(Adoption::Gone);
        }
        Ok(Adoption::Running)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{eventually, TempDir};
    use std::collections::BTreeMap;
    use std::time::Instant;

    fn runtime(dir: &TempDir, allow: &[&str]) -> ProcessRuntime {
        let config = ProcessRuntimeConfig {
            allow_commands: allow.iter().map(|s| s.to_string()).collect(),
            program_aliases: HashMap::new(),
            log_dir: dir.path().join("logs"),
            bind_host: IpAddr::V4(Ipv4Addr::LOCALHOST),
        };
        ProcessRuntime::new(config, CancellationToken::new()).unwrap()
    }

    fn spec(id: &str, command: &[&str]) -> BackendSpec {
        BackendSpec {
            backend_id: id.parse().unwrap(),
            executable: Executable::Process(ProcessExecutable {
                command: command.iter().map(|s| s.to_string()).collect(),
                env: BTreeMap::from([("EXTRA".to_owned(), "yes".to_owned())]),
                cwd: None,
            }),
            key_name: "room-1".into(),
            fencing_token: 17,
            static_token: Some("s.static".into()),
        }
    }

    fn no_progress(_: LoadProgress) {}

    async fn start(rt: &ProcessRuntime, spec: &BackendSpec) -> StartedBackend {
        rt.prepare(spec, &no_progress).await.unwrap();
        rt.start(spec).await.unwrap()
    }

    #[test]
    fn parses_proc_stat_with_odd_names() {
        let text = "1234 (a b) c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 987654 1000 10";
        let stat = parse_proc_stat(text).unwrap();
        assert_eq!(
            stat,
            ProcStat {
                state: 'S',
                pgrp: 1234,
                cpu_ticks: 0,
                start_time: 987654
            }
        );
        assert_eq!(parse_proc_stat("12 (x) S 1"), None);
        assert_eq!(parse_proc_stat("garbage"), None);
    }

    #[tokio::test]
    async fn runs_a_backend_until_ready_with_env_and_log() {
        let dir = TempDir::new("proc-ready");
        let rt = runtime(&dir, &["sh"]);
        let out = dir.path().join("env.out");
        let script = format!(
            "env > {}; echo hello-from-backend; exec /usr/bin/python3 -m http.server --bind 127.0.0.1 $PORT",
            out.display()
        );
        let spec = spec("ready1", &["sh", "-c", &script]);
        let started = start(&rt, &spec).await;
        assert_eq!(started.address.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));

        tokio::time::timeout(Duration::from_secs(20), rt.wait_ready(&started.handle, started.address))
            .await
            .expect("backend became ready")
            .unwrap();

        let env = std::fs::read_to_string(&out).unwrap();
        for line in [
            format!("PORT={}", started.address.port()),
            "SESSION_BACKEND_ID=ready1".to_owned(),
            "SESSION_BACKEND_KEY=room-1".to_owned(),
            "SESSION_BACKEND_FENCING_TOKEN=17".to_owned(),
            "SESSION_BACKEND_STATIC_TOKEN=s.static".to_owned(),
            "EXTRA=yes".to_owned(),
        ] {
            assert!(env.lines().any(|l| l == line), "missing {line} in {env}");
        }
        let log = dir.path().join("logs").join("ready1.log");
        eventually(Duration::from_secs(5), || {
            std::fs::read_to_string(&log).is_ok_and(|l| l.contains("hello-from-backend"))
        })
        .await;

        rt.signal(&started.handle, StopSignal::Kill).await.unwrap();
        let exit = tokio::time::timeout(Duration::from_secs(5), rt.wait_exit(&started.handle))
            .await
            .unwrap();
        assert_eq!(exit.exit_code, None);
        assert_eq!(exit.detail.as_deref(), Some("killed by signal SIGKILL"));
    }

    #[tokio::test]
    async fn sigterm_reaches_the_group_and_exit_code_is_reported() {
        let dir = TempDir::new("proc-term");
        let rt = runtime(&dir, &["sh"]);
        let ready = dir.path().join("trap-ready");
        let script = format!(
            "trap 'exit 7' TERM; touch {}; while true; do sleep 0.05; done",
            ready.display()
        );
        let spec = spec("term1", &["sh", "-c", &script]);
        let started = start(&rt, &spec).await;
        eventually(Duration::from_secs(5), || ready.exists()).await;
        rt.signal(&started.handle, StopSignal::Term).await.unwrap();
        let exit = tokio::time::timeout(Duration::from_secs(5), rt.wait_exit(&started.handle))
            .await
            .unwrap();
        assert_eq!(exit.exit_code, Some(7));
        // Signalling an exited backend is harmless.
        rt.signal(&started.handle, StopSignal::Kill).await.unwrap();
    }

    #[tokio::test]
    async fn exit_code_of_a_backend_that_exits_by_itself() {
        let dir = TempDir::new("proc-exit");
        let rt = runtime(&dir, &["sh"]);
        let started = start(&rt, &spec("exit1", &["sh", "-c", "exit 3"])).await;
        let exit = tokio::time::timeout(Duration::from_secs(5), rt.wait_exit(&started.handle))
            .await
            .unwrap();
        assert_eq!(
            exit,
            ExitInfo {
                exit_code: Some(3),
                detail: None
            }
        );
    }

    #[tokio::test]
    async fn sigkill_reaches_grandchildren() {
        let dir = TempDir::new("proc-group");
        let rt = runtime(&dir, &["sh"]);
        let pidfile = dir.path().join("grandchild.pid");
        let script = format!("sleep 1000 & echo $! > {}; wait", pidfile.display());
        let started = start(&rt, &spec("group1", &["sh", "-c", &script])).await;
        eventually(Duration::from_secs(5), || {
            std::fs::read_to_string(&pidfile).is_ok_and(|s| s.ends_with('\n'))
        })
        .await;
        let grandchild: u32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
        let gc_start = read_proc_stat(grandchild).unwrap().start_time;
        let gc = ProcessHandle {
            pid: grandchild,
            start_time: gc_start,
        };
        assert!(is_alive(&gc));
        rt.signal(&started.handle, StopSignal::Kill).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), rt.wait_exit(&started.handle))
            .await
            .unwrap();
        eventually(Duration::from_secs(5), || !is_alive(&gc)).await;
    }

    #[tokio::test]
    async fn refuses_commands_outside_the_allow_list() {
        let dir = TempDir::new("proc-allow");
        let rt = runtime(&dir, &["python3"]);
        let err = rt
            .prepare(&spec("deny1", &["sh", "-c", "true"]), &no_progress)
            .await
            .unwrap_err();
        assert!(matches!(err, RuntimeError::NotAllowed(_)), "{err}");
        assert!(err.to_string().contains("`sh` is not allowed"), "{err}");
        let err = rt.start(&spec("deny1", &["sh", "-c", "true"])).await.unwrap_err();
        assert!(matches!(err, RuntimeError::NotAllowed(_)));
        // `..` does not sneak past a pattern.
        let base = std::fs::canonicalize(dir.path()).unwrap();
        let rt = runtime(&dir, &[&format!("{}/*", base.display())]);
        let sh = std::fs::canonicalize("/bin/sh").unwrap();
        let up = "../".repeat(base.components().count() - 1);
        let sneaky = format!(
            "{}/{up}{}",
            base.display(),
            sh.display().to_string().trim_start_matches('/')
        );
        assert!(Path::new(&sneaky).exists(), "{sneaky}");
        let err = rt.prepare(&spec("deny2", &[&sneaky]), &no_progress).await.unwrap_err();
        assert!(matches!(err, RuntimeError::NotAllowed(_)), "{err}");
        // Nothing is allowed by default.
        let rt = runtime(&dir, &[]);
        assert!(rt.prepare(&spec("deny3", &["sh"]), &no_progress).await.is_err());
    }

    #[tokio::test]
    async fn allow_list_matches_resolved_paths_and_aliases() {
        let dir = TempDir::new("proc-resolve");
        let sh = std::fs::canonicalize("/bin/sh").unwrap();
        let sh_dir = sh.parent().unwrap().display().to_string();
        let rt = runtime(&dir, &[&format!("{sh_dir}/*")]);
        let exe = ProcessExecutable {
            command: vec!["sh".into()],
            env: BTreeMap::new(),
            cwd: None,
        };
        assert!(rt.resolve_program(&exe).is_ok());

        let config = ProcessRuntimeConfig {
            allow_commands: vec!["my-alias".into()],
            program_aliases: HashMap::from([("my-alias".to_owned(), sh.clone())]),
            log_dir: dir.path().join("logs"),
            bind_host: IpAddr::V4(Ipv4Addr::LOCALHOST),
        };
        let rt = ProcessRuntime::new(config, CancellationToken::new()).unwrap();
        let exe = ProcessExecutable {
            command: vec!["my-alias".into()],
            env: BTreeMap::new(),
            cwd: None,
        };
        assert_eq!(rt.resolve_program(&exe).unwrap(), sh);

        let err = rt.resolve_program(&ProcessExecutable {
            command: vec!["nope".into()],
            ..exe.clone()
        });
        assert!(matches!(err, Err(RuntimeError::NotAllowed(_))));
        assert!(ProcessRuntime::new(
            ProcessRuntimeConfig {
                allow_commands: vec!["[".into()],
                ..Default::default()
            },
            CancellationToken::new()
        )
        .is_err());
    }

    #[tokio::test]
    async fn a_backend_that_never_listens_is_not_ready() {
        let dir = TempDir::new("proc-never");
        let rt = runtime(&dir, &["sleep"]);
        let started = start(&rt, &spec("never1", &["sleep", "1000"])).await;
        let begun = Instant::now();
        let r = tokio::time::timeout(
            Duration::from_millis(300),
            rt.wait_ready(&started.handle, started.address),
        )
        .await;
        assert!(r.is_err(), "a process that does not listen must not be ready");
        assert!(begun.elapsed() >= Duration::from_millis(300));
        rt.signal(&started.handle, StopSignal::Kill).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), rt.wait_exit(&started.handle))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn metrics_sum_the_process_group() {
        let dir = TempDir::new("proc-metrics");
        let rt = runtime(&dir, &["sh"]);
        // A busy child in the backend's group: its CPU time must be counted.
        let started = start(
            &rt,
            &spec("metrics1", &["sh", "-c", "(while :; do :; done) & exec sleep 1000"]),
        )
        .await;
        // Right after the start the kernel's resident-set counts may not be summed yet
        // (see `parse_proc_usage`); the memory of the group must show within seconds.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut samples = 0;
        let first = loop {
            let m = rt.metrics(&started.handle).await.expect("a first sample");
            samples += 1;
            if samples == 1 {
                assert_eq!(m.cpu_percent, None, "no CPU percent without an earlier sample");
            }
            if m.memory_bytes > 0 {
                break m;
            }
            assert!(std::time::Instant::now() < deadline, "no memory counted: {m:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let second = loop {
            let m = rt.metrics(&started.handle).await.expect("a sample");
            if m.cpu_total_nanos > first.cpu_total_nanos {
                break m;
            }
            assert!(std::time::Instant::now() < deadline, "the busy loop used no CPU: {m:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(second.cpu_percent.is_some_and(|p| p > 0.0), "{second:?}");
        rt.signal(&started.handle, StopSignal::Kill).await.unwrap();
        rt.wait_exit(&started.handle).await;
        assert_eq!(rt.metrics(&started.handle).await, None);
    }

    #[test]
    fn cpu_ticks_are_parsed_after_the_command_name() {
        let stat = "42 (a) b (c) S 1 42 42 0 -1 4194560 100 0 0 0 7 5 0 0 20 0 1 0 99 0 0";
        assert_eq!(parse_proc_stat(stat).map(|s| (s.pgrp, s.cpu_ticks)), Some((42, 12)));
        assert_eq!(parse_proc_stat("garbage"), None);
    }

    #[test]
    fn usage_fields_and_page_size() {
        // Fields 5 (pgrp), 14 + 15 (CPU ticks) and 24 (RSS pages), after an odd name.
        let stat = "42 (a) b (c) S 1 42 42 0 -1 4194560 100 0 0 0 7 5 0 0 20 0 1 0 99 1000 250 0";
        assert_eq!(parse_proc_usage(stat), Some((42, 12, 250)));
        assert_eq!(parse_proc_usage("42 (x) S 1 42"), None);
        let page = page_size();
        assert!(page >= 4096 && page.is_power_of_two(), "{page}");
        // The scan's RSS for this process's group matches VmRSS of its members roughly:
        // at least this process's own.
        let scan = scan_proc().expect("a /proc scan");
        let own = read_proc_stat(std::process::id()).unwrap().pgrp;
        assert!(
            scan.groups.get(&own).is_some_and(|u| u.rss_bytes > 0),
            "{:?}",
            scan.groups.get(&own)
        );
    }

    #[test]
    fn samples_from_one_scan_repeat_the_last_cpu_percent() {
        let mut samples = Samples::default();
        let t0 = std::time::Instant::now();
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(samples.cpu_percent((1, 1), t0, 0), None);
        assert_eq!(samples.cpu_percent((1, 1), t1, 500_000_000), Some(50.0));
        assert_eq!(samples.cpu_percent((1, 1), t1, 500_000_000), Some(50.0));
        // Another start time is another process.
        assert_eq!(samples.cpu_percent((1, 2), t1, 500_000_000), None);
    }

    #[tokio::test]
    async fn adoption_after_a_restart() {
        let dir = TempDir::new("proc-adopt");
        let first = runtime(&dir, &["sleep"]);
        let started = start(&first, &spec("adopt1", &["sleep", "1000"])).await;
        // The drone persists the handle as JSON and reads it back after its restart.
        let json = serde_json::to_string(&started.handle).unwrap();
        assert!(json.contains("\"runtime\":\"process\""), "{json}");
        let handle: RuntimeHandle = serde_json::from_str(&json).unwrap();
        let RuntimeHandle::Process(ph) = handle.clone() else {
            panic!("not a process handle")
        };

        let second = runtime(&dir, &["sleep"]);
        let id: BackendName = "adopt1".parse().unwrap();
        assert_eq!(second.adopt(&id, &handle).await.unwrap(), Adoption::Running);
        let wrong_time = RuntimeHandle::Process(ProcessHandle {
            pid: ph.pid,
            start_time: ph.start_time + 1,
        });
        assert_eq!(second.adopt(&id, &wrong_time).await.unwrap(), Adoption::Gone);
        // A signal through a mismatched handle is not delivered.
        second.signal(&wrong_time, StopSignal::Kill).await.unwrap();
        assert!(is_alive(&ph));

        second.signal(&handle, StopSignal::Kill).await.unwrap();
        let exit = tokio::time::timeout(Duration::from_secs(5), second.wait_exit(&handle))
            .await
            .unwrap();
        assert_eq!(exit.exit_code, None);
        assert_eq!(second.adopt(&id, &handle).await.unwrap(), Adoption::Gone);
        // A pid that does not exist.
        let dead = RuntimeHandle::Process(ProcessHandle {
            pid: u32::MAX - 1,
            start_time: 1,
        });
        assert_eq!(second.adopt(&id, &dead).await.unwrap(), Adoption::Gone);
        drop(first);
    }
}
