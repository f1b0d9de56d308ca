//! Tests of the whole drone with real processes and a real state store: backend
//! lifecycles through the backend tasks, restarts, and [`crate::run`] against a
//! scripted WebSocket peer that plays the controller's side of the protocol.

use crate::backend::{BackendContext, Outgoing};
use crate::drone::Drone;
use crate::runtime::process::ProcessRuntime;
use crate::runtime::{probe_http, Runtime};
use crate::state::{now_ms, StateStore, StatusUpdate};
use crate::test_util::{eventually, far_deadlines, spawn_action, TempDir};
use crate::{DroneConfig, DroneTimings, ProcessRuntimeConfig, RuntimeHandle};
use futures_util::{SinkExt, StreamExt};
use plane_types::executable::RuntimeKind;
use plane_types::lease::LeaseDeadlines;
use plane_types::names::BackendName;
use plane_types::protocol::{BackendEvent, ControllerToDrone, DroneHello, DroneToController, PROTOCOL_VERSION};
use plane_types::status::{BackendStatus as S, TerminationKind, TerminationReason};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

const LIMIT: Duration = Duration::from_secs(20);

fn http_backend() -> Vec<&'static str> {
    vec![
        "sh",
        "-c",
        "exec /usr/bin/python3 -m http.server --bind 127.0.0.1 $PORT",
    ]
}

/// A backend that ignores SIGTERM and never listens, and the file that shows it is
/// ignoring SIGTERM already.
fn stubborn(dir: &TempDir, name: &str) -> (Vec<String>, std::path::PathBuf) {
    let marker = dir.path().join(format!("{name}.trapped"));
    let script = format!("trap '' TERM; touch {}; while :; do sleep 0.05; done", marker.display());
    (vec!["sh".into(), "-c".into(), script], marker)
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn timings() -> DroneTimings {
    DroneTimings {
        heartbeat_interval: Duration::from_millis(200),
        soft_terminate_grace: Duration::from_secs(30),
        startup_timeout: Duration::from_secs(30),
        reconnect_min: Duration::from_millis(10),
        reconnect_max: Duration::from_millis(50),
        renew_retry: Duration::from_millis(50),
        metrics_interval: Duration::from_millis(200),
    }
}

fn process_config(dir: &TempDir) -> ProcessRuntimeConfig {
    ProcessRuntimeConfig {
        allow_commands: vec!["sh".into(), "sleep".into()],
        program_aliases: HashMap::new(),
        log_dir: dir.path().join("logs"),
        bind_host: IpAddr::V4(Ipv4Addr::LOCALHOST),
    }
}

/// A drone without a connection: what it would send lands in `rx`.
struct Harness {
    drone: Drone,
    rx: mpsc::UnboundedReceiver<Outgoing>,
}

impl Harness {
    fn new(dir: &TempDir, store: &StateStore, timings: DroneTimings) -> Harness {
        let cancel = CancellationToken::new();
        let runtime = ProcessRuntime::new(process_config(dir), cancel.child_token()).unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let ctx = BackendContext {
            store: store.clone(),
            outgoing: tx,
            timings,
        };
        Harness {
            drone: Drone::new(vec![Arc::new(runtime) as Arc<dyn Runtime>], ctx, cancel),
            rx,
        }
    }

    async fn outgoing(&mut self) -> Outgoing {
        tokio::time::timeout(LIMIT, self.rx.recv())
            .await
            .expect("something to send")
            .expect("channel open")
    }

    async fn event(&mut self) -> BackendEvent {
        loop {
            if let Outgoing::Event(e) = self.outgoing().await {
                return e;
            }
        }
    }

    async fn expect(&mut self, status: S) -> BackendEvent {
        let e = self.event().await;
        assert_eq!(e.status, status, "{e:?}");
        e
    }

    async fn spawn(&mut self, id: &str, command: &[&str], deadlines: LeaseDeadlines) {
        self.drone
            .handle(ControllerToDrone::Spawn(Box::new(spawn_action(id, command, deadlines))))
            .await;
    }

    async fn terminate(&mut self, id: &str, kind: TerminationKind, reason: TerminationReason) {
        let backend_id = id.parse().unwrap();
        self.drone
            .handle(ControllerToDrone::Terminate {
                backend_id,
                kind,
                reason,
            })
            .await;
    }

    async fn until_ready(&mut self) -> BackendEvent {
        self.expect(S::Loading).await;
        self.expect(S::Starting).await;
        let waiting = self.expect(S::Waiting).await;
        let ready = self.expect(S::Ready).await;
        assert_eq!(waiting.address, ready.address);
        assert!(waiting.address.is_some());
        ready
    }
}

async fn open_store(dir: &TempDir) -> StateStore {
    StateStore::open(&dir.path().join("state/drone.db")).await.unwrap()
}

fn pid_of(handle: &RuntimeHandle) -> u32 {
    let RuntimeHandle::Process(p) = handle else {
        panic!("not a process handle: {handle:?}")
    };
    p.pid
}

#[tokio::test]
async fn spawn_to_ready_then_soft_terminate() {
    let dir = TempDir::new("life-ready");
    let store = open_store(&dir).await;
    let mut h = Harness::new(&dir, &store, timings());
    h.spawn("life1", &http_backend(), far_deadlines()).await;
    let ready = h.until_ready().await;
    let address = ready.address.unwrap();
    assert!(probe_http(address).await);

    // A duplicate spawn is ignored: the next event is the termination's.
    h.spawn("life1", &http_backend(), far_deadlines()).await;
    h.terminate("life1", TerminationKind::Soft, TerminationReason::Swept)
        .await;
    let e = h.expect(S::Terminating).await;
    assert_eq!(e.termination_kind, Some(TerminationKind::Soft));
    assert_eq!(e.termination_reason, Some(TerminationReason::Swept));
    let e = h.expect(S::Terminated).await;
    assert_eq!(e.exit_code, None, "python dies of SIGTERM");
    assert_eq!(e.termination_reason, Some(TerminationReason::Swept));
    assert!(e.event_id > ready.event_id);

    // Everything was recorded before it was sent.
    let unacked: Vec<S> = store
        .unacked_events()
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.status)
        .collect();
    assert_eq!(
        unacked,
        [
            S::Loading,
            S::Starting,
            S::Waiting,
            S::Ready,
            S::Terminating,
            S::Terminated
        ]
    );
    assert!(store.live_backends().await.unwrap().is_empty());
    let log = dir.path().join("logs/life1.log");
    assert!(
        std::fs::read_to_string(log).unwrap().contains("GET / HTTP/1.1"),
        "the probe shows in the backend's log"
    );
    h.drone.shutdown().await;
}

