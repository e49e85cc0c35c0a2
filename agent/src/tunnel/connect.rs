//! Dialing a relay over either transport: the one `dial` the tunnel, its lanes, the probe and
//! `check --connect` use, the QUIC endpoint kept across attempts.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use quinn::Endpoint;
use sallyport_proto::codes::close;
use sallyport_runtime::{
    code,
    link::{Connection, Transport},
    quic::counted::{counted_endpoint, UdpCounters},
    sync::read,
    tcp, tls,
};
use tracing::{debug, info};

use super::handshake::{hello, refusal, Session};
use super::*;
use crate::config::{RelayAddr, QUIC_WAIT};

/// Dials the relay and completes the control handshake within the handshake timeout; with
/// `answer_within`, the QUIC handshake must be done within that.
pub(super) async fn connect(
    relay: &RelayAddr,
    endpoint: &mut Option<Quic>,
    transport: Transport,
    tunnels: &Tunnels,
    answer_within: Option<Duration>,
    held: &[String],
) -> Result<Session, TunnelError> {
    let addr = tokio::net::lookup_host((relay.host.as_str(), relay.port))
        .await
        .map_err(TunnelError::Resolve)?
        .next()
        .ok_or(TunnelError::NoAddress)?;
    let quic;
    let via = match transport {
        Transport::Quic => {
            quic = endpoint_for(addr, endpoint)?;
            Via::Quic(&quic)
        }
        Transport::Tcp => Via::Tcp,
    };
    let (connection, (send, recv, welcome, replicas)) =
        dial(via, addr, &relay.server_name, tunnels, answer_within, |c| async move {
            hello(&c, tunnels, held).await
        })
        .await?;
    Ok((connection, send, recv, welcome, replicas))
}

/// Dials `addr` with the current client certificate and runs `first` (the control stream's
/// opening exchange) on the new connection, all within the handshake timeout; with
/// `answer_within`, the QUIC handshake must be done within that. A reason the relay closed with
/// beats "connection lost".
pub(crate) async fn dial<T, Fut>(
    via: Via<'_>,
    addr: SocketAddr,
    server_name: &str,
    tunnels: &Tunnels,
    answer_within: Option<Duration>,
    first: impl FnOnce(Connection) -> Fut,
) -> Result<(Connection, T), TunnelError>
where
    Fut: std::future::Future<Output = Result<T, TunnelError>>,
{
    let timeout = tunnels.config.get().timing.handshake_timeout;
    let handshake = async {
        let connection = match via {
            Via::Quic(endpoint) => {
                let client_config = read(&tunnels.client_config).clone();
                let connecting = endpoint.connect_with(client_config, addr, server_name)?;
                Connection::Quic(match answer_within {
                    None => connecting.await?,
                    Some(wait) => tokio::time::timeout(wait, connecting)
                        .await
                        .map_err(|_| TunnelError::NoAnswer(wait))??,
                })
            }
            Via::Tcp => {
                let connecting = connect_tcp(addr, server_name, tunnels);
                match answer_within {
                    None => connecting.await?,
                    Some(wait) => tokio::time::timeout(wait, connecting)
                        .await
                        .map_err(|_| TunnelError::NoAnswer(wait))??,
                }
            }
        };
        match first(connection.clone()).await {
            Ok(opened) => Ok((connection, opened)),
            Err(e) => Err(refusal(&connection).unwrap_or(e)),
        }
    };
    tokio::time::timeout(timeout, handshake).await.map_err(|_| TunnelError::Timeout(timeout))?
}

