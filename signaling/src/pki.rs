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
//! `ca.pem` for the device to trust the server. A device certificate is valid
//! for a configurable time (default 1 year) from its enrollment, and carries
//! the named rooms the device may join as SAN URIs
//! (`urn:fleetcall:room:ward-3`, `urn:fleetcall:room:ward-*`); calls it is
//! invited to need no grant. Revocation lives in [`crate::revocations`].

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::grants::{Credential, CredentialKey, Grant, ROOM_URI_PREFIX, RoomPattern};
use crate::ids::DeviceId;

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
    /// A room grant is not a room name or `prefix*`.
    #[error("invalid room grant {0:?}")]
    InvalidRoom(String),
    /// A validity of zero, or too long to express.
    #[error("invalid certificate validity")]
    InvalidValidity,
}

/// Default validity of a device certificate.
pub const DEVICE_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

/// How to enroll a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enrollment {
    /// The certificate is valid this long from now.
    pub validity: Duration,
    /// Named rooms the device may join.
    pub rooms: Vec<RoomPattern>,
    /// Issue no earlier than this (Unix seconds): the moment after its id's
    /// last revocation, so a new certificate is never revoked by an old entry.
    pub not_before: u64,
}

impl Default for Enrollment {
    fn default() -> Self {
        Enrollment { validity: DEVICE_VALIDITY, rooms: Vec::new(), not_before: 0 }
    }
}

/// Checks a device id.
pub fn valid_device_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_DEVICE_ID
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
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
    pub fn enroll(&self, device_id: &str, out_dir: &Path, enrollment: &Enrollment) -> Result<DeviceFiles, PkiError> {
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
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let from = now.max(enrollment.not_before);
        let until = i64::try_from(enrollment.validity.as_secs())
            .ok()
            .filter(|v| *v > 0)
            .and_then(|v| v.checked_add(from as i64))
            .ok_or(PkiError::InvalidValidity)?;
        params.not_before = time::OffsetDateTime::from_unix_timestamp(from as i64).map_err(|_| PkiError::InvalidValidity)?;
        params.not_after = time::OffsetDateTime::from_unix_timestamp(until).map_err(|_| PkiError::InvalidValidity)?;
        for room in &enrollment.rooms {
            let uri = format!("{ROOM_URI_PREFIX}{room}");
            let uri = uri.as_str().try_into().map_err(|_| PkiError::InvalidRoom(room.to_string()))?;
            params.subject_alt_names.push(SanType::URI(uri));
        }
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
    device_credential(cert).map(|c| c.subject)
}

/// The credential a verified client certificate proves: the device id (its
/// common name), its public key, when it was issued, and its room grants.
pub fn device_credential(cert: &CertificateDer<'_>) -> Result<Credential, PkiError> {
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
    let identity = DeviceId::new(id).map_err(|_| PkiError::InvalidDeviceId(id.to_owned()))?;
    let mut rooms = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(uri) = name
                && let Some(room) = uri.strip_prefix(ROOM_URI_PREFIX)
            {
                rooms.push(RoomPattern::parse(room).map_err(|_| PkiError::InvalidRoom(room.to_owned()))?);
            }
        }
    }
    Ok(Credential {
        identity,
        subject: id.to_owned(),
        key: CredentialKey::digest(parsed.public_key().raw),
        issued_at: u64::try_from(parsed.validity().not_before.timestamp()).unwrap_or(0),
        expires_at: u64::try_from(parsed.validity().not_after.timestamp()).unwrap_or(0),
        grant: Grant::device(rooms),
    })
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

/// `N` bytes from the system's CSPRNG.
pub(crate) fn random_bytes<const N: usize>() -> Result<[u8; N], PkiError> {
    let mut bytes = [0u8; N];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| PkiError::Certificate("no system randomness".into()))?;
    Ok(bytes)
}

pub(crate) fn read(path: &Path) -> Result<Vec<u8>, PkiError> {
    fs::read(path).map_err(|source| PkiError::Io { path: path.to_owned(), source })
}

/// Replaces a file whole: written aside, then renamed over it, so a reader
/// never sees it half-written (enrollments running at once all rewrite the
/// CA certificate next to the devices' files).
fn write(path: &Path, contents: &[u8]) -> Result<(), PkiError> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut aside = path.as_os_str().to_owned();
    aside.push(format!(".{}.{n}.tmp", std::process::id()));
    let aside = PathBuf::from(aside);
    let io = |source| PkiError::Io { path: path.to_owned(), source };
    fs::write(&aside, contents).map_err(io)?;
    fs::rename(&aside, path).map_err(|source| {
        let _ = fs::remove_file(&aside);
        io(source)
    })
}

