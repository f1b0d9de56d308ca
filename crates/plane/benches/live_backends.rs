//! Benchmark (not a test): live process backends on one drone.
//!
//! The controller (SQLite) and a proxy run in this process ([`TestCluster`] without a
//! drone, production-like timings); the drone is a separate `plane drone` process with
//! its default timings (metrics every 10 s, its watchdog started), so its CPU time can be
//! read alone and profiled (`perf record -g -p <pid>`). Its backends are `plane
//! demo-backend` processes.
//!
//! 1. One probe backend; at that point (few backends) the baselines of this run: latency
//!    of `GET /pub/health`, of a warm `POST /ctrl/connect` (the probe's key), and of a GET
//!    through the proxy to the probe backend, interleaved; and the drone's CPU use while
//!    idle over `PLANE_BENCH_IDLE_SECONDS`.
//! 2. Keys connected one after another until `N` backends are ready: the time from the
//!    connect call to `ready` on the backend's status stream, as series per band (the
//!    first 100, each fifth of `N`, the last 100), and the drone's CPU use per fifth.
//! 3. With all `N` alive (checked: the controller's count of the drone's live backends,
//!    every backend `ready` in the store, one demo-backend process per backend, and a GET
//!    through the proxy to the first and the last backend), after a settle: the same three
//!    latencies, compared with step 1, and the drone's (and its watchdog's) idle CPU use.
//! 4. Every backend hard-terminated, `PLANE_BENCH_STOP_CONCURRENCY` at a time; the time
//!    until all are `terminated`, and no backend process may be left (leftovers are
//!    killed by this run's environment marker, and reported as an error).
//!
//! `RLIMIT_NOFILE` is raised (the drone inherits it); `RLIMIT_NPROC` and
//! `kernel.pid_max` are checked against what `N` backends need.
//!
//! Run: `cargo bench -p plane --bench live_backends` (`PLANE_BENCH_BACKENDS`, default
//! 2000; `PLANE_BENCH_SAMPLES` per latency series, default 300; `PLANE_BENCH_IDLE_SECONDS`,
//! default 20; `PLANE_BENCH_STOP_CONCURRENCY`, default 64; `PLANE_BENCH_PERF_SECONDS`: if
//! set, `perf record -g` of the drone during the final idle window, written to
//! `<out>/live_backends.drone.perf.data`; `PLANE_BENCH_DRONE_BINARY`: another `plane`
//! binary to run the drone, to compare builds).

mod common;

use anyhow::{bail, ensure, Context};
use common::{env_f64, env_usize};
use futures_util::StreamExt;
use plane_tests::{Options, TestCluster};
use plane_types::api::ConnectRequest;
use plane_types::names::BackendName;
use plane_types::status::BackendStatus;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// Marks the processes of this run (value: our pid), so leftovers can be found.
const RUN_MARKER: &str = "PLANE_BENCH_LIVE_BACKENDS_RUN";

const SETUP_WAIT: Duration = Duration::from_secs(60);

/// User plus system CPU seconds of process `pid` (its threads included).
fn cpu_secs(pid: u32) -> anyhow::Result<f64> {
    common::process_cpu_seconds(pid).with_context(|| format!("reading /proc/{pid}/stat"))
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<f64>()
                .ok()
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

/// The processes whose environment has this run's marker, with whether each is a backend
/// (`SESSION_BACKEND_ID` set) and its command line.
fn marked_processes() -> Vec<(u32, bool, String)> {
    let marker = format!("{RUN_MARKER}={}", std::process::id());
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        let mut vars = environ.split(|b| *b == 0);
        if !vars.clone().any(|v| v == marker.as_bytes()) {
            continue;
        }
        // A zombie has an empty command line; it is not running.
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if cmdline.is_empty() {
            continue;
        }
        let backend = vars.any(|v| v.starts_with(b"SESSION_BACKEND_ID="));
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        out.push((pid, backend, cmdline));
    }
    out
}

fn kill_marked() -> usize {
    let mut killed = 0;
    for (pid, _, _) in marked_processes() {
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        killed += usize::from(nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).is_ok());
    }
    killed
}

