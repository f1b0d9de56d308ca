//! The WebSocket connection to the controller: handshake, route answers and
//! invalidations in, route requests and keepalives out, and reconnection forever with
//! capped exponential backoff.

use crate::Shared;
use futures_util::{SinkExt, StreamExt};
use plane_types::protocol::{ControllerToProxy, ProxyHello, ProxyToController, PROTOCOL_VERSION};
use rand::Rng;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

/// Longest wait for the TCP + WebSocket handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for `Welcome` after sending `Hello`.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often to ping the controller so a silently dead socket is noticed.
const PING_INTERVAL: Duration = Duration::from_secs(10);
/// The socket counts as dead after this long without any frame from the controller.
const DEAD_AFTER: Duration = Duration::from_secs(30);

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Capped exponential backoff with jitter: each delay is the current base scaled by a
/// random factor in `[0.5, 1]`, kept within `[min, max]`; the base doubles up to `max`.
#[derive(Debug)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max: max.max(min),
            attempt: 0,
        }
    }

    /// The un-jittered delay of the next attempt.
    fn base(&self) -> Duration {
        let factor = 2u32.saturating_pow(self.attempt);
        self.min.saturating_mul(factor).min(self.max)
    }

    /// The delay before the next attempt.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let base = self.base();
        self.attempt = self.attempt.saturating_add(1).min(32);
        let jittered = base.mul_f64(rand::thread_rng().gen_range(0.5..=1.0));
        jittered.clamp(self.min, self.max)
    }

    /// Starts over from `min` (after a successful handshake).
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// Why a session with the controller ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("timed out connecting to the controller")]
    ConnectTimeout,
    #[error("WebSocket error: {0}")]
    WebSocket(Box<tokio_tungstenite::tungstenite::Error>),
    #[error("the controller did not answer the handshake in time")]
    HandshakeTimeout,
    #[error("the controller closed the socket during the handshake")]
    ClosedInHandshake,
    #[error("the controller rejected the proxy: {0}")]
    Rejected(String),
    #[error("the controller speaks protocol version {0}, we speak {PROTOCOL_VERSION}")]
    WrongVersion(u32),
    #[error("no frame from the controller for {0:?}")]
    Silent(Duration),
    #[error("the control-API token is not a valid header value")]
    BadToken,
}

impl From<tokio_tungstenite::tungstenite::Error> for SessionError {
    fn from(err: tokio_tungstenite::tungstenite::Error) -> Self {
        SessionError::WebSocket(Box::new(err))
    }
}

