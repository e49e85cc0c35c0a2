//! Prometheus metrics on the admin port (`/metrics`), all prefixed `sallyport_`. Counters move as
//! traffic flows; gauges about agents and containers are read from the registry at scrape time.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use sallyport_proto::ContainerReport;
use sallyport_runtime::quic::counted::UdpFigures;

type Labels = Vec<(&'static str, String)>;

/// What the scrape-time gauges show of one connected agent.
#[derive(Debug)]
pub(crate) struct AgentGauges<'a> {
    pub(crate) name: &'a str,
    /// The transport its tunnel runs over.
    pub(crate) transport: sallyport_runtime::link::Transport,
    pub(crate) rtt: std::time::Duration,
    /// Its tunnel's connection and the lanes beside it.
    pub(crate) connections: usize,
    pub(crate) containers: Vec<ContainerReport>,
    /// Failed starts of each container since the agent started.
    pub(crate) start_failures: std::collections::BTreeMap<String, u64>,
    /// When the certificate it connected with stops being valid (Unix time).
    pub(crate) cert_not_after_unix: i64,
}

/// How a client connection ended.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Outcome {
    /// Both directions finished with all their bytes.
    Completed,
    /// Reset on one side or the other (including the agent's refusal to connect the target).
    Reset,
    /// The service's agent was not connected.
    NoAgent,
    /// The tunnel would not carry a new stream.
    StreamFailed,
    /// Nothing moved either way for the service's idle timeout.
    Idle,
    /// The client stopped reading while the tunnel's share of stalled streams was taken.
    Stalled,
}

impl Outcome {
    fn word(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::Reset => "reset",
            Self::NoAgent => "no_agent",
            Self::StreamFailed => "stream_failed",
            Self::Idle => "idle",
            Self::Stalled => "stalled",
        }
    }
}

