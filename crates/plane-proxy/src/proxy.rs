//! The HTTP side of the proxy: the accept loop, per-request routing (Host, token, route
//! lookup) and forwarding to backends, including protocol upgrades (WebSocket).

use crate::activity::{ActivityGuard, ConnectionKind};
use crate::headers::{
    add_response_headers, is_upgrade_request, match_host, remove_hop_by_hop, set_forwarded, set_verified,
    strip_verified, subdomain_allowed,
};
use crate::path::{split_token, PathError, TokenPath};
use crate::routes::Lookup;
use crate::Shared;
use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, HOST};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

/// A client must send its request headers within this time.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for a TCP connection to a backend.
const BACKEND_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle pooled backend connections are closed after this.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// On shutdown, open connections get this long to finish their current request.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// The body of every response the proxy sends.
pub(crate) type ProxyBody = BoxBody<Bytes, hyper::Error>;
/// The pooled HTTP/1.1 client to backends.
pub(crate) type BackendClient = Client<HttpConnector, Incoming>;

/// A keep-alive pooled HTTP/1.1 client with a connect timeout.
pub(crate) fn backend_client() -> BackendClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(BACKEND_CONNECT_TIMEOUT));
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_timer(TokioTimer::new())
        .build(connector)
}

/// Why the proxy answered a request itself.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProxyError {
    #[error("the request has no Host header")]
    MissingHost,
    #[error("the Host header is not valid")]
    InvalidHost,
    #[error("this host is not served by this proxy")]
    ForeignHost,
    #[error(transparent)]
    Path(#[from] PathError),
    #[error("the forwarded path is not valid")]
    InvalidPath,
    #[error("the backend is gone or the token is not valid")]
    Gone,
    #[error("the backend did not become ready in time")]
    NotReady,
    #[error("timed out waiting for a route to the backend")]
    RouteTimeout,
    #[error("this backend must be reached through its own subdomain")]
    WrongSubdomain,
    #[error("the backend is unreachable")]
    Unreachable,
    #[error("the backend failed to answer")]
    BadGateway,
}

impl ProxyError {
    fn status(&self) -> StatusCode {
        match self {
            ProxyError::MissingHost | ProxyError::InvalidHost | ProxyError::Path(_) | ProxyError::InvalidPath => {
                StatusCode::BAD_REQUEST
            }
            ProxyError::ForeignHost | ProxyError::WrongSubdomain => StatusCode::FORBIDDEN,
            ProxyError::Gone => StatusCode::GONE,
            ProxyError::NotReady | ProxyError::RouteTimeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Unreachable | ProxyError::BadGateway => StatusCode::BAD_GATEWAY,
        }
    }
}

/// What request handling needs besides the shared state: where upgraded connections'
/// tasks are tracked and when they must stop.
pub(crate) struct Ctx {
    pub(crate) shared: Arc<Shared>,
    pub(crate) tasks: TaskTracker,
    pub(crate) stop: CancellationToken,
}

/// Accepts connections until `stop` is cancelled; each connection is a task in `tasks`.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken, tasks: TaskTracker) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder.http2().timer(TokioTimer::new());
    let ctx = Arc::new(Ctx {
        shared,
        tasks: tasks.clone(),
        stop: stop.clone(),
    });
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, remote)) => {
                let _ = stream.set_nodelay(true);
                let conn = serve_connection(builder.clone(), ctx.clone(), stream, remote);
                tasks.spawn(conn.instrument(tracing::debug_span!("proxy_connection", %remote)));
            }
            Err(err) => {
                // Usually out of file descriptors; back off briefly instead of spinning.
                warn!(%err, "failed to accept a connection");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        }
    }
}

async fn serve_connection(builder: auto::Builder<TokioExecutor>, ctx: Arc<Ctx>, stream: TcpStream, remote: SocketAddr) {
    let stop = ctx.stop.clone();
    let service = service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(handle(&ctx, remote, req).await) }
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(err) = result {
                debug!(%err, "client connection ended with an error");
            }
        }
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            if tokio::time::timeout(SHUTDOWN_GRACE, conn).await.is_err() {
                debug!("client connection closed at the end of the shutdown grace period");
            }
        }
    }
}

/// Answers one request: `/ready`, or routes and forwards it.
pub(crate) async fn handle(ctx: &Ctx, remote: SocketAddr, req: Request<Incoming>) -> Response<ProxyBody> {
    if req.uri().path() == "/ready" {
        return if *ctx.shared.connected.borrow() {
            text_response(StatusCode::OK, "ready")
        } else {
            text_response(StatusCode::SERVICE_UNAVAILABLE, "not connected to a controller")
        };
    }
    let method = req.method().clone();
    match forward(ctx, remote, req).await {
        Ok(response) => response,
        Err(err) => {
            let status = err.status();
            if status.is_server_error() {
                warn!(%remote, %method, status = status.as_u16(), reason = %err, "request failed");
            } else {
                info!(%remote, %method, status = status.as_u16(), reason = %err, "request refused");
            }
            text_response(status, &err.to_string())
        }
    }
}

