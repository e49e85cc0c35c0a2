//! Accepting agent connections: the handshake under its timeout, enrollment by ALPN, the agent's
//! identity from its certificate, and revoked certificates refused.

use std::sync::Arc;

use quinn::{Connection, Endpoint, Incoming};
use sallyport_proto::codes::close;
use sallyport_runtime::{code, tls, transport};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info_span, Instrument};

use crate::{
    trust::{enroll, revocations::CertId},
    tunnel::{control, gate::Pass, Tunnels},
};

/// Accepts agent connections until `stop` is cancelled. Each connection gets its own task.
pub(crate) async fn accept_loop(endpoint: Endpoint, tunnels: Arc<Tunnels>, stop: CancellationToken) {
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => incoming,
            () = stop.cancelled() => None,
        };
        let Some(incoming) = incoming else { break };
        // Under a handshake flood, make unvalidated peers prove their address first.
        if !incoming.remote_address_validated()
            && endpoint.open_connections() > tunnels.config.get().limits.max_incoming
        {
            if let Err(e) = incoming.retry() {
                debug!(error = %e, "retry refused");
            }
            continue;
        }
        let remote = incoming.remote_address();
        let pass = match tunnels.gate.enter(remote.ip()) {
            Ok((pass, pushed_out)) => {
                if pushed_out {
                    tunnels.runtime.metrics.handshake_failed("unauthenticated_pushed_out");
                }
                pass
            }
            Err(refused) => {
                tunnels.runtime.metrics.handshake_failed(refused.metric());
                debug!(%remote, reason = %refused, "connection refused before its handshake");
                incoming.refuse();
                continue;
            }
        };
        let work = handle_incoming(incoming, pass, tunnels.clone()).instrument(info_span!("tunnel", %remote));
        tunnels.runtime.tasks.spawn(work);
    }
}

/// Serves one incoming connection; while its peer is unproven, newer connections may push it out.
async fn handle_incoming(incoming: Incoming, pass: Pass, tunnels: Arc<Tunnels>) {
    let closed = pass.closed.clone();
    tokio::select! {
        () = serve_incoming(incoming, pass, tunnels) => {}
        () = closed.cancelled() => debug!("unauthenticated connection pushed out by newer ones"),
    }
}

async fn serve_incoming(incoming: Incoming, pass: Pass, tunnels: Arc<Tunnels>) {
    let config = tunnels.config.get();
    let limits = &config.limits;
    let metrics = &tunnels.runtime.metrics;
    let connection = match tokio::time::timeout(limits.handshake_timeout, incoming).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(e)) => {
            sallyport_runtime::limited!(warn, error = %e, "handshake failed");
            metrics.handshake_failed("tls");
            return;
        }
        Err(_) => {
            sallyport_runtime::limited!(warn, timeout = ?limits.handshake_timeout, "handshake timed out");
            metrics.handshake_failed("timeout");
            return;
        }
    };
    let alpn = connection
        .handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol);
    if alpn.as_deref() == Some(sallyport_proto::enroll::ALPN_ENROLL) {
        // An enrolling peer holds its unauthenticated place until it is done.
        match &tunnels.trust.enrollment {
            Some(enrollment) => {
                let redeem = async |id, secret: [u8; 32]| match &tunnels.cluster {
                    Some(cluster) if !cluster.is_writer() => cluster.redeem(id, &secret).await,
                    _ => enrollment.tokens.redeem(id, &secret, sallyport_runtime::clock::unix_now()),
                };
                enroll::serve(connection, enrollment, redeem).await;
            }
            None => connection.close(code(close::REFUSED), b"enrollment is off"),
        }
        drop(pass);
        return;
    }
    let cert = match agent_identity(&connection) {
        Ok(identity) => identity,
        Err(refused) => {
            sallyport_runtime::limited!(warn, reason = %refused, "agent certificate refused");
            metrics.handshake_failed("certificate");
            connection.close(code(close::REFUSED), refused.to_string().as_bytes());
            return;
        }
    };
    if tunnels.trust.revocations.refuses(&cert.id) {
        sallyport_runtime::limited!(warn, agent = %cert.id.agent, serial = %cert.id.serial, "revoked certificate refused");
        metrics.handshake_failed("revoked");
        connection.close(code(close::REFUSED), b"certificate revoked");
        return;
    }
    // A proven agent: the tunnel's limits, and its place behind the gate is free again.
    transport::admit_agent(&connection);
    pass.authenticated();
    let span = info_span!("agent", agent = %cert.id.agent);
    control::serve_agent(connection, cert, tunnels).instrument(span).await;
}

/// Why a connection's client certificate does not name an agent.
#[derive(Debug, thiserror::Error)]
enum IdentityError {
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

/// The certificate an agent connected with, which the handshake verified.
#[derive(Debug, Clone)]
pub(crate) struct AgentCert {
    /// Its agent (the first DNS name), serial and time of issue.
    pub(crate) id: CertId,
    pub(crate) not_after_unix: i64,
}

/// The agent's certificate: the first DNS name in it names the agent.
fn agent_identity(connection: &Connection) -> Result<AgentCert, IdentityError> {
    let certs = connection
        .peer_identity()
        .and_then(|id| id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok())
        .ok_or(IdentityError::NoCertificate)?;
    let leaf = certs.first().ok_or(IdentityError::EmptyChain)?;
    let info = tls::inspect(leaf)?;
    let name = info.dns_name.ok_or(IdentityError::NoName)?;
    if !sallyport_proto::is_valid_name(&name) {
        return Err(IdentityError::InvalidName(name));
    }
    let id = CertId { agent: name, serial: info.serial, issued_unix: info.not_before_unix };
    Ok(AgentCert { id, not_after_unix: info.not_after_unix })
}