#[tokio::test]
async fn soft_while_soft_is_a_no_op_and_hard_upgrades() {
    let dir = TempDir::new("life-upgrade");
    let store = open_store(&dir).await;
    let mut h = Harness::new(&dir, &store, timings());
    let (cmd, trapped) = stubborn(&dir, "up1");
    h.spawn("up1", &strs(&cmd), far_deadlines()).await;
    h.expect(S::Loading).await;
    h.expect(S::Starting).await;
    h.expect(S::Waiting).await;
    eventually(LIMIT, || trapped.exists()).await;
    h.terminate("up1", TerminationKind::Soft, TerminationReason::External)
        .await;
    h.expect(S::Terminating).await;
    h.terminate("up1", TerminationKind::Soft, TerminationReason::External)
        .await;
    h.terminate("up1", TerminationKind::Hard, TerminationReason::External)
        .await;
    let e = h.expect(S::HardTerminating).await;
    assert_eq!(e.termination_kind, Some(TerminationKind::Hard));
    let e = h.expect(S::Terminated).await;
    assert_eq!(e.termination_kind, Some(TerminationKind::Hard));
    assert_eq!(e.exit_code, None);
    h.drone.shutdown().await;
}

#[tokio::test]
async fn soft_terminate_escalates_after_the_grace_period() {
    let dir = TempDir::new("life-grace");
    let store = open_store(&dir).await;
    let mut h = Harness::new(
        &dir,
        &store,
        DroneTimings {
            soft_terminate_grace: Duration::from_millis(200),
            ..timings()
        },
    );
    let (cmd, trapped) = stubborn(&dir, "grace1");
    h.spawn("grace1", &strs(&cmd), far_deadlines()).await;
    h.expect(S::Loading).await;
    h.expect(S::Starting).await;
    h.expect(S::Waiting).await.address.unwrap();
    eventually(LIMIT, || trapped.exists()).await;
    h.terminate("grace1", TerminationKind::Soft, TerminationReason::Swept)
        .await;
    let soft = h.expect(S::Terminating).await;
    let started = std::time::Instant::now();
    let hard = h.expect(S::HardTerminating).await;
    assert!(started.elapsed() >= Duration::from_millis(150));
    assert_eq!(hard.termination_reason, Some(TerminationReason::Swept));
    assert_eq!(hard.termination_kind, Some(TerminationKind::Hard));
    assert!(hard.event_id > soft.event_id);
    h.expect(S::Terminated).await;
    h.drone.shutdown().await;
}

