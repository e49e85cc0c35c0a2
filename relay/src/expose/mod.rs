//! How homelab clients reach agents' services: one file or folder per kind of exposure, and what
//! every listener shares ([`Exposure`]: the connected agents, the global connection cap, the
//! per-address cap, the access log); `gate` says who may reach which service.

pub(crate) mod gate;
pub(crate) mod http;
pub(crate) mod https;
pub(crate) mod limits;
pub(crate) mod listeners;
pub(crate) mod tcp;
pub(crate) mod udp;

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    config::{Config, Listen, Live, Service},
    runtime::Runtime,
    tunnel::{registry::Registry, Handoff},
};

/// What every listener shares.
#[derive(Debug)]
pub(crate) struct Exposure {
    /// The configuration in force (caps and timeouts are read from it for each connection).
    pub(crate) config: Arc<Live>,
    pub(crate) runtime: Arc<Runtime>,
    pub(crate) agents: Arc<Registry>,
    /// Which member of a service's group takes a client.
    pub(crate) groups: Arc<crate::groups::Groups>,
    /// Client connections open across the relay (`relay.max_connections`).
    pub(crate) connections: Arc<limits::Count>,
    /// Connections per client address, across every listener.
    pub(crate) per_ip: Arc<limits::PerIp>,
    /// The access log (or none).
    pub(crate) access_log: crate::access::log::AccessLog,
    /// Each service's rates per client host.
    pub(crate) rates: crate::access::rates::Rates,
    /// The bandwidth caps of services and agents.
    pub(crate) bandwidth: crate::access::bandwidth::Bandwidth,
    /// The certificates of the HTTPS services the relay terminates.
    pub(crate) certs: Arc<crate::certs::Store>,
    /// Where the HTTPS listener hands agents' TCP tunnels (their ClientHello offers the tunnel's
    /// ALPN) when it shares the tunnel's port.
    pub(crate) tunnel_handoff: mpsc::Sender<Handoff>,
}

impl Exposure {
    pub(crate) fn new(
        config: Arc<Live>,
        runtime: Arc<Runtime>,
        (agents, groups, certs): (Arc<Registry>, Arc<crate::groups::Groups>, Arc<crate::certs::Store>),
        tunnel_handoff: mpsc::Sender<Handoff>,
        access_log: crate::access::log::AccessLog,
    ) -> Self {
        Self {
            access_log,
            rates: Default::default(),
            bandwidth: Default::default(),
            connections: Default::default(),
            per_ip: Default::default(),
            config,
            runtime,
            agents,
            groups,
            certs,
            tunnel_handoff,
        }
    }

    /// The bandwidth buckets a new connection (or UDP flow) of `service` carried by `agent`
    /// passes, each way; `None` when neither the service nor the agent has a cap.
    pub(crate) fn pace(&self, service: &Service, agent: &str) -> Option<sallyport_runtime::pace::Pace> {
        let config = self.config.get();
        let access = &config.access;
        self.bandwidth
            .pace((&service.name, access.bandwidth(&service.name)), (agent, access.agent_bandwidth(agent)))
    }

    /// The member of `service`'s group that takes a new connection from `client` now.
    pub(crate) fn pick(&self, service: &Service, client: std::net::IpAddr) -> Option<crate::groups::Picked> {
        self.groups.pick(&self.agents, &self.config.get(), &service.name, client, false)
    }
}

/// A service as the listeners serve it: its definition, and the token that ends its connections
/// when a reload removed or changed it and `drain_grace` has passed.
#[derive(Debug)]
pub(crate) struct Served {
    pub(crate) service: Arc<Service>,
    pub(crate) retired: CancellationToken,
}

impl Served {
    pub(crate) fn new(service: &Service) -> Arc<Self> {
        Arc::new(Self { service: Arc::new(service.clone()), retired: CancellationToken::new() })
    }
}

/// The service a listener of its own serves now (a reload may put a changed definition in).
pub(crate) type Slot = Arc<RwLock<Arc<Served>>>;

/// The service in `slot` now.
pub(crate) fn current(slot: &Slot) -> Arc<Served> {
    sallyport_runtime::sync::read(slot).clone()
}

/// Host names (or TLS server names) to their services.
pub(crate) type Routes = HashMap<String, Arc<Served>>;

/// The routes a shared listener reads for each request or connection; a reload replaces them.
pub(crate) type LiveRoutes = Arc<RwLock<Routes>>;

/// The names of the HTTP listener (`http`) and of the HTTPS listener (`https`), each to its
/// service; a service already served under `old` with the same definition keeps its [`Served`].
pub(crate) fn routes(config: &Config, old: &[&Routes]) -> (Routes, Routes) {
    let (mut http, mut https) = (Routes::new(), Routes::new());
    for service in config.services.values() {
        let (map, names) = match &service.listen {
            Listen::Http(names) => (&mut http, names),
            Listen::Https(names) => (&mut https, names),
            Listen::Tcp(_) | Listen::Udp(_) => continue,
        };
        let served = old
            .iter()
            .flat_map(|routes| routes.values())
            .find(|s| *s.service == *service)
            .cloned()
            .unwrap_or_else(|| Served::new(service));
        for name in names {
            map.insert(name.clone(), served.clone());
        }
    }
    (http, https)
}
