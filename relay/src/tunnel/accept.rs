//! Accepting agent connections: the handshake under its timeout, enrollment by ALPN, the agent's
//! identity from its certificate, and revoked certificates refused.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use quinn::{Endpoint, Incoming};
use sallyport_proto::codes::close;
use sallyport_runtime::code;
use sallyport_runtime::{link::Connection, tcp};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info_span, Instrument};

use crate::{
    trust::enroll,
    tunnel::{control, gate::Pass, identity::agent_identity, state::Tunnels},
};

/// Accepts agent connections until `stop` is cancelled. Each connection gets its own task.
pub(crate) async fn accept_loop(endpoint: Endpoint, tunnels: Arc<Tunnels>, stop: CancellationToken) {
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => incoming,
            () = stop.cancelled() => None,
        };
        let Some(incoming) = incoming else { break };
        // Under a handshake flood, make unvalidated peers prove their address first.
        if !incoming.remote_address_validated()
            && endpoint.open_connections() > tunnels.config.get().relay.max_incoming
        {
            if let Err(e) = incoming.retry() {
                debug!(error = %e, "retry refused");
            }
            continue;
        }
        let remote = incoming.remote_address();
        let Some(pass) = enter_gate(&tunnels, remote) else {
            incoming.refuse();
            continue;
        };
        let work = handle_incoming(incoming, pass, tunnels.clone()).instrument(info_span!("tunnel", %remote));
        tunnels.runtime.accepting.spawn(work);
    }
}

/// A TCP connection whose ClientHello offered the tunnel's ALPN, read by the HTTPS listener that
/// shares the tunnel's port: the bytes read go first into the TLS handshake.
#[derive(Debug)]
pub(crate) struct Handoff {
    pub(crate) stream: TcpStream,
    pub(crate) peer: SocketAddr,
    pub(crate) first: Vec<u8>,
}

/// Accepts agents' tunnels over TCP, on the tunnel's own listener and from the HTTPS listener,
/// until `stop` is cancelled. Each connection gets its own task.
pub(crate) async fn tcp_accept_loop(
    listener: Option<TcpListener>,
    handoffs: mpsc::Receiver<Handoff>,
    tunnels: Arc<Tunnels>,
    stop: CancellationToken,
) {
    let mut arrivals = TcpArrivals { listener, handoffs: Some(handoffs) };
    while let Some(Handoff { stream, peer, first }) = arrivals.next(&stop).await {
        sallyport_runtime::tcp::tunnel_socket(&stream);
        let io = tcp::Prefixed::new(first, stream);
        let work = serve_tcp(io, peer, tunnels.clone())
            .instrument(info_span!("tunnel", remote = %peer, transport = "tcp"));
        tunnels.runtime.accepting.spawn(work);
    }
}

/// Where tunnels over TCP come from: the tunnel's own listener, if it has one, and the HTTPS
/// listener's handoffs while that listener runs.
struct TcpArrivals {
    listener: Option<TcpListener>,
    handoffs: Option<mpsc::Receiver<Handoff>>,
}

