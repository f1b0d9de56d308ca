//! The HTTP API: routes of compat/plane-http-api.md, parsed into typed requests at the
//! edge. `/ctrl/*` is the trusted control API; `/pub/*` is public, with open CORS.

use crate::error::HttpError;
use crate::extract::{path_cluster, path_name, ApiJson, ApiPath};
use crate::state::Controller;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream};
use plane_types::api::{
    ApiErrorKind, BackendMetricsResponse, ClusterState, ConnectRequest, DrainResponse, DroneState, NodeName, NodeState,
    RevokeRequest, StatusResponse,
};
use plane_types::names::{BackendName, DroneName};
use plane_types::protocol::{AcmeTxt, ControllerToProxy, DRONE_SOCKET_PATH, PROXY_SOCKET_PATH};
use plane_types::status::{BackendStatus, StatusEntry, TerminationKind, TerminationReason};
use std::convert::Infallible;
use std::sync::Arc;
use tokio::sync::broadcast::error::RecvError;
use tower_http::cors::{Any, CorsLayer};

type AppState = State<Arc<Controller>>;

/// The controller's router.
pub fn router(controller: Arc<Controller>) -> Router {
    let cors = CorsLayer::new()
        .allow_origin(Any)
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([header::CONTENT_TYPE]);
    let public = Router::new()
        .route("/pub/health", get(health))
        .route("/pub/b/{backend}/status", get(backend_status))
        .route("/pub/b/{backend}/status-stream", get(status_stream))
        .layer(cors);
    let control = Router::new()
        .route("/ctrl/status", get(controller_status))
        .route("/ctrl/connect", post(connect))
        .route("/ctrl/c/{cluster}/state", get(cluster_state))
        .route("/ctrl/c/{cluster}/d/{drone}/drain", post(drain))
        .route("/ctrl/c/{cluster}/d/{drone}/undrain", post(undrain))
        .route("/ctrl/b/revoke", post(revoke))
        .route("/ctrl/b/{backend}/soft-terminate", post(soft_terminate))
        .route("/ctrl/b/{backend}/hard-terminate", post(hard_terminate))
        .route("/ctrl/b/{backend}/metrics", get(backend_metrics))
        .route(DRONE_SOCKET_PATH, get(crate::drone_socket::handler))
        .route(PROXY_SOCKET_PATH, get(crate::proxy_socket::handler))
        .route("/ctrl/c/{cluster}/acme-txt", get(acme_txt))
        .route_layer(axum::middleware::from_fn_with_state(
            controller.clone(),
            crate::auth::require,
        ));
    control
        // Before the merge: the CORS layer of the public routes answers their preflights.
        .method_not_allowed_fallback(method_not_allowed)
        .merge(public)
        .fallback(not_found)
        .with_state(controller)
}

async fn not_found() -> HttpError {
    HttpError::not_found("no such route")
}

async fn method_not_allowed() -> HttpError {
    HttpError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        ApiErrorKind::Other,
        "method not allowed on this route",
    )
}

/// The `_acme-challenge` TXT values of a cluster, for DNS servers.
async fn acme_txt(State(c): AppState, ApiPath(cluster): ApiPath<String>) -> Result<Json<AcmeTxt>, HttpError> {
    let cluster = path_cluster(&cluster)?;
    Ok(Json(AcmeTxt {
        values: c.store().acme_txt(&cluster).await?,
    }))
}

async fn controller_status(State(c): AppState) -> Result<Json<StatusResponse>, HttpError> {
    c.store().ping().await?;
    Ok(Json(StatusResponse {
        status: "ok".into(),
        version: plane_types::PLANE_VERSION.into(),
        hash: plane_types::PLANE_HASH.into(),
    }))
}

async fn health(State(c): AppState) -> Response {
    match c.store().ping().await {
        Ok(()) => Json(serde_json::json!({"status": "ok"})).into_response(),
        Err(e) => HttpError::from(e).into_response(),
    }
}

