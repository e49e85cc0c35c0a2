//! `[relay]` timeouts and caps: their defaults and their bounds, in one place.

use std::time::Duration;

use sallyport_runtime::{
    config::{self as conf, ConfigError},
    quic::Congestion,
    splice,
};

use super::raw::RawRelay;

/// Timeouts and caps.
#[derive(Debug, Clone)]
pub struct Limits {
    /// A tunnel with no traffic (not even keep-alives) for this long is dead.
    pub idle_timeout: Duration,
    /// A quiet tunnel sends a keep-alive after this long.
    pub keep_alive: Duration,
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
    /// What the relay may hold in memory (the pod's memory limit): the default of
    /// `max_connections` is derived from it (see [`Budget`]).
    pub memory_budget: u64,
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
    /// Threads that run the relay (tunnels, listeners, copying): by default half the cores the
    /// process may use (see [`default_threads`]).
    pub threads: usize,
    /// Connections per agent (its tunnel and its lanes) that the relay spreads the agent's data
    /// streams over, at most; the agent opens as many as it is configured to, up to this.
    pub lanes: usize,
}

/// The default number of runtime threads: half the cores this process may use (its CPU quota
/// where a cgroup sets one), at least one. Each thread that moves tunnel traffic brings about as
/// much kernel work with it (TCP, UDP, and in a pod the node's forwarding), which runs on the other
/// half; on 2 cores a second thread only adds hand-offs (docs/benchmarks.md).
pub fn default_threads() -> usize {
    (std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get) / 2).max(1)
}

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// How a memory budget is spent, at worst, and so how many client connections it holds.
///
/// A client connection holds at most its request head (`max_header_bytes`, while an HTTP client
/// is still sending it), one read on its way into the tunnel (64 KiB, while the tunnel's flow
/// control holds it back) and its own state (task, socket, HTTP or TLS state:
/// [`Budget::CONNECTION_STATE`]). Data in flight inside the tunnels is bounded per tunnel, not per
/// connection, by the QUIC windows (an agent's lanes share its tunnel's); the budget sets that
/// aside for [`Budget::TUNNELS`] tunnels, along with the runtime and the connections still proving
/// who they are.
///
/// Kernel socket buffers are not in it: they are the kernel's (charged to the pod's memory cgroup
/// on cgroup v2 only under the kernel's own TCP memory limits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Bytes for the runtime and the tunnels.
    pub reserved: u64,
    /// Bytes one client connection may hold at most.
    pub per_connection: u64,
    /// Client connections that fit in the rest.
    pub connections: usize,
}

impl Budget {
    /// The code, runtime, TLS and metrics of an idle relay, with room for the allocator's slack.
    pub const RUNTIME: u64 = 64 * MIB;
    /// Tunnels the budget provides for (a homelab's agents).
    pub const TUNNELS: u64 = 4;
    /// A client connection's own state besides its buffers.
    pub const CONNECTION_STATE: u64 = 16 * KIB;
    /// A connection still proving who it is: its small windows and handshake state.
    const UNAUTHENTICATED: u64 = sallyport_runtime::limits::UNAUTHENTICATED_RECEIVE_WINDOW as u64
        + sallyport_runtime::limits::DATAGRAM_RECEIVE_BUFFER as u64
        + 32 * KIB;

    /// The budget `memory_budget` makes with these limits; `connections` is 0 when nothing is
    /// left for them.
    pub fn new(memory_budget: u64, max_header_bytes: usize, max_unauthenticated: usize) -> Self {
        let tunnel = u64::from(sallyport_runtime::limits::CONNECTION_RECEIVE_WINDOW)
            + sallyport_runtime::limits::SEND_WINDOW;
        let reserved =
            Self::RUNTIME + Self::TUNNELS * tunnel + max_unauthenticated as u64 * Self::UNAUTHENTICATED;
        let per_connection = max_header_bytes as u64 + splice::MAX_READ as u64 + Self::CONNECTION_STATE;
        let connections =
            usize::try_from(memory_budget.saturating_sub(reserved) / per_connection).unwrap_or(usize::MAX);
        Self { reserved, per_connection, connections }
    }
}

/// The default memory budget: the shipped StatefulSet's memory limit.
pub const DEFAULT_MEMORY_BUDGET: u64 = 512 * MIB;

const MILLISECOND: Duration = Duration::from_millis(1);
pub(super) const SECOND: Duration = Duration::from_secs(1);
const HOUR: Duration = Duration::from_secs(3600);
pub(super) const DAY: Duration = Duration::from_secs(86_400);

