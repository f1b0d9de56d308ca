//! The Docker runtime: each backend is a container of the drone's Docker engine, reached
//! on its port 8080.
//!
//! * `prepare` pulls the image per its `pull_policy` (reporting [`LoadProgress`]) and
//!   checks what only the drone can check: the mount (see `container::resolve_mount`).
//! * `start` creates and starts a container named `plane-<backend id>`, labelled
//!   [`LABEL_BACKEND`], [`LABEL_DRONE`] and [`LABEL_MANAGED`], with hardened defaults
//!   (`no-new-privileges`, a pids limit, optionally a read-only root), and returns its
//!   address: a port the engine published on `host_ip`, or the container's own IP. Three
//!   engine round-trips: create, start, inspect.
//! * Exits come from one events subscription (see `events`); signals are `kill`s.
//! * `adopt` accepts a container only if it carries this drone's and this backend's
//!   labels and runs; `reconcile` kills running containers of this drone whose backend
//!   the state store does not know.
//! * A background task removes old stopped containers and, optionally, images this drone
//!   pulled (see `cleanup`).
//! * [`DockerRuntime::connect_passive`] gives a runtime without those background tasks,
//!   for the watchdog, which only checks (`adopt`) and kills (`signal`) containers.
//!
//! Nothing here stops a container when the runtime is dropped or the drone stops:
//! backends outlive the drone, and a restarted drone adopts them.

mod cleanup;
mod container;
mod events;
mod pull;

use super::{
    wait_for_http, Adoption, BackendMetrics, BackendSpec, ExitInfo, LoadProgress, Runtime, RuntimeError, RuntimeHandle,
    StartedBackend, StopSignal,
};
use crate::config::DockerRuntimeConfig;
use crate::state::{now_ms, StateStore};
use async_trait::async_trait;
use bollard::errors::Error as EngineError;
use bollard::models::ContainerSummaryStateEnum;
use bollard::query_parameters::{
    CreateContainerOptions, KillContainerOptions, ListContainersOptions, RemoveContainerOptions, StatsOptions,
};
use bollard::{Docker, API_DEFAULT_VERSION};
use futures_util::StreamExt;
use plane_types::executable::{DockerExecutable, Executable, RuntimeKind};
use plane_types::names::{BackendName, DroneName};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use events::{EventsControl, Tracker};

/// Label: the id of the backend a container runs.
pub const LABEL_BACKEND: &str = "dev.plane.backend";
/// Label: the name of the drone that created the container.
pub const LABEL_DRONE: &str = "dev.plane.drone";
/// Label: `true` on every container Plane manages.
pub const LABEL_MANAGED: &str = "dev.plane.managed";
/// The port backends listen on inside their container (`PORT`).
pub const CONTAINER_PORT: u16 = 8080;

/// How long connecting to the engine may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests to the engine time out after this long (a pull's stream is not bounded).
const REQUEST_TIMEOUT_SECS: u64 = 120;
/// How long a metrics sample may take.
const METRICS_TIMEOUT: Duration = Duration::from_secs(5);

/// How long sending a signal may take.
const SIGNAL_TIMEOUT: Duration = Duration::from_secs(10);

/// What identifies a backend's container across drone restarts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DockerHandle {
    /// The engine's container id.
    pub container_id: String,
    /// The container's name, `plane-<backend id>`.
    pub name: String,
}

impl DockerHandle {
    /// A handle that names a backend's container by its name, `plane-<backend id>`, for
    /// a backend whose container id was never recorded (its drone stopped during
    /// `start`). The engine accepts the name wherever it takes an id.
    pub fn by_name(backend_id: &BackendName) -> DockerHandle {
        let name = container::container_name(backend_id);
        DockerHandle {
            container_id: name.clone(),
            name,
        }
    }
}

/// The previous CPU sample of a container, for `cpu_percent`.
#[derive(Clone, Copy, Debug)]
struct CpuSample {
    at: Instant,
    cpu_nanos: u64,
}

