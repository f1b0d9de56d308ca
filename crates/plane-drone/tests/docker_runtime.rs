//! The Docker runtime against the real engine, through the [`Runtime`] trait, with the
//! demo backend's image (`plane-test-image`, built locally), and pulls of it from the
//! fake registry of `plane_test_image::registry`.
//!
//! These tests need a running Docker engine and fail (they do not skip) without one.
//! Each test uses its own drone name, so the containers it creates carry their own
//! `dev.plane.drone` label; a guard removes them all when the test ends, pass or fail.
//! Nothing waits with a bare sleep: results are awaited with deadlines.

use bollard::Docker;
use plane_drone::runtime::{Adoption, BackendSpec, ExitInfo, LoadProgress, Runtime, RuntimeHandle, StopSignal};
use plane_drone::{
    docker_reachable, DockerAddressMode, DockerHandle, DockerRuntime, DockerRuntimeConfig, StateStore, LABEL_BACKEND,
    LABEL_DRONE, LABEL_MANAGED,
};
use plane_test_image::registry::TestRegistry;
use plane_test_image::{docker as docker_cli, RemoveContainers, RemoveImage};
use plane_types::executable::Executable;
use plane_types::names::{BackendName, DroneName};
use std::collections::HashSet;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The longest any single step may take.
const LIMIT: Duration = Duration::from_secs(30);

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

fn engine() -> Docker {
    Docker::connect_with_defaults().expect("a Docker client")
}

/// What every test needs: the image, its own drone name, a directory, the guard.
struct Fixture {
    image: String,
    drone: DroneName,
    dir: tempfile::TempDir,
    _guard: RemoveContainers,
}

impl Fixture {
    async fn new() -> Fixture {
        init_logs();
        let image = plane_test_image::test_image().await;
        let drone = DroneName::new_random();
        Fixture {
            image,
            _guard: RemoveContainers(drone.to_string()),
            drone,
            dir: tempfile::tempdir().expect("a temporary directory"),
        }
    }

    fn mount_base(&self) -> PathBuf {
        self.dir.path().join("mounts")
    }

    fn config(&self) -> DockerRuntimeConfig {
        DockerRuntimeConfig {
            mount_base: Some(self.mount_base()),
            pids_limit: 256,
            ..Default::default()
        }
    }

    async fn runtime(&self) -> DockerRuntime {
        self.runtime_with(self.config()).await
    }

    async fn runtime_with(&self, config: DockerRuntimeConfig) -> DockerRuntime {
        DockerRuntime::connect(config, self.drone.clone(), None, CancellationToken::new())
            .await
            .expect("connecting to the Docker engine")
    }

    /// A spec for the demo image; `extra` is merged into the executable's JSON.
    fn spec(&self, extra: serde_json::Value) -> BackendSpec {
        let mut exe = serde_json::json!({"image": self.image, "pull_policy": "Never"});
        if let (Some(exe), Some(extra)) = (exe.as_object_mut(), extra.as_object()) {
            exe.extend(extra.clone());
        }
        spec_of(exe)
    }
}

fn spec_of(exe: serde_json::Value) -> BackendSpec {
    let backend_id: BackendName = format!("dt-{:08x}", rand::random::<u32>()).parse().unwrap();
    BackendSpec {
        key_name: format!("room-{backend_id}"),
        backend_id,
        executable: Executable::from_json(&exe).expect("a valid executable"),
        fencing_token: 9,
        static_token: None,
    }
}

fn no_progress(_: LoadProgress) {}

fn handle_of(handle: &RuntimeHandle) -> &DockerHandle {
    match handle {
        RuntimeHandle::Docker(d) => d,
        other => panic!("not a Docker handle: {other:?}"),
    }
}

/// Prepares, starts and waits until the backend answers HTTP.
async fn run_ready(rt: &DockerRuntime, spec: &BackendSpec) -> (SocketAddr, RuntimeHandle) {
    rt.prepare(spec, &no_progress).await.expect("prepare");
    let started = rt.start(spec).await.expect("start");
    tokio::time::timeout(LIMIT, rt.wait_ready(&started.handle, started.address))
        .await
        .expect("the backend answers HTTP in time")
        .expect("wait_ready");
    (started.address, started.handle)
}

async fn exit_of(rt: &DockerRuntime, handle: &RuntimeHandle) -> ExitInfo {
    tokio::time::timeout(LIMIT, rt.wait_exit(handle))
        .await
        .expect("the backend exits in time")
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(LIMIT).build().unwrap()
}

