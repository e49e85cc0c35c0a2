//! Certificates the relay holds for the HTTPS services it terminates: `[certificates.NAME]` with
//! `cert` (a PEM chain, leaf first) and `key` (its PEM private key, not readable by every user).
//! The files are read when the configuration loads (so `check` and a reload refuse a bad file
//! with its key and reason) and again whenever they change (`certs::Store`).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::sign::CertifiedKey;
use sallyport_runtime::{
    config::{self as conf, ConfigError},
    tls,
};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCertificate {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    acme: Option<super::acme::RawAcme>,
}

/// One certificate's files, by the name `[certificates.NAME]` gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certificate {
    pub name: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Ordered by the relay itself (its files are in the ACME store); `None`: files someone
    /// else writes.
    pub acme: Option<super::acme::Acme>,
}

impl Certificate {
    /// The names a terminated service may use it for: the loaded certificate's, or what the
    /// relay orders.
    pub fn covers(&self, loaded: Option<&Loaded>, host: &str) -> bool {
        match (&self.acme, loaded) {
            (Some(acme), _) => acme.names.iter().any(|n| n == host),
            (None, Some(loaded)) => covers(&loaded.names, host),
            (None, None) => false,
        }
    }
}

/// A certificate read from its files: what rustls serves, and what the status page shows.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub key: Arc<CertifiedKey>,
    /// The names it is valid for (DNS names, wildcards included, lower-case).
    pub names: Vec<String>,
    pub not_after_unix: i64,
    pub not_before_unix: i64,
    /// The issuer's distinguished name, as text.
    pub issuer: String,
    /// The SHA-256 of the certificate file and the key file: a change to either is a new load.
    pub fingerprint: [u8; 32],
}

/// Why a certificate's files cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error(
        "{} is readable by every user (mode {mode:04o}): make it 0600 or 0640 (in Kubernetes, the \
         Secret volume's defaultMode: 0440)",
        path.display()
    )]
    KeyReadableByAll { path: PathBuf, mode: u32 },
    #[error("{0}")]
    Pem(#[from] tls::TlsError),
    #[error("{}: {source}", path.display())]
    Certificate { path: PathBuf, source: tls::CertError },
    #[error("{}: not a usable private key: {source}", path.display())]
    UnusableKey { path: PathBuf, source: rustls::Error },
    #[error("{} is not the key of the certificate in {}", key.display(), cert.display())]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    #[error("{}: the certificate names no DNS name", path.display())]
    NoDnsName { path: PathBuf },
}

/// Reads a file for a certificate.
fn read(path: &Path) -> Result<Vec<u8>, CertificateError> {
    std::fs::read(path).map_err(|source| CertificateError::Read { path: path.to_owned(), source })
}

impl Certificate {
    /// The SHA-256 of both files as they are now (without parsing them).
    pub fn fingerprint(&self) -> Result<[u8; 32], CertificateError> {
        let mut both = read(&self.cert)?;
        both.extend(read(&self.key)?);
        Ok(tls::cert_sha256(&both))
    }

    /// Reads and checks both files: the key private, the chain parsed, the key the leaf's.
    pub fn load(&self) -> Result<Loaded, CertificateError> {
        key_is_private(&self.key)?;
        let (cert_pem, key_pem) = (read(&self.cert)?, read(&self.key)?);
        let identity = tls::Identity::from_pem(&cert_pem, &key_pem)?;
        // `from_pem` refuses a chain without a certificate.
        let leaf = &identity.chain[0];
        let info = tls::inspect(leaf)
            .map_err(|source| CertificateError::Certificate { path: self.cert.clone(), source })?;
        let issuer = info.issuer.clone();
        let signer = tls::provider()
            .key_provider
            .load_private_key(identity.key)
            .map_err(|source| CertificateError::UnusableKey { path: self.key.clone(), source })?;
        let key = CertifiedKey::new(identity.chain, signer);
        key.keys_match()
            .map_err(|_| CertificateError::KeyMismatch { key: self.key.clone(), cert: self.cert.clone() })?;
        let names: Vec<String> = info
            .sans
            .iter()
            .filter(|n| n.parse::<std::net::IpAddr>().is_err())
            .map(|n| n.to_ascii_lowercase())
            .collect();
        if names.is_empty() {
            return Err(CertificateError::NoDnsName { path: self.cert.clone() });
        }
        let fingerprint = {
            let mut both = cert_pem;
            both.extend_from_slice(&key_pem);
            tls::cert_sha256(&both)
        };
        Ok(Loaded {
            key: Arc::new(key),
            names,
            not_after_unix: info.not_after_unix,
            not_before_unix: info.not_before_unix,
            issuer,
            fingerprint,
        })
    }
}

/// A key file every user of the host may read is refused: in Kubernetes, the Secret's volume
/// needs `defaultMode: 0440` (or 0400), not the default 0644.
fn key_is_private(path: &Path) -> Result<(), CertificateError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path)
            .map_err(|source| CertificateError::Read { path: path.to_owned(), source })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o004 != 0 {
            return Err(CertificateError::KeyReadableByAll { path: path.to_owned(), mode });
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// What a terminated HTTPS service adds to its HTTP handling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Terminate {
    /// Plain HTTP requests for its names on the HTTP listener get a redirect to HTTPS.
    pub redirect_http: bool,
    /// `Strict-Transport-Security: max-age=...` on its responses.
    pub hsts: Option<std::time::Duration>,
}

