//! The set of backends a drone owns: turns controller messages into backend tasks and
//! commands, resumes the backends recorded by an earlier run, and has each runtime stop
//! what it runs under this drone's identity that no record accounts for.
//!
//! Messages are handled one at a time, in arrival order, by the connection task, so a
//! duplicate `Spawn` always finds the record of the first one.

use crate::backend::{BackendCommand, BackendContext, BackendTask, Start};
use crate::runtime::Runtime;
use crate::state::{StateError, StatusUpdate};
use plane_types::executable::RuntimeKind;
use plane_types::names::BackendName;
use plane_types::protocol::{ControllerToDrone, SpawnAction};
use plane_types::status::{BackendStatus, TerminationKind, TerminationReason};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, info_span, warn, Instrument};

/// How long shutdown waits for backend tasks to notice it before aborting them.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// How long the startup search for unknown backends may take before the drone connects
/// anyway.
const RECONCILE_TIMEOUT: Duration = Duration::from_secs(30);

/// The backends of one drone run.
pub(crate) struct Drone {
    runtimes: Vec<Arc<dyn Runtime>>,
    /// Runtimes that resume and stop recorded backends but take no new ones.
    hidden: Vec<RuntimeKind>,
    ctx: BackendContext,
    backends: HashMap<BackendName, mpsc::UnboundedSender<BackendCommand>>,
    /// The backend tasks; each ends with its backend's id, so [`Drone::reap`] forgets
    /// just the finished ones (a scan of `backends` per message was O(backends)).
    tasks: JoinSet<BackendName>,
    cancel: CancellationToken,
}

impl Drone {
    /// A drone with these runtimes; its tasks stop when `cancel` is cancelled.
    pub(crate) fn new(runtimes: Vec<Arc<dyn Runtime>>, ctx: BackendContext, cancel: CancellationToken) -> Drone {
        Drone {
            runtimes,
            hidden: Vec::new(),
            ctx,
            backends: HashMap::new(),
            tasks: JoinSet::new(),
            cancel,
        }
    }

    /// Stops offering the runtime of `kind` (it still resumes recorded backends).
    pub(crate) fn hide(&mut self, kind: RuntimeKind) {
        self.hidden.push(kind);
    }

    /// The runtimes offered to the controller.
    pub(crate) fn runtime_kinds(&self) -> Vec<RuntimeKind> {
        self.runtimes
            .iter()
            .map(|r| r.kind())
            .filter(|k| !self.hidden.contains(k))
            .collect()
    }

    fn runtime_for(&self, kind: RuntimeKind) -> Option<Arc<dyn Runtime>> {
        self.runtimes.iter().find(|r| r.kind() == kind).cloned()
    }