/// Raises `RLIMIT_NOFILE` to `want` if it is lower; checks `RLIMIT_NPROC` and `pid_max`.
fn check_limits(backends: usize) -> anyhow::Result<()> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let want: u64 = 65_536.max(backends as u64 * 8);
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < want && setrlimit(Resource::RLIMIT_NOFILE, want, want.max(hard)).is_err() {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    let (nofile, _) = getrlimit(Resource::RLIMIT_NOFILE)?;
    // Each demo backend is one process with a few threads (tokio's workers and
    // blocking pool): about 4 tasks each, and the cluster's own.
    let tasks_needed = backends as u64 * 4 + 1024;
    let (nproc, _) = getrlimit(Resource::RLIMIT_NPROC)?;
    let pid_max: u64 = std::fs::read_to_string("/proc/sys/kernel/pid_max")?.trim().parse()?;
    let threads_max: u64 = std::fs::read_to_string("/proc/sys/kernel/threads-max")?
        .trim()
        .parse()?;
    println!(
        "limits: RLIMIT_NOFILE {nofile}, RLIMIT_NPROC {nproc}, pid_max {pid_max}, threads-max {threads_max}; \
         about {tasks_needed} tasks needed"
    );
    ensure!(
        nofile >= backends as u64 * 4,
        "RLIMIT_NOFILE {nofile} is too low for {backends} backends"
    );
    let root = nix::unistd::geteuid().is_root();
    ensure!(
        root || nproc >= tasks_needed,
        "RLIMIT_NPROC {nproc} is too low for {backends} backends"
    );
    ensure!(
        pid_max >= tasks_needed,
        "kernel.pid_max {pid_max} is too low for {backends} backends"
    );
    ensure!(
        threads_max >= tasks_needed,
        "kernel.threads-max {threads_max} is too low"
    );
    Ok(())
}

/// Prints how many of `ids` are in each status, with termination reasons (diagnostics).
async fn print_statuses(tc: &TestCluster, ids: &[BackendName]) {
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for id in ids {
        let what = match tc.store.backend(id).await {
            Ok(Some(b)) => format!(
                "{} {:?} {:?} exit {:?}",
                b.status, b.termination_kind, b.termination_reason, b.exit_code
            ),
            Ok(None) => "missing".into(),
            Err(e) => format!("store error {e}"),
        };
        *counts.entry(what).or_default() += 1;
    }
    eprintln!("backends by status:");
    for (what, count) in counts {
        eprintln!("  {count:>6}  {what}");
    }
}

/// Latency samples (ms) of the three measured operations, interleaved.
struct Latencies {
    health: Vec<f64>,
    connect: Vec<f64>,
    proxy: Vec<f64>,
}

async fn latencies(
    tc: &TestCluster,
    http: &reqwest::Client,
    probe: &ConnectRequest,
    proxy_url: &str,
    samples: usize,
) -> anyhow::Result<Latencies> {
    let health_url = format!("{}/pub/health", tc.controller_url);
    let mut l = Latencies {
        health: Vec::with_capacity(samples),
        connect: Vec::with_capacity(samples),
        proxy: Vec::with_capacity(samples),
    };
    for i in 0..samples + 20 {
        let t = Instant::now();
        let res = http.get(&health_url).send().await?;
        ensure!(res.status() == 200, "health: {}", res.status());
        res.bytes().await?;
        let health = t.elapsed().as_secs_f64() * 1000.0;

        let t = Instant::now();
        let res = tc.client.connect(probe).await?;
        let connect = t.elapsed().as_secs_f64() * 1000.0;
        ensure!(
            !res.spawned && res.status == BackendStatus::Ready,
            "the warm connect was not warm"
        );

        let t = Instant::now();
        let res = tc.http.get(proxy_url).send().await?;
        ensure!(res.status() == 200, "GET through the proxy: {}", res.status());
        res.bytes().await?;
        let proxy = t.elapsed().as_secs_f64() * 1000.0;
        // The first 20 rounds warm connections up.
        if i >= 20 {
            l.health.push(health);
            l.connect.push(connect);
            l.proxy.push(proxy);
        }
    }
    Ok(l)
}

