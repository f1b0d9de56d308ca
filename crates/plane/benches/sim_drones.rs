//! Benchmark (not a test): simulated drones on one controller — heartbeats, key renewals
//! and event traffic from N fake drones, with the controller's CPU measured against its
//! own idle baseline in the same run.
//!
//! The controller is the `plane controller` binary, run as a separate process, so its CPU
//! time is read from `/proc/<pid>/stat` (utime + stime, over the whole thread group)
//! alone. It runs on a SQLite file in a temporary directory and then, unless
//! `PLANE_BENCH_POSTGRES=0`, on a fresh PostgreSQL database (`plane-test-postgres`); on
//! PostgreSQL the server's CPU (the postmaster and its children) is reported beside it.
//!
//! Each fake drone is a task of this process with its own WebSocket to
//! `/ctrl/drone-socket`. It speaks the protocol as `plane drone` does
//! (`crates/plane-drone/src/connection.rs`): `Hello`, wait for `Welcome`, then a
//! `Heartbeat` every [`DroneTimings::default`]`().heartbeat_interval` (7 s, the default of
//! `plane drone --heartbeat-interval-ms`), each drone at its own random phase; events are
//! re-sent until acked; a `Spawn` is answered with `loading`, `starting`, `waiting` (with
//! an address) and `ready`, a `Terminate` with `terminating`/`hard-terminating` and
//! `terminated`; the key lease is renewed with `RenewKey` at the `renew_at` of the
//! deadlines it was given, as the drone's backend task does. Only the first renewal of
//! each backend is drawn at random between its spawn and its `renew_at`, so the renewals
//! are spread out as in a steady state and do not all fall in one window.
//!
//! Windows, each `PLANE_BENCH_SECONDS` long (default 20), per store:
//! 1. **idle:** the controller with no drone connected (after its start-up has settled);
//! 2. **heartbeats:** `PLANE_BENCH_DRONES` drones (default 500), every one registered and
//!    heartbeating (checked through `GET /ctrl/c/<cluster>/state` before and after);
//! 3. **renewals:** the same, plus `PLANE_BENCH_BACKENDS` ready backends (default: one per
//!    drone) started through `POST /ctrl/connect` and scheduled by the controller onto the
//!    fake drones, renewing their 60 s leases (the `plane controller --lease-ms` default)
//!    every 30 s;
//! 4. **churn:** the same, plus `PLANE_BENCH_CHURN` backend replacements per second
//!    (default 5): a soft terminate through the API (→ `Terminate` → two events) and a
//!    connect for a new key (→ `Spawn` → four events).
//!
//! Each window's cost above the previous one is divided by what was added: µs of
//! controller CPU per heartbeat, per renewal, per replacement. The run fails if a drone
//! is not seen alive by the controller, a socket drops, a renewal is refused or left
//! unanswered, or a backend does not reach the status its events reported.
//!
//! Run: `cargo bench -p plane --bench sim_drones`.

mod common;

use anyhow::{bail, ensure, Context};
use futures_util::{SinkExt, StreamExt};
use plane_client::PlaneClient;
use plane_drone::DroneTimings;
use plane_types::api::{ConnectRequest, KeyConfig, SpawnConfig};
use plane_types::executable::RuntimeKind;
use plane_types::names::{BackendName, ClusterName, DroneName};
use plane_types::protocol::{
    BackendEvent, ControllerToDrone, DroneHello, DroneToController, DRONE_SOCKET_PATH, PROTOCOL_VERSION,
};
use plane_types::status::{BackendStatus, TerminationKind, TerminationReason};
use plane_types::EpochMillis;
use rand::Rng;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// The cluster every fake drone serves (the controller's `--default-cluster`).
const CLUSTER: &str = "sim.localhost:9000";
/// How long the drones take to connect, one after the other.
const CONNECT_SPREAD: Duration = Duration::from_millis(2500);
/// A renewal unanswered for this long is re-sent (the drone's `renew_retry`) and counted.
const RENEW_RETRY: Duration = Duration::from_secs(1);
/// The limit on every wait for a condition.
const WAIT_LIMIT: Duration = Duration::from_secs(90);

// ---------------------------------------------------------------------------------------
// CPU time from /proc.

/// CPU seconds (user + system) of process `pid`, all its threads.
fn process_cpu(pid: u32) -> anyhow::Result<f64> {
    common::process_cpu_seconds(pid).with_context(|| format!("reading /proc/{pid}/stat"))
}

/// The numeric fields of a `/proc/<pid>/stat` after the command name.
fn stat_fields(path: &Path) -> Option<Vec<u64>> {
    common::proc_stat(path).map(|(_, fields)| fields)
}

/// CPU seconds of a PostgreSQL server: the postmaster and its children (the backends that
/// exited meanwhile are not counted; the store's pool keeps its connections).
fn postgres_cpu(postmaster: u32) -> f64 {
    let mut ticks = 0u64;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let Some(f) = stat_fields(&entry.path().join("stat")) else {
            continue;
        };
        if pid == postmaster || f[1] == u64::from(postmaster) {
            ticks += f[11] + f[12];
        }
    }
    ticks as f64 / common::clock_tick()
}