    /// Resumes every backend the state store holds that is not terminated, then lets
    /// each runtime stop what it runs for this drone that the store has no record of.
    /// Returns how many backends were resumed.
    pub(crate) async fn recover(&mut self) -> Result<usize, StateError> {
        let records = self.ctx.store.live_backends().await?;
        let count = records.len();
        // Only live records count: a running container whose record says it terminated
        // (say, a start that timed out) must be stopped too.
        let known: HashSet<BackendName> = records.iter().map(|r| r.backend_id.clone()).collect();
        for record in records {
            let kind = record
                .handle
                .as_ref()
                .map(|h| h.kind())
                .or_else(|| record.spawn.as_ref().map(|s| s.executable.runtime_kind()));
            match kind.and_then(|k| self.runtime_for(k)) {
                Some(runtime) => self.launch(Start::Recovered(record), runtime),
                None => {
                    warn!(backend_id = %record.backend_id, ?kind, "no runtime can resume this backend; reporting it lost");
                    let mut update = StatusUpdate::new(BackendStatus::Terminated);
                    update.termination_reason = Some(TerminationReason::Lost);
                    update.address = record.address;
                    update.message = Some("no runtime on this drone can resume the backend".into());
                    self.ctx.report(&record.backend_id, &update).await;
                }
            }
        }
        if count > 0 {
            info!(count, "resumed backends recorded by an earlier run");
        }
        // Before connecting (no new backend may start meanwhile, or it would look unknown),
        // but bounded: a slow engine must not keep the drone from renewing its leases.
        for runtime in &self.runtimes {
            match tokio::time::timeout(RECONCILE_TIMEOUT, runtime.reconcile(&known)).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    warn!(runtime = %runtime.kind(), %err, "could not look for backends the state store does not know")
                }
                Err(_) => warn!(
                    runtime = %runtime.kind(),
                    timeout = ?RECONCILE_TIMEOUT,
                    "gave up looking for backends the state store does not know; the engine is slow"
                ),
            }
        }
        Ok(count)
    }

    fn launch(&mut self, start: Start, runtime: Arc<dyn Runtime>) {
        let backend_id = match &start {
            Start::Fresh(s) => s.backend_id.clone(),
            Start::Recovered(r) => r.backend_id.clone(),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let task = BackendTask::new(start, runtime, self.ctx.clone(), rx, self.cancel.child_token());
        let id = backend_id.clone();
        self.tasks.spawn(
            async move {
                task.run().await;
                id
            }
            .instrument(info_span!("backend", %backend_id)),
        );
        self.backends.insert(backend_id, tx);
    }

    /// Forgets finished tasks.
    fn reap(&mut self) {
        let mut lost = false;
        while let Some(result) = self.tasks.try_join_next() {
            match result {
                // Only if that task's channel is the one held: a new task for the same
                // id would have replaced it.
                Ok(id) => {
                    if self.backends.get(&id).is_some_and(|tx| tx.is_closed()) {
                        self.backends.remove(&id);
                    }
                }
                Err(err) => {
                    if err.is_panic() {
                        error!(%err, "a backend task panicked");
                    }
                    lost = true;
                }
            }
        }
        if lost {
            // A task that panicked or was aborted did not say which backend it ran.
            self.backends.retain(|_, tx| !tx.is_closed());
        }
    }

    /// Acts on a message from the controller (`Ack` is the connection's business).
    pub(crate) async fn handle(&mut self, message: ControllerToDrone) {
        self.reap();
        match message {
            ControllerToDrone::Spawn(spawn) => self.spawn(*spawn).await,
            ControllerToDrone::Terminate {
                backend_id,
                kind,
                reason,
            } => self.terminate(backend_id, kind, reason).await,
            ControllerToDrone::Renewed { backend_id, deadlines } => match self.backends.get(&backend_id) {
                Some(tx) if tx.send(BackendCommand::Renewed(deadlines)).is_ok() => {}
                _ => debug!(%backend_id, "renewal for a backend that is not running"),
            },
            ControllerToDrone::Ack { event_id } => debug!(event_id, "ack handled elsewhere"),
            ControllerToDrone::Welcome { .. } | ControllerToDrone::Reject { .. } => {
                warn!("unexpected handshake message after the handshake; ignoring it")
            }
        }
    }

    async fn spawn(&mut self, spawn: SpawnAction) {
        let backend_id = spawn.backend_id.clone();
        if self.backends.contains_key(&backend_id) {
            debug!(%backend_id, "duplicate spawn ignored");
            return;
        }
        match self.ctx.store.insert_backend(&spawn).await {
            Ok(true) => {}
            Ok(false) => {
                debug!(%backend_id, "spawn for a backend already known; ignored");
                return;
            }
            Err(err) => {
                error!(%backend_id, %err, "could not record a spawned backend; not starting it");
                return;
            }
        }
        let kind = spawn.executable.runtime_kind();
        info!(%backend_id, runtime = %kind, "spawning a backend");
        match self.runtime_for(kind).filter(|_| !self.hidden.contains(&kind)) {
            Some(runtime) => self.launch(Start::Fresh(spawn), runtime),
            None => {
                let mut update = StatusUpdate::new(BackendStatus::Terminated);
                update.termination_reason = Some(TerminationReason::InternalError);
                update.message = Some(format!("this drone has no {kind} runtime"));
                self.ctx.report(&backend_id, &update).await;
            }
        }
    }

    async fn terminate(&mut self, backend_id: BackendName, kind: TerminationKind, reason: TerminationReason) {
        if let Some(tx) = self.backends.get(&backend_id) {
            if tx.send(BackendCommand::Terminate { kind, reason }).is_ok() {
                return;
            }
            self.backends.remove(&backend_id);
        }
        let record = match self.ctx.store.backend(&backend_id).await {
            Ok(record) => record,
            Err(err) => {
                error!(%backend_id, %err, "could not look up a backend to terminate");
                return;
            }
        };
        match record {
            Some(r) if r.status.is_terminal() => {
                debug!(%backend_id, "terminate for a backend already terminated; its event is in the outbox or acked")
            }
            other => {
                // Unknown here (or no longer tracked): say so, so the controller converges.
                info!(%backend_id, known = other.is_some(), "terminate for a backend this drone does not run; reporting it lost");
                let mut update = StatusUpdate::new(BackendStatus::Terminated);
                update.termination_reason = Some(TerminationReason::Lost);
                update.address = other.and_then(|r| r.address);
                update.message = Some("the drone does not run this backend".into());
                self.ctx.report(&backend_id, &update).await;
            }
        }
    }

    /// Stops every backend task (not the backends) and waits for them.
    pub(crate) async fn shutdown(mut self) {
        self.cancel.cancel();
        let drain = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(SHUTDOWN_WAIT, drain).await.is_err() {
            warn!("backend tasks did not stop in time; aborting them");
            self.tasks.abort_all();
            while self.tasks.join_next().await.is_some() {}
        }
    }
}