/// What the runtime's methods and background tasks share.
pub(crate) struct Inner {
    docker: Docker,
    config: DockerRuntimeConfig,
    drone: DroneName,
    store: Option<StateStore>,
    /// Engine clock minus drone clock, in ms, measured when connecting.
    clock_offset_ms: i64,
    tracker: Tracker,
    events: EventsControl,
    samples: Mutex<HashMap<String, CpuSample>>,
}

impl Inner {
    /// The engine's clock now (estimated), ms since the epoch.
    fn engine_now_ms(&self) -> i64 {
        i64::try_from(now_ms())
            .unwrap_or(i64::MAX)
            .saturating_add(self.clock_offset_ms)
    }
}

/// Runs backends as Docker containers. See the module documentation.
pub struct DockerRuntime {
    inner: Arc<Inner>,
    /// Stops the events and cleanup tasks; cancelled on drop too. Never stops containers.
    cancel: CancellationToken,
}

impl Drop for DockerRuntime {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// The engine address a configuration means, for messages.
pub fn engine_address(config: &DockerRuntimeConfig) -> String {
    match &config.docker_host {
        Some(host) => host.clone(),
        None => std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".to_owned()),
    }
}

fn client(config: &DockerRuntimeConfig) -> Result<Docker, EngineError> {
    let docker = match config.docker_host.as_deref() {
        None => Docker::connect_with_defaults()?,
        Some(path) if path.starts_with('/') => {
            Docker::connect_with_unix(path, REQUEST_TIMEOUT_SECS, API_DEFAULT_VERSION)?
        }
        Some(host) => Docker::connect_with_host(host)?,
    };
    Ok(docker.with_timeout(Duration::from_secs(REQUEST_TIMEOUT_SECS)))
}

/// Whether the engine `config` names answers a ping (within a few seconds). `plane dev`
/// offers Docker only if it does.
pub async fn docker_reachable(config: &DockerRuntimeConfig) -> bool {
    match client(config) {
        Ok(docker) => matches!(tokio::time::timeout(CONNECT_TIMEOUT, docker.ping()).await, Ok(Ok(_))),
        Err(_) => false,
    }
}

/// The HTTP status of an engine error, if it was an HTTP error.
pub(crate) fn status_of(err: &EngineError) -> Option<u16> {
    match err {
        EngineError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// The engine's own words for an error.
pub(crate) fn engine_message(err: &EngineError) -> String {
    match err {
        EngineError::DockerResponseServerError { message, .. } => message.trim().to_owned(),
        EngineError::DockerStreamError { error } => error.trim().to_owned(),
        other => other.to_string(),
    }
}

fn engine_err(context: impl std::fmt::Display, err: &EngineError) -> RuntimeError {
    RuntimeError::Other(format!("{context}: {}", engine_message(err)))
}

fn docker_executable(spec: &BackendSpec) -> Result<&DockerExecutable, RuntimeError> {
    match &spec.executable {
        Executable::Docker(d) => Ok(d),
        Executable::Process(_) => Err(RuntimeError::InvalidExecutable(
            "the Docker runtime cannot run a process executable".into(),
        )),
    }
}

fn docker_handle(handle: &RuntimeHandle) -> Result<&DockerHandle, RuntimeError> {
    match handle {
        RuntimeHandle::Docker(d) => Ok(d),
        #[allow(unreachable_patterns)]
        _ => Err(RuntimeError::Other(format!("not a Docker handle: {handle:?}"))),
    }
}

/// Image references the engine accepts, checked before one goes into a URL.
fn check_image_reference(image: &str) -> Result<(), RuntimeError> {
    let valid = !image.is_empty()
        && !image.starts_with(['/', '-', '.', ':', '@'])
        && image
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/' | ':' | '@'))
        && !image
            .split('/')
            .any(|part| part.is_empty() || part == "." || part == "..");
    if valid {
        Ok(())
    } else {
        Err(RuntimeError::InvalidExecutable(format!(
            "{image:?} is not a valid image reference"
        )))
    }
}

impl DockerRuntime {
    /// Connects to the engine `config` names (`None`: `DOCKER_HOST`, else the local
    /// socket), checks that it answers, negotiates the API version, and starts following
    /// its events and cleaning up. `store`, if given, records the images this runtime
    /// pulls (needed for `prune_images`). The background tasks end when `shutdown` is
    /// cancelled or the runtime is dropped; containers keep running.
    pub async fn connect(
        config: DockerRuntimeConfig,
        drone: DroneName,
        store: Option<StateStore>,
        shutdown: CancellationToken,
    ) -> Result<DockerRuntime, RuntimeError> {
        DockerRuntime::connect_with(config, drone, store, shutdown, true).await
    }

    /// Connects like [`DockerRuntime::connect`], but follows no events and cleans
    /// nothing up: only [`Runtime::adopt`] (is this drone's container for this backend
    /// running?) and [`Runtime::signal`] are meant to be used; `wait_exit` sees only an
    /// exit that happened before it was called. For the watchdog, which must not act on
    /// the drone's containers beyond killing those whose lease ran out.
    pub async fn connect_passive(
        config: DockerRuntimeConfig,
        drone: DroneName,
        shutdown: CancellationToken,
    ) -> Result<DockerRuntime, RuntimeError> {
        DockerRuntime::connect_with(config, drone, None, shutdown, false).await
    }

    async fn connect_with(
        config: DockerRuntimeConfig,
        drone: DroneName,
        store: Option<StateStore>,
        shutdown: CancellationToken,
        background: bool,
    ) -> Result<DockerRuntime, RuntimeError> {
        let address = engine_address(&config);
        let unreachable =
            |what: String| RuntimeError::Other(format!("the Docker engine at {address} is unreachable: {what}"));
        let docker = client(&config).map_err(|e| unreachable(e.to_string()))?;
        match tokio::time::timeout(CONNECT_TIMEOUT, docker.ping()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(unreachable(engine_message(&e))),
            Err(_) => return Err(unreachable(format!("no answer within {CONNECT_TIMEOUT:?}"))),
        }
        let docker = tokio::time::timeout(CONNECT_TIMEOUT, docker.negotiate_version())
            .await
            .map_err(|_| unreachable("no answer to the version request".into()))?
            .map_err(|e| unreachable(format!("negotiating the API version: {}", engine_message(&e))))?;
        let local_ms = i64::try_from(now_ms()).unwrap_or(i64::MAX);
        let engine_ms = match tokio::time::timeout(CONNECT_TIMEOUT, docker.info()).await {
            Ok(Ok(info)) => info.system_time.as_deref().and_then(cleanup::parse_engine_time),
            Ok(Err(err)) => {
                warn!(err = %engine_message(&err), "could not read the engine's clock; assuming it is the drone's");
                None
            }
            Err(_) => {
                warn!("the engine did not tell its clock in time; assuming it is the drone's");
                None
            }
        };
        let clock_offset_ms = engine_ms.map_or(0, |e| e - local_ms);
        if clock_offset_ms.abs() > 1000 {
            warn!(clock_offset_ms, "the Docker engine's clock differs from the drone's");
        }
        if background && config.prune_images && store.is_none() {
            warn!("prune_images is set but there is no state store to record pulls in; nothing will be pruned");
        }
        let version = docker.client_version();
        let api = format!("{}.{}", version.major_version, version.minor_version);
        info!(engine = %address, %api, "connected to the Docker engine");
        let inner = Arc::new(Inner {
            docker,
            config,
            drone,
            store,
            clock_offset_ms,
            tracker: Tracker::default(),
            events: EventsControl::default(),
            samples: Mutex::new(HashMap::new()),
        });
        let cancel = shutdown.child_token();
        if background {
            // Events from a little before now, in the engine's clock: nothing that happens
            // after this call is missed, even before the subscription is established.
            let since_ns = (local_ms + clock_offset_ms - 1000).saturating_mul(1_000_000);
            tokio::spawn(events::run(inner.clone(), since_ns, cancel.clone()));
            tokio::spawn(cleanup::run(inner.clone(), cancel.clone()));
        }
        Ok(DockerRuntime { inner, cancel })
    }

    /// Runs one cleanup pass now (the background task runs them periodically).
    pub async fn cleanup_now(&self) {
        cleanup::pass(&self.inner).await;
    }

    /// Test hook: closes the events stream and keeps it closed until
    /// [`DockerRuntime::debug_resume_events`].
    #[doc(hidden)]
    pub fn debug_pause_events(&self) {
        self.inner.events.pause();
    }

    /// Test hook: reopens the events stream; without `replay`, the events missed while
    /// it was closed are not asked for, so only reconciliation can find them.
    #[doc(hidden)]
    pub fn debug_resume_events(&self, replay: bool) {
        self.inner.events.resume(replay);
    }

    /// Test hook: how many times the events stream has been opened.
    #[doc(hidden)]
    pub fn debug_event_subscriptions(&self) -> u64 {
        self.inner.events.subscriptions()
    }

    /// Creates the container, replacing a leftover of an earlier attempt for the same
    /// backend. Returns its id.
    async fn create(&self, name: &str, spec: &BackendSpec, exe: &DockerExecutable) -> Result<String, RuntimeError> {
        let inner = &self.inner;
        let mount = container::resolve_mount(inner.config.mount_base.as_deref(), spec, exe)?;
        let body = || container::create_body(&inner.config, &inner.drone, spec, exe, mount.as_deref());
        let options = || CreateContainerOptions {
            name: Some(name.to_owned()),
            ..Default::default()
        };
        let created = match inner.docker.create_container(Some(options()), body()).await {
            Err(err) if status_of(&err) == Some(409) => {
                self.remove_leftover(name, &spec.backend_id).await?;
                inner.docker.create_container(Some(options()), body()).await
            }
            other => other,
        };
        match created {
            Ok(created) => {
                for warning in &created.warnings {
                    warn!(backend_id = %spec.backend_id, %warning, "the engine warned about the container");
                }
                Ok(created.id)
            }
            Err(err) => {
                let mut message = format!("creating container {name} failed: {}", engine_message(&err));
                if exe.resource_limits.disk_limit_bytes.is_some() && engine_message(&err).contains("storage") {
                    message.push_str(
                        " (disk_limit_bytes needs a storage driver with disk quotas, e.g. overlay2 on xfs with pquota)",
                    );
                }
                Err(RuntimeError::Other(message))
            }
        }
    }

    /// A container named like this backend's exists: if it is this backend's (a retried
    /// start), it is removed; anything else is an error.
    async fn remove_leftover(&self, name: &str, backend_id: &BackendName) -> Result<(), RuntimeError> {
        let inner = &self.inner;
        let existing = match inner.docker.inspect_container(name, None).await {
            Ok(c) => c,
            Err(err) if status_of(&err) == Some(404) => return Ok(()),
            Err(err) => return Err(engine_err(format!("inspecting the existing container {name}"), &err)),
        };
        let labels = existing.config.as_ref().and_then(|c| c.labels.as_ref());
        if !container::is_ours(labels, &inner.drone, backend_id) {
            return Err(RuntimeError::Other(format!(
                "a container named {name} already exists and is not this drone's container for backend {backend_id}"
            )));
        }
        warn!(%backend_id, container = %name, "removing a container left by an earlier start of this backend");
        if let Some(id) = existing.id.as_deref() {
            inner.tracker.forget(id);
        }
        let options = RemoveContainerOptions {
            force: true,
            v: true,
            ..Default::default()
        };
        match inner.docker.remove_container(name, Some(options)).await {
            Ok(()) => Ok(()),
            Err(err) if status_of(&err) == Some(404) => Ok(()),
            Err(err) => Err(engine_err(format!("removing the leftover container {name}"), &err)),
        }
    }

    /// Removes a container that failed to start (best effort).
    async fn discard(&self, id: &str) {
        self.inner.tracker.forget(id);
        let options = RemoveContainerOptions {
            force: true,
            v: true,
            ..Default::default()
        };
        if let Err(err) = self.inner.docker.remove_container(id, Some(options)).await {
            warn!(container = %id, err = %engine_message(&err), "could not remove a container that failed to start");
        }
    }
}

#[async_trait]
impl Runtime for DockerRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Docker
    }

    async fn prepare(
        &self,
        spec: &BackendSpec,
        progress: &(dyn Fn(LoadProgress) + Send + Sync),
    ) -> Result<(), RuntimeError> {
        let exe = docker_executable(spec)?;
        check_image_reference(&exe.image)?;
        container::resolve_mount(self.inner.config.mount_base.as_deref(), spec, exe)?;
        pull::ensure_image(&self.inner, exe, progress).await
    }

    async fn start(&self, spec: &BackendSpec) -> Result<StartedBackend, RuntimeError> {
        let exe = docker_executable(spec)?;
        check_image_reference(&exe.image)?;
        let inner = &self.inner;
        let begun = Instant::now();
        let name = container::container_name(&spec.backend_id);
        let starting = inner.tracker.starting(&name);
        let id = self.create(&name, spec, exe).await?;
        let memory_limit = exe
            .resource_limits
            .memory_limit_bytes
            .and_then(|m| u64::try_from(m).ok());
        // Tracked before it starts, so its exit cannot go unseen.
        inner.tracker.track(&id, spec.backend_id.as_str(), memory_limit);
        drop(starting);
        let created = begun.elapsed();
        if let Err(err) = inner.docker.start_container(&id, None).await {
            self.discard(&id).await;
            return Err(engine_err(format!("starting container {name} failed"), &err));
        }
        let started = begun.elapsed();
        let inspected = match inner.docker.inspect_container(&id, None).await {
            Ok(c) => c,
            Err(err) => {
                self.discard(&id).await;
                return Err(engine_err(format!("inspecting the started container {name}"), &err));
            }
        };
        let address =
            match container::backend_address(&inner.config, container::network(&inner.config, exe), &inspected) {
                Ok(a) => a,
                Err(why) => {
                    // Maybe it exited at once; then it has no address. Either way it is unusable.
                    self.discard(&id).await;
                    let exit = container::exit_from_inspect(&inspected)
                        .and_then(|e| e.detail)
                        .map(|d| format!(" (the container {d})"))
                        .unwrap_or_default();
                    return Err(RuntimeError::Other(format!(
                        "container {name} has no usable address: {why}{exit}"
                    )));
                }
            };
        debug!(
            backend_id = %spec.backend_id,
            container = %id,
            %address,
            created_us = created.as_micros() as u64,
            started_us = started.as_micros() as u64,
            total_us = begun.elapsed().as_micros() as u64,
            "backend container started"
        );
        Ok(StartedBackend {
            address,
            handle: RuntimeHandle::Docker(DockerHandle { container_id: id, name }),
        })
    }

    async fn abandon(&self, backend_id: &BackendName) -> Result<(), RuntimeError> {
        let name = container::container_name(backend_id);
        // Removes it only if it is this drone's container for this backend.
        self.remove_leftover(&name, backend_id).await
    }

    async fn wait_ready(&self, _handle: &RuntimeHandle, address: SocketAddr) -> Result<(), RuntimeError> {
        wait_for_http(address).await;
        Ok(())
    }

    async fn signal(&self, handle: &RuntimeHandle, signal: StopSignal) -> Result<(), RuntimeError> {
        let handle = docker_handle(handle)?;
        if self.inner.tracker.has_exited(&handle.container_id) == Some(true) {
            return Ok(());
        }
        let name = match signal {
            StopSignal::Term => "SIGTERM",
            StopSignal::Kill => "SIGKILL",
        };
        let options = KillContainerOptions {
            signal: name.to_owned(),
        };
        // Bounded well below the request timeout: the backend task waits on this, and a
        // SIGKILL that did not arrive is sent again.
        let kill = self.inner.docker.kill_container(&handle.container_id, Some(options));
        match tokio::time::timeout(SIGNAL_TIMEOUT, kill).await {
            Ok(Ok(())) => Ok(()),
            // Gone, or not running: nothing to signal.
            Ok(Err(err)) if matches!(status_of(&err), Some(404 | 409)) => Ok(()),
            Ok(Err(err)) => Err(engine_err(format!("sending {name} to container {}", handle.name), &err)),
            Err(_) => Err(RuntimeError::Other(format!(
                "sending {name} to container {}: the engine did not answer within {SIGNAL_TIMEOUT:?}",
                handle.name
            ))),
        }
    }

    async fn wait_exit(&self, handle: &RuntimeHandle) -> ExitInfo {
        let handle = match docker_handle(handle) {
            Ok(h) => h,
            Err(e) => {
                return ExitInfo {
                    exit_code: None,
                    detail: Some(e.to_string()),
                }
            }
        };
        let id = handle.container_id.as_str();
        let inner = &self.inner;
        let mut exit = match inner.tracker.receiver(id) {
            Some(rx) => rx,
            None => {
                // Not started or adopted by this runtime: track it, then look, so an exit
                // between the two is not missed.
                let backend_id = handle.name.strip_prefix("plane-").unwrap_or(&handle.name);
                let rx = inner.tracker.track(id, backend_id, None);
                match inner.docker.inspect_container(id, None).await {
                    Ok(c) => {
                        if let Some(info) = container::exit_from_inspect(&c) {
                            inner.tracker.resolve(id, info);
                        }
                    }
                    Err(err) if status_of(&err) == Some(404) => {
                        inner.tracker.resolve(
                            id,
                            ExitInfo {
                                exit_code: None,
                                detail: Some("the container is gone".into()),
                            },
                        );
                    }
                    Err(err) => {
                        warn!(container = %handle.name, err = %engine_message(&err), "could not inspect a container")
                    }
                }
                rx
            }
        };
        let info = loop {
            if let Some(info) = exit.borrow_and_update().clone() {
                break info;
            }
            let open = tokio::select! {
                changed = exit.changed() => changed.is_ok(),
                _ = self.cancel.cancelled() => false,
            };
            if !open {
                // The runtime is shutting down: the exit will not be observed here.
                std::future::pending::<()>().await;
            }
        };
        inner.tracker.forget(id);
        inner.samples.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
        info
    }

    async fn adopt(&self, backend_id: &BackendName, handle: &RuntimeHandle) -> Result<Adoption, RuntimeError> {
        let handle = docker_handle(handle)?;
        let inner = &self.inner;
        let id = handle.container_id.as_str();
        // Tracked before it is inspected, so an exit right after the inspection is seen.
        inner.tracker.track(id, backend_id.as_str(), None);
        let container = match inner.docker.inspect_container(id, None).await {
            Ok(c) => c,
            Err(err) => {
                inner.tracker.forget(id);
                if status_of(&err) == Some(404) {
                    debug!(%backend_id, container = %handle.name, "backend container is gone");
                    return Ok(Adoption::Gone);
                }
                return Err(engine_err(format!("inspecting container {}", handle.name), &err));
            }
        };
        let labels = container.config.as_ref().and_then(|c| c.labels.as_ref());
        if !container::is_ours(labels, &inner.drone, backend_id) {
            inner.tracker.forget(id);
            let name = &handle.name;
            warn!(%backend_id, container = %name, "the container does not carry this backend's and drone's labels");
            return Ok(Adoption::Gone);
        }
        let running = container.state.as_ref().and_then(|s| s.running).unwrap_or(false);
        if !running {
            inner.tracker.forget(id);
            return Ok(Adoption::Gone);
        }
        let memory_limit = container
            .host_config
            .as_ref()
            .and_then(|h| h.memory)
            .filter(|m| *m > 0)
            .and_then(|m| u64::try_from(m).ok());
        inner.tracker.track(id, backend_id.as_str(), memory_limit);
        Ok(Adoption::Running)
    }

    async fn metrics(&self, handle: &RuntimeHandle) -> Option<BackendMetrics> {
        let handle = docker_handle(handle).ok()?;
        let id = handle.container_id.as_str();
        let inner = &self.inner;
        let options = StatsOptions {
            stream: false,
            one_shot: true,
        };
        let sample = async { inner.docker.stats(id, Some(options)).next().await };
        let stats = match tokio::time::timeout(METRICS_TIMEOUT, sample).await {
            Ok(Some(Ok(stats))) => stats,
            Ok(Some(Err(err))) => {
                debug!(container = %handle.name, err = %engine_message(&err), "no stats");
                return None;
            }
            _ => return None,
        };
        let at = Instant::now();
        let memory = stats.memory_stats?;
        let usage = memory.usage?;
        // As `docker stats`: without the inactive page cache.
        let inactive = memory
            .stats
            .as_ref()
            .and_then(|s| s.get("total_inactive_file").or_else(|| s.get("inactive_file")).copied());
        let memory_bytes = match inactive {
            Some(cache) if cache < usage => usage - cache,
            _ => usage,
        };
        let cpu_nanos = stats.cpu_stats?.cpu_usage?.total_usage?;
        let memory_limit_bytes = match inner.tracker.memory_limit(id) {
            Some(limit) => limit,
            None => memory.limit,
        };
        let previous = inner
            .samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_owned(), CpuSample { at, cpu_nanos });
        let cpu_percent = previous.and_then(|p| {
            let wall = at.duration_since(p.at).as_nanos() as f64;
            (wall > 0.0 && cpu_nanos >= p.cpu_nanos).then(|| (cpu_nanos - p.cpu_nanos) as f64 / wall * 100.0)
        });
        Some(BackendMetrics {
            memory_bytes,
            memory_limit_bytes,
            cpu_total_nanos: cpu_nanos,
            cpu_percent,
            sampled_at: now_ms(),
        })
    }

