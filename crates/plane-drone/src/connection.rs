//! The drone's WebSocket connection to the controller: handshake, heartbeats, the
//! outbox (re-sending events until acked) and reconnection with backoff.
//!
//! One task owns the socket. Per connection:
//! 1. connect, send `Hello`, wait for `Welcome` (a `Reject` ends [`crate::run`] with an
//!    error: retrying cannot help);
//! 2. send every unacked event from the state store, in `event_id` order;
//! 3. then, until the socket fails: forward new events and renewals from backend
//!    tasks, heartbeat every `heartbeat_interval` (re-sending events unacked for that
//!    long), and hand controller messages to [`Drone::handle`] (acks to the store).
//!
//! Connection failures are retried forever, with [`Backoff`] between attempts.

use crate::backend::Outgoing;
use crate::config::DroneTimings;
use crate::drone::Drone;
use crate::state::{now_ms, StateStore};
use futures_util::{SinkExt, StreamExt};
use plane_types::names::{ClusterName, DroneName};
use plane_types::protocol::{BackendEvent, ControllerToDrone, DroneHello, DroneToController, PROTOCOL_VERSION};
use rand::Rng;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

/// Limit on establishing the TCP/TLS/WebSocket connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Limit on waiting for `Welcome` after `Hello`.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Capped exponential backoff with jitter: the n-th delay is drawn from
/// `[max(min, b/2), b]` where `b = min(max, min · 2ⁿ)`.
#[derive(Clone, Debug)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Backoff {
        let min = min.max(Duration::from_millis(1));
        Backoff {
            min,
            max: max.max(min),
            attempt: 0,
        }
    }

    /// The next delay.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt).unwrap_or(u32::MAX);
        let base = self.min.saturating_mul(factor).min(self.max);
        self.attempt = self.attempt.saturating_add(1).min(31);
        let low = (base / 2).max(self.min);
        if low >= base {
            return base;
        }
        rand::thread_rng().gen_range(low..=base)
    }

    /// Back to the shortest delay (after a successful handshake).
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// Who the drone is, for `Hello`.
#[derive(Clone, Debug)]
pub(crate) struct Identity {
    pub name: DroneName,
    pub cluster: ClusterName,
    pub pool: String,
    /// The controller's `--ctrl-token`, if it has one.
    pub ctrl_token: Option<String>,
}

/// How a connection ended.
enum SessionEnd {
    Shutdown,
    Rejected(String),
    Lost { welcomed: bool, error: String },
}

/// Events sent on this connection and not yet acked.
#[derive(Default)]
struct Outbox {
    inflight: BTreeMap<u64, (BackendEvent, Instant)>,
    /// Events up to this id were loaded from the store when the connection started;
    /// their copies arriving from backend tasks are not sent again.
    floor: u64,
}

/// Runs connections until shutdown (Ok) or a handshake rejection (Err).
///
/// Each attempt goes to the next of `urls` (the controllers), so a drone whose
/// controller died moves to another one.
pub(crate) async fn run(
    urls: &[String],
    identity: &Identity,
    drone: &mut Drone,
    store: &StateStore,
    outgoing: &mut mpsc::UnboundedReceiver<Outgoing>,
    timings: &DroneTimings,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let mut backoff = Backoff::new(timings.reconnect_min, timings.reconnect_max);
    let mut rejected = 0;
    for attempt in 0usize.. {
        if shutdown.is_cancelled() {
            break;
        }
        let url = &urls[attempt % urls.len()];
        match session(url, identity, drone, store, outgoing, timings, shutdown).await {
            SessionEnd::Shutdown => return Ok(()),
            SessionEnd::Rejected(message) => {
                // One controller of several may be of another version (a rolling
                // upgrade): give up only when every one of them refused in a row.
                rejected += 1;
                if rejected >= urls.len() {
                    error!(%message, "the controller rejected this drone");
                    anyhow::bail!("the controller rejected this drone: {message}");
                }
                warn!(controller = %url, %message, "this controller rejected the drone; trying the next one");
            }
            SessionEnd::Lost { welcomed, error } => {
                rejected = 0;
                if welcomed {
                    backoff.reset();
                }
                warn!(controller = %url, %error, "connection to the controller lost");
            }
        }
        let delay = backoff.next_delay();
        debug!(?delay, "reconnecting after a delay");
        // Meanwhile, events pile up in the store, not in memory; renewals are pointless.
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = &mut sleep => break,
                _ = outgoing.recv() => {}
            }
        }
    }
    Ok(())
}

