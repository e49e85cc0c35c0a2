//! Prometheus metrics on the admin port (`/metrics`), all prefixed `sallyport_`. Counters move as
//! traffic flows; gauges about agents and containers are read from the registry at scrape time.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use sallyport_proto::ContainerReport;

mod families;
pub(crate) mod groups;
mod scrape;

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
    /// The word for it in metrics and the access log.
    pub(crate) fn word(self) -> &'static str {
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
    /// The certificates of terminated HTTPS services: name, end of validity (Unix time).
    service_certs: std::sync::Mutex<Vec<(String, i64)>>,
    issuer_cert_not_after: std::sync::atomic::AtomicI64,
    container_state: Family<Labels, Gauge>,
    start_failures: Family<Labels, Counter>,
    cold_start: Family<Labels, Gauge<f64, AtomicU64>>,
    refusals: Family<Labels, Counter>,
    access_log_dropped: Counter,
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
    /// Service groups (set at scrape time by `groups.rs`): each member's state and connections,
    /// each group's members and usable members.
    group_member_state: Family<Labels, Gauge>,
    group_member_connections: Family<Labels, Gauge>,
    group_members: Family<Labels, Gauge>,
    group_members_usable: Family<Labels, Gauge>,
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

    /// An access log line dropped (its writer fell behind).
    pub(crate) fn access_log_dropped(&self) {
        self.access_log_dropped.inc();
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
    pub(crate) fn relay_certificate(&self, not_after_unix: i64, issuer_not_after_unix: Option<i64>) {
        self.relay_cert_not_after.store(not_after_unix, Ordering::Relaxed);
        self.issuer_cert_not_after.store(issuer_not_after_unix.unwrap_or(0), Ordering::Relaxed);
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

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;

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
        assert_eq!(scrape::container_state("stopped (exit 1)"), "stopped");
        assert_eq!(scrape::container_state("pwned"), "other");
    }
}
