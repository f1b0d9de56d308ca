//! The controller's shared state: the store, the connected drones and proxies, and the
//! status bus that feeds status streams and route waits.
//!
//! Connections are in memory; everything that must survive a controller restart is in
//! the store.

use crate::config::ControllerConfig;
use plane_store::SharedStore;
use plane_types::lease::estimate_remote_now;
use plane_types::names::{BackendName, ClusterName, DroneName};
use plane_types::protocol::{BackendMetrics, ControllerToDrone, ControllerToProxy, LoadProgress};
use plane_types::status::StatusEntry;
use plane_types::EpochMillis;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

/// A status change, as published on the bus.
#[derive(Clone, Debug)]
pub struct StatusChange {
    /// The backend.
    pub backend_id: BackendName,
    /// Its new entry.
    pub entry: StatusEntry,
}

/// A load-progress report, as published on the progress bus.
#[derive(Clone, Debug)]
pub struct ProgressChange {
    /// The backend.
    pub backend_id: BackendName,
    /// How far its loading step has got.
    pub progress: LoadProgress,
}

/// Whether load progress is still worth showing for a backend in `status`: it has not
/// started yet.
pub fn shows_progress(status: plane_types::status::BackendStatus) -> bool {
    status < plane_types::status::BackendStatus::Starting
}

/// What drones last reported of a live backend, beyond its status: kept in memory only
/// (a restarted controller learns it again from the next reports), dropped once the
/// backend is terminated.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// The latest load progress.
    pub progress: Option<LoadProgress>,
    /// The latest resource-use sample, with the drone that took it.
    pub metrics: Option<(DroneName, BackendMetrics)>,
    /// When the last report arrived (`None` for an empty record).
    pub updated: Option<Instant>,
}

/// The most backends whose reports are kept in memory; past it, reports of backends not
/// yet seen are dropped (a store that lost track of terminations must not grow this).
const MAX_OBSERVED: usize = 100_000;

/// A connected drone.
struct DroneConn {
    conn_id: u64,
    tx: mpsc::UnboundedSender<ControllerToDrone>,
    /// The drone's clock as of its last message that carried one.
    last_local_time: EpochMillis,
    /// When (on our monotonic clock) that message arrived.
    received_at: Instant,
}

/// A connected proxy.
struct ProxyConn {
    cluster: ClusterName,
    tx: mpsc::UnboundedSender<ControllerToProxy>,
}