#[tokio::test]
async fn startup_timeout_hard_terminates() {
    let dir = TempDir::new("life-timeout");
    let store = open_store(&dir).await;
    let mut h = Harness::new(
        &dir,
        &store,
        DroneTimings {
            startup_timeout: Duration::from_millis(300),
            ..timings()
        },
    );
    h.spawn("slow1", &["sleep", "1000"], far_deadlines()).await;
    h.expect(S::Loading).await;
    h.expect(S::Starting).await;
    h.expect(S::Waiting).await;
    let e = h.expect(S::HardTerminating).await;
    assert_eq!(e.termination_reason, Some(TerminationReason::StartupTimeout));
    assert_eq!(e.termination_kind, Some(TerminationKind::Hard));
    let e = h.expect(S::Terminated).await;
    assert_eq!(e.termination_reason, Some(TerminationReason::StartupTimeout));
    assert_eq!(e.exit_code, None);
    h.drone.shutdown().await;
}

#[tokio::test]
async fn failures_to_start_are_internal_errors() {
    let dir = TempDir::new("life-fail");
    let store = open_store(&dir).await;
    let mut h = Harness::new(&dir, &store, timings());
    h.spawn("deny1", &["cat", "/etc/passwd"], far_deadlines()).await;
    h.expect(S::Loading).await;
    let e = h.expect(S::Terminated).await;
    assert_eq!(e.termination_reason, Some(TerminationReason::InternalError));
    assert!(
        e.message.as_deref().unwrap_or("").contains("`cat` is not allowed"),
        "{e:?}"
    );

    // A Docker executable on a drone without Docker.
    let mut spawn = spawn_action("docker1", &["sh"], far_deadlines());
    spawn.executable = plane_types::executable::Executable::from_json(&serde_json::json!({"image": "x"})).unwrap();
    h.drone.handle(ControllerToDrone::Spawn(Box::new(spawn))).await;
    let e = h.expect(S::Terminated).await;
    assert_eq!(e.termination_reason, Some(TerminationReason::InternalError));

    // A process that exits while starting reports its exit code.
    h.spawn("exit1", &["sh", "-c", "exit 4"], far_deadlines()).await;
    h.expect(S::Loading).await;
    h.expect(S::Starting).await;
    h.expect(S::Waiting).await;
    let e = h.expect(S::Terminated).await;
    assert_eq!((e.exit_code, e.termination_reason), (Some(4), None));
    h.drone.shutdown().await;
}

#[tokio::test]
async fn terminate_for_an_unknown_backend_reports_it_lost_once() {
    let dir = TempDir::new("life-unknown");
    let store = open_store(&dir).await;
    let mut h = Harness::new(&dir, &store, timings());
    h.terminate("ghost1", TerminationKind::Hard, TerminationReason::External)
        .await;
    let e = h.expect(S::Terminated).await;
    assert_eq!(e.backend_id.as_str(), "ghost1");
    assert_eq!(e.termination_reason, Some(TerminationReason::Lost));
    h.terminate("ghost1", TerminationKind::Soft, TerminationReason::External)
        .await;
    h.terminate("ghost2", TerminationKind::Soft, TerminationReason::External)
        .await;
    let e = h.expect(S::Terminated).await;
    assert_eq!(e.backend_id.as_str(), "ghost2", "ghost1 is not reported twice");
    h.drone.shutdown().await;
}

async fn expect_renew(h: &mut Harness) -> (BackendName, i64) {
    match h.outgoing().await {
        Outgoing::Transient(DroneToController::RenewKey {
            backend_id,
            fencing_token,
            local_time,
        }) => {
            assert!(local_time <= now_ms());
            (backend_id, fencing_token)
        }
        other => panic!("expected a RenewKey, got {other:?}"),
    }
}

