//! Who the relay trusts: its private CA and certificates, enrollment with join tokens, revoked
//! certificates, and the state files that keep tokens and revocations across restarts.

pub(crate) mod enroll;
pub mod pki;
pub(crate) mod revocations;
pub(crate) mod state_file;

use std::path::{Path, PathBuf};

use crate::config::Config;

pub use state_file::StateError;

/// Enrollment (when on) and revocations: what the tunnel plane checks agents against and the
/// admin API changes.
#[derive(Debug)]
pub(crate) struct Trust {
    /// Join tokens and the CA that signs enrolling agents' keys; `None`: enrollment is off.
    pub(crate) enrollment: Option<enroll::Enrollment>,
    pub(crate) revocations: revocations::Revocations,
}

/// Why the relay's trust state could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// `relay.ca_key` is set but no admin token is, and tokens are made through the admin API.
    #[error(
        "relay.ca_key turns enrollment on, which needs relay.admin_token_file (tokens are made through the admin API)"
    )]
    EnrollmentNeedsAdminToken,
    /// The CA certificate or key file cannot be read.
    #[error("{}: cannot read: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    /// The CA key does not load, or does not belong to the CA certificate.
    #[error("{}: {source}", path.display())]
    CaKey { path: PathBuf, source: pki::PkiError },
    /// The tokens or revocations file cannot be used.
    #[error(transparent)]
    State(#[from] StateError),
}

impl Trust {
    /// Loads revocations, and with `relay.ca_key` set the CA and its tokens (which need the admin
    /// token, since tokens are made through the admin API).
    pub(crate) fn load(config: &Config, has_admin_token: bool) -> Result<Self, TrustError> {
        let enrollment = match &config.ca_key {
            None => None,
            Some(key_path) => Some(Self::enrollment(config, key_path, has_admin_token)?),
        };
        let revocations = revocations::Revocations::open(config.revocations_file.clone())?;
        Ok(Self { enrollment, revocations })
    }

    fn enrollment(
        config: &Config,
        key_path: &Path,
        has_admin_token: bool,
    ) -> Result<enroll::Enrollment, TrustError> {
        if !has_admin_token {
            return Err(TrustError::EnrollmentNeedsAdminToken);
        }
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| TrustError::Read { path: path.to_owned(), source })
        };
        let ca = pki::Ca::from_pem(&read(&config.tls.ca_cert)?, &read(key_path)?)
            .map_err(|source| TrustError::CaKey { path: key_path.to_owned(), source })?;
        let tokens = enroll::TokenStore::open(config.tokens_file.clone())?;
        Ok(enroll::Enrollment { ca, tokens, validity: config.agent_cert_validity })
    }
}

/// Compares secrets in time independent of where they differ (lengths are not secret here).
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_equal_only_when_equal() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
