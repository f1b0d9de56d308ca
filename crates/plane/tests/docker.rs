//! The Docker runtime end to end, against the real engine: a cluster whose drone runs
//! backends as containers of a test image built locally (`FROM scratch`, the statically
//! linked demo backend; there is no registry), reached through the proxy.
//!
//! These tests need a running Docker engine and fail without one: CI runs them.

use plane_drone::config::DockerRuntimeConfig;
use plane_test_image::{docker_ok, inspect, RemoveContainers};
use plane_tests::{eventually, Options, TestCluster, WAIT};
use plane_types::api::{ApiErrorKind, NodeName};
use plane_types::names::{BackendName, DroneName};
use plane_types::status::{BackendStatus, TerminationKind, TerminationReason};
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PLANE: &str = env!("CARGO_BIN_EXE_plane");

fn docker_config(mounts: &Path) -> DockerRuntimeConfig {
    DockerRuntimeConfig {
        mount_base: Some(mounts.to_owned()),
        ..DockerRuntimeConfig::default()
    }
}

/// A cluster whose drone offers the Docker runtime, plus what the test needs around it.
struct DockerCluster {
    tc: TestCluster,
    image: String,
    drone: DroneName,
    mounts: tempfile::TempDir,
    _containers: RemoveContainers,
}

async fn drone_name(tc: &TestCluster) -> DroneName {
    let state = tc.wait_for(|s| s.drones.iter().any(|d| d.ready)).await.unwrap();
    match &state.drones.iter().find(|d| d.ready).unwrap().node.name {
        NodeName::Drone(name) => name.clone(),
        other => panic!("not a drone: {other:?}"),
    }
}

impl DockerCluster {
    async fn start(configure: impl FnOnce(&mut Options)) -> DockerCluster {
        let image = plane_test_image::test_image().await;
        let mounts = tempfile::tempdir().unwrap();
        let mut options = Options::new(PLANE);
        options.docker = Some(docker_config(mounts.path()));
        configure(&mut options);
        let tc = TestCluster::start(options).await.unwrap();
        let drone = drone_name(&tc).await;
        DockerCluster {
            _containers: RemoveContainers(drone.to_string()),
            tc,
            image,
            drone,
            mounts,
        }
    }

    fn request(&self, key: &str, extra: Value) -> plane_types::api::ConnectRequest {
        let mut executable = json!({ "image": self.image, "pull_policy": "Never" });
        if let (Some(e), Value::Object(extra)) = (executable.as_object_mut(), extra) {
            e.extend(extra);
        }
        self.tc.executable_request(key, executable)
    }

    /// GET `path` of a backend through the proxy, as JSON.
    async fn get(&self, url: &str, path: &str) -> Value {
        let res = self
            .tc
            .http
            .get(format!("{}{path}", url.trim_end_matches('/')))
            .send()
            .await
            .unwrap();
        assert!(res.status().is_success(), "GET {path}: {}", res.status());
        res.json().await.unwrap()
    }
}

