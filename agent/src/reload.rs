//! Reloading agent.toml while the agent runs: on a change of the file's content (read every
//! second and compared by hash), on SIGHUP, and on the Windows service's parameter-change control
//! (`sallyport-agent service reload`).
//!
//! The new file is validated whole; one that fails, or that changes what only a restart applies
//! (the relays, the identity, the timers, the Docker engine, which containers are declared), is
//! refused with the file, key and reason, and the running configuration stays. Applied: services
//! added, changed and removed (each new stream is dialed by the configuration in force, so a
//! removed service refuses new streams while open ones finish), offered again on every live
//! tunnel without reconnecting; a changed container spec applies at that container's next start.

use std::sync::Arc;

use sallyport_runtime::{config::ConfigError, live};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::{config::Config, tunnel::Tunnels};

/// Reloads on SIGHUP, on a change of the file and on `trigger`, until `stop` is cancelled (the
/// runtime's one watcher).
pub(crate) async fn watch(tunnels: Arc<Tunnels>, trigger: Arc<Notify>, stop: CancellationToken) {
    let asked = (trigger, "the service's parameter-change control");
    live::watch(&tunnels.config, asked, stop, |why, _| match reload(&tunnels) {
        Ok(message) => {
            info!(why, "{message}");
            true
        }
        Err(e) => {
            let e = live::one_line(&e.to_string());
            error!(why, "configuration not reloaded, the running one stays: {e}");
            false
        }
    })
    .await;
}

/// Reads the file again and applies it, or says why not.
fn reload(tunnels: &Tunnels) -> Result<String, ConfigError> {
    let old = tunnels.config.get();
    let new = Config::load(&old.path)?;
    if new.hash == old.hash {
        return Ok(format!("configuration {} is live (unchanged)", old.hash));
    }
    if let Some(refusal) = old.reload_refusal(&new) {
        return Err(refusal);
    }
    let names = |pick: &dyn Fn(&str) -> bool, of: &Config| -> Vec<String> {
        of.services.keys().filter(|n| pick(n)).cloned().collect()
    };
    let added = names(&|n| !old.services.contains_key(n), &new);
    let removed = names(&|n| !new.services.contains_key(n), &old);
    let changed = names(&|n| old.services.get(n).is_some_and(|s| Some(s) != new.services.get(n)), &new);
    let containers: Vec<String> = new
        .containers
        .iter()
        .filter(|(n, spec)| old.containers.get(*n) != Some(spec))
        .map(|(n, _)| n.clone())
        .collect();
    tunnels.targets.resolve_wsl(&new);
    tunnels.targets.containers.update_specs(new.containers.values().cloned());
    let hash = new.hash.clone();
    tunnels.config.set(Arc::new(new));
    tunnels.offers.send_modify(|generation| *generation += 1);
    Ok(format!(
        "configuration {hash} is live (was {}): services added {added:?}, removed {removed:?}, changed {changed:?}; \
         container specs changed {containers:?} (applied at their next start)",
        old.hash
    ))
}
