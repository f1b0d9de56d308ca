//! `POST /ctrl/connect`: get-or-create the backend for a key and issue a token.
//!
//! The store's unique key row decides races: two connects for one free key both try
//! to create, one wins, the other re-reads the key and joins the winner's backend.

use crate::error::HttpError;
use crate::scheduler;
use crate::state::Controller;
use axum::http::StatusCode;
use plane_store::{BackendRecord, CreateOutcome, KeyHolder, NewBackend, NewToken, StoreError};
use plane_types::api::{
    connect_url, new_static_token, new_token, ApiErrorKind, ConnectRequest, ConnectResponse, KeyConfig,
};
use plane_types::names::{BackendName, ClusterName, DroneName};
use plane_types::protocol::{AcquiredKey, ControllerToDrone, SpawnAction};
use plane_types::status::BackendStatus;

/// How often a connect re-reads a key that another request took meanwhile.
const MAX_ATTEMPTS: usize = 5;

impl Controller {
    /// Handles a connect request.
    pub async fn connect(&self, req: ConnectRequest) -> Result<ConnectResponse, HttpError> {
        let key = match req.key.clone() {
            Some(k) => {
                k.validate()
                    .map_err(|e| HttpError::bad_request(format!("invalid key: {e}")))?;
                k
            }
            None => KeyConfig {
                name: BackendName::new_random().to_string(),
                namespace: String::new(),
                tag: String::new(),
            },
        };
        let executable = match &req.spawn_config {
            Some(s) => Some(
                s.executable()
                    .map_err(|e| HttpError::bad_request(format!("invalid spawn_config: {e}")))?,
            ),
            None => None,
        };
        if let Some(user) = &req.user {
            if user.len() > 256 || user.chars().any(|c| c.is_control()) {
                return Err(HttpError::bad_request(
                    "`user` must be at most 256 printable characters",
                ));
            }
        }

        for _ in 0..MAX_ATTEMPTS {
            if let Some(holder) = self.store().key_holder(&key).await? {
                return self.join(holder, &key, &req).await;
            }
            let (Some(spawn), Some(executable)) = (&req.spawn_config, &executable) else {
                return Err(HttpError::new(
                    StatusCode::CONFLICT,
                    ApiErrorKind::KeyUnheldNoSpawnConfig,
                    "the key is not held by a running backend and the request has no spawn_config",
                ));
            };
            let cluster = spawn
                .cluster
                .clone()
                .or_else(|| self.config.default_cluster.clone())
                .ok_or_else(|| {
                    HttpError::new(
                        StatusCode::BAD_REQUEST,
                        ApiErrorKind::NoClusterProvided,
                        "spawn_config has no cluster and the controller has no default cluster",
                    )
                })?;
            let candidates = self
                .store()
                .schedulable_drones(
                    &cluster,
                    spawn.pool(),
                    executable.runtime_kind(),
                    self.config.timings.drone_unhealthy_after,
                )
                .await?
                .into_iter()
                // Drones connected to other controllers get their spawn through them.
                .filter(|d| self.has_peers() || self.has_drone(&d.name))
                .collect();
            let drone = scheduler::choose(candidates, self.config.timings.scheduler_candidates).ok_or_else(|| {
                HttpError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ApiErrorKind::NoDroneAvailable,
                    format!(
                        "no healthy, non-draining drone in cluster {cluster} pool {:?} offers the {} runtime",
                        spawn.pool(),
                        executable.runtime_kind()
                    ),
                )
            })?;
            // Read the drone's clock before the store starts the lease, so the
            // deadlines the drone gets fall before the store's expiry. A drone
            // connected elsewhere gets them from its controller, which renews first.
            let drone_now = self.drone_now(&drone.name);
            if drone_now.is_none() && !self.has_peers() {
                continue;
            }
            let id = spawn.id.clone().unwrap_or_else(BackendName::new_random);
            let static_token = spawn.use_static_token.then(new_static_token);
            let new = NewBackend {
                id: id.clone(),
                cluster: cluster.clone(),
                pool: spawn.pool().to_owned(),
                drone: drone.name.clone(),
                executable: executable.clone(),
                key: key.clone(),
                lifetime_limit_seconds: spawn.lifetime_limit_seconds,
                max_idle_seconds: spawn.max_idle_seconds,
                static_token: static_token.clone(),
                subdomain: spawn.subdomain.clone(),
                lease_duration: self.config.timings.lease.expire_after,
            };
            match self.store().create_backend(&new).await? {
                CreateOutcome::Created { fencing_token } => {
                    tracing::info!(backend_id = %id, drone = %drone.name, key = %key.name, fencing_token, "backend scheduled");
                    if let Some(now) = drone_now {
                        self.dispatch_spawn(&new, fencing_token, now);
                    }
                    // The others too, even when the drone is connected here: this
                    // connection may be a dead one the drone has left. Its controller
                    // renews and sends; the drone ignores a duplicate.
                    self.spawn_elsewhere(&drone.name, &id);
                    let token = self.issue_token(&id, static_token.as_deref(), &req).await?;
                    if drone_now.is_none() && !self.flush_peers().await {
                        tracing::warn!(backend_id = %id, "the spawn notice is not out yet; the drone's controller re-sends scheduled spawns periodically");
                    }
                    return Ok(self.response(
                        &id,
                        true,
                        BackendStatus::Scheduled,
                        &cluster,
                        new.subdomain,
                        token,
                        Some(drone.name),
                    ));
                }
                CreateOutcome::KeyHeld => continue,
                CreateOutcome::IdTaken if spawn.id.is_some() => {
                    return Err(HttpError::new(
                        StatusCode::CONFLICT,
                        ApiErrorKind::Other,
                        format!("a backend with id {id} already exists"),
                    ))
                }
                CreateOutcome::IdTaken => continue,
            }
        }
        Err(HttpError::new(
            StatusCode::CONFLICT,
            ApiErrorKind::FailedToAcquireKey,
            "the key changed hands repeatedly while connecting; retry",
        ))
    }

    /// Re-sends spawns that may not have arrived and terminations not yet done, to a
    /// drone connected here.
    pub(crate) async fn resend_pending(&self, drone: &DroneName) -> Result<(), StoreError> {
        for b in self.store().scheduled_backends(drone).await? {
            self.resend_scheduled(b).await?;
        }
        for t in self.store().pending_terminations(drone).await? {
            self.send_drone(
                drone,
                ControllerToDrone::Terminate {
                    backend_id: t.backend_id,
                    kind: t.kind,
                    reason: t.reason,
                },
            );
        }
        Ok(())
    }

    /// Sends the spawn of a backend another controller scheduled on a drone connected
    /// here, if it is still `scheduled`.
    pub(crate) async fn resend_spawn(&self, drone: &DroneName, backend_id: &BackendName) -> Result<(), StoreError> {
        match self.store().backend(backend_id).await? {
            Some(b) if b.drone == *drone && b.status == BackendStatus::Scheduled => self.resend_scheduled(b).await,
            _ => Ok(()),
        }
    }

    async fn resend_scheduled(&self, b: BackendRecord) -> Result<(), StoreError> {
        let Some(now) = self.drone_now(&b.drone) else {
            return Ok(());
        };
        let new = NewBackend {
            id: b.id,
            cluster: b.cluster,
            pool: b.pool,
            drone: b.drone,
            executable: b.executable,
            key: b.key,
            lifetime_limit_seconds: b.lifetime_limit_seconds,
            max_idle_seconds: b.max_idle_seconds,
            static_token: b.static_token,
            subdomain: b.subdomain,
            lease_duration: self.config.timings.lease.expire_after,
        };
        // The lease started when the backend was scheduled, maybe long ago. Extend it
        // now (after reading the drone's clock) so that the deadlines the drone gets
        // fall before the store's expiry; if it has already expired, the key may have
        // a new holder, so the spawn must not go out (the sweep marks it lost).
        let lease = self.config.timings.lease.expire_after;
        if self.store().renew_key(&new.id, b.fencing_token, lease).await? {
            self.dispatch_spawn(&new, b.fencing_token, now);
        } else {
            tracing::warn!(drone = %new.drone, backend_id = %new.id, "not sending a spawn whose lease expired");
        }
        Ok(())
    }

    /// Sends the spawn action to the chosen drone. If the drone disconnected meanwhile,
    /// the spawn is re-sent when it reconnects (the backend stays `scheduled`).
    pub(crate) fn dispatch_spawn(&self, b: &NewBackend, fencing_token: i64, drone_now: u64) {
        let action = SpawnAction {
            backend_id: b.id.clone(),
            executable: b.executable.clone(),
            key: AcquiredKey {
                key: b.key.clone(),
                fencing_token,
            },
            static_token: b.static_token.clone(),
            deadlines: self.config.timings.lease.deadlines_from(drone_now),
        };
        if !self.send_drone(&b.drone, ControllerToDrone::Spawn(Box::new(action))) {
            tracing::warn!(backend_id = %b.id, drone = %b.drone, "drone disconnected before the spawn was sent; will re-send");
        }
    }

    async fn join(
        &self,
        holder: KeyHolder,
        key: &KeyConfig,
        req: &ConnectRequest,
    ) -> Result<ConnectResponse, HttpError> {
        if holder.tag != key.tag {
            return Err(HttpError::new(
                StatusCode::CONFLICT,
                ApiErrorKind::KeyHeld,
                format!(
                    "key {:?} is held with tag {:?}, not {:?}",
                    key.name, holder.tag, key.tag
                ),
            ));
        }
        if holder.status.is_terminating() {
            return Err(HttpError::new(
                StatusCode::CONFLICT,
                ApiErrorKind::KeyHeldUnhealthy,
                format!(
                    "the backend holding key {:?} is {}; retry once it has terminated",
                    key.name, holder.status
                ),
            ));
        }
        let token = self
            .issue_token(&holder.backend_id, holder.static_token.as_deref(), req)
            .await?;
        Ok(self.response(
            &holder.backend_id,
            false,
            holder.status,
            &holder.cluster,
            holder.subdomain,
            token,
            Some(holder.drone),
        ))
    }

    /// A fresh token (and secret) bound to the request's user and auth, or the
    /// backend's static token.
    async fn issue_token(
        &self,
        backend_id: &BackendName,
        static_token: Option<&str>,
        req: &ConnectRequest,
    ) -> Result<(String, Option<String>), HttpError> {
        if let Some(st) = static_token {
            // Written by the first connect; later (or concurrent) inserts are no-ops.
            self.store()
                .insert_token(&NewToken {
                    token: st.to_owned(),
                    backend_id: backend_id.clone(),
                    user: req.user.clone(),
                    auth: req.auth.clone(),
                    secret_token: None,
                    ttl: None,
                })
                .await?;
            return Ok((st.to_owned(), None));
        }
        let token = new_token();
        let secret = new_token();
        self.store()
            .insert_token(&NewToken {
                token: token.clone(),
                backend_id: backend_id.clone(),
                user: req.user.clone(),
                auth: req.auth.clone(),
                secret_token: Some(secret.clone()),
                ttl: self.config.token_ttl,
            })
            .await?;
        Ok((token, Some(secret)))
    }

    #[allow(clippy::too_many_arguments)]
    fn response(
        &self,
        id: &BackendName,
        spawned: bool,
        status: BackendStatus,
        cluster: &ClusterName,
        subdomain: Option<String>,
        (token, secret_token): (String, Option<String>),
        drone: Option<plane_types::names::DroneName>,
    ) -> ConnectResponse {
        ConnectResponse {
            backend_id: id.clone(),
            spawned,
            status,
            url: connect_url(cluster, subdomain.as_deref(), &token),
            token,
            subdomain,
            secret_token,
            status_url: format!("{}/pub/b/{id}/status", self.config.controller_url),
            drone,
        }
    }
}
