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

use sallyport_proto::{codes::close, Command, ContainerReport};
use sallyport_runtime::{code, sync::lock};
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
    /// Failed starts of each of its containers since the agent started, as it last reported them.
    pub start_failures: Arc<Mutex<BTreeMap<String, u64>>>,
    /// Why the agent chose this tunnel's transport, as it said (protocol 5 on; empty before).
    pub transport_why: Arc<Mutex<String>>,
    /// How each checked service fares on the agent, as it last said (protocol 6 on), by service.
    pub health: Arc<Mutex<BTreeMap<String, sallyport_proto::ServiceHealth>>>,
    /// The agent asked to be drained (`sallyport-agent drain` on its host).
    pub drain_asked: Arc<std::sync::atomic::AtomicBool>,
    /// Serial number of the certificate it connected with (hex).
    pub serial: String,
    /// When that certificate was issued, and when it stops being valid (Unix time).
    pub cert_issued_unix: i64,
    pub cert_not_after_unix: i64,
    pub(crate) connection: sallyport_runtime::link::Connection,
    pub(crate) commands: mpsc::Sender<PendingCommand>,
    /// The agent's other connections, which carry data streams beside this one.
    pub(crate) lanes: Arc<Lanes>,
}

impl AgentSession {
    /// The packet size (UDP payload, bytes) path MTU discovery has reached on this tunnel toward the
    /// agent: about 1,452 across Ethernet, more on loopback or with jumbo frames.
    /// `None` over TCP, which segments on its own.
    pub fn path_mtu(&self) -> Option<u16> {
        self.connection.path_mtu()
    }

    /// The transport this tunnel runs over.
    pub fn transport(&self) -> sallyport_runtime::link::Transport {
        self.connection.transport()
    }

    /// The agent's connections to this relay: its tunnel and the lanes beside it.
    pub fn connections(&self) -> usize {
        1 + self.lanes.count()
    }

    /// The connection for the next data stream: the tunnel's own or one of its lanes, in turn.
    pub(crate) fn next_connection(&self) -> sallyport_runtime::link::Connection {
        self.lanes.pick()
    }

    /// The tunnel's own connection (which carries the agent's datagrams).
    pub(crate) fn tunnel(&self) -> &sallyport_runtime::link::Connection {
        &self.connection
    }

    /// Data streams routed so far to each connection (the tunnel's first, then each open lane's).
    pub fn streams_per_connection(&self) -> Vec<u64> {
        self.lanes.streams()
    }
}

/// The lanes of one session: further connections of the same agent (same certificate name) that
/// carry data streams, so an agent's streams are spread over several connections, each driven on
/// its own thread on both sides.
#[derive(Debug)]
pub(crate) struct Lanes {
    /// The tunnel's own connection.
    tunnel: sallyport_runtime::link::Connection,
    open: Mutex<Vec<Lane>>,
    next: AtomicU64,
    /// Data streams routed to the tunnel's own connection.
    tunnel_streams: AtomicU64,
}

#[derive(Debug)]
struct Lane {
    id: u64,
    connection: sallyport_runtime::link::Connection,
    /// Data streams routed to it.
    streams: u64,
}

impl Lanes {
    pub(crate) fn new(tunnel: sallyport_runtime::link::Connection) -> Self {
        Self { tunnel, open: Mutex::default(), next: AtomicU64::new(0), tunnel_streams: AtomicU64::new(0) }
    }

    /// Shares one tunnel's windows among the connections open now: an agent holds no more in
    /// flight at the relay with lanes than without.
    fn share_windows(&self, open: &[Lane]) {
        let n = open.len() + 1;
        sallyport_runtime::link::share_agent_windows(&self.tunnel, n);
        for lane in open {
            sallyport_runtime::link::share_agent_windows(&lane.connection, n);
        }
    }

    /// Lanes open now (the tunnel's own connection not counted).
    pub(crate) fn count(&self) -> usize {
        lock(&self.open).len()
    }

    /// Adds lane `id` unless `max` connections (the tunnel's own included) are open already.
    pub(crate) fn add(&self, id: u64, connection: sallyport_runtime::link::Connection, max: usize) -> bool {
        let mut open = lock(&self.open);
        if open.len() + 1 >= max {
            return false;
        }
        open.push(Lane { id, connection, streams: 0 });
        self.share_windows(&open);
        true
    }

    pub(crate) fn remove(&self, id: u64) {
        let mut open = lock(&self.open);
        open.retain(|lane| lane.id != id);
        self.share_windows(&open);
    }

