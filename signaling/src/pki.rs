//! The installation's certificate authority and device enrollment.
//!
//! Devices authenticate to the control plane with client certificates issued
//! by the installation's own CA. A device's identity is the common name of its
//! certificate, never a field in a message.
//!
//! Layout under the PKI directory (`<data-dir>/pki`):
//!
//! ```text
//! ca.pem  ca.key          the CA (key mode 0600)
//! server.pem server.key   the QUIC server's certificate, issued by the CA
//! ```
//!
//! `fleetcall device enroll <id>` writes `<id>.pem`, `<id>.key` and a copy of
//! `ca.pem` for the device to trust the server.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// ALPN protocol of the device control plane.
pub const ALPN: &[u8] = b"fleetcall/1";

/// Longest device id, in bytes.
pub const MAX_DEVICE_ID: usize = 64;

/// Why a PKI operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Generating or parsing a certificate failed.
    #[error("certificate: {0}")]
    Certificate(String),
    /// A device id is empty, too long or uses characters outside `[A-Za-z0-9_.-]`.
    #[error("invalid device id {0:?}: use 1-64 characters of A-Z a-z 0-9 _ . -")]
    InvalidDeviceId(String),
    /// The certificate carries no usable device id.
    #[error("the client certificate names no device")]
    NoDeviceId,
    /// A file exists that enrollment would overwrite.
    #[error("{0} exists; remove it to enroll again")]
    Exists(PathBuf),
    /// TLS configuration failed.
    #[error("tls: {0}")]
    Tls(#[from] rustls::Error),
}

/// Checks a device id.
pub fn valid_device_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_DEVICE_ID
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Bearer tokens for devices that cannot hold a client certificate
/// (browsers on the WebSocket): `<device id>.<hex HMAC-SHA256 of the id>`,
/// keyed by a secret created in the PKI directory on first use. Possession of
/// the token is the identity, like the key of a certificate; re-keying the
/// secret revokes every token at once.
#[derive(Debug, Clone)]
pub struct DeviceTokens {
    key: ring::hmac::Key,
}

impl DeviceTokens {
    /// Opens (or creates) the token secret in `dir`.
    pub fn open_or_init(dir: &Path) -> Result<DeviceTokens, PkiError> {
        let path = dir.join("device-token.secret");
        if !path.exists() {
            let mut secret = [0u8; 32];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
                .map_err(|_| PkiError::Certificate("no system randomness".into()))?;
            write_private(&path, &secret)?;
        }
        let secret = read(&path)?;
        Ok(DeviceTokens { key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret) })
    }

    /// The token for `device_id`.
    pub fn issue(&self, device_id: &str) -> Result<String, PkiError> {
        if !valid_device_id(device_id) {
            return Err(PkiError::InvalidDeviceId(device_id.to_owned()));
        }
        let tag = ring::hmac::sign(&self.key, device_id.as_bytes());
        let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        Ok(format!("{device_id}.{hex}"))
    }

    /// The device a token names, if the token is genuine.
    pub fn verify(&self, token: &str) -> Option<String> {
        let (id, hex) = token.rsplit_once('.')?;
        if !valid_device_id(id) || hex.len() != 64 {
            return None;
        }
        let tag: Vec<u8> = (0..32).map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()).collect::<Option<_>>()?;
        // Constant-time comparison inside ring.
        ring::hmac::verify(&self.key, id.as_bytes(), &tag).ok()?;
        Some(id.to_owned())
    }
}

/// Files of an enrolled device.
#[derive(Debug, Clone)]
pub struct DeviceFiles {
    /// The device certificate.
    pub cert: PathBuf,
    /// Its private key (mode 0600).
    pub key: PathBuf,
    /// The CA certificate the device trusts the server with.
    pub ca: PathBuf,
}

