//! Benchmark (not a test): what the proxy adds, against direct-to-backend in the same
//! run, on one ready demo backend (process runtime). The proxy measured is a `plane
//! proxy` process of its own, as in production, connected to the bench's controller;
//! requests to it carry the cluster's name as their Host.
//!
//! * **latency:** sequential `GET /state` on one kept-alive connection, through the
//!   proxy and straight to the backend's address, interleaved request by request;
//!   the added latency is the difference of the two p50s (and p99s);
//! * **throughput:** `wrk` (a separate process, one thread, `C` kept-alive HTTP/1.1
//!   connections) against the same URL through the proxy and direct, in interleaved
//!   rounds. The CPU time the proxy process and the backend process spend during each
//!   run, per request, says where the cycles go, independent of the core count;
//! * **WebSocket echo:** a ping on an open WebSocket to the demo's `/ws` and the pong
//!   that answers it, through the proxy and direct, interleaved.
//!
//! Run: `cargo bench -p plane --bench proxy` (needs `wrk`: `apt-get install wrk`).
//! `PLANE_BENCH_REQUESTS` (default 5000), `PLANE_BENCH_CONNECTIONS` (32),
//! `PLANE_BENCH_SECONDS` per wrk run (4), `PLANE_BENCH_ROUNDS` (3), `PLANE_BENCH_PINGS`
//! (3000).

mod common;

use anyhow::{bail, ensure, Context};
use common::{env_usize, Report};
use futures_util::{SinkExt, StreamExt};
use plane_tests::{Options, TestCluster};
use plane_types::status::BackendStatus;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A process's CPU time (user + system), from `/proc/<pid>/stat`.
fn cpu(pid: u32) -> Duration {
    Duration::from_secs_f64(common::process_cpu_seconds(pid).unwrap_or(0.0))
}

/// What one wrk run measured.
struct Wrk {
    requests_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    requests: f64,
}

/// Parses a wrk duration such as `812.00us`, `1.23ms` or `2.00s` into milliseconds.
fn wrk_ms(text: &str) -> Option<f64> {
    let (number, scale) = if let Some(n) = text.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1000.0)
    } else {
        return None;
    };
    Some(number.parse::<f64>().ok()? * scale)
}

