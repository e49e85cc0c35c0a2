//! The TCP socket of a tunnel, and each end's windows and timers over TCP.

use std::time::Duration;

use crate::limits::{CONNECTION_RECEIVE_WINDOW, UNAUTHENTICATED_RECEIVE_WINDOW};

/// Timers and windows of one connection.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// How often each end pings the other.
    pub keep_alive: Duration,
    /// A ping unanswered this long ends the connection.
    pub idle_timeout: Duration,
    /// Receive window of one stream.
    pub stream_window: u32,
    /// Receive window of the whole connection.
    pub connection_window: u32,
}

/// The TCP transport never ends a connection for silence sooner than this: TCP retransmits lost
/// segments with exponential backoff (200 ms, 400 ms, 800 ms, ...), so under loss a ping's answer
/// can take seconds where QUIC's probes would have been answered.
pub const TCP_MIN_IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Receive window of one stream over TCP, both ends: QUIC's.
pub const TCP_STREAM_RECEIVE_WINDOW: u32 = crate::limits::STREAM_RECEIVE_WINDOW;

/// The relay's end of a TCP tunnel: QUIC's connection window, and an unproven peer's small ones.
pub fn tcp_relay(keep_alive: Duration, idle_timeout: Duration, authenticated: bool) -> Settings {
    let (stream_window, connection_window) = if authenticated {
        (TCP_STREAM_RECEIVE_WINDOW, CONNECTION_RECEIVE_WINDOW)
    } else {
        (UNAUTHENTICATED_RECEIVE_WINDOW, UNAUTHENTICATED_RECEIVE_WINDOW)
    };
    Settings {
        keep_alive,
        idle_timeout: idle_timeout.max(TCP_MIN_IDLE_TIMEOUT),
        stream_window,
        connection_window,
    }
}

/// The agent's end of a TCP tunnel.
pub fn tcp_agent(keep_alive: Duration, idle_timeout: Duration) -> Settings {
    Settings {
        keep_alive,
        idle_timeout: idle_timeout.max(TCP_MIN_IDLE_TIMEOUT),
        stream_window: TCP_STREAM_RECEIVE_WINDOW,
        connection_window: CONNECTION_RECEIVE_WINDOW,
    }
}

/// A tunnel's TCP socket: no Nagle delay (the streams are interactive as often as bulk), and
/// keepalive probes so a vanished peer is noticed even by a connection with nothing to send.
pub fn tunnel_socket(tcp: &tokio::net::TcpStream) {
    let _ = tcp.set_nodelay(true);
    // A close lets queued bytes (the close frame) out: no reset on close here.
    let _ = socket2::SockRef::from(tcp).set_linger(None);
    let keepalive =
        socket2::TcpKeepalive::new().with_time(Duration::from_secs(10)).with_interval(Duration::from_secs(5));
    let _ = socket2::SockRef::from(tcp).set_tcp_keepalive(&keepalive);
}