#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    connections: Family<Labels, Counter>,
    active: Family<Labels, Gauge>,
    bytes: Family<Labels, Counter>,
    handshake_failures: Family<Labels, Counter>,
    agents: Gauge,
    rtt: Family<Labels, Gauge<f64, AtomicU64>>,
    agent_transport: Family<Labels, Gauge>,
    agent_connections: Family<Labels, Gauge>,
    agent_up: Family<Labels, Gauge>,
    cert_expiry: Family<Labels, Gauge>,
    ready: Gauge,
    replicas_serving: Gauge,
    writer_reachable: Gauge,
    revocations_missing: Gauge,
    /// The relay's own certificate's end of validity (Unix time; 0: not known).
    relay_cert_not_after: std::sync::atomic::AtomicI64,
    container_state: Family<Labels, Gauge>,
    start_failures: Family<Labels, Counter>,
    cold_start: Family<Labels, Gauge<f64, AtomicU64>>,
    refusals: Family<Labels, Counter>,
    http_responses: Family<Labels, Counter>,
    udp_datagrams: Family<Labels, Counter>,
    udp_flows: Family<Labels, Gauge>,
    renewals: Family<Labels, Counter>,
    identity_conflicts: Family<Labels, Counter>,
    config: Family<Labels, Gauge>,
    reloads: Family<Labels, Counter>,
    tasks: Gauge,
    udp_datagrams_quic: Family<Labels, Counter>,
    udp_calls: Family<Labels, Counter>,
    udp_offload: Family<Labels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("sallyport");
        let build: Family<Labels, Gauge> = Family::default();
        build.get_or_create(&vec![("version", env!("CARGO_PKG_VERSION").to_owned())]).set(1);
        registry.register("build_info", "The relay's version", build);
        let mut m = Self {
            connections: Family::default(),
            active: Family::default(),
            bytes: Family::default(),
            handshake_failures: Family::default(),
            agents: Gauge::default(),
            rtt: Family::default(),
            agent_transport: Family::default(),
            agent_connections: Family::default(),
            container_state: Family::default(),
            start_failures: Family::default(),
            cold_start: Family::default(),
            refusals: Family::default(),
            http_responses: Family::default(),
            udp_datagrams: Family::default(),
            udp_flows: Family::default(),
            renewals: Family::default(),
            identity_conflicts: Family::default(),
            config: Family::default(),
            reloads: Family::default(),
            tasks: Gauge::default(),
            udp_datagrams_quic: Family::default(),
            udp_calls: Family::default(),
            udp_offload: Family::default(),
            agent_up: Family::default(),
            cert_expiry: Family::default(),
            relay_cert_not_after: std::sync::atomic::AtomicI64::new(0),
            ready: Gauge::default(),
            replicas_serving: Gauge::default(),
            writer_reachable: Gauge::default(),
            revocations_missing: Gauge::default(),
            registry,
        };
        m.registry.register(
            "connections",
            "Client connections by service and how they ended",
            m.connections.clone(),
        );
        m.registry.register(
            "connections_active",
            "Client connections open now, by service",
            m.active.clone(),
        );
        m.registry.register(
            "bytes",
            "Bytes carried by finished connections, by service and direction (up: client to target)",
            m.bytes.clone(),
        );
        m.registry.register(
            "handshake_failures",
            "Agent connections refused before they were admitted, by reason",
            m.handshake_failures.clone(),
        );
        m.registry.register("agents_connected", "Agents with a live tunnel", m.agents.clone());
        m.registry.register(
            "quic_rtt_seconds",
            "Round-trip time of each agent's tunnel (QUIC's smoothed estimate; over TCP, the last HTTP/2 ping)",
            m.rtt.clone(),
        );
        m.registry.register(
            "agent_transport",
            "The transport each agent's tunnel runs over (1 for the one in use): quic, or tcp where UDP does not get out",
            m.agent_transport.clone(),
        );
        m.registry.register(
            "agent_connections",
            "QUIC connections of each agent: its tunnel and the lanes that carry data streams beside it",
            m.agent_connections.clone(),
        );
        m.registry.register(
            "container_state",
            "1 for each agent container's current state",
            m.container_state.clone(),
        );
        m.registry.register(
            "container_start_failures",
            "Failed starts of each agent container since its agent started (the engine refused, the \
             image is missing, ...)",
            m.start_failures.clone(),
        );
        m.registry.register(
            "container_cold_start_seconds",
            "The latest cold start of each agent container",
            m.cold_start.clone(),
        );
        m.registry.register(
            "refusals",
            "Clients and datagrams turned away at a listener, by listener and reason",
            m.refusals.clone(),
        );
        m.registry.register(
            "http_responses",
            "Responses of the HTTP listener, by service and status code",
            m.http_responses.clone(),
        );
        m.registry.register(
            "udp_datagrams",
            "UDP datagrams carried, by service and direction (up: client to target)",
            m.udp_datagrams.clone(),
        );
        m.registry.register("udp_flows", "UDP flows open now, by service", m.udp_flows.clone());
        m.registry.register(
            "identity_conflicts",
            "Sessions refused because the agent already had a live session from another address (a copy of \
             its identity?)",
            m.identity_conflicts.clone(),
        );
        m.registry.register(
            "certificate_renewals",
            "Certificate renewals agents asked for over their tunnels, by result",
            m.renewals.clone(),
        );
        m.registry.register(
            "config_info",
            "The configuration in force: 1 for the SHA-256 (first 12 hex digits) of its file",
            m.config.clone(),
        );
        m.registry.register(
            "config_reloads",
            "Configuration reloads by result (applied, refused, unchanged)",
            m.reloads.clone(),
        );
        m.registry.register("tasks", "The relay's tasks and client connections running now", m.tasks.clone());
        m.registry.register(
            "quic_udp_datagrams",
            "Datagrams the QUIC socket sent and received, by direction",
            m.udp_datagrams_quic.clone(),
        );
        m.registry.register(
            "quic_udp_calls",
            "System calls of the QUIC socket that sent or returned datagrams, by direction: fewer \
             calls than datagrams is segmentation offload (GSO, GRO) at work",
            m.udp_calls.clone(),
        );
        m.registry.register(
            "ready",
            "1 while the relay serves (what /readyz says); 0 while it starts or drains",
            m.ready.clone(),
        );
        m.registry.register(
            "replicas_serving",
            "Relay replicas serving now, as this replica knows them (1 for a relay without [cluster])",
            m.replicas_serving.clone(),
        );
        m.registry.register(
            "writer_reachable",
            "1 while the replica that keeps tokens and revocations answered this replica's last report \
             (always 1 on the writer itself and on a relay without [cluster])",
            m.writer_reachable.clone(),
        );
        m.registry.register(
            "revocations_missing_at_writer",
            "Revocations this replica holds that the writer's last answer lacked (a writer that lost its \
             volume: they go back to it with each report)",
            m.revocations_missing.clone(),
        );
        m.registry.register(
            "agent_up",
            "1 while the agent has a live tunnel; 0 for an agent a service names that has none",
            m.agent_up.clone(),
        );
        m.registry.register(
            "certificate_expiry_timestamp_seconds",
            "When a certificate stops being valid, as Unix time: the relay's own, and each connected agent's",
            m.cert_expiry.clone(),
        );
        m.registry.register(
            "quic_udp_offload_segments",
            "The most datagrams one system call of the QUIC socket carries (1: no offload), by kind",
            m.udp_offload.clone(),
        );
        m
    }
}

