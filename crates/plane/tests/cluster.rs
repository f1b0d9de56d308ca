//! In-process cluster tests: controller, drone (process runtime) and proxy on port 0,
//! running the real `plane demo-backend` as the backend. Each test checks one promise
//! of the issue; waits are on status streams or polls with a deadline.

use futures_util::{SinkExt, StreamExt};
use plane_client::ClientError;
use plane_tests::{Options, TestCluster, WAIT};
use plane_types::api::{ApiErrorKind, KeyConfig};
use plane_types::status::{BackendStatus, TerminationReason};
use serde_json::Value;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

fn options() -> Options {
    Options::new(env!("CARGO_BIN_EXE_plane"))
}

async fn cluster() -> TestCluster {
    TestCluster::start(options()).await.expect("cluster starts")
}

fn api_kind(e: &ClientError) -> Option<(u16, ApiErrorKind)> {
    match e {
        ClientError::Api { status, error } => Some((*status, error.kind)),
        _ => None,
    }
}

/// Where a backend listens, as the controller recorded it.
async fn backend_addr(tc: &TestCluster, id: &plane_types::names::BackendName) -> std::net::SocketAddr {
    tc.store
        .backend(id)
        .await
        .unwrap()
        .unwrap()
        .address
        .expect("a ready backend has an address")
}

async fn get_json(tc: &TestCluster, url: &str) -> Value {
    let res = tc.http.get(url).send().await.expect("request");
    assert!(res.status().is_success(), "GET {url}: {}", res.status());
    res.json().await.expect("json body")
}

/// Reads WebSocket messages until one satisfies `pred`.
async fn ws_until<S>(ws: &mut S, pred: impl Fn(&Value) -> bool) -> Value
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    tokio::time::timeout(WAIT, async {
        loop {
            match ws.next().await.expect("socket open").expect("socket ok") {
                Message::Text(t) => {
                    let v: Value = serde_json::from_str(&t).expect("json message");
                    if pred(&v) {
                        return v;
                    }
                }
                _ => continue,
            }
        }
    })
    .await
    .expect("expected message in time")
}

async fn ws_connect(tc: &TestCluster, url: &str) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
    let ws_url = format!("{}ws", url.replacen("http://", "ws://", 1));
    let tcp = tokio::net::TcpStream::connect(tc.proxy_addr).await.unwrap();
    let (ws, res) = tokio_tungstenite::client_async(ws_url.as_str(), tcp)
        .await
        .expect("websocket through proxy");
    assert_eq!(res.status(), 101);
    ws
}

