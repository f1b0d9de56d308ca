//! A whole Plane cluster in one process: controller, drone and proxy on port 0 with
//! short timings, for tests and benchmarks (Plane's `TestEnvironment`, made ours).
//!
//! Every component runs as a task with its own cancellation token, so a test can stop
//! and restart the controller or the drone (their stores are files in a temporary
//! directory) and watch the system converge. Waiting is done on events or by polling
//! with a deadline, never by bare sleeps.

use anyhow::{bail, Context};
use futures_util::StreamExt;
use plane_client::PlaneClient;
use plane_controller::{ControllerConfig, ControllerTimings};
use plane_drone::config::DockerRuntimeConfig;
use plane_drone::{DroneConfig, DroneTimings, ProcessRuntimeConfig};
use plane_proxy::ProxyConfig;
use plane_store::sqlite::SqliteStore;
use plane_store::SharedStore;
use plane_types::api::{ConnectRequest, ConnectResponse, KeyConfig, SpawnConfig};
use plane_types::lease::LeaseTimings;
use plane_types::names::{BackendName, ClusterName, ControllerName, DroneName};
use plane_types::status::{BackendStatus, StatusEntry};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long any wait in a test may take before it fails.
pub const WAIT: Duration = Duration::from_secs(20);

/// Options of a test cluster.
#[derive(Clone, Debug)]
pub struct Options {
    /// Start a drone.
    pub drone: bool,
    /// The program that `"plane"` in a command resolves to (the built `plane` binary).
    pub plane_binary: PathBuf,
    /// The lease unit (renew at 3 units, expiry at 6).
    pub lease_unit: Duration,
    /// Sweep interval.
    pub sweep_interval: Duration,
    /// Drone heartbeat interval.
    pub heartbeat_interval: Duration,
    /// SIGTERM → SIGKILL grace.
    pub soft_terminate_grace: Duration,
    /// Startup timeout.
    pub startup_timeout: Duration,
    /// Proxy route wait.
    pub route_wait: Duration,
    /// Proxy keepalive interval.
    pub keepalive_interval: Duration,
    /// The drone's Docker runtime, if it should offer one.
    pub docker: Option<DockerRuntimeConfig>,
    /// The controller's store: this PostgreSQL URL, or (`None`) a SQLite file in the
    /// cluster's directory.
    pub postgres_url: Option<String>,
    /// The controller's `--ctrl-token`; every component and the client pass it.
    pub ctrl_token: Option<String>,
    /// How long connection tokens stay valid (`None`: for the backend's life).
    pub token_ttl: Option<Duration>,
    /// The cluster name (`None`: `localhost:<proxy port>`, which the built-in proxy and
    /// [`TestCluster::http`] serve). Another name suits a proxy the test runs itself,
    /// such as an HTTPS one with an ACME certificate for a name without a port.
    pub cluster: Option<ClusterName>,
}

impl Options {
    /// Short timings suitable for tests.
    pub fn new(plane_binary: impl Into<PathBuf>) -> Options {
        Options {
            drone: true,
            plane_binary: plane_binary.into(),
            lease_unit: Duration::from_millis(500),
            sweep_interval: Duration::from_millis(100),
            heartbeat_interval: Duration::from_millis(200),
            soft_terminate_grace: Duration::from_secs(5),
            startup_timeout: Duration::from_secs(10),
            route_wait: Duration::from_secs(10),
            keepalive_interval: Duration::from_millis(100),
            docker: None,
            postgres_url: None,
            ctrl_token: None,
            token_ttl: None,
            cluster: None,
        }
    }
}

struct Component {
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Component {
    fn spawn<F: Future<Output = anyhow::Result<()>> + Send + 'static>(
        shutdown: CancellationToken,
        f: impl FnOnce(CancellationToken) -> F,
    ) -> Component {
        let task = tokio::spawn(f(shutdown.clone()));
        Component { shutdown, task }
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.task.await.context("component panicked")?
    }
}

