//! The ACME certificate manager (`plane_proxy::acme`) against a real pebble, which
//! validates the dns-01 challenges by asking a real `plane-dns` server.
//!
//! The controller is played by [`FakeController`]: it holds the cluster's issuance lease
//! and TXT values in memory, serves the lease to the proxies ([`IssuanceLease`]) and the
//! values to the DNS server ([`TxtSource`]), and records every call, so the tests can
//! check what each side saw. The real controller's side is tested end to end elsewhere.

use plane_dns::{DnsConfig, TxtSource};
use plane_proxy::acme::{self, AcmeConfig, CertSink, IssuanceLease, LeaseHeld};
use plane_test_pebble::{Pebble, PebbleOptions};
use rustls::client::danger::ServerCertVerifier as _;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const CLUSTER: &str = "plane.test";
/// How long a test waits for something that should happen.
const PATIENCE: Duration = Duration::from_secs(90);
/// An EAB HMAC key (base64url) made up for these tests.
const EAB_KEY: &str = "ZWFiLWtleS1mb3ItcGxhbmUtcHJveHktYWNtZS10ZXN0cy1vbmx5LTAxMjM0NTY3";
const WRONG_EAB_KEY: &str = "bm90LXRoZS1yaWdodC1rZXktZm9yLXRoaXMtZWFiLWtpZC1hdC1hbGwtOTg3NjU0";

#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    Acquire {
        proxy: String,
        granted: bool,
    },
    AcquireFailed {
        proxy: String,
    },
    SetTxt {
        proxy: String,
        values: Vec<String>,
    },
    Release {
        proxy: String,
    },
    /// The test freed a lease held by "another proxy".
    Freed,
}

#[derive(Default)]
struct State {
    /// The proxy holding the lease.
    holder: Option<String>,
    /// The published TXT values.
    txt: Vec<String>,
    /// Make `acquire` fail (a controller outage).
    failing: bool,
    /// Every lease call, in order.
    log: Vec<Call>,
    /// The non-empty TXT answers given to the DNS server.
    dns_answers: Vec<Vec<String>>,
}

/// The controller's part: the lease and the TXT values, in memory.
#[derive(Default)]
struct FakeController {
    state: Mutex<State>,
    /// Bumped on every change, for tests to wait on.
    changed: watch::Sender<u64>,
}

impl FakeController {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    fn update<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let result = f(&mut self.state());
        self.changed.send_modify(|n| *n += 1);
        result
    }

    /// Waits until `pred` holds for the state.
    async fn wait_until(&self, what: &str, pred: impl Fn(&State) -> bool) {
        let mut rx = self.changed.subscribe();
        let waited = tokio::time::timeout(PATIENCE, async {
            loop {
                if pred(&self.state()) {
                    return;
                }
                rx.changed().await.unwrap();
            }
        })
        .await;
        assert!(
            waited.is_ok(),
            "timed out waiting until {what}; calls: {:#?}",
            self.state().log
        );
    }

    fn lease(self: &Arc<Self>, proxy: &str) -> Arc<ProxyLease> {
        Arc::new(ProxyLease {
            controller: self.clone(),
            proxy: proxy.to_owned(),
        })
    }
}

#[async_trait::async_trait]
impl TxtSource for FakeController {
    async fn txt_values(&self, cluster: &str) -> anyhow::Result<Vec<String>> {
        Ok(self.update(|st| {
            if cluster != CLUSTER || st.txt.is_empty() {
                return Vec::new();
            }
            st.dns_answers.push(st.txt.clone());
            st.txt.clone()
        }))
    }
}

/// One proxy's view of the [`FakeController`].
struct ProxyLease {
    controller: Arc<FakeController>,
    proxy: String,
}

#[async_trait::async_trait]
impl IssuanceLease for ProxyLease {
    async fn acquire(&self) -> anyhow::Result<bool> {
        self.controller.update(|st| {
            if st.failing {
                st.log.push(Call::AcquireFailed {
                    proxy: self.proxy.clone(),
                });
                anyhow::bail!("the controller is unreachable");
            }
            let granted = st.holder.as_ref().is_none_or(|h| *h == self.proxy);
            if granted {
                st.holder = Some(self.proxy.clone());
            }
            st.log.push(Call::Acquire {
                proxy: self.proxy.clone(),
                granted,
            });
            Ok(granted)
        })
    }

