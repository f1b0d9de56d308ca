//! The drone watchdog end to end: `plane drone` child processes (so they can be
//! SIGKILLed) against an in-process controller with short leases, real backend
//! processes and real containers (these tests need a Docker engine and fail without one).
//!
//! * A drone killed and not restarted: its watchdog kills the backend at the hard
//!   deadline, before the lease expires; the key then gets a new backend on another
//!   drone while the old one is dead (processes and containers).
//! * A drone that stays up keeps its backend through several lease periods with its
//!   watchdog running; a restarted drone reuses the running watchdog.
//! * `--no-watchdog` starts none, and then a killed drone's backend outlives its lease
//!   (the hole the watchdog closes; it also shows the first test can see a difference);
//!   `plane drone-watchdog` run by hand then kills it and exits by itself.
//! * The event journal (`--event-journal`) gets one line per status change.

use plane_drone::watchdog::{running_watchdog, watchdog_log_path};
use plane_drone::{ProcessHandle, RuntimeHandle, StateStore};
use plane_test_image::{inspect, RemoveContainers};
use plane_tests::{eventually, Options, TestCluster, WAIT};
use plane_types::api::{ConnectRequest, NodeName};
use plane_types::lease::LeaseDeadlines;
use plane_types::names::{BackendName, DroneName};
use plane_types::status::{BackendStatus, TerminationReason};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PLANE: &str = env!("CARGO_BIN_EXE_plane");

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A cluster with no drone of its own (tests start `plane drone` processes) and this
/// lease unit (renew at 3 units, soft at 4, hard at 5, expiry at 6).
async fn cluster(lease_unit: Duration, docker: bool) -> TestCluster {
    let mut options = Options::new(PLANE);
    options.drone = false;
    options.lease_unit = lease_unit;
    if docker {
        options.docker = Some(plane_drone::DockerRuntimeConfig::default());
    }
    TestCluster::start(options).await.expect("cluster starts")
}

fn drone_name(tag: &str) -> DroneName {
    format!("dr-wd-{tag}-{}", std::process::id()).parse().unwrap()
}

/// A `plane drone` process, SIGKILLed when dropped.
struct Drone {
    child: Child,
    log: PathBuf,
}

impl Drone {
    /// SIGKILL: no shutdown path runs.
    fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Drone {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `plane drone` for `tc` with the state store `db`; `plane` is on its `PATH` and
/// allowed, so `["plane", "demo-backend"]` runs. A watchdog it starts exits 1 s after
/// it has nothing left to do.
fn spawn_drone(tc: &TestCluster, name: &DroneName, db: &Path, extra: &[&str]) -> Drone {
    let log = db.with_extension("drone.log");
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .unwrap();
    let bin_dir = Path::new(PLANE).parent().unwrap();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let child = Command::new(PLANE)
        .args(["drone", "--name", name.as_str()])
        .args(["--controller-url", &tc.controller_url, "--cluster", tc.cluster.as_str()])
        .arg("--db")
        .arg(db)
        .args(["--heartbeat-interval-ms", "200", "--metrics-interval-seconds", "1"])
        .args(["--watchdog-exit-after-ms", "1000"])
        .args(extra)
        .env("PATH", path)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(out)
        .spawn()
        .unwrap();
    Drone { child, log }
}

fn process_drone(tc: &TestCluster, name: &DroneName, db: &Path, extra: &[&str]) -> Drone {
    let mut args = vec!["--runtime", "process", "--allow-command", "plane"];
    args.extend(extra);
    spawn_drone(tc, name, db, &args)
}

async fn wait_drone_ready(tc: &TestCluster, name: &DroneName) {
    tc.wait_for(|s| {
        s.drones
            .iter()
            .any(|d| d.node.name == NodeName::Drone(name.clone()) && d.ready)
    })
    .await
    .unwrap();
}

/// The pid of the watchdog of `db`, once it holds its lock.
async fn watchdog_pid(db: &Path) -> u32 {
    eventually("the watchdog to hold its lock", || {
        running_watchdog(db).unwrap().and_then(|w| w.pid)
    })
    .await
}

/// `/proc/<pid>/stat`: the state and the start time.
fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = text[text.rfind(')')? + 1..].split_whitespace().collect();
    Some((fields.first()?.chars().next()?, fields.get(19)?.parse().ok()?))
}

/// Whether the process is running (a zombie is not: nobody may reap it here).
fn running(pid: u32, start_time: Option<u64>) -> bool {
    proc_stat(pid)
        .is_some_and(|(state, start)| !matches!(state, 'Z' | 'X' | 'x') && start_time.is_none_or(|t| t == start))
}

fn backend_running(h: &ProcessHandle) -> bool {
    running(h.pid, Some(h.start_time))
}

/// Every process whose command line is `plane drone-watchdog --db <db> …`.
fn watchdog_processes(db: &Path) -> Vec<u32> {
    let db = db.to_string_lossy().into_owned();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.iter().any(|a| a == "drone-watchdog") && args.contains(&db) && running(pid, None) {
            pids.push(pid);
        }
    }
    pids
}