/// The installation's CA on disk.
#[derive(Debug, Clone)]
pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// Opens the PKI directory, creating the CA and the server certificate on
    /// first use. `server_names` go into the server certificate's SANs
    /// (DNS names or IP addresses devices dial).
    pub fn open_or_init(dir: impl Into<PathBuf>, server_names: &[String]) -> Result<Pki, PkiError> {
        let pki = Pki { dir: dir.into() };
        fs::create_dir_all(&pki.dir).map_err(|source| PkiError::Io { path: pki.dir.clone(), source })?;
        if !pki.dir.join("ca.pem").exists() {
            pki.create_ca()?;
        }
        if !pki.dir.join("server.pem").exists() {
            pki.create_server_cert(server_names)?;
        }
        Ok(pki)
    }

    /// The PKI directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA certificate path.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Issues a client certificate for `device_id` into `out_dir`.
    pub fn enroll(&self, device_id: &str, out_dir: &Path) -> Result<DeviceFiles, PkiError> {
        if !valid_device_id(device_id) {
            return Err(PkiError::InvalidDeviceId(device_id.to_owned()));
        }
        fs::create_dir_all(out_dir).map_err(|source| PkiError::Io { path: out_dir.to_owned(), source })?;
        let files = DeviceFiles {
            cert: out_dir.join(format!("{device_id}.pem")),
            key: out_dir.join(format!("{device_id}.key")),
            ca: out_dir.join("ca.pem"),
        };
        for path in [&files.cert, &files.key] {
            if path.exists() {
                return Err(PkiError::Exists(path.clone()));
            }
        }
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
        params.distinguished_name.push(DnType::CommonName, device_id);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().map_err(cert_err)?;
        let cert = params.signed_by(&key, &self.issuer()?).map_err(cert_err)?;
        write_private(&files.key, key.serialize_pem().as_bytes())?;
        write(&files.cert, cert.pem().as_bytes())?;
        if out_dir != self.dir {
            write(&files.ca, &read(&self.ca_path())?)?;
        }
        Ok(files)
    }

    /// TLS for the QUIC server: its certificate, and client certificates
    /// required and verified against the CA.
    pub fn server_tls(&self) -> Result<rustls::ServerConfig, PkiError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for cert in parse_certs(&read(&self.ca_path())?)? {
            roots.add(cert)?;
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| PkiError::Certificate(e.to_string()))?;
        let certs = parse_certs(&read(&self.dir.join("server.pem"))?)?;
        let key = parse_key(&read(&self.dir.join("server.key"))?)?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }

    fn create_ca(&self) -> Result<(), PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
        params.distinguished_name.push(DnType::CommonName, "fleetcall installation CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        // Devices live for years; the CA outlives them.
        params.not_after = rcgen::date_time_ymd(2046, 1, 1);
        let key = KeyPair::generate().map_err(cert_err)?;
        let cert = params.self_signed(&key).map_err(cert_err)?;
        write_private(&self.dir.join("ca.key"), key.serialize_pem().as_bytes())?;
        write(&self.dir.join("ca.pem"), cert.pem().as_bytes())?;
        tracing::info!(dir = %self.dir.display(), "created the installation CA");
        Ok(())
    }

    fn create_server_cert(&self, names: &[String]) -> Result<(), PkiError> {
        let mut names = names.to_vec();
        if !names.iter().any(|n| n == "localhost") {
            names.push("localhost".into());
        }
        let mut params = CertificateParams::new(names).map_err(cert_err)?;
        params.distinguished_name.push(DnType::CommonName, "fleetcall server");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().map_err(cert_err)?;
        let cert = params.signed_by(&key, &self.issuer()?).map_err(cert_err)?;
        write_private(&self.dir.join("server.key"), key.serialize_pem().as_bytes())?;
        write(&self.dir.join("server.pem"), cert.pem().as_bytes())?;
        Ok(())
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>, PkiError> {
        let key_pem = String::from_utf8_lossy(&read(&self.dir.join("ca.key"))?).into_owned();
        let key = KeyPair::from_pem(&key_pem).map_err(cert_err)?;
        let ca_pem = String::from_utf8_lossy(&read(&self.ca_path())?).into_owned();
        Issuer::from_ca_cert_pem(&ca_pem, key).map_err(cert_err)
    }
}

