//! The proxy's TLS certificate, obtained and renewed over ACME with DNS-01.
//!
//! A proxy serves `<cluster>` and every `<subdomain>.<cluster>`, so it needs one
//! certificate for `<cluster>` and `*.<cluster>`. A wildcard can only be validated with
//! DNS-01: the CA looks up TXT records at `_acme-challenge.<cluster>`. Those are served by
//! Plane's DNS server (`plane-dns`), which reads them from the controller; the proxy hands
//! them to the controller through an [`IssuanceLease`]. Several proxies of one cluster
//! would overwrite each other's values, so the controller lets only the holder of the
//! cluster's *issuance lease* publish them.
//!
//! [`run`] owns the certificate for the proxy's lifetime:
//!
//! ```text
//! start ─► saved file valid for <cluster> and *.<cluster>? ──yes──► install it
//!              │ no (missing, unparsable, key mismatch, expired, wrong names: warn)
//!              ▼                                                      │
//!      ┌─► wait until due ◄──────────────────────────────────────────┘
//!      │       ▼
//!      │   acquire() ──false──► wait a third of the lease, ask again
//!      │       ▼ true
//!      │   issue: one order for both names ─► set_txt(both values) ─► challenges ready
//!      │       ─► poll until ready ─► finalize (new key) ─► download the chain
//!      │       (all the while: acquire() every third of the lease; lost ⇒ abort)
//!      │       ▼
//!      │   release() (always) ─► save (0600, atomic) ─► install
//!      │       │ failure: warn, retry after a backoff (doubling, up to 10 min)
//!      └───────┘
//! ```
//!
//! Files, all in the directory of [`AcmeConfig::cert_path`], mode 0600, each replaced
//! atomically (a temporary file in the same directory, fsync, rename, fsync of the
//! directory):
//! * `cert_path`: the certificate chain (leaf first) followed by its PKCS#8 private key,
//!   all PEM — the combined form most TLS servers accept.
//! * `<cert file name>.acme-account.json`: the ACME account (`{"directory_url",
//!   "credentials"}`), reused for every order on the same directory URL. A file for
//!   another directory, or an account the CA no longer knows, is replaced by a new one.
//!
//! When to renew: when less than [`AcmeConfig::renew_before`] of the certificate's life
//! remains, and never later than when a third of its lifetime remains: for a 90-day
//! certificate and the default 30 days both rules agree, for a longer-lived one the third
//! comes first. A certificate that is due the moment it is issued (`renew_before` at
//! least its lifetime, e.g. the default with a CA issuing 6-day certificates) is renewed
//! again only after [`AcmeConfig::retry_after_failure`], with a warning, never in a tight
//! loop; lower `renew_before` for such a CA.
//!
//! **Architecture invariant:** the proxy never talks to the DNS server or the store; the
//! only way its challenge values reach the world is [`IssuanceLease::set_txt`], and every
//! issuance that took the lease gives it back with [`IssuanceLease::release`], whether
//! it succeeded, failed or was cancelled by shutdown.

use anyhow::{anyhow, bail, Context};
use base64::Engine as _;
use bytes::Bytes;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, BodyWrapper, BytesResponse, ChallengeType, ExternalAccountKey,
    HttpClient, Identifier, NewAccount, NewOrder, Order, OrderStatus, RetryPolicy,
};
use serde::{Deserialize, Serialize};
use std::fs;
use std::future::Future;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

/// The controller's side of issuance, as seen by the proxy.
#[async_trait::async_trait]
pub trait IssuanceLease: Send + Sync + 'static {
    /// Takes or extends the cluster's issuance lease for this proxy. Ok(false): another proxy holds it.
    async fn acquire(&self) -> anyhow::Result<bool>;
    /// Publishes the TXT values for `_acme-challenge.<cluster>` (replacing earlier ones); requires the lease.
    async fn set_txt(&self, values: Vec<String>) -> anyhow::Result<()>;
    /// Gives the lease up and clears the TXT values.
    async fn release(&self) -> anyhow::Result<()>;
}

/// Where a new certificate goes (the TLS listener's store).
pub trait CertSink: Send + Sync + 'static {
    /// Serves `chain_pem` (leaf first) with `key_pem` (PKCS#8) from now on.
    fn install(&self, chain_pem: &str, key_pem: &str) -> anyhow::Result<()>;
}

/// How the proxy obtains its certificate.
#[derive(Clone)]
pub struct AcmeConfig {
    /// The ACME directory, e.g. `https://acme-v02.api.letsencrypt.org/directory`.
    pub directory_url: String,
    /// Given to the CA as `mailto:<email>` when the account is created (expiry notices).
    pub contact_email: Option<String>,
    /// External account binding: key id and the base64url HMAC key, as ACME CAs hand them out.
    pub eab: Option<(String, String)>,
    /// Extra root to trust for the ACME server's own HTTPS (pebble); None = webpki roots.
    pub acme_server_ca: Option<PathBuf>,
    /// Where the certificate chain + private key are kept (one PEM file, mode 0600) and reused at start.
    /// The ACME account credentials are kept beside it (same dir, 0600) and reused.
    pub cert_path: PathBuf,
    /// Renew when less than this remains (default 30 days), but never later than when a third of the lifetime remains.
    pub renew_before: Duration,
    /// How long the lease is held without renewal on the controller; the manager calls acquire() every third of it
    /// while issuance runs, and asks that often while another proxy holds it (default lease 60 s).
    pub lease_renew_interval: Duration,
    /// Retry delay after a failure (default 30 s), doubled after each further failure up to 10 min.
    pub retry_after_failure: Duration,
}

