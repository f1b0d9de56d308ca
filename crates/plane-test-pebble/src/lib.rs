//! A throwaway [pebble](https://github.com/letsencrypt/pebble) ACME server for tests
//! (DESIGN §6: the real thing, never a mock).
//!
//! [`Pebble::start`] runs the machine's `pebble` binary (`$PEBBLE_BIN`, else
//! `/usr/bin/pebble`, else the `PATH`; Debian's `pebble` package) and returns once its
//! ACME directory answers. Validation is real: pebble asks the DNS server named in
//! [`PebbleOptions::dns_server`] for the `_acme-challenge` TXT records, with no random
//! pause before each attempt (`PEBBLE_VA_NOSLEEP=1`); `PEBBLE_VA_ALWAYS_VALID` is
//! removed from its environment.
//!
//! How a server runs:
//! * Debian's package does not ship pebble's test certificate, so each server gets its
//!   own: a CA and a leaf for `localhost` and `127.0.0.1`, made with rcgen in its
//!   temporary directory. An ACME client trusts [`Pebble::listener_ca_pem_path`] to talk
//!   to pebble; the certificates pebble *issues* chain to another root, regenerated at
//!   every start, that [`Pebble::issuing_roots_pem`] fetches from the management API.
//! * It listens on 127.0.0.1 only, on ports that were free when it started (the ACME API
//!   and the management API; the HTTP-01 and TLS-ALPN-01 ports it would connect to are
//!   free ports too, unused for DNS-01). A start that loses a port to another process is
//!   retried on new ports.
//! * Its config (`pebble-config.json`) and log (`pebble.log`, named in every error) are
//!   in that directory, which is deleted when the [`Pebble`] is dropped.
//! * Cleanup: dropping the [`Pebble`] kills the process. It is also started with a
//!   parent-death signal (from a thread that lives as long as the test binary), so it
//!   dies if the test binary is killed.

use anyhow::{anyhow, bail, Context};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long pebble may take to answer its directory.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a starting server is looked at.
const POLL: Duration = Duration::from_millis(20);
/// Attempts at a start, each on new ports (another process may take a free port between
/// the check and pebble's bind).
const PORT_ATTEMPTS: usize = 5;
/// How long one request to the management API may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// What pebble logs when a port it should listen on is taken.
const ADDRESS_IN_USE: &str = "address already in use";

/// How to run a [`Pebble`].
#[derive(Debug, Clone)]
pub struct PebbleOptions {
    /// The DNS server pebble's validation authority asks (`-dnsserver`).
    pub dns_server: SocketAddr,
    /// External account binding keys: (key id, base64url HMAC key). When not empty,
    /// pebble requires a binding to one of them for every new account.
    pub eab_keys: Vec<(String, String)>,
    /// The percentage of new orders in which pebble reuses an account's valid
    /// authorizations (`PEBBLE_AUTHZREUSE`). 0 by default, so every order is really
    /// validated; pebble's own default is 50.
    pub authz_reuse_percent: u8,
    /// Run with `-strict` (pebble's upcoming breaking changes). On by default.
    pub strict: bool,
}

impl PebbleOptions {
    /// Options for a pebble asking `dns_server`, without external account binding.
    pub fn new(dns_server: SocketAddr) -> PebbleOptions {
        PebbleOptions {
            dns_server,
            eab_keys: Vec::new(),
            authz_reuse_percent: 0,
            strict: true,
        }
    }
}

/// A running pebble. See the crate docs.
pub struct Pebble {
    /// Holds the certificates, the config and the log; deleted on drop.
    dir: tempfile::TempDir,
    child: Child,
    acme_port: u16,
    management_port: u16,
    /// An HTTPS client trusting the listener CA, for the management API.
    http: reqwest::Client,
}

impl std::fmt::Debug for Pebble {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pebble")
            .field("directory_url", &self.directory_url())
            .field("management_port", &self.management_port)
            .field("dir", &self.dir.path())
            .finish()
    }
}

