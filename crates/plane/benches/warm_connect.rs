//! Benchmark (not a test): warm connect throughput, on SQLite and on PostgreSQL in the
//! same run, each next to the controller's cheapest routes measured interleaved with it.
//!
//! * **warm connect:** `POST /ctrl/connect` for a key whose backend is already `ready`,
//!   so the controller only looks up the key holder and issues a token;
//! * **baselines:** `GET /pub/health` (one trivial store statement: the cheapest route
//!   that exists) and `GET /pub/no-such-route` (a 404 from the router, no store at all:
//!   the floor of HTTP and axum on this machine).
//!
//! Each cluster gets `K` keys whose backends are started and ready first; then its drone
//! is stopped. The backends keep running and keep their keys (leases of 6 minutes, no
//! renewal due during the run), so the warm path is unchanged, but the drone's periodic
//! work (per-backend metrics, heartbeats, renewals) no longer competes for the two cores
//! with the controller. Each drone is started again at the end, re-adopts its backends,
//! and the cluster's shutdown stops them.
//!
//! `C` load-generator tasks (one kept-alive HTTP/1.1 connection each) run on a runtime of
//! their own (threads named `loadgen`), so the CPU time of the load generator, of the
//! rest of this process (controller, proxy, SQLite) and of the PostgreSQL server (all
//! children of its postmaster) is told apart, per request. The series run in rounds,
//! interleaved: every round runs every route on every store.
//!
//! **Store round trips per warm connect** are measured on a third, quiet cluster (no
//! sweep, no drone during the measurement) on a private PostgreSQL server with
//! `pg_stat_statements`, whose store reaches its database through a TCP relay in this
//! process:
//! * the relay parses the wire protocol and counts the client's messages by type and the
//!   server's `ReadyForQuery` answers, one per round trip the client waits for; the
//!   background (the controller's fan-out pings) is measured while idle and subtracted;
//! * `pg_stat_statements` gives the calls of each statement;
//! * `pg_stat_database` gives `xact_commit + xact_rollback` and `tup_inserted`, read
//!   after a wait long enough for every server backend to have flushed its statistics.
//!
//! Run: `cargo bench -p plane --bench warm_connect` (`PLANE_BENCH_CONCURRENCY`, default
//! 32; `PLANE_BENCH_KEYS`, default 100; `PLANE_BENCH_SECONDS` per series, default 4, split
//! over `PLANE_BENCH_ROUNDS`, default 2; `PLANE_BENCH_COUNT_CONNECTS`, default 2000;
//! `PLANE_BENCH_STATS_FLUSH_SECONDS`, default 11).

mod common;

use common::{clock_tick, env_f64, env_usize, proc_stat, Report};

use anyhow::{bail, ensure, Context};
use plane_tests::{Options, TestCluster};
use plane_types::api::ConnectResponse;
use plane_types::names::BackendName;
use plane_types::status::BackendStatus;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A route under load.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    NotFound,
    Health,
    Connect,
}

impl Route {
    const ALL: [Route; 3] = [Route::NotFound, Route::Health, Route::Connect];

    fn label(self) -> &'static str {
        match self {
            Route::NotFound => "GET /pub/no-such-route (404)",
            Route::Health => "GET /pub/health",
            Route::Connect => "POST /ctrl/connect (warm)",
        }
    }
}

/// One controller under load: its clients (one kept-alive connection each) and the
/// connect bodies of its keys, whose backends are ready.
struct Target {
    store: &'static str,
    url: String,
    clients: Vec<reqwest::Client>,
    bodies: Arc<Vec<Vec<u8>>>,
    /// The PostgreSQL server's postmaster, whose processes' CPU time is counted.
    postmaster: Option<u32>,
}

/// Everything a series measured.
#[derive(Default)]
struct Series {
    latencies_ms: Vec<f64>,
    wall: Duration,
    cpu: Cpu,
}

impl Series {
    fn add(&mut self, other: Series) {
        self.latencies_ms.extend(other.latencies_ms);
        self.wall += other.wall;
        self.cpu.add(&other.cpu);
    }

