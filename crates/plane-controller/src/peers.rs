//! Several controllers on one database: each change one controller makes that matters
//! to connections held by another (a status change for a stream or a route wait, a
//! spawn or termination for a drone, an invalidation for proxies, load progress and
//! metrics kept in memory) goes out as a [`Notice`] through the store's fan-out
//! (PostgreSQL `NOTIFY`), and every other controller delivers it to its own
//! connections exactly as it delivers its own changes.
//!
//! **Nothing is lost:** notices are hints, the store holds the truth. Each controller's
//! notices carry a sequence number, and every controller pings itself through the
//! database every [`PING_INTERVAL`]. Whenever a listener may have missed something — its
//! connection dropped, a sender's sequence skipped, its own pings stopped coming back —
//! it reconnects if needed and then *resyncs*: status streams and route waits re-read
//! the store, proxies drop their cached routes, and every drone connected here is sent
//! its scheduled spawns and pending terminations again (drones ignore duplicates).

use crate::state::Controller;
use plane_store::fanout::{SharedFanout, MAX_PAYLOAD};
use plane_types::names::{BackendName, ClusterName, DroneName};
use plane_types::protocol::{BackendMetrics, ControllerToProxy, LoadProgress};
use plane_types::status::{TerminationKind, TerminationReason};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// How often a controller pings itself (and the others) through the database.
pub const PING_INTERVAL: Duration = Duration::from_secs(2);

/// A listener that has not heard its own ping for this long reconnects.
pub const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Notices waiting for the database beyond this are dropped (receivers see the gap in
/// the sequence and resync).
const MAX_PENDING: usize = 50_000;

/// Notices sent in one round trip.
const BATCH: usize = 256;

/// What one controller tells the others.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Notice {
    /// A backend's status changed: streams and route waits re-read it.
    Status {
        /// The backend.
        backend_id: BackendName,
        /// It is terminated: its progress and metrics are forgotten.
        #[serde(default)]
        terminated: bool,
    },
    /// A backend was scheduled on a drone connected elsewhere: its controller sends
    /// the spawn.
    Spawn {
        /// The drone.
        drone: DroneName,
        /// The backend.
        backend_id: BackendName,
    },
    /// A termination was requested for a backend of a drone connected elsewhere.
    Terminate {
        /// The drone.
        drone: DroneName,
        /// The backend.
        backend_id: BackendName,
        /// Soft or hard.
        termination: TerminationKind,
        /// Why.
        reason: TerminationReason,
    },
    /// A message for every proxy (of `cluster`, if given).
    Proxies {
        /// The cluster.
        cluster: Option<ClusterName>,
        /// The message.
        message: ControllerToProxy,
    },
    /// A load-progress report.
    Progress {
        /// The backend.
        backend_id: BackendName,
        /// The report.
        progress: LoadProgress,
    },
    /// A resource-use sample.
    Metrics {
        /// The backend.
        backend_id: BackendName,
        /// The drone that took it.
        drone: DroneName,
        /// The sample.
        metrics: BackendMetrics,
    },
    /// Liveness of the sender and of the listener's connection.
    Ping,
}

impl Notice {
    /// Progress, metrics and pings are superseded by the next ones: they are dropped
    /// rather than retried when the database is unavailable.
    fn is_ephemeral(&self) -> bool {
        matches!(self, Notice::Progress { .. } | Notice::Metrics { .. } | Notice::Ping)
    }
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    /// The sending controller instance.
    from: String,
    /// Its sequence number, from 1, without gaps unless notices were dropped.
    seq: u64,
    notice: Notice,
}

/// This controller's side of the fan-out.
pub struct Peers {
    fanout: SharedFanout,
    /// This controller instance (its name plus a random part: a restarted controller
    /// is a new sender).
    id: String,
    /// Numbering and queueing happen under this lock, so numbers are in queue order.
    tx: std::sync::Mutex<mpsc::UnboundedSender<(u64, Notice)>>,
    rx: std::sync::Mutex<Option<mpsc::UnboundedReceiver<(u64, Notice)>>>,
    /// The sequence number of the last notice queued.
    queued: AtomicU64,
    /// Every notice up to this sequence number was sent (or dropped).
    done: watch::Sender<u64>,
    /// A resync is running / another one is wanted after it.
    resyncing: AtomicBool,
    resync_again: AtomicBool,
}

impl Peers {
    /// Fan-out through `fanout` for the controller named `name`.
    pub fn new(fanout: SharedFanout, name: &str) -> Peers {
        let (tx, rx) = mpsc::unbounded_channel();
        Peers {
            fanout,
            id: format!("{name}/{:016x}", rand::random::<u64>()),
            tx: std::sync::Mutex::new(tx),
            rx: std::sync::Mutex::new(Some(rx)),
            queued: AtomicU64::new(0),
            done: watch::channel(0).0,
            resyncing: AtomicBool::new(false),
            resync_again: AtomicBool::new(false),
        }
    }

