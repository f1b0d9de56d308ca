//! Controller configuration.

use plane_store::fanout::SharedFanout;
use plane_store::SharedStore;
use plane_types::lease::LeaseTimings;
use plane_types::names::{ClusterName, ControllerName};
use std::time::Duration;

/// Everything a controller needs; passed to [`crate::serve`].
#[derive(Clone)]
pub struct ControllerConfig {
    /// The store. Only the controller touches it.
    pub store: SharedStore,
    /// The fan-out to other controllers sharing the store (by default the store's own,
    /// `None` on SQLite). Tests wrap it to inject faults.
    pub fanout: Option<SharedFanout>,
    /// This controller's name.
    pub name: ControllerName,
    /// The cluster used when a connect request names none.
    pub default_cluster: Option<ClusterName>,
    /// The controller's public base URL (for `status_url`), without a trailing slash.
    pub controller_url: String,
    /// Timings.
    pub timings: ControllerTimings,
    /// The bearer token `/ctrl/*` requires (see [`crate::auth`]); `None`: none.
    pub ctrl_token: Option<String>,
    /// The forward-auth service `/ctrl/*` requests are checked against, if any.
    pub forward_auth: Option<crate::auth::ForwardAuth>,
    /// How long connection tokens stay valid after they are issued; `None`: for the
    /// backend's life (as in Plane 0.5). Static tokens never expire.
    pub token_ttl: Option<Duration>,
}

/// The controller's timings; tests shorten them.
#[derive(Clone, Copy, Debug)]
pub struct ControllerTimings {
    /// Key lease offsets.
    pub lease: LeaseTimings,
    /// A drone is unhealthy (not schedulable) after this long without a heartbeat.
    pub drone_unhealthy_after: Duration,
    /// How often idle, lifetime and lost backends are swept.
    pub sweep_interval: Duration,
    /// How long a proxy's route request waits for a starting backend.
    pub route_wait: Duration,
    /// How many random candidates the scheduler compares.
    pub scheduler_candidates: usize,
    /// How often terminated backends past their retention (with their tokens and
    /// status history) are deleted, a bounded batch at a time.
    pub cleanup_interval: Duration,
    /// How long a terminated backend stays queryable before cleanup deletes it.
    pub terminated_retention: Duration,
}

impl Default for ControllerTimings {
    fn default() -> Self {
        ControllerTimings {
            lease: LeaseTimings::default(),
            drone_unhealthy_after: Duration::from_secs(45),
            sweep_interval: Duration::from_secs(1),
            route_wait: Duration::from_secs(30),
            scheduler_candidates: 2,
            cleanup_interval: Duration::from_secs(60),
            terminated_retention: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

impl ControllerConfig {
    /// A config with default timings.
    pub fn new(store: SharedStore, controller_url: impl Into<String>, default_cluster: Option<ClusterName>) -> Self {
        ControllerConfig {
            fanout: store.fanout(),
            store,
            name: ControllerName::new_random(),
            default_cluster,
            controller_url: controller_url.into().trim_end_matches('/').to_owned(),
            timings: ControllerTimings::default(),
            ctrl_token: None,
            forward_auth: None,
            token_ttl: None,
        }
    }
}
