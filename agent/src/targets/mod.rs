//! What a service name means on this machine: the target a data stream is dialed to (TCP, a
//! container, a WSL2 port; with the PROXY v2 header when asked), UDP flows toward UDP targets,
//! and the WSL2 VM address `wsl://` targets resolve to.

pub(crate) mod dial;
pub(crate) mod probe;
pub(crate) mod udp;
pub(crate) mod wsl;

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
};

use crate::{
    config::{Config, Live, Target},
    containers::Containers,
};

/// What the relay's streams and flows are dialed to: the declared services, the containers
/// behind them, and the WSL2 distributions they name.
#[derive(Debug)]
pub(crate) struct Targets {
    /// The configuration in force (a reload replaces it).
    pub(crate) config: Arc<Live>,
    pub(crate) containers: Containers,
    /// The VM address of each WSL distribution a `wsl://` target names.
    wsl: RwLock<BTreeMap<String, Arc<wsl::Resolver>>>,
}

impl Targets {
    pub(crate) fn new(config: Arc<Live>, containers: Containers) -> Self {
        let targets = Self { config, containers, wsl: RwLock::default() };
        targets.resolve_wsl(&targets.config.get());
        targets
    }

    /// The resolver of WSL distribution `distro`, if a `wsl://` target names it.
    pub(crate) fn wsl(&self, distro: &str) -> Option<Arc<wsl::Resolver>> {
        sallyport_runtime::sync::read(&self.wsl).get(distro).cloned()
    }

    /// Adds a resolver for each WSL distribution `config` names that has none yet.
    pub(crate) fn resolve_wsl(&self, config: &Config) {
        let config_dir = config.path.parent().unwrap_or(std::path::Path::new(".")).to_owned();
        let mut wsl = sallyport_runtime::sync::write(&self.wsl);
        for service in config.services.values() {
            if let Target::Wsl { distro, .. } = &service.target {
                wsl.entry(distro.clone())
                    .or_insert_with(|| Arc::new(wsl::Resolver::new(distro, &config_dir)));
            }
        }
    }
}
