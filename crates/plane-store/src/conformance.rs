//! A test suite written against the [`Store`] trait, so every implementation (SQLite
//! today, PostgreSQL later) runs the same checks unchanged.
//!
//! Call [`run_all`] with a factory that returns a fresh, empty store.

use crate::{
    ApplyOutcome, BackendUpdate, CleanupPolicy, CleanupReport, CreateOutcome, DroneRegistration, NewBackend, NewToken,
    ProxyRegistration, SharedStore, Store,
};
use plane_types::api::KeyConfig;
use plane_types::executable::{Executable, RuntimeKind};
use plane_types::names::{BackendName, ClusterName, DroneName, ProxyName};
use plane_types::status::{BackendStatus, StatusEntry, TerminationKind, TerminationReason};
use plane_types::EpochMillis;
use std::future::Future;
use std::time::{Duration, Instant};

/// Runs every check, each on a fresh store from `make`.
pub async fn run_all<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = SharedStore>,
{
    drones_register_heartbeat_and_drain(make().await).await;
    keys_are_exclusive_and_fencing_tokens_increase(make().await).await;
    statuses_only_move_forward(make().await).await;
    a_batch_of_updates_applies_each_in_order(make().await).await;
    termination_releases_key(make().await).await;
    renewal_and_expiry(make().await).await;
    tokens_route_and_revoke(make().await).await;
    sweep_idle_and_lifetime(make().await).await;
    termination_requests(make().await).await;
    concurrent_creates_yield_one_holder(make().await).await;
    undrain_makes_a_drone_schedulable_again(make().await).await;
    reregistering_updates_pool_runtimes_and_versions(make().await).await;
    cleanup_deletes_old_terminated_backends_and_what_refers_to_them(make().await).await;
    cleanup_keeps_backends_terminated_within_the_retention(make().await).await;
    cleanup_is_bounded_by_the_batch(make().await).await;
    tokens_expire(make().await).await;
    cert_lease_is_exclusive_and_carries_txt_values(make().await).await;
}

/// The cluster every fixture uses.
pub fn cluster() -> ClusterName {
    "c1.test:9000".parse().unwrap()
}

fn process_exe() -> Executable {
    Executable::from_json(&serde_json::json!({"command": ["true"]})).unwrap()
}

/// Registers a process drone named `name` in [`cluster`].
pub async fn drone(store: &dyn Store, name: &str) -> DroneName {
    let name: DroneName = name.parse().unwrap();
    store
        .register_drone(&DroneRegistration {
            name: name.clone(),
            cluster: cluster(),
            pool: String::new(),
            runtimes: vec![RuntimeKind::Process],
            plane_version: "0.1.0".into(),
            plane_hash: "h".into(),
            controller: "co-test".parse().unwrap(),
        })
        .await
        .unwrap();
    name
}

/// A key in the default namespace, with no tag.
pub fn key(name: &str) -> KeyConfig {
    KeyConfig {
        name: name.into(),
        namespace: String::new(),
        tag: String::new(),
    }
}

/// A process backend for `key_name` on `drone`, with a 60 s lease.
pub fn new_backend(id: &str, drone: &DroneName, key_name: &str) -> NewBackend {
    new_backend_with_lease(id, drone, key_name, Duration::from_secs(60))
}

/// [`new_backend`] with another lease.
pub fn new_backend_with_lease(id: &str, drone: &DroneName, key_name: &str, lease: Duration) -> NewBackend {
    NewBackend {
        id: id.parse().unwrap(),
        cluster: cluster(),
        pool: String::new(),
        drone: drone.clone(),
        executable: process_exe(),
        key: key(key_name),
        lifetime_limit_seconds: None,
        max_idle_seconds: None,
        static_token: None,
        subdomain: None,
        lease_duration: lease,
    }
}

/// An update to `status` with nothing else said.
pub fn update(id: &BackendName, status: BackendStatus) -> BackendUpdate {
    BackendUpdate {
        backend_id: id.clone(),
        status,
        address: None,
        exit_code: None,
        termination_reason: None,
        termination_kind: None,
        message: None,
    }
}

/// A token for `backend`, issued to `user`.
pub async fn token(store: &dyn Store, token: &str, backend: &BackendName, user: &str) {
    store
        .insert_token(&NewToken {
            token: token.into(),
            backend_id: backend.clone(),
            user: Some(user.into()),
            auth: None,
            secret_token: Some(format!("secret-{token}")),
            ttl: None,
        })
        .await
        .unwrap();
}

/// Reports `id` terminated by `drone`; returns the new status entry.
pub async fn terminate(store: &dyn Store, drone: &DroneName, id: &BackendName) -> StatusEntry {
    match store
        .apply_update(drone, &update(id, BackendStatus::Terminated))
        .await
        .unwrap()
    {
        ApplyOutcome::Advanced(entry) => entry,
        other => panic!("terminating {id}: {other:?}"),
    }
}

/// A cleanup policy.
pub fn cleanup_policy(terminated_retention: Duration, batch: u32) -> CleanupPolicy {
    CleanupPolicy {
        terminated_retention,
        batch,
    }
}

