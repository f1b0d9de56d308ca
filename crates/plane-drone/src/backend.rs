//! The lifecycle of one backend: a task per backend drives it through a [`Runtime`],
//! records every status change in the state store, and keeps its key lease renewed.
//!
//! ```text
//!  Spawn ─► loading ─► starting ─► waiting ─► ready ─► terminating ─► hard-terminating ─► terminated
//!            (prepare)  (start)    (probe)            (SIGTERM,       (SIGKILL)            (exit seen)
//!                                                       grace)
//! ```
//!
//! * Statuses only move forward and none is reported twice: [`BackendTask::transition`]
//!   is the only place that reports one, and it drops anything that is not a step
//!   forward.
//! * Before the backend runs (loading), a termination just ends it: `terminated`.
//! * Once it runs, `terminated` is reported only when the runtime has seen it exit.
//! * The lease: `RenewKey` from `renew_at` on, repeated every `renew_retry` until
//!   `Renewed`; past `soft_terminate_at` it is soft-terminated (`keyexpired`), past
//!   `hard_terminate_at` hard-terminated. Renewed deadlines are stored (retried every
//!   `renew_retry` until that works): the watchdog kills by the stored ones.
//! * A restarted drone resumes a backend from its [`BackendRecord`]: a backend that
//!   was ready or terminating is re-adopted if the runtime still finds it; anything
//!   else is stopped and reported `lost`.
//!
//! The task ends when the backend is `terminated` or when the drone shuts down (the
//! backend is then left running for the next drone to adopt).

use crate::config::DroneTimings;
use crate::runtime::{Adoption, BackendMetrics, BackendSpec, LoadProgress, Runtime, RuntimeHandle, StopSignal};
use crate::state::{now_ms, BackendRecord, StateStore, StatusUpdate};
use plane_types::lease::LeaseDeadlines;
use plane_types::names::BackendName;
use plane_types::protocol::{BackendEvent, DroneToController, SpawnAction};
use plane_types::status::{BackendStatus, TerminationKind, TerminationReason};
use plane_types::EpochMillis;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

/// What the drone tells a backend task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum BackendCommand {
    /// The controller asks for termination.
    Terminate {
        /// Soft or hard.
        kind: TerminationKind,
        /// Why.
        reason: TerminationReason,
    },
    /// The controller answered a `RenewKey`.
    Renewed(Option<LeaseDeadlines>),
}

/// What backend tasks send towards the controller.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Outgoing {
    /// An event already recorded in the outbox; re-sent until acked.
    Event(BackendEvent),
    /// A message that is not persisted (key renewals); dropped while disconnected.
    Transient(DroneToController),
}

/// What every backend task shares.
#[derive(Clone, Debug)]
pub(crate) struct BackendContext {
    pub store: StateStore,
    pub outgoing: mpsc::UnboundedSender<Outgoing>,
    pub timings: DroneTimings,
}

impl BackendContext {
    /// Records a status change, then queues it for the controller. Returns false if it
    /// could not be recorded (it is then not sent either: the outbox comes first).
    pub(crate) async fn report(&self, backend_id: &BackendName, update: &StatusUpdate) -> bool {
        match self.store.record_event(backend_id, update).await {
            Ok(event) => {
                info!(
                    %backend_id,
                    event_id = event.event_id,
                    status = %event.status,
                    reason = ?event.termination_reason,
                    exit_code = ?event.exit_code,
                    "backend status"
                );
                // The receiver lives as long as the drone; if it is gone, the event stays
                // in the outbox for the next run.
                let _ = self.outgoing.send(Outgoing::Event(event));
                true
            }
            Err(err) => {
                error!(%backend_id, status = %update.status, %err, "could not record a backend status change");
                false
            }
        }
    }
}

/// How a backend task begins.
#[derive(Clone, Debug)]
pub(crate) enum Start {
    /// A `Spawn` just recorded with status `scheduled`.
    Fresh(SpawnAction),
    /// A record from an earlier drone run.
    Recovered(BackendRecord),
}

/// The key lease as the drone sees it.
#[derive(Clone, Debug)]
struct Lease {
    fencing_token: i64,
    deadlines: LeaseDeadlines,
    /// When the last unanswered `RenewKey` went out.
    last_request: Option<Instant>,
    /// The controller said the lease is gone: stop asking.
    revoked: bool,
    /// The deadlines could not be stored: when storing them was last tried. The
    /// watchdog reads them from the state store, and would kill the backend at the
    /// stored (older) hard deadline.
    unsaved_since: Option<Instant>,
}

