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

use std::{sync::Arc, time::Duration};

use sallyport_runtime::{
    config::ConfigError,
    live::{self, Hangups},
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::{config::Config, tunnel::Tunnels};

const POLL: Duration = Duration::from_secs(1);

/// Reloads on SIGHUP, on a change of the file and on `trigger`, until `stop` is cancelled.
pub(crate) async fn watch(tunnels: Arc<Tunnels>, trigger: Arc<Notify>, stop: CancellationToken) {
    let mut hangups = Hangups::new();
    let mut poll = tokio::time::interval(POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut refused: Option<String> = None;
    loop {
        let why = tokio::select! {
            () = hangups.next() => "SIGHUP",
            () = trigger.notified() => "the service's parameter-change control",
            _ = poll.tick() => {
                let live = tunnels.config.get();
                let Ok(bytes) = std::fs::read(&live.path) else { continue };
                let hash = live::hash(&bytes);
                if hash == live.hash || refused.as_deref() == Some(hash.as_str()) {
                    continue;
                }
                refused = Some(hash);
                "the file changed"
            }
            () = stop.cancelled() => return,
        };
        match reload(&tunnels) {
            Ok(message) => {
                refused = None;
                info!(why, "{message}");
            }
            Err(e) => {
                let e = live::one_line(&e.to_string());
                error!(why, "configuration not reloaded, the running one stays: {e}");
            }
        }
    }
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
