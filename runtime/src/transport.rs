//! QUIC transport settings with explicit limits for both sides.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use quinn::{EndpointConfig, MtuDiscoveryConfig, TransportConfig, VarInt};

/// Receive window of one stream: enough for a gigabit over a few milliseconds of RTT, bounded so a
/// slow reader cannot make the peer hold unbounded data.
pub const STREAM_RECEIVE_WINDOW: u32 = 4 * 1024 * 1024;

/// Receive window of one stream on the agent, for data from clients toward targets: 1 MiB keeps a
/// gigabit per stream at up to 8 ms RTT and bounds what quinn keeps per stream slot (its recycled
/// reassembly buffer grows with the window: ~100 KiB at 4 MiB).
pub const AGENT_STREAM_RECEIVE_WINDOW: u32 = 1024 * 1024;

/// Receive window of a whole connection (quinn's default is unlimited).
pub const CONNECTION_RECEIVE_WINDOW: u32 = 16 * 1024 * 1024;

/// Bytes a connection may have in flight unacknowledged.
pub const SEND_WINDOW: u64 = 8 * 1024 * 1024;

/// How many data streams the relay may have open toward one agent at once, at most.
pub const MAX_DATA_STREAMS: u32 = 16 * 1024;

/// How many data streams the relay may have open toward one agent at first; [`StreamCredit`]
/// raises it with demand. Quinn keeps one receive state per stream the peer is allowed to open,
/// recycled with the capacity its reassembly buffer reached (up to ~100 KiB after a bulk upload),
/// so the agent's memory follows this limit rather than the connections actually open.
pub const INITIAL_DATA_STREAMS: u32 = 64;

/// How many bidirectional streams an agent may open toward the relay (the control stream).
pub const MAX_AGENT_STREAMS: u32 = 4;

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

/// How often an idle tunnel says it is alive, by default: the agent sends a PING after a second
/// without a packet from the relay, and the relay's ACK comes back: one packet a second each way.
pub const KEEP_ALIVE: Duration = Duration::from_secs(1);

/// The relay's keep-alive, by default: a little longer than the agent's, so on an idle tunnel the
/// agent's fires first every time (each side's timer restarts on every packet it receives) and the
/// relay only answers; it keeps alive a tunnel to an agent configured with a longer keep-alive.
pub const RELAY_KEEP_ALIVE: Duration = Duration::from_millis(1250);

/// How long a tunnel may hear nothing before it is dead, by default: a second and a half, so a
/// peer that died or went dark is noticed within that (and a client that arrives in the meantime
/// waits at most that long), while a live peer's keep-alive and its retransmissions (each a
/// retransmission timeout apart) all have to be lost for a false alarm. QUIC uses the smaller of
/// the two sides' values, and never less than three retransmission timeouts of the path.
pub const IDLE_TIMEOUT: Duration = Duration::from_millis(1500);

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

/// The connection receive window of a relay connection whose peer has not proven who it is yet:
/// all the stream data such a peer can make the relay hold.
pub const UNAUTHENTICATED_RECEIVE_WINDOW: u32 = 64 * 1024;

/// Datagrams the relay keeps per connection until it reads them (the tunnel reads an agent's
/// datagrams as they come; a peer that is not an agent is never read).
pub const DATAGRAM_RECEIVE_BUFFER: usize = 256 * 1024;

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
    share_agent_windows(&crate::link::Connection::Quic(connection.clone()), 1);
    connection.set_max_concurrent_bi_streams(VarInt::from_u32(MAX_AGENT_STREAMS));
}