/// Shows everything but the external account binding's HMAC key.
impl std::fmt::Debug for AcmeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcmeConfig")
            .field("directory_url", &self.directory_url)
            .field("contact_email", &self.contact_email)
            .field("eab_key_id", &self.eab.as_ref().map(|(kid, _)| kid))
            .field("acme_server_ca", &self.acme_server_ca)
            .field("cert_path", &self.cert_path)
            .field("renew_before", &self.renew_before)
            .field("lease_renew_interval", &self.lease_renew_interval)
            .field("retry_after_failure", &self.retry_after_failure)
            .finish()
    }
}

impl AcmeConfig {
    /// The default of [`AcmeConfig::renew_before`].
    pub const DEFAULT_RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
    /// The default of [`AcmeConfig::lease_renew_interval`].
    pub const DEFAULT_LEASE: Duration = Duration::from_secs(60);
    /// The default of [`AcmeConfig::retry_after_failure`].
    pub const DEFAULT_RETRY_AFTER_FAILURE: Duration = Duration::from_secs(30);

    /// A configuration for `directory_url` keeping its files at `cert_path`, with the
    /// defaults: no contact, no external account binding, webpki roots.
    pub fn new(directory_url: impl Into<String>, cert_path: impl Into<PathBuf>) -> AcmeConfig {
        AcmeConfig {
            directory_url: directory_url.into(),
            contact_email: None,
            eab: None,
            acme_server_ca: None,
            cert_path: cert_path.into(),
            renew_before: Self::DEFAULT_RENEW_BEFORE,
            lease_renew_interval: Self::DEFAULT_LEASE,
            retry_after_failure: Self::DEFAULT_RETRY_AFTER_FAILURE,
        }
    }

    /// Where the ACME account credentials are kept: beside [`AcmeConfig::cert_path`].
    pub fn account_path(&self) -> PathBuf {
        let mut name = self.cert_path.file_name().unwrap_or_default().to_os_string();
        name.push(".acme-account.json");
        self.cert_path.with_file_name(name)
    }
}

/// [`issue`] found the cluster's issuance lease held by another proxy.
#[derive(Debug, thiserror::Error)]
#[error("another proxy holds the cluster's certificate issuance lease")]
pub struct LeaseHeld;

/// The longest delay between two attempts after failures (unless
/// [`AcmeConfig::retry_after_failure`] is longer itself).
const MAX_RETRY_DELAY: Duration = Duration::from_secs(600);
/// The longest one issuance may take, from the first request to the downloaded chain.
const ISSUE_TIMEOUT: Duration = Duration::from_secs(600);
/// The longest one HTTP exchange with the ACME server may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest a call to the controller (lease, TXT values) may take.
const LEASE_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest single wait for the next renewal, after which the (wall-clock) renewal
/// time is looked at again: the process may have been suspended, or the clock set.
const MAX_SLEEP: Duration = Duration::from_secs(3600);
/// Polling the order until the CA has validated both challenges.
const READY_POLICY: RetryPolicy = RetryPolicy::new()
    .initial_delay(Duration::from_millis(250))
    .backoff(1.5)
    .timeout(Duration::from_secs(180));
/// Polling the order until the certificate is issued.
const CERTIFICATE_POLICY: RetryPolicy = RetryPolicy::new()
    .initial_delay(Duration::from_millis(250))
    .backoff(1.5)
    .timeout(Duration::from_secs(120));
/// The problem type of an account the CA does not know (RFC 8555 §7.3.1).
const ACCOUNT_DOES_NOT_EXIST: &str = "urn:ietf:params:acme:error:accountDoesNotExist";

