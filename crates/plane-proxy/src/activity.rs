//! Keepalive bookkeeping: which backends had requests since the last keepalive and how
//! many connections (in-flight requests, upgraded connections) are open to each.
//!
//! Every request to a backend holds an [`ActivityGuard`] for as long as it is open; the
//! controller connection calls [`Activity::take_active`] once per keepalive interval.

use plane_types::names::BackendName;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

/// The shared activity record. Cloning shares it.
#[derive(Clone, Default)]
pub(crate) struct Activity {
    inner: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    /// Backends with a request (or a closed connection) since the last keepalive.
    recent: BTreeSet<BackendName>,
    /// Open connections per backend.
    open: HashMap<BackendName, OpenCounts>,
}

#[derive(Default, Clone, Copy, Debug, PartialEq, Eq)]
struct OpenCounts {
    /// Requests whose response has not finished streaming.
    in_flight: usize,
    /// Upgraded (WebSocket or other) connections.
    upgraded: usize,
}

/// What an [`ActivityGuard`] counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ConnectionKind {
    /// A request until its response body is done.
    InFlight,
    /// An upgraded connection until it closes.
    Upgraded,
}

impl Activity {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a new open connection to `backend`; it counts until the guard is dropped.
    pub(crate) fn open(&self, backend: &BackendName, kind: ConnectionKind) -> ActivityGuard {
        let mut st = self.lock();
        st.recent.insert(backend.clone());
        let counts = st.open.entry(backend.clone()).or_default();
        match kind {
            ConnectionKind::InFlight => counts.in_flight += 1,
            ConnectionKind::Upgraded => counts.upgraded += 1,
        }
        ActivityGuard {
            activity: self.clone(),
            backend: backend.clone(),
            kind,
        }
    }

    /// The backends to report in this interval's keepalive (sorted): every backend with
    /// a request since the last call or an open connection now. Clears the "recent" set.
    pub(crate) fn take_active(&self) -> Vec<BackendName> {
        let mut st = self.lock();
        let mut active = std::mem::take(&mut st.recent);
        active.extend(st.open.keys().cloned());
        active.into_iter().collect()
    }

    /// How many upgraded connections are open to `backend`.
    pub(crate) fn upgraded_count(&self, backend: &BackendName) -> usize {
        self.lock().open.get(backend).map_or(0, |c| c.upgraded)
    }

    /// How many requests to `backend` are in flight.
    #[cfg(test)]
    pub(crate) fn in_flight_count(&self, backend: &BackendName) -> usize {
        self.lock().open.get(backend).map_or(0, |c| c.in_flight)
    }
}

/// Counts one open connection to a backend while it lives.
pub(crate) struct ActivityGuard {
    activity: Activity,
    backend: BackendName,
    kind: ConnectionKind,
}

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        let mut st = self.activity.lock();
        // A connection that closes counts for the interval it closes in.
        st.recent.insert(self.backend.clone());
        if let Some(counts) = st.open.get_mut(&self.backend) {
            match self.kind {
                ConnectionKind::InFlight => counts.in_flight = counts.in_flight.saturating_sub(1),
                ConnectionKind::Upgraded => counts.upgraded = counts.upgraded.saturating_sub(1),
            }
            if counts.in_flight == 0 && counts.upgraded == 0 {
                st.open.remove(&self.backend);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> BackendName {
        s.parse().unwrap()
    }

    #[test]
    fn nothing_to_report_when_idle() {
        let a = Activity::default();
        assert!(a.take_active().is_empty());
    }

    #[test]
    fn requests_count_for_their_interval() {
        let a = Activity::default();
        drop(a.open(&b("b1"), ConnectionKind::InFlight));
        drop(a.open(&b("b2"), ConnectionKind::InFlight));
        drop(a.open(&b("b1"), ConnectionKind::InFlight));
        assert_eq!(a.take_active(), vec![b("b1"), b("b2")]);
        assert!(a.take_active().is_empty(), "reported once, then idle");
    }

    #[test]
    fn open_connections_count_every_interval() {
        let a = Activity::default();
        let ws = a.open(&b("b1"), ConnectionKind::Upgraded);
        let req = a.open(&b("b2"), ConnectionKind::InFlight);
        assert_eq!(a.upgraded_count(&b("b1")), 1);
        assert_eq!(a.in_flight_count(&b("b2")), 1);
        for _ in 0..3 {
            assert_eq!(a.take_active(), vec![b("b1"), b("b2")]);
        }
        drop(req);
        assert_eq!(a.in_flight_count(&b("b2")), 0);
        // b2 closed during this interval: reported once more.
        assert_eq!(a.take_active(), vec![b("b1"), b("b2")]);
        assert_eq!(a.take_active(), vec![b("b1")]);
        let ws2 = a.open(&b("b1"), ConnectionKind::Upgraded);
        assert_eq!(a.upgraded_count(&b("b1")), 2);
        drop(ws);
        drop(ws2);
        assert_eq!(a.upgraded_count(&b("b1")), 0);
        assert_eq!(a.take_active(), vec![b("b1")]);
        assert!(a.take_active().is_empty());
    }
}
