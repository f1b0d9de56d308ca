//! The checker: what the backends, the drones and the store recorded, compared.
//!
//! 1. **One backend per key.** Each backend holds an exclusive lock on its key's file
//!    while it lives and logs whether it got it at its start (`DEMO_LIFECYCLE_DIR`);
//!    a start without the lock means two backends of one key were alive at once. Per
//!    key, the fencing tokens of successive starts strictly increase.
//! 2. **Every backend ends.** Each backend in the store is `terminated`, or `ready` and
//!    answering at its address; and every backend process still alive is one the store
//!    says is not terminated (no ghost).
//! 3. **No event lost.** Once everything is stopped and every drone's outbox is empty,
//!    the statuses the store recorded for a backend equal the ones its drone emitted
//!    (its event journal), but for `scheduled` and a `lost` the controller recorded
//!    itself. A record that ended `lost` excuses the drone's statuses it lacks: a
//!    drone cut off past its lease reports its own stop only after the controller has
//!    closed the record (by design, and property 1 checks that the stop came first).

use plane_demo::lifecycle::LifecycleEvent;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// A backend as the store has it.
#[derive(Debug, Clone)]
pub struct StoredBackend {
    pub id: String,
    pub key: String,
    pub status: String,
    pub address: Option<String>,
    pub fencing_token: i64,
    /// Status history, oldest first: (status, termination reason).
    pub history: Vec<(String, Option<String>)>,
}

/// The statuses drones emitted, per backend, in order.
pub type Journal = BTreeMap<String, Vec<String>>;

/// Reads every lifecycle line (a torn last line of a killed writer is skipped).
pub fn read_lifecycle(path: &Path) -> Vec<LifecycleEvent> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// Reads drone event journals (JSON lines with `backend_id` and `status`).
pub fn read_journals(paths: &[std::path::PathBuf]) -> Journal {
    let mut out: Journal = BTreeMap::new();
    for p in paths {
        let Ok(text) = std::fs::read_to_string(p) else { continue };
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let (Some(b), Some(s)) = (v["backend_id"].as_str(), v["status"].as_str()) else {
                continue;
            };
            let list = out.entry(b.to_owned()).or_default();
            if !list.iter().any(|x| x == s) {
                list.push(s.to_owned());
            }
        }
    }
    out
}

/// Property 1.
pub fn one_backend_per_key(events: &[LifecycleEvent]) -> Vec<String> {
    let mut violations = Vec::new();
    let mut starts: BTreeMap<&str, Vec<&LifecycleEvent>> = BTreeMap::new();
    for e in events.iter().filter(|e| e.event == "start") {
        if !e.exclusive {
            violations.push(format!(
                "backend {} of key {} started while another backend of the key was alive (token {})",
                e.backend, e.key, e.token
            ));
        }
        starts.entry(&e.key).or_default().push(e);
    }
    for (key, mut list) in starts {
        list.sort_by_key(|e| (e.time, e.token));
        for w in list.windows(2) {
            if w[1].token <= w[0].token {
                violations.push(format!(
                    "key {key}: fencing token {} ({}) started after {} ({})",
                    w[1].token, w[1].backend, w[0].token, w[0].backend
                ));
            }
        }
    }
    violations
}

/// Each backend ran with the fencing token the store gave its key acquisition.
pub fn tokens_match(stored: &[StoredBackend], events: &[LifecycleEvent]) -> Vec<String> {
    let mut violations = Vec::new();
    for e in events.iter().filter(|e| e.event == "start") {
        match stored.iter().find(|b| b.id == e.backend) {
            Some(b) if b.fencing_token == e.token && b.key == e.key => {}
            Some(b) => violations.push(format!(
                "backend {} ran as key {} token {}, the store says key {} token {}",
                e.backend, e.key, e.token, b.key, b.fencing_token
            )),
            None => violations.push(format!("backend {} ran but the store does not know it", e.backend)),
        }
    }
    violations
}