async fn get_json(address: SocketAddr, path: &str) -> serde_json::Value {
    let response = client()
        .get(format!("http://{address}{path}"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    assert!(response.status().is_success(), "GET {path}: {}", response.status());
    response.json().await.unwrap()
}

async fn post(address: SocketAddr, path: &str, body: &str) -> (u16, String) {
    let response = client()
        .post(format!("http://{address}{path}"))
        .body(body.to_owned())
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {path}: {e}"));
    (response.status().as_u16(), response.text().await.unwrap_or_default())
}

/// Asks the demo backend to exit with `code` (it does not answer).
async fn ask_exit(address: SocketAddr, code: i32) {
    let _ = client()
        .post(format!("http://{address}/debug/exit?code={code}"))
        .send()
        .await;
}

/// Polls `check` until it holds; panics after `limit`.
async fn eventually<F: Future<Output = bool>>(what: &str, limit: Duration, mut check: impl FnMut() -> F) {
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The engine's view of a container: (running, exit code); `None` if it is gone.
async fn engine_state(id: &str) -> Option<(bool, i64)> {
    let c = engine().inspect_container(id, None).await.ok()?;
    let state = c.state?;
    Some((state.running.unwrap_or(false), state.exit_code.unwrap_or(-1)))
}

async fn wait_stopped(id: &str) {
    eventually("the container stops", LIMIT, || async {
        engine_state(id).await.is_none_or(|s| !s.0)
    })
    .await;
}

#[tokio::test]
async fn full_cycle_with_labels_env_and_graceful_stop() {
    let fx = Fixture::new().await;
    let rt = fx.runtime().await;
    let spec = fx.spec(serde_json::json!({"env": {"PORT": "1234", "DEMO_EXTRA": "x"}}));
    let reports = Arc::new(Mutex::new(Vec::new()));
    let sink = reports.clone();
    rt.prepare(&spec, &move |p| sink.lock().unwrap().push(p)).await.unwrap();
    assert!(reports.lock().unwrap().is_empty(), "a present image needs no pull");

    let started = rt.start(&spec).await.unwrap();
    assert_eq!(started.address.ip().to_string(), "127.0.0.1");
    let handle = handle_of(&started.handle).clone();
    assert_eq!(handle.name, format!("plane-{}", spec.backend_id));
    // The handle is persisted as JSON by the drone.
    let json = serde_json::to_string(&started.handle).unwrap();
    assert!(json.contains("\"runtime\":\"docker\""), "{json}");
    assert_eq!(serde_json::from_str::<RuntimeHandle>(&json).unwrap(), started.handle);

    let inspect = engine().inspect_container(&handle.container_id, None).await.unwrap();
    assert_eq!(inspect.name.as_deref(), Some(format!("/{}", handle.name).as_str()));
    let labels = inspect.config.as_ref().unwrap().labels.clone().unwrap();
    assert_eq!(labels[LABEL_BACKEND], spec.backend_id.to_string());
    assert_eq!(labels[LABEL_DRONE], fx.drone.to_string());
    assert_eq!(labels[LABEL_MANAGED], "true");
    let host = inspect.host_config.unwrap();
    assert_eq!(host.security_opt, Some(vec!["no-new-privileges".to_owned()]));
    assert_eq!(host.pids_limit, Some(256));

    tokio::time::timeout(LIMIT, rt.wait_ready(&started.handle, started.address))
        .await
        .expect("ready in time")
        .unwrap();
    let env = get_json(started.address, "/env").await;
    assert_eq!(env["PORT"], "8080", "Plane's PORT wins over the executable's: {env}");
    assert_eq!(env["SESSION_BACKEND_ID"], spec.backend_id.to_string());
    assert_eq!(env["SESSION_BACKEND_KEY"], spec.key_name);
    assert_eq!(env["SESSION_BACKEND_FENCING_TOKEN"], "9");

    rt.signal(&started.handle, StopSignal::Term).await.unwrap();
    let exit = exit_of(&rt, &started.handle).await;
    assert_eq!(exit.exit_code, Some(0), "{exit:?}");
    assert_eq!(exit.detail.as_deref(), Some("exited with code 0"));
    // Signalling a stopped container is harmless; so is a gone one.
    rt.signal(&started.handle, StopSignal::Kill).await.unwrap();
    docker_cli(&["rm", "-f", &handle.container_id]);
    rt.signal(&started.handle, StopSignal::Kill).await.unwrap();
}

#[tokio::test]
async fn missing_images() {
    let fx = Fixture::new().await;
    let rt = fx.runtime().await;

    let spec = spec_of(serde_json::json!({"image": "plane-absent-image:nope", "pull_policy": "Never"}));
    let err = rt.prepare(&spec, &no_progress).await.unwrap_err().to_string();
    assert_eq!(
        err,
        "image plane-absent-image:nope is not present on this drone and pull_policy is Never"
    );

    // No registry answers: the engine's own message comes through.
    let spec = spec_of(serde_json::json!({"image": "127.0.0.1:9/plane-absent:v1"}));
    let reports = Arc::new(Mutex::new(Vec::new()));
    let sink = reports.clone();
    let begun = Instant::now();
    let err = rt
        .prepare(&spec, &move |p| sink.lock().unwrap().push(p.message))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("pulling image 127.0.0.1:9/plane-absent:v1 failed: "),
        "{err}"
    );
    assert!(
        err.contains("127.0.0.1:9") && err.contains("connection refused"),
        "{err}"
    );
    assert!(begun.elapsed() < LIMIT);
    assert_eq!(
        reports.lock().unwrap().first().map(String::as_str),
        Some("pulling 127.0.0.1:9/plane-absent:v1")
    );

    // `Always` pulls even a present image: here that fails, as there is no registry.
    let spec = spec_of(serde_json::json!({"image": fx.image, "pull_policy": "Always"}));
    let err = rt.prepare(&spec, &no_progress).await.unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("pulling image {} failed: ", fx.image)),
        "{err}"
    );

    // Not a reference at all.
    let spec = spec_of(serde_json::json!({"image": "../../containers/x"}));
    let err = rt.prepare(&spec, &no_progress).await.unwrap_err().to_string();
    assert!(err.contains("not a valid image reference"), "{err}");
}

