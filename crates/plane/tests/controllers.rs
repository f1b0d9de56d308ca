//! Several controllers on one PostgreSQL database (started by the test from the
//! machine's binaries): what one controller does reaches the drones, proxies and status
//! streams connected to another, a listener that lost its connection resyncs so that
//! nothing is missed, and drones and proxies move to another controller when theirs
//! stops.
//!
//! These tests fail, rather than skip, when PostgreSQL cannot be started.

use async_trait::async_trait;
use plane_client::PlaneClient;
use plane_store::fanout::{Fanout, FanoutListener, PgFanout, SharedFanout};
use plane_store::postgres::PostgresStore;
use plane_store::{StoreError, StoreResult};
use plane_test_postgres::TestPostgres;
use plane_tests::{wait_status_via, Options, TestCluster, WAIT};
use plane_types::api::{ConnectRequest, RevokeRequest};
use plane_types::status::{BackendStatus, TerminationReason};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

const PLANE: &str = env!("CARGO_BIN_EXE_plane");

async fn cluster(db: &TestPostgres) -> TestCluster {
    let mut options = Options::new(PLANE);
    options.postgres_url = Some(db.url());
    options.drone = false;
    TestCluster::start(options).await.unwrap()
}

fn with_user(mut req: ConnectRequest, user: &str) -> ConnectRequest {
    req.user = Some(user.into());
    req
}

