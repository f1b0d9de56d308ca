//! The drone endpoint (`/ctrl/drone-socket`): handshake, then heartbeats, state events
//! (applied to the store, then acked), key renewals; and spawn/terminate actions out.
//!
//! A drone's messages are handled in order, one at a time, so its events reach the
//! store in the order it sent them. An event is acked only after the store has it; a
//! store failure closes the socket so the drone re-sends everything unacked.
//!
//! Events that have already arrived when one is handled (a backend's `loading`,
//! `starting` and `waiting` come within a millisecond) are applied as one batch,
//! [`plane_store::Store::apply_updates`]: on SQLite one commit and one fsync instead of
//! one each, so a `ready` does not queue behind its predecessors' fsyncs.

use crate::socket::{handshake, next_text, send, spawn_writer, upgrade, First};
use crate::state::Controller;
use axum::extract::ws::{WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use futures_util::{FutureExt, StreamExt};
use plane_store::{ApplyOutcome, BackendUpdate, DroneRegistration};
use plane_types::names::DroneName;
use plane_types::protocol::{BackendEvent, ControllerToDrone, DroneHello, DroneToController, PROTOCOL_VERSION};
use plane_types::status::BackendStatus;
use std::sync::Arc;
use tokio::sync::mpsc;

/// Upgrades the request to the drone socket.
pub async fn handler(ws: WebSocketUpgrade, State(c): State<Arc<Controller>>) -> Response {
    upgrade(ws, c, run)
}

async fn run(c: Arc<Controller>, socket: WebSocket) {
    let (mut sink, mut stream) = socket.split();
    let classify = |m| match m {
        DroneToController::Hello(h) => {
            let v = h.protocol_version;
            First::Hello(h, v)
        }
        _ => First::Other,
    };
    let reject = |message| ControllerToDrone::Reject { message };
    let Some(hello): Option<DroneHello> = handshake(&mut sink, &mut stream, "drone", classify, reject).await else {
        return;
    };
    let drone = hello.name.clone();
    let reg = DroneRegistration {
        name: drone.clone(),
        cluster: hello.cluster.clone(),
        pool: hello.pool.clone(),
        runtimes: hello.runtimes.clone(),
        plane_version: hello.plane_version.clone(),
        plane_hash: hello.plane_hash.clone(),
        controller: c.config.name.clone(),
    };
    if let Err(e) = c.store().register_drone(&reg).await {
        tracing::error!(%drone, error = %e, "cannot register drone");
        return;
    }
    let welcome = ControllerToDrone::Welcome {
        protocol_version: PROTOCOL_VERSION,
        controller: c.config.name.clone(),
    };
    if !send(&mut sink, &welcome).await {
        return;
    }
    let (tx, rx) = mpsc::unbounded_channel::<ControllerToDrone>();
    let conn_id = c.conn_id();
    c.add_drone(drone.clone(), conn_id, tx, hello.local_time);
    tracing::info!(%drone, cluster = %hello.cluster, pool = %hello.pool, "drone connected");

    let writer = spawn_writer(sink, rx);

    if let Err(e) = c.resend_pending(&drone).await {
        tracing::error!(%drone, error = %e, "cannot re-send pending actions");
    } else {
        let parse = |text: String| match serde_json::from_str::<DroneToController>(&text) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(%drone, error = %e, "ignoring an invalid message from a drone");
                None
            }
        };
        let mut pending = None;
        loop {
            let msg = match pending.take() {
                Some(msg) => msg,
                None => match next_text(&mut stream).await {
                    Some(text) => match parse(text) {
                        Some(msg) => msg,
                        None => continue,
                    },
                    None => break,
                },
            };
            let result = match msg {
                DroneToController::Event(first) => {
                    // Take the events that are already here; the first other message
                    // waits for the batch.
                    let mut events = vec![first];
                    let mut closed = false;
                    while events.len() < MAX_EVENT_BATCH {
                        match next_text(&mut stream).now_or_never() {
                            Some(Some(text)) => match parse(text) {
                                Some(DroneToController::Event(e)) => events.push(e),
                                Some(other) => {
                                    pending = Some(other);
                                    break;
                                }
                                None => {}
                            },
                            Some(None) => {
                                closed = true;
                                break;
                            }
                            None => break,
                        }
                    }
                    let result = apply_events(&c, &drone, events).await;
                    if closed && result.is_ok() {
                        break;
                    }
                    result
                }
                other => handle(&c, &drone, other).await,
            };
            if let Err(e) = result {
                tracing::error!(%drone, error = %e, "store failed while handling a drone message; closing");
                break;
            }
        }
    }

    writer.abort();
    if c.remove_drone(&drone, conn_id) {
        if let Err(e) = c.store().drone_disconnected(&drone, &c.config.name).await {
            tracing::warn!(%drone, error = %e, "cannot record drone disconnect");
        }
    }
    tracing::info!(%drone, "drone disconnected");
}