#[tokio::test]
async fn mounts_env_and_sigterm_record() {
    let fx = Fixture::new().await;
    let rt = fx.runtime().await;
    let spec = fx.spec(serde_json::json!({
        "mount": true,
        "env": {"DEMO_SIGTERM_FILE": "/plane-data/sigterm.log"},
    }));
    let (address, handle) = run_ready(&rt, &spec).await;
    let (status, body) = post(address, "/debug/file?path=/plane-data/hello.txt", "hi from the backend").await;
    assert_eq!(status, 200, "{body}");
    let dir = fx.mount_base().join(&spec.key_name);
    assert_eq!(
        std::fs::read_to_string(dir.join("hello.txt")).unwrap(),
        "hi from the backend"
    );
    rt.signal(&handle, StopSignal::Term).await.unwrap();
    assert_eq!(exit_of(&rt, &handle).await.exit_code, Some(0));
    let log = std::fs::read_to_string(dir.join("sigterm.log")).unwrap();
    assert!(log.starts_with("SIGTERM "), "{log:?}");

    // A relative path under the base.
    let spec = fx.spec(serde_json::json!({"mount": "data/nested"}));
    let (address, handle) = run_ready(&rt, &spec).await;
    let (status, _) = post(address, "/debug/file?path=/plane-data/f", "x").await;
    assert_eq!(status, 200);
    assert!(fx.mount_base().join("data/nested/f").is_file());
    rt.signal(&handle, StopSignal::Kill).await.unwrap();
    exit_of(&rt, &handle).await;

    // A symlink out of the base is refused, and nothing is created outside it.
    let outside = fx.dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, fx.mount_base().join("escape")).unwrap();
    let spec = fx.spec(serde_json::json!({"mount": "escape/x"}));
    let err = rt.prepare(&spec, &no_progress).await.unwrap_err().to_string();
    assert!(err.contains("outside the mount base"), "{err}");
    assert!(!outside.join("x").exists());

    // Without a mount base, a mount is refused.
    let rt = fx
        .runtime_with(DockerRuntimeConfig {
            mount_base: None,
            ..fx.config()
        })
        .await;
    let err = rt
        .prepare(&fx.spec(serde_json::json!({"mount": true})), &no_progress)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("no mount base configured"), "{err}");
}

