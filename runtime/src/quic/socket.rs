//! The UDP socket of a QUIC endpoint (kernel buffers) and the endpoint configurations.

use std::{io, net::SocketAddr, sync::Arc};

use quinn::EndpointConfig;

use super::{MAX_UDP_PAYLOAD, UDP_SOCKET_BUFFER};

/// A UDP socket for a QUIC endpoint, bound to `addr`, with kernel buffers of [`UDP_SOCKET_BUFFER`]
/// each way where the system allows; says so in the log when the system keeps them smaller.
pub fn quic_socket(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let socket = buffered_udp_socket(addr)?;
    let granted = receive_buffer(&socket);
    // Said at every start: Windows' defaults (64 KiB) are small, and what a system grants varies.
    tracing::info!(
        receive_bytes = granted,
        send_bytes = send_buffer(&socket),
        wanted_bytes = UDP_SOCKET_BUFFER,
        "QUIC socket buffers"
    );
    if granted < UDP_SOCKET_BUFFER {
        tracing::warn!(
            granted_bytes = granted,
            wanted_bytes = UDP_SOCKET_BUFFER,
            "the system caps the UDP receive buffer: fast transfers may lose packets \
             (raise net.core.rmem_max, e.g. sysctl -w net.core.rmem_max=8388608)"
        );
    }
    Ok(socket)
}

/// A non-blocking UDP socket for a relay's UDP service, bound to `addr`, with kernel buffers of
/// [`UDP_SOCKET_BUFFER`] each way where the system allows. Linux's default receive buffer holds
/// a few hundred small datagrams, so a burst of DNS queries from many clients would otherwise be
/// dropped by the kernel before the relay has read them.
pub fn service_udp_socket(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let socket = buffered_udp_socket(addr)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

fn buffered_udp_socket(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Best effort: a system that refuses a bigger buffer still runs, only with more loss under load.
    let _ = socket.set_recv_buffer_size(UDP_SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(UDP_SOCKET_BUFFER);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// The receive buffer the kernel granted `socket`, in bytes (0 if it cannot say).
pub fn receive_buffer(socket: &std::net::UdpSocket) -> usize {
    granted(socket2::SockRef::from(socket).recv_buffer_size().unwrap_or(0))
}

/// A buffer size as the system reports it, as the bytes it granted: Linux reports twice the size
/// it granted (the other half is for its bookkeeping).
fn granted(reported: usize) -> usize {
    if cfg!(target_os = "linux") {
        reported / 2
    } else {
        reported
    }
}

/// The send buffer the kernel granted `socket`, in bytes (0 if it cannot say).
pub fn send_buffer(socket: &std::net::UdpSocket) -> usize {
    granted(socket2::SockRef::from(socket).send_buffer_size().unwrap_or(0))
}

/// An endpoint configuration that accepts packets up to [`MAX_UDP_PAYLOAD`] (quinn's default is
/// 1,472 bytes, which also caps what the peer's MTU discovery may try).
pub fn endpoint_config() -> EndpointConfig {
    let mut config = EndpointConfig::default();
    accept_large_packets(&mut config);
    config
}

fn accept_large_packets(config: &mut EndpointConfig) {
    // MAX_UDP_PAYLOAD is within quinn's accepted 1,200..=65,527 (checked at compile time above).
    config.max_udp_payload_size(MAX_UDP_PAYLOAD).expect("MAX_UDP_PAYLOAD within quinn's bounds");
}

/// An endpoint configuration whose stateless-reset key and connection-ID key are derived from
/// `secret` (the relay's private key). A relay restarted after a crash then recognizes the IDs of
/// its old connections and resets them on their first packet, so agents reconnect at once instead
/// of waiting out the idle timeout.
pub fn endpoint_with_stable_reset(secret: &[u8]) -> EndpointConfig {
    use quinn_proto::{ConnectionIdGenerator, HashedConnectionIdGenerator};
    use ring::{digest, hmac};
    let derive = |label: &[u8]| {
        let mut material = label.to_vec();
        material.extend_from_slice(secret);
        digest::digest(&digest::SHA256, &material)
    };
    let reset = derive(b"sallyport stateless reset key v1");
    let mut config = EndpointConfig::new(Arc::new(hmac::Key::new(hmac::HMAC_SHA256, reset.as_ref())));
    accept_large_packets(&mut config);
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&derive(b"sallyport connection id key v1").as_ref()[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    config.cid_generator(move || -> Box<dyn ConnectionIdGenerator> {
        Box::new(HashedConnectionIdGenerator::from_key(cid_key))
    });
    config
}
