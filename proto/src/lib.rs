//! The Sallyport wire protocol.
//!
//! Everything in this crate is pure: message types and the functions that turn them
//! into bytes and back, over [`bytes::Buf`] and [`bytes::BufMut`], with no IO and no runtime. Decoders
//! keep "the buffer does not hold a whole frame yet" ([`DecodeError::Incomplete`]) apart from "these
//! bytes are not a valid frame" ([`DecodeError::Invalid`]); only the second closes a peer.
//!
//! The tokio/quinn helpers that relay and agent share (framed control stream, splice with reset
//! semantics, TLS and transport configuration) live in the `sallyport-runtime` crate.
#![forbid(unsafe_code)]

pub mod client_hello;
pub mod codes;
pub mod control;
pub mod datagram;
pub mod enroll;
pub mod frame;
pub mod health;
pub mod link;
pub mod name;
pub mod proxy;
pub mod stream;

pub use control::{
    AgentMessage, Command, ContainerAction, ContainerReport, Hello, RelayMessage, Replica, Replicas,
    ServiceOffer, ServiceVerdict, Welcome,
};
pub use frame::{DecodeError, EncodeError, InvalidFrame};
pub use health::{CheckKind, HealthCheck, ServiceHealth};
pub use name::is_valid_name;
pub use stream::{Answer, StreamHeader};

/// ALPN of a tunnel connection (mutual TLS, control stream + data streams).
pub const ALPN_TUNNEL: &[u8] = b"sallyport/1";

/// The newest protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 6;

/// The oldest protocol version this build still speaks.
pub const MIN_PROTOCOL_VERSION: u16 = 1;

/// The largest control-stream frame body either side sends or accepts.
pub const MAX_CONTROL_FRAME: usize = 64 * 1024;

/// The largest data-stream header body either side sends or accepts.
pub const MAX_STREAM_HEADER: usize = 1024;

/// Picks the protocol version two peers share: the highest one inside both ranges.
pub fn negotiate_version(peer_min: u16, peer_max: u16) -> Option<u16> {
    let high = peer_max.min(PROTOCOL_VERSION);
    let low = peer_min.max(MIN_PROTOCOL_VERSION);
    (low <= high).then_some(high)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_negotiation_picks_highest_common() {
        assert_eq!(negotiate_version(1, 1), Some(1));
        assert_eq!(negotiate_version(1, 9), Some(PROTOCOL_VERSION));
        assert_eq!(negotiate_version(PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 3), None);
        assert_eq!(negotiate_version(0, 0), None);
        assert_eq!(negotiate_version(3, 2), None);
    }
}