#[tokio::test]
async fn key_renewal_and_revocation() {
    let dir = TempDir::new("life-renew");
    let store = open_store(&dir).await;
    let mut h = Harness::new(&dir, &store, timings());
    let now = now_ms();
    let deadlines = LeaseDeadlines {
        renew_at: now,
        soft_terminate_at: now + 60_000,
        hard_terminate_at: now + 120_000,
    };
    let (cmd, trapped) = stubborn(&dir, "renew1");
    h.spawn("renew1", &strs(&cmd), deadlines).await;
    // Renewal runs from `renew_at` whatever the status, and repeats until answered.
    let mut statuses = Vec::new();
    let mut renewals = 0;
    while renewals < 3 || statuses.len() < 3 {
        match h.outgoing().await {
            Outgoing::Event(e) => statuses.push(e.status),
            Outgoing::Transient(DroneToController::RenewKey {
                backend_id,
                fencing_token,
                ..
            }) => {
                assert_eq!((backend_id.as_str(), fencing_token), ("renew1", 3));
                renewals += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(statuses, [S::Loading, S::Starting, S::Waiting]);

    let id: BackendName = "renew1".parse().unwrap();
    let later = LeaseDeadlines {
        renew_at: now_ms() + 150,
        soft_terminate_at: now + 60_000,
        hard_terminate_at: now + 120_000,
    };
    h.drone
        .handle(ControllerToDrone::Renewed {
            backend_id: id.clone(),
            deadlines: Some(later),
        })
        .await;
    let store2 = store.clone();
    let id2 = id.clone();
    // The renewed deadlines are persisted, and renewal resumes at the new renew_at.
    let recorded = async move {
        loop {
            if store2.backend(&id2).await.unwrap().unwrap().deadlines == Some(later) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(LIMIT, recorded).await.unwrap();
    // Requests sent before the answer arrived may still be queued.
    while h.rx.try_recv().is_ok() {}
    expect_renew(&mut h).await;
    assert!(now_ms() >= later.renew_at);

    eventually(LIMIT, || trapped.exists()).await;
    h.drone
        .handle(ControllerToDrone::Renewed {
            backend_id: id,
            deadlines: None,
        })
        .await;
    let e = loop {
        if let Outgoing::Event(e) = h.outgoing().await {
            break e;
        }
    };
    assert_eq!(e.status, S::Terminating);
    assert_eq!(e.termination_reason, Some(TerminationReason::KeyExpired));
    h.terminate("renew1", TerminationKind::Hard, TerminationReason::External)
        .await;
    h.expect(S::HardTerminating).await;
    h.expect(S::Terminated).await;
    h.drone.shutdown().await;
}

#[tokio::test]
async fn an_unrenewed_lease_terminates_the_backend_on_its_own() {
    let dir = TempDir::new("life-expire");
    let store = open_store(&dir).await;
    let mut h = Harness::new(&dir, &store, timings());
    let now = now_ms();
    let deadlines = LeaseDeadlines {
        renew_at: now,
        soft_terminate_at: now + 400,
        hard_terminate_at: now + 800,
    };
    let (cmd, trapped) = stubborn(&dir, "expire1");
    h.spawn("expire1", &strs(&cmd), deadlines).await;
    h.expect(S::Loading).await;
    h.expect(S::Starting).await;
    h.expect(S::Waiting).await;
    eventually(LIMIT, || trapped.exists()).await;
    let e = h.expect(S::Terminating).await;
    assert!(now_ms() >= deadlines.soft_terminate_at);
    assert_eq!(
        (e.termination_kind, e.termination_reason),
        (Some(TerminationKind::Soft), Some(TerminationReason::KeyExpired))
    );
    // The process ignores SIGTERM and the grace period is long: the hard deadline kills it.
    let e = h.expect(S::HardTerminating).await;
    assert!(now_ms() >= deadlines.hard_terminate_at);
    assert_eq!(
        (e.termination_kind, e.termination_reason),
        (Some(TerminationKind::Hard), Some(TerminationReason::KeyExpired))
    );
    h.expect(S::Terminated).await;
    h.drone.shutdown().await;
}

#[tokio::test]
async fn restart_readopts_ready_backends_and_reports_the_rest_lost() {
    let dir = TempDir::new("life-restart");
    let store = open_store(&dir).await;
    let mut first = Harness::new(&dir, &store, timings());
    first.spawn("keep1", &http_backend(), far_deadlines()).await;
    let ready = first.until_ready().await;
    let (half_cmd, _) = stubborn(&dir, "half1");
    first.spawn("half1", &strs(&half_cmd), far_deadlines()).await;
    first.expect(S::Loading).await;
    first.expect(S::Starting).await;
    first.expect(S::Waiting).await;
    let (gone_cmd, _) = stubborn(&dir, "gone1");
    first.spawn("gone1", &strs(&gone_cmd), far_deadlines()).await;
    first.expect(S::Loading).await;
    first.expect(S::Starting).await;
    first.expect(S::Waiting).await;
    first.drone.shutdown().await;

    // "gone1" was ready when the drone stopped, then died.
    let gone_id: BackendName = "gone1".parse().unwrap();
    let gone = store.backend(&gone_id).await.unwrap().unwrap();
    store
        .record_event(&gone_id, &StatusUpdate::new(S::Ready))
        .await
        .unwrap();
    let gone_pid = pid_of(gone.handle.as_ref().unwrap());
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(gone_pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    eventually(LIMIT, || {
        crate::runtime::process::read_proc_stat(gone_pid).map_or(true, |s| s.state == 'Z')
    })
    .await;
    let half = store.backend(&"half1".parse().unwrap()).await.unwrap().unwrap();
    let half_pid = pid_of(half.handle.as_ref().unwrap());

    let address = ready.address.unwrap();
    assert!(probe_http(address).await, "backends survive the drone");

    let mut second = Harness::new(&dir, &store, timings());
    assert_eq!(second.drone.recover().await.unwrap(), 3);
    let mut lost = HashMap::new();
    for _ in 0..2 {
        let e = second.expect(S::Terminated).await;
        assert_eq!(e.termination_reason, Some(TerminationReason::Lost));
        lost.insert(e.backend_id.to_string(), e);
    }
    assert_eq!(
        lost["half1"].termination_kind,
        Some(TerminationKind::Hard),
        "a half-started backend is killed"
    );
    assert_eq!(lost["gone1"].termination_kind, None);
    assert!(crate::runtime::process::read_proc_stat(half_pid).map_or(true, |s| s.state == 'Z'));

    // keep1 is adopted: still reachable, no new events; it can be terminated as usual.
    assert!(probe_http(address).await);
    second
        .terminate("keep1", TerminationKind::Soft, TerminationReason::External)
        .await;
    let e = second.expect(S::Terminating).await;
    assert_eq!(e.backend_id.as_str(), "keep1");
    let e = second.expect(S::Terminated).await;
    assert_eq!((e.backend_id.as_str(), e.exit_code), ("keep1", None));
    assert!(store.live_backends().await.unwrap().is_empty());
    second.drone.shutdown().await;
}

/// Plays the controller's side of the drone socket, scripted by each test.
struct ScriptedController {
    listener: TcpListener,
}

struct ControllerSide {
    ws: WebSocketStream<TcpStream>,
}

impl ScriptedController {
    async fn bind() -> ScriptedController {
        ScriptedController {
            listener: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.listener.local_addr().unwrap())
    }

    // The handshake callback's error type is tungstenite's, not ours.
    #[allow(clippy::result_large_err)]
    async fn accept(&self) -> ControllerSide {
        let (tcp, _) = tokio::time::timeout(LIMIT, self.listener.accept())
            .await
            .expect("a drone connects")
            .unwrap();
        let ws = tokio_tungstenite::accept_hdr_async(
            tcp,
            |req: &tokio_tungstenite::tungstenite::handshake::server::Request,
             resp: tokio_tungstenite::tungstenite::handshake::server::Response| {
                assert_eq!(req.uri().path(), "/ctrl/drone-socket");
                Ok(resp)
            },
        )
        .await
        .unwrap();
        ControllerSide { ws }
    }
}

impl ControllerSide {
    async fn recv(&mut self) -> DroneToController {
        loop {
            let frame = tokio::time::timeout(LIMIT, self.ws.next())
                .await
                .expect("a message")
                .expect("open")
                .unwrap();
            if let Message::Text(text) = frame {
                return serde_json::from_str(text.as_str()).unwrap();
            }
        }
    }

    /// The next event, skipping heartbeats and renewals.
    async fn event(&mut self) -> BackendEvent {
        loop {
            match self.recv().await {
                DroneToController::Event(e) => return e,
                DroneToController::Heartbeat { .. }
                | DroneToController::RenewKey { .. }
                | DroneToController::LoadProgress { .. }
                | DroneToController::Metrics { .. } => {}
                DroneToController::Hello(h) => panic!("unexpected Hello {h:?}"),
            }
        }
    }

    /// The next event that is not a re-send of one already seen.
    async fn new_event(&mut self, seen: &mut Vec<u64>) -> BackendEvent {
        loop {
            let e = self.event().await;
            if !seen.contains(&e.event_id) {
                seen.push(e.event_id);
                return e;
            }
        }
    }

    async fn send(&mut self, message: &ControllerToDrone) {
        self.ws
            .send(Message::Text(serde_json::to_string(message).unwrap().into()))
            .await
            .unwrap();
    }

    async fn ack(&mut self, e: &BackendEvent) {
        self.send(&ControllerToDrone::Ack { event_id: e.event_id }).await;
    }

    async fn hello(&mut self) -> DroneHello {
        match self.recv().await {
            DroneToController::Hello(h) => h,
            other => panic!("expected Hello, got {other:?}"),
        }
    }

    async fn handshake(&mut self) -> DroneHello {
        let hello = self.hello().await;
        let controller = "co-test".parse().unwrap();
        self.send(&ControllerToDrone::Welcome {
            protocol_version: PROTOCOL_VERSION,
            controller,
        })
        .await;
        hello
    }
}

fn drone_config(controller: &ScriptedController, dir: &TempDir) -> DroneConfig {
    DroneConfig {
        controller_url: controller.url(),
        name: None,
        cluster: "localhost:9090".parse().unwrap(),
        pool: "p1".into(),
        db_path: dir.path().join("db/drone.db"),
        process: process_config(dir),
        docker: None,
        timings: timings(),
        event_journal: None,
        ctrl_token: None,
    }
}

#[tokio::test]
async fn a_drone_with_live_backends_refuses_to_be_renamed() {
    let dir = TempDir::new("rename");
    let controller = ScriptedController::bind().await;
    let mut config = drone_config(&controller, &dir);
    config.name = Some("dr-first".parse().unwrap());
    {
        let store = StateStore::open(&config.db_path).await.unwrap();
        store.set_drone_name(&"dr-first".parse().unwrap()).await.unwrap();
        let spawn = spawn_action("still-running", &["sleep", "100"], far_deadlines());
        assert!(store.insert_backend(&spawn).await.unwrap());
        store.close().await;
    }
    config.name = Some("dr-second".parse().unwrap());
    let err = crate::run(config, CancellationToken::new()).await.unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains("belongs to drone dr-first") && text.contains("would orphan"),
        "{text}"
    );
}

#[tokio::test]
async fn run_speaks_the_protocol_and_resends_unacked_events() {
    let dir = TempDir::new("run-protocol");
    let controller = ScriptedController::bind().await;
    let shutdown = CancellationToken::new();
    let drone = tokio::spawn(crate::run(drone_config(&controller, &dir), shutdown.clone()));

    let mut conn = controller.accept().await;
    // Garbage before the answer to Hello is tolerated too.
    let hello = conn.hello().await;
    assert_eq!(hello.protocol_version, PROTOCOL_VERSION);
    assert_eq!(hello.cluster.as_str(), "localhost:9090");
    assert_eq!(hello.pool, "p1");
    assert_eq!(hello.runtimes, [RuntimeKind::Process]);
    assert_eq!(hello.plane_version, plane_types::PLANE_VERSION);
    assert!(hello.local_time.abs_diff(now_ms()) < 60_000);
    conn.ws.send(Message::Text("not json".into())).await.unwrap();
    conn.send(&ControllerToDrone::Welcome {
        protocol_version: PROTOCOL_VERSION,
        controller: "co-a".parse().unwrap(),
    })
    .await;
    conn.ws.send(Message::Text(r#"{"Nope": 1}"#.into())).await.unwrap();
    conn.ws.send(Message::Binary(vec![1u8, 2, 3].into())).await.unwrap();

    // Heartbeats flow.
    loop {
        if let DroneToController::Heartbeat { local_time } = conn.recv().await {
            assert!(local_time.abs_diff(now_ms()) < 60_000);
            break;
        }
    }

    conn.send(&ControllerToDrone::Spawn(Box::new(spawn_action(
        "run1",
        &http_backend(),
        far_deadlines(),
    ))))
    .await;
    let mut seen = Vec::new();
    let mut events = Vec::new();
    for _ in 0..4 {
        events.push(conn.new_event(&mut seen).await);
    }
    let statuses: Vec<S> = events.iter().map(|e| e.status).collect();
    assert_eq!(statuses, [S::Loading, S::Starting, S::Waiting, S::Ready]);
    assert!(events.windows(2).all(|w| w[0].event_id < w[1].event_id));
    // Ack only the last two, then drop the connection.
    conn.ack(&events[2]).await;
    conn.ack(&events[3]).await;
    let store = StateStore::open(&dir.path().join("db/drone.db")).await.unwrap();
    let acked = [events[2].event_id, events[3].event_id];
    tokio::time::timeout(LIMIT, async {
        while store
            .unacked_events()
            .await
            .unwrap()
            .iter()
            .any(|e| acked.contains(&e.event_id))
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("acks are applied");
    store.close().await;
    // Unacked events are re-sent on a live connection too (after a heartbeat interval).
    loop {
        let e = conn.event().await;
        if e.event_id == events[0].event_id {
            break;
        }
    }
    drop(conn);

    let mut conn = controller.accept().await;
    let again = conn.handshake().await;
    assert_eq!(again.name, hello.name);
    let first = conn.event().await;
    let second = conn.event().await;
    assert_eq!(
        (first.clone(), second.clone()),
        (events[0].clone(), events[1].clone()),
        "unacked events, in order"
    );
    conn.ack(&first).await;
    conn.ack(&second).await;

    conn.send(&ControllerToDrone::Terminate {
        backend_id: "run1".parse().unwrap(),
        kind: TerminationKind::Hard,
        reason: TerminationReason::External,
    })
    .await;
    let mut seen = vec![first.event_id, second.event_id];
    let e = conn.new_event(&mut seen).await;
    assert_eq!(e.status, S::HardTerminating);
    conn.ack(&e).await;
    let e = conn.new_event(&mut seen).await;
    assert_eq!(e.status, S::Terminated);
    conn.ack(&e).await;

    // Everything acked leaves the outbox.
    let store = StateStore::open(&dir.path().join("db/drone.db")).await.unwrap();
    tokio::time::timeout(LIMIT, async {
        while !store.unacked_events().await.unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the outbox empties");
    assert_eq!(store.drone_name().await.unwrap(), Some(hello.name));
    store.close().await;
    shutdown.cancel();
    tokio::time::timeout(LIMIT, drone).await.unwrap().unwrap().unwrap();
}

#[tokio::test]
async fn run_again_readopts_running_backends_and_resends() {
    let dir = TempDir::new("run-restart");
    let controller = ScriptedController::bind().await;
    let shutdown = CancellationToken::new();
    let drone = tokio::spawn(crate::run(drone_config(&controller, &dir), shutdown.clone()));
    let mut conn = controller.accept().await;
    let hello = conn.handshake().await;
    conn.send(&ControllerToDrone::Spawn(Box::new(spawn_action(
        "again1",
        &http_backend(),
        far_deadlines(),
    ))))
    .await;
    let mut seen = Vec::new();
    let mut events = Vec::new();
    while events.last().map(|e: &BackendEvent| e.status) != Some(S::Ready) {
        events.push(conn.new_event(&mut seen).await);
    }
    conn.ack(&events[0]).await;
    let address = events[3].address.unwrap();
    shutdown.cancel();
    tokio::time::timeout(LIMIT, drone).await.unwrap().unwrap().unwrap();
    assert!(probe_http(address).await, "the backend outlives the drone");

    let shutdown = CancellationToken::new();
    let drone = tokio::spawn(crate::run(drone_config(&controller, &dir), shutdown.clone()));
    let mut conn = controller.accept().await;
    assert_eq!(conn.handshake().await.name, hello.name, "the drone keeps its name");
    // The loading event may have been acked in time or not; the rest is re-sent in order.
    let mut resent = Vec::new();
    while resent.last().map(|e: &BackendEvent| e.status) != Some(S::Ready) {
        let e = conn.event().await;
        conn.ack(&e).await;
        if !resent.contains(&e) {
            resent.push(e);
        }
    }
    let tail = &events[events.len() - resent.len()..];
    assert_eq!(resent, tail);
    assert!(resent.len() >= 3);
    // Adopted: no new status; it answers; it terminates normally.
    assert!(probe_http(address).await);
    conn.send(&ControllerToDrone::Terminate {
        backend_id: "again1".parse().unwrap(),
        kind: TerminationKind::Soft,
        reason: TerminationReason::Swept,
    })
    .await;
    let mut seen: Vec<u64> = events.iter().map(|e| e.event_id).collect();
    let e = conn.new_event(&mut seen).await;
    assert_eq!(
        (e.status, e.termination_reason),
        (S::Terminating, Some(TerminationReason::Swept))
    );
    let e = conn.new_event(&mut seen).await;
    assert_eq!(e.status, S::Terminated);
    shutdown.cancel();
    tokio::time::timeout(LIMIT, drone).await.unwrap().unwrap().unwrap();
}

#[tokio::test]
async fn run_fails_on_reject_and_retries_lost_connections() {
    let dir = TempDir::new("run-reject");
    let controller = ScriptedController::bind().await;
    let shutdown = CancellationToken::new();
    let drone = tokio::spawn(crate::run(drone_config(&controller, &dir), shutdown.clone()));
    // Connections that die before or after the handshake are retried.
    for _ in 0..3 {
        drop(controller.accept().await);
    }
    let mut conn = controller.accept().await;
    conn.handshake().await;
    drop(conn);
    let mut conn = controller.accept().await;
    conn.hello().await;
    conn.send(&ControllerToDrone::Reject {
        message: "protocol version 1 is not supported".into(),
    })
    .await;
    let result = tokio::time::timeout(LIMIT, drone).await.unwrap().unwrap();
    let err = result.unwrap_err().to_string();
    assert!(err.contains("protocol version 1 is not supported"), "{err}");
    assert!(!shutdown.is_cancelled());

    // An unreachable controller: retried until shutdown, which returns promptly.
    let unreachable = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut config = drone_config(&controller, &dir);
    config.controller_url = format!("http://{unreachable}");
    let shutdown = CancellationToken::new();
    let drone = tokio::spawn(crate::run(config, shutdown.clone()));
    shutdown.cancel();
    tokio::time::timeout(LIMIT, drone).await.unwrap().unwrap().unwrap();

    // Setup errors fail fast.
    let mut config = drone_config(&controller, &dir);
    config.controller_url = "nonsense".into();
    assert!(crate::run(config, CancellationToken::new()).await.is_err());
    let mut config = drone_config(&controller, &dir);
    config.db_path = dir.path().join("db/drone.db/not-a-dir/x.db");
    assert!(crate::run(config, CancellationToken::new()).await.is_err());
}

#[test]
fn every_source_file_says_what_it_is_for() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut stack = vec![src];
    let mut count = 0;
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                assert!(
                    text.starts_with("//!"),
                    "{} must start with a //! comment",
                    path.display()
                );
                count += 1;
            }
        }
    }
    assert!(count >= 9);
}

#[tokio::test]
async fn wss_urls_use_tls_and_are_retried() {
    let dir = TempDir::new("run-tls");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut config = drone_config(&ScriptedController::bind().await, &dir);
    config.controller_url = format!("https://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let drone = tokio::spawn(crate::run(config, shutdown.clone()));
    for _ in 0..2 {
        let (mut tcp, _) = tokio::time::timeout(LIMIT, listener.accept()).await.unwrap().unwrap();
        // A TLS handshake starts with a ClientHello record (content type 22).
        let mut first = [0u8; 1];
        tokio::io::AsyncReadExt::read_exact(&mut tcp, &mut first).await.unwrap();
        assert_eq!(first[0], 22);
    }
    shutdown.cancel();
    tokio::time::timeout(LIMIT, drone).await.unwrap().unwrap().unwrap();
}
