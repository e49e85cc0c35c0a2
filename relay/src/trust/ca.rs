//! The CA that signs: the state directory's files, loading the CA, and issuing relay and agent
//! certificates with it.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use time::OffsetDateTime;

use rustls::pki_types::CertificateDer;
use sallyport_runtime::tls;

/// File names inside a relay's state directory.
pub const CA_CERT: &str = "ca.crt";
/// The key the relays sign with: the intermediate's, whose certificate `relay.crt` carries.
pub const CA_KEY: &str = "ca.key";
/// The root's key: `init` writes it for the operator to move offline; only `ca rotate` uses it.
pub const ROOT_KEY: &str = "root.key";
pub const RELAY_CERT: &str = "relay.crt";
pub const RELAY_KEY: &str = "relay.key";

/// File names inside an agent bundle.
pub const AGENT_CERT: &str = "agent.crt";
pub const AGENT_KEY: &str = "agent.key";

/// Lifetime of the CA certificate.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Lifetime of the relay's server certificate.
pub const RELAY_VALIDITY: Duration = Duration::from_secs(2 * 365 * 24 * 3600);
/// Default lifetime of an agent certificate.
pub const AGENT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

/// Why a PKI operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{} already exists: refusing to overwrite a CA (remove the directory's files to start over)", .0.display())]
    Exists(PathBuf),
    #[error("invalid name {0:?}: use 1-63 of a-z, 0-9 and '-', not at either end")]
    Name(String),
    #[error("invalid subject alternative name {0:?}: give an IP address or a DNS name")]
    San(String),
    #[error("at least one --san (the address or DNS name agents use to reach the relay) is required")]
    NoSan,
    #[error("{0}")]
    Cert(String),
    #[error("the CA key belongs neither to the CA certificate nor to an intermediate in the relay's certificate file")]
    KeyNotInChain,
    #[error("only the root CA issues intermediates")]
    NotRoot,
    #[error("{}: the root CA's key is needed (give it with --root-key)", .0.display())]
    NoRootKey(PathBuf),
    #[error("{}: this key is not the root CA's (the key of ca.crt)", .0.display())]
    NotRootKey(PathBuf),
}

/// A PEM certificate with its PEM private key.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued").field("key_pem", &"<redacted>").finish_non_exhaustive()
    }
}

/// Reads a PEM file, naming it in the error.
pub(super) fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io { path: path.to_owned(), source })
}

/// Lifetime of the intermediate the relays sign with (it is rotated before then, with the root's key).
pub const INTERMEDIATE_VALIDITY: Duration = Duration::from_secs(5 * 365 * 24 * 3600);

/// When the root certificate `root_pem` ends.
fn root_not_after(root_pem: &str) -> Result<OffsetDateTime, PkiError> {
    let certs = tls::certs_from_pem(root_pem.as_bytes(), "CA certificate")
        .map_err(|e| PkiError::Cert(e.to_string()))?;
    let cert = certs.first().ok_or_else(|| PkiError::Cert("no certificate".into()))?;
    let info = tls::inspect(cert).map_err(|e| PkiError::Cert(e.to_string()))?;
    OffsetDateTime::from_unix_timestamp(info.not_after_unix).map_err(|e| PkiError::Cert(e.to_string()))
}

/// The certificates of a PEM text, each as its own PEM block with its DER.
fn pem_blocks(pem: &str) -> Result<Vec<(String, CertificateDer<'static>)>, PkiError> {
    const END: &str = "-----END CERTIFICATE-----";
    let mut blocks = Vec::new();
    let mut rest = pem;
    while let Some(start) = rest.find("-----BEGIN CERTIFICATE-----") {
        let Some(len) = rest[start..].find(END) else { break };
        let block = format!("{}\n", &rest[start..start + len + END.len()]);
        let der = tls::certs_from_pem(block.as_bytes(), "certificate")
            .map_err(|e| PkiError::Cert(e.to_string()))?
            .into_iter()
            .next()
            .ok_or_else(|| PkiError::Cert("an empty certificate block".into()))?;
        blocks.push((block, der));
        rest = &rest[start + len + END.len()..];
    }
    Ok(blocks)
}

