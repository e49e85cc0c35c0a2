//! rustls configuration for tunnel connections: TLS 1.3 only, AES-GCM first, the `ring` provider,
//! mutual authentication against one private CA, and no 0-RTT in either direction.

use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::{
    crypto::CryptoProvider,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName},
    server::WebPkiClientVerifier,
    RootCertStore,
};

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no PEM certificate found in {what}")]
    NoCertificate { what: &'static str },
    #[error("cannot parse PEM in {what}: {source}")]
    Pem { what: &'static str, source: rustls::pki_types::pem::Error },
    #[error("CA certificate rejected: {0}")]
    Ca(rustls::Error),
    #[error("certificate or key rejected: {0}")]
    Identity(rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("QUIC needs an initial cipher suite the provider lacks")]
    NoInitialSuite(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    #[error("invalid server name {0:?}")]
    ServerName(String),
}

/// A certificate chain and its private key.
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").field("chain", &self.chain.len()).field("key", &"<redacted>").finish()
    }
}

impl Identity {
    /// Parses a PEM certificate chain and a PEM private key.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, TlsError> {
        let chain = certs_from_pem(cert_pem, "certificate file")?;
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|source| TlsError::Pem { what: "key file", source })?;
        Ok(Self { chain, key })
    }
}

/// Parses every certificate in a PEM document; at least one must be there.
pub fn certs_from_pem(pem: &[u8], what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem { what, source })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate { what });
    }
    Ok(chain)
}

/// A trust store holding the certificates of one PEM document (the private CA).
pub fn roots_from_pem(ca_pem: &[u8]) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs_from_pem(ca_pem, "CA file")? {
        roots.add(cert).map_err(TlsError::Ca)?;
    }
    Ok(Arc::new(roots))
}

/// The `ring` provider with AES-128-GCM first (x86 has AES-NI), then AES-256-GCM, then ChaCha20.
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::{cipher_suite, default_provider};
    let mut provider = default_provider();
    provider.cipher_suites = vec![
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(provider)
}

/// Server (relay) crypto: requires a client certificate chaining to `roots`, offers `alpn`.
/// 0-RTT stays off: `max_early_data_size` keeps rustls' default of 0, so quinn accepts no early data.
pub fn server_crypto(
    roots: Arc<RootCertStore>,
    identity: Identity,
    alpn: &[&[u8]],
) -> Result<Arc<QuicServerConfig>, TlsError> {
    server_crypto_with(roots, identity, alpn, ClientCerts::Required)
}

/// Whether the relay's handshake demands a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCerts {
    Required,
    /// A client may come without one (to enroll); one it does present must still chain to the
    /// CA. The relay then admits certificate-less connections to enrollment only.
    Optional,
}

/// The relay's rustls configuration, with the client-certificate policy spelled out: TLS 1.3
/// only, no early data, the same for QUIC and for the TCP transport.
pub fn server_rustls(
    roots: Arc<RootCertStore>,
    identity: Identity,
    alpn: &[&[u8]],
    client_certs: ClientCerts,
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let builder = WebPkiClientVerifier::builder_with_provider(roots, provider.clone());
    let verifier = match client_certs {
        ClientCerts::Required => builder.build()?,
        ClientCerts::Optional => builder.allow_unauthenticated().build()?,
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Identity)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain, identity.key)
        .map_err(TlsError::Identity)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config.max_early_data_size = 0;
    Ok(config)
}

/// A relay's rustls configuration made QUIC's.
pub fn quic_server(config: rustls::ServerConfig) -> Result<Arc<QuicServerConfig>, TlsError> {
    Ok(Arc::new(QuicServerConfig::try_from(config)?))
}

/// [`server_rustls`] for QUIC.
pub fn server_crypto_with(
    roots: Arc<RootCertStore>,
    identity: Identity,
    alpn: &[&[u8]],
    client_certs: ClientCerts,
) -> Result<Arc<QuicServerConfig>, TlsError> {
    let config = server_rustls(roots, identity, alpn, client_certs)?;
    Ok(Arc::new(QuicServerConfig::try_from(config)?))
}

/// Client (agent) crypto: verifies the relay against `roots` and presents `identity`.
pub fn client_crypto(
    roots: Arc<RootCertStore>,
    identity: Identity,
    alpn: &[&[u8]],
) -> Result<Arc<QuicClientConfig>, TlsError> {
    Ok(Arc::new(QuicClientConfig::try_from(client_rustls(roots, identity, alpn)?)?))
}

/// An agent's rustls configuration made QUIC's.
pub fn quic_client(config: rustls::ClientConfig) -> Result<Arc<QuicClientConfig>, TlsError> {
    Ok(Arc::new(QuicClientConfig::try_from(config)?))
}

/// The agent's rustls configuration (TLS 1.3 only, no early data), for QUIC and for TCP.
pub fn client_rustls(
    roots: Arc<RootCertStore>,
    identity: Identity,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, TlsError> {
    let config = tls13_client(provider())?
        .with_root_certificates(roots)
        .with_client_auth_cert(identity.chain, identity.key)
        .map_err(TlsError::Identity)?;
    Ok(offering(config, alpn))
}

/// How every client configuration starts: the provider, TLS 1.3 only.
fn tls13_client(
    provider: Arc<CryptoProvider>,
) -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier>, TlsError> {
    rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Identity)
}

