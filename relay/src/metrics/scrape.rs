//! The gauges read at scrape time: agents, their tunnels, containers and certificates.

use std::sync::atomic::Ordering;

use prometheus_client::encoding::text::encode;
use sallyport_runtime::quic::counted::UdpFigures;

use super::{AgentGauges, Metrics, MAX_CONTAINER_SERIES};

impl Metrics {
    /// The certificates of terminated HTTPS services the next exposition shows.
    pub(crate) fn service_certificates(&self, certificates: Vec<(String, i64)>) {
        *sallyport_runtime::sync::lock(&self.service_certs) = certificates;
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
        let issuer_cert = self.issuer_cert_not_after.load(Ordering::Relaxed);
        if issuer_cert != 0 {
            self.cert_expiry.get_or_create(&vec![("certificate", "issuer".to_owned())]).set(issuer_cert);
        }
        for (name, not_after) in sallyport_runtime::sync::lock(&self.service_certs).iter() {
            let labels = vec![("certificate", "service".to_owned()), ("name", name.clone())];
            self.cert_expiry.get_or_create(&labels).set(*not_after);
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
}

/// A reported container state as a label: its first word when it is one the agent has, else
/// `other`.
pub(super) fn container_state(reported: &str) -> &'static str {
    const STATES: [&str; 6] = ["unknown", "engine-down", "absent", "stopped", "starting", "running"];
    let word = reported.split_whitespace().next().unwrap_or("unknown");
    STATES.into_iter().find(|state| *state == word).unwrap_or("other")
}