// ---------------------------------------------------------------------------------------
// The controller process.

struct ControllerProcess {
    child: Child,
    url: String,
    log: PathBuf,
}

impl ControllerProcess {
    async fn start(binary: &str, db: &str, log: PathBuf) -> anyhow::Result<ControllerProcess> {
        // A free port, taken from the kernel and handed to the controller (a race with
        // another process binding it in between is retried).
        let mut last_error = None;
        for _ in 0..3 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let logfile = std::fs::File::create(&log)?;
            let child = Command::new(binary)
                .args(["controller", "--db", db, "--host", "127.0.0.1", "--port"])
                .arg(port.to_string())
                .args(["--default-cluster", CLUSTER])
                .env_remove("PLANE_CTRL_TOKEN")
                .stdin(Stdio::null())
                .stdout(logfile.try_clone()?)
                .stderr(logfile)
                .spawn()
                .context("starting plane controller")?;
            let mut c = ControllerProcess {
                child,
                url: format!("http://127.0.0.1:{port}"),
                log: log.clone(),
            };
            match c.wait_healthy().await {
                Ok(()) => return Ok(c),
                Err(e) => {
                    c.stop();
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.expect("three attempts"))
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    async fn wait_healthy(&mut self) -> anyhow::Result<()> {
        let client = PlaneClient::new(&self.url)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("the controller exited ({status}):\n{}", self.log_tail());
            }
            if client.health().await.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the controller did not get healthy:\n{}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, then SIGKILL if it does not stop within 10 s.
    fn stop(&mut self) {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        let pid = Pid::from_raw(self.child.id() as i32);
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------------------
// The fake drones.

/// Counters shared by every fake drone.
#[derive(Default)]
struct Stats {
    welcomed: AtomicUsize,
    /// Drones that have sent at least one heartbeat.
    heartbeating: AtomicUsize,
    heartbeats: AtomicU64,
    events_sent: AtomicU64,
    events_resent: AtomicU64,
    acks: AtomicU64,
    /// Acked `ready` events, and acked `terminated` events.
    ready_acked: AtomicU64,
    terminated_acked: AtomicU64,
    spawns: AtomicU64,
    terminates: AtomicU64,
    renewals_sent: AtomicU64,
    renewals_resent: AtomicU64,
    renewed: AtomicU64,
    renewals_refused: AtomicU64,
    /// Sessions that ended before the bench stopped them.
    failures: Mutex<Vec<String>>,
}

/// A snapshot of the counters, for windows.
#[derive(Clone, Copy, Debug, Default)]
struct Counts {
    heartbeats: u64,
    events_sent: u64,
    events_resent: u64,
    acks: u64,
    spawns: u64,
    terminates: u64,
    renewals_sent: u64,
    renewals_resent: u64,
    renewed: u64,
    renewals_refused: u64,
}

impl Stats {
    fn counts(&self) -> Counts {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counts {
            heartbeats: l(&self.heartbeats),
            events_sent: l(&self.events_sent),
            events_resent: l(&self.events_resent),
            acks: l(&self.acks),
            spawns: l(&self.spawns),
            terminates: l(&self.terminates),
            renewals_sent: l(&self.renewals_sent),
            renewals_resent: l(&self.renewals_resent),
            renewed: l(&self.renewed),
            renewals_refused: l(&self.renewals_refused),
        }
    }

    fn failures(&self) -> Vec<String> {
        self.failures.lock().unwrap().clone()
    }
}

impl Counts {
    fn since(&self, b: &Counts) -> Counts {
        Counts {
            heartbeats: self.heartbeats - b.heartbeats,
            events_sent: self.events_sent - b.events_sent,
            events_resent: self.events_resent - b.events_resent,
            acks: self.acks - b.acks,
            spawns: self.spawns - b.spawns,
            terminates: self.terminates - b.terminates,
            renewals_sent: self.renewals_sent - b.renewals_sent,
            renewals_resent: self.renewals_resent - b.renewals_resent,
            renewed: self.renewed - b.renewed,
            renewals_refused: self.renewals_refused - b.renewals_refused,
        }
    }
}

fn now_ms() -> EpochMillis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The monotonic instant of a time in this machine's wall clock.
fn instant_at(ms: EpochMillis) -> Instant {
    let now = now_ms();
    if ms <= now {
        Instant::now()
    } else {
        Instant::now() + Duration::from_millis(ms - now)
    }
}

/// A backend held by a fake drone.
struct FakeBackend {
    fencing_token: i64,
    status: BackendStatus,
    /// When the next `RenewKey` goes out.
    renew_at: Instant,
    /// When the unanswered `RenewKey` went out.
    renew_sent: Option<Instant>,
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One fake drone's session; see the module docs.
struct FakeDrone {
    name: DroneName,
    cluster: ClusterName,
    heartbeat_interval: Duration,
    stats: Arc<Stats>,
    backends: HashMap<BackendName, FakeBackend>,
    /// Events sent and not acked, with when they were last sent.
    outbox: BTreeMap<u64, (BackendEvent, Instant)>,
    next_event_id: u64,
    sent_heartbeat: bool,
}

impl FakeDrone {
    async fn run(mut self, url: String, start_after: Duration, phase: Duration, stop: CancellationToken) {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(start_after) => {}
        }
        let result = tokio::select! {
            () = stop.cancelled() => Ok(()),
            r = self.session(&url, phase) => r.and_then(|()| Err(anyhow::anyhow!("the session ended"))),
        };
        if let Err(e) = result {
            self.stats
                .failures
                .lock()
                .unwrap()
                .push(format!("{}: {e:#}", self.name));
        }
    }

    async fn send(ws: &mut Socket, msg: &DroneToController) -> anyhow::Result<()> {
        let text = serde_json::to_string(msg)?;
        ws.send(Message::Text(text.into())).await.context("sending")
    }

    async fn next(ws: &mut Socket) -> anyhow::Result<Option<ControllerToDrone>> {
        match ws.next().await {
            None => bail!("the controller closed the connection"),
            Some(Err(e)) => bail!("receiving: {e}"),
            Some(Ok(Message::Close(f))) => bail!("the controller closed the connection ({f:?})"),
            Some(Ok(Message::Text(t))) => Ok(Some(
                serde_json::from_str(t.as_str()).with_context(|| format!("unparseable message {t}"))?,
            )),
            Some(Ok(_)) => Ok(None),
        }
    }

    async fn session(&mut self, url: &str, phase: Duration) -> anyhow::Result<()> {
        let (mut ws, _) = tokio::time::timeout(Duration::from_secs(30), tokio_tungstenite::connect_async(url))
            .await
            .context("connecting: timed out")?
            .context("connecting")?;
        if let tokio_tungstenite::MaybeTlsStream::Plain(tcp) = ws.get_ref() {
            tcp.set_nodelay(true)?;
        }
        let hello = DroneToController::Hello(DroneHello {
            protocol_version: PROTOCOL_VERSION,
            name: self.name.clone(),
            cluster: self.cluster.clone(),
            pool: String::new(),
            runtimes: vec![RuntimeKind::Process],
            plane_version: plane_types::PLANE_VERSION.to_owned(),
            plane_hash: plane_types::PLANE_HASH.to_owned(),
            local_time: now_ms(),
        });
        Self::send(&mut ws, &hello).await?;
        let first = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                if let Some(m) = Self::next(&mut ws).await? {
                    return anyhow::Ok(m);
                }
            }
        })
        .await
        .context("no answer to Hello")??;
        match first {
            ControllerToDrone::Welcome { protocol_version, .. } if protocol_version == PROTOCOL_VERSION => {}
            other => bail!("expected Welcome, got {other:?}"),
        }
        self.stats.welcomed.fetch_add(1, Ordering::Relaxed);

        let mut heartbeat = tokio::time::interval_at(Instant::now() + phase, self.heartbeat_interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let renew_due = self.next_renewal();
            tokio::select! {
                _ = heartbeat.tick() => {
                    Self::send(&mut ws, &DroneToController::Heartbeat { local_time: now_ms() }).await?;
                    self.stats.heartbeats.fetch_add(1, Ordering::Relaxed);
                    if !self.sent_heartbeat {
                        self.sent_heartbeat = true;
                        self.stats.heartbeating.fetch_add(1, Ordering::Relaxed);
                    }
                    // As the drone does: re-send what has waited a heartbeat for its ack.
                    let interval = self.heartbeat_interval;
                    let stale: Vec<BackendEvent> = self
                        .outbox
                        .values_mut()
                        .filter(|(_, sent)| sent.elapsed() >= interval)
                        .map(|(e, sent)| {
                            *sent = Instant::now();
                            e.clone()
                        })
                        .collect();
                    for e in stale {
                        self.stats.events_resent.fetch_add(1, Ordering::Relaxed);
                        Self::send(&mut ws, &DroneToController::Event(e)).await?;
                    }
                }
                () = sleep_until_opt(renew_due) => self.renew(&mut ws).await?,
                m = Self::next(&mut ws) => {
                    if let Some(m) = m? {
                        self.handle(&mut ws, m).await?;
                    }
                }
            }
        }
    }

    /// When the next `RenewKey` (or re-send of one) is due.
    fn next_renewal(&self) -> Option<Instant> {
        self.backends
            .values()
            .filter(|b| b.status < BackendStatus::Terminating)
            .map(|b| match b.renew_sent {
                Some(sent) => sent + RENEW_RETRY,
                None => b.renew_at,
            })
            .min()
    }

    async fn renew(&mut self, ws: &mut Socket) -> anyhow::Result<()> {
        let now = Instant::now();
        let mut due = Vec::new();
        for (id, b) in self.backends.iter_mut() {
            if b.status >= BackendStatus::Terminating {
                continue;
            }
            let at = b.renew_sent.map_or(b.renew_at, |s| s + RENEW_RETRY);
            if at <= now {
                if b.renew_sent.is_some() {
                    self.stats.renewals_resent.fetch_add(1, Ordering::Relaxed);
                }
                b.renew_sent = Some(now);
                due.push((id.clone(), b.fencing_token));
            }
        }
        for (backend_id, fencing_token) in due {
            self.stats.renewals_sent.fetch_add(1, Ordering::Relaxed);
            let msg = DroneToController::RenewKey {
                backend_id,
                fencing_token,
                local_time: now_ms(),
            };
            Self::send(ws, &msg).await?;
        }
        Ok(())
    }

    async fn event(
        &mut self,
        ws: &mut Socket,
        backend_id: &BackendName,
        status: BackendStatus,
        fill: impl FnOnce(&mut BackendEvent),
    ) -> anyhow::Result<()> {
        self.next_event_id += 1;
        let mut e = BackendEvent {
            event_id: self.next_event_id,
            backend_id: backend_id.clone(),
            status,
            address: None,
            exit_code: None,
            termination_reason: None,
            termination_kind: None,
            message: None,
        };
        fill(&mut e);
        if let Some(b) = self.backends.get_mut(backend_id) {
            b.status = status;
        }
        self.stats.events_sent.fetch_add(1, Ordering::Relaxed);
        Self::send(ws, &DroneToController::Event(e.clone())).await?;
        self.outbox.insert(e.event_id, (e, Instant::now()));
        Ok(())
    }

    async fn terminate(
        &mut self,
        ws: &mut Socket,
        id: &BackendName,
        kind: TerminationKind,
        reason: TerminationReason,
    ) -> anyhow::Result<()> {
        let status = match self.backends.get(id) {
            Some(b) => b.status,
            // Unknown here (a drone that lost it): report it gone, as the drone does.
            None => BackendStatus::Scheduled,
        };
        let step = match kind {
            TerminationKind::Soft => BackendStatus::Terminating,
            TerminationKind::Hard => BackendStatus::HardTerminating,
        };
        if status >= step {
            return Ok(());
        }
        if self.backends.contains_key(id) {
            self.event(ws, id, step, |e| {
                e.termination_kind = Some(kind);
                e.termination_reason = Some(reason);
            })
            .await?;
        }
        // The pretend process exits at once.
        self.event(ws, id, BackendStatus::Terminated, |e| {
            e.exit_code = Some(0);
            e.termination_kind = Some(kind);
            e.termination_reason = Some(reason);
        })
        .await?;
        self.backends.remove(id);
        Ok(())
    }

    async fn handle(&mut self, ws: &mut Socket, m: ControllerToDrone) -> anyhow::Result<()> {
        match m {
            ControllerToDrone::Spawn(spawn) => {
                self.stats.spawns.fetch_add(1, Ordering::Relaxed);
                let id = spawn.backend_id.clone();
                if self.backends.contains_key(&id) {
                    return Ok(()); // a re-sent spawn
                }
                // The first renewal at a random time before `renew_at`: see the module docs.
                let renew_at = instant_at(spawn.deadlines.renew_at);
                let spread = renew_at.saturating_duration_since(Instant::now());
                let first = Instant::now() + spread.mul_f64(rand::thread_rng().gen_range(0.0..1.0));
                self.backends.insert(
                    id.clone(),
                    FakeBackend {
                        fencing_token: spawn.key.fencing_token,
                        status: BackendStatus::Scheduled,
                        renew_at: first,
                        renew_sent: None,
                    },
                );
                self.event(ws, &id, BackendStatus::Loading, |_| {}).await?;
                self.event(ws, &id, BackendStatus::Starting, |_| {}).await?;
                self.event(ws, &id, BackendStatus::Waiting, |e| {
                    e.address = Some(([127, 0, 0, 1], 9).into());
                })
                .await?;
                self.event(ws, &id, BackendStatus::Ready, |_| {}).await?;
            }
            ControllerToDrone::Terminate {
                backend_id,
                kind,
                reason,
            } => {
                self.stats.terminates.fetch_add(1, Ordering::Relaxed);
                self.terminate(ws, &backend_id, kind, reason).await?;
            }
            ControllerToDrone::Ack { event_id } => {
                self.stats.acks.fetch_add(1, Ordering::Relaxed);
                if let Some((e, _)) = self.outbox.remove(&event_id) {
                    match e.status {
                        BackendStatus::Ready => self.stats.ready_acked.fetch_add(1, Ordering::Relaxed),
                        BackendStatus::Terminated => self.stats.terminated_acked.fetch_add(1, Ordering::Relaxed),
                        _ => 0,
                    };
                }
            }
            ControllerToDrone::Renewed { backend_id, deadlines } => match deadlines {
                Some(d) => {
                    self.stats.renewed.fetch_add(1, Ordering::Relaxed);
                    if let Some(b) = self.backends.get_mut(&backend_id) {
                        b.renew_at = instant_at(d.renew_at);
                        b.renew_sent = None;
                    }
                }
                None => {
                    self.stats.renewals_refused.fetch_add(1, Ordering::Relaxed);
                    if self.backends.contains_key(&backend_id) {
                        self.terminate(ws, &backend_id, TerminationKind::Soft, TerminationReason::KeyExpired)
                            .await?;
                    }
                }
            },
            other => bail!("unexpected message {other:?}"),
        }
        Ok(())
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

// ---------------------------------------------------------------------------------------
// Waiting, checking, measuring.

/// Waits for `cond` (checked every 100 ms), failing after [`WAIT_LIMIT`] or as soon as a
/// drone session failed.
async fn wait_for(what: &str, stats: &Stats, mut cond: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + WAIT_LIMIT;
    loop {
        check_failures(stats)?;
        if cond() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn check_failures(stats: &Stats) -> anyhow::Result<()> {
    let failures = stats.failures();
    if !failures.is_empty() {
        bail!(
            "{} fake drone session(s) failed, e.g.:\n  {}",
            failures.len(),
            failures.iter().take(5).cloned().collect::<Vec<_>>().join("\n  ")
        );
    }
    Ok(())
}

/// Fails unless the controller lists exactly `names` in the cluster, every one ready and
/// heartbeating within `max_age`. Returns the oldest heartbeat age, in seconds.
async fn check_alive(client: &PlaneClient, names: &HashSet<DroneName>, max_age: Duration) -> anyhow::Result<f64> {
    let cluster: ClusterName = CLUSTER.parse()?;
    let state = client.cluster_state(&cluster).await.context("GET cluster state")?;
    let mut seen = HashSet::new();
    let mut oldest: f64 = 0.0;
    for d in &state.drones {
        let plane_types::api::NodeName::Drone(name) = &d.node.name else {
            bail!("a drone listed as {:?}", d.node.name);
        };
        ensure!(names.contains(name), "the controller lists an unknown drone {name}");
        ensure!(d.ready, "the controller does not see drone {name} as ready: {d:?}");
        let age = d.last_heartbeat_age.context("no heartbeat age")?;
        ensure!(
            age <= max_age.as_secs_f64(),
            "drone {name}: last heartbeat {age:.1} s ago (more than {:.1} s)",
            max_age.as_secs_f64()
        );
        oldest = oldest.max(age);
        seen.insert(name.clone());
    }
    ensure!(
        seen.len() == names.len(),
        "the controller lists {} of the {} drones",
        seen.len(),
        names.len()
    );
    Ok(oldest)
}

/// What a window measured.
struct Window {
    secs: f64,
    /// Controller CPU seconds.
    cpu: f64,
    /// PostgreSQL server CPU seconds, if there is one.
    postgres: Option<f64>,
    counts: Counts,
    /// Controller CPU per second of the window, in % of a core.
    per_second: Vec<f64>,
}

impl Window {
    fn pct(&self) -> f64 {
        self.cpu / self.secs * 100.0
    }

    fn postgres_pct(&self) -> Option<f64> {
        self.postgres.map(|p| p / self.secs * 100.0)
    }
}

async fn measure(pid: u32, postmaster: Option<u32>, stats: &Stats, length: Duration) -> anyhow::Result<Window> {
    let counts_before = stats.counts();
    let pg_before = postmaster.map(postgres_cpu);
    let cpu_before = process_cpu(pid)?;
    let start = Instant::now();
    let mut per_second = Vec::new();
    let mut last = cpu_before;
    let mut tick = tokio::time::interval_at(start + Duration::from_secs(1), Duration::from_secs(1));
    while start.elapsed() + Duration::from_millis(500) < length {
        tick.tick().await;
        let cpu = process_cpu(pid)?;
        per_second.push((cpu - last) * 100.0);
        last = cpu;
    }
    tokio::time::sleep_until(start + length).await;
    let cpu = process_cpu(pid)? - cpu_before;
    let secs = start.elapsed().as_secs_f64();
    let postgres = postmaster.map(postgres_cpu).zip(pg_before).map(|(a, b)| a - b);
    check_failures(stats)?;
    Ok(Window {
        secs,
        cpu,
        postgres,
        counts: stats.counts().since(&counts_before),
        per_second,
    })
}

fn connect_request(key: &str) -> ConnectRequest {
    ConnectRequest {
        key: Some(KeyConfig {
            name: key.into(),
            namespace: String::new(),
            tag: String::new(),
        }),
        spawn_config: Some(SpawnConfig {
            id: None,
            cluster: None,
            pool: None,
            executable: serde_json::json!({ "command": ["sim-backend"] }),
            lifetime_limit_seconds: None,
            max_idle_seconds: None,
            use_static_token: false,
            subdomain: None,
        }),
        user: None,
        auth: None,
    }
}

/// Fails unless every backend in `ids` has `status` in the controller's store.
async fn check_statuses(client: &PlaneClient, ids: &[BackendName], status: BackendStatus) -> anyhow::Result<()> {
    for chunk in ids.chunks(32) {
        let entries = futures_util::future::try_join_all(chunk.iter().map(|id| client.status(id))).await?;
        for (id, e) in chunk.iter().zip(entries) {
            ensure!(e.status == status, "backend {id} is {}, expected {status}", e.status);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// One store.

struct Settings {
    binary: &'static str,
    drones: usize,
    backends: usize,
    churn_per_sec: f64,
    window: Duration,
    heartbeat_interval: Duration,
}

struct StoreResult {
    store: &'static str,
    idle: Window,
    heartbeats: Window,
    renewals: Window,
    churn: Window,
    churn_ops: u64,
    oldest_heartbeat_age: f64,
}

async fn run_store(
    s: &Settings,
    store: &'static str,
    db: &str,
    postmaster: Option<u32>,
    log: PathBuf,
) -> anyhow::Result<StoreResult> {
    println!("\n== {store}: starting the controller");
    let controller = ControllerProcess::start(s.binary, db, log).await?;
    let pid = controller.pid();
    let client = PlaneClient::new(&controller.url)?;
    let stats = Arc::new(Stats::default());
    let stop = CancellationToken::new();
    let result = run_windows(s, store, &controller, &client, postmaster, &stats, &stop).await;
    stop.cancel();
    let result =
        result.with_context(|| format!("{store} (controller pid {pid}, log tail:\n{})", controller.log_tail()));
    drop(controller);
    result
}

async fn run_windows(
    s: &Settings,
    store: &'static str,
    controller: &ControllerProcess,
    client: &PlaneClient,
    postmaster: Option<u32>,
    stats: &Arc<Stats>,
    stop: &CancellationToken,
) -> anyhow::Result<StoreResult> {
    let pid = controller.pid();
    // Let the start-up (migrations, first sweeps) settle, then measure the idle window.
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!("{store}: idle window ({:.0} s, no drone)", s.window.as_secs_f64());
    let idle = measure(pid, postmaster, stats, s.window).await?;

    // The drones: connected one after the other, heartbeating at random phases.
    let url = format!("{}{DRONE_SOCKET_PATH}", controller.url.replacen("http://", "ws://", 1));
    let cluster: ClusterName = CLUSTER.parse()?;
    let mut names = HashSet::new();
    let mut rng = rand::thread_rng();
    for i in 0..s.drones {
        let name: DroneName = format!("dr-sim-{i:05}").parse()?;
        names.insert(name.clone());
        let drone = FakeDrone {
            name,
            cluster: cluster.clone(),
            heartbeat_interval: s.heartbeat_interval,
            stats: stats.clone(),
            backends: HashMap::new(),
            outbox: BTreeMap::new(),
            next_event_id: 0,
            sent_heartbeat: false,
        };
        let start_after = CONNECT_SPREAD.mul_f64(i as f64 / s.drones as f64);
        let phase = s.heartbeat_interval.mul_f64(rng.gen_range(0.0..1.0));
        tokio::spawn(drone.run(url.clone(), start_after, phase, stop.clone()));
    }
    println!("{store}: connecting {} drones", s.drones);
    wait_for("every drone's Welcome", stats, || {
        stats.welcomed.load(Ordering::Relaxed) == s.drones
    })
    .await?;
    wait_for("every drone's first heartbeat", stats, || {
        stats.heartbeating.load(Ordering::Relaxed) == s.drones
    })
    .await?;
    // A heartbeat is sent every interval; allow that plus slack for the check itself.
    let max_age = s.heartbeat_interval + Duration::from_secs(3);
    check_alive(client, &names, max_age)
        .await
        .context("before the heartbeat window")?;
    println!(
        "{store}: heartbeat window ({:.0} s, {} drones alive)",
        s.window.as_secs_f64(),
        s.drones
    );
    let heartbeats = measure(pid, postmaster, stats, s.window).await?;
    let oldest_heartbeat_age = check_alive(client, &names, max_age)
        .await
        .context("after the heartbeat window")?;

    // Backends scheduled by the controller onto the fake drones.
    println!("{store}: starting {} backends through POST /ctrl/connect", s.backends);
    let mut live: VecDeque<BackendName> = VecDeque::new();
    let ready_before = stats.ready_acked.load(Ordering::Relaxed);
    let keys: Vec<String> = (0..s.backends).map(|i| format!("sim-{i}")).collect();
    for chunk in keys.chunks(16) {
        let requests: Vec<ConnectRequest> = chunk.iter().map(|k| connect_request(k)).collect();
        let answers = futures_util::future::try_join_all(requests.iter().map(|r| client.connect(r)))
            .await
            .context("connect")?;
        for a in answers {
            ensure!(a.spawned, "key of backend {} was already held", a.backend_id);
            ensure!(
                a.drone.as_ref().is_some_and(|d| names.contains(d)),
                "backend {} scheduled on {:?}",
                a.backend_id,
                a.drone
            );
            live.push_back(a.backend_id);
        }
    }
    let want = ready_before + s.backends as u64;
    wait_for("every backend's ready event acked", stats, || {
        stats.ready_acked.load(Ordering::Relaxed) >= want
    })
    .await?;
    check_statuses(client, live.make_contiguous(), BackendStatus::Ready).await?;
    check_alive(client, &names, max_age)
        .await
        .context("before the renewal window")?;
    println!(
        "{store}: renewal window ({:.0} s, {} drones, {} ready backends)",
        s.window.as_secs_f64(),
        s.drones,
        s.backends
    );
    let renewals = measure(pid, postmaster, stats, s.window).await?;
    ensure!(renewals.counts.renewals_refused == 0, "renewals were refused");
    check_alive(client, &names, max_age)
        .await
        .context("after the renewal window")?;

    // Churn: replace backends at a steady rate, through the API, while the window runs.
    println!(
        "{store}: churn window ({:.0} s, {:.1} replacements/s)",
        s.window.as_secs_f64(),
        s.churn_per_sec
    );
    let terminated_before = stats.terminated_acked.load(Ordering::Relaxed);
    let ready_before = stats.ready_acked.load(Ordering::Relaxed);
    let churn_stop = CancellationToken::new();
    let churner = {
        let client = client.clone();
        let stop = churn_stop.clone();
        let period = Duration::from_secs_f64(1.0 / s.churn_per_sec.max(0.001));
        let mut live = live.clone();
        let enabled = s.churn_per_sec > 0.0;
        tokio::spawn(async move {
            let mut gone = Vec::new();
            let mut next_key = 0usize;
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            if !enabled {
                return anyhow::Ok((live, gone));
            }
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let Some(old) = live.pop_front() else { break };
                client.soft_terminate(&old).await.context("soft-terminate")?;
                gone.push(old);
                let a = client
                    .connect(&connect_request(&format!("sim-churn-{next_key}")))
                    .await
                    .context("connect")?;
                next_key += 1;
                ensure!(a.spawned, "churn key was already held");
                live.push_back(a.backend_id);
            }
            anyhow::Ok((live, gone))
        })
    };
    let churn_window = async {
        let w = measure(pid, postmaster, stats, s.window).await;
        churn_stop.cancel();
        w
    };
    let (churn, churned) = tokio::join!(churn_window, churner);
    let churn = churn?;
    let (live, gone) = churned??;
    let churn_ops = gone.len() as u64;
    ensure!(churn.counts.renewals_refused == 0, "renewals were refused");
    // Every event of the churn reached the store: the old backends are terminated, the
    // new ones ready.
    wait_for("the churned backends' events acked", stats, || {
        stats.terminated_acked.load(Ordering::Relaxed) >= terminated_before + churn_ops
            && stats.ready_acked.load(Ordering::Relaxed) >= ready_before + churn_ops
    })
    .await?;
    check_statuses(client, &gone, BackendStatus::Terminated).await?;
    check_statuses(client, &Vec::from(live), BackendStatus::Ready).await?;
    check_alive(client, &names, max_age)
        .await
        .context("after the churn window")?;
    check_failures(stats)?;
    Ok(StoreResult {
        store,
        idle,
        heartbeats,
        renewals,
        churn,
        churn_ops,
        oldest_heartbeat_age,
    })
}

fn raise_nofile() -> anyhow::Result<()> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let drones = common::env_usize("PLANE_BENCH_DRONES", 500).max(1);
    let settings = Settings {
        binary: env!("CARGO_BIN_EXE_plane"),
        drones,
        backends: common::env_usize("PLANE_BENCH_BACKENDS", drones),
        churn_per_sec: common::env_f64("PLANE_BENCH_CHURN", 5.0),
        window: Duration::from_secs_f64(common::env_f64("PLANE_BENCH_SECONDS", 20.0).max(2.0)),
        heartbeat_interval: DroneTimings::default().heartbeat_interval,
    };
    let postgres = std::env::var("PLANE_BENCH_POSTGRES").map_or(true, |v| v != "0");
    raise_nofile()?;
    // Both this process (the drones) and the controller (inheriting the limit) hold one
    // socket per drone.
    let (soft, _) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?;
    ensure!(
        soft as usize > drones + 256,
        "RLIMIT_NOFILE is {soft}, too low for {drones} drones"
    );
    println!(
        "sim_drones: {} drones, heartbeat every {:.1} s, {} backends, {:.1} replacements/s, windows of {:.0} s",
        settings.drones,
        settings.heartbeat_interval.as_secs_f64(),
        settings.backends,
        settings.churn_per_sec,
        settings.window.as_secs_f64()
    );

    let dir = tempfile::tempdir()?;
    let mut results = Vec::new();
    let sqlite_db = dir.path().join("controller.db");
    results.push(
        run_store(
            &settings,
            "SQLite",
            sqlite_db.to_str().context("temp path")?,
            None,
            dir.path().join("controller-sqlite.log"),
        )
        .await?,
    );
    let _pg = if postgres {
        let pg = tokio::task::block_in_place(plane_test_postgres::TestPostgres::database)?;
        let postmaster = common::postmaster_pid(&pg.log_path())?;
        results.push(
            run_store(
                &settings,
                "PostgreSQL",
                &pg.url(),
                postmaster,
                dir.path().join("controller-postgres.log"),
            )
            .await?,
        );
        Some(pg)
    } else {
        None
    };

    let mut r = common::Report::new("sim_drones");
    println!();
    r.value("drones", "", drones as f64);
    r.value("heartbeat interval", "s", settings.heartbeat_interval.as_secs_f64());
    r.value("backends", "", settings.backends as f64);
    r.value("window", "s", settings.window.as_secs_f64());
    for res in &results {
        let st = res.store;
        let hb = &res.heartbeats;
        let idle_name = format!("controller CPU idle, {st}");
        let hb_name = format!("controller CPU with {drones} drones, {st}");
        r.value(&idle_name, "% of a core", res.idle.pct());
        r.value(&hb_name, "% of a core", hb.pct());
        r.series(
            &format!("controller CPU per 1 s, {drones} drones, {st}"),
            "% of a core",
            hb.per_second.clone(),
            1,
        );
        r.value(
            &format!("heartbeats/s, {st}"),
            "1/s",
            hb.counts.heartbeats as f64 / hb.secs,
        );
        let per_heartbeat = (hb.cpu - res.idle.cpu * hb.secs / res.idle.secs) / hb.counts.heartbeats.max(1) as f64;
        r.value(
            &format!("controller CPU per heartbeat (delta over idle), {st}"),
            "µs",
            per_heartbeat * 1e6,
        );
        r.value(
            &format!("oldest heartbeat age seen by the controller, {st}"),
            "s",
            res.oldest_heartbeat_age,
        );
        r.compare(&format!("{drones} drones vs idle, {st}"), &hb_name, &idle_name, false);

        let rw = &res.renewals;
        let rw_name = format!(
            "controller CPU with {drones} drones + {} backends renewing, {st}",
            settings.backends
        );
        r.value(&rw_name, "% of a core", rw.pct());
        r.value(&format!("renewals/s, {st}"), "1/s", rw.counts.renewed as f64 / rw.secs);
        let per_renewal = (rw.cpu - hb.cpu * rw.secs / hb.secs) / rw.counts.renewed.max(1) as f64;
        r.value(
            &format!("controller CPU per renewal (delta over heartbeats only), {st}"),
            "µs",
            per_renewal * 1e6,
        );

        let ch = &res.churn;
        let ch_name = format!("controller CPU with churn, {st}");
        r.value(&ch_name, "% of a core", ch.pct());
        r.value(&format!("replacements/s, {st}"), "1/s", res.churn_ops as f64 / ch.secs);
        r.value(
            &format!("events/s in churn, {st}"),
            "1/s",
            ch.counts.events_sent as f64 / ch.secs,
        );
        let per_op = (ch.cpu - rw.cpu * ch.secs / rw.secs) / res.churn_ops.max(1) as f64;
        r.value(
            &format!("controller CPU per replacement (2 API calls, 6 events), {st}"),
            "µs",
            per_op * 1e6,
        );
        if let (Some(i), Some(h), Some(w), Some(c)) = (
            res.idle.postgres_pct(),
            hb.postgres_pct(),
            rw.postgres_pct(),
            ch.postgres_pct(),
        ) {
            r.value("PostgreSQL server CPU idle", "% of a core", i);
            r.value(&format!("PostgreSQL server CPU with {drones} drones"), "% of a core", h);
            r.value("PostgreSQL server CPU with renewals", "% of a core", w);
            r.value("PostgreSQL server CPU with churn", "% of a core", c);
        }
        println!(
            "{st}: counts per window — heartbeats {}/{}/{}, renewals {}/{} (re-sent {}/{}), events {} (re-sent {}), acks {}, spawns {}, terminates {}",
            hb.counts.heartbeats,
            rw.counts.heartbeats,
            ch.counts.heartbeats,
            rw.counts.renewed,
            ch.counts.renewed,
            rw.counts.renewals_resent,
            ch.counts.renewals_resent,
            ch.counts.events_sent,
            hb.counts.events_resent + rw.counts.events_resent + ch.counts.events_resent,
            ch.counts.acks,
            ch.counts.spawns,
            ch.counts.terminates,
        );
        r.target(
            &format!("controller CPU with {drones} drones, {st}"),
            hb.pct(),
            "% of a core",
            "<=",
            10.0,
        );
    }
    r.finish()?;
    Ok(())
}
