//! A certificate the relay orders itself by ACME: `[certificates.NAME.acme]` with the names, the
//! ACME directory, the challenge it answers on its own listeners (`http-01` on the HTTP listener,
//! `tls-alpn-01` on the HTTPS listener) and the writable folder where the account and the
//! certificate are kept.

use std::path::{Path, PathBuf};

use sallyport_runtime::config::{self as conf, ConfigError};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAcme {
    names: Vec<String>,
    directory: String,
    challenge: Option<String>,
    #[serde(default)]
    contact: Vec<String>,
    /// The ACME server's own root, when it is not a public one (a test server, a homelab CA).
    ca: Option<PathBuf>,
    store: PathBuf,
}

/// The challenge the relay answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Challenge {
    /// `http-01`: `GET /.well-known/acme-challenge/TOKEN` on the HTTP listener (port 80 for the
    /// ACME server).
    Http01,
    /// `tls-alpn-01`: a handshake offering `acme-tls/1` on the HTTPS listener (port 443).
    TlsAlpn01,
}

impl Challenge {
    pub fn word(self) -> &'static str {
        match self {
            Self::Http01 => "http-01",
            Self::TlsAlpn01 => "tls-alpn-01",
        }
    }
}

/// What the relay orders, from where, and where it keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acme {
    /// DNS names, lower-case (no wildcards: those need DNS-01).
    pub names: Vec<String>,
    pub directory: String,
    pub challenge: Challenge,
    pub contact: Vec<String>,
    pub ca: Option<PathBuf>,
    /// The account (`account.json`) and the certificates (`NAME/tls.crt`, `NAME/tls.key`).
    pub store: PathBuf,
}

impl RawAcme {
    pub(crate) fn parse(
        self,
        path: &Path,
        key: &str,
        (http_listener, https_listener): (bool, bool),
    ) -> Result<Acme, ConfigError> {
        let invalid =
            |field: &str, reason: String| ConfigError::invalid(path, format!("{key}.acme.{field}"), reason);
        if self.names.is_empty() {
            return Err(invalid("names", "name at least one DNS name to order a certificate for".into()));
        }
        let mut names = Vec::new();
        for name in &self.names {
            let lower = name.trim_end_matches('.').to_ascii_lowercase();
            if lower.starts_with("*.") {
                return Err(invalid(
                    "names",
                    format!("{name:?}: a wildcard needs the DNS-01 challenge, which the relay does not answer yet"),
                ));
            }
            if sallyport_runtime::tls::server_name(&lower).is_err()
                || lower.parse::<std::net::IpAddr>().is_ok()
            {
                return Err(invalid("names", format!("{name:?} is not a DNS name")));
            }
            names.push(lower);
        }
        if !self.directory.starts_with("https://") {
            return Err(invalid(
                "directory",
                format!("{:?}: an ACME directory is an https:// URL", self.directory),
            ));
        }
        let challenge = match self.challenge.as_deref() {
            None | Some("http-01") => Challenge::Http01,
            Some("tls-alpn-01") => Challenge::TlsAlpn01,
            Some(other) => {
                return Err(invalid(
                    "challenge",
                    format!("{other:?}: the relay answers \"http-01\" (the default) or \"tls-alpn-01\""),
                ))
            }
        };
        let (needed, listener) = match challenge {
            Challenge::Http01 => (http_listener, "relay.http_listen"),
            Challenge::TlsAlpn01 => (https_listener, "relay.https_listen"),
        };
        if !needed {
            return Err(invalid(
                "challenge",
                format!("{} is answered on {listener}: set it", challenge.word()),
            ));
        }
        for contact in &self.contact {
            if !contact.starts_with("mailto:") {
                return Err(invalid("contact", format!("{contact:?}: a contact is a mailto: URI")));
            }
        }
        Ok(Acme {
            names,
            directory: self.directory,
            challenge,
            contact: self.contact,
            ca: self.ca.map(|ca| conf::resolve(path, &ca)),
            store: conf::resolve(path, &self.store),
        })
    }
}
