//! Reloading relay.toml while the relay runs: on SIGHUP, when the file's content changes, and on
//! `POST /reload` (`sallyport-relay reload`).
//!
//! The file is read whole every second and compared by hash with the configuration in force, so
//! an in-place edit, an editor's rename and a Kubernetes ConfigMap update (an atomic swap of the
//! `..data` symlink in the mounted folder) are all seen. A new configuration is validated whole,
//! its new listeners bound, and only then applied; anything wrong (a bad key, an address taken, a
//! key that only a restart may change) leaves the running configuration as it was, with the
//! error naming the file, the key and the reason.

use std::sync::Arc;

use sallyport_runtime::live;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::{
    config::{Config, Live},
    expose::listeners::{BindError, Listeners, Sockets},
    runtime::Runtime,
    tunnel::registry::Registry,
};

/// A reload asked for through the admin API; the answer says what happened.
pub(crate) type Request = oneshot::Sender<Result<String, ReloadError>>;

/// Why a configuration was not applied (the running one stays).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReloadError {
    /// The file does not load, or changes a key only a restart may change.
    #[error(transparent)]
    Config(#[from] sallyport_runtime::config::ConfigError),
    /// A listener it adds cannot be bound.
    #[error("{}: {source}", path.display())]
    Bind { path: std::path::PathBuf, source: BindError },
}

/// What a reload works on.
#[derive(Debug)]
pub(crate) struct Reloader {
    pub(crate) live: Arc<Live>,
    pub(crate) listeners: Listeners,
    pub(crate) registry: Arc<Registry>,
    pub(crate) runtime: Arc<Runtime>,
}

impl Reloader {
    /// Reads the file again and applies it, or says why not.
    pub(crate) fn reload(&mut self, why: &str) -> Result<String, ReloadError> {
        let old = self.live.get();
        let result = self.try_reload(&old);
        match &result {
            Ok(Some(message)) => {
                self.runtime.metrics.reload("applied");
                info!(why, "{message}");
            }
            Ok(None) => self.runtime.metrics.reload("unchanged"),
            Err(e) => {
                self.runtime.metrics.reload("refused");
                let e = live::one_line(&e.to_string());
                error!(why, hash = %old.hash, "configuration not reloaded, the running one stays: {e}");
            }
        }
        result.map(|m| m.unwrap_or_else(|| format!("configuration {} is live (unchanged)", old.hash)))
    }

    fn try_reload(&mut self, old: &Config) -> Result<Option<String>, ReloadError> {
        let mut new = Config::load(&old.path)?;
        // The replica's name given at start (`serve --replica`) stays.
        if let (Some(cluster), Some(running)) = (&mut new.cluster, &old.cluster) {
            if cluster.replica.is_empty() {
                cluster.replica.clone_from(&running.replica);
            }
        }
        if new.hash == old.hash {
            return Ok(None);
        }
        if let Some(refusal) = old.reload_refusal(&new) {
            return Err(refusal.into());
        }
        let sockets = Sockets::bind(&new, Some(&self.listeners))
            .map_err(|source| ReloadError::Bind { path: new.path.clone(), source })?;
        let new = Arc::new(new);
        self.live.set(new.clone());
        let changes = self.listeners.apply(&new, sockets);
        self.registry.republish(&new);
        self.runtime.metrics.config_live(&new.hash);
        Ok(Some(format!(
            "configuration {} is live (was {}): services added {:?}, removed {:?}, changed {:?}",
            new.hash, old.hash, changes.added, changes.removed, changes.changed
        )))
    }
}

/// Reloads on SIGHUP, on a change of the file and on `requests`, until `stop` is cancelled (the
/// runtime's one watcher).
pub(crate) async fn watch(
    mut reloader: Reloader,
    requests: mpsc::Receiver<Request>,
    stop: CancellationToken,
) {
    let live = reloader.live.clone();
    let current = live.get();
    reloader.runtime.metrics.config_live(&current.hash);
    info!(hash = %current.hash, path = %current.path.display(), "configuration live");
    drop(current);
    live::watch(&live, (requests, "asked through the admin API"), stop, |why, reply| {
        let result = reloader.reload(why);
        let taken = result.is_ok();
        if let Some(reply) = reply {
            let _ = reply.send(result);
        }
        taken
    })
    .await;
}
