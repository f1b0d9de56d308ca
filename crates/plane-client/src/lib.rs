//! A client library for the Plane controller API.
//!
//! Layout:
//! * [`PlaneClient`] (this file): one method per route of the controller's HTTP API,
//!   using the typed bodies of `plane_types::api`.
//! * [`ClientError`] (`error.rs`): why a call failed; an `ApiError` body from the
//!   controller becomes [`ClientError::Api`].
//! * [`sse`]: a pure, incremental parser for the server-sent events of the status stream.
//!
//! ```no_run
//! # async fn example() -> Result<(), plane_client::ClientError> {
//! use plane_client::PlaneClient;
//! use plane_types::api::ConnectRequest;
//!
//! let client = PlaneClient::new("http://127.0.0.1:8080")?;
//! let response = client.connect(&ConnectRequest::default()).await?;
//! println!("{}", response.url);
//! # Ok(())
//! # }
//! ```

mod error;
pub mod sse;

pub use error::ClientError;
pub use plane_types;

use futures_util::{Stream, StreamExt};
use plane_types::api::{
    BackendMetricsResponse, ClusterState, ConnectRequest, ConnectResponse, DrainResponse, RevokeRequest, StatusResponse,
};
use plane_types::names::{BackendName, ClusterName, DroneName};
use plane_types::protocol::LoadProgress;
use plane_types::status::{BackendStatus, StatusEntry};
use reqwest::header::{ACCEPT, CACHE_CONTROL};
use reqwest::{Method, RequestBuilder, Response, Url};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sse::{SseEvent, SseParser};
use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

/// How long establishing a TCP (and TLS) connection to the controller may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a whole request/response exchange may take (not applied to the status stream).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// A client of one controller. Cheap to clone; clones share a connection pool.
#[derive(Clone, Debug)]
pub struct PlaneClient {
    http: reqwest::Client,
    /// The controller's base URL; paths are appended to it.
    base: Url,
    /// Sent as `Authorization: Bearer …` when set.
    bearer_token: Option<String>,
}

