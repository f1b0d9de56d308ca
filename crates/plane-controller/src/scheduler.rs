//! Drone selection: among the drones that can take the backend, the least loaded of
//! `k` random candidates ("power of k choices"), which spreads concurrent placements
//! without a global lock.

use plane_store::DroneRecord;
use rand::seq::SliceRandom;

/// Picks a drone, or `None` if there is no candidate.
pub fn choose(mut candidates: Vec<DroneRecord>, k: usize) -> Option<DroneRecord> {
    let mut rng = rand::thread_rng();
    candidates.shuffle(&mut rng);
    candidates.into_iter().take(k.max(1)).min_by_key(|d| d.backend_count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn drone(name: &str, load: u64) -> DroneRecord {
        DroneRecord {
            name: name.parse().unwrap(),
            cluster: "c:1".parse().unwrap(),
            pool: String::new(),
            runtimes: vec![],
            plane_version: String::new(),
            plane_hash: String::new(),
            controller: None,
            controller_heartbeat_age: None,
            ready: true,
            draining: false,
            last_heartbeat_age: Duration::ZERO,
            backend_count: load,
        }
    }

    #[test]
    fn none_without_candidates() {
        assert!(choose(vec![], 2).is_none());
    }

    #[test]
    fn compares_all_when_k_covers_them() {
        for _ in 0..50 {
            let d = choose(vec![drone("dr-a", 5), drone("dr-b", 1), drone("dr-c", 3)], 3).unwrap();
            assert_eq!(d.name.as_str(), "dr-b");
        }
    }

    #[test]
    fn never_picks_the_most_loaded_of_two() {
        for _ in 0..50 {
            let d = choose(vec![drone("dr-a", 9), drone("dr-b", 1)], 2).unwrap();
            assert_eq!(d.name.as_str(), "dr-b");
        }
    }
}
