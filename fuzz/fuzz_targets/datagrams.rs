//! Tunnel datagrams, and the link stream that carries them over TCP: any bytes decode or are
//! refused; a decoded datagram encodes to bytes that decode to the same datagram, at the length it
//! announces; link frames decode from a stream of bytes the same way whole or split anywhere, and
//! re-encode to the bytes they came from.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use sallyport_proto::{datagram::Datagram, link::LinkFrame};

fuzz_target!(|data: &[u8]| {
    if let Ok(datagram) = Datagram::decode(data) {
        let mut out = Vec::with_capacity(datagram.encoded_len());
        datagram.encode(&mut out);
        assert_eq!(out.len(), datagram.encoded_len());
        assert_eq!(Datagram::decode(&out).ok(), Some(datagram));
    }
    link_frames(data);
});

fn link_frames(data: &[u8]) {
    let whole = decode_all(&[data]);
    let split = data.len() / 2;
    assert_eq!(decode_all(&[&data[..split], &data[split..]]), whole, "a split changes nothing");
    let (frames, _) = whole;
    let mut again = BytesMut::new();
    for frame in &frames {
        frame.encode(&mut again);
    }
    assert!(data.starts_with(&again), "frames re-encode to the bytes they came from");
}

/// Frames decoded from `parts` fed in turn, and whether the bytes broke the format.
fn decode_all(parts: &[&[u8]]) -> (Vec<LinkFrame>, bool) {
    let (mut buf, mut frames) = (BytesMut::new(), Vec::new());
    for part in parts {
        buf.extend_from_slice(part);
        loop {
            match LinkFrame::decode(&mut buf) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(_) => return (frames, true),
            }
        }
    }
    (frames, false)
}