async fn connect(State(c): AppState, ApiJson(req): ApiJson<ConnectRequest>) -> Result<Response, HttpError> {
    Ok(Json(c.connect(req).await?).into_response())
}

async fn backend_status(State(c): AppState, ApiPath(backend): ApiPath<String>) -> Result<Json<StatusEntry>, HttpError> {
    let id: BackendName = path_name("backend id", &backend)?;
    let history = c.store().status_history(&id).await?;
    history
        .last()
        .cloned()
        .map(Json)
        .ok_or_else(|| HttpError::not_found(format!("no backend {id}")))
}

/// Parses `Last-Event-ID` (a status string). Garbage is ignored, as browsers may send
/// whatever an older server used.
fn last_event_id(headers: &HeaderMap) -> Option<BackendStatus> {
    headers.get("last-event-id")?.to_str().ok()?.trim().parse().ok()
}

fn sse_event(entry: &StatusEntry) -> Event {
    Event::default()
        .id(entry.status.as_str())
        .data(serde_json::to_string(entry).unwrap_or_default())
}

async fn next_progress(
    rx: &mut Option<tokio::sync::broadcast::Receiver<crate::state::ProgressChange>>,
) -> Option<Result<crate::state::ProgressChange, RecvError>> {
    match rx {
        Some(rx) => Some(rx.recv().await),
        None => std::future::pending().await,
    }
}

fn progress_event(progress: &plane_types::protocol::LoadProgress) -> Event {
    Event::default()
        .event("progress")
        .data(serde_json::to_string(progress).unwrap_or_default())
}

/// `?progress=true` on the status stream: also send `event: progress` events while the
/// backend loads. Off by default, so Plane 0.5 clients see only status events.
#[derive(Debug, Default, serde::Deserialize)]
struct StreamQuery {
    #[serde(default)]
    progress: bool,
}

/// State of one status stream: what is left to replay, and the live subscription.
struct StreamState {
    controller: Arc<Controller>,
    id: BackendName,
    rx: tokio::sync::broadcast::Receiver<crate::state::StatusChange>,
    /// Load-progress reports, if the client asked for them and the backend still loads.
    progress: Option<tokio::sync::broadcast::Receiver<crate::state::ProgressChange>>,
    /// The latest progress known when the stream opened, sent after the replay.
    initial_progress: Option<plane_types::protocol::LoadProgress>,
    /// The last progress sent: a live report equal to it (one that arrived between
    /// subscribing and reading the latest) is not sent twice.
    last_progress: Option<plane_types::protocol::LoadProgress>,
    pending: std::collections::VecDeque<StatusEntry>,
    last: Option<BackendStatus>,
    done: bool,
}

impl StreamState {
    fn queue(&mut self, entries: impl IntoIterator<Item = StatusEntry>) {
        for e in entries {
            let after_last = self.last.is_none_or(|l| e.status > l);
            let after_queued = self.pending.back().is_none_or(|q| e.status > q.status);
            if after_last && after_queued {
                self.pending.push_back(e);
            }
        }
    }

    async fn requeue_from_history(&mut self) -> Option<()> {
        let history = self.controller.store().status_history(&self.id).await.ok()?;
        self.queue(history);
        Some(())
    }

    /// Whether progress is still worth sending: the backend has not started yet.
    fn wants_progress(&self) -> bool {
        self.last.is_none_or(crate::state::shows_progress)
    }