    async fn set_txt(&self, values: Vec<String>) -> anyhow::Result<()> {
        self.controller.update(|st| {
            st.log.push(Call::SetTxt {
                proxy: self.proxy.clone(),
                values: values.clone(),
            });
            anyhow::ensure!(
                st.holder.as_ref() == Some(&self.proxy),
                "{} does not hold the lease",
                self.proxy
            );
            st.txt = values;
            Ok(())
        })
    }

    async fn release(&self) -> anyhow::Result<()> {
        self.controller.update(|st| {
            st.log.push(Call::Release {
                proxy: self.proxy.clone(),
            });
            if st.holder.as_ref() == Some(&self.proxy) {
                st.holder = None;
                st.txt.clear();
            }
            Ok(())
        })
    }
}

/// A TLS listener's store that remembers every certificate installed.
#[derive(Default)]
struct RecordingSink {
    installs: watch::Sender<Vec<(String, String)>>,
}

impl CertSink for RecordingSink {
    fn install(&self, chain_pem: &str, key_pem: &str) -> anyhow::Result<()> {
        self.installs
            .send_modify(|installs| installs.push((chain_pem.to_owned(), key_pem.to_owned())));
        Ok(())
    }
}

impl RecordingSink {
    /// Waits until `count` certificates were installed; returns them all.
    async fn wait_for_installs(&self, count: usize) -> Vec<(String, String)> {
        let mut rx = self.installs.subscribe();
        let installs = tokio::time::timeout(PATIENCE, rx.wait_for(|installs| installs.len() >= count)).await;
        match installs {
            Ok(installs) => installs.unwrap().clone(),
            Err(_) => panic!(
                "timed out waiting for {count} installs; got {}",
                self.installs.borrow().len()
            ),
        }
    }

    fn count(&self) -> usize {
        self.installs.borrow().len()
    }
}

/// A DNS server for the zone `plane.test`, answering from a [`FakeController`].
struct Dns {
    addr: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Dns {
    async fn start(controller: Arc<FakeController>) -> Dns {
        // UDP and TCP on one port: pebble asks over UDP and retries truncated answers over TCP.
        for _ in 0..20 {
            let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let addr = udp.local_addr().unwrap();
            let Ok(tcp) = tokio::net::TcpListener::bind(addr).await else {
                continue;
            };
            let stop = CancellationToken::new();
            let task = tokio::spawn(plane_dns::run(
                udp,
                tcp,
                DnsConfig::new(CLUSTER),
                controller,
                stop.clone(),
            ));
            return Dns { addr, stop, task };
        }
        panic!("no port free for both UDP and TCP");
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.stop.cancel();
        self.task.abort();
    }
}

/// A pebble validating through a DNS server that answers from a fake controller, and a
/// directory for the proxies' files.
struct Env {
    controller: Arc<FakeController>,
    pebble: Pebble,
    _dns: Dns,
    dir: tempfile::TempDir,
}

impl Env {
    async fn start() -> Env {
        Env::with_eab(Vec::new()).await
    }

    async fn with_eab(eab_keys: Vec<(String, String)>) -> Env {
        init_logging();
        let controller = Arc::new(FakeController::default());
        let dns = Dns::start(controller.clone()).await;
        let mut opts = PebbleOptions::new(dns.addr);
        opts.eab_keys = eab_keys;
        let pebble = Pebble::start(opts).await.unwrap();
        Env {
            controller,
            pebble,
            _dns: dns,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// A configuration for this pebble keeping its files at `<dir>/<name>/cert.pem`.
    fn config(&self, name: &str) -> AcmeConfig {
        let mut config = AcmeConfig::new(self.pebble.directory_url(), self.dir.path().join(name).join("cert.pem"));
        config.acme_server_ca = Some(self.pebble.listener_ca_pem_path());
        config.lease_renew_interval = Duration::from_millis(300);
        config.retry_after_failure = Duration::from_millis(200);
        config
    }
}

fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("plane_proxy=debug")),
        )
        .with_test_writer()
        .try_init();
}

