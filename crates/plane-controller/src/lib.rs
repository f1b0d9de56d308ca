//! The Plane controller: HTTP API, scheduling, keys, sweeps, drone and proxy sockets.
