//! The private CA: creating it with the relay's certificate (`init`), issuing agent certificates
//! (`agent add`), and writing key files readable by their owner only.

use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use sallyport_runtime::durable;

pub(super) use super::ca::read;
pub use super::ca::{
    Ca, Issued, PkiError, AGENT_CERT, AGENT_KEY, AGENT_VALIDITY, CA_CERT, CA_KEY, CA_VALIDITY, RELAY_CERT,
    RELAY_KEY, RELAY_VALIDITY, ROOT_KEY,
};

/// What `init` wrote.
#[derive(Debug)]
pub struct InitReport {
    pub ca_cert: PathBuf,
    /// The root's key, for the operator to move offline.
    pub root_key: PathBuf,
    pub relay_cert: PathBuf,
    pub config: Option<PathBuf>,
}

/// Creates the root CA, the intermediate the relays sign with and the relay's certificate in
/// `dir`, and a starter `relay.toml` unless one exists.
pub fn init(dir: &Path, sans: &[String]) -> Result<InitReport, PkiError> {
    fs::create_dir_all(dir).map_err(|source| PkiError::Io { path: dir.to_owned(), source })?;
    for name in [CA_CERT, ROOT_KEY, CA_KEY, RELAY_CERT, RELAY_KEY] {
        let path = dir.join(name);
        if path.exists() {
            return Err(PkiError::Exists(path));
        }
    }
    let (root, root_key) = Ca::generate("Sallyport CA")?;
    let (ca, ca_key) = root.issue_intermediate()?;
    let relay = ca.issue_relay(sans)?;
    write_private(&dir.join(ROOT_KEY), &root_key)?;
    write_private(&dir.join(CA_KEY), &ca_key)?;
    write_public(&dir.join(CA_CERT), ca.root_pem())?;
    write_private(&dir.join(RELAY_KEY), &relay.key_pem)?;
    write_public(&dir.join(RELAY_CERT), &relay.cert_pem)?;
    let config_path = dir.join("relay.toml");
    let config = if config_path.exists() {
        None
    } else {
        write_public(&config_path, STARTER_CONFIG)?;
        Some(config_path)
    };
    Ok(InitReport {
        ca_cert: dir.join(CA_CERT),
        root_key: dir.join(ROOT_KEY),
        relay_cert: dir.join(RELAY_CERT),
        config,
    })
}

/// A starter `relay.toml`; its service is an example to edit.
pub const STARTER_CONFIG: &str = r#"# Sallyport relay configuration. Paths are relative to this file.
[relay]
# QUIC (UDP) address agents connect to. In Kubernetes the Service maps 443 to it.
listen = "0.0.0.0:4433"
# Admin HTTP: /livez, /readyz. Keep it on loopback or behind the pod network.
admin = "127.0.0.1:9090"
ca_cert = "ca.crt"
cert = "relay.crt"
key = "relay.key"
drain_grace = "20s"

# One table per service: which agent carries it, and where the relay listens for its clients.
# Issue the agent's certificate with: sallyport-relay agent add winbox --dir . --out winbox-bundle
[services.example]
agent = "winbox"
listen = "0.0.0.0:8080"
"#;

/// What `agent add` wrote.
#[derive(Debug)]
pub struct BundleReport {
    pub dir: PathBuf,
    pub config: PathBuf,
}

/// Issues a certificate for agent `name` and writes a bundle (CA, certificate, key, starter
/// `agent.toml` pointing at `relay_addr`) to `out`.
pub fn add_agent(
    state_dir: &Path,
    name: &str,
    out: &Path,
    relay_addr: &str,
    validity: Duration,
) -> Result<BundleReport, PkiError> {
    let ca = Ca::load(state_dir)?;
    let issued = ca.issue_agent(name, validity)?;
    fs::create_dir_all(out).map_err(|source| PkiError::Io { path: out.to_owned(), source })?;
    write_public(&out.join(CA_CERT), ca.root_pem())?;
    write_public(&out.join(AGENT_CERT), &issued.cert_pem)?;
    write_private(&out.join(AGENT_KEY), &issued.key_pem)?;
    let config = out.join("agent.toml");
    write_public(&config, &starter_agent_config(relay_addr))?;
    Ok(BundleReport { dir: out.to_owned(), config })
}