/// How every client configuration ends: the ALPN it offers, and no early data (0-RTT), ever.
fn offering(mut config: rustls::ClientConfig, alpn: &[&[u8]]) -> rustls::ClientConfig {
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config.enable_early_data = false;
    config
}

/// Client crypto for enrollment: no client certificate, and the relay is trusted only if its chain
/// includes a CA certificate whose SHA-256 is `ca_sha256` and the leaf verifies against that CA
/// for the server name. Anything else fails the handshake, before a byte of the request is sent.
/// The [`PinCheck`] says afterwards whether a failed handshake failed on the pin.
pub fn pinned_client_crypto(
    ca_sha256: [u8; 32],
    alpn: &[&[u8]],
) -> Result<(Arc<QuicClientConfig>, PinCheck), TlsError> {
    let (config, check) = pinned_client_rustls(ca_sha256, alpn)?;
    Ok((Arc::new(QuicClientConfig::try_from(config)?), check))
}

/// [`pinned_client_crypto`]'s rustls configuration, for enrollment over TCP as well; a clone shares
/// the [`PinCheck`].
pub fn pinned_client_rustls(
    ca_sha256: [u8; 32],
    alpn: &[&[u8]],
) -> Result<(rustls::ClientConfig, PinCheck), TlsError> {
    let provider = provider();
    let check = PinCheck::default();
    let verifier = Arc::new(PinnedCa { ca_sha256, provider: provider.clone(), mismatch: check.clone() });
    let config =
        tls13_client(provider)?.dangerous().with_custom_certificate_verifier(verifier).with_no_client_auth();
    Ok((offering(config, alpn), check))
}

/// Whether a relay was refused because its chain held no CA with the pinned hash.
#[derive(Debug, Clone, Default)]
pub struct PinCheck(Arc<std::sync::atomic::AtomicBool>);

impl PinCheck {
    /// True once a relay's chain lacked the pinned CA (set by the handshake, never cleared).
    pub fn ca_mismatched(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }

    fn mismatch(&self) {
        self.0.store(true, std::sync::atomic::Ordering::Release);
    }
}

/// SHA-256 of a DER certificate.
pub fn cert_sha256(der: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// Verifies the relay against the CA certificate pinned by hash (see [`pinned_client_crypto`]).
#[derive(Debug)]
struct PinnedCa {
    ca_sha256: [u8; 32],
    provider: Arc<CryptoProvider>,
    mismatch: PinCheck,
}

impl rustls::client::danger::ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates.iter().find(|c| cert_sha256(c) == self.ca_sha256) else {
            self.mismatch.mismatch();
            return Err(rustls::Error::General(
                "the relay's CA does not match the join token's CA hash".into(),
            ));
        };
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Checks that `name` can be used as a TLS server name (a DNS name or an IP address).
pub fn server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(name.to_owned()).map_err(|_| TlsError::ServerName(name.to_owned()))
}

/// What the tunnel needs to know of a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The first DNS name among the subject alternative names: an agent's name.
    pub dns_name: Option<String>,
    /// Every subject alternative name (DNS names and IP addresses), as text.
    pub sans: Vec<String>,
    /// End of validity, in seconds since the Unix epoch.
    pub not_after_unix: i64,
    /// Start of validity, in seconds since the Unix epoch.
    pub not_before_unix: i64,
    /// The serial number, lowercase hex.
    pub serial: String,
    /// The issuer's distinguished name, as text.
    pub issuer: String,
}

/// Why a certificate could not be inspected or verified.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("not a valid X.509 certificate: {0}")]
    Parse(String),
    #[error("certificate is not signed by this CA")]
    NotIssuedBy,
}

/// Reads the names and expiry of a DER certificate.
pub fn inspect(der: &[u8]) -> Result<CertInfo, CertError> {
    use x509_parser::{extensions::GeneralName, prelude::FromDer};
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|e| CertError::Parse(e.to_string()))?;
    let mut sans = Vec::new();
    let mut dns_name = None;
    if let Some(ext) = cert.subject_alternative_name().map_err(|e| CertError::Parse(e.to_string()))? {
        for name in &ext.value.general_names {
            match name {
                GeneralName::DNSName(dns) => {
                    dns_name.get_or_insert_with(|| dns.to_string());
                    sans.push(dns.to_string());
                }
                GeneralName::IPAddress(bytes) => {
                    let ip = match bytes.len() {
                        4 => <[u8; 4]>::try_from(*bytes).ok().map(std::net::IpAddr::from),
                        16 => <[u8; 16]>::try_from(*bytes).ok().map(std::net::IpAddr::from),
                        _ => None,
                    };
                    if let Some(ip) = ip {
                        sans.push(ip.to_string());
                    }
                }
                _ => {}
            }
        }
    }
    Ok(CertInfo {
        dns_name,
        sans,
        not_after_unix: cert.validity().not_after.timestamp(),
        not_before_unix: cert.validity().not_before.timestamp(),
        serial: crate::hex::encode(cert.tbs_certificate.raw_serial()),
        issuer: cert.issuer().to_string(),
    })
}

