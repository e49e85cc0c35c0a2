//! The agent's one way to dial a relay over TCP: connect, TLS with the given client
//! configuration, then HTTP/2 (the agent's end serves the streams the relay opens).

use std::{net::SocketAddr, sync::Arc};

use super::{
    connection::{Connection, Peer},
    setup::server,
    socket::{tunnel_socket, Settings},
};
use crate::tls;

/// Why a tunnel over TCP could not be set up, step by step.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect to {addr}: {source}")]
    Tcp { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    ServerName(#[from] tls::TlsError),
    /// The TLS handshake failed (a pin check's verdict, if any, is on its `PinCheck`).
    #[error("TLS handshake: {0}")]
    Tls(std::io::Error),
    #[error("HTTP/2: {0}")]
    Http2(#[from] quinn::ConnectionError),
}

/// TCP to `addr`, TLS naming `server_name` with `config`, then HTTP/2 with `settings`.
pub async fn connect(
    addr: SocketAddr,
    server_name: &str,
    config: Arc<rustls::ClientConfig>,
    settings: Settings,
) -> Result<Connection, ConnectError> {
    let tcp =
        tokio::net::TcpStream::connect(addr).await.map_err(|source| ConnectError::Tcp { addr, source })?;
    tunnel_socket(&tcp);
    let name = tls::server_name(server_name)?;
    let tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.map_err(ConnectError::Tls)?;
    let peer = Peer::of(addr, tls.get_ref().1);
    Ok(server(tls, peer, settings).await?)
}
