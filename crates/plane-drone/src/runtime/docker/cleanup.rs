//! The Docker runtime's housekeeping, once at start and then every
//! `cleanup_interval`: stopped containers of this drone are removed once they have been
//! stopped for `remove_stopped_after`, except those whose backend still waits for (or has
//! not read) their exit, and those being created. With `prune_images`, images this drone
//! pulled (recorded in the state store) that no container uses and no backend was
//! prepared with for `remove_stopped_after` are removed too. No other image is touched,
//! and a reference that now points at another image is only forgotten.
//!
//! Ages of containers are measured in the engine's clock (estimated from the offset
//! measured when the runtime connected), never by comparing the engine's timestamps with
//! the drone's own clock.

use super::{engine_message, status_of, Inner, LABEL_DRONE};
use crate::state::now_ms;
use bollard::models::ContainerInspectResponse;
use bollard::query_parameters::{ListContainersOptions, RemoveContainerOptions, RemoveImageOptions};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Runs a pass now and then every `cleanup_interval`, until `cancel`.
pub(super) async fn run(inner: Arc<Inner>, cancel: CancellationToken) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = pass(&inner) => {}
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(inner.config.cleanup_interval) => {}
        }
    }
}

/// Milliseconds since the Unix epoch of an RFC 3339 timestamp; `None` for Go's zero time
/// (`0001-01-01T00:00:00Z`, "never") or anything unparseable.
pub fn parse_engine_time(text: &str) -> Option<i64> {
    let at = OffsetDateTime::parse(text, &Rfc3339).ok()?;
    let ms = at.unix_timestamp_nanos() / 1_000_000;
    (ms > 0).then(|| i64::try_from(ms).ok()).flatten()
}

/// When a stopped container stopped (or, never started, was created), engine clock, ms.
fn stopped_at(container: &ContainerInspectResponse) -> Option<i64> {
    let finished = container
        .state
        .as_ref()
        .and_then(|s| s.finished_at.as_deref())
        .and_then(parse_engine_time);
    finished.or_else(|| container.created.as_deref().and_then(parse_engine_time))
}

/// One cleanup pass.
pub(super) async fn pass(inner: &Inner) {
    // The events stream can drop events for a slow reader without ending; a periodic
    // look at every tracked container bounds how long a missed exit goes unseen.
    super::events::reconcile(inner).await;
    remove_stopped_containers(inner).await;
    if inner.config.prune_images {
        prune_images(inner).await;
    }
}

async fn remove_stopped_containers(inner: &Inner) {
    let filters = HashMap::from([
        ("label".to_owned(), vec![format!("{LABEL_DRONE}={}", inner.drone)]),
        (
            "status".to_owned(),
            vec!["exited".to_owned(), "created".to_owned(), "dead".to_owned()],
        ),
    ]);
    let options = ListContainersOptions {
        all: true,
        filters: Some(filters),
        ..Default::default()
    };
    let containers = match inner.docker.list_containers(Some(options)).await {
        Ok(c) => c,
        Err(err) => {
            warn!(err = %engine_message(&err), "cleanup could not list stopped containers");
            return;
        }
    };
    let keep_ms = i64::try_from(inner.config.remove_stopped_after.as_millis()).unwrap_or(i64::MAX);
    for summary in containers {
        let Some(id) = summary.id else { continue };
        let name = summary
            .names
            .as_ref()
            .and_then(|n| n.first())
            .map(|n| n.trim_start_matches('/').to_owned())
            .unwrap_or_default();
        if inner.tracker.protects(&id, &name) {
            continue;
        }
        let container = match inner.docker.inspect_container(&id, None).await {
            Ok(c) => c,
            Err(err) if status_of(&err) == Some(404) => continue,
            Err(err) => {
                warn!(container = %name, err = %engine_message(&err), "cleanup could not inspect a container");
                continue;
            }
        };
        let Some(stopped) = stopped_at(&container) else {
            continue;
        };
        let age = inner.engine_now_ms().saturating_sub(stopped);
        if age < keep_ms || inner.tracker.protects(&id, &name) {
            continue;
        }
        let options = RemoveContainerOptions {
            v: true,
            ..Default::default()
        };
        match inner.docker.remove_container(&id, Some(options)).await {
            Ok(()) => info!(container = %name, stopped_ms_ago = age, "removed a stopped backend container"),
            Err(err) if matches!(status_of(&err), Some(404 | 409)) => {
                debug!(container = %name, err = %engine_message(&err), "container not removed")
            }
            Err(err) => warn!(container = %name, err = %engine_message(&err), "could not remove a stopped container"),
        }
    }
}

async fn prune_images(inner: &Inner) {
    let Some(store) = &inner.store else { return };
    let images = match store.pulled_images().await {
        Ok(images) => images,
        Err(err) => {
            warn!(%err, "cleanup could not read the pulled images");
            return;
        }
    };
    if images.is_empty() {
        return;
    }
    let options = ListContainersOptions {
        all: true,
        ..Default::default()
    };
    let in_use: HashSet<String> = match inner.docker.list_containers(Some(options)).await {
        Ok(containers) => containers.into_iter().filter_map(|c| c.image_id).collect(),
        Err(err) => {
            warn!(err = %engine_message(&err), "cleanup could not list containers; not pruning images");
            return;
        }
    };
    let keep_ms = u64::try_from(inner.config.remove_stopped_after.as_millis()).unwrap_or(u64::MAX);
    for pulled in images {
        if in_use.contains(&pulled.image_id) || now_ms().saturating_sub(pulled.last_used_at) < keep_ms {
            continue;
        }
        let image = pulled.image.as_str();
        let current = match inner.docker.inspect_image(image).await {
            Ok(i) => i.id,
            Err(err) if status_of(&err) == Some(404) => None,
            Err(err) => {
                warn!(%image, err = %engine_message(&err), "cleanup could not inspect a pulled image");
                continue;
            }
        };
        if current.as_deref() == Some(pulled.image_id.as_str()) {
            let options = RemoveImageOptions::default();
            match inner.docker.remove_image(image, Some(options), None).await {
                Ok(_) => info!(%image, "removed an unused image this drone pulled"),
                Err(err) if status_of(&err) == Some(409) => {
                    debug!(%image, err = %engine_message(&err), "pulled image still in use");
                    continue;
                }
                Err(err) if status_of(&err) == Some(404) => {}
                Err(err) => {
                    warn!(%image, err = %engine_message(&err), "could not remove a pulled image");
                    continue;
                }
            }
        } else {
            debug!(%image, "pulled image is gone or now another image; forgetting it");
        }
        if let Err(err) = store.forget_pulled_image(image, &pulled.image_id).await {
            warn!(%image, %err, "could not forget a pulled image");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_times() {
        assert_eq!(parse_engine_time("1970-01-01T00:00:01.5Z"), Some(1500));
        assert_eq!(
            parse_engine_time("2024-05-01T12:00:00.123456789Z"),
            Some(1_714_564_800_123)
        );
        assert_eq!(parse_engine_time("0001-01-01T00:00:00Z"), None);
        assert_eq!(parse_engine_time("yesterday"), None);
    }
}
