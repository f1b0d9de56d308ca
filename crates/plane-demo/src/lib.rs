//! The demo backend: a small multiplayer session backend bundled with Plane, run as
//! `plane demo-backend` or as the standalone `plane-demo-backend` binary (`src/main.rs`),
//! which is what the Docker test image (`plane-test-image`) holds.
//!
//! It serves one page (`index.html`) with a shared counter and a chat that every
//! connected browser sees change live, plus a table of what Plane passed to the backend
//! (the `SESSION_BACKEND_*` variables and the `x-verified-username` header).
//!
//! # Routes
//!
//! Each route is also served under one leading path segment, `/<prefix>/…`, because a
//! static token stays in the forwarded path.
//! * `GET /` — the page;
//! * `GET /ws` — the WebSocket; clients send `{"op":"inc"}`, `{"op":"dec"}` or
//!   `{"op":"chat","text":"…"}` and receive the full state
//!   `{"counter":n,"messages":[…last 50],"clients":n}` on join and after every change;
//! * `GET /state` — that state as JSON;
//! * `GET /env` — the whole environment of the process, as read at start-up, as a JSON
//!   object of strings (variables that are not valid UTF-8 are left out): what Plane and
//!   the executable's `env` set, such as `PORT` and `SESSION_BACKEND_*`;
//! * `/debug/request` (any method) — echoes what arrived: `{"method", "path"` (with the
//!   query, as received), `"headers"}` — so tests can see what the proxy forwarded;
//! * `POST /debug/exit?code=N` — exits the process at once with code N (0..=255,
//!   default 0; the request gets no answer), so tests can make a backend stop by
//!   itself: the client sees the connection drop only after the process is gone;
//! * `GET /debug/limits` — the limits the process runs under, read from its own cgroup
//!   files, `getrlimit` and `/proc/self/status` (see [`Limits`] for the JSON shape);
//! * `POST /debug/file?path=/abs/path` — writes the request body (at most
//!   [`MAX_FILE_BYTES`]) to that file, creating its parent directories; answers
//!   `{"ok":true}`, or 500 `{"error":"<I/O error text>"}` (a read-only filesystem, a full
//!   disk, no permission…), or 400 `{"error":…}` for a missing or relative path;
//! * `GET /debug/file?path=/abs/path` — the file's content (`application/octet-stream`), or
//!   404 `{"error":…}` if it does not exist, 500 `{"error":…}` for other I/O errors;
//! * `GET /debug/signals` — the signals received so far, oldest first, as a JSON list of
//!   [`ReceivedSignal`]: `[{"signal":"SIGTERM","unix_ms":…,"ignored":false}, …]`.
//!
//! `/env` and the debug routes let anyone who can reach the backend read its environment,
//! stop it, or read and write its files: it is a demo and a test fixture, not an app to
//! expose as is.
//!
//! # Environment
//!
//! * `PORT` — the port to listen on, on `0.0.0.0` (default 8080);
//! * `SESSION_BACKEND_ID`, `SESSION_BACKEND_KEY`, `SESSION_BACKEND_FENCING_TOKEN`,
//!   `SESSION_BACKEND_STATIC_TOKEN` — set by Plane; shown on the page (and by `/env`, like
//!   every other variable);
//! * `DEMO_SIGTERM_FILE` — if set, every SIGTERM first appends `SIGTERM <unix ms>\n` to
//!   this file and fsyncs it, so a test can tell a graceful stop from a SIGKILL even
//!   after the process (or its container) is gone;
//! * `DEMO_LIFECYCLE_DIR` — if set, the backend holds an exclusive lock on its key's file
//!   under this directory while it lives and logs its start and stop there, with its
//!   fencing token (see [`lifecycle`]): the fault-injection suite's witness;
//! * `DEMO_IGNORE_SIGTERM=1` — record SIGTERM (file, stdout, `/debug/signals`) and keep
//!   running, so the orchestrator has to SIGKILL the backend after its grace period;
//! * `RUST_LOG` — the log level of the standalone binary (`error` … `trace`, default
//!   `info`); under `plane demo-backend` the `plane` binary's logging applies.
//!
//! # Stopping
//!
//! It binds and serves at once: it is on the cold-start path. SIGTERM (unless ignored)
//! or SIGINT closes the WebSockets and exits 0 within [`SHUTDOWN_GRACE`]. Each signal
//! also prints one line to stdout.
//!
//! # Layout
//!
//! * this file: the room (counter, chat, clients), the router, serving and shutdown;
//! * `debug.rs`: the `/debug/*` handlers;
//! * `limits.rs`: reading cgroup v1/v2 limits, `RLIMIT_CPU` and `NoNewPrivs`;
//! * `signals.rs`: SIGTERM/SIGINT handling and the log behind `/debug/signals`.
//!
//! Linux only: it reads `/proc` and `/sys/fs/cgroup`.