/// Writes a new file only the owner can read.
pub(crate) fn write_private(path: &Path, contents: &[u8]) -> Result<(), PkiError> {
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
    fn the_ca_certificate_is_never_seen_half_written_while_devices_enroll() {
        let dir = temp_dir("concurrent");
        let pki = Arc::new(Pki::open_or_init(dir.join("pki"), &[]).unwrap());
        let devices = dir.join("devices");
        pki.enroll("first", &devices, &Enrollment::default()).unwrap();
        let writers: Vec<_> = (0..4)
            .map(|w| {
                let (pki, devices) = (pki.clone(), devices.clone());
                std::thread::spawn(move || {
                    for i in 0..25 {
                        pki.enroll(&format!("d-{w}-{i}"), &devices, &Enrollment::default()).unwrap();
                    }
                })
            })
            .collect();
        let mut reads = 0;
        while !writers.iter().all(|w| w.is_finished()) {
            let ca = fs::read(devices.join("ca.pem")).unwrap();
            assert_eq!(parse_certs(&ca).map(|c| c.len()).ok(), Some(1), "ca.pem read whole");
            reads += 1;
        }
        writers.into_iter().for_each(|w| w.join().unwrap());
        assert!(reads > 0);
        let leftovers = fs::read_dir(&devices).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().ends_with(".tmp")).count();
        assert_eq!(leftovers, 0, "no file left aside");
    }

    #[test]
    fn enrolled_device_certificate_names_the_device() {
        let dir = temp_dir("enroll");
        let pki = Pki::open_or_init(dir.join("pki"), &["127.0.0.1".into()]).unwrap();
        let files = pki.enroll("bed-12.ward-3", &dir.join("devices"), &Enrollment::default()).unwrap();
        let cert = parse_certs(&fs::read(&files.cert).unwrap()).unwrap().remove(0);
        assert_eq!(device_id_of(&cert).unwrap(), "bed-12.ward-3");
        assert!(device_tls(&fs::read(&files.ca).unwrap(), &fs::read(&files.cert).unwrap(), &fs::read(&files.key).unwrap()).is_ok());
        assert!(pki.server_tls().is_ok());
        // Enrolling twice would silently replace a device's identity.
        assert!(matches!(pki.enroll("bed-12.ward-3", &dir.join("devices"), &Enrollment::default()), Err(PkiError::Exists(_))));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_certificate_carries_its_room_grants_validity_and_key() {
        let dir = temp_dir("grants");
        let pki = Pki::open_or_init(dir.join("pki"), &[]).unwrap();
        let enrollment = Enrollment {
            validity: Duration::from_secs(7 * 86_400),
            rooms: vec![RoomPattern::parse("ward-3").unwrap(), RoomPattern::parse("lab-*").unwrap()],
            not_before: 0,
        };
        let files = pki.enroll("bed-12", &dir.join("devices"), &enrollment).unwrap();
        let cert = parse_certs(&fs::read(&files.cert).unwrap()).unwrap().remove(0);
        let credential = device_credential(&cert).unwrap();
        assert_eq!(credential.identity.as_str(), "bed-12");
        assert_eq!(credential.grant.rooms, enrollment.rooms);
        assert!(credential.grant.publish && credential.grant.subscribe);
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        assert!(credential.issued_at.abs_diff(now) < 60, "issued {} now {now}", credential.issued_at);
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert).unwrap();
        let validity = parsed.validity();
        assert_eq!(validity.not_after.timestamp() - validity.not_before.timestamp(), 7 * 86_400);
        // Another enrollment of the same id has another key.
        let again = pki.enroll("bed-12", &dir.join("again"), &Enrollment { not_before: now + 5, ..Enrollment::default() }).unwrap();
        let again = device_credential(&parse_certs(&fs::read(&again.cert).unwrap()).unwrap().remove(0)).unwrap();
        assert_ne!(again.key, credential.key);
        assert_eq!(again.issued_at, now + 5, "issued after the given moment");
        let bad = Enrollment { validity: Duration::ZERO, ..Enrollment::default() };
        assert!(matches!(pki.enroll("bed-13", &dir.join("devices"), &bad), Err(PkiError::InvalidValidity)));
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
    fn bad_device_ids_are_refused() {
        let dir = temp_dir("bad");
        let pki = Pki::open_or_init(&dir, &[]).unwrap();
        for id in ["", "a b", "../etc", &"x".repeat(65)] {
            assert!(matches!(pki.enroll(id, &dir, &Enrollment::default()), Err(PkiError::InvalidDeviceId(_))), "{id:?}");
        }
        let _ = fs::remove_dir_all(&dir);
    }
}
