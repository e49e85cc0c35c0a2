//! `[relay]` timeouts and caps: their defaults and their bounds, in one place.

use std::time::Duration;

use sallyport_runtime::{
    config::{self as conf, ConfigError},
    transport::Congestion,
};

use super::RawRelay;

/// Timeouts and caps.
#[derive(Debug, Clone)]
pub struct Limits {
    /// A tunnel with no traffic (not even keep-alives) for this long is dead.
    pub idle_timeout: Duration,
    /// Time for a new agent to finish the handshake and send `Hello`.
    pub handshake_timeout: Duration,
    /// How long in-flight connections may take to finish on shutdown.
    pub drain_grace: Duration,
    /// QUIC handshakes in progress at once, at most.
    pub max_incoming: usize,
    /// Connections whose peer has not proven who it is (handshake, Hello, enrollment), at most.
    pub max_unauthenticated: usize,
    /// Such connections from one address, at most.
    pub max_unauthenticated_per_ip: usize,
    /// New handshakes one address may start per second (in bursts of twice that).
    pub handshakes_per_ip_per_second: usize,
    /// Client connections open at once across all services, at most.
    pub max_connections: usize,
    /// Congestion controller of the relay-to-agent direction.
    pub congestion: Congestion,
    /// Time for an HTTP client to send a whole request head (and a TLS client its ClientHello);
    /// also how long an idle keep-alive connection waits for its next request.
    pub header_timeout: Duration,
    /// The largest HTTP request head accepted (bigger: 431 and closed).
    pub max_header_bytes: usize,
    /// Connections open at once from one client address, across every listener, at most.
    pub max_connections_per_ip: usize,
    /// A UDP flow with no datagram either way for this long is forgotten.
    pub udp_flow_idle: Duration,
    /// UDP flows kept per service; a new flow beyond it replaces a flow of the fullest client
    /// prefix (not-yet-answered and quiet ones first).
    pub udp_max_flows: usize,
}

const MILLISECOND: Duration = Duration::from_millis(1);
pub(super) const SECOND: Duration = Duration::from_secs(1);
const HOUR: Duration = Duration::from_secs(3600);
pub(super) const DAY: Duration = Duration::from_secs(86_400);

impl Default for Limits {
    /// The limits of a relay.toml that does not set them.
    fn default() -> Self {
        Self {
            idle_timeout: SECOND * 20,
            handshake_timeout: SECOND * 10,
            drain_grace: SECOND * 20,
            max_incoming: 256,
            max_unauthenticated: 64,
            max_unauthenticated_per_ip: 8,
            handshakes_per_ip_per_second: 10,
            max_connections: 16_384,
            congestion: Congestion::default(),
            header_timeout: SECOND * 10,
            max_header_bytes: 64 * 1024,
            max_connections_per_ip: 256,
            udp_flow_idle: SECOND * 60,
            udp_max_flows: 4096,
        }
    }
}

impl Limits {
    /// The `[relay]` limits as written, each absent one from [`Limits::default`], each checked
    /// against its bounds (listed here and nowhere else).
    pub(super) fn from_raw(r: &RawRelay, relay: conf::Section<'_>) -> Result<Self, ConfigError> {
        let d = Self::default();
        let any = 1..=usize::MAX;
        Ok(Self {
            idle_timeout: relay.bounded("idle_timeout", r.idle_timeout, d.idle_timeout, SECOND..=HOUR)?,
            handshake_timeout: relay.bounded(
                "handshake_timeout",
                r.handshake_timeout,
                d.handshake_timeout,
                MILLISECOND * 100..=SECOND * 300,
            )?,
            drain_grace: relay.bounded("drain_grace", r.drain_grace, d.drain_grace, Duration::ZERO..=HOUR)?,
            max_incoming: relay.bounded("max_incoming", r.max_incoming, d.max_incoming, any.clone())?,
            max_unauthenticated: relay.bounded(
                "max_unauthenticated",
                r.max_unauthenticated,
                d.max_unauthenticated,
                1..=65_536,
            )?,
            max_unauthenticated_per_ip: relay.bounded(
                "max_unauthenticated_per_ip",
                r.max_unauthenticated_per_ip,
                d.max_unauthenticated_per_ip,
                1..=65_536,
            )?,
            handshakes_per_ip_per_second: relay.bounded(
                "handshakes_per_ip_per_second",
                r.handshakes_per_ip_per_second,
                d.handshakes_per_ip_per_second,
                1..=100_000,
            )?,
            max_connections: relay.bounded(
                "max_connections",
                r.max_connections,
                d.max_connections,
                any.clone(),
            )?,
            congestion: relay.parsed("congestion", r.congestion.as_deref(), d.congestion)?,
            header_timeout: relay.bounded(
                "header_timeout",
                r.header_timeout,
                d.header_timeout,
                MILLISECOND * 100..=SECOND * 300,
            )?,
            max_header_bytes: relay.bounded(
                "max_header_bytes",
                r.max_header_bytes,
                d.max_header_bytes,
                8192..=1 << 20,
            )?,
            max_connections_per_ip: relay.bounded(
                "max_connections_per_ip",
                r.max_connections_per_ip,
                d.max_connections_per_ip,
                any,
            )?,
            udp_flow_idle: relay.bounded("udp_flow_idle", r.udp_flow_idle, d.udp_flow_idle, SECOND..=HOUR)?,
            udp_max_flows: relay.bounded("udp_max_flows", r.udp_max_flows, d.udp_max_flows, 1..=1 << 20)?,
        })
    }
}
