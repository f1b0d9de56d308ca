//! What both store implementations share, below SQL: decoding stored text, the status
//! entry built from a row, and the few decisions that do not depend on the dialect.

use crate::{StoreError, StoreResult};
use plane_types::status::{BackendStatus, StatusEntry, TerminationKind, TerminationReason};
use plane_types::EpochMillis;
use std::str::FromStr;

/// The detail recorded when a backend's lease runs out while its drone is silent.
pub const LOST_MESSAGE: &str = "the drone stopped renewing the key lease";

/// Parses stored text; a value that does not parse means the database is corrupt.
pub(crate) fn parse<T: FromStr>(what: &str, s: &str) -> StoreResult<T>
where
    T::Err: std::fmt::Display,
{
    s.parse().map_err(|e| StoreError::Corrupt(format!("{what} {s:?}: {e}")))
}

/// [`parse`] for a nullable column.
pub(crate) fn parse_opt<T: FromStr>(what: &str, s: Option<String>) -> StoreResult<Option<T>>
where
    T::Err: std::fmt::Display,
{
    s.map(|s| parse(what, &s)).transpose()
}

/// Decodes a stored JSON column.
pub(crate) fn json<T: serde::de::DeserializeOwned>(what: &str, s: &str) -> StoreResult<T> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

/// Encodes a value for a JSON column.
pub(crate) fn to_json<T: serde::Serialize>(v: &T) -> StoreResult<String> {
    serde_json::to_string(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// A status history entry. `exit_error` is set on `terminated` only: true iff an exit
/// code is known and non-zero (Plane 0.5's rule).
pub(crate) fn status_entry(
    status: BackendStatus,
    time: i64,
    reason: Option<TerminationReason>,
    kind: Option<TerminationKind>,
    exit_code: Option<i32>,
    message: Option<String>,
) -> StatusEntry {
    StatusEntry {
        status,
        time: time as EpochMillis,
        termination_reason: reason,
        termination_kind: kind,
        exit_error: (status == BackendStatus::Terminated).then_some(matches!(exit_code, Some(c) if c != 0)),
        message,
    }
}

/// Whether a termination request of `kind` replaces the pending one: any request beats
/// none, and hard beats soft.
pub(crate) fn upgrades_termination(pending: Option<TerminationKind>, kind: TerminationKind) -> bool {
    match pending {
        None => true,
        Some(TerminationKind::Soft) => kind == TerminationKind::Hard,
        Some(TerminationKind::Hard) => false,
    }
}

/// What is known of a termination, as stored on a backend row.
pub(crate) struct KnownTermination {
    /// The reason already recorded with a status.
    pub reason: Option<TerminationReason>,
    /// The kind already recorded with a status.
    pub kind: Option<TerminationKind>,
    /// The reason of a requested, not yet reported termination.
    pub pending_reason: Option<TerminationReason>,
    /// The kind of a requested, not yet reported termination.
    pub pending_kind: Option<TerminationKind>,
}

/// The reason and kind to record with an update to `status`: what the drone says, else
/// what is already known, else what was requested; a terminating status without a kind
/// is soft, a hard-terminating one hard. Nothing before `terminating`.
pub(crate) fn termination_of_update(
    status: BackendStatus,
    reason: Option<TerminationReason>,
    kind: Option<TerminationKind>,
    known: KnownTermination,
) -> (Option<TerminationReason>, Option<TerminationKind>) {
    if !status.is_terminating() {
        return (None, None);
    }
    let default_kind = match status {
        BackendStatus::Terminating => Some(TerminationKind::Soft),
        BackendStatus::HardTerminating => Some(TerminationKind::Hard),
        _ => None,
    };
    (
        reason.or(known.reason).or(known.pending_reason),
        kind.or(known.kind).or(known.pending_kind).or(default_kind),
    )
}

/// A duration as stored: whole milliseconds (saturating).
pub(crate) fn duration_ms(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A stored "time left" in milliseconds as a duration (negative is zero).
pub(crate) fn ms_duration(ms: i64) -> std::time::Duration {
    std::time::Duration::from_millis(ms.max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn termination_upgrades() {
        use TerminationKind::{Hard, Soft};
        assert!(upgrades_termination(None, Soft));
        assert!(upgrades_termination(Some(Soft), Hard));
        assert!(!upgrades_termination(Some(Soft), Soft));
        assert!(!upgrades_termination(Some(Hard), Soft));
        assert!(!upgrades_termination(Some(Hard), Hard));
    }

    #[test]
    fn termination_of_updates() {
        let none = || KnownTermination {
            reason: None,
            kind: None,
            pending_reason: None,
            pending_kind: None,
        };
        let swept = Some(TerminationReason::Swept);
        assert_eq!(
            termination_of_update(BackendStatus::Ready, swept, None, none()),
            (None, None)
        );
        assert_eq!(
            termination_of_update(BackendStatus::HardTerminating, None, None, none()),
            (None, Some(TerminationKind::Hard))
        );
        let requested = KnownTermination {
            pending_reason: swept,
            pending_kind: Some(TerminationKind::Soft),
            ..none()
        };
        assert_eq!(
            termination_of_update(BackendStatus::Terminated, None, None, requested),
            (swept, Some(TerminationKind::Soft))
        );
    }

    #[test]
    fn exit_error_only_on_terminated() {
        let e = status_entry(BackendStatus::Ready, 1, None, None, Some(3), None);
        assert_eq!(e.exit_error, None);
        let e = status_entry(BackendStatus::Terminated, 1, None, None, Some(3), None);
        assert_eq!(e.exit_error, Some(true));
        let e = status_entry(BackendStatus::Terminated, 1, None, None, None, None);
        assert_eq!(e.exit_error, Some(false));
    }
}
