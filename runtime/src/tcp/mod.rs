//! A tunnel over TLS 1.3 over TCP, its streams multiplexed by HTTP/2 (the `h2` crate).
//!
//! Roles: the agent dials (TLS client) and is the HTTP/2 *server*; the relay accepts (TLS server)
//! and is the HTTP/2 *client*, because in HTTP/2 only the client opens streams and the relay opens
//! every data stream. The one stream an agent opens on a QUIC connection (its control stream, a
//! lane's first stream, the enrollment stream) the relay opens for it: the agent's
//! [`Connection::open_bi`] takes the first stream the relay opens. The relay's first stream of all is
//! the link stream (`sallyport_proto::link`): datagrams and the close code and reason.
//!
//! HTTP/2 gives each stream its own flow-control window inside the connection's, and sends the
//! streams that have data in turn, so one bulk stream does not starve the others. A stream's FIN
//! is `END_STREAM`, its reset `RST_STREAM` with the same code QUIC would carry (HTTP/2 has no
//! STOP_SENDING: stopping a stream resets it). Liveness is HTTP/2 PING, which flow control never
//! holds back: a peer that does not answer one within the idle timeout is gone.
//!
//! # Layout
//!
//! - [`connection`]: [`Connection`], [`SendStream`] and [`RecvStream`] with quinn's semantics, the
//!   TLS session's facts ([`Peer`]).
//! - [`setup`]: the relay's end ([`client`]) and the agent's end ([`server`]) over a TLS stream,
//!   the link stream's reader and writer, the pinger.
//! - [`socket`]: the TCP socket's options and each end's windows and timers ([`Settings`]).
//! - [`connect`]: the agent's one way to dial: TCP, TLS, HTTP/2.
//! - [`prefixed`]: a TCP stream whose first bytes were read already.
//! - `wire`: the limits each end sets, the request paths, QUIC's codes as HTTP/2 reasons.

pub mod connect;
pub mod connection;
pub mod prefixed;
pub mod setup;
pub mod socket;
mod wire;

pub use connection::{ClosedStream, Connection, Peer, RecvStream, SendStream};
pub use prefixed::Prefixed;
pub use setup::{client, server};
pub use socket::{
    tcp_agent, tcp_relay, tunnel_socket, Settings, TCP_MIN_IDLE_TIMEOUT, TCP_STREAM_RECEIVE_WINDOW,
};
pub use wire::UNAUTHENTICATED_HOLD;
