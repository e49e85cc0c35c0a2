//! How homelab clients reach agents' services: one file or folder per kind of exposure, and what
//! every listener shares ([`Exposure`]: the connected agents, the global connection cap, the
//! per-address cap).

pub(crate) mod http;
pub(crate) mod https;
pub(crate) mod limits;
pub(crate) mod tcp;
pub(crate) mod udp;

use std::{collections::HashMap, sync::Arc};

use tokio::sync::Semaphore;

use crate::{
    config::{Config, Listen, Service},
    runtime::Runtime,
    tunnel::registry::Registry,
};

/// What every listener shares.
#[derive(Debug)]
pub(crate) struct Exposure {
    pub(crate) config: Arc<Config>,
    pub(crate) runtime: Arc<Runtime>,
    pub(crate) agents: Arc<Registry>,
    /// The relay-wide cap on client connections.
    pub(crate) connections: Arc<Semaphore>,
    /// Connections per client address, across every listener.
    pub(crate) per_ip: Arc<limits::PerIp>,
}

impl Exposure {
    pub(crate) fn new(config: Arc<Config>, runtime: Arc<Runtime>, agents: Arc<Registry>) -> Self {
        Self {
            connections: Arc::new(Semaphore::new(config.limits.max_connections)),
            per_ip: limits::PerIp::new(config.limits.max_connections_per_ip),
            config,
            runtime,
            agents,
        }
    }
}

/// Host names (or TLS server names) to their services.
pub(crate) type Routes = HashMap<String, Arc<Service>>;

/// The names of the HTTP listener (`http`) and of the HTTPS listener (`https`), each to its
/// service.
pub(crate) fn routes(config: &Config) -> (Routes, Routes) {
    let (mut http, mut https) = (Routes::new(), Routes::new());
    for service in config.services.values() {
        let (map, names) = match &service.listen {
            Listen::Http(names) => (&mut http, names),
            Listen::Https(names) => (&mut https, names),
            Listen::Tcp(_) | Listen::Udp(_) => continue,
        };
        let service = Arc::new(service.clone());
        for name in names {
            map.insert(name.clone(), service.clone());
        }
    }
    (http, https)
}
