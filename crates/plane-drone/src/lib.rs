//! The Plane drone: runs backends through a runtime and reports their lifecycle.
//!
//! A drone connects to a controller (`/ctrl/drone-socket`), receives `Spawn` and
//! `Terminate` actions, drives each backend through its statuses, reports every status
//! change, renews key leases, and terminates a backend by itself when its lease cannot
//! be renewed. It keeps a local SQLite state store so that a restarted drone re-adopts
//! the backends still running instead of killing them.
//!
//! Layout:
//! * [`config`]: [`DroneConfig`], [`ProcessRuntimeConfig`], [`DockerRuntimeConfig`],
//!   [`DroneTimings`].
//! * [`state`]: the SQLite state store — drone name, backend records, event outbox, the
//!   images the drone pulled.
//! * `connection`: the WebSocket loop — handshake, heartbeats, outbox re-sends, backoff.
//! * `drone`: routes controller messages to backend tasks; resumes recorded backends.
//! * `backend`: the per-backend state machine (one task per backend).
//! * [`runtime`]: the runtime-neutral [`Runtime`] trait, the process runtime and the
//!   Docker runtime ([`DockerRuntime`]).
//! * [`watchdog`]: a separate process (`plane drone-watchdog`) that kills backends whose
//!   hard lease deadline passed while no drone stopped them (the drone was killed, say),
//!   and the lock files that tell a drone and its watchdog about each other.
//!
//! **Architecture invariant:** every status change is in the state store's outbox before
//! it is sent, and is re-sent (after reconnects and restarts too) until acked.
//!
//! **Architecture invariant:** the state machine (`backend`) knows runtimes only through
//! [`Runtime`]; nothing outside `runtime::process` knows about pids, nothing outside
//! `runtime::docker` about containers.
//!
//! **Architecture invariant:** stopping the drone never stops its backends.

pub mod config;
pub mod runtime;
pub mod state;
pub mod watchdog;

mod backend;
mod connection;
mod drone;

#[cfg(test)]
mod test_util;
#[cfg(test)]
mod tests;

pub use config::{DockerAddressMode, DockerRuntimeConfig, DroneConfig, DroneTimings, ProcessRuntimeConfig};
pub use runtime::docker::{
    docker_reachable, engine_address, DockerHandle, DockerRuntime, CONTAINER_PORT, LABEL_BACKEND, LABEL_DRONE,
    LABEL_MANAGED,
};
pub use runtime::process::{ProcessHandle, ProcessRuntime};
pub use runtime::{
    Adoption, BackendSpec, ExitInfo, LoadProgress, Runtime, RuntimeError, RuntimeHandle, StartedBackend, StopSignal,
};
pub use state::{PulledImage, StateError, StateStore};

use anyhow::Context;
use backend::BackendContext;
use plane_types::executable::RuntimeKind;
use plane_types::names::DroneName;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

/// Terminated backends are forgotten this long after they ended (once their events are
/// acked), so a late duplicate `Spawn` or `Terminate` still finds them.
const KEEP_TERMINATED: Duration = Duration::from_secs(3600);

/// Runs a drone until `shutdown` is cancelled.
///
/// The drone offers the process runtime if `config.process.allow_commands` allows
/// anything, and the Docker runtime if `config.docker` is set (the engine must answer).
/// On shutdown it stops talking to the controller and returns, leaving running backends
/// alone: the next run with the same `db_path` re-adopts them. Fails only on setup
/// errors that retrying cannot fix — the state database cannot be opened, the
/// controller URL or an allow pattern is invalid, the Docker engine is unreachable, or
/// the controller rejects the handshake (e.g. a protocol version mismatch). Connection
/// failures are retried forever with backoff.
///
/// While it runs, the drone holds [`watchdog::DroneLock`] on its state database, which
/// tells a watchdog that a drone runs for it; with `config.event_journal`, status changes
/// also go to that journal.
pub async fn run(config: DroneConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let urls = plane_types::protocol::socket_urls(&config.controller_url, plane_types::protocol::DRONE_SOCKET_PATH)
        .map_err(anyhow::Error::msg)?;
    if urls.iter().any(|u| u.starts_with("wss://")) {
        // Several rustls providers may be compiled in; pick one unless someone did.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    let _drone_lock = match watchdog::DroneLock::acquire(&config.db_path).await {
        Ok(lock) => Some(lock),
        Err(err) => {
            // Only the watchdog's exit rule looks at it: without it, a watchdog may exit
            // while this drone runs, once no backend needs watching.
            warn!(%err, "cannot take the drone lock next to the state store");
            None
        }
    };
    let store = StateStore::open(&config.db_path)
        .await
        .with_context(|| format!("opening the drone state store {}", config.db_path.display()))?;
    let store = match &config.event_journal {
        Some(path) => store.with_event_journal(path),
        None => store,
    };
    let result = run_with_store(config, urls, &store, shutdown).await;
    store.close().await;
    result
}

