//! The answers to ACME challenges in progress: what the HTTP listener gives for an `http-01`
//! token, and the certificate the HTTPS listener shows a `tls-alpn-01` validation.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use rustls::sign::CertifiedKey;
use sallyport_runtime::sync::lock;

/// The ALPN protocol of a `tls-alpn-01` validation (RFC 8737).
pub(crate) const ALPN_ACME_TLS: &[u8] = b"acme-tls/1";

/// The answers to challenges in progress.
#[derive(Debug, Default)]
pub(crate) struct Challenges {
    /// `http-01`: token → key authorization.
    pub(super) http: Mutex<HashMap<String, String>>,
    /// `tls-alpn-01`: DNS name → the validation certificate.
    pub(super) tls_alpn: Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

impl Challenges {
    /// The key authorization for `token`, when an `http-01` challenge for it is in progress.
    pub(crate) fn http_answer(&self, token: &str) -> Option<String> {
        lock(&self.http).get(token).cloned()
    }

    /// The validation certificate for `name`, when a `tls-alpn-01` challenge is in progress.
    pub(crate) fn tls_alpn_certificate(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        lock(&self.tls_alpn).get(name).cloned()
    }
}
