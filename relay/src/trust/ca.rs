//! The CA that signs: loading it, and issuing relay and agent certificates with it.

use std::{path::Path, time::Duration};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use time::OffsetDateTime;

use super::pki::{read, Issued, PkiError, CA_CERT, CA_KEY, CA_VALIDITY, RELAY_VALIDITY};

/// A certificate authority that can sign.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

impl Ca {
    /// Creates a new CA with a fresh ECDSA P-256 key.
    pub fn generate(common_name: &str) -> Result<(Self, String), PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.distinguished_name.push(DnType::OrganizationName, "Sallyport");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        set_validity(&mut params, CA_VALIDITY, clock_slack(CA_VALIDITY))?;
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        let cert_pem = cert.pem();
        Ok((Self { issuer: Issuer::new(params, key), cert_pem }, key_pem))
    }

    /// Loads a CA from its PEM certificate and key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(Self { issuer, cert_pem: cert_pem.to_owned() })
    }

    /// Loads the CA of a relay state directory.
    pub fn load(dir: &Path) -> Result<Self, PkiError> {
        Self::from_pem(&read(&dir.join(CA_CERT))?, &read(&dir.join(CA_KEY))?)
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
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
        Ok(params.signed_by(&csr.public_key, &self.issuer)?.pem())
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
        Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
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
