//! The fault-injection suite: a whole cluster of real `plane` processes on one real
//! PostgreSQL — two controllers, three drones (process runtime, each behind TCP relays
//! the harness can cut), one proxy — under a connect storm over a few keys, while the
//! harness kills -9 and restarts controllers and drones (for less and for more than a
//! lease), partitions drones from every controller, and restarts PostgreSQL. Then it
//! heals everything, lets the cluster settle, and runs the checks of [`check`].
//!
//! `cargo test -p plane --test chaos` runs it for `PLANE_CHAOS_SECONDS` (default 120);
//! the 10-minute run of the closing notes is
//! `PLANE_CHAOS_SECONDS=600 cargo test --release -p plane --test chaos -- --nocapture`.
//! `PLANE_CHAOS_SEED` replays a fault schedule; `PLANE_CHAOS_KEEP=1` keeps the run's
//! directory (every process's log, the journals and the lifecycle log), which is kept
//! anyway when a check fails; `PLANE_CHAOS_NO_WATCHDOG=1` starts the drones without
//! their watchdog, to see the checker catch two live backends of one key.

mod check;
mod relay;

use check::StoredBackend;
use plane_test_postgres::TestPostgres;
use plane_tests::free_port;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use relay::Relay;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const PLANE: &str = env!("CARGO_BIN_EXE_plane");

/// The key lease: renew at 3 s, the drone stops its backends at 4 s (soft) and 5 s
/// (hard) without renewal, the key can move at 6 s.
const LEASE_MS: u64 = 6_000;
const KEYS: usize = 24;
const WORKERS: usize = 6;
const DRONES: usize = 3;
const CONTROLLERS: usize = 2;

/// One `plane` process the harness starts, kills and restarts.
struct Proc {
    name: String,
    args: Vec<String>,
    log: PathBuf,
    child: Option<tokio::process::Child>,
    starts: u32,
}

impl Proc {
    fn new(name: impl Into<String>, args: Vec<String>, dir: &Path) -> Proc {
        let name = name.into();
        Proc {
            log: dir.join(format!("{name}.log")),
            name,
            args,
            child: None,
            starts: 0,
        }
    }

    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open a process log");
        let child = tokio::process::Command::new(PLANE)
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.name));
        self.child = Some(child);
        self.starts += 1;
    }

    /// SIGKILL, and wait for the exit.
    async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }

    /// Fails the run if the process exited by itself (a crash).
    fn check_alive(&mut self) {
        if let Some(c) = self.child.as_mut() {
            if let Ok(Some(status)) = c.try_wait() {
                panic!("{} exited by itself ({status}); see {}", self.name, self.log.display());
            }
        }
    }
}

#[derive(Default)]
struct Stats {
    connects: AtomicU64,
    connect_errors: AtomicU64,
    spawns: AtomicU64,
    proxied: AtomicU64,
    terminations: AtomicU64,
}

struct Faults {
    controller_kills: u32,
    drone_kills_short: u32,
    drone_kills_past_lease: u32,
    partitions: u32,
    postgres_restarts: u32,
}

