//! How a tunnel ends: without the agent doing anything wrong, or because it broke the protocol.

use sallyport_runtime::FrameError;

/// Why a tunnel ended without the agent doing anything wrong (said in the log).
#[derive(Debug, thiserror::Error)]
pub(crate) enum Closed {
    /// The agent finished its control stream.
    #[error("control stream finished")]
    Finished,
    /// The control stream or the connection went away.
    #[error(transparent)]
    Stream(FrameError),
    /// The connection closed while datagrams were read.
    #[error(transparent)]
    Connection(quinn::ConnectionError),
    /// The certificate the session runs on ended (the agent renews well before; a copy does not).
    #[error("its certificate expired")]
    Expired,
}

/// How an agent broke the protocol (said in the log and in the close frame).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProtocolError {
    #[error("Hello sent twice")]
    HelloTwice,
    #[error("Lane sent on a tunnel's control stream")]
    LaneOnTunnel,
    #[error("Seek sent after the Hello")]
    SeekOnTunnel,
    /// A control frame that is not valid.
    #[error(transparent)]
    Frame(FrameError),
    /// A datagram that is not valid.
    #[error("invalid datagram: {0}")]
    Datagram(#[from] sallyport_proto::datagram::InvalidDatagram),
    /// Only the relay opens flows.
    #[error("the agent sent a flow-opening datagram")]
    OpenDatagram,
}

/// Sorts a frame error into the agent's fault or the stream's end (an encoding failure of the
/// relay's own message is handled where it is written).
pub(crate) fn frame_error(e: FrameError) -> Result<Closed, ProtocolError> {
    if e.is_protocol_violation() {
        Err(ProtocolError::Frame(e))
    } else {
        Ok(Closed::Stream(e))
    }
}
