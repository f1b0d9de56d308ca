//! The Plane proxy: token-routed HTTP and WebSocket forwarding.