impl Metrics {
    /// A client connection of `service` began; the guard counts it while it lives.
    pub(crate) fn connection(&self, service: &str) -> Active<'_> {
        let labels = vec![("service", service.to_owned())];
        self.active.get_or_create(&labels).inc();
        Active { metrics: self, service: service.to_owned(), ended: false }
    }

    /// A client, request or datagram turned away at `listener` (`http`, `https` or a service name).
    pub(crate) fn refused(&self, listener: &str, reason: &'static str) {
        self.refusals
            .get_or_create(&vec![("listener", listener.to_owned()), ("reason", reason.to_owned())])
            .inc();
    }

    /// A response of `service`'s target. A code HTTP does not define is counted as `other`: the
    /// target chooses it, and each code would be a new series.
    pub(crate) fn http_response(&self, service: &str, status: u16) {
        let code = hyper::StatusCode::from_u16(status)
            .ok()
            .filter(|code| code.canonical_reason().is_some())
            .map_or_else(|| "other".to_owned(), |code| code.as_str().to_owned());
        self.http_responses.get_or_create(&vec![("service", service.to_owned()), ("code", code)]).inc();
    }

    pub(crate) fn udp_datagram(&self, service: &str, up: bool) {
        let direction = if up { "up" } else { "down" };
        self.udp_datagrams
            .get_or_create(&vec![("service", service.to_owned()), ("direction", direction.to_owned())])
            .inc();
    }

    pub(crate) fn udp_flows(&self, service: &str, open: usize) {
        self.udp_flows.get_or_create(&vec![("service", service.to_owned())]).set(open as i64);
    }

    /// `hash` is the configuration in force now (the one before, if any, is no longer).
    pub(crate) fn config_live(&self, hash: &str) {
        self.config.clear();
        self.config.get_or_create(&vec![("hash", hash.to_owned())]).set(1);
    }

    pub(crate) fn tasks(&self, running: usize) {
        self.tasks.set(running as i64);
    }

    pub(crate) fn reload(&self, result: &'static str) {
        self.reloads.get_or_create(&vec![("result", result.to_owned())]).inc();
    }

    /// A session of `agent` refused: its identity is live from another address.
    pub(crate) fn identity_conflict(&self, agent: &str) {
        self.identity_conflicts.get_or_create(&vec![("agent", agent.to_owned())]).inc();
    }

    pub(crate) fn renewal(&self, result: &'static str) {
        self.renewals.get_or_create(&vec![("result", result.to_owned())]).inc();
    }

    pub(crate) fn handshake_failed(&self, reason: &'static str) {
        self.handshake_failures.get_or_create(&vec![("reason", reason.to_owned())]).inc();
    }

    /// The exposition text, with agent and container gauges set from `agents` now.
    /// Whether the relay serves now (`/readyz`), for the exposition.
    pub(crate) fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    /// What this replica knows of its cluster: replicas serving, and whether the writer answers.
    pub(crate) fn cluster(&self, serving: usize, writer_reachable: bool) {
        self.replicas_serving.set(i64::try_from(serving).unwrap_or(i64::MAX));
        self.writer_reachable.set(i64::from(writer_reachable));
    }

    /// Revocations of this replica the writer's last answer lacked.
    pub(crate) fn revocations_missing_at_writer(&self, missing: usize) {
        self.revocations_missing.set(i64::try_from(missing).unwrap_or(i64::MAX));
    }

    /// The relay's own certificate's end of validity (set at start).
    pub(crate) fn relay_certificate(&self, not_after_unix: i64) {
        self.relay_cert_not_after.store(not_after_unix, Ordering::Relaxed);
    }

    /// The exposition, with the per-agent figures of `agents` (the connected ones) and an up/down
    /// line for each agent in `named` (the agents the config's services name).
    pub(crate) fn render<'a>(
        &self,
        agents: impl ExactSizeIterator<Item = AgentGauges<'a>>,
        named: &std::collections::BTreeSet<String>,
        udp: UdpFigures,
    ) -> String {
        for (direction, datagrams, calls) in
            [("sent", udp.sent, udp.send_calls), ("received", udp.received, udp.receive_calls)]
        {
            let labels = vec![("direction", direction.to_owned())];
            // The socket's own counters are the source: the exposition shows them as they are.
            self.udp_datagrams_quic.get_or_create(&labels).inner().store(datagrams, Ordering::Relaxed);
            self.udp_calls.get_or_create(&labels).inner().store(calls, Ordering::Relaxed);
        }
        for (kind, segments) in [("gso", udp.gso_segments), ("gro", udp.gro_segments)] {
            self.udp_offload.get_or_create(&vec![("kind", kind.to_owned())]).set(segments as i64);
        }
        self.agents.set(agents.len() as i64);
        self.rtt.clear();
        self.agent_transport.clear();
        self.agent_connections.clear();
        self.container_state.clear();
        self.start_failures.clear();
        self.cold_start.clear();
        self.agent_up.clear();
        self.cert_expiry.clear();
        let relay_cert = self.relay_cert_not_after.load(Ordering::Relaxed);
        if relay_cert != 0 {
            self.cert_expiry.get_or_create(&vec![("certificate", "relay".to_owned())]).set(relay_cert);
        }
        for name in named {
            self.agent_up.get_or_create(&vec![("agent", name.clone())]).set(0);
        }
        for agent in agents {
            let name = agent.name.to_owned();
            self.agent_up.get_or_create(&vec![("agent", name.clone())]).set(1);
            self.cert_expiry
                .get_or_create(&vec![("certificate", "agent".to_owned()), ("agent", name.clone())])
                .set(agent.cert_not_after_unix);
            self.rtt.get_or_create(&vec![("agent", name.clone())]).set(agent.rtt.as_secs_f64());
            self.agent_transport
                .get_or_create(&vec![("agent", name.clone()), ("transport", agent.transport.to_string())])
                .set(1);
            self.agent_connections
                .get_or_create(&vec![("agent", name.clone())])
                .set(agent.connections as i64);
            // What an agent reports is the agent's word: names that are not names, states no agent
            // has, and containers beyond the cap make no series.
            let named = |name: &String| sallyport_proto::is_valid_name(name);
            for (container, failed) in
                agent.start_failures.iter().filter(|(c, _)| named(c)).take(MAX_CONTAINER_SERIES)
            {
                let labels = vec![("agent", name.clone()), ("container", container.clone())];
                self.start_failures.get_or_create(&labels).inc_by(*failed);
            }
            for c in agent.containers.iter().filter(|c| named(&c.name)).take(MAX_CONTAINER_SERIES) {
                let state = container_state(&c.state).to_owned();
                let labels = vec![("agent", name.clone()), ("container", c.name.clone()), ("state", state)];
                self.container_state.get_or_create(&labels).set(1);
                if let Some(ms) = c.cold_start_ms {
                    let labels = vec![("agent", name.clone()), ("container", c.name.clone())];
                    self.cold_start.get_or_create(&labels).set(ms as f64 / 1000.0);
                }
            }
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// Per-service figures for the status page: (active, total, bytes up, bytes down).
    pub(crate) fn service_figures(&self, service: &str) -> (i64, u64, u64, u64) {
        let s = service.to_owned();
        let active = self.active.get_or_create(&vec![("service", s.clone())]).get();
        let total = ["completed", "reset", "no_agent", "stream_failed", "idle"]
            .iter()
            .map(|r| {
                self.connections
                    .get_or_create(&vec![("service", s.clone()), ("result", (*r).to_owned())])
                    .get()
            })
            .sum();
        let up = self.bytes.get_or_create(&vec![("service", s.clone()), ("direction", "up".into())]).get();
        let down = self.bytes.get_or_create(&vec![("service", s), ("direction", "down".into())]).get();
        (active, total, up, down)
    }
}

/// One client connection in the metrics; record how it ended with [`Active::end`].
#[derive(Debug)]
pub(crate) struct Active<'a> {
    metrics: &'a Metrics,
    service: String,
    ended: bool,
}

