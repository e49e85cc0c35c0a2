//! `sallyport-agent enroll TOKEN`: turns a join token into this agent's identity. The key is
//! generated here and never leaves; the relay is trusted only if its CA matches the token's hash,
//! checked in the TLS handshake before the token's secret is sent.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use quinn::Endpoint;
use sallyport_proto::enroll::{
    EnrollRequest, EnrollResponse, JoinToken, TokenError, ALPN_ENROLL, MAX_ENROLL_FRAME,
};
use sallyport_runtime::{link::Connection, read_frame, tcp, tls, write_frame};

use crate::config::QUIC_WAIT;

/// What enrollment wrote.
#[derive(Debug)]
pub struct Enrolled {
    pub agent: String,
    pub dir: PathBuf,
    /// The agent.toml the identity belongs with.
    pub config: PathBuf,
    /// Whether agent.toml was written now (an existing one is left as it is).
    pub config_written: bool,
    pub not_after_unix: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("the relay at {0} does not present the CA the join token names: the token was not sent")]
    WrongRelay(String),
    #[error("cannot reach a relay of the token ({0})")]
    Unreachable(String),
    #[error("the relay refused the join token: {0}")]
    Refused(String),
    #[error("enrollment failed: {0}")]
    Protocol(String),
    #[error("{}: {source}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS on TCP with the pinned configuration, then HTTP/2 (the relay opens the enrollment stream).
async fn over_tcp(
    addr: SocketAddr,
    server_name: &str,
    config: Arc<rustls::ClientConfig>,
    pin: &tls::PinCheck,
) -> Result<Connection, EnrollError> {
    let unreachable = |e: &dyn std::fmt::Display| EnrollError::Unreachable(e.to_string());
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| EnrollError::Unreachable(format!("no answer within {CONNECT_TIMEOUT:?}")))?
        .map_err(|e| unreachable(&e))?;
    sallyport_runtime::tcp::tunnel_socket(&tcp);
    let name = tls::server_name(server_name).map_err(|e| EnrollError::Protocol(e.to_string()))?;
    let tls = match tokio_rustls::TlsConnector::from(config).connect(name, tcp).await {
        Ok(tls) => tls,
        Err(_) if pin.ca_mismatched() => return Err(EnrollError::WrongRelay(addr.to_string())),
        Err(e) => return Err(unreachable(&e)),
    };
    let peer = tcp::Peer::of(addr, tls.get_ref().1);
    let settings = sallyport_runtime::tcp::tcp_agent(Duration::from_secs(2), Duration::from_secs(10));
    let connection = tcp::server(tls, peer, settings).await.map_err(|e| unreachable(&e))?;
    Ok(Connection::Tcp(connection))
}

/// Redeems `token` and writes `agent.key`, `agent.crt`, `ca.crt` and (if missing) `agent.toml`
/// into `dir`.
pub async fn enroll(token: &str, dir: &Path) -> Result<Enrolled, EnrollError> {
    let token = JoinToken::decode(token)?;
    let key = rcgen::KeyPair::generate().map_err(|e| EnrollError::Protocol(e.to_string()))?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .and_then(|params| params.serialize_request(&key))
        .and_then(|csr| csr.pem())
        .map_err(|e| EnrollError::Protocol(format!("cannot make a certificate request: {e}")))?;
    let request = EnrollRequest { token_id: token.id, secret: token.secret, csr_pem: csr };

    let mut failures = Vec::new();
    for relay in &token.relays {
        // A fresh configuration per relay, so its pin check speaks of this relay only (the TCP
        // configuration is a clone: it shares the check).
        let (rustls_config, pin) = tls::pinned_client_rustls(token.ca_sha256, &[ALPN_ENROLL])
            .map_err(|e| EnrollError::Protocol(e.to_string()))?;
        let tcp = Arc::new(rustls_config.clone());
        let crypto = tls::quic_client(rustls_config).map_err(|e| EnrollError::Protocol(e.to_string()))?;
        let mut client = quinn::ClientConfig::new(crypto);
        client.transport_config(sallyport_runtime::quic::agent(
            Duration::from_secs(2),
            Duration::from_secs(10),
            sallyport_runtime::quic::Congestion::default(),
        ));
        match redeem(relay, &token.server_name, (&client, tcp), &pin, &request).await {
            Ok(response) => return write_identity(response, &key.serialize_pem(), &token, dir),
            Err(e @ (EnrollError::WrongRelay(_) | EnrollError::Refused(_))) => return Err(e),
            Err(e) => failures.push(format!("{relay}: {e}")),
        }
    }
    Err(EnrollError::Unreachable(failures.join("; ")))
}

