//! The Docker runtime wired into a whole drone ([`plane_drone::run`]): which runtimes the
//! Hello offers, the clear failure when the engine is unreachable, and the start-up
//! reconciliation that stops a labelled container the state store has no record of.
//!
//! A scripted WebSocket peer plays the controller just far enough to read the Hello.
//! These tests need a running Docker engine and fail (they do not skip) without one.

use futures_util::StreamExt;
use plane_drone::{DockerRuntimeConfig, DroneConfig, DroneTimings, ProcessRuntimeConfig, LABEL_BACKEND, LABEL_DRONE};
use plane_test_image::docker as docker_cli;
use plane_types::executable::RuntimeKind;
use plane_types::names::DroneName;
use plane_types::protocol::DroneToController;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

const LIMIT: Duration = Duration::from_secs(30);

fn config(dir: &tempfile::TempDir, controller: String, name: &DroneName, allow: &[&str]) -> DroneConfig {
    DroneConfig {
        controller_url: controller,
        name: Some(name.clone()),
        cluster: "localhost:9".parse().unwrap(),
        pool: String::new(),
        db_path: dir.path().join("drone.db"),
        process: ProcessRuntimeConfig {
            allow_commands: allow.iter().map(|s| s.to_string()).collect(),
            log_dir: dir.path().join("logs"),
            ..Default::default()
        },
        docker: Some(DockerRuntimeConfig::default()),
        timings: DroneTimings::default(),
        event_journal: None,
        ctrl_token: None,
    }
}

/// Runs a drone until it sends its Hello; returns the runtimes it offered.
async fn hello_runtimes(config: DroneConfig, listener: TcpListener) -> Vec<RuntimeKind> {
    let shutdown = CancellationToken::new();
    let drone = tokio::spawn(plane_drone::run(config, shutdown.clone()));
    let (stream, _) = tokio::time::timeout(LIMIT, listener.accept())
        .await
        .expect("the drone connects")
        .unwrap();
    let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
    let hello = loop {
        match tokio::time::timeout(LIMIT, ws.next()).await.expect("a Hello") {
            Some(Ok(Message::Text(text))) => break serde_json::from_str::<DroneToController>(&text).unwrap(),
            Some(Ok(_)) => continue,
            other => panic!("no Hello: {other:?}"),
        }
    };
    shutdown.cancel();
    tokio::time::timeout(LIMIT, drone)
        .await
        .expect("the drone stops")
        .unwrap()
        .unwrap();
    match hello {
        DroneToController::Hello(hello) => hello.runtimes,
        other => panic!("expected a Hello, got {other:?}"),
    }
}

#[tokio::test]
async fn offered_runtimes_and_startup_reconciliation() {
    plane_test_image::require_docker().expect("these tests need a Docker engine");
    let image = plane_test_image::demo_image_async().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let name = DroneName::new_random();
    // A running container under this drone's label that no record accounts for.
    let orphan = format!("plane-orphan-{name}");
    let out = docker_cli(&[
        "run",
        "-d",
        "--name",
        &orphan,
        "--label",
        &format!("{LABEL_DRONE}={name}"),
        "--label",
        &format!("{LABEL_BACKEND}=orphan"),
        &image,
    ]);
    assert!(out.status.success(), "{out:?}");
    let _cleanup = scopeguard(orphan.clone());

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let runtimes = hello_runtimes(config(&dir, url.clone(), &name, &[]), listener).await;
    assert_eq!(
        runtimes,
        vec![RuntimeKind::Docker],
        "no allowed command: no process runtime"
    );
    let state = docker_cli(&["inspect", "-f", "{{.State.Running}}", &orphan]);
    assert_eq!(
        String::from_utf8_lossy(&state.stdout).trim(),
        "false",
        "the orphan was stopped before the drone connected"
    );

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let runtimes = hello_runtimes(config(&dir, url, &name, &["sh"]), listener).await;
    assert_eq!(runtimes, vec![RuntimeKind::Process, RuntimeKind::Docker]);
}

#[tokio::test]
async fn an_unreachable_engine_fails_the_drone_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(&dir, "http://127.0.0.1:9".into(), &DroneName::new_random(), &[]);
    config.docker = Some(DockerRuntimeConfig {
        docker_host: Some("unix:///nonexistent/docker.sock".into()),
        ..Default::default()
    });
    let err = tokio::time::timeout(LIMIT, plane_drone::run(config, CancellationToken::new()))
        .await
        .expect("the drone gives up at once")
        .unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains("setting up the Docker runtime (engine at unix:///nonexistent/docker.sock)"),
        "{text}"
    );
    assert!(text.contains("unreachable"), "{text}");
}

/// Removes a container when dropped.
fn scopeguard(name: String) -> impl Drop {
    struct Guard(String);
    impl Drop for Guard {
        fn drop(&mut self) {
            docker_cli(&["rm", "-f", &self.0]);
        }
    }
    Guard(name)
}
