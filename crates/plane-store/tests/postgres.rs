//! The PostgreSQL store against a real server (started by `plane-test-postgres`; these
//! tests fail, never skip, when it cannot start):
//! * the conformance suite, a fresh database per check;
//! * the same scripted scenario on SQLite and PostgreSQL gives the same answers;
//! * a stress test on a pool of several connections: one holder per key, strictly
//!   increasing fencing tokens, every update applied once, leases taken over and lost
//!   backends marked exactly once;
//! * migrations are idempotent, also when several controllers migrate at once;
//! * an outage: calls fail within the acquire timeout, and the same store works again
//!   once the server is back;
//! * cleanup skips rows other transactions hold instead of waiting, and concurrent
//!   cleanups delete every row once.

use plane_store::conformance;
use plane_store::conformance::{cleanup_policy, cluster, drone, key, new_backend_with_lease, terminate, token, update};
use plane_store::postgres::{PostgresOptions, PostgresStore};
use plane_store::sqlite::SqliteStore;
use plane_store::LOST_MESSAGE;
use plane_store::{ApplyOutcome, CleanupReport, CreateOutcome, NewToken, ProxyRegistration, SharedStore, Store};
use plane_test_postgres::TestPostgres;
use plane_types::names::BackendName;
use plane_types::status::{BackendStatus, TerminationKind, TerminationReason};
use sqlx::Connection;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn database() -> TestPostgres {
    TestPostgres::database().expect("the test PostgreSQL server must start (see the error)")
}

async fn fresh_store(options: &PostgresOptions) -> PostgresStore {
    let db = database();
    PostgresStore::connect_with(&db.url(), options)
        .await
        .unwrap_or_else(|e| panic!("connecting to {}: {e}", db.url()))
}

/// Polls `check` until it holds, failing after `within`.
async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_until_key_free(store: &dyn Store, key_name: &str) {
    eventually(
        &format!("the lease of {key_name} expires"),
        Duration::from_secs(5),
        || async { store.key_holder(&key(key_name)).await.unwrap().is_none() },
    )
    .await;
}

#[tokio::test]
async fn conformance_suite() {
    conformance::run_all(|| async { Arc::new(fresh_store(&PostgresOptions::default()).await) as SharedStore }).await;
}