/// TLS for a device: its certificate, trusting the installation's CA.
pub fn device_tls(ca_pem: &[u8], cert_pem: &[u8], key_pem: &[u8]) -> Result<rustls::ClientConfig, PkiError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in parse_certs(ca_pem)? {
        roots.add(cert)?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(parse_certs(cert_pem)?, parse_key(key_pem)?)?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// The device id in a verified client certificate: its common name.
pub fn device_id_of(cert: &CertificateDer<'_>) -> Result<String, PkiError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).map_err(|e| PkiError::Certificate(e.to_string()))?;
    let id = parsed
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or(PkiError::NoDeviceId)?;
    if !valid_device_id(id) {
        return Err(PkiError::InvalidDeviceId(id.to_owned()));
    }
    Ok(id.to_owned())
}

fn parse_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::Certificate(e.to_string()))?;
    if certs.is_empty() {
        return Err(PkiError::Certificate("no certificate in PEM".into()));
    }
    Ok(certs)
}

fn parse_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| PkiError::Certificate(e.to_string()))
}

fn cert_err(e: rcgen::Error) -> PkiError {
    PkiError::Certificate(e.to_string())
}

fn read(path: &Path) -> Result<Vec<u8>, PkiError> {
    fs::read(path).map_err(|source| PkiError::Io { path: path.to_owned(), source })
}

fn write(path: &Path, contents: &[u8]) -> Result<(), PkiError> {
    fs::write(path, contents).map_err(|source| PkiError::Io { path: path.to_owned(), source })
}

/// Writes a new file only the owner can read.
fn write_private(path: &Path, contents: &[u8]) -> Result<(), PkiError> {
    let io = |source| PkiError::Io { path: path.to_owned(), source };
    let mut file = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(io)?;
    file.write_all(contents).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("fleetcall-pki-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn enrolled_device_certificate_names_the_device() {
        let dir = temp_dir("enroll");
        let pki = Pki::open_or_init(dir.join("pki"), &["127.0.0.1".into()]).unwrap();
        let files = pki.enroll("bed-12.ward-3", &dir.join("devices")).unwrap();
        let cert = parse_certs(&fs::read(&files.cert).unwrap()).unwrap().remove(0);
        assert_eq!(device_id_of(&cert).unwrap(), "bed-12.ward-3");
        assert!(device_tls(&fs::read(&files.ca).unwrap(), &fs::read(&files.cert).unwrap(), &fs::read(&files.key).unwrap()).is_ok());
        assert!(pki.server_tls().is_ok());
        // Enrolling twice would silently replace a device's identity.
        assert!(matches!(pki.enroll("bed-12.ward-3", &dir.join("devices")), Err(PkiError::Exists(_))));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn reopening_keeps_the_ca() {
        let dir = temp_dir("reopen");
        Pki::open_or_init(&dir, &[]).unwrap();
        let ca = fs::read(dir.join("ca.pem")).unwrap();
        Pki::open_or_init(&dir, &[]).unwrap();
        assert_eq!(fs::read(dir.join("ca.pem")).unwrap(), ca);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn device_tokens_verify_only_their_own_id() {
        let dir = temp_dir("tokens");
        fs::create_dir_all(&dir).unwrap();
        let tokens = DeviceTokens::open_or_init(&dir).unwrap();
        let token = tokens.issue("kiosk-3").unwrap();
        assert_eq!(tokens.verify(&token).as_deref(), Some("kiosk-3"));
        let forged = token.replacen("kiosk-3", "kiosk-4", 1);
        assert_eq!(tokens.verify(&forged), None);
        assert_eq!(tokens.verify("kiosk-3"), None);
        assert_eq!(tokens.verify("kiosk-3.zz"), None);
        assert_eq!(tokens.verify(&format!("{token}00")), None);
        // Reopening keeps the secret, so issued tokens stay valid.
        assert_eq!(DeviceTokens::open_or_init(&dir).unwrap().verify(&token).as_deref(), Some("kiosk-3"));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_device_ids_are_refused() {
        let dir = temp_dir("bad");
        let pki = Pki::open_or_init(&dir, &[]).unwrap();
        for id in ["", "a b", "../etc", &"x".repeat(65)] {
            assert!(matches!(pki.enroll(id, &dir), Err(PkiError::InvalidDeviceId(_))), "{id:?}");
        }
        let _ = fs::remove_dir_all(&dir);
    }
}
