//! An agent's identity: the certificate it connected with, which the handshake verified; the
//! first DNS name in it names the agent.

use sallyport_runtime::{link::Connection, tls};

use crate::trust::revocations::CertId;

/// The certificate an agent connected with, which the handshake verified.
#[derive(Debug, Clone)]
pub(crate) struct AgentCert {
    /// Its agent (the first DNS name), serial and time of issue.
    pub(crate) id: CertId,
    pub(crate) not_after_unix: i64,
}

/// The agent's certificate: the first DNS name in it names the agent.
pub(crate) fn agent_identity(connection: &Connection) -> Result<AgentCert, IdentityError> {
    let certs = connection.peer_certificates().ok_or(IdentityError::NoCertificate)?;
    let leaf = certs.first().ok_or(IdentityError::EmptyChain)?;
    let info = tls::inspect(leaf)?;
    let name = info.dns_name.ok_or(IdentityError::NoName)?;
    if !sallyport_proto::is_valid_name(&name) {
        return Err(IdentityError::InvalidName(name));
    }
    let id = CertId { agent: name, serial: info.serial, issued_unix: info.not_before_unix };
    Ok(AgentCert { id, not_after_unix: info.not_after_unix })
}

/// Why a connection's client certificate does not name an agent.
#[derive(Debug, thiserror::Error)]
pub(crate) enum IdentityError {
    #[error("no client certificate")]
    NoCertificate,
    #[error("empty client certificate chain")]
    EmptyChain,
    #[error(transparent)]
    Unreadable(#[from] tls::CertError),
    #[error("client certificate has no DNS name")]
    NoName,
    #[error("client certificate name {0:?} is not a valid agent name")]
    InvalidName(String),
}