/// What the drone's state store says about a backend.
async fn drone_record(db: &Path, id: &BackendName) -> plane_drone::state::BackendRecord {
    let store = StateStore::open_read_only(db).await.unwrap();
    let record = store
        .backend(id)
        .await
        .unwrap()
        .expect("the drone recorded the backend");
    store.close().await;
    record
}

async fn process_handle(db: &Path, id: &BackendName) -> ProcessHandle {
    match drone_record(db, id).await.handle {
        Some(RuntimeHandle::Process(h)) => h,
        other => panic!("not a process handle: {other:?}"),
    }
}

/// Kills a backend's process group when dropped, if it still runs (for tests where
/// nobody else does).
struct KillGroup(ProcessHandle);

impl Drop for KillGroup {
    fn drop(&mut self) {
        if backend_running(&self.0) {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", self.0.pid)])
                .status();
        }
    }
}

/// Asserts that a backend died at or after its hard deadline and before its lease can
/// have expired: the store's expiry comes one lease unit (the soft→hard step) after the
/// hard deadline, or later. Returns how long after the hard deadline it died.
fn assert_killed_in_time(died_at: u64, d: &LeaseDeadlines) -> u64 {
    let step = d.hard_terminate_at - d.soft_terminate_at;
    assert!(
        died_at >= d.hard_terminate_at,
        "the backend died {} ms before its hard deadline",
        d.hard_terminate_at - died_at
    );
    let after = died_at - d.hard_terminate_at;
    assert!(
        after < step,
        "the backend died {after} ms after its hard deadline, not before the expiry {step} ms after it"
    );
    after
}

/// After the drone is gone: the key's lease runs out, the controller marks the old
/// backend lost, and a connect for the key gets a new backend (on the cluster's own
/// drone) that becomes ready while the old one is dead. Returns the new backend.
async fn key_moves_on(
    tc: &mut TestCluster,
    request: &ConnectRequest,
    old: &BackendName,
    old_dead: impl Fn() -> bool,
) -> BackendName {
    let last = tc.wait_status(old, BackendStatus::Terminated).await.unwrap();
    assert_eq!(last.termination_reason, Some(TerminationReason::Lost), "{last:?}");
    tc.start_drone().await.unwrap();
    let new = tc.connect(request).await.unwrap();
    assert!(new.spawned, "{new:?}");
    assert_ne!(&new.backend_id, old);
    tc.wait_status(&new.backend_id, BackendStatus::Ready).await.unwrap();
    assert!(old_dead(), "the old backend runs beside the new one");
    new.backend_id
}