#[tokio::test]
async fn resource_limits_and_hardening_are_applied() {
    let fx = Fixture::new().await;
    let rt = fx
        .runtime_with(DockerRuntimeConfig {
            pids_limit: 64,
            read_only_rootfs: true,
            ..fx.config()
        })
        .await;
    let spec = fx.spec(serde_json::json!({"resource_limits": {
        "cpu_period_percent": 50, "cpu_time_limit": 30, "memory_limit_bytes": 67108864,
    }}));
    let (address, handle) = run_ready(&rt, &spec).await;
    let limits = get_json(address, "/debug/limits").await;
    assert_eq!(limits["memory_limit_bytes"], 67108864, "{limits}");
    assert_eq!(limits["cpu_quota_micros"], 50000, "{limits}");
    assert_eq!(limits["cpu_period_micros"], 100000, "{limits}");
    assert_eq!(limits["rlimit_cpu_soft"], 30, "{limits}");
    assert_eq!(limits["rlimit_cpu_hard"], 30, "{limits}");
    assert_eq!(limits["pids_limit"], 64, "{limits}");
    assert_eq!(limits["no_new_privs"], true, "{limits}");
    // A read-only root, with a writable /tmp.
    let (status, body) = post(address, "/debug/file?path=/etc/plane-test", "x").await;
    assert_eq!(status, 500, "{body}");
    assert!(body.to_lowercase().contains("read-only"), "{body}");
    let (status, body) = post(address, "/debug/file?path=/tmp/plane-test", "x").await;
    assert_eq!(status, 200, "{body}");

    // The metrics of the same backend: one-shot, so quick.
    let begun = Instant::now();
    let first = rt.metrics(&handle).await.expect("a first sample");
    assert!(begun.elapsed() < Duration::from_secs(1), "took {:?}", begun.elapsed());
    assert!(first.memory_bytes > 0 && first.memory_bytes < 64 << 20, "{first:?}");
    assert_eq!(first.memory_limit_bytes, Some(67108864));
    assert!(first.cpu_total_nanos > 0, "{first:?}");
    assert_eq!(first.cpu_percent, None);
    let second = rt.metrics(&handle).await.expect("a second sample");
    assert!(second.cpu_total_nanos >= first.cpu_total_nanos);
    let pct = second.cpu_percent.expect("cpu_percent from the previous sample");
    assert!((0.0..=100.0).contains(&pct), "{pct}");
    rt.signal(&handle, StopSignal::Kill).await.unwrap();
    exit_of(&rt, &handle).await;
    assert_eq!(rt.metrics(&handle).await, None, "no sample of a stopped backend");

    // This engine's storage driver has no quotas: the refusal is explained.
    let spec = fx.spec(serde_json::json!({"resource_limits": {"disk_limit_bytes": 1000000000}}));
    let err = rt.start(&spec).await.unwrap_err().to_string();
    assert!(
        err.contains(&format!("creating container plane-{} failed", spec.backend_id)),
        "{err}"
    );
    assert!(err.contains("disk_limit_bytes needs a storage driver"), "{err}");
}

#[tokio::test]
async fn sigterm_ignored_until_sigkill() {
    let fx = Fixture::new().await;
    let rt = fx.runtime().await;
    let spec = fx.spec(serde_json::json!({"env": {"DEMO_IGNORE_SIGTERM": "1"}}));
    let (address, handle) = run_ready(&rt, &spec).await;
    rt.signal(&handle, StopSignal::Term).await.unwrap();
    eventually("the backend records the SIGTERM", LIMIT, || async {
        get_json(address, "/debug/signals")
            .await
            .as_array()
            .is_some_and(|signals| signals.iter().any(|s| s["signal"] == "SIGTERM" && s["ignored"] == true))
    })
    .await;
    let still_running = tokio::time::timeout(Duration::from_millis(300), rt.wait_exit(&handle)).await;
    assert!(still_running.is_err(), "the backend ignores SIGTERM");
    rt.signal(&handle, StopSignal::Kill).await.unwrap();
    let exit = exit_of(&rt, &handle).await;
    assert_eq!(exit.exit_code, Some(137));
    assert_eq!(exit.detail.as_deref(), Some("killed by SIGKILL (137)"));
}

#[tokio::test]
async fn exits_caused_outside_the_runtime() {
    let fx = Fixture::new().await;
    let rt = fx.runtime().await;
    let (_, killed) = run_ready(&rt, &fx.spec(serde_json::json!({}))).await;
    let (address, exiting) = run_ready(&rt, &fx.spec(serde_json::json!({}))).await;
    let out = docker_cli(&["kill", "-s", "KILL", &handle_of(&killed).container_id]);
    assert!(out.status.success(), "{out:?}");
    ask_exit(address, 3).await;
    let exit = exit_of(&rt, &killed).await;
    assert_eq!(
        (exit.exit_code, exit.detail.as_deref()),
        (Some(137), Some("killed by SIGKILL (137)"))
    );
    let exit = exit_of(&rt, &exiting).await;
    assert_eq!(
        (exit.exit_code, exit.detail.as_deref()),
        (Some(3), Some("exited with code 3"))
    );
}