/// Runs one scripted scenario and writes down every answer, with the values that must
/// differ between stores (times, ages, fencing token values) taken out.
async fn transcript(store: &dyn Store) -> Vec<String> {
    let mut out = Vec::new();
    let d = drone(store, "dr-one").await;
    store.controller_heartbeat(&"co-test".parse().unwrap()).await.unwrap();
    store
        .register_proxy(&ProxyRegistration {
            name: "px-one".parse().unwrap(),
            cluster: cluster(),
            plane_version: "0.1.0".into(),
            plane_hash: "h".into(),
            controller: "co-test".parse().unwrap(),
        })
        .await
        .unwrap();
    let long = Duration::from_secs(60);
    let mut tokens = Vec::new();
    let mut b1 = new_backend_with_lease("b1", &d, "k", long);
    b1.static_token = Some("s.static".into());
    b1.subdomain = Some("sub".into());
    b1.lifetime_limit_seconds = Some(3600);
    for b in [
        &b1,
        &new_backend_with_lease("b2", &d, "k", long),
        &new_backend_with_lease("b1", &d, "other", long),
    ] {
        let outcome = store.create_backend(b).await.unwrap();
        if let CreateOutcome::Created { fencing_token } = outcome {
            tokens.push(fencing_token);
        }
        out.push(format!(
            "create {}: {:?}",
            b.id,
            matches!(outcome, CreateOutcome::Created { .. })
        ));
        out.push(format!("outcome {:?}", outcome).replace(|c: char| c.is_ascii_digit(), "#"));
    }
    let id1 = b1.id.clone();
    let mut ready = update(&id1, BackendStatus::Ready);
    ready.address = Some("127.0.0.1:5000".parse().unwrap());
    ready.message = Some("up".into());
    for u in [update(&id1, BackendStatus::Loading), ready.clone(), ready] {
        let outcome = store.apply_update(&d, &u).await.unwrap();
        out.push(format!("apply {}: {}", u.status, outcome_text(&outcome)));
    }
    for (tok, user) in [("t1", "alice"), ("t2", "alice"), ("t3", "bob")] {
        store
            .insert_token(&NewToken {
                token: tok.into(),
                backend_id: id1.clone(),
                user: Some(user.into()),
                auth: Some(serde_json::json!({"role": user, "nested": {"n": [1, 2.5, null]}, "z": "\u{0}"})),
                secret_token: Some(format!("secret-{tok}")),
                ttl: None,
            })
            .await
            .unwrap();
    }
    out.push(format!("route t1: {:?}", store.route("t1").await.unwrap()));
    let mut revoked = store.revoke(&id1, "alice").await.unwrap();
    revoked.sort();
    out.push(format!("revoked: {revoked:?}"));
    out.push(format!("route t1 after: {:?}", store.route("t1").await.unwrap()));
    out.push(format!("holder: {:?}", store.key_holder(&key("k")).await.unwrap()));
    for (kind, reason) in [
        (TerminationKind::Soft, TerminationReason::External),
        (TerminationKind::Hard, TerminationReason::KeyExpired),
        (TerminationKind::Soft, TerminationReason::Swept),
    ] {
        let r = store.request_termination(&id1, kind, reason).await.unwrap();
        out.push(format!("request {kind:?} {reason:?}: {r:?}"));
    }
    out.push(format!("pending: {:?}", store.pending_terminations(&d).await.unwrap()));
    let mut done = update(&id1, BackendStatus::Terminating);
    done.message = Some("going".into());
    let outcome = store.apply_update(&d, &done).await.unwrap();
    out.push(format!("apply terminating: {}", outcome_text(&outcome)));
    let mut exit = update(&id1, BackendStatus::Terminated);
    exit.exit_code = Some(1);
    let outcome = store.apply_update(&d, &exit).await.unwrap();
    out.push(format!("apply terminated: {}", outcome_text(&outcome)));
    out.push(format!(
        "pending after: {:?}",
        store.pending_terminations(&d).await.unwrap()
    ));

    // A lifetime of 0 is swept at once; huge limits are never reached (and must not
    // overflow); idle time counts only once ready.
    let mut b3 = new_backend_with_lease("b3", &d, "k", long);
    b3.lifetime_limit_seconds = Some(0);
    let mut b5 = new_backend_with_lease("b5", &d, "k5", long);
    b5.lifetime_limit_seconds = Some(u64::MAX);
    b5.max_idle_seconds = Some(u64::MAX);
    let mut b6 = new_backend_with_lease("b6", &d, "k6", long);
    b6.max_idle_seconds = Some(0);
    for b in [&b3, &b5, &b6] {
        if let CreateOutcome::Created { fencing_token } = store.create_backend(b).await.unwrap() {
            tokens.push(fencing_token);
        }
    }
    store
        .apply_update(&d, &update(&b5.id, BackendStatus::Ready))
        .await
        .unwrap();
    out.push(format!(
        "scheduled: {:?}",
        ids(store.scheduled_backends(&d).await.unwrap())
    ));
    let mut swept: Vec<_> = store.sweep().await.unwrap();
    swept.sort_by(|a, b| a.backend_id.as_str().cmp(b.backend_id.as_str()));
    out.push(format!("sweep: {swept:?}"));
    store
        .apply_update(&d, &update(&b6.id, BackendStatus::Ready))
        .await
        .unwrap();
    store
        .keepalive(&[b5.id.clone(), "ghost".parse().unwrap()])
        .await
        .unwrap();
    out.push(format!("sweep again: {:?}", store.sweep().await.unwrap()));
    out.push(format!("sweep once: {:?}", store.sweep().await.unwrap()));

    // A lease that runs out: the backend is marked lost once, and the key is free.
    let b4 = new_backend_with_lease("b4", &d, "k4", Duration::from_millis(200));
    if let CreateOutcome::Created { fencing_token } = store.create_backend(&b4).await.unwrap() {
        tokens.push(fencing_token);
    }
    wait_until_key_free(store, "k4").await;
    let lost: Vec<_> = store
        .mark_lost()
        .await
        .unwrap()
        .into_iter()
        .map(|(id, mut e)| {
            e.time = 0;
            (id, e)
        })
        .collect();
    out.push(format!("lost: {lost:?}"));
    out.push(format!("lost again: {:?}", store.mark_lost().await.unwrap()));

    for id in ["b1", "b3", "b4", "b5", "b6"] {
        let id: BackendName = id.parse().unwrap();
        let mut rec = store.backend(&id).await.unwrap().unwrap();
        rec.created_at = 0;
        rec.fencing_token = tokens.iter().position(|&t| t == rec.fencing_token).unwrap() as i64;
        out.push(format!("record: {rec:?}"));
        let history: Vec<_> = store
            .status_history(&id)
            .await
            .unwrap()
            .into_iter()
            .map(|mut e| {
                e.time = 0;
                e
            })
            .collect();
        out.push(format!("history {id}: {history:?}"));
    }
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "fencing tokens increase: {tokens:?}"
    );
    out.push(format!("drain: {:?}", store.drain_drone(&cluster(), &d).await.unwrap()));
    out.push(format!(
        "drain again: {:?}",
        store.drain_drone(&cluster(), &d).await.unwrap()
    ));
    let drones: Vec<_> = store
        .drones(&cluster())
        .await
        .unwrap()
        .into_iter()
        .map(|mut r| {
            assert!(r.last_heartbeat_age < Duration::from_secs(30), "{r:?}");
            r.last_heartbeat_age = Duration::ZERO;
            r.controller_heartbeat_age = r.controller_heartbeat_age.map(|_| Duration::ZERO);
            r
        })
        .collect();
    out.push(format!("drones: {drones:?}"));
    let proxies: Vec<_> = store
        .proxies(&cluster())
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.registration)
        .collect();
    out.push(format!("proxies: {proxies:?}"));

    out.push(format!(
        "undrain: {:?}",
        store.undrain_drone(&cluster(), &d).await.unwrap()
    ));
    out.push(format!(
        "undrain again: {:?}",
        store.undrain_drone(&cluster(), &d).await.unwrap()
    ));
    // Tokens of terminated backends go at once, backends after the retention; one
    // backend (the longest terminated) per call here.
    let hour = Duration::from_secs(3600);
    for policy in [
        cleanup_policy(hour, 2),
        cleanup_policy(Duration::ZERO, 1),
        cleanup_policy(Duration::ZERO, 1),
        cleanup_policy(Duration::ZERO, 1),
    ] {
        out.push(format!(
            "cleanup {policy:?}: {:?}",
            store.cleanup(&policy).await.unwrap()
        ));
    }
    for id in ["b1", "b3", "b4", "b5", "b6"] {
        let id: BackendName = id.parse().unwrap();
        out.push(format!(
            "after cleanup {id}: {:?}",
            store.backend(&id).await.unwrap().map(|r| r.status)
        ));
    }
    out.push(format!(
        "route t3 after cleanup: {:?}",
        store.route("t3").await.unwrap()
    ));
    out
}

