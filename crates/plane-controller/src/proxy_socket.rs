//! The proxy endpoint (`/ctrl/proxy-socket`): handshake, route lookups, keepalives; and
//! route invalidations out (backend removed, token revoked).
//!
//! A route lookup for a backend that is not ready yet waits, bounded by `route_wait`,
//! for its status to change; lookups run concurrently so one slow backend does not
//! hold up others.

use crate::socket::{handshake, next_text, send, spawn_writer, upgrade, First};
use crate::state::Controller;
use axum::extract::ws::{WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use futures_util::StreamExt;
use plane_store::ProxyRegistration;
use plane_types::protocol::{
    ControllerToProxy, IssuanceOp, ProxyHello, ProxyToController, RouteInfo, RouteResult, ISSUANCE_LEASE,
    PROTOCOL_VERSION,
};
use plane_types::status::BackendStatus;
use std::sync::Arc;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

/// Upgrades the request to the proxy socket.
pub async fn handler(ws: WebSocketUpgrade, State(c): State<Arc<Controller>>) -> Response {
    upgrade(ws, c, run)
}

async fn run(c: Arc<Controller>, socket: WebSocket) {
    let (mut sink, mut stream) = socket.split();
    let classify = |m| match m {
        ProxyToController::Hello(h) => {
            let v = h.protocol_version;
            First::Hello(h, v)
        }
        _ => First::Other,
    };
    let reject = |message| ControllerToProxy::Reject { message };
    let Some(hello): Option<ProxyHello> = handshake(&mut sink, &mut stream, "proxy", classify, reject).await else {
        return;
    };
    let reg = ProxyRegistration {
        name: hello.name.clone(),
        cluster: hello.cluster.clone(),
        plane_version: hello.plane_version.clone(),
        plane_hash: hello.plane_hash.clone(),
        controller: c.config.name.clone(),
    };
    if let Err(e) = c.store().register_proxy(&reg).await {
        tracing::error!(proxy = %hello.name, error = %e, "cannot register proxy");
        return;
    }
    let welcome = ControllerToProxy::Welcome {
        protocol_version: PROTOCOL_VERSION,
        controller: c.config.name.clone(),
    };
    if !send(&mut sink, &welcome).await {
        return;
    }
    let (tx, rx) = mpsc::unbounded_channel::<ControllerToProxy>();
    let conn_id = c.conn_id();
    c.add_proxy(conn_id, hello.cluster.clone(), tx.clone());
    tracing::info!(proxy = %hello.name, cluster = %hello.cluster, "proxy connected");

    let writer = spawn_writer(sink, rx);

    // Lookups in flight; aborted when the proxy goes away.
    let mut lookups = JoinSet::new();
    // Issuance steps, done one after another by one task.
    let (issuance_tx, mut issuance_rx) = mpsc::unbounded_channel::<(u64, IssuanceOp)>();
    {
        let (c, tx, hello) = (c.clone(), tx.clone(), hello.clone());
        lookups.spawn(async move {
            while let Some((request_id, op)) = issuance_rx.recv().await {
                let (ok, error) = match issuance(&c, &hello, op).await {
                    Ok(ok) => (ok, None),
                    Err(e) => (false, Some(e)),
                };
                let _ = tx.send(ControllerToProxy::IssuanceReply { request_id, ok, error });
            }
        });
    }
    loop {
        tokio::select! {
            text = next_text(&mut stream) => {
                let Some(text) = text else { break };
                match serde_json::from_str::<ProxyToController>(&text) {
                    Ok(ProxyToController::RouteRequest { token }) => {
                        let c = c.clone();
                        let tx = tx.clone();
                        lookups.spawn(async move {
                            let result = route(&c, &token).await;
                            let _ = tx.send(ControllerToProxy::Route { token, result });
                        });
                    }
                    Ok(ProxyToController::Keepalive { backends }) => {
                        if let Err(e) = c.store().keepalive(&backends).await {
                            tracing::warn!(error = %e, "cannot record keepalives");
                        }
                    }
                    Ok(ProxyToController::Issuance { request_id, op }) => {
                        // One at a time, in order: a late `Acquire` must not run after
                        // the `Release` the proxy sent next.
                        let _ = issuance_tx.send((request_id, op));
                    }
                    Ok(ProxyToController::Hello(_)) => tracing::warn!(proxy = %hello.name, "ignoring a second Hello"),
                    Err(e) => tracing::warn!(proxy = %hello.name, error = %e, "ignoring an invalid message from a proxy"),
                }
            }
            Some(_) = lookups.join_next(), if !lookups.is_empty() => {}
        }
    }
    lookups.abort_all();
    writer.abort();
    c.remove_proxy(conn_id);
    if let Err(e) = c.store().proxy_disconnected(&hello.name, &c.config.name).await {
        tracing::warn!(proxy = %hello.name, error = %e, "cannot record proxy disconnect");
    }
    tracing::info!(proxy = %hello.name, "proxy disconnected");
}

/// Does one step of certificate issuance for the proxy `hello` describes: whether it
/// holds the lease, or whether the step took effect. A store error is reported to the
/// proxy (it retries) and logged.
async fn issuance(c: &Controller, hello: &ProxyHello, op: IssuanceOp) -> Result<bool, String> {
    let store = c.store();
    let (cluster, proxy) = (&hello.cluster, &hello.name);
    let result = match &op {
        IssuanceOp::Acquire => store.acquire_cert_lease(cluster, proxy, ISSUANCE_LEASE).await,
        IssuanceOp::SetTxt { values } => store.set_acme_txt(cluster, proxy, values).await,
        IssuanceOp::Release => store.release_cert_lease(cluster, proxy).await.map(|()| true),
    };
    match result {
        Ok(ok) => {
            tracing::info!(%proxy, %cluster, ?op, ok, "certificate issuance step");
            Ok(ok)
        }
        Err(e) => {
            tracing::warn!(%proxy, %cluster, ?op, error = %e, "certificate issuance step failed");
            Err(format!("the controller's store failed: {e}"))
        }
    }
}

/// Where a token routes, waiting (bounded) for a starting backend to become ready.
pub async fn route(c: &Controller, token: &str) -> RouteResult {
    // Subscribe first so a change between the read and the wait is not missed.
    let mut rx = c.subscribe();
    let deadline = tokio::time::Instant::now() + c.config.timings.route_wait;
    loop {
        let r = match c.store().route(token).await {
            Ok(Some(r)) => r,
            Ok(None) => return RouteResult::Gone,
            Err(e) => {
                tracing::error!(error = %e, "route lookup failed");
                return RouteResult::NotReady;
            }
        };
        if r.status >= BackendStatus::Terminating {
            return RouteResult::Gone;
        }
        if r.status == BackendStatus::Ready {
            if let Some(address) = r.address {
                return RouteResult::Ready(RouteInfo {
                    backend_id: r.backend_id,
                    address,
                    secret_token: r.secret_token,
                    user: r.user,
                    user_data: r.user_data,
                    subdomain: r.subdomain,
                    expires_in_ms: r.expires_in.map(|d| d.as_millis().try_into().unwrap_or(u64::MAX)),
                });
            }
        }
        // Wait for this backend's next status change.
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Err(_) => return RouteResult::NotReady,
                Ok(Ok(change)) if change.concerns(&r.backend_id) => break,
                Ok(Ok(_)) => {}
                Ok(Err(RecvError::Lagged(_))) => break,
                Ok(Err(RecvError::Closed)) => return RouteResult::NotReady,
            }
        }
    }
}
