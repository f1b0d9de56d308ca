//! A client library for the Plane controller API.