#[tokio::test]
async fn the_watchdog_kills_a_process_backend_whose_drone_was_killed() {
    let begun = Instant::now();
    let mut tc = cluster(Duration::from_millis(500), false).await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("drone.db");
    let name = drone_name("proc");
    let mut drone = process_drone(&tc, &name, &db, &[]);
    wait_drone_ready(&tc, &name).await;
    let watchdog = watchdog_pid(&db).await;
    assert!(drone.log().contains("started the watchdog"), "{}", drone.log());

    let request = tc.demo_request("watched");
    let old = tc.connect_ready(&request).await.unwrap();
    let handle = process_handle(&db, &old.backend_id).await;
    let _cleanup = KillGroup(handle);
    assert!(backend_running(&handle));

    drone.kill();
    let deadlines = drone_record(&db, &old.backend_id).await.deadlines.unwrap();
    assert!(running(watchdog, None), "the watchdog died with its drone");
    assert_eq!(running_watchdog(&db).unwrap().and_then(|w| w.pid), Some(watchdog));

    let died_at = eventually("the backend to be killed", || (!backend_running(&handle)).then(now_ms)).await;
    let after = assert_killed_in_time(died_at, &deadlines);
    let log = std::fs::read_to_string(watchdog_log_path(&db)).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("killed the backend with SIGKILL") && l.contains(old.backend_id.as_str())),
        "{log}"
    );

    key_moves_on(&mut tc, &request, &old.backend_id, || !backend_running(&handle)).await;
    // With its drone gone and its backend dead, the watchdog exits by itself.
    eventually("the watchdog to exit", || (!running(watchdog, None)).then_some(())).await;
    assert_eq!(running_watchdog(&db).unwrap(), None);
    tc.shutdown().await.unwrap();
    eprintln!(
        "killed {after} ms after the hard deadline; test took {:?}",
        begun.elapsed()
    );
}

#[tokio::test]
async fn the_watchdog_kills_a_container_whose_drone_was_killed() {
    let begun = Instant::now();
    let image = plane_test_image::test_image().await;
    let mut tc = cluster(Duration::from_secs(1), true).await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("drone.db");
    let name = drone_name("docker");
    let _containers = RemoveContainers(name.to_string());
    let mut drone = spawn_drone(&tc, &name, &db, &["--runtime", "docker"]);
    wait_drone_ready(&tc, &name).await;
    let watchdog = watchdog_pid(&db).await;

    let request = tc.executable_request("watched-container", json!({"image": image, "pull_policy": "Never"}));
    let old = tc.connect_ready(&request).await.unwrap();
    let container = format!("plane-{}", old.backend_id);
    let is_running = |c: &str| inspect(c).is_some_and(|i| i["State"]["Running"] == true);
    assert!(is_running(&container));
    let info = inspect(&container).unwrap();
    assert_eq!(info["Config"]["Labels"]["dev.plane.drone"], name.as_str());

    drone.kill();
    let deadlines = drone_record(&db, &old.backend_id).await.deadlines.unwrap();
    assert!(running(watchdog, None), "the watchdog died with its drone");

    let died_at = eventually("the container to be killed", || (!is_running(&container)).then(now_ms)).await;
    let after = assert_killed_in_time(died_at, &deadlines);
    let info = inspect(&container).expect("the container is stopped, not removed");
    assert_eq!(info["State"]["ExitCode"], 137, "{}", info["State"]);
    let log = std::fs::read_to_string(watchdog_log_path(&db)).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("killed the backend with SIGKILL") && l.contains(old.backend_id.as_str())),
        "{log}"
    );

    let new = key_moves_on(&mut tc, &request, &old.backend_id, || !is_running(&container)).await;
    let new_drone = tc.store.backend(&new).await.unwrap().unwrap().drone;
    let _new_containers = RemoveContainers(new_drone.to_string());
    eventually("the watchdog to exit", || (!running(watchdog, None)).then_some(())).await;
    tc.shutdown().await.unwrap();
    eprintln!(
        "killed {after} ms after the hard deadline; test took {:?}",
        begun.elapsed()
    );
}

