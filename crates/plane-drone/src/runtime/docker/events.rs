//! How the Docker runtime learns that containers exited: one long-lived subscription to
//! the engine's events (containers labelled with this drone; `die`, `destroy`, `oom`),
//! dispatching to the per-container waiters of a [`Tracker`].
//!
//! * A container is tracked before it can die unseen: `start` tracks it right after
//!   creating it (before starting it), `adopt` before inspecting it.
//! * When the stream ends or fails, it is opened again after a backoff, with `since` set
//!   to the engine time of the last event seen, so the engine replays what happened in
//!   between. Because that replay is bounded (the engine keeps only its most recent
//!   events), every tracked container that has not exited yet is then inspected too: one
//!   found stopped gets its exit code from the inspection, one that is gone gets an exit
//!   with an unknown code and a detail saying so.
//! * A test hook ([`EventsControl`]) can cut the stream and hold it closed, and reopen it
//!   without the replay, to exercise that reconciliation honestly.

use super::container::{exit_from_inspect, exit_info};
use super::{engine_message, status_of, Inner, LABEL_DRONE};
use crate::runtime::ExitInfo;
use bollard::models::EventMessage;
use bollard::query_parameters::EventsOptions;
use futures_util::StreamExt;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// First delay before the stream is reopened.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Largest delay before the stream is reopened.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A stream that stayed up this long resets the backoff.
const HEALTHY_STREAM: Duration = Duration::from_secs(10);

/// The exit of a tracked container: `None` until it has exited.
pub(super) type ExitReceiver = watch::Receiver<Option<ExitInfo>>;

/// A container whose exit the runtime watches.
struct Tracked {
    /// For logs.
    backend_id: String,
    exit: watch::Sender<Option<ExitInfo>>,
    /// The engine reported an OOM kill (the `oom` event comes before `die`).
    oom: bool,
    /// The container's memory limit, if it has one (for metrics).
    memory_limit: Option<u64>,
}

#[derive(Default)]
struct TrackerState {
    /// By container id.
    containers: HashMap<String, Tracked>,
    /// Names of containers being created (not tracked by id yet).
    starting: HashSet<String>,
}

/// The containers the runtime watches, and those it is creating. The cleanup task never
/// removes either.
#[derive(Default)]
pub(super) struct Tracker {
    state: Mutex<TrackerState>,
}

/// Marks a container name as being created until dropped.
pub(super) struct Starting<'a> {
    tracker: &'a Tracker,
    name: String,
}

impl Drop for Starting<'_> {
    fn drop(&mut self) {
        self.tracker.lock().starting.remove(&self.name);
    }
}