mod debug;
pub mod lifecycle;
mod limits;
mod signals;

pub use debug::MAX_FILE_BYTES;
pub use limits::{CgroupVersion, Limits};
pub use signals::ReceivedSignal;

use anyhow::Context as _;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::HeaderMap;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use signals::{SignalConfig, SignalLog};
use std::collections::{BTreeMap, VecDeque};
use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The page, with `{{NAME}}` placeholders.
const INDEX_HTML: &str = include_str!("index.html");
/// The environment variables Plane sets for a backend, shown on the page.
pub const SESSION_ENV_VARS: [&str; 4] = [
    "SESSION_BACKEND_ID",
    "SESSION_BACKEND_KEY",
    "SESSION_BACKEND_FENCING_TOKEN",
    "SESSION_BACKEND_STATIC_TOKEN",
];
/// The header carrying the user a connection token was issued to.
const USERNAME_HEADER: &str = "x-verified-username";
/// Longest chat message kept, in characters; longer ones are cut.
pub const MAX_CHAT_CHARS: usize = 500;
/// How many chat messages are kept and sent.
pub const MAX_MESSAGES: usize = 50;
/// Largest WebSocket message accepted from a client; a larger one closes the socket.
const MAX_WS_MESSAGE_BYTES: usize = 16 * 1024;
/// How many state updates a slow client may fall behind (it then skips to newer ones).
const UPDATE_QUEUE: usize = 64;
/// How long shutdown waits for open connections before giving up on them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// One chat message.
#[derive(Clone, Debug, Serialize)]
struct ChatMessage {
    /// `x-verified-username` of the sender, or a guest name.
    user: String,
    /// The text, at most [`MAX_CHAT_CHARS`] characters.
    text: String,
    /// When the server received it, in milliseconds since the epoch.
    time: u64,
}

/// The shared state every client sees.
#[derive(Debug, Default, Serialize)]
struct Room {
    counter: i64,
    messages: VecDeque<ChatMessage>,
    clients: usize,
}

/// What a client may send over the WebSocket.
#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum ClientOp {
    Inc,
    Dec,
    Chat { text: String },
}

/// Everything the handlers share.
struct AppState {
    room: Mutex<Room>,
    /// Carries the serialized [`Room`] after every change. Sent while the room lock is
    /// held, so every client sees the updates in the order they happened.
    updates: broadcast::Sender<Utf8Bytes>,
    /// The process environment, read once at start-up (tests pass their own).
    env: BTreeMap<String, String>,
    /// The signals received so far, for `/debug/signals`.
    signals: SignalLog,
    /// Cancelled when the server shuts down; WebSocket sessions then close.
    shutdown: CancellationToken,
    /// Tracks the WebSocket sessions, so shutdown can wait for them to close.
    sessions: TaskTracker,
    /// Numbers guests (clients without `x-verified-username`).
    next_guest: AtomicU64,
    /// What `POST /debug/exit` does with the code: [`exit_process`] outside tests.
    exit: ExitHook,
}

/// Called by `POST /debug/exit` with the requested exit code.
type ExitHook = Arc<dyn Fn(i32) + Send + Sync>;

/// Exits the process with `code` at once.
fn exit_process(code: i32) -> ! {
    tracing::info!(code, "exiting as asked through /debug/exit");
    std::process::exit(code)
}

impl AppState {
    fn new(env: BTreeMap<String, String>, signals: SignalLog, exit: ExitHook) -> Arc<AppState> {
        Arc::new(AppState {
            room: Mutex::new(Room::default()),
            updates: broadcast::channel(UPDATE_QUEUE).0,
            env,
            signals,
            shutdown: CancellationToken::new(),
            sessions: TaskTracker::new(),
            next_guest: AtomicU64::new(1),
            exit,
        })
    }

