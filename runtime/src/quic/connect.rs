//! The agent's end of QUIC: a client endpoint kept across attempts (its socket's system calls
//! counted), moved to a new port on demand, and the one connect.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use quinn::Endpoint;

use super::{
    counted::{counted_endpoint, rebind_counted, UdpCounters, UdpFigures},
    socket::{endpoint_config, quic_socket},
};
use crate::addr::unspecified_like;

/// A client endpoint and what its socket has done.
#[derive(Debug)]
pub struct ClientEndpoint {
    endpoint: Endpoint,
    udp: Arc<UdpCounters>,
}

impl ClientEndpoint {
    /// A new endpoint on a fresh socket of `relay`'s address family.
    pub fn open(relay: SocketAddr) -> io::Result<Self> {
        let socket = quic_socket(unspecified_like(relay))?;
        let (endpoint, udp) = counted_endpoint(endpoint_config(), None, socket)?;
        Ok(Self { endpoint, udp })
    }

    /// The endpoint kept in `slot` when it can reach `relay` (same family), else a new one put
    /// there.
    pub fn reuse_or_open(slot: &mut Option<Self>, relay: SocketAddr) -> io::Result<Endpoint> {
        if let Some(kept) = slot {
            if kept.endpoint.local_addr().is_ok_and(|local| local.is_ipv4() == relay.is_ipv4()) {
                return Ok(kept.endpoint.clone());
            }
            tracing::info!(udp = %kept.udp.figures(), "QUIC socket replaced (the relay address changed family)");
        }
        let opened = Self::open(relay)?;
        let endpoint = opened.endpoint.clone();
        *slot = Some(opened);
        Ok(endpoint)
    }

    /// Moves the endpoint in `slot` to a new local port (through a shared address, a new flow may
    /// land on another server), or empties the slot so the next attempt opens one.
    pub fn new_port(slot: &mut Option<Self>) {
        let Some(kept) = slot else { return };
        let bind = match kept.endpoint.local_addr() {
            Ok(local) => unspecified_like(local),
            Err(_) => unspecified_like(SocketAddr::from(([0, 0, 0, 0], 0))),
        };
        let moved = quic_socket(bind).and_then(|socket| rebind_counted(&kept.endpoint, &kept.udp, socket));
        if let Err(e) = moved {
            tracing::debug!(error = %e, "cannot move the QUIC endpoint to a new port: opening a new one");
            *slot = None;
        }
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The socket's system calls and datagrams so far.
    pub fn figures(&self) -> UdpFigures {
        self.udp.figures()
    }

    /// Waits (a second at most) for the endpoint's connections to finish closing; the figures.
    pub async fn close(self) -> UdpFigures {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
        self.udp.figures()
    }
}

/// Why a QUIC connection attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot start the connection: {0}")]
    Start(#[from] quinn::ConnectError),
    #[error("{0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Nothing came back within the wait asked for.
    #[error("no answer from the relay within {0:?}")]
    NoAnswer(Duration),
}

/// Connects from `endpoint` to `addr` naming `server_name`; with `answer_within`, the handshake
/// must be done within that.
pub async fn connect(
    endpoint: &Endpoint,
    config: quinn::ClientConfig,
    addr: SocketAddr,
    server_name: &str,
    answer_within: Option<Duration>,
) -> Result<quinn::Connection, ConnectError> {
    let connecting = endpoint.connect_with(config, addr, server_name)?;
    Ok(match answer_within {
        None => connecting.await?,
        Some(wait) => {
            tokio::time::timeout(wait, connecting).await.map_err(|_| ConnectError::NoAnswer(wait))??
        }
    })
}