/// Starts `run` for one proxy; returns its stop token and task.
fn start_run(
    config: &AcmeConfig,
    lease: Arc<ProxyLease>,
    sink: &Arc<RecordingSink>,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(acme::run(
        CLUSTER.to_owned(),
        config.clone(),
        lease,
        sink.clone(),
        shutdown.clone(),
    ));
    (shutdown, task)
}

async fn stop_run(shutdown: CancellationToken, task: tokio::task::JoinHandle<()>) {
    shutdown.cancel();
    tokio::time::timeout(PATIENCE, task)
        .await
        .expect("run did not stop after shutdown")
        .unwrap();
}

/// Verifies `chain_pem` as a TLS server's chain for `name`, trusting only `root_pem`.
fn verify(chain_pem: &str, root_pem: &str, name: &str) -> Result<(), rustls::Error> {
    let mut roots = rustls::RootCertStore::empty();
    for root in CertificateDer::pem_slice_iter(root_pem.as_bytes()) {
        roots.add(root.unwrap()).unwrap();
    }
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap();
    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    assert!(chain.len() >= 2, "pebble sends the leaf and its intermediate");
    verifier
        .verify_server_cert(
            &chain[0],
            &chain[1..],
            &ServerName::try_from(name.to_owned()).unwrap(),
            &[],
            UnixTime::now(),
        )
        .map(|_| ())
}

/// The serial of the chain's leaf.
fn serial(chain_pem: &str) -> String {
    let leaf = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    cert.raw_serial_as_string()
}