    fn room(&self) -> MutexGuard<'_, Room> {
        // A panic while holding the lock cannot leave the room inconsistent in a way
        // that matters for a demo; keep serving.
        self.room.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Applies `change` to the room and broadcasts the new state if it returns true.
    fn update(&self, change: impl FnOnce(&mut Room) -> bool) {
        let mut room = self.room();
        if change(&mut room) {
            // No receivers is fine: nobody is connected.
            let _ = self.updates.send(room_json(&room).into());
        }
    }

    /// Registers a new client; the returned receiver's first message is the full state.
    fn join(&self) -> broadcast::Receiver<Utf8Bytes> {
        let mut room = self.room();
        let receiver = self.updates.subscribe();
        room.clients += 1;
        let _ = self.updates.send(room_json(&room).into());
        receiver
    }

    fn leave(&self) {
        self.update(|room| {
            room.clients = room.clients.saturating_sub(1);
            true
        });
    }

    /// Applies one WebSocket message from `user`. Bad messages are ignored.
    fn apply(&self, text: &str, user: &str) {
        let op = match serde_json::from_str::<ClientOp>(text) {
            Ok(op) => op,
            Err(err) => {
                tracing::debug!(%user, %err, "ignoring a bad client message");
                return;
            }
        };
        match op {
            ClientOp::Inc => self.update(|room| {
                room.counter = room.counter.saturating_add(1);
                true
            }),
            ClientOp::Dec => self.update(|room| {
                room.counter = room.counter.saturating_sub(1);
                true
            }),
            ClientOp::Chat { text } => {
                let Some(text) = clean_chat_text(&text) else {
                    return;
                };
                let message = ChatMessage {
                    user: user.to_owned(),
                    text,
                    time: now_millis(),
                };
                self.update(|room| {
                    if room.messages.len() == MAX_MESSAGES {
                        room.messages.pop_front();
                    }
                    room.messages.push_back(message);
                    true
                });
            }
        }
    }
}

/// Removes surrounding whitespace and cuts to [`MAX_CHAT_CHARS`]; `None` if nothing is left.
fn clean_chat_text(text: &str) -> Option<String> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    Some(text.chars().take(MAX_CHAT_CHARS).collect())
}

fn room_json(room: &Room) -> String {
    serde_json::to_string(room).unwrap_or_else(|_| "{}".to_owned())
}

pub(crate) fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The environment of this process, leaving out what is not valid UTF-8: what `/env` shows.
pub fn env_from_process() -> BTreeMap<String, String> {
    std::env::vars_os()
        .filter_map(|(name, value)| Some((name.into_string().ok()?, value.into_string().ok()?)))
        .collect()
}

/// The demo's routes over `state`.
fn app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/ws", get(websocket))
        .route("/state", get(state_json))
        .route("/env", get(env_json))
        .route("/{prefix}/", get(index))
        .route("/{prefix}/ws", get(websocket))
        .route("/{prefix}/state", get(state_json))
        .route("/{prefix}/env", get(env_json))
        .route("/debug/request", any(debug::request))
        .route("/{prefix}/debug/request", any(debug::request))
        .route("/debug/exit", post(debug::exit))
        .route("/{prefix}/debug/exit", post(debug::exit))
        .route("/debug/limits", get(debug::limits))
        .route("/{prefix}/debug/limits", get(debug::limits))
        .route("/debug/signals", get(debug::signals))
        .route("/{prefix}/debug/signals", get(debug::signals))
        .route("/debug/file", file_routes())
        .route("/{prefix}/debug/file", file_routes())
        .with_state(state)
}

/// `GET` and `POST /debug/file`, with room for larger bodies than axum's default 2 MiB.
fn file_routes() -> axum::routing::MethodRouter<Arc<AppState>> {
    get(debug::read_file)
        .post(debug::write_file)
        .layer(DefaultBodyLimit::max(MAX_FILE_BYTES))
}

/// Serves the demo on `listener` until `shutdown` resolves, then closes the
/// WebSockets and returns within [`SHUTDOWN_GRACE`]. `env` stands for the environment:
/// `/env` shows it and the page reads the `SESSION_BACKEND_*` variables from it. No
/// signal handling: `/debug/signals` stays empty (that is [`run`]'s part).
pub async fn serve(
    listener: TcpListener,
    env: BTreeMap<String, String>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let exit: ExitHook = Arc::new(|code| exit_process(code));
    serve_state(listener, AppState::new(env, SignalLog::default(), exit), shutdown).await
}