fn arg(s: impl ToString) -> String {
    s.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos() {
    plane_tests::init_logging();
    let seconds: u64 = std::env::var("PLANE_CHAOS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    let seed: u64 = std::env::var("PLANE_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("chaos: {seconds} s, seed {seed} (PLANE_CHAOS_SEED to replay the fault schedule)");
    let mut rng = StdRng::seed_from_u64(seed);

    let tmp = tempfile::Builder::new().prefix("plane-chaos-").tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let lifecycle_dir = dir.join("lifecycle");
    std::fs::create_dir_all(&lifecycle_dir).unwrap();
    let pg = tokio::task::spawn_blocking(TestPostgres::start)
        .await
        .unwrap()
        .expect("the chaos suite needs PostgreSQL (initdb, pg_ctl) to start");
    let db_url = pg.url();
    let ok = tokio::process::Command::new(PLANE)
        .args(["migrate", "--db", &db_url])
        .status()
        .await
        .unwrap();
    assert!(ok.success(), "plane migrate failed");

    let proxy_port = free_port();
    let cluster = format!("localhost:{proxy_port}");
    let controller_ports: Vec<u16> = (0..CONTROLLERS).map(|_| free_port()).collect();
    let controller_urls: Vec<String> = controller_ports
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    let mut controllers: Vec<Proc> = controller_ports
        .iter()
        .enumerate()
        .map(|(i, port)| {
            let args = [
                "controller",
                "--db",
                &db_url,
                "--port",
                &port.to_string(),
                "--default-cluster",
                &cluster,
                "--lease-ms",
                &LEASE_MS.to_string(),
                "--sweep-interval-ms",
                "200",
                "--drone-unhealthy-after-ms",
                "2500",
            ];
            Proc::new(format!("controller-{i}"), args.iter().map(arg).collect(), &dir)
        })
        .collect();
    for c in &mut controllers {
        c.start();
    }
    // Each drone reaches each controller through a relay of its own.
    let mut relays: Vec<Vec<Relay>> = Vec::new();
    let mut drones: Vec<Proc> = Vec::new();
    let mut journals = Vec::new();
    for i in 0..DRONES {
        let mut rs = Vec::new();
        for port in &controller_ports {
            rs.push(Relay::start(SocketAddr::from(([127, 0, 0, 1], *port))).await);
        }
        let urls: Vec<String> = rs.iter().map(|r| format!("http://{}", r.addr)).collect();
        let ddir = dir.join(format!("drone-{i}"));
        std::fs::create_dir_all(&ddir).unwrap();
        let journal = ddir.join("journal.jsonl");
        let args = vec![
            arg("drone"),
            arg("--controller-url"),
            urls.join(","),
            arg("--cluster"),
            cluster.clone(),
            arg("--name"),
            format!("dr-chaos-{i}"),
            arg("--db"),
            ddir.join("state.db").display().to_string(),
            arg("--runtime"),
            arg("process"),
            arg("--allow-command"),
            arg(PLANE),
            arg("--soft-terminate-grace-seconds"),
            arg(1),
            arg("--startup-timeout-seconds"),
            arg(20),
            arg("--heartbeat-interval-ms"),
            arg(400),
            arg("--event-journal"),
            journal.display().to_string(),
        ];
        journals.push(journal);
        let mut args = args;
        if std::env::var_os("PLANE_CHAOS_NO_WATCHDOG").is_some() {
            // To see the checker catch the hole the watchdog closes.
            args.push(arg("--no-watchdog"));
        }
        let mut d = Proc::new(format!("drone-{i}"), args, &dir);
        d.start();
        drones.push(d);
        relays.push(rs);
    }
    let mut proxy = Proc::new(
        "proxy",
        [
            "proxy",
            "--controller-url",
            &controller_urls.join(","),
            "--cluster",
            &cluster,
            "--host",
            "127.0.0.1",
            "--http-port",
            &proxy_port.to_string(),
            "--route-wait-seconds",
            "5",
        ]
        .iter()
        .map(arg)
        .collect(),
        &dir,
    );
    proxy.start();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    wait_for_drones(&http, &controller_urls[0], &cluster, DRONES).await;

    // The storm.
    let stats = Arc::new(Stats::default());
    let stop = CancellationToken::new();
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        workers.push(tokio::spawn(worker(
            seed.wrapping_add(w as u64 + 1),
            controller_urls.clone(),
            cluster.clone(),
            lifecycle_dir.clone(),
            stats.clone(),
            stop.clone(),
        )));
    }

    // The faults, one after another, until the time is up.
    let mut faults = Faults {
        controller_kills: 0,
        drone_kills_short: 0,
        drone_kills_past_lease: 0,
        partitions: 0,
        postgres_restarts: 0,
    };
    let started = Instant::now();
    let end = started + Duration::from_secs(seconds);
    let mut round = 0usize;
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(1_500..4_000))).await;
        for p in controllers
            .iter_mut()
            .chain(drones.iter_mut())
            .chain(std::iter::once(&mut proxy))
        {
            p.check_alive();
        }
        let t = started.elapsed().as_secs();
        match round % 5 {
            0 => {
                let i = rng.gen_range(0..CONTROLLERS);
                println!("[{t:>4}s] kill -9 controller-{i}");
                controllers[i].kill().await;
                tokio::time::sleep(Duration::from_millis(rng.gen_range(300..3_000))).await;
                controllers[i].start();
                faults.controller_kills += 1;
            }
            1 | 3 => {
                let i = rng.gen_range(0..DRONES);
                let past_lease = round % 10 == 3;
                let down = if past_lease {
                    rng.gen_range(LEASE_MS + 1_000..LEASE_MS + 4_000)
                } else {
                    rng.gen_range(200..LEASE_MS / 3)
                };
                println!("[{t:>4}s] kill -9 drone-{i} for {down} ms");
                drones[i].kill().await;
                tokio::time::sleep(Duration::from_millis(down)).await;
                drones[i].start();
                if past_lease {
                    faults.drone_kills_past_lease += 1;
                } else {
                    faults.drone_kills_short += 1;
                }
            }
            2 => {
                let i = rng.gen_range(0..DRONES);
                let cut = rng.gen_range(1_000..LEASE_MS + 4_000);
                println!("[{t:>4}s] partition drone-{i} from every controller for {cut} ms");
                for r in &relays[i] {
                    r.cut();
                }
                tokio::time::sleep(Duration::from_millis(cut)).await;
                for r in &relays[i] {
                    r.heal();
                }
                faults.partitions += 1;
            }
            _ => {
                let down = rng.gen_range(300..2_500);
                println!("[{t:>4}s] restart PostgreSQL ({down} ms down)");
                let pg_ref = &pg;
                tokio::task::block_in_place(|| pg_ref.stop()).expect("stop PostgreSQL");
                tokio::time::sleep(Duration::from_millis(down)).await;
                tokio::task::block_in_place(|| pg_ref.restart()).expect("restart PostgreSQL");
                faults.postgres_restarts += 1;
            }
        }
        round += 1;
    }
    stop.cancel();
    for w in workers {
        w.await.unwrap();
    }

    // Settle: every component up, every backend either ready or terminated.
    for p in controllers
        .iter_mut()
        .chain(drones.iter_mut())
        .chain(std::iter::once(&mut proxy))
    {
        p.check_alive();
    }
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&db_url)
        .await
        .unwrap();
    let settled = settle(&pool).await;
    let events = check::read_lifecycle(&lifecycle_dir.join("lifecycle.jsonl"));
    // Property 2 on the settled cluster, then stop every backend through the API and
    // wait until the drones have nothing left to send, so that the store and the
    // journals are compared at rest.
    let mut violations = every_backend_ends(&http, &pool, &settled, &events).await;
    for b in settled.iter().filter(|b| b.status != "terminated") {
        let _ = http
            .post(format!("{}/ctrl/b/{}/hard-terminate", controller_urls[0], b.id))
            .send()
            .await;
    }
    let drone_dbs: Vec<PathBuf> = (0..DRONES)
        .map(|i| dir.join(format!("drone-{i}")).join("state.db"))
        .collect();
    let stored = at_rest(&pool, &drone_dbs).await;
    let journal = check::read_journals(&journals);
    violations.extend(check::one_backend_per_key(&events));
    violations.extend(check::tokens_match(&stored, &events));
    violations.extend(check::recorded_equals_emitted(&stored, &journal));

    let report = format!(
        "chaos report ({seconds} s, seed {seed}): connects {} ok / {} failed, spawns {}, proxied requests {}, \
         terminations asked {}, backends in the store {}, backend starts logged {}; faults: controller kill -9 {}, \
         drone kill -9 {} within the lease + {} past it, drone partitions {}, PostgreSQL restarts {}; violations {}",
        stats.connects.load(Ordering::Relaxed),
        stats.connect_errors.load(Ordering::Relaxed),
        stats.spawns.load(Ordering::Relaxed),
        stats.proxied.load(Ordering::Relaxed),
        stats.terminations.load(Ordering::Relaxed),
        stored.len(),
        events.iter().filter(|e| e.event == "start").count(),
        faults.controller_kills,
        faults.drone_kills_short,
        faults.drone_kills_past_lease,
        faults.partitions,
        faults.postgres_restarts,
        violations.len(),
    );
    println!("{report}");
    for v in &violations {
        println!("VIOLATION: {v}");
    }
    if !violations.is_empty() || std::env::var_os("PLANE_CHAOS_KEEP").is_some() {
        println!("run directory kept: {}", tmp.keep().display());
    }

    // Every backend is stopped already; then the components.
    let deadline = Instant::now() + Duration::from_secs(20);
    while events
        .iter()
        .any(|e| e.event == "start" && check::demo_backend_alive(e.pid))
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    proxy.kill().await;
    for p in controllers.iter_mut().chain(drones.iter_mut()) {
        p.kill().await;
    }
    for e in events.iter().filter(|e| e.event == "start") {
        if check::demo_backend_alive(e.pid) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(e.pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    assert!(violations.is_empty(), "{report}\n{}", violations.join("\n"));
    assert!(stats.spawns.load(Ordering::Relaxed) > 0, "{report}");
    // A missing or unreadable lifecycle log would make the first check vacuous.
    assert!(
        events.iter().any(|e| e.event == "start"),
        "no backend start was logged: {report}"
    );
    assert!(
        faults.controller_kills > 0
            && faults.drone_kills_short + faults.drone_kills_past_lease > 0
            && faults.partitions > 0
            && faults.postgres_restarts > 0,
        "every kind of fault must have run: {report}"
    );
}

async fn wait_for_drones(http: &reqwest::Client, controller: &str, cluster: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = http.get(format!("{controller}/ctrl/c/{cluster}/state")).send().await {
            if let Ok(v) = r.json::<Value>().await {
                let ready = v["drones"]
                    .as_array()
                    .map(|d| d.iter().filter(|d| d["ready"] == true).count());
                if ready == Some(n) {
                    return;
                }
            }
        }
        assert!(Instant::now() < deadline, "the drones did not connect");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn worker(
    seed: u64,
    controllers: Vec<String>,
    cluster: String,
    lifecycle_dir: PathBuf,
    stats: Arc<Stats>,
    stop: CancellationToken,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    while !stop.is_cancelled() {
        let key = format!("chaos-{}", rng.gen_range(0..KEYS));
        let controller = &controllers[rng.gen_range(0..controllers.len())];
        let body = json!({
            "key": { "name": key },
            "spawn_config": {
                "cluster": cluster,
                "executable": {
                    "command": [PLANE, "demo-backend"],
                    "env": { "DEMO_LIFECYCLE_DIR": lifecycle_dir.display().to_string() },
                },
                "max_idle_seconds": 4,
                "lifetime_limit_seconds": 40,
            },
        });
        let response = http.post(format!("{controller}/ctrl/connect")).json(&body).send().await;
        match response {
            Ok(r) if r.status().is_success() => {
                stats.connects.fetch_add(1, Ordering::Relaxed);
                let v: Value = r.json().await.unwrap_or_default();
                if v["spawned"] == true {
                    stats.spawns.fetch_add(1, Ordering::Relaxed);
                }
                let roll = rng.gen_range(0..20);
                if roll < 6 {
                    if let Some(url) = v["url"].as_str() {
                        if http
                            .get(format!("{url}env"))
                            .send()
                            .await
                            .is_ok_and(|r| r.status().is_success())
                        {
                            stats.proxied.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                } else if roll == 6 {
                    if let Some(id) = v["backend_id"].as_str() {
                        let kind = if rng.gen_bool(0.5) { "soft" } else { "hard" };
                        let controller = &controllers[rng.gen_range(0..controllers.len())];
                        if http
                            .post(format!("{controller}/ctrl/b/{id}/{kind}-terminate"))
                            .send()
                            .await
                            .is_ok_and(|r| r.status().is_success())
                        {
                            stats.terminations.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            _ => {
                stats.connect_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        // Pacing only: nothing checks time.
        tokio::time::sleep(Duration::from_millis(rng.gen_range(10..80))).await;
    }
}

async fn stored_backends(pool: &sqlx::PgPool) -> Result<Vec<StoredBackend>, sqlx::Error> {
    let rows: Vec<(String, String, String, Option<String>, i64)> =
        sqlx::query_as("SELECT id, key_name, status, address, fencing_token FROM backend ORDER BY id")
            .fetch_all(pool)
            .await?;
    let history: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT backend_id, status, termination_reason FROM backend_status ORDER BY backend_id, status_order",
    )
    .fetch_all(pool)
    .await?;
    let mut out: Vec<StoredBackend> = rows
        .into_iter()
        .map(|(id, key, status, address, fencing_token)| StoredBackend {
            id,
            key,
            status,
            address,
            fencing_token,
            history: Vec::new(),
        })
        .collect();
    for (id, status, reason) in history {
        if let Ok(i) = out.binary_search_by(|b| b.id.as_str().cmp(&id)) {
            out[i].history.push((status, reason));
        }
    }
    Ok(out)
}

/// Waits (bounded) until every backend is ready or terminated, then returns the
/// store's backends.
async fn settle(pool: &sqlx::PgPool) -> Vec<StoredBackend> {
    // The longest a backend can take to settle: a lease (lost), plus a start.
    let deadline = Instant::now() + Duration::from_millis(LEASE_MS * 4) + Duration::from_secs(20);
    loop {
        match stored_backends(pool).await {
            // A backend that starts to stop after this is fine: property 2 re-reads the
            // status of one that does not answer, and property 3 waits for rest.
            Ok(b) if b.iter().all(|b| b.status == "ready" || b.status == "terminated") => return b,
            Ok(b) if Instant::now() > deadline => {
                let stuck: Vec<String> = b
                    .iter()
                    .filter(|b| b.status != "ready" && b.status != "terminated")
                    .map(|b| format!("{} {}", b.id, b.status))
                    .collect();
                panic!("backends did not settle: {stuck:?}");
            }
            Err(e) if Instant::now() > deadline => panic!("the store did not answer: {e}"),
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits (bounded) until every backend is terminated and every drone's outbox is
/// empty; returns the store's backends.
async fn at_rest(pool: &sqlx::PgPool, drone_dbs: &[PathBuf]) -> Vec<StoredBackend> {
    let deadline = Instant::now() + Duration::from_millis(LEASE_MS * 3) + Duration::from_secs(20);
    loop {
        let stored = stored_backends(pool).await;
        let mut unsent = 0i64;
        for db in drone_dbs {
            let options = sqlx::sqlite::SqliteConnectOptions::new().filename(db).read_only(true);
            if let Ok(mut conn) = sqlx::ConnectOptions::connect(&options).await {
                unsent += sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox")
                    .fetch_one(&mut conn)
                    .await
                    .unwrap_or(1);
            } else {
                unsent += 1;
            }
        }
        match stored {
            Ok(b) if unsent == 0 && b.iter().all(|b| b.status == "terminated") => return b,
            Ok(b) if Instant::now() > deadline => {
                let live: Vec<String> = b
                    .iter()
                    .filter(|b| b.status != "terminated")
                    .map(|b| format!("{} {}", b.id, b.status))
                    .collect();
                panic!("the cluster did not come to rest: {unsent} events unsent, not terminated: {live:?}");
            }
            Err(e) if Instant::now() > deadline => panic!("the store did not answer: {e}"),
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Property 2. A backend that does not answer is a violation only if the store still
/// says it is ready afterwards (an idle one may have begun to stop since the snapshot).
async fn every_backend_ends(
    http: &reqwest::Client,
    pool: &sqlx::PgPool,
    stored: &[StoredBackend],
    events: &[plane_demo::lifecycle::LifecycleEvent],
) -> Vec<String> {
    let mut violations = Vec::new();
    for b in stored.iter().filter(|b| b.status == "ready") {
        let Some(address) = &b.address else {
            violations.push(format!("backend {} is ready without an address", b.id));
            continue;
        };
        let answer = http.get(format!("http://{address}/env")).send().await;
        let id = match answer {
            Ok(r) => r
                .json::<Value>()
                .await
                .ok()
                .and_then(|v| v["SESSION_BACKEND_ID"].as_str().map(str::to_owned)),
            Err(_) => None,
        };
        if id.as_deref() != Some(b.id.as_str()) {
            let now: Option<String> = sqlx::query_scalar("SELECT status FROM backend WHERE id = $1")
                .bind(&b.id)
                .fetch_optional(pool)
                .await
                .unwrap_or_default();
            if now.as_deref() == Some("ready") {
                violations.push(format!("backend {} is ready but does not answer at {address}", b.id));
            }
        }
    }
    for e in events.iter().filter(|e| e.event == "start") {
        if check::demo_backend_alive(e.pid) {
            match stored.iter().find(|b| b.id == e.backend) {
                Some(b) if b.status != "terminated" => {}
                Some(b) => violations.push(format!(
                    "backend {} (key {}, pid {}) is alive but the store says {}",
                    b.id, b.key, e.pid, b.status
                )),
                None => violations.push(format!(
                    "backend {} (pid {}) is alive and unknown to the store",
                    e.backend, e.pid
                )),
            }
        }
    }
    violations
}
