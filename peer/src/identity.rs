//! The DTLS certificate factory of every media peer.

use std::sync::Arc;

use str0m::config::{CryptoProvider, DtlsCert};

use crate::PeerError;

/// The crypto provider and DTLS certificate a peer's `Rtc` is built with.
///
/// Generating a certificate costs over a millisecond, so a process that runs
/// many peers (the load tester) generates one and clones it into each; a
/// device generates one per call. Cloning is cheap.
#[derive(Clone)]
pub struct DtlsIdentity {
    pub(crate) crypto: Arc<CryptoProvider>,
    pub(crate) cert: DtlsCert,
}

impl std::fmt::Debug for DtlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DtlsIdentity")
    }
}

impl DtlsIdentity {
    /// A fresh certificate from the crypto provider str0m was built with.
    pub fn generate() -> Result<Self, PeerError> {
        let crypto = Arc::new(str0m::crypto::from_feature_flags());
        let cert = crypto
            .dtls_provider
            .generate_certificate()
            .ok_or_else(|| PeerError::Certificate("the crypto provider made none".into()))?;
        Ok(DtlsIdentity { crypto, cert })
    }
}
