//! Real-browser test of the demo page: Debian's headless `chromium`, driven over the
//! Chrome DevTools Protocol (CDP), opens two tabs on the same Plane URL (served through
//! the proxy of an in-process test cluster) and checks that a click on + in one tab and
//! a chat message sent from the other show up in both.
//!
//! `chromium` must be installed (`apt-get install chromium`; `.ci/run` does it). When it
//! is missing the test fails with a message saying so; it never skips.

use futures_util::{FutureExt, SinkExt, StreamExt};
use plane_tests::{Options, TestCluster};
use serde_json::{json, Value};
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long any one wait on the browser may take (generous: a loaded 2-core machine
/// runs chromium slowly).
const DEADLINE: Duration = Duration::from_secs(30);
/// The pause between two polls of a page.
const POLL: Duration = Duration::from_millis(50);

/// A headless chromium, killed when dropped (on every path, panics included), with its
/// profile and log in a temporary directory that outlives the process.
struct Chromium {
    child: Child,
    profile: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Chromium {
    /// Starts chromium on `about:blank`, with `localhost:<proxy port>` mapped to the
    /// proxy's `127.0.0.1` listener (so an IPv6 `localhost` never gets in the way).
    fn launch(proxy_port: u16) -> Chromium {
        let dir = tempfile::tempdir().expect("temporary directory");
        let profile = dir.path().join("profile");
        let log = dir.path().join("chromium.log");
        let stderr = std::fs::File::create(&log).expect("chromium log file");
        let spawned = Command::new("chromium")
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--disable-breakpad",
                "--disable-crash-reporter",
                "--disable-background-timer-throttling",
                "--disable-backgrounding-occluded-windows",
                "--disable-renderer-backgrounding",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(format!(
                "--host-resolver-rules=MAP localhost:{proxy_port} 127.0.0.1:{proxy_port}"
            ))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "the `chromium` binary was not found on PATH: this test needs a real browser; \
                 install it with `apt-get install chromium` (.ci/run does this)"
            ),
            Err(e) => panic!("cannot start `chromium`: {e}"),
        };
        Chromium {
            child,
            profile,
            log,
            _dir: dir,
        }
    }

    /// The last lines chromium wrote to stderr, for failure messages.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Waits for the browser-level DevTools endpoint, which chromium writes to
    /// `DevToolsActivePort` in its profile (port, then path) once it listens.
    async fn devtools_url(&mut self) -> String {
        let file = self.profile.join("DevToolsActivePort");
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Ok(text) = std::fs::read_to_string(&file) {
                let mut lines = text.lines();
                if let (Some(Ok(port)), Some(path)) = (lines.next().map(str::parse::<u16>), lines.next()) {
                    if path.starts_with("/devtools/browser/") {
                        return format!("ws://127.0.0.1:{port}{path}");
                    }
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "chromium exited ({status}) before opening DevTools:\n{}",
                    self.log_tail()
                );
            }
            assert!(
                Instant::now() < deadline,
                "chromium did not open its DevTools port within {DEADLINE:?}:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        // The Debian launcher `exec`s the browser, so this is the browser process; its
        // helper processes exit when it dies.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A CDP client on the browser-level socket. Commands are sent one at a time and
/// matched to their answer by `id`; events (no `id`) are ignored.
struct Cdp {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
}

impl Cdp {
    async fn connect(url: &str) -> Cdp {
        let (ws, _) = tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(url))
            .await
            .expect("DevTools socket did not open in time")
            .expect("DevTools socket");
        Cdp { ws, next_id: 0 }
    }

    /// Sends `method` (to a tab when `session` is set) and returns its `result`, or the
    /// CDP error as text.
    async fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Result<Value, String> {
        self.next_id += 1;
        let id = self.next_id;
        let mut command = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = session {
            command["sessionId"] = json!(session);
        }
        self.ws
            .send(Message::Text(command.to_string().into()))
            .await
            .expect("send to chromium");
        let answer = tokio::time::timeout(DEADLINE, async {
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Text(text))) => {
                        let message: Value = serde_json::from_str(&text).expect("CDP messages are JSON");
                        if message["id"] == id {
                            return message;
                        }
                    }
                    Some(Ok(_)) => {}
                    other => panic!("the DevTools socket ended while waiting for {method}: {other:?}"),
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("chromium did not answer {method} within {DEADLINE:?}"));
        match answer.get("error") {
            Some(error) => Err(format!("{method}: {error}")),
            None => Ok(answer["result"].clone()),
        }
    }

    /// Like [`Cdp::call`], for commands that must succeed.
    async fn must(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.call(session, method, params)
            .await
            .unwrap_or_else(|e| panic!("CDP command failed: {e}"))
    }

    /// Opens a tab (in its own window) on `url`, attaches to it and returns the session id.
    async fn open_tab(&mut self, url: &str) -> String {
        let target = self
            .must(None, "Target.createTarget", json!({ "url": url, "newWindow": true }))
            .await;
        let attached = self
            .must(
                None,
                "Target.attachToTarget",
                json!({ "targetId": target["targetId"], "flatten": true }),
            )
            .await;
        let session = attached["sessionId"].as_str().expect("a session id").to_owned();
        // Both tabs behave as if focused, so typing works in whichever one we drive.
        self.must(
            Some(&session),
            "Emulation.setFocusEmulationEnabled",
            json!({ "enabled": true }),
        )
        .await;
        session
    }

    /// Evaluates `expression` in the tab (awaiting promises) and returns its value; a CDP
    /// error or a thrown exception comes back as text.
    async fn eval(&mut self, session: &str, expression: &str) -> Result<Value, String> {
        let result = self
            .call(
                Some(session),
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
            )
            .await?;
        if let Some(exception) = result.get("exceptionDetails") {
            return Err(format!("{expression}: {exception}"));
        }
        Ok(result["result"]["value"].clone())
    }

    /// Polls `expression` in the tab until it is `true`. Errors while polling (such as
    /// the page still loading) count as "not yet"; at the deadline the test fails with
    /// the last answer and what the page shows.
    async fn wait_until(&mut self, session: &str, what: &str, expression: &str) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let last = self.eval(session, expression).await;
            if last == Ok(json!(true)) {
                return;
            }
            if Instant::now() >= deadline {
                let page = self
                    .eval(
                        session,
                        "location.href + '\\n' + (document.body ? document.body.innerText : '(no body)')",
                    )
                    .await;
                panic!("{what}: not true within {DEADLINE:?} ({expression} gave {last:?}); the page shows {page:?}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Clicks the centre of the element `#id` with real mouse events, as a user would.
    async fn click(&mut self, session: &str, id: &str) {
        let point = self
            .eval(
                session,
                &format!(
                    "(() => {{ const e = document.getElementById('{id}'); e.scrollIntoView({{ block: 'center' }}); \
                     const r = e.getBoundingClientRect(); return {{ x: r.x + r.width / 2, y: r.y + r.height / 2 }}; }})()"
                ),
            )
            .await
            .unwrap_or_else(|e| panic!("cannot locate #{id}: {e}"));
        for kind in ["mousePressed", "mouseReleased"] {
            self.must(
                Some(session),
                "Input.dispatchMouseEvent",
                json!({ "type": kind, "x": point["x"], "y": point["y"], "button": "left", "clickCount": 1 }),
            )
            .await;
        }
    }
}

/// Whether the page is live on the backend's WebSocket with `clients` clients: the
/// connection badge says so and the controls are enabled.
fn live_with(clients: usize) -> String {
    format!(
        "(() => {{ const $ = (id) => document.getElementById(id); \
         return !!$('connection') && $('connection').classList.contains('ok') && \
         !$('inc').disabled && !$('send').disabled && $('clients').textContent.trim() === '{clients} connected'; }})()"
    )
}

#[tokio::test]
async fn two_tabs_see_each_others_changes() {
    let tc = TestCluster::start(Options::new(env!("CARGO_BIN_EXE_plane")))
        .await
        .expect("cluster starts");
    // Shut the cluster down (terminating the backend) whether or not the browser part
    // passed; chromium is already gone by then, killed by its guard.
    let outcome = AssertUnwindSafe(two_tabs(&tc)).catch_unwind().await;
    let shutdown = tc.shutdown().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
    shutdown.expect("cluster shuts down");
}

/// The browser part: the demo backend, chromium and the two tabs.
async fn two_tabs(tc: &TestCluster) {
    let res = tc
        .connect_ready(&tc.demo_request("browser-room"))
        .await
        .expect("demo backend ready");

    let mut browser = Chromium::launch(tc.proxy_addr.port());
    let mut cdp = Cdp::connect(&browser.devtools_url().await).await;
    let a = cdp.open_tab(&res.url).await;
    let b = cdp.open_tab(&res.url).await;

    // Both tabs loaded the page through the proxy, from this backend, and are live.
    let from_backend = format!(
        "location.href === {} && document.body.innerText.includes({})",
        json!(res.url),
        json!(res.backend_id.as_str())
    );
    for (tab, name) in [(&a, "tab A"), (&b, "tab B")] {
        cdp.wait_until(tab, &format!("{name} shows the backend's page"), &from_backend)
            .await;
        cdp.wait_until(tab, &format!("{name} is live with two clients"), &live_with(2))
            .await;
    }
    let counter_is = |n: i64| format!("document.getElementById('counter').textContent.trim() === '{n}'");
    cdp.wait_until(&b, "tab B starts at 0", &counter_is(0)).await;

    // A click on + in tab A shows in tab B (and in A).
    cdp.click(&a, "inc").await;
    cdp.wait_until(&b, "tab B shows tab A's increment", &counter_is(1))
        .await;
    cdp.wait_until(&a, "tab A shows its own increment", &counter_is(1))
        .await;

    // A chat message typed and sent in tab B shows in tab A.
    let text = "hello from tab B";
    cdp.click(&b, "chat-input").await;
    cdp.must(Some(&b), "Input.insertText", json!({ "text": text })).await;
    cdp.wait_until(
        &b,
        "tab B's input holds the message",
        &format!("document.getElementById('chat-input').value === {}", json!(text)),
    )
    .await;
    cdp.click(&b, "send").await;
    let shows_message = format!(
        "[...document.querySelectorAll('#messages li')].some((li) => li.textContent.includes({}))",
        json!(text)
    );
    cdp.wait_until(&a, "tab A shows tab B's chat message", &shows_message)
        .await;
    cdp.wait_until(&b, "tab B shows its own chat message", &shows_message)
        .await;
    cdp.wait_until(
        &b,
        "tab B's input is cleared after sending",
        "document.getElementById('chat-input').value === ''",
    )
    .await;
    // The counter is still 1 in both: the chat did not touch it.
    cdp.wait_until(&a, "tab A's counter is unchanged", &counter_is(1)).await;

    drop(cdp);
    drop(browser);
}