#[tokio::test]
async fn exits_missed_by_the_events_stream_are_reconciled() {
    let fx = Fixture::new().await;
    let rt = fx.runtime().await;
    let (_, killed) = run_ready(&rt, &fx.spec(serde_json::json!({}))).await;
    let (address, exiting) = run_ready(&rt, &fx.spec(serde_json::json!({}))).await;
    let (_, removed) = run_ready(&rt, &fx.spec(serde_json::json!({}))).await;
    let subscriptions = rt.debug_event_subscriptions();

    // While the stream is closed: one killed, one exits by itself, one removed.
    rt.debug_pause_events();
    docker_cli(&["kill", "-s", "KILL", &handle_of(&killed).container_id]);
    ask_exit(address, 3).await;
    docker_cli(&["rm", "-f", &handle_of(&removed).container_id]);
    wait_stopped(&handle_of(&killed).container_id).await;
    wait_stopped(&handle_of(&exiting).container_id).await;
    let early = tokio::time::timeout(Duration::from_millis(200), rt.wait_exit(&killed)).await;
    assert!(early.is_err(), "no exit is seen while the stream is closed");

    // Reopened without the engine's replay: only the reconciliation can find them.
    rt.debug_resume_events(false);
    let exit = exit_of(&rt, &killed).await;
    assert_eq!(
        (exit.exit_code, exit.detail.as_deref()),
        (Some(137), Some("killed by SIGKILL (137)"))
    );
    let exit = exit_of(&rt, &exiting).await;
    assert_eq!(
        (exit.exit_code, exit.detail.as_deref()),
        (Some(3), Some("exited with code 3"))
    );
    let exit = exit_of(&rt, &removed).await;
    assert_eq!(exit.exit_code, None);
    assert!(exit.detail.unwrap().contains("disappeared"));
    assert!(rt.debug_event_subscriptions() > subscriptions);

    // Reopened with the replay (the normal case): still seen, and the stream works after.
    let (address, replayed) = run_ready(&rt, &fx.spec(serde_json::json!({}))).await;
    rt.debug_pause_events();
    ask_exit(address, 4).await;
    wait_stopped(&handle_of(&replayed).container_id).await;
    rt.debug_resume_events(true);
    assert_eq!(exit_of(&rt, &replayed).await.exit_code, Some(4));
    let (address, after) = run_ready(&rt, &fx.spec(serde_json::json!({}))).await;
    ask_exit(address, 5).await;
    assert_eq!(exit_of(&rt, &after).await.exit_code, Some(5));
}

