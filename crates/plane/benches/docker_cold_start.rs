//! Benchmark (not a test): Docker cold start, connect → ready, next to raw `docker run`
//! → first HTTP response, interleaved in the same run.
//!
//! * **plane:** `POST /ctrl/connect` for a new key with the locally built, cached
//!   `FROM scratch` demo image (`pull_policy: Never`), then follow the status stream
//!   until `ready`. The drone creates, starts and inspects the container through the
//!   engine API and polls the published port until it answers HTTP.
//! * **baseline:** `docker run -d` of the same image with the same hardening flags Plane
//!   uses (`no-new-privileges`, pids limit), publishing 8080 on a free loopback port,
//!   then polling that port until it answers HTTP. Timed from spawning `docker run`.
//!
//! Containers are removed outside the timed sections. Run:
//! `cargo bench -p plane --bench docker_cold_start` (`PLANE_BENCH_DOCKER_SPAWNS`,
//! default 60).

mod common;

use common::Report;
use plane_drone::config::DockerRuntimeConfig;
use plane_tests::{Options, TestCluster};
use plane_types::status::BackendStatus;
use std::time::{Duration, Instant};

async fn docker(args: &[&str]) -> anyhow::Result<String> {
    let out = tokio::process::Command::new("docker").args(args).output().await?;
    anyhow::ensure!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// `docker run -d` → the published port answers HTTP; returns the time and the
/// container id.
async fn baseline_run(image: &str) -> anyhow::Result<(f64, String)> {
    let port = plane_tests::free_port();
    let publish = format!("127.0.0.1:{port}:8080");
    let start = Instant::now();
    let out = tokio::process::Command::new("docker")
        .args([
            "run",
            "-d",
            "--security-opt",
            "no-new-privileges",
            "--pids-limit",
            "1024",
        ])
        .args(["-e", "PORT=8080", "-p", &publish, image])
        .output()
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "docker run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Polled once `docker run -d` has returned (the container is started), as a script
    // would. Probing earlier is slower, not faster: a SYN sent while the port's NAT rule
    // exists but the container's network is not up is dropped, and retried after 1 s.
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(30);
    let elapsed = loop {
        if plane_drone::runtime::probe_http(addr).await {
            break start.elapsed().as_secs_f64() * 1000.0;
        }
        anyhow::ensure!(Instant::now() < deadline, "baseline container never answered");
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    Ok((elapsed, String::from_utf8_lossy(&out.stdout).trim().to_owned()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let binary = env!("CARGO_BIN_EXE_plane");
    let spawns: usize = std::env::var("PLANE_BENCH_DOCKER_SPAWNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    plane_test_image::require_docker()?;
    let image = tokio::task::spawn_blocking(plane_test_image::demo_image).await??;
    let mounts = tempfile::tempdir()?;
    let mut options = Options::new(binary);
    options.lease_unit = Duration::from_secs(10);
    options.heartbeat_interval = Duration::from_secs(1);
    options.sweep_interval = Duration::from_secs(1);
    options.startup_timeout = Duration::from_secs(60);
    options.docker = Some(DockerRuntimeConfig {
        mount_base: Some(mounts.path().to_owned()),
        ..DockerRuntimeConfig::default()
    });
    let tc = TestCluster::start(options).await?;
    let request =
        |key: String| tc.executable_request(&key, serde_json::json!({ "image": image, "pull_policy": "Never" }));

    let mut plane_ms = Vec::with_capacity(spawns);
    let mut base_ms = Vec::with_capacity(spawns);
    for i in 0..(spawns + 3) {
        // Interleaved, so both see the same machine; the first 3 rounds warm up.
        let (base, id) = baseline_run(&image).await?;
        docker(&["rm", "-f", &id]).await?;
        let start = Instant::now();
        let res = tc.client.connect(&request(format!("docker-bench-{i}"))).await?;
        tc.wait_status(&res.backend_id, BackendStatus::Ready).await?;
        let plane = start.elapsed().as_secs_f64() * 1000.0;
        tc.client.hard_terminate(&res.backend_id).await?;
        tc.wait_status(&res.backend_id, BackendStatus::Terminated).await?;
        docker(&["rm", "-f", &format!("plane-{}", res.backend_id)]).await?;
        if i >= 3 {
            plane_ms.push(plane);
            base_ms.push(base);
        }
    }
    println!("\ncold start, demo image (FROM scratch, cached), Docker runtime");
    let mut report = Report::new("docker_cold_start");
    let plane = report.series("plane: connect -> ready", "ms", plane_ms, 1);
    let base = report.series("baseline: docker run -> answers HTTP", "ms", base_ms, 1);
    report.compare(
        "Docker cold start",
        "plane: connect -> ready",
        "baseline: docker run -> answers HTTP",
        false,
    );
    let overhead = report.value("overhead at p50, plane - baseline", "ms", plane.p50 - base.p50);
    report.value("overhead at p99, plane - baseline", "ms", plane.p99 - base.p99);
    report.target("Docker cold start overhead, p50", overhead, "ms", "<=", 15.0);
    report.finish()?;
    tc.shutdown().await
}