impl PlaneClient {
    /// A client for the controller at `controller_url` (`http(s)://host[:port][/prefix]`).
    pub fn new(controller_url: &str) -> Result<Self, ClientError> {
        let base = parse_base_url(controller_url)?;
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("plane-client/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(PlaneClient {
            http,
            base,
            bearer_token: None,
        })
    }

    /// Sends `Authorization: Bearer <token>` with every request (for a controller that
    /// requires a control-API token).
    pub fn with_bearer_token(mut self, token: impl Into<String>) -> Self {
        self.bearer_token = Some(token.into());
        self
    }

    /// The controller's base URL.
    pub fn controller_url(&self) -> &Url {
        &self.base
    }

    /// `GET /ctrl/status`: the controller's version, after a store round trip.
    pub async fn controller_status(&self) -> Result<StatusResponse, ClientError> {
        self.json(Method::GET, &["ctrl", "status"], None::<&()>).await
    }

    /// `GET /pub/health`: succeeds when the controller can reach its store.
    pub async fn health(&self) -> Result<(), ClientError> {
        self.ignore_body(Method::GET, &["pub", "health"], None::<&()>).await
    }

    /// `POST /ctrl/connect`: gets or creates the backend for a key.
    pub async fn connect(&self, req: &ConnectRequest) -> Result<ConnectResponse, ClientError> {
        self.json(Method::POST, &["ctrl", "connect"], Some(req)).await
    }

    /// `GET /pub/b/:backend/status`: the backend's latest status.
    pub async fn status(&self, backend: &BackendName) -> Result<StatusEntry, ClientError> {
        self.json(Method::GET, &["pub", "b", backend.as_str(), "status"], None::<&()>)
            .await
    }

    /// `GET /pub/b/:backend/status-stream`: the backend's status history, then live
    /// changes, as they happen. With `last_event_id`, statuses up to and including it
    /// are skipped. The stream ends when the server closes it.
    pub async fn status_stream(
        &self,
        backend: &BackendName,
        last_event_id: Option<BackendStatus>,
    ) -> Result<impl Stream<Item = Result<StatusEntry, ClientError>> + Send + Unpin, ClientError> {
        let stream = self.open_status_stream(backend, last_event_id, false).await?;
        Ok(stream.filter_map(|item| {
            std::future::ready(match item {
                Ok(StreamItem::Status(entry)) => Some(Ok(entry)),
                Ok(StreamItem::Progress(_)) => None,
                Err(e) => Some(Err(e)),
            })
        }))
    }

    /// Like [`PlaneClient::status_stream`], but also yields the backend's load progress
    /// (`?progress=true`: an image pull, for Docker) while it is loading.
    pub async fn status_stream_with_progress(
        &self,
        backend: &BackendName,
        last_event_id: Option<BackendStatus>,
    ) -> Result<impl Stream<Item = Result<StreamItem, ClientError>> + Send + Unpin, ClientError> {
        self.open_status_stream(backend, last_event_id, true).await
    }

    async fn open_status_stream(
        &self,
        backend: &BackendName,
        last_event_id: Option<BackendStatus>,
        progress: bool,
    ) -> Result<StatusStream<impl Stream<Item = Result<bytes::Bytes, reqwest::Error>> + Send + Unpin>, ClientError>
    {
        let mut url = self.url(&["pub", "b", backend.as_str(), "status-stream"]);
        if progress {
            url.set_query(Some("progress=true"));
        }
        let mut request = self
            .authorized(self.http.get(url))
            .header(ACCEPT, "text/event-stream")
            .header(CACHE_CONTROL, "no-cache");
        if let Some(status) = last_event_id {
            request = request.header("last-event-id", status.as_str());
        }
        tracing::debug!(%backend, ?last_event_id, progress, "opening status stream");
        let response = check_status(request.send().await?).await?;
        Ok(StatusStream {
            body: Box::pin(response.bytes_stream()),
            parser: SseParser::new(),
            ready: VecDeque::new(),
            done: false,
        })
    }

    /// `GET /ctrl/b/:backend/metrics`: the latest resource-use sample of a backend and,
    /// while it loads, its load progress.
    pub async fn backend_metrics(&self, backend: &BackendName) -> Result<BackendMetricsResponse, ClientError> {
        self.json(Method::GET, &["ctrl", "b", backend.as_str(), "metrics"], None::<&()>)
            .await
    }

    /// `POST /ctrl/b/:backend/soft-terminate`: asks the backend to stop (SIGTERM, then
    /// SIGKILL after a grace period).
    pub async fn soft_terminate(&self, backend: &BackendName) -> Result<(), ClientError> {
        self.ignore_body(
            Method::POST,
            &["ctrl", "b", backend.as_str(), "soft-terminate"],
            Some(&()),
        )
        .await
    }

    /// `POST /ctrl/b/:backend/hard-terminate`: kills the backend (SIGKILL).
    pub async fn hard_terminate(&self, backend: &BackendName) -> Result<(), ClientError> {
        self.ignore_body(
            Method::POST,
            &["ctrl", "b", backend.as_str(), "hard-terminate"],
            Some(&()),
        )
        .await
    }

    /// `POST /ctrl/b/revoke`: revokes a user's tokens for a backend.
    pub async fn revoke(&self, req: &RevokeRequest) -> Result<(), ClientError> {
        self.ignore_body(Method::POST, &["ctrl", "b", "revoke"], Some(req))
            .await
    }

    /// `POST /ctrl/c/:cluster/d/:drone/drain`: stops scheduling backends on a drone.
    /// `updated` is false if the drone was already draining.
    pub async fn drain(&self, cluster: &ClusterName, drone: &DroneName) -> Result<DrainResponse, ClientError> {
        let path = ["ctrl", "c", cluster.as_str(), "d", drone.as_str(), "drain"];
        self.json(Method::POST, &path, Some(&())).await
    }

    /// `POST /ctrl/c/:cluster/d/:drone/undrain` (not in Plane 0.5): schedules backends
    /// on a draining drone again. `updated` is false if it was not draining.
    pub async fn undrain(&self, cluster: &ClusterName, drone: &DroneName) -> Result<DrainResponse, ClientError> {
        let path = ["ctrl", "c", cluster.as_str(), "d", drone.as_str(), "undrain"];
        self.json(Method::POST, &path, Some(&())).await
    }

    /// `GET /ctrl/c/:cluster/state`: the drones and proxies of a cluster.
    pub async fn cluster_state(&self, cluster: &ClusterName) -> Result<ClusterState, ClientError> {
        self.json(Method::GET, &["ctrl", "c", cluster.as_str(), "state"], None::<&()>)
            .await
    }

    /// The base URL with `segments` appended (each one percent-encoded as needed).
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("invariant: the base URL is an http(s) URL, checked in `new`")
            .pop_if_empty()
            .extend(segments);
        url
    }

    fn authorized(&self, request: RequestBuilder) -> RequestBuilder {
        match &self.bearer_token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// Sends a request with an optional JSON body and checks for a 2xx status.
    async fn send<B: Serialize + ?Sized>(
        &self,
        method: Method,
        segments: &[&str],
        body: Option<&B>,
    ) -> Result<Response, ClientError> {
        let url = self.url(segments);
        tracing::debug!(%method, %url, "controller request");
        let mut request = self.authorized(self.http.request(method, url)).timeout(REQUEST_TIMEOUT);
        if let Some(body) = body {
            request = request.json(body);
        }
        check_status(request.send().await?).await
    }

    /// Sends a request and decodes the JSON response.
    async fn json<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: Method,
        segments: &[&str],
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let response = self.send(method, segments, body).await?;
        let bytes = response.bytes().await?;
        serde_json::from_slice(&bytes).map_err(|e| {
            ClientError::Decode(format!(
                "{e} in response to /{}: {}",
                segments.join("/"),
                error::truncated_text(&bytes)
            ))
        })
    }

    /// Sends a request whose successful response body carries nothing of interest.
    async fn ignore_body<B: Serialize + ?Sized>(
        &self,
        method: Method,
        segments: &[&str],
        body: Option<&B>,
    ) -> Result<(), ClientError> {
        let response = self.send(method, segments, body).await?;
        // Read the body so the connection can be reused.
        response.bytes().await?;
        Ok(())
    }
}