fn encode(message: &DroneToController) -> Result<Message, String> {
    serde_json::to_string(message)
        .map(|s| Message::Text(s.into()))
        .map_err(|e| format!("encoding a message: {e}"))
}

async fn send(ws: &mut Socket, message: &DroneToController) -> Result<(), String> {
    ws.send(encode(message)?).await.map_err(|e| format!("sending: {e}"))
}

/// Parses a frame; `None` for control frames and for frames that are not a message
/// (logged and skipped). `Err` when the socket is closed or failed.
fn parse_frame(
    frame: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
) -> Result<Option<ControllerToDrone>, String> {
    match frame {
        None => Err("the controller closed the connection".into()),
        Some(Err(e)) => Err(format!("receiving: {e}")),
        Some(Ok(Message::Close(frame))) => Err(format!("the controller closed the connection ({frame:?})")),
        Some(Ok(Message::Text(text))) => match serde_json::from_str::<ControllerToDrone>(text.as_str()) {
            Ok(message) => Ok(Some(message)),
            Err(err) => {
                let excerpt: String = text.as_str().chars().take(200).collect();
                warn!(%err, frame = %excerpt, "ignoring an unparseable message from the controller");
                Ok(None)
            }
        },
        Some(Ok(Message::Binary(bytes))) => {
            warn!(len = bytes.len(), "ignoring a binary frame from the controller");
            Ok(None)
        }
        Some(Ok(_)) => Ok(None),
    }
}

/// The WebSocket request to `url`, with the control-API bearer token if there is one.
fn socket_request(
    url: &str,
    ctrl_token: Option<&str>,
) -> Result<tokio_tungstenite::tungstenite::handshake::client::Request, String> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::http::header::AUTHORIZATION;
    let mut request = url.into_client_request().map_err(|e| e.to_string())?;
    if let Some(token) = ctrl_token {
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| "the control-API token is not a valid header value".to_owned())?;
        request.headers_mut().insert(AUTHORIZATION, value);
    }
    Ok(request)
}