/// Property 3.
pub fn recorded_equals_emitted(stored: &[StoredBackend], journal: &Journal) -> Vec<String> {
    let mut violations = Vec::new();
    let known: BTreeSet<&str> = stored.iter().map(|b| b.id.as_str()).collect();
    for b in stored {
        let emitted: Vec<&str> = journal
            .get(&b.id)
            .map(|v| v.iter().map(String::as_str).collect())
            .unwrap_or_default();
        let last = b.history.last();
        let lost_by_controller =
            matches!(last, Some((s, Some(r))) if s == "terminated" && r == "lost") && !emitted.contains(&"terminated");
        for (status, _) in &b.history {
            let own = status == "scheduled" || (status == "terminated" && lost_by_controller);
            if !own && !emitted.contains(&status.as_str()) {
                violations.push(format!(
                    "backend {}: the store recorded {status}, which its drone never emitted",
                    b.id
                ));
            }
        }
        // Once the record ended as lost, later events of the drone are stale by design.
        let ended_lost = matches!(last, Some((s, Some(r))) if s == "terminated" && r == "lost");
        for status in &emitted {
            if !b.history.iter().any(|(s, _)| s == status) && !ended_lost {
                violations.push(format!(
                    "backend {}: its drone emitted {status}, which the store never recorded",
                    b.id
                ));
            }
        }
    }
    for id in journal.keys() {
        if !known.contains(id.as_str()) {
            violations.push(format!("backend {id}: emitted by a drone, unknown to the store"));
        }
    }
    violations
}

/// Whether a process is alive and still a demo backend (not a reused pid).
pub fn demo_backend_alive(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| c.split(|b| *b == 0).any(|arg| arg == b"demo-backend"))
        .unwrap_or(false)
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'))
            .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(key: &str, backend: &str, token: i64, time: u64, exclusive: bool) -> LifecycleEvent {
        LifecycleEvent {
            event: "start".into(),
            key: key.into(),
            backend: backend.into(),
            token,
            pid: 1,
            time,
            exclusive,
        }
    }

    fn stored(id: &str, history: &[(&str, Option<&str>)]) -> StoredBackend {
        StoredBackend {
            id: id.into(),
            key: "k".into(),
            status: history.last().map(|h| h.0.to_owned()).unwrap_or_default(),
            address: None,
            fencing_token: 1,
            history: history
                .iter()
                .map(|(s, r)| (s.to_string(), r.map(str::to_owned)))
                .collect(),
        }
    }

    #[test]
    fn overlapping_backends_and_tokens_out_of_order_are_caught() {
        assert!(one_backend_per_key(&[start("k", "a", 1, 10, true), start("k", "b", 2, 20, true)]).is_empty());
        assert_eq!(
            one_backend_per_key(&[start("k", "a", 1, 10, true), start("k", "b", 2, 20, false)]).len(),
            1
        );
        assert_eq!(
            one_backend_per_key(&[start("k", "a", 2, 10, true), start("k", "b", 1, 20, true)]).len(),
            1
        );
        assert!(one_backend_per_key(&[start("k", "a", 2, 10, true), start("j", "b", 1, 20, true)]).is_empty());
    }

    #[test]
    fn lost_and_invented_events_are_caught() {
        let journal = |v: &[(&str, &[&str])]| -> Journal {
            v.iter()
                .map(|(b, s)| (b.to_string(), s.iter().map(|x| x.to_string()).collect()))
                .collect()
        };
        let full = ["loading", "starting", "waiting", "ready", "terminating", "terminated"];
        let history: Vec<(&str, Option<&str>)> = std::iter::once(("scheduled", None))
            .chain(full.iter().map(|s| (*s, None)))
            .collect();
        assert!(recorded_equals_emitted(&[stored("a", &history)], &journal(&[("a", &full)])).is_empty());
        // The drone emitted `terminated`; the store never got it.
        let missing = &history[..history.len() - 1];
        assert_eq!(
            recorded_equals_emitted(&[stored("a", missing)], &journal(&[("a", &full)])).len(),
            1
        );
        // The store has `ready`; the drone never said so.
        assert_eq!(
            recorded_equals_emitted(&[stored("a", &history)], &journal(&[("a", &full[..3])])).len(),
            3
        );
        // The controller marked it lost first: the drone's later events are stale.
        let lost = [("scheduled", None), ("loading", None), ("terminated", Some("lost"))];
        assert!(recorded_equals_emitted(&[stored("a", &lost)], &journal(&[("a", &full)])).is_empty());
        // Emitted for a backend the store does not have.
        assert_eq!(recorded_equals_emitted(&[], &journal(&[("a", &full)])).len(), 1);
    }
}