/// Shared by every handler and background task of one controller.
pub struct Controller {
    /// The configuration.
    pub config: ControllerConfig,
    drones: Mutex<HashMap<DroneName, DroneConn>>,
    proxies: Mutex<HashMap<u64, ProxyConn>>,
    bus: broadcast::Sender<StatusChange>,
    progress_bus: broadcast::Sender<ProgressChange>,
    observed: Mutex<HashMap<BackendName, Observed>>,
    next_conn_id: AtomicU64,
    /// Cancelled when the controller stops; ends sockets and background tasks.
    pub shutdown: CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these short locks cannot leave the maps inconsistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Controller {
    /// New state for `config`.
    pub fn new(config: ControllerConfig, shutdown: CancellationToken) -> Arc<Controller> {
        let (bus, _) = broadcast::channel(4096);
        let (progress_bus, _) = broadcast::channel(1024);
        Arc::new(Controller {
            config,
            drones: Mutex::new(HashMap::new()),
            proxies: Mutex::new(HashMap::new()),
            bus,
            progress_bus,
            observed: Mutex::new(HashMap::new()),
            next_conn_id: AtomicU64::new(1),
            shutdown,
        })
    }

    /// The store.
    pub fn store(&self) -> &SharedStore {
        &self.config.store
    }

    /// A fresh connection id.
    pub fn conn_id(&self) -> u64 {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Publishes a status change to status streams and route waits. A terminated
    /// backend's progress and metrics are forgotten.
    pub fn publish(&self, backend_id: BackendName, entry: StatusEntry) {
        if entry.status.is_terminal() {
            lock(&self.observed).remove(&backend_id);
        }
        let _ = self.bus.send(StatusChange { backend_id, entry });
    }

    fn observe(&self, backend_id: &BackendName, update: impl FnOnce(&mut Observed)) {
        let mut observed = lock(&self.observed);
        if observed.len() >= MAX_OBSERVED && !observed.contains_key(backend_id) {
            tracing::warn!(%backend_id, "too many backends with reports in memory; dropping a report");
            return;
        }
        let o = observed.entry(backend_id.clone()).or_default();
        update(o);
        o.updated = Some(Instant::now());
    }

    /// Records a load-progress report and publishes it to status streams that asked
    /// for progress.
    pub fn publish_progress(&self, backend_id: BackendName, progress: LoadProgress) {
        self.observe(&backend_id, |o| o.progress = Some(progress.clone()));
        let _ = self.progress_bus.send(ProgressChange { backend_id, progress });
    }

    /// Records a resource-use sample.
    pub fn record_metrics(&self, backend_id: &BackendName, drone: &DroneName, metrics: BackendMetrics) {
        self.observe(backend_id, |o| o.metrics = Some((drone.clone(), metrics)));
    }

    /// What drones last reported of a backend.
    pub fn observed(&self, backend_id: &BackendName) -> Observed {
        lock(&self.observed).get(backend_id).cloned().unwrap_or_default()
    }

    /// Forgets reports older than `max_age`: live backends report metrics far more
    /// often, and a report that raced past its backend's termination must not stay.
    pub fn prune_observed(&self, max_age: std::time::Duration) {
        lock(&self.observed).retain(|_, o| o.updated.is_some_and(|t| t.elapsed() < max_age));
    }

    /// Subscribes to load-progress reports.
    pub fn subscribe_progress(&self) -> broadcast::Receiver<ProgressChange> {
        self.progress_bus.subscribe()
    }

    /// Subscribes to status changes.
    pub fn subscribe(&self) -> broadcast::Receiver<StatusChange> {
        self.bus.subscribe()
    }

    /// Registers a drone connection, replacing an older one of the same drone.
    pub fn add_drone(
        &self,
        name: DroneName,
        conn_id: u64,
        tx: mpsc::UnboundedSender<ControllerToDrone>,
        local_time: EpochMillis,
    ) {
        lock(&self.drones).insert(
            name,
            DroneConn {
                conn_id,
                tx,
                last_local_time: local_time,
                received_at: Instant::now(),
            },
        );
    }

    /// Removes a drone connection if it is still the current one. Returns whether it was.
    pub fn remove_drone(&self, name: &DroneName, conn_id: u64) -> bool {
        let mut drones = lock(&self.drones);
        if drones.get(name).is_some_and(|c| c.conn_id == conn_id) {
            drones.remove(name);
            true
        } else {
            false
        }
    }

    /// Records a drone clock reading.
    pub fn drone_clock(&self, name: &DroneName, local_time: EpochMillis) {
        if let Some(c) = lock(&self.drones).get_mut(name) {
            c.last_local_time = local_time;
            c.received_at = Instant::now();
        }
    }

    /// Our best (early-erring) estimate of a connected drone's clock now.
    pub fn drone_now(&self, name: &DroneName) -> Option<EpochMillis> {
        lock(&self.drones)
            .get(name)
            .map(|c| estimate_remote_now(c.last_local_time, c.received_at.elapsed()))
    }

    /// Whether a drone is connected to this controller.
    pub fn has_drone(&self, name: &DroneName) -> bool {
        lock(&self.drones).contains_key(name)
    }

    /// Sends to a drone. False if it is not connected here.
    pub fn send_drone(&self, name: &DroneName, msg: ControllerToDrone) -> bool {
        lock(&self.drones).get(name).is_some_and(|c| c.tx.send(msg).is_ok())
    }

    /// Registers a proxy connection.
    pub fn add_proxy(&self, conn_id: u64, cluster: ClusterName, tx: mpsc::UnboundedSender<ControllerToProxy>) {
        lock(&self.proxies).insert(conn_id, ProxyConn { cluster, tx });
    }

    /// Removes a proxy connection.
    pub fn remove_proxy(&self, conn_id: u64) {
        lock(&self.proxies).remove(&conn_id);
    }

    /// Sends to every proxy (of `cluster`, if given).
    pub fn broadcast_proxies(&self, cluster: Option<&ClusterName>, msg: ControllerToProxy) {
        for p in lock(&self.proxies).values() {
            if cluster.is_none_or(|c| *c == p.cluster) {
                let _ = p.tx.send(msg.clone());
            }
        }
    }
}