fn outcome_text(outcome: &ApplyOutcome) -> String {
    match outcome {
        ApplyOutcome::Advanced(entry) => {
            let mut entry = entry.clone();
            entry.time = 0;
            format!("Advanced({entry:?})")
        }
        other => format!("{other:?}"),
    }
}

fn ids(records: Vec<plane_store::BackendRecord>) -> Vec<String> {
    records.into_iter().map(|r| r.id.to_string()).collect()
}

#[tokio::test]
async fn answers_like_the_sqlite_store() {
    let sqlite = transcript(&SqliteStore::in_memory().await.unwrap()).await;
    let postgres = transcript(&fresh_store(&PostgresOptions::default()).await).await;
    for (i, (s, p)) in sqlite.iter().zip(&postgres).enumerate() {
        assert_eq!(s, p, "answer {i} differs (left SQLite, right PostgreSQL)");
    }
    assert_eq!(sqlite.len(), postgres.len());
    assert!(sqlite.iter().any(|line| line.contains(LOST_MESSAGE)));
}

#[tokio::test]
async fn drone_messages_with_nul_characters_are_stored() {
    let store = fresh_store(&PostgresOptions::default()).await;
    let d = drone(&store, "dr-one").await;
    let b = new_backend_with_lease("b1", &d, "k", Duration::from_secs(60));
    store.create_backend(&b).await.unwrap();
    let mut u = update(&b.id, BackendStatus::Terminated);
    u.message = Some("exit\0ed".into());
    let ApplyOutcome::Advanced(entry) = store.apply_update(&d, &u).await.unwrap() else {
        panic!("must advance")
    };
    assert_eq!(entry.message.as_deref(), Some("exit\u{FFFD}ed"));
    let rec = store.backend(&b.id).await.unwrap().unwrap();
    assert_eq!(rec.message.as_deref(), Some("exit\u{FFFD}ed"));
    assert_eq!(store.status_history(&b.id).await.unwrap()[1], entry);
}