/// Whether `relay` can be reached over `transport`: the handshake (mutual TLS) only, closed at
/// once, so a running agent's tunnel is not disturbed. How long it took, or why not.
pub(crate) async fn probe(
    relay: &RelayAddr,
    transport: Transport,
    tunnels: &Tunnels,
) -> Result<Duration, TunnelError> {
    let addr = tokio::net::lookup_host((relay.host.as_str(), relay.port))
        .await
        .map_err(TunnelError::Resolve)?
        .next()
        .ok_or(TunnelError::NoAddress)?;
    let mut slot = None;
    let quic;
    let via = match transport {
        Transport::Quic => {
            quic = endpoint_for(addr, &mut slot)?;
            Via::Quic(&quic)
        }
        Transport::Tcp => Via::Tcp,
    };
    let started = Instant::now();
    let (connection, ()) =
        dial(via, addr, &relay.server_name, tunnels, Some(QUIC_WAIT), |_| async { Ok(()) }).await?;
    let took = started.elapsed();
    connection.close(code(close::NORMAL), b"check");
    if let Some(Quic { endpoint, .. }) = slot {
        let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    }
    Ok(took)
}

/// How a connection is dialed: QUIC from the slot's endpoint, or TLS over TCP.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Via<'a> {
    Quic(&'a Endpoint),
    Tcp,
}

/// TCP, then TLS with the agent's certificate, then HTTP/2 (the agent's end serves the relay's
/// streams).
pub(super) async fn connect_tcp(
    addr: SocketAddr,
    server_name: &str,
    tunnels: &Tunnels,
) -> Result<Connection, TunnelError> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| TunnelError::Tcp(format!("cannot connect to {addr}: {e}")))?;
    sallyport_runtime::tcp::tunnel_socket(&tcp);
    let config = read(&tunnels.tcp_config).clone();
    let name = tls::server_name(server_name).map_err(|e| TunnelError::Tcp(e.to_string()))?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| TunnelError::Tcp(format!("TLS handshake: {e}")))?;
    let peer = tcp::Peer::of(addr, tls.get_ref().1);
    let timing = tunnels.config.get().timing.clone();
    let settings = sallyport_runtime::tcp::tcp_agent(timing.keep_alive, timing.idle_timeout);
    Ok(Connection::Tcp(tcp::server(tls, peer, settings).await?))
}

/// The tunnel's UDP endpoint and what its socket has done.
#[derive(Debug)]
pub(super) struct Quic {
    pub(super) endpoint: Endpoint,
    pub(super) udp: Arc<UdpCounters>,
}

/// The tunnel's UDP endpoint, opened for the relay address's family and kept across attempts.
pub(super) fn endpoint_for(addr: SocketAddr, slot: &mut Option<Quic>) -> Result<Endpoint, TunnelError> {
    if let Some(quic) = slot {
        if quic.endpoint.local_addr().is_ok_and(|local| local.is_ipv4() == addr.is_ipv4()) {
            return Ok(quic.endpoint.clone());
        }
        info!(udp = %quic.udp.figures(), "QUIC socket replaced (the relay address changed family)");
    }
    let bind: SocketAddr =
        if addr.is_ipv4() { (Ipv4Addr::UNSPECIFIED, 0).into() } else { (Ipv6Addr::UNSPECIFIED, 0).into() };
    let socket = sallyport_runtime::quic::socket::quic_socket(bind).map_err(TunnelError::Socket)?;
    let (endpoint, udp) = counted_endpoint(sallyport_runtime::quic::socket::endpoint_config(), None, socket)
        .map_err(TunnelError::Socket)?;
    *slot = Some(Quic { endpoint: endpoint.clone(), udp });
    Ok(endpoint)
}

/// Moves the slot's endpoint to a new local port (or drops it, so the next attempt opens one).
pub(super) fn new_port(slot: &mut Option<Quic>) {
    let Some(quic) = slot else { return };
    let bind: SocketAddr = match quic.endpoint.local_addr() {
        Ok(local) if local.is_ipv6() => (Ipv6Addr::UNSPECIFIED, 0).into(),
        _ => (Ipv4Addr::UNSPECIFIED, 0).into(),
    };
    let moved = sallyport_runtime::quic::socket::quic_socket(bind).and_then(|socket| {
        sallyport_runtime::quic::counted::rebind_counted(&quic.endpoint, &quic.udp, socket)
    });
    if let Err(e) = moved {
        debug!(error = %e, "cannot move the QUIC endpoint to a new port: opening a new one");
        *slot = None;
    }
}