/// `host`: the Host header to send (the cluster name, for the proxy).
async fn wrk(url: &str, host: Option<&str>, connections: usize, seconds: usize) -> anyhow::Result<Wrk> {
    let mut args = vec![
        "-t1".to_string(),
        format!("-c{connections}"),
        format!("-d{seconds}s"),
        "--latency".into(),
    ];
    if let Some(host) = host {
        args.extend(["-H".into(), format!("Host: {host}")]);
    }
    args.push(url.into());
    let out = tokio::process::Command::new("wrk")
        .args(&args)
        .output()
        .await
        .context("running wrk (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "wrk failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Any non-2xx answer or socket error would make the numbers meaningless.
    ensure!(
        !text.contains("Non-2xx") && !text.contains("Socket errors"),
        "wrk saw errors:\n{text}"
    );
    let field =
        |prefix: &str| -> Option<&str> { text.lines().find_map(|l| l.trim().strip_prefix(prefix)).map(str::trim) };
    let parsed = (|| {
        let requests_per_s = field("Requests/sec:")?.parse().ok()?;
        let p50_ms = wrk_ms(field("50%")?)?;
        let p99_ms = wrk_ms(field("99%")?)?;
        let requests = text
            .lines()
            .find(|l| l.contains("requests in"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        Some(Wrk {
            requests_per_s,
            p50_ms,
            p99_ms,
            requests,
        })
    })();
    parsed.with_context(|| format!("unexpected wrk output:\n{text}"))
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Sends a ping and waits for its pong, skipping the demo's state updates.
async fn ping(ws: &mut Ws, n: u64) -> anyhow::Result<Duration> {
    let payload = n.to_be_bytes().to_vec();
    let start = Instant::now();
    ws.send(Message::Ping(payload.clone().into())).await?;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Ok(Some(Ok(Message::Pong(p)))) if p.as_ref() == payload.as_slice() => return Ok(start.elapsed()),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(e))) => bail!("websocket failed: {e}"),
            Ok(None) => bail!("websocket closed"),
            Err(_) => bail!("no pong within 5 s"),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let requests = env_usize("PLANE_BENCH_REQUESTS", 5000);
    let connections = env_usize("PLANE_BENCH_CONNECTIONS", 32);
    let seconds = env_usize("PLANE_BENCH_SECONDS", 4);
    let rounds = env_usize("PLANE_BENCH_ROUNDS", 3);
    let pings = env_usize("PLANE_BENCH_PINGS", 3000);

    let mut options = Options::new(env!("CARGO_BIN_EXE_plane"));
    // Production-like timings; nothing periodic should compete with the measurement.
    options.lease_unit = Duration::from_secs(10);
    options.heartbeat_interval = Duration::from_secs(1);
    options.sweep_interval = Duration::from_secs(1);
    let tc = TestCluster::start(options).await?;
    let res = tc.connect_ready(&tc.demo_request("proxy-bench")).await?;
    let addr = tc
        .store
        .backend(&res.backend_id)
        .await?
        .and_then(|b| b.address)
        .context("backend address")?;
    // The process the drone started with `PORT=<port>`.
    let backend = match common::pids_with_env(&format!("PORT={}", addr.port()))[..] {
        [pid] => pid,
        ref pids => bail!("not one process with PORT={} in its environment: {pids:?}", addr.port()),
    };

    // The proxy under test: its own process, as in production.
    let port = plane_tests::free_port();
    let mut proxy = tokio::process::Command::new(env!("CARGO_BIN_EXE_plane"))
        .args([
            "proxy",
            "--controller-url",
            &tc.controller_url,
            "--cluster",
            tc.cluster.as_str(),
        ])
        .args(["--host", "127.0.0.1", "--http-port", &port.to_string()])
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .context("starting plane proxy")?;
    let proxy_pid = proxy.id().context("proxy pid")?;
    let host = tc.cluster.as_str().to_string();
    let token_path = res
        .url
        .split_once(&host)
        .map(|(_, path)| path.to_string())
        .context("token path in the URL")?;
    let via_proxy = format!("http://127.0.0.1:{port}{token_path}state");
    let direct = format!("http://{addr}/state");
    println!("through the proxy: {via_proxy} (Host: {host})\ndirect:            {direct}\n");
    let ready = format!("http://127.0.0.1:{port}/ready");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = reqwest::get(&ready).await {
            if r.status().is_success() {
                break;
            }
        }
        ensure!(Instant::now() < deadline, "the proxy process was not ready within 20 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut report = Report::new("proxy");

    // Latency, one request at a time on one kept-alive connection each.
    let client = || reqwest::Client::builder().pool_max_idle_per_host(1).build();
    let (proxy_client, direct_client) = (client()?, client()?);
    let get = |c: &reqwest::Client, url: &str| {
        let request = if url.starts_with(&format!("http://127.0.0.1:{port}/")) {
            c.get(url).header(reqwest::header::HOST, &host)
        } else {
            c.get(url)
        };
        async move {
            let start = Instant::now();
            let response = request.send().await?;
            ensure!(response.status().is_success(), "GET answered {}", response.status());
            response.bytes().await?;
            anyhow::Ok(start.elapsed())
        }
    };
    for _ in 0..200 {
        get(&proxy_client, &via_proxy).await?;
        get(&direct_client, &direct).await?;
    }
    let (mut p, mut d) = (Vec::with_capacity(requests), Vec::with_capacity(requests));
    for _ in 0..requests {
        d.push(ms(get(&direct_client, &direct).await?));
        p.push(ms(get(&proxy_client, &via_proxy).await?));
    }
    println!("HTTP GET latency, one request at a time, kept-alive connection");
    let ps = report.series("GET through the proxy", "ms", p, 3);
    let ds = report.series("GET direct to the backend", "ms", d, 3);
    report.compare(
        "GET latency",
        "GET through the proxy",
        "GET direct to the backend",
        false,
    );
    let added_p50 = report.value("added latency, p50", "ms", ps.p50 - ds.p50);
    report.value("added latency, p99", "ms", ps.p99 - ds.p99);

    // Throughput under wrk.
    println!("\nHTTP/1.1 keep-alive throughput, wrk -t1 -c{connections}, {rounds} rounds of {seconds} s");
    wrk(&via_proxy, Some(&host), connections, 1).await?;
    wrk(&direct, None, connections, 1).await?;
    let (mut proxy_runs, mut direct_runs) = (Vec::new(), Vec::new());
    // CPU µs per request: the proxy's, and the backend's direct and proxied.
    let (mut proxy_cpu_us, mut backend_direct_us, mut backend_proxied_us) = (Vec::new(), Vec::new(), Vec::new());
    let per_request = |d: Duration, w: &Wrk| d.as_secs_f64() * 1e6 / w.requests;
    for round in 0..rounds {
        let before = cpu(backend);
        let d = wrk(&direct, None, connections, seconds).await?;
        backend_direct_us.push(per_request(cpu(backend) - before, &d));
        let (before, proxy_before) = (cpu(backend), cpu(proxy_pid));
        let p = wrk(&via_proxy, Some(&host), connections, seconds).await?;
        backend_proxied_us.push(per_request(cpu(backend) - before, &p));
        proxy_cpu_us.push(per_request(cpu(proxy_pid) - proxy_before, &p));
        println!(
            "round {round}: direct {:>8.0} req/s (p50 {:.3} ms, p99 {:.3} ms); proxy {:>8.0} req/s (p50 {:.3} ms, p99 {:.3} ms)",
            d.requests_per_s, d.p50_ms, d.p99_ms, p.requests_per_s, p.p50_ms, p.p99_ms
        );
        direct_runs.push(d);
        proxy_runs.push(p);
    }
    let mean = |runs: &[Wrk], f: fn(&Wrk) -> f64| runs.iter().map(f).sum::<f64>() / runs.len() as f64;
    let proxy_rate = report.value(
        "throughput through the proxy",
        "req/s",
        mean(&proxy_runs, |w| w.requests_per_s),
    );
    let direct_rate = report.value(
        "throughput direct to the backend",
        "req/s",
        mean(&direct_runs, |w| w.requests_per_s),
    );
    report.compare(
        "HTTP/1.1 keep-alive throughput",
        "throughput through the proxy",
        "throughput direct to the backend",
        true,
    );
    report.value(
        "under load: p50 through the proxy",
        "ms",
        mean(&proxy_runs, |w| w.p50_ms),
    );
    report.value("under load: p50 direct", "ms", mean(&direct_runs, |w| w.p50_ms));
    report.value(
        "under load: p99 through the proxy",
        "ms",
        mean(&proxy_runs, |w| w.p99_ms),
    );
    report.value("under load: p99 direct", "ms", mean(&direct_runs, |w| w.p99_ms));
    let avg = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    report.value("CPU per request: proxy process", "µs", avg(&proxy_cpu_us));
    report.value("CPU per request: backend, proxied", "µs", avg(&backend_proxied_us));
    report.value("CPU per request: backend, direct", "µs", avg(&backend_direct_us));
    report.compare(
        "CPU per request",
        "CPU per request: proxy process",
        "CPU per request: backend, direct",
        false,
    );

    // WebSocket echo.
    let ws_url = |http: &str| http.replacen("http://", "ws://", 1);
    let mut request = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!(
        "{}ws",
        ws_url(&via_proxy).trim_end_matches("state")
    ))?;
    request.headers_mut().insert(reqwest::header::HOST, host.parse()?);
    let (mut proxy_ws, _) = tokio_tungstenite::connect_async(request).await?;
    let (mut direct_ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws")).await?;
    for n in 0..200 {
        ping(&mut proxy_ws, n).await?;
        ping(&mut direct_ws, n).await?;
    }
    let (mut p, mut d) = (Vec::with_capacity(pings), Vec::with_capacity(pings));
    for n in 0..pings as u64 {
        d.push(ms(ping(&mut direct_ws, n).await?));
        p.push(ms(ping(&mut proxy_ws, n).await?));
    }
    println!("\nWebSocket echo (ping → pong), one at a time");
    report.series("WebSocket echo through the proxy", "ms", p, 3);
    report.series("WebSocket echo direct", "ms", d, 3);
    report.compare(
        "WebSocket echo RTT",
        "WebSocket echo through the proxy",
        "WebSocket echo direct",
        false,
    );
    let _ = proxy_ws.close(None).await;
    let _ = direct_ws.close(None).await;

    report.target("latency added by the proxy, p50", added_p50, "ms", "<=", 0.2);
    report.target("proxy throughput / direct", proxy_rate / direct_rate, "×", ">=", 0.7);
    report.finish()?;

    proxy.kill().await?;
    tc.client.hard_terminate(&res.backend_id).await?;
    tc.wait_status(&res.backend_id, BackendStatus::Terminated).await?;
    tc.shutdown().await
}
