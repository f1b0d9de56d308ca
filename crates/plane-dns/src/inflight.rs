//! Single-flight source calls, and the rate limit of their warnings.
//!
//! [`Inflight::values`] is how the handler asks the source. The first query for a
//! cluster makes the call itself, bounded by the source timeout, and publishes the
//! outcome on a `watch` channel; queries for the same cluster that arrive meanwhile
//! find the channel in the map and wait on it. The entry leaves the map when the call
//! ends (or when the calling query is dropped, by a guard), so nothing outlives a call:
//! there is no cache and no background task.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::TxtSource;

/// What a source call gave: the values, or `Err` after it failed (already logged).
pub(crate) type Outcome = Result<Arc<[String]>, SourceFailed>;

/// The source failed or timed out; the cause went to the log once, by the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SourceFailed;

/// A call in progress.
struct Flight {
    /// Tells which flight a guard owns.
    id: u64,
    /// `None` until the call ends.
    outcome: watch::Receiver<Option<Outcome>>,
    /// Queries that share this call, the first included (for tests).
    joined: usize,
}

#[derive(Default)]
struct Flights {
    next_id: u64,
    by_cluster: HashMap<String, Flight>,
}

/// The source, with concurrent calls for one cluster merged into one.
pub(crate) struct Inflight {
    source: Arc<dyn TxtSource>,
    timeout: Duration,
    flights: Mutex<Flights>,
    warnings: WarnLimiter,
}

impl Inflight {
    pub(crate) fn new(source: Arc<dyn TxtSource>, timeout: Duration) -> Self {
        Inflight {
            source,
            timeout,
            flights: Mutex::default(),
            warnings: WarnLimiter::new(WARN_INTERVAL),
        }
    }

    /// The values of `cluster`, from a call that this query makes or joins.
    pub(crate) async fn values(&self, cluster: &str) -> Outcome {
        let joined = {
            let mut flights = self.lock();
            match flights.by_cluster.get_mut(cluster) {
                Some(flight) => {
                    flight.joined += 1;
                    Some(flight.outcome.clone())
                }
                None => None,
            }
        };
        match joined {
            Some(mut outcome) => match outcome.wait_for(Option::is_some).await {
                Ok(done) => done.clone().unwrap_or(Err(SourceFailed)),
                // The calling query was dropped before the end (the server is stopping).
                Err(_) => Err(SourceFailed),
            },
            None => self.call(cluster).await,
        }
    }

    /// Makes the call for `cluster` and publishes its outcome to the queries that join.
    async fn call(&self, cluster: &str) -> Outcome {
        let (publish, outcome) = watch::channel(None);
        let id = {
            let mut flights = self.lock();
            let id = flights.next_id;
            flights.next_id += 1;
            flights
                .by_cluster
                .insert(cluster.to_owned(), Flight { id, outcome, joined: 1 });
            id
        };
        let mut guard = FlightGuard {
            inflight: self,
            cluster,
            id,
            armed: true,
        };

        let started = Instant::now();
        let result = tokio::time::timeout(self.timeout, self.source.txt_values(cluster)).await;
        let outcome = match result {
            Ok(Ok(values)) => Ok(Arc::from(values)),
            Ok(Err(error)) => {
                self.warnings.warn(|suppressed| {
                    tracing::warn!(
                        cluster,
                        error = format!("{error:#}"),
                        suppressed,
                        "TXT source failed; answering SERVFAIL",
                    )
                });
                Err(SourceFailed)
            }
            Err(_) => {
                self.warnings.warn(|suppressed| {
                    tracing::warn!(
                        cluster,
                        timeout_ms = self.timeout.as_millis() as u64,
                        suppressed,
                        "TXT source timed out; answering SERVFAIL",
                    )
                });
                Err(SourceFailed)
            }
        };
        tracing::debug!(
            cluster,
            ok = outcome.is_ok(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "TXT source call ended",
        );

        // Out of the map first: a query arriving from now on makes a fresh call.
        guard.remove();
        // No receiver left is fine: nobody joined.
        let _ = publish.send(Some(outcome.clone()));
        outcome
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Flights> {
        // A panic while holding this lock leaves the map consistent (single inserts
        // and removes), so a poisoned lock is still usable.
        self.flights.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many queries share the call in progress for `cluster`, if there is one.
    #[cfg(test)]
    pub(crate) fn joined(&self, cluster: &str) -> Option<usize> {
        self.lock().by_cluster.get(cluster).map(|f| f.joined)
    }
}

/// Removes a flight from the map when its call ends or its query is dropped (then the
/// queries that joined see the channel close and answer SERVFAIL).
struct FlightGuard<'a> {
    inflight: &'a Inflight,
    cluster: &'a str,
    id: u64,
    armed: bool,
}

impl FlightGuard<'_> {
    fn remove(&mut self) {
        if !std::mem::replace(&mut self.armed, false) {
            return;
        }
        let mut flights = self.inflight.lock();
        if flights.by_cluster.get(self.cluster).is_some_and(|f| f.id == self.id) {
            flights.by_cluster.remove(self.cluster);
        }
    }
}

impl Drop for FlightGuard<'_> {
    fn drop(&mut self) {
        self.remove();
    }
}

