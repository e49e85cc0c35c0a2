//! The link stream of a tunnel over TCP.
//!
//! Over TCP, a tunnel's streams are HTTP/2 streams on one TLS connection. QUIC gives a tunnel two
//! things HTTP/2 has no frame for: unreliable datagrams (UDP services) and a close with an
//! application code and reason (`REFUSED`, `GOING_AWAY`, ...). Both travel on one stream of their
//! own, the link stream, as frames: a kind byte, a 4-byte big-endian length, the payload.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Bytes before a link frame's payload: kind, then length.
pub const LINK_HEADER: usize = 5;

/// The largest datagram a link frame carries (a UDP payload can be no larger).
pub const MAX_LINK_DATAGRAM: usize = 65_535;

/// The longest close reason sent or accepted.
pub const MAX_CLOSE_REASON: usize = 1024;

const KIND_DATAGRAM: u8 = 0;
const KIND_CLOSE: u8 = 1;

/// One frame on the link stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkFrame {
    /// A datagram, as QUIC's DATAGRAM frame carries one.
    Datagram(Bytes),
    /// The sender closes the connection, as QUIC's application CONNECTION_CLOSE does.
    Close { code: u32, reason: Bytes },
}

/// Why bytes on the link stream are not a link frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidLink {
    #[error("unknown link frame kind {0}")]
    Kind(u8),
    #[error("link frame of {len} bytes is over the cap of {max}")]
    TooLong { len: usize, max: usize },
    #[error("close frame of {0} bytes has no room for its code")]
    ShortClose(usize),
}

impl LinkFrame {
    /// Appends the frame to `out`. A datagram over [`MAX_LINK_DATAGRAM`] or a reason over
    /// [`MAX_CLOSE_REASON`] is cut to the cap (callers check datagram sizes first).
    pub fn encode(&self, out: &mut BytesMut) {
        match self {
            Self::Datagram(bytes) => {
                let bytes = &bytes[..bytes.len().min(MAX_LINK_DATAGRAM)];
                out.reserve(LINK_HEADER + bytes.len());
                out.put_u8(KIND_DATAGRAM);
                out.put_u32(bytes.len() as u32);
                out.put_slice(bytes);
            }
            Self::Close { code, reason } => {
                let reason = &reason[..reason.len().min(MAX_CLOSE_REASON)];
                out.reserve(LINK_HEADER + 4 + reason.len());
                out.put_u8(KIND_CLOSE);
                out.put_u32(4 + reason.len() as u32);
                out.put_u32(*code);
                out.put_slice(reason);
            }
        }
    }

    /// Takes one whole frame off the front of `buf`: `Ok(None)` while `buf` holds less than a
    /// frame (nothing is taken), an error when the bytes cannot be a frame.
    pub fn decode(buf: &mut BytesMut) -> Result<Option<Self>, InvalidLink> {
        if buf.len() < LINK_HEADER {
            return Ok(None);
        }
        let kind = buf[0];
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        let max = match kind {
            KIND_DATAGRAM => MAX_LINK_DATAGRAM,
            KIND_CLOSE => 4 + MAX_CLOSE_REASON,
            other => return Err(InvalidLink::Kind(other)),
        };
        if len > max {
            return Err(InvalidLink::TooLong { len, max });
        }
        if kind == KIND_CLOSE && len < 4 {
            return Err(InvalidLink::ShortClose(len));
        }
        if buf.len() < LINK_HEADER + len {
            return Ok(None);
        }
        buf.advance(LINK_HEADER);
        let mut payload = buf.split_to(len).freeze();
        Ok(Some(match kind {
            KIND_DATAGRAM => Self::Datagram(payload),
            _ => {
                let code = payload.get_u32();
                Self::Close { code, reason: payload }
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_whole_and_byte_by_byte() {
        let frames = [
            LinkFrame::Datagram(Bytes::from_static(b"hello")),
            LinkFrame::Datagram(Bytes::new()),
            LinkFrame::Close { code: 5, reason: Bytes::from_static(b"held") },
        ];
        let mut wire = BytesMut::new();
        for f in &frames {
            f.encode(&mut wire);
        }
        let all = wire.clone();
        let mut got = Vec::new();
        while let Some(f) = LinkFrame::decode(&mut wire).expect("valid") {
            got.push(f);
        }
        assert_eq!(got, frames);
        // Fed one byte at a time, nothing decodes early and everything decodes in the end.
        let (mut buf, mut got) = (BytesMut::new(), Vec::new());
        for b in all.iter() {
            buf.put_u8(*b);
            while let Some(f) = LinkFrame::decode(&mut buf).expect("valid") {
                got.push(f);
            }
        }
        assert_eq!(got, frames);
    }

    #[test]
    fn bad_frames_are_named() {
        let mut b = BytesMut::from(&[9u8, 0, 0, 0, 0][..]);
        assert_eq!(LinkFrame::decode(&mut b), Err(InvalidLink::Kind(9)));
        let mut b = BytesMut::from(&[0u8, 0, 1, 0, 1][..]);
        assert!(matches!(LinkFrame::decode(&mut b), Err(InvalidLink::TooLong { .. })));
        let mut b = BytesMut::from(&[1u8, 0, 0, 0, 2, 0, 0][..]);
        assert_eq!(LinkFrame::decode(&mut b), Err(InvalidLink::ShortClose(2)));
    }
}
