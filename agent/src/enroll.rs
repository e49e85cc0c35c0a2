//! `sallyport-agent enroll TOKEN`: turns a join token into this agent's identity. The key is
//! generated here and never leaves; the relay is trusted only if its CA matches the token's hash,
//! checked in the TLS handshake before the token's secret is sent.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use sallyport_proto::enroll::{
    EnrollRequest, EnrollResponse, JoinToken, TokenError, ALPN_ENROLL, MAX_ENROLL_FRAME,
};
use sallyport_runtime::{
    link::{Connection, Transport},
    quic::Congestion,
    read_frame, tls, write_frame,
};

use crate::{
    config::QUIC_WAIT,
    tunnel::{dial, Dialer, Failure, Timers, TunnelError, Via},
};

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
    /// No relay of the token could be reached: each one's reason.
    #[error("cannot reach a relay of the token ({0})")]
    Unreachable(String),
    #[error("the relay refused the join token: {0}")]
    Refused(String),
    /// The exchange with a relay that answered failed.
    #[error("enrollment failed: {0}")]
    Tunnel(#[from] TunnelError),
    #[error("cannot make the key or its certificate request: {0}")]
    Key(#[from] rcgen::Error),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The relay's answer does not fit the token.
    #[error("enrollment failed: {0}")]
    Answer(&'static str),
    #[error("{}: {source}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
}

/// How long one relay may take to answer an enrollment, connection included.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(15);

/// Redeems `token` and writes `agent.key`, `agent.crt`, `ca.crt` and (if missing) `agent.toml`
/// into `dir`.
pub async fn enroll(token: &str, dir: &Path) -> Result<Enrolled, EnrollError> {
    let token = JoinToken::decode(token)?;
    let key = rcgen::KeyPair::generate().map_err(EnrollError::Key)?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .and_then(|params| params.serialize_request(&key))
        .and_then(|csr| csr.pem())
        .map_err(EnrollError::Key)?;
    let request = EnrollRequest { token_id: token.id, secret: token.secret, csr_pem: csr };

    let mut failures = Vec::new();
    for relay in &token.relays {
        // A fresh configuration per relay, so its pin check speaks of this relay only (the TCP
        // configuration is a clone: it shares the check).
        let (rustls_config, pin) = tls::pinned_client_rustls(token.ca_sha256, &[ALPN_ENROLL])?;
        let timers = Timers {
            keep_alive: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(10),
            congestion: Congestion::default(),
            handshake_timeout: EXCHANGE_TIMEOUT,
        };
        let dialer = Dialer::new(rustls_config, timers)?;
        match redeem(relay, &token.server_name, &dialer, &pin, &request).await {
            Ok(response) => return write_identity(response, &key.serialize_pem(), &token, dir),
            Err(e @ (EnrollError::WrongRelay(_) | EnrollError::Refused(_))) => return Err(e),
            Err(e) => failures.push(format!("{relay}: {e}")),
        }
    }
    Err(EnrollError::Unreachable(failures.join("; ")))
}

/// Redeems the token at one relay: over QUIC, or over TLS on TCP when QUIC gets no answer within
/// a few seconds or UDP fails outright (a network that lets no UDP out), as the agent's tunnel
/// does; the same dial as the tunnel's.
async fn redeem(
    relay: &str,
    server_name: &str,
    dialer: &Dialer,
    pin: &tls::PinCheck,
    request: &EnrollRequest,
) -> Result<EnrollResponse, EnrollError> {
    let addr: SocketAddr = tokio::net::lookup_host(relay)
        .await
        .map_err(|e| EnrollError::Unreachable(e.to_string()))?
        .next()
        .ok_or_else(|| EnrollError::Unreachable("no address".into()))?;
    let mut endpoint = None;
    let exchange = |connection: Connection| async move {
        let (mut send, mut recv) = connection.open_bi().await?;
        write_frame(&mut send, request, MAX_ENROLL_FRAME).await?;
        let _ = send.finish();
        let mut buf = Vec::new();
        read_frame::<EnrollResponse>(&mut recv, MAX_ENROLL_FRAME, &mut buf)
            .await?
            .ok_or(TunnelError::Protocol("the relay closed without answering"))
    };
    let wrong_relay = |e: TunnelError| {
        if pin.ca_mismatched() {
            EnrollError::WrongRelay(relay.to_owned())
        } else {
            e.into()
        }
    };
    let quic = Via::to(Transport::Quic, addr, &mut endpoint);
    let quic = match quic {
        Ok(via) => dial(dialer, via, (addr, server_name), Some(QUIC_WAIT), exchange).await,
        Err(e) => Err(e),
    };
    let (connection, response) = match quic {
        Ok(done) => done,
        Err(e) if pin.ca_mismatched() || e.failure() == Failure::Other => return Err(wrong_relay(e)),
        Err(quic) => match dial(dialer, Via::Tcp, (addr, server_name), None, exchange).await {
            Ok(done) => {
                tracing::info!(%relay, quic = %quic, "enrolling over TCP: QUIC got no answer");
                done
            }
            Err(_) if pin.ca_mismatched() => return Err(EnrollError::WrongRelay(relay.to_owned())),
            Err(tcp) => return Err(EnrollError::Unreachable(format!("over QUIC: {quic}; over TCP: {tcp}"))),
        },
    };
    connection.close(0u32.into(), b"done");
    if let Some(endpoint) = endpoint {
        endpoint.close().await;
    }
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
        return Err(EnrollError::Answer("unexpected answer"));
    };
    // The CA the agent will trust from now on must be the one the token pins, whatever the relay
    // sent.
    let pinned = tls::certs_from_pem(ca_pem.as_bytes(), "CA certificate")
        .ok()
        .is_some_and(|certs| certs.len() == 1 && tls::cert_sha256(&certs[0]) == token.ca_sha256);
    if !pinned {
        return Err(EnrollError::Answer("the relay sent a CA certificate other than the token's"));
    }
    let write = |name: &str, contents: &str, private: bool| {
        let path = dir.join(name);
        crate::files::write_file(&path, contents, private)
            .map_err(|source| EnrollError::Write { path, source })
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