/// Whether a certificate valid for `names` (wildcards `*.example` for one label) covers `host`.
pub fn covers(names: &[String], host: &str) -> bool {
    names.iter().any(|name| match name.strip_prefix("*.") {
        Some(parent) => host.split_once('.').is_some_and(|(label, rest)| !label.is_empty() && rest == parent),
        None => name == host,
    })
}

/// Reads `[certificates]`: each table's files are loaded now, so a bad file stops the load.
pub(crate) fn from_raw(
    path: &Path,
    raw: BTreeMap<String, RawCertificate>,
    listeners: (bool, bool),
) -> Result<BTreeMap<String, (Certificate, Option<Loaded>)>, ConfigError> {
    let mut out = BTreeMap::new();
    for (name, raw) in raw {
        let key = format!("certificates.{name}");
        let name = conf::name(path, &key, &name)?;
        let (certificate, loaded) = match (raw.cert, raw.key, raw.acme) {
            // Relative paths are read from relay.toml's folder.
            (Some(cert), Some(key_file), None) => {
                let certificate = Certificate {
                    name: name.clone(),
                    cert: conf::resolve(path, &cert),
                    key: conf::resolve(path, &key_file),
                    acme: None,
                };
                let loaded =
                    certificate.load().map_err(|e| ConfigError::invalid(path, &key, e.to_string()))?;
                (certificate, Some(loaded))
            }
            (None, None, Some(acme)) => {
                let acme = acme.parse(path, &key, listeners)?;
                let folder = acme.store.join(&name);
                let certificate = Certificate {
                    name: name.clone(),
                    cert: folder.join("tls.crt"),
                    key: folder.join("tls.key"),
                    acme: Some(acme),
                };
                // Not ordered yet, or kept from an earlier run: what is there and good is served
                // until the order is due.
                let loaded = certificate.load().ok();
                (certificate, loaded)
            }
            _ => {
                return Err(ConfigError::invalid(
                    path,
                    key,
                    "set `cert` and `key` (files someone else writes), or an `acme` table (the relay \
                     orders it)",
                ))
            }
        };
        out.insert(name, (certificate, loaded));
    }
    Ok(out)
}

/// A service's `tls`, `redirect_http` and `hsts` keys: `Some` for an HTTPS service the relay
/// terminates, whose every name a certificate covers.
pub(crate) fn terminate(
    path: &Path,
    key: &str,
    (names, has_http_listener): (Option<&[String]>, bool),
    (tls, redirect_http, hsts): (Option<&str>, Option<bool>, Option<std::time::Duration>),
    certificates: &BTreeMap<String, (Certificate, Option<Loaded>)>,
) -> Result<Option<Terminate>, ConfigError> {
    let terminated = match (tls, names) {
        (None, _) => false,
        (Some(_), None) => {
            return Err(ConfigError::invalid(
                path,
                format!("{key}.tls"),
                "only an HTTPS service (sni) has a TLS mode",
            ))
        }
        (Some("passthrough"), Some(_)) => false,
        (Some("terminate"), Some(_)) => true,
        (Some(other), Some(_)) => {
            return Err(ConfigError::invalid(
                path,
                format!("{key}.tls"),
                format!("{other:?} is not a TLS mode: \"passthrough\" (the default) or \"terminate\""),
            ))
        }
    };
    if !terminated {
        let set = [("redirect_http", redirect_http.is_some()), ("hsts", hsts.is_some())];
        if let Some((what, _)) = set.into_iter().find(|(_, set)| *set) {
            return Err(ConfigError::invalid(
                path,
                format!("{key}.{what}"),
                "only a service whose TLS the relay terminates (tls = \"terminate\") has this",
            ));
        }
        return Ok(None);
    }
    let redirect_http = redirect_http.unwrap_or(false);
    if redirect_http && !has_http_listener {
        return Err(ConfigError::invalid(
            path,
            format!("{key}.redirect_http"),
            "redirecting plain HTTP needs the HTTP listener: set relay.http_listen",
        ));
    }
    let hsts = hsts
        .map(|d| {
            conf::within(
                path,
                &format!("{key}.hsts"),
                d,
                std::time::Duration::from_secs(1)..=std::time::Duration::from_secs(2 * 365 * 86_400),
            )
        })
        .transpose()?;
    for name in names.into_iter().flatten() {
        if !certificates.values().any(|(certificate, loaded)| certificate.covers(loaded.as_ref(), name)) {
            return Err(ConfigError::invalid(
                path,
                format!("{key}.sni"),
                format!(
                    "no [certificates] table holds a certificate for {name:?}: add one whose certificate \
                     names it, or a wildcard over it"
                ),
            ));
        }
    }
    Ok(Some(Terminate { redirect_http, hsts }))
}

#[cfg(test)]
mod tests {
    use super::covers;

    #[test]
    fn wildcards_cover_one_label() {
        let names = vec!["*.home.lan".to_owned(), "home.lan".to_owned()];
        assert!(covers(&names, "grafana.home.lan"));
        assert!(covers(&names, "home.lan"));
        assert!(!covers(&names, "a.b.home.lan"));
        assert!(!covers(&names, "xhome.lan"));
        assert!(!covers(&["app.home.lan".to_owned()], "other.home.lan"));
    }
}
