//! Who the relay trusts: its private CA and certificates, enrollment with join tokens, revoked
//! certificates, and the state files that keep tokens and revocations across restarts.

mod ca;
pub(crate) mod enroll;
pub mod pki;
pub(crate) mod revocations;
pub mod rotate;
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
    /// `relay.ca_key` is the root's own key: the relay signs only with an intermediate.
    #[error(
        "{}: key `relay.ca_key`: {} is the root CA's key (the key of relay.ca_cert); the relay signs with \
         an intermediate so the root's key stays offline: run `sallyport-relay ca rotate --dir <the \
         state directory>` once, which moves the root's key to root.key and gives the relay an \
         intermediate (docs/trust.md)",
        config.display(),
        path.display()
    )]
    RootKeyOnline { path: PathBuf, config: PathBuf },
    /// The tokens or revocations file cannot be used.
    #[error(transparent)]
    State(#[from] StateError),
    /// Enrollment is on, and used join tokens would be forgotten on a restart.
    #[error(
        "{}: key `relay.tokens_file`: relay.ca_key turns enrollment on, which needs a tokens file on \
         storage that survives restarts (a used join token must stay used)",
        path.display()
    )]
    TokensNotKept { path: PathBuf },
    /// Operators can revoke agents, and revocations would be forgotten on a restart.
    #[error(
        "{}: key `relay.revocations_file`: {reason}, which needs a revocations file on storage that \
         survives restarts (a revoked agent must stay revoked)",
        path.display()
    )]
    RevocationsNotKept { path: PathBuf, reason: &'static str },
}

impl Trust {
    /// Loads revocations, and with `relay.ca_key` set the CA and its tokens (which need the admin
    /// token, since tokens are made through the admin API).
    pub(crate) fn load(config: &Config, has_admin_token: bool) -> Result<Self, TrustError> {
        check_durable(config, has_admin_token)?;
        let enrollment = match &config.relay.ca_key {
            None => None,
            Some(key_path) => Some(Self::enrollment(config, key_path, has_admin_token)?),
        };
        let revocations = revocations::Revocations::open(config.relay.revocations_file.clone())?;
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
        let ca =
            pki::Ca::from_parts(&read(key_path)?, &read(&config.relay.ca_cert)?, &read(&config.relay.cert)?)
                .map_err(|source| TrustError::CaKey { path: key_path.to_owned(), source })?;
        if ca.is_root() {
            return Err(TrustError::RootKeyOnline { path: key_path.to_owned(), config: config.path.clone() });
        }
        let tokens = enroll::TokenStore::open(config.relay.tokens_file.clone())?;
        Ok(enroll::Enrollment { ca, tokens, validity: config.relay.agent_cert_validity })
    }
}

/// Fails when revocation or enrollment is on and its state would not survive a restart: a
/// restart must not let a revoked agent back in or a used token be redeemed again.
pub fn check_durable(config: &Config, has_admin_token: bool) -> Result<(), TrustError> {
    let path = || config.path.clone();
    if config.relay.revocations_file.is_none() {
        let reason = if config.relay.ca_key.is_some() {
            Some("relay.ca_key turns enrollment and revocation on")
        } else if has_admin_token {
            Some("relay.admin_token_file lets operators revoke agents")
        } else {
            None
        };
        if let Some(reason) = reason {
            return Err(TrustError::RevocationsNotKept { path: path(), reason });
        }
    }
    if config.relay.ca_key.is_some() && config.relay.tokens_file.is_none() {
        return Err(TrustError::TokensNotKept { path: path() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        let text = format!(
            "[relay]\nca_cert = \"ca.crt\"\ncert = \"relay.crt\"\nkey = \"relay.key\"\n{extra}\n\
             [services.web]\nagent = \"winbox\"\nlisten = \"127.0.0.1:0\"\n"
        );
        Config::from_toml(&text, Path::new("/etc/sallyport/relay.toml")).expect("valid config")
    }

    #[test]
    fn revocation_and_enrollment_need_state_that_survives_a_restart() {
        assert!(check_durable(&config(""), false).is_ok(), "nothing to keep");
        let e = check_durable(&config("admin_token_file = \"admin.token\""), true).expect_err("revocations");
        assert!(
            e.to_string().starts_with(
                "/etc/sallyport/relay.toml: key `relay.revocations_file`: relay.admin_token_file"
            ),
            "{e}"
        );
        let e = check_durable(&config("ca_key = \"ca.key\"\nrevocations_file = \"r.toml\""), true)
            .expect_err("tokens");
        assert!(e.to_string().contains("key `relay.tokens_file`"), "{e}");
        let kept = config("ca_key = \"ca.key\"\nrevocations_file = \"r.toml\"\ntokens_file = \"t.toml\"");
        assert!(check_durable(&kept, true).is_ok());
    }
}