#[tokio::test]
async fn a_new_runtime_adopts_running_containers() {
    let fx = Fixture::new().await;
    let first = fx.runtime().await;
    let spec = fx.spec(serde_json::json!({}));
    let (address, handle) = run_ready(&first, &spec).await;
    drop(first);
    // Dropping the runtime leaves the container running.
    assert_eq!(engine_state(&handle_of(&handle).container_id).await, Some((true, 0)));
    get_json(address, "/env").await;

    let second = fx.runtime().await;
    let other: BackendName = "dt-someone-else".parse().unwrap();
    assert_eq!(second.adopt(&other, &handle).await.unwrap(), Adoption::Gone);
    // Another drone's runtime does not adopt it either.
    let stranger = DockerRuntime::connect(fx.config(), DroneName::new_random(), None, CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(stranger.adopt(&spec.backend_id, &handle).await.unwrap(), Adoption::Gone);
    let missing = RuntimeHandle::Docker(DockerHandle {
        container_id: "0123456789ab0123456789ab".into(),
        name: "plane-nothing".into(),
    });
    assert_eq!(second.adopt(&spec.backend_id, &missing).await.unwrap(), Adoption::Gone);

    assert_eq!(
        second.adopt(&spec.backend_id, &handle).await.unwrap(),
        Adoption::Running
    );
    assert!(second.metrics(&handle).await.is_some());
    // Its exit reaches the new runtime through the events stream.
    ask_exit(address, 7).await;
    assert_eq!(exit_of(&second, &handle).await.exit_code, Some(7));
    assert_eq!(second.adopt(&spec.backend_id, &handle).await.unwrap(), Adoption::Gone);
}

#[tokio::test]
async fn reconcile_stops_containers_the_store_does_not_know() {
    let fx = Fixture::new().await;
    let rt = fx.runtime().await;
    let known_spec = fx.spec(serde_json::json!({}));
    let (_, known) = run_ready(&rt, &known_spec).await;
    let (_, unknown) = run_ready(&rt, &fx.spec(serde_json::json!({}))).await;
    rt.reconcile(&HashSet::from([known_spec.backend_id.clone()]))
        .await
        .unwrap();
    let exit = exit_of(&rt, &unknown).await;
    assert_eq!(exit.exit_code, Some(137));
    assert_eq!(
        engine_state(&handle_of(&known).container_id).await.map(|s| s.0),
        Some(true),
        "a known backend keeps running"
    );
}

#[tokio::test]
async fn cleanup_removes_old_stopped_containers_only() {
    let fx = Fixture::new().await;
    let rt = fx
        .runtime_with(DockerRuntimeConfig {
            remove_stopped_after: Duration::from_millis(1),
            cleanup_interval: Duration::from_secs(3600),
            ..fx.config()
        })
        .await;
    let (_, done) = run_ready(&rt, &fx.spec(serde_json::json!({}))).await;
    let (_, unread) = run_ready(&rt, &fx.spec(serde_json::json!({}))).await;
    let (_, running) = run_ready(&rt, &fx.spec(serde_json::json!({}))).await;
    rt.signal(&done, StopSignal::Kill).await.unwrap();
    exit_of(&rt, &done).await;
    // `unread` is stopped, but its backend has not seen the exit yet.
    docker_cli(&["kill", "-s", "KILL", &handle_of(&unread).container_id]);
    wait_stopped(&handle_of(&unread).container_id).await;
    // A stopped container of another drone.
    let foreign_drone = DroneName::new_random();
    let _foreign_guard = RemoveContainers(foreign_drone.to_string());
    let foreign = DockerRuntime::connect(fx.config(), foreign_drone, None, CancellationToken::new())
        .await
        .unwrap();
    let foreign_spec = fx.spec(serde_json::json!({}));
    let (_, foreign_handle) = run_ready(&foreign, &foreign_spec).await;
    let foreign_id = handle_of(&foreign_handle).container_id.clone();
    foreign.signal(&foreign_handle, StopSignal::Kill).await.unwrap();
    exit_of(&foreign, &foreign_handle).await;
    drop(foreign);

    rt.cleanup_now().await;
    assert_eq!(engine_state(&handle_of(&done).container_id).await, None, "removed");
    assert!(engine_state(&handle_of(&unread).container_id).await.is_some(), "kept");
    assert!(engine_state(&handle_of(&running).container_id).await.is_some(), "kept");
    assert!(
        engine_state(&foreign_id).await.is_some(),
        "another drone's container is kept"
    );
    docker_cli(&["rm", "-f", &foreign_id]);

    assert_eq!(exit_of(&rt, &unread).await.exit_code, Some(137));
    rt.cleanup_now().await;
    assert_eq!(
        engine_state(&handle_of(&unread).container_id).await,
        None,
        "removed once read"
    );
    assert!(engine_state(&handle_of(&running).container_id).await.is_some());
}

/// Imports a one-file image with unique content (so a distinct image id), as `reference`.
fn import_unique_image(dir: &Path, reference: &str) -> String {
    let root = dir.join("image-root");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("unique"), format!("{:x}", rand::random::<u128>())).unwrap();
    let tar = dir.join("image.tar");
    let out = std::process::Command::new("tar")
        .arg("-cf")
        .arg(&tar)
        .arg("-C")
        .arg(&root)
        .arg(".")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let out = docker_cli(&["import", tar.to_str().unwrap(), reference]);
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test]
async fn pruning_removes_only_unused_images_this_drone_pulled() {
    let fx = Fixture::new().await;
    let store = StateStore::open(&fx.dir.path().join("drone.db")).await.unwrap();
    let tag = format!("{:08x}", rand::random::<u32>());
    let ours = format!("plane-prune-test:{tag}");
    let theirs = format!("plane-prune-test:{tag}-theirs");
    let ours_id = import_unique_image(&fx.dir.path().join("a"), &ours);
    let theirs_id = import_unique_image(&fx.dir.path().join("b"), &theirs);
    // No registry to pull from: record the image as if this drone had pulled it.
    store.record_pulled_image(&ours, &ours_id).await.unwrap();
    // A recorded reference that now names another image is only forgotten.
    store.record_pulled_image(&theirs, "sha256:0000").await.unwrap();
    let config = DockerRuntimeConfig {
        prune_images: true,
        remove_stopped_after: Duration::from_millis(1),
        cleanup_interval: Duration::from_secs(3600),
        ..fx.config()
    };
    let rt = DockerRuntime::connect(config, fx.drone.clone(), Some(store.clone()), CancellationToken::new())
        .await
        .unwrap();
    // The start-up pass may already have run; run one more to be sure.
    rt.cleanup_now().await;
    assert!(
        engine().inspect_image(&ours).await.is_err(),
        "the pulled image is removed"
    );
    assert_eq!(
        engine().inspect_image(&theirs).await.unwrap().id.as_deref(),
        Some(theirs_id.as_str()),
        "an image the drone did not pull is kept"
    );
    assert!(store.pulled_images().await.unwrap().is_empty());
    engine().inspect_image(&fx.image).await.expect("the demo image is kept");
    docker_cli(&["rmi", &theirs]);
}

