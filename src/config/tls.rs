//! `[service.tls] mode = "terminate"`: the certificate chain and key read from their PEM
//! files and built into the rustls `ServerConfig` that the service's connections complete
//! their handshakes with (rustls with the `ring` provider; TLS 1.2 and 1.3).
//!
//! One [`Terminate`] per service per config generation: a reload (or a change of the
//! files, which triggers one) reads the files again and builds a new `ServerConfig`, held
//! by the published table in the service's config; handshakes under way keep the `Arc`
//! they started with. Files that fail to load fail the whole config, so a reload keeps the
//! old table.
//!
//! Invariant: reads the two files it is given, nothing else; no network I/O.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

/// The largest certificate or key file read (a chain of a few certificates is ~10 KiB).
pub const MAX_PEM_FILE: u64 = 1024 * 1024;

/// `min_version`: the oldest TLS version a terminating service accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3 (the default).
    #[default]
    V1_2,
    /// TLS 1.3 only.
    V1_3,
}

impl TlsVersion {
    pub fn parse(s: &str) -> Option<TlsVersion> {
        match s {
            "1.2" => Some(TlsVersion::V1_2),
            "1.3" => Some(TlsVersion::V1_3),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            TlsVersion::V1_2 => "1.2",
            TlsVersion::V1_3 => "1.3",
        }
    }
}

/// A terminating service's TLS server: where its certificate came from, and the rustls
/// configuration built from it.
#[derive(Clone)]
pub struct Terminate {
    /// The PEM certificate chain (leaf first), resolved against the config file's
    /// directory; watched for changes.
    pub cert: PathBuf,
    /// The PEM private key (PKCS#8, PKCS#1 or SEC1); watched for changes.
    pub key: PathBuf,
    /// ALPN protocols offered, in preference order (empty: no ALPN).
    pub alpn: Vec<String>,
    pub min_version: TlsVersion,
    /// A digest of both files' bytes as read: a config equal in everything, files
    /// included, keeps the running generation's `ServerConfig` (and its session cache).
    digest: u64,
    /// Built once per config generation; each connection clones the `Arc`.
    pub server: Arc<ServerConfig>,
}

impl PartialEq for Terminate {
    fn eq(&self, other: &Terminate) -> bool {
        self.cert == other.cert
            && self.key == other.key
            && self.alpn == other.alpn
            && self.min_version == other.min_version
            && self.digest == other.digest
    }
}

impl Eq for Terminate {}

impl std::fmt::Debug for Terminate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Terminate")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .field("alpn", &self.alpn)
            .field("min_version", &self.min_version)
            .finish_non_exhaustive()
    }
}

/// Why a certificate or key did not load; `Display` is one line naming the file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("tls {what} \"{}\": cannot read: {err}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        err: std::io::Error,
    },
    #[error("tls {what} \"{}\" is larger than {MAX_PEM_FILE} bytes: it should hold PEM blocks only", path.display())]
    TooLarge { what: &'static str, path: PathBuf },
    #[error("tls cert \"{}\" holds no PEM certificate (-----BEGIN CERTIFICATE-----): {detail}", path.display())]
    NoCert { path: PathBuf, detail: String },
    #[error("tls key \"{}\" holds no PEM private key (-----BEGIN PRIVATE KEY-----, RSA or EC): {detail}", path.display())]
    NoKey { path: PathBuf, detail: String },
    #[error("tls key \"{}\" cannot serve cert \"{}\": {detail}", key.display(), cert.display())]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        detail: String,
    },
}

impl Terminate {
    /// Reads `cert` and `key` and builds the server configuration: the chain must hold a
    /// certificate, the key must be one rustls (ring) can sign with and must match the
    /// leaf certificate.
    pub fn load(
        cert: PathBuf,
        key: PathBuf,
        alpn: Vec<String>,
        min_version: TlsVersion,
    ) -> Result<Terminate, LoadError> {
        let cert_pem = read("cert", &cert)?;
        let key_pem = read("key", &key)?;
        Terminate::build(cert, key, alpn, min_version, &cert_pem, &key_pem)
    }