/// Keeps a connection to the controller until `shutdown`, reconnecting with backoff.
/// The route cache and the readiness flag follow the connection's state.
///
/// Each attempt goes to the next of `socket_urls` (the controllers).
pub(crate) async fn maintain(shared: Arc<Shared>, socket_urls: Vec<String>, shutdown: CancellationToken) {
    let config = &shared.config;
    let mut backoff = Backoff::new(config.reconnect_min, config.reconnect_max);
    for attempt in 0usize.. {
        let socket_url = &socket_urls[attempt % socket_urls.len()];
        let mut welcomed = false;
        let result = tokio::select! {
            _ = shutdown.cancelled() => None,
            r = session(&shared, socket_url, &shutdown, &mut welcomed) => Some(r),
        };
        shared.routes.disconnected();
        shared.issuance.disconnected();
        shared.connected.send_replace(false);
        if welcomed {
            backoff.reset();
        }
        let delay = match result {
            None | Some(Ok(())) if shutdown.is_cancelled() => return,
            None | Some(Ok(())) => {
                warn!(url = %socket_url, "controller closed the connection; reconnecting");
                backoff.next_delay()
            }
            Some(Err(SessionError::Rejected(message))) => {
                error!(url = %socket_url, %message, "controller rejected the proxy; retrying");
                config.reconnect_max
            }
            Some(Err(err)) => {
                warn!(url = %socket_url, %err, "controller connection failed; reconnecting");
                backoff.next_delay()
            }
        };
        debug!(?delay, "waiting before reconnecting to the controller");
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// One connection: handshake, then relay until the socket ends or `shutdown`.
async fn session(
    shared: &Shared,
    url: &str,
    shutdown: &CancellationToken,
    welcomed: &mut bool,
) -> Result<(), SessionError> {
    let mut request = url.into_client_request()?;
    if let Some(token) = &shared.config.ctrl_token {
        let value = format!("Bearer {token}").parse().map_err(|_| SessionError::BadToken)?;
        request.headers_mut().insert(http::header::AUTHORIZATION, value);
    }
    let (mut ws, _) = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio_tungstenite::connect_async_with_config(request, None, true),
    )
    .await
    .map_err(|_| SessionError::ConnectTimeout)??;
    let config = &shared.config;
    let hello = ProxyToController::Hello(ProxyHello {
        protocol_version: PROTOCOL_VERSION,
        name: config.name.clone(),
        cluster: config.cluster.clone(),
        plane_version: plane_types::PLANE_VERSION.to_owned(),
        plane_hash: plane_types::PLANE_HASH.to_owned(),
    });
    send(&mut ws, &hello).await?;
    let controller = tokio::time::timeout(HANDSHAKE_TIMEOUT, await_welcome(&mut ws))
        .await
        .map_err(|_| SessionError::HandshakeTimeout)??;
    *welcomed = true;
    info!(%controller, proxy = %config.name, cluster = %config.cluster, "connected to controller");

    let (outbox, mut outgoing) = mpsc::unbounded_channel();
    shared.issuance.connected(outbox.clone());
    shared.routes.connected(outbox);
    shared.connected.send_replace(true);

    let mut keepalive = tokio::time::interval(config.keepalive_interval);
    keepalive.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut ping = tokio::time::interval_at(Instant::now() + PING_INTERVAL, PING_INTERVAL);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_frame = Instant::now();

    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = ws.close(None).await;
                return Ok(());
            }
            Some(msg) = outgoing.recv() => send(&mut ws, &msg).await?,
            _ = keepalive.tick() => {
                let backends = shared.activity.take_active();
                if !backends.is_empty() {
                    send(&mut ws, &ProxyToController::Keepalive { backends }).await?;
                }
            }
            _ = ping.tick() => {
                if last_frame.elapsed() >= DEAD_AFTER {
                    return Err(SessionError::Silent(last_frame.elapsed()));
                }
                ws.send(Message::Ping(Default::default())).await?;
            }
            frame = ws.next() => {
                let frame = match frame {
                    None => return Ok(()),
                    Some(frame) => frame?,
                };
                last_frame = Instant::now();
                match frame {
                    Message::Text(text) => match serde_json::from_str::<ControllerToProxy>(text.as_str()) {
                        Ok(msg) => handle_message(shared, msg)?,
                        Err(err) => warn!(%err, frame = %truncate(text.as_str()), "unparseable frame from controller; skipped"),
                    },
                    Message::Close(_) => return Ok(()),
                    Message::Binary(_) => warn!("binary frame from controller; skipped"),
                    Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
                }
            }
        }
    }
}

/// Reads frames until `Welcome` (returning the controller's name) or `Reject`.
async fn await_welcome(ws: &mut Socket) -> Result<String, SessionError> {
    while let Some(frame) = ws.next().await {
        match frame? {
            Message::Text(text) => match serde_json::from_str::<ControllerToProxy>(text.as_str()) {
                Ok(ControllerToProxy::Welcome {
                    protocol_version,
                    controller,
                }) => {
                    if protocol_version != PROTOCOL_VERSION {
                        return Err(SessionError::WrongVersion(protocol_version));
                    }
                    return Ok(controller.to_string());
                }
                Ok(ControllerToProxy::Reject { message }) => return Err(SessionError::Rejected(message)),
                Ok(other) => warn!(message = ?other, "message before Welcome; skipped"),
                Err(err) => warn!(%err, frame = %truncate(text.as_str()), "unparseable frame from controller; skipped"),
            },
            Message::Close(_) => return Err(SessionError::ClosedInHandshake),
            _ => {}
        }
    }
    Err(SessionError::ClosedInHandshake)
}

