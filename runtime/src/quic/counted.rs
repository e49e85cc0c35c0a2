//! A QUIC socket that counts its system calls and the datagrams they carry, so segmentation
//! offload is a measured fact rather than an assumption: with GSO one send call carries up to
//! [`UdpFigures::gso_segments`] datagrams, with GRO one receive call returns several.
//!
//! The counting wraps quinn's own socket for the running runtime and changes nothing it does.

use std::{
    fmt,
    io::{self, IoSliceMut},
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
};

use quinn::{
    udp::{RecvMeta, Transmit},
    AsyncUdpSocket, Endpoint, EndpointConfig, ServerConfig, UdpPoller,
};

/// What a counted socket has done since it was opened.
#[derive(Debug, Default)]
pub struct UdpCounters {
    send_calls: AtomicU64,
    sent: AtomicU64,
    receive_calls: AtomicU64,
    received: AtomicU64,
    gso_segments: AtomicU64,
    gro_segments: AtomicU64,
}

/// A snapshot of [`UdpCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UdpFigures {
    /// System calls that sent datagrams, and the datagrams they sent.
    pub send_calls: u64,
    pub sent: u64,
    /// System calls that returned datagrams, and the datagrams they returned.
    pub receive_calls: u64,
    pub received: u64,
    /// The most datagrams the platform sends in one call (1: no GSO) and returns in one call
    /// (1: no GRO).
    pub gso_segments: u64,
    pub gro_segments: u64,
}

impl UdpCounters {
    pub fn figures(&self) -> UdpFigures {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        UdpFigures {
            send_calls: get(&self.send_calls),
            sent: get(&self.sent),
            receive_calls: get(&self.receive_calls),
            received: get(&self.received),
            gso_segments: get(&self.gso_segments),
            gro_segments: get(&self.gro_segments),
        }
    }
}

impl UdpFigures {
    /// Datagrams per send call (1.0 when nothing was sent).
    pub fn sent_per_call(&self) -> f64 {
        ratio(self.sent, self.send_calls)
    }

    /// Datagrams per receive call (1.0 when nothing was received).
    pub fn received_per_call(&self) -> f64 {
        ratio(self.received, self.receive_calls)
    }

    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &UdpFigures) -> UdpFigures {
        UdpFigures {
            send_calls: self.send_calls.saturating_sub(earlier.send_calls),
            sent: self.sent.saturating_sub(earlier.sent),
            receive_calls: self.receive_calls.saturating_sub(earlier.receive_calls),
            received: self.received.saturating_sub(earlier.received),
            ..*self
        }
    }
}

fn ratio(n: u64, calls: u64) -> f64 {
    if calls == 0 {
        1.0
    } else {
        n as f64 / calls as f64
    }
}

impl fmt::Display for UdpFigures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sent {} datagrams in {} calls ({:.2} a call, GSO up to {}), received {} in {} calls \
             ({:.2} a call, GRO up to {})",
            self.sent,
            self.send_calls,
            self.sent_per_call(),
            self.gso_segments,
            self.received,
            self.receive_calls,
            self.received_per_call(),
            self.gro_segments,
        )
    }
}

#[derive(Debug)]
struct Counted {
    inner: Arc<dyn AsyncUdpSocket>,
    counters: Arc<UdpCounters>,
}