impl Active<'_> {
    pub(crate) fn end(mut self, outcome: Outcome, up: u64, down: u64) {
        self.record(outcome, up, down);
    }

    fn record(&mut self, outcome: Outcome, up: u64, down: u64) {
        if self.ended {
            return;
        }
        self.ended = true;
        let m = self.metrics;
        let service = self.service.clone();
        m.active.get_or_create(&vec![("service", service.clone())]).dec();
        m.connections
            .get_or_create(&vec![("service", service.clone()), ("result", outcome.word().to_owned())])
            .inc();
        m.bytes.get_or_create(&vec![("service", service.clone()), ("direction", "up".into())]).inc_by(up);
        m.bytes.get_or_create(&vec![("service", service), ("direction", "down".into())]).inc_by(down);
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        // A connection task cancelled at shutdown counts as reset.
        self.record(Outcome::Reset, 0, 0);
    }
}

/// Containers of one agent that `/metrics` shows at most.
const MAX_CONTAINER_SERIES: usize = 64;

/// A reported container state as a label: its first word when it is one the agent has, else
/// `other`.
fn container_state(reported: &str) -> &'static str {
    const STATES: [&str; 6] = ["unknown", "engine-down", "absent", "stopped", "starting", "running"];
    let word = reported.split_whitespace().next().unwrap_or("unknown");
    STATES.into_iter().find(|state| *state == word).unwrap_or("other")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A target chooses its status codes: one HTTP does not define is counted as `other`, so a
    /// target cannot make a series per code.
    #[test]
    fn codes_a_target_makes_up_are_counted_as_other() {
        let metrics = Metrics::default();
        for code in [404, 599, 777, 999] {
            metrics.http_response("web", code);
        }
        let mut out = String::new();
        encode(&mut out, &metrics.registry).expect("encode");
        let series: Vec<&str> = out.lines().filter(|l| l.contains("service=\"web\"")).collect();
        assert!(series.iter().any(|l| l.contains("code=\"404\"")), "{series:?}");
        assert!(series.iter().any(|l| l.contains("code=\"other\"") && l.ends_with(" 3")), "{series:?}");
        assert!(!out.contains("code=\"599\"") && !out.contains("code=\"777\""), "{out}");
        assert_eq!(container_state("stopped (exit 1)"), "stopped");
        assert_eq!(container_state("pwned"), "other");
    }
}
