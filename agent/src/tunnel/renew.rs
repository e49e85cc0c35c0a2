//! Certificate renewal over the tunnel: when a third of the certificate's lifetime is left, the
//! agent makes a new key, sends a CSR on the control stream, and on the relay's answer writes the
//! new key and certificate over the old ones and uses them for every new connection. Tunnels that
//! are up stay up.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use sallyport_proto::{AgentMessage, ALPN_TUNNEL};
use sallyport_runtime::{
    clock,
    sync::{lock, write},
    tls, transport,
};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::tunnel::Tunnels;

/// Whether a certificate valid from `not_before` to `not_after` should be renewed at `now`.
pub(crate) fn due(not_before: i64, not_after: i64, now: i64) -> bool {
    let lifetime = (not_after - not_before).max(0);
    now >= not_after - lifetime / 3
}

/// How often to look: a twentieth of the lifetime, between 1 s and 10 minutes.
fn check_interval(not_before: i64, not_after: i64) -> Duration {
    let lifetime = u64::try_from(not_after - not_before).unwrap_or(0);
    Duration::from_secs((lifetime / 20).clamp(1, 600))
}

fn now_unix() -> i64 {
    i64::try_from(clock::unix_now()).unwrap_or(i64::MAX)
}

/// Why a renewed certificate could not be put in place.
#[derive(Debug, thiserror::Error)]
enum InstallError {
    /// The certificate, its key or the CA file do not make a usable identity.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Certificate(#[from] tls::CertError),
    #[error("the relay sent an empty certificate")]
    Empty,
    #[error("{}: {source}", path.display())]
    File { path: PathBuf, source: std::io::Error },
}

/// Sends a renewal request on `tx` whenever the certificate is due and none is in flight; runs
/// as long as the control stream.
pub(crate) async fn when_due(tx: &mpsc::Sender<AgentMessage>, tunnels: &Tunnels) {
    loop {
        let (not_before, not_after) = *lock(&tunnels.cert_validity);
        tokio::time::sleep(check_interval(not_before, not_after)).await;
        let (not_before, not_after) = *lock(&tunnels.cert_validity);
        if !due(not_before, not_after, now_unix()) {
            continue;
        }
        let Some(csr_pem) = start_request(tunnels) else { continue };
        info!(expires_in_s = not_after - now_unix(), "renewing the agent certificate");
        if tx.send(AgentMessage::Renew { csr_pem }).await.is_err() {
            *lock(&tunnels.renewal_key) = None;
            return;
        }
    }
}

/// Makes a key and its CSR and records the key as in flight; `None` if a request is already in
/// flight (one at a time across all tunnels) or the request cannot be made.
fn start_request(tunnels: &Tunnels) -> Option<String> {
    let mut pending = lock(&tunnels.renewal_key);
    // An answer lost with its tunnel is given up on after a minute.
    if pending.as_ref().is_some_and(|(_, sent)| sent.elapsed() < Duration::from_secs(60)) {
        return None;
    }
    let request = rcgen::KeyPair::generate().and_then(|key| {
        let csr = rcgen::CertificateParams::new(Vec::<String>::new())?.serialize_request(&key)?.pem()?;
        Ok((key.serialize_pem(), csr))
    });
    match request {
        Ok((key_pem, csr_pem)) => {
            *pending = Some((key_pem, std::time::Instant::now()));
            Some(csr_pem)
        }
        Err(e) => {
            warn!(error = %e, "cannot make a renewal request");
            None
        }
    }
}

/// Takes the relay's answer: on success the new key and certificate replace the old files and
/// the client configuration of new connections.
pub(crate) fn apply(result: Result<String, String>, tunnels: &Tunnels) {
    let key_pem = lock(&tunnels.renewal_key).take().map(|(key, _)| key);
    let (cert_pem, key_pem) = match (result, key_pem) {
        (Ok(cert), Some(key)) => (cert, key),
        (Ok(_), None) => return warn!("a renewed certificate arrived with no request in flight"),
        (Err(reason), _) => return warn!(%reason, "the relay did not renew the agent certificate"),
    };
    match install(&cert_pem, &key_pem, tunnels) {
        Ok(not_after) => info!(not_after_unix = not_after, "agent certificate renewed"),
        Err(e) => warn!(error = %e, "cannot install the renewed certificate"),
    }
}

fn install(cert_pem: &str, key_pem: &str, tunnels: &Tunnels) -> Result<i64, InstallError> {
    let files = &tunnels.config.tls;
    let identity = tls::Identity::from_pem(cert_pem.as_bytes(), key_pem.as_bytes())?;
    let leaf = identity.chain.first().ok_or(InstallError::Empty)?;
    let info = tls::inspect(leaf)?;
    let ca_pem = std::fs::read(&files.ca_cert)
        .map_err(|source| InstallError::File { path: files.ca_cert.clone(), source })?;
    let roots = tls::roots_from_pem(&ca_pem)?;
    let crypto = tls::client_crypto(roots, identity, &[ALPN_TUNNEL])?;
    // Key first, then certificate, each through a temporary file and a rename.
    write_replacing(&files.key, key_pem, true)?;
    write_replacing(&files.cert, cert_pem, false)?;
    let timing = &tunnels.config.timing;
    let mut client = quinn::ClientConfig::new(crypto);
    client.transport_config(transport::agent(timing.keep_alive, timing.idle_timeout, timing.congestion));
    *write(&tunnels.client_config) = client;
    *lock(&tunnels.cert_validity) = (info.not_before_unix, info.not_after_unix);
    Ok(info.not_after_unix)
}

fn write_replacing(path: &Path, contents: &str, private: bool) -> Result<(), InstallError> {
    let tmp = path.with_extension("renewing");
    crate::enroll::write_file(&tmp, contents, private)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|source| InstallError::File { path: path.to_owned(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_due_with_a_third_of_the_lifetime_left() {
        let (start, end) = (1_000, 1_000 + 90 * 86_400);
        assert!(!due(start, end, start));
        assert!(!due(start, end, end - 31 * 86_400));
        assert!(due(start, end, end - 30 * 86_400));
        assert!(due(start, end, end + 1));
        assert_eq!(check_interval(start, end), Duration::from_secs(600));
        assert_eq!(check_interval(0, 12), Duration::from_secs(1));
    }
}