    /// [`Terminate::load`], but `prev` itself when the files still hold what it was
    /// built from (same paths and settings): a caller that loads on every poll (the
    /// Swarm provider) keeps one `ServerConfig`, and its session cache, until the files
    /// change.
    pub fn load_reusing(
        cert: PathBuf,
        key: PathBuf,
        alpn: Vec<String>,
        min_version: TlsVersion,
        prev: Option<&Arc<Terminate>>,
    ) -> Result<Arc<Terminate>, LoadError> {
        let cert_pem = read("cert", &cert)?;
        let key_pem = read("key", &key)?;
        if let Some(p) = prev {
            if p.cert == cert
                && p.key == key
                && p.alpn == alpn
                && p.min_version == min_version
                && p.digest == digest(&cert_pem, &key_pem)
            {
                return Ok(p.clone());
            }
        }
        Terminate::build(cert, key, alpn, min_version, &cert_pem, &key_pem).map(Arc::new)
    }

    fn build(
        cert: PathBuf,
        key: PathBuf,
        alpn: Vec<String>,
        min_version: TlsVersion,
        cert_pem: &[u8],
        key_pem: &[u8],
    ) -> Result<Terminate, LoadError> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| LoadError::NoCert {
                path: cert.clone(),
                detail: e.to_string(),
            })?;
        if chain.is_empty() {
            return Err(LoadError::NoCert {
                path: cert,
                detail: "no CERTIFICATE block found".into(),
            });
        }
        let private = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| LoadError::NoKey {
            path: key.clone(),
            detail: e.to_string(),
        })?;
        let versions: &[&rustls::SupportedProtocolVersion] = match min_version {
            TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
            TlsVersion::V1_3 => &[&rustls::version::TLS13],
        };
        let mismatch = |e: rustls::Error| LoadError::Mismatch {
            cert: cert.clone(),
            key: key.clone(),
            detail: describe(&e),
        };
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .map_err(mismatch)?
            .with_no_client_auth()
            .with_single_cert(chain, private)
            .map_err(mismatch)?;
        server.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        Ok(Terminate {
            digest: digest(cert_pem, key_pem),
            cert,
            key,
            alpn,
            min_version,
            server: Arc::new(server),
        })
    }
}

/// What [`Terminate`] compares files by.
fn digest(cert_pem: &[u8], key_pem: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    cert_pem.hash(&mut h);
    key_pem.hash(&mut h);
    h.finish()
}

/// The process's crypto provider (ring), made once. ring rather than rustls' default
/// aws-lc-rs, which needs cmake and a long C build; the price is no post-quantum key
/// exchange (X25519MLKEM768), which rustls marks by deprecating ring's provider.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<Arc<rustls::crypto::CryptoProvider>> =
        std::sync::OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

fn describe(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
            "the key is not the certificate's: use the key the certificate was issued for".into()
        }
        rustls::Error::InvalidCertificate(_) => format!("the certificate cannot be parsed ({e})"),
        _ => e.to_string(),
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, LoadError> {
    use std::io::Read;
    let mut buf = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_PEM_FILE + 1).read_to_end(&mut buf))
        .map_err(|err| LoadError::Read {
            what,
            path: path.to_owned(),
            err,
        })?;
    if buf.len() as u64 > MAX_PEM_FILE {
        return Err(LoadError::TooLarge {
            what,
            path: path.to_owned(),
        });
    }
    Ok(buf)
}

/// Certificates for unit tests (the `openssl` CLI, as the integration tests use).
#[cfg(test)]
pub(crate) mod testing {
    use std::path::PathBuf;
    use std::process::{Command, Stdio};

    /// A fresh self-signed certificate and key for `cn`: (cert, key) in a new directory
    /// under the system temp dir.
    pub fn self_signed(cn: &str) -> (PathBuf, PathBuf) {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("meshd-unit-tls-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let (pem, key) = (dir.join("c.pem"), dir.join("c.key"));
        let ok = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:P-256", "-nodes", "-days", "2", "-subj"])
            .arg(format!("/CN={cn}"))
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&pem)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("openssl (scripts/setup.sh installs it)");
        assert!(ok.success(), "openssl req failed");
        (pem, key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unchanged_files_keep_the_server_config() {
        let (pem, key) = testing::self_signed("a.test");
        let load = |prev| {
            Terminate::load_reusing(pem.clone(), key.clone(), Vec::new(), TlsVersion::V1_2, prev)
        };
        let a = load(None).expect("loads");
        let b = load(Some(&a)).expect("loads");
        assert!(Arc::ptr_eq(&a, &b));
        // Other settings: another config.
        let c = Terminate::load_reusing(
            pem.clone(),
            key.clone(),
            Vec::new(),
            TlsVersion::V1_3,
            Some(&a),
        )
        .expect("loads");
        assert!(!Arc::ptr_eq(&a, &c) && *a != *c);
        let _ = std::fs::remove_dir_all(pem.parent().expect("dir"));
    }
}