fn handle_message(shared: &Shared, msg: ControllerToProxy) -> Result<(), SessionError> {
    match msg {
        ControllerToProxy::Route { token, result } => shared.routes.handle_route(token, result),
        ControllerToProxy::BackendRemoved { backend_id } => shared.routes.remove_backend(&backend_id),
        ControllerToProxy::TokenRevoked { token } => shared.routes.remove_token(&token),
        ControllerToProxy::ResetRoutes => shared.routes.clear(),
        ControllerToProxy::IssuanceReply { request_id, ok, error } => {
            shared.issuance.handle_reply(request_id, ok, error)
        }
        ControllerToProxy::Reject { message } => return Err(SessionError::Rejected(message)),
        ControllerToProxy::Welcome { .. } => warn!("repeated Welcome from controller; ignored"),
    }
    Ok(())
}

async fn send(ws: &mut Socket, msg: &ProxyToController) -> Result<(), SessionError> {
    // Serializing these types cannot fail (no maps with non-string keys).
    let text = serde_json::to_string(msg).unwrap_or_default();
    ws.send(Message::text(text)).await?;
    Ok(())
}

/// At most 200 bytes of a frame, for logs.
fn truncate(s: &str) -> &str {
    let mut end = s.len().min(200);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::tests::{eventually, route};
    use crate::routes::Lookup;
    use crate::ProxyConfig;
    use plane_types::protocol::RouteResult;
    use tokio::net::TcpListener;
    use tokio_tungstenite::accept_async;

    #[test]
    fn backoff_bounds() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(5));
        let mut b = Backoff::new(min, max);
        let mut bases = Vec::new();
        for _ in 0..50 {
            bases.push(b.base());
            let d = b.next_delay();
            assert!(d >= min && d <= max, "{d:?}");
        }
        assert_eq!(bases[0], min);
        assert_eq!(bases[1], min * 2);
        assert!(bases.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(*bases.last().unwrap(), max);
        b.reset();
        assert_eq!(b.base(), min);
        assert!(b.next_delay() <= min * 2);
        // Degenerate configuration: max below min is treated as min.
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_millis(1));
        assert_eq!(b.next_delay(), Duration::from_secs(1));
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        let s = "é".repeat(150);
        assert!(truncate(&s).len() <= 200);
        assert_eq!(truncate("short"), "short");
    }

    async fn recv(ws: &mut WebSocketStream<TcpStream>) -> ProxyToController {
        loop {
            match ws.next().await.expect("socket open").expect("frame") {
                Message::Text(t) => return serde_json::from_str(t.as_str()).expect("valid message"),
                _ => continue,
            }
        }
    }

    async fn send_to_proxy(ws: &mut WebSocketStream<TcpStream>, msg: &ControllerToProxy) {
        ws.send(Message::text(serde_json::to_string(msg).unwrap()))
            .await
            .unwrap();
    }

    /// The handshake, route answers, invalidations, keepalives and reconnection, against a
    /// minimal WebSocket endpoint standing in for the controller.
    #[tokio::test]
    async fn session_lifecycle() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let mut config = ProxyConfig::new(url.clone(), "localhost:9090".parse().unwrap());
        config.keepalive_interval = Duration::from_millis(20);
        config.reconnect_min = Duration::from_millis(10);
        config.reconnect_max = Duration::from_millis(50);
        let name = config.name.clone();
        let shared = Arc::new(Shared::new(config));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(maintain(
            shared.clone(),
            crate::config::socket_urls(&url).unwrap(),
            shutdown.clone(),
        ));

        // A lookup made before the socket is up is sent after the Welcome.
        let early = {
            let shared = shared.clone();
            tokio::spawn(async move { shared.routes.lookup("tok1", Duration::from_secs(10)).await })
        };

        let (tcp, _) = listener.accept().await.unwrap();
        let mut ws = accept_async(tcp).await.unwrap();
        match recv(&mut ws).await {
            ProxyToController::Hello(h) => {
                assert_eq!(h.protocol_version, PROTOCOL_VERSION);
                assert_eq!(h.name, name);
                assert_eq!(h.cluster.as_str(), "localhost:9090");
                assert_eq!(h.plane_version, plane_types::PLANE_VERSION);
            }
            other => panic!("expected Hello, got {other:?}"),
        }
        assert!(!*shared.connected.borrow());
        ws.send(Message::text("not json")).await.unwrap();
        ws.send(Message::text(r#"{"Nope":1}"#)).await.unwrap();
        send_to_proxy(
            &mut ws,
            &ControllerToProxy::Welcome {
                protocol_version: PROTOCOL_VERSION,
                controller: "co-1".parse().unwrap(),
            },
        )
        .await;
        assert_eq!(
            recv(&mut ws).await,
            ProxyToController::RouteRequest { token: "tok1".into() }
        );
        assert!(*shared.connected.borrow());
        ws.send(Message::text("{garbage")).await.unwrap();
        send_to_proxy(
            &mut ws,
            &ControllerToProxy::Route {
                token: "tok1".into(),
                result: RouteResult::Ready(route("b1", 1)),
            },
        )
        .await;
        assert!(matches!(early.await.unwrap(), Lookup::Ready(_)));

        // Activity is reported in a keepalive.
        drop(
            shared
                .activity
                .open(&"b1".parse().unwrap(), crate::activity::ConnectionKind::InFlight),
        );
        assert_eq!(
            recv(&mut ws).await,
            ProxyToController::Keepalive {
                backends: vec!["b1".parse().unwrap()]
            }
        );

        send_to_proxy(
            &mut ws,
            &ControllerToProxy::BackendRemoved {
                backend_id: "b1".parse().unwrap(),
            },
        )
        .await;
        eventually("route evicted", || shared.routes.cached("tok1").is_none()).await;

        // The socket drops: readiness goes down, the proxy reconnects and says Hello again.
        send_to_proxy(
            &mut ws,
            &ControllerToProxy::Route {
                token: "tok2".into(),
                result: RouteResult::Ready(route("b2", 2)),
            },
        )
        .await;
        eventually("tok2 cached", || shared.routes.cached("tok2").is_some()).await;
        drop(ws);
        let mut ready = shared.connected.subscribe();
        tokio::time::timeout(Duration::from_secs(10), ready.wait_for(|up| !*up))
            .await
            .unwrap()
            .unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        let mut ws = accept_async(tcp).await.unwrap();
        assert!(matches!(recv(&mut ws).await, ProxyToController::Hello(_)));
        // A rejection keeps the proxy retrying.
        send_to_proxy(&mut ws, &ControllerToProxy::Reject { message: "no".into() }).await;
        let (tcp, _) = listener.accept().await.unwrap();
        let mut ws = accept_async(tcp).await.unwrap();
        assert!(matches!(recv(&mut ws).await, ProxyToController::Hello(_)));
        send_to_proxy(
            &mut ws,
            &ControllerToProxy::Welcome {
                protocol_version: PROTOCOL_VERSION,
                controller: "co-2".parse().unwrap(),
            },
        )
        .await;
        tokio::time::timeout(Duration::from_secs(10), ready.wait_for(|up| *up))
            .await
            .unwrap()
            .unwrap();
        assert!(shared.routes.cached("tok2").is_none(), "cache cleared on reconnect");

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap()
            .unwrap();
        assert!(!*shared.connected.borrow());
    }
}
