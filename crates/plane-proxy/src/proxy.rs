//! The HTTP side of the proxy: the accept loops, client connections (TLS, HTTP/1.1 or
//! HTTP/2, with their limits and timeouts), per-request routing (Host, token, route
//! lookup) and forwarding to backends over HTTP/1.1, including protocol upgrades
//! (WebSocket).
//!
//! Each listener has a [`Mode`]: plain HTTP, HTTPS, or the HTTP port of an HTTPS proxy,
//! which redirects to HTTPS. Every mode answers `/ready` and `/metrics` itself.
//!
//! **Client timeouts are kept by each connection's task, not by hyper.** hyper's
//! HTTP/1.1 `header_read_timeout` starts whenever the connection waits for a request
//! head, keep-alive waits included, so it cannot tell an idle keep-alive connection
//! (allowed [`ProxyLimits::idle_timeout`]) from a slow request head (allowed
//! [`ProxyLimits::header_read_timeout`]); and hyper has no idle timeout for HTTP/2.
//! So the task watches a [`ConnState`]: requests in flight (from the service call to
//! the end of the response body), and the first byte read while none is. With no
//! request in flight, the deadline is
//! * on a new connection: `header_read_timeout` after it was accepted (after the TLS
//!   handshake), or `idle_timeout` when ALPN chose HTTP/2;
//! * HTTP/1.1, once a byte of the next request has come: `header_read_timeout` after
//!   that byte (slowloris); the connection is closed at once;
//! * otherwise: `idle_timeout` after the last response ended; the connection is shut
//!   down gracefully (HTTP/2 clients get a GOAWAY).
//!
//! An upgraded connection leaves hyper, and with it these deadlines.

use crate::activity::ConnectionKind;
use crate::config::ProxyLimits;
use crate::headers::{
    add_response_headers, is_upgrade_request, match_host, match_hostname, match_https_host, remove_hop_by_hop,
    set_forwarded, set_verified, strip_port, strip_verified, subdomain_allowed,
};
use crate::metrics::{Gauge, GaugeGuard};
use crate::path::{split_token, PathError, TokenPath};
use crate::routes::Lookup;
use crate::Shared;
use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, HOST, LOCATION};
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
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

/// The body of every response the proxy sends.
pub(crate) type ProxyBody = BoxBody<Bytes, hyper::Error>;
/// The pooled HTTP/1.1 client to backends.
pub(crate) type BackendClient = Client<HttpConnector, RequestBody>;

/// A keep-alive pooled HTTP/1.1 client with a connect timeout.
pub(crate) fn backend_client(limits: &ProxyLimits) -> BackendClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(limits.upstream_connect_timeout));
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(limits.upstream_pool_idle_timeout)
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
    #[error("the request body is larger than this proxy accepts ({0} bytes)")]
    PayloadTooLarge(u64),
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
    #[error("the backend did not accept a connection within {0:?}")]
    ConnectTimeout(Duration),
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
            ProxyError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::Gone => StatusCode::GONE,
            ProxyError::NotReady | ProxyError::RouteTimeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Unreachable | ProxyError::ConnectTimeout(_) | ProxyError::BadGateway => StatusCode::BAD_GATEWAY,
        }
    }
}

/// What a listener does with its connections.
#[derive(Clone)]
pub(crate) enum Mode {
    /// Plain HTTP (HTTP/1.1, or HTTP/2 with prior knowledge), proxied.
    Http,
    /// TLS, HTTP/2 or HTTP/1.1 by ALPN, proxied.
    Https {
        acceptor: TlsAcceptor,
        /// The port clients reach this listener on: a Host naming it matches a cluster
        /// named without a port (as ACME needs), see [`match_https_host`].
        public_port: u16,
    },
    /// Plain HTTP that redirects every request (but `/ready` and `/metrics`) to
    /// `https://<host>[:https_port]/…`.
    Redirect {
        /// The port written in redirects (left out when it is 443).
        https_port: u16,
    },
}

