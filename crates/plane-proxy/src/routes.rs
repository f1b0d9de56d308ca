//! The route cache: token → [`RouteInfo`], filled by lookups over the controller socket.
//!
//! * A cached token answers at once.
//! * Concurrent lookups of one uncached token share one `RouteRequest` (coalescing):
//!   the first lookup registers a pending entry and sends the request, later ones join.
//! * While the socket is down, lookups register and wait; [`RouteCache::connected`]
//!   re-issues every pending lookup (and clears the cache, since invalidations may have
//!   been missed while disconnected).
//! * Only `Ready` answers are cached; `BackendRemoved` and `TokenRevoked` evict.
//! * A cached route is used until the token expires (the controller says how long it
//!   has left) and at most [`RouteCache::max_age`]; then the controller is asked again.
//!   The age limit bounds how long a missed invalidation can last.

use plane_types::names::BackendName;
use plane_types::protocol::{ProxyToController, RouteInfo, RouteResult};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::debug;

/// The sending half of the controller socket, as the cache sees it.
pub(crate) type Outbox = mpsc::UnboundedSender<ProxyToController>;

/// The outcome of a lookup.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Lookup {
    /// The backend is ready here.
    Ready(Arc<RouteInfo>),
    /// Unknown token, revoked token or terminated backend (410).
    Gone,
    /// The controller gave up waiting for the backend (504).
    NotReady,
    /// No answer within the proxy's own wait (504).
    TimedOut,
}

/// How long a cached route is used at most, by default.
pub const DEFAULT_ROUTE_MAX_AGE: Duration = Duration::from_secs(60);

/// The cache shared by every request and the controller connection.
pub(crate) struct RouteCache {
    state: Mutex<State>,
    /// The longest a cached route is used before the controller is asked again.
    max_age: Duration,
}

impl Default for RouteCache {
    fn default() -> Self {
        RouteCache::new(DEFAULT_ROUTE_MAX_AGE)
    }
}

/// A cached route and until when it may be used.
struct Cached {
    route: Arc<RouteInfo>,
    until: Instant,
}

#[derive(Default)]
struct State {
    routes: HashMap<String, Cached>,
    /// Index of `routes` by backend, for eviction.
    by_backend: HashMap<BackendName, HashSet<String>>,
    pending: HashMap<String, Pending>,
    /// Present while the controller socket is up (after `Welcome`).
    outbox: Option<Outbox>,
}

struct Pending {
    waiters: Vec<oneshot::Sender<Lookup>>,
    /// When the `RouteRequest` was last sent; `None` if it could not be sent yet.
    sent_at: Option<Instant>,
}

impl State {
    fn send_request(&mut self, token: &str) -> Option<Instant> {
        let outbox = self.outbox.as_ref()?;
        match outbox.send(ProxyToController::RouteRequest {
            token: token.to_owned(),
        }) {
            Ok(()) => Some(Instant::now()),
            Err(_) => {
                // The connection task is gone; it will call `connected` again on reconnect.
                self.outbox = None;
                None
            }
        }
    }

    fn insert_route(&mut self, token: String, route: Arc<RouteInfo>, until: Instant) {
        self.remove_route(&token);
        self.by_backend
            .entry(route.backend_id.clone())
            .or_default()
            .insert(token.clone());
        self.routes.insert(token, Cached { route, until });
    }

    fn remove_route(&mut self, token: &str) -> Option<Arc<RouteInfo>> {
        let old = self.routes.remove(token)?.route;
        if let Some(tokens) = self.by_backend.get_mut(&old.backend_id) {
            tokens.remove(token);
            if tokens.is_empty() {
                self.by_backend.remove(&old.backend_id);
            }
        }
        Some(old)
    }
}