/// Waits until the store's clock has moved on by `elapsed` from now (a heartbeat of
/// `drone` marks the start; its age is computed by the store), polling with a deadline.
pub async fn wait_for_store_time(store: &dyn Store, drone: &DroneName, elapsed: Duration) {
    store.drone_heartbeat(drone).await.unwrap();
    let deadline = Instant::now() + elapsed + Duration::from_secs(5);
    loop {
        let drones = store.drones(&cluster()).await.unwrap();
        let record = drones
            .iter()
            .find(|r| r.name == *drone)
            .expect("the drone is registered");
        if record.last_heartbeat_age >= elapsed {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the store's clock did not move on by {elapsed:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The names of the drones that may take a process backend in the default pool.
async fn schedulable_names(store: &dyn Store, pool: &str, runtime: RuntimeKind) -> Vec<String> {
    store
        .schedulable_drones(&cluster(), pool, runtime, Duration::from_secs(30))
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.name.to_string())
        .collect()
}

async fn drones_register_heartbeat_and_drain(store: SharedStore) {
    let d = drone(&*store, "dr-one").await;
    store.controller_heartbeat(&"co-test".parse().unwrap()).await.unwrap();
    store.drone_heartbeat(&d).await.unwrap();
    let drones = store.drones(&cluster()).await.unwrap();
    assert_eq!(drones.len(), 1);
    assert!(drones[0].ready && !drones[0].draining);
    assert!(drones[0].controller_heartbeat_age.is_some());
    let sched = store
        .schedulable_drones(&cluster(), "", RuntimeKind::Process, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(sched.len(), 1);
    // Wrong runtime, pool or cluster: not schedulable.
    assert!(store
        .schedulable_drones(&cluster(), "", RuntimeKind::Docker, Duration::from_secs(30))
        .await
        .unwrap()
        .is_empty());
    assert!(store
        .schedulable_drones(&cluster(), "gpu", RuntimeKind::Process, Duration::from_secs(30))
        .await
        .unwrap()
        .is_empty());
    assert!(store
        .schedulable_drones(
            &"other:1".parse().unwrap(),
            "",
            RuntimeKind::Process,
            Duration::from_secs(30)
        )
        .await
        .unwrap()
        .is_empty());
    assert_eq!(store.drain_drone(&cluster(), &d).await.unwrap(), Some(true));
    assert_eq!(store.drain_drone(&cluster(), &d).await.unwrap(), Some(false));
    assert_eq!(
        store
            .drain_drone(&cluster(), &"dr-nope".parse().unwrap())
            .await
            .unwrap(),
        None
    );
    assert!(store
        .schedulable_drones(&cluster(), "", RuntimeKind::Process, Duration::from_secs(30))
        .await
        .unwrap()
        .is_empty());
    // Re-registering (a reconnect) keeps the drain.
    drone(&*store, "dr-one").await;
    assert!(store.drones(&cluster()).await.unwrap()[0].draining);
    // A disconnect seen by a controller the drone has left changes nothing.
    store
        .drone_disconnected(&d, &"co-other".parse().unwrap())
        .await
        .unwrap();
    assert!(store.drones(&cluster()).await.unwrap()[0].ready);
    store.drone_disconnected(&d, &"co-test".parse().unwrap()).await.unwrap();
    assert!(!store.drones(&cluster()).await.unwrap()[0].ready);

    let p = ProxyRegistration {
        name: "px-one".parse().unwrap(),
        cluster: cluster(),
        plane_version: "0.1.0".into(),
        plane_hash: "h".into(),
        controller: "co-test".parse().unwrap(),
    };
    store.register_proxy(&p).await.unwrap();
    assert_eq!(store.proxies(&cluster()).await.unwrap()[0].registration, p);
    store
        .proxy_disconnected(&p.name, &"co-other".parse().unwrap())
        .await
        .unwrap();
    assert_eq!(store.proxies(&cluster()).await.unwrap().len(), 1);
    store.proxy_disconnected(&p.name, &p.controller).await.unwrap();
    assert!(store.proxies(&cluster()).await.unwrap().is_empty());
}

async fn keys_are_exclusive_and_fencing_tokens_increase(store: SharedStore) {
    let d = drone(&*store, "dr-one").await;
    let CreateOutcome::Created { fencing_token: f1 } = store.create_backend(&new_backend("b1", &d, "k")).await.unwrap()
    else {
        panic!("first create must succeed")
    };
    assert_eq!(
        store.create_backend(&new_backend("b2", &d, "k")).await.unwrap(),
        CreateOutcome::KeyHeld
    );
    assert_eq!(
        store.create_backend(&new_backend("b1", &d, "other")).await.unwrap(),
        CreateOutcome::IdTaken
    );
    let holder = store.key_holder(&key("k")).await.unwrap().unwrap();
    assert_eq!(holder.backend_id.as_str(), "b1");
    assert_eq!(holder.status, BackendStatus::Scheduled);
    // The same name in another namespace is another key.
    let mut other_ns = new_backend("b3", &d, "k");
    other_ns.key.namespace = "ns2".into();
    let CreateOutcome::Created { fencing_token: f3 } = store.create_backend(&other_ns).await.unwrap() else {
        panic!("another namespace is another key")
    };
    assert!(f3 > f1);
    let rec = store.backend(&"b1".parse().unwrap()).await.unwrap().unwrap();
    assert_eq!(rec.fencing_token, f1);
    assert_eq!(rec.executable, process_exe());
    assert_eq!(
        store.status_history(&rec.id).await.unwrap()[0].status,
        BackendStatus::Scheduled
    );
    assert!(store.backend(&"nope".parse().unwrap()).await.unwrap().is_none());
}

async fn statuses_only_move_forward(store: SharedStore) {
    let d = drone(&*store, "dr-one").await;
    store.create_backend(&new_backend("b1", &d, "k")).await.unwrap();
    let id: BackendName = "b1".parse().unwrap();
    let mut ready = update(&id, BackendStatus::Ready);
    ready.address = Some("127.0.0.1:5000".parse().unwrap());
    assert!(matches!(
        store.apply_update(&d, &ready).await.unwrap(),
        ApplyOutcome::Advanced(_)
    ));
    assert_eq!(store.apply_update(&d, &ready).await.unwrap(), ApplyOutcome::Stale);
    assert_eq!(
        store
            .apply_update(&d, &update(&id, BackendStatus::Starting))
            .await
            .unwrap(),
        ApplyOutcome::Stale
    );
    let other = drone(&*store, "dr-two").await;
    assert_eq!(
        store
            .apply_update(&other, &update(&id, BackendStatus::Terminated))
            .await
            .unwrap(),
        ApplyOutcome::WrongDrone
    );
    assert_eq!(
        store
            .apply_update(&d, &update(&"ghost".parse().unwrap(), BackendStatus::Ready))
            .await
            .unwrap(),
        ApplyOutcome::UnknownBackend
    );
    let hist: Vec<_> = store
        .status_history(&id)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.status)
        .collect();
    assert_eq!(hist, vec![BackendStatus::Scheduled, BackendStatus::Ready]);
    let rec = store.backend(&id).await.unwrap().unwrap();
    assert_eq!(rec.address, ready.address);
}

async fn a_batch_of_updates_applies_each_in_order(store: SharedStore) {
    let d = drone(&*store, "dr-one").await;
    store.create_backend(&new_backend("b1", &d, "k1")).await.unwrap();
    store.create_backend(&new_backend("b2", &d, "k2")).await.unwrap();
    let (b1, b2): (BackendName, BackendName) = ("b1".parse().unwrap(), "b2".parse().unwrap());
    let mut ready = update(&b1, BackendStatus::Ready);
    ready.address = Some("127.0.0.1:5000".parse().unwrap());
    let batch = [
        update(&b1, BackendStatus::Starting),
        update(&b2, BackendStatus::Starting),
        update(&"ghost".parse().unwrap(), BackendStatus::Ready),
        // Behind what this batch already applied: stale, and it must not undo anything.
        update(&b1, BackendStatus::Loading),
        ready.clone(),
        update(&b2, BackendStatus::Terminated),
    ];
    let outcomes = store.apply_updates(&d, &batch).await.unwrap();
    let kinds: Vec<&str> = outcomes
        .iter()
        .map(|o| match o {
            ApplyOutcome::Advanced(_) => "advanced",
            ApplyOutcome::Stale => "stale",
            ApplyOutcome::UnknownBackend => "unknown",
            ApplyOutcome::WrongDrone => "wrong drone",
        })
        .collect();
    assert_eq!(
        kinds,
        ["advanced", "advanced", "unknown", "stale", "advanced", "advanced"]
    );
    let history = |id: BackendName| {
        let store = store.clone();
        async move {
            let h: Vec<_> = store
                .status_history(&id)
                .await
                .unwrap()
                .into_iter()
                .map(|e| e.status)
                .collect();
            h
        }
    };
    assert_eq!(
        history(b1.clone()).await,
        [BackendStatus::Scheduled, BackendStatus::Starting, BackendStatus::Ready]
    );
    assert_eq!(
        history(b2.clone()).await,
        [
            BackendStatus::Scheduled,
            BackendStatus::Starting,
            BackendStatus::Terminated
        ]
    );
    assert_eq!(store.backend(&b1).await.unwrap().unwrap().address, ready.address);
    // The terminated one released its key; the ready one holds its own.
    assert!(store.key_holder(&key("k2")).await.unwrap().is_none());
    assert_eq!(store.key_holder(&key("k1")).await.unwrap().unwrap().backend_id, b1);
    // An empty batch is a no-op.
    assert!(store.apply_updates(&d, &[]).await.unwrap().is_empty());
}

async fn termination_releases_key(store: SharedStore) {
    let d = drone(&*store, "dr-one").await;
    store.create_backend(&new_backend("b1", &d, "k")).await.unwrap();
    let id: BackendName = "b1".parse().unwrap();
    let mut term = update(&id, BackendStatus::Terminating);
    term.termination_reason = Some(TerminationReason::External);
    term.termination_kind = Some(TerminationKind::Soft);
    store.apply_update(&d, &term).await.unwrap();
    // Still held while terminating.
    assert_eq!(
        store.create_backend(&new_backend("b2", &d, "k")).await.unwrap(),
        CreateOutcome::KeyHeld
    );
    let mut done = update(&id, BackendStatus::Terminated);
    done.exit_code = Some(3);
    let ApplyOutcome::Advanced(entry) = store.apply_update(&d, &done).await.unwrap() else {
        panic!("must advance")
    };
    assert_eq!(entry.exit_error, Some(true));
    assert_eq!(entry.termination_reason, Some(TerminationReason::External));
    assert!(store.key_holder(&key("k")).await.unwrap().is_none());
    let rec = store.backend(&id).await.unwrap().unwrap();
    assert_eq!((rec.status, rec.exit_code), (BackendStatus::Terminated, Some(3)));
    assert!(matches!(
        store.create_backend(&new_backend("b2", &d, "k")).await.unwrap(),
        CreateOutcome::Created { .. }
    ));
}

async fn renewal_and_expiry(store: SharedStore) {
    let d = drone(&*store, "dr-one").await;
    let mut b = new_backend("b1", &d, "k");
    b.lease_duration = Duration::from_millis(300);
    let CreateOutcome::Created { fencing_token } = store.create_backend(&b).await.unwrap() else {
        panic!()
    };
    assert!(store
        .renew_key(&b.id, fencing_token, Duration::from_millis(300))
        .await
        .unwrap());
    assert!(!store
        .renew_key(&b.id, fencing_token + 1, Duration::from_millis(300))
        .await
        .unwrap());
    assert!(store.mark_lost().await.unwrap().is_empty());
    // Let the lease run out (poll with a deadline: store time is the reference).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while store.key_holder(&key("k")).await.unwrap().is_some() {
        assert!(std::time::Instant::now() < deadline, "lease never expired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!store
        .renew_key(&b.id, fencing_token, Duration::from_secs(60))
        .await
        .unwrap());
    let lost = store.mark_lost().await.unwrap();
    assert_eq!(lost.len(), 1);
    assert_eq!(lost[0].1.termination_reason, Some(TerminationReason::Lost));
    assert_eq!(
        store.backend(&b.id).await.unwrap().unwrap().status,
        BackendStatus::Terminated
    );
    assert!(store.mark_lost().await.unwrap().is_empty());
    // An expired key can be taken over, and the taker gets a larger fencing token.
    let CreateOutcome::Created { fencing_token: f2 } = store.create_backend(&new_backend("b2", &d, "k")).await.unwrap()
    else {
        panic!()
    };
    assert!(f2 > fencing_token);
}

async fn tokens_route_and_revoke(store: SharedStore) {
    let d = drone(&*store, "dr-one").await;
    store.create_backend(&new_backend("b1", &d, "k")).await.unwrap();
    let id: BackendName = "b1".parse().unwrap();
    for (tok, user) in [("t1", "alice"), ("t2", "alice"), ("t3", "bob")] {
        store
            .insert_token(&NewToken {
                token: tok.into(),
                backend_id: id.clone(),
                user: Some(user.into()),
                auth: Some(serde_json::json!({"role": user})),
                secret_token: Some(format!("secret-{tok}")),
                ttl: None,
            })
            .await
            .unwrap();
    }
    // Issuing an existing token again (a static token) keeps the first row.
    store
        .insert_token(&NewToken {
            token: "t1".into(),
            backend_id: id.clone(),
            user: Some("mallory".into()),
            auth: None,
            secret_token: None,
            ttl: None,
        })
        .await
        .unwrap();
    let r = store.route("t1").await.unwrap().unwrap();
    assert_eq!(r.backend_id, id);
    assert_eq!(r.user.as_deref(), Some("alice"));
    assert_eq!(r.user_data, Some(serde_json::json!({"role": "alice"})));
    assert_eq!(r.secret_token.as_deref(), Some("secret-t1"));
    assert!(store.route("nope").await.unwrap().is_none());
    let mut revoked = store.revoke(&id, "alice").await.unwrap();
    revoked.sort();
    assert_eq!(revoked, vec!["t1".to_string(), "t2".to_string()]);
    assert!(store.route("t1").await.unwrap().is_none());
    assert!(store.route("t3").await.unwrap().is_some());
    // A retry returns them again (to invalidate caches again), and they stay revoked.
    let mut again = store.revoke(&id, "alice").await.unwrap();
    again.sort();
    assert_eq!(again, revoked);
    assert!(store.route("t2").await.unwrap().is_none());
    assert!(store.revoke(&id, "nobody").await.unwrap().is_empty());
}

async fn sweep_idle_and_lifetime(store: SharedStore) {
    let d = drone(&*store, "dr-one").await;
    let mut idle = new_backend("idle", &d, "k1");
    idle.max_idle_seconds = Some(0);
    store.create_backend(&idle).await.unwrap();
    let mut life = new_backend("life", &d, "k2");
    life.lifetime_limit_seconds = Some(0);
    store.create_backend(&life).await.unwrap();
    let mut busy = new_backend("busy", &d, "k3");
    busy.max_idle_seconds = Some(3600);
    store.create_backend(&busy).await.unwrap();
    // Idle only counts once ready.
    let swept = store.sweep().await.unwrap();
    assert_eq!(
        swept.iter().map(|t| t.backend_id.as_str()).collect::<Vec<_>>(),
        vec!["life"]
    );
    for id in [&idle.id, &busy.id] {
        store.apply_update(&d, &update(id, BackendStatus::Ready)).await.unwrap();
    }
    store.keepalive(std::slice::from_ref(&busy.id)).await.unwrap();
    let swept = store.sweep().await.unwrap();
    assert_eq!(swept.len(), 1);
    assert_eq!(swept[0].backend_id, idle.id);
    assert_eq!(
        (swept[0].kind, swept[0].reason),
        (TerminationKind::Soft, TerminationReason::Swept)
    );
    // Swept once only.
    assert!(store.sweep().await.unwrap().is_empty());
    let pending = store.pending_terminations(&d).await.unwrap();
    assert_eq!(pending.len(), 2);
    // The drone's report carries the pending reason through.
    let ApplyOutcome::Advanced(e) = store
        .apply_update(&d, &update(&idle.id, BackendStatus::Terminating))
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(e.termination_reason, Some(TerminationReason::Swept));
    assert_eq!(e.termination_kind, Some(TerminationKind::Soft));
}

async fn termination_requests(store: SharedStore) {
    let d = drone(&*store, "dr-one").await;
    store.create_backend(&new_backend("b1", &d, "k")).await.unwrap();
    let id: BackendName = "b1".parse().unwrap();
    assert_eq!(store.scheduled_backends(&d).await.unwrap().len(), 1);
    let r = store
        .request_termination(&id, TerminationKind::Soft, TerminationReason::External)
        .await
        .unwrap();
    assert_eq!(r, Some((d.clone(), BackendStatus::Scheduled)));
    store
        .request_termination(&id, TerminationKind::Hard, TerminationReason::External)
        .await
        .unwrap();
    let p = store.pending_terminations(&d).await.unwrap();
    assert_eq!(p[0].kind, TerminationKind::Hard);
    assert!(store
        .request_termination(
            &"nope".parse().unwrap(),
            TerminationKind::Soft,
            TerminationReason::External
        )
        .await
        .unwrap()
        .is_none());
    store
        .apply_update(&d, &update(&id, BackendStatus::Terminated))
        .await
        .unwrap();
    assert!(store.pending_terminations(&d).await.unwrap().is_empty());
    assert!(store.scheduled_backends(&d).await.unwrap().is_empty());
}

async fn concurrent_creates_yield_one_holder(store: SharedStore) {
    let d = drone(&*store, "dr-one").await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let store = store.clone();
        let b = new_backend(&format!("b{i}"), &d, "contended");
        tasks.push(tokio::spawn(async move { store.create_backend(&b).await.unwrap() }));
    }
    let mut created = 0;
    for t in tasks {
        if matches!(t.await.unwrap(), CreateOutcome::Created { .. }) {
            created += 1;
        }
    }
    assert_eq!(created, 1);
}

async fn undrain_makes_a_drone_schedulable_again(store: SharedStore) {
    let d = drone(&*store, "dr-one").await;
    let other: ClusterName = "other:1".parse().unwrap();
    assert_eq!(
        store
            .undrain_drone(&cluster(), &"dr-nope".parse().unwrap())
            .await
            .unwrap(),
        None
    );
    // Known, but in another cluster: unknown there.
    assert_eq!(store.undrain_drone(&other, &d).await.unwrap(), None);
    // Not draining: nothing changes.
    assert_eq!(store.undrain_drone(&cluster(), &d).await.unwrap(), Some(false));
    assert_eq!(
        schedulable_names(&*store, "", RuntimeKind::Process).await,
        vec!["dr-one"]
    );

    assert_eq!(store.drain_drone(&cluster(), &d).await.unwrap(), Some(true));
    assert!(schedulable_names(&*store, "", RuntimeKind::Process).await.is_empty());
    // Another cluster's name for it does not undrain it.
    assert_eq!(store.undrain_drone(&other, &d).await.unwrap(), None);
    assert!(store.drones(&cluster()).await.unwrap()[0].draining);
    assert_eq!(store.undrain_drone(&cluster(), &d).await.unwrap(), Some(true));
    let record = &store.drones(&cluster()).await.unwrap()[0];
    assert!(!record.draining && record.ready, "{record:?}");
    assert_eq!(
        schedulable_names(&*store, "", RuntimeKind::Process).await,
        vec!["dr-one"]
    );
    assert_eq!(store.undrain_drone(&cluster(), &d).await.unwrap(), Some(false));

    // It can be drained again, and of concurrent undrains one reports the change.
    assert_eq!(store.drain_drone(&cluster(), &d).await.unwrap(), Some(true));
    let c = cluster();
    let (a, b) = tokio::join!(store.undrain_drone(&c, &d), store.undrain_drone(&c, &d));
    let mut answers = [a.unwrap(), b.unwrap()];
    answers.sort();
    assert_eq!(answers, [Some(false), Some(true)]);
    assert_eq!(
        schedulable_names(&*store, "", RuntimeKind::Process).await,
        vec!["dr-one"]
    );
}

async fn reregistering_updates_pool_runtimes_and_versions(store: SharedStore) {
    let d = drone(&*store, "dr-one").await;
    store.drone_disconnected(&d, &"co-test".parse().unwrap()).await.unwrap();
    // The drone reconnects, through another controller, with a new configuration.
    let reg = DroneRegistration {
        name: d.clone(),
        cluster: cluster(),
        pool: "gpu".into(),
        runtimes: vec![RuntimeKind::Docker],
        plane_version: "0.2.0".into(),
        plane_hash: "h2".into(),
        controller: "co-other".parse().unwrap(),
    };
    store.register_drone(&reg).await.unwrap();
    let drones = store.drones(&cluster()).await.unwrap();
    assert_eq!(drones.len(), 1);
    let r = &drones[0];
    assert_eq!(
        (
            r.pool.as_str(),
            &r.runtimes,
            r.plane_version.as_str(),
            r.plane_hash.as_str(),
            r.controller.as_ref()
        ),
        ("gpu", &reg.runtimes, "0.2.0", "h2", Some(&reg.controller))
    );
    assert!(r.ready, "{r:?}");
    assert_eq!(
        schedulable_names(&*store, "gpu", RuntimeKind::Docker).await,
        vec!["dr-one"]
    );
    // The old pool and runtime are replaced, not kept beside the new ones.
    assert!(schedulable_names(&*store, "", RuntimeKind::Process).await.is_empty());
    assert!(schedulable_names(&*store, "gpu", RuntimeKind::Process).await.is_empty());
}

async fn cleanup_deletes_old_terminated_backends_and_what_refers_to_them(store: SharedStore) {
    let d = drone(&*store, "dr-one").await;
    let ready = |id: &BackendName, port: u16| {
        let mut u = update(id, BackendStatus::Ready);
        u.address = Some(format!("127.0.0.1:{port}").parse().unwrap());
        u
    };
    // A terminated backend with a token and a revoked one.
    let old = new_backend("old", &d, "k-old");
    store.create_backend(&old).await.unwrap();
    store.apply_update(&d, &ready(&old.id, 5000)).await.unwrap();
    token(&*store, "t-old-a", &old.id, "alice").await;
    token(&*store, "t-old-b", &old.id, "bob").await;
    assert_eq!(store.revoke(&old.id, "bob").await.unwrap(), vec!["t-old-b".to_string()]);
    terminate(&*store, &d, &old.id).await;
    // A live backend, with a token and a revoked static token, and one still scheduled:
    // with a retention of zero, their rows are old enough, but they are not terminated.
    let mut live = new_backend("live", &d, "k-live");
    live.static_token = Some("s.live".into());
    store.create_backend(&live).await.unwrap();
    store.apply_update(&d, &ready(&live.id, 5001)).await.unwrap();
    token(&*store, "t-live", &live.id, "alice").await;
    token(&*store, "s.live", &live.id, "carol").await;
    assert_eq!(
        store.revoke(&live.id, "carol").await.unwrap(),
        vec!["s.live".to_string()]
    );
    let scheduled = new_backend("sched", &d, "k-sched");
    store.create_backend(&scheduled).await.unwrap();
    let live_route = store.route("t-live").await.unwrap().expect("a live token routes");
    let live_record = store.backend(&live.id).await.unwrap();
    let live_history = store.status_history(&live.id).await.unwrap();
    assert_eq!(
        store.route("t-old-a").await.unwrap().map(|r| r.status),
        Some(BackendStatus::Terminated)
    );

    let report = store.cleanup(&cleanup_policy(Duration::ZERO, 100)).await.unwrap();
    assert_eq!(
        report,
        CleanupReport {
            backends: 1,
            tokens: 2,
            status_entries: 3,
        }
    );
    assert!(!report.is_empty());
    assert!(store.backend(&old.id).await.unwrap().is_none());
    assert!(store.status_history(&old.id).await.unwrap().is_empty());
    assert!(store.route("t-old-a").await.unwrap().is_none());
    assert!(store.route("t-old-b").await.unwrap().is_none());
    // Its key is free for a new backend (no row was left pointing at the old one).
    assert!(matches!(
        store.create_backend(&new_backend("new", &d, "k-old")).await.unwrap(),
        CreateOutcome::Created { .. }
    ));

    // Nothing of the live backends changed.
    assert_eq!(store.route("t-live").await.unwrap(), Some(live_route));
    assert_eq!(store.backend(&live.id).await.unwrap(), live_record);
    assert_eq!(store.status_history(&live.id).await.unwrap(), live_history);
    assert_eq!(
        store.key_holder(&key("k-live")).await.unwrap().unwrap().backend_id,
        live.id
    );
    assert_eq!(store.status_history(&scheduled.id).await.unwrap().len(), 1);
    assert_eq!(store.scheduled_backends(&d).await.unwrap().len(), 2);
    // The revoked static token is still recorded, so a connect that issues it again
    // does not make it route again.
    assert!(store.route("s.live").await.unwrap().is_none());
    token(&*store, "s.live", &live.id, "carol").await;
    assert!(store.route("s.live").await.unwrap().is_none());

    assert!(store
        .cleanup(&cleanup_policy(Duration::ZERO, 100))
        .await
        .unwrap()
        .is_empty());
}

async fn cleanup_keeps_backends_terminated_within_the_retention(store: SharedStore) {
    let d = drone(&*store, "dr-one").await;
    // Terminated just now: the backend and its history stay for the retention; its
    // token goes at once (it no longer routes anywhere).
    let recent = new_backend("recent", &d, "k-recent");
    store.create_backend(&recent).await.unwrap();
    token(&*store, "t-recent", &recent.id, "alice").await;
    terminate(&*store, &d, &recent.id).await;
    let hour = Duration::from_secs(3600);
    assert_eq!(
        store.cleanup(&cleanup_policy(hour, 100)).await.unwrap(),
        CleanupReport {
            backends: 0,
            tokens: 1,
            status_entries: 0,
        }
    );
    assert_eq!(
        store.backend(&recent.id).await.unwrap().map(|r| r.status),
        Some(BackendStatus::Terminated)
    );
    assert_eq!(store.status_history(&recent.id).await.unwrap().len(), 2);
    assert!(store.route("t-recent").await.unwrap().is_none());
    assert!(store.cleanup(&cleanup_policy(hour, 100)).await.unwrap().is_empty());

    // The retention counts from the termination, not from the creation: a backend
    // created well before the retention and terminated just now stays. The check is
    // conclusive when the store answered within the retention; it is retried if not.
    let retention = Duration::from_millis(300);
    let mut late = None;
    for attempt in 0..5 {
        let b = new_backend(&format!("late{attempt}"), &d, &format!("k-late{attempt}"));
        store.create_backend(&b).await.unwrap();
        wait_for_store_time(&*store, &d, retention + Duration::from_millis(200)).await;
        let terminated_at = terminate(&*store, &d, &b.id).await.time;
        let report = store.cleanup(&cleanup_policy(retention, 100)).await.unwrap();
        // The recent backend terminated before `b` was created, so it is older than
        // the retention now.
        assert!(store.backend(&recent.id).await.unwrap().is_none(), "{report:?}");
        // A time of the store's clock after the cleanup ran.
        let probe = new_backend(&format!("probe{attempt}"), &d, &format!("k-probe{attempt}"));
        store.create_backend(&probe).await.unwrap();
        let after = store.backend(&probe.id).await.unwrap().unwrap().created_at;
        if after.saturating_sub(terminated_at) < retention.as_millis() as EpochMillis {
            assert!(
                store.backend(&b.id).await.unwrap().is_some(),
                "{} was terminated {}ms before the cleanup",
                b.id,
                after - terminated_at
            );
            late = Some(b);
            break;
        }
    }
    let late = late.expect("the store never answered within the retention");
    // Once the retention has passed, it goes too; the live probes stay.
    wait_for_store_time(&*store, &d, retention + Duration::from_millis(50)).await;
    let report = store.cleanup(&cleanup_policy(retention, 100)).await.unwrap();
    assert!(report.backends >= 1, "{report:?}");
    assert!(store.backend(&late.id).await.unwrap().is_none());
    assert!(store.status_history(&late.id).await.unwrap().is_empty());
    assert!(!store.scheduled_backends(&d).await.unwrap().is_empty());
    assert!(store
        .scheduled_backends(&d)
        .await
        .unwrap()
        .iter()
        .all(|r| r.id.as_str().starts_with("probe")));
}

async fn cleanup_is_bounded_by_the_batch(store: SharedStore) {
    let d = drone(&*store, "dr-one").await;
    let live = new_backend("live", &d, "k-live");
    store.create_backend(&live).await.unwrap();
    token(&*store, "t-live", &live.id, "alice").await;
    // Five terminated backends: four reported by their drone, one marked lost after
    // its lease ran out.
    let mut doomed = Vec::new();
    for i in 0..4 {
        let b = new_backend(&format!("b{i}"), &d, &format!("k{i}"));
        store.create_backend(&b).await.unwrap();
        terminate(&*store, &d, &b.id).await;
        doomed.push(b.id);
    }
    let lost = new_backend_with_lease("lost", &d, "k-lost", Duration::from_millis(200));
    store.create_backend(&lost).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while store.key_holder(&key("k-lost")).await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "lease never expired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(store.mark_lost().await.unwrap().len(), 1);
    doomed.push(lost.id);

    assert!(store
        .cleanup(&cleanup_policy(Duration::ZERO, 0))
        .await
        .unwrap()
        .is_empty());
    let policy = cleanup_policy(Duration::ZERO, 2);
    let mut reports = Vec::new();
    for _ in 0..3 {
        reports.push(store.cleanup(&policy).await.unwrap());
    }
    let counts: Vec<_> = reports
        .iter()
        .map(|r| (r.backends, r.status_entries, r.tokens))
        .collect();
    assert_eq!(counts, vec![(2, 4, 0), (2, 4, 0), (1, 2, 0)]);
    assert!(store.cleanup(&policy).await.unwrap().is_empty());
    for id in &doomed {
        assert!(store.backend(id).await.unwrap().is_none(), "{id} is left");
    }

    // Tokens come in batches too, and a backend goes with its last token.
    let many = new_backend("many", &d, "k-many");
    store.create_backend(&many).await.unwrap();
    for t in ["m0", "m1", "m2"] {
        token(&*store, t, &many.id, "alice").await;
    }
    terminate(&*store, &d, &many.id).await;
    let reports = [
        store.cleanup(&policy).await.unwrap(),
        store.cleanup(&policy).await.unwrap(),
        store.cleanup(&policy).await.unwrap(),
    ];
    assert_eq!(
        reports,
        [
            CleanupReport {
                backends: 0,
                tokens: 2,
                status_entries: 0
            },
            CleanupReport {
                backends: 1,
                tokens: 1,
                status_entries: 2
            },
            CleanupReport::default(),
        ]
    );
    assert!(store.backend(&many.id).await.unwrap().is_none());
    // The live backend was never touched.
    assert_eq!(store.route("t-live").await.unwrap().unwrap().backend_id, live.id);
    assert_eq!(store.status_history(&live.id).await.unwrap().len(), 1);
}

async fn tokens_expire(store: SharedStore) {
    let d = drone(&*store, "dr-one").await;
    store.create_backend(&new_backend("b1", &d, "k")).await.unwrap();
    let id: BackendName = "b1".parse().unwrap();
    for (tok, ttl) in [
        ("short", Some(Duration::from_millis(300))),
        ("long", Some(Duration::from_secs(3600))),
        ("none", None),
    ] {
        store
            .insert_token(&NewToken {
                token: tok.into(),
                backend_id: id.clone(),
                user: None,
                auth: None,
                secret_token: None,
                ttl,
            })
            .await
            .unwrap();
    }
    let long = store.route("long").await.unwrap().unwrap().expires_in.unwrap();
    assert!(
        long > Duration::from_secs(3590) && long <= Duration::from_secs(3600),
        "{long:?}"
    );
    assert_eq!(store.route("none").await.unwrap().unwrap().expires_in, None);
    let short = store.route("short").await.unwrap().unwrap().expires_in.unwrap();
    assert!(short <= Duration::from_millis(300), "{short:?}");
    // Past its expiry (store clock) the token no longer routes; the others still do.
    let deadline = Instant::now() + Duration::from_secs(5);
    while store.route("short").await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "the expired token still routes");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(store.route("long").await.unwrap().is_some());
    assert!(store.route("none").await.unwrap().is_some());
}