/// A certificate authority that can sign: the root itself, or (as `init` makes it) an
/// intermediate below the root, so the root's key can stay offline.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The issuing certificate (PEM).
    cert_pem: String,
    /// The root everyone checks certificates against (PEM): `cert_pem` for a root.
    root_pem: String,
    /// The issuing certificate is an intermediate: every certificate issued carries it along.
    intermediate: bool,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").field("intermediate", &self.intermediate).finish_non_exhaustive()
    }
}

impl Ca {
    /// Creates a new root CA with a fresh ECDSA P-256 key; it may sign one level of intermediates.
    pub fn generate(common_name: &str) -> Result<(Self, String), PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.distinguished_name.push(DnType::OrganizationName, "Sallyport");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        set_validity(&mut params, CA_VALIDITY, clock_slack(CA_VALIDITY))?;
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        let cert_pem = cert.pem();
        let ca = Self {
            issuer: Issuer::new(params, key),
            root_pem: cert_pem.clone(),
            cert_pem,
            intermediate: false,
        };
        Ok((ca, key_pem))
    }

    /// Issues an intermediate CA below this root (valid for [`INTERMEDIATE_VALIDITY`], never past
    /// the root), with a fresh key.
    pub fn issue_intermediate(&self) -> Result<(Self, String), PkiError> {
        if self.intermediate {
            return Err(PkiError::NotRoot);
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, "Sallyport relay CA");
        params.distinguished_name.push(DnType::OrganizationName, "Sallyport");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, INTERMEDIATE_VALIDITY, clock_slack(INTERMEDIATE_VALIDITY))?;
        let root_end = root_not_after(&self.root_pem)?;
        if params.not_after > root_end {
            params.not_after = root_end;
        }
        let cert = params.signed_by(&key, &self.issuer)?;
        let key_pem = key.serialize_pem();
        let ca = Self {
            issuer: Issuer::new(params, key),
            cert_pem: cert.pem(),
            root_pem: self.root_pem.clone(),
            intermediate: true,
        };
        Ok((ca, key_pem))
    }

    /// Loads the CA whose key is `key_pem`: the root `root_pem` itself, or the intermediate among
    /// the certificates of `chain_pem` (a relay's certificate file) that the key belongs to. An
    /// intermediate must be signed by the root.
    pub fn from_parts(key_pem: &str, root_pem: &str, chain_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let roots = tls::certs_from_pem(root_pem.as_bytes(), "CA certificate")
            .map_err(|e| PkiError::Cert(e.to_string()))?;
        let [root] = roots.as_slice() else {
            return Err(PkiError::Cert("the CA file must hold exactly one certificate".into()));
        };
        let owns = |cert: &CertificateDer<'_>| tls::public_key(cert).is_ok_and(|k| k == key.public_key_raw());
        if owns(root) {
            let issuer = Issuer::from_ca_cert_der(root, key)?;
            return Ok(Self {
                issuer,
                cert_pem: root_pem.to_owned(),
                root_pem: root_pem.to_owned(),
                intermediate: false,
            });
        }
        let Some((cert_pem, cert)) = pem_blocks(chain_pem)?.into_iter().find(|(_, c)| owns(c)) else {
            return Err(PkiError::KeyNotInChain);
        };
        tls::verify_issued_by(&cert, root)
            .map_err(|_| PkiError::Cert("the intermediate is not signed by the CA".into()))?;
        let issuer = Issuer::from_ca_cert_der(&cert, key)?;
        Ok(Self { issuer, cert_pem, root_pem: root_pem.to_owned(), intermediate: true })
    }

    /// Loads the CA of a relay state directory: `ca.key` with `ca.crt` (the root) and the
    /// intermediate that `relay.crt` carries after the relay's own certificate.
    pub fn load(dir: &Path) -> Result<Self, PkiError> {
        Self::from_parts(&read(&dir.join(CA_KEY))?, &read(&dir.join(CA_CERT))?, &read(&dir.join(RELAY_CERT))?)
    }

    /// The root certificate (PEM) agents and relays check against.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// Whether this CA is the root itself (its key signs `ca.crt`), not an intermediate.
    pub fn is_root(&self) -> bool {
        !self.intermediate
    }

    /// The issuing certificate (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A certificate this CA signed, as the PEM its holder presents: with the intermediate after it.
    fn chained(&self, leaf_pem: String) -> String {
        if self.intermediate {
            leaf_pem + &self.cert_pem
        } else {
            leaf_pem
        }
    }

    /// Issues the relay's server certificate for the given IP addresses and DNS names.
    pub fn issue_relay(&self, sans: &[String]) -> Result<Issued, PkiError> {
        if sans.is_empty() {
            return Err(PkiError::NoSan);
        }
        for san in sans {
            if san.parse::<std::net::IpAddr>().is_err()
                && rustls::pki_types::DnsName::try_from(san.as_str()).is_err()
            {
                return Err(PkiError::San(san.clone()));
            }
        }
        let mut params = CertificateParams::new(sans.to_vec())?;
        params.distinguished_name.push(DnType::CommonName, "sallyport relay");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params, RELAY_VALIDITY, clock_slack(RELAY_VALIDITY))
    }

    /// Issues a client certificate for agent `name` (the name goes into the SAN and the CN).
    pub fn issue_agent(&self, name: &str, validity: Duration) -> Result<Issued, PkiError> {
        if !sallyport_proto::is_valid_name(name) {
            return Err(PkiError::Name(name.to_owned()));
        }
        let mut params = CertificateParams::new(vec![name.to_owned()])?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params, validity, OFFLINE_AGENT_SLACK)
    }

    /// Issues a client certificate for agent `name` to the public key of `csr_pem` (the agent's
    /// own key, which never leaves it). Only the key is taken from the request: the name, usages
    /// and validity are the relay's.
    pub fn issue_agent_for_csr(
        &self,
        name: &str,
        csr_pem: &str,
        validity: Duration,
    ) -> Result<String, PkiError> {
        if !sallyport_proto::is_valid_name(name) {
            return Err(PkiError::Name(name.to_owned()));
        }
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)?;
        let mut params = CertificateParams::new(vec![name.to_owned()])?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        // Checked on the relay's own clock: valid from the second of issue, which `agent revoke`
        // compares against.
        set_validity(&mut params, validity, Duration::ZERO)?;
        Ok(self.chained(params.signed_by(&csr.public_key, &self.issuer)?.pem()))
    }

    fn sign(
        &self,
        mut params: CertificateParams,
        validity: Duration,
        slack: Duration,
    ) -> Result<Issued, PkiError> {
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, validity, slack)?;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued { cert_pem: self.chained(cert.pem()), key_pem: key.serialize_pem() })
    }
}

/// How far back a certificate checked on other machines' clocks (the CA's, the relay's) is valid:
/// an hour, or a quarter of a short lifetime.
fn clock_slack(validity: Duration) -> Duration {
    (validity / 4).min(Duration::from_secs(3600))
}

/// How far back an agent certificate from `agent add` is valid: it may be made on another machine
/// whose clock runs a little ahead of the relay's. `agent revoke` refuses such a certificate made
/// up to this long after the revocation, too.
const OFFLINE_AGENT_SLACK: Duration = Duration::from_secs(300);

/// Valid from `slack` before now for `validity`, with a random serial.
fn set_validity(params: &mut CertificateParams, validity: Duration, slack: Duration) -> Result<(), PkiError> {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::try_from(slack).unwrap_or(time::Duration::hours(1));
    params.not_after = now + time::Duration::try_from(validity).unwrap_or(time::Duration::days(365));
    let mut serial = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut serial)
        .map_err(|_| rcgen::Error::RingUnspecified)?;
    serial[0] &= 0x7f;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    Ok(())
}
