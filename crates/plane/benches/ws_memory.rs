//! Benchmark (not a test): memory per idle WebSocket through one proxy.
//!
//! The controller and the drone run in this process ([`TestCluster`], production-like
//! timings); the measured proxy is a separate `plane proxy` process for the same
//! cluster, so its memory can be read alone from `/proc/<pid>/status` (`VmRSS`,
//! `RssAnon`) and `/proc/<pid>/smaps_rollup` (`Pss`). One demo backend holds the other
//! ends.
//!
//! 1. Warm-up: a GET and a WebSocket through the proxy (route cached, lazy state built),
//!    and `D` direct WebSockets to the backend (the baseline's echo probes).
//! 2. Memory of the proxy, the backend and this process, *before*.
//! 3. `N` WebSockets through the proxy to the backend's `/ws`, `C` handshakes at a time.
//!    Every connection is read to the end of its messages: the demo sends the room state
//!    (with its client count) to everyone on each join, so the setup is proven when every
//!    connection has seen `"clients": N + D`, and the proxy's
//!    `plane_proxy_active_websockets` gauge reads `N`. Then the sockets idle (no byte
//!    flows) for `PLANE_BENCH_IDLE_SECONDS`.
//! 4. Memory *after*; per WebSocket: (after − before) / N. Baselines in the same run: the
//!    demo backend's own memory per WebSocket (it holds the other end, through axum and
//!    tungstenite), and this process's (the tokio-tungstenite clients; the controller and
//!    drone share the process, so it is rougher).
//! 5. Echo RTT at idle-N: WebSocket ping → pong (answered by the backend's socket), on
//!    `P` of the proxied connections, and on the `D` direct ones (baseline).
//! 6. All sockets closed: the proxy's gauge must return to 0; its memory then is printed.
//!
//! `RLIMIT_NOFILE` is raised for this process (so for the backend the drone spawns, which
//! inherits it) and for the proxy (which inherits it too); the proxy needs 2 fds per
//! WebSocket. Where the hard limit cannot be raised (no `CAP_SYS_RESOURCE`) and holds
//! fewer than 10,000, the default opens as many as fit and says so; an explicit
//! `PLANE_BENCH_WEBSOCKETS` that does not fit is an error.
//!
//! Run: `cargo bench -p plane --bench ws_memory` (`PLANE_BENCH_WEBSOCKETS`, default
//! 10000; `PLANE_BENCH_CONCURRENCY` handshakes at a time, default 64;
//! `PLANE_BENCH_IDLE_SECONDS`, default 5; `PLANE_BENCH_PINGS` per series, default 400;
//! `PLANE_BENCH_PROXY_BINARY`: another `plane` binary to run the proxy, to compare builds).

mod common;

use anyhow::{bail, ensure, Context};
use common::{env_f64, env_usize};
use futures_util::{SinkExt, StreamExt};
use plane_tests::{Options, TestCluster};
use plane_types::status::BackendStatus;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

type Ws = WebSocketStream<TcpStream>;

/// Marks the processes of this run (value: our pid), so leftovers can be killed.
const RUN_MARKER: &str = "PLANE_BENCH_WS_MEMORY_RUN";

/// How long setup steps may take.
const SETUP_WAIT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, Default)]
struct Mem {
    rss_kib: f64,
    anon_kib: f64,
    pss_kib: f64,
}

fn status_field(text: &str, field: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn mem_of(pid: u32) -> anyhow::Result<Mem> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("/proc/{pid}/status"))?;
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    Ok(Mem {
        rss_kib: status_field(&status, "VmRSS:").context("VmRSS")?,
        anon_kib: status_field(&status, "RssAnon:").unwrap_or(f64::NAN),
        pss_kib: status_field(&rollup, "Pss:").unwrap_or(f64::NAN),
    })
}

