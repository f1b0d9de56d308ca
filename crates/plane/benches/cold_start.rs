//! Benchmarks (not tests): cold start and proxy overhead, each next to a baseline
//! measured in the same run, since only ratios are stable on a noisy machine.
//!
//! * cold start: `POST /ctrl/connect` → `ready` on the status stream, for the demo
//!   backend on the process runtime, against the baseline of spawning the same
//!   `plane demo-backend` directly and polling its port until it answers HTTP;
//! * proxy overhead: a GET through the proxy against the same GET sent straight to the
//!   backend, on kept-alive connections.
//!
//! Run: `cargo bench -p plane --bench cold_start` (`PLANE_BENCH_SPAWNS`, default 200;
//! `PLANE_BENCH_REQUESTS`, default 2000).

mod common;

use common::{summarize, Summary};
use plane_tests::{Options, TestCluster};
use plane_types::status::BackendStatus;
use std::process::Stdio;
use std::time::{Duration, Instant};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

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
    let requests = env_usize("PLANE_BENCH_REQUESTS", 2000);
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
    let plane = summarize(plane_ms);
    let base = summarize(base_ms);
    println!("\ncold start, demo backend, process runtime");
    print_ms("plane: connect -> ready", &plane);
    print_ms("baseline: spawn -> answers HTTP", &base);
    println!(
        "{:<40} p50 x{:.2}  p99 x{:.2}",
        "ratio plane/baseline",
        plane.p50 / base.p50,
        plane.p99 / base.p99
    );
    for id in &ids {
        tc.wait_status(id, BackendStatus::Terminated).await?;
    }

    // Proxy overhead on one ready backend.
    let res = tc.connect_ready(&tc.demo_request("proxy-bench")).await?;
    let addr = tc
        .store
        .backend(&res.backend_id)
        .await?
        .and_then(|b| b.address)
        .expect("address");
    let direct = reqwest::Client::new();
    let (mut via_proxy, mut straight) = (Vec::with_capacity(requests), Vec::with_capacity(requests));
    for _ in 0..20 {
        tc.http.get(format!("{}env", res.url)).send().await?.bytes().await?;
        direct.get(format!("http://{addr}/env")).send().await?.bytes().await?;
    }
    for _ in 0..requests {
        let t = Instant::now();
        direct.get(format!("http://{addr}/env")).send().await?.bytes().await?;
        straight.push(t.elapsed().as_secs_f64() * 1000.0);
        let t = Instant::now();
        tc.http.get(format!("{}env", res.url)).send().await?.bytes().await?;
        via_proxy.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let p = summarize(via_proxy);
    let d = summarize(straight);
    println!("\nHTTP GET latency, kept-alive connections");
    print_ms("through the proxy", &p);
    print_ms("baseline: direct to backend", &d);
    println!(
        "{:<40} p50 x{:.2}  p99 x{:.2}",
        "ratio proxy/direct",
        p.p50 / d.p50,
        p.p99 / d.p99
    );
    tc.client.hard_terminate(&res.backend_id).await?;
    tc.wait_status(&res.backend_id, BackendStatus::Terminated).await?;
    tc.shutdown().await
}

fn print_ms(name: &str, s: &Summary) {
    common::print(name, s, 3);
}