#[tokio::test]
async fn a_leftover_container_of_the_same_backend_is_replaced() {
    let fx = Fixture::new().await;
    let rt = fx.runtime().await;
    let spec = fx.spec(serde_json::json!({}));
    rt.prepare(&spec, &no_progress).await.unwrap();
    let first = rt.start(&spec).await.unwrap();
    // A retried start (e.g. after a drone restart) replaces the container.
    let second = rt.start(&spec).await.unwrap();
    assert_ne!(
        handle_of(&first.handle).container_id,
        handle_of(&second.handle).container_id
    );
    assert_eq!(engine_state(&handle_of(&first.handle).container_id).await, None);
    tokio::time::timeout(LIMIT, rt.wait_ready(&second.handle, second.address))
        .await
        .unwrap()
        .unwrap();

    // A container with that name that is not ours is not touched.
    let spec = fx.spec(serde_json::json!({}));
    let name = format!("plane-{}", spec.backend_id);
    let out = docker_cli(&[
        "create",
        "--name",
        &name,
        "--label",
        &format!("{LABEL_DRONE}={}", fx.drone),
        &fx.image,
    ]);
    assert!(out.status.success(), "{out:?}");
    let err = rt.start(&spec).await.unwrap_err().to_string();
    assert!(
        err.contains("already exists and is not this drone's container"),
        "{err}"
    );
    assert!(engine().inspect_container(&name, None).await.is_ok());
}

#[tokio::test]
async fn abandoning_a_start_removes_only_this_backends_container() {
    let fx = Fixture::new().await;
    let rt = fx.runtime().await;
    let spec = fx.spec(serde_json::json!({}));
    rt.prepare(&spec, &no_progress).await.unwrap();
    // As if the start had been cut short after the engine created and started it.
    let started = rt.start(&spec).await.unwrap();
    let id = handle_of(&started.handle).container_id.clone();
    assert_eq!(engine_state(&id).await.map(|s| s.0), Some(true));
    rt.abandon(&spec.backend_id).await.unwrap();
    assert_eq!(engine_state(&id).await, None, "the half-started container is removed");
    // Nothing to abandon is fine.
    rt.abandon(&spec.backend_id).await.unwrap();

    // A container with the backend's name that is not this drone's is left alone.
    let other = fx.spec(serde_json::json!({}));
    let name = format!("plane-{}", other.backend_id);
    let out = docker_cli(&["create", "--name", &name, &fx.image]);
    assert!(out.status.success(), "{out:?}");
    assert!(rt.abandon(&other.backend_id).await.is_err());
    assert!(engine().inspect_container(&name, None).await.is_ok());
    let _ = docker_cli(&["rm", "-f", &name]);
}

#[tokio::test]
async fn container_ip_addresses() {
    let fx = Fixture::new().await;
    let rt = fx
        .runtime_with(DockerRuntimeConfig {
            address_mode: DockerAddressMode::ContainerIp,
            ..fx.config()
        })
        .await;
    let spec = fx.spec(serde_json::json!({}));
    let (address, handle) = run_ready(&rt, &spec).await;
    assert_eq!(address.port(), 8080);
    assert!(!address.ip().is_loopback(), "{address}");
    let inspect = engine()
        .inspect_container(&handle_of(&handle).container_id, None)
        .await
        .unwrap();
    let ip = inspect.network_settings.unwrap().networks.unwrap()["bridge"]
        .ip_address
        .clone();
    assert_eq!(ip, Some(address.ip().to_string()));
    rt.signal(&handle, StopSignal::Kill).await.unwrap();
    exit_of(&rt, &handle).await;
}

#[tokio::test]
async fn an_unreachable_engine_is_a_clear_error() {
    init_logs();
    plane_test_image::require_docker().expect("these tests need a Docker engine");
    assert!(docker_reachable(&DockerRuntimeConfig::default()).await);
    let config = DockerRuntimeConfig {
        docker_host: Some("unix:///nonexistent/docker.sock".into()),
        ..Default::default()
    };
    assert!(!docker_reachable(&config).await);
    let err = DockerRuntime::connect(config, DroneName::new_random(), None, CancellationToken::new())
        .await
        .err()
        .expect("connecting fails")
        .to_string();
    assert!(
        err.starts_with("the Docker engine at unix:///nonexistent/docker.sock is unreachable"),
        "{err}"
    );
}