async fn handle(c: &Controller, drone: &DroneName, msg: DroneToController) -> Result<(), plane_store::StoreError> {
    match msg {
        DroneToController::Hello(_) => tracing::warn!(%drone, "ignoring a second Hello"),
        DroneToController::Heartbeat { local_time } => {
            c.drone_clock(drone, local_time);
            c.store().drone_heartbeat(drone).await?;
        }
        DroneToController::Event(event) => apply_events(c, drone, vec![event]).await?,
        DroneToController::RenewKey {
            backend_id,
            fencing_token,
            local_time,
        } => {
            c.drone_clock(drone, local_time);
            let renewed = c
                .store()
                .renew_key(&backend_id, fencing_token, c.config.timings.lease.expire_after)
                .await?;
            let deadlines = renewed.then(|| c.config.timings.lease.deadlines_from(local_time));
            if !renewed {
                tracing::warn!(%drone, %backend_id, "key renewal refused");
            }
            c.send_drone(drone, ControllerToDrone::Renewed { backend_id, deadlines });
        }
        DroneToController::LoadProgress { backend_id, progress } => {
            tracing::debug!(%drone, %backend_id, message = %progress.message, "load progress");
            c.publish_progress(backend_id, progress);
        }
        DroneToController::Metrics { backend_id, metrics } => c.record_metrics(&backend_id, drone, metrics),
    }
    Ok(())
}

/// The most events applied in one store call.
const MAX_EVENT_BATCH: usize = 64;

/// Applies `events` (in the order the drone sent them) in one store call, publishes
/// each change, and acks each once the other controllers can know of it: a drone
/// re-sends what is not acked, and the re-sent event is published again.
async fn apply_events(
    c: &Controller,
    drone: &DroneName,
    events: Vec<BackendEvent>,
) -> Result<(), plane_store::StoreError> {
    let updates: Vec<BackendUpdate> = events
        .iter()
        .map(|e| BackendUpdate {
            backend_id: e.backend_id.clone(),
            status: e.status,
            address: e.address,
            exit_code: e.exit_code,
            termination_reason: e.termination_reason,
            termination_kind: e.termination_kind,
            message: e.message.clone(),
        })
        .collect();
    let outcomes = c.store().apply_updates(drone, &updates).await?;
    for (event, outcome) in events.iter().zip(outcomes) {
        published(c, drone, event, outcome);
    }
    if !c.flush_peers().await {
        return Err(plane_store::StoreError::Database(
            "notices to the other controllers are not getting through".into(),
        ));
    }
    for event in &events {
        c.send_drone(
            drone,
            ControllerToDrone::Ack {
                event_id: event.event_id,
            },
        );
    }
    Ok(())
}

/// Publishes what applying `e` changed.
fn published(c: &Controller, drone: &DroneName, e: &BackendEvent, outcome: ApplyOutcome) {
    match outcome {
        ApplyOutcome::Advanced(entry) => {
            tracing::debug!(%drone, backend_id = %e.backend_id, status = %e.status, "backend status");
            if entry.status >= BackendStatus::Terminating {
                c.to_proxies(
                    None,
                    plane_types::protocol::ControllerToProxy::BackendRemoved {
                        backend_id: e.backend_id.clone(),
                    },
                );
            }
            c.publish(e.backend_id.clone(), &entry);
        }
        // A re-sent event the store has already: its first delivery may have been
        // applied by a controller that died before it published the change.
        ApplyOutcome::Stale => c.publish_hint(e.backend_id.clone()),
        ApplyOutcome::UnknownBackend => {
            tracing::warn!(%drone, backend_id = %e.backend_id, "event for an unknown backend")
        }
        ApplyOutcome::WrongDrone => {
            tracing::warn!(%drone, backend_id = %e.backend_id, "event for a backend of another drone")
        }
    }
}
