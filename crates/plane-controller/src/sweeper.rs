//! The background sweep: controller heartbeat, idle and lifetime terminations, and
//! backends lost with their drone (lease expired without termination).

use crate::state::Controller;
use plane_types::protocol::ControllerToProxy;
use std::sync::Arc;

/// Runs until the controller shuts down.
pub async fn run(c: Arc<Controller>) {
    let mut tick = tokio::time::interval(c.config.timings.sweep_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut cleanup = tokio::time::interval(c.config.timings.cleanup_interval);
    cleanup.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Well within a lease, so a spawn re-sent this way still finds its lease alive.
    let mut resend = tokio::time::interval(RESEND_INTERVAL.min(c.config.timings.lease.expire_after / 4));
    resend.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    resend.reset();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = cleanup.tick() => {
                clean_up(&c).await;
                continue;
            }
            _ = resend.tick(), if c.has_peers() => {
                // A controller that died between its commit and its notice leaves a
                // spawn or termination that only the store knows of.
                c.resend_to_drones().await;
                continue;
            }
            () = c.shutdown.cancelled() => return,
        }
        if let Err(e) = sweep_once(&c).await {
            tracing::error!(error = %e, "sweep failed");
        }
    }
}

/// With several controllers, how often (at most) scheduled spawns and pending
/// terminations are re-sent to the drones connected here.
const RESEND_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

/// Reports (progress, metrics) not refreshed for this long are forgotten.
const OBSERVED_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(600);

/// Rows deleted per cleanup call, and calls per cleanup pass: a pass does bounded
/// work, and whatever is left waits for the next one.
const CLEANUP_BATCH: u32 = 500;
const CLEANUP_CALLS: usize = 20;

/// Deletes terminated backends past their retention, in bounded batches.
pub async fn clean_up(c: &Controller) {
    let policy = plane_store::CleanupPolicy {
        terminated_retention: c.config.timings.terminated_retention,
        batch: CLEANUP_BATCH,
    };
    let mut total = plane_store::CleanupReport::default();
    for _ in 0..CLEANUP_CALLS {
        match c.store().cleanup(&policy).await {
            Ok(r) => {
                total += r;
                if r.backends < u64::from(CLEANUP_BATCH) && r.tokens < u64::from(CLEANUP_BATCH) {
                    break;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cleanup failed; retrying at the next pass");
                break;
            }
        }
    }
    if !total.is_empty() {
        tracing::info!(
            backends = total.backends,
            tokens = total.tokens,
            status_entries = total.status_entries,
            "deleted terminated backends past their retention"
        );
    }
}

/// One pass of the sweep.
pub async fn sweep_once(c: &Controller) -> Result<(), plane_store::StoreError> {
    c.prune_observed(OBSERVED_MAX_AGE);
    c.store().controller_heartbeat(&c.config.name).await?;
    for t in c.store().sweep().await? {
        tracing::info!(backend_id = %t.backend_id, reason = t.reason.as_str(), "sweeping backend");
        c.terminate_on(&t.drone, t.backend_id, t.kind, t.reason);
    }
    for (backend_id, entry) in c.store().mark_lost().await? {
        tracing::warn!(%backend_id, "backend lost: its lease expired without it terminating");
        c.to_proxies(
            None,
            ControllerToProxy::BackendRemoved {
                backend_id: backend_id.clone(),
            },
        );
        c.publish(backend_id, &entry);
    }
    Ok(())
}