/// Polls `url` through the cluster's proxy until it answers `want`.
async fn wait_http(tc: &TestCluster, url: &str, want: u16) {
    let deadline = Instant::now() + WAIT;
    let mut last = None;
    while Instant::now() < deadline {
        last = Some(match tc.http.get(url).send().await {
            Ok(r) if r.status().as_u16() == want => return,
            Ok(r) => r.status().as_u16().to_string(),
            Err(e) => e.to_string(),
        });
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{url} did not answer {want} within {WAIT:?}; last: {last:?}");
}

#[tokio::test]
async fn two_controllers_on_one_database_act_for_each_others_drones_and_proxies() {
    let db = plane_tests::test_database().await;
    let mut tc = cluster(&db).await;
    let a_url = tc.controller_url.clone();
    let b_url = tc.add_controller(None).await.unwrap();
    let b = PlaneClient::new(&b_url).unwrap();
    // The drone is on A (B second, for when A stops); the proxy is on B.
    tc.drone_controller_url = Some(format!("{a_url},{b_url}"));
    tc.start_drone().await.unwrap();
    tc.restart_proxy(&b_url).await.unwrap();

    // A connect through B schedules on A's drone; B's stream sees it become ready.
    let res = b
        .connect(&with_user(tc.demo_request("mc-room"), "alice"))
        .await
        .unwrap();
    assert!(res.spawned);
    let ready = wait_status_via(&b, &res.backend_id, BackendStatus::Ready)
        .await
        .unwrap();
    assert_eq!(ready.status, BackendStatus::Ready);
    // The proxy on B routes to it.
    wait_http(&tc, &format!("{}env", res.url), 200).await;
    // Metrics reach B although the drone reports them to A.
    let deadline = Instant::now() + WAIT;
    loop {
        let m = b.backend_metrics(&res.backend_id).await.unwrap();
        if m.metrics.is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "no metrics on B: {m:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A revocation on A evicts the route cached by the proxy on B.
    tc.client
        .revoke(&RevokeRequest {
            backend_id: res.backend_id.clone(),
            user: "alice".into(),
        })
        .await
        .unwrap();
    let revoked = Instant::now();
    wait_http(&tc, &format!("{}env", res.url), 410).await;
    // Issue 5's bar: a revoke reaches every proxy, here one on another controller, within 1 s.
    assert!(
        revoked.elapsed() < Duration::from_secs(1),
        "the revocation took {:?} to reach B's proxy",
        revoked.elapsed()
    );

    // A termination asked of B reaches the drone on A.
    b.hard_terminate(&res.backend_id).await.unwrap();
    let last = wait_status_via(&b, &res.backend_id, BackendStatus::Terminated)
        .await
        .unwrap();
    assert_eq!(last.termination_reason, Some(TerminationReason::External));

    // A keeps a backend; then A stops and the drone moves to B, keeping it.
    let kept = tc.connect_ready(&tc.demo_request("mc-kept")).await.unwrap();
    tc.stop_controller().await.unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let state = b.cluster_state(&tc.cluster).await.unwrap();
        if state.drones.iter().any(|d| d.ready && d.node.controller.is_some()) {
            let again = b.connect(&tc.demo_request("mc-kept")).await.unwrap();
            if !again.spawned && b.status(&kept.backend_id).await.unwrap().status == BackendStatus::Ready {
                break;
            }
        }
        assert!(Instant::now() < deadline, "the drone did not move to B");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_http(&tc, &format!("{}env", kept.url), 200).await;
    // New spawns work through B alone.
    let fresh = b.connect(&tc.demo_request("mc-fresh")).await.unwrap();
    wait_status_via(&b, &fresh.backend_id, BackendStatus::Ready)
        .await
        .unwrap();
    for id in [&kept.backend_id, &fresh.backend_id] {
        b.hard_terminate(id).await.unwrap();
        wait_status_via(&b, id, BackendStatus::Terminated).await.unwrap();
    }
    tc.shutdown().await.unwrap();
}

/// The real PostgreSQL fan-out with a switch the test holds: `cut` fails the current
/// listener, and while the gate is closed no new listener connects.
struct Gated {
    inner: PgFanout,
    open: watch::Sender<bool>,
    cuts: watch::Sender<u64>,
}

struct GatedListener {
    inner: Box<dyn FanoutListener>,
    cuts: watch::Receiver<u64>,
}

#[async_trait]
impl Fanout for Gated {
    async fn notify(&self, payloads: &[String]) -> StoreResult<()> {
        self.inner.notify(payloads).await
    }

    async fn listen(&self) -> StoreResult<Box<dyn FanoutListener>> {
        let mut open = self.open.subscribe();
        let _ = open.wait_for(|o| *o).await;
        let mut cuts = self.cuts.subscribe();
        cuts.mark_unchanged();
        Ok(Box::new(GatedListener {
            inner: self.inner.listen().await?,
            cuts,
        }))
    }
}

#[async_trait]
impl FanoutListener for GatedListener {
    async fn recv(&mut self) -> StoreResult<String> {
        tokio::select! {
            r = self.inner.recv() => r,
            _ = self.cuts.changed() => Err(StoreError::Database("cut by the test".into())),
        }
    }
}

#[tokio::test]
async fn a_controller_whose_listener_was_cut_off_resyncs_and_misses_nothing() {
    let db = plane_tests::test_database().await;
    let mut tc = cluster(&db).await;
    let store = PostgresStore::connect(&db.url()).await.unwrap();
    let gated = Arc::new(Gated {
        inner: PgFanout::new(&store),
        open: watch::channel(true).0,
        cuts: watch::channel(0).0,
    });
    let b_url = tc.add_controller(Some(gated.clone() as SharedFanout)).await.unwrap();
    // The drone and the proxy are on B; requests go to A.
    tc.drone_controller_url = Some(b_url.clone());
    tc.start_drone().await.unwrap();
    tc.restart_proxy(&b_url).await.unwrap();
    let first = tc
        .connect_ready(&with_user(tc.demo_request("cut-1"), "bob"))
        .await
        .unwrap();
    wait_http(&tc, &format!("{}env", first.url), 200).await;

    // B stops hearing A.
    gated.open.send_replace(false);
    gated.cuts.send_modify(|n| *n += 1);
    // Meanwhile A revokes a token cached by B's proxy, and schedules a backend on B's
    // drone: both notices are lost on B.
    tc.client
        .revoke(&RevokeRequest {
            backend_id: first.backend_id.clone(),
            user: "bob".into(),
        })
        .await
        .unwrap();
    let second = tc.connect(&tc.demo_request("cut-2")).await.unwrap();
    assert!(second.spawned);
    // The gap is real: while B is cut off, the proxy keeps its cached route.
    let gap_end = Instant::now() + Duration::from_millis(300);
    while Instant::now() < gap_end {
        let status = tc.http.get(format!("{}env", first.url)).send().await.unwrap().status();
        assert_eq!(status, 200, "B's proxy heard of the revocation while B was cut off");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        tc.client.status(&second.backend_id).await.unwrap().status,
        BackendStatus::Scheduled
    );

    // B reconnects and resyncs: the spawn goes out, the proxy drops its routes.
    gated.open.send_replace(true);
    tc.wait_status(&second.backend_id, BackendStatus::Ready).await.unwrap();
    wait_http(&tc, &format!("{}env", first.url), 410).await;
    tc.shutdown().await.unwrap();
}

#[tokio::test]
async fn listeners_reconnect_after_postgresql_drops_their_connections() {
    let db = plane_tests::test_database().await;
    let mut tc = cluster(&db).await;
    let b_url = tc.add_controller(None).await.unwrap();
    tc.drone_controller_url = Some(b_url.clone());
    tc.start_drone().await.unwrap();
    let pool = &sqlx::PgPool::connect(&db.url()).await.unwrap();
    let listeners = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'plane-controller-listener' AND datname = current_database()",
        )
        .fetch_one(pool)
        .await
        .unwrap()
    };
    let deadline = Instant::now() + WAIT;
    while listeners().await < 2 {
        assert!(Instant::now() < deadline, "the two listeners did not connect");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'plane-controller-listener' AND datname = current_database()",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(killed, [true, true]);
    // Both listen again, and a spawn scheduled by A reaches the drone on B.
    let deadline = Instant::now() + WAIT;
    while listeners().await < 2 {
        assert!(Instant::now() < deadline, "the listeners did not reconnect");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let res = tc.connect_ready(&tc.demo_request("reconnected")).await.unwrap();
    wait_http(&tc, &format!("{}env", res.url), 200).await;
    tc.shutdown().await.unwrap();
}