impl Pebble {
    /// Starts pebble and waits until its directory answers.
    pub async fn start(opts: PebbleOptions) -> anyhow::Result<Pebble> {
        let bin = find_pebble()?;
        let dir = tempfile::Builder::new()
            .prefix("plane-test-pebble-")
            .tempdir()
            .context("creating pebble's temporary directory")?;
        let ca_pem = write_listener_certs(dir.path())?;
        let http = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes())?)
            .timeout(REQUEST_TIMEOUT)
            .build()
            .context("building the HTTPS client for pebble")?;
        let mut attempt = 1;
        loop {
            let ports = [free_port()?, free_port()?, free_port()?, free_port()?];
            match launch(&bin, dir.path(), &opts, ports, &http).await {
                Ok(child) => {
                    return Ok(Pebble {
                        dir,
                        child,
                        acme_port: ports[0],
                        management_port: ports[1],
                        http,
                    })
                }
                // Only a lost port is worth another attempt.
                Err(_)
                    if attempt < PORT_ATTEMPTS && log_tail(&dir.path().join("pebble.log")).contains(ADDRESS_IN_USE) =>
                {
                    attempt += 1
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The ACME directory: `https://127.0.0.1:<port>/dir`.
    pub fn directory_url(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.acme_port)
    }

    /// The CA (PEM file) of pebble's own HTTPS listeners, which an ACME client must
    /// trust to talk to pebble.
    pub fn listener_ca_pem_path(&self) -> PathBuf {
        self.dir.path().join("listener-ca.pem")
    }

    /// Pebble's log file (stdout and stderr).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("pebble.log")
    }

    /// The root (PEM) that the certificates pebble issues chain to, from the management
    /// API (`/roots/0`). It is regenerated at every start of pebble.
    pub async fn issuing_roots_pem(&self) -> anyhow::Result<String> {
        self.management_get("/roots/0").await
    }

    /// The intermediate (PEM) that signs the certificates pebble issues
    /// (`/intermediates/0`). Pebble also sends it in every chain.
    pub async fn issuing_intermediates_pem(&self) -> anyhow::Result<String> {
        self.management_get("/intermediates/0").await
    }

    async fn management_get(&self, path: &str) -> anyhow::Result<String> {
        let url = format!("https://127.0.0.1:{}{path}", self.management_port);
        let response = self.http.get(&url).send().await.with_context(|| format!("GET {url}"))?;
        let status = response.status();
        let body = response.text().await.with_context(|| format!("reading GET {url}"))?;
        if !status.is_success() {
            bail!("GET {url}: {status}: {body}");
        }
        Ok(body)
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes `listener-ca.pem` and a leaf for `localhost`/`127.0.0.1` (`listener.pem`,
/// `listener-key.pem`) into `dir`; returns the CA's PEM.
fn write_listener_certs(dir: &Path) -> anyhow::Result<String> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "plane-test-pebble listener CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let ca = Issuer::new(ca_params, ca_key);

    let leaf_key = KeyPair::generate()?;
    let mut leaf_params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
    leaf_params.distinguished_name.push(DnType::CommonName, "localhost");
    leaf_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf_cert = leaf_params.signed_by(&leaf_key, &ca)?;

    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    };
    write("listener-ca.pem", &ca_cert.pem())?;
    write("listener.pem", &leaf_cert.pem())?;
    write("listener-key.pem", &leaf_key.serialize_pem())?;
    Ok(ca_cert.pem())
}

/// Writes the config for `ports` (ACME, management, HTTP-01, TLS-ALPN-01), starts
/// pebble and waits until its directory answers.
async fn launch(
    bin: &Path,
    dir: &Path,
    opts: &PebbleOptions,
    ports: [u16; 4],
    http: &reqwest::Client,
) -> anyhow::Result<Child> {
    let [acme, management, http_port, tls_port] = ports;
    let mac_keys: serde_json::Map<String, serde_json::Value> = opts
        .eab_keys
        .iter()
        .map(|(kid, key)| (kid.clone(), serde_json::Value::String(key.clone())))
        .collect();
    let config = serde_json::json!({
        "pebble": {
            "listenAddress": format!("127.0.0.1:{acme}"),
            "managementListenAddress": format!("127.0.0.1:{management}"),
            "certificate": dir.join("listener.pem"),
            "privateKey": dir.join("listener-key.pem"),
            "httpPort": http_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": !opts.eab_keys.is_empty(),
            "externalAccountMACKeys": mac_keys,
        }
    });
    let config_path = dir.join("pebble-config.json");
    fs::write(&config_path, serde_json::to_vec_pretty(&config)?)
        .with_context(|| format!("writing {}", config_path.display()))?;

    let log_path = dir.join("pebble.log");
    let log = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let mut cmd = Command::new(bin);
    cmd.arg("-config")
        .arg(&config_path)
        .arg("-dnsserver")
        .arg(opts.dns_server.to_string())
        .arg(format!("-strict={}", opts.strict))
        .current_dir(dir)
        .env("PEBBLE_VA_NOSLEEP", "1")
        .env_remove("PEBBLE_VA_ALWAYS_VALID")
        .env("PEBBLE_AUTHZREUSE", opts.authz_reuse_percent.to_string())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let mut child = plane_test_postgres::spawn_tied_to_process(cmd, libc::SIGKILL)
        .with_context(|| format!("starting {}", bin.display()))?;
    match wait_ready(&mut child, acme, http, &log_path).await {
        Ok(()) => Ok(child),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(e.context(format!("pebble did not start on 127.0.0.1:{acme}")))
        }
    }
}