/// Whether `key_pem` is the key of the chain's leaf.
fn key_matches(chain_pem: &str, key_pem: &str) -> bool {
    let leaf = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    let key = rcgen::KeyPair::from_pem(key_pem).unwrap();
    key.public_key_raw() == &*cert.public_key().subject_public_key.data
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn sorted(mut values: Vec<String>) -> Vec<String> {
    values.sort();
    values
}

#[tokio::test]
async fn issues_for_the_cluster_and_its_wildcard_with_both_txt_values_served_at_once() {
    let env = Env::start().await;
    let config = env.config("a");
    let lease = env.controller.lease("proxy-a");

    let (chain, key) = acme::issue(CLUSTER, &config, &*lease).await.unwrap();

    let root = env.pebble.issuing_roots_pem().await.unwrap();
    verify(&chain, &root, "plane.test").unwrap();
    verify(&chain, &root, "foo.plane.test").unwrap();
    assert!(
        verify(&chain, &root, "a.foo.plane.test").is_err(),
        "a wildcard covers one label"
    );
    assert!(verify(&chain, &root, "plane.example").is_err());
    assert!(key_matches(&chain, &key));

    {
        let st = env.controller.state();
        let published: Vec<Vec<String>> = st
            .log
            .iter()
            .filter_map(|call| match call {
                Call::SetTxt { values, .. } => Some(values.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(
            published.len(),
            1,
            "both values are published in one call: {:#?}",
            st.log
        );
        assert_eq!(published[0].len(), 2, "{published:?}");
        assert_ne!(published[0][0], published[0][1]);
        assert!(
            st.dns_answers
                .iter()
                .any(|answer| sorted(answer.clone()) == sorted(published[0].clone())),
            "the DNS server answered both values together: {:?}",
            st.dns_answers
        );
        // The lease was taken first and given back at the end, clearing the values.
        assert_eq!(
            st.log.first(),
            Some(&Call::Acquire {
                proxy: "proxy-a".into(),
                granted: true
            })
        );
        assert_eq!(
            st.log.last(),
            Some(&Call::Release {
                proxy: "proxy-a".into()
            })
        );
        assert!(st.txt.is_empty() && st.holder.is_none());
    }

    // `issue` keeps the account (0600) but leaves the certificate file to `run`.
    assert_eq!(mode(&config.account_path()), 0o600);
    assert!(!config.cert_path.exists());

    // The account is reused: a second issuance creates no new account file.
    let account = std::fs::read(config.account_path()).unwrap();
    let (chain2, _) = acme::issue(CLUSTER, &config, &*lease).await.unwrap();
    assert_eq!(std::fs::read(config.account_path()).unwrap(), account);
    assert_ne!(serial(&chain), serial(&chain2));
}

#[tokio::test]
async fn run_saves_the_certificate_0600_and_reinstalls_it_at_start_without_the_ca() {
    let env = Env::start().await;
    let config = env.config("a");
    let sink = Arc::new(RecordingSink::default());
    let (shutdown, task) = start_run(&config, env.controller.lease("proxy-a"), &sink);
    let installed = sink.wait_for_installs(1).await;
    stop_run(shutdown, task).await;
    let (chain, key) = &installed[0];
    verify(chain, &env.pebble.issuing_roots_pem().await.unwrap(), "foo.plane.test").unwrap();
    assert!(key_matches(chain, key));

    assert_eq!(mode(&config.cert_path), 0o600);
    assert_eq!(mode(&config.account_path()), 0o600);
    let saved = std::fs::read_to_string(&config.cert_path).unwrap();
    assert!(
        saved.starts_with(chain.as_str()) && saved.ends_with(key.as_str()),
        "{saved}"
    );
    // Only the two files, no temporary left behind.
    assert_eq!(
        std::fs::read_dir(config.cert_path.parent().unwrap()).unwrap().count(),
        2
    );

    // Started again with the CA unreachable and a controller that records any call.
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut offline = config.clone();
    offline.directory_url = format!("https://127.0.0.1:{closed_port}/dir");
    let controller = Arc::new(FakeController::default());
    let sink = Arc::new(RecordingSink::default());
    let (shutdown, task) = start_run(&offline, controller.lease("proxy-a"), &sink);
    let reinstalled = sink.wait_for_installs(1).await;
    stop_run(shutdown, task).await;
    assert_eq!(reinstalled, installed);
    assert!(controller.state().log.is_empty(), "{:#?}", controller.state().log);

    // A saved file that is not a certificate for the cluster is ignored: run issues anew.
    std::fs::write(&config.cert_path, "garbage").unwrap();
    let sink = Arc::new(RecordingSink::default());
    let (shutdown, task) = start_run(&config, env.controller.lease("proxy-a"), &sink);
    let fresh = sink.wait_for_installs(1).await;
    stop_run(shutdown, task).await;
    assert_ne!(serial(&fresh[0].0), serial(chain));
    assert_eq!(mode(&config.cert_path), 0o600);
}

#[tokio::test]
async fn renews_when_renew_before_is_longer_than_the_lifetime() {
    let env = Env::start().await;
    let mut config = env.config("a");
    let sink = Arc::new(RecordingSink::default());
    let (shutdown, task) = start_run(&config, env.controller.lease("proxy-a"), &sink);
    let first = sink.wait_for_installs(1).await;
    stop_run(shutdown, task).await;

    // A hundred years: every certificate is due at once. After a renewal that is due
    // again, run waits `retry_after_failure` (long here), so exactly one renewal comes.
    config.renew_before = Duration::from_secs(100 * 365 * 24 * 3600);
    config.retry_after_failure = Duration::from_secs(3600);
    let sink = Arc::new(RecordingSink::default());
    let (shutdown, task) = start_run(&config, env.controller.lease("proxy-a"), &sink);
    let installs = sink.wait_for_installs(2).await;
    // The saved certificate is served while the renewal runs.
    assert_eq!(installs[0], first[0]);
    let (renewed_chain, renewed_key) = &installs[1];
    assert_ne!(serial(renewed_chain), serial(&first[0].0));
    assert!(key_matches(renewed_chain, renewed_key));
    assert_ne!(renewed_key, &first[0].1, "a renewal has a new key");
    verify(
        renewed_chain,
        &env.pebble.issuing_roots_pem().await.unwrap(),
        "plane.test",
    )
    .unwrap();
    let saved = std::fs::read_to_string(&config.cert_path).unwrap();
    assert!(saved.starts_with(renewed_chain.as_str()), "the renewal is saved");
    stop_run(shutdown, task).await;
    assert_eq!(sink.count(), 2, "no renewal loop");
}

#[tokio::test]
async fn external_account_binding_with_the_right_key_succeeds_and_a_wrong_one_says_so() {
    let env = Env::with_eab(vec![("kid-1".to_owned(), EAB_KEY.to_owned())]).await;
    let root = env.pebble.issuing_roots_pem().await.unwrap();
    let lease = env.controller.lease("proxy-a");

    let mut right = env.config("right");
    right.eab = Some(("kid-1".to_owned(), EAB_KEY.to_owned()));
    right.contact_email = Some("ops@plane.test".to_owned());
    let (chain, _) = acme::issue(CLUSTER, &right, &*lease).await.unwrap();
    verify(&chain, &root, "foo.plane.test").unwrap();

    let mut wrong = env.config("wrong");
    wrong.eab = Some(("kid-1".to_owned(), WRONG_EAB_KEY.to_owned()));
    let err = format!("{:#}", acme::issue(CLUSTER, &wrong, &*lease).await.unwrap_err());
    eprintln!("with a wrong EAB key: {err}");
    assert!(err.contains("external account binding key id \"kid-1\""), "{err}");
    assert!(!wrong.account_path().exists());

    let mut unknown = env.config("unknown");
    unknown.eab = Some(("kid-2".to_owned(), EAB_KEY.to_owned()));
    let err = format!("{:#}", acme::issue(CLUSTER, &unknown, &*lease).await.unwrap_err());
    assert!(err.contains("kid-2"), "{err}");

    let mut not_base64 = env.config("not-base64");
    not_base64.eab = Some(("kid-1".to_owned(), "not base64!".to_owned()));
    let err = format!("{:#}", acme::issue(CLUSTER, &not_base64, &*lease).await.unwrap_err());
    assert!(err.contains("is not base64url"), "{err}");

    let none = env.config("none");
    let err = format!("{:#}", acme::issue(CLUSTER, &none, &*lease).await.unwrap_err());
    eprintln!("without EAB: {err}");
    assert!(err.contains("creating an ACME account"), "{err}");

    // Every failed attempt gave the lease back.
    let st = env.controller.state();
    assert!(st.holder.is_none() && st.txt.is_empty(), "{:#?}", st.log);
}

#[tokio::test]
async fn waits_while_another_proxy_holds_the_lease_then_issues_and_clears_the_values() {
    let env = Env::start().await;
    env.controller.update(|st| st.holder = Some("proxy-b".to_owned()));
    let config = env.config("a");
    let sink = Arc::new(RecordingSink::default());
    let (shutdown, task) = start_run(&config, env.controller.lease("proxy-a"), &sink);

    let refused = Call::Acquire {
        proxy: "proxy-a".into(),
        granted: false,
    };
    env.controller
        .wait_until("proxy-a was refused twice", |st| {
            st.log.iter().filter(|call| **call == refused).count() >= 2
        })
        .await;
    assert_eq!(sink.count(), 0);
    assert!(
        !env.controller
            .state()
            .log
            .iter()
            .any(|call| matches!(call, Call::SetTxt { .. })),
        "nothing published without the lease"
    );

    env.controller.update(|st| {
        st.holder = None;
        st.log.push(Call::Freed);
    });
    let installed = sink.wait_for_installs(1).await;
    verify(
        &installed[0].0,
        &env.pebble.issuing_roots_pem().await.unwrap(),
        "plane.test",
    )
    .unwrap();

    {
        let st = env.controller.state();
        let freed = st.log.iter().position(|call| *call == Call::Freed).unwrap();
        let published = st
            .log
            .iter()
            .position(|call| matches!(call, Call::SetTxt { .. }))
            .unwrap();
        assert!(published > freed, "{:#?}", st.log);
        assert!(
            matches!(&st.log[published], Call::SetTxt { proxy, values } if proxy == "proxy-a" && values.len() == 2)
        );
        assert_eq!(
            st.log.last(),
            Some(&Call::Release {
                proxy: "proxy-a".into()
            })
        );
        assert!(
            st.txt.is_empty() && st.holder.is_none(),
            "TXT values cleared, lease free"
        );
    }
    stop_run(shutdown, task).await;
}

/// An ACME "server" that accepts connections and never answers, so an issuance hangs
/// until something else stops it.
async fn silent_server() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://127.0.0.1:{}/dir", listener.local_addr().unwrap().port());
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            held.push(conn);
        }
    });
    (url, task)
}