/// A running test cluster.
pub struct TestCluster {
    /// The options it was started with.
    pub options: Options,
    /// The controller's URL.
    pub controller_url: String,
    /// The cluster name (`localhost:<proxy port>` unless [`Options::cluster`] says).
    pub cluster: ClusterName,
    /// Where the proxy listens.
    pub proxy_addr: SocketAddr,
    /// A client of the controller.
    pub client: PlaneClient,
    /// The controller's store (tests may read it; only the controller writes).
    pub store: SharedStore,
    /// An HTTP client that resolves the cluster's host to the proxy.
    pub http: reqwest::Client,
    /// Where the drone connects (default: the first controller); set before
    /// [`TestCluster::start_drone`].
    pub drone_controller_url: Option<String>,
    controller_addr: SocketAddr,
    controller_name: ControllerName,
    controller: Option<Component>,
    /// More controllers on the same store (PostgreSQL), from [`TestCluster::add_controller`].
    extra_controllers: Vec<(String, Option<Component>)>,
    drone: Option<Component>,
    proxy: Option<Component>,
    /// More proxies of the cluster, from [`TestCluster::add_proxy`].
    extra_proxies: Vec<Component>,
    /// Backends started through [`TestCluster::connect`], killed at shutdown.
    spawned: std::sync::Mutex<Vec<BackendName>>,
    dir: tempfile::TempDir,
}

/// A loopback TCP port that was free a moment ago (for programs that must be told
/// their port, such as `plane dev`).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Installs a test log subscriber once (`RUST_LOG` to see logs).
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}

impl TestCluster {
    /// Starts a cluster.
    pub async fn start(options: Options) -> anyhow::Result<TestCluster> {
        init_logging();
        let dir = tempfile::tempdir()?;
        let store: SharedStore = match &options.postgres_url {
            Some(url) => Arc::new(plane_store::postgres::PostgresStore::connect(url).await?),
            None => Arc::new(SqliteStore::open(&dir.path().join("controller.db")).await?),
        };
        let controller_listener = TcpListener::bind("127.0.0.1:0").await?;
        let controller_addr = controller_listener.local_addr()?;
        let proxy_listener = TcpListener::bind("127.0.0.1:0").await?;
        let proxy_addr = proxy_listener.local_addr()?;
        let cluster: ClusterName = match &options.cluster {
            Some(cluster) => cluster.clone(),
            None => format!("localhost:{}", proxy_addr.port()).parse()?,
        };
        let controller_url = format!("http://{controller_addr}");
        let http = reqwest::Client::builder().resolve("localhost", proxy_addr).build()?;
        let mut client = PlaneClient::new(&controller_url)?;
        if let Some(token) = &options.ctrl_token {
            client = client.with_bearer_token(token.clone());
        }
        let mut tc = TestCluster {
            client,
            options,
            controller_url,
            cluster,
            proxy_addr,
            store,
            http,
            drone_controller_url: None,
            controller_addr,
            controller_name: ControllerName::new_random(),
            controller: None,
            extra_controllers: Vec::new(),
            extra_proxies: Vec::new(),
            drone: None,
            proxy: None,
            spawned: Default::default(),
            dir,
        };
        tc.controller = Some(tc.spawn_controller(controller_listener));
        tc.proxy = Some(tc.spawn_proxy(proxy_listener));
        if tc.options.drone {
            tc.start_drone().await?;
        }
        tc.wait_for(|s| !s.proxies.is_empty())
            .await
            .context("proxy did not connect")?;
        Ok(tc)
    }