/// Runs forever (until `shutdown`): loads the saved certificate if valid for the cluster and installs it; when none or due for renewal, takes the lease (waiting and retrying while another proxy holds it), issues, saves, installs, releases.
///
/// A cluster name that cannot have a certificate (see [`certificate_names`]) is logged
/// as an error and `run` returns at once; check it with [`certificate_names`] at
/// startup to refuse such a configuration instead.
pub async fn run(
    cluster: String,
    config: AcmeConfig,
    lease: Arc<dyn IssuanceLease>,
    sink: Arc<dyn CertSink>,
    shutdown: CancellationToken,
) {
    let names = match certificate_names(&cluster) {
        Ok(names) => names,
        Err(e) => {
            error!(%cluster, error = %format!("{e:#}"), "no ACME certificate can be issued for this cluster");
            return;
        }
    };
    let mut current = match load_saved(&config.cert_path, &names) {
        Ok(Some(saved)) => match sink.install(&saved.chain_pem, &saved.key_pem) {
            Ok(()) => {
                info!(
                    %cluster,
                    path = %config.cert_path.display(),
                    serial = %saved.info.serial,
                    not_after = %saved.info.not_after_display(),
                    "installed the saved certificate"
                );
                Some(saved.info)
            }
            Err(e) => {
                warn!(%cluster, error = %format!("{e:#}"), "the saved certificate could not be installed; issuing a new one");
                None
            }
        },
        Ok(None) => {
            info!(%cluster, path = %config.cert_path.display(), "no saved certificate; issuing one");
            None
        }
        Err(e) => {
            warn!(
                %cluster,
                path = %config.cert_path.display(),
                error = %format!("{e:#}"),
                "ignoring the saved certificate; issuing a new one"
            );
            None
        }
    };
    // The earliest time (monotonic) of the next issuance, whatever the certificate says.
    let mut not_before: Option<tokio::time::Instant> = None;
    let mut failures: u32 = 0;
    loop {
        if let Some(info) = &current {
            let renew_at = info.renew_at(config.renew_before);
            info!(%cluster, renew_at = %display_time(renew_at), "next certificate renewal");
            loop {
                let now = now_unix();
                if now >= renew_at {
                    break;
                }
                let wait = Duration::from_secs((renew_at - now) as u64).min(MAX_SLEEP);
                if sleep_or_stop(wait, &shutdown).await {
                    return;
                }
            }
        }
        if let Some(at) = not_before.take() {
            if sleep_or_stop(at.saturating_duration_since(tokio::time::Instant::now()), &shutdown).await {
                return;
            }
        }
        if wait_for_lease(&cluster, &*lease, config.lease_renew_interval, &shutdown).await {
            return;
        }
        let renewing = current.is_some();
        match issue_holding_lease(&names, &config, &*lease, &shutdown).await {
            Ok(issued) => {
                failures = 0;
                info!(
                    %cluster,
                    serial = %issued.info.serial,
                    not_after = %issued.info.not_after_display(),
                    "{}",
                    if renewing { "renewed the certificate" } else { "issued a certificate" }
                );
                let contents = format!("{}{}", with_final_newline(&issued.chain_pem), issued.key_pem);
                if let Err(e) = save_atomically(&config.cert_path, contents.as_bytes()) {
                    warn!(
                        %cluster,
                        path = %config.cert_path.display(),
                        error = %format!("{e:#}"),
                        "could not save the certificate; it will be issued again at the next start"
                    );
                }
                if let Err(e) = sink.install(&issued.chain_pem, &issued.key_pem) {
                    warn!(%cluster, error = %format!("{e:#}"), "the new certificate could not be installed");
                }
                if issued.info.renew_at(config.renew_before) <= now_unix() {
                    warn!(
                        %cluster,
                        renew_before = ?config.renew_before,
                        retry_in = ?config.retry_after_failure,
                        "the new certificate is due for renewal already: renew_before is longer than the CA's \
                         certificate lifetime allows"
                    );
                    not_before = Some(tokio::time::Instant::now() + config.retry_after_failure);
                }
                current = Some(issued.info);
            }
            Err(e) if shutdown.is_cancelled() => {
                debug!(%cluster, error = %format!("{e:#}"), "certificate issuance stopped by shutdown");
                return;
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                let delay = retry_delay(config.retry_after_failure, failures);
                warn!(
                    %cluster,
                    failures,
                    retry_in = ?delay,
                    error = %format!("{e:#}"),
                    "certificate issuance failed"
                );
                not_before = Some(tokio::time::Instant::now() + delay);
            }
        }
    }
}

/// One issuance, exposed for tests and for `run`: returns (chain_pem, key_pem).
///
/// Takes the lease first (failing with [`LeaseHeld`] if another proxy has it) and
/// releases it at the end. Saves the ACME account beside [`AcmeConfig::cert_path`], but
/// not the certificate: [`run`] does.
pub async fn issue(cluster: &str, config: &AcmeConfig, lease: &dyn IssuanceLease) -> anyhow::Result<(String, String)> {
    let names = certificate_names(cluster)?;
    if !bounded(lease.acquire(), "taking the issuance lease").await? {
        return Err(LeaseHeld.into());
    }
    let issued = issue_holding_lease(&names, config, lease, &CancellationToken::new()).await?;
    Ok((issued.chain_pem, issued.key_pem))
}

