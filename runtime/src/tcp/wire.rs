//! How the tunnel maps onto HTTP/2: the limits each end sets, the two request paths, and QUIC's
//! codes and errors as HTTP/2 reasons.

use std::time::Duration;

use h2::Reason;
use quinn::{ConnectionError, VarInt};

/// The largest HTTP/2 frame either end accepts: fewer frames in bulk, and another stream waits at
/// most one such frame for its turn.
pub(super) const MAX_FRAME: u32 = 64 * 1024;
/// Streams the relay may have open on one connection (QUIC's cap on data streams).
pub(super) const MAX_STREAMS: u32 = crate::limits::MAX_DATA_STREAMS;
/// Bytes of one stream buffered for sending, at most (beyond that, writes wait): one read of a
/// splice, what the relay's memory budget counts per client connection, however wide the windows
/// the peer grants.
pub(super) const SEND_BUFFER: usize = crate::limits::MAX_READ;
/// Datagrams waiting to be sent, at most: beyond that they are dropped, as QUIC drops them.
pub(super) const DATAGRAM_QUEUE: usize = 512;
/// Bytes of datagrams waiting to be read, at most (QUIC's receive buffer): beyond that, and on a
/// connection that is not a tunnel, they are dropped.
pub(super) const DATAGRAM_RECEIVE_BUFFER: usize = crate::limits::DATAGRAM_RECEIVE_BUFFER;
/// The largest header list either end accepts: the link's headers are a path and a status, so a
/// peer sending more is either broken or trying to make this end buffer it.
pub(super) const MAX_HEADER_LIST: u32 = 8 * 1024;

/// What a TCP peer that has not proven who it is can make the relay hold at most: its small
/// windows' worth of stream data, a header block cut at [`MAX_HEADER_LIST`] plus the frame that
/// crossed it, one frame being read, and the TLS session's record buffers. Its datagrams are
/// dropped, and the relay sends it nothing but two requests.
pub const UNAUTHENTICATED_HOLD: u64 = crate::limits::UNAUTHENTICATED_RECEIVE_WINDOW as u64
    + MAX_HEADER_LIST as u64
    + 2 * MAX_FRAME as u64
    + 48 * 1024;
/// How long a closing connection has to get its close frame out.
pub(super) const CLOSE_GRACE: Duration = Duration::from_millis(250);

pub(super) const LINK_PATH: &str = "/link";
pub(super) const STREAM_PATH: &str = "/stream";

pub(super) fn code_of(reason: Reason) -> VarInt {
    VarInt::from_u32(u32::from(reason))
}

pub(super) fn request(path: &str) -> http::Request<()> {
    let mut request = http::Request::new(());
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = http::Uri::from_static(if path == LINK_PATH { LINK_PATH } else { STREAM_PATH });
    request
}

pub(super) fn h2_lost(e: &h2::Error) -> ConnectionError {
    if e.is_io() {
        ConnectionError::Reset
    } else {
        ConnectionError::TransportError(quinn_proto::TransportError {
            code: quinn_proto::TransportErrorCode::PROTOCOL_VIOLATION,
            frame: None,
            reason: format!("HTTP/2: {e}"),
        })
    }
}

pub(super) fn protocol_violation(reason: &str) -> ConnectionError {
    ConnectionError::TransportError(quinn_proto::TransportError {
        code: quinn_proto::TransportErrorCode::PROTOCOL_VIOLATION,
        frame: None,
        reason: reason.to_owned(),
    })
}

pub(super) fn reason_of(code: VarInt) -> Reason {
    Reason::from(u32::try_from(code.into_inner()).unwrap_or(u32::MAX))
}