async fn cert_lease_is_exclusive_and_carries_txt_values(store: SharedStore) {
    let c: ClusterName = "plane.test".parse().unwrap();
    let other: ClusterName = "other.test".parse().unwrap();
    let a: ProxyName = "px-a".parse().unwrap();
    let b: ProxyName = "px-b".parse().unwrap();
    let minute = Duration::from_secs(60);
    assert!(store.acme_txt(&c).await.unwrap().is_empty());
    assert!(store.acquire_cert_lease(&c, &a, minute).await.unwrap());
    // Another proxy cannot take a live lease, nor publish values under it.
    assert!(!store.acquire_cert_lease(&c, &b, minute).await.unwrap());
    assert!(!store.set_acme_txt(&c, &b, &["evil".into()]).await.unwrap());
    // The holder publishes both values at once, and extends the lease without losing them.
    let values = vec!["v1".to_string(), "v2".to_string()];
    assert!(store.set_acme_txt(&c, &a, &values).await.unwrap());
    assert!(store.acquire_cert_lease(&c, &a, minute).await.unwrap());
    assert_eq!(store.acme_txt(&c).await.unwrap(), values);
    // Clusters are independent.
    assert!(store.acme_txt(&other).await.unwrap().is_empty());
    assert!(store.acquire_cert_lease(&other, &b, minute).await.unwrap());
    // Releasing by someone else does nothing; by the holder frees it and its values.
    store.release_cert_lease(&c, &b).await.unwrap();
    assert_eq!(store.acme_txt(&c).await.unwrap(), values);
    store.release_cert_lease(&c, &a).await.unwrap();
    assert!(store.acme_txt(&c).await.unwrap().is_empty());
    assert!(store
        .acquire_cert_lease(&c, &b, Duration::from_millis(200))
        .await
        .unwrap());
    assert!(store.set_acme_txt(&c, &b, &["b1".into()]).await.unwrap());
    // An expired lease serves no values, can be taken over, and the new holder starts empty.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !store.acme_txt(&c).await.unwrap().is_empty() {
        assert!(Instant::now() < deadline, "an expired lease still serves its values");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!store.set_acme_txt(&c, &b, &["late".into()]).await.unwrap());
    assert!(store.acquire_cert_lease(&c, &a, minute).await.unwrap());
    assert!(store.acme_txt(&c).await.unwrap().is_empty());
}