/// Validates a controller URL: `http` or `https`, with a host, no query or fragment.
fn parse_base_url(s: &str) -> Result<Url, ClientError> {
    let url = Url::parse(s.trim()).map_err(|e| ClientError::InvalidUrl(format!("`{s}`: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(ClientError::InvalidUrl(format!(
            "`{s}`: the scheme must be http or https"
        )));
    }
    if url.host_str().is_none_or(str::is_empty) || url.cannot_be_a_base() {
        return Err(ClientError::InvalidUrl(format!("`{s}`: a host is required")));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(ClientError::InvalidUrl(format!(
            "`{s}`: a query or fragment is not allowed"
        )));
    }
    Ok(url)
}

/// Turns a non-2xx response into the matching [`ClientError`].
async fn check_status(response: Response) -> Result<Response, ClientError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body = response.bytes().await.unwrap_or_default();
    let err = error::error_from_response(status.as_u16(), &body);
    tracing::debug!(status = status.as_u16(), error = %err, "controller returned an error");
    Err(err)
}

/// Decodes one server-sent event of the status stream. Events without data (which a
/// server may send to keep the connection open) give `None`.
/// One item of a status stream opened with [`PlaneClient::status_stream_with_progress`].
#[derive(Clone, Debug, PartialEq)]
pub enum StreamItem {
    /// A new status.
    Status(StatusEntry),
    /// How far the backend's loading step has got.
    Progress(LoadProgress),
}

fn decode_json<T: DeserializeOwned>(what: &str, data: &str) -> Result<T, ClientError> {
    serde_json::from_str(data).map_err(|e| {
        ClientError::Decode(format!(
            "invalid {what} event {:?}: {e}",
            error::truncated_text(data.as_bytes())
        ))
    })
}

fn decode_status_event(event: &SseEvent) -> Option<Result<StreamItem, ClientError>> {
    if event.data.trim().is_empty() {
        return None;
    }
    match event.event.as_deref() {
        None | Some("message") => Some(decode_json("status", &event.data).map(StreamItem::Status)),
        Some("progress") => Some(decode_json("progress", &event.data).map(StreamItem::Progress)),
        // Event types of later servers are skipped.
        Some(_) => None,
    }
}

/// The stream returned by [`PlaneClient::status_stream`].
struct StatusStream<S> {
    body: S,
    parser: SseParser,
    /// Items parsed from the last chunk and not yet returned.
    ready: VecDeque<Result<StreamItem, ClientError>>,
    /// The body has ended or failed; return what is in `ready`, then end.
    done: bool,
}

