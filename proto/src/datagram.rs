//! UDP flows carried as QUIC datagrams.
//!
//! A flow is one client address on one UDP service of the relay. The relay numbers flows; every
//! datagram starts with a kind byte and the flow id (big-endian `u32`), and the rest is the UDP
//! payload, untouched. Datagrams are unreliable, so the agent cannot be told about a new flow on a
//! separate channel without losing the first packets: until the agent has answered a flow, the relay
//! sends it as [`Datagram::Open`], which also names the service and the client. An agent that meets a
//! [`Datagram::Data`] for a flow it does not know (it expired the flow, or restarted) answers
//! [`Datagram::Unknown`], and the relay goes back to `Open` for that flow.
//!
//! Layout (after the kind byte and flow id):
//! - `Open` (0): family (4 or 6), address (4 or 16 bytes), port (`u16`), service name length (`u8`),
//!   service name, payload;
//! - `Data` (1): payload;
//! - `Unknown` (2): nothing.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::BufMut;

const OPEN: u8 = 0;
const DATA: u8 = 1;
const UNKNOWN: u8 = 2;

/// Bytes before the payload of a `Data` datagram.
pub const DATA_OVERHEAD: usize = 5;

/// Bytes before the payload of an `Open` datagram, at most (IPv6 client, 63-byte service name).
pub const MAX_OPEN_OVERHEAD: usize = 5 + 1 + 16 + 2 + 1 + 63;

/// One datagram of a UDP flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datagram<'a> {
    /// Relay to agent, until the agent has answered the flow: which service, which client.
    Open { flow: u32, service: &'a str, client: SocketAddr, payload: &'a [u8] },
    /// Either way: a payload of a flow both sides know.
    Data { flow: u32, payload: &'a [u8] },
    /// Agent to relay: "no such flow here", so the relay sends `Open` again.
    Unknown { flow: u32 },
}

/// A datagram that is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidDatagram {
    #[error("datagram of {0} bytes is too short")]
    Short(usize),
    #[error("unknown datagram kind {0}")]
    Kind(u8),
    #[error("unknown address family {0}")]
    Family(u8),
    #[error("service name is not a valid name")]
    Service,
}

/// The header of a `Data` datagram of `flow`, for writers that put the payload in place first.
pub fn data_header(flow: u32) -> [u8; DATA_OVERHEAD] {
    let [a, b, c, d] = flow.to_be_bytes();
    [DATA, a, b, c, d]
}

impl<'a> Datagram<'a> {
    /// The flow this datagram belongs to.
    pub fn flow(&self) -> u32 {
        match *self {
            Self::Open { flow, .. } | Self::Data { flow, .. } | Self::Unknown { flow } => flow,
        }
    }

    /// Bytes the datagram takes on the wire.
    pub fn encoded_len(&self) -> usize {
        match self {
            Self::Open { service, client, payload, .. } => {
                5 + 1 + if client.is_ipv4() { 4 } else { 16 } + 2 + 1 + service.len() + payload.len()
            }
            Self::Data { payload, .. } => DATA_OVERHEAD + payload.len(),
            Self::Unknown { .. } => 5,
        }
    }

    /// Writes the datagram. A service name over 255 bytes is cut to its length byte's range; names
    /// come from validated configs (at most 63 bytes).
    pub fn encode(&self, out: &mut impl BufMut) {
        match *self {
            Self::Open { flow, service, client, payload } => {
                out.put_u8(OPEN);
                out.put_u32(flow);
                match client.ip() {
                    IpAddr::V4(ip) => {
                        out.put_u8(4);
                        out.put_slice(&ip.octets());
                    }
                    IpAddr::V6(ip) => {
                        out.put_u8(6);
                        out.put_slice(&ip.octets());
                    }
                }
                out.put_u16(client.port());
                let name = &service.as_bytes()[..service.len().min(255)];
                out.put_u8(name.len() as u8);
                out.put_slice(name);
                out.put_slice(payload);
            }
            Self::Data { flow, payload } => {
                out.put_u8(DATA);
                out.put_u32(flow);
                out.put_slice(payload);
            }
            Self::Unknown { flow } => {
                out.put_u8(UNKNOWN);
                out.put_u32(flow);
            }
        }
    }