    async fn next(mut self) -> Option<(Result<Event, Infallible>, StreamState)> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                self.last = Some(e.status);
                self.done = e.status.is_terminal();
                return Some((Ok(sse_event(&e)), self));
            }
            if self.done {
                return None;
            }
            if !self.wants_progress() {
                self.progress = None;
                self.initial_progress = None;
            }
            if let Some(p) = self.initial_progress.take() {
                let event = progress_event(&p);
                self.last_progress = Some(p);
                return Some((Ok(event), self));
            }
            let change = tokio::select! {
                biased;
                change = self.rx.recv() => change,
                progress = next_progress(&mut self.progress) => {
                    match progress {
                        Some(Ok(p)) if p.backend_id == self.id && self.last_progress.as_ref() != Some(&p.progress) => {
                            let event = progress_event(&p.progress);
                            self.last_progress = Some(p.progress);
                            return Some((Ok(event), self));
                        }
                        Some(Err(RecvError::Closed)) => self.progress = None,
                        // Lagged progress is simply skipped: the next report supersedes it.
                        _ => {}
                    }
                    continue;
                }
            };
            match change {
                // Changes are published by concurrent tasks after their commits, so
                // they may arrive out of order (or be missed, on lag): the history in
                // the store has them all, in order.
                Ok(change) if change.concerns(&self.id) => self.requeue_from_history().await?,
                Ok(_) => {}
                Err(RecvError::Lagged(_)) => self.requeue_from_history().await?,
                Err(RecvError::Closed) => return None,
            }
        }
    }
}