impl<S, B> Stream for StatusStream<S>
where
    S: Stream<Item = Result<B, reqwest::Error>> + Unpin,
    B: AsRef<[u8]>,
{
    type Item = Result<StreamItem, ClientError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(item) = this.ready.pop_front() {
                return Poll::Ready(Some(item));
            }
            if this.done {
                return Poll::Ready(None);
            }
            match this.body.poll_next_unpin(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => this.done = true,
                Poll::Ready(Some(Err(e))) => {
                    this.done = true;
                    this.ready.push_back(Err(ClientError::Http(e)));
                }
                Poll::Ready(Some(Ok(chunk))) => match this.parser.push(chunk.as_ref()) {
                    Ok(events) => this.ready.extend(events.iter().filter_map(decode_status_event)),
                    Err(e) => {
                        this.done = true;
                        this.ready.push_back(Err(ClientError::Decode(e.to_string())));
                    }
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::stream;

    #[test]
    fn base_urls() {
        for ok in [
            "http://127.0.0.1:8080",
            "https://plane.example.com/",
            "http://[::1]:9000/prefix/",
        ] {
            assert!(PlaneClient::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "127.0.0.1:8080",
            "ftp://x",
            "http://",
            "http://x/?a=b",
            "http://x/#f",
            "mailto:a@b",
        ] {
            assert!(
                matches!(PlaneClient::new(bad), Err(ClientError::InvalidUrl(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn urls_are_joined_under_the_base() {
        let backend: BackendName = "abc-1".parse().unwrap();
        let c = PlaneClient::new("http://localhost:8080").unwrap();
        assert_eq!(
            c.url(&["pub", "b", backend.as_str(), "status"]).as_str(),
            "http://localhost:8080/pub/b/abc-1/status"
        );
        let c = PlaneClient::new("http://localhost:8080/plane/").unwrap();
        assert_eq!(
            c.url(&["ctrl", "connect"]).as_str(),
            "http://localhost:8080/plane/ctrl/connect"
        );
        let c = PlaneClient::new("https://x.example.com/plane").unwrap();
        assert_eq!(
            c.url(&["ctrl", "status"]).as_str(),
            "https://x.example.com/plane/ctrl/status"
        );
    }

    #[test]
    fn futures_are_send() {
        fn is_send<T: Send>(_: T) {}
        let c = PlaneClient::new("http://127.0.0.1:1").unwrap();
        let backend: BackendName = "abc".parse().unwrap();
        is_send(async move {
            let _stream = c.status_stream(&backend, Some(BackendStatus::Ready)).await;
            c.connect(&ConnectRequest::default()).await
        });
    }

    #[tokio::test]
    async fn connection_errors_name_the_cause() {
        // A port nothing listens on: bind one, then free it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let c = PlaneClient::new(&format!("http://127.0.0.1:{port}")).unwrap();
        let err = c.health().await.unwrap_err();
        assert!(matches!(err, ClientError::Http(_)), "{err:?}");
        let msg = err.to_string();
        assert!(msg.starts_with("request to the controller failed"), "{msg}");
        assert!(msg.to_lowercase().contains("refused"), "{msg}");
    }

    fn event(data: &str) -> SseEvent {
        SseEvent {
            event: None,
            data: data.to_owned(),
            id: None,
        }
    }

    #[test]
    fn status_events_are_decoded() {
        let Some(Ok(StreamItem::Status(e))) = decode_status_event(&event(r#"{"status":"ready","time":5}"#)) else {
            panic!("not a status");
        };
        assert_eq!((e.status, e.time), (BackendStatus::Ready, 5));
        let mut progress = event(r#"{"message":"pulling","fraction":0.5,"bytes_done":5,"bytes_total":10}"#);
        progress.event = Some("progress".into());
        let Some(Ok(StreamItem::Progress(p))) = decode_status_event(&progress) else {
            panic!("not progress");
        };
        assert_eq!(
            (p.fraction, p.bytes_done, p.bytes_total),
            (Some(0.5), Some(5), Some(10))
        );
        let mut unknown = event("{}");
        unknown.event = Some("from-the-future".into());
        assert!(decode_status_event(&unknown).is_none());
        assert!(decode_status_event(&event("")).is_none());
        assert!(matches!(
            decode_status_event(&event("{nope")),
            Some(Err(ClientError::Decode(_)))
        ));
    }

    #[tokio::test]
    async fn status_stream_over_chunked_body() {
        let chunks: Vec<Result<&[u8], reqwest::Error>> = vec![
            Ok(b": hello\n\nid: scheduled\nda"),
            Ok(b"ta: {\"status\":\"scheduled\",\"time\":1}\r\n\r\nid: ready\ndata: {\"status\":\"ready\","),
            Ok(b"\"time\":2}\n\nid: x\ndata: garbage\n\n"),
            Ok(b"id: terminated\ndata: {\"status\":\"terminated\",\"time\":3,\"termination_reason\":\"swept\",\"exit_error\":false}\n\n"),
            Ok(b"data: never finished"),
        ];
        let mut s = StatusStream {
            body: stream::iter(chunks),
            parser: SseParser::new(),
            ready: VecDeque::new(),
            done: false,
        };
        let mut statuses = Vec::new();
        let mut errors = 0;
        while let Some(item) = s.next().await {
            match item {
                Ok(StreamItem::Status(e)) => statuses.push(e.status),
                Ok(StreamItem::Progress(p)) => panic!("unexpected progress {p:?}"),
                Err(ClientError::Decode(_)) => errors += 1,
                Err(e) => panic!("unexpected error {e}"),
            }
        }
        assert_eq!(
            statuses,
            [
                BackendStatus::Scheduled,
                BackendStatus::Ready,
                BackendStatus::Terminated
            ]
        );
        assert_eq!(errors, 1);
    }
}