/// Why a phase was cut short.
enum Interrupt {
    Terminate(TerminationKind, TerminationReason),
    Shutdown,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// While hard-terminating, SIGKILL is sent again this often until the exit is seen.
const RESEND_KILL_EVERY: Duration = Duration::from_secs(5);

/// Load-progress reports go out at most this often per backend (the latest one wins).
const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);

/// The first metrics sample of a running backend is taken at most this long after it
/// became ready (or was re-adopted); later ones every `metrics_interval`.
const FIRST_METRICS_AFTER: Duration = Duration::from_secs(1);

/// The state machine of one backend. See the module documentation.
pub(crate) struct BackendTask {
    id: BackendName,
    start: Option<Start>,
    spawn: Option<SpawnAction>,
    runtime: Arc<dyn Runtime>,
    ctx: BackendContext,
    status: BackendStatus,
    address: Option<SocketAddr>,
    handle: Option<RuntimeHandle>,
    lease: Option<Lease>,
    termination: Option<(TerminationKind, TerminationReason)>,
    /// While waiting for readiness: when the startup timeout fires.
    startup_deadline: Option<Instant>,
    /// While soft-terminating: when SIGKILL follows.
    grace_deadline: Option<Instant>,
    /// When SIGKILL was last sent.
    last_kill: Option<Instant>,
    commands: mpsc::UnboundedReceiver<BackendCommand>,
    commands_open: bool,
    cancel: CancellationToken,
}