#[tokio::test]
async fn a_live_drone_keeps_its_backend_and_a_restarted_drone_reuses_its_watchdog() {
    let begun = Instant::now();
    let unit = Duration::from_millis(500);
    let tc = cluster(unit, false).await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("drone.db");
    let name = drone_name("live");
    let mut drone = process_drone(&tc, &name, &db, &[]);
    wait_drone_ready(&tc, &name).await;
    let watchdog = watchdog_pid(&db).await;
    let b = tc.connect_ready(&tc.demo_request("kept")).await.unwrap();
    let handle = process_handle(&db, &b.backend_id).await;
    let _cleanup = KillGroup(handle);

    // Three whole lease periods: the drone renews, the watchdog watches, nothing dies.
    let mut hard_deadlines = Vec::new();
    let until = Instant::now() + unit * 6 * 3;
    while Instant::now() < until {
        assert!(backend_running(&handle), "the backend of a live drone died");
        assert!(running(watchdog, None), "the watchdog stopped");
        let status = tc.client.status(&b.backend_id).await.unwrap();
        assert_eq!(status.status, BackendStatus::Ready, "{status:?}");
        let hard = drone_record(&db, &b.backend_id)
            .await
            .deadlines
            .unwrap()
            .hard_terminate_at;
        if hard_deadlines.last() != Some(&hard) {
            hard_deadlines.push(hard);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        hard_deadlines.len() >= 4,
        "the lease was renewed too rarely: {hard_deadlines:?}"
    );
    assert!(hard_deadlines.windows(2).all(|w| w[0] < w[1]), "{hard_deadlines:?}");
    assert!(
        hard_deadlines[0] < now_ms(),
        "the first hard deadline passed while the backend ran (it was renewed)"
    );

    // The drone restarts right after a renewal (its next one is then 1.5 s away): the
    // new one finds the watchdog running and starts none.
    let renewed = drone_record(&db, &b.backend_id).await.deadlines;
    let deadline = Instant::now() + WAIT;
    while drone_record(&db, &b.backend_id).await.deadlines == renewed {
        assert!(Instant::now() < deadline, "no renewal");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drone.kill();
    let first_run = drone.log().len();
    drop(drone);
    let drone = process_drone(&tc, &name, &db, &[]);
    wait_drone_ready(&tc, &name).await;
    let second_run = || drone.log()[first_run..].to_owned();
    eventually("the drone to look for a watchdog", || {
        second_run()
            .contains("a watchdog runs for this state store already")
            .then_some(())
    })
    .await;
    assert!(!second_run().contains("started the watchdog"), "{}", second_run());
    assert_eq!(running_watchdog(&db).unwrap().and_then(|w| w.pid), Some(watchdog));
    assert_eq!(watchdog_processes(&db), vec![watchdog], "exactly one watchdog");

    // The re-adopted backend lives on through another lease period.
    let until = Instant::now() + unit * 6;
    while Instant::now() < until {
        assert!(backend_running(&handle), "the re-adopted backend died");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = std::fs::read_to_string(watchdog_log_path(&db)).unwrap();
    assert!(!log.contains("killed the backend"), "{log}");
    tc.client.hard_terminate(&b.backend_id).await.unwrap();
    tc.wait_status(&b.backend_id, BackendStatus::Terminated).await.unwrap();
    assert!(!backend_running(&handle));
    drop(drone);
    eventually("the watchdog to exit", || (!running(watchdog, None)).then_some(())).await;
    tc.shutdown().await.unwrap();
    eprintln!("test took {:?}", begun.elapsed());
}

#[tokio::test]
async fn without_a_watchdog_a_killed_drones_backend_outlives_its_lease() {
    let begun = Instant::now();
    let tc = cluster(Duration::from_millis(500), false).await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("drone.db");
    let name = drone_name("none");
    let mut drone = process_drone(&tc, &name, &db, &["--no-watchdog"]);
    wait_drone_ready(&tc, &name).await;
    let b = tc.connect_ready(&tc.demo_request("unwatched")).await.unwrap();
    let handle = process_handle(&db, &b.backend_id).await;
    let _cleanup = KillGroup(handle);
    assert_eq!(running_watchdog(&db).unwrap(), None);
    assert!(watchdog_processes(&db).is_empty());
    assert!(!watchdog_log_path(&db).exists());
    assert!(drone.log().contains("not starting a watchdog"), "{}", drone.log());

    drone.kill();
    let deadlines = drone_record(&db, &b.backend_id).await.deadlines.unwrap();
    // The lease expires (the controller marks the backend lost) and the backend, which
    // nobody killed, still runs: two backends could now hold the key.
    let last = tc.wait_status(&b.backend_id, BackendStatus::Terminated).await.unwrap();
    assert_eq!(last.termination_reason, Some(TerminationReason::Lost));
    let expiry = deadlines.hard_terminate_at + (deadlines.hard_terminate_at - deadlines.soft_terminate_at);
    assert!(now_ms() > expiry);
    assert!(backend_running(&handle), "the backend died without a watchdog");

    // `plane drone-watchdog` run by hand kills it at once (its deadline is long past),
    // then exits by itself: no drone runs and nothing is left to watch.
    let mut watchdog = Command::new(PLANE)
        .args(["drone-watchdog", "--exit-after-ms", "500", "--db"])
        .arg(&db)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    eventually("the backend to be killed", || (!backend_running(&handle)).then_some(())).await;
    let status = eventually("the watchdog to exit", || watchdog.try_wait().unwrap()).await;
    assert!(status.success(), "{status}");
    let mut log = String::new();
    std::io::Read::read_to_string(&mut watchdog.stderr.take().unwrap(), &mut log).unwrap();
    assert!(log.contains("killed the backend with SIGKILL"), "{log}");
    assert!(log.contains("exiting"), "{log}");
    tc.shutdown().await.unwrap();
    eprintln!("test took {:?}", begun.elapsed());
}

/// The journal's lines about `id`, checked for shape.
fn journal_statuses(journal: &Path, id: &BackendName) -> Vec<String> {
    let text = std::fs::read_to_string(journal).unwrap_or_default();
    let mut last_time = 0;
    let mut statuses = Vec::new();
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        let fields = v.as_object().unwrap();
        assert_eq!(fields.len(), 3, "{line}");
        if v["backend_id"] != id.as_str() {
            continue;
        }
        let time = v["time"].as_u64().unwrap();
        assert!(time >= last_time, "time went back: {line}");
        last_time = time;
        statuses.push(v["status"].as_str().unwrap().to_owned());
    }
    statuses
}

#[tokio::test]
async fn the_event_journal_records_each_status_change() {
    let begun = Instant::now();
    let tc = cluster(Duration::from_millis(500), false).await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("drone.db");
    let journal = dir.path().join("events.jsonl");
    let journal_arg = journal.to_string_lossy().into_owned();
    let name = drone_name("journal");
    let extra = ["--no-watchdog", "--event-journal", journal_arg.as_str()];
    let mut drone = process_drone(&tc, &name, &db, &extra);
    wait_drone_ready(&tc, &name).await;

    let first = tc.connect_ready(&tc.demo_request("journaled")).await.unwrap();
    tc.client.soft_terminate(&first.backend_id).await.unwrap();
    tc.wait_status(&first.backend_id, BackendStatus::Terminated)
        .await
        .unwrap();
    let expected = [
        "scheduled",
        "loading",
        "starting",
        "waiting",
        "ready",
        "terminating",
        "terminated",
    ];
    // The line is written when the event is recorded, before it is sent and acked.
    assert_eq!(journal_statuses(&journal, &first.backend_id), expected);

    // A restarted drone appends to the same journal.
    drone.kill();
    let _drone = process_drone(&tc, &name, &db, &extra);
    wait_drone_ready(&tc, &name).await;
    let second = tc.connect_ready(&tc.demo_request("journaled-too")).await.unwrap();
    tc.client.soft_terminate(&second.backend_id).await.unwrap();
    tc.wait_status(&second.backend_id, BackendStatus::Terminated)
        .await
        .unwrap();
    assert_eq!(journal_statuses(&journal, &first.backend_id), expected);
    assert_eq!(journal_statuses(&journal, &second.backend_id), expected);
    tc.shutdown().await.unwrap();
    eprintln!("test took {:?}", begun.elapsed());
}
