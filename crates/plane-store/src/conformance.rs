//! A test suite written against the [`Store`] trait, so every implementation (SQLite
//! today, PostgreSQL later) runs the same checks unchanged.
//!
//! Call [`run_all`] with a factory that returns a fresh, empty store.

use crate::{
    ApplyOutcome, BackendUpdate, CreateOutcome, DroneRegistration, NewBackend, NewToken, ProxyRegistration,
    SharedStore, Store,
};
use plane_types::api::KeyConfig;
use plane_types::executable::{Executable, RuntimeKind};
use plane_types::names::{BackendName, ClusterName, DroneName};
use plane_types::status::{BackendStatus, TerminationKind, TerminationReason};
use std::future::Future;
use std::time::Duration;

/// Runs every check, each on a fresh store from `make`.
pub async fn run_all<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = SharedStore>,
{
    drones_register_heartbeat_and_drain(make().await).await;
    keys_are_exclusive_and_fencing_tokens_increase(make().await).await;
    statuses_only_move_forward(make().await).await;
    termination_releases_key(make().await).await;
    renewal_and_expiry(make().await).await;
    tokens_route_and_revoke(make().await).await;
    sweep_idle_and_lifetime(make().await).await;
    termination_requests(make().await).await;
    concurrent_creates_yield_one_holder(make().await).await;
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
    store.drone_disconnected(&d, &"co-other".parse().unwrap()).await.unwrap();
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
    store.proxy_disconnected(&p.name, &"co-other".parse().unwrap()).await.unwrap();
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
    assert!(store.revoke(&id, "alice").await.unwrap().is_empty());
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
