//! TLS for the proxy's HTTPS listener: a certificate store that can be swapped while
//! the proxy runs, and the rustls server configuration built on it.
//!
//! The store holds at most one certificate chain with its key. Installing a new one
//! (from files at start, or later from an ACME task) affects the handshakes that start
//! afterwards; open connections keep the certificate they were made with. Without a
//! certificate, handshakes fail (with a log line) and nothing else breaks.

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};
use tracing::{info, warn};

/// ALPN protocol ids, in the server's order of preference.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// What the proxy knows about an installed certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    /// The end of the leaf certificate's validity.
    pub not_after: SystemTime,
    /// The DNS names of the leaf's subject alternative names (wildcards as written,
    /// e.g. `*.plane.example.com`).
    pub dns_names: Vec<String>,
}

impl CertInfo {
    /// How long the certificate stays valid from `now` (zero once expired).
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.not_after.duration_since(now).unwrap_or_default()
    }
}

struct Installed {
    key: Arc<CertifiedKey>,
    info: CertInfo,
}

/// The HTTPS listener's certificate, swappable at any time. It is the server's
/// certificate resolver, so every handshake reads the latest one.
pub struct CertStore {
    current: RwLock<Option<Installed>>,
    provider: Arc<CryptoProvider>,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore").field("current", &self.current()).finish()
    }
}

impl CertStore {
    /// An empty store: handshakes fail until a certificate is installed.
    pub fn new() -> Arc<Self> {
        Arc::new(CertStore {
            current: RwLock::new(None),
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        })
    }

    /// Installs a certificate chain (leaf first) and its private key, both in PEM, for
    /// every handshake from now on. Fails, leaving the current certificate in place, if
    /// either does not parse, the chain is empty, or the key is not the leaf's. Other
    /// PEM sections are skipped, so one file holding the chain and the key can be
    /// passed as both.
    pub fn install_pem(&self, chain_pem: &str, key_pem: &str) -> anyhow::Result<CertInfo> {
        let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| anyhow::anyhow!("the certificate chain is not valid PEM: {err}"))?;
        anyhow::ensure!(!chain.is_empty(), "the certificate chain holds no certificate");
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|err| anyhow::anyhow!("the private key is not valid PEM: {err}"))?;
        let info = cert_info(&chain[0])?;
        let signing_key = self
            .provider
            .key_provider
            .load_private_key(key)
            .map_err(|err| anyhow::anyhow!("the private key is not usable: {err}"))?;
        let certified = CertifiedKey::new(chain, signing_key);
        certified
            .keys_match()
            .map_err(|err| anyhow::anyhow!("the private key does not belong to the certificate: {err}"))?;
        info!(dns_names = ?info.dns_names, not_after = ?info.not_after, "TLS certificate installed");
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(Installed {
            key: Arc::new(certified),
            info: info.clone(),
        });
        Ok(info)
    }

    /// Reads a PEM certificate chain and key from files and installs them, like
    /// [`CertStore::install_pem`]. Errors name the file at fault.
    pub fn load_files(&self, cert_path: &Path, key_path: &Path) -> anyhow::Result<CertInfo> {
        let read = |path: &Path, what: &str| {
            std::fs::read_to_string(path)
                .map_err(|err| anyhow::anyhow!("cannot read the TLS {what} {}: {err}", path.display()))
        };
        let chain = read(cert_path, "certificate")?;
        let key = read(key_path, "key")?;
        self.install_pem(&chain, &key).map_err(|err| {
            anyhow::anyhow!(
                "cannot use the TLS certificate {} with the key {}: {err}",
                cert_path.display(),
                key_path.display()
            )
        })
    }

    /// The installed certificate, if any.
    pub fn current(&self) -> Option<CertInfo> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|c| c.info.clone())
    }

    /// A rustls server configuration that takes its certificate from this store and
    /// offers HTTP/2 then HTTP/1.1 by ALPN.
    pub fn server_config(self: &Arc<Self>) -> Arc<ServerConfig> {
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .expect("the ring provider supports the default TLS versions")
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let key = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|c| c.key.clone());
        if key.is_none() {
            warn!(sni = ?hello.server_name(), "TLS handshake refused: no certificate is installed");
        }
        key
    }
}