async fn drone_name(config: &DroneConfig, store: &StateStore) -> anyhow::Result<DroneName> {
    let stored = store.drone_name().await.context("reading the drone name")?;
    let name = match (&config.name, stored) {
        (Some(name), Some(stored)) if *name == stored => return Ok(stored),
        (Some(name), stored) => {
            if let Some(stored) = stored {
                // Backends are labelled with the drone's name and the controller knows
                // them by it: renaming a drone that still runs some would orphan them.
                let live = store.live_backends().await.context("reading the backend records")?;
                if !live.is_empty() {
                    anyhow::bail!(
                        "the state store {} belongs to drone {stored}, which still runs {} backend(s); \
                         starting it as {name} would orphan them (start it as {stored}, or terminate them first)",
                        config.db_path.display(),
                        live.len()
                    );
                }
                warn!(%stored, configured = %name, "the configured drone name differs from the stored one; using the configured name");
            }
            name.clone()
        }
        (None, Some(stored)) => return Ok(stored),
        (None, None) => DroneName::new_random(),
    };
    store.set_drone_name(&name).await.context("storing the drone name")?;
    Ok(name)
}

async fn run_with_store(
    config: DroneConfig,
    urls: Vec<String>,
    store: &StateStore,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let name = drone_name(&config, store).await?;
    let span = tracing::info_span!("drone", drone = %name);
    async move {
        let cutoff = state::now_ms().saturating_sub(KEEP_TERMINATED.as_millis() as u64);
        if let Err(err) = store.prune_terminated(cutoff).await {
            warn!(%err, "could not prune old backend records");
        }
        let tasks = shutdown.child_token();
        // The process runtime always exists, to resume or stop recorded process backends;
        // it is offered only if it may run something.
        let process = ProcessRuntime::new(config.process.clone(), tasks.child_token())
            .context("configuring the process runtime")?;
        let mut runtimes: Vec<Arc<dyn Runtime>> = vec![Arc::new(process)];
        if let Some(docker) = &config.docker {
            let address = engine_address(docker);
            let store = Some(store.clone());
            let runtime = DockerRuntime::connect(docker.clone(), name.clone(), store, tasks.child_token())
                .await
                .with_context(|| format!("setting up the Docker runtime (engine at {address})"))?;
            runtimes.push(Arc::new(runtime));
        }
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let ctx = BackendContext {
            store: store.clone(),
            outgoing: tx,
            timings: config.timings,
        };
        let mut drone = drone::Drone::new(runtimes, ctx, tasks.clone());
        if config.process.allow_commands.is_empty() {
            drone.hide(RuntimeKind::Process);
        }
        drone
            .recover()
            .await
            .context("reading the backends recorded by an earlier run")?;

        let identity = connection::Identity {
            name,
            cluster: config.cluster.clone(),
            pool: config.pool.clone(),
            ctrl_token: config.ctrl_token.clone(),
        };
        info!(controllers = ?urls, "drone starting");
        let result = connection::run(&urls, &identity, &mut drone, store, &mut rx, &config.timings, &shutdown).await;
        tasks.cancel();
        drone.shutdown().await;
        info!("drone stopped; its backends keep running");
        result
    }
    .instrument(span)
    .await
}