impl TcpArrivals {
    /// The next connection, or `None` once `stop` is cancelled. A closed handoff channel (the
    /// HTTPS listener gone) is let go: it must not keep this, and so the listener, waiting.
    async fn next(&mut self, stop: &CancellationToken) -> Option<Handoff> {
        loop {
            let accept = async {
                match &self.listener {
                    Some(listener) => listener.accept().await,
                    None => std::future::pending().await,
                }
            };
            let handoff = async {
                match &mut self.handoffs {
                    Some(handoffs) => handoffs.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                accepted = accept => match accepted {
                    Ok((stream, peer)) => return Some(Handoff { stream, peer, first: Vec::new() }),
                    Err(e) => {
                        // Out of descriptors, most likely: a pause rather than a spin.
                        debug!(error = %e, "TCP accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                handoff = handoff => match handoff {
                    Some(handoff) => return Some(handoff),
                    None => self.handoffs = None,
                },
                () = stop.cancelled() => return None,
            }
        }
    }
}

/// Serves one incoming connection; while its peer is unproven, newer connections may push it out.
async fn handle_incoming(incoming: Incoming, pass: Pass, tunnels: Arc<Tunnels>) {
    let closed = pass.closed.clone();
    tokio::select! {
        () = serve_incoming(incoming, pass, tunnels) => {}
        () = closed.cancelled() => debug!("unauthenticated connection pushed out by newer ones"),
    }
}

async fn serve_incoming(incoming: Incoming, pass: Pass, tunnels: Arc<Tunnels>) {
    let remote = incoming.remote_address();
    let Some(connection) = within_handshake(&tunnels, remote, incoming).await else { return };
    serve_connection(Connection::from(connection), pass, tunnels).await;
}

/// A place behind the gate for a connection from `remote` before its handshake (counted when it
/// pushes out an older unauthenticated one); `None`, counted and logged, when the gate refuses it.
fn enter_gate(tunnels: &Tunnels, remote: SocketAddr) -> Option<Pass> {
    let metrics = &tunnels.runtime.metrics;
    match tunnels.gate.enter(remote.ip()) {
        Ok((pass, pushed_out)) => {
            if pushed_out {
                metrics.handshake_failed("unauthenticated_pushed_out");
            }
            Some(pass)
        }
        Err(refused) => {
            metrics.handshake_failed(refused.metric());
            debug!(%remote, reason = %refused, "connection refused before its handshake");
            None
        }
    }
}

/// The handshake's outcome within `relay.handshake_timeout`; `None`, counted and logged (a few
/// lines per period), when it fails or times out.
async fn within_handshake<T, E: std::fmt::Display>(
    tunnels: &Tunnels,
    remote: SocketAddr,
    handshake: impl std::future::IntoFuture<Output = Result<T, E>>,
) -> Option<T> {
    let timeout = tunnels.config.get().relay.handshake_timeout;
    let metrics = &tunnels.runtime.metrics;
    match tokio::time::timeout(timeout, handshake).await {
        Ok(Ok(done)) => Some(done),
        Ok(Err(e)) => {
            sallyport_runtime::limited_per!(remote.ip(), warn, %remote, error = %e, "handshake failed");
            metrics.handshake_failed("tls");
            None
        }
        Err(_) => {
            sallyport_runtime::limited_per!(remote.ip(), warn, %remote, ?timeout, "handshake timed out");
            metrics.handshake_failed("timeout");
            None
        }
    }
}

/// Serves one TCP connection that asked for the tunnel's ALPN (`first` holds the bytes of its
/// ClientHello read already): TLS, then HTTP/2, then the same as a QUIC connection.
async fn serve_tcp<IO>(io: IO, remote: SocketAddr, tunnels: Arc<Tunnels>)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let Some(pass) = enter_gate(&tunnels, remote) else { return };
    let closed = pass.closed.clone();
    let work = async {
        let config = tunnels.config.get();
        let limits = &config.relay;
        let Some(tls) = tunnels.tcp_tls.clone() else { return };
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let handshake = async {
            let tls = acceptor.accept(io).await.map_err(|e| e.to_string())?;
            let peer = tcp::Peer::of(remote, tls.get_ref().1);
            let settings = sallyport_runtime::tcp::tcp_relay(
                limits.keep_alive,
                limits.idle_timeout,
                peer.certificates.is_some(),
            );
            tcp::client(tls, peer, settings).await.map_err(|e| e.to_string())
        };
        let Some(connection) = within_handshake(&tunnels, remote, handshake).await else { return };
        serve_connection(Connection::from(connection), pass, tunnels.clone()).await;
    };
    tokio::select! {
        () = work => {}
        () = closed.cancelled() => debug!("unauthenticated connection pushed out by newer ones"),
    }
}

/// A connection whose handshake is done, on either transport: enrollment by ALPN, or an agent
/// proven by its certificate.
async fn serve_connection(connection: Connection, pass: Pass, tunnels: Arc<Tunnels>) {
    let metrics = &tunnels.runtime.metrics;
    let alpn = connection.alpn();
    if alpn.as_deref() == Some(sallyport_proto::enroll::ALPN_ENROLL) {
        // An enrolling peer holds its unauthenticated place until it is done.
        match &tunnels.trust.enrollment {
            Some(enrollment) => {
                let redeem = async |id, secret: [u8; 32]| match &tunnels.cluster {
                    Some(cluster) if !cluster.is_writer() => cluster.redeem(id, &secret).await,
                    _ => enrollment.tokens.redeem(id, &secret, sallyport_runtime::clock::unix_now()),
                };
                enroll::serve(connection, enrollment, redeem).await;
            }
            None => connection.close(code(close::REFUSED), b"enrollment is off"),
        }
        drop(pass);
        return;
    }
    let cert = match agent_identity(&connection) {
        Ok(identity) => identity,
        Err(refused) => {
            let remote = connection.remote_address();
            sallyport_runtime::limited_per!(remote.ip(), warn, %remote, reason = %refused, "agent certificate refused");
            metrics.handshake_failed("certificate");
            connection.close(code(close::REFUSED), refused.to_string().as_bytes());
            return;
        }
    };
    // A writer that lost its revocations gets them back from the others' first reports: until it
    // has heard them, it holds agents back rather than admit one revoked elsewhere.
    if let Some(cluster) = &tunnels.cluster {
        cluster.revocations_heard().await;
    }
    if tunnels.trust.revocations.refuses(&cert.id) {
        sallyport_runtime::limited_per!(cert.id.agent, warn, agent = %cert.id.agent, serial = %cert.id.serial, "revoked certificate refused");
        metrics.handshake_failed("revoked");
        connection.close(code(close::REFUSED), b"certificate revoked");
        return;
    }
    if tunnels.trust.revocations.retired(&cert.id) {
        sallyport_runtime::limited_per!(cert.id.agent, warn, agent = %cert.id.agent, serial = %cert.id.serial, "retired certificate refused: the agent connected with a newer one");
        metrics.handshake_failed("retired");
        connection.close(code(close::REFUSED), b"certificate replaced by a newer one of this agent");
        return;
    }
    // The newest certificate of the agent that connected: older ones (a renewal's predecessor,
    // or a copy of it) are refused from now on.
    match tunnels.trust.revocations.retire_before(&cert.id) {
        Ok(true) => {
            debug!(serial = %cert.id.serial, "certificates of the agent older than this one are retired")
        }
        Ok(false) => {}
        Err(e) => tracing::warn!(error = %e, "older certificates retired but not saved"),
    }
    // A proven agent: the tunnel's limits, and its place behind the gate is free again.
    if let Some(quic) = connection.quic() {
        sallyport_runtime::quic::admit_agent(quic);
    }
    pass.admitted_agent();
    let span = info_span!("agent", agent = %cert.id.agent);
    control::serve_agent(connection, cert, tunnels).instrument(span).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOON: Duration = Duration::from_secs(2);

    /// The HTTPS listener stops before the tunnel's (its sender is dropped first): connections
    /// still come in on the tunnel's listener, and `stop` still ends the loop every time, so the
    /// listener is closed and its port free for a relay started again on the same address.
    #[tokio::test]
    async fn a_closed_handoff_channel_neither_blocks_the_listener_nor_the_stop() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (sender, handoffs) = mpsc::channel(1);
        drop(sender);
        let mut arrivals = TcpArrivals { listener: Some(listener), handoffs: Some(handoffs) };
        let stop = CancellationToken::new();

        let client = TcpStream::connect(addr).await.expect("connect");
        let arrived = tokio::time::timeout(SOON, arrivals.next(&stop)).await.expect("a connection arrives");
        let arrived = arrived.expect("not stopped");
        assert_eq!(arrived.peer, client.local_addr().expect("client addr"));
        assert!(arrived.first.is_empty());

        stop.cancel();
        // Stopped and closed channel are both ready: whichever is polled first, the answer is
        // `None` (at once, each time).
        for _ in 0..32 {
            let next = tokio::time::timeout(SOON, arrivals.next(&stop)).await.expect("stop is seen");
            assert!(next.is_none());
        }
        drop(arrivals);
        TcpListener::bind(addr).await.expect("the port is free again");
    }

    /// A connection handed off by the HTTPS listener comes with the bytes it read.
    #[tokio::test]
    async fn a_handed_off_connection_keeps_its_first_bytes() {
        let (sender, handoffs) = mpsc::channel(1);
        let mut arrivals = TcpArrivals { listener: None, handoffs: Some(handoffs) };
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr")).await.expect("connect");
        let (stream, peer) = listener.accept().await.expect("accept");
        sender.send(Handoff { stream, peer, first: b"\x16\x03\x01".to_vec() }).await.expect("send");
        let arrived = tokio::time::timeout(SOON, arrivals.next(&CancellationToken::new()))
            .await
            .expect("handed off")
            .expect("not stopped");
        assert_eq!(
            (arrived.peer, arrived.first),
            (client.local_addr().expect("addr"), b"\x16\x03\x01".to_vec())
        );
    }
}