    fn controller_config(&self) -> ControllerConfig {
        let mut config = ControllerConfig::new(
            self.store.clone(),
            self.controller_url.clone(),
            Some(self.cluster.clone()),
        );
        config.name = self.controller_name.clone();
        config.ctrl_token = self.options.ctrl_token.clone();
        config.token_ttl = self.options.token_ttl;
        config.timings = ControllerTimings {
            lease: LeaseTimings::scaled(self.options.lease_unit),
            drone_unhealthy_after: self.options.heartbeat_interval * 10,
            sweep_interval: self.options.sweep_interval,
            route_wait: self.options.route_wait,
            ..ControllerTimings::default()
        };
        config
    }

    fn spawn_controller(&self, listener: TcpListener) -> Component {
        let config = self.controller_config();
        Component::spawn(CancellationToken::new(), |s| {
            plane_controller::serve(listener, config, s)
        })
    }

    /// Starts one more controller on the cluster's store (it must be PostgreSQL to be
    /// shared), with its own name and the same timings; `fanout` replaces the store's
    /// (to inject faults). Returns its URL.
    pub async fn add_controller(
        &mut self,
        fanout: Option<plane_store::fanout::SharedFanout>,
    ) -> anyhow::Result<String> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let mut config = self.controller_config();
        config.name = ControllerName::new_random();
        config.controller_url = url.clone();
        if fanout.is_some() {
            config.fanout = fanout;
        }
        let component = Component::spawn(CancellationToken::new(), |s| {
            plane_controller::serve(listener, config, s)
        });
        self.extra_controllers.push((url.clone(), Some(component)));
        Ok(url)
    }

    /// Starts another proxy of the cluster, connected to the first controller, on a
    /// port of its own; returns its address. Clients must send the cluster name as
    /// the Host: [`TestCluster::http_via`] does.
    pub async fn add_proxy(&mut self) -> anyhow::Result<SocketAddr> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let proxy = self.spawn_proxy(listener);
        self.extra_proxies.push(proxy);
        Ok(addr)
    }

    /// A GET of `url` (a URL on the cluster's host, such as a connect response's)
    /// sent to the proxy at `proxy`, with the cluster name as its Host.
    pub fn http_via(&self, proxy: SocketAddr, url: &str) -> reqwest::RequestBuilder {
        let path = url.split_once(self.cluster.as_str()).map_or(url, |(_, path)| path);
        self.http
            .get(format!("http://{proxy}{path}"))
            .header(reqwest::header::HOST, self.cluster.as_str())
    }

    /// Stops a controller started by [`TestCluster::add_controller`].
    pub async fn stop_added_controller(&mut self, url: &str) -> anyhow::Result<()> {
        match self.extra_controllers.iter_mut().find(|(u, _)| u == url) {
            Some((_, c)) => match c.take() {
                Some(c) => c.stop().await,
                None => Ok(()),
            },
            None => bail!("no added controller at {url}"),
        }
    }

    /// Restarts the proxy, connected to `controller_urls` (comma-separated), on the
    /// same address.
    pub async fn restart_proxy(&mut self, controller_urls: &str) -> anyhow::Result<()> {
        if let Some(p) = self.proxy.take() {
            p.stop().await?;
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        let listener = loop {
            match TcpListener::bind(self.proxy_addr).await {
                Ok(l) => break l,
                Err(e) if tokio::time::Instant::now() > deadline => return Err(e.into()),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        self.proxy = Some(self.spawn_proxy_to(listener, controller_urls.to_owned()));
        Ok(())
    }

    fn spawn_proxy(&self, listener: TcpListener) -> Component {
        self.spawn_proxy_to(listener, self.controller_url.clone())
    }

    fn spawn_proxy_to(&self, listener: TcpListener, controller_urls: String) -> Component {
        let mut config = ProxyConfig::new(controller_urls, self.cluster.clone());
        config.route_wait = self.options.route_wait;
        config.keepalive_interval = self.options.keepalive_interval;
        config.reconnect_min = Duration::from_millis(20);
        config.reconnect_max = Duration::from_millis(200);
        config.ctrl_token = self.options.ctrl_token.clone();
        Component::spawn(CancellationToken::new(), |s| plane_proxy::run(listener, config, s))
    }

    /// The drone's configuration (its state store and logs live in the cluster's directory).
    pub fn drone_config(&self) -> DroneConfig {
        DroneConfig {
            controller_url: self
                .drone_controller_url
                .clone()
                .unwrap_or_else(|| self.controller_url.clone()),
            name: None,
            cluster: self.cluster.clone(),
            pool: String::new(),
            db_path: self.dir.path().join("drone.db"),
            process: ProcessRuntimeConfig {
                allow_commands: vec!["plane".into(), "sh".into(), "/bin/sh".into(), "/usr/bin/sh".into()],
                program_aliases: HashMap::from([("plane".to_owned(), self.options.plane_binary.clone())]),
                log_dir: self.dir.path().join("logs"),
                bind_host: [127, 0, 0, 1].into(),
            },
            docker: self.options.docker.clone(),
            timings: DroneTimings {
                heartbeat_interval: self.options.heartbeat_interval,
                soft_terminate_grace: self.options.soft_terminate_grace,
                startup_timeout: self.options.startup_timeout,
                reconnect_min: Duration::from_millis(20),
                reconnect_max: Duration::from_millis(200),
                renew_retry: Duration::from_millis(100),
                metrics_interval: Duration::from_millis(500),
            },
            event_journal: None,
            ctrl_token: self.options.ctrl_token.clone(),
        }
    }

    /// Starts the drone (again) and waits until it is ready in the cluster state.
    pub async fn start_drone(&mut self) -> anyhow::Result<DroneName> {
        if self.drone.is_some() {
            bail!("the drone is running");
        }
        let config = self.drone_config();
        self.drone = Some(Component::spawn(CancellationToken::new(), |s| {
            plane_drone::run(config, s)
        }));
        let state = self
            .wait_for(|s| s.drones.iter().any(|d| d.ready))
            .await
            .context("drone did not connect")?;
        match &state.drones.iter().find(|d| d.ready).map(|d| d.node.name.clone()) {
            Some(plane_types::api::NodeName::Drone(n)) => Ok(n.clone()),
            _ => bail!("no ready drone"),
        }
    }

    /// Stops the drone (its backends keep running) and returns its result.
    pub async fn stop_drone(&mut self) -> anyhow::Result<()> {
        match self.drone.take() {
            Some(d) => d.stop().await,
            None => Ok(()),
        }
    }

    /// Stops the controller.
    pub async fn stop_controller(&mut self) -> anyhow::Result<()> {
        match self.controller.take() {
            Some(c) => c.stop().await,
            None => Ok(()),
        }
    }

    /// Starts the controller again on the same address and store.
    pub async fn start_controller(&mut self) -> anyhow::Result<()> {
        if self.controller.is_some() {
            bail!("the controller is running");
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        let listener = loop {
            match TcpListener::bind(self.controller_addr).await {
                Ok(l) => break l,
                Err(e) if tokio::time::Instant::now() > deadline => return Err(e.into()),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        self.controller = Some(self.spawn_controller(listener));
        Ok(())
    }

    /// Polls the cluster state until `pred` holds.
    pub async fn wait_for(
        &self,
        pred: impl Fn(&plane_types::api::ClusterState) -> bool,
    ) -> anyhow::Result<plane_types::api::ClusterState> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Ok(state) = self.client.cluster_state(&self.cluster).await {
                if pred(&state) {
                    return Ok(state);
                }
            }
            if tokio::time::Instant::now() > deadline {
                bail!("cluster state condition not reached within {WAIT:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A connect request for `key` running `command` (program and arguments).
    pub fn spawn_request(&self, key: &str, command: &[&str]) -> ConnectRequest {
        self.executable_request(key, serde_json::json!({ "command": command }))
    }

    /// A connect request for `key` with this executable JSON (process or Docker).
    pub fn executable_request(&self, key: &str, executable: serde_json::Value) -> ConnectRequest {
        ConnectRequest {
            key: Some(KeyConfig {
                name: key.into(),
                namespace: String::new(),
                tag: String::new(),
            }),
            spawn_config: Some(SpawnConfig {
                id: None,
                cluster: None,
                pool: None,
                executable,
                lifetime_limit_seconds: None,
                max_idle_seconds: None,
                use_static_token: false,
                subdomain: None,
            }),
            user: None,
            auth: None,
        }
    }

    /// A connect request for the demo backend.
    pub fn demo_request(&self, key: &str) -> ConnectRequest {
        self.spawn_request(key, &["plane", "demo-backend"])
    }

    /// Connects, remembering the backend so [`TestCluster::shutdown`] stops it.
    pub async fn connect(&self, req: &ConnectRequest) -> Result<ConnectResponse, plane_client::ClientError> {
        let res = self.client.connect(req).await?;
        self.spawned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(res.backend_id.clone());
        Ok(res)
    }

    /// Connects and waits until the backend is ready.
    pub async fn connect_ready(&self, req: &ConnectRequest) -> anyhow::Result<ConnectResponse> {
        let res = self.connect(req).await?;
        self.wait_status(&res.backend_id, BackendStatus::Ready).await?;
        Ok(res)
    }

    /// Follows the status stream until `status` (or later) is reached; returns that entry.
    pub async fn wait_status(&self, id: &BackendName, status: BackendStatus) -> anyhow::Result<StatusEntry> {
        wait_status_via(&self.client, id, status).await
    }

    /// The data directory of this cluster.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Hard-terminates the backends started through [`TestCluster::connect`] (waiting
    /// for them if the drone runs), then stops every component.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let spawned = std::mem::take(&mut *self.spawned.lock().unwrap_or_else(|p| p.into_inner()));
        if self.drone.is_some() && self.controller.is_some() {
            for id in spawned {
                if self.client.status(&id).await.is_ok_and(|s| s.status.is_terminal()) {
                    continue;
                }
                self.client.hard_terminate(&id).await?;
                self.wait_status(&id, BackendStatus::Terminated).await?;
            }
        }
        let extra = self.extra_controllers.drain(..).filter_map(|(_, c)| c);
        let proxies: Vec<Component> = self.extra_proxies.drain(..).chain(self.proxy.take()).collect();
        for c in proxies
            .into_iter()
            .chain([self.drone.take(), self.controller.take()].into_iter().flatten())
            .chain(extra)
        {
            c.stop().await?;
        }
        Ok(())
    }
}

/// Follows a backend's status stream on the controller of `client` until it reaches
/// `status` (or later), within [`WAIT`].
pub async fn wait_status_via(
    client: &PlaneClient,
    id: &BackendName,
    status: BackendStatus,
) -> anyhow::Result<StatusEntry> {
    let fut = async {
        let mut stream = client.status_stream(id, None).await?;
        while let Some(entry) = stream.next().await {
            let entry = entry?;
            if entry.status >= status {
                return Ok(entry);
            }
        }
        bail!("status stream of {id} ended before {status}")
    };
    match tokio::time::timeout(WAIT, fut).await {
        Ok(r) => r,
        Err(_) => bail!("backend {id} did not reach {status} within {WAIT:?}"),
    }
}

/// Polls `f` (every 20 ms) until it returns `Some`, failing after [`WAIT`].
pub async fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A fresh database on the test binary's shared PostgreSQL server (started from the
/// machine's binaries on first use); panics, so the test fails rather than skips, if
/// PostgreSQL cannot start.
pub async fn test_database() -> plane_test_postgres::TestPostgres {
    tokio::task::spawn_blocking(plane_test_postgres::TestPostgres::database)
        .await
        .expect("the database task")
        .expect("these tests need PostgreSQL (initdb, pg_ctl) to start")
}
