//! The agents connected right now, shared by the tunnel side (which adds and removes them) and the
//! service listeners (which route client connections to them).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::SystemTime,
};

use sallyport_proto::{Command, ContainerReport};
use tokio::sync::{mpsc, oneshot, watch};

/// One live tunnel connection of an agent.
#[derive(Debug, Clone)]
pub struct AgentSession {
    /// Distinguishes successive connections of the same agent.
    pub id: u64,
    pub name: String,
    pub remote: SocketAddr,
    pub software: String,
    pub version: u16,
    /// The services the relay routes to this connection.
    pub services: BTreeSet<String>,
    /// The services the agent offered in its `Hello` (a reload may publish more of them).
    pub offered: BTreeSet<String>,
    pub connected_at: SystemTime,
    /// The agent's containers as it last reported them.
    pub containers: Arc<Mutex<Vec<ContainerReport>>>,
    /// Serial number of the certificate it connected with (hex).
    pub serial: String,
    pub(crate) connection: quinn::Connection,
    pub(crate) commands: mpsc::Sender<PendingCommand>,
}

impl AgentSession {
    /// The packet size (UDP payload, bytes) path MTU discovery has reached on this tunnel toward the
    /// agent: about 1,452 across Ethernet, more on loopback or with jumbo frames.
    pub fn path_mtu(&self) -> u16 {
        self.connection.stats().path.current_mtu
    }
}

/// A command on its way to an agent, and where its result goes.
#[derive(Debug)]
pub(crate) struct PendingCommand {
    pub command: Command,
    pub reply: oneshot::Sender<Result<String, String>>,
}

/// Connected agents by name. A watch channel, so tests and the admin side can wait for changes.
#[derive(Debug)]
pub struct Registry {
    agents: watch::Sender<BTreeMap<String, AgentSession>>,
    next_id: AtomicU64,
}

impl Default for Registry {
    fn default() -> Self {
        Self { agents: watch::Sender::new(BTreeMap::new()), next_id: AtomicU64::new(1) }
    }
}

impl Registry {
    /// A receiver that sees every change to the set of connected agents.
    pub fn subscribe(&self) -> watch::Receiver<BTreeMap<String, AgentSession>> {
        self.agents.subscribe()
    }

    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers a session and returns the one it replaces, if any.
    pub(crate) fn insert(&self, session: AgentSession) -> Option<AgentSession> {
        let mut replaced = None;
        self.agents.send_modify(|agents| replaced = agents.insert(session.name.clone(), session));
        replaced
    }

    /// Removes the session `id` of `name`, unless a newer one has taken its place.
    pub(crate) fn remove(&self, name: &str, id: u64) {
        self.agents.send_if_modified(|agents| {
            if agents.get(name).is_some_and(|s| s.id == id) {
                agents.remove(name);
                true
            } else {
                false
            }
        });
    }

    /// Removes every session (on shutdown), so their connections are released.
    pub(crate) fn clear(&self) {
        self.agents.send_modify(BTreeMap::clear);
    }

    /// Publishes for each connected agent the services it offered that `config` gives it, after a
    /// reload (a service removed from the agent is no longer routed to it; one added is, if the
    /// agent offered it).
    pub(crate) fn republish(&self, config: &crate::config::Config) {
        self.agents.send_if_modified(|agents| {
            let mut modified = false;
            for session in agents.values_mut() {
                let services: BTreeSet<String> = session
                    .offered
                    .iter()
                    .filter(|name| config.services.get(*name).is_some_and(|s| s.agent == session.name))
                    .cloned()
                    .collect();
                if services != session.services {
                    tracing::info!(agent = %session.name, ?services, "services published to the agent after a reload");
                    session.services = services;
                    modified = true;
                }
            }
            modified
        });
    }

    /// Session `id` of `name` offers `offered` now, of which the relay publishes `services`.
    pub(crate) fn reoffer(&self, name: &str, id: u64, offered: BTreeSet<String>, services: BTreeSet<String>) {
        self.agents.send_if_modified(|agents| match agents.get_mut(name) {
            Some(session) if session.id == id => {
                session.offered = offered;
                session.services = services;
                true
            }
            _ => false,
        });
    }

    /// The connection that carries `service` of `agent`, if that agent is connected and offers it.
    pub(crate) fn route(&self, agent: &str, service: &str) -> Option<quinn::Connection> {
        let agents = self.agents.borrow();
        let session = agents.get(agent)?;
        session.services.contains(service).then(|| session.connection.clone())
    }
}
