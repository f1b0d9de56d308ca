//! [`ControllerTxtSource`]: TXT values from the controller's
//! `GET {base}/ctrl/c/{cluster}/acme-txt`, with failover between several controllers.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use plane_types::protocol::AcmeTxt;
use reqwest::Url;

use crate::TxtSource;

/// The longest one request to a controller may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Why one request to a controller failed.
#[derive(Debug, thiserror::Error)]
enum FetchError {
    /// Connecting, sending or reading failed, or the request timed out.
    #[error("request to {url} failed")]
    Http {
        url: Url,
        #[source]
        source: reqwest::Error,
    },
    /// The controller answered, but not with 200.
    #[error("{url} answered {status}")]
    Status { url: Url, status: reqwest::StatusCode },
    /// The body is not `{"values": [...]}`.
    #[error("{url} answered a body that is not an AcmeTxt")]
    Body {
        url: Url,
        #[source]
        source: reqwest::Error,
    },
}

/// Reads TXT values from one of several controllers.
///
/// Every call starts with the controller that answered last; if it fails, the call tries
/// the next one (once), and the next calls start there.
#[derive(Debug)]
pub struct ControllerTxtSource {
    http: reqwest::Client,
    /// The controllers' base URLs; paths are appended to them.
    bases: Vec<Url>,
    /// Sent as `Authorization: Bearer …` when set.
    ctrl_token: Option<String>,
    /// The index in `bases` to try first.
    current: AtomicUsize,
}

impl ControllerTxtSource {
    /// `controller_url`: one base URL or several separated by commas (rotate to the next on failure).
    /// `ctrl_token`: sent as `Authorization: Bearer <token>` when set.
    pub fn new(controller_url: &str, ctrl_token: Option<String>) -> anyhow::Result<Self> {
        let bases = controller_url
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(parse_base)
            .collect::<anyhow::Result<Vec<_>>>()?;
        if bases.is_empty() {
            anyhow::bail!("no controller URL given");
        }
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("plane-dns/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("building the HTTP client")?;
        Ok(ControllerTxtSource {
            http,
            bases,
            ctrl_token,
            current: AtomicUsize::new(0),
        })
    }

    /// `GET {base}/ctrl/c/{cluster}/acme-txt` on one controller.
    async fn fetch(&self, base: &Url, cluster: &str) -> Result<Vec<String>, FetchError> {
        let mut url = base.clone();
        url.path_segments_mut()
            .expect("invariant: an http(s) base URL, checked in `new`")
            .pop_if_empty()
            .extend(["ctrl", "c", cluster, "acme-txt"]);
        let mut request = self.http.get(url.clone());
        if let Some(token) = &self.ctrl_token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.map_err(|source| FetchError::Http {
            url: url.clone(),
            source,
        })?;
        let status = response.status();
        if status != reqwest::StatusCode::OK {
            return Err(FetchError::Status { url, status });
        }
        let body: AcmeTxt = response
            .json()
            .await
            .map_err(|source| FetchError::Body { url, source })?;
        Ok(body.values)
    }
}

#[async_trait::async_trait]
impl TxtSource for ControllerTxtSource {
    async fn txt_values(&self, cluster: &str) -> anyhow::Result<Vec<String>> {
        let first = self.current.load(Ordering::Relaxed) % self.bases.len();
        let error = match self.fetch(&self.bases[first], cluster).await {
            Ok(values) => return Ok(values),
            Err(error) => error,
        };
        if self.bases.len() == 1 {
            return Err(error.into());
        }
        let next = (first + 1) % self.bases.len();
        // Later calls start at the next controller, unless another call moved on already.
        let _ = self
            .current
            .compare_exchange(first, next, Ordering::Relaxed, Ordering::Relaxed);
        tracing::debug!(%error, "controller failed; trying the next one");
        self.fetch(&self.bases[next], cluster).await.map_err(|second| {
            // `{:#}` shows each error with its causes ("connection refused", say).
            anyhow::anyhow!(
                "{:#}; before that, {:#}",
                anyhow::Error::new(second),
                anyhow::Error::new(error)
            )
        })
    }
}

/// A controller base URL: `http(s)://host[:port][/prefix]`.
fn parse_base(s: &str) -> anyhow::Result<Url> {
    let url = Url::parse(s).with_context(|| format!("invalid controller URL {s:?}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.cannot_be_a_base() {
        anyhow::bail!("invalid controller URL {s:?}: not an http(s) URL");
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_url_lists() {
        let source = ControllerTxtSource::new(" http://a:1 , https://b/prefix/,", None).unwrap();
        let bases: Vec<_> = source.bases.iter().map(Url::as_str).collect();
        assert_eq!(bases, ["http://a:1/", "https://b/prefix/"]);
        for bad in ["", " , ", "ftp://x", "not a url", "http://a,mailto:x@y"] {
            assert!(ControllerTxtSource::new(bad, None).is_err(), "{bad:?}");
        }
    }
}
