//! Dialing a relay: the one `dial` the tunnel, its lanes, the QUIC probe, `check --connect` and
//! enrollment use, over either transport, with the credentials of the moment.

use std::{
    future::Future,
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::Duration,
};

use quinn::{ConnectionError, Endpoint};
use sallyport_proto::codes::close;
use sallyport_runtime::{
    code,
    link::{Connection, Transport},
    quic::{self, connect::ClientEndpoint, Congestion},
    sync::{read, write},
    tcp, tls,
};

use super::error::TunnelError;
use crate::config::RelayAddr;

/// The timers a connection is set up with.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timers {
    pub(crate) keep_alive: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) congestion: Congestion,
    /// The whole dial, the opening exchange included.
    pub(crate) handshake_timeout: Duration,
}

/// Everything one dial needs: the client configurations of both transports and the timers.
#[derive(Debug, Clone)]
pub(crate) struct Dialer {
    quic: quinn::ClientConfig,
    tcp: Arc<rustls::ClientConfig>,
    timers: Timers,
}

impl Dialer {
    /// From a rustls client configuration (its ALPN set) and the timers.
    pub(crate) fn new(rustls_config: rustls::ClientConfig, timers: Timers) -> Result<Self, tls::TlsError> {
        let tcp = Arc::new(rustls_config.clone());
        let mut quic = quinn::ClientConfig::new(tls::quic_client(rustls_config)?);
        quic.transport_config(quic::agent(timers.keep_alive, timers.idle_timeout, timers.congestion));
        Ok(Self { quic, tcp, timers })
    }
}

/// The agent's current credentials: replaced whole when the certificate is renewed; each new
/// connection takes the current ones.
#[derive(Debug)]
pub(crate) struct Credentials(RwLock<Dialer>);

impl Credentials {
    pub(crate) fn new(dialer: Dialer) -> Self {
        Self(RwLock::new(dialer))
    }

    pub(crate) fn current(&self) -> Dialer {
        read(&self.0).clone()
    }

    pub(crate) fn replace(&self, dialer: Dialer) {
        *write(&self.0) = dialer;
    }
}

/// How a connection is dialed: QUIC from an endpoint, or TLS over TCP.
#[derive(Debug, Clone)]
pub(crate) enum Via {
    Quic(Endpoint),
    Tcp,
}

impl Via {
    /// `transport` toward `addr`; for QUIC, the endpoint kept in `slot` (opened if need be).
    pub(crate) fn to(
        transport: Transport,
        addr: SocketAddr,
        slot: &mut Option<ClientEndpoint>,
    ) -> Result<Self, TunnelError> {
        Ok(match transport {
            Transport::Quic => {
                Self::Quic(ClientEndpoint::reuse_or_open(slot, addr).map_err(TunnelError::Socket)?)
            }
            Transport::Tcp => Self::Tcp,
        })
    }
}

/// The first address `relay` resolves to.
pub(crate) async fn resolve(relay: &RelayAddr) -> Result<SocketAddr, TunnelError> {
    tokio::net::lookup_host((relay.host.as_str(), relay.port))
        .await
        .map_err(TunnelError::Resolve)?
        .next()
        .ok_or(TunnelError::NoAddress)
}

/// Dials `addr` and runs `first` (the control stream's opening exchange) on the new connection,
/// all within the handshake timeout; with `answer_within`, the transport's handshake must be done
/// within that. A reason the relay closed with beats "connection lost".
pub(crate) async fn dial<T, Fut>(
    dialer: &Dialer,
    via: Via,
    (addr, server_name): (SocketAddr, &str),
    answer_within: Option<Duration>,
    first: impl FnOnce(Connection) -> Fut,
) -> Result<(Connection, T), TunnelError>
where
    Fut: Future<Output = Result<T, TunnelError>>,
{
    let timeout = dialer.timers.handshake_timeout;
    let handshake = async {
        let connection = match via {
            Via::Quic(endpoint) => Connection::from(
                quic::connect::connect(&endpoint, dialer.quic.clone(), addr, server_name, answer_within)
                    .await?,
            ),
            Via::Tcp => {
                let settings = tcp::tcp_agent(dialer.timers.keep_alive, dialer.timers.idle_timeout);
                let connecting = tcp::connect::connect(addr, server_name, dialer.tcp.clone(), settings);
                Connection::from(match answer_within {
                    None => connecting.await?,
                    Some(wait) => tokio::time::timeout(wait, connecting)
                        .await
                        .map_err(|_| TunnelError::NoAnswer(wait))??,
                })
            }
        };
        match first(connection.clone()).await {
            Ok(opened) => Ok((connection, opened)),
            Err(e) => Err(refusal(&connection).unwrap_or(e)),
        }
    };
    tokio::time::timeout(timeout, handshake).await.map_err(|_| TunnelError::Timeout(timeout))?
}

/// The relay's refusal, if it closed the connection with one.
fn refusal(connection: &Connection) -> Option<TunnelError> {
    match connection.close_reason()? {
        ConnectionError::ApplicationClosed(c) if c.error_code == code(close::REFUSED) => {
            Some(TunnelError::Refused(String::from_utf8_lossy(&c.reason).into_owned()))
        }
        _ => None,
    }
}

impl From<&crate::config::AgentKeys> for Timers {
    fn from(timing: &crate::config::AgentKeys) -> Self {
        Self {
            keep_alive: timing.keep_alive,
            idle_timeout: timing.idle_timeout,
            congestion: timing.congestion,
            handshake_timeout: timing.handshake_timeout,
        }
    }
}