#[tokio::test]
async fn issuance_is_aborted_when_the_lease_is_lost_and_the_lease_is_still_released() {
    init_logging();
    let (url, server) = silent_server().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = AcmeConfig::new(url, dir.path().join("cert.pem"));
    config.lease_renew_interval = Duration::from_millis(150);

    // Another proxy takes the lease during the issuance.
    let controller = Arc::new(FakeController::default());
    let lease = controller.lease("proxy-a");
    let issuing = tokio::spawn({
        let config = config.clone();
        let lease = lease.clone();
        async move { acme::issue(CLUSTER, &config, &*lease).await }
    });
    controller
        .wait_until("proxy-a took the lease", |st| st.holder.as_deref() == Some("proxy-a"))
        .await;
    controller.update(|st| st.holder = Some("proxy-b".to_owned()));
    let err = tokio::time::timeout(PATIENCE, issuing)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains("taken by another proxy"), "{text}");
    assert_eq!(
        controller.state().log.last(),
        Some(&Call::Release {
            proxy: "proxy-a".into()
        })
    );

    // The controller stops answering during the issuance: aborted after two failed renewals.
    let controller = Arc::new(FakeController::default());
    let lease = controller.lease("proxy-a");
    let issuing = tokio::spawn({
        let config = config.clone();
        let lease = lease.clone();
        async move { acme::issue(CLUSTER, &config, &*lease).await }
    });
    controller
        .wait_until("proxy-a took the lease", |st| st.holder.as_deref() == Some("proxy-a"))
        .await;
    controller.update(|st| st.failing = true);
    let err = tokio::time::timeout(PATIENCE, issuing)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains("could not be renewed in time"), "{text}");
    {
        let st = controller.state();
        let failures = st
            .log
            .iter()
            .filter(|c| matches!(c, Call::AcquireFailed { .. }))
            .count();
        assert!(failures >= 2, "one failure is tolerated: {:#?}", st.log);
        assert_eq!(
            st.log.last(),
            Some(&Call::Release {
                proxy: "proxy-a".into()
            })
        );
    }

    // Shutdown during an issuance started by `run` releases the lease too.
    let controller = Arc::new(FakeController::default());
    let sink = Arc::new(RecordingSink::default());
    let (shutdown, task) = start_run(&config, controller.lease("proxy-a"), &sink);
    controller
        .wait_until("proxy-a took the lease", |st| st.holder.as_deref() == Some("proxy-a"))
        .await;
    stop_run(shutdown, task).await;
    let st = controller.state();
    assert_eq!(
        st.log.last(),
        Some(&Call::Release {
            proxy: "proxy-a".into()
        })
    );
    assert!(st.holder.is_none());
    assert_eq!(sink.count(), 0);
    server.abort();
}

