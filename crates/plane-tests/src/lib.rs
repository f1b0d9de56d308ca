//! In-process cluster tests and benchmarks for Plane.