#[tokio::test]
async fn connect_ready_http_websocket_then_soft_terminate() {
    let tc = cluster().await;
    let res = tc.connect(&tc.demo_request("room-1")).await.unwrap();
    assert!(res.spawned);
    assert!(res.url.starts_with(&format!("http://{}/", tc.cluster)), "{}", res.url);
    assert!(res.status_url.ends_with(&format!("/pub/b/{}/status", res.backend_id)));
    assert!(res.drone.is_some() && res.secret_token.is_some());
    tc.wait_status(&res.backend_id, BackendStatus::Ready).await.unwrap();

    // HTTP through the proxy, with the token stripped and Plane's headers added.
    let page = tc.http.get(&res.url).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()["x-plane-backend-id"], res.backend_id.as_str());
    assert!(page.text().await.unwrap().contains("<html"));
    let env = get_json(&tc, &format!("{}env", res.url)).await;
    assert_eq!(env["SESSION_BACKEND_ID"], res.backend_id.as_str());
    assert_eq!(env["SESSION_BACKEND_KEY"], "room-1");

    // Two WebSocket clients see each other's changes.
    let mut a = ws_connect(&tc, &res.url).await;
    let mut b = ws_connect(&tc, &res.url).await;
    ws_until(&mut b, |v| v["clients"] == 2).await;
    a.send(Message::Text(r#"{"op":"inc"}"#.into())).await.unwrap();
    ws_until(&mut b, |v| v["counter"] == 1).await;
    drop((a, b));

    tc.client.soft_terminate(&res.backend_id).await.unwrap();
    let end = tc
        .wait_status(&res.backend_id, BackendStatus::Terminated)
        .await
        .unwrap();
    assert_eq!(end.termination_reason, Some(TerminationReason::External));
    assert_eq!(
        end.exit_error,
        Some(false),
        "the demo backend exits 0 on SIGTERM: {end:?}"
    );
    let history: Vec<BackendStatus> = {
        let mut s = tc.client.status_stream(&res.backend_id, None).await.unwrap();
        let mut v = vec![];
        while let Some(e) = s.next().await {
            v.push(e.unwrap().status);
        }
        v
    };
    assert_eq!(history.first(), Some(&BackendStatus::Scheduled));
    assert!(history.contains(&BackendStatus::Ready) && history.contains(&BackendStatus::Terminating));
    assert!(
        history.windows(2).all(|w| w[0] < w[1]),
        "statuses must move forward: {history:?}"
    );
    // A terminated backend's token is gone.
    assert_eq!(tc.http.get(&res.url).send().await.unwrap().status(), 410);
    tc.shutdown().await.unwrap();
}

#[tokio::test]
async fn same_key_same_backend_and_tag_mismatch() {
    let tc = cluster().await;
    let first = tc.connect_ready(&tc.demo_request("doc-7")).await.unwrap();
    let second = tc.connect(&tc.demo_request("doc-7")).await.unwrap();
    assert_eq!(second.backend_id, first.backend_id);
    assert!(!second.spawned);
    assert_eq!(second.status, BackendStatus::Ready);
    assert_ne!(second.token, first.token, "each connect gets a fresh token");
    // Both tokens route.
    for url in [&first.url, &second.url] {
        assert_eq!(tc.http.get(format!("{url}env")).send().await.unwrap().status(), 200);
    }
    let mut other_tag = tc.demo_request("doc-7");
    other_tag.key = Some(KeyConfig {
        name: "doc-7".into(),
        namespace: String::new(),
        tag: "v2".into(),
    });
    let err = tc.client.connect(&other_tag).await.unwrap_err();
    assert_eq!(api_kind(&err), Some((409, ApiErrorKind::KeyHeld)), "{err}");
    // Without a spawn config, a held key still connects.
    let mut no_spawn = tc.demo_request("doc-7");
    no_spawn.spawn_config = None;
    assert_eq!(tc.client.connect(&no_spawn).await.unwrap().backend_id, first.backend_id);
    tc.shutdown().await.unwrap();
}

#[tokio::test]
async fn no_drone_means_no_drone_available() {
    let mut opts = options();
    opts.drone = false;
    let tc = TestCluster::start(opts).await.unwrap();
    let err = tc.client.connect(&tc.demo_request("k")).await.unwrap_err();
    assert_eq!(api_kind(&err), Some((503, ApiErrorKind::NoDroneAvailable)), "{err}");
    tc.shutdown().await.unwrap();
}

#[tokio::test]
async fn idle_backend_is_swept_and_traffic_keeps_it_alive() {
    let tc = cluster().await;
    let mut idle = tc.demo_request("idle");
    idle.spawn_config.as_mut().unwrap().max_idle_seconds = Some(1);
    let idle = tc.connect_ready(&idle).await.unwrap();
    let mut busy = tc.demo_request("busy");
    busy.spawn_config.as_mut().unwrap().max_idle_seconds = Some(1);
    let busy = tc.connect_ready(&busy).await.unwrap();
    // An open WebSocket through the proxy keeps `busy` alive.
    let mut ws = ws_connect(&tc, &busy.url).await;
    ws_until(&mut ws, |v| v["clients"] == 1).await;
    let end = tc
        .wait_status(&idle.backend_id, BackendStatus::Terminated)
        .await
        .unwrap();
    assert_eq!(end.termination_reason, Some(TerminationReason::Swept));
    // `busy` outlived `idle` by more than its own idle limit's worth of sweeps.
    let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
    while tokio::time::Instant::now() < deadline {
        ws.send(Message::Text(r#"{"op":"inc"}"#.into())).await.unwrap();
        ws_until(&mut ws, |v| v["counter"].is_number()).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        tc.client.status(&busy.backend_id).await.unwrap().status,
        BackendStatus::Ready
    );
    drop(ws);
    let end = tc
        .wait_status(&busy.backend_id, BackendStatus::Terminated)
        .await
        .unwrap();
    assert_eq!(end.termination_reason, Some(TerminationReason::Swept));
    tc.shutdown().await.unwrap();
}

#[tokio::test]
async fn lifetime_limit_terminates() {
    let tc = cluster().await;
    let mut req = tc.demo_request("short-lived");
    req.spawn_config.as_mut().unwrap().lifetime_limit_seconds = Some(1);
    let res = tc.connect_ready(&req).await.unwrap();
    let started = tokio::time::Instant::now();
    let end = tc
        .wait_status(&res.backend_id, BackendStatus::Terminated)
        .await
        .unwrap();
    assert_eq!(end.termination_reason, Some(TerminationReason::Swept));
    assert!(started.elapsed() < Duration::from_secs(10));
    tc.shutdown().await.unwrap();
}

#[tokio::test]
async fn static_token_is_not_rewritten_and_spoofed_headers_are_stripped() {
    let tc = cluster().await;
    let mut req = tc.demo_request("static");
    req.spawn_config.as_mut().unwrap().use_static_token = true;
    req.user = Some("alice".into());
    req.auth = Some(serde_json::json!({"role": "editor"}));
    let res = tc.connect_ready(&req).await.unwrap();
    assert!(res.token.starts_with("s."), "{}", res.token);
    assert_eq!(res.secret_token, None);
    let env = get_json(&tc, &format!("{}env", res.url)).await;
    assert_eq!(env["SESSION_BACKEND_STATIC_TOKEN"], res.token.as_str());
    let seen: Value = tc
        .http
        .get(format!("{}debug/request?x=1", res.url))
        .header("x-verified-username", "mallory")
        .header("X-Verified-Secret", "forged")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(seen["path"], format!("/{}/debug/request?x=1", res.token), "{seen}");
    assert_eq!(seen["headers"]["x-verified-username"], "alice", "{seen}");
    assert_eq!(seen["headers"]["x-verified-backend"], res.backend_id.as_str());
    assert!(seen["headers"].get("x-verified-secret").is_none(), "{seen}");
    assert!(seen["headers"]["x-forwarded-for"]
        .as_str()
        .unwrap()
        .contains("127.0.0.1"));

    // A normal token is stripped from the path, and its secret reaches the backend.
    let normal = tc.connect_ready(&tc.demo_request("normal")).await.unwrap();
    let seen: Value = tc
        .http
        .get(format!("{}debug/request?y=2", normal.url))
        .header("x-verified-username", "mallory")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(seen["path"], "/debug/request?y=2", "{seen}");
    assert!(
        seen["headers"].get("x-verified-username").is_none(),
        "spoofed header must be stripped: {seen}"
    );
    assert_eq!(
        seen["headers"]["x-verified-secret"],
        normal.secret_token.clone().unwrap().as_str()
    );
    tc.shutdown().await.unwrap();
}

#[tokio::test]
async fn concurrent_connects_yield_one_backend_per_key() {
    let tc = cluster().await;
    let mut tasks = Vec::new();
    for i in 0..100 {
        let req = tc.demo_request(&format!("key-{}", i % 10));
        let client = tc.client.clone();
        tasks.push(tokio::spawn(async move { (i % 10, client.connect(&req).await) }));
    }
    let mut by_key: Vec<HashSet<String>> = vec![HashSet::new(); 10];
    let mut spawned = 0;
    for t in tasks {
        let (k, res) = t.await.unwrap();
        let res = res.expect("every connect succeeds");
        spawned += usize::from(res.spawned);
        by_key[k].insert(res.backend_id.to_string());
    }
    assert!(by_key.iter().all(|s| s.len() == 1), "one backend per key: {by_key:?}");
    let all: HashSet<_> = by_key.iter().flatten().collect();
    assert_eq!(all.len(), 10);
    assert_eq!(spawned, 10);
    for id in all {
        let id = id.parse().unwrap();
        tc.wait_status(&id, BackendStatus::Ready).await.unwrap();
        tc.client.hard_terminate(&id).await.unwrap();
        tc.wait_status(&id, BackendStatus::Terminated).await.unwrap();
    }
    tc.shutdown().await.unwrap();
}

#[tokio::test]
async fn status_stream_replays_and_honours_last_event_id() {
    let tc = cluster().await;
    let res = tc.connect_ready(&tc.demo_request("stream")).await.unwrap();
    // Raw SSE: ids are status names.
    let raw = reqwest::Client::new()
        .get(format!("{}/pub/b/{}/status-stream", tc.controller_url, res.backend_id))
        .header("last-event-id", "starting")
        .send()
        .await
        .unwrap();
    assert_eq!(raw.headers()["content-type"], "text/event-stream");
    let mut body = raw.bytes_stream();
    let mut text = String::new();
    tokio::time::timeout(WAIT, async {
        while !text.contains("id: ready") && !text.contains("id:ready") {
            text.push_str(&String::from_utf8_lossy(&body.next().await.unwrap().unwrap()));
        }
    })
    .await
    .expect("ready event");
    assert!(
        !text.contains("scheduled") && !text.contains("\"starting\""),
        "skipped by Last-Event-ID: {text}"
    );
    assert!(text.contains("waiting"), "{text}");
    drop(body);

    // Typed: the replay has each status once, in order; then live changes follow.
    let mut stream = tc
        .client
        .status_stream(&res.backend_id, Some(BackendStatus::Waiting))
        .await
        .unwrap();
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(first.status, BackendStatus::Ready);
    tc.client.hard_terminate(&res.backend_id).await.unwrap();
    let mut rest = vec![];
    while let Some(e) = tokio::time::timeout(WAIT, stream.next()).await.unwrap() {
        rest.push(e.unwrap().status);
    }
    assert_eq!(rest.last(), Some(&BackendStatus::Terminated), "{rest:?}");
    assert!(rest.contains(&BackendStatus::HardTerminating));
    assert!(rest.windows(2).all(|w| w[0] < w[1]), "{rest:?}");
    // After the end, a stream with Last-Event-ID=terminated is empty and ends.
    let mut done = tc
        .client
        .status_stream(&res.backend_id, Some(BackendStatus::Terminated))
        .await
        .unwrap();
    assert!(tokio::time::timeout(WAIT, done.next()).await.unwrap().is_none());
    tc.shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_input_over_http_gets_api_errors() {
    let tc = cluster().await;
    let http = reqwest::Client::new();
    for (path, body) in [
        ("/ctrl/connect", "{not json"),
        ("/ctrl/connect", r#"{"key": {"name": "has space"}}"#),
        ("/ctrl/connect", r#"{"spawn_config": {"executable": {"command": 1}}}"#),
    ] {
        let res = http
            .post(format!("{}{path}", tc.controller_url))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 400, "{body}");
        let v: Value = res.json().await.unwrap();
        assert_eq!(v["kind"], "Other");
    }
    let res = http
        .get(format!("{}/pub/b/INVALID!/status", tc.controller_url))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    // A command the drone does not allow ends terminated with internalerror.
    let res = tc
        .connect(&tc.spawn_request("denied", &["/usr/bin/env", "true"]))
        .await
        .unwrap();
    let end = tc
        .wait_status(&res.backend_id, BackendStatus::Terminated)
        .await
        .unwrap();
    assert_eq!(end.termination_reason, Some(TerminationReason::InternalError));
    // The proxy: unknown token 410, foreign host 403, empty token 400.
    let base = format!("http://{}", tc.cluster);
    assert_eq!(
        tc.http
            .get(format!("{base}/no-such-token/"))
            .send()
            .await
            .unwrap()
            .status(),
        410
    );
    assert_eq!(tc.http.get(format!("{base}/")).send().await.unwrap().status(), 400);
    let foreign = reqwest::Client::new()
        .get(format!("http://{}/tok/", tc.proxy_addr))
        .header("host", "evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(foreign.status(), 403);
    tc.shutdown().await.unwrap();
}

#[tokio::test]
async fn backend_exit_reports_its_exit_code() {
    let tc = cluster().await;
    let res = tc.connect_ready(&tc.demo_request("exiter")).await.unwrap();
    let r = tc.http.post(format!("{}debug/exit?code=3", res.url)).send().await;
    // The backend may exit before it answers; either way it must end with code 3.
    drop(r);
    let end = tc
        .wait_status(&res.backend_id, BackendStatus::Terminated)
        .await
        .unwrap();
    assert_eq!(end.exit_error, Some(true), "{end:?}");
    let rec = tc.store.backend(&res.backend_id).await.unwrap().unwrap();
    assert_eq!(rec.exit_code, Some(3));
    // A process that never listens hits the startup timeout... (covered in the drone's
    // own tests); one that exits at once is terminated with its code.
    let res = tc
        .connect(&tc.spawn_request("quick-exit", &["sh", "-c", "exit 7"]))
        .await
        .unwrap();
    let end = tc
        .wait_status(&res.backend_id, BackendStatus::Terminated)
        .await
        .unwrap();
    assert_eq!(end.exit_error, Some(true));
    assert_eq!(
        tc.store.backend(&res.backend_id).await.unwrap().unwrap().exit_code,
        Some(7)
    );
    tc.shutdown().await.unwrap();
}

#[tokio::test]
async fn drone_restart_resends_unacked_events_and_keeps_backends() {
    let mut tc = cluster().await;
    let keep = tc.connect_ready(&tc.demo_request("survivor")).await.unwrap();
    let exiting = tc.connect_ready(&tc.demo_request("leaver")).await.unwrap();
    let exiting_addr = backend_addr(&tc, &exiting.backend_id).await;

    // With the controller down, a backend exits: the drone can only record the event.
    tc.stop_controller().await.unwrap();
    let _ = reqwest::Client::new()
        .post(format!("http://{exiting_addr}/debug/exit?code=4"))
        .send()
        .await;
    // Wait until the drone's outbox holds the unacked `terminated` event.
    let outbox = plane_drone::StateStore::open(&tc.drone_config().db_path).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let events = outbox.unacked_events().await.unwrap();
        if events
            .iter()
            .any(|e| e.backend_id == exiting.backend_id && e.status == BackendStatus::Terminated)
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the exit never reached the outbox: {events:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    outbox.close().await;
    // The drone restarts while the event is still unacked.
    tc.stop_drone().await.unwrap();
    tc.start_controller().await.unwrap();
    tc.start_drone().await.unwrap();

    let end = tc
        .wait_status(&exiting.backend_id, BackendStatus::Terminated)
        .await
        .unwrap();
    assert_eq!(end.exit_error, Some(true));
    assert_eq!(
        tc.store.backend(&exiting.backend_id).await.unwrap().unwrap().exit_code,
        Some(4)
    );
    // The other backend was adopted: still ready, routable, and its lease renewed
    // beyond several expiry periods.
    let lease_expiry = tc.options.lease_unit * 6;
    let deadline = tokio::time::Instant::now() + lease_expiry * 2;
    while tokio::time::Instant::now() < deadline {
        assert_eq!(
            tc.client.status(&keep.backend_id).await.unwrap().status,
            BackendStatus::Ready
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let env = get_json(&tc, &format!("{}env", keep.url)).await;
    assert_eq!(env["SESSION_BACKEND_ID"], keep.backend_id.as_str());
    tc.shutdown().await.unwrap();
}

#[tokio::test]
async fn lost_drone_backends_are_marked_lost_and_key_is_freed() {
    let mut tc = cluster().await;
    let res = tc.connect_ready(&tc.demo_request("orphan")).await.unwrap();
    let addr = backend_addr(&tc, &res.backend_id).await;
    tc.stop_drone().await.unwrap();
    // The controller marks it lost once the lease runs out.
    let end = tc
        .wait_status(&res.backend_id, BackendStatus::Terminated)
        .await
        .unwrap();
    assert_eq!(end.termination_reason, Some(TerminationReason::Lost));
    // Unable to renew, the drone-less backend was not killed by anyone but the key is
    // free: with a drone back, the same key gets a new backend with a new fencing token.
    let _ = reqwest::Client::new()
        .post(format!("http://{addr}/debug/exit?code=0"))
        .send()
        .await;
    tc.start_drone().await.unwrap();
    let again = tc.connect_ready(&tc.demo_request("orphan")).await.unwrap();
    assert_ne!(again.backend_id, res.backend_id);
    assert!(again.spawned);
    let f_old = tc.store.backend(&res.backend_id).await.unwrap().unwrap().fencing_token;
    let f_new = tc
        .store
        .backend(&again.backend_id)
        .await
        .unwrap()
        .unwrap()
        .fencing_token;
    assert!(f_new > f_old);
    tc.shutdown().await.unwrap();
}

#[tokio::test]
async fn unrenewable_lease_makes_the_drone_terminate_on_its_own() {
    let mut tc = cluster().await;
    let res = tc.connect_ready(&tc.demo_request("partitioned")).await.unwrap();
    let addr = backend_addr(&tc, &res.backend_id).await;
    tc.stop_controller().await.unwrap();
    // Without renewals the drone soft-terminates at the soft deadline: the backend
    // stops answering.
    let deadline = tokio::time::Instant::now() + WAIT;
    while reqwest::Client::new()
        .get(format!("http://{addr}/env"))
        .send()
        .await
        .is_ok()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "backend still running without a lease"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tc.start_controller().await.unwrap();
    let end = tc
        .wait_status(&res.backend_id, BackendStatus::Terminated)
        .await
        .unwrap();
    assert!(
        matches!(
            end.termination_reason,
            Some(TerminationReason::KeyExpired) | Some(TerminationReason::Lost)
        ),
        "{end:?}"
    );
    let history = tc.store.status_history(&res.backend_id).await.unwrap();
    assert!(
        history
            .iter()
            .any(|e| e.termination_reason == Some(TerminationReason::KeyExpired))
            || end.termination_reason == Some(TerminationReason::Lost),
        "{history:?}"
    );
    tc.shutdown().await.unwrap();
}

#[tokio::test]
async fn revoked_tokens_stop_routing_on_every_proxy_within_a_second() {
    let mut tc = cluster().await;
    let second = tc.add_proxy().await.unwrap();
    let mut req = tc.demo_request("revocable");
    req.user = Some("alice".into());
    let alice = tc.connect_ready(&req).await.unwrap();
    req.user = Some("bob".into());
    let bob = tc.connect(&req).await.unwrap();
    // Both routes are cached in both proxies now.
    let get = |proxy: SocketAddr, url: &str| {
        let request = tc.http_via(proxy, &format!("{url}env"));
        async move { request.send().await.unwrap().status() }
    };
    let proxies = [tc.proxy_addr, second];
    for proxy in proxies {
        for url in [&alice.url, &bob.url] {
            assert_eq!(get(proxy, url).await, 200, "{url} through {proxy}");
        }
    }
    let revoke = plane_types::api::RevokeRequest {
        backend_id: alice.backend_id.clone(),
        user: "alice".into(),
    };
    tc.client.revoke(&revoke).await.unwrap();
    let revoked = tokio::time::Instant::now();
    // The revocation is pushed to every proxy's cache (the original caches routes
    // forever); issue 5's bar is one second.
    for proxy in proxies {
        while get(proxy, &alice.url).await != 410 {
            assert!(
                revoked.elapsed() < Duration::from_secs(1),
                "a revoked token still routes through {proxy} after 1 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    for proxy in proxies {
        assert_eq!(get(proxy, &bob.url).await, 200, "bob's token through {proxy}");
    }
    tc.shutdown().await.unwrap();
}

#[tokio::test]
async fn draining_drone_takes_no_new_backends_until_undrained() {
    let tc = cluster().await;
    let running = tc.connect_ready(&tc.demo_request("before-drain")).await.unwrap();
    let drone = running.drone.clone().unwrap();
    assert!(tc.client.drain(&tc.cluster, &drone).await.unwrap().updated);
    assert!(
        !tc.client.drain(&tc.cluster, &drone).await.unwrap().updated,
        "already draining"
    );
    let state = tc.client.cluster_state(&tc.cluster).await.unwrap();
    assert!(state.drones.iter().all(|d| d.draining));
    let err = tc.client.connect(&tc.demo_request("after-drain")).await.unwrap_err();
    assert_eq!(api_kind(&err), Some((503, ApiErrorKind::NoDroneAvailable)), "{err}");
    // Its running backend keeps serving.
    assert_eq!(
        tc.http
            .get(format!("{}env", running.url))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // Undrained, it takes new backends again; a second undrain changes nothing.
    assert!(tc.client.undrain(&tc.cluster, &drone).await.unwrap().updated);
    assert!(!tc.client.undrain(&tc.cluster, &drone).await.unwrap().updated);
    tc.connect_ready(&tc.demo_request("after-undrain")).await.unwrap();
    let unknown: plane_types::names::DroneName = "dr-nobody".parse().unwrap();
    let err = tc.client.undrain(&tc.cluster, &unknown).await.unwrap_err();
    assert_eq!(api_kind(&err).map(|k| k.0), Some(404), "{err}");
    tc.shutdown().await.unwrap();
}

#[tokio::test]
async fn handshake_rejects_other_protocol_versions() {
    let tc = cluster().await;
    let url = format!(
        "{}/ctrl/drone-socket",
        tc.controller_url.replacen("http://", "ws://", 1)
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str()).await.unwrap();
    let hello = serde_json::json!({"Hello": {
        "protocol_version": 999, "name": "dr-future", "cluster": tc.cluster.as_str(), "pool": "",
        "runtimes": ["process"], "plane_version": "9.9.9", "plane_hash": "x", "local_time": 0}});
    ws.send(Message::Text(hello.to_string().into())).await.unwrap();
    let reply = ws_until(&mut ws, |_| true).await;
    let message = reply["Reject"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("999"), "{reply}");
    // Garbage as a first message is rejected too, and the controller keeps serving.
    let url = format!(
        "{}/ctrl/proxy-socket",
        tc.controller_url.replacen("http://", "ws://", 1)
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str()).await.unwrap();
    ws.send(Message::Text("{not json".into())).await.unwrap();
    let reply = ws_until(&mut ws, |_| true).await;
    assert!(reply["Reject"]["message"].is_string(), "{reply}");
    assert!(tc.client.controller_status().await.is_ok());
    tc.shutdown().await.unwrap();
}

#[tokio::test]
async fn process_backends_report_metrics_through_the_api() {
    let tc = cluster().await;
    let state = tc.client.cluster_state(&tc.cluster).await.unwrap();
    assert_eq!(
        state.drones[0].runtimes,
        [plane_types::executable::RuntimeKind::Process]
    );
    let res = tc.connect_ready(&tc.demo_request("metered")).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    let sample = loop {
        let m = tc.client.backend_metrics(&res.backend_id).await.unwrap();
        assert_eq!(m.status, BackendStatus::Ready);
        if let Some(sample) = m.metrics {
            break sample;
        }
        assert!(tokio::time::Instant::now() < deadline, "no metrics arrived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The demo backend is a real process: it uses some memory.
    assert!(sample.memory_bytes > 1024 * 1024, "{sample:?}");
    // Unknown backends are a 404 ApiError.
    let unknown: plane_types::names::BackendName = "no-such-backend".parse().unwrap();
    let err = tc.client.backend_metrics(&unknown).await.unwrap_err();
    assert_eq!(api_kind(&err).map(|k| k.0), Some(404), "{err}");
    tc.client.hard_terminate(&res.backend_id).await.unwrap();
    tc.wait_status(&res.backend_id, BackendStatus::Terminated)
        .await
        .unwrap();
    // A terminated backend has no live metrics.
    let m = tc.client.backend_metrics(&res.backend_id).await.unwrap();
    assert_eq!((m.status, m.metrics), (BackendStatus::Terminated, None));
    tc.shutdown().await.unwrap();
}

/// A scripted drone (raw WebSocket) reports load progress; a status stream opened with
/// `?progress=true` carries it, a plain one does not.
#[tokio::test]
async fn load_progress_reaches_status_streams_that_ask_for_it() {
    let mut options = options();
    options.drone = false;
    let tc = TestCluster::start(options).await.unwrap();
    let url = format!(
        "{}/ctrl/drone-socket",
        tc.controller_url.replacen("http://", "ws://", 1)
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str()).await.unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let hello = serde_json::json!({"Hello": {
        "protocol_version": plane_types::protocol::PROTOCOL_VERSION, "name": "dr-scripted",
        "cluster": tc.cluster.as_str(), "pool": "", "runtimes": ["docker"], "plane_version": "0",
        "plane_hash": "x", "local_time": now}});
    ws.send(Message::Text(hello.to_string().into())).await.unwrap();
    ws_until(&mut ws, |m| m.get("Welcome").is_some()).await;
    ws.send(Message::Text(
        serde_json::json!({"Heartbeat": {"local_time": now}}).to_string().into(),
    ))
    .await
    .unwrap();
    tc.wait_for(|s| s.drones.iter().any(|d| d.ready)).await.unwrap();

    let req = tc.executable_request("pulling", serde_json::json!({"image": "example/app:1"}));
    let res = tc.connect(&req).await.unwrap();
    let spawn = ws_until(&mut ws, |m| m.get("Spawn").is_some()).await;
    assert_eq!(spawn["Spawn"]["backend_id"], res.backend_id.as_str());
    let event = |id: u64, status: &str| serde_json::json!({"Event": {"event_id": id, "backend_id": res.backend_id.as_str(), "status": status}});
    ws.send(Message::Text(event(1, "loading").to_string().into()))
        .await
        .unwrap();
    tc.wait_status(&res.backend_id, BackendStatus::Loading).await.unwrap();

    let mut with = tc
        .client
        .status_stream_with_progress(&res.backend_id, None)
        .await
        .unwrap();
    let mut plain = tc.client.status_stream(&res.backend_id, None).await.unwrap();
    let progress = serde_json::json!({"LoadProgress": {"backend_id": res.backend_id.as_str(),
        "progress": {"message": "pulling 1 of 2 layers", "fraction": 0.5, "bytes_done": 5, "bytes_total": 10}}});
    ws.send(Message::Text(progress.to_string().into())).await.unwrap();
    let mut seen = Vec::new();
    let got = tokio::time::timeout(WAIT, async {
        while let Some(item) = with.next().await {
            match item.unwrap() {
                plane_client::StreamItem::Status(e) => seen.push(e.status),
                plane_client::StreamItem::Progress(p) => return p,
            }
        }
        panic!("stream ended without progress");
    })
    .await
    .expect("progress arrived");
    assert_eq!(got.bytes_done, Some(5));
    assert_eq!(got.message, "pulling 1 of 2 layers");
    assert_eq!(seen, [BackendStatus::Scheduled, BackendStatus::Loading]);
    // The latest progress is also in the metrics endpoint while loading.
    let m = tc.client.backend_metrics(&res.backend_id).await.unwrap();
    assert_eq!(m.progress.map(|p| p.bytes_total), Some(Some(10)));

    // The drone ends it; the plain stream only ever saw statuses.
    let mut done = event(2, "terminated");
    done["Event"]["termination_reason"] = "internalerror".into();
    done["Event"]["message"] = "pull failed: denied".into();
    ws.send(Message::Text(done.to_string().into())).await.unwrap();
    let mut statuses = Vec::new();
    while let Some(entry) = tokio::time::timeout(WAIT, plain.next()).await.unwrap() {
        let entry = entry.unwrap();
        statuses.push(entry.status);
        if entry.status.is_terminal() {
            assert_eq!(entry.message.as_deref(), Some("pull failed: denied"));
        }
    }
    assert_eq!(
        statuses,
        [
            BackendStatus::Scheduled,
            BackendStatus::Loading,
            BackendStatus::Terminated
        ]
    );
    tc.shutdown().await.unwrap();
}