/// Reads the validity end and DNS names of a leaf certificate.
fn cert_info(leaf: &CertificateDer<'_>) -> anyhow::Result<CertInfo> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|err| anyhow::anyhow!("the leaf certificate is not valid X.509: {err}"))?;
    let timestamp = cert.validity().not_after.timestamp();
    let not_after = match u64::try_from(timestamp) {
        Ok(secs) => SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
        Err(_) => SystemTime::UNIX_EPOCH, // before 1970: long expired
    };
    let dns_names = cert
        .subject_alternative_name()
        .map_err(|err| anyhow::anyhow!("the leaf certificate's alternative names are not valid: {err}"))?
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    x509_parser::extensions::GeneralName::DNSName(dns) => Some((*dns).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(CertInfo { not_after, dns_names })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A test CA and leaf certificates signed by it.
    pub(crate) struct TestCa {
        issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
        /// The CA certificate, for clients to trust.
        pub(crate) cert: CertificateDer<'static>,
    }

    /// A leaf certificate in PEM, with its key.
    pub(crate) struct TestLeaf {
        pub(crate) chain_pem: String,
        pub(crate) key_pem: String,
        pub(crate) der: CertificateDer<'static>,
    }

    impl TestCa {
        pub(crate) fn new() -> TestCa {
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "Plane test CA");
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            TestCa {
                issuer: rcgen::Issuer::new(params, key),
                cert: cert.der().clone(),
            }
        }

        /// A leaf for `names`, valid until `not_after` (a date, `(year, month, day)`).
        pub(crate) fn leaf(&self, names: &[&str], not_after: (i32, u8, u8)) -> TestLeaf {
            let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
            let mut params = rcgen::CertificateParams::new(names).unwrap();
            params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &self.issuer).unwrap();
            TestLeaf {
                chain_pem: cert.pem(),
                key_pem: key.serialize_pem(),
                der: cert.der().clone(),
            }
        }
    }

    fn year(y: u64) -> SystemTime {
        // 1 January of year `y`, for 2000 ≤ y < 2100 (every fourth year is a leap year).
        let days = (y - 1970) * 365 + (y - 1969) / 4;
        SystemTime::UNIX_EPOCH + Duration::from_secs(days * 86_400)
    }

    #[test]
    fn install_reports_the_leaf() {
        let ca = TestCa::new();
        let store = CertStore::new();
        assert_eq!(store.current(), None);
        let leaf = ca.leaf(&["plane.test", "*.plane.test"], (2040, 1, 1));
        let info = store.install_pem(&leaf.chain_pem, &leaf.key_pem).unwrap();
        assert_eq!(info.dns_names, ["plane.test", "*.plane.test"]);
        assert_eq!(info.not_after, year(2040));
        assert_eq!(store.current(), Some(info.clone()));
        assert_eq!(info.remaining(year(2041)), Duration::ZERO);
        assert_eq!(info.remaining(year(2039)), Duration::from_secs(365 * 86_400));
    }

    #[test]
    fn chain_and_key_may_share_one_file() {
        let ca = TestCa::new();
        let leaf = ca.leaf(&["a.test"], (2040, 1, 1));
        let combined = format!("{}{}", leaf.chain_pem, leaf.key_pem);
        let store = CertStore::new();
        assert_eq!(store.install_pem(&combined, &combined).unwrap().dns_names, ["a.test"]);
    }

    #[test]
    fn bad_input_keeps_the_current_certificate() {
        let ca = TestCa::new();
        let store = CertStore::new();
        let a = ca.leaf(&["a.test"], (2040, 1, 1));
        let b = ca.leaf(&["b.test"], (2040, 1, 1));
        store.install_pem(&a.chain_pem, &a.key_pem).unwrap();

        let err = store.install_pem(&a.chain_pem, &b.key_pem).unwrap_err();
        assert!(err.to_string().contains("does not belong"), "{err}");
        let err = store.install_pem("", &a.key_pem).unwrap_err();
        assert!(err.to_string().contains("no certificate"), "{err}");
        let err = store.install_pem(&a.chain_pem, "not a key").unwrap_err();
        assert!(err.to_string().contains("private key"), "{err}");
        let garbage = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(store.install_pem(garbage, &a.key_pem).is_err());
        assert_eq!(store.current().unwrap().dns_names, ["a.test"]);
    }

    #[test]
    fn files_are_named_in_errors() {
        let dir = std::env::temp_dir().join(format!("plane-proxy-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
        let store = CertStore::new();
        let err = store.load_files(&cert_path, &key_path).unwrap_err().to_string();
        assert!(err.contains("cert.pem"), "{err}");

        let ca = TestCa::new();
        let leaf = ca.leaf(&["a.test"], (2040, 1, 1));
        std::fs::write(&cert_path, &leaf.chain_pem).unwrap();
        std::fs::write(&key_path, "junk").unwrap();
        let err = store.load_files(&cert_path, &key_path).unwrap_err().to_string();
        assert!(err.contains("key.pem") && err.contains("private key"), "{err}");

        std::fs::write(&key_path, &leaf.key_pem).unwrap();
        let info = store.load_files(&cert_path, &key_path).unwrap();
        assert_eq!(info.dns_names, ["a.test"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn server_config_offers_h2_first() {
        let config = CertStore::new().server_config();
        assert_eq!(config.alpn_protocols, [b"h2".to_vec(), b"http/1.1".to_vec()]);
    }
}
