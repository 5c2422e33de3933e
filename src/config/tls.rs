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
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
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
        let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| LoadError::NoKey {
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
        let mut h = std::collections::hash_map::DefaultHasher::new();
        cert_pem.hash(&mut h);
        key_pem.hash(&mut h);
        Ok(Terminate {
            cert,
            key,
            alpn,
            min_version,
            digest: h.finish(),
            server: Arc::new(server),
        })
    }
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
