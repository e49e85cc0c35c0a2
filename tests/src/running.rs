//! Relay and agent running as libraries inside the test process.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use sallyport_agent::{Agent, TunnelStatus};
use sallyport_relay::{AgentSession, Relay};
use tokio::{sync::watch, task::JoinHandle};
use tokio_util::sync::CancellationToken;

/// How long a test waits for a state change before failing.
pub const WAIT: Duration = Duration::from_secs(15);

#[derive(Debug)]
pub struct RunningRelay {
    pub quic: SocketAddr,
    pub admin: SocketAddr,
    pub services: BTreeMap<String, SocketAddr>,
    /// The HTTP (by Host) and HTTPS (by SNI) listeners, when configured.
    pub http: Option<SocketAddr>,
    pub https: Option<SocketAddr>,
    /// Where agents reach the tunnel over TCP.
    pub tcp: Option<SocketAddr>,
    agents: watch::Receiver<BTreeMap<String, AgentSession>>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl RunningRelay {
    pub async fn start(config: sallyport_relay::Config) -> Self {
        // A relay restarted in the same process may find its old UDP socket still open for a
        // moment: quinn's endpoint driver drops it on its next poll after the last handle goes.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let relay = loop {
            match Relay::bind(config.clone()).await {
                Ok(relay) => break relay,
                Err(sallyport_relay::StartError::Bind { source, .. })
                    if source.kind() == std::io::ErrorKind::AddrInUse
                        && std::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => panic!("relay binds: {e}"),
            }
        };
        let (quic, admin, services, agents) =
            (relay.quic_addr(), relay.admin_addr(), relay.service_addrs(), relay.agents());
        let (http, https, tcp) = (relay.http_addr(), relay.https_addr(), relay.tcp_addr());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(relay.run(shutdown.clone()));
        Self { quic, admin, services, http, https, tcp, agents, shutdown, task }
    }

    /// A relay with `extra` in its `[relay]` table and `services`, and agent `winbox` with
    /// `targets`, connected.
    pub async fn with_winbox(
        pki: &crate::TestPki,
        extra: &str,
        services: &str,
        targets: &str,
    ) -> (Self, RunningAgent) {
        let mut relay = Self::start(pki.relay_config_toml(extra, services)).await;
        let agent = RunningAgent::start(pki.agent_config_toml("winbox", &[relay.quic], "", targets));
        relay.wait_agent("winbox").await;
        (relay, agent)
    }

    /// `GET /metrics` on the relay's admin server (asserted to answer 200).
    pub async fn metrics(&self) -> String {
        let (status, body) = sallyport_relay::cli::admin_client::request(self.admin, "GET", "/metrics", None)
            .await
            .expect("metrics");
        assert_eq!(status, 200, "{body}");
        body
    }

    /// The listener address of `service`.
    pub fn service(&self, service: &str) -> SocketAddr {
        self.services[service]
    }

    /// Waits until `agent` is connected (and so its services routable).
    pub async fn wait_agent(&mut self, agent: &str) {
        tokio::time::timeout(WAIT, self.agents.wait_for(|a| a.contains_key(agent)))
            .await
            .unwrap_or_else(|_| panic!("agent {agent} did not connect within {WAIT:?}"))
            .expect("relay running");
    }

    /// Waits until `agent` is no longer connected.
    pub async fn wait_agent_gone(&mut self, agent: &str) {
        tokio::time::timeout(WAIT, self.agents.wait_for(|a| !a.contains_key(agent)))
            .await
            .unwrap_or_else(|_| panic!("agent {agent} still connected after {WAIT:?}"))
            .expect("relay running");
    }

    /// The id of `agent`'s current tunnel (a new one after every reconnect).
    pub fn session_id(&self, agent: &str) -> Option<u64> {
        self.agents.borrow().get(agent).map(|s| s.id)
    }

    /// The packet size path MTU discovery has reached on `agent`'s tunnel, if it is connected.
    /// The transport `agent`'s tunnel runs over, and why the agent said it chose it.
    pub fn transport(&self, agent: &str) -> Option<(sallyport_runtime::link::Transport, String)> {
        self.agents
            .borrow()
            .get(agent)
            .map(|s| (s.transport(), s.transport_why.lock().map(|w| w.clone()).unwrap_or_default()))
    }

    pub fn path_mtu(&self, agent: &str) -> Option<u16> {
        self.agents.borrow().get(agent).and_then(|s| s.path_mtu())
    }

    /// How many connections `agent` holds to this relay (its tunnel and its lanes), if connected.
    pub fn connections(&self, agent: &str) -> Option<usize> {
        self.agents.borrow().get(agent).map(AgentSession::connections)
    }

    /// Data streams routed so far to each of `agent`'s connections (the tunnel's first).
    pub fn streams_per_connection(&self, agent: &str) -> Vec<u64> {
        self.agents.borrow().get(agent).map(AgentSession::streams_per_connection).unwrap_or_default()
    }

    /// Waits until `agent` holds `n` connections; returns how long that took.
    pub async fn wait_connections(&self, agent: &str, n: usize) -> Duration {
        let started = std::time::Instant::now();
        while self.connections(agent) != Some(n) {
            assert!(
                started.elapsed() < WAIT,
                "agent {agent} holds {:?} connections, not {n}",
                self.connections(agent)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        started.elapsed()
    }

    /// The relay's registry of connected agents, to wait on.
    pub fn agents(&self) -> watch::Receiver<BTreeMap<String, AgentSession>> {
        self.agents.clone()
    }

    pub fn connected(&self) -> Vec<String> {
        self.agents.borrow().keys().cloned().collect()
    }

    /// Starts the drain and returns at once.
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Drains and waits for the relay to stop.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .expect("relay stops")
            .expect("relay task");
    }
}

#[derive(Debug)]
pub struct RunningAgent {
    pub status: watch::Receiver<BTreeMap<String, TunnelStatus>>,
    pub containers: sallyport_agent::Containers,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl RunningAgent {
    pub fn start(config: sallyport_agent::Config) -> Self {
        let agent = Agent::new(config).expect("agent identity loads");
        let status = agent.status();
        let containers = agent.containers();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(agent.run(shutdown.clone()));
        Self { status, containers, shutdown, task }
    }

    /// Waits until one of the agent's tunnels is up; panics after `within`.
    pub async fn wait_connected(&self, within: Duration) {
        let mut status = self.status.clone();
        tokio::time::timeout(
            within,
            status.wait_for(|s| s.values().any(|t| matches!(t, TunnelStatus::Connected { .. }))),
        )
        .await
        .unwrap_or_else(|_| panic!("the agent did not connect within {within:?}"))
        .expect("agent running");
    }

    /// The transport of the first tunnel that is up, and why it was chosen.
    pub fn transport(&self) -> Option<(sallyport_runtime::link::Transport, String)> {
        self.status.borrow().values().find_map(|t| match t {
            TunnelStatus::Connected { transport, why, .. } => Some((*transport, why.clone())),
            _ => None,
        })
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("agent stops")
            .expect("agent task");
    }
}