/// The names of the certificate for `cluster`: the cluster and its wildcard, lowercased.
///
/// Fails for names ACME cannot certify: a name with a port (`localhost:9090`), an IP
/// address, or anything that is not a DNS host name.
pub fn certificate_names(cluster: &str) -> anyhow::Result<[String; 2]> {
    if cluster.parse::<std::net::IpAddr>().is_ok() {
        bail!("the cluster {cluster:?} is an IP address; ACME certificates (DNS-01) are for DNS names");
    }
    if let Some((host, port)) = cluster.rsplit_once(':') {
        bail!(
            "the cluster {cluster:?} has a port ({port}); ACME certificates are for DNS names, so a cluster \
             served with ACME must be named without one (e.g. {host:?}, with the proxy listening on 443)"
        );
    }
    let name = cluster.strip_suffix('.').unwrap_or(cluster).to_ascii_lowercase();
    let valid_label = |label: &str| {
        (1..=63).contains(&label.len())
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    // The wildcard adds two bytes, and must fit in 253 too.
    if name.len() > 251 || !name.split('.').all(valid_label) {
        bail!(
            "the cluster {cluster:?} is not a DNS host name (labels of letters, digits and inner hyphens, \
             separated by dots); no ACME certificate can be issued for it"
        );
    }
    Ok([name.clone(), format!("*.{name}")])
}

/// What the manager needs to know about a certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
struct CertInfo {
    /// Unix seconds.
    not_before: i64,
    /// Unix seconds.
    not_after: i64,
    /// The leaf's serial, hex.
    serial: String,
}

impl CertInfo {
    /// When renewal is due (Unix seconds): `renew_before` before expiry, but no later
    /// than when a third of the lifetime remains.
    fn renew_at(&self, renew_before: Duration) -> i64 {
        let renew_before = i64::try_from(renew_before.as_secs()).unwrap_or(i64::MAX);
        let by_margin = self.not_after.saturating_sub(renew_before);
        let lifetime = self.not_after.saturating_sub(self.not_before).max(0);
        let by_lifetime = self.not_after - lifetime / 3;
        by_margin.min(by_lifetime)
    }

    fn not_after_display(&self) -> String {
        display_time(self.not_after)
    }
}

/// A certificate with its key, checked by [`inspect`].
struct Issued {
    chain_pem: String,
    key_pem: String,
    info: CertInfo,
}

/// Checks that `chain_pem` (leaf first) and `key_pem` belong together, cover `names`
/// and have not expired.
fn inspect(chain_pem: &str, key_pem: &str, names: &[String; 2]) -> anyhow::Result<CertInfo> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::CertificateDer;

    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("the certificate chain is not valid PEM: {e:?}"))?;
    let leaf_der = chain.first().ok_or_else(|| anyhow!("no certificate in the chain"))?;
    let (_, leaf) = x509_parser::parse_x509_certificate(leaf_der)
        .map_err(|e| anyhow!("the leaf certificate does not parse: {e}"))?;
    let key = rcgen::KeyPair::from_pem(key_pem).map_err(|e| anyhow!("the private key does not parse: {e}"))?;
    if key.public_key_raw() != &*leaf.public_key().subject_public_key.data {
        bail!("the private key does not match the certificate");
    }
    let mut covered: Vec<String> = Vec::new();
    if let Some(san) = leaf
        .subject_alternative_name()
        .map_err(|e| anyhow!("the certificate's subject alternative names do not parse: {e}"))?
    {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                covered.push(dns.to_ascii_lowercase());
            }
        }
    }
    for name in names {
        if !covered.contains(name) {
            bail!("the certificate does not cover {name} (it covers {covered:?})");
        }
    }
    let info = CertInfo {
        not_before: leaf.validity().not_before.timestamp(),
        not_after: leaf.validity().not_after.timestamp(),
        serial: leaf.raw_serial_as_string(),
    };
    if info.not_after <= now_unix() {
        bail!("the certificate expired at {}", info.not_after_display());
    }
    Ok(info)
}

/// The saved certificate at `path`: `Ok(None)` if there is no file, an error if it is
/// not a usable certificate for `names`.
fn load_saved(path: &Path, names: &[String; 2]) -> anyhow::Result<Option<Issued>> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let (chain_pem, key_pem) = split_saved(&text)?;
    let info = inspect(chain_pem, key_pem, names)?;
    Ok(Some(Issued {
        chain_pem: chain_pem.to_owned(),
        key_pem: key_pem.to_owned(),
        info,
    }))
}

/// Splits a saved file into the chain and the key (everything from the first
/// `-----BEGIN … PRIVATE KEY-----` line on).
fn split_saved(text: &str) -> anyhow::Result<(&str, &str)> {
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim();
        if trimmed.starts_with("-----BEGIN ") && trimmed.ends_with("PRIVATE KEY-----") {
            return Ok((&text[..offset], &text[offset..]));
        }
        offset += line.len();
    }
    bail!("no private key in the file")
}