/// A starter `agent.toml` for a fresh bundle.
pub fn starter_agent_config(relay_addr: &str) -> String {
    format!(
        r#"# Sallyport agent configuration. Paths are relative to this file.
[agent]
# The relay's QUIC address (its LoadBalancer IP or DNS name, as in its certificate).
relays = ["{relay_addr}"]
ca_cert = "ca.crt"
cert = "agent.crt"
key = "agent.key"

# One table per service: what the name means on this machine. The agent dials nothing else.
[services.example]
target = "tcp://127.0.0.1:8080"
"#
    )
}

/// Writes a file readable by its owner only (mode 0600 on Unix).
pub fn write_private(path: &Path, contents: &str) -> Result<(), PkiError> {
    write_private_io(path, contents).map_err(|source| PkiError::Io { path: path.to_owned(), source })
}

/// [`write_private`] for callers that name the file in their own error.
pub(crate) fn write_private_io(path: &Path, contents: &str) -> std::io::Result<()> {
    durable::write_file(path, contents.as_bytes(), durable::Access::Private, None)
}

pub(super) fn write_public(path: &Path, contents: &str) -> Result<(), PkiError> {
    fs::write(path, contents).map_err(|source| PkiError::Io { path: path.to_owned(), source })
}

/// The SHA-256 of the public key a certificate request asks for.
pub fn csr_key_sha256(csr_pem: &str) -> Result<[u8; 32], PkiError> {
    let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)?;
    Ok(sallyport_runtime::tls::cert_sha256(rcgen::PublicKeyData::der_bytes(&csr.public_key)))
}

/// Logs a certificate the relay issued, with its serial and end of validity.
pub(crate) fn log_issued(agent: &str, cert_pem: &str, why: &'static str) {
    let info = sallyport_runtime::tls::certs_from_pem(cert_pem.as_bytes(), "issued certificate")
        .ok()
        .and_then(|certs| certs.first().and_then(|c| sallyport_runtime::tls::inspect(c).ok()));
    match info {
        Some(info) => {
            tracing::info!(agent, serial = %info.serial, not_after_unix = info.not_after_unix, why, "agent certificate issued")
        }
        None => tracing::info!(agent, why, "agent certificate issued"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sallyport_runtime::tls;

    fn der(pem: &str) -> Vec<u8> {
        tls::certs_from_pem(pem.as_bytes(), "test").expect("pem")[0].to_vec()
    }

    #[test]
    fn agent_certificates_carry_the_name_and_chain_to_the_ca() {
        let (ca, _) = Ca::generate("test CA").expect("ca");
        let agent = ca.issue_agent("winbox", AGENT_VALIDITY).expect("agent");
        let info = tls::inspect(&der(&agent.cert_pem)).expect("inspect");
        assert_eq!(info.dns_name.as_deref(), Some("winbox"));
        tls::verify_issued_by(&der(&agent.cert_pem), &der(ca.cert_pem())).expect("signed by ca");
        let (other, _) = Ca::generate("other CA").expect("ca");
        assert!(tls::verify_issued_by(&der(&agent.cert_pem), &der(other.cert_pem())).is_err());
        assert!(ca.issue_agent("Not A Name", AGENT_VALIDITY).is_err());
    }

    #[test]
    fn loaded_tls_material_never_prints_its_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        init(dir.path(), &["127.0.0.1".to_owned()]).expect("init");
        let files = tls::TlsFiles {
            ca_cert: dir.path().join(CA_CERT),
            cert: dir.path().join(RELAY_CERT),
            key: dir.path().join(RELAY_KEY),
        };
        let loaded = files.load().expect("load");
        let shown = format!("{loaded:?}");
        assert!(!shown.contains("PRIVATE KEY") && shown.contains("<redacted>"), "{shown}");
    }

    #[test]
    fn init_writes_owner_only_keys_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let report = init(dir.path(), &["127.0.0.1".into(), "relay.lan".into()]).expect("init");
        assert!(report.config.is_some());
        let relay = tls::inspect(&der(&read(&dir.path().join(RELAY_CERT)).expect("read"))).expect("inspect");
        assert_eq!(relay.sans, vec!["127.0.0.1".to_owned(), "relay.lan".to_owned()]);
        #[cfg(unix)]
        for key in [CA_KEY, RELAY_KEY] {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.path().join(key)).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
        assert!(matches!(init(dir.path(), &["127.0.0.1".into()]), Err(PkiError::Exists(_))));
        assert!(matches!(init(&dir.path().join("x"), &[]), Err(PkiError::NoSan)));
        assert!(matches!(init(&dir.path().join("y"), &["bad name!".into()]), Err(PkiError::San(_))));
    }
}
