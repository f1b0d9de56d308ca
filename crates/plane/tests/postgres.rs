//! The controller on a real PostgreSQL store (started by the test from the machine's
//! PostgreSQL binaries): a whole cluster through the proxy, a controller restart, and
//! `plane migrate` / `plane controller --db postgres://…` as a user runs them.
//!
//! These tests fail, rather than skip, when PostgreSQL cannot be started.

use plane_test_postgres::TestPostgres;
use plane_tests::{Options, TestCluster, WAIT};
use plane_types::status::{BackendStatus, TerminationReason};
use serde_json::Value;
use std::time::{Duration, Instant};

const PLANE: &str = env!("CARGO_BIN_EXE_plane");

#[tokio::test]
async fn a_cluster_on_postgres_serves_connects_and_survives_a_controller_restart() {
    let db = plane_tests::test_database().await;
    let mut options = Options::new(PLANE);
    options.postgres_url = Some(db.url());
    let mut tc = TestCluster::start(options).await.unwrap();

    let res = tc.connect_ready(&tc.demo_request("pg-room")).await.unwrap();
    let env: Value = tc
        .http
        .get(format!("{}env", res.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(env["SESSION_BACKEND_ID"], res.backend_id.as_str());
    let again = tc.connect(&tc.demo_request("pg-room")).await.unwrap();
    assert_eq!(
        (again.backend_id.clone(), again.spawned),
        (res.backend_id.clone(), false)
    );

    // The state is in PostgreSQL: a restarted controller still knows the backend, and
    // the drone reconnects to it.
    tc.stop_controller().await.unwrap();
    tc.start_controller().await.unwrap();
    tc.wait_for(|s| s.drones.iter().any(|d| d.ready)).await.unwrap();
    let status = tc.client.status(&res.backend_id).await.unwrap();
    assert_eq!(status.status, BackendStatus::Ready);

    tc.client.soft_terminate(&res.backend_id).await.unwrap();
    let last = tc
        .wait_status(&res.backend_id, BackendStatus::Terminated)
        .await
        .unwrap();
    assert_eq!(last.termination_reason, Some(TerminationReason::External));
    let history = tc.store.status_history(&res.backend_id).await.unwrap();
    let statuses: Vec<BackendStatus> = history.iter().map(|e| e.status).collect();
    assert!(statuses.windows(2).all(|w| w[0] < w[1]), "{statuses:?}");
    assert_eq!(statuses.first(), Some(&BackendStatus::Scheduled));
    tc.shutdown().await.unwrap();
}

#[tokio::test]
async fn plane_migrate_and_plane_controller_on_postgres() {
    let db = plane_tests::test_database().await;
    let out = tokio::process::Command::new(PLANE)
        .args(["migrate", "--db", &db.url()])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Twice is fine.
    let out = tokio::process::Command::new(PLANE)
        .args(["migrate", "--db", &db.url()])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // A store that cannot be reached is a clean error that does not show the password.
    let dead = format!("postgres://plane:hunter2@127.0.0.1:{}/plane", plane_tests::free_port());
    let out = tokio::process::Command::new(PLANE)
        .args(["migrate", "--db", &dead])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("cannot open the PostgreSQL store"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");

    let port = plane_tests::free_port();
    // Killed when dropped, at the end of the test.
    let _controller = tokio::process::Command::new(PLANE)
        .args(["controller", "--db", &db.url(), "--port", &port.to_string()])
        .args(["--default-cluster", "localhost:9999"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let client = plane_client::PlaneClient::new(&format!("http://127.0.0.1:{port}")).unwrap();
    let deadline = Instant::now() + WAIT;
    while client.controller_status().await.is_err() {
        assert!(Instant::now() < deadline, "the controller on PostgreSQL never answered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // No drone: a connect is a NoDroneAvailable ApiError, decided against PostgreSQL.
    let req = plane_types::api::ConnectRequest {
        key: None,
        spawn_config: Some(plane_types::api::SpawnConfig {
            id: None,
            cluster: None,
            pool: None,
            executable: serde_json::json!({"command": ["plane", "demo-backend"]}),
            lifetime_limit_seconds: None,
            max_idle_seconds: None,
            use_static_token: false,
            subdomain: None,
        }),
        user: None,
        auth: None,
    };
    match client.connect(&req).await {
        Err(plane_client::ClientError::Api { status, error }) => {
            assert_eq!(status, 503);
            assert_eq!(error.kind, plane_types::api::ApiErrorKind::NoDroneAvailable);
        }
        other => panic!("expected NoDroneAvailable, got {other:?}"),
    }
}

#[tokio::test]
async fn the_controller_reports_database_errors_during_an_outage_and_recovers_alone() {
    let pg = tokio::task::spawn_blocking(TestPostgres::start)
        .await
        .expect("the server task")
        .expect("these tests need PostgreSQL (initdb, pg_ctl) to start");
    let mut options = Options::new(PLANE);
    options.postgres_url = Some(pg.url());
    // Leases long enough to outlast the outage: a drone that cannot renew must stop
    // its backend at the soft deadline (here 20 s).
    options.lease_unit = Duration::from_secs(5);
    let tc = TestCluster::start(options).await.unwrap();
    let before = tc.connect_ready(&tc.demo_request("before-outage")).await.unwrap();
    let env_url = format!("{}env", before.url);
    assert!(tc.http.get(&env_url).send().await.unwrap().status().is_success());

    pg.stop().unwrap();
    // What needs the store is a DatabaseError (500), promptly; no hang, no panic.
    let started = Instant::now();
    match tc.client.connect(&tc.demo_request("during-outage")).await {
        Err(plane_client::ClientError::Api { status, error }) => {
            assert_eq!(status, 500, "{error:?}");
            assert_eq!(error.kind, plane_types::api::ApiErrorKind::DatabaseError, "{error:?}");
        }
        other => panic!("expected DatabaseError, got {other:?}"),
    }
    assert!(started.elapsed() < WAIT, "the error took {:?}", started.elapsed());
    // Health checks say the store is down, as an ApiError.
    match tc.client.controller_status().await {
        Err(plane_client::ClientError::Api { error, .. }) => {
            assert_eq!(error.kind, plane_types::api::ApiErrorKind::DatabaseError)
        }
        other => panic!("expected DatabaseError, got {other:?}"),
    }
    // Traffic to a running backend does not need the store: the proxy's route is cached.
    let res = tc.http.get(&env_url).send().await.unwrap();
    assert!(res.status().is_success(), "{}", res.status());

    pg.restart().unwrap();
    // No controller restart: the pool reconnects by itself.
    let deadline = Instant::now() + WAIT;
    let after = loop {
        match tc.connect(&tc.demo_request("after-outage")).await {
            Ok(res) => break res,
            Err(e) => {
                assert!(Instant::now() < deadline, "the controller did not recover: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    tc.wait_status(&after.backend_id, BackendStatus::Ready).await.unwrap();
    // The backend started before the outage is still known and ready.
    let status = tc.client.status(&before.backend_id).await.unwrap();
    assert_eq!(status.status, BackendStatus::Ready, "{status:?}");
    tc.shutdown().await.unwrap();
}