async fn serve_state(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let stop = state.shutdown.clone();
    // Broadcasts are small frames: send them at once rather than under Nagle.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp: &mut tokio::net::TcpStream| {
        let _ = tcp.set_nodelay(true);
    });
    let server = axum::serve(listener, app(state.clone()))
        .with_graceful_shutdown(stop.clone().cancelled_owned())
        .into_future();
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => return result,
        () = shutdown => stop.cancel(),
    }
    tracing::info!("shutting down: closing connections");
    state.sessions.close();
    let drained = async {
        let result = server.await;
        state.sessions.wait().await;
        result
    };
    match tokio::time::timeout(SHUTDOWN_GRACE, drained).await {
        Ok(result) => result,
        Err(_) => {
            tracing::warn!(grace = ?SHUTDOWN_GRACE, "connections still open after the grace period; stopping anyway");
            Ok(())
        }
    }
}

/// Runs the demo backend as configured by the process environment (see the crate docs)
/// until SIGTERM (unless `DEMO_IGNORE_SIGTERM=1`) or SIGINT: `plane demo-backend` and
/// `plane-demo-backend`. Logs through `tracing`; the caller installs the subscriber.
pub async fn run() -> anyhow::Result<()> {
    let port: u16 = match std::env::var("PORT") {
        Ok(p) => p
            .trim()
            .parse()
            .with_context(|| format!("PORT={p:?} is not a port number"))?,
        Err(std::env::VarError::NotPresent) => 8080,
        Err(err) => return Err(err).context("cannot read PORT"),
    };
    // Install the signal handlers before accepting traffic, so an early SIGTERM is
    // still recorded and a graceful stop.
    let lifecycle = lifecycle::Lifecycle::start_from_env().context("DEMO_LIFECYCLE_DIR")?;
    let signal_log = SignalLog::default();
    let shutdown = signals::watch(SignalConfig::from_process(), signal_log.clone())?;
    let addr = SocketAddr::from(([0, 0, 0, 0], port));
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let addr = listener.local_addr().unwrap_or(addr);
    let env = env_from_process();
    tracing::info!(%addr, backend_id = env.get("SESSION_BACKEND_ID").map(String::as_str), "demo backend listening");
    let exit: ExitHook = Arc::new(|code| exit_process(code));
    serve_state(listener, AppState::new(env, signal_log, exit), shutdown)
        .await
        .context("demo backend server failed")?;
    if let Some(l) = lifecycle {
        l.stop();
    }
    tracing::info!("demo backend stopped");
    Ok(())
}

