//! Closes the live tunnels (and lanes) of certificates that a revocation refuses, whether it was
//! made on this relay or taken from the writer replica of its cluster.

use std::sync::Arc;

use sallyport_proto::codes::close;
use sallyport_runtime::code;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::{
    trust::{revocations::CertId, Trust},
    tunnel::registry::Registry,
};

/// Watches the revocations until `stop` is cancelled.
pub(crate) async fn close_refused(registry: Arc<Registry>, trust: Arc<Trust>, stop: CancellationToken) {
    let mut changes = trust.revocations.changes();
    loop {
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            () = stop.cancelled() => return,
        }
        for session in registry.sessions() {
            let cert = CertId {
                agent: session.name.clone(),
                serial: session.serial.clone(),
                issued_unix: session.cert_issued_unix,
            };
            if trust.revocations.refuses(&cert) {
                warn!(agent = %session.name, serial = %session.serial, "closing a revoked agent's tunnel");
                let refused = code(close::REFUSED);
                session.connection.close(refused, b"certificate revoked");
                session.lanes.close_all(refused, b"certificate revoked");
            }
        }
    }
}