/// Gives each of an agent's `connections` (its tunnel and lanes) an equal share of one tunnel's
/// windows, so what an agent can make the relay hold in flight is the same however many
/// connections it holds.
/// (QUIC; an HTTP/2 connection keeps the windows it was set up with.)
pub fn share_agent_windows(connection: &crate::link::Connection, connections: usize) {
    let Some(connection) = connection.quic() else { return };
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

/// The agent's limit on concurrently open data streams, doubled (up to [`MAX_DATA_STREAMS`]) when
/// three quarters of it are in use and never lowered: memory then follows the peak concurrency a
/// tunnel has actually seen, and a burst waits at most a round trip per doubling.
#[derive(Debug)]
pub struct StreamCredit {
    limit: u32,
}

impl Default for StreamCredit {
    fn default() -> Self {
        Self { limit: INITIAL_DATA_STREAMS }
    }
}

impl StreamCredit {
    /// The current limit.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// Called with the number of streams open; returns the new limit when it should be raised.
    pub fn raise_for(&mut self, open: u64) -> Option<u32> {
        if self.limit >= MAX_DATA_STREAMS || open * 4 < u64::from(self.limit) * 3 {
            return None;
        }
        self.limit = (self.limit * 2).min(MAX_DATA_STREAMS);
        Some(self.limit)
    }
}

/// A UDP socket for a QUIC endpoint, bound to `addr`, with kernel buffers of [`UDP_SOCKET_BUFFER`]
/// each way where the system allows; says so in the log when the system keeps them smaller.
pub fn quic_socket(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let socket = buffered_udp_socket(addr)?;
    let granted = receive_buffer(&socket);
    // Said at every start: Windows' defaults (64 KiB) are small, and what a system grants varies.
    tracing::info!(
        receive_bytes = granted,
        send_bytes = send_buffer(&socket),
        wanted_bytes = UDP_SOCKET_BUFFER,
        "QUIC socket buffers"
    );
    if granted < UDP_SOCKET_BUFFER {
        tracing::warn!(
            granted_bytes = granted,
            wanted_bytes = UDP_SOCKET_BUFFER,
            "the system caps the UDP receive buffer: fast transfers may lose packets \
             (raise net.core.rmem_max, e.g. sysctl -w net.core.rmem_max=8388608)"
        );
    }
    Ok(socket)
}

/// A non-blocking UDP socket for a relay's UDP service, bound to `addr`, with kernel buffers of
/// [`UDP_SOCKET_BUFFER`] each way where the system allows. Linux's default receive buffer holds
/// a few hundred small datagrams, so a burst of DNS queries from many clients would otherwise be
/// dropped by the kernel before the relay has read them.
pub fn service_udp_socket(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let socket = buffered_udp_socket(addr)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

fn buffered_udp_socket(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Best effort: a system that refuses a bigger buffer still runs, only with more loss under load.
    let _ = socket.set_recv_buffer_size(UDP_SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(UDP_SOCKET_BUFFER);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// The receive buffer the kernel granted `socket`, in bytes (0 if it cannot say).
pub fn receive_buffer(socket: &std::net::UdpSocket) -> usize {
    granted(socket2::SockRef::from(socket).recv_buffer_size().unwrap_or(0))
}

/// A buffer size as the system reports it, as the bytes it granted: Linux reports twice the size
/// it granted (the other half is for its bookkeeping).
fn granted(reported: usize) -> usize {
    if cfg!(target_os = "linux") {
        reported / 2
    } else {
        reported
    }
}

/// The send buffer the kernel granted `socket`, in bytes (0 if it cannot say).
pub fn send_buffer(socket: &std::net::UdpSocket) -> usize {
    granted(socket2::SockRef::from(socket).send_buffer_size().unwrap_or(0))
}

/// An endpoint configuration that accepts packets up to [`MAX_UDP_PAYLOAD`] (quinn's default is
/// 1,472 bytes, which also caps what the peer's MTU discovery may try).
pub fn endpoint_config() -> EndpointConfig {
    let mut config = EndpointConfig::default();
    accept_large_packets(&mut config);
    config
}

fn accept_large_packets(config: &mut EndpointConfig) {
    // MAX_UDP_PAYLOAD is within quinn's accepted 1,200..=65,527 (checked at compile time above).
    config.max_udp_payload_size(MAX_UDP_PAYLOAD).expect("MAX_UDP_PAYLOAD within quinn's bounds");
}

/// An endpoint configuration whose stateless-reset key and connection-ID key are derived from
/// `secret` (the relay's private key). A relay restarted after a crash then recognizes the IDs of
/// its old connections and resets them on their first packet, so agents reconnect at once instead
/// of waiting out the idle timeout.
pub fn endpoint_with_stable_reset(secret: &[u8]) -> EndpointConfig {
    use quinn_proto::{ConnectionIdGenerator, HashedConnectionIdGenerator};
    use ring::{digest, hmac};
    let derive = |label: &[u8]| {
        let mut material = label.to_vec();
        material.extend_from_slice(secret);
        digest::digest(&digest::SHA256, &material)
    };
    let reset = derive(b"sallyport stateless reset key v1");
    let mut config = EndpointConfig::new(Arc::new(hmac::Key::new(hmac::HMAC_SHA256, reset.as_ref())));
    accept_large_packets(&mut config);
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&derive(b"sallyport connection id key v1").as_ref()[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    config.cid_generator(move || -> Box<dyn ConnectionIdGenerator> {
        Box::new(HashedConnectionIdGenerator::from_key(cid_key))
    });
    config
}

/// The TCP transport never ends a connection for silence sooner than this: TCP retransmits lost
/// segments with exponential backoff (200 ms, 400 ms, 800 ms, ...), so under loss a ping's answer
/// can take seconds where QUIC's probes would have been answered.
pub const TCP_MIN_IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Receive window of one stream over TCP, both ends: a sixteenth of the connection's, so it takes
/// sixteen clients that stop reading (each stream then holds its whole window) before the others
/// wait for room; a megabyte still carries a gigabit at up to 8 ms of round trip.
pub const TCP_STREAM_RECEIVE_WINDOW: u32 = CONNECTION_RECEIVE_WINDOW / 16;

/// The relay's end of a TCP tunnel: QUIC's connection window, and an unproven peer's small ones.
pub fn tcp_relay(
    keep_alive: Duration,
    idle_timeout: Duration,
    authenticated: bool,
) -> crate::link::tcp::Settings {
    let (stream_window, connection_window) = if authenticated {
        (TCP_STREAM_RECEIVE_WINDOW, CONNECTION_RECEIVE_WINDOW)
    } else {
        (UNAUTHENTICATED_RECEIVE_WINDOW, UNAUTHENTICATED_RECEIVE_WINDOW)
    };
    crate::link::tcp::Settings {
        keep_alive,
        idle_timeout: idle_timeout.max(TCP_MIN_IDLE_TIMEOUT),
        stream_window,
        connection_window,
    }
}

/// The agent's end of a TCP tunnel.
pub fn tcp_agent(keep_alive: Duration, idle_timeout: Duration) -> crate::link::tcp::Settings {
    crate::link::tcp::Settings {
        keep_alive,
        idle_timeout: idle_timeout.max(TCP_MIN_IDLE_TIMEOUT),
        stream_window: TCP_STREAM_RECEIVE_WINDOW,
        connection_window: CONNECTION_RECEIVE_WINDOW,
    }
}

/// A tunnel's TCP socket: no Nagle delay (the streams are interactive as often as bulk), and
/// keepalive probes so a vanished peer is noticed even by a connection with nothing to send.
pub fn tcp_tunnel_socket(tcp: &tokio::net::TcpStream) {
    let _ = tcp.set_nodelay(true);
    // A close lets queued bytes (the close frame) out: no reset on close here.
    let _ = socket2::SockRef::from(tcp).set_linger(None);
    let keepalive =
        socket2::TcpKeepalive::new().with_time(Duration::from_secs(10)).with_interval(Duration::from_secs(5));
    let _ = socket2::SockRef::from(tcp).set_tcp_keepalive(&keepalive);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_credit_doubles_at_three_quarters_up_to_the_cap_and_never_shrinks() {
        let mut credit = StreamCredit::default();
        assert_eq!(credit.raise_for(0), None);
        assert_eq!(credit.raise_for(47), None);
        assert_eq!(credit.raise_for(48), Some(128));
        assert_eq!(credit.raise_for(10), None);
        assert_eq!(credit.limit(), 128);
        let mut open = 0;
        while credit.limit() < MAX_DATA_STREAMS {
            open += 1;
            credit.raise_for(open);
        }
        assert_eq!(credit.limit(), MAX_DATA_STREAMS);
        assert_eq!(credit.raise_for(u64::from(MAX_DATA_STREAMS)), None);
    }
}
