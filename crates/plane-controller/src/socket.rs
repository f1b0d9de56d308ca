//! Plumbing shared by the drone and proxy sockets: reading text frames, the Hello
//! handshake with its protocol-version check, and the writer task that serialises
//! outgoing messages.

use crate::state::Controller;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use plane_types::protocol::PROTOCOL_VERSION;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// How long a new connection may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Upgrades to a WebSocket served by `run`, which stops when the controller shuts down.
pub(crate) fn upgrade<F, Fut>(ws: WebSocketUpgrade, c: Arc<Controller>, run: F) -> Response
where
    F: FnOnce(Arc<Controller>, WebSocket) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    ws.on_upgrade(move |socket| async move {
        let shutdown = c.shutdown.clone();
        tokio::select! {
            () = run(c, socket) => {}
            () = shutdown.cancelled() => {}
        }
    })
}

/// Serialises a message into a text frame.
fn encode<T: Serialize>(msg: &T) -> Option<Message> {
    serde_json::to_string(msg).ok().map(|s| Message::Text(s.into()))
}

/// Reads the next text frame; `None` when the socket closes.
pub(crate) async fn next_text(stream: &mut SplitStream<WebSocket>) -> Option<String> {
    while let Some(msg) = stream.next().await {
        match msg {
            Ok(Message::Text(t)) => return Some(t.to_string()),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => {}
        }
    }
    None
}

/// What a first message turned out to be.
pub(crate) enum First<H> {
    /// A Hello, with the protocol version it claims.
    Hello(H, u32),
    /// Some other message.
    Other,
}

/// Runs the handshake: reads the first message, which must be a Hello of our protocol
/// version. On failure, sends `reject(reason)`, closes the socket and returns `None`.
pub(crate) async fn handshake<In: DeserializeOwned, Out: Serialize, H>(
    sink: &mut SplitSink<WebSocket, Message>,
    stream: &mut SplitStream<WebSocket>,
    what: &str,
    classify: impl FnOnce(In) -> First<H>,
    reject: impl FnOnce(String) -> Out,
) -> Option<H> {
    let text = tokio::time::timeout(HELLO_TIMEOUT, next_text(stream))
        .await
        .ok()
        .flatten()?;
    let message = match serde_json::from_str::<In>(&text).map(classify) {
        Ok(First::Hello(h, PROTOCOL_VERSION)) => return Some(h),
        Ok(First::Hello(_, v)) => {
            format!("protocol version {v} is not supported; this controller speaks {PROTOCOL_VERSION}")
        }
        Ok(First::Other) => "the first message must be Hello".to_owned(),
        Err(e) => format!("invalid Hello: {e}"),
    };
    tracing::warn!(%message, "rejecting {what}");
    if let Some(m) = encode(&reject(message)) {
        let _ = sink.send(m).await;
    }
    let _ = sink.close().await;
    None
}

/// Sends one message directly (before the writer task exists). False if the socket failed.
pub(crate) async fn send<T: Serialize>(sink: &mut SplitSink<WebSocket, Message>, msg: &T) -> bool {
    match encode(msg) {
        Some(m) => sink.send(m).await.is_ok(),
        None => false,
    }
}

/// Spawns the task that writes every message from `rx` to the socket, in order.
pub(crate) fn spawn_writer<T: Serialize + Send + 'static>(
    mut sink: SplitSink<WebSocket, Message>,
    mut rx: mpsc::UnboundedReceiver<T>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            let Some(m) = encode(&msg) else { continue };
            if sink.send(m).await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    })
}
