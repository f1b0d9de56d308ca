//! Key lease timings and deadline arithmetic.
//!
//! A key lease is held in the store with an expiry in the **store's** clock. A drone
//! gets its deadlines in **its own** clock: the controller starts from a drone
//! timestamp (sent by the drone with the renewal request or heartbeat) and adds
//! offsets. Since the drone's timestamp was taken before the store extended the lease,
//! every deadline the drone sees falls before the store's expiry, whatever the clocks
//! say; no component compares its clock with another's.

use crate::EpochMillis;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Offsets of a lease, all measured from the moment the lease was (re)acquired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseTimings {
    /// When the drone should renew.
    pub renew_after: Duration,
    /// When the drone soft-terminates the backend if renewal keeps failing.
    pub soft_terminate_after: Duration,
    /// When the drone hard-terminates the backend if renewal keeps failing.
    pub hard_terminate_after: Duration,
    /// When the store considers the lease expired.
    pub expire_after: Duration,
}

impl Default for LeaseTimings {
    /// Plane 0.5's timings: renew at +30 s, soft at +40 s, hard at +50 s, expire at +60 s.
    fn default() -> Self {
        LeaseTimings::scaled(Duration::from_secs(10))
    }
}

impl LeaseTimings {
    /// Timings in the proportions of the defaults with `unit` as a sixth of the lease:
    /// renew at 3 units, soft at 4, hard at 5, expire at 6.
    pub fn scaled(unit: Duration) -> LeaseTimings {
        LeaseTimings {
            renew_after: unit * 3,
            soft_terminate_after: unit * 4,
            hard_terminate_after: unit * 5,
            expire_after: unit * 6,
        }
    }

    /// Whether the offsets are ordered as they must be.
    pub fn is_valid(&self) -> bool {
        self.renew_after < self.soft_terminate_after
            && self.soft_terminate_after < self.hard_terminate_after
            && self.hard_terminate_after < self.expire_after
    }

    /// Deadlines in the drone's clock, given a drone timestamp taken before the store
    /// (re)acquired the lease.
    pub fn deadlines_from(&self, drone_time: EpochMillis) -> LeaseDeadlines {
        let add = |d: Duration| drone_time.saturating_add(d.as_millis() as u64);
        LeaseDeadlines {
            renew_at: add(self.renew_after),
            soft_terminate_at: add(self.soft_terminate_after),
            hard_terminate_at: add(self.hard_terminate_after),
        }
    }
}

/// Deadlines of a lease in the drone's own clock (ms since the epoch).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseDeadlines {
    /// Renew from this time on.
    pub renew_at: EpochMillis,
    /// Soft-terminate the backend at this time unless renewed.
    pub soft_terminate_at: EpochMillis,
    /// Hard-terminate the backend at this time unless renewed.
    pub hard_terminate_at: EpochMillis,
}

/// Estimates a drone's current clock from its last reported timestamp and the time the
/// controller has measured (on its own monotonic clock) since receiving it. The estimate
/// lags the drone's clock by the message's transit time, so deadlines built on it err
/// early, which is the safe side.
pub fn estimate_remote_now(reported: EpochMillis, elapsed_since_received: Duration) -> EpochMillis {
    reported.saturating_add(elapsed_since_received.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_matches_plane() {
        let t = LeaseTimings::default();
        assert_eq!(t.renew_after, Duration::from_secs(30));
        assert_eq!(t.soft_terminate_after, Duration::from_secs(40));
        assert_eq!(t.hard_terminate_after, Duration::from_secs(50));
        assert_eq!(t.expire_after, Duration::from_secs(60));
        assert!(t.is_valid());
    }

    #[test]
    fn deadlines_are_in_the_drone_clock() {
        let t = LeaseTimings::scaled(Duration::from_millis(100));
        // A drone whose clock is far from ours: only its own timestamp matters.
        let d = t.deadlines_from(1_000_000);
        assert_eq!(d.renew_at, 1_000_300);
        assert_eq!(d.soft_terminate_at, 1_000_400);
        assert_eq!(d.hard_terminate_at, 1_000_500);
        assert!(d.renew_at < d.soft_terminate_at && d.soft_terminate_at < d.hard_terminate_at);
        // Saturates instead of overflowing.
        assert_eq!(t.deadlines_from(u64::MAX).hard_terminate_at, u64::MAX);
    }

    #[test]
    fn remote_estimate_errs_early() {
        // The drone reported 5_000 and we have waited 250 ms since; transit time is unknown
        // and makes the real drone clock later than the estimate, never earlier.
        assert_eq!(estimate_remote_now(5_000, Duration::from_millis(250)), 5_250);
    }

    #[test]
    fn invalid_orders_are_detected() {
        let mut t = LeaseTimings::default();
        t.hard_terminate_after = t.soft_terminate_after;
        assert!(!t.is_valid());
    }
}