impl RouteCache {
    /// An empty cache whose routes are used for at most `max_age`.
    pub(crate) fn new(max_age: Duration) -> Self {
        RouteCache {
            state: Mutex::default(),
            max_age,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Finds the route of `token`, asking the controller if it is not cached, and waits at
    /// most `wait` for the answer.
    pub(crate) async fn lookup(&self, token: &str, wait: Duration) -> Lookup {
        let rx = {
            let mut st = self.lock();
            match st.routes.get(token) {
                Some(c) if Instant::now() < c.until => return Lookup::Ready(c.route.clone()),
                // Expired or too old: ask the controller again.
                Some(_) => {
                    st.remove_route(token);
                }
                None => {}
            }
            let (tx, rx) = oneshot::channel();
            let resend = match st.pending.get_mut(token) {
                Some(p) => {
                    p.waiters.retain(|w| !w.is_closed());
                    p.waiters.push(tx);
                    // An answer that never came (lost by the controller) must not block the
                    // token forever: ask again once a request is older than our wait.
                    p.sent_at.is_some_and(|t| t.elapsed() >= wait)
                }
                None => {
                    st.pending.insert(
                        token.to_owned(),
                        Pending {
                            waiters: vec![tx],
                            sent_at: None,
                        },
                    );
                    true
                }
            };
            if resend {
                let sent_at = st.send_request(token);
                if let Some(p) = st.pending.get_mut(token) {
                    p.sent_at = sent_at;
                }
            }
            rx
        };
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Lookup::TimedOut,
            Err(_) => {
                // Our receiver is gone now; drop the entry if nobody else waits.
                let mut st = self.lock();
                if st
                    .pending
                    .get(token)
                    .is_some_and(|p| p.waiters.iter().all(|w| w.is_closed()))
                {
                    st.pending.remove(token);
                }
                Lookup::TimedOut
            }
        }
    }

    /// The socket is up: clear the cache, remember the outbox and re-issue pending lookups.
    pub(crate) fn connected(&self, outbox: Outbox) {
        self.clear();
        let mut st = self.lock();
        st.outbox = Some(outbox);
        st.pending.retain(|_, p| {
            p.waiters.retain(|w| !w.is_closed());
            !p.waiters.is_empty()
        });
        let tokens: Vec<String> = st.pending.keys().cloned().collect();
        for token in tokens {
            let sent_at = st.send_request(&token);
            if let Some(p) = st.pending.get_mut(&token) {
                p.sent_at = sent_at;
            }
        }
    }

    /// The socket is down: lookups wait until [`RouteCache::connected`].
    pub(crate) fn disconnected(&self) {
        let mut st = self.lock();
        st.outbox = None;
        for p in st.pending.values_mut() {
            p.sent_at = None;
        }
    }

    /// Applies a `Route` answer: caches `Ready` and wakes every waiter of the token.
    pub(crate) fn handle_route(&self, token: String, result: RouteResult) {
        let mut st = self.lock();
        let lookup = match result {
            RouteResult::Ready(route) => {
                let now = Instant::now();
                let mut until = now + self.max_age;
                if let Some(ms) = route.expires_in_ms {
                    until = until.min(now + Duration::from_millis(ms));
                }
                let route = Arc::new(route);
                st.insert_route(token.clone(), route.clone(), until);
                Lookup::Ready(route)
            }
            RouteResult::Gone => Lookup::Gone,
            RouteResult::NotReady => Lookup::NotReady,
        };
        if let Some(p) = st.pending.remove(&token) {
            for w in p.waiters {
                let _ = w.send(lookup.clone());
            }
        }
    }

    /// Evicts every cached route.
    pub(crate) fn clear(&self) {
        let mut st = self.lock();
        debug!(routes = st.routes.len(), "evicting every cached route");
        st.routes.clear();
        st.by_backend.clear();
    }

    /// Evicts every cached token that routes to `backend`.
    pub(crate) fn remove_backend(&self, backend: &BackendName) {
        let mut st = self.lock();
        if let Some(tokens) = st.by_backend.remove(backend) {
            debug!(backend_id = %backend, tokens = tokens.len(), "evicting routes of removed backend");
            for t in tokens {
                st.routes.remove(&t);
            }
        }
    }

    /// Evicts one token.
    pub(crate) fn remove_token(&self, token: &str) {
        self.lock().remove_route(token);
    }

    /// Evicts the routes to `backend` that still point at `address` (found unreachable).
    pub(crate) fn remove_unreachable(&self, backend: &BackendName, address: SocketAddr) {
        let mut st = self.lock();
        let stale: Vec<String> = st
            .by_backend
            .get(backend)
            .into_iter()
            .flatten()
            .filter(|t| st.routes.get(*t).is_some_and(|c| c.route.address == address))
            .cloned()
            .collect();
        for t in stale {
            st.remove_route(&t);
        }
    }

    /// The cached route of a token.
    #[cfg(test)]
    pub(crate) fn cached(&self, token: &str) -> Option<Arc<RouteInfo>> {
        self.lock().routes.get(token).map(|c| c.route.clone())
    }

    /// How many tokens have a lookup in progress.
    #[cfg(test)]
    pub(crate) fn pending_count(&self) -> usize {
        self.lock().pending.len()
    }

    /// How many lookups are waiting for `token`.
    #[cfg(test)]
    pub(crate) fn waiter_count(&self, token: &str) -> usize {
        self.lock()
            .pending
            .get(token)
            .map_or(0, |p| p.waiters.iter().filter(|w| !w.is_closed()).count())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::future::Future;

    pub(crate) fn route(backend: &str, port: u16) -> RouteInfo {
        RouteInfo {
            backend_id: backend.parse().unwrap(),
            address: SocketAddr::from(([127, 0, 0, 1], port)),
            secret_token: None,
            user: None,
            user_data: None,
            subdomain: None,
            expires_in_ms: None,
        }
    }

    /// Polls `cond` until it holds, yielding to other tasks; fails after a deadline.
    pub(crate) async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for: {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn expect_request(rx: &mut mpsc::UnboundedReceiver<ProxyToController>) -> String {
        match rx.try_recv() {
            Ok(ProxyToController::RouteRequest { token }) => token,
            other => panic!("expected a RouteRequest, got {other:?}"),
        }
    }

    const WAIT: Duration = Duration::from_secs(10);

    fn spawn_lookup(cache: &Arc<RouteCache>, token: &str) -> impl Future<Output = Lookup> {
        let cache = cache.clone();
        let token = token.to_owned();
        let handle = tokio::spawn(async move { cache.lookup(&token, WAIT).await });
        async move { handle.await.unwrap() }
    }

    #[tokio::test]
    async fn concurrent_lookups_share_one_request() {
        let cache = Arc::new(RouteCache::default());
        let (tx, mut rx) = mpsc::unbounded_channel();
        cache.connected(tx);
        let a = spawn_lookup(&cache, "tok");
        let b = spawn_lookup(&cache, "tok");
        eventually("both lookups wait", || cache.waiter_count("tok") == 2).await;
        assert_eq!(expect_request(&mut rx), "tok");
        assert!(rx.try_recv().is_err(), "only one RouteRequest");

        cache.handle_route("tok".into(), RouteResult::Ready(route("b1", 1)));
        let expected = Lookup::Ready(Arc::new(route("b1", 1)));
        assert_eq!(a.await, expected);
        assert_eq!(b.await, expected);
        // Now cached: no new request.
        assert_eq!(cache.lookup("tok", WAIT).await, expected);
        assert!(rx.try_recv().is_err());
        assert_eq!(cache.pending_count(), 0);
    }

    #[tokio::test]
    async fn gone_and_not_ready_are_not_cached() {
        let cache = Arc::new(RouteCache::default());
        let (tx, mut rx) = mpsc::unbounded_channel();
        cache.connected(tx);
        for (result, lookup) in [
            (RouteResult::Gone, Lookup::Gone),
            (RouteResult::NotReady, Lookup::NotReady),
        ] {
            let l = spawn_lookup(&cache, "tok");
            eventually("lookup waits", || cache.waiter_count("tok") == 1).await;
            assert_eq!(expect_request(&mut rx), "tok");
            cache.handle_route("tok".into(), result);
            assert_eq!(l.await, lookup);
            assert!(cache.cached("tok").is_none());
        }
    }

    #[tokio::test]
    async fn lookups_wait_for_the_socket_and_are_reissued() {
        let cache = Arc::new(RouteCache::default());
        let l = spawn_lookup(&cache, "tok");
        eventually("lookup waits", || cache.waiter_count("tok") == 1).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        cache.connected(tx);
        assert_eq!(expect_request(&mut rx), "tok");
        // The socket drops before the answer: the lookup is re-issued on reconnect.
        cache.disconnected();
        let (tx, mut rx) = mpsc::unbounded_channel();
        cache.connected(tx);
        assert_eq!(expect_request(&mut rx), "tok");
        cache.handle_route("tok".into(), RouteResult::Ready(route("b1", 1)));
        assert!(matches!(l.await, Lookup::Ready(_)));
    }

    #[tokio::test]
    async fn reconnect_clears_the_cache() {
        let cache = RouteCache::default();
        cache.handle_route("tok".into(), RouteResult::Ready(route("b1", 1)));
        assert!(cache.cached("tok").is_some());
        cache.disconnected();
        let (tx, _rx) = mpsc::unbounded_channel();
        cache.connected(tx);
        assert!(cache.cached("tok").is_none());
    }

    #[tokio::test]
    async fn lookups_time_out_and_clean_up() {
        let cache = RouteCache::default();
        let (tx, mut rx) = mpsc::unbounded_channel();
        cache.connected(tx);
        assert_eq!(cache.lookup("tok", Duration::from_millis(20)).await, Lookup::TimedOut);
        assert_eq!(cache.pending_count(), 0);
        assert_eq!(expect_request(&mut rx), "tok");
        // A late answer is still cached and serves the next request.
        cache.handle_route("tok".into(), RouteResult::Ready(route("b1", 1)));
        assert!(matches!(
            cache.lookup("tok", Duration::from_millis(20)).await,
            Lookup::Ready(_)
        ));
    }

    #[tokio::test]
    async fn eviction_by_backend_and_token() {
        let cache = RouteCache::default();
        cache.handle_route("t1".into(), RouteResult::Ready(route("b1", 1)));
        cache.handle_route("t2".into(), RouteResult::Ready(route("b1", 1)));
        cache.handle_route("t3".into(), RouteResult::Ready(route("b2", 2)));
        cache.remove_backend(&"b1".parse().unwrap());
        assert!(cache.cached("t1").is_none() && cache.cached("t2").is_none());
        assert!(cache.cached("t3").is_some());
        cache.remove_backend(&"nope".parse().unwrap());
        cache.remove_token("t3");
        assert!(cache.cached("t3").is_none());
        cache.remove_token("t3");

        // A token re-routed to another backend leaves the old backend's index.
        cache.handle_route("t4".into(), RouteResult::Ready(route("b1", 1)));
        cache.handle_route("t4".into(), RouteResult::Ready(route("b2", 2)));
        cache.remove_backend(&"b1".parse().unwrap());
        assert_eq!(cache.cached("t4").unwrap().backend_id.as_str(), "b2");

        // Unreachable eviction only drops routes to that address.
        cache.handle_route("t5".into(), RouteResult::Ready(route("b2", 3)));
        cache.remove_unreachable(&"b2".parse().unwrap(), SocketAddr::from(([127, 0, 0, 1], 2)));
        assert!(cache.cached("t4").is_none());
        assert!(cache.cached("t5").is_some());
    }

    /// A cached route is used until its token expires, and at most `max_age`; then the
    /// next lookup asks the controller again.
    #[tokio::test(start_paused = true)]
    async fn cached_routes_expire_with_their_token_and_their_age() {
        let cache = Arc::new(RouteCache::new(Duration::from_secs(60)));
        let (tx, mut rx) = mpsc::unbounded_channel();
        cache.connected(tx);
        let mut expiring = route("b1", 1);
        expiring.expires_in_ms = Some(1_000);
        cache.handle_route("short".into(), RouteResult::Ready(expiring));
        cache.handle_route("long".into(), RouteResult::Ready(route("b1", 1)));
        assert!(matches!(cache.lookup("short", WAIT).await, Lookup::Ready(_)));
        assert!(rx.try_recv().is_err(), "a fresh cached route needs no request");

        tokio::time::advance(Duration::from_millis(1_001)).await;
        let short = spawn_lookup(&cache, "short");
        eventually("the expired token is asked about", || cache.waiter_count("short") == 1).await;
        assert_eq!(expect_request(&mut rx), "short");
        cache.handle_route("short".into(), RouteResult::Gone);
        assert_eq!(short.await, Lookup::Gone);
        assert!(cache.cached("short").is_none());
        // The token without expiry is still served from the cache...
        assert!(matches!(cache.lookup("long", WAIT).await, Lookup::Ready(_)));
        assert!(rx.try_recv().is_err());
        // ...until it is older than the cache's age limit.
        tokio::time::advance(Duration::from_secs(59)).await;
        let long = spawn_lookup(&cache, "long");
        eventually("the old route is asked about", || cache.waiter_count("long") == 1).await;
        assert_eq!(expect_request(&mut rx), "long");
        cache.handle_route("long".into(), RouteResult::Ready(route("b1", 1)));
        assert!(matches!(long.await, Lookup::Ready(_)));
    }
}