#[tokio::test]
async fn full_lifecycle_through_the_proxy() {
    let dc = DockerCluster::start(|_| {}).await;
    let state = dc.tc.client.cluster_state(&dc.tc.cluster).await.unwrap();
    assert!(
        state.drones[0]
            .runtimes
            .contains(&plane_types::executable::RuntimeKind::Docker),
        "{state:?}"
    );

    let res = dc.tc.connect_ready(&dc.request("lifecycle", json!({}))).await.unwrap();
    let id = res.backend_id.clone();

    // Named and labelled so a restarted drone finds it.
    let container = format!("plane-{id}");
    let info = inspect(&container).expect("the container exists");
    assert_eq!(info["State"]["Running"], true);
    assert_eq!(info["Config"]["Labels"]["dev.plane.backend"], id.as_str());
    assert_eq!(info["Config"]["Labels"]["dev.plane.drone"], dc.drone.as_str());
    assert!(
        info["HostConfig"]["SecurityOpt"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o == "no-new-privileges"),
        "{}",
        info["HostConfig"]
    );
    assert_eq!(info["HostConfig"]["PidsLimit"], 1024);

    // Through the proxy, with the session variables and PORT=8080.
    let env = dc.get(&res.url, "/env").await;
    assert_eq!(env["PORT"], "8080");
    assert_eq!(env["SESSION_BACKEND_ID"], id.as_str());
    assert_eq!(env["SESSION_BACKEND_KEY"], "lifecycle");

    // Metrics reach the API at the drone's (short, in tests) interval.
    let metrics = {
        let deadline = Instant::now() + WAIT;
        loop {
            let m = dc.tc.client.backend_metrics(&id).await.unwrap();
            if let Some(m) = m.metrics {
                break m;
            }
            assert!(Instant::now() < deadline, "no metrics arrived");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    assert!(metrics.memory_bytes > 0, "{metrics:?}");
    assert!(metrics.cpu_total_nanos > 0, "{metrics:?}");

    // A second connect to the same key finds the same backend.
    let again = dc.tc.connect(&dc.request("lifecycle", json!({}))).await.unwrap();
    assert_eq!(again.backend_id, id);
    assert!(!again.spawned);

    dc.tc.client.soft_terminate(&id).await.unwrap();
    let last = dc.tc.wait_status(&id, BackendStatus::Terminated).await.unwrap();
    assert_eq!(last.termination_reason, Some(TerminationReason::External));
    assert_eq!(last.termination_kind, Some(TerminationKind::Soft));
    // The demo backend exits cleanly on SIGTERM.
    assert_eq!(last.exit_error, Some(false), "{last:?}");
    let info = inspect(&container).expect("the container exists");
    assert_eq!(info["State"]["Running"], false);
    let gone = dc.tc.http.get(&res.url).send().await.unwrap();
    assert_eq!(gone.status(), 410);
    dc.tc.shutdown().await.unwrap();
}

#[tokio::test]
async fn missing_image_with_pull_policy_never_is_terminated_with_the_reason() {
    let dc = DockerCluster::start(|_| {}).await;
    let mut req = dc.request("missing", json!({}));
    req.spawn_config.as_mut().unwrap().executable =
        json!({"image": "plane-no-such-image:never", "pull_policy": "Never"});
    let res = dc.tc.connect(&req).await.unwrap();
    let last = dc
        .tc
        .wait_status(&res.backend_id, BackendStatus::Terminated)
        .await
        .unwrap();
    assert_eq!(last.termination_reason, Some(TerminationReason::InternalError));
    let message = last.message.clone().unwrap_or_default();
    assert!(
        message.contains("plane-no-such-image:never") && message.contains("Never"),
        "the status should say why: {last:?}"
    );
    // The same through the CLI: `plane status` prints the message. (Async: the
    // controller runs on this test's runtime.)
    let out = tokio::process::Command::new(PLANE)
        .args(["--controller", &dc.tc.controller_url, "status"])
        .arg(res.backend_id.as_str())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && stdout.contains("terminated (reason internalerror")
            && stdout.contains("plane-no-such-image:never"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dc.tc.shutdown().await.unwrap();
}

#[tokio::test]
async fn invalid_executables_are_rejected_at_connect() {
    let dc = DockerCluster::start(|_| {}).await;
    for bad in [
        json!({"image": dc.image, "mount": "../../etc"}),
        json!({"image": dc.image, "mount": "/etc"}),
        json!({"image": dc.image, "pull_policy": "Sometimes"}),
        json!({"image": dc.image, "resource_limits": {"memory_limit_bytes": "lots"}}),
        json!({"image": dc.image, "command": []}),
    ] {
        let req = dc.tc.executable_request("bad", bad.clone());
        match dc.tc.client.connect(&req).await {
            Err(plane_client::ClientError::Api { status, error }) => {
                assert_eq!(status, 400, "{bad}");
                assert_eq!(error.kind, ApiErrorKind::Other, "{bad}: {error:?}");
                assert!(error.message.starts_with("invalid spawn_config"), "{bad}: {error:?}");
            }
            other => panic!("{bad} should be refused, got {other:?}"),
        }
    }
    dc.tc.shutdown().await.unwrap();
}

#[tokio::test]
async fn environment_and_mounts() {
    let dc = DockerCluster::start(|_| {}).await;
    let res = dc
        .tc
        .connect_ready(&dc.request(
            "mounted-key",
            json!({"env": {"GREETING": "hello", "PORT": "1"}, "mount": true}),
        ))
        .await
        .unwrap();
    let env = dc.get(&res.url, "/env").await;
    assert_eq!(env["GREETING"], "hello");
    // Plane's variables win over the executable's.
    assert_eq!(env["PORT"], "8080");

    // `mount: true` binds <mount base>/<key> at /plane-data.
    let url = format!("{}/debug/file?path=/plane-data/note.txt", res.url.trim_end_matches('/'));
    let put = dc.tc.http.post(&url).body("written inside").send().await.unwrap();
    assert!(put.status().is_success(), "{}", put.text().await.unwrap());
    let on_host = dc.mounts.path().join("mounted-key").join("note.txt");
    assert_eq!(std::fs::read_to_string(&on_host).unwrap(), "written inside");

    // A relative path mount binds <mount base>/<path>.
    let res2 = dc
        .tc
        .connect_ready(&dc.request("path-key", json!({"mount": "shared/room-1"})))
        .await
        .unwrap();
    let url = format!("{}/debug/file?path=/plane-data/x", res2.url.trim_end_matches('/'));
    assert!(dc
        .tc
        .http
        .post(&url)
        .body("y")
        .send()
        .await
        .unwrap()
        .status()
        .is_success());
    assert_eq!(
        std::fs::read_to_string(dc.mounts.path().join("shared/room-1/x")).unwrap(),
        "y"
    );
    dc.tc.shutdown().await.unwrap();
}

#[tokio::test]
async fn resource_limits_take_effect_inside_the_container() {
    let dc = DockerCluster::start(|_| {}).await;
    let res = dc
        .tc
        .connect_ready(&dc.request(
            "limited",
            json!({"resource_limits": {
                "cpu_period": 100000,
                "cpu_period_percent": 50,
                "cpu_time_limit": 120,
                "memory_limit_bytes": 96 * 1024 * 1024,
            }}),
        ))
        .await
        .unwrap();
    let limits = dc.get(&res.url, "/debug/limits").await;
    assert_eq!(limits["memory_limit_bytes"], 96 * 1024 * 1024, "{limits}");
    assert_eq!(limits["cpu_quota_micros"], 50000, "{limits}");
    assert_eq!(limits["cpu_period_micros"], 100000, "{limits}");
    assert_eq!(limits["rlimit_cpu_soft"], 120, "{limits}");
    assert_eq!(limits["rlimit_cpu_hard"], 120, "{limits}");
    assert_eq!(limits["pids_limit"], 1024, "{limits}");
    assert_eq!(limits["no_new_privs"], true, "{limits}");
    dc.tc.shutdown().await.unwrap();
}

#[tokio::test]
async fn soft_terminate_sends_sigterm_then_sigkill_after_the_grace_period() {
    let grace = Duration::from_secs(2);
    let dc = DockerCluster::start(|o| o.soft_terminate_grace = grace).await;
    let res = dc
        .tc
        .connect_ready(&dc.request(
            "stubborn",
            json!({
                "mount": true,
                "env": {"DEMO_SIGTERM_FILE": "/plane-data/signals", "DEMO_IGNORE_SIGTERM": "1"},
            }),
        ))
        .await
        .unwrap();
    let id = res.backend_id.clone();
    dc.tc.client.soft_terminate(&id).await.unwrap();
    let terminating = dc.tc.wait_status(&id, BackendStatus::Terminating).await.unwrap();
    let signals = dc.mounts.path().join("stubborn").join("signals");
    eventually("the backend to record SIGTERM", || {
        std::fs::read_to_string(&signals).ok().filter(|s| s.contains("SIGTERM"))
    })
    .await;
    let last = dc.tc.wait_status(&id, BackendStatus::Terminated).await.unwrap();
    let history = dc.tc.store.status_history(&id).await.unwrap();
    let hard = history
        .iter()
        .find(|e| e.status == BackendStatus::HardTerminating)
        .expect("SIGKILL followed");
    assert!(
        hard.time - terminating.time >= grace.as_millis() as u64 - 50,
        "SIGKILL came {} ms after SIGTERM",
        hard.time - terminating.time
    );
    // Killed by SIGKILL: exit code 137.
    assert_eq!(last.exit_error, Some(true), "{last:?}");
    assert_eq!(
        inspect(&format!("plane-{id}")).expect("the container exists")["State"]["ExitCode"],
        137
    );
    dc.tc.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_container_killed_from_outside_is_terminated_with_its_exit_code() {
    let dc = DockerCluster::start(|_| {}).await;
    let a = dc.tc.connect_ready(&dc.request("killed", json!({}))).await.unwrap();
    let b = dc.tc.connect_ready(&dc.request("exits", json!({}))).await.unwrap();

    docker_ok(&["kill", "-s", "KILL", &format!("plane-{}", a.backend_id)]);
    let last = dc
        .tc
        .wait_status(&a.backend_id, BackendStatus::Terminated)
        .await
        .unwrap();
    assert_eq!(last.exit_error, Some(true), "{last:?}");
    let record = dc.tc.store.backend(&a.backend_id).await.unwrap().unwrap();
    assert_eq!(record.exit_code, Some(137));

    // The backend exits by itself with code 3.
    let url = format!("{}/debug/exit?code=3", b.url.trim_end_matches('/'));
    let _ = dc.tc.http.post(&url).send().await;
    dc.tc
        .wait_status(&b.backend_id, BackendStatus::Terminated)
        .await
        .unwrap();
    let record = dc.tc.store.backend(&b.backend_id).await.unwrap().unwrap();
    assert_eq!(record.exit_code, Some(3));
    dc.tc.shutdown().await.unwrap();
}

/// A `plane drone` process, killed with SIGKILL when dropped.
struct DroneProcess(Child);

impl Drop for DroneProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_drone(tc: &TestCluster, name: &DroneName, db: &Path, mounts: &Path, log: &Path) -> DroneProcess {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    let child = Command::new(PLANE)
        .args(["drone", "--runtime", "docker", "--name", name.as_str()])
        .args(["--controller-url", &tc.controller_url, "--cluster", tc.cluster.as_str()])
        .arg("--db")
        .arg(db)
        .arg("--mount-base")
        .arg(mounts)
        .args(["--heartbeat-interval-ms", "200", "--metrics-interval-seconds", "1"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    DroneProcess(child)
}

async fn wait_drone_ready(tc: &TestCluster, name: &DroneName, ready: bool) {
    tc.wait_for(|s| {
        s.drones
            .iter()
            .any(|d| d.node.name == NodeName::Drone(name.clone()) && d.ready == ready)
    })
    .await
    .unwrap();
}

/// The fencing token of `id`'s key, if `id` still holds its key.
async fn key_fencing_token(tc: &TestCluster, id: &BackendName) -> Option<i64> {
    let record = tc.store.backend(id).await.unwrap()?;
    let holder = tc.store.key_holder(&record.key).await.unwrap()?;
    (holder.backend_id == *id).then_some(record.fencing_token)
}

#[tokio::test]
async fn a_drone_killed_with_sigkill_readopts_its_containers() {
    let image = plane_test_image::test_image().await;
    let mounts = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut options = Options::new(PLANE);
    options.drone = false;
    // Renew at 6 s, soft-terminate at 8 s, expire at 12 s: the drone is down for well
    // under the 2 s between the latest renewal and the soft deadline, even when the
    // docker commands below are slow on a loaded machine.
    options.lease_unit = Duration::from_secs(2);
    let tc = TestCluster::start(options).await.unwrap();
    let name: DroneName = format!("dr-restart-{}", std::process::id()).parse().unwrap();
    let _containers = RemoveContainers(name.to_string());
    let db = dir.path().join("drone.db");
    let log = dir.path().join("drone.log");
    let mut drone = spawn_drone(&tc, &name, &db, mounts.path(), &log);
    wait_drone_ready(&tc, &name, true).await;

    let request = |key: &str| tc.executable_request(key, json!({"image": image, "pull_policy": "Never"}));
    let kept = tc.connect_ready(&request("kept")).await.unwrap();
    let also_kept = tc.connect_ready(&request("also-kept")).await.unwrap();
    let stopped = tc.connect_ready(&request("stopped-while-down")).await.unwrap();
    let removed = tc.connect_ready(&request("removed-while-down")).await.unwrap();
    let tokens_before = key_fencing_token(&tc, &kept.backend_id).await;

    // SIGKILL: no shutdown path runs.
    let killed_at = Instant::now();
    drone.0.kill().unwrap();
    drone.0.wait().unwrap();
    // While it is down, one backend stops, and a Plane container it never knew appears.
    docker_ok(&["kill", "-s", "KILL", &format!("plane-{}", stopped.backend_id)]);
    docker_ok(&["rm", "-f", &format!("plane-{}", removed.backend_id)]);
    let stranger = docker_ok(&[
        "run",
        "-d",
        "--label",
        &format!("dev.plane.drone={name}"),
        "--label",
        "dev.plane.backend=stranger",
        &image,
    ]);
    drop(drone);
    let _drone = spawn_drone(&tc, &name, &db, mounts.path(), &log);
    wait_drone_ready(&tc, &name, true).await;

    // Those stopped or removed while the drone was down are reported lost.
    for gone in [&stopped, &removed] {
        let last = tc
            .wait_status(&gone.backend_id, BackendStatus::Terminated)
            .await
            .unwrap();
        assert_eq!(last.termination_reason, Some(TerminationReason::Lost), "{last:?}");
    }
    // The unknown Plane container is stopped.
    eventually("the unknown container to be stopped", || {
        (inspect(&stranger).expect("the container exists")["State"]["Running"] == false).then_some(())
    })
    .await;

    // The others keep running and renewing, well past the lease expiry (the controller
    // would report them lost once it passed unrenewed: 12 s after the last renewal
    // before the kill).
    let until = killed_at + Duration::from_secs(13);
    while Instant::now() < until {
        for b in [&kept, &also_kept] {
            let status = tc.client.status(&b.backend_id).await.unwrap();
            assert_eq!(status.status, BackendStatus::Ready, "{}: {status:?}", b.backend_id);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(tokens_before.is_some());
    assert_eq!(key_fencing_token(&tc, &kept.backend_id).await, tokens_before);
    for b in [&kept, &also_kept] {
        let res = tc
            .http
            .get(format!("{}/env", b.url.trim_end_matches('/')))
            .send()
            .await
            .unwrap();
        assert!(res.status().is_success(), "{}: {}", b.backend_id, res.status());
        let env: Value = res.json().await.unwrap();
        assert_eq!(env["SESSION_BACKEND_ID"], b.backend_id.as_str());
    }
    // Re-adopted backends still terminate normally, with their exit code.
    tc.client.soft_terminate(&kept.backend_id).await.unwrap();
    let last = tc
        .wait_status(&kept.backend_id, BackendStatus::Terminated)
        .await
        .unwrap();
    assert_eq!(last.exit_error, Some(false), "{last:?}");
    tc.shutdown().await.unwrap();
}
