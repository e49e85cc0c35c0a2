//! Length-prefixed frames: a big-endian `u32` body length, then a postcard body.
//!
//! [`check`] says whether a buffer holds a whole frame without consuming it; [`decode`] takes one
//! frame only when it is whole and valid; [`encode`] refuses bodies over the cap before writing.

use bytes::BufMut;
use serde::{de::DeserializeOwned, Serialize};

/// Bytes of the length prefix.
pub const LENGTH_PREFIX: usize = 4;

/// Why a buffer could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// Not a whole frame yet: read at least `needed` more bytes and try again.
    #[error("incomplete frame: {needed} more bytes needed")]
    Incomplete { needed: usize },
    /// The bytes can never become a valid frame: close the peer.
    #[error(transparent)]
    Invalid(#[from] InvalidFrame),
}

/// A frame that is malformed whatever follows it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvalidFrame {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("frame body is not a valid message: {0}")]
    Body(postcard::Error),
    #[error("{0} trailing bytes after the message in the frame body")]
    Trailing(usize),
}

/// Why a message could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("message of {len} bytes exceeds the frame limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("message cannot be serialized: {0}")]
    Serialize(#[from] postcard::Error),
}

/// Checks that `buf` starts with a whole frame of at most `max` body bytes, and returns the frame's
/// total length (prefix included). Consumes nothing.
pub fn check(buf: &[u8], max: usize) -> Result<usize, DecodeError> {
    let [a, b, c, d, ..] = *buf else {
        return Err(DecodeError::Incomplete { needed: LENGTH_PREFIX - buf.len() });
    };
    let len = body_length([a, b, c, d], max)?;
    let total = LENGTH_PREFIX + len;
    if buf.len() < total {
        return Err(DecodeError::Incomplete { needed: total - buf.len() });
    }
    Ok(total)
}

/// Reads the body length from a frame's prefix and checks it against `max`.
pub fn body_length(prefix: [u8; LENGTH_PREFIX], max: usize) -> Result<usize, InvalidFrame> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > max {
        return Err(InvalidFrame::TooLarge { len, max });
    }
    Ok(len)
}

/// Decodes a frame body (no prefix) into a message; the whole body must be one message.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, InvalidFrame> {
    let (msg, rest) = postcard::take_from_bytes(body).map_err(InvalidFrame::Body)?;
    if !rest.is_empty() {
        return Err(InvalidFrame::Trailing(rest.len()));
    }
    Ok(msg)
}

/// Decodes one frame from the front of `src` and returns the message with the number of bytes it
/// took (prefix included), so the caller can advance its buffer. Consumes nothing on error.
pub fn decode<T: DeserializeOwned>(src: &[u8], max: usize) -> Result<(T, usize), DecodeError> {
    let total = check(src, max)?;
    let msg = decode_body(&src[LENGTH_PREFIX..total])?;
    Ok((msg, total))
}

/// Encodes `msg` as one frame onto `dst`. Nothing is written when the body would exceed `max`.
pub fn encode<T: Serialize, B: BufMut>(msg: &T, max: usize, dst: &mut B) -> Result<(), EncodeError> {
    let body = postcard::to_stdvec(msg)?;
    if body.len() > max {
        return Err(EncodeError::TooLarge { len: body.len(), max });
    }
    // The cast cannot truncate: `max` is far below u32::MAX for every frame kind.
    dst.put_u32(body.len() as u32);
    dst.put_slice(&body);
    Ok(())
}

/// Encodes `msg` as one frame into a new vector.
pub fn encode_to_vec<T: Serialize>(msg: &T, max: usize) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::new();
    encode(msg, max, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{AgentMessage, Hello, ServiceOffer};

    fn hello() -> AgentMessage {
        AgentMessage::Hello(Hello {
            min_version: 1,
            max_version: 1,
            software: "sallyport-agent 0.1.0".into(),
            services: vec![ServiceOffer { name: "mssql".into() }],
        })
    }

    #[test]
    fn round_trip_and_consumed_length() {
        let mut buf = encode_to_vec(&hello(), 1024).expect("small message encodes");
        buf.extend_from_slice(b"next");
        let (msg, used): (AgentMessage, usize) = decode(&buf, 1024).expect("whole frame decodes");
        assert_eq!(msg, hello());
        assert_eq!(&buf[used..], b"next");
    }

    #[test]
    fn every_prefix_of_a_frame_is_incomplete() {
        let buf = encode_to_vec(&hello(), 1024).expect("small message encodes");
        for cut in 0..buf.len() {
            match decode::<AgentMessage>(&buf[..cut], 1024) {
                Err(DecodeError::Incomplete { needed }) => {
                    assert!(needed > 0 && needed <= buf.len() - cut, "cut {cut}: needed {needed}");
                }
                other => panic!("cut {cut}: expected incomplete, got {other:?}"),
            }
        }
    }

    #[test]
    fn oversized_length_prefix_is_invalid_before_the_body_arrives() {
        let prefix = ((MAX_LEN + 1) as u32).to_be_bytes();
        assert_eq!(
            decode::<AgentMessage>(&prefix, MAX_LEN),
            Err(DecodeError::Invalid(InvalidFrame::TooLarge { len: MAX_LEN + 1, max: MAX_LEN }))
        );
        assert_eq!(
            decode::<AgentMessage>(&u32::MAX.to_be_bytes(), MAX_LEN),
            Err(DecodeError::Invalid(InvalidFrame::TooLarge { len: u32::MAX as usize, max: MAX_LEN }))
        );
    }
    const MAX_LEN: usize = 64;

    #[test]
    fn oversized_message_is_not_encoded() {
        let big = AgentMessage::Hello(Hello {
            min_version: 1,
            max_version: 1,
            software: "x".repeat(100),
            services: vec![],
        });
        let mut out = Vec::new();
        assert!(matches!(encode(&big, MAX_LEN, &mut out), Err(EncodeError::TooLarge { .. })));
        assert!(out.is_empty(), "nothing written on refusal");
    }

    #[test]
    fn garbage_body_is_invalid() {
        let mut buf = vec![0, 0, 0, 3];
        buf.extend_from_slice(&[0xff, 0xff, 0xff]);
        assert!(matches!(
            decode::<AgentMessage>(&buf, 1024),
            Err(DecodeError::Invalid(InvalidFrame::Body(_)))
        ));
    }

    #[test]
    fn trailing_bytes_in_body_are_invalid() {
        let mut body = postcard::to_stdvec(&AgentMessage::Pong { nonce: 7 }).expect("encodes");
        body.push(0);
        let mut buf = (body.len() as u32).to_be_bytes().to_vec();
        buf.extend_from_slice(&body);
        assert_eq!(decode::<AgentMessage>(&buf, 1024), Err(DecodeError::Invalid(InvalidFrame::Trailing(1))));
    }
}