/// CPU use (percent of one core) of `pid` over `window`.
async fn cpu_percent_over(pids: &[u32], window: Duration) -> anyhow::Result<Vec<f64>> {
    let before = pids.iter().map(|p| cpu_secs(*p)).collect::<anyhow::Result<Vec<_>>>()?;
    let start = Instant::now();
    tokio::time::sleep(window).await;
    let wall = start.elapsed().as_secs_f64();
    let after = pids.iter().map(|p| cpu_secs(*p)).collect::<anyhow::Result<Vec<_>>>()?;
    Ok(after.iter().zip(&before).map(|(a, b)| (a - b) * 100.0 / wall).collect())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    std::env::set_var(RUN_MARKER, std::process::id().to_string());
    if std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var("RUST_LOG", "warn");
    }
    let result = run().await;
    let left = kill_marked();
    if left > 0 {
        eprintln!("killed {left} processes left over by this run");
    }
    result
}

async fn run() -> anyhow::Result<()> {
    let binary = env!("CARGO_BIN_EXE_plane");
    let n = env_usize("PLANE_BENCH_BACKENDS", 2000).max(2);
    let samples = env_usize("PLANE_BENCH_SAMPLES", 300).max(1);
    let idle = Duration::from_secs_f64(env_f64("PLANE_BENCH_IDLE_SECONDS", 20.0));
    let stop_concurrency = env_usize("PLANE_BENCH_STOP_CONCURRENCY", 64).max(1);
    let perf_secs = std::env::var("PLANE_BENCH_PERF_SECONDS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok());
    check_limits(n)?;

    let mut options = Options::new(binary);
    options.drone = false;
    options.lease_unit = Duration::from_secs(10);
    options.heartbeat_interval = Duration::from_secs(1);
    options.sweep_interval = Duration::from_secs(1);
    options.startup_timeout = Duration::from_secs(120);
    let tc = TestCluster::start(options).await?;

    // The drone, a process of its own with default timings but a 1 s heartbeat (the
    // controller's unhealthy threshold is 10 heartbeats of the options').
    let db = tc.dir().join("drone.db");
    std::fs::create_dir_all(common::out_dir())?;
    let drone_log_path = common::out_dir().join("live_backends.drone.log");
    let drone_log = std::fs::File::create(&drone_log_path)?;
    let drone_binary = std::env::var("PLANE_BENCH_DRONE_BINARY").unwrap_or_else(|_| binary.to_owned());
    let mut drone = tokio::process::Command::new(&drone_binary)
        .arg("drone")
        .args(["--controller-url", &tc.controller_url, "--cluster", tc.cluster.as_str()])
        .arg("--db")
        .arg(&db)
        .args(["--allow-command", binary, "--heartbeat-interval-ms", "1000"])
        .stdin(Stdio::null())
        .stdout(drone_log.try_clone()?)
        .stderr(drone_log)
        .kill_on_drop(true)
        .spawn()
        .context("starting plane drone")?;
    let drone_pid = drone.id().context("drone pid")?;
    tc.wait_for(|s| s.drones.iter().any(|d| d.ready))
        .await
        .context("the drone did not connect")?;

    let request = |key: String| tc.spawn_request(&key, &[binary, "demo-backend"]);
    let http = reqwest::Client::new();
    let mut r = common::Report::new("live_backends");

    // 1. Baselines with one backend.
    let probe_req = request("live-probe".into());
    let probe = tc.client.connect(&probe_req).await?;
    tc.wait_status(&probe.backend_id, BackendStatus::Ready).await?;
    let probe_url = format!("{}state", probe.url);
    let mut ids: Vec<BackendName> = vec![probe.backend_id.clone()];
    let base = latencies(&tc, &http, &probe_req, &probe_url, samples).await?;
    let watchdog_pid = marked_processes()
        .into_iter()
        .find(|(_, backend, cmd)| !backend && cmd.contains("drone-watchdog"))
        .map(|(pid, _, _)| pid);
    // Past the first metrics sample of the probe.
    let base_cpu = cpu_percent_over(&[drone_pid], idle).await?[0];
    let base_rss = rss_mib(drone_pid);

    // 2. Ramp up to N, one connect after another.
    println!("\nstarting {} more backends, one after another", n - 1);
    let mut ready_ms = Vec::with_capacity(n);
    let fifth = n.div_ceil(5);
    let mut band_start = (Instant::now(), cpu_secs(drone_pid)?);
    let mut band_cpu = Vec::new();
    let ramp_start = Instant::now();
    for i in 1..n {
        let t = Instant::now();
        let res = tc.client.connect(&request(format!("live-{i}"))).await?;
        ensure!(res.spawned, "key live-{i} did not spawn a backend");
        ids.push(res.backend_id.clone());
        let entry = tc
            .wait_status(&res.backend_id, BackendStatus::Ready)
            .await
            .with_context(|| format!("backend {} of {n}", i + 1))?;
        if entry.status != BackendStatus::Ready {
            print_statuses(&tc, &ids).await;
            bail!(
                "backend {} of {n} reached {} instead of ready: {entry:?}",
                i + 1,
                entry.status
            );
        }
        ready_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        let count = i + 1;
        if count % fifth == 0 || count == n {
            let (at, cpu) = band_start;
            let now_cpu = cpu_secs(drone_pid)?;
            let pct = (now_cpu - cpu) * 100.0 / at.elapsed().as_secs_f64();
            band_cpu.push((count, pct));
            println!(
                "  {count:>6} ready after {:>6.1} s; drone CPU {pct:>5.1}% of a core over the band, VmRSS {:.0} MiB",
                ramp_start.elapsed().as_secs_f64(),
                rss_mib(drone_pid)
            );
            band_start = (Instant::now(), now_cpu);
        }
    }
    let ramp_secs = ramp_start.elapsed().as_secs_f64();

    // 3. All N alive: check it, let it settle, measure.
    let state = match tc
        .wait_for(|s| s.drones.iter().any(|d| d.ready && d.backend_count == n as u64))
        .await
    {
        Ok(state) => state,
        Err(err) => {
            print_statuses(&tc, &ids).await;
            return Err(err).context(format!(
                "the controller does not count {n} live backends on the drone (drone log: {})",
                drone_log_path.display()
            ));
        }
    };
    let counted = state.drones.iter().map(|d| d.backend_count).sum::<u64>();
    let mut ready_in_store = 0;
    for id in &ids {
        let b = tc
            .store
            .backend(id)
            .await?
            .context("a backend missing from the store")?;
        ready_in_store += usize::from(b.status == BackendStatus::Ready);
    }
    ensure!(
        ready_in_store == n,
        "{ready_in_store} of {n} backends are ready in the store"
    );
    let processes = marked_processes()
        .into_iter()
        .filter(|(_, backend, _)| *backend)
        .count();
    ensure!(processes == n, "{processes} backend processes run, not {n}");
    let last_url = {
        let last = tc.client.connect(&request(format!("live-{}", n - 1))).await?;
        ensure!(!last.spawned, "the last key has no backend");
        format!("{}state", last.url)
    };
    for url in [&probe_url, &last_url] {
        let res = tc.http.get(url).send().await?;
        ensure!(res.status() == 200, "GET {url} through the proxy: {}", res.status());
    }
    println!(
        "all {n} alive: controller counts {counted}, {ready_in_store} ready in the store, {processes} processes; \
         proxy GETs to the first and last answer 200"
    );

    // Settle: past one metrics period of the last backend.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let mut pids = vec![drone_pid, std::process::id()];
    pids.extend(watchdog_pid);
    let perf = match perf_secs {
        Some(secs) => {
            let out = common::out_dir().join("live_backends.drone.perf.data");
            std::fs::create_dir_all(common::out_dir())?;
            Some(
                tokio::process::Command::new("perf")
                    .args(["record", "-g", "-o"])
                    .arg(&out)
                    .args(["-p", &drone_pid.to_string(), "--", "sleep", &secs.to_string()])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .context("perf record")?,
            )
        }
        None => None,
    };
    let idle_cpu = cpu_percent_over(&pids, idle).await?;
    if let Some(mut perf) = perf {
        perf.wait().await?;
    }
    let end = latencies(&tc, &http, &probe_req, &probe_url, samples).await?;
    let end_rss = rss_mib(drone_pid);

    println!();
    r.value("live backends (ready, one drone)", "count", n as f64);
    r.value(
        "ramp: backends started per second",
        "backends/s",
        (n - 1) as f64 / ramp_secs,
    );
    let band = |lo: usize, hi: usize| ready_ms[lo - 2..hi - 1].to_vec();
    let first = 100.min(n - 1);
    r.series(
        &format!("time to ready, backends 2-{}", first + 1),
        "ms",
        band(2, first + 1),
        2,
    );
    for k in 0..5 {
        let lo = (k * fifth + 1).max(2);
        let hi = ((k + 1) * fifth).min(n);
        if lo <= hi {
            r.series(&format!("time to ready, backends {lo}-{hi}"), "ms", band(lo, hi), 2);
        }
    }
    let last_lo = n.saturating_sub(99).max(2);
    let last_name = format!("time to ready, backends {last_lo}-{n}");
    r.series(&last_name, "ms", band(last_lo, n), 2);
    r.compare(
        "time to ready, last 100 / first 100",
        &last_name,
        &format!("time to ready, backends 2-{}", first + 1),
        false,
    );
    for (count, pct) in &band_cpu {
        println!(
            "{:<44} {pct:.1} % of a core",
            format!("drone CPU while starting, up to {count}")
        );
    }

    let pairs = [
        ("GET /pub/health", base.health, end.health),
        ("warm POST /ctrl/connect", base.connect, end.connect),
        ("GET through the proxy", base.proxy, end.proxy),
    ];
    for (name, at_start, at_end) in pairs {
        let b = format!("baseline: {name}, 1 backend");
        let e = format!("{name}, {n} backends");
        r.series(&b, "ms", at_start, 3);
        r.series(&e, "ms", at_end, 3);
        r.compare(&format!("{name}, {n} backends / 1"), &e, &b, false);
    }
    r.value("baseline: drone CPU idle, 1 backend", "% of a core", base_cpu);
    let drone_idle = r.value(&format!("drone CPU idle, {n} backends"), "% of a core", idle_cpu[0]);
    r.compare(
        &format!("drone idle CPU, {n} backends / 1"),
        &format!("drone CPU idle, {n} backends"),
        "baseline: drone CPU idle, 1 backend",
        false,
    );
    r.value(
        &format!("controller + proxy (bench process) CPU idle, {n} backends"),
        "% of a core",
        idle_cpu[1],
    );
    if watchdog_pid.is_some() {
        r.value(
            &format!("drone watchdog CPU idle, {n} backends"),
            "% of a core",
            idle_cpu[2],
        );
    }
    r.value(
        &format!("drone CPU per idle backend, {n} backends"),
        "% of a core",
        drone_idle / n as f64,
    );
    r.value("baseline: drone VmRSS, 1 backend", "MiB", base_rss);
    r.value(&format!("drone VmRSS, {n} backends"), "MiB", end_rss);

    // 4. Stop all, many at a time.
    let stop_start = Instant::now();
    let client = &tc.client;
    let stopped: Vec<anyhow::Result<()>> = futures_util::stream::iter(ids.iter())
        .map(|id| async move {
            client.hard_terminate(id).await?;
            plane_tests::wait_status_via(client, id, BackendStatus::Terminated).await?;
            Ok(())
        })
        .buffer_unordered(stop_concurrency)
        .collect()
        .await;
    for s in stopped {
        s?;
    }
    let stop_secs = stop_start.elapsed().as_secs_f64();
    r.value(
        &format!("stop all {n}: hard terminate to terminated ({stop_concurrency} at a time)"),
        "s",
        stop_secs,
    );
    let deadline = Instant::now() + SETUP_WAIT;
    loop {
        let left = marked_processes()
            .into_iter()
            .filter(|(_, backend, _)| *backend)
            .count();
        if left == 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("{left} backend processes still run after all were terminated");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("no backend process left");

    r.target("live process backends on one drone", n as f64, "backends", ">=", 2000.0);
    r.finish()?;

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(drone_pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let _ = tokio::time::timeout(SETUP_WAIT, drone.wait()).await;
    let _ = drone.start_kill();
    // The watchdog would exit by itself a minute after its drone; it is ours to stop.
    if let Some(pid) = watchdog_pid {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    tc.shutdown().await
}
