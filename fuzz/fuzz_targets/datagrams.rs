//! Tunnel datagrams: any bytes decode or are refused, and a decoded datagram encodes to bytes
//! that decode to the same datagram, at the length it announces.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sallyport_proto::datagram::Datagram;

fuzz_target!(|data: &[u8]| {
    if let Ok(datagram) = Datagram::decode(data) {
        let mut out = Vec::with_capacity(datagram.encoded_len());
        datagram.encode(&mut out);
        assert_eq!(out.len(), datagram.encoded_len());
        assert_eq!(Datagram::decode(&out).ok(), Some(datagram));
    }
});