impl Tracker {
    fn lock(&self) -> MutexGuard<'_, TrackerState> {
        // A poisoned lock only means another thread panicked while holding it; the maps
        // are still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Protects `name` from cleanup while its container is created.
    pub fn starting(&self, name: &str) -> Starting<'_> {
        self.lock().starting.insert(name.to_owned());
        Starting {
            tracker: self,
            name: name.to_owned(),
        }
    }

    /// Watches container `id` (again); returns its exit receiver.
    pub fn track(&self, id: &str, backend_id: &str, memory_limit: Option<u64>) -> ExitReceiver {
        let mut state = self.lock();
        if let Some(t) = state.containers.get_mut(id) {
            if memory_limit.is_some() {
                t.memory_limit = memory_limit;
            }
            return t.exit.subscribe();
        }
        let (tx, rx) = watch::channel(None);
        state.containers.insert(
            id.to_owned(),
            Tracked {
                backend_id: backend_id.to_owned(),
                exit: tx,
                oom: false,
                memory_limit,
            },
        );
        rx
    }

    /// The exit receiver of a tracked container.
    pub fn receiver(&self, id: &str) -> Option<ExitReceiver> {
        self.lock().containers.get(id).map(|t| t.exit.subscribe())
    }

    /// Whether `id` is tracked and has exited; `None` if not tracked.
    pub fn has_exited(&self, id: &str) -> Option<bool> {
        self.lock().containers.get(id).map(|t| t.exit.borrow().is_some())
    }

    /// Records the exit of `id` unless one is recorded already. Returns whether this one
    /// was recorded.
    pub fn resolve(&self, id: &str, info: ExitInfo) -> bool {
        let state = self.lock();
        let Some(t) = state.containers.get(id) else {
            return false;
        };
        let recorded = t.exit.send_if_modified(|exit| {
            if exit.is_some() {
                return false;
            }
            *exit = Some(info.clone());
            true
        });
        if recorded {
            debug!(backend_id = %t.backend_id, container = %id, ?info, "container exited");
        }
        recorded
    }

    /// Stops watching `id`.
    pub fn forget(&self, id: &str) {
        self.lock().containers.remove(id);
    }

    fn set_oom(&self, id: &str) {
        if let Some(t) = self.lock().containers.get_mut(id) {
            t.oom = true;
        }
    }

    fn oom(&self, id: &str) -> bool {
        self.lock().containers.get(id).is_some_and(|t| t.oom)
    }

    /// The memory limit recorded for a tracked container: `None` if it is not tracked.
    pub fn memory_limit(&self, id: &str) -> Option<Option<u64>> {
        self.lock().containers.get(id).map(|t| t.memory_limit)
    }

    /// Tracked containers that have not exited yet.
    fn running(&self) -> Vec<String> {
        self.lock()
            .containers
            .iter()
            .filter(|(_, t)| t.exit.borrow().is_none())
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Whether cleanup must leave this container alone: it is tracked (its backend still
    /// waits for or has not yet read its exit) or being created.
    pub fn protects(&self, id: &str, name: &str) -> bool {
        let state = self.lock();
        state.containers.contains_key(id) || state.starting.contains(name)
    }
}

/// The test hook on the events stream, and its statistics.
#[derive(Debug)]
pub(super) struct EventsControl {
    paused: watch::Sender<bool>,
    skip_replay: AtomicBool,
    subscriptions: AtomicU64,
}

impl Default for EventsControl {
    fn default() -> Self {
        EventsControl {
            paused: watch::channel(false).0,
            skip_replay: AtomicBool::new(false),
            subscriptions: AtomicU64::new(0),
        }
    }
}

impl EventsControl {
    /// Closes the stream and keeps it closed until [`EventsControl::resume`].
    pub fn pause(&self) {
        self.paused.send_replace(true);
    }

    /// Reopens the stream; without `replay`, events from while it was closed are not
    /// asked for (as if the engine had dropped them).
    pub fn resume(&self, replay: bool) {
        self.skip_replay.store(!replay, Ordering::SeqCst);
        self.paused.send_replace(false);
    }

    /// How many times the stream has been opened.
    pub fn subscriptions(&self) -> u64 {
        self.subscriptions.load(Ordering::SeqCst)
    }
}

/// `since`/`until` as the engine parses them: seconds and nanoseconds.
fn engine_timestamp(nanos: i64) -> String {
    format!(
        "{}.{:09}",
        nanos.div_euclid(1_000_000_000),
        nanos.rem_euclid(1_000_000_000)
    )
}

/// Follows the engine's events until `cancel`. `since`: engine time (ns) from which
/// events matter.
pub(super) async fn run(inner: Arc<Inner>, mut since: i64, cancel: CancellationToken) {
    let filters = HashMap::from([
        ("type".to_owned(), vec!["container".to_owned()]),
        ("label".to_owned(), vec![format!("{LABEL_DRONE}={}", inner.drone)]),
        (
            "event".to_owned(),
            vec!["die".to_owned(), "destroy".to_owned(), "oom".to_owned()],
        ),
    ]);
    let mut paused = inner.events.paused.subscribe();
    let mut backoff = BACKOFF_MIN;
    let mut reopened = false;
    loop {
        while *paused.borrow_and_update() {
            tokio::select! {
                _ = cancel.cancelled() => return,
                changed = paused.changed() => if changed.is_err() { return },
            }
        }
        let replay = !inner.events.skip_replay.swap(false, Ordering::SeqCst);
        let options = EventsOptions {
            since: replay.then(|| engine_timestamp(since)),
            until: None,
            filters: Some(filters.clone()),
        };
        let mut stream = inner.docker.events(Some(options));
        inner.events.subscriptions.fetch_add(1, Ordering::SeqCst);
        if reopened {
            // What the replay may not cover: inspect every container still running.
            reconcile(&inner).await;
        }
        reopened = true;
        let opened = Instant::now();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                changed = paused.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    if *paused.borrow() {
                        info!("events stream closed by the test hook");
                        break;
                    }
                }
                item = stream.next() => match item {
                    Some(Ok(event)) => handle(&inner, event, &mut since).await,
                    Some(Err(err)) => {
                        warn!(err = %engine_message(&err), "the Docker events stream failed; reopening it");
                        break;
                    }
                    None => {
                        warn!("the Docker events stream ended; reopening it");
                        break;
                    }
                },
            }
        }
        drop(stream);
        if opened.elapsed() >= HEALTHY_STREAM {
            backoff = BACKOFF_MIN;
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn handle(inner: &Inner, event: EventMessage, since: &mut i64) {
    if let Some(at) = event.time_nano {
        *since = (*since).max(at);
    }
    let Some(actor) = event.actor else { return };
    let Some(id) = actor.id else { return };
    match event.action.as_deref() {
        Some("oom") => inner.tracker.set_oom(&id),
        Some("die") => {
            if inner.tracker.has_exited(&id) != Some(false) {
                return;
            }
            let code = actor
                .attributes
                .as_ref()
                .and_then(|a| a.get("exitCode"))
                .and_then(|c| c.parse::<i64>().ok());
            let info = match code {
                Some(code) => {
                    // The `oom` event may be missed or come late; SIGKILL's code is the
                    // hint to ask.
                    let oom = inner.tracker.oom(&id) || (code == 137 && oom_killed(inner, &id).await);
                    exit_info(code, oom)
                }
                None => ExitInfo {
                    exit_code: None,
                    detail: Some("exited; the engine gave no exit code".into()),
                },
            };
            inner.tracker.resolve(&id, info);
        }
        Some("destroy") => {
            inner.tracker.resolve(
                &id,
                ExitInfo {
                    exit_code: None,
                    detail: Some("the container was removed".into()),
                },
            );
        }
        _ => {}
    }
}

async fn oom_killed(inner: &Inner, id: &str) -> bool {
    match inner.docker.inspect_container(id, None).await {
        Ok(c) => c.state.and_then(|s| s.oom_killed).unwrap_or(false),
        Err(_) => false,
    }
}

/// Inspects every tracked container that has not exited, recording the exits found.
pub(super) async fn reconcile(inner: &Inner) {
    for id in inner.tracker.running() {
        match inner.docker.inspect_container(&id, None).await {
            Ok(container) => {
                if let Some(info) = exit_from_inspect(&container) {
                    if inner.tracker.resolve(&id, info) {
                        info!(container = %id, "found a container exit the events stream missed");
                    }
                }
            }
            Err(err) if status_of(&err) == Some(404) => {
                inner.tracker.resolve(
                    &id,
                    ExitInfo {
                        exit_code: None,
                        detail: Some("the container disappeared while the drone was not watching its events".into()),
                    },
                );
            }
            Err(err) => warn!(container = %id, err = %engine_message(&err), "could not inspect a tracked container"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(engine_timestamp(1_700_000_000_123_456_789), "1700000000.123456789");
        assert_eq!(engine_timestamp(5), "0.000000005");
    }

    #[tokio::test]
    async fn first_exit_wins_and_protection() {
        let tracker = Tracker::default();
        let backend = "b1";
        let starting = tracker.starting("plane-b1");
        assert!(tracker.protects("c1", "plane-b1"));
        let mut rx = tracker.track("c1", backend, Some(5));
        drop(starting);
        assert!(tracker.protects("c1", "plane-b1"));
        assert_eq!(tracker.has_exited("c1"), Some(false));
        assert_eq!(tracker.running(), vec!["c1".to_owned()]);
        assert!(tracker.resolve("c1", exit_info(3, false)));
        assert!(!tracker.resolve("c1", exit_info(4, false)));
        rx.changed().await.unwrap();
        assert_eq!(rx.borrow().clone().unwrap().exit_code, Some(3));
        assert!(tracker.running().is_empty());
        assert_eq!(tracker.memory_limit("c1"), Some(Some(5)));
        // Tracking again shares the exit.
        assert!(tracker.track("c1", backend, None).borrow().is_some());
        tracker.forget("c1");
        assert!(!tracker.protects("c1", "plane-b1"));
        assert_eq!(tracker.has_exited("c1"), None);
        assert!(!tracker.resolve("c1", exit_info(0, false)));
    }
}