    /// Queues a notice for the other controllers.
    pub fn send(&self, notice: Notice) {
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        let seq = self.queued.fetch_add(1, Ordering::SeqCst) + 1;
        let _ = tx.send((seq, notice));
    }

    /// Waits until every notice queued so far has reached the database, so that what
    /// the caller acknowledges next (a drone event, an API answer) is known to the
    /// other controllers even if this one dies right after. False after `timeout`.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let target = self.queued.load(Ordering::SeqCst);
        let mut done = self.done.subscribe();
        tokio::time::timeout(timeout, done.wait_for(|d| *d >= target))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

/// Starts the sender and the listener of `c`'s fan-out; they stop when `stop` is
/// cancelled (after the HTTP server has finished its requests, so that their notices
/// can still go out: see [`crate::serve`]).
pub fn start(c: &Arc<Controller>, stop: CancellationToken) -> Vec<tokio::task::JoinHandle<()>> {
    let Some(peers) = c.peers.as_ref() else {
        return Vec::new();
    };
    let Some(rx) = peers.rx.lock().unwrap_or_else(|p| p.into_inner()).take() else {
        return Vec::new();
    };
    vec![
        tokio::spawn(send_loop(Arc::downgrade(c), rx, stop.clone())),
        tokio::spawn(listen_loop(Arc::downgrade(c), stop)),
    ]
}

async fn send_loop(c: Weak<Controller>, mut rx: mpsc::UnboundedReceiver<(u64, Notice)>, shutdown: CancellationToken) {
    let Some((fanout, id, peers)) = c.upgrade().and_then(|c| {
        let p = c.peers.as_ref()?;
        Some((p.fanout.clone(), p.id.clone(), p.done.clone()))
    }) else {
        return;
    };
    // Pings are numbered after every notice the controller has queued: `seq` follows
    // the highest number seen.
    let mut seq = 0u64;
    let mut pending: VecDeque<(u64, Notice)> = VecDeque::new();
    let mut ping = tokio::time::interval(PING_INTERVAL);
    let mut failing_since: Option<Instant> = None;
    let mut delay = Duration::from_millis(50);
    let c_weak = c;
    loop {
        if pending.is_empty() {
            tokio::select! {
                n = rx.recv() => match n {
                    Some(n) => { seq = seq.max(n.0); pending.push_back(n); }
                    None => return,
                },
                _ = ping.tick() => {
                    // A ping takes the next number from the controller's counter, so it
                    // never collides with a queued notice.
                    let Some(c) = c_weak.upgrade() else { return };
                    let Some(p) = c.peers.as_ref() else { return };
                    p.send(Notice::Ping);
                    continue;
                }
                () = shutdown.cancelled() => return,
            }
        }
        while let Ok(n) = rx.try_recv() {
            seq = seq.max(n.0);
            pending.push_back(n);
        }
        if pending.len() > MAX_PENDING {
            let excess = pending.len() - MAX_PENDING;
            pending.drain(..excess);
            tracing::error!(
                dropped = excess,
                "too many notices waiting for the database; dropped the oldest (other controllers will resync)"
            );
        }
        let batch: Vec<String> = pending
            .iter()
            .take(BATCH)
            .filter_map(|(seq, notice)| encode(&id, *seq, notice))
            .collect();
        let taken = pending.len().min(BATCH);
        let sent = tokio::select! {
            r = fanout.notify(&batch) => r,
            () = shutdown.cancelled() => return,
        };
        match sent {
            Ok(()) => {
                pending.drain(..taken);
                if let Some(since) = failing_since.take() {
                    tracing::info!(after = ?since.elapsed(), "notices reach the other controllers again");
                }
                delay = Duration::from_millis(50);
            }
            Err(e) => {
                if failing_since.is_none() {
                    tracing::warn!(error = %e, "cannot send notices to the other controllers; retrying");
                    failing_since = Some(Instant::now());
                }
                pending.retain(|(_, n)| !n.is_ephemeral());
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    () = shutdown.cancelled() => return,
                }
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
        // Everything before the first notice still waiting is sent or dropped.
        let done = pending.front().map_or(seq, |(s, _)| s - 1);
        peers.send_if_modified(|d| {
            let moved = done > *d;
            *d = (*d).max(done);
            moved
        });
    }
}

/// The payload of a notice, or `None` (logged) if it cannot be sent.
fn encode(from: &str, seq: u64, notice: &Notice) -> Option<String> {
    let envelope = Envelope {
        from: from.to_owned(),
        seq,
        notice: notice.clone(),
    };
    match serde_json::to_string(&envelope) {
        Ok(s) if s.len() <= MAX_PAYLOAD => Some(s),
        Ok(s) => {
            // Only a drone's free-form progress message can be this long.
            tracing::warn!(bytes = s.len(), "dropping a notice over the size limit");
            None
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot encode a notice");
            None
        }
    }
}

async fn listen_loop(c: Weak<Controller>, shutdown: CancellationToken) {
    let Some((fanout, id)) = c.upgrade().and_then(|c| {
        let p = c.peers.as_ref()?;
        Some((p.fanout.clone(), p.id.clone()))
    }) else {
        return;
    };
    let mut delay = Duration::from_millis(50);
    loop {
        let listener = tokio::select! {
            l = fanout.listen() => l,
            () = shutdown.cancelled() => return,
        };
        let mut listener = match listener {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for other controllers' notices; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    () = shutdown.cancelled() => return,
                }
                delay = (delay * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        delay = Duration::from_millis(50);
        // Whatever happened while no listener was connected is in the store.
        resync(&c, "listener connected");
        let mut senders: HashMap<String, (u64, Instant)> = HashMap::new();
        let mut own_ping = Instant::now();
        let mut check = tokio::time::interval(PING_INTERVAL);
        loop {
            tokio::select! {
                r = listener.recv() => match r {
                    Ok(payload) => {
                        let Ok(envelope) = serde_json::from_str::<Envelope>(&payload) else {
                            tracing::warn!(payload = %payload.chars().take(200).collect::<String>(), "ignoring an invalid notice");
                            continue;
                        };
                        if envelope.from == id {
                            own_ping = Instant::now();
                            continue;
                        }
                        let now = Instant::now();
                        match senders.insert(envelope.from.clone(), (envelope.seq, now)) {
                            Some((last, _)) if envelope.seq != last + 1 => {
                                tracing::warn!(from = %envelope.from, expected = last + 1, got = envelope.seq, "notices from a controller were missed");
                                resync(&c, "notices missed");
                            }
                            _ => {}
                        }
                        let Some(c) = c.upgrade() else { return };
                        c.deliver(envelope.notice);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "lost the connection that listens for other controllers' notices; reconnecting");
                        break;
                    }
                },
                _ = check.tick() => {
                    if own_ping.elapsed() > LISTEN_TIMEOUT {
                        tracing::warn!(silent = ?own_ping.elapsed(), "this controller's own pings stopped coming back; reconnecting the listener");
                        break;
                    }
                    // Forget senders silent for long: stopped controllers.
                    senders.retain(|_, (_, seen)| seen.elapsed() < LISTEN_TIMEOUT * 6);
                }
                () = shutdown.cancelled() => return,
            }
        }
    }
}

fn resync(c: &Weak<Controller>, why: &'static str) {
    let Some(c) = c.upgrade() else { return };
    let Some(p) = c.peers.as_ref() else { return };
    // One resync at a time; asks that arrive meanwhile make it run once more.
    if p.resyncing.swap(true, Ordering::SeqCst) {
        p.resync_again.store(true, Ordering::SeqCst);
        return;
    }
    tokio::spawn(async move {
        let Some(p) = c.peers.as_ref() else { return };
        loop {
            p.resync_again.store(false, Ordering::SeqCst);
            tracing::info!(why, "resyncing connections with the store");
            c.resync().await;
            if p.resync_again.load(Ordering::SeqCst) {
                continue;
            }
            p.resyncing.store(false, Ordering::SeqCst);
            // An ask that came just before the store above found a resync running.
            if !p.resync_again.load(Ordering::SeqCst) || p.resyncing.swap(true, Ordering::SeqCst) {
                return;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_round_trip() {
        let notices = [
            Notice::Status {
                backend_id: "ba-1".parse().unwrap(),
                terminated: true,
            },
            Notice::Terminate {
                drone: "dr-1".parse().unwrap(),
                backend_id: "ba-1".parse().unwrap(),
                termination: TerminationKind::Hard,
                reason: TerminationReason::External,
            },
            Notice::Proxies {
                cluster: None,
                message: ControllerToProxy::TokenRevoked { token: "t".into() },
            },
            Notice::Ping,
        ];
        for (i, n) in notices.iter().enumerate() {
            let s = encode("co-a/1", i as u64, n).unwrap();
            let e: Envelope = serde_json::from_str(&s).unwrap();
            assert_eq!((e.from.as_str(), e.seq, &e.notice), ("co-a/1", i as u64, n));
        }
    }

    #[test]
    fn oversized_notices_are_not_sent() {
        let progress = LoadProgress {
            message: "x".repeat(MAX_PAYLOAD),
            fraction: None,
            bytes_done: None,
            bytes_total: None,
        };
        let n = Notice::Progress {
            backend_id: "ba-1".parse().unwrap(),
            progress,
        };
        assert!(encode("co-a/1", 1, &n).is_none());
    }
}