#[tokio::test]
async fn pulls_with_credentials_progress_and_pruning() {
    let fx = Fixture::new().await;
    let registry = TestRegistry::start(&fx.image, "plane/pulled", Some(("user", "secret")))
        .await
        .expect("starting the test registry");
    let image = registry.image_ref().to_owned();
    let _image_guard = RemoveImage(image.clone());
    let store = StateStore::open(&fx.dir.path().join("drone.db")).await.unwrap();
    let config = DockerRuntimeConfig {
        prune_images: true,
        remove_stopped_after: Duration::from_millis(1),
        cleanup_interval: Duration::from_secs(3600),
        ..fx.config()
    };
    let rt = DockerRuntime::connect(config, fx.drone.clone(), Some(store.clone()), CancellationToken::new())
        .await
        .unwrap();

    // Wrong credentials: the registry's refusal, in the engine's words.
    let wrong = spec_of(serde_json::json!({"image": image, "credentials": {"username": "user", "password": "no"}}));
    let err = rt.prepare(&wrong, &no_progress).await.unwrap_err().to_string();
    assert!(err.starts_with(&format!("pulling image {image} failed: ")), "{err}");
    assert!(
        err.contains("authentication required") || err.contains("unauthorized"),
        "{err}"
    );

    let spec = spec_of(serde_json::json!({"image": image, "credentials": {"username": "user", "password": "secret"}}));
    let reports = Arc::new(Mutex::new(Vec::<LoadProgress>::new()));
    let sink = reports.clone();
    rt.prepare(&spec, &move |p| sink.lock().unwrap().push(p)).await.unwrap();
    let reports = reports.lock().unwrap().clone();
    assert_eq!(reports.first().unwrap().message, format!("pulling {image}"));
    let last = reports.last().unwrap();
    assert_eq!(last.message, format!("pulled {image}"));
    assert_eq!(last.fraction, Some(1.0));
    // The engine may know the demo image's layer already ("Already exists"): the random
    // one is always fetched.
    let all: u64 = registry.layer_sizes().iter().sum();
    let random = *registry.layer_sizes().last().unwrap();
    let total = last.bytes_total.expect("a total");
    assert!(
        total == all || total == random,
        "{last:?}, layers {:?}",
        registry.layer_sizes()
    );
    assert_eq!(last.bytes_done, Some(total), "{last:?}");
    assert!(
        reports.iter().any(|r| r.bytes_done.is_some_and(|d| d > 0 && d < total)),
        "some report shows a partial download: {reports:?}"
    );
    let fractions: Vec<f32> = reports.iter().filter_map(|r| r.fraction).collect();
    assert!(fractions.windows(2).all(|w| w[0] <= w[1]), "{fractions:?}");

    let pulled = store.pulled_images().await.unwrap();
    let engine_id = engine().inspect_image(&image).await.unwrap().id.unwrap();
    assert_eq!(pulled.len(), 1);
    assert_eq!(
        (pulled[0].image.as_str(), pulled[0].image_id.as_str()),
        (image.as_str(), engine_id.as_str())
    );

    // The pulled image runs.
    let (address, handle) = run_ready(&rt, &spec).await;
    assert_eq!(
        get_json(address, "/env").await["SESSION_BACKEND_ID"],
        spec.backend_id.to_string()
    );

    // Present now: IfNotPresent does not pull again; Always does.
    let manifests = registry.pulls();
    assert!(manifests >= 1, "{:?}", registry.requests());
    let requests = registry.requests().len();
    rt.prepare(&spec, &no_progress).await.unwrap();
    assert_eq!(registry.requests().len(), requests, "no request at all");
    let always = spec_of(serde_json::json!({"image": image, "pull_policy": "Always",
                                            "credentials": {"username": "user", "password": "secret"}}));
    rt.prepare(&always, &no_progress).await.unwrap();
    assert!(registry.pulls() > manifests, "{:#?}", registry.requests());

    // In use: not pruned. Stopped and exit read: the container goes, then the image.
    rt.cleanup_now().await;
    assert!(engine().inspect_image(&image).await.is_ok());
    rt.signal(&handle, StopSignal::Kill).await.unwrap();
    exit_of(&rt, &handle).await;
    rt.cleanup_now().await;
    assert_eq!(engine_state(&handle_of(&handle).container_id).await, None);
    assert!(
        engine().inspect_image(&image).await.is_err(),
        "the unused pulled image is pruned"
    );
    assert!(store.pulled_images().await.unwrap().is_empty());
    engine().inspect_image(&fx.image).await.expect("the demo image is kept");
}

#[tokio::test]
async fn an_oom_kill_is_reported() {
    let fx = Fixture::new().await;
    let rt = fx.runtime().await;
    let spec = fx.spec(serde_json::json!({"resource_limits": {"memory_limit_bytes": 16 << 20}}));
    let (address, handle) = run_ready(&rt, &spec).await;
    // The backend holds a request body in memory: more than its limit.
    let _ = client()
        .post(format!("http://{address}/debug/file?path=/tmp/big"))
        .body(vec![7u8; 48 << 20])
        .send()
        .await;
    let exit = exit_of(&rt, &handle).await;
    assert_eq!(
        (exit.exit_code, exit.detail.as_deref()),
        (Some(137), Some("OOM-killed (137)"))
    );
}
