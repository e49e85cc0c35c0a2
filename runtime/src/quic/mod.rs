//! QUIC (quinn): the transport settings of both ends with explicit limits ([`relay`], [`agent`]),
//! the congestion controller, the UDP socket with its kernel buffers and the endpoint
//! configurations ([`socket`]), counted system calls ([`counted`]), and the agent's one way to
//! open a client endpoint and connect ([`connect`]).

pub mod connect;
pub mod counted;
pub mod socket;

use std::{sync::Arc, time::Duration};

use quinn::{MtuDiscoveryConfig, TransportConfig, VarInt};

use crate::limits::{
    AGENT_STREAM_RECEIVE_WINDOW, CONNECTION_RECEIVE_WINDOW, DATAGRAM_RECEIVE_BUFFER, INITIAL_DATA_STREAMS,
    MAX_AGENT_STREAMS, SEND_WINDOW, STREAM_RECEIVE_WINDOW, UNAUTHENTICATED_RECEIVE_WINDOW,
};

/// The largest UDP payload either side sends or accepts. Connections start at 1,200 bytes and
/// quinn's path MTU discovery raises the packet size toward this bound wherever the path carries
/// it: 1,452 bytes or so on an ordinary Ethernet LAN, more with jumbo frames, on loopback or on a
/// host-only network. Every packet costs a fixed amount of work on both sides (header protection,
/// an AEAD call, acknowledgement and loss bookkeeping, a wakeup), so bigger packets carry more
/// bytes per CPU second. The bound keeps a full GSO batch (quinn 0.11 sends up to 10 packets per
/// system call) within the kernel's 64 KiB per send: a larger batch fails with EMSGSIZE, which
/// quinn treats as a lost probe.
pub const MAX_UDP_PAYLOAD: u16 = 6_500;
const _: () = assert!(MAX_UDP_PAYLOAD >= 1_200 && MAX_UDP_PAYLOAD as usize * 10 <= 65_507);

/// Kernel buffer asked for on a QUIC socket, each way. Linux's default (208 KiB) holds about half a
/// millisecond of a 4 Gbit/s transfer, so a short pause of the task that reads the socket drops
/// packets, which QUIC then pays for as loss. The kernel caps the request at `net.core.rmem_max`
/// and `net.core.wmem_max`.
pub const UDP_SOCKET_BUFFER: usize = 4 * 1024 * 1024;

/// The congestion controller of a side's sending direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Congestion {
    /// BBR: paces at the measured bottleneck rate and does not read random loss as congestion, so
    /// a Wi-Fi or WAN path with a few percent loss keeps its throughput (the default).
    #[default]
    Bbr,
    /// CUBIC: loss-based; halves its rate on loss.
    Cubic,
    /// NewReno: loss-based, the most conservative.
    NewReno,
}

impl std::str::FromStr for Congestion {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "bbr" => Ok(Self::Bbr),
            "cubic" => Ok(Self::Cubic),
            "newreno" => Ok(Self::NewReno),
            other => Err(format!(
                "unknown congestion controller {other:?}: expected \"bbr\", \"cubic\" or \"newreno\""
            )),
        }
    }
}

impl Congestion {
    fn factory(self) -> Arc<dyn quinn::congestion::ControllerFactory + Send + Sync> {
        use quinn::congestion::{BbrConfig, CubicConfig, NewRenoConfig};
        match self {
            Self::Bbr => Arc::new(BbrConfig::default()),
            Self::Cubic => Arc::new(CubicConfig::default()),
            Self::NewReno => Arc::new(NewRenoConfig::default()),
        }
    }
}

fn common(keep_alive: Duration, idle_timeout: Duration, congestion: Congestion) -> TransportConfig {
    let mut config = TransportConfig::default();
    config
        .congestion_controller_factory(congestion.factory())
        .stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_RECEIVE_WINDOW))
        .send_window(SEND_WINDOW)
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .mtu_discovery_config(Some(mtu_discovery()))
        .keep_alive_interval(Some(keep_alive))
        // Durations up to 2^62 microseconds are representable; config loading caps idle timeouts far
        // below that, so the fallback (no idle timeout) is unreachable in practice.
        .max_idle_timeout(idle_timeout.try_into().ok());
    config
}

fn mtu_discovery() -> MtuDiscoveryConfig {
    let mut config = MtuDiscoveryConfig::default();
    config.upper_bound(MAX_UDP_PAYLOAD);
    config
}

/// Transport settings of the relay's endpoint. Every connection starts with what an unknown peer
/// may have: one stream (the control or the enrollment stream) and a small receive window;
/// [`admit_agent`] raises them once the peer's certificate names an admitted agent.
pub fn relay(keep_alive: Duration, idle_timeout: Duration, congestion: Congestion) -> Arc<TransportConfig> {
    let mut config = common(keep_alive, idle_timeout, congestion);
    config
        .max_concurrent_bidi_streams(VarInt::from_u32(1))
        .receive_window(VarInt::from_u32(UNAUTHENTICATED_RECEIVE_WINDOW))
        .datagram_receive_buffer_size(Some(DATAGRAM_RECEIVE_BUFFER));
    Arc::new(config)
}

/// Gives the connection of an authenticated agent the tunnel's limits.
pub fn admit_agent(connection: &quinn::Connection) {
    share_windows(connection, 1);
    connection.set_max_concurrent_bi_streams(VarInt::from_u32(MAX_AGENT_STREAMS));
}

/// Gives each of an agent's `connections` (its tunnel and lanes) an equal share of one tunnel's
/// windows, so what an agent can make the relay hold in flight is the same however many
/// connections it holds.
pub fn share_windows(connection: &quinn::Connection, connections: usize) {
    let n = connections.max(1) as u64;
    let receive = u64::from(CONNECTION_RECEIVE_WINDOW) / n;
    connection.set_receive_window(VarInt::from_u64(receive).unwrap_or(VarInt::MAX));
    connection.set_send_window(SEND_WINDOW / n);
}

/// Transport settings of the agent's connection: the relay may open many data streams; the agent
/// keeps the path alive well inside NAT and conntrack timeouts.
pub fn agent(keep_alive: Duration, idle_timeout: Duration, congestion: Congestion) -> Arc<TransportConfig> {
    let mut config = common(keep_alive, idle_timeout, congestion);
    config
        .max_concurrent_bidi_streams(VarInt::from_u32(INITIAL_DATA_STREAMS))
        .stream_receive_window(VarInt::from_u32(AGENT_STREAM_RECEIVE_WINDOW));
    Arc::new(config)
}

impl crate::keys::Shown for Congestion {
    fn shown(&self) -> String {
        match self {
            Self::Bbr => "bbr",
            Self::Cubic => "cubic",
            Self::NewReno => "newreno",
        }
        .to_owned()
    }
}