/// At most one source warning per this interval; the others are counted.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Lets a warning through at most once per interval, and says how many it held back.
struct WarnLimiter {
    interval: Duration,
    state: Mutex<WarnState>,
}

struct WarnState {
    last: Option<Instant>,
    suppressed: u64,
}

impl WarnLimiter {
    fn new(interval: Duration) -> Self {
        WarnLimiter {
            interval,
            state: Mutex::new(WarnState {
                last: None,
                suppressed: 0,
            }),
        }
    }

    /// Calls `log` with the number of warnings held back since the last one, or counts
    /// this one if the last was less than an interval ago. Returns whether it logged.
    fn warn(&self, log: impl FnOnce(u64)) -> bool {
        let now = Instant::now();
        let suppressed = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if state.last.is_some_and(|last| now < last + self.interval) {
                state.suppressed += 1;
                return false;
            }
            state.last = Some(now);
            std::mem::take(&mut state.suppressed)
        };
        log(suppressed);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::sync::Semaphore;

    /// Counts calls; each call waits for a permit of `release`, then answers `cluster`'s
    /// name (or fails).
    struct Gate {
        calls: AtomicUsize,
        release: Semaphore,
        fail: bool,
    }

    #[async_trait::async_trait]
    impl TxtSource for Gate {
        async fn txt_values(&self, cluster: &str) -> anyhow::Result<Vec<String>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.release.acquire().await?.forget();
            if self.fail {
                anyhow::bail!("gate says no");
            }
            Ok(vec![cluster.to_owned()])
        }
    }

    fn gate(fail: bool) -> Arc<Gate> {
        Arc::new(Gate {
            calls: AtomicUsize::new(0),
            release: Semaphore::new(0),
            fail,
        })
    }

    async fn wait_joined(inflight: &Inflight, cluster: &str, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while inflight.joined(cluster) != Some(n) {
            assert!(Instant::now() < deadline, "{:?} joined", inflight.joined(cluster));
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn concurrent_calls_share_one_and_nothing_is_cached() {
        let source = gate(false);
        let inflight = Arc::new(Inflight::new(source.clone(), Duration::from_secs(30)));
        let tasks: Vec<_> = (0..10)
            .map(|_| {
                let inflight = inflight.clone();
                tokio::spawn(async move { inflight.values("c1").await })
            })
            .collect();
        wait_joined(&inflight, "c1", 10).await;
        source.release.add_permits(1);
        for task in tasks {
            assert_eq!(task.await.unwrap().unwrap().to_vec(), ["c1"]);
        }
        assert_eq!(source.calls.load(Ordering::SeqCst), 1);
        assert_eq!(inflight.joined("c1"), None);

        // The next query calls again.
        let again = tokio::spawn({
            let inflight = inflight.clone();
            async move { inflight.values("c1").await }
        });
        wait_joined(&inflight, "c1", 1).await;
        source.release.add_permits(1);
        assert!(again.await.unwrap().is_ok());
        assert_eq!(source.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn clusters_do_not_share() {
        let source = gate(false);
        let inflight = Arc::new(Inflight::new(source.clone(), Duration::from_secs(30)));
        let a = tokio::spawn({
            let inflight = inflight.clone();
            async move { inflight.values("a").await }
        });
        let b = tokio::spawn({
            let inflight = inflight.clone();
            async move { inflight.values("b").await }
        });
        wait_joined(&inflight, "a", 1).await;
        wait_joined(&inflight, "b", 1).await;
        source.release.add_permits(2);
        assert_eq!(a.await.unwrap().unwrap().to_vec(), ["a"]);
        assert_eq!(b.await.unwrap().unwrap().to_vec(), ["b"]);
        assert_eq!(source.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn failure_and_timeout_reach_every_query() {
        let source = gate(true);
        let inflight = Arc::new(Inflight::new(source.clone(), Duration::from_secs(30)));
        let tasks: Vec<_> = (0..3)
            .map(|_| {
                let inflight = inflight.clone();
                tokio::spawn(async move { inflight.values("c").await })
            })
            .collect();
        wait_joined(&inflight, "c", 3).await;
        source.release.add_permits(1);
        for task in tasks {
            assert_eq!(task.await.unwrap(), Err(SourceFailed));
        }

        // Never released: the timeout ends it.
        let inflight = Inflight::new(gate(false), Duration::from_millis(20));
        assert_eq!(inflight.values("c").await, Err(SourceFailed));
        assert_eq!(inflight.joined("c"), None);
    }

    #[tokio::test]
    async fn a_dropped_caller_fails_its_joiners_and_leaves_no_entry() {
        let source = gate(false);
        let inflight = Arc::new(Inflight::new(source.clone(), Duration::from_secs(30)));
        let leader = tokio::spawn({
            let inflight = inflight.clone();
            async move { inflight.values("c").await }
        });
        wait_joined(&inflight, "c", 1).await;
        let joiner = tokio::spawn({
            let inflight = inflight.clone();
            async move { inflight.values("c").await }
        });
        wait_joined(&inflight, "c", 2).await;
        leader.abort();
        assert_eq!(joiner.await.unwrap(), Err(SourceFailed));
        assert_eq!(inflight.joined("c"), None);
    }

    /// Log lines, shared with the subscriber that writes them.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_failure_is_warned_with_its_cause_once_per_interval() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);

        let source = gate(true);
        source.release.add_permits(3);
        let inflight = Inflight::new(source, Duration::from_secs(30));
        for _ in 0..3 {
            assert_eq!(inflight.values("c9").await, Err(SourceFailed));
        }
        let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let warnings: Vec<_> = log.lines().filter(|l| l.contains("WARN")).collect();
        assert_eq!(warnings.len(), 1, "{log}");
        assert!(warnings[0].contains("gate says no"), "{log}");
        assert!(warnings[0].contains("c9"), "{log}");
    }

    #[test]
    fn warnings_are_rate_limited() {
        let limiter = WarnLimiter::new(Duration::from_secs(3600));
        let mut logged = Vec::new();
        assert!(limiter.warn(|n| logged.push(n)));
        assert!(!limiter.warn(|n| logged.push(n)));
        assert!(!limiter.warn(|n| logged.push(n)));
        assert_eq!(logged, [0]);

        let limiter = WarnLimiter::new(Duration::ZERO);
        assert!(limiter.warn(|_| {}));
        assert!(limiter.warn(|_| {}));
    }
}