/// The `tokio` instant at which the drone's wall clock reads `at`.
fn instant_at(at: EpochMillis) -> Instant {
    Instant::now() + Duration::from_millis(at.saturating_sub(now_ms()))
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn poll_opt<T>(fut: &mut Option<BoxFuture<T>>) -> T {
    match fut {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

impl BackendTask {
    pub(crate) fn new(
        start: Start,
        runtime: Arc<dyn Runtime>,
        ctx: BackendContext,
        commands: mpsc::UnboundedReceiver<BackendCommand>,
        cancel: CancellationToken,
    ) -> BackendTask {
        let (id, spawn, status, address, handle, deadlines, termination) = match &start {
            Start::Fresh(spawn) => (
                spawn.backend_id.clone(),
                Some(spawn.clone()),
                BackendStatus::Scheduled,
                None,
                None,
                None,
                None,
            ),
            Start::Recovered(r) => (
                r.backend_id.clone(),
                r.spawn.clone(),
                r.status,
                r.address,
                r.handle.clone(),
                r.deadlines,
                r.termination_kind.zip(r.termination_reason),
            ),
        };
        let lease = spawn.as_ref().map(|s| Lease {
            fencing_token: s.key.fencing_token,
            deadlines: deadlines.unwrap_or(s.deadlines),
            last_request: None,
            revoked: false,
            unsaved_since: None,
        });
        BackendTask {
            id,
            start: Some(start),
            spawn,
            runtime,
            ctx,
            status,
            address,
            handle,
            lease,
            termination,
            startup_deadline: None,
            grace_deadline: None,
            last_kill: None,
            commands,
            commands_open: true,
            cancel,
        }
    }

    /// Drives the backend until it is terminated or the drone shuts down.
    pub(crate) async fn run(mut self) {
        match self.start.take() {
            Some(Start::Fresh(_)) => self.run_fresh().await,
            Some(Start::Recovered(_)) => self.run_recovered().await,
            None => {}
        }
        debug!(backend_id = %self.id, status = %self.status, "backend task ends");
    }

    /// Reports `update` if it moves the backend forward; otherwise does nothing.
    async fn transition(&mut self, mut update: StatusUpdate) {
        if !self.status.can_transition_to(update.status) {
            debug!(backend_id = %self.id, from = %self.status, to = %update.status, "ignoring a non-forward transition");
            return;
        }
        if update.address.is_none() {
            update.address = self.address;
        }
        self.ctx.report(&self.id, &update).await;
        // Even if recording failed, never report an earlier status again.
        self.status = update.status;
    }

    fn spec(&self) -> Option<BackendSpec> {
        let spawn = self.spawn.as_ref()?;
        Some(BackendSpec {
            backend_id: spawn.backend_id.clone(),
            executable: spawn.executable.clone(),
            key_name: spawn.key.key.name.clone(),
            fencing_token: spawn.key.fencing_token,
            static_token: spawn.static_token.clone(),
        })
    }

    /// Ends a backend that is not running (nothing to signal or wait for).
    async fn finish_unstarted(
        &mut self,
        reason: TerminationReason,
        kind: Option<TerminationKind>,
        message: Option<String>,
    ) {
        let mut update = StatusUpdate::new(BackendStatus::Terminated);
        update.termination_reason = Some(reason);
        update.termination_kind = kind;
        update.message = message;
        self.transition(update).await;
    }

    async fn run_fresh(&mut self) {
        let Some(spec) = self.spec() else { return };
        self.transition(StatusUpdate::new(BackendStatus::Loading)).await;

        let prepare = {
            let runtime = self.runtime.clone();
            let spec = spec.clone();
            let (progress_tx, mut progress_rx) = tokio::sync::watch::channel(None::<LoadProgress>);
            let outgoing = self.ctx.outgoing.clone();
            let backend_id = spec.backend_id.clone();
            // Forwards the latest report at most once per PROGRESS_INTERVAL; whatever came
            // in meanwhile is folded into the next one, and the last one always goes out
            // (the loop ends once `prepare` has dropped the sender and it was sent).
            tokio::spawn(async move {
                while progress_rx.changed().await.is_ok() {
                    let latest = progress_rx.borrow_and_update().clone();
                    if let Some(progress) = latest {
                        let message = DroneToController::LoadProgress {
                            backend_id: backend_id.clone(),
                            progress,
                        };
                        if outgoing.send(Outgoing::Transient(message)).is_err() {
                            return;
                        }
                    }
                    tokio::time::sleep(PROGRESS_INTERVAL).await;
                }
            });
            async move {
                let backend_id = spec.backend_id.clone();
                let progress = move |p: LoadProgress| {
                    debug!(%backend_id, message = %p.message, fraction = ?p.fraction, "loading");
                    let _ = progress_tx.send(Some(p));
                };
                runtime.prepare(&spec, &progress).await
            }
        };
        match self.interruptible(prepare).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                warn!(backend_id = %self.id, %err, "backend cannot be prepared");
                let message = Some(err.to_string());
                self.finish_unstarted(TerminationReason::InternalError, None, message)
                    .await;
                return;
            }
            Err(Interrupt::Terminate(kind, reason)) => {
                self.finish_unstarted(reason, Some(kind), None).await;
                return;
            }
            Err(Interrupt::Shutdown) => return,
        }

        self.transition(StatusUpdate::new(BackendStatus::Starting)).await;
        let startup_deadline = Instant::now() + self.ctx.timings.startup_timeout;
        // A start cut short by the timeout may leave a half-started backend behind: the
        // runtime then cleans up by the backend's id.
        let started = match tokio::time::timeout_at(startup_deadline, self.runtime.start(&spec)).await {
            Ok(Ok(started)) => started,
            Ok(Err(err)) => {
                // A runtime cleans up after its own failed start; only a start cut
                // short (below) can leave something behind.
                warn!(backend_id = %self.id, %err, "backend failed to start");
                self.finish_unstarted(TerminationReason::InternalError, None, Some(err.to_string()))
                    .await;
                return;
            }
            Err(_) => {
                warn!(backend_id = %self.id, "the runtime did not start the backend within the startup timeout");
                self.abandon().await;
                let message = Some("the runtime did not start the backend in time".to_owned());
                self.finish_unstarted(TerminationReason::StartupTimeout, Some(TerminationKind::Hard), message)
                    .await;
                return;
            }
        };
        if let Err(err) = self
            .ctx
            .store
            .set_handle(&self.id, &started.handle, started.address)
            .await
        {
            error!(backend_id = %self.id, %err, "could not record the runtime handle; a restarted drone will not find this backend");
        }
        self.address = Some(started.address);
        self.handle = Some(started.handle.clone());
        let mut waiting = StatusUpdate::new(BackendStatus::Waiting);
        waiting.address = Some(started.address);
        self.transition(waiting).await;

        if self.cancel.is_cancelled() {
            return;
        }
        let ready = {
            let runtime = self.runtime.clone();
            let handle = started.handle.clone();
            let address = started.address;
            Box::pin(async move { runtime.wait_ready(&handle, address).await }) as BoxFuture<_>
        };
        self.startup_deadline = Some(startup_deadline);
        self.supervise(started.handle, Some(ready)).await;
    }

    async fn run_recovered(&mut self) {
        info!(backend_id = %self.id, status = %self.status, "resuming a backend recorded by an earlier run");
        let adopted = match self.handle.clone() {
            Some(handle) => {
                // A failed check (the engine restarting, say) proves nothing: calling the
                // backend gone could leave it running while its key moves on. Retry
                // until the runtime answers; the lease meanwhile runs out on its own.
                let mut delay = Duration::from_millis(200);
                loop {
                    match self.runtime.adopt(&self.id, &handle).await {
                        Ok(a) => break a,
                        Err(err) => {
                            warn!(backend_id = %self.id, %err, ?delay, "could not check the backend; retrying");
                            tokio::select! {
                                _ = self.cancel.cancelled() => return,
                                _ = tokio::time::sleep(delay) => {}
                            }
                            delay = (delay * 2).min(Duration::from_secs(5));
                        }
                    }
                }
            }
            None => {
                // The drone stopped during `start`, before recording the handle.
                self.abandon().await;
                Adoption::Gone
            }
        };

        if self.status < BackendStatus::Ready {
            // It was starting when the drone stopped; its startup cannot be resumed.
            let mut kind = None;
            if let (Adoption::Running, Some(handle)) = (adopted, self.handle.clone()) {
                if let Err(err) = self.runtime.signal(&handle, StopSignal::Kill).await {
                    warn!(backend_id = %self.id, %err, "could not kill a half-started backend");
                }
                kind = Some(TerminationKind::Hard);
                tokio::select! {
                    _ = self.cancel.cancelled() => return,
                    _ = self.runtime.wait_exit(&handle) => {}
                }
            }
            let message = Some("the drone restarted while the backend was starting".to_owned());
            self.finish_unstarted(TerminationReason::Lost, kind, message).await;
            return;
        }

        let handle = match (adopted, self.handle.clone()) {
            (Adoption::Running, Some(handle)) => handle,
            _ => {
                let message = Some("the backend was gone when the drone restarted".to_owned());
                self.finish_unstarted(TerminationReason::Lost, None, message).await;
                return;
            }
        };
        info!(backend_id = %self.id, "re-adopted a running backend");
        match self.status {
            BackendStatus::Terminating => {
                // The grace period restarts: its start was not recorded.
                self.send_signal(&handle, StopSignal::Term).await;
                self.grace_deadline = Some(Instant::now() + self.ctx.timings.soft_terminate_grace);
            }
            BackendStatus::HardTerminating => self.send_signal(&handle, StopSignal::Kill).await,
            _ => {}
        }
        if self.lease.is_none() {
            // Without the spawn action the key cannot be renewed.
            self.stop(&handle, TerminationKind::Hard, TerminationReason::Lost).await;
        }
        self.supervise(handle, None).await;
    }

    /// Runs `fut` while handling commands and the lease. A termination request or a
    /// lapsed lease cuts it short (dropping `fut`).
    async fn interruptible<T>(&mut self, fut: impl Future<Output = T>) -> Result<T, Interrupt> {
        tokio::pin!(fut);
        loop {
            let wake = self.lease_wakeup();
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return Err(Interrupt::Shutdown),
                out = &mut fut => return Ok(out),
                cmd = self.commands.recv(), if self.commands_open => match cmd {
                    None => self.commands_open = false,
                    Some(BackendCommand::Terminate { kind, reason }) => return Err(Interrupt::Terminate(kind, reason)),
                    Some(BackendCommand::Renewed(deadlines)) => {
                        if let Some((kind, reason)) = self.renewed(deadlines).await {
                            return Err(Interrupt::Terminate(kind, reason));
                        }
                    }
                },
                _ = sleep_until_opt(wake) => {
                    self.save_deadlines().await;
                    if let Some((kind, reason)) = self.lease_tick() {
                        return Err(Interrupt::Terminate(kind, reason));
                    }
                }
            }
        }
    }

    /// Watches a started backend until it exits: readiness (if `ready` is given),
    /// termination requests, the lease, the grace period.
    async fn supervise(
        &mut self,
        handle: RuntimeHandle,
        mut ready: Option<BoxFuture<Result<(), crate::runtime::RuntimeError>>>,
    ) {
        let exit = {
            let runtime = self.runtime.clone();
            let handle = handle.clone();
            async move { runtime.wait_exit(&handle).await }
        };
        tokio::pin!(exit);
        let metrics_interval = self.ctx.timings.metrics_interval;
        let mut next_metrics = Instant::now() + FIRST_METRICS_AFTER.min(metrics_interval);
        let mut sampling: Option<BoxFuture<Option<BackendMetrics>>> = None;
        loop {
            if self.status >= BackendStatus::Terminating {
                ready = None;
                self.startup_deadline = None;
            }
            // Only a running backend is sampled, one sample at a time.
            let metrics_due = (self.status >= BackendStatus::Ready
                && self.status < BackendStatus::HardTerminating
                && sampling.is_none())
            .then_some(next_metrics);
            // A SIGKILL that did not take (the engine was unreachable, say) is sent again
            // until the exit is seen.
            let kill_due = (self.status == BackendStatus::HardTerminating)
                .then(|| self.last_kill.unwrap_or_else(Instant::now) + RESEND_KILL_EVERY);
            let wake = self.lease_wakeup();
            let startup_deadline = self.startup_deadline;
            let grace_deadline = self.grace_deadline;
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return,
                info = &mut exit => {
                    let mut update = StatusUpdate::new(BackendStatus::Terminated);
                    update.exit_code = info.exit_code;
                    update.termination_kind = self.termination.map(|t| t.0);
                    update.termination_reason = self.termination.map(|t| t.1);
                    update.message = info.detail;
                    self.transition(update).await;
                    return;
                }
                result = poll_opt(&mut ready) => {
                    ready = None;
                    self.startup_deadline = None;
                    match result {
                        Ok(()) => self.transition(StatusUpdate::new(BackendStatus::Ready)).await,
                        Err(err) => {
                            warn!(backend_id = %self.id, %err, "readiness check failed");
                            self.stop(&handle, TerminationKind::Hard, TerminationReason::InternalError).await;
                        }
                    }
                }
                _ = sleep_until_opt(startup_deadline) => {
                    ready = None;
                    self.startup_deadline = None;
                    warn!(backend_id = %self.id, "backend did not answer HTTP within the startup timeout");
                    self.stop(&handle, TerminationKind::Hard, TerminationReason::StartupTimeout).await;
                }
                _ = sleep_until_opt(grace_deadline) => {
                    self.grace_deadline = None;
                    let reason = self.termination.map_or(TerminationReason::External, |t| t.1);
                    self.stop(&handle, TerminationKind::Hard, reason).await;
                }
                cmd = self.commands.recv(), if self.commands_open => match cmd {
                    None => self.commands_open = false,
                    Some(BackendCommand::Terminate { kind, reason }) => self.stop(&handle, kind, reason).await,
                    Some(BackendCommand::Renewed(deadlines)) => {
                        if let Some((kind, reason)) = self.renewed(deadlines).await {
                            self.stop(&handle, kind, reason).await;
                        }
                    }
                },
                _ = sleep_until_opt(wake) => {
                    self.save_deadlines().await;
                    if let Some((kind, reason)) = self.lease_tick() {
                        self.stop(&handle, kind, reason).await;
                    }
                }
                _ = sleep_until_opt(kill_due) => {
                    warn!(backend_id = %self.id, "the backend has not exited since SIGKILL; sending it again");
                    self.send_signal(&handle, StopSignal::Kill).await;
                }
                _ = sleep_until_opt(metrics_due) => {
                    let runtime = self.runtime.clone();
                    let handle = handle.clone();
                    sampling = Some(Box::pin(async move { runtime.metrics(&handle).await }));
                }
                sample = poll_opt(&mut sampling) => {
                    sampling = None;
                    next_metrics = Instant::now() + metrics_interval;
                    if let Some(metrics) = sample {
                        let _ = self.ctx.outgoing.send(Outgoing::Transient(DroneToController::Metrics {
                            backend_id: self.id.clone(),
                            metrics,
                        }));
                    }
                }
            }
        }
    }

    /// Asks the runtime to clean up whatever a failed or interrupted start left behind.
    async fn abandon(&self) {
        if let Err(err) = self.runtime.abandon(&self.id).await {
            error!(backend_id = %self.id, %err, "could not clean up after a failed start; the backend may still run");
        }
    }

    async fn send_signal(&mut self, handle: &RuntimeHandle, signal: StopSignal) {
        if signal == StopSignal::Kill {
            self.last_kill = Some(Instant::now());
        }
        if let Err(err) = self.runtime.signal(handle, signal).await {
            error!(backend_id = %self.id, ?signal, %err, "could not signal the backend");
        }
    }

    /// Starts (or upgrades) the termination of a running backend. Soft while already
    /// terminating is a no-op; hard upgrades a soft termination.
    async fn stop(&mut self, handle: &RuntimeHandle, kind: TerminationKind, reason: TerminationReason) {
        let (status, signal) = match kind {
            TerminationKind::Soft => (BackendStatus::Terminating, StopSignal::Term),
            TerminationKind::Hard => (BackendStatus::HardTerminating, StopSignal::Kill),
        };
        if self.status >= status {
            debug!(backend_id = %self.id, ?kind, ?reason, status = %self.status, "already terminating");
            if kind == TerminationKind::Hard {
                // Asked again: the last SIGKILL may not have reached the backend.
                self.send_signal(handle, StopSignal::Kill).await;
            }
            return;
        }
        self.termination = Some((kind, reason));
        let mut update = StatusUpdate::new(status);
        update.termination_kind = Some(kind);
        update.termination_reason = Some(reason);
        self.transition(update).await;
        self.send_signal(handle, signal).await;
        self.grace_deadline = match kind {
            TerminationKind::Soft => Some(Instant::now() + self.ctx.timings.soft_terminate_grace),
            TerminationKind::Hard => None,
        };
    }

    /// Stores the lease's deadlines if they are not stored yet (retried every
    /// `renew_retry` until it works).
    async fn save_deadlines(&mut self) {
        let Some(lease) = self.lease.as_mut() else { return };
        if lease.unsaved_since.is_none() {
            return;
        }
        match self.ctx.store.set_deadlines(&self.id, &lease.deadlines).await {
            Ok(()) => lease.unsaved_since = None,
            Err(err) => {
                error!(backend_id = %self.id, %err, "could not record renewed deadlines; retrying");
                lease.unsaved_since = Some(Instant::now());
            }
        }
    }

    /// When the lease next needs attention, if ever.
    fn lease_wakeup(&self) -> Option<Instant> {
        let lease = self.lease.as_ref()?;
        if self.status.is_terminal() {
            return None;
        }
        let d = &lease.deadlines;
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        if !lease.revoked {
            let renew = instant_at(d.renew_at);
            consider(match lease.last_request {
                Some(sent) => renew.max(sent + self.ctx.timings.renew_retry),
                None => renew,
            });
        }
        if self.status < BackendStatus::Terminating {
            consider(instant_at(d.soft_terminate_at));
        }
        if self.status < BackendStatus::HardTerminating {
            consider(instant_at(d.hard_terminate_at));
        }
        if let Some(tried) = lease.unsaved_since {
            consider(tried + self.ctx.timings.renew_retry);
        }
        next
    }

    /// Acts on the lease: sends a `RenewKey` when due; returns a termination when a
    /// deadline has passed.
    fn lease_tick(&mut self) -> Option<(TerminationKind, TerminationReason)> {
        let status = self.status;
        let retry = self.ctx.timings.renew_retry;
        let lease = self.lease.as_mut()?;
        let now = now_ms();
        if status < BackendStatus::HardTerminating && now >= lease.deadlines.hard_terminate_at {
            warn!(backend_id = %self.id, "key lease ran out; hard-terminating");
            return Some((TerminationKind::Hard, TerminationReason::KeyExpired));
        }
        if status < BackendStatus::Terminating && now >= lease.deadlines.soft_terminate_at {
            warn!(backend_id = %self.id, "key lease not renewed in time; soft-terminating");
            return Some((TerminationKind::Soft, TerminationReason::KeyExpired));
        }
        let due = lease.last_request.is_none_or(|sent| sent.elapsed() >= retry);
        if !lease.revoked && !status.is_terminal() && now >= lease.deadlines.renew_at && due {
            lease.last_request = Some(Instant::now());
            debug!(backend_id = %self.id, "renewing the key lease");
            let _ = self.ctx.outgoing.send(Outgoing::Transient(DroneToController::RenewKey {
                backend_id: self.id.clone(),
                fencing_token: lease.fencing_token,
                local_time: now,
            }));
        }
        None
    }

    /// Applies a `Renewed`; returns a termination if the lease is gone.
    async fn renewed(&mut self, deadlines: Option<LeaseDeadlines>) -> Option<(TerminationKind, TerminationReason)> {
        let lease = self.lease.as_mut()?;
        match deadlines {
            Some(d) => {
                debug!(backend_id = %self.id, renew_at = d.renew_at, "key lease renewed");
                lease.deadlines = d;
                lease.last_request = None;
                lease.unsaved_since = Some(Instant::now());
                self.save_deadlines().await;
                None
            }
            None => {
                warn!(backend_id = %self.id, "the controller says the key lease is gone");
                lease.revoked = true;
                lease.last_request = None;
                Some((TerminationKind::Soft, TerminationReason::KeyExpired))
            }
        }
    }
}
