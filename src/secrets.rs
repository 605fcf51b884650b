//! Material created in the data dir on first start: the self-signed HTTPS
//! certificate and the admin API bearer token. Later starts reuse them.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use rand::RngExt;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Creates the data dir if needed.
pub fn ensure_data_dir(dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating data dir {}", dir.display()))
}

/// The admin token, generated on first start (there is no default secret).
pub fn admin_token(dir: &Path) -> anyhow::Result<String> {
    let path = dir.join("admin-token");
    if path.exists() {
        let token = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        return Ok(token.trim().to_owned());
    }
    let bytes: [u8; 32] = rand::rng().random();
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    write_private(&path, token.as_bytes())?;
    Ok(token)
}

/// A rustls server config from the self-signed certificate in the data dir,
/// created on first start for localhost and the given IPs.
pub fn tls_config(dir: &Path, ips: &[IpAddr]) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let tls_dir = dir.join("tls");
    let (cert_path, key_path) = (tls_dir.join("cert.pem"), tls_dir.join("key.pem"));
    if !cert_path.exists() || !key_path.exists() {
        fs::create_dir_all(&tls_dir).with_context(|| format!("creating {}", tls_dir.display()))?;
        let mut names = vec!["localhost".to_owned()];
        names.extend(ips.iter().map(IpAddr::to_string));
        let certified = rcgen::generate_simple_self_signed(names).context("generating a self-signed certificate")?;
        write_private(&key_path, certified.signing_key.serialize_pem().as_bytes())?;
        fs::write(&cert_path, certified.cert.pem()).with_context(|| format!("writing {}", cert_path.display()))?;
        tracing::info!(cert = %cert_path.display(), "created a self-signed HTTPS certificate");
    }
    let cert_pem = fs::read(&cert_path).with_context(|| format!("reading {}", cert_path.display()))?;
    let key_pem = fs::read(&key_path).with_context(|| format!("reading {}", key_path.display()))?;
    let certs = parse_certs(&cert_pem)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).context("parsing the TLS key")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("loading the TLS certificate")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn parse_certs(pem: &[u8]) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .context("parsing the TLS certificate")
}

/// Writes a file only the owner can read.
fn write_private(path: &PathBuf, contents: &[u8]) -> anyhow::Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(contents).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_and_certificate_are_created_once_and_reused() {
        let dir = std::env::temp_dir().join(format!("fleetcall-secrets-{}-{:?}", std::process::id(), std::thread::current().id()));
        let _ = fs::remove_dir_all(&dir);
        ensure_data_dir(&dir).unwrap();
        let token = admin_token(&dir).unwrap();
        assert_eq!(token.len(), 64);
        assert_eq!(admin_token(&dir).unwrap(), token);
        tls_config(&dir, &["127.0.0.1".parse().unwrap()]).unwrap();
        let cert = fs::read(dir.join("tls/cert.pem")).unwrap();
        tls_config(&dir, &[]).unwrap();
        assert_eq!(fs::read(dir.join("tls/cert.pem")).unwrap(), cert);
        let _ = fs::remove_dir_all(&dir);
    }
}