impl AsyncUdpSocket for Counted {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.inner.try_send(transmit)?;
        let datagrams = match transmit.segment_size {
            Some(size) if size > 0 => transmit.contents.len().div_ceil(size),
            _ => 1,
        };
        self.counters.send_calls.fetch_add(1, Ordering::Relaxed);
        self.counters.sent.fetch_add(datagrams as u64, Ordering::Relaxed);
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let polled = self.inner.poll_recv(cx, bufs, meta);
        if let Poll::Ready(Ok(messages)) = &polled {
            let datagrams: usize = meta[..*messages]
                .iter()
                .map(|m| if m.stride == 0 { 1 } else { m.len.div_ceil(m.stride) })
                .sum();
            self.counters.receive_calls.fetch_add(1, Ordering::Relaxed);
            self.counters.received.fetch_add(datagrams as u64, Ordering::Relaxed);
        }
        polled
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

/// A quinn endpoint on `socket` whose system calls are counted.
pub fn counted_endpoint(
    config: EndpointConfig,
    server: Option<ServerConfig>,
    socket: std::net::UdpSocket,
) -> io::Result<(Endpoint, Arc<UdpCounters>)> {
    let runtime = quinn::default_runtime().ok_or_else(|| io::Error::other("no async runtime for QUIC"))?;
    let inner = runtime.wrap_udp_socket(socket)?;
    let counters = Arc::new(UdpCounters::default());
    counters.gso_segments.store(inner.max_transmit_segments() as u64, Ordering::Relaxed);
    counters.gro_segments.store(inner.max_receive_segments() as u64, Ordering::Relaxed);
    let socket = Arc::new(Counted { inner, counters: counters.clone() });
    let endpoint = Endpoint::new_with_abstract_socket(config, server, socket, runtime)?;
    Ok((endpoint, counters))
}

/// Moves `endpoint` (made by [`counted_endpoint`] with `counters`) to `socket`: a new local port,
/// so its next connection is a new flow for every NAT and load balancer on the way, without a new
/// endpoint (and its receive buffers).
pub fn rebind_counted(
    endpoint: &Endpoint,
    counters: &Arc<UdpCounters>,
    socket: std::net::UdpSocket,
) -> io::Result<()> {
    let runtime = quinn::default_runtime().ok_or_else(|| io::Error::other("no async runtime for QUIC"))?;
    let inner = runtime.wrap_udp_socket(socket)?;
    endpoint.rebind_abstract(Arc::new(Counted { inner, counters: counters.clone() }))
}

// Not under wine: its Winsock refuses a socket option quinn-udp sets on every QUIC socket
// (WSAEOPNOTSUPP, 10045), so no QUIC endpoint opens there; these run on Linux.
#[cfg(all(test, not(windows)))]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_connection_over_loopback_is_counted_on_both_ends() {
        let identity = identity_pair();
        let bind = SocketAddr::from(([127, 0, 0, 1], 0));
        let socket = |addr| std::net::UdpSocket::bind(addr).expect("bind");
        let (server, server_counts) =
            counted_endpoint(EndpointConfig::default(), Some(identity.server), socket(bind)).expect("server");
        let (mut client, client_counts) =
            counted_endpoint(EndpointConfig::default(), None, socket(bind)).expect("client");
        client.set_default_client_config(identity.client);
        let addr = server.local_addr().expect("addr");
        let accept = tokio::spawn(async move {
            let connection = server.accept().await.expect("incoming").await.expect("accepted");
            let mut recv = connection.accept_uni().await.expect("stream");
            let data = recv.read_to_end(1 << 20).await.expect("read");
            (data.len(), server)
        });
        let connection = client.connect(addr, "relay.test").expect("connect").await.expect("handshake");
        let mut send = connection.open_uni().await.expect("open");
        send.write_all(&vec![7u8; 200_000]).await.expect("write");
        send.finish().expect("finish");
        let (received, _server) = accept.await.expect("server task");
        assert_eq!(received, 200_000);
        let (c, s) = (client_counts.figures(), server_counts.figures());
        // 200 kB cannot fit in fewer than 140 packets of at most 1,452 bytes.
        assert!(c.sent >= 140 && c.send_calls >= 1 && c.sent >= c.send_calls, "client {c}");
        assert!(s.received >= 140 && s.receive_calls >= 1 && s.received >= s.receive_calls, "server {s}");
        assert!(c.gso_segments >= 1 && s.gro_segments >= 1, "{c} / {s}");
        let later = c.since(&UdpFigures::default());
        assert_eq!(later.sent, c.sent);
    }

    struct Pair {
        server: ServerConfig,
        client: quinn::ClientConfig,
    }

    /// A self-signed server and a client that trusts it (no client certificate: this is about
    /// sockets, not about who may connect).
    fn identity_pair() -> Pair {
        use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
        let made = rcgen::generate_simple_self_signed(vec!["relay.test".to_owned()]).expect("cert");
        let cert = CertificateDer::from(made.cert.der().to_vec());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(made.signing_key.serialize_der()));
        let provider = crate::tls::provider();
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .expect("server crypto");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).expect("root");
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Pair {
            server: ServerConfig::with_crypto(Arc::new(
                QuicServerConfig::try_from(server).expect("QUIC server"),
            )),
            client: quinn::ClientConfig::new(Arc::new(
                QuicClientConfig::try_from(client).expect("QUIC client"),
            )),
        }
    }
}