    async fn reconcile(&self, known: &HashSet<BackendName>) -> Result<(), RuntimeError> {
        let inner = &self.inner;
        let filters = HashMap::from([("label".to_owned(), vec![format!("{LABEL_DRONE}={}", inner.drone)])]);
        let options = ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        };
        let containers = inner
            .docker
            .list_containers(Some(options))
            .await
            .map_err(|e| engine_err("listing this drone's containers", &e))?;
        for summary in containers {
            let Some(id) = summary.id.as_deref() else { continue };
            let running = matches!(
                summary.state,
                Some(
                    ContainerSummaryStateEnum::RUNNING
                        | ContainerSummaryStateEnum::PAUSED
                        | ContainerSummaryStateEnum::RESTARTING
                )
            );
            if !running {
                continue;
            }
            let backend = summary
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_BACKEND))
                .cloned()
                .unwrap_or_default();
            if backend.parse::<BackendName>().is_ok_and(|b| known.contains(&b)) {
                continue;
            }
            let name = summary
                .names
                .as_ref()
                .and_then(|n| n.first())
                .cloned()
                .unwrap_or_default();
            warn!(
                container = %name.trim_start_matches('/'),
                backend_id = %backend,
                "a running container of this drone belongs to no backend the state store knows (its record was lost or \
                 pruned); killing it"
            );
            let options = KillContainerOptions {
                signal: "SIGKILL".to_owned(),
            };
            match inner.docker.kill_container(id, Some(options)).await {
                Ok(()) => {}
                Err(err) if matches!(status_of(&err), Some(404 | 409)) => {}
                Err(err) => {
                    warn!(container = %name, err = %engine_message(&err), "could not kill an unknown container")
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_references() {
        for good in [
            "alpine",
            "alpine:3.19",
            "localhost:5000/app:v1",
            "ghcr.io/o/app@sha256:ab12",
            "a_b-c.d/e",
        ] {
            assert!(check_image_reference(good).is_ok(), "{good}");
        }
        for bad in ["", "/abs", "a/../b", "a//b", "a?b", "a b", "x/./y", "-rf", "a#b"] {
            assert!(check_image_reference(bad).is_err(), "{bad}");
        }
    }
}
