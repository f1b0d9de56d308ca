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
    samples: Mutex<HashMap<(u32, u64), (std::time::Instant, u64)>>,
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
            samples: Mutex::new(HashMap::new()),
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

/// Parses `/proc/<pid>/stat`. The command name (field 2) is in parentheses and may hold
/// spaces and parentheses itself, so fields are counted from the last `)`.
pub(crate) fn parse_proc_stat(text: &str) -> Option<ProcStat> {
    let rest = text.get(text.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `fields[0]` is field 3.
    let field = |n: usize| fields.get(n - 3).copied();
    Some(ProcStat {
        state: field(3)?.chars().next()?,
        pgrp: field(5)?.parse().ok()?,
        cpu_ticks: field(14)?.parse::<u64>().ok()? + field(15)?.parse::<u64>().ok()?,
        start_time: field(22)?.parse().ok()?,
    })
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

/// Sums RSS and CPU time over the processes of group `pgid` (a backend's process
/// group), by scanning `/proc`. `None` if `/proc` cannot be read.
fn group_usage(pgid: u32) -> Option<GroupUsage> {
    let mut usage = GroupUsage::default();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = read_proc_stat(pid) else {
            continue;
        };
        if stat.pgrp != i64::from(pgid) {
            continue;
        }
        usage.cpu_nanos += stat.cpu_ticks * (1_000_000_000 / USER_HZ);
        let rss_kib = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|status| {
                let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
                line.split_whitespace().nth(1)?.parse::<u64>().ok()
            })
            .unwrap_or(0);
        usage.rss_bytes += rss_kib * 1024;
    }
    Some(usage)
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
        let usage = tokio::task::spawn_blocking(move || group_usage(handle.pid))
            .await
            .ok()??;
        let now = std::time::Instant::now();
        let previous = {
            let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
            // Samples of backends gone long ago (their pids may be reused) are dropped.
            samples.retain(|_, (at, _)| now.duration_since(*at) < Duration::from_secs(3600));
            // Keyed by pid and start time: a reused pid is another backend.
            samples.insert((handle.pid, handle.start_time), (now, usage.cpu_nanos))
        };
        let cpu_percent = previous.and_then(|(at, nanos)| {
            let wall = now.duration_since(at).as_nanos() as f64;
            (wall > 0.0 && usage.cpu_nanos >= nanos).then(|| (usage.cpu_nanos - nanos) as f64 * 100.0 / wall)
        });
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
        let first = rt.metrics(&started.handle).await.expect("a first sample");
        assert!(first.memory_bytes > 0, "{first:?}");
        assert_eq!(first.cpu_percent, None);
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