    /// Reads one datagram; the payload borrows from `src`.
    pub fn decode(src: &'a [u8]) -> Result<Self, InvalidDatagram> {
        let short = || InvalidDatagram::Short(src.len());
        let [kind, a, b, c, d, ref rest @ ..] = *src else { return Err(short()) };
        let flow = u32::from_be_bytes([a, b, c, d]);
        match kind {
            DATA => Ok(Self::Data { flow, payload: rest }),
            UNKNOWN => Ok(Self::Unknown { flow }),
            OPEN => {
                let (&family, rest) = rest.split_first().ok_or_else(short)?;
                let (ip, rest) = match family {
                    4 => {
                        let (ip, rest) = rest.split_first_chunk::<4>().ok_or_else(short)?;
                        (IpAddr::V4(Ipv4Addr::from(*ip)), rest)
                    }
                    6 => {
                        let (ip, rest) = rest.split_first_chunk::<16>().ok_or_else(short)?;
                        (IpAddr::V6(Ipv6Addr::from(*ip)), rest)
                    }
                    other => return Err(InvalidDatagram::Family(other)),
                };
                let (port, rest) = rest.split_first_chunk::<2>().ok_or_else(short)?;
                let (&len, rest) = rest.split_first().ok_or_else(short)?;
                let (name, payload) = rest.split_at_checked(usize::from(len)).ok_or_else(short)?;
                let service = std::str::from_utf8(name)
                    .ok()
                    .filter(|n| crate::name::is_valid_name(n))
                    .ok_or(InvalidDatagram::Service)?;
                Ok(Self::Open {
                    flow,
                    service,
                    client: SocketAddr::new(ip, u16::from_be_bytes(*port)),
                    payload,
                })
            }
            other => Err(InvalidDatagram::Kind(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn round_trip(d: Datagram<'_>) {
        let mut out = Vec::new();
        d.encode(&mut out);
        assert_eq!(out.len(), d.encoded_len());
        assert_eq!(Datagram::decode(&out), Ok(d));
    }

    #[test]
    fn each_kind_round_trips() {
        round_trip(Datagram::Data { flow: 7, payload: b"query" });
        round_trip(Datagram::Data { flow: u32::MAX, payload: b"" });
        round_trip(Datagram::Unknown { flow: 3 });
        let mut out = data_header(9).to_vec();
        out.extend_from_slice(b"x");
        assert_eq!(Datagram::decode(&out), Ok(Datagram::Data { flow: 9, payload: b"x" }));
        round_trip(Datagram::Open {
            flow: 1,
            service: "dns",
            client: "10.1.2.3:5353".parse().unwrap(),
            payload: b"\x12\x34",
        });
        round_trip(Datagram::Open {
            flow: 2,
            service: &"a".repeat(63),
            client: "[fd00::1]:9".parse().unwrap(),
            payload: b"",
        });
    }

    #[test]
    fn open_layout_is_as_documented() {
        let mut out = Vec::new();
        Datagram::Open {
            flow: 0x0102_0304,
            service: "dns",
            client: "10.0.0.9:53".parse().unwrap(),
            payload: b"Q",
        }
        .encode(&mut out);
        assert_eq!(out, b"\x00\x01\x02\x03\x04\x04\x0a\x00\x00\x09\x00\x35\x03dnsQ");
    }

    #[test]
    fn bad_datagrams_are_named() {
        assert_eq!(Datagram::decode(b"\x01\x00\x00"), Err(InvalidDatagram::Short(3)));
        assert_eq!(Datagram::decode(b"\x09\x00\x00\x00\x00"), Err(InvalidDatagram::Kind(9)));
        assert_eq!(Datagram::decode(b"\x00\x00\x00\x00\x01\x05"), Err(InvalidDatagram::Family(5)));
        assert_eq!(
            Datagram::decode(b"\x00\x00\x00\x00\x01\x04\x0a\x00\x00\x09\x00\x35\x03DNS"),
            Err(InvalidDatagram::Service)
        );
        assert!(matches!(
            Datagram::decode(b"\x00\x00\x00\x00\x01\x04\x0a\x00\x00\x09\x00\x35\x09dns"),
            Err(InvalidDatagram::Short(_))
        ));
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = Datagram::decode(&bytes);
        }
    }
}