    /// Closes every lane (the session is over).
    pub(crate) fn close_all(&self, code: quinn::VarInt, reason: &[u8]) {
        for lane in lock(&self.open).drain(..) {
            lane.connection.close(code, reason);
        }
    }

    /// The connection for the next data stream: the tunnel's own and its lanes in turn.
    fn pick(&self) -> sallyport_runtime::link::Connection {
        let mut open = lock(&self.open);
        let turn = self.next.fetch_add(1, Ordering::Relaxed) as usize % (open.len() + 1);
        match turn.checked_sub(1) {
            Some(index) => {
                let lane = &mut open[index];
                lane.streams += 1;
                lane.connection.clone()
            }
            None => {
                self.tunnel_streams.fetch_add(1, Ordering::Relaxed);
                self.tunnel.clone()
            }
        }
    }

    /// Data streams routed so far to the tunnel's connection, then to each open lane.
    fn streams(&self) -> Vec<u64> {
        let open = lock(&self.open);
        std::iter::once(self.tunnel_streams.load(Ordering::Relaxed))
            .chain(open.iter().map(|l| l.streams))
            .collect()
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
        // A random start: session numbers of replicas of one relay do not meet, so a lane that
        // lands on another replica names no session there.
        Self {
            agents: watch::Sender::new(BTreeMap::new()),
            next_id: AtomicU64::new(fastrand::u64(1..1 << 62)),
        }
    }
}

impl Registry {
    /// A receiver that sees every change to the set of connected agents.
    pub fn subscribe(&self) -> watch::Receiver<BTreeMap<String, AgentSession>> {
        self.agents.subscribe()
    }

    /// The transport of `agent`'s tunnel now, if it is connected.
    pub(crate) fn transport_of(&self, agent: &str) -> Option<sallyport_runtime::link::Transport> {
        self.agents.borrow().get(agent).map(AgentSession::transport)
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

    /// The sessions now, for a look over all of them.
    pub(crate) fn sessions(&self) -> Vec<AgentSession> {
        self.agents.borrow().values().cloned().collect()
    }

    /// Removes every session (on shutdown), so their connections are released.
    pub(crate) fn clear(&self) {
        self.agents.send_modify(|agents| {
            for session in agents.values() {
                // QUIC tunnels were closed with the endpoint; tunnels over TCP are told here.
                session.connection.close(code(close::GOING_AWAY), b"relay stopping");
                session.lanes.close_all(code(close::GOING_AWAY), b"relay stopping");
            }
            agents.clear();
        });
    }

    /// Publishes for each connected agent the services it offered that `config` gives it, after a
    /// reload (a service removed from the agent is no longer routed to it; one added is, if the
    /// agent offered it).
    pub(crate) fn republish(&self, config: &crate::config::Config) {
        // An agent no service names any more is no longer admitted: its tunnel and lanes close
        // now (it cannot connect again), rather than living on and renewing its certificate.
        const UNKNOWN: &[u8] = b"no service names this agent any more";
        for session in self.agents.borrow().values().filter(|s| !config.knows_agent(&s.name)) {
            tracing::info!(agent = %session.name, "no service names this agent any more: closing its tunnel");
            session.lanes.close_all(code(close::REFUSED), UNKNOWN);
            session.connection.close(code(close::REFUSED), UNKNOWN);
        }
        self.agents.send_if_modified(|agents| {
            let mut modified = false;
            for session in agents.values_mut() {
                let services: BTreeSet<String> = session
                    .offered
                    .iter()
                    .filter(|name| config.services.contains_key(*name) && config.carries(name, &session.name))
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

    /// Runs `f` over the sessions now (one look, no copy): how a group picks its member.
    pub(crate) fn view<R>(&self, f: impl FnOnce(&BTreeMap<String, AgentSession>) -> R) -> R {
        f(&self.agents.borrow())
    }

    /// Tells the registry's watchers that something of a session changed in place (a member's
    /// health, a drain the agent asked for).
    pub(crate) fn touch(&self) {
        self.agents.send_modify(|_| {});
    }

    /// The lanes of session `id` of `name`, if it is still the agent's session.
    pub(crate) fn lanes_of(&self, name: &str, id: u64) -> Option<Arc<Lanes>> {
        let agents = self.agents.borrow();
        agents.get(name).filter(|s| s.id == id).map(|s| s.lanes.clone())
    }
}
