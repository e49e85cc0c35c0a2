//! PROXY protocol version 2 headers, which the agent writes to targets that opt in so they see the
//! client's real address (HAProxy's `proxy-protocol.txt`, section 2.2).

use std::net::{IpAddr, SocketAddr};

/// The 12-byte signature every version 2 header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Version 2 in the high nibble; the command in the low one.
const CMD_LOCAL: u8 = 0x20;
const CMD_PROXY: u8 = 0x21;
/// Address family (high nibble) and transport (low nibble).
const TCP4: u8 = 0x11;
const UDP4: u8 = 0x12;
const TCP6: u8 = 0x21;
const UDP6: u8 = 0x22;

/// The transport the proxied connection used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Stream,
    Datagram,
}

/// The header for a connection from `source` (the client) to `destination` (the address it
/// connected to). Mixed families are sent as IPv6, with the IPv4 side mapped (`::ffff:a.b.c.d`).
pub fn header(source: SocketAddr, destination: SocketAddr, transport: Transport) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + 36);
    out.extend_from_slice(&SIGNATURE);
    out.push(CMD_PROXY);
    match (source.ip(), destination.ip()) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            out.push(if transport == Transport::Stream { TCP4 } else { UDP4 });
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&src.octets());
            out.extend_from_slice(&dst.octets());
        }
        (src, dst) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.push(if transport == Transport::Stream { TCP6 } else { UDP6 });
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(src).octets());
            out.extend_from_slice(&v6(dst).octets());
        }
    }
    out.extend_from_slice(&source.port().to_be_bytes());
    out.extend_from_slice(&destination.port().to_be_bytes());
    out
}

/// The header of a connection made by the proxy itself (health checks): the receiver uses the real
/// connection endpoints.
pub fn local() -> [u8; 16] {
    let mut out = [0; 16];
    out[..12].copy_from_slice(&SIGNATURE);
    out[12] = CMD_LOCAL;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_the_specifications() {
        // Section 2.2: \x0D \x0A \x0D \x0A \x00 \x0D \x0A \x51 \x55 \x49 \x54 \x0A
        assert_eq!(SIGNATURE, [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A]);
    }

    #[test]
    fn tcp4_header_matches_the_specification_layout() {
        // 13th byte 0x21 (version 2, PROXY); 14th 0x11 (AF_INET, STREAM); length 12; then
        // src_addr, dst_addr, src_port, dst_port in network byte order (section 2.2).
        let h = header(
            "192.168.4.20:51000".parse().unwrap(),
            "10.0.0.5:5432".parse().unwrap(),
            Transport::Stream,
        );
        let mut expected = SIGNATURE.to_vec();
        expected.extend_from_slice(&[0x21, 0x11, 0x00, 0x0C]);
        expected.extend_from_slice(&[192, 168, 4, 20, 10, 0, 0, 5]);
        expected.extend_from_slice(&[0xC7, 0x38, 0x15, 0x38]);
        assert_eq!(h, expected);
        assert_eq!(h.len(), 16 + 12);
    }

    #[test]
    fn tcp6_and_mixed_families() {
        let h = header("[2001:db8::1]:443".parse().unwrap(), "[::1]:80".parse().unwrap(), Transport::Stream);
        assert_eq!(&h[12..16], &[0x21, 0x21, 0x00, 0x24]);
        assert_eq!(h.len(), 16 + 36);
        assert_eq!(&h[16..18], &[0x20, 0x01]);
        assert_eq!(&h[48..52], &[0x01, 0xBB, 0x00, 0x50]);
        let mixed =
            header("10.1.2.3:1000".parse().unwrap(), "[::1]:80".parse().unwrap(), Transport::Datagram);
        assert_eq!(&mixed[12..14], &[0x21, 0x22]);
        assert_eq!(&mixed[16..32], &"::ffff:10.1.2.3".parse::<std::net::Ipv6Addr>().unwrap().octets());
    }

    #[test]
    fn local_command_has_no_addresses() {
        let l = local();
        assert_eq!(&l[12..], &[0x20, 0x00, 0x00, 0x00]);
    }
}
