//! The certificates held, by name, and the resolver rustls asks for each terminated handshake.

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
    time::Duration,
};

use rustls::{
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use sallyport_runtime::sync::{read, write};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::challenges::Challenges;
use crate::config::{certificates::covers, Certificate, Config, Loaded};

/// How often the files are looked at.
pub(crate) const LOOK_EVERY: Duration = Duration::from_secs(2);

/// One certificate as served, and what went wrong with its files since.
#[derive(Debug, Clone)]
pub(crate) struct Held {
    pub(crate) files: Certificate,
    /// `None`: an ACME certificate not issued yet.
    pub(crate) loaded: Option<Loaded>,
    /// Why the files could not be read at the last look, or why the last ACME order failed
    /// (the previous certificate is served).
    pub(crate) error: Option<String>,
}

/// The certificates by their `[certificates.NAME]`, and the ACME challenges being answered.
#[derive(Debug, Default)]
pub(crate) struct Store {
    held: RwLock<BTreeMap<String, Held>>,
    pub(crate) challenges: Challenges,
}

impl Store {
    /// Takes the certificates of a configuration that was just loaded (at start or by a reload).
    pub(crate) fn apply(&self, config: &Config) {
        let mut held = write(&self.held);
        let old = std::mem::take(&mut *held);
        for (name, (files, loaded)) in &config.certificates {
            let fingerprint = |l: &Option<Loaded>| l.as_ref().map(|l| l.fingerprint);
            let kept = old.get(name).filter(|h| {
                h.files == *files && (fingerprint(&h.loaded) == fingerprint(loaded) || loaded.is_none())
            });
            let entry = kept.cloned().unwrap_or_else(|| Held {
                files: files.clone(),
                loaded: loaded.clone(),
                error: None,
            });
            held.insert(name.clone(), entry);
        }
    }

    /// Every certificate held, by name.
    pub(crate) fn list(&self) -> Vec<(String, Held)> {
        read(&self.held).iter().map(|(n, h)| (n.clone(), h.clone())).collect()
    }

    /// The certificate held under `name`, if any.
    pub(crate) fn get(&self, name: &str) -> Option<Held> {
        read(&self.held).get(name).cloned()
    }

    /// Serves `loaded` for `name` at once (a certificate the relay just ordered and wrote).
    pub(crate) fn install(&self, name: &str, loaded: Loaded) {
        if let Some(entry) = write(&self.held).get_mut(name) {
            entry.loaded = Some(loaded);
            entry.error = None;
        }
    }

    /// Records why `name`'s certificate could not be renewed (the old one stays in service).
    pub(crate) fn failed(&self, name: &str, reason: String) {
        if let Some(entry) = write(&self.held).get_mut(name) {
            entry.error = Some(reason);
        }
    }

    /// The certificate for `server_name`: one naming it exactly, else one whose wildcard covers
    /// it; among several, the one valid longest.
    pub(crate) fn pick(&self, server_name: &str) -> Option<Arc<CertifiedKey>> {
        let held = read(&self.held);
        let best = |exact: bool| {
            held.values()
                .filter_map(|h| h.loaded.as_ref())
                .filter(|l| {
                    if exact {
                        l.names.iter().any(|n| n == server_name)
                    } else {
                        covers(&l.names, server_name)
                    }
                })
                .max_by_key(|l| l.not_after_unix)
                .map(|l| l.key.clone())
        };
        best(true).or_else(|| best(false))
    }

    /// Reads every certificate's files again; a changed one replaces what is served, a bad one
    /// is reported and the last good one kept. Returns whether anything changed.
    pub(crate) fn look(&self) -> bool {
        let files: Vec<(String, Certificate, Option<[u8; 32]>)> = read(&self.held)
            .iter()
            .map(|(n, h)| (n.clone(), h.files.clone(), h.loaded.as_ref().map(|l| l.fingerprint)))
            .collect();
        let mut changed = false;
        for (name, files, fingerprint) in files {
            let outcome = match files.fingerprint() {
                Ok(now) if Some(now) == fingerprint => Ok(None),
                Ok(_) => files.load().map(Some),
                // An ACME certificate not written yet is not a problem of its files.
                Err(_) if files.acme.is_some() && fingerprint.is_none() => Ok(None),
                Err(e) => Err(e),
            };
            let mut held = write(&self.held);
            let Some(entry) = held.get_mut(&name).filter(|h| h.files == files) else { continue };
            match outcome {
                Ok(None) => {
                    if files.acme.is_none() && entry.error.take().is_some() {
                        changed = true;
                    }
                }
                Ok(Some(loaded)) => {
                    info!(certificate = %name, names = ?loaded.names, not_after = loaded.not_after_unix, "certificate files changed: serving the new certificate");
                    entry.loaded = Some(loaded);
                    entry.error = None;
                    changed = true;
                }
                Err(reason) => {
                    let reason = reason.to_string();
                    if entry.error.as_deref() != Some(reason.as_str()) {
                        warn!(certificate = %name, %reason, "certificate files cannot be used: the previous certificate stays in service");
                        entry.error = Some(reason);
                        changed = true;
                    }
                }
            }
        }
        changed
    }

    /// Looks at the files every [`LOOK_EVERY`] until `stop`.
    pub(crate) async fn watch(self: Arc<Self>, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(LOOK_EVERY) => {}
                () = stop.cancelled() => return,
            }
            let store = self.clone();
            // Reading and parsing files is blocking work.
            let _ = tokio::task::spawn_blocking(move || store.look()).await;
        }
    }
}

/// rustls asks this for the certificate of each terminated connection.
#[derive(Debug)]
pub(crate) struct Resolver(pub(crate) Arc<Store>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name()?.to_ascii_lowercase();
        self.0.pick(&name)
    }
}