/// Raises the soft `RLIMIT_NOFILE` to `want` (and the hard one, if allowed).
fn raise_nofile(want: u64) -> anyhow::Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft >= want {
        return Ok(soft);
    }
    if setrlimit(Resource::RLIMIT_NOFILE, want, want.max(hard)).is_err() {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(getrlimit(Resource::RLIMIT_NOFILE)?.0)
}

/// The client count in a room-state message (`"clients":n`).
fn clients_in(text: &str) -> Option<u32> {
    let at = text.rfind("\"clients\":")? + "\"clients\":".len();
    let digits: String = text[at..].chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

/// Opens a WebSocket to `url` over a TCP connection to `addr` (the Host comes from `url`).
async fn open_ws(addr: SocketAddr, url: &str) -> anyhow::Result<Ws> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let request = url.into_client_request()?;
    let (ws, response) = tokio_tungstenite::client_async(request, stream).await?;
    ensure!(response.status() == 101, "handshake: {}", response.status());
    Ok(ws)
}

/// Reads `ws` until a room state with `want` clients arrives.
async fn drain_until(ws: &mut Ws, want: u32) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + SETUP_WAIT * 4;
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .context("no room state with every client in time")?;
        match msg {
            Some(Ok(Message::Text(t))) if clients_in(t.as_str()) == Some(want) => return Ok(()),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
            None => bail!("a probe WebSocket closed"),
        }
    }
}

/// Ping → pong round trips on `probes`, round-robin; the sockets must be idle.
async fn ping_rtts(probes: &mut [Ws], n: usize) -> anyhow::Result<Vec<f64>> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let ws = &mut probes[i % probes.len()];
        let payload = (i as u64).to_be_bytes().to_vec();
        let t = Instant::now();
        ws.send(Message::Ping(payload.clone().into())).await?;
        loop {
            match tokio::time::timeout(SETUP_WAIT, ws.next()).await.context("no pong")? {
                Some(Ok(Message::Pong(p))) if p.as_ref() == payload.as_slice() => break,
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                None => bail!("a probe WebSocket closed"),
            }
        }
        out.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(out)
}

/// The proxy's `plane_proxy_active_websockets`.
async fn proxy_websockets(http: &reqwest::Client, proxy: SocketAddr) -> anyhow::Result<i64> {
    let text = http
        .get(format!("http://{proxy}/metrics"))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    text.lines()
        .find_map(|l| l.strip_prefix("plane_proxy_active_websockets "))
        .and_then(|v| v.trim().parse().ok())
        .context("no plane_proxy_active_websockets in /metrics")
}

