//! Benchmark (not a test): process-runtime cold start next to a baseline measured in
//! the same run, interleaved, since only ratios are stable on a noisy machine.
//!
//! * **plane:** `POST /ctrl/connect` → `ready` on the status stream, for the demo
//!   backend on the process runtime;
//! * **baseline:** spawning the same `plane demo-backend` directly and polling its port
//!   (every millisecond) until it answers HTTP.
//!
//! Run: `cargo bench -p plane --bench cold_start` (`PLANE_BENCH_SPAWNS`, default 200).
//! The proxy's overhead is the `proxy` bench.

mod common;

use common::{env_usize, Report};
use plane_tests::{Options, TestCluster};
use plane_types::status::BackendStatus;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// Spawns the demo backend directly and polls until it answers HTTP (the floor any
/// orchestrator pays on this machine).
async fn baseline_spawn(binary: &str) -> f64 {
    let port = plane_tests::free_port();
    let start = Instant::now();
    let mut child = tokio::process::Command::new(binary)
        .arg("demo-backend")
        .env("PORT", port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn demo backend");
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !plane_drone::runtime::probe_http(addr).await {
        assert!(Instant::now() < deadline, "baseline backend never answered");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = start.elapsed().as_secs_f64() * 1000.0;
    let _ = child.kill().await;
    elapsed
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let binary = env!("CARGO_BIN_EXE_plane");
    let spawns = env_usize("PLANE_BENCH_SPAWNS", 200);
    let mut options = Options::new(binary);
    // Production-like timings where they matter to cold start; none of these is on
    // the critical path except the route wait, which is not hit.
    options.lease_unit = Duration::from_secs(10);
    options.heartbeat_interval = Duration::from_secs(1);
    options.sweep_interval = Duration::from_secs(1);
    let tc = TestCluster::start(options).await?;

    // Warm-up: page cache and connection pools.
    for i in 0..5 {
        let res = tc.connect_ready(&tc.demo_request(&format!("warm-{i}"))).await?;
        tc.client.hard_terminate(&res.backend_id).await?;
        baseline_spawn(binary).await;
    }

    let mut plane_ms = Vec::with_capacity(spawns);
    let mut base_ms = Vec::with_capacity(spawns);
    let mut ids = Vec::with_capacity(spawns);
    for i in 0..spawns {
        // Interleave so both see the same machine conditions.
        base_ms.push(baseline_spawn(binary).await);
        let start = Instant::now();
        let res = tc.client.connect(&tc.demo_request(&format!("bench-{i}"))).await?;
        tc.wait_status(&res.backend_id, BackendStatus::Ready).await?;
        plane_ms.push(start.elapsed().as_secs_f64() * 1000.0);
        tc.client.hard_terminate(&res.backend_id).await?;
        ids.push(res.backend_id);
    }
    println!("\ncold start, demo backend, process runtime");
    let mut report = Report::new("cold_start");
    let plane = report.series("plane: connect -> ready", "ms", plane_ms, 3);
    report.series("baseline: spawn -> answers HTTP", "ms", base_ms, 3);
    report.compare(
        "process cold start",
        "plane: connect -> ready",
        "baseline: spawn -> answers HTTP",
        false,
    );
    report.target("process cold start, p50", plane.p50, "ms", "<=", 10.0);
    report.target("process cold start, p99", plane.p99, "ms", "<=", 30.0);
    report.finish()?;
    for id in &ids {
        tc.wait_status(id, BackendStatus::Terminated).await?;
    }
    tc.shutdown().await
}
