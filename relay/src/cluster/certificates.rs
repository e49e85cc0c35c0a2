//! The certificates the writer ordered by ACME, handed to the other replicas with each answer to
//! their reports, so every replica serves the same certificate and only the writer orders. They
//! travel on the replica port (mutual TLS with the relay's own certificate), as the revocations
//! do; another replica writes each into its own ACME store, where its certificate watch picks it
//! up within seconds.

use serde::{Deserialize, Serialize};

use crate::config::Config;

/// One certificate as written in the writer's store: the PEM chain and its PEM key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SharedCertificate {
    pub(crate) name: String,
    pub(crate) chain: String,
    pub(crate) key: String,
}

/// On the writer: its ACME certificates that are issued.
pub(crate) fn of_writer(config: &Config) -> Vec<SharedCertificate> {
    config
        .certificates
        .iter()
        .filter(|(_, (files, _))| files.acme.is_some())
        .filter_map(|(name, (files, _))| {
            Some(SharedCertificate {
                name: name.clone(),
                chain: std::fs::read_to_string(&files.cert).ok()?,
                key: std::fs::read_to_string(&files.key).ok()?,
            })
        })
        .collect()
}

/// On another replica: writes each certificate it also orders by ACME into its own store where
/// it differs from what is there; returns the names written.
pub(crate) fn take(config: &Config, shared: Vec<SharedCertificate>) -> std::io::Result<Vec<String>> {
    let mut written = Vec::new();
    for certificate in shared {
        let Some((files, _)) = config.certificates.get(&certificate.name) else { continue };
        if files.acme.is_none() {
            continue;
        }
        let same =
            |path: &std::path::Path, text: &str| std::fs::read_to_string(path).is_ok_and(|t| t == text);
        if same(&files.cert, &certificate.chain) && same(&files.key, &certificate.key) {
            continue;
        }
        sallyport_runtime::durable::replace_private(&files.key, certificate.key.as_bytes())?;
        sallyport_runtime::durable::replace_private(&files.cert, certificate.chain.as_bytes())?;
        written.push(certificate.name);
    }
    Ok(written)
}
