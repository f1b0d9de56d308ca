//! The loading step of the Docker runtime: making sure a backend's image is present,
//! pulling it per its `pull_policy`, and turning the engine's per-layer pull messages
//! into [`LoadProgress`] totals ([`PullProgress`]).

use super::{engine_message, status_of, Inner};
use crate::runtime::{LoadProgress, RuntimeError};
use bollard::auth::DockerCredentials as EngineCredentials;
use bollard::models::CreateImageInfo;
use bollard::query_parameters::CreateImageOptions;
use futures_util::StreamExt;
use plane_types::executable::{DockerExecutable, PullPolicy};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// Byte progress is reported at most this often (layer changes always are).
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// `image` with `:latest` added when it names neither a tag nor a digest: pulling a bare
/// repository name would fetch every tag.
pub fn with_default_tag(image: &str) -> String {
    let last = image.rsplit('/').next().unwrap_or(image);
    if image.contains('@') || last.contains(':') {
        image.to_owned()
    } else {
        format!("{image}:latest")
    }
}

/// The registry an image reference points at, as the engine keys credentials.
fn registry_of(image: &str) -> String {
    match image.split_once('/') {
        Some((first, _)) if first.contains('.') || first.contains(':') || first == "localhost" => first.to_owned(),
        _ => "https://index.docker.io/v1/".to_owned(),
    }
}

/// Makes sure `exe.image` is present, pulling it if the policy says so.
pub(super) async fn ensure_image(
    inner: &Inner,
    exe: &DockerExecutable,
    progress: &(dyn Fn(LoadProgress) + Send + Sync),
) -> Result<(), RuntimeError> {
    let image = exe.image.as_str();
    let policy = exe.pull_policy.unwrap_or_default();
    let present = match inner.docker.inspect_image(image).await {
        Ok(_) => true,
        Err(e) if status_of(&e) == Some(404) => false,
        Err(e) => {
            return Err(RuntimeError::Other(format!(
                "checking for image {image}: {}",
                engine_message(&e)
            )))
        }
    };
    if present && policy != PullPolicy::Always {
        if inner.config.prune_images {
            if let Some(store) = &inner.store {
                if let Err(err) = store.touch_pulled_image(image).await {
                    warn!(%image, %err, "could not note the use of a pulled image");
                }
            }
        }
        return Ok(());
    }
    if policy == PullPolicy::Never {
        return Err(RuntimeError::Other(format!(
            "image {image} is not present on this drone and pull_policy is Never"
        )));
    }
    pull(inner, exe, present, progress).await
}

/// Pulls `exe.image`; `present` says whether it was already there before.
async fn pull(
    inner: &Inner,
    exe: &DockerExecutable,
    present: bool,
    progress: &(dyn Fn(LoadProgress) + Send + Sync),
) -> Result<(), RuntimeError> {
    let image = exe.image.as_str();
    let reference = with_default_tag(image);
    let credentials = exe.credentials.as_ref().map(|c| EngineCredentials {
        username: Some(c.username.clone()),
        password: Some(c.password.clone()),
        serveraddress: Some(registry_of(&reference)),
        ..Default::default()
    });
    let options = CreateImageOptions {
        from_image: Some(reference.clone()),
        ..Default::default()
    };
    info!(%image, "pulling an image");
    let begun = Instant::now();
    progress(LoadProgress::message(format!("pulling {image}")));
    let mut state = PullProgress::default();
    let mut last_report = Instant::now();
    let mut stream = inner.docker.create_image(Some(options), None, credentials);
    while let Some(item) = stream.next().await {
        let item =
            item.map_err(|e| RuntimeError::Other(format!("pulling image {image} failed: {}", engine_message(&e))))?;
        let layers_changed = state.update(&item);
        if layers_changed || last_report.elapsed() >= PROGRESS_INTERVAL {
            last_report = Instant::now();
            progress(state.report(image));
        }
    }
    let inspected = inner.docker.inspect_image(&reference).await.map_err(|e| {
        RuntimeError::Other(format!(
            "image {image} was pulled but cannot be inspected: {}",
            engine_message(&e)
        ))
    })?;
    let mut done = state.report(image);
    done.message = format!("pulled {image}");
    done.fraction = Some(1.0);
    progress(done);
    debug!(%image, elapsed = ?begun.elapsed(), "image pulled");
    // Only an image that was not here before counts as pulled by Plane (and may be
    // pruned): one the operator had pulled is left alone, only its use is noted if this
    // drone had recorded it earlier.
    if let Some(store) = &inner.store {
        let recorded = match (present, inspected.id.as_deref()) {
            (false, Some(id)) => store.record_pulled_image(image, id).await,
            _ => store.touch_pulled_image(image).await,
        };
        if let Err(err) = recorded {
            warn!(%image, %err, "could not record a pulled image; it will not be pruned");
        }
    }
    Ok(())
}