/// Redeems the token at one relay: over QUIC, or over TLS on TCP when QUIC gets no answer within
/// a few seconds (a network that lets no UDP out), as the agent's tunnel does.
async fn redeem(
    relay: &str,
    server_name: &str,
    (client, tcp): (&quinn::ClientConfig, Arc<rustls::ClientConfig>),
    pin: &tls::PinCheck,
    request: &EnrollRequest,
) -> Result<EnrollResponse, EnrollError> {
    let addr: SocketAddr = tokio::net::lookup_host(relay)
        .await
        .map_err(|e| EnrollError::Unreachable(e.to_string()))?
        .next()
        .ok_or_else(|| EnrollError::Unreachable("no address".into()))?;
    let bind: SocketAddr =
        if addr.is_ipv4() { (Ipv4Addr::UNSPECIFIED, 0).into() } else { (Ipv6Addr::UNSPECIFIED, 0).into() };
    let endpoint = Endpoint::client(bind).map_err(|e| EnrollError::Unreachable(e.to_string()))?;
    let connecting = endpoint
        .connect_with(client.clone(), addr, server_name)
        .map_err(|e| EnrollError::Unreachable(e.to_string()))?;
    let connection = match tokio::time::timeout(QUIC_WAIT, connecting).await {
        Ok(Err(_)) if pin.ca_mismatched() => return Err(EnrollError::WrongRelay(relay.to_owned())),
        Ok(Ok(connection)) => Connection::Quic(connection),
        quic => {
            let quic = match quic {
                Err(_) => format!("no answer within {QUIC_WAIT:?}"),
                Ok(Err(e)) => e.to_string(),
                Ok(Ok(_)) => String::new(),
            };
            match over_tcp(addr, server_name, tcp, pin).await {
                Ok(connection) => {
                    tracing::info!(%relay, quic = %quic, "enrolling over TCP: QUIC got no answer");
                    connection
                }
                Err(EnrollError::Unreachable(e)) => {
                    return Err(EnrollError::Unreachable(format!("over QUIC: {quic}; over TCP: {e}")))
                }
                Err(e) => return Err(e),
            }
        }
    };
    let exchange = async {
        let (mut send, mut recv) = connection.open_bi().await.map_err(|e| e.to_string())?;
        write_frame(&mut send, request, MAX_ENROLL_FRAME).await.map_err(|e| e.to_string())?;
        let _ = send.finish();
        let mut buf = Vec::new();
        read_frame::<EnrollResponse>(&mut recv, MAX_ENROLL_FRAME, &mut buf)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "the relay closed without answering".to_owned())
    };
    let response = tokio::time::timeout(Duration::from_secs(15), exchange)
        .await
        .map_err(|_| EnrollError::Protocol("no answer from the relay".into()))?
        .map_err(EnrollError::Protocol)?;
    connection.close(0u32.into(), b"done");
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    match response {
        EnrollResponse::Refused { reason } => Err(EnrollError::Refused(reason)),
        issued => Ok(issued),
    }
}

fn write_identity(
    response: EnrollResponse,
    key_pem: &str,
    token: &JoinToken,
    dir: &Path,
) -> Result<Enrolled, EnrollError> {
    let EnrollResponse::Issued { agent, cert_pem, ca_pem, not_after_unix } = response else {
        return Err(EnrollError::Protocol("unexpected answer".into()));
    };
    // The CA the agent will trust from now on must be the one the token pins, whatever the relay
    // sent.
    let pinned = tls::certs_from_pem(ca_pem.as_bytes(), "CA certificate")
        .ok()
        .is_some_and(|certs| certs.len() == 1 && tls::cert_sha256(&certs[0]) == token.ca_sha256);
    if !pinned {
        return Err(EnrollError::Protocol("the relay sent a CA certificate other than the token's".into()));
    }
    let write = |name: &str, contents: &str, private: bool| {
        let path = dir.join(name);
        write_file(&path, contents, private).map_err(|source| EnrollError::Write { path, source })
    };
    std::fs::create_dir_all(dir).map_err(|source| EnrollError::Write { path: dir.to_owned(), source })?;
    write("agent.key", key_pem, true)?;
    write("agent.crt", &cert_pem, false)?;
    write("ca.crt", &ca_pem, false)?;
    let config = dir.join("agent.toml");
    let config_written = !config.exists();
    if config_written {
        write("agent.toml", &starter_config(&agent, token), false)?;
    }
    Ok(Enrolled { agent, dir: dir.to_owned(), config, config_written, not_after_unix })
}

/// A starter agent.toml pointing at the token's relays, with no service yet.
fn starter_config(agent: &str, token: &JoinToken) -> String {
    let relays: Vec<String> = token.relays.iter().map(|r| format!("{r:?}")).collect();
    format!(
        "# Agent {agent:?}, enrolled with a join token. Add the services this machine offers.\n\
         [agent]\nrelays = [{}]\nserver_name = {:?}\nca_cert = \"ca.crt\"\ncert = \"agent.crt\"\nkey = \"agent.key\"\n\n\
         # [services.postgres]\n# target = \"tcp://127.0.0.1:5432\"\n",
        relays.join(", "),
        token.server_name
    )
}

pub(crate) fn write_file(path: &Path, contents: &str, private: bool) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    // On Windows a key gets its own descriptor (SYSTEM, Administrators, its owner) while the file
    // is still empty, whatever the folder would pass on to it.
    #[cfg(windows)]
    let mut file = if private {
        crate::acl::create_private_file(path).map_err(std::io::Error::other)?
    } else {
        options.open(path)?
    };
    #[cfg(not(windows))]
    let mut file = options.open(path)?;
    // A file that existed keeps its old mode through `open`: a key is made private either way.
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    file.write_all(contents.as_bytes())?;
    // Flushed to disk before anything renames it into place.
    file.sync_all()
}