async fn status_stream(
    State(c): AppState,
    ApiPath(backend): ApiPath<String>,
    query: Result<Query<StreamQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, HttpError> {
    let id: BackendName = path_name("backend id", &backend)?;
    let Query(query) = query.map_err(|e| HttpError::bad_request(format!("invalid query: {}", e.body_text())))?;
    // Subscribe before reading the history so no change falls between the two.
    let rx = c.subscribe();
    let progress = query.progress.then(|| c.subscribe_progress());
    let history = c.store().status_history(&id).await?;
    if history.is_empty() {
        return Err(HttpError::not_found(format!("no backend {id}")));
    }
    let initial_progress = progress.as_ref().and_then(|_| c.observed(&id).progress);
    let mut state = StreamState {
        controller: c.clone(),
        id,
        rx,
        initial_progress,
        last_progress: None,
        progress,
        pending: Default::default(),
        last: last_event_id(&headers),
        done: false,
    };
    if state.last.is_some_and(|l| l.is_terminal()) {
        state.done = true;
    }
    state.queue(history);
    Ok(Sse::new(stream::unfold(state, StreamState::next)).keep_alive(KeepAlive::default()))
}

async fn backend_metrics(
    State(c): AppState,
    ApiPath(backend): ApiPath<String>,
) -> Result<Json<BackendMetricsResponse>, HttpError> {
    let id: BackendName = path_name("backend id", &backend)?;
    let record = c
        .store()
        .backend(&id)
        .await?
        .ok_or_else(|| HttpError::not_found(format!("no backend {id}")))?;
    let observed = c.observed(&id);
    let live = !record.status.is_terminal();
    Ok(Json(BackendMetricsResponse {
        backend_id: id,
        status: record.status,
        metrics: observed
            .metrics
            .filter(|(drone, _)| live && *drone == record.drone)
            .map(|(_, m)| m),
        progress: observed
            .progress
            .filter(|_| crate::state::shows_progress(record.status)),
        drone: record.drone,
    }))
}

async fn terminate(c: &Controller, backend: &str, kind: TerminationKind) -> Result<Json<()>, HttpError> {
    let id: BackendName = path_name("backend id", backend)?;
    let reason = TerminationReason::External;
    let Some((drone, status)) = c.store().request_termination(&id, kind, reason).await? else {
        return Err(HttpError::not_found(format!("no backend {id}")));
    };
    if !status.is_terminal() {
        tracing::info!(backend_id = %id, ?kind, "termination requested");
        // Not connected: re-sent when the drone reconnects (the request is recorded).
        c.terminate_on(&drone, id, kind, reason);
        flushed(c).await?;
    }
    Ok(Json(()))
}

/// Fails the request (the change is recorded; a retry tells the other controllers again)
/// if the notices to the other controllers are not getting through.
async fn flushed(c: &Controller) -> Result<(), HttpError> {
    if c.flush_peers().await {
        Ok(())
    } else {
        Err(HttpError::from(plane_store::StoreError::Database(
            "recorded, but the other controllers could not be told yet; retry".into(),
        )))
    }
}

async fn soft_terminate(State(c): AppState, ApiPath(backend): ApiPath<String>) -> Result<Json<()>, HttpError> {
    terminate(&c, &backend, TerminationKind::Soft).await
}

async fn hard_terminate(State(c): AppState, ApiPath(backend): ApiPath<String>) -> Result<Json<()>, HttpError> {
    terminate(&c, &backend, TerminationKind::Hard).await
}

async fn revoke(State(c): AppState, ApiJson(req): ApiJson<RevokeRequest>) -> Result<Json<String>, HttpError> {
    if c.store().backend(&req.backend_id).await?.is_none() {
        return Err(HttpError::not_found(format!("no backend {}", req.backend_id)));
    }
    let tokens = c.store().revoke(&req.backend_id, &req.user).await?;
    tracing::info!(backend_id = %req.backend_id, user = %req.user, count = tokens.len(), "tokens revoked");
    for token in tokens {
        c.to_proxies(None, ControllerToProxy::TokenRevoked { token });
    }
    flushed(&c).await?;
    Ok(Json("revoked".to_owned()))
}

async fn drain(State(c): AppState, ApiPath(path): ApiPath<(String, String)>) -> Result<Json<DrainResponse>, HttpError> {
    set_draining(&c, path, true).await
}

/// Not in Plane 0.5: makes a draining drone schedulable again.
async fn undrain(
    State(c): AppState,
    ApiPath(path): ApiPath<(String, String)>,
) -> Result<Json<DrainResponse>, HttpError> {
    set_draining(&c, path, false).await
}

async fn set_draining(
    c: &Controller,
    (cluster, drone): (String, String),
    draining: bool,
) -> Result<Json<DrainResponse>, HttpError> {
    let cluster = path_cluster(&cluster)?;
    let drone: DroneName = path_name("drone name", &drone)?;
    let updated = if draining {
        c.store().drain_drone(&cluster, &drone).await?
    } else {
        c.store().undrain_drone(&cluster, &drone).await?
    };
    match updated {
        Some(updated) => {
            tracing::info!(%drone, draining, updated, "drone drain state");
            Ok(Json(DrainResponse { updated }))
        }
        None => Err(HttpError::not_found(format!("no drone {drone} in cluster {cluster}"))),
    }
}

async fn cluster_state(State(c): AppState, ApiPath(cluster): ApiPath<String>) -> Result<Json<ClusterState>, HttpError> {
    let cluster = path_cluster(&cluster)?;
    let healthy_within = c.config.timings.drone_unhealthy_after;
    let drones = c
        .store()
        .drones(&cluster)
        .await?
        .into_iter()
        .map(|d| DroneState {
            ready: d.ready && d.last_heartbeat_age < healthy_within,
            draining: d.draining,
            last_heartbeat_age: Some(d.last_heartbeat_age.as_secs_f64()),
            backend_count: d.backend_count,
            runtimes: d.runtimes,
            node: NodeState {
                name: NodeName::Drone(d.name),
                plane_version: d.plane_version,
                plane_hash: d.plane_hash,
                controller: d.controller,
                controller_heartbeat_age: d.controller_heartbeat_age.map(|a| a.as_secs_f64()),
            },
        })
        .collect();
    let proxies = c
        .store()
        .proxies(&cluster)
        .await?
        .into_iter()
        .map(|p| NodeState {
            name: NodeName::Proxy(p.registration.name),
            plane_version: p.registration.plane_version,
            plane_hash: p.registration.plane_hash,
            controller: Some(p.registration.controller),
            controller_heartbeat_age: p.controller_heartbeat_age.map(|a| a.as_secs_f64()),
        })
        .collect();
    Ok(Json(ClusterState { drones, proxies }))
}