/// What one listener's connections share: the proxy state, the listener's mode, the
/// HTTP server settings, where tasks are tracked and when they must stop.
pub(crate) struct Ctx {
    pub(crate) shared: Arc<Shared>,
    mode: Mode,
    builder: auto::Builder<TrackedExecutor>,
    pub(crate) tasks: TaskTracker,
    pub(crate) stop: CancellationToken,
}

/// Runs the futures hyper spawns (HTTP/2 streams) as tasks of the proxy's tracker, in
/// the span of their connection.
#[derive(Clone)]
struct TrackedExecutor(TaskTracker);

impl<F> hyper::rt::Executor<F> for TrackedExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        self.0.spawn(fut.in_current_span());
    }
}

/// The HTTP server settings for client connections.
fn server_builder(limits: &ProxyLimits, tasks: &TaskTracker) -> auto::Builder<TrackedExecutor> {
    let mut builder = auto::Builder::new(TrackedExecutor(tasks.clone()));
    builder
        .http1()
        .timer(TokioTimer::new())
        // The connection task keeps both header and idle deadlines (see the module doc).
        .header_read_timeout(None)
        // A request head that does not fit in the buffer gets 431.
        .max_buf_size(limits.max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    builder
}

/// Accepts connections until `stop` is cancelled, then closes the listener at once;
/// each connection is a task in `tasks`.
pub(crate) async fn serve(
    listener: TcpListener,
    mode: Mode,
    shared: Arc<Shared>,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    let ctx = Arc::new(Ctx {
        builder: server_builder(&shared.config.limits, &tasks),
        shared,
        mode,
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
                let conn = serve_connection(ctx.clone(), stream, remote);
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

/// Where a request came from.
#[derive(Clone, Copy, Debug)]
struct ConnInfo {
    remote: SocketAddr,
    tls: bool,
}

async fn serve_connection(ctx: Arc<Ctx>, stream: TcpStream, remote: SocketAddr) {
    let gauge = ctx.shared.metrics.open(Gauge::Connections);
    let limits = &ctx.shared.config.limits;
    match &ctx.mode {
        Mode::Https { acceptor, .. } => {
            let handshake = tokio::time::timeout(limits.tls_handshake_timeout, acceptor.accept(stream));
            let tls = tokio::select! {
                _ = ctx.stop.cancelled() => return,
                tls = handshake => tls,
            };
            match tls {
                Ok(Ok(tls)) => {
                    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
                    let conn = ConnState::new(gauge, h2);
                    let info = ConnInfo { remote, tls: true };
                    drive(&ctx, TrackedIo::new(tls, conn.clone()), conn, info).await;
                }
                Ok(Err(err)) => debug!(%err, "TLS handshake failed"),
                Err(_) => debug!(timeout = ?limits.tls_handshake_timeout, "TLS handshake timed out"),
            }
        }
        Mode::Http | Mode::Redirect { .. } => {
            let conn = ConnState::new(gauge, false);
            let info = ConnInfo { remote, tls: false };
            drive(&ctx, TrackedIo::new(stream, conn.clone()), conn, info).await;
        }
    }
}

/// Serves HTTP on one client connection until it ends, times out, or the proxy stops.
async fn drive<I>(ctx: &Arc<Ctx>, io: TrackedIo<I>, conn: Arc<ConnState>, info: ConnInfo)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = {
        let ctx = ctx.clone();
        let conn = conn.clone();
        service_fn(move |req: Request<Incoming>| {
            let ctx = ctx.clone();
            let busy = conn.begin(req.version());
            async move {
                let response = handle(&ctx, info, req).await;
                ctx.shared.metrics.response(response.status());
                Ok::<_, Infallible>(response.map(|inner| GuardedBody { inner, _guard: busy }))
            }
        })
    };
    let served = ctx.builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(served);
    let limits = &ctx.shared.config.limits;
    loop {
        let deadline = conn.deadline(limits);
        tokio::select! {
            result = served.as_mut() => {
                if let Err(err) = result {
                    debug!(%err, "client connection ended with an error");
                }
                return;
            }
            _ = ctx.stop.cancelled() => break,
            _ = conn.changed.notified() => {}
            _ = sleep_until(deadline.map(|(at, _)| at)) => match conn.deadline(limits) {
                // Checked again: a request may have started since.
                Some((at, Expiry::HeaderRead)) if at <= Instant::now() => {
                    debug!(timeout = ?limits.header_read_timeout, "closing: no request head in time");
                    return;
                }
                Some((at, Expiry::Idle)) if at <= Instant::now() => {
                    debug!(timeout = ?limits.idle_timeout, "closing idle connection");
                    break;
                }
                _ => {}
            },
        }
    }
    // Requests in flight finish (HTTP/1.1 closes after the current response, HTTP/2
    // sends GOAWAY); after the grace period the connection is dropped.
    served.as_mut().graceful_shutdown();
    match tokio::time::timeout(limits.shutdown_grace, served).await {
        Ok(Err(err)) => debug!(%err, "client connection ended with an error"),
        Ok(Ok(())) => {}
        Err(_) => debug!("client connection closed at the end of the shutdown grace period"),
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Which client timeout a connection is under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expiry {
    /// A request head is due.
    HeaderRead,
    /// No request is in flight.
    Idle,
}

/// What a client connection's task needs to keep its deadlines (see the module doc).
/// Times are milliseconds since `origin`. The connection gauge lives here, so it
/// counts an upgraded connection until its socket closes.
struct ConnState {
    origin: Instant,
    /// Requests from the service call to the end of their response body.
    in_flight: AtomicUsize,
    /// When the last request ended.
    idle_since: AtomicU64,
    /// 1 + when the first byte was read with no request in flight; 0: none since.
    arriving_since: AtomicU64,
    /// Whether a request has been seen on this connection.
    served: AtomicBool,
    /// HTTP/2, by ALPN or by a request's version: bytes read while idle are frames
    /// such as PINGs, not the start of a request head.
    h2: AtomicBool,
    /// Woken when a deadline may have moved earlier.
    changed: Notify,
    _gauge: GaugeGuard,
}

impl ConnState {
    fn new(gauge: GaugeGuard, h2: bool) -> Arc<ConnState> {
        Arc::new(ConnState {
            origin: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            arriving_since: AtomicU64::new(0),
            served: AtomicBool::new(false),
            h2: AtomicBool::new(h2),
            changed: Notify::new(),
            _gauge: gauge,
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn at(&self, ms: u64) -> Instant {
        self.origin + Duration::from_millis(ms)
    }

    /// A request has arrived; it is in flight until the guard is dropped.
    fn begin(self: &Arc<Self>, version: Version) -> Busy {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.arriving_since.store(0, Ordering::SeqCst);
        self.served.store(true, Ordering::Relaxed);
        if version == Version::HTTP_2 {
            self.h2.store(true, Ordering::Relaxed);
        }
        Busy(self.clone())
    }

    /// Bytes were read from the client.
    fn bytes_read(&self) {
        if self.h2.load(Ordering::Relaxed)
            || self.in_flight.load(Ordering::SeqCst) > 0
            || self.arriving_since.load(Ordering::SeqCst) > 0
        {
            return;
        }
        self.arriving_since.store(self.now_ms() + 1, Ordering::SeqCst);
        self.changed.notify_one();
    }

    /// The next deadline and what happens then; `None` while a request is in flight.
    fn deadline(&self, limits: &ProxyLimits) -> Option<(Instant, Expiry)> {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let h2 = self.h2.load(Ordering::Relaxed);
        if !self.served.load(Ordering::Relaxed) {
            return Some(if h2 {
                (self.origin + limits.idle_timeout, Expiry::Idle)
            } else {
                (self.origin + limits.header_read_timeout, Expiry::HeaderRead)
            });
        }
        let arriving = self.arriving_since.load(Ordering::SeqCst);
        if arriving > 0 && !h2 {
            return Some((self.at(arriving - 1) + limits.header_read_timeout, Expiry::HeaderRead));
        }
        let idle_since = self.at(self.idle_since.load(Ordering::SeqCst));
        Some((idle_since + limits.idle_timeout, Expiry::Idle))
    }
}

/// Keeps a request counted as in flight on its connection.
struct Busy(Arc<ConnState>);

impl Drop for Busy {
    fn drop(&mut self) {
        let conn = &self.0;
        conn.idle_since.store(conn.now_ms(), Ordering::SeqCst);
        conn.arriving_since.store(0, Ordering::SeqCst);
        if conn.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            conn.changed.notify_one();
        }
    }
}

/// A client connection's transport, telling its [`ConnState`] about bytes read.
struct TrackedIo<I> {
    inner: I,
    conn: Arc<ConnState>,
}

impl<I> TrackedIo<I> {
    fn new(inner: I, conn: Arc<ConnState>) -> Self {
        TrackedIo { inner, conn }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for TrackedIo<I> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.conn.bytes_read();
        }
        result
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for TrackedIo<I> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A body that holds `G` (a counter's guard) until it is done or dropped: the
/// client-side in-flight count ([`Busy`]) and the backend activity ([`crate::activity::ActivityGuard`]).
struct GuardedBody<B, G> {
    inner: B,
    _guard: G,
}

impl<B: Body<Data = Bytes, Error = hyper::Error> + Unpin, G: Unpin> Body for GuardedBody<B, G> {
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

/// Answers one request: `/ready`, `/metrics`, a redirect, or routes and forwards it.
async fn handle(ctx: &Ctx, info: ConnInfo, req: Request<Incoming>) -> Response<ProxyBody> {
    match req.uri().path() {
        "/ready" => {
            return if *ctx.shared.connected.borrow() {
                text_response(StatusCode::OK, "ready")
            } else {
                text_response(StatusCode::SERVICE_UNAVAILABLE, "not connected to a controller")
            };
        }
        "/metrics" => {
            let mut response = text_response(StatusCode::OK, "");
            *response.body_mut() = full_body(ctx.shared.metrics.render());
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(crate::metrics::CONTENT_TYPE));
            return response;
        }
        _ => {}
    }
    let method = req.method().clone();
    let result = match &ctx.mode {
        Mode::Redirect { https_port } => redirect(ctx, *https_port, &req),
        Mode::Http | Mode::Https { .. } => forward(ctx, info, req).await,
    };
    match result {
        Ok(response) => response,
        Err(err) => {
            let status = err.status();
            let remote = info.remote;
            if status.is_server_error() {
                warn!(%remote, %method, status = status.as_u16(), reason = %err, "request failed");
            } else {
                info!(%remote, %method, status = status.as_u16(), reason = %err, "request refused");
            }
            text_response(status, &err.to_string())
        }
    }
}

/// The Host the client asked for: the URI authority (HTTP/2's `:authority`, or an
/// HTTP/1.1 absolute-form target, which RFC 9112 puts before `Host`), else the `Host`
/// header.
fn request_host<B>(req: &Request<B>) -> Result<&str, ProxyError> {
    let host = match req.uri().authority() {
        Some(authority) => authority.as_str(),
        None => match req.headers().get(HOST) {
            Some(h) => h.to_str().map_err(|_| ProxyError::InvalidHost)?,
            None => "",
        },
    };
    if host.is_empty() {
        return Err(ProxyError::MissingHost);
    }
    Ok(host)
}

/// The answer of the HTTP port of an HTTPS proxy: 308 to the same host and path over
/// HTTPS, for hosts of the cluster (whatever their port).
fn redirect<B>(ctx: &Ctx, https_port: u16, req: &Request<B>) -> Result<Response<ProxyBody>, ProxyError> {
    let host = request_host(req)?;
    match_hostname(host, &ctx.shared.config.cluster).ok_or(ProxyError::ForeignHost)?;
    let hostname = strip_port(host);
    let port = match https_port {
        443 => String::new(),
        port => format!(":{port}"),
    };
    let path = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    let location = format!("https://{hostname}{port}{path}");
    let value = HeaderValue::from_str(&location).map_err(|_| ProxyError::InvalidHost)?;
    let mut response = text_response(StatusCode::PERMANENT_REDIRECT, &format!("use {location}"));
    response.headers_mut().insert(LOCATION, value);
    Ok(response)
}

async fn forward(ctx: &Ctx, info: ConnInfo, mut req: Request<Incoming>) -> Result<Response<ProxyBody>, ProxyError> {
    let shared = &ctx.shared;
    let limits = &shared.config.limits;
    let host = request_host(&req)?.to_owned();
    let host_match = match ctx.mode {
        Mode::Https { public_port, .. } => match_https_host(&host, &shared.config.cluster, public_port),
        _ => match_host(&host, &shared.config.cluster),
    }
    .ok_or(ProxyError::ForeignHost)?;
    let original_path = req.uri().path().to_owned();
    let TokenPath {
        token,
        forward: forward_path,
    } = split_token(&original_path, req.uri().query())?;
    if let Some(limit) = limits.max_body_bytes {
        // The exact length when the client announced one (Content-Length).
        if req.body().size_hint().lower() > limit {
            return Err(ProxyError::PayloadTooLarge(limit));
        }
    }

    // A lookup answered on its first poll came from the cache; one that waits did not.
    let mut lookup = std::pin::pin!(shared.routes.lookup(token, shared.config.route_wait));
    let lookup = match std::future::poll_fn(|cx| Poll::Ready(lookup.as_mut().poll(cx))).await {
        Poll::Ready(lookup) => {
            shared.metrics.route_cache_hit();
            lookup
        }
        Poll::Pending => {
            shared.metrics.route_cache_miss();
            lookup.await
        }
    };
    let route = match lookup {
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
    // The Host that was matched: HTTP/2 clients send the authority instead.
    let host_value = HeaderValue::from_str(&host).map_err(|_| ProxyError::InvalidHost)?;
    parts.headers.insert(HOST, host_value);
    remove_hop_by_hop(&mut parts.headers, upgrade);
    strip_verified(&mut parts.headers);
    set_verified(&mut parts.headers, &route, &original_path);
    set_forwarded(&mut parts.headers, info.remote.ip(), info.tls);

    let (body, too_large) = RequestBody::new(body, limits.max_body_bytes);
    let sent = Instant::now();
    let result = shared.client.request(Request::from_parts(parts, body)).await;
    let mut response = match result {
        Ok(response) => {
            shared.metrics.upstream_latency(sent.elapsed());
            response
        }
        Err(err) => {
            if too_large.is_some_and(|flag| flag.load(Ordering::SeqCst)) {
                debug!(backend_id = %backend, "request body over the limit; cut off");
                return Err(ProxyError::PayloadTooLarge(limits.max_body_bytes.unwrap_or_default()));
            }
            if err.is_connect() {
                warn!(backend_id = %backend, address = %route.address, ?err, "backend unreachable; evicting its route");
                shared.routes.remove_unreachable(backend, route.address);
                return Err(if is_timeout(&err) {
                    ProxyError::ConnectTimeout(limits.upstream_connect_timeout)
                } else {
                    ProxyError::Unreachable
                });
            }
            warn!(backend_id = %backend, ?err, "backend request failed");
            return Err(ProxyError::BadGateway);
        }
    };

    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_upgrade) = client_upgrade else {
            warn!(backend_id = %backend, "backend switched protocols without an upgrade request");
            return Err(ProxyError::BadGateway);
        };
        let backend_upgrade = hyper::upgrade::on(&mut response);
        let guard = shared.activity.open(backend, ConnectionKind::Upgraded);
        let gauge = shared.metrics.open(Gauge::WebSockets);
        debug!(backend_id = %backend, open = shared.activity.upgraded_count(backend), "upgraded connection opened");
        let stop = ctx.stop.clone();
        let backend_id = backend.clone();
        ctx.tasks.spawn(async move {
            let _guards = (guard, gauge);
            let join = async {
                let (client_io, backend_io) = tokio::try_join!(client_upgrade, backend_upgrade)?;
                let (mut client_io, mut backend_io) = (TokioIo::new(client_io), TokioIo::new(backend_io));
                let bytes = splice(&mut client_io, &mut backend_io).await?;
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
        GuardedBody {
            inner: body,
            _guard: in_flight,
        }
        .boxed(),
    ))
}

/// The largest chunk [`splice`] moves per read; it lives on the stack of the poll.
const SPLICE_CHUNK: usize = 8 * 1024;

/// Reads per direction and poll before [`splice`] yields to other tasks.
const SPLICE_READS_PER_POLL: usize = 32;

/// Copies both ways between an upgraded client connection and its backend connection
/// until both directions have ended, like `tokio::io::copy_bidirectional` (a direction
/// ends at its reader's EOF, then its writer is shut down; the first error ends both),
/// but without a buffer per direction held for the connection's whole life: each read
/// goes into a buffer on the stack and is written straight on, and only bytes the writer
/// does not take at once are kept, on the heap, until they are written. An idle
/// WebSocket holds no copy buffer. Returns the bytes copied client → backend and back.
async fn splice<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut a_to_b, mut b_to_a) = (Pipe::default(), Pipe::default());
    std::future::poll_fn(|cx| {
        let up = a_to_b.poll_copy(cx, Pin::new(&mut *a), Pin::new(&mut *b))?;
        let down = b_to_a.poll_copy(cx, Pin::new(&mut *b), Pin::new(&mut *a))?;
        match (up, down) {
            (Poll::Ready(up), Poll::Ready(down)) => Poll::Ready(Ok((up, down))),
            _ => Poll::Pending,
        }
    })
    .await
}

/// One direction of [`splice`].
#[derive(Default)]
struct Pipe {
    /// Bytes read but not yet taken by the writer, from this offset on.
    unwritten: Option<(Box<[u8]>, usize)>,
    /// Bytes were written since the last flush.
    need_flush: bool,
    /// The reader reached EOF.
    eof: bool,
    /// The writer is shut down: this direction is over.
    done: bool,
    copied: u64,
}

impl Pipe {
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(self.copied));
        }
        for _ in 0..SPLICE_READS_PER_POLL {
            if let Some((bytes, from)) = &mut self.unwritten {
                while *from < bytes.len() {
                    let n = ready!(writer.as_mut().poll_write(cx, &bytes[*from..]))?;
                    if n == 0 {
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                    *from += n;
                    self.copied += n as u64;
                    self.need_flush = true;
                }
                self.unwritten = None;
            }
            if self.eof {
                if self.need_flush {
                    ready!(writer.as_mut().poll_flush(cx))?;
                    self.need_flush = false;
                }
                ready!(writer.as_mut().poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(self.copied));
            }
            let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); SPLICE_CHUNK];
            let mut buf = ReadBuf::uninit(&mut chunk);
            match reader.as_mut().poll_read(cx, &mut buf) {
                Poll::Ready(result) => result?,
                Poll::Pending => {
                    if self.need_flush {
                        ready!(writer.as_mut().poll_flush(cx))?;
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
            }
            let read = buf.filled();
            if read.is_empty() {
                self.eof = true;
                continue;
            }
            let mut from = 0;
            while from < read.len() {
                match writer.as_mut().poll_write(cx, &read[from..]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => {
                        from += n;
                        self.copied += n as u64;
                        self.need_flush = true;
                    }
                    Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                    Poll::Pending => {
                        // Only now is a heap buffer needed, for what the writer left.
                        self.unwritten = Some((read[from..].into(), 0));
                        return Poll::Pending;
                    }
                }
            }
        }
        // Many reads in a row: let other tasks run, then go on.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// Whether a backend connection failed by timing out.
fn is_timeout(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(err);
    while let Some(err) = source {
        if err
            .downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::TimedOut)
        {
            return true;
        }
        source = err.source();
    }
    false
}

/// A client's request body on its way to a backend, cut off with an error once it
/// grows past the body limit.
pub(crate) struct RequestBody {
    inner: Incoming,
    limit: Option<BodyLimit>,
}

struct BodyLimit {
    max: u64,
    remaining: u64,
    /// Set when the body went over; the request's handler reads it.
    exceeded: Arc<AtomicBool>,
}

/// Why a request body did not reach the backend whole.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RequestBodyError {
    #[error("the client's request body failed: {0}")]
    Client(#[from] hyper::Error),
    #[error("the request body is over the limit of {0} bytes")]
    TooLarge(u64),
}

impl RequestBody {
    /// Wraps `inner` with `max` bytes allowed; also returns the flag that tells whether
    /// the limit was hit (none when nothing can go over).
    fn new(inner: Incoming, max: Option<u64>) -> (Self, Option<Arc<AtomicBool>>) {
        let limit = max.filter(|_| !inner.is_end_stream()).map(|max| BodyLimit {
            max,
            remaining: max,
            exceeded: Arc::new(AtomicBool::new(false)),
        });
        let flag = limit.as_ref().map(|l| l.exceeded.clone());
        (RequestBody { inner, limit }, flag)
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = RequestBodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let frame = match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            Some(Err(err)) => return Poll::Ready(Some(Err(err.into()))),
            None => return Poll::Ready(None),
        };
        if let (Some(limit), Some(data)) = (&mut this.limit, frame.data_ref()) {
            let len = data.len() as u64;
            if len > limit.remaining {
                limit.exceeded.store(true, Ordering::SeqCst);
                return Poll::Ready(Some(Err(RequestBodyError::TooLarge(limit.max))));
            }
            limit.remaining -= len;
        }
        Poll::Ready(Some(Ok(frame)))
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

fn full_body(text: String) -> ProxyBody {
    Full::new(Bytes::from(text)).map_err(|never| match never {}).boxed()
}

/// A plain-text response from the proxy itself.
fn text_response(status: StatusCode, message: &str) -> Response<ProxyBody> {
    let mut response = Response::new(full_body(format!("{message}\n")));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    add_response_headers(response.headers_mut(), None);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One end of a spliced connection: writes `send` then shuts its side down, and
    /// reads until the other side's EOF.
    async fn peer(io: tokio::io::DuplexStream, send: Vec<u8>) -> Vec<u8> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut read, mut write) = tokio::io::split(io);
        let writer = async move {
            write.write_all(&send).await.unwrap();
            write.shutdown().await.unwrap();
        };
        let reader = async move {
            let mut got = Vec::new();
            read.read_to_end(&mut got).await.unwrap();
            got
        };
        tokio::join!(writer, reader).1
    }

    #[tokio::test]
    async fn splice_copies_both_ways_through_back_pressure_and_passes_eof_on() {
        // 64-byte pipes: every write of a chunk is cut short, so the leftovers are kept
        // and written later.
        let (client, mut from_client) = tokio::io::duplex(64);
        let (mut to_backend, backend) = tokio::io::duplex(64);
        let up: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let down: Vec<u8> = (0..200_000u32).map(|i| (i % 241) as u8).collect();
        let spliced = tokio::spawn(async move { splice(&mut from_client, &mut to_backend).await });
        let (at_backend, at_client) = tokio::join!(peer(backend, down.clone()), peer(client, up.clone()));
        assert!(at_backend == up, "client → backend bytes differ");
        assert!(at_client == down, "backend → client bytes differ");
        let copied = tokio::time::timeout(Duration::from_secs(5), spliced)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(copied, (up.len() as u64, down.len() as u64));
    }

    #[tokio::test]
    async fn splice_keeps_the_open_direction_after_one_side_ends() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, mut from_client) = tokio::io::duplex(1024);
        let (mut to_backend, mut backend) = tokio::io::duplex(1024);
        let spliced = tokio::spawn(async move { splice(&mut from_client, &mut to_backend).await });
        // The client is done sending: the backend sees EOF, and can still answer.
        client.shutdown().await.unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(backend.read(&mut buf).await.unwrap(), 0);
        backend.write_all(b"late reply").await.unwrap();
        let n = client.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"late reply");
        drop(backend);
        let copied = tokio::time::timeout(Duration::from_secs(5), spliced)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(copied, (0, 10));
    }

    fn limits() -> ProxyLimits {
        ProxyLimits {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            ..ProxyLimits::default()
        }
    }

    fn conn(h2: bool) -> Arc<ConnState> {
        let metrics = Arc::new(crate::metrics::Metrics::default());
        ConnState::new(metrics.open(Gauge::Connections), h2)
    }

    fn check(conn: &ConnState, expected: Option<(u64, Expiry)>) {
        let got = conn
            .deadline(&limits())
            .map(|(at, e)| ((at - conn.origin).as_secs(), e));
        assert_eq!(got, expected);
    }

    #[test]
    fn http1_deadlines() {
        let c = conn(false);
        // A new connection must send a request head in time.
        check(&c, Some((10, Expiry::HeaderRead)));
        let busy = c.begin(Version::HTTP_11);
        check(&c, None);
        // Bytes read while a request is in flight are its body.
        c.bytes_read();
        check(&c, None);
        drop(busy);
        check(&c, Some((60, Expiry::Idle)));
        // The next request starts arriving: its head is due.
        c.bytes_read();
        check(&c, Some((10, Expiry::HeaderRead)));
        drop(c.begin(Version::HTTP_11));
        check(&c, Some((60, Expiry::Idle)));
    }

    #[test]
    fn http2_deadlines() {
        let c = conn(true);
        check(&c, Some((60, Expiry::Idle)));
        c.bytes_read();
        check(&c, Some((60, Expiry::Idle)));
        let a = c.begin(Version::HTTP_2);
        let b = c.begin(Version::HTTP_2);
        drop(a);
        check(&c, None);
        drop(b);
        c.bytes_read();
        check(&c, Some((60, Expiry::Idle)));

        // HTTP/2 with prior knowledge is found out from the first request.
        let c = conn(false);
        drop(c.begin(Version::HTTP_2));
        c.bytes_read();
        check(&c, Some((60, Expiry::Idle)));
    }

    #[test]
    fn hosts_come_from_the_authority_first() {
        let req = |uri: &str, host: Option<&str>| {
            let mut b = Request::builder().uri(uri);
            if let Some(host) = host {
                b = b.header(HOST, host);
            }
            b.body(()).unwrap()
        };
        assert_eq!(request_host(&req("/t/", Some("a.test"))).unwrap(), "a.test");
        assert_eq!(
            request_host(&req("https://b.test:8443/t/", None)).unwrap(),
            "b.test:8443"
        );
        assert_eq!(
            request_host(&req("http://b.test/t/", Some("a.test"))).unwrap(),
            "b.test"
        );
        assert!(matches!(request_host(&req("/t/", None)), Err(ProxyError::MissingHost)));
    }

    #[test]
    fn timeouts_are_found_in_error_chains() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] io::Error);
        assert!(is_timeout(&Outer(io::Error::new(io::ErrorKind::TimedOut, "slow"))));
        assert!(!is_timeout(&Outer(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            "no"
        ))));
    }
}