    fn rate(&self) -> f64 {
        self.latencies_ms.len() as f64 / self.wall.as_secs_f64()
    }
}

/// CPU time in seconds: this process's `loadgen` threads, its other threads (controller,
/// drone, proxy, SQLite), and the PostgreSQL server's processes.
#[derive(Default, Clone, Copy)]
struct Cpu {
    loadgen: f64,
    plane: f64,
    postgres: f64,
}

impl Cpu {
    fn read(postmaster: Option<u32>) -> Cpu {
        let tick = clock_tick();
        let (mut loadgen, mut plane) = (0u64, 0u64);
        if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
            for task in tasks.flatten() {
                let Some((comm, fields)) = proc_stat(&task.path().join("stat")) else {
                    continue;
                };
                let ticks = fields[11] + fields[12];
                if comm.starts_with("loadgen") {
                    loadgen += ticks;
                } else {
                    plane += ticks;
                }
            }
        }
        let mut postgres = 0u64;
        if let Some(pm) = postmaster {
            for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
                let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
                    continue;
                };
                let Some((_, fields)) = proc_stat(&entry.path().join("stat")) else {
                    continue;
                };
                if pid == pm || fields[1] == u64::from(pm) {
                    postgres += fields[11] + fields[12];
                }
            }
        }
        Cpu {
            loadgen: loadgen as f64 / tick,
            plane: plane as f64 / tick,
            postgres: postgres as f64 / tick,
        }
    }

    fn since(self, before: Cpu) -> Cpu {
        Cpu {
            loadgen: self.loadgen - before.loadgen,
            plane: self.plane - before.plane,
            postgres: self.postgres - before.postgres,
        }
    }

    fn add(&mut self, other: &Cpu) {
        self.loadgen += other.loadgen;
        self.plane += other.plane;
        self.postgres += other.postgres;
    }
}