/// Where one layer of a pull is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum LayerState {
    Waiting,
    Downloading,
    Downloaded,
    Extracting,
    Done,
    /// Present before the pull: nothing to fetch.
    Existing,
}

#[derive(Clone, Debug)]
struct Layer {
    state: LayerState,
    /// Bytes downloaded so far.
    downloaded: u64,
    /// The layer's download size, once the engine said.
    size: Option<u64>,
    /// Extraction progress in `0.0..=1.0`.
    extracted: f64,
}

/// The totals of a pull so far, fed one engine message at a time.
#[derive(Clone, Debug, Default)]
pub struct PullProgress {
    layers: BTreeMap<String, Layer>,
    last_status: Option<String>,
}

impl PullProgress {
    /// Takes one message of the pull stream into account. Returns whether a layer
    /// changed state (worth reporting at once).
    pub fn update(&mut self, info: &CreateImageInfo) -> bool {
        let status = info.status.as_deref().unwrap_or_default();
        let detail = info.progress_detail.as_ref();
        let current = detail.and_then(|d| d.current).and_then(|c| u64::try_from(c).ok());
        let total = detail
            .and_then(|d| d.total)
            .and_then(|t| u64::try_from(t).ok())
            .filter(|t| *t > 0);
        let new_state = match status {
            "Pulling fs layer" | "Waiting" => LayerState::Waiting,
            "Downloading" => LayerState::Downloading,
            "Verifying Checksum" | "Download complete" => LayerState::Downloaded,
            "Extracting" => LayerState::Extracting,
            "Pull complete" => LayerState::Done,
            "Already exists" => LayerState::Existing,
            _ => {
                // Messages about the whole image ("Pulling from …", "Digest: …").
                if !status.is_empty() {
                    self.last_status = Some(status.to_owned());
                }
                return false;
            }
        };
        let Some(id) = info.id.clone() else {
            return false;
        };
        let is_new = !self.layers.contains_key(&id);
        let layer = self.layers.entry(id).or_insert(Layer {
            state: new_state,
            downloaded: 0,
            size: None,
            extracted: 0.0,
        });
        let changed = is_new || layer.state != new_state;
        // A retried download may go back to downloading; otherwise states only advance.
        if new_state >= layer.state || new_state == LayerState::Downloading {
            layer.state = new_state;
        }
        match new_state {
            LayerState::Downloading => {
                if let Some(total) = total {
                    layer.size = Some(total);
                }
                if let Some(current) = current {
                    layer.downloaded = current;
                }
            }
            LayerState::Extracting => {
                if let (Some(current), Some(total)) = (current, total) {
                    layer.extracted = (current as f64 / total as f64).clamp(0.0, 1.0);
                }
            }
            _ => {}
        }
        if matches!(
            layer.state,
            LayerState::Downloaded | LayerState::Extracting | LayerState::Done
        ) {
            if let Some(size) = layer.size {
                layer.downloaded = size;
            }
        }
        changed
    }

