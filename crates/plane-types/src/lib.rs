//! Wire and API types shared by every Plane component.
//!
//! Layout:
//! * [`names`]: validated identifiers (backend ids, drone names, cluster names, keys).
//! * [`status`]: the backend lifecycle (statuses, termination reasons, status entries).
//! * [`api`]: the HTTP/JSON bodies of the controller API, compatible with Plane 0.5.
//! * [`executable`]: what a backend runs (a process or a Docker image).
//! * [`protocol`]: the versioned JSON protocol between the controller and drones/proxies.
//! * [`lease`]: key lease timings and the deadline arithmetic in a drone's clock.
//!
//! **Architecture invariant:** this crate performs no I/O and has no async code; every
//! type that crosses a process boundary is defined here.

pub mod api;
pub mod executable;
pub mod lease;
pub mod names;
pub mod protocol;
pub mod status;

/// The version string reported by every component.
pub const PLANE_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The source hash reported by every component (set `PLANE_GIT_HASH` at build time).
pub const PLANE_HASH: &str = match option_env!("PLANE_GIT_HASH") {
    Some(h) => h,
    None => "unknown",
};

/// Milliseconds since the Unix epoch, as carried on the wire.
pub type EpochMillis = u64;
