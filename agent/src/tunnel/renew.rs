//! Certificate renewal over the tunnel: when a third of the certificate's lifetime is left, the
//! agent makes a new key, sends a CSR on the control stream, and on the relay's answer writes the
//! new key and certificate over the old ones and uses them for every new connection. Tunnels that
//! are up stay up.

use std::{
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant},
};

use sallyport_proto::{AgentMessage, ALPN_TUNNEL};
use sallyport_runtime::{
    clock,
    durable::sync_parent_dir,
    sync::lock,
    tls::{self, TlsFiles},
};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::connect::{Credentials, Dialer, Timers};
use crate::{
    config::Config,
    events::id::{CERTIFICATE_RENEWED, RENEWAL_FAILED},
};

/// The certificate's validity, and the renewal request in flight. Its `Debug` leaves the key out.
pub(crate) struct Renewal {
    /// Validity of the current certificate (seconds since the epoch): renewal is due when a third
    /// of it is left.
    validity: Mutex<(i64, i64)>,
    /// The key of a renewal request in flight and when it was sent, until its certificate arrives.
    key: Mutex<Option<(String, Instant)>>,
}

impl std::fmt::Debug for Renewal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let in_flight = lock(&self.key).as_ref().map(|(_, sent)| sent.elapsed());
        f.debug_struct("Renewal")
            .field("validity", &*lock(&self.validity))
            .field("request_in_flight_for", &in_flight)
            .finish()
    }
}

impl Renewal {
    /// For a certificate valid from `not_before` to `not_after`.
    pub(crate) fn new((not_before, not_after): (i64, i64)) -> Self {
        Self { validity: Mutex::new((not_before, not_after)), key: Mutex::new(None) }
    }
}

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
pub(crate) async fn when_due(tx: &mpsc::Sender<AgentMessage>, renewal: &Renewal) {
    loop {
        let (not_before, not_after) = *lock(&renewal.validity);
        tokio::time::sleep(check_interval(not_before, not_after)).await;
        let (not_before, not_after) = *lock(&renewal.validity);
        if !due(not_before, not_after, now_unix()) {
            continue;
        }
        let Some(csr_pem) = start_request(renewal) else { continue };
        info!(expires_in_s = not_after - now_unix(), "renewing the agent certificate");
        if tx.send(AgentMessage::Renew { csr_pem }).await.is_err() {
            *lock(&renewal.key) = None;
            return;
        }
    }
}

/// Makes a key and its CSR and records the key as in flight; `None` if a request is already in
/// flight (one at a time across all tunnels) or the request cannot be made.
fn start_request(renewal: &Renewal) -> Option<String> {
    let mut pending = lock(&renewal.key);
    // An answer lost with its tunnel is given up on after a minute.
    if pending.as_ref().is_some_and(|(_, sent)| sent.elapsed() < Duration::from_secs(60)) {
        return None;
    }
    // A request whose answer was lost asks again for the same key: the relay renews a
    // certificate once, for one key (a copy of the old key cannot renew it again).
    let key = match pending.as_ref() {
        Some((key_pem, _)) => rcgen::KeyPair::from_pem(key_pem),
        None => rcgen::KeyPair::generate(),
    };
    let request = key.and_then(|key| {
        let csr = rcgen::CertificateParams::new(Vec::<String>::new())?.serialize_request(&key)?.pem()?;
        Ok((key.serialize_pem(), csr))
    });
    match request {
        Ok((key_pem, csr_pem)) => {
            *pending = Some((key_pem, Instant::now()));
            Some(csr_pem)
        }
        Err(e) => {
            warn!(event_id = RENEWAL_FAILED, error = %e, "cannot make a renewal request");
            None
        }
    }
}

/// Takes the relay's answer: on success the new key and certificate replace the old files and
/// the client configuration of new connections.
pub(crate) fn apply(
    result: Result<String, String>,
    renewal: &Renewal,
    credentials: &Credentials,
    config: &Config,
) {
    let key_pem = lock(&renewal.key).take().map(|(key, _)| key);
    let (cert_pem, key_pem) = match (result, key_pem) {
        (Ok(cert), Some(key)) => (cert, key),
        (Ok(_), None) => return warn!("a renewed certificate arrived with no request in flight"),
        (Err(reason), _) => {
            return warn!(event_id = RENEWAL_FAILED, %reason, "the relay did not renew the agent certificate")
        }
    };
    match install(&cert_pem, &key_pem, config) {
        Ok((dialer, validity)) => {
            credentials.replace(dialer);
            *lock(&renewal.validity) = validity;
            info!(event_id = CERTIFICATE_RENEWED, not_after_unix = validity.1, "agent certificate renewed")
        }
        Err(e) => warn!(event_id = RENEWAL_FAILED, error = %e, "cannot install the renewed certificate"),
    }
}

fn install(cert_pem: &str, key_pem: &str, config: &Config) -> Result<(Dialer, (i64, i64)), InstallError> {
    let files = &config.agent.tls();
    let identity = tls::Identity::from_pem(cert_pem.as_bytes(), key_pem.as_bytes())?;
    let leaf = identity.chain.first().ok_or(InstallError::Empty)?;
    let info = tls::inspect(leaf)?;
    let ca_pem = std::fs::read(&files.ca_cert)
        .map_err(|source| InstallError::File { path: files.ca_cert.clone(), source })?;
    let roots = tls::roots_from_pem(&ca_pem)?;
    let dialer =
        Dialer::new(tls::client_rustls(roots, identity, &[ALPN_TUNNEL])?, Timers::from(&config.agent))?;
    swap_identity(files, key_pem, cert_pem)
        .map_err(|source| InstallError::File { path: files.cert.clone(), source })?;
    Ok((dialer, (info.not_before_unix, info.not_after_unix)))
}

