//! The Plane drone: runs backends through a runtime and reports their lifecycle.