/// Replaces `path` with `contents`, mode 0600, atomically (a temporary file in the same
/// directory, fsync, rename, fsync of the directory). Creates the directory if needed.
fn save_atomically(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let file_name = path
        .file_name()
        .ok_or_else(|| anyhow!("{} has no file name", path.display()))?
        .to_string_lossy();
    let tmp = dir.join(format!(
        ".{file_name}.tmp-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let written = (|| -> std::io::Result<()> {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written.with_context(|| format!("writing {}", path.display()))
}

fn with_final_newline(text: &str) -> String {
    if text.ends_with('\n') {
        text.to_owned()
    } else {
        format!("{text}\n")
    }
}

/// Asks for the lease until this proxy has it, every third of the lease while another
/// proxy holds it. Returns true if `shutdown` came first.
async fn wait_for_lease(
    cluster: &str,
    lease: &dyn IssuanceLease,
    lease_duration: Duration,
    shutdown: &CancellationToken,
) -> bool {
    let every = (lease_duration / 3).max(Duration::from_millis(1));
    let mut told = false;
    loop {
        match bounded(lease.acquire(), "taking the issuance lease").await {
            Ok(true) => return false,
            Ok(false) if !told => {
                info!(%cluster, retry_every = ?every, "another proxy is issuing the cluster's certificate; waiting for its lease");
                told = true;
            }
            Ok(false) => debug!(%cluster, "the issuance lease is still held by another proxy"),
            Err(e) => warn!(%cluster, error = %format!("{e:#}"), "could not take the issuance lease"),
        }
        if sleep_or_stop(every, shutdown).await {
            return true;
        }
    }
}

/// One issuance by the holder of the lease: keeps the lease while the order runs, and
/// releases it (clearing the TXT values) at the end, whatever happened.
async fn issue_holding_lease(
    names: &[String; 2],
    config: &AcmeConfig,
    lease: &dyn IssuanceLease,
    shutdown: &CancellationToken,
) -> anyhow::Result<Issued> {
    let cluster = &names[0];
    info!(%cluster, directory = %config.directory_url, "issuing a certificate over ACME (dns-01)");
    let result = tokio::select! {
        result = tokio::time::timeout(ISSUE_TIMEOUT, obtain(names, config, lease)) => match result {
            Ok(result) => result,
            Err(_) => Err(anyhow!("the issuance did not finish within {ISSUE_TIMEOUT:?}")),
        },
        lost = keep_lease(lease, config.lease_renew_interval) => Err(lost),
        _ = shutdown.cancelled() => Err(anyhow!("the proxy is shutting down")),
    };
    match bounded(lease.release(), "releasing the issuance lease").await {
        Ok(()) => debug!(%cluster, "released the issuance lease"),
        Err(e) => warn!(
            %cluster,
            error = %format!("{e:#}"),
            "could not release the issuance lease; the controller frees it when it expires"
        ),
    }
    result.with_context(|| format!("issuing the certificate for {} and {}", names[0], names[1]))
}

/// Renews the lease every third of its duration; returns why it was lost: another
/// proxy has it, or it could not be renewed before two thirds of it had passed.
async fn keep_lease(lease: &dyn IssuanceLease, lease_duration: Duration) -> anyhow::Error {
    let every = (lease_duration / 3).max(Duration::from_millis(1));
    let mut last_renewed = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(every).await;
        let renewed = match tokio::time::timeout(every, lease.acquire()).await {
            Ok(renewed) => renewed,
            Err(_) => Err(anyhow!("the controller did not answer within {every:?}")),
        };
        match renewed {
            Ok(true) => last_renewed = tokio::time::Instant::now(),
            Ok(false) => return anyhow!("the issuance lease was taken by another proxy; issuance aborted"),
            Err(e) if last_renewed.elapsed() >= every * 2 => {
                return e.context("the issuance lease could not be renewed in time; issuance aborted")
            }
            Err(e) => warn!(error = %format!("{e:#}"), "could not renew the issuance lease; trying again"),
        }
    }
}

/// The ACME exchange: account, order, challenges, finalization, download.
async fn obtain(names: &[String; 2], config: &AcmeConfig, lease: &dyn IssuanceLease) -> anyhow::Result<Issued> {
    let cluster = &names[0];
    let identifiers = names.iter().map(|n| Identifier::Dns(n.clone())).collect::<Vec<_>>();
    let (account, restored) = account(config).await?;
    let mut order = match account.new_order(&NewOrder::new(&identifiers)).await {
        Err(instant_acme::Error::Api(problem))
            if restored && problem.r#type.as_deref() == Some(ACCOUNT_DOES_NOT_EXIST) =>
        {
            warn!(%cluster, "the ACME server no longer knows the saved account; creating a new one");
            let account = create_account(config).await?;
            account.new_order(&NewOrder::new(&identifiers)).await
        }
        result => result,
    }
    .context("creating the order")?;
    debug!(%cluster, order = %order.url(), "created the order");

    // The values of the pending authorizations; valid ones (reused by the CA) need none.
    let mut values = Vec::new();
    let mut authorizations = order.authorizations();
    while let Some(authorization) = authorizations.next().await {
        let mut authorization = authorization.context("fetching an authorization")?;
        let identifier = authorization.identifier().to_string();
        match authorization.status {
            AuthorizationStatus::Pending => {}
            AuthorizationStatus::Valid => {
                debug!(%identifier, "the CA reused a valid authorization");
                continue;
            }
            status => bail!("the authorization for {identifier} is {status:?}"),
        }
        let challenge = authorization
            .challenge(ChallengeType::Dns01)
            .ok_or_else(|| anyhow!("the ACME server offers no dns-01 challenge for {identifier}"))?;
        values.push(challenge.key_authorization().dns_value());
    }
    if values.is_empty() {
        info!(%cluster, "both authorizations are valid already; no challenge to answer");
    } else {
        // Both values live at `_acme-challenge.<cluster>` at once (the wildcard's too).
        let count = values.len();
        bounded(lease.set_txt(values), "publishing the dns-01 TXT values").await?;
        info!(%cluster, count, "published the dns-01 TXT values");
        let mut authorizations = order.authorizations();
        while let Some(authorization) = authorizations.next().await {
            let mut authorization = authorization.context("fetching an authorization")?;
            if authorization.status != AuthorizationStatus::Pending {
                continue;
            }
            let identifier = authorization.identifier().to_string();
            let mut challenge = authorization
                .challenge(ChallengeType::Dns01)
                .ok_or_else(|| anyhow!("the ACME server offers no dns-01 challenge for {identifier}"))?;
            challenge
                .set_ready()
                .await
                .with_context(|| format!("telling the ACME server the dns-01 challenge for {identifier} is ready"))?;
        }
    }

    match order.poll_ready(&READY_POLICY).await {
        Ok(OrderStatus::Ready) => info!(%cluster, "the CA validated the dns-01 challenges"),
        Ok(OrderStatus::Invalid) | Err(instant_acme::Error::Api(_)) => {
            bail!(
                "the ACME server did not validate the dns-01 challenges: {}",
                challenge_errors(&mut order).await
            )
        }
        Ok(status) => bail!("the order is {status:?} instead of ready"),
        Err(e) => return Err(e).context("waiting for the CA to validate the dns-01 challenges"),
    }
    let key_pem = order.finalize().await.context("finalizing the order")?;
    let chain_pem = order
        .poll_certificate(&CERTIFICATE_POLICY)
        .await
        .context("downloading the certificate")?;
    let info = inspect(&chain_pem, &key_pem, names).context("the CA's certificate is not usable")?;
    Ok(Issued {
        chain_pem,
        key_pem,
        info,
    })
}

/// Why the challenges failed, as the CA tells it (best effort).
async fn challenge_errors(order: &mut Order) -> String {
    let mut reasons = Vec::new();
    let mut authorizations = order.authorizations();
    while let Some(authorization) = authorizations.next().await {
        let Ok(mut authorization) = authorization else { continue };
        let identifier = authorization.identifier().to_string();
        let Ok(state) = authorization.refresh().await else {
            continue;
        };
        for challenge in &state.challenges {
            if let Some(problem) = &challenge.error {
                reasons.push(format!("{identifier}: {problem}"));
            }
        }
    }
    if reasons.is_empty() {
        "the CA gave no reason".to_owned()
    } else {
        reasons.join("; ")
    }
}

/// The account file's contents.
#[derive(Serialize, Deserialize)]
struct SavedAccount {
    /// The directory the account belongs to.
    directory_url: String,
    credentials: AccountCredentials,
}

/// The saved account for the configured directory, or a new one (saved). The flag says
/// whether it was restored.
async fn account(config: &AcmeConfig) -> anyhow::Result<(Account, bool)> {
    let path = config.account_path();
    match fs::read(&path) {
        Ok(bytes) => match serde_json::from_slice::<SavedAccount>(&bytes) {
            Ok(saved) if saved.directory_url == config.directory_url => {
                let account = Account::builder_with_http(http_client(config)?)
                    .from_credentials(saved.credentials)
                    .await
                    .with_context(|| format!("restoring the ACME account saved in {}", path.display()))?;
                debug!(account = %account.id(), "restored the saved ACME account");
                return Ok((account, true));
            }
            Ok(saved) => info!(
                path = %path.display(),
                saved_for = %saved.directory_url,
                "the saved ACME account is for another directory; creating a new one"
            ),
            Err(e) => warn!(path = %path.display(), error = %e, "ignoring the unreadable saved ACME account"),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => warn!(path = %path.display(), error = %e, "ignoring the unreadable saved ACME account"),
    }
    Ok((create_account(config).await?, false))
}

/// Creates an account (with the external account binding, if configured) and saves it.
async fn create_account(config: &AcmeConfig) -> anyhow::Result<Account> {
    let contact = config.contact_email.as_ref().map(|email| format!("mailto:{email}"));
    let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
    let eab = match &config.eab {
        Some((kid, hmac)) => {
            let key = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(hmac.trim().trim_end_matches('='))
                .with_context(|| {
                    format!("the external account binding HMAC key for key id {kid:?} is not base64url")
                })?;
            Some(ExternalAccountKey::new(kid.clone(), &key))
        }
        None => None,
    };
    let new_account = NewAccount {
        contact: &contacts,
        terms_of_service_agreed: true,
        only_return_existing: false,
    };
    let (account, credentials) = Account::builder_with_http(http_client(config)?)
        .create(&new_account, config.directory_url.clone(), eab.as_ref())
        .await
        .with_context(|| match &config.eab {
            Some((kid, _)) => format!(
                "creating an ACME account at {} with the external account binding key id {kid:?} (check the \
                 key id and HMAC key the CA gave)",
                config.directory_url
            ),
            None => format!("creating an ACME account at {}", config.directory_url),
        })?;
    info!(account = %account.id(), directory = %config.directory_url, "created an ACME account");
    let saved = SavedAccount {
        directory_url: config.directory_url.clone(),
        credentials,
    };
    let path = config.account_path();
    if let Err(e) = save_atomically(&path, &serde_json::to_vec_pretty(&saved)?) {
        warn!(path = %path.display(), error = %format!("{e:#}"), "could not save the ACME account; a new one will be created next time");
    }
    Ok(account)
}

/// The HTTPS client to the ACME server: rustls with ring, trusting the webpki roots and
/// [`AcmeConfig::acme_server_ca`]; every exchange bounded by [`REQUEST_TIMEOUT`].
fn http_client(config: &AcmeConfig) -> anyhow::Result<Box<dyn HttpClient>> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::CertificateDer;

    let mut roots = rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = &config.acme_server_ca {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| anyhow!("reading the ACME server CA {}: {e:?}", path.display()))?;
        if certs.is_empty() {
            bail!("the ACME server CA file {} holds no certificate", path.display());
        }
        for cert in certs {
            roots
                .add(cert)
                .with_context(|| format!("adding the ACME server CA from {}", path.display()))?;
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("setting up TLS")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .enable_http2()
        .build();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(https);
    Ok(Box::new(AcmeHttp { client }))
}

/// [`HttpClient`] with a timeout on every exchange.
struct AcmeHttp {
    client: hyper_util::client::legacy::Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        BodyWrapper<Bytes>,
    >,
}

impl HttpClient for AcmeHttp {
    fn request(
        &self,
        req: http::Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let uri = req.uri().to_string();
        let exchange = HttpClient::request(&self.client, req);
        Box::pin(async move {
            match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
                Ok(result) => result,
                Err(_) => Err(instant_acme::Error::Other(
                    format!("{uri}: no answer from the ACME server within {REQUEST_TIMEOUT:?}").into(),
                )),
            }
        })
    }
}

/// A controller call, bounded by [`LEASE_CALL_TIMEOUT`].
async fn bounded<T>(call: impl Future<Output = anyhow::Result<T>>, what: &str) -> anyhow::Result<T> {
    match tokio::time::timeout(LEASE_CALL_TIMEOUT, call).await {
        Ok(result) => result.with_context(|| what.to_owned()),
        Err(_) => bail!("{what}: the controller did not answer within {LEASE_CALL_TIMEOUT:?}"),
    }
}

/// The delay before the next attempt after `failures` failures in a row: `base`,
/// doubled each time, at most [`MAX_RETRY_DELAY`] (or `base` if longer), plus up to 10%
/// of jitter so proxies that failed together do not retry together.
fn retry_delay(base: Duration, failures: u32) -> Duration {
    let cap = MAX_RETRY_DELAY.max(base);
    let doubled = base.saturating_mul(1u32 << failures.saturating_sub(1).min(16)).min(cap);
    doubled + doubled.mul_f64(rand::random::<f64>() * 0.1)
}

/// Sleeps for `duration`; returns true (at once) if `shutdown` is cancelled first.
async fn sleep_or_stop(duration: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(duration) => shutdown.is_cancelled(),
        _ = shutdown.cancelled() => true,
    }
}

fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn display_time(unix: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(unix) {
        Ok(at) => at.to_string(),
        Err(_) => format!("{unix} (Unix time)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(cluster: &str) -> [String; 2] {
        certificate_names(cluster).unwrap()
    }

    #[test]
    fn cluster_names_must_be_dns_host_names() {
        assert_eq!(
            names("plane.test"),
            ["plane.test".to_owned(), "*.plane.test".to_owned()]
        );
        assert_eq!(
            names("Plane.Example.COM."),
            ["plane.example.com".to_owned(), "*.plane.example.com".to_owned()]
        );
        let check = |cluster: &str, expected: &str| {
            let err = format!("{:#}", certificate_names(cluster).unwrap_err());
            assert!(err.contains(expected), "{cluster}: {err}");
        };
        check("localhost:9090", "has a port (9090)");
        check("plane.test:443", "has a port");
        check("127.0.0.1", "IP address");
        check("::1", "IP address");
        check("*.plane.test", "not a DNS host name");
        check("plane..test", "not a DNS host name");
        check("-plane.test", "not a DNS host name");
        check("pla_ne.test", "not a DNS host name");
        check("", "not a DNS host name");
        check(&format!("{}.test", "a".repeat(64)), "not a DNS host name");
    }

    #[test]
    fn renewal_is_due_at_the_margin_or_a_third_of_the_lifetime_whichever_is_first() {
        const DAY: i64 = 24 * 3600;
        let cert = |lifetime_days: i64| CertInfo {
            not_before: 1_000 * DAY,
            not_after: (1_000 + lifetime_days) * DAY,
            serial: "01".into(),
        };
        let days = |d: u64| Duration::from_secs(d * 24 * 3600);
        // 90-day certificate, 30 days margin: 30 days before expiry (= a third).
        assert_eq!(cert(90).renew_at(days(30)), 1_060 * DAY);
        // 90-day certificate, 10 days margin: a third of the lifetime wins.
        assert_eq!(cert(90).renew_at(days(10)), 1_060 * DAY);
        // 90-day certificate, 45 days margin: the margin wins.
        assert_eq!(cert(90).renew_at(days(45)), 1_045 * DAY);
        // 1-year certificate, 30 days margin: renewed when a third (121⅔ days) remains.
        assert_eq!(cert(365).renew_at(days(30)), 1_365 * DAY - 365 * DAY / 3);
        // 6-day certificate, 1 day margin: renewed with 2 days (a third) left.
        assert_eq!(cert(6).renew_at(days(1)), 1_004 * DAY);
        // 6-day certificate, 30 days margin: always due.
        assert_eq!(cert(6).renew_at(days(30)), 976 * DAY);
        // A margin longer than the lifetime: due before it was even issued.
        assert!(cert(90).renew_at(days(365)) < cert(90).not_before);
        assert!(cert(90).renew_at(Duration::MAX) < cert(90).not_before);
    }

    #[test]
    fn retries_back_off_to_ten_minutes() {
        let base = Duration::from_secs(30);
        let within =
            |d: Duration, low: u64| d >= Duration::from_secs(low) && d <= Duration::from_secs(low).mul_f64(1.1);
        assert!(within(retry_delay(base, 1), 30));
        assert!(within(retry_delay(base, 2), 60));
        assert!(within(retry_delay(base, 3), 120));
        assert!(within(retry_delay(base, 6), 600));
        assert!(within(retry_delay(base, 1000), 600));
        assert!(within(retry_delay(Duration::from_secs(900), 3), 900));
    }

    /// A self-signed certificate for `sans`, valid from `not_before` to `not_after`
    /// (Unix seconds), and its key.
    fn self_signed(sans: &[&str], not_before: i64, not_after: i64) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.not_before = time::OffsetDateTime::from_unix_timestamp(not_before).unwrap();
        params.not_after = time::OffsetDateTime::from_unix_timestamp(not_after).unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn a_certificate_is_usable_only_with_its_key_for_both_names_before_expiry() {
        let now = now_unix();
        let names = names("plane.test");
        let (chain, key) = self_signed(&["plane.test", "*.plane.test"], now - 60, now + 3600);
        let info = inspect(&chain, &key, &names).unwrap();
        assert_eq!((info.not_before, info.not_after), (now - 60, now + 3600));

        let (_, other_key) = self_signed(&["plane.test", "*.plane.test"], now - 60, now + 3600);
        let err = format!("{:#}", inspect(&chain, &other_key, &names).unwrap_err());
        assert!(err.contains("does not match"), "{err}");

        let (only_apex, key2) = self_signed(&["plane.test"], now - 60, now + 3600);
        let err = format!("{:#}", inspect(&only_apex, &key2, &names).unwrap_err());
        assert!(err.contains("does not cover *.plane.test"), "{err}");

        let (other_cluster, key3) = self_signed(&["other.test", "*.other.test"], now - 60, now + 3600);
        assert!(inspect(&other_cluster, &key3, &names).is_err());

        let (expired, key4) = self_signed(&["plane.test", "*.plane.test"], now - 7200, now - 60);
        let err = format!("{:#}", inspect(&expired, &key4, &names).unwrap_err());
        assert!(err.contains("expired"), "{err}");

        assert!(inspect("", &key, &names).is_err());
        assert!(inspect(&chain, "not a key", &names).is_err());
    }

    #[test]
    fn saved_files_round_trip_and_broken_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("cert.pem");
        let names = names("plane.test");
        assert!(load_saved(&path, &names).unwrap().is_none());

        let now = now_unix();
        let (chain, key) = self_signed(&["plane.test", "*.plane.test"], now - 60, now + 3600);
        save_atomically(&path, format!("{}{key}", with_final_newline(&chain)).as_bytes()).unwrap();
        let saved = load_saved(&path, &names).unwrap().unwrap();
        assert_eq!(saved.chain_pem, with_final_newline(&chain));
        assert_eq!(saved.key_pem, key);
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(path.parent().unwrap()).unwrap().count(), 1);

        save_atomically(&path, chain.as_bytes()).unwrap();
        let err = format!("{:#}", load_saved(&path, &names).err().unwrap());
        assert!(err.contains("no private key"), "{err}");
        save_atomically(
            &path,
            b"garbage\n-----BEGIN PRIVATE KEY-----\nxx\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        assert!(load_saved(&path, &names).is_err());
    }

    #[test]
    fn the_account_file_is_beside_the_certificate_and_debug_hides_the_hmac_key() {
        let mut config = AcmeConfig::new("https://ca.example/dir", "/var/lib/plane/cert.pem");
        assert_eq!(
            config.account_path(),
            Path::new("/var/lib/plane/cert.pem.acme-account.json")
        );
        config.eab = Some(("kid-1".into(), "c2VjcmV0LWhtYWM".into()));
        let shown = format!("{config:?}");
        assert!(shown.contains("kid-1") && !shown.contains("c2VjcmV0LWhtYWM"), "{shown}");
    }
}
