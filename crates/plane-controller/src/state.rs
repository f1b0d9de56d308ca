//! The controller's shared state: the store, the connected drones and proxies, and the
//! status bus that feeds status streams and route waits.
//!
//! Connections are in memory; everything that must survive a controller restart is in
//! the store.

use crate::config::ControllerConfig;
use crate::peers::{Notice, Peers};
use plane_store::SharedStore;
use plane_types::lease::estimate_remote_now;
use plane_types::names::{BackendName, ClusterName, DroneName};
use plane_types::protocol::{BackendMetrics, ControllerToDrone, ControllerToProxy, LoadProgress};
use plane_types::status::{StatusEntry, TerminationKind, TerminationReason};
use plane_types::EpochMillis;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

/// A status change, as published on the bus. Subscribers re-read the store: the bus
/// says only what to re-read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StatusChange {
    /// This backend's status changed.
    Backend(BackendName),
    /// Any backend's may have (notices from other controllers were missed).
    Everything,
}

impl StatusChange {
    /// Whether a subscriber watching `backend_id` must re-read it.
    pub fn concerns(&self, backend_id: &BackendName) -> bool {
        match self {
            StatusChange::Backend(b) => b == backend_id,
            StatusChange::Everything => true,
        }
    }
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
    /// The fan-out to other controllers sharing the store (`None` on SQLite).
    pub peers: Option<Peers>,
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
        let peers = config
            .fanout
            .clone()
            .map(|fanout| Peers::new(fanout, config.name.as_str()));
        Arc::new(Controller {
            config,
            drones: Mutex::new(HashMap::new()),
            proxies: Mutex::new(HashMap::new()),
            bus,
            progress_bus,
            observed: Mutex::new(HashMap::new()),
            next_conn_id: AtomicU64::new(1),
            peers,
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

    /// Publishes a status change to status streams and route waits, here and on the
    /// other controllers. A terminated backend's progress and metrics are forgotten.
    pub fn publish(&self, backend_id: BackendName, entry: &StatusEntry) {
        self.publish_status(backend_id, entry.status.is_terminal());
    }

    /// Tells status streams and route waits, here and on the other controllers, to
    /// re-read a backend (whose status may have changed).
    pub fn publish_hint(&self, backend_id: BackendName) {
        self.publish_status(backend_id, false);
    }

    fn publish_status(&self, backend_id: BackendName, terminated: bool) {
        self.to_peers(|| Notice::Status {
            backend_id: backend_id.clone(),
            terminated,
        });
        self.status_here(backend_id, terminated);
    }

    fn status_here(&self, backend_id: BackendName, terminated: bool) {
        if terminated {
            lock(&self.observed).remove(&backend_id);
        }
        let _ = self.bus.send(StatusChange::Backend(backend_id));
    }

    /// Asks the controller that `drone` is connected to to send the spawn of `backend_id`.
    pub(crate) fn spawn_elsewhere(&self, drone: &DroneName, backend_id: &BackendName) {
        self.to_peers(|| Notice::Spawn {
            drone: drone.clone(),
            backend_id: backend_id.clone(),
        });
    }

    fn to_peers(&self, notice: impl FnOnce() -> Notice) {
        if let Some(p) = &self.peers {
            p.send(notice());
        }
    }

    /// Asks the drone running a backend to terminate it: directly if it is connected
    /// here, and through the other controllers in any case (the one it is connected to
    /// sends it). The request is in the store already, so a drone connected nowhere gets
    /// it when it reconnects.
    pub fn terminate_on(
        &self,
        drone: &DroneName,
        backend_id: BackendName,
        kind: TerminationKind,
        reason: TerminationReason,
    ) {
        let msg = ControllerToDrone::Terminate {
            backend_id: backend_id.clone(),
            kind,
            reason,
        };
        // Told to the others even when the drone is connected here: this connection
        // may be a dead one the drone has left for another controller.
        self.send_drone(drone, msg);
        self.to_peers(|| Notice::Terminate {
            drone: drone.clone(),
            backend_id,
            termination: kind,
            reason,
        });
    }

    /// Sends to every proxy (of `cluster`, if given), here and on other controllers.
    pub fn to_proxies(&self, cluster: Option<&ClusterName>, msg: ControllerToProxy) {
        self.to_peers(|| Notice::Proxies {
            cluster: cluster.cloned(),
            message: msg.clone(),
        });
        self.broadcast_proxies(cluster, msg);
    }

    /// Acts on a notice from another controller, for the connections held here.
    pub fn deliver(self: &Arc<Self>, notice: Notice) {
        match notice {
            Notice::Status { backend_id, terminated } => self.status_here(backend_id, terminated),
            Notice::Spawn { drone, backend_id } => {
                if self.has_drone(&drone) {
                    let c = self.clone();
                    tokio::spawn(async move {
                        if let Err(e) = c.resend_spawn(&drone, &backend_id).await {
                            tracing::warn!(%drone, %backend_id, error = %e, "cannot send a spawn scheduled by another controller (re-sent on resync)");
                        }
                    });
                }
            }
            Notice::Terminate {
                drone,
                backend_id,
                termination,
                reason,
            } => {
                self.send_drone(
                    &drone,
                    ControllerToDrone::Terminate {
                        backend_id,
                        kind: termination,
                        reason,
                    },
                );
            }
            Notice::Proxies { cluster, message } => self.broadcast_proxies(cluster.as_ref(), message),
            Notice::Progress { backend_id, progress } => self.progress_here(backend_id, progress),
            Notice::Metrics {
                backend_id,
                drone,
                metrics,
            } => self.metrics_here(&backend_id, &drone, metrics),
            Notice::Ping => {}
        }
    }

    /// After notices from other controllers may have been missed: status streams and
    /// route waits re-read the store, proxies drop their cached routes, and drones
    /// connected here get their scheduled spawns and pending terminations again.
    pub async fn resync(self: &Arc<Self>) {
        let _ = self.bus.send(StatusChange::Everything);
        self.broadcast_proxies(None, ControllerToProxy::ResetRoutes);
        self.resend_to_drones().await;
    }

    /// Sends every drone connected here its scheduled spawns and pending terminations
    /// again.
    pub async fn resend_to_drones(&self) {
        let drones: Vec<DroneName> = lock(&self.drones).keys().cloned().collect();
        for drone in drones {
            if let Err(e) = self.resend_pending(&drone).await {
                tracing::warn!(%drone, error = %e, "cannot re-send pending actions");
            }
        }
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
    /// for progress, here and on the other controllers.
    pub fn publish_progress(&self, backend_id: BackendName, progress: LoadProgress) {
        self.to_peers(|| Notice::Progress {
            backend_id: backend_id.clone(),
            progress: progress.clone(),
        });
        self.progress_here(backend_id, progress);
    }

    fn progress_here(&self, backend_id: BackendName, progress: LoadProgress) {
        self.observe(&backend_id, |o| o.progress = Some(progress.clone()));
        let _ = self.progress_bus.send(ProgressChange { backend_id, progress });
    }

    /// Records a resource-use sample, here and on the other controllers.
    pub fn record_metrics(&self, backend_id: &BackendName, drone: &DroneName, metrics: BackendMetrics) {
        self.to_peers(|| Notice::Metrics {
            backend_id: backend_id.clone(),
            drone: drone.clone(),
            metrics: metrics.clone(),
        });
        self.metrics_here(backend_id, drone, metrics);
    }

    fn metrics_here(&self, backend_id: &BackendName, drone: &DroneName, metrics: BackendMetrics) {
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

    /// Waits (at most 5 s) until the notices queued so far reached the database, so an
    /// acknowledgement that follows survives this controller's death. True at once
    /// without other controllers.
    pub async fn flush_peers(&self) -> bool {
        match &self.peers {
            Some(p) => p.flush(std::time::Duration::from_secs(5)).await,
            None => true,
        }
    }

    /// Whether drones connected to other controllers can be scheduled from here.
    pub fn has_peers(&self) -> bool {
        self.peers.is_some()
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

    /// Sends to every proxy connected here (of `cluster`, if given).
    pub fn broadcast_proxies(&self, cluster: Option<&ClusterName>, msg: ControllerToProxy) {
        for p in lock(&self.proxies).values() {
            if cluster.is_none_or(|c| *c == p.cluster) {
                let _ = p.tx.send(msg.clone());
            }
        }
    }
}