/// Runs `route` against `target` with every client for `duration`.
async fn run_series(
    loadgen: &tokio::runtime::Handle,
    target: &Target,
    route: Route,
    duration: Duration,
) -> anyhow::Result<Series> {
    let concurrency = target.clients.len();
    let cpu_before = Cpu::read(target.postmaster);
    let start = Instant::now();
    let deadline = start + duration;
    let mut workers = Vec::with_capacity(concurrency);
    for (worker, client) in target.clients.iter().enumerate() {
        let client = client.clone();
        let bodies = target.bodies.clone();
        let url = match route {
            Route::NotFound => format!("{}/pub/no-such-route", target.url),
            Route::Health => format!("{}/pub/health", target.url),
            Route::Connect => format!("{}/ctrl/connect", target.url),
        };
        workers.push(loadgen.spawn(async move {
            let mut latencies = Vec::with_capacity(4096);
            let mut key = worker;
            while Instant::now() < deadline {
                let t = Instant::now();
                let req = match route {
                    Route::Connect => client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(bodies[key % bodies.len()].clone()),
                    _ => client.get(&url),
                };
                let res = req.send().await?;
                let status = res.status();
                let body = res.bytes().await?;
                let ok = match route {
                    Route::NotFound => status == 404,
                    Route::Health => status == 200,
                    Route::Connect => status == 200 && contains(&body, b"\"spawned\":false"),
                };
                if !ok {
                    bail!(
                        "{} (worker {worker}, request {}): {status} {}",
                        route.label(),
                        latencies.len(),
                        String::from_utf8_lossy(&body)
                    );
                }
                latencies.push(t.elapsed().as_secs_f64() * 1000.0);
                key += concurrency;
            }
            Ok::<_, anyhow::Error>(latencies)
        }));
    }
    let mut series = Series::default();
    for w in workers {
        series.latencies_ms.extend(w.await??);
    }
    series.wall = start.elapsed();
    series.cpu = Cpu::read(target.postmaster).since(cpu_before);
    Ok(series)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Starts a cluster on `postgres_url` (or SQLite) with `keys` ready backends, then
/// stops its drone (the backends keep running and keep their keys; see the module docs).
async fn cluster_with_keys(
    binary: &str,
    postgres_url: Option<String>,
    keys: usize,
    prefix: &str,
    sweep_interval: Duration,
) -> anyhow::Result<(Cluster, Vec<Vec<u8>>)> {
    let mut options = Options::new(binary);
    // Key leases of 6 minutes: no renewal is due while the drone is stopped.
    options.lease_unit = Duration::from_secs(60);
    options.heartbeat_interval = Duration::from_secs(1);
    options.sweep_interval = sweep_interval;
    options.keepalive_interval = Duration::from_secs(1);
    options.postgres_url = postgres_url;
    let mut tc = TestCluster::start(options).await?;
    let executable = serde_json::json!({
        "command": ["plane", "demo-backend"],
        "env": { RUN_MARKER: std::process::id().to_string() },
    });
    let requests: Vec<_> = (0..keys)
        .map(|i| tc.executable_request(&format!("{prefix}-{i}"), executable.clone()))
        .collect();
    // A few at a time: the drone starts them in parallel.
    let mut ids = Vec::with_capacity(keys);
    for chunk in requests.chunks(16) {
        let started = futures_util::future::try_join_all(chunk.iter().map(|r| tc.connect_ready(r)))
            .await
            .with_context(|| format!("starting the backends of the {prefix} cluster"))?;
        ensure!(started.iter().all(|r| r.spawned), "a key was already held");
        ids.extend(started.into_iter().map(|r| r.backend_id));
    }
    tc.stop_drone().await?;
    let bodies = requests.iter().map(serde_json::to_vec).collect::<Result<Vec<_>, _>>()?;
    Ok((Cluster { tc, ids }, bodies))
}

/// A cluster and the backends started on it.
struct Cluster {
    tc: TestCluster,
    ids: Vec<BackendName>,
}

/// Starts the drone again (it re-adopts the backends), stops the backends (many at a
/// time: [`TestCluster::shutdown`] does it one by one), then the cluster.
async fn shut_down(cluster: Cluster) -> anyhow::Result<()> {
    let Cluster { mut tc, ids } = cluster;
    tc.start_drone().await?;
    for chunk in ids.chunks(32) {
        futures_util::future::try_join_all(chunk.iter().map(|id| async {
            tc.client.hard_terminate(id).await?;
            tc.wait_status(id, BackendStatus::Terminated).await
        }))
        .await?;
    }
    tc.shutdown().await
}

fn clients(concurrency: usize) -> anyhow::Result<Vec<reqwest::Client>> {
    (0..concurrency)
        .map(|_| {
            reqwest::Client::builder()
                .tcp_nodelay(true)
                .pool_max_idle_per_host(1)
                .build()
                .map_err(Into::into)
        })
        .collect()
}

/// Counts of PostgreSQL protocol messages seen by the relay, by type byte.
struct Wire {
    /// Client → server (`[0]`: untyped startup messages).
    up: [AtomicU64; 256],
    /// Server → client.
    down: [AtomicU64; 256],
}

/// A snapshot of [`Wire`].
#[derive(Clone, Copy)]
struct WireCounts {
    up: [u64; 256],
    down: [u64; 256],
}

impl Wire {
    fn new() -> Wire {
        Wire {
            up: std::array::from_fn(|_| AtomicU64::new(0)),
            down: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    fn snapshot(&self) -> WireCounts {
        WireCounts {
            up: std::array::from_fn(|i| self.up[i].load(Ordering::Relaxed)),
            down: std::array::from_fn(|i| self.down[i].load(Ordering::Relaxed)),
        }
    }
}

impl WireCounts {
    fn since(&self, before: &WireCounts) -> WireCounts {
        WireCounts {
            up: std::array::from_fn(|i| self.up[i] - before.up[i]),
            down: std::array::from_fn(|i| self.down[i] - before.down[i]),
        }
    }

    fn up(&self, t: u8) -> u64 {
        self.up[t as usize]
    }

    fn down(&self, t: u8) -> u64 {
        self.down[t as usize]
    }

    fn total_up(&self) -> u64 {
        self.up.iter().sum()
    }
}

/// Splits a PostgreSQL protocol stream into messages, across reads: a type byte (absent
/// on the client's startup and SSL/GSS requests) and a 4-byte big-endian length that
/// includes itself.
struct Scanner {
    typed: bool,
    header: [u8; 5],
    have: usize,
    skip: usize,
}

impl Scanner {
    fn new(typed: bool) -> Scanner {
        Scanner {
            typed,
            header: [0; 5],
            have: 0,
            skip: 0,
        }
    }

    fn feed(&mut self, mut data: &[u8], counts: &[AtomicU64; 256]) {
        while !data.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = &data[n..];
                continue;
            }
            let need = if self.typed { 5 } else { 4 };
            let n = (need - self.have).min(data.len());
            self.header[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have < need {
                return;
            }
            self.have = 0;
            let (kind, len) = if self.typed {
                let len = u32::from_be_bytes(self.header[1..5].try_into().expect("4 bytes"));
                (self.header[0], len)
            } else {
                let len = u32::from_be_bytes(self.header[0..4].try_into().expect("4 bytes"));
                // An SSL or GSS request (8 bytes) is followed by another untyped message.
                self.typed = len != 8;
                (0, len)
            };
            counts[kind as usize].fetch_add(1, Ordering::Relaxed);
            self.skip = (len as usize).saturating_sub(4);
        }
    }
}

/// Relays loopback TCP connections to `upstream`, counting protocol messages in `wire`.
async fn relay(listener: TcpListener, upstream: SocketAddr, wire: Arc<Wire>) {
    async fn pump(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        mut scanner: Scanner,
        wire: Arc<Wire>,
        up: bool,
    ) {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            scanner.feed(&buf[..n], if up { &wire.up } else { &wire.down });
            if to.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    }
    while let Ok((client, _)) = listener.accept().await {
        let Ok(server) = TcpStream::connect(upstream).await else {
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let (cr, cw) = client.into_split();
        let (sr, sw) = server.into_split();
        tokio::spawn(pump(cr, sw, Scanner::new(false), wire.clone(), true));
        tokio::spawn(pump(sr, cw, Scanner::new(true), wire.clone(), false));
    }
}

/// Statistics of one database from `pg_stat_database`.
#[derive(Clone, Copy)]
struct DbStats {
    xacts: i64,
    inserted: i64,
}

async fn db_stats(monitor: &mut sqlx::PgConnection, database: &str) -> anyhow::Result<DbStats> {
    use sqlx::Row;
    let row = sqlx::query(
        "SELECT (xact_commit + xact_rollback)::int8 AS xacts, tup_inserted::int8 AS inserted \
         FROM pg_stat_database WHERE datname = $1",
    )
    .bind(database)
    .fetch_one(&mut *monitor)
    .await?;
    Ok(DbStats {
        xacts: row.try_get("xacts")?,
        inserted: row.try_get("inserted")?,
    })
}

/// Calls per statement (`pg_stat_statements`, by query id) in one database.
type Statements = HashMap<i64, (String, i64)>;

async fn statements(monitor: &mut sqlx::PgConnection, database: &str) -> anyhow::Result<Statements> {
    use sqlx::Row;
    let rows = sqlx::query(
        "SELECT COALESCE(queryid, 0)::int8 AS id, query, calls::int8 AS calls FROM pg_stat_statements \
         WHERE dbid = (SELECT oid FROM pg_database WHERE datname = $1)",
    )
    .bind(database)
    .fetch_all(&mut *monitor)
    .await?;
    rows.iter()
        .map(|r| Ok((r.try_get("id")?, (r.try_get("query")?, r.try_get("calls")?))))
        .collect()
}

/// The quiet cluster whose store goes through the counting relay, on a private server
/// with `pg_stat_statements`.
struct Counting {
    cluster: Cluster,
    database: String,
    bodies: Arc<Vec<Vec<u8>>>,
    clients: Vec<reqwest::Client>,
    wire: Arc<Wire>,
    relay: tokio::task::JoinHandle<()>,
    monitor: sqlx::PgConnection,
    /// When the store was last used by anything but the background.
    last_activity: Instant,
    /// The relay's counts when the store became idle.
    idle_since: (Instant, WireCounts),
    /// The private server, stopped and deleted on drop.
    _server: plane_test_postgres::TestPostgres,
}

/// What one counting window measured.
struct Counted {
    connects: u64,
    wire: WireCounts,
    background: WireCounts,
    background_secs: f64,
    window_secs: f64,
    statements: Vec<(String, i64)>,
    stats_before: DbStats,
}

/// `n` warm connects through `clients`, sequentially per client; returns when done.
async fn connects(
    loadgen: &tokio::runtime::Handle,
    clients: &[reqwest::Client],
    url: &str,
    bodies: &Arc<Vec<Vec<u8>>>,
    n: usize,
) -> anyhow::Result<()> {
    let mut workers = Vec::new();
    for (worker, client) in clients.iter().enumerate() {
        let (client, bodies, url) = (client.clone(), bodies.clone(), format!("{url}/ctrl/connect"));
        let share = n / clients.len() + usize::from(worker < n % clients.len());
        workers.push(loadgen.spawn(async move {
            for i in 0..share {
                let res = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(bodies[(worker + i) % bodies.len()].clone())
                    .send()
                    .await?;
                ensure!(res.status() == 200, "connect: {}", res.status());
                let res: ConnectResponse = res.json().await?;
                ensure!(!res.spawned, "a warm connect spawned a backend");
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for w in workers {
        w.await??;
    }
    Ok(())
}

fn print_table(target: &Target, series: &[(Route, Series)]) {
    println!(
        "\n{} store, C={} clients, K={} keys",
        target.store,
        target.clients.len(),
        target.bodies.len()
    );
    println!(
        "{:<30} {:>8} {:>9} {:>8} {:>8} {:>8} {:>8} | {:>8} {:>8} {:>8}",
        "route", "requests", "req/s", "p50 ms", "p99 ms", "max ms", "mean ms", "loadgen", "plane", "postgres"
    );
    for (route, s) in series {
        let mut ms = s.latencies_ms.clone();
        ms.sort_by(|a, b| a.total_cmp(b));
        let summary = common::summarize(ms.clone());
        let per = |secs: f64| secs * 1e6 / ms.len() as f64;
        let postgres = if target.postmaster.is_some() {
            format!("{:>8.0}", per(s.cpu.postgres))
        } else {
            format!("{:>8}", "-")
        };
        println!(
            "{:<30} {:>8} {:>9.0} {:>8.3} {:>8.3} {:>8.3} {:>8.3} | {:>8.0} {:>8.0} {}",
            route.label(),
            summary.n,
            s.rate(),
            summary.p50,
            summary.p99,
            ms.last().copied().unwrap_or(0.0),
            summary.mean,
            per(s.cpu.loadgen),
            per(s.cpu.plane),
            postgres,
        );
    }
    println!("{:<30} (CPU columns: µs of CPU time per request)", "");
    let rate = |r: Route| {
        series
            .iter()
            .find(|(x, _)| *x == r)
            .map(|(_, s)| s.rate())
            .unwrap_or(f64::NAN)
    };
    println!(
        "{:<30} connect/health x{:.2}  connect/404 x{:.2}",
        "throughput ratio",
        rate(Route::Connect) / rate(Route::Health),
        rate(Route::Connect) / rate(Route::NotFound)
    );
}

/// Round trips (server `ReadyForQuery`) per connect, minus the scaled background.
fn counted_round_trips(c: &Counted) -> f64 {
    let scale = c.window_secs / c.background_secs;
    (c.wire.down(b'Z') as f64 - c.background.down(b'Z') as f64 * scale) / c.connects as f64
}

fn print_counted(c: &Counted, after: &DbStats) {
    let n = c.connects as f64;
    let w = &c.wire;
    // Subtract the background seen in the idle window, scaled to the counting window.
    let scale = c.window_secs / c.background_secs;
    let net = |v: u64, bg: u64| {
        let per = (v as f64 - bg as f64 * scale) / n;
        // Not "-0.000" when the background estimate overshoots a little.
        if per.abs() < 0.0005 {
            0.0
        } else {
            per
        }
    };
    println!(
        "\nstore round trips per warm connect, PostgreSQL (n = {} connects in {:.2} s)",
        c.connects, c.window_secs
    );
    println!("wire protocol, counted by the relay, minus the background:");
    let rows: [(&str, u64, u64); 8] = [
        (
            "round trips (server ReadyForQuery)",
            w.down(b'Z'),
            c.background.down(b'Z'),
        ),
        ("  Sync", w.up(b'S'), c.background.up(b'S')),
        ("  simple Query", w.up(b'Q'), c.background.up(b'Q')),
        ("  Bind", w.up(b'B'), c.background.up(b'B')),
        ("  Execute", w.up(b'E'), c.background.up(b'E')),
        ("  Parse (statement cache misses)", w.up(b'P'), c.background.up(b'P')),
        ("  new connections", w.up(0), c.background.up(0)),
        ("  client messages in all", w.total_up(), c.background.total_up()),
    ];
    for (name, v, bg) in rows {
        println!("  {name:<40} {:>8.3}", net(v, bg));
    }
    println!(
        "  {:<40} {} round trips, {} client messages in {:.1} s idle",
        "background (subtracted, scaled)",
        c.background.down(b'Z'),
        c.background.total_up(),
        c.background_secs
    );
    println!("statements (pg_stat_statements calls per connect, background included):");
    for (query, calls) in &c.statements {
        let query: String = query.split_whitespace().collect::<Vec<_>>().join(" ");
        let query = if query.chars().count() > 90 {
            format!("{}…", query.chars().take(90).collect::<String>())
        } else {
            query
        };
        println!("  {:>8.3}  {query}", *calls as f64 / n);
    }
    let b = &c.stats_before;
    println!(
        "pg_stat_database per connect (background included): xact_commit + xact_rollback {:.3}, tup_inserted {:.3}",
        (after.xacts - b.xacts) as f64 / n,
        (after.inserted - b.inserted) as f64 / n,
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let binary = env!("CARGO_BIN_EXE_plane");
    let concurrency = env_usize("PLANE_BENCH_CONCURRENCY", 32).max(1);
    let keys = env_usize("PLANE_BENCH_KEYS", 100).max(1);
    let rounds = env_usize("PLANE_BENCH_ROUNDS", 2).max(1);
    let series_secs = env_f64("PLANE_BENCH_SECONDS", 4.0);
    let count_connects = env_usize("PLANE_BENCH_COUNT_CONNECTS", 2000).max(1);
    let flush_wait = Duration::from_secs_f64(env_f64("PLANE_BENCH_STATS_FLUSH_SECONDS", 11.0));
    let slice = Duration::from_secs_f64(series_secs / rounds as f64);

    if std::env::var_os("RUST_LOG").is_none() {
        // Under load sqlx warns about every slow pool acquire; the latencies are reported.
        std::env::set_var("RUST_LOG", "warn,sqlx::pool::acquire=error,sqlx::query=error");
    }
    // The load generator's own runtime, so its CPU time can be told apart.
    let loadgen_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("loadgen")
        .enable_all()
        .build()?;
    let config = Config {
        binary,
        concurrency,
        keys,
        rounds,
        count_connects,
        flush_wait,
        slice,
    };
    let result = run(loadgen_rt.handle().clone(), config).await;
    // A runtime cannot be dropped (blocking) inside another one.
    loadgen_rt.shutdown_background();
    // Backends outlive their drone: after a failure, stop those this run started.
    let left = common::kill_pids_with_env(&format!("{RUN_MARKER}={}", std::process::id()));
    if left > 0 {
        eprintln!("killed {left} backend processes left over by this run");
    }
    result
}

/// The environment variable that marks the backends of this run (its value: our pid).
const RUN_MARKER: &str = "PLANE_BENCH_WARM_CONNECT_RUN";

struct Config {
    binary: &'static str,
    concurrency: usize,
    keys: usize,
    rounds: usize,
    count_connects: usize,
    flush_wait: Duration,
    slice: Duration,
}

async fn run(loadgen: tokio::runtime::Handle, config: Config) -> anyhow::Result<()> {
    let Config {
        binary,
        concurrency,
        keys,
        rounds,
        count_connects,
        flush_wait,
        slice,
    } = config;
    let mut counting = counting_cluster(&loadgen, binary, concurrency).await?;

    // The measured clusters; their PostgreSQL is the server shared by this binary.
    let pg = tokio::task::block_in_place(plane_test_postgres::TestPostgres::database)?;
    let postmaster = common::postmaster_pid(&pg.log_path())?;
    let sweep = Duration::from_secs(1);
    let (sqlite_cluster, sqlite_bodies) = cluster_with_keys(binary, None, keys, "sqlite", sweep).await?;
    let (pg_cluster, pg_bodies) = cluster_with_keys(binary, Some(pg.url()), keys, "postgres", sweep).await?;
    let targets = [
        Target {
            store: "SQLite",
            url: sqlite_cluster.tc.controller_url.clone(),
            clients: clients(concurrency)?,
            bodies: Arc::new(sqlite_bodies),
            postmaster: None,
        },
        Target {
            store: "PostgreSQL",
            url: pg_cluster.tc.controller_url.clone(),
            clients: clients(concurrency)?,
            bodies: Arc::new(pg_bodies),
            postmaster,
        },
    ];

    // Warm-up: connections, pools, statement caches.
    for t in &targets {
        for route in Route::ALL {
            run_series(&loadgen, t, route, Duration::from_millis(300)).await?;
        }
    }

    let mut results: Vec<Vec<(Route, Series)>> = targets
        .iter()
        .map(|_| Route::ALL.iter().map(|r| (*r, Series::default())).collect())
        .collect();
    let mut counted = None;
    for round in 0..rounds {
        for (t, res) in targets.iter().zip(results.iter_mut()) {
            for (route, acc) in res.iter_mut() {
                acc.add(run_series(&loadgen, t, *route, slice).await?);
            }
        }
        if round == 0 {
            // Between rounds, so that the statistics' flush wait overlaps with a round.
            counted = Some(count_round_trips(&loadgen, &mut counting, count_connects, flush_wait).await?);
        }
    }
    let counted = counted.expect("counted after the first round");

    println!(
        "\nwarm connect throughput: {rounds} round(s) of {:.1} s per series, interleaved",
        slice.as_secs_f64()
    );
    for (t, res) in targets.iter().zip(&results) {
        print_table(t, res);
    }
    let mut report = Report::new("warm_connect");
    println!();
    for (t, res) in targets.iter().zip(&results) {
        for (route, series) in res {
            report.value(&format!("{}: {}", t.store, route.label()), "req/s", series.rate());
        }
        report.compare(
            &format!("{}: warm connect against the cheapest store route", t.store),
            &format!("{}: {}", t.store, Route::Connect.label()),
            &format!("{}: {}", t.store, Route::Health.label()),
            true,
        );
    }
    let pg_connect = results[1][2].1.rate();
    report.target("warm connects/s on PostgreSQL", pg_connect, "req/s", ">=", 2000.0);

    // The statistics of the counting window, once every backend has flushed them.
    let settle = (counting.last_activity + flush_wait).saturating_duration_since(Instant::now());
    tokio::time::sleep(settle).await;
    let after = db_stats(&mut counting.monitor, &counting.database).await?;
    print_counted(&counted, &after);
    report.value(
        "PostgreSQL round trips per warm connect",
        "round trips",
        counted_round_trips(&counted),
    );
    report.finish()?;

    for tc in [sqlite_cluster, pg_cluster, counting.cluster] {
        shut_down(tc).await?;
    }
    counting.relay.abort();
    Ok(())
}

/// The counting cluster: a private PostgreSQL server with `pg_stat_statements`, reached
/// through the relay; 10 ready keys, warm statement caches, and its drone stopped.
async fn counting_cluster(
    loadgen: &tokio::runtime::Handle,
    binary: &str,
    concurrency: usize,
) -> anyhow::Result<Counting> {
    use sqlx::Connection;
    let pg = tokio::task::block_in_place(plane_test_postgres::TestPostgres::start)?;
    let admin = format!("postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable", pg.port());
    let mut monitor = sqlx::PgConnection::connect(&admin).await?;
    sqlx::raw_sql("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
        .execute(&mut monitor)
        .await?;
    monitor.close().await?;
    tokio::task::block_in_place(|| pg.restart())?;
    let mut monitor = sqlx::PgConnection::connect(&admin).await?;
    sqlx::raw_sql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .execute(&mut monitor)
        .await?;

    let wire = Arc::new(Wire::new());
    let relay_listener = TcpListener::bind("127.0.0.1:0").await?;
    let relay_url = format!(
        "postgres://postgres@{}/{}?sslmode=disable",
        relay_listener.local_addr()?,
        pg.database_name()
    );
    let relay = tokio::spawn(relay(
        relay_listener,
        SocketAddr::from(([127, 0, 0, 1], pg.port())),
        wire.clone(),
    ));
    let (cluster, bodies) = cluster_with_keys(binary, Some(relay_url), 10, "count", Duration::from_secs(600)).await?;
    let bodies = Arc::new(bodies);
    let clients = clients(concurrency)?;
    // Warm every pooled store connection's statement cache.
    connects(loadgen, &clients, &cluster.tc.controller_url, &bodies, 500).await?;
    let idle_since = (Instant::now(), wire.snapshot());
    Ok(Counting {
        database: pg.database_name().to_owned(),
        cluster,
        bodies,
        clients,
        wire,
        relay,
        monitor,
        last_activity: Instant::now(),
        idle_since,
        _server: pg,
    })
}

/// Waits until the counting store has been idle for `flush_wait`, then counts the
/// protocol messages, statements and statistics of `n` warm connects.
async fn count_round_trips(
    loadgen: &tokio::runtime::Handle,
    counting: &mut Counting,
    n: usize,
    flush_wait: Duration,
) -> anyhow::Result<Counted> {
    let settle = (counting.last_activity + flush_wait).saturating_duration_since(Instant::now());
    tokio::time::sleep(settle).await;
    let stats_before = db_stats(&mut counting.monitor, &counting.database).await?;
    let statements_before = statements(&mut counting.monitor, &counting.database).await?;
    let before = counting.wire.snapshot();
    let background = before.since(&counting.idle_since.1);
    let background_secs = counting.idle_since.0.elapsed().as_secs_f64();
    let start = Instant::now();
    connects(
        loadgen,
        &counting.clients,
        &counting.cluster.tc.controller_url,
        &counting.bodies,
        n,
    )
    .await?;
    let window_secs = start.elapsed().as_secs_f64();
    let wire = counting.wire.snapshot().since(&before);
    let statements_after = statements(&mut counting.monitor, &counting.database).await?;
    counting.last_activity = Instant::now();
    let mut statements: Vec<(String, i64)> = statements_after
        .iter()
        .map(|(id, (query, calls))| {
            let before = statements_before.get(id).map(|(_, c)| *c).unwrap_or(0);
            (query.clone(), calls - before)
        })
        .filter(|(_, calls)| *calls > 0)
        .collect();
    statements.sort_by_key(|(_, calls)| std::cmp::Reverse(*calls));
    Ok(Counted {
        connects: n as u64,
        wire,
        background,
        background_secs,
        window_secs,
        statements,
        stats_before,
    })
}
