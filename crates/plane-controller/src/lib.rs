//! The Plane controller: the only component that touches the store.
//!
//! Layout:
//! * [`api`]: the HTTP routes (compatible with Plane 0.5) and the status stream;
//! * [`connect`]: get-or-create a backend for a key, issue tokens;
//! * [`scheduler`]: drone choice;
//! * [`drone_socket`] / [`proxy_socket`]: the internal WebSocket protocol (shared
//!   plumbing in `socket`);
//! * [`sweeper`]: idle, lifetime and lost-backend sweeps;
//! * [`state`]: connections and the status bus; [`error`] / [`extract`]: the HTTP edge.
//!
//! **API boundary:** handlers parse every input into `plane_types` values before any
//! logic runs; every failure leaves as an `ApiError` body with a status code.

pub mod api;
pub mod auth;
pub mod config;
pub mod connect;
pub mod drone_socket;
pub mod error;
pub mod extract;
pub mod peers;
pub mod proxy_socket;
pub mod scheduler;
mod socket;
pub mod state;
pub mod sweeper;

pub use config::{ControllerConfig, ControllerTimings};
use state::Controller;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Serves the controller on `listener` until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, config: ControllerConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    if !config.timings.lease.is_valid() {
        anyhow::bail!("lease timings must satisfy renew < soft-terminate < hard-terminate < expiry");
    }
    config.store.ping().await?;
    let controller = Controller::new(config, shutdown.child_token());
    tracing::info!(name = %controller.config.name, addr = ?listener.local_addr().ok(), "controller listening");
    let sweeper = tokio::spawn(sweeper::run(controller.clone()));
    let peers_stop = CancellationToken::new();
    let peers = peers::start(&controller, peers_stop.clone());
    let app = api::router(controller.clone());
    // Small frames (acks, SSE events) must not wait for Nagle's algorithm: on loopback
    // with delayed ACKs that costs up to 40 ms per exchange, on the cold-start path.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp: &mut tokio::net::TcpStream| {
        let _ = tcp.set_nodelay(true);
    });
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await;
    controller.shutdown.cancel();
    let _ = sweeper.await;
    // The last requests' notices go out before the fan-out stops (bounded: the
    // database may be the reason for the shutdown).
    if let Some(p) = &controller.peers {
        if !p.flush(std::time::Duration::from_secs(2)).await {
            tracing::warn!("stopping with notices to the other controllers unsent");
        }
    }
    peers_stop.cancel();
    for task in peers {
        let _ = task.await;
    }
    result.map_err(Into::into)
}
