//! Opening a data stream to an agent for one client connection.

use std::net::SocketAddr;

use sallyport_proto::{frame, EncodeError, StreamHeader, MAX_STREAM_HEADER};

use crate::config::Service;

/// Why a data stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OpenError {
    /// The tunnel closed, or will not carry another stream.
    #[error(transparent)]
    Connection(#[from] quinn::ConnectionError),
    /// The header does not fit its cap (a service name longer than names may be).
    #[error(transparent)]
    Header(#[from] EncodeError),
    /// The header could not be written.
    #[error(transparent)]
    Write(#[from] quinn::WriteError),
}

/// Opens a data stream for a client of `service` and writes its header, followed by `first`, in
/// one write (no round trip: the agent's answer is read by whoever reads the stream).
pub(crate) async fn open(
    connection: &sallyport_runtime::link::Connection,
    service: &Service,
    peer: SocketAddr,
    first: &[u8],
) -> Result<(sallyport_runtime::link::SendStream, sallyport_runtime::link::RecvStream), OpenError> {
    let (mut send, mut recv) = connection.open_bi().await?;
    // A client that stops reading holds its stream's window: at most the connection's share.
    connection.watch(&mut recv);
    let header = StreamHeader { service: service.name.clone(), client_addr: peer };
    let mut bytes = frame::encode_to_vec(&header, MAX_STREAM_HEADER)?;
    bytes.extend_from_slice(first);
    send.write_all(&bytes).await?;
    Ok((send, recv))
}
