//! What a service name means on this machine: the target a data stream is dialed to (TCP, a
//! container, a WSL2 port; with the PROXY v2 header when asked), UDP flows toward UDP targets,
//! and the WSL2 VM address `wsl://` targets resolve to.

pub(crate) mod dial;
pub(crate) mod udp;
pub(crate) mod wsl;

use std::{collections::BTreeMap, sync::Arc};

use crate::{
    config::{Config, Target},
    containers::Containers,
};

/// What the relay's streams and flows are dialed to: the declared services, the containers
/// behind them, and the WSL2 distributions they name.
#[derive(Debug)]
pub(crate) struct Targets {
    pub(crate) config: Arc<Config>,
    pub(crate) containers: Containers,
    /// The VM address of each WSL distribution a `wsl://` target names.
    pub(crate) wsl: BTreeMap<String, wsl::Resolver>,
}

impl Targets {
    pub(crate) fn new(config: Arc<Config>, containers: Containers) -> Self {
        let config_dir = config.path.parent().unwrap_or(std::path::Path::new(".")).to_owned();
        let wsl = config
            .services
            .values()
            .filter_map(|s| match &s.target {
                Target::Wsl { distro, .. } => Some((distro.clone(), wsl::Resolver::new(distro, &config_dir))),
                _ => None,
            })
            .collect();
        Self { config, containers, wsl }
    }
}