#[tokio::test]
async fn a_lease_held_elsewhere_or_a_cluster_with_a_port_fails_issue_without_publishing() {
    let dir = tempfile::tempdir().unwrap();
    let config = AcmeConfig::new("https://127.0.0.1:9/dir", dir.path().join("cert.pem"));
    let controller = Arc::new(FakeController::default());
    let lease = controller.lease("proxy-a");

    let err = acme::issue("localhost:9090", &config, &*lease).await.unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains("has a port (9090)") && text.contains("DNS names"),
        "{text}"
    );
    assert!(controller.state().log.is_empty());

    // `run` refuses it too, and returns at once.
    let sink = Arc::new(RecordingSink::default());
    tokio::time::timeout(
        PATIENCE,
        acme::run(
            "localhost:9090".into(),
            config.clone(),
            lease.clone(),
            sink.clone(),
            CancellationToken::new(),
        ),
    )
    .await
    .expect("run returns for a cluster that cannot have a certificate");
    assert!(controller.state().log.is_empty());

    controller.update(|st| st.holder = Some("proxy-b".to_owned()));
    let err = acme::issue(CLUSTER, &config, &*lease).await.unwrap_err();
    assert!(err.downcast_ref::<LeaseHeld>().is_some(), "{err:#}");
    let st = controller.state();
    assert_eq!(
        st.holder.as_deref(),
        Some("proxy-b"),
        "the other proxy's lease is untouched"
    );
    assert!(
        !st.log
            .iter()
            .any(|c| matches!(c, Call::SetTxt { .. } | Call::Release { .. })),
        "{:#?}",
        st.log
    );
}