async fn wait_ready(child: &mut Child, port: u16, http: &reqwest::Client, log: &Path) -> anyhow::Result<()> {
    let url = format!("https://127.0.0.1:{port}/dir");
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "pebble exited ({status}); its log ({}):\n{}",
                log.display(),
                log_tail(log)
            );
        }
        let problem = match http.get(&url).timeout(POLL * 50).send().await {
            Ok(response) if response.status().is_success() => return Ok(()),
            Ok(response) => format!("{url} answered {}", response.status()),
            Err(e) => format!("{url}: {e:#}"),
        };
        if Instant::now() > deadline {
            bail!(
                "its directory did not answer within {START_TIMEOUT:?} ({problem}); its log ({}):\n{}",
                log.display(),
                log_tail(log)
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

fn find_pebble() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("PEBBLE_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let default = Path::new("/usr/bin/pebble");
    if default.is_file() {
        return Ok(default.to_path_buf());
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("pebble"))
        .find(|bin| bin.is_file())
        .ok_or_else(|| {
            anyhow!(
                "no pebble binary found (looked at $PEBBLE_BIN, /usr/bin/pebble and the PATH): \
                 install Debian's `pebble` package, or set PEBBLE_BIN"
            )
        })
}

fn log_tail(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind(("127.0.0.1", 0))
        .context("finding a free port")?
        .local_addr()?
        .port())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A DNS address nothing answers at: these tests issue nothing.
    fn no_dns() -> SocketAddr {
        "127.0.0.1:9".parse().unwrap()
    }

    async fn directory(pebble: &Pebble) -> serde_json::Value {
        let ca = fs::read(pebble.listener_ca_pem_path()).unwrap();
        let client = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
            .build()
            .unwrap();
        let response = client.get(pebble.directory_url()).send().await.unwrap();
        assert!(response.status().is_success(), "{}", response.status());
        response.json().await.unwrap()
    }

    #[tokio::test]
    async fn starts_and_the_directory_answers_over_tls_trusted_by_the_listener_ca() {
        let pebble = Pebble::start(PebbleOptions::new(no_dns())).await.unwrap();
        assert!(pebble.directory_url().starts_with("https://127.0.0.1:"));
        let dir = directory(&pebble).await;
        assert!(dir["newAccount"].as_str().is_some(), "{dir}");
        assert!(dir["newOrder"].as_str().is_some(), "{dir}");
        assert_ne!(dir["meta"]["externalAccountRequired"], serde_json::json!(true), "{dir}");

        let root = pebble.issuing_roots_pem().await.unwrap();
        assert!(root.contains("BEGIN CERTIFICATE"), "{root}");
        let intermediate = pebble.issuing_intermediates_pem().await.unwrap();
        assert!(intermediate.contains("BEGIN CERTIFICATE"), "{intermediate}");
        assert_ne!(root, intermediate);

        // Dropping kills it and deletes its directory.
        let tmp = pebble.dir.path().to_path_buf();
        let url = pebble.directory_url();
        drop(pebble);
        assert!(!tmp.exists());
        assert!(reqwest::Client::builder()
            .danger_accept_invalid_certs(true)
            .build()
            .unwrap()
            .get(url)
            .send()
            .await
            .is_err());
    }

    #[tokio::test]
    async fn starts_requiring_external_account_binding() {
        let mut opts = PebbleOptions::new(no_dns());
        opts.eab_keys = vec![(
            "kid-1".to_owned(),
            "cGxhbmUtdGVzdC1wZWJibGU6IGFuIEVBQiBrZXkgZm9yIHRlc3RzIG9ubHkhISE".to_owned(),
        )];
        let pebble = Pebble::start(opts).await.unwrap();
        let dir = directory(&pebble).await;
        assert_eq!(dir["meta"]["externalAccountRequired"], serde_json::json!(true), "{dir}");
    }

    #[tokio::test]
    async fn a_pebble_that_cannot_start_says_why_with_its_log() {
        let mut opts = PebbleOptions::new(no_dns());
        // Pebble refuses a MAC key that is not base64url.
        opts.eab_keys = vec![("kid-1".to_owned(), "not base64!".to_owned())];
        let err = Pebble::start(opts).await.unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("pebble exited"), "{text}");
        assert!(text.contains("pebble.log"), "{text}");
    }
}