async fn session(
    url: &str,
    identity: &Identity,
    drone: &mut Drone,
    store: &StateStore,
    outgoing: &mut mpsc::UnboundedReceiver<Outgoing>,
    timings: &DroneTimings,
    shutdown: &CancellationToken,
) -> SessionEnd {
    let lost = |welcomed: bool, error: String| SessionEnd::Lost { welcomed, error };
    let request = match socket_request(url, identity.ctrl_token.as_deref()) {
        Ok(r) => r,
        Err(e) => return lost(false, format!("connecting to {url}: {e}")),
    };
    let connect = tokio::time::timeout(CONNECT_TIMEOUT, tokio_tungstenite::connect_async(request));
    let mut ws = tokio::select! {
        _ = shutdown.cancelled() => return SessionEnd::Shutdown,
        r = connect => match r {
            Ok(Ok((ws, _response))) => ws,
            Ok(Err(e)) => return lost(false, format!("connecting to {url}: {e}")),
            Err(_) => return lost(false, format!("connecting to {url}: timed out")),
        },
    };
    let _ = match ws.get_ref() {
        MaybeTlsStream::Plain(tcp) => tcp.set_nodelay(true),
        _ => Ok(()),
    };

    let hello = DroneToController::Hello(DroneHello {
        protocol_version: PROTOCOL_VERSION,
        name: identity.name.clone(),
        cluster: identity.cluster.clone(),
        pool: identity.pool.clone(),
        runtimes: drone.runtime_kinds(),
        plane_version: plane_types::PLANE_VERSION.to_owned(),
        plane_hash: plane_types::PLANE_HASH.to_owned(),
        local_time: now_ms(),
    });
    if let Err(e) = send(&mut ws, &hello).await {
        return lost(false, e);
    }
    let handshake = async {
        loop {
            match parse_frame(ws.next().await) {
                Ok(Some(message)) => return Ok(message),
                Ok(None) => continue,
                Err(e) => return Err(e),
            }
        }
    };
    let first = tokio::select! {
        _ = shutdown.cancelled() => return SessionEnd::Shutdown,
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake) => match r {
            Ok(Ok(message)) => message,
            Ok(Err(e)) => return lost(false, e),
            Err(_) => return lost(false, "no answer to Hello".into()),
        },
    };
    match first {
        ControllerToDrone::Welcome {
            protocol_version,
            controller,
        } if protocol_version == PROTOCOL_VERSION => {
            info!(%controller, drone = %identity.name, "connected to the controller");
        }
        ControllerToDrone::Welcome { protocol_version, .. } => {
            return SessionEnd::Rejected(format!(
                "the controller speaks protocol version {protocol_version}, this drone {PROTOCOL_VERSION}"
            ))
        }
        ControllerToDrone::Reject { message } => return SessionEnd::Rejected(message),
        other => return lost(false, format!("expected Welcome, got {other:?}")),
    }

    // Everything recorded so far is in the store; take it from there, in order.
    while outgoing.try_recv().is_ok() {}
    let mut outbox = Outbox::default();
    let pending = match store.unacked_events().await {
        Ok(events) => events,
        Err(e) => return lost(true, format!("reading the outbox: {e}")),
    };
    if !pending.is_empty() {
        info!(count = pending.len(), "re-sending unacked events");
    }
    for event in pending {
        outbox.floor = outbox.floor.max(event.event_id);
        if let Err(e) = send(&mut ws, &DroneToController::Event(event.clone())).await {
            return lost(true, e);
        }
        outbox.inflight.insert(event.event_id, (event, Instant::now()));
    }

    let mut heartbeat =
        tokio::time::interval_at(Instant::now() + timings.heartbeat_interval, timings.heartbeat_interval);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
                return SessionEnd::Shutdown;
            }
            _ = heartbeat.tick() => {
                if let Err(e) = send(&mut ws, &DroneToController::Heartbeat { local_time: now_ms() }).await {
                    return lost(true, e);
                }
                let stale: Vec<BackendEvent> = outbox
                    .inflight
                    .values_mut()
                    .filter(|(_, sent)| sent.elapsed() >= timings.heartbeat_interval)
                    .map(|(event, sent)| {
                        *sent = Instant::now();
                        event.clone()
                    })
                    .collect();
                for event in stale {
                    debug!(event_id = event.event_id, "re-sending an unacked event");
                    if let Err(e) = send(&mut ws, &DroneToController::Event(event)).await {
                        return lost(true, e);
                    }
                }
            }
            item = outgoing.recv() => match item {
                Some(Outgoing::Event(event)) => {
                    if event.event_id <= outbox.floor || outbox.inflight.contains_key(&event.event_id) {
                        continue;
                    }
                    if let Err(e) = send(&mut ws, &DroneToController::Event(event.clone())).await {
                        return lost(true, e);
                    }
                    outbox.inflight.insert(event.event_id, (event, Instant::now()));
                }
                Some(Outgoing::Transient(message)) => {
                    if let Err(e) = send(&mut ws, &message).await {
                        return lost(true, e);
                    }
                }
                // The drone holds a sender for as long as this runs.
                None => return SessionEnd::Shutdown,
            },
            frame = ws.next() => match parse_frame(frame) {
                Err(e) => return lost(true, e),
                Ok(None) => {}
                Ok(Some(ControllerToDrone::Ack { event_id })) => {
                    outbox.inflight.remove(&event_id);
                    if let Err(err) = store.ack(event_id).await {
                        error!(event_id, %err, "could not remove an acked event from the outbox");
                    }
                }
                Ok(Some(message)) => drone.handle(message).await,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped_exponential_with_jitter() {
        let min = Duration::from_millis(100);
        let max = Duration::from_secs(5);
        for _ in 0..50 {
            let mut b = Backoff::new(min, max);
            let delays: Vec<Duration> = (0..20).map(|_| b.next_delay()).collect();
            for (n, d) in delays.iter().enumerate() {
                let base = (min * 2u32.pow(n.min(10) as u32)).min(max);
                assert!(*d >= min && *d <= max, "delay {n} = {d:?} out of [{min:?}, {max:?}]");
                assert!(
                    *d <= base && *d >= (base / 2).max(min),
                    "delay {n} = {d:?} not around {base:?}"
                );
            }
            assert!(delays[19] >= max / 2, "the backoff reaches the cap");
            b.reset();
            assert!(b.next_delay() == min);
        }
        // Jitter: not every draw at the cap is the same.
        let mut b = Backoff::new(min, max);
        let draws: std::collections::HashSet<Duration> = (0..40).map(|_| b.next_delay()).skip(10).collect();
        assert!(draws.len() > 1);
        // Degenerate settings do not panic.
        let mut b = Backoff::new(Duration::ZERO, Duration::ZERO);
        assert_eq!(b.next_delay(), Duration::from_millis(1));
        let mut b = Backoff::new(Duration::from_secs(10), Duration::from_secs(1));
        assert_eq!(b.next_delay(), Duration::from_secs(10));
    }
}
