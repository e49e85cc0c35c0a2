//! One health check of a service's target, as the relay asked for it: a TCP connection, or an
//! HTTP(S) `GET` answered with the expected status, or the service's container being available.
//! Only the declared target is ever dialed; a container that is stopped is not started (it counts
//! as available while it can start on demand).

use std::{net::IpAddr, sync::Arc, time::Duration};

use sallyport_proto::CheckKind;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

use crate::{config::Target, containers::ContainerError, targets::Targets};

/// Why a target failed its check (the text goes to the relay as the member's reason).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProbeError {
    #[error("no answer within {}", humantime::format_duration(*.0))]
    TimedOut(Duration),
    #[error("this agent does not declare the service")]
    NotDeclared,
    #[error("a container check, but the target is {0}")]
    NotAContainer(String),
    #[error("a UDP target takes no TCP or HTTP check")]
    UdpTarget,
    #[error("no resolver for the WSL distribution")]
    NoWslResolver,
    #[error(transparent)]
    Container(#[from] ContainerError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0:?} is not a server name")]
    ServerName(String),
    #[error("TLS: {0}")]
    Tls(std::io::Error),
    #[error("not an HTTP answer")]
    NotHttp,
    #[error("GET {path} answered {got}, not {expected}")]
    Status { path: String, got: u16, expected: u16 },
}

/// The largest answer head read from an HTTP target.
const MAX_HEAD: usize = 8 * 1024;

/// Runs `kind` against `service`'s target within `timeout`: `Ok` when healthy, else why not.
pub(crate) async fn probe(
    targets: &Targets,
    service: &str,
    kind: &CheckKind,
    timeout: Duration,
) -> Result<(), ProbeError> {
    match tokio::time::timeout(timeout, run(targets, service, kind, timeout)).await {
        Ok(result) => result,
        Err(_) => Err(ProbeError::TimedOut(timeout)),
    }
}

async fn run(
    targets: &Targets,
    service: &str,
    kind: &CheckKind,
    timeout: Duration,
) -> Result<(), ProbeError> {
    let config = targets.config.get();
    let Some(declared) = config.services.get(service) else {
        return Err(ProbeError::NotDeclared);
    };
    if let (CheckKind::Container, target) = (kind, &declared.target) {
        return match target {
            Target::Container { name, .. } => Ok(targets.containers.check_target(name).await.map(|_| ())?),
            other => Err(ProbeError::NotAContainer(other.to_string())),
        };
    }
    let (tcp, host) = match &declared.target {
        Target::Tcp { host, port } => (TcpStream::connect((host.as_str(), *port)).await?, host.clone()),
        Target::Container { name, port } => match targets.containers.check_target(name).await? {
            // Stopped, and it may start on demand: available (a check never starts it).
            None => return Ok(()),
            Some(ip) => (TcpStream::connect((ip, *port)).await?, ip.to_string()),
        },
        Target::Wsl { distro, port } => {
            let resolver = targets.wsl(distro).ok_or(ProbeError::NoWslResolver)?;
            let localhost = Some(crate::targets::wsl::LOCALHOST);
            let tcp = resolver.connect_tcp(*port, localhost, timeout).await?;
            (tcp, "localhost".to_owned())
        }
        Target::Udp { .. } => return Err(ProbeError::UdpTarget),
    };
    match kind {
        CheckKind::Tcp | CheckKind::Container => Ok(()),
        CheckKind::Http { path, status, tls: false } => http(tcp, &host, path, *status).await,
        CheckKind::Http { path, status, tls: true } => {
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .or_else(|_| host.parse::<IpAddr>().map(rustls::pki_types::ServerName::from))
                .map_err(|_| ProbeError::ServerName(host.clone()))?;
            let connector = tokio_rustls::TlsConnector::from(Arc::new(any_certificate()));
            let tls = connector.connect(name.to_owned(), tcp).await.map_err(ProbeError::Tls)?;
            http(tls, &host, path, *status).await
        }
    }
}

/// `GET path`, and the answer's status against `expected`.
async fn http<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    host: &str,
    path: &str,
    expected: u16,
) -> Result<(), ProbeError> {
    let host = if host.contains(':') { format!("[{host}]") } else { host.to_owned() };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: sallyport-agent health check\r\nConnection: close\r\n\r\n"
    );
    io.write_all(request.as_bytes()).await?;
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 1024];
    while !head.windows(2).any(|w| w == b"\r\n") {
        let n = io.read(&mut buf).await?;
        if n == 0 || head.len() > MAX_HEAD {
            return Err(ProbeError::NotHttp);
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let status = line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or(ProbeError::NotHttp)?;
    if status == expected {
        Ok(())
    } else {
        Err(ProbeError::Status { path: path.to_owned(), got: status, expected })
    }
}

/// TLS for an `https` check: the target is the agent's own declaration, and nothing secret is
/// sent, so its certificate is not checked (a self-signed IIS binding passes).
fn any_certificate() -> rustls::ClientConfig {
    let provider = sallyport_runtime::tls::provider();
    // The runtime's provider has TLS 1.2 and 1.3 suites (its tunnels use them): the defaults hold.
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("the provider's default versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    config.enable_early_data = false;
    config
}

#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
