//! The backend lifecycle.
//!
//! ```text
//! scheduled → loading → starting → waiting → ready → terminating → hard-terminating → terminated
//!     └──────────┴──────────┴──────────┴────────┴──────────┴───────────────┴──────────────┘
//!                 (any status may jump forward to a later one, never back)
//! ```
//!
//! Statuses only move forward; [`BackendStatus::can_transition_to`] is the one place
//! that rule lives.

use crate::EpochMillis;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Where a backend is in its lifecycle. The numeric value orders the statuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendStatus {
    /// Assigned to a drone; the drone has not started work on it yet.
    Scheduled = 10,
    /// The drone is fetching what the backend needs (an image pull, for Docker).
    Loading = 20,
    /// The drone is starting the backend.
    Starting = 30,
    /// The backend runs; the drone waits for it to answer HTTP.
    Waiting = 40,
    /// The backend answers HTTP and receives traffic.
    Ready = 50,
    /// The backend was asked to stop (SIGTERM) and has a grace period.
    Terminating = 60,
    /// The backend is being killed (SIGKILL).
    HardTerminating = 65,
    /// The backend has stopped. Final.
    Terminated = 70,
}

impl BackendStatus {
    /// Every status, in lifecycle order.
    pub const ALL: [BackendStatus; 8] = [
        BackendStatus::Scheduled,
        BackendStatus::Loading,
        BackendStatus::Starting,
        BackendStatus::Waiting,
        BackendStatus::Ready,
        BackendStatus::Terminating,
        BackendStatus::HardTerminating,
        BackendStatus::Terminated,
    ];

    /// The status as written on the wire (`"hard-terminating"`).
    pub fn as_str(self) -> &'static str {
        match self {
            BackendStatus::Scheduled => "scheduled",
            BackendStatus::Loading => "loading",
            BackendStatus::Starting => "starting",
            BackendStatus::Waiting => "waiting",
            BackendStatus::Ready => "ready",
            BackendStatus::Terminating => "terminating",
            BackendStatus::HardTerminating => "hard-terminating",
            BackendStatus::Terminated => "terminated",
        }
    }

    /// The numeric order value (10..=70), as in Plane 0.5.
    pub fn order(self) -> i64 {
        self as i64
    }

    /// Statuses only move forward: a transition is allowed iff it goes to a later status.
    pub fn can_transition_to(self, next: BackendStatus) -> bool {
        next > self
    }

    /// Whether the backend has stopped for good.
    pub fn is_terminal(self) -> bool {
        self == BackendStatus::Terminated
    }

    /// Whether the backend is shutting down or gone.
    pub fn is_terminating(self) -> bool {
        self >= BackendStatus::Terminating
    }
}

impl fmt::Display for BackendStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BackendStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        BackendStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown backend status `{s}`"))
    }
}

/// Why a backend was terminated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TerminationReason {
    /// Idle for `max_idle_seconds`, or past `lifetime_limit_seconds`.
    Swept,
    /// Asked for through the API.
    External,
    /// Its key lease could not be renewed.
    KeyExpired,
    /// Its drone went away and the lease ran out, or the drone lost track of it.
    Lost,
    /// It did not answer HTTP within the startup timeout.
    StartupTimeout,
    /// Plane failed to run it (bad executable, spawn error, …).
    InternalError,
}

impl TerminationReason {
    /// The reason as written on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            TerminationReason::Swept => "swept",
            TerminationReason::External => "external",
            TerminationReason::KeyExpired => "keyexpired",
            TerminationReason::Lost => "lost",
            TerminationReason::StartupTimeout => "startuptimeout",
            TerminationReason::InternalError => "internalerror",
        }
    }
}

impl FromStr for TerminationReason {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        serde_json::from_value(serde_json::Value::String(s.to_owned()))
            .map_err(|_| format!("unknown termination reason `{s}`"))
    }
}

/// Whether a termination is graceful (SIGTERM then SIGKILL) or immediate (SIGKILL).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TerminationKind {
    /// SIGTERM, then SIGKILL after the grace period.
    Soft,
    /// SIGKILL.
    Hard,
}

impl TerminationKind {
    /// The kind as written on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            TerminationKind::Soft => "soft",
            TerminationKind::Hard => "hard",
        }
    }
}

impl FromStr for TerminationKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "soft" => Ok(TerminationKind::Soft),
            "hard" => Ok(TerminationKind::Hard),
            _ => Err(format!("unknown termination kind `{s}`")),
        }
    }
}

/// One entry of a backend's status history, as served by `/pub/b/:id/status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusEntry {
    /// The status.
    pub status: BackendStatus,
    /// When the store recorded it, in milliseconds since the epoch (store clock).
    pub time: EpochMillis,
    /// Why the backend is terminating, once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub termination_reason: Option<TerminationReason>,
    /// How the backend is terminating, once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub termination_kind: Option<TerminationKind>,
    /// Only on `terminated`: true iff the backend exited with a non-zero exit code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_error: Option<bool>,
    /// A human-readable detail, such as why an image pull failed (an extension of ours;
    /// Plane 0.5 clients ignore it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_only_move_forward() {
        for (i, a) in BackendStatus::ALL.iter().enumerate() {
            for (j, b) in BackendStatus::ALL.iter().enumerate() {
                assert_eq!(a.can_transition_to(*b), j > i, "{a} -> {b}");
            }
        }
    }

    #[test]
    fn wire_names() {
        for st in BackendStatus::ALL {
            let json = serde_json::to_string(&st).unwrap();
            assert_eq!(json, format!("\"{}\"", st.as_str()));
            assert_eq!(st.as_str().parse::<BackendStatus>().unwrap(), st);
        }
        assert_eq!(BackendStatus::HardTerminating.order(), 65);
        assert_eq!(
            serde_json::to_string(&TerminationReason::KeyExpired).unwrap(),
            "\"keyexpired\""
        );
        assert_eq!(
            "startuptimeout".parse::<TerminationReason>().unwrap(),
            TerminationReason::StartupTimeout
        );
        assert!("nope".parse::<TerminationReason>().is_err());
    }

    #[test]
    fn status_entry_omits_absent_keys() {
        let e = StatusEntry {
            status: BackendStatus::Ready,
            time: 5,
            termination_reason: None,
            termination_kind: None,
            exit_error: None,
            message: None,
        };
        assert_eq!(serde_json::to_string(&e).unwrap(), r#"{"status":"ready","time":5}"#);
    }
}
