//! Reading and writing whole frames on a tunnel's streams (either transport).

use quinn::ReadExactError;

use crate::link::{RecvStream, SendStream};
use serde::{de::DeserializeOwned, Serialize};

use sallyport_proto::frame::{self, EncodeError, InvalidFrame, LENGTH_PREFIX};

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("invalid frame from peer: {0}")]
    Invalid(#[from] InvalidFrame),
    #[error("cannot encode frame: {0}")]
    Encode(#[from] EncodeError),
    #[error("stream ended inside a frame")]
    Truncated,
    #[error("reading frame: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("writing frame: {0}")]
    Write(#[from] quinn::WriteError),
}

impl FrameError {
    /// True when the peer sent bytes that break the protocol (as opposed to the stream or the
    /// connection going away).
    pub fn is_protocol_violation(&self) -> bool {
        matches!(self, Self::Invalid(_) | Self::Truncated)
    }
}

/// Reads one frame of at most `max` body bytes. `Ok(None)` when the stream ends cleanly before the
/// first byte of a frame. `buf` is scratch space reused across calls.
pub async fn read_frame<T: DeserializeOwned>(
    recv: &mut RecvStream,
    max: usize,
    buf: &mut Vec<u8>,
) -> Result<Option<T>, FrameError> {
    let mut prefix = [0u8; LENGTH_PREFIX];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(ReadExactError::FinishedEarly(_)) => return Err(FrameError::Truncated),
        Err(ReadExactError::ReadError(e)) => return Err(e.into()),
    }
    let len = frame::body_length(prefix, max)?;
    buf.clear();
    buf.resize(len, 0);
    match recv.read_exact(buf).await {
        Ok(()) => {}
        Err(ReadExactError::FinishedEarly(_)) => return Err(FrameError::Truncated),
        Err(ReadExactError::ReadError(e)) => return Err(e.into()),
    }
    Ok(Some(frame::decode_body(buf)?))
}

/// Writes `msg` as one frame of at most `max` body bytes.
pub async fn write_frame<T: Serialize>(send: &mut SendStream, msg: &T, max: usize) -> Result<(), FrameError> {
    let bytes = frame::encode_to_vec(msg, max)?;
    send.write_all(&bytes).await?;
    Ok(())
}