impl Default for Limits {
    /// The limits of a relay.toml that does not set them.
    fn default() -> Self {
        const MAX_HEADER_BYTES: usize = 64 * 1024;
        const MAX_UNAUTHENTICATED: usize = 64;
        Self {
            idle_timeout: sallyport_runtime::limits::IDLE_TIMEOUT,
            keep_alive: sallyport_runtime::limits::RELAY_KEEP_ALIVE,
            handshake_timeout: SECOND * 10,
            drain_grace: SECOND * 20,
            max_incoming: 256,
            max_unauthenticated: MAX_UNAUTHENTICATED,
            max_unauthenticated_per_ip: 8,
            handshakes_per_ip_per_second: 10,
            memory_budget: DEFAULT_MEMORY_BUDGET,
            max_connections: Budget::new(DEFAULT_MEMORY_BUDGET, MAX_HEADER_BYTES, MAX_UNAUTHENTICATED)
                .connections,
            congestion: Congestion::default(),
            header_timeout: SECOND * 10,
            max_header_bytes: MAX_HEADER_BYTES,
            max_connections_per_ip: 256,
            udp_flow_idle: SECOND * 60,
            udp_max_flows: 4096,
            threads: default_threads(),
            lanes: 8,
        }
    }
}

impl Limits {
    /// The `[relay]` limits as written, each absent one from [`Limits::default`], each checked
    /// against its bounds (listed here and nowhere else).
    /// What the budget holds with these limits.
    pub fn budget(&self) -> Budget {
        Budget::new(self.memory_budget, self.max_header_bytes, self.max_unauthenticated)
    }

    pub(super) fn from_raw(r: &RawRelay, relay: conf::Section<'_>) -> Result<Self, ConfigError> {
        let d = Self::default();
        let any = 1..=usize::MAX;
        let max_header_bytes =
            relay.bounded("max_header_bytes", r.max_header_bytes, d.max_header_bytes, 8192..=1 << 20)?;
        let max_unauthenticated =
            relay.bounded("max_unauthenticated", r.max_unauthenticated, d.max_unauthenticated, 1..=65_536)?;
        let memory_budget = match r.memory_budget.as_deref() {
            None => d.memory_budget,
            Some(text) => conf::parse_size(text)
                .map_err(|e| ConfigError::invalid(relay.path(), relay.key("memory_budget"), e.to_string()))?,
        };
        let budget = Budget::new(memory_budget, max_header_bytes, max_unauthenticated);
        let idle_timeout =
            relay.bounded("idle_timeout", r.idle_timeout, d.idle_timeout, MILLISECOND * 500..=HOUR)?;
        let keep_alive =
            relay.bounded("keep_alive", r.keep_alive, d.keep_alive, MILLISECOND * 100..=SECOND * 600)?;
        if keep_alive * 6 > idle_timeout * 5 {
            return Err(ConfigError::invalid(
                relay.path(),
                relay.key("keep_alive"),
                "must be at most five sixths of relay.idle_timeout, or a quiet tunnel is declared dead",
            ));
        }
        if budget.connections == 0 {
            return Err(ConfigError::invalid(
                relay.path(),
                relay.key("memory_budget"),
                format!(
                    "{} MiB leaves no room for client connections: the runtime and {} tunnels take {} MiB",
                    memory_budget / MIB,
                    Budget::TUNNELS,
                    budget.reserved.div_ceil(MIB)
                ),
            ));
        }
        Ok(Self {
            idle_timeout,
            keep_alive,
            handshake_timeout: relay.bounded(
                "handshake_timeout",
                r.handshake_timeout,
                d.handshake_timeout,
                MILLISECOND * 100..=SECOND * 300,
            )?,
            drain_grace: relay.bounded("drain_grace", r.drain_grace, d.drain_grace, Duration::ZERO..=HOUR)?,
            max_incoming: relay.bounded("max_incoming", r.max_incoming, d.max_incoming, any.clone())?,
            max_unauthenticated,
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
            memory_budget,
            max_connections: relay.bounded(
                "max_connections",
                r.max_connections,
                budget.connections,
                any.clone(),
            )?,
            congestion: relay.parsed("congestion", r.congestion.as_deref(), d.congestion)?,
            header_timeout: relay.bounded(
                "header_timeout",
                r.header_timeout,
                d.header_timeout,
                MILLISECOND * 100..=SECOND * 300,
            )?,
            max_header_bytes,
            max_connections_per_ip: relay.bounded(
                "max_connections_per_ip",
                r.max_connections_per_ip,
                d.max_connections_per_ip,
                any,
            )?,
            udp_flow_idle: relay.bounded("udp_flow_idle", r.udp_flow_idle, d.udp_flow_idle, SECOND..=HOUR)?,
            udp_max_flows: relay.bounded("udp_max_flows", r.udp_max_flows, d.udp_max_flows, 1..=1 << 20)?,
            threads: relay.bounded("threads", r.threads, d.threads, 1..=256)?,
            lanes: relay.bounded("lanes", r.lanes, d.lanes, 1..=64)?,
        })
    }
}