/// What the stress workers saw, checked as they go.
#[derive(Default)]
struct Ledger {
    /// The backend each key is held by, as far as the workers know: entered after the
    /// store said `Created`, left before the store is told `Terminated`, so it is
    /// never wider than the store's own holding.
    holders: HashMap<String, BackendName>,
    /// The last fencing token per key.
    last_token: HashMap<String, i64>,
    /// Every token issued.
    tokens: HashSet<i64>,
    /// Every backend created.
    created: Vec<BackendName>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stress_one_holder_per_key_and_increasing_tokens() {
    let options = PostgresOptions {
        max_connections: 8,
        ..PostgresOptions::default()
    };
    let store = Arc::new(fresh_store(&options).await);
    let d = drone(&*store, "dr-one").await;
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let started = Instant::now();

    // Phase 1: get-or-create on a few contended keys, with renewals, duplicated and
    // concurrent reports, termination requests and sweeps on each holder.
    const KEYS: usize = 5;
    const WORKERS: usize = 24;
    const ROUNDS: usize = 30;
    let mut tasks = Vec::new();
    for w in 0..WORKERS {
        let (store, ledger, d) = (store.clone(), ledger.clone(), d.clone());
        tasks.push(tokio::spawn(async move {
            let mut won = 0;
            for r in 0..ROUNDS {
                let key_name = format!("key{}", (w + r) % KEYS);
                let b = new_backend_with_lease(&format!("s{w}-{r}"), &d, &key_name, Duration::from_secs(60));
                let fencing_token = match store.create_backend(&b).await.unwrap() {
                    CreateOutcome::Created { fencing_token } => fencing_token,
                    CreateOutcome::KeyHeld => continue,
                    CreateOutcome::IdTaken => panic!("{} is a fresh id", b.id),
                };
                won += 1;
                {
                    let mut l = ledger.lock().unwrap();
                    if let Some(other) = l.holders.insert(key_name.clone(), b.id.clone()) {
                        panic!("{key_name} is held by {other} and {} at once", b.id);
                    }
                    if let Some(prev) = l.last_token.insert(key_name.clone(), fencing_token) {
                        assert!(fencing_token > prev, "{key_name}: token {fencing_token} after {prev}");
                    }
                    assert!(l.tokens.insert(fencing_token), "token {fencing_token} issued twice");
                    l.created.push(b.id.clone());
                }
                let lease = Duration::from_secs(60);
                let ready = update(&b.id, BackendStatus::Ready);
                let (r1, r2, a1, a2, t1, t2, _, swept, lost) = tokio::join!(
                    store.renew_key(&b.id, fencing_token, lease),
                    store.renew_key(&b.id, fencing_token, lease),
                    store.apply_update(&d, &ready),
                    store.apply_update(&d, &ready),
                    store.request_termination(&b.id, TerminationKind::Soft, TerminationReason::External),
                    store.request_termination(&b.id, TerminationKind::Hard, TerminationReason::External),
                    store.keepalive(std::slice::from_ref(&b.id)),
                    store.sweep(),
                    store.mark_lost(),
                );
                assert!(r1.unwrap() && r2.unwrap(), "a live holder renews");
                let advanced = [a1.unwrap(), a2.unwrap()]
                    .iter()
                    .filter(|o| matches!(o, ApplyOutcome::Advanced(_)))
                    .count();
                assert_eq!(advanced, 1, "one of two identical reports applies");
                assert!(t1.unwrap().is_some() && t2.unwrap().is_some());
                assert!(
                    swept.unwrap().iter().all(|t| t.backend_id != b.id),
                    "no limits, never swept"
                );
                assert!(
                    lost.unwrap().iter().all(|(id, _)| *id != b.id),
                    "a live lease is not lost"
                );
                let holder = store.key_holder(&key(&key_name)).await.unwrap().unwrap();
                assert_eq!(holder.backend_id, b.id);
                let pending = store.backend(&b.id).await.unwrap().unwrap().pending_termination;
                assert_eq!(pending, Some((TerminationKind::Hard, TerminationReason::External)));

                ledger.lock().unwrap().holders.remove(&key_name);
                let mut exit = update(&b.id, BackendStatus::Terminated);
                exit.exit_code = Some(0);
                let (e1, e2, renewed) = tokio::join!(
                    store.apply_update(&d, &exit),
                    store.apply_update(&d, &exit),
                    store.renew_key(&b.id, fencing_token, lease),
                );
                let advanced = [e1.unwrap(), e2.unwrap()]
                    .iter()
                    .filter(|o| matches!(o, ApplyOutcome::Advanced(_)))
                    .count();
                assert_eq!(advanced, 1, "one of two identical exits applies");
                renewed.unwrap();
                assert!(!store.renew_key(&b.id, fencing_token, lease).await.unwrap());
            }
            won
        }));
    }
    let mut wins = 0;
    for t in tasks {
        wins += t.await.unwrap();
    }
    assert!(wins >= KEYS, "every key was won at least once ({wins} wins)");
    let phase1 = started.elapsed();

    // Every history moves forward, in time too, and has one entry per status.
    let created = ledger.lock().unwrap().created.clone();
    for id in &created {
        let history = store.status_history(id).await.unwrap();
        let statuses: Vec<_> = history.iter().map(|e| e.status).collect();
        assert_eq!(
            statuses,
            vec![
                BackendStatus::Scheduled,
                BackendStatus::Ready,
                BackendStatus::Terminated
            ],
            "{id}"
        );
        assert!(history.windows(2).all(|w| w[0].time <= w[1].time), "{id}: {history:?}");
    }

    // Phase 2: expired leases taken over by racing creators, while the previous holder
    // renews with its old token and the lost sweep runs.
    const TAKEOVER_KEYS: usize = 3;
    const TAKEOVERS: usize = 3;
    const RACERS: usize = 10;
    let mut tasks = Vec::new();
    for k in 0..TAKEOVER_KEYS {
        let (store, d) = (store.clone(), d.clone());
        tasks.push(tokio::spawn(async move {
            let key_name = format!("expiring{k}");
            let lease = Duration::from_millis(700);
            let mut previous: Option<(BackendName, i64)> = None;
            for round in 0..=TAKEOVERS {
                let mut racers = Vec::new();
                for i in 0..RACERS {
                    let (store, b) = (
                        store.clone(),
                        new_backend_with_lease(&format!("e{k}-{round}-{i}"), &d, &key_name, lease),
                    );
                    racers.push(tokio::spawn(async move {
                        let outcome = store.create_backend(&b).await.unwrap();
                        (b.id, outcome)
                    }));
                }
                let stale_renewal = previous
                    .clone()
                    .map(|(id, token)| (store.clone(), id, token))
                    .map(|(store, id, token)| tokio::spawn(async move { store.renew_key(&id, token, lease).await }));
                let lost = store.mark_lost().await.unwrap();
                let mut winners = Vec::new();
                for r in racers {
                    if let (id, CreateOutcome::Created { fencing_token }) = r.await.unwrap() {
                        winners.push((id, fencing_token));
                    }
                }
                assert_eq!(winners.len(), 1, "{key_name} round {round}: {winners:?}");
                let winner = winners.pop().unwrap();
                assert!(lost.iter().all(|(id, _)| *id != winner.0), "a fresh lease is not lost");
                if let (Some((prev_id, prev_token)), Some(renewal)) = (&previous, stale_renewal) {
                    assert!(!renewal.await.unwrap().unwrap(), "an expired lease is not renewed");
                    assert!(winner.1 > *prev_token, "the taker's token is larger");
                    // The lost sweep ran after the previous lease expired: it is lost.
                    let rec = store.backend(prev_id).await.unwrap().unwrap();
                    assert_eq!(rec.status, BackendStatus::Terminated, "{prev_id}");
                    assert_eq!(rec.termination_reason, Some(TerminationReason::Lost));
                }
                wait_until_key_free(&*store, &key_name).await;
                previous = Some(winner);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let phase2 = started.elapsed() - phase1;

    // Phase 3: expired backends whose drone reports the exit just as two lost sweeps
    // run: each ends terminated exactly once, by one of them.
    const EXPIRED: usize = 12;
    let mut expired = Vec::new();
    for i in 0..EXPIRED {
        let b = new_backend_with_lease(&format!("x{i}"), &d, &format!("xkey{i}"), Duration::from_millis(300));
        assert!(matches!(
            store.create_backend(&b).await.unwrap(),
            CreateOutcome::Created { .. }
        ));
        expired.push(b.id);
    }
    for i in 0..EXPIRED {
        wait_until_key_free(&*store, &format!("xkey{i}")).await;
    }
    let reports: Vec<_> = expired
        .iter()
        .map(|id| {
            let (store, d, u) = (store.clone(), d.clone(), update(id, BackendStatus::Terminated));
            tokio::spawn(async move { store.apply_update(&d, &u).await.unwrap() })
        })
        .collect();
    let sweeps: Vec<_> = (0..2)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.mark_lost().await.unwrap() })
        })
        .collect();
    let mut terminated_by = HashMap::new();
    for (id, report) in expired.iter().zip(reports) {
        if matches!(report.await.unwrap(), ApplyOutcome::Advanced(_)) {
            terminated_by.insert(id.clone(), "drone");
        }
    }
    for sweep in sweeps {
        for (id, entry) in sweep.await.unwrap() {
            assert_eq!(entry.message.as_deref(), Some(LOST_MESSAGE));
            if expired.contains(&id) {
                assert!(
                    terminated_by.insert(id.clone(), "lost").is_none(),
                    "{id} terminated twice"
                );
            }
        }
    }
    assert_eq!(terminated_by.len(), EXPIRED, "{terminated_by:?}");
    for id in &expired {
        let history = store.status_history(id).await.unwrap();
        let terminal = history.iter().filter(|e| e.status == BackendStatus::Terminated).count();
        assert_eq!(terminal, 1, "{id}: {history:?}");
    }

    // Phase 4: concurrent sweeps (each due backend once, also while termination
    // requests and keepalives come in), drains (one starts it) and revocations (each
    // token once).
    const DUE: usize = 16;
    let mut due = HashSet::new();
    for i in 0..DUE {
        let mut b = new_backend_with_lease(&format!("due{i}"), &d, &format!("duekey{i}"), Duration::from_secs(60));
        b.lifetime_limit_seconds = Some(0);
        store.create_backend(&b).await.unwrap();
        due.insert(b.id);
    }
    let sweeps: Vec<_> = (0..4)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.sweep().await.unwrap() })
        })
        .collect();
    let requests: Vec<_> = due
        .iter()
        .map(|id| {
            let (store, id) = (store.clone(), id.clone());
            tokio::spawn(async move {
                store.keepalive(std::slice::from_ref(&id)).await.unwrap();
                store
                    .request_termination(&id, TerminationKind::Soft, TerminationReason::External)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut swept = Vec::new();
    for t in sweeps {
        swept.extend(t.await.unwrap().into_iter().map(|t| t.backend_id));
    }
    for t in requests {
        assert!(t.await.unwrap().is_some());
    }
    let swept_set: HashSet<_> = swept.iter().cloned().collect();
    assert_eq!(swept.len(), swept_set.len(), "swept twice: {swept:?}");
    for id in &due {
        let pending = store.backend(id).await.unwrap().unwrap().pending_termination;
        let expected_reason = if swept_set.contains(id) {
            TerminationReason::Swept
        } else {
            TerminationReason::External
        };
        assert_eq!(pending, Some((TerminationKind::Soft, expected_reason)), "{id}");
    }

    let drains: Vec<_> = (0..8)
        .map(|_| {
            let (store, d) = (store.clone(), d.clone());
            tokio::spawn(async move { store.drain_drone(&cluster(), &d).await.unwrap() })
        })
        .collect();
    let mut started_draining = 0;
    for t in drains {
        if t.await.unwrap() == Some(true) {
            started_draining += 1;
        }
    }
    assert_eq!(started_draining, 1);
    let owner = created[0].clone();
    for i in 0..20 {
        store
            .insert_token(&NewToken {
                token: format!("tok{i}"),
                backend_id: owner.clone(),
                user: Some("alice".into()),
                auth: None,
                secret_token: None,
                ttl: None,
            })
            .await
            .unwrap();
    }
    let revokes: Vec<_> = (0..6)
        .map(|_| {
            let (store, owner) = (store.clone(), owner.clone());
            tokio::spawn(async move { store.revoke(&owner, "alice").await.unwrap() })
        })
        .collect();
    let mut expected: Vec<_> = (0..20).map(|i| format!("tok{i}")).collect();
    expected.sort();
    for t in revokes {
        let mut revoked = t.await.unwrap();
        revoked.sort();
        // Every call returns every token, so any of them can invalidate caches.
        assert_eq!(revoked, expected, "a concurrent revoke missed tokens");
    }
    for t in &expected {
        assert!(store.route(t).await.unwrap().is_none(), "{t} still routes");
    }
    eprintln!(
        "stress: {wins} acquisitions in {phase1:?}, {} takeovers in {phase2:?}, total {:?}",
        TAKEOVER_KEYS * TAKEOVERS,
        started.elapsed()
    );
}

#[tokio::test]
async fn migrations_are_idempotent_and_may_run_concurrently() {
    let db = database();
    // Three controllers starting at once on an empty database.
    let connects: Vec<_> = (0..3)
        .map(|_| {
            let url = db.url();
            tokio::spawn(async move { PostgresStore::connect(&url).await })
        })
        .collect();
    let mut stores = Vec::new();
    for c in connects {
        stores.push(c.await.unwrap().unwrap());
    }
    for store in &stores {
        store.migrate().await.unwrap();
        store.migrate().await.unwrap();
    }
    let store = &stores[0];
    let d = drone(store, "dr-one").await;
    assert!(matches!(
        store
            .create_backend(&new_backend_with_lease("b1", &d, "k", Duration::from_secs(60)))
            .await
            .unwrap(),
        CreateOutcome::Created { fencing_token: 1 }
    ));
    // A store connected without migrating uses the schema as it is.
    let plain = PostgresStore::connect_with(
        &db.url(),
        &PostgresOptions {
            migrate: false,
            ..PostgresOptions::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(plain.drones(&cluster()).await.unwrap().len(), 1);
    // An unmigrated database is an error from the calls, not a panic.
    let empty = database();
    let unmigrated = PostgresStore::connect_with(
        &empty.url(),
        &PostgresOptions {
            migrate: false,
            ..PostgresOptions::default()
        },
    )
    .await
    .unwrap();
    let err = unmigrated.drones(&cluster()).await.unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
}

#[tokio::test]
async fn an_outage_fails_calls_quickly_and_the_store_recovers() {
    let pg = TestPostgres::start().expect("a private test PostgreSQL server must start");
    let acquire_timeout = Duration::from_secs(1);
    let store = PostgresStore::connect_with(
        &pg.url(),
        &PostgresOptions {
            max_connections: 4,
            acquire_timeout,
            ..PostgresOptions::default()
        },
    )
    .await
    .unwrap();
    let d = drone(&store, "dr-one").await;
    let b = new_backend_with_lease("b1", &d, "k", Duration::from_secs(60));
    store.create_backend(&b).await.unwrap();
    let shown = format!("{store:?}");
    assert!(shown.contains(&pg.port().to_string()), "{shown}");

    pg.stop().unwrap();
    for call in ["ping", "create_backend", "apply_update"] {
        let t = Instant::now();
        let result = match call {
            "ping" => store.ping().await.map(|_| ()),
            "create_backend" => store
                .create_backend(&new_backend_with_lease("b2", &d, "k2", Duration::from_secs(60)))
                .await
                .map(|_| ()),
            _ => store
                .apply_update(&d, &update(&b.id, BackendStatus::Ready))
                .await
                .map(|_| ()),
        };
        let took = t.elapsed();
        let err = result.expect_err("the server is down");
        assert!(
            took < acquire_timeout + Duration::from_secs(2),
            "{call} took {took:?}: {err}"
        );
        eprintln!("{call} during the outage: {err} after {took:?}");
    }
    // Connecting while the server is down fails too, bounded the same way.
    let t = Instant::now();
    let options = PostgresOptions {
        acquire_timeout,
        ..PostgresOptions::default()
    };
    assert!(PostgresStore::connect_with(&pg.url(), &options).await.is_err());
    assert!(t.elapsed() < acquire_timeout + Duration::from_secs(2));

    pg.restart().unwrap();
    // The same store, not recreated: the very first call works again, and the data
    // written before the outage is there.
    store.ping().await.unwrap();
    let rec = store.backend(&b.id).await.unwrap().unwrap();
    assert_eq!(rec.status, BackendStatus::Scheduled);
    assert!(matches!(
        store
            .apply_update(&d, &update(&b.id, BackendStatus::Ready))
            .await
            .unwrap(),
        ApplyOutcome::Advanced(_)
    ));
    assert!(matches!(
        store
            .create_backend(&new_backend_with_lease("b2", &d, "k2", Duration::from_secs(60)))
            .await
            .unwrap(),
        CreateOutcome::Created { .. }
    ));
}

#[tokio::test]
async fn cleanup_skips_rows_another_transaction_holds() {
    let db = database();
    let store = PostgresStore::connect(&db.url()).await.unwrap();
    let d = drone(&store, "dr-one").await;
    let long = Duration::from_secs(60);
    for name in ["free", "held", "tok"] {
        let b = new_backend_with_lease(name, &d, &format!("k-{name}"), long);
        store.create_backend(&b).await.unwrap();
        if name == "tok" {
            token(&store, "t-locked", &b.id, "alice").await;
            token(&store, "t-free", &b.id, "bob").await;
        }
        terminate(&store, &d, &b.id).await;
    }
    // Another session holds the row of `held` (as a late report does) and one token
    // of `tok` (as a revocation in progress does).
    let mut other = sqlx::PgConnection::connect(&db.url()).await.unwrap();
    let mut tx = other.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM backend WHERE id = 'held' FOR NO KEY UPDATE")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    sqlx::query("SELECT 1 FROM token WHERE token = 't-locked' FOR UPDATE")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    let policy = cleanup_policy(Duration::ZERO, 100);
    let report = tokio::time::timeout(Duration::from_secs(5), store.cleanup(&policy))
        .await
        .expect("cleanup waited for a row another transaction holds")
        .unwrap();
    assert_eq!(
        report,
        CleanupReport {
            backends: 1,
            tokens: 1,
            status_entries: 2,
        }
    );
    assert!(store.backend(&"free".parse().unwrap()).await.unwrap().is_none());
    assert!(store.backend(&"held".parse().unwrap()).await.unwrap().is_some());
    assert!(store.backend(&"tok".parse().unwrap()).await.unwrap().is_some());
    tx.rollback().await.unwrap();
    // Released: the rest goes.
    assert_eq!(
        store.cleanup(&policy).await.unwrap(),
        CleanupReport {
            backends: 2,
            tokens: 1,
            status_entries: 4,
        }
    );
    assert!(store.cleanup(&policy).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_cleanups_delete_each_row_once() {
    let options = PostgresOptions {
        max_connections: 8,
        ..PostgresOptions::default()
    };
    let store = Arc::new(fresh_store(&options).await);
    let d = drone(&*store, "dr-one").await;
    let long = Duration::from_secs(60);
    let live = new_backend_with_lease("live", &d, "k-live", long);
    store.create_backend(&live).await.unwrap();
    store
        .apply_update(&d, &update(&live.id, BackendStatus::Ready))
        .await
        .unwrap();
    token(&*store, "t-live", &live.id, "alice").await;
    // Terminated backends, each with a token, a revoked token and three statuses.
    const BACKENDS: usize = 40;
    let mut doomed = Vec::new();
    for i in 0..BACKENDS {
        let b = new_backend_with_lease(&format!("b{i:02}"), &d, &format!("k{i}"), long);
        store.create_backend(&b).await.unwrap();
        store
            .apply_update(&d, &update(&b.id, BackendStatus::Ready))
            .await
            .unwrap();
        token(&*store, &format!("ta{i}"), &b.id, "alice").await;
        token(&*store, &format!("tb{i}"), &b.id, "bob").await;
        store.revoke(&b.id, "bob").await.unwrap();
        terminate(&*store, &d, &b.id).await;
        doomed.push(b.id);
    }
    let expected = CleanupReport {
        backends: BACKENDS as u64,
        tokens: 2 * BACKENDS as u64,
        status_entries: 3 * BACKENDS as u64,
    };

    // Three cleaners at once, while late reports, keepalives and revocations lock the
    // same rows, and the live backend gets tokens and routes.
    const CLEANERS: usize = 3;
    let start = Arc::new(tokio::sync::Barrier::new(CLEANERS + 2));
    let done = Arc::new(AtomicBool::new(false));
    let mut cleaners = Vec::new();
    for _ in 0..CLEANERS {
        let (store, start) = (store.clone(), start.clone());
        cleaners.push(tokio::spawn(async move {
            start.wait().await;
            let mut total = CleanupReport::default();
            let mut calls = 0;
            loop {
                let r = store.cleanup(&cleanup_policy(Duration::ZERO, 3)).await.unwrap();
                assert!(r.backends <= 3 && r.tokens <= 3 + 3 * 2, "{r:?}");
                calls += 1;
                if r.is_empty() {
                    return (total, calls);
                }
                total += r;
            }
        }));
    }
    let disturbers = {
        let (store, start, done, d, doomed) = (store.clone(), start.clone(), done.clone(), d.clone(), doomed.clone());
        let live = live.id.clone();
        tokio::spawn(async move {
            start.wait().await;
            let mut round = 0;
            while !done.load(Ordering::SeqCst) {
                let late = &doomed[round % doomed.len()];
                let late_report = update(late, BackendStatus::Terminated);
                let (keepalive, report, revoke, route) = tokio::join!(
                    store.keepalive(&doomed),
                    store.apply_update(&d, &late_report),
                    store.revoke(late, "alice"),
                    store.route("t-live"),
                );
                keepalive.unwrap();
                let report = report.unwrap();
                assert!(
                    matches!(report, ApplyOutcome::Stale | ApplyOutcome::UnknownBackend),
                    "{report:?}"
                );
                revoke.unwrap();
                assert_eq!(route.unwrap().unwrap().status, BackendStatus::Ready);
                token(&*store, &format!("live{round}"), &live, "alice").await;
                round += 1;
            }
            round
        })
    };
    start.wait().await;
    let mut total = CleanupReport::default();
    for c in cleaners {
        let (t, calls) = c.await.unwrap();
        eprintln!("cleaner: {t:?} in {calls} calls");
        total += t;
    }
    done.store(true, Ordering::SeqCst);
    let rounds = disturbers.await.unwrap();
    eprintln!("cleanup raced with {rounds} rounds of other calls");
    // A cleaner may have stopped on rows the others held; what is left goes now.
    loop {
        let r = store.cleanup(&cleanup_policy(Duration::ZERO, 100)).await.unwrap();
        if r.is_empty() {
            break;
        }
        total += r;
    }
    assert_eq!(total, expected, "every row deleted once");
    for id in &doomed {
        assert!(store.backend(id).await.unwrap().is_none(), "{id} is left");
        assert!(store.status_history(id).await.unwrap().is_empty());
    }
    assert_eq!(store.status_history(&live.id).await.unwrap().len(), 2);
    assert_eq!(
        store.route("t-live").await.unwrap().map(|r| r.backend_id),
        Some(live.id.clone())
    );
    for round in 0..rounds {
        assert!(store.route(&format!("live{round}")).await.unwrap().is_some());
    }
}