async fn index(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Html<String> {
    let username = headers.get(USERNAME_HEADER).and_then(|v| v.to_str().ok());
    Html(render_page(INDEX_HTML, &state.env, username))
}

async fn state_json(State(state): State<Arc<AppState>>) -> Response {
    let body = room_json(&state.room());
    ([(axum::http::header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn env_json(State(state): State<Arc<AppState>>) -> Json<BTreeMap<String, String>> {
    Json(state.env.clone())
}

async fn websocket(State(state): State<Arc<AppState>>, headers: HeaderMap, upgrade: WebSocketUpgrade) -> Response {
    let user = match headers.get(USERNAME_HEADER).and_then(|v| v.to_str().ok()) {
        Some(name) if !name.trim().is_empty() => name.trim().chars().take(64).collect(),
        _ => format!("guest-{}", state.next_guest.fetch_add(1, Ordering::Relaxed)),
    };
    upgrade
        .max_message_size(MAX_WS_MESSAGE_BYTES)
        .max_frame_size(MAX_WS_MESSAGE_BYTES)
        .on_upgrade(move |socket| client_session(state, socket, user))
}

/// Removes a client from the room when its session ends, however it ends.
struct Presence(Arc<AppState>);

impl Drop for Presence {
    fn drop(&mut self) {
        self.0.leave();
    }
}

/// One WebSocket client: forwards state updates to it and applies what it sends.
async fn client_session(state: Arc<AppState>, mut socket: WebSocket, user: String) {
    let _tracked = state.sessions.token();
    let mut updates = state.join();
    let _presence = Presence(state.clone());
    tracing::debug!(%user, "client joined");
    loop {
        tokio::select! {
            biased;
            () = state.shutdown.cancelled() => {
                let close = Message::Close(Some(CloseFrame { code: 1001, reason: "server shutting down".into() }));
                let _ = tokio::time::timeout(Duration::from_secs(1), socket.send(close)).await;
                break;
            }
            update = updates.recv() => match update {
                Ok(json) => {
                    if socket.send(Message::Text(json)).await.is_err() {
                        break;
                    }
                }
                // Every update is the full state, so skipping some loses nothing.
                Err(broadcast::error::RecvError::Lagged(skipped)) => {
                    tracing::debug!(%user, skipped, "slow client skipped updates");
                }
                Err(broadcast::error::RecvError::Closed) => break,
            },
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Text(text))) => state.apply(text.as_str(), &user),
                Some(Ok(Message::Close(_))) | None => break,
                Some(Err(err)) => {
                    tracing::debug!(%user, %err, "client socket failed");
                    break;
                }
                // Pings are answered by the socket itself; binary messages are ignored.
                Some(Ok(_)) => {}
            },
        }
    }
    tracing::debug!(%user, "client left");
}

/// Fills the `{{NAME}}` placeholders of `template` in one pass: the session variables
/// and `x-verified-username`, HTML-escaped, or a "not set" marker. Unknown
/// placeholders are kept as they are.
fn render_page(template: &str, env: &BTreeMap<String, String>, username: Option<&str>) -> String {
    const NOT_SET: &str = r#"<span class="unset">not set</span>"#;
    let value_of = |name: &str| -> Option<String> {
        let value = if name == USERNAME_HEADER {
            username
        } else if SESSION_ENV_VARS.contains(&name) {
            env.get(name).map(String::as_str)
        } else {
            return None;
        };
        Some(value.map_or_else(|| NOT_SET.to_owned(), html_escape))
    };
    let mut out = String::with_capacity(template.len() + 256);
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find("}}").and_then(|end| Some((end, value_of(&after[..end])?))) {
            Some((end, value)) => {
                out.push_str(&value);
                rest = &after[end + 2..];
            }
            None => {
                out.push_str("{{");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use serde_json::{json, Value};
    use tokio::net::TcpStream;
    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;
    use tokio_tungstenite::tungstenite;
    use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

    type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

    /// How long a test waits for something that should happen at once.
    const WAIT: Duration = Duration::from_secs(10);

    struct Demo {
        addr: SocketAddr,
        stop: Option<oneshot::Sender<()>>,
        server: JoinHandle<std::io::Result<()>>,
        /// Codes asked for through `/debug/exit` (the test server does not exit).
        exits: tokio::sync::mpsc::UnboundedReceiver<i32>,
    }

    impl Demo {
        async fn start() -> Demo {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let env = BTreeMap::from([
                ("SESSION_BACKEND_ID".to_owned(), "bk-test-1".to_owned()),
                ("SESSION_BACKEND_KEY".to_owned(), "room-<1>".to_owned()),
                ("SESSION_BACKEND_FENCING_TOKEN".to_owned(), "42".to_owned()),
            ]);
            let (stop, stopped) = oneshot::channel::<()>();
            let (exit_tx, exits) = tokio::sync::mpsc::unbounded_channel();
            let state = AppState::new(
                env,
                SignalLog::default(),
                Arc::new(move |code| {
                    let _ = exit_tx.send(code);
                }),
            );
            let server = tokio::spawn(serve_state(listener, state, async move {
                let _ = stopped.await;
            }));
            Demo {
                addr,
                stop: Some(stop),
                server,
                exits,
            }
        }

        fn url(&self, path: &str) -> String {
            format!("http://{}{path}", self.addr)
        }

        async fn client(&self, path: &str) -> Client {
            let url = format!("ws://{}{path}", self.addr);
            let (socket, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
                .await
                .expect("websocket connect timed out")
                .expect("websocket connect failed");
            socket
        }
    }

    /// Reads states from `client` until one satisfies `done`, and returns it.
    async fn wait_for(client: &mut Client, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let read = async {
            loop {
                let message = client.next().await.expect("socket ended").expect("socket failed");
                if let tungstenite::Message::Text(text) = message {
                    let state: Value = serde_json::from_str(text.as_str()).expect("state is JSON");
                    if done(&state) {
                        return state;
                    }
                }
            }
        };
        tokio::time::timeout(WAIT, read)
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
    }

    async fn send(client: &mut Client, message: Value) {
        client
            .send(tungstenite::Message::Text(message.to_string().into()))
            .await
            .unwrap();
    }

    fn has_message(state: &Value, text: &str) -> bool {
        state["messages"].as_array().unwrap().iter().any(|m| m["text"] == text)
    }

    #[tokio::test]
    async fn two_clients_share_counter_and_chat() {
        let demo = Demo::start().await;
        let mut a = demo.client("/ws").await;
        let first = wait_for(&mut a, "the state on join", |_| true).await;
        assert_eq!(first, json!({"counter": 0, "messages": [], "clients": 1}));
        let mut b = demo.client("/ws").await;
        wait_for(&mut a, "a to see b join", |s| s["clients"] == 2).await;
        wait_for(&mut b, "b's state on join", |s| s["clients"] == 2).await;

        send(&mut a, json!({"op": "inc"})).await;
        wait_for(&mut a, "a to see counter 1", |s| s["counter"] == 1).await;
        wait_for(&mut b, "b to see counter 1", |s| s["counter"] == 1).await;

        send(&mut b, json!({"op": "chat", "text": "hello from b"})).await;
        let state = wait_for(&mut a, "a to see b's chat", |s| has_message(s, "hello from b")).await;
        assert!(state["messages"][0]["user"].as_str().unwrap().starts_with("guest-"));
        wait_for(&mut b, "b to see its own chat", |s| has_message(s, "hello from b")).await;

        send(&mut b, json!({"op": "dec"})).await;
        send(&mut b, json!({"op": "dec"})).await;
        wait_for(&mut a, "a to see counter -1", |s| s["counter"] == -1).await;

        let state: Value = reqwest::get(demo.url("/state")).await.unwrap().json().await.unwrap();
        assert_eq!(
            (state["counter"].clone(), state["clients"].clone()),
            (json!(-1), json!(2))
        );

        b.close(None).await.unwrap();
        wait_for(&mut a, "a to see b leave", |s| s["clients"] == 1).await;
    }

    #[tokio::test]
    async fn bad_and_oversized_messages() {
        let demo = Demo::start().await;
        let mut a = demo.client("/ws").await;
        wait_for(&mut a, "the state on join", |_| true).await;
        for bad in [
            "not json",
            r#"{"op":"explode"}"#,
            r#"{"op":"chat"}"#,
            r#"{"op":"chat","text":"   "}"#,
            "[]",
        ] {
            a.send(tungstenite::Message::Text(bad.into())).await.unwrap();
        }
        a.send(tungstenite::Message::Binary(vec![1, 2, 3].into()))
            .await
            .unwrap();
        let long = "x".repeat(MAX_CHAT_CHARS + 100);
        send(&mut a, json!({"op": "chat", "text": long})).await;
        let state = wait_for(&mut a, "the long chat", |s| {
            !s["messages"].as_array().unwrap().is_empty()
        })
        .await;
        assert_eq!(
            state["messages"].as_array().unwrap().len(),
            1,
            "bad messages were ignored"
        );
        assert_eq!(
            state["messages"][0]["text"].as_str().unwrap().chars().count(),
            MAX_CHAT_CHARS
        );
        assert_eq!(state["counter"], 0);

        // Only the last MAX_MESSAGES messages are kept.
        for i in 0..MAX_MESSAGES + 5 {
            send(&mut a, json!({"op": "chat", "text": format!("m{i}")})).await;
        }
        let last = format!("m{}", MAX_MESSAGES + 4);
        let state = wait_for(&mut a, "the last chat", |s| has_message(s, &last)).await;
        let messages = state["messages"].as_array().unwrap();
        assert_eq!(messages.len(), MAX_MESSAGES);
        assert_eq!(messages[0]["text"], "m5");

        // A message over the size limit closes that client's socket, and only that.
        let mut b = demo.client("/ws").await;
        b.send(tungstenite::Message::Text("y".repeat(MAX_WS_MESSAGE_BYTES + 1).into()))
            .await
            .unwrap();
        let ended = tokio::time::timeout(WAIT, async {
            while let Some(Ok(message)) = b.next().await {
                if message.is_close() {
                    break;
                }
            }
        });
        ended.await.expect("the oversized client was not disconnected");
        send(&mut a, json!({"op": "inc"})).await;
        wait_for(&mut a, "a still works", |s| s["counter"] == 1 && s["clients"] == 1).await;
    }

    #[tokio::test]
    async fn page_and_env() {
        let demo = Demo::start().await;
        let http = reqwest::Client::new();
        let page = http
            .get(demo.url("/"))
            .header(USERNAME_HEADER, "alice <admin>")
            .send()
            .await
            .unwrap();
        assert_eq!(page.status(), 200);
        assert!(page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html"));
        let page = page.text().await.unwrap();
        assert!(page.contains("Shared counter"));
        assert!(page.contains(r#"new URL("ws", location.href)"#));
        assert!(page.contains("<td>bk-test-1</td>"));
        assert!(page.contains("<td>room-&lt;1&gt;</td>"), "values are escaped");
        assert!(page.contains("<td>alice &lt;admin&gt;</td>"));
        assert!(
            page.contains(r#"<span class="unset">not set</span>"#),
            "the static token is not set"
        );
        assert!(!page.contains("{{SESSION"), "every placeholder is filled");

        let env: Value = reqwest::get(demo.url("/env")).await.unwrap().json().await.unwrap();
        assert_eq!(
            env,
            json!({"SESSION_BACKEND_ID": "bk-test-1", "SESSION_BACKEND_KEY": "room-<1>", "SESSION_BACKEND_FENCING_TOKEN": "42"})
        );
        assert_eq!(reqwest::get(demo.url("/nope/nope/nope")).await.unwrap().status(), 404);
    }

    #[tokio::test]
    async fn works_under_a_static_token_prefix() {
        let demo = Demo::start().await;
        let page = reqwest::get(demo.url("/s.abc_DEF-1/")).await.unwrap();
        assert_eq!(page.status(), 200);
        assert!(page.text().await.unwrap().contains("Shared counter"));
        let env: Value = reqwest::get(demo.url("/s.abc_DEF-1/env"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(env["SESSION_BACKEND_ID"], "bk-test-1");
        let mut a = demo.client("/s.abc_DEF-1/ws").await;
        let mut b = demo.client("/ws").await;
        wait_for(&mut a, "both clients", |s| s["clients"] == 2).await;
        send(&mut a, json!({"op": "inc"})).await;
        wait_for(&mut b, "b to see a's change", |s| s["counter"] == 1).await;
    }

    #[tokio::test]
    async fn debug_endpoints() {
        let mut demo = Demo::start().await;
        let http = reqwest::Client::new();
        for (path, expected) in [
            ("/debug/request?y=2", "/debug/request?y=2"),
            ("/s.tok/debug/request?x=1&x=2", "/s.tok/debug/request?x=1&x=2"),
            ("/debug/request", "/debug/request"),
        ] {
            let seen: Value = http
                .post(demo.url(path))
                .header("x-verified-username", "alice")
                .header("x-multi", "a")
                .header("x-multi", "b")
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_eq!(seen["path"], expected, "{seen}");
            assert_eq!(seen["method"], "POST");
            assert_eq!(seen["headers"]["x-verified-username"], "alice");
            assert_eq!(seen["headers"]["x-multi"], "a, b");
        }

        let res = http.post(demo.url("/debug/exit?code=3")).send().await.unwrap();
        assert_eq!(res.status(), 200);
        let code = tokio::time::timeout(WAIT, demo.exits.recv()).await.unwrap();
        assert_eq!(code, Some(3));
        http.post(demo.url("/s.tok/debug/exit")).send().await.unwrap();
        assert_eq!(tokio::time::timeout(WAIT, demo.exits.recv()).await.unwrap(), Some(0));
        for bad in ["/debug/exit?code=256", "/debug/exit?code=-1", "/debug/exit?code=x"] {
            assert_eq!(http.post(demo.url(bad)).send().await.unwrap().status(), 400, "{bad}");
        }
        assert_eq!(http.get(demo.url("/debug/exit")).send().await.unwrap().status(), 405);
        assert!(demo.exits.try_recv().is_err(), "bad requests do not exit");
    }

    #[tokio::test]
    async fn limits_file_and_signal_endpoints() {
        let demo = Demo::start().await;
        let http = reqwest::Client::new();
        for prefix in ["", "/s.tok"] {
            let limits: Limits = http
                .get(demo.url(&format!("{prefix}/debug/limits")))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_eq!(limits, Limits::read());
            let signals: Value = http
                .get(demo.url(&format!("{prefix}/debug/signals")))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_eq!(signals, json!([]));
        }

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/c.txt");
        let url = |prefix: &str, path: &std::path::Path| {
            let mut url = reqwest::Url::parse(&demo.url(&format!("{prefix}/debug/file"))).unwrap();
            url.query_pairs_mut().append_pair("path", path.to_str().unwrap());
            url
        };
        let res = http.get(url("", &path)).send().await.unwrap();
        assert_eq!(res.status(), 404);
        assert!(res.json::<Value>().await.unwrap()["error"].is_string());
        let res = http.post(url("/s.tok", &path)).body("hello\n").send().await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.json::<Value>().await.unwrap(), json!({"ok": true}));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "hello\n");
        let res = http.get(url("/s.tok", &path)).send().await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.bytes().await.unwrap().as_ref(), b"hello\n");

        // Writing where a file is in the way of a directory is an I/O error: 500 with its text.
        let res = http
            .post(url("", &path.join("below-a-file")))
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 500);
        let error = res.json::<Value>().await.unwrap();
        assert!(error["error"].as_str().unwrap().contains("os error"), "{error}");
        // Reading a directory is an I/O error other than "not found".
        assert_eq!(http.get(url("", dir.path())).send().await.unwrap().status(), 500);

        for bad in ["/debug/file", "/debug/file?path=relative/x"] {
            let res = http.post(demo.url(bad)).body("x").send().await.unwrap();
            assert_eq!(res.status(), 400, "{bad}");
            assert!(res.json::<Value>().await.unwrap()["error"].is_string(), "{bad}");
            assert_eq!(http.get(demo.url(bad)).send().await.unwrap().status(), 400, "{bad}");
        }
    }

    #[tokio::test]
    async fn shutdown_closes_sockets_and_returns() {
        let mut demo = Demo::start().await;
        let mut a = demo.client("/ws").await;
        wait_for(&mut a, "the state on join", |_| true).await;
        demo.stop.take().unwrap().send(()).unwrap();
        let close = tokio::time::timeout(WAIT, async {
            loop {
                match a.next().await {
                    Some(Ok(tungstenite::Message::Close(frame))) => return frame,
                    Some(Ok(_)) => {}
                    other => panic!("expected a close frame, got {other:?}"),
                }
            }
        })
        .await
        .expect("no close frame");
        assert_eq!(close.map(|f| u16::from(f.code)), Some(1001));
        let result = tokio::time::timeout(SHUTDOWN_GRACE + WAIT, demo.server)
            .await
            .expect("serve did not return");
        result.unwrap().unwrap();
    }

    #[test]
    fn page_rendering() {
        let env = BTreeMap::from([("SESSION_BACKEND_ID".to_owned(), "{{x-verified-username}}".to_owned())]);
        let out = render_page(
            "a {{SESSION_BACKEND_ID}} b {{x-verified-username}} {{OTHER}} {{",
            &env,
            Some("u&'\""),
        );
        assert_eq!(out, "a {{x-verified-username}} b u&amp;&#39;&quot; {{OTHER}} {{");
        let out = render_page("{{SESSION_BACKEND_KEY}}", &env, None);
        assert_eq!(out, r#"<span class="unset">not set</span>"#);
    }

    #[test]
    fn chat_text_cleaning() {
        assert_eq!(clean_chat_text("  hi  ").as_deref(), Some("hi"));
        assert_eq!(clean_chat_text(" \n "), None);
        assert_eq!(
            clean_chat_text(&"é".repeat(600)).unwrap().chars().count(),
            MAX_CHAT_CHARS
        );
    }

    #[test]
    fn router_builds() {
        // The route table is valid (axum panics on conflicting routes when building).
        let _ = app(AppState::new(BTreeMap::new(), SignalLog::default(), Arc::new(|_| {})));
    }
}