/// The Host the client asked for: the `Host` header, or the URI authority (HTTP/2).
fn request_host<B>(req: &Request<B>) -> Result<&str, ProxyError> {
    let host = match req.headers().get(HOST) {
        Some(h) => h.to_str().map_err(|_| ProxyError::InvalidHost)?,
        None => req.uri().authority().map(|a| a.as_str()).unwrap_or(""),
    };
    if host.is_empty() {
        return Err(ProxyError::MissingHost);
    }
    Ok(host)
}

async fn forward(ctx: &Ctx, remote: SocketAddr, mut req: Request<Incoming>) -> Result<Response<ProxyBody>, ProxyError> {
    let shared = &ctx.shared;
    let host = request_host(&req)?.to_owned();
    let host_match = match_host(&host, &shared.config.cluster).ok_or(ProxyError::ForeignHost)?;
    let original_path = req.uri().path().to_owned();
    let TokenPath {
        token,
        forward: forward_path,
    } = split_token(&original_path, req.uri().query())?;

    let route = match shared.routes.lookup(token, shared.config.route_wait).await {
        Lookup::Ready(route) => route,
        Lookup::Gone => return Err(ProxyError::Gone),
        Lookup::NotReady => return Err(ProxyError::NotReady),
        Lookup::TimedOut => return Err(ProxyError::RouteTimeout),
    };
    if !subdomain_allowed(&host_match, route.subdomain.as_deref()) {
        return Err(ProxyError::WrongSubdomain);
    }
    let backend = &route.backend_id;
    let in_flight = shared.activity.open(backend, ConnectionKind::InFlight);

    let upgrade = req.version() == Version::HTTP_11 && is_upgrade_request(req.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    parts.uri = Uri::builder()
        .scheme("http")
        .authority(route.address.to_string())
        .path_and_query(forward_path)
        .build()
        .map_err(|_| ProxyError::InvalidPath)?;
    parts.version = Version::HTTP_11;
    parts.extensions = http::Extensions::new();
    if !parts.headers.contains_key(HOST) {
        // HTTP/2 clients send the authority instead; backends get it as Host.
        if let Ok(v) = HeaderValue::from_str(&host) {
            parts.headers.insert(HOST, v);
        }
    }
    remove_hop_by_hop(&mut parts.headers, upgrade);
    strip_verified(&mut parts.headers);
    set_verified(&mut parts.headers, &route, &original_path);
    set_forwarded(&mut parts.headers, remote.ip());

    let mut response = shared
        .client
        .request(Request::from_parts(parts, body))
        .await
        .map_err(|err| {
            if err.is_connect() {
                warn!(backend_id = %backend, address = %route.address, ?err, "backend unreachable; evicting its route");
                shared.routes.remove_unreachable(backend, route.address);
                ProxyError::Unreachable
            } else {
                warn!(backend_id = %backend, ?err, "backend request failed");
                ProxyError::BadGateway
            }
        })?;

    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_upgrade) = client_upgrade else {
            warn!(backend_id = %backend, "backend switched protocols without an upgrade request");
            return Err(ProxyError::BadGateway);
        };
        let backend_upgrade = hyper::upgrade::on(&mut response);
        let guard = shared.activity.open(backend, ConnectionKind::Upgraded);
        debug!(backend_id = %backend, open = shared.activity.upgraded_count(backend), "upgraded connection opened");
        let stop = ctx.stop.clone();
        let backend_id = backend.clone();
        ctx.tasks.spawn(async move {
            let _guard = guard;
            let join = async {
                let (client_io, backend_io) = tokio::try_join!(client_upgrade, backend_upgrade)?;
                let (mut client_io, mut backend_io) = (TokioIo::new(client_io), TokioIo::new(backend_io));
                let bytes = tokio::io::copy_bidirectional(&mut client_io, &mut backend_io).await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(bytes)
            };
            tokio::select! {
                _ = stop.cancelled() => debug!(%backend_id, "closing upgraded connection on shutdown"),
                result = join => match result {
                    Ok((up, down)) => debug!(%backend_id, up, down, "upgraded connection closed"),
                    Err(err) => debug!(%backend_id, %err, "upgraded connection ended with an error"),
                },
            }
        });
        let (mut parts, _) = response.into_parts();
        remove_hop_by_hop(&mut parts.headers, true);
        add_response_headers(&mut parts.headers, Some(backend));
        return Ok(Response::from_parts(parts, empty_body()));
    }

    let (mut parts, body) = response.into_parts();
    remove_hop_by_hop(&mut parts.headers, false);
    add_response_headers(&mut parts.headers, Some(backend));
    Ok(Response::from_parts(
        parts,
        TrackedBody {
            inner: body,
            _guard: in_flight,
        }
        .boxed(),
    ))
}

/// A backend's response body, streamed through; keeps the request counted as in flight
/// until the body is done or dropped.
struct TrackedBody {
    inner: Incoming,
    _guard: ActivityGuard,
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn empty_body() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// A plain-text response from the proxy itself.
fn text_response(status: StatusCode, message: &str) -> Response<ProxyBody> {
    let body = Full::new(Bytes::from(format!("{message}\n")))
        .map_err(|never| match never {})
        .boxed();
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    add_response_headers(response.headers_mut(), None);
    response
}
