//! The metric families and their help texts, registered once when the relay starts.

use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use super::{Labels, Metrics};

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
            service_certs: Default::default(),
            relay_cert_not_after: std::sync::atomic::AtomicI64::new(0),
            issuer_cert_not_after: std::sync::atomic::AtomicI64::new(0),
            ready: Gauge::default(),
            replicas_serving: Gauge::default(),
            writer_reachable: Gauge::default(),
            revocations_missing: Gauge::default(),
            access_log_dropped: Counter::default(),
            group_member_state: Family::default(),
            group_member_connections: Family::default(),
            group_members: Family::default(),
            group_members_usable: Family::default(),
            registry,
        };
        m.registry.register(
            "group_member_state",
            "1 for each member (agent) of each service's group in its current state: healthy, unknown (its \
             check has not reported yet), unhealthy, draining or away (no tunnel)",
            m.group_member_state.clone(),
        );
        m.registry.register(
            "group_member_connections",
            "Connections (TCP, HTTPS, HTTP upstream) each member of a service's group carries now",
            m.group_member_connections.clone(),
        );
        m.registry.register("group_members", "Agents in each service's group", m.group_members.clone());
        m.registry.register(
            "group_members_usable",
            "Members of each service's group that take new connections now (0: its clients are refused)",
            m.group_members_usable.clone(),
        );
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
            "access_log_dropped",
            "Access log lines dropped because the log's writer fell behind",
            m.access_log_dropped.clone(),
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
            "When a certificate stops being valid, as Unix time: the relay's own, the intermediate CA it \
             carries (`issuer`), each connected agent's, and each terminated HTTPS service's (`service`)",
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