/// The raw public key (the subject public key's bits) of a DER certificate.
pub fn public_key(der: &[u8]) -> Result<Vec<u8>, CertError> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|e| CertError::Parse(e.to_string()))?;
    Ok(cert.public_key().subject_public_key.data.to_vec())
}

/// Checks that `chain` (a leaf, then the certificates its holder sends along) leads to the CA
/// certificate `ca_der`: the leaf signed by the CA, or by the next certificate, and so on.
pub fn verify_chain(chain: &[CertificateDer<'_>], ca_der: &[u8]) -> Result<(), CertError> {
    for (i, cert) in chain.iter().enumerate().take(4) {
        if verify_issued_by(cert, ca_der).is_ok() {
            return Ok(());
        }
        match chain.get(i + 1) {
            Some(next) => verify_issued_by(cert, next)?,
            None => break,
        }
    }
    Err(CertError::NotIssuedBy)
}

/// Checks that `cert_der` carries a valid signature of the CA certificate `ca_der`.
pub fn verify_issued_by(cert_der: &[u8], ca_der: &[u8]) -> Result<(), CertError> {
    use x509_parser::prelude::FromDer;
    let parse = |der| {
        x509_parser::certificate::X509Certificate::from_der(der)
            .map(|(_, c)| c)
            .map_err(|e| CertError::Parse(e.to_string()))
    };
    let (cert, ca) = (parse(cert_der)?, parse(ca_der)?);
    cert.verify_signature(Some(ca.public_key())).map_err(|_| CertError::NotIssuedBy)
}

/// Where one side keeps its TLS material: the CA certificate, its own certificate and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca_cert: std::path::PathBuf,
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

/// A side's TLS material, read and checked: the certificate parses, matches the CA and names a
/// peer. The key is checked against the certificate when a TLS configuration is built from it.
pub struct LoadedTls {
    /// The CA certificate (DER), for a chain that lets enrolling agents pin it.
    pub ca: CertificateDer<'static>,
    pub roots: Arc<RootCertStore>,
    pub identity: Identity,
    pub leaf: CertInfo,
    /// The private key as read (PEM), for deriving stable endpoint keys.
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for LoadedTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedTls")
            .field("identity", &self.identity)
            .field("leaf", &self.leaf)
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// Why a relay's or an agent's TLS identity (CA, certificate, key) could not be set up: the
/// start error both binaries share.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A file is missing, unreadable, or not what it should be.
    #[error(transparent)]
    Files(#[from] TlsFileError),
    /// The files load but do not make a TLS configuration (a key that is not the certificate's).
    #[error("TLS configuration: {0}")]
    Crypto(#[from] TlsError),
}

/// A TLS file that could not be used, named with what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("{}: {reason}", path.display())]
pub struct TlsFileError {
    pub path: std::path::PathBuf,
    pub reason: String,
}

impl TlsFiles {
    /// Reads the three files and checks that the certificate was issued by the CA.
    pub fn load(&self) -> Result<LoadedTls, TlsFileError> {
        let fail = |path: &std::path::Path, reason: String| TlsFileError { path: path.to_owned(), reason };
        let read =
            |path: &std::path::Path| std::fs::read(path).map_err(|e| fail(path, format!("cannot read: {e}")));
        let ca_pem = read(&self.ca_cert)?;
        let key_pem = read(&self.key)?;
        let ca = certs_from_pem(&ca_pem, "CA file").map_err(|e| fail(&self.ca_cert, e.to_string()))?;
        let roots = roots_from_pem(&ca_pem).map_err(|e| fail(&self.ca_cert, e.to_string()))?;
        let identity =
            Identity::from_pem(&read(&self.cert)?, &key_pem).map_err(|e| fail(&self.cert, e.to_string()))?;
        // `Identity::from_pem` refuses an empty chain, so the leaf is there.
        let leaf = identity.chain.first().ok_or_else(|| fail(&self.cert, "no certificate".into()))?;
        verify_chain(&identity.chain, &ca[0])
            .map_err(|e| fail(&self.cert, format!("{e} (CA {})", self.ca_cert.display())))?;
        let leaf = inspect(leaf).map_err(|e| fail(&self.cert, e.to_string()))?;
        let ca = ca.into_iter().next().ok_or_else(|| fail(&self.ca_cert, "no certificate".into()))?;
        Ok(LoadedTls { ca, roots, identity, leaf, key_pem })
    }
}

impl CertInfo {
    /// Whole days of validity left (negative once expired).
    pub fn days_left(&self) -> i64 {
        let now = i64::try_from(crate::clock::unix_now()).unwrap_or(i64::MAX);
        (self.not_after_unix - now).div_euclid(86_400)
    }
}
