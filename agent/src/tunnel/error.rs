//! Why a tunnel attempt failed, and what that says about the path.

use std::{io, time::Duration};

use quinn::ConnectionError;
use sallyport_runtime::{quic, tcp, FrameError};

use super::choice::Failure;

/// Why a connection attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("cannot resolve the relay address: {0}")]
    Resolve(io::Error),
    #[error("the relay address resolves to nothing")]
    NoAddress,
    #[error("cannot open a UDP socket: {0}")]
    Socket(io::Error),
    #[error("cannot start the connection: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The TCP transport's connect, TLS handshake or HTTP/2 setup failed.
    #[error("over TCP: {0}")]
    Tcp(#[from] tcp::connect::ConnectError),
    #[error("{0}")]
    Connection(#[from] ConnectionError),
    #[error("control stream: {0}")]
    Frame(#[from] FrameError),
    /// The relay said no, in its own words.
    #[error("the relay refused this agent: {0}")]
    Refused(String),
    /// The relay broke the protocol: what it did.
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("no Welcome from the relay within {0:?}")]
    Timeout(Duration),
    #[error("no answer from the relay within {0:?}")]
    NoAnswer(Duration),
    /// The connection reached a replica the agent holds a tunnel to already.
    #[error("reached replica {0}, which this agent holds a tunnel to already")]
    Held(String),
}

impl From<quic::connect::ConnectError> for TunnelError {
    fn from(e: quic::connect::ConnectError) -> Self {
        match e {
            quic::connect::ConnectError::Start(e) => Self::Connect(e),
            quic::connect::ConnectError::Connection(e) => Self::Connection(e),
            quic::connect::ConnectError::NoAnswer(wait) => Self::NoAnswer(wait),
        }
    }
}

impl TunnelError {
    /// What the error says about the path, for the transport choice: no answer at all, UDP
    /// refused or dropped outright (so `auto` tries TCP), or something else.
    pub(crate) fn failure(&self) -> Failure {
        match self {
            Self::NoAnswer(_) => Failure::NoAnswer,
            Self::Timeout(_)
            | Self::Socket(_)
            | Self::Connect(_)
            | Self::Connection(ConnectionError::TimedOut) => Failure::UdpBlocked,
            _ => Failure::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_says_whether_udp_gets_through() {
        let second = Duration::from_secs(1);
        assert_eq!(TunnelError::NoAnswer(second).failure(), Failure::NoAnswer);
        for blocked in [
            TunnelError::Timeout(second),
            TunnelError::Socket(io::Error::other("no socket")),
            TunnelError::Connection(ConnectionError::TimedOut),
        ] {
            assert_eq!(blocked.failure(), Failure::UdpBlocked, "{blocked}");
        }
        for answered in [
            TunnelError::Refused("not admitted".into()),
            TunnelError::Held("relay-0".into()),
            TunnelError::Protocol("a control message before Welcome"),
            TunnelError::Connection(ConnectionError::Reset),
        ] {
            assert_eq!(answered.failure(), Failure::Other, "{answered}");
        }
    }
}