    /// The totals as a report about pulling `image`.
    pub fn report(&self, image: &str) -> LoadProgress {
        let fetched: Vec<&Layer> = self
            .layers
            .values()
            .filter(|l| l.state != LayerState::Existing)
            .collect();
        let done_layers = fetched.iter().filter(|l| l.state == LayerState::Done).count();
        let bytes_done: u64 = fetched.iter().map(|l| l.downloaded).sum();
        let sizes_known = fetched
            .iter()
            .all(|l| l.size.is_some() || l.state >= LayerState::Downloaded);
        let bytes_total: u64 = fetched.iter().filter_map(|l| l.size).sum();
        let fraction = (!fetched.is_empty()).then(|| {
            // Each layer counts with its size (the mean size while some are unknown);
            // downloading is 80 % of a layer's work, extracting the rest.
            let known: Vec<u64> = fetched.iter().filter_map(|l| l.size).collect();
            let mean = if known.is_empty() {
                1.0
            } else {
                known.iter().sum::<u64>() as f64 / known.len() as f64
            };
            let (mut work, mut all) = (0.0, 0.0);
            for layer in &fetched {
                let weight = layer.size.map_or(mean, |s| s as f64).max(1.0);
                let progress = match layer.state {
                    LayerState::Waiting => 0.0,
                    LayerState::Downloading => {
                        0.8 * layer
                            .size
                            .map_or(0.0, |s| (layer.downloaded as f64 / s as f64).min(1.0))
                    }
                    LayerState::Downloaded => 0.8,
                    LayerState::Extracting => 0.8 + 0.2 * layer.extracted,
                    LayerState::Done | LayerState::Existing => 1.0,
                };
                work += weight * progress;
                all += weight;
            }
            (work / all).clamp(0.0, 1.0) as f32
        });
        let message = if fetched.is_empty() {
            match &self.last_status {
                Some(status) => format!("pulling {image}: {status}"),
                None => format!("pulling {image}"),
            }
        } else {
            format!("pulling {image}: {done_layers} of {} layers done", fetched.len())
        };
        LoadProgress {
            message,
            fraction,
            bytes_done: (!fetched.is_empty()).then_some(bytes_done),
            bytes_total: (sizes_known && bytes_total > 0).then_some(bytes_total),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::ProgressDetail;

    fn msg(id: Option<&str>, status: &str, current: Option<i64>, total: Option<i64>) -> CreateImageInfo {
        CreateImageInfo {
            id: id.map(str::to_owned),
            status: Some(status.to_owned()),
            progress_detail: (current.is_some() || total.is_some()).then_some(ProgressDetail { current, total }),
            ..Default::default()
        }
    }

    #[test]
    fn default_tags() {
        assert_eq!(with_default_tag("alpine"), "alpine:latest");
        assert_eq!(with_default_tag("alpine:3"), "alpine:3");
        assert_eq!(with_default_tag("localhost:5000/app"), "localhost:5000/app:latest");
        assert_eq!(with_default_tag("localhost:5000/app:v1"), "localhost:5000/app:v1");
        assert_eq!(with_default_tag("app@sha256:abc"), "app@sha256:abc");
        assert_eq!(registry_of("localhost:5000/app:v1"), "localhost:5000");
        assert_eq!(registry_of("ghcr.io/org/app:v1"), "ghcr.io");
        assert_eq!(registry_of("org/app:v1"), "https://index.docker.io/v1/");
    }

    #[test]
    fn aggregates_layers_into_totals() {
        let mut p = PullProgress::default();
        assert!(!p.update(&msg(Some("latest"), "Pulling from library/app", None, None)));
        assert_eq!(p.report("app").bytes_done, None);
        assert_eq!(p.report("app").message, "pulling app: Pulling from library/app");
        assert!(p.update(&msg(Some("l1"), "Pulling fs layer", None, None)));
        assert!(p.update(&msg(Some("l2"), "Pulling fs layer", None, None)));
        assert!(p.update(&msg(Some("l0"), "Already exists", None, None)));
        let r = p.report("app");
        assert_eq!(r.fraction, Some(0.0));
        assert_eq!(r.bytes_total, None, "sizes are not known yet");
        assert_eq!(r.message, "pulling app: 0 of 2 layers done");

        assert!(p.update(&msg(Some("l1"), "Downloading", Some(100), Some(1000))));
        assert!(!p.update(&msg(Some("l1"), "Downloading", Some(500), Some(1000))));
        assert!(p.update(&msg(Some("l2"), "Downloading", Some(0), Some(3000))));
        let r = p.report("app");
        assert_eq!((r.bytes_done, r.bytes_total), (Some(500), Some(4000)));
        let f1 = r.fraction.unwrap();
        assert!(f1 > 0.0 && f1 < 0.5, "{f1}");

        p.update(&msg(Some("l1"), "Download complete", None, None));
        p.update(&msg(Some("l1"), "Extracting", Some(10), Some(1000)));
        p.update(&msg(Some("l1"), "Pull complete", None, None));
        p.update(&msg(Some("l2"), "Downloading", Some(3000), Some(3000)));
        p.update(&msg(Some("l2"), "Verifying Checksum", None, None));
        let r = p.report("app");
        assert_eq!((r.bytes_done, r.bytes_total), (Some(4000), Some(4000)));
        assert!(r.fraction.unwrap() > f1);
        p.update(&msg(Some("l2"), "Extracting", Some(3000), Some(3000)));
        p.update(&msg(Some("l2"), "Pull complete", None, None));
        p.update(&msg(None, "Status: Downloaded newer image for app:latest", None, None));
        let r = p.report("app");
        assert_eq!(r.fraction, Some(1.0));
        assert_eq!(r.message, "pulling app: 2 of 2 layers done");
    }
}