/// `agent.key.renewing`, `agent.crt.partial`, `agent.crt.renewing` beside the identity files.
fn staged(path: &Path, stage: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".");
    name.push(stage);
    path.with_file_name(name)
}

/// Replaces the key and the certificate as one: a crash at any point leaves the old pair or the
/// new one once [`recover_identity`] has run (the agent runs it before loading its identity).
///
/// The new key is staged, then the new certificate; the certificate's rename to
/// `agent.crt.renewing` commits the swap, and both are then renamed into place.
pub(crate) fn swap_identity(files: &TlsFiles, key_pem: &str, cert_pem: &str) -> std::io::Result<()> {
    let (key_staged, cert_partial, cert_staged) =
        (staged(&files.key, "renewing"), staged(&files.cert, "partial"), staged(&files.cert, "renewing"));
    crate::files::write_file(&key_staged, key_pem, true)?;
    crate::files::write_file(&cert_partial, cert_pem, false)?;
    std::fs::rename(&cert_partial, &cert_staged)?;
    sync_parent_dir(&files.cert)?;
    roll_forward(files)
}

/// Finishes a committed swap.
fn roll_forward(files: &TlsFiles) -> std::io::Result<()> {
    let (key_staged, cert_staged) = (staged(&files.key, "renewing"), staged(&files.cert, "renewing"));
    if key_staged.exists() {
        std::fs::rename(&key_staged, &files.key)?;
    }
    std::fs::rename(&cert_staged, &files.cert)?;
    sync_parent_dir(&files.key)?;
    sync_parent_dir(&files.cert)
}

/// What [`recover_identity`] found of a renewal a crash interrupted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Recovered {
    /// No renewal was under way.
    Nothing,
    /// The swap was committed: the new key and certificate are now in place.
    Finished,
    /// The swap was not committed: the staged files are gone and the old pair stays.
    Abandoned,
}

/// Completes or undoes a renewal that a crash interrupted, so the key and the certificate always
/// belong together.
pub(crate) fn recover_identity(files: &TlsFiles) -> std::io::Result<Recovered> {
    if staged(&files.cert, "renewing").exists() {
        roll_forward(files)?;
        return Ok(Recovered::Finished);
    }
    let mut abandoned = false;
    for stale in [staged(&files.key, "renewing"), staged(&files.cert, "partial")] {
        if stale.exists() {
            std::fs::remove_file(&stale)?;
            abandoned = true;
        }
    }
    Ok(if abandoned { Recovered::Abandoned } else { Recovered::Nothing })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A crash after each step of a swap leaves, after recovery, either the old pair or the new.
    #[test]
    fn a_crash_at_any_step_of_a_swap_leaves_a_matching_pair() {
        let steps = ["staged key", "partial certificate", "committed", "key in place", "done"];
        for (crash_after, step) in steps.iter().enumerate() {
            let dir = tempfile::tempdir().expect("tempdir");
            let files = TlsFiles {
                ca_cert: dir.path().join("ca.crt"),
                cert: dir.path().join("agent.crt"),
                key: dir.path().join("agent.key"),
            };
            std::fs::write(&files.key, "old key").expect("key");
            std::fs::write(&files.cert, "old cert").expect("cert");
            // The swap, step by step, stopping where the crash hits.
            let run = |n: usize| -> std::io::Result<()> {
                let ops: [&dyn Fn() -> std::io::Result<()>; 5] = [
                    &|| crate::files::write_file(&staged(&files.key, "renewing"), "new key", true),
                    &|| crate::files::write_file(&staged(&files.cert, "partial"), "new cert", false),
                    &|| std::fs::rename(staged(&files.cert, "partial"), staged(&files.cert, "renewing")),
                    &|| std::fs::rename(staged(&files.key, "renewing"), &files.key),
                    &|| std::fs::rename(staged(&files.cert, "renewing"), &files.cert),
                ];
                ops.iter().take(n + 1).try_for_each(|op| op())
            };
            run(crash_after).expect("steps");
            let recovered = recover_identity(&files).expect("recover");
            let key = std::fs::read_to_string(&files.key).expect("key");
            let cert = std::fs::read_to_string(&files.cert).expect("cert");
            let pair = (key.trim_end_matches(" key").to_owned(), cert.trim_end_matches(" cert").to_owned());
            let expected = if crash_after >= 2 { "new" } else { "old" };
            assert_eq!(pair, (expected.to_owned(), expected.to_owned()), "crash after {step}: {recovered:?}");
            let left: Vec<_> =
                std::fs::read_dir(dir.path()).expect("dir").flatten().map(|e| e.file_name()).collect();
            assert_eq!(left.len(), 2, "crash after {step}: no staged file is left: {left:?}");
        }
        // The real thing, uninterrupted.
        let dir = tempfile::tempdir().expect("tempdir");
        let files = TlsFiles {
            ca_cert: dir.path().join("ca"),
            cert: dir.path().join("c"),
            key: dir.path().join("k"),
        };
        swap_identity(&files, "K", "C").expect("swap");
        assert_eq!(recover_identity(&files).expect("recover"), Recovered::Nothing);
        assert_eq!(std::fs::read_to_string(&files.key).expect("key"), "K");
    }

    /// A renewal in flight holds a private key: a debug print of the state never shows it.
    #[test]
    fn the_key_in_flight_stays_out_of_debug_prints() {
        let renewal = Renewal::new((0, 90 * 86_400));
        let csr = start_request(&renewal).expect("a request");
        assert!(csr.contains("CERTIFICATE REQUEST"));
        let printed = format!("{renewal:?}");
        assert!(
            !printed.contains("PRIVATE KEY") && printed.contains("request_in_flight_for: Some"),
            "{printed}"
        );
    }

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