/// Polls until the proxy's WebSocket gauge reads `want`.
async fn wait_gauge(http: &reqwest::Client, proxy: SocketAddr, want: i64, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let n = proxy_websockets(http, proxy).await?;
        if n == want {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the proxy's WebSocket gauge reads {n}, not {want}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the RSS of `pid` has not changed by more than 1% over 1 s (or 10 s pass).
async fn settled_mem(pid: u32) -> anyhow::Result<Mem> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = mem_of(pid)?;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = mem_of(pid)?;
        if (now.rss_kib - last.rss_kib).abs() <= last.rss_kib * 0.01 || Instant::now() > deadline {
            return Ok(now);
        }
        last = now;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    std::env::set_var(RUN_MARKER, std::process::id().to_string());
    let result = run().await;
    let left = common::kill_pids_with_env(&format!("{RUN_MARKER}={}", std::process::id()));
    if left > 0 {
        eprintln!("killed {left} processes left over by this run");
    }
    result
}

async fn run() -> anyhow::Result<()> {
    let binary = env!("CARGO_BIN_EXE_plane");
    let asked = std::env::var("PLANE_BENCH_WEBSOCKETS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok());
    let concurrency = env_usize("PLANE_BENCH_CONCURRENCY", 64).max(1);
    let idle = Duration::from_secs_f64(env_f64("PLANE_BENCH_IDLE_SECONDS", 5.0));
    let pings = env_usize("PLANE_BENCH_PINGS", 400).max(1);
    let direct_probes = 20usize;
    let proxied_probes = 20usize;

    // The proxy holds 2 fds per WebSocket, the backend (spawned by the drone in this
    // process) and this process one each. Children inherit the limit.
    let nofile = raise_nofile((2 * asked.unwrap_or(10_000) + 1024) as u64)?;

    let mut options = Options::new(binary);
    options.lease_unit = Duration::from_secs(10);
    options.heartbeat_interval = Duration::from_secs(1);
    options.sweep_interval = Duration::from_secs(1);
    let tc = TestCluster::start(options).await?;

    // The measured proxy, a process of its own for the same cluster.
    let proxy_port = plane_tests::free_port();
    let proxy_addr = SocketAddr::from(([127, 0, 0, 1], proxy_port));
    let proxy_log = std::fs::File::create(tc.dir().join("proxy.log"))?;
    let proxy_binary = std::env::var("PLANE_BENCH_PROXY_BINARY").unwrap_or_else(|_| binary.to_owned());
    let mut proxy = tokio::process::Command::new(&proxy_binary)
        .args(["proxy", "--host", "127.0.0.1", "--http-port", &proxy_port.to_string()])
        .args(["--controller-url", &tc.controller_url, "--cluster", tc.cluster.as_str()])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(proxy_log.try_clone()?)
        .stderr(proxy_log)
        .kill_on_drop(true)
        .spawn()
        .context("starting plane proxy")?;
    let proxy_pid = proxy.id().context("proxy pid")?;
    let http = reqwest::Client::new();
    let deadline = Instant::now() + SETUP_WAIT;
    loop {
        let ok = http
            .get(format!("http://{proxy_addr}/ready"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200);
        if ok {
            break;
        }
        ensure!(Instant::now() < deadline, "the proxy did not become ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let res = tc.connect_ready(&tc.demo_request("ws-memory")).await?;
    let backend_addr = tc
        .store
        .backend(&res.backend_id)
        .await?
        .and_then(|b| b.address)
        .context("backend address")?;
    let backend_pid = *common::pids_with_env(&format!("SESSION_BACKEND_ID={}", res.backend_id))
        .first()
        .context("the backend's pid")?;
    let (host, path) = res
        .url
        .strip_prefix("http://")
        .and_then(|u| u.split_once('/'))
        .context("connect URL")?;
    ensure!(host == tc.cluster.as_str(), "unexpected URL host {host}");
    let ws_url = format!("ws://{host}/{path}ws");
    let direct_url = format!("ws://{backend_addr}/ws");

    // Warm-up through the proxy: a GET and a WebSocket.
    for _ in 0..5 {
        let r = http
            .get(format!("http://{proxy_addr}/{path}state"))
            .header("host", host)
            .send()
            .await?;
        ensure!(r.status() == 200, "GET through the proxy: {}", r.status());
        r.bytes().await?;
    }
    for _ in 0..3 {
        let mut ws = open_ws(proxy_addr, &ws_url).await?;
        ws.next().await.context("no first message")??;
        ws.close(None).await?;
        while ws.next().await.is_some() {}
    }
    wait_gauge(&http, proxy_addr, 0, SETUP_WAIT).await?;
    let mut direct = Vec::with_capacity(direct_probes);
    for _ in 0..direct_probes {
        direct.push(open_ws(backend_addr, &direct_url).await?);
    }

    // How many WebSockets the fd limit allows: the proxy needs 2 per WebSocket on top of
    // what it holds now, the backend and this process 1 (`RLIMIT_NOFILE` cannot always be
    // raised: its hard limit needs CAP_SYS_RESOURCE).
    let fds = |pid: u32| std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count()) as u64;
    let margin = 32;
    let fit = [
        nofile.saturating_sub(fds(proxy_pid) + margin) / 2,
        nofile.saturating_sub(fds(backend_pid) + margin),
        nofile.saturating_sub(fds(std::process::id()) + margin),
    ]
    .into_iter()
    .min()
    .unwrap_or(0) as usize;
    let n = match asked {
        Some(n) if n > fit => bail!(
            "PLANE_BENCH_WEBSOCKETS={n} does not fit RLIMIT_NOFILE {nofile} (at most {fit}: the proxy needs 2 fds each)"
        ),
        Some(n) => n.max(1),
        None if fit < 10_000 => {
            println!(
                "\nNOTE: RLIMIT_NOFILE is {nofile} and cannot be raised; the proxy needs 2 fds per WebSocket, so \
                 {fit} WebSockets are opened, not 10000"
            );
            fit
        }
        None => 10_000,
    };
    ensure!(
        n >= 1000,
        "only {n} WebSockets fit RLIMIT_NOFILE {nofile}: too few to measure"
    );
    let want_clients = (n + direct_probes) as u32;

    let me = std::process::id();
    let proxy_before = settled_mem(proxy_pid).await?;
    let backend_before = mem_of(backend_pid)?;
    let client_before = mem_of(me)?;
    println!(
        "\nbefore: proxy VmRSS {:.0} KiB (anon {:.0}, Pss {:.0}); backend VmRSS {:.0} KiB; bench {:.0} KiB",
        proxy_before.rss_kib,
        proxy_before.anon_kib,
        proxy_before.pss_kib,
        backend_before.rss_kib,
        client_before.rss_kib
    );

    // Open N WebSockets through the proxy, C handshakes at a time. Each one but the
    // probes gets a reader task that records the last client count it saw.
    let seen: Arc<Vec<AtomicU32>> = Arc::new((0..n).map(|_| AtomicU32::new(0)).collect());
    let closed = Arc::new(AtomicUsize::new(0));
    let opened_at = Instant::now();
    let mut handshake_ms = Vec::with_capacity(n);
    let mut probes: Vec<Ws> = Vec::with_capacity(proxied_probes);
    let mut readers = Vec::with_capacity(n);
    let mut next = 0usize;
    while next < n {
        let batch = concurrency.min(n - next);
        let opens = (next..next + batch).map(|i| {
            let url = ws_url.clone();
            async move {
                let t = Instant::now();
                let ws = open_ws(proxy_addr, &url)
                    .await
                    .with_context(|| format!("WebSocket {i}"))?;
                Ok::<_, anyhow::Error>((i, ws, t.elapsed().as_secs_f64() * 1000.0))
            }
        });
        for r in futures_util::future::join_all(opens).await {
            let (i, ws, ms) = r?;
            handshake_ms.push(ms);
            if i < proxied_probes {
                probes.push(ws);
                continue;
            }
            let (seen, closed) = (seen.clone(), closed.clone());
            readers.push(tokio::spawn(async move {
                let mut ws = ws;
                while let Some(msg) = ws.next().await {
                    match msg {
                        Ok(Message::Text(t)) => {
                            if let Some(c) = clients_in(t.as_str()) {
                                seen[i].store(c, Ordering::Relaxed);
                            }
                        }
                        Ok(Message::Close(_)) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
                closed.fetch_add(1, Ordering::Relaxed);
            }));
        }
        next += batch;
    }
    let open_secs = opened_at.elapsed().as_secs_f64();
    println!("opened {n} WebSockets in {open_secs:.1} s");

    // Every connection sees the last join: N + D clients, end to end.
    for ws in probes.iter_mut().chain(direct.iter_mut()) {
        drain_until(ws, want_clients).await?;
    }
    let deadline = Instant::now() + SETUP_WAIT * 4;
    loop {
        let behind = (proxied_probes..n)
            .filter(|i| seen[*i].load(Ordering::Relaxed) != want_clients)
            .count();
        ensure!(
            closed.load(Ordering::Relaxed) == 0,
            "{} WebSockets closed during the run",
            closed.load(Ordering::Relaxed)
        );
        if behind == 0 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "{behind} WebSockets never saw the room with {want_clients} clients"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_gauge(&http, proxy_addr, n as i64, SETUP_WAIT).await?;
    println!("all {n} WebSockets live end to end (room shows {want_clients} clients; proxy gauge {n})");

    // Idle, then measure.
    tokio::time::sleep(idle).await;
    let proxy_after = settled_mem(proxy_pid).await?;
    let backend_after = mem_of(backend_pid)?;
    let client_after = mem_of(me)?;
    ensure!(closed.load(Ordering::Relaxed) == 0, "WebSockets closed while idle");
    wait_gauge(&http, proxy_addr, n as i64, SETUP_WAIT).await?;

    let per = |a: f64, b: f64| (a - b) / n as f64;
    let mut r = common::Report::new("ws_memory");
    println!();
    r.value("WebSockets open (idle)", "count", n as f64);
    r.value("open rate", "WebSockets/s", n as f64 / open_secs);
    r.series("handshake through the proxy", "ms", handshake_ms, 3);
    r.value("proxy VmRSS before", "KiB", proxy_before.rss_kib);
    r.value("proxy VmRSS after", "KiB", proxy_after.rss_kib);
    let proxy_rss = r.value(
        "proxy VmRSS per WebSocket",
        "KiB",
        per(proxy_after.rss_kib, proxy_before.rss_kib),
    );
    r.value(
        "proxy RssAnon per WebSocket",
        "KiB",
        per(proxy_after.anon_kib, proxy_before.anon_kib),
    );
    r.value(
        "proxy Pss per WebSocket",
        "KiB",
        per(proxy_after.pss_kib, proxy_before.pss_kib),
    );
    r.value(
        "baseline: demo backend VmRSS per WebSocket",
        "KiB",
        per(backend_after.rss_kib, backend_before.rss_kib),
    );
    r.value(
        "baseline: bench clients VmRSS per WebSocket",
        "KiB",
        per(client_after.rss_kib, client_before.rss_kib),
    );
    r.compare(
        "proxy / demo backend, memory per WebSocket",
        "proxy VmRSS per WebSocket",
        "baseline: demo backend VmRSS per WebSocket",
        false,
    );

    // Echo at idle-N: ping → pong.
    ping_rtts(&mut probes, 20).await?;
    ping_rtts(&mut direct, 20).await?;
    let mut via = Vec::with_capacity(pings);
    let mut straight = Vec::with_capacity(pings);
    for _ in 0..pings / 20 {
        via.extend(ping_rtts(&mut probes, 20).await?);
        straight.extend(ping_rtts(&mut direct, 20).await?);
    }
    r.series("ping RTT through the proxy at idle-N", "ms", via, 3);
    r.series("baseline: ping RTT direct to the backend", "ms", straight, 3);
    r.compare(
        "ping RTT, proxy / direct",
        "ping RTT through the proxy at idle-N",
        "baseline: ping RTT direct to the backend",
        false,
    );
    r.target("proxy memory per idle WebSocket", proxy_rss, "KiB", "<=", 20.0);

    // Close everything; the proxy must let go of every connection.
    for ws in probes.iter_mut().chain(direct.iter_mut()) {
        let _ = ws.close(None).await;
    }
    drop(probes);
    drop(direct);
    for reader in &readers {
        reader.abort();
    }
    for reader in readers {
        let _ = reader.await;
    }
    wait_gauge(&http, proxy_addr, 0, SETUP_WAIT).await?;
    let proxy_closed = settled_mem(proxy_pid).await?;
    println!(
        "after closing all: proxy VmRSS {:.0} KiB ({:+.0} KiB from before)",
        proxy_closed.rss_kib,
        proxy_closed.rss_kib - proxy_before.rss_kib
    );
    r.finish()?;

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(proxy_pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let _ = tokio::time::timeout(SETUP_WAIT, proxy.wait()).await;
    let _ = proxy.start_kill();
    tc.client.hard_terminate(&res.backend_id).await?;
    tc.wait_status(&res.backend_id, BackendStatus::Terminated).await?;
    tc.shutdown().await
}
